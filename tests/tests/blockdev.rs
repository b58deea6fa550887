//! Serving a block device (a loop device over a scratch file): real clients
//! see its size, copy data in and out, and TRIM and WRITE_ZEROES reach the
//! device. Also the `--size` checks: a size that disagrees with an existing
//! device or file, or a missing volume without `--size`, is refused with a
//! message that says what to do.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use system_tests::{
    binary, free_port, nbdsh_script, random_bytes, require_root, require_tool, run, LoopDevice, Process, Scratch,
};

const DEVICE_BYTES: u64 = 128 << 20;

/// A buffered server on a buffered loop device: size, copy round trip, flush, TRIM and WRITE_ZEROES all work.
#[test]
fn buffered_server_on_loop_device_serves_it_whole() {
    serve_loop_device(false, false);
}

/// An O_DIRECT server on a buffered loop device: size, copy round trip, flush, TRIM and WRITE_ZEROES all work.
#[test]
fn direct_server_on_loop_device_serves_it_whole() {
    serve_loop_device(true, false);
}

/// An O_DIRECT server on a direct-I/O loop device: size, copy round trip, flush, TRIM and WRITE_ZEROES all work.
#[test]
fn direct_server_on_direct_io_loop_device_serves_it_whole() {
    serve_loop_device(true, true);
}

/// A buffered server on a direct-I/O loop device: size, copy round trip, flush, TRIM and WRITE_ZEROES all work.
#[test]
fn buffered_server_on_direct_io_loop_device_serves_it_whole() {
    serve_loop_device(false, true);
}

/// A `--size` that disagrees with a block device's size is refused, naming both sizes.
#[test]
fn size_disagreeing_with_block_device_is_refused() {
    if !require_tool("losetup") || !require_root() {
        return;
    }
    let scratch = Scratch::new("blockdev-size");
    let backing = scratch.join("backing");
    make_sparse_file(&backing, DEVICE_BYTES);
    let loop_device = LoopDevice::attach(&backing, false);
    let output = serve_expecting_exit(&["--volume", &loop_device.path, "--size", "64M"]);
    assert_refused_naming_sizes(&output, DEVICE_BYTES, 64 << 20);
}

/// A `--size` that disagrees with an existing regular file is refused, naming both sizes.
#[test]
fn size_disagreeing_with_existing_file_is_refused() {
    let scratch = Scratch::new("file-size");
    let volume = scratch.join("volume");
    make_sparse_file(&volume, 64 << 20);
    let output = serve_expecting_exit(&["--volume", volume.to_str().expect("utf-8 path"), "--size", "32M"]);
    assert_refused_naming_sizes(&output, 64 << 20, 32 << 20);
    assert_eq!(std::fs::metadata(&volume).expect("volume").len(), 64 << 20, "the refused server resized the file");
}

