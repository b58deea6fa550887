//! The link core driven by hand, event by event, with the exact commands it
//! must return: no sockets, no threads, no clock. Holds are write ids (u64),
//! verifiers ids too.

use super::*;
use crate::replicator::resync_controller::WINDOW_MIN_BYTES;

/// Regions of the least resync read (64 KiB), which is what the initial
/// window lets a read take: reads are region by region.
const REGION: u64 = RESYNC_READ_MIN_BYTES;
const REGIONS: u64 = 16;
const WRITE: [u8; 4096] = [7; 4096];
/// The copy store's token, the one recorded for it.
const STORE: StoreToken = [1; 16];
/// The flush interval in the core's milliseconds.
const CLEAN_MS: u64 = 500;

type TestCore = LinkCore<u64, u64>;
type TestCommand = Command<u64, u64>;

fn core(mode: MirrorMode, lag_bytes_max: u64) -> TestCore {
    LinkCore::new(core_config(mode, lag_bytes_max))
}

fn core_config(mode: MirrorMode, lag_bytes_max: u64) -> CoreConfig {
    CoreConfig {
        name: "east".to_string(),
        mode,
        lag_bytes_max,
        lag_ms_max: 0,
        region_bytes: REGION,
        volume_bytes: REGIONS * REGION,
        local_sync_interval_ms: 0,
        local_sync: Arc::new(LocalSync::immediate()),
        bitmap: None,
        resync_rate_max: 0,
        resync_checksums: false,
    }
}

fn nothing_in_flight() -> impl FnMut(u64) -> bool {
    |_| false
}

fn write_at(region: u64) -> Change<'static> {
    Change::Write { offset: region * REGION + 4096, data: &WRITE, fua: false }
}

fn ship(core: &mut TestCore, region: u64, hold: Option<u64>, now_ms: u64) -> Vec<TestCommand> {
    core.ship(&write_at(region), &mut None, hold, 0, now_ms)
}

/// The frame the core sends for a write shipped by [`ship`].
fn write_frame(sequence: u64, region: u64) -> Outgoing {
    Outgoing {
        kind: FrameKind::Write,
        flags: FrameFlags::NONE,
        sequence,
        offset: region * REGION + 4096,
        length: WRITE.len() as u32,
        payload: Some(Arc::new(WRITE.to_vec())),
    }
}

fn flush_frame(sequence: u64, flags: FrameFlags) -> Outgoing {
    Outgoing { kind: FrameKind::Flush, flags, sequence, offset: 0, length: 0, payload: None }
}

fn zeroes_frame(sequence: u64, region: u64) -> Outgoing {
    Outgoing {
        kind: FrameKind::ResyncZeroes,
        flags: FrameFlags::NONE,
        sequence,
        offset: region * REGION,
        length: REGION as u32,
        payload: None,
    }
}

/// A change a connected copy did not get is resynced in the parts it
/// touched: the 4 KiB part of `region` that [`ship`]'s write covers (a
/// region here is 64 KiB, so a part is 4 KiB).
const PART: (u64, u64) = (4096, 4096);

/// The pass's read of the part of `region` at `within` (bytes into it).
fn read_part(region: u64, (within, length): (u64, u64)) -> Vec<TestCommand> {
    vec![Command::ReadForResync { offset: region * REGION + within, length, read: ResyncRead::Pieces }]
}

/// The shell's read of that part, all zeroes.
fn zeroes_part_read(region: u64, (within, length): (u64, u64)) -> Result<ResyncReadDone, String> {
    Ok(ResyncReadDone::Pieces(vec![Piece::Zeroes { offset: region * REGION + within, length }]))
}

/// The frame that carries it.
fn zeroes_part_frame(sequence: u64, region: u64, (within, length): (u64, u64)) -> Outgoing {
    Outgoing { offset: region * REGION + within, length: length as u32, ..zeroes_frame(sequence, region) }
}

/// `poll_send`, which must ask for a local sync (carried out at once here).
fn poll_syncing(core: &mut TestCore, now_ms: u64) -> Vec<TestCommand> {
    let before = core.config.local_sync.started();
    let commands = core.poll_send(now_ms);
    assert_eq!(core.config.local_sync.started(), before + 1, "a local sync was asked for");
    commands
}

/// A write to `region` held as `hold`, shipped at time 0, sent as frame
/// `sequence` and acknowledged: its hold is released.
fn write_acked(core: &mut TestCore, region: u64, hold: u64, sequence: u64) {
    assert_eq!(ship(core, region, Some(hold), 0), vec![]);
    assert_eq!(core.poll_send(0), send(vec![write_frame(sequence, region)]));
    assert_eq!(
        ack(core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![hold], result: 0 }]
    );
}

/// The kind and sequence of each frame the commands send.
fn frames_sent(commands: Vec<TestCommand>) -> Vec<(FrameKind, u64)> {
    let mut sent = Vec::new();
    for command in commands {
        if let Command::Send { frames } = command {
            sent.extend(frames.iter().map(|frame| (frame.kind, frame.sequence)));
        }
    }
    sent
}

/// [`write_acked`] at `now_ms`.
fn write_acked_at(core: &mut TestCore, region: u64, hold: u64, sequence: u64, now_ms: u64) {
    assert_eq!(ship(core, region, Some(hold), now_ms), vec![]);
    assert_eq!(frames_sent(core.poll_send(now_ms)), vec![(FrameKind::Write, sequence)]);
    assert_eq!(
        ack(core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![hold], result: 0 }]
    );
}

fn send(frames: Vec<Outgoing>) -> Vec<TestCommand> {
    vec![Command::Send { frames }]
}

fn read_region(region: u64) -> Vec<TestCommand> {
    vec![Command::ReadForResync { offset: region * REGION, length: REGION, read: ResyncRead::Pieces }]
}

/// The shell's read of a region that holds only zeroes.
fn zeroes_read(region: u64) -> Result<ResyncReadDone, String> {
    Ok(ResyncReadDone::Pieces(vec![Piece::Zeroes { offset: region * REGION, length: REGION }]))
}

fn ack(
    core: &mut TestCore,
    kind: FrameKind,
    sequence: u64,
    in_flight: &mut dyn FnMut(u64) -> bool,
) -> Vec<TestCommand> {
    ack_at(core, kind, sequence, 0, in_flight)
}

/// [`ack`] at the core's time `now_ms`.
fn ack_at(
    core: &mut TestCore,
    kind: FrameKind,
    sequence: u64,
    now_ms: u64,
    in_flight: &mut dyn FnMut(u64) -> bool,
) -> Vec<TestCommand> {
    let connection = core.connection();
    core.acked(connection, kind, sequence, Vec::new(), now_ms, in_flight).expect("an acknowledgement in order")
}

/// Connect with `dirty` regions: recorded syncing first, then the pass.
fn connect(core: &mut TestCore, dirty: &[u64], now_ms: u64) {
    assert_eq!(core.connecting(STORE, STORE), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.connected(now_ms, dirty.iter().copied(), false, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.state(), CopyState::Syncing);
}

/// Connect with nothing dirty, and take the copy up to date: the pass is
/// only its closing Flush (sequence 1), acknowledged and recorded current.
fn up_to_date(mode: MirrorMode, lag_bytes_max: u64) -> TestCore {
    brought_up_to_date(core(mode, lag_bytes_max))
}

/// [`up_to_date`] for a core made otherwise.
fn brought_up_to_date(mut core: TestCore) -> TestCore {
    connect(&mut core, &[], 0);
    assert_eq!(core.poll_send(0), send(vec![flush_frame(1, FrameFlags::SYNCED)]));
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 1, &mut nothing_in_flight()),
        vec![Command::Persist(RecordedState::Current)]
    );
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.state(), CopyState::UpToDate);
    core
}

