//! The replication frame: a fixed 64-byte big-endian header, then a payload.
//!
//! ```text
//!  offset size field        meaning
//!       0    4 magic        0x434d5246, "CMRF"
//!       4    1 version      2
//!       5    1 kind         FrameKind
//!       6    2 flags        FrameFlags (FUA, ACK_REQUESTED, SYNCED, BARRIER, EMPTY)
//!       8    8 session      agreed in the handshake; 0 on handshake frames
//!      16    8 sequence     1, 2, 3, … per session and direction
//!      24    8 generation   the volume's generation
//!      32    8 epoch        the fencing token
//!      40    8 offset       volume offset of the extent, bytes
//!      48    4 length       length of the extent, bytes
//!      52    4 payload_len  bytes of payload after the header
//!      56    4 header_crc   CRC32 of bytes 0..56
//!      60    4 frame_crc    CRC32 of bytes 0..60, four zero bytes, then the payload
//!      64      payload
//! ```
//!
//! `header_crc` is the CRC32 of bytes 0..56, so a damaged header — above all a
//! damaged `payload_len` — is refused before any payload is awaited or
//! allocated. `frame_crc` is the CRC32 of the whole header with the
//! `frame_crc` field zeroed, followed by the payload; it is checked by
//! [`verify_payload`] once the payload has arrived. Magic and version sit in
//! the first five bytes in every version, so a peer of another version is
//! told so rather than called corrupt.
//!
//! [`decode_header`] checks everything that the header alone can show: magic,
//! version, header CRC, the payload limit, the kind, the flags and the shape
//! each kind must have (a write's payload is exactly its length, a trim has
//! none, a control frame names no extent). Session, sequence, generation and
//! epoch are judged by [`crate::protocol::sequence::SequenceCheck`], which
//! knows the connection's state.

use crate::buffer::Payload;
use crate::protocol::error::ReplicationError;

/// The first four bytes of every frame: "CMRF".
pub const MAGIC: u32 = 0x434d_5246;
/// The protocol version this build speaks. Version 2 (was 1): a copy's
/// replies may overtake the FlushAck of a Flush whose fsync is still
/// running (`applier.rs`); a version-1 production host would take that
/// for a protocol error, so the two refuse each other by version instead.
pub const VERSION: u8 = 2;
/// The length of a frame header in bytes.
pub const HEADER_LEN: usize = 64;
/// The largest extent one data frame (a write or resync data) may carry.
pub const WRITE_BYTES_MAX: u32 = 32 << 20;
/// The largest payload of a control frame (handshake, acks, flush, heartbeat).
pub const CONTROL_PAYLOAD_MAX: u32 = 4096;
/// The largest payload of an Error frame: a kind code and a message of at
/// most [`crate::protocol::copy_failure::MESSAGE_BYTES_MAX`] bytes.
pub const ERROR_PAYLOAD_MAX: u32 = 1 + crate::protocol::copy_failure::MESSAGE_BYTES_MAX as u32;
/// The largest payload any frame may carry. A header that announces more is
/// refused before anything is allocated for it.
pub const PAYLOAD_MAX: u32 = WRITE_BYTES_MAX + CONTROL_PAYLOAD_MAX;
/// The largest frame, header included, in bytes.
pub const FRAME_BYTES_MAX: usize = HEADER_LEN + PAYLOAD_MAX as usize;

const HEADER_CRC_OFFSET: usize = 56;
const FRAME_CRC_OFFSET: usize = 60;

