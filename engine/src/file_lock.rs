//! Exclusive advisory locks on open files (`flock`), so that two processes
//! never drive one store or one bitmap. The lock goes with the open file
//! description: it is released when the file is closed or the process dies,
//! so a crash never leaves a stale lock behind.

use std::io;
use std::os::fd::RawFd;

/// Take the exclusive lock of the open file `fd` without waiting: `Ok(true)`
/// when taken, `Ok(false)` when another open file holds it.
pub fn try_lock_exclusive(fd: RawFd) -> io::Result<bool> {
    // SAFETY: flock only reads the descriptor number; the caller keeps the
    // descriptor open for the whole call (it owns the file it names).
    let result = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.kind() == io::ErrorKind::WouldBlock {
        return Ok(false);
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A second open file of the same path cannot take the lock until the
    /// first is closed.
    #[test]
    fn one_holder_at_a_time() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("store");
        let first = std::fs::File::create(&path).unwrap();
        let second = std::fs::File::open(&path).unwrap();
        assert!(try_lock_exclusive(first.as_raw_fd()).unwrap());
        assert!(!try_lock_exclusive(second.as_raw_fd()).unwrap());
        drop(first);
        assert!(try_lock_exclusive(second.as_raw_fd()).unwrap());
    }
}
