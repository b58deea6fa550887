//! The admin endpoint. On a production host `GET /status` answers JSON with
//! every copy's state and counters, and `POST /verify?copy=NAME[&repair=1]`
//! runs an online verify of that copy; on a copy host `GET /status` answers
//! what it mirrors and its frame counters. HTTP comes from `tiny_http`
//! (small, synchronous, no async runtime), on its own thread, one request at
//! a time; it binds loopback unless told otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;
use engine::replicator::{CopyStatus, Replicator, VerifyError};
use engine::Volume;
use serde_json::json;

/// An admin address from the command line: `HOST:PORT`, or a bare `PORT`
/// meaning loopback (`127.0.0.1:PORT`).
pub fn parse_admin_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| format!("{text:?} is not an address like 127.0.0.1:7790 or a port like 7790"))
}

/// What answers a request: (method, path, query) to (status code, JSON).
pub type Handler = Box<dyn Fn(&tiny_http::Method, &str, &str) -> (u16, serde_json::Value) + Send>;

/// A running admin endpoint; stopped on drop.
pub struct AdminServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Serve a production host's `GET /status` and `POST /verify` on `address`.
    pub fn production(
        address: SocketAddr,
        mirror: Option<Arc<Replicator>>,
        volume: Arc<Volume>,
    ) -> anyhow::Result<AdminServer> {
        let handler: Handler = Box::new(move |method, path, query| match (method, path) {
            (tiny_http::Method::Get, "/status") => (200, status_json(mirror.as_deref(), &volume)),
            (tiny_http::Method::Post, "/verify") => verify(mirror.as_deref(), query),
            (tiny_http::Method::Get, _) => (404, json!({ "error": "not found; try GET /status" })),
            _ => (405, json!({ "error": "GET /status and POST /verify?copy=NAME[&repair=1] are served" })),
        });
        AdminServer::start(address, handler)
    }

    /// Serve requests on `address` with `handler`.
    pub fn start(address: SocketAddr, handler: Handler) -> anyhow::Result<AdminServer> {
        let server = tiny_http::Server::http(address)
            .map_err(|error| anyhow::anyhow!("{error}"))
            .with_context(|| format!("cannot serve the admin endpoint on {address}"))?;
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || serve(&serving, &handler))
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

fn serve(server: &tiny_http::Server, handler: &Handler) {
    for request in server.incoming_requests() {
        let url = request.url().to_string();
        let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
        let (code, body) = handler(request.method(), path, query);
        let body = body.to_string();
        let header = tiny_http::Header::from_bytes("Content-Type", "application/json").expect("a valid header");
        let response = tiny_http::Response::from_string(body + "\n").with_status_code(code).with_header(header);
        if let Err(error) = request.respond(response) {
            tracing::debug!(%error, "admin client went away before its answer");
        }
    }
}

/// Run an online verify as the query (`copy=NAME`, `repair=1`) asks.
fn verify(mirror: Option<&Replicator>, query: &str) -> (u16, serde_json::Value) {
    let Some(mirror) = mirror else {
        return (409, json!({ "error": "this volume has no copies to verify" }));
    };
    let mut copy = None;
    let mut repair = false;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        match pair.split_once('=') {
            Some(("copy", name)) => copy = Some(name.to_string()),
            Some(("repair", value)) => repair = matches!(value, "1" | "true" | "yes"),
            _ => return (400, json!({ "error": format!("unknown query parameter {pair:?}") })),
        }
    }
    let Some(copy) = copy else {
        return (400, json!({ "error": "name the copy: POST /verify?copy=NAME" }));
    };
    match mirror.verify(&copy, repair) {
        Ok(report) => {
            let mismatches: Vec<serde_json::Value> = report
                .mismatches
                .iter()
                .map(|(offset, length)| json!({ "offset": offset, "length": length }))
                .collect();
            (
                200,
                json!({
                    "copy": report.copy,
                    "bytes_compared": report.bytes_compared,
                    "mismatches": mismatches,
                    "repaired": report.repaired,
                }),
            )
        }
        Err(error) => verify_error(&error),
    }
}

/// The HTTP answer to a verify that did not run or did not finish: 404 with
/// the copies' names for an unknown copy, 409 with its state for a copy that
/// is not up to date, 503 for a verify cut short (the copy went away).
fn verify_error(error: &VerifyError) -> (u16, serde_json::Value) {
    let message = error.to_string();
    match error {
        VerifyError::UnknownCopy { copies, .. } => (404, json!({ "error": message, "copies": copies })),
        VerifyError::NotUpToDate { copy, state, last_error } => {
            (409, json!({ "error": message, "copy": copy, "state": state, "last_error": last_error }))
        }
        VerifyError::Failed { copy, .. } => (503, json!({ "error": message, "copy": copy })),
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
        "last_error": copy.last_error,
        "dirty_bytes": copy.dirty_bytes,
        "resync_pending_bytes": copy.resync_pending_bytes,
        "clearing_bytes": copy.clearing_bytes,
        "resync_bytes_total": copy.resync_bytes_total,
        "resync_bytes_done": copy.resync_bytes_done,
        "lag_bytes": copy.lag_bytes,
        "bytes_shipped": copy.bytes_shipped,
        "frames_rejected": copy.frames_rejected,
        "connects": copy.connects,
    })
}
