//! The io_uring wrapper: submission, completion, and the in-flight table.
//!
//! Every operation pushed into the ring carries a value `T` that owns the
//! memory the kernel reads or writes (buffers, iovecs, msghdrs). The value is
//! kept in the in-flight table, keyed by the entry's user data, until its
//! completion is reaped; only then is it handed back. A refused push hands the
//! operation back to the caller. In-flight operations never exceed the
//! completion queue, so no completion is ever dropped. Dropping the ring
//! cancels and drains what is in flight; whatever does not finish in time is
//! leaked rather than freed under the kernel.

use std::io;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::error::EngineError;

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// As many operations are in flight as the completion queue holds.
    Full,
}

/// An io_uring instance with an in-flight table of `T`.
pub struct Ring<T> {
    ring: IoUring,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    in_flight: usize,
    in_flight_max: usize,
}

impl<T> Ring<T> {
    /// Set up a ring with `entries` submission slots (a power of two).
    pub fn new(entries: u32) -> Result<Ring<T>, EngineError> {
        let ring = IoUring::builder().setup_cqsize(entries * 2).build(entries).map_err(explain_setup_error)?;
        check_opcodes(&ring)?;
        let in_flight_max = ring.params().cq_entries() as usize;
        Ok(Ring { ring, slots: Vec::new(), free: Vec::new(), in_flight: 0, in_flight_max })
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether another push would be accepted.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.in_flight_max
    }

    /// Queue `entry` with `op` as its owner; returns the token that
    /// identifies it (for cancellation).
    ///
    /// # Safety
    /// Every pointer in `entry` must refer to memory owned by `op` whose
    /// address does not change when `op` is moved (heap memory), or to memory
    /// that outlives the ring. The memory must stay valid until this operation
    /// is returned by [`Ring::reap`]; the ring guarantees it holds `op` until
    /// then.
    pub unsafe fn push(&mut self, entry: squeue::Entry, op: T) -> Result<u64, (T, PushError)> {
        if !self.has_room() {
            return Err((op, PushError::Full));
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let token = index as u64;
        let entry = entry.user_data(token);
        if self.ring.submission().is_full() {
            if let Err(error) = self.ring.submit() {
                tracing::warn!(%error, "io_uring submit failed while making room");
            }
        }
        // SAFETY: the caller guarantees the entry's memory is owned by `op`
        // (or outlives the ring); `op` is stored in `slots[index]` below and
        // only leaves it in `reap`, after the kernel posted the completion.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(index);
            return Err((op, PushError::Full));
        }
        debug_assert!(self.slots[index as usize].is_none());
        self.slots[index as usize] = Some(op);
        self.in_flight += 1;
        Ok(token)
    }

    /// Ask the kernel to cancel the operation behind `token`. The cancel
    /// request itself is owned by `op` and comes back through `reap`.
    pub fn cancel(&mut self, token: u64, op: T) -> Result<u64, (T, PushError)> {
        let entry = opcode::AsyncCancel::new(token).build();
        // SAFETY: AsyncCancel carries no pointers, only the target's user data.
        unsafe { self.push(entry, op) }
    }

