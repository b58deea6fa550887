//! The replication layer's error type: one enum, with a kind that counters,
//! logs and reactions branch on.
//!
//! Every refusal of a frame or of a peer ends up here: a corrupt frame, an
//! unknown version, a replay, a frame from another session, a fenced epoch,
//! an oversized payload, a failed authentication. The messages say what
//! happened, to what, and what to do; [`ReplicationError::kind`] says which
//! counter to bump (`frames_rejected` by kind) without reading strings.

use std::io;
use std::path::PathBuf;

use crate::protocol::frame::FrameKind;

/// Which class of failure a [`ReplicationError`] is, for counters, log fields
/// and the caller's reaction (drop the connection, refuse the peer, exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicationErrorKind {
    /// The bytes are not an intact frame: bad magic or a CRC mismatch.
    Corrupt,
    /// The peer speaks a protocol version this build does not.
    Version,
    /// A frame arrived out of order: a replay, a duplicate or a gap.
    Replay,
    /// A frame carries another session's identifier.
    WrongSession,
    /// A frame carries an epoch or generation older than this side accepts.
    Fenced,
    /// A frame or buffer is over its limit.
    TooLarge,
    /// The peer failed to prove it knows the shared secret, or refused ours.
    AuthFailed,
    /// The peer's volume is not this volume (another identity or size).
    Identity,
    /// A well-formed frame that breaks the protocol's rules.
    Protocol,
    /// The shared secret could not be loaded or is unfit for use.
    Secret,
    /// The operating system failed a request (reading a file, drawing randomness).
    Io,
}

