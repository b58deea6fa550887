//! The etcd quorum backend against a real etcd (Debian's `etcd-server`,
//! `/usr/bin/etcd`), one single-member cluster per test on 127.0.0.1 with
//! free ports and a temporary data directory, killed when the test ends.
//! Without etcd a test is skipped (`SKIPPED: <test>: <reason>` on stderr,
//! counted by tests/run.sh), except under `CI=true`, where it fails.
#![cfg(feature = "etcd")]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_glue::quorum::etcd::{EtcdQuorum, EtcdQuorumConfig};
use cluster_glue::quorum::{CasOutcome, QuorumError, QuorumStore, Versioned};

const ETCD: &str = "/usr/bin/etcd";
/// The slack the contract allows a call past its timeout.
const SLACK: Duration = Duration::from_millis(500);

/// A running etcd, killed (and its data directory removed) on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Send `signal` to the etcd process.
    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid touches no memory of ours;
        // the child is not yet reaped (we hold it until drop).
        let result = unsafe { libc::kill(pid, signal) };
        assert_eq!(result, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        // kill(2) returns before the process stops; wait until it has.
        let stopped = signal == libc::SIGSTOP;
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.is_stopped() != stopped {
            assert!(Instant::now() < deadline, "etcd did not change state after signal {signal}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is stopped (state `T` in /proc/<pid>/stat).
    fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    }
}

/// Whether etcd is installed; says why a test is skipped, or fails under CI.
fn have_etcd(test: &str) -> bool {
    if Path::new(ETCD).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{ETCD} is not installed; the test command in README.md (tests/run.sh) installs etcd-server");
    }
    use std::io::Write;
    let _ = std::io::stderr().write_all(
        format!("SKIPPED: {test}: {ETCD} is not installed (tests/run.sh installs etcd-server)\n").as_bytes(),
    );
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local address").port()
}

/// Start a single-member etcd on free ports of 127.0.0.1; return once it
/// answers a linearizable read.
fn start_etcd() -> Etcd {
    start_etcd_on(free_port())
}

/// Start a single-member etcd serving clients on 127.0.0.1:`client_port`.
fn start_etcd_on(client_port: u16) -> Etcd {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let peer_port = free_port();
    let endpoint = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd's log file");
    let child = Command::new(ETCD)
        .args(["--name", "solo", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("solo={peer}"), "--initial-cluster-state", "new"])
        .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd starts");
    let etcd = Etcd { child, endpoint, _dir: dir };
    let probe = quorum(&etcd, "probe");
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe.read("ready", Duration::from_millis(500)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not answer within 20 s; see its log");
        std::thread::sleep(Duration::from_millis(50));
    }
    etcd
}

fn quorum(etcd: &Etcd, node: &str) -> EtcdQuorum {
    let mut config = EtcdQuorumConfig::new(vec![etcd.endpoint.clone()], "/crossmirror/test/".to_string(), node.into());
    config.dial_timeout = Duration::from_millis(500);
    EtcdQuorum::start(config).expect("the etcd quorum client starts")
}

const T: Duration = Duration::from_secs(5);

fn v(revision: u64, value: &[u8]) -> Versioned {
    Versioned { revision, value: value.to_vec() }
}

/// Compare-and-set: the first write expects 0, each write +1, a stale
/// expectation (also a retry of a write that went through) is refused with
/// what the key holds now.
#[test]
fn etcd_compare_and_set_follows_the_key_revision() {
    if !have_etcd("etcd_compare_and_set_follows_the_key_revision") {
        return;
    }
    let etcd = start_etcd();
    let store = quorum(&etcd, "a");
    assert_eq!(store.read("record", T).unwrap(), None);
    assert_eq!(store.compare_and_set("record", 3, b"x".to_vec(), T).unwrap(), CasOutcome::Conflict(None));
    assert_eq!(store.compare_and_set("record", 0, b"one".to_vec(), T).unwrap(), CasOutcome::Written(1));
    assert_eq!(
        store.compare_and_set("record", 0, b"again".to_vec(), T).unwrap(),
        CasOutcome::Conflict(Some(v(1, b"one")))
    );
    assert_eq!(store.compare_and_set("record", 1, b"two".to_vec(), T).unwrap(), CasOutcome::Written(2));
    assert_eq!(store.read("record", T).unwrap(), Some(v(2, b"two")));
    // A retried write whose first try committed: refused, showing its own bytes.
    assert_eq!(
        store.compare_and_set("record", 1, b"two".to_vec(), T).unwrap(),
        CasOutcome::Conflict(Some(v(2, b"two")))
    );
    // Writes to other keys do not move this key's revision.
    assert_eq!(store.compare_and_set("other", 0, b"o".to_vec(), T).unwrap(), CasOutcome::Written(1));
    assert_eq!(store.compare_and_set("other", 1, b"o2".to_vec(), T).unwrap(), CasOutcome::Written(2));
    assert_eq!(store.compare_and_set("record", 2, b"three".to_vec(), T).unwrap(), CasOutcome::Written(3));
    // A second client sees every write (linearizable reads).
    let other = quorum(&etcd, "b");
    assert_eq!(other.read("record", T).unwrap(), Some(v(3, b"three")));
}

