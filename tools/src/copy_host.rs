//! `crossmirror copy-host`: hold a copy of a production volume. Accept the
//! production host's replication connection, authenticate it, and apply its
//! frames to the local store through io_uring until SIGINT or SIGTERM; then
//! finish the changes in flight, fsync and exit 0.
//!
//! ```text
//!  accept ─▶ admission (evict the oldest idle handshake when full) ─▶ thread per connection
//!        ─▶ handshake (Hello within 2 s, all of it within 10 s)
//!        ─▶ claim the one session slot ─▶ adopt the volume identity (fresh copy) ─▶ Accept
//!        ─▶ loop { frame ─▶ Receiver ─▶ store metadata? ─▶ Applier (io_uring) ─▶ acks in order }
//! ```
//!
//! The decisions are in `engine::receiver` (pure); this file only moves
//! bytes. Handshakes may run side by side, and a new connection always gets
//! a place among them (`admission`: the oldest one that has not sent its
//! Hello is closed to make room), so an unauthenticated peer cannot lock the
//! production host out; repeated log lines are rate-limited, so it cannot
//! fill the disk either. Only one authenticated production
//! connection is served at a time: a newer authenticated session takes over
//! from an older one, which finishes the frame it is applying and closes (a
//! production host that reconnects after a link cut need not wait for its dead
//! connection to time out here). A refused frame closes its connection; the
//! production host reconnects.
//! A change that cannot be applied (above all a full store, ENOSPC) is
//! reported to the production host in an Error frame, after the acks of
//! everything applied before it, and the connection is read to its end
//! (at most ERROR_LINGER) so the report is not lost to a reset: the
//! production host then records the copy stale with that reason and backs
//! off instead of redialling and resending at once.
//! Changes are applied by `engine::applier`: many writes in flight at once,
//! never one before an earlier write it overlaps or, when it carries the
//! BARRIER flag, before anything earlier; acks leave in arrival order once
//! their change is done. Reading and checking frames (socket copy, CRC) runs
//! on a helper thread ahead of the applying thread, at most PIPELINE_FRAMES
//! frames ahead; it rings the applier's doorbell (an eventfd its ring reads)
//! when the applier waits for completions.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use engine::applier::{Applier, Doorbell};
use engine::fingerprint::fingerprint;
use engine::log_limit::LogLimit;
use engine::metadata::{
    format_uuid, load_metadata, new_store_token, store_metadata, MetadataFiles, StoreState, VolumeMetadata,
};
use engine::protocol::auth::{
    random_nonce, CopyHandshake, HandshakeMessage, HandshakeOutcome, RefuseReason, Session, STORE_TOKEN_UNKNOWN,
};
use engine::protocol::copy_failure::{CopyFailure, CopyFailureKind};
use engine::protocol::frame::{encode_frame, Frame, FrameFlags, FrameHeader, HEADER_LEN};
use engine::protocol::{decode_header, load_secret, verify_payload, ReplicationError, ReplicationErrorKind, Secret};
use engine::receiver::{adopt_identity, identity_for_offer, Receiver, ReceiverCounters};
use engine::volume::BackingKind;
use engine::{Volume, VolumeOptions};

use crate::admin;
use crate::admission::{Admission, Ticket, HANDSHAKES_MAX};
use crate::size::parse_size;
use crate::start_files::StartFiles;

