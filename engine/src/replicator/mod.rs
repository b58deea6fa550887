//! The production side of mirroring: ship every change of the volume to each
//! copy host, wait for the sync copies, track what each copy misses in the
//! write-intent bitmap, and resync it.
//!
//! ```text
//!  NBD write ─▶ begin_write (bitmap mark, durable) ─▶ local write (io_uring) ─▶ ship ─┬─▶ link "east" (sync)  ─TCP─▶ copy host
//!                                                                                    └─▶ link "west" (async) ─TCP─▶ copy host
//!  reply ◀── Completions (eventfd) ◀── every sync copy acknowledged (or was durably recorded stale)
//! ```
//!
//! Ordering: a change is shipped only after its local write completed, and
//! every link sends in the order changes were shipped. A write acknowledged
//! to the client before another was issued was therefore shipped before it.
//! A copy applies many writes at once (`engine::applier`) but never one
//! before an earlier write it overlaps, and never one marked BARRIER before
//! everything earlier: an async link marks a frame BARRIER when any change
//! was released to the client since its last barrier, which covers every
//! write acknowledged before this one was issued. A sync link needs no
//! barrier: its own acknowledgement gates the client's, so such a write had
//! been applied on the copy already. Copies stay crash-consistent (DESIGN.md
//! §4, invariant 5). Overlapping writes are serialised by the volume's range
//! locks, which the frontend holds until the change is shipped, so every
//! copy sees them in the order the local store did.
//!
//! Resync reads a region from the local store and queues it under the
//! link's lock, the same lock `ship` queues under. A write to that region
//! either completed before the read (the read sees it) or is shipped after
//! the resync data (and overwrites it on the copy): resync never puts back
//! older data over a newer write. The same holds for the parts of a region
//! sent as zeroes (ResyncZeroes, which keep a thin copy thin): the hole
//! lookup (SEEK_DATA) and the zero check are that read, made under
//! that lock, so a write that lands in a hole after the lookup is shipped
//! after the zeroes and overwrites them on the copy.
//!
//! The bitmap: every write marks its regions in every copy's slot before it
//! is issued. A copy's bit is cleared when a Flush sent after the region's
//! last write to that copy is acknowledged and no write to the region is in
//! flight or was shipped since (see `link_core.rs`). A write a link drops (the
//! copy is disconnected or too far behind) keeps its bit and stops every
//! pending clear of that link, so the bitmap over-approximates (invariant 6).
//!
//! Mirror state: a copy that misses a write is recorded `stale` through the
//! [`MirrorStateStore`] before any write it missed is acknowledged
//! (invariant 3); it becomes `current` again when a resync pass and the flush
//! after it are acknowledged.

pub mod connect;
mod link;
mod link_core;
mod local_sync;
mod resync_controller;
mod resync_pieces;
mod resync_set;
pub mod state;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::bitmap::{BitmapError, PendingMarks, WriteIntentBitmap};
use crate::buffer::SharedBytes;
use crate::eventfd::EventFd;
use crate::metadata::StoreState;
use crate::protocol::auth::{StoreToken, VolumeIdentity, STORE_TOKEN_UNKNOWN};
use crate::protocol::Secret;
use crate::volume::Volume;

use link::Link;
pub use link::{CopyState, CopyStatus, RecoveryPoint, ACK_TIMEOUT, LOCAL_SYNC_INTERVAL_DEFAULT};
use local_sync::LocalSync;
pub use state::{CopyRecord, LocalStateFile, MirrorStateStore, RecordedState, StateError, StateErrorKind};

/// The default lag bound of an async copy in bytes (`lag_bytes_max`).
pub const LAG_BYTES_MAX_DEFAULT: u64 = 64 << 20;
/// The default lag bound of an async copy in time (`lag_seconds_max`):
/// 4 s, under the 5 s [`ACK_TIMEOUT`]: at any link rate, a copy's queue
/// holds at most about 4 s of link time when it goes `behind` (64 MiB alone
/// is 5.4 s at 100 Mbit/s and 54 s at 10 Mbit/s).
pub const LAG_MS_MAX_DEFAULT: u64 = 4_000;

/// Parse an async copy's `lag_seconds_max`: seconds, a decimal fraction
/// allowed (`2.5`), at most an hour; `0` means no bound in time. Returns
/// milliseconds.
pub fn parse_lag_seconds(text: &str) -> Result<u64, String> {
    let seconds: f64 =
        text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds (like 4 or 0.5)"))?;
    if !seconds.is_finite() || !(0.0..=3600.0).contains(&seconds) {
        return Err(format!("{text:?}: use 0 (no bound) to 3600 seconds"));
    }
    let ms = (seconds * 1000.0).round() as u64;
    if seconds > 0.0 && ms == 0 {
        return Err(format!("{text:?}: at least 0.001 seconds, or 0 for no bound"));
    }
    Ok(ms)
}

/// How a copy's acknowledgement gates the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MirrorMode {
    /// A write is acknowledged once this copy has it too.
    #[default]
    Sync,
    /// A write is acknowledged after the local write; the copy lags by at
    /// most `lag_bytes_max` before it goes `behind` and is resynced.
    Async,
}

impl MirrorMode {
    /// The mode's name on the command line and in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            MirrorMode::Sync => "sync",
            MirrorMode::Async => "async",
        }
    }
}