/// What a frame asks for or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Production → copy: opens the handshake with a nonce and the volume identity.
    Hello = 1,
    /// Copy → production: the copy's nonce and its proof of the secret.
    Challenge = 2,
    /// Production → copy: the production host's proof of the secret.
    Response = 3,
    /// Copy → production: the handshake succeeded; data may flow.
    Accept = 4,
    /// Either way: the handshake failed; the payload says why.
    Refuse = 5,
    /// Production → copy: write the payload at `offset`.
    Write = 16,
    /// Copy → production: a write is applied (durably when it carried FUA).
    WriteAck = 17,
    /// Production → copy: make every applied write durable.
    Flush = 18,
    /// Copy → production: the flush is done.
    FlushAck = 19,
    /// Production → copy: discard `length` bytes at `offset`.
    Trim = 20,
    /// Production → copy: write `length` zero bytes at `offset`.
    WriteZeroes = 21,
    /// Production → copy: a dirty region's contents, sent by resync.
    ResyncData = 32,
    /// Either way: ask for the checksums of the regions in an extent.
    ChecksumRequest = 33,
    /// Either way: the checksums asked for.
    ChecksumReply = 34,
    /// Production → copy: a dirty extent that reads as zeroes, sent by
    /// resync without data; the copy zeroes it the cheapest way (a punched
    /// hole on a file), so a thin copy stays thin.
    ResyncZeroes = 35,
    /// Either way: the connection is alive.
    Heartbeat = 48,
    /// Copy → production: the copy cannot go on (its store is full, say);
    /// the payload is an error kind code and a short UTF-8 message
    /// ([`crate::protocol::copy_failure`]), and the copy closes the
    /// connection after it.
    Error = 49,
}

/// The shape a frame of a given kind must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Carries exactly `length` bytes of data for the extent at `offset`.
    Data,
    /// Names an extent (`length` > 0) and carries no payload.
    Extent,
    /// Names no extent and carries at most [`CONTROL_PAYLOAD_MAX`] bytes.
    Control,
    /// May name an extent and carries at most [`CONTROL_PAYLOAD_MAX`] bytes.
    Acknowledgement,
    /// May name an extent and carries up to [`PAYLOAD_MAX`] bytes.
    Bulk,
    /// Names no extent and carries 2 to [`ERROR_PAYLOAD_MAX`] bytes: a kind
    /// code and a message of at least one byte.
    Report,
}

impl FrameKind {
    /// Every kind, in wire order.
    pub const ALL: [FrameKind; 17] = [
        FrameKind::Hello,
        FrameKind::Challenge,
        FrameKind::Response,
        FrameKind::Accept,
        FrameKind::Refuse,
        FrameKind::Write,
        FrameKind::WriteAck,
        FrameKind::Flush,
        FrameKind::FlushAck,
        FrameKind::Trim,
        FrameKind::WriteZeroes,
        FrameKind::ResyncData,
        FrameKind::ChecksumRequest,
        FrameKind::ChecksumReply,
        FrameKind::ResyncZeroes,
        FrameKind::Heartbeat,
        FrameKind::Error,
    ];

    /// The kind with this wire value, if there is one.
    pub fn from_u8(value: u8) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|kind| *kind as u8 == value)
    }

    /// Whether this kind belongs to the authentication handshake, which runs
    /// before a session exists.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            FrameKind::Hello | FrameKind::Challenge | FrameKind::Response | FrameKind::Accept | FrameKind::Refuse
        )
    }

    fn shape(self) -> Shape {
        match self {
            FrameKind::Write | FrameKind::ResyncData => Shape::Data,
            FrameKind::Trim | FrameKind::WriteZeroes | FrameKind::ResyncZeroes | FrameKind::ChecksumRequest => {
                Shape::Extent
            }
            FrameKind::Hello
            | FrameKind::Challenge
            | FrameKind::Response
            | FrameKind::Accept
            | FrameKind::Refuse
            | FrameKind::Flush
            | FrameKind::Heartbeat => Shape::Control,
            FrameKind::WriteAck | FrameKind::FlushAck => Shape::Acknowledgement,
            FrameKind::ChecksumReply => Shape::Bulk,
            FrameKind::Error => Shape::Report,
        }
    }
}

/// The flags of a frame: a small bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrameFlags(u16);

