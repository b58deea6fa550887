//! The copy host against forged and damaged traffic: this test plays the
//! production host with the engine's own client (real sockets, the real
//! binary), then sends a wrong secret, a corrupt frame and a replayed frame.
//! Each is refused with a log line that names it, and nothing of it reaches
//! the store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::metadata::new_identity;
use engine::protocol::auth::VolumeIdentity;
use engine::protocol::frame::{encode_frame, FrameFlags, FrameKind};
use engine::protocol::{load_secret, ReplicationErrorKind};
use engine::replicator::connect::CopyConnection;
use system_tests::{
    binary, fds_on, random_bytes, require_root, require_tool, traced_call, wait_until, write_secret, CopyHost,
    FuseMount, LoopDevice, Process, Scratch, SlowFlushServer, Tracer, FLUSH_SECONDS,
};

const SIZE: u64 = 8 << 20;

struct Host {
    scratch: Scratch,
    volume: PathBuf,
    secret: PathBuf,
    address: SocketAddr,
    admin: SocketAddr,
    args: Vec<String>,
    process: Process,
}

fn copy_host(label: &str) -> Host {
    copy_host_with(label, "8M", &[])
}

/// A copy host of `size` bytes with `extra` arguments (`--direct`, …).
fn copy_host_with(label: &str, size: &str, extra: &[&str]) -> Host {
    let scratch = Scratch::new(label);
    let secret = write_secret(&scratch, "secret", 11);
    let volume = scratch.join("copy.img");
    let CopyHost { process, address, admin, args } =
        CopyHost::start(&scratch, "127.0.0.2", &volume, size, &secret, extra);
    Host { scratch, volume, secret, address, admin, args, process }
}

/// Stop the copy host with SIGTERM and start it again on the same store.
fn restart(host: &mut Host) {
    assert!(host.process.stop_with(libc::SIGTERM).success(), "{}", host.process.log());
    host.process = CopyHost::spawn(&host.scratch, &host.args, host.address, host.admin);
}

fn identity() -> VolumeIdentity {
    new_identity(SIZE).unwrap()
}

fn connect(host: &Host, identity: VolumeIdentity) -> CopyConnection {
    let secret = load_secret(&host.secret).unwrap();
    CopyConnection::connect(host.address, &secret, identity, Duration::from_secs(5), Duration::from_secs(5)).unwrap()
}

/// Send a write and wait for its ack.
fn write(connection: &mut CopyConnection, offset: u64, data: &[u8]) {
    write_at_epoch(connection, 1, offset, data);
}

/// Send a write carrying fencing `epoch` and wait for its ack.
fn write_at_epoch(connection: &mut CopyConnection, epoch: u64, offset: u64, data: &[u8]) {
    let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, epoch);
    header.offset = offset;
    header.length = data.len() as u32;
    header.payload_len = data.len() as u32;
    connection.send(&header, data).unwrap();
    let ack = connection.receive().unwrap();
    assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, header.sequence));
}

fn contents(host: &Host) -> Vec<u8> {
    std::fs::read(&host.volume).unwrap()
}

/// The copy host's `GET /status`, through `crossmirror status --json`.
fn status(host: &Host) -> serde_json::Value {
    let admin = host.admin.to_string();
    let text = system_tests::run(binary().to_str().unwrap(), &["status", "--admin", &admin, "--json"]);
    serde_json::from_str(&text).unwrap()
}

/// The copy host counted exactly `rejected` refused frames.
fn assert_rejected(host: &Host, rejected: u64) {
    let counted = wait_until(Duration::from_secs(5), || status(host)["frames_rejected"] == rejected);
    assert!(counted, "frames_rejected is not {rejected}: {}", status(host));
}

fn wait_for_log(host: &Host, text: &str) {
    let found = wait_until(Duration::from_secs(5), || host.process.log().contains(text));
    assert!(found, "the copy host never logged {text:?}:\n{}", host.process.log());
}

/// Writes from an authenticated production host land, in order, and a
/// flush is acknowledged; the copy adopts the volume's identity.
#[test]
fn authenticated_writes_are_applied_in_order() {
    let host = copy_host("copy-host-apply");
    let mut connection = connect(&host, identity());
    let first = random_bytes(10_000, 1);
    write(&mut connection, 4096, &first);
    write(&mut connection, 8192, b"overwritten");
    let header = connection.header(FrameKind::Flush, FrameFlags::NONE, 1, 1);
    connection.send(&header, &[]).unwrap();
    assert_eq!(connection.receive().unwrap().header.kind, FrameKind::FlushAck);
    let mut expected = vec![0u8; SIZE as usize];
    expected[4096..4096 + first.len()].copy_from_slice(&first);
    expected[8192..8192 + 11].copy_from_slice(b"overwritten");
    assert!(contents(&host) == expected, "the copy's store differs from the writes sent");
    assert!(host.process.log().contains("now mirrors uuid"), "{}", host.process.log());
    let status = status(&host);
    assert_eq!(status["frames_accepted"], 3, "{status}");
    assert_eq!(status["frames_rejected"], 0, "{status}");
    assert_eq!(status["write_bytes_accepted"], 10_011, "{status}");
}

