//! The group config (DESIGN.md §2): one TOML file, the same on every member
//! of a group, naming the group's sites, the members that can reach each
//! site's store (in backup order), the witnesses that only vote, and the
//! ports every node uses on its own address.
//!
//! ```text
//!  file text ──toml──▶ Raw* (every value Spanned) ──check──▶ GroupConfig
//!                              │                                 │
//!              ConfigError "path:line:col: what; fix"      canonical() ──sha256──▶ digest
//! ```
//!
//! Reading happens in two steps so that every error names a line: serde
//! fills raw structs whose values carry their byte spans (unknown keys are
//! refused there, with toml's span), then the checks below turn the raw
//! values into a [`GroupConfig`], pointing at the offending value when a rule
//! is broken. Members compare configs by [`GroupConfig::digest`], a hash of
//! [`GroupConfig::canonical`]: one setting per line, so that two members whose
//! digests differ can show the difference with [`diff`].
//!
//! Rules beyond the obvious ones, and why:
//! - Names of the group, sites, members and witnesses are 1 to 64 of
//!   `[A-Za-z0-9_-]`; they appear in paths and in the canonical text. Names
//!   are compared ignoring ASCII case, so `East` and `east` are one name.
//! - Every member and witness has its own address: the ports are per group,
//!   so two nodes on one address would listen on the same ports.
//! - Members and witnesses are voters with ids in file order, so the order of
//!   `[[member]]` and `[[witness]]` tables is part of the config (and of its
//!   digest); the order of keys inside a table is not.
//! - `volume_size` is a multiple of 4 KiB, so any copy may be opened O_DIRECT.
//! - `direct` may be set on any site (how its host opens the store);
//!   `mode`, `lag_bytes_max` and `lag_seconds_max` only on copy sites. The
//!   lag bounds are accepted, and kept in the digest, on a sync copy too.
//! - Relative paths (`secret_file`, `volume`, `state_dir`) resolve against
//!   the config file's directory; two members or witnesses may not share a
//!   `state_dir`. A group may have no copy site; at most `SLOTS_MAX` (the
//!   bitmap's slots) copy sites and [`VOTERS_MAX`] voters.
//! - `[quorum] backend = "etcd"` keeps the quorum state in an etcd cluster
//!   named by `endpoints` (each `http://host:port`, at most
//!   [`ETCD_ENDPOINTS_MAX`]); it is refused with [`ConfigErrorKind::NotBuilt`]
//!   by a build without the cargo feature `etcd`, and `endpoints` is refused
//!   with the embedded backend, where it would mean nothing.
//! - `[liveness]` sets failure detection: `heartbeat_ms` (how often each node
//!   says it is alive) and `failure_ms` (how long silence means failure),
//!   which must span at least [`FAILURE_HEARTBEATS_MIN`] heartbeats, so that
//!   one or two lost datagrams are not a failure. `failure_ms` also sets the
//!   embedded quorum's election timeout (`quorum/raft`), so that a dead raft
//!   leader is replaced within the same time. A failover takes about
//!   `failure_ms + lease_ms + LEASE_MARGIN_MS` (`core.rs`); the defaults
//!   are chosen for a failover under 2 s (see [`LIVENESS_DEFAULT`]).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use engine::bitmap::{REGIONS_MAX, REGION_BYTES_DEFAULT, SLOTS_MAX};
use engine::size::{parse_size, SizeError};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;
use toml::Spanned;

/// The default ports (see `[ports]` in examples/three-hosts.toml).
pub const PORTS_DEFAULT: Ports = Ports { quorum: 7400, mirror: 7401, nbd: 10809, admin: 7402 };
/// The default quorum lease: the production host serves for this long after
/// the quorum last confirmed that the record names it. It is also the I/O
/// pause a renewal may cause: requests wait once no renewal (a linearizable
/// read, asked every quarter lease) has answered for a whole lease, so the
/// lease must outlast three quarters of it plus the slowest read the group
/// should ride out. 500 ms: a read on one site takes milliseconds; a
/// failover waits for the lease once more after failure detection.
pub const LEASE_MS_DEFAULT: u64 = 500;
/// The shortest lease accepted: shorter ones expire under ordinary scheduling jitter.
pub const LEASE_MS_MIN: u64 = 100;
/// The longest lease accepted: a failover waits for the lease to run out.
pub const LEASE_MS_MAX: u64 = 60_000;
/// Failure detection by default: a heartbeat every 100 ms, failure after
/// 1 s of silence (ten heartbeats). With the default lease (500 ms) and the
/// takeover margin (`core::LEASE_MARGIN_MS`, 200 ms), a failover takes
/// about 1.8 s (benches/RESULTS.md). What it risks: a production host that
/// is silent for a second (paused, starved of CPU, cut off) is forced out
/// and replaced, a false failover; raise `failure_ms` where hosts stall
/// longer than that and should keep their role.
pub const LIVENESS_DEFAULT: LivenessTiming = LivenessTiming {
    heartbeat: Duration::from_millis(HEARTBEAT_MS_DEFAULT),
    failure: Duration::from_millis(FAILURE_MS_DEFAULT),
};
/// The default heartbeat interval.
pub const HEARTBEAT_MS_DEFAULT: u64 = 100;
/// The shortest heartbeat interval accepted.
pub const HEARTBEAT_MS_MIN: u64 = 10;
/// The longest heartbeat interval accepted.
pub const HEARTBEAT_MS_MAX: u64 = 10_000;
/// The default failure detection time.
pub const FAILURE_MS_DEFAULT: u64 = 1000;
/// The shortest failure detection accepted: the embedded quorum's election
/// timeout follows it, and a shorter one elects leaders on ordinary
/// scheduling jitter.
pub const FAILURE_MS_MIN: u64 = 500;
/// The longest failure detection accepted.
pub const FAILURE_MS_MAX: u64 = 60_000;
/// A failure is at least this many heartbeats missed.
pub const FAILURE_HEARTBEATS_MIN: u64 = 3;
/// The smallest region size.
pub const REGION_BYTES_MIN: u64 = 4 << 10;
/// The largest region size.
pub const REGION_BYTES_MAX: u64 = 16 << 20;
/// An async copy's default lag bound.
pub const LAG_BYTES_MAX_DEFAULT: u64 = engine::replicator::LAG_BYTES_MAX_DEFAULT;
/// The most voters (members and witnesses) in a group.
pub const VOTERS_MAX: usize = 16;
/// The most bytes a config file may have.
pub const FILE_BYTES_MAX: u64 = 1 << 20;
/// The longest name, of the group or of a site, member or witness.
pub const NAME_CHARS_MAX: usize = 64;
/// The longest NBD export name (the NBD protocol's limit).
pub const NBD_EXPORT_BYTES_MAX: usize = 4096;
/// The volume size must be a multiple of this (O_DIRECT's block).
pub const VOLUME_BYTES_MULTIPLE: u64 = 4096;
/// Where a node keeps its state unless the config says otherwise:
/// `<this>/<group>/<name>`.
pub const STATE_DIR_ROOT: &str = "/var/lib/crossmirror";
/// The most etcd endpoints a `[quorum]` table may name.
pub const ETCD_ENDPOINTS_MAX: usize = 16;
/// The first line of the canonical text; changes when its format does.
pub const CANONICAL_HEADER: &str = "crossmirror group config v1";

/// A group's configuration, checked: every rule of this module holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Where it was read from (not part of the digest).
    pub path: PathBuf,
    /// The group's name.
    pub group: String,
    /// The volume's size in bytes, the same on every copy.
    pub volume_size: u64,
    /// Bytes per bit of the write-intent bitmap.
    pub region_size: u64,
    /// The ceiling of the production host's resync rate to each copy, in
    /// bytes per second (`resync_rate_max = "20M"`; 0, the default: none,
    /// the adaptive controller alone paces it).
    pub resync_rate_max: u64,
    /// The shared secret's file, resolved against the config's directory.
    pub secret_file: PathBuf,
    /// What the production host does with I/O while the group has no quorum.
    pub on_quorum_loss: OnQuorumLoss,
    /// The NBD export name.
    pub nbd_export: String,
    /// The ports every node uses on its own address.
    pub ports: Ports,
    /// The quorum lease.
    pub lease: Duration,
    /// Failure detection.
    pub liveness: LivenessTiming,
    /// Where the quorum state lives.
    pub quorum_backend: QuorumBackend,
    /// The sites, in file order; exactly one is the production site.
    pub sites: Vec<SiteConfig>,
    /// The members, in file order.
    pub members: Vec<MemberConfig>,
    /// The witnesses, in file order.
    pub witnesses: Vec<WitnessConfig>,
}

/// Failure detection (`[liveness]`): how often every node says it is alive,
/// and how long a voter may be silent before it counts as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LivenessTiming {
    /// The heartbeat interval.
    pub heartbeat: Duration,
    /// Silence this long is failure (and sets the embedded quorum's
    /// election timeout).
    pub failure: Duration,
}

/// Where a group's quorum state lives (`[quorum] backend`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QuorumBackend {
    /// The group's voters run the quorum themselves (the default).
    Embedded,
    /// An etcd cluster the group does not run holds it (cargo feature `etcd`).
    Etcd {
        /// Its client URLs, `http://host:port`, in file order.
        endpoints: Vec<String>,
    },
}

/// What the production host does with I/O while its group has no quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OnQuorumLoss {
    /// Hold requests until quorum returns (the default).
    Suspend,
    /// Fail requests with an I/O error.
    IoError,
}

/// A site's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteRole {
    /// Its store is the production copy, served over NBD.
    Production,
    /// Its store is a mirror copy.
    Copy,
}

/// How a copy site is mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CopyMode {
    /// A write is acknowledged once this copy has it (the default).
    Sync,
    /// Writes are shipped behind, up to `lag_bytes_max`.
    Async,
}

/// The ports every member and witness uses on its own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ports {
    /// Raft (TCP) and liveness (UDP).
    pub quorum: u16,
    /// Replication: copy hosts listen here.
    pub mirror: u16,
    /// The production host serves NBD here.
    pub nbd: u16,
    /// Each node's HTTP status endpoint.
    pub admin: u16,
}

/// One site: the members that reach one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// The site's name.
    pub name: String,
    /// Production or copy.
    pub role: SiteRole,
    /// How this copy is mirrored (`Sync`, and meaningless, on the production site).
    pub mode: CopyMode,
    /// An async copy's lag bound in bytes (the default, and meaningless, on
    /// the production site).
    pub lag_bytes_max: u64,
    /// An async copy's lag bound in time, milliseconds (`lag_seconds_max`;
    /// 0: none).
    pub lag_ms_max: u64,
    /// Whether this site's host opens its store with O_DIRECT.
    pub direct: bool,
    /// How the production host compresses data frames on the way to this
    /// site's store whenever this site holds a copy (`compress = "lz4"`,
    /// `"zstd"`, `"zstd:LEVEL"` or `"none"`, the default): any site, since
    /// the production role moves.
    pub compress: engine::protocol::Compression,
}

/// One member: a `crossmirror node` on a host that can reach its site's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// The member's name, unique among members and witnesses.
    pub name: String,
    /// The site whose store it reaches.
    pub site: String,
    /// Its address; the ports come from [`GroupConfig::ports`].
    pub address: IpAddr,
    /// The store's path as seen from this member (resolved).
    pub volume: PathBuf,
    /// Lower hosts first within the site.
    pub backup_order: u32,
    /// Where this member keeps its state (resolved).
    pub state_dir: PathBuf,
    /// Commands run when its roles change (seed 004's actions).
    pub actions: Actions,
}

