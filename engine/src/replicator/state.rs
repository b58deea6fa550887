//! The mirror state: for each copy of a volume, whether it holds the volume
//! (`current`), has missed writes (`stale`) or is being resynced
//! (`syncing`), and which bitmap slot tracks its differences.
//!
//! The replicator reads and writes it only through [`MirrorStateStore`], so
//! that the group layer can keep it on quorum storage later (DESIGN.md §6);
//! here it lives next to the volume in `<volume>.cmcopies`, a small text
//! file replaced atomically and durably on every change:
//!
//! ```text
//!  crossmirror-copies 2
//!  copy east slot 0 state current generation 1 store 5f0c…(32 hex digits)
//!  copy west slot 1 state stale generation 1 store 00000000000000000000000000000000
//!  crc 1c291ca3
//! ```
//!
//! The last line is the CRC32 of every byte before it, so a damaged file is
//! refused rather than read as a copy being current (invariant 2). `store`
//! is the token of the copy store last synced (all zeroes: none yet); a copy
//! that offers another token gets a full resync (invariant 9). Version 1
//! files (no `store`) are read with every store unknown.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use crate::metadata::replace_file_durably;
use crate::protocol::auth::StoreToken;

/// The suffix appended to a volume's path to name its mirror-state file.
pub const STATE_FILE_SUFFIX: &str = ".cmcopies";
const HEADER_LINE: &str = "crossmirror-copies 2";
const HEADER_LINE_V1: &str = "crossmirror-copies 1";

/// What the mirror state records about one copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordedState {
    /// The copy has every acknowledged write (sync) or a consistent prefix
    /// of them (async) and may be promoted.
    Current,
    /// The copy missed writes; it must be resynced before it is used.
    Stale,
    /// The copy is being resynced: not a consistent image, never promoted.
    Syncing,
}

impl RecordedState {
    fn as_str(self) -> &'static str {
        match self {
            RecordedState::Current => "current",
            RecordedState::Stale => "stale",
            RecordedState::Syncing => "syncing",
        }
    }

    fn parse(text: &str) -> Option<RecordedState> {
        match text {
            "current" => Some(RecordedState::Current),
            "stale" => Some(RecordedState::Stale),
            "syncing" => Some(RecordedState::Syncing),
            _ => None,
        }
    }
}

/// One copy's record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CopyRecord {
    /// The copy's name, as given on the command line.
    pub name: String,
    /// The write-intent bitmap slot that tracks this copy.
    pub slot: u32,
    /// Its state.
    pub state: RecordedState,
    /// The volume generation the record was made in.
    pub generation: u64,
    /// The token of the copy store last synced; unknown when none was.
    pub store: StoreToken,
    /// Why it was last recorded stale, when the store keeps it (the group
    /// record does; the local file does not).
    pub reason: Option<String>,
}

/// What kind of mirror-state failure, for callers that choose a reaction
/// (the quorum store of the group layer reports the same kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateErrorKind {
    /// The stored records are damaged: refuse to start rather than guess.
    Corrupt,
    /// The store could not be read or written now (I/O, full disk, no
    /// quorum): writes that need a record get EIO until it succeeds.
    Unavailable,
}