impl fmt::Display for MirrorMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// One copy, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyConfig {
    /// A short name: letters, digits, `-` and `_`.
    pub name: String,
    /// The copy host's replication address; `None` while the copy's site
    /// has no host (the group layer sets it with
    /// [`Replicator::set_copy_address`] when one joins).
    pub address: Option<SocketAddr>,
    /// Sync or async.
    pub mode: MirrorMode,
    /// Async only: bytes shipped but not yet acknowledged before the copy
    /// goes `behind`.
    pub lag_bytes_max: u64,
    /// Async only: how old (milliseconds) the oldest unacknowledged write
    /// may be before the copy goes `behind` (the lag in link time, whatever
    /// the link's rate); 0: no bound in time.
    pub lag_ms_max: u64,
    /// How its data frames are compressed (when the copy host says it
    /// decompresses, and only frames that get smaller).
    pub compress: crate::protocol::Compression,
}

/// Everything the replicator needs besides the volume and its bitmap.
#[derive(Debug)]
pub struct ReplicatorConfig {
    /// The copies, at most the bitmap's slot count.
    pub copies: Vec<CopyConfig>,
    /// The secret shared with every copy host.
    pub secret: Secret,
    /// The volume's identity, offered in every handshake.
    pub identity: VolumeIdentity,
    /// The volume's generation, carried by every frame.
    pub generation: u64,
    /// The fencing epoch, carried by every frame.
    pub epoch: u64,
    /// Resync bytes per second per copy; 0 means unlimited.
    pub resync_rate_max: u64,
    /// Resync by checksum: compare each dirty region's chunk checksums with
    /// the copy's first and send only the chunks that differ.
    pub resync_checksums: bool,
    /// Skip the resync of a copy when both stores provably read as zeroes
    /// throughout (sparse files with no data extents on both sides).
    pub assume_clean: bool,
    /// The production volume's metadata file: a failed local flush is
    /// recorded there, so a restart does not serve the store again.
    pub metadata_path: Option<PathBuf>,
    /// At most how often the local volume is fsynced so that bits can clear
    /// ([`LOCAL_SYNC_INTERVAL_DEFAULT`]; tests shorten it to drive the
    /// clearing rule without waiting).
    pub local_sync_interval: Duration,
    /// The address to connect to copy hosts from; `None`: the system picks.
    pub source_address: Option<std::net::IpAddr>,
    /// Where the mirror state says which host last produced (a group's
    /// record), the bitmap is trusted for a copy only when it tracked that
    /// copy at the copy's recorded generation (see [`BitmapTrust`]).
    pub bitmap_trust: BitmapTrust,
}

/// How far the bitmap is trusted when the production role starts.
///
/// `serve` keeps one production host per volume: its bitmap has tracked
/// every write to the store since the copies' states were recorded
/// (`Always`). In a group the production role moves between hosts, and a
/// host's bitmap knows only the writes that host made: a copy's recorded
/// generation names the production era its state was recorded in, and the
/// bitmap records the generation it last started in, so a copy recorded in
/// another host's era gets every bit set (a full resync) unless the record
/// proves the two stores identical as this era begins (a clean hand-over).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BitmapTrust {
    /// Trust the bitmap for every copy (one production host per volume).
    #[default]
    Always,
    /// Trust it for a copy recorded at the bitmap's own generation; clear
    /// the bits of the copies named here, whose stores the record shows
    /// identical to this one as this generation starts (once: only when the
    /// bitmap has not started at this generation before).
    ByGeneration {
        /// The record's generation: the production era starting now.
        generation: u64,
        /// Copies identical to the production store as this era begins.
        identical: Vec<String>,
    },
}

/// As a group's production role starts at `generation`: trust the bitmap
/// for `record`'s copy, clear its slot (a copy identical to the store as
/// this era begins), or set every bit of it (a copy recorded in another
/// host's era: this bitmap does not know what it lacks). The record then
/// carries this generation: from here on this bitmap tracks the copy.
fn judge_bitmap(
    bitmap: &WriteIntentBitmap,
    bitmap_generation: u64,
    generation: u64,
    record: &mut CopyRecord,
    identical: &[String],
) {
    let slot = record.slot;
    if identical.contains(&record.name) && bitmap_generation < generation {
        bitmap.clear_range(slot, 0, bitmap.volume_size());
        tracing::info!(
            copy = %record.name,
            generation,
            "copy {}: the record shows its store identical to this one as generation {generation} starts \
             (a clean hand-over); only what is written from now on is resynced",
            record.name
        );
    } else if record.generation != bitmap_generation && bitmap_generation != generation {
        bitmap.set_all(slot);
        tracing::info!(
            copy = %record.name,
            recorded = record.generation,
            bitmap = bitmap_generation,
            "copy {}: its state was recorded at generation {}, which this host's bitmap did not track \
             (it last produced at generation {bitmap_generation}): it gets a full resync",
            record.name,
            record.generation
        );
    }
    record.generation = generation;
}

/// A change to ship, after its local write completed.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// `data` was written at `offset`.
    Write {
        /// Volume offset in bytes.
        offset: u64,
        /// The bytes written.
        data: &'a [u8],
        /// Force unit access: durable on the copies before their ack.
        fua: bool,
    },
    /// `length` bytes at `offset` were trimmed.
    Trim {
        /// Volume offset in bytes.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// Durable on the copies before their ack.
        fua: bool,
    },
    /// `length` bytes at `offset` were zeroed.
    WriteZeroes {
        /// Volume offset in bytes.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// Durable on the copies before their ack.
        fua: bool,
    },
    /// Make everything shipped so far durable on every copy.
    Flush,
}

