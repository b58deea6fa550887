//! What the server acknowledged is in the volume: after FLUSH or FUA replies
//! the data survives a SIGKILL of the server, and a SIGTERM while a client is
//! writing finishes in-flight requests, syncs and exits 0 with every
//! acknowledged write in the file.
//!
//! A SIGKILL leaves the page cache intact, so these tests cannot simulate a
//! power cut; they prove the server holds no acknowledged data in its own
//! memory, and that restart reads back what was written.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use system_tests::{random_bytes, require_tool, run, Process, Scratch};

const VOLUME_BYTES: usize = 64 << 20;

/// Writes a buffered server acknowledged after FLUSH or with FUA survive SIGKILL and read back after restart.
#[test]
fn buffered_server_keeps_flushed_and_fua_writes_across_sigkill() {
    acknowledged_writes_survive_sigkill(false);
}

/// Writes an O_DIRECT server acknowledged after FLUSH or with FUA survive SIGKILL and read back after restart.
#[test]
fn direct_server_keeps_flushed_and_fua_writes_across_sigkill() {
    acknowledged_writes_survive_sigkill(true);
}

/// SIGTERM with a client writing: the buffered server exits 0 within 5 s and every acknowledged write is in the file.
#[test]
fn buffered_server_sigterm_keeps_every_acknowledged_write() {
    sigterm_keeps_acknowledged_writes(false);
}

/// SIGTERM with a client writing: the O_DIRECT server exits 0 within 5 s and every acknowledged write is in the file.
#[test]
fn direct_server_sigterm_keeps_every_acknowledged_write() {
    sigterm_keeps_acknowledged_writes(true);
}

/// One write of the SIGKILL test: where, what, and whether it carries FUA
/// (FUA writes come after the FLUSH and are not followed by one).
struct PlannedWrite {
    offset: usize,
    bytes: Vec<u8>,
    fua: bool,
}

fn planned_writes() -> Vec<PlannedWrite> {
    let plan: [(usize, usize, bool); 8] = [
        (0, 64 << 10, false),
        // Sector-aligned but not page-aligned.
        ((1 << 20) + 512, 1 << 20, false),
        // Neither offset nor length aligned: O_DIRECT needs read-modify-write.
        ((5 << 20) + 12345, 777, false),
        ((10 << 20), 8 << 20, false),
        // Crossing a MiB boundary, unaligned on both ends.
        ((30 << 20) - 100, 200, false),
        // The last page of the volume.
        (VOLUME_BYTES - 4096, 4096, false),
        ((40 << 20) + 333, 100 << 10, true),
        (50 << 20, 2 << 20, true),
    ];
    plan.iter()
        .enumerate()
        .map(|(index, &(offset, len, fua))| PlannedWrite { offset, bytes: random_bytes(len, 1000 + index as u64), fua })
        .collect()
}

