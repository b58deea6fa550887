//! A voter SIGKILLed mid-append and restarted keeps its log: every revision
//! it reported committed before the kill is there after the restart.
//!
//! The test re-executes its own binary running the ignored helper
//! `raft_child_voter`, a single-voter group that CASes one key in a loop and
//! prints each committed revision; the parent kills it with SIGKILL while it
//! appends, then reopens the same directory in-process. A second run has the
//! child SIGKILL itself the instant a revision is reported committed, so the
//! last revision reported is the one just appended. (SIGKILL leaves the page
//! cache alone: these tests catch an append acknowledged before it is
//! written, not a missing fsync.)

mod raft_common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cluster_glue::quorum::raft::RaftQuorum;
use cluster_glue::quorum::{CasOutcome, QuorumStore};
use raft_common::{config, voters};

const CHILD_DIR: &str = "CROSSMIRROR_RAFT_CHILD_DIR";
const CHILD_ADDRESS: &str = "CROSSMIRROR_RAFT_CHILD_ADDRESS";
const CHILD_KILLS_ITSELF: &str = "CROSSMIRROR_RAFT_CHILD_KILLS_ITSELF";
const KEY: &str = "record";
/// Enough committed writes that the child has taken a snapshot and purged.
const WRITES_BEFORE_KILL: u64 = 300;

/// Kills the child when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Helper run by `voter_killed_mid_append_keeps_its_log` in a child process.
#[test]
#[ignore = "run as a child process by voter_killed_mid_append_keeps_its_log"]
fn raft_child_voter() {
    let (Ok(dir), Ok(address)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ADDRESS)) else {
        return;
    };
    let address = address.parse().expect("child address");
    let voters = [(1, address)].into_iter().collect();
    let node = RaftQuorum::start(config(1, &voters, std::path::Path::new(&dir))).expect("child voter");
    let kills_itself = std::env::var_os(CHILD_KILLS_ITSELF).is_some();
    let mut revision = 0;
    // Bounded, so an orphan cannot run forever.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match node.compare_and_set(KEY, revision, revision.to_le_bytes().to_vec(), Duration::from_secs(5)) {
            Ok(CasOutcome::Written(written)) => {
                revision = written;
                println!("committed {written}");
                if kills_itself && written >= WRITES_BEFORE_KILL {
                    // SAFETY: kill(2) on our own pid takes no pointers; the
                    // process ends here, as a crash would end it.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
            }
            other => panic!("child CAS at {revision}: {other:?}"),
        }
    }
}

/// SIGKILL mid-append loses no revision reported committed, and the store works after.
#[test]
fn voter_killed_mid_append_keeps_its_log() {
    killed_voter_keeps_its_log(false);
}

/// The same with the kill the instant a commit is reported.
#[test]
fn voter_killed_right_after_a_commit_keeps_it() {
    killed_voter_keeps_its_log(true);
}

fn killed_voter_keeps_its_log(kills_itself: bool) {
    let root = tempfile::tempdir().expect("tempdir");
    let voters = voters(1);
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["raft_child_voter", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, root.path())
        .env(CHILD_ADDRESS, voters[&1].to_string())
        .stdout(Stdio::piped());
    if kills_itself {
        command.env(CHILD_KILLS_ITSELF, "1");
    }
    let child = command.spawn().expect("spawn the child voter");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("child stdout");

    let mut committed_max = 0;
    let mut lines = BufReader::new(stdout).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed_max < WRITES_BEFORE_KILL && !kills_itself {
        assert!(Instant::now() < deadline, "the child committed only {committed_max} writes in 30 s");
        let line = lines.next().expect("child output ended early").expect("child output");
        if let Some(revision) = line.strip_prefix("committed ") {
            committed_max = revision.parse().expect("revision");
        }
    }
    if !kills_itself {
        child.0.kill().expect("SIGKILL the child");
    }
    // Whatever it printed before dying was committed too.
    for line in lines.map_while(Result::ok) {
        if let Some(revision) = line.strip_prefix("committed ") {
            committed_max = revision.parse().expect("revision");
        }
    }
    let status = child.0.wait().expect("reap the child");
    assert!(!status.success(), "the child was killed, not finished: {status:?}");
    assert!(committed_max >= WRITES_BEFORE_KILL, "the child committed only {committed_max} writes");

    let snapshot = root.path().join("node-1").join("raft-snapshot.json");
    assert!(snapshot.exists(), "after {committed_max} writes the child took a snapshot, so the restart reads it");

    let node = RaftQuorum::start(config(1, &voters, root.path())).expect("restart the voter");
    let stored = node.read(KEY, Duration::from_secs(10)).expect("read after restart").expect("the key survives");
    assert!(
        stored.revision >= committed_max,
        "revision {committed_max} was reported committed, {} found after the restart",
        stored.revision
    );
    assert_eq!(stored.value, stored.revision.saturating_sub(1).to_le_bytes().to_vec());
    assert_eq!(
        node.compare_and_set(KEY, stored.revision, b"after".to_vec(), Duration::from_secs(5)).expect("cas"),
        CasOutcome::Written(stored.revision + 1)
    );
    eprintln!("killed after revision {committed_max}; restarted at {}", stored.revision);
}
