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
}

impl SendPart {
    pub fn len(&self) -> usize {
        match self {
            SendPart::Buf(_, r) | SendPart::Shared(_, r) => r.len(),
            SendPart::Bytes(v) => v.len(),
            SendPart::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of an in-memory part (empty for a file part).
    pub fn slice(&self) -> &[u8] {
        match self {
            SendPart::Buf(b, r) => &b[r.clone()],
            SendPart::Shared(b, r) => &b[r.clone()],
            SendPart::Bytes(v) => v,
            SendPart::File { .. } => &[],
        }
    }
}

/// A connected stream socket whose I/O runs on the current shard's ring.
pub struct Socket {
    fd: OwnedFd,
    /// (read end, write end) of the pipe file parts travel through, made on
    /// first use.
    pipe: std::cell::OnceCell<(OwnedFd, OwnedFd)>,
}

/// Size asked for the splice pipe: one splice moves at most this much.
const PIPE_SIZE: usize = 1 << 20;

/// Most iovecs one sendmsg carries (the kernel's UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

struct MsgRes {
    _hdr: Box<libc::msghdr>,
    _iov: Vec<libc::iovec>,
    parts: Vec<SendPart>,
}

impl Socket {
    pub fn new(fd: OwnedFd) -> Socket {
        Socket { fd, pipe: std::cell::OnceCell::new() }
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
        (errno_result(res), buf)
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

    /// Send every byte of `parts` (at most MAX_IOV of them) in order: memory
    /// parts with as few sendmsg calls as the socket allows, file parts by
    /// splice. The parts come back for reuse.
    pub async fn send_all(&self, parts: Vec<SendPart>) -> (io::Result<()>, Vec<SendPart>) {
        if !parts.iter().any(|p| matches!(p, SendPart::File { .. })) {
            return self.send_mem(parts, false).await;
        }
        let mut done = Vec::with_capacity(parts.len());
        let mut run = Vec::new();
        for p in parts {
            if let SendPart::File { fd, offset, len } = p {
                if !run.is_empty() {
                    // MSG_MORE: the header goes out with the data that follows.
                    let (r, back) = self.send_mem(std::mem::take(&mut run), true).await;
                    done.extend(back);
                    if let Err(e) = r {
                        return (Err(e), done);
                    }
                }
                if let Err(e) = self.splice_file(fd, offset, len).await {
                    return (Err(e), done);
                }
                done.push(p);
            } else {
                run.push(p);
            }
        }
        let (r, back) = self.send_mem(run, false).await;
        done.extend(back);
        (r, done)
    }

    fn pipe(&self) -> io::Result<&(OwnedFd, OwnedFd)> {
        if let Some(p) = self.pipe.get() {
            return Ok(p);
        }
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        use std::os::fd::FromRawFd;
        // SAFETY: both fds are new and ours.
        let p = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe we own; a smaller pipe (the limit) still works.
        unsafe { libc::fcntl(p.1.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(self.pipe.get_or_init(|| p))
    }

    async fn splice_op(&self, fd_in: RawFd, off_in: i64, fd_out: RawFd, len: usize) -> io::Result<usize> {
        let shard = expect_current();
        let sqe = opcode::Splice::new(types::Fd(fd_in), off_in, types::Fd(fd_out), -1, len as u32).build();
        let key = shard.submit_op(sqe);
        errno_result(Op::new(shard, key, ()).await.0)
    }

    /// Move `len` bytes of `fd` at `offset` to the socket through the pipe.
    async fn splice_file(&self, fd: RawFd, mut offset: u64, mut len: usize) -> io::Result<()> {
        let (rd, wr) = self.pipe()?;
        let (rd, wr) = (rd.as_raw_fd(), wr.as_raw_fd());
        while len > 0 {
            let n = self.splice_op(fd, offset as i64, wr, len.min(PIPE_SIZE)).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file ended before the data to send"));
            }
            let mut left = n;
            while left > 0 {
                match self.splice_op(rd, -1, self.fd(), left).await? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    k => left -= k,
                }
            }
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
                let s = p.slice();
                if skip >= s.len() {
                    skip -= s.len();
                    continue;
                }
                iov.push(libc::iovec { iov_base: s[skip..].as_ptr() as *mut libc::c_void, iov_len: s.len() - skip });
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