/// Of clients racing to write at one revision, exactly one wins.
#[test]
fn etcd_racing_writers_exactly_one_wins() {
    if !have_etcd("etcd_racing_writers_exactly_one_wins") {
        return;
    }
    let etcd = start_etcd();
    let stores: Vec<Arc<EtcdQuorum>> = (0..4).map(|index| Arc::new(quorum(&etcd, &format!("n{index}")))).collect();
    for round in 0..10u64 {
        let threads: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(index, store)| {
                let store = Arc::clone(store);
                std::thread::spawn(move || store.compare_and_set("race", round, vec![index as u8], T).unwrap())
            })
            .collect();
        let outcomes: Vec<CasOutcome> = threads.into_iter().map(|thread| thread.join().unwrap()).collect();
        let winners = outcomes.iter().filter(|outcome| **outcome == CasOutcome::Written(round + 1)).count();
        assert_eq!(winners, 1, "round {round}: {outcomes:?}");
    }
    assert_eq!(stores[0].read("race", T).unwrap().map(|stored| stored.revision), Some(10));
}

/// A watch answers at once when the key is already past `after`, wakes on a
/// write, and gives `None` when its timeout passes first.
#[test]
fn etcd_watch_wakes_on_a_write_and_times_out() {
    if !have_etcd("etcd_watch_wakes_on_a_write_and_times_out") {
        return;
    }
    let etcd = start_etcd();
    let store = Arc::new(quorum(&etcd, "a"));
    assert_eq!(store.compare_and_set("record", 0, b"one".to_vec(), T).unwrap(), CasOutcome::Written(1));
    assert_eq!(store.watch("record", 0, T).unwrap(), Some(v(1, b"one")));

    let started = Instant::now();
    assert_eq!(store.watch("record", 1, Duration::from_millis(300)).unwrap(), None);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_millis(300) + SLACK, "{waited:?}");

    let writer = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            store.compare_and_set("record", 1, b"two".to_vec(), T).unwrap()
        })
    };
    let started = Instant::now();
    assert_eq!(store.watch("record", 1, T).unwrap(), Some(v(2, b"two")));
    assert!(started.elapsed() < Duration::from_secs(2), "the watch woke late: {:?}", started.elapsed());
    assert_eq!(writer.join().unwrap(), CasOutcome::Written(2));
    // A watch on an absent key wakes on its creation.
    let creator = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            store.compare_and_set("fresh", 0, b"new".to_vec(), T).unwrap()
        })
    };
    assert_eq!(store.watch("fresh", 0, T).unwrap(), Some(v(1, b"new")));
    creator.join().unwrap();
}

