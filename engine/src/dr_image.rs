//! A copy's way back to its last consistent image while it catches up
//! (issue 13, item 2; DRBD's `before-resync-target` snapshot, built in).
//!
//! A resync pass overwrites a copy region by region in bitmap order while
//! new writes keep arriving, so until the pass ends the copy's store is no
//! image the production volume ever had. Before a change overwrites a 4 KiB
//! block for the first time in a pass, the block's old contents are
//! appended to an undo journal beside the store (`<volume>.cmundo`) and made
//! durable; when the pass ends (the store is recorded consistent again) the
//! journal is deleted. Until then, [`roll_back`] writes every saved block
//! back: the store is again exactly the consistent image it held when the
//! pass began.
//!
//! ```text
//!  pass begins (metadata consistent → syncing) ─▶ journal created: header (image generation, time)
//!  changes to blocks B…, first time this pass  ─▶ read each run ─▶ append (B, crc, bytes) … ─▶ one fdatasync ─▶ apply them
//!  pass ends (SYNCED flush, metadata consistent) ─▶ journal deleted
//!  crossmirror rollback / a forced promotion    ─▶ every entry written back ─▶ fsync ─▶ consistent, new store token
//! ```
//!
//! The unit saved is a 4 KiB block: a change saves the blocks it touches,
//! an entry being a run of them inside one 64 KiB chunk, with a CRC. (Until
//! version 2 the unit was the whole 64 KiB chunk, so a pass of 4 KiB writes
//! at random journalled sixteen times what it wrote; a version-1 journal
//! left by an older copy host is still resumed and rolled back in its own
//! unit.) At most
//! [`UNSYNCED_ENTRIES_MAX`] entries are appended between two fdatasyncs (the
//! changes that arrived together share one), and a crash may leave any of
//! them torn or missing, in any order writeback took them: so an entry that
//! does not check out within the bytes that many entries can hold (4 MiB
//! and their headers) of the end starts a torn tail, cut off when the
//! journal is opened again. That loses nothing: none of their blocks was
//! overwritten, since a change is applied only after its entry is durable.
//! A bad entry further from the end is damage, and the journal is refused.
//! (Damage within that distance of the end is cut off like a torn append:
//! with 4 KiB entries that window holds up to about a thousand of them,
//! where version 1's held 64 chunks.) The journal may grow to
//! the bytes a pass changes; past its limit it is dropped (the copy then
//! keeps no consistent image until the pass ends), never the pass stopped.

use crate::durable_file::sync_directory;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::volume::Volume;

/// The suffix appended to a volume's metadata path stem to name its journal.
pub const UNDO_FILE_SUFFIX: &str = ".cmundo";
/// The most one entry holds; an entry never crosses a chunk's end.
pub const CHUNK_BYTES: u64 = 64 << 10;
/// The unit of a saved before-image in a journal of this version.
pub const BLOCK_BYTES: u64 = 4 << 10;

const MAGIC: [u8; 8] = *b"CMUNDO\0\0";
/// This version's journals save 4 KiB blocks; version 1 saved whole chunks.
const VERSION: u32 = 2;
const VERSION_WHOLE_CHUNKS: u32 = 1;
const HEADER_BYTES: usize = 64;
const ENTRY_MAGIC: u32 = 0x434d_5545;
const ENTRY_HEADER_BYTES: usize = 20;
/// Chunks read and appended at once by a save (4 MiB).
const SAVE_BATCH_CHUNKS: usize = 64;
/// The most entries appended between two fdatasyncs of the journal: the
/// writes that arrive together share one (the copy host holds at most 64);
/// the bytes they can hold are how near the end the reader takes a bad
/// entry for a torn tail.
pub const UNSYNCED_ENTRIES_MAX: usize = SAVE_BATCH_CHUNKS;
/// The most bytes of entries appended between two fdatasyncs (each entry
/// holds at most a chunk): a torn append lies within this many bytes of the
/// journal's end.
const TAIL_BYTES_MAX: usize = UNSYNCED_ENTRIES_MAX * (ENTRY_HEADER_BYTES + CHUNK_BYTES as usize);

/// The consistent image a journal leads back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Image {
    /// The volume generation the store held when the pass began.
    pub generation: u64,
    /// When the pass began (Unix milliseconds): the image is of that moment
    /// or earlier (the copy's recovery point, once rolled back).
    pub taken_at_ms: u64,
    /// The token of the store the journal was kept for: a journal is never
    /// applied to another store (a disk replaced at the same path).
    pub store: [u8; 16],
}