/// A sync copy up to date, region 2 written (write 2, hold 7): the first
/// Flush (3) took it as its snapshot and is acknowledged, and the second
/// (4), which may clear it, is sent after a local sync was asked for.
fn clearing_flush_sent() -> TestCore {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked(&mut core, 2, 7, 2);
    // The first Flush takes region 2 as its snapshot: nothing can clear yet.
    assert_eq!(core.poll_send(CLEAN_MS), send(vec![flush_frame(3, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    // The second may clear region 2: the local volume is fsynced first.
    assert_eq!(poll_syncing(&mut core, 2 * CLEAN_MS), send(vec![flush_frame(4, FrameFlags::NONE)]));
    core
}

/// Invariant 6 with a write in flight: a region whose write is acknowledged
/// becomes a clear candidate at the next Flush and would clear at the one
/// after (the local volume fsynced first), but not while another write to
/// it is in flight; once that write is shipped, the region must stay quiet
/// through two more Flushes before its bit clears.
#[test]
fn a_bit_never_clears_while_a_write_to_its_region_is_in_flight() {
    let mut core = clearing_flush_sent();
    // A second write to region 2 is marked and in flight (not shipped yet).
    let mut region_2_in_flight = |region| region == 2;
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 4, &mut region_2_in_flight), vec![], "a region in flight cleared");
    // The write is shipped and acknowledged; two quiet Flushes later the bit clears.
    assert_eq!(ship(&mut core, 2, Some(8), 2 * CLEAN_MS), vec![]);
    assert_eq!(core.poll_send(2 * CLEAN_MS), send(vec![write_frame(5, 2)]));
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 5, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![8], result: 0 }]
    );
    assert_eq!(core.poll_send(3 * CLEAN_MS), send(vec![flush_frame(6, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 6, &mut nothing_in_flight()), vec![]);
    assert_eq!(poll_syncing(&mut core, 4 * CLEAN_MS), send(vec![flush_frame(7, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 7, &mut nothing_in_flight()), vec![Command::ClearBits(vec![2])]);
    assert!(core.progress(), "a cleared bit is progress");
}

/// A lost acknowledgement: the connection goes away with the clearing Flush
/// unacknowledged. Nothing clears — not by the late ack of the old
/// connection, not by the first Flush of the next one — and the next
/// connection resyncs the region whole.
#[test]
fn a_flush_ack_lost_with_its_connection_clears_nothing() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked(&mut core, 3, 1, 2);
    assert_eq!(core.poll_send(CLEAN_MS), send(vec![flush_frame(3, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    assert_eq!(poll_syncing(&mut core, 2 * CLEAN_MS), send(vec![flush_frame(4, FrameFlags::NONE)]));
    let old_connection = core.connection();
    assert_eq!(core.lost("the copy host closed the connection", false), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.state(), CopyState::Stale);
    assert_eq!(core.last_error().map(String::as_str), Some("the copy host closed the connection"));
    let late = core.acked(old_connection, FrameKind::FlushAck, 4, Vec::new(), 2 * CLEAN_MS, &mut nothing_in_flight());
    assert_eq!(late.expect("an old connection's ack is ignored"), vec![], "a lost connection's flush cleared a bit");
    // The bit is still set: the next connection resyncs region 3 whole, and
    // its first Flushes clear nothing (the candidates were forgotten).
    let now_ms = 2 * CLEAN_MS + 10;
    connect(&mut core, &[3], now_ms);
    assert_eq!(core.poll_send(now_ms), read_region(3));
    assert_eq!(core.resync_read(3 * REGION, REGION, zeroes_read(3)), vec![]);
    assert_eq!(core.poll_send(now_ms), send(vec![zeroes_frame(1, 3)]));
    assert_eq!(core.poll_send(now_ms), send(vec![flush_frame(2, FrameFlags::SYNCED)]));
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 1, &mut nothing_in_flight()), vec![]);
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 2, &mut nothing_in_flight()),
        vec![Command::Persist(RecordedState::Current)]
    );
}

/// A reconnect in the middle of a resync pass: every dirty region is
/// pending again, the one already sent too, and the new pass sends them
/// all from the first, numbered from 1 on the new connection.
#[test]
fn a_reconnect_mid_resync_makes_every_dirty_region_pending_again() {
    let mut core = core(MirrorMode::Sync, 0);
    connect(&mut core, &[1, 4, 9], 0);
    assert_eq!(core.resync_pending().bytes(), 3 * REGION);
    assert_eq!(core.poll_send(0), read_region(1));
    assert_eq!(core.resync_read(REGION, REGION, zeroes_read(1)), vec![]);
    assert_eq!(core.poll_send(0), send(vec![zeroes_frame(1, 1)]));
    assert_eq!(core.poll_send(0), read_region(4));
    assert_eq!(core.resync_pending().bytes(), 2 * REGION);
    assert_eq!(core.lost("ack timeout", false), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    // The bitmap still marks all three: none was cleared.
    connect(&mut core, &[1, 4, 9], 10);
    assert_eq!(core.resync_pending().bytes(), 3 * REGION, "the regions sent before the reconnect are pending again");
    let mut sent = Vec::new();
    for region in [1, 4, 9] {
        assert_eq!(core.poll_send(10), read_region(region));
        assert_eq!(core.resync_read(region * REGION, REGION, zeroes_read(region)), vec![]);
        sent.push(core.poll_send(10));
    }
    assert_eq!(sent, [send(vec![zeroes_frame(1, 1)]), send(vec![zeroes_frame(2, 4)]), send(vec![zeroes_frame(3, 9)])]);
    assert_eq!(core.poll_send(10), send(vec![flush_frame(4, FrameFlags::SYNCED)]));
}

/// An async copy over its lag bound goes behind: it is recorded stale, the
/// writes it cannot take are dropped (no frame) with their regions kept for
/// resync, and once what it was sent is acknowledged it is recorded syncing
/// and a pass sends exactly the dropped regions.
#[test]
fn an_async_copy_going_behind_drops_writes_keeps_their_regions_and_resyncs_after_draining() {
    let mut core = up_to_date(MirrorMode::Async, 2 * WRITE.len() as u64);
    assert_eq!(ship(&mut core, 1, None, 0), vec![]);
    assert_eq!(ship(&mut core, 2, None, 0), vec![]);
    assert_eq!(core.lag_bytes(), 2 * WRITE.len() as u64);
    assert_eq!(ship(&mut core, 5, None, 0), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.state(), CopyState::Behind);
    assert_eq!(ship(&mut core, 6, None, 0), vec![], "a behind copy drops the write without a new record");
    assert_eq!(core.poll_send(0), send(vec![write_frame(2, 1), write_frame(3, 2)]));
    // Still behind with writes unacknowledged: nothing to do but wait.
    assert_eq!(core.poll_send(0), vec![Command::Wait { ms: CLEAN_MS / 2 }]);
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 2, &mut nothing_in_flight()), vec![]);
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 3, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.poll_send(1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.state(), CopyState::Syncing);
    assert_eq!(core.resync_pending().bytes(), 2 * PART.1, "only the dropped writes' parts are pending");
    assert_eq!(core.poll_send(1), read_part(5, PART));
    assert_eq!(core.resync_read(5 * REGION + PART.0, PART.1, zeroes_part_read(5, PART)), vec![]);
    assert_eq!(core.poll_send(1), send(vec![zeroes_part_frame(4, 5, PART)]));
    // The resync window of an async copy is half its lag bound: one region
    // at a time here.
    assert_eq!(core.poll_send(1), vec![Command::Wait { ms: CLEAN_MS / 2 }]);
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 4, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.poll_send(1), read_part(6, PART));
    assert_eq!(core.resync_read(6 * REGION + PART.0, PART.1, zeroes_part_read(6, PART)), vec![]);
    assert_eq!(core.poll_send(1), send(vec![zeroes_part_frame(5, 6, PART)]));
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 5, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.poll_send(1), send(vec![flush_frame(6, FrameFlags::SYNCED)]));
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 6, &mut nothing_in_flight()),
        vec![Command::Persist(RecordedState::Current)]
    );
}

/// An async copy already syncing that passes its lag bound goes behind
/// with nothing recorded (its record says syncing already, and its image is
/// torn anyway): the write is dropped, the pass pauses until the queue has
/// drained, then goes on and sends the dropped writes' regions. (It used
/// to record the copy stale, then syncing again, two durable records in a
/// writer's path, several times a second while writes outran the link.)
#[test]
fn a_syncing_async_copy_past_its_lag_bound_is_behind_unrecorded_then_resyncs_the_write() {
    let mut core = core(MirrorMode::Async, 2 * WRITE.len() as u64);
    connect(&mut core, &[3], 0);
    // The pass is past region 3 when the writes come.
    assert_eq!(core.poll_send(0), read_region(3));
    assert_eq!(core.resync_read(3 * REGION, REGION, zeroes_read(3)), vec![]);
    assert_eq!(ship(&mut core, 1, None, 0), vec![]);
    assert_eq!(ship(&mut core, 2, None, 0), vec![]);
    assert_eq!(ship(&mut core, 0, None, 0), vec![], "no record: the copy is recorded syncing already");
    assert_eq!(core.state(), CopyState::Behind);
    assert_eq!(ship(&mut core, 8, None, 0), vec![], "dropped while behind");
    assert_eq!(core.poll_send(0), send(vec![zeroes_frame(1, 3), write_frame(2, 1), write_frame(3, 2)]));
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 1, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.poll_send(0), vec![Command::Wait { ms: CLEAN_MS / 2 }], "the pass waits for the queue");
    for sequence in 2..=3 {
        assert_eq!(ack(&mut core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()), vec![]);
    }
    // Syncing again, with no record; the pass goes round again for region
    // 0, which it had passed, and on to region 8.
    for (sequence, region) in [(4, 0), (5, 8)] {
        assert_eq!(core.poll_send(1), read_part(region, PART), "the dropped write's part is in the pass");
        assert_eq!(core.state(), CopyState::Syncing);
        assert_eq!(core.resync_read(region * REGION + PART.0, PART.1, zeroes_part_read(region, PART)), vec![]);
        assert_eq!(core.poll_send(1), send(vec![zeroes_part_frame(sequence, region, PART)]));
        assert_eq!(ack(&mut core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()), vec![]);
    }
    assert_eq!(core.poll_send(1), send(vec![flush_frame(6, FrameFlags::SYNCED)]));
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 6, &mut nothing_in_flight()),
        vec![Command::Persist(RecordedState::Current)]
    );
}

/// The lag bound in time: an async copy whose oldest unacknowledged write
/// is older than `lag_ms_max` goes behind, however few bytes it lags by
/// (on a slow link a small queue is already seconds of link time).
#[test]
fn an_async_copy_whose_oldest_write_waits_past_lag_ms_max_goes_behind() {
    let mut core = up_to_date(MirrorMode::Async, 64 << 20);
    core.config.lag_ms_max = 1_000;
    assert_eq!(ship(&mut core, 1, None, 100), vec![]);
    assert_eq!(core.poll_send(100 + ASYNC_COALESCE_MS), send(vec![write_frame(2, 1)]));
    assert_eq!(ship(&mut core, 2, None, 1_100), vec![], "1000 ms old: at the bound, not past it");
    assert_eq!(core.state(), CopyState::UpToDate);
    assert_eq!(ship(&mut core, 3, None, 1_101), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.state(), CopyState::Behind);
    assert_eq!(core.lag_bytes(), 2 * WRITE.len() as u64, "far under lag_bytes_max");
}

/// A sync copy lost with writes waiting (sent and queued): it is recorded
/// stale first, and only then are the writes released, with success.
#[test]
fn a_lost_sync_copy_is_recorded_stale_before_its_waiting_writes_are_released() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut core, 1, Some(1), 0), vec![]);
    assert_eq!(ship(&mut core, 2, Some(2), 0), vec![]);
    assert_eq!(core.poll_send(0), send(vec![write_frame(2, 1), write_frame(3, 2)]));
    assert_eq!(ship(&mut core, 3, Some(3), 0), vec![]);
    assert_eq!(
        core.lost("the copy host closed the connection", false),
        vec![Command::Persist(RecordedState::Stale)],
        "released before the record"
    );
    assert_eq!(core.persisted(Ok(())), vec![Command::Release { holds: vec![3, 1, 2], result: 0 }]);
    assert_eq!(core.state(), CopyState::Stale);
    assert_eq!(ship(&mut core, 4, Some(4), 0), vec![Command::Release { holds: vec![4], result: 0 }]);
}

/// When the lost sync copy cannot be recorded stale, its waiting writes get
/// EIO, and so does every later write it misses, each after another try to
/// record it, until a record succeeds.
#[test]
fn a_lost_sync_copy_that_cannot_be_recorded_stale_fails_its_writes_with_eio() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut core, 1, Some(1), 0), vec![]);
    assert_eq!(core.poll_send(0), send(vec![write_frame(2, 1)]));
    assert_eq!(core.lost("ack timeout", false), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(
        core.persisted(Err("disk full".to_string())),
        vec![Command::Release { holds: vec![1], result: -libc::EIO }]
    );
    assert_eq!(core.state(), CopyState::Unrecorded);
    assert_eq!(core.last_error().map(String::as_str), Some("ack timeout; recording the copy stale failed: disk full"));
    assert_eq!(ship(&mut core, 2, Some(2), 0), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(
        core.persisted(Err("disk full".to_string())),
        vec![Command::Release { holds: vec![2], result: -libc::EIO }]
    );
    assert_eq!(ship(&mut core, 3, Some(3), 0), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::Release { holds: vec![3], result: 0 }]);
    assert_eq!(core.state(), CopyState::Stale);
}

/// A frame left unacknowledged past ACK_TIMEOUT ends the connection, and
/// the reason is kept; an acknowledgement out of order is a protocol error.
#[test]
fn an_ack_timeout_closes_and_an_ack_out_of_order_is_refused() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut core, 1, Some(1), 0), vec![]);
    assert_eq!(ship(&mut core, 2, Some(2), 0), vec![]);
    assert_eq!(core.poll_send(0), send(vec![write_frame(2, 1), write_frame(3, 2)]));
    let connection = core.connection();
    let refused = core.acked(connection, FrameKind::WriteAck, 3, Vec::new(), 0, &mut nothing_in_flight());
    assert!(matches!(refused, Err(ReplicationError::Protocol { .. })), "{refused:?}");
    let timeout_ms = ACK_TIMEOUT.as_millis() as u64 + 1;
    let why = "ack timeout: the copy host left a Write frame (sequence 2) unacknowledged for over 5 s (copy host \
               hung, overloaded, or the link is down)";
    assert_eq!(core.poll_send(timeout_ms), vec![Command::Close { why: why.to_string() }]);
    assert_eq!(core.lost("the connection ended", false), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::Release { holds: vec![1, 2], result: 0 }]);
    assert_eq!(core.last_error().map(String::as_str), Some(why));
}

