//! The production host's own store and its metadata under failure, against
//! the real binary: a store whose writeback fails, found by a client's FLUSH
//! (issue 8, item 5) or by the host's own writeback check when no client
//! flushes (issue 12, twelfth session's clearing rule), a full
//! filesystem under the bitmap (item 2), and where a block device's
//! metadata lives (item 6). Each needs root (tmpfs mounts, loop devices).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use system_tests::{
    binary, free_port, free_port_on, nbdsh_script, require_root, require_tool, run, run_output, wait_until,
    write_secret, CopyHost, LoopDevice, Process, Scratch, Tmpfs,
};

fn status(admin: SocketAddr) -> serde_json::Value {
    let admin = admin.to_string();
    let text = run(binary().to_str().unwrap(), &["status", "--admin", &admin, "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("status is not JSON ({error}):\n{text}"))
}

fn qemu_io(uri: &str, command: &str) -> std::process::Output {
    run_output("qemu-io", &["-f", "raw", "-c", command, uri])
}

fn ready() -> bool {
    require_root() && require_tool("qemu-io") && require_tool("losetup") && require_tool("dd")
}

/// Start `serve` with `args` plus a fresh --listen and --admin; the process and its admin address.
fn serve(scratch: &Scratch, args: &[&str]) -> Result<(Process, SocketAddr), String> {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (admin_text, listen) = (admin.to_string(), address.to_string());
    let mut all = vec!["serve", "--listen", &listen, "--admin", &admin_text];
    all.extend_from_slice(args);
    Process::try_start(scratch, &all, address).map(|process| (process, admin))
}

/// A production store that can be made to fail its writeback: a buffered
/// loop device over a 64 MiB file on a 40 MiB tmpfs (fill the tmpfs and the
/// kernel's writeback of the device fails), mirrored to one copy host, its
/// metadata in `metadata_dir`. Dropped copy host first, then the device, then
/// the tmpfs.
struct FillingStore {
    copy: CopyHost,
    device: LoopDevice,
    small: Tmpfs,
    metadata_dir: PathBuf,
    secret: PathBuf,
    scratch: Scratch,
}

impl FillingStore {
    fn new(name: &str) -> FillingStore {
        let scratch = Scratch::new(name);
        let small = Tmpfs::mount(name, "40m");
        let backing = small.path.join("backing.img");
        std::fs::File::create(&backing).unwrap().set_len(64 << 20).unwrap();
        let device = LoopDevice::attach(&backing, false);
        let secret = write_secret(&scratch, "secret", 3);
        let copy = CopyHost::start(&scratch, "127.0.0.2", &scratch.join("copy.img"), "64M", &secret, &[]);
        let metadata_dir = scratch.join("metadata");
        FillingStore { copy, device, small, metadata_dir, secret, scratch }
    }

    /// Serve it (a start refused: the log).
    fn serve(&self) -> Result<(Process, SocketAddr), String> {
        let (secret, mirror) = (self.secret.display().to_string(), format!("east={}", self.copy.address));
        let metadata_dir = self.metadata_dir.display().to_string();
        let args = ["--volume", &self.device.path, "--secret-file", &secret, "--mirror", &mirror];
        serve(&self.scratch, &[&args[..], &["--metadata-dir", &metadata_dir]].concat())
    }

    /// Serve it and wait until the copy is up to date.
    fn serve_up_to_date(&self) -> (Process, SocketAddr) {
        let (production, admin) = self.serve().unwrap_or_else(|log| panic!("{log}"));
        let up_to_date = || status(admin)["copies"][0]["state"] == "up_to_date";
        assert!(wait_until(Duration::from_secs(60), up_to_date), "{:#}\n{}", status(admin), production.log());
        (production, admin)
    }
}

/// Item 5: the production store is a buffered block device whose writeback
/// fails (a loop device over a file on a filesystem that fills up). The
/// flush that finds it answers EIO; from then on the host says so: status
/// shows the local store failed and the copy `diverged` (it holds writes the
/// store lost), reads and writes get EIO, and a restart refuses the store.
/// Item 6 on the way: the block device's metadata is in --metadata-dir, not /dev.
#[test]
fn a_failed_local_flush_stops_the_claim_that_the_mirror_is_consistent() {
    if !ready() {
        return;
    }
    let store = FillingStore::new("local-store-failed");
    let (small, device, metadata_dir) = (&store.small, &store.device, &store.metadata_dir);
    let (mut production, admin) = store.serve_up_to_date();
    let escaped = device.path.trim_start_matches('/').replace('/', "%2F");
    assert!(metadata_dir.join(format!("{escaped}.cmmeta")).exists(), "metadata is in --metadata-dir");
    assert!(metadata_dir.join(format!("{escaped}.cmbitmap")).exists());
    assert!(!Path::new(&format!("{}.cmmeta", device.path)).exists(), "no metadata is written into /dev");

    // 8 MiB into the page cache while the device's file has room; then the
    // filesystem under it fills up, so their writeback fails at the flush.
    // (qemu-io flushes when it closes, so libnbd writes, fills, flushes in
    // one session. Writes that find the filesystem full already fail
    // themselves on this kernel: the easy case, the client gets EIO.)
    let filler = small.path.join("filler");
    let script = format!(
        r#"
import nbd, subprocess
h = nbd.NBD()
h.connect_uri("{uri}")
h.pwrite(b"\x5a" * (8 << 20), 0)
subprocess.run(["dd", "if=/dev/zero", "of={filler}", "bs=1M"], capture_output=True)
try:
    h.flush()
    print("flush ok")
except nbd.Error as error:
    print("flush failed", error)
"#,
        uri = production.uri(),
        filler = filler.display()
    );
    let flushed = nbdsh_script(&script);
    assert!(flushed.contains("flush failed"), "the flush must fail: {flushed}\n{}", production.log());
    let uri = production.uri();
    let document = status(admin);
    assert_eq!(document["local_store"]["state"], "failed", "{document:#}");
    assert_eq!(document["copies"][0]["state"], "diverged", "{document:#}");
    assert!(production.log().contains("a flush of the local store failed"), "{}", production.log());
    let read = qemu_io(&uri, "read 0 4k");
    let text = format!("{}{}", String::from_utf8_lossy(&read.stdout), String::from_utf8_lossy(&read.stderr));
    assert!(!read.status.success() || text.contains("error"), "reads of a failed store get EIO: {text}");
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_uri("{uri}")
for name, call in (("write", lambda: h.pwrite(b"x" * 4096, 0)), ("flush", h.flush)):
    try:
        call()
        print(name, "succeeded")
    except nbd.Error as error:
        print(name, "failed", error)
"#
    );
    let later = nbdsh_script(&script);
    assert!(
        later.contains("write failed") && later.contains("flush failed"),
        "writes and flushes of a failed store get EIO: {later}"
    );
    let table = run(binary().to_str().unwrap(), &["status", "--admin", &admin.to_string()]);
    assert!(table.contains("LOCAL STORE FAILED"), "{table}");

    let status = production.stop_with(libc::SIGTERM);
    assert!(status.code().is_some(), "{status}");
    let refused = store.serve().map(|_| ()).expect_err("a failed store is not served again");
    assert!(refused.contains("failed a flush"), "{refused}");
}

/// A volume the activity log holds whole (here 64 MiB) lets a copy's bits
/// clear at its FlushAck without an fsync of this host's store (c374aab):
/// the extents stay in the durable log until a clean stop. What keeps that
/// honest when the kernel's writeback of the store fails and no client ever
/// sends a FLUSH is the `local-sync` thread's writeback check on a file of its
/// own. Here the store is a buffered block device whose writeback fails (a
/// loop device over a file on a filesystem that is full), 8 MiB is written
/// with no FLUSH, and the kernel writes it back and fails, on its own or
/// because another process asks it to (as `sync` or memory pressure would).
/// The check alone must find it: the store is failed (status, EIO to
/// clients, every copy `diverged`) and the next start refuses it. The
/// filesystem is filled before the writes, since on a busy machine the
/// kernel may write them back at once. Seen failing with the check's result
/// ignored.
#[test]
fn a_writeback_failure_that_no_client_flush_sees_still_fails_the_store() {
    if !(ready() && require_tool("blockdev")) {
        return;
    }
    let store = FillingStore::new("local-store-writeback");
    let (small, device) = (&store.small, &store.device);
    let (mut production, admin) = store.serve_up_to_date();
    let copy_state = |field: &str| status(admin)["copies"][0][field].clone();
    small.fill();

    // 8 MiB into the page cache, no FLUSH (libnbd does not flush at close).
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_uri("{uri}")
h.pwrite(b"\x5a" * (8 << 20), 0)
h.shutdown()
print("written")
"#,
        uri = production.uri()
    );
    let written = nbdsh_script(&script);
    assert!(written.contains("written"), "{written}");
    // The BLKFLSBUF ioctl does not report the error to blockdev: the host
    // must learn of it on its own.
    let _ = run_output("blockdev", &["--flushbufs", device.path.as_str()]);
    let failed = wait_until(Duration::from_secs(20), || status(admin)["local_store"]["state"] == "failed");
    assert!(failed, "the writeback check finds the lost writes: {:#}\n{}", status(admin), production.log());
    assert_eq!(copy_state("state"), "diverged", "{:#}", status(admin));
    assert!(
        production.log().contains("a background fsync or writeback of the local store failed"),
        "{}",
        production.log()
    );
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_uri("{uri}")
try:
    h.pwrite(b"x" * 4096, 0)
    print("write succeeded")
except nbd.Error as error:
    print("write failed", error)
"#,
        uri = production.uri()
    );
    let later = nbdsh_script(&script);
    assert!(later.contains("write failed"), "writes to a failed store get EIO: {later}");

    let status = production.stop_with(libc::SIGTERM);
    assert!(status.code().is_some(), "{status}");
    let refused = store.serve().map(|_| ()).expect_err("a failed store is not served again");
    assert!(refused.contains("failed a flush"), "{refused}");
}

