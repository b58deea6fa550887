//! A real filesystem on a crossmirror export: the export is mounted through
//! `nbdfuse` (this machine has no nbd.ko), put on a loop device, formatted
//! ext4 and filled with files; the filesystem must check clean and every file
//! must read back, both through NBD and from the volume file afterwards.
//!
//! Teardown runs in guards (unmount, detach loop, unmount FUSE, in that
//! order) so a failed assertion leaves no mount, loop device or process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use system_tests::{
    random_bytes, require_root, require_tool, run, run_output, sha256, FuseMount, LoopDevice, Process, Scratch,
};

/// A buffered server carries an ext4 filesystem that checks clean and keeps every file.
#[test]
fn ext4_on_buffered_server_checks_clean_and_keeps_files() {
    ext4_round_trip(false);
}

/// An O_DIRECT server carries an ext4 filesystem that checks clean and keeps every file.
#[test]
fn ext4_on_direct_server_checks_clean_and_keeps_files() {
    ext4_round_trip(true);
}

fn ext4_round_trip(direct: bool) {
    for tool in ["nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"] {
        if !require_tool(tool) {
            return;
        }
    }
    if !require_root() {
        return;
    }
    let scratch = Scratch::new(if direct { "mount-direct" } else { "mount-buffered" });
    let volume = scratch.join("volume");
    let mut server = Process::serve_volume(&scratch, "256M", if direct { &["--direct"] } else { &[] });

    // Guards are declared in the reverse of teardown order: Rust drops the mount first, then
    // the loop device, then the FUSE mount, then (last) the server.
    let mut fuse = FuseMount::start(&scratch, &server.uri());
    assert_eq!(std::fs::metadata(fuse.file()).expect("nbdfuse file").len(), 256 << 20, "nbdfuse file size");
    let loop_device = LoopDevice::attach(&fuse.file(), false);
    run("mkfs.ext4", &["-q", &loop_device.path]);
    let mount_point = scratch.join("ext4");
    std::fs::create_dir_all(&mount_point).expect("create ext4 mount point");

    let mut mount = Mount::attach(&loop_device.path, &mount_point, &[]);
    let files = write_tree(&mount_point);
    run("sync", &[]);
    mount.unmount();
    fsck_clean(&loop_device.path, &server);

    let mut mount = Mount::attach(&loop_device.path, &mount_point, &[]);
    verify_tree(&mount_point, &files, "through NBD after remount");
    mount.unmount();
    loop_device.detach_from(&fuse.file());
    fuse.stop();

    let status = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "server exited with {status} on SIGTERM:\n{}", server.log());

    // The volume file itself must now hold the same clean filesystem.
    fsck_clean(volume.to_str().expect("utf-8 path"), &server);
    let loop_device = LoopDevice::attach(&volume, false);
    let mut mount = Mount::attach(&loop_device.path, &mount_point, &["-o", "ro,noload"]);
    verify_tree(&mount_point, &files, "from the volume file after server exit");
    mount.unmount();
}

/// One file written into the filesystem: path relative to the mount point
/// and the SHA-256 of its content.
struct WrittenFile {
    relative: PathBuf,
    digest: String,
}

/// Writes large random files, small files in a directory tree and an empty
/// file; returns what was written.
fn write_tree(root: &Path) -> Vec<WrittenFile> {
    let mut contents: Vec<(PathBuf, Vec<u8>)> = vec![
        (PathBuf::from("large-4MiB.bin"), random_bytes(4 << 20, 1)),
        // An odd size, so the last block is partial.
        (PathBuf::from("large-odd.bin"), random_bytes(3 * (1 << 20) + 12345, 2)),
        (PathBuf::from("empty"), Vec::new()),
    ];
    for directory in 0..4u64 {
        for nested in 0..3u64 {
            for file in 0..5u64 {
                let seed = 100 + directory * 100 + nested * 10 + file;
                let relative = PathBuf::from(format!("dir-{directory}/nested-{nested}/file-{file}.txt"));
                contents.push((relative, random_bytes(1 + (seed as usize * 97) % 20000, seed)));
            }
        }
    }
    contents
        .into_iter()
        .map(|(relative, bytes)| {
            let path = root.join(&relative);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("create directory");
            std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            WrittenFile { relative, digest: sha256_of(&bytes) }
        })
        .collect()
}

/// Checks that exactly `files` are under `root` (besides lost+found) and
/// that each has the digest it was written with.
fn verify_tree(root: &Path, files: &[WrittenFile], when: &str) {
    for file in files {
        let path = root.join(&file.relative);
        assert!(path.is_file(), "{} is missing {when}", file.relative.display());
        assert_eq!(sha256(&path), file.digest, "{} differs {when}", file.relative.display());
    }
    let mut found = Vec::new();
    list_files(root, root, &mut found);
    found.sort();
    let mut expected: Vec<PathBuf> = files.iter().map(|f| f.relative.clone()).collect();
    expected.sort();
    assert_eq!(found, expected, "set of files {when}");
}

fn list_files(root: &Path, directory: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(directory).expect("read directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            if path != root.join("lost+found") {
                list_files(root, &path, found);
            }
        } else {
            found.push(path.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
}

/// SHA-256 of bytes in memory, via coreutils (as the harness's `sha256`).
fn sha256_of(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start sha256sum");
    child.stdin.take().expect("stdin").write_all(bytes).expect("feed sha256sum");
    let output = child.wait_with_output().expect("sha256sum output");
    assert!(output.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&output.stdout).split_whitespace().next().expect("digest").to_string()
}

/// `e2fsck -fn` must find nothing to fix (exit 0).
fn fsck_clean(device: &str, server: &Process) {
    let output = run_output("e2fsck", &["-fn", device]);
    assert!(
        output.status.success(),
        "e2fsck -fn {device} exited with {}:\n{}\n{}\nserver log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        server.log()
    );
}

/// A mounted filesystem, lazily unmounted on drop if the test did not
/// unmount it.
struct Mount {
    point: PathBuf,
    mounted: bool,
}

impl Mount {
    fn attach(device: &str, point: &Path, options: &[&str]) -> Mount {
        let point_arg = point.to_str().expect("utf-8 path");
        let mut args: Vec<&str> = options.to_vec();
        args.extend_from_slice(&[device, point_arg]);
        run("mount", &args);
        Mount { point: point.to_path_buf(), mounted: true }
    }

    fn unmount(&mut self) {
        run("umount", &[self.point.to_str().expect("utf-8 path")]);
        self.mounted = false;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.point).status();
        }
    }
}
