//! `crossmirror node --config FILE --name NODE`: run one member (or witness)
//! of a group; `--all` runs every member and witness whose address is on
//! this machine, one child process each, and prints the NBD address and a
//! mount recipe.
//!
//! The group logic is `cluster_glue::node`; this file gives it the roles,
//! which compose the NBD server (nbd-frontend) with the mirror service and
//! the copy role (engine), and serves the node's `GET /status`.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use cluster_glue::config::GroupConfig;
use cluster_glue::node::{CopySpec, NodeOptions, ProductionSpec, Request, Requests, RoleRunner, StatusBoard};
use engine::copy_role::{CopyListen, CopyRole, CopyRoleConfig};
use engine::metadata::MetadataFiles;
use engine::mirror_service::{MirrorService, MirrorServiceConfig};
use engine::protocol::load_secret;
use engine::replicator::{BitmapTrust, LOCAL_SYNC_INTERVAL_DEFAULT};
use engine::seam::Changes;
use engine::{Volume, VolumeOptions};
use nbd_frontend::{Export, NbdError, Server, ServerConfig};
use serde_json::json;

/// Arguments of `crossmirror node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The group config (TOML; the same file on every member).
    #[arg(long)]
    config: PathBuf,
    /// This node's name: a member or witness of the config.
    #[arg(long, required_unless_present = "all")]
    name: Option<String>,
    /// Run every member and witness whose address is on this machine, each
    /// in its own process (a whole group on one machine, for a demo or a
    /// test).
    #[arg(long, conflicts_with = "name")]
    all: bool,
}

/// Run the node (or every local node) until SIGINT/SIGTERM.
pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = GroupConfig::load(&args.config)?;
    match args.name {
        Some(name) => run_one(config, name),
        None => run_all(&args.config, &config),
    }
}

fn run_one(config: GroupConfig, name: String) -> anyhow::Result<()> {
    cluster_glue::node::check_name(&config, &name).map_err(anyhow::Error::msg)?;
    let secret = load_secret(&config.secret_file)
        .with_context(|| format!("the group's secret_file {}", config.secret_file.display()))?;
    let leave = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, leave.clone()).context("installing the signal handler")?;
    }
    let address = config
        .member(&name)
        .map(|member| member.address)
        .or_else(|| config.witness(&name).map(|witness| witness.address))
        .expect("checked above");
    let board: StatusBoard = Arc::new(Mutex::new(json!({ "node": name, "phase": "starting" })));
    let requests: Requests = Arc::default();
    let admin = {
        let (board, requests) = (board.clone(), requests.clone());
        let sites: Vec<String> = config.sites.iter().map(|site| site.name.clone()).collect();
        let handler: crate::http::Handler = Arc::new(move |request: &crate::http::Request| {
            match (request.method.as_str(), request.path.as_str()) {
                ("GET", "/status") => (200, board.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()),
                ("POST", "/switchover") => {
                    let epoch =
                        board.lock().unwrap_or_else(std::sync::PoisonError::into_inner)["record"]["epoch"].as_u64();
                    switchover_request(&request.query, &sites, &requests, epoch)
                }
                ("POST", "/promote") => promote_request(&request.query, &sites, &requests),
                _ => (
                    404,
                    json!({ "error": "a node serves GET /status, POST /switchover?to=SITE and POST /promote?site=SITE&accept-data-loss=yes" }),
                ),
            }
        });
        crate::admin::AdminServer::start(SocketAddr::new(address, config.ports.admin), handler)?
    };
    let mut roles = Roles::default();
    let result = cluster_glue::node::run(NodeOptions { config, name, secret }, &mut roles, &leave, &board, &requests);
    roles.stop_production();
    roles.stop_copy();
    drop(admin);
    result.map_err(anyhow::Error::msg)
}

