//! The replicated state machine: keys to (revision, bytes), changed only by
//! compare-and-set entries. It lives in memory; a snapshot file (replaced
//! atomically) holds it durably, and on restart openraft re-applies the log
//! after the snapshot. Applying wakes watchers through a `Condvar`, so the
//! synchronous `watch` needs no runtime.

use std::collections::BTreeMap;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::durable;
use super::types::{CasReply, Command, CommandResponse, StoredValue, TypeConfig};

type LogId = openraft::LogId<u64>;
type Entry = openraft::Entry<TypeConfig>;
type Membership = StoredMembership<u64, openraft::EmptyNode>;
type Meta = SnapshotMeta<u64, openraft::EmptyNode>;

const SNAPSHOT_FILE: &str = "raft-snapshot.json";

/// The applied state.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    keys: BTreeMap<String, StoredValue>,
    last_applied: Option<LogId>,
    last_membership: Membership,
}

impl Applied {
    fn cas(&mut self, key: String, expected: u64, value: Vec<u8>) -> CasReply {
        let current = self.keys.get(&key).map_or(0, |stored| stored.revision);
        if current != expected {
            return CasReply::Conflict(self.keys.get(&key).cloned());
        }
        let revision = current + 1;
        self.keys.insert(key, StoredValue { revision, value });
        CasReply::Written(revision)
    }

    /// The key's value as applied here.
    pub(crate) fn get(&self, key: &str) -> Option<StoredValue> {
        self.keys.get(key).cloned()
    }
}

/// The applied state, shared by the state machine and the synchronous API.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    applied: Mutex<Applied>,
    changed: Condvar,
    snapshot: Mutex<Option<StoredSnapshot>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is one assignment or insert, so the
    // data stays consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Lock the applied state.
    pub(crate) fn applied(&self) -> MutexGuard<'_, Applied> {
        lock(&self.applied)
    }

    /// Wait until `key`'s applied revision exceeds `after`; None at `timeout`.
    pub(crate) fn wait_for(&self, key: &str, after: u64, timeout: Duration) -> Option<StoredValue> {
        let deadline = Instant::now() + timeout;
        let mut applied = self.applied();
        loop {
            if let Some(stored) = applied.keys.get(key).filter(|stored| stored.revision > after) {
                return Some(stored.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            applied = self.changed.wait_timeout(applied, left).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
    }
}

/// A snapshot as kept in memory and in its file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    meta: Meta,
    /// JSON of the key map.
    data: Vec<u8>,
}

fn snapshot_error(verb: ErrorVerb, error: impl ToString) -> StorageError<u64> {
    StorageError::IO {
        source: StorageIOError::new(ErrorSubject::Snapshot(None), verb, AnyError::error(error.to_string())),
    }
}

/// The state machine of one voter.
#[derive(Debug)]
pub(crate) struct StateMachine {
    dir: PathBuf,
    shared: Arc<Shared>,
}

impl StateMachine {
    /// Open the state machine in `dir`: the last snapshot, if any.
    pub(crate) fn open(dir: &Path) -> io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let shared = Arc::new(Shared::default());
        if let Some(bytes) = durable::read_optional(dir, SNAPSHOT_FILE)? {
            let unreadable = |error: serde_json::Error| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "quorum snapshot {} is unreadable ({error}); it is written atomically, so the disk is at fault",
                        dir.join(SNAPSHOT_FILE).display()
                    ),
                )
            };
            let snapshot: StoredSnapshot = serde_json::from_slice(&bytes).map_err(unreadable)?;
            let keys = serde_json::from_slice(&snapshot.data).map_err(unreadable)?;
            *shared.applied() = Applied {
                keys,
                last_applied: snapshot.meta.last_log_id,
                last_membership: snapshot.meta.last_membership.clone(),
            };
            *lock(&shared.snapshot) = Some(snapshot);
        }
        Ok(StateMachine { dir: dir.to_path_buf(), shared })
    }

    /// The state shared with the synchronous API.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }
}

/// Builds snapshots of the state machine it came from.
#[derive(Debug)]
pub(crate) struct SnapshotBuilder {
    dir: PathBuf,
    shared: Arc<Shared>,
}

fn store_snapshot(dir: &Path, shared: &Shared, snapshot: StoredSnapshot) -> io::Result<()> {
    let bytes = serde_json::to_vec(&snapshot).map_err(io::Error::other)?;
    durable::replace_file(dir, SNAPSHOT_FILE, &bytes)?;
    *lock(&shared.snapshot) = Some(snapshot);
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<u64>> {
        let (data, meta) = {
            let applied = self.shared.applied();
            let data = serde_json::to_vec(&applied.keys).map_err(|error| snapshot_error(ErrorVerb::Read, error))?;
            let snapshot_id = match applied.last_applied {
                Some(log_id) => format!("{}-{}-{}", log_id.leader_id, log_id.index, crc32fast::hash(&data)),
                None => format!("empty-{}", crc32fast::hash(&data)),
            };
            let meta = Meta {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
                snapshot_id,
            };
            (data, meta)
        };
        store_snapshot(&self.dir, &self.shared, StoredSnapshot { meta: meta.clone(), data: data.clone() })
            .map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError<u64>> {
        let applied = self.shared.applied();
        Ok((applied.last_applied, applied.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        {
            let mut applied = self.shared.applied();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Blank => CommandResponse::Nothing,
                    EntryPayload::Normal(Command::Cas { key, expected, value }) => {
                        CommandResponse::Cas(applied.cas(key, expected, value))
                    }
                    EntryPayload::Membership(membership) => {
                        applied.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        CommandResponse::Nothing
                    }
                };
                responses.push(response);
            }
        }
        self.shared.changed.notify_all();
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { dir: self.dir.clone(), shared: Arc::clone(&self.shared) }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let keys = serde_json::from_slice(&data).map_err(|error| snapshot_error(ErrorVerb::Read, error))?;
        store_snapshot(&self.dir, &self.shared, StoredSnapshot { meta: meta.clone(), data })
            .map_err(|error| snapshot_error(ErrorVerb::Write, error))?;
        *self.shared.applied() =
            Applied { keys, last_applied: meta.last_log_id, last_membership: meta.last_membership.clone() };
        self.shared.changed.notify_all();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<u64>> {
        Ok(lock(&self.shared.snapshot)
            .clone()
            .map(|stored| Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) }))
    }
}
