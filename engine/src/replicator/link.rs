//! One copy's link: a thread that connects (with backoff), authenticates,
//! resyncs the copy's dirty regions, and sends every change shipped to it;
//! a reader thread per connection takes the copy's acknowledgements.
//!
//! ```text
//!          ┌── connection fails or ends without progress: back off 0.1 s, 0.2 s, … 10 s ◀──┐
//!  stale ──┴─▶ connect + handshake ─▶ syncing ─▶ resync pass + flush ack ─▶ up_to_date     │
//!    ▲                                   ▲  async lag over the bound: behind ┘ │            │
//!    └──── any error: record stale, release every waiting write, keep the reason ─────────┘
//! ```
//!
//! Every failed connection — refused, timed out, closed, or ended by the
//! copy host's Error frame (its store is full, say) — waits before the next
//! try, doubling from BACKOFF_MIN up to BACKOFF_MAX; a connection that made
//! progress (a bit cleared, or the copy up to date) and did not end with the
//! copy's Error frame starts over from BACKOFF_MIN. Without it a copy host that failed every connection at once
//! was redialled ~27 times a second and sent the same resync data each time.
//! Why the last connection failed is kept as the copy's `last_error` for
//! status until it is up to date again.
//!
//! Clearing the bitmap: every change queued for the copy adds its regions to
//! `touched`. A Flush takes `touched` as its snapshot; the regions of an
//! acknowledged snapshot become candidates, and at the next acknowledged
//! Flush each candidate that no change touched since, no write has in
//! flight, and that is not `resync_pending` is cleared in the copy's slot.
//!
//! `resync_pending` holds the regions the copy may lack whole: every dirty
//! region when the connection begins, and the regions of every change the
//! copy did not get (disconnected, behind). A bit covers a whole region, so a
//! later write to part of such a region reaching the copy proves nothing
//! about the rest: only a resync pass, which sends the region whole, takes it
//! out. Resync passes walk `resync_pending`, from the first region, whenever
//! the copy (re)connects or catches up after being behind. (A region cleared
//! merely because a partial write to it was acknowledged lost a missed write
//! once; `partial_write_during_resync_does_not_hide_a_missed_write` in
//! tests/tests/mirror.rs is that case.)

use std::collections::{HashSet, VecDeque};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::protocol::auth::STORE_TOKEN_UNKNOWN;
use crate::protocol::copy_failure::CopyFailure;
use crate::protocol::frame::{FrameFlags, FrameHeader, FrameKind};
use crate::protocol::{FrameDecoder, ReplicationError};
use crate::replicator::connect::CopyConnection;
use crate::replicator::resync_set::ResyncSet;
use crate::replicator::{Change, CopyConfig, MirrorMode, RecordedState, Shared, Ticket, VerifyError};

/// How long a connection attempt (connect and handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and last wait between connection attempts: doubled after each
/// connection that failed or made no progress, back to the first after one
/// that made progress.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest `last_error` kept for status, in bytes.
const LAST_ERROR_BYTES_MAX: usize = 1024;
/// Resync data is checked for zeroes in chunks of this many bytes; a chunk
/// of zeroes goes as ResyncZeroes, without data, and stays a hole on a
/// thin copy.
const ZERO_CHUNK_BYTES: u64 = 64 << 10;
/// At most how often the local volume is fsynced so that bits can clear
/// (under a sustained random load some region always goes quiet), unless
/// the configuration says otherwise.
pub const LOCAL_SYNC_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// How often touched regions are flushed on the copy so their bits can clear.
const CLEAN_INTERVAL: Duration = Duration::from_millis(500);
/// Frames taken off the queue per send round.
const SEND_BATCH_FRAMES: usize = 64;
/// The most resync data in one frame (adjacent dirty regions are joined).
const RESYNC_FRAME_BYTES: u64 = 1 << 20;
/// Resync queues more data only while less than this is queued or unacked.
const RESYNC_WINDOW_BYTES: u64 = 32 << 20;
/// A sync link stops taking new writes (the writer waits) past this many
/// unacknowledged bytes, so a slow copy cannot exhaust memory.
const SYNC_QUEUE_BYTES_MAX: u64 = 256 << 20;
/// A heartbeat is sent after this long without any frame.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A copy that leaves a frame unacknowledged this long, or a socket that
/// takes no bytes this long, is declared lost (like DRBD's `timeout`): sync
/// writes wait at most about this long for a dead copy.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long verify waits for writes to an extent to pause.
const VERIFY_WAIT_MAX: Duration = Duration::from_secs(10);

/// What a copy looks like from the production host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// Connected, resynced, receiving every write.
    UpToDate,
    /// Connected and being resynced: not a consistent image.
    Syncing,
    /// Async copy past its lag bound: writes are tracked in the bitmap only
    /// until the queue drains and a resync pass starts.
    Behind,
    /// Not connected and recorded stale; its writes are tracked in the bitmap.
    Stale,
    /// Not connected, and recording it stale failed: writes it misses
    /// cannot be acknowledged (they get EIO) until the record succeeds.
    Unrecorded,
    /// The production store failed a flush: writes acknowledged before it
    /// may be missing there while this copy holds them. Neither side is
    /// known to match the other (see `Replicator::local_flush_failed`).
    Diverged,
}

impl CopyState {
    /// The state's name in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyState::UpToDate => "up_to_date",
            CopyState::Syncing => "syncing",
            CopyState::Behind => "behind",
            CopyState::Stale => "stale",
            CopyState::Unrecorded => "disconnected",
            CopyState::Diverged => "diverged",
        }
    }
}

/// Counters of one copy, for the admin endpoint.
#[derive(Debug, Default)]
pub struct CopyCounters {
    bytes_shipped: AtomicU64,
    frames_rejected: AtomicU64,
    connects: AtomicU64,
}

/// A copy's status, as `GET /status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStatus {
    /// Its name.
    pub name: String,
    /// Its replication address.
    pub address: String,
    /// `sync` or `async`.
    pub mode: &'static str,
    /// `up_to_date`, `syncing`, `behind`, `stale` (not connected, recorded
    /// stale) or `disconnected` (not connected, and recording it stale
    /// failed: writes it misses get EIO).
    pub state: &'static str,
    /// Why the copy is not up to date: the last connection failure or the
    /// copy host's own report (a full store, say); `None` once it is up to
    /// date again.
    pub last_error: Option<String>,
    /// Bytes of regions whose bit is set in its slot.
    pub dirty_bytes: u64,
    /// Of `dirty_bytes`, what the copy may lack and a resync will send:
    /// all of it while the copy is not connected.
    pub resync_pending_bytes: u64,
    /// Of `dirty_bytes`, regions the copy has been sent that wait for the
    /// next bitmap clear (a flush on the copy and, at most every 5 s, on
    /// this host, after the region stayed quiet): not a divergence.
    pub clearing_bytes: u64,
    /// Bytes the current or last resync pass set out to send.
    pub resync_bytes_total: u64,
    /// Bytes of it sent so far.
    pub resync_bytes_done: u64,
    /// Write bytes queued or sent and not yet acknowledged.
    pub lag_bytes: u64,
    /// Payload bytes sent to it, writes and resync.
    pub bytes_shipped: u64,
    /// Frames from it that were refused (corrupt, out of order, forged).
    pub frames_rejected: u64,
    /// Connections established so far.
    pub connects: u64,
}

