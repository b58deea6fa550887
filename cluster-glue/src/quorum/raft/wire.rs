//! The messages voters exchange inside frames ([`super::frame`]): openraft's
//! own RPCs, and client requests a follower forwards to the leader.

use serde::{Deserialize, Serialize};

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};

use super::types::{CasReply, StoredValue, TypeConfig};

/// Every frame's body: who sends it, for which group.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Envelope<T> {
    /// The group; must be the receiver's.
    pub group: String,
    /// The sender's node id.
    pub from: u64,
    /// The request or reply.
    pub message: T,
}

/// A request to a voter.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// Raft replication and heartbeat.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Raft election.
    Vote(VoteRequest<u64>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client request for the leader, to be done within `timeout_ms`.
    Client {
        /// What the client asks.
        request: ClientRequest,
        /// How long the leader may take.
        timeout_ms: u64,
    },
}

/// What a client asks of the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ClientRequest {
    /// Compare-and-set.
    Cas {
        /// The key.
        key: String,
        /// The revision expected.
        expected: u64,
        /// The new bytes.
        value: Vec<u8>,
    },
    /// A linearizable read.
    Read {
        /// The key.
        key: String,
    },
    /// Confirm a quorum follows the leader now.
    ConfirmLease,
}

/// A reply to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// To AppendEntries.
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    /// To Vote.
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    /// To InstallSnapshot.
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    /// To a client request.
    Client(ClientReply),
}

/// The leader's answer to a client request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ClientReply {
    /// The compare-and-set's committed outcome.
    Cas(CasReply),
    /// The value read.
    Read(Option<StoredValue>),
    /// A quorum confirmed the leader.
    LeaseConfirmed,
    /// This node is not the leader; the one it knows of.
    NotLeader(Option<u64>),
    /// Not done now, may work on a retry (no quorum yet, leadership changing).
    Retry(String),
    /// Failed for good (the node is stopping).
    Failed(String),
}
