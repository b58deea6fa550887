//! The frontend's error type.

use std::io;

/// Why a connection or the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The peer broke the protocol in a way that ends the connection.
    #[error("protocol violation from {peer}: {message}")]
    Protocol {
        /// The client address.
        peer: String,
        /// What it did.
        message: String,
    },
    /// The socket failed.
    #[error("connection {peer}: {action}: {source}")]
    Io {
        /// The client address.
        peer: String,
        /// What the server was doing.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The engine failed (io_uring setup, volume).
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
}
