//! The copy role: hold a copy of a production volume as a library service.
//! [`CopyRole::start`] opens and locks the store, proves it is the store its
//! metadata was made for, listens, and accepts the production host's
//! replication connections on a thread of its own; [`CopyRole::stop`] stops
//! accepting, lets the session finish the frame it applies, fsyncs the store
//! and joins every thread, releasing the store's lock and the listening port.
//! It installs no signal handler and keeps no process-wide state, so a
//! process may start and stop it as often as its role changes
//! (`crossmirror copy-host` is argument parsing and signals around it).
//!
//! ```text
//!  accept ─▶ admission (evict the oldest idle handshake when full) ─▶ thread per connection
//!        ─▶ handshake (Hello within 2 s, all of it within 10 s)          [connection.rs]
//!        ─▶ claim the one session slot ─▶ adopt the volume identity (fresh copy) ─▶ Accept
//!        ─▶ loop { frame ─▶ Receiver ─▶ store metadata? ─▶ Applier (io_uring) ─▶ acks in order* }   [apply.rs]
//! ```
//!
//! The decisions are in [`crate::receiver`] (pure); this module only moves
//! bytes. Handshakes may run side by side, and a new connection always gets
//! a place among them ([`crate::admission`]: the oldest one that has not sent
//! its Hello is closed to make room), so an unauthenticated peer cannot lock
//! the production host out; repeated log lines are rate-limited, so it cannot
//! fill the disk either. Only one authenticated production connection is
//! served at a time: a newer authenticated session takes over from an older
//! one, which finishes the frame it is applying and closes (a production host
//! that reconnects after a link cut need not wait for its dead connection to
//! time out here). A refused frame closes its connection; the production host
//! reconnects.
//!
//! A change that cannot be applied (above all a full store, ENOSPC) is
//! reported to the production host in an Error frame, after the acks of
//! everything applied before it, and the connection is read to its end (at
//! most ERROR_LINGER) so the report is not lost to a reset: the production
//! host then records the copy stale with that reason and backs off instead
//! of redialling and resending at once.
//!
//! Changes are applied by [`crate::applier`]: many writes in flight at once,
//! never one before an earlier write it overlaps or, when it carries the
//! BARRIER flag, before anything earlier; acks leave in arrival order once
//! their change is done, except that those behind a Flush whose fsync runs
//! may leave before its FlushAck (*protocol version 2, `applier.rs`). Reading and checking frames (socket copy, CRC) runs
//! on a helper thread ahead of the applying thread, at most PIPELINE_FRAMES
//! frames ahead; it rings the applier's doorbell (an eventfd its ring reads)
//! when the applier waits for completions.

mod apply;
mod connection;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::admission::{Admission, Ticket, HANDSHAKES_MAX};
use crate::dr_image::{journal_path, remove_journal, Image, Saved, UndoJournal};
use crate::error::EngineError;
use crate::fingerprint::fingerprint;
use crate::log_limit::LogLimit;
use crate::metadata::{
    format_uuid, load_metadata, new_store_token, refuse_metadata_in_dev, store_metadata, MetadataError, MetadataFiles,
    StoreState, VolumeMetadata,
};
use crate::protocol::auth::{VolumeIdentity, STORE_TOKEN_UNKNOWN};
use crate::protocol::Secret;
use crate::receiver::ReceiverCounters;
use crate::volume::{BackingKind, Volume, VolumeOptions};

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
/// How often blocked reads and the accept loop look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a newly authenticated session waits for the old one to stop.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Where the copy role listens for its production host.
#[derive(Debug)]
pub enum CopyListen {
    /// Bind this address at start.
    Address(SocketAddr),
    /// Accept on a socket the caller bound (a node that holds its port
    /// across role changes, or a test that picked a free port).
    Listener(TcpListener),
}

