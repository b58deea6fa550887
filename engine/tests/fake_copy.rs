//! The production side's replicator over real sockets, against a fake copy
//! host written here: its BARRIER marking (invariant 5), and `--assume-clean`
//! keeping the bit of a region with a write in flight (invariant 6).
//!
//! The rule (see `engine::replicator`): an async link marks a write or flush
//! frame BARRIER when the count of changes released to be acknowledged to the
//! client changed since that link last queued a barrier frame; a sync link
//! never does, since its own acknowledgement gates the client's.
//!
//! The fake copy authenticates with the real copy handshake, records the kind,
//! flags and offset of every frame it receives, and answers through
//! [`engine::receiver::Receiver`], so its acknowledgements are exactly the real
//! copy host's. It applies nothing.

mod support;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::bitmap::{WriteIntentBitmap, REGION_BYTES_DEFAULT, SLOTS_MAX};
use engine::protocol::auth::VolumeIdentity;
use engine::protocol::frame::encode_frame;
use engine::protocol::{FrameFlags, FrameKind, Secret};
use engine::receiver::ReceiverCounters;
use engine::replicator::{
    Change, Completions, CopyConfig, CopyState, LocalStateFile, MirrorMode, Replicator, ReplicatorConfig, Shipped,
    LOCAL_SYNC_INTERVAL_DEFAULT,
};
use engine::{Volume, VolumeOptions};

const VOLUME_SIZE: u64 = 16 << 20;
const IDENTITY: VolumeIdentity = VolumeIdentity { uuid: [0x42; 16], size_bytes: VOLUME_SIZE };
const WRITE_BYTES: usize = 4096;
/// How long any one wait may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How often the fake copy's blocking reads wake to look at its stop flag.
const READ_TICK: Duration = Duration::from_millis(50);

fn secret() -> Secret {
    Secret::from_bytes(b"barrier flags test secret, 32 b!".to_vec()).expect("32 bytes make a secret")
}

