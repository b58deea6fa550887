//! The invariants the simulation checks after every step, and what it
//! counts. DESIGN.md §4 and the simulation brief:
//!
//! 1. Epoch and generation never decrease; `seq` grows by exactly 1 per
//!    committed write.
//! 2. A copy recorded stale or syncing is never promoted: the production
//!    site changes only to a site whose copy was `current` in the record
//!    before; and no acknowledged write is missing from a copy recorded
//!    `current` (mark before ack), nor from the store that serves. The one
//!    exception is a forced promotion the operator asks for
//!    (`--accept-data-loss`, a fork in the history): then a copy caught in
//!    the middle of a resync is promoted only with a DR image to roll back
//!    to, a store in the middle of a resync is never served (the world
//!    checks it rolled back to the image its host kept), and the line goes
//!    on from the promoted store's data.
//! 3. At most one node serves writes at any instant; no node serves at an
//!    epoch lower than one already served; a node serving at epoch `e`
//!    never serves later than a lease after a record with a higher epoch
//!    was committed.
//! 4. The production host named in the record is a member of the
//!    production site named in the record.

use std::fmt;

use cluster_glue::record::{CopyRecordState, GroupRecord, MemberState};

/// What one run counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records committed.
    pub commits: u64,
    /// Client writes acknowledged.
    pub acks: u64,
    /// Client writes held back (a copy that missed writes not yet recorded stale).
    pub held: u64,
    /// Copy sites promoted over the production site (failover or switchover).
    pub promotions: u64,
    /// Of them, planned switchovers.
    pub switchovers: u64,
    /// Switchovers asked for.
    pub switchovers_asked: u64,
    /// Forced promotions (`--accept-data-loss`) asked for.
    pub promotions_asked: u64,
    /// Of the promotions, forced ones (a fork).
    pub forks: u64,
    /// Of them, of a copy caught mid-resync, to the DR image its host kept.
    pub to_dr_image: u64,
    /// A failed production host replaced by a member of its own site.
    pub takeovers: u64,
    /// Members recorded forced-leaving.
    pub forced: u64,
    /// `Fence` commands (a member learned it was forced out while serving).
    pub fences: u64,
    /// Lease renewals that found the host deposed (the gate closed).
    pub lease_fences: u64,
    /// Copies recorded stale by the production host.
    pub marked_stale: u64,
    /// Copies resynced to current.
    pub resynced: u64,
    /// Faults put in.
    pub crashes: u64,
    /// Processes paused.
    pub pauses: u64,
    /// Partitions.
    pub partitions: u64,
    /// Graceful leaves.
    pub leaves: u64,
    /// Runs that ended with nobody serving after the quiet period.
    pub stuck_at_end: u64,
    /// The first few of those seeds.
    pub stuck_seeds: Vec<u64>,
    /// Simulated milliseconds.
    pub sim_ms: u64,
}

impl Stats {
    /// Add another run's counts.
    pub fn add(&mut self, other: &Stats) {
        self.commits += other.commits;
        self.acks += other.acks;
        self.held += other.held;
        self.promotions += other.promotions;
        self.switchovers += other.switchovers;
        self.switchovers_asked += other.switchovers_asked;
        self.promotions_asked += other.promotions_asked;
        self.forks += other.forks;
        self.to_dr_image += other.to_dr_image;
        self.takeovers += other.takeovers;
        self.forced += other.forced;
        self.fences += other.fences;
        self.lease_fences += other.lease_fences;
        self.marked_stale += other.marked_stale;
        self.resynced += other.resynced;
        self.crashes += other.crashes;
        self.pauses += other.pauses;
        self.partitions += other.partitions;
        self.leaves += other.leaves;
        self.stuck_at_end += other.stuck_at_end;
        for seed in &other.stuck_seeds {
            if self.stuck_seeds.len() < 10 {
                self.stuck_seeds.push(*seed);
            }
        }
        self.sim_ms += other.sim_ms;
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} s simulated; {} records committed, {} writes acknowledged ({} held back for a stale mark); \
             {} promotions ({} planned switchovers of {} asked; {} forced of {} asked, {} to a DR image), \
             {} takeovers, {} forced out, {} self-fences, \
             {} lease fences; {} copies marked stale, {} resynced; faults: {} crashes, {} pauses, {} partitions, \
             {} leaves; {} runs with nobody serving at the end {:?}",
            self.sim_ms / 1000,
            self.commits,
            self.acks,
            self.held,
            self.promotions,
            self.switchovers,
            self.switchovers_asked,
            self.forks,
            self.promotions_asked,
            self.to_dr_image,
            self.takeovers,
            self.forced,
            self.fences,
            self.lease_fences,
            self.marked_stale,
            self.resynced,
            self.crashes,
            self.pauses,
            self.partitions,
            self.leaves,
            self.stuck_at_end,
            self.stuck_seeds
        )
    }
}

