//! Bad input never panics the server, never hangs other connections and
//! loses no data: out-of-range and invalid requests sent by libnbd with its
//! client-side checks off, and malformed bytes written straight to a socket.
//! Each test ends by checking the log has no panic and a fresh client still
//! reads back the data written before the bad input.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use system_tests::{nbdsh_script, random_bytes, require_tool, run_output, Process, Scratch};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 64 * MIB;
/// How long a socket read or write may block before the test calls it a hang.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x3_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const CLIENT_FLAGS: u32 = 0x3; // FIXED_NEWSTYLE | NO_ZEROES
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;
const ENOSPC: u32 = 28;

// ---------------------------------------------------------------------------
// Server setup and the final health check.

/// Start a server on a fresh 64 MiB sparse volume in `scratch`.
fn serve(scratch: &Scratch, extra: &[&str]) -> Process {
    Process::serve_volume(scratch, "64M", extra)
}

/// Random bytes written at offset 0 (and flushed) before any bad input, so
/// the end of each test can check nothing was lost.
fn seed_data(server: &Process) -> Vec<u8> {
    let data = random_bytes(256 << 10, 0xbad1);
    let mut client = Client::handshake(server.address);
    client.write(0, &data);
    client.flush();
    data
}

/// The server has not panicked, is not a zombie, accepts a new client, and
/// that client reads back `data` at offset 0.
fn assert_server_healthy(server: &Process, data: &[u8]) {
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).expect("server process exists");
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("?");
    assert_ne!(state, "Z", "the server process exited:\n{log}");
    let mut client = Client::handshake(server.address);
    assert_eq!(client.read(0, data.len() as u32), data, "data written before the bad input changed");
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

// ---------------------------------------------------------------------------
// A raw NBD client: fixed newstyle, no structured replies, bytes written by
// hand so tests can send anything.

fn connect(address: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&address, SOCKET_TIMEOUT).expect("connect to the server");
    stream.set_read_timeout(Some(SOCKET_TIMEOUT)).expect("read timeout");
    stream.set_write_timeout(Some(SOCKET_TIMEOUT)).expect("write timeout");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

