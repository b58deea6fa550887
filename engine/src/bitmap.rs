//! The persistent write-intent bitmap: which regions of the volume may differ
//! between the production copy and each mirror copy (DESIGN.md §3, invariant 6).
//!
//! ```text
//!  write(offset, len) ──▶ mark ──▶ flush (one msync for a batch) ──▶ issue the data write
//!  copy has the region durably ──▶ clear(slot, region)
//!  (re)connect ──▶ dirty_regions(slot) drives the resync
//! ```
//!
//! The bitmap lives in a file next to the volume (`<volume>.cmbitmap`),
//! memory-mapped with `memmap2`:
//!
//! ```text
//!  offset size field         meaning
//!       0    8 magic         "CMBITMAP"
//!       8    4 version       2
//!      12    4 slots         copy slots, 1 to 8
//!      16    8 volume_size   bytes
//!      24    8 region_bytes  bytes per bit, a power of two
//!      32    8 generation    the volume's generation
//!      40    4 state         1 open (in use, or its process died), 2 closed cleanly
//!      44    4 body_crc      CRC32 of every slot word; meaningful when closed
//!      48    4 crc           CRC32 of bytes 0..48
//!      52      zero up to 4096
//!    4096      slot 0 words, then slot 1 words, …
//! ```
//!
//! The header is little-endian and its CRC32 covers bytes 0..48. Each slot (one
//! per mirror copy, up to [`SLOTS_MAX`]) is an array of little-endian `u64`
//! words, one bit per region of `region_bytes`; bits past the last region stay
//! zero. A set bit means "this copy may differ here". Marking sets the bit in
//! every slot, since every copy must receive the write; each copy's bit is
//! cleared separately when that copy has the region durably.
//!
//! Concurrency: the words are read and written as `AtomicU64`s in the shared
//! mapping. Marking a region whose bits are all set already and durable — the
//! common case for a hot region — is a few lock-free loads. Setting bits and
//! writing the header happen under one mutex and are numbered; each word
//! remembers (in memory only) the number of the last change that set bits in
//! it, and the flush records the highest number its msync carried. A mark
//! that finds its bits set asks for a flush only if the change that set them
//! is newer than that. Because the flush reads the change count under the
//! same mutex, every change it counts has finished its stores before the
//! msync starts. Concurrent writers therefore share one msync (group commit)
//! instead of each paying for their own, and a mark never returns "durable"
//! for a bit another thread set but has not yet flushed.
//!
//! Damage (DESIGN.md §4, invariant 9). A zeroed or flipped body would read
//! as "this copy misses nothing", so the body's meaning is protected, not
//! only the header's:
//! - The file is fully allocated (`posix_fallocate`) when it is created and
//!   again when it is opened, so a store into the mapping on a full
//!   filesystem can never raise SIGBUS: a full disk is an error at start.
//! - Opening marks the header `open` (durably, before the first mark); a
//!   clean close ([`WriteIntentBitmap::close_clean`]) writes the body's CRC
//!   and marks it `closed`. A closed bitmap whose body fails its CRC was
//!   damaged while nobody held it: every bit of every slot is set (a full
//!   resync of every copy) and [`WriteIntentBitmap::opened`] says so.
//! - A bitmap found `open` belongs to a process that died; its body is
//!   trusted as the marks it made durable. Damage done to the file while
//!   it was in that state cannot be told from those marks (the body changes
//!   with every write, so no checksum can cover it while in use); the
//!   README says so.
//! - A missing bitmap is created with every bit clear; the replicator sets
//!   every slot of a copy it already knows (see `Replicator::start`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use memmap2::MmapRaw;

use crate::activity_log::{self, ActivityLog, CommitError, Found};

/// The suffix appended to a volume's path to name its bitmap file.
pub const BITMAP_FILE_SUFFIX: &str = ".cmbitmap";
/// The default region size: 256 KiB, one bit per 256 KiB of volume (chosen by
/// measurement, see benches/RESULTS.md: 64 KiB regions churn bits under
/// random writes, and every re-marked region costs an msync).
pub const REGION_BYTES_DEFAULT: u64 = 256 << 10;
/// The most regions the default region size gives a volume: 4 Mi regions,
/// a 512 KiB bitmap per copy slot.
pub const DEFAULT_REGIONS_MAX: u64 = 1 << 22;

/// The default region size for a volume of `volume_size` bytes:
/// [`REGION_BYTES_DEFAULT`], or the smallest power of two that keeps the
/// volume within [`DEFAULT_REGIONS_MAX`] regions (so the bitmap stays at most
/// 512 KiB per slot: 1 TiB keeps 256 KiB regions, 4 TiB gets 1 MiB), at most
/// 16 MiB (a resync frame carries one region).
pub fn region_bytes_for(volume_size: u64) -> u64 {
    volume_size.div_ceil(DEFAULT_REGIONS_MAX).next_power_of_two().clamp(REGION_BYTES_DEFAULT, 16 << 20)
}

/// The region size recorded in the bitmap file at `path`, when there is a
/// readable one (its header is checked when it is opened).
pub fn recorded_region_bytes(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut header, 0).ok()?;
    parse_header(path, &header).ok().map(|header| header.geometry.region_bytes)
}

/// The smallest region size: one page.
pub const REGION_BYTES_MIN: u64 = 4 << 10;
/// The largest region size.
pub const REGION_BYTES_MAX: u64 = 1 << 30;
/// The most copy slots a bitmap holds.
pub const SLOTS_MAX: u32 = 8;
/// The most regions a volume may have (512 MiB of bits per slot).
pub const REGIONS_MAX: u64 = 1 << 32;

const MAGIC: [u8; 8] = *b"CMBITMAP";
const VERSION: u32 = 2;
/// The header takes one page, so the words that follow are page-aligned.
const HEADER_BYTES: usize = 4096;
const GENERATION_OFFSET: usize = 32;
const STATE_OFFSET: usize = 40;
const BODY_CRC_OFFSET: usize = 44;
const HEADER_CRC_OFFSET: usize = 48;
/// The bytes of the header that are written as one (inside the first
/// 512-byte sector, which disks write whole).
const HEADER_USED_BYTES: usize = HEADER_CRC_OFFSET + 4;
const STATE_OPEN: u32 = 1;
const STATE_CLOSED: u32 = 2;

/// How a bitmap was found when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// There was no file; a new one was made with every bit clear.
    Created,
    /// The file was closed cleanly and its body matched its CRC.
    Clean,
    /// The file was still marked open: its process died. The body holds
    /// every mark that process made durable.
    AfterCrash,
    /// The file was closed cleanly but its body fails its CRC: it was
    /// damaged. Every bit of every slot was set (every copy resyncs in full).
    Damaged,
}
const BITS_PER_WORD: u64 = 64;

/// What went wrong with a bitmap, for callers that choose a reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapErrorKind {
    /// The parameters asked for cannot be (region size, slots, volume size).
    Config,
    /// The file was made for another volume geometry.
    Mismatch,
    /// The file is damaged.
    Corrupt,
    /// Another process holds the bitmap.
    Busy,
    /// The operating system refused an operation.
    Io,
}