/// A copy's replies may overtake a Flush whose fsync runs (protocol version
/// 2): a write sent after the Flush is released at its WriteAck, and the
/// FlushAck that comes later still clears what it covers. Nothing else may
/// be overtaken: a WriteAck past an unacknowledged write, and a FlushAck
/// before a write sent ahead of the Flush is acknowledged, are refused.
#[test]
fn replies_may_overtake_a_flush_and_nothing_else() {
    // The clearing Flush (4), then two writes (5 and 6) behind it.
    let mut core = clearing_flush_sent();
    assert_eq!(ship(&mut core, 5, Some(8), 2 * CLEAN_MS), vec![]);
    assert_eq!(ship(&mut core, 6, Some(9), 2 * CLEAN_MS), vec![]);
    assert_eq!(core.poll_send(2 * CLEAN_MS), send(vec![write_frame(5, 5), write_frame(6, 6)]));
    let connection = core.connection();
    let refused = core.acked(connection, FrameKind::WriteAck, 6, Vec::new(), 0, &mut nothing_in_flight());
    assert!(matches!(refused, Err(ReplicationError::Protocol { .. })), "write 6 overtook write 5: {refused:?}");
    // Write 5 overtakes Flush 4: its client is answered before the fsync ends.
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 5, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![8], result: 0 }]
    );
    // The Flush's answer still clears region 2, which nothing touched since.
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 4, &mut nothing_in_flight()), vec![Command::ClearBits(vec![2])]);
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 6, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![9], result: 0 }]
    );
    // A Flush sent after an unacknowledged write is not answered before it.
    assert_eq!(ship(&mut core, 3, Some(10), 3 * CLEAN_MS), vec![]);
    let mut sent = frames_sent(core.poll_send(3 * CLEAN_MS));
    sent.extend(frames_sent(core.poll_send(4 * CLEAN_MS)));
    assert_eq!(sent, vec![(FrameKind::Write, 7), (FrameKind::Flush, 8)]);
    let connection = core.connection();
    let refused = core.acked(connection, FrameKind::FlushAck, 8, Vec::new(), 0, &mut nothing_in_flight());
    assert!(matches!(refused, Err(ReplicationError::Protocol { .. })), "the flush overtook write 7: {refused:?}");
}

/// The periodic Flush waits for the one before it: a copy host starts a
/// Flush's fsync only after the previous fsync ended, and every frame
/// behind the second Flush would wait with it.
#[test]
fn a_periodic_flush_waits_until_the_one_before_is_acknowledged() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked(&mut core, 2, 7, 2);
    assert_eq!(frames_sent(core.poll_send(CLEAN_MS)), vec![(FrameKind::Flush, 3)]);
    write_acked_at(&mut core, 4, 8, 4, 2 * CLEAN_MS);
    // Due by the clock, but Flush 3 is still running on the copy host.
    assert_eq!(frames_sent(core.poll_send(3 * CLEAN_MS)), vec![]);
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    assert_eq!(frames_sent(core.poll_send(3 * CLEAN_MS)), vec![(FrameKind::Flush, 5)]);
}

/// A Flush for clearing holds every write behind it on the copy while its
/// disk writes back. While writes keep the link busy, the next one waits
/// CLEAN_FLUSH_SPACING times as long as the last one took the copy (150 ms
/// here: 1.5 s), but no longer than would make the next take about
/// CLEAN_FLUSH_BUDGET if Flushes took time in proportion to the time
/// before them (750 ms after 1.5 s: 2.5 s, not 7.5). A Flush is timed from
/// when it reached the front of what the copy owes: the writes before it
/// do not count. Once the link was quiet for CLEAN_INTERVAL, the next goes
/// CLEAN_INTERVAL after the last, as before. (The writes change regions
/// between Flushes, so that each Flush has bits to clear.)
#[test]
fn a_slow_clearing_flush_spaces_the_next_while_writes_keep_coming() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked_at(&mut core, 2, 7, 2, 0);
    // The Flush due at `sent_ms`, acknowledged `took_ms` later.
    let flush_taking = |core: &mut TestCore, sent_ms: u64, took_ms: u64, sequence: &mut u64| {
        assert_eq!(frames_sent(core.poll_send(sent_ms)), vec![(FrameKind::Flush, *sequence)], "at {sent_ms} ms");
        ack_at(core, FrameKind::FlushAck, *sequence, sent_ms + took_ms, &mut nothing_in_flight());
        *sequence += 1;
    };
    // A write to `region` every 100 ms until `due_ms`, and between them no
    // Flush.
    let writes_until = |core: &mut TestCore, region: u64, from_ms: u64, due_ms: u64, sequence: &mut u64| {
        for now_ms in (from_ms..due_ms).step_by(100) {
            write_acked_at(core, region, 100 + *sequence, *sequence, now_ms);
            *sequence += 1;
            assert_eq!(frames_sent(core.poll_send(now_ms + 99)), vec![], "a Flush before {due_ms} ms");
        }
    };
    // Sent behind a write that the copy acknowledges 300 ms later: the
    // Flush took 150 ms from there, not 450.
    assert_eq!(ship(&mut core, 4, Some(1), CLEAN_MS), vec![]);
    assert_eq!(frames_sent(core.poll_send(CLEAN_MS)), vec![(FrameKind::Write, 3)]);
    assert_eq!(frames_sent(core.poll_send(CLEAN_MS)), vec![(FrameKind::Flush, 4)]);
    ack_at(&mut core, FrameKind::WriteAck, 3, CLEAN_MS + 300, &mut nothing_in_flight());
    ack_at(&mut core, FrameKind::FlushAck, 4, CLEAN_MS + 450, &mut nothing_in_flight());
    let mut sequence = 5;
    writes_until(&mut core, 5, CLEAN_MS + 500, CLEAN_MS + 1500, &mut sequence);
    // That one takes 750 ms, 1.5 s after the last: the next is due 2.5 s
    // after it was sent, not 7.5.
    flush_taking(&mut core, CLEAN_MS + 1500, 750, &mut sequence);
    writes_until(&mut core, 4, CLEAN_MS + 2300, CLEAN_MS + 4000, &mut sequence);
    flush_taking(&mut core, CLEAN_MS + 4000, 750, &mut sequence);
    // A last write, then quiet: the next Flush is due CLEAN_INTERVAL after
    // the last one was sent, once the link was quiet for CLEAN_INTERVAL.
    write_acked_at(&mut core, 5, 3, sequence, CLEAN_MS + 4800);
    sequence += 1;
    assert_eq!(frames_sent(core.poll_send(CLEAN_MS + 4800 + CLEAN_MS - 1)), vec![], "the link was busy");
    flush_taking(&mut core, CLEAN_MS + 4800 + CLEAN_MS, 10, &mut sequence);
}

/// The flush budget counts the time the link was busy before a Flush, not
/// the quiet before it: after a minute of quiet, a burst's first Flush
/// that takes 1 s makes the next wait the floor of 2 s, not 10 (were the
/// minute counted, the budget would allow far more than 10 s). And a Flush
/// that takes 1.5 s after 1 s of writing does not bring the next under
/// CLEAN_SPACING_FLOOR (the budget alone would allow 0.83 s): a Flush that
/// costs the same whatever came before it must not run back to back.
#[test]
fn the_flush_budget_counts_busy_time_and_keeps_a_floor() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    let mut sequence = 2;
    write_acked_at(&mut core, 2, 100, sequence, 0);
    sequence += 1;
    // Region 2 clears over two quick Flushes; then the link is quiet.
    for (sent_ms, cleared) in [(CLEAN_MS, vec![]), (2 * CLEAN_MS, vec![Command::ClearBits(vec![2])])] {
        assert_eq!(frames_sent(core.poll_send(sent_ms)), vec![(FrameKind::Flush, sequence)]);
        assert_eq!(ack_at(&mut core, FrameKind::FlushAck, sequence, sent_ms + 10, &mut nothing_in_flight()), cleared);
        sequence += 1;
    }
    // A minute later a burst: a Flush follows its first write at once,
    // and the copy takes 990 ms over it once the write is acknowledged.
    let burst_ms = 60_000;
    assert_eq!(ship(&mut core, 4, Some(1), burst_ms), vec![]);
    assert_eq!(frames_sent(core.poll_send(burst_ms)), vec![(FrameKind::Write, sequence)]);
    assert_eq!(frames_sent(core.poll_send(burst_ms)), vec![(FrameKind::Flush, sequence + 1)]);
    ack_at(&mut core, FrameKind::WriteAck, sequence, burst_ms + 10, &mut nothing_in_flight());
    ack_at(&mut core, FrameKind::FlushAck, sequence + 1, burst_ms + 1000, &mut nothing_in_flight());
    sequence += 2;
    // Writes every 100 ms (acknowledged at once; a Flush outstanding is
    // acknowledged at its time) from `from_ms`, and no Flush before
    // `due_ms`; then the Flush, taking `took_ms`.
    let mut outstanding: Option<(u64, u64)> = None;
    let mut writes_then_flush = |core: &mut TestCore, region: u64, from_ms: u64, due_ms: u64, took_ms: u64| {
        for now_ms in (from_ms..due_ms).step_by(100) {
            if let Some((flush, ack_ms)) = outstanding.filter(|&(_, ack_ms)| ack_ms <= now_ms) {
                ack_at(core, FrameKind::FlushAck, flush, ack_ms, &mut nothing_in_flight());
                outstanding = None;
            }
            write_acked_at(core, region, 100 + sequence, sequence, now_ms);
            sequence += 1;
            assert_eq!(frames_sent(core.poll_send(now_ms + 99)), vec![], "a Flush before {due_ms} ms");
        }
        assert_eq!(frames_sent(core.poll_send(due_ms)), vec![(FrameKind::Flush, sequence)], "at {due_ms} ms");
        outstanding = Some((sequence, due_ms + took_ms));
        sequence += 1;
    };
    // Due 2 s after the burst's first Flush, not 9.9 s.
    writes_then_flush(&mut core, 5, burst_ms + 1000, burst_ms + 2000, 1500);
    // That one took 1.5 s after 1 s of writing: the next is due 2 s after
    // it, not 0.83 s.
    writes_then_flush(&mut core, 4, burst_ms + 2100, burst_ms + 4000, 10);
}

