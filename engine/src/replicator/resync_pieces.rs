//! How resync reads a range of the local volume: as pieces, zeroes (sent as
//! ResyncZeroes, without data, so a thin copy stays thin) and data. Holes
//! (SEEK_HOLE on a regular file) are not read at all; data that reads as
//! zeroes in whole ZERO_CHUNK_BYTES chunks becomes zeroes too.

use crate::volume::Volume;

/// Resync data is checked for zeroes in chunks of this many bytes; a chunk
/// of zeroes goes as ResyncZeroes, without data, and stays a hole on a
/// thin copy.
const ZERO_CHUNK_BYTES: u64 = 64 << 10;

/// `length` bytes at `offset` of the local volume as resync pieces:
/// holes (SEEK_HOLE on a regular file, not read at all) and 64 KiB
/// chunks that read as zeroes become zero pieces, the rest data;
/// neighbours of one kind are joined.
pub(crate) fn read_pieces(volume: &Volume, offset: u64, length: u64) -> std::io::Result<Vec<Piece>> {
    let end = offset + length;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut position = offset;
    while position < end {
        let extents = volume.block_status(position, (end - position) as u32, 64)?;
        assert!(!extents.is_empty(), "block status covers at least one byte of a non-empty range");
        for (extent_length, flags) in extents {
            let extent_length = u64::from(extent_length);
            if flags & BLOCK_STATUS_HOLE != 0 {
                push_piece(&mut pieces, Piece::Zeroes { offset: position, length: extent_length });
            } else {
                let data = volume.read_synchronously(position, extent_length)?;
                split_zero_chunks(&mut pieces, position, data);
            }
            position += extent_length;
        }
    }
    assert_eq!(position, end, "resync pieces cover exactly the range");
    Ok(pieces)
}

/// The NBD block-status flag of an extent that is a hole (reads as zeroes).
const BLOCK_STATUS_HOLE: u32 = 0b01;

/// A piece of a resync range: zeroes (sent without data) or data.
#[derive(Debug)]
pub(crate) enum Piece {
    Zeroes { offset: u64, length: u64 },
    Data { offset: u64, data: Vec<u8> },
}

/// Append `piece`, joined with the last one when both are zeroes and touch.
fn push_piece(pieces: &mut Vec<Piece>, piece: Piece) {
    if let (Some(Piece::Zeroes { offset, length }), Piece::Zeroes { offset: next, length: more }) =
        (pieces.last_mut(), &piece)
    {
        if *offset + *length == *next {
            *length += more;
            return;
        }
    }
    pieces.push(piece);
}

/// Whether `chunk` holds only zero bytes. Data is rejected at its first or
/// last byte in almost every case; a candidate is or-folded whole, which
/// compiles to wide vector instructions (an early-exit scan does not), so
/// resync spends about a memory read per zero chunk.
fn is_zero(chunk: &[u8]) -> bool {
    chunk.first().is_none_or(|byte| *byte == 0)
        && chunk.last().is_none_or(|byte| *byte == 0)
        && chunk.iter().fold(0u8, |all, byte| all | byte) == 0
}

/// Append `data` (read at `offset`) as pieces: each ZERO_CHUNK_BYTES chunk
/// (aligned to the volume) of zeroes a zero piece, each run of the other
/// chunks one data piece (the buffer itself when nothing in it is zero).
fn split_zero_chunks(pieces: &mut Vec<Piece>, offset: u64, data: Vec<u8>) {
    // (start, end, zero) runs of chunks, relative to `data`.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let absolute = offset + start as u64;
        let chunk_end = ((absolute / ZERO_CHUNK_BYTES + 1) * ZERO_CHUNK_BYTES - offset).min(data.len() as u64) as usize;
        let zero = is_zero(&data[start..chunk_end]);
        match runs.last_mut() {
            Some((_, end, kind)) if *kind == zero => *end = chunk_end,
            _ => runs.push((start, chunk_end, zero)),
        }
        start = chunk_end;
    }
    if let [(_, _, false)] = runs.as_slice() {
        pieces.push(Piece::Data { offset, data });
        return;
    }
    for (from, to, zero) in runs {
        let at = offset + from as u64;
        if zero {
            push_piece(pieces, Piece::Zeroes { offset: at, length: (to - from) as u64 });
        } else {
            pieces.push(Piece::Data { offset: at, data: data[from..to].to_vec() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(pieces: &[Piece]) -> Vec<(&'static str, u64, u64)> {
        pieces
            .iter()
            .map(|piece| match piece {
                Piece::Zeroes { offset, length } => ("zeroes", *offset, *length),
                Piece::Data { offset, data } => ("data", *offset, data.len() as u64),
            })
            .collect()
    }

    /// Chunks of zeroes (aligned to the volume, not to the read) become zero
    /// pieces joined with a hole before them; data runs stay whole.
    #[test]
    fn zero_chunks_become_zero_pieces() {
        const CHUNK: u64 = ZERO_CHUNK_BYTES;
        let offset = CHUNK / 2; // a read that starts mid-chunk
        let mut data = vec![0u8; (4 * CHUNK) as usize];
        data[(CHUNK / 2 + 10) as usize] = 1; // in the volume's chunk 1
        data[(3 * CHUNK + CHUNK / 2) as usize] = 2; // in the volume's last, partial chunk 4
        let mut pieces = vec![Piece::Zeroes { offset: 0, length: offset }];
        split_zero_chunks(&mut pieces, offset, data);
        assert_eq!(
            shape(&pieces),
            [
                ("zeroes", 0, CHUNK),
                ("data", CHUNK, CHUNK),
                ("zeroes", 2 * CHUNK, 2 * CHUNK),
                ("data", 4 * CHUNK, CHUNK / 2)
            ]
        );
        let Piece::Data { data, .. } = &pieces[1] else { unreachable!() };
        assert_eq!(data[10], 1, "the data piece holds the bytes at its offset");
    }

    /// A read with no zero chunk is one data piece; one of zeroes one zero piece.
    #[test]
    fn whole_reads_stay_whole() {
        let mut pieces = Vec::new();
        split_zero_chunks(&mut pieces, 0, vec![7u8; 3 * ZERO_CHUNK_BYTES as usize]);
        split_zero_chunks(&mut pieces, 3 * ZERO_CHUNK_BYTES, vec![0u8; 2 * ZERO_CHUNK_BYTES as usize]);
        assert_eq!(
            shape(&pieces),
            [("data", 0, 3 * ZERO_CHUNK_BYTES), ("zeroes", 3 * ZERO_CHUNK_BYTES, 2 * ZERO_CHUNK_BYTES)]
        );
    }
}
