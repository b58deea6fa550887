//! Invariant 9 against the real binaries: a store's identity travels with its
//! data, and lost or damaged metadata leads to a full resync or a refusal to
//! start — never to a copy reported `up_to_date` that lacks writes.
//!
//! Every test starts from the same history: a production host and one sync
//! copy, up to date; the copy host stopped; writes acknowledged through NBD
//! (the last block of the volume among them) that only production holds;
//! production stopped cleanly. Then something happens to a metadata file or
//! a store, both hosts restart, and the test checks the outcome: either a
//! host refuses to start naming the damaged file, or the copy ends
//! byte-identical to production with every acknowledged write in it.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use system_tests::mirror::{tools, Mirror};
use system_tests::{random_bytes, require_tool, run, wait_until};

const VOLUME_BYTES: u64 = 64 << 20;

/// The writes the copy misses: (offset, length, pattern byte). The last one
/// ends at the last byte of the volume.
const MISSED: [(u64, u64, u8); 4] =
    [(0, 4096, 0x11), ((5 << 20) + 512, 64 << 10, 0x22), (33 << 20, 1 << 20, 0x33), (VOLUME_BYTES - 4096, 4096, 0x44)];

fn qemu_write(uri: &str, offset: u64, length: u64, pattern: u8) {
    let command = format!("write -P {pattern:#04x} {offset} {length}");
    run("qemu-io", &["-f", "raw", "-c", &command, uri]);
}

/// The shared history: up to date, copy stopped, writes it misses, production stopped.
fn copy_misses_writes(label: &str) -> Mirror {
    let mut mirror = Mirror::start(label, &[("east", "127.0.0.2", "")], &[]);
    mirror.wait_up_to_date(Duration::from_secs(60));
    let status = mirror.copies[0].process.as_mut().expect("copy running").stop_with(libc::SIGTERM);
    assert!(status.success(), "copy host exited with {status}");
    assert!(wait_until(Duration::from_secs(10), || mirror.copy_status("east")["state"] != "up_to_date"));
    let uri = mirror.uri();
    for (offset, length, pattern) in MISSED {
        qemu_write(&uri, offset, length, pattern);
    }
    let dirty = mirror.copy_status("east")["dirty_bytes"].as_u64().unwrap();
    assert!(dirty > 0 && dirty < VOLUME_BYTES, "only the missed regions are dirty: {dirty}");
    let status = mirror.production.as_mut().expect("production running").stop_with(libc::SIGTERM);
    assert!(status.success(), "production exited with {status}");
    mirror
}

/// Restart both hosts; the copy must end up to date, identical, with every
/// missed write, after a resync of at least `resync_at_least` bytes.
fn restart_and_check_resynced(mut mirror: Mirror, resync_at_least: u64) {
    mirror.start_production();
    let mut east = mirror.copies.remove(0);
    mirror.start_copy(&mut east);
    mirror.copies.push(east);
    mirror.wait_up_to_date(Duration::from_secs(60));
    let east = mirror.copy_status("east");
    let resynced = east["resync_bytes_total"].as_u64().unwrap();
    assert!(resynced >= resync_at_least, "resynced only {resynced} bytes, expected at least {resync_at_least}: {east}");
    mirror.stop_and_compare_in_place();
    assert_writes_present(&mirror.copies[0].volume);
}

