//! `crossmirror copy-host`: hold a copy of a production volume until SIGINT
//! or SIGTERM, then finish the changes in flight, fsync and exit 0. The role
//! itself is a library service, [`engine::copy_role`]; this file parses the
//! arguments, starts the role, serves its `GET /status` on the admin
//! endpoint, and turns a signal into [`CopyRole::stop`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use engine::copy_role::{CopyListen, CopyRole, CopyRoleConfig, CopyRoleError, CopyRoleStatus, DrImage};
use engine::metadata::format_uuid;
use engine::protocol::load_secret;
use engine::size::parse_size;
use engine::VolumeOptions;

use crate::admin;
use crate::start_files::StartFiles;

/// How often the main thread looks for a signal.
const SIGNAL_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Arguments of `crossmirror copy-host`.
#[derive(Args, Debug)]
pub struct CopyHostArgs {
    /// Regular file or block device holding this host's copy of the volume.
    #[arg(long)]
    volume: PathBuf,
    /// Volume size (e.g. 1G); creates a sparse file if the path is absent.
    /// It must equal the production volume's size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Address to listen on for the production host: PORT (meaning
    /// 127.0.0.1:PORT), IPV4:PORT, [IPV6]:PORT or HOST:PORT (e.g. 127.0.0.2:7789).
    #[arg(long, value_parser = crate::address::parse_address)]
    listen: SocketAddr,
    /// File holding the secret shared with the production host; it must be
    /// private to its owner (chmod 600).
    #[arg(long)]
    secret_file: PathBuf,
    /// Open the volume with O_DIRECT (bypass the page cache).
    #[arg(long)]
    direct: bool,
    /// Serve `GET /status` (JSON: what this copy mirrors, its state and
    /// frame counters) over HTTP on this address (a bare port means
    /// 127.0.0.1:PORT).
    #[arg(long, value_parser = admin::parse_admin_address)]
    admin: Option<SocketAddr>,
    /// Directory for this volume's metadata file. Default: beside a regular
    /// file (`<volume>.cmmeta`); /var/lib/crossmirror for a block device.
    #[arg(long)]
    metadata_dir: Option<PathBuf>,
    /// While a resync pass runs, keep up to this many bytes of the chunks
    /// it overwrites, so that `crossmirror rollback` (or a forced
    /// promotion) can bring back the consistent image the store held when
    /// the pass began; 0 keeps none. Default: a quarter of the volume.
    #[arg(long, value_parser = parse_size)]
    dr_image_max: Option<u64>,
}
/// Run the copy host until a signal stops it.
pub fn run(args: CopyHostArgs) -> anyhow::Result<()> {
    let secret = load_secret(&args.secret_file)?;
    // A copy's metadata is written only once it meets its production host,
    // so the one file a failed start may leave is a volume it created.
    let start_files = StartFiles::note(std::slice::from_ref(&args.volume));
    let config = CopyRoleConfig {
        volume: VolumeOptions { path: args.volume.clone(), size: args.size, direct: args.direct, read_only: false },
        metadata_dir: args.metadata_dir.clone(),
        listen: CopyListen::Address(args.listen),
        secret,
        dr_image_max: args.dr_image_max,
    };
    let role = CopyRole::start(config).map_err(|error| match error {
        CopyRoleError::Bind { address, source } => crate::address::bind_error(address, "--listen", &source),
        error => anyhow::Error::new(error),
    })?;
    let stopping = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stopping.clone()).context("installing the signal handler")?;
    }
    let admin = match args.admin {
        Some(address) => {
            let monitor = role.monitor();
            let handler: crate::http::Handler = Arc::new(move |request: &crate::http::Request| {
                match (request.method.as_str(), request.path.as_str()) {
                    ("GET", "/status") => (200, status_json(&monitor.status())),
                    _ => (404, serde_json::json!({ "error": "a copy host serves GET /status only" })),
                }
            });
            Some(admin::AdminServer::start(address, handler)?)
        }
        None => None,
    };
    start_files.started();
    while !stopping.load(Ordering::Relaxed) {
        std::thread::sleep(SIGNAL_POLL_INTERVAL);
    }
    drop(admin);
    role.stop()?;
    Ok(())
}

/// The copy host's `GET /status` document.
pub fn status_json(status: &CopyRoleStatus) -> serde_json::Value {
    serde_json::json!({
        "role": "copy",
        "volume": status.volume.display().to_string(),
        "size": status.size,
        "mirrors": status.mirrors.map(|identity| format_uuid(&identity.uuid)),
        "store_state": status.store_state.as_str(),
        "generation": status.generation,
        "epoch_promised": status.epoch_promised,
        "production": status.production.map(|peer| peer.to_string()),
        "frames_accepted": status.frames_accepted,
        "frames_rejected": status.frames_rejected,
        "old_epoch_refused": status.old_epoch_refused,
        "write_bytes_accepted": status.write_bytes_accepted,
        "frames_read_alone": status.frames_read_alone,
        // The way back to the last consistent image while a pass runs.
        "dr_image": match &status.dr_image {
            DrImage::None => serde_json::json!({ "state": "none" }),
            DrImage::Kept { generation, taken_at_ms, bytes } => serde_json::json!({
                "state": "kept", "generation": generation, "taken_at_ms": taken_at_ms, "journal_bytes": bytes,
            }),
            DrImage::Lost(why) => serde_json::json!({ "state": "lost", "why": why }),
        },
    })
}
