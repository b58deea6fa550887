//! The production host's end of one replication connection, blocking: dial
//! a copy host, authenticate (challenge–response over the shared secret),
//! then send frames and read the copy's answers.
//!
//! ```text
//!  connect (timeout) ─▶ socket options ─▶ Hello ─▶ Challenge ─▶ Response ─▶ Accept ─▶ CopyConnection
//! ```
//!
//! The replicator's link threads use it, and so do the system tests that
//! speak to a copy host directly (forged frames, replays).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::protocol::auth::{
    random_nonce, HandshakeMessage, HandshakeOutcome, ProductionHandshake, Session, StoreToken, VolumeIdentity,
    STORE_TOKEN_UNKNOWN,
};
use crate::protocol::frame::{encode_header, Frame, FrameFlags, FrameHeader, FrameKind, HEADER_LEN};
use crate::protocol::{FrameDecoder, ReplicationError, Secret, SendSequence};

/// Kernel socket buffer sizes: room for a few large frames in flight.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;
/// TCP keepalive: a silent peer is probed after this idle time…
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// …every this often…
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// …and declared dead after this many unanswered probes.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// The most bytes read from the socket at once.
const READ_CHUNK_BYTES: usize = 256 << 10;

/// The epoch `crossmirror serve` runs at (a group node passes its record's).
pub const STANDALONE_EPOCH: u64 = 1;

/// A TCP connection to `address` from `source` (when given and of the same
/// family), within `timeout`.
fn connect_socket(address: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let Some(source) = source.filter(|source| source.is_ipv4() == address.is_ipv4() && !source.is_unspecified()) else {
        return TcpStream::connect_timeout(&address, timeout);
    };
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&address.into(), timeout)?;
    Ok(socket.into())
}

/// Set the options every replication socket uses: no Nagle delay (acks and
/// small writes leave at once), large buffers, keepalive so a dead peer is
/// noticed even when no frame is due.
pub fn configure_socket(stream: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)
}

/// An authenticated connection to a copy host.
#[derive(Debug)]
pub struct CopyConnection {
    stream: TcpStream,
    session: Session,
    decoder: FrameDecoder,
    read_buffer: Vec<u8>,
    sequence: SendSequence,
    copy_holds_no_data: bool,
    copy_decompresses: bool,
    copy_store: StoreToken,
}

impl CopyConnection {
    /// Dial `address`, authenticate with `secret` and offer the volume
    /// `identity`. The whole handshake must finish within `timeout`; later
    /// a send that makes no progress for `write_timeout` fails.
    pub fn connect(
        address: SocketAddr,
        secret: &Secret,
        identity: VolumeIdentity,
        timeout: Duration,
        write_timeout: Duration,
    ) -> Result<CopyConnection, ReplicationError> {
        CopyConnection::connect_from(address, None, STANDALONE_EPOCH, secret, identity, timeout, write_timeout)
    }

    /// [`CopyConnection::connect`] from the local address `source` (any
    /// port; `None`: the system picks).
    pub fn connect_from(
        address: SocketAddr,
        source: Option<IpAddr>,
        epoch: u64,
        secret: &Secret,
        identity: VolumeIdentity,
        timeout: Duration,
        write_timeout: Duration,
    ) -> Result<CopyConnection, ReplicationError> {
        let deadline = Instant::now() + timeout;
        let io_error = |action: &'static str| move |source| ReplicationError::Io { action, source };
        let stream = connect_socket(address, source, timeout).map_err(io_error("connect to the copy host"))?;
        configure_socket(&stream).map_err(io_error("set socket options"))?;
        let mut connection = CopyConnection {
            stream,
            session: Session { id: 0, identity, epoch },
            decoder: FrameDecoder::new(),
            read_buffer: vec![0; READ_CHUNK_BYTES],
            sequence: SendSequence::new(),
            copy_holds_no_data: false,
            copy_decompresses: false,
            copy_store: STORE_TOKEN_UNKNOWN,
        };
        let (mut handshake, hello) = ProductionHandshake::start(secret, identity, random_nonce()?, epoch);
        connection.send_message(&hello)?;
        loop {
            let frame = connection.receive_until(Some(deadline))?;
            let message = HandshakeMessage::from_frame(&frame)?;
            if let HandshakeMessage::Accept { store } = message {
                connection.copy_holds_no_data = frame.header.flags.contains(FrameFlags::EMPTY);
                connection.copy_decompresses = frame.header.flags.contains(FrameFlags::DECOMPRESSES);
                connection.copy_store = store;
            }
            let step = handshake.on_message(&message);
            if let Some(reply) = &step.send {
                connection.send_message(reply)?;
            }
            match step.outcome {
                HandshakeOutcome::Continue => {}
                HandshakeOutcome::Failed(error) => return Err(error),
                HandshakeOutcome::Established(session) => {
                    connection.session = session;
                    connection.stream.set_read_timeout(None).map_err(io_error("clear the read timeout"))?;
                    connection
                        .stream
                        .set_write_timeout(Some(write_timeout))
                        .map_err(io_error("set the write timeout"))?;
                    return Ok(connection);
                }
            }
        }
    }

