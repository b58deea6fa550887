//! The copy side of a replication connection: which production volume a copy
//! admits, and what it does with each data frame — as pure functions and a
//! state machine, plus the synchronous applier the copy host's shell uses.
//!
//! ```text
//!  Hello ─▶ identity_for_offer ─▶ CopyHandshake ─▶ Session ─▶ adopt_identity ─▶ (persist) ─▶ Accept
//!                                                                │
//!  Frame ─▶ Receiver::on_frame ─▶ SequenceCheck (session, sequence, generation, epoch)
//!                                  ├─ refused: ReplicationError (kind), frames_rejected + 1, nothing applied,
//!                                  │           the connection is closed
//!                                  └─ Step { persist (raised epoch/generation), apply, reply (ack) }
//!  shell: store metadata ─▶ Applier (io_uring, ordered) ─▶ send the acks in order
//!         (a Flush whose fsync runs may be overtaken: `applier.rs`)
//! ```
//!
//! The shell carries out each [`Step`] in order — persist, then apply, then
//! acknowledge — through [`crate::applier::Applier`]: a raised epoch is
//! durable before any frame carrying it is applied (earlier frames finish
//! first), a write is applied before its ack leaves, acks leave in arrival
//! order, and a write acknowledged before another was issued is never applied
//! after it (overlapping writes in arrival order, BARRIER frames after
//! everything before them): the copy is crash-consistent (DESIGN.md §3,
//! invariant 5). An acknowledged write without FUA is applied (in the page
//! cache); FUA and Flush make it durable before the ack.
//!
//! [`apply_synchronously`] does plain synchronous system calls on the
//! volume; the applier uses it for the rare changes (trim, zeroes, unaligned
//! O_DIRECT writes) after draining its ring.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::buffer::{AlignedBuf, Payload};
use crate::error::EngineError;
use crate::metadata::{format_uuid, StoreState, VolumeMetadata};
use crate::protocol::auth::{Session, VolumeIdentity};
use crate::protocol::error::ReplicationError;
use crate::protocol::frame::{Frame, FrameFlags, FrameHeader, FrameKind, WRITE_BYTES_MAX};
use crate::protocol::sequence::SequenceCheck;
use crate::volume::{write_all_at, Volume};

/// Counters of one copy host, shared across its connections (and later read
/// by the admin endpoint).
#[derive(Debug, Default)]
pub struct ReceiverCounters {
    frames_accepted: AtomicU64,
    frames_rejected: AtomicU64,
    old_epoch_refused: AtomicU64,
    write_bytes_accepted: AtomicU64,
    frames_read_alone: AtomicU64,
}

impl ReceiverCounters {
    /// Frames accepted after the handshake.
    pub fn frames_accepted(&self) -> u64 {
        self.frames_accepted.load(Ordering::Relaxed)
    }

    /// Frames refused: corrupt, replayed, fenced, from another session, in
    /// the handshake or after it. Nothing of a refused frame is applied.
    pub fn frames_rejected(&self) -> u64 {
        self.frames_rejected.load(Ordering::Relaxed)
    }

    /// Hellos and frames refused because their epoch is older than the one
    /// this copy promised: traffic of a deposed production host (invariant
    /// 4). Counted in [`ReceiverCounters::frames_rejected`] too.
    pub fn old_epoch_refused(&self) -> u64 {
        self.old_epoch_refused.load(Ordering::Relaxed)
    }

    /// Payload bytes of accepted writes.
    pub fn write_bytes_accepted(&self) -> u64 {
        self.write_bytes_accepted.load(Ordering::Relaxed)
    }

    /// Frames the applying thread read from the socket itself, while they
    /// arrived one at a time (each spared a hand-off between threads).
    pub fn frames_read_alone(&self) -> u64 {
        self.frames_read_alone.load(Ordering::Relaxed)
    }

