//! The sending side of the voters' TCP network: a small pool of persistent
//! connections per peer (a broken one is dropped and the next call
//! reconnects), one request and one reply at a time on each, and the record
//! of when each peer last answered or called, for `status()`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::EmptyNode;
use tokio::net::TcpStream;

use super::frame::{read_frame, write_frame, FrameKey};
use super::types::TypeConfig;
use super::wire::{Envelope, Reply, Request};

/// A new connection must be set up within this.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Idle connections kept per peer.
const IDLE_PER_PEER_MAX: usize = 4;
/// An idle connection older than this is not reused (the peer closes idle
/// connections after a while).
const IDLE_REUSE_MAX: Duration = Duration::from_secs(10);
/// A peer heard from within this counts as reachable.
pub(crate) const REACHABLE_WITHIN: Duration = Duration::from_secs(1);

/// Why a call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The request never left: the peer certainly did not act on it.
    #[error("quorum peer {peer}: not sent: {why}")]
    NotSent {
        /// The peer.
        peer: u64,
        /// Why.
        why: String,
    },
    /// Sent, but no good reply: the peer may have acted on it.
    #[error("quorum peer {peer}: no reply: {why}")]
    NoReply {
        /// The peer.
        peer: u64,
        /// Why.
        why: String,
    },
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps under these locks change by single inserts and removes.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The peers and the connections to them.
#[derive(Debug)]
pub(crate) struct Peers {
    me: u64,
    addresses: BTreeMap<u64, SocketAddr>,
    key: FrameKey,
    idle: Mutex<HashMap<u64, Vec<(TcpStream, Instant)>>>,
    last_heard: Mutex<HashMap<u64, Instant>>,
}

impl Peers {
    /// The peers of node `me`.
    pub(crate) fn new(me: u64, addresses: BTreeMap<u64, SocketAddr>, key: FrameKey) -> Peers {
        Peers { me, addresses, key, idle: Mutex::new(HashMap::new()), last_heard: Mutex::new(HashMap::new()) }
    }

    /// The frame key.
    pub(crate) fn key(&self) -> &FrameKey {
        &self.key
    }

    /// Note that `peer` was just heard from.
    pub(crate) fn heard_from(&self, peer: u64) {
        if peer != self.me && self.addresses.contains_key(&peer) {
            lock(&self.last_heard).insert(peer, Instant::now());
        }
    }

    /// Whether `peer` was heard from lately; None if never.
    pub(crate) fn reachable(&self, peer: u64) -> Option<bool> {
        if peer == self.me {
            return Some(true);
        }
        lock(&self.last_heard).get(&peer).map(|heard| heard.elapsed() <= REACHABLE_WITHIN)
    }

    async fn connection(&self, peer: u64) -> Result<TcpStream, CallError> {
        let not_sent = |why: String| CallError::NotSent { peer, why };
        if let Some(idle) = lock(&self.idle).get_mut(&peer) {
            while let Some((stream, since)) = idle.pop() {
                if since.elapsed() < IDLE_REUSE_MAX {
                    return Ok(stream);
                }
            }
        }
        let address = *self.addresses.get(&peer).ok_or_else(|| not_sent("not a voter".to_string()))?;
        // From this voter's own address, so that the peer (and any packet
        // filter between them) sees which voter it is.
        let source = self.addresses.get(&self.me).map(|own| SocketAddr::new(own.ip(), 0));
        let socket = match address {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(|error| not_sent(format!("socket: {error}")))?;
        if let Some(source) =
            source.filter(|source| !source.ip().is_unspecified() && source.is_ipv4() == address.is_ipv4())
        {
            socket.bind(source).map_err(|error| not_sent(format!("bind {source}: {error}")))?;
        }
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(address))
            .await
            .map_err(|_| not_sent(format!("connect to {address} timed out")))?
            .map_err(|error| not_sent(format!("connect to {address}: {error}")))?;
        stream.set_nodelay(true).map_err(|error| not_sent(error.to_string()))?;
        Ok(stream)
    }

