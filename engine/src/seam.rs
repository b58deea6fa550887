//! The write seam: the one typed interface through which a frontend changes
//! a volume. The frontend does the local I/O (its own io_uring) and tells
//! the seam where each change stands; the seam keeps the bitmap, the copies
//! and the local store's health out of the frontend's sight.
//!
//! ```text
//!  frontend                         seam                               replicator
//!  begin(change) ─────────────────▶ mark the bitmap, count in flight ─▶ (durable before the local I/O)
//!  local I/O …
//!  completed(change, data, owner) ─▶ ship to the copies ─────────────▶ Answer now, or later:
//!  take_answers() ◀── wake_fd() readable ◀── every sync copy acknowledged
//!  failed(change, errno) ──────────▶ the copies resync the extent; a failed sync fails the store
//!  abandon(change) ────────────────▶ never issued: nothing changed, nothing shipped
//! ```
//!
//! An unmirrored volume has the same seam with nothing behind it: every
//! change is answered as soon as its local part completed. The frontend
//! never names a copy, a bitmap region or a replication frame, and the seam
//! never sees a protocol's command codes (cloud-hypervisor's `AsyncIo` keeps
//! its block layer apart the same way).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::bitmap::PendingMarks;
use crate::buffer::{Lent, SharedBytes};
use crate::gate::{Gate, GateRefused};
use crate::replicator::{Change, Completions, Replicator, Shipped, WriteRefused};

/// What a change does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// Bytes written.
    Write,
    /// A range discarded: it reads as zeroes afterwards on a mirrored volume.
    Trim,
    /// A range zeroed.
    WriteZeroes,
    /// Everything completed before it made durable.
    Flush,
}

/// One change to a volume, as the frontend submits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeExtent {
    /// What it does.
    pub kind: ChangeKind,
    /// Volume offset in bytes (0 for a flush).
    pub offset: u64,
    /// Length in bytes (0 for a flush).
    pub length: u64,
    /// Force unit access: durable before it is answered.
    pub fua: bool,
}

impl ChangeExtent {
    /// A flush.
    pub fn flush() -> ChangeExtent {
        ChangeExtent { kind: ChangeKind::Flush, offset: 0, length: 0, fua: false }
    }

    fn is_flush(&self) -> bool {
        self.kind == ChangeKind::Flush
    }
}

/// Why a change or a read is refused before its local part starts.
pub type Refused = WriteRefused;

/// Where a volume's changes go: nowhere beyond the local store, or to the
/// copies through a replicator. A frontend holds one per volume and opens a
/// [`ChangeSeam`] per connection; it never looks inside.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    mirror: Option<Arc<Replicator>>,
    gate: Option<Arc<Gate>>,
}

impl Changes {
    /// The changes of a volume with no copies.
    pub fn unmirrored() -> Changes {
        Changes { mirror: None, gate: None }
    }

    /// The changes of a volume mirrored by `mirror`.
    pub fn mirrored(mirror: Arc<Replicator>) -> Changes {
        Changes { mirror: Some(mirror), gate: None }
    }

    /// These changes, served only while `gate` lets requests through (a
    /// group node's lease from its quorum).
    pub fn gated(self, gate: Arc<Gate>) -> Changes {
        Changes { gate: Some(gate), ..self }
    }

    /// A sync of the whole store failed with `errno` (the server's final
    /// one at shutdown): acknowledged writes may be lost, so a mirrored
    /// store is failed for good, as at a client's failed flush, and the
    /// replicator's stop keeps its activity log (see
    /// [`Replicator::local_flush_failed`]). The kernel reports a writeback
    /// error to one fsync only: a later one would succeed.
    pub fn store_sync_failed(&self, errno: i32) {
        if let Some(mirror) = &self.mirror {
            mirror.local_flush_failed(errno);
        }
    }

    /// A seam for one connection (each has its own answer queue).
    pub fn seam<T>(&self) -> std::io::Result<ChangeSeam<T>> {
        let mut seam = ChangeSeam::new(self.mirror.clone())?;
        seam.gate = self.gate.clone();
        Ok(seam)
    }
}

