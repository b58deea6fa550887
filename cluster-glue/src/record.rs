//! The group record (DESIGN.md §6): one document per group on quorum
//! storage, changed only by compare-and-set on its `seq`. It holds the
//! mirror state — which copy is current, stale or syncing, who produces —
//! and the membership of seed 004, so that a group formed later, however it
//! is wired, reads who may be served and who must be resynced first.
//!
//! ```text
//!  seq 12  epoch 1  generation 1  config 3f9a…  volume 5e1c…
//!  production  east: a
//!  copy        west: b  sync  current   gen 1  slot 0  store 9d2e…
//!  copy        north: -  async stale{since 1764450000000, "connection lost"}
//!  members     a joined(east, access)  b joined(west, access)  c forced-leaving  w joined(witness)
//!  history     (1, 1, a)
//! ```
//!
//! The record is data; the rules that change it live in `core.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The key the record is stored under in its group's quorum store.
pub const RECORD_KEY: &str = "record";
/// At most this many `(generation, epoch, production)` entries are kept.
pub const HISTORY_MAX: usize = 16;

/// A copy's state as the quorum records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum CopyRecordState {
    /// Has every acknowledged write (sync) or a consistent prefix (async).
    Current,
    /// Missed writes: resynced before it is used again.
    Stale {
        /// When it was recorded stale (Unix milliseconds, the recorder's clock).
        since: u64,
        /// Why, in words.
        reason: String,
    },
    /// Being resynced: not a consistent image.
    Syncing,
}

impl CopyRecordState {
    /// The state's name in status output.
    pub fn name(&self) -> &'static str {
        match self {
            CopyRecordState::Current => "current",
            CopyRecordState::Stale { .. } => "stale",
            CopyRecordState::Syncing => "syncing",
        }
    }
}

/// One copy site's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyEntry {
    /// The copy site.
    pub site: String,
    /// The member hosting its store, if any.
    pub host: Option<String>,
    /// `sync` or `async`.
    pub mode: String,
    /// Its state.
    #[serde(flatten)]
    pub state: CopyRecordState,
    /// The generation the copy's state was recorded in.
    pub generation: u64,
    /// The production host's bitmap slot tracking it.
    pub slot: u32,
    /// The token of the copy store last synced (32 hex digits; zeroes: none).
    pub store: String,
    /// The epoch at whose start this copy's store was identical to the
    /// production store (a clean hand-over): the production host starting
    /// that epoch resyncs only what it writes from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identical_epoch: Option<u64>,
}

/// What a production host that stopped cleanly for a switchover hands over:
/// its store, which every current copy now equals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The production site it served.
    pub site: String,
    /// Its store's token (32 hex digits), offered when it hosts a copy.
    pub store: String,
    /// The epoch it served.
    pub epoch: u64,
}

/// A member's state (seed 004).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Not running, or left gracefully.
    Inactive,
    /// Started, working out its access.
    Joining,
    /// In the group.
    Joined,
    /// Leaving gracefully: its roles are being handed over.
    Leaving,
    /// Failed or cut off: forced out by the group; it must stop serving.
    ForcedLeaving,
}

impl MemberState {
    /// The state's name in status output.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Inactive => "inactive",
            MemberState::Joining => "joining",
            MemberState::Joined => "joined",
            MemberState::Leaving => "leaving",
            MemberState::ForcedLeaving => "forced-leaving",
        }
    }
}

/// One member's (or witness's) entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    /// Its state.
    pub state: MemberState,
    /// +1 every time it starts: a forced-out member recognises an old
    /// verdict from a new one.
    pub incarnation: u64,
    /// Whether it can access its site's store (witnesses: false).
    pub access: bool,
    /// Why it cannot, when it cannot.
    pub access_problem: Option<String>,
    /// Whether the copy store it hosts holds a consistent image (`false`:
    /// in the middle of a resync pass), as its copy role last said;
    /// `None` while it hosts none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_consistent: Option<bool>,
    /// The way back to the last consistent image its copy store keeps while
    /// a resync pass runs (the undo journal, `engine::dr_image`), as its
    /// copy role last said; `None` while it hosts none. A forced promotion
    /// of a syncing copy rolls its store back to this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dr_image: Option<DrImage>,
}

/// Whether a copy store keeps a way back to its last consistent image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrImageState {
    /// Kept: the store can be rolled back to the image.
    Kept,
    /// A pass runs and no way back is kept (never begun, past its limit,
    /// the journal lost).
    Lost,
    /// No pass runs: the store is the image itself (or holds none).
    None,
}

/// A copy store's DR image as its host publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrImage {
    /// Kept, lost or none.
    pub state: DrImageState,
    /// The volume generation of the kept image (0 unless kept).
    #[serde(default)]
    pub generation: u64,
    /// When its pass began (Unix milliseconds, the copy host's clock): the
    /// image is of that moment or earlier (0 unless kept).
    #[serde(default)]
    pub taken_at_ms: u64,
}

/// A forced promotion of a syncing copy: the image its host rolls its
/// store back to before it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromotedImage {
    /// The member that rolls back and serves.
    pub host: String,
    /// The epoch it serves.
    pub epoch: u64,
    /// The image's volume generation.
    pub generation: u64,
    /// When its pass began (Unix milliseconds, the copy host's clock).
    pub taken_at_ms: u64,
}

