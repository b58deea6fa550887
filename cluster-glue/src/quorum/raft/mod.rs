//! The embedded quorum backend: an openraft group of the voters named in the
//! config, behind the synchronous [`QuorumStore`] trait.
//!
//! ```text
//!  std thread ── QuorumStore call ──► RaftQuorum ─ block_on(timeout(..)) ─┐
//!                                                                        ▼
//!  tokio runtime (2 workers, owned here):   leader? ── yes ─► leader::serve ─► openraft
//!                                              └─ no ─► forward to leader over TCP (network.rs)
//!  peers ── TCP frames (frame.rs) ──► server.rs ──► openraft RPCs / leader::serve
//!  openraft ──► log_store.rs (durable log, vote)   state_machine.rs (keys, snapshot file)
//! ```
//!
//! tokio and openraft stay inside this module. Every call runs on the
//! runtime under its own timeout and answers [`QuorumError::Timeout`] when
//! it passes; calls come from plain threads, never from the runtime.
//!
//! Bootstrap: every voter knows the whole voter set from its config. A node
//! whose log and vote are both empty calls openraft's `initialize` with that
//! set. In openraft 0.9 `initialize` appends the membership entry at the
//! fixed log id (term 0, index 0) and then starts an ordinary election at
//! term 1 (`Engine::initialize`, `Engine::elect`); so voters initializing
//! with the identical set write the identical first entry, and the election
//! that follows is plain Raft: at most one leader per term. A node that has
//! already voted or holds a log gets `NotAllowed`, which is expected (it
//! learns the membership from the leader). The voter sets must therefore be
//! identical in every voter's config; membership is fixed.
//!
//! Timing (openraft 0.9): a follower that has heard from a leader refuses
//! to vote for another for `election_timeout.1` (its leader lease), and
//! starts an election `election_timeout.1` plus a random
//! `election_timeout.0..election_timeout.1` after the last heartbeat. With
//! the defaults of [`RaftQuorumConfig::new`] a new leader is elected
//! 1.5–2 s after the old one dies; a group node uses
//! [`RaftQuorumConfig::timed_for`] its failure time instead, so that a dead
//! leader is replaced within the time liveness takes to find a dead member
//! (0.75–1 s with the default 1 s). A lease from
//! [`QuorumStore::renew_lease`] is sound for a term up to
//! `election_timeout.1` less clock-rate drift: no other leader can be
//! confirmed before the followers that acknowledged this one let go. (The
//! group's production lease does not rest on that: it is a linearizable
//! read of the record, `node.rs`, which a deposed leader cannot answer.)

mod durable;
mod frame;
mod leader;
mod log_store;
mod network;
mod record;
mod server;
mod state_machine;
#[cfg(test)]
mod suite_test;
mod types;
mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{InitializeError, RaftError};
use openraft::{Raft, ServerState, SnapshotPolicy};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::{CasOutcome, Lease, QuorumError, QuorumStatus, QuorumStore, Versioned, VoterStatus};
use frame::FrameKey;
use network::{CallError, NetworkFactory, Peers};
use state_machine::Shared;
use types::{CasReply, TypeConfig};
use wire::{ClientReply, ClientRequest, Request};

/// A snapshot is taken after this many entries, and the log purged up to
/// it, so the log stays bounded.
const SNAPSHOT_EVERY_ENTRIES: u64 = 200;
/// Entries kept in the log behind a snapshot, for followers slightly behind.
const LOG_KEPT_BEHIND_SNAPSHOT: u64 = 100;
/// Snapshot chunk size (JSON-encoded, up to about 4x on the wire).
const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;
/// First pause between retries of a call with no leader to answer it.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(10);
/// Longest pause between retries.
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(100);
/// One forwarded request waits at most this long for the leader's answer,
/// so a frozen leader costs one attempt, not the whole call, once another
/// is elected.
const FORWARD_ATTEMPT_MAX: Duration = Duration::from_secs(1);
/// How long stop waits for openraft and the runtime.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest heartbeat interval [`RaftQuorumConfig::timed_for`] picks.
const HEARTBEAT_MAX: Duration = Duration::from_millis(100);

/// How to run one voter of the embedded quorum.
#[derive(Debug, Clone)]
pub struct RaftQuorumConfig {
    /// This voter's id (1 and up).
    pub node_id: u64,
    /// Every voter's quorum (TCP) address, including this node; identical
    /// in every voter's config.
    pub voters: BTreeMap<u64, SocketAddr>,
    /// This node's TCP listen address (normally `voters[node_id]`).
    pub listen: SocketAddr,
    /// Durable log, vote and snapshot; created if absent.
    pub dir: PathBuf,
    /// The HMAC-SHA256 key authenticating every RPC.
    pub secret: Vec<u8>,
    /// The group's name; RPCs for another group are refused.
    pub group: String,
    /// Leader heartbeat interval (default 100 ms).
    pub heartbeat: Duration,
    /// A follower hearing no leader for a random time in this range starts
    /// an election (default 500..1000 ms).
    pub election_timeout: (Duration, Duration),
}