/// A clearing Flush whose candidates writes have all rewritten since would
/// clear nothing and still stop the copy's disk while it writes back: it
/// waits while the link stays busy, up to CLEAN_INTERVAL_MAX after the last
/// one, or less after a slow one (a Flush of 2.5 s after 10 s: 5 s, the
/// time that would make the next one take CLEAN_FLUSH_BUDGET). It goes at
/// the usual time once one candidate in CLEAN_YIELD_FRACTION could clear,
/// or once the link was quiet for CLEAN_INTERVAL.
#[test]
fn a_clearing_flush_that_would_clear_nothing_waits_while_writes_rewrite_its_regions() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    let mut sequence = 2;
    // Writes to `regions`, each acknowledged, every 100 ms from `from_ms`
    // until `until_ms`; no Flush goes meanwhile.
    let rewrites = |core: &mut TestCore, regions: &[u64], from_ms: u64, until_ms: u64, sequence: &mut u64| {
        for now_ms in (from_ms..until_ms).step_by(100) {
            for &region in regions {
                write_acked_at(core, region, 100 + *sequence, *sequence, now_ms);
                *sequence += 1;
            }
            assert_eq!(frames_sent(core.poll_send(now_ms + 99)), vec![], "a Flush before {until_ms} ms");
        }
    };
    let flush_taking = |core: &mut TestCore, sent_ms: u64, took_ms: u64, sequence: &mut u64| {
        assert_eq!(frames_sent(core.poll_send(sent_ms)), vec![(FrameKind::Flush, *sequence)], "at {sent_ms} ms");
        let mut commands = ack_at(core, FrameKind::FlushAck, *sequence, sent_ms + took_ms, &mut nothing_in_flight());
        *sequence += 1;
        for command in &mut commands {
            if let Command::ClearBits(regions) = command {
                regions.sort_unstable();
            }
        }
        commands
    };
    let all: Vec<u64> = (1..=8).collect();
    rewrites(&mut core, &all, 0, CLEAN_MS, &mut sequence);
    // Regions 1 to 8 become the candidates; the Flush took 10 ms.
    assert_eq!(flush_taking(&mut core, CLEAN_MS, 10, &mut sequence), vec![]);
    // Rewritten every 100 ms: no Flush at 1 s, nor at 2 s, but 10 s after
    // the last one.
    rewrites(&mut core, &all, CLEAN_MS + 100, CLEAN_MS + 10_000, &mut sequence);
    assert_eq!(flush_taking(&mut core, CLEAN_MS + 10_000, 2_500, &mut sequence), vec![]);
    // That one took 2.5 s after 10 s: the next waits 5 s, not 10.
    rewrites(&mut core, &all, CLEAN_MS + 10_100, CLEAN_MS + 15_000, &mut sequence);
    assert_eq!(flush_taking(&mut core, CLEAN_MS + 15_000, 10, &mut sequence), vec![]);
    // Only region 1 rewritten now: seven of the eight candidates could
    // clear, and the next Flush is due CLEAN_INTERVAL after the last.
    rewrites(&mut core, &[1], CLEAN_MS + 15_100, 2 * CLEAN_MS + 15_000, &mut sequence);
    assert_eq!(
        flush_taking(&mut core, 2 * CLEAN_MS + 15_000, 10, &mut sequence),
        vec![Command::ClearBits(vec![2, 3, 4, 5, 6, 7, 8])]
    );
    // Region 1 alone, rewritten: put off again, until the link is quiet
    // for CLEAN_INTERVAL; then it goes and the one after clears region 1.
    rewrites(&mut core, &[1], 2 * CLEAN_MS + 15_100, 2 * CLEAN_MS + 18_000, &mut sequence);
    let last_write_ms = 2 * CLEAN_MS + 17_900;
    assert_eq!(frames_sent(core.poll_send(last_write_ms + CLEAN_MS - 1)), vec![], "the link was busy");
    assert_eq!(flush_taking(&mut core, last_write_ms + CLEAN_MS, 10, &mut sequence), vec![]);
    assert_eq!(
        flush_taking(&mut core, last_write_ms + 2 * CLEAN_MS, 10, &mut sequence),
        vec![Command::ClearBits(vec![1])]
    );
}