/// Everything the copy role needs.
#[derive(Debug)]
pub struct CopyRoleConfig {
    /// The store holding this host's copy; never read-only.
    pub volume: VolumeOptions,
    /// Directory for the copy's metadata file; `None`: beside a regular
    /// file, /var/lib/crossmirror for a block device.
    pub metadata_dir: Option<PathBuf>,
    /// Where the production host connects.
    pub listen: CopyListen,
    /// The secret shared with the production host.
    pub secret: Secret,
    /// At most this many bytes of before-images are kept while a resync
    /// pass runs, so that the store can be rolled back to the consistent
    /// image it held when the pass began (`crate::dr_image`); past it the
    /// way back is dropped until the pass ends. 0: keep none; `None`:
    /// [`dr_image_max_default`].
    pub dr_image_max: Option<u64>,
}

/// The default of [`CopyRoleConfig::dr_image_max`]: a quarter of the volume.
pub fn dr_image_max_default(volume_size: u64) -> u64 {
    volume_size / 4
}

/// The copy's way back to its last consistent image, while a pass runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrImage {
    /// The store is consistent (or a fresh copy): nothing to go back to.
    None,
    /// A pass runs; the store can be rolled back to the image of
    /// `generation`, taken at `taken_at_ms` (Unix ms).
    Kept {
        /// The image's generation.
        generation: u64,
        /// When the pass began.
        taken_at_ms: u64,
        /// The journal's size.
        bytes: u64,
    },
    /// A pass runs and no way back is kept: why.
    Lost(String),
}

/// What a running copy role shows (`crossmirror copy-host`'s `GET /status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRoleStatus {
    /// The store's path.
    pub volume: PathBuf,
    /// The store's size in bytes.
    pub size: u64,
    /// Where the role listens.
    pub listen: SocketAddr,
    /// The production volume this store mirrors; `None` on a fresh copy.
    pub mirrors: Option<VolumeIdentity>,
    /// Whether the store is a consistent image.
    pub store_state: StoreState,
    /// The volume generation the store holds.
    pub generation: u64,
    /// The highest fencing epoch the store has promised.
    pub epoch_promised: u64,
    /// The production host of the established session, if any.
    pub production: Option<SocketAddr>,
    /// Frames accepted after handshakes.
    pub frames_accepted: u64,
    /// Frames and handshakes refused.
    pub frames_rejected: u64,
    /// Of those, the Hellos and frames of an epoch older than the one
    /// promised: a deposed production host's traffic, refused (invariant 4).
    pub old_epoch_refused: u64,
    /// Bytes of writes accepted.
    pub write_bytes_accepted: u64,
    /// Frames the applying thread read itself while they arrived one at a
    /// time (a lone sync write at a time), each sparing a thread hand-off.
    pub frames_read_alone: u64,
    /// The way back to the last consistent image while a pass runs.
    pub dr_image: DrImage,
}

