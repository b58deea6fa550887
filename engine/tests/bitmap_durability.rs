//! Durability tests for the write-intent bitmap: marks that were flushed
//! survive a process that dies without closing anything, and a flush really
//! writes the mapping back to the file.
//!
//! The crash test re-runs this test binary as a child process that marks,
//! flushes and aborts (no destructor, no unmap, no close); the parent then
//! reopens the file. A power cut is not simulated here: what survives it is
//! what `flush` made durable, which the second test checks through the
//! kernel's own accounting of the mapping's dirty pages.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use engine::bitmap::{BitmapErrorKind, WriteIntentBitmap};

const VOLUME_SIZE: u64 = 1 << 30;
const REGION_BYTES: u64 = 64 << 10;
const SLOTS: u32 = 2;
const CHILD_DIRECTORY_VARIABLE: &str = "CROSSMIRROR_BITMAP_CRASH_DIRECTORY";

/// The writes the child marks before it dies: (offset, len).
fn writes() -> Vec<(u64, u64)> {
    (0..50u64).map(|index| ((index * 7_919 * 4096) % (VOLUME_SIZE - 300_000), 4096 + index * 5_000)).collect()
}

fn bitmap_file(directory: &Path) -> PathBuf {
    directory.join("volume.cmbitmap")
}

/// Not a test of its own: the body of the child process that
/// `flushed_marks_survive_a_crash` starts. It marks, flushes, marks once more
/// without flushing, and aborts.
#[test]
#[ignore = "run by flushed_marks_survive_a_crash as a child process"]
fn crash_child() {
    let Some(directory) = std::env::var_os(CHILD_DIRECTORY_VARIABLE) else {
        return;
    };
    let bitmap =
        WriteIntentBitmap::open_or_create(&bitmap_file(Path::new(&directory)), VOLUME_SIZE, REGION_BYTES, SLOTS)
            .unwrap();
    for (offset, len) in writes() {
        bitmap.mark(offset, len);
    }
    bitmap.flush().unwrap();
    bitmap.set_generation(5);
    bitmap.flush().unwrap();
    std::process::abort();
}

/// Marks that were flushed are all there after the process that made them
/// died by SIGABRT with the bitmap still open, and its lock died with it.
#[test]
fn flushed_marks_survive_a_crash() {
    let directory = tempfile::tempdir().unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--ignored", "--test-threads=1"])
        .env(CHILD_DIRECTORY_VARIABLE, directory.path())
        .output()
        .unwrap();
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGABRT),
        "the child must die by abort, not exit: {:?}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let bitmap =
        WriteIntentBitmap::open_or_create(&bitmap_file(directory.path()), VOLUME_SIZE, REGION_BYTES, SLOTS).unwrap();
    assert_eq!(bitmap.generation(), 5);
    for (offset, len) in writes() {
        for region in offset / REGION_BYTES..=(offset + len - 1) / REGION_BYTES {
            for slot in 0..SLOTS {
                assert!(bitmap.is_set(slot, region), "region {region} of slot {slot} lost in the crash");
            }
        }
    }
}

/// The bytes of dirty pages that the kernel counts for the mapping of `path`
/// in this process, or `None` when /proc does not say.
fn mapping_dirty_bytes(path: &Path) -> Option<u64> {
    let smaps = fs::read_to_string("/proc/self/smaps").ok()?;
    let path = fs::canonicalize(path).ok()?;
    let mut in_mapping = false;
    let mut dirty_kib = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_mapping = line.ends_with(path.to_str()?);
        } else if in_mapping && (first == "Shared_Dirty:" || first == "Private_Dirty:") {
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            *dirty_kib.get_or_insert(0) += kib;
        }
    }
    dirty_kib.map(|kib| kib * 1024)
}

/// A flush leaves no dirty page in the mapping: the marks reached the file,
/// not just the page cache.
#[test]
fn flush_writes_the_mapping_back() {
    let directory = tempfile::tempdir().unwrap();
    let path = bitmap_file(directory.path());
    let bitmap = WriteIntentBitmap::open_or_create(&path, VOLUME_SIZE, REGION_BYTES, SLOTS).unwrap();
    assert!(bitmap.mark(0, VOLUME_SIZE / 2));
    let Some(dirty_before) = mapping_dirty_bytes(&path) else {
        eprintln!("skipped: /proc/self/smaps does not show the bitmap's mapping");
        return;
    };
    if dirty_before == 0 {
        eprintln!("skipped: this file system does not track dirty pages of shared mappings (tmpfs?)");
        return;
    }
    bitmap.flush().unwrap();
    assert_eq!(mapping_dirty_bytes(&path), Some(0), "dirty pages remain after flush");
}

/// The lock refuses a second opener while the first is alive.
#[test]
fn a_live_holder_keeps_others_out() {
    let directory = tempfile::tempdir().unwrap();
    let path = bitmap_file(directory.path());
    let _holder = WriteIntentBitmap::open_or_create(&path, VOLUME_SIZE, REGION_BYTES, SLOTS).unwrap();
    let error = WriteIntentBitmap::open_or_create(&path, VOLUME_SIZE, REGION_BYTES, SLOTS).unwrap_err();
    assert_eq!(error.kind(), BitmapErrorKind::Busy);
}