/// A member's actions: shell commands run (`sh -c`) when its roles change,
/// with `CROSSMIRROR_GROUP`, `_SITE`, `_ROLE`, `_EPOCH`, `_EVENT` and
/// `_NBD` in the environment, each within `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Actions {
    /// After this member became host of a role (the role runs).
    pub start: Option<String>,
    /// Before this member hands a role on (a planned switchover or leave);
    /// a failing `stop` keeps the role here (the hand-over is refused).
    pub stop: Option<String>,
    /// On every change of the group record this member sees.
    pub notify: Option<String>,
    /// After a failure took a role to this member (a takeover or failover).
    pub recovery: Option<String>,
    /// How long one action may run before it is killed and counts as failed.
    pub timeout: Duration,
}

/// An action's default time limit.
pub const ACTION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// One witness: votes in the quorum, holds no data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    /// The witness's name, unique among members and witnesses.
    pub name: String,
    /// Its address; the ports come from [`GroupConfig::ports`].
    pub address: IpAddr,
    /// Where it keeps its state (resolved).
    pub state_dir: PathBuf,
}

/// A voter of the group's quorum: a member or a witness.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Voter {
    /// 1, 2, 3, ...: members in file order, then witnesses.
    pub id: u64,
    /// The member's or witness's name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Whether it is a witness.
    pub witness: bool,
}

/// A 1-based line and column (in characters) of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The line, from 1.
    pub line: usize,
    /// The column in characters, from 1.
    pub column: usize,
}

/// What kind of thing is wrong with a config, for callers that branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Read,
    /// The text is not TOML, or a value has the wrong type.
    Syntax,
    /// A key this format does not have.
    UnknownKey,
    /// A required setting is absent.
    Missing,
    /// A value is malformed or out of range.
    Invalid,
    /// Settings contradict each other: duplicates, references to nothing.
    Conflict,
    /// The setting names a feature that is not built yet.
    NotBuilt,
}

/// A config that cannot be used. Displays as `<path>:<line>:<col>: <what is
/// wrong>; <the fix>` (without line and column when there is no position).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}: {message}", location(.path, .position))]
pub struct ConfigError {
    /// The config file's path as given.
    pub path: PathBuf,
    /// Where in the file, when known.
    pub position: Option<Position>,
    /// What kind of problem it is.
    pub kind: ConfigErrorKind,
    /// What is wrong and how to fix it.
    pub message: String,
}

fn location(path: &Path, position: &Option<Position>) -> String {
    match position {
        Some(position) => format!("{}:{}:{}", path.display(), position.line, position.column),
        None => path.display().to_string(),
    }
}

impl OnQuorumLoss {
    /// The spelling in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnQuorumLoss::Suspend => "suspend",
            OnQuorumLoss::IoError => "io-error",
        }
    }
}

impl SiteRole {
    /// The spelling in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteRole::Production => "production",
            SiteRole::Copy => "copy",
        }
    }
}

impl CopyMode {
    /// The spelling in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Sync => "sync",
            CopyMode::Async => "async",
        }
    }
}

