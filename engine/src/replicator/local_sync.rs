//! Background fsyncs of the local volume, so that no copy's link waits for
//! one before it sends.
//!
//! A bit may clear only once the region's writes are durable on this host
//! as well as on the copy (DESIGN.md §3). The links used to fsync the volume
//! on their own thread before sending a Flush that could clear bits; on a
//! large, busy volume that fsync took seconds, and every write queued for
//! the copy (a sync copy's client) waited behind it.
//!
//! Now one thread per replicator does the fsyncs, numbered in the order
//! they start. A link's core notes, when it takes a Flush's snapshot of the
//! regions touched since the last one, how many syncs had started by then
//! (read after the snapshot is taken). The regions of that snapshot become
//! clearable candidates at the next Flush's acknowledgement, and they clear
//! only if a sync numbered above that mark has completed: it started after
//! the snapshot, so after every write to those regions completed.
//!
//! A region whose extent the activity log keeps until a clean close (a
//! volume the log holds whole) needs no sync to clear: a crash before the
//! close sets it dirty again from the log, and the close syncs the volume
//! before it empties the log (`Replicator::stop`). On a 1 GiB volume under
//! 4k random writes the 5 s syncs, each writing back seconds of scattered
//! pages, held writers for 0.2–0.3 s (benches/RESULTS.md, twelfth
//! session).
//!
//! Where no sync runs for long, the thread still asks the kernel every
//! [`CHECK_INTERVAL`] whether its own writeback of the volume failed
//! (`WritebackWatch::check`, which writes nothing back), so a lost write
//! fails the store as soon as a sync would have said so.
//!
//! A failed fsync fails the local store for good ([`Shared::fail_local_store`]):
//! the kernel may have dropped the pages it could not write, and a later
//! fsync would not say so.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How often an idle syncing thread checks the volume's writeback error:
/// as often as the clearing rule's syncs at most run
/// (`link::LOCAL_SYNC_INTERVAL_DEFAULT`).
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The syncs asked for, started and completed; see the module docs.
#[derive(Debug)]
pub(crate) struct LocalSync {
    state: Mutex<SyncState>,
    wake: Condvar,
    /// Tests of the core: a request is carried out at once (no thread).
    immediate: bool,
}

#[derive(Debug, Default)]
struct SyncState {
    /// A sync is asked for and has not started.
    requested: bool,
    /// Syncs started so far; the latest started is numbered `started`.
    started: u64,
    /// The number of the latest sync that completed without error.
    completed: u64,
    /// A sync failed: no later sync is started or counted.
    failed: bool,
    stopping: bool,
}

impl LocalSync {
    /// A syncer whose syncs [`LocalSync::run`] carries out.
    pub(crate) fn new() -> LocalSync {
        LocalSync { state: Mutex::new(SyncState::default()), wake: Condvar::new(), immediate: false }
    }

