//! A crossmirror group as real `crossmirror node` processes, for the group
//! tests: a [`GroupSpec`] names the sites, members and witnesses; a
//! [`Group`] gives every node its own loopback address, picks four ports
//! free on all of them, writes the config (and the secret) into a scratch
//! directory, and starts, stops, kills, freezes and asks the nodes.
//!
//! ```text
//!  GroupSpec ──Group::new──▶ scratch/config.toml, secret, <member>/ state dirs
//!                 │           nodes on 127.<p>.<k>.1, .2, … (one block per group)
//!                 └─ start/stop/kill/freeze ─▶ node processes ─▶ scratch/node-<name>.log
//!                    status/record/wait_for ◀── GET /status on each node's admin port
//! ```
//!
//! Each group gets a block of addresses no other group of any test process
//! uses at the same time (127.<from the pid>.<a counter>.x), so tests run in
//! parallel threads and beside other test binaries. Every process a group
//! started is SIGKILLed on drop.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{binary, random_bytes, write_secret, Scratch};

/// A site of the group.
#[derive(Clone, Debug)]
pub struct SiteSpec {
    /// Its name.
    pub name: String,
    /// "production" or "copy".
    pub role: String,
    /// "sync" or "async" (copy sites only).
    pub mode: Option<String>,
    /// `lag_bytes_max`, e.g. "64M" (copy sites only).
    pub lag_bytes_max: Option<String>,
}

/// A member of the group.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    /// Its name.
    pub name: String,
    /// Its site.
    pub site: String,
    /// Lower hosts first.
    pub backup_order: u32,
    /// Its store: a file name in the scratch directory (members of one site
    /// may share one), or an absolute path.
    pub volume: String,
    /// TOML lines of its `[member.actions]` table, if any.
    pub actions: Option<String>,
}

/// What a group is made of; [`Group::new`] turns it into a config file.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    /// The group's name.
    pub group: String,
    /// `volume_size`, e.g. "64M".
    pub volume_size: String,
    /// The sites, in config order.
    pub sites: Vec<SiteSpec>,
    /// The members, in config order (voter ids follow it).
    pub members: Vec<MemberSpec>,
    /// The witnesses' names.
    pub witnesses: Vec<String>,
    /// `on_quorum_loss`, when not the default.
    pub on_quorum_loss: Option<String>,
    /// `[quorum] lease_ms`, when not the default.
    pub lease_ms: Option<u64>,
    /// `resync_rate_max` (e.g. "4M", bytes per second), when set.
    pub resync_rate_max: Option<String>,
    /// An etcd endpoint (`http://IP:PORT`): the group's quorum is etcd
    /// there instead of its own voters.
    pub etcd: Option<String>,
}

impl GroupSpec {
    /// A group named `group` with a 64M volume and nothing in it yet.
    pub fn new(group: &str) -> GroupSpec {
        GroupSpec {
            group: group.to_string(),
            volume_size: "64M".to_string(),
            sites: Vec::new(),
            members: Vec::new(),
            witnesses: Vec::new(),
            on_quorum_loss: None,
            lease_ms: None,
            resync_rate_max: None,
            etcd: None,
        }
    }

    /// The production site `name`.
    pub fn production(mut self, name: &str) -> GroupSpec {
        self.sites.push(SiteSpec { name: name.into(), role: "production".into(), mode: None, lag_bytes_max: None });
        self
    }

    /// A copy site `name` in `mode` ("sync" or "async").
    pub fn copy(mut self, name: &str, mode: &str) -> GroupSpec {
        self.sites.push(SiteSpec {
            name: name.into(),
            role: "copy".into(),
            mode: Some(mode.into()),
            lag_bytes_max: Some("64M".into()),
        });
        self
    }

    /// A member `name` of `site` at `backup_order` on the store `volume`
    /// (see [`MemberSpec::volume`]).
    pub fn member(mut self, name: &str, site: &str, backup_order: u32, volume: &str) -> GroupSpec {
        self.members.push(MemberSpec {
            name: name.into(),
            site: site.into(),
            backup_order,
            volume: volume.into(),
            actions: None,
        });
        self
    }

    /// A witness `name`.
    pub fn witness(mut self, name: &str) -> GroupSpec {
        self.witnesses.push(name.into());
        self
    }

    /// Set `volume_size`.
    pub fn volume_size(mut self, size: &str) -> GroupSpec {
        self.volume_size = size.into();
        self
    }

