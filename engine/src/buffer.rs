//! Aligned I/O buffers and a small pool that reuses them.
//!
//! Every buffer is aligned to [`AlignedBuf::ALIGNMENT`] so the same buffer
//! serves buffered and O_DIRECT I/O. Buffers are zeroed when first allocated,
//! so their whole capacity is initialised memory; the pool then recycles them
//! to keep allocation (and page faults) off the hot path.

use std::alloc::{self, Layout};
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

/// A heap buffer aligned for O_DIRECT. Its heap memory never moves while the
/// value is alive, so a pointer into it stays valid across moves of the
/// `AlignedBuf` itself (the io_uring in-flight table relies on this).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
}

// SAFETY: AlignedBuf exclusively owns its allocation, like a Vec<u8>; there
// is no shared interior state, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The alignment of every buffer: the largest logical block size in use.
    pub const ALIGNMENT: usize = 4096;

    /// A zeroed buffer of at least `capacity` bytes (rounded up to the
    /// alignment), with length `capacity`.
    pub fn new(capacity: usize) -> AlignedBuf {
        let rounded = capacity.max(1).div_ceil(Self::ALIGNMENT) * Self::ALIGNMENT;
        let layout = Layout::from_size_align(rounded, Self::ALIGNMENT).expect("buffer layout");
        // SAFETY: the layout has a non-zero size (rounded >= ALIGNMENT).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, capacity: rounded, len: capacity }
    }

    /// Usable bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The length in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the length in use is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Set the length in use; the bytes keep whatever they held.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "buffer length {len} over capacity {}", self.capacity);
        self.len = len;
    }

    /// The bytes in use.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes (zeroed at
        // allocation) and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes in use, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel. The caller keeps the buffer alive (and
    /// unread by Rust code) until the kernel is done with it.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Raw pointer for the kernel to read from.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, Self::ALIGNMENT).expect("buffer layout");
        // SAFETY: ptr was allocated by `alloc_zeroed` with exactly this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf").field("capacity", &self.capacity).field("len", &self.len).finish()
    }
}

/// A per-connection free list of buffers, by power-of-two size class.
/// Buffers above [`BufferPool::POOLED_SIZE_MAX`] are not kept; the total held
/// is bounded by `held_bytes_max`.
pub struct BufferPool {
    classes: Vec<Vec<AlignedBuf>>,
    held_bytes: usize,
    held_bytes_max: usize,
    lent_bytes: usize,
}

impl BufferPool {
    /// The largest buffer the pool keeps for reuse.
    pub const POOLED_SIZE_MAX: usize = 4 << 20;
    const CLASS_MIN_SHIFT: u32 = 12;

    /// A pool that holds at most `held_bytes_max` bytes of idle buffers.
    pub fn new(held_bytes_max: usize) -> BufferPool {
        let classes = (Self::CLASS_MIN_SHIFT..=Self::POOLED_SIZE_MAX.trailing_zeros()).map(|_| Vec::new()).collect();
        BufferPool { classes, held_bytes: 0, held_bytes_max, lent_bytes: 0 }
    }

    fn class_of(capacity: usize) -> Option<usize> {
        if capacity > Self::POOLED_SIZE_MAX {
            return None;
        }
        let shift = capacity.next_power_of_two().trailing_zeros().max(Self::CLASS_MIN_SHIFT);
        Some((shift - Self::CLASS_MIN_SHIFT) as usize)
    }

    /// Bytes of buffers taken and not yet given back: what the caller has
    /// in use, for its memory limit.
    pub fn lent_bytes(&self) -> usize {
        self.lent_bytes
    }

    /// A buffer of length `len` (capacity rounded up to its size class).
    /// Every buffer taken goes back through [`BufferPool::give`].
    pub fn take(&mut self, len: usize) -> AlignedBuf {
        let buf = self.take_unaccounted(len);
        self.lent_bytes += buf.capacity();
        buf
    }

    fn take_unaccounted(&mut self, len: usize) -> AlignedBuf {
        let Some(class) = Self::class_of(len) else {
            return AlignedBuf::new(len);
        };
        let mut buf = match self.classes[class].pop() {
            Some(buf) => {
                self.held_bytes -= buf.capacity();
                buf
            }
            None => AlignedBuf::new(1 << (class as u32 + Self::CLASS_MIN_SHIFT)),
        };
        buf.set_len(len);
        buf
    }

    /// Return a buffer for reuse (dropped if the pool is full).
    pub fn give(&mut self, buf: AlignedBuf) {
        self.lent_bytes = self.lent_bytes.saturating_sub(buf.capacity());
        self.put(buf);
    }

    /// Stop counting `bytes` of buffers as lent: they went to another
    /// holder (see [`Lent`]), which returns them with [`BufferPool::put`].
    pub fn release(&mut self, bytes: usize) {
        self.lent_bytes = self.lent_bytes.saturating_sub(bytes);
    }

    /// Keep a buffer for reuse without counting it as given back.
    fn put(&mut self, buf: AlignedBuf) {
        let capacity = buf.capacity();
        if !capacity.is_power_of_two() || self.held_bytes + capacity > self.held_bytes_max {
            return;
        }
        if let Some(class) = Self::class_of(capacity) {
            self.held_bytes += capacity;
            self.classes[class].push(buf);
        }
    }
}

/// A [`BufferPool`] two threads share: one takes buffers (the copy host's
/// reader, which receives payloads straight into them), the other gives
/// them back when the store has them (its applier).
pub struct SharedPool(Mutex<BufferPool>);