/// The undo journal of one copy store during a resync pass.
#[derive(Debug)]
pub struct UndoJournal {
    file: File,
    path: PathBuf,
    image: Image,
    volume_size: u64,
    /// The unit saved: [`BLOCK_BYTES`], or [`CHUNK_BYTES`] in a version-1
    /// journal resumed.
    unit: u64,
    /// The units saved this pass: for each chunk, a bit per unit of it.
    saved: HashMap<u64, u16>,
    bytes: u64,
    limit: u64,
    /// Entries appended since the last fdatasync.
    unsynced: usize,
}

/// What [`UndoJournal::save_deferred`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Every chunk of the extent is in the journal (durably once
    /// [`UndoJournal::sync`] returns).
    Kept,
    /// The journal would pass its limit: the caller drops it.
    LimitReached,
}

/// What [`roll_back`] restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The image the store holds again.
    pub image: Image,
    /// Entries written back (runs of blocks, at most a chunk each).
    pub entries: u64,
    /// The bytes they hold.
    pub bytes: u64,
    /// The last entries did not check out and were cut off as a torn
    /// append (whose blocks were not overwritten yet; damage that near the
    /// end looks the same).
    pub torn_tail: bool,
}

/// The journal's path for a store whose metadata is at `metadata_path`.
pub fn journal_path(metadata_path: &Path) -> PathBuf {
    let mut name = metadata_path.as_os_str().to_owned();
    name.push(UNDO_FILE_SUFFIX);
    PathBuf::from(name)
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("undo journal {}: {message}", path.display()))
}