impl fmt::Display for OnQuorumLoss {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Display for SiteRole {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl fmt::Display for CopyMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl GroupConfig {
    /// Read and check the config file at `path`. Relative paths inside it
    /// resolve against the file's directory, made absolute.
    pub fn load(path: &Path) -> Result<GroupConfig, ConfigError> {
        let read_error = |message: String| ConfigError {
            path: path.to_path_buf(),
            position: None,
            kind: ConfigErrorKind::Read,
            message,
        };
        let metadata = std::fs::metadata(path)
            .map_err(|error| read_error(format!("cannot read the group config: {error}; check the path")))?;
        if metadata.len() > FILE_BYTES_MAX {
            return Err(read_error(format!(
                "is {} bytes, more than a group config may have ({FILE_BYTES_MAX}); point at the right file",
                metadata.len()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|error| read_error(format!("cannot read the group config: {error}; it must be UTF-8 text")))?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        parse_in(&text, path, absolute.parent().unwrap_or(Path::new("")))
    }

    /// Check the config `text`, read from `path`; relative paths inside it
    /// resolve against `path`'s directory as given.
    pub fn parse(text: &str, path: &Path) -> Result<GroupConfig, ConfigError> {
        parse_in(text, path, path.parent().unwrap_or(Path::new("")))
    }

    /// Deterministic text, one setting per line (`member a site = east`),
    /// independent of formatting, comments, key order and of `self.path`.
    /// Every default is written out and paths are the resolved ones.
    pub fn canonical(&self) -> String {
        let mut lines = vec![
            CANONICAL_HEADER.to_string(),
            format!("group = {}", self.group),
            format!("volume_size = {}", self.volume_size),
            format!("region_size = {}", self.region_size),
            format!("secret_file = {:?}", self.secret_file.to_string_lossy()),
            format!("on_quorum_loss = {}", self.on_quorum_loss),
            format!("nbd_export = {:?}", self.nbd_export),
            format!("ports quorum = {}", self.ports.quorum),
            format!("ports mirror = {}", self.ports.mirror),
            format!("ports nbd = {}", self.ports.nbd),
            format!("ports admin = {}", self.ports.admin),
        ];
        // Written only when set: the digest of a config without it stays
        // what it was before the setting existed.
        if self.resync_rate_max != 0 {
            lines.push(format!("resync_rate_max = {}", self.resync_rate_max));
        }
        match &self.quorum_backend {
            QuorumBackend::Embedded => lines.push("quorum backend = embedded".to_string()),
            QuorumBackend::Etcd { endpoints } => {
                lines.push("quorum backend = etcd".to_string());
                lines.push(format!("quorum endpoints = {endpoints:?}"));
            }
        }
        lines.push(format!("quorum lease_ms = {}", self.lease.as_millis()));
        lines.push(format!("liveness heartbeat_ms = {}", self.liveness.heartbeat.as_millis()));
        lines.push(format!("liveness failure_ms = {}", self.liveness.failure.as_millis()));
        for site in &self.sites {
            let name = &site.name;
            lines.push(format!("site {name} role = {}", site.role));
            if site.role == SiteRole::Copy {
                lines.push(format!("site {name} mode = {}", site.mode));
                lines.push(format!("site {name} lag_bytes_max = {}", site.lag_bytes_max));
                if site.lag_ms_max != engine::replicator::LAG_MS_MAX_DEFAULT {
                    // (Only when set otherwise: digests of configs written
                    // before the setting existed stay what they were.)
                    lines.push(format!("site {name} lag_ms_max = {}", site.lag_ms_max));
                }
            }
            lines.push(format!("site {name} direct = {}", site.direct));
            if site.compress != engine::protocol::Compression::None {
                lines.push(format!("site {name} compress = {}", site.compress.as_string()));
            }
        }
        for (member, id) in self.members.iter().zip(1u64..) {
            let name = &member.name;
            lines.push(format!("member {name} voter_id = {id}"));
            lines.push(format!("member {name} site = {}", member.site));
            lines.push(format!("member {name} address = {}", member.address));
            lines.push(format!("member {name} volume = {:?}", member.volume.to_string_lossy()));
            lines.push(format!("member {name} backup_order = {}", member.backup_order));
            lines.push(format!("member {name} state_dir = {:?}", member.state_dir.to_string_lossy()));
            let actions = &member.actions;
            for (which, command) in [
                ("start", &actions.start),
                ("stop", &actions.stop),
                ("notify", &actions.notify),
                ("recovery", &actions.recovery),
            ] {
                if let Some(command) = command {
                    lines.push(format!("member {name} actions {which} = {command:?}"));
                }
            }
            lines.push(format!("member {name} actions timeout_ms = {}", actions.timeout.as_millis()));
        }
        let first_witness_id = self.members.len() as u64 + 1;
        for (witness, id) in self.witnesses.iter().zip(first_witness_id..) {
            let name = &witness.name;
            lines.push(format!("witness {name} voter_id = {id}"));
            lines.push(format!("witness {name} address = {}", witness.address));
            lines.push(format!("witness {name} state_dir = {:?}", witness.state_dir.to_string_lossy()));
        }
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }

    /// SHA-256 of [`GroupConfig::canonical`].
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.canonical().as_bytes()).into()
    }

    /// [`GroupConfig::digest`] in lowercase hex.
    pub fn digest_hex(&self) -> String {
        self.digest().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The member called `name`.
    pub fn member(&self, name: &str) -> Option<&MemberConfig> {
        self.members.iter().find(|member| member.name == name)
    }

    /// The witness called `name`.
    pub fn witness(&self, name: &str) -> Option<&WitnessConfig> {
        self.witnesses.iter().find(|witness| witness.name == name)
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> Option<&SiteConfig> {
        self.sites.iter().find(|site| site.name == name)
    }

    /// The production site.
    ///
    /// # Panics
    /// If `sites` has no production site, which a config from
    /// [`GroupConfig::parse`] always has.
    pub fn production_site(&self) -> &SiteConfig {
        self.sites
            .iter()
            .find(|site| site.role == SiteRole::Production)
            .expect("a checked GroupConfig has exactly one production site")
    }

    /// The copy sites, in file order.
    pub fn copy_sites(&self) -> Vec<&SiteConfig> {
        self.sites.iter().filter(|site| site.role == SiteRole::Copy).collect()
    }

    /// The members of `site`, lowest `backup_order` (first to host) first.
    pub fn site_members(&self, site: &str) -> Vec<&MemberConfig> {
        let mut members: Vec<&MemberConfig> = self.members.iter().filter(|member| member.site == site).collect();
        members.sort_by_key(|member| member.backup_order);
        members
    }

    /// The quorum's voters: members in file order, then witnesses; ids 1, 2, 3, ...
    pub fn voters(&self) -> Vec<Voter> {
        let members = self.members.iter().map(|member| (&member.name, member.address, false));
        let witnesses = self.witnesses.iter().map(|witness| (&witness.name, witness.address, true));
        members
            .chain(witnesses)
            .zip(1u64..)
            .map(|((name, address, witness), id)| Voter { id, name: name.clone(), address, witness })
            .collect()
    }

    /// The voter id of the member or witness called `name`.
    pub fn voter_id(&self, name: &str) -> Option<u64> {
        self.voters().into_iter().find(|voter| voter.name == name).map(|voter| voter.id)
    }
}

/// Lines only in `mine` (prefixed `"- "`) and only in `theirs` (`"+ "`), for
/// a clear refusal when two members' canonical configs differ. A changed
/// setting shows as its `-` line followed by its `+` line.
pub fn diff(mine: &str, theirs: &str) -> Vec<String> {
    let mine_lines: HashSet<&str> = mine.lines().collect();
    let theirs_lines: HashSet<&str> = theirs.lines().collect();
    let only_theirs: Vec<&str> = theirs.lines().filter(|line| !mine_lines.contains(line)).collect();
    let mut shown: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for line in mine.lines().filter(|line| !theirs_lines.contains(line)) {
        out.push(format!("- {line}"));
        let key = setting_key(line);
        let changed: Vec<&str> =
            only_theirs.iter().copied().filter(|other| setting_key(other) == key && !shown.contains(other)).collect();
        for other in changed {
            shown.insert(other);
            out.push(format!("+ {other}"));
        }
    }
    out.extend(only_theirs.iter().filter(|line| !shown.contains(*line)).map(|line| format!("+ {line}")));
    out
}

/// The part of a canonical line before its value.
fn setting_key(line: &str) -> &str {
    line.split_once(" = ").map_or(line, |(key, _)| key)
}

// ---------------------------------------------------------------------------
// The raw file: what serde reads, every value with its span.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    group: Option<Spanned<String>>,
    volume_size: Option<Spanned<RawSize>>,
    region_size: Option<Spanned<RawSize>>,
    resync_rate_max: Option<Spanned<RawSize>>,
    secret_file: Option<Spanned<String>>,
    on_quorum_loss: Option<Spanned<String>>,
    nbd_export: Option<Spanned<String>>,
    ports: Option<RawPorts>,
    quorum: Option<RawQuorum>,
    liveness: Option<RawLiveness>,
    #[serde(default)]
    site: Vec<Spanned<RawSite>>,
    #[serde(default)]
    member: Vec<Spanned<RawMember>>,
    #[serde(default)]
    witness: Vec<Spanned<RawWitness>>,
}

/// The keys of the file's top level, for the hint on a misplaced one.
const TOP_LEVEL_KEYS: [&str; 10] = [
    "group",
    "volume_size",
    "region_size",
    "resync_rate_max",
    "secret_file",
    "on_quorum_loss",
    "nbd_export",
    "ports",
    "quorum",
    "liveness",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    quorum: Option<Spanned<i64>>,
    mirror: Option<Spanned<i64>>,
    nbd: Option<Spanned<i64>>,
    admin: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuorum {
    backend: Option<Spanned<String>>,
    endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    lease_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLiveness {
    heartbeat_ms: Option<Spanned<i64>>,
    failure_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Option<Spanned<String>>,
    role: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    lag_bytes_max: Option<Spanned<RawSize>>,
    lag_seconds_max: Option<Spanned<f64>>,
    direct: Option<Spanned<bool>>,
    compress: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: Option<Spanned<String>>,
    site: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    volume: Option<Spanned<String>>,
    backup_order: Option<Spanned<i64>>,
    state_dir: Option<Spanned<String>>,
    actions: Option<Spanned<RawActions>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActions {
    start: Option<Spanned<String>>,
    stop: Option<Spanned<String>>,
    notify: Option<Spanned<String>>,
    recovery: Option<Spanned<String>>,
    timeout_ms: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitness {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
}

/// A size as written: `"1G"` or a bare number of bytes.
struct RawSize(String);

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawSize, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a size such as \"1G\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawSize, E> {
                Ok(RawSize(value.to_string()))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RawSize, E> {
                Ok(RawSize(value.to_string()))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawSize, E> {
                Ok(RawSize(value.to_string()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

// ---------------------------------------------------------------------------
// Checking: raw values in, a GroupConfig or the first broken rule out.

/// Turns spans into positions and builds errors.
struct Checker<'a> {
    text: &'a str,
    path: &'a Path,
    base: &'a Path,
}

type Checked<T> = Result<T, ConfigError>;

fn parse_in(text: &str, path: &Path, base: &Path) -> Result<GroupConfig, ConfigError> {
    let checker = Checker { text, path, base };
    let raw: RawFile = toml::from_str(text).map_err(|error| checker.toml_error(&error))?;
    checker.check(raw)
}

impl Checker<'_> {
    fn position(&self, offset: usize) -> Position {
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Position { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.position(span.start).line
    }

    fn error(&self, span: Option<&Range<usize>>, kind: ConfigErrorKind, message: String) -> ConfigError {
        ConfigError {
            path: self.path.to_path_buf(),
            position: Some(self.position(span.map_or(0, |span| span.start))),
            kind,
            message,
        }
    }

    fn invalid(&self, span: impl Borrow<Range<usize>>, message: String) -> ConfigError {
        self.error(Some(span.borrow()), ConfigErrorKind::Invalid, message)
    }

    fn conflict(&self, span: impl Borrow<Range<usize>>, message: String) -> ConfigError {
        self.error(Some(span.borrow()), ConfigErrorKind::Conflict, message)
    }

    fn toml_error(&self, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let message = error.message().trim_end().replace('\n', ": ").replace("expected i64", "expected a whole number");
        let unknown = message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`'));
        match unknown {
            Some((key, _)) => {
                let fix = if TOP_LEVEL_KEYS.contains(&key) {
                    "a top-level setting must come before the first [table]; move it up"
                } else {
                    "remove it or correct its spelling"
                };
                let expected = message.split_once(", expected ").map_or(String::new(), |(_, keys)| {
                    format!(
                        " (this table's keys: {})",
                        keys.trim_start_matches("one of ").replace('`', "").replace(" or ", ", ")
                    )
                });
                self.error(span.as_ref(), ConfigErrorKind::UnknownKey, format!("unknown key {key:?}{expected}; {fix}"))
            }
            None => self.error(
                span.as_ref(),
                ConfigErrorKind::Syntax,
                format!("{message}; see examples/three-hosts.toml for the format"),
            ),
        }
    }

    /// A required setting; `span` is where its table starts (None: the top).
    fn required<'v, T>(
        &self,
        value: &'v Option<Spanned<T>>,
        span: Option<&Range<usize>>,
        what: &str,
        fix: &str,
    ) -> Checked<&'v Spanned<T>> {
        value.as_ref().ok_or_else(|| self.error(span, ConfigErrorKind::Missing, format!("{what} is missing; {fix}")))
    }

    fn name(&self, value: &Spanned<String>, what: &str) -> Checked<String> {
        let name = value.get_ref();
        let good = (1..=NAME_CHARS_MAX).contains(&name.chars().count())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !good {
            return Err(self.invalid(
                value.span(),
                format!(
                    "{what} name {name:?} is not 1 to {NAME_CHARS_MAX} of A-Z a-z 0-9 _ -; rename it with only those"
                ),
            ));
        }
        Ok(name.clone())
    }

    fn size(&self, value: &Spanned<RawSize>, what: &str) -> Checked<u64> {
        let text = value.get_ref().0.trim();
        parse_size(text).map_err(|error| {
            let message = match error {
                SizeError::NoNumber { .. } => {
                    format!("{what} {text:?} does not start with a number; write a size such as \"1G\" or 1073741824")
                }
                SizeError::TooLarge { .. } => format!("{what} {text:?} is too large; it must fit in 64 bits"),
                SizeError::UnknownUnit { unit, .. } => {
                    format!("{what} {text:?}: unknown unit {unit:?} (use K, M, G or T)")
                }
            };
            self.invalid(value.span(), message)
        })
    }

    /// A path from the file, resolved against the config's directory, with
    /// `.` components dropped so the canonical text does not depend on them.
    fn path(&self, value: &Spanned<String>, what: &str) -> Checked<PathBuf> {
        let text = value.get_ref();
        if text.is_empty() {
            return Err(self.invalid(value.span(), format!("{what} is empty; give a path")));
        }
        let joined = self.base.join(text);
        Ok(joined.components().filter(|component| *component != Component::CurDir).collect())
    }

    fn address(&self, value: &Spanned<String>, what: &str) -> Checked<IpAddr> {
        let text = value.get_ref().trim();
        let span = value.span();
        let address: IpAddr = match text.parse() {
            Ok(address) => address,
            Err(_) if text.parse::<SocketAddr>().is_ok() => {
                return Err(self.invalid(
                    span,
                    format!("{what} address {text:?} has a port; remove it, the ports come from [ports]"),
                ))
            }
            Err(_) => {
                return Err(self.invalid(
                    span,
                    format!(
                        "{what} address {text:?} is not an IP address; write an IPv4 or IPv6 address without a port, such as \"127.0.0.1\""
                    ),
                ))
            }
        };
        if address.is_unspecified() || address.is_multicast() {
            return Err(self.invalid(
                span,
                format!("{what} address {text:?} cannot be connected to; give the node's own unicast address"),
            ));
        }
        Ok(address)
    }

    fn check(&self, raw: RawFile) -> Checked<GroupConfig> {
        let group_value =
            self.required(&raw.group, None, "the group setting", "add group = \"<name>\" at the top of the file")?;
        let group = self.name(group_value, "group")?;
        let (volume_size, region_size) = self.sizes(&raw)?;
        let resync_rate_max = match &raw.resync_rate_max {
            None => 0,
            Some(value) => self.size(value, "resync_rate_max")?,
        };
        let secret_value = self.required(
            &raw.secret_file,
            None,
            "the secret_file setting",
            "add secret_file = \"<path>\" at the top (create it with: head -c 32 /dev/urandom > <path>; chmod 600 <path>)",
        )?;
        let secret_file = self.path(secret_value, "secret_file")?;
        let on_quorum_loss = self.on_quorum_loss(&raw.on_quorum_loss)?;
        let nbd_export = self.nbd_export(&raw.nbd_export)?;
        let ports = self.ports(raw.ports.as_ref())?;
        let (quorum_backend, lease) = self.quorum(raw.quorum.as_ref())?;
        let liveness = self.liveness(raw.liveness.as_ref())?;
        let sites = self.sites(&raw.site)?;
        let mut names = Names::default();
        let members = self.members(&raw.member, &group, &sites, &mut names)?;
        let witnesses = self.witnesses(&raw.witness, &group, &mut names)?;
        self.every_site_has_a_member(&raw.site, &sites, &members)?;
        self.voter_count(&raw, members.len() + witnesses.len())?;
        Ok(GroupConfig {
            path: self.path.to_path_buf(),
            group,
            volume_size,
            region_size,
            resync_rate_max,
            secret_file,
            on_quorum_loss,
            nbd_export,
            ports,
            lease,
            liveness,
            quorum_backend,
            sites,
            members,
            witnesses,
        })
    }

    fn sizes(&self, raw: &RawFile) -> Checked<(u64, u64)> {
        let volume_value =
            self.required(&raw.volume_size, None, "the volume_size setting", "add volume_size = \"1G\" (say)")?;
        let volume_size = self.size(volume_value, "volume_size")?;
        let volume_text = volume_value.get_ref().0.trim();
        let volume_span = volume_value.span();
        if volume_size == 0 {
            return Err(self.invalid(
                volume_span,
                format!("volume_size {volume_text:?} is zero; give the volume's size, such as \"1G\""),
            ));
        }
        if volume_size % VOLUME_BYTES_MULTIPLE != 0 {
            return Err(self.invalid(
                volume_span,
                format!(
                    "volume_size {volume_text:?} ({volume_size} bytes) is not a multiple of 4K; round it to whole 4 KiB blocks"
                ),
            ));
        }
        let region_size = match &raw.region_size {
            None => REGION_BYTES_DEFAULT,
            Some(value) => {
                let region_size = self.size(value, "region_size")?;
                if !region_size.is_power_of_two() || !(REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&region_size) {
                    return Err(self.invalid(
                        value.span(),
                        format!(
                            "region_size {:?} ({region_size} bytes) is not a power of two from 4K to 16M; use one, such as \"256K\"",
                            value.get_ref().0.trim()
                        ),
                    ));
                }
                region_size
            }
        };
        if volume_size.div_ceil(region_size) > REGIONS_MAX {
            return Err(self.invalid(
                volume_span,
                format!(
                    "volume_size {volume_text:?} has more than {REGIONS_MAX} regions of {region_size} bytes; raise region_size"
                ),
            ));
        }
        Ok((volume_size, region_size))
    }

    fn on_quorum_loss(&self, value: &Option<Spanned<String>>) -> Checked<OnQuorumLoss> {
        let Some(value) = value else { return Ok(OnQuorumLoss::Suspend) };
        match value.get_ref().as_str() {
            "suspend" => Ok(OnQuorumLoss::Suspend),
            "io-error" => Ok(OnQuorumLoss::IoError),
            other => Err(self.invalid(
                value.span(),
                format!("on_quorum_loss {other:?} is unknown; use \"suspend\" or \"io-error\""),
            )),
        }
    }

    fn nbd_export(&self, value: &Option<Spanned<String>>) -> Checked<String> {
        let Some(value) = value else { return Ok(String::new()) };
        if value.get_ref().len() > NBD_EXPORT_BYTES_MAX {
            return Err(self.invalid(
                value.span(),
                format!("nbd_export is longer than {NBD_EXPORT_BYTES_MAX} bytes (NBD's limit); shorten it"),
            ));
        }
        Ok(value.get_ref().clone())
    }

    fn ports(&self, raw: Option<&RawPorts>) -> Checked<Ports> {
        let Some(raw) = raw else { return Ok(PORTS_DEFAULT) };
        let mut seen: Vec<(&str, u16)> = Vec::new();
        let mut port = |value: &Option<Spanned<i64>>, name: &'static str, default: u16| -> Checked<u16> {
            let Some(value) = value else {
                seen.push((name, default));
                return Ok(default);
            };
            let number = *value.get_ref();
            let port = u16::try_from(number).ok().filter(|port| *port != 0).ok_or_else(|| {
                self.invalid(value.span(), format!("ports.{name} is {number}; use a port from 1 to 65535"))
            })?;
            if let Some((other, _)) = seen.iter().find(|(_, used)| *used == port) {
                return Err(self.conflict(
                    value.span(),
                    format!("ports.{name} is {port}, as ports.{other} is; give each port its own number (they share each node's address)"),
                ));
            }
            seen.push((name, port));
            Ok(port)
        };
        Ok(Ports {
            quorum: port(&raw.quorum, "quorum", PORTS_DEFAULT.quorum)?,
            mirror: port(&raw.mirror, "mirror", PORTS_DEFAULT.mirror)?,
            nbd: port(&raw.nbd, "nbd", PORTS_DEFAULT.nbd)?,
            admin: port(&raw.admin, "admin", PORTS_DEFAULT.admin)?,
        })
    }

    /// The quorum table: the backend and the lease.
    fn quorum(&self, raw: Option<&RawQuorum>) -> Checked<(QuorumBackend, Duration)> {
        let Some(raw) = raw else { return Ok((QuorumBackend::Embedded, Duration::from_millis(LEASE_MS_DEFAULT))) };
        let backend = self.quorum_backend(raw)?;
        Ok((backend, self.lease(raw)?))
    }

    fn quorum_backend(&self, raw: &RawQuorum) -> Checked<QuorumBackend> {
        let backend = raw.backend.as_ref().map_or("embedded", |backend| backend.get_ref().as_str());
        match backend {
            "embedded" => match &raw.endpoints {
                None => Ok(QuorumBackend::Embedded),
                Some(endpoints) => Err(self.conflict(
                    endpoints.span(),
                    "quorum.endpoints is set, but the quorum backend is \"embedded\"; set backend = \"etcd\" or remove endpoints".to_string(),
                )),
            },
            "etcd" if !cfg!(feature = "etcd") => Err(self.error(
                raw.backend.as_ref().map(|backend| backend.span()).as_ref(),
                ConfigErrorKind::NotBuilt,
                "quorum.backend \"etcd\": crossmirror was built without the etcd feature; rebuild with: cargo build --features crossmirror-cluster-glue/etcd".to_string(),
            )),
            "etcd" => {
                let endpoints = self.required(
                    &raw.endpoints,
                    raw.backend.as_ref().map(|backend| backend.span()).as_ref(),
                    "quorum.endpoints (the etcd cluster's client URLs)",
                    "add endpoints = [\"http://<host>:2379\", ...] to [quorum]",
                )?;
                Ok(QuorumBackend::Etcd { endpoints: self.etcd_endpoints(endpoints)? })
            }
            other => Err(self.invalid(
                raw.backend.as_ref().map(|backend| backend.span()).unwrap_or_default(),
                format!("quorum.backend {other:?} is unknown; use \"embedded\" or \"etcd\""),
            )),
        }
    }

    fn etcd_endpoints(&self, endpoints: &Spanned<Vec<Spanned<String>>>) -> Checked<Vec<String>> {
        let list = endpoints.get_ref();
        if list.is_empty() || list.len() > ETCD_ENDPOINTS_MAX {
            return Err(self.invalid(
                endpoints.span(),
                format!("quorum.endpoints has {} entries; give 1 to {ETCD_ENDPOINTS_MAX} etcd client URLs", list.len()),
            ));
        }
        let mut seen: Vec<String> = Vec::with_capacity(list.len());
        for endpoint in list {
            let text = endpoint.get_ref().trim_end_matches('/');
            if !etcd_endpoint_is_well_formed(text) {
                return Err(self.invalid(
                    endpoint.span(),
                    format!(
                        "quorum endpoint {:?} is not http://host:port; write it as http://127.0.0.1:2379",
                        endpoint.get_ref()
                    ),
                ));
            }
            if seen.iter().any(|other| other.eq_ignore_ascii_case(text)) {
                return Err(self.conflict(
                    endpoint.span(),
                    format!("quorum endpoint {text:?} is named twice; name each etcd endpoint once"),
                ));
            }
            seen.push(text.to_string());
        }
        Ok(seen)
    }

    fn lease(&self, raw: &RawQuorum) -> Checked<Duration> {
        let Some(lease) = &raw.lease_ms else { return Ok(Duration::from_millis(LEASE_MS_DEFAULT)) };
        let lease_ms = *lease.get_ref();
        match u64::try_from(lease_ms) {
            Ok(lease_ms) if (LEASE_MS_MIN..=LEASE_MS_MAX).contains(&lease_ms) => Ok(Duration::from_millis(lease_ms)),
            _ => Err(self.invalid(
                lease.span(),
                format!("quorum.lease_ms is {lease_ms}; use {LEASE_MS_MIN} to {LEASE_MS_MAX} milliseconds (default {LEASE_MS_DEFAULT})"),
            )),
        }
    }

    /// The liveness table: heartbeat and failure detection.
    fn liveness(&self, raw: Option<&RawLiveness>) -> Checked<LivenessTiming> {
        let Some(raw) = raw else { return Ok(LIVENESS_DEFAULT) };
        let milliseconds = |value: &Option<Spanned<i64>>, name: &str, (min, max, default): (u64, u64, u64)| {
            let Some(value) = value else { return Ok(default) };
            let number = *value.get_ref();
            u64::try_from(number).ok().filter(|number| (min..=max).contains(number)).ok_or_else(|| {
                self.invalid(
                    value.span(),
                    format!("liveness.{name} is {number}; use {min} to {max} milliseconds (default {default})"),
                )
            })
        };
        let heartbeat_ms = milliseconds(
            &raw.heartbeat_ms,
            "heartbeat_ms",
            (HEARTBEAT_MS_MIN, HEARTBEAT_MS_MAX, HEARTBEAT_MS_DEFAULT),
        )?;
        let failure_ms =
            milliseconds(&raw.failure_ms, "failure_ms", (FAILURE_MS_MIN, FAILURE_MS_MAX, FAILURE_MS_DEFAULT))?;
        if failure_ms < FAILURE_HEARTBEATS_MIN * heartbeat_ms {
            // Point at failure_ms when it is set, else at heartbeat_ms (the
            // defaults alone always fit).
            let span = span_of(&raw.failure_ms, span_of(&raw.heartbeat_ms, 0..0));
            return Err(self.conflict(
                span,
                format!(
                    "liveness.failure_ms is {failure_ms} with liveness.heartbeat_ms {heartbeat_ms}: failure must be at least {FAILURE_HEARTBEATS_MIN} missed heartbeats (a lost datagram is no failure); raise failure_ms to {} or lower heartbeat_ms to {}",
                    FAILURE_HEARTBEATS_MIN * heartbeat_ms,
                    failure_ms / FAILURE_HEARTBEATS_MIN
                ),
            ));
        }
        Ok(LivenessTiming {
            heartbeat: Duration::from_millis(heartbeat_ms),
            failure: Duration::from_millis(failure_ms),
        })
    }

    fn sites(&self, raw: &[Spanned<RawSite>]) -> Checked<Vec<SiteConfig>> {
        let mut sites: Vec<SiteConfig> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut production: Option<(String, usize)> = None;
        for table in raw {
            let site = self.site_table(table)?;
            let name_span = span_of(&table.get_ref().name, table.span());
            let line = self.line(&name_span);
            if let Some(first) = seen.insert(site.name.to_ascii_lowercase(), line) {
                return Err(self.conflict(
                    &name_span,
                    format!("site {:?} is defined twice (first on line {first}); rename one", site.name),
                ));
            }
            if site.role == SiteRole::Production {
                let role_span = span_of(&table.get_ref().role, table.span());
                if let Some((first, first_line)) = &production {
                    return Err(self.conflict(
                        &role_span,
                        format!(
                            "site {:?} is a second production site (site {first:?} on line {first_line} is the first); a group has exactly one, make this one role = \"copy\"",
                            site.name
                        ),
                    ));
                }
                production = Some((site.name.clone(), line));
            }
            sites.push(site);
        }
        if production.is_none() {
            let span = raw.first().map(|table| table.span());
            return Err(self.error(
                span.as_ref(),
                ConfigErrorKind::Missing,
                "no [[site]] has role = \"production\"; give exactly one site role = \"production\"".to_string(),
            ));
        }
        let copies = sites.len() - 1;
        if copies > SLOTS_MAX as usize {
            return Err(self.invalid(
                raw[raw.len() - 1].span(),
                format!("{copies} copy sites are defined; at most {SLOTS_MAX} are supported, remove some"),
            ));
        }
        Ok(sites)
    }

    fn site_table(&self, table: &Spanned<RawSite>) -> Checked<SiteConfig> {
        let span = table.span();
        let raw = table.get_ref();
        let name_value = self.required(&raw.name, Some(&span), "a [[site]]'s name", "add name = \"<site>\"")?;
        let name = self.name(name_value, "site")?;
        let role_value = self.required(
            &raw.role,
            Some(&span),
            &format!("site {name:?}'s role"),
            "add role = \"production\" or role = \"copy\"",
        )?;
        let role = match role_value.get_ref().as_str() {
            "production" => SiteRole::Production,
            "copy" => SiteRole::Copy,
            other => {
                return Err(self.invalid(
                    role_value.span(),
                    format!("site {name:?} has role {other:?}; use \"production\" or \"copy\""),
                ))
            }
        };
        let direct = raw.direct.as_ref().is_some_and(|direct| *direct.get_ref());
        let compress = match raw.compress.as_ref() {
            None => engine::protocol::Compression::None,
            Some(value) => engine::protocol::Compression::parse(value.get_ref())
                .map_err(|why| self.invalid(value.span(), format!("site {name:?}: {why}")))?,
        };
        if role == SiteRole::Production {
            let copy_only = [
                ("mode", raw.mode.as_ref().map(|value| value.span())),
                ("lag_bytes_max", raw.lag_bytes_max.as_ref().map(|value| value.span())),
                ("lag_seconds_max", raw.lag_seconds_max.as_ref().map(|value| value.span())),
            ];
            if let Some((key, Some(span))) = copy_only.iter().find(|(_, span)| span.is_some()) {
                return Err(self.invalid(
                    span,
                    format!("site {name:?} is the production site and has a {key}; {key} applies to copy sites only, remove it"),
                ));
            }
            return Ok(SiteConfig {
                name,
                role,
                mode: CopyMode::Sync,
                lag_bytes_max: LAG_BYTES_MAX_DEFAULT,
                lag_ms_max: engine::replicator::LAG_MS_MAX_DEFAULT,
                direct,
                compress,
            });
        }
        let mode = match raw.mode.as_ref() {
            None => CopyMode::Sync,
            Some(value) => match value.get_ref().as_str() {
                "sync" => CopyMode::Sync,
                "async" => CopyMode::Async,
                other => {
                    return Err(self
                        .invalid(value.span(), format!("site {name:?} has mode {other:?}; use \"sync\" or \"async\"")))
                }
            },
        };
        let lag_bytes_max = match raw.lag_bytes_max.as_ref() {
            None => LAG_BYTES_MAX_DEFAULT,
            Some(value) => self.size(value, &format!("site {name:?} lag_bytes_max"))?,
        };
        let lag_ms_max = match raw.lag_seconds_max.as_ref() {
            None => engine::replicator::LAG_MS_MAX_DEFAULT,
            Some(value) => engine::replicator::parse_lag_seconds(&value.get_ref().to_string())
                .map_err(|why| self.invalid(value.span(), format!("site {name:?} lag_seconds_max {why}")))?,
        };
        Ok(SiteConfig { name, role, mode, lag_bytes_max, lag_ms_max, direct, compress })
    }

    fn members(
        &self,
        raw: &[Spanned<RawMember>],
        group: &str,
        sites: &[SiteConfig],
        names: &mut Names,
    ) -> Checked<Vec<MemberConfig>> {
        let mut members: Vec<MemberConfig> = Vec::new();
        // (site, backup_order) → (member, line); volume path → (site, member, line).
        let mut orders: HashMap<(String, u32), (String, usize)> = HashMap::new();
        let mut volumes: HashMap<PathBuf, (String, String, usize)> = HashMap::new();
        for table in raw {
            let member = self.member_table(table, group, sites)?;
            let fields = table.get_ref();
            let name_span = span_of(&fields.name, table.span());
            names.add(
                self,
                Node {
                    what: format!("member {:?}", member.name),
                    name: &member.name,
                    address: member.address,
                    state_dir: &member.state_dir,
                    name_span: &name_span,
                    address_span: span_of(&fields.address, &name_span),
                    state_dir_span: span_of(&fields.state_dir, &name_span),
                },
            )?;
            let order_span = span_of(&fields.backup_order, &name_span);
            let line = self.line(&order_span);
            let order_key = (member.site.clone(), member.backup_order);
            if let Some((other, other_line)) = orders.insert(order_key, (member.name.clone(), line)) {
                return Err(self.conflict(
                    &order_span,
                    format!(
                        "member {:?} has backup_order {}, as member {other:?} (line {other_line}) of site {:?} does; give each member of a site its own backup_order",
                        member.name, member.backup_order, member.site
                    ),
                ));
            }
            let volume_span = span_of(&fields.volume, &name_span);
            let entry = (member.site.clone(), member.name.clone(), self.line(&volume_span));
            if let Some((other_site, other, other_line)) = volumes.insert(member.volume.clone(), entry) {
                if other_site != member.site {
                    return Err(self.conflict(
                        &volume_span,
                        format!(
                            "member {:?} of site {:?} has volume {:?}, as member {other:?} (line {other_line}) of site {other_site:?} does; members share a store only within one site, give each site its own",
                            member.name, member.site, member.volume.to_string_lossy()
                        ),
                    ));
                }
            }
            members.push(member);
        }
        Ok(members)
    }

    /// Every site needs a member to host its store.
    fn every_site_has_a_member(
        &self,
        raw: &[Spanned<RawSite>],
        sites: &[SiteConfig],
        members: &[MemberConfig],
    ) -> Checked<()> {
        for (site, table) in sites.iter().zip(raw) {
            if !members.iter().any(|member| member.site == site.name) {
                return Err(self.conflict(
                    span_of(&table.get_ref().name, table.span()),
                    format!(
                        "site {:?} has no member; add a [[member]] with site = {:?}, or remove the site",
                        site.name, site.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn member_table(&self, table: &Spanned<RawMember>, group: &str, sites: &[SiteConfig]) -> Checked<MemberConfig> {
        let span = table.span();
        let raw = table.get_ref();
        let name_value = self.required(&raw.name, Some(&span), "a [[member]]'s name", "add name = \"<member>\"")?;
        let name = self.name(name_value, "member")?;
        let what = format!("member {name:?}");
        let site_value = self.required(&raw.site, Some(&span), &format!("{what}'s site"), "add site = \"<site>\"")?;
        let site = site_value.get_ref();
        let Some(site) = sites.iter().find(|known| known.name == *site) else {
            let known: Vec<&str> = sites.iter().map(|known| known.name.as_str()).collect();
            return Err(self.conflict(
                site_value.span(),
                format!(
                    "{what} names site {site:?}, which no [[site]] defines; add it or use one of: {}",
                    known.join(", ")
                ),
            ));
        };
        let address_value =
            self.required(&raw.address, Some(&span), &format!("{what}'s address"), "add address = \"<IP address>\"")?;
        let address = self.address(address_value, &what)?;
        let volume_value = self.required(
            &raw.volume,
            Some(&span),
            &format!("{what}'s volume"),
            "add volume = \"<path of the site's store>\"",
        )?;
        let volume = self.path(volume_value, &format!("{what} volume"))?;
        let order_value = self.required(
            &raw.backup_order,
            Some(&span),
            &format!("{what}'s backup_order"),
            "add backup_order = <n>, unique within its site (lower hosts first)",
        )?;
        let order = *order_value.get_ref();
        let backup_order = u32::try_from(order).map_err(|_| {
            self.invalid(
                order_value.span(),
                format!("{what} has backup_order {order}; use a whole number from 0 to {}", u32::MAX),
            )
        })?;
        let state_dir = self.state_dir(raw.state_dir.as_ref(), group, &name, &what)?;
        let actions = match &raw.actions {
            None => Actions { timeout: ACTION_TIMEOUT_DEFAULT, ..Actions::default() },
            Some(actions) => self.actions(actions.get_ref(), &what)?,
        };
        Ok(MemberConfig { name, site: site.name.clone(), address, volume, backup_order, state_dir, actions })
    }

    fn actions(&self, raw: &RawActions, what: &str) -> Checked<Actions> {
        let command = |value: &Option<Spanned<String>>, which: &str| -> Checked<Option<String>> {
            match value {
                None => Ok(None),
                Some(value) if value.get_ref().trim().is_empty() => Err(self
                    .invalid(value.span(), format!("{what}'s {which} action is empty; give a command or remove it"))),
                Some(value) => Ok(Some(value.get_ref().clone())),
            }
        };
        let timeout = match &raw.timeout_ms {
            None => ACTION_TIMEOUT_DEFAULT,
            Some(value) => {
                let ms = *value.get_ref();
                if !(1..=3_600_000).contains(&ms) {
                    return Err(self.invalid(
                        value.span(),
                        format!("{what}'s actions.timeout_ms is {ms}; use 1 to 3600000 (milliseconds)"),
                    ));
                }
                Duration::from_millis(ms as u64)
            }
        };
        Ok(Actions {
            start: command(&raw.start, "start")?,
            stop: command(&raw.stop, "stop")?,
            notify: command(&raw.notify, "notify")?,
            recovery: command(&raw.recovery, "recovery")?,
            timeout,
        })
    }

    fn witnesses(&self, raw: &[Spanned<RawWitness>], group: &str, names: &mut Names) -> Checked<Vec<WitnessConfig>> {
        let mut witnesses = Vec::new();
        for table in raw {
            let span = table.span();
            let fields = table.get_ref();
            let name_value =
                self.required(&fields.name, Some(&span), "a [[witness]]'s name", "add name = \"<witness>\"")?;
            let name = self.name(name_value, "witness")?;
            let what = format!("witness {name:?}");
            let address_value = self.required(
                &fields.address,
                Some(&span),
                &format!("{what}'s address"),
                "add address = \"<IP address>\"",
            )?;
            let address = self.address(address_value, &what)?;
            let state_dir = self.state_dir(fields.state_dir.as_ref(), group, &name, &what)?;
            names.add(
                self,
                Node {
                    what,
                    name: &name,
                    address,
                    state_dir: &state_dir,
                    name_span: &name_value.span(),
                    address_span: address_value.span(),
                    state_dir_span: span_of(&fields.state_dir, name_value.span()),
                },
            )?;
            witnesses.push(WitnessConfig { name, address, state_dir });
        }
        Ok(witnesses)
    }

    fn state_dir(&self, value: Option<&Spanned<String>>, group: &str, name: &str, what: &str) -> Checked<PathBuf> {
        match value {
            None => Ok(Path::new(STATE_DIR_ROOT).join(group).join(name)),
            Some(value) => self.path(value, &format!("{what} state_dir")),
        }
    }

    fn voter_count(&self, raw: &RawFile, voters: usize) -> Checked<()> {
        if voters > VOTERS_MAX {
            let last_witness = raw.witness.last().map(|table| table.span());
            let span = last_witness.or_else(|| raw.member.last().map(|table| table.span()));
            return Err(self.error(
                span.as_ref(),
                ConfigErrorKind::Invalid,
                format!("{voters} members and witnesses are defined; at most {VOTERS_MAX} may vote, remove some"),
            ));
        }
        Ok(())
    }
}

/// The names, addresses and state directories of members and witnesses seen
/// so far, each with the line it was defined on, to refuse duplicates.
#[derive(Default)]
struct Names {
    names: HashMap<String, (String, usize)>,
    addresses: HashMap<IpAddr, (String, usize)>,
    state_dirs: HashMap<PathBuf, (String, usize)>,
}

/// A member or witness being added to [`Names`].
struct Node<'a> {
    what: String,
    name: &'a str,
    address: IpAddr,
    state_dir: &'a Path,
    name_span: &'a Range<usize>,
    address_span: Range<usize>,
    state_dir_span: Range<usize>,
}

impl Names {
    fn add(&mut self, checker: &Checker<'_>, node: Node<'_>) -> Checked<()> {
        let what = node.what;
        let line = checker.line(node.name_span);
        if let Some((other, other_line)) = self.names.insert(node.name.to_ascii_lowercase(), (what.clone(), line)) {
            return Err(checker.conflict(
                node.name_span,
                format!("{what} has the name of {other} (line {other_line}); members and witnesses need their own names, rename one"),
            ));
        }
        let address = node.address;
        if let Some((other, other_line)) = self.addresses.insert(address, (what.clone(), line)) {
            return Err(checker.conflict(
                &node.address_span,
                format!("{what} has address {address}, as {other} (line {other_line}) does; every member and witness needs its own address, since they all use the same ports"),
            ));
        }
        if let Some((other, other_line)) = self.state_dirs.insert(node.state_dir.to_path_buf(), (what.clone(), line)) {
            return Err(checker.conflict(
                &node.state_dir_span,
                format!(
                    "{what} has state_dir {:?}, as {other} (line {other_line}) does; give each its own state_dir",
                    node.state_dir.to_string_lossy()
                ),
            ));
        }
        Ok(())
    }
}

/// The span of an optional value, or `fallback` when it is absent.
/// Whether `text` is `http://host:port`: a host of letters, digits, `.`,
/// `-`, `_` (or a bracketed IPv6 address) and a port from 1 to 65535.
fn etcd_endpoint_is_well_formed(text: &str) -> bool {
    let Some((host, port)) = text.strip_prefix("http://").and_then(|authority| authority.rsplit_once(':')) else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|byte| byte.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port != 0);
    let host_ok = match host.strip_prefix('[').and_then(|host| host.strip_suffix(']')) {
        Some(ipv6) => ipv6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'-' | b'_'))
        }
    };
    port_ok && host_ok
}

fn span_of<T>(value: &Option<Spanned<T>>, fallback: impl Borrow<Range<usize>>) -> Range<usize> {
    value.as_ref().map_or_else(|| fallback.borrow().clone(), |value| value.span())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALPHA: &str = r#"group = "alpha"
volume_size = "1G"
secret_file = "secret"

[ports]
quorum = 7400

[[site]]
name = "east"
role = "production"

[[site]]
name = "west"
role = "copy"
mode = "sync"

[[member]]
name = "a"
site = "east"
address = "127.0.0.1"
volume = "/var/tmp/east.img"
backup_order = 1

[[member]]
name = "b"
site = "west"
address = "127.0.0.2"
volume = "/var/tmp/west.img"
backup_order = 1

[[witness]]
name = "w"
address = "127.0.0.3"
"#;

    fn parse(text: &str) -> Result<GroupConfig, ConfigError> {
        GroupConfig::parse(text, Path::new("alpha.toml"))
    }

    /// ALPHA with `from` replaced by `to` (which must occur exactly once).
    fn alpha_with(from: &str, to: &str) -> String {
        assert_eq!(ALPHA.matches(from).count(), 1, "{from:?} occurs once in ALPHA");
        ALPHA.replace(from, to)
    }

    /// "alpha.toml:<line>:<col>" of the first occurrence of `needle` in `text`.
    fn at(text: &str, needle: &str) -> String {
        let offset = text.find(needle).expect("needle in text");
        let before = &text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = offset - before.rfind('\n').map_or(0, |newline| newline + 1) + 1;
        format!("alpha.toml:{line}:{column}")
    }

    /// Asserts that `text` fails with exactly `message` at the first occurrence of `needle`.
    fn assert_error(text: &str, needle: &str, kind: ConfigErrorKind, message: &str) {
        let error = parse(text).expect_err("the config is refused");
        assert_eq!(error.to_string(), format!("{}: {message}", at(text, needle)));
        assert_eq!(error.kind, kind, "{error}");
    }

    fn example(name: &str) -> &'static str {
        match name {
            "three-hosts" => include_str!("../../examples/three-hosts.toml"),
            _ => include_str!("../../examples/two-sites-two-hosts-each.toml"),
        }
    }

    /// The shipped three-host example parses into the group it describes.
    #[test]
    fn three_hosts_example_parses() {
        let config = GroupConfig::parse(example("three-hosts"), Path::new("/etc/crossmirror/demo.toml")).unwrap();
        assert_eq!(config.group, "demo");
        assert_eq!(config.volume_size, 1 << 30);
        assert_eq!(config.region_size, 256 << 10);
        assert_eq!(config.secret_file, Path::new("/etc/crossmirror/demo.secret"));
        assert_eq!(config.on_quorum_loss, OnQuorumLoss::Suspend);
        assert_eq!(config.ports, PORTS_DEFAULT);
        assert_eq!(config.lease, Duration::from_millis(LEASE_MS_DEFAULT));
        assert_eq!(config.liveness, LIVENESS_DEFAULT, "the example writes out the defaults");
        assert_eq!(config.production_site().name, "east");
        let copies = config.copy_sites();
        assert_eq!(copies.len(), 1);
        assert_eq!((copies[0].name.as_str(), copies[0].mode), ("west", CopyMode::Sync));
        assert_eq!(config.member("b").unwrap().address, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(config.witness("w").unwrap().state_dir, Path::new("/var/tmp/crossmirror-demo/w"));
        let voters: Vec<(u64, String, bool)> =
            config.voters().into_iter().map(|voter| (voter.id, voter.name, voter.witness)).collect();
        let expected = [(1, "a", false), (2, "b", false), (3, "w", true)];
        assert_eq!(voters, expected.map(|(id, name, witness)| (id, name.to_string(), witness)));
        assert_eq!(config.voter_id("w"), Some(3));
        assert_eq!(config.voter_id("nobody"), None);
    }

    /// The two-hosts-per-site example: members share their site's store and host in backup order.
    #[test]
    fn two_sites_two_hosts_each_example_parses() {
        let config = GroupConfig::parse(example("two"), Path::new("/etc/crossmirror/demo2.toml")).unwrap();
        let production: Vec<&str> =
            config.site_members(&config.production_site().name).iter().map(|member| member.name.as_str()).collect();
        assert_eq!(production, ["a1", "a2"]);
        let copy: Vec<&str> = config.site_members("dr").iter().map(|member| member.name.as_str()).collect();
        assert_eq!(copy, ["b1", "b2"]);
        assert_eq!(config.member("a1").unwrap().volume, config.member("a2").unwrap().volume);
        assert_eq!(config.voters().len(), 5);
        assert_eq!(config.voter_id("w"), Some(5));
        assert_eq!((config.lease, config.liveness), (Duration::from_millis(LEASE_MS_DEFAULT), LIVENESS_DEFAULT));
    }

    /// Defaults fill what the file leaves out.
    #[test]
    fn defaults_fill_optional_settings() {
        let config = parse(ALPHA).unwrap();
        assert_eq!(config.region_size, REGION_BYTES_DEFAULT);
        assert_eq!(config.ports, PORTS_DEFAULT);
        assert_eq!(config.nbd_export, "");
        assert_eq!(config.site("west").unwrap().lag_bytes_max, 64 << 20);
        assert_eq!(config.member("a").unwrap().state_dir, Path::new("/var/lib/crossmirror/alpha/a"));
        assert_eq!(config.secret_file, Path::new("secret"));
        assert_eq!(config.lease, Duration::from_millis(LEASE_MS_DEFAULT));
        assert_eq!(config.liveness, LIVENESS_DEFAULT);
        assert_eq!(
            (config.liveness.heartbeat, config.liveness.failure),
            (Duration::from_millis(HEARTBEAT_MS_DEFAULT), Duration::from_millis(FAILURE_MS_DEFAULT))
        );
    }

    /// `resync_rate_max` is a size per second, 0 (none) by default; set, it
    /// is in the canonical text (and the digest), unset the digest is what
    /// it was before the setting existed; a bad size names its line.
    #[test]
    fn resync_rate_max_is_read_and_in_the_digest_only_when_set() {
        let plain = parse(ALPHA).unwrap();
        assert_eq!(plain.resync_rate_max, 0);
        assert!(!plain.canonical().contains("resync_rate_max"));
        let text = alpha_with("volume_size = \"1G\"", "volume_size = \"1G\"\nresync_rate_max = \"20M\"");
        let limited = parse(&text).unwrap();
        assert_eq!(limited.resync_rate_max, 20 << 20);
        assert!(limited.canonical().contains(&format!("resync_rate_max = {}", 20 << 20)));
        assert_ne!(limited.digest(), plain.digest());
        let text = alpha_with("volume_size = \"1G\"", "volume_size = \"1G\"\nresync_rate_max = \"fast\"");
        let error = parse(&text).unwrap_err().to_string();
        assert!(error.contains("resync_rate_max \"fast\" does not start with a number"), "{error}");
    }

    /// ALPHA with a `[liveness]` table of `lines` before its first site.
    fn alpha_with_liveness(lines: &str) -> String {
        alpha_with("[[site]]\nname = \"east\"", &format!("[liveness]\n{lines}\n\n[[site]]\nname = \"east\""))
    }

    /// `[liveness]` sets the heartbeat and the failure time; a key left out keeps its default.
    #[test]
    fn the_liveness_table_is_read() {
        let config = parse(&alpha_with_liveness("heartbeat_ms = 250\nfailure_ms = 5000")).unwrap();
        assert_eq!(
            config.liveness,
            LivenessTiming { heartbeat: Duration::from_millis(250), failure: Duration::from_millis(5000) }
        );
        let config = parse(&alpha_with_liveness("failure_ms = 3000")).unwrap();
        assert_eq!(config.liveness.heartbeat, Duration::from_millis(HEARTBEAT_MS_DEFAULT));
        assert_eq!(config.liveness.failure, Duration::from_millis(3000));
        assert!(config.canonical().contains("liveness heartbeat_ms = 100\nliveness failure_ms = 3000\n"));
        let config = parse(&alpha_with_liveness("")).unwrap();
        assert_eq!(config.liveness, LIVENESS_DEFAULT, "an empty table is the defaults");
    }

    /// Out-of-range times and a failure shorter than three heartbeats are refused where they are written.
    #[test]
    fn bad_liveness_times_are_refused() {
        assert_error(
            &alpha_with_liveness("heartbeat_ms = 5"),
            "5\n",
            ConfigErrorKind::Invalid,
            "liveness.heartbeat_ms is 5; use 10 to 10000 milliseconds (default 100)",
        );
        assert_error(
            &alpha_with_liveness("failure_ms = 200"),
            "200",
            ConfigErrorKind::Invalid,
            "liveness.failure_ms is 200; use 500 to 60000 milliseconds (default 1000)",
        );
        assert_error(
            &alpha_with_liveness("failure_ms = -1"),
            "-1",
            ConfigErrorKind::Invalid,
            "liveness.failure_ms is -1; use 500 to 60000 milliseconds (default 1000)",
        );
        let expected = "liveness.failure_ms is 1000 with liveness.heartbeat_ms 350: failure must be at least 3 missed heartbeats (a lost datagram is no failure); raise failure_ms to 1050 or lower heartbeat_ms to 333";
        assert_error(
            &alpha_with_liveness("failure_ms = 1000\nheartbeat_ms = 350"),
            "1000",
            ConfigErrorKind::Conflict,
            expected,
        );
        // With failure_ms left at its default, the error points at heartbeat_ms.
        assert_error(&alpha_with_liveness("heartbeat_ms = 350"), "350", ConfigErrorKind::Conflict, expected);
        let text = alpha_with_liveness("failure = 1000");
        assert_error(
            &text,
            "failure =",
            ConfigErrorKind::UnknownKey,
            r#"unknown key "failure" (this table's keys: heartbeat_ms, failure_ms); remove it or correct its spelling"#,
        );
    }

    /// The lease is checked against its range.
    #[test]
    fn a_lease_out_of_range_is_refused() {
        assert_error(
            &alpha_with_quorum("lease_ms = 99"),
            "99",
            ConfigErrorKind::Invalid,
            "quorum.lease_ms is 99; use 100 to 60000 milliseconds (default 500)",
        );
        assert_eq!(parse(&alpha_with_quorum("lease_ms = 100")).unwrap().lease, Duration::from_millis(100));
    }

    /// site_members orders by backup_order, not by file order.
    #[test]
    fn site_members_follow_backup_order() {
        let text = alpha_with("name = \"w\"", "name = \"w\"\n")
            + "\n[[member]]\nname = \"c\"\nsite = \"west\"\naddress = \"127.0.0.4\"\nvolume = \"/var/tmp/west.img\"\nbackup_order = 0\n";
        let config = parse(&text).unwrap();
        let names: Vec<&str> = config.site_members("west").iter().map(|member| member.name.as_str()).collect();
        assert_eq!(names, ["c", "b"]);
        assert_eq!(config.voter_id("c"), Some(3), "members first, then witnesses");
        assert_eq!(config.voter_id("w"), Some(4));
    }

    #[test]
    fn a_misspelt_mode_names_the_site_and_the_choices() {
        let text = alpha_with("mode = \"sync\"", "mode = \"syncc\"");
        assert_error(
            &text,
            "\"syncc\"",
            ConfigErrorKind::Invalid,
            r#"site "west" has mode "syncc"; use "sync" or "async""#,
        );
    }

    #[test]
    fn a_member_of_an_undefined_site_lists_the_sites() {
        let text = alpha_with("site = \"west\"", "site = \"north\"");
        assert_error(
            &text,
            "\"north\"",
            ConfigErrorKind::Conflict,
            r#"member "b" names site "north", which no [[site]] defines; add it or use one of: east, west"#,
        );
    }

    #[test]
    fn a_size_with_an_unknown_unit_is_refused_at_its_value() {
        let text = alpha_with("volume_size = \"1G\"", "volume_size = \"1X\"");
        assert_error(
            &text,
            "\"1X\"",
            ConfigErrorKind::Invalid,
            r#"volume_size "1X": unknown unit "X" (use K, M, G or T)"#,
        );
        assert_eq!(at(&text, "\"1X\""), "alpha.toml:2:15");
    }

    #[test]
    fn two_production_sites_are_refused_at_the_second() {
        let text = alpha_with("role = \"copy\"\nmode = \"sync\"", "role = \"production\"");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position, Some(Position { line: 14, column: 8 }), "{error}");
        assert!(
            error.message.starts_with(r#"site "west" is a second production site (site "east" on line 9"#),
            "{error}"
        );
    }

    #[test]
    fn a_group_without_a_production_site_is_refused() {
        let text = alpha_with("role = \"production\"", "role = \"copy\"");
        assert_error(
            &text,
            "[[site]]",
            ConfigErrorKind::Missing,
            r#"no [[site]] has role = "production"; give exactly one site role = "production""#,
        );
    }

    #[test]
    fn a_site_without_members_is_refused() {
        let text = alpha_with(
            "[[member]]\nname = \"a\"",
            "[[site]]\nname = \"north\"\nrole = \"copy\"\n\n[[member]]\nname = \"a\"",
        );
        assert_error(
            &text,
            "\"north\"",
            ConfigErrorKind::Conflict,
            r#"site "north" has no member; add a [[member]] with site = "north", or remove the site"#,
        );
    }

    #[test]
    fn duplicate_names_are_refused() {
        let text = alpha_with("name = \"b\"", "name = \"A\"");
        assert_error(
            &text,
            "\"A\"",
            ConfigErrorKind::Conflict,
            r#"member "A" has the name of member "a" (line 18); members and witnesses need their own names, rename one"#,
        );
        let text = alpha_with("name = \"w\"", "name = \"b\"");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position.unwrap().line, 32, "{error}");
        assert!(error.message.starts_with(r#"witness "b" has the name of member "b" (line 25)"#), "{error}");
    }

    #[test]
    fn a_copy_site_named_like_the_production_site_is_refused() {
        let text = alpha_with("name = \"west\"", "name = \"east\"").replace("site = \"west\"", "site = \"east\"");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.to_string(), "alpha.toml:13:8: site \"east\" is defined twice (first on line 9); rename one");
    }

    #[test]
    fn a_duplicate_backup_order_within_a_site_is_refused() {
        let text = format!(
            "{ALPHA}\n[[member]]\nname = \"c\"\nsite = \"west\"\naddress = \"127.0.0.4\"\nvolume = \"/var/tmp/west.img\"\nbackup_order = 1\n"
        );
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position, Some(Position { line: 40, column: 16 }), "{error}");
        assert_eq!(
            error.message,
            r#"member "c" has backup_order 1, as member "b" (line 29) of site "west" does; give each member of a site its own backup_order"#
        );
    }

    #[test]
    fn a_missing_backup_order_points_at_the_member() {
        let text = alpha_with("volume = \"/var/tmp/west.img\"\nbackup_order = 1\n", "volume = \"/var/tmp/west.img\"\n");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position, Some(Position { line: 24, column: 1 }), "{error}");
        assert_eq!(error.kind, ConfigErrorKind::Missing);
        assert!(error.message.starts_with(r#"member "b"'s backup_order is missing; add backup_order = <n>"#));
    }

    #[test]
    fn a_mode_on_the_production_site_is_refused() {
        let text = alpha_with("role = \"production\"", "role = \"production\"\nmode = \"async\"");
        assert_error(
            &text,
            "\"async\"",
            ConfigErrorKind::Invalid,
            r#"site "east" is the production site and has a mode; mode applies to copy sites only, remove it"#,
        );
    }

    /// `lag_seconds_max` on a copy site: seconds, a fraction allowed, 0 for
    /// none; the default (4 s) leaves the digest of a config without it
    /// unchanged; refused on the production site and out of range.
    #[test]
    fn lag_seconds_max_sets_a_copy_lag_bound_in_time() {
        let defaults = parse(ALPHA).unwrap();
        assert_eq!(defaults.site("west").unwrap().lag_ms_max, engine::replicator::LAG_MS_MAX_DEFAULT);
        let set = |value: &str| alpha_with("mode = \"sync\"", &format!("mode = \"async\"\nlag_seconds_max = {value}"));
        assert_eq!(parse(&set("2.5")).unwrap().site("west").unwrap().lag_ms_max, 2_500);
        assert_eq!(parse(&set("0")).unwrap().site("west").unwrap().lag_ms_max, 0);
        let four = parse(&set("4")).unwrap();
        let async_default = parse(&alpha_with("mode = \"sync\"", "mode = \"async\"")).unwrap();
        assert_eq!(four.digest(), async_default.digest(), "the default adds nothing to the digest");
        assert_ne!(parse(&set("5")).unwrap().digest(), async_default.digest());
        assert_error(
            &set("-1"),
            "-1",
            ConfigErrorKind::Invalid,
            r#"site "west" lag_seconds_max "-1": use 0 (no bound) to 3600 seconds"#,
        );
        let text = alpha_with("role = \"production\"", "role = \"production\"\nlag_seconds_max = 2");
        assert_error(
            &text,
            "2\n\n[[site]]",
            ConfigErrorKind::Invalid,
            r#"site "east" is the production site and has a lag_seconds_max; lag_seconds_max applies to copy sites only, remove it"#,
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        let text = alpha_with("\"127.0.0.2\"", "\"localhost\"");
        assert_error(
            &text,
            "\"localhost\"",
            ConfigErrorKind::Invalid,
            r#"member "b" address "localhost" is not an IP address; write an IPv4 or IPv6 address without a port, such as "127.0.0.1""#,
        );
        let text = alpha_with("\"127.0.0.3\"", "\"127.0.0.3:7400\"");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position.unwrap().line, 33);
        assert!(error.message.contains("has a port; remove it"), "{error}");
        let text = alpha_with("\"127.0.0.3\"", "\"0.0.0.0\"");
        assert!(parse(&text).unwrap_err().message.contains("cannot be connected to"));
        let text = alpha_with("\"127.0.0.3\"", "\"::1\"");
        assert_eq!(parse(&text).unwrap().witness("w").unwrap().address, "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_shared_address_is_refused() {
        let text = alpha_with("\"127.0.0.3\"", "\"127.0.0.1\"");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position, Some(Position { line: 33, column: 11 }), "{error}");
        assert!(error.message.starts_with(r#"witness "w" has address 127.0.0.1, as member "a" (line 18) does"#));
    }

    #[test]
    fn bad_ports_are_refused() {
        let text = alpha_with("quorum = 7400", "quorum = 0");
        assert_error(&text, "0\n", ConfigErrorKind::Invalid, "ports.quorum is 0; use a port from 1 to 65535");
        let text = alpha_with("quorum = 7400", "quorum = 70000");
        assert_error(&text, "70000", ConfigErrorKind::Invalid, "ports.quorum is 70000; use a port from 1 to 65535");
        let text = alpha_with("quorum = 7400", "quorum = 7400\nmirror = 7400");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position, Some(Position { line: 7, column: 10 }));
        assert!(error.message.starts_with("ports.mirror is 7400, as ports.quorum is;"), "{error}");
    }

    #[test]
    fn bad_sizes_are_refused() {
        let text = alpha_with("\"1G\"", "\"0\"");
        assert_error(
            &text,
            "\"0\"",
            ConfigErrorKind::Invalid,
            r#"volume_size "0" is zero; give the volume's size, such as "1G""#,
        );
        let text = alpha_with("\"1G\"", "1000");
        assert!(parse(&text).unwrap_err().message.contains("not a multiple of 4K"));
        let text = alpha_with("\"1G\"", "1073741824");
        assert_eq!(parse(&text).unwrap().volume_size, 1 << 30, "a bare number of bytes is a size");
        let text = alpha_with("volume_size = \"1G\"", "volume_size = \"1G\"\nregion_size = \"300K\"");
        assert_error(
            &text,
            "\"300K\"",
            ConfigErrorKind::Invalid,
            r#"region_size "300K" (307200 bytes) is not a power of two from 4K to 16M; use one, such as "256K""#,
        );
        let text = alpha_with("volume_size = \"1G\"", "volume_size = \"1G\"\nregion_size = \"32M\"");
        assert!(parse(&text).unwrap_err().message.contains("not a power of two from 4K to 16M"));
        let text = alpha_with("\"1G\"", "\"99999999999T\"");
        assert!(parse(&text).unwrap_err().message.contains("is too large"));
    }

    #[test]
    fn unknown_keys_are_refused_where_they_are() {
        let text = alpha_with("name = \"w\"", "name = \"w\"\ncolour = \"blue\"");
        assert_error(
            &text,
            "colour",
            ConfigErrorKind::UnknownKey,
            r#"unknown key "colour" (this table's keys: name, address, state_dir); remove it or correct its spelling"#,
        );
        let text = format!("{ALPHA}on_quorum_loss = \"io-error\"\n");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position.unwrap().line, 34);
        assert!(error.message.ends_with("a top-level setting must come before the first [table]; move it up"));
        let text = alpha_with("group = \"alpha\"", "group = \"alpha\"\nvolume_sise = \"1G\"");
        assert_error(&text, "volume_sise", ConfigErrorKind::UnknownKey, &parse(&text).unwrap_err().message);
    }

    /// ALPHA with a `[quorum]` table of `lines` before its first site.
    fn alpha_with_quorum(lines: &str) -> String {
        alpha_with("[[site]]\nname = \"east\"", &format!("[quorum]\n{lines}\n\n[[site]]\nname = \"east\""))
    }

    /// A build without the etcd feature refuses the etcd backend and says how to build it.
    #[cfg(not(feature = "etcd"))]
    #[test]
    fn the_etcd_backend_needs_the_etcd_feature() {
        let text = alpha_with_quorum("backend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]");
        assert_error(
            &text,
            "\"etcd\"",
            ConfigErrorKind::NotBuilt,
            r#"quorum.backend "etcd": crossmirror was built without the etcd feature; rebuild with: cargo build --features crossmirror-cluster-glue/etcd"#,
        );
    }

    /// With the feature, the etcd backend and its endpoints are read, and are part of the digest.
    #[cfg(feature = "etcd")]
    #[test]
    fn the_etcd_backend_is_read_with_its_endpoints() {
        let text = alpha_with_quorum(
            "backend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\", \"http://etcd-2.example:2379/\", \"http://[::1]:2379\"]",
        );
        let config = parse(&text).unwrap();
        let endpoints: Vec<String> =
            ["http://127.0.0.1:2379", "http://etcd-2.example:2379", "http://[::1]:2379"].map(String::from).to_vec();
        assert_eq!(config.quorum_backend, QuorumBackend::Etcd { endpoints });
        assert!(config.canonical().contains("quorum backend = etcd\nquorum endpoints = [\"http://127.0.0.1:2379\", "));
        let embedded = parse(ALPHA).unwrap();
        assert_eq!(embedded.quorum_backend, QuorumBackend::Embedded);
        assert_ne!(embedded.digest(), config.digest());
        let fewer = parse(&alpha_with_quorum("backend = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]")).unwrap();
        assert_ne!(fewer.digest(), config.digest());
    }

    /// The etcd backend needs well-formed, distinct endpoints.
    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_endpoints_are_checked() {
        let text = alpha_with_quorum("backend = \"etcd\"");
        assert_error(
            &text,
            "\"etcd\"",
            ConfigErrorKind::Missing,
            r#"quorum.endpoints (the etcd cluster's client URLs) is missing; add endpoints = ["http://<host>:2379", ...] to [quorum]"#,
        );
        for bad in [
            "127.0.0.1:2379",
            "https://127.0.0.1:2379",
            "http://127.0.0.1",
            "http://:2379",
            "http://h:0",
            "http://h:x1",
            "http://u@h:1",
            "http://h:1/v3",
        ] {
            let text = alpha_with_quorum(&format!("backend = \"etcd\"\nendpoints = [\"http://ok:1\", \"{bad}\"]"));
            assert_error(
                &text,
                &format!("\"{bad}\""),
                ConfigErrorKind::Invalid,
                &format!("quorum endpoint {bad:?} is not http://host:port; write it as http://127.0.0.1:2379"),
            );
        }
        let text = alpha_with_quorum("backend = \"etcd\"\nendpoints = [\"http://a:1\", \"http://A:1/\"]");
        assert_error(
            &text,
            "\"http://A:1/\"",
            ConfigErrorKind::Conflict,
            r#"quorum endpoint "http://A:1" is named twice; name each etcd endpoint once"#,
        );
        let text = alpha_with_quorum("backend = \"etcd\"\nendpoints = []");
        assert_error(
            &text,
            "[]",
            ConfigErrorKind::Invalid,
            "quorum.endpoints has 0 entries; give 1 to 16 etcd client URLs",
        );
    }

    /// Endpoints mean nothing to the embedded backend; unknown backends are named.
    #[test]
    fn endpoints_without_etcd_and_unknown_backends_are_refused() {
        let text = alpha_with_quorum("endpoints = [\"http://127.0.0.1:2379\"]");
        assert_error(
            &text,
            "[\"http",
            ConfigErrorKind::Conflict,
            r#"quorum.endpoints is set, but the quorum backend is "embedded"; set backend = "etcd" or remove endpoints"#,
        );
        let text = alpha_with_quorum("backend = \"zookeeper\"");
        assert_error(
            &text,
            "\"zookeeper\"",
            ConfigErrorKind::Invalid,
            r#"quorum.backend "zookeeper" is unknown; use "embedded" or "etcd""#,
        );
    }

    #[test]
    fn one_volume_path_in_two_sites_is_refused() {
        let text = alpha_with("\"/var/tmp/west.img\"", "\"/var/tmp/east.img\"");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.position, Some(Position { line: 28, column: 10 }), "{error}");
        assert!(error.message.contains("members share a store only within one site"), "{error}");
    }

    #[test]
    fn missing_and_misspelt_top_level_settings_are_refused() {
        let text = alpha_with("group = \"alpha\"\n", "");
        assert_error(&text, "volume_size", ConfigErrorKind::Missing, &parse(&text).unwrap_err().message);
        assert!(parse(&text).unwrap_err().message.starts_with("the group setting is missing"));
        let text = alpha_with("\"alpha\"", "\"al pha\"");
        assert!(parse(&text).unwrap_err().message.contains("is not 1 to 64 of A-Z a-z 0-9 _ -"));
        let text = alpha_with("secret_file = \"secret\"", "secret_file = \"secret\"\non_quorum_loss = \"panic\"");
        assert_error(
            &text,
            "\"panic\"",
            ConfigErrorKind::Invalid,
            r#"on_quorum_loss "panic" is unknown; use "suspend" or "io-error""#,
        );
        let error = parse("group = [").unwrap_err();
        assert_eq!(error.kind, ConfigErrorKind::Syntax);
        assert!(error.to_string().starts_with("alpha.toml:1:"), "{error}");
    }

    /// No input makes the parser panic: every prefix of both examples parses or is refused.
    #[test]
    fn every_prefix_of_the_examples_is_handled() {
        for name in ["three-hosts", "two"] {
            let text = example(name);
            for end in (0..=text.len()).filter(|end| text.is_char_boundary(*end)) {
                let _ = parse(&text[..end]);
            }
        }
    }

    /// Comments, spacing, key order and the file's own path do not change the canonical text.
    #[test]
    fn canonical_text_ignores_formatting() {
        let reordered = r#"# the same group, written differently
volume_size = 1073741824   # bytes this time
secret_file = "./secret"
group = "alpha"
[ports]
quorum=7400
[[site]]
role = "production"
name = "east"
[[site]]
mode = "sync"
role = "copy"
name = "west"
lag_bytes_max = "64M"
[[member]]
backup_order = 1
volume = "/var/tmp/east.img"
address = "127.0.0.1"
site = "east"
name = "a"
[[member]]
address = "127.0.0.2"
name = "b"
site = "west"
volume = "/var/tmp/west.img"
backup_order = 1
state_dir = "/var/lib/crossmirror/alpha/b"
[[witness]]
address = "127.0.0.3"
name = "w"
"#;
        let original = GroupConfig::parse(ALPHA, Path::new("/etc/cm/alpha.toml")).unwrap();
        let other = GroupConfig::parse(reordered, Path::new("/etc/cm/other-name.toml")).unwrap();
        assert_eq!(original.canonical(), other.canonical());
        assert_eq!(original.digest(), other.digest());
        assert_eq!(original.digest_hex().len(), 64);
    }

    /// `compress` on a site: parsed, and refused with where and what to use.
    #[test]
    fn a_site_names_its_compression() {
        let config = parse(&alpha_with("mode = \"sync\"", "mode = \"sync\"\ncompress = \"zstd:5\"")).unwrap();
        assert_eq!(config.site("west").unwrap().compress, engine::protocol::Compression::Zstd { level: 5 });
        assert_eq!(config.site("east").unwrap().compress, engine::protocol::Compression::None);
        let text = alpha_with("mode = \"sync\"", "mode = \"sync\"\ncompress = \"gzip\"");
        assert_error(
            &text,
            "\"gzip\"",
            ConfigErrorKind::Invalid,
            "site \"west\": compress=gzip: use none, lz4, zstd or zstd:LEVEL (LEVEL 1 to 19)",
        );
    }

    /// Any setting changed changes the canonical text (and so the digest).
    #[test]
    fn canonical_text_changes_with_every_setting() {
        let changes = [
            ("group = \"alpha\"", "group = \"beta\""),
            ("\"1G\"", "\"2G\""),
            ("secret_file = \"secret\"", "secret_file = \"secret2\""),
            ("secret_file = \"secret\"", "secret_file = \"secret\"\nregion_size = \"1M\""),
            ("secret_file = \"secret\"", "secret_file = \"secret\"\non_quorum_loss = \"io-error\""),
            ("secret_file = \"secret\"", "secret_file = \"secret\"\nnbd_export = \"x\""),
            ("quorum = 7400", "quorum = 7500"),
            ("quorum = 7400", "quorum = 7400\nmirror = 7501"),
            ("quorum = 7400", "quorum = 7400\nnbd = 10810"),
            ("quorum = 7400", "quorum = 7400\nadmin = 7502"),
            ("quorum = 7400", "quorum = 7400\n[quorum]\nlease_ms = 3000"),
            ("quorum = 7400", "quorum = 7400\n[liveness]\nheartbeat_ms = 200"),
            ("quorum = 7400", "quorum = 7400\n[liveness]\nfailure_ms = 3000"),
            ("mode = \"sync\"", "mode = \"async\""),
            ("mode = \"sync\"", "mode = \"sync\"\nlag_bytes_max = \"1M\""),
            ("mode = \"sync\"", "mode = \"sync\"\ndirect = true"),
            ("role = \"production\"", "role = \"production\"\ndirect = true"),
            ("mode = \"sync\"", "mode = \"sync\"\ncompress = \"lz4\""),
            ("role = \"production\"", "role = \"production\"\ncompress = \"zstd:7\""),
            ("\"127.0.0.2\"", "\"127.0.0.9\""),
            ("\"/var/tmp/west.img\"", "\"/var/tmp/west2.img\""),
            ("address = \"127.0.0.3\"", "address = \"127.0.0.3\"\nstate_dir = \"/tmp/w\""),
        ];
        let original = parse(ALPHA).unwrap();
        for (from, to) in changes {
            let changed = parse(&alpha_with(from, to)).unwrap_or_else(|error| panic!("{from} -> {to}: {error}"));
            assert_ne!(original.canonical(), changed.canonical(), "{from} -> {to}");
            assert_ne!(original.digest(), changed.digest(), "{from} -> {to}");
        }
        let backup = alpha_with(
            "volume = \"/var/tmp/west.img\"\nbackup_order = 1",
            "volume = \"/var/tmp/west.img\"\nbackup_order = 2",
        );
        assert_ne!(original.canonical(), parse(&backup).unwrap().canonical());
        let swapped = format!("{}{}", &ALPHA[..ALPHA.find("[[member]]").unwrap()], {
            let members = &ALPHA[ALPHA.find("[[member]]").unwrap()..ALPHA.find("[[witness]]").unwrap()];
            let (a, b) = members.split_at(members.rfind("[[member]]").unwrap());
            format!("{b}\n{a}{}", &ALPHA[ALPHA.find("[[witness]]").unwrap()..])
        });
        assert_ne!(original.canonical(), parse(&swapped).unwrap().canonical(), "member order sets the voter ids");
    }

    /// diff shows the changed setting as a - line then a + line.
    #[test]
    fn diff_shows_the_changed_line() {
        let mine = parse(ALPHA).unwrap().canonical();
        let theirs = parse(&alpha_with("mode = \"sync\"", "mode = \"async\"")).unwrap().canonical();
        assert_eq!(diff(&mine, &theirs), ["- site west mode = sync", "+ site west mode = async"]);
        assert!(diff(&mine, &mine).is_empty());
        let extra =
            parse(&alpha_with("address = \"127.0.0.3\"", "address = \"127.0.0.3\"\nstate_dir = \"/tmp/w\"")).unwrap();
        assert_eq!(
            diff(&mine, &extra.canonical()),
            ["- witness w state_dir = \"/var/lib/crossmirror/alpha/w\"", "+ witness w state_dir = \"/tmp/w\""]
        );
        assert_eq!(diff("a = 1\n", "b = 2\n"), ["- a = 1", "+ b = 2"]);
        let slower = parse(&alpha_with_liveness("failure_ms = 3000")).unwrap();
        assert_eq!(diff(&mine, &slower.canonical()), ["- liveness failure_ms = 1000", "+ liveness failure_ms = 3000"]);
    }

    /// load resolves relative paths against the file's directory and names the file when it cannot read it.
    #[test]
    fn load_resolves_paths_against_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("alpha.toml");
        std::fs::write(&path, ALPHA.replace("\"/var/tmp/east.img\"", "\"stores/east.img\"")).unwrap();
        let config = GroupConfig::load(&path).unwrap();
        assert_eq!(config.path, path);
        assert_eq!(config.secret_file, directory.path().join("secret"));
        assert_eq!(config.member("a").unwrap().volume, directory.path().join("stores/east.img"));
        let missing = directory.path().join("missing.toml");
        let error = GroupConfig::load(&missing).unwrap_err();
        assert_eq!(error.kind, ConfigErrorKind::Read);
        assert!(error.to_string().starts_with(&format!("{}: cannot read the group config", missing.display())));
    }
}
