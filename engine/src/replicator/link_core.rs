//! The decisions of one copy's link, as a pure state machine: events in,
//! commands out. No I/O, no threads, no locks, no clock: the shell
//! (`link.rs`) holds the core under its mutex, passes the time in as
//! milliseconds since the link began, carries out every command in order, and
//! feeds back what came of the ones that have an outcome (a persist, a read).
//!
//! ```text
//!  events (shell calls)                          commands (shell carries out, in order)
//!  ────────────────────────────────────          ─────────────────────────────────────────────────────
//!  ship(change, hold, released, now) ──┐         Persist(state)       ─▶ record ─▶ persisted(result)
//!  acked(connection, kind, sequence,   │         PersistStoreToken    ─▶ record ─▶ persisted(result)
//!        payload, in_flight)           │         Release{holds,result}  (after the Persist invariant 3
//!  poll_send(now)       (the tick)     │                                 asks for; EIO if it failed)
//!  connecting(offered, recorded token) ├──▶ ──▶  SetAllBits, SyncBitmap ─▶ flush ─▶ bitmap_synced(result)
//!  connected(now, dirty, assume_clean, │         ClearBits(regions)     (in-flight table still locked)
//!            in_flight)                │         ReadForResync{…}     ─▶ read ─▶ resync_read(result)
//!  lost(why) / reader_ended(why)       │         Send{frames}
//!  missed(extent) / repair_marked(…)   │         AnswerVerify{reply, checksums}
//!  persisted / bitmap_synced /         │         Wait{ms}               (nothing to send before then)
//!  resync_read   (outcomes fed back) ──┘         Close{why}             (end the connection)
//! ```
//!
//! The shell carries out a command with an outcome (a persist, a bitmap
//! sync, a read) at once and feeds the outcome back before the next one, so
//! the core never has two in progress; it asserts so.
//!
//! Three invariants are decided here and nowhere else:
//!
//! - Invariant 6, the bitmap over-approximates: a bit is cleared only by
//!   [`LinkCore::acked`] of a Flush, and only for a region that was a
//!   candidate of the previous acknowledged Flush, is not in this Flush's
//!   snapshot, was not touched since, has no write in flight (the shell's
//!   in-flight table, an input) and is not `resync_pending`. A lost
//!   connection forgets every candidate: nothing prepared on it clears.
//! - Invariant 3, mark before ack: a sync copy's held writes are released by
//!   [`LinkCore::persisted`] of the `Persist(Stale)` that [`LinkCore::lost`]
//!   asks for, with EIO when recording failed; a write shipped while the copy
//!   is not recorded stale waits for the same.
//! - Invariant 9, a store's identity travels with its data: a copy store
//!   whose token is not the one recorded gets every bit set, durably, before
//!   its token is recorded ([`LinkCore::connecting`]).
//!
//! Clearing the bitmap: every change queued for the copy adds its regions to
//! `touched`. A Flush takes `touched` as its snapshot; the regions of an
//! acknowledged snapshot become candidates, and at the next acknowledged
//! Flush each candidate that no change touched since, no write has in
//! flight, and that is not `resync_pending` is cleared in the copy's slot.
//!
//! `resync_pending` holds what the copy may lack: every dirty region whole
//! when the connection begins, and the parts (a 64th of a region, at least
//! 4 KiB) of every change the copy did not get while connected (behind, a
//! failed local write, a verify's repair); the copy has, or has queued, the
//! rest of those regions. A bit covers a whole region, so a later write to
//! part of a pending region reaching the copy proves nothing about the
//! rest: only a resync pass, which sends what is pending, takes it out. Resync passes walk `resync_pending`, from the first region, whenever
//! the copy (re)connects or catches up after being behind. (A region cleared
//! merely because a partial write to it was acknowledged lost a missed write
//! once; `partial_write_during_resync_does_not_hide_a_missed_write` in
//! tests/tests/mirror.rs is that case.)

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::bitmap::WriteIntentBitmap;
use crate::buffer::SharedBytes;
use crate::protocol::auth::{StoreToken, STORE_TOKEN_UNKNOWN};
use crate::protocol::frame::{FrameFlags, FrameKind};
use crate::protocol::ReplicationError;
use crate::replicator::local_sync::LocalSync;
use crate::replicator::resync_controller::ResyncController;
use crate::replicator::resync_pieces::Piece;
use crate::replicator::resync_set::ResyncSet;
use crate::replicator::{Change, MirrorMode, RecordedState};

/// How often touched regions are flushed on the copy so their bits can clear.
const CLEAN_INTERVAL: Duration = Duration::from_millis(500);
/// A Flush costs the copy's disk its write-back, and every write behind it
/// waits: on a disk busy with the copy's writes (a virtual disk whose host
/// caches them, say) one took 0.2-0.35 s, so a Flush every CLEAN_INTERVAL
/// held the copy's writes about 40 % of the time (1M sequential writes QD8
/// through a sync `--direct` copy). While writes keep the link busy, the
/// next Flush for clearing waits at least this many times as long as the
/// last one took the copy (at the front of what it owes: not the writes
/// before it), up to the spacing limit: CLEAN_INTERVAL_MAX, or less when
/// the last one was slow for the busy time before it, so that the next
/// would take about CLEAN_FLUSH_BUDGET if a Flush took time in proportion
/// to the writing since the last one (a buffered copy's fsync writes back
/// what came since; a sync copy's Flush left unacknowledged for ACK_TIMEOUT
/// drops the link), but never less than CLEAN_SPACING_FLOOR (the fixed cap
/// of before: a Flush whose cost does not grow with the time before it
/// would otherwise run back to back). Bits clear later under such a load;
/// a client's FLUSH or FUA is sent at once as ever, and nothing about what
/// is acknowledged, or when a bit may clear, changes.
const CLEAN_FLUSH_SPACING: u64 = 10;
const CLEAN_INTERVAL_MAX: Duration = Duration::from_secs(10);
const CLEAN_SPACING_FLOOR: Duration = Duration::from_secs(2);
const CLEAN_FLUSH_BUDGET: Duration = Duration::from_millis(ACK_TIMEOUT.as_millis() as u64 / 4);
/// A clearing Flush that is due is put off while fewer than one in
/// CLEAN_YIELD_FRACTION of its candidates could clear, because writes
/// rewrote the others since their snapshot (a load that rewrites the whole
/// volume, or its hot set, every few seconds) or they wait for a resync
/// pass: it would stop the copy's disk and clear next to nothing. It goes
/// anyway once the link was quiet for CLEAN_INTERVAL, and at the spacing
/// limit.
const CLEAN_YIELD_FRACTION: usize = 8;
/// Frames taken off the queue per send round.
const SEND_BATCH_FRAMES: usize = 64;
/// The most payload a writer sends itself on an idle link
/// ([`LinkCore::take_inline`]); a larger change goes through the sender.
const INLINE_BYTES_MAX: u64 = 256 << 10;
/// An up-to-date async copy's writes wait in the queue up to this long for
/// company (or until SEND_BATCH_FRAMES or ASYNC_BATCH_BYTES are queued), so
/// that one send, one wake-up of the copy host and one read of its
/// acknowledgements carry many: with a send per write or two, shipping cost
/// the production host's CPU more than its own write (`benches/
/// big-volume.py`). Nothing waits on an async copy's acknowledgement, so
/// only its recovery point moves, by at most this.
const ASYNC_COALESCE_MS: u64 = 1;
const ASYNC_BATCH_BYTES: u64 = 256 << 10;
/// For this long after its last send, an async copy's idle sender looks at
/// the queue every ASYNC_COALESCE_MS, so that a writer queueing a change
/// need not wake it.
const ASYNC_BUSY_MS: u64 = 10;
/// The most resync data in one frame (adjacent dirty regions are joined).
const RESYNC_FRAME_BYTES: u64 = 1 << 20;
/// The least a resync read takes: a region larger than an eighth of the
/// resync window is read in parts of at least this many bytes.
const RESYNC_READ_MIN_BYTES: u64 = 64 << 10;
/// Resync queues more data only while less than this is queued or unacked
/// (the adaptive window of `resync_controller.rs` stays under it).
const RESYNC_WINDOW_BYTES: u64 = 32 << 20;
/// What a resync frame of zeroes (no data: a header) counts for in the
/// resync window, whatever its length, so that a run of holes goes at the
/// pace of the copy's acknowledgements, not of the link's rate.
const ZERO_FRAME_COST_BYTES: u64 = 4 << 10;
/// A sync link stops taking new writes (the writer waits) past this many
/// unacknowledged bytes, so a slow copy cannot exhaust memory.
const SYNC_QUEUE_BYTES_MAX: u64 = 256 << 20;
/// A heartbeat is sent after this long without any frame.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A copy that leaves a frame unacknowledged this long, or a socket that
/// takes no bytes this long, is declared lost (like DRBD's `timeout`): sync
/// writes wait at most about this long for a dead copy. An async copy is
/// judged by progress instead: lost when it acknowledges nothing for this
/// long while frames are outstanding, however long its queue (a full pipe
/// over a slow link is not a dead copy; issue 13).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `last_error` kept for status, in bytes.
const LAST_ERROR_BYTES_MAX: usize = 1024;
/// How long the sender waits for checksum answers before it looks again.
const CHECKSUM_ANSWER_WAIT: Duration = Duration::from_millis(10);

/// What a copy looks like from the production host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyState {
    /// Connected, resynced, receiving every write.
    UpToDate,
    /// Connected and being resynced: not a consistent image.
    Syncing,
    /// Async copy past its lag bound: writes are tracked in the bitmap only
    /// until the queue drains and a resync pass starts.
    Behind,
    /// Not connected and recorded stale; its writes are tracked in the bitmap.
    #[default]
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

    /// Connected and taking every change (up to date or syncing).
    fn takes_changes(self) -> bool {
        matches!(self, CopyState::UpToDate | CopyState::Syncing)
    }
}

impl fmt::Display for CopyState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// What the core needs to know of its copy and volume.
#[derive(Debug, Clone)]
pub(crate) struct CoreConfig {
    /// The copy's name, for logs and errors.
    pub(crate) name: String,
    pub(crate) mode: MirrorMode,
    /// Async only: unacknowledged write bytes before the copy goes behind.
    pub(crate) lag_bytes_max: u64,
    /// Async only: the age of the oldest unacknowledged write before the
    /// copy goes behind; 0: no bound in time.
    pub(crate) lag_ms_max: u64,
    pub(crate) region_bytes: u64,
    pub(crate) volume_bytes: u64,
    /// At most how often a local sync is asked for so that bits can clear.
    pub(crate) local_sync_interval_ms: u64,
    /// The volume's background syncs, shared by every link.
    pub(crate) local_sync: Arc<LocalSync>,
    /// The write-intent bitmap, asked which regions its activity log keeps
    /// until a clean close: their bits clear without a local sync
    /// ([`WriteIntentBitmap::retained_by_log`]). `None`: every bit waits
    /// for one (the core's unit tests of that rule).
    pub(crate) bitmap: Option<Arc<WriteIntentBitmap>>,
    /// Resync bytes per second; 0 means unlimited.
    pub(crate) resync_rate_max: u64,
    /// Resync by checksum first (a ChecksumRequest per dirty range).
    pub(crate) resync_checksums: bool,
}