    /// Set `on_quorum_loss` ("suspend" or "io-error").
    pub fn on_quorum_loss(mut self, value: &str) -> GroupSpec {
        self.on_quorum_loss = Some(value.into());
        self
    }

    /// Set `[quorum] lease_ms`.
    pub fn lease_ms(mut self, lease_ms: u64) -> GroupSpec {
        self.lease_ms = Some(lease_ms);
        self
    }

    /// Set `resync_rate_max` (bytes per second, e.g. "4M").
    pub fn resync_rate_max(mut self, rate: &str) -> GroupSpec {
        self.resync_rate_max = Some(rate.into());
        self
    }

    /// Give the last member added these `[member.actions]` lines.
    pub fn actions(mut self, lines: &str) -> GroupSpec {
        if let Some(member) = self.members.last_mut() {
            member.actions = Some(lines.to_string());
        }
        self
    }

    /// Every voter's name, members first, in config order.
    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|member| member.name.clone()).chain(self.witnesses.iter().cloned()).collect()
    }

    /// The config text, with `ips` giving each voter's address and
    /// `ports` = [quorum, mirror, nbd, admin].
    fn render(&self, ips: &BTreeMap<String, String>, ports: [u16; 4]) -> String {
        let mut out =
            format!("group = {:?}\nvolume_size = {:?}\nsecret_file = \"secret\"\n", self.group, self.volume_size);
        if let Some(value) = &self.on_quorum_loss {
            out.push_str(&format!("on_quorum_loss = {value:?}\n"));
        }
        if let Some(rate) = &self.resync_rate_max {
            out.push_str(&format!("resync_rate_max = {rate:?}\n"));
        }
        out.push_str(&format!(
            "\n[ports]\nquorum = {}\nmirror = {}\nnbd = {}\nadmin = {}\n\n[quorum]\n",
            ports[0], ports[1], ports[2], ports[3]
        ));
        match &self.etcd {
            Some(endpoint) => out.push_str(&format!("backend = \"etcd\"\nendpoints = [{endpoint:?}]\n")),
            None => out.push_str("backend = \"embedded\"\n"),
        }
        if let Some(lease_ms) = self.lease_ms {
            out.push_str(&format!("lease_ms = {lease_ms}\n"));
        }
        for site in &self.sites {
            out.push_str(&format!("\n[[site]]\nname = {:?}\nrole = {:?}\n", site.name, site.role));
            if let Some(mode) = &site.mode {
                out.push_str(&format!("mode = {mode:?}\n"));
            }
            if let Some(lag) = &site.lag_bytes_max {
                out.push_str(&format!("lag_bytes_max = {lag:?}\n"));
            }
        }
        for member in &self.members {
            out.push_str(&format!(
                "\n[[member]]\nname = {:?}\nsite = {:?}\naddress = {:?}\nvolume = {:?}\nbackup_order = {}\nstate_dir = {:?}\n",
                member.name, member.site, ips[&member.name], member.volume, member.backup_order, member.name
            ));
            if let Some(actions) = &member.actions {
                out.push_str(&format!("[member.actions]\n{actions}\n"));
            }
        }
        for witness in &self.witnesses {
            out.push_str(&format!(
                "\n[[witness]]\nname = {witness:?}\naddress = {:?}\nstate_dir = {witness:?}\n",
                ips[witness]
            ));
        }
        out
    }
}

/// A block of loopback addresses of its own: `127.<p>.<k>` where `p` comes
/// from the process id and `k` from a counter, so neither another group of
/// this process nor (short of a pid clash) of another test process uses it.
fn address_block() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let process = 10 + std::process::id() % 240;
    let k = 1 + NEXT.fetch_add(1, Ordering::Relaxed) % 250;
    format!("127.{process}.{k}")
}

/// Whether `port` is free on every one of `ips`, for TCP and UDP.
fn port_free(ips: &[String], port: u16) -> bool {
    ips.iter().all(|ip| TcpListener::bind((ip.as_str(), port)).is_ok() && UdpSocket::bind((ip.as_str(), port)).is_ok())
}

