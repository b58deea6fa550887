//! Transmission requests: parse the 28-byte header and decide what to do.
//!
//! Pure functions. [`parse_header`] only checks the magic; [`validate`]
//! applies the specification's error rules in a fixed order (flags, then
//! permission, then range), so the errno a client sees is predictable:
//! EINVAL for an unknown command or a flag the command cannot take, EPERM for
//! a write to a read-only export, ENOSPC for a write past the end, EINVAL
//! for any other request past the end, and EOVERFLOW for a READ or WRITE
//! over the advertised maximum payload.

use crate::protocol::*;

/// A request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub command: u16,
    /// Opaque client cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow the header on the wire. Only WRITE
    /// carries a payload; the length is trusted even when the request will be
    /// refused, because the bytes are on the socket either way.
    pub fn payload_len(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// What the connection knows when it validates requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Whether the export is read-only.
    pub read_only: bool,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Whether `base:allocation` was selected.
    pub block_status: bool,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read,
    /// Write the payload at `offset`.
    Write {
        /// Durable before the reply.
        fua: bool,
    },
    /// Close the connection after outstanding requests.
    Disconnect,
    /// Make every completed write durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch a range.
    Cache,
    /// Zero a range.
    WriteZeroes {
        /// Durable before the reply.
        fua: bool,
        /// The range may be deallocated.
        may_punch: bool,
        /// Fail with ENOTSUP unless the zeroing is fast.
        fast_only: bool,
    },
    /// Report allocation of a range.
    BlockStatus {
        /// Only one extent wanted.
        req_one: bool,
    },
}

/// Parse a header; `None` if the magic is wrong (the stream is lost).
pub fn parse_header(bytes: &[u8; REQUEST_HEADER_LEN]) -> Option<RequestHeader> {
    let magic = u32::from_be_bytes(bytes[0..4].try_into().ok()?);
    if magic != REQUEST_MAGIC {
        return None;
    }
    Some(RequestHeader {
        flags: u16::from_be_bytes([bytes[4], bytes[5]]),
        command: u16::from_be_bytes([bytes[6], bytes[7]]),
        cookie: u64::from_be_bytes(bytes[8..16].try_into().ok()?),
        offset: u64::from_be_bytes(bytes[16..24].try_into().ok()?),
        length: u32::from_be_bytes(bytes[24..28].try_into().ok()?),
    })
}

/// Decide what a request is, or which NBD errno refuses it.
pub fn validate(header: &RequestHeader, limits: &Limits) -> Result<Command, u32> {
    let allowed = allowed_flags(header.command, limits).ok_or(EINVAL)?;
    if header.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let fua = header.flags & CMD_FLAG_FUA != 0;
    let command = match header.command {
        CMD_READ => Command::Read,
        CMD_WRITE => Command::Write { fua },
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => return Ok(Command::Flush),
        CMD_TRIM => Command::Trim { fua },
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            fua,
            may_punch: header.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: header.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus { req_one: header.flags & CMD_FLAG_REQ_ONE != 0 },
        _ => return Err(EINVAL),
    };
    let writes = matches!(command, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
    if writes && limits.read_only {
        return Err(EPERM);
    }
    if header.length == 0 {
        return Err(EINVAL);
    }
    if matches!(command, Command::Read | Command::Write { .. }) && header.length > PAYLOAD_MAX {
        return Err(EOVERFLOW);
    }
    let end = header.offset.checked_add(header.length as u64);
    if end.is_none_or(|end| end > limits.size) {
        return Err(match command {
            Command::Write { .. } | Command::WriteZeroes { .. } => ENOSPC,
            _ => EINVAL,
        });
    }
    Ok(command)
}

fn allowed_flags(command: u16, limits: &Limits) -> Option<u16> {
    let df = if limits.structured { CMD_FLAG_DF } else { 0 };
    Some(
        CMD_FLAG_FUA
            | match command {
                CMD_READ => df,
                CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
                CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_BLOCK_STATUS if limits.block_status => CMD_FLAG_REQ_ONE,
                CMD_BLOCK_STATUS => return None,
                _ => return None,
            },
    )
}

/// Encode a header (for tests and fuzzing).
pub fn encode_header(header: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut bytes = [0u8; REQUEST_HEADER_LEN];
    bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    bytes[4..6].copy_from_slice(&header.flags.to_be_bytes());
    bytes[6..8].copy_from_slice(&header.command.to_be_bytes());
    bytes[8..16].copy_from_slice(&header.cookie.to_be_bytes());
    bytes[16..24].copy_from_slice(&header.offset.to_be_bytes());
    bytes[24..28].copy_from_slice(&header.length.to_be_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits { size: 1 << 20, read_only: false, structured: true, block_status: true };

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 7, offset, length }
    }

    #[test]
    fn errors_follow_the_specification() {
        assert_eq!(validate(&header(CMD_WRITE, 0, 1 << 20, 1), &LIMITS), Err(ENOSPC));
        assert_eq!(validate(&header(CMD_WRITE_ZEROES, 0, (1 << 20) - 1, 2), &LIMITS), Err(ENOSPC));
        assert_eq!(validate(&header(CMD_READ, 0, 1 << 20, 1), &LIMITS), Err(EINVAL));
        assert_eq!(validate(&header(CMD_TRIM, 0, u64::MAX, 1), &LIMITS), Err(EINVAL));
        assert_eq!(validate(&header(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &LIMITS), Err(EINVAL));
        assert_eq!(validate(&header(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &LIMITS), Err(EINVAL));
        assert_eq!(validate(&header(99, 0, 0, 1), &LIMITS), Err(EINVAL));
        let read_only = Limits { read_only: true, ..LIMITS };
        assert_eq!(validate(&header(CMD_WRITE, 0, 0, 1), &read_only), Err(EPERM));
        assert_eq!(validate(&header(CMD_TRIM, 0, 0, 1), &read_only), Err(EPERM));
        assert_eq!(validate(&header(CMD_READ, CMD_FLAG_FUA, 0, 1), &read_only), Ok(Command::Read));
    }

    #[test]
    fn block_status_needs_a_selected_context() {
        let limits = Limits { block_status: false, ..LIMITS };
        assert_eq!(validate(&header(CMD_BLOCK_STATUS, 0, 0, 512), &limits), Err(EINVAL));
        assert_eq!(
            validate(&header(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &LIMITS),
            Ok(Command::BlockStatus { req_one: true })
        );
    }

    proptest! {
        /// Any 28 bytes parse or are refused without panicking, and a valid
        /// header round-trips through the encoder.
        #[test]
        fn headers_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let original = RequestHeader { flags, command, cookie, offset, length };
            prop_assert_eq!(parse_header(&encode_header(&original)), Some(original));
        }

        /// Validation never accepts a request that reaches past the end or
        /// carries a flag its command cannot take.
        #[test]
        fn accepted_requests_are_in_range(bytes in proptest::array::uniform28(any::<u8>()), size in 1u64..1 << 40) {
            let mut bytes = bytes;
            bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let parsed = parse_header(&bytes).unwrap();
            let limits = Limits { size, ..LIMITS };
            if let Ok(command) = validate(&parsed, &limits) {
                if !matches!(command, Command::Flush | Command::Disconnect) {
                    prop_assert!(parsed.offset + parsed.length as u64 <= size);
                    prop_assert!(parsed.length > 0);
                }
                prop_assert!(parsed.flags & !0b11111 == 0);
            }
        }
    }
}
