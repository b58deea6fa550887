//! One copy's link, the imperative shell around [`LinkCore`]: a thread that
//! connects (with backoff), authenticates and sends what the core says (a
//! writer whose change finds an up-to-date sync link idle sends it itself
//! on the same socket, see [`LinkCore::take_inline`]); a reader thread per
//! connection that feeds the copy's acknowledgements to the core. The shell
//! owns the threads, the socket, the mutex around the core and the clock;
//! it carries out the core's commands (record the
//! mirror state, release held writes, clear bits, read the local volume,
//! fsync it, send frames) in order, and passes back what came of them. Every
//! decision — the send queue, the rule for clearing bitmap bits, the resync
//! bookkeeping, when a copy is stale, syncing or up to date — is the core's
//! (`link_core.rs`, whose docs have the rules and the bugs they guard against).
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
//! copy's Error frame starts over from BACKOFF_MIN. Without it a copy host
//! that failed every connection at once was redialled ~27 times a second and
//! sent the same resync data each time. Why the last connection failed is
//! kept as the copy's `last_error` for status until it is up to date again.
//!
//! Still done under the link mutex, as before the split: recording the
//! mirror state (a durable file replace) and the synchronous reads of resync
//! and verify — a resync read must not let a write be shipped between the
//! read and the queueing (see the module docs of `replicator`).

use std::collections::{HashMap, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::buffer::SharedBytes;
use crate::protocol::compress::CompressionCounters;
use crate::protocol::copy_failure::CopyFailure;
use crate::protocol::frame::{Frame, FrameFlags, FrameHeader, FrameKind};
use crate::protocol::Compression;
use crate::protocol::{FrameDecoder, ReplicationError};
use crate::replicator::connect::CopyConnection;
use crate::replicator::link_core::{Command, CoreConfig, LinkCore, Outgoing, ResyncRead, ResyncReadDone};
pub use crate::replicator::link_core::{CopyState, RecoveryPoint, ACK_TIMEOUT};
use crate::replicator::resync_pieces::read_pieces;
use crate::replicator::{Change, CopyConfig, MirrorMode, Shared, Ticket, VerifyError};

/// How long a connection attempt (connect and handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and last wait between connection attempts: doubled after each
/// connection that failed or made no progress, back to the first after one
/// that made progress.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// At most how often the local volume is fsynced so that bits can clear
/// (under a sustained random load some region always goes quiet), unless
/// the configuration says otherwise.
pub const LOCAL_SYNC_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// How long verify waits for writes to an extent to pause.
const VERIFY_WAIT_MAX: Duration = Duration::from_secs(10);
/// How long a writer held back by a full sync queue waits before it looks again.
const HELD_BACK_WAIT: Duration = Duration::from_millis(100);
/// How long a status request waits for a link busy recording its state.
const STATUS_WAIT_MAX: Duration = Duration::from_millis(200);

/// Counters of one copy, for the admin endpoint.
#[derive(Debug, Default)]
pub struct CopyCounters {
    bytes_shipped: AtomicU64,
    frames_rejected: AtomicU64,
    connects: AtomicU64,
    compression: CompressionCounters,
}

/// A copy's status, as `GET /status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CopyStatus {
    /// Its name.
    pub name: String,
    /// Its replication address.
    pub address: String,
    /// Sync or async (`MirrorMode::as_str` in status output).
    pub mode: MirrorMode,
    /// Up to date, syncing, behind, stale (not connected, recorded stale),
    /// disconnected (not connected, and recording it stale failed: writes it
    /// misses get EIO) or diverged (`CopyState::as_str` in status output).
    pub state: CopyState,
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
    /// next bitmap clear (a flush on the copy, after the region stayed
    /// quiet, and at most every 5 s a sync on this host, unless the
    /// activity log holds the whole volume): not a divergence.
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
    /// What the copy lacks of the writes clients were answered for: the
    /// recovery point if this host were lost now.
    pub recovery_point: RecoveryPoint,
    /// The link's compression setting and what it did (payload bytes in,
    /// bytes sent for them, nanoseconds spent compressing).
    pub compression: CompressionStatus,
}

/// What compression did on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompressionStatus {
    /// The setting.
    pub setting: Compression,
    /// Whether the copy host connected last said it decompresses (else
    /// nothing is compressed).
    pub active: bool,
    /// Payload bytes offered to compression.
    pub bytes_in: u64,
    /// Bytes sent for them.
    pub bytes_out: u64,
    /// Nanoseconds spent compressing.
    pub nanos: u64,
}

