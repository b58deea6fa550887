//! The group core: membership, the join protocol, host selection and the
//! record's rules, as a pure state machine (the openraft/raft-rs style):
//! events in, commands out; no I/O, no clock, no threads. The shell
//! (`node.rs`) reads and writes the record, checks the store, watches
//! liveness and runs the roles, and feeds each outcome back as an event.
//!
//! ```text
//!             Record / Written / Conflict          Write{expected seq, record}
//!  shell ───▶ Access / Liveness / Leader    core ──▶ CheckAccess
//!             RoleFailed / Leave / RolesStopped      Start/StopProduction, SetCopyHost
//!                                                    Start/StopCopy, Fence, Exit
//! ```
//!
//! Seed 001's join protocol, with the record on quorum storage as the
//! channel: a joining member J reads the group state (the record; a new
//! group's first member creates it), writes itself `joining`, works out its
//! access to its site's store, then writes itself `joined` with it. The
//! leader of the quorum (one decider at a time; every decision is a
//! compare-and-set, so a deposed leader's stale decision is refused) makes
//! the host of each site the first live member in `backup_order` with
//! access, and forces out members it has not heard from (seed 004). Every
//! member reads the record and runs what it names it to: the production
//! host serves and mirrors to each copy site's host, a copy host applies.
//! "Mirroring starting" is the record naming a copy host; the production
//! host connects to it when it reads that.
//!
//! This issue keeps the production role where it is: a production host that
//! failed stays named until it rejoins (takeover after its lease ran out is
//! the failover issue's); one that left gracefully is replaced with
//! `epoch + 1` and `generation + 1`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use crate::record::{CopyRecordState, DrImage, DrImageState, GroupRecord, MemberEntry, MemberState, PromotedImage};

/// Added to the lease before a failed production host is replaced.
///
/// Why waiting `lease_ms + LEASE_MARGIN_MS` is enough for the old host to
/// have stopped serving. Its gate (engine `gate.rs`) is open until
/// `asked + lease` on its own clock, where `asked` is read before a renewal
/// that succeeded; a renewal is a linearizable read of the record naming it
/// joined production host at its epoch (`node.rs` `LeaseKeeper`; raft:
/// `ensure_linearizable`, a heartbeat round acknowledged by a quorum in the
/// leader's term, then the state machine caught up; etcd: a ReadIndex get).
/// Let `W` be the moment the record saying it is `forced-leaving` commits.
/// A read begun after `W` returns that record or a later one, so the
/// renewal fails (and the host fences itself): every successful renewal
/// was asked before `W`, and the old gate closes before `W + lease` by the
/// old host's clock. No node sees the record before `W`, and the shell
/// ticks after the call that brought it (`node.rs`), so the leader's
/// `forced_seen` is after `W` on its clock; it replaces the host at
/// `forced_seen + lease + margin`. None of this depends on raft's election
/// timeout: a deposed raft leader cannot answer a linearizable read.
///
/// The margin covers:
/// - clock rates: the two monotonic clocks are never compared, but may run
///   at different rates; 200 ms covers a difference of 28 % at the default
///   500 ms lease and 0.3 % at the longest, 60 s (clocks kept by NTP differ
///   by well under 0.1 %).
/// - a request that passed the gate just before it closed and reaches the
///   store after: the bitmap mark before its write is issued. That matters
///   only where the new host writes the same store (a takeover within the
///   production site); a copy promoted by a site failover serves at a
///   higher epoch, refuses the old epoch's frames, and resyncs the old site.
///
/// Beyond any margin: a host stopped between passing the gate and issuing
/// its write for longer than the margin (SIGSTOP, a frozen VM) lands that
/// write on a shared store after the takeover (only fencing at the store,
/// such as SCSI persistent reservations, stops that), and a host whose
/// monotonic clock stood still while it was suspended (Linux
/// CLOCK_MONOTONIC stops in system suspend) serves on until its next
/// renewal fails, up to a quarter lease after it resumes.
pub const LEASE_MARGIN_MS: u64 = 200;

/// A copy site as the core needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySite {
    /// Its name.
    pub name: String,
    /// `sync` or `async`.
    pub mode: String,
    /// In `StartProduction`: the record shows its store identical to the
    /// production store as this epoch starts (a clean hand-over), so only
    /// what is written from now on is resynced to it.
    pub identical: bool,
}

/// A member as the core needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its name.
    pub name: String,
    /// Its site.
    pub site: String,
    /// Lower hosts first.
    pub backup_order: u32,
    /// Its address.
    pub address: IpAddr,
}

/// The group as the config defines it, seen from one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// This node's name (a member or a witness).
    pub me: String,
    /// The production site.
    pub production_site: String,
    /// The copy sites, in config order.
    pub copy_sites: Vec<CopySite>,
    /// Every member.
    pub members: Vec<MemberInfo>,
    /// Every witness.
    pub witnesses: Vec<String>,
    /// The config digest (hex).
    pub config_digest: String,
    /// The port copy hosts listen on for replication.
    pub mirror_port: u16,
    /// The production host's lease: a failed production host is replaced
    /// only after this much more than its lease could last.
    pub lease_ms: u64,
}

impl Topology {
    fn member(&self, name: &str) -> Option<&MemberInfo> {
        self.members.iter().find(|member| member.name == name)
    }

    /// Members of `site`, first host first.
    fn site_members(&self, site: &str) -> Vec<&MemberInfo> {
        let mut members: Vec<&MemberInfo> = self.members.iter().filter(|member| member.site == site).collect();
        members.sort_by_key(|member| member.backup_order);
        members
    }

    fn my_site(&self) -> Option<&str> {
        self.member(&self.me).map(|member| member.site.as_str())
    }
}

