//! Admission of unauthenticated replication connections to the copy role
//! ([`crate::copy_role`]): which handshakes may stay open, and which one is
//! closed to make room.
//!
//! A peer without the secret must not keep the real production host out. A
//! fixed table of handshakes that refuses newcomers when full let a client
//! re-opening idle connections keep a restarted production host out for 45 s.
//! Here a newcomer always gets a slot: when the table is full (or its peer
//! address holds its share), the oldest handshake that has not yet sent its
//! Hello is closed — else the oldest one of the address that holds the most.
//! A real production host sends its Hello as soon as it connects, so idle
//! connections are always evicted before it; sending a Hello takes no
//! secret, so among greeted ones a flood from a few addresses loses its own
//! before the production host's single handshake (only as many addresses as
//! the table has slots could push it out); and an idle connection is closed
//! anyway after the short Hello deadline. The choice is a pure function
//! ([`victim`]), tested below.

use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Handshakes (unauthenticated connections) open at once.
pub const HANDSHAKES_MAX: usize = 16;
/// Handshakes open at once from one IP address.
pub const HANDSHAKES_PER_PEER_MAX: usize = 8;

/// What the choice of a victim looks at.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// The peer's address.
    pub peer: SocketAddr,
    /// When the connection was accepted.
    pub accepted: Instant,
    /// Whether its Hello arrived.
    pub greeted: bool,
}

/// Which handshake to close before a new one from `ip` is admitted, if any:
/// the table is full, or `ip` holds its share of it. Within the set that is
/// over its limit (`ip`'s own handshakes, else all), idle ones (no Hello
/// yet) go first, then those of the address holding the most, the oldest
/// first.
pub fn victim(pending: &[Pending], ip: IpAddr) -> Option<usize> {
    let held_by = |ip: IpAddr| pending.iter().filter(|entry| entry.peer.ip() == ip).count();
    let from_ip = held_by(ip);
    let only_ip = if from_ip >= HANDSHAKES_PER_PEER_MAX {
        true
    } else if pending.len() >= HANDSHAKES_MAX {
        false
    } else {
        return None;
    };
    pending
        .iter()
        .enumerate()
        .filter(|(_, entry)| !only_ip || entry.peer.ip() == ip)
        .min_by_key(|(_, entry)| (entry.greeted, std::cmp::Reverse(held_by(entry.peer.ip())), entry.accepted))
        .map(|(index, _)| index)
}

struct Entry {
    id: u64,
    pending: Pending,
    /// A second handle on the socket, to close it when it is evicted.
    stream: TcpStream,
}

/// The open handshakes.
#[derive(Default)]
pub struct Admission {
    entries: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
}

/// A handshake closed to make room for a newer one.
#[derive(Debug)]
pub struct Evicted {
    /// Its peer.
    pub peer: SocketAddr,
    /// Whether it had sent its Hello.
    pub greeted: bool,
}

impl Admission {
    fn entries(&self) -> MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admit `stream` from `peer`, closing the handshake [`victim`] names;
    /// returns the new handshake's ticket and the one closed, if any.
    pub fn admit(
        &self,
        stream: &TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> std::io::Result<(Ticket<'_>, Option<Evicted>)> {
        let clone = stream.try_clone()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries();
        // A peer whose Hello is waiting in the socket, not yet read by its
        // thread, counts as greeted: a busy host must not evict the real
        // production host in the moment between its Hello and the read.
        let views: Vec<Pending> = entries
            .iter()
            .map(|entry| Pending { greeted: entry.pending.greeted || bytes_waiting(&entry.stream), ..entry.pending })
            .collect();
        let evicted = victim(&views, peer.ip()).map(|index| {
            let entry = entries.swap_remove(index);
            let _ = entry.stream.shutdown(Shutdown::Both);
            Evicted { peer: entry.pending.peer, greeted: entry.pending.greeted }
        });
        entries.push(Entry { id, pending: Pending { peer, accepted: now, greeted: false }, stream: clone });
        assert!(entries.len() <= HANDSHAKES_MAX, "the handshake table holds at most {HANDSHAKES_MAX}");
        Ok((Ticket { admission: self, id }, evicted))
    }
}

/// Whether the peer sent bytes not yet read, without waiting or taking them.
fn bytes_waiting(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most 1 byte into `byte`, which lives across the
    // call; `stream` keeps the descriptor open. MSG_PEEK leaves the byte in
    // the socket and MSG_DONTWAIT keeps the call from blocking.
    let received = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    received > 0
}

/// A handshake's place in the table; it leaves the table when dropped.
pub struct Ticket<'admission> {
    admission: &'admission Admission,
    id: u64,
}

