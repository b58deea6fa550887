//! The replicator's mirror state on the group record: the engine's
//! [`MirrorStateStore`] kept in the copies of the record on quorum storage,
//! instead of a `.cmcopies` file beside the volume, so that which copy is
//! current survives the loss of the production host (DESIGN.md §6).
//!
//! A store is a compare-and-set of the whole record on its `seq`: read, change
//! the copies' states, write if nobody wrote meanwhile, else read again. The
//! replicator stores before any write a copy missed is acknowledged
//! (invariant 3), so this call is on the path of those writes: when the
//! quorum cannot be reached it retries until it can (`suspend`: the writes
//! wait) or gives up after one try (`io-error`: they get EIO).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use engine::metadata::format_uuid;
use engine::replicator::{CopyRecord, MirrorStateStore, RecordedState, StateError};

use crate::quorum::{CasOutcome, QuorumError, QuorumStore};
use crate::record::{CopyRecordState, GroupRecord, RECORD_KEY};

/// How long one quorum call may take before it is retried (or given up).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The mirror state of one group's production host, on the group record.
pub struct RecordStore {
    quorum: Arc<dyn QuorumStore>,
    /// The production host this store records for, and its epoch: once the
    /// record names another (a takeover, a failover), nothing is recorded
    /// and the writes waiting on it fail (a deposed host acknowledges
    /// nothing a copy may lack).
    me: String,
    epoch: u64,
    /// Retry until the quorum answers (suspend) or fail at once (io-error).
    wait_for_quorum: bool,
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for RecordStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RecordStore").field("wait_for_quorum", &self.wait_for_quorum).finish()
    }
}

impl RecordStore {
    /// The mirror state on `quorum`'s record; `wait_for_quorum` as above;
    /// `stopping` ends the waiting when the node stops.
    pub fn new(
        quorum: Arc<dyn QuorumStore>,
        me: &str,
        epoch: u64,
        wait_for_quorum: bool,
        stopping: Arc<AtomicBool>,
    ) -> RecordStore {
        RecordStore { quorum, me: me.to_string(), epoch, wait_for_quorum, stopping }
    }

    /// Refuse when the record no longer names this host production host at
    /// its epoch.
    fn check_still_production(&self, record: &GroupRecord) -> Result<(), StateError> {
        if record.production.host.as_deref() == Some(self.me.as_str()) && record.epoch == self.epoch {
            return Ok(());
        }
        Err(StateError::Unavailable {
            path: RECORD_KEY.into(),
            action: "record a copy's state",
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "this host was deposed: the record (seq {}) names {} production host at epoch {} (this host served epoch {})",
                    record.seq,
                    record.production.host.as_deref().unwrap_or("nobody"),
                    record.epoch,
                    self.epoch
                ),
            ),
        })
    }

    fn unavailable(action: &'static str, error: QuorumError) -> StateError {
        StateError::Unavailable {
            path: RECORD_KEY.into(),
            action,
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, error.to_string()),
        }
    }

    /// `call` until it answers, as the quorum-loss policy says.
    fn with_retry<T>(
        &self,
        action: &'static str,
        mut call: impl FnMut() -> Result<T, QuorumError>,
    ) -> Result<T, StateError> {
        let mut logged = false;
        loop {
            match call() {
                Ok(value) => return Ok(value),
                Err(error) if self.wait_for_quorum && !self.stopping.load(Ordering::Relaxed) => {
                    if !logged {
                        tracing::warn!(%error, "recording the mirror state waits for the quorum: {error}");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => return Err(RecordStore::unavailable(action, error)),
            }
        }
    }

    fn read(&self) -> Result<GroupRecord, StateError> {
        let stored = self.with_retry("read the group record", || self.quorum.read(RECORD_KEY, CALL_TIMEOUT))?;
        let Some(stored) = stored else {
            return Err(StateError::Corrupt {
                path: RECORD_KEY.into(),
                message: "the group has no record: a production host runs only after joining".to_string(),
            });
        };
        GroupRecord::decode(&stored.value).map_err(|message| StateError::Corrupt { path: RECORD_KEY.into(), message })
    }
}

fn recorded(state: &CopyRecordState) -> RecordedState {
    match state {
        CopyRecordState::Current => RecordedState::Current,
        CopyRecordState::Stale { .. } => RecordedState::Stale,
        CopyRecordState::Syncing => RecordedState::Syncing,
    }
}

fn parse_token(hex: &str) -> [u8; 16] {
    let mut token = [0u8; 16];
    if hex.len() == 32 {
        for (index, byte) in token.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).unwrap_or(0);
        }
    }
    token
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(0))
}