/// A frame for the shell to send, numbered by the core (the shell asserts
/// that its connection numbers it the same).
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) kind: FrameKind,
    pub(crate) flags: FrameFlags,
    pub(crate) sequence: u64,
    pub(crate) offset: u64,
    pub(crate) length: u32,
    pub(crate) payload: Option<SharedBytes>,
}

/// Equal when the headers and the payloads' bytes are.
impl PartialEq for Outgoing {
    fn eq(&self, other: &Outgoing) -> bool {
        fn bytes(outgoing: &Outgoing) -> Option<&[u8]> {
            outgoing.payload.as_ref().map(|payload| (**payload).as_ref())
        }
        (self.kind, self.flags, self.sequence, self.offset, self.length)
            == (other.kind, other.flags, other.sequence, other.offset, other.length)
            && bytes(self) == bytes(other)
    }
}

impl Eq for Outgoing {}

/// How the shell reads a resync range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResyncRead {
    /// As pieces: holes and zero chunks become zeroes, the rest data.
    Pieces,
    /// As chunk checksums, for a checksum-pass request.
    Checksums,
    /// As plain data (a chunk a checksum answer says differs).
    Data,
}

/// What the shell read for a [`Command::ReadForResync`].
#[derive(Debug)]
pub(crate) enum ResyncReadDone {
    Pieces(Vec<Piece>),
    Checksums(Vec<u8>),
    Data(Vec<u8>),
}

/// What the shell does, in the order given. `H` is a held change (a sync
/// write's ticket), `V` a verifier waiting for a checksum answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command<H, V> {
    /// Record the copy's state durably, then call [`LinkCore::persisted`]
    /// with the result before anything else.
    Persist(RecordedState),
    /// Record the copy store's token durably, then call
    /// [`LinkCore::persisted`] with the result before anything else.
    PersistStoreToken(StoreToken),
    /// Set every bit of the copy's slot: it gets a full resync.
    SetAllBits,
    /// Set the copy's bits of these byte ranges (offset, length).
    SetBits(Vec<(u64, u64)>),
    /// Make the bitmap durable, then call [`LinkCore::bitmap_synced`].
    SyncBitmap,
    /// Answer these held changes with `result` (0 or a negative errno).
    Release { holds: Vec<H>, result: i32 },
    /// Clear the copy's bits of these regions, while the in-flight table
    /// read for this decision is still locked (a write beginning meanwhile
    /// sets its bit again after the clear, never before it).
    ClearBits(Vec<u64>),
    /// Read a range of the local volume under the link lock, then call
    /// [`LinkCore::resync_read`].
    ReadForResync { offset: u64, length: u64, read: ResyncRead },
    /// A verifier's answer: the copy's chunk checksums.
    AnswerVerify { reply: V, checksums: Vec<u8> },
    /// Send the frames.
    Send { frames: Vec<Outgoing> },
    /// Nothing to send before `ms` pass (or something is shipped).
    Wait { ms: u64 },
    /// End the connection; `why` is already kept as its ending.
    Close { why: String },
    /// Whether the repair asked for started, or why not.
    RepairStarted(Result<(), String>),
}

/// A Flush's snapshot: the regions touched since the previous one.
#[derive(Debug)]
struct Snapshot {
    regions: Vec<u64>,
    /// The local syncs started when this snapshot was taken: its regions
    /// are durable here once a sync numbered above this has completed (see
    /// `local_sync.rs`).
    mark: u64,
    /// The time the link was busy since the Flush with a snapshot before
    /// this one, when it was taken (`busy_since_ms`).
    gap_ms: u64,
}

/// A frame waiting to be sent, and after it what its acknowledgement does.
#[derive(Debug)]
struct Frame<H, V> {
    kind: FrameKind,
    flags: FrameFlags,
    offset: u64,
    length: u32,
    payload: Option<SharedBytes>,
    hold: Option<H>,
    /// Bytes counted in `lag_bytes` (writes) or `resync_bytes_outstanding`
    /// (resync frames) until it is acknowledged.
    lag: u64,
    /// Resync data rather than an application write.
    resync: bool,
    /// A Flush's snapshot of touched regions.
    snapshot: Option<Snapshot>,
    /// The Flush that ends a resync pass: the pass's number.
    ends_resync: Option<u64>,
    /// A ChecksumRequest's waiting verifier.
    reply: Option<V>,
    /// A resync checksum pass's request: the local chunk checksums.
    resync_check: Option<Vec<u8>>,
    /// The stop's final Flush.
    final_flush: bool,
    /// When the change was shipped (its client may have its answer from
    /// then on, for an async copy): the age of what the copy lacks.
    shipped_at_ms: u64,
}

impl<H, V> Frame<H, V> {
    /// A frame of `kind` for `length` bytes at `offset`, with nothing else
    /// attached; the callers set what their kind carries.
    fn new(kind: FrameKind, offset: u64, length: u64) -> Frame<H, V> {
        Frame {
            kind,
            flags: FrameFlags::NONE,
            offset,
            length: u32::try_from(length).expect("a frame's length fits its header"),
            payload: None,
            hold: None,
            lag: 0,
            resync: false,
            snapshot: None,
            ends_resync: None,
            reply: None,
            resync_check: None,
            final_flush: false,
            shipped_at_ms: 0,
        }
    }

    /// Resync data for `data.len()` bytes at `offset`.
    fn resync_data(offset: u64, data: Vec<u8>) -> Frame<H, V> {
        let length = data.len() as u64;
        Frame {
            payload: Some(Arc::new(data)),
            lag: length,
            resync: true,
            ..Frame::new(FrameKind::ResyncData, offset, length)
        }
    }

    /// Resync of `length` bytes at `offset` that read as zeroes: no data,
    /// counted in the resync window as ZERO_FRAME_COST_BYTES (at most its
    /// length), so a long run of zeroes is not queued all at once.
    fn resync_zeroes(offset: u64, length: u64) -> Frame<H, V> {
        let cost = ZERO_FRAME_COST_BYTES.min(length);
        Frame { lag: cost, resync: true, ..Frame::new(FrameKind::ResyncZeroes, offset, length) }
    }
}

/// What a copy lacks of what clients were told is written (see
/// [`LinkCore::recovery_point`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecoveryPoint {
    /// Bytes of acknowledged writes the copy lacks (not `exact`: an upper
    /// bound, the dirty regions' or, once a pass began, those changed since
    /// the image a rollback brings back).
    pub bytes: u64,
    /// How old the oldest of them is, in milliseconds (not `exact`: the
    /// time since the copy last followed every write, or since the oldest
    /// write still queued for it was shipped if older; `u64::MAX` when it
    /// never did since this host started).
    pub ms: u64,
    /// The copy follows every write (up to date): `bytes` and `ms` are the
    /// writes in flight to it; else they bound the exposure.
    pub exact: bool,
}

/// A frame sent and not yet acknowledged (its payload is gone with the send).
#[derive(Debug)]
struct Unacked<H, V> {
    sequence: u64,
    sent_at_ms: u64,
    frame: Frame<H, V>,
}

/// What a [`Command::Persist`] was for: what [`LinkCore::persisted`] does.
#[derive(Debug)]
enum AfterPersist<H> {
    /// A change shipped while the copy was not recorded stale (Stale).
    MissedWhileUnrecorded { hold: Option<H> },
    /// An async copy went over its lag bound (Stale).
    WentBehind { lag_bytes: u64, age_ms: u64 },
    /// The connection is gone with these held changes (Stale).
    Lost { holds: Vec<H>, was: CopyState, why: String, waiting: usize, shutting_down: bool },
    /// A connection begins (Syncing): then the copy store's token is checked.
    Connecting { offered: StoreToken, recorded: StoreToken },
    /// A new copy store's token, after its every bit was set durably.
    StoreToken,
    /// A repair's copy (Syncing), before its ranges are marked.
    Repair { ranges: Vec<(u64, u64)> },
    /// A behind copy drained its queue (Syncing).
    CaughtUp,
    /// A change the copy cannot get from a frame (Syncing).
    Missed,
    /// The resync pass's closing Flush was acknowledged (Current).
    PassDone,
}

/// What a [`Command::SyncBitmap`] was for: what [`LinkCore::bitmap_synced`] does.
#[derive(Debug, Clone, Copy)]
enum AfterBitmapSync {
    /// A new copy store's bits are set: its token may be recorded.
    StoreCheck { offered: StoreToken },
    /// A repair's ranges are marked: the resync may start.
    Repair { ranges: usize },
}