impl RaftQuorumConfig {
    /// A config with the default timings.
    pub fn new(
        node_id: u64,
        voters: BTreeMap<u64, SocketAddr>,
        dir: PathBuf,
        secret: Vec<u8>,
        group: String,
    ) -> RaftQuorumConfig {
        let listen = voters.get(&node_id).copied().unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        RaftQuorumConfig {
            node_id,
            voters,
            listen,
            dir,
            secret,
            group,
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(500), Duration::from_millis(1000)),
        }
    }

    /// The timings for a group that takes `failure_after` to find a dead
    /// member (`[liveness] failure_ms`): an election starts 3/4 to 1 of it
    /// after the leader's last heartbeat (openraft's leader lease
    /// `failure_after / 2`, then a random `failure_after / 4 .. / 2`), so
    /// that the quorum has a leader again by the time the group's leader
    /// could force a member out. Heartbeats every tenth of it, at most
    /// every 100 ms: a confirmation round (a linearizable read) waits one
    /// heartbeat interval for each follower's answer, so shorter is not
    /// better.
    pub fn timed_for(self, failure_after: Duration) -> RaftQuorumConfig {
        RaftQuorumConfig {
            heartbeat: (failure_after / 10).min(HEARTBEAT_MAX),
            election_timeout: (failure_after / 4, failure_after / 2),
            ..self
        }
    }

    fn check(&self) -> Result<(), QuorumError> {
        let refuse = |why: String| Err(QuorumError::Other(format!("quorum config of node {}: {why}", self.node_id)));
        if self.node_id == 0 {
            return refuse("node ids start at 1".to_string());
        }
        if !self.voters.contains_key(&self.node_id) {
            return refuse("this node is not among the voters; add it to the voter set".to_string());
        }
        if self.voters.contains_key(&0) {
            return refuse("voter id 0 is not allowed; ids start at 1".to_string());
        }
        if self.secret.is_empty() {
            return refuse("the secret is empty; set the group's quorum secret".to_string());
        }
        if self.election_timeout.0 <= self.heartbeat || self.election_timeout.1 <= self.election_timeout.0 {
            return refuse(format!(
                "election timeout {:?} must lie above the heartbeat {:?} and be a non-empty range",
                self.election_timeout, self.heartbeat
            ));
        }
        Ok(())
    }

    fn openraft_config(&self) -> Result<openraft::Config, QuorumError> {
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1);
        openraft::Config {
            cluster_name: self.group.clone(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_timeout.0),
            election_timeout_max: millis(self.election_timeout.1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_ENTRIES),
            max_in_snapshot_log_to_keep: LOG_KEPT_BEHIND_SNAPSHOT,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|error| QuorumError::Other(format!("quorum config: {error}")))
    }
}

/// One running voter of the embedded quorum.
pub struct RaftQuorum {
    me: u64,
    voters: BTreeMap<u64, SocketAddr>,
    raft: Raft<TypeConfig>,
    shared: Arc<Shared>,
    peers: Arc<Peers>,
    stop: watch::Sender<bool>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for RaftQuorum {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("RaftQuorum").field("me", &self.me).field("voters", &self.voters).finish_non_exhaustive()
    }
}

fn storage_error(dir: &std::path::Path, error: std::io::Error) -> QuorumError {
    QuorumError::Storage(format!("{}: {error}", dir.display()))
}

