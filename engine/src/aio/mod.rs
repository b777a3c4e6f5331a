//! I/O backends behind one file handle, chosen per file as QEMU's `aio=` option
//! does: `io_uring` (default; fixed buffers and registered files), `native` (Linux
//! AIO, completion through an eventfd the shard's ring reads; needs O_DIRECT), and
//! `threads` (a worker pool doing preadv/pwritev). This module knows syscalls and
//! buffers, not block semantics: alignment, short reads and zeroing policy belong to
//! the protocol drivers.

pub(crate) mod native;
mod threads;
pub(crate) mod uring;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{invalid, Error};
use crate::runtime::shard::ShardShared;
use crate::runtime::IoBuf;

/// Which mechanism carries a file's reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Threads,
    Native,
    IoUring,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Threads, Backend::Native, Backend::IoUring];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Threads => "threads",
            Backend::Native => "native",
            Backend::IoUring => "io_uring",
        }
    }
}

impl FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Backend, Error> {
        match s {
            "threads" => Ok(Backend::Threads),
            "native" => Ok(Backend::Native),
            "io_uring" => Ok(Backend::IoUring),
            _ => Err(invalid(format!("invalid aio mode '{s}': expected threads, native or io_uring"))),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One read or write: `len` bytes between `buf[at..]` and file offset `off`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rw {
    pub at: usize,
    pub len: usize,
    pub off: u64,
    pub write: bool,
    /// Durable before completion (RWF_DSYNC).
    pub fua: bool,
}

static NEXT_FILE_UID: AtomicU64 = AtomicU64::new(1);

/// An open file and the backend that does its I/O. Methods must run on a shard.
pub struct AioFile {
    /// Shared with thread-pool jobs so the fd number stays ours until every job
    /// that uses it has finished, even if the AioFile is dropped first.
    fd: Arc<OwnedFd>,
    /// Writes may join their neighbours in one vectored write (io_uring).
    pub(crate) merge_writes: bool,
    /// io_uring: writes of at least this many bytes go to the thread pool
    /// (0: none do). See `with_pooled_writes`.
    pooled_writes: usize,
    /// Writes that went to the pool that way.
    pooled: AtomicU64,
    uid: u64,
    backend: Backend,
    /// Shards whose ring registered this file; they drop it when we close.
    registered_on: Mutex<Vec<Weak<ShardShared>>>,
    /// For buffered writes to a regular file in the thread pool: one at a time.
    /// The kernel serialises them on the inode lock anyway, and dozens of
    /// workers spinning on that lock collapsed throughput (160k to 17k IOPS);
    /// io_uring's io-wq makes the same choice for the same reason.
    serial_writes: Option<Arc<threads::SerialQueue>>,
    /// io_uring: the shard whose ring takes this file's large page-cache
    /// writes, wherever they come from (the shard that opened it). The kernel
    /// runs them one at a time under the inode lock whichever ring sends them;
    /// from one ring they queue back to back in that ring's io-wq, while from
    /// several, each ring's worker spins on the lock (9 % of a convert's CPU
    /// measured, and a preempted holder doubled run times).
    write_home: Option<Weak<ShardShared>>,
}

/// Page-cache writes at least this large go to the file's home ring; smaller
/// ones hold the inode lock too briefly for the hop to pay.
const HOMED_WRITE: usize = 64 << 10;

impl AioFile {
    pub fn new(fd: OwnedFd, backend: Backend) -> AioFile {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl and fstat on an fd we own; st is plain data.
        let buffered_regular = unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            let mut st: libc::stat = std::mem::zeroed();
            fl >= 0 && fl & libc::O_DIRECT == 0 && libc::fstat(raw, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG
        };
        AioFile {
            serial_writes: buffered_regular.then(|| Arc::new(threads::SerialQueue::default())),
            write_home: if buffered_regular && backend == Backend::IoUring {
                crate::runtime::shard::current().map(|s| Arc::downgrade(&s.shared))
            } else {
                None
            },
            fd: Arc::new(fd),
            merge_writes: true,
            pooled_writes: 0,
            pooled: AtomicU64::new(0),
            uid: NEXT_FILE_UID.fetch_add(1, Ordering::Relaxed),
            backend,
            registered_on: Mutex::new(Vec::new()),
        }
    }

    /// Whether this file's writes may go out merged with the ones next to
    /// them (RuntimeConfig::merge_writes; on by default).
    pub fn with_merge_writes(mut self, on: bool) -> AioFile {
        self.merge_writes = on;
        self
    }

    /// io_uring: send writes of at least `min` bytes (0: none) to the thread
    /// pool instead of the ring. For O_DIRECT files on filesystems whose
    /// direct writes io_uring cannot issue without blocking (btrfs writing
    /// a new extent, most filesystems but ext4 and xfs): the ring hands such
    /// a write to its io-wq worker, and io-wq runs a file's writes one at a
    /// time unless the filesystem declares that it takes direct writes in
    /// parallel (only ext4 and xfs do), so sixteen 1 MiB writes in flight
    /// go to the disk one after another. The pool runs them side by side.
    /// Smaller writes stay on the ring, where they merge.
    pub fn with_pooled_writes(mut self, min: usize) -> AioFile {
        self.pooled_writes = min;
        self
    }

    /// Writes sent to the thread pool by `with_pooled_writes` so far.
    pub fn pooled_writes(&self) -> u64 {
        self.pooled.load(Ordering::Relaxed)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Read up to `len` bytes at file offset `off` into `buf[at..at+len]`.
    /// Returns the byte count (short at EOF) and the buffer.
    pub async fn read(&self, buf: IoBuf, at: usize, len: usize, off: u64) -> (io::Result<usize>, IoBuf) {
        self.rw(buf, Rw { at, len, off, write: false, fua: false }).await
    }

    /// Write `buf[at..at+len]` at `off`; `fua` makes it durable before completion.
    pub async fn write(&self, buf: IoBuf, at: usize, len: usize, off: u64, fua: bool) -> (io::Result<usize>, IoBuf) {
        self.rw(buf, Rw { at, len, off, write: true, fua }).await
    }

    async fn rw(&self, buf: IoBuf, rw: Rw) -> (io::Result<usize>, IoBuf) {
        assert!(rw.at + rw.len <= buf.len(), "I/O range {}+{} outside buffer of {}", rw.at, rw.len, buf.len());
        match self.backend {
            Backend::IoUring if rw.write && self.pooled_writes > 0 && rw.len >= self.pooled_writes => {
                self.pooled.fetch_add(1, Ordering::Relaxed);
                threads::rw(self.fd.clone(), self.serial_writes.as_ref(), buf, rw).await
            }
            Backend::IoUring => match self.remote_home(&rw) {
                Some(home) => {
                    let fd = self.fd.clone();
                    let (tx, rx) = crate::runtime::join_channel();
                    home.post(Box::new(move || {
                        crate::runtime::spawn_local(async move { tx.send(uring::rw_fd(&fd, buf, rw).await) });
                    }));
                    rx.await
                }
                None => uring::rw(self, buf, rw).await,
            },
            Backend::Native => native::rw(self, buf, rw).await,
            Backend::Threads => {
                let serial = if rw.write { self.serial_writes.as_ref() } else { None };
                threads::rw(self.fd.clone(), serial, buf, rw).await
            }
        }
    }

    /// The home shard a write must hop to, if it is a large page-cache write
    /// arriving on another shard and home still runs.
    fn remote_home(&self, rw: &Rw) -> Option<Arc<ShardShared>> {
        if !rw.write || rw.len < HOMED_WRITE {
            return None;
        }
        let home = self.write_home.as_ref()?.upgrade()?;
        let here = crate::runtime::shard::current()?;
        (!Arc::ptr_eq(&here.shared, &home) && !home.shutdown.load(Ordering::Acquire)).then_some(home)
    }

    /// Write `buf[at..at+len]` at `off` now, with pwrite(2) on this thread:
    /// for the caller that knows the write cannot block for long (into
    /// pages already in the page cache). Returns the bytes written (all, or
    /// an error).
    pub fn write_now(&self, buf: &IoBuf, at: usize, len: usize, off: u64) -> io::Result<usize> {
        self.write_slice_now(&buf[at..at + len], off)
    }

    /// `write_now` of a slice (the caller's memory, written before return).
    pub fn write_slice_now(&self, data: &[u8], off: u64) -> io::Result<usize> {
        let len = data.len();
        let mut done = 0;
        while done < len {
            let rest = &data[done..];
            // SAFETY: pwrite reads the live slice `rest` from our fd.
            let n = unsafe { libc::pwrite(self.fd(), rest.as_ptr().cast(), rest.len(), (off + done as u64) as libc::off_t) };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Move `len` bytes from `pipe` into the file at `off` (splice, in an
    /// io_uring worker). Large ones go to the file's home ring, as large
    /// writes do (`write_home`): from two rings, two workers would spin on
    /// the inode lock. The pipe comes back with the result.
    pub async fn write_pipe(&self, pipe: crate::net::Pipe, len: usize, off: u64) -> (io::Result<()>, crate::net::Pipe) {
        let rw = Rw { at: 0, len, off, write: true, fua: false };
        match self.remote_home(&rw) {
            Some(home) => {
                let fd = self.fd.clone();
                let (tx, rx) = crate::runtime::join_channel();
                home.post(Box::new(move || {
                    crate::runtime::spawn_local(async move {
                        let r = pipe.to_file(fd.as_raw_fd(), off, len).await;
                        tx.send((r, pipe))
                    });
                }));
                rx.await
            }
            None => {
                let r = pipe.to_file(self.fd(), off, len).await;
                (r, pipe)
            }
        }
    }

    /// fdatasync (or fsync when `datasync` is false).
    pub async fn fsync(&self, datasync: bool) -> io::Result<()> {
        match self.backend {
            Backend::IoUring => uring::fsync(self, datasync).await,
            // Linux AIO's fsync is not supported by most filesystems; QEMU also
            // sends flushes to its thread pool in aio=native mode.
            Backend::Native | Backend::Threads => threads::fsync(self.fd.clone(), datasync).await,
        }
    }

    /// fallocate(2) with `mode` (FALLOC_FL_* bits) over [off, off+len).
    pub async fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        match self.backend {
            Backend::IoUring => uring::fallocate(self, mode, off, len).await,
            Backend::Native | Backend::Threads => threads::fallocate(self.fd.clone(), mode, off, len).await,
        }
    }

    /// Run a blocking syscall wrapper off the shard, in the helper pool.
    pub async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(RawFd) -> T + Send + 'static) -> T {
        let fd = self.fd.clone();
        threads::run(move || f(fd.as_raw_fd())).await
    }
}

impl Drop for AioFile {
    fn drop(&mut self) {
        let uid = self.uid;
        let shards = std::mem::take(&mut *self.registered_on.lock().unwrap_or_else(|e| e.into_inner()));
        for weak in shards {
            let Some(shared) = weak.upgrade() else { continue };
            match crate::runtime::shard::current() {
                Some(s) if s.shared.uid == shared.uid => s.unregister_file(uid),
                _ => shared.post(Box::new(move || {
                    if let Some(s) = crate::runtime::shard::current() {
                        s.unregister_file(uid);
                    }
                })),
            }
        }
    }
}

/// Run a blocking closure on the helper pool and await its result (for work that
/// can only block: opening files, ioctls, lseek on some filesystems).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    threads::run(f).await
}

pub(crate) fn errno_result(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}
