//! Harness for crossmirror's whole-system tests: start the real binary,
//! find real clients, make scratch files and loop devices, and clean all of
//! it up (processes are killed and loop devices detached on drop).
//!
//! A test that needs a tool calls [`require_tool`]: outside CI a missing tool
//! skips the test with a `SKIPPED:` line (see [`skip`]) that `tests/run.sh`
//! counts in its closing summary; under `CI=true` it fails the run.

pub mod group;
pub mod mirror;
pub mod wan;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Whether `tool` is on PATH. Under `CI=true` a missing tool panics, so CI
/// cannot pass by skipping; elsewhere the test prints why it is skipped.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is not installed; the test command in README.md installs it");
        }
        skip(&format!("{tool} is not installed (run the README's test command to install it)"));
    }
    found
}

/// Say that the running test is skipped, and why, on a line of its own:
/// `SKIPPED: <test name>: <reason>`. It is written to stderr directly, past
/// the test harness's output capture (which would hide it, as the test
/// passes), so `tests/run.sh` sees it and counts the test as skipped, not
/// passed. The caller then returns from the test.
pub fn skip(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unknown test");
    let _ = std::io::stderr().write_all(format!("SKIPPED: {test}: {reason}\n").as_bytes());
}

/// Whether the process runs as root (loop devices and mounts need it).
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("this test needs root (loop devices, mounts)");
        }
        skip("needs root (loop devices, mounts)");
    }
    root
}

/// The crossmirror binary built next to this test.
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let path = dir.join("crossmirror");
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

