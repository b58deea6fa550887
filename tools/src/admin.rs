//! The admin endpoint: `GET /status` answers JSON with every copy's state
//! and counters. HTTP comes from `tiny_http` (small, synchronous, no async
//! runtime), on its own thread; it binds loopback unless told otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use engine::replicator::{CopyStatus, Replicator};
use engine::Volume;
use serde_json::json;

/// A running admin endpoint; stopped on drop.
pub struct AdminServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Serve `GET /status` on `address`.
    pub fn start(
        address: SocketAddr,
        mirror: Option<Arc<Replicator>>,
        volume: Arc<Volume>,
    ) -> anyhow::Result<AdminServer> {
        let server = tiny_http::Server::http(address)
            .map_err(|error| anyhow::anyhow!("{error}"))
            .with_context(|| format!("cannot serve the admin endpoint on {address}"))?;
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || serve(&serving, mirror.as_deref(), &volume))
            .context("starting the admin thread")?;
        tracing::info!(%address, "admin endpoint: GET http://{address}/status");
        Ok(AdminServer { server, thread: Some(thread) })
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(server: &tiny_http::Server, mirror: Option<&Replicator>, volume: &Volume) {
    for request in server.incoming_requests() {
        let (code, body) = match (request.method(), request.url()) {
            (tiny_http::Method::Get, "/status") => (200, status_json(mirror, volume).to_string()),
            (tiny_http::Method::Get, _) => (404, json!({ "error": "not found; try GET /status" }).to_string()),
            _ => (405, json!({ "error": "only GET is served" }).to_string()),
        };
        let header = tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid header");
        let response = tiny_http::Response::from_string(body + "\n").with_status_code(code).with_header(header);
        if let Err(error) = request.respond(response) {
            tracing::debug!(%error, "admin client went away before its answer");
        }
    }
}

/// The status document.
pub fn status_json(mirror: Option<&Replicator>, volume: &Volume) -> serde_json::Value {
    let copies: Vec<serde_json::Value> =
        mirror.map(|mirror| mirror.status()).unwrap_or_default().iter().map(copy_json).collect();
    json!({
        "volume": volume.path().display().to_string(),
        "size": volume.size(),
        "region_bytes": mirror.map(|mirror| mirror.region_bytes()),
        "copies": copies,
    })
}

fn copy_json(copy: &CopyStatus) -> serde_json::Value {
    json!({
        "name": copy.name,
        "address": copy.address,
        "mode": copy.mode,
        "state": copy.state,
        "dirty_bytes": copy.dirty_bytes,
        "resync_bytes_total": copy.resync_bytes_total,
        "resync_bytes_done": copy.resync_bytes_done,
        "lag_bytes": copy.lag_bytes,
        "bytes_shipped": copy.bytes_shipped,
        "frames_rejected": copy.frames_rejected,
        "connects": copy.connects,
    })
}