/// Item 2: the bitmap lives on a filesystem that fills up after the host
/// started. Stores into the bitmap's mapping must not raise SIGBUS: every
/// page was allocated when the file was made, so writes that mark new
/// regions all over the volume still succeed and the host keeps serving.
#[test]
fn a_full_metadata_filesystem_does_not_kill_the_host() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new("local-store-full-metadata");
    let small = Tmpfs::mount("local-store-metadata", "24m");
    let secret = write_secret(&scratch, "secret", 4);
    let volume = scratch.join("volume.img");
    // 64 GiB at 4 KiB regions: a 16 MiB bitmap; one bitmap page per 128 MiB.
    let copy_address = format!("east=127.0.0.2:{}", free_port_on("127.0.0.2"));
    let args = [
        "--volume",
        volume.to_str().unwrap(),
        "--size",
        "64G",
        "--region-size",
        "4K",
        "--secret-file",
        secret.to_str().unwrap(),
        "--mirror",
        &copy_address,
        "--metadata-dir",
        small.path.to_str().unwrap(),
    ];
    let (production, admin) = serve(&scratch, &args).unwrap_or_else(|log| panic!("{log}"));
    small.fill();
    let uri = production.uri();
    for index in 0..40u64 {
        let offset = index * (1536 << 20);
        let output = qemu_io(&uri, &format!("write -P 0x{:02x} {offset} 4k", index + 1));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success() && !text.contains("error"), "write at {offset}: {text}\n{}", production.log());
    }
    let document = status(admin);
    assert_eq!(document["copies"][0]["state"], "stale", "{document:#}");
    assert!(document["copies"][0]["dirty_bytes"].as_u64().unwrap() > 0, "{document:#}");
}