    /// For the core's unit tests: every request is a sync that starts and
    /// completes at once, as the links' inline fsync did.
    #[cfg(test)]
    pub(crate) fn immediate() -> LocalSync {
        LocalSync { state: Mutex::new(SyncState::default()), wake: Condvar::new(), immediate: true }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Syncs started so far (the mark a snapshot notes).
    pub(crate) fn started(&self) -> u64 {
        self.lock().started
    }

    /// The number of the latest sync that completed.
    pub(crate) fn completed(&self) -> u64 {
        self.lock().completed
    }

    /// Whether a sync numbered above `mark` has completed.
    #[cfg(test)]
    pub(crate) fn completed_after(&self, mark: u64) -> bool {
        self.completed() > mark
    }

    /// For the core's unit tests: start the sync asked for, if any, as the
    /// thread would (its number, or `None` if none was asked for).
    #[cfg(test)]
    pub(crate) fn start_requested(&self) -> Option<u64> {
        let mut state = self.lock();
        if !std::mem::take(&mut state.requested) {
            return None;
        }
        state.started += 1;
        Some(state.started)
    }

    /// For the core's unit tests: sync `number` completed.
    #[cfg(test)]
    pub(crate) fn complete(&self, number: u64) {
        self.lock().completed = number;
    }

    /// Ask for a sync numbered above `mark`, unless one has started or is
    /// asked for already. Returns whether this asked.
    pub(crate) fn request_after(&self, mark: u64) -> bool {
        let mut state = self.lock();
        if state.failed || state.requested || state.started > mark {
            return false;
        }
        if self.immediate {
            state.started += 1;
            state.completed = state.started;
            return true;
        }
        state.requested = true;
        self.wake.notify_all();
        true
    }

    /// The syncing thread: carry out each request with `sync` until
    /// [`LocalSync::stop`], and after every `check_interval` with no sync
    /// call `check` (the volume's writeback error, which no sync may ask
    /// about for long where bits clear without one). A failed sync or check
    /// is handed to `failed` and ends it.
    pub(crate) fn run(
        &self,
        sync: impl Fn() -> std::io::Result<()>,
        check: impl Fn() -> std::io::Result<()>,
        check_interval: Duration,
        failed: impl FnOnce(std::io::Error),
    ) {
        let mut state = self.lock();
        loop {
            let mut idle_since = Instant::now();
            while !state.requested && !state.stopping {
                let left = check_interval.saturating_sub(idle_since.elapsed());
                if left.is_zero() {
                    drop(state);
                    let result = check();
                    state = self.lock();
                    if let Err(error) = result {
                        state.failed = true;
                        drop(state);
                        failed(error);
                        return;
                    }
                    idle_since = Instant::now();
                    continue;
                }
                state = self.wake.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
            }
            if state.stopping {
                return;
            }
            state.requested = false;
            state.started += 1;
            let number = state.started;
            drop(state);
            let result = sync();
            state = self.lock();
            match result {
                Ok(()) => state.completed = number,
                Err(error) => {
                    state.failed = true;
                    drop(state);
                    failed(error);
                    return;
                }
            }
        }
    }

    /// End [`LocalSync::run`] (after the sync it is doing, if any).
    pub(crate) fn stop(&self) {
        self.lock().stopping = true;
        self.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_sync_counts_only_once_it_completes_and_only_above_the_mark() {
        let local = Arc::new(LocalSync::new());
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let calls = Arc::new(AtomicU32::new(0));
        let thread = {
            let (local, release, calls) = (local.clone(), release.clone(), calls.clone());
            std::thread::spawn(move || {
                local.run(
                    || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let (lock, condvar) = &*release;
                        let mut go = lock.lock().unwrap();
                        while !*go {
                            go = condvar.wait(go).unwrap();
                        }
                        *go = false;
                        Ok(())
                    },
                    || Ok(()),
                    CHECK_INTERVAL,
                    |_| panic!("no sync fails here"),
                )
            })
        };
        let mark = local.started();
        assert!(local.request_after(mark));
        assert!(!local.request_after(mark), "one asked for is enough");
        while local.started() == mark {
            std::thread::yield_now();
        }
        // Started, not completed: nothing is covered yet.
        assert!(!local.completed_after(mark));
        assert!(!local.request_after(mark), "a sync above the mark is running");
        let later_mark = local.started();
        {
            let (lock, condvar) = &*release;
            *lock.lock().unwrap() = true;
            condvar.notify_all();
        }
        while !local.completed_after(mark) {
            std::thread::yield_now();
        }
        // The sync that ran started before `later_mark` was read: it does
        // not cover a snapshot taken then.
        assert!(!local.completed_after(later_mark));
        assert!(local.request_after(later_mark));
        {
            let (lock, condvar) = &*release;
            *lock.lock().unwrap() = true;
            condvar.notify_all();
        }
        while !local.completed_after(later_mark) {
            std::thread::yield_now();
        }
        local.stop();
        thread.join().unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_sync_is_reported_and_nothing_counts_after_it() {
        let local = LocalSync::new();
        let mark = local.started();
        assert!(local.request_after(mark));
        let mut reported = None;
        local.run(
            || Err(std::io::Error::from_raw_os_error(libc::EIO)),
            || Ok(()),
            CHECK_INTERVAL,
            |error| reported = Some(error),
        );
        assert_eq!(reported.and_then(|error| error.raw_os_error()), Some(libc::EIO));
        assert!(!local.completed_after(mark));
        assert!(!local.request_after(local.started()), "no sync is asked for after a failure");
    }

    /// With no sync asked for, the thread still checks the volume's
    /// writeback error every interval; a failed check fails like a sync.
    #[test]
    fn an_idle_syncer_checks_for_writeback_errors_and_a_failed_check_ends_it() {
        let local = Arc::new(LocalSync::new());
        let checks = Arc::new(AtomicU32::new(0));
        let started = std::time::Instant::now();
        let thread = {
            let (local, checks) = (local.clone(), checks.clone());
            std::thread::spawn(move || {
                let mut reported = None;
                local.run(
                    || panic!("no sync is asked for"),
                    || match checks.fetch_add(1, Ordering::SeqCst) {
                        0..=2 => Ok(()),
                        _ => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                    },
                    Duration::from_millis(20),
                    |error| reported = Some(error),
                );
                reported
            })
        };
        // Stopped after a second at the latest: a syncer that never checks
        // (or ignores a failed check) returns then with nothing reported.
        while !thread.is_finished() && started.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(5));
        }
        local.stop();
        let reported = thread.join().unwrap();
        assert_eq!(reported.and_then(|error| error.raw_os_error()), Some(libc::ENOSPC));
        assert_eq!(checks.load(Ordering::SeqCst), 4, "three checks passed, the fourth failed");
        assert!(started.elapsed() >= Duration::from_millis(80), "checked before each interval passed");
        assert!(!local.request_after(local.started()), "no sync is asked for after a failure");
    }
}
