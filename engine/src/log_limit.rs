//! A rate limit for repeated log lines: the first few lines of a kind in each
//! interval are logged, the rest are counted, and the caller logs one
//! "suppressed K similar messages" summary per kind when an interval ends.
//!
//! It guards against a peer that makes a process log the same line in a
//! loop: a client re-opening idle connections to a copy host made it log
//! 50,873 identical lines (8.8 MB) in under a minute. A kind is a
//! `&'static str` naming the line, so the table holds one entry per call site
//! and cannot grow with what a peer sends. Time is passed in, so the rule is
//! tested without sleeping.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Counts log lines per kind and interval; shared by the threads that log.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    lines_per_interval: u32,
    windows: Mutex<Vec<Window>>,
}

/// One kind's current interval.
#[derive(Debug)]
struct Window {
    kind: &'static str,
    started: Instant,
    logged: u32,
    /// Held back in the current interval.
    suppressed: u64,
    /// Held back in intervals that ended, not yet reported.
    suppressed_unreported: u64,
}

impl Window {
    /// Start a new interval if the current one is over at `now`.
    fn roll(&mut self, now: Instant, interval: Duration) {
        if now.saturating_duration_since(self.started) >= interval {
            self.suppressed_unreported += self.suppressed;
            self.suppressed = 0;
            self.logged = 0;
            self.started = now;
        }
    }
}

impl LogLimit {
    /// Allow `lines_per_interval` lines of each kind per `interval`.
    pub fn new(interval: Duration, lines_per_interval: u32) -> LogLimit {
        assert!(lines_per_interval > 0, "a log limit lets at least one line through");
        LogLimit { interval, lines_per_interval, windows: Mutex::new(Vec::new()) }
    }

    /// Whether a line of `kind` may be logged at `now`; if not, it is counted
    /// for the summary.
    pub fn allow(&self, kind: &'static str, now: Instant) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let index = match windows.iter().position(|window| window.kind == kind) {
            Some(index) => index,
            None => {
                windows.push(Window { kind, started: now, logged: 0, suppressed: 0, suppressed_unreported: 0 });
                windows.len() - 1
            }
        };
        let window = &mut windows[index];
        window.roll(now, self.interval);
        if window.logged < self.lines_per_interval {
            window.logged += 1;
            return true;
        }
        window.suppressed += 1;
        false
    }

    /// The kinds with lines held back in intervals that have ended by `now`,
    /// with how many; each count is returned once. Call it now and then (an
    /// accept loop does, each turn) and log one summary line per entry.
    pub fn take_suppressed(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ended = Vec::new();
        for window in windows.iter_mut() {
            window.roll(now, self.interval);
            if window.suppressed_unreported > 0 {
                ended.push((window.kind, window.suppressed_unreported));
                window.suppressed_unreported = 0;
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_lines_of_a_kind_pass_then_the_rest_are_counted_per_interval() {
        let limit = LogLimit::new(Duration::from_secs(10), 3);
        let start = Instant::now();
        let passed = (0..100).filter(|_| limit.allow("refused", start)).count();
        assert_eq!(passed, 3);
        assert!(limit.allow("other kind", start), "kinds are counted apart");
        assert_eq!(limit.take_suppressed(start + Duration::from_secs(9)), vec![], "the interval has not ended");
        assert_eq!(limit.take_suppressed(start + Duration::from_secs(10)), vec![("refused", 97)]);
        assert_eq!(limit.take_suppressed(start + Duration::from_secs(11)), vec![], "each count is reported once");
        let later = start + Duration::from_secs(12);
        let passed = (0..5).filter(|_| limit.allow("refused", later)).count();
        assert_eq!(passed, 3, "a new interval lets lines through again");
    }

    #[test]
    fn a_count_held_back_is_reported_even_when_lines_pass_again() {
        let limit = LogLimit::new(Duration::from_secs(1), 1);
        let start = Instant::now();
        assert!(limit.allow("refused", start));
        assert!(!limit.allow("refused", start));
        assert!(limit.allow("refused", start + Duration::from_secs(2)));
        assert_eq!(limit.take_suppressed(start + Duration::from_secs(2)), vec![("refused", 1)]);
    }
}