/// A bitmap error: says what happened, to which file, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The parameters asked for cannot be.
    #[error("bitmap {path}: {message}")]
    Config {
        /// The bitmap file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The file's header disagrees with the volume it is opened for.
    #[error("bitmap {path}: {message}")]
    Mismatch {
        /// The bitmap file.
        path: PathBuf,
        /// Both geometries and what to do.
        message: String,
    },
    /// The file is damaged.
    #[error("bitmap {path}: {message}; move it aside to start over (every copy then needs a full resync)")]
    Corrupt {
        /// The bitmap file.
        path: PathBuf,
        /// What is damaged.
        message: String,
    },
    /// Another process holds the file's lock.
    #[error("bitmap {path} is in use by another process; stop it before starting this one")]
    Busy {
        /// The bitmap file.
        path: PathBuf,
    },
    /// The activity log could not be read, written or trusted.
    #[error("activity log {path}: {message}")]
    ActivityLog {
        /// The log file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An operating-system call failed.
    #[error("bitmap {path}: {action}: {source}")]
    Io {
        /// The bitmap file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl BitmapError {
    /// The kind of this error.
    pub fn kind(&self) -> BitmapErrorKind {
        match self {
            BitmapError::Config { .. } => BitmapErrorKind::Config,
            BitmapError::Mismatch { .. } => BitmapErrorKind::Mismatch,
            BitmapError::Corrupt { .. } => BitmapErrorKind::Corrupt,
            BitmapError::Busy { .. } => BitmapErrorKind::Busy,
            BitmapError::Io { .. } | BitmapError::ActivityLog { .. } => BitmapErrorKind::Io,
        }
    }
}

/// The geometry a bitmap file records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    volume_size: u64,
    region_bytes: u64,
    slots: u32,
}

impl Geometry {
    fn region_count(&self) -> u64 {
        self.volume_size.div_ceil(self.region_bytes)
    }

    fn words_per_slot(&self) -> usize {
        self.region_count().div_ceil(BITS_PER_WORD) as usize
    }

    fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + u64::from(self.slots) * self.words_per_slot() as u64 * 8
    }

    fn check(&self, path: &Path) -> Result<(), BitmapError> {
        let refuse = |message: String| BitmapError::Config { path: path.to_path_buf(), message };
        if self.volume_size == 0 {
            return Err(refuse("the volume size is 0; a mirrored volume needs at least one byte".into()));
        }
        if !self.region_bytes.is_power_of_two() || !(REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&self.region_bytes) {
            return Err(refuse(format!(
                "region size {} bytes is not a power of two from {REGION_BYTES_MIN} to {REGION_BYTES_MAX}",
                self.region_bytes
            )));
        }
        if !(1..=SLOTS_MAX).contains(&self.slots) {
            return Err(refuse(format!("{} copy slots asked for; a bitmap holds 1 to {SLOTS_MAX}", self.slots)));
        }
        if self.region_count() > REGIONS_MAX {
            return Err(refuse(format!(
                "a {}-byte volume has {} regions of {} bytes, over the limit of {REGIONS_MAX}; use larger regions",
                self.volume_size,
                self.region_count(),
                self.region_bytes
            )));
        }
        Ok(())
    }

    fn header(&self, generation: u64, state: u32, body_crc: u32) -> [u8; HEADER_BYTES] {
        let mut header = [0u8; HEADER_BYTES];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&self.slots.to_le_bytes());
        header[16..24].copy_from_slice(&self.volume_size.to_le_bytes());
        header[24..32].copy_from_slice(&self.region_bytes.to_le_bytes());
        header[GENERATION_OFFSET..GENERATION_OFFSET + 8].copy_from_slice(&generation.to_le_bytes());
        header[STATE_OFFSET..STATE_OFFSET + 4].copy_from_slice(&state.to_le_bytes());
        header[BODY_CRC_OFFSET..BODY_CRC_OFFSET + 4].copy_from_slice(&body_crc.to_le_bytes());
        let crc = crc32fast::hash(&header[..HEADER_CRC_OFFSET]);
        header[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        header
    }
}

/// What a header records.
#[derive(Debug, Clone, Copy)]
struct Header {
    geometry: Geometry,
    generation: u64,
    state: u32,
    body_crc: u32,
}

/// Read a header, or say why it is unusable.
fn parse_header(path: &Path, header: &[u8; HEADER_BYTES]) -> Result<Header, BitmapError> {
    let corrupt = |message: String| BitmapError::Corrupt { path: path.to_path_buf(), message };
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    if header[0..8] != MAGIC {
        return Err(corrupt("is not a crossmirror bitmap (bad magic)".into()));
    }
    let carried = u32_at(HEADER_CRC_OFFSET);
    let computed = crc32fast::hash(&header[..HEADER_CRC_OFFSET]);
    if carried != computed {
        return Err(corrupt(format!("header fails its CRC (carried {carried:#010x}, computed {computed:#010x})")));
    }
    if u32_at(8) != VERSION {
        return Err(BitmapError::Mismatch {
            path: path.to_path_buf(),
            message: format!(
                "was written by bitmap version {}, this build reads version {VERSION}; run the release that wrote it, \
                 or move it aside (every copy then gets a full resync)",
                u32_at(8)
            ),
        });
    }
    let geometry = Geometry { slots: u32_at(12), volume_size: u64_at(16), region_bytes: u64_at(24) };
    geometry.check(path).map_err(|error| corrupt(format!("header is invalid: {error}")))?;
    let state = u32_at(STATE_OFFSET);
    if state != STATE_OPEN && state != STATE_CLOSED {
        return Err(corrupt(format!("header names an unknown state {state}")));
    }
    if header[HEADER_USED_BYTES..].iter().any(|byte| *byte != 0) {
        return Err(corrupt("header has non-zero reserved bytes".into()));
    }
    Ok(Header { geometry, generation: u64_at(GENERATION_OFFSET), state, body_crc: u32_at(BODY_CRC_OFFSET) })
}

/// The write-intent bitmap of one volume, shared by every thread that
/// writes, replicates or resyncs it (all methods take `&self`).
///
/// Besides the mapping it keeps one in-memory change stamp per word of a
/// slot, 1/`slots` of the bitmap's own size. Dropping it does not msync:
/// marks were made durable by their flushes, and clears not yet written
/// cost only some extra resync. Call [`WriteIntentBitmap::close_clean`] for a
/// clean close that keeps the clears too.
#[derive(Debug)]
pub struct WriteIntentBitmap {
    path: PathBuf,
    geometry: Geometry,
    region_shift: u32,
    words_per_slot: usize,
    /// The shared mapping of the whole file; never resized while mapped.
    map: MmapRaw,
    /// Holds the exclusive `flock` for as long as the bitmap is open.
    _file: File,
    /// Taken to set bits or write the header. Counts the bit-setting and
    /// header changes made so far; a change's number is taken before its
    /// stores, inside the same critical section.
    changes: Mutex<u64>,
    /// The change count, readable without the lock.
    changes_seen: AtomicU64,
    /// Per word index within a slot: the number of the last change that set
    /// bits in that word of any slot. Stored before the bits themselves.
    word_changes: Box<[AtomicU64]>,
    /// Serialises msyncs.
    flush_lock: Mutex<()>,
    /// Every change up to this count is durable.
    changes_durable: AtomicU64,
    /// How the file was found at open.
    opened: Opened,
    /// Whether the header says `closed` (after [`WriteIntentBitmap::close_clean`]);
    /// the next change marks it `open` again first.
    closed: AtomicBool,
    /// The slots that writes mark (bit `slot` set): those of the copies
    /// configured now; every slot until [`WriteIntentBitmap::set_marked_slots`].
    marked_slots: AtomicU32,
    /// The activity log, when one is attached: writes' marks are then made
    /// durable through it, and the bits themselves lazily.
    activity_log: Option<ActivityLog>,
    /// Debug builds: the bits a power cut would leave set, for
    /// [`WriteIntentBitmap::marks_durable`].
    #[cfg(debug_assertions)]
    carried: Mutex<Carried>,
}

/// The bits the file holds for sure (debug builds): those an msync carried
/// and no clear touched since. The word stamps cannot say this per bit: a
/// newer mark of another region of the same word makes an old, durable bit
/// read as not durable.
#[cfg(debug_assertions)]
#[derive(Debug)]
struct Carried {
    /// Every word of every slot, as [`WriteIntentBitmap::words`] lays them out.
    bits: Vec<u64>,
    /// The words as the msync under way found them (read under the change
    /// lock, so exactly the changes it covers); clears take their bits out
    /// of it too. Added to `bits` once the msync succeeds.
    flushing: Option<Vec<u64>>,
}

/// The marks of a batch of writes not yet made durable: collected by
/// [`WriteIntentBitmap::mark_write`], made durable at once by
/// [`WriteIntentBitmap::commit`].
#[derive(Debug, Default)]
pub struct PendingMarks {
    /// The bitmap must be synced (no activity log).
    flush: bool,
    /// Activity-log extents that must be logged.
    extents: Vec<u64>,
}

impl PendingMarks {
    /// Whether nothing needs to be made durable.
    pub fn is_empty(&self) -> bool {
        !self.flush && self.extents.is_empty()
    }
}

/// What attaching an activity log found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogRecovery {
    /// The log listed this many extents; their regions were set dirty in
    /// every slot.
    Extents(usize),
    /// There was no log and the bitmap was open (its process died): every
    /// region of every slot was set dirty.
    MissingAfterCrash,
    /// There was no log; the bitmap was closed cleanly or new: nothing to do.
    Missing,
    /// Neither block of the log was whole: every region of every slot was
    /// set dirty.
    Damaged,
}

/// What a bitmap made by [`WriteIntentBitmap::open_or_create_with`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewBits {
    /// Every bit clear: no copy differs (a volume with no copies yet).
    Clear,
    /// Every region's bit set in every slot: every copy may differ
    /// everywhere. A mirrored volume uses this, so a bitmap that went
    /// missing can never be recreated as "nothing to resync", even when the
    /// process dies before it records anything else.
    Set,
}

impl WriteIntentBitmap {
    /// Open the bitmap at `path`, or create it with every bit clear when the
    /// file does not exist. An existing file must record exactly this volume
    /// size, region size and slot count. Another process holding the file is
    /// refused.
    ///
    /// A new bitmap says no copy differs: a caller that creates one for a
    /// volume that already holds data must [`WriteIntentBitmap::set_all`]
    /// (and flush) before relying on it.
    pub fn open_or_create(
        path: &Path,
        volume_size: u64,
        region_bytes: u64,
        slots: u32,
    ) -> Result<WriteIntentBitmap, BitmapError> {
        WriteIntentBitmap::open_or_create_with(path, volume_size, region_bytes, slots, NewBits::Clear)
    }

