//! The durable raft log (openraft storage-v2 `RaftLogStorage`): one
//! append-only file of framed records ([`super::record`]) plus a vote file.
//!
//! Every change — append, truncate, purge — is a record appended and
//! fdatasync'ed before openraft hears it is done; the entries also live in
//! memory, where readers get them. Opening replays the records; a torn or
//! corrupt tail, which a crash mid-append leaves, is cut at the first bad
//! record (and logged). When dead records outnumber live entries, the file
//! is rewritten with only the live ones and replaced atomically. The log
//! stays small: snapshots purge it every few hundred entries.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftLogReader, StorageError};

use super::durable;
use super::record::{self, Record};
use super::types::TypeConfig;

type LogId = openraft::LogId<u64>;
type Entry = openraft::Entry<TypeConfig>;
type Vote = openraft::Vote<u64>;

const LOG_FILE: &str = "raft-log";
const VOTE_FILE: &str = "raft-vote.json";

/// Rewrite the file when it holds this many more records than live entries.
const DEAD_RECORDS_MAX: usize = 256;

/// The entries in memory, shared by the store and its readers.
#[derive(Debug, Default)]
struct Entries {
    by_index: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
}

impl Entries {
    fn replay(&mut self, record: Record) {
        match record {
            Record::Entry(entry) => {
                let index = entry.get_log_id().index;
                self.by_index.split_off(&index);
                self.by_index.insert(index, entry);
            }
            Record::Truncate(index) => {
                self.by_index.split_off(&index);
            }
            Record::Purged(log_id) => {
                self.by_index = self.by_index.split_off(&(log_id.index + 1));
                self.last_purged = self.last_purged.max(Some(log_id));
            }
        }
    }
}

fn lock(entries: &Mutex<Entries>) -> MutexGuard<'_, Entries> {
    // A panic while holding the lock leaves the map consistent (every change
    // is one call), so a poisoned lock is still usable.
    entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads entries from memory; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct LogReader {
    entries: Arc<Mutex<Entries>>,
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<u64>> {
        Ok(lock(&self.entries).by_index.range(range).map(|(_, entry)| entry.clone()).collect())
    }
}

/// The durable log and vote of one voter.
#[derive(Debug)]
pub(crate) struct LogStore {
    dir: PathBuf,
    file: File,
    records_in_file: usize,
    vote: Option<Vote>,
    reader: LogReader,
}

fn io_error(subject: ErrorSubject<u64>, verb: ErrorVerb, error: &io::Error) -> StorageError<u64> {
    StorageError::from_io_error(subject, verb, io::Error::new(error.kind(), error.to_string()))
}

fn any_error(subject: ErrorSubject<u64>, verb: ErrorVerb, error: impl ToString) -> StorageError<u64> {
    StorageError::IO { source: openraft::StorageIOError::new(subject, verb, AnyError::error(error.to_string())) }
}