/// What happened, as the shell tells the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The record as read now (`None`: the group has none yet).
    Record(Option<GroupRecord>),
    /// The core's write committed: the record is now this.
    Written(GroupRecord),
    /// The core's write was refused (the record changed meanwhile): the
    /// shell reads it again and sends `Record`.
    Conflict,
    /// The access check of this member's store: `Err` says why not.
    Access(Result<(), String>),
    /// Who was heard from lately (this node counts as live). `settled`:
    /// liveness has run long enough that silence means failure.
    Liveness {
        /// The live members and witnesses.
        live: BTreeSet<String>,
        /// Whether silence now means failure.
        settled: bool,
    },
    /// Whether this node leads the quorum now.
    Leader(bool),
    /// A role this node was told to start failed.
    RoleFailed {
        /// What failed, in words.
        why: String,
    },
    /// Time passed: milliseconds on this node's monotonic clock (never
    /// compared with another node's).
    Tick {
        /// Milliseconds since this node started.
        now_ms: u64,
    },
    /// The operator asked for a planned switchover to copy site `to`.
    Switchover {
        /// The copy site to produce from.
        to: String,
        /// The record's epoch this node showed when the operator asked
        /// (`None`: it had read none; the record the core holds then
        /// counts): a request that waited in a queue while the role moved
        /// is refused, not carried out after the move.
        asked_at: Option<u64>,
    },
    /// The operator asked for copy site `site` to be promoted although it
    /// may lack acknowledged writes (`--accept-data-loss`).
    Promote {
        /// The copy site.
        site: String,
    },
    /// A copy host refused this node's production epoch: another production
    /// host took over (this node may not have read that record yet).
    Deposed {
        /// What was refused, in words.
        why: String,
    },
    /// The copy store this member hosts holds a consistent image (or not:
    /// a resync pass is under way), and the way back to its last consistent
    /// image it keeps meanwhile; `None`: it hosts none.
    CopyStore {
        /// Whether the store is consistent.
        consistent: Option<bool>,
        /// Its DR image (kept, lost or none).
        dr_image: Option<DrImage>,
    },
    /// The wall clock (Unix milliseconds): only to state the age of a DR
    /// image a forced promotion rolls back to, never to time anything.
    WallClock {
        /// Unix milliseconds on this node's clock.
        unix_ms: u64,
    },
    /// The production role started; its store's token (32 hex digits).
    Serving {
        /// The token.
        store: String,
    },
    /// The operator asked this node to leave (SIGTERM).
    Leave,
    /// The roles stopped after `Leave`.
    RolesStopped,
}

/// What the shell does.
#[derive(Debug, Clone, PartialEq, Eq)]
// A few commands per step, moved once: boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Compare-and-set the record: write `record` if the stored one's seq
    /// is still `expected`; then send `Written` or `Conflict`.
    Write {
        /// The seq the record must still have.
        expected: u64,
        /// The new record (its seq is `expected + 1`).
        record: GroupRecord,
        /// What changed, for the log.
        why: String,
    },
    /// Check this member's access to its site's store; send `Access`.
    CheckAccess,
    /// Serve the production store and mirror it (epoch for the frames) to
    /// every copy site the record has now.
    StartProduction {
        /// The fencing epoch.
        epoch: u64,
        /// The record's generation.
        generation: u64,
        /// The copy sites and their modes, in the record's order.
        copies: Vec<CopySite>,
        /// A forced promotion of this member's syncing copy: its store is
        /// rolled back to this DR image before anything is served (and
        /// nothing is served when that fails).
        roll_back_to: Option<PromotedImage>,
    },
    /// Something the operator should know (why a copy is not promoted).
    Notice {
        /// What, in words.
        message: String,
    },
    /// Stop serving and mirroring: drain, flush, stop.
    StopProduction,
    /// Point the copy of `site` at its host (`None`: no host now).
    SetCopyHost {
        /// The copy site.
        site: String,
        /// Its host's replication address.
        address: Option<SocketAddr>,
    },
    /// Host this member's copy store.
    StartCopy,
    /// Stop hosting it.
    StopCopy,
    /// Forced out: stop serving at once (self-fence), before anything else.
    Fence {
        /// Why.
        why: String,
    },
    /// Stop every role gracefully (after `Leave`); send `RolesStopped`.
    StopRoles,
    /// This node is done: exit, with an error to show when it failed.
    Exit {
        /// Why it could not run, if it could not.
        error: Option<String>,
    },
}

/// Where this node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first record.
    Starting,
    /// Written `joining` (or about to); working out its access.
    Joining,
    /// In the group.
    Joined,
    /// Handing over its roles.
    Leaving,
    /// Roles stopped; writing `inactive`.
    Left,
    /// Exited.
    Done,
}

/// The core of one node.
#[derive(Debug)]
pub struct Core {
    topology: Topology,
    phase: Phase,
    record: Option<GroupRecord>,
    /// Whether the record was read at all (it may be absent).
    record_known: bool,
    /// A write is outstanding: no other until it is answered.
    writing: bool,
    incarnation: u64,
    access: Option<Result<(), String>>,
    live: BTreeSet<String>,
    settled: bool,
    leader: bool,
    /// The epoch the production role runs with, if it runs.
    production: Option<u64>,
    /// This node's clock, from the last `Tick`.
    now_ms: u64,
    /// When this node first saw each member `forced-leaving` (its clock).
    forced_seen: BTreeMap<String, u64>,
    /// Each copy site's address as last told to the production role.
    copy_hosts: BTreeMap<String, Option<SocketAddr>>,
    copy_running: bool,
    role_failure: Option<String>,
    /// A switchover the operator asked this node for, not yet recorded,
    /// and the record's epoch when it was asked: a request that meets a
    /// record whose production role moved meanwhile (another switchover
    /// that raced it and won, a failover) is refused, not carried out after.
    switchover_asked: Option<(String, Option<u64>)>,
    /// A forced promotion the operator asked this node for, not yet recorded.
    promotion_asked: Option<String>,
    /// The production store's token while this node serves it.
    serving_store: Option<String>,
    /// The epoch this node stopped serving at for a switchover, and its
    /// store's token: the hand-over it records.
    handing_over: Option<(u64, String)>,
    /// The copies a clean hand-over showed identical to this store as the
    /// epoch starts, taken out of the record for the next start only.
    claimed: Option<(u64, Vec<String>)>,
    /// Whether the copy store this member hosts is consistent, as its copy
    /// role last said (recorded in this member's entry).
    copy_store_consistent: Option<bool>,
    /// The DR image of that store, as its copy role last said.
    copy_store_dr_image: Option<DrImage>,
    /// The wall clock as last told (Unix milliseconds; 0: not told).
    unix_ms: u64,
    /// The epoch a copy host refused (this node was deposed): production is
    /// not started again at it or an older one.
    deposed_epoch: Option<u64>,
    /// A notice decided but not yet given, and the last one given.
    notice: Option<String>,
    noticed: Option<String>,
}

