//! Shared harness of the engine tests that drive the real [`Replicator`]
//! over real TCP against a fake copy host written here, which the test can
//! steer: hold acknowledgements back and release them later, or close the
//! connection. The mirror state lives in a [`TestStateStore`] that a test can
//! make block or fail when a copy is recorded stale.
//!
//! The fake copy authenticates with the real copy handshake and answers
//! through [`engine::receiver::Receiver`], so its acknowledgements are
//! exactly the real copy host's. It applies nothing.

#![allow(dead_code)]

pub mod page_cache;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use engine::bitmap::{WriteIntentBitmap, REGION_BYTES_DEFAULT, SLOTS_MAX};
use engine::metadata::VolumeMetadata;
use engine::protocol::auth::{random_nonce, CopyHandshake, HandshakeMessage, HandshakeOutcome, VolumeIdentity};
use engine::protocol::frame::encode_frame;
use engine::protocol::{Frame, FrameDecoder, FrameFlags, FrameKind, Secret};
use engine::receiver::{adopt_identity, Receiver, ReceiverCounters};
use engine::replicator::{
    Change, Completions, CopyConfig, CopyRecord, CopyState, MirrorMode, MirrorStateStore, RecordedState, Replicator,
    ReplicatorConfig, Shipped, StateError,
};
use engine::{Volume, VolumeOptions};

pub const VOLUME_SIZE: u64 = 16 << 20;
pub const REGION: u64 = REGION_BYTES_DEFAULT;
/// The identity of the test volume of `size_bytes`.
fn identity(size_bytes: u64) -> VolumeIdentity {
    VolumeIdentity { uuid: [0x43; 16], size_bytes }
}
pub const WRITE_BYTES: usize = 4096;
/// How long any one wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// How often the fake copy's blocking reads wake to look at its controls.
const READ_TICK: Duration = Duration::from_millis(5);

fn secret() -> Secret {
    Secret::from_bytes(b"clearing rule test secret 32 b!!".to_vec()).expect("32 bytes make a secret")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One frame as the fake copy received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub kind: FrameKind,
    pub offset: u64,
}

/// What the test tells the fake copy, and what the copy saw.
#[derive(Debug, Default)]
struct Control {
    frames: Vec<Seen>,
    /// Replies are kept back (in order) instead of sent.
    holding: bool,
    /// Replies kept back, with the frame each answers.
    held: VecDeque<(Seen, Vec<u8>)>,
    /// Send the kept replies up to (not including) the first whose frame
    /// matches; `None` sends them all.
    release_before: Option<Option<Seen>>,
    /// Close the connection now.
    close: bool,
}

/// Accept one connection, authenticate as the copy, then answer every
/// frame, as steered through `control`, until the connection ends or `stop`.
fn serve_copy(
    listener: TcpListener,
    control: Arc<Mutex<Control>>,
    stop: Arc<AtomicBool>,
    volume_bytes: u64,
) -> Result<(), String> {
    let Some(stream) = accept_production(&listener, &stop, READ_TICK)? else { return Ok(()) };
    let mut wire = Wire::new(stream);
    // Between frames: stop when told to, and send what the test released.
    let mut idle = |stream: &mut TcpStream| -> Result<bool, String> {
        if stop.load(Ordering::SeqCst) || lock(&control).close {
            return Ok(true);
        }
        release(stream, &control)?;
        Ok(false)
    };
    let counters = ReceiverCounters::default();
    let mut receiver = handshake_as_copy(&secret(), identity(volume_bytes), false, &counters, &mut wire, &mut idle)?;
    while let Some(frame) = wire.next_frame(&mut idle)? {
        let header = frame.header;
        let seen = Seen { kind: header.kind, offset: header.offset };
        let step = receiver.on_frame(frame).map_err(|error| format!("the copy refused {header:?}: {error}"))?;
        let mut control = lock(&control);
        control.frames.push(seen);
        let Some(reply) = step.reply else { continue };
        let bytes = encode_frame(&reply, &[]);
        if control.holding {
            control.held.push_back((seen, bytes));
        } else if let Err(error) = send(&mut wire.stream, &bytes) {
            return if stop.load(Ordering::SeqCst) { Ok(()) } else { Err(error) };
        }
    }
    // Closing (on `close`, or when this returns) ends the connection.
    let _ = wire.stream.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// Wait (at most [`TIMEOUT`], or until `stop`) for the replicator to
/// connect; the stream, blocking with reads that wake every `read_tick`.
pub fn accept_production(
    listener: &TcpListener,
    stop: &AtomicBool,
    read_tick: Duration,
) -> Result<Option<TcpStream>, String> {
    listener.set_nonblocking(true).map_err(|error| error.to_string())?;
    let deadline = Instant::now() + TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                if Instant::now() > deadline {
                    return Err("the replicator never connected".into());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(error) => return Err(format!("accept: {error}")),
        }
    };
    stream.set_nonblocking(false).map_err(|error| error.to_string())?;
    stream.set_nodelay(true).map_err(|error| error.to_string())?;
    stream.set_read_timeout(Some(read_tick)).map_err(|error| error.to_string())?;
    Ok(Some(stream))
}

