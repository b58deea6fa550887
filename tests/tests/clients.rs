//! Real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io, fio, python
//! libnbd) against a running `crossmirror serve`. Each test starts its own
//! server on its own scratch directory, so the tests run in parallel.

use std::process::Output;

use system_tests::{nbdsh_script, random_bytes, require_tool, run_output, Process, Scratch};

const MIB: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 64 * MIB;
/// The largest READ/WRITE payload the server must accept (NBD.md).
const PAYLOAD_BYTES_MIN: u64 = 32 * MIB;
/// How long any one client run may take before the test calls it a hang.
const CLIENT_SECONDS_MAX: u64 = 300;

/// Start a server on a fresh 64 MiB sparse volume in `scratch`.
fn serve(scratch: &Scratch, extra: &[&str]) -> Process {
    Process::serve_volume(scratch, "64M", extra)
}

/// Run `program` under coreutils `timeout`, so a hung server fails the test
/// instead of hanging it; returns the output whatever the exit status.
fn run_bounded(program: &str, args: &[&str]) -> Output {
    let seconds = CLIENT_SECONDS_MAX.to_string();
    let mut all = vec!["--kill-after=5", seconds.as_str(), program];
    all.extend_from_slice(args);
    let output = run_output("timeout", &all);
    let code = output.status.code();
    assert!(
        code != Some(124) && code != Some(137),
        "{program} {args:?} did not finish within {seconds} s (server hang?)\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Like [`run_bounded`], but panic with the output unless the exit status is 0.
fn run_checked(program: &str, args: &[&str]) -> Output {
    let output = run_bounded(program, args);
    assert!(output.status.success(), "{program} {args:?} failed ({}):\n{}", output.status, combined(&output));
    output
}

/// [`run_checked`], returning stdout only.
fn run_stdout(program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_checked(program, args).stdout).into_owned()
}

fn combined(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Run a python libnbd script with `URI` bound to the server's URI; the
/// script kills itself after two minutes so a hung server cannot hang the test.
fn python(server: &Process, script: &str) -> String {
    nbdsh_script(&format!(
        "import nbd, signal, sys, random\nsignal.alarm(120)\nURI = {:?}\nMiB = 1 << 20\n{script}",
        server.uri()
    ))
}

fn path_str(path: &std::path::Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn assert_server_clean(server: &Process) {
    let log = server.log();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}

/// `nbdinfo --json` on `uri`, parsed, with its one export.
fn nbdinfo_export(uri: &str) -> (serde_json::Value, serde_json::Value) {
    let text = run_stdout("nbdinfo", &["--json", uri]);
    let info: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("nbdinfo printed bad JSON ({e}):\n{text}"));
    let exports = info["exports"].as_array().unwrap_or_else(|| panic!("no exports array:\n{text}"));
    assert_eq!(exports.len(), 1, "expected exactly one export:\n{text}");
    let export = exports[0].clone();
    (info, export)
}

/// nbdinfo sees a 64 MiB export with structured replies, every capability,
/// sane block sizes (maximum ≥ 32 MiB) and the base:allocation context.
#[test]
fn nbdinfo_json_reports_size_capabilities_and_block_sizes() {
    if !require_tool("nbdinfo") {
        return;
    }
    let scratch = Scratch::new("nbdinfo-json");
    let server = serve(&scratch, &[]);
    let (info, export) = nbdinfo_export(&server.uri());
    assert_eq!(info["protocol"], "newstyle-fixed", "{info:#}");
    assert_eq!(info["structured"], true, "{info:#}");
    assert_eq!(export["export-size"].as_u64(), Some(VOLUME_BYTES), "{export:#}");
    assert_eq!(export["is_read_only"], false, "{export:#}");
    for capability in
        ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_fast_zero", "can_cache", "can_df"]
    {
        assert_eq!(export[capability], true, "{capability} should be true: {export:#}");
    }
    let minimum = export["block_size_minimum"].as_u64().expect("block_size_minimum");
    let preferred = export["block_size_preferred"].as_u64().expect("block_size_preferred");
    let maximum = export["block_size_maximum"].as_u64().expect("block_size_maximum");
    assert!(minimum >= 1 && minimum.is_power_of_two(), "minimum {minimum}");
    assert!(preferred >= minimum && preferred.is_power_of_two(), "preferred {preferred}");
    assert!(maximum >= preferred && maximum >= PAYLOAD_BYTES_MIN, "maximum {maximum} must be ≥ 32 MiB");
    let contexts = export["contexts"].as_array().expect("contexts");
    assert!(contexts.iter().any(|c| c == "base:allocation"), "no base:allocation in {contexts:?}");
    assert_server_clean(&server);
}

/// A `--read-only` export is reported read-only and still readable.
#[test]
fn nbdinfo_json_reports_read_only_export() {
    if !require_tool("nbdinfo") {
        return;
    }
    let scratch = Scratch::new("nbdinfo-ro");
    let volume = scratch.join("volume.img");
    std::fs::File::create(&volume).and_then(|f| f.set_len(VOLUME_BYTES)).expect("create volume");
    let server = Process::serve(&scratch, &["--volume", path_str(&volume), "--read-only"]);
    let (_, export) = nbdinfo_export(&server.uri());
    assert_eq!(export["is_read_only"], true, "{export:#}");
    assert_eq!(export["export-size"].as_u64(), Some(VOLUME_BYTES), "{export:#}");
    assert_server_clean(&server);
}

/// `nbdinfo --list` names the export given by `--export`, and that name
/// (as well as the empty name) connects.
#[test]
fn nbdinfo_list_shows_named_export() {
    if !require_tool("nbdinfo") {
        return;
    }
    let scratch = Scratch::new("nbdinfo-list");
    let server = serve(&scratch, &["--export", "disk0"]);
    let text = run_stdout("nbdinfo", &["--list", "--json", &server.uri()]);
    let info: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"));
    let exports = info["exports"].as_array().unwrap_or_else(|| panic!("no exports:\n{text}"));
    assert_eq!(exports.len(), 1, "{text}");
    assert_eq!(exports[0]["export-name"], "disk0", "{text}");
    assert_eq!(exports[0]["export-size"].as_u64(), Some(VOLUME_BYTES), "{text}");
    let (_, named) = nbdinfo_export(&format!("{}/disk0", server.uri()));
    assert_eq!(named["export-name"], "disk0", "{named:#}");
    let (_, default) = nbdinfo_export(&server.uri());
    assert_eq!(default["export-size"].as_u64(), Some(VOLUME_BYTES), "{default:#}");
    assert_server_clean(&server);
}

/// Asking for an export name the server does not have fails the client,
/// and the server keeps serving.
#[test]
fn nbdinfo_unknown_export_name_fails() {
    if !require_tool("nbdinfo") {
        return;
    }
    let scratch = Scratch::new("nbdinfo-unknown");
    let server = serve(&scratch, &["--export", "disk0"]);
    let output = run_bounded("nbdinfo", &[&format!("{}/nope", server.uri())]);
    assert!(!output.status.success(), "nbdinfo on an unknown export succeeded:\n{}", combined(&output));
    let (_, export) = nbdinfo_export(&format!("{}/disk0", server.uri()));
    assert_eq!(export["export-size"].as_u64(), Some(VOLUME_BYTES));
    assert_server_clean(&server);
}

fn nbdcopy_round_trip(label: &str, extra: &[&str]) {
    if !require_tool("nbdcopy") || !require_tool("cmp") {
        return;
    }
    let scratch = Scratch::new(label);
    let server = serve(&scratch, extra);
    let source_bytes = 48 * MIB as usize;
    let source = scratch.join("source.img");
    std::fs::write(&source, random_bytes(source_bytes, 0x5eed_c0de)).expect("write source");
    run_checked("nbdcopy", &[path_str(&source), &server.uri()]);
    let copy = scratch.join("copy.img");
    run_checked("nbdcopy", &[&server.uri(), path_str(&copy)]);
    let output = run_output("cmp", &["-n", &source_bytes.to_string(), path_str(&source), path_str(&copy)]);
    assert!(output.status.success(), "the copy differs from the source:\n{}", combined(&output));
    let copied = std::fs::read(&copy).expect("read copy");
    assert_eq!(copied.len() as u64, VOLUME_BYTES, "nbdcopy out should copy the whole export");
    assert!(copied[source_bytes..].iter().all(|&b| b == 0), "the never-written tail of the export is not zero");
    assert_server_clean(&server);
}

/// A 48 MiB random file survives nbdcopy into the export and back out.
#[test]
fn nbdcopy_round_trip_preserves_random_file() {
    nbdcopy_round_trip("nbdcopy", &[]);
}

/// The same nbdcopy round trip holds when the server uses O_DIRECT.
#[test]
fn nbdcopy_round_trip_preserves_random_file_with_direct_io() {
    nbdcopy_round_trip("nbdcopy-direct", &["--direct"]);
}

/// qemu-img writes a local image into the export and `qemu-img compare`
/// finds them identical, and finds a one-byte difference made through NBD.
#[test]
fn qemu_img_compare_matches_local_image() {
    if !require_tool("qemu-img") || !require_tool("qemu-io") {
        return;
    }
    let scratch = Scratch::new("qemu-img");
    let server = serve(&scratch, &[]);
    let local = scratch.join("local.img");
    let bytes = random_bytes(VOLUME_BYTES as usize, 0xc0ffee);
    std::fs::write(&local, &bytes).expect("write local image");
    let uri = server.uri();
    run_checked("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", path_str(&local), &uri]);
    run_checked("qemu-img", &["compare", "-f", "raw", "-F", "raw", path_str(&local), &uri]);

    let offset = 12_345_usize;
    let changed = format!("write -P {:#04x} {offset} 1", bytes[offset] ^ 0xff);
    run_checked("qemu-io", &["-f", "raw", &uri, "-c", &changed]);
    let output = run_bounded("qemu-img", &["compare", "-f", "raw", "-F", "raw", path_str(&local), &uri]);
    assert_eq!(output.status.code(), Some(1), "compare must see the changed byte:\n{}", combined(&output));
    // qemu-img reports the first differing 512-byte sector.
    let reported = format!("Content mismatch at offset {}", offset / 512 * 512);
    assert!(combined(&output).contains(&reported), "expected {reported:?}:\n{}", combined(&output));
    assert_server_clean(&server);
}

/// Run `qemu-io` commands on `uri`, and fail on any error or pattern mismatch.
fn qemu_io(uri: &str, commands: &[String]) {
    let mut args = vec!["-f", "raw", uri];
    for command in commands {
        args.extend_from_slice(&["-c", command.as_str()]);
    }
    let text = combined(&run_checked("qemu-io", &args));
    assert!(!text.contains("Pattern verification failed"), "qemu-io {commands:?}:\n{text}");
    assert!(!text.contains("failed"), "qemu-io {commands:?}:\n{text}");
}

fn qemu_io_aligned_and_unaligned(label: &str, extra: &[&str]) {
    if !require_tool("qemu-io") {
        return;
    }
    let scratch = Scratch::new(label);
    let server = serve(&scratch, extra);
    let uri = server.uri();
    let mib = MIB;
    // Writes, each read back at once, each unaligned one followed by reads
    // of its neighbours with the pattern they held before.
    let writes = [
        "write -P 0xab 0 1M".to_string(),
        "read -P 0xab 0 1M".to_string(),
        "write -P 0xcd 513 3000".to_string(),
        "read -P 0xcd 513 3000".to_string(),
        "read -P 0xab 0 513".to_string(),
        format!("read -P 0xab 3513 {}", mib - 3513),
        // Straddles the end of the 0xab range into never-written space.
        format!("write -P 0xef {} 200", mib - 100),
        format!("read -P 0xef {} 200", mib - 100),
        format!("read -P 0x00 {} 4096", mib + 100),
        // Two bytes across a 4 KiB boundary, with FUA.
        "write -f -P 0x11 4095 2".to_string(),
        "read -P 0x11 4095 2".to_string(),
        "read -P 0xab 3513 582".to_string(),
        format!("read -P 0xab 4097 {}", mib - 100 - 4097),
    ];
    qemu_io(&uri, &writes);
    // A new connection sees the whole final layout.
    let layout = [
        "read -P 0xab 0 513".to_string(),
        "read -P 0xcd 513 3000".to_string(),
        "read -P 0xab 3513 582".to_string(),
        "read -P 0x11 4095 2".to_string(),
        format!("read -P 0xab 4097 {}", mib - 100 - 4097),
        format!("read -P 0xef {} 200", mib - 100),
        format!("read -P 0x00 {} {}", mib + 100, 4 * mib),
    ];
    qemu_io(&uri, &layout);
    assert_server_clean(&server);
}

/// qemu-io's aligned and unaligned writes read back exactly, without
/// clobbering neighbouring bytes.
#[test]
fn qemu_io_aligned_and_unaligned_writes_read_back() {
    qemu_io_aligned_and_unaligned("qemu-io", &[]);
}

/// With O_DIRECT, unaligned writes (read-modify-write in the server) read
/// back exactly and leave neighbouring bytes intact.
#[test]
fn qemu_io_aligned_and_unaligned_writes_read_back_with_direct_io() {
    qemu_io_aligned_and_unaligned("qemu-io-direct", &["--direct"]);
}

/// Run fio's nbd engine with crc32c verification and assert it wrote, read
/// back and verified without a single error.
fn fio_verify(label: &str, server_args: &[&str], job_args: &[&str]) {
    if !require_tool("fio") {
        return;
    }
    let scratch = Scratch::new(label);
    let server = serve(&scratch, server_args);
    let uri = format!("--uri={}", server.uri());
    let mut args = vec![
        "--name=crossmirror",
        "--ioengine=nbd",
        uri.as_str(),
        "--size=32M",
        "--iodepth=32",
        "--numjobs=1",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
    ];
    args.extend_from_slice(job_args);
    let text = combined(&run_checked("fio", &args));
    assert!(text.contains("err= 0"), "fio reported an error:\n{text}");
    for bad in ["verify:", "verify failed", "bad magic", "bad header"] {
        assert!(!text.contains(bad), "fio output has {bad:?}:\n{text}");
    }
    let issued = text.split("issued rwts: total=").nth(1).unwrap_or_else(|| panic!("no issued counts:\n{text}"));
    let mut counts = issued.split([',', ' ']).map(|n| n.parse::<u64>().unwrap_or(0));
    let (reads, writes) = (counts.next().unwrap_or(0), counts.next().unwrap_or(0));
    assert!(reads > 0 && writes > 0, "fio must both write and read back (reads {reads}, writes {writes}):\n{text}");
    assert_server_clean(&server);
}

/// fio random 4 KiB writes at queue depth 32 all verify (crc32c).
#[test]
fn fio_random_writes_verify() {
    fio_verify("fio-randwrite", &[], &["--rw=randwrite", "--bs=4k"]);
}

/// fio mixed random reads and writes of 512 B to 128 KiB all verify.
#[test]
fn fio_mixed_block_sizes_verify() {
    fio_verify("fio-randrw", &[], &["--rw=randrw", "--bsrange=512-128k"]);
}

/// fio mixed-size random I/O verifies with O_DIRECT on the server (unaligned
/// sizes go through read-modify-write).
#[test]
fn fio_mixed_block_sizes_verify_with_direct_io() {
    fio_verify("fio-randrw-direct", &["--direct"], &["--rw=randrw", "--bsrange=512-128k"]);
}

const BLOCK_STATUS_AND_ZEROING: &str = r#"
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(URI)
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation not negotiated"
size = h.get_size()
h.pwrite(b"\xab" * (4 * MiB), 8 * MiB)
h.flush()

extents = []  # (offset, length, flags)
def collect(context, offset, entries, error):
    if context == nbd.CONTEXT_BASE_ALLOCATION:
        for i in range(0, len(entries), 2):
            start = extents[-1][0] + extents[-1][1] if extents else offset
            extents.append((start, entries[i], entries[i + 1]))
    return 0
offset = 0
while offset < size:
    before = len(extents)
    h.block_status(size - offset, offset, collect)
    assert len(extents) > before, f"no extents at {offset}"
    assert extents[before][0] == offset, f"extents start at {extents[before][0]}, asked {offset}"
    offset = extents[-1][0] + extents[-1][1]

def flags_over(low, high):
    return {f for (o, l, f) in extents if o < high and o + l > low}
state = nbd.STATE_HOLE | nbd.STATE_ZERO
assert flags_over(8 * MiB, 12 * MiB) == {0}, f"written range not data: {extents}"
assert flags_over(32 * MiB, size) == {state}, f"untouched range not hole|zero: {extents}"
assert flags_over(0, 4 * MiB) == {state}, f"untouched start not hole|zero: {extents}"

def expect(offset, length, byte, what):
    got = h.pread(length, offset)
    assert got == bytes([byte]) * length, f"{what}: [{offset}, +{length}) is not all {byte:#x}"

h.trim(MiB, 8 * MiB)
expect(8 * MiB, MiB, 0, "after TRIM")
h.zero(MiB, 9 * MiB)
expect(9 * MiB, MiB, 0, "after WRITE_ZEROES")
h.zero(MiB, 10 * MiB, nbd.CMD_FLAG_NO_HOLE)
expect(10 * MiB, MiB, 0, "after WRITE_ZEROES with NO_HOLE")
h.zero(MiB // 2, 11 * MiB, nbd.CMD_FLAG_FAST_ZERO)
expect(11 * MiB, MiB // 2, 0, "after WRITE_ZEROES with FAST_ZERO")
# Unaligned zeroing must leave its neighbours alone.
h.zero(1000, 11 * MiB + MiB // 2 + 123, nbd.CMD_FLAG_FUA)
expect(11 * MiB + MiB // 2 + 123, 1000, 0, "after unaligned WRITE_ZEROES")
expect(11 * MiB + MiB // 2, 123, 0xab, "before unaligned WRITE_ZEROES")
expect(11 * MiB + MiB // 2 + 1123, MiB // 2 - 1123, 0xab, "after unaligned WRITE_ZEROES")
h.flush()
h.shutdown()
print("ok")
"#;

fn block_status_and_zeroing(label: &str, extra: &[&str]) {
    if !require_tool("nbdsh") {
        return;
    }
    let scratch = Scratch::new(label);
    let server = serve(&scratch, extra);
    let out = python(&server, BLOCK_STATUS_AND_ZEROING);
    assert!(out.contains("ok"), "{out}");
    assert_server_clean(&server);
}

/// Block status reports written data as data and untouched space as
/// hole|zero; TRIM, WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO, unaligned) read
/// back as zeros without touching their neighbours.
#[test]
fn block_status_trim_and_write_zeroes() {
    block_status_and_zeroing("block-status", &[]);
}

/// The same block status and zeroing rules hold with O_DIRECT on the server.
#[test]
fn block_status_trim_and_write_zeroes_with_direct_io() {
    block_status_and_zeroing("block-status-direct", &["--direct"]);
}

const MULTI_CONN: &str = r#"
a = nbd.NBD()
a.connect_uri(URI)
b = nbd.NBD()
b.connect_uri(URI)
assert a.can_multi_conn() and b.can_multi_conn(), "multi-conn not advertised"
generator = random.Random(7)
first = generator.randbytes(MiB)
second = generator.randbytes(MiB)
# Read on b first, so a stale cache on b's side would show.
assert b.pread(MiB, 5 * MiB) == bytes(MiB)
a.pwrite(first, 5 * MiB)
a.flush()
assert b.pread(MiB, 5 * MiB) == first, "b does not see a's flushed write"
assert a.pread(MiB, 6 * MiB) == bytes(MiB)
b.pwrite(second, 6 * MiB, nbd.CMD_FLAG_FUA)
assert a.pread(MiB, 6 * MiB) == second, "a does not see b's FUA write"
a.shutdown()
b.shutdown()
print("ok")
"#;

/// With two connections, a write flushed (or FUA) on one is read back
/// exactly on the other.
#[test]
fn multi_conn_flushed_write_is_visible_on_other_connection() {
    if !require_tool("nbdsh") {
        return;
    }
    let scratch = Scratch::new("multi-conn");
    let server = serve(&scratch, &[]);
    let out = python(&server, MULTI_CONN);
    assert!(out.contains("ok"), "{out}");
    assert_server_clean(&server);
}
