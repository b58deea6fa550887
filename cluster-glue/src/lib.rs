//! crossmirror's group layer (DESIGN.md §2, §5, §6): the group config,
//! membership and the join protocol, host selection, and the mirror-state
//! record on quorum storage.

pub mod access;
pub mod actions;
pub mod config;
pub mod core;
pub mod liveness;
pub mod node;
pub mod quorum;
pub mod record;
pub mod record_store;