fn acknowledged_writes_survive_sigkill(direct: bool) {
    if !require_tool("/usr/bin/python3") || !require_tool("nbdcopy") {
        return;
    }
    let scratch = Scratch::new(if direct { "sigkill-direct" } else { "sigkill-buffered" });
    let volume = scratch.join("volume");
    let mut server = Process::serve_volume(&scratch, "64M", if direct { &["--direct"] } else { &[] });

    let writes = planned_writes();
    let mut expected = vec![0u8; VOLUME_BYTES];
    let mut plan = String::new();
    for (index, write) in writes.iter().enumerate() {
        let path = scratch.join(&format!("write-{index}.bin"));
        std::fs::write(&path, &write.bytes).expect("write chunk");
        let fua = if write.fua { "True" } else { "False" };
        plan.push_str(&format!("({:?}, {}, {fua}),\n", path.to_str().expect("utf-8 path"), write.offset));
        expected[write.offset..write.offset + write.bytes.len()].copy_from_slice(&write.bytes);
    }
    // The client stays connected while the server is killed, so no
    // disconnect (which a server might answer with a sync) happens first.
    let script = format!(
        "import nbd, sys\n\
         h = nbd.NBD()\n\
         h.connect_uri({uri:?})\n\
         plan = [\n{plan}]\n\
         for path, offset, fua in plan:\n\
         \x20   if fua:\n\
         \x20       break\n\
         \x20   h.pwrite(open(path, 'rb').read(), offset)\n\
         h.flush()\n\
         for path, offset, fua in plan:\n\
         \x20   if fua:\n\
         \x20       h.pwrite(open(path, 'rb').read(), offset, nbd.CMD_FLAG_FUA)\n\
         print('acknowledged', flush=True)\n\
         sys.stdin.read()\n",
        uri = server.uri()
    );
    let mut client = Client::start(&script, &[]);
    let line = client.next_line(Duration::from_secs(30));
    assert_eq!(line.as_deref(), Some("acknowledged"), "client did not finish its writes:\n{}", client.finish());

    let status = server.stop_with(libc::SIGKILL);
    assert_eq!(status.code(), None, "server was expected to die of SIGKILL, got {status}");
    client.finish();

    assert_same_image(&std::fs::read(&volume).expect("read volume"), &expected, &writes, "volume file after SIGKILL");

    let mut server = Process::serve_volume(&scratch, "64M", if direct { &["--direct"] } else { &[] });
    let read_back = scratch.join("read-back.bin");
    run("nbdcopy", &[&server.uri(), read_back.to_str().expect("utf-8 path")]);
    assert_same_image(&std::fs::read(&read_back).expect("read back"), &expected, &writes, "NBD read after restart");
    let status = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "restarted server exited with {status} on SIGTERM:\n{}", server.log());
}

/// `actual` equals `expected`; on a difference, names the write it falls in.
fn assert_same_image(actual: &[u8], expected: &[u8], writes: &[PlannedWrite], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: size");
    if actual == expected {
        return;
    }
    let first = (0..actual.len()).find(|&i| actual[i] != expected[i]).expect("a differing byte");
    let write = writes.iter().position(|w| (w.offset..w.offset + w.bytes.len()).contains(&first));
    panic!(
        "{what}: first differing byte at offset {first}, inside planned write {write:?} (None: outside every write)"
    );
}

/// Slots of the SIGTERM test: one 4 KiB write each, never rewritten, so an
/// unacknowledged write can never overwrite an acknowledged one.
const SLOT_BYTES: u64 = 4096;
const SLOTS: u64 = (1 << 30) / SLOT_BYTES;

/// The content of slot `index`: its number plus one, repeated.
fn slot_pattern(index: u64) -> Vec<u8> {
    (index + 1).to_le_bytes().repeat((SLOT_BYTES / 8) as usize)
}

