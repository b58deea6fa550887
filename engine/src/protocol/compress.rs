//! Compression of data frames on the replication link (issue 13): a copy
//! across a WAN gets its writes and resync data compressed when that makes
//! them smaller, with LZ4 (fast, for links of a gigabit and more) or zstd
//! (smaller, for slower links).
//!
//! ```text
//!  copy's Accept carries DECOMPRESSES ─▶ production compresses per copy (--mirror …,compress=lz4)
//!  Write / ResyncData payload ─▶ compressed, only if smaller ─▶ flag LZ4 or ZSTD, payload_len < length
//!  copy: frame CRC checked ─▶ decompressed to exactly `length` bytes, or refused
//! ```
//!
//! The frame's `length` stays the extent's; `payload_len` is the compressed
//! size. Decompression is bounded by `length` (at most
//! [`crate::protocol::frame::WRITE_BYTES_MAX`]): a payload that expands past
//! it, or short of it, is refused, so a forged frame cannot make a copy
//! allocate more than a plain write would.

use std::time::Instant;

use crate::protocol::error::ReplicationError;
use crate::protocol::frame::FrameFlags;

/// How a copy's data frames are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Sent as they are.
    #[default]
    None,
    /// LZ4 (block format).
    Lz4,
    /// zstd at this level (1 to 19; 3 is zstd's default).
    Zstd {
        /// The compression level.
        level: i32,
    },
}

/// zstd's level when `compress=zstd` names none.
pub const ZSTD_LEVEL_DEFAULT: i32 = 3;

impl Compression {
    /// Parse `none`, `lz4`, `zstd` or `zstd:LEVEL`.
    pub fn parse(text: &str) -> Result<Compression, String> {
        match text {
            "none" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd { level: ZSTD_LEVEL_DEFAULT }),
            other => match other.strip_prefix("zstd:").map(str::parse::<i32>) {
                Some(Ok(level)) if (1..=19).contains(&level) => Ok(Compression::Zstd { level }),
                _ => Err(format!("compress={other}: use none, lz4, zstd or zstd:LEVEL (LEVEL 1 to 19)")),
            },
        }
    }

    /// The setting as `parse` takes it.
    pub fn as_string(self) -> String {
        match self {
            Compression::None => "none".to_string(),
            Compression::Lz4 => "lz4".to_string(),
            Compression::Zstd { level } => format!("zstd:{level}"),
        }
    }

    /// `data` compressed, with the flag that says how, when that is smaller
    /// than `data`; `None` to send it as it is.
    pub fn compress(self, data: &[u8]) -> Option<(FrameFlags, Vec<u8>)> {
        let (flag, compressed) = match self {
            Compression::None => return None,
            Compression::Lz4 => (FrameFlags::LZ4, lz4_flex::block::compress(data)),
            Compression::Zstd { level } => (FrameFlags::ZSTD, zstd::bulk::compress(data, level).ok()?),
        };
        (compressed.len() < data.len()).then_some((flag, compressed))
    }
}

/// The payload of a data frame decompressed to exactly `length` bytes, as
/// its `flags` say (a payload without a compression flag is returned as it
/// is); anything else is refused.
pub fn decompress(flags: FrameFlags, payload: Vec<u8>, length: u32) -> Result<Vec<u8>, ReplicationError> {
    let length = length as usize;
    let decompressed = if flags.contains(FrameFlags::LZ4) {
        lz4_flex::block::decompress(&payload, length).map_err(|error| error.to_string())
    } else if flags.contains(FrameFlags::ZSTD) {
        zstd::bulk::decompress(&payload, length).map_err(|error| error.to_string())
    } else {
        return Ok(payload);
    };
    match decompressed {
        Ok(data) if data.len() == length => Ok(data),
        Ok(data) => Err(ReplicationError::protocol(format!(
            "a compressed payload of {} bytes expands to {} bytes, not the {length} its frame names; refused",
            payload.len(),
            data.len()
        ))),
        Err(error) => Err(ReplicationError::protocol(format!(
            "a compressed payload of {} bytes does not decompress to the {length} bytes its frame names: {error}; refused",
            payload.len()
        ))),
    }
}

