//! `crossmirror serve`: open the volume, serve it over NBD until SIGINT or
//! SIGTERM, then finish in-flight requests, sync and exit 0. With
//! `--mirror`, every write is also shipped to the named copy hosts: the NBD
//! server (`nbd_frontend::Server`) composed with the mirroring service
//! (`engine::mirror_service`), both library services; this file keeps the
//! arguments, the checks made before anything is created, signals and the
//! admin wiring.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use engine::bitmap::{REGION_BYTES_MIN, SLOTS_MAX};
use engine::metadata::{refuse_metadata_in_dev, MetadataFiles};
use engine::mirror_service::{MirrorService, MirrorServiceConfig};
use engine::protocol::{load_secret, Secret};
use engine::replicator::{CopyConfig, MirrorMode, LOCAL_SYNC_INTERVAL_DEFAULT};
use engine::seam::Changes;
use engine::size::parse_size;
use engine::{Volume, VolumeOptions};
use nbd_frontend::{Export, Server, ServerConfig};

use crate::start_files::StartFiles;
use crate::{address, admin};

/// Arguments of `crossmirror serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Regular file or block device holding the volume.
    #[arg(long)]
    volume: PathBuf,
    /// Volume size (e.g. 1G); creates a sparse file if the path is absent.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Address to listen on: PORT (meaning 127.0.0.1:PORT), IPV4:PORT,
    /// [IPV6]:PORT or HOST:PORT (loopback by default).
    #[arg(long, default_value = "127.0.0.1:10809", value_parser = address::parse_address)]
    listen: SocketAddr,
    /// Export name (the empty name also selects it).
    #[arg(long, default_value = "")]
    export: String,
    /// Refuse writes (EPERM).
    #[arg(long)]
    read_only: bool,
    /// Open the volume with O_DIRECT (bypass the page cache).
    #[arg(long)]
    direct: bool,
    /// Connections served at once.
    #[arg(long, default_value_t = 64)]
    connections_max: usize,
    /// A copy host to ship every write to:
    /// NAME=HOST:PORT[,mode=sync|async][,lag_bytes_max=SIZE][,lag_seconds_max=SECONDS]. Repeatable
    /// (up to 8 copies). Sync is the default mode; an async copy's default
    /// lag bound is 64M.
    #[arg(long = "mirror", value_parser = parse_mirror)]
    mirrors: Vec<CopyConfig>,
    /// File holding the secret shared with the copy hosts (chmod 600).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Serve `GET /status` (JSON) and `POST /verify` over HTTP on this
    /// address (a bare port means 127.0.0.1:PORT).
    #[arg(long, value_parser = admin::parse_admin_address)]
    admin: Option<SocketAddr>,
    /// Bytes per write-intent bitmap bit (a power of two, 4K to 16M).
    /// Default: an existing bitmap's; for a new one 256K, or on volumes over
    /// 1T the smallest power of two that keeps the bitmap at 4Mi regions
    /// (512 KiB per copy slot): 1M for 4T. Larger regions mean more data
    /// resynced per dirty region.
    #[arg(long, value_parser = parse_size)]
    region_size: Option<u64>,
    /// The activity log's size: at most how much of the volume a crash of
    /// this host may leave to resync beyond the bitmap (the log holds this
    /// many bytes' worth of recently written extents, in `<volume>.cmal`; a
    /// write into a logged extent costs no metadata I/O, one into a new
    /// extent waits for one small log write shared with every writer
    /// waiting). Extents are 4 MiB (a region, when larger), and larger when
    /// the size and the volume are both over 4G: a log has at most 1,024
    /// (every log write lists them all), so 1T on a 1 TiB volume makes
    /// 1 GiB extents. A larger size buys coverage, not more separate hot
    /// areas. A size of the whole volume makes tracking nearly free once
    /// every extent is logged, and a crash then resyncs every extent
    /// written since the start, up to the whole volume. 0: no log, every
    /// newly marked region syncs the bitmap before its write is issued.
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    activity_log: u64,
    /// Resync bytes per second per copy; 0 means unlimited.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    resync_rate_max: u64,
    /// Resync by checksum: compare each dirty region's 64 KiB chunk digests (SHA-256, 128 bits)
    /// with the copy's and send only the chunks that differ (less traffic,
    /// one more read on each side). For a new copy that already holds most
    /// of the data, e.g. restored from a backup or created empty like an
    /// empty volume.
    #[arg(long)]
    resync_checksums: bool,
    /// Skip a copy's resync (the initial full sync of a new copy, say) when
    /// both stores were created empty: taken only when this volume and the
    /// copy's store are regular files with no data extents (they read as
    /// zeroes throughout); otherwise the copy is resynced as usual and the
    /// log says why. A block device cannot be proven empty: use
    /// --resync-checksums there.
    #[arg(long)]
    assume_clean: bool,
    /// Directory for the volume's metadata files (.cmmeta, .cmbitmap,
    /// .cmcopies). Default: beside a regular file; /var/lib/crossmirror for a
    /// block device.
    #[arg(long)]
    metadata_dir: Option<PathBuf>,
    /// Accept a store that is not the one this volume's metadata was made
    /// for (replaced, restored, swapped) as the volume's data: every copy is
    /// then resynced from it in full. Without it such a store is refused.
    #[arg(long)]
    new_store: bool,
}