/// `--assume-clean`: dirty regions need no resync when both stores hold no
/// data, except one with a write in flight, which keeps its bit.
#[test]
fn assume_clean_keeps_the_regions_in_flight() {
    let mut core = core(MirrorMode::Sync, 0);
    assert_eq!(core.connecting(STORE, STORE), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    let mut region_4_in_flight = |region| region == 4;
    assert_eq!(core.connected(0, [1, 4, 9], true, &mut region_4_in_flight), vec![Command::ClearBits(vec![1, 9])]);
    assert_eq!(core.poll_send(0), read_region(4));
}

/// A region the copy may lack whole (a change it could not get) keeps its
/// bit even when a later write to part of it is acknowledged and two Flushes
/// pass: only the resync pass, which sends it whole, takes it out. (A region
/// cleared because a partial write to it was acknowledged lost a write once.)
#[test]
fn a_partial_write_does_not_clear_a_region_waiting_for_resync() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut core, 5, Some(1), 0), vec![]);
    // The local store changed in region 5 in a way no frame carries.
    assert_eq!(core.missed(5 * REGION, 512), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.poll_send(0), send(vec![write_frame(2, 5)]));
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 2, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![1], result: 0 }]
    );
    // A due Flush goes before the pass's next read.
    assert_eq!(core.poll_send(CLEAN_MS), send(vec![flush_frame(3, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    assert_eq!(poll_syncing(&mut core, 2 * CLEAN_MS), send(vec![flush_frame(4, FrameFlags::NONE)]));
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 4, &mut nothing_in_flight()),
        vec![],
        "a region pending resync cleared"
    );
    assert_eq!(core.poll_send(2 * CLEAN_MS), read_part(5, (0, 4096)), "the part the failed write touched");
}

/// A change the copy missed while connected is resynced in the parts of
/// its region it touched (a 64th of a region, at least 4 KiB: 4 KiB here):
/// adjacent parts in one read, the next run in another; a part missed again
/// after the pass took it goes again; the region leaves the pending set
/// with its last part, and the pass's counts follow the parts.
#[test]
fn a_missed_change_is_resynced_in_the_parts_it_touched() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    // Region 3: bytes 4..12 KiB (two adjacent parts) and one byte at 40 KiB.
    assert_eq!(core.missed(3 * REGION + 4096, 8192), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.missed(3 * REGION + 40 * 1024 + 100, 1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!((core.resync_pending().bytes(), core.resync_pending().region_bytes()), (3 * 4096, REGION));
    assert_eq!(core.poll_send(0), read_part(3, (4096, 8192)), "adjacent parts in one read");
    assert_eq!(core.resync_read(3 * REGION + 4096, 8192, zeroes_part_read(3, (4096, 8192))), vec![]);
    assert!(core.resync_pending().contains(3), "the region left the pending set before its last part");
    // Missed again after the pass took it: that part goes again.
    assert_eq!(core.missed(3 * REGION + 8192, 1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.poll_send(0), send(vec![zeroes_part_frame(2, 3, (4096, 8192))]));
    assert_eq!(core.poll_send(0), read_part(3, (8192, 4096)), "the part missed again, first in the region");
    assert_eq!(core.resync_read(3 * REGION + 8192, 4096, zeroes_part_read(3, (8192, 4096))), vec![]);
    assert_eq!(core.poll_send(0), send(vec![zeroes_part_frame(3, 3, (8192, 4096))]));
    assert_eq!(core.poll_send(0), read_part(3, (40 << 10, 4096)));
    assert_eq!(core.resync_read(3 * REGION + (40 << 10), 4096, zeroes_part_read(3, (40 << 10, 4096))), vec![]);
    assert!(!core.resync_pending().contains(3), "the region stayed pending after its last part");
    assert_eq!(core.resync_pending().bytes_done(), core.resync_pending().bytes_total());
    assert_eq!(core.poll_send(0), send(vec![zeroes_part_frame(4, 3, (40 << 10, 4096))]));
    for sequence in 2..=4 {
        assert_eq!(ack(&mut core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()), vec![]);
    }
    assert_eq!(core.poll_send(0), send(vec![flush_frame(5, FrameFlags::SYNCED)]));
}

/// What is pending whole stays whole: a region dirty when the connection
/// began is resynced whole even if a change missed later touches only a
/// part of it; parts learned on a connection are forgotten when it is lost
/// (the next one resyncs every dirty region whole: the copy may have lost
/// what it acknowledged but had not flushed); and a checksum pass, which
/// compares whole regions, gets whole regions.
#[test]
fn parts_never_shrink_what_is_pending_whole() {
    let mut core = core(MirrorMode::Sync, 0);
    connect(&mut core, &[3], 0);
    assert_eq!(core.missed(3 * REGION + 4096, 1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.poll_send(0), read_region(3), "dirty at the connection: whole");

    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(core.missed(5 * REGION + 4096, 1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.resync_pending().bytes(), 4096);
    assert_eq!(core.lost("the copy host went away", false), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    connect(&mut core, &[], 0);
    assert_eq!((core.resync_pending().bytes(), core.resync_pending().parts_of(5)), (0, None));
    assert_eq!(core.lost("the copy host went away again", false), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    connect(&mut core, &[5], 0);
    assert_eq!(core.poll_send(0), read_region(5), "parts do not outlive their connection");

    let mut core = LinkCore::new(CoreConfig { resync_checksums: true, ..core_config(MirrorMode::Sync, 0) });
    connect(&mut core, &[], 0);
    assert_eq!(core.missed(6 * REGION + 4096, 1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(
        core.poll_send(0),
        vec![Command::ReadForResync { offset: 6 * REGION, length: REGION, read: ResyncRead::Checksums }]
    );
}

/// A part larger than a resync frame (a region of 128 MiB has parts of 2
/// MiB; a read is at most 1 MiB, less on a young connection's window) is
/// not read in one go: its region is read whole, a read at a time.
#[test]
fn a_part_larger_than_a_read_is_read_with_its_region_a_read_at_a_time() {
    const BIG: u64 = 128 << 20;
    let config = CoreConfig { region_bytes: BIG, volume_bytes: 4 * BIG, ..core_config(MirrorMode::Sync, 0) };
    let mut core = brought_up_to_date(LinkCore::new(config));
    assert_eq!(core.missed(BIG + 4096, 1), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    assert_eq!(core.resync_pending().bytes(), 2 << 20, "one part of 2 MiB pending");
    let commands = core.poll_send(0);
    assert!(
        matches!(commands[..], [Command::ReadForResync { offset: BIG, length, read: ResyncRead::Pieces }]
            if length <= RESYNC_FRAME_BYTES),
        "the region's first read, at most {RESYNC_FRAME_BYTES} bytes: {commands:?}"
    );
}

/// Invariant 9: a copy store with another token than the one recorded (a
/// replaced store) gets every bit set, durably, before its token is
/// recorded; when the bits cannot be made durable, the token is not
/// recorded and the connection is not served.
#[test]
fn a_replaced_copy_store_gets_every_bit_set_durably_before_its_token_is_recorded() {
    let replaced: StoreToken = [2; 16];
    let mut core = core(MirrorMode::Sync, 0);
    assert_eq!(core.connecting(replaced, STORE), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::SetAllBits, Command::SyncBitmap]);
    assert_eq!(core.bitmap_synced(Ok(())), vec![Command::PersistStoreToken(replaced)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    // A copy that offers no token gets the full resync, and no token is recorded.
    assert_eq!(core.connecting(STORE_TOKEN_UNKNOWN, STORE), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::SetAllBits, Command::SyncBitmap]);
    assert_eq!(core.bitmap_synced(Ok(())), vec![]);
    // The bits cannot be made durable: the token stays, the connection ends.
    assert_eq!(core.connecting(replaced, STORE), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::SetAllBits, Command::SyncBitmap]);
    let why = "cannot mark copy east for a full resync: no space left on device".to_string();
    assert_eq!(
        core.bitmap_synced(Err("no space left on device".to_string())),
        vec![Command::Close { why: why.clone() }]
    );
    assert_eq!(core.last_error(), Some(&why));
}

/// A repair records the copy syncing, then marks the ranges durably, then
/// resyncs them; the ranges' regions never clear in between. When the
/// record fails nothing is marked, and the repair says why.
#[test]
fn a_repair_is_recorded_and_marked_durably_before_its_pass() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    let ranges = vec![(7 * REGION + 4096, 4096)];
    assert_eq!(core.repair(ranges.clone()), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::SetBits(ranges.clone()), Command::SyncBitmap]);
    assert_eq!(core.bitmap_synced(Ok(())), vec![Command::RepairStarted(Ok(()))]);
    assert_eq!(core.state(), CopyState::Syncing);
    assert_eq!(core.poll_send(0), read_part(7, PART), "the range verify found differing");
    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(core.repair(ranges), vec![Command::Persist(RecordedState::Syncing)]);
    let why = "cannot record copy east syncing: read-only file system".to_string();
    assert_eq!(core.persisted(Err("read-only file system".to_string())), vec![Command::RepairStarted(Err(why))]);
    assert_eq!(core.state(), CopyState::UpToDate);
}

/// A client's Flush to a sync copy that is also the Flush a clear waits
/// for: its acknowledgement clears the bit first, then releases the
/// client's hold, so the shell can let go of the in-flight table it locked
/// for the clearing decision before anything else runs.
#[test]
fn a_clearing_flush_clears_before_it_releases_its_hold() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked(&mut core, 2, 7, 2);
    assert_eq!(core.poll_send(CLEAN_MS), send(vec![flush_frame(3, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.ship(&Change::Flush, &mut None, Some(9), 0, 2 * CLEAN_MS), vec![]);
    assert_eq!(core.config.local_sync.started(), 1, "the client's Flush asks for a local sync");
    assert_eq!(core.poll_send(2 * CLEAN_MS), send(vec![flush_frame(4, FrameFlags::NONE)]));
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 4, &mut nothing_in_flight()),
        vec![Command::ClearBits(vec![2]), Command::Release { holds: vec![9], result: 0 }]
    );
}

/// Invariant 6 with the local syncs in the background: a Flush that may
/// clear bits asks for a local sync and goes out at once, and a candidate
/// clears only at an acknowledgement after a sync that started after its
/// snapshot has completed: not on a sync that started before it (the
/// region's writes may have completed after that sync began), and not while
/// the covering sync still runs.
#[test]
fn a_bit_clears_only_once_a_local_sync_started_after_its_snapshot_completed() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    let local = Arc::new(LocalSync::new());
    core.config.local_sync = local.clone();
    write_acked(&mut core, 2, 7, 2);
    // A sync (another link's, say) starts before region 2's snapshot.
    assert!(local.request_after(local.started()));
    let early = local.start_requested().expect("asked for");
    assert_eq!(core.poll_send(CLEAN_MS), send(vec![flush_frame(3, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    local.complete(early);
    // Flush 4 may clear region 2: it asks for a sync and does not wait.
    assert_eq!(core.poll_send(2 * CLEAN_MS), send(vec![flush_frame(4, FrameFlags::NONE)]));
    assert_eq!(
        ack(&mut core, FrameKind::FlushAck, 4, &mut nothing_in_flight()),
        vec![],
        "the early sync covers nothing"
    );
    let covering = local.start_requested().expect("flush 4 asked for a sync");
    assert_eq!(core.poll_send(3 * CLEAN_MS), send(vec![flush_frame(5, FrameFlags::NONE)]));
    assert_eq!(local.start_requested(), None, "the running sync covers the candidates: no other is asked for");
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 5, &mut nothing_in_flight()), vec![], "the sync still runs");
    local.complete(covering);
    assert_eq!(core.poll_send(4 * CLEAN_MS), send(vec![flush_frame(6, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 6, &mut nothing_in_flight()), vec![Command::ClearBits(vec![2])]);
}

/// Invariant 6 in the activity log's form: a candidate whose extent the
/// log keeps until a clean close (the log holds the whole volume, and the
/// extent is durably logged) clears at the acknowledgement without a local
/// sync, and asks for none; one whose extent is not logged still waits for
/// a sync that started after its snapshot.
#[test]
fn a_bit_the_activity_log_retains_clears_without_a_local_sync() {
    let directory = tempfile::tempdir().unwrap();
    let mut bitmap =
        WriteIntentBitmap::open_or_create(&directory.path().join("volume.cmbitmap"), REGIONS * REGION, REGION, 1)
            .unwrap();
    // Extents of two regions, eight of them: the log holds the whole volume.
    bitmap.attach_activity_log(&directory.path().join("volume.cmal"), 2 * REGION, 8).unwrap();
    let mut pending = crate::bitmap::PendingMarks::default();
    bitmap.mark_write(2 * REGION + 4096, 4096, &mut pending);
    bitmap.commit(&mut pending).unwrap();
    let mut core = up_to_date(MirrorMode::Sync, 0);
    let local = Arc::new(LocalSync::new());
    core.config.local_sync = local.clone();
    core.config.bitmap = Some(Arc::new(bitmap));
    write_acked(&mut core, 2, 7, 2);
    assert_eq!(core.poll_send(CLEAN_MS), send(vec![flush_frame(3, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight()), vec![]);
    // Region 2 (extent 1, logged) is the only candidate: no sync is needed.
    assert_eq!(core.poll_send(2 * CLEAN_MS), send(vec![flush_frame(4, FrameFlags::NONE)]));
    assert_eq!(local.start_requested(), None, "a retained candidate asks for no local sync");
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 4, &mut nothing_in_flight()), vec![Command::ClearBits(vec![2])]);
    // Region 6 (extent 3) was never logged: its bit waits for a sync.
    write_acked_at(&mut core, 6, 8, 5, 2 * CLEAN_MS);
    assert_eq!(core.poll_send(3 * CLEAN_MS), send(vec![flush_frame(6, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 6, &mut nothing_in_flight()), vec![]);
    assert_eq!(core.poll_send(4 * CLEAN_MS), send(vec![flush_frame(7, FrameFlags::NONE)]));
    let covering = local.start_requested().expect("a candidate the log does not keep asks for a sync");
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 7, &mut nothing_in_flight()), vec![], "the sync still runs");
    local.complete(covering);
    assert_eq!(core.poll_send(5 * CLEAN_MS), send(vec![flush_frame(8, FrameFlags::NONE)]));
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 8, &mut nothing_in_flight()), vec![Command::ClearBits(vec![6])]);
}

/// Invariant 2: a pass's closing Flush acknowledged while regions wait for
/// resync (a repair whose marks could not be made durable came in after it
/// went out) does not record the copy current; another pass sends them.
#[test]
fn a_closing_flush_does_not_make_a_copy_current_while_regions_wait() {
    let mut core = core(MirrorMode::Sync, 0);
    connect(&mut core, &[], 0);
    assert_eq!(core.poll_send(0), send(vec![flush_frame(1, FrameFlags::SYNCED)]));
    assert_eq!(core.repair(vec![(0, REGION)]), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::SetBits(vec![(0, REGION)]), Command::SyncBitmap]);
    assert_eq!(
        core.bitmap_synced(Err("no space".into())),
        vec![Command::RepairStarted(Err("cannot mark the regions to repair: no space".into()))]
    );
    assert_eq!(ack(&mut core, FrameKind::FlushAck, 1, &mut nothing_in_flight()), vec![], "recorded current");
    assert_eq!(core.state(), CopyState::Syncing);
    assert_eq!(core.poll_send(0), read_region(0), "region 0 is resynced");
}

/// `resync_rate_max` holds every pass to the rate, not only the first of a
/// connection: a repair's pass long after the copy connected waits between
/// its regions as the first pass did.
#[test]
fn every_resync_pass_keeps_to_the_rate() {
    let mut core = LinkCore::new(CoreConfig {
        name: "east".to_string(),
        mode: MirrorMode::Sync,
        lag_bytes_max: 0,
        lag_ms_max: 0,
        region_bytes: REGION,
        volume_bytes: REGIONS * REGION,
        local_sync_interval_ms: 0,
        local_sync: Arc::new(LocalSync::immediate()),
        bitmap: None,
        resync_rate_max: REGION, // one region per second
        resync_checksums: false,
    });
    // The first pass, as the copy connects, sends region 5.
    connect(&mut core, &[5], 0);
    assert_eq!(core.poll_send(0), read_region(5));
    assert_eq!(core.resync_read(5 * REGION, REGION, zeroes_read(5)), vec![]);
    assert_eq!(core.poll_send(0), send(vec![zeroes_frame(1, 5)]));
    assert_eq!(core.poll_send(1000), send(vec![flush_frame(2, FrameFlags::NONE)]));
    assert_eq!(poll_syncing(&mut core, 1000), send(vec![flush_frame(3, FrameFlags::SYNCED)]));
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 1, &mut nothing_in_flight()), vec![]);
    ack(&mut core, FrameKind::FlushAck, 2, &mut nothing_in_flight());
    let acked = ack(&mut core, FrameKind::FlushAck, 3, &mut nothing_in_flight());
    assert!(acked.contains(&Command::Persist(RecordedState::Current)), "{acked:?}");
    assert_eq!(core.persisted(Ok(())), vec![]);
    // A minute later, verify repairs two regions.
    let later = 60_000;
    assert_eq!(core.repair(vec![(0, 2 * REGION)]), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![Command::SetBits(vec![(0, 2 * REGION)]), Command::SyncBitmap]);
    assert_eq!(core.bitmap_synced(Ok(())), vec![Command::RepairStarted(Ok(()))]);
    assert_eq!(core.poll_send(later), read_region(0));
    assert_eq!(core.resync_read(0, REGION, zeroes_read(0)), vec![]);
    assert_eq!(core.poll_send(later), send(vec![zeroes_frame(4, 0)]));
    // (The Flush that lets the region's bit clear is due first.)
    assert_eq!(core.poll_send(later + 10), send(vec![flush_frame(5, FrameFlags::NONE)]));
    assert_eq!(core.poll_send(later + 10), vec![Command::Wait { ms: 990 }], "the second region waits for the rate");
}

/// A stop with an up to date copy, nothing in flight and its final Flush
/// acknowledged (every acknowledged write durable there, not only in its
/// page cache) keeps its record (a planned handover promotes it); a stop
/// without that Flush acknowledged, with a write waiting on the copy, or of
/// a copy not up to date, records it stale first (invariant 3), and a
/// second teardown of a clean stop records nothing.
#[test]
fn only_a_clean_stop_keeps_a_copy_current() {
    let mut clean = up_to_date(MirrorMode::Sync, 0);
    assert!(clean.queue_final_flush());
    let commands = clean.poll_send(0);
    let [Command::Send { frames, .. }] = &commands[..] else { panic!("{commands:?}") };
    let flush = frames.last().expect("the final flush");
    assert_eq!(flush.kind, FrameKind::Flush);
    assert!(!clean.flushed_for_stop(), "not acknowledged yet");
    let connection = clean.connection();
    assert!(clean
        .acked(connection, FrameKind::FlushAck, flush.sequence, Vec::new(), 0, &mut nothing_in_flight())
        .is_ok());
    assert!(clean.flushed_for_stop());
    assert_eq!(clean.lost("this host is shutting down", true), vec![]);
    assert_eq!(clean.lost("this host is shutting down", true), vec![], "once stopped clean, nothing more");
    assert_eq!(clean.state(), CopyState::Stale, "nothing is shipped any more");

    let mut waiting = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut waiting, 1, Some(1), 0), vec![]);
    assert_eq!(waiting.lost("this host is shutting down", true), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(waiting.persisted(Ok(())), vec![Command::Release { holds: vec![1], result: 0 }]);

    let mut syncing = self::core(MirrorMode::Sync, 0);
    connect(&mut syncing, &[3], 0);
    assert!(!syncing.queue_final_flush(), "a copy not up to date is not flushed for the stop");
    assert_eq!(syncing.lost("this host is shutting down", true), vec![Command::Persist(RecordedState::Stale)]);

    // Up to date, nothing waiting, but its writes only in its page cache.
    let mut unflushed = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(unflushed.lost("this host is shutting down", true), vec![Command::Persist(RecordedState::Stale)]);
}

/// Once the stop's final Flush is queued, nothing else is sent: a periodic
/// flush (due: a write's region waits to clear) or a heartbeat sent after
/// it would be in flight when the stop looks, and the copy would lose its
/// current record on a clean stop (seen in CI: a failback refused because
/// the copy it was to promote had just been recorded stale).
#[test]
fn nothing_is_sent_after_the_stops_final_flush() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked(&mut core, 1, 1, 2);
    assert!(core.queue_final_flush());
    let commands = core.poll_send(1);
    let [Command::Send { frames, .. }] = &commands[..] else { panic!("{commands:?}") };
    let sequence = frames.last().expect("the final flush").sequence;
    assert_eq!(ack(&mut core, FrameKind::FlushAck, sequence, &mut nothing_in_flight()), vec![]);
    assert!(core.flushed_for_stop());
    // A periodic flush and a heartbeat are both due by now.
    assert_eq!(core.poll_send(10_000), vec![Command::Wait { ms: CLEAN_MS / 2 }]);
    assert!(core.flushed_for_stop());
    assert_eq!(core.lost("this host is shutting down", true), vec![], "a clean stop");
}

/// Every pass makes the next frame sent say so (FrameFlags::PASS, set by
/// the shell on the first frame of the next batch it takes): the one a
/// connection begins with, once, and the one after an async copy's gap.
#[test]
fn a_pass_marks_the_next_frame_sent() {
    let mut core = core(MirrorMode::Async, 1 << 30);
    assert!(!core.take_pass_mark());
    connect(&mut core, &[], 0);
    assert!(core.take_pass_mark(), "a connection begins with a pass");
    assert!(!core.take_pass_mark(), "taken once");
}

/// An async copy behind a slow link is judged by progress: a frame older
/// than ACK_TIMEOUT does not end the connection while acknowledgements keep
/// coming; ACK_TIMEOUT without any does. (A sync copy keeps the per-frame
/// bound: a sync write waits at most about ACK_TIMEOUT.)
#[test]
fn an_async_copy_that_keeps_acknowledging_is_not_timed_out_by_a_full_pipe() {
    let timeout_ms = ACK_TIMEOUT.as_millis() as u64;
    let mut core = up_to_date(MirrorMode::Async, 1 << 30);
    for region in 1..=3 {
        assert_eq!(ship(&mut core, region, None, 0), vec![]);
    }
    assert_eq!(core.poll_send(ASYNC_COALESCE_MS), send(vec![write_frame(2, 1), write_frame(3, 2), write_frame(4, 3)]));
    let connection = core.connection();
    // The first ack arrives late (a full pipe), just before the timeout.
    assert!(core
        .acked(connection, FrameKind::WriteAck, 2, Vec::new(), timeout_ms - 2, &mut nothing_in_flight())
        .is_ok());
    let closes = |commands: &[TestCommand]| commands.iter().any(|command| matches!(command, Command::Close { .. }));
    assert!(!closes(&core.poll_send(timeout_ms - 1)));
    // Frame 3 is older than the timeout now, but the copy made progress.
    assert!(!closes(&core.poll_send(timeout_ms + 100)));
    let commands = core.poll_send(2 * timeout_ms);
    let [Command::Close { why }] = &commands[..] else { panic!("{commands:?}") };
    assert!(why.starts_with("ack timeout: the copy host acknowledged nothing for over 5 s with"), "{why}");
}

/// An up-to-date async copy's writes wait up to ASYNC_COALESCE_MS for
/// company, and a writer wakes the sender only when it would otherwise look
/// later than that; a full batch goes at once. A sync copy's writes go at
/// once, and every one wakes the sender.
#[test]
fn an_async_copy_s_writes_wait_a_moment_to_go_together() {
    let mut core = up_to_date(MirrorMode::Async, 1 << 30);
    let wait = vec![Command::Wait { ms: ASYNC_COALESCE_MS }];
    // Idle since its last send: the sender waits long.
    assert_eq!(core.poll_send(10), vec![Command::Wait { ms: CLEAN_MS / 2 }]);
    assert_eq!(ship(&mut core, 1, None, 10), vec![]);
    assert!(core.sender_needed(10), "the sender is in a long wait");
    assert_eq!(core.poll_send(10), wait);
    assert_eq!(ship(&mut core, 2, None, 10), vec![]);
    assert!(!core.sender_needed(10), "the sender looks by the time the first is due");
    assert_eq!(core.poll_send(11), send(vec![write_frame(2, 1), write_frame(3, 2)]));
    // Busy: the idle sender looks again soon, so writers need not wake it.
    assert_eq!(core.poll_send(11), wait);
    assert_eq!(ship(&mut core, 3, None, 11), vec![]);
    assert!(!core.sender_needed(11));
    assert_eq!(core.poll_send(12), send(vec![write_frame(4, 3)]));
    // Idle for long: it waits long, and the next write wakes it.
    let long = core.poll_send(12 + ASYNC_BUSY_MS);
    assert!(matches!(long[..], [Command::Wait { ms }] if ms > ASYNC_COALESCE_MS), "{long:?}");
    assert_eq!(ship(&mut core, 4, None, 12 + ASYNC_BUSY_MS), vec![]);
    assert!(core.sender_needed(12 + ASYNC_BUSY_MS));
    assert_eq!(core.poll_send(12 + ASYNC_BUSY_MS + ASYNC_COALESCE_MS), send(vec![write_frame(5, 4)]));
    // A full batch goes at once.
    for _ in 0..SEND_BATCH_FRAMES {
        assert_eq!(ship(&mut core, 5, None, 30), vec![]);
    }
    assert!(core.sender_needed(30));
    let commands = core.poll_send(30);
    assert!(matches!(&commands[..], [Command::Send { frames }] if frames.len() == SEND_BATCH_FRAMES));

    let mut sync = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut sync, 1, Some(1), 10), vec![]);
    assert!(sync.sender_needed(10));
    assert_eq!(ship(&mut sync, 2, Some(2), 10), vec![]);
    assert!(sync.sender_needed(10));
    assert!(matches!(&sync.poll_send(10)[..], [Command::Send { frames }] if frames.len() == 2));
}

/// The recovery point: nothing for an up-to-date sync copy; for an async
/// one the bytes shipped and not acknowledged and the age of the oldest;
/// once it stops following every write, the dirty regions and the time
/// since it last did.
#[test]
fn the_recovery_point_says_what_a_copy_lacks_and_since_when() {
    let mut sync = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut sync, 1, Some(1), 10), vec![]);
    assert_eq!(sync.recovery_point(500, 0), RecoveryPoint { bytes: 0, ms: 0, exact: true });
    let mut copy = up_to_date(MirrorMode::Async, 1 << 30);
    // The sender finds it up to date at 100.
    copy.poll_send(100);
    assert_eq!(ship(&mut copy, 1, None, 200), vec![]);
    assert_eq!(ship(&mut copy, 2, None, 300), vec![]);
    assert_eq!(copy.recovery_point(1_000, 0), RecoveryPoint { bytes: 8192, ms: 800, exact: true });
    copy.poll_send(1_000);
    let connection = copy.connection();
    assert!(copy.acked(connection, FrameKind::WriteAck, 2, Vec::new(), 1_050, &mut nothing_in_flight()).is_ok());
    assert_eq!(copy.recovery_point(1_100, 0), RecoveryPoint { bytes: 4096, ms: 800, exact: true });
    // The connection is lost: the copy follows no more writes from 1000 on,
    // and never gets the write shipped at 300 that was still unacknowledged.
    copy.lost("the connection ended", false);
    let bound = RecoveryPoint { bytes: 3 * REGION, ms: 3_700, exact: false };
    assert_eq!(copy.recovery_point(4_000, 3 * REGION), bound, "while the loss is being recorded");
    copy.persisted(Ok(()));
    assert_eq!(copy.state(), CopyState::Stale);
    assert_eq!(copy.recovery_point(4_000, 3 * REGION), bound);
}