/// Four consecutive ports free on every one of `ips` (TCP and UDP), from
/// below the kernel's ephemeral range (32768 and up) so no outgoing
/// connection takes one before a node binds it.
fn free_ports(ips: &[String]) -> [u16; 4] {
    static SEED: AtomicU32 = AtomicU32::new(0);
    let mut state = u64::from(std::process::id()) << 20 | u64::from(SEED.fetch_add(1, Ordering::Relaxed));
    for _ in 0..1000 {
        state = u64::from_le_bytes(random_bytes(8, state)[..8].try_into().expect("8 bytes"));
        let base = 20000 + (state % 12000) as u16 / 4 * 4;
        let ports = [base, base + 1, base + 2, base + 3];
        if ports.iter().all(|&port| port_free(ips, port)) {
            return ports;
        }
    }
    panic!("no four free ports on {ips:?}");
}

/// A group of `crossmirror node` processes for one test; every process it
/// started is SIGKILLed on drop.
pub struct Group {
    /// Where the config, the secret, the stores, the state dirs and the logs live.
    pub scratch: Scratch,
    /// What the group was made from.
    pub spec: GroupSpec,
    /// The config file.
    pub config: PathBuf,
    /// Each voter's address.
    pub ips: BTreeMap<String, String>,
    /// `[quorum, mirror, nbd, admin]`.
    pub ports: [u16; 4],
    nodes: BTreeMap<String, Child>,
    frozen: std::collections::BTreeSet<String>,
}

impl Group {
    /// Lay out `spec` in a new scratch directory named by `label`: addresses,
    /// ports, the secret and `config.toml`. Starts nothing.
    pub fn new(label: &str, spec: GroupSpec) -> Group {
        let scratch = Scratch::new(label);
        write_secret(&scratch, "secret", 11);
        let block = address_block();
        let ips: BTreeMap<String, String> =
            spec.names().into_iter().enumerate().map(|(i, name)| (name, format!("{block}.{}", i + 1))).collect();
        let all: Vec<String> = ips.values().cloned().collect();
        let ports = free_ports(&all);
        let config = scratch.join("config.toml");
        std::fs::write(&config, spec.render(&ips, ports)).expect("write the group config");
        Group { scratch, spec, config, ips, ports, nodes: BTreeMap::new(), frozen: Default::default() }
    }

    /// Write, beside the group's config, a config `file` made from the spec
    /// as `edit` changes it, with the same addresses and ports (e.g. a node
    /// with another setting, or another group on the same nodes).
    pub fn write_config(&self, file: &str, edit: impl FnOnce(&mut GroupSpec)) -> PathBuf {
        let mut spec = self.spec.clone();
        edit(&mut spec);
        let path = self.scratch.join(file);
        std::fs::write(&path, spec.render(&self.ips, self.ports)).expect("write the config");
        path
    }

