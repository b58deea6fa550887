//! A small HTTP/1.1 server for the admin endpoint, built to survive a hostile
//! peer: every request is bounded in head bytes, header count, body bytes and
//! time, every connection answers one request and closes, and the number of
//! connections is capped.
//!
//! ```text
//!  accept ─▶ table full? ─▶ close the oldest connection still sending its request (or 503)
//!         ─▶ thread: read the head (HEAD_BYTES_MAX, REQUEST_TIMEOUT) ─▶ httparse
//!         ─▶ Content-Length over BODY_BYTES_MAX? 413 : read and drop the body
//!         ─▶ handler ─▶ answer with Connection: close
//! ```
//!
//! It replaces `tiny_http`, which aborted the process: its body reader
//! allocates `vec![0; remaining]` for the announced Content-Length when a
//! request is dropped unread (`EqualReader::drop`), so `Content-Length:
//! 100000000000` killed the production host with SIGABRT, and it reads
//! request heads with no size or time limit. Parsing is `httparse` (the
//! parser under hyper): it never allocates, and it refuses more headers than
//! the array it is given. The rest — limits, deadlines, the connection
//! table — is here, where it can be read whole.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use engine::log_limit::LogLimit;

/// Bytes of a request line and its headers; more is answered 431.
pub const HEAD_BYTES_MAX: usize = 8 << 10;
/// Headers in one request; more is answered 431.
pub const HEADERS_MAX: usize = 32;
/// Bytes of a request body (read and dropped: no endpoint takes one); more
/// is answered 413 without reading it.
pub const BODY_BYTES_MAX: u64 = 4 << 10;
/// Time from accepting a connection to having its whole request; a client
/// still sending then is answered 408 and closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once. When all are taken, the oldest one still
/// sending its request is closed to make room, so idle or slow clients
/// cannot keep a real one out.
pub const CONNECTIONS_MAX: usize = 16;
/// How long writing an answer may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// After answering, unread bytes from the client are drained for at most
/// this long (and this many bytes), so closing does not reset the
/// connection before the client has read the answer.
const LINGER: Duration = Duration::from_millis(200);
const LINGER_BYTES_MAX: usize = 64 << 10;

/// A parsed request: its method, path and query (without the `?`).
#[derive(Debug)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, e.g. `/status`.
    pub path: String,
    /// The query string, e.g. `copy=east&repair=1`; empty when absent.
    pub query: String,
}

/// What answers a request: a status code and a JSON document.
pub type Handler = Arc<dyn Fn(&Request) -> (u16, serde_json::Value) + Send + Sync>;

/// A connection in the table.
struct Slot {
    id: u64,
    /// A second handle on the socket, to close it when it is evicted.
    stream: TcpStream,
    accepted: Instant,
    /// Still sending its request (a handler runs once it is false); only
    /// such connections are evicted.
    reading: bool,
}

/// What the accept loop and the connection threads share.
struct Shared {
    slots: Mutex<Vec<Slot>>,
    next_id: AtomicU64,
    stop: AtomicBool,
    log_limit: LogLimit,
}

impl Shared {
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make room for one more connection: close the oldest one still sending
    /// its request. False when every connection is past that (handlers
    /// running).
    fn make_room(&self, slots: &mut Vec<Slot>) -> bool {
        if slots.len() < CONNECTIONS_MAX {
            return true;
        }
        let oldest = slots.iter().enumerate().filter(|(_, slot)| slot.reading).min_by_key(|(_, slot)| slot.accepted);
        let Some((index, _)) = oldest else {
            return false;
        };
        let evicted = slots.swap_remove(index);
        let _ = evicted.stream.shutdown(Shutdown::Both);
        true
    }

    fn finish_reading(&self, id: u64) {
        if let Some(slot) = self.slots().iter_mut().find(|slot| slot.id == id) {
            slot.reading = false;
        }
    }

    fn remove(&self, id: u64) {
        self.slots().retain(|slot| slot.id != id);
    }
}