/// A replication error: says what happened, to what, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The header does not start with the frame magic.
    #[error("frame refused: bad magic {found:#010x} (expected {expected:#010x}); the peer is not a crossmirror node or the stream lost its framing, so drop the connection")]
    BadMagic {
        /// The magic that was read.
        found: u32,
        /// The magic every frame starts with.
        expected: u32,
    },
    /// The CRC over header and payload does not match.
    #[error("frame refused: {kind:?} frame sequence {sequence} fails its CRC (carried {carried:#010x}, computed {computed:#010x}); it was corrupted in transit and was not applied, so drop the connection and let it reconnect")]
    Checksum {
        /// The frame's kind as its header says.
        kind: FrameKind,
        /// The frame's sequence number as its header says.
        sequence: u64,
        /// The CRC the frame carried.
        carried: u32,
        /// The CRC of the bytes received.
        computed: u32,
    },
    /// The header CRC does not match: the header was damaged in transit.
    #[error("frame refused: its header fails its CRC (carried {carried:#010x}, computed {computed:#010x}); it was corrupted in transit and nothing in it was used, so drop the connection and let it reconnect")]
    HeaderChecksum {
        /// The header CRC the frame carried.
        carried: u32,
        /// The CRC of the header bytes received.
        computed: u32,
    },
    /// The header names a protocol version this build does not speak.
    #[error("frame refused: protocol version {found}, this build speaks version {supported}; upgrade the older of the two nodes")]
    Version {
        /// The version the frame carries.
        found: u8,
        /// The version this build speaks.
        supported: u8,
    },
    /// The sequence number is not greater than the last one accepted.
    #[error("frame refused: {kind:?} frame sequence {received} was already seen (expected {expected}); a replayed or duplicated frame is never applied")]
    Replayed {
        /// The frame's kind.
        kind: FrameKind,
        /// The sequence number the frame carries.
        received: u64,
        /// The sequence number that was due.
        expected: u64,
    },
    /// The sequence number skips ahead of the one due.
    #[error("frame refused: {kind:?} frame sequence {received} skips ahead of {expected}; frames were lost or injected, so drop the connection and resync")]
    SequenceGap {
        /// The frame's kind.
        kind: FrameKind,
        /// The sequence number the frame carries.
        received: u64,
        /// The sequence number that was due.
        expected: u64,
    },
    /// The frame belongs to another session than this connection's.
    #[error("frame refused: {kind:?} frame carries session {received:#018x}, this connection's session is {expected:#018x}; frames from another connection are never applied")]
    WrongSession {
        /// The frame's kind.
        kind: FrameKind,
        /// The session the frame carries.
        received: u64,
        /// This connection's session.
        expected: u64,
    },
    /// The frame's epoch is older than the highest epoch promised.
    #[error("frame refused: {kind:?} frame carries epoch {received}, but epoch {promised} was already promised; the sender was deposed and must stop serving")]
    Fenced {
        /// The frame's kind.
        kind: FrameKind,
        /// The epoch the frame carries.
        received: u64,
        /// The highest epoch this side has promised.
        promised: u64,
    },
    /// The copy host refused this host's Hello: it promised a higher epoch
    /// (another production host took over).
    #[error("the copy host refused epoch {epoch}: it promised a higher one, so another production host took over; this host was deposed and must stop serving")]
    Deposed {
        /// The epoch this host offered.
        epoch: u64,
    },
    /// The frame's generation is older than the volume's.
    #[error("frame refused: {kind:?} frame carries generation {received}, the volume is at generation {current}; the sender holds an old copy and must resync before it writes")]
    StaleGeneration {
        /// The frame's kind.
        kind: FrameKind,
        /// The generation the frame carries.
        received: u64,
        /// The generation this side holds.
        current: u64,
    },
    /// A payload, frame or buffer is over its limit.
    #[error("{what} of {bytes} bytes is over the limit of {limit} bytes; refused before allocating")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size in bytes.
        bytes: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The peer failed to authenticate, or refused to authenticate us.
    #[error("authentication failed: {message}")]
    AuthFailed {
        /// What failed and what to check.
        message: String,
    },
    /// The peer's volume identity differs from ours.
    #[error("peer refused: {message}")]
    Identity {
        /// Both identities and what to do.
        message: String,
    },
    /// A frame that is well formed but not allowed here.
    #[error("protocol error: {message}")]
    Protocol {
        /// What rule was broken, by which frame.
        message: String,
    },
    /// The shared secret file is unfit for use.
    #[error("secret file {path}: {message}")]
    Secret {
        /// The secret file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Reading the secret file failed.
    #[error("secret file {path}: {action}: {source}")]
    SecretIo {
        /// The secret file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The operating system could not supply random bytes.
    #[error("drawing a random nonce failed: {message}; the handshake cannot go on without one")]
    Random {
        /// The error from the random source.
        message: String,
    },
    /// A socket operation with the peer failed.
    #[error("replication connection: {action}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl ReplicationError {
    /// The kind of this error.
    pub fn kind(&self) -> ReplicationErrorKind {
        match self {
            ReplicationError::BadMagic { .. }
            | ReplicationError::HeaderChecksum { .. }
            | ReplicationError::Checksum { .. } => ReplicationErrorKind::Corrupt,
            ReplicationError::Version { .. } => ReplicationErrorKind::Version,
            ReplicationError::Replayed { .. } | ReplicationError::SequenceGap { .. } => ReplicationErrorKind::Replay,
            ReplicationError::WrongSession { .. } => ReplicationErrorKind::WrongSession,
            ReplicationError::Fenced { .. }
            | ReplicationError::Deposed { .. }
            | ReplicationError::StaleGeneration { .. } => ReplicationErrorKind::Fenced,
            ReplicationError::TooLarge { .. } => ReplicationErrorKind::TooLarge,
            ReplicationError::AuthFailed { .. } => ReplicationErrorKind::AuthFailed,
            ReplicationError::Identity { .. } => ReplicationErrorKind::Identity,
            ReplicationError::Protocol { .. } => ReplicationErrorKind::Protocol,
            ReplicationError::Secret { .. } => ReplicationErrorKind::Secret,
            ReplicationError::SecretIo { .. } | ReplicationError::Random { .. } | ReplicationError::Io { .. } => {
                ReplicationErrorKind::Io
            }
        }
    }

    /// A protocol error with the given message.
    pub(crate) fn protocol(message: impl Into<String>) -> ReplicationError {
        ReplicationError::Protocol { message: message.into() }
    }

    /// An authentication failure with the given message.
    pub(crate) fn auth_failed(message: impl Into<String>) -> ReplicationError {
        ReplicationError::AuthFailed { message: message.into() }
    }
}