/// A frame waiting to be sent.
#[derive(Debug)]
struct Outgoing {
    kind: FrameKind,
    flags: FrameFlags,
    offset: u64,
    length: u32,
    payload: Option<Arc<Vec<u8>>>,
    ticket: Option<Arc<Ticket>>,
    /// Bytes counted in `lag_bytes` (writes) or `resync_bytes_outstanding`
    /// (resync data) until it is acknowledged.
    lag: u64,
    /// Resync data rather than an application write.
    resync: bool,
    /// A Flush's snapshot of touched regions.
    snapshot: Option<Snapshot>,
    /// The Flush that ends a resync pass: the pass's number.
    ends_resync: Option<u64>,
    /// A ChecksumRequest's waiting verifier.
    reply: Option<SyncSender<Vec<u8>>>,
    /// A resync checksum pass's request: the local chunk checksums.
    resync_check: Option<Vec<u8>>,
}

impl Outgoing {
    /// A frame of `kind` for `length` bytes at `offset`, with nothing else
    /// attached; the callers set what their kind carries.
    fn new(kind: FrameKind, offset: u64, length: u64) -> Outgoing {
        Outgoing {
            kind,
            flags: FrameFlags::NONE,
            offset,
            length: length as u32,
            payload: None,
            ticket: None,
            lag: 0,
            resync: false,
            snapshot: None,
            ends_resync: None,
            reply: None,
            resync_check: None,
        }
    }

    /// Resync data for `data.len()` bytes at `offset`.
    fn resync_data(offset: u64, data: Vec<u8>) -> Outgoing {
        let length = data.len() as u64;
        Outgoing {
            payload: Some(Arc::new(data)),
            lag: length,
            resync: true,
            ..Outgoing::new(FrameKind::ResyncData, offset, length)
        }
    }

    /// Resync of `length` bytes at `offset` that read as zeroes: no data,
    /// but counted in the resync window like data, so a long run of zeroes
    /// is not queued all at once.
    fn resync_zeroes(offset: u64, length: u64) -> Outgoing {
        Outgoing { lag: length, resync: true, ..Outgoing::new(FrameKind::ResyncZeroes, offset, length) }
    }
}

/// A frame sent and not yet acknowledged (its payload is gone with the send).
#[derive(Debug)]
struct Unacked {
    sequence: u64,
    sent_at: Instant,
    frame: Outgoing,
}

#[derive(Debug)]
struct Inner {
    state: CopyState,
    /// Bumped per connection, so a reader of an old connection changes nothing.
    connection: u64,
    queue: VecDeque<Outgoing>,
    unacked: VecDeque<Unacked>,
    lag_bytes: u64,
    resync_bytes_outstanding: u64,
    touched: HashSet<u64>,
    /// Regions of the last acknowledged Flush's snapshot: cleared at the
    /// next Flush's acknowledgement if no change touched them meanwhile, so
    /// a bit clears only after its region stayed quiet for a whole
    /// CLEAN_INTERVAL (a hot region keeps its bit and costs no msync).
    clear_candidates: Vec<u64>,
    /// When the local volume was last fsynced for clearing.
    last_local_sync: Instant,
    /// A queued Flush's acknowledgement may clear bits: the local volume is
    /// fsynced before the next batch goes out.
    local_sync_due: bool,
    /// Threads blocked on `wake` (the sender, writers held back): only
    /// then is it signalled, which spares a futex call per change.
    waiters: u32,
    /// The next region the resync pass looks at; `None` when no pass runs.
    resync_next: Option<u64>,
    /// Regions the copy may lack whole: dirty when the connection began, or
    /// touched by a change this copy did not get. Only sending the region
    /// whole (resync) takes one out; until then its bit never clears, even
    /// if later writes to part of it reach the copy. Keeps the pass's
    /// progress too.
    resync_pending: ResyncSet,
    /// Numbers the resync passes, so only the current pass's closing Flush
    /// can make the copy up to date.
    resync_pass: u64,
    /// Checksum-pass requests not answered yet; the pass ends after them.
    resync_checks_outstanding: u32,
    last_flush: Instant,
    /// The connection failed; the sender tears it down.
    broken: bool,
    /// Why the current connection ended: the first cause seen (the copy's
    /// Error frame, an ack timeout, a closed socket), so a later symptom of
    /// the same teardown does not replace it.
    ending: Option<String>,
    /// Why the copy is not up to date, for status; cleared when it is.
    last_error: Option<String>,
    /// The current connection cleared a bit or made the copy up to date:
    /// the next connection attempt need not back off.
    progress: bool,
    /// [`Shared::released`] when this link last queued a barrier frame.
    barrier_released: u64,
}

/// One copy's link.
#[derive(Debug)]
pub(crate) struct Link {
    config: CopyConfig,
    slot: u32,
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
    /// Signalled when the sender has work or the lag shrank.
    wake: Condvar,
    counters: CopyCounters,
}