/// A fake copy's socket: whole frames in, bytes out.
pub struct Wire {
    /// The connection to the production host.
    pub stream: TcpStream,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
}

impl Wire {
    /// A wire over a connected stream.
    pub fn new(stream: TcpStream) -> Wire {
        Wire { stream, decoder: FrameDecoder::new(), buffer: vec![0; 256 << 10] }
    }

    /// The next frame; `None` when the production host closed the
    /// connection or `idle` (run whenever no whole frame is buffered, before
    /// each read) says to stop.
    pub fn next_frame(
        &mut self,
        idle: &mut impl FnMut(&mut TcpStream) -> Result<bool, String>,
    ) -> Result<Option<Frame>, String> {
        loop {
            if let Some(frame) = self.decoder.pop().map_err(|error| format!("undecodable frame: {error}"))? {
                return Ok(Some(frame));
            }
            if idle(&mut self.stream)? {
                return Ok(None);
            }
            match self.stream.read(&mut self.buffer) {
                Ok(0) => return Ok(None),
                Ok(received) => self
                    .decoder
                    .push(&self.buffer[..received])
                    .map_err(|error| format!("undecodable bytes: {error}"))?,
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(error) => return Err(format!("reading from the production host: {error}")),
            }
        }
    }
}

/// Authenticate as the copy host does (Hello ─▶ Challenge, Response ─▶
/// Accept; with `empty`, the Accept says the store holds no data, as the real
/// copy host's does for an unwritten sparse file), adopt the offered volume
/// as a fresh copy, and return the real [`Receiver`] that answers the frames
/// to come.
pub fn handshake_as_copy<'a>(
    secret: &Secret,
    identity: VolumeIdentity,
    empty: bool,
    counters: &'a ReceiverCounters,
    wire: &mut Wire,
    idle: &mut impl FnMut(&mut TcpStream) -> Result<bool, String>,
) -> Result<Receiver<'a>, String> {
    let nonce = random_nonce().map_err(|error| error.to_string())?;
    let mut handshake = CopyHandshake::new(secret, identity, nonce);
    let session = loop {
        let frame = wire.next_frame(idle)?.ok_or("the connection ended during the handshake")?;
        let message = HandshakeMessage::from_frame(&frame).map_err(|error| error.to_string())?;
        let next = handshake.on_message(&message);
        if let Some(reply) = &next.send {
            let (mut header, payload) = reply.to_frame();
            if empty && matches!(reply, HandshakeMessage::Accept { .. }) {
                header.flags = FrameFlags::EMPTY;
            }
            send(&mut wire.stream, &encode_frame(&header, &payload))?;
        }
        match next.outcome {
            HandshakeOutcome::Continue => {}
            HandshakeOutcome::Established(session) => break session,
            HandshakeOutcome::Failed(error) => return Err(format!("handshake failed: {error}")),
        }
    };
    // A fresh copy adopts the volume it is offered, as the copy host's `admit` does.
    let metadata = adopt_identity(Path::new("fake-copy"), &VolumeMetadata::fresh(), &session)
        .map_err(|error| error.to_string())?
        .expect("a fresh copy adopts the offered volume");
    Ok(Receiver::new(&session, metadata, identity.size_bytes, counters))
}

