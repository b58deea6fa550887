//! Durability tests for the write-intent bitmap: the file is found whole
//! after the process that held it died without closing anything, and a flush
//! really writes the mapping back to the file.
//!
//! The process-death test re-runs this test binary as a child process that
//! marks, flushes and aborts (no destructor, no unmap, no close); the parent
//! then reopens the file. A process death keeps the page cache, so that test
//! cannot tell a flushed mark from an unflushed one; what survives a power
//! cut is what `flush` made durable, which `flush_writes_the_mapping_back`
//! checks through the kernel's own accounting of the mapping's dirty pages
//! (and engine/tests/power_cut.rs for the replicator's marks).

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use engine::bitmap::{BitmapErrorKind, WriteIntentBitmap};
use support::page_cache::mapping_dirty_bytes;

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
/// `marks_survive_the_death_of_their_process` starts. It marks, flushes,
/// sets the generation, flushes again, and aborts.
#[test]
#[ignore = "run by marks_survive_the_death_of_their_process as a child process"]
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

/// Proves the bitmap reopens whole after the process that held it died by
/// SIGABRT with it open: its lock died with it, the header and generation
/// read back, every mark is there. It does not prove the marks were
/// durable: the page cache outlives the process, so unflushed marks would
/// be there too (the power cut is modelled in engine/tests/power_cut.rs).
#[test]
fn marks_survive_the_death_of_their_process() {
    let directory = tempfile::tempdir_in("/var/tmp").unwrap();
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

/// A flush leaves no dirty page in the mapping: the marks reached the file,
/// not just the page cache. The file is on /var/tmp, a disk file system, and
/// the test fails (never skips) when /proc does not show the mapping or the
/// marks did not dirty it: then it could not see a missing msync.
#[test]
fn flush_writes_the_mapping_back() {
    let directory = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = bitmap_file(directory.path());
    let bitmap = WriteIntentBitmap::open_or_create(&path, VOLUME_SIZE, REGION_BYTES, SLOTS).unwrap();
    assert!(bitmap.mark(0, VOLUME_SIZE / 2));
    let dirty_before = mapping_dirty_bytes(&path);
    assert!(
        dirty_before > 0,
        "the marks left no dirty page in the mapping of {}: this file system does not track dirty pages of \
         shared mappings (tmpfs?), so this test could not see a missing msync",
        path.display()
    );
    bitmap.flush().unwrap();
    assert_eq!(mapping_dirty_bytes(&path), 0, "dirty pages remain after flush");
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