impl MemberEntry {
    /// A member starting its `incarnation`: joining, its access not known yet.
    pub fn joining(incarnation: u64) -> MemberEntry {
        MemberEntry {
            state: MemberState::Joining,
            incarnation,
            access: false,
            access_problem: None,
            store_consistent: None,
            dr_image: None,
        }
    }
}

/// Who produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Production {
    /// The production site.
    pub site: String,
    /// The member serving it, if any.
    pub host: Option<String>,
}

/// One `(generation, epoch, production host)` of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The generation.
    pub generation: u64,
    /// The epoch.
    pub epoch: u64,
    /// The production host.
    pub production: String,
    /// A forced promotion (`--accept-data-loss`) started this generation:
    /// what it forked from and what was given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<String>,
}

/// The group record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// +1 per change; equal to the quorum store's revision of the record.
    pub seq: u64,
    /// +1 per production host change: the fencing token frames carry.
    pub epoch: u64,
    /// +1 when the production host changes or a current copy is dropped.
    pub generation: u64,
    /// The digest of the group config every member must have (hex).
    pub config_digest: String,
    /// The production volume's identity once its store was first served
    /// (32 hex digits): a store of another volume is never taken.
    pub volume: Option<String>,
    /// Who produces.
    pub production: Production,
    /// One entry per copy site, in config order.
    pub copies: Vec<CopyEntry>,
    /// Every member and witness, by name.
    pub members: BTreeMap<String, MemberEntry>,
    /// The last [`HISTORY_MAX`] production changes, oldest first.
    pub history: Vec<HistoryEntry>,
    /// A planned switchover to this copy site, asked for and not done yet.
    #[serde(default)]
    pub switchover: Option<String>,
    /// The production host that stopped for the switchover, and its store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
    /// A forced promotion of this copy site (`crossmirror promote
    /// --accept-data-loss`), asked for and not done yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<String>,
    /// The last forced promotion of a syncing copy (to its DR image): the
    /// promoted host rolls its store back to this image before it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_image: Option<PromotedImage>,
}

impl GroupRecord {
    /// The record a new group starts from (seq 0: not stored yet).
    pub fn new(config_digest: &str, production_site: &str, copies: &[(String, String)]) -> GroupRecord {
        GroupRecord {
            seq: 0,
            epoch: 0,
            generation: 1,
            config_digest: config_digest.to_string(),
            volume: None,
            production: Production { site: production_site.to_string(), host: None },
            copies: copies
                .iter()
                .enumerate()
                .map(|(slot, (site, mode))| CopyEntry {
                    site: site.clone(),
                    host: None,
                    mode: mode.clone(),
                    state: CopyRecordState::Stale { since: 0, reason: "never synced".to_string() },
                    generation: 1,
                    slot: u32::try_from(slot).unwrap_or(u32::MAX),
                    store: "0".repeat(32),
                    identical_epoch: None,
                })
                .collect(),
            members: BTreeMap::new(),
            history: Vec::new(),
            switchover: None,
            handover: None,
            promotion: None,
            promoted_image: None,
        }
    }

    /// The record's bytes on the quorum store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record always serialises")
    }

    /// A record read from the quorum store; an error names what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<GroupRecord, String> {
        serde_json::from_slice(bytes).map_err(|error| format!("the group record is damaged: {error}"))
    }

    /// The entry of copy site `site`.
    pub fn copy(&self, site: &str) -> Option<&CopyEntry> {
        self.copies.iter().find(|copy| copy.site == site)
    }

    /// The entry of copy site `site`, to change.
    pub fn copy_mut(&mut self, site: &str) -> Option<&mut CopyEntry> {
        self.copies.iter_mut().find(|copy| copy.site == site)
    }

    /// The state of member `name` (inactive when it never joined).
    pub fn member_state(&self, name: &str) -> MemberState {
        self.members.get(name).map_or(MemberState::Inactive, |member| member.state)
    }

    /// Add a production change to the history, keeping the last [`HISTORY_MAX`].
    pub fn push_history(&mut self, production: &str) {
        self.history.push(HistoryEntry {
            generation: self.generation,
            epoch: self.epoch,
            production: production.to_string(),
            fork: None,
        });
        if self.history.len() > HISTORY_MAX {
            let extra = self.history.len() - HISTORY_MAX;
            self.history.drain(..extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_damage_is_an_error() {
        let mut record = GroupRecord::new("ab", "east", &[("west".into(), "sync".into())]);
        record.copies[0].state = CopyRecordState::Stale { since: 5, reason: "connection lost".into() };
        record.members.insert(
            "a".into(),
            MemberEntry {
                state: MemberState::Joined,
                incarnation: 2,
                access: true,
                access_problem: None,
                store_consistent: None,
                dr_image: Some(DrImage { state: DrImageState::Kept, generation: 3, taken_at_ms: 1_764_000_000_000 }),
            },
        );
        let bytes = record.encode();
        assert_eq!(GroupRecord::decode(&bytes).unwrap(), record);
        assert!(GroupRecord::decode(&bytes[..bytes.len() - 3]).unwrap_err().contains("damaged"));
    }

    #[test]
    fn the_history_keeps_its_last_entries() {
        let mut record = GroupRecord::new("ab", "east", &[]);
        for epoch in 1..=20 {
            record.epoch = epoch;
            record.push_history("a");
        }
        assert_eq!(record.history.len(), HISTORY_MAX);
        assert_eq!(record.history[0].epoch, 5);
        assert_eq!(record.history.last().unwrap().epoch, 20);
    }
}