/// How long a peer may take from connecting to a completed handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a peer may take from connecting to its Hello (a production host
/// sends it at once): idle connections leave their place soon.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connection threads at once: the handshakes the admission table holds,
/// those just evicted and still exiting, and the sessions (an old one and
/// the newer one taking over). A safety net: admission bounds handshakes.
const THREADS_MAX: usize = 4 * HANDSHAKES_MAX;
/// Repeated log lines of one kind: this many per interval, then a summary.
const LOG_LINES_PER_INTERVAL: u32 = 5;
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often blocked reads and the accept loop look at the shutdown flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Frames read and checked ahead of the one being applied (each at most a
/// maximal frame, 32 MiB; in practice one NBD request, up to 1 MiB).
const PIPELINE_FRAMES: usize = 8;
/// How long a newly authenticated session waits for the old one to stop.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);
/// How long a write of acks may block before the peer is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After an Error frame, how long the connection is read and discarded
/// while the production host closes its end: closing with its frames
/// unread would reset the connection, and the reset may discard the report.
const ERROR_LINGER: Duration = Duration::from_secs(2);
/// The read buffer: headers and small payloads are read through it in
/// large reads; a payload of half its size or more is read directly.
const READ_CHUNK_BYTES: usize = 256 << 10;

/// Arguments of `crossmirror copy-host`.
#[derive(Args, Debug)]
pub struct CopyHostArgs {
    /// Regular file or block device holding this host's copy of the volume.
    #[arg(long)]
    volume: PathBuf,
    /// Volume size (e.g. 1G); creates a sparse file if the path is absent.
    /// It must equal the production volume's size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Address to listen on for the production host: PORT (meaning
    /// 127.0.0.1:PORT), IPV4:PORT, [IPV6]:PORT or HOST:PORT (e.g. 127.0.0.2:7789).
    #[arg(long, value_parser = crate::address::parse_address)]
    listen: SocketAddr,
    /// File holding the secret shared with the production host; it must be
    /// private to its owner (chmod 600).
    #[arg(long)]
    secret_file: PathBuf,
    /// Open the volume with O_DIRECT (bypass the page cache).
    #[arg(long)]
    direct: bool,
    /// Serve `GET /status` (JSON: what this copy mirrors, its state and
    /// frame counters) over HTTP on this address (a bare port means
    /// 127.0.0.1:PORT).
    #[arg(long, value_parser = admin::parse_admin_address)]
    admin: Option<SocketAddr>,
    /// Directory for this volume's metadata file. Default: beside a regular
    /// file (`<volume>.cmmeta`); /var/lib/crossmirror for a block device.
    #[arg(long)]
    metadata_dir: Option<PathBuf>,
}

/// What every connection thread shares.
struct Host {
    volume: Volume,
    metadata_path: PathBuf,
    /// The metadata as last stored; changed only by the session holder.
    metadata: Mutex<VolumeMetadata>,
    secret: Secret,
    counters: ReceiverCounters,
    shutdown: Arc<AtomicBool>,
    /// The production host of the established session, if any.
    session_holder: Mutex<Option<SocketAddr>>,
    /// The id of the session that may run; an older one sees it change and
    /// stops, so a production host that reconnects (after a link cut, say)
    /// takes over at once instead of waiting for the dead connection to time out.
    active_session: AtomicU64,
    next_session: AtomicU64,
    /// The handshakes open, and which to close to make room.
    admission: Admission,
    /// Rate limit of log lines a peer can repeat (refusals, handshake endings).
    log_limit: LogLimit,
}

impl Host {
    /// The copy host's `GET /status` document.
    fn status_json(&self) -> serde_json::Value {
        let metadata = *self.metadata();
        let production = *self.session_holder.lock().unwrap_or_else(PoisonError::into_inner);
        serde_json::json!({
            "role": "copy",
            "volume": self.volume.path().display().to_string(),
            "size": self.volume.size(),
            "mirrors": metadata.identity.map(|identity| format_uuid(&identity.uuid)),
            "store_state": metadata.state.as_str(),
            "generation": metadata.generation,
            "epoch_promised": metadata.epoch_promised,
            "production": production.map(|peer| peer.to_string()),
            "frames_accepted": self.counters.frames_accepted(),
            "frames_rejected": self.counters.frames_rejected(),
            "write_bytes_accepted": self.counters.write_bytes_accepted(),
        })
    }

    fn metadata(&self) -> MutexGuard<'_, VolumeMetadata> {
        self.metadata.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take the one session slot for the authenticated `peer`: a session
    /// holding it is told to stop and waited for (it finishes the frame it
    /// is applying), so frames of two sessions never interleave. Returns the
    /// slot and the new session's id, or the holder that did not let go.
    fn claim_session(&self, peer: SocketAddr) -> Result<(SessionSlot<'_>, u64), SocketAddr> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.active_session.store(id, Ordering::Release);
        let deadline = Instant::now() + TAKEOVER_WAIT;
        loop {
            {
                let mut holder = self.session_holder.lock().unwrap_or_else(PoisonError::into_inner);
                match *holder {
                    None => {
                        *holder = Some(peer);
                        return Ok((SessionSlot { host: self }, id));
                    }
                    Some(old) if Instant::now() > deadline || self.active_session.load(Ordering::Acquire) != id => {
                        return Err(old);
                    }
                    Some(_) => {}
                }
            }
            std::thread::sleep(POLL_INTERVAL / 10);
        }
    }
}

/// The session slot, released when the session ends.
struct SessionSlot<'host> {
    host: &'host Host,
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        *self.host.session_holder.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// Load the copy's metadata, and prove the store is the one it was made
/// for (invariant 9): a store whose fingerprint changed (a new blank file,
/// another disk, a restored file) gets a new store token and is marked
/// syncing, so the production host resyncs it in full instead of trusting
/// its bitmap. A fresh copy draws its token here too.
fn open_metadata(args: &CopyHostArgs, volume: &Volume) -> anyhow::Result<(PathBuf, VolumeMetadata)> {
    let block_device = volume.kind() == BackingKind::BlockDevice;
    let files = MetadataFiles::locate(&args.volume, block_device, args.metadata_dir.as_deref());
    refuse_metadata_in_dev(&args.volume, block_device, args.metadata_dir.as_deref(), &files)?;
    files.create_directory()?;
    let metadata_path = files.metadata;
    let mut metadata = load_metadata(&metadata_path)?.unwrap_or_else(VolumeMetadata::fresh);
    if let Some(identity) = metadata.identity {
        anyhow::ensure!(
            identity.size_bytes == volume.size(),
            "metadata {} says volume {} mirrors uuid {} of {} bytes, but the volume is {} bytes; \
             restore its size, or move the metadata aside to make it a fresh copy (it then needs a full sync)",
            metadata_path.display(),
            args.volume.display(),
            format_uuid(&identity.uuid),
            identity.size_bytes,
            volume.size()
        );
    }
    let store =
        fingerprint(&args.volume).with_context(|| format!("cannot fingerprint the store {}", args.volume.display()))?;
    if metadata.store_token != STORE_TOKEN_UNKNOWN && metadata.store_fingerprint == store.value {
        return Ok((metadata_path, metadata));
    }
    if metadata.identity.is_some() {
        tracing::warn!(
            volume = %args.volume.display(),
            "the store {} is not the one {} was made for (now: {}); it gets a new store token and a full resync",
            args.volume.display(),
            metadata_path.display(),
            store.description
        );
    }
    metadata.store_token = new_store_token().context("drawing a store token")?;
    metadata.store_fingerprint = store.value;
    metadata.state = StoreState::Syncing;
    if metadata.identity.is_some() {
        store_metadata(&metadata_path, &metadata)?;
    }
    Ok((metadata_path, metadata))
}

/// Metadata an older release wrote into /dev (a tmpfs emptied by every
/// reboot) is not silently left behind: say where it goes now.
pub fn refuse_metadata_in_dev(
    volume: &Path,
    block_device: bool,
    metadata_dir: Option<&Path>,
    files: &MetadataFiles,
) -> anyhow::Result<()> {
    let beside = MetadataFiles::beside(volume);
    if !block_device || metadata_dir.is_some() || beside == *files || files.metadata.exists() {
        return Ok(());
    }
    let old: Vec<String> = beside.existing().iter().map(|path| path.display().to_string()).collect();
    anyhow::ensure!(
        old.is_empty(),
        "metadata of {} was found at {} (where an older release kept it; /dev does not survive a reboot): \
         move it to {} (same names), or pass --metadata-dir",
        volume.display(),
        old.join(", "),
        files.metadata.parent().map_or_else(String::new, |directory| directory.display().to_string())
    );
    Ok(())
}

/// Run the copy host until a signal stops it.
pub fn run(args: CopyHostArgs) -> anyhow::Result<()> {
    let secret = load_secret(&args.secret_file)?;
    // A copy's metadata is written only once it meets its production host,
    // so the one file a failed start may leave is a volume it created.
    let start_files = StartFiles::note(std::slice::from_ref(&args.volume));
    let options = VolumeOptions { path: args.volume.clone(), size: args.size, direct: args.direct, read_only: false };
    let volume = Volume::open(&options)?;
    lock_volume(&volume)?;
    let (metadata_path, metadata) = open_metadata(&args, &volume)?;
    let listener = crate::address::bind(args.listen, "--listen")?;
    listener.set_nonblocking(true).context("setting the listening socket non-blocking")?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone()).context("installing the signal handler")?;
    }
    let mirrors = match metadata.identity {
        Some(identity) => format!("uuid {} ({} bytes)", format_uuid(&identity.uuid), identity.size_bytes),
        None => "nothing yet (fresh copy)".to_string(),
    };
    tracing::info!(
        listen = %listener.local_addr().unwrap_or(args.listen),
        volume = %args.volume.display(),
        size = volume.size(),
        direct = volume.is_direct(),
        state = ?metadata.state,
        generation = metadata.generation,
        epoch_promised = metadata.epoch_promised,
        "copy host listening; the volume mirrors {mirrors}"
    );
    let host = Arc::new(Host {
        volume,
        metadata_path,
        metadata: Mutex::new(metadata),
        secret,
        counters: ReceiverCounters::default(),
        shutdown,
        session_holder: Mutex::new(None),
        active_session: AtomicU64::new(0),
        next_session: AtomicU64::new(1),
        admission: Admission::default(),
        log_limit: LogLimit::new(LOG_INTERVAL, LOG_LINES_PER_INTERVAL),
    });
    let admin = match args.admin {
        Some(address) => {
            let status_host = host.clone();
            let handler: crate::http::Handler = Arc::new(move |request: &crate::http::Request| {
                match (request.method.as_str(), request.path.as_str()) {
                    ("GET", "/status") => (200, status_host.status_json()),
                    _ => (404, serde_json::json!({ "error": "a copy host serves GET /status only" })),
                }
            });
            Some(admin::AdminServer::start(address, handler)?)
        }
        None => None,
    };
    start_files.started();
    let threads = accept_until_shutdown(&host, &listener);
    drop(admin);
    tracing::info!(connections = threads.len(), "shutting down: finishing the frame being applied");
    for thread in threads {
        let _ = thread.join();
    }
    host.volume.sync_all().context("final fsync of the volume")?;
    tracing::info!(
        frames_accepted = host.counters.frames_accepted(),
        frames_rejected = host.counters.frames_rejected(),
        "volume synced; copy host stopped"
    );
    Ok(())
}