/// Why the copy role could not start, or could not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum CopyRoleError {
    /// The store could not be opened.
    #[error(transparent)]
    Volume(#[from] EngineError),
    /// The store was configured read-only.
    #[error("volume {path}: a copy is written by its production host; open it read-write")]
    ReadOnly {
        /// The store.
        path: PathBuf,
    },
    /// Another process holds the store.
    #[error("volume {path} is locked by another process (another copy host?); stop it before starting this one")]
    Locked {
        /// The store.
        path: PathBuf,
    },
    /// The store could not be locked.
    #[error("locking volume {path}: {source}")]
    Lock {
        /// The store.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The metadata file could not be read or written, or refuses the store.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// The metadata records a volume of another size.
    #[error(
        "metadata {metadata} says volume {volume} mirrors uuid {uuid} of {recorded} bytes, but the volume is \
         {actual} bytes; restore its size, or move the metadata aside to make it a fresh copy (it then needs a \
         full sync)"
    )]
    SizeMismatch {
        /// The metadata file.
        metadata: PathBuf,
        /// The store.
        volume: PathBuf,
        /// The mirrored volume's uuid.
        uuid: String,
        /// The size the metadata records.
        recorded: u64,
        /// The store's size.
        actual: u64,
    },
    /// The store's fingerprint could not be taken.
    #[error("cannot fingerprint the store {path}: {source}")]
    Fingerprint {
        /// The store.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// No store token could be drawn.
    #[error("drawing a store token: {0}")]
    StoreToken(#[source] io::Error),
    /// The listening address could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The listening socket could not be set up.
    #[error("setting the listening socket non-blocking: {0}")]
    Listener(#[source] io::Error),
    /// The accept thread could not be started.
    #[error("cannot start the copy role's accept thread: {0}; the process is out of threads or memory")]
    Thread(#[source] io::Error),
    /// The store could not be made durable at stop.
    #[error("final fsync of the volume: {0}")]
    Sync(#[source] io::Error),
}

/// What the status shows, shared by the connections and every monitor; it
/// holds no file, so a monitor never keeps the store open.
#[derive(Debug)]
struct Shown {
    volume: PathBuf,
    size: u64,
    listen: SocketAddr,
    /// The metadata as last stored; changed only by the session holder.
    metadata: Mutex<VolumeMetadata>,
    /// The production host of the established session, if any.
    session_holder: Mutex<Option<SocketAddr>>,
    counters: ReceiverCounters,
    dr_image: Mutex<DrImage>,
}

impl Shown {
    fn status(&self) -> CopyRoleStatus {
        let metadata = *self.metadata();
        CopyRoleStatus {
            volume: self.volume.clone(),
            size: self.size,
            listen: self.listen,
            mirrors: metadata.identity,
            store_state: metadata.state,
            generation: metadata.generation,
            epoch_promised: metadata.epoch_promised,
            production: *self.session_holder.lock().unwrap_or_else(PoisonError::into_inner),
            frames_accepted: self.counters.frames_accepted(),
            frames_rejected: self.counters.frames_rejected(),
            old_epoch_refused: self.counters.old_epoch_refused(),
            write_bytes_accepted: self.counters.write_bytes_accepted(),
            frames_read_alone: self.counters.frames_read_alone(),
            dr_image: self.dr_image.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    fn metadata(&self) -> MutexGuard<'_, VolumeMetadata> {
        self.metadata.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What every connection thread shares.
struct Host {
    volume: Volume,
    metadata_path: PathBuf,
    shown: Arc<Shown>,
    secret: Secret,
    /// Set by [`CopyRole::stop`]: the accept loop ends, every connection
    /// ends after the frame it is applying.
    stopping: AtomicBool,
    /// The id of the session that may run; an older one sees it change and
    /// stops, so a production host that reconnects (after a link cut, say)
    /// takes over at once instead of waiting for the dead connection to time out.
    active_session: AtomicU64,
    next_session: AtomicU64,
    /// The handshakes open, and which to close to make room.
    admission: Admission,
    /// Rate limit of log lines a peer can repeat (refusals, handshake endings).
    log_limit: LogLimit,
    /// The undo journal of the pass running, if one is kept.
    undo: Mutex<Option<UndoJournal>>,
    dr_image_max: u64,
}

impl Host {
    fn metadata(&self) -> MutexGuard<'_, VolumeMetadata> {
        self.shown.metadata()
    }

    fn show_dr_image(&self, image: DrImage) {
        *self.shown.dr_image.lock().unwrap_or_else(PoisonError::into_inner) = image;
    }

    /// A consistent store begins a pass: keep the way back to its image
    /// (before the store is recorded syncing). A failure to start the
    /// journal costs the way back, never the pass.
    fn begin_undo(&self, image_generation: u64) {
        let mut undo = self.undo.lock().unwrap_or_else(PoisonError::into_inner);
        *undo = None;
        if self.dr_image_max == 0 {
            self.show_dr_image(DrImage::Lost("keeping none (dr_image_max is 0)".to_string()));
            return;
        }
        let taken_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
        let store = self.metadata().store_token;
        let image = Image { generation: image_generation, taken_at_ms, store };
        let path = journal_path(&self.metadata_path);
        match UndoJournal::begin(&path, image, self.volume.size(), self.dr_image_max) {
            Ok(journal) => {
                self.show_dr_image(DrImage::Kept { generation: image_generation, taken_at_ms, bytes: journal.bytes() });
                *undo = Some(journal);
            }
            Err(error) => {
                tracing::error!(%error, journal = %path.display(),
                    "cannot start the undo journal: this copy keeps no consistent image until the pass ends");
                self.show_dr_image(DrImage::Lost(format!("cannot start the undo journal: {error}")));
            }
        }
    }

    /// Before a change to `len` bytes at `offset` during a pass: save the
    /// chunks it overwrites for the first time, durable once
    /// [`Host::sync_saved`] returns (call it before the change is issued).
    /// Past the limit, or when saving fails, the way back is dropped (the
    /// change goes on). Whether a journal is kept (and holds them).
    fn save_before(&self, offset: u64, len: u64) -> bool {
        let mut undo = self.undo.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(journal) = undo.as_mut() else { return false };
        let why = match journal.save_deferred(&self.volume, offset, len) {
            Ok(Saved::Kept) => {
                let image = journal.image();
                self.show_dr_image(DrImage::Kept {
                    generation: image.generation,
                    taken_at_ms: image.taken_at_ms,
                    bytes: journal.bytes(),
                });
                return true;
            }
            Ok(Saved::LimitReached) => format!("the pass changes more than dr_image_max ({} bytes)", self.dr_image_max),
            Err(error) => format!("saving a before-image failed: {error}"),
        };
        self.drop_undo(&mut undo, why);
        false
    }

    /// Make the before-images saved so far durable; when that fails, the
    /// way back is dropped (the changes go on).
    fn sync_saved(&self) {
        let mut undo = self.undo.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(journal) = undo.as_mut() else { return };
        if let Err(error) = journal.sync() {
            self.drop_undo(&mut undo, format!("saving a before-image failed: {error}"));
        }
    }

    fn drop_undo(&self, undo: &mut Option<UndoJournal>, why: String) {
        tracing::warn!("{why}: the way back to the last consistent image is dropped until the pass ends");
        if let Some(journal) = undo.take() {
            if let Err(error) = journal.discard() {
                tracing::warn!(%error, "removing the undo journal");
            }
        }
        self.show_dr_image(DrImage::Lost(why));
    }

    /// The pass ended: the store is consistent again; the way back goes.
    fn end_undo(&self) {
        let mut undo = self.undo.lock().unwrap_or_else(PoisonError::into_inner);
        let result = match undo.take() {
            Some(journal) => journal.discard(),
            None => remove_journal(&journal_path(&self.metadata_path)),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "removing the undo journal of a store consistent again");
        }
        self.show_dr_image(DrImage::None);
    }

    fn counters(&self) -> &ReceiverCounters {
        &self.shown.counters
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
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
                let mut holder = self.shown.session_holder.lock().unwrap_or_else(PoisonError::into_inner);
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
        *self.host.shown.session_holder.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// A running copy role. Stop it with [`CopyRole::stop`]; dropping it stops
/// it too (and logs a failed final fsync instead of returning it).
pub struct CopyRole {
    host: Option<Arc<Host>>,
    shown: Arc<Shown>,
    accept_thread: Option<JoinHandle<usize>>,
}

/// A view of a copy role's status that outlives the role (an admin
/// endpoint's handler holds one); it keeps no file or socket open.
#[derive(Clone)]
pub struct CopyRoleMonitor {
    shown: Arc<Shown>,
}

impl CopyRoleMonitor {
    /// The role's status; after the role stopped, its last.
    pub fn status(&self) -> CopyRoleStatus {
        self.shown.status()
    }
}

impl CopyRole {
    /// Open and lock the store, load (or draw) its metadata, listen, and
    /// start accepting the production host's connections.
    pub fn start(config: CopyRoleConfig) -> Result<CopyRole, CopyRoleError> {
        if config.volume.read_only {
            return Err(CopyRoleError::ReadOnly { path: config.volume.path });
        }
        let volume = Volume::open(&config.volume)?;
        lock_volume(&volume)?;
        let (metadata_path, metadata) = open_metadata(&volume, config.metadata_dir.as_deref())?;
        let dr_image_max = config.dr_image_max.unwrap_or_else(|| dr_image_max_default(volume.size()));
        let (undo, dr_image) = open_undo(&volume, &metadata_path, &metadata, dr_image_max);
        let listener = match config.listen {
            CopyListen::Address(address) => {
                TcpListener::bind(address).map_err(|source| CopyRoleError::Bind { address, source })?
            }
            CopyListen::Listener(listener) => listener,
        };
        listener.set_nonblocking(true).map_err(CopyRoleError::Listener)?;
        let listen = listener.local_addr().map_err(CopyRoleError::Listener)?;
        log_listening(listen, &volume, &metadata);
        let shown = Arc::new(Shown {
            volume: volume.path().to_path_buf(),
            size: volume.size(),
            listen,
            metadata: Mutex::new(metadata),
            session_holder: Mutex::new(None),
            counters: ReceiverCounters::default(),
            dr_image: Mutex::new(dr_image),
        });
        let host = Arc::new(Host {
            volume,
            metadata_path,
            shown: shown.clone(),
            secret: config.secret,
            stopping: AtomicBool::new(false),
            active_session: AtomicU64::new(0),
            next_session: AtomicU64::new(1),
            admission: Admission::default(),
            log_limit: LogLimit::new(LOG_INTERVAL, LOG_LINES_PER_INTERVAL),
            undo: Mutex::new(undo),
            dr_image_max,
        });
        let accepting = host.clone();
        let accept_thread = std::thread::Builder::new()
            .name("copy-accept".to_string())
            .spawn(move || accept_until_stopped(&accepting, listener))
            .map_err(CopyRoleError::Thread)?;
        Ok(CopyRole { host: Some(host), shown, accept_thread: Some(accept_thread) })
    }

    /// What the role holds and has received so far.
    pub fn status(&self) -> CopyRoleStatus {
        self.shown.status()
    }

    /// A status view for another thread (an admin endpoint).
    pub fn monitor(&self) -> CopyRoleMonitor {
        CopyRoleMonitor { shown: self.shown.clone() }
    }

    /// Stop: stop accepting (the port is free once this returns), let the
    /// session finish the frame it is applying, fsync the store, close it
    /// (its lock goes with it) and join every thread.
    pub fn stop(mut self) -> Result<(), CopyRoleError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), CopyRoleError> {
        let Some(host) = self.host.take() else { return Ok(()) };
        host.stopping.store(true, Ordering::Relaxed);
        if let Some(thread) = self.accept_thread.take() {
            // The accept thread joins the connection threads before it ends.
            if thread.join().is_err() {
                tracing::error!("the copy role's accept thread panicked");
            }
        }
        let synced = host.volume.sync_all().map_err(CopyRoleError::Sync);
        let counters = host.counters();
        tracing::info!(
            frames_accepted = counters.frames_accepted(),
            frames_rejected = counters.frames_rejected(),
            old_epoch_refused = counters.old_epoch_refused(),
            "volume synced; copy host stopped"
        );
        // Every thread that shared the host has been joined: dropping the
        // last reference closes the store and releases its lock now.
        assert_eq!(Arc::strong_count(&host), 1, "a copy role thread outlived stop");
        drop(host);
        synced
    }
}

impl Drop for CopyRole {
    fn drop(&mut self) {
        if let Err(error) = self.shut_down() {
            tracing::error!("stopping the copy role: {error}");
        }
    }
}

/// The role's first log line: where it listens and what the store holds.
fn log_listening(listen: SocketAddr, volume: &Volume, metadata: &VolumeMetadata) {
    let mirrors = match metadata.identity {
        Some(identity) => format!("uuid {} ({} bytes)", format_uuid(&identity.uuid), identity.size_bytes),
        None => "nothing yet (fresh copy)".to_string(),
    };
    tracing::info!(
        %listen,
        volume = %volume.path().display(),
        size = volume.size(),
        direct = volume.is_direct(),
        state = ?metadata.state,
        generation = metadata.generation,
        epoch_promised = metadata.epoch_promised,
        "copy host listening; the volume mirrors {mirrors}"
    );
}

/// Load the copy's metadata, and prove the store is the one it was made
/// for (invariant 9): a store whose fingerprint changed (a new blank file,
/// another disk, a restored file) gets a new store token and is marked
/// syncing, so the production host resyncs it in full instead of trusting
/// its bitmap. A fresh copy draws its token here too.
fn open_metadata(volume: &Volume, metadata_dir: Option<&Path>) -> Result<(PathBuf, VolumeMetadata), CopyRoleError> {
    let path = volume.path();
    let block_device = volume.kind() == BackingKind::BlockDevice;
    let files = MetadataFiles::locate(path, block_device, metadata_dir);
    refuse_metadata_in_dev(path, block_device, metadata_dir, &files)?;
    files.create_directory()?;
    let metadata_path = files.metadata;
    let mut metadata = load_metadata(&metadata_path)?.unwrap_or_else(VolumeMetadata::fresh);
    if let Some(identity) = metadata.identity {
        if identity.size_bytes != volume.size() {
            return Err(CopyRoleError::SizeMismatch {
                metadata: metadata_path,
                volume: path.to_path_buf(),
                uuid: format_uuid(&identity.uuid),
                recorded: identity.size_bytes,
                actual: volume.size(),
            });
        }
    }
    let store = fingerprint(path).map_err(|source| CopyRoleError::Fingerprint { path: path.to_path_buf(), source })?;
    if metadata.store_token != STORE_TOKEN_UNKNOWN && metadata.store_fingerprint == store.value {
        return Ok((metadata_path, metadata));
    }
    if metadata.identity.is_some() {
        tracing::warn!(
            volume = %path.display(),
            "the store {} is not the one {} was made for (now: {}); it gets a new store token and a full resync",
            path.display(),
            metadata_path.display(),
            store.description
        );
    }
    metadata.store_token = new_store_token().map_err(CopyRoleError::StoreToken)?;
    metadata.store_fingerprint = store.value;
    metadata.state = StoreState::Syncing;
    if metadata.identity.is_some() {
        store_metadata(&metadata_path, &metadata)?;
    }
    Ok((metadata_path, metadata))
}

/// The undo journal as the role starts: a pass interrupted by a restart
/// carries on with its journal; a journal left by a store that is
/// consistent again (a crash between the two) is removed.
fn open_undo(
    volume: &Volume,
    metadata_path: &Path,
    metadata: &VolumeMetadata,
    limit: u64,
) -> (Option<UndoJournal>, DrImage) {
    let path = journal_path(metadata_path);
    if !path.exists() {
        return match metadata.state {
            StoreState::Syncing if metadata.identity.is_some() => {
                (None, DrImage::Lost("the pass began with no way back kept".to_string()))
            }
            _ => (None, DrImage::None),
        };
    }
    if metadata.state != StoreState::Syncing {
        if let Err(error) = remove_journal(&path) {
            tracing::warn!(%error, journal = %path.display(), "cannot remove the undo journal of a consistent store");
        }
        return (None, DrImage::None);
    }
    match UndoJournal::resume(&path, volume.size(), limit) {
        Ok(journal) if journal.image().store != metadata.store_token => {
            // The store was replaced (a new token was drawn for it): the
            // journal holds another store's chunks.
            tracing::warn!(journal = %path.display(),
                "the undo journal was kept for another store (this one was replaced): removed");
            if let Err(error) = journal.discard() {
                tracing::warn!(%error, "removing the undo journal of another store");
            }
            (None, DrImage::Lost("the store was replaced mid-pass: its way back is gone".to_string()))
        }
        Ok(journal) => {
            let image = journal.image();
            tracing::info!(journal = %path.display(), generation = image.generation,
                "the store is in the middle of a resync pass; its way back to the consistent image of \
                 generation {} is kept ({})", image.generation, path.display());
            let kept =
                DrImage::Kept { generation: image.generation, taken_at_ms: image.taken_at_ms, bytes: journal.bytes() };
            (Some(journal), kept)
        }
        Err(error) => {
            tracing::error!(%error, "the undo journal cannot be read: this copy keeps no consistent image until its pass ends");
            (None, DrImage::Lost(format!("the undo journal cannot be read: {error}")))
        }
    }
}

/// Take an exclusive lock on the volume, so two copy hosts never apply
/// frames to one store, nor a production host serve it meanwhile. The lock
/// goes with the open file.
fn lock_volume(volume: &Volume) -> Result<(), CopyRoleError> {
    let path = volume.path().to_path_buf();
    match volume.try_lock_exclusive() {
        Ok(true) => Ok(()),
        Ok(false) => Err(CopyRoleError::Locked { path }),
        Err(source) => Err(CopyRoleError::Lock { path, source }),
    }
}

/// Accept connections until the role stops, then join every connection
/// thread; returns how many there were at the end. The listener is closed
/// when this returns.
fn accept_until_stopped(host: &Arc<Host>, listener: TcpListener) -> usize {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !host.stopping() {
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
        let connection_host = host.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("copy-{peer}"))
            .spawn(move || connection::serve_connection(&connection_host, stream, peer));
        match spawned {
            Ok(thread) => threads.push(thread),
            Err(error) => tracing::error!(%error, %peer, "could not start a connection thread"),
        }
    }
    drop(listener);
    let connections = threads.len();
    tracing::info!(connections, "shutting down: finishing the frame being applied");
    for thread in threads {
        if thread.join().is_err() {
            tracing::error!("a copy role connection thread panicked");
        }
    }
    connections
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::FrameHeader;

    fn config(path: &Path, read_only: bool) -> CopyRoleConfig {
        CopyRoleConfig {
            volume: VolumeOptions { path: path.to_path_buf(), size: Some(1 << 20), direct: false, read_only },
            metadata_dir: None,
            listen: CopyListen::Address(SocketAddr::from(([127, 0, 0, 1], 0))),
            secret: Secret::from_bytes(b"copy role unit test secret 32 b!".to_vec()).unwrap(),
            dr_image_max: None,
        }
    }

    /// A node handing a store from one role to the next: a second role on
    /// a store another one holds is refused with a kind to branch on, and
    /// starts as soon as the first one stopped.
    #[test]
    fn a_store_held_by_a_role_is_refused_until_that_role_stops() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("copy.img");
        let first = CopyRole::start(config(&path, false)).unwrap();
        let refused = CopyRole::start(config(&path, false)).err().expect("the store is held");
        assert!(matches!(refused, CopyRoleError::Locked { .. }), "{refused:?}");
        assert!(refused.to_string().contains("locked by another process"), "{refused}");
        first.stop().unwrap();
        let second = CopyRole::start(config(&path, false)).expect("the store is free after stop");
        assert_eq!(second.status().volume, path);
        assert_eq!(second.status().store_state, StoreState::Syncing, "a fresh copy needs a full sync");
        second.stop().unwrap();
    }

    /// A deposed production host's traffic is counted apart (invariant 4):
    /// a Hello and a data frame of an epoch older than the copy's promise
    /// each count once in `old_epoch_refused` (and in `frames_rejected`); a
    /// refusal of another kind (a frame of another session) only in
    /// `frames_rejected`.
    #[test]
    fn refused_old_epoch_hellos_and_frames_are_counted_apart() {
        use crate::protocol::error::ReplicationError;
        use crate::protocol::frame::{Frame, FrameFlags, FrameKind};
        use crate::replicator::connect::CopyConnection;

        let directory = tempfile::tempdir().unwrap();
        let config = config(&directory.path().join("copy.img"), false);
        let secret = config.secret.clone();
        let role = CopyRole::start(config).unwrap();
        let address = role.status().listen;
        let identity = VolumeIdentity { uuid: [7; 16], size_bytes: 1 << 20 };
        let timeout = Duration::from_secs(5);
        let connect = |epoch| CopyConnection::connect_from(address, None, epoch, &secret, identity, timeout, timeout);
        let write = |connection: &mut CopyConnection, epoch, change: fn(&mut FrameHeader)| {
            let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, epoch);
            header.length = 4096;
            header.payload_len = 4096;
            change(&mut header);
            connection.send(&header, &[0x5a; 4096]).and_then(|()| connection.receive())
        };
        let acked = |answer: Result<Frame, ReplicationError>| answer.map(|frame| frame.header.kind);
        let counted = |role: &CopyRole| (role.status().frames_rejected, role.status().old_epoch_refused);

        // The production host of epoch 3 writes: the copy promises epoch 3.
        let mut current = connect(3).unwrap();
        assert_eq!(acked(write(&mut current, 3, |_| {})).unwrap(), FrameKind::WriteAck);
        assert_eq!(role.status().epoch_promised, 3);
        assert_eq!(counted(&role), (0, 0));
        // The deposed host of epoch 2 is refused at its Hello.
        let deposed = connect(2);
        assert!(matches!(deposed, Err(ReplicationError::Deposed { epoch: 2 })), "{deposed:?}");
        assert_eq!(counted(&role), (1, 1));
        // A frame of epoch 2 inside a session of epoch 3.
        let mut session = connect(3).unwrap();
        assert!(acked(write(&mut session, 2, |_| {})).is_err(), "an old-epoch frame was acknowledged");
        assert_eq!(counted(&role), (2, 2));
        // A frame of another session: refused, but not old-epoch traffic.
        let mut session = connect(3).unwrap();
        assert!(
            acked(write(&mut session, 3, |header| header.session ^= 1)).is_err(),
            "a foreign frame was acknowledged"
        );
        assert_eq!(counted(&role), (3, 2));
        role.stop().unwrap();
    }

    /// Invariant 4 from the handshake on: once a copy accepted the Hello of
    /// epoch 3, a Hello of epoch 2 is refused, even before any frame of the
    /// epoch-3 session arrived (a deposed host that dials in that moment
    /// must not take the session over and apply old-epoch frames), and the
    /// promise is on disk.
    #[test]
    fn an_accepted_hello_is_a_promise_before_any_frame() {
        use crate::metadata::load_metadata;
        use crate::protocol::error::ReplicationError;
        use crate::replicator::connect::CopyConnection;

        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("copy.img");
        let config = config(&path, false);
        let secret = config.secret.clone();
        let role = CopyRole::start(config).unwrap();
        let address = role.status().listen;
        let identity = VolumeIdentity { uuid: [9; 16], size_bytes: 1 << 20 };
        let timeout = Duration::from_secs(5);
        let connect = |epoch| CopyConnection::connect_from(address, None, epoch, &secret, identity, timeout, timeout);
        let _newer = connect(3).unwrap();
        assert_eq!(role.status().epoch_promised, 3, "the Accept of epoch 3 is a promise");
        let stored = load_metadata(&MetadataFiles::locate(&path, false, None).metadata).unwrap().unwrap();
        assert_eq!(stored.epoch_promised, 3, "the promise is stored before the Accept");
        let deposed = connect(2);
        assert!(matches!(deposed, Err(ReplicationError::Deposed { epoch: 2 })), "{deposed:?}");
        assert_eq!(role.status().old_epoch_refused, 1);
        role.stop().unwrap();
    }

    /// A copy is written by its production host: a read-only store is refused before it is opened.
    #[test]
    fn a_read_only_store_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("copy.img");
        let refused = CopyRole::start(config(&path, true)).err().expect("read-only is refused");
        assert!(matches!(refused, CopyRoleError::ReadOnly { .. }), "{refused:?}");
        assert!(!path.exists(), "nothing was created");
    }
}
