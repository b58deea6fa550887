//! The data phase of a copy role session: judge each frame (the pure
//! [`crate::receiver::Receiver`]), store raised promises durably, apply the
//! change through [`crate::applier`] and send the acks it releases, in
//! order. A helper thread reads and checks frames ahead of the applying
//! thread (at most PIPELINE_FRAMES), except while they arrive one at a time
//! (see [`Socket`]); a change that cannot be applied is reported to the
//! production host in an Error frame.

use std::collections::VecDeque;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::connection::{log_ending, refusal_name, Connection, Ending};
use super::Host;
use crate::applier::{Applier, Doorbell};
use crate::metadata::store_metadata;
use crate::metadata::StoreState;
use crate::protocol::auth::Session;
use crate::protocol::copy_failure::{CopyFailure, CopyFailureKind};
use crate::protocol::frame::{encode_frame, Frame};
use crate::receiver::{Apply, Receiver, ReceiverCounters, Step};

/// Batches of frames read and checked ahead of the one being applied: each
/// one frame (at most a maximal frame, 32 MiB; in practice one NBD request,
/// up to 1 MiB) and the frames after it that were already whole in the read
/// buffer (256 KiB), at most BATCH_FRAMES.
const PIPELINE_FRAMES: usize = 8;
/// At most this many frames are handed to the applying thread at once: one
/// wake-up of it for the frames that arrived together, not one per frame.
const BATCH_FRAMES: usize = 64;

/// What the reading stage hands the applying stage: frames in order, the
/// last of them possibly how the connection ended; and whether the socket
/// is the applying thread's to read after them (see [`Socket`]).
struct Batch {
    frames: Vec<Result<Frame, Ending>>,
    hand_over: bool,
}
/// After an Error frame, how long the connection is read and discarded
/// while the production host closes its end: closing with its frames
/// unread would reset the connection, and the reset may discard the report.
const ERROR_LINGER: Duration = Duration::from_secs(2);
/// While frames keep arriving, the replies ready go out at least after
/// this many frames or this long: otherwise they would wait for a moment
/// with no frame waiting, which a backlog of slow changes (each saving a
/// before-image during a pass, say) may not give for longer than the
/// production host's ack timeout, and a working copy would be taken for a
/// hung one.
const REPLY_EVERY_FRAMES: usize = 64;
const REPLY_EVERY: Duration = Duration::from_millis(10);
/// During a pass that keeps an undo journal, the writes already here are
/// held (at most this many frames and bytes), their before-images saved,
/// then made durable with one fdatasync before all of them are issued: one
/// fdatasync per burst rather than one per write. The journal syncs on its
/// own past UNSYNCED_ENTRIES_MAX entries (large writes).
const HOLD_FRAMES: usize = 64;
const HOLD_BYTES: u64 = 8 << 20;

