//! Liveness: who in the group was heard from lately, without a log entry per
//! heartbeat (seed 004's failure detection). Every node sends a small UDP
//! datagram to every other voter of its group every heartbeat interval
//! from its quorum address (the quorum's TCP port number, over UDP); a voter
//! not heard from for the failure time is taken as failed by the leader.
//! Both come from the group config's `[liveness]` table
//! ([`LivenessConfig::heartbeat_interval`], [`LivenessConfig::failure_after`]).
//!
//! ```text
//!  "CMLV" kind(1) name_len(1) name boot(8) seq(8) digest(32) payload_len(2) payload  hmac(32)
//!  kind 1 heartbeat · 2 config query · 3 config answer (payload: the canonical config)
//! ```
//!
//! Every datagram carries the sender's config digest and an HMAC-SHA256 over
//! the group name and the datagram with the group's secret: a host outside
//! the group can neither read the config nor fake a member alive. A replayed
//! datagram is refused by its `(boot, seq)`, which must grow per sender. A
//! config query, answered with the canonical config, lets a joining member
//! refuse to join with a diff when its config is not the group's.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"CMLV";
const MAC_LEN: usize = 32;
const DATAGRAM_MAX: usize = 65_000;
const KIND_HEARTBEAT: u8 = 1;
const KIND_CONFIG_QUERY: u8 = 2;
const KIND_CONFIG_ANSWER: u8 = 3;

/// Everything liveness needs.
#[derive(Debug, Clone)]
pub struct LivenessConfig {
    /// This node's name.
    pub me: String,
    /// Where it listens and sends from (its quorum address).
    pub listen: SocketAddr,
    /// Every other voter: name and quorum address.
    pub peers: Vec<(String, SocketAddr)>,
    /// The group's secret.
    pub secret: Vec<u8>,
    /// The group's name.
    pub group: String,
    /// This node's config digest.
    pub digest: [u8; 32],
    /// This node's canonical config, the answer to a config query.
    pub canonical: String,
    /// How often this node says it is alive.
    pub heartbeat_interval: Duration,
    /// Silence this long is failure.
    pub failure_after: Duration,
}

impl LivenessConfig {
    /// A heartbeat this late means this process itself was paused: half the
    /// failure time, so that a pause is noticed (and the peers' silence
    /// during it forgiven) before it could pass for their failure, and at
    /// least three heartbeats, so that a sender thread that is merely late
    /// is not taken for a paused process.
    fn pause_after(&self) -> Duration {
        (self.failure_after / 2).max(self.heartbeat_interval * 3)
    }
}

/// A decoded, authenticated datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Datagram {
    kind: u8,
    name: String,
    boot: u64,
    seq: u64,
    digest: [u8; 32],
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Heard {
    /// Per peer: when last heard (with this node's config), and the
    /// highest (boot, seq) taken (per kind: each kind is sent by one thread,
    /// so its seqs grow).
    last: HashMap<String, (Option<Instant>, u64, u64)>,
    /// Per (peer, kind) the highest (boot, seq) taken.
    seen: HashMap<(String, u8), (u64, u64)>,
    /// Peers whose config differs, with their canonical config when known.
    mismatched: HashMap<String, Option<String>>,
    /// Answers to this node's config queries.
    answers: HashMap<String, ([u8; 32], String)>,
    refused: u64,
}

/// Liveness running for one node.
#[derive(Debug)]
pub struct Liveness {
    config: Arc<LivenessConfig>,
    socket: Arc<UdpSocket>,
    heard: Arc<Mutex<Heard>>,
    /// Since when silence counts: the start, or the end of a pause of this
    /// process (SIGSTOP, a stalled VM), during which the peers' silence was
    /// this node's own deafness.
    awake_since: Arc<Mutex<Instant>>,
    /// When the sender last ran: a caller that finds it long ago knows this
    /// process was paused, even before the sender itself notices.
    last_beat: Arc<Mutex<Instant>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    boot: u64,
    seq: Arc<Mutex<u64>>,
}