fn header_bytes(image: Image, volume_size: u64, unit: u64) -> [u8; HEADER_BYTES] {
    let version = if unit == CHUNK_BYTES { VERSION_WHOLE_CHUNKS } else { VERSION };
    let mut bytes = [0u8; HEADER_BYTES];
    bytes[0..8].copy_from_slice(&MAGIC);
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    bytes[12..16].copy_from_slice(&(unit as u32).to_le_bytes());
    bytes[16..24].copy_from_slice(&volume_size.to_le_bytes());
    bytes[24..32].copy_from_slice(&image.generation.to_le_bytes());
    bytes[32..40].copy_from_slice(&image.taken_at_ms.to_le_bytes());
    bytes[40..56].copy_from_slice(&image.store);
    let crc = crc32fast::hash(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// One entry read back: where its bytes go back to, and the bytes.
struct Entry {
    offset: u64,
    data: Vec<u8>,
}

/// A journal read back.
struct Journal {
    image: Image,
    /// The unit its entries are numbered in.
    unit: u64,
    entries: Vec<Entry>,
    /// The offset where the whole entries end (a torn tail starts there).
    end: u64,
    torn: bool,
}

/// Read the header and every whole entry of the journal at `path`.
fn read_journal(path: &Path, volume_size: u64) -> io::Result<Journal> {
    let mut file = File::open(path)?;
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact(&mut header).map_err(|_| invalid(path, "shorter than its header"))?;
    if header[0..8] != MAGIC || u32_at(&header, 60) != crc32fast::hash(&header[..60]) {
        return Err(invalid(path, "damaged header"));
    }
    let unit = match (u32_at(&header, 8), u64::from(u32_at(&header, 12))) {
        (VERSION, BLOCK_BYTES) => BLOCK_BYTES,
        (VERSION_WHOLE_CHUNKS, CHUNK_BYTES) => CHUNK_BYTES,
        _ => return Err(invalid(path, "another version or unit size")),
    };
    if u64_at(&header, 16) != volume_size {
        return Err(invalid(path, format!("made for a volume of {} bytes, not {volume_size}", u64_at(&header, 16))));
    }
    let image = Image {
        generation: u64_at(&header, 24),
        taken_at_ms: u64_at(&header, 32),
        store: header[40..56].try_into().expect("16 bytes"),
    };
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    let mut entries = Vec::new();
    let mut at = 0usize;
    let torn = loop {
        if at == rest.len() {
            break false;
        }
        if let Some((index, len)) = entry_at(&rest, at, unit, volume_size) {
            let data = &rest[at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + len];
            entries.push(Entry { offset: index * unit, data: data.to_vec() });
            at += ENTRY_HEADER_BYTES + len;
            continue;
        }
        // A torn append lies among the entries appended since the last
        // fdatasync: at most UNSYNCED_ENTRIES_MAX, so within the last
        // TAIL_BYTES_MAX bytes. An entry that does not check out further
        // from the end is damage. (Nearer the end, damage cannot be told
        // from a torn append by the bytes alone, and is cut off like one.
        // The rule reads no entry after the bad one: what follows it is
        // before-images, data a client wrote, which could be made to look
        // like entries.)
        if rest.len() - at <= TAIL_BYTES_MAX {
            break true;
        }
        return Err(invalid(path, format!("damaged entry at byte {}", HEADER_BYTES + at)));
    };
    Ok(Journal { image, unit, entries, end: (HEADER_BYTES + at) as u64, torn })
}

/// The entry at byte `at` of `rest` (the journal after its header), if one
/// checks out there: its first unit and its length.
fn entry_at(rest: &[u8], at: usize, unit: u64, volume_size: u64) -> Option<(u64, usize)> {
    let head = rest.get(at..at + ENTRY_HEADER_BYTES)?;
    let (index, len) = (u64_at(head, 4), u32_at(head, 12) as usize);
    if u32_at(head, 0) != ENTRY_MAGIC || len as u64 > CHUNK_BYTES {
        return None;
    }
    let data = rest.get(at + ENTRY_HEADER_BYTES..at + ENTRY_HEADER_BYTES + len)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[..16]);
    hasher.update(data);
    // Within the volume, and a run of units inside one chunk, as written.
    let inside = len > 0
        && index.checked_mul(unit).is_some_and(|start| {
            start
                .checked_add(len as u64)
                .is_some_and(|end| end <= volume_size && start / CHUNK_BYTES == (end - 1) / CHUNK_BYTES)
        });
    (hasher.finalize() == u32_at(head, 16) && inside).then_some((index, len))
}

impl UndoJournal {
    /// Start a journal for a pass beginning now on a store that holds the
    /// consistent `image`; any older journal at `path` is replaced.
    pub fn begin(path: &Path, image: Image, volume_size: u64, limit: u64) -> io::Result<UndoJournal> {
        UndoJournal::begin_in(path, image, volume_size, limit, BLOCK_BYTES)
    }

    /// [`UndoJournal::begin`] in `unit`s (a version-1 journal, for tests).
    fn begin_in(path: &Path, image: Image, volume_size: u64, limit: u64, unit: u64) -> io::Result<UndoJournal> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        file.write_all(&header_bytes(image, volume_size, unit))?;
        file.sync_all()?;
        sync_directory(path)?;
        Ok(UndoJournal {
            file,
            path: path.to_path_buf(),
            image,
            volume_size,
            unit,
            saved: HashMap::new(),
            bytes: HEADER_BYTES as u64,
            limit,
            unsynced: 0,
        })
    }

    /// Carry on with the journal at `path` (the copy restarted in the
    /// middle of a pass): its entries are kept, a torn tail cut off.
    pub fn resume(path: &Path, volume_size: u64, limit: u64) -> io::Result<UndoJournal> {
        let Journal { image, unit, entries, end, .. } = read_journal(path, volume_size)?;
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        file.set_len(end)?;
        file.sync_all()?;
        file.seek(SeekFrom::End(0))?;
        let mut journal = UndoJournal {
            file,
            path: path.to_path_buf(),
            image,
            volume_size,
            unit,
            saved: HashMap::new(),
            bytes: end,
            limit,
            unsynced: 0,
        };
        for entry in &entries {
            let first = entry.offset / unit;
            journal.mark_saved(first, (entry.data.len() as u64).div_ceil(unit));
        }
        Ok(journal)
    }

    /// Units `first..first + count`, inside one chunk, are saved.
    fn mark_saved(&mut self, first: u64, count: u64) {
        let per_chunk = CHUNK_BYTES / self.unit;
        let bits = (u32::MAX >> (32 - count)) << (first % per_chunk);
        *self.saved.entry(first / per_chunk).or_default() |= bits as u16;
    }

    /// The runs of units of `len` bytes at `offset` not saved yet, each
    /// inside one chunk: (first unit, units), in order.
    fn unsaved_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let per_chunk = CHUNK_BYTES / self.unit;
        let first = offset / self.unit;
        let last = (offset + len - 1).min(self.volume_size.saturating_sub(1)) / self.unit;
        let mut runs = Vec::new();
        for chunk in first / per_chunk..=last / per_chunk {
            let from = first.max(chunk * per_chunk) - chunk * per_chunk;
            let to = last.min(chunk * per_chunk + per_chunk - 1) - chunk * per_chunk;
            let touched = (u32::MAX >> (31 - to)) & (u32::MAX << from);
            let mut unsaved = touched & !u32::from(self.saved.get(&chunk).copied().unwrap_or(0));
            while unsaved != 0 {
                let start = unsaved.trailing_zeros();
                let count = (!(unsaved >> start)).trailing_zeros();
                runs.push((chunk * per_chunk + u64::from(start), u64::from(count)));
                unsaved &= !((u32::MAX >> (32 - count)) << start);
            }
        }
        runs
    }

    /// The bytes a run of units holds (the volume's last may be short).
    fn run_bytes(&self, (first, count): (u64, u64)) -> u64 {
        let start = first * self.unit;
        (count * self.unit).min(self.volume_size - start)
    }

    /// The image this journal leads back to.
    pub fn image(&self) -> Image {
        self.image
    }

    /// The journal's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Before `len` bytes at `offset` of `volume` are changed: save every
    /// block of the extent not saved yet in this pass, durably.
    #[cfg(test)]
    pub fn save(&mut self, volume: &Volume, offset: u64, len: u64) -> io::Result<Saved> {
        let saved = self.save_deferred(volume, offset, len)?;
        self.sync()?;
        Ok(saved)
    }

    /// [`UndoJournal::save`] without the fdatasync: the before-images are
    /// durable only once [`UndoJournal::sync`] returns, and no change they
    /// cover may be issued before it. Saving the chunks of many changes and
    /// syncing once lets a pass apply a burst of writes for one fdatasync.
    pub fn save_deferred(&mut self, volume: &Volume, offset: u64, len: u64) -> io::Result<Saved> {
        if len == 0 {
            return Ok(Saved::Kept);
        }
        let new = self.unsaved_runs(offset, len);
        if new.is_empty() {
            return Ok(Saved::Kept);
        }
        let adding: u64 = new.iter().map(|&run| self.run_bytes(run) + ENTRY_HEADER_BYTES as u64).sum();
        if self.bytes + adding > self.limit {
            return Ok(Saved::LimitReached);
        }
        // In batches of at most SAVE_BATCH_CHUNKS (a trim of gigabytes is
        // one frame): bounded memory, one fdatasync at the end.
        for batch in new.chunks(SAVE_BATCH_CHUNKS) {
            // A crash tears only the entries after the last fdatasync: keep
            // them few enough for the reader to tell a torn tail from damage.
            if self.unsynced + batch.len() > UNSYNCED_ENTRIES_MAX {
                self.sync()?;
            }
            self.append(volume, batch)?;
            self.unsynced += batch.len();
        }
        for (first, count) in new {
            self.mark_saved(first, count);
        }
        Ok(Saved::Kept)
    }

    /// Make every before-image saved so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced > 0 {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Append the before-images of `runs` (not made durable here).
    fn append(&mut self, volume: &Volume, runs: &[(u64, u64)]) -> io::Result<()> {
        let bytes: u64 = runs.iter().map(|&run| self.run_bytes(run) + ENTRY_HEADER_BYTES as u64).sum();
        let mut appended = Vec::with_capacity(bytes as usize);
        for &(first, count) in runs {
            let length = self.run_bytes((first, count));
            let data = volume.read_synchronously(first * self.unit, length)?;
            let mut head = [0u8; ENTRY_HEADER_BYTES];
            head[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
            head[4..12].copy_from_slice(&first.to_le_bytes());
            head[12..16].copy_from_slice(&(length as u32).to_le_bytes());
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&head[..16]);
            hasher.update(&data);
            head[16..20].copy_from_slice(&hasher.finalize().to_le_bytes());
            appended.extend_from_slice(&head);
            appended.extend_from_slice(&data);
        }
        self.file.write_all_at(&appended, self.bytes)?;
        self.bytes += appended.len() as u64;
        Ok(())
    }

    /// The pass ended (the store is consistent again) or the journal is
    /// given up: delete it.
    pub fn discard(self) -> io::Result<()> {
        match remove_journal(&self.path) {
            Ok(()) => Ok(()),
            Err(error) => {
                // Never leave a journal that misses what came after: one
                // that cannot be removed loses its header, and with it any
                // use (a restart or a rollback refuses it).
                let _ = self.file.write_all_at(&[0u8; HEADER_BYTES], 0);
                let _ = self.file.sync_data();
                Err(error)
            }
        }
    }
}

