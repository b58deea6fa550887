//! Durability order under a power cut: a write's mark in the write-intent
//! bitmap must be durable before its data write is issued (DESIGN.md §3,
//! invariant 6), or a power cut can keep the data and lose the mark, and the
//! copies' resync after it would never send that region.
//!
//! Why this crash model: a process kill (SIGKILL, abort) keeps the page
//! cache, so a mark that was only stored in the shared mapping survives it
//! and no kill test can tell a missing msync. A power cut loses exactly what
//! the kernel had not yet written back: the dirty pages. The kernel counts
//! them per mapping in /proc/self/smaps (`support::page_cache`), and
//! `msync(MS_SYNC)` — what the bitmap's flush is — writes them back and
//! flushes the device, which leaves them clean. So "cut the power now" is
//! modelled as: the bitmap a reboot finds is the mapping's content if no
//! page of it is dirty, and lacks the new marks otherwise. The file lives on
//! /var/tmp (ext4, a disk file system; tmpfs never writes pages back), and
//! the test first proves the model sees an unflushed mark as dirty here, so
//! it cannot pass by being blind.
//!
//! Other options were weighed: this kernel has no device-mapper
//! (dm-log-writes) and no nbd.ko; a FUSE file system that keeps only fsynced
//! data would need a FUSE crate and a daemon thread for the same verdict;
//! a counter of flushes inside the bitmap would test the code's own
//! bookkeeping, not what reached the disk. The FUA half of durability order
//! (a FUA write durable before its answer) is seen through the kernel's
//! flush count of a loop device in tests/tests/fua.rs.

mod support;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use engine::bitmap::{WriteIntentBitmap, SLOTS_MAX};
use engine::replicator::{Change, Completions, Replicator, ReplicatorConfig, Shipped};
use engine::{Volume, VolumeOptions};
use support::page_cache::mapping_dirty_bytes;
use support::{TestStateStore, REGION, VOLUME_SIZE};

/// Proves every mark `Replicator::begin_write` makes is durable when it
/// returns, i.e. before the data write is issued: after each begin_write,
/// the data written and made durable, a power cut keeps the mark. Fails if
/// `begin_write` skips the bitmap flush after `mark`.
#[test]
fn a_power_cut_after_the_data_write_keeps_its_mark() {
    let directory = tempfile::tempdir_in("/var/tmp").unwrap();
    let volume_path = directory.path().join("volume");
    let bitmap_path = directory.path().join("volume.cmbitmap");
    let options = VolumeOptions { path: volume_path.clone(), size: Some(VOLUME_SIZE), direct: false, read_only: false };
    let volume = Arc::new(Volume::open(&options).unwrap());
    let bitmap = Arc::new(WriteIntentBitmap::open_or_create(&bitmap_path, VOLUME_SIZE, REGION, SLOTS_MAX).unwrap());
    // No copy: no link thread touches the bitmap behind the test's back.
    let replicator = start_without_copies(volume, bitmap.clone());
    let completions = Completions::new().unwrap();
    assert_eq!(mapping_dirty_bytes(&bitmap_path), 0, "the bitmap is durable once the replicator started");

    // The model sees an unflushed mark: marked but not flushed, its page is
    // dirty (a power cut would lose it); flushed, it is clean.
    assert!(bitmap.mark(0, 4096), "a new mark asks for a flush");
    assert!(
        mapping_dirty_bytes(&bitmap_path) > 0,
        "an unflushed mark must show as a dirty page of the mapping, or this test is blind: is {} on a disk \
         file system?",
        bitmap_path.display()
    );
    bitmap.flush().unwrap();
    assert_eq!(mapping_dirty_bytes(&bitmap_path), 0, "a flushed mark leaves no dirty page");

    let data_file = std::fs::OpenOptions::new().write(true).open(&volume_path).unwrap();
    for index in 1..8u64 {
        let offset = index * 3 * REGION + 512;
        replicator.begin_write(offset, 4096).unwrap();
        // The frontend issues the data write now; the worst case for a power
        // cut is that it reached the disk at once.
        let data = [index as u8; 4096];
        data_file.write_all_at(&data, offset).unwrap();
        data_file.sync_data().unwrap();
        // Power cut: the bitmap a reboot finds is this mapping only if no
        // page of it was left dirty.
        let dirty = mapping_dirty_bytes(&bitmap_path);
        assert_eq!(
            dirty, 0,
            "a power cut after the data write at {offset} would keep the data and lose its mark ({dirty} bytes \
             of the bitmap were never written back): begin_write must make the mark durable before the data \
             write is issued"
        );
        for slot in 0..SLOTS_MAX {
            assert!(bitmap.is_set(slot, offset / REGION), "the write at {offset} is marked in slot {slot}");
        }
        // With no copy, the shipped write is answered at once.
        let shipped = replicator.ship(Change::Write { offset, data: &data, fua: false }, &completions, index);
        assert_eq!(shipped, Shipped::Done(0));
    }
    replicator.stop();
}