/// `POST /switchover?to=SITE`: queue the request for the node thread, with
/// the record's epoch the node shows now (`epoch`): if the production role
/// has moved by the time the node thread takes it, it is refused.
fn switchover_request(
    query: &str,
    sites: &[String],
    requests: &Requests,
    epoch: Option<u64>,
) -> (u16, serde_json::Value) {
    let to = query.split('&').find_map(|pair| pair.strip_prefix("to=")).unwrap_or_default();
    if !sites.iter().any(|site| site == to) {
        return (
            400,
            json!({ "error": format!("name a site of the group: POST /switchover?to=SITE (sites: {})", sites.join(", ")) }),
        );
    }
    requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Request::Switchover { to: to.to_string(), asked_at: epoch });
    (202, json!({ "asked": "switchover", "to": to, "epoch": epoch }))
}

/// `POST /promote?site=SITE&accept-data-loss=yes`: queue a forced
/// promotion; refused without the explicit acceptance of data loss.
fn promote_request(query: &str, sites: &[String], requests: &Requests) -> (u16, serde_json::Value) {
    let value = |key: &str| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
            .unwrap_or_default()
    };
    let site = value("site");
    if !sites.iter().any(|known| known == site) {
        return (
            400,
            json!({ "error": format!("name a site of the group: POST /promote?site=SITE&accept-data-loss=yes (sites: {})", sites.join(", ")) }),
        );
    }
    if value("accept-data-loss") != "yes" {
        return (
            400,
            json!({ "error": "a forced promotion may lose acknowledged writes: say accept-data-loss=yes (crossmirror promote --accept-data-loss)" }),
        );
    }
    requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Request::Promote { site: site.to_string() });
    (202, json!({ "asked": "promote", "site": site }))
}

/// Whether this machine has `address` (binding it works).
fn is_local(address: std::net::IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(address, 0)).is_ok()
}

fn run_all(path: &std::path::Path, config: &GroupConfig) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing the signal handler")?;
    }
    let voters = config.voters();
    let local: Vec<_> = voters.iter().filter(|voter| is_local(voter.address)).collect();
    anyhow::ensure!(!local.is_empty(), "no member or witness of {} has an address on this machine", path.display());
    if !config.secret_file.exists() {
        // Every node runs here: the secret needs no copying. Made once.
        create_secret(&config.secret_file)?;
        println!("created the group's secret {} (32 random bytes, mode 600)", config.secret_file.display());
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let mut children: Vec<(String, Child)> = Vec::new();
    for voter in &local {
        let child = std::process::Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(path)
            .arg("--name")
            .arg(&voter.name)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting node {}", voter.name))?;
        children.push((voter.name.clone(), child));
    }
    let production = config.production_site();
    let hosts: Vec<String> = config
        .site_members(&production.name)
        .iter()
        .map(|member| SocketAddr::new(member.address, config.ports.nbd).to_string())
        .collect();
    let first = hosts.first().cloned().unwrap_or_default();
    let (ip, port) = first.rsplit_once(':').unwrap_or((&first, ""));
    println!(
        "group {}: started {} node(s) here: {}\n\
         the production host serves NBD at {} (whichever member of site {} hosts it)\n\
         status:  crossmirror status --config {}\n\
         mount:   nbd-client {ip} {port} /dev/nbd0 && mount /dev/nbd0 /mnt     (a kernel with nbd.ko)\n\
         \x20        nbdfuse /tmp/nbd nbd://{first} & losetup -f --show /tmp/nbd/nbd && mkfs.ext4 /dev/loopN && mount /dev/loopN /mnt\n\
         stop:    Ctrl-C (every node leaves gracefully)",
        config.group,
        children.len(),
        local.iter().map(|voter| voter.name.as_str()).collect::<Vec<_>>().join(", "),
        hosts.join(" or "),
        production.name,
        path.display(),
    );
    while !stop.load(Ordering::Relaxed) && children.iter_mut().any(|(_, child)| matches!(child.try_wait(), Ok(None))) {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Top-down: the production site's members leave first (NBD drained and
    // flushed while the copies still take the last writes, so they stay
    // current), then the copy hosts, then the witnesses.
    let rank = |name: &str| match config.member(name) {
        Some(member) if member.site == production.name => 0,
        Some(_) => 1,
        None => 2,
    };
    children.sort_by_key(|(name, _)| rank(name));
    let mut failed = Vec::new();
    for rank_now in 0..3 {
        for (_, child) in children.iter_mut().filter(|(name, _)| rank(name) == rank_now) {
            // SAFETY: kill(2) with a child's pid and SIGTERM has no memory effects.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        for (name, child) in children.iter_mut().filter(|(name, _)| rank(name) == rank_now) {
            match child.wait() {
                Ok(status) if status.success() => {}
                Ok(status) => failed.push(format!("{name}: {status}")),
                Err(error) => failed.push(format!("{name}: {error}")),
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "nodes failed: {}", failed.join(", "));
    Ok(())
}

/// Write a new random secret to `path`, private to its owner.
fn create_secret(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| anyhow::anyhow!("no randomness for the secret: {error}"))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the secret {}", path.display()))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    Ok(())
}

/// The production role: mirroring plus the NBD server on a thread.
struct Production {
    service: MirrorService,
    shutdown: Arc<AtomicBool>,
    server: Option<JoinHandle<Result<(), NbdError>>>,
    nbd: SocketAddr,
    epoch: u64,
}

/// The roles of one node.
#[derive(Default)]
struct Roles {
    production: Option<Production>,
    copy: Option<CopyRole>,
}

fn is_block_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_block_device())
}

