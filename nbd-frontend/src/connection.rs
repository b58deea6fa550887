//! Transmission: one connection, one thread, one io_uring.
//!
//! Socket receives, file I/O and socket sends all go through the
//! connection's ring, so a connection does not block on one of them while
//! another is ready; on a mirrored volume it does wait while a batch's marks
//! are made durable (one activity-log transaction, which its next batch
//! grows meanwhile). The loop:
//!
//! ```text
//!   recv completes ─▶ parse headers (request.rs) ─▶ validate ─▶ submit file op
//!   file op completes ─▶ queue reply ─▶ one SENDMSG carries a batch of replies
//! ```
//!
//! Every change (write, trim, zeroes, flush) goes through the volume's
//! [`ChangeSeam`] (`engine::seam`): begun before its local I/O, completed or
//! failed after it, answered when the seam says so. This file knows nothing
//! of copies or the write-intent bitmap.
//!
//! Every buffer the kernel touches is owned by the [`Op`] in the ring's
//! in-flight table. Replies go out in completion order (the protocol allows
//! any order). On a direct volume, write-like requests hold a range lock on
//! their aligned span; one that conflicts is parked and retried.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::alignment::Span;
use engine::gate::GateRefused;
use engine::range_lock::RangeLockId;
use engine::seam::{ChangeExtent, ChangeKind, ChangeSeam, Changes, Refused};
use engine::volume::ZeroMethod;
use engine::{AlignedBuf, Lent, Ring, SharedPool, Volume};
use io_uring::{opcode, types};

use crate::handshake::Negotiated;
use crate::protocol::*;
use crate::reply::{self, ReplyHeader};
use crate::request::{self, Command, Limits, RequestHeader};

/// Requests accepted but not yet answered, per connection; over it the
/// connection stops reading until replies drain.
pub const OUTSTANDING_MAX: usize = 256;
/// Reply bytes queued but not yet sent before the connection stops reading.
pub const QUEUED_REPLY_BYTES_MAX: usize = 64 << 20;
/// Bytes of data buffers a connection may have in use (reads in flight,
/// writes received, replies unsent); over it the connection stops reading.
pub const BUFFER_BYTES_MAX: usize = 128 << 20;
/// Largest refused WRITE payload read off the socket and thrown away; a
/// longer one ends the connection (the stream cannot be trusted).
pub const DISCARD_BYTES_MAX: u64 = 64 << 20;
/// Extents in one BLOCK_STATUS reply.
pub const EXTENTS_MAX: usize = 1024;
const RECEIVE_BUFFER_BYTES: usize = 256 << 10;
const RING_ENTRIES: u32 = 256;
const SEND_BATCH_REPLIES_MAX: usize = 64;
const POOL_HELD_BYTES_MAX: usize = 16 << 20;

/// Counters a connection reports when it ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionStats {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

/// What was wrong with the stream when a connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The client disconnected (DISC or end of stream).
    Client,
    /// The server is shutting down.
    Shutdown,
    /// The client broke the protocol; the message says how.
    Protocol(String),
    /// The socket or the ring failed.
    Io(String),
}

/// Run transmission on `socket` until the client leaves, the server shuts
/// down, or the stream is lost.
pub fn serve(
    socket: std::net::TcpStream,
    volume: Arc<Volume>,
    negotiated: Negotiated,
    shutdown: Arc<AtomicBool>,
    changes: &Changes,
) -> Result<(Ending, ConnectionStats), engine::EngineError> {
    let ring = Ring::new(RING_ENTRIES)?;
    let seam =
        changes.seam().map_err(|source| engine::EngineError::Io { action: "create the completion eventfd", source })?;
    let limits = Limits {
        size: volume.size(),
        read_only: volume.is_read_only(),
        structured: negotiated.structured,
        block_status: negotiated.base_allocation.is_some(),
    };
    let mut connection = Connection {
        fd: socket.as_raw_fd(),
        ring,
        volume,
        negotiated,
        limits,
        shutdown,
        receive: Some(vec![0u8; RECEIVE_BUFFER_BYTES]),
        receive_start: 0,
        receive_end: 0,
        receive_token: None,
        payload: None,
        discard_left: 0,
        discard_reply: None,
        stream_lost: false,
        replies: VecDeque::new(),
        queued_reply_bytes: 0,
        sending: false,
        parked: VecDeque::new(),
        begun: Vec::new(),
        outstanding: 0,
        pool: Arc::new(SharedPool::new(POOL_HELD_BYTES_MAX)),
        state: State::Open,
        stats: ConnectionStats::default(),
        recycled: Vec::new(),
        seam,
        wake_token: None,
        gate_refusal_logged: false,
    };
    let ending = connection.run();
    drop(connection);
    drop(socket);
    Ok(ending)
}

enum Op {
    Receive {
        buf: Vec<u8>,
    },
    ReceivePayload {
        incoming: Incoming,
    },
    Send {
        batch: Box<SendBatch>,
    },
    Read {
        cookie: u64,
        offset: u64,
        buf: AlignedBuf,
        span: Span,
        done: u64,
    },
    Write {
        cookie: u64,
        buf: AlignedBuf,
        span: Span,
        fua: bool,
        lock: Option<RangeLockId>,
        done: u64,
    },
    /// Makes `change` durable: a flush, or the sync after a FUA change.
    Fsync {
        cookie: u64,
        lock: Option<RangeLockId>,
        change: ChangeExtent,
    },
    /// A change done synchronously (a fallback), its result carried through
    /// the ring so it completes like every other local part.
    Done {
        cookie: u64,
        lock: Option<RangeLockId>,
        change: ChangeExtent,
        result: i32,
    },
    Fallocate {
        work: LockedWork,
        lock: Option<RangeLockId>,
    },
    /// Reads the seam's eventfd (answers from the copies are ready).
    Wake {
        _buf: Box<u64>,
    },
    Cancel,
}