/// One copy's link state: the send queue, the clearing rule, the resync
/// bookkeeping and the copy's state, driven by events.
#[derive(Debug)]
pub(crate) struct LinkCore<H, V> {
    config: CoreConfig,
    state: CopyState,
    /// The link stopped with the copy holding every write: nothing more is
    /// recorded for it by this host.
    stopped_clean: bool,
    /// Bumped per connection, so a reader of an old connection changes nothing.
    connection: u64,
    /// The next frame's sequence number on this connection.
    next_sequence: u64,
    queue: VecDeque<Frame<H, V>>,
    unacked: VecDeque<Unacked<H, V>>,
    lag_bytes: u64,
    /// What the resync frames queued or unacknowledged count for in the
    /// window: their lengths (a frame of zeroes: ZERO_FRAME_COST_BYTES).
    resync_bytes_outstanding: u64,
    /// How much resync and write data may be in flight together.
    controller: ResyncController,
    touched: HashSet<u64>,
    /// Regions of the last acknowledged Flush's snapshot: cleared at the
    /// next Flush's acknowledgement if no change touched them meanwhile, so
    /// a bit clears only after its region stayed quiet for a whole
    /// CLEAN_INTERVAL (a hot region keeps its bit and costs no msync).
    /// Each with the local syncs started when its snapshot was taken: it
    /// clears only once a sync numbered above that has completed.
    clear_candidates: Vec<(u64, u64)>,
    /// When a local sync was last asked for, for clearing; `None`: never.
    last_local_sync_ms: Option<u64>,
    /// The local syncs started when the last snapshot was taken.
    snapshot_mark: u64,
    /// The next region the resync pass looks at; `None` when no pass runs.
    resync_next: Option<u64>,
    /// What the copy may lack: regions dirty when the connection began
    /// (whole), and the parts touched by a change this copy did not get.
    /// Only sending what is pending (resync) takes a region out; until then
    /// its bit never clears, even if later writes to part of it reach the
    /// copy. Keeps the pass's progress too.
    resync_pending: ResyncSet,
    /// Regions changed since the copy last held an image that followed
    /// every write: dirty when a connection began, and every change made
    /// while the copy is not up to date (missed, or shipped during a pass).
    /// A copy caught mid-pass rolls back to the image of the pass's start
    /// (its undo journal), which lacks all of them, even those the pass has
    /// since sent and whose bits cleared; so the RPO counts them until the
    /// copy is up to date again.
    exposed: ResyncSet,
    /// Numbers the resync passes, so only the current pass's closing Flush
    /// can make the copy up to date.
    resync_pass: u64,
    /// Checksum-pass requests not answered yet; the pass ends after them.
    resync_checks_outstanding: u32,
    /// What a [`Command::ReadForResync`] of the pass is reading.
    resync_reading: Option<ResyncReading>,
    /// A region the pass has read a part of: (region, bytes of it read).
    /// It stays pending (its bit cannot clear) until its last part is
    /// queued; a change it misses meanwhile makes the pass read it again
    /// from its start.
    resync_partial: Option<(u64, u64)>,
    /// When the pass (for `resync_rate_max`) first asked whether to wait,
    /// and what it queued since: set by the first `resync_pause_ms` of each
    /// pass, so every pass is held to the rate, not only the first of a
    /// connection.
    resync_started_ms: Option<u64>,
    resync_sent_bytes: u64,
    last_flush_ms: u64,
    /// How long the last acknowledged Flush with a snapshot took the copy,
    /// from its send, or from when it reached the front of what the copy
    /// owes if that was later, to its acknowledgement (see
    /// CLEAN_FLUSH_SPACING); 0 on a new connection.
    clean_flush_ms: u64,
    /// The time before that Flush since the one before it (its snapshot's
    /// `gap_ms`).
    clean_gap_ms: u64,
    /// When a due clearing Flush was last put off: looked at again
    /// CLEAN_INTERVAL later (see CLEAN_YIELD_FRACTION).
    clean_put_off_ms: Option<u64>,
    last_sent_ms: u64,
    /// When frames started going out again after the link was quiet for
    /// longer than CLEAN_INTERVAL, or the connection began: idle time
    /// writes nothing a Flush must write back, so the flush budget does not
    /// count it.
    busy_since_ms: u64,
    /// When the sender looks at the queue next, by the last wait it was
    /// told (now, while it is not waiting).
    sender_due_ms: u64,
    /// The last time the sender found the copy up to date: the moment its
    /// image stopped following every write, once it no longer is. A lost
    /// connection lowers it to when the oldest write it lost was shipped.
    up_to_date_ms: Option<u64>,
    /// When the copy last acknowledged anything (as of the last poll).
    last_ack_ms: u64,
    /// When the oldest unacknowledged frame last changed (an acknowledgement
    /// of the oldest one): a Flush there since waits for nothing but its fsync.
    front_since_ms: u64,
    /// An acknowledgement arrived since the last poll.
    ack_seen: bool,
    /// A resync pass began since the last frame was sent: the next one
    /// carries [`FrameFlags::PASS`].
    pass_mark: bool,
    /// Behind since a write passed the lag bound while the copy was
    /// syncing: still recorded syncing, its pass paused.
    behind_while_syncing: bool,
    /// The stop's final Flush: `Some(false)` queued or in flight,
    /// `Some(true)` acknowledged with nothing shipped after it — every
    /// write this host acknowledged is durable on the copy (a buffered copy
    /// acknowledges writes from its page cache). Only then does a stop
    /// leave the copy's record current.
    final_flush: Option<bool>,
    /// Why the current connection failed, once it has (the sender then tears
    /// it down): the first cause seen (the copy's Error frame, an ack
    /// timeout, a closed socket), so a later symptom of the same teardown
    /// does not replace it.
    ending: Option<String>,
    /// Why the copy is not up to date, for status; cleared when it is.
    last_error: Option<String>,
    /// The current connection cleared a bit or made the copy up to date:
    /// the next connection attempt need not back off.
    progress: bool,
    /// `Shared::released` when this link last queued a barrier frame.
    barrier_released: u64,
    /// The persist the shell is carrying out.
    persisting: Option<AfterPersist<H>>,
    /// The bitmap sync the shell is carrying out.
    syncing_bitmap: Option<AfterBitmapSync>,
}

impl<H, V> LinkCore<H, V> {
    /// A link not connected yet: stale, nothing queued.
    pub(crate) fn new(config: CoreConfig) -> LinkCore<H, V> {
        let resync_pending = ResyncSet::new(config.volume_bytes, config.region_bytes);
        let exposed = ResyncSet::new(config.volume_bytes, config.region_bytes);
        let controller = ResyncController::new(resync_window_max(&config));
        LinkCore {
            controller,
            stopped_clean: false,
            config,
            state: CopyState::Stale,
            connection: 0,
            next_sequence: 1,
            queue: VecDeque::new(),
            unacked: VecDeque::new(),
            lag_bytes: 0,
            resync_bytes_outstanding: 0,
            touched: HashSet::new(),
            clear_candidates: Vec::new(),
            last_local_sync_ms: None,
            snapshot_mark: 0,
            resync_next: None,
            resync_pending,
            exposed,
            resync_pass: 0,
            resync_checks_outstanding: 0,
            resync_reading: None,
            resync_partial: None,
            resync_started_ms: None,
            resync_sent_bytes: 0,
            last_flush_ms: 0,
            clean_flush_ms: 0,
            clean_gap_ms: 0,
            clean_put_off_ms: None,
            last_sent_ms: 0,
            busy_since_ms: 0,
            sender_due_ms: 0,
            up_to_date_ms: None,
            last_ack_ms: 0,
            front_since_ms: 0,
            ack_seen: false,
            pass_mark: false,
            behind_while_syncing: false,
            final_flush: None,
            ending: None,
            last_error: None,
            progress: false,
            barrier_released: 0,
            persisting: None,
            syncing_bitmap: None,
        }
    }

    pub(crate) fn state(&self) -> CopyState {
        self.state
    }

    pub(crate) fn connection(&self) -> u64 {
        self.connection
    }

    pub(crate) fn last_error(&self) -> Option<&String> {
        self.last_error.as_ref()
    }

    /// The recovery point this copy offers at `now_ms` (issue 13, item 3):
    /// the bytes of writes that were (or may have been) acknowledged to
    /// clients and are not on the copy, and how old the oldest of them is.
    /// `dirty_bytes` is what the bitmap says the copy may lack while it is
    /// not following every write (whole regions: an upper bound).
    pub(crate) fn recovery_point(&self, now_ms: u64, dirty_bytes: u64) -> RecoveryPoint {
        match self.state {
            // (A state being recorded, a lost connection's say, is no
            // longer followed: the bound below.)
            CopyState::UpToDate if self.persisting.is_none() => {
                if self.config.mode == MirrorMode::Sync {
                    // A sync write is answered only once the copy has it.
                    return RecoveryPoint { bytes: 0, ms: 0, exact: true };
                }
                RecoveryPoint { bytes: self.lag_bytes, ms: self.oldest_write_age_ms(now_ms), exact: true }
            }
            // Bounds. The bytes: a copy that has begun no pass since it
            // last followed every write lacks at most its dirty regions (a
            // change's bit is set before it is shipped and stays until the
            // copy has flushed it); one caught mid-pass rolls back to the
            // pass's start, and lacks at most `exposed` (which then holds
            // every region changed since that image). The age: since the
            // copy last followed every write, or since the oldest write
            // still queued for it was shipped, if older (it went behind
            // with its lag bound of writes on the way: issue 13's crash
            // test found the oldest lost write 2 s older than the RPO said).
            _ => {
                let since = self
                    .up_to_date_ms
                    .map(|since| self.oldest_change_shipped_ms().map_or(since, |shipped| shipped.min(since)));
                RecoveryPoint {
                    bytes: dirty_bytes.max(self.lag_bytes).max(self.exposed.bytes()),
                    ms: since.map_or(u64::MAX, |since| now_ms.saturating_sub(since)),
                    exact: false,
                }
            }
        }
    }

    /// When the oldest change queued or unacknowledged for the copy was
    /// shipped (its client may have had its answer since).
    fn oldest_change_shipped_ms(&self) -> Option<u64> {
        self.unacked
            .iter()
            .map(|unacked| &unacked.frame)
            .chain(self.queue.iter())
            .find(|frame| {
                !frame.resync && matches!(frame.kind, FrameKind::Write | FrameKind::Trim | FrameKind::WriteZeroes)
            })
            .map(|frame| frame.shipped_at_ms)
    }

    /// How long the oldest change queued or sent and not yet acknowledged
    /// has waited (0 when there is none).
    fn oldest_write_age_ms(&self, now_ms: u64) -> u64 {
        self.oldest_change_shipped_ms().map_or(0, |shipped| now_ms.saturating_sub(shipped))
    }

    /// Whether an async copy shipped `lag` more bytes at `now_ms` would be
    /// past its lag bound: in bytes, or in the age of its oldest change.
    fn over_lag_bound(&self, lag: u64, now_ms: u64) -> bool {
        self.lag_bytes + lag > self.config.lag_bytes_max
            || (self.config.lag_ms_max > 0 && self.oldest_write_age_ms(now_ms) > self.config.lag_ms_max)
    }

    /// The production role stops: if the copy follows every write, queue a
    /// Flush whose acknowledgement makes every acknowledged write durable
    /// there (see [`LinkCore::flushed_for_stop`]); false when there is no
    /// point (not up to date).
    pub(crate) fn queue_final_flush(&mut self) -> bool {
        if self.state != CopyState::UpToDate {
            return false;
        }
        self.final_flush = Some(false);
        self.queue.push_back(Frame { final_flush: true, ..Frame::new(FrameKind::Flush, 0, 0) });
        true
    }

    /// Whether the stop's final Flush was acknowledged with nothing after it.
    pub(crate) fn flushed_for_stop(&self) -> bool {
        self.final_flush == Some(true) && self.queue.is_empty() && self.unacked.is_empty()
    }

    /// Whether a pass began since the last batch was taken to be sent (the
    /// shell marks that batch's first frame with [`FrameFlags::PASS`]).
    pub(crate) fn take_pass_mark(&mut self) -> bool {
        std::mem::take(&mut self.pass_mark)
    }

    pub(crate) fn lag_bytes(&self) -> u64 {
        self.lag_bytes
    }

    pub(crate) fn progress(&self) -> bool {
        self.progress
    }

    pub(crate) fn resync_pending(&self) -> &ResyncSet {
        &self.resync_pending
    }

    /// A sync copy this far behind makes the writer wait (bounded memory).
    pub(crate) fn holds_back_writers(&self) -> bool {
        self.config.mode == MirrorMode::Sync
            && self.state.takes_changes()
            && self.lag_bytes > SYNC_QUEUE_BYTES_MAX
            && self.ending.is_none()
    }

    /// The regions `length` bytes at `offset` touch: the arithmetic of
    /// `WriteIntentBitmap::regions`, which the core, holding no bitmap,
    /// does from the region size it was given.
    fn regions(&self, offset: u64, length: u64) -> std::ops::Range<u64> {
        if length == 0 {
            return 0..0;
        }
        let end = offset.checked_add(length).expect("an extent ends inside u64");
        assert!(end <= self.config.volume_bytes, "bytes {offset}..{end} run past the volume's end");
        offset / self.config.region_bytes..(end - 1) / self.config.region_bytes + 1
    }

    fn region_count(&self) -> u64 {
        self.config.volume_bytes.div_ceil(self.config.region_bytes)
    }

    fn persist(&mut self, state: RecordedState, then: AfterPersist<H>) -> Vec<Command<H, V>> {
        assert!(self.persisting.is_none(), "the shell carries out one persist at a time");
        self.persisting = Some(then);
        vec![Command::Persist(state)]
    }