/// Wait for `child` to exit until `deadline`: its status, or `None` when it
/// was still running then (it is SIGKILLed and reaped).
pub fn wait_exit(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A scratch directory on a disk filesystem (O_DIRECT works there, unlike
/// tmpfs), removed on drop.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A new empty directory.
    pub fn new(label: &str) -> Scratch {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from(format!(
            "/var/tmp/crossmirror-test-{}-{}-{label}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch directory");
        Scratch { path }
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `crossmirror` process, killed on drop.
pub struct Process {
    child: Option<Child>,
    /// Address it listens on.
    pub address: SocketAddr,
    log: PathBuf,
}

impl Process {
    /// Start `crossmirror serve` with `args` (without `--listen`) and wait
    /// until it accepts connections.
    pub fn serve(scratch: &Scratch, args: &[&str]) -> Process {
        let port = free_port();
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let listen = address.to_string();
        let mut all: Vec<&str> = vec!["serve", "--listen", &listen];
        all.extend_from_slice(args);
        Self::start(scratch, &all, address)
    }

    /// Start `crossmirror serve` on the file `volume` in `scratch` of `size`
    /// (e.g. "64M"; created sparse if absent), with `extra` arguments.
    pub fn serve_volume(scratch: &Scratch, size: &str, extra: &[&str]) -> Process {
        let volume = scratch.join("volume");
        let volume = volume.to_str().expect("utf-8 path");
        let mut args = vec!["--volume", volume, "--size", size];
        args.extend_from_slice(extra);
        Process::serve(scratch, &args)
    }

    /// Start the binary with `args` and wait for `address` to accept.
    pub fn start(scratch: &Scratch, args: &[&str], address: SocketAddr) -> Process {
        Process::try_start(scratch, args, address).unwrap_or_else(|log| panic!("{log}"))
    }

    /// Start the binary with `args` and wait for `address` to accept; when
    /// the process exits first (it refused to start), what it logged.
    pub fn try_start(scratch: &Scratch, args: &[&str], address: SocketAddr) -> Result<Process, String> {
        Process::try_start_in(scratch, None, args, address)
    }

    /// [`Process::try_start`] inside the network namespace `namespace`
    /// (through `ip netns exec`, which execs the binary: the child is it).
    pub fn try_start_in(
        scratch: &Scratch,
        namespace: Option<&str>,
        args: &[&str],
        address: SocketAddr,
    ) -> Result<Process, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let log = scratch.join(&format!("process-{}.log", COUNTER.fetch_add(1, Ordering::Relaxed)));
        let log_file = std::fs::File::create(&log).expect("create log");
        let mut command = match namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace]).arg(binary());
                command
            }
            None => Command::new(binary()),
        };
        let child = command
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start crossmirror");
        let mut process = Process { child: Some(child), address, log };
        process.wait_listening().map(|()| process)
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.address, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("crossmirror exited with {status} before listening:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("crossmirror did not listen on {} within 10 s:\n{}", self.address, self.log());
    }

    /// An NBD URI for the default export.
    pub fn uri(&self) -> String {
        format!("nbd://{}", self.address)
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Set the nice value of every thread the process has now (threads it
    /// makes later inherit their maker's): a negative one puts it ahead of
    /// the other processes of this machine (root only).
    pub fn renice(&self, niceness: i32) {
        let tasks = format!("/proc/{}/task", self.pid());
        for task in std::fs::read_dir(&tasks).unwrap_or_else(|error| panic!("read {tasks}: {error}")) {
            let Some(tid) = task.ok().and_then(|task| task.file_name().to_str()?.parse::<libc::id_t>().ok()) else {
                continue;
            };
            // SAFETY: setpriority has no memory effects; on Linux
            // PRIO_PROCESS with a thread id sets that thread's nice value.
            let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, niceness) };
            // A thread that ended since the listing is no failure.
            let error = std::io::Error::last_os_error();
            assert!(set == 0 || error.raw_os_error() == Some(libc::ESRCH), "setpriority {tid}: {error}");
        }
    }

    /// Send `signal` and wait (up to 30 s) for the exit status.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill with a pid we own and a valid signal number.
        unsafe { libc::kill(child.id() as i32, signal) };
        wait_exit(&mut child, Instant::now() + Duration::from_secs(30))
            .unwrap_or_else(|| panic!("crossmirror did not exit within 30 s of signal {signal}:\n{}", self.log()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Run a command, panic with its output if it fails, return its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = run_output(program, args);
    if !output.status.success() {
        panic!(
            "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Run a command and return its whole output, whatever its status.
pub fn run_output(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Run a Python script with Debian's python3 (which has libnbd's bindings).
pub fn nbdsh_script(script: &str) -> String {
    run("/usr/bin/python3", &["-c", script])
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a file, via coreutils.
pub fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().expect("utf-8 path")]).split_whitespace().next().expect("digest").to_string()
}

/// A loop device over a file, detached on drop.
pub struct LoopDevice {
    /// The device node, e.g. /dev/loop3.
    pub path: String,
}

impl LoopDevice {
    /// Attach `file`; `direct` enables the loop driver's direct I/O.
    pub fn attach(file: &Path, direct: bool) -> LoopDevice {
        let direct_flag = if direct { "--direct-io=on" } else { "--direct-io=off" };
        let path =
            run("losetup", &["--find", "--show", direct_flag, file.to_str().expect("utf-8 path")]).trim().to_string();
        LoopDevice { path }
    }

    /// Detach, and wait (bounded) until nothing is attached to `backing`,
    /// so that the file is no longer busy (a FUSE file can then be unmounted).
    pub fn detach_from(self, backing: &Path) {
        drop(self);
        let backing = backing.to_str().expect("utf-8 path");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let attached = run("losetup", &["-j", backing]);
            if attached.trim().is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "loop device still attached to {backing} after 10 s: {attached}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// A TCP port on `ip` (a loopback address such as 127.0.0.2) that was free
/// a moment ago. Ports come from below the kernel's ephemeral range
/// (32768 and up), so no outgoing connection is given one by the kernel
/// before the server binds it, and each is handed out once per test
/// process, so two tests running side by side never get the same one.
pub fn free_port_on(ip: &str) -> u16 {
    const FIRST: u32 = 20000;
    const COUNT: u32 = 12000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % COUNT,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
    for _ in 0..COUNT {
        let port = (FIRST + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % COUNT) as u16;
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port on {ip} between {FIRST} and {}", FIRST + COUNT);
}

/// Write a fresh secret file (mode 600) into `scratch` under `name`.
pub fn write_secret(scratch: &Scratch, name: &str, seed: u64) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = scratch.join(name);
    let text: String = random_bytes(32, seed).iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(&path, text).expect("write the secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
}

/// Poll `condition` every 50 ms until it holds or `timeout` passes; returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// iptables rules that drop TCP between two loopback addresses, in both
/// directions, for one port; removed on drop.
pub struct LinkCut {
    rules: Vec<Vec<String>>,
}

impl LinkCut {
    /// Drop every packet to `to_ip:port` and every packet from it. Rules
    /// carry a comment naming this test process; rules left behind by a test
    /// process that no longer exists (killed before its cleanup ran) are
    /// removed first.
    pub fn new(to_ip: &str, port: u16) -> LinkCut {
        remove_orphaned_rules();
        let port = port.to_string();
        let comment = format!("{RULE_COMMENT_PREFIX}{}", std::process::id());
        // One rule per direction: packets to the port, packets from it.
        let rules: Vec<Vec<String>> = [("-d", "--dport"), ("-s", "--sport")]
            .iter()
            .map(|(address, port_option)| {
                let rule = ["INPUT", "-p", "tcp", address, to_ip, port_option, &port, "-m", "comment", "--comment"];
                let mut rule: Vec<String> = rule.iter().map(|word| word.to_string()).collect();
                rule.extend([comment.clone(), "-j".into(), "DROP".into()]);
                rule
            })
            .collect();
        for rule in &rules {
            let mut args = vec!["-I".to_string()];
            args.extend(rule.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("iptables", &args);
        }
        LinkCut { rules }
    }
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        for rule in &self.rules {
            let mut args = vec!["-D".to_string()];
            args.extend(rule.iter().cloned());
            let _ = Command::new("iptables").args(&args).status();
        }
    }
}

/// The comment every test's iptables rule carries, followed by the test
/// process's id.
pub(crate) const RULE_COMMENT_PREFIX: &str = "crossmirror-test-";

/// Delete the INPUT and OUTPUT rules whose comment names a test process
/// that is gone.
pub(crate) fn remove_orphaned_rules() {
    for chain in ["INPUT", "OUTPUT"] {
        let Ok(listing) = Command::new("iptables").args(["-S", chain]).output() else { continue };
        for line in String::from_utf8_lossy(&listing.stdout).lines() {
            let Some(at) = line.find(RULE_COMMENT_PREFIX) else { continue };
            let pid: String = line[at + RULE_COMMENT_PREFIX.len()..].chars().take_while(char::is_ascii_digit).collect();
            if pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let Some(rule) = line.strip_prefix("-A ") else { continue };
            let mut args = vec!["-D"];
            args.extend(rule.split_whitespace().map(|word| word.trim_matches('"')));
            let _ = Command::new("iptables").args(&args).status();
        }
    }
}

/// The file descriptors (as strace prints them) that process `pid` holds
/// open on files whose path `matches` accepts.
pub fn fds_on(pid: i32, matches: impl Fn(&Path) -> bool) -> Vec<String> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the process is alive").flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if matches(&target) {
            fds.push(entry.file_name().to_string_lossy().to_string());
        }
    }
    fds
}

/// Whether a line of an strace trace is a call of one of `names` on one of
/// the descriptors `fds` (its first argument).
pub fn traced_call(line: &str, names: &[&str], fds: &[String]) -> bool {
    names
        .iter()
        .any(|name| fds.iter().any(|fd| [",", ")"].iter().any(|end| line.contains(&format!(" {name}({fd}{end}")))))
}

/// strace attached to a running process (every thread): stopped (SIGINT,
/// so it detaches) when done, or when a failed assertion unwinds.
pub struct Tracer(Child);

impl Tracer {
    /// Trace the system calls `filter` names (strace's `-e`) of process
    /// `pid` and all its threads into `trace`, strace's own messages into
    /// `log`; returns once every thread names its tracer.
    pub fn attach(pid: i32, filter: &str, trace: &Path, log: &Path) -> Tracer {
        let strace = Command::new("strace")
            .args(["-f", "-qq", "-e", filter, "-o"])
            .arg(trace)
            .args(["-p", &pid.to_string()])
            .stderr(std::fs::File::create(log).expect("create the strace log"))
            .spawn()
            .expect("strace runs (tests/run.sh installs it)");
        let mut tracer = Tracer(strace);
        let tasks = format!("/proc/{pid}/task");
        let traced = || {
            let tasks: Vec<_> = std::fs::read_dir(&tasks).expect("the traced process is alive").flatten().collect();
            !tasks.is_empty()
                && tasks.iter().all(|task| {
                    let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                    status
                        .lines()
                        .any(|line| line.starts_with("TracerPid:") && line.split_whitespace().nth(1) != Some("0"))
                })
        };
        let attached = wait_until(Duration::from_secs(10), traced);
        let running = tracer.0.try_wait().ok().flatten().is_none();
        assert!(attached && running, "strace did not attach: {}", std::fs::read_to_string(log).unwrap_or_default());
        tracer
    }

    /// Detach and wait for strace (its trace file is then complete).
    pub fn stop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) with the pid of a child this test spawned and has not yet reaped.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            let _ = self.0.wait();
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tmpfs of a given size, mounted for one test (root only); unmounted and
/// removed on drop, so declare it before the processes that use it.
pub struct Tmpfs {
    /// The mount point.
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (e.g. "40m") at a new directory named by `label`.
    pub fn mount(label: &str, size: &str) -> Tmpfs {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from(format!(
            "/var/tmp/crossmirror-tmpfs-{}-{}-{label}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create the mount point");
        let options = format!("size={size}");
        run("mount", &["-t", "tmpfs", "-o", &options, "tmpfs", path.to_str().expect("utf-8 path")]);
        Tmpfs { path }
    }

    /// Write zeroes into a file until the filesystem is full.
    pub fn fill(&self) {
        let target = format!("of={}", self.path.join("filler").display());
        let output = run_output("dd", &["if=/dev/zero", &target, "bs=1M"]);
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains("No space left"), "dd did not fill the filesystem: {text}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.path.to_str().expect("utf-8 path");
        if !Command::new("umount").arg(path).status().is_ok_and(|status| status.success()) {
            let _ = Command::new("umount").args(["-l", path]).status();
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A `crossmirror copy-host` started for a test.
pub struct CopyHost {
    /// The running process.
    pub process: Process,
    /// Its replication address.
    pub address: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    /// The arguments it was started with (to restart it alike).
    pub args: Vec<String>,
}

impl CopyHost {
    /// Start a copy host on loopback address `ip` (fresh ports) for the
    /// store `store` of `size`, sharing `secret`, with an admin endpoint and
    /// any `extra` arguments (`--direct`, …).
    pub fn start(scratch: &Scratch, ip: &str, store: &Path, size: &str, secret: &Path, extra: &[&str]) -> CopyHost {
        let address: SocketAddr = format!("{ip}:{}", free_port_on(ip)).parse().expect("address");
        let admin: SocketAddr = format!("{ip}:{}", free_port_on(ip)).parse().expect("address");
        let mut args: Vec<String> = [
            "copy-host",
            "--volume",
            store.to_str().expect("utf-8 path"),
            "--size",
            size,
            "--listen",
            &address.to_string(),
            "--secret-file",
            secret.to_str().expect("utf-8 path"),
            "--admin",
            &admin.to_string(),
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let process = CopyHost::spawn(scratch, &args, address, admin);
        CopyHost { process, address, admin, args }
    }

    /// Start a copy host process with `args` (a first start's, or the same
    /// again for a restart), once both its data port and its admin endpoint
    /// accept: the admin endpoint may be bound a moment after the data port.
    pub fn spawn(scratch: &Scratch, args: &[String], address: SocketAddr, admin: SocketAddr) -> Process {
        let borrowed: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::start(scratch, &borrowed, address);
        let admin_up = wait_until(Duration::from_secs(10), || TcpStream::connect(admin).is_ok());
        assert!(admin_up, "copy host admin endpoint {admin} never accepted:\n{}", process.log());
        process
    }
}

/// An `nbdfuse` process exposing the export as `<scratch>/fuse/nbd`;
/// unmounted (and the process reaped, killed if need be) on drop.
pub struct FuseMount {
    directory: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl FuseMount {
    /// Mount `uri` under `<scratch>/fuse` (waits until the file is there).
    pub fn start(scratch: &Scratch, uri: &str) -> FuseMount {
        let directory = scratch.join("fuse");
        std::fs::create_dir_all(&directory).expect("create FUSE mount point");
        let pid_file = scratch.join("nbdfuse.pid");
        let log = scratch.join("nbdfuse.log");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pid_file)
            .arg(&directory)
            .arg(uri)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create nbdfuse log"))
            .spawn()
            .expect("start nbdfuse");
        let mut fuse = FuseMount { directory, child: Some(child), log };
        // nbdfuse writes its pid file once the mount is ready.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(pid_file.exists() && fuse.file().exists()) {
            if let Some(status) = fuse.try_wait() {
                panic!("nbdfuse exited with {status} before mounting:\n{}", fuse.log());
            }
            assert!(Instant::now() < deadline, "nbdfuse did not mount within 10 s:\n{}", fuse.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        fuse
    }

    /// The file that stands for the export.
    pub fn file(&self) -> PathBuf {
        self.directory.join("nbd")
    }

    /// What nbdfuse printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|child| child.try_wait().ok().flatten())
    }

    /// Unmounts and checks that nbdfuse exits cleanly within 10 s.
    pub fn stop(&mut self) {
        run("fusermount3", &["-u", self.directory.to_str().expect("utf-8 path")]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.try_wait() {
                self.child = None;
                assert!(status.success(), "nbdfuse exited with {status}:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "nbdfuse did not exit within 10 s of unmount:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let unmounted = Command::new("fusermount3").arg("-u").arg(&self.directory).status();
        if !unmounted.map(|s| s.success()).unwrap_or(false) {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.directory).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// An nbdkit server whose flush takes [`FLUSH_SECONDS`] (the `eval` plugin over
/// a file, each flush logged with its start time), for a store behind
/// [`FuseMount`] whose fsync is slow; killed on drop.
pub struct SlowFlushServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    flushes: PathBuf,
}

/// How long each flush of a [`SlowFlushServer`] takes.
pub const FLUSH_SECONDS: u64 = 3;

impl SlowFlushServer {
    /// Serve a new file of `size` bytes in `scratch`.
    pub fn start(scratch: &Scratch, size: u64) -> SlowFlushServer {
        let store = scratch.join("slow-store");
        std::fs::File::create(&store).unwrap().set_len(size).unwrap();
        let flushes = scratch.join("flushes");
        let port = free_port();
        let (store_path, flushes_path) = (store.display(), flushes.display());
        let child = Command::new("nbdkit")
            .args(["-f", "-p", &port.to_string(), "-i", "127.0.0.1", "eval"])
            .arg(format!("get_size=echo {size}"))
            .arg(format!("pread=dd if={store_path} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none"))
            .arg(format!(
                "pwrite=dd of={store_path} seek=$4 iflag=count_bytes count=$3 oflag=seek_bytes conv=notrunc status=none"
            ))
            .arg(format!("flush=date +%s.%N >> {flushes_path}; sleep {FLUSH_SECONDS}"))
            .args(["can_flush=exit 0", "can_write=exit 0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.join("nbdkit.log")).unwrap())
            .spawn()
            .expect("start nbdkit");
        let listening = wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(listening, "nbdkit never listened");
        SlowFlushServer { child, port, flushes }
    }

    /// Flushes begun so far.
    pub fn flushes(&self) -> usize {
        std::fs::read_to_string(&self.flushes).unwrap_or_default().lines().count()
    }
}

impl Drop for SlowFlushServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