/// The change a WRITE of the client's bytes in `span` makes.
fn write_change(span: &Span, fua: bool) -> ChangeExtent {
    ChangeExtent { kind: ChangeKind::Write, offset: span.file_offset + span.head, length: span.len, fua }
}

/// The NBD command a change answers.
fn command_of(change: &ChangeExtent) -> u16 {
    match change.kind {
        ChangeKind::Write => CMD_WRITE,
        ChangeKind::Trim => CMD_TRIM,
        ChangeKind::WriteZeroes => CMD_WRITE_ZEROES,
        ChangeKind::Flush => CMD_FLUSH,
    }
}

/// A WRITE whose payload is still arriving.
struct Incoming {
    header: RequestHeader,
    fua: bool,
    buf: AlignedBuf,
    span: Span,
    received: usize,
}

impl Incoming {
    fn missing(&self) -> usize {
        self.span.len as usize - self.received
    }
}

/// A write-like request that needs the range lock on a direct volume.
enum LockedWork {
    Write { cookie: u64, buf: AlignedBuf, span: Span, fua: bool },
    Trim { cookie: u64, offset: u64, len: u64, fua: bool },
    Zero { cookie: u64, offset: u64, len: u64, fua: bool, may_punch: bool, fast_only: bool },
}

impl LockedWork {
    fn range(&self, volume: &Volume) -> (u64, u64) {
        let span = match self {
            LockedWork::Write { span, .. } => *span,
            LockedWork::Trim { offset, len, .. } | LockedWork::Zero { offset, len, .. } => volume.span(*offset, *len),
        };
        (span.file_offset, span.file_offset + span.file_len)
    }

    /// The change this work makes.
    fn change(&self) -> ChangeExtent {
        match *self {
            LockedWork::Write { span, fua, .. } => write_change(&span, fua),
            LockedWork::Trim { offset, len, fua, .. } => {
                ChangeExtent { kind: ChangeKind::Trim, offset, length: len, fua }
            }
            LockedWork::Zero { offset, len, fua, .. } => {
                ChangeExtent { kind: ChangeKind::WriteZeroes, offset, length: len, fua }
            }
        }
    }

    fn cookie(&self) -> u64 {
        match self {
            LockedWork::Write { cookie, .. } | LockedWork::Trim { cookie, .. } | LockedWork::Zero { cookie, .. } => {
                *cookie
            }
        }
    }
}

enum Reply {
    Header(ReplyHeader),
    Bytes(Vec<u8>),
    Data { header: ReplyHeader, buf: AlignedBuf, start: usize, len: usize },
}

impl Reply {
    fn len(&self) -> usize {
        match self {
            Reply::Header(header) => header.as_bytes().len(),
            Reply::Bytes(bytes) => bytes.len(),
            Reply::Data { header, len, .. } => header.as_bytes().len() + len,
        }
    }
}

/// Replies in one SENDMSG. Boxed so `msghdr` and `iovecs` keep their
/// addresses while the kernel reads them.
struct SendBatch {
    replies: Vec<Reply>,
    iovecs: Vec<libc::iovec>,
    first: usize,
    msghdr: libc::msghdr,
}

impl SendBatch {
    fn new(replies: Vec<Reply>) -> Box<SendBatch> {
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let msghdr: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut batch = Box::new(SendBatch { replies, iovecs: Vec::new(), first: 0, msghdr });
        let mut iovecs = Vec::with_capacity(batch.replies.len() * 2);
        for reply in &batch.replies {
            let mut push =
                |bytes: &[u8]| iovecs.push(libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() });
            match reply {
                Reply::Header(header) => push(header.as_bytes()),
                Reply::Bytes(bytes) => push(bytes),
                Reply::Data { header, buf, start, len } => {
                    push(header.as_bytes());
                    push(&buf.as_slice()[*start..start + len]);
                }
            }
        }
        batch.iovecs = iovecs;
        batch.point_msghdr();
        batch
    }

    fn point_msghdr(&mut self) {
        // The iovecs point into `replies`, whose heap storage does not move
        // while the batch is alive, and the batch is never mutated in ways
        // that reallocate it.
        self.msghdr.msg_iov = self.iovecs[self.first..].as_mut_ptr();
        self.msghdr.msg_iovlen = self.iovecs.len() - self.first;
    }

    /// Account for `sent` bytes; true when everything is sent.
    fn advance(&mut self, mut sent: usize) -> bool {
        while sent > 0 && self.first < self.iovecs.len() {
            let iovec = &mut self.iovecs[self.first];
            if sent >= iovec.iov_len {
                sent -= iovec.iov_len;
                self.first += 1;
            } else {
                // SAFETY: sent < iov_len, so the new base stays inside the
                // same buffer.
                iovec.iov_base = unsafe { (iovec.iov_base as *mut u8).add(sent) } as *mut _;
                iovec.iov_len -= sent;
                sent = 0;
            }
        }
        while self.first < self.iovecs.len() && self.iovecs[self.first].iov_len == 0 {
            self.first += 1;
        }
        if self.first == self.iovecs.len() {
            return true;
        }
        self.point_msghdr();
        false
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// No more requests are read; outstanding ones finish, then close.
    Draining(Ending),
    /// The socket is unusable: wait for the ring to empty, then close.
    Failed(Ending),
}

/// Changes begun together (their ranges locked, their marks made durable
/// by one commit), each with its range lock.
type Batch = Vec<(LockedWork, Option<RangeLockId>)>;

