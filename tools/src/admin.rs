//! The admin endpoint. On a production host `GET /status` answers JSON with
//! every copy's state and counters, and `POST /verify?copy=NAME[&repair=1]`
//! runs an online verify of that copy (one at a time); on a copy host
//! `GET /status` answers what it mirrors and its frame counters. HTTP comes
//! from [`crate::http`]: requests bounded in size and time, a capped number of
//! connections, on threads of their own, away from the data path; it binds
//! loopback unless told otherwise.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use engine::mirror_service::MirrorService;
use engine::replicator::{CopyStatus, Replicator, VerifyError};
use engine::Volume;
use serde_json::json;

pub use crate::address::parse_address as parse_admin_address;
use crate::http::{Handler, HttpServer, Request};

/// A running admin endpoint; stopped on drop.
pub struct AdminServer {
    _server: HttpServer,
}

impl AdminServer {
    /// Serve a production host's `GET /status` and `POST /verify` on `address`.
    /// The endpoint holds the replicator only while it answers a request,
    /// so stopping the mirroring releases its bitmap at once.
    pub fn production(
        address: SocketAddr,
        mirror: Option<&MirrorService>,
        volume: Arc<Volume>,
    ) -> anyhow::Result<AdminServer> {
        let mirror: Option<Weak<Replicator>> = mirror.map(|mirror| Arc::downgrade(&mirror.replicator()));
        // A verify reads the whole volume: one at a time, and a second is
        // told so rather than queued behind it.
        let verifying = Mutex::new(());
        let handler: Handler = Arc::new(move |request: &Request| {
            let mirror = mirror.as_ref().and_then(Weak::upgrade);
            match (request.method.as_str(), request.path.as_str()) {
                ("GET", "/status") => (200, status_json(mirror.as_deref(), &volume)),
                ("POST", "/verify") => match verifying.try_lock() {
                    Ok(_running) => verify(mirror.as_deref(), &request.query),
                    Err(_) => (409, json!({ "error": "a verify is running already; try again when it ends" })),
                },
                ("GET", _) => (404, json!({ "error": "not found; try GET /status" })),
                _ => (405, json!({ "error": "GET /status and POST /verify?copy=NAME[&repair=1] are served" })),
            }
        });
        AdminServer::start(address, handler)
    }

    /// Serve requests on `address` with `handler`.
    pub fn start(address: SocketAddr, handler: Handler) -> anyhow::Result<AdminServer> {
        let server = HttpServer::start(address, "--admin", handler)?;
        let address = server.local_addr();
        tracing::info!(%address, "admin endpoint: GET http://{address}/status");
        Ok(AdminServer { _server: server })
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
/// is not up to date, 503 for a verify cut short (the copy went away, or
/// writes never paused: try again), 500 when the local store or the repair
/// failed.
fn verify_error(error: &VerifyError) -> (u16, serde_json::Value) {
    let message = error.to_string();
    match error {
        VerifyError::UnknownCopy { copies, .. } => (404, json!({ "error": message, "copies": copies })),
        VerifyError::NotUpToDate { copy, state, last_error } => {
            (409, json!({ "error": message, "copy": copy, "state": state, "last_error": last_error }))
        }
        VerifyError::Busy { copy, .. } | VerifyError::CopyLost { copy, .. } => {
            (503, json!({ "error": message, "copy": copy }))
        }
        VerifyError::Io { copy, .. } | VerifyError::RepairFailed { copy, .. } => {
            (500, json!({ "error": message, "copy": copy }))
        }
    }
}

/// The status document.
pub fn status_json(mirror: Option<&Replicator>, volume: &Volume) -> serde_json::Value {
    let copies: Vec<serde_json::Value> =
        mirror.map(|mirror| mirror.status()).unwrap_or_default().iter().map(copy_json).collect();
    let failure = mirror.and_then(|mirror| mirror.local_failure());
    json!({
        "volume": volume.path().display().to_string(),
        "size": volume.size(),
        "local_store": {
            "state": if failure.is_some() { "failed" } else { "ok" },
            "error": failure,
        },
        "region_bytes": mirror.map(|mirror| mirror.region_bytes()),
        // Write-intent tracking's metadata I/O since start: transactions
        // written, those that first synced the bitmap (extents left the
        // log) and the time those syncs took, those started while another
        // was being written.
        "activity_log": mirror.and_then(Replicator::activity_log_stats).map(|log| json!({
            "extent_bytes": log.extent_bytes,
            "capacity": log.capacity,
            "extents": log.extents,
            "direct": log.direct,
            "transactions": log.transactions,
            "bitmap_syncs": log.bitmap_syncs,
            "bitmap_sync_seconds": log.bitmap_sync_nanos as f64 / 1e9,
            "overlapped": log.overlapped,
        })),
        "copies": copies,
    })
}

fn copy_json(copy: &CopyStatus) -> serde_json::Value {
    json!({
        "name": copy.name,
        "address": copy.address,
        "mode": copy.mode.as_str(),
        "state": copy.state.as_str(),
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
        // The recovery point if this host were lost now: bytes of answered
        // writes the copy lacks and the age of the oldest (exact while the
        // copy follows every write; else bounds: the dirty regions, and the
        // time since it last did; seconds null when it never did).
        // Compression on the link: the setting, whether the copy host
        // decompresses (else nothing is compressed), payload bytes in, bytes
        // sent for them, their ratio, and the CPU seconds it took.
        "compression": {
            "setting": copy.compression.setting.as_string(),
            "active": copy.compression.active,
            "bytes_in": copy.compression.bytes_in,
            "bytes_out": copy.compression.bytes_out,
            "ratio": (copy.compression.bytes_out > 0)
                .then(|| copy.compression.bytes_in as f64 / copy.compression.bytes_out as f64),
            "cpu_seconds": copy.compression.nanos as f64 / 1e9,
        },
        "rpo": {
            "bytes": copy.recovery_point.bytes,
            "seconds": (copy.recovery_point.ms != u64::MAX).then(|| copy.recovery_point.ms as f64 / 1000.0),
            "exact": copy.recovery_point.exact,
        },
    })
}