    /// [`WriteIntentBitmap::open_or_create`], with a new file's bits as `new_bits` says.
    pub fn open_or_create_with(
        path: &Path,
        volume_size: u64,
        region_bytes: u64,
        slots: u32,
        new_bits: NewBits,
    ) -> Result<WriteIntentBitmap, BitmapError> {
        let geometry = Geometry { volume_size, region_bytes, slots };
        geometry.check(path)?;
        let created = !path.exists();
        if created {
            create(path, &geometry, new_bits)?;
        }
        let mut bitmap = open(path, geometry)?;
        if created {
            bitmap.opened = Opened::Created;
        }
        Ok(bitmap)
    }

    /// How the file was found when it was opened.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    /// Close cleanly: write every change out, with the body's CRC in a
    /// header marked `closed`, so the next open can tell a damaged body.
    /// Call it once every writer and link has stopped; a change made after
    /// it marks the header `open` again (and a change racing it at worst
    /// makes the next open see damage and resync every copy in full).
    pub fn close_clean(&self) -> Result<(), BitmapError> {
        let _flushing = self.flush_lock.lock().unwrap_or_else(PoisonError::into_inner);
        let changes = self.lock_changes();
        let body_crc = self.body_crc();
        self.write_header(self.read_generation(), STATE_CLOSED, body_crc);
        self.closed.store(true, Ordering::Release);
        self.msync_covering(changes)?;
        if let Some(log) = &self.activity_log {
            // Every bit is durable now: the log's extents add nothing.
            log.clear().map_err(|error| self.log_error(log, error.to_string()))?;
        }
        Ok(())
    }