impl SharedPool {
    /// A shared pool holding at most `held_bytes_max` bytes of idle buffers.
    pub fn new(held_bytes_max: usize) -> SharedPool {
        SharedPool(Mutex::new(BufferPool::new(held_bytes_max)))
    }

    /// [`BufferPool::take`].
    pub fn take(&self, len: usize) -> AlignedBuf {
        self.lock().take(len)
    }

    /// [`BufferPool::give`].
    pub fn give(&self, buf: AlignedBuf) {
        self.lock().give(buf)
    }

    /// [`BufferPool::lent_bytes`].
    pub fn lent_bytes(&self) -> usize {
        self.lock().lent_bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BufferPool> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes that several threads read: a write's data on its way to every
/// copy (a `Vec`, or a [`Lent`] buffer).
pub trait ShareBytes: AsRef<[u8]> + Send + Sync + std::fmt::Debug {}
impl<T: AsRef<[u8]> + Send + Sync + std::fmt::Debug> ShareBytes for T {}
/// [`ShareBytes`] behind one reference count.
pub type SharedBytes = Arc<dyn ShareBytes>;

/// Part of a pooled buffer lent out for good by its taker (the NBD
/// connection hands a written buffer to the copies' senders instead of
/// copying it): no longer counted as the taker's, and back in its pool
/// when the last holder drops it, on whichever thread that is.
pub struct Lent {
    buf: Option<AlignedBuf>,
    range: Range<usize>,
    pool: Arc<SharedPool>,
}

impl Lent {
    /// Lend `range` of `buf`, taken from `pool`.
    pub fn new(buf: AlignedBuf, range: Range<usize>, pool: Arc<SharedPool>) -> Lent {
        assert!(range.end <= buf.len(), "the lent range lies in the buffer");
        pool.lock().release(buf.capacity());
        Lent { buf: Some(buf), range, pool }
    }
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[][..], |buf| &buf.as_slice()[self.range.clone()])
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.lock().put(buf);
        }
    }
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lent({} bytes)", self.range.len())
    }
}

/// A frame's payload: bytes in a `Vec`, or received straight into an
/// aligned pooled buffer that an O_DIRECT write can take as it is (no copy
/// between the socket and the store).
pub enum Payload {
    /// On the heap, unaligned.
    Vec(Vec<u8>),
    /// Aligned for O_DIRECT, from a [`SharedPool`].
    Aligned(AlignedBuf),
}

impl Payload {
    /// The bytes as a `Vec` (copied when aligned).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Vec(bytes) => bytes,
            Payload::Aligned(buf) => buf.as_slice().to_vec(),
        }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Vec(bytes) => bytes,
            Payload::Aligned(buf) => buf.as_slice(),
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Payload {
        Payload::Vec(bytes)
    }
}

impl Clone for Payload {
    /// Clones are plain `Vec`s (tests and error paths only).
    fn clone(&self) -> Payload {
        Payload::Vec(self.to_vec())
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Payload::Vec(_) => "Vec",
            Payload::Aligned(_) => "Aligned",
        };
        if self.len() <= 64 {
            write!(f, "Payload::{kind}({:?})", &**self)
        } else {
            write!(f, "Payload::{kind}({} bytes)", self.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        let buf = AlignedBuf::new(10_000);
        assert_eq!(buf.as_ptr() as usize % AlignedBuf::ALIGNMENT, 0);
        assert_eq!(buf.capacity(), 12_288);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }

    /// A lent buffer no longer counts as its taker's, reads as the lent
    /// range, and is back in the pool (without counting as given back
    /// twice) when its last holder drops it on another thread.
    #[test]
    fn a_lent_buffer_returns_to_its_pool_when_the_last_holder_drops_it() {
        let pool = Arc::new(SharedPool::new(1 << 20));
        let mut buf = pool.take(8192);
        let address = buf.as_ptr();
        buf.as_mut_slice()[100..200].fill(7);
        assert_eq!(pool.lent_bytes(), 8192);
        let shared: SharedBytes = Arc::new(Lent::new(buf, 100..200, pool.clone()));
        assert_eq!(pool.lent_bytes(), 0, "lent for good: the taker's limit no longer counts it");
        assert_eq!((*shared).as_ref(), &[7u8; 100][..]);
        let holder = shared.clone();
        drop(shared);
        let other = pool.take(8192);
        assert_ne!(other.as_ptr(), address, "still held: not in the pool");
        std::thread::spawn(move || drop(holder)).join().unwrap();
        let again = pool.take(8192);
        assert_eq!(again.as_ptr(), address, "the last holder's drop put it back");
        assert_eq!(pool.lent_bytes(), 2 * 8192);
        pool.give(other);
        pool.give(again);
        assert_eq!(pool.lent_bytes(), 0);
    }

    #[test]
    fn pool_reuses_and_bounds_what_it_holds() {
        let mut pool = BufferPool::new(16 << 10);
        let a = pool.take(5000);
        assert_eq!(a.capacity(), 8192);
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take(6000);
        assert_eq!(b.as_ptr(), ptr, "a buffer of the same class is reused");
        assert_eq!(b.len(), 6000);
        pool.give(b);
        assert_eq!(pool.lent_bytes(), 0);
        let big = pool.take(16 << 10);
        assert_eq!(pool.lent_bytes(), 16 << 10);
        pool.give(big); // over the bound: dropped
        assert_eq!(pool.held_bytes, 8192);
        assert_eq!(pool.lent_bytes(), 0);
    }
}
