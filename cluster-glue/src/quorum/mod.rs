//! Quorum storage (DESIGN.md §6): the synchronous trait the group layer
//! uses, whatever the backend. Every call has a timeout; none is ever made
//! from an io_uring completion path.
//!
//! The model is a tiny key-value store in the spirit of etcd v3: each key
//! holds bytes and a revision (0 when absent, +1 on every write of that key),
//! and every write is a compare-and-set on the revision, so a retried write
//! whose first try timed out (and may still commit later) cannot apply twice.
//! The embedded backend ([`raft`]) keeps it in an openraft state machine; the
//! etcd backend (`etcd`, behind the cargo feature of that name) maps the
//! revision to the etcd key's version and compares it in a transaction.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[cfg(feature = "etcd")]
pub mod etcd;
pub mod raft;

/// A key's value and revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// +1 on every write of this key; the first write makes it 1.
    pub revision: u64,
    /// The bytes written.
    pub value: Vec<u8>,
}

/// What a compare-and-set did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written; this is the key's new revision.
    Written(u64),
    /// Not written: the key's revision was not the one expected. What it
    /// holds now (None: absent).
    Conflict(Option<Versioned>),
}

/// A lease: the quorum was confirmed reachable; whoever holds it may act
/// (serve I/O) until `valid_until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// When it runs out, by this host's monotonic clock. It is measured from
    /// before the confirmation was asked for, so it never outlives the
    /// quorum's own view.
    pub valid_until: Instant,
}

/// Why a quorum call did not complete.
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    /// No answer with a quorum behind it in time: the quorum may be lost, or
    /// only slow. A write that timed out may still commit later.
    #[error("quorum store: {what} got no quorum answer within {timeout:?}")]
    Timeout {
        /// The call.
        what: &'static str,
        /// Its timeout.
        timeout: Duration,
    },
    /// The store's local storage failed (the log or vote could not be made
    /// durable): this voter stops.
    #[error("quorum store: local storage: {0}")]
    Storage(String),
    /// The store was stopped.
    #[error("quorum store is stopped")]
    Stopped,
    /// Anything else the backend reports, in its words.
    #[error("quorum store: {0}")]
    Other(String),
}

/// One voter as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoterStatus {
    /// The voter's id.
    pub id: u64,
    /// Its quorum address.
    pub address: SocketAddr,
    /// Whether this node heard from it lately (the leader knows best; a
    /// follower reports only itself and the leader).
    pub reachable: Option<bool>,
}

/// The store's view of the quorum, for status pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumStatus {
    /// This node's id.
    pub id: u64,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// The current term.
    pub term: u64,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// Every voter.
    pub voters: Vec<VoterStatus>,
    /// The index of the last entry applied here.
    pub last_applied: Option<u64>,
}

/// Quorum storage: linearizable compare-and-set on keys, reads, change
/// notification and leases.
pub trait QuorumStore: Send + Sync {
    /// The value of `key` with a quorum behind it (linearizable: every write
    /// that completed before this call started is seen).
    fn read(&self, key: &str, timeout: Duration) -> Result<Option<Versioned>, QuorumError>;

    /// Write `value` to `key` if and only if its revision is `expected`
    /// (0: the key is absent). Returns when the outcome is committed on a
    /// quorum.
    fn compare_and_set(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<CasOutcome, QuorumError>;

    /// Wait until this node has applied a revision of `key` above `after`,
    /// then return it; `Ok(None)` when `timeout` passes first. Served from
    /// this node's applied state (it may lag the leader): for notification,
    /// not for decisions; decide with [`QuorumStore::compare_and_set`].
    fn watch(&self, key: &str, after: u64, timeout: Duration) -> Result<Option<Versioned>, QuorumError>;

    /// Confirm that a quorum of voters follows the current leader now, and
    /// grant a lease of `term` measured from before the call. No log entry
    /// is appended for it.
    fn renew_lease(&self, term: Duration, timeout: Duration) -> Result<Lease, QuorumError>;

    /// What this node knows of the quorum now (no network call).
    fn status(&self) -> QuorumStatus;
}

/// Run `work` on a backend's own `runtime` within `timeout`, from a plain
/// thread (the backends keep tokio inside; every trait call goes through
/// here). `None`: the backend was stopped.
pub(crate) fn block_on_within<T>(
    runtime: Option<&tokio::runtime::Runtime>,
    what: &'static str,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, QuorumError>>,
) -> Result<T, QuorumError> {
    let runtime = runtime.ok_or(QuorumError::Stopped)?;
    runtime
        .block_on(async { tokio::time::timeout(timeout, work).await })
        .unwrap_or(Err(QuorumError::Timeout { what, timeout }))
}
