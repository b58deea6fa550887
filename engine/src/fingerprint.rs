//! A store's fingerprint: a hash of *where* a store's data lives, recorded
//! in its metadata, so that a store swapped behind crossmirror's back (a new
//! blank file at the same path, another disk on the same device node, a
//! file restored from a backup) is told apart from the one last synced
//! (DESIGN.md §4, invariant 9).
//!
//! ```text
//!  regular file  ─▶ device, inode, birth time      (a new or restored file is a new inode)
//!  loop device   ─▶ its backing file's fingerprint, offset
//!  other device  ─▶ device number + what sysfs names the medium by (wwid, serial, partition start)
//! ```
//!
//! DRBD keeps its metadata inside the backing device ("internal meta-data")
//! for the same reason; crossmirror keeps its metadata beside the store or
//! in a metadata directory and proves instead that the store is the same
//! one. What a fingerprint cannot see: a store overwritten in place (`dd`
//! onto the same file or disk) while crossmirror was stopped. The README
//! says to move the metadata aside after such a restore.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A store's fingerprint and a description of what it was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The hash recorded in the metadata; never zero (zero means unknown).
    pub value: u64,
    /// What the hash was made from, for messages.
    pub description: String,
}

/// The fingerprint of the store at `path` (a regular file or a block device).
pub fn fingerprint(path: &Path) -> io::Result<Fingerprint> {
    let metadata = fs::metadata(path)?;
    let description = if metadata.file_type().is_block_device() {
        block_device_description(metadata.rdev())
    } else {
        file_description(path)?
    };
    let digest = Sha256::digest(description.as_bytes());
    let value = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")).max(1);
    Ok(Fingerprint { value, description })
}

/// Device, inode and birth time of a regular file (birth time where the
/// filesystem records it; the inode number alone otherwise).
fn file_description(path: &Path) -> io::Result<String> {
    let metadata = fs::metadata(path)?;
    let born =
        birth_time(path).map_or_else(|| "unknown".to_string(), |(seconds, nanos)| format!("{seconds}.{nanos:09}"));
    Ok(format!("file dev {:#x} inode {} born {born}", metadata.dev(), metadata.ino()))
}

/// The birth time of the file at `path` by statx, when the filesystem has one.
fn birth_time(path: &Path) -> Option<(i64, u32)> {
    let name = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statx is plain old data; all zeroes is a valid value.
    let mut buffer: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a NUL-terminated path that outlives the call, and
    // `buffer` is a valid, writable statx struct for the kernel to fill.
    let result = unsafe { libc::statx(libc::AT_FDCWD, name.as_ptr(), 0, libc::STATX_BTIME, &mut buffer) };
    (result == 0 && buffer.stx_mask & libc::STATX_BTIME != 0)
        .then_some((buffer.stx_btime.tv_sec, buffer.stx_btime.tv_nsec))
}

/// What names the medium behind block device `rdev`, from sysfs.
fn block_device_description(rdev: u64) -> String {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sysfs = format!("/sys/dev/block/{major}:{minor}");
    let mut description = format!("block device {major}:{minor}");
    let read = |name: &str| fs::read_to_string(format!("{sysfs}/{name}")).ok().map(|text| text.trim().to_string());
    if let Some(backing) = read("loop/backing_file") {
        let backing_description =
            file_description(Path::new(&backing)).unwrap_or_else(|error| format!("{backing}: {error}"));
        description
            .push_str(&format!(" loop over {backing_description} offset {}", read("loop/offset").unwrap_or_default()));
    }
    for name in ["wwid", "device/wwid", "device/serial", "serial", "dm/uuid", "md/uuid", "partition", "start"] {
        if let Some(value) = read(name).filter(|value| !value.is_empty()) {
            description.push_str(&format!(" {name} {value}"));
        }
    }
    // A partition's medium is its parent disk's.
    if read("partition").is_some() {
        for name in ["../wwid", "../device/wwid", "../device/serial", "../serial"] {
            if let Some(value) = read(name).filter(|value| !value.is_empty()) {
                description.push_str(&format!(" {name} {value}"));
            }
        }
    }
    description
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file keeps its fingerprint across renames; a new file at the same
    /// path (same size, same contents) gets another.
    #[test]
    fn a_replaced_file_has_another_fingerprint() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = directory.path().join("store");
        fs::write(&path, b"data").unwrap();
        let first = fingerprint(&path).unwrap();
        assert_ne!(first.value, 0);
        assert_eq!(fingerprint(&path).unwrap(), first);
        let moved = directory.path().join("moved");
        fs::rename(&path, &moved).unwrap();
        assert_eq!(fingerprint(&moved).unwrap().value, first.value, "a rename keeps the data's home");
        // Keep the old inode alive so the new file cannot reuse its number.
        fs::write(&path, b"data").unwrap();
        assert_ne!(fingerprint(&path).unwrap().value, first.value, "{}", first.description);
    }
}
