//! The `file` and `host_device` protocols: a regular file or a block device read
//! and written through the chosen aio backend. Owns cache modes (O_DIRECT,
//! O_DSYNC, ignored flushes), O_DIRECT alignment (bouncing only misaligned
//! requests), fallocate-based zeroing and discard, SEEK_DATA/SEEK_HOLE block
//! status, truncate with preallocation and the image lock. It knows nothing of
//! image formats.

use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use engine::aio::{AioFile, Backend};
use engine::block::{
    check_request, check_writable, check_write, read_covered, write_covered, write_zero_buffers, BlockNode, BoxFuture,
    Extent, ImageLock, Limits, Prealloc, RangeTracker, Tracked, WriteFlags, ZeroFlags,
};
use engine::error::{invalid, unsupported, Error, ErrorKind, Result};
use engine::runtime::IoBuf;

use super::sys;

mod open;
pub use open::{FileDriver, FILE_CREATE_OPTS};

/// Largest single read or write handed to a backend.
const MAX_IO: usize = 1 << 30;
/// Smallest read `map_cached` maps.
const MIN_MAPPED: usize = 256 << 10;
/// Largest write `write_inline` lets run on the shard's thread.
const INLINE_WRITE_MAX: u64 = 64 << 10;
/// Largest pipe write `write_pipe_now` runs on the shard's thread.
const INLINE_PIPE_MAX: u64 = 256 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    HostDevice,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::HostDevice => "host_device",
        }
    }
}

/// Counts a write running outside the shard while alive (`worker_writes`).
struct WorkerWrite<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> WorkerWrite<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> WorkerWrite<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        WorkerWrite(n)
    }
}

impl Drop for WorkerWrite<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct FileNode {
    file: AioFile,
    kind: Kind,
    filename: String,
    size: AtomicU64,
    read_only: bool,
    no_flush: bool,
    /// Offset/length alignment for O_DIRECT (1 without it).
    align: u32,
    mem_align: u32,
    /// Writes, zeroing and discards in flight under O_DIRECT, so a
    /// read-modify-write (misaligned write) never writes back stale bytes over
    /// an overlapping request, nor one over it.
    inflight: RangeTracker,
    /// `map_cached` may map this file: buffered, read-only, regular, and
    /// locked so that no cooperating process writes (or shrinks) it.
    mappable: bool,
    /// Page-cache residency, for `cached_extent`: buffered regular files only.
    residency: Option<sys::Residency>,
    /// `x-inline-writes` (default on): small page-cache writes may run on
    /// the shard's thread (`write_inline`).
    inline_writes: bool,
    /// Writes of this file running outside the shard (io_uring workers,
    /// the thread pool), which hold its inode lock while they run.
    worker_writes: std::sync::atomic::AtomicUsize,
    /// `x-reserve-ahead`: when a write grows the file to within half of
    /// this of the blocks reserved so far, reserve this much more past EOF
    /// (fallocate KEEP_SIZE, so the size does not change). Writes into
    /// reserved blocks skip the filesystem's per-block delayed allocation:
    /// 1 GiB of new page-cache writes took 205 ms instead of 280 ms on ext4
    /// here. Blocks still reserved past EOF are released on close (and drop).
    reserve_ahead: u64,
    reserved_end: AtomicU64,
    reserving: std::sync::atomic::AtomicBool,
    /// A reservation was attempted (so close truncates), or failed (so no more).
    reserve_tried: std::sync::atomic::AtomicBool,
    reserve_failed: std::sync::atomic::AtomicBool,
    _lock: Option<ImageLock>,
}

impl FileNode {
    /// May a write of `len` bytes at `offset` run now, on this thread
    /// (`x-inline-writes`)? Small, inside the file, into pages in the page
    /// cache, with the system below its dirty background threshold: such a
    /// write is a copy into the cache that neither reads, allocates pages,
    /// nor waits for writeback. It skips the hand-off to an io_uring worker,
    /// which buffered writes to ext4 always take (a third of a 4k random
    /// write's cost). What can still hold it is the filesystem's journal
    /// (the mtime update), briefly and rarely.
    fn write_inline(&self, offset: u64, len: u64) -> bool {
        self.write_inline_max(offset, len, INLINE_WRITE_MAX)
    }

