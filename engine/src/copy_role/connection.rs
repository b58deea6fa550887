//! One replication connection of the copy role, from accept to close: the
//! socket's framing (frames in through the decoder, encoded frames out in
//! batches), the copy's side of the handshake, the claim of the one session
//! slot and the adoption of the volume identity. The data phase that follows
//! is in [`super::apply`]. Every way a connection ends is an [`Ending`],
//! logged once, rate-limited where a peer can repeat it.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{apply, take_place, Host, SessionSlot, HANDSHAKE_TIMEOUT, HELLO_TIMEOUT, POLL_INTERVAL, TAKEOVER_WAIT};
use crate::admission::Ticket;
use crate::buffer::{Payload, SharedPool};
use crate::metadata::{format_uuid, store_metadata};
use crate::protocol::auth::{random_nonce, CopyHandshake, HandshakeMessage, HandshakeOutcome, RefuseReason, Session};
use crate::protocol::frame::{encode_frame, Frame, FrameFlags, FrameHeader, HEADER_LEN};
use crate::protocol::{decode_header, verify_payload, ReplicationError, ReplicationErrorKind};
use crate::receiver::{adopt_identity, identity_for_offer};

/// How long a write of acks may block before the peer is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// The read buffer: headers and small payloads are read through it in
/// large reads; a payload of half its size or more is read directly.
const READ_CHUNK_BYTES: usize = 256 << 10;

/// Why a connection stopped delivering frames.
#[derive(Debug)]
pub(super) enum Ending {
    /// The peer closed the connection.
    PeerClosed,
    /// The role is stopping.
    Shutdown,
    /// A newer authenticated session of the production host took over.
    Superseded,
    /// The handshake deadline passed.
    TimedOut,
    /// The bytes did not decode into an intact frame.
    Refused(ReplicationError),
    /// The socket failed.
    Io(io::Error),
}

/// One socket: frames in through the decoder, encoded frames out in batches.
pub(super) struct Connection<'host> {
    pub(super) host: &'host Host,
    pub(super) stream: TcpStream,
    pub(super) peer: SocketAddr,
    /// Received bytes not yet taken: `read_buffer[read_start..read_end]`.
    read_buffer: Vec<u8>,
    read_start: usize,
    read_end: usize,
    outgoing: Vec<u8>,
    /// This connection's session id once admitted; 0 while handshaking.
    session: u64,
    /// The socket's read timeout as last set (a setsockopt only when it changes).
    read_timeout: Option<Duration>,
    /// Where data payloads are received (the applier's pool), once set.
    pool: Option<Arc<SharedPool>>,
}

