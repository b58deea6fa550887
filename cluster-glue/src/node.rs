//! The shell that runs one group member (`crossmirror node`): it starts the
//! member's liveness and its quorum voter, feeds the core (`core.rs`) what
//! happens and carries out what the core says, through a [`RoleRunner`]
//! that the binary provides (the production role needs the NBD server, which
//! this crate never imports).
//!
//! ```text
//!  node thread ── watch record / liveness / leadership ──▶ Core::step ──▶ commands
//!       │            CAS the record ◀──────────────────────────────────────┘
//!       ├─ RoleRunner: start/stop production (NBD + replicator), copy role
//!  lease thread ── renew_lease every lease/4 ──▶ Gate (NBD requests pass while valid)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use engine::gate::{Gate, OnExpiry};
use engine::protocol::Secret;
use engine::replicator::{CopyConfig, MirrorMode, MirrorStateStore};
use serde_json::json;

use crate::actions::{ActionContext, ActionRunner};
use crate::config::{diff, CopyMode, GroupConfig, OnQuorumLoss, QuorumBackend, SiteRole};
use crate::core::{Command, CopySite, Core, Event, MemberInfo, Topology};
use crate::liveness::{Liveness, LivenessConfig};
use crate::quorum::raft::{RaftQuorum, RaftQuorumConfig};
use crate::quorum::{CasOutcome, QuorumStore};
use crate::record::{DrImage, DrImageState, GroupRecord, MemberState, PromotedImage, RECORD_KEY};
use crate::record_store::{RecordStore, CALL_TIMEOUT};

/// How long a joining member waits for its peers' configs.
const CONFIG_CHECK_WAIT: Duration = Duration::from_millis(1500);
/// How long the node thread waits for a record change per round.
const WATCH_WAIT: Duration = Duration::from_millis(100);
/// How long a leaving member tries to record that it left (the last voter
/// of a group never can: nobody is left to make a quorum).
const LEAVE_RECORD_WAIT: Duration = Duration::from_secs(5);

/// What the production role needs to start.
pub struct ProductionSpec {
    /// The store.
    pub volume: PathBuf,
    /// The group's volume size.
    pub size: u64,
    /// Bytes per bitmap bit.
    pub region_bytes: u64,
    /// One copy per copy site, with no host yet.
    pub copies: Vec<CopyConfig>,
    /// The replication secret.
    pub secret: Secret,
    /// The fencing epoch.
    pub epoch: u64,
    /// The record's generation: the production era starting now.
    pub generation: u64,
    /// Copy sites whose stores the record shows identical to this store as
    /// this epoch starts (a clean hand-over): their bitmap bits are cleared.
    pub identical: Vec<String>,
    /// The mirror state, on the group record.
    pub state_store: Arc<dyn MirrorStateStore>,
    /// NBD requests pass only while it is open (the quorum lease).
    pub gate: Arc<Gate>,
    /// Where to serve NBD.
    pub nbd_listen: SocketAddr,
    /// The export name.
    pub export: String,
    /// The ceiling of the resync rate to each copy (bytes/s; 0: none).
    pub resync_rate_max: u64,
    /// A forced promotion of this member's syncing copy: before anything is
    /// served, its store is rolled back to the DR image of this generation
    /// taken at this time (Unix ms); when that fails, nothing is served.
    pub roll_back_to: Option<(u64, u64)>,
}

/// What the copy role needs to start.
pub struct CopySpec {
    /// The store.
    pub volume: PathBuf,
    /// The group's volume size.
    pub size: u64,
    /// Open it O_DIRECT.
    pub direct: bool,
    /// Where to listen for the production host.
    pub listen: SocketAddr,
    /// The replication secret.
    pub secret: Secret,
}

/// Runs the roles the core names this member to (the binary implements it
/// with the NBD server, the mirror service and the copy role).
pub trait RoleRunner {
    /// Serve the production store over NBD and mirror it; returns the
    /// store's token (32 hex digits).
    fn start_production(&mut self, spec: ProductionSpec) -> Result<String, String>;
    /// Point a copy site's link at its host.
    fn set_copy_host(&mut self, site: &str, address: Option<SocketAddr>);
    /// Stop serving: drain, flush, stop mirroring.
    fn stop_production(&mut self);
    /// Host this member's copy store.
    fn start_copy(&mut self, spec: CopySpec) -> Result<(), String>;
    /// Stop hosting it.
    fn stop_copy(&mut self);
    /// The roles' status, for `crossmirror status`.
    fn status(&self) -> serde_json::Value;
}

