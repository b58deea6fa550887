//! A volume's local metadata: which mirrored volume its store holds, the
//! generation it holds, the highest epoch it has promised, and whether its
//! contents are consistent — kept in a small file next to the volume
//! (`<volume>.cmmeta`).
//!
//! ```text
//!  production volume: identity created once ─▶ offered in every Hello
//!  copy volume:       identity adopted from the first authenticated Hello (state syncing)
//!                     epoch / generation raised by accepted frames ─▶ stored before the frame is applied
//! ```
//!
//! The identity names the mirrored volume, not the store: a copy records its
//! production volume's identity, so a copy promoted later still offers the
//! same identity to the other copies. Until the group layer keeps the mirror
//! state on quorum storage (DESIGN.md §6), the copy's state lives here.
//!
//! The file is a fixed 128-byte little-endian record with a CRC32:
//!
//! ```text
//!  offset size field              meaning
//!       0    8 magic              "CMMETA\0\0"
//!       8    4 version            2
//!      12    1 state              1 consistent, 2 syncing, 3 failed (production store failed a flush)
//!      13    1 has_identity       0 or 1
//!      14    2 zero
//!      16   16 uuid               the mirrored volume's identifier; zero when absent
//!      32    8 size_bytes         the mirrored volume's size; zero when absent
//!      40    8 generation         the generation this store holds
//!      48    8 epoch_promised     the highest epoch this store has promised
//!      56   16 store_token        random; drawn when the store's contents start a new lineage
//!      72    8 store_fingerprint  where the store's data lives (`fingerprint.rs`); zero = unknown
//!      80   44 zero
//!     124    4 crc                CRC32 of bytes 0..124
//! ```
//!
//! Version 1 records (64 bytes, no store token or fingerprint) are still
//! read; their store is unproven, so a copy draws a new token (a full
//! resync) and a production volume records its fingerprint.
//!
//! Where the metadata lives ([`MetadataFiles`]): beside a regular-file
//! volume (`<volume>.cmmeta`, `.cmbitmap`, `.cmcopies`), and for a block
//! device in a metadata directory (`--metadata-dir`, default
//! [`METADATA_DIR_DEFAULT`]), never in `/dev`, which is a tmpfs that a
//! reboot empties.
//!
//! Why a binary record rather than TOML: the epoch in this file is a fencing
//! token (DESIGN.md §4, invariant 4), so a damaged file must be refused, not
//! read — a TOML parser happily reads a flipped digit as a lower epoch, while
//! the CRC refuses it. The layout also matches the bitmap's (`bitmap.rs`),
//! needs no new dependency (`crc32fast` is already here), and discourages
//! hand edits that would defeat fencing. Every store writes a temporary file,
//! fsyncs it, renames it over the old one and fsyncs the directory, so a
//! crash leaves either the old record or the new one, never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::bitmap::BITMAP_FILE_SUFFIX;
use crate::fingerprint::Fingerprint;
use crate::protocol::auth::{StoreToken, VolumeIdentity, STORE_TOKEN_UNKNOWN};
use crate::replicator::state::STATE_FILE_SUFFIX;

/// The suffix appended to a volume's path to name its metadata file.
pub const METADATA_FILE_SUFFIX: &str = ".cmmeta";
/// The length of the metadata record in bytes.
pub const METADATA_BYTES: usize = 128;
/// Where a block device's metadata lives unless `--metadata-dir` says otherwise.
pub const METADATA_DIR_DEFAULT: &str = "/var/lib/crossmirror";

const MAGIC: [u8; 8] = *b"CMMETA\0\0";
const VERSION: u32 = 2;
const CRC_OFFSET: usize = 124;
const V1_BYTES: usize = 64;
const V1_CRC_OFFSET: usize = 60;

/// The three metadata files of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataFiles {
    /// The identity, generation, epoch and store record (`.cmmeta`).
    pub metadata: PathBuf,
    /// The write-intent bitmap (`.cmbitmap`), production only.
    pub bitmap: PathBuf,
    /// The mirror state (`.cmcopies`), production only.
    pub state: PathBuf,
    /// The activity log (`.cmal`), production only.
    pub activity_log: PathBuf,
}