/// A production host with another secret is refused during the handshake:
/// the copy logs "wrong secret" and counts it; nothing is written.
#[test]
fn wrong_secret_is_refused() {
    let host = copy_host("copy-host-secret");
    let other = write_secret(&host.scratch, "other-secret", 99);
    let secret = load_secret(&other).unwrap();
    let error =
        CopyConnection::connect(host.address, &secret, identity(), Duration::from_secs(5), Duration::from_secs(5))
            .unwrap_err();
    assert_eq!(error.kind(), ReplicationErrorKind::AuthFailed, "{error}");
    wait_for_log(&host, "wrong secret");
    wait_for_log(&host, "frames_rejected=1");
    assert_rejected(&host, 1);
    assert_eq!(status(&host)["old_epoch_refused"], 0, "a wrong secret is not old-epoch traffic");
    assert!(contents(&host).iter().all(|byte| *byte == 0));
}

/// A frame with one flipped payload byte fails its CRC: refused, logged as
/// corrupt, the connection closed, the store untouched by it.
#[test]
fn corrupt_frame_is_refused_and_not_applied() {
    let host = copy_host("copy-host-corrupt");
    let mut connection = connect(&host, identity());
    write(&mut connection, 0, b"good");
    let data = vec![0x5a; 4096];
    let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
    header.offset = 65536;
    header.length = data.len() as u32;
    header.payload_len = data.len() as u32;
    let mut bytes = encode_frame(&header, &data);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    connection.send_raw(&bytes).unwrap();
    assert!(connection.receive().is_err(), "the copy must close the connection");
    wait_for_log(&host, "corrupt frame");
    wait_for_log(&host, "nothing of it was applied");
    assert_rejected(&host, 1);
    let stored = contents(&host);
    assert_eq!(&stored[..4], b"good");
    assert!(stored[65536..65536 + 4096].iter().all(|byte| *byte == 0), "the corrupt write was applied");
}

/// Frames that arrive together, received into pooled buffers and applied
/// while the reader goes on: a corrupt frame in the middle of them ends the
/// connection there. The writes before it are applied and acknowledged, in
/// order; nothing of it or of the writes after it lands.
#[test]
fn a_corrupt_frame_among_frames_sent_together_stops_the_stream_there() {
    let host = copy_host("copy-host-corrupt-batch");
    let mut connection = connect(&host, identity());
    let mut bytes = Vec::new();
    let mut sequences = Vec::new();
    for index in 0..8u64 {
        let data = vec![index as u8 + 1; 4096];
        let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
        header.offset = index * 4096;
        header.length = data.len() as u32;
        header.payload_len = data.len() as u32;
        let mut frame = encode_frame(&header, &data);
        if index == 5 {
            let last = frame.len() - 1;
            frame[last] ^= 0x01;
        }
        bytes.extend_from_slice(&frame);
        sequences.push(header.sequence);
    }
    connection.send_raw(&bytes).unwrap();
    for sequence in &sequences[..5] {
        let ack = connection.receive().unwrap();
        assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, *sequence));
    }
    assert!(connection.receive().is_err(), "the copy must close the connection after the corrupt frame");
    wait_for_log(&host, "corrupt frame");
    assert_rejected(&host, 1);
    let stored = contents(&host);
    for index in 0..8usize {
        let expected = if index < 5 { index as u8 + 1 } else { 0 };
        assert!(
            stored[index * 4096..(index + 1) * 4096].iter().all(|byte| *byte == expected),
            "block {index}: the writes before the corrupt frame land, it and those after it do not"
        );
    }
}