impl Change<'_> {
    /// The extent the change touches; `None` for a flush.
    fn extent(&self) -> Option<(u64, u64)> {
        match *self {
            Change::Write { offset, data, .. } => Some((offset, data.len() as u64)),
            Change::Trim { offset, length, .. } | Change::WriteZeroes { offset, length, .. } => Some((offset, length)),
            Change::Flush => None,
        }
    }
}

/// What an online verify found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The copy compared.
    pub copy: String,
    /// Bytes compared (the whole volume).
    pub bytes_compared: u64,
    /// The byte ranges (offset, length) whose checksums differ.
    pub mismatches: Vec<(u64, u64)>,
    /// Whether a resync of the mismatching ranges was started.
    pub repaired: bool,
}

/// Why an online verify did not run or did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No copy has that name.
    #[error("there is no copy named {name:?}; the copies are: {}", copies.join(", "))]
    UnknownCopy {
        /// The name asked for.
        name: String,
        /// The configured copies' names.
        copies: Vec<String>,
    },
    /// The copy is not up to date, so there is nothing to compare yet.
    #[error("copy {copy} is {state}{}; verify compares an up_to_date copy only: wait until `crossmirror status` shows it up_to_date",
        last_error.as_ref().map(|error| format!(" ({error})")).unwrap_or_default())]
    NotUpToDate {
        /// The copy.
        copy: String,
        /// Its state as status shows it.
        state: &'static str,
        /// Why it is not up to date, when known.
        last_error: Option<String>,
    },
    /// Writes to an extent never paused long enough to compare it.
    #[error("verify of copy {copy} did not finish: {message}")]
    Busy {
        /// The copy.
        copy: String,
        /// Which extent, and what to do.
        message: String,
    },
    /// The copy stopped answering (its connection was lost) during verify.
    #[error("verify of copy {copy} did not finish: {message}")]
    CopyLost {
        /// The copy.
        copy: String,
        /// What went unanswered, and where to look.
        message: String,
    },
    /// Reading the local store failed.
    #[error("verify of copy {copy} did not finish: {message}")]
    Io {
        /// The copy.
        copy: String,
        /// What was being read, and the operating system's error.
        message: String,
    },
    /// The mismatches were found but their resync could not be started.
    #[error("verify of copy {copy} found mismatches but could not start their repair: {message}")]
    RepairFailed {
        /// The copy.
        copy: String,
        /// Why (a bitmap sync or a mirror-state record failed).
        message: String,
    },
}

impl VerifyError {
    /// The copy the verify was about, when there is one.
    pub fn copy(&self) -> Option<&str> {
        match self {
            VerifyError::UnknownCopy { .. } => None,
            VerifyError::NotUpToDate { copy, .. }
            | VerifyError::Busy { copy, .. }
            | VerifyError::CopyLost { copy, .. }
            | VerifyError::Io { copy, .. }
            | VerifyError::RepairFailed { copy, .. } => Some(copy),
        }
    }
}

/// Whether a shipped change may be acknowledged now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shipped {
    /// Now, with this result (0 or a negative errno).
    Done(i32),
    /// Later: its id arrives through the [`Completions`] it was shipped with.
    Pending,
}

/// Where shipped changes that waited for copies are reported: a queue and an
/// eventfd that an event loop (an io_uring read) waits on.
#[derive(Debug)]
pub struct Completions {
    eventfd: EventFd,
    done: Mutex<Vec<(u64, i32)>>,
}

impl Completions {
    /// A new, empty queue with its eventfd.
    pub fn new() -> std::io::Result<Arc<Completions>> {
        Ok(Arc::new(Completions { eventfd: EventFd::new()?, done: Mutex::new(Vec::new()) }))
    }

    /// The eventfd; readable (an 8-byte counter) when completions are queued.
    pub fn fd(&self) -> RawFd {
        self.eventfd.fd()
    }