/// The data phase: judge each frame, store raised promises, apply, ack.
pub(super) fn receive(connection: &mut Connection<'_>, session: &Session) {
    let host = connection.host;
    let peer = connection.peer;
    let mut writer = match connection.stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot clone the socket for acknowledgements; closing the connection");
            return;
        }
    };
    let doorbell = match Doorbell::new() {
        Ok(doorbell) => doorbell,
        Err(error) => {
            tracing::error!(%peer, %error, "cannot create an eventfd; closing the connection");
            return;
        }
    };
    let mut applier = match Applier::new(&host.volume, Some(doorbell.clone())) {
        Ok(applier) => applier,
        Err(error) => {
            tracing::error!(%peer, "cannot set up the io_uring applier: {error}; closing the connection");
            return;
        }
    };
    // Two stages: this thread's helper reads and checks frames (socket copy,
    // CRC) while this thread applies them and acknowledges. Payloads are
    // received into the applier's aligned buffers, which an O_DIRECT store
    // writes as they are.
    connection.receive_into(applier.pool());
    let (sender, frames) = std::sync::mpsc::sync_channel::<Batch>(PIPELINE_FRAMES);
    let socket = Socket::new(connection);
    std::thread::scope(|scope| {
        let ringer = doorbell.clone();
        let socket = &socket;
        scope.spawn(move || {
            let mut lone_before = false;
            while let Some(connection) = socket.take(Turn::Helper) {
                let mut frames = Vec::new();
                let ended = loop {
                    let next = connection.next_frame(None);
                    let ended = next.is_err();
                    frames.push(next);
                    if ended || frames.len() == BATCH_FRAMES || !connection.next_frame_buffered() {
                        break ended;
                    }
                };
                // A second lone frame in a row (nothing behind it, in the
                // read buffer or the socket): the socket goes with it.
                let lone = !ended && frames.len() == 1 && connection.nothing_unread();
                let hand_over = lone && lone_before;
                lone_before = lone && !hand_over;
                socket.put_back(connection, if hand_over { Turn::Applier } else { Turn::Helper });
                let sent = sender.send(Batch { frames, hand_over });
                ringer.ring();
                if sent.is_err() || ended {
                    break;
                }
            }
        });
        let ending = apply_frames(host, peer, session, (&frames, socket), &doorbell, &mut applier, &mut writer);
        // The helper reads whatever comes from now on (the lingering after
        // an Error frame included), until the end.
        socket.applying_ended();
        // What was applied before the connection ended (or before the change
        // that failed: after a failure replies leave in order, and a failed
        // change's never) is acknowledged.
        let _ = applier.drain();
        let mut outgoing = Vec::new();
        applier.take_replies(&mut outgoing);
        let report = match ending {
            Applied::Failed(Some(failure)) => Some(failure),
            Applied::Ended | Applied::Failed(None) => None,
        };
        if let Some(failure) = &report {
            // Tell the production host why, so it does not take this for a
            // lost link and resend at once (it backs off and says why in status).
            let (header, payload) = failure.to_frame(session.id);
            outgoing.extend_from_slice(&encode_frame(&header, &payload));
            tracing::warn!(%peer, kind = failure.kind.as_str(),
                "telling production host {peer} why this copy stops: {}", failure.message);
        }
        if writer.write_all(&outgoing).is_ok() && report.is_some() {
            let _ = writer.shutdown(std::net::Shutdown::Write);
            linger(&frames);
        }
        // Stop the reader: it sees the closed channel, the closed socket or
        // that its turn never comes again.
        drop(frames);
        socket.put_turn(Turn::Done);
        let _ = writer.shutdown(std::net::Shutdown::Both);
    });
}

/// Whose turn it is to read the socket.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Turn {
    /// The helper thread's: it reads frames and hands them over in batches.
    Helper,
    /// The applying thread's, while frames arrive one at a time.
    Applier,
    /// Nobody's: the connection is ending.
    Done,
}

/// The connection's socket, read by one thread at a time. The helper reads
/// it while frames come in bunches, so that reading (a socket copy, a CRC)
/// overlaps applying. When frames arrive one at a time with nothing in
/// between (a lone sync write at a time, QD1), the hand-off of each frame
/// between the two threads is a wake-up that the production host's write
/// waits for (25–50 µs on the shared virtual cores of the benchmarks): after
/// two lone frames in a row (no byte behind either, in the read buffer or
/// the socket: a large payload read straight into its buffer does not count
/// as lone while the next one is arriving) the helper hands the socket over
/// with the second, and the applying thread reads the next frames itself
/// while it has nothing in flight. It hands the socket back as soon as a
/// read leaves bytes of another frame behind the one it took, or a change
/// is still in flight when the next frame is due.
struct Socket<'c, 'h> {
    holder: Mutex<Holder<'c, 'h>>,
    turn_changed: Condvar,
}

struct Holder<'c, 'h> {
    /// The connection, taken out by whichever thread reads it.
    connection: Option<&'c mut Connection<'h>>,
    turn: Turn,
    /// Whether the applying stage still runs (the socket is handed over
    /// only while it does).
    applying: bool,
}

