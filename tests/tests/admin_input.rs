//! A hostile admin client never kills or blocks a host: a huge
//! Content-Length, oversized heads, bodies, garbage, and slow or idle
//! connections, against `serve --admin` and `copy-host --admin` of the real
//! binary. Each test ends by checking that `GET /status` still answers, the
//! process is alive and has not panicked, and its data path still serves
//! (NBD data read back on a production host, a replicated write acknowledged
//! on a copy host).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use engine::metadata::new_identity;
use engine::protocol::frame::{FrameFlags, FrameKind};
use engine::protocol::load_secret;
use engine::replicator::connect::CopyConnection;
use system_tests::{free_port, random_bytes, write_secret, CopyHost, Process, Scratch};

const VOLUME_BYTES: u64 = 8 << 20;
/// The admin endpoint's limit from accepting a connection to a whole request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections an attacker holds open: more than the endpoint's table.
const IDLE_CONNECTIONS: usize = 40;

/// A host under test: the process, its admin address, and how to check that
/// its data path still serves.
struct Host {
    process: Process,
    admin: SocketAddr,
    kind: Kind,
    /// Removed after the process is stopped.
    _scratch: Scratch,
}

enum Kind {
    /// A production host; the data written at offset 0 before the attack.
    Production { data: Vec<u8> },
    /// A copy host; its secret file.
    Copy { secret: PathBuf },
}

fn production(label: &str) -> Host {
    let scratch = Scratch::new(label);
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin_text = admin.to_string();
    let process = Process::serve_volume(&scratch, "8M", &["--admin", &admin_text]);
    let data = random_bytes(64 << 10, 0xad);
    nbd::write(process.address, 0, &data);
    Host { process, admin, kind: Kind::Production { data }, _scratch: scratch }
}

fn copy_host(label: &str) -> Host {
    let scratch = Scratch::new(label);
    let secret = write_secret(&scratch, "secret", 7);
    let copy = CopyHost::start(&scratch, "127.0.0.1", &scratch.join("copy.img"), "8M", &secret, &[]);
    Host { process: copy.process, admin: copy.admin, kind: Kind::Copy { secret }, _scratch: scratch }
}

/// Send `request` as is and read the answer to the end; returns the status
/// code (0 when the connection closed without one) and the whole answer.
fn send_raw(admin: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).expect("connect to the admin endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before taking all of an oversized
    // request: a failed write is not the test's business, the answer is.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let code = answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (code, answer)
}