/// A running HTTP server; stopped on drop.
pub struct HttpServer {
    shared: Arc<Shared>,
    address: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serve `handler` on `address`; `flag` names the option that gave the
    /// address, for the error message.
    pub fn start(address: SocketAddr, flag: &str, handler: Handler) -> anyhow::Result<HttpServer> {
        let listener = crate::address::bind(address, flag)?;
        listener.set_nonblocking(true).context("setting the admin socket non-blocking")?;
        let address = listener.local_addr().unwrap_or(address);
        let shared = Arc::new(Shared {
            slots: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            log_limit: LogLimit::new(Duration::from_secs(60), 5),
        });
        let accepting = shared.clone();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || accept_until_stopped(&accepting, &listener, &handler))
            .context("starting the admin thread")?;
        Ok(HttpServer { shared, address, thread: Some(thread) })
    }

    /// The address bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for slot in self.shared.slots().iter() {
            let _ = slot.stream.shutdown(Shutdown::Read);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_until_stopped(shared: &Arc<Shared>, listener: &TcpListener, handler: &Handler) {
    while !shared.stop.load(Ordering::Relaxed) {
        report_suppressed(shared);
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
            Err(error) => {
                if shared.log_limit.allow("accept failed", Instant::now()) {
                    tracing::warn!(%error, "admin endpoint: accept failed: {error}");
                }
                std::thread::sleep(POLL_INTERVAL);
                continue;
            }
        };
        admit(shared, stream, peer, handler);
    }
}

/// Log how many lines of each kind were held back in the interval that ended.
fn report_suppressed(shared: &Shared) {
    for (kind, count) in shared.log_limit.take_suppressed(Instant::now()) {
        tracing::warn!("admin endpoint: suppressed {count} similar messages: {kind}");
    }
}

/// Give `stream` a slot and a thread, or answer 503 when every slot runs a
/// handler.
fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, handler: &Handler) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let registered = stream.try_clone().map(|clone| {
        let mut slots = shared.slots();
        if !shared.make_room(&mut slots) {
            return false;
        }
        slots.push(Slot { id, stream: clone, accepted: Instant::now(), reading: true });
        true
    });
    match registered {
        Ok(true) => {}
        Ok(false) => {
            if shared.log_limit.allow("admin connections full", Instant::now()) {
                tracing::warn!(%peer, "admin endpoint: {CONNECTIONS_MAX} requests are running; answering {peer} 503");
            }
            let mut stream = stream;
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(POLL_INTERVAL));
            answer(&mut stream, 503, &refusal("too many admin requests at once; try again shortly"));
            return;
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "admin endpoint: cannot use the connection from {peer}: {error}");
            return;
        }
    }
    let connection_shared = shared.clone();
    let handler = handler.clone();
    let spawned = std::thread::Builder::new().name("admin-request".into()).spawn(move || {
        serve_connection(&connection_shared, id, stream, &handler);
        connection_shared.remove(id);
    });
    if let Err(error) = spawned {
        shared.remove(id);
        tracing::error!(%peer, %error, "admin endpoint: cannot start a thread for {peer}: {error}");
    }
}

/// Read one request within the limits, answer it, close.
fn serve_connection(shared: &Shared, id: u64, mut stream: TcpStream, handler: &Handler) {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    if stream.set_nonblocking(false).and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT))).is_err() {
        return;
    }
    let (code, body) = match read_request(&mut stream, deadline) {
        Ok(request) => {
            shared.finish_reading(id);
            handler(&request)
        }
        Err(Refusal::Closed) => return,
        Err(Refusal::Answer(code, message)) => {
            let kind = refusal_kind(code);
            if shared.log_limit.allow(kind, Instant::now()) {
                let peer = stream.peer_addr().map(|peer| peer.to_string()).unwrap_or_default();
                tracing::warn!(peer, code, "admin endpoint: refused a request from {peer}: {message}");
            }
            (code, refusal(&message))
        }
    };
    answer(&mut stream, code, &body);
    linger(&mut stream);
}

/// What one log line kind says, so repeats of it are counted together.
fn refusal_kind(code: u16) -> &'static str {
    match code {
        400 => "malformed request",
        408 => "request not sent in time",
        413 => "request body over the limit",
        431 => "request head over the limit",
        _ => "request refused",
    }
}

fn refusal(message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

/// Why no request came out of a connection.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// The client closed (or was evicted) before sending a whole request:
    /// nothing to answer.
    Closed,
    /// Answer this status code and message, then close.
    Answer(u16, String),
}

/// Read a request head (and drop its body) before `deadline`.
fn read_request(stream: &mut TcpStream, deadline: Instant) -> Result<Request, Refusal> {
    let mut head = vec![0u8; HEAD_BYTES_MAX];
    let mut filled = 0;
    loop {
        if filled == head.len() {
            return Err(Refusal::Answer(431, format!("request head over {HEAD_BYTES_MAX} bytes")));
        }
        filled += read_before(stream, &mut head[filled..], deadline)?;
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&head[..filled]) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(head_len)) => {
                let body_len = body_length(parsed.headers)?;
                let request = to_request(&parsed)?;
                drop_body(stream, &head[head_len..filled], body_len, deadline)?;
                return Ok(request);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal::Answer(431, format!("more than {HEADERS_MAX} headers")));
            }
            Err(error) => return Err(Refusal::Answer(400, format!("malformed request: {error}"))),
        }
    }
}