impl<'c, 'h> Socket<'c, 'h> {
    fn new(connection: &'c mut Connection<'h>) -> Self {
        Socket {
            holder: Mutex::new(Holder { connection: Some(connection), turn: Turn::Helper, applying: true }),
            turn_changed: Condvar::new(),
        }
    }

    /// The connection, once it is `turn`'s to read; `None` once the
    /// connection is ending. Taken whole: the reader holds no lock while it
    /// blocks on the socket.
    fn take(&self, turn: Turn) -> Option<&'c mut Connection<'h>> {
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if holder.turn == Turn::Done {
                return None;
            }
            if holder.turn == turn {
                if let Some(connection) = holder.connection.take() {
                    return Some(connection);
                }
            }
            holder = self.turn_changed.wait(holder).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Give the connection back, with the turn to read it next.
    fn put_back(&self, connection: &'c mut Connection<'h>, turn: Turn) {
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        holder.connection = Some(connection);
        let turn = if turn == Turn::Applier && !holder.applying { Turn::Helper } else { turn };
        self.set_turn(&mut holder, turn);
    }

    /// The applying stage stopped: the helper reads from now on.
    fn applying_ended(&self) {
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        holder.applying = false;
        self.set_turn(&mut holder, Turn::Helper);
    }

    /// Pass the turn (the connection is not being read, or its reader will
    /// give it back): the connection's end is never undone.
    fn put_turn(&self, turn: Turn) {
        let mut holder = self.holder.lock().unwrap_or_else(PoisonError::into_inner);
        self.set_turn(&mut holder, turn);
    }

    fn set_turn(&self, holder: &mut Holder<'c, 'h>, turn: Turn) {
        if holder.turn != Turn::Done && holder.turn != turn {
            holder.turn = turn;
            self.turn_changed.notify_all();
        }
    }
}

/// Read and discard frames until the production host closes its end (it
/// does on the Error frame) or ERROR_LINGER passes.
fn linger(frames: &std::sync::mpsc::Receiver<Batch>) {
    let deadline = Instant::now() + ERROR_LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match frames.recv_timeout(left) {
            Ok(batch) if !left.is_zero() && batch.frames.iter().all(Result::is_ok) => {}
            _ => return,
        }
    }
}

/// How the applying stage ended.
enum Applied {
    /// The connection ended or a frame was refused; what was applied may
    /// still be acknowledged.
    Ended,
    /// A change could not be made (nothing from it on is acknowledged);
    /// the report for the production host, unless the socket itself failed.
    Failed(Option<CopyFailure>),
}

/// The applying stage: judge each frame, store raised promises, hand the
/// change to the applier (during a pass, the writes that arrived together
/// after their before-images are durable), and send the replies it
/// releases, in batches: whenever no frame is waiting, and every
/// REPLY_EVERY_FRAMES frames or REPLY_EVERY while frames keep coming.
fn apply_frames(
    host: &Host,
    peer: SocketAddr,
    session: &Session,
    (frames, socket): (&std::sync::mpsc::Receiver<Batch>, &Socket<'_, '_>),
    doorbell: &Doorbell,
    applier: &mut Applier<'_>,
    writer: &mut TcpStream,
) -> Applied {
    let metadata = *host.metadata();
    let mut receiver = Receiver::new(session, metadata, host.volume.size(), host.counters());
    let mut outgoing: Vec<u8> = Vec::new();
    let mut received = Received {
        frames,
        socket,
        counters: host.counters(),
        reading: false,
        bunched: false,
        batch: VecDeque::new(),
        taken: 0,
        replied_at: Instant::now(),
    };
    let (mut held, mut held_bytes) = (Vec::new(), 0);
    loop {
        let next = if held.is_empty() {
            wait_for_frame(host, peer, &mut received, doorbell, applier, writer, &mut outgoing)
        } else {
            // Only a frame already here joins the held ones.
            match received.try_next() {
                Ok(Some(next)) => Ok(next),
                Ok(None) => {
                    held_bytes = 0;
                    match issue_held(host, peer, applier, &mut held) {
                        Ok(()) => continue,
                        Err(applied) => return applied,
                    }
                }
                Err(ended) => Err(ended),
            }
        };
        let alone = received.nothing_waiting();
        let outcome = next.and_then(|next| judge(host, peer, &mut receiver, next)).and_then(|step| {
            // Held: a write during a pass whose before-images were just saved.
            let saved = match step.apply.as_ref().and_then(changed_extent) {
                Some((offset, length)) if step.persist.is_none() && step.persist_after.is_none() => {
                    host.save_before(offset, length).then_some(length)
                }
                _ => None,
            };
            let Some(length) = saved else {
                held_bytes = 0;
                return issue_held(host, peer, applier, &mut held).and_then(|()| {
                    if alone {
                        applier.alone_next();
                    }
                    carry_out(host, peer, applier, step)
                });
            };
            held.push(step);
            held_bytes += length;
            if held.len() < HOLD_FRAMES && held_bytes < HOLD_BYTES {
                return Ok(());
            }
            held_bytes = 0;
            issue_held(host, peer, applier, &mut held)
        });
        if let Err(applied) = outcome {
            // The frames judged before the one that ended the loop are
            // applied (and acknowledged), as they would be unheld.
            return issue_held(host, peer, applier, &mut held).err().unwrap_or(applied);
        }
    }
}