impl RaftQuorum {
    /// Open the durable state in `config.dir`, listen, join the voters, and
    /// bootstrap the group if this node has never been part of it.
    pub fn start(config: RaftQuorumConfig) -> Result<RaftQuorum, QuorumError> {
        config.check()?;
        let raft_config = Arc::new(config.openraft_config()?);
        let log_store = log_store::LogStore::open(&config.dir).map_err(|error| storage_error(&config.dir, error))?;
        let state_machine =
            state_machine::StateMachine::open(&config.dir).map_err(|error| storage_error(&config.dir, error))?;
        let shared = state_machine.shared();
        let peers =
            Arc::new(Peers::new(config.node_id, config.voters.clone(), FrameKey::new(&config.secret, &config.group)));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("quorum-{}", config.node_id))
            .enable_all()
            .build()
            .map_err(|error| QuorumError::Other(format!("quorum: cannot start its runtime: {error}")))?;
        let (stop, stopped) = watch::channel(false);
        let me = config.node_id;
        let started = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|error| {
                QuorumError::Other(format!(
                    "quorum: cannot listen on {}: {error}; is another voter using it?",
                    config.listen
                ))
            })?;
            let network = NetworkFactory::new(Arc::clone(&peers));
            let raft = Raft::new(me, raft_config, network, log_store, state_machine)
                .await
                .map_err(|error| QuorumError::Other(format!("quorum: openraft did not start: {error}")))?;
            let context =
                server::Context { raft: raft.clone(), shared: Arc::clone(&shared), peers: Arc::clone(&peers), me };
            tokio::spawn(server::serve(listener, context, stopped));
            bootstrap(&raft, &config.voters).await?;
            Ok::<_, QuorumError>(raft)
        });
        let raft = match started {
            Ok(raft) => raft,
            Err(error) => {
                let _ = stop.send(true);
                runtime.shutdown_timeout(STOP_TIMEOUT);
                return Err(error);
            }
        };
        Ok(RaftQuorum { me, voters: config.voters, raft, shared, peers, stop, runtime: Some(runtime) })
    }

    /// Stop: openraft, the listener and every connection; join the runtime's
    /// threads. Dropping does the same.
    pub fn stop(self) {
        drop(self);
    }

    fn shut_down(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let _ = self.stop.send(true);
        let raft = self.raft.clone();
        // The timer must be made inside the runtime's context.
        let _ = runtime.block_on(async { tokio::time::timeout(STOP_TIMEOUT, raft.shutdown()).await });
        runtime.shutdown_timeout(STOP_TIMEOUT);
    }

    /// Run `work` on the runtime within `timeout`.
    fn block_on<T>(
        &self,
        what: &'static str,
        timeout: Duration,
        work: impl Future<Output = Result<T, QuorumError>>,
    ) -> Result<T, QuorumError> {
        super::block_on_within(self.runtime.as_ref(), what, timeout, work)
    }

    /// Ask the leader — this node or another — until it answers. Refusals
    /// and failures to reach the leader are retried with a growing pause;
    /// the caller's timeout bounds it all. If this node's openraft has
    /// stopped, the answer is the reason (storage failure or stop).
    /// `unsure` is set when a request may have been acted on without the
    /// answer reaching us, or was refused by a leader after it may have
    /// acted on it (one that lost its place, or failed, after proposing).
    async fn ask_leader(
        &self,
        request: &ClientRequest,
        deadline: Instant,
        unsure: &mut bool,
    ) -> Result<ClientReply, QuorumError> {
        let mut pause = RETRY_PAUSE_MIN;
        loop {
            let leader = {
                let metrics = self.raft.metrics();
                let metrics = metrics.borrow();
                if let Err(fatal) = &metrics.running_state {
                    return Err(stopped_error(fatal));
                }
                metrics.current_leader
            };
            // Whether a leader saw the request (it may have proposed it).
            let mut served = true;
            let reply = match leader {
                Some(leader) if leader == self.me => leader::serve(&self.raft, &self.shared, request.clone()).await,
                Some(leader) => {
                    let left = deadline.saturating_duration_since(Instant::now()).min(FORWARD_ATTEMPT_MAX);
                    let timeout_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
                    let forwarded = Request::Client { request: request.clone(), timeout_ms };
                    // Give up on a leader as soon as this node learns of another.
                    let mut metrics = self.raft.metrics();
                    let replaced = metrics.wait_for(|metrics| metrics.current_leader != Some(leader));
                    let answer = tokio::select! {
                        answer = self.peers.call(leader, forwarded, left) => answer,
                        _ = replaced => Err(CallError::NoReply { peer: leader, why: "another leader was elected".to_string() }),
                    };
                    match answer {
                        Ok(wire::Reply::Client(reply)) => reply,
                        Ok(_) => ClientReply::Retry(format!("node {leader} answered with another kind of reply")),
                        Err(CallError::NotSent { why, .. }) => {
                            served = false;
                            ClientReply::Retry(why)
                        }
                        Err(CallError::NoReply { why, .. }) => {
                            *unsure = true;
                            ClientReply::Retry(why)
                        }
                    }
                }
                None => {
                    served = false;
                    ClientReply::Retry("no leader known".to_string())
                }
            };
            match reply {
                // A leader that failed for good is stopping: another will
                // be elected. If it was this node, the next turn says why.
                ClientReply::NotLeader(_) | ClientReply::Retry(_) | ClientReply::Failed(_) => {
                    // A leader that lost its place, or failed, after it
                    // proposed a write may still see it committed: the
                    // retry may meet it.
                    *unsure |= served;
                    tracing::debug!(?reply, "quorum: retrying a client request");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_PAUSE_MAX);
                }
                answered => return Ok(answered),
            }
        }
    }
}