fn read_exact(stream: &mut TcpStream, len: usize, what: &str) -> Vec<u8> {
    let mut buffer = vec![0; len];
    stream.read_exact(&mut buffer).unwrap_or_else(|e| panic!("reading {what} ({len} bytes): {e}"));
    buffer
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes[..2].try_into().expect("2 bytes"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}

/// Read the 18-byte server greeting and check it is fixed newstyle.
fn read_greeting(stream: &mut TcpStream) {
    let greeting = read_exact(stream, 18, "greeting");
    assert_eq!(be_u64(&greeting[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be_u64(&greeting[8..]), IHAVEOPT, "greeting option magic");
    assert_ne!(be_u16(&greeting[16..]) & FLAG_FIXED_NEWSTYLE, 0, "server is not fixed newstyle");
}

/// Connect, read the greeting and send the client flags: ready for options.
fn start_options(address: SocketAddr) -> TcpStream {
    let mut stream = connect(address);
    read_greeting(&mut stream);
    stream.write_all(&CLIENT_FLAGS.to_be_bytes()).expect("send client flags");
    stream
}

fn send_option(stream: &mut TcpStream, option: u32, data: &[u8]) {
    let mut message = Vec::with_capacity(16 + data.len());
    message.extend_from_slice(&IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    message.extend_from_slice(&(data.len() as u32).to_be_bytes());
    message.extend_from_slice(data);
    stream.write_all(&message).unwrap_or_else(|e| panic!("send option {option}: {e}"));
}

/// One option reply: (reply type, data), after checking magic and option.
fn read_option_reply(stream: &mut TcpStream, option: u32) -> (u32, Vec<u8>) {
    let header = read_exact(stream, 20, "option reply header");
    assert_eq!(be_u64(&header[0..]), OPTION_REPLY_MAGIC, "option reply magic");
    assert_eq!(be_u32(&header[8..]), option, "option reply answers another option");
    let reply_type = be_u32(&header[12..]);
    let len = be_u32(&header[16..]) as usize;
    assert!(len <= 1 << 20, "option reply of {len} bytes");
    (reply_type, read_exact(stream, len, "option reply data"))
}

fn go_data(name: &str) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

/// Send NBD_OPT_GO for `name` and read replies to the ACK; returns the size
/// from NBD_INFO_EXPORT, or the error reply type.
fn go(stream: &mut TcpStream, name: &str) -> Result<u64, u32> {
    send_option(stream, OPT_GO, &go_data(name));
    let mut size = None;
    loop {
        let (reply_type, data) = read_option_reply(stream, OPT_GO);
        match reply_type {
            REP_ACK => return Ok(size.expect("NBD_INFO_EXPORT before the ACK")),
            REP_INFO if be_u16(&data) == INFO_EXPORT => size = Some(be_u64(&data[2..])),
            REP_INFO => {}
            error if error & (1 << 31) != 0 => return Err(error),
            other => panic!("unexpected reply {other:#x} to NBD_OPT_GO"),
        }
    }
}

fn request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(28);
    header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(&command.to_be_bytes());
    header.extend_from_slice(&cookie.to_be_bytes());
    header.extend_from_slice(&offset.to_be_bytes());
    header.extend_from_slice(&length.to_be_bytes());
    header
}

/// A connection in transmission phase with simple replies.
struct Client {
    stream: TcpStream,
    cookie: u64,
}

impl Client {
    /// Connect and negotiate the default export with NBD_OPT_GO.
    fn handshake(address: SocketAddr) -> Client {
        let mut stream = start_options(address);
        let size = go(&mut stream, "").unwrap_or_else(|e| panic!("NBD_OPT_GO failed with {e:#x}"));
        assert_eq!(size, VOLUME_BYTES, "export size");
        Client { stream, cookie: 0 }
    }

    fn send(&mut self, flags: u16, command: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let mut message = request(flags, command, self.cookie, offset, length);
        message.extend_from_slice(payload);
        self.stream.write_all(&message).unwrap_or_else(|e| panic!("send command {command}: {e}"));
        self.cookie
    }

    /// Read one simple reply for `cookie`; returns its error field.
    fn reply(&mut self, cookie: u64) -> u32 {
        let header = read_exact(&mut self.stream, 16, "simple reply");
        assert_eq!(be_u32(&header[0..]), SIMPLE_REPLY_MAGIC, "simple reply magic");
        assert_eq!(be_u64(&header[8..]), cookie, "reply cookie");
        be_u32(&header[4..])
    }

    fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let cookie = self.send(0, CMD_READ, offset, length, &[]);
        assert_eq!(self.reply(cookie), 0, "READ of {length} at {offset} failed");
        read_exact(&mut self.stream, length as usize, "read payload")
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let cookie = self.send(0, CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(self.reply(cookie), 0, "WRITE of {} at {offset} failed", data.len());
    }

    fn flush(&mut self) {
        let cookie = self.send(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(self.reply(cookie), 0, "FLUSH failed");
    }
}

/// Wait for the server to close `stream`, discarding whatever it sends first.
fn assert_closed(stream: &mut TcpStream, why: &str) {
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the server did not close the connection within {SOCKET_TIMEOUT:?} after {why}")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return, // reset: closed too
        }
    }
}

// ---------------------------------------------------------------------------
// Bad requests through libnbd with strict mode off.

/// Run python libnbd checks against `server`: `body` calls
/// `expect(errno, name, function)`, which asserts the exact errno and then
/// that the same connection still reads `PATTERN` at offset 0.
fn python_checks(server: &Process, body: &str) {
    let script = format!(
        r#"import nbd, signal, sys
signal.alarm(120)
MiB = 1 << 20
h = nbd.NBD()
h.connect_uri({uri:?})
h.set_strict_mode(0)
size = h.get_size()
PATTERN = h.pread(4096, 0)
def expect(errnum, name, function):
    try:
        function()
    except nbd.Error as e:
        if e.errnum != errnum:
            sys.exit(f"{{name}}: errno {{e.errnum}} ({{e.errno}}), expected {{errnum}}: {{e.string}}")
    else:
        sys.exit(f"{{name}}: succeeded, expected errno {{errnum}}")
    try:
        after = h.pread(4096, 0)
    except nbd.Error as e:
        sys.exit(f"{{name}}: the connection no longer reads: {{e}}")
    if after != PATTERN:
        sys.exit(f"{{name}}: data at offset 0 changed")
    print(f"{{name}}: ok")
{body}
h.shutdown()
print("all ok")
"#,
        uri = server.uri()
    );
    let out = nbdsh_script(&script);
    assert!(out.contains("all ok"), "{out}");
}

/// One writable server with seeded data; runs `body`, then checks health.
fn writable_checks(label: &str, body: &str) {
    if !require_tool("nbdsh") {
        return;
    }
    let scratch = Scratch::new(label);
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    python_checks(&server, body);
    assert_server_healthy(&server, &data);
}

/// READ, TRIM, BLOCK_STATUS and CACHE past the end fail with EINVAL and the
/// connection keeps working.
#[test]
fn reads_past_end_are_einval_and_connection_survives() {
    writable_checks(
        "past-end-read",
        r#"
expect(22, "read past end", lambda: h.pread(4096, size))
expect(22, "read straddling end", lambda: h.pread(8192, size - 4096))
expect(22, "trim past end", lambda: h.trim(4096, size))
expect(22, "trim straddling end", lambda: h.trim(8192, size - 4096))
expect(22, "cache past end", lambda: h.cache(4096, size))
expect(22, "block status past end", lambda: h.block_status(4096, size, lambda *a: 0))
"#,
    );
}

/// WRITE and WRITE_ZEROES past the end fail with ENOSPC, the payload is
/// consumed, and the connection keeps working.
#[test]
fn writes_past_end_are_enospc_and_connection_survives() {
    writable_checks(
        "past-end-write",
        r#"
expect(28, "write past end", lambda: h.pwrite(b"x" * 4096, size))
expect(28, "write straddling end", lambda: h.pwrite(b"x" * 8192, size - 4096))
expect(28, "write_zeroes past end", lambda: h.zero(4096, size))
expect(28, "write_zeroes straddling end", lambda: h.zero(8192, size - 4096))
assert h.pread(4096, size - 4096) == bytes(4096), "a rejected straddling write changed the last block"
"#,
    );
}

/// Rejected WRITEs with 16 MiB payloads get their errno through libnbd: the
/// server answers only after reading the payload (libnbd drops a connection
/// whose reply arrives while it is still sending that command).
#[test]
fn large_rejected_writes_get_errno_and_connection_survives() {
    writable_checks(
        "large-rejected-write",
        r#"
expect(28, "16 MiB write past end", lambda: h.pwrite(b"\xee" * (16 * MiB), size))
expect(22, "16 MiB write with unknown flag 1<<7", lambda: h.pwrite(b"\xee" * (16 * MiB), 0, 1 << 7))
"#,
    );
}

/// Invalid or unknown command flags fail with EINVAL; a rejected WRITE's
/// payload is consumed and not written.
#[test]
fn invalid_flags_are_einval_and_connection_survives() {
    writable_checks(
        "invalid-flags",
        r#"
expect(22, "read with NO_HOLE", lambda: h.pread(4096, 0, nbd.CMD_FLAG_NO_HOLE))
expect(22, "read with unknown flag 1<<7", lambda: h.pread(4096, 0, 1 << 7))
expect(22, "write with unknown flag 1<<7", lambda: h.pwrite(b"\xee" * 4096, 0, 1 << 7))
expect(22, "flush with unknown flag 1<<7", lambda: h.flush(1 << 7))
"#,
    );
}

/// Zero-length requests fail with EINVAL and the connection keeps working.
#[test]
fn zero_length_requests_are_einval_and_connection_survives() {
    writable_checks(
        "zero-length",
        r#"
expect(22, "zero-length read", lambda: h.pread(0, 0))
expect(22, "zero-length write", lambda: h.pwrite(b"", 0))
expect(22, "zero-length trim", lambda: h.trim(0, 0))
expect(22, "zero-length write_zeroes", lambda: h.zero(0, 0))
"#,
    );
}

/// READ and WRITE over the 32 MiB payload limit fail with EOVERFLOW; the
/// oversized write's payload is read off and the connection keeps working.
#[test]
fn oversized_payloads_are_eoverflow_and_connection_survives() {
    writable_checks(
        "oversized",
        r#"
expect(75, "read of 32 MiB + 4 KiB", lambda: h.pread(32 * MiB + 4096, 0))
expect(75, "write of 32 MiB + 4 KiB", lambda: h.pwrite(b"\xee" * (32 * MiB + 4096), 0))
"#,
    );
}

/// On a `--read-only` export WRITE, TRIM and WRITE_ZEROES fail with EPERM
/// and the connection keeps reading.
#[test]
fn writes_to_read_only_export_are_eperm_and_connection_survives() {
    if !require_tool("nbdsh") {
        return;
    }
    let scratch = Scratch::new("read-only");
    let volume = scratch.join("volume.img");
    let data = random_bytes(256 << 10, 0x0f0f);
    {
        let file = std::fs::File::create(&volume).expect("create volume");
        file.set_len(VOLUME_BYTES).expect("size volume");
        std::os::unix::fs::FileExt::write_all_at(&file, &data, 0).expect("seed volume");
    }
    let server = Process::serve(&scratch, &["--volume", volume.to_str().expect("utf-8 path"), "--read-only"]);
    python_checks(
        &server,
        r#"
assert h.is_read_only(), "export not read-only"
expect(1, "write", lambda: h.pwrite(b"\xee" * 4096, 0))
expect(1, "trim", lambda: h.trim(4096, 0))
expect(1, "write_zeroes", lambda: h.zero(4096, 0))
expect(1, "write_zeroes with FAST_ZERO", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
"#,
    );
    assert_server_healthy(&server, &data);
    assert_eq!(std::fs::read(&volume).expect("read volume")[..data.len()], data[..], "the read-only volume changed");
}

// ---------------------------------------------------------------------------
// Malformed bytes on a raw socket.

/// Garbage client flags, or garbage where the option magic belongs, close
/// that connection and the server goes on serving (nbdinfo works).
#[test]
fn garbage_handshake_closes_connection_and_server_survives() {
    let scratch = Scratch::new("garbage-handshake");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);

    let mut stream = connect(server.address);
    read_greeting(&mut stream);
    stream.write_all(&[0xde, 0xad, 0xbe, 0xef]).expect("send garbage flags");
    assert_closed(&mut stream, "garbage client flags");

    let mut stream = start_options(server.address);
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").expect("send garbage option");
    assert_closed(&mut stream, "garbage instead of the option magic");

    // A client that speaks first, before reading the greeting.
    let mut stream = connect(server.address);
    stream.write_all(&random_bytes(1000, 3)).expect("send noise");
    assert_closed(&mut stream, "random bytes from the start");

    if require_tool("nbdinfo") {
        let output = run_output("timeout", &["60", "nbdinfo", &server.uri()]);
        assert!(output.status.success(), "nbdinfo after garbage: {}", String::from_utf8_lossy(&output.stderr));
    }
    assert_server_healthy(&server, &data);
}

/// A request header with bad magic closes that connection only.
#[test]
fn bad_request_magic_closes_connection_and_server_survives() {
    let scratch = Scratch::new("bad-magic");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut client = Client::handshake(server.address);
    let mut message = request(0, CMD_READ, 1, 0, 4096);
    message[..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
    client.stream.write_all(&message).expect("send bad magic");
    assert_closed(&mut client.stream, "a request with bad magic");
    assert_server_healthy(&server, &data);
}

/// A truncated request header followed by a close does no harm.
#[test]
fn truncated_request_header_then_close_is_harmless() {
    let scratch = Scratch::new("truncated-header");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    for cut in [1, 4, 10, 27] {
        let mut client = Client::handshake(server.address);
        let message = request(0, CMD_WRITE, 1, 0, 4096);
        client.stream.write_all(&message[..cut]).expect("send part of a header");
        drop(client);
    }
    // A WRITE whose payload is cut short, then closed.
    let mut client = Client::handshake(server.address);
    let mut message = request(0, CMD_WRITE, 1, 0, 4096);
    message.extend_from_slice(&[0xee; 100]);
    client.stream.write_all(&message).expect("send a short write");
    drop(client);
    assert_server_healthy(&server, &data);
}

/// A WRITE larger than the server will ever read off (64 MiB + 1) closes the
/// connection rather than waiting for the payload.
#[test]
fn write_over_discard_cap_closes_connection() {
    let scratch = Scratch::new("discard-cap");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut client = Client::handshake(server.address);
    client.send(0, CMD_WRITE, 0, (64 << 20) + 1, &[]);
    assert_closed(&mut client.stream, "a WRITE of 64 MiB + 1");
    assert_server_healthy(&server, &data);
}

/// A WRITE over the payload limit but under the discard cap gets EOVERFLOW,
/// its payload is read off, and the same connection keeps working.
#[test]
fn oversized_write_payload_is_skipped_and_connection_survives() {
    let scratch = Scratch::new("oversized-raw");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut client = Client::handshake(server.address);
    let length = (32 << 20) + 1;
    let mut writer = client.stream.try_clone().expect("clone stream");
    // Written from a thread: a server that replies before reading the
    // payload must not deadlock the test on a full socket buffer.
    let sender = std::thread::spawn(move || {
        let mut message = request(0, CMD_WRITE, 77, 0, length);
        message.resize(28 + length as usize, 0xee);
        writer.write_all(&message)
    });
    assert_eq!(client.reply(77), EOVERFLOW, "WRITE of 32 MiB + 1 should fail with EOVERFLOW");
    sender.join().expect("sender thread").expect("send the oversized payload");
    client.cookie = 77;
    assert_eq!(client.read(0, data.len() as u32), data, "the same connection reads after EOVERFLOW");
    assert_server_healthy(&server, &data);
}

/// The error reply to a rejected WRITE comes only after its whole payload
/// has arrived, for an over-limit length (EOVERFLOW) and a write past the end
/// (ENOSPC) alike.
#[test]
fn rejected_write_is_answered_only_after_its_payload() {
    let scratch = Scratch::new("reply-after-payload");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut client = Client::handshake(server.address);
    for (offset, length, errno) in [(0, (32 << 20) + 1, EOVERFLOW), (VOLUME_BYTES, 1 << 20, ENOSPC)] {
        let cookie = client.send(0, CMD_WRITE, offset, length, &[0xee; 100]);
        client.stream.set_read_timeout(Some(Duration::from_millis(300))).expect("short timeout");
        let mut byte = [0u8; 1];
        match client.stream.peek(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("the server answered a WRITE of {length} before its payload arrived: {other:?}"),
        }
        client.stream.set_read_timeout(Some(SOCKET_TIMEOUT)).expect("timeout");
        let mut writer = client.stream.try_clone().expect("clone stream");
        let rest = length as usize - 100;
        let sender = std::thread::spawn(move || writer.write_all(&vec![0xee; rest]));
        assert_eq!(client.reply(cookie), errno, "WRITE of {length} at {offset}");
        sender.join().expect("sender thread").expect("send the rest of the payload");
    }
    assert_eq!(client.read(0, data.len() as u32), data, "the same connection reads afterwards");
    assert_server_healthy(&server, &data);
}

/// An unknown command gets EINVAL and the same connection keeps working.
#[test]
fn unknown_command_is_einval_and_connection_survives() {
    let scratch = Scratch::new("unknown-command");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut client = Client::handshake(server.address);
    let cookie = client.send(0, 99, 0, 4096, &[]);
    assert_eq!(client.reply(cookie), EINVAL, "unknown command 99");
    assert_eq!(client.read(0, data.len() as u32), data);
    assert_server_healthy(&server, &data);
}

/// Clients stalled mid-handshake or mid-payload do not block other clients,
/// and earlier data stays intact.
#[test]
fn stalled_clients_do_not_block_others() {
    let scratch = Scratch::new("stalled");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);

    // Connected but silent before the client flags.
    let mut silent = connect(server.address);
    read_greeting(&mut silent);
    // An option header promising 1000 bytes, followed by 10.
    let mut mid_option = start_options(server.address);
    let mut option = Vec::new();
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&1000u32.to_be_bytes());
    option.extend_from_slice(&[0; 10]);
    mid_option.write_all(&option).expect("send part of an option");
    // A WRITE header promising 4096 bytes, followed by 100.
    let mut mid_write = Client::handshake(server.address);
    let mut message = request(0, CMD_WRITE, 1, 8 * MIB, 4096);
    message.extend_from_slice(&[0xee; 100]);
    mid_write.stream.write_all(&message).expect("send a short write");

    // Meanwhile another connection reads, writes and flushes.
    let mut other = Client::handshake(server.address);
    assert_eq!(other.read(0, data.len() as u32), data);
    other.write(16 * MIB, &[0x5a; 4096]);
    other.flush();
    assert_eq!(other.read(16 * MIB, 4096), vec![0x5a; 4096]);

    if require_tool("nbdcopy") {
        let copy = scratch.join("copy.img");
        let output = run_output("timeout", &["60", "nbdcopy", &server.uri(), copy.to_str().expect("utf-8 path")]);
        assert!(
            output.status.success(),
            "nbdcopy beside stalled clients failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let copied = std::fs::read(&copy).expect("read copy");
        assert_eq!(&copied[..data.len()], &data[..], "nbdcopy saw different data");
        assert_eq!(&copied[16 << 20..(16 << 20) + 4096], &[0x5a; 4096][..]);
        assert!(copied[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 0), "an unfinished WRITE changed data");
    }
    assert_server_healthy(&server, &data);
    drop((silent, mid_option, mid_write));
    assert_server_healthy(&server, &data);
}

/// An unknown option gets NBD_REP_ERR_UNSUP and the handshake goes on to GO.
#[test]
fn unknown_option_is_unsupported_and_handshake_continues() {
    let scratch = Scratch::new("unknown-option");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut stream = start_options(server.address);
    send_option(&mut stream, 99, &[]);
    let (reply_type, _) = read_option_reply(&mut stream, 99);
    assert_eq!(reply_type, REP_ERR_UNSUP, "unknown option 99");
    send_option(&mut stream, 99, b"some data");
    let (reply_type, _) = read_option_reply(&mut stream, 99);
    assert_eq!(reply_type, REP_ERR_UNSUP, "unknown option 99 with data");
    assert_eq!(go(&mut stream, "nope"), Err(REP_ERR_UNKNOWN), "GO for an unknown export name");
    assert_eq!(go(&mut stream, ""), Ok(VOLUME_BYTES), "GO after the errors");
    let mut client = Client { stream, cookie: 0 };
    assert_eq!(client.read(0, data.len() as u32), data);
    assert_server_healthy(&server, &data);
}

/// An option with 100 000 bytes of data gets NBD_REP_ERR_TOO_BIG, the data
/// is skipped, and the handshake goes on to GO.
#[test]
fn oversized_option_is_too_big_and_handshake_continues() {
    let scratch = Scratch::new("option-too-big");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut stream = start_options(server.address);
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || {
        let mut option = Vec::new();
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&99u32.to_be_bytes());
        option.extend_from_slice(&100_000u32.to_be_bytes());
        option.extend_from_slice(&random_bytes(100_000, 9));
        writer.write_all(&option)
    });
    let (reply_type, _) = read_option_reply(&mut stream, 99);
    assert_eq!(reply_type, REP_ERR_TOO_BIG, "option of 100 000 bytes");
    sender.join().expect("sender thread").expect("send the oversized option");
    assert_eq!(go(&mut stream, ""), Ok(VOLUME_BYTES), "GO after TOO_BIG");
    let mut client = Client { stream, cookie: 0 };
    assert_eq!(client.read(0, data.len() as u32), data);
    assert_server_healthy(&server, &data);
}