/// Issue the held changes, in order, once their before-images are durable.
fn issue_held(host: &Host, peer: SocketAddr, applier: &mut Applier<'_>, held: &mut Vec<Step>) -> Result<(), Applied> {
    if held.is_empty() {
        return Ok(());
    }
    host.sync_saved();
    for step in held.drain(..) {
        applier
            .start(step.apply, step.barrier, step.reply)
            .map_err(|error| store_failed(host, peer, error, "apply a change"))?;
    }
    Ok(())
}

/// The frames from the reader, and those of its last batch not yet taken;
/// whether the socket is this thread's to read (see [`Socket`]); how many
/// frames were taken since replies last went out, and when that was.
struct Received<'a, 'c, 'h> {
    frames: &'a std::sync::mpsc::Receiver<Batch>,
    socket: &'a Socket<'c, 'h>,
    counters: &'a ReceiverCounters,
    reading: bool,
    /// The last frame this thread read had another behind it.
    bunched: bool,
    batch: VecDeque<Result<Frame, Ending>>,
    taken: usize,
    replied_at: Instant,
}

impl Received<'_, '_, '_> {
    /// The next frame of `batch`, which is then the rest of it.
    fn first_of(&mut self, batch: Batch) -> Result<Result<Frame, Ending>, Applied> {
        self.keep(batch);
        self.batch.pop_front().ok_or(Applied::Ended)
    }

    /// Queue a batch's frames; the helper reads nothing after a batch that
    /// hands the socket over.
    fn keep(&mut self, batch: Batch) {
        self.reading |= batch.hand_over;
        self.batch.extend(batch.frames);
    }

    /// The next frame, read from the socket by this thread: only when every
    /// frame the helper read was taken and nothing is in flight. The socket
    /// goes back to the helper when the read left bytes of another frame
    /// behind this one (frames come in bunches again).
    fn read_alone(&mut self) -> Result<Frame, Ending> {
        debug_assert!(self.reading && self.batch.is_empty());
        let Some(connection) = self.socket.take(Turn::Applier) else {
            self.reading = false;
            return Err(Ending::Shutdown);
        };
        let next = connection.next_frame(None);
        let bunched = next.is_ok() && !connection.nothing_unread();
        self.reading = next.is_ok() && !bunched;
        self.bunched = bunched;
        let turn = match &next {
            Err(_) => Turn::Done,
            Ok(_) if bunched => Turn::Helper,
            Ok(_) => Turn::Applier,
        };
        self.socket.put_back(connection, turn);
        self.taken += 1;
        if next.is_ok() {
            self.counters.record_read_alone();
        }
        next
    }

    /// The helper reads the socket again (a change is in flight, or the
    /// applying stage stops).
    fn hand_back(&mut self) {
        if std::mem::take(&mut self.reading) {
            self.socket.put_turn(Turn::Helper);
        }
    }

    fn try_next(&mut self) -> Result<Option<Result<Frame, Ending>>, Applied> {
        use std::sync::mpsc::TryRecvError;
        let next = match self.batch.pop_front() {
            Some(next) => Some(next),
            None => match self.frames.try_recv() {
                Ok(batch) => Some(self.first_of(batch)?),
                Err(TryRecvError::Disconnected) => return Err(Applied::Ended),
                Err(TryRecvError::Empty) => None,
            },
        };
        self.taken += usize::from(next.is_some());
        Ok(next)
    }

    /// Whether no frame waits behind the one just taken: none left of its
    /// batch, and none from the reader now (a batch that came is kept for
    /// [`Received::try_next`]).
    fn nothing_waiting(&mut self) -> bool {
        if std::mem::take(&mut self.bunched) {
            // The helper is reading the frame behind it.
            return false;
        }
        if self.batch.is_empty() {
            if let Ok(batch) = self.frames.try_recv() {
                self.keep(batch);
            }
        }
        self.batch.is_empty()
    }

    /// Whether the replies ready should go out before the next frame,
    /// though frames are waiting.
    fn reply_due(&self) -> bool {
        self.taken >= REPLY_EVERY_FRAMES || self.replied_at.elapsed() >= REPLY_EVERY
    }
}