/// Many frames sent together reach the applying thread in batches (the
/// frames already whole in the reader's buffer, up to 64 at a time): every
/// one is applied and acknowledged in the order sent, across batch
/// boundaries, and overlapping writes land last-sent-last.
#[test]
fn many_frames_sent_together_are_applied_and_acknowledged_in_order() {
    const WRITES: u64 = 300;
    const BLOCKS: u64 = 16;
    let host = copy_host("copy-host-batches");
    let mut connection = connect(&host, identity());
    let mut bytes = Vec::new();
    let mut sequences = Vec::new();
    for index in 0..WRITES {
        let data = vec![(index % 251) as u8 + 1; 4096];
        let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
        header.offset = (index % BLOCKS) * 4096;
        header.length = data.len() as u32;
        header.payload_len = data.len() as u32;
        bytes.extend_from_slice(&encode_frame(&header, &data));
        sequences.push(header.sequence);
    }
    connection.send_raw(&bytes).unwrap();
    for sequence in &sequences {
        let ack = connection.receive().unwrap();
        assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, *sequence));
    }
    let stored = contents(&host);
    for block in 0..BLOCKS {
        let last = (0..WRITES).filter(|index| index % BLOCKS == block).max().unwrap();
        let expected = (last % 251) as u8 + 1;
        let at = (block * 4096) as usize;
        assert!(
            stored[at..at + 4096].iter().all(|byte| *byte == expected),
            "block {block}: the last write sent to it lands"
        );
    }
    assert_rejected(&host, 0);
    assert_eq!(status(&host)["frames_accepted"], WRITES, "{}", status(&host));
}

/// Frames that arrive one at a time are read by the applying thread itself
/// (a hand-off between threads spared per write at QD1), frames that arrive
/// in bunches by the helper thread ahead of it; the socket changes hands
/// between them. Across every change of hands the frames are applied and
/// acknowledged in the order sent: lone writes, lone flushes (a flush is
/// still in flight when the next frame is due, so the helper must read it),
/// bursts that begin while the applying thread reads, and lone writes
/// again, to and from a direct and a buffered store. A corrupt frame that
/// arrives while the applying thread reads is refused, nothing of it
/// applied, and the next session of the production host takes over.
#[test]
fn the_socket_changes_hands_between_lone_and_bunched_frames_and_order_holds() {
    const BLOCKS: u64 = 8;
    for extra in [&[][..], &["--direct"][..]] {
        let host = copy_host_with("copy-host-hands", "8M", extra);
        let volume = identity();
        // A hand-over that loses the socket shows as an answer that never
        // comes: fail on it, do not hang.
        let connected = |host: &Host| {
            let connection = connect(host, volume);
            connection.stream().set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            connection
        };
        let mut connection = connected(&host);
        let mut expected = Expected { store: vec![0u8; SIZE as usize], fill: 0 };
        let lone = |connection: &mut CopyConnection, expected: &mut Expected, count: u64, flushes: bool| {
            for index in 0..count {
                let (sequence, bytes) = expected.write(connection, index % BLOCKS);
                connection.send_raw(&bytes).unwrap();
                let ack = connection.receive().unwrap();
                assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, sequence), "{extra:?}");
                if flushes && index % 4 == 3 {
                    let header = connection.header(FrameKind::Flush, FrameFlags::NONE, 1, 1);
                    connection.send(&header, &[]).unwrap();
                    let ack = connection.receive().unwrap();
                    assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::FlushAck, header.sequence));
                }
            }
        };
        let read_alone = |host: &Host| status(host)["frames_read_alone"].as_u64().unwrap();
        let mut alone_before = 0;
        for round in 0..3 {
            // With a flush every 4 writes, the helper takes the socket back
            // while each flush is in flight and reads two frames before it
            // hands it over again: 30 of the 50 frames read alone.
            let flushes = round == 1;
            lone(&mut connection, &mut expected, 40, flushes);
            let alone = read_alone(&host);
            let least = if flushes { 20 } else { 30 };
            assert!(
                alone >= alone_before + least,
                "{extra:?} round {round}: of the lone frames the applying thread read only {} itself",
                alone - alone_before
            );
            // A burst, sent in one piece while the applying thread reads.
            let mut bytes = Vec::new();
            let mut sequences = Vec::new();
            for index in 0..200 {
                let (sequence, frame_bytes) = expected.write(&mut connection, index % BLOCKS);
                bytes.extend_from_slice(&frame_bytes);
                sequences.push(sequence);
            }
            connection.send_raw(&bytes).unwrap();
            for sequence in &sequences {
                let ack = connection.receive().unwrap();
                assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, *sequence), "{extra:?}");
            }
            let after_burst = read_alone(&host);
            assert!(
                after_burst - alone < 100,
                "{extra:?} round {round}: the applying thread read {} of a burst of 200 itself",
                after_burst - alone
            );
            alone_before = after_burst;
        }
        let header = connection.header(FrameKind::Flush, FrameFlags::NONE, 1, 1);
        connection.send(&header, &[]).unwrap();
        assert_eq!(connection.receive().unwrap().header.kind, FrameKind::FlushAck);
        assert!(
            contents(&host) == expected.store,
            "{extra:?}: the last write sent to each block is not what the store holds"
        );
        assert_rejected(&host, 0);
        // The applying thread reads; a corrupt write arrives.
        lone(&mut connection, &mut expected, 10, false);
        assert!(read_alone(&host) > alone_before + 5, "{extra:?}: the applying thread does not read");
        let mut corrupt = Expected { store: expected.store.clone(), fill: expected.fill };
        let (_, mut bytes) = corrupt.write(&mut connection, 5);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        connection.send_raw(&bytes).unwrap();
        assert!(connection.receive().is_err(), "{extra:?}: the copy must close the connection");
        assert_rejected(&host, 1);
        // The production host's next session takes over, and is served.
        let mut connection = connected(&host);
        lone(&mut connection, &mut expected, 10, true);
        assert!(
            contents(&host) == expected.store,
            "{extra:?}: after the corrupt frame the store is not what the writes made it"
        );
    }
}