/// Take an exclusive lock on the volume, so two copy hosts never apply
/// frames to one store. The lock goes with the open file.
fn lock_volume(volume: &Volume) -> anyhow::Result<()> {
    // SAFETY: flock only reads the descriptor number, and `volume` keeps that
    // descriptor open for the whole call.
    let result = unsafe { libc::flock(volume.fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.kind() == io::ErrorKind::WouldBlock {
        anyhow::bail!(
            "volume {} is locked by another process (another copy host?); stop it before starting this one",
            volume.path().display()
        );
    }
    Err(error).with_context(|| format!("locking volume {}", volume.path().display()))
}

fn accept_until_shutdown(host: &Arc<Host>, listener: &TcpListener) -> Vec<JoinHandle<()>> {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !host.shutdown.load(Ordering::Relaxed) {
        report_suppressed(host);
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(POLL_INTERVAL / 5);
                continue;
            }
            Err(error) => {
                if host.log_limit.allow("accept failed", Instant::now()) {
                    tracing::warn!(%error, "accept failed: {error}");
                }
                std::thread::sleep(POLL_INTERVAL / 5);
                continue;
            }
        };
        threads.retain(|thread| !thread.is_finished());
        if threads.len() >= THREADS_MAX {
            if host.log_limit.allow("too many connection threads", Instant::now()) {
                tracing::warn!(
                    %peer,
                    "connection from {peer} refused: {THREADS_MAX} connection threads are running \
                     (handshakes closing, sessions)"
                );
            }
            continue;
        }
        let host = host.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("copy-{peer}"))
            .spawn(move || serve_connection(&host, stream, peer));
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(error) => tracing::error!(%error, %peer, "could not start a connection thread"),
        }
    }
    threads
}

