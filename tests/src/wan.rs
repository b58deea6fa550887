//! An emulated WAN between a production host and one copy host, for the
//! disaster-recovery tests and `benches/wan.py` (issue 13, item 6).
//!
//! ```text
//!  root namespace                                       namespace crossmirror-wan-<pid>-<n>
//!  production ──▶ DelayProxy ──▶ veth (tbf rate R) ═════════▶ veth ──▶ copy host
//!  (127.0.0.1)    10.231.a.b+1   holds each chunk RTT/2       10.231.a.b+2
//!            ◀── each way  ◀──────── (tbf rate R) ◀═════════ veth ◀──
//! ```
//!
//! The copy host runs in a network namespace of its own (started through
//! `ip netns exec`), joined to this one by a veth pair whose two ends are
//! shaped by `tc tbf` to the rate, each on its egress, so both directions
//! are limited. This kernel has no `netem`, so the delay is the
//! [`DelayProxy`]'s: a TCP proxy on the production side that holds every
//! chunk it reads for RTT/2 before it writes it on, in each direction, with
//! its own buffering bounded to about what a pipe of that rate and delay
//! holds — so the path behaves like a long fat pipe: a full window is in
//! flight, and a sender that outruns the rate meets back pressure, not an
//! endless buffer. Each direction has a reading thread and a writing thread
//! around a delay line (a queue of chunks stamped with when they are due),
//! so a chunk waiting out its delay never holds up the other direction, and
//! no thread is made per chunk.
//!
//! Addresses come from 10.231.0.0/16, a private range, one /30 per rig,
//! chosen under a file lock so that rigs of concurrent test processes never
//! share one; nothing is routed off the machine. Everything a rig creates —
//! the namespace, the veth pair, the qdiscs, every process in the namespace
//! — is removed on drop (also when a test panics); a rig left behind by a
//! test process that was killed is removed by the next rig made.
//! `wan_rig_delivers_its_rate_and_round_trip_time` (tests/tests/wan.rs)
//! measures a rig with iperf3 and echoes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::mirror::{Copy, Mirror};
use crate::{require_root, require_tool, run, run_output};

/// Namespaces of rigs are named this, then the test process's id and a count.
const NAMESPACE_PREFIX: &str = "crossmirror-wan-";
/// The interface inside the namespace (the namespace is the rig's own).
const INSIDE_INTERFACE: &str = "wan0";
/// Serializes choosing a subnet and creating the rig across processes.
const LOCK_FILE: &str = "/tmp/crossmirror-wan.lock";
/// Rigs get 10.231.X.Y/30 subnets: 64 per third octet.
const SUBNETS_MAX: u32 = 256 * 64;
/// The longest a tbf queue holds a packet: the bottleneck's buffer, small
/// next to the delay so it adds little to the round trip under load.
const TBF_LATENCY_MS: u64 = 5;
/// The most bytes the proxy reads at once (one chunk of the delay line).
const CHUNK_BYTES: usize = 64 << 10;
/// The proxy's socket buffers: small, so that the bytes between the two
/// hosts are mostly in the delay line (about one pipe's worth), as on a
/// real path, rather than in kernel buffers on this machine.
const PROXY_SOCKET_BUFFER_BYTES: usize = 256 << 10;
/// How long the proxy waits for the copy host to accept its connection.
const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this machine can build a rig: root, `ip` and `tc` (iproute2).
/// Says why the test is skipped when not (under CI, fails).
pub fn available() -> bool {
    require_root() && require_tool("ip") && require_tool("tc")
}

/// An emulated WAN: a network namespace for the copy host, a shaped veth
/// pair to it, and the delay its proxies add. Removed on drop.
pub struct Wan {
    /// The namespace's name (`ip netns exec` takes it).
    pub namespace: String,
    /// The root namespace's end of the veth pair.
    host_interface: String,
    /// The address on this side (proxies listen on it).
    pub production_ip: Ipv4Addr,
    /// The address inside the namespace (the copy host listens on it).
    pub copy_ip: Ipv4Addr,
    /// The link's rate each way, in bits per second.
    pub rate_bits_per_second: u64,
    /// The round trip time a proxy adds (half each way).
    pub round_trip: Duration,
}