/// A mirror-state error: where, what kind, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The stored records are damaged.
    #[error("mirror state {path}: {message}; the file is damaged: move it aside and every copy gets a full sync")]
    Corrupt {
        /// The state file (or the quorum key, for other stores).
        path: PathBuf,
        /// What is damaged.
        message: String,
    },
    /// The store could not be read or written.
    #[error("mirror state {path}: {action}: {source}")]
    Unavailable {
        /// The state file (or the quorum key, for other stores).
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl StateError {
    /// The kind of this error.
    pub fn kind(&self) -> StateErrorKind {
        match self {
            StateError::Corrupt { .. } => StateErrorKind::Corrupt,
            StateError::Unavailable { .. } => StateErrorKind::Unavailable,
        }
    }
}

/// Where the mirror state lives. Implementations store durably: when
/// [`MirrorStateStore::store`] returns, a crash of this host keeps the
/// records.
pub trait MirrorStateStore: Send + Sync + std::fmt::Debug {
    /// Every copy's record; empty when nothing was stored yet.
    fn load(&self) -> Result<Vec<CopyRecord>, StateError>;
    /// Replace every record, durably.
    fn store(&self, records: &[CopyRecord]) -> Result<(), StateError>;
}

/// The mirror state in a file next to the volume.
#[derive(Debug, Clone)]
pub struct LocalStateFile {
    path: PathBuf,
}

impl LocalStateFile {
    /// The state file at `path`.
    pub fn at(path: &Path) -> LocalStateFile {
        LocalStateFile { path: path.to_path_buf() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn unavailable(&self, action: &'static str, source: io::Error) -> StateError {
        StateError::Unavailable { path: self.path.clone(), action, source }
    }
}

impl MirrorStateStore for LocalStateFile {
    fn load(&self) -> Result<Vec<CopyRecord>, StateError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => decode(&bytes).map_err(|message| StateError::Corrupt { path: self.path.clone(), message }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(self.unavailable("read", error)),
        }
    }

    fn store(&self, records: &[CopyRecord]) -> Result<(), StateError> {
        replace_file_durably(&self.path, encode(records).as_bytes())
            .map_err(|(action, error)| self.unavailable(action, error))
    }
}

/// The file's text for `records`.
pub fn encode(records: &[CopyRecord]) -> String {
    let mut text = format!("{HEADER_LINE}\n");
    for record in records {
        let store: String = record.store.iter().map(|byte| format!("{byte:02x}")).collect();
        let _ = writeln!(
            text,
            "copy {} slot {} state {} generation {} store {store}",
            record.name,
            record.slot,
            record.state.as_str(),
            record.generation
        );
    }
    let crc = crc32fast::hash(text.as_bytes());
    let _ = writeln!(text, "crc {crc:08x}");
    text
}

/// The records in a file's bytes, or what is wrong with them.
pub fn decode(bytes: &[u8]) -> Result<Vec<CopyRecord>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not UTF-8 text".to_string())?;
    let body_end = text.trim_end_matches('\n').rfind('\n').map(|at| at + 1).ok_or("has no CRC line")?;
    let (body, crc_line) = text.split_at(body_end);
    let carried = crc_line
        .trim_end()
        .strip_prefix("crc ")
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or("does not end with a `crc XXXXXXXX` line")?;
    let computed = crc32fast::hash(body.as_bytes());
    if carried != computed {
        return Err(format!("fails its CRC (carried {carried:08x}, computed {computed:08x})"));
    }
    let mut lines = body.lines();
    let version = match lines.next() {
        Some(HEADER_LINE) => 2,
        Some(HEADER_LINE_V1) => 1,
        _ => return Err(format!("does not start with `{HEADER_LINE}`")),
    };
    let mut records = Vec::new();
    for line in lines {
        let words: Vec<&str> = line.split(' ').collect();
        let (name, slot, state, generation, store) = match (version, words.as_slice()) {
            (1, ["copy", name, "slot", slot, "state", state, "generation", generation]) => {
                (name, slot, state, generation, None)
            }
            (2, ["copy", name, "slot", slot, "state", state, "generation", generation, "store", store]) => {
                (name, slot, state, generation, Some(*store))
            }
            _ => return Err(format!("cannot read the line `{line}`")),
        };
        records.push(CopyRecord {
            name: name.to_string(),
            slot: slot.parse().map_err(|_| format!("bad slot in `{line}`"))?,
            state: RecordedState::parse(state).ok_or_else(|| format!("unknown state in `{line}`"))?,
            generation: generation.parse().map_err(|_| format!("bad generation in `{line}`"))?,
            store: match store {
                Some(hex) => parse_token(hex).ok_or_else(|| format!("bad store token in `{line}`"))?,
                None => crate::protocol::auth::STORE_TOKEN_UNKNOWN,
            },
            reason: None,
        });
    }
    Ok(records)
}

/// A store token written as 32 lowercase hex digits.
fn parse_token(hex: &str) -> Option<StoreToken> {
    if hex.len() != 32 || !hex.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)) {
        return None;
    }
    let mut token = [0u8; 16];
    for (index, byte) in token.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<CopyRecord> {
        vec![
            CopyRecord {
                name: "east".into(),
                slot: 0,
                state: RecordedState::Current,
                generation: 1,
                store: [0xab; 16],
                reason: None,
            },
            CopyRecord {
                name: "west".into(),
                slot: 1,
                state: RecordedState::Syncing,
                generation: 7,
                store: [0; 16],
                reason: None,
            },
        ]
    }

    #[test]
    fn records_round_trip_through_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let store = LocalStateFile::at(&crate::metadata::MetadataFiles::beside(&directory.path().join("volume")).state);
        assert_eq!(store.load().unwrap(), []);
        store.store(&records()).unwrap();
        assert_eq!(store.load().unwrap(), records());
    }

    /// A damaged file is Corrupt (refuse to start); a store that cannot be
    /// written is Unavailable (writes needing a record get EIO).
    #[test]
    fn errors_say_their_kind() {
        let directory = tempfile::tempdir().unwrap();
        let store = LocalStateFile::at(&crate::metadata::MetadataFiles::beside(&directory.path().join("volume")).state);
        std::fs::write(store.path(), b"crossmirror-copies 2\ncrc 00000000\n").unwrap();
        assert_eq!(store.load().unwrap_err().kind(), StateErrorKind::Corrupt);
        let nowhere = LocalStateFile::at(&directory.path().join("missing").join("volume.cmcopies"));
        let error = nowhere.store(&records()).unwrap_err();
        assert_eq!(error.kind(), StateErrorKind::Unavailable);
        assert!(error.to_string().contains("missing"), "{error}");
    }

    /// A version 1 file is read with every store unknown.
    #[test]
    fn version_1_files_are_read() {
        let mut text = "crossmirror-copies 1\ncopy east slot 0 state current generation 1\n".to_string();
        let crc = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("crc {crc:08x}\n"));
        let records = decode(text.as_bytes()).unwrap();
        assert_eq!(records[0].store, [0; 16]);
        assert_eq!(records[0].state, RecordedState::Current);
    }

    /// Any flipped byte is refused, never read as another state.
    #[test]
    fn a_damaged_file_is_refused() {
        let text = encode(&records());
        for at in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[at] ^= 0x04;
            assert!(decode(&bytes).is_err(), "flipping byte {at} went unnoticed: {}", String::from_utf8_lossy(&bytes));
        }
    }
}