/// Log one summary line per kind of line held back in the interval that ended.
fn report_suppressed(host: &Host) {
    for (kind, count) in host.log_limit.take_suppressed(Instant::now()) {
        tracing::warn!(
            suppressed = count,
            "suppressed {count} similar messages in the last {} s: {kind}",
            LOG_INTERVAL.as_secs()
        );
    }
}

/// Give the connection its place among the handshakes, closing the one the
/// admission rule names to make room.
fn take_place<'host>(host: &'host Host, stream: &TcpStream, peer: SocketAddr) -> Option<Ticket<'host>> {
    let (ticket, evicted) = match host.admission.admit(stream, peer, Instant::now()) {
        Ok(admitted) => admitted,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot track the connection from {peer}: {error}; closing it");
            return None;
        }
    };
    if let Some(evicted) = evicted {
        if host.log_limit.allow("handshake evicted", Instant::now()) {
            let old = evicted.peer;
            let what = if evicted.greeted { "waiting for its handshake" } else { "idle, no Hello yet" };
            tracing::warn!(
                %peer,
                evicted = %old,
                "closed the unauthenticated connection from {old} ({what}) to make room for {peer}: \
                 at most {HANDSHAKES_MAX} handshakes are open at once"
            );
        }
    }
    Some(ticket)
}

