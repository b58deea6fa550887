//! Random reads and writes through io_uring on an O_DIRECT volume (with the
//! alignment, bounce-buffer and read-modify-write logic) end with exactly the
//! bytes that plain `pwrite`/`pread` give on a copy.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use engine::alignment::Span;
use engine::{AlignedBuf, Ring, Volume, VolumeOptions};
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Read { offset: u64, len: u64 },
    Zero { offset: u64, len: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE - 1).prop_flat_map(|offset| (Just(offset), 1..=(SIZE - offset).min(200_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write { offset, len, seed }),
        3 => range.clone().prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => range.prop_map(|(offset, len)| Op::Zero { offset, len }),
    ]
}

/// A scratch directory on a disk filesystem (O_DIRECT works there, unlike
/// tmpfs), removed with everything in it when dropped.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("crossmirror-engine-").tempdir_in("/var/tmp").unwrap()
}

fn complete(ring: &mut Ring<AlignedBuf>) -> (AlignedBuf, i32) {
    ring.submit_and_wait(1, None).unwrap();
    let mut out = Vec::new();
    ring.reap(&mut out);
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

fn uring_write(volume: &Volume, ring: &mut Ring<AlignedBuf>, offset: u64, data: &[u8]) {
    let span: Span = volume.span(offset, data.len() as u64);
    let (start, end) = (span.file_offset, span.file_offset + span.file_len);
    let lock = volume.locks().try_lock(start, end).expect("no concurrent writer");
    let mut buf = AlignedBuf::new(span.file_len as usize);
    buf.as_mut_slice()[span.head as usize..(span.head + span.len) as usize].copy_from_slice(data);
    volume.fill_edges(&span, &mut buf).unwrap();
    let entry = volume.write_entry(buf.as_ptr(), span.file_len as u32, span.file_offset, false);
    // SAFETY: the entry points into `buf`, owned by the op until reaped.
    unsafe { ring.push(entry, buf).map_err(|_| ()).unwrap() };
    let (_, result) = complete(ring);
    assert_eq!(result as u64, span.file_len, "short or failed write: {result}");
    volume.locks().unlock(lock);
}

fn uring_read(volume: &Volume, ring: &mut Ring<AlignedBuf>, offset: u64, len: u64) -> Vec<u8> {
    let span = volume.span(offset, len);
    let mut buf = AlignedBuf::new(span.file_len as usize);
    let entry = volume.read_entry(buf.as_mut_ptr(), span.file_len as u32, span.file_offset);
    // SAFETY: the entry points into `buf`, owned by the op until reaped.
    unsafe { ring.push(entry, buf).map_err(|_| ()).unwrap() };
    let (buf, result) = complete(ring);
    assert_eq!(result as u64, span.file_len, "short or failed read: {result}");
    buf.as_slice()[span.head as usize..(span.head + span.len) as usize].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn direct_uring_matches_plain_pwrite(ops in proptest::collection::vec(op(), 1..40)) {
        let directory = scratch();
        let path = directory.path().join("direct.img");
        let copy_path = directory.path().join("copy.img");
        let options = VolumeOptions { path: path.clone(), size: Some(SIZE), direct: true, read_only: false };
        let volume = Volume::open(&options).unwrap();
        prop_assert_eq!(volume.alignment(), 4096);
        let copy = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&copy_path).unwrap();
        copy.set_len(SIZE).unwrap();
        let mut ring: Ring<AlignedBuf> = Ring::new(8).unwrap();
        for op in &ops {
            match *op {
                Op::Write { offset, len, seed } => {
                    let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add((i % 251) as u8)).collect();
                    uring_write(&volume, &mut ring, offset, &data);
                    copy.write_all_at(&data, offset).unwrap();
                }
                Op::Read { offset, len } => {
                    let mut expected = vec![0u8; len as usize];
                    copy.read_exact_at(&mut expected, offset).unwrap();
                    prop_assert_eq!(uring_read(&volume, &mut ring, offset, len), expected, "read at {} len {}", offset, len);
                }
                Op::Zero { offset, len } => {
                    volume.write_zeroes_synchronously(offset, len).unwrap();
                    copy.write_all_at(&vec![0u8; len as usize], offset).unwrap();
                }
            }
        }
        let whole = uring_read(&volume, &mut ring, 0, SIZE);
        let mut expected = vec![0u8; SIZE as usize];
        copy.read_exact_at(&mut expected, 0).unwrap();
        prop_assert!(whole == expected, "final contents differ");
        drop(volume);
    }
}
