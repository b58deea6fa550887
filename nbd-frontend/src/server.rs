//! The NBD server: accept connections, negotiate, hand each to its own
//! transmission thread, and shut down cleanly.
//!
//! Shutdown (SIGINT/SIGTERM in the binary) sets one flag: the accept loop
//! stops, connections still negotiating are cut, connections in transmission
//! answer new requests with ESHUTDOWN and finish the ones in flight; then the
//! volume is synced.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::log_limit::LogLimit;
use engine::seam::Changes;
use engine::Volume;

use crate::connection::{self, Ending};
use crate::error::NbdError;
use crate::handshake::{self, ExportInfo};
use crate::protocol::*;

/// Repeated log lines of one kind: this many per interval, then a summary.
const LOG_LINES_PER_INTERVAL: u32 = 5;
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The one export a server offers.
#[derive(Debug, Clone)]
pub struct Export {
    /// Export name (the empty name selects it too).
    pub name: String,
    /// Free text for clients.
    pub description: String,
    /// The volume behind it.
    pub volume: Arc<Volume>,
    /// Where its changes go (to copies, when it is mirrored).
    pub changes: Changes,
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Connections served at once; more are refused with a log line.
    pub connections_max: usize,
    /// How long a client may take per handshake step.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 10809)),
            connections_max: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// A bound server.
pub struct Server {
    listener: TcpListener,
    export: Export,
    info: ExportInfo,
    config: ServerConfig,
    shutdown: Arc<AtomicBool>,
}

impl Server {
    /// Bind the listening socket.
    pub fn bind(config: ServerConfig, export: Export) -> Result<Server, NbdError> {
        let peer = config.listen.to_string();
        let listener = TcpListener::bind(config.listen).map_err(|source| NbdError::Io {
            peer: peer.clone(),
            action: "bind",
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| NbdError::Io { peer, action: "set non-blocking", source })?;
        let info = export_info(&export);
        Ok(Server { listener, export, info, config, shutdown: Arc::new(AtomicBool::new(false)) })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// The flag that stops the server when set.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// Serve until the shutdown flag is set; then finish in-flight requests
    /// and sync the volume.
    pub fn run(self) -> Result<(), NbdError> {
        let active = Arc::new(AtomicUsize::new(0));
        let negotiating: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        // Lines a client can make repeat (by connecting in a loop) are
        // rate-limited, so it cannot fill the disk with them.
        let log_limit = Arc::new(LogLimit::new(LOG_INTERVAL, LOG_LINES_PER_INTERVAL));
        while !self.shutdown.load(Ordering::Relaxed) {
            for (kind, count) in log_limit.take_suppressed(Instant::now()) {
                tracing::warn!(
                    suppressed = count,
                    "suppressed {count} similar messages in the last {} s: {kind}",
                    LOG_INTERVAL.as_secs()
                );
            }
            if !wait_readable(&self.listener, Duration::from_millis(100)) {
                threads.retain(|thread| !thread.is_finished());
                continue;
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => {
                    if log_limit.allow("accept failed", Instant::now()) {
                        tracing::warn!(%error, "accept failed");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if active.load(Ordering::Relaxed) >= self.config.connections_max {
                if log_limit.allow("connection refused: too many connections", Instant::now()) {
                    tracing::warn!(%peer, limit = self.config.connections_max, "connection refused: too many connections (raise the limit or close idle clients)");
                }
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(clone) = stream.try_clone() {
                negotiating.lock().expect("registry lock").insert(id, clone);
            }
            let context = ConnectionContext {
                volume: self.export.volume.clone(),
                changes: self.export.changes.clone(),
                info: self.info.clone(),
                shutdown: self.shutdown.clone(),
                handshake_timeout: self.config.handshake_timeout,
                negotiating: negotiating.clone(),
                id,
                log_limit: log_limit.clone(),
            };
            let active = active.clone();
            let spawned = std::thread::Builder::new().name(format!("nbd-{peer}")).spawn(move || {
                context.serve(stream, peer);
                active.fetch_sub(1, Ordering::Relaxed);
            });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => tracing::error!(%error, %peer, "could not start a connection thread"),
            }
        }
        tracing::info!(connections = active.load(Ordering::Relaxed), "shutting down: finishing in-flight requests");
        for (_, stream) in negotiating.lock().expect("registry lock").drain() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for thread in threads {
            let _ = thread.join();
        }
        if let Err(source) = self.export.volume.sync_all() {
            self.export.changes.store_sync_failed(source.raw_os_error().unwrap_or(libc::EIO));
            return Err(NbdError::Io { peer: "volume".into(), action: "final sync", source });
        }
        tracing::info!("volume synced; server stopped");
        Ok(())
    }
}

struct ConnectionContext {
    volume: Arc<Volume>,
    changes: Changes,
    info: ExportInfo,
    shutdown: Arc<AtomicBool>,
    handshake_timeout: Duration,
    negotiating: Arc<Mutex<HashMap<u64, TcpStream>>>,
    id: u64,
    log_limit: Arc<LogLimit>,
}

impl ConnectionContext {
    fn serve(self, mut stream: TcpStream, peer: SocketAddr) {
        let peer_name = peer.to_string();
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(self.handshake_timeout));
        let negotiated = handshake::negotiate(&mut stream, &self.info, &peer_name);
        self.negotiating.lock().expect("registry lock").remove(&self.id);
        let negotiated = match negotiated {
            Ok(Some(negotiated)) => negotiated,
            Ok(None) => {
                tracing::debug!(%peer, "client ended the handshake");
                return;
            }
            Err(error) => {
                if self.log_limit.allow("handshake failed", Instant::now()) {
                    tracing::warn!(%error, "handshake failed; connection closed");
                }
                return;
            }
        };
        let _ = stream.set_read_timeout(None);
        tracing::info!(%peer, structured = negotiated.structured, block_status = negotiated.base_allocation.is_some(), "client connected");
        match connection::serve(stream, self.volume, negotiated, self.shutdown, &self.changes) {
            Ok((ending, stats)) => match ending {
                Ending::Client | Ending::Shutdown => {
                    tracing::info!(%peer, ?ending, requests = stats.requests, errors = stats.errors, "connection closed")
                }
                Ending::Protocol(message) => {
                    if self.log_limit.allow("protocol violation", Instant::now()) {
                        tracing::warn!(%peer, %message, requests = stats.requests, "protocol violation; connection closed")
                    }
                }
                Ending::Io(message) => tracing::warn!(%peer, %message, "connection lost"),
            },
            Err(error) => tracing::error!(%peer, %error, "could not serve the connection"),
        }
    }
}

fn export_info(export: &Export) -> ExportInfo {
    let volume = &export.volume;
    let mut flags =
        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_DF | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    if volume.is_read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    ExportInfo {
        name: export.name.clone(),
        description: export.description.clone(),
        size: volume.size(),
        transmission_flags: flags,
    }
}

fn wait_readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut poll = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, and nfds says one.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as i32) };
    ready > 0
}