/// The core as this shell instantiates it: a sync write's hold is its
/// ticket, a verifier waits on a channel.
type Core = LinkCore<Arc<Ticket>, SyncSender<Vec<u8>>>;
type LinkCommand = Command<Arc<Ticket>, SyncSender<Vec<u8>>>;
/// The in-flight table, locked while a clearing decision is carried out.
type InFlightGuard<'a> = Option<MutexGuard<'a, HashMap<u64, u32>>>;

/// What the mutex guards: the core and who waits on `wake`.
#[derive(Debug)]
struct Locked {
    core: Core,
    /// Threads blocked on `wake` (the sender, writers held back): only
    /// then is it signalled, which spares a futex call per change.
    waiters: u32,
    /// The sender took a batch it may not have written yet: no writer
    /// takes one of its own until the sender asks the core again.
    sender_busy: bool,
}

/// What the sender does after carrying out a list of commands.
#[derive(Debug)]
enum Next {
    /// Ask the core again.
    Poll,
    Wait(Duration),
    Send(Vec<Outgoing>),
    Close(String),
    /// Whether a repair started.
    Repair(Result<(), String>),
}

/// One copy's link.
#[derive(Debug)]
pub(crate) struct Link {
    config: CopyConfig,
    slot: u32,
    shared: Arc<Shared>,
    inner: Mutex<Locked>,
    /// Signalled when the sender has work, or acknowledgements concern a
    /// waiter ([`LinkCore::acks_concern_waiters`]: the lag shrank for a
    /// writer held back, the stop's final Flush, …).
    wake: Condvar,
    counters: CopyCounters,
    /// The core's time zero: it gets milliseconds since.
    started: Instant,
    /// Where the copy host is now (the group layer moves it), and the
    /// connection to it while there is one, so that a move closes it.
    address: Mutex<Target>,
    /// The last status shown, for when the link is too busy to ask.
    last_status: Mutex<CopyStatus>,
    /// The copy host connected last decompresses (its Accept said so).
    compressing: std::sync::atomic::AtomicBool,
    /// The connection frames are sent on, while one is served, locked by
    /// whoever writes a batch. Batches leave in the order the core numbered
    /// them: a writer takes one (under the link mutex) only while it holds
    /// this lock and the sender holds no batch (`sender_busy`), and keeps
    /// this lock until its batch is written; the sender waits for it before
    /// writing its own.
    outbound: Mutex<Option<CopyConnection>>,
}

/// Where a link connects, and the stream it has there.
#[derive(Debug, Default)]
struct Target {
    address: Option<SocketAddr>,
    /// Bumped on every move: a sleeping link tries the new address at once.
    moves: u64,
    stream: Option<TcpStream>,
}

impl Link {
    pub(crate) fn new(config: CopyConfig, slot: u32, shared: Arc<Shared>) -> Link {
        let core = LinkCore::new(CoreConfig {
            name: config.name.clone(),
            mode: config.mode,
            lag_bytes_max: config.lag_bytes_max,
            lag_ms_max: config.lag_ms_max,
            region_bytes: shared.bitmap.region_bytes(),
            volume_bytes: shared.volume.size(),
            local_sync_interval_ms: u64::try_from(shared.local_sync_interval.as_millis()).unwrap_or(u64::MAX),
            resync_rate_max: shared.resync_rate_max,
            resync_checksums: shared.resync_checksums,
            local_sync: shared.local_sync.clone(),
            bitmap: Some(shared.bitmap.clone()),
        });
        let target = Target { address: config.address, moves: 0, stream: None };
        Link {
            config,
            slot,
            shared,
            inner: Mutex::new(Locked { core, waiters: 0, sender_busy: false }),
            wake: Condvar::new(),
            counters: CopyCounters::default(),
            started: Instant::now(),
            address: Mutex::new(target),
            last_status: Mutex::new(CopyStatus::default()),
            compressing: std::sync::atomic::AtomicBool::new(false),
            outbound: Mutex::new(None),
        }
    }

    fn target(&self) -> MutexGuard<'_, Target> {
        self.address.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The copy host's address now.
    fn current_address(&self) -> Option<SocketAddr> {
        self.target().address
    }