/// Read what is there (at least one byte) before `deadline`.
fn read_before(stream: &mut TcpStream, buffer: &mut [u8], deadline: Instant) -> Result<usize, Refusal> {
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Refusal::Answer(
                408,
                format!("the request was not complete within {} s", REQUEST_TIMEOUT.as_secs()),
            ));
        }
        stream.set_read_timeout(Some(remaining)).map_err(|_| Refusal::Closed)?;
        match stream.read(buffer) {
            Ok(0) => return Err(Refusal::Closed),
            Ok(count) => return Ok(count),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return Err(Refusal::Closed),
        }
    }
}

/// The body length the headers announce, within BODY_BYTES_MAX.
fn body_length(headers: &[httparse::Header<'_>]) -> Result<u64, Refusal> {
    let mut length: Option<u64> = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Refusal::Answer(501, "Transfer-Encoding is not supported; send Content-Length".into()));
        }
        if !header.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let value = std::str::from_utf8(header.value).ok().and_then(|text| text.trim().parse::<u64>().ok());
        let Some(value) = value else {
            return Err(Refusal::Answer(400, "Content-Length is not a number".into()));
        };
        if length.is_some_and(|earlier| earlier != value) {
            return Err(Refusal::Answer(400, "two different Content-Length headers".into()));
        }
        length = Some(value);
    }
    let length = length.unwrap_or(0);
    if length > BODY_BYTES_MAX {
        return Err(Refusal::Answer(
            413,
            format!("request body of {length} bytes; the admin endpoint takes at most {BODY_BYTES_MAX}"),
        ));
    }
    Ok(length)
}

fn to_request(parsed: &httparse::Request<'_, '_>) -> Result<Request, Refusal> {
    let (Some(method), Some(target)) = (parsed.method, parsed.path) else {
        return Err(Refusal::Answer(400, "incomplete request line".into()));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request { method: method.to_string(), path: path.to_string(), query: query.to_string() })
}

/// Read and drop a body of `length` bytes, of which `already` came with the head.
fn drop_body(stream: &mut TcpStream, already: &[u8], length: u64, deadline: Instant) -> Result<(), Refusal> {
    let mut remaining = length.saturating_sub(already.len() as u64);
    let mut sink = [0u8; 1024];
    while remaining > 0 {
        let want = remaining.min(sink.len() as u64) as usize;
        remaining -= read_before(stream, &mut sink[..want], deadline)? as u64;
    }
    Ok(())
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Send the answer, best effort: a client that went away loses it.
fn answer(stream: &mut TcpStream, code: u16, body: &serde_json::Value) {
    let body = format!("{body}\n");
    let message = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    );
    if let Err(error) = stream.write_all(message.as_bytes()) {
        tracing::debug!(%error, "admin client went away before its answer");
    }
}

/// Close the sending side and drain, briefly and boundedly, what the client
/// still sends, so the close does not reset the connection before the
/// client reads the answer.
fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut drained = 0;
    let mut sink = [0u8; 4096];
    while drained < LINGER_BYTES_MAX {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() || stream.set_read_timeout(Some(remaining)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(count) => drained += count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn length_of(headers: &[(&str, &str)]) -> Result<u64, Refusal> {
        let headers: Vec<httparse::Header<'_>> =
            headers.iter().map(|(name, value)| httparse::Header { name, value: value.as_bytes() }).collect();
        body_length(&headers)
    }

    #[test]
    fn content_length_is_bounded() {
        assert_eq!(length_of(&[]), Ok(0));
        assert_eq!(length_of(&[("Content-Length", "10")]), Ok(10));
        assert_eq!(length_of(&[("content-length", "10"), ("Content-Length", "10")]), Ok(10));
        assert!(matches!(length_of(&[("Content-Length", "100000000000")]), Err(Refusal::Answer(413, _))));
        assert!(matches!(length_of(&[("Content-Length", "99999999999999999999999")]), Err(Refusal::Answer(400, _))));
        assert!(matches!(length_of(&[("Content-Length", "1"), ("Content-Length", "2")]), Err(Refusal::Answer(400, _))));
        assert!(matches!(length_of(&[("Transfer-Encoding", "chunked")]), Err(Refusal::Answer(501, _))));
    }
}