/// Who runs and with what.
pub struct NodeOptions {
    /// The group config.
    pub config: GroupConfig,
    /// This node's name.
    pub name: String,
    /// The group's secret.
    pub secret: Secret,
}

/// The node's status document, refreshed by the node thread.
pub type StatusBoard = Arc<Mutex<serde_json::Value>>;

/// What an operator asks a running node for (through its admin endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A planned switchover of the production role to copy site `to`.
    Switchover {
        /// The copy site.
        to: String,
        /// The record's epoch the node's status showed when it was asked.
        asked_at: Option<u64>,
    },
    /// A forced promotion of copy site `site` (`--accept-data-loss`).
    Promote {
        /// The copy site.
        site: String,
    },
}

/// Requests waiting for the node thread.
pub type Requests = Arc<Mutex<Vec<Request>>>;

/// The topology the core works with.
fn topology(config: &GroupConfig, me: &str) -> Topology {
    Topology {
        me: me.to_string(),
        production_site: config.production_site().name.clone(),
        copy_sites: config
            .copy_sites()
            .into_iter()
            .map(|site| CopySite { name: site.name.clone(), mode: site.mode.as_str().to_string(), identical: false })
            .collect(),
        members: config
            .members
            .iter()
            .map(|member| MemberInfo {
                name: member.name.clone(),
                site: member.site.clone(),
                backup_order: member.backup_order,
                address: member.address,
            })
            .collect(),
        witnesses: config.witnesses.iter().map(|witness| witness.name.clone()).collect(),
        config_digest: config.digest_hex(),
        mirror_port: config.ports.mirror,
        lease_ms: u64::try_from(config.lease.as_millis()).unwrap_or(u64::MAX),
    }
}

/// The DR image a copy role's status shows (`dr_image: {state, generation,
/// taken_at_ms}`), as a member publishes it in its entry.
fn published_dr_image(status: &serde_json::Value) -> Option<DrImage> {
    let state = match status["state"].as_str()? {
        "kept" => DrImageState::Kept,
        "lost" => DrImageState::Lost,
        _ => DrImageState::None,
    };
    let kept = state == DrImageState::Kept;
    let field = |name: &str| if kept { status[name].as_u64().unwrap_or(0) } else { 0 };
    Some(DrImage { state, generation: field("generation"), taken_at_ms: field("taken_at_ms") })
}

/// Refuse an unknown name with the names there are.
pub fn check_name(config: &GroupConfig, name: &str) -> Result<(), String> {
    if config.voter_id(name).is_some() {
        return Ok(());
    }
    let members: Vec<&str> = config.members.iter().map(|member| member.name.as_str()).collect();
    let witnesses: Vec<&str> = config.witnesses.iter().map(|witness| witness.name.as_str()).collect();
    Err(format!(
        "--name {name:?} is not in {}: its members are {} and its witnesses {}",
        config.path.display(),
        members.join(", "),
        if witnesses.is_empty() { "none".to_string() } else { witnesses.join(", ") }
    ))
}