/// A client keeping 16 writes in flight, one slot each in order; it logs
/// every acknowledged slot, and stops submitting at the first failure.
const WRITER_SCRIPT: &str = r#"
import nbd, struct, sys, json
uri, log_path, slots, slot_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
log = open(log_path, 'w', buffering=1)
in_flight = {}
next_slot = 0
failures = {}
ended = 'all slots written'
while next_slot < slots or in_flight:
    while not failures and next_slot < slots and len(in_flight) < 16:
        buf = nbd.Buffer.from_bytearray(bytearray(struct.pack('<Q', next_slot + 1) * (slot_bytes // 8)))
        try:
            cookie = h.aio_pwrite(buf, next_slot * slot_bytes)
        except nbd.Error as e:
            failures[str(e.errno)] = failures.get(str(e.errno), 0) + 1
            ended = 'submit failed: %s' % e
            break
        in_flight[cookie] = (next_slot, buf)
        next_slot += 1
    if not in_flight:
        break
    try:
        h.poll(-1)
    except nbd.Error as e:
        ended = 'poll failed: %s' % e
    for cookie in list(in_flight):
        try:
            done = h.aio_command_completed(cookie)
        except nbd.Error as e:
            in_flight.pop(cookie)
            failures[str(e.errno)] = failures.get(str(e.errno), 0) + 1
            ended = 'write failed: %s' % e
            continue
        if done:
            log.write('%d\n' % in_flight.pop(cookie)[0])
    if ended.startswith('poll failed') or h.aio_is_dead() or h.aio_is_closed():
        ended += ' (connection closed with %d in flight)' % len(in_flight)
        break
print(json.dumps({'submitted': next_slot, 'failures': failures, 'ended': ended}), flush=True)
"#;

fn sigterm_keeps_acknowledged_writes(direct: bool) {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let scratch = Scratch::new(if direct { "sigterm-direct" } else { "sigterm-buffered" });
    let volume = scratch.join("volume");
    let volume_arg = volume.to_str().expect("utf-8 path");
    let mut args = vec!["--volume", volume_arg, "--size", "1G"];
    if direct {
        args.push("--direct");
    }
    let mut server = Process::serve(&scratch, &args);
    let ack_log = scratch.join("acknowledged.log");
    let uri = server.uri();
    let mut client = Client::start(
        WRITER_SCRIPT,
        &[&uri, ack_log.to_str().expect("utf-8 path"), &SLOTS.to_string(), &SLOT_BYTES.to_string()],
    );

    // Let the client get going, then stop the server under it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_lines(&ack_log) < 200 {
        assert!(Instant::now() < deadline, "client got fewer than 200 writes acknowledged in 20 s:\n{}", server.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let signalled = Instant::now();
    let status = server.stop_with(libc::SIGTERM);
    let exit_time = signalled.elapsed();
    assert!(status.success(), "server exited with {status} on SIGTERM:\n{}", server.log());
    assert!(exit_time < Duration::from_secs(5), "server took {exit_time:?} to exit on SIGTERM:\n{}", server.log());

    let summary = client.next_line(Duration::from_secs(10)).unwrap_or_default();
    let client_output = client.finish();
    let summary: serde_json::Value = serde_json::from_str(&summary)
        .unwrap_or_else(|e| panic!("client summary {summary:?} unreadable ({e}):\n{client_output}"));
    assert!(
        summary["submitted"].as_u64().expect("submitted") < SLOTS,
        "client wrote every slot before SIGTERM, so the test stopped nothing in flight: {summary}"
    );

    let acknowledged: Vec<u64> = std::fs::read_to_string(&ack_log)
        .expect("read acknowledgement log")
        .lines()
        .map(|line| line.parse().expect("slot number"))
        .collect();
    let file = std::fs::File::open(&volume).expect("open volume");
    let mut missing = Vec::new();
    let mut slot = vec![0u8; SLOT_BYTES as usize];
    for &index in &acknowledged {
        file.read_exact_at(&mut slot, index * SLOT_BYTES).expect("read slot");
        if slot != slot_pattern(index) {
            missing.push(index);
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes are not in the file (first: slot {:?}); client: {summary}\nserver log:\n{}",
        missing.len(),
        acknowledged.len(),
        missing.first(),
        server.log()
    );
    eprintln!("{} acknowledged writes verified; client: {summary}", acknowledged.len());
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|text| text.lines().count()).unwrap_or(0)
}

/// A python libnbd client (Debian's python3) whose stdout lines arrive on a
/// channel; killed on drop if still running.
struct Client {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Client {
    fn start(script: &str, args: &[&str]) -> Client {
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Client { child: Some(child), stdin, lines }
    }

    /// The next line the client prints, or None if it prints none within
    /// `timeout` (or exits).
    fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Closes the client's stdin, waits up to 10 s for it to exit (then
    /// kills it), and returns its exit status and stderr.
    fn finish(&mut self) -> String {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
        let Some(mut child) = self.child.take() else { return String::new() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let output: Output = child.wait_with_output().expect("client output");
        format!("client {}: {}", output.status, String::from_utf8_lossy(&output.stderr))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