impl MetadataFiles {
    /// The files beside the volume at `volume` (`<volume>.cmmeta`, …).
    pub fn beside(volume: &Path) -> MetadataFiles {
        let with = |suffix: &str| {
            let mut name = volume.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        MetadataFiles {
            metadata: with(METADATA_FILE_SUFFIX),
            bitmap: with(BITMAP_FILE_SUFFIX),
            state: with(STATE_FILE_SUFFIX),
            activity_log: with(crate::activity_log::ACTIVITY_LOG_FILE_SUFFIX),
        }
    }

    /// The files of the volume at `volume` in `directory`, named by the
    /// volume's whole path with `%` and `/` escaped (`/dev/loop0` becomes
    /// `dev%2Floop0.cmmeta`), so two volumes never share a name. The path is
    /// taken as given, not resolved: name a device by a stable link
    /// (`/dev/disk/by-id/…`) and its metadata follows it.
    pub fn in_directory(directory: &Path, volume: &Path) -> MetadataFiles {
        let absolute = std::path::absolute(volume).unwrap_or_else(|_| volume.to_path_buf());
        let text = absolute.to_string_lossy();
        let escaped = text.trim_start_matches('/').replace('%', "%25").replace('/', "%2F");
        MetadataFiles::beside(&directory.join(escaped))
    }

    /// Where the metadata of `volume` lives: in `metadata_dir` when given;
    /// else beside a regular file, and in [`METADATA_DIR_DEFAULT`] for a
    /// block device.
    pub fn locate(volume: &Path, block_device: bool, metadata_dir: Option<&Path>) -> MetadataFiles {
        match metadata_dir {
            Some(directory) => MetadataFiles::in_directory(directory, volume),
            None if block_device => MetadataFiles::in_directory(Path::new(METADATA_DIR_DEFAULT), volume),
            None => MetadataFiles::beside(volume),
        }
    }

    /// Whichever of the four files exists.
    pub fn existing(&self) -> Vec<&Path> {
        [&self.metadata, &self.bitmap, &self.state, &self.activity_log]
            .into_iter()
            .map(PathBuf::as_path)
            .filter(|path| path.exists())
            .collect()
    }

    /// Make the directory that holds the files, if it is missing.
    pub fn create_directory(&self) -> Result<(), MetadataError> {
        let Some(directory) = self.metadata.parent().filter(|parent| !parent.as_os_str().is_empty()) else {
            return Ok(());
        };
        fs::create_dir_all(directory).map_err(|source| MetadataError::Io {
            path: directory.to_path_buf(),
            action: "create the metadata directory",
            source,
        })
    }
}

/// Metadata an older release wrote into /dev (a tmpfs emptied by every
/// reboot) is not silently left behind: say where it goes now. `files` are
/// the metadata files `volume` uses now.
pub fn refuse_metadata_in_dev(
    volume: &Path,
    block_device: bool,
    metadata_dir: Option<&Path>,
    files: &MetadataFiles,
) -> Result<(), MetadataError> {
    let beside = MetadataFiles::beside(volume);
    if !block_device || metadata_dir.is_some() || beside == *files || files.metadata.exists() {
        return Ok(());
    }
    let old: Vec<String> = beside.existing().iter().map(|path| path.display().to_string()).collect();
    if old.is_empty() {
        return Ok(());
    }
    Err(MetadataError::LeftInDev {
        volume: volume.to_path_buf(),
        found: old.join(", "),
        directory: files.metadata.parent().map_or_else(String::new, |directory| directory.display().to_string()),
    })
}

/// Whether a store's contents form a whole, crash-consistent image of the
/// mirrored volume at some moment (DESIGN.md §4, invariant 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StoreState {
    /// The store holds the volume as it was at some moment; it may lag.
    Consistent = 1,
    /// The store is being (re)synchronised and is not a usable image; it is
    /// never promoted or served.
    Syncing = 2,
    /// The store failed a flush while it was production: it may lack
    /// writes that were acknowledged and that its copies hold. Not served
    /// again unless the operator takes it as a new store.
    Failed = 3,
}

impl StoreState {
    /// The state's name in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Consistent => "consistent",
            StoreState::Syncing => "syncing",
            StoreState::Failed => "failed",
        }
    }
}

/// What went wrong with a metadata file, for callers that choose a reaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataErrorKind {
    /// The file is damaged or is not a metadata file.
    Corrupt,
    /// The file was written by a release with another record version.
    Version,
    /// The file describes another volume than the one it sits next to.
    Mismatch,
    /// The operating system refused an operation.
    Io,
}