    /// Count one frame read by the applying thread.
    pub(crate) fn record_read_alone(&self) {
        self.frames_read_alone.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one frame refused for `error`; returns the new total of
    /// refused frames.
    pub fn record_rejected(&self, error: &ReplicationError) -> u64 {
        if matches!(error, ReplicationError::Fenced { .. }) {
            self.old_epoch_refused.fetch_add(1, Ordering::Relaxed);
        }
        self.frames_rejected.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A change to the store that an accepted frame asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Apply {
    /// Write `data` at `offset`; with `fua`, durably before the ack.
    Write {
        /// Volume offset in bytes.
        offset: u64,
        /// The bytes to write.
        data: Payload,
        /// Force unit access.
        fua: bool,
        /// Resync data, not an application write: a buffered store writes
        /// it uncached ([`Volume::write_uncached`]), so a full resync
        /// does not leave the store's page cache in large folios that every
        /// later 4 KiB write has to walk.
        resync: bool,
    },
    /// Trim `length` bytes at `offset`: they read back as zeroes, as they do
    /// on the production host.
    Trim {
        /// Volume offset in bytes.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// Make it durable before the ack.
        fua: bool,
    },
    /// Write `length` zero bytes at `offset`.
    WriteZeroes {
        /// Volume offset in bytes.
        offset: u64,
        /// Length in bytes.
        length: u64,
        /// Make it durable before the ack.
        fua: bool,
    },
    /// Make everything applied so far durable.
    Flush,
    /// Answer with the checksums of `length` bytes at `offset` (online
    /// verify): the shell reads the extent, after every earlier frame is
    /// applied, and fills the reply's payload with
    /// [`crate::verify::chunk_checksums`].
    Checksum {
        /// Volume offset in bytes.
        offset: u64,
        /// Length in bytes.
        length: u64,
    },
}

/// What the shell does for one accepted frame, in this order: store the
/// metadata, apply the change, send the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Metadata to store durably first: the frame raised the promised epoch
    /// or the generation, and the promise must survive a crash before the
    /// frame takes effect.
    pub persist: Option<VolumeMetadata>,
    /// The change to apply to the store.
    pub apply: Option<Apply>,
    /// Apply the change only after every earlier frame's change is applied
    /// (the frame carries [`FrameFlags::BARRIER`]). Without it a write may
    /// be applied alongside earlier writes it does not overlap.
    pub barrier: bool,
    /// Metadata to store durably after the change is applied and before the
    /// reply: a resync pass's closing flush makes the store consistent again,
    /// which may be recorded only once that flush is done.
    pub persist_after: Option<VolumeMetadata>,
    /// The reply to send once the change is applied (an empty payload): a
    /// WriteAck or FlushAck carrying the frame's own sequence number, or a
    /// Heartbeat answer.
    pub reply: Option<FrameHeader>,
}

/// The data phase of one connection on the copy side.
#[derive(Debug)]
pub struct Receiver<'counters> {
    check: SequenceCheck,
    metadata: VolumeMetadata,
    volume_size: u64,
    counters: &'counters ReceiverCounters,
    refused: bool,
}

impl<'counters> Receiver<'counters> {
    /// The receiver for an established `session` on a store of `volume_size`
    /// bytes whose metadata is `metadata` (as stored, identity adopted).
    pub fn new(
        session: &Session,
        metadata: VolumeMetadata,
        volume_size: u64,
        counters: &'counters ReceiverCounters,
    ) -> Receiver<'counters> {
        assert_eq!(metadata.identity, Some(session.identity), "the session's volume is adopted before data flows");
        assert_eq!(session.identity.size_bytes, volume_size, "the handshake admits only a volume of this size");
        let check = SequenceCheck::new(session.id, metadata.generation, metadata.epoch_promised);
        Receiver { check, metadata, volume_size, counters, refused: false }
    }

    /// The metadata as this receiver last asked for it to be stored.
    pub fn metadata(&self) -> &VolumeMetadata {
        &self.metadata
    }

    /// Judge the next frame: the step to carry out, or the error that
    /// refused it. A refused frame is counted, nothing of it is applied, and
    /// every later frame is refused too — close the connection.
    pub fn on_frame(&mut self, frame: Frame) -> Result<Step, ReplicationError> {
        if self.refused {
            return Err(ReplicationError::Protocol {
                message: "this connection already refused a frame; close it and let the production host reconnect"
                    .into(),
            });
        }
        match self.accept(frame) {
            Ok(step) => {
                self.counters.frames_accepted.fetch_add(1, Ordering::Relaxed);
                Ok(step)
            }
            Err(error) => Err(self.refuse(error)),
        }
    }

    /// Record a frame refused before it reached the receiver (the decoder
    /// found it corrupt, say): counted like any refusal, and the receiver
    /// refuses everything after it.
    pub fn refuse(&mut self, error: ReplicationError) -> ReplicationError {
        self.refused = true;
        self.counters.record_rejected(&error);
        error
    }