impl RoleRunner for Roles {
    fn start_production(&mut self, spec: ProductionSpec) -> Result<String, String> {
        if let Some(image) = spec.roll_back_to {
            // A forced promotion of this member's syncing copy: its store
            // goes back to the DR image the group recorded before anything
            // is served; when it cannot, nothing is (the error is recorded
            // in this member's entry and the group has no production host).
            roll_back_to_dr_image(&spec.volume, spec.size, image)?;
        }
        let options =
            VolumeOptions { path: spec.volume.clone(), size: Some(spec.size), direct: false, read_only: false };
        let volume = Arc::new(Volume::open(&options).map_err(|error| error.to_string())?);
        let files = MetadataFiles::locate(&spec.volume, is_block_device(&spec.volume), None);
        let service = MirrorService::start(MirrorServiceConfig {
            volume: volume.clone(),
            files,
            copies: spec.copies,
            secret: spec.secret,
            epoch: spec.epoch,
            region_bytes: Some(spec.region_bytes),
            activity_log_bytes: engine::activity_log::ACTIVITY_LOG_BYTES_DEFAULT,
            resync_rate_max: spec.resync_rate_max,
            resync_checksums: false,
            assume_clean: false,
            new_store: false,
            local_sync_interval: LOCAL_SYNC_INTERVAL_DEFAULT,
            source_address: Some(spec.nbd_listen.ip()),
            state_store: Some(spec.state_store),
            generation: None,
            bitmap_trust: BitmapTrust::ByGeneration { generation: spec.generation, identical: spec.identical },
        })
        .map_err(|error| error.to_string())?;
        let export = Export {
            name: spec.export,
            description: format!("crossmirror volume {}", spec.volume.display()),
            volume,
            changes: Changes::mirrored(service.replicator()).gated(spec.gate),
        };
        let config = ServerConfig { listen: spec.nbd_listen, ..ServerConfig::default() };
        let server = match Server::bind(config, export) {
            Ok(server) => server,
            Err(error) => {
                service.stop();
                return Err(format!("cannot serve NBD on {}: {error}", spec.nbd_listen));
            }
        };
        let shutdown = server.shutdown_flag();
        let nbd = server.local_addr();
        let thread = std::thread::Builder::new()
            .name("nbd-server".into())
            .spawn(move || server.run())
            .map_err(|error| format!("cannot start the NBD server thread: {error}"))?;
        tracing::info!(%nbd, epoch = spec.epoch, "serving NBD at {nbd}");
        let store = engine::metadata::format_uuid(&service.store_token()).replace('-', "");
        self.production = Some(Production { service, shutdown, server: Some(thread), nbd, epoch: spec.epoch });
        Ok(store)
    }