struct Connection {
    fd: RawFd,
    ring: Ring<Op>,
    volume: Arc<Volume>,
    negotiated: Negotiated,
    limits: Limits,
    shutdown: Arc<AtomicBool>,
    receive: Option<Vec<u8>>,
    receive_start: usize,
    receive_end: usize,
    receive_token: Option<u64>,
    payload: Option<Incoming>,
    discard_left: u64,
    /// The error answer of a refused WRITE, sent once its payload has been
    /// read off the socket: libnbd matches a reply to a write only after it
    /// has sent the whole payload, so an earlier reply would break it.
    discard_reply: Option<(u64, u32)>,
    /// The byte stream can no longer be parsed (a partial request was
    /// abandoned while draining).
    stream_lost: bool,
    replies: VecDeque<Reply>,
    queued_reply_bytes: usize,
    sending: bool,
    parked: VecDeque<LockedWork>,
    /// Changes begun on a mirrored volume whose marks are not yet durable:
    /// issued together after one commit (see [`Connection::issue_begun`]).
    begun: Batch,
    outstanding: usize,
    pool: Arc<SharedPool>,
    state: State,
    stats: ConnectionStats,
    recycled: Vec<(Op, i32)>,
    /// Where every change goes once its local part is done; answers
    /// (cookie, command) once the copies have it.
    seam: ChangeSeam<(u64, u16)>,
    /// The eventfd read in flight, if any.
    wake_token: Option<u64>,
    /// Whether a refusal at the volume's gate was logged on this connection.
    gate_refusal_logged: bool,
}