    /// Attach the activity log at `path` (`<volume>.cmal`), holding up to
    /// `capacity` extents of `extent_bytes` (a power of two, at least the
    /// region size), and recover from it first: every extent the log lists
    /// is set dirty in every slot, a log that is missing after a crash or
    /// damaged sets every bit of every slot, and that is made durable
    /// before a new, empty log replaces the old. From then on
    /// [`WriteIntentBitmap::commit`] makes marks durable through the log.
    ///
    /// With `capacity` 0 no log is used; one left by an earlier run is
    /// still recovered from, then removed.
    pub fn attach_activity_log(
        &mut self,
        path: &Path,
        extent_bytes: u64,
        capacity: usize,
    ) -> Result<LogRecovery, BitmapError> {
        let log_error = |message: String| BitmapError::ActivityLog { path: path.to_path_buf(), message };
        let found = activity_log::read(path).map_err(|error| log_error(format!("read: {error}")))?;
        let volume_size = self.geometry.volume_size;
        let (recovery, sequence) = match found {
            Found::Missing if self.opened == Opened::AfterCrash => (LogRecovery::MissingAfterCrash, 0),
            Found::Missing => (LogRecovery::Missing, 0),
            Found::Damaged => (LogRecovery::Damaged, 0),
            Found::Valid(transaction) => {
                let inside = transaction.extents.iter().all(|extent| {
                    extent.checked_mul(transaction.extent_bytes).is_some_and(|start| start < volume_size)
                });
                if inside {
                    for extent in &transaction.extents {
                        let start = extent * transaction.extent_bytes;
                        let len = transaction.extent_bytes.min(volume_size - start);
                        for slot in 0..self.geometry.slots {
                            self.set_range(slot, start, len);
                        }
                    }
                    (LogRecovery::Extents(transaction.extents.len()), transaction.sequence)
                } else {
                    (LogRecovery::Damaged, transaction.sequence)
                }
            }
        };
        match recovery {
            LogRecovery::MissingAfterCrash | LogRecovery::Damaged => {
                tracing::error!(
                    log = %path.display(),
                    "the activity log {} is {}: the writes it covered are unknown, every copy gets a full resync",
                    path.display(),
                    if recovery == LogRecovery::Damaged {
                        "damaged"
                    } else {
                        "missing while the bitmap was left open by a process that died"
                    }
                );
                for slot in 0..self.geometry.slots {
                    self.set_all(slot);
                }
            }
            LogRecovery::Extents(count) if count > 0 => tracing::info!(
                log = %path.display(),
                extents = count,
                "activity log: {count} extents were active when the log was last written (the process died); \
                 every copy resyncs them"
            ),
            _ => {}
        }
        self.flush()?;
        if capacity == 0 {
            if let Err(error) = fs::remove_file(path) {
                if error.kind() != io::ErrorKind::NotFound {
                    return Err(log_error(format!("remove (no activity log is configured): {error}")));
                }
            }
            return Ok(recovery);
        }
        if !extent_bytes.is_power_of_two() || extent_bytes < self.geometry.region_bytes {
            return Err(BitmapError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "activity-log extents of {extent_bytes} bytes: a power of two of at least the region size ({})",
                    self.geometry.region_bytes
                ),
            });
        }
        let capacity = capacity.min(activity_log::EXTENTS_MAX as usize);
        let log = ActivityLog::create(path, extent_bytes, capacity, sequence)
            .map_err(|error| log_error(error.to_string()))?;
        self.activity_log = Some(log);
        Ok(recovery)
    }

    /// The attached activity log, if any.
    pub fn activity_log(&self) -> Option<&ActivityLog> {
        self.activity_log.as_ref()
    }

    /// Mark the regions a write of `len` bytes at `offset` touches (in
    /// memory) and note in `pending` what must be made durable before the
    /// write is issued: nothing when every bit was set and durable already.
    /// [`WriteIntentBitmap::commit`] then makes a whole batch durable.
    ///
    /// # Panics
    /// When the extent runs past the end of the volume.
    pub fn mark_write(&self, offset: u64, len: u64, pending: &mut PendingMarks) {
        if !self.mark(offset, len) {
            return;
        }
        match &self.activity_log {
            Some(log) => pending.extents.extend(log.extents(offset, len)),
            None => pending.flush = true,
        }
    }

    /// Make every mark in `pending` durable: its extents logged (one
    /// transaction shared with every writer committing at once), or the
    /// bitmap synced (without a log). `pending` is empty afterwards.
    pub fn commit(&self, pending: &mut PendingMarks) -> Result<(), BitmapError> {
        let flush = std::mem::take(&mut pending.flush);
        let extents = std::mem::take(&mut pending.extents);
        if let Some(log) = &self.activity_log {
            if !extents.is_empty() {
                log.commit(extents, || self.flush()).map_err(|error| match error {
                    CommitError::Bitmap(error) => error,
                    CommitError::Io(error) => self.log_error(log, error.to_string()),
                    CommitError::Failed(why) => self.log_error(log, why),
                })?;
            }
        }
        if flush {
            self.flush()?;
        }
        Ok(())
    }

    fn log_error(&self, log: &ActivityLog, message: String) -> BitmapError {
        BitmapError::ActivityLog { path: log.path().to_path_buf(), message }
    }

    /// Before a change to the body: a header still marked `closed` is
    /// marked `open` (durable with the change's flush, or at worst seen as
    /// damage at the next open, which resyncs more, never less).
    fn reopen_if_closed(&self) {
        if !self.closed.load(Ordering::Acquire) {
            return;
        }
        let mut changes = self.lock_changes();
        if self.closed.swap(false, Ordering::AcqRel) {
            self.count_change(&mut changes);
            self.write_header(self.read_generation(), STATE_OPEN, 0);
        }
    }

    /// Mark the regions that `len` bytes at `offset` touch as possibly
    /// different on every copy. Returns whether the caller must call
    /// [`WriteIntentBitmap::flush`] before issuing the data write: true
    /// unless every bit was already set and durable. Writes that mark
    /// together may share one flush.
    ///
    /// # Panics
    /// When the extent runs past the end of the volume; callers validate
    /// requests before they reach the bitmap.
    pub fn mark(&self, offset: u64, len: u64) -> bool {
        let Some((first, last)) = self.regions_touched(offset, len) else {
            return false;
        };
        if self.all_set(first, last) {
            return !self.set_bits_durable(first, last);
        }
        self.reopen_if_closed();
        let mut changes = self.lock_changes();
        let change = self.count_change(&mut changes);
        self.stamp_words(first, last, change);
        for slot in self.marked() {
            self.for_each_word(slot, first, last, |word, mask| {
                word.fetch_or(mask, Ordering::Release);
            });
        }
        true
    }

    /// Whether a write of `len` bytes at `offset` may be issued: its marks
    /// are durable, as bits an msync carried (and no clear touched since)
    /// or as extents the activity log on disk lists. Changes nothing; for
    /// checks. Exact in debug builds, which keep a record of what each msync
    /// carried; release builds answer from the word stamps, which may say
    /// false for a durable bit whose word a newer mark changed.
    ///
    /// # Panics
    /// When the extent runs past the end of the volume.
    pub fn marks_durable(&self, offset: u64, len: u64) -> bool {
        let Some((first, last)) = self.regions_touched(offset, len) else {
            return true;
        };
        #[cfg(debug_assertions)]
        let carried = {
            let carried = self.lock_carried();
            self.marked().all(|slot| {
                let base = self.slot_base(slot);
                self.word_masks(first, last).all(|(index, mask)| carried.bits[base + index] & mask == mask)
            })
        };
        #[cfg(not(debug_assertions))]
        let carried = self.all_set(first, last) && self.set_bits_durable(first, last);
        carried || self.activity_log.as_ref().is_some_and(|log| log.covers(log.extents(offset, len)))
    }

    /// Of `regions`, those whose bits may clear once a copy has them
    /// durably, before they are durable on this host: their extents stay in
    /// the durable activity log until [`WriteIntentBitmap::close_clean`]
    /// clears it (the caller syncs the volume before that), so a crash
    /// before then sets them dirty again (invariant 6 in the log's form).
    /// None without a log, or with one too small for the whole volume (it
    /// drops extents, and from then on only the bitmap remembers them).
    /// Order kept.
    pub fn retained_by_log(&self, regions: &[u64]) -> Vec<bool> {
        let Some(log) = self.activity_log.as_ref().filter(|_| self.log_keeps_every_extent()) else {
            return vec![false; regions.len()];
        };
        let extent_regions = (log.extent_bytes() >> self.region_shift).max(1);
        // A few thousand at a time: writers take the log's lock to mark.
        let mut retained = Vec::with_capacity(regions.len());
        for part in regions.chunks(4096) {
            retained.extend(log.retained(part.iter().map(|region| region / extent_regions)));
        }
        retained
    }

    /// Whether an activity log that never drops an extent is attached: bits
    /// may then clear before their regions are durable on this host
    /// ([`WriteIntentBitmap::retained_by_log`]), and the volume must be
    /// synced before [`WriteIntentBitmap::close_clean`].
    pub fn log_keeps_every_extent(&self) -> bool {
        self.activity_log
            .as_ref()
            .is_some_and(|log| self.geometry.volume_size.div_ceil(log.extent_bytes()) <= log.capacity() as u64)
    }

    /// Writes mark only `slots` from now on: the slots of the copies
    /// configured. A slot no copy holds is never read: a copy that takes it
    /// later is a new copy, and its slot is set whole first
    /// ([`WriteIntentBitmap::set_all`]), so its stale bits cost nothing. On
    /// a 1 TiB volume each write otherwise dirties one bitmap page per slot,
    /// eight where one copy needs one, and every msync writes them all.
    pub fn set_marked_slots(&self, slots: &[u32]) {
        let mask = slots.iter().fold(0u32, |mask, &slot| {
            assert!(slot < self.geometry.slots, "slot {slot} does not exist");
            mask | 1 << slot
        });
        self.marked_slots.store(mask, Ordering::Release);
    }

    /// The slots writes mark.
    fn marked(&self) -> impl Iterator<Item = u32> {
        let mask = self.marked_slots.load(Ordering::Acquire);
        (0..self.geometry.slots).filter(move |slot| mask & (1 << slot) != 0)
    }

    /// Make every mark and every header change so far durable (one msync),
    /// unless an earlier flush already did. Clears are written along the way
    /// but never waited for: a stale set bit costs a resync, not data.
    pub fn flush(&self) -> Result<(), BitmapError> {
        let target = self.changes_seen.load(Ordering::Acquire);
        if self.changes_durable.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _flushing = self.flush_lock.lock().unwrap_or_else(PoisonError::into_inner);
        // Another thread's msync may have covered this change while we waited.
        if self.changes_durable.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.msync_covering(self.lock_changes())
    }

    /// msync the whole mapping; every change counted in `changes` (the held
    /// change lock) is durable once it returns. The caller holds the flush
    /// lock. The count is read under the change lock: every change it
    /// includes has finished its stores, so the msync carries all of them.
    fn msync_covering(&self, changes: MutexGuard<'_, u64>) -> Result<(), BitmapError> {
        let covered = *changes;
        #[cfg(debug_assertions)]
        {
            self.lock_carried().flushing = Some(self.word_values());
        }
        drop(changes);
        let synced = self.map.flush().map_err(|source| self.io_error("msync", source));
        #[cfg(debug_assertions)]
        {
            let mut carried = self.lock_carried();
            let flushing = carried.flushing.take().filter(|_| synced.is_ok());
            for (bits, flushed) in carried.bits.iter_mut().zip(flushing.into_iter().flatten()) {
                *bits |= flushed;
            }
        }
        synced?;
        self.changes_durable.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Clear one region's bit in `slot`: that copy has the region durably.
    ///
    /// The caller orders this after every write to the region that the copy
    /// has not acknowledged; a clear racing a mark of the same region could
    /// otherwise lose the mark (invariant 6).
    ///
    /// # Panics
    /// When the slot or the region does not exist.
    pub fn clear(&self, slot: u32, region_index: u64) {
        assert!(region_index < self.region_count(), "region {region_index} is past the end of the bitmap");
        self.reopen_if_closed();
        self.for_each_word(slot, region_index, region_index, |word, mask| {
            word.fetch_and(!mask, Ordering::Release);
        });
        #[cfg(debug_assertions)]
        self.forget_carried(slot, region_index, region_index);
    }

    /// Clear `slot`'s bits for the regions that lie wholly inside `len` bytes
    /// at `offset`; regions the extent only partly covers stay set. The last
    /// region of the volume counts as covered when the extent reaches the end.
    ///
    /// # Panics
    /// When the slot does not exist or the extent runs past the volume's end.
    pub fn clear_range(&self, slot: u32, offset: u64, len: u64) {
        let end = self.extent_end(offset, len);
        let first = offset.div_ceil(self.geometry.region_bytes);
        let end_region = if end == self.geometry.volume_size { self.region_count() } else { end >> self.region_shift };
        if first < end_region {
            self.reopen_if_closed();
            self.for_each_word(slot, first, end_region - 1, |word, mask| {
                word.fetch_and(!mask, Ordering::Release);
            });
            #[cfg(debug_assertions)]
            self.forget_carried(slot, first, end_region - 1);
        }
    }

    /// Set every region's bit in `slot`: the copy needs a full sync. Call
    /// [`WriteIntentBitmap::flush`] before relying on it.
    ///
    /// # Panics
    /// When the slot does not exist.
    pub fn set_all(&self, slot: u32) {
        self.reopen_if_closed();
        let mut changes = self.lock_changes();
        let change = self.count_change(&mut changes);
        self.stamp_words(0, self.region_count() - 1, change);
        self.for_each_word(slot, 0, self.region_count() - 1, |word, mask| {
            word.fetch_or(mask, Ordering::Release);
        });
    }

    /// Set `slot`'s bits for every region `len` bytes at `offset` touch: that
    /// copy needs those regions resynced (online verify found them
    /// different). Call [`WriteIntentBitmap::flush`] before relying on it.
    ///
    /// # Panics
    /// When the slot does not exist or the extent runs past the volume's end.
    pub fn set_range(&self, slot: u32, offset: u64, len: u64) {
        let Some((first, last)) = self.regions_touched(offset, len) else { return };
        self.reopen_if_closed();
        let mut changes = self.lock_changes();
        let change = self.count_change(&mut changes);
        self.stamp_words(first, last, change);
        self.for_each_word(slot, first, last, |word, mask| {
            word.fetch_or(mask, Ordering::Release);
        });
    }

    /// The indices of the regions set in `slot`, in increasing order. Each
    /// word is read once, so bits changed during the walk may or may not show.
    ///
    /// # Panics
    /// When the slot does not exist.
    pub fn dirty_regions(&self, slot: u32) -> impl Iterator<Item = u64> + '_ {
        self.slot_words(slot).iter().enumerate().flat_map(|(word_index, word)| {
            let mut bits = u64::from_le(word.load(Ordering::Acquire));
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(word_index as u64 * BITS_PER_WORD + bit)
            })
        })
    }

    /// The bytes of volume covered by the regions set in `slot` (the last
    /// region counts only the part inside the volume).
    ///
    /// # Panics
    /// When the slot does not exist.
    pub fn dirty_bytes(&self, slot: u32) -> u64 {
        let set: u64 = self
            .slot_words(slot)
            .iter()
            .map(|word| u64::from(u64::from_le(word.load(Ordering::Acquire)).count_ones()))
            .sum();
        let last = self.region_count() - 1;
        let last_shortfall = self.geometry.region_bytes * self.region_count() - self.geometry.volume_size;
        let last_set = self.is_set(slot, last);
        set * self.geometry.region_bytes - if last_set { last_shortfall } else { 0 }
    }

    /// Whether region `region_index` is set in `slot`.
    ///
    /// # Panics
    /// When the slot or the region does not exist.
    pub fn is_set(&self, slot: u32, region_index: u64) -> bool {
        assert!(region_index < self.region_count(), "region {region_index} is past the end of the bitmap");
        let word = &self.slot_words(slot)[(region_index / BITS_PER_WORD) as usize];
        u64::from_le(word.load(Ordering::Acquire)) & (1 << (region_index % BITS_PER_WORD)) != 0
    }

    /// The volume's generation as recorded in the bitmap.
    pub fn generation(&self) -> u64 {
        let _changes = self.lock_changes();
        self.read_generation()
    }

    /// Record the volume's generation; durable after the next flush. The
    /// generation and the header CRC lie in the file's first 512-byte sector,
    /// which disks write whole, so a crash leaves the old or the new header.
    pub fn set_generation(&self, generation: u64) {
        let mut changes = self.lock_changes();
        self.count_change(&mut changes);
        self.closed.store(false, Ordering::Release);
        self.write_header(generation, STATE_OPEN, 0);
    }

    /// The generation in the mapped header; called with `changes` locked.
    fn read_generation(&self) -> u64 {
        let mut bytes = [0u8; 8];
        // SAFETY: the header page is only read or written while `changes` is
        // locked (the caller holds it), and it lies inside the mapping, which
        // outlives `self`.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(GENERATION_OFFSET), bytes.as_mut_ptr(), bytes.len())
        };
        u64::from_le_bytes(bytes)
    }

    /// Write the header into the mapping; called with `changes` locked.
    fn write_header(&self, generation: u64, state: u32, body_crc: u32) {
        let header = self.geometry.header(generation, state, body_crc);
        // SAFETY: the header page is only read or written while `changes` is
        // locked (the caller holds it), it is disjoint from the words that
        // other threads touch through atomics, and it lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), self.map.as_mut_ptr(), HEADER_USED_BYTES) };
    }

    /// The CRC32 of every slot word, in the file's byte order.
    fn body_crc(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        for word in self.words() {
            hasher.update(&word.load(Ordering::Acquire).to_ne_bytes());
        }
        hasher.finalize()
    }

    /// The regions that `len` bytes at `offset` touch; empty when `len` is 0.
    ///
    /// # Panics
    /// When the extent runs past the end of the volume.
    pub fn regions(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        self.regions_touched(offset, len).map_or(0..0, |(first, last)| first..last + 1)
    }

    /// The region size in bytes.
    pub fn region_bytes(&self) -> u64 {
        self.geometry.region_bytes
    }

    /// The number of regions: the volume size divided by the region size,
    /// rounded up.
    pub fn region_count(&self) -> u64 {
        self.geometry.region_count()
    }

    /// The number of copy slots.
    pub fn slots(&self) -> u32 {
        self.geometry.slots
    }

    /// The volume size in bytes.
    pub fn volume_size(&self) -> u64 {
        self.geometry.volume_size
    }

    /// The bitmap file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_changes(&self) -> MutexGuard<'_, u64> {
        // The count stays meaningful after a panic elsewhere: it only grows.
        self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number one change, before its stores, under the change lock.
    fn count_change(&self, changes: &mut MutexGuard<'_, u64>) -> u64 {
        **changes += 1;
        self.changes_seen.store(**changes, Ordering::Release);
        **changes
    }

    /// Record that change `change` sets bits of regions `first..=last`;
    /// called under the change lock before the bits are stored, so the
    /// stamps only grow.
    fn stamp_words(&self, first: u64, last: u64, change: u64) {
        for word_index in first / BITS_PER_WORD..=last / BITS_PER_WORD {
            self.word_changes[word_index as usize].store(change, Ordering::Release);
        }
    }

    fn extent_end(&self, offset: u64, len: u64) -> u64 {
        let end = offset.checked_add(len).filter(|end| *end <= self.geometry.volume_size);
        end.unwrap_or_else(|| {
            panic!("extent of {len} bytes at {offset} runs past the volume's {} bytes", self.geometry.volume_size)
        })
    }

    /// The first and last regions an extent touches; `None` when it is empty.
    fn regions_touched(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = self.extent_end(offset, len);
        (len > 0).then(|| (offset >> self.region_shift, (end - 1) >> self.region_shift))
    }

    /// Whether the bits of regions `first..=last`, found all set, were
    /// carried by a flush: the newest change that set bits in their words
    /// is durable. The Acquire loads of the words saw bits stored with
    /// Release after their change numbers were stamped, so the stamps read
    /// here are at least the numbers of the changes that set them.
    fn set_bits_durable(&self, first: u64, last: u64) -> bool {
        let newest = (first / BITS_PER_WORD..=last / BITS_PER_WORD)
            .map(|word_index| self.word_changes[word_index as usize].load(Ordering::Acquire))
            .max()
            .unwrap_or(0);
        newest <= self.changes_durable.load(Ordering::Acquire)
    }

    fn all_set(&self, first: u64, last: u64) -> bool {
        self.marked().all(|slot| {
            let mut all = true;
            self.for_each_word(slot, first, last, |word, mask| {
                all &= word.load(Ordering::Acquire) & mask == mask;
            });
            all
        })
    }

    /// Call `action` with each word of `slot` that holds bits of regions
    /// `first..=last`, and the mask (in the word's stored byte order) of
    /// those bits.
    fn for_each_word(&self, slot: u32, first: u64, last: u64, mut action: impl FnMut(&AtomicU64, u64)) {
        let words = self.slot_words(slot);
        for (index, mask) in self.word_masks(first, last) {
            action(&words[index], mask);
        }
    }

    /// The index within a slot of each word that holds bits of regions
    /// `first..=last`, with the mask (in the word's stored byte order) of
    /// those bits.
    fn word_masks(&self, first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
        debug_assert!(first <= last && last < self.region_count());
        (first / BITS_PER_WORD..=last / BITS_PER_WORD).map(move |word_index| {
            let word_first = word_index * BITS_PER_WORD;
            let low = first.max(word_first) - word_first;
            let high = last.min(word_first + BITS_PER_WORD - 1) - word_first;
            let width = high - low + 1;
            let mask = if width == BITS_PER_WORD { u64::MAX } else { ((1u64 << width) - 1) << low };
            (word_index as usize, mask.to_le())
        })
    }

    /// Every word's value, in [`WriteIntentBitmap::words`]'s order.
    #[cfg(debug_assertions)]
    fn word_values(&self) -> Vec<u64> {
        self.words().iter().map(|word| word.load(Ordering::Acquire)).collect()
    }

    #[cfg(debug_assertions)]
    fn lock_carried(&self) -> MutexGuard<'_, Carried> {
        self.carried.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Debug builds: `slot`'s bits of regions `first..=last` were cleared
    /// (in memory; the file may hold them either way from now on).
    #[cfg(debug_assertions)]
    fn forget_carried(&self, slot: u32, first: u64, last: u64) {
        let base = self.slot_base(slot);
        let mut carried = self.lock_carried();
        let Carried { bits, flushing } = &mut *carried;
        for (index, mask) in self.word_masks(first, last) {
            bits[base + index] &= !mask;
            if let Some(flushing) = flushing {
                flushing[base + index] &= !mask;
            }
        }
    }

    fn slot_words(&self, slot: u32) -> &[AtomicU64] {
        let start = self.slot_base(slot);
        &self.words()[start..start + self.words_per_slot]
    }

    /// The index in [`WriteIntentBitmap::words`] of `slot`'s first word.
    fn slot_base(&self, slot: u32) -> usize {
        assert!(slot < self.geometry.slots, "slot {slot} does not exist; the bitmap has {}", self.geometry.slots);
        slot as usize * self.words_per_slot
    }

    fn words(&self) -> &[AtomicU64] {
        let count = self.geometry.slots as usize * self.words_per_slot;
        // SAFETY: the mapping starts page-aligned and `open` checked that it
        // spans HEADER_BYTES + count * 8 bytes, so the words are in bounds and
        // 8-byte aligned. The file's length never changes while it is mapped:
        // this process holds its exclusive flock and never truncates it. In
        // this process the words are only ever accessed through these atomics
        // (the header, accessed by plain copies, is disjoint), and AtomicU64
        // has the size of u64, for which every bit pattern is valid. The slice
        // borrows `self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(HEADER_BYTES).cast::<AtomicU64>(), count) }
    }

    fn io_error(&self, action: &'static str, source: io::Error) -> BitmapError {
        BitmapError::Io { path: self.path.clone(), action, source }
    }
}