/// Run member `options.name` until it leaves (`leave` set, e.g. by
/// SIGTERM) or must stop; the error says why it could not run.
pub fn run(
    options: NodeOptions,
    runner: &mut dyn RoleRunner,
    leave: &AtomicBool,
    board: &StatusBoard,
    requests: &Requests,
) -> Result<(), String> {
    let NodeOptions { config, name, secret } = options;
    check_name(&config, &name)?;
    let voters = config.voters();
    let me = voters.iter().find(|voter| voter.name == name).expect("checked above").clone();
    let quorum_address = |address| SocketAddr::new(address, config.ports.quorum);
    let liveness = Liveness::start(LivenessConfig {
        me: name.clone(),
        listen: quorum_address(me.address),
        peers: voters
            .iter()
            .filter(|voter| voter.name != name)
            .map(|voter| (voter.name.clone(), quorum_address(voter.address)))
            .collect(),
        secret: secret.derive_key("crossmirror liveness"),
        group: config.group.clone(),
        digest: config.digest(),
        canonical: config.canonical(),
        heartbeat_interval: config.liveness.heartbeat,
        failure_after: config.liveness.failure,
    })
    .map_err(|error| {
        format!("cannot listen on {} (UDP, the group's quorum port): {error}", quorum_address(me.address))
    })?;
    let mismatches = liveness.config_mismatches(CONFIG_CHECK_WAIT);
    if let Some((peer, theirs)) = mismatches.first() {
        let lines = diff(&config.canonical(), theirs);
        return Err(format!(
            "refusing to join group {}: member {peer} runs another group config (- this node's {}, + {peer}'s):\n  {}\nevery member needs the same file",
            config.group,
            config.path.display(),
            lines.join("\n  ")
        ));
    }
    let state_dir = config
        .members
        .iter()
        .find(|member| member.name == name)
        .map(|member| member.state_dir.clone())
        .or_else(|| config.witness(&name).map(|witness| witness.state_dir.clone()))
        .expect("a voter is a member or a witness");
    std::fs::create_dir_all(&state_dir).map_err(|error| format!("cannot create {}: {error}", state_dir.display()))?;
    let quorum = start_quorum(&config, &name, me.id, &voters, &state_dir, &secret)?;
    tracing::info!(group = %config.group, node = %name, voters = voters.len(), "node {name} starting in group {}", config.group);
    let stopping = Arc::new(AtomicBool::new(false));
    let lease = Arc::new(LeaseKeeper { me: name.clone(), producing: Mutex::new(None), stopping: stopping.clone() });
    let lease_thread = {
        let (lease, quorum, term) = (lease.clone(), quorum.clone(), config.lease);
        std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || lease.run(quorum.as_ref(), term))
            .map_err(|error| format!("cannot start the lease thread: {error}"))?
    };
    let mut shell = Shell {
        config: &config,
        name: &name,
        secret,
        quorum: quorum.clone(),
        liveness: &liveness,
        runner,
        lease: lease.clone(),
        stopping: stopping.clone(),
        events: Vec::new(),
        exit: None,
        need_read: true,
        actions: config.member(&name).map(|member| ActionRunner::new(member.actions.clone())),
        record: None,
    };
    let result = shell.main_loop(Core::new(topology(&config, &name)), leave, board, requests);
    stopping.store(true, Ordering::Relaxed);
    let _ = lease_thread.join();
    drop(shell);
    liveness.stop();
    // The quorum voter stops when its last holder lets go.
    drop(quorum);
    result
}

/// Start this node's quorum store: its raft voter (embedded), or a client
/// of the group's etcd cluster.
fn start_quorum(
    config: &GroupConfig,
    name: &str,
    id: u64,
    voters: &[crate::config::Voter],
    state_dir: &std::path::Path,
    secret: &Secret,
) -> Result<Arc<dyn QuorumStore>, String> {
    match &config.quorum_backend {
        QuorumBackend::Embedded => {
            let addresses: BTreeMap<u64, SocketAddr> =
                voters.iter().map(|voter| (voter.id, SocketAddr::new(voter.address, config.ports.quorum))).collect();
            let raft = RaftQuorum::start(
                RaftQuorumConfig::new(
                    id,
                    addresses,
                    state_dir.join("quorum"),
                    secret.derive_key("crossmirror quorum"),
                    config.group.clone(),
                )
                .timed_for(config.liveness.failure),
            )
            .map_err(|error| format!("cannot start the quorum voter: {error}"))?;
            Ok(Arc::new(raft))
        }
        #[cfg(feature = "etcd")]
        QuorumBackend::Etcd { endpoints } => {
            let mut etcd = crate::quorum::etcd::EtcdQuorumConfig::new(
                endpoints.clone(),
                format!("/crossmirror/{}/", config.group),
                name.to_string(),
            );
            etcd.live_ttl = config.liveness.failure;
            let store = crate::quorum::etcd::EtcdQuorum::start(etcd)
                .map_err(|error| format!("cannot reach the group's etcd cluster: {error}"))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "etcd"))]
        QuorumBackend::Etcd { .. } => {
            let _ = name;
            Err("this build has no etcd backend: cargo build --features crossmirror-cluster-glue/etcd".to_string())
        }
    }
}

