//! Forged network input — a wrong MAC, a huge length, garbage, a
//! well-authenticated but malformed body — closes that connection; the
//! voter stays up and keeps serving.

mod raft_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cluster_glue::quorum::raft::RaftQuorum;
use cluster_glue::quorum::{CasOutcome, QuorumStore};
use hmac::{Hmac, Mac};
use raft_common::{config, voters, GROUP, SECRET};
use sha2::Sha256;

fn frame(secret: &[u8], group: &str, body: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac key");
    mac.update(group.as_bytes());
    mac.update(body);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&mac.finalize().into_bytes());
    frame.extend_from_slice(body);
    frame
}

/// Send `bytes` and expect the voter to close the connection without a reply.
fn assert_closed(address: std::net::SocketAddr, bytes: &[u8], what: &str) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
    stream.write_all(bytes).expect("send");
    let mut reply = Vec::new();
    match stream.read_to_end(&mut reply) {
        Ok(_) => assert!(reply.is_empty(), "{what}: got a reply {reply:?}"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{what}: {error}"),
    }
}

/// Every kind of forged frame is refused and the voter keeps working.
#[test]
fn forged_frames_close_the_connection_and_the_voter_keeps_working() {
    let root = tempfile::tempdir().expect("tempdir");
    let voters = voters(1);
    let node = RaftQuorum::start(config(1, &voters, root.path())).expect("start");
    let timeout = Duration::from_secs(5);
    assert_eq!(node.compare_and_set("k", 0, b"a".to_vec(), timeout).expect("cas"), CasOutcome::Written(1));
    let address = voters[&1];

    let request =
        br#"{"group":"test-group","from":2,"message":{"Client":{"request":{"Read":{"key":"k"}},"timeout_ms":1000}}}"#;
    assert_closed(address, &frame(b"wrong secret", GROUP, request), "wrong MAC");
    assert_closed(address, &frame(SECRET, "other-group", request), "another group's MAC");
    let other_group_body =
        br#"{"group":"other-group","from":2,"message":{"Client":{"request":{"Read":{"key":"k"}},"timeout_ms":1000}}}"#;
    assert_closed(address, &frame(SECRET, GROUP, other_group_body), "another group in the body");
    assert_closed(address, &frame(SECRET, GROUP, b"not json at all"), "malformed body");
    assert_closed(
        address,
        &frame(SECRET, GROUP, br#"{"group":"test-group","from":2,"message":{"Nope":1}}"#),
        "unknown request",
    );
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0xAB; 64]);
    assert_closed(address, &huge, "huge length");
    assert_closed(address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "garbage");
    let mut truncated = frame(SECRET, GROUP, request);
    truncated.truncate(20);
    {
        // A frame cut short and the sender gone: nothing to answer.
        let mut stream = TcpStream::connect(address).expect("connect");
        stream.write_all(&truncated).expect("send");
    }

    // The authentic request on a fresh connection is answered.
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_read_timeout(Some(timeout)).expect("read timeout");
    stream.write_all(&frame(SECRET, GROUP, request)).expect("send");
    let mut header = [0u8; 36];
    stream.read_exact(&mut header).expect("a reply to the authentic request");

    assert_eq!(node.compare_and_set("k", 1, b"b".to_vec(), timeout).expect("cas"), CasOutcome::Written(2));
    assert_eq!(node.read("k", timeout).expect("read").map(|value| value.value), Some(b"b".to_vec()));
}