/// What a store holds after the writes made so far, each 4 KiB of a new fill.
struct Expected {
    store: Vec<u8>,
    fill: u8,
}

impl Expected {
    /// A write of the next fill to 4 KiB block `block`: its sequence and
    /// its encoded frame.
    fn write(&mut self, connection: &mut CopyConnection, block: u64) -> (u64, Vec<u8>) {
        self.fill = self.fill.wrapping_add(1).max(1);
        let data = vec![self.fill; 4096];
        let at = (block * 4096) as usize;
        self.store[at..at + 4096].copy_from_slice(&data);
        let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
        header.offset = at as u64;
        header.length = data.len() as u32;
        header.payload_len = data.len() as u32;
        (header.sequence, encode_frame(&header, &data))
    }
}

/// During a pass on a consistent store, a write first saves a before-image
/// of the 64 KiB it lands in (a read and an append to the undo journal; the
/// writes that arrive together share an fdatasync), so a burst of writes to
/// new chunks takes the copy host a while, on a buffered store (each write
/// done in place) as on an O_DIRECT one (writes in flight in the io_uring).
/// Its acknowledgements must go out while the burst is still being applied:
/// sent only when no frame waits, they would all wait for the whole burst,
/// and a production host that hears nothing for its ack timeout (5 s) takes
/// a working copy for a hung one and drops it (seen with an async copy of a
/// 1 TiB volume catching up under 4k random writes).
#[test]
fn acknowledgements_go_out_while_a_backlog_of_writes_is_applied() {
    const WRITES: u64 = 900;
    for extra in [&[][..], &["--direct"][..]] {
        let host = copy_host_with("copy-host-backlog", "256M", extra);
        let mut connection = connect(&host, new_identity(256 << 20).unwrap());
        begin_pass_on_a_consistent_store(&host, &mut connection);
        let arrivals = burst_to_new_chunks(&mut connection, WRITES);
        let (first, last) = (arrivals[0], arrivals[arrivals.len() - 1]);
        assert!(
            first < last / 2,
            "{extra:?}: the first acknowledgement came {first:?} after the burst was sent, the last {last:?}: \
             acknowledgements waited for the backlog to drain"
        );
        assert_eq!(status(&host)["dr_image"]["state"], "kept", "the pass kept its way back: {}", status(&host));
        assert_burst_stored(&host, WRITES);
        assert_rejected(&host, 0);
    }
}

/// End the pass that brought a new store up to date (it is consistent),
/// then begin another with a write at 0: from then on the copy keeps an
/// undo journal, the way back to the image the pass began on.
fn begin_pass_on_a_consistent_store(host: &Host, connection: &mut CopyConnection) {
    let header = connection.header(FrameKind::Flush, FrameFlags::SYNCED, 1, 1);
    connection.send(&header, &[]).unwrap();
    assert_eq!(connection.receive().unwrap().header.kind, FrameKind::FlushAck);
    let mut header = connection.header(FrameKind::Write, FrameFlags::PASS, 1, 1);
    header.offset = 0;
    header.length = 4096;
    header.payload_len = 4096;
    connection.send(&header, &[1; 4096]).unwrap();
    assert_eq!(connection.receive().unwrap().header.kind, FrameKind::WriteAck);
    assert_eq!(status(host)["dr_image"]["state"], "kept", "{}", status(host));
}

/// Writes of `fill(index)` at `index * 64 KiB` for index in 1..=count, all
/// sent at once (each lands in an undo-journal chunk not saved yet); their
/// acknowledgements in order, each with when it came after the send.
fn burst_to_new_chunks(connection: &mut CopyConnection, count: u64) -> Vec<Duration> {
    let mut bytes = Vec::new();
    let mut sequences = Vec::new();
    for index in 1..=count {
        let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
        header.offset = index * CHUNK;
        header.length = 4096;
        header.payload_len = 4096;
        bytes.extend_from_slice(&encode_frame(&header, &[fill(index); 4096]));
        sequences.push(header.sequence);
    }
    let sent = std::time::Instant::now();
    connection.send_raw(&bytes).unwrap();
    let mut arrivals = Vec::new();
    for sequence in &sequences {
        let ack = connection.receive().unwrap();
        assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, *sequence));
        arrivals.push(sent.elapsed());
    }
    arrivals
}