/// Renews the production host's lease from the quorum and keeps its gate.
///
/// A renewal is a linearizable read of the record that still names this
/// member production host, joined, at the epoch it serves: so once the
/// record says otherwise (forced out, another host, a higher epoch), no
/// renewal succeeds, and a lease taken before that runs out `term` after it
/// was asked for. A takeover waits that long (see `core.rs`).
struct LeaseKeeper {
    me: String,
    /// The gate of the production role while it runs, and its epoch.
    producing: Mutex<Option<(Arc<Gate>, u64)>>,
    stopping: Arc<AtomicBool>,
}

/// Why a lease was not renewed.
enum NoLease {
    /// The quorum did not answer: maybe later.
    NoQuorum(String),
    /// The record no longer names this member: never again.
    Deposed(String),
}

impl LeaseKeeper {
    fn gate(&self) -> Option<Arc<Gate>> {
        self.producing.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|(gate, _)| gate.clone())
    }

    /// Ask the quorum for a lease of `term` for serving at `epoch`.
    fn confirm(&self, quorum: &dyn QuorumStore, epoch: u64, term: Duration) -> Result<std::time::Instant, NoLease> {
        let asked = std::time::Instant::now();
        let stored = quorum
            .read(RECORD_KEY, term / 2)
            .map_err(|error| NoLease::NoQuorum(error.to_string()))?
            .ok_or_else(|| NoLease::Deposed("the group has no record".to_string()))?;
        let record = GroupRecord::decode(&stored.value).map_err(NoLease::Deposed)?;
        let joined = record.member_state(&self.me) == MemberState::Joined;
        if record.production.host.as_deref() != Some(self.me.as_str()) || !joined || record.epoch != epoch {
            return Err(NoLease::Deposed(format!(
                "the record (seq {}) names {} production host at epoch {} and this member {}",
                record.seq,
                record.production.host.as_deref().unwrap_or("nobody"),
                record.epoch,
                record.member_state(&self.me).name()
            )));
        }
        Ok(asked + term)
    }

    /// Renew the gate's lease once; close it for good when deposed.
    fn renew(&self, quorum: &dyn QuorumStore, term: Duration) -> Result<(), NoLease> {
        let Some((gate, epoch)) = self.producing.lock().unwrap_or_else(PoisonError::into_inner).clone() else {
            return Ok(());
        };
        match self.confirm(quorum, epoch, term) {
            Ok(until) => {
                gate.renew(until);
                Ok(())
            }
            Err(NoLease::NoQuorum(why)) => {
                gate.set_reason(&format!("no lease from the quorum ({why})"));
                Err(NoLease::NoQuorum(why))
            }
            Err(NoLease::Deposed(why)) => {
                tracing::error!("self-fence: {why}; this host stops serving at once");
                gate.close(&format!("no longer the production host: {why}"));
                Err(NoLease::Deposed(why))
            }
        }
    }

    fn run(&self, quorum: &dyn QuorumStore, term: Duration) {
        let mut lost_logged = false;
        while !self.stopping.load(Ordering::Relaxed) {
            match self.renew(quorum, term) {
                Ok(()) if lost_logged => {
                    tracing::info!("quorum regained: the production host serves again");
                    lost_logged = false;
                }
                Err(NoLease::NoQuorum(why)) if !lost_logged => {
                    tracing::warn!("quorum lost ({why}): NBD requests wait (or fail, under on_quorum_loss = \"io-error\") once the lease runs out");
                    lost_logged = true;
                }
                _ => {}
            }
            std::thread::sleep(term / 4);
        }
    }
}