impl Wan {
    /// A link of `rate_bits_per_second` each way and `round_trip` (through
    /// a [`Wan::proxy`]). Call [`available`] first.
    pub fn new(rate_bits_per_second: u64, round_trip: Duration) -> Wan {
        assert!(rate_bits_per_second >= 1_000_000, "a rig's rate is at least 1 Mbit/s");
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let lock = CreationLock::take();
        remove_orphaned_rigs();
        let (production_ip, copy_ip) = free_subnet();
        let namespace = format!("{NAMESPACE_PREFIX}{pid}-{count}");
        run("ip", &["netns", "add", &namespace]);
        // From here on, drop removes whatever was made, should a step fail.
        let wan = Wan {
            namespace,
            host_interface: format!("cmw{pid}-{count}"),
            production_ip,
            copy_ip,
            rate_bits_per_second,
            round_trip,
        };
        assert!(wan.host_interface.len() <= 15, "interface name {} is too long", wan.host_interface);
        wan.build();
        drop(lock);
        wan
    }

    fn build(&self) {
        let (namespace, host) = (self.namespace.as_str(), self.host_interface.as_str());
        run("ip", &["link", "add", host, "type", "veth", "peer", "name", INSIDE_INTERFACE, "netns", namespace]);
        run("ip", &["addr", "add", &format!("{}/30", self.production_ip), "dev", host]);
        run("ip", &["link", "set", host, "up"]);
        run("ip", &["-n", namespace, "addr", "add", &format!("{}/30", self.copy_ip), "dev", INSIDE_INTERFACE]);
        run("ip", &["-n", namespace, "link", "set", INSIDE_INTERFACE, "up"]);
        run("ip", &["-n", namespace, "link", "set", "lo", "up"]);
        let shape = self.tbf_arguments();
        let shape: Vec<&str> = shape.iter().map(String::as_str).collect();
        let mut outside = vec!["qdisc", "add", "dev", host, "root"];
        outside.extend_from_slice(&shape);
        run("tc", &outside);
        let mut inside = vec!["-n", namespace, "qdisc", "add", "dev", INSIDE_INTERFACE, "root"];
        inside.extend_from_slice(&shape);
        run("tc", &inside);
    }

    /// `tbf rate R burst B latency L`: a bucket of at least 1 ms of the
    /// rate (and at least a few full frames), the queue TBF_LATENCY_MS long.
    fn tbf_arguments(&self) -> Vec<String> {
        let burst_bytes = (self.rate_bits_per_second / 8 / 1000).max(16 << 10);
        vec![
            "tbf".into(),
            "rate".into(),
            format!("{}bit", self.rate_bits_per_second),
            "burst".into(),
            burst_bytes.to_string(),
            "latency".into(),
            format!("{TBF_LATENCY_MS}ms"),
        ]
    }