impl Drop for RaftQuorum {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Initialize the group with every voter if this node has neither log nor
/// vote; a node that has either is already part of it.
async fn bootstrap(raft: &Raft<TypeConfig>, voters: &BTreeMap<u64, SocketAddr>) -> Result<(), QuorumError> {
    let members: BTreeSet<u64> = voters.keys().copied().collect();
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(voters = ?voters.keys().collect::<Vec<_>>(), "quorum: initialized the group");
            Ok(())
        }
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(error) => Err(QuorumError::Other(format!("quorum: cannot initialize the group: {error}"))),
    }
}

/// The error for calls on a voter whose openraft has stopped: a storage
/// failure (the log or vote could not be made durable) or a stop.
fn stopped_error(fatal: &openraft::error::Fatal<u64>) -> QuorumError {
    match fatal {
        openraft::error::Fatal::StorageError(error) => QuorumError::Storage(error.to_string()),
        other => {
            tracing::debug!(%other, "quorum: openraft stopped");
            QuorumError::Stopped
        }
    }
}

fn unexpected(what: &str, reply: ClientReply) -> QuorumError {
    QuorumError::Other(format!("quorum: {what} got an unexpected reply {reply:?}"))
}

impl QuorumStore for RaftQuorum {
    fn read(&self, key: &str, timeout: Duration) -> Result<Option<Versioned>, QuorumError> {
        let deadline = Instant::now() + timeout;
        let request = ClientRequest::Read { key: key.to_string() };
        self.block_on("read", timeout, async {
            match self.ask_leader(&request, deadline, &mut false).await? {
                ClientReply::Read(value) => Ok(value.map(Versioned::from)),
                other => Err(unexpected("read", other)),
            }
        })
    }

    fn compare_and_set(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<CasOutcome, QuorumError> {
        let deadline = Instant::now() + timeout;
        let request = ClientRequest::Cas { key: key.to_string(), expected, value: value.clone() };
        self.block_on("compare_and_set", timeout, async {
            let mut unsure = false;
            match self.ask_leader(&request, deadline, &mut unsure).await? {
                // A try whose answer was lost may have written, in which case
                // the retry meets its own write: the next revision holding
                // exactly these bytes. The outcome for the caller is the same
                // as if that write had been someone else's identical one.
                ClientReply::Cas(CasReply::Conflict(Some(current)))
                    if unsure && current.revision == expected + 1 && current.value == value =>
                {
                    Ok(CasOutcome::Written(current.revision))
                }
                ClientReply::Cas(reply) => Ok(reply.into()),
                other => Err(unexpected("compare_and_set", other)),
            }
        })
    }

    fn watch(&self, key: &str, after: u64, timeout: Duration) -> Result<Option<Versioned>, QuorumError> {
        if self.runtime.is_none() {
            return Err(QuorumError::Stopped);
        }
        Ok(self.shared.wait_for(key, after, timeout).map(Versioned::from))
    }

    fn renew_lease(&self, term: Duration, timeout: Duration) -> Result<Lease, QuorumError> {
        let start = Instant::now();
        self.block_on("renew_lease", timeout, async {
            match self.ask_leader(&ClientRequest::ConfirmLease, start + timeout, &mut false).await? {
                ClientReply::LeaseConfirmed => Ok(Lease { valid_until: start + term }),
                other => Err(unexpected("renew_lease", other)),
            }
        })
    }

    fn status(&self) -> QuorumStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let voters = self
            .voters
            .iter()
            .map(|(&id, &address)| VoterStatus { id, address, reachable: self.peers.reachable(id) })
            .collect();
        QuorumStatus {
            id: self.me,
            leader: metrics.current_leader,
            term: metrics.current_term,
            is_leader: metrics.state == ServerState::Leader,
            voters,
            last_applied: metrics.last_applied.map(|log_id| log_id.index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every failure time a config accepts gives openraft timings it takes,
    /// and a dead leader is replaced (an election starts) within it.
    #[test]
    fn timings_for_every_accepted_failure_time_are_valid_and_elect_within_it() {
        let voters = BTreeMap::from([(1, SocketAddr::from(([127, 0, 0, 1], 1)))]);
        let base = RaftQuorumConfig::new(1, voters, PathBuf::from("/nonexistent"), b"k".to_vec(), "g".to_string());
        for failure_ms in
            [crate::config::FAILURE_MS_MIN, 777, crate::config::FAILURE_MS_DEFAULT, crate::config::FAILURE_MS_MAX]
        {
            let failure = Duration::from_millis(failure_ms);
            let config = base.clone().timed_for(failure);
            assert!(config.check().is_ok(), "{failure_ms} ms: {:?}", config.check());
            assert!(config.openraft_config().is_ok(), "{failure_ms} ms");
            // openraft: leader lease (election max) + at most election max.
            assert!(config.election_timeout.1 * 2 <= failure, "{failure_ms} ms: {:?}", config.election_timeout);
            assert!(config.heartbeat <= HEARTBEAT_MAX && config.heartbeat * 2 < config.election_timeout.0);
        }
    }
}