/// The bytes of dirty pages of `path` seen through a fresh read-only shared
/// mapping whose every page was touched (so the page-cache state of a file
/// written with pwrite shows in /proc/self/smaps).
fn file_dirty_bytes(path: &std::path::Path) -> u64 {
    let _map = mapped_and_touched(path);
    mapping_dirty_bytes(path)
}

/// A read-only shared mapping of `path` with every page touched: while it
/// lives, /proc/self/smaps shows which of the file's pages are dirty.
fn mapped_and_touched(path: &std::path::Path) -> memmap2::Mmap {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only mapping of a file only this test and the code
    // under test write, read through volatile loads while the file keeps
    // its length.
    let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
    let mut sum = 0u8;
    for page in (0..map.len()).step_by(4096) {
        // SAFETY: page < map.len().
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(map.as_ptr().add(page)) });
    }
    std::hint::black_box(sum);
    map
}

/// With the activity log, a write's mark may stay in memory: its extent
/// must be in the durable log instead, and a power cut then recovers it.
/// After each `begin_write` (the data made durable at once, the worst case)
/// the test takes what a power cut would leave: the log file only if none of
/// its pages is dirty, and the bitmap as it was when its mapping was last
/// found clean (marks only ever set bits here, so an older image is the
/// worst case). It opens those images as a restarted host would and
/// checks that every region written so far is dirty in every slot. The log
/// holds 4 extents of 1 MiB and the writes touch 12, so extents are dropped
/// (the bitmap must be synced first). Fails when begin_write does not
/// commit the extent, when eviction skips the bitmap sync, and when the
/// recovery does not set the log's extents dirty.
#[test]
fn a_power_cut_with_the_activity_log_recovers_every_written_region() {
    use engine::bitmap::LogRecovery;
    const EXTENT: u64 = 1 << 20;
    let directory = tempfile::tempdir_in("/var/tmp").unwrap();
    let volume_path = directory.path().join("volume");
    let bitmap_path = directory.path().join("volume.cmbitmap");
    let log_path = directory.path().join("volume.cmal");
    let options = VolumeOptions { path: volume_path.clone(), size: Some(VOLUME_SIZE), direct: false, read_only: false };
    let volume = Arc::new(Volume::open(&options).unwrap());
    let mut bitmap = WriteIntentBitmap::open_or_create(&bitmap_path, VOLUME_SIZE, REGION, 2).unwrap();
    assert_eq!(bitmap.attach_activity_log(&log_path, EXTENT, 4).unwrap(), LogRecovery::Missing);
    let bitmap = Arc::new(bitmap);

    // The model sees a pwrite not yet synced as dirty pages of the file.
    let probe = directory.path().join("probe");
    std::fs::write(&probe, [0u8; 8192]).unwrap();
    std::fs::File::open(&probe).unwrap().sync_all().unwrap();
    let probe_file = std::fs::OpenOptions::new().write(true).open(&probe).unwrap();
    assert_eq!(file_dirty_bytes(&probe), 0);
    probe_file.write_all_at(&[1u8; 100], 4096).unwrap();
    assert!(file_dirty_bytes(&probe) > 0, "an unsynced pwrite must show as a dirty page, or this test is blind");
    probe_file.sync_data().unwrap();
    assert_eq!(file_dirty_bytes(&probe), 0, "a synced pwrite leaves no dirty page");

    let replicator = start_without_copies(volume, bitmap.clone());
    let completions = Completions::new().unwrap();
    assert_eq!(mapping_dirty_bytes(&bitmap_path), 0);
    let mut durable_bitmap = std::fs::read(&bitmap_path).unwrap();

    let data_file = std::fs::OpenOptions::new().write(true).open(&volume_path).unwrap();
    let mut written = Vec::new();
    for index in 0..24u64 {
        // 12 extents, each written twice, in an order that drops extents.
        let extent = (index * 5) % 12;
        let offset = extent * EXTENT + (index % 4) * REGION + 512;
        replicator.begin_write(offset, 4096).unwrap();
        let data = [index as u8; 4096];
        data_file.write_all_at(&data, offset).unwrap();
        data_file.sync_data().unwrap();
        written.push(offset / REGION);

        // Power cut now: what a reboot finds.
        assert_eq!(file_dirty_bytes(&log_path), 0, "the activity log is written with fdatasync, never left dirty");
        if mapping_dirty_bytes(&bitmap_path) == 0 {
            durable_bitmap = std::fs::read(&bitmap_path).unwrap();
        }
        let after = tempfile::tempdir_in("/var/tmp").unwrap();
        std::fs::write(after.path().join("volume.cmbitmap"), &durable_bitmap).unwrap();
        std::fs::copy(&log_path, after.path().join("volume.cmal")).unwrap();
        let mut restarted =
            WriteIntentBitmap::open_or_create(&after.path().join("volume.cmbitmap"), VOLUME_SIZE, REGION, 2).unwrap();
        assert_eq!(restarted.opened(), engine::bitmap::Opened::AfterCrash);
        let recovery = restarted.attach_activity_log(&after.path().join("volume.cmal"), EXTENT, 4).unwrap();
        assert!(matches!(recovery, LogRecovery::Extents(_)), "{recovery:?}");
        for region in &written {
            for slot in 0..2 {
                assert!(
                    restarted.is_set(slot, *region),
                    "after a power cut following write {index}, region {region} (written, data durable) is not \
                     dirty in slot {slot}: neither its bit nor its extent was durable before the write was issued"
                );
            }
        }
        let shipped = replicator.ship(Change::Write { offset, data: &data, fua: false }, &completions, index);
        assert_eq!(shipped, Shipped::Done(0));
    }
    let stats = bitmap.activity_log().unwrap().stats();
    assert!(stats.bitmap_syncs > 0, "extents were dropped from the log: {stats:?}");
    replicator.stop();
}