/// A metadata error: says what happened, to which file, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The file is damaged.
    #[error("metadata {path}: {message}; it is damaged: move it aside to start over (a copy then adopts its production volume again and needs a full sync; a production volume gets a new identity and every copy needs a full sync)")]
    Corrupt {
        /// The metadata file.
        path: PathBuf,
        /// What is damaged.
        message: String,
    },
    /// The file was written by a release with another record version.
    #[error("metadata {path}: record version {found}, this build reads version {supported}; run the crossmirror release that wrote it")]
    Version {
        /// The metadata file.
        path: PathBuf,
        /// The version the file carries.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The file disagrees with the volume it belongs to.
    #[error("metadata {path}: {message}")]
    Mismatch {
        /// The metadata file.
        path: PathBuf,
        /// Both sides of the disagreement and what to do.
        message: String,
    },
    /// Metadata an older release wrote into /dev, beside a block device.
    #[error(
        "metadata of {volume} was found at {found} (where an older release kept it; /dev does not survive a \
         reboot): move it to {directory} (same names), or pass --metadata-dir"
    )]
    LeftInDev {
        /// The block device.
        volume: PathBuf,
        /// The files found beside it, comma-separated.
        found: String,
        /// Where its metadata lives now.
        directory: String,
    },
    /// An operating-system call failed.
    #[error("metadata {path}: {action}: {source}")]
    Io {
        /// The metadata file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl MetadataError {
    /// The kind of this error.
    pub fn kind(&self) -> MetadataErrorKind {
        match self {
            MetadataError::Corrupt { .. } => MetadataErrorKind::Corrupt,
            MetadataError::Version { .. } => MetadataErrorKind::Version,
            MetadataError::Mismatch { .. } | MetadataError::LeftInDev { .. } => MetadataErrorKind::Mismatch,
            MetadataError::Io { .. } => MetadataErrorKind::Io,
        }
    }
}

/// A volume's local metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeMetadata {
    /// The mirrored volume this store holds; `None` on a fresh copy that has
    /// not met its production host yet.
    pub identity: Option<VolumeIdentity>,
    /// The volume generation this store holds; frames of an older one are refused.
    pub generation: u64,
    /// The highest epoch this store has promised; frames of an older one are refused.
    pub epoch_promised: u64,
    /// Whether the store is a consistent image.
    pub state: StoreState,
    /// The store's token (see [`StoreToken`]); unknown until drawn.
    pub store_token: StoreToken,
    /// The fingerprint of the store this record was made for (see
    /// `fingerprint.rs`); zero when unknown.
    pub store_fingerprint: u64,
}

impl VolumeMetadata {
    /// The metadata of a fresh copy: no identity, nothing promised, and
    /// `syncing`, since it holds no image of any volume yet.
    pub fn fresh() -> VolumeMetadata {
        VolumeMetadata {
            identity: None,
            generation: 0,
            epoch_promised: 0,
            state: StoreState::Syncing,
            store_token: STORE_TOKEN_UNKNOWN,
            store_fingerprint: 0,
        }
    }

