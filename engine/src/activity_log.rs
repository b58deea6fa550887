//! The activity log: a small on-disk set of the volume's recently written
//! extents, so that marking a write costs no metadata I/O at all when its
//! extent is already logged, and one shared small write when it is not
//! (DESIGN.md §3; DRBD's "activity log" with its `al-extents`).
//!
//! ```text
//!  write(offset, len) ─▶ bitmap bits set in memory ─▶ extent logged durably? ── yes ──▶ issue the data write
//!                                                        │ no
//!                                                        ▼
//!                     one transaction for every writer waiting (group commit):
//!                     [evicting? msync the bitmap first] ─▶ write the log block ─▶ fdatasync ─▶ issue
//!  open after a crash ─▶ every logged extent set dirty in every slot ─▶ msync ─▶ empty log
//! ```
//!
//! Invariant 6 then holds in this form: a region a copy may differ in has
//! its bit durably set in the bitmap, or lies in an extent of the durable
//! log (which the next open turns into set bits before anything else). The
//! bitmap's own bits are written lazily: by the kernel's writeback, and
//! always (one msync) before the log forgets an extent, since from then on
//! only the bitmap remembers it.
//!
//! The file (`<volume>.cmal`) holds three blocks of equal size, at offsets
//! 0, one block and two blocks; transaction number `n` is written to block
//! `n % 3`. Up to two transactions are written at once (the device takes
//! both writes and both cache flushes together), and whichever finishes
//! makes every earlier one's extents durable too: each lists every extent
//! logged when it started, less those a bitmap sync already carried. A
//! transaction starts only while fewer than two are being written and
//! its own block is not (transaction n−3 is done): of n−1 and n−2 one is
//! then done too, so the block it overwrites never holds the newest
//! durable transaction, no late write lands over a newer one, and a torn
//! write can only damage a block whose transaction was not yet counted.
//! Reading takes the newest valid block. A block:
//!
//! ```text
//!  offset size field         meaning
//!       0    8 magic         "CMACTLOG"
//!       8    4 version       2 (version 1: a file of two blocks)
//!      12    4 count         extents listed
//!      16    8 sequence      the transaction's number (the newer valid block wins)
//!      24    8 extent_bytes  bytes per extent
//!      32    4 crc           CRC32 of bytes 0..32 and of the extent list
//!      36    4 zero
//!      40      count little-endian u64 extent numbers, then zeroes to the block's end
//! ```
//!
//! The block size is the file's length divided by three. A version-1 log
//! (two blocks, from an earlier release) is still read, and, like a log of
//! another size (the setting changed), replaced whole (through a new file
//! renamed into place) when it is opened. The file is written with O_DIRECT
//! where the file system allows it: buffered, two transactions' fdatasyncs
//! on one file run one after the other.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::buffer::AlignedBuf;

/// The suffix appended to a volume's path to name its activity log.
pub const ACTIVITY_LOG_FILE_SUFFIX: &str = ".cmal";
/// The default bound on what the log may leave to resync after a crash.
pub const ACTIVITY_LOG_BYTES_DEFAULT: u64 = 4 << 30;
/// The default extent size (the log's unit).
pub const EXTENT_BYTES_DEFAULT: u64 = 4 << 20;
/// The most extents a log holds (a 512 KiB block).
pub const EXTENTS_MAX: u64 = 1 << 16;
/// The most extents [`geometry_for`] gives a log: the default bound in
/// default extents (1,024: a 12 KiB transaction).
pub const EXTENTS_PREFERRED: u64 = ACTIVITY_LOG_BYTES_DEFAULT / EXTENT_BYTES_DEFAULT;

/// The log's geometry for a bound of `bound` bytes (what a crash may leave
/// to resync beyond the bitmap) on a volume of `volume_size` bytes with
/// bitmap regions of `region_bytes`: (bytes per extent, extents). Extents
/// of [`EXTENT_BYTES_DEFAULT`] (or a region, when larger), as many as cover
/// the bound (the whole volume at most), up to [`EXTENTS_PREFERRED`]; a
/// larger bound gets larger extents instead of more of them. Every
/// transaction writes the whole list, so its durable write grows with it
/// (on this project's test disk, one O_DIRECT write with O_DSYNC: 181 µs
/// for 12 KiB, 364 µs for 68 KiB, 1.9 ms for the 516 KiB of 65,536
/// extents), while larger extents cost a crash no more than the bound
/// asked for.
pub fn geometry_for(bound: u64, volume_size: u64, region_bytes: u64) -> (u64, usize) {
    let spread = bound.min(volume_size).div_ceil(EXTENTS_PREFERRED).next_power_of_two();
    let extent_bytes = EXTENT_BYTES_DEFAULT.max(region_bytes).max(spread);
    let covered = bound.min(volume_size.next_multiple_of(extent_bytes));
    (extent_bytes, covered.div_ceil(extent_bytes) as usize)
}

const MAGIC: [u8; 8] = *b"CMACTLOG";
const VERSION: u32 = 2;
/// Blocks in the file.
const BLOCKS: u64 = 3;
/// Transactions written at once: one fewer than the blocks, so that (with
/// no start while its block is being written) the block a transaction
/// overwrites is older than the newest durable one.
pub const WRITERS: usize = 2;
/// The layout before this one: two blocks, one transaction at a time.
const VERSION_TWO_BLOCKS: u32 = 1;
const ENTRIES_OFFSET: usize = 40;
const CRC_OFFSET: usize = 32;

/// The size of a block holding `capacity` extents: whole 4 KiB pages.
fn block_bytes(capacity: usize) -> usize {
    (ENTRIES_OFFSET + capacity * 8).div_ceil(4096) * 4096
}