impl Link {
    pub(crate) fn new(config: CopyConfig, slot: u32, shared: Arc<Shared>) -> Link {
        let resync_pending = ResyncSet::new(shared.volume.size(), shared.bitmap.region_bytes());
        let last_local_sync = Instant::now().checked_sub(shared.local_sync_interval).unwrap_or_else(Instant::now);
        Link {
            config,
            slot,
            shared,
            inner: Mutex::new(Inner {
                state: CopyState::Stale,
                connection: 0,
                queue: VecDeque::new(),
                unacked: VecDeque::new(),
                lag_bytes: 0,
                resync_bytes_outstanding: 0,
                touched: HashSet::new(),
                clear_candidates: Vec::new(),
                last_local_sync,
                local_sync_due: false,
                waiters: 0,
                resync_next: None,
                resync_pending,
                resync_pass: 0,
                resync_checks_outstanding: 0,
                last_flush: Instant::now(),
                broken: false,
                ending: None,
                last_error: None,
                progress: false,
                barrier_released: 0,
            }),
            wake: Condvar::new(),
            counters: CopyCounters::default(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait on `wake` for at most `timeout`, counted in `waiters`.
    fn wait<'a>(&self, mut inner: MutexGuard<'a, Inner>, timeout: Duration) -> MutexGuard<'a, Inner> {
        inner.waiters += 1;
        let mut inner = self.wake.wait_timeout(inner, timeout).unwrap_or_else(PoisonError::into_inner).0;
        inner.waiters -= 1;
        inner
    }

    /// Wake the waiters, if there are any.
    fn notify(&self, inner: &Inner) {
        if inner.waiters > 0 {
            self.wake.notify_all();
        }
    }

    pub(crate) fn wake_all(&self) {
        let _inner = self.lock();
        self.wake.notify_all();
    }

    pub(crate) fn status(&self) -> CopyStatus {
        let inner = self.lock();
        let dirty_bytes = self.shared.bitmap.dirty_bytes(self.slot);
        // A copy that is not connected gets every dirty region resynced
        // whole when it connects; a connected one only what is pending.
        let resync_pending_bytes = match inner.state {
            CopyState::Stale | CopyState::Unrecorded => dirty_bytes,
            _ => inner.resync_pending.bytes().min(dirty_bytes),
        };
        CopyStatus {
            name: self.config.name.clone(),
            address: self.config.address.to_string(),
            mode: self.config.mode.as_str(),
            state: if self.shared.local_failure().is_some() { CopyState::Diverged } else { inner.state }.as_str(),
            last_error: inner.last_error.clone(),
            dirty_bytes,
            resync_pending_bytes,
            clearing_bytes: dirty_bytes - resync_pending_bytes,
            resync_bytes_total: inner.resync_pending.bytes_total(),
            resync_bytes_done: inner.resync_pending.bytes_done(),
            lag_bytes: inner.lag_bytes,
            bytes_shipped: self.counters.bytes_shipped.load(Ordering::Relaxed),
            frames_rejected: self.counters.frames_rejected.load(Ordering::Relaxed),
            connects: self.counters.connects.load(Ordering::Relaxed),
        }
    }

    /// Queue a change for this copy, or drop it (the bitmap keeps its
    /// regions) when the copy cannot take it. A sync copy's ticket is held
    /// until the copy acknowledges or is recorded stale.
    /// `payload` is the write's data shared by every link; the first link
    /// that queues it makes the one copy (none is made when no copy takes it).
    pub(crate) fn ship(&self, change: &Change<'_>, payload: &mut Option<Arc<Vec<u8>>>, ticket: &Arc<Ticket>) {
        let mut inner = self.lock();
        let sync = self.config.mode == MirrorMode::Sync;
        // A sync copy that is far behind makes the writer wait (bounded memory).
        while sync
            && matches!(inner.state, CopyState::UpToDate | CopyState::Syncing)
            && inner.lag_bytes > SYNC_QUEUE_BYTES_MAX
            && !inner.broken
            && !self.shared.shutdown.load(Ordering::Relaxed)
        {
            inner = self.wait(inner, Duration::from_millis(100));
        }
        match inner.state {
            CopyState::UpToDate | CopyState::Syncing => {}
            // Diverged is only ever reported by status, never stored.
            CopyState::Behind | CopyState::Stale | CopyState::Diverged => {
                self.dropped(&mut inner, change.extent());
                return;
            }
            CopyState::Unrecorded => {
                // The copy missed writes and is not recorded stale yet.
                if self.shared.record(self.slot, RecordedState::Stale).is_ok() {
                    inner.state = CopyState::Stale;
                    tracing::info!(copy = %self.config.name, "copy {} is recorded stale now; writes it misses are \
                        acknowledged again and tracked in the bitmap", self.config.name);
                } else if sync {
                    // Invariant 3: a sync copy's missed write is not
                    // acknowledged until the copy is recorded stale.
                    ticket.fail();
                }
                self.dropped(&mut inner, change.extent());
                return;
            }
        }
        let lag = match change {
            Change::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        if self.config.mode == MirrorMode::Async
            && change.extent().is_some()
            && inner.lag_bytes + lag > self.config.lag_bytes_max
        {
            match self.shared.record(self.slot, RecordedState::Stale) {
                Ok(()) => tracing::warn!(
                    copy = %self.config.name,
                    lag_bytes = inner.lag_bytes,
                    lag_bytes_max = self.config.lag_bytes_max,
                    "copy {} is behind: more than lag_bytes_max unacknowledged; tracking its writes in the bitmap \
                     and resyncing it once it catches up",
                    self.config.name
                ),
                // An async copy that misses writes still holds a consistent
                // (older) image; resyncing it is what must be recorded first.
                Err(error) => tracing::error!(copy = %self.config.name, %error, "cannot record the copy stale"),
            }
            inner.state = CopyState::Behind;
            self.dropped(&mut inner, change.extent());
            return;
        }
        let (kind, mut flags, offset, length) = match *change {
            Change::Write { offset, data, fua } => (FrameKind::Write, fua_flag(fua), offset, data.len() as u64),
            Change::Trim { offset, length, fua } => (FrameKind::Trim, fua_flag(fua), offset, length),
            Change::WriteZeroes { offset, length, fua } => (FrameKind::WriteZeroes, fua_flag(fua), offset, length),
            Change::Flush => (FrameKind::Flush, FrameFlags::NONE, 0, 0),
        };
        if !sync {
            // An async copy's acknowledgement does not gate the client's: a
            // change released since this link's last barrier may have been
            // acknowledged before this one was issued, so this one must not
            // be applied before it (see the module docs of `replicator`).
            let released = self.shared.released.load(Ordering::SeqCst);
            if released != inner.barrier_released {
                inner.barrier_released = released;
                flags = flags | FrameFlags::BARRIER;
            }
        }
        if let Some((offset, len)) = change.extent() {
            for region in self.shared.regions(offset, len) {
                inner.touched.insert(region);
            }
        }
        let ticket = sync.then(|| {
            ticket.remaining.fetch_add(1, Ordering::AcqRel);
            ticket.clone()
        });
        let snapshot = (kind == FrameKind::Flush).then(|| take_snapshot(&mut inner, self.shared.local_sync_interval));
        inner.lag_bytes += lag;
        let payload = match change {
            Change::Write { data, .. } => Some(payload.get_or_insert_with(|| Arc::new(data.to_vec())).clone()),
            _ => None,
        };
        inner.queue.push_back(Outgoing {
            flags,
            payload,
            ticket,
            lag,
            snapshot,
            ..Outgoing::new(kind, offset, length)
        });
        self.notify(&inner);
    }

    /// The local store changed in a way no frame carries (a failed write
    /// may have written part of its data): resync the extent's regions,
    /// starting a pass now if the copy is connected.
    pub(crate) fn missed(&self, offset: u64, len: u64) {
        let mut inner = self.lock();
        self.dropped(&mut inner, Some((offset, len)));
        if !matches!(inner.state, CopyState::UpToDate | CopyState::Syncing) {
            return;
        }
        if let Err(error) = self.shared.record(self.slot, RecordedState::Syncing) {
            tracing::error!(copy = %self.config.name, %error, "cannot record the copy syncing; dropping the connection");
            inner.broken = true;
        } else {
            inner.state = CopyState::Syncing;
            if inner.resync_next.is_none() {
                self.start_resync_pass(&mut inner);
            } else {
                // The running pass may be past these regions: go round again.
                inner.resync_next = Some(0);
            }
        }
        self.notify(&inner);
    }

    /// A change this copy will not get: its regions need a resync whole,
    /// and until then their bits never clear.
    fn dropped(&self, inner: &mut Inner, extent: Option<(u64, u64)>) {
        if let Some((offset, len)) = extent {
            for region in self.shared.regions(offset, len) {
                inner.resync_pending.insert(region);
            }
        }
    }

    /// Online verify of one extent: the chunks whose checksums differ
    /// between the local store and the copy. Waits until no write to the
    /// extent is in flight, then, holding the link lock and the in-flight
    /// table (so no write to it can start or be shipped), reads it locally
    /// and queues the ChecksumRequest behind every change shipped so far.
    pub(crate) fn verify_extent(&self, offset: u64, length: u64) -> Result<Vec<(u64, u64)>, VerifyError> {
        let deadline = Instant::now() + VERIFY_WAIT_MAX;
        let failed = |message: String| VerifyError::Failed { copy: self.config.name.clone(), message };
        let (local, answer) = loop {
            let mut inner = self.lock();
            if inner.state != CopyState::UpToDate {
                return Err(VerifyError::NotUpToDate {
                    copy: self.config.name.clone(),
                    state: inner.state.as_str(),
                    last_error: inner.last_error.clone(),
                });
            }
            let inflight = self.shared.inflight();
            if self.shared.regions(offset, length).any(|region| inflight.contains_key(&region)) {
                drop(inflight);
                drop(inner);
                if Instant::now() > deadline {
                    return Err(failed(format!(
                        "writes to bytes {offset}..{} never paused for {} s; verify gave up, try again when the volume is \
                         less busy",
                        offset + length,
                        VERIFY_WAIT_MAX.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let data = self
                .shared
                .volume
                .read_synchronously(offset, length)
                .map_err(|error| failed(format!("reading bytes {offset}..{} locally: {error}", offset + length)))?;
            drop(inflight);
            let (sender, answer) = sync_channel(1);
            inner.queue.push_back(Outgoing {
                reply: Some(sender),
                ..Outgoing::new(FrameKind::ChecksumRequest, offset, length)
            });
            self.notify(&inner);
            break (crate::verify::chunk_checksums(&data), answer);
        };
        let remote = answer.recv_timeout(ACK_TIMEOUT * 2).map_err(|_| {
            failed(format!(
                "copy {} did not answer a checksum request within {} s (connection lost?); see its last_error in status",
                self.config.name,
                (ACK_TIMEOUT * 2).as_secs()
            ))
        })?;
        Ok(crate::verify::mismatches(offset, length, &local, &remote))
    }

    /// Resync the given byte ranges: mark them in this copy's slot, durably,
    /// record the copy `syncing`, and start a resync pass.
    pub(crate) fn repair(&self, ranges: &[(u64, u64)]) -> Result<(), String> {
        let mut inner = self.lock();
        self.shared
            .record(self.slot, RecordedState::Syncing)
            .map_err(|error| format!("cannot record copy {} syncing: {error}", self.config.name))?;
        for &(offset, length) in ranges {
            self.shared.bitmap.set_range(self.slot, offset, length);
            for region in self.shared.regions(offset, length) {
                inner.resync_pending.insert(region);
            }
        }
        self.shared.bitmap.flush().map_err(|error| format!("cannot mark the regions to repair: {error}"))?;
        if matches!(inner.state, CopyState::UpToDate | CopyState::Syncing) {
            inner.state = CopyState::Syncing;
            self.start_resync_pass(&mut inner);
        }
        tracing::warn!(copy = %self.config.name, regions = ranges.len(),
            "verify found {} mismatching chunks on copy {}; resyncing them", ranges.len(), self.config.name);
        self.notify(&inner);
        Ok(())
    }

    /// The link thread: connect, serve the connection, tear down, repeat.
    pub(crate) fn run(self: Arc<Self>) {
        // Halved once so that the first wait is BACKOFF_MIN.
        let mut backoff = BACKOFF_MIN / 2;
        let mut logged_error = String::new();
        while !self.shared.shutdown.load(Ordering::Relaxed) {
            let connected = CopyConnection::connect(
                self.config.address,
                &self.shared.secret,
                self.shared.identity,
                CONNECT_TIMEOUT,
                ACK_TIMEOUT,
            );
            let progress = match connected {
                Ok(connection) => {
                    logged_error.clear();
                    self.counters.connects.fetch_add(1, Ordering::Relaxed);
                    self.serve(connection)
                }
                Err(error) => {
                    let message = format!("cannot connect to copy {}: {error}", self.config.name);
                    // The same failure again and again is logged once.
                    if message != logged_error {
                        tracing::warn!(copy = %self.config.name, address = %self.config.address, %error,
                            "{message}; retrying with backoff ({} s at most between tries)", BACKOFF_MAX.as_secs());
                        logged_error.clone_from(&message);
                    }
                    self.set_last_error(&mut self.lock(), message);
                    false
                }
            };
            backoff = next_backoff(backoff, progress);
            self.sleep(backoff);
        }
        self.teardown("this host is shutting down");
    }

    /// Wait `duration`, or less if the replicator stops (other wake-ups,
    /// such as a write queued meanwhile, do not cut it short).
    fn sleep(&self, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut inner = self.lock();
        while !self.shared.shutdown.load(Ordering::Relaxed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            inner = self.wake.wait_timeout(inner, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn set_last_error(&self, inner: &mut Inner, mut message: String) {
        if message.len() > LAST_ERROR_BYTES_MAX {
            let mut end = LAST_ERROR_BYTES_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        inner.last_error = Some(message);
    }

    /// Serve one established connection until it ends; whether it made
    /// progress (a bit cleared, or the copy became up to date).
    fn serve(self: &Arc<Self>, mut connection: CopyConnection) -> bool {
        let generation = {
            let mut inner = self.lock();
            if let Err(error) = self.shared.record(self.slot, RecordedState::Syncing) {
                tracing::error!(copy = %self.config.name, %error, "cannot record the copy syncing; dropping the connection");
                self.set_last_error(&mut inner, format!("cannot record the copy syncing: {error}"));
                return false;
            }
            if let Err(error) = self.check_store(&connection) {
                tracing::error!(copy = %self.config.name, %error, "{error}; dropping the connection");
                self.set_last_error(&mut inner, error);
                return false;
            }
            inner.connection += 1;
            inner.state = CopyState::Syncing;
            inner.broken = false;
            inner.ending = None;
            inner.progress = false;
            // Everything dirty now may be missing on the copy: it goes whole.
            inner.resync_pending.clear_all();
            for region in self.shared.bitmap.dirty_regions(self.slot) {
                inner.resync_pending.insert(region);
            }
            if self.shared.assume_clean && inner.resync_pending.len() > 0 {
                self.assume_clean(&mut inner, &connection);
            }
            self.start_resync_pass(&mut inner);
            inner.connection
        };
        tracing::info!(
            copy = %self.config.name,
            address = %self.config.address,
            session = format_args!("{:#018x}", connection.session().id),
            dirty_bytes = self.shared.bitmap.dirty_bytes(self.slot),
            "connected to copy {}; resyncing its dirty regions",
            self.config.name
        );
        let reader = match connection.stream().try_clone() {
            Ok(stream) => {
                let link = self.clone();
                let session = connection.session().id;
                std::thread::Builder::new()
                    .name(format!("acks-{}", self.config.name))
                    .spawn(move || link.read_acks(stream, session, generation))
                    .ok()
            }
            Err(_) => None,
        };
        let ending = match reader {
            None => Some("cannot start the acknowledgement reader thread".to_string()),
            Some(_) => self.send_loop(&mut connection),
        };
        // The sender's cause is recorded before the socket is shut down, so
        // the reader's "closed" that follows does not replace it.
        if let Some(ending) = ending {
            self.lock().ending.get_or_insert(ending);
        }
        let _ = connection.stream().shutdown(Shutdown::Both);
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        let progress = self.lock().progress;
        self.teardown("the connection ended");
        progress
    }

    /// Invariant 9: a copy store that is not the one last synced here (its
    /// token differs: a fresh copy, a store replaced or swapped behind our
    /// back, lost copy metadata) may differ anywhere, whatever the bitmap
    /// says. Set its every bit, durably, before the new token is recorded;
    /// a crash between the two leaves the bits set and the old token, so
    /// the next connection does the same again.
    fn check_store(&self, connection: &CopyConnection) -> Result<(), String> {
        let offered = connection.copy_store();
        let recorded = self.shared.recorded_store(self.slot);
        if offered == recorded && offered != STORE_TOKEN_UNKNOWN {
            return Ok(());
        }
        if recorded != STORE_TOKEN_UNKNOWN {
            tracing::warn!(
                copy = %self.config.name,
                "copy {}'s store is not the one last synced (its store token changed: a new copy store, a store \
                 replaced or restored, or its metadata lost); it gets a full resync",
                self.config.name
            );
        }
        self.shared.bitmap.set_all(self.slot);
        self.shared
            .bitmap
            .flush()
            .map_err(|error| format!("cannot mark copy {} for a full resync: {error}", self.config.name))?;
        if offered == STORE_TOKEN_UNKNOWN {
            return Ok(());
        }
        self.shared
            .record_store(self.slot, offered)
            .map_err(|error| format!("cannot record copy {}'s store token: {error}", self.config.name))
    }

    /// `--assume-clean`: when both stores provably read as zeroes, the copy
    /// misses nothing and its dirty regions need no resync. Called under the
    /// link lock as the connection begins: a local write not visible to the
    /// check is still in flight, and it is shipped to this copy once the lock
    /// is released, like any write after the connection began.
    fn assume_clean(&self, inner: &mut Inner, connection: &CopyConnection) {
        let name = &self.config.name;
        let local_empty = match self.shared.volume.holds_no_data() {
            Ok(empty) => empty,
            Err(error) => {
                tracing::warn!(copy = %name, %error, "--assume-clean: cannot tell whether the volume holds data");
                false
            }
        };
        if !local_empty || !connection.copy_holds_no_data() {
            let which = if local_empty { "the copy's store" } else { "this volume" };
            tracing::warn!(
                copy = %name,
                "--assume-clean not taken for copy {name}: {which} holds data (or is a block device, which cannot be \
                 proven empty); resyncing its dirty regions"
            );
            return;
        }
        // A region with a write in flight keeps its bit and is resynced
        // whole: if this copy misses that write, a later crash of this host
        // must still find the bit (a region in flight is never cleared).
        let inflight = self.shared.inflight();
        let dirty: Vec<u64> = self.shared.bitmap.dirty_regions(self.slot).collect();
        let mut skipped = 0;
        for region in dirty {
            if !inflight.contains_key(&region) {
                self.shared.bitmap.clear(self.slot, region);
                inner.resync_pending.remove(region);
                skipped += self.shared.bitmap.region_bytes();
            }
        }
        drop(inflight);
        tracing::info!(
            copy = %name,
            skipped_bytes = skipped,
            "--assume-clean: this volume and copy {name}'s store both hold no data; no resync needed"
        );
    }

    fn start_resync_pass(&self, inner: &mut Inner) {
        inner.resync_pass += 1;
        inner.resync_next = Some(0);
        inner.resync_pending.start_pass();
    }

    /// Record the copy stale and release everything waiting on it. `why`
    /// is the cause when the connection left none (see [`Inner::ending`]).
    fn teardown(&self, why: &str) {
        let mut inner = self.lock();
        let waiting = inner.queue.len() + inner.unacked.len();
        let was = inner.state;
        let shutting_down = self.shared.shutdown.load(Ordering::Relaxed);
        let why = inner.ending.take().unwrap_or_else(|| why.to_string());
        let recorded = self.shared.record(self.slot, RecordedState::Stale);
        let result = if recorded.is_ok() { 0 } else { -libc::EIO };
        inner.state = if recorded.is_ok() { CopyState::Stale } else { CopyState::Unrecorded };
        for outgoing in std::mem::take(&mut inner.queue) {
            if let Some(ticket) = outgoing.ticket {
                ticket.release(result);
            }
        }
        for unacked in std::mem::take(&mut inner.unacked) {
            if let Some(ticket) = unacked.frame.ticket {
                ticket.release(result);
            }
        }
        inner.lag_bytes = 0;
        inner.resync_bytes_outstanding = 0;
        inner.resync_checks_outstanding = 0;
        inner.resync_next = None;
        inner.resync_pending.end_pass();
        inner.broken = false;
        inner.connection += 1;
        // The connection is gone with its unacknowledged flushes; the next
        // one resyncs every dirty region whole, so nothing prepared here clears.
        inner.touched.clear();
        inner.clear_candidates.clear();
        inner.local_sync_due = false;
        self.wake.notify_all();
        let name = &self.config.name;
        match &recorded {
            Err(error) => {
                self.set_last_error(&mut inner, format!("{why}; recording the copy stale failed: {error}"));
                tracing::error!(copy = %name, %error, waiting,
                    "copy {name} disconnected ({why}) and cannot be recorded stale: {error}; writes it misses get EIO \
                     until the record succeeds");
            }
            Ok(()) if was == CopyState::Stale => {}
            Ok(()) if shutting_down => tracing::info!(copy = %name, waiting,
                "copy {name} recorded stale at shutdown: this host stops shipping to it, and the next start resyncs \
                 the regions its bitmap marks"),
            Ok(()) => {
                self.set_last_error(&mut inner, why.clone());
                tracing::warn!(copy = %name, waiting, "copy {name} disconnected ({why}); recorded stale; \
                    its writes are tracked in the bitmap until it reconnects");
            }
        }
    }

    /// Send queued frames, resync data and periodic flushes until the
    /// connection breaks or the replicator stops. Returns why it stopped,
    /// unless the reader saw it first (`broken`) or this host stops.
    fn send_loop(&self, connection: &mut CopyConnection) -> Option<String> {
        let mut batch: Vec<(FrameHeader, Option<Arc<Vec<u8>>>)> = Vec::with_capacity(SEND_BATCH_FRAMES);
        let mut last_sent = Instant::now();
        let mut resync_started = Instant::now();
        let mut resync_sent: u64 = 0;
        loop {
            let local_sync = {
                let mut inner = self.lock();
                loop {
                    if inner.broken || self.shared.shutdown.load(Ordering::Relaxed) {
                        return None;
                    }
                    if !inner.queue.is_empty() {
                        break;
                    }
                    if inner.state == CopyState::Behind && inner.unacked.is_empty() {
                        // Resync data tears the copy's image: record it first.
                        match self.shared.record(self.slot, RecordedState::Syncing) {
                            Ok(()) => {
                                tracing::info!(copy = %self.config.name, "copy {} caught up with its queue; resyncing the writes it missed", self.config.name);
                                inner.state = CopyState::Syncing;
                                self.start_resync_pass(&mut inner);
                                resync_started = Instant::now();
                                resync_sent = 0;
                            }
                            Err(error) => {
                                tracing::error!(copy = %self.config.name, %error, "cannot record the copy syncing; dropping the connection");
                                return Some(format!("cannot record the copy syncing: {error}"));
                            }
                        }
                    }
                    if let Some(unacked) = inner.unacked.front() {
                        if unacked.sent_at.elapsed() > ACK_TIMEOUT {
                            return Some(format!(
                                "ack timeout: the copy host left a {:?} frame (sequence {}) unacknowledged for over {} s \
                                 (copy host hung, overloaded, or the link is down)",
                                unacked.frame.kind,
                                unacked.sequence,
                                ACK_TIMEOUT.as_secs()
                            ));
                        }
                    }
                    // Flush every CLEAN_INTERVAL, during a resync too, so bits
                    // clear as their regions become durable on the copy.
                    let flush_due = !(inner.touched.is_empty() && inner.clear_candidates.is_empty())
                        && inner.last_flush.elapsed() >= CLEAN_INTERVAL;
                    if flush_due {
                        self.queue_flush(&mut inner, false);
                        break;
                    }
                    if inner.resync_next.is_some()
                        && inner.lag_bytes + inner.resync_bytes_outstanding < self.resync_window()
                    {
                        let pause = self.resync_pause(resync_started, resync_sent);
                        if pause.is_zero() {
                            match self.queue_resync(&mut inner) {
                                Ok(Some(sent)) => {
                                    resync_sent += sent;
                                    continue;
                                }
                                Ok(None) => {
                                    inner = self.wait(inner, Duration::from_millis(10));
                                    continue;
                                }
                                Err(error) => {
                                    tracing::error!(copy = %self.config.name, %error, "resync cannot read the local volume; dropping the connection");
                                    return Some(format!("resync cannot read the local volume: {error}"));
                                }
                            }
                        }
                        inner = self.wait(inner, pause);
                        continue;
                    }
                    if last_sent.elapsed() >= HEARTBEAT_INTERVAL {
                        break;
                    }
                    inner = self.wait(inner, CLEAN_INTERVAL / 2);
                }
                let generation = self.shared.generation;
                let epoch = self.shared.epoch;
                if inner.queue.is_empty() {
                    // Nothing to send for a while: a heartbeat keeps the path checked.
                    let header = connection.header(FrameKind::Heartbeat, FrameFlags::NONE, generation, epoch);
                    batch.push((header, None));
                }
                while batch.len() < SEND_BATCH_FRAMES {
                    let Some(mut frame) = inner.queue.pop_front() else { break };
                    let mut header = connection.header(frame.kind, frame.flags, generation, epoch);
                    header.offset = frame.offset;
                    header.length = frame.length;
                    let payload = frame.payload.take();
                    header.payload_len = payload.as_ref().map_or(0, |payload| payload.len() as u32);
                    inner.unacked.push_back(Unacked { sequence: header.sequence, sent_at: Instant::now(), frame });
                    batch.push((header, payload));
                }
                std::mem::take(&mut inner.local_sync_due)
            };
            // A Flush whose acknowledgement can clear bits must not outrun
            // the production's own durability: the writes to the regions it
            // may clear completed before it was queued, so an fsync now makes
            // them durable here before the copy can even see the Flush.
            if local_sync {
                if let Err(error) = self.shared.volume.sync_all() {
                    tracing::error!(copy = %self.config.name, %error,
                        "cannot fsync the local volume before a flush; dropping the connection so no bit clears");
                    return Some(format!("cannot fsync the local volume before a flush: {error}"));
                }
            }
            let frames: Vec<(FrameHeader, &[u8])> = batch
                .iter()
                .map(|(header, payload)| (*header, payload.as_ref().map_or(&[][..], |payload| payload.as_slice())))
                .collect();
            let payload_bytes: u64 = frames.iter().map(|(_, payload)| payload.len() as u64).sum();
            let sent = connection.send_batch(&frames);
            drop(frames);
            batch.clear();
            if let Err(error) = sent {
                return Some(format!("sending to the copy host failed: {error}"));
            }
            self.counters.bytes_shipped.fetch_add(payload_bytes, Ordering::Relaxed);
            last_sent = Instant::now();
        }
    }

    /// Resync bytes in flight at most: an async copy's resync stays well
    /// inside its lag bound, so application writes never push it behind.
    fn resync_window(&self) -> u64 {
        match self.config.mode {
            MirrorMode::Sync => RESYNC_WINDOW_BYTES,
            MirrorMode::Async => RESYNC_WINDOW_BYTES.min(self.config.lag_bytes_max / 2).max(1),
        }
    }

    /// How long resync must wait to stay under `resync_rate_max`.
    fn resync_pause(&self, started: Instant, sent: u64) -> Duration {
        let rate = self.shared.resync_rate_max;
        if rate == 0 {
            return Duration::ZERO;
        }
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        due.saturating_sub(started.elapsed())
    }

    /// Queue the next dirty region's data (or, in a checksum pass, a
    /// checksum request for it), or the pass's closing Flush. Runs under the
    /// link lock, so no write to the region is shipped between the read (or
    /// the hole lookup) and the queueing. Returns the bytes queued, or
    /// `None` when the pass waits for checksum answers.
    fn queue_resync(&self, inner: &mut Inner) -> std::io::Result<Option<u64>> {
        let next = inner.resync_next.expect("a pass is running");
        let region_bytes = self.shared.bitmap.region_bytes();
        let region = inner.resync_pending.next_at_or_after(next);
        let Some(region) = region else {
            if inner.resync_checks_outstanding > 0 {
                // A checksum answer may still queue data; end the pass after it.
                return Ok(None);
            }
            inner.resync_next = None;
            self.queue_flush(inner, true);
            return Ok(Some(0));
        };
        // Adjacent dirty regions travel together, up to RESYNC_FRAME_BYTES.
        let regions_max = (RESYNC_FRAME_BYTES / region_bytes).max(1);
        let mut end = region + 1;
        while end < self.shared.bitmap.region_count()
            && end - region < regions_max
            && inner.resync_pending.contains(end)
        {
            end += 1;
        }
        let size = self.shared.volume.size();
        let offset = region * region_bytes;
        let length = (end * region_bytes).min(size) - offset;
        if self.shared.resync_checksums {
            let data = self.shared.volume.read_synchronously(offset, length)?;
            inner.resync_checks_outstanding += 1;
            inner.queue.push_back(Outgoing {
                lag: length,
                resync: true,
                resync_check: Some(crate::verify::chunk_checksums(&data)),
                ..Outgoing::new(FrameKind::ChecksumRequest, offset, length)
            });
        } else {
            for piece in self.resync_pieces(offset, length)? {
                inner.queue.push_back(match piece {
                    Piece::Zeroes { offset, length } => Outgoing::resync_zeroes(offset, length),
                    Piece::Data { offset, data } => Outgoing::resync_data(offset, data),
                });
            }
        }
        inner.resync_pending.take(region..end);
        inner.touched.extend(region..end);
        inner.resync_bytes_outstanding += length;
        inner.resync_next = Some(end);
        Ok(Some(length))
    }

    /// `length` bytes at `offset` of the local volume as resync pieces:
    /// holes (SEEK_HOLE on a regular file, not read at all) and 64 KiB
    /// chunks that read as zeroes become zero pieces, the rest data;
    /// neighbours of one kind are joined.
    fn resync_pieces(&self, offset: u64, length: u64) -> std::io::Result<Vec<Piece>> {
        let end = offset + length;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut position = offset;
        while position < end {
            let extents = self.shared.volume.block_status(position, (end - position) as u32, 64)?;
            assert!(!extents.is_empty(), "block status covers at least one byte of a non-empty range");
            for (extent_length, flags) in extents {
                let extent_length = u64::from(extent_length);
                if flags & BLOCK_STATUS_HOLE != 0 {
                    push_piece(&mut pieces, Piece::Zeroes { offset: position, length: extent_length });
                } else {
                    let data = self.shared.volume.read_synchronously(position, extent_length)?;
                    split_zero_chunks(&mut pieces, position, data);
                }
                position += extent_length;
            }
        }
        assert_eq!(position, end, "resync pieces cover exactly the range");
        Ok(pieces)
    }

    /// A checksum-pass answer: queue the chunks that differ, read now under
    /// the link lock, so they carry every write shipped before them.
    fn resync_differences(&self, inner: &mut Inner, offset: u64, length: u64, local: &[u8], remote: &[u8]) {
        inner.resync_checks_outstanding -= 1;
        for (start, len) in crate::verify::mismatches(offset, length, local, remote) {
            let data = match self.shared.volume.read_synchronously(start, len) {
                Ok(data) => data,
                Err(error) => {
                    tracing::error!(copy = %self.config.name, %error, "resync cannot read the local volume; dropping the connection");
                    inner.broken = true;
                    return;
                }
            };
            // Touched again: no Flush queued before this data may clear it.
            inner.touched.extend(self.shared.regions(start, len));
            inner.resync_bytes_outstanding += len;
            inner.queue.push_back(Outgoing::resync_data(start, data));
        }
    }

    fn queue_flush(&self, inner: &mut Inner, ends_resync: bool) {
        let snapshot = take_snapshot(inner, self.shared.local_sync_interval);
        // The pass's closing flush tells the copy its image is whole again,
        // unless a change it missed is still waiting for the next pass.
        let synced = ends_resync && inner.state == CopyState::Syncing && inner.resync_pending.len() == 0;
        inner.queue.push_back(Outgoing {
            flags: if synced { FrameFlags::SYNCED } else { FrameFlags::NONE },
            ends_resync: ends_resync.then_some(inner.resync_pass),
            snapshot: Some(snapshot),
            ..Outgoing::new(FrameKind::Flush, 0, 0)
        });
    }

    /// The reader thread: take acknowledgements in order until the stream
    /// ends or carries something wrong.
    fn read_acks(self: Arc<Self>, mut stream: TcpStream, session: u64, connection: u64) {
        let mut decoder = FrameDecoder::new();
        let mut buffer = vec![0u8; 64 << 10];
        let mut copy_failed = false;
        let why = loop {
            let frame = match decoder.pop() {
                Ok(Some(frame)) => frame,
                Ok(None) => match std::io::Read::read(&mut stream, &mut buffer) {
                    Ok(0) => break "the copy host closed the connection".to_string(),
                    Ok(received) => {
                        if let Err(error) = decoder.push(&buffer[..received]) {
                            break self.rejected(&error);
                        }
                        continue;
                    }
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(error) => break format!("reading acknowledgements failed: {error}"),
                },
                Err(error) => break self.rejected(&error),
            };
            if frame.header.kind == FrameKind::Error && frame.header.session == session {
                // The copy host says why it gives up, then closes.
                break match CopyFailure::from_frame(&frame) {
                    Ok(failure) => {
                        copy_failed = true;
                        format!("the copy host reported {failure}")
                    }
                    Err(error) => self.rejected(&error),
                };
            }
            if let Err(error) = self.on_ack(&frame.header, frame.payload, session, connection) {
                break self.rejected(&error);
            }
        };
        let mut inner = self.lock();
        if inner.connection == connection {
            // The first cause wins: the sender's (an ack timeout, say) when
            // it shut the socket down, which this reader then sees as closed.
            inner.ending.get_or_insert(why);
            // A copy host that could not apply a change (a full store) will
            // most likely fail the next connection too, whatever this one
            // cleared: back off rather than redial at once.
            if copy_failed {
                inner.progress = false;
            }
            inner.broken = true;
            self.wake.notify_all();
        }
        let _ = stream.shutdown(Shutdown::Both);
    }

    fn rejected(&self, error: &ReplicationError) -> String {
        let total = self.counters.frames_rejected.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(copy = %self.config.name, kind = ?error.kind(), frames_rejected = total,
            "refused a frame from copy {}: {error}", self.config.name);
        format!("refused a frame: {error}")
    }

    fn on_ack(
        &self,
        header: &FrameHeader,
        payload: Vec<u8>,
        session: u64,
        connection: u64,
    ) -> Result<(), ReplicationError> {
        if header.session != session {
            return Err(ReplicationError::WrongSession {
                kind: header.kind,
                received: header.session,
                expected: session,
            });
        }
        if header.kind == FrameKind::Heartbeat {
            return Ok(());
        }
        if !matches!(header.kind, FrameKind::WriteAck | FrameKind::FlushAck | FrameKind::ChecksumReply) {
            return Err(ReplicationError::Protocol {
                message: format!("a copy host sends only acknowledgements, not {:?} frames", header.kind),
            });
        }
        let mut inner = self.lock();
        if inner.connection != connection {
            return Ok(());
        }
        let Some(front) = inner.unacked.front() else {
            return Err(ReplicationError::Protocol {
                message: format!(
                    "{:?} for sequence {} acknowledges nothing that was sent",
                    header.kind, header.sequence
                ),
            });
        };
        let expected_kind = match front.frame.kind {
            FrameKind::Flush => FrameKind::FlushAck,
            FrameKind::ChecksumRequest => FrameKind::ChecksumReply,
            _ => FrameKind::WriteAck,
        };
        if front.sequence != header.sequence || header.kind != expected_kind {
            return Err(ReplicationError::Protocol {
                message: format!(
                    "{:?} for sequence {} arrived, but the oldest unacknowledged frame is {:?} sequence {}",
                    header.kind, header.sequence, front.frame.kind, front.sequence
                ),
            });
        }
        let acked = inner.unacked.pop_front().expect("front exists").frame;
        if acked.resync {
            inner.resync_bytes_outstanding -= acked.lag;
        } else {
            inner.lag_bytes -= acked.lag;
        }
        if let Some(ticket) = acked.ticket {
            ticket.release(0);
        }
        if let Some(local) = &acked.resync_check {
            self.resync_differences(&mut inner, acked.offset, u64::from(acked.length), local, &payload);
        }
        if let Some(reply) = acked.reply {
            // The verifier may have given up waiting; then nobody needs it.
            let _ = reply.try_send(payload);
        }
        // (Acknowledgements of an older connection never get here, and a
        // teardown forgets the candidates, so every snapshot is current.)
        if let Some(Snapshot { regions, clears }) = acked.snapshot {
            {
                // Every change to a candidate was shipped before the previous
                // Flush, which the copy has acknowledged. A candidate touched
                // since (this snapshot, `touched`), with a write in flight or
                // waiting for a resync pass stops being one; the others are
                // cleared if the local volume was fsynced for this Flush, or
                // stay candidates for the next one.
                let candidates = std::mem::take(&mut inner.clear_candidates);
                let mut quiet = Vec::new();
                if !candidates.is_empty() {
                    let recent: HashSet<u64> = regions.iter().copied().collect();
                    let inflight = self.shared.inflight();
                    for region in candidates {
                        if recent.contains(&region)
                            || inner.touched.contains(&region)
                            || inflight.contains_key(&region)
                            || inner.resync_pending.contains(region)
                        {
                            continue;
                        }
                        if clears {
                            self.shared.bitmap.clear(self.slot, region);
                            inner.progress = true;
                        } else {
                            quiet.push(region);
                        }
                    }
                }
                inner.clear_candidates = regions;
                inner.clear_candidates.extend(quiet);
            }
        }
        if acked.ends_resync == Some(inner.resync_pass)
            && inner.state == CopyState::Syncing
            && inner.resync_next.is_none()
        {
            let dirty = self.shared.bitmap.dirty_bytes(self.slot);
            match self.shared.record(self.slot, RecordedState::Current) {
                Ok(()) => {
                    inner.state = CopyState::UpToDate;
                    inner.progress = true;
                    inner.last_error = None;
                    tracing::info!(copy = %self.config.name, dirty_bytes = dirty,
                        resync_bytes = inner.resync_pending.bytes_done(),
                        "copy {} is up to date", self.config.name);
                }
                Err(error) => {
                    tracing::error!(copy = %self.config.name, %error, "cannot record the copy current; resyncing again");
                    self.start_resync_pass(&mut inner);
                }
            }
        }
        self.notify(&inner);
        Ok(())
    }
}

/// The NBD block-status flag of an extent that is a hole (reads as zeroes).
const BLOCK_STATUS_HOLE: u32 = 0b01;

/// A piece of a resync range: zeroes (sent without data) or data.
#[derive(Debug)]
enum Piece {
    Zeroes { offset: u64, length: u64 },
    Data { offset: u64, data: Vec<u8> },
}

/// Append `piece`, joined with the last one when both are zeroes and touch.
fn push_piece(pieces: &mut Vec<Piece>, piece: Piece) {
    if let (Some(Piece::Zeroes { offset, length }), Piece::Zeroes { offset: next, length: more }) =
        (pieces.last_mut(), &piece)
    {
        if *offset + *length == *next {
            *length += more;
            return;
        }
    }
    pieces.push(piece);
}

/// Whether `chunk` holds only zero bytes. Data is rejected at its first or
/// last byte in almost every case; a candidate is or-folded whole, which
/// compiles to wide vector instructions (an early-exit scan does not), so
/// resync spends about a memory read per zero chunk.
fn is_zero(chunk: &[u8]) -> bool {
    chunk.first().is_none_or(|byte| *byte == 0)
        && chunk.last().is_none_or(|byte| *byte == 0)
        && chunk.iter().fold(0u8, |all, byte| all | byte) == 0
}

/// Append `data` (read at `offset`) as pieces: each ZERO_CHUNK_BYTES chunk
/// (aligned to the volume) of zeroes a zero piece, each run of the other
/// chunks one data piece (the buffer itself when nothing in it is zero).
fn split_zero_chunks(pieces: &mut Vec<Piece>, offset: u64, data: Vec<u8>) {
    // (start, end, zero) runs of chunks, relative to `data`.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let absolute = offset + start as u64;
        let chunk_end = ((absolute / ZERO_CHUNK_BYTES + 1) * ZERO_CHUNK_BYTES - offset).min(data.len() as u64) as usize;
        let zero = is_zero(&data[start..chunk_end]);
        match runs.last_mut() {
            Some((_, end, kind)) if *kind == zero => *end = chunk_end,
            _ => runs.push((start, chunk_end, zero)),
        }
        start = chunk_end;
    }
    if let [(_, _, false)] = runs.as_slice() {
        pieces.push(Piece::Data { offset, data });
        return;
    }
    for (from, to, zero) in runs {
        let at = offset + from as u64;
        if zero {
            push_piece(pieces, Piece::Zeroes { offset: at, length: (to - from) as u64 });
        } else {
            pieces.push(Piece::Data { offset: at, data: data[from..to].to_vec() });
        }
    }
}

/// The wait before the next connection attempt: back to the shortest after
/// a connection that made progress, else twice the last, up to the longest.
fn next_backoff(last: Duration, progress: bool) -> Duration {
    if progress {
        BACKOFF_MIN
    } else {
        (last * 2).min(BACKOFF_MAX)
    }
}

fn fua_flag(fua: bool) -> FrameFlags {
    if fua {
        FrameFlags::FUA
    } else {
        FrameFlags::NONE
    }
}

/// A Flush's snapshot: the regions touched since the previous one.
#[derive(Debug)]
struct Snapshot {
    regions: Vec<u64>,
    /// The local volume is fsynced before this Flush is sent, so its
    /// acknowledgement may clear bits.
    clears: bool,
}

/// Take the regions touched since the last Flush as the next Flush's
/// snapshot. A copy's flush must not clear a bit whose region is not durable
/// on the production host either, so a Flush that may clear bits (a
/// candidate is not in the snapshot, or an earlier snapshot Flush is still
/// out and the candidates are not known yet) has the local volume fsynced
/// before it is sent — at most once per `local_sync_interval`; in between,
/// quiet candidates wait for the next Flush.
fn take_snapshot(inner: &mut Inner, local_sync_interval: Duration) -> Snapshot {
    inner.last_flush = Instant::now();
    let regions: Vec<u64> = inner.touched.drain().collect();
    // A snapshot Flush still queued or unacknowledged (it is derived, not
    // counted) leaves the candidates at this one's acknowledgement unknown.
    let earlier_out = inner
        .queue
        .iter()
        .chain(inner.unacked.iter().map(|unacked| &unacked.frame))
        .any(|frame| frame.snapshot.is_some());
    let might_clear = earlier_out || {
        let recent: HashSet<u64> = regions.iter().copied().collect();
        inner.clear_candidates.iter().any(|region| !recent.contains(region))
    };
    let clears = might_clear && inner.last_local_sync.elapsed() >= local_sync_interval;
    if clears {
        inner.local_sync_due = true;
        inner.last_local_sync = Instant::now();
    }
    Snapshot { regions, clears }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(pieces: &[Piece]) -> Vec<(&'static str, u64, u64)> {
        pieces
            .iter()
            .map(|piece| match piece {
                Piece::Zeroes { offset, length } => ("zeroes", *offset, *length),
                Piece::Data { offset, data } => ("data", *offset, data.len() as u64),
            })
            .collect()
    }

    /// Chunks of zeroes (aligned to the volume, not to the read) become zero
    /// pieces joined with a hole before them; data runs stay whole.
    #[test]
    fn zero_chunks_become_zero_pieces() {
        const CHUNK: u64 = ZERO_CHUNK_BYTES;
        let offset = CHUNK / 2; // a read that starts mid-chunk
        let mut data = vec![0u8; (4 * CHUNK) as usize];
        data[(CHUNK / 2 + 10) as usize] = 1; // in the volume's chunk 1
        data[(3 * CHUNK + CHUNK / 2) as usize] = 2; // in the volume's last, partial chunk 4
        let mut pieces = vec![Piece::Zeroes { offset: 0, length: offset }];
        split_zero_chunks(&mut pieces, offset, data);
        assert_eq!(
            shape(&pieces),
            [
                ("zeroes", 0, CHUNK),
                ("data", CHUNK, CHUNK),
                ("zeroes", 2 * CHUNK, 2 * CHUNK),
                ("data", 4 * CHUNK, CHUNK / 2)
            ]
        );
        let Piece::Data { data, .. } = &pieces[1] else { unreachable!() };
        assert_eq!(data[10], 1, "the data piece holds the bytes at its offset");
    }

    /// A read with no zero chunk is one data piece; one of zeroes one zero piece.
    #[test]
    fn whole_reads_stay_whole() {
        let mut pieces = Vec::new();
        split_zero_chunks(&mut pieces, 0, vec![7u8; 3 * ZERO_CHUNK_BYTES as usize]);
        split_zero_chunks(&mut pieces, 3 * ZERO_CHUNK_BYTES, vec![0u8; 2 * ZERO_CHUNK_BYTES as usize]);
        assert_eq!(
            shape(&pieces),
            [("data", 0, 3 * ZERO_CHUNK_BYTES), ("zeroes", 3 * ZERO_CHUNK_BYTES, 2 * ZERO_CHUNK_BYTES)]
        );
    }

    /// Backoff doubles to its cap after connections without progress and
    /// starts over after one with progress.
    #[test]
    fn backoff_doubles_to_the_cap_and_resets_on_progress() {
        let mut backoff = BACKOFF_MIN / 2;
        let mut waits = Vec::new();
        for _ in 0..10 {
            backoff = next_backoff(backoff, false);
            waits.push(backoff.as_millis());
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]);
        assert_eq!(next_backoff(backoff, true), BACKOFF_MIN);
    }
}