    /// `program` run inside the namespace (`ip netns exec`, which execs it:
    /// the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace, program]);
        command
    }

    /// A listener on the copy side's address and `port` (0: any), made
    /// inside the namespace by a thread that enters it and ends; the
    /// listener stays in the namespace, so this process can serve it.
    pub fn listen_inside(&self, port: u16) -> TcpListener {
        let path = format!("/var/run/netns/{}", self.namespace);
        let address = SocketAddr::from((self.copy_ip, port));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let namespace = File::open(&path).unwrap_or_else(|error| panic!("open {path}: {error}"));
                    // SAFETY: setns with a namespace file descriptor held
                    // open for the call; CLONE_NEWNET moves only this thread,
                    // which makes one socket and ends.
                    let entered = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "setns into {path}: {}", std::io::Error::last_os_error());
                    TcpListener::bind(address).unwrap_or_else(|error| panic!("listen on {address}: {error}"))
                })
                .join()
                .expect("the listening thread")
        })
    }

    /// A delay proxy listening on this side, forwarding every connection
    /// to `target` (inside the namespace) over the shaped link, RTT/2 each way.
    pub fn proxy(&self, target: SocketAddr) -> DelayProxy {
        DelayProxy::start(SocketAddr::from((self.production_ip, 0)), target, self.round_trip / 2, self.pipe_bytes())
    }

    /// What the delay line of one direction holds at most: the bytes in
    /// flight at the rate over half the round trip, with a quarter more and
    /// a chunk to spare, so the line never limits the rate.
    fn pipe_bytes(&self) -> usize {
        let in_flight = u128::from(self.rate_bits_per_second / 8) * (self.round_trip / 2).as_micros() / 1_000_000;
        let in_flight = usize::try_from(in_flight).expect("a pipe fits memory");
        in_flight + in_flight / 4 + 2 * CHUNK_BYTES
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        kill_processes_in(&self.namespace);
        let _ = Command::new("tc").args(["qdisc", "del", "dev", &self.host_interface, "root"]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_interface]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.namespace]).output();
    }
}

/// An exclusive lock on LOCK_FILE, held while a rig picks its subnet and
/// is made (a subnet is taken once its address is on the interface).
struct CreationLock {
    file: File,
}

impl CreationLock {
    fn take() -> CreationLock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|error| panic!("open {LOCK_FILE}: {error}"));
        // SAFETY: flock on a descriptor this struct owns; blocking is fine.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(locked, 0, "flock {LOCK_FILE}: {}", std::io::Error::last_os_error());
        CreationLock { file }
    }
}

impl Drop for CreationLock {
    fn drop(&mut self) {
        // SAFETY: unlocks the lock taken on the descriptor this struct owns.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The first /30 of 10.231.0.0/16 whose addresses no interface here has:
/// (this side's address, the copy side's).
fn free_subnet() -> (Ipv4Addr, Ipv4Addr) {
    let listing = run("ip", &["-o", "-4", "addr", "show"]);
    for index in 0..SUBNETS_MAX {
        let (third, fourth) = ((index / 64) as u8, (index % 64 * 4) as u8);
        let production = Ipv4Addr::new(10, 231, third, fourth + 1);
        let copy = Ipv4Addr::new(10, 231, third, fourth + 2);
        let taken = |address: Ipv4Addr| listing.contains(&format!("inet {address}/"));
        if !taken(production) && !taken(copy) {
            return (production, copy);
        }
    }
    panic!("every /30 of 10.231.0.0/16 is in use: are rigs left behind? (ip netns list)");
}

/// SIGKILL every process in `namespace` and wait (up to 10 s) until none is left.
fn kill_processes_in(namespace: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listing = run_output("ip", &["netns", "pids", namespace]);
        let pids: Vec<i32> =
            String::from_utf8_lossy(&listing.stdout).split_whitespace().filter_map(|pid| pid.parse().ok()).collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: kill has no memory effects; these are processes this
            // harness started in a namespace it made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Remove the rigs of test processes that are gone (killed before their
/// rig's drop ran): their processes, then their namespace, which takes the
/// veth pair and its qdiscs with it.
fn remove_orphaned_rigs() {
    let listing = run_output("ip", &["netns", "list"]);
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NAMESPACE_PREFIX) else { continue };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_processes_in(name);
        let _ = Command::new("ip").args(["netns", "del", name]).output();
    }
}

/// A TCP proxy that delays every byte by a fixed time each way, with the
/// bytes it holds bounded (see the module docs). Stops on drop.
pub struct DelayProxy {
    /// Where it listens.
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the acceptor and the connections share with the proxy's owner.
#[derive(Default)]
struct ProxyShared {
    /// Both sockets of every connection, to shut them down on drop.
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Bytes written to the target (the copy host) and back to clients.
    bytes_to_target: AtomicU64,
    bytes_to_client: AtomicU64,
    connections: AtomicU64,
}

impl DelayProxy {
    fn start(listen: SocketAddr, target: SocketAddr, delay: Duration, line_bytes: usize) -> DelayProxy {
        let listener = TcpListener::bind(listen).unwrap_or_else(|error| panic!("proxy listen on {listen}: {error}"));
        // Accepted sockets inherit the small buffer (set before the
        // handshake, so the window is sized for it).
        socket_buffers(&listener);
        let address = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(ProxyShared::default());
        let acceptor = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::Builder::new()
                .name("wan-proxy-accept".into())
                .spawn(move || accept_loop(listener, target, delay, line_bytes, &stop, &shared))
                .expect("spawn the proxy's acceptor")
        };
        DelayProxy { address, stop, shared, acceptor: Some(acceptor) }
    }