impl Ticket<'_> {
    /// The peer sent its Hello: evict idle handshakes before this one.
    pub fn greeted(&self) {
        if let Some(entry) = self.admission.entries().iter_mut().find(|entry| entry.id == self.id) {
            entry.pending.greeted = true;
        }
    }
}

impl Ticket<'_> {
    /// Whether this handshake was closed to make room (the closing was logged).
    pub fn evicted(&self) -> bool {
        !self.admission.entries().iter().any(|entry| entry.id == self.id)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.admission.entries().retain(|entry| entry.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pending(ip: &str, port: u16, age_ms: u64, greeted: bool, now: Instant) -> Pending {
        Pending {
            peer: SocketAddr::new(ip.parse().unwrap(), port),
            accepted: now - Duration::from_millis(age_ms),
            greeted,
        }
    }

    #[test]
    fn room_left_evicts_nobody() {
        let now = Instant::now();
        let table: Vec<Pending> =
            (0..HANDSHAKES_MAX as u16 - 1).map(|i| pending(&format!("10.0.0.{i}"), 1, 5, false, now)).collect();
        assert_eq!(victim(&table, "10.0.1.1".parse().unwrap()), None);
    }

    #[test]
    fn a_full_table_evicts_the_oldest_idle_handshake_before_any_greeted_one() {
        let now = Instant::now();
        let mut table: Vec<Pending> = (0..HANDSHAKES_MAX as u16)
            .map(|i| pending(&format!("10.0.0.{i}"), 1, 100 + i as u64, false, now))
            .collect();
        table[HANDSHAKES_MAX - 1].greeted = true; // the oldest, but it sent its Hello
        assert_eq!(victim(&table, "10.0.1.1".parse().unwrap()), Some(HANDSHAKES_MAX - 2));
        for entry in &mut table {
            entry.greeted = true;
        }
        assert_eq!(victim(&table, "10.0.1.1".parse().unwrap()), Some(HANDSHAKES_MAX - 1), "all greeted: the oldest");
    }

    /// Greeted handshakes from two flooding addresses (a Hello needs no
    /// secret) cannot push out the production host's one, the oldest.
    #[test]
    fn a_flood_from_several_addresses_loses_its_own_greeted_handshakes_first() {
        let now = Instant::now();
        let mut table = vec![pending("10.0.0.100", 1, 1000, true, now)]; // production, mid-handshake
        table.extend((0..8u16).map(|i| pending("10.0.0.1", i, 100 + i as u64, true, now)));
        table.extend((0..7u16).map(|i| pending("10.0.0.2", i, 10 + i as u64, true, now)));
        assert_eq!(table.len(), HANDSHAKES_MAX);
        assert_eq!(victim(&table, "10.0.0.2".parse().unwrap()), Some(8), "the busiest address's oldest");
    }

    #[test]
    fn a_peer_over_its_share_loses_its_own_oldest_idle_handshake() {
        let now = Instant::now();
        let mut table = vec![pending("10.0.0.9", 1, 1000, false, now)]; // another peer's, oldest of all
        table.extend((0..HANDSHAKES_PER_PEER_MAX as u16).map(|i| pending("10.0.0.1", i, 10 + i as u64, i == 7, now)));
        assert_eq!(victim(&table, "10.0.0.1".parse().unwrap()), Some(7), "its oldest idle one, port 6");
        assert_eq!(victim(&table, "10.0.0.2".parse().unwrap()), None, "another peer still has room");
    }
}
