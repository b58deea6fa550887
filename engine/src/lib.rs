//! The crossmirror engine: a volume over a file or a block device, with its
//! local I/O submitted through io_uring.
//!
//! ```text
//!  frontend (NBD) ──plans──▶ Volume ──entries──▶ Ring<Op> ──▶ kernel
//!        ▲                                          │
//!        └──────────── completions (op, result) ◀──┘
//! ```
//!
//! The engine owns the pieces that must be exactly right for the kernel:
//! aligned buffers ([`buffer`]), the io_uring wrapper whose in-flight table
//! owns every buffer the kernel may touch ([`uring`]), the O_DIRECT alignment
//! arithmetic ([`alignment`]) and the volume itself ([`volume`]). It depends on
//! no other crate of the workspace; callers drive it.
//!
//! A frontend changes a volume only through the write seam ([`seam`]), which
//! marks the write-intent bitmap ([`bitmap`]), ships the change to the copies
//! through the [`replicator`] (whose decisions, the bit-clearing rule among
//! them, are a pure core: `replicator/link_core.rs`) and says when to answer.
//!
//! The two roles a host plays are library services with start, status and
//! stop, owned by no CLI, so a process can change role at runtime: the copy
//! role ([`copy_role`]) and the production side's mirroring
//! ([`mirror_service`], composed with the NBD server by the caller).

pub mod activity_log;
pub mod admission;
pub mod alignment;
pub mod applier;
pub mod bitmap;
pub mod buffer;
pub mod copy_role;
pub mod dr_image;
pub mod durable_file;
pub mod error;
pub mod eventfd;
pub mod file_lock;
pub mod fingerprint;
pub mod gate;
pub mod log_limit;
pub mod metadata;
pub mod mirror_service;
pub mod protocol;
pub mod range_lock;
pub mod receiver;
pub mod replicator;
pub mod seam;
pub mod size;
pub mod uring;
pub mod verify;
pub mod volume;

pub use buffer::{AlignedBuf, BufferPool, Lent, Payload, SharedBytes, SharedPool};
pub use error::{EngineError, EngineErrorKind};
pub use uring::Ring;
pub use volume::{BackingKind, Volume, VolumeOptions};