    fn write_inline_max(&self, offset: u64, len: u64, max: u64) -> bool {
        // The io_uring backend only: the others are what they say they are.
        let inline = self.inline_writes && self.file.backend() == Backend::IoUring;
        let Some(res) = self.residency.as_ref().filter(|_| inline) else { return false };
        len <= max
            && self.worker_writes.load(Ordering::Acquire) == 0
            && self.within_data(offset, len)
            && res.cached(self.file.fd(), self.size(), offset, len)
            && sys::dirty_headroom()
    }

    /// Is [offset, offset+len) inside the file's bytes? `size` is EOF
    /// rounded up to 512, so the partial last sector, if any, is left out:
    /// a splice there would come up short, a write there would grow the file.
    fn within_data(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size().saturating_sub(511))
    }

    fn err(&self, e: std::io::Error, op: &str, off: u64) -> Error {
        Error::os(op, e).with_file(&self.filename).at(off)
    }

    /// Bounds of a read or write. A regular file may be read past its end
    /// (zeroes) and written past it (it grows), as formats that append clusters
    /// need; a block device has a fixed size.
    fn check_io(&self, off: u64, len: u64, write: bool) -> Result<()> {
        if write {
            check_writable(self)?;
        }
        if self.kind == Kind::HostDevice {
            return check_request(self, off, len);
        }
        if off.checked_add(len).is_none_or(|end| end > i64::MAX as u64) {
            return Err(Error::new(
                ErrorKind::OutOfBounds,
                format!("request of {len} bytes at offset {off} overflows"),
            )
            .with_file(&self.filename));
        }
        Ok(())
    }

    fn aligned(&self, off: u64, len: usize, ptr: *const u8) -> bool {
        let a = self.align as u64;
        off.is_multiple_of(a)
            && (len as u64).is_multiple_of(a)
            && (ptr as usize).is_multiple_of(self.mem_align as usize)
    }

    /// Read exactly `len` bytes into `buf[at..]` (zeroes past EOF).
    async fn read_exact(&self, mut buf: IoBuf, at: usize, len: usize, off: u64) -> (Result<()>, IoBuf) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_IO);
            let (r, b) = self.file.read(buf, at + done, n, off + done as u64).await;
            buf = b;
            match r {
                Ok(0) => {
                    // EOF (the file shrank underneath us): the rest reads as zeroes.
                    buf[at + done..at + len].fill(0);
                    break;
                }
                Ok(k) => done += k,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return (Err(self.err(e, "read", off + done as u64)), buf),
            }
        }
        (Ok(()), buf)
    }

    async fn write_all(&self, mut buf: IoBuf, at: usize, len: usize, off: u64, fua: bool) -> (Result<()>, IoBuf) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_IO);
            let (r, b) = self.file.write(buf, at + done, n, off + done as u64, fua).await;
            buf = b;
            match r {
                Ok(0) => return (Err(Error::errno("write", libc::ENOSPC).with_file(&self.filename).at(off)), buf),
                Ok(k) => done += k,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return (Err(self.err(e, "write", off + done as u64)), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Misaligned O_DIRECT read: read the aligned cover into a bounce buffer.
    async fn read_bounce(&self, off: u64, buf: IoBuf, range: Range<usize>) -> (Result<()>, IoBuf) {
        let read = async |start, tmp: IoBuf| {
            let n = tmp.len();
            self.read_exact(tmp, 0, n, start).await
        };
        read_covered(off, buf, range, u64::from(self.align), read).await
    }

    /// Misaligned O_DIRECT write: read-modify-write of the aligned cover, with
    /// overlapping writes held off so no update is lost.
    async fn write_rmw(&self, off: u64, buf: IoBuf, range: Range<usize>, fua: bool) -> (Result<()>, IoBuf) {
        let read = async |start, tmp: IoBuf| {
            let n = tmp.len();
            self.read_exact(tmp, 0, n, start).await
        };
        let write = async |start, tmp: IoBuf| {
            let n = tmp.len();
            self.write_all(tmp, 0, n, start, fua).await
        };
        write_covered(off, buf, range, u64::from(self.align), &self.inflight, read, write).await
    }

    /// Track a modifying request when read-modify-write (write_rmw, always
    /// tracked) can happen (O_DIRECT); buffered files never need it.
    async fn track(&self, start: u64, end: u64, serialising: bool) -> Option<Tracked<'_>> {
        if self.align > 1 || self.mem_align > 1 {
            Some(self.inflight.begin(start, end, serialising).await)
        } else {
            None
        }
    }

    async fn fallocate(&self, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
        self.file.fallocate(mode, off, len).await
    }

    /// Reserve blocks ahead of a write that ends at `end` (x-reserve-ahead).
    /// One request reserves at a time; the others go on without waiting. A
    /// filesystem that cannot (or a full one) just stops being asked.
    async fn reserve_for(&self, end: u64) {
        let have = self.reserved_end.load(Ordering::Acquire);
        if self.reserve_ahead == 0
            || self.reserve_failed.load(Ordering::Acquire)
            || end.saturating_add(self.reserve_ahead / 2) <= have
            || self.reserving.swap(true, Ordering::AcqRel)
        {
            return;
        }
        // Let the next request try if this one is dropped mid-way.
        struct Reserving<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Reserving<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _r = Reserving(&self.reserving);
        let from = have.max(self.size.load(Ordering::Acquire));
        let to = end.max(from).saturating_add(self.reserve_ahead).saturating_add((1 << 20) - 1) & !((1 << 20) - 1);
        if to <= from {
            return;
        }
        self.reserve_tried.store(true, Ordering::Release);
        match self.fallocate(libc::FALLOC_FL_KEEP_SIZE, from, to - from).await {
            Ok(()) => {
                self.reserved_end.fetch_max(to, Ordering::AcqRel);
            }
            // Never again (full or unsupported); what was reserved is still
            // given back at close.
            Err(_) => self.reserve_failed.store(true, Ordering::Release),
        }
    }

    /// Give back blocks reserved past EOF: a truncate to the current size
    /// frees them.
    fn release_reserved(&self) -> std::io::Result<()> {
        // A failed fallocate may have allocated part of its range too.
        if !self.reserve_tried.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let fd = self.file.fd();
        let st = sys::fstat(fd)?;
        // SAFETY: plain syscall on our own fd, to the size it already has.
        if unsafe { libc::ftruncate(fd, st.st_size) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    async fn do_write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let mut done = false;
        if flags.may_unmap {
            // A punched hole reads as zeroes in files; on block devices the kernel
            // only succeeds when the device guarantees zeroes afterwards.
            let r = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len).await;
            done = r.is_ok();
        }
        if !done {
            match self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, off, len).await {
                Ok(()) => done = true,
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(self.err(e, "write zeroes", off)),
            }
        }
        if !done {
            if flags.no_fallback {
                return Err(unsupported("efficient zeroing is not supported here").with_file(&self.filename));
            }
            return write_zero_buffers(self, off, len, flags.fua).await;
        }
        if flags.fua {
            self.flush_inner().await?;
        }
        Ok(())
    }

    async fn flush_inner(&self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file.fsync(true).await.map_err(|e| Error::os("flush", e).with_file(&self.filename))
    }

    async fn do_truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        check_writable(self)?;
        let cur = self.size.load(Ordering::Acquire);
        if self.kind == Kind::HostDevice {
            if size > cur || (exact && size != cur) {
                return Err(unsupported("Cannot grow device files").with_file(&self.filename));
            }
            return Ok(());
        }
        if size < cur && prealloc != Prealloc::Off {
            return Err(invalid("Cannot use preallocation for shrinking files").with_file(&self.filename));
        }
        self.file
            .blocking(move |fd| {
                // SAFETY: plain syscall on an fd the pool job holds open.
                if unsafe { libc::ftruncate(fd, size as libc::off_t) } < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            })
            .await
            .map_err(|e| self.err(e, "truncate", size))?;
        self.size.store(size, Ordering::Release);
        // A shrink freed the blocks reserved past the old end; a grow keeps
        // those beyond the new one.
        if size < cur {
            self.reserved_end.store(size, Ordering::Release);
        }
        if size > cur {
            match prealloc {
                Prealloc::Off => {}
                Prealloc::Metadata => {
                    return Err(unsupported("Preallocation mode 'metadata' unsupported for this storage")
                        .with_file(&self.filename))
                }
                Prealloc::Falloc => {
                    self.fallocate(0, cur, size - cur).await.map_err(|e| self.err(e, "fallocate", cur))?
                }
                Prealloc::Full => write_zero_buffers(self, cur, size - cur, false).await?,
            }
        }
        Ok(())
    }
}