impl Connection<'_> {
    /// The next frame. Its header and small payloads come out of the read
    /// buffer; a large payload is read straight into its own buffer, so the
    /// bytes are copied once between the socket and the store's write.
    /// Before blocking for more bytes, what is queued is sent.
    pub(super) fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Frame, Ending> {
        let mut header_bytes = [0u8; HEADER_LEN];
        self.read_exact(&mut header_bytes, deadline)?;
        let header = decode_header(&header_bytes).map_err(Ending::Refused)?;
        if self.session == 0 && !header.kind.is_handshake() {
            // Nothing is allocated for an unauthenticated peer's data frame
            // (up to 32 MiB of payload per connection otherwise).
            return Err(Ending::Refused(ReplicationError::protocol(format!(
                "a {:?} frame arrived during the handshake; data frames wait for Accept",
                header.kind
            ))));
        }
        let compressed = header.flags.compressed() && !header.kind.is_handshake();
        let len = header.payload_len as usize;
        let payload = match &self.pool {
            // A data payload goes straight into an aligned buffer that an
            // O_DIRECT store writes as it is, and that comes back to the
            // pool when written (no zeroing, no second copy).
            Some(pool) if len > 0 && !compressed => {
                let mut buf = pool.take(len);
                self.read_exact(buf.as_mut_slice(), deadline)?;
                Payload::Aligned(buf)
            }
            _ => {
                let mut bytes = vec![0u8; len];
                self.read_exact(&mut bytes, deadline)?;
                Payload::Vec(bytes)
            }
        };
        verify_payload(&header, &header_bytes, &payload).map_err(Ending::Refused)?;
        if compressed {
            // Decompressed here, on the reading thread, to exactly the
            // extent's length (or refused): the rest sees a plain frame.
            let payload = crate::protocol::compress::decompress(header.flags, payload.into_vec(), header.length)
                .map_err(Ending::Refused)?;
            let header =
                FrameHeader { flags: header.flags.without_compression(), payload_len: header.length, ..header };
            return Ok(Frame { header, payload: payload.into() });
        }
        Ok(Frame { header, payload })
    }

    /// Whether the next frame is already whole in the read buffer (taking
    /// it reads no socket, so it never waits). A frame whose header does not
    /// decode answers no: [`Connection::next_frame`] then says why.
    pub(super) fn next_frame_buffered(&self) -> bool {
        let buffered = &self.read_buffer[self.read_start..self.read_end];
        let Some(header) = buffered.first_chunk::<HEADER_LEN>() else { return false };
        decode_header(header).is_ok_and(|header| buffered.len() - HEADER_LEN >= header.payload_len as usize)
    }

    /// Whether no byte waits to be read: none in the read buffer, none in
    /// the socket's receive queue. After a frame, this says it came alone.
    pub(super) fn nothing_unread(&self) -> bool {
        if self.read_start != self.read_end {
            return false;
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int, the bytes the socket holds.
        let done = unsafe { libc::ioctl(self.stream.as_raw_fd(), libc::FIONREAD, &mut queued) };
        done == 0 && queued == 0
    }

    /// Receive data payloads into buffers of `pool` from now on.
    pub(super) fn receive_into(&mut self, pool: Arc<SharedPool>) {
        self.pool = Some(pool);
    }

    fn read_exact(&mut self, out: &mut [u8], deadline: Option<Instant>) -> Result<(), Ending> {
        let mut filled = 0;
        while filled < out.len() {
            let buffered = self.read_end - self.read_start;
            if buffered > 0 {
                let count = buffered.min(out.len() - filled);
                out[filled..filled + count]
                    .copy_from_slice(&self.read_buffer[self.read_start..self.read_start + count]);
                self.read_start += count;
                filled += count;
                continue;
            }
            (self.read_start, self.read_end) = (0, 0);
            if self.host.stopping() {
                return Err(Ending::Shutdown);
            }
            if self.session != 0 && self.host.active_session.load(Ordering::Acquire) != self.session {
                return Err(Ending::Superseded);
            }
            self.flush().map_err(Ending::Io)?;
            let mut wait = POLL_INTERVAL;
            if let Some(deadline) = deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(Ending::TimedOut);
                }
                wait = wait.min(remaining);
            }
            if self.read_timeout != Some(wait) {
                self.stream.set_read_timeout(Some(wait)).map_err(Ending::Io)?;
                self.read_timeout = Some(wait);
            }
            let missing = out.len() - filled;
            let direct = missing >= self.read_buffer.len() / 2;
            let target = if direct { &mut out[filled..] } else { &mut self.read_buffer[..] };
            match self.stream.read(target) {
                Ok(0) => return Err(Ending::PeerClosed),
                Ok(received) if direct => filled += received,
                Ok(received) => self.read_end = received,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                    ) => {}
                Err(error) => return Err(Ending::Io(error)),
            }
        }
        Ok(())
    }

    /// Queue a frame; it leaves with the next flush.
    fn queue(&mut self, header: &FrameHeader, payload: &[u8]) {
        self.outgoing.extend_from_slice(&encode_frame(header, payload));
    }

    fn queue_message(&mut self, message: &HandshakeMessage) {
        let (header, payload) = message.to_frame();
        self.queue(&header, &payload);
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.outgoing.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.outgoing);
        self.outgoing.clear();
        result
    }

    /// Send what is queued, best effort: the connection is closing anyway.
    fn flush_before_closing(&mut self) {
        if let Err(error) = self.flush() {
            tracing::debug!(peer = %self.peer, %error, "could not send the last frames before closing");
        }
    }
}

pub(super) fn serve_connection(host: &Host, stream: TcpStream, peer: SocketAddr) {
    if let Err(error) = configure_socket(&stream) {
        tracing::warn!(%peer, %error, "could not set socket options; closing the connection from {peer}");
        return;
    }
    let mut connection = Connection {
        host,
        stream,
        peer,
        read_buffer: vec![0; READ_CHUNK_BYTES],
        read_start: 0,
        read_end: 0,
        session: 0,
        read_timeout: None,
        outgoing: Vec::new(),
        pool: None,
    };
    let Some(ticket) = take_place(host, &connection.stream, peer) else {
        return;
    };
    let authenticated = handshake(&mut connection, &ticket);
    // Authenticated or not, it no longer holds a place among the handshakes:
    // an authenticated peer waiting for the session slot (up to the takeover
    // wait) must not be evicted by newer unauthenticated connections.
    drop(ticket);
    let established = authenticated.and_then(|session| admit(&mut connection, session));
    let Some((session, _slot)) = established else {
        connection.flush_before_closing();
        return;
    };
    apply::receive(&mut connection, &session);
    connection.flush_before_closing();
}

