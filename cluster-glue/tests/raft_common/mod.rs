//! Helpers shared by the embedded-quorum tests: free local ports, configs,
//! waiting for a leader.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use cluster_glue::quorum::raft::{RaftQuorum, RaftQuorumConfig};
use cluster_glue::quorum::QuorumStore;

pub const SECRET: &[u8] = b"test secret";
pub const GROUP: &str = "test-group";

/// `count` addresses on 127.0.0.1 whose ports were free a moment ago.
pub fn free_addresses(count: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> =
        (0..count).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
    listeners.iter().map(|listener| listener.local_addr().expect("local address")).collect()
}

/// Voters 1..=count on free ports.
pub fn voters(count: usize) -> BTreeMap<u64, SocketAddr> {
    (1..).zip(free_addresses(count)).collect()
}

/// The config of voter `id`, with default timings, its state under `root`.
pub fn config(id: u64, voters: &BTreeMap<u64, SocketAddr>, root: &Path) -> RaftQuorumConfig {
    RaftQuorumConfig::new(id, voters.clone(), root.join(format!("node-{id}")), SECRET.to_vec(), GROUP.to_string())
}

/// Wait until one of `nodes` leads and all live ones agree; its position.
pub fn wait_for_leader(nodes: &[Option<RaftQuorum>], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let statuses: Vec<_> = nodes.iter().map(|node| node.as_ref().map(|node| node.status())).collect();
        let leader = statuses.iter().position(|status| status.as_ref().is_some_and(|status| status.is_leader));
        if let Some(position) = leader {
            let leader_id = statuses[position].as_ref().map(|status| status.id);
            let agreed = statuses.iter().flatten().all(|status| status.leader == leader_id);
            if agreed {
                return position;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}: {statuses:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