    /// Move the link to `address`: the connection to the old one is shut
    /// down (the sender and reader see it end), and a sleeping link wakes.
    pub(crate) fn set_address(&self, address: Option<SocketAddr>) {
        let mut target = self.target();
        if target.address == address {
            return;
        }
        tracing::info!(copy = %self.config.name, from = ?target.address, to = ?address,
            "copy {} moves to {}", self.config.name, address.map_or("no host".to_string(), |a| a.to_string()));
        target.address = address;
        target.moves += 1;
        if let Some(stream) = target.stream.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        drop(target);
        self.wake_all();
    }

    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }

    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The time for the core: milliseconds since the link began.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Wait on `wake` for at most `timeout`, counted in `waiters`.
    fn wait<'a>(&self, mut locked: MutexGuard<'a, Locked>, timeout: Duration) -> MutexGuard<'a, Locked> {
        locked.waiters += 1;
        let mut locked = self.wake.wait_timeout(locked, timeout).unwrap_or_else(PoisonError::into_inner).0;
        locked.waiters -= 1;
        locked
    }

    /// Wake the waiters, if there are any.
    fn notify(&self, locked: &Locked) {
        if locked.waiters > 0 {
            self.wake.notify_all();
        }
    }

    /// The production role stops (its frontend stopped first): flush the
    /// copy, if it follows every write, and wait until `deadline` for the
    /// acknowledgement, so that a stop leaves the copy's record current only
    /// when every acknowledged write is durable there.
    pub(crate) fn flush_for_stop(&self, deadline: Instant) {
        let mut locked = self.lock();
        if !locked.core.queue_final_flush() {
            return;
        }
        self.wake.notify_all();
        while !locked.core.flushed_for_stop() && locked.core.state() == CopyState::UpToDate {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(copy = %self.config.name,
                    "copy {} did not acknowledge the stop's flush in time: it is recorded stale", self.config.name);
                return;
            }
            locked = self.wait(locked, left.min(Duration::from_millis(10)));
        }
    }

    pub(crate) fn wake_all(&self) {
        let _locked = self.lock();
        self.wake.notify_all();
    }

    /// The copy's status. While the link is busy recording its state (the
    /// quorum may be unreachable: the record waits for it), the last status
    /// is shown with that said, rather than the caller waiting too.
    pub(crate) fn status(&self) -> CopyStatus {
        let deadline = Instant::now() + STATUS_WAIT_MAX;
        let locked = loop {
            match self.inner.try_lock() {
                Ok(locked) => break locked,
                Err(std::sync::TryLockError::Poisoned(poisoned)) => break poisoned.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    let mut status = self.last_status.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    status.last_error = Some("busy recording its state on the mirror-state store".to_string());
                    return status;
                }
            }
        };
        let status = self.status_locked(&locked);
        *self.last_status.lock().unwrap_or_else(PoisonError::into_inner) = status.clone();
        status
    }

    fn status_locked(&self, locked: &Locked) -> CopyStatus {
        let core = &locked.core;
        let dirty_bytes = self.shared.bitmap.dirty_bytes(self.slot);
        // A copy that is not connected gets every dirty region resynced
        // whole when it connects; a connected one only what is pending (the
        // parts of a region missed in parts). Clearing: the dirty regions
        // not pending at all.
        let (resync_pending_bytes, pending_region_bytes) = match core.state() {
            CopyState::Stale | CopyState::Unrecorded => (dirty_bytes, dirty_bytes),
            _ => {
                (core.resync_pending().bytes().min(dirty_bytes), core.resync_pending().region_bytes().min(dirty_bytes))
            }
        };
        CopyStatus {
            name: self.config.name.clone(),
            address: self.current_address().map_or_else(|| "(no host)".to_string(), |address| address.to_string()),
            mode: self.config.mode,
            state: if self.shared.local_failure().is_some() { CopyState::Diverged } else { core.state() },
            last_error: core.last_error().cloned(),
            dirty_bytes,
            resync_pending_bytes,
            clearing_bytes: dirty_bytes - pending_region_bytes,
            resync_bytes_total: core.resync_pending().bytes_total(),
            resync_bytes_done: core.resync_pending().bytes_done(),
            lag_bytes: core.lag_bytes(),
            bytes_shipped: self.counters.bytes_shipped.load(Ordering::Relaxed),
            frames_rejected: self.counters.frames_rejected.load(Ordering::Relaxed),
            connects: self.counters.connects.load(Ordering::Relaxed),
            recovery_point: core.recovery_point(self.now_ms(), dirty_bytes),
            compression: CompressionStatus {
                setting: self.config.compress,
                active: self.compressing.load(Ordering::Relaxed),
                bytes_in: self.counters.compression.bytes_in.load(Ordering::Relaxed),
                bytes_out: self.counters.compression.bytes_out.load(Ordering::Relaxed),
                nanos: self.counters.compression.nanos.load(Ordering::Relaxed),
            },
        }
    }

    /// Carry out `commands` in order, feeding the outcome of a persist or a
    /// read back to the core (whose follow-up commands come next). `in_flight`
    /// is the in-flight table the core's clearing decision read, if it was
    /// locked for it: it stays locked while the ClearBits the core puts
    /// first is carried out, so a write that begins meanwhile sets its bit
    /// after the clear, never before it; it is unlocked before anything
    /// after (a release, a persist).
    /// Returns what the sender does next.
    fn execute(&self, locked: &mut Locked, commands: Vec<LinkCommand>, in_flight: &mut InFlightGuard<'_>) -> Next {
        let mut work = VecDeque::from(commands);
        let mut next = Next::Poll;
        while let Some(command) = work.pop_front() {
            if !matches!(command, Command::ClearBits(_)) {
                in_flight.take();
            }
            let follow_up = match command {
                Command::Persist(state) => {
                    let reason = locked.core.last_error().cloned();
                    let result = self.shared.record(self.slot, state, reason).map_err(|error| error.to_string());
                    locked.core.persisted(result)
                }
                Command::PersistStoreToken(token) => {
                    let result = self.shared.record_store(self.slot, token).map_err(|error| error.to_string());
                    locked.core.persisted(result)
                }
                Command::SetBits(ranges) => {
                    for (offset, length) in ranges {
                        self.shared.bitmap.set_range(self.slot, offset, length);
                    }
                    continue;
                }
                Command::RepairStarted(started) => {
                    next = Next::Repair(started);
                    continue;
                }
                Command::SetAllBits => {
                    self.shared.bitmap.set_all(self.slot);
                    continue;
                }
                Command::SyncBitmap => {
                    let result = self.shared.bitmap.flush().map_err(|error| error.to_string());
                    locked.core.bitmap_synced(result)
                }
                Command::Release { holds, result } => {
                    for hold in holds {
                        hold.release(result);
                    }
                    continue;
                }
                Command::ClearBits(regions) => {
                    for region in regions {
                        self.shared.bitmap.clear(self.slot, region);
                    }
                    continue;
                }
                Command::ReadForResync { offset, length, read } => {
                    let result = self.read_for_resync(offset, length, read).map_err(|error| error.to_string());
                    locked.core.resync_read(offset, length, result)
                }
                Command::AnswerVerify { reply, checksums } => {
                    // The verifier may have given up waiting; then nobody needs it.
                    let _ = reply.try_send(checksums);
                    continue;
                }
                Command::Wait { ms } => {
                    next = Next::Wait(Duration::from_millis(ms));
                    continue;
                }
                Command::Send { frames } => {
                    next = Next::Send(frames);
                    continue;
                }
                Command::Close { why } => {
                    next = Next::Close(why);
                    continue;
                }
            };
            for command in follow_up.into_iter().rev() {
                work.push_front(command);
            }
        }
        in_flight.take();
        next
    }

    /// Read a resync range as the core asked, under the link lock.
    fn read_for_resync(&self, offset: u64, length: u64, read: ResyncRead) -> std::io::Result<ResyncReadDone> {
        Ok(match read {
            ResyncRead::Pieces => ResyncReadDone::Pieces(read_pieces(&self.shared.volume, offset, length)?),
            ResyncRead::Checksums => ResyncReadDone::Checksums(crate::verify::chunk_checksums(
                &self.shared.volume.read_synchronously(offset, length)?,
            )),
            ResyncRead::Data => ResyncReadDone::Data(self.shared.volume.read_synchronously(offset, length)?),
        })
    }

    /// Queue a change for this copy, or drop it (the bitmap keeps its
    /// regions) when the copy cannot take it. A sync copy's ticket is held
    /// until the copy acknowledges or is recorded stale.
    /// `payload` is the write's data shared by every link; the first link
    /// that queues it makes the one copy (none is made when no copy takes it).
    pub(crate) fn ship(&self, change: &Change<'_>, payload: &mut Option<SharedBytes>, ticket: &Arc<Ticket>) {
        let mut locked = self.lock();
        // A sync copy that is far behind makes the writer wait (bounded memory).
        while locked.core.holds_back_writers() && !self.shared.shutdown.load(Ordering::Relaxed) {
            locked = self.wait(locked, HELD_BACK_WAIT);
        }
        let hold = (self.config.mode == MirrorMode::Sync).then(|| {
            ticket.remaining.fetch_add(1, Ordering::AcqRel);
            ticket.clone()
        });
        let released = self.shared.released.load(Ordering::SeqCst);
        let now_ms = self.now_ms();
        let commands = locked.core.ship(change, payload, hold, released, now_ms);
        self.execute(&mut locked, commands, &mut None);
        if let Some(locked) = self.send_inline(locked, now_ms) {
            if locked.core.sender_needed(now_ms) {
                self.notify(&locked);
            }
        }
    }

    /// Send what is queued from this writer's thread when nobody else is
    /// sending and the core allows it (an up-to-date sync copy with nothing
    /// unacknowledged: see [`LinkCore::take_inline`]), sparing the sender's
    /// wake-up. `None` when this thread sent what was queued; else the
    /// lock, for the sender to be woken.
    fn send_inline<'a>(&'a self, mut locked: MutexGuard<'a, Locked>, now_ms: u64) -> Option<MutexGuard<'a, Locked>> {
        // Compressing stays on the sender's thread, off the writer's.
        if locked.sender_busy || self.compressing.load(Ordering::Relaxed) {
            return Some(locked);
        }
        let Ok(mut outbound) = self.outbound.try_lock() else { return Some(locked) };
        let Some(connection) = outbound.as_mut() else { return Some(locked) };
        let Some(frames) = locked.core.take_inline(now_ms) else { return Some(locked) };
        if locked.core.has_queued() {
            // More than one batch was queued: the sender takes the rest,
            // and waits for this batch to be written before it sends.
            self.notify(&locked);
        }
        drop(locked);
        if let Err(error) = self.send_frames(connection, &frames) {
            let why = format!("sending to the copy host failed: {error}");
            let _ = connection.stream().shutdown(Shutdown::Both);
            drop(outbound);
            let mut locked = self.lock();
            locked.core.connection_failed(why);
            self.notify(&locked);
        }
        None
    }

    /// The local store changed in a way no frame carries (a failed write
    /// may have written part of its data): resync the extent's regions,
    /// starting a pass now if the copy is connected.
    pub(crate) fn missed(&self, offset: u64, len: u64) {
        let mut locked = self.lock();
        let commands = locked.core.missed(offset, len);
        self.execute(&mut locked, commands, &mut None);
        self.notify(&locked);
    }

    /// Online verify of one extent: the chunks whose checksums differ
    /// between the local store and the copy. Waits until no write to the
    /// extent is in flight, then, holding the link lock and the in-flight
    /// table (so no write to it can start or be shipped), reads it locally
    /// and queues the ChecksumRequest behind every change shipped so far.
    pub(crate) fn verify_extent(&self, offset: u64, length: u64) -> Result<Vec<(u64, u64)>, VerifyError> {
        let deadline = Instant::now() + VERIFY_WAIT_MAX;
        let (local, answer) = loop {
            let mut locked = self.lock();
            let state = locked.core.state();
            if state != CopyState::UpToDate {
                return Err(VerifyError::NotUpToDate {
                    copy: self.config.name.clone(),
                    state: state.as_str(),
                    last_error: locked.core.last_error().cloned(),
                });
            }
            let inflight = self.shared.inflight();
            if self.shared.regions(offset, length).any(|region| inflight.contains_key(&region)) {
                drop(inflight);
                drop(locked);
                if Instant::now() > deadline {
                    return Err(VerifyError::Busy {
                        copy: self.config.name.clone(),
                        message: format!(
                            "writes to bytes {offset}..{} never paused for {} s; verify gave up, try again when the \
                             volume is less busy",
                            offset + length,
                            VERIFY_WAIT_MAX.as_secs()
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let data = self.shared.volume.read_synchronously(offset, length).map_err(|error| VerifyError::Io {
                copy: self.config.name.clone(),
                message: format!("reading bytes {offset}..{} locally: {error}", offset + length),
            })?;
            drop(inflight);
            let (sender, answer) = sync_channel(1);
            locked.core.queue_checksum_request(offset, length, sender);
            self.notify(&locked);
            break (crate::verify::chunk_checksums(&data), answer);
        };
        let remote = answer.recv_timeout(ACK_TIMEOUT * 2).map_err(|_| VerifyError::CopyLost {
            copy: self.config.name.clone(),
            message: format!(
                "copy {} did not answer a checksum request within {} s (connection lost?); see its last_error in status",
                self.config.name,
                (ACK_TIMEOUT * 2).as_secs()
            ),
        })?;
        Ok(crate::verify::mismatches(offset, length, &local, &remote))
    }

    /// Resync the given byte ranges: mark them in this copy's slot, durably,
    /// record the copy `syncing`, and start a resync pass.
    pub(crate) fn repair(&self, ranges: &[(u64, u64)]) -> Result<(), String> {
        let mut locked = self.lock();
        let commands = locked.core.repair(ranges.to_vec());
        let next = self.execute(&mut locked, commands, &mut None);
        self.notify(&locked);
        match next {
            Next::Repair(started) => started,
            other => unreachable!("a repair ends with whether it started, not {other:?}"),
        }
    }

    /// The link thread: connect, serve the connection, tear down, repeat.
    pub(crate) fn run(self: Arc<Self>) {
        // Halved once so that the first wait is BACKOFF_MIN.
        let mut backoff = BACKOFF_MIN / 2;
        let mut logged_error = String::new();
        while !self.shared.shutdown.load(Ordering::Relaxed) {
            let (address, moves) = {
                let target = self.target();
                (target.address, target.moves)
            };
            let progress = match address {
                None => {
                    let message =
                        format!("copy {} has no host: its site has no live member with access", self.config.name);
                    if message != logged_error {
                        tracing::warn!(copy = %self.config.name, "{message}; its writes are tracked in the bitmap");
                        logged_error.clone_from(&message);
                    }
                    self.lock().core.set_last_error(message);
                    false
                }
                Some(address) => self.connect_and_serve(address, moves, &mut logged_error),
            };
            backoff = next_backoff(backoff, progress);
            self.sleep(backoff, moves);
        }
        self.teardown("this host is shutting down");
    }

    /// One connection attempt to `address` (the target's `moves`-th), served
    /// until it ends; whether it made progress.
    fn connect_and_serve(self: &Arc<Self>, address: SocketAddr, moves: u64, logged_error: &mut String) -> bool {
        let connected = CopyConnection::connect_from(
            address,
            self.shared.source_address,
            self.shared.epoch,
            &self.shared.secret,
            self.shared.identity,
            CONNECT_TIMEOUT,
            ACK_TIMEOUT,
        );
        match connected {
            Ok(connection) => {
                {
                    let mut target = self.target();
                    if target.moves != moves {
                        // Moved while connecting: this host is no longer the copy's.
                        return false;
                    }
                    target.stream = connection.stream().try_clone().ok();
                }
                logged_error.clear();
                self.counters.connects.fetch_add(1, Ordering::Relaxed);
                let progress = self.serve(connection);
                self.target().stream = None;
                progress
            }
            Err(error) => {
                let message = format!("cannot connect to copy {}: {error}", self.config.name);
                if matches!(error, ReplicationError::Deposed { .. }) && self.shared.deposed.set(message.clone()).is_ok()
                {
                    tracing::error!(copy = %self.config.name, "{message}: this host must stop serving now");
                }
                // The same failure again and again is logged once.
                if message != *logged_error {
                    tracing::warn!(copy = %self.config.name, %address, %error,
                        "{message}; retrying with backoff ({} s at most between tries)", BACKOFF_MAX.as_secs());
                    logged_error.clone_from(&message);
                }
                self.lock().core.set_last_error(message);
                false
            }
        }
    }

    /// Wait `duration`, or less if the replicator stops or the copy moves
    /// away from the `moves`-th target (other wake-ups, such as a write
    /// queued meanwhile, do not cut it short).
    fn sleep(&self, duration: Duration, moves: u64) {
        let deadline = Instant::now() + duration;
        let mut locked = self.lock();
        while !self.shared.shutdown.load(Ordering::Relaxed) && self.target().moves == moves {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            locked = self.wake.wait_timeout(locked, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Serve one established connection until it ends; whether it made
    /// progress (a bit cleared, or the copy became up to date).
    fn serve(self: &Arc<Self>, mut connection: CopyConnection) -> bool {
        let Some(generation) = self.begin(&connection) else { return false };
        tracing::info!(
            copy = %self.config.name,
            address = ?self.current_address(),
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
            Some(_) => {
                *self.outbound.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection);
                let ending = self.send_loop();
                match self.outbound.lock().unwrap_or_else(PoisonError::into_inner).take() {
                    Some(sent_on) => connection = sent_on,
                    None => unreachable!("only the sender takes the connection out"),
                }
                ending
            }
        };
        // The sender's cause is recorded before the socket is shut down, so
        // the reader's "closed" that follows does not replace it.
        if let Some(ending) = ending {
            self.lock().core.connection_failed(ending);
        }
        let _ = connection.stream().shutdown(Shutdown::Both);
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        let progress = self.lock().core.progress();
        self.teardown("the connection ended");
        progress
    }

    /// Begin serving `connection`: record the copy syncing, check its store
    /// (invariant 9: the core's commands), and hand the dirty regions to the
    /// core. The
    /// connection's number in the core, or `None` when it cannot be served.
    fn begin(&self, connection: &CopyConnection) -> Option<u64> {
        self.compressing
            .store(connection.copy_decompresses() && self.config.compress != Compression::None, Ordering::Relaxed);
        let mut locked = self.lock();
        let recorded = self.shared.recorded_store(self.slot);
        let commands = locked.core.connecting(connection.copy_store(), recorded);
        if let Next::Close(_) = self.execute(&mut locked, commands, &mut None) {
            return None;
        }
        let dirty: Vec<u64> = self.shared.bitmap.dirty_regions(self.slot).collect();
        let assume_clean = self.shared.assume_clean && !dirty.is_empty() && self.both_stores_empty(connection);
        let mut guard: InFlightGuard<'_> = None;
        let mut in_flight = |region| guard.get_or_insert_with(|| self.shared.inflight()).contains_key(&region);
        let commands = locked.core.connected(self.now_ms(), dirty, assume_clean, &mut in_flight);
        self.execute(&mut locked, commands, &mut guard);
        Some(locked.core.connection())
    }

    /// `--assume-clean`: whether both stores provably read as zeroes, so
    /// the copy misses nothing and its dirty regions need no resync. Called
    /// under the link lock as the connection begins: a local write not
    /// visible to the check is still in flight, and it is shipped to this
    /// copy once the lock is released, like any write after the connection
    /// began.
    fn both_stores_empty(&self, connection: &CopyConnection) -> bool {
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
            return false;
        }
        true
    }

    /// Record the copy stale and release everything waiting on it, in that
    /// order (the core's commands). `why` is the cause when the connection
    /// left none.
    fn teardown(&self, why: &str) {
        let mut locked = self.lock();
        let commands = locked.core.lost(why, self.shared.shutdown.load(Ordering::Relaxed));
        self.execute(&mut locked, commands, &mut None);
        self.wake.notify_all();
    }

    /// Send what the core says until the connection breaks or the
    /// replicator stops. Returns why it stopped, unless this host stops.
    fn send_loop(&self) -> Option<String> {
        loop {
            let frames = match self.next_batch() {
                Ok(frames) => frames,
                Err(ending) => return ending,
            };
            // After a writer's batch that is still being written, if any.
            let mut outbound = self.outbound.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(connection) = outbound.as_mut() else { return Some("the connection is gone".to_string()) };
            if let Err(error) = self.send_frames(connection, &frames) {
                return Some(format!("sending to the copy host failed: {error}"));
            }
        }
    }

    /// Ask the core what to send, waiting while it says wait: the frames
    /// (writers take none of their own until the sender asks again, so none
    /// overtakes them), or why the connection ends (`None`: this host
    /// stops).
    fn next_batch(&self) -> Result<Vec<Outgoing>, Option<String>> {
        let mut locked = self.lock();
        locked.sender_busy = false;
        loop {
            if self.shared.shutdown.load(Ordering::Relaxed) {
                return Err(None);
            }
            let commands = locked.core.poll_send(self.now_ms());
            match self.execute(&mut locked, commands, &mut None) {
                Next::Poll => {}
                Next::Wait(duration) => locked = self.wait(locked, duration),
                Next::Send(mut frames) => {
                    // Taken under the lock the batch was taken under: every
                    // frame queued after the pass began is in this batch or
                    // a later one.
                    if !frames.is_empty() && locked.core.take_pass_mark() {
                        if let Some(first) = frames.first_mut() {
                            first.flags = first.flags | FrameFlags::PASS;
                        }
                    }
                    locked.sender_busy = true;
                    return Ok(frames);
                }
                Next::Close(why) => return Err(Some(why)),
                Next::Repair(_) => unreachable!("the sender's commands start no repair"),
            }
        }
    }

    /// Send `frames` in one batch, numbered by the connection as the core
    /// numbered them.
    fn send_frames(&self, connection: &mut CopyConnection, frames: &[Outgoing]) -> Result<(), ReplicationError> {
        let (generation, epoch) = (self.shared.generation, self.shared.epoch);
        let compression = if connection.copy_decompresses() { self.config.compress } else { Compression::None };
        // Data frames compressed for this copy, when that makes them smaller.
        let compressed: Vec<Option<(FrameFlags, Vec<u8>)>> = frames
            .iter()
            .map(|frame| match (&frame.payload, frame.kind) {
                (Some(payload), FrameKind::Write | FrameKind::ResyncData) => {
                    self.counters.compression.compress(compression, (**payload).as_ref())
                }
                _ => None,
            })
            .collect();
        let batch: Vec<(FrameHeader, &[u8])> = frames
            .iter()
            .zip(&compressed)
            .map(|(frame, compressed)| {
                let flags = compressed.as_ref().map_or(frame.flags, |(flag, _)| frame.flags | *flag);
                let mut header = connection.header(frame.kind, flags, generation, epoch);
                assert_eq!(header.sequence, frame.sequence, "the core numbers frames as the connection does");
                let payload = match compressed {
                    Some((_, bytes)) => bytes.as_slice(),
                    None => frame.payload.as_ref().map_or(&[][..], |payload| (**payload).as_ref()),
                };
                header.offset = frame.offset;
                header.length = frame.length;
                header.payload_len = payload.len() as u32;
                (header, payload)
            })
            .collect();
        let payload_bytes: u64 = batch.iter().map(|(_, payload)| payload.len() as u64).sum();
        connection.send_batch(&batch)?;
        self.counters.bytes_shipped.fetch_add(payload_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The reader thread: take acknowledgements in order until the stream
    /// ends or carries something wrong.
    fn read_acks(self: Arc<Self>, mut stream: TcpStream, session: u64, connection: u64) {
        let mut decoder = FrameDecoder::new();
        let mut buffer = vec![0u8; 64 << 10];
        let mut copy_failed = false;
        let why = loop {
            // Every acknowledgement already received, under one lock.
            // What follows them (the copy's Error frame, a frame that does
            // not decode) is judged only once they were taken, as if each
            // frame were handled on its own: a wrong acknowledgement before
            // it is the cause, and the only frame counted as refused.
            let mut frames = Vec::new();
            let after = loop {
                match decoder.pop() {
                    Ok(Some(frame)) if frame.header.kind == FrameKind::Error && frame.header.session == session => {
                        break Some(Ok(frame));
                    }
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break None,
                    Err(error) => break Some(Err(error)),
                }
            };
            if let Err(error) = self.on_acks(frames, session, connection) {
                break self.rejected(&error);
            }
            match after {
                // The copy host says why it gives up, then closes.
                Some(Ok(error_frame)) => match CopyFailure::from_frame(&error_frame) {
                    Ok(failure) => {
                        copy_failed = true;
                        break format!("the copy host reported {failure}");
                    }
                    Err(error) => break self.rejected(&error),
                },
                Some(Err(error)) => break self.rejected(&error),
                None => {}
            }
            match std::io::Read::read(&mut stream, &mut buffer) {
                Ok(0) => break "the copy host closed the connection".to_string(),
                Ok(received) => {
                    if let Err(error) = decoder.push(&buffer[..received]) {
                        break self.rejected(&error);
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => break format!("reading acknowledgements failed: {error}"),
            }
        };
        // The core keeps the first cause (the sender's, when it shut the
        // socket down first) and backs off after the copy's Error frame.
        self.lock().core.reader_ended(connection, why, copy_failed);
        self.wake.notify_all();
        let _ = stream.shutdown(Shutdown::Both);
    }

    fn rejected(&self, error: &ReplicationError) -> String {
        let total = self.counters.frames_rejected.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(copy = %self.config.name, kind = ?error.kind(), frames_rejected = total,
            "refused a frame from copy {}: {error}", self.config.name);
        format!("refused a frame: {error}")
    }

    /// Hand the core the copy's acknowledgements received together, in
    /// order, under one lock; the first that is wrong ends it.
    fn on_acks(&self, frames: Vec<Frame>, session: u64, connection: u64) -> Result<(), ReplicationError> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut locked = self.lock();
        let held_back = locked.core.holds_back_writers();
        let mut flush_acked = false;
        let result = frames.into_iter().try_for_each(|frame| {
            let header = &frame.header;
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
            // The in-flight table is locked only if the clearing rule asks
            // it, and stays locked until the bits it allows are cleared.
            let mut guard: InFlightGuard<'_> = None;
            let mut in_flight = |region| guard.get_or_insert_with(|| self.shared.inflight()).contains_key(&region);
            let now_ms = self.now_ms();
            let (kind, sequence) = (header.kind, header.sequence);
            flush_acked |= kind == FrameKind::FlushAck;
            let commands =
                locked.core.acked(connection, kind, sequence, frame.payload.into_vec(), now_ms, &mut in_flight)?;
            self.execute(&mut locked, commands, &mut guard);
            Ok(())
        });
        if result.is_err() || locked.core.acks_concern_waiters(held_back, flush_acked) {
            self.notify(&locked);
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;

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
