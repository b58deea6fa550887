//! The production host SIGKILLed while an async DR copy over the WAN rig
//! (tests/src/wan.rs) is `behind` or `syncing` (issue 13, Tests): the copy
//! host must still present a crash-consistent image — an exact prefix of
//! the writes the client issued, checked against the client's own log —
//! and the RPO that status reported just before the kill must bound what
//! was lost.
//!
//! What "an exact prefix" means here, precisely: one client writes at
//! queue depth 1, block after block (4 KiB, block `i` at offset `i`×4 KiB,
//! filled with `i`'s 8 bytes), each write issued only once the one before
//! was acknowledged, and logs every acknowledgement with its Unix time.
//! With the last acknowledged block `A`, the writes issued are `0..=A+1`
//! (`A+1` was in flight at the kill, maybe): the store is a prefix when
//! there is an `N` such that every block below `N` holds its number and no
//! block from `N` to `A+1` does (each of those is all zeroes; anything else
//! is a torn or foreign block and fails at once). The acknowledged writes
//! lost are then `N..=A`. Queue depth 1 makes "issued before" the same as
//! "acknowledged before", so this is the whole of crash consistency for this
//! client; deeper queues would only let us check a partial order.
//!
//! The RPO bound, with `t_s` the moment just before the status request
//! that preceded the kill and `t_k` the moment of the kill:
//! - bytes lost ≤ `rpo.bytes` + the bytes acknowledged after `t_s`;
//! - the oldest lost write's age at `t_k` (since its acknowledgement) ≤
//!   `rpo.seconds` + (`t_k` − `t_s`), with 2 ms for the engine's whole
//!   milliseconds.
//!
//! (Taking `t_s` before the request makes both bounds looser by the
//! request's own time, never tighter.)
//!
//! The rig runs at 20 Mbit/40 ms, and the client is held to 6 or 10 MB/s
//! (2.4 or 4 times the link): at 100 Mbit it would have to write over
//! 12.5 MB/s from Python, 4 KiB at a time, on a shared two-core machine; at
//! 20 Mbit modest rates go `behind` within seconds and the states last
//! seconds (a 12 MiB lag bound drains in about 5 s).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use system_tests::mirror::Mirror;
use system_tests::wan::{self, Wan, WanMirror};
use system_tests::{binary, require_tool, run, wait_until};

/// One timed test at a time: two at once would share the two cores.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

const MBIT: u64 = 1_000_000;
const BLOCK: u64 = 4096;
/// The volume: room for every block the client writes in a test.
const VOLUME: &str = "512M";
const VOLUME_BYTES: u64 = 512 << 20;

/// Writes block after block at queue depth 1 (see the module docs) to the
/// NBD URI argv[1], from block 0 to at most argv[2] blocks, at argv[3]
/// bytes per second (0: as fast as it can). Each line on stdin sets a new
/// rate; stdin closing ends it. Prints `ok <i> <unix time>` after each
/// acknowledged write (one write(2) per line), `error <i> …` at the first
/// failed one (then it ends), `full` if it ran out of blocks.
const WRITER: &str = r#"
import nbd, sys, threading, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
blocks = int(sys.argv[2]); rate = [float(sys.argv[3])]
done = threading.Event()
def control():
    for line in sys.stdin:
        rate[0] = float(line)
    done.set()
threading.Thread(target=control, daemon=True).start()
def say(line):
    sys.stdout.write(line + "\n"); sys.stdout.flush()
i = 0; next_at = time.time()
while not done.is_set():
    if i == blocks:
        say("full"); break
    r = rate[0]
    now = time.time()
    if r > 0:
        if next_at > now:
            time.sleep(next_at - now)
        next_at = max(next_at, now) + 4096.0 / r
    else:
        next_at = now
    try:
        h.pwrite(i.to_bytes(8, "little") * 512, i * 4096)
    except Exception as error:
        say("error %d %.6f %s" % (i, time.time(), str(error).replace("\n", " "))); break
    say("ok %d %.6f" % (i, time.time())); i += 1
"#;