/// Why a connection stopped delivering frames.
#[derive(Debug)]
enum Ending {
    /// The peer closed the connection.
    PeerClosed,
    /// SIGINT or SIGTERM.
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
struct Connection<'host> {
    host: &'host Host,
    stream: TcpStream,
    peer: SocketAddr,
    /// Received bytes not yet taken: `read_buffer[read_start..read_end]`.
    read_buffer: Vec<u8>,
    read_start: usize,
    read_end: usize,
    outgoing: Vec<u8>,
    /// This connection's session id once admitted; 0 while handshaking.
    session: u64,
}

impl Connection<'_> {
    /// The next frame. Its header and small payloads come out of the read
    /// buffer; a large payload is read straight into its own buffer, so the
    /// bytes are copied once between the socket and the store's write.
    /// Before blocking for more bytes, what is queued is sent.
    fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Frame, Ending> {
        let mut header_bytes = [0u8; HEADER_LEN];
        self.read_exact(&mut header_bytes, deadline)?;
        let header = decode_header(&header_bytes).map_err(Ending::Refused)?;
        let mut payload = vec![0u8; header.payload_len as usize];
        self.read_exact(&mut payload, deadline)?;
        verify_payload(&header, &header_bytes, &payload).map_err(Ending::Refused)?;
        Ok(Frame { header, payload })
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
            if self.host.shutdown.load(Ordering::Relaxed) {
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
            self.stream.set_read_timeout(Some(wait)).map_err(Ending::Io)?;
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

fn serve_connection(host: &Host, stream: TcpStream, peer: SocketAddr) {
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
        outgoing: Vec::new(),
    };
    let Some(ticket) = take_place(host, &connection.stream, peer) else {
        return;
    };
    let established = handshake(&mut connection, &ticket);
    // Authenticated or not, it no longer holds a place among the handshakes.
    drop(ticket);
    let Some((session, _slot)) = established else {
        connection.flush_before_closing();
        return;
    };
    receive(&mut connection, &session);
    connection.flush_before_closing();
}

fn configure_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    engine::replicator::connect::configure_socket(stream)
}