/// NBD_OPT_ABORT is acknowledged, then the server closes the connection.
#[test]
fn abort_option_is_acked_then_closed() {
    let scratch = Scratch::new("abort");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let mut stream = start_options(server.address);
    send_option(&mut stream, OPT_ABORT, &[]);
    let (reply_type, _) = read_option_reply(&mut stream, OPT_ABORT);
    assert_eq!(reply_type, REP_ACK, "reply to NBD_OPT_ABORT");
    assert_closed(&mut stream, "NBD_OPT_ABORT");
    assert_server_healthy(&server, &data);
}

/// A client repeating a bad handshake in a loop cannot fill the disk with
/// log lines: the server logs the first few of a kind and counts the rest.
#[test]
fn repeated_bad_handshakes_do_not_flood_the_log() {
    let scratch = Scratch::new("bad-handshake-flood");
    let server = serve(&scratch, &[]);
    let data = seed_data(&server);
    let lines_before = server.log().lines().count();
    for _ in 0..300 {
        let mut stream = connect(server.address);
        read_greeting(&mut stream);
        stream.write_all(&[0xde, 0xad, 0xbe, 0xef]).expect("send garbage flags");
        assert_closed(&mut stream, "garbage client flags");
    }
    // The connection threads log after closing: let the last ones finish.
    std::thread::sleep(Duration::from_millis(300));
    let log = server.log();
    let lines = log.lines().count() - lines_before;
    assert!(lines < 30, "300 bad handshakes made the server log {lines} lines:\n{log}");
    assert_server_healthy(&server, &data);
}
