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
//! The file is a fixed 64-byte little-endian record with a CRC32:
//!
//! ```text
//!  offset size field           meaning
//!       0    8 magic           "CMMETA\0\0"
//!       8    4 version         1
//!      12    1 state           1 consistent, 2 syncing
//!      13    1 has_identity    0 or 1
//!      14    2 zero
//!      16   16 uuid            the mirrored volume's identifier; zero when absent
//!      32    8 size_bytes      the mirrored volume's size; zero when absent
//!      40    8 generation      the generation this store holds
//!      48    8 epoch_promised  the highest epoch this store has promised
//!      56    4 zero
//!      60    4 crc             CRC32 of bytes 0..60
//! ```
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

use crate::protocol::auth::VolumeIdentity;

/// The suffix appended to a volume's path to name its metadata file.
pub const METADATA_FILE_SUFFIX: &str = ".cmmeta";
/// The length of the metadata record in bytes.
pub const METADATA_BYTES: usize = 64;

const MAGIC: [u8; 8] = *b"CMMETA\0\0";
const VERSION: u32 = 1;
const CRC_OFFSET: usize = 60;

/// The path of the metadata file that belongs to the volume at `volume_path`.
pub fn metadata_path(volume_path: &Path) -> PathBuf {
    let mut name = volume_path.as_os_str().to_owned();
    name.push(METADATA_FILE_SUFFIX);
    PathBuf::from(name)
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
            MetadataError::Mismatch { .. } => MetadataErrorKind::Mismatch,
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
}

impl VolumeMetadata {
    /// The metadata of a fresh copy: no identity, nothing promised, and
    /// `syncing`, since it holds no image of any volume yet.
    pub fn fresh() -> VolumeMetadata {
        VolumeMetadata { identity: None, generation: 0, epoch_promised: 0, state: StoreState::Syncing }
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
        let crc = crc32fast::hash(&bytes[..CRC_OFFSET]);
        bytes[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The metadata the record `bytes`, read from `path`, holds.
    fn decode(path: &Path, bytes: &[u8]) -> Result<VolumeMetadata, MetadataError> {
        let corrupt = |message: String| MetadataError::Corrupt { path: path.to_path_buf(), message };
        let bytes: &[u8; METADATA_BYTES] = bytes
            .try_into()
            .map_err(|_| corrupt(format!("is {} bytes long, a metadata record is {METADATA_BYTES}", bytes.len())))?;
        if bytes[0..8] != MAGIC {
            return Err(corrupt(
                "does not start with the metadata magic \"CMMETA\"; it is not a crossmirror metadata file".into(),
            ));
        }
        // The CRC is checked before the version, so a damaged version field
        // reads as damage rather than as a file from another release.
        let carried = u32::from_le_bytes(array(&bytes[CRC_OFFSET..]));
        let computed = crc32fast::hash(&bytes[..CRC_OFFSET]);
        if carried != computed {
            return Err(corrupt(format!("fails its CRC (carried {carried:#010x}, computed {computed:#010x})")));
        }
        let version = u32::from_le_bytes(array(&bytes[8..12]));
        if version != VERSION {
            return Err(MetadataError::Version { path: path.to_path_buf(), found: version, supported: VERSION });
        }
        let state = match bytes[12] {
            1 => StoreState::Consistent,
            2 => StoreState::Syncing,
            other => return Err(corrupt(format!("names an unknown state {other}"))),
        };
        if bytes[14..16] != [0; 2] || bytes[56..60] != [0; 4] {
            return Err(corrupt("has non-zero reserved bytes".into()));
        }
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
        })
    }
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
pub(crate) fn replace_file_durably(path: &Path, bytes: &[u8]) -> Result<(), (&'static str, io::Error)> {
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

/// The identity of the production volume at `volume_path` of `size_bytes`:
/// the one its metadata records, or a new one, created and stored durably
/// the first time. A recorded identity of another size is refused: a
/// resized volume is another volume to its copies.
pub fn production_identity(volume_path: &Path, size_bytes: u64) -> Result<VolumeIdentity, MetadataError> {
    let path = metadata_path(volume_path);
    let metadata = load_metadata(&path)?;
    if let Some(identity) = metadata.and_then(|metadata| metadata.identity) {
        if identity.size_bytes != size_bytes {
            return Err(MetadataError::Mismatch {
                path,
                message: format!(
                    "records volume uuid {} of {} bytes, but {} is {size_bytes} bytes; restore the volume's size, \
                     or move the metadata aside to make it a new volume (every copy then needs a full sync)",
                    format_uuid(&identity.uuid),
                    identity.size_bytes,
                    volume_path.display()
                ),
            });
        }
        return Ok(identity);
    }
    let identity = new_identity(size_bytes).map_err(|source| MetadataError::Io {
        path: path.clone(),
        action: "draw a uuid",
        source,
    })?;
    // A volume that starts serving as production is, by definition, the
    // reference image; a fresh store's other fields start from zero.
    let base = metadata.unwrap_or(VolumeMetadata { generation: 1, ..VolumeMetadata::fresh() });
    store_metadata(&path, &VolumeMetadata { identity: Some(identity), state: StoreState::Consistent, ..base })?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    const IDENTITY: VolumeIdentity = VolumeIdentity { uuid: [0xa5; 16], size_bytes: 64 << 20 };

    fn mirrored() -> VolumeMetadata {
        VolumeMetadata { identity: Some(IDENTITY), generation: 7, epoch_promised: 12, state: StoreState::Consistent }
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
        for bytes in [&good[..63], &[good.as_slice(), &[0]].concat()[..], b"[volume]\nepoch = 3\n"] {
            fs::write(&path, bytes).unwrap();
            assert_eq!(load_metadata(&path).unwrap_err().kind(), MetadataErrorKind::Corrupt);
        }
        fs::write(&path, [0u8; METADATA_BYTES]).unwrap();
        assert!(load_metadata(&path).unwrap_err().to_string().contains("not a crossmirror metadata file"));
        let mut newer = good;
        newer[8] = 2;
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
        let volume = directory.path().join("volume");
        let identity = production_identity(&volume, 1 << 30).unwrap();
        assert_eq!(identity.size_bytes, 1 << 30);
        assert_eq!(identity.uuid[6] >> 4, 4);
        assert_eq!(identity.uuid[8] >> 6, 0b10);
        assert_eq!(production_identity(&volume, 1 << 30).unwrap(), identity);
        let stored = load_metadata(&metadata_path(&volume)).unwrap().unwrap();
        assert_eq!(stored.identity, Some(identity));
        assert_eq!(stored.state, StoreState::Consistent);
        let error = production_identity(&volume, 2 << 30).unwrap_err();
        assert_eq!(error.kind(), MetadataErrorKind::Mismatch);
        assert!(error.to_string().contains(&format_uuid(&identity.uuid)), "{error}");
        assert_ne!(production_identity(&directory.path().join("other"), 1 << 30).unwrap(), identity);
    }

    /// UUIDs print in the usual hyphenated form.
    #[test]
    fn uuids_print_hyphenated() {
        let uuid = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(format_uuid(&uuid), "12345678-9abc-def0-0102-030405060708");
    }
}
