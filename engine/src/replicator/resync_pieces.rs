//! How resync reads a range of the local volume: as pieces, zeroes (sent as
//! ResyncZeroes, without data, so a thin copy stays thin) and data. A hole
//! at the start of the range (SEEK_DATA on a regular file) is not read at
//! all; from the first data on the range is read, and data (or a hole)
//! that reads as zeroes in whole ZERO_CHUNK_BYTES chunks becomes zeroes too.

use crate::volume::Volume;

/// Resync data is checked for zeroes in chunks of this many bytes; a chunk
/// of zeroes goes as ResyncZeroes, without data, and stays a hole on a
/// thin copy.
const ZERO_CHUNK_BYTES: u64 = 64 << 10;

/// Zero blocks at the edges of a run of data chunks are found at this size
/// (aligned to the volume): zeroes before or after data within a chunk (the
/// rest of a hole that ends or begins there) go as zeroes too, so a thin
/// copy stays as thin as the file system's blocks.
const EDGE_BLOCK_BYTES: u64 = 4096;

/// `length` bytes at `offset` of the local volume as resync pieces: a
/// hole where the range starts (up to the next data, which one SEEK_DATA
/// finds) is a zero piece, not read; the rest is read, and each 64 KiB
/// chunk of it that reads as zeroes (a hole further on among them) becomes
/// a zero piece, the rest data; neighbours of one kind are joined.
///
/// SEEK_HOLE is not used to skip holes past the first data: on tmpfs it
/// visits every cached page from the offset to the next hole, wherever
/// that is, so a catch-up pass over a written tmpfs volume spent most of
/// the machine's CPU in it (perf, 1 GiB volume, async copy: 65 % of all
/// samples). A hole further on costs a read of zeroes instead (no device
/// I/O on a file), bounded by the range.
pub(crate) fn read_pieces(volume: &Volume, offset: u64, length: u64) -> std::io::Result<Vec<Piece>> {
    let end = offset + length;
    let mut pieces: Vec<Piece> = Vec::new();
    let data = volume.next_data(offset)?.map_or(end, |data| data.clamp(offset, end));
    if data > offset {
        pieces.push(Piece::Zeroes { offset, length: data - offset });
    }
    if data < end {
        split_zero_chunks(&mut pieces, data, volume.read_synchronously(data, end - data)?);
    }
    Ok(pieces)
}

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
    let runs: Vec<(usize, usize, bool)> = runs
        .into_iter()
        .flat_map(|(from, to, zero)| {
            let (head, tail) = if zero { (from, to) } else { data_between_zero_edges(&data, offset, from, to) };
            [(from, head, true), (head, tail, zero), (tail, to, true)]
        })
        .filter(|(from, to, _)| from < to)
        .collect();
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