/// What a refusal of this kind means, in a few words for the log.
fn refusal_name(kind: ReplicationErrorKind) -> &'static str {
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
    let total = connection.host.counters.record_rejected();
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
fn log_ending(peer: SocketAddr, phase: &str, ending: &Ending) {
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

/// Run the copy's side of the handshake; on success the session and the
/// claimed session slot, after the Accept is queued.
fn handshake<'host>(connection: &mut Connection<'host>, ticket: &Ticket<'_>) -> Option<(Session, SessionSlot<'host>)> {
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
    let store = host.metadata().store_token;
    let mut copy_handshake = CopyHandshake::new(&host.secret, identity, nonce).with_store(store);
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
            HandshakeOutcome::Established(session) => return admit(connection, session),
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
                tracing::error!(%peer, "cannot record the volume this copy mirrors: {error}; closing the connection");
                return None;
            }
            *metadata = adopted;
            tracing::info!(
                %peer,
                "volume {} now mirrors uuid {} ({} bytes); state syncing: it needs a full initial sync",
                host.volume.path().display(),
                format_uuid(&session.identity.uuid),
                session.identity.size_bytes
            );
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
    if host.volume.holds_no_data().unwrap_or(false) {
        accept.flags = FrameFlags::EMPTY;
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

/// The data phase: judge each frame, store raised promises, apply, ack.
fn receive(connection: &mut Connection<'_>, session: &Session) {
    let host = connection.host;
    let peer = connection.peer;
    let mut writer = match connection.stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot clone the socket for acknowledgements; closing the connection");
            return;
        }
    };
    let doorbell = match Doorbell::new() {
        Ok(doorbell) => doorbell,
        Err(error) => {
            tracing::error!(%peer, %error, "cannot create an eventfd; closing the connection");
            return;
        }
    };
    let mut applier = match Applier::new(&host.volume, Some(doorbell.clone())) {
        Ok(applier) => applier,
        Err(error) => {
            tracing::error!(%peer, "cannot set up the io_uring applier: {error}; closing the connection");
            return;
        }
    };
    // Two stages: this thread's helper reads and checks frames (socket copy,
    // CRC) while this thread applies them and acknowledges.
    let (sender, frames) = std::sync::mpsc::sync_channel::<Result<Frame, Ending>>(PIPELINE_FRAMES);
    std::thread::scope(|scope| {
        let ringer = doorbell.clone();
        scope.spawn(move || loop {
            let next = connection.next_frame(None);
            let ended = next.is_err();
            let sent = sender.send(next);
            ringer.ring();
            if sent.is_err() || ended {
                break;
            }
        });
        let ending = apply_frames(host, peer, session, &frames, &doorbell, &mut applier, &mut writer);
        // What was applied before the connection ended (or before the change
        // that failed: replies leave in order, and a failed change's never)
        // is acknowledged.
        let _ = applier.drain();
        let mut outgoing = Vec::new();
        applier.take_replies(&mut outgoing);
        let report = match ending {
            Applied::Failed(Some(failure)) => Some(failure),
            Applied::Ended | Applied::Failed(None) => None,
        };
        if let Some(failure) = &report {
            // Tell the production host why, so it does not take this for a
            // lost link and resend at once (it backs off and says why in status).
            let (header, payload) = failure.to_frame(session.id);
            outgoing.extend_from_slice(&encode_frame(&header, &payload));
            tracing::warn!(%peer, kind = failure.kind.as_str(),
                "telling production host {peer} why this copy stops: {}", failure.message);
        }
        if writer.write_all(&outgoing).is_ok() && report.is_some() {
            let _ = writer.shutdown(std::net::Shutdown::Write);
            linger(&frames);
        }
        // Stop the reader: it sees the closed channel or the closed socket.
        drop(frames);
        let _ = writer.shutdown(std::net::Shutdown::Both);
    });
}

/// Read and discard frames until the production host closes its end (it
/// does on the Error frame) or ERROR_LINGER passes.
fn linger(frames: &std::sync::mpsc::Receiver<Result<Frame, Ending>>) {
    let deadline = Instant::now() + ERROR_LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match frames.recv_timeout(left) {
            Ok(Ok(_)) if !left.is_zero() => {}
            _ => return,
        }
    }
}

/// How the applying stage ended.
enum Applied {
    /// The connection ended or a frame was refused; what was applied may
    /// still be acknowledged.
    Ended,
    /// A change could not be made (nothing from it on is acknowledged);
    /// the report for the production host, unless the socket itself failed.
    Failed(Option<CopyFailure>),
}

