//! What a power cut would lose of a memory-mapped file: the pages the
//! kernel still holds dirty. `/proc/self/smaps` counts them per mapping
//! (`Shared_Dirty`, `Private_Dirty`): a page counts while its page-table
//! entry or its page-cache page is dirty, and an `msync(MS_SYNC)` (which
//! writes the pages back and flushes the device, as `fsync` does) makes it
//! clean. On a disk file system (ext4 on /var/tmp here) that is exact; on
//! tmpfs nothing is ever written back, so tests keep their files on disk.

use std::fs;
use std::path::Path;

/// The bytes of dirty pages of this process's mappings of `path`. Panics
/// when /proc does not show such a mapping: a test that cannot see the page
/// cache must fail, not pass.
pub fn mapping_dirty_bytes(path: &Path) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps is readable");
    let path = fs::canonicalize(path).expect("the mapped file exists");
    let path = path.to_str().expect("a UTF-8 path");
    let mut in_mapping = false;
    let mut dirty_kib = None;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_mapping = line.ends_with(path);
        } else if in_mapping && (first == "Shared_Dirty:" || first == "Private_Dirty:") {
            let kib: u64 = line.split_whitespace().nth(1).and_then(|kib| kib.parse().ok()).expect("a size in kB");
            *dirty_kib.get_or_insert(0) += kib;
        }
    }
    dirty_kib.unwrap_or_else(|| panic!("/proc/self/smaps shows no mapping of {path}")) * 1024
}