/// The client of the module docs, running.
struct Writer {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Every acknowledged block and when (Unix seconds), in order.
    acks: Arc<Mutex<Vec<(u64, f64)>>>,
    /// The writer said `full` or `error`.
    said: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(uri: &str, bytes_per_second: u64) -> Writer {
        let blocks = (VOLUME_BYTES / BLOCK).to_string();
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", WRITER, uri, &blocks, &bytes_per_second.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the writer");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("the writer's stdout");
        let acks = Arc::new(Mutex::new(Vec::new()));
        let said = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let (acks, said) = (acks.clone(), said.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let words: Vec<&str> = line.split_whitespace().collect();
                    match words.as_slice() {
                        ["ok", block, time] => {
                            let ack = (block.parse().expect("block"), time.parse().expect("time"));
                            acks.lock().unwrap_or_else(PoisonError::into_inner).push(ack);
                        }
                        _ => said.lock().unwrap_or_else(PoisonError::into_inner).push(line),
                    }
                }
            })
        };
        Writer { child, stdin, acks, said, reader: Some(reader) }
    }

    /// Write at `bytes_per_second` from now on (0: as fast as it can).
    fn set_rate(&mut self, bytes_per_second: u64) {
        let stdin = self.stdin.as_mut().expect("the writer runs");
        writeln!(stdin, "{bytes_per_second}").expect("tell the writer its rate");
    }

    fn acknowledged(&self) -> usize {
        self.acks.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Wait for the writer to end (its host is gone, or stdin closed):
    /// every acknowledged write, and what else it said.
    fn finish(mut self) -> (Vec<(u64, f64)>, Vec<String>) {
        drop(self.stdin.take());
        let status = system_tests::wait_exit(&mut self.child, Instant::now() + Duration::from_secs(30));
        assert!(status.is_some_and(|status| status.success()), "the writer did not end well: {status:?}");
        self.reader.take().expect("reader").join().expect("the writer's reader");
        let acks = std::mem::take(&mut *self.acks.lock().unwrap_or_else(PoisonError::into_inner));
        let said = std::mem::take(&mut *self.said.lock().unwrap_or_else(PoisonError::into_inner));
        (acks, said)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds since the Unix epoch (the writer's clock).
fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// The production host's status of the copy, and `t_s`: the moment just
/// before it was asked.
struct Reading {
    at: f64,
    copy: serde_json::Value,
}

fn read_status(mirror: &Mirror) -> Reading {
    let at = now();
    Reading { at, copy: mirror.copy_status("dr") }
}

/// SIGKILL the production host; the moment of the kill.
fn kill_production(mirror: &mut Mirror) -> f64 {
    let at = now();
    mirror.production.as_mut().expect("production running").stop_with(libc::SIGKILL);
    at
}

/// Wait until the copy host has applied what reached it (its count of
/// accepted frames holds still for a second), then stop it cleanly.
fn settle_and_stop_copy(mirror: &mut Mirror) -> serde_json::Value {
    let mut last = None;
    let mut still_since = Instant::now();
    let settled = wait_until(Duration::from_secs(20), || {
        let accepted = mirror.copy_host_status("dr")["frames_accepted"].as_u64();
        if accepted != last {
            last = accepted;
            still_since = Instant::now();
        }
        still_since.elapsed() >= Duration::from_secs(1)
    });
    assert!(settled, "the copy host kept accepting frames 20 s after the production host died");
    let status = mirror.copy_host_status("dr");
    let stopped = mirror.copies[0].process.as_mut().expect("copy running").stop_with(libc::SIGTERM);
    assert!(stopped.success(), "the copy host exited with {stopped}:\n{}", mirror.logs());
    status
}

/// Whether `block` holds its number on `store`: true, or all zeroes:
/// false; anything else is a torn or foreign block and fails.
fn holds(store: &[u8], block: u64) -> bool {
    let bytes = &store[(block * BLOCK) as usize..((block + 1) * BLOCK) as usize];
    let stamp = block.to_le_bytes();
    if bytes.chunks(8).all(|word| word == stamp) {
        return true;
    }
    assert!(bytes.iter().all(|byte| *byte == 0), "block {block} holds neither its number nor zeroes: torn or foreign");
    false
}

/// The store is a prefix of the writes issued (module docs): its `N`.
/// `acks` are the client's acknowledged writes, in order.
fn prefix_of(store: &[u8], acks: &[(u64, f64)], what: &str) -> u64 {
    for (index, (block, _)) in acks.iter().enumerate() {
        assert_eq!(*block, index as u64, "the client's log skips a block");
    }
    let issued = acks.len() as u64 + 1; // blocks 0..=A+1
    let n = (0..issued).find(|block| !holds(store, *block)).unwrap_or(issued);
    let later: Vec<u64> = (n..issued).filter(|block| holds(store, *block)).take(10).collect();
    assert!(
        later.is_empty(),
        "{what} is not a prefix of the writes: it lacks block {n} but holds later ones {later:?} (of {issued} issued)"
    );
    n
}

/// What the kill lost, checked against the RPO of `reading` (module docs).
fn check_rpo(what: &str, acks: &[(u64, f64)], n: u64, reading: &Reading, killed_at: f64) -> (u64, f64) {
    let rpo = &reading.copy["rpo"];
    let rpo_bytes = rpo["bytes"].as_u64().expect("rpo.bytes");
    let rpo_seconds = rpo["seconds"].as_f64().unwrap_or_else(|| panic!("no rpo.seconds before the kill: {rpo}"));
    let lost: Vec<&(u64, f64)> = acks.iter().filter(|(block, _)| *block >= n).collect();
    let lost_bytes = lost.len() as u64 * BLOCK;
    let acked_after = acks.iter().filter(|(_, at)| *at > reading.at).count() as u64 * BLOCK;
    let oldest_age = lost.first().map_or(0.0, |(_, at)| killed_at - at);
    let between = killed_at - reading.at;
    eprintln!(
        "{what}: {} writes acknowledged, the copy holds blocks 0..{n}: {} lost ({:.2} MiB, the oldest {oldest_age:.3} s \
         old at the kill); status {between:.3} s before the kill: {} rpo {:.2} MiB / {rpo_seconds:.3} s; {:.2} MiB \
         acknowledged after it",
        acks.len(),
        lost.len(),
        lost_bytes as f64 / f64::from(1 << 20),
        reading.copy["state"],
        rpo_bytes as f64 / f64::from(1 << 20),
        acked_after as f64 / f64::from(1 << 20),
    );
    assert!(
        lost_bytes <= rpo_bytes + acked_after,
        "{what}: {lost_bytes} bytes of acknowledged writes lost, over the rpo of {rpo_bytes} bytes read before the \
         kill and the {acked_after} bytes acknowledged after it ({})",
        reading.copy
    );
    assert!(
        oldest_age <= rpo_seconds + between + 0.002,
        "{what}: the oldest lost write was {oldest_age:.3} s old at the kill, over the rpo of {rpo_seconds:.3} s read \
         {between:.3} s before it ({})",
        reading.copy
    );
    (lost_bytes, oldest_age)
}

/// An async `--direct` copy named `dr` over a 20 Mbit/40 ms rig, lag bound
/// `lag`, both stores created empty (`--assume-clean`: no initial sync).
fn start(wan: &Wan, label: &str, lag: &str, extra: &[&str]) -> WanMirror {
    let options = format!("mode=async,lag_bytes_max={lag},direct");
    let mut args = vec!["--assume-clean"];
    args.extend_from_slice(extra);
    let over = wan.start_mirror(label, VOLUME, None, "dr", &options, &args);
    over.mirror.wait_up_to_date(Duration::from_secs(60));
    over
}

fn tools() -> bool {
    wan::available() && require_tool("/usr/bin/python3")
}

/// The production host SIGKILLed while its async copy is `behind` — the
/// first time it goes behind, two seconds into it, with most of its lag
/// bound of writes still on the link (the queue takes about 5 s to drain):
/// the copy's store is a prefix of the client's writes, and the RPO read
/// just before bounds the loss. The copy host got no pass (its store stays
/// `consistent`), so its store is used as it is.
#[test]
fn a_copy_behind_at_a_production_crash_holds_a_prefix_within_its_rpo() {
    if !tools() {
        return;
    }
    let _serial = serial();
    let wan = Wan::new(20 * MBIT, Duration::from_millis(40));
    let mut over = start(&wan, "wan-crash-behind", "12M", &[]);
    let mirror = &mut over.mirror;
    // 6 MB/s, 2.4 times the link: behind in about 3.5 s.
    let writer = Writer::start(&mirror.uri(), 6_000_000);
    let mut reading = None;
    let mut behind_since: Option<Instant> = None;
    let behind = wait_until(Duration::from_secs(30), || {
        let now = read_status(mirror);
        let behind = now.copy["state"] == "behind";
        if !behind {
            assert!(behind_since.is_none(), "the copy left `behind` within 2 s: {}", now.copy);
        }
        reading = Some(now);
        behind && behind_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(2)
    });
    let reading = reading.expect("a status read");
    assert!(
        behind,
        "the copy never went behind ({} writes): {}\n{}",
        writer.acknowledged(),
        reading.copy,
        mirror.logs()
    );
    let killed_at = kill_production(mirror);
    let (acks, said) = writer.finish();
    assert!(said.iter().any(|line| line.starts_with("error")), "the writer should have lost its host: {said:?}");
    let copy_host = settle_and_stop_copy(mirror);
    assert_eq!(
        copy_host["store_state"], "consistent",
        "the copy began a pass: the kill was not while behind\n{copy_host}"
    );
    let store = std::fs::read(&mirror.copies[0].volume).expect("read the copy's store");
    let n = prefix_of(&store, &acks, "the behind copy's store");
    let (lost_bytes, _) = check_rpo("behind", &acks, n, &reading, killed_at);
    assert!(lost_bytes > 0, "the copy lost nothing: the kill did not catch a queue (the test shows nothing)");
}

/// The production host SIGKILLed while its async copy is `syncing`: the
/// copy went behind under a burst, then caught up and began the resync
/// pass of what it missed (held to 2 MB/s by `--resync-rate-max`, so it is
/// long), while the client writes on at 256 KiB/s. Before the kill the
/// copy host said its way back is `kept`; after it, `crossmirror rollback`
/// brings the store back to the image of the pass's start, which must be a
/// prefix of the client's writes within the RPO read just before the kill.
#[test]
fn a_copy_syncing_at_a_production_crash_rolls_back_to_a_prefix_within_its_rpo() {
    syncing_at_a_crash("wan-crash-syncing", false);
}

/// The same, with the link broken mid-pass (every connection through the
/// proxy cut): the production host reconnects and begins a new pass, which
/// the copy host must not take for a new image — its way back stays the
/// one taken when the first pass began (the last consistent image), and
/// the rollback brings that back.
#[test]
fn a_copy_reconnected_mid_pass_at_a_production_crash_rolls_back_to_the_first_pass_image() {
    syncing_at_a_crash("wan-crash-reconnect", true);
}

/// A resync pass under way, seen from both hosts.
struct Pass {
    /// The production host's status, read after the copy host's.
    reading: Reading,
    copy_host: serde_json::Value,
}

/// Wait (up to 60 s) until the copy host keeps its way back, and the
/// production host has the copy `syncing` on its `connects`th connection
/// with at least `done` bytes of the pass sent.
fn pass_along(mirror: &Mirror, connects: u64, done: u64) -> Pass {
    let mut last = None;
    let along = wait_until(Duration::from_secs(60), || {
        let copy_host = mirror.copy_host_status("dr");
        let reading = read_status(mirror);
        let ready = copy_host["dr_image"]["state"] == "kept"
            && reading.copy["state"] == "syncing"
            && reading.copy["connects"] == connects
            && reading.copy["resync_bytes_done"].as_u64().unwrap_or(0) >= done;
        last = Some(Pass { reading, copy_host });
        ready
    });
    let last = last.expect("a status read");
    assert!(
        along,
        "no pass {done} bytes along on connection {connects} with the way back kept:\n{}\n{}\n{}",
        last.reading.copy,
        last.copy_host,
        mirror.logs()
    );
    last
}

fn syncing_at_a_crash(label: &str, reconnect: bool) {
    if !tools() {
        return;
    }
    let _serial = serial();
    let wan = Wan::new(20 * MBIT, Duration::from_millis(40));
    let mut over = start(&wan, label, "8M", &["--resync-rate-max", "2M"]);
    let mirror = &mut over.mirror;
    let mut writer = Writer::start(&mirror.uri(), 10_000_000);
    let behind = wait_until(Duration::from_secs(30), || mirror.copy_status("dr")["state"] == "behind");
    assert!(behind, "the copy never went behind ({} writes):\n{}", writer.acknowledged(), mirror.logs());
    // Two more seconds of the burst missed whole (tens of MiB for the pass).
    std::thread::sleep(Duration::from_secs(2));
    writer.set_rate(256 << 10);
    let first = pass_along(mirror, 1, if reconnect { 4 << 20 } else { 8 << 20 });
    let reading = if reconnect {
        over.proxy.cut();
        let second = pass_along(mirror, 2, 2 << 20);
        assert_eq!(
            (&second.copy_host["dr_image"]["generation"], &second.copy_host["dr_image"]["taken_at_ms"]),
            (&first.copy_host["dr_image"]["generation"], &first.copy_host["dr_image"]["taken_at_ms"]),
            "the second pass took a new way back: the image of the first pass's start is lost"
        );
        second.reading
    } else {
        first.reading
    };
    let killed_at = kill_production(mirror);
    let (acks, said) = writer.finish();
    assert!(said.iter().any(|line| line.starts_with("error")), "the writer should have lost its host: {said:?}");
    let after = settle_and_stop_copy(mirror);
    assert_eq!(after["store_state"], "syncing", "the pass ended before the kill\n{after}");
    let volume = mirror.copies[0].volume.clone();
    let torn = std::fs::read(&volume).expect("read the copy's store");
    let issued = acks.len() as u64 + 1;
    let first_gap = (0..issued).find(|block| !holds(&torn, *block)).unwrap_or(issued);
    let beyond = (first_gap..issued).filter(|block| holds(&torn, *block)).count();
    eprintln!("{label}: before the rollback the store lacks block {first_gap} and holds {beyond} later blocks");
    let said = run(binary().to_str().expect("utf-8 path"), &["rollback", "--volume", volume.to_str().expect("utf-8")]);
    assert!(said.contains("rolled back to the consistent image"), "{said}");
    let store = std::fs::read(&volume).expect("read the rolled back store");
    let n = prefix_of(&store, &acks, "the rolled back store");
    let (lost_bytes, _) = check_rpo(label, &acks, n, &reading, killed_at);
    assert!(lost_bytes > 0, "the rollback gave up nothing: the test shows nothing");
}