impl FrameFlags {
    /// No flag.
    pub const NONE: FrameFlags = FrameFlags(0);
    /// Force unit access: the copy makes this write durable before acknowledging it.
    pub const FUA: FrameFlags = FrameFlags(1 << 0);
    /// The sender wants an acknowledgement of this frame.
    pub const ACK_REQUESTED: FrameFlags = FrameFlags(1 << 1);
    /// On a Flush that ends a resync pass: once it is done the copy holds a
    /// whole, crash-consistent image again (its store leaves `syncing`).
    pub const SYNCED: FrameFlags = FrameFlags(1 << 2);
    /// On a write-like frame or a Flush: apply it only after every earlier
    /// frame is applied. The production host sets it when a write shipped
    /// earlier may have been acknowledged to the client before this one was
    /// issued, so the copy never holds the later write without the earlier.
    pub const BARRIER: FrameFlags = FrameFlags(1 << 3);
    /// On Accept: the copy's store holds no data (a regular file with no
    /// data extents) and reads as zeroes throughout.
    pub const EMPTY: FrameFlags = FrameFlags(1 << 4);
    /// On a data frame: the payload is LZ4-compressed (block format) and
    /// expands to exactly `length` bytes. On Accept: the copy decompresses
    /// LZ4 and zstd payloads.
    pub const LZ4: FrameFlags = FrameFlags(1 << 5);
    /// On a data frame: the payload is zstd-compressed and expands to
    /// exactly `length` bytes.
    pub const ZSTD: FrameFlags = FrameFlags(1 << 6);
    /// On the first frame sent after a resync pass began: from this frame
    /// on, until the pass's SYNCED Flush, the copy's store is no consistent
    /// image (the copy keeps its way back to the image before it).
    pub const PASS: FrameFlags = FrameFlags(1 << 7);
    /// Every flag this version knows; a frame with any other bit is refused.
    pub const KNOWN: FrameFlags = FrameFlags(
        Self::FUA.0
            | Self::ACK_REQUESTED.0
            | Self::SYNCED.0
            | Self::BARRIER.0
            | Self::EMPTY.0
            | Self::LZ4.0
            | Self::ZSTD.0
            | Self::PASS.0,
    );
    /// On Accept: the copy decompresses payloads (see [`FrameFlags::LZ4`]).
    pub const DECOMPRESSES: FrameFlags = Self::LZ4;

    /// Whether a compression flag is set.
    pub fn compressed(self) -> bool {
        self.0 & (Self::LZ4.0 | Self::ZSTD.0) != 0
    }

    /// These flags without the compression flags.
    pub fn without_compression(self) -> FrameFlags {
        FrameFlags(self.0 & !(Self::LZ4.0 | Self::ZSTD.0))
    }

    /// The flags with these bits, if every bit is known.
    pub fn from_bits(bits: u16) -> Option<FrameFlags> {
        (bits & !Self::KNOWN.0 == 0).then_some(FrameFlags(bits))
    }

    /// The wire bits.
    pub fn bits(self) -> u16 {
        self.0
    }

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for FrameFlags {
    type Output = FrameFlags;

    fn bitor(self, other: FrameFlags) -> FrameFlags {
        FrameFlags(self.0 | other.0)
    }
}

/// A decoded frame header. The CRCs are not kept: they are checked on decode
/// and recomputed on encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// What the frame is.
    pub kind: FrameKind,
    /// Its flags.
    pub flags: FrameFlags,
    /// The session agreed by the handshake; 0 on handshake frames.
    pub session: u64,
    /// Strictly increasing by one per session and direction, from 1.
    pub sequence: u64,
    /// The volume's generation as the sender knows it.
    pub generation: u64,
    /// The sender's epoch: the fencing token.
    pub epoch: u64,
    /// The volume offset of the extent, in bytes.
    pub offset: u64,
    /// The length of the extent, in bytes.
    pub length: u32,
    /// The length of the payload that follows the header, in bytes.
    pub payload_len: u32,
}

impl FrameHeader {
    /// A header of this kind with every other field zero.
    pub fn new(kind: FrameKind) -> FrameHeader {
        FrameHeader {
            kind,
            flags: FrameFlags::NONE,
            session: 0,
            sequence: 0,
            generation: 0,
            epoch: 0,
            offset: 0,
            length: 0,
            payload_len: 0,
        }
    }
}