/// Write `bytes` to the production host.
pub fn send(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    stream.write_all(bytes).map_err(|error| format!("writing to the production host: {error}"))
}

/// Send the held replies the test released.
fn release(stream: &mut TcpStream, control: &Mutex<Control>) -> Result<(), String> {
    let mut control = lock(control);
    let Some(before) = control.release_before.take() else { return Ok(()) };
    while let Some((seen, _)) = control.held.front() {
        if Some(*seen) == before {
            break;
        }
        let (_, bytes) = control.held.pop_front().expect("front exists");
        send(stream, &bytes)?;
    }
    if before.is_none() {
        control.holding = false;
    }
    Ok(())
}

/// How the test store treats a record that says a copy is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleRecords {
    /// Stored at once.
    Store,
    /// `store` waits until the test lets it go on.
    Block,
    /// `store` fails.
    Fail,
}

/// A mirror-state store in memory whose recording of a stale copy can be
/// made to block or fail (pure plumbing: the replicator sees only the trait).
#[derive(Debug)]
pub struct TestStateStore {
    inner: Mutex<StoreInner>,
    changed: Condvar,
}

#[derive(Debug)]
struct StoreInner {
    records: Vec<CopyRecord>,
    mode: StaleRecords,
    /// A `store` of a stale record is blocked now.
    blocked: bool,
}

impl TestStateStore {
    pub fn new() -> Arc<TestStateStore> {
        Arc::new(TestStateStore {
            inner: Mutex::new(StoreInner { records: Vec::new(), mode: StaleRecords::Store, blocked: false }),
            changed: Condvar::new(),
        })
    }

    /// Treat stale records `mode` from now on; wakes a blocked `store`.
    pub fn set_mode(&self, mode: StaleRecords) {
        lock(&self.inner).mode = mode;
        self.changed.notify_all();
    }

    /// The recorded state of the copy named "copy".
    pub fn recorded(&self) -> Option<RecordedState> {
        lock(&self.inner).records.iter().find(|record| record.name == "copy").map(|record| record.state)
    }

    /// Whether a `store` of a stale record is blocked now.
    pub fn is_blocked(&self) -> bool {
        lock(&self.inner).blocked
    }
}

impl MirrorStateStore for TestStateStore {
    fn load(&self) -> Result<Vec<CopyRecord>, StateError> {
        Ok(lock(&self.inner).records.clone())
    }

    fn store(&self, records: &[CopyRecord]) -> Result<(), StateError> {
        let mut inner = lock(&self.inner);
        let stale = records.iter().any(|record| record.state == RecordedState::Stale);
        while stale && inner.mode == StaleRecords::Block {
            inner.blocked = true;
            inner = self.changed.wait(inner).unwrap_or_else(PoisonError::into_inner);
        }
        inner.blocked = false;
        if stale && inner.mode == StaleRecords::Fail {
            return Err(StateError::Unavailable {
                path: "test-store".into(),
                action: "record a copy stale",
                source: std::io::Error::other("the test makes stale records fail"),
            });
        }
        inner.records = records.to_vec();
        Ok(())
    }
}

/// A replicator with one copy, the fake copy host it ships to, the
/// client-side completion queue and the bitmap. Dropping it lets a blocked
/// store go on and stops both.
pub struct Mirror {
    pub replicator: Arc<Replicator>,
    pub completions: Arc<Completions>,
    pub bitmap: Arc<WriteIntentBitmap>,
    pub store: Arc<TestStateStore>,
    /// The local volume's file (a sparse file on /var/tmp, buffered).
    pub volume_path: PathBuf,
    control: Arc<Mutex<Control>>,
    stop: Arc<AtomicBool>,
    copy: Option<JoinHandle<Result<(), String>>>,
    /// Completions taken off the queue and not yet claimed by a wait.
    taken: Vec<(u64, i32)>,
    _directory: tempfile::TempDir,
}