/// Create the file whole beside its final name (every block allocated, the
/// bits as `new_bits` says), make it durable, then rename it into place, so
/// a crash never leaves a half-written bitmap at `path`.
fn create(path: &Path, geometry: &Geometry, new_bits: NewBits) -> Result<(), BitmapError> {
    crate::durable_file::create_whole(path, |file| {
        allocate(file, geometry.file_bytes()).map_err(|source| ("allocate", source))?;
        if new_bits == NewBits::Set {
            write_set_bits(file, geometry).map_err(|source| ("write", source))?;
        }
        let header = geometry.header(0, STATE_OPEN, 0);
        file.write_all_at(&header, 0).map_err(|source| ("write header", source))
    })
    .map(drop)
    .map_err(|(action, source)| BitmapError::Io { path: path.to_path_buf(), action, source })
}

/// Allocate every block of the file's first `length` bytes (extending it),
/// so no later store into its mapping can fail for want of space: a full
/// filesystem raises SIGBUS on a store to an unallocated page of a shared
/// mapping, and the host would die instead of answering an I/O error.
fn allocate(file: &File, length: u64) -> io::Result<()> {
    // SAFETY: posix_fallocate only reads the descriptor number, which `file`
    // keeps open for the whole call. (glibc writes zeroes where the
    // filesystem has no fallocate.)
    let result = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, length as libc::off_t) };
    match result {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Set every region's bit in every slot of a new file (padding bits stay clear).
fn write_set_bits(file: &File, geometry: &Geometry) -> io::Result<()> {
    const CHUNK_WORDS: usize = 1 << 17;
    let regions = geometry.region_count();
    let words = geometry.words_per_slot();
    let chunk = vec![0xffu8; CHUNK_WORDS.min(words) * 8];
    for slot in 0..u64::from(geometry.slots) {
        let slot_start = HEADER_BYTES as u64 + slot * words as u64 * 8;
        let mut written = 0;
        while written < words {
            let count = CHUNK_WORDS.min(words - written);
            file.write_all_at(&chunk[..count * 8], slot_start + written as u64 * 8)?;
            written += count;
        }
        let tail_bits = regions % BITS_PER_WORD;
        if tail_bits != 0 {
            let last = (1u64 << tail_bits) - 1;
            file.write_all_at(&last.to_le_bytes(), slot_start + (words as u64 - 1) * 8)?;
        }
    }
    Ok(())
}

fn open(path: &Path, geometry: Geometry) -> Result<WriteIntentBitmap, BitmapError> {
    let io_error = |action, source| BitmapError::Io { path: path.to_path_buf(), action, source };
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|source| io_error("open", source))?;
    lock_exclusive(path, &file)?;
    let length = file.metadata().map_err(|source| io_error("stat", source))?.len();
    let mut header = [0u8; HEADER_BYTES];
    if length < HEADER_BYTES as u64 {
        return Err(BitmapError::Corrupt { path: path.to_path_buf(), message: format!("is only {length} bytes long") });
    }
    file.read_exact_at(&mut header, 0).map_err(|source| io_error("read header", source))?;
    let header = parse_header(path, &header)?;
    let recorded = header.geometry;
    if recorded != geometry {
        return Err(BitmapError::Mismatch {
            path: path.to_path_buf(),
            message: format!(
                "was made for a {}-byte volume with {}-byte regions and {} slots, but this volume is {} bytes with {}-byte regions and {} slots; \
                 open it with its own settings, or move it aside and resync every copy in full",
                recorded.volume_size,
                recorded.region_bytes,
                recorded.slots,
                geometry.volume_size,
                geometry.region_bytes,
                geometry.slots
            ),
        });
    }
    if length != geometry.file_bytes() {
        return Err(BitmapError::Corrupt {
            path: path.to_path_buf(),
            message: format!("is {length} bytes long, its header calls for {}", geometry.file_bytes()),
        });
    }
    // Files copied sparsely, or made by hand, may have holes: fill them now,
    // while a full disk is still an error rather than a signal.
    allocate(&file, length).map_err(|source| io_error("allocate (is the filesystem full?)", source))?;
    let map = MmapRaw::map_raw(&file).map_err(|source| io_error("mmap", source))?;
    assert_eq!(map.len() as u64, geometry.file_bytes(), "the mapping spans the whole file");
    assert_eq!(map.as_ptr() as usize % 8, 0, "mappings are page-aligned");
    let changes = 0;
    let mut bitmap = WriteIntentBitmap {
        path: path.to_path_buf(),
        geometry,
        region_shift: geometry.region_bytes.trailing_zeros(),
        words_per_slot: geometry.words_per_slot(),
        map,
        _file: file,
        changes: Mutex::new(changes),
        changes_seen: AtomicU64::new(changes),
        word_changes: (0..geometry.words_per_slot()).map(|_| AtomicU64::new(0)).collect(),
        flush_lock: Mutex::new(()),
        changes_durable: AtomicU64::new(changes),
        opened: Opened::AfterCrash,
        closed: AtomicBool::new(false),
        marked_slots: AtomicU32::new(u32::MAX),
        activity_log: None,
        #[cfg(debug_assertions)]
        carried: Mutex::new(Carried { bits: Vec::new(), flushing: None }),
    };
    // What the file held at open is what a power cut would leave.
    #[cfg(debug_assertions)]
    {
        bitmap.carried.get_mut().unwrap_or_else(PoisonError::into_inner).bits = bitmap.word_values();
    }
    if header.state == STATE_CLOSED {
        bitmap.opened = if bitmap.body_crc() == header.body_crc { Opened::Clean } else { Opened::Damaged };
    }
    if bitmap.opened == Opened::Damaged {
        tracing::error!(
            bitmap = %path.display(),
            "bitmap {} was closed cleanly but its body fails its CRC: it was damaged while stopped; \
             every copy gets a full resync",
            path.display()
        );
        for slot in 0..geometry.slots {
            bitmap.set_all(slot);
        }
    }
    // Mark the header open. A process that died between setting bits and
    // flushing them may have left them in the page cache only; marks treat
    // every bit found at open as durable, so make that true (and the open
    // state, and any damage repair) durable before the first mark.
    bitmap.write_header(header.generation, STATE_OPEN, 0);
    bitmap.map.flush().map_err(|source| io_error("msync at open", source))?;
    Ok(bitmap)
}