/// Encode one transaction into `bytes`, a whole block of zeroes (every
/// caller's buffer is new and zeroed: the block's tail stays so).
fn encode(sequence: u64, extent_bytes: u64, extents: &[u64], bytes: &mut [u8]) {
    bytes[0..8].copy_from_slice(&MAGIC);
    bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
    bytes[12..16].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    bytes[16..24].copy_from_slice(&sequence.to_le_bytes());
    bytes[24..32].copy_from_slice(&extent_bytes.to_le_bytes());
    for (index, extent) in extents.iter().enumerate() {
        let at = ENTRIES_OFFSET + index * 8;
        bytes[at..at + 8].copy_from_slice(&extent.to_le_bytes());
    }
    let crc = block_crc(bytes, extents.len());
    bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
}

fn block_crc(bytes: &[u8], count: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..CRC_OFFSET]);
    hasher.update(&bytes[ENTRIES_OFFSET..ENTRIES_OFFSET + count * 8]);
    hasher.finalize()
}

/// One transaction as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Its number.
    pub sequence: u64,
    /// Bytes per extent when it was written.
    pub extent_bytes: u64,
    /// The extents it lists.
    pub extents: Vec<u64>,
}

/// Decode a block of a file laid out as `version` says, or `None` when it
/// is not a whole, valid transaction of that version.
fn decode(bytes: &[u8], version: u32) -> Option<Transaction> {
    if bytes.len() < ENTRIES_OFFSET || bytes[0..8] != MAGIC {
        return None;
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let count = u32_at(12) as usize;
    if u32_at(8) != version || ENTRIES_OFFSET + count * 8 > bytes.len() {
        return None;
    }
    if u32_at(CRC_OFFSET) != block_crc(bytes, count) {
        return None;
    }
    let extent_bytes = u64_at(24);
    if extent_bytes == 0 {
        return None;
    }
    let extents = (0..count).map(|index| u64_at(ENTRIES_OFFSET + index * 8)).collect();
    Some(Transaction { sequence: u64_at(16), extent_bytes, extents })
}

/// What the log file said when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// There was no file.
    Missing,
    /// The newest valid transaction.
    Valid(Transaction),
    /// No block holds a valid transaction: the log was damaged.
    Damaged,
}

/// Read the log at `path`: the newest of its blocks that is whole (three
/// blocks, or two in a version-1 log).
pub fn read(path: &Path) -> io::Result<Found> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(error) => return Err(error),
    };
    let bytes = &bytes;
    let newest = [(BLOCKS as usize, VERSION), (2, VERSION_TWO_BLOCKS)]
        .into_iter()
        .flat_map(|(blocks, version)| {
            let block = bytes.len() / blocks;
            (0..blocks).filter_map(move |index| decode(&bytes[index * block..(index + 1) * block], version))
        })
        .max_by_key(|transaction| transaction.sequence);
    Ok(newest.map_or(Found::Damaged, Found::Valid))
}

/// What went wrong with the log.
#[derive(Debug, thiserror::Error)]
#[error("activity log {path}: {action}: {source}")]
pub struct ActivityLogError {
    /// The log file.
    pub path: PathBuf,
    /// What was being done.
    pub action: &'static str,
    /// The operating system's error.
    #[source]
    pub source: io::Error,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// The transaction that makes it durable.
    transaction: u64,
    /// When it was last asked for (larger is more recent).
    used: u64,
    /// Its place in `State::listed`.
    slot: usize,
}

#[derive(Debug)]
struct State {
    /// Every extent logged or being logged.
    extents: HashMap<u64, Entry>,
    /// The same extents as a list, the order the next transaction writes
    /// them in (kept beside the map so a transaction copies it, rather
    /// than walking the map).
    listed: Vec<u64>,
    /// The transaction now collecting new extents.
    next: u64,
    /// Every transaction up to this one is durable (or, a later one being,
    /// covered by it).
    durable: u64,
    /// The blocks being written: one per transaction in flight (at most
    /// [`WRITERS`]).
    writing: [bool; BLOCKS as usize],
    /// A transaction that dropped extents is syncing the bitmap: no other
    /// starts until it is done, since one written meanwhile would no longer
    /// list them while the bitmap may not yet hold their bits.
    evicting: bool,
    /// The use clock.
    clock: u64,
    /// The on-disk sequence number of the last transaction started.
    sequence: u64,
    /// A failed write: the log's content on disk is unknown, every commit fails.
    failed: Option<String>,
    /// Transactions written, of them those that had to msync the bitmap
    /// first, and those started while another was being written.
    transactions: u64,
    bitmap_syncs: u64,
    overlapped: u64,
    /// Time spent in those bitmap syncs, while no transaction could start.
    bitmap_sync_nanos: u64,
    /// Extents dropped for the transaction being written, each with the
    /// earlier transaction that lists it, until the bitmap sync before it
    /// has carried their bits: the block of that transaction still lists
    /// them meanwhile, once it is durable. For [`ActivityLog::covers`].
    leaving: Vec<(u64, u64)>,
}

impl State {
    /// Transactions being written.
    fn in_flight(&self) -> usize {
        self.writing.iter().filter(|writing| **writing).count()
    }
}

/// Counters, for tests and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivityLogStats {
    /// Transactions written since open.
    pub transactions: u64,
    /// Of those, how many synced the bitmap first (they dropped extents).
    pub bitmap_syncs: u64,
    /// Time spent in those bitmap syncs (no transaction starts meanwhile),
    /// a failed one included.
    pub bitmap_sync_nanos: u64,
    /// Of those, how many started while another was being written.
    pub overlapped: u64,
    /// Extents in the log now (logged, or waiting for the next transaction).
    pub extents: usize,
    /// Bytes per extent.
    pub extent_bytes: u64,
    /// The most extents the log holds: with `extent_bytes`, the bound on
    /// what it may leave to resync after a crash.
    pub capacity: usize,
    /// Whether it is written with O_DIRECT (two transactions at once).
    pub direct: bool,
}