/// One frame as the fake copy received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    kind: FrameKind,
    flags: FrameFlags,
    offset: u64,
    length: u32,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn snapshot(log: &Log) -> Vec<Seen> {
    log.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Accept one connection, authenticate as the copy, then record and
/// acknowledge every frame until the connection ends or `stop` is set.
/// With `empty`, the Accept says the copy's store holds no data, as the real
/// copy host's does for an unwritten sparse file.
fn serve_copy(
    listener: TcpListener,
    secret: Secret,
    log: Log,
    stop: Arc<AtomicBool>,
    empty: bool,
) -> Result<(), String> {
    let Some(stream) = support::accept_production(&listener, &stop, READ_TICK)? else { return Ok(()) };
    let mut wire = support::Wire::new(stream);
    let mut idle = |_: &mut std::net::TcpStream| Ok(stop.load(Ordering::SeqCst));
    let counters = ReceiverCounters::default();
    let mut receiver = support::handshake_as_copy(&secret, IDENTITY, empty, &counters, &mut wire, &mut idle)?;
    while let Some(frame) = wire.next_frame(&mut idle)? {
        let header = frame.header;
        log.lock().unwrap_or_else(PoisonError::into_inner).push(Seen {
            kind: header.kind,
            flags: header.flags,
            offset: header.offset,
            length: header.length,
        });
        let step = receiver.on_frame(frame).map_err(|error| format!("the copy refused {header:?}: {error}"))?;
        if let Some(reply) = step.reply {
            if let Err(error) = support::send(&mut wire.stream, &encode_frame(&reply, &[])) {
                // The production host may close first when the test stops it.
                return if stop.load(Ordering::SeqCst) { Ok(()) } else { Err(error) };
            }
        }
    }
    Ok(())
}

/// A replicator with one copy, the fake copy host it ships to, and the
/// client-side completion queue. Dropping it stops both.
struct Mirror {
    replicator: Arc<Replicator>,
    completions: Arc<Completions>,
    log: Log,
    stop: Arc<AtomicBool>,
    copy: Option<JoinHandle<Result<(), String>>>,
    _directory: tempfile::TempDir,
}

impl Mirror {
    fn start(mode: MirrorMode) -> Mirror {
        Mirror::start_with(mode, false, |_, _| {})
    }

    /// Start the replicator, run `before_copy` while the copy host has not
    /// answered the handshake yet (so the link is still disconnected), then
    /// start the fake copy host. With `assume_clean`, the replicator runs
    /// with `--assume-clean` and the copy says its store is empty.
    fn start_with(
        mode: MirrorMode,
        assume_clean: bool,
        before_copy: impl FnOnce(&Replicator, &Arc<Completions>),
    ) -> Mirror {
        let directory = tempfile::tempdir().unwrap();
        let volume_path = directory.path().join("volume");
        let options =
            VolumeOptions { path: volume_path.clone(), size: Some(VOLUME_SIZE), direct: false, read_only: false };
        let volume = Arc::new(Volume::open(&options).unwrap());
        let bitmap = WriteIntentBitmap::open_or_create(
            &directory.path().join("volume.cmbitmap"),
            VOLUME_SIZE,
            REGION_BYTES_DEFAULT,
            SLOTS_MAX,
        )
        .unwrap();
        let store = LocalStateFile::at(&engine::metadata::MetadataFiles::beside(&volume_path).state);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let config = ReplicatorConfig {
            copies: vec![CopyConfig {
                name: "copy".into(),
                address: Some(address),
                mode,
                lag_bytes_max: 64 << 20,
                lag_ms_max: 0,
                compress: engine::protocol::Compression::None,
            }],
            secret: secret(),
            identity: IDENTITY,
            generation: 1,
            epoch: 1,
            resync_rate_max: 0,
            resync_checksums: false,
            assume_clean,
            metadata_path: None,
            local_sync_interval: LOCAL_SYNC_INTERVAL_DEFAULT,
            source_address: None,
            bitmap_trust: engine::replicator::BitmapTrust::Always,
        };
        let replicator = Replicator::start(volume, Arc::new(bitmap), Arc::new(store), config).unwrap();
        let completions = Completions::new().unwrap();
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut mirror = Mirror { replicator, completions, log, stop, copy: None, _directory: directory };
        before_copy(&mirror.replicator, &mirror.completions);
        let (log, stop) = (mirror.log.clone(), mirror.stop.clone());
        mirror.copy = Some(
            std::thread::Builder::new()
                .name("fake-copy".into())
                .spawn(move || serve_copy(listener, secret(), log, stop, assume_clean))
                .unwrap(),
        );
        mirror
    }

    /// Fail at once, with its error, if the fake copy host gave up.
    fn check_copy(&mut self) {
        if self.copy.as_ref().is_some_and(JoinHandle::is_finished) {
            let result = self.copy.take().unwrap().join().expect("the fake copy host panicked");
            panic!("the fake copy host ended early: {result:?}; frames: {:?}", snapshot(&self.log));
        }
    }

    /// Poll until `done` holds, for at most [`TIMEOUT`].
    fn wait_until(&mut self, what: &str, mut done: impl FnMut(&Mirror) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(self) {
            self.check_copy();
            assert!(Instant::now() < deadline, "timed out waiting for {what}; frames: {:?}", snapshot(&self.log));
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_up_to_date(&mut self) {
        self.wait_until("the copy to be up_to_date", |mirror| {
            mirror.replicator.status()[0].state == CopyState::UpToDate
        });
    }

    /// The frames the copy has received so far.
    fn frames(&self) -> Vec<Seen> {
        snapshot(&self.log)
    }

    /// Wait until the copy received a Write frame at `offset`.
    fn wait_write_frame(&mut self, offset: u64) {
        self.wait_until(&format!("the write at {offset}"), |mirror| {
            mirror.frames().iter().any(|seen| seen.kind == FrameKind::Write && seen.offset == offset)
        });
    }

    /// Wait until the client may be answered for the change shipped as `id`.
    fn wait_completion(&mut self, id: u64) {
        let mut taken = Vec::new();
        let completions = self.completions.clone();
        self.wait_until(&format!("the completion of change {id}"), |_| {
            completions.take(&mut taken);
            taken.iter().any(|&(done, _)| done == id)
        });
        assert_eq!(taken, [(id, 0)], "exactly change {id} completes, successfully");
    }

    /// A write of `WRITE_BYTES` at `offset`, begun and shipped as the
    /// frontend does once the local write completed.
    fn write(&self, offset: u64, id: u64) -> Shipped {
        ship_write(&self.replicator, &self.completions, offset, id)
    }

    /// Wait until the change `id`, shipped to a sync copy, may be answered
    /// to the client: its copy acknowledged it. Usually `ship` returns
    /// Pending and the answer comes through the completions; on loopback
    /// the ack may overtake the rest of `ship`, which then answers Done at
    /// once — only after the copy received (and acknowledged) its frame,
    /// which `received` finds in the frames.
    fn wait_sync_answer(&mut self, shipped: Shipped, id: u64, received: impl Fn(&[Seen]) -> bool) {
        match shipped {
            Shipped::Pending => self.wait_completion(id),
            Shipped::Done(result) => {
                assert_eq!(result, 0, "change {id} failed");
                let frames = self.frames();
                assert!(received(&frames), "change {id} answered before its copy had it: {frames:?}");
            }
        }
    }

    fn flush(&self, id: u64) -> Shipped {
        self.replicator.ship(Change::Flush, &self.completions, id)
    }

    /// Stop the replicator and the copy; the copy's own verdict.
    fn finish(mut self) -> Result<(), String> {
        self.shut_down().unwrap_or(Ok(()))
    }

    fn shut_down(&mut self) -> Option<Result<(), String>> {
        // Set first: the copy may see the connection close under it.
        self.stop.store(true, Ordering::SeqCst);
        self.replicator.stop();
        let copy = self.copy.take()?;
        Some(copy.join().unwrap_or_else(|_| Err("the fake copy host panicked".into())))
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

fn ship_write(replicator: &Replicator, completions: &Arc<Completions>, offset: u64, id: u64) -> Shipped {
    let data = vec![id as u8; WRITE_BYTES];
    replicator.begin_write(offset, data.len() as u64).unwrap();
    replicator.ship(Change::Write { offset, data: &data, fua: false }, completions, id)
}

/// The frame of the write at `offset` (each test writes an offset once).
fn write_frame(frames: &[Seen], offset: u64) -> (usize, Seen) {
    let mut found =
        frames.iter().copied().enumerate().filter(|(_, seen)| seen.kind == FrameKind::Write && seen.offset == offset);
    let first = found.next().unwrap_or_else(|| panic!("no Write frame at {offset}: {frames:?}"));
    assert_eq!(found.next(), None, "one Write frame at {offset}: {frames:?}");
    first
}

const A: u64 = 0;
const B: u64 = 1 << 20;
const C: u64 = 2 << 20;
const D: u64 = 3 << 20;
const E: u64 = 4 << 20;

/// An async link: nothing was released before the first write, so its
/// frame is no barrier; every later write and flush follows a release (each
/// async ship releases its change at once) and is one.
#[test]
fn async_frames_after_a_release_carry_barrier() {
    let mut mirror = Mirror::start(MirrorMode::Async);
    mirror.wait_up_to_date();
    // released 0, last barrier at 0: A is no barrier. Its ship releases it (1).
    assert_eq!(mirror.write(A, 1), Shipped::Done(0), "an async copy does not hold the client's answer");
    // released 1 ≠ 0: B is a barrier (last barrier at 1); its ship releases (2).
    assert_eq!(mirror.write(B, 2), Shipped::Done(0));
    // Back to back, but each after the release of the one before: C, D, the
    // Flush and E all see released move since the last barrier.
    assert_eq!(mirror.write(C, 3), Shipped::Done(0));
    assert_eq!(mirror.write(D, 4), Shipped::Done(0));
    assert_eq!(mirror.flush(5), Shipped::Done(0));
    assert_eq!(mirror.write(E, 6), Shipped::Done(0));
    mirror.wait_write_frame(E);
    let frames = mirror.frames();

    let writes: Vec<(u64, FrameFlags)> =
        [A, B, C, D, E].into_iter().map(|offset| (offset, write_frame(&frames, offset).1.flags)).collect();
    assert_eq!(
        writes,
        [
            (A, FrameFlags::NONE),
            (B, FrameFlags::BARRIER),
            (C, FrameFlags::BARRIER),
            (D, FrameFlags::BARRIER),
            (E, FrameFlags::BARRIER),
        ],
        "frames: {frames:?}"
    );
    // The links send in ship order: A, B, C, D, Flush, E.
    let positions: Vec<usize> = [A, B, C, D, E].into_iter().map(|offset| write_frame(&frames, offset).0).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "writes out of order: {frames:?}");
    // Between D and E: the shipped Flush, a barrier, and maybe periodic
    // clean-up flushes or heartbeats, which `ship` did not queue and which
    // are no barriers.
    let between = &frames[positions[3] + 1..positions[4]];
    let barriers: Vec<&Seen> = between.iter().filter(|seen| seen.flags.contains(FrameFlags::BARRIER)).collect();
    assert_eq!(barriers.len(), 1, "one barrier between D and E, the shipped Flush: {between:?}");
    assert_eq!((barriers[0].kind, barriers[0].flags), (FrameKind::Flush, FrameFlags::BARRIER));
    // Everything else (resync data, the resync pass's SYNCED flush, clean-up
    // flushes, heartbeats) was not queued by `ship`: never a barrier.
    for (index, seen) in frames.iter().enumerate() {
        if seen.kind == FrameKind::Write || (positions[3] < index && index < positions[4]) {
            continue;
        }
        assert!(!seen.flags.contains(FrameFlags::BARRIER), "{seen:?} is no shipped change, yet a barrier: {frames:?}");
    }
    // The volume is empty, so the resync goes as zeroes (ResyncZeroes), without data.
    let resync = |kind| matches!(kind, FrameKind::ResyncData | FrameKind::ResyncZeroes);
    assert!(frames.iter().any(|seen| resync(seen.kind)), "the new copy was resynced first");
    assert_eq!(mirror.finish(), Ok(()));
}

/// An async link that missed a released change while disconnected: the
/// change was dropped, not queued, so the link's last barrier is still from
/// before it, and the first frame it queues after connecting is a barrier.
#[test]
fn async_first_frame_after_connect_is_a_barrier_when_a_change_was_released_meanwhile() {
    const MISSED: u64 = 5 << 20;
    let mut mirror = Mirror::start_with(MirrorMode::Async, false, |replicator, completions| {
        // The copy host has not answered the handshake: the link is disconnected.
        assert_eq!(replicator.status()[0].state, CopyState::Stale);
        assert_eq!(ship_write(replicator, completions, MISSED, 1), Shipped::Done(0));
    });
    mirror.wait_up_to_date();
    // released 1 (the missed write), last barrier at 0: A is a barrier.
    assert_eq!(mirror.write(A, 2), Shipped::Done(0));
    assert_eq!(mirror.write(B, 3), Shipped::Done(0));
    mirror.wait_write_frame(B);
    let frames = mirror.frames();
    assert!(
        !frames.iter().any(|seen| seen.kind == FrameKind::Write && seen.offset == MISSED),
        "the write shipped while disconnected reaches the copy by resync only: {frames:?}"
    );
    assert_eq!(write_frame(&frames, A).1.flags, FrameFlags::BARRIER, "frames: {frames:?}");
    assert_eq!(write_frame(&frames, B).1.flags, FrameFlags::BARRIER, "frames: {frames:?}");
    assert_eq!(mirror.finish(), Ok(()));
}

/// A sync link: A's acknowledgement releases it to the client before B is
/// shipped (what makes an async link mark B), yet no frame is a barrier.
#[test]
fn sync_frames_never_carry_barrier() {
    let mut mirror = Mirror::start(MirrorMode::Sync);
    mirror.wait_up_to_date();
    let has_write = |offset| {
        move |frames: &[Seen]| frames.iter().any(|seen| seen.kind == FrameKind::Write && seen.offset == offset)
    };
    let shipped = mirror.write(A, 1);
    mirror.wait_sync_answer(shipped, 1, has_write(A));
    // A is released to the client now: an async link would mark B a barrier.
    let shipped = mirror.write(B, 2);
    mirror.wait_sync_answer(shipped, 2, has_write(B));
    let flush_count = |frames: &[Seen]| frames.iter().filter(|seen| seen.kind == FrameKind::Flush).count();
    let flushes = flush_count(&mirror.frames());
    let shipped = mirror.flush(3);
    mirror.wait_sync_answer(shipped, 3, |frames| flush_count(frames) > flushes);
    let frames = mirror.frames();
    assert_eq!(write_frame(&frames, A).1.flags, FrameFlags::NONE, "frames: {frames:?}");
    assert_eq!(write_frame(&frames, B).1.flags, FrameFlags::NONE, "frames: {frames:?}");
    assert!(write_frame(&frames, A).0 < write_frame(&frames, B).0);
    for seen in &frames {
        assert!(!seen.flags.contains(FrameFlags::BARRIER), "a sync link sent a barrier: {seen:?} in {frames:?}");
    }
    assert!(frames.iter().any(|seen| seen.kind == FrameKind::Flush && seen.flags == FrameFlags::NONE));
    assert_eq!(mirror.finish(), Ok(()));
}

/// Invariant 6 under `--assume-clean`: both stores are empty, so the new
/// copy's dirty regions are cleared, except one with a write in flight (begun
/// before the copy connected, not yet shipped). Its bit must stay set: if the
/// copy then missed that write, a crash of this host must still find it.
#[test]
fn assume_clean_keeps_the_bit_of_a_region_with_a_write_in_flight() {
    let mut mirror = Mirror::start_with(MirrorMode::Sync, true, |replicator, _| {
        replicator.begin_write(C, WRITE_BYTES as u64).unwrap();
    });
    mirror.wait_up_to_date();
    let status = &mirror.replicator.status()[0];
    assert_eq!(status.dirty_bytes, REGION_BYTES_DEFAULT, "only the region in flight stays dirty: {status:?}");
    assert_eq!(status.resync_bytes_total, REGION_BYTES_DEFAULT, "only that region is resynced: {status:?}");
    // (A region may go in parts: the resync window bounds a read.)
    let resynced: Vec<(u64, u64)> = mirror
        .frames()
        .iter()
        .filter(|seen| matches!(seen.kind, FrameKind::ResyncData | FrameKind::ResyncZeroes))
        .map(|seen| (seen.offset, seen.offset + u64::from(seen.length)))
        .collect();
    let covered = resynced.windows(2).all(|pair| pair[0].1 == pair[1].0)
        && resynced.first().map(|first| first.0) == Some(C)
        && resynced.last().map(|last| last.1) == Some(C + REGION_BYTES_DEFAULT);
    assert!(covered, "the region in flight goes whole, nothing else: {resynced:?}");
    mirror.replicator.abandon(C, WRITE_BYTES as u64);
    mirror.finish().unwrap();
}