/// One connection's seam. `T` is what the frontend needs to answer a change
/// later (its request cookie, say); the seam hands it back with the result.
#[derive(Debug)]
pub struct ChangeSeam<T> {
    mirror: Option<Arc<Replicator>>,
    gate: Option<Arc<Gate>>,
    completions: Option<Arc<Completions>>,
    waiting: HashMap<u64, T>,
    next_ticket: u64,
    /// The marks of changes begun with [`ChangeSeam::begin_batched`] and
    /// not yet made durable by [`ChangeSeam::commit_batch`].
    pending: PendingMarks,
}

impl<T> ChangeSeam<T> {
    /// The seam of a volume mirrored by `mirror`, or of an unmirrored one.
    pub fn new(mirror: Option<Arc<Replicator>>) -> std::io::Result<ChangeSeam<T>> {
        let completions = match mirror {
            Some(_) => Some(Completions::new()?),
            None => None,
        };
        Ok(ChangeSeam {
            mirror,
            gate: None,
            completions,
            waiting: HashMap::new(),
            next_ticket: 1,
            pending: PendingMarks::default(),
        })
    }

    /// Before any request is served (a read, a write, a flush, anything):
    /// pass the volume's gate. Blocks while the gate suspends requests; an
    /// error is answered EIO.
    pub fn admit(&self) -> Result<(), GateRefused> {
        match &self.gate {
            Some(gate) => gate.pass(),
            None => Ok(()),
        }
    }

    /// Whether changes are shipped to copies. Overlapping changes must then
    /// be serialised (range locks), so every copy applies them in the order
    /// the local store did; and a trim must leave zeroes, so that every copy
    /// reads the same.
    pub fn is_mirrored(&self) -> bool {
        self.mirror.is_some()
    }

    /// Before a read or a flush: whether the local store can still answer
    /// truthfully (it cannot once a flush of it failed).
    pub fn check_store(&self) -> Result<(), Refused> {
        match self.mirror.as_ref().and_then(|mirror| mirror.local_failure()) {
            Some(why) => Err(WriteRefused::LocalStoreFailed(why)),
            None => Ok(()),
        }
    }

    /// Before the local part of a change is issued: a write, trim or zero
    /// has its regions marked durably in the bitmap and counted in flight
    /// (and is then followed by exactly one `completed`, `failed` or
    /// `abandon` of the same change); a flush is refused once the store
    /// failed one.
    pub fn begin(&self, change: &ChangeExtent) -> Result<(), Refused> {
        match &self.mirror {
            Some(mirror) if !change.is_flush() => mirror.begin_write(change.offset, change.length),
            Some(_) => self.check_store(),
            None => Ok(()),
        }
    }

    /// [`ChangeSeam::begin`] for one change of a batch: its regions are
    /// marked (in memory) and counted in flight, but not yet durable. Call
    /// [`ChangeSeam::commit_batch`] before the local part of any change
    /// begun this way is issued: the batch then shares one activity-log
    /// transaction (or bitmap sync). A refused change needs no `abandon`.
    pub fn begin_batched(&mut self, change: &ChangeExtent) -> Result<(), Refused> {
        match &self.mirror {
            Some(mirror) if !change.is_flush() => {
                mirror.begin_write_batched(change.offset, change.length, &mut self.pending)
            }
            Some(_) => self.check_store(),
            None => Ok(()),
        }
    }

    /// Whether `change`, begun here, may be issued locally: its marks are
    /// durable (always, on an unmirrored volume). The frontend asserts it
    /// before every issue in debug builds (invariant 6).
    pub fn marks_durable(&self, change: &ChangeExtent) -> bool {
        match &self.mirror {
            Some(mirror) if !change.is_flush() => mirror.marks_durable(change.offset, change.length),
            _ => true,
        }
    }

    /// Make the marks of every change begun with [`ChangeSeam::begin_batched`]
    /// since the last commit durable: one activity-log transaction (written
    /// by this thread, or shared with one that another writer is writing) or one
    /// bitmap sync for all of them. Until it returns none of them may be
    /// issued; on an error none ever may: [`ChangeSeam::abandon`] each and
    /// answer it EIO.
    pub fn commit_batch(&mut self) -> Result<(), Refused> {
        let Some(mirror) = &self.mirror else { return Ok(()) };
        if self.pending.is_empty() {
            return Ok(());
        }
        mirror.commit_writes(&mut self.pending)
    }