    fn accept(&mut self, frame: Frame) -> Result<Step, ReplicationError> {
        let header = frame.header;
        self.check.check(&header)?;
        self.check_receivable(&header)?;
        self.check_extent(&header)?;
        let mut persist = self.raise_promises();
        let mut persist_after = None;
        let resync = matches!(header.kind, FrameKind::ResyncData | FrameKind::ResyncZeroes);
        let pass_begins = header.flags.contains(FrameFlags::PASS);
        if (resync || pass_begins) && self.metadata.state == StoreState::Consistent {
            // A pass began (the production host says so on its first frame,
            // a write after a gap perhaps), or resync data arrived: the
            // image is inconsistent until the pass ends.
            self.metadata.state = StoreState::Syncing;
            persist = Some(self.metadata);
        }
        if header.kind == FrameKind::Flush
            && header.flags.contains(FrameFlags::SYNCED)
            && self.metadata.state == StoreState::Syncing
        {
            self.metadata.state = StoreState::Consistent;
            persist_after = Some(self.metadata);
        }
        let fua = header.flags.contains(FrameFlags::FUA);
        let offset = header.offset;
        let length = u64::from(header.length);
        let (apply, reply_kind) = match header.kind {
            FrameKind::Write | FrameKind::ResyncData => {
                self.counters.write_bytes_accepted.fetch_add(length, Ordering::Relaxed);
                (Some(Apply::Write { offset, data: frame.payload, fua, resync }), Some(FrameKind::WriteAck))
            }
            FrameKind::Trim => (Some(Apply::Trim { offset, length, fua }), Some(FrameKind::WriteAck)),
            FrameKind::WriteZeroes | FrameKind::ResyncZeroes => {
                (Some(Apply::WriteZeroes { offset, length, fua }), Some(FrameKind::WriteAck))
            }
            FrameKind::Flush => (Some(Apply::Flush), Some(FrameKind::FlushAck)),
            FrameKind::ChecksumRequest => (Some(Apply::Checksum { offset, length }), Some(FrameKind::ChecksumReply)),
            FrameKind::Heartbeat => {
                (None, header.flags.contains(FrameFlags::ACK_REQUESTED).then_some(FrameKind::Heartbeat))
            }
            other => unreachable!("{other:?} frames were refused by check_receivable"),
        };
        let barrier = header.flags.contains(FrameFlags::BARRIER);
        Ok(Step { persist, apply, barrier, persist_after, reply: reply_kind.map(|kind| self.reply(kind, &header)) })
    }

    /// Refuse the kinds a copy never receives: handshake frames after the
    /// handshake, acknowledgements, and online verify (not implemented yet).
    fn check_receivable(&self, header: &FrameHeader) -> Result<(), ReplicationError> {
        let kind = header.kind;
        let why = match kind {
            FrameKind::Write
            | FrameKind::ResyncData
            | FrameKind::Trim
            | FrameKind::WriteZeroes
            | FrameKind::ResyncZeroes
            | FrameKind::Flush
            | FrameKind::ChecksumRequest
            | FrameKind::Heartbeat => return Ok(()),
            FrameKind::Hello | FrameKind::Challenge | FrameKind::Response | FrameKind::Accept | FrameKind::Refuse => {
                "is a handshake frame, and the handshake is over"
            }
            FrameKind::WriteAck | FrameKind::FlushAck | FrameKind::ChecksumReply | FrameKind::Error => {
                "is an answer, and a copy host asks nothing of its production host"
            }
        };
        Err(ReplicationError::Protocol {
            message: format!("{kind:?} frame sequence {} {why}; refused, nothing applied", header.sequence),
        })
    }

    fn check_extent(&self, header: &FrameHeader) -> Result<(), ReplicationError> {
        if header.kind == FrameKind::ChecksumRequest && header.length > WRITE_BYTES_MAX {
            return Err(ReplicationError::Protocol {
                message: format!(
                    "ChecksumRequest sequence {} asks for {} bytes at once, over the {WRITE_BYTES_MAX}-byte limit; refused",
                    header.sequence, header.length
                ),
            });
        }
        let end = header.offset + u64::from(header.length);
        if end > self.volume_size {
            return Err(ReplicationError::Protocol {
                message: format!(
                    "{:?} frame sequence {} names bytes {}..{end}, past the end of the {}-byte volume; refused, nothing applied",
                    header.kind, header.sequence, header.offset, self.volume_size
                ),
            });
        }
        Ok(())
    }

    /// Adopt the generation and epoch the check accepted; metadata to store
    /// when either rose.
    fn raise_promises(&mut self) -> Option<VolumeMetadata> {
        let generation = self.check.generation();
        let epoch = self.check.epoch_promised();
        if generation == self.metadata.generation && epoch == self.metadata.epoch_promised {
            return None;
        }
        assert!(generation >= self.metadata.generation && epoch >= self.metadata.epoch_promised, "promises only rise");
        self.metadata.generation = generation;
        self.metadata.epoch_promised = epoch;
        Some(self.metadata)
    }

