//! The simulated world: nodes running `Core`s behind a shell that does what
//! `node.rs` does, a linearizable quorum store holding the record, raft
//! leadership, liveness, the production host's lease and replicator, a
//! client writing, and faults from the seed. Time is simulated milliseconds
//! on one global axis; each node reads it through its own skewed clock.
//!
//! What the shell copies from `node.rs`: a main loop every ~100 ms of its
//! own clock feeding `Leader` and `Liveness` when they changed, the record
//! when the watch sees a newer one, every batch of events behind a `Tick`
//! read as it is stepped (after the call that brought it); a read or
//! compare-and-set blocks the loop until it answers or times out after 2 s
//! (`Conflict` and a fresh read for a write that timed out, though it may
//! have committed); the lease thread renews every lease/4 by a linearizable
//! read that must name this node joined production host at its epoch, a
//! lease lasting `lease_ms` from before the read; a deposed host's gate
//! closes for good.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use cluster_glue::core::{Command, CopySite, Core, Event, MemberInfo, Topology};
use cluster_glue::record::{CopyRecordState, DrImage, DrImageState, GroupRecord, MemberState};

use super::checks::{check_commit, Failure, Stats};
use super::rng::Rng;

/// How long a quorum call waits before it gives up (`CALL_TIMEOUT`).
const CALL_TIMEOUT_MS: u64 = 2000;
/// Liveness: silence this long is failure, and a node judges nobody for
/// this long after it started or resumed (`[liveness] failure_ms`): one of
/// these per seed, the default first.
const FAILURE_AFTER_MS: [u64; 2] = [1000, 2000];
/// The lease (`[quorum] lease_ms`): one of these per seed, the default first.
const LEASE_MS: [u64; 4] = [500, 1000, 2000, 3000];
/// The shell's round (`WATCH_WAIT`), on the node's clock.
const ROUND_MS: u64 = 100;
/// How long a leaving node tries to record that it left.
const LEAVE_RECORD_WAIT_MS: u64 = 5000;
/// Clock rates differ from true time by at most this much (parts per million).
const SKEW_MAX_PPM: u64 = 10_000;
/// The replicator's round.
const REPLICATE_MS: u64 = 100;
/// Trace lines kept for a failure report.
const TRACE_KEEP: usize = 40;

/// How long and how hard one run is.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Simulated milliseconds in all.
    pub duration_ms: u64,
    /// Faults are put in until then; then everything heals and the group
    /// has the rest of the run to settle.
    pub chaos_ms: u64,
    /// Keep a trace (for a failure report or a replay).
    pub trace: bool,
    /// Print every trace line as it happens (replay).
    pub echo: bool,
}

/// A copy's state as the production host's replicator knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Current,
    Stale,
    Syncing,
}

fn known(state: &CopyRecordState) -> Known {
    match state {
        CopyRecordState::Current => Known::Current,
        CopyRecordState::Stale { .. } => Known::Stale,
        CopyRecordState::Syncing => Known::Syncing,
    }
}

/// A member or witness as configured.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    /// `None`: a witness.
    site: Option<String>,
    address: IpAddr,
}

/// A quorum call in flight.
#[derive(Debug, Clone)]
enum OpKind {
    Read,
    Write { expected: u64, record: Box<GroupRecord> },
}

/// What a quorum call answered.
#[derive(Debug, Clone)]
enum OpResult {
    Record(Option<Box<GroupRecord>>),
    Written(Box<GroupRecord>),
    Conflict,
    /// No answer within the call timeout (a write may still have committed).
    Timeout,
}

#[derive(Debug, Clone)]
enum Action {
    /// The process starts (or starts again).
    Start { node: usize },
    /// One round of the shell's main loop.
    Round { node: usize, life: u64, token: u64 },
    /// A quorum call reaches the leader and takes effect.
    Linearize { node: usize, life: u64, issued: u64, op: OpKind },
    /// A quorum call's answer reaches the shell.
    Answer { node: usize, life: u64, write: bool, result: OpResult },
    /// The lease thread renews.
    Lease { node: usize, life: u64, token: u64 },
    /// The replicator looks at its links.
    Replicate { node: usize, life: u64, token: u64 },
    /// A paused process runs again.
    Resume { node: usize, life: u64 },
    /// The client writes to whoever serves.
    Client,
    /// The next fault.
    Fault,
    /// The partition heals.
    Heal,
    /// Raft elects a leader.
    Election,
    /// Every fault ends.
    Calm,
}

/// One node: its process, its shell, its roles.
#[derive(Debug, Default)]
struct Node {
    up: bool,
    /// +1 per process start and stop: answers to a dead process are dropped.
    life: u64,
    core: Option<Core>,
    /// Sim time its process started (its clock's zero) and its rate.
    base_ms: u64,
    skew_ppm: i64,
    paused_until: Option<u64>,
    /// Liveness judges nobody until 2 s after this.
    awake_since: u64,
    /// A quorum call blocks the main loop.
    busy: bool,
    /// Events gathered before a blocking read, stepped once it answers.
    pending: Vec<Event>,
    need_read: bool,
    exit: bool,
    sent_leader: Option<bool>,
    sent_live: Option<(BTreeSet<String>, bool)>,
    round_token: u64,
    lease_token: u64,
    replicate_token: u64,
    leave_asked: bool,
    leave_sent: Option<u64>,
    switchover: Option<String>,
    /// A forced promotion (`--accept-data-loss`) the operator asked of it.
    promote: Option<String>,
    /// What its copy role last told the core about its store.
    sent_copy_store: Option<(Option<bool>, Option<DrImage>)>,
    /// Answers reach this node late until then.
    slow_until: u64,
    /// An old raft leader believes it leads until then (`u64::MAX`: until
    /// some time after it resumes).
    belief_until: u64,
    /// The production role's epoch while it runs.
    production: Option<u64>,
    gate_open: bool,
    /// On the node's clock.
    lease_until: Option<u64>,
    /// The replicator's view of each copy site.
    known: BTreeMap<String, Known>,
    sync_done_at: BTreeMap<String, u64>,
    copy_targets: BTreeMap<String, Option<usize>>,
    copy_running: bool,
    /// The incarnation this process wrote itself `joining` with.
    incarnation: Option<u64>,
    /// Its liveness thread hears heartbeats from then on.
    hears_from: u64,
}