impl Mirror {
    /// Start a replicator whose local volume may be fsynced for clearing
    /// at most every `local_sync_interval`, and its fake copy.
    pub fn start(mode: MirrorMode, local_sync_interval: Duration) -> Mirror {
        Mirror::start_sized(mode, local_sync_interval, VOLUME_SIZE)
    }

    /// [`Mirror::start`] on a volume of `volume_bytes`.
    pub fn start_sized(mode: MirrorMode, local_sync_interval: Duration, volume_bytes: u64) -> Mirror {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let volume_path = directory.path().join("volume");
        let options =
            VolumeOptions { path: volume_path.clone(), size: Some(volume_bytes), direct: false, read_only: false };
        let volume = Arc::new(Volume::open(&options).unwrap());
        let bitmap = Arc::new(
            WriteIntentBitmap::open_or_create(
                &directory.path().join("volume.cmbitmap"),
                volume_bytes,
                REGION_BYTES_DEFAULT,
                SLOTS_MAX,
            )
            .unwrap(),
        );
        let store = TestStateStore::new();
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
            identity: identity(volume_bytes),
            generation: 1,
            epoch: 1,
            resync_rate_max: 0,
            resync_checksums: false,
            assume_clean: false,
            local_sync_interval,
            source_address: None,
            bitmap_trust: engine::replicator::BitmapTrust::Always,
            metadata_path: None,
        };
        let replicator = Replicator::start(volume, bitmap.clone(), store.clone(), config).unwrap();
        let completions = Completions::new().unwrap();
        let control: Arc<Mutex<Control>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let copy = {
            let (control, stop) = (control.clone(), stop.clone());
            std::thread::Builder::new()
                .name("fake-copy".into())
                .spawn(move || serve_copy(listener, control, stop, volume_bytes))
                .unwrap()
        };
        Mirror {
            replicator,
            completions,
            bitmap,
            store,
            volume_path,
            control,
            stop,
            copy: Some(copy),
            taken: Vec::new(),
            _directory: directory,
        }
    }

    /// Fail at once, with its error, if the fake copy host gave up.
    fn check_copy(&mut self) {
        if self.copy.as_ref().is_some_and(JoinHandle::is_finished) && !lock(&self.control).close {
            let result = self.copy.take().unwrap().join().expect("the fake copy host panicked");
            panic!("the fake copy host ended early: {result:?}; frames: {:?}", self.frames());
        }
    }

    /// Poll until `done` holds, for at most [`TIMEOUT`].
    pub fn wait_until(&mut self, what: &str, mut done: impl FnMut(&mut Mirror) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(self) {
            self.check_copy();
            assert!(Instant::now() < deadline, "timed out waiting for {what}; frames: {:?}", self.frames());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn wait_up_to_date(&mut self) {
        self.wait_until("the copy to be up_to_date", |mirror| {
            mirror.replicator.status()[0].state == CopyState::UpToDate
        });
    }

    /// Wait until the copy is up to date, then flush until every bit of it
    /// is clear: nothing is touched or a candidate any more, so the link
    /// sends no Flush of its own (it does every 500 ms while something is)
    /// and every Flush acknowledged from here on is one the test shipped.
    /// Bits clear only once the background local sync has run after a
    /// Flush, so the Flushes go 10 ms apart for up to 10 s, not a fixed count.
    pub fn wait_quiet(&mut self) {
        self.wait_up_to_date();
        let deadline = Instant::now() + Duration::from_secs(10);
        for id in 1_000_000.. {
            self.flush_and_wait(id);
            if self.replicator.status()[0].dirty_bytes == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "the copy's bits never cleared: {:?}", self.replicator.status());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The frames the copy has received so far.
    pub fn frames(&self) -> Vec<Seen> {
        lock(&self.control).frames.clone()
    }

    /// Wait until the copy received a frame of `kind` at `offset`.
    pub fn wait_frame(&mut self, kind: FrameKind, offset: u64) {
        self.wait_until(&format!("a {kind:?} frame at {offset}"), |mirror| {
            mirror.frames().contains(&Seen { kind, offset })
        });
    }

    /// Keep the copy's replies back from now on.
    pub fn hold_acks(&self) {
        lock(&self.control).holding = true;
    }

    /// Send the kept replies up to (not including) the one that answers
    /// `before`, and keep holding; `None` sends all and stops holding.
    pub fn release_acks(&mut self, before: Option<Seen>) {
        lock(&self.control).release_before = Some(before);
        self.wait_until("the fake copy to send the released replies", |mirror| {
            lock(&mirror.control).release_before.is_none()
        });
    }

    /// The fake copy closes the connection (as a copy host that dies does).
    pub fn close_connection(&self) {
        lock(&self.control).close = true;
    }

    /// The result of change `id` if it has been released to the client.
    pub fn answer(&mut self, id: u64) -> Option<i32> {
        self.completions.take(&mut self.taken);
        self.taken.iter().find(|(done, _)| *done == id).map(|&(_, result)| result)
    }

    /// Wait until change `id`, shipped as `shipped`, may be answered; its result.
    pub fn wait_answer(&mut self, shipped: Shipped, id: u64) -> i32 {
        if let Shipped::Done(result) = shipped {
            return result;
        }
        let mut result = None;
        self.wait_until(&format!("the answer to change {id}"), |mirror| {
            result = mirror.answer(id);
            result.is_some()
        });
        result.expect("waited for it")
    }

    /// A write of `WRITE_BYTES` at `offset`, begun and shipped as the
    /// frontend does once the local write completed.
    pub fn write(&self, offset: u64, id: u64) -> Shipped {
        let data = vec![id as u8; WRITE_BYTES];
        self.replicator.begin_write(offset, data.len() as u64).unwrap();
        self.replicator.ship(Change::Write { offset, data: &data, fua: false }, &self.completions, id)
    }

    /// Write and wait for the answer, which must be success.
    pub fn write_and_wait(&mut self, offset: u64, id: u64) {
        let shipped = self.write(offset, id);
        assert_eq!(self.wait_answer(shipped, id), 0, "the write {id} at {offset} failed");
    }

    pub fn flush(&self, id: u64) -> Shipped {
        self.replicator.ship(Change::Flush, &self.completions, id)
    }

    /// Flush and wait for the answer, which must be success.
    pub fn flush_and_wait(&mut self, id: u64) {
        let shipped = self.flush(id);
        assert_eq!(self.wait_answer(shipped, id), 0, "the flush {id} failed");
    }

    /// Flush (ids from `first_id` on, 10 ms apart) until the bit of the
    /// region holding `offset` clears, for at most [`TIMEOUT`]: a quiet
    /// region clears at the second acknowledged Flush after its write, once
    /// the local volume's background sync that started after the first has
    /// completed, which may take more Flushes. Returns the next unused id.
    pub fn flush_until_clear(&mut self, offset: u64, first_id: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        let mut id = first_id;
        while self.dirty(offset) {
            assert!(Instant::now() < deadline, "the bit at {offset} never cleared through {} Flushes", id - first_id);
            self.flush_and_wait(id);
            id += 1;
            if self.dirty(offset) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        id
    }

    /// Whether the copy's bit of the region holding `offset` is set.
    pub fn dirty(&self, offset: u64) -> bool {
        self.bitmap.is_set(0, offset / REGION)
    }

    fn shut_down(&mut self) -> Option<Result<(), String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.store.set_mode(StaleRecords::Store);
        self.replicator.stop();
        let copy = self.copy.take()?;
        Some(copy.join().unwrap_or_else(|_| Err("the fake copy host panicked".into())))
    }

    /// Stop the replicator and the copy; the copy's own verdict.
    pub fn finish(mut self) -> Result<(), String> {
        self.shut_down().unwrap_or(Ok(()))
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}
