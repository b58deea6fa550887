//! A deterministic, seeded simulation of the group core (`core.rs`): N
//! nodes' `Core`s driven by a simulated shell that behaves like `node.rs`,
//! over a simulated quorum store, network, clocks and roles, with faults
//! drawn from one `u64` seed. Every invariant is checked after every step.
//!
//! ```text
//!  seed ─▶ Rng ─▶ faults (crash, pause, partition, leave, switchover, slow/lost replies)
//!                   │
//!  queue of (sim ms, action) ─▶ World::dispatch ─▶ node shell ─▶ Core::step ─▶ commands
//!                   │                 quorum store (CAS on seq) ◀──────────────┘
//!                   └─ lease thread, replicator, client writes ─▶ checks (invariants 1–4)
//! ```
//!
//! Not modelled: the data path itself (a client write is one atomic step;
//! a copy that is reached and recorded current gets it), async copies' lag
//! (every copy site is `sync`), the copy's epoch fencing of frames, raft's
//! log (the store is one linearizable register; a deposed raft leader only
//! believes it leads), lost heartbeats short of a partition, role start
//! failures (`RoleFailed`), and the time a linearizable read takes (a lease
//! counts from the read itself).
//!
//! `world.rs` is the simulated world and shell, `checks.rs` the invariants
//! and counters, `rng.rs` the seeded generator.

pub mod checks;
pub mod rng;
pub mod world;

pub use checks::{Failure, Stats};
pub use world::{run, Params};