fn assert_writes_present(store: &Path) {
    let file = std::fs::File::open(store).unwrap();
    for (offset, length, pattern) in MISSED {
        let mut data = vec![0u8; length as usize];
        file.read_exact_at(&mut data, offset).unwrap();
        let wrong = data.iter().position(|byte| *byte != pattern);
        assert!(wrong.is_none(), "{}: the acknowledged write at {offset} is missing", store.display());
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn ready() -> bool {
    tools() && require_tool("qemu-io")
}

/// Item 3: the bitmap moved aside while a copy is stale (as an error message
/// once suggested) makes every copy resync in full, not "nothing to do".
#[test]
fn a_bitmap_moved_aside_means_a_full_resync() {
    if !ready() {
        return;
    }
    let mirror = copy_misses_writes("identity-bitmap-moved");
    let bitmap = with_suffix(&mirror.volume, ".cmbitmap");
    std::fs::rename(&bitmap, with_suffix(&bitmap, ".aside")).unwrap();
    restart_and_check_resynced(mirror, VOLUME_BYTES);
}

/// Item 3: a bitmap whose body was zeroed while production was stopped
/// (only its header had a checksum) makes every copy resync in full.
#[test]
fn a_zeroed_bitmap_body_means_a_full_resync() {
    if !ready() {
        return;
    }
    let mirror = copy_misses_writes("identity-bitmap-zeroed");
    let bitmap = with_suffix(&mirror.volume, ".cmbitmap");
    let length = std::fs::metadata(&bitmap).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&bitmap).unwrap();
    file.write_all_at(&vec![0u8; (length - 4096) as usize], 4096).unwrap();
    restart_and_check_resynced(mirror, VOLUME_BYTES);
}

/// Item 4: a copy store replaced by a new blank file while its host was
/// stopped, its metadata kept, is resynced in full.
#[test]
fn a_replaced_copy_store_is_resynced_in_full() {
    if !ready() {
        return;
    }
    let mirror = copy_misses_writes("identity-copy-replaced");
    let store = mirror.copies[0].volume.clone();
    std::fs::rename(&store, with_suffix(&store, ".old")).unwrap();
    std::fs::File::create(&store).unwrap().set_len(VOLUME_BYTES).unwrap();
    restart_and_check_resynced(mirror, VOLUME_BYTES);
}

/// Item 4: a copy whose metadata was lost (the store kept) is resynced in
/// full: a fresh copy's token is not the one production last synced.
#[test]
fn a_copy_with_lost_metadata_is_resynced_in_full() {
    if !ready() {
        return;
    }
    let mirror = copy_misses_writes("identity-copy-metadata-lost");
    std::fs::remove_file(with_suffix(&mirror.copies[0].volume, ".cmmeta")).unwrap();
    restart_and_check_resynced(mirror, VOLUME_BYTES);
}

/// Invariant 9: the production store replaced behind its metadata is
/// refused, naming the way out; with --new-store it is taken as the data and
/// every copy is resynced from it in full.
#[test]
fn a_replaced_production_store_is_refused_unless_taken_as_new() {
    if !ready() {
        return;
    }
    let mut mirror = copy_misses_writes("identity-production-replaced");
    let volume = mirror.volume.clone();
    std::fs::copy(&volume, with_suffix(&volume, ".restored")).unwrap();
    std::fs::rename(with_suffix(&volume, ".restored"), &volume).unwrap();
    let refused = mirror.try_start_production().expect_err("a replaced store must be refused");
    assert!(refused.contains("--new-store") && refused.contains("replaced"), "{refused}");
    mirror.production_args.push("--new-store".into());
    restart_and_check_resynced(mirror, VOLUME_BYTES);
}

/// The metadata files of the shared history, by what the test calls them.
fn metadata_files(mirror: &Mirror) -> [(&'static str, PathBuf); 4] {
    [
        ("production metadata", with_suffix(&mirror.volume, ".cmmeta")),
        ("production bitmap", with_suffix(&mirror.volume, ".cmbitmap")),
        ("production mirror state", with_suffix(&mirror.volume, ".cmcopies")),
        ("copy metadata", with_suffix(&mirror.copies[0].volume, ".cmmeta")),
    ]
}

/// One kind of damage to a file, with its random parameters drawn from `seed`.
fn damage(path: &Path, kind: usize, seed: u64) -> String {
    let length = std::fs::metadata(path).unwrap().len();
    let random = u64::from_le_bytes(random_bytes(8, seed).try_into().unwrap());
    let file = || std::fs::OpenOptions::new().write(true).open(path).unwrap();
    match kind {
        0 => {
            std::fs::remove_file(path).unwrap();
            "deleted".into()
        }
        1 => {
            let to = random % length;
            file().set_len(to).unwrap();
            format!("truncated to {to} bytes")
        }
        2 => {
            file().write_all_at(&vec![0u8; length as usize], 0).unwrap();
            "zeroed whole".into()
        }
        3 => {
            let at = random % length;
            let mut byte = [0u8];
            std::fs::File::open(path).unwrap().read_exact_at(&mut byte, at).unwrap();
            let bit = 1 << ((random >> 32) % 8);
            file().write_all_at(&[byte[0] ^ bit], at).unwrap();
            format!("bit {bit:#04x} of byte {at} flipped")
        }
        _ => {
            let at = random % length;
            let span = (length - at).min(64);
            file().write_all_at(&vec![0u8; span as usize], at).unwrap();
            format!("{span} bytes at {at} zeroed")
        }
    }
}

/// Property: random damage (delete, truncate, zero, flip, zero a range) to
/// any metadata file of either host leads to a clear refusal to start that
/// names the file, or to a copy that ends identical with every acknowledged
/// write — never to a copy reported current that differs. Every file is
/// damaged every way once; the random offsets come from a seed printed on
/// failure (`IDENTITY_SEED` replays one).
#[test]
fn damaged_metadata_is_refused_or_fully_resynced() {
    if !ready() {
        return;
    }
    let seed: u64 = std::env::var("IDENTITY_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    for file_index in 0..4 {
        for kind in 0..5 {
            let case_seed = seed.wrapping_mul(31).wrapping_add((file_index * 5 + kind) as u64);
            let mut mirror = copy_misses_writes(&format!("identity-damage-{file_index}-{kind}"));
            let (what, path) = metadata_files(&mirror)[file_index].clone();
            let done = damage(&path, kind, case_seed);
            let case = format!("{what} {} {done} (IDENTITY_SEED={seed})", path.display());
            eprintln!("case: {case}");
            if let Err(log) = mirror.try_start_production() {
                let named = log.contains(&path.display().to_string());
                assert!(named, "{case}: production refused to start without naming the file:\n{log}");
                continue;
            }
            let mut east = mirror.copies.remove(0);
            let copy_started = mirror.try_start_copy(&mut east);
            mirror.copies.push(east);
            if let Err(log) = copy_started {
                assert!(
                    log.contains(&path.display().to_string()),
                    "{case}: the copy refused without naming it:\n{log}"
                );
                std::thread::sleep(Duration::from_secs(1));
                let state = mirror.copy_status("east")["state"].clone();
                assert_ne!(state, "up_to_date", "{case}: a copy that is not running is reported current");
                continue;
            }
            mirror.wait_up_to_date(Duration::from_secs(60));
            mirror.stop_and_compare_in_place();
            assert_writes_present(&mirror.copies[0].volume);
        }
    }
}