    /// The copy store's token, from its Accept.
    pub fn copy_store(&self) -> StoreToken {
        self.copy_store
    }

    /// Whether the copy said, in its Accept, that its store holds no data.
    pub fn copy_holds_no_data(&self) -> bool {
        self.copy_holds_no_data
    }

    /// Whether the copy said, in its Accept, that it decompresses payloads.
    pub fn copy_decompresses(&self) -> bool {
        self.copy_decompresses
    }

    /// The session agreed in the handshake.
    pub fn session(&self) -> Session {
        self.session
    }

    /// The socket, e.g. to clone it for a reader thread or shut it down.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// A data header of `kind` for this session with the next sequence
    /// number, fenced by `generation` and `epoch`.
    pub fn header(&mut self, kind: FrameKind, flags: FrameFlags, generation: u64, epoch: u64) -> FrameHeader {
        FrameHeader {
            kind,
            flags,
            session: self.session.id,
            sequence: self.sequence.take(),
            generation,
            epoch,
            offset: 0,
            length: 0,
            payload_len: 0,
        }
    }

    /// Send one frame: its header, then `payload`, in one system call when
    /// the kernel takes it all.
    pub fn send(&mut self, header: &FrameHeader, payload: &[u8]) -> Result<(), ReplicationError> {
        self.send_batch(&[(*header, payload)])
    }

    /// Send several frames with as few system calls as the kernel allows:
    /// one writev carries many headers and payloads.
    pub fn send_batch(&mut self, frames: &[(FrameHeader, &[u8])]) -> Result<(), ReplicationError> {
        let headers: Vec<[u8; HEADER_LEN]> =
            frames.iter().map(|(header, payload)| encode_header(header, payload)).collect();
        let mut slices: Vec<io::IoSlice<'_>> = Vec::with_capacity(frames.len() * 2);
        for (header, (_, payload)) in headers.iter().zip(frames) {
            slices.push(io::IoSlice::new(header));
            if !payload.is_empty() {
                slices.push(io::IoSlice::new(payload));
            }
        }
        write_all_slices(&mut self.stream, &mut slices)
            .map_err(|source| ReplicationError::Io { action: "send frames to the copy host", source })
    }

    /// Send raw bytes as they are: for tests that forge frames.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.stream.write_all(bytes).map_err(|source| ReplicationError::Io { action: "send bytes", source })
    }

    /// The next frame from the copy host; blocks, up to the stream's read
    /// timeout if one is set (then an error).
    pub fn receive(&mut self) -> Result<Frame, ReplicationError> {
        self.receive_until(None)
    }

    fn send_message(&mut self, message: &HandshakeMessage) -> Result<(), ReplicationError> {
        let (header, payload) = message.to_frame();
        self.send(&header, &payload)
    }

    fn receive_until(&mut self, deadline: Option<Instant>) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = self.decoder.pop()? {
                return Ok(frame);
            }
            if let Some(deadline) = deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(ReplicationError::Io {
                        action: "wait for the copy host's handshake answer",
                        source: io::Error::from(io::ErrorKind::TimedOut),
                    });
                }
                self.stream
                    .set_read_timeout(Some(remaining))
                    .map_err(|source| ReplicationError::Io { action: "set the read timeout", source })?;
            }
            let received = match self.stream.read(&mut self.read_buffer) {
                Ok(0) => {
                    return Err(ReplicationError::Io {
                        action: "read from the copy host",
                        source: io::Error::new(io::ErrorKind::UnexpectedEof, "the copy host closed the connection"),
                    })
                }
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                // With a deadline the loop above says when it passed; without
                // one, the stream's own read timeout did.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && deadline.is_some() => continue,
                Err(source) => return Err(ReplicationError::Io { action: "read from the copy host", source }),
            };
            self.decoder.push(&self.read_buffer[..received])?;
        }
    }
}

/// Write every slice completely, in order, with as few writev calls as the
/// kernel allows (at most 1024 slices per call).
fn write_all_slices(stream: &mut TcpStream, mut slices: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let count = slices.len().min(IOV_MAX);
        match stream.write_vectored(&slices[..count]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the socket took no bytes")),
            Ok(written) => io::IoSlice::advance_slices(&mut slices, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