impl Liveness {
    /// Bind and start sending and listening.
    pub fn start(config: LivenessConfig) -> io::Result<Liveness> {
        let socket = Arc::new(UdpSocket::bind(config.listen)?);
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut boot_bytes = [0u8; 8];
        getrandom::fill(&mut boot_bytes).map_err(|error| io::Error::other(error.to_string()))?;
        let config = Arc::new(config);
        let mut liveness = Liveness {
            config,
            socket,
            heard: Arc::new(Mutex::new(Heard::default())),
            awake_since: Arc::new(Mutex::new(Instant::now())),
            last_beat: Arc::new(Mutex::new(Instant::now())),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            boot: u64::from_le_bytes(boot_bytes),
            seq: Arc::new(Mutex::new(0)),
        };
        let receiver = liveness.receiver();
        let sender = liveness.sender();
        liveness.threads.push(std::thread::Builder::new().name("liveness-rx".into()).spawn(receiver)?);
        liveness.threads.push(std::thread::Builder::new().name("liveness-tx".into()).spawn(sender)?);
        Ok(liveness)
    }

    fn heard(&self) -> std::sync::MutexGuard<'_, Heard> {
        self.heard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Who was heard from within the failure time (this node included),
    /// and whether liveness has run long enough for silence to mean failure.
    pub fn live(&self) -> (BTreeSet<String>, bool) {
        let now = Instant::now();
        let heard = self.heard();
        let mut live: BTreeSet<String> = heard
            .last
            .iter()
            .filter(|(_, (when, _, _))| when.is_some_and(|when| now.duration_since(when) < self.config.failure_after))
            .map(|(name, _)| name.clone())
            .collect();
        live.insert(self.config.me.clone());
        if self.last_beat.lock().unwrap_or_else(PoisonError::into_inner).elapsed() > self.config.pause_after() {
            // The sender has not run for a while: this process was paused
            // (and the heartbeats queued meanwhile are not read yet).
            *self.awake_since.lock().unwrap_or_else(PoisonError::into_inner) = now;
        }
        let awake_since = *self.awake_since.lock().unwrap_or_else(PoisonError::into_inner);
        (live, awake_since.elapsed() >= self.config.failure_after)
    }

    /// Peers that announced another config digest (with their config, when
    /// they answered a query).
    pub fn mismatched(&self) -> Vec<(String, Option<String>)> {
        let mut list: Vec<_> =
            self.heard().mismatched.iter().map(|(name, text)| (name.clone(), text.clone())).collect();
        list.sort();
        list
    }

    /// Datagrams refused so far (bad MAC, another group, replayed, malformed).
    pub fn refused(&self) -> u64 {
        self.heard().refused
    }