    /// Keep `message` as why the copy is not up to date, cut to a bound.
    pub(crate) fn set_last_error(&mut self, mut message: String) {
        if message.len() > LAST_ERROR_BYTES_MAX {
            let mut end = LAST_ERROR_BYTES_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        self.last_error = Some(message);
    }

    /// The connection must end for `why` (the first cause wins); the sender
    /// sees it at its next [`LinkCore::poll_send`].
    pub(crate) fn connection_failed(&mut self, why: String) {
        self.ending.get_or_insert(why);
    }

    /// A change this copy will not get: the parts of its regions it
    /// touches need a resync (the copy has every other byte of them, or
    /// has it queued, unless they are pending already), and until then
    /// their bits never clear. A checksum pass compares whole regions, so
    /// with `resync_checksums` they are pending whole.
    fn dropped(&mut self, extent: Option<(u64, u64)>) {
        if let Some((offset, length)) = extent {
            if self.config.resync_checksums {
                for region in self.regions(offset, length) {
                    self.resync_pending.insert(region);
                }
            } else {
                self.resync_pending.insert_extent(offset, length);
            }
            for region in self.regions(offset, length) {
                self.exposed.insert(region);
            }
            // A part already sent of a region being read may lack it.
            self.resync_partial = None;
        }
    }

    fn start_resync_pass(&mut self) {
        // The next frame sent says a pass began (any frame queued before is
        // part of the image the copy held; one marked early only makes the
        // copy keep its way back from a little earlier).
        self.pass_mark = true;
        self.resync_pass += 1;
        self.resync_next = Some(0);
        self.resync_partial = None;
        self.resync_pending.start_pass();
        self.resync_started_ms = None;
        self.resync_sent_bytes = 0;
        self.controller.pass_started();
    }
}

/// What a resync read of the pass covers.
#[derive(Debug, Clone, Copy)]
enum ResyncReading {
    /// Regions `region..end` pending whole (or a part of `region`, when it
    /// is larger than a read).
    Regions { region: u64, end: u64 },
    /// The parts `mask` of `region`, pending in parts.
    Parts { region: u64, mask: u64 },
}

/// Events from writers: changes shipped, missed, repaired.
impl<H, V> LinkCore<H, V> {
    /// Queue a change for this copy, or drop it (the bitmap keeps its
    /// regions) when the copy cannot take it. `hold` is a sync copy's hold
    /// on the change: kept until the copy acknowledges it or is recorded
    /// stale, else released by a command. `payload` is the write's data
    /// shared by every link; the first link that queues it makes the one
    /// copy (none is made when no copy takes it). `released` is
    /// `Shared::released` now.
    pub(crate) fn ship(
        &mut self,
        change: &Change<'_>,
        payload: &mut Option<SharedBytes>,
        hold: Option<H>,
        released: u64,
        now_ms: u64,
    ) -> Vec<Command<H, V>> {
        assert!(hold.is_none() || self.config.mode == MirrorMode::Sync, "only a sync copy holds changes");
        if !self.state.takes_changes() {
            return self.not_taken(change, hold);
        }
        let lag = match change {
            Change::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        if self.config.mode == MirrorMode::Async && change.extent().is_some() && self.over_lag_bound(lag, now_ms) {
            self.dropped(change.extent());
            if self.state == CopyState::Syncing {
                // Already recorded syncing and its image already torn:
                // behind with nothing recorded, the pass paused until the
                // queue drains, then it takes the change's regions. (Going
                // behind and back used to record the copy twice, in a
                // writer's path, several times a second while writes outran
                // the link.)
                self.state = CopyState::Behind;
                self.behind_while_syncing = true;
                return release(hold, 0);
            }
            self.state = CopyState::Behind;
            let mut commands = release(hold, 0);
            let age_ms = self.oldest_write_age_ms(now_ms);
            commands.extend(
                self.persist(RecordedState::Stale, AfterPersist::WentBehind { lag_bytes: self.lag_bytes, age_ms }),
            );
            return commands;
        }
        let mut frame = frame_of(change, payload);
        if self.config.mode == MirrorMode::Async && released != self.barrier_released {
            // An async copy's acknowledgement does not gate the client's: a
            // change released since this link's last barrier may have been
            // acknowledged before this one was issued, so this one must not
            // be applied before it (see the module docs of `replicator`).
            self.barrier_released = released;
            frame.flags = frame.flags | FrameFlags::BARRIER;
        }
        if let Some((offset, length)) = change.extent() {
            self.touched.extend(self.regions(offset, length));
            if self.state != CopyState::UpToDate {
                // Applied on top of a pass: a rollback gives it up.
                for region in self.regions(offset, length) {
                    self.exposed.insert(region);
                }
            }
        }
        if frame.kind == FrameKind::Flush {
            frame.snapshot = Some(self.take_snapshot(now_ms));
        }
        frame.hold = hold;
        frame.lag = lag;
        frame.shipped_at_ms = now_ms;
        if self.final_flush.is_some() {
            // Something after the final Flush: it no longer covers it.
            self.final_flush = Some(false);
        }
        self.lag_bytes += lag;
        self.controller.writes_in_flight(self.lag_bytes);
        self.queue.push_back(frame);
        Vec::new()
    }

    /// A change the copy cannot take now: dropped, its regions kept for
    /// resync.
    fn not_taken(&mut self, change: &Change<'_>, hold: Option<H>) -> Vec<Command<H, V>> {
        self.dropped(change.extent());
        match self.state {
            // The copy missed writes and is not recorded stale yet: the hold
            // waits for the record (invariant 3).
            CopyState::Unrecorded => self.persist(RecordedState::Stale, AfterPersist::MissedWhileUnrecorded { hold }),
            // Diverged is only ever reported by status, never stored.
            CopyState::Behind | CopyState::Stale | CopyState::Diverged => release(hold, 0),
            CopyState::UpToDate | CopyState::Syncing => unreachable!("a connected copy takes every change"),
        }
    }

    /// The local store changed in a way no frame carries (a failed write
    /// may have written part of its data): resync the extent's regions,
    /// starting a pass now if the copy is connected.
    pub(crate) fn missed(&mut self, offset: u64, length: u64) -> Vec<Command<H, V>> {
        self.dropped(Some((offset, length)));
        if !self.state.takes_changes() {
            return Vec::new();
        }
        self.persist(RecordedState::Syncing, AfterPersist::Missed)
    }

    /// Verify found these byte ranges differing: resync them. The copy is
    /// recorded syncing, the ranges are marked in its slot, durably, and a
    /// pass starts if it is connected; the last command says whether the
    /// repair started ([`Command::RepairStarted`]).
    pub(crate) fn repair(&mut self, ranges: Vec<(u64, u64)>) -> Vec<Command<H, V>> {
        self.persist(RecordedState::Syncing, AfterPersist::Repair { ranges })
    }

    /// The repair's copy is recorded syncing (or not).
    fn repair_recorded(&mut self, ranges: Vec<(u64, u64)>, result: Result<(), String>) -> Vec<Command<H, V>> {
        if let Err(error) = result {
            let why = format!("cannot record copy {} syncing: {error}", self.config.name);
            return vec![Command::RepairStarted(Err(why))];
        }
        // The copy may lack these ranges (verify compared the rest): their bits never clear
        // before a pass sends them, even before the marks are durable.
        for &(offset, length) in &ranges {
            self.dropped(Some((offset, length)));
        }
        self.sync_bitmap(AfterBitmapSync::Repair { ranges: ranges.len() }, Command::SetBits(ranges))
    }

    /// The repair's ranges are marked durably (or not): resync them now if
    /// the copy is connected.
    fn repair_marked(&mut self, ranges: usize, result: Result<(), String>) -> Vec<Command<H, V>> {
        if let Err(error) = result {
            return vec![Command::RepairStarted(Err(format!("cannot mark the regions to repair: {error}")))];
        }
        if self.state.takes_changes() {
            self.state = CopyState::Syncing;
            self.start_resync_pass();
        }
        tracing::warn!(copy = %self.config.name, regions = ranges,
            "verify found {ranges} mismatching chunks on copy {}; resyncing them", self.config.name);
        vec![Command::RepairStarted(Ok(()))]
    }

    /// An online verify's ChecksumRequest, queued behind every change
    /// shipped so far; the shell read the local side under the same lock.
    pub(crate) fn queue_checksum_request(&mut self, offset: u64, length: u64, reply: V) {
        self.queue.push_back(Frame { reply: Some(reply), ..Frame::new(FrameKind::ChecksumRequest, offset, length) });
    }

    /// Take the regions touched since the last Flush as the next Flush's
    /// snapshot. A copy's flush must not clear a bit whose region is not
    /// durable on the production host either: this Flush's candidates (the
    /// previous snapshot's regions) clear at its acknowledgement only if a
    /// local sync that started after that snapshot has completed by then.
    /// When the Flush may clear bits that need one (a candidate is not in
    /// the snapshot and the activity log does not keep it, or an earlier
    /// snapshot Flush is still out and the candidates are not known yet)
    /// and no such sync has started, one is asked for, at most
    /// once per `local_sync_interval`; it runs on the syncer's thread while
    /// frames keep going out. Candidates no sync covers in time wait for a
    /// later Flush.
    fn take_snapshot(&mut self, now_ms: u64) -> Snapshot {
        let gap_ms = now_ms.saturating_sub(self.last_flush_ms.max(self.busy_since(now_ms)));
        self.last_flush_ms = now_ms;
        self.clean_put_off_ms = None;
        let regions: Vec<u64> = self.touched.drain().collect();
        // Read after the drain, under the link lock that every ship takes to
        // touch a region: each write to these regions completed before it,
        // so a sync numbered above it started after them.
        let previous = std::mem::replace(&mut self.snapshot_mark, self.config.local_sync.started());
        // A snapshot Flush still queued or unacknowledged (it is derived, not
        // counted) leaves the candidates at this one's acknowledgement unknown.
        let earlier_out = self
            .queue
            .iter()
            .chain(self.unacked.iter().map(|unacked| &unacked.frame))
            .any(|frame| frame.snapshot.is_some());
        // A candidate the activity log keeps clears without a sync.
        let might_clear = earlier_out || {
            let recent: HashSet<u64> = regions.iter().copied().collect();
            let quiet: Vec<u64> = self
                .clear_candidates
                .iter()
                .map(|&(region, _)| region)
                .filter(|region| !recent.contains(region))
                .collect();
            self.retained_by_log(&quiet).contains(&false)
        };
        let sync_allowed = self
            .last_local_sync_ms
            .is_none_or(|last| now_ms.saturating_sub(last) >= self.config.local_sync_interval_ms);
        // The candidates at this Flush's acknowledgement come from the
        // previous snapshot or earlier ones: a sync above its mark covers them.
        if might_clear && sync_allowed && self.config.local_sync.request_after(previous) {
            self.last_local_sync_ms = Some(now_ms);
        }
        Snapshot { regions, mark: self.snapshot_mark, gap_ms }
    }
}

/// The frame that carries `change`, its payload shared through `payload`.
fn frame_of<H, V>(change: &Change<'_>, payload: &mut Option<SharedBytes>) -> Frame<H, V> {
    let (kind, flags, offset, length) = match *change {
        Change::Write { offset, data, fua } => (FrameKind::Write, fua_flag(fua), offset, data.len() as u64),
        Change::Trim { offset, length, fua } => (FrameKind::Trim, fua_flag(fua), offset, length),
        Change::WriteZeroes { offset, length, fua } => (FrameKind::WriteZeroes, fua_flag(fua), offset, length),
        Change::Flush => (FrameKind::Flush, FrameFlags::NONE, 0, 0),
    };
    let payload = match change {
        Change::Write { data, .. } => {
            Some(payload.get_or_insert_with(|| Arc::new(data.to_vec()) as SharedBytes).clone())
        }
        _ => None,
    };
    Frame { flags, payload, ..Frame::new(kind, offset, length) }
}

fn fua_flag(fua: bool) -> FrameFlags {
    if fua {
        FrameFlags::FUA
    } else {
        FrameFlags::NONE
    }
}

/// Release `hold`, if there is one, with `result`.
fn release<H, V>(hold: Option<H>, result: i32) -> Vec<Command<H, V>> {
    hold.map(|hold| Command::Release { holds: vec![hold], result }).into_iter().collect()
}

/// Events of the connection's life: it begins, it is lost, a persist is done.
impl<H, V> LinkCore<H, V> {
    /// A connection to the copy is established, its store offering the
    /// token `offered`; `recorded` is the token recorded for this copy.
    /// Resync data will tear the copy's image, so it is recorded syncing
    /// first; then its store is checked (invariant 9). The shell calls
    /// [`LinkCore::connected`] unless the commands end with a Close.
    pub(crate) fn connecting(&mut self, offered: StoreToken, recorded: StoreToken) -> Vec<Command<H, V>> {
        self.persist(RecordedState::Syncing, AfterPersist::Connecting { offered, recorded })
    }