    /// The config text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read the config")
    }

    /// The store of member `name`.
    pub fn store(&self, name: &str) -> PathBuf {
        let member = self.spec.members.iter().find(|member| member.name == name).expect("a member of that name");
        self.scratch.join(&member.volume)
    }

    /// The state directory of voter `name`.
    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.scratch.join(name)
    }

    /// Start node `name` with the group's config.
    pub fn start(&mut self, name: &str) {
        let config = self.config.clone();
        self.start_with(name, &config);
    }

    /// Start node `name` with the config at `config`; its stderr goes
    /// (appended) to its log.
    pub fn start_with(&mut self, name: &str, config: &Path) {
        assert!(!self.nodes.contains_key(name), "node {name} is already running");
        let child = self.spawn(name, config);
        self.nodes.insert(name.to_string(), child);
    }

    fn spawn(&self, name: &str, config: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("open the node's log");
        Command::new(binary())
            .args(["node", "--config", config.to_str().expect("utf-8 path"), "--name", name])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start crossmirror node")
    }

    /// Run node `name` with `config` and wait up to `timeout` for it to
    /// exit by itself (a refusal); its exit status (`None` if it was still
    /// running, then it is killed) and what it logged in this run.
    pub fn run_to_exit(&self, name: &str, config: &Path, timeout: Duration) -> (Option<ExitStatus>, String) {
        let before = self.log(name).len();
        let mut child = self.spawn(name, config);
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.log(name)[before..].to_string())
    }

    /// SIGKILL node `name` and reap it.
    pub fn kill(&mut self, name: &str) {
        let mut child = self.nodes.remove(name).unwrap_or_else(|| panic!("node {name} is not running"));
        self.frozen.remove(name);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM node `name` (a graceful leave) and wait up to 30 s for it;
    /// its exit status.
    pub fn stop(&mut self, name: &str) -> ExitStatus {
        let mut child = self.nodes.remove(name).unwrap_or_else(|| panic!("node {name} is not running"));
        self.frozen.remove(name);
        // SAFETY: kill(2) on a child we own, with a valid signal.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        crate::wait_exit(&mut child, Instant::now() + Duration::from_secs(30))
            .unwrap_or_else(|| panic!("node {name} did not exit within 30 s of SIGTERM:\n{}", self.logs_tail(30)))
    }

    /// SIGTERM every node of `names`, in that order, at once (the way
    /// `node --all` stops a group: a node that leaves needs a quorum to
    /// record it), and wait up to `timeout` for all of them; each one's exit
    /// status, `None` for one still running then (it is SIGKILLed).
    pub fn stop_all(&mut self, names: &[&str], timeout: Duration) -> Vec<(String, Option<ExitStatus>)> {
        let mut children: Vec<(String, Child)> = Vec::new();
        for name in names {
            let child = self.nodes.remove(*name).unwrap_or_else(|| panic!("node {name} is not running"));
            self.frozen.remove(*name);
            // SAFETY: kill(2) on a child we own, with a valid signal.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            children.push((name.to_string(), child));
        }
        let deadline = Instant::now() + timeout;
        let mut exits: Vec<(String, Option<ExitStatus>)> = Vec::new();
        for (name, mut child) in children {
            let status = crate::wait_exit(&mut child, deadline);
            exits.push((name, status));
        }
        exits
    }

    /// SIGSTOP node `name` (it stays, silent).
    pub fn freeze(&mut self, name: &str) {
        self.signal(name, libc::SIGSTOP);
        self.frozen.insert(name.to_string());
    }

    /// SIGCONT node `name`.
    pub fn thaw(&mut self, name: &str) {
        self.signal(name, libc::SIGCONT);
        self.frozen.remove(name);
    }

    fn signal(&self, name: &str, signal: i32) {
        let child = self.nodes.get(name).unwrap_or_else(|| panic!("node {name} is not running"));
        // SAFETY: kill(2) on a child we own, with a valid signal.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// Whether node `name` was started here and has not exited.
    pub fn running(&mut self, name: &str) -> bool {
        self.nodes.get_mut(name).is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The admin address of voter `name`.
    pub fn admin(&self, name: &str) -> SocketAddr {
        format!("{}:{}", self.ips[name], self.ports[3]).parse().expect("address")
    }

    /// Node `name`'s `GET /status`, or why there is none (1 s timeout).
    pub fn try_status(&self, name: &str) -> Result<Value, String> {
        http_get_json(self.admin(name), "/status", Duration::from_secs(1))
    }

    /// Node `name`'s `GET /status`; panics when it does not answer.
    pub fn status(&self, name: &str) -> Value {
        self.try_status(name).unwrap_or_else(|error| panic!("node {name} has no status: {error}"))
    }

    /// The group record with the highest `seq` among the running, unfrozen
    /// nodes that answer (`Value::Null` when none has one).
    pub fn record(&self) -> Value {
        let mut best: Option<Value> = None;
        for name in self.nodes.keys().filter(|name| !self.frozen.contains(*name)) {
            let Ok(status) = self.try_status(name) else { continue };
            let record = &status["record"];
            if record.is_object() && best.as_ref().is_none_or(|best| record["seq"].as_u64() > best["seq"].as_u64()) {
                best = Some(record.clone());
            }
        }
        best.unwrap_or(Value::Null)
    }

    /// Wait up to `timeout` for the record to satisfy `condition`; the
    /// record then. Panics with the last record and every node's log tail.
    pub fn wait_for(&self, timeout: Duration, mut condition: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let record = self.record();
            if !record.is_null() && condition(&record) {
                return record;
            }
            if Instant::now() > deadline {
                panic!(
                    "the group record did not get there within {timeout:?}; last record:\n{}\n{}",
                    serde_json::to_string_pretty(&record).unwrap_or_default(),
                    self.logs_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait up to `timeout` for node `name`'s status to satisfy `condition`;
    /// that status. Panics like [`Group::wait_for`].
    pub fn wait_status(&self, name: &str, timeout: Duration, mut condition: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.try_status(name);
            if let Ok(status) = &status {
                if condition(status) {
                    return status.clone();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "node {name}'s status did not get there within {timeout:?}; last:\n{}\n{}",
                    status
                        .map(|status| serde_json::to_string_pretty(&status).unwrap_or_default())
                        .unwrap_or_else(|e| e),
                    self.logs_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The NBD URI of the production host the record names (panics when it
    /// names none).
    pub fn nbd_uri(&self) -> String {
        let record = self.record();
        let host = record["production"]["host"].as_str().unwrap_or_else(|| panic!("no production host in {record}"));
        format!("nbd://{}:{}", self.ips[host], self.ports[2])
    }

    /// The path of node `name`'s log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.scratch.join(&format!("node-{name}.log"))
    }

    /// What node `name` logged so far (every run of it).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The last `lines` lines of every node's log, for a failure message.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in self.spec.names() {
            let log = self.log(&name);
            let all: Vec<&str> = log.lines().collect();
            out.push_str(&format!("--- node {name} (last {lines} lines) ---\n"));
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Run `crossmirror status --config <config>` with `extra` arguments;
    /// (success, stdout, stderr).
    pub fn status_command(&self, extra: &[&str]) -> (bool, String, String) {
        let mut args = vec!["status", "--config", self.config.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        let output = Command::new(binary()).args(&args).output().expect("run crossmirror status");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for child in self.nodes.values_mut() {
            let _ = child.kill();
        }
        for child in self.nodes.values_mut() {
            let _ = child.wait();
        }
    }
}

/// The state of member `name` in `record` ("joined", …; "" when absent).
pub fn member_state<'a>(record: &'a Value, name: &str) -> &'a str {
    record["members"][name]["state"].as_str().unwrap_or("")
}

/// The record's entry of copy site `site` (`Value::Null` when absent).
pub fn copy_entry<'a>(record: &'a Value, site: &str) -> &'a Value {
    record["copies"]
        .as_array()
        .and_then(|copies| copies.iter().find(|copy| copy["site"] == site))
        .unwrap_or(&Value::Null)
}

/// A GET with HTTP/1.0 and a `timeout` on each step; the JSON body.
pub fn http_get_json(address: SocketAddr, path: &str, timeout: Duration) -> Result<Value, String> {
    http_json(address, "GET", path, timeout)
}

/// A `method` request with no body, HTTP/1.0 and a `timeout` on each step;
/// the JSON body of a 2xx answer.
pub fn http_json(address: SocketAddr, method: &str, path: &str, timeout: Duration) -> Result<Value, String> {
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(|error| format!("{address}: {error}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|error| error.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|error| error.to_string())?;
    stream
        .write_all(format!("{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .map_err(|error| format!("{address}: {error}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|error| format!("{address}: {error}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(|| format!("{address}: no HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 2") && !head.starts_with("HTTP/1.0 2") {
        return Err(format!("{address}: {}", head.lines().next().unwrap_or("")));
    }
    serde_json::from_str(body).map_err(|error| format!("{address}: not JSON ({error}): {body}"))
}

// ---------------------------------------------------------------------------
// Added for tests/tests/group_faults.rs (branch gfaults): starting a node
// under its own group id, and a second group on the same addresses.

impl Group {
    /// Start node `name` with the group's config, its process running with
    /// group id `gid` (uid unchanged). The fault tests use it so iptables'
    /// owner match (`-m owner --gid-owner`) can tell this node's outgoing
    /// packets apart: outgoing TCP connections leave from 127.0.0.1, not
    /// from the member's address, so an address-pair rule misses them.
    pub fn start_with_gid(&mut self, name: &str, gid: u32) {
        use std::os::unix::process::CommandExt;
        assert!(!self.nodes.contains_key(name), "node {name} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("open the node's log");
        let child = Command::new(binary())
            .args(["node", "--config", self.config.to_str().expect("utf-8 path"), "--name", name])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start crossmirror node");
        self.nodes.insert(name.to_string(), child);
    }

    /// Lay out `spec` like [`Group::new`], but on the addresses `ips` (e.g.
    /// another group's: two groups on the same hosts) with ports free on
    /// all of them now, so none of a running group's.
    pub fn new_on(label: &str, spec: GroupSpec, ips: &BTreeMap<String, String>) -> Group {
        let scratch = Scratch::new(label);
        write_secret(&scratch, "secret", 13);
        let ips: BTreeMap<String, String> = spec
            .names()
            .into_iter()
            .map(|name| {
                let ip = ips.get(&name).unwrap_or_else(|| panic!("no address for {name}")).clone();
                (name, ip)
            })
            .collect();
        let all: Vec<String> = ips.values().cloned().collect();
        let ports = free_ports(&all);
        let config = scratch.join("config.toml");
        std::fs::write(&config, spec.render(&ips, ports)).expect("write the group config");
        Group { scratch, spec, config, ips, ports, nodes: BTreeMap::new(), frozen: Default::default() }
    }
}

/// A single-member etcd server on 127.0.0.1 for a group's quorum, killed
/// (and its data removed) on drop.
pub struct EtcdServer {
    child: std::process::Child,
    /// Its client URL, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _dir: crate::Scratch,
}

impl EtcdServer {
    /// Start one and wait until it answers (`etcdctl` is not needed: its
    /// health endpoint is plain HTTP).
    pub fn start() -> EtcdServer {
        let dir = crate::Scratch::new("etcd");
        let (client, peer, metrics) = (crate::free_port(), crate::free_port(), crate::free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd's log");
        let child = std::process::Command::new("/usr/bin/etcd")
            .args(["--name", "solo", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("solo={peer_url}"), "--initial-cluster-state", "new"])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{metrics}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/etcd");
        let server = EtcdServer { child, endpoint, _dir: dir };
        let address: SocketAddr = format!("127.0.0.1:{client}").parse().expect("address");
        let healthy = crate::wait_until(Duration::from_secs(20), || {
            http_get_json(address, "/health", Duration::from_secs(1)).is_ok_and(|health| health["health"] == "true")
        });
        assert!(healthy, "etcd on {} never became healthy", server.endpoint);
        server
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Added for tests/tests/group_failover.rs and group_fencing.rs (branch
// fencing-tests): the quorum backend as a test parameter, the writer that
// logs every acknowledged write, iptables cuts, one group test at a time,
// and log timestamps.

/// The quorum store a group test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The group's own voters (raft).
    Embedded,
    /// A single-member etcd server started for the test.
    Etcd,
}

/// A quorum backend, ready for a group; for etcd it holds the server, so
/// declare it before the group (the group's nodes are killed first).
pub struct Quorum {
    /// Which backend.
    pub backend: Backend,
    /// The etcd server, for [`Backend::Etcd`].
    pub etcd: Option<EtcdServer>,
}

impl Quorum {
    /// Start `backend`'s store; `None` (the test is skipped, and says why)
    /// when etcd is not installed.
    pub fn start(backend: Backend) -> Option<Quorum> {
        match backend {
            Backend::Embedded => Some(Quorum { backend, etcd: None }),
            Backend::Etcd => {
                crate::require_tool("/usr/bin/etcd").then(|| Quorum { backend, etcd: Some(EtcdServer::start()) })
            }
        }
    }

    /// `spec` with its record on this quorum.
    pub fn on(&self, mut spec: GroupSpec) -> GroupSpec {
        spec.etcd = self.etcd.as_ref().map(|server| server.endpoint.clone());
        spec
    }

    /// The etcd server's client port, for [`Backend::Etcd`].
    pub fn etcd_port(&self) -> Option<u16> {
        let server = self.etcd.as_ref()?;
        server.endpoint.rsplit(':').next()?.parse().ok()
    }
}

/// One test function per backend for each scenario `fn name(backend:
/// Backend)` named: `embedded::name` and `etcd::name`.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),+ $(,)?) => {
        mod embedded {
            $(#[test]
            fn $scenario() {
                super::$scenario($crate::group::Backend::Embedded)
            })+
        }
        mod etcd {
            $(#[test]
            fn $scenario() {
                super::$scenario($crate::group::Backend::Etcd)
            })+
        }
    };
}

/// One group test at a time in this test binary (timing checks are about
/// the product, not about two groups fighting for two CPUs).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Seconds since the Unix epoch, the clock the nodes' log timestamps use.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// days_from_civil).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146097 + day_of_era - 719468
}

/// The Unix time of a log line's RFC 3339 UTC timestamp
/// (`2026-11-29T20:48:13.891772Z  INFO …`).
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(|part| part.parse::<i64>());
    let (year, month, day) = (date.next()?.ok()?, date.next()?.ok()?, date.next()?.ok()?);
    let mut time = time.split(':');
    let (hour, minute) = (time.next()?.parse::<i64>().ok()?, time.next()?.parse::<i64>().ok()?);
    let second: f64 = time.next()?.parse().ok()?;
    Some((days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60) as f64 + second)
}

/// Writes block after block (4 KiB, block `i` filled with `i`'s 8 bytes,
/// from block argv[3]) to whichever of the URIs (argv[1], comma-separated)
/// serves, for argv[2] seconds or until its stdin closes, printing
/// `ok <i> <unix time> <uri index>` after each acknowledged write (one
/// write(2) per line: a line is whole or absent). A failed write prints
/// `error …` and is tried again on the next URI that takes a connection.
const WRITER: &str = r#"
import nbd, sys, threading, time
uris = sys.argv[1].split(","); seconds = float(sys.argv[2])
i = int(sys.argv[3]) if len(sys.argv) > 3 else 0
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
def say(line):
    sys.stdout.write(line + "\n"); sys.stdout.flush()
end = time.time() + seconds; h = None; at = 0
while time.time() < end and not done.is_set():
    if h is None:
        for _ in uris:
            try:
                h = nbd.NBD(); h.connect_uri(uris[at]); break
            except Exception:
                h = None; at = (at + 1) % len(uris)
        if h is None:
            time.sleep(0.05); continue
    try:
        h.pwrite(i.to_bytes(8, "little") * 512, i * 4096)
        say("ok %d %.6f %d" % (i, time.time(), at)); i += 1
    except Exception as error:
        say("error %d %.6f %s" % (i, time.time(), str(error).replace("\n", " ")))
        h = None; at = (at + 1) % len(uris); time.sleep(0.01)
"#;

/// What the writer saw.
#[derive(Debug, Default)]
pub struct Writes {
    /// Every acknowledged block, with when (Unix seconds) it was answered
    /// and the index of the URI that answered it.
    pub acknowledged: Vec<(u64, f64, usize)>,
    /// Writes refused (the writer then reconnects).
    pub refused: usize,
}

impl Writes {
    /// The acknowledged blocks.
    pub fn blocks(&self) -> Vec<u64> {
        self.acknowledged.iter().map(|(block, _, _)| *block).collect()
    }

    /// Seconds from `moment` to the first write answered after it.
    pub fn first_after(&self, moment: f64) -> Option<f64> {
        self.acknowledged.iter().map(|(_, time, _)| *time).find(|time| *time > moment).map(|time| time - moment)
    }

    /// When the URI `uri` answered its first and its last write.
    pub fn answered_by(&self, uri: usize) -> Option<(f64, f64)> {
        let mut times = self.acknowledged.iter().filter(|(_, _, by)| *by == uri).map(|(_, time, _)| *time);
        let first = times.next()?;
        Some((first, times.next_back().unwrap_or(first)))
    }
}

/// Run the writer against `uris` for `seconds`; `on_ack` is called with the
/// group and the count after each acknowledged write (to put a fault in).
pub fn run_writer(
    group: &mut Group,
    uris: &[String],
    seconds: u32,
    mut on_ack: impl FnMut(&mut Group, usize),
) -> Writes {
    run_writer_from(group, uris, 0, seconds, |group, writes| {
        on_ack(group, writes.acknowledged.len());
        true
    })
}

/// Run the writer against `uris` from block `first_block` for at most
/// `seconds`; `on_ack` is called with the group and the writes so far after
/// each acknowledged write, and the writer is asked to stop (its stdin is
/// closed: it finishes the write under way) once it returns false.
pub fn run_writer_from(
    group: &mut Group,
    uris: &[String],
    first_block: u64,
    seconds: u32,
    mut on_ack: impl FnMut(&mut Group, &Writes) -> bool,
) -> Writes {
    let mut writer = Command::new("/usr/bin/python3")
        .args(["-c", WRITER, &uris.join(","), &seconds.to_string(), &first_block.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the writer");
    let (sender, lines) = std::sync::mpsc::channel();
    let stdout = writer.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    // A write that never returns (a frozen host) must not hang the test.
    let deadline = Instant::now() + Duration::from_secs(u64::from(seconds) + 60);
    let mut writes = Writes::default();
    loop {
        let line = match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = writer.kill();
                let _ = writer.wait();
                panic!("the writer did not finish within {seconds} s + 60 s\n{}", group.logs_tail(30));
            }
        };
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ok", index, time, uri] => {
                let ack = (index.parse().expect("index"), time.parse().expect("time"), uri.parse().expect("uri"));
                writes.acknowledged.push(ack);
                if writer.stdin.is_some() && !on_ack(group, &writes) {
                    // It ends after the write under way; read on to the end.
                    drop(writer.stdin.take());
                }
            }
            ["error", ..] => writes.refused += 1,
            _ => panic!("writer said {line:?}"),
        }
    }
    let status = writer.wait().expect("writer exits");
    assert!(status.success(), "the writer failed: {status}");
    writes
}

/// The NBD URIs of `members`, in that order (the writer tries them so).
pub fn nbd_uris(group: &Group, members: &[&str]) -> Vec<String> {
    members.iter().map(|name| format!("nbd://{}:{}", group.ips[*name], group.ports[2])).collect()
}

/// Every acknowledged block holds its number on `store`.
pub fn assert_all_present(store: &Path, acknowledged: &[u64]) {
    let bytes = std::fs::read(store).expect("read the store");
    for index in acknowledged {
        let at = (*index * 4096) as usize;
        assert_eq!(&bytes[at..at + 8], &index.to_le_bytes(), "acknowledged write {index} lost on {}", store.display());
    }
}

/// iptables DROP rules, inserted at once and every one deleted on drop
/// (also when the test panics). Rules carry the comment
/// `crossmirror-test-<pid>`; rules of a test process that is gone (killed
/// before its cleanup) are deleted first, from INPUT and OUTPUT.
pub struct Cut {
    rules: Vec<Vec<String>>,
}

impl Cut {
    /// `rules`: each `[chain, match…]`, with `-j DROP` and the comment added.
    pub fn new(rules: &[Vec<String>]) -> Cut {
        crate::remove_orphaned_rules();
        let comment = format!("{}{}", crate::RULE_COMMENT_PREFIX, std::process::id());
        let mut cut = Cut { rules: Vec::new() };
        for rule in rules {
            let mut rule = rule.clone();
            rule.extend(["-m", "comment", "--comment", &comment, "-j", "DROP"].iter().map(|word| word.to_string()));
            cut.insert(rule);
        }
        cut
    }

    /// Insert `rule` (complete, with its target) first in its chain, and
    /// delete it on drop.
    fn insert(&mut self, rule: Vec<String>) {
        let mut args = vec!["-I".to_string()];
        args.extend(rule.iter().cloned());
        let status = Command::new("iptables").args(&args).status().expect("run iptables");
        assert!(status.success(), "iptables {args:?} failed");
        self.rules.push(rule);
    }

    /// Cut node `ip` (its processes running with group id `gid`) from
    /// `peers` on every port and protocol, except the TCP ports in `keep`
    /// on `ip` (the test's own NBD and status connections, which come from
    /// 127.0.0.1 like the peers' do).
    pub fn isolate(ip: &str, gid: u32, peers: &[&str], keep: &[u16]) -> Cut {
        let mut rules = Vec::new();
        for peer in peers {
            rules.push(words(&format!("INPUT -s {ip} -d {peer}")));
            rules.push(words(&format!("INPUT -s {peer} -d {ip}")));
            rules.push(words(&format!("OUTPUT -m owner --gid-owner {gid} -d {peer}")));
        }
        // Everything else to `ip` but the kept ports: the peers' connections
        // leave from 127.0.0.1. `-I` puts the last rule first, so the
        // ACCEPTs go in after the DROP.
        rules.push(words(&format!("INPUT -d {ip}")));
        let mut cut = Cut::new(&rules);
        let comment = format!("{}{}", crate::RULE_COMMENT_PREFIX, std::process::id());
        for port in keep {
            cut.insert(words(&format!("INPUT -d {ip} -p tcp --dport {port} -m comment --comment {comment} -j ACCEPT")));
        }
        cut
    }

    /// Cut node `ip` (group id `gid`) from every peer on `port` only, TCP
    /// and UDP, both directions.
    pub fn port(ip: &str, gid: u32, port: u16) -> Cut {
        let mut rules = Vec::new();
        for protocol in ["tcp", "udp"] {
            rules.push(words(&format!("INPUT -d {ip} -p {protocol} --dport {port}")));
            rules.push(words(&format!("INPUT -s {ip} -p {protocol} --sport {port}")));
            rules.push(words(&format!("OUTPUT -m owner --gid-owner {gid} -p {protocol} --dport {port}")));
        }
        Cut::new(&rules)
    }

    /// Delete every rule now.
    pub fn heal(self) {}
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in self.rules.drain(..) {
            let mut args = vec!["-D".to_string()];
            args.extend(rule);
            let _ = Command::new("iptables").args(&args).status();
        }
    }
}

/// The words of an iptables rule.
fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

/// A group id for a node to run under, unused by any other test.
pub fn fresh_gid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    60000 + (std::process::id() % 500) * 20 + NEXT.fetch_add(1, Ordering::Relaxed) % 20
}

/// Whether the test can cut links (root and iptables); says why not.
pub fn iptables_available() -> bool {
    crate::require_root() && crate::require_tool("iptables")
}
