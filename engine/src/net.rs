//! Sockets on the shard's ring: receive into and send from owned buffers
//! (`IORING_OP_RECV`, `IORING_OP_SENDMSG`), so a network front-end (the NBD
//! server and client) moves payloads between the wire and the block layer
//! without copying them in user space. It knows nothing of any protocol.

use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{opcode, types};

use crate::aio::errno_result;
use crate::runtime::op::Op;
use crate::runtime::shard::expect_current;
use crate::runtime::IoBuf;

/// One piece of a vectored send: a slice of an owned buffer, or a few inline
/// bytes (a protocol header) that travel in the same system call.
pub enum SendPart {
    Buf(IoBuf, Range<usize>),
    /// A slice of a buffer other parts also send from (the data chunks of a
    /// sparse read).
    Shared(std::rc::Rc<IoBuf>, Range<usize>),
    Bytes(Vec<u8>),
    /// `len` bytes of a file at `offset`, moved by splice(2) through a pipe:
    /// page-cache pages go to the socket by reference, copied nowhere. The fd
    /// must stay open until the send returns.
    File {
        fd: RawFd,
        offset: u64,
        len: usize,
    },
    /// The next `len` bytes of the socket's stage pipe (`Socket::stage`),
    /// which hold them in `slots` pipe buffers.
    Staged {
        len: usize,
        slots: usize,
    },
    /// A range of a file's shared mapping, sent like memory: the kernel
    /// copies it straight from the page cache into the socket.
    Mapped(std::sync::Arc<FileMap>, Range<usize>),
}