    fn reply(&self, kind: FrameKind, request: &FrameHeader) -> FrameHeader {
        let extent = matches!(kind, FrameKind::WriteAck | FrameKind::ChecksumReply);
        FrameHeader {
            kind,
            // The ack says the write is durable exactly when the frame asked for it.
            flags: if request.flags.contains(FrameFlags::FUA) { FrameFlags::FUA } else { FrameFlags::NONE },
            session: self.check.session(),
            sequence: request.sequence,
            generation: self.check.generation(),
            epoch: self.check.epoch_promised(),
            offset: if extent { request.offset } else { 0 },
            length: if extent { request.length } else { 0 },
            payload_len: 0,
        }
    }
}

/// Which identity a copy authenticates a production host's Hello under.
/// A copy that mirrors a volume accepts only that volume; a fresh copy
/// accepts a volume of its own size (and adopts it once authenticated, see
/// [`adopt_identity`]). `volume` names the copy's store in the message.
pub fn identity_for_offer(
    volume: &Path,
    volume_size: u64,
    metadata: &VolumeMetadata,
    offered: &VolumeIdentity,
) -> Result<VolumeIdentity, ReplicationError> {
    match metadata.identity {
        Some(mirrored) if mirrored == *offered => Ok(mirrored),
        Some(mirrored) => Err(identity_mismatch(volume, &mirrored, offered)),
        None if offered.size_bytes == volume_size => Ok(*offered),
        None => Err(ReplicationError::Identity {
            message: format!(
                "volume {} is {volume_size} bytes and mirrors no volume yet; production offered uuid {} (size {}); \
                 refusing: a copy must be exactly the size of its volume, so recreate it with --size {}",
                volume.display(),
                format_uuid(&offered.uuid),
                offered.size_bytes,
                offered.size_bytes
            ),
        }),
    }
}

/// After authentication: the metadata to store before accepting the session
/// (`None`: nothing changes), or a refusal when the copy meanwhile came to
/// mirror another volume. A fresh copy adopts the volume, now `syncing` since
/// it needs a full initial sync; and the session's epoch, when higher than
/// the copy's promise, becomes the promise (invariant 4): from the Accept
/// on, a deposed host's Hello is refused, not only once the new session's
/// first frame raised the promise (a deposed host that dialled in that
/// moment took the session over, and its frames were applied).
pub fn adopt_identity(
    volume: &Path,
    metadata: &VolumeMetadata,
    session: &Session,
) -> Result<Option<VolumeMetadata>, ReplicationError> {
    let mut adopted = match metadata.identity {
        Some(mirrored) if mirrored == session.identity => *metadata,
        Some(mirrored) => return Err(identity_mismatch(volume, &mirrored, &session.identity)),
        None => VolumeMetadata { identity: Some(session.identity), state: StoreState::Syncing, ..*metadata },
    };
    adopted.epoch_promised = adopted.epoch_promised.max(session.epoch);
    Ok((adopted != *metadata).then_some(adopted))
}

fn identity_mismatch(volume: &Path, mirrored: &VolumeIdentity, offered: &VolumeIdentity) -> ReplicationError {
    ReplicationError::Identity {
        message: format!(
            "volume {} mirrors uuid {} (size {}); production offered uuid {} (size {}); refusing: \
             point the production host at this volume's copy, or give it a new copy volume",
            volume.display(),
            format_uuid(&mirrored.uuid),
            mirrored.size_bytes,
            format_uuid(&offered.uuid),
            offered.size_bytes
        ),
    }
}

/// The payload of the reply to `apply`: the chunk checksums a Checksum
/// asks for, read from `volume`; empty for every other change.
pub fn reply_payload(volume: &Volume, apply: &Apply) -> Result<Vec<u8>, EngineError> {
    match *apply {
        Apply::Checksum { offset, length } => volume
            .read_synchronously(offset, length)
            .map(|data| crate::verify::chunk_checksums(&data))
            .map_err(|source| EngineError::Io { action: "read an extent to checksum it", source }),
        _ => Ok(Vec::new()),
    }
}

/// Carry out `apply` on `volume` with synchronous system calls, durably
/// when it carries FUA or is a flush. O_DIRECT volumes are written through an
/// aligned buffer, with the edge blocks of an unaligned extent read first.
/// The caller makes sure no change it overlaps is in flight.
pub fn apply_synchronously(volume: &Volume, apply: &Apply) -> Result<(), EngineError> {
    let io_error = |action| move |source| EngineError::Io { action, source };
    match apply {
        Apply::Write { offset, data, fua, resync } => {
            write(volume, *offset, data, *fua, *resync).map_err(io_error("apply a write"))
        }
        // A trim the production host carried out reads back as zeroes there
        // (a punched hole, or zeroes on a block device), so here it is made
        // to read as zeroes too, rather than by a discard whose contents are
        // up to the device.
        Apply::Trim { offset, length, fua } | Apply::WriteZeroes { offset, length, fua } => {
            volume.zero_synchronously(*offset, *length).map_err(io_error("apply a trim or write-zeroes"))?;
            sync_if(volume, *fua)
        }
        Apply::Flush => volume.sync_all().map_err(io_error("apply a flush (fsync)")),
        Apply::Checksum { .. } => Ok(()),
    }
}