fn get_status(admin: SocketAddr) -> (u16, String) {
    send_raw(admin, b"GET /status HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// The host is alive, has not panicked, answers `GET /status`, and its data
/// path serves.
fn assert_healthy(host: &Host) {
    std::thread::sleep(Duration::from_millis(300));
    let pid = host.process.pid();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("gone");
    assert!(!matches!(state, "Z" | "gone"), "the process died:\n{}", host.process.log());
    let log = host.process.log();
    assert!(!log.contains("panicked") && !log.contains("memory allocation"), "{log}");
    let (code, answer) = get_status(host.admin);
    assert_eq!(code, 200, "GET /status after the attack: {answer}\n{log}");
    match &host.kind {
        Kind::Production { data } => {
            assert!(nbd::read(host.process.address, 0, data.len()) == *data, "NBD data changed")
        }
        Kind::Copy { secret } => {
            let secret = load_secret(secret).unwrap();
            let identity = new_identity(VOLUME_BYTES).unwrap();
            let timeout = Duration::from_secs(5);
            let mut connection = CopyConnection::connect(host.process.address, &secret, identity, timeout, timeout)
                .expect("the copy host still accepts a production host");
            let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
            header.length = 4096;
            header.payload_len = 4096;
            connection.send(&header, &[7u8; 4096]).unwrap();
            assert_eq!(connection.receive().unwrap().header.kind, FrameKind::WriteAck);
        }
    }
}

/// Requests over every limit get a 4xx answer, a small body is read and
/// dropped, and the host lives on.
fn refuse_hostile_requests(host: &Host) {
    let admin = host.admin;
    let huge = b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n";
    assert_eq!(send_raw(admin, huge).0, 413, "GET with a 100 GB Content-Length");
    let huge = b"POST /verify?copy=x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\nabc";
    assert_eq!(send_raw(admin, huge).0, 413, "POST with a 100 GB Content-Length");
    let long_header = format!("GET /status HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n", "a".repeat(100 << 10));
    assert_eq!(send_raw(admin, long_header.as_bytes()).0, 431, "a 100 KiB header");
    let many_headers: String = (0..200).map(|index| format!("X-{index}: {index}\r\n")).collect();
    let many_headers = format!("GET /status HTTP/1.1\r\n{many_headers}\r\n");
    assert_eq!(send_raw(admin, many_headers.as_bytes()).0, 431, "200 headers");
    let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "p".repeat(1 << 20));
    assert_eq!(send_raw(admin, long_path.as_bytes()).0, 431, "a 1 MiB request line");
    let with_body = b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world";
    let (code, answer) = send_raw(admin, with_body);
    assert_eq!(code, 200, "GET with a small body: {answer}");
    assert!(answer.contains("\"size\""), "the status document: {answer}");
    let chunked = b"POST /verify HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffff\r\n";
    assert_eq!(send_raw(admin, chunked).0, 501, "a chunked body");
    assert_eq!(send_raw(admin, b"\x00\x01\x02garbage\r\n\r\n").0, 400, "garbage");
    let unfinished = b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nshort";
    let mut stream = TcpStream::connect(admin).unwrap();
    stream.write_all(unfinished).unwrap();
    drop(stream);
    assert_healthy(host);
}

/// Idle connections (more than the endpoint's table holds) and a client
/// sending its head a byte at a time do not keep `GET /status` from
/// answering at once, and each of them is closed once its time is up.
fn outlast_slow_and_idle_clients(host: &Host) {
    let admin = host.admin;
    let mut idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS).map(|_| TcpStream::connect(admin).unwrap()).collect();
    let mut slow = TcpStream::connect(admin).unwrap();
    let slow_writer = std::thread::spawn(move || {
        let head = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: 1234567890123456789012345678901234567890\r\n\r\n";
        let started = Instant::now();
        for byte in head {
            if slow.write_all(&[*byte]).is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        started.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let (code, answer) = get_status(admin);
    assert_eq!(code, 200, "GET /status while {IDLE_CONNECTIONS} clients idle: {answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "GET /status took {:?}", started.elapsed());
    // The idle connections are closed by the server once their time is up.
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(3);
    for stream in &mut idle {
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(remaining)).unwrap();
        let mut sink = Vec::new();
        let closed = stream.read_to_end(&mut sink).is_ok();
        assert!(closed, "an idle admin connection was still open {:?} after it was opened", REQUEST_TIMEOUT);
    }
    let slow_for = slow_writer.join().unwrap();
    assert!(slow_for < REQUEST_TIMEOUT + Duration::from_secs(3), "the slow client was served for {slow_for:?}");
    assert_healthy(host);
}

/// `serve --admin` refuses oversized and malformed requests and lives on.
#[test]
fn production_admin_refuses_hostile_requests() {
    let host = production("admin-hostile-production");
    refuse_hostile_requests(&host);
}

/// `copy-host --admin` refuses oversized and malformed requests and lives on.
#[test]
fn copy_host_admin_refuses_hostile_requests() {
    let host = copy_host("admin-hostile-copy");
    refuse_hostile_requests(&host);
}

/// Idle and slow clients of `serve --admin` neither block `GET /status` nor stay forever.
#[test]
fn production_admin_outlasts_slow_and_idle_clients() {
    let host = production("admin-slow-production");
    outlast_slow_and_idle_clients(&host);
}

/// Idle and slow clients of `copy-host --admin` neither block `GET /status` nor stay forever.
#[test]
fn copy_host_admin_outlasts_slow_and_idle_clients() {
    let host = copy_host("admin-slow-copy");
    outlast_slow_and_idle_clients(&host);
}

/// A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies): just
/// enough to show the data path still serves.
mod nbd {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    const OPT_GO: u32 = 7;
    const REP_ACK: u32 = 1;
    const REQUEST_MAGIC: u32 = 0x2560_9513;
    const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    fn read_bytes(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut buffer = vec![0; len];
        stream.read_exact(&mut buffer).expect("read from the NBD server");
        buffer
    }

    fn connect(address: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connect to NBD");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        read_bytes(&mut stream, 18);
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&6u32.to_be_bytes());
        option.extend_from_slice(&[0; 6]);
        stream.write_all(&option).unwrap();
        loop {
            let reply = read_bytes(&mut stream, 20);
            let reply_type = u32::from_be_bytes(reply[12..16].try_into().unwrap());
            let length = u32::from_be_bytes(reply[16..20].try_into().unwrap());
            read_bytes(&mut stream, length as usize);
            assert_eq!(reply_type & (1 << 31), 0, "NBD_OPT_GO failed: {reply_type:#x}");
            if reply_type == REP_ACK {
                return stream;
            }
        }
    }

    fn request(stream: &mut TcpStream, command: u16, offset: u64, length: usize, payload: &[u8]) {
        let mut message = Vec::new();
        message.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        message.extend_from_slice(&[0, 0]);
        message.extend_from_slice(&command.to_be_bytes());
        message.extend_from_slice(&1u64.to_be_bytes());
        message.extend_from_slice(&offset.to_be_bytes());
        message.extend_from_slice(&(length as u32).to_be_bytes());
        message.extend_from_slice(payload);
        stream.write_all(&message).unwrap();
        let reply = read_bytes(stream, 16);
        assert_eq!(u32::from_be_bytes(reply[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        assert_eq!(u32::from_be_bytes(reply[4..8].try_into().unwrap()), 0, "NBD command {command} failed");
    }

    /// Write `data` at `offset` and flush.
    pub fn write(address: SocketAddr, offset: u64, data: &[u8]) {
        let mut stream = connect(address);
        request(&mut stream, 1, offset, data.len(), data);
        request(&mut stream, 3, 0, 0, &[]);
    }

    /// Read `length` bytes at `offset`.
    pub fn read(address: SocketAddr, offset: u64, length: usize) -> Vec<u8> {
        let mut stream = connect(address);
        request(&mut stream, 0, offset, length, &[]);
        read_bytes(&mut stream, length)
    }
}