    /// Ask every peer for its config; wait up to `timeout` for answers (all
    /// of them, or as many as came). Returns (peer, canonical config) of
    /// every answer whose digest differs from this node's.
    pub fn config_mismatches(&self, timeout: Duration) -> Vec<(String, String)> {
        self.heard().answers.clear();
        let query = self.encode(KIND_CONFIG_QUERY, &[]);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            for (_, address) in &self.config.peers {
                let _ = self.socket.send_to(&query, address);
            }
            std::thread::sleep(Duration::from_millis(100));
            if self.heard().answers.len() == self.config.peers.len() {
                break;
            }
        }
        let heard = self.heard();
        let mut mismatches: Vec<(String, String)> = heard
            .answers
            .iter()
            .filter(|(_, (digest, _))| *digest != self.config.digest)
            .map(|(name, (_, text))| (name.clone(), text.clone()))
            .collect();
        mismatches.sort();
        mismatches
    }

    /// Stop both threads.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }

    fn encode(&self, kind: u8, payload: &[u8]) -> Vec<u8> {
        let seq = {
            let mut seq = self.seq.lock().unwrap_or_else(PoisonError::into_inner);
            *seq += 1;
            *seq
        };
        encode(&self.config, kind, self.boot, seq, payload)
    }

    fn sender(&self) -> impl FnOnce() + Send + 'static {
        let (config, socket, stop, boot, seq, awake_since, beat) = (
            self.config.clone(),
            self.socket.clone(),
            self.stop.clone(),
            self.boot,
            self.seq.clone(),
            self.awake_since.clone(),
            self.last_beat.clone(),
        );
        move || {
            let mut last_beat = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if last_beat.elapsed() > config.pause_after() {
                    // This process did not run for a while: what it did not
                    // hear meanwhile says nothing about its peers.
                    tracing::warn!(
                        paused_ms = last_beat.elapsed().as_millis() as u64,
                        "this node was paused; peers are not judged until it has listened for {} ms again",
                        config.failure_after.as_millis()
                    );
                    *awake_since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
                }
                last_beat = Instant::now();
                *beat.lock().unwrap_or_else(PoisonError::into_inner) = last_beat;
                let next = {
                    let mut seq = seq.lock().unwrap_or_else(PoisonError::into_inner);
                    *seq += 1;
                    *seq
                };
                let datagram = encode(&config, KIND_HEARTBEAT, boot, next, &[]);
                for (_, address) in &config.peers {
                    // A peer that is down or cut off is what liveness is for.
                    let _ = socket.send_to(&datagram, address);
                }
                std::thread::sleep(config.heartbeat_interval);
            }
        }
    }

    fn receiver(&self) -> impl FnOnce() + Send + 'static {
        let (config, socket, stop, heard, boot, seq) = (
            self.config.clone(),
            self.socket.clone(),
            self.stop.clone(),
            self.heard.clone(),
            self.boot,
            self.seq.clone(),
        );
        move || {
            let mut buffer = vec![0u8; DATAGRAM_MAX + 1];
            while !stop.load(Ordering::Relaxed) {
                let (length, from) = match socket.recv_from(&mut buffer) {
                    Ok(received) => received,
                    Err(_) => continue,
                };
                let datagram = match decode(&config, &buffer[..length]) {
                    Ok(datagram) => datagram,
                    Err(why) => {
                        let mut heard = heard.lock().unwrap_or_else(PoisonError::into_inner);
                        heard.refused += 1;
                        if heard.refused.is_power_of_two() {
                            tracing::warn!(%from, refused = heard.refused, "liveness datagram refused: {why}");
                        }
                        continue;
                    }
                };
                let known = config.peers.iter().any(|(name, _)| *name == datagram.name);
                let mismatched = datagram.digest != config.digest;
                let mut guard = heard.lock().unwrap_or_else(PoisonError::into_inner);
                if !known || !take(&mut guard, &datagram, !mismatched) {
                    guard.refused += 1;
                    continue;
                }
                match datagram.kind {
                    KIND_HEARTBEAT if mismatched && !guard.mismatched.contains_key(&datagram.name) => {
                        tracing::error!(peer = %datagram.name,
                            "member {} runs another group config (its digest differs from this node's): it is not counted live", datagram.name);
                        guard.mismatched.insert(datagram.name.clone(), None);
                    }
                    KIND_HEARTBEAT if mismatched => {}
                    KIND_HEARTBEAT => {
                        guard.mismatched.remove(&datagram.name);
                    }
                    KIND_CONFIG_QUERY => {
                        drop(guard);
                        let next = {
                            let mut seq = seq.lock().unwrap_or_else(PoisonError::into_inner);
                            *seq += 1;
                            *seq
                        };
                        let answer = encode(&config, KIND_CONFIG_ANSWER, boot, next, config.canonical.as_bytes());
                        let _ = socket.send_to(&answer, from);
                        continue;
                    }
                    KIND_CONFIG_ANSWER => {
                        let text = String::from_utf8_lossy(&datagram.payload).into_owned();
                        if mismatched {
                            guard.mismatched.insert(datagram.name.clone(), Some(text.clone()));
                        }
                        guard.answers.insert(datagram.name.clone(), (datagram.digest, text));
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Take `datagram` if its `(boot, seq)` is new for its sender; a heartbeat
/// from a peer with this node's config (`counts`) makes it heard from now.
fn take(heard: &mut Heard, datagram: &Datagram, counts: bool) -> bool {
    let key = (datagram.name.clone(), datagram.kind);
    if let Some((boot, seq)) = heard.seen.get(&key) {
        if *boot == datagram.boot && datagram.seq <= *seq {
            return false;
        }
    }
    heard.seen.insert(key, (datagram.boot, datagram.seq));
    let previous = heard.last.get(&datagram.name).copied();
    let when = if counts && datagram.kind == KIND_HEARTBEAT {
        Some(Instant::now())
    } else {
        previous.and_then(|(when, _, _)| when)
    };
    heard.last.insert(datagram.name.clone(), (when, datagram.boot, datagram.seq));
    true
}

fn mac(config: &LivenessConfig, body: &[u8]) -> [u8; MAC_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(&config.secret).expect("HMAC takes a key of any length");
    mac.update(config.group.as_bytes());
    mac.update(&[0]);
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn encode(config: &LivenessConfig, kind: u8, boot: u64, seq: u64, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(DATAGRAM_MAX - 200)];
    let name = config.me.as_bytes();
    let mut body = Vec::with_capacity(100 + payload.len());
    body.extend_from_slice(MAGIC);
    body.push(kind);
    body.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    body.extend_from_slice(&name[..name.len().min(255)]);
    body.extend_from_slice(&boot.to_le_bytes());
    body.extend_from_slice(&seq.to_le_bytes());
    body.extend_from_slice(&config.digest);
    body.extend_from_slice(&u16::try_from(payload.len()).unwrap_or(u16::MAX).to_le_bytes());
    body.extend_from_slice(payload);
    let mac = mac(config, &body);
    body.extend_from_slice(&mac);
    body
}

/// Decode and authenticate; the error says what was wrong.
fn decode(config: &LivenessConfig, bytes: &[u8]) -> Result<Datagram, &'static str> {
    if bytes.len() < MAGIC.len() + 2 + 8 + 8 + 32 + 2 + MAC_LEN || bytes.len() > DATAGRAM_MAX {
        return Err("bad length");
    }
    let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    let mut check = Hmac::<Sha256>::new_from_slice(&config.secret).expect("HMAC takes a key of any length");
    check.update(config.group.as_bytes());
    check.update(&[0]);
    check.update(body);
    check.verify_slice(tag).map_err(|_| "bad HMAC: another group, another secret, or forged")?;
    if &body[..4] != MAGIC {
        return Err("bad magic");
    }
    let kind = body[4];
    let name_len = usize::from(body[5]);
    let rest = body.get(6..).ok_or("truncated")?;
    let name = rest.get(..name_len).ok_or("truncated name")?;
    let rest = &rest[name_len..];
    let fixed = rest.get(..8 + 8 + 32 + 2).ok_or("truncated header")?;
    let boot = u64::from_le_bytes(fixed[..8].try_into().map_err(|_| "truncated")?);
    let seq = u64::from_le_bytes(fixed[8..16].try_into().map_err(|_| "truncated")?);
    let digest: [u8; 32] = fixed[16..48].try_into().map_err(|_| "truncated")?;
    let payload_len = usize::from(u16::from_le_bytes(fixed[48..50].try_into().map_err(|_| "truncated")?));
    let payload = rest.get(50..50 + payload_len).ok_or("truncated payload")?;
    if rest.len() != 50 + payload_len {
        return Err("trailing bytes");
    }
    Ok(Datagram {
        kind,
        name: String::from_utf8(name.to_vec()).map_err(|_| "name is not UTF-8")?,
        boot,
        seq,
        digest,
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(me: &str, port: u16, peer: (&str, u16), digest: u8) -> LivenessConfig {
        LivenessConfig {
            me: me.to_string(),
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            peers: vec![(peer.0.to_string(), SocketAddr::from(([127, 0, 0, 1], peer.1)))],
            secret: b"liveness test secret".to_vec(),
            group: "g".to_string(),
            digest: [digest; 32],
            canonical: format!("config of {me}\n"),
            heartbeat_interval: HEARTBEAT,
            failure_after: FAILURE,
        }
    }

    const HEARTBEAT: Duration = Duration::from_millis(crate::config::HEARTBEAT_MS_DEFAULT);
    const FAILURE: Duration = Duration::from_millis(crate::config::FAILURE_MS_DEFAULT);

    fn free_port() -> u16 {
        UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn a_datagram_round_trips_and_any_flipped_byte_is_refused() {
        let config = config("a", 1, ("b", 2), 7);
        let bytes = encode(&config, KIND_CONFIG_ANSWER, 5, 9, b"payload");
        let datagram = decode(&config, &bytes).unwrap();
        assert_eq!(
            (datagram.kind, datagram.name.as_str(), datagram.boot, datagram.seq),
            (KIND_CONFIG_ANSWER, "a", 5, 9)
        );
        assert_eq!(datagram.payload, b"payload");
        for index in 0..bytes.len() {
            let mut forged = bytes.clone();
            forged[index] ^= 0x20;
            assert!(decode(&config, &forged).is_err(), "byte {index}");
        }
        let mut other_group = config.clone();
        other_group.group = "h".to_string();
        assert!(decode(&other_group, &bytes).is_err());
        assert!(decode(&config, &bytes[..10]).is_err());
    }

    #[test]
    fn a_replayed_datagram_is_refused() {
        let config = config("a", 1, ("b", 2), 7);
        let mut heard = Heard::default();
        let datagram = decode(&config, &encode(&config, KIND_HEARTBEAT, 5, 9, &[])).unwrap();
        assert!(take(&mut heard, &datagram, true));
        assert!(!take(&mut heard, &datagram, true));
        let restarted = Datagram { boot: 6, seq: 1, ..datagram };
        assert!(take(&mut heard, &restarted, true));
    }

    #[test]
    fn peers_see_each_other_live_and_a_config_mismatch_is_answered_with_the_config() {
        let (port_a, port_b) = (free_port(), free_port());
        let a = Liveness::start(config("a", port_a, ("b", port_b), 1)).unwrap();
        let b = Liveness::start(config("b", port_b, ("a", port_a), 2)).unwrap();
        let mismatches = a.config_mismatches(Duration::from_secs(2));
        assert_eq!(mismatches, vec![("b".to_string(), "config of b\n".to_string())]);
        // Another digest is never counted live.
        std::thread::sleep(HEARTBEAT * 3);
        assert_eq!(a.live().0, BTreeSet::from(["a".to_string()]));
        b.stop();
        let b = Liveness::start(config("b", port_b, ("a", port_a), 1)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !a.live().0.contains("b") {
            assert!(Instant::now() < deadline, "b is never heard");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(a.config_mismatches(Duration::from_secs(1)), vec![]);
        assert_eq!(a.mismatched(), vec![]);
        b.stop();
        a.stop();
    }

    /// A peer is live while its heartbeats come, and failed once it has been
    /// silent for the configured failure time, not before.
    #[test]
    fn a_silent_peer_fails_after_the_configured_failure_time() {
        let (port_a, port_b) = (free_port(), free_port());
        let timed = |config: LivenessConfig| LivenessConfig {
            heartbeat_interval: Duration::from_millis(50),
            failure_after: Duration::from_millis(600),
            ..config
        };
        let a = Liveness::start(timed(config("a", port_a, ("b", port_b), 1))).unwrap();
        let b = Liveness::start(timed(config("b", port_b, ("a", port_a), 1))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !a.live().0.contains("b") {
            assert!(Instant::now() < deadline, "b is never heard");
            std::thread::sleep(Duration::from_millis(10));
        }
        let silent = Instant::now();
        b.stop();
        while a.live().0.contains("b") {
            assert!(silent.elapsed() < Duration::from_secs(3), "b is still live 3 s after it stopped");
            std::thread::sleep(Duration::from_millis(10));
        }
        let failed_after = silent.elapsed();
        // Its last heartbeat went out about one interval before the stop, or
        // after it; 200 ms of slack for a late sender thread.
        assert!(failed_after >= Duration::from_millis(400), "failed after only {failed_after:?}");
        a.stop();
    }

    /// A process paused (SIGSTOP) is not settled when it resumes, even
    /// before its sender thread runs again: otherwise its first look would
    /// take every peer for failed (their heartbeats are still queued).
    #[test]
    fn a_paused_process_does_not_judge_its_peers_when_it_resumes() {
        let port = free_port();
        let liveness = Liveness::start(config("a", port, ("b", free_port()), 1)).unwrap();
        *liveness.awake_since.lock().unwrap() = Instant::now() - FAILURE * 2;
        assert!(liveness.live().1, "awake long enough: settled");
        // As if the whole process had been stopped for 3 s: the sender's
        // last beat is that old when the caller looks.
        liveness.stop.store(true, Ordering::Relaxed);
        std::thread::sleep(HEARTBEAT * 2);
        *liveness.last_beat.lock().unwrap() = Instant::now() - Duration::from_secs(3);
        assert!(!liveness.live().1, "just resumed: silence says nothing yet");
        liveness.stop();
    }
}