/// A whole frame: its header and its payload, CRC already verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header.
    pub header: FrameHeader,
    /// The payload, `header.payload_len` bytes.
    pub payload: Payload,
}

/// The header bytes of a frame carrying `payload`, with both CRCs computed.
///
/// # Panics
/// When `header.payload_len` differs from `payload.len()` (the header would
/// lie about the bytes that follow it) or the payload is over
/// [`PAYLOAD_MAX`] (every peer would refuse it).
pub fn encode_header(header: &FrameHeader, payload: &[u8]) -> [u8; HEADER_LEN] {
    assert_eq!(header.payload_len as usize, payload.len(), "frame header payload_len disagrees with the payload");
    assert!(header.payload_len <= PAYLOAD_MAX, "frame payload of {} bytes is over the limit", header.payload_len);
    let mut bytes = [0u8; HEADER_LEN];
    bytes[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    bytes[4] = VERSION;
    bytes[5] = header.kind as u8;
    bytes[6..8].copy_from_slice(&header.flags.bits().to_be_bytes());
    bytes[8..16].copy_from_slice(&header.session.to_be_bytes());
    bytes[16..24].copy_from_slice(&header.sequence.to_be_bytes());
    bytes[24..32].copy_from_slice(&header.generation.to_be_bytes());
    bytes[32..40].copy_from_slice(&header.epoch.to_be_bytes());
    bytes[40..48].copy_from_slice(&header.offset.to_be_bytes());
    bytes[48..52].copy_from_slice(&header.length.to_be_bytes());
    bytes[52..56].copy_from_slice(&header.payload_len.to_be_bytes());
    let header_crc = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
    bytes[HEADER_CRC_OFFSET..FRAME_CRC_OFFSET].copy_from_slice(&header_crc.to_be_bytes());
    let frame_crc = frame_crc(&bytes, payload);
    bytes[FRAME_CRC_OFFSET..].copy_from_slice(&frame_crc.to_be_bytes());
    bytes
}

/// A whole frame, header then payload, in one buffer.
pub fn encode_frame(header: &FrameHeader, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&encode_header(header, payload));
    bytes.extend_from_slice(payload);
    bytes
}

/// Decode and check a header: magic, version, header CRC, payload limit,
/// kind, flags and the kind's shape. The payload is checked separately by
/// [`verify_payload`] once it has arrived.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, ReplicationError> {
    let magic = read_u32(bytes, 0);
    if magic != MAGIC {
        return Err(ReplicationError::BadMagic { found: magic, expected: MAGIC });
    }
    if bytes[4] != VERSION {
        return Err(ReplicationError::Version { found: bytes[4], supported: VERSION });
    }
    let carried = read_u32(bytes, HEADER_CRC_OFFSET);
    let computed = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
    if carried != computed {
        return Err(ReplicationError::HeaderChecksum { carried, computed });
    }
    let payload_len = read_u32(bytes, 52);
    if payload_len > PAYLOAD_MAX {
        return Err(ReplicationError::TooLarge {
            what: "frame payload",
            bytes: u64::from(payload_len),
            limit: u64::from(PAYLOAD_MAX),
        });
    }
    let kind = FrameKind::from_u8(bytes[5])
        .ok_or_else(|| ReplicationError::protocol(format!("unknown frame kind {}; refused", bytes[5])))?;
    let flag_bits = read_u16(bytes, 6);
    let flags = FrameFlags::from_bits(flag_bits).ok_or_else(|| {
        ReplicationError::protocol(format!("{kind:?} frame has unknown flags {flag_bits:#06x}; refused"))
    })?;
    let header = FrameHeader {
        kind,
        flags,
        session: read_u64(bytes, 8),
        sequence: read_u64(bytes, 16),
        generation: read_u64(bytes, 24),
        epoch: read_u64(bytes, 32),
        offset: read_u64(bytes, 40),
        length: read_u32(bytes, 48),
        payload_len,
    };
    check_shape(&header)?;
    Ok(header)
}