/// A broken invariant, with the trace leading to it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// Which invariant, in words.
    pub message: String,
    /// The last trace lines (empty unless the run traced).
    pub trace: Vec<String>,
}

/// Invariants 1, 2 and 4 on a commit of `next` over `before`; the counters
/// it moves. `member_site` gives a member's site (`None`: a witness or unknown).
pub fn check_commit(
    before: Option<&GroupRecord>,
    next: &GroupRecord,
    member_site: impl Fn(&str) -> Option<String>,
    stats: &mut Stats,
) -> Result<(), String> {
    let expected_seq = before.map_or(0, |record| record.seq) + 1;
    if next.seq != expected_seq {
        return Err(format!("invariant 1: seq {} committed after seq {}", next.seq, expected_seq - 1));
    }
    if let Some(host) = next.production.host.as_deref() {
        if member_site(host).as_deref() != Some(next.production.site.as_str()) {
            return Err(format!(
                "invariant 4: the record (seq {}) names {host} production host of site {}, which is not its site ({:?})",
                next.seq,
                next.production.site,
                member_site(host)
            ));
        }
    }
    let Some(before) = before else { return Ok(()) };
    if next.epoch < before.epoch || next.generation < before.generation {
        return Err(format!(
            "invariant 1: epoch/generation went from {}/{} to {}/{} (seq {})",
            before.epoch, before.generation, next.epoch, next.generation, next.seq
        ));
    }
    for (name, entry) in &next.members {
        if entry.state == MemberState::ForcedLeaving && before.member_state(name) != MemberState::ForcedLeaving {
            stats.forced += 1;
        }
    }
    let forked = next.epoch > before.epoch && next.history.last().is_some_and(|entry| entry.fork.is_some());
    if next.production.site != before.production.site && forked {
        // A forced promotion (`--accept-data-loss`): a copy that may lack
        // writes, by the operator's word; one caught mid-resync only to the
        // DR image its host kept, which it rolls back to (the world checks
        // that it never serves the store otherwise).
        let copy = before.copy(&next.production.site);
        let host_mid_pass = copy
            .and_then(|copy| copy.host.as_deref())
            .and_then(|host| before.members.get(host))
            .is_some_and(|entry| entry.store_consistent == Some(false));
        let mid_pass = copy.is_some_and(|copy| copy.state == CopyRecordState::Syncing) || host_mid_pass;
        if mid_pass && next.promoted_image.is_none() {
            return Err(format!(
                "invariant 2: site {} promoted by force (seq {}) in the middle of a resync with no DR image to roll back to",
                next.production.site, next.seq
            ));
        }
        stats.promotions += 1;
        stats.forks += 1;
        if next.promoted_image.is_some() {
            stats.to_dr_image += 1;
        }
    } else if next.production.site != before.production.site {
        let was = before.copy(&next.production.site).map(|copy| copy.state.clone());
        if was != Some(CopyRecordState::Current) {
            return Err(format!(
                "invariant 2: site {} promoted (seq {}) while its copy was {:?} in seq {}",
                next.production.site, next.seq, was, before.seq
            ));
        }
        stats.promotions += 1;
        if before.switchover.as_deref() == Some(next.production.site.as_str()) {
            stats.switchovers += 1;
        }
    } else if next.epoch > before.epoch {
        let failed = before
            .production
            .host
            .as_deref()
            .is_some_and(|host| before.member_state(host) == MemberState::ForcedLeaving);
        if failed {
            stats.takeovers += 1;
        }
    }
    Ok(())
}