/// Parse `NAME=HOST:PORT[,mode=sync|async][,lag_bytes_max=SIZE][,lag_seconds_max=SECONDS]`.
fn parse_mirror(text: &str) -> Result<CopyConfig, String> {
    let (name, rest) = text.split_once('=').ok_or("expected NAME=HOST:PORT[,mode=sync|async]")?;
    if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("copy name {name:?}: use 1 to 64 letters, digits, '-' or '_'"));
    }
    let mut parts = rest.split(',');
    let address = parts.next().unwrap_or_default();
    let address = address::parse_address(address).map_err(|error| format!("copy {name}: {error}"))?;
    let mut config = CopyConfig {
        name: name.to_string(),
        address: Some(address),
        mode: MirrorMode::Sync,
        lag_bytes_max: engine::replicator::LAG_BYTES_MAX_DEFAULT,
        lag_ms_max: engine::replicator::LAG_MS_MAX_DEFAULT,
        compress: engine::protocol::Compression::None,
    };
    for option in parts {
        match option.split_once('=') {
            Some(("mode", "sync")) => config.mode = MirrorMode::Sync,
            Some(("mode", "async")) => config.mode = MirrorMode::Async,
            Some(("lag_bytes_max", size)) => {
                config.lag_bytes_max =
                    parse_size(size).map_err(|error| format!("copy {name}: lag_bytes_max: {error}"))?
            }
            Some(("lag_seconds_max", seconds)) => {
                config.lag_ms_max = engine::replicator::parse_lag_seconds(seconds)
                    .map_err(|error| format!("copy {name}: lag_seconds_max: {error}"))?
            }
            Some(("compress", setting)) => {
                config.compress =
                    engine::protocol::Compression::parse(setting).map_err(|error| format!("copy {name}: {error}"))?
            }
            _ => {
                return Err(format!(
                    "copy {name}: unknown option {option:?} (use mode=sync|async, lag_bytes_max=SIZE, lag_seconds_max=SECONDS, \
                     compress=none|lz4|zstd[:LEVEL])"
                ))
            }
        }
    }
    Ok(config)
}

/// Run the server until a signal stops it.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Everything that can be checked is checked before anything is created.
    let files = MetadataFiles::locate(&args.volume, is_block_device(&args.volume), args.metadata_dir.as_deref());
    let secret = check_configuration(&args, &files)?;
    let start_files = StartFiles::note(&[
        args.volume.clone(),
        files.bitmap.clone(),
        files.state.clone(),
        files.metadata.clone(),
        files.activity_log.clone(),
    ]);
    let options =
        VolumeOptions { path: args.volume.clone(), size: args.size, direct: args.direct, read_only: args.read_only };
    let volume = Arc::new(Volume::open(&options)?);
    // Fail now, with the cause and the fix, if io_uring is unavailable,
    // rather than on the first client.
    engine::Ring::<()>::new(2)?;
    let mirror_service = match secret {
        Some(secret) => Some(start_mirror(&args, &volume, &files, secret)?),
        None => None,
    };
    let export = Export {
        name: args.export.clone(),
        description: format!("crossmirror volume {}", args.volume.display()),
        volume: volume.clone(),
        changes: mirror_service
            .as_ref()
            .map(MirrorService::replicator)
            .map_or_else(Changes::unmirrored, Changes::mirrored),
    };
    let config = ServerConfig { listen: args.listen, connections_max: args.connections_max, ..ServerConfig::default() };
    let server = Server::bind(config, export).map_err(|error| listen_error(args.listen, error))?;
    let shutdown = server.shutdown_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone()).context("installing the signal handler")?;
    }
    let admin = match args.admin {
        Some(address) => Some(admin::AdminServer::production(address, mirror_service.as_ref(), volume.clone())?),
        None => None,
    };
    start_files.started();
    tracing::info!(
        listen = %server.local_addr(),
        volume = %args.volume.display(),
        size = volume.size(),
        kind = ?volume.kind(),
        direct = volume.is_direct(),
        read_only = volume.is_read_only(),
        "serving"
    );
    // The server's export lets go of the replicator when it stops, and the
    // admin endpoint holds it only while it answers: the stop then releases
    // the bitmap too.
    let served = server.run();
    // The admin endpoint goes first, as copy-host's does: no new verify can
    // take the replicator while mirroring stops.
    drop(admin);
    if let Some(mirror_service) = mirror_service {
        mirror_service.stop();
    }
    served?;
    Ok(())
}