/// Item 6: with no --metadata-dir, a block device's metadata goes to
/// /var/lib/crossmirror (created if missing), named by the device's path.
#[test]
fn block_device_metadata_defaults_to_var_lib() {
    if !ready() {
        return;
    }
    let scratch = Scratch::new("local-store-default-metadata");
    let backing = scratch.join("backing.img");
    std::fs::File::create(&backing).unwrap().set_len(16 << 20).unwrap();
    let device = LoopDevice::attach(&backing, false);
    let escaped = device.path.trim_start_matches('/').replace('/', "%2F");
    let files: Vec<PathBuf> = [".cmmeta", ".cmbitmap", ".cmcopies"]
        .iter()
        .map(|suffix| PathBuf::from(format!("/var/lib/crossmirror/{escaped}{suffix}")))
        .collect();
    struct Remove(Vec<PathBuf>);
    impl Drop for Remove {
        fn drop(&mut self) {
            for path in &self.0 {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    // The activity log is made there too: removed before and after like
    // the others (one left by an earlier run makes the metadata look lost).
    let activity_log = PathBuf::from(format!("/var/lib/crossmirror/{escaped}.cmal"));
    let _remove = Remove(files.iter().cloned().chain([activity_log.clone()]).collect());
    for path in files.iter().chain([&activity_log]) {
        let _ = std::fs::remove_file(path);
    }
    let secret = write_secret(&scratch, "secret", 5);
    let mirror = format!("east=127.0.0.2:{}", free_port_on("127.0.0.2"));
    let args = ["--volume", device.path.as_str(), "--secret-file", secret.to_str().unwrap(), "--mirror", &mirror];
    let (production, _admin) = serve(&scratch, &args).unwrap_or_else(|log| panic!("{log}"));
    for path in &files {
        assert!(path.exists(), "{} is missing:\n{}", path.display(), production.log());
    }
    assert!(!Path::new(&format!("{}.cmmeta", device.path)).exists());
}

/// The production store's own filesystem fills up (a sparse volume on a
/// small tmpfs) while the host serves with a copy. A buffered write
/// without FUA is written on the connection's thread (one with FUA goes
/// through the ring): either way, the one that finds no space is answered
/// ENOSPC (not acknowledged, no crash), the writes before it read back
/// intact, the host keeps serving, and the failed write's extent, of which
/// the store may hold part, is resynced: the copy, once up to date again,
/// holds exactly what the store holds.
#[test]
fn a_full_store_filesystem_fails_the_write_with_enospc_and_keeps_serving() {
    if !ready() {
        return;
    }
    // qemu-io writes with FUA unless its cache mode is writeback.
    for cache in ["writeback", "writethrough"] {
        let scratch = Scratch::new(&format!("local-store-full-volume-{cache}"));
        let small = Tmpfs::mount(&format!("local-store-volume-{cache}"), "8m");
        let secret = write_secret(&scratch, "secret", 5);
        let volume = small.path.join("volume.img");
        let copy_store = scratch.join("copy.img");
        let metadata = scratch.join("metadata");
        std::fs::create_dir_all(&metadata).unwrap();
        let copy = CopyHost::start(&scratch, "127.0.0.2", &copy_store, "64M", &secret, &[]);
        let mirror = format!("east={}", copy.address);
        let args = [
            "--volume",
            volume.to_str().unwrap(),
            "--size",
            "64M",
            "--secret-file",
            secret.to_str().unwrap(),
            "--mirror",
            &mirror,
            "--metadata-dir",
            metadata.to_str().unwrap(),
        ];
        let (production, admin) = serve(&scratch, &args).unwrap_or_else(|log| panic!("{log}"));
        let caught_up = wait_until(Duration::from_secs(30), || status(admin)["copies"][0]["state"] == "up_to_date");
        assert!(caught_up, "{cache}: the copy never caught up: {:#}", status(admin));
        let uri = production.uri();
        let io = |command: &str| {
            let output = run_output("qemu-io", &["-f", "raw", "-t", cache, "-c", command, &uri]);
            let text = String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
            (output.status.success(), text)
        };
        let mut failed_at = None;
        for index in 0..16u64 {
            let offset = index * (1 << 20);
            let (ok, text) = io(&format!("write -P 0x{:02x} {offset} 1M", index + 1));
            if text.contains("No space left on device") {
                failed_at = Some(index);
                break;
            }
            assert!(ok && !text.contains("error"), "{cache}: write at {offset}: {text}\n{}", production.log());
        }
        let failed_at =
            failed_at.unwrap_or_else(|| panic!("{cache}: no write found the filesystem full\n{}", production.log()));
        assert!(failed_at > 0, "{cache}: the first write already failed\n{}", production.log());
        for index in 0..failed_at {
            let (ok, text) = io(&format!("read -P 0x{:02x} {} 1M", index + 1, index * (1 << 20)));
            assert!(
                ok && !text.contains("error") && !text.contains("fail"),
                "{cache}: read back block {index}: {text}"
            );
        }
        let (ok, text) = io("flush");
        assert!(ok, "{cache}: flush: {text}");
        let resynced = wait_until(Duration::from_secs(30), || {
            let document = status(admin);
            document["copies"][0]["state"] == "up_to_date"
                && document["copies"][0]["resync_bytes_done"].as_u64().unwrap_or(0) >= 1 << 20
        });
        assert!(resynced, "{cache}: the failed write's extent was not resynced: {:#}", status(admin));
        let read = |path: &Path| std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
        assert!(read(&volume) == read(&copy_store), "{cache}: the copy reads as up to date but differs from the store");
    }
}