/// Check a payload against its header: its length and the frame CRC.
/// `header_bytes` are the bytes `header` was decoded from.
pub fn verify_payload(
    header: &FrameHeader,
    header_bytes: &[u8; HEADER_LEN],
    payload: &[u8],
) -> Result<(), ReplicationError> {
    if payload.len() != header.payload_len as usize {
        return Err(ReplicationError::protocol(format!(
            "{:?} frame sequence {} announces a payload of {} bytes but {} arrived",
            header.kind,
            header.sequence,
            header.payload_len,
            payload.len()
        )));
    }
    let carried = read_u32(header_bytes, FRAME_CRC_OFFSET);
    let computed = frame_crc(header_bytes, payload);
    if carried != computed {
        return Err(ReplicationError::Checksum { kind: header.kind, sequence: header.sequence, carried, computed });
    }
    Ok(())
}

/// Check that a header has the shape its kind requires.
fn check_shape(header: &FrameHeader) -> Result<(), ReplicationError> {
    let kind = header.kind;
    if header.offset.checked_add(u64::from(header.length)).is_none() {
        return Err(ReplicationError::protocol(format!(
            "{kind:?} frame extent at offset {} of {} bytes runs past the end of any volume",
            header.offset, header.length
        )));
    }
    let broken = match kind.shape() {
        Shape::Data if header.length == 0 || header.length > WRITE_BYTES_MAX => {
            Some(format!("carries {} bytes; a data frame carries 1 to {WRITE_BYTES_MAX} bytes", header.length))
        }
        Shape::Data if header.flags.contains(FrameFlags::LZ4) && header.flags.contains(FrameFlags::ZSTD) => {
            Some("says it is compressed two ways".to_string())
        }
        Shape::Data if header.flags.compressed() && (header.payload_len == 0 || header.payload_len > header.length) => {
            Some(format!("names {} bytes but carries {} compressed", header.length, header.payload_len))
        }
        Shape::Data if !header.flags.compressed() && header.payload_len != header.length => {
            Some(format!("names {} bytes but carries {}", header.length, header.payload_len))
        }
        Shape::Data => None,
        _ if header.flags.compressed() && kind != FrameKind::Accept => {
            Some("is marked compressed, which only data frames may be".to_string())
        }
        Shape::Extent if header.length == 0 || header.payload_len != 0 => {
            Some(format!("must name a non-empty extent and carry no payload (length {})", header.length))
        }
        Shape::Control if header.offset != 0 || header.length != 0 => {
            Some(format!("names an extent (offset {}, length {}) it has no use for", header.offset, header.length))
        }
        Shape::Control | Shape::Acknowledgement if header.payload_len > CONTROL_PAYLOAD_MAX => {
            Some(format!("carries {} bytes, over its limit of {CONTROL_PAYLOAD_MAX}", header.payload_len))
        }
        Shape::Report if header.offset != 0 || header.length != 0 => {
            Some(format!("names an extent (offset {}, length {}) it has no use for", header.offset, header.length))
        }
        Shape::Report if header.payload_len < 2 || header.payload_len > ERROR_PAYLOAD_MAX => Some(format!(
            "carries {} bytes; an error report carries a kind code and a message, 2 to {ERROR_PAYLOAD_MAX} bytes",
            header.payload_len
        )),
        _ => None,
    };
    match broken {
        Some(what) => {
            Err(ReplicationError::protocol(format!("{kind:?} frame sequence {} {what}; refused", header.sequence)))
        }
        None => Ok(()),
    }
}

/// The CRC32 of a header with its `frame_crc` field zeroed, then the payload.
fn frame_crc(header_bytes: &[u8; HEADER_LEN], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header_bytes[..FRAME_CRC_OFFSET]);
    hasher.update(&[0u8; HEADER_LEN - FRAME_CRC_OFFSET]);
    hasher.update(payload);
    hasher.finalize()
}