struct Shell<'a> {
    config: &'a GroupConfig,
    name: &'a str,
    secret: Secret,
    quorum: Arc<dyn QuorumStore>,
    liveness: &'a Liveness,
    runner: &'a mut dyn RoleRunner,
    lease: Arc<LeaseKeeper>,
    stopping: Arc<AtomicBool>,
    /// Events waiting to be stepped.
    events: Vec<Event>,
    exit: Option<Result<(), String>>,
    need_read: bool,
    /// This member's actions (a witness has none).
    actions: Option<ActionRunner>,
    /// The record as last seen, for the actions' environment.
    record: Option<GroupRecord>,
}

impl Shell<'_> {
    /// What an action is told now.
    fn action_context(&self, role: &str) -> ActionContext {
        let record = self.record.as_ref();
        let nbd = record
            .and_then(|record| record.production.host.as_deref())
            .and_then(|host| self.config.member(host))
            .map(|member| SocketAddr::new(member.address, self.config.ports.nbd).to_string());
        ActionContext {
            group: self.config.group.clone(),
            site: self.config.member(self.name).map(|member| member.site.clone()).unwrap_or_default(),
            role: role.to_string(),
            epoch: record.map_or(0, |record| record.epoch),
            nbd,
        }
    }

    /// Run the `stop` action before a role is handed on; a failure holds
    /// the hand-over for one lease term.
    fn stop_action(&self, role: &str) {
        if let Some(actions) = &self.actions {
            if let Err(why) = actions.stopping(&self.action_context(role)) {
                tracing::error!(
                    "{why}: holding the hand-over for one lease term ({} ms)",
                    self.config.lease.as_millis()
                );
                std::thread::sleep(self.config.lease);
            }
        }
    }

    /// Whether a failure brought the production role here: the previous
    /// production host in the history was forced out.
    fn production_by_recovery(&self) -> bool {
        let Some(record) = &self.record else { return false };
        let entries = record.history.len();
        entries >= 2
            && record.history[entries - 2].production != self.name
            && record.member_state(&record.history[entries - 2].production) == MemberState::ForcedLeaving
    }
    fn main_loop(
        &mut self,
        mut core: Core,
        leave: &AtomicBool,
        board: &StatusBoard,
        requests: &Requests,
    ) -> Result<(), String> {
        let mut leader = None;
        let mut live: Option<(BTreeSet<String>, bool)> = None;
        let mut leave_sent: Option<std::time::Instant> = None;
        let mut copy_store: (Option<bool>, Option<DrImage>) = (None, None);
        let started = std::time::Instant::now();
        let mut seq = 0;
        loop {
            if let Some(since) = leave_sent {
                if since.elapsed() > LEAVE_RECORD_WAIT {
                    tracing::warn!(node = %self.name,
                        "left without recording it: the quorum did not answer (the group marks this member failed once it is not heard from)");
                    return Ok(());
                }
            }
            if leave.load(Ordering::Relaxed) && leave_sent.is_none() {
                leave_sent = Some(std::time::Instant::now());
                tracing::info!(node = %self.name, "leaving the group: stopping NBD, draining, flushing, handing over");
                self.events.push(Event::Leave);
            }
            for request in std::mem::take(&mut *requests.lock().unwrap_or_else(PoisonError::into_inner)) {
                match request {
                    Request::Switchover { to, asked_at } => {
                        tracing::info!(to = %to, ?asked_at, "switchover to site {to} asked for");
                        self.events.push(Event::Switchover { to, asked_at });
                    }
                    Request::Promote { site } => {
                        tracing::warn!(site = %site, "forced promotion of site {site} asked for (--accept-data-loss)");
                        self.events.push(Event::Promote { site });
                    }
                }
            }
            let is_leader = match self.config.quorum_backend {
                // The raft leader decides: one decider at a time.
                QuorumBackend::Embedded => self.quorum.status().is_leader,
                // etcd has no member of the group as leader: the first voter
                // (config order) this node hears decides; two deciding at
                // once (different views) is safe: every decision is a CAS.
                QuorumBackend::Etcd { .. } => {
                    let (heard, _) = self.liveness.live();
                    self.config
                        .voters()
                        .iter()
                        .find(|voter| heard.contains(&voter.name))
                        .is_some_and(|voter| voter.name == self.name)
                }
            };
            if leader != Some(is_leader) {
                leader = Some(is_leader);
                self.events.push(Event::Leader(is_leader));
            }
            let now_live = self.liveness.live();
            if live.as_ref() != Some(&now_live) {
                live = Some(now_live.clone());
                self.events.push(Event::Liveness { live: now_live.0, settled: now_live.1 });
            }
            if self.need_read && !core.is_writing() {
                match self.quorum.read(RECORD_KEY, CALL_TIMEOUT) {
                    Ok(stored) => {
                        self.need_read = false;
                        match stored.map(|stored| GroupRecord::decode(&stored.value)).transpose() {
                            Ok(record) => self.events.push(Event::Record(record)),
                            Err(error) => return Err(format!("{error}: refusing to guess which copy is current")),
                        }
                    }
                    Err(error) => tracing::debug!(%error, "reading the group record"),
                }
            }
            let mut ticked = false;
            while !self.events.is_empty() || !ticked {
                // The clock first, read after the quorum call whose answer
                // is stepped next: the core dates a member's forced-out
                // record by its last tick, and a takeover counts the old
                // host's lease from there. A tick read before the call that
                // brought the record (a compare-and-set or a read, up to
                // CALL_TIMEOUT) would let the takeover come that much early.
                let now_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                ticked = true;
                self.events.insert(0, Event::Tick { now_ms });
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
                self.events.insert(0, Event::WallClock { unix_ms });
                for event in std::mem::take(&mut self.events) {
                    let commands = core.step(event);
                    for command in commands {
                        self.execute(command);
                    }
                }
            }
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            if let Some(record) = core.record() {
                if record.seq != seq {
                    self.record = Some(record.clone());
                    if let Some(actions) = &self.actions {
                        let role = if record.production.host.as_deref() == Some(self.name) {
                            "production"
                        } else if record.copies.iter().any(|copy| copy.host.as_deref() == Some(self.name)) {
                            "copy"
                        } else {
                            "none"
                        };
                        actions.notify(self.action_context(role));
                    }
                }
                seq = record.seq;
            }
            let status = self.status(&core, live.as_ref());
            // Whether the copy store this member hosts is consistent goes in
            // its entry: a forced promotion of a store in the middle of a
            // resync is refused on it.
            let consistent = status["roles"]["copy"]["store_state"].as_str().map(|state| state == "consistent");
            // And the way back it keeps while a pass runs: a forced
            // promotion of a syncing copy rolls back to it.
            let dr_image = consistent.and(published_dr_image(&status["roles"]["copy"]["dr_image"]));
            if (consistent, dr_image) != copy_store {
                copy_store = (consistent, dr_image);
                self.events.push(Event::CopyStore { consistent, dr_image });
            }
            if let Some(why) = status["roles"]["production"]["deposed"].as_str() {
                self.events.push(Event::Deposed { why: why.to_string() });
            }
            *board.lock().unwrap_or_else(PoisonError::into_inner) = status;
            if self.need_read {
                std::thread::sleep(WATCH_WAIT);
                continue;
            }
            match self.quorum.watch(RECORD_KEY, seq, WATCH_WAIT) {
                Ok(Some(stored)) => match GroupRecord::decode(&stored.value) {
                    Ok(record) => {
                        self.record = Some(record.clone());
                        self.events.push(Event::Record(Some(record)))
                    }
                    Err(error) => return Err(format!("{error}: refusing to guess which copy is current")),
                },
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(%error, "watching the group record");
                    std::thread::sleep(WATCH_WAIT);
                }
            }
        }
    }

    fn execute(&mut self, command: Command) {
        match command {
            Command::Write { expected, record, why } => {
                match self.quorum.compare_and_set(RECORD_KEY, expected, record.encode(), CALL_TIMEOUT) {
                    Ok(CasOutcome::Written(_)) => {
                        tracing::info!(seq = record.seq, epoch = record.epoch, "record seq {}: {why}", record.seq);
                        self.record = Some(record.clone());
                        self.events.push(Event::Written(record));
                    }
                    Ok(CasOutcome::Conflict(_)) => {
                        self.events.push(Event::Conflict);
                        self.need_read = true;
                    }
                    Err(error) => {
                        // It may still commit: the next read tells.
                        tracing::warn!(%error, "writing the group record ({why}) got no quorum answer; reading it again");
                        self.events.push(Event::Conflict);
                        self.need_read = true;
                    }
                }
            }
            Command::CheckAccess => {
                let member = self.config.member(self.name).expect("only members check access");
                let result = crate::access::check(&member.volume, self.config.volume_size, &self.config.group);
                if let Err(problem) = &result {
                    tracing::error!(volume = %member.volume.display(), "no access to the store: {problem}");
                }
                self.events.push(Event::Access(result));
            }
            Command::StartProduction { epoch, generation, copies, roll_back_to } => {
                self.start_production(epoch, generation, &copies, roll_back_to)
            }
            Command::Notice { message } => tracing::warn!("{message}"),
            Command::SetCopyHost { site, address } => self.runner.set_copy_host(&site, address),
            Command::StopProduction => {
                tracing::info!("no longer the production host: stopping NBD and mirroring");
                self.stop_action("production");
                self.stop_production("this member no longer hosts the production site");
            }
            Command::StartCopy => {
                let member = self.config.member(self.name).expect("only members host copies");
                let site = self.config.site(&member.site).expect("validated");
                let spec = CopySpec {
                    volume: member.volume.clone(),
                    size: self.config.volume_size,
                    direct: site.direct,
                    listen: SocketAddr::new(member.address, self.config.ports.mirror),
                    secret: self.secret.clone(),
                };
                tracing::info!(site = %member.site, "hosting the copy store of site {}", member.site);
                match self.runner.start_copy(spec) {
                    Err(why) => {
                        tracing::error!("cannot host the copy store: {why}");
                        self.events.push(Event::RoleFailed { why });
                    }
                    Ok(()) => {
                        if let Some(actions) = &self.actions {
                            actions.started(&self.action_context("copy"), false);
                        }
                    }
                }
            }
            Command::StopCopy => {
                self.stop_action("copy");
                self.runner.stop_copy();
            }
            Command::Fence { why } => {
                tracing::error!("self-fence: {why}; stopping every role at once");
                if let Some(gate) = self.lease.gate() {
                    gate.close(&why);
                }
                self.stop_production(&why);
                self.runner.stop_copy();
            }
            Command::StopRoles => {
                if self.lease.gate().is_some() {
                    self.stop_action("production");
                }
                self.stop_production("this member is leaving the group");
                self.runner.stop_copy();
                self.events.push(Event::RolesStopped);
            }
            Command::Exit { error } => {
                self.exit = Some(match error {
                    None => Ok(()),
                    Some(error) => Err(error),
                });
            }
        }
    }

    fn start_production(
        &mut self,
        epoch: u64,
        generation: u64,
        copy_sites: &[crate::core::CopySite],
        roll_back_to: Option<PromotedImage>,
    ) {
        let member = self.config.member(self.name).expect("only members produce");
        let gate = Arc::new(Gate::new(match self.config.on_quorum_loss {
            OnQuorumLoss::Suspend => OnExpiry::Suspend,
            OnQuorumLoss::IoError => OnExpiry::Fail,
        }));
        let copies = copy_sites
            .iter()
            .map(|site| {
                let copy_config = self.config.site(&site.name).filter(|config| config.role == SiteRole::Copy);
                CopyConfig {
                    name: site.name.clone(),
                    address: None,
                    mode: if site.mode == CopyMode::Async.as_str() { MirrorMode::Async } else { MirrorMode::Sync },
                    lag_bytes_max: copy_config
                        .map_or(crate::config::LAG_BYTES_MAX_DEFAULT, |config| config.lag_bytes_max),
                    lag_ms_max: copy_config.map_or(engine::replicator::LAG_MS_MAX_DEFAULT, |config| config.lag_ms_max),
                    compress: self.config.site(&site.name).map_or(Default::default(), |config| config.compress),
                }
            })
            .collect();
        let state_store = Arc::new(RecordStore::new(
            self.quorum.clone(),
            self.name,
            epoch,
            self.config.on_quorum_loss == OnQuorumLoss::Suspend,
            self.stopping.clone(),
        ));
        let spec = ProductionSpec {
            volume: member.volume.clone(),
            size: self.config.volume_size,
            region_bytes: self.config.region_size,
            copies,
            secret: self.secret.clone(),
            epoch,
            generation,
            identical: copy_sites.iter().filter(|site| site.identical).map(|site| site.name.clone()).collect(),
            state_store,
            gate: gate.clone(),
            nbd_listen: SocketAddr::new(member.address, self.config.ports.nbd),
            export: self.config.nbd_export.clone(),
            resync_rate_max: self.config.resync_rate_max,
            roll_back_to: roll_back_to.map(|image| (image.generation, image.taken_at_ms)),
        };
        *self.lease.producing.lock().unwrap_or_else(PoisonError::into_inner) = Some((gate, epoch));
        // The first lease before the first request, so that none is turned
        // away for want of one (the lease thread renews it from here on).
        let _ = self.lease.renew(self.quorum.as_ref(), self.config.lease);
        tracing::info!(epoch, nbd = %SocketAddr::new(member.address, self.config.ports.nbd),
            "production host of group {} (epoch {epoch}): serving NBD and mirroring", self.config.group);
        match self.runner.start_production(spec) {
            Err(why) => {
                tracing::error!("cannot serve the production store: {why}");
                self.lease.producing.lock().unwrap_or_else(PoisonError::into_inner).take();
                self.events.push(Event::RoleFailed { why });
            }
            Ok(store) => {
                self.events.push(Event::Serving { store });
                if let Some(actions) = &self.actions {
                    actions.started(&self.action_context("production"), self.production_by_recovery());
                }
            }
        }
    }

    fn stop_production(&mut self, why: &str) {
        if let Some((gate, _)) = self.lease.producing.lock().unwrap_or_else(PoisonError::into_inner).take() {
            gate.close(why);
        }
        self.runner.stop_production();
    }

    fn status(&self, core: &Core, live: Option<&(BTreeSet<String>, bool)>) -> serde_json::Value {
        let quorum = self.quorum.status();
        let voters = self.config.voters();
        let name_of = |id: u64| voters.iter().find(|voter| voter.id == id).map(|voter| voter.name.clone());
        let record = core.record();
        let role = |name: &str| -> &'static str {
            if self.config.witness(name).is_some() {
                return "witness";
            }
            let Some(record) = record else { return "standby" };
            if record.production.host.as_deref() == Some(name) {
                "production host"
            } else if record.copies.iter().any(|copy| copy.host.as_deref() == Some(name)) {
                "copy host"
            } else {
                "standby"
            }
        };
        let members: Vec<serde_json::Value> = voters
            .iter()
            .map(|voter| {
                let entry = record.and_then(|record| record.members.get(&voter.name));
                json!({
                    "name": voter.name,
                    "site": self.config.member(&voter.name).map(|member| member.site.clone()),
                    "address": voter.address.to_string(),
                    "state": entry.map_or(MemberState::Inactive.name(), |entry| entry.state.name()),
                    "role": role(&voter.name),
                    "access": entry.map(|entry| entry.access),
                    "access_problem": entry.and_then(|entry| entry.access_problem.clone()),
                    "live": live.map(|(live, _)| live.contains(&voter.name)),
                })
            })
            .collect();
        let gate = self.lease.gate();
        json!({
            "group": self.config.group,
            "node": self.name,
            "phase": core.phase(),
            "config_digest": self.config.digest_hex(),
            "quorum": {
                "leader": quorum.leader.and_then(name_of),
                "term": quorum.term,
                "is_leader": quorum.is_leader,
                "last_applied": quorum.last_applied,
                "voters": quorum.voters.iter().map(|voter| json!({
                    "name": name_of(voter.id),
                    "address": voter.address.to_string(),
                    "reachable": voter.reachable,
                })).collect::<Vec<_>>(),
            },
            "members": members,
            "record": record,
            "roles": self.runner.status(),
            "io": gate.map(|gate| json!({ "lease_valid": gate.is_open(), "requests_waiting": gate.waiting() })),
            "liveness_refused": self.liveness.refused(),
            "notice": core.last_notice(),
        })
    }
}
