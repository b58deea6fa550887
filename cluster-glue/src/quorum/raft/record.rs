//! The log file's record framing: `u32 length | u32 CRC32(body) | body`,
//! little-endian, the body JSON. Decoding stops at the first record that is
//! short, over the size limit, fails its checksum or does not parse: a torn
//! or corrupt tail (a crash mid-append) is reported with the offset where
//! the good prefix ends, so the opener can cut it there.

use serde::{Deserialize, Serialize};

use super::types::TypeConfig;

type LogId = openraft::LogId<u64>;
type Entry = openraft::Entry<TypeConfig>;

/// A record's header: length and checksum.
const HEADER_BYTES: usize = 8;

/// No record is larger: entries hold a few KB.
pub(crate) const RECORD_BYTES_MAX: usize = 16 << 20;

/// One change to the log, in the order made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Record {
    /// An appended entry; it replaces any entry at or after its index.
    Entry(Entry),
    /// Entries at and after this index were removed.
    Truncate(u64),
    /// Entries up to and including this log id were purged.
    Purged(LogId),
}

/// Frame one record.
pub(crate) fn encode(record: &Record, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let body = serde_json::to_vec(record)?;
    assert!(body.len() <= RECORD_BYTES_MAX, "log record of {} bytes is over the limit", body.len());
    let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// The records found in a log file's bytes.
#[derive(Debug)]
pub(crate) struct Decoded {
    /// The good records, in order.
    pub records: Vec<Record>,
    /// Where the good prefix ends.
    pub valid_bytes: usize,
    /// Why decoding stopped before the end, if it did.
    pub bad_tail: Option<String>,
}

/// Decode records until the end or the first bad one.
pub(crate) fn decode(bytes: &[u8]) -> Decoded {
    let mut records = Vec::new();
    let mut offset = 0;
    let bad_tail = loop {
        let rest = &bytes[offset..];
        if rest.is_empty() {
            break None;
        }
        match decode_one(rest) {
            Ok((record, used)) => {
                records.push(record);
                offset += used;
            }
            Err(why) => break Some(format!("at byte {offset}: {why}")),
        }
    };
    Decoded { records, valid_bytes: offset, bad_tail }
}

fn decode_one(bytes: &[u8]) -> Result<(Record, usize), String> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_BYTES>() else {
        return Err(format!("torn header ({} bytes)", bytes.len()));
    };
    let (length, checksum) = header.split_at(4);
    let length = u32::from_le_bytes([length[0], length[1], length[2], length[3]]) as usize;
    let checksum = u32::from_le_bytes([checksum[0], checksum[1], checksum[2], checksum[3]]);
    if length > RECORD_BYTES_MAX {
        return Err(format!("record length {length} over the limit {RECORD_BYTES_MAX}"));
    }
    let Some(body) = rest.get(..length) else {
        return Err(format!("torn record: {length} bytes announced, {} present", rest.len()));
    };
    if crc32fast::hash(body) != checksum {
        return Err("checksum mismatch".to_string());
    }
    let record = serde_json::from_slice(body).map_err(|error| format!("undecodable record: {error}"))?;
    Ok((record, HEADER_BYTES + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three_records() -> Vec<u8> {
        let mut bytes = Vec::new();
        for index in 1..=3 {
            encode(&Record::Truncate(index), &mut bytes).expect("encode");
        }
        bytes
    }

    /// Every bad tail is cut at the record where it starts; earlier records stay.
    #[test]
    fn decode_stops_at_the_first_bad_record() {
        let bytes = three_records();
        let whole = decode(&bytes);
        assert_eq!(whole.records.len(), 3);
        assert_eq!(whole.valid_bytes, bytes.len());
        assert!(whole.bad_tail.is_none());

        let second_ends = {
            let mut two = Vec::new();
            encode(&Record::Truncate(1), &mut two).expect("encode");
            encode(&Record::Truncate(2), &mut two).expect("encode");
            two.len()
        };
        for cut in [bytes.len() - 1, second_ends + 3, second_ends + 9] {
            let decoded = decode(&bytes[..cut]);
            assert_eq!(decoded.records.len(), 2, "cut at {cut}");
            assert_eq!(decoded.valid_bytes, second_ends);
            assert!(decoded.bad_tail.is_some());
        }

        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        let decoded = decode(&flipped);
        assert_eq!(decoded.records.len(), 2);
        assert_eq!(decoded.valid_bytes, second_ends);

        let mut huge = bytes[..second_ends].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 12]);
        let decoded = decode(&huge);
        assert_eq!(decoded.records.len(), 2);
        assert_eq!(decoded.valid_bytes, second_ends);
    }
}