    /// Invariant 9: a copy store that is not the one last synced here (its
    /// token differs: a fresh copy, a store replaced or swapped behind our
    /// back, lost copy metadata) may differ anywhere, whatever the bitmap
    /// says. Set its every bit, durably, before the new token is recorded;
    /// a crash between the two leaves the bits set and the old token, so
    /// the next connection does the same again.
    fn check_store(&mut self, offered: StoreToken, recorded: StoreToken) -> Vec<Command<H, V>> {
        if offered == recorded && offered != STORE_TOKEN_UNKNOWN {
            return Vec::new();
        }
        if recorded != STORE_TOKEN_UNKNOWN {
            tracing::warn!(
                copy = %self.config.name,
                "copy {}'s store is not the one last synced (its store token changed: a new copy store, a store \
                 replaced or restored, or its metadata lost); it gets a full resync",
                self.config.name
            );
        }
        self.sync_bitmap(AfterBitmapSync::StoreCheck { offered }, Command::SetAllBits)
    }

    /// The shell carried out the [`Command::SyncBitmap`] asked for last:
    /// the copy store's every bit is durably set, so its token may be
    /// recorded (none when the copy did not say).
    pub(crate) fn bitmap_synced(&mut self, result: Result<(), String>) -> Vec<Command<H, V>> {
        let offered = match self.syncing_bitmap.take().expect("a bitmap sync was asked for") {
            AfterBitmapSync::StoreCheck { offered } => offered,
            AfterBitmapSync::Repair { ranges } => return self.repair_marked(ranges, result),
        };
        if let Err(error) = result {
            return self.not_connected(format!("cannot mark copy {} for a full resync: {error}", self.config.name));
        }
        if offered == STORE_TOKEN_UNKNOWN {
            return Vec::new();
        }
        assert!(self.persisting.is_none(), "the shell carries out one persist at a time");
        self.persisting = Some(AfterPersist::StoreToken);
        vec![Command::PersistStoreToken(offered)]
    }

    /// Set bits with `set`, then sync the bitmap, then `then`.
    fn sync_bitmap(&mut self, then: AfterBitmapSync, set: Command<H, V>) -> Vec<Command<H, V>> {
        assert!(self.syncing_bitmap.is_none(), "the shell carries out one bitmap sync at a time");
        self.syncing_bitmap = Some(then);
        vec![set, Command::SyncBitmap]
    }

    /// The connection being set up cannot be served, for `why`.
    fn not_connected(&mut self, why: String) -> Vec<Command<H, V>> {
        tracing::error!(copy = %self.config.name, "{why}; dropping the connection");
        self.set_last_error(why.clone());
        vec![Command::Close { why }]
    }

    /// The connection begins (recorded syncing, the copy's store checked):
    /// everything dirty now may be missing on the copy, so it goes whole.
    /// `assume_clean`: both stores provably hold no data (`--assume-clean`),
    /// so the dirty regions need no resync — except a region with a write in
    /// flight, which keeps its bit and is resynced whole: if this copy misses
    /// that write, a later crash of this host must still find the bit (a
    /// region in flight is never cleared). A write in flight now is shipped
    /// to this copy once the shell's lock is released, like any write after
    /// the connection began.
    pub(crate) fn connected(
        &mut self,
        now_ms: u64,
        dirty_regions: impl IntoIterator<Item = u64>,
        assume_clean: bool,
        in_flight: &mut dyn FnMut(u64) -> bool,
    ) -> Vec<Command<H, V>> {
        assert!(self.queue.is_empty() && self.unacked.is_empty(), "a lost connection left nothing queued");
        self.connection += 1;
        self.next_sequence = 1;
        self.state = CopyState::Syncing;
        self.behind_while_syncing = false;
        self.ending = None;
        self.progress = false;
        self.last_sent_ms = now_ms;
        self.busy_since_ms = now_ms;
        self.last_ack_ms = now_ms;
        self.clean_flush_ms = 0;
        self.clean_gap_ms = 0;
        self.clean_put_off_ms = None;
        self.ack_seen = false;
        self.controller.connected(now_ms);
        self.resync_pending.clear_all();
        for region in dirty_regions {
            self.resync_pending.insert(region);
            self.exposed.insert(region);
        }
        let mut commands = Vec::new();
        if assume_clean {
            let mut skipped = Vec::new();
            let mut next = self.resync_pending.next_at_or_after(0);
            while let Some(region) = next {
                if !in_flight(region) {
                    skipped.push(region);
                }
                next = self.resync_pending.next_at_or_after(region + 1);
            }
            for &region in &skipped {
                self.resync_pending.remove(region);
                self.exposed.remove(region);
            }
            tracing::info!(
                copy = %self.config.name,
                skipped_bytes = skipped.len() as u64 * self.config.region_bytes,
                "--assume-clean: this volume and copy {}'s store both hold no data; no resync needed",
                self.config.name
            );
            if !skipped.is_empty() {
                commands.push(Command::ClearBits(skipped));
            }
        }
        self.start_resync_pass();
        commands
    }

    /// The connection is gone (or could not be served): record the copy
    /// stale, then release everything waiting on it. `why` is the cause when
    /// the connection left none (the first cause seen is kept as its ending).
    pub(crate) fn lost(&mut self, why: &str, shutting_down: bool) -> Vec<Command<H, V>> {
        if self.stopped_clean {
            return Vec::new();
        }
        let waiting = self.queue.len() + self.unacked.len();
        let was = self.state;
        // The writes lost with the queue never reach the copy: its image
        // follows every write only up to the oldest of them.
        if let (Some(since), Some(shipped)) = (self.up_to_date_ms, self.oldest_change_shipped_ms()) {
            self.up_to_date_ms = Some(since.min(shipped));
        }
        let why = self.ending.take().unwrap_or_else(|| why.to_string());
        let holds: Vec<H> = std::mem::take(&mut self.queue)
            .into_iter()
            .chain(std::mem::take(&mut self.unacked).into_iter().map(|unacked| unacked.frame))
            .filter_map(|frame| frame.hold)
            .collect();
        self.lag_bytes = 0;
        self.resync_bytes_outstanding = 0;
        self.resync_checks_outstanding = 0;
        self.resync_next = None;
        self.resync_reading = None;
        self.resync_partial = None;
        self.resync_pending.end_pass();
        self.behind_while_syncing = false;
        self.connection += 1;
        // The connection is gone with its unacknowledged flushes; the next
        // one resyncs every dirty region whole, so nothing prepared here clears.
        self.touched.clear();
        self.clear_candidates.clear();
        if shutting_down && was == CopyState::UpToDate && waiting == 0 && self.final_flush == Some(true) {
            // A clean stop (the frontend stopped first): the copy has every
            // write this host acknowledged and nothing is in flight, so its
            // record stays current (a planned handover promotes it).
            self.state = CopyState::Stale;
            self.stopped_clean = true;
            tracing::info!(copy = %self.config.name,
                "copy {} has every write at shutdown: its record stays current", self.config.name);
            return Vec::new();
        }
        // Invariant 3: the holds are released by `persisted`, after the
        // record, with EIO if it failed.
        self.persist(RecordedState::Stale, AfterPersist::Lost { holds, was, why, waiting, shutting_down })
    }

    /// The reader of `connection` saw it end for `why`. `copy_failed`: the
    /// copy host sent its Error frame (a full store, say) and will most
    /// likely fail the next connection too, whatever this one cleared: back
    /// off rather than redial at once.
    pub(crate) fn reader_ended(&mut self, connection: u64, why: String, copy_failed: bool) {
        if connection != self.connection {
            return;
        }
        // The first cause wins: the sender's (an ack timeout, say) when it
        // shut the socket down, which the reader then sees as closed.
        self.connection_failed(why);
        if copy_failed {
            self.progress = false;
        }
    }

    /// The shell carried out the [`Command::Persist`] asked for last.
    pub(crate) fn persisted(&mut self, result: Result<(), String>) -> Vec<Command<H, V>> {
        match self.persisting.take().expect("a persist was asked for") {
            AfterPersist::MissedWhileUnrecorded { hold } => self.missed_write_recorded(hold, result),
            AfterPersist::WentBehind { lag_bytes, age_ms } => {
                self.behind_recorded(lag_bytes, age_ms, result);
                Vec::new()
            }
            AfterPersist::Lost { holds, was, why, waiting, shutting_down } => {
                self.lost_recorded(holds, was, why, waiting, shutting_down, result)
            }
            AfterPersist::Repair { ranges } => self.repair_recorded(ranges, result),
            AfterPersist::Connecting { offered, recorded } => match result {
                Ok(()) => self.check_store(offered, recorded),
                Err(error) => self.not_connected(format!("cannot record the copy syncing: {error}")),
            },
            AfterPersist::StoreToken => match result {
                Ok(()) => Vec::new(),
                Err(error) => {
                    self.not_connected(format!("cannot record copy {}'s store token: {error}", self.config.name))
                }
            },
            AfterPersist::CaughtUp => self.caught_up_recorded(result),
            AfterPersist::Missed => {
                self.missed_recorded(result);
                Vec::new()
            }
            AfterPersist::PassDone => {
                self.pass_done_recorded(result);
                Vec::new()
            }
        }
    }

    /// A change shipped while the copy was not recorded stale: released once
    /// the copy is recorded stale. Invariant 3: a sync copy's missed write is
    /// not acknowledged until the copy is recorded stale.
    fn missed_write_recorded(&mut self, hold: Option<H>, result: Result<(), String>) -> Vec<Command<H, V>> {
        if result.is_err() {
            return release(hold, -libc::EIO);
        }
        self.state = CopyState::Stale;
        tracing::info!(copy = %self.config.name, "copy {} is recorded stale now; writes it misses are \
            acknowledged again and tracked in the bitmap", self.config.name);
        release(hold, 0)
    }

