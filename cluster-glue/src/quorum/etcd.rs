//! The etcd quorum backend (DESIGN.md §6): the [`QuorumStore`] contract kept
//! by an etcd v3 cluster the group does not run, behind the cargo feature
//! `etcd`. Twin of [`super::raft`]: the same synchronous calls, each under
//! its own timeout, with tokio kept inside.
//!
//! ```text
//!  std thread ── QuorumStore call ──► EtcdQuorum ─ block_on(timeout(..)) ─┐
//!                                                                        ▼
//!  tokio runtime (2 workers, owned here):  etcd-client (one balanced channel over every endpoint)
//!     background: probe  ── every 500 ms: maintenance status of each endpoint ──► status()
//!                 liveness ── etcd lease (TTL ≈ live_ttl) + key <prefix>live/<node> ──► keep-alives
//! ```
//!
//! Keys: the trait's key `k` is the etcd key `<prefix>k`, so one etcd
//! cluster can hold many groups (`/crossmirror/<group>/`).
//!
//! Revision mapping: the trait's revision is the etcd key's **version** —
//! the count of puts since the key was created: 0 when absent, 1 after the
//! first put, +1 on each further put — and every write is one transaction
//! `if version(key) == expected then put else get`. DESIGN.md speaks of
//! comparing `mod_revision`; that is etcd's cluster-wide revision of the
//! key's last change, which grows by every write to *any* key, so it does
//! not keep the trait's promise "+1 per write of this key" that callers
//! rely on (the group record stores `seq`, the revision the next write
//! expects). Translating mod_revision to a per-key counter would need a
//! second stored counter written in the same transaction; the version is
//! exactly that counter, kept by etcd, compared as atomically, so the
//! version it is. Comparing the version is as safe as comparing
//! mod_revision while nobody deletes the key: both change on every put.
//! A key deleted by hand (etcdctl) starts again at version 1; the group
//! record carries its own `seq`, which the group layer checks.
//!
//! Retries: a call that fails to reach etcd (unavailable, no leader, a
//! frozen endpoint) is retried with a growing pause, each attempt bounded
//! by [`ATTEMPT_MAX`] so a frozen endpoint costs one attempt; the caller's
//! timeout bounds it all and ends in [`QuorumError::Timeout`]. A
//! compare-and-set whose earlier attempt in the same call may have
//! committed, and whose retry then meets exactly its own bytes at
//! `expected + 1`, reports `Written` (as the embedded backend does); a new
//! call after a timed-out one meets its own write as a `Conflict`, which
//! the caller handles.
//!
//! Lease: [`QuorumStore::renew_lease`] is a linearizable get (etcd serves it
//! by ReadIndex: the leader confirms with a quorum of its members that it
//! still leads), asked with `require_leader`; the lease runs `term` from
//! before the request was sent. As with the embedded backend, the group
//! layer's takeover waits out a lease before acting.
//!
//! Liveness: each node keeps an etcd lease of TTL `live_ttl` (rounded up to
//! whole seconds, as etcd counts them; etcd raises very short TTLs to its
//! own minimum, about 2 s by default) and the key `<prefix>live/<node>`
//! (value: the node's name) attached to it, renewed every third of the TTL.
//! Other tools list `<prefix>live/` to see who is alive
//! (`etcdctl get --prefix /crossmirror/<group>/live/`); the key vanishes a
//! TTL after the node stops renewing, at once when it stops cleanly.
//!
//! Status: [`QuorumStore::status`] makes no network call; a background task
//! asks every endpoint for its maintenance status every
//! [`PROBE_INTERVAL`] and keeps the answers: the leader's member id and
//! raft term from the freshest answer, and each endpoint's reachability and
//! member id. This node is an etcd client, not a member: its own id is 0.

use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::proto::{PbResponseOp, PbTxnOpResponse};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, StatusResponse, Txn, TxnOp, WatchOptions,
};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use super::{CasOutcome, Lease, QuorumError, QuorumStatus, QuorumStore, Versioned, VoterStatus};