    /// The record's bytes, CRC included.
    pub fn encode(&self) -> [u8; METADATA_BYTES] {
        let mut bytes = [0u8; METADATA_BYTES];
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&VERSION.to_le_bytes());
        bytes[12] = self.state as u8;
        if let Some(identity) = self.identity {
            bytes[13] = 1;
            bytes[16..32].copy_from_slice(&identity.uuid);
            bytes[32..40].copy_from_slice(&identity.size_bytes.to_le_bytes());
        }
        bytes[40..48].copy_from_slice(&self.generation.to_le_bytes());
        bytes[48..56].copy_from_slice(&self.epoch_promised.to_le_bytes());
        bytes[56..72].copy_from_slice(&self.store_token);
        bytes[72..80].copy_from_slice(&self.store_fingerprint.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..CRC_OFFSET]);
        bytes[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The metadata the record `bytes`, read from `path`, holds.
    fn decode(path: &Path, bytes: &[u8]) -> Result<VolumeMetadata, MetadataError> {
        let corrupt = |message: String| MetadataError::Corrupt { path: path.to_path_buf(), message };
        let crc_offset = match bytes.len() {
            METADATA_BYTES => CRC_OFFSET,
            V1_BYTES => V1_CRC_OFFSET,
            length => {
                return Err(corrupt(format!("is {length} bytes long, a metadata record is {METADATA_BYTES}")));
            }
        };
        if bytes[0..8] != MAGIC {
            return Err(corrupt(
                "does not start with the metadata magic \"CMMETA\"; it is not a crossmirror metadata file".into(),
            ));
        }
        // The CRC is checked before the version, so a damaged version field
        // reads as damage rather than as a file from another release.
        let carried = u32::from_le_bytes(array(&bytes[crc_offset..crc_offset + 4]));
        let computed = crc32fast::hash(&bytes[..crc_offset]);
        if carried != computed {
            return Err(corrupt(format!("fails its CRC (carried {carried:#010x}, computed {computed:#010x})")));
        }
        let version = u32::from_le_bytes(array(&bytes[8..12]));
        let expected = if crc_offset == V1_CRC_OFFSET { 1 } else { VERSION };
        if version != expected {
            return Err(MetadataError::Version { path: path.to_path_buf(), found: version, supported: VERSION });
        }
        let state = match bytes[12] {
            1 => StoreState::Consistent,
            2 => StoreState::Syncing,
            3 => StoreState::Failed,
            other => return Err(corrupt(format!("names an unknown state {other}"))),
        };
        let reserved_zero = match version {
            1 => bytes[56..60] == [0; 4],
            _ => bytes[80..CRC_OFFSET].iter().all(|byte| *byte == 0),
        };
        if bytes[14..16] != [0; 2] || !reserved_zero {
            return Err(corrupt("has non-zero reserved bytes".into()));
        }
        let (store_token, store_fingerprint) = match version {
            1 => (STORE_TOKEN_UNKNOWN, 0),
            _ => (array(&bytes[56..72]), u64::from_le_bytes(array(&bytes[72..80]))),
        };
        let uuid: [u8; 16] = array(&bytes[16..32]);
        let size_bytes = u64::from_le_bytes(array(&bytes[32..40]));
        let identity = match bytes[13] {
            0 if uuid == [0; 16] && size_bytes == 0 => None,
            0 => return Err(corrupt("records no identity but carries a uuid or a size".into())),
            1 if size_bytes > 0 => Some(VolumeIdentity { uuid, size_bytes }),
            1 => return Err(corrupt("records an identity of size 0".into())),
            other => return Err(corrupt(format!("has an unknown identity marker {other}"))),
        };
        Ok(VolumeMetadata {
            identity,
            generation: u64::from_le_bytes(array(&bytes[40..48])),
            epoch_promised: u64::from_le_bytes(array(&bytes[48..56])),
            state,
            store_token,
            store_fingerprint,
        })
    }
}

/// A new random store token (never the unknown one).
pub fn new_store_token() -> Result<StoreToken, io::Error> {
    let mut token = STORE_TOKEN_UNKNOWN;
    while token == STORE_TOKEN_UNKNOWN {
        getrandom::fill(&mut token).map_err(|error| io::Error::other(error.to_string()))?;
    }
    Ok(token)
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes.try_into().expect("the record length was checked")
}

/// A UUID in its usual text form, `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Load the metadata at `path`: `None` when there is no file (a fresh copy
/// or a volume never served), an error when it is unreadable or damaged.
pub fn load_metadata(path: &Path) -> Result<Option<VolumeMetadata>, MetadataError> {
    let io_error = |action, source| MetadataError::Io { path: path.to_path_buf(), action, source };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error("open", error)),
    };
    // Read one byte more than a record, so a longer file is seen as such
    // without reading all of it.
    let mut bytes = Vec::with_capacity(METADATA_BYTES + 1);
    file.take(METADATA_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(|source| io_error("read", source))?;
    VolumeMetadata::decode(path, &bytes).map(Some)
}

/// Replace the metadata at `path` atomically and durably: write a temporary
/// file beside it, fsync it, rename it over `path`, fsync the directory.
/// When this returns, a crash leaves `metadata`; before, the old record.
pub fn store_metadata(path: &Path, metadata: &VolumeMetadata) -> Result<(), MetadataError> {
    replace_file_durably(path, &metadata.encode()).map_err(|(action, source)| MetadataError::Io {
        path: path.to_path_buf(),
        action,
        source,
    })
}