    /// Move every queued completion (id, result) into `out`. Read the
    /// eventfd before: a completion queued behind others signals nothing.
    pub fn take(&self, out: &mut Vec<(u64, i32)>) {
        out.append(&mut self.done.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Queue a completion, and make the eventfd readable if the queue was
    /// empty. A completion queued behind others needs no signal of its own
    /// (a write to the eventfd per write was a system call, and a wake-up of
    /// the event loop, per acknowledged write): the signal that made the
    /// queue non-empty is still pending, or was read and the queue not yet
    /// taken, and the consumer always reads the eventfd before it takes the
    /// whole queue, which then holds this one too.
    fn push(&self, id: u64, result: i32) {
        let was_empty = {
            let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
            done.push((id, result));
            done.len() == 1
        };
        if was_empty {
            self.eventfd.signal();
        }
    }
}

/// One shipped change that sync copies must acknowledge: counts the links
/// still holding it; the last one reports it.
#[derive(Debug)]
pub(crate) struct Ticket {
    remaining: AtomicUsize,
    result: AtomicI32,
    completions: Arc<Completions>,
    id: u64,
    /// [`Shared::released`], bumped when this change may be acknowledged.
    released: Arc<AtomicU64>,
}

impl Ticket {
    /// This holder is done with it; `result` is 0 or a negative errno.
    pub(crate) fn release(&self, result: i32) {
        if result != 0 {
            self.result.store(result, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.released.fetch_add(1, Ordering::SeqCst);
            self.completions.push(self.id, self.result.load(Ordering::Relaxed));
        }
    }
}

/// What the replicator and its links share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) volume: Arc<Volume>,
    pub(crate) bitmap: Arc<WriteIntentBitmap>,
    pub(crate) secret: Secret,
    pub(crate) identity: VolumeIdentity,
    pub(crate) generation: u64,
    pub(crate) epoch: u64,
    pub(crate) resync_rate_max: u64,
    pub(crate) resync_checksums: bool,
    pub(crate) assume_clean: bool,
    pub(crate) local_sync_interval: Duration,
    /// The volume's background fsyncs that let bits clear.
    pub(crate) local_sync: Arc<LocalSync>,
    pub(crate) source_address: Option<std::net::IpAddr>,
    /// Per region: writes marked whose change is not shipped yet. A region
    /// with writes in flight is never cleared.
    pub(crate) inflight: Mutex<HashMap<u64, u32>>,
    /// Changes released to be acknowledged to the client so far. A link
    /// that sees it grow between two frames marks the later one a barrier
    /// (see `link_core.rs`).
    pub(crate) released: Arc<AtomicU64>,
    store: Arc<dyn MirrorStateStore>,
    records: Mutex<Vec<CopyRecord>>,
    pub(crate) shutdown: AtomicBool,
    /// Why the local store failed, once it has (see [`Replicator::local_flush_failed`]).
    /// Set once and never cleared, so every read and write can look at it
    /// without a lock.
    local_failure: OnceLock<String>,
    /// A copy host refused this host's epoch: another production host took
    /// over (set once; the group layer fences this host on it).
    deposed: OnceLock<String>,
    metadata_path: Option<PathBuf>,
}

impl Shared {
    pub(crate) fn inflight(&self) -> MutexGuard<'_, HashMap<u64, u32>> {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record `state` for the copy in `slot`, durably, with why (kept with
    /// a change of state only).
    pub(crate) fn record(&self, slot: u32, state: RecordedState, reason: Option<String>) -> Result<(), StateError> {
        self.update_record(slot, |record| {
            if record.state != state {
                record.state = state;
                record.reason = reason;
            }
        })
    }

    /// Change the record of the copy in `slot` and store every record; an
    /// unchanged record is not stored again, a failed store leaves the
    /// record as it was.
    fn update_record(&self, slot: u32, change: impl FnOnce(&mut CopyRecord)) -> Result<(), StateError> {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let index = records.iter().position(|record| record.slot == slot).expect("every link has a record");
        let before = records[index].clone();
        change(&mut records[index]);
        if records[index] == before {
            return Ok(());
        }
        let result = self.store.store(&records);
        if result.is_err() {
            records[index] = before;
        }
        result
    }

    /// The local store failed a flush (a client's, or the background sync
    /// that lets bits clear): see [`Replicator::local_flush_failed`]. The
    /// first failure is kept and recorded; later ones change nothing.
    pub(crate) fn fail_local_store(&self, why: &str) {
        if self.local_failure.set(why.to_string()).is_err() {
            return;
        }
        tracing::error!(
            volume = %self.volume.path().display(),
            "{why}: writes acknowledged before it may be missing on {} while its copies hold them. \
             This host now answers every request with EIO. Stop it and fail over to a current copy \
             (or check the store and restart with --new-store: every copy is then resynced from it)",
            self.volume.path().display()
        );
        let Some(path) = &self.metadata_path else { return };
        let recorded = crate::metadata::load_metadata(path).and_then(|metadata| {
            let metadata = metadata.unwrap_or_else(crate::metadata::VolumeMetadata::fresh);
            // A new token too: a record naming this store's old token as
            // identical to a copy (a hand-over) no longer describes it.
            let store_token = crate::metadata::new_store_token().unwrap_or(STORE_TOKEN_UNKNOWN);
            crate::metadata::store_metadata(
                path,
                &crate::metadata::VolumeMetadata { state: StoreState::Failed, store_token, ..metadata },
            )
        });
        if let Err(error) = recorded {
            tracing::error!(%error, "cannot record the local store's failure in its metadata; do not restart this host on it");
        }
    }

    /// Why the local store failed, if it has.
    pub(crate) fn local_failure(&self) -> Option<String> {
        self.local_failure.get().cloned()
    }

    /// The store token recorded for the copy in `slot`.
    pub(crate) fn recorded_store(&self, slot: u32) -> StoreToken {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        records.iter().find(|record| record.slot == slot).expect("every link has a record").store
    }

    /// Record `store` as the token of the copy store in `slot`, durably.
    /// The caller has made that copy's every bit set and durable first.
    pub(crate) fn record_store(&self, slot: u32, store: StoreToken) -> Result<(), StateError> {
        self.update_record(slot, |record| record.store = store)
    }

    /// The regions `len` bytes at `offset` touch (the bitmap's arithmetic).
    pub(crate) fn regions(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        self.bitmap.regions(offset, len)
    }
}

/// The production host's replicator: one link per copy.
pub struct Replicator {
    shared: Arc<Shared>,
    links: Vec<Arc<Link>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for Replicator {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("Replicator").field("copies", &self.links.len()).finish()
    }
}

/// Why a write cannot begin.
#[derive(Debug, thiserror::Error)]
pub enum WriteRefused {
    /// The bitmap mark could not be made durable.
    #[error("cannot mark the write-intent bitmap: {0}")]
    Bitmap(BitmapError),
    /// The local store failed earlier; nothing more is written to it.
    #[error("the local store failed earlier: {0}")]
    LocalStoreFailed(String),
}

/// Why the replicator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// More copies than the bitmap has slots.
    #[error("{configured} copies configured, but the bitmap {bitmap} has {slots} slots")]
    TooManyCopies {
        /// Copies configured.
        configured: usize,
        /// The bitmap's slots.
        slots: u32,
        /// The bitmap file.
        bitmap: PathBuf,
    },
    /// The mirror state names a slot the bitmap does not have.
    #[error("the mirror state puts copy {copy} in bitmap slot {slot}, but the bitmap has {slots} slots")]
    SlotOutOfRange {
        /// The copy.
        copy: String,
        /// The slot recorded for it.
        slot: u32,
        /// The bitmap's slots.
        slots: u32,
    },
    /// The volume could not be opened again to watch its writeback errors.
    #[error("cannot open the volume {} again to watch its writeback errors: {source}", path.display())]
    WatchVolume {
        /// The volume.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A link thread could not be started.
    #[error("cannot start the link thread of copy {copy}: {source}")]
    Thread {
        /// The copy.
        copy: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The mirror state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The bitmap could not be flushed.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
}

impl Replicator {
    /// Start replicating `volume` to the configured copies. Every copy is
    /// recorded `stale` durably before this returns (none is connected yet,
    /// so none has the writes to come); a copy the state store has never
    /// seen gets a bitmap slot with every bit set (a full initial sync).
    pub fn start(
        volume: Arc<Volume>,
        bitmap: Arc<WriteIntentBitmap>,
        store: Arc<dyn MirrorStateStore>,
        config: ReplicatorConfig,
    ) -> Result<Arc<Replicator>, StartError> {
        let slots = bitmap.slots();
        if config.copies.len() > slots as usize {
            return Err(StartError::TooManyCopies {
                configured: config.copies.len(),
                slots,
                bitmap: bitmap.path().to_path_buf(),
            });
        }
        let mut records = store.load()?;
        records.retain(|record| config.copies.iter().any(|copy| copy.name == record.name));
        let bitmap_generation = bitmap.generation();
        let mut assigned = Vec::new();
        for copy in &config.copies {
            if let Some(record) = records.iter_mut().find(|record| record.name == copy.name) {
                if record.slot >= slots {
                    return Err(StartError::SlotOutOfRange { copy: copy.name.clone(), slot: record.slot, slots });
                }
                if let BitmapTrust::ByGeneration { generation, identical } = &config.bitmap_trust {
                    judge_bitmap(&bitmap, bitmap_generation, *generation, record, identical);
                }
                if record.state != RecordedState::Stale {
                    record.state = RecordedState::Stale;
                    record.reason =
                        Some("the production host started: resynced from its bitmap when it connects".to_string());
                }
                assigned.push(record.slot);
                continue;
            }
            let slot = (0..slots)
                .find(|slot| !records.iter().any(|record| record.slot == *slot))
                .expect("fewer copies than slots");
            bitmap.set_all(slot);
            tracing::info!(copy = %copy.name, slot, "new copy {}: it gets a full initial sync", copy.name);
            records.push(CopyRecord {
                name: copy.name.clone(),
                slot,
                state: RecordedState::Stale,
                generation: match &config.bitmap_trust {
                    BitmapTrust::ByGeneration { generation, .. } => *generation,
                    BitmapTrust::Always => config.generation,
                },
                store: STORE_TOKEN_UNKNOWN,
                reason: Some("a new copy: it gets a full initial sync".to_string()),
            });
            assigned.push(slot);
        }
        if let BitmapTrust::ByGeneration { generation, .. } = &config.bitmap_trust {
            bitmap.set_generation(*generation);
        }
        if !assigned.is_empty() {
            // Writes mark the configured copies' slots only; a copy that
            // takes another slot later is new, and gets it set whole.
            bitmap.set_marked_slots(&assigned);
        }
        bitmap.flush()?;
        store.store(&records)?;
        let shared = Arc::new(Shared {
            volume,
            bitmap,
            secret: config.secret,
            identity: config.identity,
            generation: config.generation,
            epoch: config.epoch,
            resync_rate_max: config.resync_rate_max,
            resync_checksums: config.resync_checksums,
            assume_clean: config.assume_clean,
            local_sync_interval: config.local_sync_interval,
            local_sync: Arc::new(LocalSync::new()),
            source_address: config.source_address,
            inflight: Mutex::new(HashMap::new()),
            released: Arc::new(AtomicU64::new(0)),
            store,
            records: Mutex::new(records),
            shutdown: AtomicBool::new(false),
            local_failure: OnceLock::new(),
            deposed: OnceLock::new(),
            metadata_path: config.metadata_path,
        });
        let links: Vec<Arc<Link>> = config
            .copies
            .into_iter()
            .zip(assigned)
            .map(|(copy, slot)| Arc::new(Link::new(copy, slot, shared.clone())))
            .collect();
        let mut threads = Vec::new();
        let syncing = shared.clone();
        // Its own file: a check through the volume's could take a
        // writeback error from a client's FLUSH (see `WritebackWatch`).
        let watch = crate::volume::WritebackWatch::open(&shared.volume)
            .map_err(|source| StartError::WatchVolume { path: shared.volume.path().to_path_buf(), source })?;
        let thread = std::thread::Builder::new()
            .name("local-sync".to_string())
            .spawn(move || {
                syncing.local_sync.run(
                    || syncing.volume.sync_all(),
                    || watch.check(),
                    crate::replicator::local_sync::CHECK_INTERVAL,
                    |error| {
                        syncing.fail_local_store(&format!(
                            "a background fsync or writeback of the local store failed ({error})"
                        ))
                    },
                )
            })
            .map_err(|source| StartError::Thread { copy: "local-sync".to_string(), source })?;
        threads.push(thread);
        // The activity log's transactions are written by the connection
        // whose batch needs one (`commit_writes`), whatever the copies' modes:
        // its next batch grows while it waits. Writer threads with the
        // connections serving meanwhile were slower: 4k random writes over
        // 1 TiB, one sync copy, 36.7-40.7k IOPS against 51.4-56.8k; one async
        // copy, 61.7-63.7k against 65.6-69.0k (benches/RESULTS.md, ninth session).
        for link in &links {
            let copy = link.name().to_string();
            let running = link.clone();
            let thread = std::thread::Builder::new()
                .name(format!("link-{copy}"))
                .spawn(move || running.run())
                .map_err(|source| StartError::Thread { copy, source })?;
            threads.push(thread);
        }
        Ok(Arc::new(Replicator { shared, links, threads: Mutex::new(threads) }))
    }

    /// Before a write-like change is issued locally: mark its regions in the
    /// bitmap, durably, and count it in flight. Every call is followed by
    /// exactly one [`Replicator::ship`] or [`Replicator::abandon`] of the same
    /// extent.
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<(), WriteRefused> {
        let mut pending = PendingMarks::default();
        self.begin_write_batched(offset, len, &mut pending)?;
        if let Err(error) = self.commit_writes(&mut pending) {
            self.abandon(offset, len);
            return Err(error);
        }
        Ok(())
    }

    /// [`Replicator::begin_write`] for a batch: mark the regions and count
    /// the write in flight, noting in `pending` what must be made durable;
    /// [`Replicator::commit_writes`] then does that once for the whole
    /// batch, before any of its writes is issued. A refusal here needs no
    /// `abandon`; a write begun here is followed by exactly one
    /// `completed`, `failed` or `abandon` like any other.
    pub fn begin_write_batched(&self, offset: u64, len: u64, pending: &mut PendingMarks) -> Result<(), WriteRefused> {
        if let Some(why) = self.shared.local_failure.get() {
            return Err(WriteRefused::LocalStoreFailed(why.clone()));
        }
        {
            let mut inflight = self.shared.inflight();
            for region in self.shared.regions(offset, len) {
                *inflight.entry(region).or_insert(0) += 1;
            }
        }
        self.shared.bitmap.mark_write(offset, len, pending);
        Ok(())
    }

    /// Whether a change begun here may be issued: its marks are durable
    /// ([`WriteIntentBitmap::marks_durable`]). For checks.
    pub fn marks_durable(&self, offset: u64, len: u64) -> bool {
        self.shared.bitmap.marks_durable(offset, len)
    }

    /// Make the marks of a batch begun with
    /// [`Replicator::begin_write_batched`] durable (one activity-log
    /// transaction or bitmap sync for all of them). On an error none of
    /// the batch may be issued: the caller abandons each write.
    pub fn commit_writes(&self, pending: &mut PendingMarks) -> Result<(), WriteRefused> {
        self.shared.bitmap.commit(pending).map_err(WriteRefused::Bitmap)
    }

    /// The local store failed a flush (an fsync returned `errno`): writes
    /// already acknowledged may be missing from it, while the sync copies
    /// hold them (page-cache writeback lost them; a later fsync would not
    /// even report it again). The policy, like DRBD's `on-io-error` but
    /// fail-stop, since this host cannot serve from a copy: the store is
    /// failed for good. Every later request gets EIO (the frontend asks
    /// [`Replicator::local_failure`]), every copy's state reads `diverged`,
    /// and the failure is recorded in the volume's metadata so a restart
    /// refuses to serve the store. The operator fails over to a current
    /// copy, or checks the store and starts it with `--new-store`.
    pub fn local_flush_failed(&self, errno: i32) {
        let error = std::io::Error::from_raw_os_error(errno);
        self.shared.fail_local_store(&format!("a flush of the local store failed ({error})"));
    }

    /// Why this host was deposed, once a copy host refused its epoch
    /// (it promised a higher one: another production host took over).
    pub fn deposed(&self) -> Option<String> {
        self.shared.deposed.get().cloned()
    }

    /// Why the local store failed, once a flush of it has.
    pub fn local_failure(&self) -> Option<String> {
        self.shared.local_failure()
    }

    /// The local write of an extent begun with [`Replicator::begin_write`]
    /// was never issued: nothing is shipped; its regions stay marked.
    pub fn abandon(&self, offset: u64, len: u64) {
        self.end_inflight(offset, len);
    }

    /// The local write of an extent begun with [`Replicator::begin_write`]
    /// failed after it may have changed the local store: nothing is shipped,
    /// and every copy resyncs the extent's regions.
    pub fn abandon_changed(&self, offset: u64, len: u64) {
        for link in &self.links {
            link.missed(offset, len);
        }
        self.end_inflight(offset, len);
    }

    /// Ship a change whose local part completed. For a write-like change
    /// this ends its in-flight count (the caller still holds its range
    /// lock). Returns whether it may be acknowledged now or must wait for
    /// `id` on `completions`.
    pub fn ship(&self, change: Change<'_>, completions: &Arc<Completions>, id: u64) -> Shipped {
        self.ship_shared(change, None, completions, id)
    }

    /// [`Replicator::ship`] of a write whose bytes `data` already holds (the
    /// caller's own buffer, lent to the copies: no copy is made). `data`
    /// holds exactly the bytes of `change`.
    pub fn ship_shared(
        &self,
        change: Change<'_>,
        data: Option<SharedBytes>,
        completions: &Arc<Completions>,
        id: u64,
    ) -> Shipped {
        let ticket = Arc::new(Ticket {
            remaining: AtomicUsize::new(1),
            result: AtomicI32::new(0),
            completions: completions.clone(),
            id,
            released: self.shared.released.clone(),
        });
        // A write's data is copied once, by the first link that queues it,
        // and not at all while no copy takes it (all disconnected or behind),
        // or when the caller lent its buffer.
        debug_assert!(match (&change, &data) {
            (Change::Write { data: bytes, .. }, Some(shared)) => std::ptr::eq((**shared).as_ref(), *bytes),
            _ => data.is_none(),
        });
        let mut payload = data;
        for link in &self.links {
            link.ship(&change, &mut payload, &ticket);
        }
        if let Some((offset, len)) = change.extent() {
            self.end_inflight(offset, len);
        }
        // Release our own hold; if the links are all done already, answer now.
        if ticket.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.released.fetch_add(1, Ordering::SeqCst);
            return Shipped::Done(ticket.result.load(Ordering::Relaxed));
        }
        Shipped::Pending
    }

    fn end_inflight(&self, offset: u64, len: u64) {
        let mut inflight = self.shared.inflight();
        for region in self.shared.regions(offset, len) {
            if let Some(count) = inflight.get_mut(&region) {
                *count -= 1;
                if *count == 0 {
                    inflight.remove(&region);
                }
            }
        }
    }

    /// Online verify of the copy `name`: compare the checksums of every
    /// region with the copy's while the volume stays in use; with `repair`,
    /// resync the regions that differ.
    pub fn verify(&self, name: &str, repair: bool) -> Result<VerifyReport, VerifyError> {
        let link = self.links.iter().find(|link| link.name() == name).ok_or_else(|| VerifyError::UnknownCopy {
            name: name.to_string(),
            copies: self.links.iter().map(|link| link.name().to_string()).collect(),
        })?;
        let size = self.shared.volume.size();
        let step = self.shared.bitmap.region_bytes().max(crate::verify::CHUNK_BYTES);
        let mut mismatches = Vec::new();
        let mut offset = 0;
        while offset < size {
            let length = step.min(size - offset);
            mismatches.extend(link.verify_extent(offset, length)?);
            offset += length;
        }
        tracing::info!(copy = name, mismatches = mismatches.len(), "verify of copy {name} compared {size} bytes");
        let repaired = repair && !mismatches.is_empty();
        if repaired {
            link.repair(&mismatches)
                .map_err(|message| VerifyError::RepairFailed { copy: name.to_string(), message })?;
        }
        Ok(VerifyReport { copy: name.to_string(), bytes_compared: size, mismatches, repaired })
    }

    /// Point the copy `name` at another host (`None`: its site has no host
    /// now). A connection to the old address is closed; the new one is
    /// tried at once and resynced from the bitmap. Whether `name` is a copy.
    pub fn set_copy_address(&self, name: &str, address: Option<SocketAddr>) -> bool {
        match self.links.iter().find(|link| link.name() == name) {
            Some(link) => {
                link.set_address(address);
                true
            }
            None => false,
        }
    }

    /// Every copy's status, in configuration order.
    pub fn status(&self) -> Vec<CopyStatus> {
        self.links.iter().map(|link| link.status()).collect()
    }

    /// The bitmap's region size in bytes.
    pub fn region_bytes(&self) -> u64 {
        self.shared.bitmap.region_bytes()
    }

    /// The activity log's geometry and counters (none with `--activity-log 0`).
    pub fn activity_log_stats(&self) -> Option<crate::activity_log::ActivityLogStats> {
        self.shared.bitmap.activity_log().map(crate::activity_log::ActivityLog::stats)
    }

    /// Stop every link: connections close, queued changes are dropped (their
    /// copies are already recorded stale), threads are joined, the bitmap
    /// is written out.
    pub fn stop(&self) {
        // Every copy that follows every write is flushed first: a buffered
        // copy acknowledges from its page cache, and only a copy that has
        // every acknowledged write durably keeps a current record.
        let deadline = std::time::Instant::now() + ACK_TIMEOUT;
        for link in &self.links {
            link.flush_for_stop(deadline);
        }
        self.shared.shutdown.store(true, Ordering::Relaxed);
        self.shared.local_sync.stop();
        for link in &self.links {
            link.wake_all();
        }
        for thread in std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner)) {
            let _ = thread.join();
        }
        // A clean close empties the activity log, and bits of regions the
        // log kept may have cleared before those regions were durable here
        // (`WriteIntentBitmap::retained_by_log`): the volume is made durable
        // first. A store that failed a sync (this one, the NBD server's
        // final one, a client's flush: the kernel reports a writeback error
        // to one fsync only) may have lost writes whose bits cleared: its
        // bitmap stays open and its log kept, and the store is recorded
        // failed (a restart refuses it; `--new-store` resyncs every copy).
        if self.shared.bitmap.log_keeps_every_extent() {
            if let Err(error) = self.shared.volume.sync_all() {
                self.shared.fail_local_store(&format!("the fsync of the local store at stop failed ({error})"));
            }
        }
        if let Some(why) = self.shared.local_failure() {
            tracing::warn!("the bitmap is left open and the activity log kept: {why}");
            return;
        }
        if let Err(error) = self.shared.bitmap.close_clean() {
            tracing::warn!(%error, "could not write the bitmap out on shutdown; the next start resyncs a little more");
        }
    }
}