impl Connection {
    fn run(&mut self) -> (Ending, ConnectionStats) {
        let mut completions = std::mem::take(&mut self.recycled);
        loop {
            if self.state == State::Open && self.shutdown.load(Ordering::Relaxed) {
                self.state = State::Draining(Ending::Shutdown);
            }
            self.retry_parked();
            self.issue_begun();
            self.start_receive();
            self.start_send();
            if self.seam.has_waiting() {
                self.arm_wake();
            }
            if let Some(ending) = self.finished() {
                return (ending, self.stats);
            }
            if self.ring.in_flight() == 0 {
                // Only parked work is left, waiting on another connection's
                // range lock: there is no completion to wait for.
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let timeout = if self.parked.is_empty() { Duration::from_millis(200) } else { Duration::from_millis(1) };
            if let Err(error) = self.ring.submit_and_wait(1, Some(timeout)) {
                self.fail(Ending::Io(format!("io_uring_enter: {error}")));
            }
            self.ring.reap(&mut completions);
            for (op, result) in completions.drain(..) {
                self.complete(op, result);
            }
        }
    }

    /// The reason to stop, once nothing is left to do.
    fn finished(&mut self) -> Option<Ending> {
        match &self.state {
            State::Open => None,
            State::Failed(ending) => {
                let ending = ending.clone();
                if !self.seam.has_waiting() {
                    self.cancel_wake();
                }
                (self.ring.in_flight() == 0).then_some(ending)
            }
            State::Draining(ending) => {
                let ending = ending.clone();
                self.abandon_partial_request();
                let idle = self.outstanding == 0 && self.replies.is_empty() && !self.sending && self.parked.is_empty();
                if !idle {
                    return None;
                }
                if let Some(token) = self.receive_token.take() {
                    if let Err((_, error)) = self.ring.cancel(token, Op::Cancel) {
                        tracing::warn!(?error, "could not cancel the pending receive");
                    }
                }
                self.cancel_wake();
                (self.ring.in_flight() == 0).then_some(ending)
            }
        }
    }

    /// While draining no more bytes are read, so a request whose payload is
    /// still on the way is dropped, and nothing after it can be parsed.
    fn abandon_partial_request(&mut self) {
        if let Some(incoming) = self.payload.take() {
            self.pool.give(incoming.buf);
            self.stream_lost = true;
        }
        if self.discard_reply.take().is_some() {
            self.outstanding -= 1;
            self.stream_lost = true;
        }
        if self.discard_left > 0 {
            self.discard_left = 0;
            self.stream_lost = true;
        }
    }

    fn fail(&mut self, ending: Ending) {
        if !matches!(self.state, State::Failed(_)) {
            self.state = State::Failed(ending);
            for reply in std::mem::take(&mut self.replies) {
                if let Reply::Data { buf, .. } = reply {
                    self.pool.give(buf);
                }
            }
            self.queued_reply_bytes = 0;
            for work in std::mem::take(&mut self.parked) {
                if let LockedWork::Write { buf, .. } = work {
                    self.pool.give(buf);
                }
                self.outstanding -= 1;
            }
            self.abandon_partial_request();
            if let Some(token) = self.receive_token.take() {
                let _ = self.ring.cancel(token, Op::Cancel);
            }
        }
    }

    fn start_receive(&mut self) {
        let room = self.outstanding < OUTSTANDING_MAX
            && self.queued_reply_bytes < QUEUED_REPLY_BYTES_MAX
            && self.pool.lent_bytes() < BUFFER_BYTES_MAX;
        if self.state != State::Open || self.receive_token.is_some() || !room || !self.ring.has_room() {
            return;
        }
        if let Some(mut incoming) = self.payload.take() {
            let start = incoming.span.head as usize + incoming.received;
            let missing = incoming.missing();
            // SAFETY (for the pointer): start + missing <= head + len <= buffer length.
            let pointer = incoming.buf.as_mut_slice()[start..start + missing].as_mut_ptr();
            let entry = opcode::Recv::new(types::Fd(self.fd), pointer, missing as u32).build();
            // SAFETY: the entry points into `incoming.buf`, heap memory owned
            // by the op that is stored in the in-flight table until reaped.
            match unsafe { self.ring.push(entry, Op::ReceivePayload { incoming }) } {
                Ok(token) => self.receive_token = Some(token),
                Err((Op::ReceivePayload { incoming }, _)) => self.payload = Some(incoming),
                Err(_) => unreachable!("push returns the op it was given"),
            }
            return;
        }
        let Some(mut buf) = self.receive.take() else { return };
        if self.receive_start == self.receive_end {
            self.receive_start = 0;
            self.receive_end = 0;
        } else if buf.len() - self.receive_end < 4096 {
            buf.copy_within(self.receive_start..self.receive_end, 0);
            self.receive_end -= self.receive_start;
            self.receive_start = 0;
        }
        let free = &mut buf[self.receive_end..];
        let entry = opcode::Recv::new(types::Fd(self.fd), free.as_mut_ptr(), free.len() as u32).build();
        // SAFETY: the entry points into `buf`'s heap storage; `buf` moves
        // into the op (its heap storage does not move) and stays in the
        // in-flight table until reaped.
        match unsafe { self.ring.push(entry, Op::Receive { buf }) } {
            Ok(token) => self.receive_token = Some(token),
            Err((Op::Receive { buf }, _)) => self.receive = Some(buf),
            Err(_) => unreachable!("push returns the op it was given"),
        }
    }

    fn start_send(&mut self) {
        if self.sending || self.replies.is_empty() || matches!(self.state, State::Failed(_)) || !self.ring.has_room() {
            return;
        }
        let count = self.replies.len().min(SEND_BATCH_REPLIES_MAX);
        let replies: Vec<Reply> = self.replies.drain(..count).collect();
        let batch = SendBatch::new(replies);
        self.push_send(batch);
    }

    fn push_send(&mut self, batch: Box<SendBatch>) {
        let entry = opcode::SendMsg::new(types::Fd(self.fd), &batch.msghdr).flags(libc::MSG_NOSIGNAL as u32).build();
        // SAFETY: the msghdr, its iovecs and every buffer they point to are
        // owned by the boxed batch, which the op keeps until reaped.
        match unsafe { self.ring.push(entry, Op::Send { batch }) } {
            Ok(_) => self.sending = true,
            Err((Op::Send { batch }, _)) => {
                // Put the replies back in front; they are sent next time.
                for reply in batch.replies.into_iter().rev() {
                    self.replies.push_front(reply);
                }
            }
            Err(_) => unreachable!("push returns the op it was given"),
        }
    }

    fn complete(&mut self, op: Op, result: i32) {
        match op {
            Op::Receive { buf } => self.received(buf, result),
            Op::ReceivePayload { incoming } => self.received_payload(incoming, result),
            Op::Send { batch } => self.sent(batch, result),
            Op::Read { cookie, offset, buf, span, done } => self.read_done(cookie, offset, buf, span, done, result),
            Op::Write { cookie, buf, span, fua, lock, done } => {
                self.write_done(cookie, buf, span, fua, lock, done, result)
            }
            Op::Fsync { cookie, lock, change } => {
                if result < 0 {
                    // The sync failed: writes already answered may be lost.
                    self.seam.failed(&change, -result, true);
                    self.unlock(lock);
                    self.reply_status(cookie, command_of(&change), result);
                } else {
                    self.ship(cookie, change, lock, None);
                }
            }
            Op::Done { cookie, lock, change, result } => self.local_part_done(cookie, change, lock, result),
            Op::Fallocate { work, lock } => self.fallocate_done(work, lock, result),
            Op::Wake { .. } => self.woken(result),
            Op::Cancel => {}
        }
    }

    fn received(&mut self, buf: Vec<u8>, result: i32) {
        self.receive_token = None;
        self.receive = Some(buf);
        if result <= 0 {
            self.receive_ended(result);
            return;
        }
        self.receive_end += result as usize;
        self.parse();
    }

    fn received_payload(&mut self, mut incoming: Incoming, result: i32) {
        self.receive_token = None;
        if result <= 0 {
            self.pool.give(incoming.buf);
            self.receive_ended(result);
            return;
        }
        incoming.received += result as usize;
        if incoming.missing() > 0 {
            self.payload = Some(incoming);
            return;
        }
        self.outstanding += 1;
        self.write_received(incoming);
    }

    fn receive_ended(&mut self, result: i32) {
        if result == -libc::ECANCELED || self.state != State::Open {
            return;
        }
        let ending = if result == 0 || result == -libc::ECONNRESET {
            Ending::Client
        } else {
            Ending::Io(format!("receive: {}", std::io::Error::from_raw_os_error(-result)))
        };
        self.state = State::Draining(ending);
    }

    /// Take every complete request out of the receive buffer. While the
    /// server shuts down, requests already received are still parsed so
    /// that each gets its ESHUTDOWN answer.
    fn parse(&mut self) {
        while !self.stream_lost && matches!(self.state, State::Open | State::Draining(Ending::Shutdown)) {
            let buf = self.receive.as_ref().expect("receive buffer is home while parsing");
            let available = self.receive_end - self.receive_start;
            if self.discard_left > 0 {
                let skipped = (available as u64).min(self.discard_left);
                self.receive_start += skipped as usize;
                self.discard_left -= skipped;
                if self.discard_left > 0 {
                    return;
                }
                if let Some((cookie, error)) = self.discard_reply.take() {
                    self.reply_error(cookie, CMD_WRITE, error);
                }
                continue;
            }
            if available < REQUEST_HEADER_LEN {
                return;
            }
            let bytes: &[u8; REQUEST_HEADER_LEN] =
                buf[self.receive_start..self.receive_start + REQUEST_HEADER_LEN].try_into().expect("header length");
            let Some(header) = request::parse_header(bytes) else {
                let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
                self.fail(Ending::Protocol(format!("bad request magic {magic:#010x}")));
                return;
            };
            self.receive_start += REQUEST_HEADER_LEN;
            self.request(header);
        }
    }

    fn request(&mut self, header: RequestHeader) {
        let mut outcome = request::validate(&header, &self.limits);
        if self.state != State::Open || self.shutdown.load(Ordering::Relaxed) {
            outcome = Err(ESHUTDOWN);
        }
        if header.command == CMD_DISC {
            // DISC never gets a reply, whatever its flags.
            if self.state == State::Open {
                self.state = State::Draining(Ending::Client);
            }
            return;
        }
        self.outstanding += 1;
        match outcome {
            Ok(Command::Write { fua }) => self.write_arriving(header, fua),
            Ok(command) => self.execute(header, command),
            Err(error) => {
                let payload = header.payload_len() as u64;
                if payload > DISCARD_BYTES_MAX {
                    self.fail(Ending::Protocol(format!(
                        "write of {payload} bytes over the {DISCARD_BYTES_MAX}-byte limit"
                    )));
                    return;
                }
                if payload > 0 {
                    self.discard_left = payload;
                    self.discard_reply = Some((header.cookie, error));
                } else {
                    self.reply_error(header.cookie, header.command, error);
                }
            }
        }
    }

    /// Start collecting a WRITE's payload, from the receive buffer first.
    fn write_arriving(&mut self, header: RequestHeader, fua: bool) {
        let span = self.volume.span(header.offset, header.length as u64);
        let mut buf = self.pool.take(span.file_len as usize);
        let buffered = self.receive.as_ref().expect("receive buffer is home while parsing");
        let available = (self.receive_end - self.receive_start).min(header.length as usize);
        let head = span.head as usize;
        buf.as_mut_slice()[head..head + available]
            .copy_from_slice(&buffered[self.receive_start..self.receive_start + available]);
        self.receive_start += available;
        let incoming = Incoming { header, fua, buf, span, received: available };
        if incoming.missing() > 0 {
            // The rest arrives straight into the buffer; the request is
            // counted again when it is complete.
            self.outstanding -= 1;
            self.payload = Some(incoming);
            debug_assert_eq!(self.receive_start, self.receive_end, "the receive buffer is drained up to the payload");
            return;
        }
        self.write_received(incoming);
    }

    fn write_received(&mut self, incoming: Incoming) {
        let Incoming { header, fua, buf, span, .. } = incoming;
        if self.shutdown.load(Ordering::Relaxed) {
            self.pool.give(buf);
            self.reply_error(header.cookie, CMD_WRITE, ESHUTDOWN);
            return;
        }
        if let Err(error) = self.seam.admit() {
            self.pool.give(buf);
            self.refused_at_gate(header.cookie, CMD_WRITE, &error);
            return;
        }
        self.locked(LockedWork::Write { cookie: header.cookie, buf, span, fua });
    }

    /// A request the volume's gate refused (no quorum, or no longer served
    /// here): EIO, logged once per connection.
    fn refused_at_gate(&mut self, cookie: u64, command: u16, error: &GateRefused) {
        if !self.gate_refusal_logged {
            tracing::warn!(%error, "answering EIO: {error}");
            self.gate_refusal_logged = true;
        }
        self.reply_error(cookie, command, EIO);
    }

    fn execute(&mut self, header: RequestHeader, command: Command) {
        let cookie = header.cookie;
        if let Err(error) = self.seam.admit() {
            self.refused_at_gate(cookie, header.command, &error);
            return;
        }
        let (offset, len) = (header.offset, header.length as u64);
        match command {
            // A store that failed a flush may lack acknowledged writes: it
            // cannot answer a read truthfully any more (nor a flush: `begin`).
            Command::Read if self.seam.check_store().is_err() => self.reply_error(cookie, CMD_READ, EIO),
            Command::Read => {
                let span = self.volume.span(offset, len);
                let buf = self.pool.take(span.file_len as usize);
                self.push_read(cookie, offset, buf, span, 0);
            }
            Command::Flush => match self.seam.begin(&ChangeExtent::flush()) {
                Ok(()) => self.push_fsync_then_ship(cookie, None, ChangeExtent::flush()),
                Err(_) => self.reply_error(cookie, CMD_FLUSH, EIO),
            },
            Command::Trim { fua } => self.locked(LockedWork::Trim { cookie, offset, len, fua }),
            Command::WriteZeroes { fua, may_punch, fast_only } => {
                self.locked(LockedWork::Zero { cookie, offset, len, fua, may_punch, fast_only })
            }
            Command::Cache => {
                let result =
                    self.volume.prefetch(offset, len).err().and_then(|error| error.raw_os_error()).map_or(0, |e| -e);
                self.reply_status(cookie, CMD_CACHE, result);
            }
            Command::BlockStatus { req_one } => {
                let extents_max = if req_one { 1 } else { EXTENTS_MAX };
                match self.volume.block_status(offset, header.length, extents_max) {
                    Ok(extents) => {
                        let context = self.negotiated.base_allocation.expect("validated: context selected");
                        self.queue_reply(Reply::Bytes(reply::block_status_chunk(cookie, context, &extents)), false);
                    }
                    Err(error) => {
                        let errno = errno_to_nbd(error.raw_os_error().unwrap_or(libc::EIO));
                        self.reply_error(cookie, CMD_BLOCK_STATUS, errno);
                    }
                }
            }
            Command::Write { .. } | Command::Disconnect => unreachable!("handled by the caller"),
        }
    }

    fn push_read(&mut self, cookie: u64, offset: u64, mut buf: AlignedBuf, span: Span, done: u64) {
        let pointer = buf.as_mut_slice()[done as usize..].as_mut_ptr();
        let entry = self.volume.read_entry(pointer, (span.file_len - done) as u32, span.file_offset + done);
        // SAFETY: the entry points into `buf`, heap memory owned by the op
        // until it is reaped.
        if let Err((op, _)) = unsafe { self.ring.push(entry, Op::Read { cookie, offset, buf, span, done }) } {
            self.refused(op);
        }
    }

    fn read_done(&mut self, cookie: u64, offset: u64, buf: AlignedBuf, span: Span, done: u64, result: i32) {
        if result < 0 || (result == 0 && done < span.file_len) {
            self.pool.give(buf);
            let errno = if result < 0 { errno_to_nbd(-result) } else { EIO };
            self.reply_error(cookie, CMD_READ, errno);
            return;
        }
        let done = done + result as u64;
        if done < span.file_len {
            self.push_read(cookie, offset, buf, span, done);
            return;
        }
        let (start, len) = (span.head as usize, span.len as usize);
        let header = if self.negotiated.structured {
            ReplyHeader::offset_data(cookie, offset, len as u32)
        } else {
            ReplyHeader::simple(0, cookie)
        };
        self.queue_reply(Reply::Data { header, buf, start, len }, false);
    }

    /// Run write-like work now, or park it if its range is busy.
    fn locked(&mut self, work: LockedWork) {
        // Mirrored volumes serialise overlapping changes too, so every copy
        // applies them in the order the local store did.
        if !self.volume.is_direct() && !self.seam.is_mirrored() {
            self.start_locked(work, None);
            return;
        }
        let (start, end) = work.range(&self.volume);
        match self.volume.locks().try_lock(start, end) {
            Some(lock) => self.start_locked(work, Some(lock)),
            None => self.parked.push_back(work),
        }
    }

    fn retry_parked(&mut self) {
        for _ in 0..self.parked.len() {
            let Some(work) = self.parked.pop_front() else { break };
            let (start, end) = work.range(&self.volume);
            match self.volume.locks().try_lock(start, end) {
                Some(lock) => self.start_locked(work, Some(lock)),
                None => self.parked.push_back(work),
            }
        }
    }

    /// Begin a change whose range is locked. On a mirrored volume its marks
    /// are made durable with every other change begun since the loop last
    /// came round (every request parsed from what was received, every
    /// parked one that got its lock): one activity-log transaction or
    /// bitmap sync for the batch, in [`Connection::issue_begun`], before
    /// any of them is issued.
    fn start_locked(&mut self, work: LockedWork, lock: Option<RangeLockId>) {
        if let Err(error) = self.seam.begin_batched(&work.change()) {
            self.refuse_begun(work, lock, &error);
            return;
        }
        if self.seam.is_mirrored() {
            self.begun.push((work, lock));
        } else {
            self.issue_locked(work, lock);
        }
    }

    /// Make the marks of every change begun since the last call durable at
    /// once, then issue their local parts; when that fails, answer each EIO.
    fn issue_begun(&mut self) {
        if self.begun.is_empty() {
            return;
        }
        let begun = std::mem::take(&mut self.begun);
        match self.seam.commit_batch() {
            Ok(()) => {
                for (work, lock) in begun {
                    self.issue_locked(work, lock);
                }
            }
            Err(error) => self.refuse_batch(begun, &error),
        }
    }

    /// A batch whose marks could not be made durable: none of it is issued.
    fn refuse_batch(&mut self, batch: Batch, error: &Refused) {
        for (work, lock) in batch {
            self.seam.abandon(&work.change());
            self.refuse_begun(work, lock, error);
        }
    }

    fn refuse_begun(&mut self, work: LockedWork, lock: Option<RangeLockId>, error: &Refused) {
        let (cookie, change) = (work.cookie(), work.change());
        // A failed local store was logged once when it failed.
        if let Refused::Bitmap(_) = error {
            tracing::error!(%error, "answering EIO");
        }
        self.unlock(lock);
        if let LockedWork::Write { buf, .. } = work {
            self.pool.give(buf);
        }
        self.reply_error(cookie, command_of(&change), EIO);
    }

    /// Issue the local part of a change begun durably.
    fn issue_locked(&mut self, work: LockedWork, lock: Option<RangeLockId>) {
        let change = work.change();
        // Invariant 6: every test that writes through a mirrored volume
        // checks that nothing is issued before its marks are durable. The
        // whole process stops: a panic would end only this connection's
        // thread, which a client that reconnects might not notice.
        if cfg!(debug_assertions) && !self.seam.marks_durable(&change) {
            eprintln!("invariant 6 broken: {change:?} issued before its marks were durable; aborting");
            std::process::abort();
        }
        match work {
            LockedWork::Write { cookie, mut buf, span, fua } => {
                if self.volume.is_direct() && (span.partial_head() || span.partial_tail()) {
                    if let Err(error) = self.volume.fill_edges(&span, &mut buf) {
                        tracing::warn!(%error, offset = span.file_offset, "reading edge blocks for an unaligned write failed");
                        self.seam.abandon(&write_change(&span, fua));
                        self.unlock(lock);
                        self.pool.give(buf);
                        self.reply_error(cookie, CMD_WRITE, errno_to_nbd(error.raw_os_error().unwrap_or(libc::EIO)));
                        return;
                    }
                }
                self.push_write(cookie, buf, span, fua, lock, 0);
            }
            LockedWork::Trim { cookie, offset, len, fua } => match self.volume.trim_fallocate_mode() {
                Some(mode) => self.push_fallocate(LockedWork::Trim { cookie, offset, len, fua }, lock, mode),
                None => {
                    // A discarded block device range reads back as whatever
                    // the device likes; a mirrored one must read the same on
                    // every copy, so it is zeroed instead (BLKZEROOUT, which
                    // thin devices still unmap).
                    let result = if self.seam.is_mirrored() {
                        self.volume.write_zeroes_synchronously(offset, len)
                    } else {
                        self.volume.discard_synchronously(offset, len)
                    };
                    self.synchronous_done(cookie, change, lock, result);
                }
            },
            LockedWork::Zero { cookie, offset, len, fua, may_punch, fast_only } => {
                match self.volume.zero_method(may_punch, fast_only) {
                    ZeroMethod::Fallocate(mode) => {
                        let work = LockedWork::Zero { cookie, offset, len, fua, may_punch, fast_only };
                        self.push_fallocate(work, lock, mode);
                    }
                    ZeroMethod::NotFast => {
                        self.seam.abandon(&change);
                        self.unlock(lock);
                        self.reply_error(cookie, CMD_WRITE_ZEROES, ENOTSUP);
                    }
                    ZeroMethod::Synchronous => {
                        let result = self.volume.write_zeroes_synchronously(offset, len);
                        self.synchronous_done(cookie, change, lock, result);
                    }
                }
            }
        }
    }

    fn push_write(
        &mut self,
        cookie: u64,
        buf: AlignedBuf,
        span: Span,
        fua: bool,
        lock: Option<RangeLockId>,
        done: u64,
    ) {
        if !self.volume.is_direct() && !fua {
            // A buffered write is a copy into the page cache: done here,
            // now. Through the ring, ext4 hands every buffered write to an
            // io-wq worker thread (it cannot write without blocking), which
            // costs two thread switches per write and, on few cores, more
            // than the copy itself. A FUA write waits for the disk: it stays
            // in the ring, where several run at once.
            let result = self.volume.write_now(&buf.as_slice()[done as usize..], span.file_offset + done);
            self.write_done(cookie, buf, span, fua, lock, done, result);
            return;
        }
        let pointer = buf.as_slice()[done as usize..].as_ptr();
        let entry = self.volume.write_entry(pointer, (span.file_len - done) as u32, span.file_offset + done, fua);
        // SAFETY: the entry points into `buf`, heap memory owned by the op
        // until it is reaped.
        if let Err((op, _)) = unsafe { self.ring.push(entry, Op::Write { cookie, buf, span, fua, lock, done }) } {
            self.refused(op);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_done(
        &mut self,
        cookie: u64,
        buf: AlignedBuf,
        span: Span,
        fua: bool,
        lock: Option<RangeLockId>,
        done: u64,
        result: i32,
    ) {
        let change = write_change(&span, fua);
        if result <= 0 {
            self.seam.failed(&change, if result < 0 { -result } else { libc::EIO }, false);
            self.unlock(lock);
            self.pool.give(buf);
            let errno = if result < 0 { errno_to_nbd(-result) } else { EIO };
            self.reply_error(cookie, CMD_WRITE, errno);
            return;
        }
        let done = done + result as u64;
        if done < span.file_len {
            self.push_write(cookie, buf, span, fua, lock, done);
            return;
        }
        let range = span.head as usize..(span.head + span.len) as usize;
        if self.seam.is_mirrored() {
            // The buffer itself goes to the copies' senders (no copy of the
            // data); it comes back to the pool once the last one sent it.
            let command = command_of(&change);
            let answer = self.seam.completed_lent(&change, Lent::new(buf, range, self.pool.clone()), (cookie, command));
            self.answer_shipped(lock, answer);
            return;
        }
        self.ship(cookie, change, lock, Some(&buf.as_slice()[range]));
        self.pool.give(buf);
    }

    fn push_fallocate(&mut self, work: LockedWork, lock: Option<RangeLockId>, mode: i32) {
        let (offset, len) = match &work {
            LockedWork::Trim { offset, len, .. } | LockedWork::Zero { offset, len, .. } => (*offset, *len),
            LockedWork::Write { .. } => unreachable!("writes are not fallocated"),
        };
        let entry = self.volume.fallocate_entry(offset, len, mode);
        // SAFETY: fallocate carries no pointers.
        if let Err((op, _)) = unsafe { self.ring.push(entry, Op::Fallocate { work, lock }) } {
            self.refused(op);
        }
    }

    fn fallocate_done(&mut self, work: LockedWork, lock: Option<RangeLockId>, result: i32) {
        let unsupported = result == -libc::EOPNOTSUPP;
        let change = work.change();
        match work {
            // A trim is advisory: a file system that cannot punch holes keeps
            // the data, and then nothing is shipped either (a copy that could
            // punch would otherwise read zeroes where this store has data).
            LockedWork::Trim { cookie, .. } if unsupported => {
                self.seam.abandon(&change);
                self.unlock(lock);
                self.reply_status(cookie, CMD_TRIM, 0);
            }
            LockedWork::Zero { cookie, offset, len, fast_only, .. } if unsupported => {
                self.volume.note_fallocate_unsupported();
                if fast_only {
                    self.seam.abandon(&change);
                    self.unlock(lock);
                    self.reply_error(cookie, CMD_WRITE_ZEROES, ENOTSUP);
                    return;
                }
                let result = self.volume.write_zeroes_synchronously(offset, len);
                self.synchronous_done(cookie, change, lock, result);
            }
            work => self.local_part_done(work.cookie(), change, lock, result),
        }
    }

    /// A synchronous fallback finished: its result goes through the ring
    /// (a NOP carrying it), so it completes on the same path as the ring's
    /// own operations, in order with them.
    fn synchronous_done(
        &mut self,
        cookie: u64,
        change: ChangeExtent,
        lock: Option<RangeLockId>,
        result: std::io::Result<()>,
    ) {
        let result = match result {
            Ok(()) => 0,
            Err(error) => -error.raw_os_error().unwrap_or(libc::EIO),
        };
        let op = Op::Done { cookie, lock, change, result };
        // SAFETY: a NOP carries no pointers.
        if let Err((op, _)) = unsafe { self.ring.push(opcode::Nop::new().build(), op) } {
            self.refused(op);
        }
    }

    /// The local part of a trim or zero ended with `result`: fail it, make
    /// it durable first (FUA), or ship it.
    fn local_part_done(&mut self, cookie: u64, change: ChangeExtent, lock: Option<RangeLockId>, result: i32) {
        if result < 0 {
            self.seam.failed(&change, -result, false);
            self.unlock(lock);
            self.reply_status(cookie, command_of(&change), result);
        } else if change.fua {
            self.push_fsync_then_ship(cookie, lock, change);
        } else {
            self.ship(cookie, change, lock, None);
        }
    }

    fn push_fsync_then_ship(&mut self, cookie: u64, lock: Option<RangeLockId>, change: ChangeExtent) {
        let entry = self.volume.fsync_entry();
        // SAFETY: fsync carries no pointers.
        if let Err((op, _)) = unsafe { self.ring.push(entry, Op::Fsync { cookie, lock, change }) } {
            self.refused(op);
        }
    }

    /// The local part of a change is done: hand it to the seam (which ships
    /// it to any copies), release its range, then answer now or once the
    /// copies have it.
    fn ship(&mut self, cookie: u64, change: ChangeExtent, lock: Option<RangeLockId>, data: Option<&[u8]>) {
        let command = command_of(&change);
        let answer = self.seam.completed(&change, data, (cookie, command));
        self.answer_shipped(lock, answer);
    }

    fn answer_shipped(&mut self, lock: Option<RangeLockId>, answer: Option<((u64, u16), i32)>) {
        self.unlock(lock);
        if let Some(((cookie, command), result)) = answer {
            self.reply_status(cookie, command, result);
        }
    }

    /// Keep one read of the seam's eventfd in flight while any request
    /// waits for its copies.
    fn arm_wake(&mut self) {
        if self.wake_token.is_some() {
            return;
        }
        let Some(fd) = self.seam.wake_fd() else { return };
        let mut buf = Box::new(0u64);
        let pointer = (&mut *buf as *mut u64).cast::<u8>();
        let entry = opcode::Read::new(types::Fd(fd), pointer, 8).build();
        // SAFETY: the entry points into the boxed u64, owned by the op (the
        // box's heap storage does not move) until it is reaped.
        match unsafe { self.ring.push(entry, Op::Wake { _buf: buf }) } {
            Ok(token) => self.wake_token = Some(token),
            Err(_) => {
                // The ring is full; completions arriving meanwhile are
                // picked up by the next arm (the eventfd stays readable).
            }
        }
    }

    fn woken(&mut self, result: i32) {
        self.wake_token = None;
        if result < 0 && result != -libc::ECANCELED && result != -libc::EINTR {
            tracing::error!(error = %std::io::Error::from_raw_os_error(-result), "reading the completion eventfd failed");
        }
        let mut answers = Vec::new();
        self.seam.take_answers(&mut answers);
        for ((cookie, command), result) in answers {
            self.reply_status(cookie, command, result);
        }
        if self.seam.has_waiting() {
            self.arm_wake();
        }
    }

    fn cancel_wake(&mut self) {
        if let Some(token) = self.wake_token.take() {
            if let Err((_, error)) = self.ring.cancel(token, Op::Cancel) {
                tracing::warn!(?error, "could not cancel the completion read");
            }
        }
    }

    /// The ring refused an op (its in-flight table is full, which the
    /// outstanding limit should prevent): answer EIO rather than lose it.
    fn refused(&mut self, op: Op) {
        tracing::error!("io_uring refused an operation; answering EIO");
        match op {
            Op::Read { cookie, buf, .. } => {
                self.pool.give(buf);
                self.reply_error(cookie, CMD_READ, EIO);
            }
            Op::Write { cookie, buf, lock, span, fua, .. } => {
                self.seam.failed(&write_change(&span, fua), libc::EIO, false);
                self.unlock(lock);
                self.pool.give(buf);
                self.reply_error(cookie, CMD_WRITE, EIO);
            }
            // The local part may have run (the sync had not), or may not
            // have (a flush, or a change done synchronously): either way its
            // extent is resynced, and the store is not failed.
            Op::Fsync { cookie, lock, change } | Op::Done { cookie, lock, change, .. } => {
                self.seam.failed(&change, libc::EIO, false);
                self.unlock(lock);
                self.reply_error(cookie, command_of(&change), EIO);
            }
            Op::Fallocate { work, lock } => {
                let change = work.change();
                self.seam.failed(&change, libc::EIO, false);
                self.unlock(lock);
                self.reply_error(work.cookie(), command_of(&change), EIO);
            }
            Op::Receive { .. } | Op::ReceivePayload { .. } | Op::Send { .. } | Op::Wake { .. } | Op::Cancel => {
                unreachable!("socket ops are pushed only with room in the ring")
            }
        }
    }

    fn unlock(&self, lock: Option<RangeLockId>) {
        if let Some(lock) = lock {
            self.volume.locks().unlock(lock);
        }
    }

    fn sent(&mut self, mut batch: Box<SendBatch>, result: i32) {
        self.sending = false;
        if result < 0 {
            self.fail(Ending::Io(format!("send: {}", std::io::Error::from_raw_os_error(-result))));
            return;
        }
        if !batch.advance(result as usize) {
            self.push_send(batch);
            return;
        }
        for reply in batch.replies {
            self.queued_reply_bytes -= reply.len();
            if let Reply::Data { buf, .. } = reply {
                self.pool.give(buf);
            }
        }
    }

    /// Answer a request that carries no data: 0 or a negative errno.
    fn reply_status(&mut self, cookie: u64, command: u16, result: i32) {
        if result < 0 {
            self.reply_error(cookie, command, errno_to_nbd(-result));
        } else {
            self.queue_reply(Reply::Header(ReplyHeader::simple(0, cookie)), false);
        }
    }

    fn reply_error(&mut self, cookie: u64, command: u16, error: u32) {
        let structured_only = self.negotiated.structured && matches!(command, CMD_READ | CMD_BLOCK_STATUS);
        let reply = if structured_only {
            Reply::Bytes(reply::error_chunk(cookie, error, error_message(error)))
        } else {
            Reply::Header(ReplyHeader::simple(error, cookie))
        };
        self.queue_reply(reply, true);
    }

    fn queue_reply(&mut self, reply: Reply, error: bool) {
        assert!(self.outstanding > 0, "a reply without a request");
        self.outstanding -= 1;
        self.stats.requests += 1;
        self.stats.errors += error as u64;
        if matches!(self.state, State::Failed(_)) {
            if let Reply::Data { buf, .. } = reply {
                self.pool.give(buf);
            }
            return;
        }
        self.queued_reply_bytes += reply.len();
        self.replies.push_back(reply);
    }
}

fn error_message(error: u32) -> &'static str {
    match error {
        EPERM => "the export is read-only",
        EINVAL => "invalid request (range, flags or command)",
        ENOSPC => "request goes past the end of the export",
        EOVERFLOW => "request is larger than the maximum payload",
        ENOTSUP => "a fast zero is not possible here",
        ESHUTDOWN => "the server is shutting down",
        _ => "I/O error on the server's store",
    }
}