impl LogStore {
    /// Open (or create) the log in `dir`, cutting a bad tail.
    pub(crate) fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let bytes = durable::read_optional(dir, LOG_FILE)?.unwrap_or_default();
        let decoded = record::decode(&bytes);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if let Some(why) = &decoded.bad_tail {
            tracing::warn!(
                log = %path.display(),
                kept_records = decoded.records.len(),
                cut_bytes = bytes.len() - decoded.valid_bytes,
                "quorum log: cutting a torn or corrupt tail {why}"
            );
            file.set_len(decoded.valid_bytes as u64)?;
            file.sync_all()?;
        }
        let mut entries = Entries::default();
        let records_in_file = decoded.records.len();
        for record in decoded.records {
            entries.replay(record);
        }
        let vote = match durable::read_optional(dir, VOTE_FILE)? {
            None => None,
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|error| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("quorum vote file {} is unreadable ({error}); it is written atomically, so the disk is at fault", dir.join(VOTE_FILE).display()),
                )
            })?),
        };
        Ok(LogStore {
            dir: dir.to_path_buf(),
            file,
            records_in_file,
            vote,
            reader: LogReader { entries: Arc::new(Mutex::new(entries)) },
        })
    }

    /// Append records and make them durable.
    fn write_records(&mut self, records: &[Record]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for one in records {
            record::encode(one, &mut bytes).map_err(io::Error::other)?;
        }
        self.file.write_all(&bytes)?;
        self.file.sync_data()?;
        self.records_in_file += records.len();
        Ok(())
    }

    /// Rewrite the file with only the live entries when dead records pile up.
    fn compact_if_worthwhile(&mut self) -> io::Result<()> {
        let live = {
            let entries = lock(&self.reader.entries);
            if self.records_in_file < entries.by_index.len() + DEAD_RECORDS_MAX {
                return Ok(());
            }
            let mut live: Vec<Record> = entries.last_purged.map(Record::Purged).into_iter().collect();
            live.extend(entries.by_index.values().cloned().map(Record::Entry));
            live
        };
        let mut bytes = Vec::new();
        for one in &live {
            record::encode(one, &mut bytes).map_err(io::Error::other)?;
        }
        durable::replace_file(&self.dir, LOG_FILE, &bytes)?;
        self.file = OpenOptions::new().append(true).open(self.dir.join(LOG_FILE))?;
        self.records_in_file = live.len();
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<u64>> {
        self.reader.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<u64>> {
        let entries = lock(&self.reader.entries);
        let last_purged_log_id = entries.last_purged;
        let last_log_id = entries.by_index.values().next_back().map(|entry| *entry.get_log_id()).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> LogReader {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError<u64>> {
        let bytes = serde_json::to_vec(vote).map_err(|error| any_error(ErrorSubject::Vote, ErrorVerb::Write, error))?;
        durable::replace_file(&self.dir, VOTE_FILE, &bytes)
            .map_err(|error| io_error(ErrorSubject::Vote, ErrorVerb::Write, &error))?;
        self.vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError<u64>> {
        Ok(self.vote)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let records: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        if let Err(error) = self.write_records(&records) {
            let storage_error = io_error(ErrorSubject::Logs, ErrorVerb::Write, &error);
            callback.log_io_completed(Err(error));
            return Err(storage_error);
        }
        {
            let mut memory = lock(&self.reader.entries);
            for one in records {
                memory.replay(one);
            }
        }
        // Only now, with the records fdatasync'ed, may openraft count them.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError<u64>> {
        let record = Record::Truncate(log_id.index);
        self.write_records(std::slice::from_ref(&record))
            .map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &error))?;
        lock(&self.reader.entries).replay(record);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError<u64>> {
        let record = Record::Purged(log_id);
        self.write_records(std::slice::from_ref(&record))
            .map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Delete, &error))?;
        lock(&self.reader.entries).replay(record);
        self.compact_if_worthwhile().map_err(|error| io_error(ErrorSubject::Logs, ErrorVerb::Write, &error))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(super::super::types::Command::Cas {
                key: "k".to_string(),
                expected: index,
                value: vec![7; 100],
            }),
        }
    }

    fn write_five(dir: &Path) {
        let mut store = LogStore::open(dir).expect("open");
        store.write_records(&(1..=5).map(|index| Record::Entry(entry(index))).collect::<Vec<_>>()).expect("write");
    }

    fn indexes(dir: &Path) -> Vec<u64> {
        let store = LogStore::open(dir).expect("reopen");
        let entries = lock(&store.reader.entries);
        entries.by_index.keys().copied().collect()
    }

    /// A log cut mid-record, or with a flipped byte in its last record, opens
    /// with the earlier records and accepts appends after them.
    #[test]
    fn torn_or_corrupt_tail_is_cut_at_open() {
        for damage in ["truncate", "flip"] {
            let dir = tempfile::tempdir().expect("tempdir");
            write_five(dir.path());
            let path = dir.path().join(LOG_FILE);
            let mut bytes = std::fs::read(&path).expect("read");
            match damage {
                "truncate" => bytes.truncate(bytes.len() - 10),
                _ => {
                    // A digit of the last record's value: still valid JSON,
                    // so only the checksum can tell.
                    let digit = bytes.windows(3).rposition(|window| window == b"7,7").expect("a value digit");
                    bytes[digit] = b'6';
                }
            }
            std::fs::write(&path, &bytes).expect("damage");
            assert_eq!(indexes(dir.path()), vec![1, 2, 3, 4], "{damage}");

            let mut store = LogStore::open(dir.path()).expect("open");
            store.write_records(&[Record::Entry(entry(5))]).expect("append after the cut");
            drop(store);
            assert_eq!(indexes(dir.path()), vec![1, 2, 3, 4, 5], "{damage}");
        }
    }

    /// Truncate and purge survive a reopen, also after compaction.
    #[test]
    fn truncate_and_purge_are_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_five(dir.path());
        let mut store = LogStore::open(dir.path()).expect("open");
        store.write_records(&[Record::Truncate(4), Record::Purged(*entry(1).get_log_id())]).expect("write");
        drop(store);
        assert_eq!(indexes(dir.path()), vec![2, 3]);

        let mut store = LogStore::open(dir.path()).expect("open");
        store.records_in_file += DEAD_RECORDS_MAX;
        lock(&store.reader.entries).replay(Record::Purged(*entry(2).get_log_id()));
        store.compact_if_worthwhile().expect("compact");
        drop(store);
        let store = LogStore::open(dir.path()).expect("open");
        assert_eq!(store.records_in_file, 2);
        assert_eq!(lock(&store.reader.entries).last_purged.map(|id| id.index), Some(2));
        assert_eq!(lock(&store.reader.entries).by_index.keys().copied().collect::<Vec<_>>(), vec![3]);
    }
}