/// Send the replies the applier has released; `Err` once the socket failed.
fn send_replies(
    peer: SocketAddr,
    received: &mut Received<'_, '_, '_>,
    applier: &mut Applier<'_>,
    writer: &mut TcpStream,
    outgoing: &mut Vec<u8>,
) -> Result<(), Applied> {
    received.taken = 0;
    received.replied_at = Instant::now();
    applier.take_replies(outgoing);
    if outgoing.is_empty() {
        return Ok(());
    }
    let sent = writer.write_all(outgoing);
    outgoing.clear();
    sent.map_err(|error| {
        log_ending(peer, "", &Ending::Io(error));
        Applied::Failed(None)
    })
}

/// The next frame from the reader. While none is there, the replies that
/// are ready go out and the applier's ring makes progress; `Err` says how
/// the loop ends (the reader is gone, or sending or applying failed).
fn wait_for_frame(
    host: &Host,
    peer: SocketAddr,
    received: &mut Received<'_, '_, '_>,
    doorbell: &Doorbell,
    applier: &mut Applier<'_>,
    writer: &mut TcpStream,
    outgoing: &mut Vec<u8>,
) -> Result<Result<Frame, Ending>, Applied> {
    loop {
        if received.reply_due() {
            // Changes that completed meanwhile release their replies too.
            applier.poll().map_err(|error| store_failed(host, peer, error, "apply a change"))?;
            send_replies(peer, received, applier, writer, outgoing)?;
        }
        if let Some(next) = received.try_next()? {
            return Ok(next);
        }
        send_replies(peer, received, applier, writer, outgoing)?;
        if applier.idle() {
            if received.reading {
                return Ok(received.read_alone());
            }
            let batch = received.frames.recv().map_err(|_| Applied::Ended)?;
            return received.first_of(batch);
        }
        // Wait for a change to complete or a frame to arrive; frames are
        // the helper's to read meanwhile.
        received.hand_back();
        doorbell.arm();
        match received.try_next() {
            Ok(Some(next)) => {
                doorbell.disarm();
                return Ok(next);
            }
            Ok(None) => applier.wait().map_err(|error| store_failed(host, peer, error, "apply a change"))?,
            Err(ended) => return Err(ended),
        }
    }
}

