//! Online verify: both sides checksum the same extent, chunk by chunk, and
//! the production host compares.
//!
//! ```text
//!  production: under the copy's link lock, no write in flight to the extent:
//!              read the extent locally ─▶ chunk CRCs; queue ChecksumRequest(extent)
//!  copy:       after every earlier frame is applied: read the extent ─▶ ChecksumReply(chunk CRCs)
//!  production: compare ─▶ mismatching chunks ─▶ report (and with repair: mark the regions, resync)
//! ```
//!
//! The request travels in the same ordered stream as the writes, so the copy
//! checksums exactly the writes shipped before it, which are exactly the
//! writes the production host's read saw (none is in flight). A reply is,
//! for each [`CHUNK_BYTES`] chunk of the extent (the last possibly shorter),
//! the first [`CHECKSUM_BYTES`] bytes of its SHA-256: a 128-bit digest, so
//! that even a resync of terabytes that differ everywhere does not skip a
//! chunk by a chance collision (a CRC32 would, once in a few hundred such
//! resyncs).

use sha2::{Digest, Sha256};

/// The bytes one checksum covers.
pub const CHUNK_BYTES: u64 = 64 << 10;
/// The bytes of one chunk's checksum.
pub const CHECKSUM_BYTES: usize = 16;

/// Each chunk's checksum (a SHA-256 prefix), concatenated.
pub fn chunk_checksums(data: &[u8]) -> Vec<u8> {
    data.chunks(CHUNK_BYTES as usize).flat_map(|chunk| Sha256::digest(chunk)[..CHECKSUM_BYTES].to_vec()).collect()
}

/// The byte ranges (offset, length) of the chunks whose checksums differ,
/// for an extent at `offset` of `length` bytes; a reply of the wrong size
/// makes every chunk differ.
pub fn mismatches(offset: u64, length: u64, local: &[u8], remote: &[u8]) -> Vec<(u64, u64)> {
    let chunks = length.div_ceil(CHUNK_BYTES);
    (0..chunks)
        .filter(|&index| {
            let at = index as usize * CHECKSUM_BYTES;
            remote.len() != local.len() || local.get(at..at + CHECKSUM_BYTES) != remote.get(at..at + CHECKSUM_BYTES)
        })
        .map(|index| {
            let start = offset + index * CHUNK_BYTES;
            (start, CHUNK_BYTES.min(offset + length - start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_flipped_byte_names_its_chunk() {
        let mut data = vec![7u8; 3 * CHUNK_BYTES as usize + 10];
        let local = chunk_checksums(&data);
        assert_eq!(local.len(), 4 * CHECKSUM_BYTES);
        data[2 * CHUNK_BYTES as usize + 5] ^= 1;
        let remote = chunk_checksums(&data);
        let length = data.len() as u64;
        assert_eq!(mismatches(4096, length, &local, &remote), [(4096 + 2 * CHUNK_BYTES, CHUNK_BYTES)]);
        assert_eq!(mismatches(4096, length, &local, &local), []);
        let last = mismatches(0, length, &local, &remote[..2 * CHECKSUM_BYTES]);
        assert_eq!(last.len(), 4, "a short reply differs everywhere");
        assert_eq!(last[3], (3 * CHUNK_BYTES, 10));
    }
}