/// Whether `path` names an existing block device (its metadata then lives in
/// a metadata directory, not beside it in /dev).
fn is_block_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|metadata| metadata.file_type().is_block_device())
}

/// The error for a failed bind of `--listen`, in one line.
fn listen_error(listen: SocketAddr, error: nbd_frontend::NbdError) -> anyhow::Error {
    let io_error = std::error::Error::source(&error).and_then(|source| source.downcast_ref::<std::io::Error>());
    match io_error {
        Some(io_error) => address::bind_error(listen, "--listen", io_error),
        None => anyhow::Error::new(error).context(format!("cannot listen on {listen} (--listen)")),
    }
}

/// Check the options that need no volume, before anything is created; with
/// copies configured, the secret they share.
fn check_configuration(args: &ServeArgs, files: &MetadataFiles) -> anyhow::Result<Option<Secret>> {
    refuse_metadata_in_dev(&args.volume, is_block_device(&args.volume), args.metadata_dir.as_deref(), files)?;
    if args.mirrors.is_empty() {
        anyhow::ensure!(args.secret_file.is_none(), "--secret-file is for --mirror; no copy is configured");
        // Writes served without the replicator would bypass the bitmap, and a
        // later mirrored start would trust it: the copies would silently
        // miss them. Refuse instead.
        anyhow::ensure!(
            args.read_only || !files.state.exists(),
            "volume {} has copies ({} exists): serve it with its --mirror options, or, to stop mirroring it, \
             remove {} and {} (every copy then needs a full sync if it is mirrored again)",
            args.volume.display(),
            files.state.display(),
            files.state.display(),
            files.bitmap.display()
        );
        return Ok(None);
    }
    anyhow::ensure!(!args.read_only, "a read-only volume has no writes to mirror; drop --read-only or --mirror");
    anyhow::ensure!(
        args.mirrors.len() <= SLOTS_MAX as usize,
        "{} copies configured; at most {SLOTS_MAX} are supported",
        args.mirrors.len()
    );
    for (index, copy) in args.mirrors.iter().enumerate() {
        anyhow::ensure!(
            !args.mirrors[..index].iter().any(|other| other.name == copy.name),
            "copy name {} is given twice",
            copy.name
        );
    }
    if let Some(region_size) = args.region_size {
        anyhow::ensure!(
            region_size.is_power_of_two() && (REGION_BYTES_MIN..=16 << 20).contains(&region_size),
            "--region-size {region_size} must be a power of two from 4K to 16M (a resync frame carries at most one region)"
        );
    }
    let secret_file = args
        .secret_file
        .as_ref()
        .context("--mirror needs --secret-file FILE, the secret shared with the copy hosts")?;
    Ok(Some(load_secret(secret_file)?))
}

/// Start mirroring the volume to the copies of `--mirror`, at epoch 1.
fn start_mirror(
    args: &ServeArgs,
    volume: &Arc<Volume>,
    files: &MetadataFiles,
    secret: Secret,
) -> anyhow::Result<MirrorService> {
    let config = MirrorServiceConfig {
        volume: volume.clone(),
        files: files.clone(),
        copies: args.mirrors.clone(),
        secret,
        epoch: 1,
        region_bytes: args.region_size,
        activity_log_bytes: args.activity_log,
        resync_rate_max: args.resync_rate_max,
        resync_checksums: args.resync_checksums,
        assume_clean: args.assume_clean,
        new_store: args.new_store,
        local_sync_interval: LOCAL_SYNC_INTERVAL_DEFAULT,
        source_address: None,
        bitmap_trust: engine::replicator::BitmapTrust::Always,
        state_store: None,
        generation: None,
    };
    Ok(MirrorService::start(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--mirror` takes the lag bound in time as seconds (default 4 s, 0 for
    /// none) and refuses what is not a number of seconds in range.
    #[test]
    fn mirror_option_takes_lag_seconds_max() {
        let default = parse_mirror("dr=127.0.0.2:7789,mode=async").unwrap();
        assert_eq!(default.lag_ms_max, engine::replicator::LAG_MS_MAX_DEFAULT);
        assert_eq!(parse_mirror("dr=127.0.0.2:7789,mode=async,lag_seconds_max=0.25").unwrap().lag_ms_max, 250);
        assert_eq!(parse_mirror("dr=127.0.0.2:7789,mode=async,lag_seconds_max=0").unwrap().lag_ms_max, 0);
        assert_eq!(
            parse_mirror("dr=127.0.0.2:7789,lag_seconds_max=soon").unwrap_err(),
            "copy dr: lag_seconds_max: \"soon\" is not a number of seconds (like 4 or 0.5)"
        );
        assert_eq!(
            parse_mirror("dr=127.0.0.2:7789,lag_seconds_max=7200").unwrap_err(),
            "copy dr: lag_seconds_max: \"7200\": use 0 (no bound) to 3600 seconds"
        );
    }
}
