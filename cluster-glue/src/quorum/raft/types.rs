//! The openraft type configuration and the state machine's command and
//! response: a compare-and-set on one key's revision.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::quorum::{CasOutcome, Versioned};

openraft::declare_raft_types!(
    /// The embedded quorum's openraft types: u64 node ids, no per-node data
    /// in the membership (addresses come from the config).
    pub(crate) TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = u64,
        Node = openraft::EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A log entry's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Command {
    /// Write `value` to `key` iff its revision is `expected` (0: absent).
    Cas {
        /// The key.
        key: String,
        /// The revision the writer saw.
        expected: u64,
        /// The new bytes.
        value: Vec<u8>,
    },
}

/// A key's value as stored and sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredValue {
    /// The key's revision.
    pub revision: u64,
    /// Its bytes.
    pub value: Vec<u8>,
}

impl From<StoredValue> for Versioned {
    fn from(stored: StoredValue) -> Versioned {
        Versioned { revision: stored.revision, value: stored.value }
    }
}

/// What a compare-and-set did, on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CasReply {
    /// Written at this revision.
    Written(u64),
    /// Refused; what the key holds.
    Conflict(Option<StoredValue>),
}

impl From<CasReply> for CasOutcome {
    fn from(reply: CasReply) -> CasOutcome {
        match reply {
            CasReply::Written(revision) => CasOutcome::Written(revision),
            CasReply::Conflict(current) => CasOutcome::Conflict(current.map(Versioned::from)),
        }
    }
}

/// The state machine's answer for one applied entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum CommandResponse {
    /// A blank or membership entry.
    Nothing,
    /// A compare-and-set's outcome.
    Cas(CasReply),
}