    /// Submit what is queued and wait for at least `want` completions, or
    /// until `timeout` passes.
    pub fn submit_and_wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        let want = want.min(self.in_flight);
        let result = match timeout {
            Some(timeout) if want > 0 => {
                let timespec = types::Timespec::from(timeout);
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(want, &args)
            }
            _ => self.ring.submit_and_wait(want),
        };
        match result {
            Ok(_) => Ok(()),
            Err(error) if matches!(error.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => {
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Move every posted completion into `out` as `(op, result)`, where
    /// `result` is the kernel's return value (negative errno on failure).
    pub fn reap(&mut self, out: &mut Vec<(T, i32)>) {
        for cqe in self.ring.completion() {
            let index = cqe.user_data() as usize;
            let Some(op) = self.slots.get_mut(index).and_then(Option::take) else {
                // A completion we did not submit would mean the kernel and the
                // table disagree; that is a bug, not input, so say so loudly.
                panic!("io_uring completion for unknown user data {index}");
            };
            self.free.push(index as u32);
            self.in_flight -= 1;
            out.push((op, cqe.result()));
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let tokens: Vec<u64> = (0..self.slots.len()).filter(|&i| self.slots[i].is_some()).map(|i| i as u64).collect();
        for token in tokens {
            let entry = opcode::AsyncCancel::new(token).build().user_data(u64::MAX);
            // SAFETY: AsyncCancel carries no pointers.
            let _ = unsafe { self.ring.submission().push(&entry) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.in_flight > 0 && Instant::now() < deadline {
            let _ = self.submit_and_wait(1, Some(Duration::from_millis(50)));
            for cqe in self.ring.completion() {
                let index = cqe.user_data() as usize;
                if let Some(slot) = self.slots.get_mut(index) {
                    if slot.take().is_some() {
                        self.in_flight -= 1;
                    }
                }
            }
        }
        if self.in_flight > 0 {
            tracing::error!(in_flight = self.in_flight, "io_uring operations did not finish; leaking their buffers");
            for slot in self.slots.drain(..) {
                std::mem::forget(slot);
            }
        }
    }
}

/// Every opcode the engine and the NBD frontend submit, with the kernel
/// release that brought it.
const OPCODES_USED: [(u8, &str, &str); 8] = [
    (opcode::Nop::CODE, "NOP", "5.1"),
    (opcode::Read::CODE, "READ", "5.6"),
    (opcode::Write::CODE, "WRITE", "5.6"),
    (opcode::Fsync::CODE, "FSYNC", "5.1"),
    (opcode::Fallocate::CODE, "FALLOCATE", "5.6"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL", "5.5"),
    (opcode::Recv::CODE, "RECV", "5.6"),
    (opcode::SendMsg::CODE, "SENDMSG", "5.3"),
];

/// Refuse a ring that lacks an opcode the engine uses, naming it, rather
/// than fail the first request that needs it with EINVAL.
fn check_opcodes(ring: &IoUring) -> Result<(), EngineError> {
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|source| EngineError::UringUnavailable {
        message: "the kernel cannot say which io_uring operations it supports (IORING_REGISTER_PROBE, Linux 5.6)"
            .to_string(),
        source,
    })?;
    let missing = missing_opcodes(|code| probe.is_supported(code));
    if missing.is_empty() {
        return Ok(());
    }
    Err(EngineError::UringUnavailable {
        message: format!("this kernel's io_uring lacks {}; run on Linux 5.6 or newer", missing.join(", ")),
        source: io::Error::from(io::ErrorKind::Unsupported),
    })
}

/// The used opcodes that `supported` says no to, named with their release.
fn missing_opcodes(supported: impl Fn(u8) -> bool) -> Vec<String> {
    OPCODES_USED
        .iter()
        .filter(|(code, _, _)| !supported(*code))
        .map(|(_, name, release)| format!("{name} (Linux {release})"))
        .collect()
}

fn explain_setup_error(source: io::Error) -> EngineError {
    let message = match source.raw_os_error() {
        Some(libc::EPERM) => "io_uring_setup was refused (EPERM): io_uring is disabled by the sysctl kernel.io_uring_disabled or limited to a group by kernel.io_uring_group; run `sysctl kernel.io_uring_disabled=0` as root, or add this user to that group".to_string(),
        Some(libc::ENOSYS) => "io_uring_setup does not exist here (ENOSYS): the kernel is older than 5.1, built without CONFIG_IO_URING, or a seccomp filter (a container runtime's default profile) blocks it; allow io_uring_setup, io_uring_enter and io_uring_register in the seccomp profile or run on a newer kernel".to_string(),
        Some(libc::ENOMEM) => "io_uring_setup could not lock memory (ENOMEM): raise RLIMIT_MEMLOCK (`ulimit -l`)".to_string(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too many open files: raise `ulimit -n`".to_string(),
        _ => "io_uring_setup failed".to_string(),
    };
    EngineError::UringUnavailable { message, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kernel has every opcode used; one without RECV is named with its release.
    #[test]
    fn missing_opcodes_are_named() {
        let ring = IoUring::new(4).expect("io_uring available");
        assert!(check_opcodes(&ring).is_ok());
        let missing = missing_opcodes(|code| code != opcode::Recv::CODE);
        assert_eq!(missing, ["RECV (Linux 5.6)"]);
    }

    #[test]
    fn nop_round_trip_returns_the_owner() {
        let mut ring: Ring<&'static str> = Ring::new(8).expect("io_uring available");
        // SAFETY: Nop carries no pointers.
        unsafe { ring.push(opcode::Nop::new().build(), "first").map_err(|_| ()).unwrap() };
        ring.submit_and_wait(1, None).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out, vec![("first", 0)]);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn push_is_refused_when_the_completion_queue_would_overflow() {
        let mut ring: Ring<u32> = Ring::new(4).expect("io_uring available");
        let capacity = ring.in_flight_max as u32;
        for i in 0..capacity {
            // SAFETY: Nop carries no pointers.
            assert!(unsafe { ring.push(opcode::Nop::new().build(), i) }.is_ok());
        }
        // SAFETY: Nop carries no pointers.
        let refused = unsafe { ring.push(opcode::Nop::new().build(), 99) };
        assert_eq!(refused.unwrap_err(), (99, PushError::Full));
        ring.submit_and_wait(capacity as usize, None).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert_eq!(out.len(), capacity as usize);
    }
}