/// An open activity log.
#[derive(Debug)]
pub struct ActivityLog {
    path: PathBuf,
    file: File,
    /// `file` is open with O_DIRECT: blocks are written from aligned memory.
    direct: bool,
    extent_shift: u32,
    capacity: usize,
    block: usize,
    state: Mutex<State>,
    committed: Condvar,
}

/// A transaction being written: its number, its on-disk sequence, whether
/// it dropped extents, and what it lists.
#[derive(Debug)]
struct Started {
    transaction: u64,
    sequence: u64,
    dropped: bool,
    listed: Vec<u64>,
}

/// The block the transaction numbered `sequence` goes to.
fn block_index(sequence: u64) -> usize {
    (sequence % BLOCKS) as usize
}

impl ActivityLog {
    /// Make a new, empty log at `path` for `capacity` extents of
    /// `extent_bytes` (a power of two), numbered after `sequence`, replacing
    /// any file there (whole: written beside it, then renamed into place).
    pub fn create(
        path: &Path,
        extent_bytes: u64,
        capacity: usize,
        sequence: u64,
    ) -> Result<ActivityLog, ActivityLogError> {
        assert!(extent_bytes.is_power_of_two(), "extents are a power of two bytes");
        assert!((1..=EXTENTS_MAX as usize).contains(&capacity), "1 to {EXTENTS_MAX} extents");
        let block = block_bytes(capacity);
        let first = sequence + 1;
        let file = crate::durable_file::create_whole(path, |file| {
            // The block of transaction `first` says "empty" (the next ones
            // go to the other blocks, so a torn first write leaves it); the
            // others stay zeroes (invalid), written now so that no
            // transaction's write needs the file system's metadata.
            let mut bytes = vec![0u8; BLOCKS as usize * block];
            let at = block_index(first) * block;
            encode(first, extent_bytes, &[], &mut bytes[at..at + block]);
            file.write_all_at(&bytes, 0).map_err(|source| ("write", source))
        })
        .map_err(|(action, source)| ActivityLogError { path: path.to_path_buf(), action, source })?;
        // Written with O_DIRECT where the file system takes it (tried with
        // a write of zeroes over the next transaction's zeroed block): two
        // transactions' writes and syncs then run at once.
        let direct = fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).and_then(|direct| {
            let zeroes = AlignedBuf::new(block);
            direct.write_all_at(zeroes.as_slice(), (block_index(first + 1) * block) as u64).map(|()| direct)
        });
        let (file, direct) = match direct {
            Ok(direct) => (direct, true),
            Err(error) => {
                tracing::info!(log = %path.display(), %error, "the activity log is written through the page cache \
                    (O_DIRECT refused): two transactions' fdatasyncs run one after the other");
                (file, false)
            }
        };
        Ok(ActivityLog {
            path: path.to_path_buf(),
            file,
            direct,
            extent_shift: extent_bytes.trailing_zeros(),
            capacity,
            block,
            state: Mutex::new(State {
                extents: HashMap::new(),
                listed: Vec::new(),
                next: 1,
                durable: 0,
                writing: [false; BLOCKS as usize],
                evicting: false,
                clock: 0,
                sequence: sequence + 1,
                failed: None,
                transactions: 0,
                bitmap_syncs: 0,
                bitmap_sync_nanos: 0,
                overlapped: 0,
                leaving: Vec::new(),
            }),
            committed: Condvar::new(),
        })
    }

    /// Bytes per extent.
    pub fn extent_bytes(&self) -> u64 {
        1 << self.extent_shift
    }

    /// The most extents the log holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the log is written with O_DIRECT, so that two transactions'
    /// writes and syncs overlap (buffered, they run one after the other).
    pub fn writes_direct(&self) -> bool {
        self.direct
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The extents `len` bytes at `offset` touch (none when `len` is 0).
    pub fn extents(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        (offset >> self.extent_shift)..((offset + len - 1) >> self.extent_shift) + 1
    }

    /// Whether every one of `extents` is in the durable log (no commit
    /// needed): in a transaction written, or dropped for one being written
    /// while the bitmap sync before it runs (the block on disk lists it
    /// until then). For checks.
    pub fn covers(&self, extents: impl IntoIterator<Item = u64>) -> bool {
        let state = self.lock();
        extents.into_iter().all(|extent| {
            state.extents.get(&extent).is_some_and(|entry| entry.transaction <= state.durable)
                || state.leaving.iter().any(|&(left, listed)| left == extent && listed <= state.durable)
        })
    }

    /// Of `extents`, those durably listed in a log no write of which
    /// failed: kept until the log drops them or is cleared. Order kept.
    pub fn retained(&self, extents: impl IntoIterator<Item = u64>) -> Vec<bool> {
        let state = self.lock();
        let trusted = state.failed.is_none();
        extents
            .into_iter()
            .map(|extent| trusted && state.extents.get(&extent).is_some_and(|entry| entry.transaction <= state.durable))
            .collect()
    }

    /// Counters and geometry (the admin endpoint's `activity_log`).
    pub fn stats(&self) -> ActivityLogStats {
        let state = self.lock();
        ActivityLogStats {
            transactions: state.transactions,
            bitmap_syncs: state.bitmap_syncs,
            bitmap_sync_nanos: state.bitmap_sync_nanos,
            overlapped: state.overlapped,
            extents: state.extents.len(),
            extent_bytes: self.extent_bytes(),
            capacity: self.capacity,
            direct: self.direct,
        }
    }

    /// Return once every one of `extents` is in the durable log, or the
    /// bitmap was synced after it was asked for: the caller set the bits of
    /// its writes in the bitmap (in memory) before it called this.
    ///
    /// Writers asking at once share one transaction: the first to find no
    /// transaction under way writes every extent asked for so far; the
    /// others wait for it, and those that asked during it write the next.
    /// When the log is full, the least recently used extents are dropped
    /// (three quarters of the log at once, so that a stream of new extents
    /// syncs the bitmap once every many transactions, not in each), after
    /// `sync_bitmap` made every bit set so far durable. The extents of one
    /// transaction that do not fit are dropped the same way: the bitmap sync
    /// covers their writes.
    pub fn commit<E>(
        &self,
        extents: impl IntoIterator<Item = u64>,
        sync_bitmap: impl Fn() -> Result<(), E>,
    ) -> Result<(), CommitError<E>> {
        let mut state = self.lock();
        let wanted = Self::add(&mut state, extents);
        loop {
            if let Some(why) = &state.failed {
                return Err(CommitError::Failed(why.clone()));
            }
            if state.durable >= wanted {
                return Ok(());
            }
            // Wait while the transaction for `wanted` is under way, or none
            // may start now.
            if wanted < state.next || !Self::may_start(&state) {
                state = self.committed.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let written;
            (state, written) = self.write_transaction(state, &sync_bitmap);
            written?;
        }
    }

    /// Log `extents` in memory, each in the transaction now collecting (or
    /// the one it is already in), and mark them used; the transaction that
    /// makes all of them durable.
    fn add(state: &mut State, extents: impl IntoIterator<Item = u64>) -> u64 {
        let mut wanted = 0;
        for extent in extents {
            state.clock += 1;
            let (clock, next) = (state.clock, state.next);
            let State { extents, listed, .. } = &mut *state;
            let entry = extents.entry(extent).or_insert_with(|| {
                listed.push(extent);
                Entry { transaction: next, used: clock, slot: listed.len() - 1 }
            });
            entry.used = clock;
            wanted = wanted.max(entry.transaction);
        }
        wanted
    }

    /// Whether a transaction may start now: fewer than [`WRITERS`] are
    /// being written, no bitmap sync for dropped extents is under way, and
    /// the block the next one goes to is not being written (by the
    /// transaction three before it, still in flight: its late write would
    /// land over the newer one after that was counted durable).
    fn may_start(state: &State) -> bool {
        state.in_flight() < WRITERS && !state.evicting && !state.writing[block_index(state.sequence + 1)]
    }

    /// Write transaction `next` with every extent logged so far (dropping
    /// the least recently used first if the log is full, after
    /// `sync_bitmap`), and wake whoever waits for it. Called when
    /// [`ActivityLog::may_start`]; returns with the lock held again.
    fn write_transaction<'a, E>(
        &'a self,
        state: MutexGuard<'a, State>,
        sync_bitmap: &impl Fn() -> Result<(), E>,
    ) -> (MutexGuard<'a, State>, Result<(), CommitError<E>>) {
        let written = self.begin_write(state, sync_bitmap).and_then(|started| {
            let result = self.write_block(started.sequence, &started.listed, "write a transaction");
            self.finish(&started, result.as_ref().map(|_| ()).map_err(ToString::to_string));
            result.map_err(CommitError::Io)
        });
        (self.lock(), written)
    }

    /// Start transaction `next` (the caller checked
    /// [`ActivityLog::may_start`]): drop extents if the log is full, after
    /// `sync_bitmap`. The caller writes it and hands it to
    /// [`ActivityLog::finish`]. A failed bitmap sync fails the log (and
    /// the transaction) here.
    fn begin_write<E>(
        &self,
        mut state: MutexGuard<'_, State>,
        sync_bitmap: &impl Fn() -> Result<(), E>,
    ) -> Result<Started, CommitError<E>> {
        state.overlapped += u64::from(state.in_flight() > 0);
        let transaction = state.next;
        state.next += 1;
        let dropped = self.make_room(&mut state, transaction);
        state.evicting = dropped;
        let listed = state.listed.clone();
        state.sequence += 1;
        let sequence = state.sequence;
        state.writing[block_index(sequence)] = true;
        drop(state);
        let started = Started { transaction, sequence, dropped, listed };
        if dropped {
            let syncing = std::time::Instant::now();
            let synced = sync_bitmap();
            let took = syncing.elapsed().as_nanos() as u64;
            // The bitmap carries their bits now (a write marking one of
            // them again waits for a later transaction), and later
            // transactions may start; after a failed sync the log fails
            // before any can.
            let mut state = self.lock();
            state.bitmap_sync_nanos += took;
            state.leaving.clear();
            state.evicting = synced.is_err();
            drop(state);
            if let Err(error) = synced {
                self.finish(&started, Err("the bitmap could not be synced before extents left the log".into()));
                return Err(CommitError::Bitmap(error));
            }
            self.committed.notify_all();
        }
        Ok(started)
    }

    /// A transaction begun with [`ActivityLog::begin_write`] was written and
    /// made durable (`Ok`), or not (`Err`: why; the log fails for good: a
    /// failed write may have torn only its own block, but a later write
    /// could not be trusted either). Wakes whoever waits.
    fn finish(&self, started: &Started, result: Result<(), String>) {
        let mut state = self.lock();
        state.writing[block_index(started.sequence)] = false;
        match result {
            Ok(()) => {
                // A later transaction may have finished first: it covers
                // this one already.
                state.durable = state.durable.max(started.transaction);
                state.transactions += 1;
                state.bitmap_syncs += u64::from(started.dropped);
            }
            Err(why) => {
                state.failed.get_or_insert(why);
            }
        }
        drop(state);
        self.committed.notify_all();
    }

    /// Write the transaction numbered `sequence` listing `extents` to its
    /// block, durably (write, then fdatasync).
    fn write_block(&self, sequence: u64, extents: &[u64], action: &'static str) -> Result<(), ActivityLogError> {
        let mut buffer = AlignedBuf::new(self.block);
        encode(sequence, self.extent_bytes(), extents, buffer.as_mut_slice());
        let at = block_index(sequence) as u64 * self.block as u64;
        self.file
            .write_all_at(buffer.as_slice(), at)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| ActivityLogError { path: self.path.clone(), action, source })
    }

    /// Drop extents until the log fits, least recently used first, never
    /// one of `transaction` unless they alone overflow it. Whether any was
    /// dropped (the bitmap must then be synced before the log is written).
    fn make_room(&self, state: &mut State, transaction: u64) -> bool {
        if state.extents.len() <= self.capacity {
            return false;
        }
        // Down to a quarter: each bitmap msync costs more than its write
        // (it write-protects every page it writes, and the next mark in each
        // faults), so it should come rarely. 4k random writes over 1 TiB
        // dropping a quarter at a time: 240 msyncs and 27k faults a second,
        // 74k IOPS; dropping three quarters: 98, 12k and 86k IOPS.
        let target = self.capacity / 4;
        let mut candidates: Vec<(bool, u64, u64)> = state
            .extents
            .iter()
            .map(|(extent, entry)| (entry.transaction == transaction, entry.used, *extent))
            .collect();
        // Older transactions' extents first, then by last use.
        candidates.sort_unstable();
        let excess = state.extents.len() - target;
        for (index, (new, _, extent)) in candidates.into_iter().enumerate() {
            if index >= excess || (new && state.extents.len() <= self.capacity) {
                break;
            }
            if let Some(entry) = state.extents.remove(&extent) {
                // Listed by a transaction before this one (durable, or
                // being written): on disk there until the bitmap holds it.
                if entry.transaction < transaction {
                    state.leaving.push((extent, entry.transaction));
                }
                state.listed.swap_remove(entry.slot);
                if let Some(&moved) = state.listed.get(entry.slot) {
                    state.extents.get_mut(&moved).expect("a listed extent is in the map").slot = entry.slot;
                }
            }
        }
        true
    }

    /// Forget every extent and write an empty transaction: call it after the
    /// bitmap was made durable with no write in flight (a clean close).
    pub fn clear(&self) -> Result<(), ActivityLogError> {
        let mut state = self.lock();
        while state.in_flight() > 0 {
            state = self.committed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        // Written with the lock held: no transaction starts meanwhile.
        let sequence = state.sequence + 1;
        self.write_block(sequence, &[], "write an empty transaction")?;
        state.sequence = sequence;
        state.extents.clear();
        state.listed.clear();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError<E> {
    /// Writing the transaction failed.
    #[error(transparent)]
    Io(ActivityLogError),
    /// Syncing the bitmap before dropping extents failed.
    #[error("syncing the bitmap before extents leave the activity log failed")]
    Bitmap(E),
    /// An earlier commit failed: the log is not trusted any more.
    #[error("the activity log failed earlier: {0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// The log's geometry: the default bound keeps 4 MiB extents; a larger
    /// one gets larger extents, never more than 1,024 of them (a larger
    /// list makes every transaction's durable write slower); the bound
    /// covered is never less than asked for (up to the whole volume), and
    /// a region larger than 4 MiB is the smallest extent. Fails when a
    /// large bound makes the list (and every transaction) grow instead.
    #[test]
    fn a_larger_log_bound_gets_larger_extents_not_more_of_them() {
        const GIB: u64 = 1 << 30;
        const TIB: u64 = 1 << 40;
        assert_eq!(geometry_for(4 * GIB, TIB, 256 << 10), (4 << 20, 1024));
        assert_eq!(geometry_for(TIB, TIB, 256 << 10), (GIB, 1024));
        assert_eq!(geometry_for(64 * GIB, TIB, 256 << 10), (64 << 20, 1024));
        // A bound that is not a multiple: rounded up to whole extents.
        let (extent, capacity) = geometry_for(5 * GIB, TIB, 256 << 10);
        assert_eq!(extent, 8 << 20);
        assert!(capacity as u64 * extent >= 5 * GIB && capacity as u64 <= EXTENTS_PREFERRED);
        // The bound is at most the volume: a 1 GiB volume keeps 4 MiB extents.
        assert_eq!(geometry_for(4 * GIB, GIB, 256 << 10), (4 << 20, 256));
        assert_eq!(geometry_for(TIB, 10 * GIB, 16 << 20), (16 << 20, 640));
        // A bound above a volume that is not a multiple of the extent: the
        // log still holds the whole volume (its bits may clear without a
        // local fsync, `WriteIntentBitmap::log_keeps_every_extent`).
        let volume = 10 * GIB + 4096;
        let (extent, capacity) = geometry_for(TIB, volume, 256 << 10);
        assert_eq!(extent, 16 << 20);
        assert!(capacity as u64 * extent >= volume && capacity as u64 <= EXTENTS_PREFERRED);
        // No log.
        assert_eq!(geometry_for(0, TIB, 256 << 10).1, 0);
    }

    fn ok() -> Result<(), ()> {
        Ok(())
    }

    fn logged(path: &Path) -> Vec<u64> {
        match read(path).unwrap() {
            Found::Valid(transaction) => {
                let mut extents = transaction.extents;
                extents.sort_unstable();
                extents
            }
            other => panic!("{other:?}"),
        }
    }

    /// The list a transaction writes stays the map's extents through
    /// thousands of commits and evictions: each slot names its extent, and
    /// the newest block on disk lists exactly the extents held.
    #[test]
    fn the_written_list_is_exactly_the_extents_held() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 4 << 20, 16, 0).unwrap();
        let mut seed = 7u64;
        for _ in 0..2_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let extents: Vec<u64> = (0..1 + seed % 5).map(|index| (seed >> 20).wrapping_add(index * 7) % 64).collect();
            log.commit(extents, ok).unwrap();
            let state = log.lock();
            for (extent, entry) in &state.extents {
                assert_eq!(state.listed[entry.slot], *extent, "a slot names its extent");
            }
            let mut listed = state.listed.clone();
            listed.sort_unstable();
            let mut held: Vec<u64> = state.extents.keys().copied().collect();
            held.sort_unstable();
            assert_eq!(listed, held);
            drop(state);
            assert_eq!(logged(&path), held, "the newest block lists the extents held");
        }
    }

    /// A committed extent is in the newest block; an extent already logged
    /// costs no transaction.
    #[test]
    fn a_committed_extent_is_durable_and_costs_nothing_again() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 8, 0).unwrap();
        assert_eq!(logged(&path), Vec::<u64>::new());
        log.commit([3, 4], ok).unwrap();
        assert_eq!(logged(&path), [3, 4]);
        assert!(log.covers([3, 4]));
        log.commit([4], ok).unwrap();
        assert_eq!(log.stats().transactions, 1, "an extent already logged needs no transaction");
    }

    /// A torn write of the newest block leaves the one before, which lists
    /// every extent the torn one would have kept (a superset of what was
    /// durable before it).
    #[test]
    fn a_torn_transaction_falls_back_to_the_previous_one() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 8, 0).unwrap();
        log.commit([1], ok).unwrap();
        log.commit([2], ok).unwrap();
        log.commit([3], ok).unwrap();
        let Found::Valid(newest) = read(&path).unwrap() else { panic!() };
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * block_bytes(8) as u64, "three blocks");
        // Tear the newest block: half of its first page is old data.
        let block = block_bytes(8) as u64;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xa5; 20], (newest.sequence % BLOCKS) * block + 20).unwrap();
        let Found::Valid(previous) = read(&path).unwrap() else { panic!("the older block is whole") };
        assert_eq!(previous.sequence, newest.sequence - 1);
        assert_eq!(previous.extents, [1, 2]);
        // All torn: damaged.
        for sequence in [previous.sequence, previous.sequence - 1] {
            file.write_all_at(&[0xa5; 20], (sequence % BLOCKS) * block + 36).unwrap();
        }
        assert_eq!(read(&path).unwrap(), Found::Damaged);
    }

    /// A log of the layout before this one (version 1: two blocks, written
    /// by an earlier release and left by a crash) is still read: its newest
    /// whole block. A version-1 block is not taken for a block of the new
    /// layout, nor the other way round.
    #[test]
    fn a_version_one_log_of_two_blocks_is_still_read() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let block = block_bytes(8);
        let version_one = |sequence: u64, extents: &[u64]| {
            let mut bytes = vec![0u8; block];
            encode(sequence, 1 << 20, extents, &mut bytes);
            bytes[8..12].copy_from_slice(&VERSION_TWO_BLOCKS.to_le_bytes());
            let crc = block_crc(&bytes, extents.len());
            bytes[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
            bytes
        };
        // Sequence 8 in block 0, 9 in block 1 (n % 2).
        let mut file = version_one(8, &[4]);
        file.extend(version_one(9, &[4, 5]));
        std::fs::write(&path, &file).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            Found::Valid(Transaction { sequence: 9, extent_bytes: 1 << 20, extents: vec![4, 5] })
        );
        // Torn newer block: the older one.
        file[block + 20] ^= 0xff;
        std::fs::write(&path, &file).unwrap();
        assert_eq!(
            read(&path).unwrap(),
            Found::Valid(Transaction { sequence: 8, extent_bytes: 1 << 20, extents: vec![4] })
        );
        // A version-2 block where the two-block layout puts one is not read
        // as one (nor a version-1 block as a version-2 one).
        let mut bytes = vec![0u8; 2 * block];
        encode(5, 1 << 20, &[1], &mut bytes[block..]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path).unwrap(), Found::Damaged);
    }

    /// Dropping an extent from a full log syncs the bitmap before the
    /// transaction that no longer lists it is written; a failed sync fails
    /// the commit and every later one.
    #[test]
    fn eviction_syncs_the_bitmap_before_the_log_forgets() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 8, 0).unwrap();
        let syncs = AtomicU64::new(0);
        let sync = || -> Result<(), ()> {
            // While the bitmap is synced, the log on disk still lists every
            // extent about to be dropped.
            assert_eq!(logged(&path), [0, 1, 2, 3, 4, 5, 6, 7], "the log forgot extents before the bitmap held them");
            // And the check of issue order still counts them as logged.
            assert!(log.covers(0..8), "extents the log on disk lists read as not covered");
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        log.commit(0..8, sync).unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 0, "the log had room");
        log.commit([7], sync).unwrap();
        log.commit([9], sync).unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 1, "dropping extents synced the bitmap");
        // Three quarters go at once, least recently used first: the new
        // extent and the one used last stay.
        assert_eq!(logged(&path), [7, 9]);
        assert!(log.covers([7, 9]) && !log.covers([0]), "the extents dropped still read as covered");
        log.commit([10, 11], ok).unwrap();
        let failing = || -> Result<(), ()> { Err(()) };
        assert!(matches!(log.commit(20..26, failing), Err(CommitError::Bitmap(()))));
        assert!(!logged(&path).contains(&20), "nothing was written without the bitmap sync");
        assert!(matches!(log.commit([3], ok), Err(CommitError::Failed(_))));
    }

    /// More new extents than the log holds: those that do not fit are
    /// covered by a bitmap sync, and the log stays within its size.
    #[test]
    fn a_batch_larger_than_the_log_syncs_the_bitmap() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 4, 0).unwrap();
        let syncs = AtomicU64::new(0);
        log.commit(0..10, || -> Result<(), ()> {
            syncs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(syncs.load(Ordering::SeqCst), 1);
        assert!(logged(&path).len() <= 4);
    }

    /// The counters in status: each transaction that dropped extents counts
    /// one bitmap sync and the time it took (what an operator reads as the
    /// eviction stall); a transaction that dropped none counts neither.
    #[test]
    fn bitmap_syncs_are_counted_with_the_time_they_took() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 4, 0).unwrap();
        let slow = || -> Result<(), ()> {
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(())
        };
        log.commit(0..3, slow).unwrap();
        let before = log.stats();
        assert_eq!((before.transactions, before.bitmap_syncs, before.bitmap_sync_nanos), (1, 0, 0));
        log.commit(3..8, slow).unwrap();
        let after = log.stats();
        assert_eq!((after.transactions, after.bitmap_syncs), (2, 1));
        assert!(after.bitmap_sync_nanos >= 20_000_000, "{after:?}");
        assert_eq!((after.extent_bytes, after.capacity), (1 << 20, 4));
    }

    /// A failed bitmap sync before extents leave the log fails the
    /// transaction and the log: nothing is written, and every later commit
    /// fails too.
    #[test]
    fn a_failed_bitmap_sync_fails_the_transaction_and_the_log() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 1, 0).unwrap();
        log.commit([1], ok).unwrap();
        // The log is full: logging extent 2 drops extent 1 after a bitmap
        // sync, which fails here.
        assert!(matches!(log.commit([2], || Err::<(), ()>(())), Err(CommitError::Bitmap(()))));
        assert!(matches!(log.commit([1], ok), Err(CommitError::Failed(_))), "the log failed for good");
        assert_eq!(logged(&path), vec![1], "nothing was written");
    }

    /// What the log retains: durably logged extents, and nothing once a
    /// write of it failed (its content on disk is unknown).
    #[test]
    fn a_log_retains_its_durable_extents_until_a_write_of_it_fails() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let mut log = ActivityLog::create(&path, 1 << 20, 4, 0).unwrap();
        log.commit([1], ok).unwrap();
        assert_eq!(log.retained([1, 2]), [true, false], "extent 1 is logged, 2 is not");
        // The file can no longer be written: the next transaction fails,
        // and the log with it.
        log.file = File::open(&path).unwrap();
        assert!(matches!(log.commit([2], ok), Err(CommitError::Io(_))));
        assert_eq!(log.retained([1]), [false], "a failed log retains nothing");
    }

    /// Writers asking at once share transactions: many threads each
    /// committing new extents write far fewer transactions than commits,
    /// and every extent asked for ends up logged (the log is large enough).
    #[test]
    fn concurrent_writers_share_transactions() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = Arc::new(ActivityLog::create(&path, 1 << 20, 1024, 0).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|thread| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for index in 0..50u64 {
                        log.commit([thread * 100 + index], ok).unwrap();
                        assert!(log.covers([thread * 100 + index]));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(logged(&path).len(), 400);
        let transactions = log.stats().transactions;
        assert!(transactions < 400, "{transactions} transactions for 400 commits: no group commit");
    }

    /// A transaction logging `extent`, begun and held before its write (a
    /// writer stalled): the test writes it with [`finish_held`].
    fn hold(log: &ActivityLog, extent: u64) -> Started {
        let mut state = log.lock();
        ActivityLog::add(&mut state, [extent]);
        log.begin_write(state, &ok).unwrap()
    }

    /// Write a transaction from [`hold`] and finish it, as a writer would.
    fn finish_held(log: &ActivityLog, started: &Started) {
        let result = log.write_block(started.sequence, &started.listed, "write a transaction");
        log.finish(started, result.map_err(|error| error.to_string()));
    }

    /// Commit `extent` on a thread of its own: the thread, and a receiver
    /// that gets a message once the commit returned.
    fn commit_in_background(
        log: &Arc<ActivityLog>,
        extent: u64,
    ) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>) {
        let (done_tx, done) = std::sync::mpsc::channel();
        let log = Arc::clone(log);
        let thread = std::thread::spawn(move || {
            log.commit([extent], ok).unwrap();
            done_tx.send(()).unwrap();
        });
        (thread, done)
    }

    /// A commit of an extent that a transaction being written (by another
    /// thread) lists returns only once that transaction is durable, and the
    /// extent is not covered before. Fails if `commit` took an extent
    /// already logged in memory for a durable one, or if `durable` rose
    /// before the write.
    #[test]
    fn a_commit_waits_for_the_transaction_its_extent_is_in() {
        let directory = tempfile::tempdir().unwrap();
        let log = Arc::new(ActivityLog::create(&directory.path().join("v.cmal"), 1 << 20, 64, 0).unwrap());
        let held = hold(&log, 1);
        let (thread, done) = commit_in_background(&log, 1);
        assert!(
            done.recv_timeout(std::time::Duration::from_millis(200)).is_err(),
            "the commit returned while its transaction was still being written"
        );
        assert!(!log.covers([1]));
        finish_held(&log, &held);
        done.recv_timeout(std::time::Duration::from_secs(10)).expect("the commit returns once it is durable");
        thread.join().unwrap();
        assert!(log.covers([1]));
        assert_eq!(log.stats().transactions, 1, "the commit shared the transaction being written");
    }

    /// No third transaction starts while two are being written: with A and
    /// B begun and held, a commit of a new extent waits (its block is free,
    /// but it would overwrite the newest durable transaction, the only one
    /// a power cut could still find whole). Fails without the limit.
    #[test]
    fn at_most_two_transactions_are_written_at_once() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = Arc::new(ActivityLog::create(&path, 1 << 20, 64, 0).unwrap());
        let held = [hold(&log, 1), hold(&log, 2)];
        let (third, done) = commit_in_background(&log, 3);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(done.try_recv().is_err(), "a third transaction was written while two were");
        assert_eq!(
            read(&path).unwrap(),
            Found::Valid(Transaction { sequence: 1, extent_bytes: 1 << 20, extents: vec![] })
        );
        for started in &held {
            finish_held(&log, started);
        }
        third.join().unwrap();
        assert_eq!(logged(&path), [1, 2, 3]);
    }

    /// A transaction that finishes after a later one leaves the later one's
    /// writers durable: with A begun and held, B (which lists A's extent
    /// too) is written and both extents are covered; A finishing afterwards
    /// does not take that back. Fails when `durable` is set to the
    /// transaction that finished rather than raised to it.
    #[test]
    fn a_later_transaction_covers_an_earlier_one_still_in_flight() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 64, 0).unwrap();
        let stalled = hold(&log, 1);
        log.commit([2], ok).unwrap();
        assert_eq!(logged(&path), [1, 2], "the later transaction lists the earlier one's extent");
        assert!(log.covers([1, 2]), "the later transaction, durable, covers both");
        finish_held(&log, &stalled);
        assert!(log.covers([1, 2]), "the earlier transaction finishing last took back what the later one made durable");
    }

    /// Two transactions are written at once (on a file system that takes
    /// O_DIRECT, as the disk under /var/tmp does): writers committing new
    /// extents from four threads start transactions while another is being
    /// written, and the newest block lists every extent. Fails with one
    /// writer at a time.
    #[test]
    fn two_transactions_are_written_at_once() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = directory.path().join("v.cmal");
        let log = Arc::new(ActivityLog::create(&path, 1 << 20, 1024, 0).unwrap());
        assert!(log.writes_direct(), "the log on /var/tmp is written with O_DIRECT");
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for index in 0..100u64 {
                        log.commit([thread * 1000 + index], ok).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(logged(&path).len(), 400);
        let stats = log.stats();
        assert!(stats.overlapped > 0, "no transaction started while another was written: {stats:?}");
        assert_eq!(log.lock().in_flight(), 0);
    }

    /// While a transaction that dropped extents syncs the bitmap, no other
    /// transaction starts: one written then would no longer list the
    /// dropped extents, while their bits may not be durable yet. A commit
    /// of a new extent during the sync waits for it, and the block on disk
    /// lists every dropped extent until the sync is done. Fails when a
    /// transaction may start during an eviction's sync.
    #[test]
    fn no_transaction_starts_while_an_eviction_syncs_the_bitmap() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = Arc::new(ActivityLog::create(&path, 1 << 20, 4, 0).unwrap());
        log.commit(0..4, ok).unwrap();
        let (syncing_tx, syncing) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let evicting = {
            let log = Arc::clone(&log);
            let checked = Arc::clone(&log);
            std::thread::spawn(move || {
                log.commit([4], || -> Result<(), ()> {
                    // The dropped extents still count as logged: the block
                    // on disk lists them until the sync is done.
                    assert!(checked.covers(0..4), "extents the log on disk lists read as not covered");
                    syncing_tx.send(()).unwrap();
                    released.recv().unwrap();
                    Ok(())
                })
            })
        };
        syncing.recv().unwrap();
        let (other, done) = commit_in_background(&log, 9);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(done.try_recv().is_err(), "a commit finished while an eviction's bitmap sync ran");
        assert_eq!(
            logged(&path),
            [0, 1, 2, 3],
            "a transaction without the dropped extents was written before the sync"
        );
        release.send(()).unwrap();
        evicting.join().unwrap().unwrap();
        other.join().unwrap();
        assert!(logged(&path).contains(&9) && log.covers([4, 9]));
    }

    /// A transaction never goes to a block an older one is still writing:
    /// with transaction A stalled before its write, B and C are written
    /// (two at once), and D, whose block is A's, waits until A's write is
    /// done. Otherwise A's late write would land over D after D's writers
    /// were released, and a power cut would find only C, which does not
    /// list D's extent. Fails when only the count of transactions in
    /// flight limits a start.
    #[test]
    fn a_transaction_waits_while_its_block_is_still_being_written() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = Arc::new(ActivityLog::create(&path, 1 << 20, 64, 0).unwrap());
        let stalled = hold(&log, 1);
        log.commit([2], ok).unwrap();
        log.commit([3], ok).unwrap();
        let (fourth, done) = commit_in_background(&log, 4);
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(done.try_recv().is_err(), "a transaction was counted durable while an older one still wrote its block");
        assert_eq!(logged(&path), [1, 2, 3]);
        finish_held(&log, &stalled);
        fourth.join().unwrap();
        assert_eq!(logged(&path), [1, 2, 3, 4], "the newest block lists the last transaction's extent");
    }

    /// The new log's empty block is where its first transaction does not
    /// go: a torn first write leaves it, not a damaged log.
    #[test]
    fn a_torn_first_transaction_leaves_the_empty_log() {
        for sequence in 0..3 {
            let directory = tempfile::tempdir().unwrap();
            let path = directory.path().join("v.cmal");
            let log = ActivityLog::create(&path, 1 << 20, 8, sequence).unwrap();
            log.commit([1], ok).unwrap();
            let Found::Valid(first) = read(&path).unwrap() else { panic!() };
            let block = block_bytes(8) as u64;
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all_at(&[0xa5; 20], block_index(first.sequence) as u64 * block + 20).unwrap();
            assert_eq!(
                read(&path).unwrap(),
                Found::Valid(Transaction { sequence: sequence + 1, extent_bytes: 1 << 20, extents: vec![] }),
                "created after sequence {sequence}"
            );
        }
    }

    /// clear leaves an empty log that a reopen reads as empty, at a newer sequence.
    #[test]
    fn clear_writes_an_empty_transaction() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("v.cmal");
        let log = ActivityLog::create(&path, 1 << 20, 8, 5).unwrap();
        log.commit([1, 2], ok).unwrap();
        log.clear().unwrap();
        let Found::Valid(transaction) = read(&path).unwrap() else { panic!() };
        assert!(transaction.extents.is_empty() && transaction.sequence == 8, "{transaction:?}");
        assert!(!log.covers([1]));
    }
}
