//! The engine's error type: one enum, with a kind that callers branch on.

use std::io;
use std::path::PathBuf;

/// What went wrong in the engine, for callers that must choose a reaction
/// (an NBD errno, a retry, an exit) without reading strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineErrorKind {
    /// The user asked for something that cannot be (bad size, bad path).
    Config,
    /// io_uring could not be set up on this machine.
    UringUnavailable,
    /// The operating system refused an I/O operation.
    Io,
}

/// An engine error: says what happened, to what, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The volume's configuration is inconsistent with what is on disk.
    #[error("volume {path}: {message}")]
    Config {
        /// The volume path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Opening, creating or inspecting the volume failed.
    #[error("volume {path}: {action}: {source}")]
    Volume {
        /// The volume path.
        path: PathBuf,
        /// What the engine was doing.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// io_uring is not available; the message names the cause and the fix.
    #[error("io_uring is unavailable: {message} ({source})")]
    UringUnavailable {
        /// Cause and fix.
        message: String,
        /// The error from io_uring_setup(2).
        #[source]
        source: io::Error,
    },
    /// An I/O operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What the engine was doing.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl EngineError {
    /// The kind of this error.
    pub fn kind(&self) -> EngineErrorKind {
        match self {
            EngineError::Config { .. } => EngineErrorKind::Config,
            EngineError::Volume { .. } => EngineErrorKind::Config,
            EngineError::UringUnavailable { .. } => EngineErrorKind::UringUnavailable,
            EngineError::Io { .. } => EngineErrorKind::Io,
        }
    }
}