/// The simulated world of one seed.
pub struct World {
    seed: u64,
    params: Params,
    rng: Rng,
    now: u64,
    queue: BTreeMap<(u64, u64), Action>,
    queued: u64,
    specs: Vec<Spec>,
    topologies: Vec<Topology>,
    lease_ms: u64,
    failure_after_ms: u64,
    nodes: Vec<Node>,
    /// Which side of a partition each node is on.
    side: Vec<u8>,
    partitioned: bool,
    /// When each node last heard each other (sim time).
    heard: Vec<Vec<Option<u64>>>,
    leader: Option<usize>,
    election_pending: bool,
    /// The quorum store's record.
    committed: Option<GroupRecord>,
    /// The first commit time of each epoch.
    epoch_committed: BTreeMap<u64, u64>,
    /// The data: the last client write each site's store holds.
    store: BTreeMap<String, u64>,
    /// The generation each site's store holds data of.
    store_generation: BTreeMap<String, u64>,
    /// Copy stores in the middle of a resync pass (no consistent image),
    /// and the DR image each keeps: (its data, its generation, when the
    /// pass began); `None`: lost (past its limit).
    pass: BTreeMap<String, Option<(u64, u64, u64)>>,
    acked: u64,
    max_served_epoch: u64,
    calm: bool,
    stats: Stats,
    violation: Option<String>,
    trace: VecDeque<String>,
}

/// Run seed `seed`: its stats, or the first broken invariant.
pub fn run(seed: u64, params: Params) -> Result<Stats, Failure> {
    let mut world = World::new(seed, params);
    world.run();
    match world.violation.take() {
        None => Ok(world.stats),
        Some(message) => Err(Failure { seed, message, trace: world.trace.into_iter().collect() }),
    }
}

impl World {
    fn new(seed: u64, params: Params) -> World {
        let mut rng = Rng::new(seed);
        let mut specs = Vec::new();
        let add = |specs: &mut Vec<Spec>, name: String, site: Option<&str>| {
            let last = u8::try_from(specs.len() + 1).expect("a few nodes");
            specs.push(Spec { name, site: site.map(str::to_string), address: IpAddr::from([10, 0, 0, last]) });
        };
        let east = rng.range(1, 4);
        let west = rng.range(1, 3);
        let north = rng.range(0, 2);
        for index in 1..=east {
            add(&mut specs, format!("a{index}"), Some("east"));
        }
        for index in 1..=west {
            add(&mut specs, format!("b{index}"), Some("west"));
        }
        for index in 1..=north {
            add(&mut specs, format!("c{index}"), Some("north"));
        }
        if specs.len() < 3 || specs.len() % 2 == 0 || rng.chance(30) {
            add(&mut specs, "w".to_string(), None);
        }
        let lease_ms = LEASE_MS[rng.index(LEASE_MS.len())];
        let failure_after_ms = FAILURE_AFTER_MS[rng.index(FAILURE_AFTER_MS.len())];
        let mut copy_sites = vec![CopySite { name: "west".to_string(), mode: "sync".to_string(), identical: false }];
        if north > 0 {
            copy_sites.push(CopySite { name: "north".to_string(), mode: "sync".to_string(), identical: false });
        }
        let members: Vec<MemberInfo> = specs
            .iter()
            .filter_map(|spec| {
                let site = spec.site.clone()?;
                let order = spec.name[1..].parse().expect("names end in their order");
                Some(MemberInfo { name: spec.name.clone(), site, backup_order: order, address: spec.address })
            })
            .collect();
        let witnesses: Vec<String> =
            specs.iter().filter(|spec| spec.site.is_none()).map(|spec| spec.name.clone()).collect();
        let topologies = specs
            .iter()
            .map(|spec| Topology {
                me: spec.name.clone(),
                production_site: "east".to_string(),
                copy_sites: copy_sites.clone(),
                members: members.clone(),
                witnesses: witnesses.clone(),
                config_digest: "d1".to_string(),
                mirror_port: 7401,
                lease_ms,
            })
            .collect();
        let count = specs.len();
        let store = ["east", "west", "north"].iter().map(|site| (site.to_string(), 0)).collect();
        World {
            seed,
            params,
            rng,
            now: 0,
            queue: BTreeMap::new(),
            queued: 0,
            specs,
            topologies,
            lease_ms,
            failure_after_ms,
            nodes: (0..count).map(|_| Node::default()).collect(),
            side: vec![0; count],
            partitioned: false,
            heard: vec![vec![None; count]; count],
            leader: None,
            election_pending: false,
            committed: None,
            epoch_committed: BTreeMap::new(),
            store,
            store_generation: ["east", "west", "north"].iter().map(|site| (site.to_string(), 1)).collect(),
            pass: BTreeMap::new(),
            acked: 0,
            max_served_epoch: 0,
            calm: false,
            stats: Stats::default(),
            violation: None,
            trace: VecDeque::new(),
        }
    }

    fn run(&mut self) {
        let names: Vec<String> = self.specs.iter().map(|spec| spec.name.clone()).collect();
        let (lease_ms, failure_ms) = (self.lease_ms, self.failure_after_ms);
        self.note(|| format!("seed topology: {} (lease {lease_ms} ms, failure {failure_ms} ms)", names.join(" ")));
        for node in 0..self.nodes.len() {
            let at = self.rng.range(0, 3000);
            self.at(at, Action::Start { node });
        }
        let first_fault = self.rng.range(3000, 8000);
        self.at(first_fault, Action::Fault);
        self.at(100, Action::Client);
        self.at(self.params.chaos_ms, Action::Calm);
        self.check_leader();
        while let Some(((time, _), action)) = self.queue.pop_first() {
            if time > self.params.duration_ms {
                break;
            }
            self.now = time;
            self.dispatch(action);
            self.check_serving();
            if self.violation.is_some() {
                return;
            }
        }
        self.now = self.params.duration_ms;
        self.stats.sim_ms = self.params.duration_ms;
        if !(0..self.nodes.len()).any(|node| self.serving(node)) {
            self.stats.stuck_at_end += 1;
            self.stats.stuck_seeds.push(self.seed);
        }
    }