fn configure_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    crate::replicator::connect::configure_socket(stream)
}

/// What a refusal of this kind means, in a few words for the log.
pub(super) fn refusal_name(kind: ReplicationErrorKind) -> &'static str {
    match kind {
        ReplicationErrorKind::Corrupt => "corrupt frame",
        ReplicationErrorKind::Version => "unknown protocol version",
        ReplicationErrorKind::Replay => "replayed or out-of-order frame",
        ReplicationErrorKind::WrongSession => "frame of another session",
        ReplicationErrorKind::Fenced => "fenced frame (older epoch or generation)",
        ReplicationErrorKind::TooLarge => "frame over its limit",
        ReplicationErrorKind::AuthFailed => "wrong secret",
        ReplicationErrorKind::Identity => "another volume",
        ReplicationErrorKind::Protocol => "protocol violation",
        ReplicationErrorKind::Secret | ReplicationErrorKind::Io => "local error",
    }
}

/// Log and count a handshake that ended in a refusal, queueing `refusal`
/// for the peer.
fn refuse_handshake(connection: &mut Connection<'_>, refusal: Option<RefuseReason>, error: &ReplicationError) {
    if let Some(reason) = refusal {
        connection.queue_message(&HandshakeMessage::Refuse { reason });
    }
    let total = connection.host.counters().record_rejected(error);
    let peer = connection.peer;
    if !connection.host.log_limit.allow("handshake refused", Instant::now()) {
        return;
    }
    tracing::warn!(
        %peer,
        kind = ?error.kind(),
        frames_rejected = total,
        "handshake with production host {peer} refused: {}: {error}; frames_rejected={total}; closing the connection",
        refusal_name(error.kind())
    );
}

/// Log a connection that ended while no frame was being judged.
pub(super) fn log_ending(peer: SocketAddr, phase: &str, ending: &Ending) {
    match ending {
        Ending::PeerClosed if phase.contains("handshake") => {
            tracing::info!(%peer, "{peer} closed the connection {phase}, before it authenticated")
        }
        Ending::PeerClosed => tracing::info!(%peer, "production host {peer} closed the connection {phase}"),
        Ending::Shutdown => tracing::info!(%peer, "closing the connection to {peer} {phase}: shutting down"),
        Ending::Superseded => tracing::warn!(
            %peer,
            "closing the connection to {peer}: the production host connected again and authenticated; \
             the newer session takes over"
        ),
        Ending::TimedOut => tracing::warn!(
            %peer,
            "{peer} did not complete the handshake in time (its Hello within {} s, all of it within {} s); \
             closing the connection",
            HELLO_TIMEOUT.as_secs(),
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        Ending::Refused(_) => {}
        Ending::Io(error) => tracing::warn!(%peer, %error, "connection to {peer} lost {phase}: {error}"),
    }
}

/// Run the copy's side of the handshake up to authentication; on success
/// the session, which `admit` then claims the slot for and accepts.
fn handshake<'host>(connection: &mut Connection<'host>, ticket: &Ticket<'_>) -> Option<Session> {
    let host = connection.host;
    let started = Instant::now();
    let deadline = started + HANDSHAKE_TIMEOUT;
    let next_message = |connection: &mut Connection<'host>, deadline: Instant| -> Option<HandshakeMessage> {
        let frame = match connection.next_frame(Some(deadline)) {
            Ok(frame) => frame,
            Err(Ending::Refused(error)) => {
                refuse_handshake(connection, None, &error);
                return None;
            }
            Err(_) if ticket.evicted() => return None,
            Err(ending) => {
                // A peer can end handshakes in a loop: these lines are rate-limited.
                let kind = match ending {
                    Ending::PeerClosed => "handshake closed by the peer",
                    Ending::TimedOut => "handshake timed out",
                    _ => "handshake ended",
                };
                if connection.host.log_limit.allow(kind, Instant::now()) {
                    log_ending(connection.peer, "during the handshake", &ending);
                }
                return None;
            }
        };
        match HandshakeMessage::from_frame(&frame) {
            Ok(message) => Some(message),
            Err(error) => {
                refuse_handshake(connection, Some(RefuseReason::Protocol), &error);
                None
            }
        }
    };
    let hello = next_message(connection, started + HELLO_TIMEOUT)?;
    ticket.greeted();
    let HandshakeMessage::Hello { identity: offered, .. } = hello else {
        let error = ReplicationError::Protocol {
            message: format!("the handshake must open with Hello, got {:?}", hello.kind()),
        };
        refuse_handshake(connection, Some(RefuseReason::Protocol), &error);
        return None;
    };
    let metadata = *host.metadata();
    let identity = match identity_for_offer(host.volume.path(), host.volume.size(), &metadata, &offered) {
        Ok(identity) => identity,
        Err(error) => {
            refuse_handshake(connection, Some(RefuseReason::IdentityMismatch), &error);
            return None;
        }
    };
    let nonce = match random_nonce() {
        Ok(nonce) => nonce,
        Err(error) => {
            tracing::error!(peer = %connection.peer, %error, "cannot handshake");
            return None;
        }
    };
    let metadata = host.metadata();
    let mut copy_handshake = CopyHandshake::new(&host.secret, identity, nonce)
        .with_store(metadata.store_token)
        .with_epoch_promised(metadata.epoch_promised);
    let mut step = copy_handshake.on_message(&hello);
    loop {
        match step.outcome {
            HandshakeOutcome::Continue => {
                if let Some(message) = &step.send {
                    connection.queue_message(message);
                }
                let message = next_message(connection, deadline)?;
                step = copy_handshake.on_message(&message);
            }
            HandshakeOutcome::Failed(error) => {
                refuse_handshake(connection, step.send.and_then(refusal_reason), &error);
                return None;
            }
            // The Accept waits until the slot is claimed and the identity stored.
            HandshakeOutcome::Established(session) => return Some(session),
        }
    }
}

