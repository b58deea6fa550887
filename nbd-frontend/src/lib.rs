//! The NBD side of crossmirror: a pure protocol codec and a server.
//!
//! ```text
//!  TCP ─▶ handshake (blocking, per connection) ─▶ connection event loop (io_uring)
//!            option.rs / reply.rs                    request.rs parses and validates,
//!                                                    engine::Volume does the I/O,
//!                                                    reply.rs encodes the answers
//! ```
//!
//! [`protocol`] holds the constants of NetworkBlockDevice/nbd `doc/proto.md`;
//! [`option`] and [`request`] are pure parsers that never panic on input;
//! [`reply`] encodes; [`handshake`] drives option haggling over a blocking
//! stream; [`connection`] runs transmission on one io_uring per connection;
//! [`server`] accepts, limits and shuts down.

pub mod connection;
pub mod error;
pub mod handshake;
pub mod option;
pub mod protocol;
pub mod reply;
pub mod request;
pub mod server;

pub use error::NbdError;
pub use server::{Export, Server, ServerConfig};
