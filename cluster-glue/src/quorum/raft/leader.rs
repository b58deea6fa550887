//! Client requests served by the leader, whether asked locally or forwarded
//! by a follower: compare-and-set through the log; reads and lease
//! confirmations through `ensure_linearizable` (a heartbeat round acknowledged
//! by a quorum, no log entry).

use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::Raft;

use super::state_machine::Shared;
use super::types::{Command, CommandResponse, TypeConfig};
use super::wire::{ClientReply, ClientRequest};

/// Serve `request` if this node leads; otherwise say who does.
pub(crate) async fn serve(raft: &Raft<TypeConfig>, shared: &Arc<Shared>, request: ClientRequest) -> ClientReply {
    match request {
        ClientRequest::Cas { key, expected, value } => match raft
            .client_write(Command::Cas { key, expected, value })
            .await
        {
            Ok(written) => match written.data {
                CommandResponse::Cas(reply) => ClientReply::Cas(reply),
                CommandResponse::Nothing => ClientReply::Failed("a compare-and-set applied as no command".to_string()),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                ClientReply::NotLeader(forward.leader_id)
            }
            Err(RaftError::APIError(other)) => ClientReply::Retry(other.to_string()),
            Err(RaftError::Fatal(fatal)) => ClientReply::Failed(fatal.to_string()),
        },
        ClientRequest::Read { key } => match confirm(raft).await {
            None => ClientReply::Read(shared.applied().get(&key)),
            Some(refusal) => refusal,
        },
        ClientRequest::ConfirmLease => confirm(raft).await.unwrap_or(ClientReply::LeaseConfirmed),
    }
}

/// None when a quorum confirmed this leader and the state machine has caught
/// up with what was committed before; else the reply explaining why not.
async fn confirm(raft: &Raft<TypeConfig>) -> Option<ClientReply> {
    match raft.ensure_linearizable().await {
        Ok(_) => None,
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward))) => {
            Some(ClientReply::NotLeader(forward.leader_id))
        }
        Err(RaftError::APIError(other)) => Some(ClientReply::Retry(other.to_string())),
        Err(RaftError::Fatal(fatal)) => Some(ClientReply::Failed(fatal.to_string())),
    }
}