/// The record with the replicator's `records` put into its copies.
pub fn apply(record: &GroupRecord, records: &[CopyRecord], now_ms: u64) -> GroupRecord {
    let mut next = record.clone();
    for copy in records {
        let Some(entry) = next.copy_mut(&copy.name) else { continue };
        let state = match copy.state {
            RecordedState::Current => CopyRecordState::Current,
            RecordedState::Syncing => CopyRecordState::Syncing,
            RecordedState::Stale => match &entry.state {
                // Already stale: keep when and why it first was.
                CopyRecordState::Stale { since, reason } => {
                    CopyRecordState::Stale { since: *since, reason: reason.clone() }
                }
                _ => CopyRecordState::Stale {
                    since: now_ms,
                    reason: copy.reason.clone().unwrap_or_else(|| "missed writes".to_string()),
                },
            },
        };
        entry.state = state;
        entry.slot = copy.slot;
        entry.generation = copy.generation;
        entry.store = format_uuid(&copy.store).replace('-', "");
    }
    next
}

impl MirrorStateStore for RecordStore {
    fn load(&self) -> Result<Vec<CopyRecord>, StateError> {
        let record = self.read()?;
        Ok(record
            .copies
            .iter()
            .map(|copy| CopyRecord {
                name: copy.site.clone(),
                slot: copy.slot,
                state: recorded(&copy.state),
                generation: copy.generation,
                store: parse_token(&copy.store),
                reason: match &copy.state {
                    CopyRecordState::Stale { reason, .. } => Some(reason.clone()),
                    _ => None,
                },
            })
            .collect())
    }