    // ---- plumbing ----

    fn at(&mut self, time: u64, action: Action) {
        self.queued += 1;
        self.queue.insert((time, self.queued), action);
    }

    fn after(&mut self, delay_ms: u64, action: Action) {
        self.at(self.now + delay_ms, action);
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if !self.params.trace {
            return;
        }
        let line = format!("{:>7} {}", self.now, line());
        if self.params.echo {
            eprintln!("{line}");
        }
        if self.trace.len() == TRACE_KEEP {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn fail(&mut self, message: String) {
        if self.violation.is_none() {
            let now = self.now;
            self.note(|| format!("VIOLATION: {message}"));
            self.violation = Some(format!("at {now} ms: {message}"));
        }
    }

    fn name(&self, node: usize) -> String {
        self.specs[node].name.clone()
    }

    /// `node`'s clock now: milliseconds since its process started.
    fn local(&self, node: usize) -> u64 {
        let elapsed = self.now.saturating_sub(self.nodes[node].base_ms);
        let rate = 1_000_000 + self.nodes[node].skew_ppm;
        u64::try_from(i128::from(elapsed) * i128::from(rate) / 1_000_000).expect("time runs forward")
    }

    /// Sim milliseconds for `local_ms` on `node`'s clock.
    fn real(&self, node: usize, local_ms: u64) -> u64 {
        let rate = 1_000_000 + self.nodes[node].skew_ppm;
        u64::try_from(i128::from(local_ms) * 1_000_000 / i128::from(rate)).expect("positive").max(1)
    }

    fn paused(&self, node: usize) -> bool {
        self.nodes[node].paused_until.is_some()
    }

    fn running(&self, node: usize) -> bool {
        self.nodes[node].up && !self.paused(node)
    }

    /// Whether `from` hears `to`'s heartbeats now: both run, on one side,
    /// and `from`'s liveness thread has caught up since it started or
    /// resumed (its main loop may look before it did).
    fn contact(&self, from: usize, to: usize) -> bool {
        from != to
            && self.running(from)
            && self.now >= self.nodes[from].hears_from
            && self.running(to)
            && self.side[from] == self.side[to]
    }

    /// Remember who heard whom until now: call before anything that
    /// changes contact.
    fn touch(&mut self) {
        for from in 0..self.nodes.len() {
            for to in 0..self.nodes.len() {
                if self.contact(from, to) {
                    self.heard[from][to] = Some(self.now);
                }
            }
        }
    }

    fn live_view(&self, node: usize) -> (BTreeSet<String>, bool) {
        let mut live = BTreeSet::from([self.name(node)]);
        for other in 0..self.nodes.len() {
            let recent = self.heard[node][other].is_some_and(|when| self.now - when < self.failure_after_ms);
            if self.contact(node, other) || recent {
                live.insert(self.name(other));
            }
        }
        (live, self.now - self.nodes[node].awake_since >= self.failure_after_ms)
    }

    fn majority(&self, side: u8) -> bool {
        let count = (0..self.nodes.len()).filter(|&node| self.running(node) && self.side[node] == side).count();
        count * 2 > self.nodes.len()
    }

    fn can_lead(&self, node: usize) -> bool {
        self.running(node) && self.majority(self.side[node])
    }

    /// Whether `node`'s quorum calls reach the leader (ignoring a pause:
    /// the calls of a paused process wait with it).
    fn linked(&self, node: usize) -> bool {
        self.nodes[node].up && self.leader.is_some_and(|leader| self.side[leader] == self.side[node])
    }

    fn reachable(&self, node: usize) -> bool {
        self.linked(node) && !self.paused(node)
    }

    fn believes_leader(&self, node: usize) -> bool {
        self.leader == Some(node) || self.nodes[node].belief_until > self.now
    }

    /// Raft: a leader that cannot lead any more is deposed (it may believe
    /// otherwise for a while); a new one is elected after a delay.
    fn check_leader(&mut self) {
        if let Some(leader) = self.leader {
            if !self.can_lead(leader) {
                self.leader = None;
                let belief = if self.paused(leader) { u64::MAX } else { self.now + self.rng.range(0, 2000) };
                self.nodes[leader].belief_until = belief;
                let name = self.name(leader);
                self.note(|| format!("raft: {name} no longer leads"));
            }
        }
        if self.leader.is_none() && !self.election_pending {
            self.election_pending = true;
            let delay = self.rng.range(500, 2000);
            self.after(delay, Action::Election);
        }
    }

    fn elect(&mut self) {
        self.election_pending = false;
        if self.leader.is_some() {
            return;
        }
        let Some(leader) = (0..self.nodes.len()).find(|&node| self.can_lead(node)) else {
            self.check_leader();
            return;
        };
        self.leader = Some(leader);
        for node in 0..self.nodes.len() {
            let hears = self.running(node) && self.side[node] == self.side[leader];
            if node != leader && hears && self.nodes[node].belief_until > self.now {
                self.nodes[node].belief_until = self.now + self.rng.range(0, 300);
            }
        }
        let name = self.name(leader);
        self.note(|| format!("raft: {name} elected"));
    }

    // ---- dispatch ----

    fn dispatch(&mut self, action: Action) {
        let node = match &action {
            Action::Round { node, life, .. }
            | Action::Answer { node, life, .. }
            | Action::Lease { node, life, .. }
            | Action::Replicate { node, life, .. } => Some((*node, *life)),
            _ => None,
        };
        if let Some((node, life)) = node {
            if self.nodes[node].life != life || !self.nodes[node].up {
                return;
            }
            if let Some(until) = self.nodes[node].paused_until {
                // SIGSTOP: nothing runs until it resumes.
                self.at(until, action);
                return;
            }
        }
        match action {
            Action::Start { node } => self.start(node),
            Action::Round { node, token, .. } => {
                if self.nodes[node].round_token == token && !self.nodes[node].busy {
                    self.round(node);
                }
            }
            Action::Linearize { node, life, issued, op } => self.linearize(node, life, issued, op),
            Action::Answer { node, write, result, .. } => self.answer(node, write, result),
            Action::Lease { node, token, .. } => {
                if self.nodes[node].lease_token == token {
                    let reachable = self.renew(node);
                    let wait = if reachable { self.lease_ms / 4 } else { self.lease_ms / 2 + self.lease_ms / 4 };
                    let delay = self.real(node, wait);
                    let life = self.nodes[node].life;
                    self.after(delay, Action::Lease { node, life, token });
                }
            }
            Action::Replicate { node, token, .. } => {
                if self.nodes[node].replicate_token == token {
                    self.replicate(node);
                    let delay = self.real(node, REPLICATE_MS);
                    let life = self.nodes[node].life;
                    self.after(delay, Action::Replicate { node, life, token });
                }
            }
            Action::Resume { node, life } => {
                if self.nodes[node].life == life && self.paused(node) {
                    self.resume(node);
                }
            }
            Action::Client => {
                self.client();
                let delay = self.rng.range(20, 150);
                self.after(delay, Action::Client);
            }
            Action::Fault => {
                if !self.calm {
                    self.fault();
                    let delay = self.rng.range(1000, 6000);
                    self.after(delay, Action::Fault);
                }
            }
            Action::Heal => self.heal(),
            Action::Election => self.elect(),
            Action::Calm => self.calm_down(),
        }
    }

    // ---- processes ----

    fn start(&mut self, node: usize) {
        if self.nodes[node].up {
            return;
        }
        self.touch();
        let life = self.nodes[node].life + 1;
        let skew = i64::try_from(self.rng.range(0, 2 * SKEW_MAX_PPM + 1)).expect("small") - SKEW_MAX_PPM as i64;
        self.nodes[node] = Node {
            up: true,
            life,
            core: Some(Core::new(self.topologies[node].clone())),
            base_ms: self.now,
            skew_ppm: skew,
            awake_since: self.now,
            hears_from: self.now + self.rng.range(0, 200),
            need_read: true,
            ..Node::default()
        };
        for other in 0..self.nodes.len() {
            self.heard[node][other] = None;
        }
        let name = self.name(node);
        self.note(|| format!("{name} starts (clock skew {skew} ppm)"));
        self.check_leader();
        let delay = self.rng.range(1, ROUND_MS);
        self.schedule_round(node, delay);
    }

    /// The process ends (crash, or exit after leaving); it starts again later.
    fn stop(&mut self, node: usize, why: &str) {
        self.touch();
        let life = self.nodes[node].life + 1;
        self.nodes[node] = Node { life, ..Node::default() };
        let name = self.name(node);
        self.note(|| format!("{name} stops ({why})"));
        self.check_leader();
        let delay = self.rng.range(500, 15_000);
        self.after(delay, Action::Start { node });
    }

    fn resume(&mut self, node: usize) {
        self.touch();
        self.nodes[node].paused_until = None;
        self.nodes[node].awake_since = self.now;
        self.nodes[node].hears_from = self.now + self.rng.range(1, 200);
        if self.nodes[node].belief_until == u64::MAX {
            self.nodes[node].belief_until = self.now + self.rng.range(0, 1500);
        }
        let name = self.name(node);
        self.note(|| format!("{name} resumes (SIGCONT)"));
        self.check_leader();
    }

    fn schedule_round(&mut self, node: usize, delay_ms: u64) {
        self.nodes[node].round_token += 1;
        let (life, token) = (self.nodes[node].life, self.nodes[node].round_token);
        self.after(delay_ms, Action::Round { node, life, token });
    }

    // ---- the shell ----

    fn round(&mut self, node: usize) {
        if let Some(sent) = self.nodes[node].leave_sent {
            if self.now - sent > self.real(node, LEAVE_RECORD_WAIT_MS) {
                self.stop(node, "left without recording it: no quorum answered");
                return;
            }
        }
        let mut events = Vec::new();
        if self.nodes[node].leave_asked && self.nodes[node].leave_sent.is_none() {
            self.nodes[node].leave_sent = Some(self.now);
            events.push(Event::Leave);
        }
        if let Some(to) = self.nodes[node].switchover.take() {
            events.push(Event::Switchover { to, asked_at: None });
        }
        if let Some(site) = self.nodes[node].promote.take() {
            events.push(Event::Promote { site });
        }
        // The copy role says whether its store is mid-pass and what DR
        // image it keeps (node.rs reads it from the role's status).
        let copy_store = match (&self.specs[node].site, self.nodes[node].copy_running) {
            (Some(site), true) => {
                let image = match self.pass.get(site) {
                    None => DrImage { state: DrImageState::None, generation: 0, taken_at_ms: 0 },
                    Some(None) => DrImage { state: DrImageState::Lost, generation: 0, taken_at_ms: 0 },
                    Some(Some((_, generation, taken_at_ms))) => {
                        DrImage { state: DrImageState::Kept, generation: *generation, taken_at_ms: *taken_at_ms }
                    }
                };
                (Some(!self.pass.contains_key(site)), Some(image))
            }
            _ => (None, None),
        };
        if self.nodes[node].sent_copy_store != Some(copy_store) {
            self.nodes[node].sent_copy_store = Some(copy_store);
            events.push(Event::CopyStore { consistent: copy_store.0, dr_image: copy_store.1 });
            events.push(Event::WallClock { unix_ms: self.now });
        }
        let leader = self.believes_leader(node);
        if self.nodes[node].sent_leader != Some(leader) {
            self.nodes[node].sent_leader = Some(leader);
            events.push(Event::Leader(leader));
        }
        let live = self.live_view(node);
        if self.nodes[node].sent_live.as_ref() != Some(&live) {
            self.nodes[node].sent_live = Some(live.clone());
            events.push(Event::Liveness { live: live.0, settled: live.1 });
        }
        let core_seq = self.nodes[node].core.as_ref().and_then(Core::record).map_or(0, |record| record.seq);
        let committed_seq = self.committed.as_ref().map_or(0, |record| record.seq);
        if !self.nodes[node].need_read && self.reachable(node) && committed_seq > core_seq {
            // The watch saw a newer record.
            events.push(Event::Record(self.committed.clone()));
        }
        let writing = self.nodes[node].core.as_ref().is_some_and(Core::is_writing);
        if self.nodes[node].need_read && !writing {
            self.nodes[node].pending = events;
            self.call(node, OpKind::Read);
            return;
        }
        self.step(node, events);
        self.after_step(node);
    }

    /// Step `events` through the core and carry out its commands, as the
    /// shell's inner loop does.
    fn step(&mut self, node: usize, mut events: Vec<Event>) {
        let Some(mut core) = self.nodes[node].core.take() else { return };
        let mut ticked = false;
        while (!events.is_empty() || !ticked) && self.violation.is_none() {
            ticked = true;
            events.insert(0, Event::Tick { now_ms: self.local(node) });
            for event in std::mem::take(&mut events) {
                if !matches!(event, Event::Tick { .. }) {
                    let name = self.name(node);
                    self.note(|| format!("{name} <- {}", brief_event(&event)));
                }
                for command in core.step(event) {
                    self.execute(node, &core, command, &mut events);
                }
            }
        }
        self.check_fenced(node, &core);
        self.nodes[node].core = Some(core);
    }

    /// Seed 004: a member that learns it was forced out stops serving at
    /// once (the lease would stop it later; this is the core's own fence).
    fn check_fenced(&mut self, node: usize, core: &Core) {
        let me = self.name(node);
        let Some(entry) = core.record().and_then(|record| record.members.get(&me)) else { return };
        let roles = self.nodes[node].production.is_some() || self.nodes[node].copy_running;
        let mine = Some(entry.incarnation) == self.nodes[node].incarnation;
        if entry.state == MemberState::ForcedLeaving && mine && roles {
            self.fail(format!(
                "seed 004 self-fence: {me} read that it was forced out (incarnation {}) and still runs its roles",
                entry.incarnation
            ));
        }
    }

    fn after_step(&mut self, node: usize) {
        if !self.nodes[node].up || self.nodes[node].busy {
            return;
        }
        if self.nodes[node].exit {
            self.stop(node, "exited");
            return;
        }
        let delay = self.real(node, ROUND_MS);
        self.schedule_round(node, delay);
    }

    fn execute(&mut self, node: usize, core: &Core, command: Command, events: &mut Vec<Event>) {
        let name = self.name(node);
        self.note(|| format!("{name} -> {}", brief_command(&command)));
        match command {
            Command::Write { expected, record, .. } => {
                if let Some(entry) = record.members.get(&name) {
                    if entry.state == MemberState::Joining {
                        self.nodes[node].incarnation = Some(entry.incarnation);
                    }
                }
                self.call(node, OpKind::Write { expected, record: Box::new(record) })
            }
            Command::CheckAccess => {
                let result =
                    if self.rng.chance(2) { Err("simulated: the store is unreachable".to_string()) } else { Ok(()) };
                events.push(Event::Access(result));
            }
            Command::StartProduction { epoch, copies, roll_back_to, .. } => {
                // A store in the middle of a resync is no image: it is served
                // only rolled back to the DR image its host keeps (node.rs:
                // restore_image, refused for another image or none).
                let mine = self.specs[node].site.clone().unwrap_or_default();
                if let Some(pass) = self.pass.get(&mine).copied() {
                    let Some(asked) = roll_back_to else {
                        self.fail(format!(
                            "{name} told to serve site {mine}'s store, in the middle of a resync (no consistent image), \
                             without rolling it back"
                        ));
                        return;
                    };
                    match pass {
                        Some((data, generation, taken_at))
                            if (generation, taken_at) == (asked.generation, asked.taken_at_ms) =>
                        {
                            self.note(|| {
                                format!(
                                    "{name} rolls site {mine}'s store back to write {data} (generation {generation})"
                                )
                            });
                            self.store.insert(mine.clone(), data);
                            self.store_generation.insert(mine.clone(), generation);
                            self.pass.remove(&mine);
                        }
                        _ => {
                            events.push(Event::RoleFailed {
                                why: "simulated: the DR image asked for is not kept".into(),
                            });
                            return;
                        }
                    }
                }
                let forked = core.record().is_some_and(|record| {
                    record.epoch == epoch && record.history.last().is_some_and(|entry| entry.fork.is_some())
                });
                if forked {
                    // A forced promotion gave up what the promoted store
                    // lacks: the line goes on from its data.
                    self.acked = self.store[&mine];
                }
                self.start_production(node, core, epoch, &copies);
                // The store's token: one per store (site).
                let store = self.specs[node].site.clone().unwrap_or_default();
                events.push(Event::Serving { store });
            }
            Command::StopProduction => self.stop_production(node),
            Command::SetCopyHost { site, address } => {
                let target = address.and_then(|address| self.node_at(address));
                self.nodes[node].copy_targets.insert(site, target);
            }
            Command::StartCopy => self.nodes[node].copy_running = true,
            Command::StopCopy => self.nodes[node].copy_running = false,
            Command::Fence { .. } => {
                self.stats.fences += 1;
                self.stop_production(node);
                self.nodes[node].copy_running = false;
            }
            Command::StopRoles => {
                self.stop_production(node);
                self.nodes[node].copy_running = false;
                events.push(Event::RolesStopped);
            }
            Command::Notice { .. } => {}
            Command::Exit { error } => {
                if let Some(error) = error {
                    self.fail(format!("{name} exited with an error: {error}"));
                }
                self.nodes[node].exit = true;
            }
        }
    }

    fn node_at(&self, address: SocketAddr) -> Option<usize> {
        self.specs.iter().position(|spec| spec.address == address.ip())
    }

    /// A blocking quorum call: it reaches the leader a little later, or
    /// times out.
    fn call(&mut self, node: usize, op: OpKind) {
        self.nodes[node].busy = true;
        let life = self.nodes[node].life;
        let write = matches!(op, OpKind::Write { .. });
        if self.reachable(node) {
            let delay = self.rng.range(1, 30);
            self.after(delay, Action::Linearize { node, life, issued: self.now, op });
        } else {
            let delay = self.real(node, CALL_TIMEOUT_MS);
            self.after(delay, Action::Answer { node, life, write, result: OpResult::Timeout });
        }
    }

    fn linearize(&mut self, node: usize, life: u64, issued: u64, op: OpKind) {
        let write = matches!(op, OpKind::Write { .. });
        let timeout_at = (issued + CALL_TIMEOUT_MS).max(self.now + 1);
        if self.leader.is_none() {
            self.at(timeout_at, Action::Answer { node, life, write, result: OpResult::Timeout });
            return;
        }
        let result = match op {
            OpKind::Read => OpResult::Record(self.committed.clone().map(Box::new)),
            OpKind::Write { expected, record } => {
                if self.committed.as_ref().map_or(0, |record| record.seq) == expected {
                    let by = self.name(node);
                    self.commit((*record).clone(), &by);
                    OpResult::Written(record)
                } else {
                    OpResult::Conflict
                }
            }
        };
        if !self.linked(node) || self.nodes[node].life != life || self.rng.chance(2) {
            // The answer is lost: the shell times out (the write may have committed).
            self.at(timeout_at, Action::Answer { node, life, write, result: OpResult::Timeout });
            return;
        }
        let delay =
            if self.nodes[node].slow_until > self.now { self.rng.range(1, 1500) } else { self.rng.range(1, 30) };
        self.after(delay, Action::Answer { node, life, write, result });
    }

    fn answer(&mut self, node: usize, write: bool, result: OpResult) {
        self.nodes[node].busy = false;
        let mut events = std::mem::take(&mut self.nodes[node].pending);
        match result {
            OpResult::Record(record) => {
                self.nodes[node].need_read = false;
                events.push(Event::Record(record.map(|record| *record)));
            }
            OpResult::Written(record) => events.push(Event::Written(*record)),
            OpResult::Conflict => {
                self.nodes[node].need_read = true;
                events.push(Event::Conflict);
            }
            OpResult::Timeout if write => {
                self.nodes[node].need_read = true;
                events.push(Event::Conflict);
            }
            OpResult::Timeout => {}
        }
        self.step(node, events);
        self.after_step(node);
    }

    // ---- the quorum store ----

    fn commit(&mut self, record: GroupRecord, by: &str) {
        let specs = self.specs.clone();
        let member_site = |name: &str| specs.iter().find(|spec| spec.name == name).and_then(|spec| spec.site.clone());
        if let Err(message) = check_commit(self.committed.as_ref(), &record, member_site, &mut self.stats) {
            self.fail(message);
        }
        self.stats.commits += 1;
        self.epoch_committed.entry(record.epoch).or_insert(self.now);
        let line = brief_record(&record);
        self.note(|| format!("COMMIT by {by}: {line}"));
        self.committed = Some(record);
        // Every watching shell hears of it.
        for node in 0..self.nodes.len() {
            let idle = self.nodes[node].up && !self.nodes[node].busy && !self.nodes[node].need_read;
            if idle && self.reachable(node) {
                let delay = self.rng.range(1, 20);
                self.schedule_round(node, delay);
            }
        }
    }

    // ---- the production role: lease, replicator, client writes ----

    fn start_production(&mut self, node: usize, core: &Core, epoch: u64, copies: &[CopySite]) {
        let me = self.name(node);
        let record = core.record().cloned();
        if record.as_ref().is_none_or(|record| record.production.host.as_deref() != Some(me.as_str())) {
            self.fail(format!("{me} told to produce at epoch {epoch} by a record that does not name it"));
        }
        let mine = self.specs[node].site.clone().unwrap_or_default();
        for copy in copies.iter().filter(|copy| copy.identical) {
            if self.store.get(&copy.name) != self.store.get(&mine) {
                let (has, mine_has) = (self.store.get(&copy.name).copied(), self.store.get(&mine).copied());
                self.fail(format!(
                    "hand-over: {me} starts epoch {epoch} trusting copy {} as identical, but it holds write {has:?} and {mine} holds {mine_has:?}",
                    copy.name
                ));
            }
        }
        let known = copies
            .iter()
            .map(|copy| {
                let state = record
                    .as_ref()
                    .and_then(|record| record.copy(&copy.name))
                    .map_or(Known::Stale, |entry| known(&entry.state));
                (copy.name.clone(), state)
            })
            .collect();
        if let Some(record) = &record {
            self.store_generation.insert(mine.clone(), record.generation);
        }
        let state = &mut self.nodes[node];
        state.production = Some(epoch);
        state.gate_open = true;
        state.lease_until = None;
        state.known = known;
        state.sync_done_at.clear();
        state.copy_targets.clear();
        state.lease_token += 1;
        state.replicate_token += 1;
        let (life, lease_token, replicate_token) = (state.life, state.lease_token, state.replicate_token);
        // The first lease before the first request.
        self.renew(node);
        let delay = self.real(node, self.lease_ms / 4);
        self.after(delay, Action::Lease { node, life, token: lease_token });
        let delay = self.rng.range(1, REPLICATE_MS);
        self.after(delay, Action::Replicate { node, life, token: replicate_token });
    }

    fn stop_production(&mut self, node: usize) {
        let state = &mut self.nodes[node];
        state.production = None;
        state.gate_open = false;
        state.lease_until = None;
        state.lease_token += 1;
        state.replicate_token += 1;
    }

    /// One lease renewal; whether the quorum answered.
    fn renew(&mut self, node: usize) -> bool {
        let Some(epoch) = self.nodes[node].production else { return true };
        if !self.nodes[node].gate_open {
            return true;
        }
        if !self.reachable(node) {
            return false;
        }
        let me = self.name(node);
        let asked = self.local(node);
        let names_me = self.committed.as_ref().is_some_and(|record| {
            record.production.host.as_deref() == Some(me.as_str())
                && record.member_state(&me) == MemberState::Joined
                && record.epoch == epoch
        });
        if names_me {
            self.nodes[node].lease_until = Some(asked + self.lease_ms);
        } else {
            self.nodes[node].gate_open = false;
            self.stats.lease_fences += 1;
            self.note(|| format!("{me} lease: deposed, the gate closes (epoch {epoch})"));
        }
        true
    }

    /// Whether `node` may acknowledge a write now.
    fn serving(&self, node: usize) -> bool {
        let state = &self.nodes[node];
        self.running(node)
            && state.production.is_some()
            && state.gate_open
            && state.lease_until.is_some_and(|until| self.local(node) < until)
    }

    /// Whether the production role on `node` reaches its copy of `site`.
    fn link_up(&self, node: usize, site: &str) -> bool {
        let Some(Some(host)) = self.nodes[node].copy_targets.get(site) else { return false };
        let host = *host;
        self.running(host)
            && self.nodes[host].copy_running
            && self.side[host] == self.side[node]
            && self.specs[host].site.as_deref() == Some(site)
    }

    fn replicate(&mut self, node: usize) {
        let sites: Vec<(String, Known)> =
            self.nodes[node].known.iter().map(|(site, state)| (site.clone(), *state)).collect();
        for (site, state) in sites {
            let up = self.link_up(node, &site);
            let synced = self.nodes[node].sync_done_at.get(&site).is_none_or(|done| self.now >= *done);
            let target = match (state, up) {
                (Known::Current | Known::Syncing, false) => Known::Stale,
                (Known::Stale, true) => Known::Syncing,
                (Known::Syncing, true) if synced => Known::Current,
                _ => continue,
            };
            if !self.record_copy(node, &site, target) {
                continue;
            }
            match target {
                Known::Stale => self.stats.marked_stale += 1,
                Known::Syncing => {
                    // The pass begins: the copy's store is no image until it
                    // ends; its host keeps the way back (mostly).
                    if !self.pass.contains_key(&site) {
                        let image =
                            (!self.rng.chance(20)).then(|| (self.store[&site], self.store_generation[&site], self.now));
                        self.pass.insert(site.clone(), image);
                    }
                    let done = self.now + self.rng.range(200, 3000);
                    self.nodes[node].sync_done_at.insert(site.clone(), done);
                }
                Known::Current => {
                    // The resync made the copy's store the production store.
                    self.stats.resynced += 1;
                    let mine = self.specs[node].site.clone().expect("a member produces");
                    let data = self.store[&mine];
                    self.store.insert(site.clone(), data);
                    let generation = self.store_generation[&mine];
                    self.store_generation.insert(site.clone(), generation);
                    self.pass.remove(&site);
                }
            }
        }
    }

    /// The record store: a compare-and-set of a copy's state, refused once
    /// the record names another production host or epoch.
    fn record_copy(&mut self, node: usize, site: &str, state: Known) -> bool {
        if !self.reachable(node) {
            return false;
        }
        let me = self.name(node);
        let Some(record) = self.committed.clone() else { return false };
        let still =
            record.production.host.as_deref() == Some(me.as_str()) && Some(record.epoch) == self.nodes[node].production;
        if !still {
            return false;
        }
        let mut next = record.clone();
        let Some(entry) = next.copy_mut(site) else { return false };
        entry.state = match (state, &entry.state) {
            (Known::Current, _) => CopyRecordState::Current,
            (Known::Syncing, _) => CopyRecordState::Syncing,
            (Known::Stale, CopyRecordState::Stale { since, reason }) => {
                CopyRecordState::Stale { since: *since, reason: reason.clone() }
            }
            (Known::Stale, _) => CopyRecordState::Stale { since: self.now, reason: "simulated: link lost".to_string() },
        };
        if next != record {
            next.seq = record.seq + 1;
            self.commit(next, &format!("{me}'s replicator"));
        }
        self.nodes[node].known.insert(site.to_string(), state);
        true
    }

    /// The client writes to every node that serves (more than one breaks
    /// invariant 3, checked elsewhere).
    fn client(&mut self) {
        for node in 0..self.nodes.len() {
            if self.serving(node) {
                self.write(node);
            }
        }
    }

    fn write(&mut self, node: usize) {
        let sites: Vec<(String, Known)> =
            self.nodes[node].known.iter().map(|(site, state)| (site.clone(), *state)).collect();
        // Mark before ack: a current copy that is not reached holds the write
        // until it is recorded stale.
        if sites.iter().any(|(site, state)| *state == Known::Current && !self.link_up(node, site)) {
            self.stats.held += 1;
            return;
        }
        let me = self.name(node);
        let mine = self.specs[node].site.clone().expect("a member produces");
        if self.pass.contains_key(&mine) {
            self.fail(format!("{me} serves site {mine}'s store in the middle of a resync (no consistent image)"));
            return;
        }
        if self.store[&mine] != self.acked {
            let has = self.store[&mine];
            let acked = self.acked;
            self.fail(format!(
                "invariant 1 (DESIGN §4.1): {me} serves site {mine}'s store, which has write {has} of {acked} acknowledged"
            ));
            return;
        }
        self.acked += 1;
        let write = self.acked;
        self.store.insert(mine, write);
        for (site, state) in &sites {
            if *state == Known::Current {
                self.store.insert(site.clone(), write);
            }
        }
        self.stats.acks += 1;
        let epoch = self.nodes[node].production.unwrap_or(0);
        self.note(|| format!("{me} acks write {write} (epoch {epoch})"));
        let record = self.committed.clone();
        for copy in record.iter().flat_map(|record| record.copies.iter()) {
            if copy.state == CopyRecordState::Current && self.store[&copy.site] != write {
                let has = self.store[&copy.site];
                self.fail(format!(
                    "invariant 2/3 (mark before ack): {me} acknowledged write {write} while copy {} is recorded current with write {has}",
                    copy.site
                ));
            }
        }
    }

    /// Invariant 3, after every step.
    fn check_serving(&mut self) {
        let serving: Vec<usize> = (0..self.nodes.len()).filter(|&node| self.serving(node)).collect();
        if serving.len() > 1 {
            let names: Vec<String> = serving
                .iter()
                .map(|&node| format!("{} (epoch {})", self.name(node), self.nodes[node].production.unwrap_or(0)))
                .collect();
            self.fail(format!("invariant 3: {} serve at once", names.join(" and ")));
            return;
        }
        let Some(&node) = serving.first() else { return };
        let epoch = self.nodes[node].production.unwrap_or(0);
        let name = self.name(node);
        if epoch < self.max_served_epoch {
            let max = self.max_served_epoch;
            self.fail(format!("invariant 3: {name} serves at epoch {epoch} after epoch {max} was served"));
            return;
        }
        self.max_served_epoch = epoch;
        // A lease read before the newer epoch's commit lasts at most
        // lease_ms on a clock up to 1% slow.
        let bound = self.lease_ms * 1_000_000 / (1_000_000 - SKEW_MAX_PPM) + 1;
        if let Some((&newer, &at)) = self.epoch_committed.range(epoch + 1..).next() {
            if self.now >= at + bound {
                self.fail(format!(
                    "invariant 3: {name} serves at epoch {epoch} more than a lease after epoch {newer} was committed at {at} ms"
                ));
            }
        }
    }

    // ---- faults ----

    fn fault(&mut self) {
        let node = self.rng.index(self.nodes.len());
        let name = self.name(node);
        match self.rng.range(0, 100) {
            0..=19 if self.nodes[node].up => {
                self.stats.crashes += 1;
                self.stop(node, "crash (SIGKILL)");
            }
            20..=39 if self.running(node) => {
                self.touch();
                let long = self.rng.chance(40);
                let pause = if long { self.rng.range(2000, 9000) } else { self.rng.range(100, 2000) };
                self.nodes[node].paused_until = Some(self.now + pause);
                self.stats.pauses += 1;
                self.note(|| format!("{name} paused for {pause} ms (SIGSTOP)"));
                let life = self.nodes[node].life;
                self.after(pause, Action::Resume { node, life });
                self.check_leader();
            }
            40..=59 if !self.partitioned => {
                self.touch();
                loop {
                    for side in &mut self.side {
                        *side = u8::from(self.rng.chance(50));
                    }
                    if self.side.contains(&0) && self.side.contains(&1) {
                        break;
                    }
                }
                self.partitioned = true;
                self.stats.partitions += 1;
                let sides = self.side.clone();
                let names: Vec<String> =
                    self.specs.iter().zip(&sides).map(|(spec, side)| format!("{}:{side}", spec.name)).collect();
                self.note(|| format!("partition {}", names.join(" ")));
                self.check_leader();
                let heal = self.rng.range(1000, 15_000);
                self.after(heal, Action::Heal);
            }
            60..=69 if self.nodes[node].up && self.specs[node].site.is_some() => {
                self.stats.leaves += 1;
                self.nodes[node].leave_asked = true;
                self.note(|| format!("{name} asked to leave (SIGTERM)"));
            }
            // The operator forces a promotion when nobody has served for a
            // while (the production site lost with no current copy).
            80..=89 if self.nodes[node].up && !(0..self.nodes.len()).any(|other| self.serving(other)) => {
                let sites: Vec<String> =
                    self.topologies[node].copy_sites.iter().map(|site| site.name.clone()).collect();
                let site = sites[self.rng.index(sites.len())].clone();
                self.stats.promotions_asked += 1;
                self.note(|| format!("operator asks {name} for a forced promotion of {site} (--accept-data-loss)"));
                self.nodes[node].promote = Some(site);
            }
            70..=79 if self.nodes[node].up => {
                let sites: Vec<String> =
                    self.topologies[node].copy_sites.iter().map(|site| site.name.clone()).collect();
                let mut choices = sites;
                choices.push("east".to_string());
                let to = choices[self.rng.index(choices.len())].clone();
                self.stats.switchovers_asked += 1;
                self.note(|| format!("operator asks {name} for a switchover to {to}"));
                self.nodes[node].switchover = Some(to);
            }
            90..=99 => {
                let slow = self.rng.range(1000, 5000);
                self.nodes[node].slow_until = self.now + slow;
                self.note(|| format!("{name}'s quorum answers are slow for {slow} ms"));
            }
            _ => {}
        }
    }

    fn heal(&mut self) {
        if !self.partitioned {
            return;
        }
        self.touch();
        self.side.iter_mut().for_each(|side| *side = 0);
        self.partitioned = false;
        self.note(|| "partition heals".to_string());
        self.check_leader();
    }

    fn calm_down(&mut self) {
        self.calm = true;
        self.note(|| "calm: every fault ends".to_string());
        self.heal();
        for node in 0..self.nodes.len() {
            if self.paused(node) {
                self.resume(node);
            }
            if !self.nodes[node].up {
                let delay = self.rng.range(0, 1000);
                self.after(delay, Action::Start { node });
            }
            self.nodes[node].slow_until = 0;
        }
    }
}

fn brief_record(record: &GroupRecord) -> String {
    let copies: Vec<String> = record
        .copies
        .iter()
        .map(|copy| format!("{}:{}:{}", copy.site, copy.host.as_deref().unwrap_or("-"), copy.state.name()))
        .collect();
    let members: Vec<String> = record
        .members
        .iter()
        .map(|(name, entry)| format!("{name}/{}:{}", entry.incarnation, entry.state.name()))
        .collect();
    format!(
        "seq {} epoch {} gen {} prod {}:{} copies [{}] members [{}]{}",
        record.seq,
        record.epoch,
        record.generation,
        record.production.site,
        record.production.host.as_deref().unwrap_or("-"),
        copies.join(" "),
        members.join(" "),
        record.switchover.as_deref().map(|to| format!(" switchover->{to}")).unwrap_or_default()
    )
}

fn brief_event(event: &Event) -> String {
    match event {
        Event::Record(Some(record)) => format!("Record seq {}", record.seq),
        Event::Record(None) => "Record none".to_string(),
        Event::Written(record) => format!("Written seq {}", record.seq),
        Event::Liveness { live, settled } => format!("Liveness {live:?} settled {settled}"),
        other => format!("{other:?}"),
    }
}

fn brief_command(command: &Command) -> String {
    match command {
        Command::Write { expected, record, why } => format!("Write seq {} over {expected}: {why}", record.seq),
        other => format!("{other:?}"),
    }
}