impl Drop for FileNode {
    fn drop(&mut self) {
        // Not closed: still give the reserved blocks back.
        let _ = self.release_reserved();
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL))
}

impl BlockNode for FileNode {
    fn driver(&self) -> &'static str {
        self.kind.name()
    }
    fn filename(&self) -> String {
        self.filename.clone()
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: self.align, mem_alignment: self.mem_align, max_transfer: 0 }
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let n = buf.len();
        self.read_part(offset, buf, 0..n)
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let n = buf.len();
        self.write_part(offset, buf, 0..n, flags)
    }

    fn read_part(&self, offset: u64, buf: IoBuf, range: Range<usize>) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            let len = range.len();
            if let Err(e) = self.check_io(offset, len as u64, false) {
                return (Err(e), buf);
            }
            if !self.aligned(offset, len, buf.as_ptr().wrapping_add(range.start)) {
                return self.read_bounce(offset, buf, range).await;
            }
            self.read_exact(buf, range.start, len, offset).await
        })
    }

    fn write_part(
        &self,
        offset: u64,
        buf: IoBuf,
        range: Range<usize>,
        flags: WriteFlags,
    ) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            let len = range.len();
            if let Err(e) = self.check_io(offset, len as u64, true) {
                return (Err(e), buf);
            }
            let fua = flags.fua && !self.no_flush;
            if !fua && self.write_inline(offset, len as u64) {
                let r = self.file.write_now(&buf, range.start, len, offset);
                return (r.map(|_| ()).map_err(|e| self.err(e, "write", offset)), buf);
            }
            let _busy = WorkerWrite::new(&self.worker_writes);
            let r = if !self.aligned(offset, len, buf.as_ptr().wrapping_add(range.start)) {
                self.write_rmw(offset, buf, range, fua).await
            } else {
                let _t = self.track(offset, offset + len as u64, false).await;
                if self.reserve_ahead > 0 && offset + len as u64 > self.size.load(Ordering::Acquire) {
                    self.reserve_for(offset + len as u64).await;
                }
                self.write_all(buf, range.start, len, offset, fua).await
            };
            if r.0.is_ok() {
                // Writes past EOF grow a regular file (formats append clusters).
                self.size.fetch_max(offset + len as u64, Ordering::AcqRel);
            }
            r
        })
    }

    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        let len = data.len() as u64;
        if len == 0 || self.check_io(offset, len, true).is_err() || !self.write_inline(offset, len) {
            return None;
        }
        Some(self.file.write_slice_now(data, offset).map(drop).map_err(|e| self.err(e, "write", offset)))
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let _t = self.track(offset, offset + len, false).await;
            self.do_write_zeroes(offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            if len == 0 {
                return Ok(());
            }
            let _t = self.track(offset, offset + len, false).await;
            let r = match self.kind {
                Kind::File => self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len).await,
                Kind::HostDevice => self.file.blocking(move |fd| sys::block_device_discard(fd, offset, len)).await,
            };
            match r {
                // Discard is a hint: storage that cannot do it just keeps the data.
                Err(e) if is_unsupported(&e) => Ok(()),
                r => r.map_err(|e| self.err(e, "discard", offset)),
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.release_reserved().map_err(|e| self.err(e, "truncate", 0)) })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.flush_inner())
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            let size = self.size();
            if offset >= size || len == 0 {
                return Err(
                    invalid(format!("block status at offset {offset} beyond end ({size})")).with_file(&self.filename)
                );
            }
            let len = len.min(size - offset);
            let data = |n: u64| Extent {
                len: n,
                data: true,
                zero: false,
                allocated: true,
                offset: Some(offset),
                compressed: false,
            };
            if self.kind == Kind::HostDevice {
                return Ok(data(len));
            }
            // lseek(SEEK_DATA/SEEK_HOLE) does not block on the filesystems we
            // meet (it reads cached extent maps), so it runs on the shard.
            let a = self.align as u64;
            match sys::seek_extent(self.file.fd(), offset, size) {
                Ok(sys::Seek::Data(end)) => {
                    // Data up to an unaligned EOF: round up to whole aligned units
                    // (the tail reads as zeroes), as QEMU does under O_DIRECT.
                    let mut n = (end - offset).min(len);
                    if a > 1 && !(offset + n).is_multiple_of(a) {
                        n = ((offset + n).next_multiple_of(a) - offset).min(len);
                    }
                    Ok(data(n))
                }
                Ok(sys::Seek::Hole(end)) => {
                    // With O_DIRECT alignment, report holes in whole aligned units.
                    let mut n = (end - offset).min(len);
                    if a > 1 && n > a && !(offset + n).is_multiple_of(a) {
                        n -= (offset + n) % a;
                    }
                    Ok(Extent {
                        len: n,
                        data: false,
                        zero: true,
                        allocated: true,
                        offset: Some(offset),
                        compressed: false,
                    })
                }
                // No SEEK_DATA support: everything is data.
                Err(e) if is_unsupported(&e) => Ok(data(len)),
                Err(e) => Err(self.err(e, "block status", offset)),
            }
        })
    }

    fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_truncate(size, exact, prealloc))
    }

    fn allocated_size(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async move {
            // Device nodes report no blocks of their own: 0, as QEMU shows it.
            let st = sys::fstat(self.file.fd()).map_err(|e| self.err(e, "stat", 0))?;
            Ok(Some(st.st_blocks as u64 * 512))
        })
    }

    fn passthrough_fd(&self) -> Option<(RawFd, u64)> {
        Some((self.file.fd(), 0))
    }

    fn cached_extent(&self, offset: u64, len: u64) -> Option<(RawFd, u64)> {
        let residency = self.residency.as_ref()?;
        if !self.within_data(offset, len) {
            return None;
        }
        residency.cached(self.file.fd(), self.size(), offset, len).then_some((self.file.fd(), offset))
    }

    fn pipe_writable(&self, offset: u64, len: u64) -> bool {
        // Buffered regular files only (`residency` says which).
        self.residency.is_some() && !self.read_only && self.within_data(offset, len)
    }

    fn write_pipe_now(&self, offset: u64, pipe: &engine::net::Pipe, len: usize) -> Option<Result<()>> {
        if !self.pipe_writable(offset, len as u64) || !self.write_inline_max(offset, len as u64, INLINE_PIPE_MAX) {
            return None;
        }
        Some(pipe.to_file_now(self.file.fd(), offset, len).map_err(|e| self.err(e, "write", offset)))
    }

    fn write_pipe(
        &self,
        offset: u64,
        pipe: engine::net::Pipe,
        len: usize,
    ) -> BoxFuture<'_, (Result<()>, engine::net::Pipe)> {
        Box::pin(async move {
            if !self.pipe_writable(offset, len as u64) {
                return (Err(unsupported("writing from a pipe here").with_file(&self.filename)), pipe);
            }
            let _busy = WorkerWrite::new(&self.worker_writes);
            let (r, pipe) = self.file.write_pipe(pipe, len, offset).await;
            (r.map_err(|e| self.err(e, "write", offset)), pipe)
        })
    }

    fn map_cached(&self, offset: u64, len: usize) -> Option<IoBuf> {
        // Below this, a copy costs less than mapping and unmapping.
        if !self.mappable || len < MIN_MAPPED || offset.checked_add(len as u64)? > self.size() {
            return None;
        }
        // Inside `size`, the range ends at most in the page holding EOF (size
        // is EOF rounded up to 512), which maps; beyond that page would fault.
        let (base, map_len, start) = sys::map_resident(self.file.fd(), offset, len)?;
        // SAFETY: map_resident made this private mapping for us alone.
        Some(unsafe { IoBuf::from_mapping(base, map_len, start, len) })
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({ "type": "file", "data": {} }))
    }
}