fn sync_if(volume: &Volume, durable: bool) -> Result<(), EngineError> {
    if durable {
        volume.sync_all().map_err(|source| EngineError::Io { action: "make a FUA change durable (fsync)", source })?;
    }
    Ok(())
}

fn write(volume: &Volume, offset: u64, data: &[u8], fua: bool, resync: bool) -> io::Result<()> {
    let flags = if fua { libc::RWF_DSYNC } else { 0 };
    if !volume.is_direct() {
        return if resync {
            volume.write_uncached(data, offset, flags)
        } else {
            write_all_at(volume.fd(), data, offset, flags)
        };
    }
    let span = volume.span(offset, data.len() as u64);
    let mut buf = AlignedBuf::new(span.file_len as usize);
    buf.as_mut_slice()[span.head as usize..span.head as usize + data.len()].copy_from_slice(data);
    volume.fill_edges(&span, &mut buf)?;
    write_all_at(volume.fd(), buf.as_slice(), span.file_offset, flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::error::ReplicationErrorKind;
    use crate::volume::VolumeOptions;
    use std::os::unix::fs::FileExt;

    const SIZE: u64 = 1 << 20;
    const IDENTITY: VolumeIdentity = VolumeIdentity { uuid: [0x3c; 16], size_bytes: SIZE };
    const SESSION: Session = Session { id: 0x5e55, identity: IDENTITY, epoch: 1 };

    fn metadata(generation: u64, epoch_promised: u64) -> VolumeMetadata {
        VolumeMetadata {
            identity: Some(IDENTITY),
            generation,
            epoch_promised,
            state: StoreState::Consistent,
            ..VolumeMetadata::fresh()
        }
    }

    fn frame(kind: FrameKind, sequence: u64, offset: u64, payload: &[u8]) -> Frame {
        let mut header = FrameHeader::new(kind);
        header.session = SESSION.id;
        header.sequence = sequence;
        header.generation = 1;
        header.epoch = 1;
        header.offset = offset;
        header.length = payload.len() as u32;
        header.payload_len = payload.len() as u32;
        Frame { header, payload: payload.to_vec().into() }
    }

    fn with(mut frame: Frame, change: impl FnOnce(&mut FrameHeader)) -> Frame {
        change(&mut frame.header);
        frame
    }

    fn ack(kind: FrameKind, sequence: u64, offset: u64, length: u32, flags: FrameFlags) -> FrameHeader {
        FrameHeader {
            kind,
            flags,
            session: SESSION.id,
            sequence,
            generation: 1,
            epoch: 1,
            offset,
            length,
            payload_len: 0,
        }
    }

    /// Writes, FUA, trim, zeroes, flush and heartbeats become exactly these
    /// apply commands and acks, each ack carrying its frame's sequence.
    #[test]
    fn accepted_frames_become_commands_and_acks() {
        let counters = ReceiverCounters::default();
        let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
        let fua = |mut frame: Frame| {
            frame.header.flags = FrameFlags::FUA;
            frame
        };
        let extent =
            |kind, sequence, offset, length| with(frame(kind, sequence, offset, &[]), |header| header.length = length);
        let frames = [
            frame(FrameKind::Write, 1, 4096, b"abc"),
            fua(frame(FrameKind::Write, 2, 0, b"xy")),
            extent(FrameKind::Trim, 3, 8192, 4096),
            extent(FrameKind::WriteZeroes, 4, 512, 100),
            frame(FrameKind::Flush, 5, 0, &[]),
            frame(FrameKind::Heartbeat, 6, 0, &[]),
            with(frame(FrameKind::Heartbeat, 7, 0, &[]), |header| header.flags = FrameFlags::ACK_REQUESTED),
        ];
        let steps: Vec<Step> = frames.into_iter().map(|frame| receiver.on_frame(frame).unwrap()).collect();
        let step =
            |apply, reply| Step { persist: None, apply, barrier: false, persist_after: None, reply: Some(reply) };
        assert_eq!(
            steps,
            [
                step(
                    Some(Apply::Write { offset: 4096, data: b"abc".to_vec().into(), fua: false, resync: false }),
                    ack(FrameKind::WriteAck, 1, 4096, 3, FrameFlags::NONE)
                ),
                step(
                    Some(Apply::Write { offset: 0, data: b"xy".to_vec().into(), fua: true, resync: false }),
                    ack(FrameKind::WriteAck, 2, 0, 2, FrameFlags::FUA)
                ),
                step(
                    Some(Apply::Trim { offset: 8192, length: 4096, fua: false }),
                    ack(FrameKind::WriteAck, 3, 8192, 4096, FrameFlags::NONE)
                ),
                step(
                    Some(Apply::WriteZeroes { offset: 512, length: 100, fua: false }),
                    ack(FrameKind::WriteAck, 4, 512, 100, FrameFlags::NONE)
                ),
                step(Some(Apply::Flush), ack(FrameKind::FlushAck, 5, 0, 0, FrameFlags::NONE)),
                Step { persist: None, apply: None, barrier: false, persist_after: None, reply: None },
                step(None, ack(FrameKind::Heartbeat, 7, 0, 0, FrameFlags::NONE)),
            ]
        );
        assert_eq!(
            (counters.frames_accepted(), counters.frames_rejected(), counters.write_bytes_accepted()),
            (7, 0, 5)
        );
    }

    /// Resync data makes a consistent store `syncing` before it is applied;
    /// the pass's closing flush (SYNCED) makes it consistent after the flush.
    #[test]
    fn store_state_follows_resync_passes() {
        let counters = ReceiverCounters::default();
        let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
        let step = receiver.on_frame(frame(FrameKind::ResyncData, 1, 0, b"data")).unwrap();
        assert_eq!(step.persist.map(|stored| stored.state), Some(StoreState::Syncing));
        let step = receiver.on_frame(frame(FrameKind::ResyncData, 2, 8, b"more")).unwrap();
        assert_eq!(step.persist, None, "already syncing");
        let plain = receiver.on_frame(frame(FrameKind::Flush, 3, 0, &[])).unwrap();
        assert_eq!(plain.persist_after, None, "a flush without SYNCED leaves the store syncing");
        let synced = with(frame(FrameKind::Flush, 4, 0, &[]), |header| header.flags = FrameFlags::SYNCED);
        let step = receiver.on_frame(synced).unwrap();
        assert_eq!((step.persist, step.apply), (None, Some(Apply::Flush)));
        assert_eq!(step.persist_after.map(|stored| stored.state), Some(StoreState::Consistent));
        assert_eq!(receiver.metadata().state, StoreState::Consistent);
    }

    /// A write that says a pass began (PASS: the first frame after a gap)
    /// makes a consistent store `syncing` before it is applied, though no
    /// resync data came yet: from it on the store is no image the volume had.
    #[test]
    fn a_write_that_begins_a_pass_makes_the_store_syncing() {
        let counters = ReceiverCounters::default();
        let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
        let plain = receiver.on_frame(frame(FrameKind::Write, 1, 0, b"data")).unwrap();
        assert_eq!(plain.persist, None, "a write of a consistent session");
        let first = with(frame(FrameKind::Write, 2, 8, b"more"), |header| header.flags = FrameFlags::PASS);
        let step = receiver.on_frame(first).unwrap();
        assert_eq!(step.persist.map(|stored| stored.state), Some(StoreState::Syncing));
    }

    /// Resync zeroes make a consistent store `syncing` like resync data, and
    /// become a WriteZeroes (a punched hole on a file) acknowledged as a write.
    #[test]
    fn resync_zeroes_are_zeroed_and_make_the_store_syncing() {
        let counters = ReceiverCounters::default();
        let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
        let zeroes = with(frame(FrameKind::ResyncZeroes, 1, 65536, &[]), |header| header.length = 65536);
        let step = receiver.on_frame(zeroes).unwrap();
        assert_eq!(step.persist.map(|stored| stored.state), Some(StoreState::Syncing));
        assert_eq!(step.apply, Some(Apply::WriteZeroes { offset: 65536, length: 65536, fua: false }));
        assert_eq!(
            step.reply.map(|reply| (reply.kind, reply.offset, reply.length)),
            Some((FrameKind::WriteAck, 65536, 65536))
        );
    }

    /// A checksum request becomes a Checksum command answered by a
    /// ChecksumReply naming the extent; one over the size limit is refused.
    #[test]
    fn checksum_requests_are_answered_in_order_and_bounded() {
        let counters = ReceiverCounters::default();
        let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
        let request = with(frame(FrameKind::ChecksumRequest, 1, 65536, &[]), |header| header.length = 131072);
        let step = receiver.on_frame(request).unwrap();
        assert_eq!(step.apply, Some(Apply::Checksum { offset: 65536, length: 131072 }));
        let reply = step.reply.unwrap();
        assert_eq!(
            (reply.kind, reply.sequence, reply.offset, reply.length),
            (FrameKind::ChecksumReply, 1, 65536, 131072)
        );
        let huge = with(frame(FrameKind::ChecksumRequest, 2, 0, &[]), |header| header.length = WRITE_BYTES_MAX + 1);
        assert_eq!(receiver.on_frame(huge).unwrap_err().kind(), ReplicationErrorKind::Protocol);
    }

    /// Each kind of bad frame is refused with its kind, counted, yields no
    /// command, and closes the receiver to everything after it.
    #[test]
    fn refused_frames_apply_nothing_and_close_the_receiver() {
        let cases: [(Frame, ReplicationErrorKind); 7] = [
            (frame(FrameKind::Write, 1, 0, b"a"), ReplicationErrorKind::Replay),
            (frame(FrameKind::Write, 3, 0, b"a"), ReplicationErrorKind::Replay),
            (
                with(frame(FrameKind::Write, 2, 0, b"a"), |header| header.session = 7),
                ReplicationErrorKind::WrongSession,
            ),
            (with(frame(FrameKind::Write, 2, 0, b"a"), |header| header.epoch = 0), ReplicationErrorKind::Fenced),
            (frame(FrameKind::Write, 2, SIZE - 1, b"ab"), ReplicationErrorKind::Protocol),
            (frame(FrameKind::WriteAck, 2, 0, &[]), ReplicationErrorKind::Protocol),
            (frame(FrameKind::Hello, 2, 0, &[]), ReplicationErrorKind::Protocol),
        ];
        for (bad, kind) in cases {
            let counters = ReceiverCounters::default();
            let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
            receiver.on_frame(frame(FrameKind::Write, 1, 0, b"first")).unwrap();
            let error = receiver.on_frame(bad.clone()).unwrap_err();
            assert_eq!(error.kind(), kind, "{bad:?}: {error}");
            assert_eq!(counters.frames_rejected(), 1);
            let next = receiver.on_frame(frame(FrameKind::Write, 2, 0, b"a")).unwrap_err();
            assert_eq!(next.kind(), ReplicationErrorKind::Protocol, "{next}");
            assert_eq!((counters.frames_accepted(), counters.frames_rejected()), (1, 1));
        }
    }

    /// Invariant 4: a raised epoch is stored before the frame applies, a frame
    /// below the stored promise is refused, even on a new session.
    #[test]
    fn raised_epoch_is_persisted_first_and_fences_older_frames() {
        let counters = ReceiverCounters::default();
        let mut receiver = Receiver::new(&SESSION, metadata(1, 1), SIZE, &counters);
        let newer = with(frame(FrameKind::Write, 1, 0, b"a"), |header| {
            header.epoch = 5;
            header.generation = 2;
        });
        let step = receiver.on_frame(newer).unwrap();
        let promised = metadata(2, 5);
        assert_eq!(step.persist, Some(promised));
        assert_eq!(step.reply.map(|reply| (reply.epoch, reply.generation)), Some((5, 2)));
        let older = with(frame(FrameKind::Write, 2, 0, b"b"), |header| header.epoch = 4);
        assert_eq!(receiver.on_frame(older).unwrap_err().kind(), ReplicationErrorKind::Fenced);
        let next_session = Session { id: 0x5e56, ..SESSION };
        let mut receiver = Receiver::new(&next_session, promised, SIZE, &counters);
        let older = with(frame(FrameKind::Write, 1, 0, b"b"), |header| {
            header.session = next_session.id;
            header.epoch = 4;
            header.generation = 2;
        });
        assert_eq!(receiver.on_frame(older).unwrap_err().kind(), ReplicationErrorKind::Fenced);
        assert_eq!((counters.frames_rejected(), counters.old_epoch_refused()), (2, 2));
    }

    /// Only a frame older than the promised epoch counts as a deposed
    /// host's traffic; a frame of an older generation, a replayed one or a
    /// corrupt one is counted as refused only.
    #[test]
    fn only_old_epoch_refusals_count_as_old_epoch_traffic() {
        let counters = ReceiverCounters::default();
        // The store promised epoch 2 at generation 2.
        let at = |epoch, generation, sequence| {
            with(frame(FrameKind::Write, sequence, 0, b"a"), |header| {
                header.epoch = epoch;
                header.generation = generation;
            })
        };
        let refusals = [(at(1, 2, 1), true), (at(2, 1, 1), false), (at(2, 2, 0), false)];
        for (count, (refused, old_epoch)) in (1u64..).zip(refusals) {
            let mut receiver = Receiver::new(&SESSION, metadata(2, 2), SIZE, &counters);
            let before = counters.old_epoch_refused();
            let error = receiver.on_frame(refused).unwrap_err();
            assert_eq!(counters.frames_rejected(), count, "{error}");
            assert_eq!(counters.old_epoch_refused(), before + u64::from(old_epoch), "{error}");
        }
        let mut receiver = Receiver::new(&SESSION, metadata(2, 2), SIZE, &counters);
        receiver.refuse(ReplicationError::protocol("a corrupt frame"));
        assert_eq!((counters.frames_rejected(), counters.old_epoch_refused()), (4, 1));
    }

    /// A fresh copy admits a volume of its own size and adopts it as
    /// `syncing`; a copy that mirrors a volume refuses any other, naming both.
    #[test]
    fn identity_is_adopted_once_and_then_enforced() {
        let volume = Path::new("/srv/copy.img");
        let fresh = VolumeMetadata::fresh();
        assert_eq!(identity_for_offer(volume, SIZE, &fresh, &IDENTITY).unwrap(), IDENTITY);
        let other_size = VolumeIdentity { size_bytes: 2 * SIZE, ..IDENTITY };
        let error = identity_for_offer(volume, SIZE, &fresh, &other_size).unwrap_err();
        assert_eq!(error.kind(), ReplicationErrorKind::Identity);
        assert!(error.to_string().contains("--size 2097152"), "{error}");
        let adopted = adopt_identity(volume, &fresh, &SESSION).unwrap().unwrap();
        assert_eq!(adopted, VolumeMetadata { identity: Some(IDENTITY), epoch_promised: SESSION.epoch, ..fresh });
        assert_eq!(adopted.state, StoreState::Syncing);
        assert_eq!(adopt_identity(volume, &adopted, &SESSION).unwrap(), None);
        // A session of a higher epoch is promised before it is accepted; an
        // equal or lower one changes nothing (it was refused at its Hello).
        let newer = Session { epoch: 7, ..SESSION };
        let promised = adopt_identity(volume, &adopted, &newer).unwrap().unwrap();
        assert_eq!(promised, VolumeMetadata { epoch_promised: 7, ..adopted });
        assert_eq!(adopt_identity(volume, &promised, &SESSION).unwrap(), None);
        let other_uuid = VolumeIdentity { uuid: [0x77; 16], ..IDENTITY };
        let error = identity_for_offer(volume, SIZE, &adopted, &other_uuid).unwrap_err();
        assert_eq!(
            error.to_string(),
            "peer refused: volume /srv/copy.img mirrors uuid 3c3c3c3c-3c3c-3c3c-3c3c-3c3c3c3c3c3c (size 1048576); \
             production offered uuid 77777777-7777-7777-7777-777777777777 (size 1048576); refusing: \
             point the production host at this volume's copy, or give it a new copy volume"
        );
        let other_session = Session { identity: other_uuid, ..SESSION };
        assert_eq!(
            adopt_identity(volume, &adopted, &other_session).unwrap_err().kind(),
            ReplicationErrorKind::Identity
        );
    }

    /// The synchronous applier leaves the same bytes on buffered and O_DIRECT
    /// volumes, unaligned extents included.
    #[test]
    fn synchronous_apply_writes_the_same_bytes_buffered_and_direct() {
        let directory = tempfile::tempdir_in("/var/tmp").unwrap();
        let commands = [
            Apply::Write { offset: 0, data: vec![0x11; 3 * 4096].into(), fua: false, resync: true },
            Apply::Write { offset: 4000, data: vec![0x22; 300].into(), fua: true, resync: false },
            Apply::Write { offset: 8191, data: vec![0x33; 5000].into(), fua: false, resync: true },
            Apply::WriteZeroes { offset: 100, length: 50, fua: false },
            Apply::Trim { offset: 4096, length: 4096, fua: true },
            Apply::Write { offset: SIZE - 7, data: vec![0x44; 7].into(), fua: false, resync: true },
            Apply::Flush,
        ];
        let mut expected = vec![0u8; SIZE as usize];
        for command in &commands {
            match command {
                Apply::Write { offset, data, .. } => {
                    expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                Apply::Trim { offset, length, .. } | Apply::WriteZeroes { offset, length, .. } => {
                    expected[*offset as usize..(*offset + *length) as usize].fill(0)
                }
                Apply::Flush | Apply::Checksum { .. } => {}
            }
        }
        for direct in [false, true] {
            let path = directory.path().join(format!("volume-{direct}"));
            let options = VolumeOptions { path: path.clone(), size: Some(SIZE), direct, read_only: false };
            let volume = Volume::open(&options).unwrap();
            for command in &commands {
                apply_synchronously(&volume, command).unwrap();
            }
            let mut contents = vec![0u8; SIZE as usize];
            std::fs::File::open(&path).unwrap().read_exact_at(&mut contents, 0).unwrap();
            assert!(contents == expected, "direct={direct}: the volume differs from the model");
        }
    }
}