fn refusal_reason(message: HandshakeMessage) -> Option<RefuseReason> {
    match message {
        HandshakeMessage::Refuse { reason } => Some(reason),
        _ => None,
    }
}

/// Admit an authenticated session: claim the slot, adopt the identity on a
/// fresh copy (stored durably before anything is accepted), queue Accept.
fn admit<'host>(connection: &mut Connection<'host>, session: Session) -> Option<(Session, SessionSlot<'host>)> {
    let host = connection.host;
    let peer = connection.peer;
    let slot = match host.claim_session(peer) {
        Ok((slot, id)) => {
            connection.session = id;
            slot
        }
        Err(holder) => {
            connection.queue_message(&HandshakeMessage::Refuse { reason: RefuseReason::Protocol });
            tracing::warn!(
                %peer,
                "refusing production host {peer}: the session of {holder} did not stop within {} s, \
                 or a newer session took over first",
                TAKEOVER_WAIT.as_secs()
            );
            return None;
        }
    };
    let mut metadata = host.metadata();
    match adopt_identity(host.volume.path(), &metadata, &session) {
        Ok(None) => {}
        Ok(Some(adopted)) => {
            if let Err(error) = store_metadata(&host.metadata_path, &adopted) {
                tracing::error!(%peer, "cannot record the volume this copy mirrors and the epoch it promises: {error}; closing the connection");
                return None;
            }
            if metadata.identity.is_none() {
                tracing::info!(
                    %peer,
                    "volume {} now mirrors uuid {} ({} bytes); state syncing: it needs a full initial sync",
                    host.volume.path().display(),
                    format_uuid(&session.identity.uuid),
                    session.identity.size_bytes
                );
            }
            if adopted.epoch_promised != metadata.epoch_promised {
                tracing::info!(%peer, "stored: epoch {} promised (production host {peer})", adopted.epoch_promised);
            }
            *metadata = adopted;
        }
        Err(error) => {
            drop(metadata);
            refuse_handshake(connection, Some(RefuseReason::IdentityMismatch), &error);
            return None;
        }
    }
    drop(metadata);
    // The Accept says whether this store holds no data, for --assume-clean.
    let store = host.metadata().store_token;
    let (mut accept, payload) = HandshakeMessage::Accept { store }.to_frame();
    accept.flags = FrameFlags::DECOMPRESSES;
    if host.volume.holds_no_data().unwrap_or(false) {
        accept.flags = accept.flags | FrameFlags::EMPTY;
    }
    connection.queue(&accept, &payload);
    tracing::info!(
        %peer,
        session = format_args!("{:#018x}", session.id),
        "production host {peer} authenticated; receiving writes for uuid {}",
        format_uuid(&session.identity.uuid)
    );
    Some((session, slot))
}