/// One attempt of a call waits at most this long, so that a frozen
/// endpoint costs one attempt, not the whole call.
pub const ATTEMPT_MAX: Duration = Duration::from_secs(1);
/// How often the background task asks every endpoint for its status.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The most endpoints a config may name.
pub const ENDPOINTS_MAX: usize = crate::config::ETCD_ENDPOINTS_MAX;
/// First pause between retries of a call that did not reach etcd.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(10);
/// Longest pause between retries.
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(200);
/// How long a clean stop waits for the liveness lease's revocation.
const STOP_TIMEOUT: Duration = Duration::from_millis(500);
/// The liveness lease's default TTL: the group's default failure time.
const LIVE_TTL_DEFAULT: Duration = Duration::from_millis(crate::config::FAILURE_MS_DEFAULT);
/// The default dial timeout.
const DIAL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);

/// How to reach the etcd cluster that holds a group's quorum state.
#[derive(Debug, Clone)]
pub struct EtcdQuorumConfig {
    /// The etcd client URLs, `http://host:port` (1 to [`ENDPOINTS_MAX`]).
    pub endpoints: Vec<String>,
    /// Put before every key, such as `/crossmirror/<group>/`.
    pub prefix: String,
    /// This node's name: its liveness key is `<prefix>live/<node>`.
    pub node: String,
    /// How long to wait for a TCP connection to an endpoint.
    pub dial_timeout: Duration,
    /// The TTL of this node's liveness lease; normally the group's failure
    /// time ([`crate::config::LivenessTiming::failure`]).
    pub live_ttl: Duration,
}

impl EtcdQuorumConfig {
    /// A config with the default dial timeout (2 s) and liveness TTL (the
    /// default failure time).
    pub fn new(endpoints: Vec<String>, prefix: String, node: String) -> EtcdQuorumConfig {
        EtcdQuorumConfig { endpoints, prefix, node, dial_timeout: DIAL_TIMEOUT_DEFAULT, live_ttl: LIVE_TTL_DEFAULT }
    }

    /// Each endpoint's socket address, in order; refuses what is not
    /// `http://host:port`.
    fn check(&self) -> Result<Vec<SocketAddr>, QuorumError> {
        let refuse =
            |why: String| Err(QuorumError::Other(format!("etcd quorum config of node {:?}: {why}", self.node)));
        if self.node.is_empty() || self.node.contains('/') {
            return refuse("the node name is empty or holds '/'; give the node's name".to_string());
        }
        if self.endpoints.is_empty() || self.endpoints.len() > ENDPOINTS_MAX {
            return refuse(format!("{} endpoints; give 1 to {ENDPOINTS_MAX}", self.endpoints.len()));
        }
        if self.dial_timeout.is_zero() || self.live_ttl.is_zero() {
            return refuse("the dial timeout and the liveness TTL must be above zero".to_string());
        }
        let mut addresses = Vec::with_capacity(self.endpoints.len());
        for endpoint in &self.endpoints {
            match endpoint_address(endpoint) {
                Ok(address) => addresses.push(address),
                Err(why) => return refuse(why),
            }
        }
        Ok(addresses)
    }
}

/// The socket address of an endpoint `http://host:port`; the host is
/// resolved now (the status page shows addresses).
pub fn endpoint_address(endpoint: &str) -> Result<SocketAddr, String> {
    let malformed = || format!("endpoint {endpoint:?} is not http://host:port; write it as http://127.0.0.1:2379");
    let authority = endpoint.strip_prefix("http://").ok_or_else(malformed)?;
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    let (host, port) = authority.rsplit_once(':').ok_or_else(malformed)?;
    let port: u16 = port.parse().ok().filter(|port| *port != 0).ok_or_else(malformed)?;
    let host = host.strip_prefix('[').and_then(|host| host.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', '?', '#']) {
        return Err(malformed());
    }
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addresses| addresses.next())
        .ok_or_else(|| format!("endpoint {endpoint:?}: cannot resolve {host:?}; give an address or a known name"))
}

