//! The receiving side of the voters' TCP network: accept connections, read
//! authenticated frames, hand raft RPCs to openraft and client requests to
//! [`super::leader`], and write the reply on the same connection.
//!
//! Network input never panics this node: a frame with a bad MAC, another
//! group, an oversized length or a malformed body closes that connection
//! with a log line. Connections are bounded in number and closed when idle.

use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::frame::{read_frame, write_frame};
use super::leader;
use super::network::Peers;
use super::state_machine::Shared;
use super::types::TypeConfig;
use super::wire::{ClientReply, Envelope, Reply, Request};

/// Connections served at once; more wait in the listen backlog.
const CONNECTIONS_MAX: usize = 64;
/// A connection with no request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A forwarded client request is served for at most this long.
const CLIENT_TIMEOUT_MAX: Duration = Duration::from_secs(60);

/// What a connection handler needs.
#[derive(Clone)]
pub(crate) struct Context {
    /// This node's raft.
    pub raft: Raft<TypeConfig>,
    /// The applied state, for reads.
    pub shared: Arc<Shared>,
    /// The peers, for the frame key and reachability.
    pub peers: Arc<Peers>,
    /// This node's id.
    pub me: u64,
}

/// Accept connections until `stop` turns true.
pub(crate) async fn serve(listener: TcpListener, context: Context, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, from) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "quorum listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%from, "quorum listener: {CONNECTIONS_MAX} connections already open; refusing one");
            continue;
        };
        let context = context.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => {}
                () = connection(stream, &context) => {}
            }
            drop(slot);
        });
    }
}

/// Serve one connection until it closes or sends something bad.
async fn connection(mut stream: TcpStream, context: &Context) {
    let from = stream.peer_addr().map(|address| address.to_string()).unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let key = context.peers.key().clone();
    loop {
        let body = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut stream, &key)).await {
            Err(_) => return,
            Ok(Err(super::frame::FrameError::Io(_))) => return,
            Ok(Err(error)) => {
                tracing::warn!(%from, %error, "quorum connection closed: refused frame");
                return;
            }
            Ok(Ok(body)) => body,
        };
        let envelope: Envelope<Request> = match serde_json::from_slice(&body) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%from, %error, "quorum connection closed: malformed request");
                return;
            }
        };
        if envelope.group != key.group() {
            tracing::warn!(%from, group = %envelope.group, "quorum connection closed: request for another group");
            return;
        }
        context.peers.heard_from(envelope.from);
        let reply = answer(envelope.message, context).await;
        let reply = Envelope { group: key.group().to_string(), from: context.me, message: reply };
        let Ok(reply) = serde_json::to_vec(&reply) else {
            tracing::warn!(%from, "quorum connection closed: reply not serializable");
            return;
        };
        if write_frame(&mut stream, &key, &reply).await.is_err() {
            return;
        }
    }
}

async fn answer(request: Request, context: &Context) -> Reply {
    match request {
        Request::AppendEntries(rpc) => Reply::AppendEntries(context.raft.append_entries(rpc).await),
        Request::Vote(rpc) => Reply::Vote(context.raft.vote(rpc).await),
        Request::InstallSnapshot(rpc) => Reply::InstallSnapshot(context.raft.install_snapshot(rpc).await),
        Request::Client { request, timeout_ms } => {
            let timeout = Duration::from_millis(timeout_ms).min(CLIENT_TIMEOUT_MAX);
            let served = tokio::time::timeout(timeout, leader::serve(&context.raft, &context.shared, request)).await;
            Reply::Client(served.unwrap_or_else(|_| ClientReply::Retry(format!("not done within {timeout:?}"))))
        }
    }
}
