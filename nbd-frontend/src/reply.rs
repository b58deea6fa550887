//! Encoders for option replies and transmission replies.
//!
//! Transmission replies are split into a header (built here) and, for READ,
//! the data buffer that follows it on the wire; the connection sends both
//! with one vectored write and no copy of the data.

use crate::protocol::*;

/// An option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The NBD_INFO_EXPORT payload: type, size, transmission flags.
pub fn info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut data = INFO_EXPORT.to_be_bytes().to_vec();
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&transmission_flags.to_be_bytes());
    data
}

/// An NBD_INFO_NAME or NBD_INFO_DESCRIPTION payload.
pub fn info_text(info_type: u16, text: &str) -> Vec<u8> {
    let mut data = info_type.to_be_bytes().to_vec();
    data.extend_from_slice(text.as_bytes());
    data
}

/// The NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut data = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    data.extend_from_slice(&minimum.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&maximum.to_be_bytes());
    data
}

/// A fixed-capacity reply header, kept inline so a batch of replies needs
/// no allocation per reply.
#[derive(Clone, Copy)]
pub struct ReplyHeader {
    bytes: [u8; 32],
    len: u8,
}

impl ReplyHeader {
    fn from_parts(parts: &[&[u8]]) -> ReplyHeader {
        let mut header = ReplyHeader { bytes: [0; 32], len: 0 };
        for part in parts {
            let start = header.len as usize;
            header.bytes[start..start + part.len()].copy_from_slice(part);
            header.len += part.len() as u8;
        }
        header
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// A simple reply: magic, error, cookie (read data follows if any).
    pub fn simple(error: u32, cookie: u64) -> ReplyHeader {
        Self::from_parts(&[&SIMPLE_REPLY_MAGIC.to_be_bytes(), &error.to_be_bytes(), &cookie.to_be_bytes()])
    }

    /// A structured chunk header with `payload_len` bytes to follow.
    pub fn chunk(flags: u16, chunk_type: u16, cookie: u64, payload_len: u32) -> ReplyHeader {
        Self::from_parts(&[
            &STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            &flags.to_be_bytes(),
            &chunk_type.to_be_bytes(),
            &cookie.to_be_bytes(),
            &payload_len.to_be_bytes(),
        ])
    }

    /// The final OFFSET_DATA chunk header for `data_len` bytes at `offset`
    /// (the data follows).
    pub fn offset_data(cookie: u64, offset: u64, data_len: u32) -> ReplyHeader {
        let chunk = Self::chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_len);
        Self::from_parts(&[chunk.as_bytes(), &offset.to_be_bytes()])
    }
}

/// A final structured ERROR chunk, with a message for people.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(1024)];
    let header = ReplyHeader::chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + message.len() as u32);
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// A final BLOCK_STATUS chunk for `context_id` with `(length, flags)` extents.
pub fn block_status_chunk(cookie: u64, context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let header = ReplyHeader::chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * extents.len() as u32);
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(&context_id.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_reply_layout() {
        let header = ReplyHeader::simple(EINVAL, 0x0102_0304_0506_0708);
        assert_eq!(header.as_bytes(), &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn offset_data_header_counts_the_offset() {
        let header = ReplyHeader::offset_data(9, 4096, 512);
        let bytes = header.as_bytes();
        assert_eq!(bytes.len(), 28);
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 520);
        assert_eq!(u64::from_be_bytes(bytes[20..28].try_into().unwrap()), 4096);
    }
}