/// The recovery point of an async copy that goes behind with writes still
/// on the way, then resyncs (issue 13's crash tests): while behind, its age
/// is that of the oldest write queued for it, older than the moment it
/// went behind; during the pass that follows, its bytes cover every region
/// changed since it went behind — a rollback to the pass's start gives them
/// all up — even once their bits cleared (the shell's dirty count, an
/// input here, then says less); up to date again, only what is in flight.
#[test]
fn the_recovery_point_of_a_copy_behind_and_resyncing_covers_what_a_rollback_loses() {
    let mut copy = up_to_date(MirrorMode::Async, 2 * WRITE.len() as u64);
    assert_eq!(ship(&mut copy, 1, None, 200), vec![]);
    assert_eq!(ship(&mut copy, 2, None, 300), vec![]);
    assert_eq!(copy.poll_send(350), send(vec![write_frame(2, 1), write_frame(3, 2)]));
    assert_eq!(ship(&mut copy, 5, None, 400), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(copy.persisted(Ok(())), vec![]);
    assert_eq!(copy.state(), CopyState::Behind);
    assert_eq!(
        copy.recovery_point(1_000, 3 * REGION),
        RecoveryPoint { bytes: 3 * REGION, ms: 800, exact: false },
        "behind: the write shipped at 200 is still on its way"
    );
    assert_eq!(ack(&mut copy, FrameKind::WriteAck, 2, &mut nothing_in_flight()), vec![]);
    assert_eq!(ack(&mut copy, FrameKind::WriteAck, 3, &mut nothing_in_flight()), vec![]);
    assert_eq!(copy.poll_send(1_100), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(copy.persisted(Ok(())), vec![]);
    assert_eq!(copy.state(), CopyState::Syncing);
    // A write during the pass reaches the copy (and its bit may clear), but
    // the rollback image lacks it as much as the region the pass resends.
    assert_eq!(ship(&mut copy, 7, None, 1_200), vec![]);
    assert_eq!(
        copy.recovery_point(2_000, REGION),
        RecoveryPoint { bytes: 2 * REGION, ms: 1_650, exact: false },
        "syncing: regions 5 and 7 since the image of the pass's start, the copy not following since 350"
    );
    assert_eq!(copy.poll_send(2_000), send(vec![write_frame(4, 7)]));
    assert_eq!(ack(&mut copy, FrameKind::WriteAck, 4, &mut nothing_in_flight()), vec![]);
    assert_eq!(copy.poll_send(2_000), send(vec![flush_frame(5, FrameFlags::NONE)]));
    assert_eq!(ack(&mut copy, FrameKind::FlushAck, 5, &mut nothing_in_flight()), vec![]);
    assert_eq!(copy.poll_send(2_000), read_part(5, PART));
    assert_eq!(copy.resync_read(5 * REGION + PART.0, PART.1, zeroes_part_read(5, PART)), vec![]);
    assert_eq!(copy.poll_send(2_000), send(vec![zeroes_part_frame(6, 5, PART)]));
    assert_eq!(ack(&mut copy, FrameKind::WriteAck, 6, &mut nothing_in_flight()), vec![]);
    assert_eq!(poll_syncing(&mut copy, 2_000), send(vec![flush_frame(7, FrameFlags::SYNCED)]));
    // (Region 7's bit clears here, with those of 1 and 2.)
    let commands = ack(&mut copy, FrameKind::FlushAck, 7, &mut nothing_in_flight());
    assert!(matches!(&commands[0], Command::ClearBits(regions) if regions.contains(&7)), "{commands:?}");
    assert_eq!(commands[1..], [Command::Persist(RecordedState::Current)]);
    assert_eq!(copy.persisted(Ok(())), vec![]);
    assert_eq!(copy.state(), CopyState::UpToDate);
    assert_eq!(copy.recovery_point(2_100, 2 * REGION), RecoveryPoint { bytes: 0, ms: 0, exact: true });
    // Behind again later: only what changed since counts.
    copy.poll_send(2_200);
    assert_eq!(ship(&mut copy, 9, None, 2_300), vec![]);
    assert_eq!(ship(&mut copy, 10, None, 2_300), vec![]);
    assert_eq!(ship(&mut copy, 11, None, 2_400), vec![Command::Persist(RecordedState::Stale)]);
    assert_eq!(copy.persisted(Ok(())), vec![]);
    assert_eq!(
        copy.recovery_point(3_000, 0),
        RecoveryPoint { bytes: REGION, ms: 800, exact: false },
        "region 11 missed; 5 and 7 are the copy's since the pass ended"
    );
}

/// A region larger than an eighth of the window is resynced in parts: it
/// stays pending (its bit cannot clear) until its last part is queued, and
/// a change the copy misses meanwhile makes the pass read it again from its
/// start (a part already sent may lack the change).
#[test]
fn a_large_region_goes_in_parts_and_a_missed_change_restarts_it() {
    let region = 4 * RESYNC_READ_MIN_BYTES;
    let mut core: TestCore = LinkCore::new(CoreConfig {
        name: "east".to_string(),
        mode: MirrorMode::Sync,
        lag_bytes_max: 0,
        lag_ms_max: 0,
        region_bytes: region,
        volume_bytes: 4 * region,
        local_sync_interval_ms: 0,
        local_sync: Arc::new(LocalSync::immediate()),
        bitmap: None,
        resync_rate_max: 0,
        resync_checksums: false,
    });
    connect(&mut core, &[2], 0);
    let part = RESYNC_READ_MIN_BYTES;
    // Read a part at `offset` (the next the pass asks for) and send it as frame `sequence`.
    let resync_part = |core: &mut TestCore, offset: u64, sequence: u64| {
        let read = vec![Command::ReadForResync { offset, length: part, read: ResyncRead::Pieces }];
        assert_eq!(core.poll_send(0), read, "the pass reads the part at {offset}");
        let zeroes = Ok(ResyncReadDone::Pieces(vec![Piece::Zeroes { offset, length: part }]));
        assert_eq!(core.resync_read(offset, part, zeroes), vec![]);
        let frame = Outgoing { offset, length: part as u32, ..zeroes_frame(sequence, 0) };
        assert_eq!(core.poll_send(0), send(vec![frame]));
    };
    resync_part(&mut core, 2 * region, 1);
    resync_part(&mut core, 2 * region + part, 2);
    assert!(core.resync_pending().contains(2), "a region left the pending set before its last part");
    // A write to the region's first part fails on this host: the copy
    // cannot get it from a frame, so the part sent before is stale.
    assert_eq!(core.missed(2 * region, 4096), vec![Command::Persist(RecordedState::Syncing)]);
    assert_eq!(core.persisted(Ok(())), vec![]);
    for (sequence, offset) in (3..).zip((2 * region..3 * region).step_by(part as usize)) {
        resync_part(&mut core, offset, sequence);
        let last = offset + part == 3 * region;
        assert_eq!(core.resync_pending().contains(2), !last, "the region leaves the pending set with its last part");
    }
}

/// A link of `rate` bytes per second and `round_trip_ms` for the core's
/// frames, simulated millisecond by millisecond: frames cross in order at
/// the rate, each acknowledged a round trip after its last byte crossed.
struct SimulatedLink {
    rate: u64,
    round_trip_ms: u64,
    /// When the link finishes what it was given so far (µs).
    free_at_us: u64,
    /// Acknowledgements due: (when, µs; kind; sequence).
    acks: VecDeque<(u64, FrameKind, u64)>,
    /// How long the link has been (or will be, for what it holds) busy, µs.
    busy_us: u64,
}

impl SimulatedLink {
    fn send(&mut self, now_ms: u64, frames: Vec<Outgoing>) {
        for frame in frames {
            let bytes = frame.payload.as_ref().map_or(64, |payload| (**payload).as_ref().len() as u64 + 64);
            let crossing_us = bytes * 1_000_000 / self.rate;
            self.free_at_us = self.free_at_us.max(now_ms * 1000) + crossing_us;
            self.busy_us += crossing_us;
            let kind = match frame.kind {
                FrameKind::Heartbeat => continue,
                FrameKind::Flush => FrameKind::FlushAck,
                _ => FrameKind::WriteAck,
            };
            self.acks.push_back((self.free_at_us + self.round_trip_ms * 1000, kind, frame.sequence));
        }
    }
}

/// What a sync application writing `WRITES_IN_FLIGHT` blocks of
/// `APPLICATION_WRITE` bytes at a time (each a millisecond after the one
/// before completed) gets while a copy of `regions`
/// dirty 256 KiB regions is resynced over a simulated 100 Mbit/40 ms link
/// for `seconds`: (its writes per second, the link's busy share).
fn application_during_resync(regions: u64, seconds: u64) -> (f64, f64) {
    const REGION_BYTES: u64 = 256 << 10;
    const APPLICATION_WRITE: usize = 64 << 10;
    const WRITES_IN_FLIGHT: u64 = 4;
    let data = vec![5u8; APPLICATION_WRITE];
    let mut core: TestCore = LinkCore::new(CoreConfig {
        name: "east".to_string(),
        mode: MirrorMode::Sync,
        lag_bytes_max: 0,
        lag_ms_max: 0,
        region_bytes: REGION_BYTES,
        volume_bytes: 1024 * REGION_BYTES,
        local_sync_interval_ms: 0,
        local_sync: Arc::new(LocalSync::immediate()),
        bitmap: None,
        resync_rate_max: 0,
        resync_checksums: false,
    });
    let dirty: Vec<u64> = (0..regions).collect();
    connect(&mut core, &dirty, 0);
    let rate = 100_000_000 / 8;
    let mut link = SimulatedLink { rate, round_trip_ms: 40, free_at_us: 0, acks: VecDeque::new(), busy_us: 0 };
    let (mut next_hold, mut completed) = (0u64, 0u64);
    // When the application writes again after each completion: a
    // millisecond later (its client's turnaround).
    let mut rewrites: VecDeque<u64> = (0..WRITES_IN_FLIGHT).map(|_| 0).collect();
    let end_ms = seconds * 1000;
    for now_ms in 0..end_ms {
        while link.acks.front().is_some_and(|&(due_us, _, _)| due_us <= now_ms * 1000) {
            let (_, kind, sequence) = link.acks.pop_front().expect("an ack is due");
            let connection = core.connection();
            let commands = core
                .acked(connection, kind, sequence, Vec::new(), now_ms, &mut nothing_in_flight())
                .expect("acknowledgements in order");
            for command in commands {
                match command {
                    Command::Release { holds, .. } => {
                        completed += holds.len() as u64;
                        rewrites.extend(holds.iter().map(|_| now_ms + 1));
                    }
                    Command::Persist(_) => assert_eq!(core.persisted(Ok(())), vec![]),
                    _ => {}
                }
            }
        }
        while rewrites.front().is_some_and(|&due_ms| due_ms <= now_ms) {
            rewrites.pop_front();
            let offset = (next_hold % 1024) * REGION_BYTES;
            let change = Change::Write { offset, data: &data, fua: false };
            assert_eq!(core.ship(&change, &mut None, Some(next_hold), 0, now_ms), vec![]);
            next_hold += 1;
        }
        loop {
            let commands = core.poll_send(now_ms);
            match &commands[..] {
                [Command::Wait { .. }] => break,
                [Command::ReadForResync { offset, length, .. }] => {
                    let (offset, length) = (*offset, *length);
                    let data = vec![9u8; length as usize];
                    let read = Ok(ResyncReadDone::Pieces(vec![Piece::Data { offset, data }]));
                    assert_eq!(core.resync_read(offset, length, read), vec![]);
                }
                [Command::Send { .. }] => {
                    let Some(Command::Send { frames, .. }) = commands.into_iter().next() else { unreachable!() };
                    link.send(now_ms, frames);
                }
                [Command::Persist(_)] => assert_eq!(core.persisted(Ok(())), vec![]),
                other => panic!("unexpected commands {other:?}"),
            }
        }
    }
    // (What the link holds past the end is not counted.)
    let busy_us = link.busy_us - link.free_at_us.saturating_sub(end_ms * 1000);
    let busy = busy_us as f64 / (end_ms * 1000) as f64;
    (completed as f64 / seconds as f64, busy)
}

/// The resync controller (issue 13, item 5) on a simulated 100 Mbit/40 ms
/// link: a resync of 256 MiB and a sync application writing 64 KiB blocks,
/// four at a time, share it. The application keeps at least 70 % of the
/// writes it makes with no resync, and the link is at least 90 % busy.
/// With the fixed 32 MiB window this replaced, every write waited behind
/// 2.7 s of resync: the application got 2 % of its writes.
#[test]
fn a_resync_fills_the_spare_link_and_leaves_the_writes_their_share() {
    let (alone, _) = application_during_resync(0, 10);
    let (during, busy) = application_during_resync(1024, 10);
    let share = during / alone;
    assert!(share >= 0.7, "the application made {during:.1} writes/s during the resync, {alone:.1} alone");
    assert!(busy >= 0.9, "the link was {:.0} % busy", busy * 100.0);
}

/// The room a write leaves when it is acknowledged is kept for the
/// application's next write (the most writes had in flight this round or
/// the last): resync does not take it, else it would queue itself ahead of
/// that write, round after round.
#[test]
fn the_room_a_write_leaves_is_kept_for_the_next_write() {
    let data = vec![3u8; 64 << 10];
    let mut core = core(MirrorMode::Sync, 0);
    connect(&mut core, &[8, 9], 0);
    // Seven writes (448 KiB) in flight and the first resync read (64 KiB)
    // fill the initial window (512 KiB).
    for hold in 0..7 {
        let change = Change::Write { offset: hold * REGION, data: &data, fua: false };
        assert_eq!(core.ship(&change, &mut None, Some(hold), 0, 0), vec![]);
    }
    assert_eq!(core.poll_send(0).len(), 1, "the writes are sent");
    assert_eq!(core.poll_send(0), read_region(8), "one resync read goes out under any load");
    let resync = vec![1u8; REGION as usize];
    let read = Ok(ResyncReadDone::Pieces(vec![Piece::Data { offset: 8 * REGION, data: resync.clone() }]));
    assert_eq!(core.resync_read(8 * REGION, REGION, read), vec![]);
    let frame = Outgoing {
        kind: FrameKind::ResyncData,
        payload: Some(Arc::new(resync)),
        length: REGION as u32,
        ..zeroes_frame(8, 8)
    };
    assert_eq!(core.poll_send(0), send(vec![frame]));
    assert_eq!(core.poll_send(0), vec![Command::Wait { ms: CLEAN_MS / 2 }], "the window is full");
    // Two writes are acknowledged: their room waits for the next writes.
    for (sequence, hold) in [(1, 0), (2, 1)] {
        let released = vec![Command::Release { holds: vec![hold], result: 0 }];
        assert_eq!(ack(&mut core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()), released);
    }
    assert_eq!(core.poll_send(1), vec![Command::Wait { ms: CLEAN_MS / 2 }], "resync took the writes' room");
}

/// The controller alone, on a fake clock: 64 KiB frames cross a link at
/// one per 8 ms (8.2 MB/s) and are acknowledged 40 ms after their last
/// byte. It measures the base delay (40 ms: each round trip less the
/// frame's own 8 ms) and the rate; rounds held back by the window with no
/// queue grow it, and rounds with a 50 ms queue shrink it by a quarter,
/// down to what keeps the link busy and no lower: the bandwidth-delay
/// product and a frame.
#[test]
fn the_resync_window_shrinks_on_a_queue_to_what_keeps_the_link_busy() {
    const FRAME: u64 = 64 << 10;
    let mut controller = ResyncController::new(RESYNC_WINDOW_BYTES);
    let mut sent_ms = 0;
    let mut frames = |controller: &mut ResyncController, count: u64, queue_ms: u64| {
        for _ in 0..count {
            controller.held_back();
            controller.acked(sent_ms + 8 + 40 + queue_ms, sent_ms, FRAME);
            sent_ms += 8;
        }
    };
    let initial = controller.window_bytes();
    frames(&mut controller, 250, 0);
    assert_eq!(controller.base_delay_us(), Some(40_000));
    let rate = controller.rate_bytes_per_second().expect("a rate measured");
    assert_eq!(rate, FRAME * 1000 / 8, "the rate is one frame per 8 ms");
    assert!(controller.window_bytes() > initial, "a window held back with no queue did not grow");
    frames(&mut controller, 500, 50);
    let busy = rate * 40 / 1000 + WINDOW_MIN_BYTES;
    assert_eq!(controller.window_bytes(), busy, "the window after rounds with a queue");
}

/// An async copy is judged by its progress, and later frames' replies may
/// overtake a Flush: a Flush left unanswered for ACK_TIMEOUT while every
/// later write is acknowledged still ends the connection (a copy host whose
/// fsync hangs), as it did when nothing could overtake it.
#[test]
fn an_async_copy_whose_flush_hangs_is_lost_though_later_writes_are_answered() {
    let mut core = up_to_date(MirrorMode::Async, 1 << 30);
    assert_eq!(ship(&mut core, 2, None, 0), vec![]);
    assert_eq!(frames_sent(core.poll_send(10)), vec![(FrameKind::Write, 2)]);
    assert_eq!(ack(&mut core, FrameKind::WriteAck, 2, &mut nothing_in_flight()), vec![]);
    assert_eq!(frames_sent(core.poll_send(CLEAN_MS)), vec![(FrameKind::Flush, 3)]);
    let timeout_ms = ACK_TIMEOUT.as_millis() as u64;
    let mut sequence = 3;
    let mut now_ms = CLEAN_MS;
    while now_ms + 1000 < CLEAN_MS + timeout_ms {
        now_ms += 1000;
        sequence += 1;
        assert_eq!(ship(&mut core, 4, None, now_ms), vec![]);
        assert_eq!(frames_sent(core.poll_send(now_ms + 10)), vec![(FrameKind::Write, sequence)]);
        assert_eq!(ack(&mut core, FrameKind::WriteAck, sequence, &mut nothing_in_flight()), vec![]);
        assert!(!matches!(core.poll_send(now_ms + 20).as_slice(), [Command::Close { .. }]), "closed at {now_ms} ms");
    }
    let why = "ack timeout: the copy host left a Flush (sequence 3) unanswered for over 5 s while it acknowledged \
               later frames (its store's fsync hangs, or takes that long)";
    assert_eq!(core.poll_send(CLEAN_MS + timeout_ms + 1), vec![Command::Close { why: why.to_string() }]);
}

/// A writer sends its own change only on an idle link: an up-to-date sync
/// copy with nothing unacknowledged. With a write in flight, an async copy,
/// or a pass running, the sender keeps its batches; numbering is shared, so
/// frames taken either way follow one sequence.
#[test]
fn a_writer_sends_its_change_itself_only_on_an_idle_sync_link() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    assert_eq!(ship(&mut core, 2, Some(6), 0), vec![]);
    assert_eq!(core.take_inline(0), None, "the pass's mark is not taken yet");
    // The shell takes it with the pass's first batch (the closing Flush).
    assert!(core.take_pass_mark());
    assert_eq!(core.take_inline(0), Some(vec![write_frame(2, 2)]));
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 2, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![6], result: 0 }]
    );
    assert_eq!(core.take_inline(0), None, "nothing queued");
    assert_eq!(ship(&mut core, 2, Some(7), 0), vec![]);
    assert_eq!(core.take_inline(0), Some(vec![write_frame(3, 2)]));
    assert!(!core.has_queued());
    // Write 3 is unacknowledged: the next one waits for the sender.
    assert_eq!(ship(&mut core, 3, Some(8), 0), vec![]);
    assert_eq!(core.take_inline(0), None, "a write is in flight");
    assert_eq!(core.poll_send(0), send(vec![write_frame(4, 3)]));
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 3, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![7], result: 0 }]
    );
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 4, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![8], result: 0 }]
    );
    assert_eq!(ship(&mut core, 4, Some(9), 0), vec![]);
    assert_eq!(core.take_inline(0), Some(vec![write_frame(5, 4)]), "idle again");

    let mut copy = up_to_date(MirrorMode::Async, 1 << 30);
    assert_eq!(ship(&mut copy, 2, None, 0), vec![]);
    assert_eq!(copy.take_inline(0), None, "an async copy's writes wait for company");

    let mut copy = self::core(MirrorMode::Sync, 0);
    connect(&mut copy, &[3], 0);
    assert_eq!(ship(&mut copy, 2, Some(7), 0), vec![]);
    assert_eq!(copy.take_inline(0), None, "a pass is running");

    // A change larger than INLINE_BYTES_MAX goes through the sender.
    assert_eq!(
        ack(&mut core, FrameKind::WriteAck, 5, &mut nothing_in_flight()),
        vec![Command::Release { holds: vec![9], result: 0 }]
    );
    let large = vec![9u8; INLINE_BYTES_MAX as usize + 4096];
    let change = Change::Write { offset: 0, data: &large, fua: false };
    assert_eq!(core.ship(&change, &mut None, Some(10), 0, 0), vec![]);
    assert_eq!(core.take_inline(0), None, "too large to send on the writer's thread");
    assert_eq!(frames_sent(core.poll_send(0)), vec![(FrameKind::Write, 6)]);
}