    fn store(&self, records: &[CopyRecord]) -> Result<(), StateError> {
        loop {
            let record = self.read()?;
            self.check_still_production(&record)?;
            let mut next = apply(&record, records, now_ms());
            if next == record {
                return Ok(());
            }
            next.seq = record.seq + 1;
            let bytes = next.encode();
            let outcome = self.with_retry("write the group record", || {
                self.quorum.compare_and_set(RECORD_KEY, record.seq, bytes.clone(), CALL_TIMEOUT)
            })?;
            match outcome {
                CasOutcome::Written(_) => {
                    for copy in &next.copies {
                        if record.copy(&copy.site).map(|before| &before.state) != Some(&copy.state) {
                            tracing::info!(copy = %copy.site, seq = next.seq, state = copy.state.name(),
                                "recorded copy {} {} (record seq {})", copy.site, copy.state.name(), next.seq);
                        }
                    }
                    return Ok(());
                }
                // Someone else wrote first (or our own earlier try, which
                // timed out, committed): read again and redo the change.
                CasOutcome::Conflict(_) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::{Lease, QuorumStatus, Versioned};
    use std::sync::Mutex;

    /// The record in memory: CAS on its seq (a unit-test stand-in).
    struct OneRecord(Mutex<GroupRecord>);

    impl QuorumStore for OneRecord {
        fn read(&self, _key: &str, _timeout: Duration) -> Result<Option<Versioned>, QuorumError> {
            let record = self.0.lock().unwrap();
            Ok(Some(Versioned { revision: record.seq, value: record.encode() }))
        }
        fn compare_and_set(
            &self,
            _: &str,
            expected: u64,
            value: Vec<u8>,
            _: Duration,
        ) -> Result<CasOutcome, QuorumError> {
            let mut record = self.0.lock().unwrap();
            if record.seq != expected {
                return Ok(CasOutcome::Conflict(None));
            }
            *record = GroupRecord::decode(&value).unwrap();
            Ok(CasOutcome::Written(record.seq))
        }
        fn watch(&self, _: &str, _: u64, _: Duration) -> Result<Option<Versioned>, QuorumError> {
            Ok(None)
        }
        fn renew_lease(&self, term: Duration, _: Duration) -> Result<Lease, QuorumError> {
            Ok(Lease { valid_until: std::time::Instant::now() + term })
        }
        fn status(&self) -> QuorumStatus {
            QuorumStatus { id: 1, leader: Some(1), term: 1, is_leader: true, voters: Vec::new(), last_applied: None }
        }
    }

    /// A host deposed meanwhile (the record names another at a higher
    /// epoch) records nothing: the writes waiting on the record fail rather
    /// than be acknowledged by a host whose copies may lack them.
    #[test]
    fn a_deposed_production_host_records_nothing() {
        let mut record = GroupRecord::new("d", "east", &[("west".into(), "sync".into())]);
        record.production.host = Some("a".into());
        record.epoch = 1;
        record.seq = 4;
        let quorum = Arc::new(OneRecord(Mutex::new(record.clone())));
        let store = RecordStore::new(quorum.clone(), "a", 1, true, Arc::new(AtomicBool::new(false)));
        let stale = CopyRecord {
            name: "west".into(),
            slot: 0,
            state: RecordedState::Stale,
            generation: 1,
            store: [0; 16],
            reason: Some("connection lost".into()),
        };
        store.store(std::slice::from_ref(&stale)).expect("the production host records");
        assert_eq!(quorum.0.lock().unwrap().copies[0].state.name(), "stale");
        {
            let mut record = quorum.0.lock().unwrap();
            record.production = crate::record::Production { site: "west".into(), host: Some("b".into()) };
            record.epoch = 2;
            record.seq += 1;
        }
        let before = quorum.0.lock().unwrap().clone();
        let current = CopyRecord { state: RecordedState::Current, ..stale };
        let error = store.store(&[current]).expect_err("a deposed host records nothing");
        assert!(error.to_string().contains("deposed"), "{error}");
        assert_eq!(*quorum.0.lock().unwrap(), before);
    }

    #[test]
    fn the_replicators_records_land_in_the_copies_and_a_stale_copy_keeps_when_and_why() {
        let record = GroupRecord::new("d", "east", &[("west".into(), "sync".into())]);
        let copy = |state, reason: Option<&str>| CopyRecord {
            name: "west".into(),
            slot: 3,
            state,
            generation: 2,
            store: [0xab; 16],
            reason: reason.map(str::to_string),
        };
        let current = apply(&record, &[copy(RecordedState::Current, None)], 10);
        assert_eq!(current.copies[0].state, CopyRecordState::Current);
        assert_eq!((current.copies[0].slot, current.copies[0].generation), (3, 2));
        assert_eq!(current.copies[0].store, "ab".repeat(16));
        assert_eq!(parse_token(&current.copies[0].store), [0xab; 16]);
        let stale = apply(&current, &[copy(RecordedState::Stale, Some("connection lost"))], 20);
        assert_eq!(stale.copies[0].state, CopyRecordState::Stale { since: 20, reason: "connection lost".into() });
        let again = apply(&stale, &[copy(RecordedState::Stale, Some("refused"))], 30);
        assert_eq!(again, stale);
        // A copy the record does not know is not added.
        let unknown = CopyRecord { name: "north".into(), ..copy(RecordedState::Current, None) };
        assert_eq!(apply(&stale, &[unknown], 40), stale);
    }
}