/// The applying stage: judge each frame, store raised promises, hand the
/// change to the applier, and send the replies it releases, in batches,
/// whenever no frame is waiting.
fn apply_frames(
    host: &Host,
    peer: SocketAddr,
    session: &Session,
    frames: &std::sync::mpsc::Receiver<Result<Frame, Ending>>,
    doorbell: &Doorbell,
    applier: &mut Applier<'_>,
    writer: &mut TcpStream,
) -> Applied {
    let metadata = *host.metadata();
    let mut receiver = Receiver::new(session, metadata, host.volume.size(), &host.counters);
    let mut outgoing: Vec<u8> = Vec::new();
    let failed = |error: engine::EngineError, what: &str| {
        let volume = host.volume.path().display();
        tracing::error!(%peer, "cannot {what} on volume {volume}: {error}; closing the connection without acknowledging it");
        let what = format!("{what} on volume {volume}");
        Applied::Failed(Some(CopyFailure::from_error(&error, &what, CopyFailureKind::StoreIo)))
    };
    let metadata_failed = |error: engine::metadata::MetadataError, what: &str| {
        tracing::error!(%peer, "cannot {what}: {error}; closing the connection");
        Applied::Failed(Some(CopyFailure::from_error(&error, what, CopyFailureKind::Metadata)))
    };
    loop {
        let next = match frames.try_recv() {
            Ok(next) => next,
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                applier.take_replies(&mut outgoing);
                if !outgoing.is_empty() {
                    if let Err(error) = writer.write_all(&outgoing) {
                        log_ending(peer, "", &Ending::Io(error));
                        return Applied::Failed(None);
                    }
                    outgoing.clear();
                }
                if applier.idle() {
                    match frames.recv() {
                        Ok(next) => next,
                        Err(_) => return Applied::Ended,
                    }
                } else {
                    // Wait for a change to complete or a frame to arrive.
                    doorbell.arm();
                    match frames.try_recv() {
                        Ok(next) => {
                            doorbell.disarm();
                            next
                        }
                        Err(std::sync::mpsc::TryRecvError::Empty) => {
                            if let Err(error) = applier.wait() {
                                return failed(error, "apply a change");
                            }
                            continue;
                        }
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => return Applied::Ended,
                    }
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return Applied::Ended,
        };
        let judged = match next {
            Ok(frame) => receiver.on_frame(frame),
            Err(Ending::Refused(error)) => Err(receiver.refuse(error)),
            Err(ending) => {
                log_ending(peer, "", &ending);
                return Applied::Ended;
            }
        };
        let step = match judged {
            Ok(step) => step,
            Err(error) => {
                let total = host.counters.frames_rejected();
                tracing::warn!(
                    %peer,
                    kind = ?error.kind(),
                    frames_rejected = total,
                    "refused a frame from production host {peer}: {}: {error}; nothing of it was applied; \
                     frames_rejected={total}; closing the connection",
                    refusal_name(error.kind())
                );
                return Applied::Ended;
            }
        };
        if let Some(promised) = step.persist {
            // The promise is durable before this frame takes effect; earlier
            // frames finish first, so none of them is applied after it.
            if let Err(error) = applier.drain() {
                return failed(error, "apply a change");
            }
            if let Err(error) = store_metadata(&host.metadata_path, &promised) {
                return metadata_failed(error, "store the raised epoch, generation or store state");
            }
            *host.metadata() = promised;
            tracing::info!(
                %peer,
                "stored: epoch {} promised, generation {}, store {:?}",
                promised.epoch_promised,
                promised.generation,
                promised.state
            );
        }
        let Some(consistent) = step.persist_after else {
            if let Err(error) = applier.start(step.apply, step.barrier, step.reply) {
                return failed(error, "apply a change");
            }
            continue;
        };
        // The flush that ends a resync pass: done, then recorded, then answered.
        if let Err(error) = applier.start(step.apply, true, None) {
            return failed(error, "apply a flush");
        }
        if let Err(error) = store_metadata(&host.metadata_path, &consistent) {
            return metadata_failed(error, "record the store consistent");
        }
        *host.metadata() = consistent;
        tracing::info!(%peer, "resync pass complete: the store holds a consistent image again");
        if let Err(error) = applier.start(None, false, step.reply) {
            return failed(error, "apply a change");
        }
    }
}
