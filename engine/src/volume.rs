//! A volume: the local store behind an export, a regular file or a block
//! device, opened buffered or with O_DIRECT.
//!
//! The volume builds io_uring entries for the hot path (read, write, fsync,
//! fallocate) and does the rare operations synchronously: edge-block reads
//! for unaligned O_DIRECT writes, discard and zero-out ioctls on block
//! devices, and SEEK_DATA/SEEK_HOLE for block status.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, squeue, types};

use crate::alignment::Span;
use crate::buffer::AlignedBuf;
use crate::error::EngineError;
use crate::range_lock::RangeLocks;

/// What the volume's path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file (sparse when created by us).
    File,
    /// A block device (a disk, a partition, a loop device).
    BlockDevice,
}

/// How to open a volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// File or block device.
    pub path: PathBuf,
    /// Expected size in bytes; creates a sparse file when the path is absent.
    pub size: Option<u64>,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// How a WRITE_ZEROES request is carried out on this volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMethod {
    /// `fallocate` with this mode, through io_uring.
    Fallocate(i32),
    /// Synchronously: BLKZEROOUT for the aligned interior of a block device,
    /// written zeroes for the rest.
    Synchronous,
    /// The caller asked for a fast zero and this volume cannot give one.
    NotFast,
}

/// A volume open for I/O.
#[derive(Debug)]
pub struct Volume {
    file: File,
    path: PathBuf,
    size: u64,
    kind: BackingKind,
    direct: bool,
    read_only: bool,
    alignment: u64,
    locks: RangeLocks,
    fallocate_unsupported: AtomicBool,
    /// Resync I/O is cached: the kernel is older than 6.16, or preadv2 or
    /// pwritev2 refused RWF_DONTCACHE (a filesystem without uncached
    /// buffered I/O).
    dontcache_unsupported: AtomicBool,
}