const CHUNK: u64 = 64 << 10;

fn fill(index: u64) -> u8 {
    (index % 251) as u8 + 1
}

fn assert_burst_stored(host: &Host, count: u64) {
    let stored = contents(host);
    for index in 1..=count {
        let at = (index * CHUNK) as usize;
        assert!(stored[at..at + 4096].iter().all(|byte| *byte == fill(index)), "write {index} is missing");
    }
}

/// The power-cut rule of the undo journal: a write during a pass may reach
/// the store only once the before-image of what it overwrites is durable
/// in the journal, or a power cut could keep the write and lose the way
/// back. A kill keeps the page cache, so this test reads the order of the
/// copy host's system calls instead (strace): whenever the store is
/// written, every append to the journal before it was fdatasynced. And a
/// burst of writes costs few fdatasyncs (they are shared), not one each.
#[test]
fn before_images_are_durable_before_the_writes_they_cover_and_share_fdatasyncs() {
    const WRITES: u64 = 300;
    if !require_tool("strace") {
        return;
    }
    let host = copy_host_with("copy-host-undo-order", "256M", &[]);
    let mut connection = connect(&host, new_identity(256 << 20).unwrap());
    begin_pass_on_a_consistent_store(&host, &mut connection);
    // The file descriptors of the store and of the journal (open while the pass runs).
    let store = std::fs::canonicalize(&host.volume).unwrap();
    let store_fds = fds_on(host.process.pid(), |target| target == store);
    let journal_fds =
        fds_on(host.process.pid(), |target| target.to_string_lossy().ends_with(engine::dr_image::UNDO_FILE_SUFFIX));
    assert!(!store_fds.is_empty() && !journal_fds.is_empty(), "store {store_fds:?}, journal {journal_fds:?}");
    // Traced from here: the burst alone, with those descriptors open throughout.
    let trace = host.scratch.join("strace.out");
    let mut strace = Tracer::attach(
        host.process.pid(),
        "trace=pwrite64,pwritev,pwritev2,write,fdatasync,fsync",
        &trace,
        &host.scratch.join("strace.log"),
    );
    burst_to_new_chunks(&mut connection, WRITES);
    assert_eq!(status(&host)["dr_image"]["state"], "kept", "the pass kept its way back: {}", status(&host));
    strace.stop();
    assert_burst_stored(&host, WRITES);
    let text = std::fs::read_to_string(&trace).unwrap();
    let (mut unsynced, mut store_writes, mut syncs, mut appends) = (false, 0, 0, 0);
    // A sync another thread's call interrupted in the trace: its thread.
    let mut syncing = std::collections::HashSet::new();
    let lines: Vec<&str> = text.lines().collect();
    for (at, line) in lines.iter().enumerate() {
        let writes = ["pwrite64", "pwritev", "pwritev2", "write"];
        let thread = line.split_whitespace().next().unwrap_or("");
        let sync_done = |line: &str| line.trim_end().ends_with("= 0");
        if traced_call(line, &writes, &journal_fds) {
            appends += 1;
            unsynced = true;
        } else if traced_call(line, &["fdatasync", "fsync"], &journal_fds) {
            if line.contains("<unfinished ...>") {
                syncing.insert(thread.to_string());
            } else if sync_done(line) {
                syncs += 1;
                unsynced = false;
            }
        } else if line.contains("sync resumed>") && syncing.remove(thread) {
            if sync_done(line) {
                syncs += 1;
                unsynced = false;
            }
        } else if traced_call(line, &writes, &store_fds) {
            store_writes += 1;
            let before = lines[at.saturating_sub(8)..=at].join("\n");
            assert!(!unsynced, "the store was written with journal appends not yet durable:\n{before}");
        }
    }
    assert!(store_writes >= WRITES, "{store_writes} store writes traced, {WRITES} sent:\n{text}");
    assert!(appends >= 1 && syncs >= 1, "{appends} journal appends, {syncs} fdatasyncs");
    assert!(syncs * 4 <= WRITES, "{syncs} journal fdatasyncs for {WRITES} writes sent together: they are not shared");
}