    fn behind_recorded(&self, lag_bytes: u64, age_ms: u64, result: Result<(), String>) {
        let name = &self.config.name;
        match result {
            Ok(()) => tracing::warn!(copy = %name, lag_bytes, lag_bytes_max = self.config.lag_bytes_max,
                oldest_write_ms = age_ms, lag_ms_max = self.config.lag_ms_max,
                "copy {name} is behind: past its lag bound ({lag_bytes} bytes unacknowledged, the oldest \
                 write {age_ms} ms ago); tracking its writes in the bitmap and resyncing it once it catches up"),
            // An async copy that misses writes still holds a consistent
            // (older) image; resyncing it is what must be recorded first.
            Err(error) => tracing::error!(copy = %name, %error, "cannot record the copy stale"),
        }
    }

    fn caught_up_recorded(&mut self, result: Result<(), String>) -> Vec<Command<H, V>> {
        let name = self.config.name.clone();
        if let Err(error) = result {
            tracing::error!(copy = %name, %error, "cannot record the copy syncing; dropping the connection");
            return self.close(format!("cannot record the copy syncing: {error}"));
        }
        tracing::info!(copy = %name, "copy {name} caught up with its queue; resyncing the writes it missed");
        self.state = CopyState::Syncing;
        self.start_resync_pass();
        Vec::new()
    }

    fn missed_recorded(&mut self, result: Result<(), String>) {
        if let Err(error) = result {
            tracing::error!(copy = %self.config.name, %error, "cannot record the copy syncing; dropping the connection");
            self.connection_failed(format!("cannot record the copy syncing: {error}"));
            return;
        }
        self.state = CopyState::Syncing;
        if self.resync_next.is_none() {
            self.start_resync_pass();
        } else {
            // The running pass may be past these regions: go round again.
            self.resync_next = Some(0);
        }
    }

    fn pass_done_recorded(&mut self, result: Result<(), String>) {
        let name = &self.config.name;
        if let Err(error) = result {
            tracing::error!(copy = %name, %error, "cannot record the copy current; resyncing again");
            self.start_resync_pass();
            return;
        }
        self.state = CopyState::UpToDate;
        self.exposed.clear_all();
        self.progress = true;
        self.last_error = None;
        tracing::info!(copy = %name, resync_bytes = self.resync_pending.bytes_done(), "copy {name} is up to date");
    }

    /// The lost connection's Persist(Stale) is done: only now are its held
    /// changes released, with EIO when the copy could not be recorded stale.
    fn lost_recorded(
        &mut self,
        holds: Vec<H>,
        was: CopyState,
        why: String,
        waiting: usize,
        shutting_down: bool,
        recorded: Result<(), String>,
    ) -> Vec<Command<H, V>> {
        let name = self.config.name.clone();
        self.state = if recorded.is_ok() { CopyState::Stale } else { CopyState::Unrecorded };
        match &recorded {
            Err(error) => {
                self.set_last_error(format!("{why}; recording the copy stale failed: {error}"));
                tracing::error!(copy = %name, %error, waiting,
                    "copy {name} disconnected ({why}) and cannot be recorded stale: {error}; writes it misses get EIO \
                     until the record succeeds");
            }
            Ok(()) if was == CopyState::Stale => {}
            Ok(()) if shutting_down => tracing::info!(copy = %name, waiting,
                "copy {name} recorded stale at shutdown: this host stops shipping to it, and the next start resyncs \
                 the regions its bitmap marks"),
            Ok(()) => {
                self.set_last_error(why.clone());
                tracing::warn!(copy = %name, waiting, "copy {name} disconnected ({why}); recorded stale; \
                    its writes are tracked in the bitmap until it reconnects");
            }
        }
        if holds.is_empty() {
            return Vec::new();
        }
        vec![Command::Release { holds, result: if recorded.is_ok() { 0 } else { -libc::EIO } }]
    }

    /// End the connection for `why` now (the sender's own decision).
    fn close(&mut self, why: String) -> Vec<Command<H, V>> {
        self.connection_failed(why);
        vec![Command::Close { why: self.ending.clone().expect("just set") }]
    }
}

/// The sender's tick: what to send, read or wait for next.
impl<H, V> LinkCore<H, V> {
    /// What the sender does now: send a batch (queued frames, a due Flush,
    /// resync data, a heartbeat), read the next resync range, record a
    /// behind copy syncing, wait, or close the connection.
    pub(crate) fn poll_send(&mut self, now_ms: u64) -> Vec<Command<H, V>> {
        let commands = self.next_for_sender(now_ms);
        self.sender_due_ms = match commands.as_slice() {
            [Command::Wait { ms }] => now_ms.saturating_add(*ms),
            _ => now_ms,
        };
        commands
    }

    /// The queued frames, for a writer to send itself while the link is
    /// idle: only those of an up-to-date sync copy with nothing
    /// unacknowledged, with nothing else for the sender to decide (no pass,
    /// persist, ending or final Flush), at most INLINE_BYTES_MAX of
    /// payload (a writer sends on its NBD connection's thread: a large
    /// write would hold its other requests), and never more than
    /// [`LinkCore::poll_send`] would send then. `None` leaves everything to
    /// the sender. A lone sync write waits on the copy, and waking the
    /// sender for it costs a tenth of a QD1 write on two busy virtual
    /// cores; under load the sender's batches are cheaper (one send for
    /// many writes), so a link with writes in flight keeps them.
    pub(crate) fn take_inline(&mut self, now_ms: u64) -> Option<Vec<Outgoing>> {
        // With nothing unacknowledged, the lag is the queue's payload.
        let idle = self.sync_link_settled()
            && self.unacked.is_empty()
            && self.lag_bytes <= INLINE_BYTES_MAX
            && !self.pass_mark
            && !self.queue.is_empty();
        idle.then(|| self.take_frames(now_ms))
    }

    /// An up-to-date sync copy with nothing for the sender to decide: no
    /// ending, persist, bitmap sync, final Flush or pass.
    fn sync_link_settled(&self) -> bool {
        self.config.mode == MirrorMode::Sync
            && self.state == CopyState::UpToDate
            && self.ending.is_none()
            && self.persisting.is_none()
            && self.syncing_bitmap.is_none()
            && self.final_flush.is_none()
            && self.resync_next.is_none()
    }

    fn next_for_sender(&mut self, now_ms: u64) -> Vec<Command<H, V>> {
        if std::mem::take(&mut self.ack_seen) {
            self.last_ack_ms = self.last_ack_ms.max(now_ms);
        }
        if self.state == CopyState::UpToDate && self.persisting.is_none() {
            self.up_to_date_ms = Some(now_ms);
        }
        if let Some(why) = &self.ending {
            return vec![Command::Close { why: why.clone() }];
        }
        if !self.queue.is_empty() {
            if let Some(ms) = self.coalescing_ms(now_ms) {
                return vec![Command::Wait { ms }];
            }
            return self.take_batch(now_ms);
        }
        if self.state == CopyState::Behind && self.unacked.is_empty() {
            if std::mem::take(&mut self.behind_while_syncing) {
                // Recorded syncing all along: the pass goes on, round
                // again for the regions dropped meanwhile.
                self.state = CopyState::Syncing;
                if self.resync_next.is_some() {
                    self.resync_next = Some(0);
                } else {
                    self.start_resync_pass();
                }
                return self.poll_send(now_ms);
            }
            // Resync data tears the copy's image: record it first.
            return self.persist(RecordedState::Syncing, AfterPersist::CaughtUp);
        }
        if let Some(unacked) = self.unacked.front() {
            let timeout_ms = ACK_TIMEOUT.as_millis() as u64;
            if self.config.mode == MirrorMode::Sync && now_ms.saturating_sub(unacked.sent_at_ms) > timeout_ms {
                let why = format!(
                    "ack timeout: the copy host left a {:?} frame (sequence {}) unacknowledged for over {} s \
                     (copy host hung, overloaded, or the link is down)",
                    unacked.frame.kind,
                    unacked.sequence,
                    ACK_TIMEOUT.as_secs()
                );
                return self.close(why);
            }
            // Later frames' acknowledgements may overtake a Flush (protocol
            // version 2): one at the front is judged by its own wait, so a
            // copy whose fsync hangs is still found out.
            let flush_waiting = unacked.frame.kind == FrameKind::Flush
                && now_ms.saturating_sub(unacked.sent_at_ms.max(self.front_since_ms)) > timeout_ms;
            let since = unacked.sent_at_ms.max(self.last_ack_ms);
            if self.config.mode == MirrorMode::Async && flush_waiting {
                let why = format!(
                    "ack timeout: the copy host left a Flush (sequence {}) unanswered for over {} s while it \
                     acknowledged later frames (its store's fsync hangs, or takes that long)",
                    unacked.sequence,
                    ACK_TIMEOUT.as_secs()
                );
                return self.close(why);
            }
            if self.config.mode == MirrorMode::Async && now_ms.saturating_sub(since) > timeout_ms {
                let why = format!(
                    "ack timeout: the copy host acknowledged nothing for over {} s with {} frame(s) outstanding \
                     (copy host hung, or the link is down)",
                    ACK_TIMEOUT.as_secs(),
                    self.unacked.len()
                );
                return self.close(why);
            }
        }
        if self.final_flush.is_some() {
            // The production role is stopping: its final Flush is the last
            // thing sent. A periodic flush or a heartbeat sent after it
            // would be in flight when the stop looks, and would cost the
            // copy its current record.
            return vec![Command::Wait { ms: CLEAN_INTERVAL.as_millis() as u64 / 2 }];
        }
        // Flush every CLEAN_INTERVAL, during a resync too, so bits clear as
        // their regions become durable on the copy; never while a Flush is
        // unacknowledged: the copy would wait for that one's fsync before it
        // started the next, and every frame behind it with it (on a busy
        // disk an fsync can take longer than the interval).
        let may_clear = !self.touched.is_empty() || !self.clear_candidates.is_empty();
        let flush_due = may_clear
            && now_ms.saturating_sub(self.last_flush_ms) >= self.clean_interval_ms(now_ms)
            && !self.unacked.iter().any(|unacked| unacked.frame.kind == FrameKind::Flush)
            && !self.clearing_put_off(now_ms);
        if flush_due {
            self.queue_flush(false, now_ms);
            return self.take_batch(now_ms);
        }
        if self.resync_next.is_some() && self.state != CopyState::Behind {
            if self.resync_may_send() {
                let pause_ms = self.resync_pause_ms(now_ms);
                if pause_ms > 0 {
                    return vec![Command::Wait { ms: pause_ms }];
                }
                return self.next_resync(now_ms);
            }
            self.controller.held_back();
        }
        if now_ms.saturating_sub(self.last_sent_ms) >= HEARTBEAT_INTERVAL.as_millis() as u64 {
            return self.take_batch(now_ms);
        }
        if self.config.mode == MirrorMode::Async
            && self.state == CopyState::UpToDate
            && now_ms.saturating_sub(self.last_sent_ms) < ASYNC_BUSY_MS
        {
            return vec![Command::Wait { ms: ASYNC_COALESCE_MS }];
        }
        vec![Command::Wait { ms: CLEAN_INTERVAL.as_millis() as u64 / 2 }]
    }