// Linux ioctl numbers from <linux/fs.h>.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl Volume {
    /// Alignment used for O_DIRECT on regular files: safe for every
    /// filesystem with blocks up to 4 KiB.
    pub const FILE_DIRECT_ALIGNMENT: u64 = 4096;

    /// Open (or create, for a regular file with a size) the volume.
    pub fn open(options: &VolumeOptions) -> Result<Volume, EngineError> {
        let path = options.path.clone();
        let volume_error = |action: &'static str| {
            let path = path.clone();
            move |source: io::Error| EngineError::Volume { path, action, source }
        };
        let config_error = |message: String| EngineError::Config { path: path.clone(), message };
        if options.size == Some(0) {
            return Err(config_error("--size 0: a volume needs at least one byte".into()));
        }
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) => Some(metadata),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(volume_error("inspect")(error)),
        };
        let kind = match &metadata {
            Some(m) if m.file_type().is_block_device() => BackingKind::BlockDevice,
            Some(m) if m.is_file() => BackingKind::File,
            Some(_) => return Err(config_error("is neither a regular file nor a block device".into())),
            None => {
                let Some(size) = options.size else {
                    return Err(config_error(
                        "does not exist; pass --size to create a sparse volume of that size".into(),
                    ));
                };
                if options.read_only {
                    return Err(config_error("does not exist, and a read-only volume cannot be created".into()));
                }
                if options.direct && size % Self::FILE_DIRECT_ALIGNMENT != 0 {
                    return Err(config_error(format!(
                        "--size {size} is not a multiple of {}: O_DIRECT needs whole blocks; \
                         round the size or drop --direct",
                        Self::FILE_DIRECT_ALIGNMENT
                    )));
                }
                create_sparse(&path, size).map_err(|error| creation_error(&path, error))?;
                BackingKind::File
            }
        };
        let created = metadata.is_none();
        match Self::open_existing(options, kind) {
            Ok(volume) => Ok(volume),
            Err(error) => {
                // Only a file this call created is removed.
                if created {
                    let _ = std::fs::remove_file(&path);
                }
                Err(error)
            }
        }
    }

    /// The rest of [`Volume::open`], once the file exists.
    fn open_existing(options: &VolumeOptions, kind: BackingKind) -> Result<Volume, EngineError> {
        let path = options.path.clone();
        let volume_error = |action: &'static str| {
            let path = path.clone();
            move |source: io::Error| EngineError::Volume { path, action, source }
        };
        let config_error = |message: String| EngineError::Config { path: path.clone(), message };
        let file = open_file(&path, options).map_err(volume_error("open"))?;
        let size = match kind {
            BackingKind::File => file.metadata().map_err(volume_error("stat"))?.len(),
            BackingKind::BlockDevice => {
                ioctl_u64(&file, BLKGETSIZE64).map_err(volume_error("read the device size (BLKGETSIZE64)"))?
            }
        };
        if let Some(expected) = options.size {
            if expected != size {
                return Err(config_error(format!(
                    "is {size} bytes but --size says {expected}; drop --size to use the existing size, or pass --size {size}"
                )));
            }
        }
        if size == 0 {
            return Err(config_error("is empty (0 bytes); give it a size first or pass a new path with --size".into()));
        }
        let alignment = match (options.direct, kind) {
            (false, _) => 1,
            (true, BackingKind::File) => Self::FILE_DIRECT_ALIGNMENT,
            (true, BackingKind::BlockDevice) => {
                ioctl_int(&file, BLKSSZGET).map_err(volume_error("read the logical block size (BLKSSZGET)"))? as u64
            }
        };
        if size % alignment != 0 {
            return Err(config_error(format!(
                "is {size} bytes, not a multiple of {alignment}: O_DIRECT needs whole blocks; resize it or drop --direct"
            )));
        }
        Ok(Volume {
            file,
            path,
            size,
            kind,
            direct: options.direct,
            read_only: options.read_only,
            alignment,
            locks: RangeLocks::default(),
            fallocate_unsupported: AtomicBool::new(false),
            dontcache_unsupported: AtomicBool::new(!uncached_io_trusted()),
        })
    }

    /// The path the volume was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// File or block device.
    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Whether the volume is opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Whether the volume is opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The alignment every file I/O must keep (1 when buffered).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Range locks that serialise overlapping write-like operations on a
    /// direct volume.
    pub fn locks(&self) -> &RangeLocks {
        &self.locks
    }

    /// Take the exclusive lock of this open volume without waiting:
    /// `Ok(true)` when taken (or already held through this open file),
    /// `Ok(false)` when another open file of the store holds it. Both roles
    /// take it, so a store is never served and applied to at once, nor
    /// applied to by two copy hosts.
    pub fn try_lock_exclusive(&self) -> io::Result<bool> {
        crate::file_lock::try_lock_exclusive(self.fd())
    }

    /// The file descriptor, for io_uring entries.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The aligned span a client range needs.
    pub fn span(&self, offset: u64, len: u64) -> Span {
        Span::cover(offset, len, self.alignment)
    }

    /// A read of `len` bytes at `offset` into `buf`.
    pub fn read_entry(&self, buf: *mut u8, len: u32, offset: u64) -> squeue::Entry {
        opcode::Read::new(types::Fd(self.fd()), buf, len).offset(offset).build()
    }

    /// A write of `len` bytes at `offset` from `buf`; with `fua` the data is
    /// durable when it completes (RWF_DSYNC).
    pub fn write_entry(&self, buf: *const u8, len: u32, offset: u64, fua: bool) -> squeue::Entry {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        opcode::Write::new(types::Fd(self.fd()), buf, len).offset(offset).rw_flags(flags).build()
    }

    /// Write `buf` at `offset` now, on this thread (pwrite): the bytes
    /// written, or a negative errno, as a ring's completion would say (a
    /// signal's EINTR is retried, as the ring never reports it).
    pub fn write_now(&self, buf: &[u8], offset: u64) -> i32 {
        loop {
            // SAFETY: `buf` is borrowed for the call and valid for its length.
            let written = unsafe { libc::pwrite(self.fd(), buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
            if written >= 0 {
                return i32::try_from(written).unwrap_or(i32::MAX);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                errno => return -errno.unwrap_or(libc::EIO),
            }
        }
    }

    /// An fsync of the whole volume.
    pub fn fsync_entry(&self) -> squeue::Entry {
        opcode::Fsync::new(types::Fd(self.fd())).build()
    }

    /// An fallocate of `len` bytes at `offset` with `mode`.
    pub fn fallocate_entry(&self, offset: u64, len: u64, mode: i32) -> squeue::Entry {
        opcode::Fallocate::new(types::Fd(self.fd()), len).offset(offset).mode(mode).build()
    }

    /// Record that fallocate failed with EOPNOTSUPP, so later requests take
    /// the synchronous path at once.
    pub fn note_fallocate_unsupported(&self) {
        self.fallocate_unsupported.store(true, Ordering::Relaxed);
    }

    /// How a TRIM is carried out: `Some(mode)` for fallocate through io_uring
    /// on files, `None` for the synchronous discard of block devices.
    pub fn trim_fallocate_mode(&self) -> Option<i32> {
        match self.kind {
            BackingKind::File => Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            BackingKind::BlockDevice => None,
        }
    }

    /// How a WRITE_ZEROES is carried out. `may_punch` is false when the
    /// client asked for the range to stay allocated (NO_HOLE); `fast_only`
    /// when it asked for FAST_ZERO.
    pub fn zero_method(&self, may_punch: bool, fast_only: bool) -> ZeroMethod {
        let fallocate_works = !self.fallocate_unsupported.load(Ordering::Relaxed);
        match self.kind {
            BackingKind::File if fallocate_works => {
                let mode = if may_punch { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
                ZeroMethod::Fallocate(mode | libc::FALLOC_FL_KEEP_SIZE)
            }
            _ if fast_only => ZeroMethod::NotFast,
            _ => ZeroMethod::Synchronous,
        }
    }

    /// Read the edge blocks a partial O_DIRECT write needs, into the parts of
    /// `buf` (which maps `span.file_offset..+span.file_len`) that the client's
    /// data does not cover. The caller holds the span's range lock.
    pub fn fill_edges(&self, span: &Span, buf: &mut AlignedBuf) -> io::Result<()> {
        let alignment = self.alignment as usize;
        let mut scratch = AlignedBuf::new(alignment);
        let data = span.head as usize..(span.head + span.len) as usize;
        for block in span.edge_blocks(self.alignment) {
            self.file.read_exact_at(scratch.as_mut_slice(), block)?;
            let start = (block - span.file_offset) as usize;
            let target = &mut buf.as_mut_slice()[start..start + alignment];
            for (i, byte) in target.iter_mut().enumerate() {
                if !data.contains(&(start + i)) {
                    *byte = scratch.as_slice()[i];
                }
            }
        }
        Ok(())
    }

    /// Read `len` bytes at `offset` with a plain blocking pread (through an
    /// aligned bounce buffer on an O_DIRECT volume). For the replicator's
    /// resync and verify, which read whole regions off the hot path.
    ///
    /// On a buffered volume the read is uncached where the kernel can
    /// (`RWF_DONTCACHE`, used from Linux 6.16 on: [`uncached_io_trusted`]):
    /// pages it reads in leave the
    /// page cache once copied out, pages cached already stay. A resync reads
    /// the whole volume; read the cached way, its readahead leaves the page
    /// cache full of large folios, and on ext4 with large folios every later
    /// 4 KiB buffered write into one walks all of its buffer heads
    /// (`ext4_block_write_begin`). Measured here (kernel 6.18, 1 GiB volume
    /// with a sync copy, fio 4k randwrite QD32 after the copy's full sync):
    /// 15k IOPS with the resync's folios cached, 3x that without.
    pub fn read_synchronously(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if !self.direct {
            let mut data = vec![0u8; len as usize];
            self.read_uncached(&mut data, offset)?;
            return Ok(data);
        }
        let span = self.span(offset, len);
        let mut buf = AlignedBuf::new(span.file_len as usize);
        self.file.read_exact_at(buf.as_mut_slice(), span.file_offset)?;
        Ok(buf.as_slice()[span.head as usize..(span.head + span.len) as usize].to_vec())
    }

    /// Write `data` at `offset` (pwritev2 with `flags`, RWF_DSYNC for FUA)
    /// so that it does not stay in the page cache once written back
    /// (`RWF_DONTCACHE`), or cached where uncached I/O is refused here. For
    /// a buffered copy host's resync data.
    pub fn write_uncached(&self, data: &[u8], offset: u64, flags: libc::c_int) -> io::Result<()> {
        if !self.dontcache_unsupported.load(Ordering::Relaxed) {
            match write_all_at(self.fd(), data, offset, flags | libc::RWF_DONTCACHE) {
                // The flag is refused before any byte is written.
                Err(error) if self.refused_uncached(&error) => {}
                result => return result,
            }
        }
        write_all_at(self.fd(), data, offset, flags)
    }

    /// Whether `error` is the kernel refusing `RWF_DONTCACHE` (EOPNOTSUPP:
    /// a kernel without uncached buffered I/O, or a filesystem without it);
    /// if so, this volume uses cached I/O from now on, and says so once.
    fn refused_uncached(&self, error: &io::Error) -> bool {
        if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return false;
        }
        if !self.dontcache_unsupported.swap(true, Ordering::Relaxed) {
            tracing::info!(volume = %self.path.display(), %error,
                "uncached I/O (RWF_DONTCACHE) refused here: resync reads and writes go through the page cache");
        }
        true
    }

    /// Fill `data` from `offset` with preadv2(RWF_DONTCACHE), or with a
    /// plain pread once the kernel refused the flag.
    fn read_uncached(&self, mut data: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !data.is_empty() {
            if self.dontcache_unsupported.load(Ordering::Relaxed) {
                return self.file.read_exact_at(data, offset);
            }
            let iovec = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
            // SAFETY: the one iovec points into `data`, borrowed mutably for
            // the whole call and valid for `iov_len` bytes.
            let read =
                unsafe { libc::preadv2(self.file.as_raw_fd(), &iovec, 1, offset as libc::off_t, libc::RWF_DONTCACHE) };
            if read < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted || self.refused_uncached(&error) {
                    continue;
                }
                return Err(error);
            }
            if read == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the volume ended before the read did"));
            }
            offset += read as u64;
            data = &mut data[read as usize..];
        }
        Ok(())
    }

    /// Zero `offset..offset+len` synchronously: BLKZEROOUT for the aligned
    /// interior of a block device, written zeroes (read-modify-write at
    /// unaligned edges) for everything else. The caller holds the range lock.
    pub fn write_zeroes_synchronously(&self, offset: u64, len: u64) -> io::Result<()> {
        let sector = self.alignment.max(512);
        let interior_start = offset.next_multiple_of(sector);
        let interior_end = (offset + len) / sector * sector;
        if self.kind == BackingKind::BlockDevice && interior_start < interior_end {
            ioctl_range(&self.file, BLKZEROOUT, interior_start, interior_end - interior_start)?;
            self.write_zero_bytes(offset, interior_start - offset)?;
            return self.write_zero_bytes(interior_end, offset + len - interior_end);
        }
        self.write_zero_bytes(offset, len)
    }

    /// Make `offset..offset+len` read as zeroes, synchronously, the cheapest
    /// way this volume allows: punch a hole or zero-range on a file
    /// (remembering when the file system cannot), BLKZEROOUT or written
    /// zeroes otherwise. The copy host's way to apply a trim or write-zeroes.
    pub fn zero_synchronously(&self, offset: u64, len: u64) -> io::Result<()> {
        if let ZeroMethod::Fallocate(mode) = self.zero_method(true, false) {
            // SAFETY: fallocate takes a descriptor and plain integers; no memory.
            let result = unsafe { libc::fallocate(self.fd(), mode, offset as libc::off_t, len as libc::off_t) };
            if result == 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(error);
            }
            self.note_fallocate_unsupported();
        }
        self.write_zeroes_synchronously(offset, len)
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let mut position = offset;
        let end = offset + len;
        while position < end {
            let piece = (end - position).min(CHUNK - position % CHUNK);
            let span = self.span(position, piece);
            // A new buffer is all zeroes; only the edges of a partial block
            // need the bytes that are already on disk.
            let mut buf = AlignedBuf::new(span.file_len as usize);
            if self.direct {
                self.fill_edges(&span, &mut buf)?;
            }
            self.file.write_all_at(buf.as_slice(), span.file_offset)?;
            position += piece;
        }
        Ok(())
    }

    /// Discard the aligned interior of `offset..offset+len` on a block device
    /// (TRIM is advisory, so partial sectors at the edges are left alone).
    pub fn discard_synchronously(&self, offset: u64, len: u64) -> io::Result<()> {
        let sector = self.alignment.max(512);
        let start = offset.next_multiple_of(sector);
        let end = (offset + len) / sector * sector;
        if start >= end {
            return Ok(());
        }
        match ioctl_range(&self.file, BLKDISCARD, start, end - start) {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    /// Allocation status of `offset..offset+len` as NBD `base:allocation`
    /// extents `(length, flags)`, at most `extents_max` of them; they may
    /// cover less than the whole range.
    pub fn block_status(&self, offset: u64, len: u32, extents_max: usize) -> io::Result<Vec<(u32, u32)>> {
        const STATE_HOLE_ZERO: u32 = 0b11;
        let end = offset + len as u64;
        if self.kind == BackingKind::BlockDevice {
            return Ok(vec![(len, 0)]);
        }
        let mut extents = Vec::new();
        let mut position = offset;
        while position < end && extents.len() < extents_max {
            let data = match seek(self.fd(), position, libc::SEEK_DATA) {
                Ok(data) => data.min(end),
                Err(error) if error.raw_os_error() == Some(libc::ENXIO) => end,
                Err(error) => return Err(error),
            };
            if data > position {
                extents.push(((data - position) as u32, STATE_HOLE_ZERO));
                position = data;
                continue;
            }
            let hole = seek(self.fd(), position, libc::SEEK_HOLE)?.min(end);
            let hole = if hole <= position { end } else { hole };
            extents.push(((hole - position) as u32, 0));
            position = hole;
        }
        Ok(extents)
    }

    /// The first offset at or after `offset` that may hold data, `None`
    /// when none does (a regular file's SEEK_DATA; a block device holds
    /// data everywhere). SEEK_DATA skips the holes a file's index knows of
    /// (on tmpfs, pages fallocated but never written are stepped over one
    /// by one); SEEK_HOLE on tmpfs visits every cached page up to the next
    /// hole, however far, so resync does not ask it.
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if self.kind == BackingKind::BlockDevice {
            return Ok(Some(offset));
        }
        match seek(self.fd(), offset, libc::SEEK_DATA) {
            Ok(data) => Ok(Some(data)),
            Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Whether the volume provably reads as zeroes throughout: a regular
    /// file with no data extents (SEEK_DATA finds none; written but not yet
    /// allocated pages count as data). A block device cannot be proven empty
    /// without reading it, so it never is.
    pub fn holds_no_data(&self) -> io::Result<bool> {
        if self.kind == BackingKind::BlockDevice {
            return Ok(false);
        }
        match seek(self.fd(), 0, libc::SEEK_DATA) {
            Ok(_) => Ok(false),
            Err(error) if error.raw_os_error() == Some(libc::ENXIO) => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// Hint the kernel to read `offset..offset+len` ahead (NBD CACHE).
    pub fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: posix_fadvise takes a valid fd and plain integers.
        let rc = unsafe { libc::posix_fadvise(self.fd(), offset as i64, len as i64, libc::POSIX_FADV_WILLNEED) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(())
    }

    /// Make everything written so far durable.
    pub fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// A watch on a volume's writeback errors through a file of its own.
///
/// The kernel reports a writeback error once to each open file (errseq), to
/// whichever sync or check asks first: a check through the volume's own file
/// could take the error from a client's FLUSH, which would then succeed.
/// This file was opened when the watch began, so it sees every error after
/// that, and takes none from the volume's.
#[derive(Debug)]
pub struct WritebackWatch {
    file: File,
}

impl WritebackWatch {
    /// Watch `volume` (its path, opened again read-only).
    pub fn open(volume: &Volume) -> io::Result<WritebackWatch> {
        Ok(WritebackWatch { file: File::open(volume.path())? })
    }

    /// Whether the kernel's writeback of the volume failed since the watch
    /// began or last said so, without writing anything back:
    /// `sync_file_range(SYNC_FILE_RANGE_WAIT_BEFORE)` over the whole file
    /// only waits for writeback already under way and reports the file's
    /// writeback error, as fsync does. A file system that cannot say
    /// (EINVAL, ENOSYS, EOPNOTSUPP) counts as no error: its syncs still
    /// report one.
    pub fn check(&self) -> io::Result<()> {
        // SAFETY: sync_file_range on our own open descriptor; no memory is passed.
        let result = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WAIT_BEFORE) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::ESPIPE) => Ok(()),
            _ => Err(error),
        }
    }
}

/// The error for a volume file that could not be created, naming what to do.
fn creation_error(path: &Path, error: io::Error) -> EngineError {
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let message = match error.kind() {
        io::ErrorKind::NotFound => format!(
            "cannot be created: its directory {} does not exist; create it first (mkdir -p {}) or choose another path",
            directory.display(),
            directory.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "cannot be created: permission denied in directory {}; choose a directory you can write to",
            directory.display()
        ),
        _ => format!("cannot be created in directory {}: {error}", directory.display()),
    };
    EngineError::Config { path: path.to_path_buf(), message }
}

fn create_sparse(path: &Path, size: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).create_new(true).open(path)?;
    let sized = file.set_len(size).and_then(|()| file.sync_all());
    if sized.is_err() {
        // The file is this call's own: a failed creation leaves nothing.
        let _ = std::fs::remove_file(path);
    }
    sized
}

fn open_file(path: &Path, options: &VolumeOptions) -> io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if options.direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new().read(true).write(!options.read_only).custom_flags(flags).open(path)
}