    /// Bytes forwarded so far: (to the target, back to clients).
    pub fn bytes_forwarded(&self) -> (u64, u64) {
        (self.shared.bytes_to_target.load(Ordering::Relaxed), self.shared.bytes_to_client.load(Ordering::Relaxed))
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Break every connection through the proxy now, both ways, as a link
    /// that drops would (what is in its delay lines is lost); it goes on
    /// accepting new ones.
    pub fn cut(&self) {
        for socket in self.shared.sockets.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor; it sees `stop` and ends.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for socket in self.shared.sockets.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let threads: Vec<JoinHandle<()>> =
            self.shared.threads.lock().unwrap_or_else(PoisonError::into_inner).drain(..).collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn socket_buffers<S: AsRawFd>(socket: &S) {
    let bytes = PROXY_SOCKET_BUFFER_BYTES as libc::c_int;
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket the caller holds open, with a
        // pointer to an int that lives across the call and its size.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "setsockopt: {}", std::io::Error::last_os_error());
    }
}

fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    delay: Duration,
    line_bytes: usize,
    stop: &AtomicBool,
    shared: &Arc<ProxyShared>,
) {
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let upstream = {
            let socket = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None) {
                Ok(socket) => socket,
                Err(_) => continue,
            };
            socket_buffers(&socket);
            match socket.connect_timeout(&target.into(), PROXY_CONNECT_TIMEOUT) {
                Ok(()) => TcpStream::from(socket),
                // As a dead link would: the client's connection just ends.
                Err(_) => continue,
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let clone = |socket: &TcpStream| socket.try_clone().expect("clone a proxied socket");
        shared.sockets.lock().unwrap_or_else(PoisonError::into_inner).extend([clone(&client), clone(&upstream)]);
        let forward = Arc::new(DelayLine::new(delay, line_bytes));
        let backward = Arc::new(DelayLine::new(delay, line_bytes));
        let pairs =
            [(clone(&client), clone(&upstream), forward, true), (clone(&upstream), clone(&client), backward, false)];
        let mut threads = shared.threads.lock().unwrap_or_else(PoisonError::into_inner);
        for (from, to, line, to_target) in pairs {
            let reader_line = line.clone();
            let (reader_from, reader_to) = (clone(&from), clone(&to));
            threads.push(
                std::thread::Builder::new()
                    .name("wan-proxy-read".into())
                    .spawn(move || reader_line.fill(reader_from, reader_to))
                    .expect("spawn a proxy reader"),
            );
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("wan-proxy-write".into())
                    .spawn(move || {
                        let counter = if to_target { &shared.bytes_to_target } else { &shared.bytes_to_client };
                        line.drain(from, to, counter)
                    })
                    .expect("spawn a proxy writer"),
            );
        }
    }
}

/// One direction of a proxied connection: chunks read and not yet written,
/// each with the moment it is due.
struct DelayLine {
    delay: Duration,
    bytes_max: usize,
    state: Mutex<LineState>,
    changed: Condvar,
}

#[derive(Default)]
struct LineState {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes read and not yet written on (in `chunks` or being written).
    bytes: usize,
    /// The source ended (EOF): the destination is half-closed once the line is empty.
    ended: bool,
    /// Writing failed: the reader stops.
    broken: bool,
}

impl DelayLine {
    fn new(delay: Duration, bytes_max: usize) -> DelayLine {
        DelayLine { delay, bytes_max, state: Mutex::new(LineState::default()), changed: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reading thread: read chunks from `from` and stamp them, waiting
    /// while the line is full (back pressure); on EOF or an error, end the
    /// line (an error ends the whole connection: `to` too).
    fn fill(&self, mut from: TcpStream, to: TcpStream) {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            let read = match from.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(_) => {
                    let _ = to.shutdown(Shutdown::Both);
                    break;
                }
            };
            let mut state = self.lock();
            while state.bytes > 0 && state.bytes + read > self.bytes_max && !state.broken {
                state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            if state.broken {
                return;
            }
            state.bytes += read;
            state.chunks.push_back((Instant::now() + self.delay, buffer[..read].to_vec()));
            self.changed.notify_all();
        }
        self.lock().ended = true;
        self.changed.notify_all();
    }

    /// The writing thread: write each chunk on `to` once it is due, in
    /// order; when the line ended and is empty, half-close `to`. A failed
    /// write ends the connection both ways.
    fn drain(&self, from: TcpStream, mut to: TcpStream, counter: &AtomicU64) {
        loop {
            let (due, chunk) = {
                let mut state = self.lock();
                loop {
                    if let Some(chunk) = state.chunks.pop_front() {
                        break chunk;
                    }
                    if state.ended {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
                }
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                self.lock().broken = true;
                self.changed.notify_all();
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            self.lock().bytes -= chunk.len();
            self.changed.notify_all();
        }
    }
}

/// The copy host's ports inside the namespace (the rig's own: free).
const COPY_PORT: u16 = 7000;
const COPY_ADMIN_PORT: u16 = 7001;

/// A production host on this side mirroring to one copy host inside a rig,
/// reached through a delay proxy. The processes stop before the proxy.
pub struct WanMirror {
    /// The hosts (the copy's `namespace` is the rig's).
    pub mirror: Mirror,
    /// The production host's way to the copy.
    pub proxy: DelayProxy,
}

impl Wan {
    /// Start a copy host named `name` inside the rig, then a production
    /// host on a volume of `size` mirroring to it through a proxy, with the
    /// copy's `options` ("mode=async,compress=lz4", …; "direct" starts the
    /// copy host with --direct) and `extra` production arguments. Both
    /// stores (and their metadata) are made in `stores`, or in the
    /// mirror's scratch directory.
    pub fn start_mirror(
        &self,
        label: &str,
        size: &str,
        stores: Option<&Path>,
        name: &str,
        options: &str,
        extra: &[&str],
    ) -> WanMirror {
        let mut mirror = Mirror::unstarted(label, size);
        let store = |file: &str| stores.map_or_else(|| mirror.scratch.join(file), |stores| stores.join(file));
        let volume = store(&format!("copy-{name}.img"));
        mirror.volume = store("production.img");
        let address = SocketAddr::from((self.copy_ip, COPY_PORT));
        let mut copy = Copy {
            name: name.to_string(),
            volume,
            address,
            admin: SocketAddr::from((self.copy_ip, COPY_ADMIN_PORT)),
            direct: options.split(',').any(|option| option == "direct"),
            namespace: Some(self.namespace.clone()),
            process: None,
        };
        mirror.start_copy(&mut copy);
        mirror.copies.push(copy);
        let proxy = self.proxy(address);
        let mut spec = format!("{name}={}", proxy.address);
        for option in options.split(',').filter(|option| !option.is_empty() && *option != "direct") {
            spec.push(',');
            spec.push_str(option);
        }
        mirror.start_production_for(vec![spec], extra);
        WanMirror { mirror, proxy }
    }
}