impl Core {
    /// A node about to join its group.
    pub fn new(topology: Topology) -> Core {
        let live = BTreeSet::from([topology.me.clone()]);
        Core {
            topology,
            phase: Phase::Starting,
            record: None,
            record_known: false,
            writing: false,
            incarnation: 0,
            access: None,
            live,
            settled: false,
            leader: false,
            production: None,
            now_ms: 0,
            forced_seen: BTreeMap::new(),
            copy_hosts: BTreeMap::new(),
            copy_running: false,
            role_failure: None,
            notice: None,
            noticed: None,
            switchover_asked: None,
            promotion_asked: None,
            serving_store: None,
            handing_over: None,
            claimed: None,
            copy_store_consistent: None,
            copy_store_dr_image: None,
            unix_ms: 0,
            deposed_epoch: None,
        }
    }

    /// The record as last read or written.
    pub fn record(&self) -> Option<&GroupRecord> {
        self.record.as_ref()
    }

    /// This node's membership phase, for status.
    pub fn phase(&self) -> &'static str {
        match self.phase {
            Phase::Starting => "starting",
            Phase::Joining => "joining",
            Phase::Joined => "joined",
            Phase::Leaving => "leaving",
            Phase::Left => "left",
            Phase::Done => "done",
        }
    }

    /// The last notice given (why a copy is not promoted, why a request
    /// was refused), for status.
    pub fn last_notice(&self) -> Option<&str> {
        self.noticed.as_deref()
    }

    /// Whether a write is outstanding.
    pub fn is_writing(&self) -> bool {
        self.writing
    }

    /// Take one event; return what to do, in order.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        if self.phase == Phase::Done {
            return Vec::new();
        }
        let mut commands = Vec::new();
        match event {
            Event::Record(record) => {
                self.record = record;
                self.record_known = true;
            }
            Event::Written(record) => {
                self.writing = false;
                self.record = Some(record);
                self.record_known = true;
            }
            Event::Conflict => {
                // The shell reads the record again; nothing is decided on
                // the old one meanwhile.
                self.writing = false;
                self.record_known = false;
                return commands;
            }
            Event::Access(result) => self.access = Some(result),
            Event::Liveness { live, settled } => {
                self.live = live;
                self.live.insert(self.topology.me.clone());
                self.settled = settled;
            }
            Event::Leader(leader) => self.leader = leader,
            Event::Tick { now_ms } => self.now_ms = now_ms,
            Event::Switchover { to, asked_at } => {
                let epoch = asked_at.or_else(|| self.record.as_ref().map(|record| record.epoch));
                self.switchover_asked = Some((to, epoch));
            }
            Event::Promote { site } => self.promotion_asked = Some(site),
            Event::Serving { store } => self.serving_store = Some(store),
            Event::CopyStore { consistent, dr_image } => {
                self.copy_store_consistent = consistent;
                self.copy_store_dr_image = dr_image;
            }
            Event::WallClock { unix_ms } => self.unix_ms = unix_ms,
            Event::Deposed { why } => {
                // Self-fence at once (seed 004); serve this epoch no more,
                // whatever an older record says.
                if let Some(epoch) = self.production {
                    self.deposed_epoch = Some(epoch);
                    commands.extend(self.fence_if_serving(&format!("deposed: {why}")));
                }
            }
            Event::RoleFailed { why } => {
                self.production = None;
                self.copy_running = false;
                self.copy_hosts.clear();
                self.role_failure = Some(why);
            }
            Event::Leave => {
                if matches!(self.phase, Phase::Starting | Phase::Joining | Phase::Joined) {
                    self.phase = Phase::Leaving;
                    commands.push(Command::StopRoles);
                }
            }
            Event::RolesStopped => {
                self.production = None;
                self.copy_running = false;
                self.copy_hosts.clear();
                if self.phase == Phase::Leaving {
                    self.phase = Phase::Left;
                }
            }
        }
        self.decide(&mut commands);
        commands
    }

    /// Everything that follows from what the core knows now.
    fn decide(&mut self, commands: &mut Vec<Command>) {
        if !self.record_known {
            return;
        }
        self.note_forced();
        let recorded_digest = self.record.as_ref().map(|record| record.config_digest.clone());
        if let Some(recorded_digest) = recorded_digest {
            if recorded_digest != self.topology.config_digest {
                commands.extend(self.fence_if_serving("the group config changed under this node"));
                commands.push(Command::Exit {
                    error: Some(format!(
                        "this member's group config (digest {}) differs from the group's (digest {}): every member needs the same file",
                        self.topology.config_digest, recorded_digest
                    )),
                });
                self.phase = Phase::Done;
                return;
            }
        }
        if self.forced_out() {
            commands.extend(self.fence_if_serving("the group forced this member out"));
            self.phase = Phase::Starting;
            self.access = None;
        }
        if !self.writing {
            let before = self.record.clone();
            let mut record = self.record.clone().unwrap_or_else(|| {
                GroupRecord::new(&self.topology.config_digest, &self.topology.production_site, &self.copy_site_modes())
            });
            let mut why = Vec::new();
            self.own_rules(&mut record, &mut why, commands);
            if self.leader && matches!(self.phase, Phase::Joining | Phase::Joined) {
                self.leader_rules(&mut record, &mut why);
            }
            if before.as_ref() != Some(&record) {
                let expected = before.as_ref().map_or(0, |record| record.seq);
                record.seq = expected + 1;
                self.writing = true;
                commands.push(Command::Write { expected, record, why: why.join("; ") });
                return;
            }
        }
        if self.phase == Phase::Done {
            return;
        }
        if self.phase == Phase::Joined && !self.writing {
            self.role_rules(commands);
        }
        if let Some(message) = self.notice.take() {
            if self.noticed.as_ref() != Some(&message) {
                self.noticed = Some(message.clone());
                commands.push(Command::Notice { message });
            }
        }
    }

    /// Remember when each forced-out member was first seen so (by this
    /// node's clock: a takeover waits out the lease on one clock only).
    fn note_forced(&mut self) {
        let Some(record) = &self.record else { return };
        let now = self.now_ms;
        self.forced_seen.retain(|name, _| record.member_state(name) == MemberState::ForcedLeaving);
        for (name, entry) in &record.members {
            if entry.state == MemberState::ForcedLeaving {
                self.forced_seen.entry(name.clone()).or_insert(now);
            }
        }
    }

    fn copy_site_modes(&self) -> Vec<(String, String)> {
        self.topology.copy_sites.iter().map(|site| (site.name.clone(), site.mode.clone())).collect()
    }

    /// Whether the record says this incarnation was forced out.
    fn forced_out(&self) -> bool {
        let Some(record) = &self.record else { return false };
        let Some(me) = record.members.get(&self.topology.me) else { return false };
        matches!(self.phase, Phase::Joined | Phase::Joining)
            && me.incarnation == self.incarnation
            && me.state == MemberState::ForcedLeaving
    }

    fn fence_if_serving(&mut self, why: &str) -> Vec<Command> {
        if self.production.is_none() && !self.copy_running {
            return Vec::new();
        }
        self.production = None;
        self.copy_running = false;
        self.copy_hosts.clear();
        vec![Command::Fence { why: why.to_string() }]
    }

    /// This node's own entry: joining, joined, inactive.
    fn own_rules(&mut self, record: &mut GroupRecord, why: &mut Vec<String>, commands: &mut Vec<Command>) {
        let me = self.topology.me.clone();
        let witness = self.topology.witnesses.contains(&me);
        match self.phase {
            Phase::Starting => {
                let incarnation = record.members.get(&me).map_or(0, |entry| entry.incarnation) + 1;
                self.incarnation = incarnation;
                record.members.insert(me.clone(), MemberEntry::joining(incarnation));
                why.push(format!("{me} joining (incarnation {incarnation})"));
                self.phase = Phase::Joining;
                if !witness {
                    commands.push(Command::CheckAccess);
                }
            }
            Phase::Joining => {
                let incarnation = self.incarnation;
                let recorded = record.members.get(&me).map_or(0, |entry| entry.incarnation);
                if recorded > incarnation {
                    commands.push(Command::Exit {
                        error: Some(format!(
                            "another node runs as member {me} (incarnation {recorded} in the record, this one is {incarnation}): stop it first"
                        )),
                    });
                    self.phase = Phase::Done;
                    return;
                }
                if recorded < incarnation {
                    // The `joining` write did not land (a conflict): again.
                    record.members.insert(me.clone(), MemberEntry::joining(incarnation));
                    why.push(format!("{me} joining (incarnation {incarnation})"));
                    return;
                }
                let access = if witness { Some(Ok(())) } else { self.access.clone() };
                if let (Some(access), Some(entry)) = (access, record.members.get_mut(&me)) {
                    entry.state = MemberState::Joined;
                    entry.access = !witness && access.is_ok();
                    entry.access_problem = access.err();
                    why.push(match &entry.access_problem {
                        None if witness => format!("{me} joined (witness)"),
                        None => format!("{me} joined with access to its store"),
                        Some(problem) => format!("{me} joined without access to its store: {problem}"),
                    });
                    self.phase = Phase::Joined;
                }
            }
            Phase::Joined => {
                self.claim_hand_over(record, why);
                let consistent = self.copy_store_consistent;
                let dr_image = self.copy_store_dr_image;
                if let Some(entry) = record.members.get_mut(&me).filter(|entry| entry.incarnation == self.incarnation) {
                    if entry.store_consistent != consistent {
                        entry.store_consistent = consistent;
                        why.push(match consistent {
                            Some(true) => format!("{me}'s copy store holds a consistent image"),
                            Some(false) => format!("{me}'s copy store is in the middle of a resync"),
                            None => format!("{me} hosts no copy store"),
                        });
                    }
                    if entry.dr_image != dr_image {
                        entry.dr_image = dr_image;
                        why.push(match dr_image {
                            Some(DrImage { state: DrImageState::Kept, generation, taken_at_ms }) => format!(
                                "{me}'s copy store keeps a DR image (generation {generation}, taken at {taken_at_ms})"
                            ),
                            Some(DrImage { state: DrImageState::Lost, .. }) => {
                                format!("{me}'s copy store keeps no DR image during its resync")
                            }
                            _ => format!("{me}'s copy store needs no DR image"),
                        });
                    }
                }
                if let Some((to, asked_at)) = self.switchover_asked.clone() {
                    // Kept until a record carrying it is read (a write of it
                    // may conflict and be redone).
                    match record.copy(&to) {
                        _ if record.switchover.as_deref() == Some(to.as_str()) => self.switchover_asked = None,
                        _ if asked_at.is_some_and(|epoch| epoch != record.epoch) => {
                            self.switchover_asked = None;
                            self.notice = Some(format!(
                                "switchover to {to} refused: the production role moved while it was asked for (now \
                                 site {}, epoch {}); ask again if it is still wanted",
                                record.production.site, record.epoch
                            ));
                        }
                        Some(copy) if copy.state != CopyRecordState::Current => {
                            self.switchover_asked = None;
                            self.notice = Some(format!(
                                "switchover to {to} refused: its copy is {} (only a current copy takes over)",
                                copy.state.name()
                            ));
                        }
                        Some(_) if record.switchover.is_none() => {
                            record.switchover = Some(to.clone());
                            why.push(format!("switchover to site {to} asked for"));
                        }
                        Some(_) => {
                            self.switchover_asked = None;
                            self.notice = Some(format!(
                                "a switchover to {} is under way already",
                                record.switchover.as_deref().unwrap_or("?")
                            ))
                        }
                        None => {
                            self.switchover_asked = None;
                            self.notice = Some(format!(
                                "switchover to {to} refused: it is not a copy site of this group (production site: {})",
                                record.production.site
                            ))
                        }
                    }
                }
                if let Some(site) = self.promotion_asked.take() {
                    match record.copy(&site) {
                        None => {
                            self.notice = Some(format!(
                            "promotion of {site} refused: it is not a copy site of this group (production site: {})",
                            record.production.site
                        ))
                        }
                        Some(_) if record.promotion.as_deref() == Some(site.as_str()) => {}
                        Some(_) => {
                            record.promotion = Some(site.clone());
                            why.push(format!("forced promotion of site {site} asked for (--accept-data-loss)"));
                        }
                    }
                }
                let target_current = record
                    .switchover
                    .as_deref()
                    .and_then(|to| record.copy(to))
                    .is_some_and(|copy| copy.state == CopyRecordState::Current);
                if target_current && record.production.host.as_deref() == Some(me.as_str()) {
                    // Planned: stop serving first (drain, flush here and on
                    // every copy that follows every write), then hand over
                    // with this store's token. A copy whose stop was not
                    // clean (a write in flight, its final flush not
                    // acknowledged) is recorded stale by the stop, so it is
                    // no longer current when the leader promotes: a stale
                    // target drops the switchover, and only current copies
                    // are claimed identical. A failed final flush of this
                    // store gives it a new token (the shell), so a hand-over
                    // naming the old one buys no trust.
                    let serving = self.production.take();
                    if serving.is_some() {
                        commands.push(Command::StopProduction);
                        self.copy_hosts.clear();
                    }
                    if serving == Some(record.epoch) {
                        if let Some(store) = self.serving_store.take() {
                            self.handing_over = Some((record.epoch, store));
                        }
                    }
                    // Kept for a retry of this write (a conflict): the role
                    // stopped at this epoch either way.
                    record.handover =
                        self.handing_over.clone().filter(|(epoch, _)| *epoch == record.epoch).map(|(epoch, store)| {
                            crate::record::Handover { site: record.production.site.clone(), store, epoch }
                        });
                    record.production.host = None;
                    why.push(format!(
                        "{me} stopped serving and hands the production role over to site {}",
                        record.switchover.as_deref().unwrap_or("?")
                    ));
                }
                let incarnation = self.incarnation;
                let access = if witness { Ok(()) } else { self.access.clone().unwrap_or(Ok(())) };
                match record.members.get_mut(&me) {
                    // The `joined` write did not land (a conflict): again.
                    Some(entry) if entry.incarnation == incarnation && entry.state == MemberState::Joining => {
                        entry.state = MemberState::Joined;
                        entry.access = !witness && access.is_ok();
                        entry.access_problem = access.err();
                        why.push(format!("{me} joined"));
                    }
                    _ => {}
                }
                if let (Some(problem), Some(entry)) = (self.role_failure.take(), record.members.get_mut(&me)) {
                    entry.access = false;
                    entry.access_problem = Some(problem.clone());
                    why.push(format!("{me} cannot host its store: {problem}"));
                }
            }
            Phase::Leaving => {
                if let Some(entry) = record.members.get_mut(&me) {
                    if entry.state != MemberState::Leaving && entry.incarnation == self.incarnation {
                        entry.state = MemberState::Leaving;
                        why.push(format!("{me} leaving"));
                    }
                }
            }
            Phase::Left => {
                if let Some(entry) = record.members.get_mut(&me) {
                    if entry.incarnation == self.incarnation {
                        entry.state = MemberState::Inactive;
                    }
                }
                if record.production.host.as_deref() == Some(me.as_str()) {
                    record.production.host = None;
                }
                for copy in &mut record.copies {
                    if copy.host.as_deref() == Some(me.as_str()) {
                        copy.host = None;
                    }
                }
                why.push(format!("{me} left; its roles are handed on"));
                commands.push(Command::Exit { error: None });
                self.phase = Phase::Done;
            }
            Phase::Done => {}
        }
    }

    /// About to serve an epoch whose record shows copies identical to this
    /// store (a clean hand-over): take the claim out of the record first
    /// and keep it for this start only, so that a second start of the same
    /// epoch (after a crash, a restart, a fence) resyncs those copies from
    /// its bitmap, or in full, instead of trusting a claim that writes made
    /// since may have broken.
    fn claim_hand_over(&mut self, record: &mut GroupRecord, why: &mut Vec<String>) {
        let me = self.topology.me.as_str();
        if record.production.host.as_deref() != Some(me) || self.production.is_some() {
            return;
        }
        let epoch = record.epoch;
        let mut claimed = Vec::new();
        for copy in record.copies.iter_mut().filter(|copy| copy.identical_epoch == Some(epoch)) {
            copy.identical_epoch = None;
            claimed.push(copy.site.clone());
        }
        if !claimed.is_empty() {
            why.push(format!(
                "{me} starts epoch {epoch} with {} identical to its store (a clean hand-over)",
                claimed.join(", ")
            ));
            self.claimed = Some((epoch, claimed));
        }
    }

    /// Whether `name` may host: joined, with access, heard from (until
    /// liveness has settled, silence is not held against it).
    fn can_host(&self, record: &GroupRecord, name: &str) -> bool {
        record.members.get(name).is_some_and(|entry| entry.state == MemberState::Joined && entry.access)
            && (self.live.contains(name) || !self.settled)
    }

    fn candidate(&self, record: &GroupRecord, site: &str) -> Option<String> {
        self.topology
            .site_members(site)
            .into_iter()
            .find(|member| self.can_host(record, &member.name))
            .map(|member| member.name.clone())
    }

    /// The leader's decisions: failed members out, hosts chosen.
    fn leader_rules(&mut self, record: &mut GroupRecord, why: &mut Vec<String>) {
        if self.settled {
            for (name, entry) in record.members.iter_mut() {
                let active = matches!(entry.state, MemberState::Joining | MemberState::Joined | MemberState::Leaving);
                if active && !self.live.contains(name) {
                    entry.state = MemberState::ForcedLeaving;
                    why.push(format!("{name} forced out: not heard from"));
                }
            }
        }
        let copy_sites: Vec<String> = record.copies.iter().map(|copy| copy.site.clone()).collect();
        for site in &copy_sites {
            let current = record.copy(site).and_then(|copy| copy.host.clone());
            if current.as_deref().is_some_and(|host| self.can_host(record, host)) {
                continue;
            }
            let next = self.candidate(record, site);
            if next != current {
                why.push(format!(
                    "copy site {} hosted by {}",
                    site,
                    next.as_deref().unwrap_or("nobody (no live member with access)")
                ));
                if let Some(copy) = record.copy_mut(site) {
                    copy.host = next;
                }
            }
        }
        let host = record.production.host.clone();
        let replace = match host.as_deref() {
            None => true,
            Some(host) => match record.member_state(host) {
                MemberState::Inactive => true,
                // Failed: replaced once its lease has certainly run out (it
                // renews only while the record names it, so no renewal
                // after the forced-out record was committed can succeed).
                MemberState::ForcedLeaving => self
                    .forced_seen
                    .get(host)
                    .is_some_and(|seen| self.now_ms.saturating_sub(*seen) >= self.topology.lease_ms + LEASE_MARGIN_MS),
                _ => false,
            },
        };
        if let Some(to) = record.switchover.clone() {
            self.switch_over(record, &to, why);
            return;
        }
        let production_site = record.production.site.clone();
        let failed = host.as_deref().is_some_and(|host| record.member_state(host) == MemberState::ForcedLeaving);
        let down = replace && self.candidate(record, &production_site).is_none();
        if let Some(site) = record.promotion.clone() {
            if failed && !replace {
                // Its host failed; the promotion waits out its lease.
                return;
            }
            self.force_promotion(record, &site, down, why);
            return;
        }
        // No member of the production site can serve: its host failed and
        // its lease ran out, or (once the site has served) every member left
        // and went silent, or is there without access to the store.
        if down && (failed || (self.settled && !record.history.is_empty() && self.site_gone(record, &production_site)))
        {
            self.fail_over(record, why);
            return;
        }
        if replace {
            if let Some(next) = self.candidate(record, &production_site) {
                if !record.history.is_empty() {
                    // Another host produced before: a new generation.
                    record.generation += 1;
                }
                record.epoch += 1;
                record.production.host = Some(next.clone());
                record.push_history(&next);
                match host.as_deref() {
                    Some(old) if record.member_state(old) == MemberState::ForcedLeaving => why.push(format!(
                        "{old} failed and its lease ran out: {next} takes over the production site (epoch {}, generation {})",
                        record.epoch, record.generation
                    )),
                    _ => why.push(format!("{next} hosts the production site (epoch {})", record.epoch)),
                }
            }
        }
    }

    /// Whether no member of `site` will serve without a failover: each is
    /// silent, or there without access to the store.
    fn site_gone(&self, record: &GroupRecord, site: &str) -> bool {
        self.topology.site_members(site).iter().all(|member| {
            !self.live.contains(&member.name)
                || record
                    .members
                    .get(&member.name)
                    .is_some_and(|entry| entry.state == MemberState::Joined && !entry.access)
        })
    }

    /// The production site has no member left to serve (its host failed and
    /// its lease ran out): promote the first sync copy site whose copy is
    /// `current` and whose host is live (seed 003). A stale or syncing copy
    /// is never promoted (invariant 2), nor an async one, which may lack
    /// acknowledged writes (that takes `crossmirror promote
    /// --accept-data-loss`); the old production site becomes a copy site,
    /// resynced in full from the new production (its store may hold writes
    /// the promoted copy never got: never merged).
    fn fail_over(&mut self, record: &mut GroupRecord, why: &mut Vec<String>) {
        let old_site = record.production.site.clone();
        let promotable = record.copies.iter().position(|copy| {
            copy.mode == "sync"
                && copy.state == CopyRecordState::Current
                && copy.host.as_deref().is_some_and(|host| self.can_host(record, host))
        });
        let Some(index) = promotable else {
            let states: Vec<String> = record
                .copies
                .iter()
                .map(|copy| match &copy.state {
                    CopyRecordState::Current if copy.mode != "sync" => format!(
                        "{} is an async copy and may lack acknowledged writes (to promote it anyway: \
                         crossmirror promote --site {} --accept-data-loss)",
                        copy.site, copy.site
                    ),
                    CopyRecordState::Current => format!("{} has no live host", copy.site),
                    CopyRecordState::Stale { since, reason } => {
                        format!("{} is stale since {since} ({reason})", copy.site)
                    }
                    CopyRecordState::Syncing => {
                        let kept = copy
                            .host
                            .as_deref()
                            .and_then(|host| record.members.get(host))
                            .and_then(|entry| entry.dr_image)
                            .filter(|image| image.state == DrImageState::Kept);
                        match kept {
                            Some(image) => format!(
                                "{} is syncing (no consistent image; its host keeps the DR image of generation {} \
                                 taken at {}: to promote it to that image, losing every write since, crossmirror \
                                 promote --site {} --accept-data-loss)",
                                copy.site, image.generation, image.taken_at_ms, copy.site
                            ),
                            None => format!("{} is syncing (no consistent image)", copy.site),
                        }
                    }
                })
                .collect();
            self.notice = Some(format!(
                "the production site {old_site} has no live member, and no copy may be promoted: {}; waiting for {old_site} to return",
                if states.is_empty() { "there is no copy site".to_string() } else { states.join("; ") }
            ));
            return;
        };
        self.promote(record, index, "the production site failed", why);
    }

    /// `crossmirror promote --site SITE --accept-data-loss`: promote a copy
    /// that may lack acknowledged writes (an async copy, or one recorded
    /// stale, whose store holds a consistent image of when it stopped
    /// following every write; a syncing one only to the DR image its host
    /// says it keeps, which it rolls back to before serving; never one
    /// never synced),
    /// once the production site is down (its host's lease ran out) and no
    /// current sync copy could take over without loss. The new generation
    /// is a fork, recorded in the history: the old production site and
    /// every other copy may hold writes of the abandoned line, so each is
    /// recorded stale with no known store and resynced in full from the new
    /// production (their diverged writes are overwritten, never merged).
    fn force_promotion(&mut self, record: &mut GroupRecord, site: &str, down: bool, why: &mut Vec<String>) {
        record.promotion = None;
        let refuse = |core: &mut Core, why: &mut Vec<String>, reason: String| {
            let refusal = format!("forced promotion of {site} refused: {reason}");
            why.push(refusal.clone());
            core.notice = Some(refusal);
        };
        if !down {
            let by = record.production.host.clone().unwrap_or_else(|| "a member that can serve".to_string());
            return refuse(
                self,
                why,
                format!(
                    "the production site {} still has {by} (its lease has not run out, or it can serve): \
                     a planned move is `crossmirror switchover`",
                    record.production.site
                ),
            );
        }
        let Some(index) = record.copies.iter().position(|copy| copy.site == site) else {
            return refuse(self, why, "not a copy site".to_string());
        };
        let copy = &record.copies[index];
        let host_entry = copy.host.as_deref().and_then(|host| record.members.get(host));
        let host_says = host_entry.and_then(|entry| entry.store_consistent);
        // In the middle of a resync pass (recorded syncing, or recorded stale
        // when its link dropped mid-pass): its store is no image, but its
        // host may keep a way back to the one it held when the pass began
        // (the undo journal). Promoted only to that image, which its host
        // rolls back to before it serves; refused when it keeps none.
        let mid_pass = copy.state == CopyRecordState::Syncing || host_says == Some(false);
        let mut dr_image = None;
        if mid_pass {
            let what = if copy.state == CopyRecordState::Syncing {
                "its copy is syncing"
            } else {
                "its host says its store is in the middle of a resync"
            };
            let published = host_entry.and_then(|entry| entry.dr_image);
            let Some(image) = published.filter(|image| image.state == DrImageState::Kept) else {
                let kept = match published {
                    Some(DrImage { state: DrImageState::Lost, .. }) => "its host says its DR image is lost",
                    Some(_) => "its host says it keeps no DR image",
                    None => "its host has not said it keeps a DR image",
                };
                return refuse(
                    self,
                    why,
                    format!(
                        "{what}: no consistent image of it is known to the group ({kept}; a syncing copy is \
                         promoted only to the DR image its host keeps during a resync)"
                    ),
                );
            };
            // An image older than a fork may be of the abandoned line.
            let forked = record.history.iter().rev().find(|entry| entry.fork.is_some()).map(|entry| entry.generation);
            if let Some(forked) = forked.filter(|forked| image.generation < *forked) {
                return refuse(
                    self,
                    why,
                    format!(
                        "{what} and its DR image is of generation {}, older than the fork that started generation \
                         {forked}: it may hold writes of the abandoned line",
                        image.generation
                    ),
                );
            }
            dr_image = Some(image);
        }
        if dr_image.is_none() && copy.store.bytes().all(|digit| digit == b'0') {
            return refuse(
                self,
                why,
                "its store was never synced from this volume's line (no store token is recorded for it)".to_string(),
            );
        }
        if !copy.host.as_deref().is_some_and(|host| self.can_host(record, host)) {
            return refuse(self, why, "it has no live member with access to its store".to_string());
        }
        let lossless = record.copies.iter().find(|other| {
            other.site != site
                && other.mode == "sync"
                && other.state == CopyRecordState::Current
                && other.host.as_deref().is_some_and(|host| self.can_host(record, host))
        });
        if let Some(lossless) = lossless {
            return refuse(
                self,
                why,
                format!("copy site {} is current (sync) and loses nothing: it takes over instead", lossless.site),
            );
        }
        let given_up = match (&copy.state, dr_image) {
            (_, Some(image)) => {
                let age = match self.unix_ms.checked_sub(image.taken_at_ms) {
                    Some(age) if self.unix_ms > 0 => format!("{:.1} s", age as f64 / 1000.0),
                    _ => "unknown".to_string(),
                };
                format!(
                    "its store is rolled back to its DR image of generation {} taken at {} (Unix ms, the copy \
                     host's clock; the image is of that moment or earlier), age {age} at this promotion: that age \
                     is the RPO of the image (at least); every write acknowledged after it",
                    image.generation, image.taken_at_ms
                )
            }
            (CopyRecordState::Stale { since, reason }, None) => {
                format!("every write acknowledged since its copy went stale at {since} ({reason})")
            }
            _ => "the acknowledged writes not yet shipped to this async copy".to_string(),
        };
        let (old_site, old_generation) = (record.production.site.clone(), record.generation);
        self.promote(record, index, "forced promotion (--accept-data-loss)", why);
        if let Some(image) = dr_image {
            record.promoted_image = Some(PromotedImage {
                host: record.production.host.clone().unwrap_or_default(),
                epoch: record.epoch,
                generation: image.generation,
                taken_at_ms: image.taken_at_ms,
            });
        }
        let fork = format!(
            "forced promotion of {site} over {old_site} (generation {old_generation} forked): {given_up} given up; \
             the other sites are resynced in full from {site}"
        );
        if let Some(entry) = record.history.last_mut() {
            entry.fork = Some(fork.clone());
        }
        for other in record.copies.iter_mut() {
            other.state = CopyRecordState::Stale {
                since: 0,
                reason: format!(
                    "generation {old_generation} was forked by the forced promotion of {site}: resynced in full"
                ),
            };
            other.store = "0".repeat(32);
            other.identical_epoch = None;
        }
        self.notice = Some(fork);
    }

    /// A planned switchover to copy site `to`: once the production host has
    /// stopped serving (it recorded no host), promote `to` if its copy is
    /// current; a switchover that cannot happen is dropped, said why.
    fn switch_over(&mut self, record: &mut GroupRecord, to: &str, why: &mut Vec<String>) {
        let Some(index) = record.copies.iter().position(|copy| copy.site == to) else {
            record.switchover = None;
            record.handover = None;
            why.push(format!("switchover to {to} dropped: not a copy site"));
            return;
        };
        let copy = &record.copies[index];
        let ready = copy.state == CopyRecordState::Current
            && copy.host.as_deref().is_some_and(|host| self.can_host(record, host));
        if !ready {
            record.switchover = None;
            record.handover = None;
            why.push(format!(
                "switchover to {to} dropped: its copy is {} with host {}; the production site keeps serving",
                copy.state.name(),
                copy.host.as_deref().unwrap_or("none")
            ));
            return;
        }
        if record.production.host.is_some() {
            // The production host has not handed over yet.
            return;
        }
        record.switchover = None;
        self.promote(record, index, "planned switchover", why);
    }

    /// Make copy site `index` the production site; the old production site
    /// becomes a copy site. After a clean hand-over (its host stopped for a
    /// switchover, drained and flushed, with this epoch's token recorded)
    /// its store equals every current copy's: it stays current, and the new
    /// production host resyncs to it only what it writes from now on.
    /// Otherwise (a failure) it may hold writes the promoted copy never got:
    /// recorded stale with no known store, it is resynced in full.
    fn promote(&mut self, record: &mut GroupRecord, index: usize, cause: &str, why: &mut Vec<String>) {
        let old_site = record.production.site.clone();
        let handed_over = record
            .handover
            .take()
            .filter(|handover| handover.site == old_site && handover.epoch == record.epoch)
            .map(|handover| handover.store);
        let promoted = record.copies.remove(index);
        let host = promoted.host.clone().expect("a promotable copy has a host");
        record.promoted_image = None;
        record.production = crate::record::Production { site: promoted.site.clone(), host: Some(host.clone()) };
        record.epoch += 1;
        record.generation += 1;
        record.push_history(&host);
        let identical_epoch = handed_over.as_ref().map(|_| record.epoch);
        for copy in record.copies.iter_mut().filter(|copy| copy.state == CopyRecordState::Current) {
            copy.identical_epoch = identical_epoch;
        }
        record.copies.insert(
            index,
            crate::record::CopyEntry {
                site: old_site.clone(),
                host: None,
                mode: promoted.mode.clone(),
                state: match &handed_over {
                    Some(_) => CopyRecordState::Current,
                    None => CopyRecordState::Stale {
                        since: 0,
                        reason: format!(
                            "site {} took over the production role ({cause}): resynced in full from it",
                            promoted.site
                        ),
                    },
                },
                generation: record.generation,
                slot: promoted.slot,
                store: handed_over.unwrap_or_else(|| "0".repeat(32)),
                identical_epoch,
            },
        );
        why.push(format!(
            "{cause}: copy site {} ({}) promoted over {old_site}, {host} serves (epoch {}, generation {})",
            promoted.site,
            promoted.state.name(),
            record.epoch,
            record.generation
        ));
    }

    /// Start, stop and point the roles the record names this node to.
    fn role_rules(&mut self, commands: &mut Vec<Command>) {
        let Some(record) = self.record.clone() else { return };
        let me = self.topology.me.as_str();
        let joined = record
            .members
            .get(me)
            .is_some_and(|entry| entry.state == MemberState::Joined && entry.incarnation == self.incarnation);
        // A member whose entry says it cannot use its store (its production
        // role failed to start: a forced promotion's rollback that failed)
        // does not try again and again: it serves nothing until it restarts.
        let usable = record.members.get(me).is_some_and(|entry| entry.access);
        let produce = joined
            && usable
            && record.production.host.as_deref() == Some(me)
            && self.deposed_epoch.is_none_or(|deposed| record.epoch > deposed);
        let my_site = self.topology.my_site().map(str::to_string);
        let host_copy = joined
            && my_site
                .as_deref()
                .and_then(|site| record.copy(site))
                .is_some_and(|copy| copy.host.as_deref() == Some(me));
        // The store is the copy role's until it stops: stop it first.
        if !host_copy && self.copy_running {
            commands.push(Command::StopCopy);
            self.copy_running = false;
        }
        match (self.production, produce) {
            (Some(epoch), true) if epoch == record.epoch => {}
            (Some(_), _) => {
                commands.push(Command::StopProduction);
                self.production = None;
                self.copy_hosts.clear();
            }
            _ => {}
        }
        if produce && self.production.is_none() {
            // Used for this start only.
            let claimed = self.claimed.take();
            let copies = record
                .copies
                .iter()
                .map(|copy| CopySite {
                    name: copy.site.clone(),
                    mode: copy.mode.clone(),
                    identical: claimed
                        .as_ref()
                        .is_some_and(|(epoch, sites)| *epoch == record.epoch && sites.contains(&copy.site)),
                })
                .collect();
            self.serving_store = None;
            let roll_back_to =
                record.promoted_image.clone().filter(|image| image.host == me && image.epoch == record.epoch);
            commands.push(Command::StartProduction {
                epoch: record.epoch,
                generation: record.generation,
                copies,
                roll_back_to,
            });
            self.production = Some(record.epoch);
        }
        if produce {
            for copy in &record.copies {
                let address = copy
                    .host
                    .as_deref()
                    .filter(|host| record.member_state(host) == MemberState::Joined)
                    .and_then(|host| self.topology.member(host))
                    .map(|member| SocketAddr::new(member.address, self.topology.mirror_port));
                if self.copy_hosts.get(&copy.site) != Some(&address) {
                    self.copy_hosts.insert(copy.site.clone(), address);
                    commands.push(Command::SetCopyHost { site: copy.site.clone(), address });
                }
            }
        }
        if host_copy && !self.copy_running {
            commands.push(Command::StartCopy);
            self.copy_running = true;
        }
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