fn seek(fd: RawFd, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek takes a valid fd and plain integers.
    let position = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if position < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(position as u64)
}

/// The size of the block device open as `file`, in bytes.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    ioctl_u64(file, BLKGETSIZE64)
}

fn ioctl_u64(file: &File, request: libc::c_ulong) -> io::Result<u64> {
    let mut value: u64 = 0;
    // SAFETY: the request writes one u64 through the pointer, which points to
    // a live local of that type.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &mut value as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_int(file: &File, request: libc::c_ulong) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    // SAFETY: the request writes one int through the pointer, which points to
    // a live local of that type.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

fn ioctl_range(file: &File, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD and BLKZEROOUT read two u64 (start, length) through
    // the pointer, which points to a live local array of two u64.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this kernel's uncached buffered I/O (`RWF_DONTCACHE`) is
/// trusted: Linux 6.16 or later. It came in 6.14; 6.15 turned it off for
/// filesystems while races between dropping a folio and writing it were
/// fixed, and 6.16 turned it back on with those fixes.
fn uncached_io_trusted() -> bool {
    static TRUSTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRUSTED.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        kernel_at_least(&release, (6, 16))
    })
}

/// Whether a kernel release string (`6.18.44-fc`) is at least `wanted`.
fn kernel_at_least(release: &str, wanted: (u32, u32)) -> bool {
    let mut numbers = release.trim().split(|c: char| !c.is_ascii_digit()).map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= wanted,
        _ => false,
    }
}