/// Compressed frames from an authenticated production host: a good one
/// lands decompressed; one whose payload expands past its frame's length
/// (a decompression bomb: 1 MiB of zeroes announced as 4 KiB) is refused,
/// nothing of it applied, the connection closed.
#[test]
fn a_compressed_write_lands_and_a_decompression_bomb_is_refused() {
    let host = copy_host("copy-host-compressed");
    let mut connection = connect(&host, identity());
    let send = |connection: &mut CopyConnection, offset: u64, length: u32, payload: &[u8]| {
        let mut header = connection.header(FrameKind::Write, FrameFlags::ZSTD, 1, 1);
        header.offset = offset;
        header.length = length;
        header.payload_len = payload.len() as u32;
        connection.send_raw(&encode_frame(&header, payload)).unwrap();
        header
    };
    let data = vec![0x5a; 65536];
    let header = send(&mut connection, 8192, data.len() as u32, &zstd::bulk::compress(&data, 3).unwrap());
    let ack = connection.receive().unwrap();
    assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, header.sequence));
    assert!(contents(&host)[8192..8192 + 65536].iter().all(|byte| *byte == 0x5a), "the compressed write is missing");
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
    send(&mut connection, 1 << 20, 4096, &bomb);
    assert!(connection.receive().is_err(), "the copy must close the connection");
    wait_for_log(&host, "does not decompress to the 4096 bytes its frame names");
    assert_rejected(&host, 1);
}

/// A frame replayed with an old sequence number is refused as a replay; the
/// replayed data never lands.
#[test]
fn replayed_frame_is_refused() {
    let host = copy_host("copy-host-replay");
    let mut connection = connect(&host, identity());
    write(&mut connection, 0, b"first");
    write(&mut connection, 0, b"second");
    // Replay sequence 1 ("first") with a valid CRC.
    let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
    header.sequence = 1;
    header.offset = 0;
    header.length = 5;
    header.payload_len = 5;
    connection.send(&header, b"first").unwrap();
    assert!(connection.receive().is_err(), "the copy must close the connection");
    wait_for_log(&host, "replayed or out-of-order frame");
    assert_rejected(&host, 1);
    assert_eq!(&contents(&host)[..6], b"second");
}

/// A copy that mirrors one volume refuses a production host offering
/// another: the identity check names both.
#[test]
fn another_volume_is_refused() {
    let host = copy_host("copy-host-identity");
    let mut connection = connect(&host, identity());
    write(&mut connection, 0, b"mine");
    drop(connection);
    let secret = load_secret(&host.secret).unwrap();
    let connected = wait_until(Duration::from_secs(5), || {
        let result =
            CopyConnection::connect(host.address, &secret, identity(), Duration::from_secs(5), Duration::from_secs(5));
        matches!(result, Err(error) if error.kind() == ReplicationErrorKind::Identity)
    });
    assert!(connected, "{}", host.process.log());
    wait_for_log(&host, "another volume");
    assert_eq!(&contents(&host)[..4], b"mine");
}

/// A production host that connects again (its old connection looks alive
/// to the copy, as after a link cut) takes over at once: the old session is
/// closed, the new one's writes apply.
#[test]
fn a_reconnecting_production_host_takes_over() {
    let host = copy_host("copy-host-takeover");
    let volume = identity();
    let mut old = connect(&host, volume);
    write(&mut old, 0, b"old");
    let mut new = connect(&host, volume);
    write(&mut new, 0, b"new");
    assert_eq!(&contents(&host)[..3], b"new");
    wait_for_log(&host, "the newer session takes over");
    let mut header = old.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
    header.length = 3;
    header.payload_len = 3;
    let _ = old.send(&header, b"old");
    assert!(old.receive().is_err(), "the old session must be closed");
    assert_eq!(&contents(&host)[..3], b"new");
}

/// Invariant 4: once a copy has accepted a frame of epoch 3, it refuses
/// frames of an older epoch on any later session, also after its own
/// restart (the promise is stored before the frame applies); nothing of a
/// fenced frame is applied.
#[test]
fn an_older_epoch_is_fenced_across_sessions_and_restarts() {
    let mut host = copy_host("copy-host-fencing");
    let volume = identity();
    let secret = load_secret(&host.secret).unwrap();
    let timeout = Duration::from_secs(5);
    let mut newer = CopyConnection::connect_from(host.address, None, 3, &secret, volume, timeout, timeout).unwrap();
    write_at_epoch(&mut newer, 3, 0, b"epoch3");
    drop(newer);
    restart(&mut host);
    assert_eq!(status(&host)["epoch_promised"], 3, "{}", status(&host));
    // A deposed production host (epoch 1) is refused at its Hello, before
    // it can take the session, and is told so.
    let refused = CopyConnection::connect_from(host.address, None, 1, &secret, volume, timeout, timeout);
    assert!(matches!(&refused, Err(engine::protocol::ReplicationError::Deposed { epoch: 1 })), "{:?}", refused.err());
    // A frame of an older epoch inside a current session is refused too.
    let mut current = CopyConnection::connect_from(host.address, None, 3, &secret, volume, timeout, timeout).unwrap();
    let mut header = current.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
    header.length = 6;
    header.payload_len = 6;
    current.send(&header, b"epoch1").unwrap();
    assert!(current.receive().is_err(), "the copy must close the connection of a deposed production host");
    wait_for_log(&host, "fenced frame");
    // Both are counted, as refused and as old-epoch traffic: the deposed
    // Hello and the old-epoch frame.
    assert_rejected(&host, 2);
    assert_eq!(status(&host)["old_epoch_refused"], 2, "{}", status(&host));
    assert_eq!(&contents(&host)[..6], b"epoch3");
}

