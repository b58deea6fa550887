//! Invariant 3 (mark before ack), driven deterministically: the real
//! replicator over real TCP against a fake copy host that holds a write's
//! acknowledgement and then closes the connection (`support`), with a
//! mirror-state store that blocks or fails when the copy is recorded stale.
//!
//! A sync copy that is lost while writes wait for it must be recorded stale
//! through the [`engine::replicator::MirrorStateStore`] before any write it
//! missed is answered: while that record is being written nothing is
//! released, and when it cannot be written those writes get EIO.

mod support;

use std::time::{Duration, Instant};

use engine::protocol::FrameKind;
use engine::replicator::{CopyState, MirrorMode, RecordedState, Shipped};
use support::{Mirror, StaleRecords, REGION};

const W: u64 = 3 * REGION;

/// Start a sync mirror, ship a write the copy receives but never
/// acknowledges, and make the copy drop the connection with the write
/// still waiting. Returns the write's id.
fn lose_the_copy_with_a_write_waiting(mirror: &mut Mirror) -> u64 {
    mirror.wait_up_to_date();
    assert_eq!(mirror.store.recorded(), Some(RecordedState::Current));
    mirror.hold_acks();
    let shipped = mirror.write(W, 1);
    assert_eq!(shipped, Shipped::Pending, "a sync write waits for its copy");
    mirror.wait_frame(FrameKind::Write, W);
    mirror.close_connection();
    1
}

/// While the store is still recording the lost copy stale, the write that
/// copy missed is not answered; once the record is made, it is, with
/// success. Fails if the link teardown answers waiting writes first and
/// records the copy stale after.
#[test]
fn no_write_the_lost_copy_missed_is_answered_while_its_stale_record_is_being_written() {
    let mut mirror = Mirror::start(MirrorMode::Sync, Duration::from_secs(5));
    mirror.store.set_mode(StaleRecords::Block);
    let id = lose_the_copy_with_a_write_waiting(&mut mirror);
    mirror.wait_until("the stale record to block", |mirror| mirror.store.is_blocked());
    // Give a wrong implementation every chance to answer early.
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert_eq!(
            mirror.answer(id),
            None,
            "the write was answered while its copy was not yet recorded stale (invariant 3)"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(mirror.store.recorded(), Some(RecordedState::Current), "the record is still being written");
    mirror.store.set_mode(StaleRecords::Store);
    assert_eq!(mirror.wait_answer(Shipped::Pending, id), 0, "once recorded stale, the write succeeds");
    assert_eq!(mirror.store.recorded(), Some(RecordedState::Stale));
    assert_eq!(mirror.replicator.status()[0].state, CopyState::Stale);
    mirror.finish().unwrap();
}

/// When the lost copy cannot be recorded stale, the write it missed gets
/// EIO, and so does every later write until the record succeeds. Fails if
/// the teardown answers before it knows whether the record was made.
#[test]
fn writes_the_lost_copy_missed_get_eio_when_it_cannot_be_recorded_stale() {
    let mut mirror = Mirror::start(MirrorMode::Sync, Duration::from_secs(5));
    mirror.store.set_mode(StaleRecords::Fail);
    let id = lose_the_copy_with_a_write_waiting(&mut mirror);
    assert_eq!(
        mirror.wait_answer(Shipped::Pending, id),
        -libc::EIO,
        "a write its sync copy missed cannot succeed while that copy is not recorded stale"
    );
    assert_eq!(mirror.store.recorded(), Some(RecordedState::Current), "the failed record changed nothing");
    mirror.wait_until("the copy to show disconnected (not recorded stale)", |mirror| {
        mirror.replicator.status()[0].state == CopyState::Unrecorded
    });
    assert_eq!(mirror.write(W + REGION, 2), Shipped::Done(-libc::EIO), "a later write the copy misses gets EIO too");
    mirror.store.set_mode(StaleRecords::Store);
    assert_eq!(mirror.write(W + 2 * REGION, 3), Shipped::Done(0), "once recorded stale, writes succeed again");
    assert_eq!(mirror.store.recorded(), Some(RecordedState::Stale));
    mirror.finish().unwrap();
}