#[cfg(test)]
mod bitmap_trust_tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn record(name: &str, slot: u32, generation: u64) -> CopyRecord {
        CopyRecord {
            name: name.to_string(),
            slot,
            state: RecordedState::Current,
            generation,
            store: [7; 16],
            reason: None,
        }
    }

    /// A group's production role starting at generation 5 on a bitmap that
    /// last started at generation 3: a copy recorded at 3 keeps its bits
    /// (this bitmap tracked it), one recorded at 4 (another host's era) gets
    /// every bit, one the record shows identical gets none; a second start
    /// at 5 (the same era, the same bitmap) changes nothing.
    #[test]
    fn a_group_bitmap_is_trusted_only_for_copies_of_its_own_era() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = WriteIntentBitmap::open_or_create(&directory.path().join("v.cmbitmap"), 8 * MIB, MIB, 3).unwrap();
        bitmap.set_generation(3);
        for slot in 0..3 {
            bitmap.set_range(slot, 2 * MIB, MIB);
        }
        let identical = vec!["handed-over".to_string()];
        let mut own = record("own", 0, 3);
        let mut other = record("other-era", 1, 4);
        let mut handed = record("handed-over", 2, 4);
        for copy in [&mut own, &mut other, &mut handed] {
            judge_bitmap(&bitmap, 3, 5, copy, &identical);
        }
        assert_eq!(bitmap.dirty_bytes(0), MIB, "tracked by this bitmap: kept as is");
        assert_eq!(bitmap.dirty_bytes(1), 8 * MIB, "another host's era: a full resync");
        assert_eq!(bitmap.dirty_bytes(2), 0, "identical as this era starts: only new writes");
        assert!([&own, &other, &handed].iter().all(|copy| copy.generation == 5));
        // Written meanwhile, then the role restarts in the same era.
        bitmap.set_range(2, 0, MIB);
        let mut again = record("handed-over", 2, 5);
        judge_bitmap(&bitmap, 5, 5, &mut again, &identical);
        assert_eq!(bitmap.dirty_bytes(2), MIB, "a restart in the same era clears nothing");
        let mut crashed_before_recording = record("other-era", 1, 4);
        bitmap.clear_range(1, 0, 8 * MIB);
        bitmap.set_range(1, 0, MIB);
        judge_bitmap(&bitmap, 5, 5, &mut crashed_before_recording, &identical);
        assert_eq!(bitmap.dirty_bytes(1), MIB, "judged already in this era (the record write was lost)");
    }
}

