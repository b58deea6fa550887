//! Non-blocking locks on byte ranges of a volume.
//!
//! With O_DIRECT a write that does not cover whole blocks is a
//! read-modify-write of its edge blocks. Two such writes to different bytes
//! of one block, or a read-modify-write racing a plain write of that block,
//! could otherwise put back stale bytes. Every write-like operation on a
//! direct volume therefore holds its aligned range while it is in flight.
//! Callers run event loops, so locking never blocks: a conflicting operation
//! is refused and the caller parks it and tries again.

use std::sync::Mutex;

/// Identifies one held range; pass it back to [`RangeLocks::unlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeLockId(u64);

/// A set of held, non-overlapping half-open ranges.
#[derive(Debug, Default)]
pub struct RangeLocks {
    state: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    next_id: u64,
    ranges: Vec<(u64, u64, u64)>,
}

impl RangeLocks {
    /// Upper bound on ranges held at once; a caller over it is refused
    /// (and retries) rather than growing the table without limit.
    pub const HELD_MAX: usize = 4096;

    /// Take `start..end` if no held range overlaps it.
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeLockId> {
        assert!(start < end, "empty range lock {start}..{end}");
        let mut held = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if held.ranges.len() >= Self::HELD_MAX || held.ranges.iter().any(|&(s, e, _)| s < end && start < e) {
            return None;
        }
        held.next_id += 1;
        let id = held.next_id;
        held.ranges.push((start, end, id));
        Some(RangeLockId(id))
    }

    /// Release a range taken by `try_lock`.
    pub fn unlock(&self, id: RangeLockId) {
        let mut held = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let position = held.ranges.iter().position(|&(_, _, held_id)| held_id == id.0);
        let position = position.expect("unlock of a range that is not held");
        held.ranges.swap_remove(position);
    }

    /// Ranges held now.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_conflict_and_adjacent_ones_do_not() {
        let locks = RangeLocks::default();
        let a = locks.try_lock(0, 4096).unwrap();
        assert!(locks.try_lock(4095, 8192).is_none());
        let b = locks.try_lock(4096, 8192).unwrap();
        locks.unlock(a);
        assert!(locks.try_lock(0, 10).is_some());
        locks.unlock(b);
        assert_eq!(locks.held(), 1);
    }
}