/// Take the file's exclusive advisory lock, or say who holds it. The lock
/// goes with the open file, so it is released when the process dies.
fn lock_exclusive(path: &Path, file: &File) -> Result<(), BitmapError> {
    match crate::file_lock::try_lock_exclusive(file.as_raw_fd()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(BitmapError::Busy { path: path.to_path_buf() }),
        Err(source) => Err(BitmapError::Io { path: path.to_path_buf(), action: "lock", source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MIB: u64 = 1 << 20;

    fn open_in(directory: &Path, volume_size: u64, region_bytes: u64, slots: u32) -> WriteIntentBitmap {
        WriteIntentBitmap::open_or_create(&directory.join("volume.cmbitmap"), volume_size, region_bytes, slots).unwrap()
    }

    /// A 64 MiB bitmap of 64 KiB regions with `slots` in `directory`, and
    /// an activity log of `capacity` 4 MiB extents (the volume has 16):
    /// what attaching it recovered.
    fn open_with_log(directory: &Path, slots: u32, capacity: usize) -> (WriteIntentBitmap, LogRecovery) {
        let mut bitmap = open_in(directory, 64 * MIB, 64 << 10, slots);
        let recovery = bitmap.attach_activity_log(&directory.join("volume.cmal"), 4 * MIB, capacity).unwrap();
        (bitmap, recovery)
    }

    /// A new bitmap is clear and has the geometry asked for and the expected file size.
    #[test]
    fn new_bitmap_is_clear() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 10 * MIB + 1, 64 << 10, 3);
        assert_eq!(bitmap.region_count(), 161);
        assert_eq!(bitmap.slots(), 3);
        assert_eq!(bitmap.dirty_regions(0).count(), 0);
        assert_eq!(fs::metadata(bitmap.path()).unwrap().len(), 4096 + 3 * 3 * 8);
    }

    /// mark asks for a flush the first time and not once the bits are durable.
    #[test]
    fn mark_asks_for_a_flush_only_until_durable() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 4 * MIB, REGION_BYTES_DEFAULT, 2);
        assert!(bitmap.mark(100, 10));
        assert!(bitmap.mark(100, 10), "set but not yet durable");
        bitmap.flush().unwrap();
        assert!(!bitmap.mark(100, 10));
        assert!(!bitmap.mark(0, 10), "same region");
        assert!(bitmap.mark(REGION_BYTES_DEFAULT, 1), "a new region");
    }

    /// `marks_durable` answers per region: a newer mark of another region
    /// of the same word leaves a durable bit durable, and a bit cleared and
    /// set again is not durable until the next flush carries it (the check
    /// behind every NBD connection's issue in debug builds; release builds
    /// answer from the word stamps, which fail the neighbour's case).
    #[cfg(debug_assertions)]
    #[test]
    fn marks_durable_is_exact_per_region() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 64 * MIB, MIB, 2);
        assert!(!bitmap.marks_durable(0, 4096), "never marked");
        bitmap.mark(0, 4096);
        assert!(!bitmap.marks_durable(0, 4096), "marked, not flushed");
        bitmap.flush().unwrap();
        assert!(bitmap.marks_durable(0, 4096));
        bitmap.mark(MIB, 4096);
        assert!(bitmap.marks_durable(0, 4096), "a neighbour's newer mark in the same word");
        assert!(!bitmap.marks_durable(MIB, 4096), "the neighbour is not flushed");
        assert!(!bitmap.marks_durable(0, 2 * MIB), "an extent over both regions");
        bitmap.clear(1, 0);
        assert!(!bitmap.marks_durable(0, 4096), "cleared in one slot: the file may lose it");
        bitmap.mark(0, 4096);
        assert!(!bitmap.marks_durable(0, 4096), "set again, not flushed");
        bitmap.flush().unwrap();
        assert!(bitmap.marks_durable(0, 2 * MIB));
        bitmap.clear_range(0, 0, 2 * MIB);
        bitmap.mark(0, 2 * MIB);
        assert!(!bitmap.marks_durable(MIB, 4096), "cleared by range, set again, not flushed");
    }

    /// A mark spanning regions sets every touched region in every slot, and nothing else.
    #[test]
    fn mark_sets_touched_regions_in_every_slot() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 64 * MIB, 4096, 2);
        bitmap.mark(4095, 4098);
        for slot in 0..2 {
            assert_eq!(bitmap.dirty_regions(slot).collect::<Vec<_>>(), [0, 1, 2]);
        }
        bitmap.mark(63 * 4096, 2 * 4096);
        assert_eq!(bitmap.dirty_regions(1).collect::<Vec<_>>(), [0, 1, 2, 63, 64]);
    }

    /// clear_range clears wholly covered regions only, and the volume's short tail region.
    #[test]
    fn clear_range_keeps_partly_covered_regions() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 10 * 4096 + 100, 4096, 1);
        bitmap.set_all(0);
        assert_eq!(bitmap.region_count(), 11);
        bitmap.clear_range(0, 100, 3 * 4096);
        assert_eq!(bitmap.dirty_regions(0).collect::<Vec<_>>(), [0, 3, 4, 5, 6, 7, 8, 9, 10]);
        bitmap.clear_range(0, 9 * 4096, 4096 + 100);
        assert_eq!(bitmap.dirty_regions(0).collect::<Vec<_>>(), [0, 3, 4, 5, 6, 7, 8]);
        bitmap.clear(0, 0);
        assert!(!bitmap.is_set(0, 0));
    }

    /// dirty_bytes counts whole regions, and only the in-volume part of the last one.
    #[test]
    fn dirty_bytes_counts_the_short_last_region() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 3 * 4096 + 10, 4096, 2);
        bitmap.set_all(1);
        assert_eq!(bitmap.dirty_bytes(1), 3 * 4096 + 10);
        assert_eq!(bitmap.dirty_bytes(0), 0);
        bitmap.clear(1, 3);
        assert_eq!(bitmap.dirty_bytes(1), 3 * 4096);
    }

    /// set_all sets exactly the regions that exist, no padding bits.
    #[test]
    fn set_all_sets_exactly_every_region() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 130 * 4096, 4096, 1);
        bitmap.set_all(0);
        assert_eq!(bitmap.dirty_regions(0).collect::<Vec<_>>(), (0..130).collect::<Vec<_>>());
    }

    /// A file made for another geometry is refused, naming both geometries.
    #[test]
    fn other_geometry_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        drop(open_in(directory.path(), 4 * MIB, 4096, 2));
        let path = directory.path().join("volume.cmbitmap");
        for (size, region, slots) in [(8 * MIB, 4096, 2), (4 * MIB, 8192, 2), (4 * MIB, 4096, 3)] {
            let error = WriteIntentBitmap::open_or_create(&path, size, region, slots).unwrap_err();
            assert_eq!(error.kind(), BitmapErrorKind::Mismatch, "{error}");
            assert!(error.to_string().contains("4194304-byte volume"), "{error}");
        }
    }

    /// Impossible parameters are refused before any file is made.
    #[test]
    fn bad_parameters_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("volume.cmbitmap");
        for (size, region, slots) in [(0, 4096, 1), (MIB, 3000, 1), (MIB, 2048, 1), (MIB, 4096, 0), (MIB, 4096, 9)] {
            let error = WriteIntentBitmap::open_or_create(&path, size, region, slots).unwrap_err();
            assert_eq!(error.kind(), BitmapErrorKind::Config, "{error}");
        }
        assert!(!path.exists());
    }

    /// A damaged header is refused as corrupt instead of being trusted.
    #[test]
    fn damaged_header_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        drop(open_in(directory.path(), MIB, 4096, 1));
        let path = directory.path().join("volume.cmbitmap");
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff], 20).unwrap();
        let error = WriteIntentBitmap::open_or_create(&path, MIB, 4096, 1).unwrap_err();
        assert_eq!(error.kind(), BitmapErrorKind::Corrupt, "{error}");
    }

    /// A truncated file is refused as corrupt.
    #[test]
    fn truncated_file_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        drop(open_in(directory.path(), MIB, 4096, 1));
        let path = directory.path().join("volume.cmbitmap");
        OpenOptions::new().write(true).open(&path).unwrap().set_len(4096 + 8).unwrap();
        let error = WriteIntentBitmap::open_or_create(&path, MIB, 4096, 1).unwrap_err();
        assert_eq!(error.kind(), BitmapErrorKind::Corrupt, "{error}");
    }

    /// A bitmap already open elsewhere is refused as busy.
    #[test]
    fn second_opener_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let _first = open_in(directory.path(), MIB, 4096, 1);
        let error =
            WriteIntentBitmap::open_or_create(&directory.path().join("volume.cmbitmap"), MIB, 4096, 1).unwrap_err();
        assert_eq!(error.kind(), BitmapErrorKind::Busy, "{error}");
    }

    /// The generation persists across a reopen.
    #[test]
    fn generation_persists() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), MIB, 4096, 1);
        assert_eq!(bitmap.generation(), 0);
        bitmap.set_generation(17);
        bitmap.flush().unwrap();
        drop(bitmap);
        assert_eq!(open_in(directory.path(), MIB, 4096, 1).generation(), 17);
    }

    /// Threads marking and flushing at once all end with their bits set and durable.
    #[test]
    fn concurrent_marks_share_flushes() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = Arc::new(open_in(directory.path(), 64 * MIB, 4096, 2));
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let bitmap = Arc::clone(&bitmap);
                std::thread::spawn(move || {
                    for write in 0..200u64 {
                        let offset = ((write * 4 + thread) * 7919 % 16384) * 4096;
                        if bitmap.mark(offset, 4096) {
                            bitmap.flush().unwrap();
                        }
                        assert!(bitmap.is_set(0, offset / 4096) && bitmap.is_set(1, offset / 4096));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(bitmap.dirty_regions(0).count(), 800);
        assert_eq!(bitmap.dirty_regions(1).count(), 800);
        assert!(bitmap.dirty_regions(0).all(|region| !bitmap.mark(region * 4096, 4096)), "every bit is durable");
    }

    /// Every block of a new bitmap is allocated (no sparse pages a store could fault on).
    #[test]
    fn new_bitmap_is_fully_allocated() {
        use std::os::unix::fs::MetadataExt;
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let bitmap = open_in(directory.path(), 1 << 40, 64 << 10, 8);
        let metadata = fs::metadata(bitmap.path()).unwrap();
        assert!(metadata.blocks() * 512 >= metadata.len(), "{} blocks for {} bytes", metadata.blocks(), metadata.len());
    }

    /// A bitmap made with NewBits::Set says every region of every slot may differ, padding clear.
    #[test]
    fn new_set_bitmap_has_every_region_set() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("volume.cmbitmap");
        let bitmap = WriteIntentBitmap::open_or_create_with(&path, 130 * 4096 + 1, 4096, 3, NewBits::Set).unwrap();
        assert_eq!(bitmap.opened(), Opened::Created);
        for slot in 0..3 {
            assert_eq!(bitmap.dirty_regions(slot).collect::<Vec<_>>(), (0..131).collect::<Vec<_>>());
        }
        assert!(!bitmap.mark(0, 1), "bits found at open are durable");
    }

    /// After a clean close, any damage to the body (zeroed, one bit flipped)
    /// is found at the next open and every bit of every slot is set.
    #[test]
    fn damaged_body_after_a_clean_close_sets_every_bit() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("volume.cmbitmap");
        for damage in [0usize, 1] {
            let bitmap = open_in(directory.path(), MIB, 4096, 2);
            bitmap.mark(8192, 1);
            bitmap.flush().unwrap();
            bitmap.close_clean().unwrap();
            drop(bitmap);
            assert_eq!(open_in(directory.path(), MIB, 4096, 2).opened(), Opened::Clean);
            let bitmap = open_in(directory.path(), MIB, 4096, 2);
            bitmap.close_clean().unwrap();
            drop(bitmap);
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            if damage == 0 {
                file.write_all_at(&[0u8; 64], 4096).unwrap();
            } else {
                file.write_all_at(&[0x10], 4096 + 40).unwrap();
            }
            let bitmap = open_in(directory.path(), MIB, 4096, 2);
            assert_eq!(bitmap.opened(), Opened::Damaged);
            for slot in 0..2 {
                assert_eq!(bitmap.dirty_regions(slot).count() as u64, bitmap.region_count(), "damage {damage}");
            }
            drop(bitmap);
            fs::remove_file(&path).unwrap();
        }
    }

    /// A bitmap whose process died (never closed) is trusted as found, and
    /// a change after a clean close marks it open again.
    #[test]
    fn unclosed_bitmap_is_opened_after_a_crash() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), MIB, 4096, 1);
        bitmap.mark(0, 1);
        bitmap.flush().unwrap();
        drop(bitmap);
        let bitmap = open_in(directory.path(), MIB, 4096, 1);
        assert_eq!(bitmap.opened(), Opened::AfterCrash);
        assert_eq!(bitmap.dirty_regions(0).collect::<Vec<_>>(), [0]);
        bitmap.close_clean().unwrap();
        bitmap.clear(0, 0);
        bitmap.mark(4096, 1);
        bitmap.flush().unwrap();
        drop(bitmap);
        let bitmap = open_in(directory.path(), MIB, 4096, 1);
        assert_eq!(bitmap.opened(), Opened::AfterCrash, "a change after the close reopened the header");
        assert_eq!(bitmap.dirty_regions(0).collect::<Vec<_>>(), [1]);
    }

    /// The default region size keeps the bitmap at most 4 Mi regions per
    /// slot: 256K up to 1 TiB, then doubling, at most 16M.
    #[test]
    fn the_default_region_size_scales_with_the_volume() {
        assert_eq!(region_bytes_for(1 << 30), REGION_BYTES_DEFAULT);
        assert_eq!(region_bytes_for(1 << 40), 256 << 10);
        assert_eq!(region_bytes_for((1 << 40) + 1), 512 << 10);
        assert_eq!(region_bytes_for(4 << 40), 1 << 20);
        assert_eq!(region_bytes_for(1 << 50), 16 << 20);
        let directory = tempfile::tempdir().unwrap();
        drop(open_in(directory.path(), MIB, 8192, 1));
        assert_eq!(recorded_region_bytes(&directory.path().join("volume.cmbitmap")), Some(8192));
        assert_eq!(recorded_region_bytes(&directory.path().join("missing")), None);
    }

    /// Writes mark only the slots of the copies configured, and a region
    /// counts as marked once those slots have it (a slot no copy holds is
    /// left alone: a copy that takes it later has it set whole).
    #[test]
    fn writes_mark_only_the_marked_slots() {
        let directory = tempfile::tempdir().unwrap();
        let bitmap = open_in(directory.path(), 64 * MIB, MIB, 4);
        bitmap.set_marked_slots(&[1, 3]);
        assert!(bitmap.mark(5 * MIB, 4096), "a new mark asks for a flush");
        let marked: Vec<bool> = (0..4).map(|slot| bitmap.is_set(slot, 5)).collect();
        assert_eq!(marked, vec![false, true, false, true]);
        bitmap.flush().unwrap();
        assert!(!bitmap.mark(5 * MIB + 8192, 4096), "set and durable in every marked slot: nothing to do");
        bitmap.set_marked_slots(&[0, 1, 2, 3]);
        assert!(bitmap.mark(5 * MIB, 4096), "slots 0 and 2 lack the bit");
        assert!((0..4).all(|slot| bitmap.is_set(slot, 5)));
    }

    /// The log's retention rule: a region's bit may clear before the region
    /// is durable on this host only while its extent is durably logged in a
    /// log that never drops one (it holds the whole volume). Such a clear
    /// is undone by a crash: the next open sets the whole extent again.
    #[test]
    fn only_a_log_that_holds_the_whole_volume_retains_its_extents() {
        let directory = tempfile::tempdir().unwrap();
        // 64 MiB of 64 KiB regions, 4 MiB extents: 16 extents, 64 regions each.
        let reopen = |capacity: usize| open_with_log(directory.path(), 1, capacity).0;
        let bitmap = reopen(16);
        assert!(bitmap.log_keeps_every_extent());
        let (inside, beside, elsewhere) = (144, 191, 192);
        assert_eq!(bitmap.retained_by_log(&[inside, elsewhere]), [false, false], "nothing logged yet");
        let mut pending = PendingMarks::default();
        bitmap.mark_write(9 * MIB, 4096, &mut pending);
        assert_eq!(bitmap.retained_by_log(&[inside]), [false], "marked, not committed: not logged");
        bitmap.commit(&mut pending).unwrap();
        assert_eq!(
            bitmap.retained_by_log(&[inside, beside, elsewhere]),
            [true, true, false],
            "the extent 8M..12M is durably logged, 12M.. is not"
        );
        // Cleared before the region is durable here, then a crash: the
        // log sets the region (and its whole extent) dirty again.
        bitmap.clear(0, inside);
        drop(bitmap);
        let bitmap = reopen(16);
        assert!(bitmap.is_set(0, inside), "a crash after a clear the log retained leaves the region dirty");
        assert_eq!(bitmap.retained_by_log(&[inside]), [false], "the recovered log starts empty");
        drop(bitmap);
        // A log of 15 extents drops some of the volume's 16: it retains none.
        let bitmap = reopen(15);
        assert!(!bitmap.log_keeps_every_extent());
        let clean = 40 * MIB / (64 << 10);
        assert!(!bitmap.is_set(0, clean));
        bitmap.mark_write(40 * MIB, 4096, &mut pending);
        assert!(!pending.is_empty(), "the write's extent must be logged");
        bitmap.commit(&mut pending).unwrap();
        assert_eq!(bitmap.retained_by_log(&[clean]), [false], "a log that drops extents retains none");
        drop(bitmap);
        // No log: nothing is retained.
        let bitmap = reopen(0);
        assert!(!bitmap.log_keeps_every_extent());
        assert_eq!(bitmap.retained_by_log(&[inside]), [false]);
    }

    /// Recovery from the activity log: a clean close leaves nothing to
    /// resync; after a crash the logged extents are dirty in every slot; a
    /// log missing after a crash, or damaged, sets every bit; with no log
    /// configured an old one is still recovered from, then removed.
    #[test]
    fn attaching_the_activity_log_recovers_what_it_covers() {
        let directory = tempfile::tempdir().unwrap();
        let log = directory.path().join("volume.cmal");
        let reopen = |capacity: usize| open_with_log(directory.path(), 2, capacity);
        let (bitmap, recovery) = reopen(16);
        assert_eq!(recovery, LogRecovery::Missing, "a new bitmap with no log");
        let mut pending = PendingMarks::default();
        bitmap.mark_write(9 * MIB, 4096, &mut pending);
        bitmap.commit(&mut pending).unwrap();
        bitmap.close_clean().unwrap();
        drop(bitmap);
        let (bitmap, recovery) = reopen(16);
        assert_eq!(recovery, LogRecovery::Extents(0), "a clean close empties the log");
        assert_eq!(bitmap.dirty_regions(0).collect::<Vec<_>>(), [144], "only the bit itself");
        bitmap.clear(0, 144);
        bitmap.clear(1, 144);
        bitmap.mark_write(9 * MIB, 4096, &mut pending);
        bitmap.commit(&mut pending).unwrap();
        drop(bitmap); // a crash: the bit may be lost, the extent is logged
        let (bitmap, recovery) = reopen(16);
        assert_eq!(recovery, LogRecovery::Extents(1));
        for slot in 0..2 {
            assert_eq!(bitmap.dirty_bytes(slot), 4 * MIB, "the whole extent 8M..12M in slot {slot}");
            assert!(bitmap.is_set(slot, 8 * MIB / (64 << 10)) && bitmap.is_set(slot, 12 * MIB / (64 << 10) - 1));
        }
        drop(bitmap);
        fs::remove_file(&log).unwrap();
        let (bitmap, recovery) = reopen(16);
        assert_eq!(recovery, LogRecovery::MissingAfterCrash);
        assert_eq!(bitmap.dirty_bytes(0), 64 * MIB, "a log missing after a crash: full resync");
        bitmap.close_clean().unwrap();
        drop(bitmap);
        let file_length = fs::metadata(&log).unwrap().len();
        for block in 0..3 {
            OpenOptions::new()
                .write(true)
                .open(&log)
                .unwrap()
                .write_all_at(&[0xff; 64], block * file_length / 3)
                .unwrap();
        }
        let (bitmap, recovery) = reopen(16);
        assert_eq!(recovery, LogRecovery::Damaged);
        assert_eq!(bitmap.dirty_bytes(1), 64 * MIB, "a damaged log: full resync");
        drop(bitmap);
        let (_bitmap, recovery) = reopen(0);
        assert_eq!(recovery, LogRecovery::Extents(0));
        assert!(!log.exists(), "no log configured: the old one is removed once recovered from");
    }

    /// An extent past the end of the volume is a caller bug and panics.
    #[test]
    #[should_panic(expected = "runs past the volume")]
    fn mark_past_the_end_panics() {
        let directory = tempfile::tempdir().unwrap();
        open_in(directory.path(), MIB, 4096, 1).mark(MIB - 1, 2);
    }
}