/// Replace the file at `path` with `bytes` atomically and durably: write a
/// temporary file beside it, fsync it, rename it over `path`, fsync the
/// directory. On failure, what was being done and the error.
pub fn replace_file_durably(path: &Path, bytes: &[u8]) -> Result<(), (&'static str, io::Error)> {
    let mut temporary_name = path.as_os_str().to_owned();
    temporary_name.push(format!(".writing-{}", std::process::id()));
    let temporary = PathBuf::from(temporary_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)
            .map_err(|source| ("create the temporary file", source))?;
        file.write_all(bytes).map_err(|source| ("write the temporary file", source))?;
        file.sync_all().map_err(|source| ("fsync the temporary file", source))?;
        fs::rename(&temporary, path).map_err(|source| ("rename into place", source))?;
        let parent = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(parent).and_then(|directory| directory.sync_all()).map_err(|source| ("fsync directory", source))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// A new identity for a volume of `size_bytes`: a random (version 4) UUID.
pub fn new_identity(size_bytes: u64) -> Result<VolumeIdentity, io::Error> {
    let mut uuid = [0u8; 16];
    getrandom::fill(&mut uuid).map_err(|error| io::Error::other(error.to_string()))?;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    Ok(VolumeIdentity { uuid, size_bytes })
}

/// Record `fingerprint` as the production store's, and the store as
/// consistent, after `--new-store` accepted it and every copy's bits were
/// made durable; returns the store's new token.
pub fn adopt_store(files: &MetadataFiles, fingerprint: &Fingerprint) -> Result<StoreToken, MetadataError> {
    let recorded = load_metadata(&files.metadata)?.unwrap_or_else(VolumeMetadata::fresh);
    // A new lineage: whatever record named the old store's token no longer
    // describes this one.
    let adopted = VolumeMetadata {
        store_fingerprint: fingerprint.value,
        state: StoreState::Consistent,
        store_token: draw_token(&files.metadata)?,
        ..recorded
    };
    store_metadata(&files.metadata, &adopted)?;
    Ok(adopted.store_token)
}

/// The store's contents can no longer be vouched for (its final flush
/// failed at a stop, say): draw it a new store token, so that no record of
/// it as identical to a copy (a switchover's hand-over) is trusted, and it
/// is resynced in full when it next becomes a copy.
pub fn new_lineage(files: &MetadataFiles) -> Result<(), MetadataError> {
    let Some(recorded) = load_metadata(&files.metadata)? else { return Ok(()) };
    store_metadata(&files.metadata, &VolumeMetadata { store_token: draw_token(&files.metadata)?, ..recorded })
}

/// What a production volume's metadata says as it starts serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProductionStart {
    /// The volume's identity, offered to every copy.
    pub identity: VolumeIdentity,
    /// The generation the volume holds.
    pub generation: u64,
    /// The store was not the one last served and `--new-store` accepted
    /// it: every copy must be resynced from it in full.
    pub store_replaced: bool,
    /// The store's token: drawn the first time the store is served (or
    /// when it is adopted as a new store), so that when the production role
    /// moves away and this store becomes a copy, the new production host
    /// recognises it as the store it was handed over from (unknown for a
    /// replaced store until [`adopt_store`] draws its new one).
    pub store_token: StoreToken,
}

/// Open the production volume's metadata (`files`) for a store of
/// `size_bytes` whose fingerprint is `fingerprint`: the recorded identity,
/// or a new one, created and stored durably the first time.
///
/// Refused, with what to do: a recorded identity of another size (a resized
/// volume is another volume to its copies); a store that is not the one last
/// served, unless `new_store` accepts it; a store recorded `syncing` (it is
/// no consistent image); and metadata that is missing while the volume's
/// bitmap or mirror state exist (it was lost: a new identity would orphan
/// every copy, and the bitmap would no longer be known to match).
pub fn production_start(
    files: &MetadataFiles,
    size_bytes: u64,
    fingerprint: &Fingerprint,
    new_store: bool,
) -> Result<ProductionStart, MetadataError> {
    let path = &files.metadata;
    let metadata = load_metadata(path)?;
    if metadata.is_none() {
        refuse_lost_metadata(files)?;
    }
    let mut store_replaced = false;
    if let Some(recorded) = metadata {
        store_replaced = check_recorded_store(path, &recorded, size_bytes, fingerprint, new_store)?;
        if let Some(identity) = recorded.identity {
            // A replaced store is recorded only by `adopt_store`, once every
            // copy's bits are durably set: a crash in between must find the
            // old fingerprint and refuse (or resync) again.
            let mut updated = recorded;
            if recorded.store_fingerprint == 0 {
                updated.store_fingerprint = fingerprint.value;
            }
            if recorded.store_token == STORE_TOKEN_UNKNOWN && !store_replaced {
                updated.store_token = draw_token(path)?;
            }
            if updated != recorded {
                store_metadata(path, &updated)?;
            }
            return Ok(ProductionStart {
                identity,
                generation: recorded.generation.max(1),
                store_replaced,
                store_token: updated.store_token,
            });
        }
    }
    let identity = new_identity(size_bytes).map_err(|source| MetadataError::Io {
        path: path.clone(),
        action: "draw a uuid",
        source,
    })?;
    // A volume that starts serving as production is, by definition, the
    // reference image; a fresh store's other fields start from zero.
    let base = metadata.unwrap_or(VolumeMetadata { generation: 1, ..VolumeMetadata::fresh() });
    let created = VolumeMetadata {
        identity: Some(identity),
        state: StoreState::Consistent,
        store_fingerprint: fingerprint.value,
        store_token: draw_token(path)?,
        ..base
    };
    store_metadata(path, &created)?;
    Ok(ProductionStart {
        identity,
        generation: created.generation.max(1),
        store_replaced,
        store_token: created.store_token,
    })
}