/// pwritev2 until every byte is written, with `flags`.
pub(crate) fn write_all_at(fd: RawFd, mut bytes: &[u8], mut offset: u64, flags: libc::c_int) -> io::Result<()> {
    while !bytes.is_empty() {
        let iovec = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
        // SAFETY: the one iovec points into `bytes`, which is borrowed for the
        // whole call and valid for `iov_len` bytes; pwritev2 only reads it.
        let written = unsafe { libc::pwritev2(fd, &iovec, 1, offset as libc::off_t, flags) };
        if written < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing"));
        }
        bytes = &bytes[written as usize..];
        offset += written as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// A directory on a disk filesystem (/var/tmp): on a tmpfs the page
    /// cache is the store, and neither fadvise nor uncached I/O drops it.
    fn disk_directory() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").expect("a directory in /var/tmp")
    }

    /// A volume of `size` bytes in `directory`, buffered.
    fn buffered(directory: &tempfile::TempDir, name: &str, size: usize) -> (Volume, PathBuf) {
        let path = directory.path().join(name);
        let options = VolumeOptions { path: path.clone(), size: Some(size as u64), direct: false, read_only: false };
        (Volume::open(&options).unwrap(), path)
    }

    /// Whether this kernel does uncached I/O on `volume`; when not, says the
    /// test checked only the bytes (and fails under CI, whose kernel has it).
    fn uncached_here(volume: &Volume, test: &str) -> bool {
        if !volume.dontcache_unsupported.load(Ordering::Relaxed) {
            return true;
        }
        assert!(std::env::var_os("CI").is_none(), "{test}: this kernel does no uncached I/O on /var/tmp");
        println!("SKIPPED: {test}: this kernel does no uncached I/O (RWF_DONTCACHE): only the bytes were checked");
        false
    }

    /// The writeback check is a real system call that says nothing on a
    /// healthy volume, dirty pages or not, on the disk and on a tmpfs.
    #[test]
    fn a_healthy_volume_reports_no_writeback_error() {
        for directory in [disk_directory(), tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm")] {
            let (volume, _) = buffered(&directory, "volume.img", MIB);
            let watch = WritebackWatch::open(&volume).unwrap();
            watch.check().expect("no error on a new volume");
            assert_eq!(volume.write_now(&[7u8; 4096], 4096), 4096);
            watch.check().expect("dirty pages are no error");
            volume.sync_all().unwrap();
            watch.check().expect("nor written ones");
        }
    }

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.18.44-fc-v657\n", (6, 16)));
        assert!(kernel_at_least("6.16.0", (6, 16)));
        assert!(kernel_at_least("7.0.1", (6, 16)));
        assert!(!kernel_at_least("6.15.9-300.fc42.x86_64", (6, 16)));
        assert!(!kernel_at_least("5.19.17", (6, 16)));
        assert!(!kernel_at_least("", (6, 16)));
        assert!(!kernel_at_least("six.sixteen", (6, 16)));
    }

    /// The 4 KiB pages of `len` bytes at the start of `file` that are in
    /// the page cache (mincore on a shared mapping).
    fn cached_pages(file: &File, len: usize) -> usize {
        // SAFETY: the mapping is only passed to mincore, never read; the
        // file is not truncated while it lives.
        let map = unsafe { memmap2::Mmap::map(file) }.expect("map the volume");
        let mut resident = vec![0u8; len.div_ceil(4096)];
        // SAFETY: the mapping spans `len` bytes at least and lives across the
        // call; `resident` holds a byte per page of it.
        let result = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, resident.as_mut_ptr()) };
        assert_eq!(result, 0, "mincore: {}", io::Error::last_os_error());
        resident.iter().filter(|byte| **byte & 1 == 1).count()
    }

    /// A resync read the file cannot fill (it was cut short under the
    /// volume) fails with UnexpectedEof after the short read, not with the
    /// bytes before the end read twice.
    #[test]
    fn a_resync_read_past_the_end_of_the_file_fails() {
        let directory = disk_directory();
        let (volume, path) = buffered(&directory, "volume.img", 4 * MIB);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[7u8; 4096], 0).unwrap();
        file.set_len(4096).unwrap();
        let error = volume.read_synchronously(0, 8192).expect_err("a read past the end of the file");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
        assert_eq!(volume.read_synchronously(0, 4096).unwrap(), vec![7u8; 4096]);
    }

    /// On a buffered copy's store, resync data is written uncached (where
    /// the kernel has it): once written back it leaves the page cache, while
    /// an application write stays cached. Both land.
    #[test]
    fn a_resync_write_leaves_no_pages_cached_and_an_application_write_does() {
        use crate::receiver::{apply_synchronously, Apply};
        let directory = disk_directory();
        let size = 16 * MIB;
        let (volume, path) = buffered(&directory, "store.img", size);
        let half = size / 2;
        let resync: Vec<u8> = (0..half).map(|index| (index % 251) as u8).collect();
        let application: Vec<u8> = (0..half).map(|index| (index % 241) as u8).collect();
        apply_synchronously(
            &volume,
            &Apply::Write { offset: 0, data: resync.clone().into(), fua: false, resync: true },
        )
        .unwrap();
        apply_synchronously(
            &volume,
            &Apply::Write { offset: half as u64, data: application.clone().into(), fua: false, resync: false },
        )
        .unwrap();
        volume.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        // Pages leave once their writeback has completed, which the fsync
        // waited for; the dropping itself may trail it a little.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut cached_resync = cached_pages(&file, half);
        while cached_resync > half / 4096 / 8 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            cached_resync = cached_pages(&file, half);
        }
        let cached_application = cached_pages(&file, size) - cached_resync;
        let mut read = vec![0u8; size];
        file.read_exact_at(&mut read, 0).unwrap();
        assert!(read[..half] == resync[..] && read[half..] == application[..], "the writes did not land");
        if !uncached_here(&volume, "a_resync_write_leaves_no_pages_cached_and_an_application_write_does") {
            return;
        }
        assert!(cached_resync <= half / 4096 / 8, "the resync write left {cached_resync} pages cached");
        assert!(cached_application >= half / 4096 * 3 / 4, "the application write left {cached_application} pages");
    }

    /// A resync read of a buffered volume returns the bytes on disk and
    /// leaves no trace in the page cache where the kernel has uncached
    /// reads; pages cached before it stay cached.
    #[test]
    fn a_resync_read_leaves_the_page_cache_as_it_found_it() {
        let directory = disk_directory();
        let size = 16 * MIB;
        let (volume, path) = buffered(&directory, "volume.img", size);
        let data: Vec<u8> = (0..size).map(|index| (index * 7 + index / 4096) as u8).collect();
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        file.write_all_at(&data, 0).unwrap();
        file.sync_data().unwrap();
        // SAFETY: plain advice on an open descriptor.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        assert_eq!(cached_pages(&file, size), 0, "the test could not empty the page cache");
        // The second MiB is cached before the resync reads it.
        file.read_exact_at(&mut vec![0u8; MIB], MIB as u64).unwrap();
        let before = cached_pages(&file, size);
        assert!(before >= 256, "reading the second MiB cached {before} pages");

        // Unaligned, and in pieces that cross the cached MiB.
        let mut read = Vec::new();
        for (offset, len) in [(0, 3 * MIB / 2 + 100), (3 * MIB / 2 + 100, size - 3 * MIB / 2 - 100)] {
            read.extend(volume.read_synchronously(offset as u64, len as u64).unwrap());
        }
        assert!(read == data, "a resync read returned other bytes than the volume holds");

        let after = cached_pages(&file, size);
        if !uncached_here(&volume, "a_resync_read_leaves_the_page_cache_as_it_found_it") {
            return;
        }
        assert!(after >= 256, "the pages cached before the resync read were dropped: {after} left");
        // What readahead brought in beyond the reads may stay; the bytes
        // read do not.
        assert!(after <= before + size / 4096 / 4, "the resync read left {after} pages cached (was {before})");
    }
}
