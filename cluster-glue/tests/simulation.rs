//! The group core under a seeded simulation (`sim/`): many seeds, each a
//! few simulated minutes of crashes, pauses, partitions, graceful leaves,
//! switchovers and slow or lost quorum answers, every invariant checked
//! after every step. A failing seed prints the line that replays it.
//!
//! `SIM_SEEDS=N SIM_FIRST=K` runs seeds K..K+N in `many_seeds`;
//! `SIM_SEED=S` replays one seed in `replay` with its trace;
//! `benches/simulate.sh` runs 100 000 seeds in release mode.

mod sim;

use sim::{Failure, Params, Stats};

/// Simulated time per seed: faults for the first part, then calm.
const DURATION_MS: u64 = 150_000;
const CHAOS_MS: u64 = 120_000;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.trim().parse().unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

fn params(trace: bool, echo: bool) -> Params {
    Params { duration_ms: DURATION_MS, chaos_ms: CHAOS_MS, trace, echo }
}

fn replay_line(seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test -p crossmirror-cluster-glue --test simulation -- replay --exact --nocapture")
}

/// The failure of `seed`, run again with its trace, as a panic message.
fn report(failure: &Failure) -> String {
    let traced = sim::run(failure.seed, params(true, false)).err().unwrap_or_else(|| failure.clone());
    format!(
        "seed {} broke an invariant: {}\nreplay: {}\nlast trace lines:\n  {}",
        failure.seed,
        traced.message,
        replay_line(failure.seed),
        traced.trace.join("\n  ")
    )
}

/// Every invariant holds on many seeds (`SIM_SEEDS`, `SIM_FIRST`).
#[test]
fn many_seeds() {
    let default = if cfg!(debug_assertions) { 250 } else { 2000 };
    let count = env_u64("SIM_SEEDS").unwrap_or(default);
    let first = env_u64("SIM_FIRST").unwrap_or(1);
    let mut total = Stats::default();
    for seed in first..first + count {
        match sim::run(seed, params(false, false)) {
            Ok(stats) => total.add(&stats),
            Err(failure) => panic!("{}", report(&failure)),
        }
    }
    eprintln!("simulation: seeds {first}..{}: {total}", first + count);
}

/// One seed (`SIM_SEED`) again, every step printed.
#[test]
fn replay() {
    let Some(seed) = env_u64("SIM_SEED") else {
        eprintln!("replay: set SIM_SEED to replay a seed");
        return;
    };
    match sim::run(seed, params(true, true)) {
        Ok(stats) => eprintln!("seed {seed}: {stats}"),
        Err(failure) => panic!("seed {seed} broke an invariant: {}\nreplay: {}", failure.message, replay_line(seed)),
    }
}

/// A seed replays exactly: the same trace twice.
#[test]
fn a_seed_replays_exactly() {
    let short = Params { duration_ms: 40_000, chaos_ms: 30_000, trace: true, echo: false };
    let first = sim::run(7, short);
    let second = sim::run(7, short);
    match (first, second) {
        (Ok(first), Ok(second)) => assert_eq!(first, second),
        (first, second) => panic!("seed 7 did not replay alike: {first:?} / {second:?}"),
    }
}