/// What the last probe of each endpoint found.
#[derive(Debug, Clone, Default)]
struct Probe {
    /// The etcd leader's member id (None: none known).
    leader: Option<u64>,
    /// The raft term of the freshest answer.
    term: u64,
    /// The raft index applied by the leader, or the freshest answer's.
    applied: Option<u64>,
    /// Per endpoint: its member id (0 until it answered once).
    member_ids: Vec<u64>,
    /// Per endpoint: whether it answered the last probe (None: not probed yet).
    reachable: Vec<Option<bool>>,
}

/// A client of the etcd cluster holding a group's quorum state.
pub struct EtcdQuorum {
    config: EtcdQuorumConfig,
    addresses: Vec<SocketAddr>,
    client: Client,
    probe: Arc<Mutex<Probe>>,
    /// The liveness lease's id (0: none held now).
    live_lease: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for EtcdQuorum {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EtcdQuorum")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .field("node", &self.config.node)
            .finish_non_exhaustive()
    }
}

fn connect_options(config: &EtcdQuorumConfig) -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(config.dial_timeout)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true)
}

impl EtcdQuorum {
    /// Check the config, start the runtime and the background tasks
    /// (status probe, liveness lease). Does not wait for etcd: a cluster
    /// that is down now makes the calls time out until it is back.
    pub fn start(config: EtcdQuorumConfig) -> Result<EtcdQuorum, QuorumError> {
        let addresses = config.check()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("quorum-etcd-{}", config.node))
            .enable_all()
            .build()
            .map_err(|error| QuorumError::Other(format!("etcd quorum: cannot start its runtime: {error}")))?;
        let connected = runtime.block_on(async {
            // Connecting makes the channels only; nothing is dialled yet.
            let connect = |endpoints: Vec<String>| Client::connect(endpoints, Some(connect_options(&config)));
            let client = connect(config.endpoints.clone()).await?;
            let mut singles = Vec::with_capacity(config.endpoints.len());
            for endpoint in &config.endpoints {
                singles.push(connect(vec![endpoint.clone()]).await?);
            }
            Ok::<_, etcd_client::Error>((client, singles))
        });
        let (client, singles) =
            connected.map_err(|error| QuorumError::Other(format!("etcd quorum: cannot set up the client: {error}")))?;
        let probe = Arc::new(Mutex::new(Probe {
            member_ids: vec![0; addresses.len()],
            reachable: vec![None; addresses.len()],
            ..Probe::default()
        }));
        let live_lease = Arc::new(AtomicI64::new(0));
        let (stop, stopped) = watch::channel(false);
        runtime.spawn(probe_loop(singles, Arc::clone(&probe), stopped.clone()));
        let live_key = format!("{}live/{}", config.prefix, config.node);
        runtime.spawn(liveness_loop(
            client.clone(),
            live_key,
            config.node.clone(),
            config.live_ttl,
            Arc::clone(&live_lease),
            stopped,
        ));
        Ok(EtcdQuorum { config, addresses, client, probe, live_lease, stop, runtime: Some(runtime) })
    }

    /// Stop: revoke the liveness lease (so the liveness key goes at once),
    /// end the background tasks and join the runtime's threads. Dropping
    /// does the same.
    pub fn stop(self) {
        drop(self);
    }

    fn shut_down(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        let _ = self.stop.send(true);
        let lease = self.live_lease.swap(0, Ordering::SeqCst);
        if lease != 0 {
            let mut client = self.client.clone();
            let _ = runtime.block_on(async { tokio::time::timeout(STOP_TIMEOUT, client.lease_revoke(lease)).await });
        }
        runtime.shutdown_timeout(STOP_TIMEOUT);
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.config.prefix)
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

    /// A linearizable get of the etcd key `key`, retried until it answers:
    /// the value and the cluster revision the answer was read at.
    async fn get(&self, what: &'static str, key: &str) -> Result<(Option<Versioned>, i64), QuorumError> {
        let answer = retrying(what, &mut false, || {
            let mut client = self.client.clone();
            let key = key.to_string();
            async move { client.get(key, None).await }
        })
        .await?;
        let revision = answer.header().map_or(0, |header| header.revision());
        let value = match answer.kvs().first() {
            None => None,
            Some(kv) => versioned(kv.version(), kv.value())?,
        };
        Ok((value, revision))
    }

    /// Wait for a version of the etcd key `key` above `after`; forever (the
    /// caller bounds it). Any trouble with the watch stream (etcd gone,
    /// compacted history) starts over from a fresh read.
    async fn wait_above(&self, key: &str, after: u64) -> Result<Versioned, QuorumError> {
        let mut pause = RETRY_PAUSE_MIN;
        loop {
            let (current, revision) = self.get("watch", key).await?;
            if let Some(current) = current.filter(|current| current.revision > after) {
                return Ok(current);
            }
            let options = WatchOptions::new().with_start_revision(revision.saturating_add(1));
            match self.client.clone().watch(key.to_string(), Some(options)).await {
                Ok(mut stream) => loop {
                    match stream.message().await {
                        Ok(Some(answer)) => {
                            for kv in answer.events().iter().filter_map(|event| event.kv()) {
                                if let Some(seen) = versioned(kv.version(), kv.value())? {
                                    if seen.revision > after {
                                        return Ok(seen);
                                    }
                                }
                            }
                            if answer.canceled() {
                                tracing::debug!(reason = answer.cancel_reason(), "etcd quorum: watch canceled");
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::debug!(%error, "etcd quorum: watch stream failed");
                            break;
                        }
                    }
                },
                Err(error) => tracing::debug!(%error, "etcd quorum: cannot watch"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }
}

impl Drop for EtcdQuorum {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// A key's version and value as the trait's [`Versioned`]; None for
/// version 0 (a deleted key, as a watch event shows it). A negative
/// version is a broken answer.
fn versioned(version: i64, value: &[u8]) -> Result<Option<Versioned>, QuorumError> {
    match u64::try_from(version) {
        Ok(0) => Ok(None),
        Ok(revision) => Ok(Some(Versioned { revision, value: value.to_vec() })),
        Err(_) => Err(QuorumError::Other(format!("etcd answered a negative version {version}"))),
    }
}

/// Whether an etcd error may pass by itself (etcd unreachable, no leader,
/// overloaded), so the call is worth retrying.
fn retriable(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Aborted
                | Code::Cancelled
                | Code::ResourceExhausted
                | Code::Internal
        ),
        _ => false,
    }
}

/// Run `attempt` until it answers or fails for good. Each attempt waits at
/// most [`ATTEMPT_MAX`]; the caller's timeout bounds the whole. `unsure` is
/// set when an attempt may have been acted on without its answer reaching
/// us.
async fn retrying<T, F, A>(what: &'static str, unsure: &mut bool, mut attempt: F) -> Result<T, QuorumError>
where
    F: FnMut() -> A,
    A: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut pause = RETRY_PAUSE_MIN;
    loop {
        match tokio::time::timeout(ATTEMPT_MAX, attempt()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(error)) if retriable(&error) => {
                tracing::debug!(%error, what, "etcd quorum: retrying");
                *unsure = true;
            }
            Ok(Err(error)) => return Err(QuorumError::Other(format!("etcd refused {what}: {error}"))),
            Err(_) => {
                tracing::debug!(what, "etcd quorum: an attempt got no answer; retrying");
                *unsure = true;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_PAUSE_MAX);
    }
}

/// The key's value from the `get` in a transaction's failure branch.
fn conflict_value(responses: &[PbResponseOp]) -> Result<Option<Versioned>, QuorumError> {
    let broken = || QuorumError::Other("etcd answered a failed compare-and-set without the key's value".to_string());
    match responses.first().and_then(|response| response.response.as_ref()) {
        Some(PbTxnOpResponse::ResponseRange(range)) => match range.kvs.first() {
            None => Ok(None),
            Some(kv) => versioned(kv.version, &kv.value),
        },
        _ => Err(broken()),
    }
}

impl QuorumStore for EtcdQuorum {
    fn read(&self, key: &str, timeout: Duration) -> Result<Option<Versioned>, QuorumError> {
        let key = self.key(key);
        self.block_on("read", timeout, async { Ok(self.get("read", &key).await?.0) })
    }

    fn compare_and_set(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
        timeout: Duration,
    ) -> Result<CasOutcome, QuorumError> {
        let key = self.key(key);
        let (Ok(expected_version), Some(next)) = (i64::try_from(expected), expected.checked_add(1)) else {
            return Err(QuorumError::Other(format!("etcd quorum: revision {expected} is out of etcd's range")));
        };
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, expected_version)])
            .and_then([TxnOp::put(key.clone(), value.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        self.block_on("compare_and_set", timeout, async {
            let mut unsure = false;
            let answer = retrying("compare_and_set", &mut unsure, || {
                let mut client = self.client.clone();
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
            if answer.succeeded() {
                return Ok(CasOutcome::Written(next));
            }
            match conflict_value(&answer.0.responses)? {
                // An attempt whose answer was lost may have written; the
                // retry then meets its own write: the next version holding
                // exactly these bytes (see the module doc).
                Some(current) if unsure && current.revision == next && current.value == value => {
                    Ok(CasOutcome::Written(next))
                }
                current => Ok(CasOutcome::Conflict(current)),
            }
        })
    }

    fn watch(&self, key: &str, after: u64, timeout: Duration) -> Result<Option<Versioned>, QuorumError> {
        let key = self.key(key);
        let runtime = self.runtime.as_ref().ok_or(QuorumError::Stopped)?;
        runtime.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            // etcd unreachable from the start: say so; reached, but nothing
            // new in time: the ordinary `None`.
            let first = tokio::time::timeout_at(deadline, self.get("watch", &key))
                .await
                .map_err(|_| QuorumError::Timeout { what: "watch", timeout })??;
            if let Some(current) = first.0.filter(|current| current.revision > after) {
                return Ok(Some(current));
            }
            match tokio::time::timeout_at(deadline, self.wait_above(&key, after)).await {
                Ok(seen) => seen.map(Some),
                Err(_) => Ok(None),
            }
        })
    }

    fn renew_lease(&self, term: Duration, timeout: Duration) -> Result<Lease, QuorumError> {
        let start = Instant::now();
        let key = format!("{}live/{}", self.config.prefix, self.config.node);
        self.block_on("renew_lease", timeout, async {
            // Linearizable: etcd's leader confirms with a quorum that it
            // still leads before answering.
            let options = GetOptions::new().with_keys_only();
            retrying("renew_lease", &mut false, || {
                let mut client = self.client.clone();
                let (key, options) = (key.clone(), options.clone());
                async move { client.get(key, Some(options)).await }
            })
            .await?;
            Ok(Lease { valid_until: start + term })
        })
    }

    fn status(&self) -> QuorumStatus {
        let probe = self.probe.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let voters = self
            .addresses
            .iter()
            .enumerate()
            .map(|(index, &address)| VoterStatus {
                id: probe.member_ids.get(index).copied().unwrap_or(0),
                address,
                reachable: probe.reachable.get(index).copied().flatten(),
            })
            .collect();
        QuorumStatus {
            id: 0,
            leader: probe.leader,
            term: probe.term,
            is_leader: false,
            voters,
            last_applied: probe.applied,
        }
    }
}

/// Every [`PROBE_INTERVAL`], ask each endpoint for its status and keep the
/// answers for [`QuorumStore::status`].
async fn probe_loop(singles: Vec<Client>, probe: Arc<Mutex<Probe>>, mut stopped: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.changed() => return,
        }
        let mut asks = tokio::task::JoinSet::new();
        for (index, client) in singles.iter().enumerate() {
            let mut client = client.clone();
            asks.spawn(async move {
                (index, tokio::time::timeout(PROBE_INTERVAL, client.status()).await.ok().and_then(Result::ok))
            });
        }
        let mut answers: Vec<Option<StatusResponse>> = vec![None; singles.len()];
        while let Some(done) = asks.join_next().await {
            if let Ok((index, answer)) = done {
                answers[index] = answer;
            }
        }
        let mut next = probe.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut freshest: Option<(u64, Option<u64>, u64)> = None;
        for (index, answer) in answers.iter().enumerate() {
            next.reachable[index] = Some(answer.is_some());
            let Some(answer) = answer else { continue };
            let member = answer.header().map_or(0, |header| header.member_id());
            next.member_ids[index] = member;
            let leader = Some(answer.leader()).filter(|leader| *leader != 0);
            let applied = (leader == Some(member)).then(|| answer.raft_applied_index());
            let term = answer.raft_term();
            match freshest {
                Some((best, _, _)) if best > term => {}
                Some((best, _, _)) if best == term && applied.is_none() => {}
                _ => freshest = Some((term, leader, applied.unwrap_or(answer.raft_applied_index()))),
            }
        }
        if let Some((term, leader, applied)) = freshest {
            next.term = term;
            next.leader = leader;
            next.applied = Some(applied);
        } else {
            next.leader = None;
        }
        *probe.lock().unwrap_or_else(PoisonError::into_inner) = next;
    }
}