/// A frontend's batch (engine::seam, as one NBD connection uses it): the
/// changes begun together are not durable (nor issuable) until the batch
/// is committed; once the commit returns, the log on disk lists every
/// extent of the batch, the transaction's fdatasync has returned and none
/// of the file's pages is dirty, every change reads as issuable
/// (`marks_durable`), and one transaction wrote them all. Fails when the
/// commit does not log the batch (a no-op, or extents missed), and when
/// begin_batched commits each change itself (8 transactions). That a
/// commit waits for a transaction another thread is writing is
/// `activity_log::a_commit_waits_for_the_transaction_its_extent_is_in`.
#[test]
fn a_batch_is_issuable_only_once_its_transaction_is_on_disk() {
    use engine::activity_log::{read, Found};
    use engine::seam::{ChangeExtent, ChangeKind, Changes};
    const EXTENT: u64 = 1 << 20;
    let directory = tempfile::tempdir_in("/var/tmp").unwrap();
    let volume_path = directory.path().join("volume");
    let log_path = directory.path().join("volume.cmal");
    let options = VolumeOptions { path: volume_path, size: Some(VOLUME_SIZE), direct: false, read_only: false };
    let volume = Arc::new(Volume::open(&options).unwrap());
    let mut bitmap =
        WriteIntentBitmap::open_or_create(&directory.path().join("volume.cmbitmap"), VOLUME_SIZE, REGION, 2).unwrap();
    bitmap.attach_activity_log(&log_path, EXTENT, 64).unwrap();
    let bitmap = Arc::new(bitmap);
    let replicator = start_without_copies(volume, bitmap.clone());
    let mut seam = Changes::mirrored(replicator.clone()).seam::<u64>().unwrap();
    let logged = || match read(&log_path).unwrap() {
        Found::Valid(transaction) => transaction.extents,
        other => panic!("{other:?}"),
    };
    let before = bitmap.activity_log().unwrap().stats().transactions;
    let changes: Vec<ChangeExtent> = (0..8u64)
        .map(|index| ChangeExtent {
            kind: ChangeKind::Write,
            offset: index * 2 * EXTENT + 4096,
            length: 4096,
            fua: false,
        })
        .collect();
    for change in &changes {
        seam.begin_batched(change).unwrap();
    }
    assert!(logged().is_empty(), "begun, not yet committed: nothing logged");
    assert_eq!(bitmap.activity_log().unwrap().stats().transactions, before);
    assert!(
        changes.iter().all(|change| !seam.marks_durable(change)),
        "no change of the batch is issuable before its commit"
    );
    seam.commit_batch().unwrap();
    // Power cut now: the log counts a transaction once its fdatasync
    // returned, and a reboot finds the file only if none of its pages is dirty.
    assert!(changes.iter().all(|change| seam.marks_durable(change)), "the committed batch is issuable");
    assert_eq!(bitmap.activity_log().unwrap().stats().transactions, before + 1, "one transaction for the batch");
    assert_eq!(file_dirty_bytes(&log_path), 0, "issuable while the log's pages are not yet on disk");
    let mut extents = logged();
    extents.sort_unstable();
    let wanted: Vec<u64> = (0..8u64).map(|index| index * 2).collect();
    assert_eq!(extents, wanted, "issuable before the log held the batch");
    for change in &changes {
        seam.abandon(change);
    }
    drop(seam);
    replicator.stop();
}

