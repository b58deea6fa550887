//! Per-connection ordering and fencing of data frames, as pure state.
//!
//! After the handshake each direction of a connection numbers its frames 1,
//! 2, 3, … ([`SendSequence`]). The receiver's [`SequenceCheck`] accepts a
//! frame only when it carries this connection's session, the very next
//! sequence number, a generation no older than the volume's and an epoch no
//! older than the highest epoch this side has promised (DESIGN.md §4,
//! invariant 4). A refused frame leaves the state unchanged; the caller drops
//! the connection, since a stream that carried one bad frame cannot be trusted
//! to carry the next.

use crate::protocol::error::ReplicationError;
use crate::protocol::frame::FrameHeader;

/// The receiving side's view of one connection: which frame is due next and
/// which generation and epoch it must at least carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceCheck {
    session: u64,
    sequence_expected: u64,
    generation: u64,
    epoch_promised: u64,
}

impl SequenceCheck {
    /// The check for a new session: the first frame must carry sequence 1,
    /// at least `generation` and at least `epoch_promised`.
    pub fn new(session: u64, generation: u64, epoch_promised: u64) -> SequenceCheck {
        SequenceCheck { session, sequence_expected: 1, generation, epoch_promised }
    }

    /// Accept the frame or say why not. On acceptance the expected sequence
    /// moves on, and a newer generation or epoch carried by the frame is
    /// adopted: a fencing token only ever rises.
    pub fn check(&mut self, header: &FrameHeader) -> Result<(), ReplicationError> {
        let kind = header.kind;
        if header.session != self.session {
            return Err(ReplicationError::WrongSession { kind, received: header.session, expected: self.session });
        }
        if header.epoch < self.epoch_promised {
            return Err(ReplicationError::Fenced { kind, received: header.epoch, promised: self.epoch_promised });
        }
        if header.generation < self.generation {
            return Err(ReplicationError::StaleGeneration {
                kind,
                received: header.generation,
                current: self.generation,
            });
        }
        if header.sequence < self.sequence_expected {
            return Err(ReplicationError::Replayed {
                kind,
                received: header.sequence,
                expected: self.sequence_expected,
            });
        }
        if header.sequence > self.sequence_expected {
            return Err(ReplicationError::SequenceGap {
                kind,
                received: header.sequence,
                expected: self.sequence_expected,
            });
        }
        self.sequence_expected = self.sequence_expected.checked_add(1).ok_or_else(|| {
            ReplicationError::protocol("the session used up its sequence numbers; reconnect to start a new session")
        })?;
        self.generation = header.generation;
        self.epoch_promised = header.epoch;
        Ok(())
    }

    /// Promise an epoch: from now on frames older than it are refused. A
    /// promise never goes back; a lower epoch is ignored.
    pub fn promise_epoch(&mut self, epoch: u64) {
        self.epoch_promised = self.epoch_promised.max(epoch);
    }

    /// The session this connection agreed on.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The sequence number the next frame must carry.
    pub fn sequence_expected(&self) -> u64 {
        self.sequence_expected
    }

    /// The oldest generation a frame may carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The highest epoch promised; older frames are refused.
    pub fn epoch_promised(&self) -> u64 {
        self.epoch_promised
    }
}

/// The sending side's counter: hands out 1, 2, 3, … for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSequence {
    next: u64,
}

impl Default for SendSequence {
    fn default() -> SendSequence {
        SendSequence::new()
    }
}

impl SendSequence {
    /// A counter whose first number is 1.
    pub fn new() -> SendSequence {
        SendSequence { next: 1 }
    }

    /// The number for the next frame sent.
    ///
    /// # Panics
    /// After 2^64 − 1 frames, which no connection lives to see.
    pub fn take(&mut self) -> u64 {
        let sequence = self.next;
        self.next = sequence.checked_add(1).expect("a session never sends 2^64 frames");
        sequence
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::error::ReplicationErrorKind;
    use crate::protocol::frame::FrameKind;

    fn frame(session: u64, sequence: u64, generation: u64, epoch: u64) -> FrameHeader {
        let mut header = FrameHeader::new(FrameKind::Heartbeat);
        header.session = session;
        header.sequence = sequence;
        header.generation = generation;
        header.epoch = epoch;
        header
    }

    /// Consecutive frames of the session are accepted in order.
    #[test]
    fn in_order_frames_are_accepted() {
        let mut check = SequenceCheck::new(42, 1, 1);
        let mut sequence = SendSequence::new();
        for _ in 0..5 {
            check.check(&frame(42, sequence.take(), 1, 1)).unwrap();
        }
        assert_eq!(check.sequence_expected(), 6);
    }

    /// A frame seen before is refused as a replay, and the state does not move.
    #[test]
    fn replayed_frame_is_refused() {
        let mut check = SequenceCheck::new(42, 1, 1);
        check.check(&frame(42, 1, 1, 1)).unwrap();
        check.check(&frame(42, 2, 1, 1)).unwrap();
        let error = check.check(&frame(42, 1, 1, 1)).unwrap_err();
        assert_eq!(error.kind(), ReplicationErrorKind::Replay);
        assert_eq!(check.sequence_expected(), 3);
    }

    /// A frame that skips ahead is refused: a missing frame must not go unnoticed.
    #[test]
    fn gap_is_refused() {
        let mut check = SequenceCheck::new(42, 1, 1);
        assert_eq!(check.check(&frame(42, 2, 1, 1)).unwrap_err().kind(), ReplicationErrorKind::Replay);
        check.check(&frame(42, 1, 1, 1)).unwrap();
    }

    /// A frame of another session is refused even when its sequence fits.
    #[test]
    fn other_session_is_refused() {
        let mut check = SequenceCheck::new(42, 1, 1);
        assert_eq!(check.check(&frame(43, 1, 1, 1)).unwrap_err().kind(), ReplicationErrorKind::WrongSession);
    }

    /// Invariant 4: a frame older than the promised epoch is refused, a newer
    /// epoch is adopted, and a promise never goes back.
    #[test]
    fn stale_epoch_is_fenced_and_promises_only_rise() {
        let mut check = SequenceCheck::new(42, 1, 5);
        assert_eq!(check.check(&frame(42, 1, 1, 4)).unwrap_err().kind(), ReplicationErrorKind::Fenced);
        check.check(&frame(42, 1, 1, 6)).unwrap();
        assert_eq!(check.epoch_promised(), 6);
        check.promise_epoch(3);
        assert_eq!(check.epoch_promised(), 6);
        check.promise_epoch(8);
        assert_eq!(check.check(&frame(42, 2, 1, 6)).unwrap_err().kind(), ReplicationErrorKind::Fenced);
    }

    /// A frame from an older generation is refused; a newer one is adopted.
    #[test]
    fn stale_generation_is_refused() {
        let mut check = SequenceCheck::new(42, 3, 1);
        assert_eq!(check.check(&frame(42, 1, 2, 1)).unwrap_err().kind(), ReplicationErrorKind::Fenced);
        check.check(&frame(42, 1, 4, 1)).unwrap();
        assert_eq!(check.generation(), 4);
        assert_eq!(check.check(&frame(42, 2, 3, 1)).unwrap_err().kind(), ReplicationErrorKind::Fenced);
    }
}
