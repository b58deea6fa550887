//! The I/O gate: whether a volume may serve requests now. A group node keeps
//! it open only while it holds a lease from its group's quorum (seed 002:
//! a group serves I/O only while it has quorum); when the lease runs out,
//! requests wait at the gate (suspend) or fail with EIO, as configured, and
//! the waiters go on when the lease is renewed.
//!
//! The gate expires by itself: it holds the lease's end, and every request
//! compares the clock with it (one atomic load and a vDSO clock read), so a
//! renewal thread that stalls cannot keep a stale gate open.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What requests do once the lease has run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExpiry {
    /// Wait (no error) until the lease is renewed.
    Suspend,
    /// Fail at once with EIO.
    Fail,
}

/// Why the gate refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefused {
    /// The lease ran out and the gate fails requests.
    #[error("the group has no quorum: {0}")]
    NoQuorum(String),
    /// The gate was closed for good (the node is stopping or was forced out).
    #[error("the volume is no longer served here: {0}")]
    Closed(String),
}

#[derive(Debug)]
struct Inner {
    on_expiry: OnExpiry,
    /// Why requests wait or fail, for the log and the error.
    why: String,
    closed: Option<String>,
    waiting: u64,
}

/// The gate of one served volume.
#[derive(Debug)]
pub struct Gate {
    /// Time zero of `open_until_ns`.
    base: Instant,
    /// Nanoseconds after `base` until which requests pass; 0: shut.
    open_until_ns: AtomicU64,
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Gate {
    /// A shut gate (no lease yet) with the given reaction to expiry.
    pub fn new(on_expiry: OnExpiry) -> Gate {
        Gate {
            base: Instant::now(),
            open_until_ns: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                on_expiry,
                why: "no lease from the quorum yet".to_string(),
                closed: None,
                waiting: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Open the gate until `until` (a lease renewed); waiters go on.
    pub fn renew(&self, until: Instant) {
        let ns = u64::try_from(until.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let _inner = self.lock();
        self.open_until_ns.store(ns.max(1), Ordering::Release);
        self.changed.notify_all();
    }

    /// Shut the gate now (the lease is known lost), saying why.
    pub fn revoke(&self, why: &str) {
        let mut inner = self.lock();
        self.open_until_ns.store(0, Ordering::Release);
        inner.why = why.to_string();
    }

    /// Say why requests wait or fail once the lease has run out.
    pub fn set_reason(&self, why: &str) {
        self.lock().why = why.to_string();
    }

    /// Shut the gate for good: waiters and later requests fail.
    pub fn close(&self, why: &str) {
        let mut inner = self.lock();
        self.open_until_ns.store(0, Ordering::Release);
        inner.closed = Some(why.to_string());
        self.changed.notify_all();
    }

    /// Whether a request would pass now without waiting.
    pub fn is_open(&self) -> bool {
        self.now_ns() < self.open_until_ns.load(Ordering::Acquire)
    }

    /// How many requests wait at the gate now.
    pub fn waiting(&self) -> u64 {
        self.lock().waiting
    }

    /// Before a request is served: pass, wait until the lease is renewed
    /// (suspend), or refuse.
    pub fn pass(&self) -> Result<(), GateRefused> {
        if self.is_open() {
            return Ok(());
        }
        let mut inner = self.lock();
        let mut logged = false;
        loop {
            if let Some(why) = &inner.closed {
                return Err(GateRefused::Closed(why.clone()));
            }
            if self.is_open() {
                return Ok(());
            }
            if inner.on_expiry == OnExpiry::Fail {
                return Err(GateRefused::NoQuorum(inner.why.clone()));
            }
            if !logged {
                tracing::debug!(why = %inner.why, "a request waits at the gate");
                logged = true;
            }
            inner.waiting += 1;
            // Woken by a renewal or a close; the timeout only bounds a missed wake-up.
            inner =
                self.changed.wait_timeout(inner, Duration::from_millis(200)).unwrap_or_else(PoisonError::into_inner).0;
            inner.waiting -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_gate_opens_with_a_lease_and_expires_by_itself() {
        let gate = Gate::new(OnExpiry::Fail);
        assert!(matches!(gate.pass(), Err(GateRefused::NoQuorum(_))));
        gate.renew(Instant::now() + Duration::from_millis(100));
        assert!(gate.pass().is_ok());
        std::thread::sleep(Duration::from_millis(150));
        assert!(!gate.is_open());
        gate.set_reason("the quorum is lost");
        assert_eq!(gate.pass(), Err(GateRefused::NoQuorum("the quorum is lost".to_string())));
    }

    #[test]
    fn a_suspending_gate_holds_requests_until_renewed_or_closed() {
        let gate = Arc::new(Gate::new(OnExpiry::Suspend));
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.pass())
        };
        while gate.waiting() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!waiter.is_finished());
        gate.renew(Instant::now() + Duration::from_secs(10));
        assert_eq!(waiter.join().unwrap(), Ok(()));
        gate.revoke("forced out");
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.pass())
        };
        while gate.waiting() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        gate.close("stopping");
        assert_eq!(waiter.join().unwrap(), Err(GateRefused::Closed("stopping".to_string())));
    }
}