/// Invariant 8: an unauthenticated peer that opens with a data frame
/// announcing the largest payload is refused at its header — nothing is
/// allocated for the payload, and the connection closes at once rather than
/// at the handshake deadline.
#[test]
fn a_data_frame_before_the_handshake_is_refused_at_its_header() {
    use std::io::{Read, Write};
    let host = copy_host("copy-host-preauth-data");
    let mut header = engine::protocol::frame::FrameHeader::new(FrameKind::Write);
    header.length = engine::protocol::frame::WRITE_BYTES_MAX;
    header.payload_len = engine::protocol::frame::WRITE_BYTES_MAX;
    let payload = vec![0u8; engine::protocol::frame::WRITE_BYTES_MAX as usize];
    let frame = encode_frame(&header, &payload);
    let bytes = &frame[..engine::protocol::frame::HEADER_LEN]; // the header only
    let mut stream = std::net::TcpStream::connect(host.address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let sent = std::time::Instant::now();
    stream.write_all(bytes).unwrap();
    // Whatever the copy answers (a refusal), the connection then closes.
    let mut answer = Vec::new();
    let ended = stream.read_to_end(&mut answer);
    let took = sent.elapsed();
    assert!(
        ended.is_ok() && took < Duration::from_secs(1),
        "the connection was not closed at the header ({ended:?} after {took:?}):\n{}",
        host.process.log()
    );
    wait_for_log(&host, "data frames wait for Accept");
}

/// Send `data` at `offset` as one Write frame cut into pieces at `cuts`
/// (byte positions in the encoded frame), each piece after a pause so the
/// copy host's reads come back short there, and wait for its ack.
fn write_in_pieces(connection: &mut CopyConnection, offset: u64, data: &[u8], cuts: &[usize]) {
    let mut header = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
    header.offset = offset;
    header.length = data.len() as u32;
    header.payload_len = data.len() as u32;
    let bytes = encode_frame(&header, data);
    let mut at = 0;
    for &cut in cuts.iter().filter(|&&cut| cut > 0 && cut < bytes.len()) {
        connection.send_raw(&bytes[at..cut]).unwrap();
        std::thread::sleep(Duration::from_micros(300));
        at = cut;
    }
    connection.send_raw(&bytes[at..]).unwrap();
    let ack = connection.receive().unwrap();
    assert_eq!((ack.header.kind, ack.header.sequence), (FrameKind::WriteAck, header.sequence));
}

/// The copy host receives a data payload straight into an aligned buffer
/// from its pool, which a `--direct` store writes as it is and which then
/// serves the next payload. Frames arrive cut at every byte of the header
/// and of the payload's first bytes, at each side of 4 KiB boundaries of a
/// 1 MiB payload, and in many pieces: every write lands whole and in place
/// (aligned and unaligned extents), and no reused buffer carries an earlier
/// frame's bytes into the store. On a buffered store too.
#[test]
fn frames_cut_at_any_byte_land_whole_on_a_direct_and_a_buffered_copy() {
    use engine::protocol::frame::HEADER_LEN;
    for (label, extra) in [("copy-host-cut-direct", &["--direct"][..]), ("copy-host-cut-buffered", &[][..])] {
        let scratch = Scratch::new(label);
        let secret = write_secret(&scratch, "secret", 11);
        let volume = scratch.join("copy.img");
        let copy = CopyHost::start(&scratch, "127.0.0.2", &volume, "8M", &secret, extra);
        let host = Host {
            volume,
            secret,
            address: copy.address,
            admin: copy.admin,
            args: copy.args,
            process: copy.process,
            scratch,
        };
        let mut connection = connect(&host, identity());
        let mut expected = vec![0u8; SIZE as usize];
        let mut seed = 1000;
        let mut write = |connection: &mut CopyConnection, offset: u64, len: usize, cuts: &[usize]| {
            seed += 1;
            let data = random_bytes(len, seed);
            write_in_pieces(connection, offset, &data, cuts);
            expected[offset as usize..offset as usize + len].copy_from_slice(&data);
        };
        // A 4 KiB write cut once at every byte of its header and of its
        // payload's first 256 bytes, then every 61 bytes; four offsets in
        // turn, so each lands over an earlier one.
        let cuts: Vec<usize> = (1..HEADER_LEN + 256).chain((HEADER_LEN + 256..HEADER_LEN + 4096).step_by(61)).collect();
        for (index, &cut) in cuts.iter().enumerate() {
            write(&mut connection, (index % 4) as u64 * 4096, 4096, &[cut]);
        }
        // 1 MiB writes cut at each side of a 4 KiB boundary of the payload,
        // and one in 64 uneven pieces.
        for (index, page) in [0usize, 1, 17, 255].into_iter().enumerate() {
            let boundary = HEADER_LEN + page * 4096;
            write(&mut connection, (1 << 20) * (1 + index as u64 % 2), 1 << 20, &[boundary - 1, boundary + 1]);
        }
        let pieces: Vec<usize> = (1..64).map(|piece| piece * 16_411).collect();
        write(&mut connection, 3 << 20, 1 << 20, &pieces);
        // Unaligned extents (a read-modify-write on the O_DIRECT store), cut
        // inside the header and inside the payload.
        for (index, (offset, len)) in
            [(4096 * 8 + 512, 10_000), (5 << 20, 777), ((6 << 20) - 3, 70_000)].into_iter().enumerate()
        {
            write(&mut connection, offset, len, &[7 + index, HEADER_LEN + 3 + index]);
        }
        let header = connection.header(FrameKind::Flush, FrameFlags::NONE, 1, 1);
        connection.send(&header, &[]).unwrap();
        assert_eq!(connection.receive().unwrap().header.kind, FrameKind::FlushAck);
        assert!(contents(&host) == expected, "{label}: the copy's store differs from the writes sent");
        assert_rejected(&host, 0);
    }
}

/// Protocol version 2: the replies of frames behind a Flush do not wait for
/// its fsync. The store is a FUSE file (nbdfuse) over nbdkit whose flush
/// takes 3 s: a write sent right after a Flush is acknowledged at once,
/// and the FlushAck follows once the fsync is done. A sync copy's client
/// used to wait for the copy's periodic bit-clearing fsync this way.
#[test]
fn a_write_behind_a_slow_flush_is_acknowledged_before_it() {
    if !(require_root() && require_tool("nbdkit") && require_tool("nbdfuse") && require_tool("fusermount3")) {
        return;
    }
    let scratch = Scratch::new("copy-host-slow-flush");
    let server = SlowFlushServer::start(&scratch, SIZE);
    let mut fuse = FuseMount::start(&scratch, &format!("nbd://127.0.0.1:{}", server.port));
    // A loop device in between: FUSE holds the file's lock through an
    // fsync, which would stop the write behind it for a reason of its own.
    let device = LoopDevice::attach(&fuse.file(), false);
    let secret = write_secret(&scratch, "secret", 11);
    let metadata = scratch.join("metadata");
    std::fs::create_dir_all(&metadata).unwrap();
    let metadata_arg = metadata.to_str().unwrap();
    let CopyHost { process, address, .. } = CopyHost::start(
        &scratch,
        "127.0.0.2",
        Path::new(&device.path),
        "8M",
        &secret,
        &["--metadata-dir", metadata_arg],
    );
    let secret = load_secret(&secret).unwrap();
    let mut connection =
        CopyConnection::connect(address, &secret, identity(), Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    write(&mut connection, 0, &random_bytes(4096, 3));
    let flushes_before = server.flushes();

    let flush = connection.header(FrameKind::Flush, FrameFlags::NONE, 1, 1);
    let mut behind = connection.header(FrameKind::Write, FrameFlags::NONE, 1, 1);
    let data = random_bytes(4096, 4);
    (behind.offset, behind.length, behind.payload_len) = (8192, 4096, 4096);
    let sent = std::time::Instant::now();
    connection.send_batch(&[(flush, &[]), (behind, &data)]).unwrap();
    let first = connection.receive().unwrap();
    let first_after = sent.elapsed();
    let second = connection.receive().unwrap();
    let second_after = sent.elapsed();
    let replies = [(first.header.kind, first.header.sequence), (second.header.kind, second.header.sequence)];
    assert_eq!(
        replies,
        [(FrameKind::WriteAck, behind.sequence), (FrameKind::FlushAck, flush.sequence)],
        "the write behind the Flush is answered first ({first_after:?}, {second_after:?})\n{}",
        process.log()
    );
    assert!(first_after < Duration::from_secs(FLUSH_SECONDS) / 2, "the write waited {first_after:?}");
    assert!(
        second_after >= Duration::from_secs(FLUSH_SECONDS),
        "the Flush did not wait for its fsync: {second_after:?}"
    );
    assert_eq!(server.flushes(), flushes_before + 1, "the Flush reached the store as one flush");
    drop(connection);
    drop(process);
    device.detach_from(&fuse.file());
    fuse.stop();
}