    /// How long the queued frames wait for more (ASYNC_COALESCE_MS), or
    /// `None` when they go now: a sync copy's at once (writers wait on
    /// them), and an async copy's once a batch is full, once the first has
    /// waited long enough, while it is not up to date (resync and catching
    /// up go at full pace), and when the final Flush of a stop is queued.
    fn coalescing_ms(&self, now_ms: u64) -> Option<u64> {
        if self.config.mode != MirrorMode::Async || self.state != CopyState::UpToDate || self.final_flush.is_some() {
            return None;
        }
        // (The length first: a queue behind a slow link may be long.)
        if self.queue.len() >= SEND_BATCH_FRAMES
            || self.queue.iter().map(|frame| frame.lag).sum::<u64>() >= ASYNC_BATCH_BYTES
        {
            return None;
        }
        let due_ms = self.queue.front()?.shipped_at_ms.saturating_add(ASYNC_COALESCE_MS);
        (now_ms < due_ms).then(|| due_ms - now_ms)
    }

    /// Whether the sender must be woken after a writer queued a change:
    /// unless the queued frames wait for more and the sender looks at them
    /// by the time their wait ends anyway (it is busy now, or waiting no
    /// longer than that). A writer so spares a wake-up per change.
    pub(crate) fn sender_needed(&self, now_ms: u64) -> bool {
        match (self.coalescing_ms(now_ms), self.queue.front()) {
            (Some(_), Some(first)) => self.sender_due_ms > first.shipped_at_ms.saturating_add(ASYNC_COALESCE_MS),
            _ => true,
        }
    }

    /// Whether acknowledgements just taken may concern a thread waiting on
    /// the link: a writer held back by the lag before them
    /// (`held_back`), the stop's final Flush, or a sender with more to do
    /// than its next timed look (a Flush acknowledged, `flush_acked`, after
    /// which the next periodic one may be due; a pass, a persist, frames
    /// queued, a copy not up to date, an async copy, whose timeouts count
    /// from the acknowledgements the sender has seen). Else waking the
    /// sender after every acknowledgement of an up-to-date sync copy only
    /// has it look and wait again: a wake-up of a thread per write, on
    /// cores the write's own path needs.
    pub(crate) fn acks_concern_waiters(&self, held_back: bool, flush_acked: bool) -> bool {
        held_back || flush_acked || !self.sync_link_settled() || !self.queue.is_empty()
    }

    /// Whether frames wait in the queue.
    pub(crate) fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Up to SEND_BATCH_FRAMES queued frames (a heartbeat when none is
    /// queued: it keeps the path checked), numbered and moved to `unacked`.
    fn take_batch(&mut self, now_ms: u64) -> Vec<Command<H, V>> {
        vec![Command::Send { frames: self.take_frames(now_ms) }]
    }

    fn take_frames(&mut self, now_ms: u64) -> Vec<Outgoing> {
        let mut frames = Vec::new();
        if self.queue.is_empty() {
            frames.push(self.outgoing_heartbeat());
        }
        while frames.len() < SEND_BATCH_FRAMES {
            let Some(mut frame) = self.queue.pop_front() else { break };
            let sequence = self.take_sequence();
            frames.push(Outgoing {
                kind: frame.kind,
                flags: frame.flags,
                sequence,
                offset: frame.offset,
                length: frame.length,
                payload: frame.payload.take(),
            });
            self.unacked.push_back(Unacked { sequence, sent_at_ms: now_ms, frame });
        }
        self.busy_since_ms = self.busy_since(now_ms);
        self.last_sent_ms = now_ms;
        frames
    }

    fn outgoing_heartbeat(&mut self) -> Outgoing {
        let sequence = self.take_sequence();
        Outgoing { kind: FrameKind::Heartbeat, flags: FrameFlags::NONE, sequence, offset: 0, length: 0, payload: None }
    }

    fn take_sequence(&mut self) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence = sequence.checked_add(1).expect("a session never sends 2^64 frames");
        sequence
    }

    /// Whether the resync may read and queue more: while the writes (at
    /// least the share kept for them) and resync in flight are under the
    /// controller's window (writes first: resync fills what they leave),
    /// and always when no resync is in flight, so a resync progresses
    /// under any load.
    fn resync_may_send(&self) -> bool {
        let writes = self.lag_bytes.max(self.controller.writes_reserve_bytes());
        self.resync_bytes_outstanding == 0 || writes + self.resync_bytes_outstanding < self.controller.window_bytes()
    }

    /// How long resync must wait to stay under `resync_rate_max`.
    fn resync_pause_ms(&mut self, now_ms: u64) -> u64 {
        let rate = self.config.resync_rate_max;
        if rate == 0 {
            return 0;
        }
        let started_ms = *self.resync_started_ms.get_or_insert(now_ms);
        let due_ms =
            u64::try_from((u128::from(self.resync_sent_bytes) * 1000).div_ceil(u128::from(rate))).unwrap_or(u64::MAX);
        due_ms.saturating_sub(now_ms.saturating_sub(started_ms))
    }

    /// Ask for the next dirty range's data (or, in a checksum pass, its
    /// checksums), or queue the pass's closing Flush, or wait for checksum
    /// answers. The shell reads under the link lock, so no write to the
    /// range is shipped between the read (or the hole lookup) and the
    /// queueing.
    fn next_resync(&mut self, now_ms: u64) -> Vec<Command<H, V>> {
        let next = self.resync_next.expect("a pass is running");
        let Some(region) = self.resync_pending.next_at_or_after(next) else {
            if self.resync_checks_outstanding > 0 {
                // A checksum answer may still queue data; end the pass after it.
                return vec![Command::Wait { ms: CHECKSUM_ANSWER_WAIT.as_millis() as u64 }];
            }
            self.resync_next = None;
            self.queue_flush(true, now_ms);
            return self.take_batch(now_ms);
        };
        // A read is what the window overshoots by, and what a write queued
        // right behind it waits for on the link: at most RESYNC_FRAME_BYTES
        // and an eighth of the window (at least RESYNC_READ_MIN_BYTES).
        // Adjacent dirty regions travel together; a larger region goes in
        // parts.
        let region_bytes = self.config.region_bytes;
        let read_bytes_max = RESYNC_FRAME_BYTES.min(self.controller.window_bytes() / 8).max(RESYNC_READ_MIN_BYTES);
        let region_start = region * region_bytes;
        let region_end = (region_start + region_bytes).min(self.config.volume_bytes);
        if let Some(mask) =
            self.resync_pending.parts_of(region).filter(|_| self.resync_pending.part_bytes() <= RESYNC_FRAME_BYTES)
        {
            // Pending in parts: the first run of them, as one read (at least
            // one part, at most RESYNC_FRAME_BYTES). A part larger than
            // that, of a region over 64 MiB, is read with its region whole,
            // a read at a time, below.
            let part_bytes = self.resync_pending.part_bytes();
            let first = u64::from(mask.trailing_zeros());
            let run = u64::from((!(mask >> first)).trailing_zeros()).min((read_bytes_max / part_bytes).max(1));
            let taken = (u64::MAX >> (64 - run)) << first;
            let offset = region_start + first * part_bytes;
            let length = (run * part_bytes).min(region_end - offset);
            self.resync_reading = Some(ResyncReading::Parts { region, mask: taken });
            return vec![Command::ReadForResync { offset, length, read: ResyncRead::Pieces }];
        }
        let within = match self.resync_partial {
            Some((partial, within)) if partial == region => within,
            _ => 0,
        };
        let (offset, end, length) = if within > 0 || read_bytes_max < region_end - region_start {
            let offset = region_start + within;
            (offset, region + 1, read_bytes_max.min(region_end - offset))
        } else {
            let regions_max = (read_bytes_max / region_bytes).max(1);
            let mut end = region + 1;
            while end < self.region_count() && end - region < regions_max && self.resync_pending.contains_whole(end) {
                end += 1;
            }
            (region_start, end, (end * region_bytes).min(self.config.volume_bytes) - region_start)
        };
        self.resync_reading = Some(ResyncReading::Regions { region, end });
        let read = if self.config.resync_checksums { ResyncRead::Checksums } else { ResyncRead::Pieces };
        vec![Command::ReadForResync { offset, length, read }]
    }

    /// The shell read `length` bytes at `offset` for a
    /// [`Command::ReadForResync`]: queue what it read. A failed read ends the
    /// connection.
    pub(crate) fn resync_read(
        &mut self,
        offset: u64,
        length: u64,
        result: Result<ResyncReadDone, String>,
    ) -> Vec<Command<H, V>> {
        let done = match result {
            Ok(done) => done,
            Err(error) => {
                tracing::error!(copy = %self.config.name, %error, "resync cannot read the local volume; dropping the connection");
                self.connection_failed(format!("resync cannot read the local volume: {error}"));
                return Vec::new();
            }
        };
        if self.ending.is_some() {
            // An earlier read of the same answer failed; the connection ends.
            return Vec::new();
        }
        let cost = match done {
            ResyncReadDone::Data(data) => {
                // Touched again: no Flush queued before this data may clear it.
                self.touched.extend(self.regions(offset, length));
                self.resync_bytes_outstanding += length;
                self.queue.push_back(Frame::resync_data(offset, data));
                return Vec::new();
            }
            ResyncReadDone::Checksums(checksums) => {
                self.resync_checks_outstanding += 1;
                self.queue.push_back(Frame {
                    lag: length,
                    resync: true,
                    resync_check: Some(checksums),
                    ..Frame::new(FrameKind::ChecksumRequest, offset, length)
                });
                length
            }
            ResyncReadDone::Pieces(pieces) => {
                let mut cost = 0;
                for piece in pieces {
                    let frame = match piece {
                        Piece::Zeroes { offset, length } => Frame::resync_zeroes(offset, length),
                        Piece::Data { offset, data } => Frame::resync_data(offset, data),
                    };
                    cost += frame.lag;
                    self.queue.push_back(frame);
                }
                cost
            }
        };
        self.resync_bytes_outstanding += cost;
        self.resync_sent_bytes += length;
        let (region, end) = match self.resync_reading.take().expect("a pass read was asked for") {
            ResyncReading::Regions { region, end } => (region, end),
            ResyncReading::Parts { region, mask } => {
                self.touched.insert(region);
                self.resync_pending.take_parts(region, mask);
                self.resync_next = Some(region);
                return Vec::new();
            }
        };
        self.touched.extend(region..end);
        let regions_end = (end * self.config.region_bytes).min(self.config.volume_bytes);
        if offset + length < regions_end {
            // A part of a region: it stays pending until its last part.
            self.resync_partial = Some((region, offset + length - region * self.config.region_bytes));
            self.resync_next = Some(region);
        } else {
            self.resync_partial = None;
            self.resync_pending.take(region..end);
            self.resync_next = Some(end);
        }
        Vec::new()
    }

    /// How long after the last Flush the next one for clearing is due:
    /// CLEAN_INTERVAL, or while frames keep going out, CLEAN_FLUSH_SPACING
    /// times what the last one took the copy (at most the spacing limit).
    fn clean_interval_ms(&self, now_ms: u64) -> u64 {
        let base = CLEAN_INTERVAL.as_millis() as u64;
        if self.link_quiet(now_ms) {
            return base;
        }
        self.clean_flush_ms.saturating_mul(CLEAN_FLUSH_SPACING).min(self.spacing_limit_ms()).max(base)
    }