fn read_u16(bytes: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn read_u64(bytes: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::error::ReplicationErrorKind;

    fn write_header(payload: &[u8]) -> FrameHeader {
        FrameHeader {
            kind: FrameKind::Write,
            flags: FrameFlags::FUA | FrameFlags::ACK_REQUESTED,
            session: 0x1122_3344_5566_7788,
            sequence: 7,
            generation: 3,
            epoch: 9,
            offset: 1 << 20,
            length: payload.len() as u32,
            payload_len: payload.len() as u32,
        }
    }

    /// Rewrite a field of encoded header bytes and fix the header CRC, so the
    /// test reaches the check behind it.
    fn patched(mut bytes: [u8; HEADER_LEN], at: usize, field: &[u8]) -> [u8; HEADER_LEN] {
        bytes[at..at + field.len()].copy_from_slice(field);
        let header_crc = crc32fast::hash(&bytes[..HEADER_CRC_OFFSET]);
        bytes[HEADER_CRC_OFFSET..FRAME_CRC_OFFSET].copy_from_slice(&header_crc.to_be_bytes());
        bytes
    }

    /// A header survives encode then decode unchanged, and its payload verifies.
    #[test]
    fn write_frame_round_trips() {
        let payload = vec![0xab; 4096];
        let header = write_header(&payload);
        let bytes = encode_header(&header, &payload);
        assert_eq!(decode_header(&bytes).unwrap(), header);
        verify_payload(&header, &bytes, &payload).unwrap();
    }

    /// Every kind's wire value maps back to the kind, and no other value maps to one.
    #[test]
    fn kinds_round_trip_through_their_wire_values() {
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::from_u8(kind as u8), Some(kind));
        }
        let known = (0..=u8::MAX).filter(|value| FrameKind::from_u8(*value).is_some()).count();
        assert_eq!(known, FrameKind::ALL.len());
    }

    /// A stream that is not a crossmirror frame is refused as corrupt.
    #[test]
    fn bad_magic_is_corrupt() {
        let bytes = patched(encode_header(&FrameHeader::new(FrameKind::Heartbeat), &[]), 0, b"HTTP");
        assert_eq!(decode_header(&bytes).unwrap_err().kind(), ReplicationErrorKind::Corrupt);
    }

    /// A peer of another protocol version is told so, not called corrupt.
    #[test]
    fn other_version_is_refused_as_version() {
        let bytes = patched(encode_header(&FrameHeader::new(FrameKind::Hello), &[]), 4, &[1]);
        let error = decode_header(&bytes).unwrap_err();
        assert_eq!(error.kind(), ReplicationErrorKind::Version);
        assert!(error.to_string().contains("version 1, this build speaks version 2"), "{error}");
    }

    /// A payload length over the limit is refused from the header alone.
    #[test]
    fn oversized_payload_is_refused_before_allocation() {
        let bytes = encode_header(&FrameHeader::new(FrameKind::ChecksumReply), &[]);
        let bytes = patched(bytes, 52, &(PAYLOAD_MAX + 1).to_be_bytes());
        assert_eq!(decode_header(&bytes).unwrap_err().kind(), ReplicationErrorKind::TooLarge);
    }

    /// An unknown kind and an unknown flag are protocol errors.
    #[test]
    fn unknown_kind_and_flags_are_refused() {
        let bytes = encode_header(&FrameHeader::new(FrameKind::Heartbeat), &[]);
        assert_eq!(decode_header(&patched(bytes, 5, &[99])).unwrap_err().kind(), ReplicationErrorKind::Protocol);
        assert_eq!(
            decode_header(&patched(bytes, 6, &0x8000u16.to_be_bytes())).unwrap_err().kind(),
            ReplicationErrorKind::Protocol
        );
    }

    /// Frames whose fields contradict their kind are refused: a write whose
    /// payload is not its length, a trim with a payload, a flush with an extent.
    #[test]
    fn misshapen_frames_are_refused() {
        let mut write = write_header(&[1, 2, 3]);
        write.length = 4;
        let mut trim = FrameHeader::new(FrameKind::Trim);
        trim.length = 4096;
        trim.payload_len = 1;
        let mut flush = FrameHeader::new(FrameKind::Flush);
        flush.length = 512;
        let mut empty_write = FrameHeader::new(FrameKind::Write);
        empty_write.offset = 4096;
        let mut wrapping = FrameHeader::new(FrameKind::WriteZeroes);
        wrapping.offset = u64::MAX;
        wrapping.length = 1;
        for (header, payload) in
            [(write, vec![1, 2, 3]), (trim, vec![0]), (flush, vec![]), (empty_write, vec![]), (wrapping, vec![])]
        {
            let error = decode_header(&encode_header(&header, &payload)).unwrap_err();
            assert_eq!(error.kind(), ReplicationErrorKind::Protocol, "{header:?}: {error}");
        }
    }

    /// A payload changed in transit fails the frame CRC.
    #[test]
    fn damaged_payload_fails_the_crc() {
        let mut payload = vec![7u8; 512];
        let header = write_header(&payload);
        let bytes = encode_header(&header, &payload);
        payload[100] ^= 1;
        let error = verify_payload(&header, &bytes, &payload).unwrap_err();
        assert_eq!(error.kind(), ReplicationErrorKind::Corrupt);
        assert!(error.to_string().contains("sequence 7"), "{error}");
    }

    /// A damaged frame CRC field is caught by the payload check.
    #[test]
    fn damaged_frame_crc_field_is_caught() {
        let payload = [5u8; 16];
        let header = write_header(&payload);
        let mut bytes = encode_header(&header, &payload);
        bytes[HEADER_LEN - 1] ^= 0x10;
        let decoded = decode_header(&bytes).unwrap();
        assert_eq!(verify_payload(&decoded, &bytes, &payload).unwrap_err().kind(), ReplicationErrorKind::Corrupt);
    }

    /// A compressed data frame carries at most its length, and only data
    /// frames may be compressed, one way.
    #[test]
    fn compression_flags_fit_only_data_frames() {
        let header = |kind, flags, length, payload_len| FrameHeader {
            kind,
            flags,
            session: 1,
            sequence: 1,
            generation: 1,
            epoch: 1,
            offset: 0,
            length,
            payload_len,
        };
        assert!(check_shape(&header(FrameKind::Write, FrameFlags::LZ4, 4096, 100)).is_ok());
        assert!(check_shape(&header(FrameKind::ResyncData, FrameFlags::ZSTD, 4096, 4096)).is_ok());
        for (kind, flags, length, payload_len) in [
            (FrameKind::Write, FrameFlags::LZ4, 4096, 4097),
            (FrameKind::Write, FrameFlags::ZSTD, 4096, 0),
            (FrameKind::Write, FrameFlags::LZ4 | FrameFlags::ZSTD, 4096, 100),
            (FrameKind::Write, FrameFlags::NONE, 4096, 100),
            (FrameKind::Flush, FrameFlags::LZ4, 0, 0),
        ] {
            let refused = check_shape(&header(kind, flags, length, payload_len)).unwrap_err();
            assert!(refused.to_string().contains("refused"), "{refused}");
        }
    }

    /// Flags outside the known set are refused and known ones are kept.
    #[test]
    fn flags_accept_only_known_bits() {
        assert_eq!(FrameFlags::from_bits(3), Some(FrameFlags::FUA | FrameFlags::ACK_REQUESTED));
        assert_eq!(FrameFlags::from_bits(4), Some(FrameFlags::SYNCED));
        assert_eq!(FrameFlags::from_bits(8), Some(FrameFlags::BARRIER));
        assert_eq!(FrameFlags::from_bits(16), Some(FrameFlags::EMPTY));
        assert_eq!(FrameFlags::from_bits(32), Some(FrameFlags::LZ4));
        assert_eq!(FrameFlags::from_bits(64), Some(FrameFlags::ZSTD));
        assert_eq!(FrameFlags::from_bits(128), Some(FrameFlags::PASS));
        assert_eq!(FrameFlags::from_bits(256), None);
        assert!((FrameFlags::FUA | FrameFlags::ACK_REQUESTED).contains(FrameFlags::FUA));
        assert!(!FrameFlags::ACK_REQUESTED.contains(FrameFlags::FUA));
    }
}