    /// The local part was never issued: nothing changed, nothing is shipped.
    pub fn abandon(&self, change: &ChangeExtent) {
        if let Some(mirror) = &self.mirror {
            if !change.is_flush() {
                mirror.abandon(change.offset, change.length);
            }
        }
    }

    /// The local part failed with `errno` after it may have changed the
    /// store: nothing is shipped and the copies resync the extent. When the
    /// failure was the sync that makes the change (or a flush) durable, the
    /// store may have lost acknowledged writes: it is failed for good (see
    /// [`Replicator::local_flush_failed`]).
    pub fn failed(&self, change: &ChangeExtent, errno: i32, sync_failed: bool) {
        let Some(mirror) = &self.mirror else { return };
        if sync_failed {
            mirror.local_flush_failed(errno);
        }
        if !change.is_flush() {
            mirror.abandon_changed(change.offset, change.length);
        }
    }

    /// The local part completed (`data` is a write's bytes): ship it. The
    /// answer, `(owner, 0 or -errno)`, is returned now, or later from
    /// [`ChangeSeam::take_answers`] once every sync copy acknowledged.
    pub fn completed(&mut self, change: &ChangeExtent, data: Option<&[u8]>, owner: T) -> Option<(T, i32)> {
        self.ship(change, data, None, owner)
    }

    /// [`ChangeSeam::completed`] for a write whose bytes the caller lends
    /// to the copies (no copy is made; the buffer goes back to its pool
    /// when the last copy has sent it).
    pub fn completed_lent(&mut self, change: &ChangeExtent, data: Lent, owner: T) -> Option<(T, i32)> {
        let shared: SharedBytes = Arc::new(data);
        let bytes = (*shared).as_ref();
        self.ship(change, Some(bytes), Some(shared.clone()), owner)
    }

    fn ship(
        &mut self,
        change: &ChangeExtent,
        data: Option<&[u8]>,
        shared: Option<SharedBytes>,
        owner: T,
    ) -> Option<(T, i32)> {
        let (Some(mirror), Some(completions)) = (&self.mirror, &self.completions) else {
            return Some((owner, 0));
        };
        let ChangeExtent { kind, offset, length, fua } = *change;
        let change = match kind {
            ChangeKind::Write => Change::Write { offset, data: data.expect("a write ships its data"), fua },
            ChangeKind::Trim => Change::Trim { offset, length, fua },
            ChangeKind::WriteZeroes => Change::WriteZeroes { offset, length, fua },
            ChangeKind::Flush => Change::Flush,
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        match mirror.ship_shared(change, shared, completions, ticket) {
            Shipped::Done(result) => Some((owner, result)),
            Shipped::Pending => {
                self.waiting.insert(ticket, owner);
                None
            }
        }
    }

    /// Whether any change waits for its copies.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// The eventfd that is readable (an 8-byte counter) when answers are
    /// ready; `None` on an unmirrored volume.
    pub fn wake_fd(&self) -> Option<RawFd> {
        self.completions.as_ref().map(|completions| completions.fd())
    }

    /// Move every answer that is ready into `out`.
    pub fn take_answers(&mut self, out: &mut Vec<(T, i32)>) {
        let Some(completions) = &self.completions else { return };
        let mut done = Vec::new();
        completions.take(&mut done);
        for (ticket, result) in done {
            if let Some(owner) = self.waiting.remove(&ticket) {
                out.push((owner, result));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without copies every change is answered as soon as its local part
    /// completed, and nothing waits.
    #[test]
    fn an_unmirrored_seam_answers_at_once() {
        let mut seam: ChangeSeam<u32> = ChangeSeam::new(None).unwrap();
        let write = ChangeExtent { kind: ChangeKind::Write, offset: 0, length: 3, fua: false };
        assert!(seam.begin(&write).is_ok());
        assert_eq!(seam.completed(&write, Some(b"abc"), 7), Some((7, 0)));
        assert_eq!(seam.completed(&ChangeExtent::flush(), None, 8), Some((8, 0)));
        assert!(!seam.has_waiting() && seam.wake_fd().is_none() && !seam.is_mirrored());
        assert!(seam.check_store().is_ok());
        let mut answers = Vec::new();
        seam.take_answers(&mut answers);
        assert!(answers.is_empty());
    }
}