/// Judge a frame (or the reader's ending) with the receiver; a refused
/// frame ends the connection, nothing of it applied.
fn judge(
    host: &Host,
    peer: SocketAddr,
    receiver: &mut Receiver<'_>,
    next: Result<Frame, Ending>,
) -> Result<Step, Applied> {
    let judged = match next {
        Ok(frame) => receiver.on_frame(frame),
        Err(Ending::Refused(error)) => Err(receiver.refuse(error)),
        Err(ending) => {
            log_ending(peer, "", &ending);
            return Err(Applied::Ended);
        }
    };
    judged.map_err(|error| {
        let total = host.counters().frames_rejected();
        tracing::warn!(
            %peer,
            kind = ?error.kind(),
            frames_rejected = total,
            "refused a frame from production host {peer}: {}: {error}; nothing of it was applied; \
             frames_rejected={total}; closing the connection",
            refusal_name(error.kind())
        );
        Applied::Ended
    })
}

/// Carry out a judged frame: a raised promise stored before it takes
/// effect, the change started on the applier, and the flush that ends a
/// resync pass done, then recorded, then answered.
fn carry_out(host: &Host, peer: SocketAddr, applier: &mut Applier<'_>, step: Step) -> Result<(), Applied> {
    let apply_failed = |error| store_failed(host, peer, error, "apply a change");
    if let Some(promised) = step.persist {
        // The promise is durable before this frame takes effect; earlier
        // frames finish first, so none of them is applied after it.
        applier.drain().map_err(apply_failed)?;
        let was = *host.metadata();
        if was.state == StoreState::Consistent && promised.state == StoreState::Syncing {
            // A pass begins on a consistent store: its way back first.
            host.begin_undo(was.generation);
        }
        store_metadata(&host.metadata_path, &promised)
            .map_err(|error| metadata_failed(peer, error, "store the raised epoch, generation or store state"))?;
        *host.metadata() = promised;
        tracing::info!(
            %peer,
            "stored: epoch {} promised, generation {}, store {:?}",
            promised.epoch_promised,
            promised.generation,
            promised.state
        );
    }
    if let Some((offset, length)) = step.apply.as_ref().and_then(changed_extent) {
        host.save_before(offset, length);
        host.sync_saved();
    }
    let Some(consistent) = step.persist_after else {
        return applier.start(step.apply, step.barrier, step.reply).map_err(apply_failed);
    };
    // The pass's closing flush is done (its fsync completed) before the
    // store is recorded consistent.
    applier.start(step.apply, true, None).map_err(|error| store_failed(host, peer, error, "apply a flush"))?;
    applier.drain().map_err(|error| store_failed(host, peer, error, "apply a flush"))?;
    store_metadata(&host.metadata_path, &consistent)
        .map_err(|error| metadata_failed(peer, error, "record the store consistent"))?;
    *host.metadata() = consistent;
    host.end_undo();
    tracing::info!(%peer, "resync pass complete: the store holds a consistent image again");
    applier.start(None, false, step.reply).map_err(apply_failed)
}

/// The extent a change overwrites, if it changes the store.
fn changed_extent(apply: &Apply) -> Option<(u64, u64)> {
    match apply {
        Apply::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
        Apply::Trim { offset, length, .. } | Apply::WriteZeroes { offset, length, .. } => Some((*offset, *length)),
        Apply::Flush | Apply::Checksum { .. } => None,
    }
}

/// The store failed `what`: say so to the production host (an Error frame)
/// and close.
fn store_failed(host: &Host, peer: SocketAddr, error: crate::EngineError, what: &str) -> Applied {
    let volume = host.volume.path().display();
    tracing::error!(%peer, "cannot {what} on volume {volume}: {error}; closing the connection without acknowledging it");
    let what = format!("{what} on volume {volume}");
    Applied::Failed(Some(CopyFailure::from_error(&error, &what, CopyFailureKind::StoreIo)))
}

/// The metadata could not be stored for `what`: say so and close.
fn metadata_failed(peer: SocketAddr, error: crate::metadata::MetadataError, what: &str) -> Applied {
    tracing::error!(%peer, "cannot {what}: {error}; closing the connection");
    Applied::Failed(Some(CopyFailure::from_error(&error, what, CopyFailureKind::Metadata)))
}