/// A volume path that does not exist, without `--size`, is refused with a message that mentions --size.
#[test]
fn absent_volume_without_size_is_refused() {
    let scratch = Scratch::new("absent-volume");
    let volume = scratch.join("absent");
    let output = serve_expecting_exit(&["--volume", volume.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "server accepted an absent volume without --size: {stderr}");
    assert!(stderr.contains("--size"), "error does not mention --size: {stderr}");
    assert!(!volume.exists(), "the refused server created the volume");
}

fn serve_loop_device(direct_server: bool, direct_loop: bool) {
    for tool in ["losetup", "nbdinfo", "nbdcopy", "qemu-img", "cmp"] {
        if !require_tool(tool) {
            return;
        }
    }
    if !require_root() {
        return;
    }
    let scratch = Scratch::new("blockdev");
    let backing = scratch.join("backing");
    make_sparse_file(&backing, DEVICE_BYTES);
    let loop_device = LoopDevice::attach(&backing, direct_loop);
    let mut args = vec!["--volume", loop_device.path.as_str()];
    if direct_server {
        args.push("--direct");
    }
    let mut server = Process::serve(&scratch, &args);
    let uri = server.uri();

    let info: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--json", &uri])).expect("nbdinfo --json output");
    assert_eq!(info["exports"][0]["export-size"].as_u64(), Some(DEVICE_BYTES), "export size: {info}");

    // nbdcopy in and out, then compare.
    let input = scratch.join("in.bin");
    let output = scratch.join("out.bin");
    std::fs::write(&input, random_bytes(DEVICE_BYTES as usize, 7)).expect("write input");
    run("nbdcopy", &[input.to_str().expect("utf-8 path"), &uri]);
    run("nbdcopy", &[&uri, output.to_str().expect("utf-8 path")]);
    run("cmp", &[input.to_str().expect("utf-8 path"), output.to_str().expect("utf-8 path")]);

    // After a FLUSH the backing file behind the loop device holds the same data.
    nbdsh_script(&format!("import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\nh.flush()\nh.shutdown()\n"));
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &uri, backing.to_str().expect("utf-8 path")]);

    // TRIM succeeds and reaches the device: the loop driver turns the
    // discard into a hole in the backing file.
    let allocated_before = std::fs::metadata(&backing).expect("backing").blocks();
    nbdsh_script(&format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri({uri:?})\nh.trim({len}, {offset})\nh.flush()\nh.shutdown()\n",
        len = 16 << 20,
        offset = 32 << 20
    ));
    let allocated_after = std::fs::metadata(&backing).expect("backing").blocks();
    assert!(
        allocated_after < allocated_before,
        "TRIM of 16 MiB left the backing file's allocation unchanged ({allocated_before} -> {allocated_after} \
         blocks):\n{}",
        server.log()
    );

    // WRITE_ZEROES reads back as zeros, through NBD and in the backing file;
    // the data around it is untouched.
    let zero_offset: u64 = (64 << 20) + 4096;
    let zero_len: u64 = (3 << 20) + 512;
    let answer = nbdsh_script(&format!(
        "import nbd\n\
         h = nbd.NBD()\n\
         h.connect_uri({uri:?})\n\
         h.zero({zero_len}, {zero_offset})\n\
         h.flush()\n\
         data = h.pread({zero_len}, {zero_offset})\n\
         print('zeros' if data == bytes({zero_len}) else 'not zeros')\n\
         h.shutdown()\n"
    ));
    assert_eq!(answer.trim(), "zeros", "WRITE_ZEROES did not read back as zeros:\n{}", server.log());
    let mut expected = std::fs::read(&input).expect("read input");
    expected[zero_offset as usize..(zero_offset + zero_len) as usize].fill(0);
    let backing_bytes = std::fs::read(&backing).expect("read backing file");
    // The trimmed range may read back as anything; everything else is known.
    for range in [0..(32 << 20), (48 << 20)..expected.len()] {
        if expected[range.clone()] != backing_bytes[range.clone()] {
            let first = range.clone().find(|&i| expected[i] != backing_bytes[i]).expect("a differing byte");
            panic!("backing file differs from what was written at byte {first}:\n{}", server.log());
        }
    }

    let status = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "server exited with {status} on SIGTERM:\n{}", server.log());
}

fn make_sparse_file(path: &Path, bytes: u64) {
    let file = std::fs::File::create(path).expect("create file");
    file.set_len(bytes).expect("size file");
}

/// Runs `crossmirror serve` on a free port with `args`; it must exit by
/// itself within 10 s (it is killed, and the test fails, otherwise).
fn serve_expecting_exit(args: &[&str]) -> Output {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(binary())
        .args(["serve", "--listen", &listen])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start crossmirror");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("output");
            panic!(
                "crossmirror serve {args:?} was expected to refuse and exit, but ran for 10 s:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// The server exited non-zero and its error names both sizes (in bytes or
/// in MiB).
fn assert_refused_naming_sizes(output: &Output, actual_bytes: u64, requested_bytes: u64) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "server accepted a disagreeing --size: {stderr}");
    for bytes in [actual_bytes, requested_bytes] {
        let mib = bytes >> 20;
        let spellings = [bytes.to_string(), format!("{mib}M"), format!("{mib} MiB"), format!("{mib}MiB")];
        assert!(
            spellings.iter().any(|spelling| stderr.contains(spelling.as_str())),
            "error does not name the size {bytes} ({mib} MiB): {stderr}"
        );
    }
}