/// The acknowledgement reader wakes the sender only when the
/// acknowledgements may concern it or a waiting writer: not for an
/// up-to-date sync copy with nothing queued, but for writers held back
/// before them, a Flush acknowledged, a queue, a pass, an async copy, or
/// the stop's final Flush.
#[test]
fn acknowledgements_wake_waiters_only_when_they_concern_them() {
    let mut core = up_to_date(MirrorMode::Sync, 0);
    write_acked(&mut core, 2, 7, 2);
    assert!(!core.acks_concern_waiters(false, false), "an idle up-to-date sync copy");
    assert!(core.acks_concern_waiters(true, false), "writers were held back by the lag");
    assert!(core.acks_concern_waiters(false, true), "a Flush was acknowledged");
    assert_eq!(ship(&mut core, 3, Some(8), 0), vec![]);
    assert!(core.acks_concern_waiters(false, false), "frames are queued");
    assert_eq!(frames_sent(core.poll_send(0)), vec![(FrameKind::Write, 3)]);
    assert!(!core.acks_concern_waiters(false, false), "a write in flight, nothing queued");
    // The stop's final Flush, sent: the queue is empty again.
    assert!(core.queue_final_flush());
    assert_eq!(frames_sent(core.poll_send(0)), vec![(FrameKind::Flush, 4)]);
    assert!(!core.has_queued());
    assert!(core.acks_concern_waiters(false, false), "the stop waits for its final Flush");

    let mut syncing = self::core(MirrorMode::Sync, 0);
    connect(&mut syncing, &[3], 0);
    assert!(!syncing.has_queued());
    assert!(syncing.acks_concern_waiters(false, false), "a pass is running");

    let mut copy = up_to_date(MirrorMode::Async, 1 << 30);
    assert_eq!(ship(&mut copy, 2, None, 0), vec![]);
    assert_eq!(frames_sent(copy.poll_send(10)), vec![(FrameKind::Write, 2)]);
    assert!(copy.acks_concern_waiters(false, false), "an async copy's sender counts its timeouts from acks");
}