#[cfg(test)]
mod completions_tests {
    use super::*;

    /// The eventfd's counter, read as the connection's event loop reads it
    /// (which resets it); 0 when it is not readable.
    fn read_counter(completions: &Completions) -> u64 {
        let mut counter = 0u64;
        let mut poll = libc::pollfd { fd: completions.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of our own, no timeout.
        if unsafe { libc::poll(&mut poll, 1, 0) } != 1 {
            return 0;
        }
        // SAFETY: reads 8 bytes into a live u64 from our own eventfd.
        let read = unsafe { libc::read(completions.fd(), (&mut counter as *mut u64).cast(), 8) };
        assert_eq!(read, 8);
        counter
    }

    /// One signal per queue that became non-empty, not one per completion,
    /// and none lost: a completion queued after the consumer read the
    /// eventfd but before it took the queue is taken with the rest; one
    /// queued after the take signals again.
    #[test]
    fn a_completion_queued_behind_others_signals_nothing_and_is_not_lost() {
        let completions = Completions::new().unwrap();
        completions.push(1, 0);
        completions.push(2, 0);
        completions.push(3, -5);
        assert_eq!(read_counter(&completions), 1, "one signal for three completions");
        // Read, then queued before the take: no signal, and taken.
        completions.push(4, 0);
        assert_eq!(read_counter(&completions), 0);
        let mut taken = Vec::new();
        completions.take(&mut taken);
        assert_eq!(taken, vec![(1, 0), (2, 0), (3, -5), (4, 0)]);
        completions.push(5, 0);
        assert_eq!(read_counter(&completions), 1, "the queue was empty again: signalled");
        taken.clear();
        completions.take(&mut taken);
        assert_eq!(taken, vec![(5, 0)]);
    }
}