/// A lease is granted from before the call; the node's liveness key appears
/// under the prefix, and the status names the etcd leader.
#[test]
fn etcd_lease_liveness_and_status() {
    if !have_etcd("etcd_lease_liveness_and_status") {
        return;
    }
    let etcd = start_etcd();
    let store = quorum(&etcd, "alpha");
    let term = Duration::from_secs(2);
    let before = Instant::now();
    let lease = store.renew_lease(term, T).unwrap();
    assert!(lease.valid_until >= before + term && lease.valid_until <= Instant::now() + term, "{lease:?}");

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(live) = store.read("live/alpha", T).unwrap() {
            assert_eq!(live.value, b"alpha");
            break;
        }
        assert!(Instant::now() < deadline, "no liveness key after 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = store.status();
        if status.leader.is_some() {
            break status;
        }
        assert!(Instant::now() < deadline, "no leader in the status after 5 s: {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.term >= 1, "{status:?}");
    assert!(!status.is_leader);
    assert_eq!(status.voters.len(), 1);
    assert_eq!(status.voters[0].reachable, Some(true), "{status:?}");
    assert_eq!(Some(status.voters[0].id), status.leader, "{status:?}");
    assert_eq!(status.voters[0].address.to_string(), etcd.endpoint.trim_start_matches("http://"));

    // A clean stop removes the liveness key at once (its lease is revoked).
    store.stop();
    let other = quorum(&etcd, "beta");
    assert_eq!(other.read("live/alpha", T).unwrap(), None);
}

/// With etcd frozen (SIGSTOP) every call ends in Timeout within its timeout
/// plus 0.5 s; once etcd runs again (SIGCONT) the calls work again.
#[test]
fn etcd_frozen_calls_time_out_then_recover() {
    if !have_etcd("etcd_frozen_calls_time_out_then_recover") {
        return;
    }
    let etcd = start_etcd();
    let store = quorum(&etcd, "a");
    assert_eq!(store.compare_and_set("record", 0, b"one".to_vec(), T).unwrap(), CasOutcome::Written(1));
    etcd.signal(libc::SIGSTOP);
    let timeout = Duration::from_millis(700);
    let timed = |what: &str, call: &dyn Fn() -> Result<(), QuorumError>| {
        let started = Instant::now();
        let result = call();
        let took = started.elapsed();
        assert!(matches!(result, Err(QuorumError::Timeout { .. })), "{what}: {result:?}");
        assert!(took < timeout + SLACK, "{what} took {took:?}");
    };
    for _ in 0..2 {
        timed("read", &|| store.read("record", timeout).map(drop));
        timed("compare_and_set", &|| store.compare_and_set("record", 1, b"two".to_vec(), timeout).map(drop));
        timed("watch", &|| store.watch("record", 1, timeout).map(drop));
        timed("renew_lease", &|| store.renew_lease(Duration::from_secs(2), timeout).map(drop));
    }
    std::thread::sleep(Duration::from_millis(1200));
    let status = store.status();
    assert_eq!(status.voters[0].reachable, Some(false), "{status:?}");

    etcd.signal(libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(10);
    let current = loop {
        match store.read("record", Duration::from_secs(1)) {
            Ok(current) => break current,
            Err(error) => assert!(Instant::now() < deadline, "no answer 10 s after SIGCONT: {error}"),
        }
    };
    // The timed-out write may have committed once etcd resumed.
    let revision = current.map(|current| current.revision).expect("the record is there");
    assert!(revision == 1 || revision == 2, "{revision}");
    match store.compare_and_set("record", revision, b"after".to_vec(), T).unwrap() {
        CasOutcome::Written(written) => assert_eq!(written, revision + 1),
        // The frozen write, abandoned on a connection etcd had not read yet,
        // may even land after the read above.
        CasOutcome::Conflict(current) => {
            assert_eq!((revision, current), (1, Some(v(2, b"two"))));
            assert_eq!(store.compare_and_set("record", 2, b"after".to_vec(), T).unwrap(), CasOutcome::Written(3));
        }
    }
    store.renew_lease(Duration::from_secs(2), T).unwrap();
}

/// With etcd gone (killed) calls time out, not fail; a client started
/// before etcd runs works once it does.
#[test]
fn etcd_absent_then_started() {
    if !have_etcd("etcd_absent_then_started") {
        return;
    }
    let port = free_port();
    let mut config =
        EtcdQuorumConfig::new(vec![format!("http://127.0.0.1:{port}")], "/crossmirror/test/".to_string(), "a".into());
    config.dial_timeout = Duration::from_millis(500);
    let store = EtcdQuorum::start(config).expect("starts without etcd");
    let timeout = Duration::from_millis(600);
    let started = Instant::now();
    let result = store.compare_and_set("record", 0, b"one".to_vec(), timeout);
    assert!(matches!(result, Err(QuorumError::Timeout { .. })), "{result:?}");
    assert!(started.elapsed() < timeout + SLACK, "{:?}", started.elapsed());

    let etcd = start_etcd_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let outcome = loop {
        match store.compare_and_set("record", 0, b"one".to_vec(), Duration::from_secs(1)) {
            Ok(outcome) => break outcome,
            Err(error) => assert!(Instant::now() < deadline, "no answer 10 s after etcd started: {error}"),
        }
    };
    assert_eq!(outcome, CasOutcome::Written(1));

    drop(etcd);
    let started = Instant::now();
    let result = store.read("record", timeout);
    assert!(matches!(result, Err(QuorumError::Timeout { .. })), "{result:?}");
    assert!(started.elapsed() < timeout + SLACK, "{:?}", started.elapsed());
}

/// Configs that cannot work are refused at start, naming the fix.
#[test]
fn etcd_bad_configs_are_refused() {
    let start = |endpoints: Vec<&str>, node: &str| {
        let endpoints = endpoints.into_iter().map(String::from).collect();
        EtcdQuorum::start(EtcdQuorumConfig::new(endpoints, "/p/".to_string(), node.to_string())).map(drop)
    };
    let refused = |result: Result<(), QuorumError>, needle: &str| match result {
        Err(QuorumError::Other(message)) => assert!(message.contains(needle), "{message}"),
        other => panic!("{needle}: {other:?}"),
    };
    refused(start(vec![], "a"), "0 endpoints");
    refused(start(vec!["127.0.0.1:2379"], "a"), "is not http://host:port");
    refused(start(vec!["http://127.0.0.1:0"], "a"), "is not http://host:port");
    refused(start(vec!["http://127.0.0.1:2379"], ""), "node name");
    refused(start(vec!["http://127.0.0.1:2379"], "a/b"), "node name");
}