    /// Send `request` to `peer` and wait up to `timeout` for its reply.
    pub(crate) async fn call(&self, peer: u64, request: Request, timeout: Duration) -> Result<Reply, CallError> {
        let envelope = Envelope { group: self.key.group().to_string(), from: self.me, message: request };
        let body =
            serde_json::to_vec(&envelope).map_err(|error| CallError::NotSent { peer, why: error.to_string() })?;
        let exchange = async {
            let mut stream = self.connection(peer).await?;
            let no_reply = |why: String| CallError::NoReply { peer, why };
            write_frame(&mut stream, &self.key, &body).await.map_err(|error| no_reply(error.to_string()))?;
            let reply = read_frame(&mut stream, &self.key).await.map_err(|error| no_reply(error.to_string()))?;
            let reply: Envelope<Reply> =
                serde_json::from_slice(&reply).map_err(|error| no_reply(format!("malformed reply: {error}")))?;
            if reply.group != self.key.group() || reply.from != peer {
                return Err(no_reply(format!("reply from node {} of group {:?}", reply.from, reply.group)));
            }
            Ok((stream, reply.message))
        };
        let (stream, reply) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CallError::NoReply { peer, why: format!("no reply within {timeout:?}") })??;
        self.heard_from(peer);
        let mut idle = lock(&self.idle);
        let idle = idle.entry(peer).or_default();
        if idle.len() < IDLE_PER_PEER_MAX {
            idle.push((stream, Instant::now()));
        }
        Ok(reply)
    }
}

/// Makes openraft's per-target clients.
#[derive(Debug, Clone)]
pub(crate) struct NetworkFactory {
    peers: Arc<Peers>,
}

impl NetworkFactory {
    /// A factory sending through `peers`.
    pub(crate) fn new(peers: Arc<Peers>) -> NetworkFactory {
        NetworkFactory { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, _node: &EmptyNode) -> PeerClient {
        PeerClient { peers: Arc::clone(&self.peers), target }
    }
}

/// openraft's client for one peer.
#[derive(Debug)]
pub(crate) struct PeerClient {
    peers: Arc<Peers>,
    target: u64,
}

type RpcResult<T, E> = Result<T, RPCError<u64, EmptyNode, RaftError<u64, E>>>;

impl PeerClient {
    async fn call<T, E: std::error::Error>(
        &self,
        request: Request,
        option: &RPCOption,
        unpack: impl FnOnce(Reply) -> Option<Result<T, RaftError<u64, E>>>,
    ) -> RpcResult<T, E> {
        let reply = match self.peers.call(self.target, request, option.hard_ttl()).await {
            Ok(reply) => reply,
            Err(error @ CallError::NotSent { .. }) => return Err(RPCError::Unreachable(Unreachable::new(&error))),
            Err(error @ CallError::NoReply { .. }) => return Err(RPCError::Network(NetworkError::new(&error))),
        };
        match unpack(reply) {
            Some(Ok(response)) => Ok(response),
            Some(Err(remote)) => Err(RPCError::RemoteError(RemoteError::new(self.target, remote))),
            None => {
                let error = CallError::NoReply { peer: self.target, why: "reply of the wrong kind".to_string() };
                Err(RPCError::Network(NetworkError::new(&error)))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, openraft::error::Infallible> {
        self.call(Request::AppendEntries(rpc), &option, |reply| match reply {
            Reply::AppendEntries(result) => Some(result),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        self.call(Request::InstallSnapshot(rpc), &option, |reply| match reply {
            Reply::InstallSnapshot(result) => Some(result),
            _ => None,
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, openraft::error::Infallible> {
        self.call(Request::Vote(rpc), &option, |reply| match reply {
            Reply::Vote(result) => Some(result),
            _ => None,
        })
        .await
    }
}