    fn set_copy_host(&mut self, site: &str, address: Option<SocketAddr>) {
        if let Some(production) = &self.production {
            production.service.replicator().set_copy_address(site, address);
        }
    }

    fn stop_production(&mut self) {
        let Some(mut production) = self.production.take() else { return };
        production.shutdown.store(true, Ordering::Relaxed);
        let mut clean = true;
        if let Some(server) = production.server.take() {
            match server.join() {
                Ok(Err(error)) => {
                    tracing::warn!(%error, "the NBD server ended with an error");
                    clean = false;
                }
                Err(_) => {
                    tracing::error!("the NBD server thread panicked");
                    clean = false;
                }
                Ok(Ok(())) => {}
            }
        }
        let volume = production.service.volume().path().to_path_buf();
        production.service.stop();
        if !clean {
            // The final flush may have failed: this store is no longer the
            // one a hand-over recorded (it is resynced in full if it is a
            // copy again).
            let files = MetadataFiles::locate(&volume, is_block_device(&volume), None);
            if let Err(error) = engine::metadata::new_lineage(&files) {
                tracing::error!(%error, "cannot give the store a new token after an unclean stop; do not promote its site");
            }
        }
        tracing::info!("stopped serving NBD and mirroring");
    }

    fn start_copy(&mut self, spec: CopySpec) -> Result<(), String> {
        let role = CopyRole::start(CopyRoleConfig {
            volume: VolumeOptions { path: spec.volume, size: Some(spec.size), direct: spec.direct, read_only: false },
            metadata_dir: None,
            listen: CopyListen::Address(spec.listen),
            secret: spec.secret,
            dr_image_max: None,
        })
        .map_err(|error| error.to_string())?;
        self.copy = Some(role);
        Ok(())
    }

    fn stop_copy(&mut self) {
        if let Some(role) = self.copy.take() {
            if let Err(error) = role.stop() {
                tracing::warn!(%error, "stopping the copy role");
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        json!({
            "production": self.production.as_ref().map(|production| {
                let replicator = production.service.replicator();
                let mut status = crate::admin::status_json(Some(&replicator), replicator_volume(production));
                status["nbd"] = json!(production.nbd.to_string());
                status["epoch"] = json!(production.epoch);
                status["deposed"] = json!(replicator.deposed());
                status
            }),
            "copy": self.copy.as_ref().map(|role| crate::copy_host::status_json(&role.status())),
        })
    }
}

/// Roll the store at `volume` back to the DR image `(generation, taken at
/// Unix ms)` its undo journal keeps (`engine::dr_image::restore_image`, as
/// `crossmirror rollback` does): recorded consistent with a new store token.
/// A store consistent already (rolled back by an earlier start of this
/// epoch, or its pass ended before the copy role stopped) is served as it is.
fn roll_back_to_dr_image(volume: &std::path::Path, size: u64, image: (u64, u64)) -> Result<(), String> {
    let (generation, taken_at_ms) = image;
    let files = MetadataFiles::locate(volume, is_block_device(volume), None);
    match engine::dr_image::restore_image(volume, &files, size, Some(image)) {
        Ok(Some(rolled)) => {
            tracing::warn!(
                generation,
                taken_at_ms,
                entries = rolled.entries,
                "forced promotion: rolled the store back to its DR image of generation {generation} taken at \
                 {taken_at_ms} (Unix ms): {} bytes in {} journal entries written back; every write after it is given up",
                rolled.bytes,
                rolled.entries
            );
            Ok(())
        }
        Ok(None) => {
            tracing::warn!("forced promotion to a DR image: the store is consistent already; served as it is");
            Ok(())
        }
        Err(error) => Err(format!(
            "cannot roll the store back to its DR image of generation {generation} taken at {taken_at_ms} \
             (forced promotion): {error}; not serving it"
        )),
    }
}

fn replicator_volume(production: &Production) -> &Volume {
    production.service.volume()
}
