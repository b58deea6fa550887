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

use crate::record::{CopyRecordState, GroupRecord, MemberEntry, MemberState};

/// Added to the lease before a failed production host is replaced: clock
/// rate differences between hosts and the time a renewal takes.
pub const LEASE_MARGIN_MS: u64 = 500;

/// A copy site as the core needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySite {
    /// Its name.
    pub name: String,
    /// `sync` or `async`.
    pub mode: String,
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
    },
    /// The operator asked this node to leave (SIGTERM).
    Leave,
    /// The roles stopped after `Leave`.
    RolesStopped,
}

/// What the shell does.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        /// The copy sites and their modes, in the record's order.
        copies: Vec<CopySite>,
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
            Event::Switchover { to } => {
                self.switchover_asked = Some((to, self.record.as_ref().map(|record| record.epoch)));
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
                record.members.insert(
                    me.clone(),
                    MemberEntry { state: MemberState::Joining, incarnation, access: false, access_problem: None },
                );
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
                    record.members.insert(
                        me.clone(),
                        MemberEntry { state: MemberState::Joining, incarnation, access: false, access_problem: None },
                    );
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
                let target_current = record
                    .switchover
                    .as_deref()
                    .and_then(|to| record.copy(to))
                    .is_some_and(|copy| copy.state == CopyRecordState::Current);
                if target_current && record.production.host.as_deref() == Some(me.as_str()) {
                    // Planned: stop serving first (drain, flush: every sync
                    // copy has every acknowledged write), then hand over.
                    if self.production.take().is_some() {
                        commands.push(Command::StopProduction);
                        self.copy_hosts.clear();
                    }
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
        if replace && failed && self.candidate(record, &production_site).is_none() {
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

    /// The production site has no member left to serve (its host failed and
    /// its lease ran out): promote the first copy site whose copy is
    /// `current` and whose host is live (seed 003). A stale or syncing copy
    /// is never promoted (invariant 2); the old production site becomes a
    /// copy site, resynced in full from the new production (its store may
    /// hold writes the promoted copy never got: never merged).
    fn fail_over(&mut self, record: &mut GroupRecord, why: &mut Vec<String>) {
        let old_site = record.production.site.clone();
        let promotable = record.copies.iter().position(|copy| {
            copy.state == CopyRecordState::Current
                && copy.host.as_deref().is_some_and(|host| self.can_host(record, host))
        });
        let Some(index) = promotable else {
            let states: Vec<String> = record
                .copies
                .iter()
                .map(|copy| match &copy.state {
                    CopyRecordState::Current => format!("{} has no live host", copy.site),
                    CopyRecordState::Stale { since, reason } => {
                        format!("{} is stale since {since} ({reason})", copy.site)
                    }
                    CopyRecordState::Syncing => format!("{} is syncing (no consistent image)", copy.site),
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

    /// A planned switchover to copy site `to`: once the production host has
    /// stopped serving (it recorded no host), promote `to` if its copy is
    /// current; a switchover that cannot happen is dropped, said why.
    fn switch_over(&mut self, record: &mut GroupRecord, to: &str, why: &mut Vec<String>) {
        let Some(index) = record.copies.iter().position(|copy| copy.site == to) else {
            record.switchover = None;
            why.push(format!("switchover to {to} dropped: not a copy site"));
            return;
        };
        let copy = &record.copies[index];
        let ready = copy.state == CopyRecordState::Current
            && copy.host.as_deref().is_some_and(|host| self.can_host(record, host));
        if !ready {
            record.switchover = None;
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
    /// becomes a copy site recorded stale (resynced by checksum from the new
    /// production: only what differs moves).
    fn promote(&mut self, record: &mut GroupRecord, index: usize, cause: &str, why: &mut Vec<String>) {
        let old_site = record.production.site.clone();
        let promoted = record.copies.remove(index);
        let host = promoted.host.clone().expect("a promotable copy has a host");
        record.production = crate::record::Production { site: promoted.site.clone(), host: Some(host.clone()) };
        record.epoch += 1;
        record.generation += 1;
        record.push_history(&host);
        record.copies.insert(
            index,
            crate::record::CopyEntry {
                site: old_site.clone(),
                host: None,
                mode: promoted.mode.clone(),
                state: CopyRecordState::Stale {
                    since: 0,
                    reason: format!("site {} took over the production role ({cause}): resynced from it", promoted.site),
                },
                generation: record.generation,
                slot: promoted.slot,
                store: "0".repeat(32),
            },
        );
        why.push(format!(
            "{cause}: copy site {} (current) promoted over {old_site}, {host} serves (epoch {}, generation {})",
            promoted.site, record.epoch, record.generation
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
        let produce = joined && record.production.host.as_deref() == Some(me);
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
            let copies = record
                .copies
                .iter()
                .map(|copy| CopySite { name: copy.site.clone(), mode: copy.mode.clone() })
                .collect();
            commands.push(Command::StartProduction { epoch: record.epoch, copies });
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