/// Hold this node's liveness lease and key: grant, put the key under it,
/// keep it alive; start over whenever etcd loses it (expired while
/// unreachable) or the stream fails.
async fn liveness_loop(
    client: Client,
    key: String,
    node: String,
    ttl: Duration,
    held: Arc<AtomicI64>,
    mut stopped: watch::Receiver<bool>,
) {
    let ttl_seconds = i64::try_from(ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX).max(1);
    let mut pause = RETRY_PAUSE_MIN;
    loop {
        let held_once = tokio::select! {
            held_once = hold_liveness(client.clone(), &key, &node, ttl_seconds, &held) => held_once,
            _ = stopped.changed() => return,
        };
        held.store(0, Ordering::SeqCst);
        if held_once {
            pause = RETRY_PAUSE_MIN;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stopped.changed() => return,
        }
        pause = (pause * 2).min(ATTEMPT_MAX);
    }
}

/// One life of the liveness lease; returns when it is lost, and whether it
/// was ever held.
async fn hold_liveness(mut client: Client, key: &str, node: &str, ttl_seconds: i64, held: &AtomicI64) -> bool {
    let granted = match tokio::time::timeout(ATTEMPT_MAX, client.lease_grant(ttl_seconds, None)).await {
        Ok(Ok(granted)) => granted,
        Ok(Err(error)) => {
            tracing::debug!(%error, "etcd quorum: cannot grant the liveness lease");
            return false;
        }
        Err(_) => return false,
    };
    let lease = granted.id();
    held.store(lease, Ordering::SeqCst);
    let put = client.put(key, node, Some(PutOptions::new().with_lease(lease)));
    if !matches!(tokio::time::timeout(ATTEMPT_MAX, put).await, Ok(Ok(_))) {
        return false;
    }
    let Ok(Ok((mut keeper, mut answers))) = tokio::time::timeout(ATTEMPT_MAX, client.lease_keep_alive(lease)).await
    else {
        return false;
    };
    let mut granted_ttl = granted.ttl().max(1);
    loop {
        let period = Duration::from_millis(u64::try_from(granted_ttl).unwrap_or(1) * 1000 / 3);
        tokio::time::sleep(period).await;
        let renewed = async {
            keeper.keep_alive().await.ok()?;
            answers.message().await.ok().flatten()
        };
        match tokio::time::timeout(ATTEMPT_MAX.min(period * 2), renewed).await {
            Ok(Some(answer)) if answer.ttl() > 0 => granted_ttl = answer.ttl(),
            // TTL 0: the lease expired while etcd was out of reach.
            _ => return true,
        }
    }
}
