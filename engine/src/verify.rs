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
//! writes the production host's read saw (none is in flight). A reply is the
//! big-endian CRC32 of each [`CHUNK_BYTES`] chunk of the extent, the last
//! chunk possibly shorter.

/// The bytes one checksum covers.
pub const CHUNK_BYTES: u64 = 64 << 10;

/// The CRC32 of each chunk of `data`, big-endian, concatenated.
pub fn chunk_checksums(data: &[u8]) -> Vec<u8> {
    data.chunks(CHUNK_BYTES as usize).flat_map(|chunk| crc32fast::hash(chunk).to_be_bytes()).collect()
}

/// The byte ranges (offset, length) of the chunks whose checksums differ,
/// for an extent at `offset` of `length` bytes; a reply of the wrong size
/// makes every chunk differ.
pub fn mismatches(offset: u64, length: u64, local: &[u8], remote: &[u8]) -> Vec<(u64, u64)> {
    let chunks = length.div_ceil(CHUNK_BYTES);
    (0..chunks)
        .filter(|&index| {
            let at = index as usize * 4;
            remote.len() != local.len() || local.get(at..at + 4) != remote.get(at..at + 4)
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
        assert_eq!(local.len(), 4 * 4);
        data[2 * CHUNK_BYTES as usize + 5] ^= 1;
        let remote = chunk_checksums(&data);
        let length = data.len() as u64;
        assert_eq!(mismatches(4096, length, &local, &remote), [(4096 + 2 * CHUNK_BYTES, CHUNK_BYTES)]);
        assert_eq!(mismatches(4096, length, &local, &local), []);
        let last = mismatches(0, length, &local, &remote[..8]);
        assert_eq!(last.len(), 4, "a short reply differs everywhere");
        assert_eq!(last[3], (3 * CHUNK_BYTES, 10));
    }
}