/// The part of the data run `from..to` of `data` (read at `offset`) left
/// when whole EDGE_BLOCK_BYTES blocks of zeroes are taken off both its
/// ends. The run holds a byte that is not zero, so some of it is left.
fn data_between_zero_edges(data: &[u8], offset: u64, from: usize, to: usize) -> (usize, usize) {
    let block_after = |at: usize| {
        let absolute = offset + at as u64;
        (((absolute / EDGE_BLOCK_BYTES + 1) * EDGE_BLOCK_BYTES - offset) as usize).min(to)
    };
    let block_before = |at: usize| {
        let absolute = offset + at as u64 - 1;
        ((absolute / EDGE_BLOCK_BYTES * EDGE_BLOCK_BYTES).saturating_sub(offset) as usize).max(from)
    };
    let mut head = from;
    while head < to && is_zero(&data[head..block_after(head)]) {
        head = block_after(head);
    }
    let mut tail = to;
    while tail > head && is_zero(&data[block_before(tail)..tail]) {
        tail = block_before(tail);
    }
    (head, tail)
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
    /// pieces joined with a hole before them and with the zero blocks at the
    /// edges of the data chunks between them.
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
                ("data", CHUNK, EDGE_BLOCK_BYTES),
                ("zeroes", CHUNK + EDGE_BLOCK_BYTES, 3 * CHUNK - EDGE_BLOCK_BYTES),
                ("data", 4 * CHUNK, EDGE_BLOCK_BYTES),
                ("zeroes", 4 * CHUNK + EDGE_BLOCK_BYTES, CHUNK / 2 - EDGE_BLOCK_BYTES)
            ]
        );
        let Piece::Data { data, .. } = &pieces[1] else { unreachable!() };
        assert_eq!(data[10], 1, "the data piece holds the bytes at its offset");
    }

    /// A sparse file, `len` bytes, with `bytes` written at each of `at`
    /// (each written range is data, the rest holes), opened as a volume.
    fn sparse_volume(directory: &std::path::Path, len: u64, writes: &[(u64, u8, usize)]) -> Volume {
        use std::os::unix::fs::FileExt;
        let path = directory.join("volume.img");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(len).unwrap();
        for &(at, byte, count) in writes {
            file.write_all_at(&vec![byte; count], at).unwrap();
        }
        file.sync_all().unwrap();
        let options = crate::volume::VolumeOptions { path, size: None, direct: false, read_only: false };
        Volume::open(&options).unwrap()
    }

    /// The pieces of a range cover it exactly, in order, and read back as
    /// the volume does: data pieces hold its bytes, zero pieces its zeroes.
    fn assert_faithful(volume: &Volume, offset: u64, length: u64, pieces: &[Piece]) {
        let expected = volume.read_synchronously(offset, length).unwrap();
        let mut position = offset;
        for piece in pieces {
            match piece {
                Piece::Zeroes { offset: at, length } => {
                    assert_eq!(*at, position, "pieces are contiguous");
                    let range = (at - offset) as usize..(at - offset + length) as usize;
                    assert!(expected[range].iter().all(|byte| *byte == 0), "a zero piece over data at {at}");
                    position += length;
                }
                Piece::Data { offset: at, data } => {
                    assert_eq!(*at, position, "pieces are contiguous");
                    let range = (at - offset) as usize..(at - offset) as usize + data.len();
                    assert_eq!(&expected[range], &data[..], "a data piece's bytes at {at}");
                    position += data.len() as u64;
                }
            }
        }
        assert_eq!(position, offset + length, "the pieces cover the range");
    }

    /// On a sparse file: a range that is all hole is one zero piece; a
    /// hole before the first data, and one after it (not looked for: it
    /// reads as zeroes), go as zeroes to within a 4 KiB block, as the file
    /// system holds them; the data goes as data. Fails if the zeroes after
    /// data within its chunk were sent as data (a thin copy would allocate
    /// them), or a piece were misplaced.
    #[test]
    fn holes_and_data_of_a_sparse_file_become_their_pieces() {
        const CHUNK: u64 = ZERO_CHUNK_BYTES;
        let directory = tempfile::tempdir().unwrap();
        // Data in chunk 2 (part of it) and chunk 5, holes elsewhere (16 chunks).
        let volume =
            sparse_volume(directory.path(), 16 * CHUNK, &[(2 * CHUNK, 7, 8192), (5 * CHUNK, 9, CHUNK as usize)]);
        let all_hole = read_pieces(&volume, 8 * CHUNK, 4 * CHUNK).unwrap();
        assert_eq!(shape(&all_hole), [("zeroes", 8 * CHUNK, 4 * CHUNK)]);
        let whole = read_pieces(&volume, 0, 16 * CHUNK).unwrap();
        assert_faithful(&volume, 0, 16 * CHUNK, &whole);
        assert_eq!(
            shape(&whole),
            [
                ("zeroes", 0, 2 * CHUNK),
                ("data", 2 * CHUNK, 8192),
                ("zeroes", 2 * CHUNK + 8192, 3 * CHUNK - 8192),
                ("data", 5 * CHUNK, CHUNK),
                ("zeroes", 6 * CHUNK, 10 * CHUNK)
            ]
        );
        // A range starting mid-data and ending mid-hole.
        let partial = read_pieces(&volume, 2 * CHUNK + 4096, 2 * CHUNK).unwrap();
        assert_faithful(&volume, 2 * CHUNK + 4096, 2 * CHUNK, &partial);
        assert_eq!(shape(&partial), [("data", 2 * CHUNK + 4096, 4096), ("zeroes", 2 * CHUNK + 8192, 2 * CHUNK - 4096)]);
    }

    /// Zero 4 KiB blocks at both edges of a data run come off as zeroes,
    /// blocks aligned to the volume (not to the read), and zeroes inside a
    /// data chunk stay in its data. Fails without the edge trimming.
    #[test]
    fn zero_blocks_at_the_edges_of_data_go_as_zeroes() {
        const BLOCK: usize = EDGE_BLOCK_BYTES as usize;
        let offset = 1024u64; // a read that starts mid-block
        let mut data = vec![0u8; 4 * BLOCK];
        data[BLOCK + 10] = 1; // in the volume's block 1 (bytes 4096..8192)
        data[3 * BLOCK - 1000] = 2; // in block 3; block 2 between them is zero
        let mut pieces = Vec::new();
        split_zero_chunks(&mut pieces, offset, data);
        // Volume bytes 1024..17408: zero to 4096, data in blocks 1 and 3
        // (block 2 between them stays in the data), zero from 16384.
        assert_eq!(shape(&pieces), [("zeroes", 1024, 3072), ("data", 4096, 12288), ("zeroes", 16384, 1024)]);
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
