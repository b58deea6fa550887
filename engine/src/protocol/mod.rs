//! The replication protocol between a production host and its copy hosts:
//! frames, their streaming decoder, per-connection ordering and fencing, the
//! shared secret and the authentication handshake. Everything here is pure —
//! bytes and messages in, bytes, messages and verdicts out — so the
//! replicator and receiver that do the socket I/O stay thin.
//!
//! ```text
//!  socket bytes ──▶ FrameDecoder ──▶ Frame ──┬─ handshake ─▶ ProductionHandshake / CopyHandshake ─▶ Session
//!                   (magic, version,         │
//!                    CRCs, limits)           └─ data ─────▶ SequenceCheck (session, sequence,
//!                                                           generation, epoch) ─▶ apply
//! ```

pub mod auth;
pub mod compress;
pub mod copy_failure;
pub mod decoder;
pub mod error;
pub mod frame;
pub mod secret;
pub mod sequence;

pub use compress::Compression;
pub use decoder::FrameDecoder;
pub use error::{ReplicationError, ReplicationErrorKind};
pub use frame::{decode_header, encode_header, verify_payload, Frame, FrameFlags, FrameHeader, FrameKind};
pub use secret::{load_secret, Secret};
pub use sequence::{SendSequence, SequenceCheck};