/// Invariant 6 at the other end of a bit's life: it clears only once its
/// region's data is durable on this host as well as on the copy. A power
/// cut that kept a clear bit and lost the local write would leave this host
/// and the copy differing in a region no resync sends. The local volume is
/// synced on a background thread while frames keep going out; the test
/// writes a region through the page cache, ships it, sends Flushes until
/// the bit clears, and finds the volume file without a dirty page at that
/// moment (its only fsync is the background one: the harness's Flush
/// reaches the copy only). Fails when the clearing rule does not wait for a
/// local sync that started after the region's snapshot.
#[test]
fn a_bit_clears_only_once_its_region_is_durable_on_this_host() {
    // 512 MiB, all of it dirty in the page cache before the region's write,
    // so the background sync takes long (a second or so here) and a clear
    // that does not wait for it lands while pages are still dirty.
    const VOLUME_BYTES: u64 = 512 << 20;
    let mut mirror = support::Mirror::start_sized(engine::replicator::MirrorMode::Sync, Duration::ZERO, VOLUME_BYTES);
    mirror.wait_quiet();
    let offset = 5 * REGION;
    let file = std::fs::OpenOptions::new().write(true).open(&mirror.volume_path).unwrap();
    // Every page of the volume mapped and present, so /proc/self/smaps
    // shows the page cache's dirty pages at once when the bit clears (a
    // fresh mapping would take longer to fault in than the sync takes).
    let mapped = mapped_and_touched(&mirror.volume_path);
    let chunk = vec![0xa5; 16 << 20];
    for start in (0..VOLUME_BYTES).step_by(chunk.len()) {
        file.write_all_at(&chunk, start).unwrap();
    }
    let data = vec![0x5a; support::WRITE_BYTES];
    mirror.replicator.begin_write(offset, data.len() as u64).unwrap();
    file.write_all_at(&data, offset).unwrap();
    assert!(mapping_dirty_bytes(&mirror.volume_path) > 0, "the model sees the written pages as not yet durable");
    let shipped = mirror.replicator.ship(Change::Write { offset, data: &data, fua: false }, &mirror.completions, 1);
    assert_eq!(mirror.wait_answer(shipped, 1), 0);
    mirror.flush_until_clear(offset, 2);
    assert_eq!(
        mapping_dirty_bytes(&mirror.volume_path),
        0,
        "the bit cleared while the region's data was only in this host's page cache"
    );
    drop(mapped);
    mirror.finish().unwrap();
}

/// A replicator with no copy (no link thread touches the bitmap behind the
/// test's back).
fn start_without_copies(volume: Arc<Volume>, bitmap: Arc<WriteIntentBitmap>) -> Arc<Replicator> {
    let config = ReplicatorConfig {
        copies: Vec::new(),
        secret: engine::protocol::Secret::from_bytes(vec![7; 32]).unwrap(),
        identity: engine::protocol::auth::VolumeIdentity { uuid: [1; 16], size_bytes: VOLUME_SIZE },
        generation: 1,
        epoch: 1,
        resync_rate_max: 0,
        resync_checksums: false,
        assume_clean: false,
        local_sync_interval: Duration::from_secs(5),
        source_address: None,
        bitmap_trust: engine::replicator::BitmapTrust::Always,
        metadata_path: None,
    };
    Replicator::start(volume, bitmap, TestStateStore::new(), config).unwrap()
}