impl SendPart {
    pub fn len(&self) -> usize {
        match self {
            SendPart::Buf(_, r) | SendPart::Shared(_, r) | SendPart::Mapped(_, r) => r.len(),
            SendPart::Bytes(v) => v.len(),
            SendPart::File { len, .. } | SendPart::Staged { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of an in-memory part (empty for a file part, and for a
    /// mapped one: user space never reads a mapping, see `FileMap`).
    pub fn slice(&self) -> &[u8] {
        match self {
            SendPart::Buf(b, r) => &b[r.clone()],
            SendPart::Shared(b, r) => &b[r.clone()],
            SendPart::Bytes(v) => v,
            SendPart::File { .. } | SendPart::Staged { .. } | SendPart::Mapped(..) => &[],
        }
    }

    /// Is this part sent from memory by one sendmsg iovec?
    fn in_memory(&self) -> bool {
        matches!(self, SendPart::Buf(..) | SendPart::Shared(..) | SendPart::Bytes(_) | SendPart::Mapped(..))
    }

    /// The part's bytes as an iovec's base and length.
    fn iov(&self) -> (*const u8, usize) {
        match self {
            SendPart::Mapped(m, r) => (m.ptr.as_ptr().wrapping_add(r.start).cast_const(), r.len()),
            p => {
                let s = p.slice();
                (s.as_ptr(), s.len())
            }
        }
    }
}

/// A read-only shared mapping of a whole file that this process never
/// reads: its addresses are only handed to the kernel, as the source of a
/// send. The kernel then copies page-cache pages straight into the socket,
/// with no read(2) or splice(2) per request to stage them. Because only the
/// kernel touches the mapping, a file cut short under it makes that send
/// fail with EFAULT instead of raising SIGBUS in the process.
pub struct FileMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is immutable for its whole life and is never
// dereferenced in user space; its address may be used from any thread.
unsafe impl Send for FileMap {}
// SAFETY: as above: no thread reads or writes through the pointer.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Map the first `len` bytes of `fd` (open for reading).
    pub fn new(fd: RawFd, len: usize) -> io::Result<FileMap> {
        if len == 0 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: a fresh read-only shared mapping; the kernel picks the
        // address, and nothing else aliases it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(FileMap { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no reference into it
        // outlives self (sends hold an Arc to it until they complete).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A connected stream socket whose I/O runs on the current shard's ring.
pub struct Socket {
    fd: OwnedFd,
    /// (read end, write end) of the pipe file parts travel through, made on
    /// first use.
    pipe: std::cell::OnceCell<(OwnedFd, OwnedFd)>,
    /// The stage pipe (`stage`), made on first use; None if that failed.
    stage: std::cell::OnceCell<Option<Stage>>,
    /// The socket's status flags when adopted (negative if unknown).
    flags: libc::c_int,
}

/// A pipe replies are assembled in: a header written into it, then file data
/// spliced into it by reference, reply after reply, all of it moved to the
/// socket by one splice per batch. Every call is a plain system call on the
/// shard's thread: io_uring runs splice only in its worker threads, whose
/// hand-offs cost more than the whole of a 4 KiB reply.
struct Stage {
    rd: OwnedFd,
    wr: OwnedFd,
    /// Pipe buffers the pipe holds.
    slots: usize,
    /// Pipe buffers staged parts may occupy (counted until they are sent).
    used: std::cell::Cell<usize>,
    /// A send of staged bytes failed: what the pipe holds no longer matches
    /// the parts, so nothing more may be staged.
    broken: std::cell::Cell<bool>,
}

/// Size asked for the splice pipe: one splice moves at most this much.
const PIPE_SIZE: usize = 1 << 20;
/// Size asked for the stage pipe: 256 buffers, 127 staged 4 KiB replies.
const STAGE_PIPE_SIZE: usize = 1 << 20;

/// A new pipe (read end, write end, size in bytes), close-on-exec, with
/// `flags` (O_NONBLOCK), asked to hold `size` bytes; a smaller pipe (the
/// system's limit) still works, and the size returned is the real one.
fn new_pipe(flags: libc::c_int, size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both fds are new and ours.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a pipe we own.
    let mut got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
    if got <= 0 {
        // SAFETY: as above; F_GETPIPE_SZ only reads.
        got = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETPIPE_SZ) };
    }
    Ok((rd, wr, usize::try_from(got).unwrap_or(0)))
}

/// splice(2) on the shard's ring (which runs it in a worker thread, where it
/// may wait): `len` bytes from `fd_in` at `off_in` to `fd_out` at `off_out`
/// (-1: the fd's own position, as for pipes and sockets).
async fn ring_splice(fd_in: RawFd, off_in: i64, fd_out: RawFd, off_out: i64, len: usize) -> io::Result<usize> {
    let shard = expect_current();
    let sqe = opcode::Splice::new(types::Fd(fd_in), off_in, types::Fd(fd_out), off_out, len as u32).build();
    let key = shard.submit_op(sqe);
    errno_result(Op::new(shard, key, ()).await.0)
}

/// A pipe a payload travels through from a socket to a file by splice: the
/// socket's pages are passed by reference into the pipe (`Socket::splice_in`),
/// and copied once, into the page cache, on the way out (`Pipe::to_file`).
pub struct Pipe {
    rd: OwnedFd,
    wr: OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe of (asked) `size` bytes.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let (rd, wr, _) = new_pipe(libc::O_NONBLOCK, size)?;
        Ok(Pipe { rd, wr })
    }

    /// Read what the pipe holds (up to `buf.len()` bytes) into `buf`.
    pub fn drain(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: reads into the live slice `buf[got..]`.
            let n = unsafe { libc::read(self.rd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
            match n {
                n if n > 0 => got += n as usize,
                0 => break,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => {}
                        io::ErrorKind::WouldBlock => break,
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(got)
    }

    /// Move `len` bytes from the pipe into `fd` at `offset` on this thread,
    /// with blocking splice calls: for writes into the page cache that the
    /// caller knows will not wait (no reads, no allocation, no writeback).
    pub fn to_file_now(&self, fd: RawFd, mut offset: u64, mut len: usize) -> io::Result<()> {
        while len > 0 {
            let mut off = offset as libc::loff_t;
            // SAFETY: splice between two fds we hold; `off` is a live local.
            let n = unsafe {
                libc::splice(self.rd.as_raw_fd(), std::ptr::null_mut(), fd, &mut off, len, libc::SPLICE_F_MOVE)
            };
            match n {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "pipe ran dry before the payload's end")),
                n if n > 0 => {
                    offset += n as u64;
                    len -= n as usize;
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Move `len` bytes from the pipe into `fd` at `offset`, in an io_uring
    /// worker (a buffered write may wait on the filesystem).
    pub async fn to_file(&self, fd: RawFd, mut offset: u64, mut len: usize) -> io::Result<()> {
        while len > 0 {
            match ring_splice(self.rd.as_raw_fd(), -1, fd, offset as i64, len).await {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "pipe ran dry before the payload's end")),
                Ok(n) => {
                    offset += n as u64;
                    len -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Most iovecs one sendmsg carries (the kernel's UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

struct MsgRes {
    _hdr: Box<libc::msghdr>,
    _iov: Vec<libc::iovec>,
    parts: Vec<SendPart>,
}

impl Socket {
    /// Adopt a connected socket.
    pub fn new(fd: OwnedFd) -> Socket {
        // SAFETY: fcntl only reads the fd's status flags.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        Socket { fd, pipe: std::cell::OnceCell::new(), stage: std::cell::OnceCell::new(), flags }
    }

    /// Run `f` (a splice(2) on this socket) with the socket non-blocking,
    /// then restore its flags. A socket's O_NONBLOCK is the only thing that
    /// keeps splice from sleeping on it, and the shard's thread must not; it
    /// is not left set because the ring's own receives and sends on an
    /// O_NONBLOCK socket come back with EAGAIN instead of waiting (they
    /// retry when one slips through anyway). Returns None (and runs
    /// nothing) when the flags cannot be set.
    fn nonblocking<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        if self.flags < 0 {
            return None;
        }
        if self.flags & libc::O_NONBLOCK != 0 {
            return Some(f());
        }
        // SAFETY: fcntl sets status flags of an fd we own.
        if unsafe { libc::fcntl(self.fd(), libc::F_SETFL, self.flags | libc::O_NONBLOCK) } != 0 {
            return None;
        }
        let r = f();
        // SAFETY: as above, restoring what was there.
        unsafe { libc::fcntl(self.fd(), libc::F_SETFL, self.flags) };
        Some(r)
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Receive what is available (at least one byte) into `buf[range]`; 0 is
    /// end of stream.
    pub async fn recv(&self, mut buf: IoBuf, range: Range<usize>) -> (io::Result<usize>, IoBuf) {
        assert!(range.end <= buf.len(), "recv range {range:?} outside buffer of {}", buf.len());
        let len = u32::try_from(range.len()).unwrap_or(u32::MAX);
        let shard = expect_current();
        // SAFETY: range is inside the buffer (asserted); the Op owns the buffer
        // until the kernel is done with it.
        let ptr = unsafe { buf.as_mut_ptr().add(range.start) };
        let sqe = opcode::Recv::new(types::Fd(self.fd()), ptr, len).build();
        let key = shard.submit_op(sqe);
        let (res, buf) = Op::new(shard, key, buf).await;
        match errno_result(res) {
            // The socket was non-blocking when the ring tried (`nonblocking`).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.readable().await {
                Ok(()) => Box::pin(self.recv(buf, range)).await,
                Err(e) => (Err(e), buf),
            },
            r => (r, buf),
        }
    }

    /// Fill `buf[range]` completely; an early end of stream is UnexpectedEof.
    pub async fn recv_exact(&self, mut buf: IoBuf, mut range: Range<usize>) -> (io::Result<()>, IoBuf) {
        while !range.is_empty() {
            let (r, b) = self.recv(buf, range.clone()).await;
            buf = b;
            match r {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => range.start += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Wait until the socket has something to read (or has ended).
    pub async fn readable(&self) -> io::Result<()> {
        self.poll(libc::POLLIN).await
    }

    /// Wait until the socket has room to send (or has failed).
    async fn writable(&self) -> io::Result<()> {
        self.poll(libc::POLLOUT).await
    }

    /// Wait on the ring for one of `events` (POLLIN, POLLOUT) on the socket.
    async fn poll(&self, events: libc::c_short) -> io::Result<()> {
        let shard = expect_current();
        let sqe = opcode::PollAdd::new(types::Fd(self.fd()), events as u32).build();
        let key = shard.submit_op(sqe);
        errno_result(Op::new(shard, key, ()).await.0).map(|_| ())
    }

    /// Move the next `len` bytes of the stream into `pipe` by splice: the
    /// socket's pages by reference, no copy. Waits for bytes still on their
    /// way. Returns how many bytes moved: fewer than `len` when the pipe
    /// filled up (the rest is still in the socket). An early end of stream
    /// is UnexpectedEof.
    pub async fn splice_in(&self, pipe: &Pipe, len: usize) -> io::Result<usize> {
        let mut moved = 0;
        let mut waited = false;
        while moved < len {
            // SAFETY: splice from our socket into our pipe; no offsets.
            let splice = || unsafe {
                libc::splice(
                    self.fd(),
                    std::ptr::null_mut(),
                    pipe.wr.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - moved,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                )
            };
            // Unable to make it non-blocking: move nothing (the caller
            // receives the payload instead).
            let Some(n) = self.nonblocking(splice) else { return Ok(moved) };
            if n > 0 {
                moved += n as usize;
                waited = false;
                continue;
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                // Readable and still nothing moved: the pipe is full.
                io::ErrorKind::WouldBlock if waited => return Ok(moved),
                io::ErrorKind::WouldBlock => {
                    self.readable().await?;
                    waited = true;
                }
                _ => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Send every byte of `parts` (at most MAX_IOV of them) in order: memory
    /// parts with as few sendmsg calls as the socket allows, file parts by
    /// splice. The parts come back for reuse.
    pub async fn send_all(&self, parts: Vec<SendPart>) -> (io::Result<()>, Vec<SendPart>) {
        if !parts.iter().any(|p| matches!(p, SendPart::File { .. } | SendPart::Staged { .. })) {
            return self.send_mem(parts, false).await;
        }
        let staged = parts.iter().any(|p| matches!(p, SendPart::Staged { .. }));
        let r = self.send_mixed(parts).await;
        if r.0.is_err() && staged {
            // Staged bytes may be left in the pipe, no longer matching parts.
            if let Some(st) = self.stage() {
                st.broken.set(true);
            }
        }
        r
    }

    async fn send_mixed(&self, parts: Vec<SendPart>) -> (io::Result<()>, Vec<SendPart>) {
        let mut done = Vec::with_capacity(parts.len());
        let mut run = Vec::new();
        // Staged parts in a row, sent by one splice: (bytes, pipe buffers).
        let mut staged = (0usize, 0usize);
        for p in parts {
            if !matches!(p, SendPart::Staged { .. }) && staged.0 > 0 {
                if let Err(e) = self.send_staged(std::mem::take(&mut staged)).await {
                    return (Err(e), done);
                }
            }
            if !p.in_memory() && !run.is_empty() {
                // MSG_MORE: the header goes out with the data that follows.
                let (r, back) = self.send_mem(std::mem::take(&mut run), true).await;
                done.extend(back);
                if let Err(e) = r {
                    return (Err(e), done);
                }
            }
            match p {
                SendPart::File { fd, offset, len } => {
                    if let Err(e) = self.splice_file(fd, offset, len).await {
                        return (Err(e), done);
                    }
                    done.push(p);
                }
                SendPart::Staged { len, slots } => {
                    staged = (staged.0 + len, staged.1 + slots);
                    done.push(p);
                }
                p => run.push(p),
            }
        }
        if staged.0 > 0 {
            if let Err(e) = self.send_staged(staged).await {
                return (Err(e), done);
            }
        }
        let (r, back) = self.send_mem(run, false).await;
        done.extend(back);
        (r, done)
    }

    fn stage(&self) -> Option<&Stage> {
        self.stage
            .get_or_init(|| {
                if self.flags < 0 {
                    return None;
                }
                let (rd, wr, size) = new_pipe(libc::O_NONBLOCK, STAGE_PIPE_SIZE).ok()?;
                let slots = size / crate::page_size();
                Some(Stage { rd, wr, slots, used: std::cell::Cell::new(0), broken: std::cell::Cell::new(false) })
            })
            .as_ref()
    }

    /// Stage a reply: `header`, then `len` bytes of the page-cached file `fd`
    /// at `offset`, spliced by reference (no copy anywhere, not even in the
    /// kernel), returning the part that sends them. `Ok(None)`: the stage is
    /// full or unusable and nothing was staged (send the bytes another way).
    /// An error means the stage holds a partial reply: the connection's
    /// stream is broken and must be dropped. The file's pages must be in the
    /// page cache (the splice reads them on this thread), and every staged
    /// part must be sent, in the order staged, before other bytes of the
    /// stream (mixing with other parts in `send_all` keeps that order).
    pub fn stage_file(&self, header: &[u8], fd: RawFd, offset: u64, len: usize) -> io::Result<Option<SendPart>> {
        let Some(st) = self.stage().filter(|st| !st.broken.get()) else { return Ok(None) };
        // One buffer for the header; the data takes at most one per page it touches.
        let page = crate::page_size();
        let slots = 1 + ((offset % page as u64) as usize + len).div_ceil(page);
        if st.used.get() + slots > st.slots || header.len() > page {
            return Ok(None);
        }
        // SAFETY: writes `header`, a live slice, to our pipe.
        let n = unsafe { libc::write(st.wr.as_raw_fd(), header.as_ptr().cast(), header.len()) };
        if n != header.len() as isize {
            if n <= 0 {
                let e = io::Error::last_os_error();
                return if n == 0 || e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
            }
            return Err(io::Error::other("short write of a reply header into the stage pipe"));
        }
        st.used.set(st.used.get() + slots);
        let mut off = offset as libc::loff_t;
        let mut left = len;
        while left > 0 {
            // SAFETY: splice between fds the caller and we own; `off` is a live local.
            let n = unsafe {
                libc::splice(fd, &mut off, st.wr.as_raw_fd(), std::ptr::null_mut(), left, libc::SPLICE_F_NONBLOCK)
            };
            match n {
                n if n > 0 => left -= n as usize,
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ended before the data to send")),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(Some(SendPart::Staged { len: header.len() + len, slots }))
    }

    /// Move `len` staged bytes to the socket.
    async fn send_staged(&self, (len, slots): (usize, usize)) -> io::Result<()> {
        let st = self.stage().expect("staged parts without a stage");
        let r = self.pipe_to_socket(st.rd.as_raw_fd(), len).await;
        st.used.set(st.used.get().saturating_sub(slots));
        if r.is_err() {
            st.broken.set(true);
        }
        r
    }

    /// Splice `len` bytes from the pipe `rd` to the (non-blocking) socket:
    /// plain system calls while the socket takes them, waiting on the ring
    /// for room when it is full.
    async fn pipe_to_socket(&self, rd: RawFd, mut len: usize) -> io::Result<()> {
        while len > 0 {
            // SAFETY: splice from a pipe of ours to our socket; no offsets.
            let splice = || unsafe {
                libc::splice(rd, std::ptr::null_mut(), self.fd(), std::ptr::null_mut(), len, libc::SPLICE_F_NONBLOCK)
            };
            let Some(n) = self.nonblocking(splice) else {
                // Cannot make it non-blocking: let a ring worker wait instead.
                match ring_splice(rd, -1, self.fd(), -1, len).await? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    k => len -= k,
                }
                continue;
            };
            match n {
                n if n > 0 => len -= n as usize,
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => {}
                        io::ErrorKind::WouldBlock => self.writable().await?,
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }

    fn pipe(&self) -> io::Result<&(OwnedFd, OwnedFd)> {
        if let Some(p) = self.pipe.get() {
            return Ok(p);
        }
        let (rd, wr, _) = new_pipe(0, PIPE_SIZE)?;
        Ok(self.pipe.get_or_init(|| (rd, wr)))
    }

    /// Move `len` bytes of `fd` at `offset` to the socket through the pipe.
    async fn splice_file(&self, fd: RawFd, mut offset: u64, mut len: usize) -> io::Result<()> {
        let (rd, wr) = self.pipe()?;
        let (rd, wr) = (rd.as_raw_fd(), wr.as_raw_fd());
        while len > 0 {
            let n = ring_splice(fd, offset as i64, wr, -1, len.min(PIPE_SIZE)).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ended before the data to send"));
            }
            self.pipe_to_socket(rd, n).await?;
            offset += n as u64;
            len -= n;
        }
        Ok(())
    }

    async fn send_mem(&self, mut parts: Vec<SendPart>, more: bool) -> (io::Result<()>, Vec<SendPart>) {
        assert!(parts.len() <= MAX_IOV, "{} iovecs in one send", parts.len());
        let total: usize = parts.iter().map(SendPart::len).sum();
        let mut sent = 0usize;
        while sent < total {
            // Skip what went out already: whole parts, then a prefix of one.
            let mut skip = sent;
            let mut iov = Vec::with_capacity(parts.len());
            for p in &parts {
                let (base, len) = p.iov();
                if skip >= len {
                    skip -= len;
                    continue;
                }
                iov.push(libc::iovec { iov_base: base.wrapping_add(skip) as *mut libc::c_void, iov_len: len - skip });
                skip = 0;
            }
            // SAFETY: msghdr is plain data; zeroed is a valid empty header.
            let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
            hdr.msg_iov = iov.as_mut_ptr();
            hdr.msg_iovlen = iov.len();
            let shard = expect_current();
            let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
            let sqe =
                opcode::SendMsg::new(types::Fd(self.fd()), &*hdr as *const libc::msghdr).flags(flags as u32).build();
            let key = shard.submit_op(sqe);
            // The iovecs point into `parts`' heap memory, which moving the
            // Vec (and the IoBufs in it) does not move; the Op keeps all of
            // it alive until the kernel is done.
            let (res, r) = Op::new(shard, key, MsgRes { _hdr: hdr, _iov: iov, parts }).await;
            parts = r.parts;
            match errno_result(res) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), parts),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The socket was non-blocking when the ring tried (`nonblocking`).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.writable().await {
                        return (Err(e), parts);
                    }
                }
                Err(e) => return (Err(e), parts),
            }
        }
        (Ok(()), parts)
    }

    /// Shut the connection down both ways: pending and future receives end.
    pub fn shutdown(&self) {
        // SAFETY: shutdown on a socket fd we own; failure (not connected) is harmless.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_RDWR) };
    }
}
