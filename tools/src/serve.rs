//! `crossmirror serve`: open the volume, serve it over NBD until SIGINT or
//! SIGTERM, then finish in-flight requests, sync and exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use engine::{Volume, VolumeOptions};
use nbd_frontend::{Export, Server, ServerConfig};

use crate::size::parse_size;

/// Arguments of `crossmirror serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Regular file or block device holding the volume.
    #[arg(long)]
    volume: PathBuf,
    /// Volume size (e.g. 1G); creates a sparse file if the path is absent.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:10809")]
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
}

/// Run the server until a signal stops it.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let options =
        VolumeOptions { path: args.volume.clone(), size: args.size, direct: args.direct, read_only: args.read_only };
    let volume = Arc::new(Volume::open(&options)?);
    // Fail now, with the cause and the fix, if io_uring is unavailable,
    // rather than on the first client.
    engine::Ring::<()>::new(2)?;
    let export = Export {
        name: args.export.clone(),
        description: format!("crossmirror volume {}", args.volume.display()),
        volume: volume.clone(),
    };
    let config = ServerConfig { listen: args.listen, connections_max: args.connections_max, ..ServerConfig::default() };
    let server = Server::bind(config, export).with_context(|| format!("cannot listen on {}", args.listen))?;
    let shutdown = server.shutdown_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone()).context("installing the signal handler")?;
    }
    tracing::info!(
        listen = %server.local_addr(),
        volume = %args.volume.display(),
        size = volume.size(),
        kind = ?volume.kind(),
        direct = volume.is_direct(),
        read_only = volume.is_read_only(),
        "serving"
    );
    server.run()?;
    Ok(())
}
