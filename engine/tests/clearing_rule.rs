//! The clearing rule of the write-intent bitmap (DESIGN.md §4, invariant 6),
//! driven deterministically: the real replicator over real TCP against a fake
//! copy host that holds acknowledgements back on command (`support`), with
//! the local-sync interval at zero so every Flush that may clear bits does.
//!
//! The rule (see `engine::replicator::link`): a region becomes a candidate
//! when a Flush whose snapshot holds it is acknowledged; at the next
//! acknowledged Flush it is cleared unless a change touched it since (it is
//! in `touched`), a write to it is in flight, or it waits for a resync. In a
//! running system each window is milliseconds wide once per 5 s; here the
//! test holds the window open and puts the Flush acknowledgement inside it.

mod support;

use std::time::Duration;

use engine::protocol::FrameKind;
use engine::replicator::MirrorMode;
use support::{Mirror, Seen, REGION, WRITE_BYTES};

/// The region the tests write to (not the first, so no resync frame
/// boundary is involved).
const R: u64 = 5 * REGION;

/// Proves the clearing rule clears at all here: a region written, flushed
/// twice and left alone loses its bit, so the two tests below that find a
/// bit kept are not kept by a harness that never clears.
#[test]
fn a_quiet_region_is_cleared_after_two_acknowledged_flushes() {
    let mut mirror = Mirror::start(MirrorMode::Sync, Duration::ZERO);
    mirror.wait_quiet();
    mirror.write_and_wait(R, 1);
    assert!(mirror.dirty(R), "a written region is marked");
    mirror.flush_and_wait(2);
    mirror.flush_until_clear(R, 3);
    mirror.finish().unwrap();
}

/// Invariant 6: a region with a write in flight (marked, not yet shipped) is
/// never cleared, even when a Flush after its last shipped write is
/// acknowledged. Fails with the `inflight` check of the clearing rule removed.
#[test]
fn a_region_with_a_write_in_flight_keeps_its_bit() {
    let mut mirror = Mirror::start(MirrorMode::Sync, Duration::ZERO);
    mirror.wait_quiet();
    mirror.write_and_wait(R, 1);
    // The next write to R is begun (marked) and its local write "issued";
    // it is shipped only at the end.
    mirror.replicator.begin_write(R, WRITE_BYTES as u64).unwrap();
    // The first Flush's snapshot holds R: R becomes a candidate at its ack.
    mirror.flush_and_wait(2);
    // The second Flush's ack would clear R, but a write to R is in flight.
    // Several Flushes, apart, so the background local sync has surely
    // completed and only the write in flight can keep the bit.
    for id in 3..=8 {
        mirror.flush_and_wait(id);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        mirror.dirty(R),
        "the bit of region {} was cleared while a write to it was in flight: a crash now would forget \
         that the copy may lack that write",
        R / REGION
    );
    // The write completes and is shipped; then R clears as usual.
    let data = vec![9u8; WRITE_BYTES];
    let shipped = mirror.replicator.ship(
        engine::replicator::Change::Write { offset: R, data: &data, fua: false },
        &mirror.completions,
        9,
    );
    assert_eq!(mirror.wait_answer(shipped, 9), 0);
    mirror.flush_until_clear(R, 10);
    mirror.finish().unwrap();
}

/// Invariant 6: a region is not cleared before the copy acknowledged every
/// write to it. R is a candidate; a second write to R is shipped after the
/// next Flush, and the copy acknowledges that Flush but holds the write's
/// ack back: the Flush proves nothing about the write, so R keeps its bit.
/// Fails with the `touched` check of the clearing rule removed.
#[test]
fn a_region_written_after_the_flush_keeps_its_bit_until_the_copy_acknowledges() {
    let mut mirror = Mirror::start(MirrorMode::Sync, Duration::ZERO);
    mirror.wait_quiet();
    mirror.write_and_wait(R, 1);
    // The Flush's snapshot holds R: R is a candidate once it is acknowledged.
    mirror.flush_and_wait(2);
    assert!(mirror.dirty(R), "R stays marked until the next acknowledged Flush");
    // The copy now keeps its replies back: the Flush below and the write
    // after it both reach it, neither is answered yet.
    mirror.hold_acks();
    let flush = mirror.flush(3);
    let write = mirror.write(R, 4);
    mirror.wait_frame(FrameKind::Write, R);
    assert_eq!(flush, engine::replicator::Shipped::Pending);
    assert_eq!(mirror.answer(3), None, "the Flush is not acknowledged yet");
    // The background local sync this Flush asked for has time to complete,
    // so only the unacknowledged write can keep R's bit at its ack.
    std::thread::sleep(Duration::from_millis(100));
    // Release the Flush's ack (and anything before it), not the write's.
    mirror.release_acks(Some(Seen { kind: FrameKind::Write, offset: R }));
    assert_eq!(mirror.wait_answer(flush, 3), 0);
    assert_eq!(mirror.answer(4), None, "the copy has not acknowledged the write to R");
    assert!(
        mirror.dirty(R),
        "the bit of region {} was cleared by a Flush acknowledged before the copy acknowledged a write \
         to it: the copy may lack that write and a crash now would forget it",
        R / REGION
    );
    mirror.release_acks(None);
    assert_eq!(mirror.wait_answer(write, 4), 0);
    mirror.flush_until_clear(R, 5);
    mirror.finish().unwrap();
}