/// What compression did on one link: bytes in, bytes out, time spent.
#[derive(Debug, Default)]
pub struct CompressionCounters {
    /// Payload bytes offered to compression.
    pub bytes_in: std::sync::atomic::AtomicU64,
    /// What was sent for them (compressed, or as is when that was not smaller).
    pub bytes_out: std::sync::atomic::AtomicU64,
    /// Nanoseconds spent compressing.
    pub nanos: std::sync::atomic::AtomicU64,
}

impl CompressionCounters {
    /// Compress `data` as `compression` says, counting it: the flag and the
    /// bytes to send instead, or `None` to send it as is.
    pub fn compress(&self, compression: Compression, data: &[u8]) -> Option<(FrameFlags, Vec<u8>)> {
        use std::sync::atomic::Ordering::Relaxed;
        if compression == Compression::None {
            return None;
        }
        let started = Instant::now();
        let compressed = compression.compress(data);
        self.nanos.fetch_add(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.bytes_in.fetch_add(data.len() as u64, Relaxed);
        self.bytes_out.fetch_add(compressed.as_ref().map_or(data.len(), |(_, bytes)| bytes.len()) as u64, Relaxed);
        compressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressible() -> Vec<u8> {
        (0..65536u32).map(|index| (index / 512) as u8).collect()
    }

    #[test]
    fn both_algorithms_round_trip_and_incompressible_data_goes_as_is() {
        let data = compressible();
        for compression in [Compression::Lz4, Compression::Zstd { level: 3 }, Compression::Zstd { level: 19 }] {
            let (flags, compressed) = compression.compress(&data).expect("compressible");
            assert!(compressed.len() * 10 < data.len(), "{compression:?}: {} bytes", compressed.len());
            assert_eq!(decompress(flags, compressed, data.len() as u32).unwrap(), data);
        }
        let mut noise = vec![0u8; 65536];
        getrandom::fill(&mut noise).unwrap();
        assert_eq!(Compression::Lz4.compress(&noise), None);
        assert_eq!(Compression::Zstd { level: 3 }.compress(&noise), None);
        assert_eq!(Compression::None.compress(&data), None);
    }

    /// A forged or damaged payload is refused: one that expands past its
    /// frame's length (a decompression bomb), one short of it, garbage.
    #[test]
    fn a_payload_that_does_not_decompress_to_its_length_is_refused() {
        let data = compressible();
        for (flag, compressed) in [
            (FrameFlags::LZ4, lz4_flex::block::compress(&data)),
            (FrameFlags::ZSTD, zstd::bulk::compress(&data, 3).unwrap()),
        ] {
            let bomb = decompress(flag, compressed.clone(), 4096).unwrap_err();
            assert!(bomb.to_string().contains("refused"), "{bomb}");
            let short = decompress(flag, compressed, data.len() as u32 + 1).unwrap_err();
            assert!(short.to_string().contains("refused"), "{short}");
            assert!(decompress(flag, vec![0xff; 100], 4096).is_err());
        }
    }

    #[test]
    fn settings_parse_and_print() {
        assert_eq!(Compression::parse("lz4"), Ok(Compression::Lz4));
        assert_eq!(Compression::parse("zstd"), Ok(Compression::Zstd { level: ZSTD_LEVEL_DEFAULT }));
        assert_eq!(Compression::parse("zstd:9"), Ok(Compression::Zstd { level: 9 }));
        assert_eq!(Compression::parse("none"), Ok(Compression::None));
        assert!(Compression::parse("zstd:0").unwrap_err().contains("LEVEL 1 to 19"));
        assert!(Compression::parse("gzip").is_err());
        assert_eq!(Compression::Zstd { level: 9 }.as_string(), "zstd:9");
    }
}