    /// Whether a clearing Flush due by the clock waits (see
    /// CLEAN_YIELD_FRACTION): writes rewrote all but a few of the regions
    /// it would clear, the link is busy, and the last Flush is recent
    /// enough. Counted once per CLEAN_INTERVAL while put off.
    fn clearing_put_off(&mut self, now_ms: u64) -> bool {
        let base = CLEAN_INTERVAL.as_millis() as u64;
        let since_ms = now_ms.saturating_sub(self.last_flush_ms);
        if self.clear_candidates.is_empty() || self.link_quiet(now_ms) || since_ms >= self.spacing_limit_ms() {
            return false;
        }
        if self.clean_put_off_ms.is_some_and(|put_off| now_ms.saturating_sub(put_off) < base) {
            return true;
        }
        let needed = self.clear_candidates.len().div_ceil(CLEAN_YIELD_FRACTION);
        let clearable = self
            .clear_candidates
            .iter()
            .filter(|&&(region, _)| !self.touched.contains(&region) && !self.resync_pending.contains(region))
            .take(needed)
            .count();
        let put_off = clearable < needed;
        self.clean_put_off_ms = put_off.then_some(now_ms);
        put_off
    }

    /// Whether nothing went out for CLEAN_INTERVAL: clearing goes back to
    /// its base interval, and nothing is put off.
    fn link_quiet(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_sent_ms) >= CLEAN_INTERVAL.as_millis() as u64
    }

    /// When the link became busy, for frames going out at `now_ms`: now,
    /// after it was quiet for longer than CLEAN_INTERVAL.
    fn busy_since(&self, now_ms: u64) -> u64 {
        if now_ms.saturating_sub(self.last_sent_ms) > CLEAN_INTERVAL.as_millis() as u64 {
            now_ms
        } else {
            self.busy_since_ms
        }
    }

    /// The spacing limit: how long after the last Flush the next one for
    /// clearing may wait while the link is busy (CLEAN_FLUSH_SPACING).
    fn spacing_limit_ms(&self) -> u64 {
        let most = CLEAN_INTERVAL_MAX.as_millis() as u64;
        if self.clean_flush_ms == 0 {
            return most;
        }
        let budget = CLEAN_FLUSH_BUDGET.as_millis() as u64;
        let least = CLEAN_SPACING_FLOOR.as_millis() as u64;
        (self.clean_gap_ms.saturating_mul(budget) / self.clean_flush_ms).clamp(least, most)
    }

    fn queue_flush(&mut self, ends_resync: bool, now_ms: u64) {
        let snapshot = self.take_snapshot(now_ms);
        // The pass's closing flush tells the copy its image is whole again,
        // unless a change it missed is still waiting for the next pass.
        let synced = ends_resync && self.state == CopyState::Syncing && self.resync_pending.len() == 0;
        self.queue.push_back(Frame {
            flags: if synced { FrameFlags::SYNCED } else { FrameFlags::NONE },
            ends_resync: ends_resync.then_some(self.resync_pass),
            snapshot: Some(snapshot),
            ..Frame::new(FrameKind::Flush, 0, 0)
        });
    }
}

/// The reader's events: acknowledgements, in order but for a Flush, which
/// later ones may overtake (`take_acked`).
impl<H, V> LinkCore<H, V> {
    /// The copy acknowledged `sequence` with `kind` on `connection` (an
    /// acknowledgement of an older connection changes nothing). `payload`
    /// is a ChecksumReply's checksums. `in_flight` says whether a region
    /// has a write in flight; the shell keeps what it read locked until the
    /// commands are carried out. An acknowledgement out of order or of the
    /// wrong kind is a protocol error: the shell ends the connection.
    pub(crate) fn acked(
        &mut self,
        connection: u64,
        kind: FrameKind,
        sequence: u64,
        payload: Vec<u8>,
        now_ms: u64,
        in_flight: &mut dyn FnMut(u64) -> bool,
    ) -> Result<Vec<Command<H, V>>, ReplicationError> {
        if connection != self.connection {
            return Ok(Vec::new());
        }
        // A Flush at the front is timed from when it got there (below).
        let front_since_ms = self.front_since_ms;
        let Unacked { sent_at_ms, frame: acked, .. } = self.take_acked(kind, sequence, now_ms)?;
        self.ack_seen = true;
        if acked.final_flush && self.final_flush == Some(false) && self.queue.is_empty() && self.unacked.is_empty() {
            self.final_flush = Some(true);
        }
        if matches!(acked.kind, FrameKind::Write | FrameKind::ResyncData) && acked.lag > 0 {
            // Data frames time the link (frames of zeroes, flushes and
            // checksums mostly time the copy's store).
            self.controller.acked(now_ms, sent_at_ms, acked.lag);
        }
        if acked.resync {
            self.resync_bytes_outstanding = self
                .resync_bytes_outstanding
                .checked_sub(acked.lag)
                .expect("resync bytes outstanding never go below 0");
        } else {
            self.lag_bytes = self.lag_bytes.checked_sub(acked.lag).expect("lag bytes never go below 0");
        }
        // The clearing decision read the in-flight table, which the shell
        // keeps locked until the ClearBits is carried out: it comes first,
        // so nothing else (a client's answer, say) runs under that lock.
        let mut commands = Vec::new();
        // (Acknowledgements of an older connection never get here, and a
        // lost connection forgets the candidates, so every snapshot is current.)
        if let Some(snapshot) = acked.snapshot {
            self.clean_flush_ms = now_ms.saturating_sub(sent_at_ms.max(front_since_ms));
            self.clean_gap_ms = snapshot.gap_ms;
            let cleared = self.clear_after_flush(snapshot, in_flight);
            if !cleared.is_empty() {
                self.progress = true;
                commands.push(Command::ClearBits(cleared));
            }
        }
        commands.extend(release(acked.hold, 0));
        if let Some(local) = &acked.resync_check {
            // A checksum-pass answer: the chunks that differ are read now,
            // under the link lock, so they carry every write shipped before.
            self.resync_checks_outstanding -= 1;
            let (offset, length) = (acked.offset, u64::from(acked.length));
            for (start, length) in crate::verify::mismatches(offset, length, local, &payload) {
                // Touched again: no Flush queued before this data may clear it.
                self.touched.extend(self.regions(start, length));
                commands.push(Command::ReadForResync { offset: start, length, read: ResyncRead::Data });
            }
        }
        if let Some(reply) = acked.reply {
            commands.push(Command::AnswerVerify { reply, checksums: payload });
        }
        if acked.ends_resync == Some(self.resync_pass) && self.state == CopyState::Syncing && self.resync_next.is_none()
        {
            if self.resync_pending.len() == 0 {
                commands.extend(self.persist(RecordedState::Current, AfterPersist::PassDone));
            } else {
                // Regions were added after the closing Flush went out without
                // a new pass (a repair whose marks could not be synced, a
                // missed change whose syncing record failed): the copy may
                // lack them, so it is not current; another pass sends them.
                self.start_resync_pass();
            }
        }
        Ok(commands)
    }

    /// The unacknowledged frame that `kind` and `sequence` acknowledge: a
    /// FlushAck the oldest frame, which must be a Flush; any other reply the
    /// oldest frame that is not a Flush, since a copy's replies may overtake
    /// a Flush whose fsync runs (protocol version 2, `applier.rs`) but
    /// nothing else, and a Flush is answered only after every frame before it.
    fn take_acked(&mut self, kind: FrameKind, sequence: u64, now_ms: u64) -> Result<Unacked<H, V>, ReplicationError> {
        let position = match kind {
            FrameKind::FlushAck => Some(0).filter(|_| !self.unacked.is_empty()),
            _ => self.unacked.iter().position(|unacked| unacked.frame.kind != FrameKind::Flush),
        };
        let Some(expected) = position.and_then(|position| self.unacked.get(position)) else {
            return Err(ReplicationError::Protocol {
                message: format!("{kind:?} for sequence {sequence} acknowledges nothing that was sent"),
            });
        };
        let expected_kind = match expected.frame.kind {
            FrameKind::Flush => FrameKind::FlushAck,
            FrameKind::ChecksumRequest => FrameKind::ChecksumReply,
            _ => FrameKind::WriteAck,
        };
        if expected.sequence != sequence || kind != expected_kind {
            return Err(ReplicationError::Protocol {
                message: format!(
                    "{kind:?} for sequence {sequence} arrived, but the oldest unacknowledged frame it may answer is \
                     {:?} sequence {}",
                    expected.frame.kind, expected.sequence
                ),
            });
        }
        let position = position.expect("found above");
        if position == 0 {
            self.front_since_ms = now_ms;
        }
        Ok(self.unacked.remove(position).expect("position exists"))
    }

    /// Of `regions`, those the activity log keeps until a clean close.
    fn retained_by_log(&self, regions: &[u64]) -> Vec<bool> {
        match &self.config.bitmap {
            Some(bitmap) if !regions.is_empty() => bitmap.retained_by_log(regions),
            _ => vec![false; regions.len()],
        }
    }

    /// The clearing rule (invariant 6) at a Flush's acknowledgement: which
    /// candidates clear now. Every change to a candidate was shipped before
    /// the previous Flush, which the copy has acknowledged. A candidate
    /// touched since (this snapshot, `touched`), with a write in flight or
    /// waiting for a resync pass stops being one; the others are cleared if
    /// a local sync that started after their snapshot has completed, or if
    /// the activity log keeps their extents until a clean close (a volume
    /// that fits in the log: `WriteIntentBitmap::retained_by_log`), or stay
    /// candidates for the next one. This snapshot's regions are the next
    /// candidates.
    fn clear_after_flush(&mut self, snapshot: Snapshot, in_flight: &mut dyn FnMut(u64) -> bool) -> Vec<u64> {
        let Snapshot { regions, mark, .. } = snapshot;
        let candidates = std::mem::take(&mut self.clear_candidates);
        let mut cleared = Vec::new();
        let mut quiet = Vec::new();
        if !candidates.is_empty() {
            let synced = self.config.local_sync.completed();
            let recent: HashSet<u64> = regions.iter().copied().collect();
            for (region, candidate_mark) in candidates {
                if recent.contains(&region)
                    || self.touched.contains(&region)
                    || self.resync_pending.contains(region)
                    || in_flight(region)
                {
                    continue;
                }
                if synced > candidate_mark {
                    cleared.push(region);
                } else {
                    quiet.push((region, candidate_mark));
                }
            }
        }
        // Not yet durable here, but kept by the activity log until a clean
        // close (which syncs the volume first): a crash before then sets
        // them dirty again, so they clear now too.
        if !quiet.is_empty() {
            let waiting: Vec<u64> = quiet.iter().map(|&(region, _)| region).collect();
            let retained = self.retained_by_log(&waiting);
            let mut index = 0;
            quiet.retain(|&(region, _)| {
                let kept = retained[index];
                index += 1;
                if kept {
                    cleared.push(region);
                }
                !kept
            });
        }
        self.clear_candidates = regions.into_iter().map(|region| (region, mark)).collect();
        self.clear_candidates.extend(quiet);
        cleared
    }
}

/// Resync and write bytes in flight at most: an async copy's resync stays
/// well inside its lag bound, so application writes never push it behind.
fn resync_window_max(config: &CoreConfig) -> u64 {
    match config.mode {
        MirrorMode::Sync => RESYNC_WINDOW_BYTES,
        MirrorMode::Async => RESYNC_WINDOW_BYTES.min(config.lag_bytes_max / 2).max(1),
    }
}

#[cfg(test)]
#[path = "link_core_tests.rs"]
mod tests;