/// A new store token for the store whose metadata is at `path`.
fn draw_token(path: &Path) -> Result<StoreToken, MetadataError> {
    new_store_token().map_err(|source| MetadataError::Io {
        path: path.to_path_buf(),
        action: "draw a store token",
        source,
    })
}

/// No metadata: refused when the volume's bitmap or mirror state survive
/// (the metadata was lost; a new identity would orphan every copy).
fn refuse_lost_metadata(files: &MetadataFiles) -> Result<(), MetadataError> {
    let others: Vec<String> = files.existing().iter().map(|other| other.display().to_string()).collect();
    if others.is_empty() {
        return Ok(());
    }
    Err(MetadataError::Mismatch {
        path: files.metadata.clone(),
        message: format!(
            "is missing, but {} exist(s): the volume's metadata was lost. Restore it from where it went; or, to \
             make this a new volume, move {} aside too (its copies then hold another volume: recreate them)",
            others.join(" and "),
            others.join(" and ")
        ),
    })
}

/// Whether the store recorded at `path` may be served as production: its
/// size, its state (never `syncing`; `failed` only with `new_store`) and its
/// fingerprint (another store only with `new_store`). Returns whether every
/// copy must be resynced from it in full.
fn check_recorded_store(
    path: &Path,
    recorded: &VolumeMetadata,
    size_bytes: u64,
    fingerprint: &Fingerprint,
    new_store: bool,
) -> Result<bool, MetadataError> {
    let mismatch = |message: String| MetadataError::Mismatch { path: path.to_path_buf(), message };
    if let Some(identity) = recorded.identity.filter(|identity| identity.size_bytes != size_bytes) {
        return Err(mismatch(format!(
            "records volume uuid {} of {} bytes, but the volume is {size_bytes} bytes; restore the volume's \
             size, or move the metadata aside to make it a new volume (every copy then needs a full sync)",
            format_uuid(&identity.uuid),
            identity.size_bytes,
        )));
    }
    if recorded.state == StoreState::Failed && !new_store {
        return Err(mismatch(
            "records that this store failed a flush while it was serving: it may lack writes that were \
             acknowledged and that its copies hold. Fail over to a current copy; or, once the store is \
             checked or replaced, start with --new-store: every copy is then resynced from it in full"
                .into(),
        ));
    }
    if recorded.state == StoreState::Syncing && recorded.identity.is_some() {
        return Err(mismatch(
            "records this store as syncing: it was a copy in the middle of a resync and holds no consistent \
             image of the volume; it cannot be served. Serve a current copy instead"
                .into(),
        ));
    }
    let another_store = recorded.store_fingerprint != 0 && recorded.store_fingerprint != fingerprint.value;
    if another_store && !new_store {
        return Err(mismatch(format!(
            "was made for another store than the one now at this path ({}): the store was replaced, \
             restored or swapped. Put the right store back; or, if this store holds the data to serve, \
             start with --new-store: every copy is then resynced from it in full",
            fingerprint.description
        )));
    }
    Ok(another_store || recorded.state == StoreState::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const IDENTITY: VolumeIdentity = VolumeIdentity { uuid: [0xa5; 16], size_bytes: 64 << 20 };

    fn mirrored() -> VolumeMetadata {
        VolumeMetadata {
            identity: Some(IDENTITY),
            generation: 7,
            epoch_promised: 12,
            state: StoreState::Consistent,
            store_token: [0x3c; 16],
            store_fingerprint: 0x1234_5678_9abc_def0,
        }
    }

    fn fingerprint_of(value: u64) -> Fingerprint {
        Fingerprint { value, description: format!("test store {value}") }
    }

    /// What is stored is what is loaded, with and without an identity.
    #[test]
    fn metadata_round_trips_through_its_file() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = directory.path().join("volume.cmmeta");
        assert_eq!(load_metadata(&path).unwrap(), None);
        for metadata in [VolumeMetadata::fresh(), mirrored()] {
            store_metadata(&path, &metadata).unwrap();
            assert_eq!(load_metadata(&path).unwrap(), Some(metadata));
            assert_eq!(fs::metadata(&path).unwrap().len(), METADATA_BYTES as u64);
        }
    }

    /// Any single flipped bit, a short or long file, and a foreign file are
    /// refused as corrupt with the way out in the message; a newer record
    /// version is refused as such, not called damaged.
    #[test]
    fn damaged_files_are_refused() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = directory.path().join("volume.cmmeta");
        let good = mirrored().encode();
        for bit in 0..METADATA_BYTES * 8 {
            let mut bytes = good;
            bytes[bit / 8] ^= 1 << (bit % 8);
            fs::write(&path, bytes).unwrap();
            let error = load_metadata(&path).unwrap_err();
            assert_eq!(error.kind(), MetadataErrorKind::Corrupt, "bit {bit}");
            assert!(error.to_string().contains("move it aside"), "{error}");
        }
        for bytes in [&good[..127], &good[..64], &[good.as_slice(), &[0]].concat()[..], b"[volume]\nepoch = 3\n"] {
            fs::write(&path, bytes).unwrap();
            assert_eq!(load_metadata(&path).unwrap_err().kind(), MetadataErrorKind::Corrupt);
        }
        fs::write(&path, [0u8; METADATA_BYTES]).unwrap();
        assert!(load_metadata(&path).unwrap_err().to_string().contains("not a crossmirror metadata file"));
        let mut newer = good;
        newer[8] = 3;
        let crc = crc32fast::hash(&newer[..CRC_OFFSET]);
        newer[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, newer).unwrap();
        assert_eq!(load_metadata(&path).unwrap_err().kind(), MetadataErrorKind::Version);
    }

    /// A store replaces the file by rename (a new inode, never an overwrite in
    /// place), leaves no temporary file behind, and is not disturbed by a
    /// temporary file a crash left.
    #[test]
    fn store_replaces_the_file_atomically() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = directory.path().join("volume.cmmeta");
        store_metadata(&path, &VolumeMetadata::fresh()).unwrap();
        let first_inode = fs::metadata(&path).unwrap().ino();
        let crashed = directory.path().join("volume.cmmeta.writing-4000000");
        fs::write(&crashed, b"half a rec").unwrap();
        store_metadata(&path, &mirrored()).unwrap();
        assert_ne!(fs::metadata(&path).unwrap().ino(), first_inode);
        assert_eq!(load_metadata(&path).unwrap(), Some(mirrored()));
        let mut names: Vec<_> =
            fs::read_dir(directory.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["volume.cmmeta", "volume.cmmeta.writing-4000000"]);
    }

    /// A production volume's identity is created once, is a version-4 UUID of
    /// the volume's size, stays the same afterwards, and a size change is refused.
    #[test]
    fn production_identity_is_created_once_and_kept() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let files = MetadataFiles::beside(&directory.path().join("volume"));
        let store = fingerprint_of(5);
        let identity = production_start(&files, 1 << 30, &store, false).unwrap().identity;
        assert_eq!(identity.size_bytes, 1 << 30);
        assert_eq!(identity.uuid[6] >> 4, 4);
        assert_eq!(identity.uuid[8] >> 6, 0b10);
        assert_eq!(production_start(&files, 1 << 30, &store, false).unwrap().identity, identity);
        let stored = load_metadata(&files.metadata).unwrap().unwrap();
        assert_eq!(stored.identity, Some(identity));
        assert_eq!(stored.state, StoreState::Consistent);
        assert_eq!(stored.store_fingerprint, 5);
        let error = production_start(&files, 2 << 30, &store, false).unwrap_err();
        assert_eq!(error.kind(), MetadataErrorKind::Mismatch);
        assert!(error.to_string().contains(&format_uuid(&identity.uuid)), "{error}");
        let other = MetadataFiles::beside(&directory.path().join("other"));
        assert_ne!(production_start(&other, 1 << 30, &store, false).unwrap().identity, identity);
    }

    /// Another store at the volume's path is refused, unless --new-store
    /// accepts it, which says every copy must resync in full; after that the
    /// new store is the recorded one.
    #[test]
    fn a_replaced_production_store_is_refused_or_adopted() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let files = MetadataFiles::beside(&directory.path().join("volume"));
        let identity = production_start(&files, 1 << 30, &fingerprint_of(5), false).unwrap().identity;
        let error = production_start(&files, 1 << 30, &fingerprint_of(6), false).unwrap_err();
        assert_eq!(error.kind(), MetadataErrorKind::Mismatch);
        assert!(error.to_string().contains("--new-store"), "{error}");
        let adopted = production_start(&files, 1 << 30, &fingerprint_of(6), true).unwrap();
        assert_eq!((adopted.identity, adopted.store_replaced), (identity, true));
        let error = production_start(&files, 1 << 30, &fingerprint_of(6), false).unwrap_err();
        assert!(error.to_string().contains("--new-store"), "not recorded until adopt_store: {error}");
        adopt_store(&files, &fingerprint_of(6)).unwrap();
        let again = production_start(&files, 1 << 30, &fingerprint_of(6), false).unwrap();
        assert!(!again.store_replaced);
    }

    /// Lost metadata beside a surviving bitmap or mirror state is refused,
    /// never replaced by a new identity; a copy's store caught mid-resync is
    /// not served.
    #[test]
    fn lost_metadata_and_syncing_stores_are_refused() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let files = MetadataFiles::beside(&directory.path().join("volume"));
        fs::write(&files.state, b"anything").unwrap();
        let error = production_start(&files, 1 << 30, &fingerprint_of(5), false).unwrap_err();
        assert!(error.to_string().contains("was lost"), "{error}");
        assert!(!files.metadata.exists());
        fs::remove_file(&files.state).unwrap();
        let syncing = VolumeMetadata { state: StoreState::Syncing, ..mirrored() };
        store_metadata(&files.metadata, &syncing).unwrap();
        let error = production_start(&files, IDENTITY.size_bytes, &fingerprint_of(5), true).unwrap_err();
        assert!(error.to_string().contains("syncing"), "{error}");
    }

    /// A version 1 record is read, with its store unknown.
    #[test]
    fn version_1_records_are_read() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = directory.path().join("volume.cmmeta");
        let mut bytes = [0u8; 64];
        bytes[..56].copy_from_slice(&mirrored().encode()[..56]);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..60]);
        bytes[60..].copy_from_slice(&crc.to_le_bytes());
        fs::write(&path, bytes).unwrap();
        let loaded = load_metadata(&path).unwrap().unwrap();
        assert_eq!(loaded, VolumeMetadata { store_token: STORE_TOKEN_UNKNOWN, store_fingerprint: 0, ..mirrored() });
    }

    /// Block devices keep their metadata in the metadata directory, named by
    /// their whole path, never in /dev; regular files keep it beside them.
    #[test]
    fn metadata_of_block_devices_lives_in_the_metadata_directory() {
        let files = MetadataFiles::locate(Path::new("/dev/loop0"), true, None);
        assert_eq!(files.metadata, PathBuf::from("/var/lib/crossmirror/dev%2Floop0.cmmeta"));
        assert_eq!(files.bitmap, PathBuf::from("/var/lib/crossmirror/dev%2Floop0.cmbitmap"));
        let files = MetadataFiles::locate(Path::new("/srv/a%b/vol.img"), false, Some(Path::new("/meta")));
        assert_eq!(files.state, PathBuf::from("/meta/srv%2Fa%25b%2Fvol.img.cmcopies"));
        let files = MetadataFiles::locate(Path::new("/srv/vol.img"), false, None);
        assert_eq!(files.metadata, PathBuf::from("/srv/vol.img.cmmeta"));
    }

    /// UUIDs print in the usual hyphenated form.
    #[test]
    fn uuids_print_hyphenated() {
        let uuid = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(format_uuid(&uuid), "12345678-9abc-def0-0102-030405060708");
    }
}