/// Delete the journal at `path` (durably; none there is fine).
pub fn remove_journal(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_directory(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

/// Write every chunk the journal at `journal` saved back to the store at
/// `store` (`volume_size` bytes; nothing else may hold it), fsync it: the
/// store holds the journal's image again. The caller records the store
/// consistent (with a new store token: the production host's view of this
/// store no longer holds) and then removes the journal.
pub fn roll_back(store: &Path, journal: &Path, volume_size: u64) -> io::Result<RolledBack> {
    let Journal { image, entries, torn: torn_tail, .. } = read_journal(journal, volume_size)?;
    let file = OpenOptions::new().write(true).open(store)?;
    for entry in &entries {
        file.write_all_at(&entry.data, entry.offset)?;
    }
    file.sync_all()?;
    let bytes = entries.iter().map(|entry| entry.data.len() as u64).sum();
    Ok(RolledBack { image, entries: entries.len() as u64, bytes, torn_tail })
}

/// Why a store could not be brought back to its last consistent image.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The metadata could not be read or written.
    #[error(transparent)]
    Metadata(#[from] crate::metadata::MetadataError),
    /// The store is consistent already: nothing to bring back.
    #[error("{store} holds a consistent image already (its metadata says so); nothing to roll back")]
    Consistent {
        /// The store.
        store: PathBuf,
    },
    /// A pass runs and no way back was kept.
    #[error(
        "{store} is in the middle of a resync and no undo journal was kept ({journal} is missing): it holds no \
         consistent image; resync it from a production host"
    )]
    NoJournal {
        /// The store.
        store: PathBuf,
        /// Where the journal would be.
        journal: PathBuf,
    },
    /// The journal leads to another image than the one asked for (a forced
    /// promotion names the image the group recorded).
    #[error(
        "{store}'s undo journal leads to the image of generation {found_generation} taken at {found_taken_at_ms}, \
         not the one asked for (generation {generation} taken at {taken_at_ms})"
    )]
    OtherImage {
        /// The store.
        store: PathBuf,
        /// The image asked for.
        generation: u64,
        /// Its time (Unix ms).
        taken_at_ms: u64,
        /// The journal's image.
        found_generation: u64,
        /// Its time.
        found_taken_at_ms: u64,
    },
    /// Another process holds the store.
    #[error("{store} is in use by another process (a copy host or production host); stop it first")]
    InUse {
        /// The store.
        store: PathBuf,
    },
    /// Reading the journal or writing the store failed.
    #[error("rolling {store} back: {source}")]
    Io {
        /// The store.
        store: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// Bring the store at `store` (metadata `files`, `volume_size` bytes) back
/// to the consistent image its undo journal leads to, when it is in the
/// middle of a pass: the chunks written back, the store recorded
/// consistent at the image's generation with a new store token (any record
/// of this store's contents is void: a production host resyncs it in full),
/// the journal removed. `Ok(None)`: the store is consistent already.
/// `expect` (generation, Unix ms): refuse unless the journal leads to that
/// image (a forced promotion rolls back to the image the group recorded,
/// never another).
pub fn restore_image(
    store: &Path,
    files: &crate::metadata::MetadataFiles,
    volume_size: u64,
    expect: Option<(u64, u64)>,
) -> Result<Option<RolledBack>, RestoreError> {
    use crate::metadata::{load_metadata, new_store_token, store_metadata, StoreState};
    let io_error = |source| RestoreError::Io { store: store.to_path_buf(), source };
    let Some(metadata) = load_metadata(&files.metadata)? else { return Ok(None) };
    if metadata.state != StoreState::Syncing {
        return Ok(None);
    }
    let journal = journal_path(&files.metadata);
    if !journal.exists() {
        return Err(RestoreError::NoJournal { store: store.to_path_buf(), journal });
    }
    let image = read_journal(&journal, volume_size).map_err(io_error)?.image;
    if image.store != metadata.store_token {
        return Err(RestoreError::Io {
            store: store.to_path_buf(),
            source: invalid(&journal, "was kept for another store (its token differs): the store was replaced"),
        });
    }
    if let Some((generation, taken_at_ms)) =
        expect.filter(|&expected| expected != (image.generation, image.taken_at_ms))
    {
        return Err(RestoreError::OtherImage {
            store: store.to_path_buf(),
            generation,
            taken_at_ms,
            found_generation: image.generation,
            found_taken_at_ms: image.taken_at_ms,
        });
    }
    let held = File::open(store).map_err(io_error)?;
    if !crate::file_lock::try_lock_exclusive(std::os::fd::AsRawFd::as_raw_fd(&held)).map_err(io_error)? {
        return Err(RestoreError::InUse { store: store.to_path_buf() });
    }
    let rolled = roll_back(store, &journal, volume_size).map_err(io_error)?;
    let restored = crate::metadata::VolumeMetadata {
        state: StoreState::Consistent,
        generation: rolled.image.generation,
        store_token: new_store_token().map_err(io_error)?,
        ..metadata
    };
    store_metadata(&files.metadata, &restored)?;
    remove_journal(&journal).map_err(io_error)?;
    drop(held);
    Ok(Some(rolled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::VolumeOptions;

    const SIZE: u64 = 8 << 20;

    fn store(directory: &Path) -> (Volume, PathBuf) {
        let path = directory.join("copy.img");
        let original: Vec<u8> = (0..SIZE).map(|index| (index % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let volume =
            Volume::open(&VolumeOptions { path: path.clone(), size: Some(SIZE), direct: false, read_only: false })
                .unwrap();
        (volume, path)
    }

    fn overwrite(path: &Path, offset: u64, len: usize, byte: u8) {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&vec![byte; len], offset).unwrap();
    }

    /// Changes saved first, then made; a roll back restores the image the
    /// pass began with, byte for byte, whatever was written over it (also
    /// twice, and across a resumed journal).
    #[test]
    fn a_roll_back_restores_the_image_the_pass_began_with() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let journal = directory.path().join("copy.img.cmmeta.cmundo");
        let image = Image { generation: 4, taken_at_ms: 1_700_000_000_000, store: [5; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        for (offset, len, byte) in [(4096, 100, 1u8), (70_000, 200_000, 2), (4096, 8192, 3), (SIZE - 10, 10, 4)] {
            assert_eq!(undo.save(&volume, offset, len as u64).unwrap(), Saved::Kept);
            overwrite(&path, offset, len, byte);
        }
        drop(undo);
        // The copy restarts mid-pass: the journal carries on.
        let mut undo = UndoJournal::resume(&journal, SIZE, u64::MAX).unwrap();
        assert_eq!(undo.image(), image);
        assert_eq!(undo.save(&volume, 500_000, 4096).unwrap(), Saved::Kept);
        overwrite(&path, 500_000, 4096, 5);
        assert_ne!(std::fs::read(&path).unwrap(), before);
        let rolled = roll_back(&path, &journal, SIZE).unwrap();
        // Entries: one block at 4 KiB; 49 blocks from 68 KiB in four runs,
        // each inside its chunk; one block at 8 KiB (the one at 4 KiB is
        // saved); the volume's last block; after the resume, two blocks in one run.
        let bytes = (1 + 49 + 1 + 1 + 2) * BLOCK_BYTES;
        assert_eq!(rolled, RolledBack { image, entries: 1 + 4 + 1 + 1 + 1, bytes, torn_tail: false });
        assert_eq!(std::fs::read(&path).unwrap(), before, "the store is not the image the pass began with");
        undo.discard().unwrap();
        assert!(!journal.exists());
    }

    /// A torn last entry (a crash while appending) is ignored: its chunk was
    /// never overwritten. A damaged header or another volume size is refused.
    #[test]
    fn a_torn_tail_is_cut_off_and_a_damaged_journal_refused() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let journal = directory.path().join("j.cmundo");
        let image = Image { generation: 1, taken_at_ms: 5, store: [5; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        undo.save(&volume, 0, 10).unwrap();
        overwrite(&path, 0, 10, 9);
        let whole = undo.bytes();
        undo.save(&volume, 200_000, 10).unwrap();
        drop(undo);
        // The second entry is torn: its chunk was not overwritten.
        let file = OpenOptions::new().write(true).open(&journal).unwrap();
        file.set_len(whole + 100).unwrap();
        let rolled = roll_back(&path, &journal, SIZE).unwrap();
        assert_eq!((rolled.entries, rolled.torn_tail), (1, true));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(roll_back(&path, &journal, SIZE * 2).unwrap_err().to_string().contains("made for a volume"));
        // A last entry whose place is past any volume (an index near 2^52
        // of 4 KiB blocks: its end overflows 64 bits) is a bad entry, not a
        // panic.
        let mut head = [0u8; ENTRY_HEADER_BYTES];
        head[0..4].copy_from_slice(&ENTRY_MAGIC.to_le_bytes());
        head[4..12].copy_from_slice(&(u64::MAX / BLOCK_BYTES).to_le_bytes());
        head[12..16].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes.truncate(whole as usize);
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(&[0u8; BLOCK_BYTES as usize]);
        std::fs::write(&journal, &bytes).unwrap();
        let rolled = roll_back(&path, &journal, SIZE).unwrap();
        assert_eq!((rolled.entries, rolled.torn_tail), (1, true));
        // A damaged entry with more after it than a torn append can leave
        // is damage: refused, never cut off silently.
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        for chunk in 0..UNSYNCED_ENTRIES_MAX as u64 + 2 {
            undo.save(&volume, chunk * CHUNK_BYTES, CHUNK_BYTES).unwrap();
        }
        drop(undo);
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes[HEADER_BYTES + ENTRY_HEADER_BYTES + 5] ^= 1;
        std::fs::write(&journal, &bytes).unwrap();
        assert!(roll_back(&path, &journal, SIZE).unwrap_err().to_string().contains("damaged entry at byte 64"));
        let mut bytes = std::fs::read(&journal).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&journal, &bytes).unwrap();
        assert!(roll_back(&path, &journal, SIZE).unwrap_err().to_string().contains("damaged header"));
    }

    /// The entries appended together before one fdatasync may reach the
    /// disk in any order: a crash can leave one missing (zeroes) with whole
    /// ones after it. Within the bytes of the last UNSYNCED_ENTRIES_MAX
    /// entries that is a torn tail, cut off there; their writes were not yet
    /// issued. And the journal never holds more than that many entries unsynced.
    #[test]
    fn entries_saved_together_tear_as_a_tail() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let journal = directory.path().join("j.cmundo");
        let image = Image { generation: 1, taken_at_ms: 5, store: [5; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        // Ten entries made durable and their chunks overwritten, then a
        // group saved together whose writes were not yet issued.
        for chunk in 0..10 {
            assert_eq!(undo.save_deferred(&volume, chunk * CHUNK_BYTES, 10).unwrap(), Saved::Kept);
        }
        undo.sync().unwrap();
        assert_eq!(undo.unsynced, 0);
        for chunk in 0..10 {
            overwrite(&path, chunk * CHUNK_BYTES, 10, 9);
        }
        for chunk in 10..10 + UNSYNCED_ENTRIES_MAX as u64 {
            undo.save_deferred(&volume, chunk * CHUNK_BYTES, 10).unwrap();
        }
        assert_eq!(undo.unsynced, UNSYNCED_ENTRIES_MAX);
        // One more syncs the group first: never more unsynced than the reader allows for.
        undo.save_deferred(&volume, 100 * CHUNK_BYTES, 10).unwrap();
        assert_eq!(undo.unsynced, 1);
        drop(undo);
        // The crash: the group's third entry never reached the disk.
        let entry = ENTRY_HEADER_BYTES + BLOCK_BYTES as usize;
        let mut bytes = std::fs::read(&journal).unwrap();
        let hole = HEADER_BYTES + 12 * entry;
        bytes[hole..hole + entry].fill(0);
        std::fs::write(&journal, &bytes).unwrap();
        let rolled = roll_back(&path, &journal, SIZE).unwrap();
        assert_eq!((rolled.entries, rolled.torn_tail), (12, true));
        assert_eq!(std::fs::read(&path).unwrap(), before, "the ten overwritten chunks are back");
    }

    /// One change over many chunks (a trim of a large extent is one frame)
    /// is saved in bounded batches and rolled back whole.
    #[test]
    fn a_large_change_is_saved_in_batches() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let journal = directory.path().join("j.cmundo");
        let image = Image { generation: 1, taken_at_ms: 0, store: [5; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        assert_eq!(undo.save(&volume, 0, SIZE).unwrap(), Saved::Kept);
        overwrite(&path, 0, SIZE as usize, 0);
        assert_eq!(roll_back(&path, &journal, SIZE).unwrap().entries, SIZE / CHUNK_BYTES);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// A forced promotion names the image to roll back to: a journal that
    /// leads to another is refused with the store and journal untouched;
    /// the named one is restored, the store recorded consistent at its
    /// generation with a new token, the journal removed.
    #[test]
    fn restore_image_rolls_back_only_to_the_image_asked_for() {
        use crate::metadata::{load_metadata, store_metadata, MetadataFiles, StoreState, VolumeMetadata};
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let files = MetadataFiles::locate(&path, false, None);
        let syncing = VolumeMetadata {
            identity: None,
            generation: 5,
            epoch_promised: 3,
            state: StoreState::Syncing,
            store_token: [7; 16],
            store_fingerprint: 0,
        };
        store_metadata(&files.metadata, &syncing).unwrap();
        let journal = journal_path(&files.metadata);
        let image = Image { generation: 4, taken_at_ms: 1_700_000_000_000, store: [7; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        undo.save(&volume, 100_000, 300_000).unwrap();
        overwrite(&path, 100_000, 300_000, 9);
        drop((undo, volume));
        let during = std::fs::read(&path).unwrap();
        for other in [(4, 1_700_000_000_001), (3, 1_700_000_000_000)] {
            let error = restore_image(&path, &files, SIZE, Some(other)).unwrap_err();
            assert!(matches!(error, RestoreError::OtherImage { .. }), "{error}");
            assert_eq!(std::fs::read(&path).unwrap(), during, "the store was changed");
            assert!(journal.exists());
            assert_eq!(load_metadata(&files.metadata).unwrap().unwrap(), syncing);
        }
        let rolled = restore_image(&path, &files, SIZE, Some((4, 1_700_000_000_000))).unwrap().unwrap();
        assert_eq!(rolled.image, image);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let restored = load_metadata(&files.metadata).unwrap().unwrap();
        assert_eq!((restored.state, restored.generation), (StoreState::Consistent, 4));
        assert_ne!(restored.store_token, syncing.store_token, "a rolled-back store gets a new token");
        assert!(!journal.exists());
        assert!(restore_image(&path, &files, SIZE, Some((4, 1_700_000_000_000))).unwrap().is_none());
    }

    /// A change saves the 4 KiB blocks it touches, not their chunk: a
    /// 10-byte change costs one block; a later change over the chunk saves
    /// only the blocks not saved yet, in runs; a roll back restores all.
    #[test]
    fn a_change_saves_only_the_blocks_it_touches() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let journal = directory.path().join("j.cmundo");
        let image = Image { generation: 1, taken_at_ms: 0, store: [5; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, u64::MAX).unwrap();
        undo.save(&volume, BLOCK_BYTES + 100, 10).unwrap();
        overwrite(&path, BLOCK_BYTES + 100, 10, 9);
        let entry = ENTRY_HEADER_BYTES as u64 + BLOCK_BYTES;
        assert_eq!(undo.bytes(), HEADER_BYTES as u64 + entry);
        undo.save(&volume, 0, CHUNK_BYTES).unwrap();
        overwrite(&path, 0, CHUNK_BYTES as usize, 8);
        let rest = 2 * ENTRY_HEADER_BYTES as u64 + CHUNK_BYTES - BLOCK_BYTES;
        assert_eq!(undo.bytes(), HEADER_BYTES as u64 + entry + rest, "block 0, then blocks 2..16");
        assert_eq!(roll_back(&path, &journal, SIZE).unwrap().entries, 3);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// A journal an older copy host left (version 1, whole chunks) is still
    /// resumed, goes on in whole chunks, and rolls back.
    #[test]
    fn a_version_1_journal_goes_on_in_whole_chunks() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, path) = store(directory.path());
        let before = std::fs::read(&path).unwrap();
        let journal = directory.path().join("j.cmundo");
        let image = Image { generation: 1, taken_at_ms: 0, store: [5; 16] };
        let mut undo = UndoJournal::begin_in(&journal, image, SIZE, u64::MAX, CHUNK_BYTES).unwrap();
        undo.save(&volume, CHUNK_BYTES + 100, 10).unwrap();
        overwrite(&path, CHUNK_BYTES + 100, 10, 9);
        drop(undo);
        assert_eq!(u32::from_le_bytes(std::fs::read(&journal).unwrap()[8..12].try_into().unwrap()), 1);
        let mut undo = UndoJournal::resume(&journal, SIZE, u64::MAX).unwrap();
        let entry = ENTRY_HEADER_BYTES as u64 + CHUNK_BYTES;
        assert_eq!(undo.bytes(), HEADER_BYTES as u64 + entry);
        undo.save(&volume, CHUNK_BYTES + 8192, 10).unwrap();
        assert_eq!(undo.bytes(), HEADER_BYTES as u64 + entry, "the chunk is saved already");
        undo.save(&volume, 5 * CHUNK_BYTES + 1, 1).unwrap();
        overwrite(&path, 5 * CHUNK_BYTES + 1, 1, 9);
        assert_eq!(undo.bytes(), HEADER_BYTES as u64 + 2 * entry, "a whole chunk");
        assert_eq!(roll_back(&path, &journal, SIZE).unwrap().entries, 2);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    /// Past its limit the journal says so and saves nothing more.
    #[test]
    fn the_journal_stops_at_its_limit() {
        let directory = tempfile::tempdir().unwrap();
        let (volume, _) = store(directory.path());
        let journal = directory.path().join("j.cmundo");
        let limit = HEADER_BYTES as u64 + 2 * (CHUNK_BYTES + ENTRY_HEADER_BYTES as u64);
        let image = Image { generation: 1, taken_at_ms: 0, store: [5; 16] };
        let mut undo = UndoJournal::begin(&journal, image, SIZE, limit).unwrap();
        assert_eq!(undo.save(&volume, 0, 2 * CHUNK_BYTES).unwrap(), Saved::Kept);
        assert_eq!(undo.save(&volume, 0, 100).unwrap(), Saved::Kept, "saved already");
        assert_eq!(undo.save(&volume, 5 * CHUNK_BYTES, 1).unwrap(), Saved::LimitReached);
    }
}
