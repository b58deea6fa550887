//! A 3-voter embedded quorum on 127.0.0.1: CAS semantics, reads and watches
//! on followers, leases, a follower catching up by snapshot, failover after
//! the leader stops, and timeouts
//! (not hangs) once the quorum is lost.

mod raft_common;

use std::time::{Duration, Instant};

use cluster_glue::quorum::raft::RaftQuorum;
use cluster_glue::quorum::{CasOutcome, QuorumError, QuorumStore, Versioned};
use raft_common::{config, voters, wait_for_leader};

const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// More than a snapshot interval (200) plus the log kept behind it (100).
const LAGGING_ENTRIES: u64 = 400;

fn versioned(revision: u64, value: &[u8]) -> Versioned {
    Versioned { revision, value: value.to_vec() }
}

fn node(nodes: &[Option<RaftQuorum>], position: usize) -> &RaftQuorum {
    nodes[position].as_ref().expect("running")
}

fn assert_timeout<T: std::fmt::Debug>(result: Result<T, QuorumError>, started: Instant, timeout: Duration) {
    assert!(matches!(result, Err(QuorumError::Timeout { .. })), "expected a timeout, got {result:?}");
    let took = started.elapsed();
    assert!(took >= timeout && took < timeout + Duration::from_millis(500), "took {took:?} for a {timeout:?} timeout");
}

/// The whole life of a 3-voter group, from bootstrap to the loss of quorum.
#[test]
fn three_voters_cas_read_watch_lease_failover_and_quorum_loss() {
    let root = tempfile::tempdir().expect("tempdir");
    let voters = voters(3);
    let mut nodes: Vec<Option<RaftQuorum>> = voters
        .keys()
        .map(|&id| Some(RaftQuorum::start(config(id, &voters, root.path())).expect("start voter")))
        .collect();
    let leader = wait_for_leader(&nodes, Duration::from_secs(10));
    let follower = (leader + 1) % 3;
    let other_follower = (leader + 2) % 3;

    // CAS semantics, asked of a follower (forwarded to the leader).
    assert_eq!(
        node(&nodes, follower).compare_and_set("k", 0, b"a".to_vec(), CALL_TIMEOUT).expect("cas"),
        CasOutcome::Written(1)
    );
    assert_eq!(
        node(&nodes, follower).compare_and_set("k", 0, b"b".to_vec(), CALL_TIMEOUT).expect("cas"),
        CasOutcome::Conflict(Some(versioned(1, b"a")))
    );
    assert_eq!(
        node(&nodes, leader).compare_and_set("k", 0, b"a".to_vec(), CALL_TIMEOUT).expect("retried cas"),
        CasOutcome::Conflict(Some(versioned(1, b"a"))),
        "a retried CAS with the old expected revision must not apply again"
    );
    assert_eq!(node(&nodes, other_follower).read("k", CALL_TIMEOUT).expect("read"), Some(versioned(1, b"a")));
    assert_eq!(node(&nodes, follower).read("absent", CALL_TIMEOUT).expect("read"), None);

    // A watch on a follower wakes when a write elsewhere is applied there.
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| node(&nodes, other_follower).watch("k", 1, CALL_TIMEOUT));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            node(&nodes, leader).compare_and_set("k", 1, b"c".to_vec(), CALL_TIMEOUT).expect("cas"),
            CasOutcome::Written(2)
        );
        assert_eq!(watcher.join().expect("watcher").expect("watch"), Some(versioned(2, b"c")));
    });
    assert_eq!(node(&nodes, follower).watch("k", 2, Duration::from_millis(50)).expect("watch"), None);

    // Leases, from a follower and from the leader.
    for position in [follower, leader] {
        let before = Instant::now();
        let lease = node(&nodes, position).renew_lease(Duration::from_secs(3), CALL_TIMEOUT).expect("lease");
        assert!(lease.valid_until >= before + Duration::from_secs(3));
        assert!(lease.valid_until <= Instant::now() + Duration::from_secs(3));
    }

    let status = node(&nodes, leader).status();
    assert!(status.is_leader);
    assert!(status.last_applied.is_some());
    assert!(status.voters.iter().all(|voter| voter.reachable == Some(true)), "{status:?}");

    // A follower stops, misses more than a snapshot's worth of entries, and
    // catches up after a restart by receiving the leader's snapshot.
    let lagging_id = node(&nodes, other_follower).status().id;
    nodes[other_follower].take().expect("follower").stop();
    for written in 1..=LAGGING_ENTRIES {
        let outcome = node(&nodes, follower).compare_and_set("lag", written - 1, vec![1; 1000], CALL_TIMEOUT);
        assert_eq!(outcome.expect("cas"), CasOutcome::Written(written));
    }
    nodes[other_follower] = Some(RaftQuorum::start(config(lagging_id, &voters, root.path())).expect("restart"));
    let caught_up = node(&nodes, other_follower).watch("lag", LAGGING_ENTRIES - 1, Duration::from_secs(10));
    assert_eq!(caught_up.expect("watch").map(|value| value.revision), Some(LAGGING_ENTRIES));
    assert!(root.path().join(format!("node-{lagging_id}")).join("raft-snapshot.json").exists());
    assert_eq!(node(&nodes, other_follower).read("k", CALL_TIMEOUT).expect("read"), Some(versioned(2, b"c")));

    // The leader stops: another is elected and CAS still works.
    let old_leader_id = node(&nodes, leader).status().id;
    let stopped_at = Instant::now();
    nodes[leader].take().expect("leader").stop();
    let stop_took = stopped_at.elapsed();
    let new_leader = wait_for_leader(&nodes, Duration::from_secs(5));
    let failover = stopped_at.elapsed();
    assert_ne!(node(&nodes, new_leader).status().id, old_leader_id);
    eprintln!("new leader {failover:?} after the stop began (the stop itself took {stop_took:?})");
    let survivor = if new_leader == follower { other_follower } else { follower };
    assert_eq!(
        node(&nodes, survivor).compare_and_set("k", 2, b"d".to_vec(), CALL_TIMEOUT).expect("cas"),
        CasOutcome::Written(3)
    );
    assert_eq!(node(&nodes, new_leader).read("k", CALL_TIMEOUT).expect("read"), Some(versioned(3, b"d")));

    // Two of three stopped: no quorum, every call times out on time — also
    // on the leader left alone, which must not confirm a lease by itself.
    nodes[survivor].take().expect("survivor").stop();
    let alone = node(&nodes, new_leader);
    let timeout = Duration::from_millis(800);
    let started = Instant::now();
    assert_timeout(alone.read("k", timeout), started, timeout);
    let started = Instant::now();
    assert_timeout(alone.compare_and_set("k", 3, b"e".to_vec(), timeout), started, timeout);
    let started = Instant::now();
    assert_timeout(alone.renew_lease(Duration::from_secs(3), timeout), started, timeout);
    // The rejected voters are reported unreachable once their silence is old.
    std::thread::sleep(Duration::from_millis(1100));
    let status = alone.status();
    assert_eq!(status.voters.iter().filter(|voter| voter.reachable == Some(true)).count(), 1, "{status:?}");
}
