//! The transmission phase of one connection, on one shard: a reader that
//! parses requests (many per receive) and starts each as its own task, the
//! handlers that run them against the export's node concurrently, and a
//! writer that sends every queued reply in one vectored send. Payloads go
//! from the wire into the buffer the block layer writes, and from the buffer
//! a read filled onto the wire. Negotiation is not here (`handshake.rs`).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use engine::block::{chain_status, BlockNode, WriteFlags, ZeroFlags};
use engine::error::{Error, ErrorKind};
use engine::net::{Pipe, SendPart, Socket, MAX_IOV};
use engine::runtime::IoBuf;

use super::handshake::{MetaContext, Negotiated};
use super::{DetectZeroes, Export, Server, Stats};
use crate::proto::*;

/// Requests one connection may have started and not yet answered.
const MAX_INFLIGHT: usize = 256;
/// Bytes of request payloads and read data one connection may hold (a
/// single request of up to the maximum size is always let through).
const MAX_HELD: usize = 64 << 20;
/// Size of the buffer requests are received into.
const STAGE: usize = 64 << 10;
/// Reads at least this large are split into data and hole chunks when the
/// client has structured replies; smaller ones are sent whole (a block status
/// lookup would cost more than the zeroes it saves).
const SPARSE_READ_MIN: u64 = 64 << 10;
/// Reads at least this large are spliced from the file when the export
/// maps linearly onto one (raw).
const SPLICE_MIN: u64 = 64 << 10;
/// Reads up to this size whose data is in the page cache are staged
/// (`Socket::stage_file`); the stage pipe holds 1 MiB.
const STAGE_MAX: usize = 256 << 10;
/// Writes of this size and up to SPLICE_WRITE_MAX go from the socket to the
/// file by splice (`splice_write`), through pipes of WRITE_PIPE_SIZE bytes.
const SPLICE_WRITE_MIN: u64 = 64 << 10;
const SPLICE_WRITE_MAX: u64 = 256 << 10;
const WRITE_PIPE_SIZE: usize = 1 << 20;
/// Most extents one block status reply describes.
const MAX_EXTENTS: usize = 2048;
/// Bytes of large buffers kept for reuse per connection: a fresh heap
/// buffer costs a page fault per page (nbdcopy's 256 KiB reads spent a
/// quarter of the server's time faulting in buffers with a cache of 16).
const BUF_CACHE_BYTES: usize = 32 << 20;

enum Wire {
    Plain(Socket),
    Tls { sock: Socket, tls: Box<RefCell<rustls::ServerConnection>>, pending: RefCell<Vec<u8>> },
}

struct Conn {
    wire: Wire,
    server: Arc<Server>,
    export: Arc<Export>,
    mode: ReplyMode,
    contexts: Vec<(u32, MetaContext)>,
    /// Reply parts waiting for the writer.
    out: RefCell<Vec<SendPart>>,
    /// Requests and bytes the writer releases once `out` has been sent.
    out_done: Cell<(usize, usize)>,
    inflight: Cell<usize>,
    held: Cell<usize>,
    writer_wait: RefCell<Option<Waker>>,
    reader_wait: RefCell<Option<Waker>>,
    /// No more requests will be read (DISC, EOF, a protocol violation).
    closing: Cell<bool>,
    /// The peer is gone: replies are dropped.
    dead: Cell<bool>,
    bufs: RefCell<Vec<IoBuf>>,
    /// Empty pipes for spliced write payloads (as many as were ever in use
    /// at once; the back-pressure on held bytes bounds them).
    pipes: RefCell<Vec<Pipe>>,
}

fn wake(w: &RefCell<Option<Waker>>) {
    if let Some(w) = w.borrow_mut().take() {
        w.wake();
    }
}

/// Serve a negotiated connection until it ends. Runs on a shard.
pub async fn serve(server: Arc<Server>, n: Negotiated) {
    let Negotiated { fd, tls, export, mode, contexts } = n;
    let sock = Socket::new(fd);
    let wire = match tls {
        None => Wire::Plain(sock),
        Some(mut t) => {
            t.set_buffer_limit(None);
            Wire::Tls { sock, tls: Box::new(RefCell::new(t)), pending: RefCell::new(Vec::new()) }
        }
    };
    let c = Rc::new(Conn {
        wire,
        server,
        export,
        mode,
        contexts,
        out: RefCell::new(Vec::new()),
        out_done: Cell::new((0, 0)),
        inflight: Cell::new(0),
        held: Cell::new(0),
        writer_wait: RefCell::new(None),
        reader_wait: RefCell::new(None),
        closing: Cell::new(false),
        dead: Cell::new(false),
        bufs: RefCell::new(Vec::new()),
        pipes: RefCell::new(Vec::new()),
    });
    let writer = engine::runtime::spawn_local(writer(c.clone()));
    if let Err(e) = reader(&c).await {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            c.server.log(format!("connection: {e}"));
        }
    }
    c.closing.set(true);
    // Answer what was started before closing (the spec asks servers to
    // finish in-flight requests on a disconnect).
    poll_fn(|cx| {
        if c.inflight.get() == 0 || c.dead.get() {
            Poll::Ready(())
        } else {
            *c.reader_wait.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
    wake(&c.writer_wait);
    writer.await;
    if let Wire::Tls { tls, .. } = &c.wire {
        tls.borrow_mut().send_close_notify();
        let _ = c.flush_tls().await;
    }
    c.socket().shutdown();
}

impl Conn {
    fn socket(&self) -> &Socket {
        match &self.wire {
            Wire::Plain(s) | Wire::Tls { sock: s, .. } => s,
        }
    }

    /// Receive some bytes into `buf[range]` (decrypted under TLS).
    async fn recv(&self, mut buf: IoBuf, range: std::ops::Range<usize>) -> (io::Result<usize>, IoBuf) {
        let (sock, tls, pending) = match &self.wire {
            Wire::Plain(s) => return s.recv(buf, range).await,
            Wire::Tls { sock, tls, pending } => (sock, tls, pending),
        };
        loop {
            {
                let mut t = tls.borrow_mut();
                match t.reader().read(&mut buf[range.clone()]) {
                    Ok(n) => return (Ok(n), buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return (Err(e), buf),
                }
                let mut p = pending.borrow_mut();
                if !p.is_empty() {
                    let mut rd = &p[..];
                    let r = t.read_tls(&mut rd);
                    let used = p.len() - rd.len();
                    p.drain(..used);
                    if let Err(e) = r.and_then(|_| t.process_new_packets().map(drop).map_err(io::Error::other)) {
                        return (Err(e), buf);
                    }
                    continue;
                }
            }
            let (r, tmp) = sock.recv(IoBuf::new(STAGE), 0..STAGE).await;
            match r {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => pending.borrow_mut().extend_from_slice(&tmp[..n]),
                Err(e) => return (Err(e), buf),
            }
        }
    }

    async fn recv_exact(&self, mut buf: IoBuf, mut range: std::ops::Range<usize>) -> (io::Result<()>, IoBuf) {
        if let Wire::Plain(s) = &self.wire {
            return s.recv_exact(buf, range).await;
        }
        while !range.is_empty() {
            let (r, b) = self.recv(buf, range.clone()).await;
            buf = b;
            match r {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => range.start += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Send whatever TLS has encrypted and not yet sent.
    async fn flush_tls(&self) -> io::Result<()> {
        let Wire::Tls { sock, tls, .. } = &self.wire else {
            return Ok(());
        };
        loop {
            let mut v = Vec::new();
            {
                let mut t = tls.borrow_mut();
                while t.wants_write() {
                    t.write_tls(&mut v)?;
                }
            }
            if v.is_empty() {
                return Ok(());
            }
            sock.send_all(vec![SendPart::Bytes(v)]).await.0?;
        }
    }

    /// Send parts (all of them, in order).
    async fn send(&self, parts: Vec<SendPart>) -> (io::Result<()>, Vec<SendPart>) {
        match &self.wire {
            Wire::Plain(s) => s.send_all(parts).await,
            Wire::Tls { tls, .. } => {
                {
                    let mut t = tls.borrow_mut();
                    for p in &parts {
                        if let SendPart::Buf(..) | SendPart::Shared(..) = p {
                            Stats::add(&self.server.stats.read_copied_bytes, p.len() as u64);
                        }
                        if let Err(e) = t.writer().write_all(p.slice()) {
                            return (Err(e), parts);
                        }
                    }
                }
                (self.flush_tls().await, parts)
            }
        }
    }

    /// A buffer for `len` bytes of payload: the shard's registered pool for
    /// small ones, else a recycled large buffer.
    fn buffer(&self, len: usize) -> IoBuf {
        if len <= 64 << 10 {
            return IoBuf::new(len);
        }
        let mut cache = self.bufs.borrow_mut();
        if let Some(i) = cache.iter().position(|b| b.capacity() >= len) {
            let mut b = cache.swap_remove(i);
            b.set_len(len);
            return b;
        }
        IoBuf::heap(len)
    }

    fn recycle(&self, b: IoBuf) {
        let mut cache = self.bufs.borrow_mut();
        let held: usize = cache.iter().map(IoBuf::capacity).sum();
        if b.capacity() > 64 << 10 && held + b.capacity() <= BUF_CACHE_BYTES {
            cache.push(b);
        }
    }

    /// Queue a request's reply parts and account for the request's end.
    fn reply(&self, parts: Vec<SendPart>, held: usize) {
        if !self.dead.get() {
            self.out.borrow_mut().extend(parts);
        }
        let (r, b) = self.out_done.get();
        self.out_done.set((r + 1, b + held));
        wake(&self.writer_wait);
    }

    fn release(&self, reqs: usize, bytes: usize) {
        self.inflight.set(self.inflight.get() - reqs);
        self.held.set(self.held.get() - bytes);
        wake(&self.reader_wait);
    }
}

async fn writer(c: Rc<Conn>) {
    loop {
        poll_fn(|cx| {
            if !c.out.borrow().is_empty() || c.out_done.get().0 > 0 || (c.closing.get() && c.inflight.get() == 0) {
                Poll::Ready(())
            } else {
                *c.writer_wait.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let parts: Vec<SendPart> = {
            let mut out = c.out.borrow_mut();
            let n = out.len().min(MAX_IOV);
            out.drain(..n).collect()
        };
        // Only what is released now was fully queued before this send.
        let done = if c.out.borrow().is_empty() { c.out_done.replace((0, 0)) } else { (0, 0) };
        if !parts.is_empty() && !c.dead.get() {
            let (r, parts) = c.send(parts).await;
            Stats::add(&c.server.stats.sends, 1);
            if let Err(e) = r {
                if !c.dead.get() {
                    c.server.log(format!("sending reply: {e}"));
                }
                c.dead.set(true);
                c.out.borrow_mut().clear();
                c.socket().shutdown();
            }
            for p in parts {
                if let SendPart::Buf(b, _) = p {
                    c.recycle(b);
                }
            }
        }
        c.release(done.0, done.1);
        if c.closing.get() && c.inflight.get() == 0 && c.out.borrow().is_empty() {
            return;
        }
    }
}

/// Read requests until the client disconnects or breaks the protocol.
async fn reader(c: &Rc<Conn>) -> io::Result<()> {
    let ext = c.mode == ReplyMode::Extended;
    let hlen = Request::header_len(ext);
    let mut stage = IoBuf::new(STAGE);
    let (mut start, mut end) = (0usize, 0usize);
    // Receive no more than the next header (a payload may follow it).
    let mut exact = false;
    loop {
        while end - start < hlen {
            if start > 0 {
                stage.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            let limit = if exact { start + hlen } else { STAGE };
            let (r, b) = c.recv(stage, end..limit).await;
            Stats::add(&c.server.stats.recvs, 1);
            stage = b;
            match r? {
                0 => return Ok(()),
                n => end += n,
            }
        }
        let req = match Request::parse(&stage[start..start + hlen], ext) {
            Ok(r) => r,
            Err(magic) => {
                c.server.log(format!("bad request magic {magic:#x}, closing"));
                return Ok(());
            }
        };
        start += hlen;
        Stats::add(&c.server.stats.requests, 1);
        if req.ty == CMD_DISC {
            return Ok(());
        }
        // A payload follows WRITE, and any command sent with PAYLOAD_LEN.
        let has_payload = req.ty == CMD_WRITE || (ext && req.flags & CMD_FLAG_PAYLOAD_LEN != 0);
        let mut payload = None;
        exact = false;
        if has_payload {
            if req.len > u64::from(c.server.max_request) {
                c.server.log(format!("request payload of {} bytes exceeds the maximum, closing", req.len));
                return Ok(());
            }
            let len = req.len as usize;
            // Large writes arrive by splice; receive only headers after one,
            // so the next payload stays in the socket for the splice whole.
            exact = len as u64 >= SPLICE_WRITE_MIN;
            let have = (end - start).min(len);
            if let Some(p) = splice_write(c, &req, &stage[start..start + have]).await? {
                start += have;
                payload = Some(p);
            } else if end - start >= len && end - start - len < hlen {
                // The payload is the last thing received: the receive buffer
                // becomes the write's buffer, and a fresh one takes over
                // receiving (with the partial header, if any, that followed).
                // Payloads with more behind them are copied out instead, so
                // a batch of requests is never copied over and over.
                let mut fresh = IoBuf::new(STAGE);
                let rest = end - start - len;
                fresh[..rest].copy_from_slice(&stage[start + len..end]);
                let full = std::mem::replace(&mut stage, fresh);
                payload = Some(Payload::Buf(full, start..start + len));
                (start, end) = (0, rest);
            } else {
                // Partly here, or followed by more requests: copy what is
                // here, receive the rest in place.
                let mut buf = c.buffer(len);
                let have = (end - start).min(len);
                buf[..have].copy_from_slice(&stage[start..start + have]);
                Stats::add(&c.server.stats.write_copied_bytes, have as u64);
                start += have;
                let (r, b) = c.recv_exact(buf, have..len).await;
                r?;
                payload = Some(Payload::Buf(b, 0..len));
            }
            Stats::add(&c.server.stats.received_bytes, len as u64);
        }
        let held = if req.ty == CMD_READ { req.len.min(u64::from(c.server.max_request)) as usize } else { 0 }
            + match &payload {
                Some(Payload::Buf(b, _)) => b.capacity(),
                Some(Payload::Pipe { head, len, .. }) => len + head.as_ref().map_or(0, IoBuf::capacity),
                None => 0,
            };
        c.inflight.set(c.inflight.get() + 1);
        c.held.set(c.held.get() + held);
        let c2 = c.clone();
        engine::runtime::spawn_local(async move { handle(c2, req, payload, held).await });
        // Back-pressure: stop reading while this connection holds too much.
        poll_fn(|cx| {
            if c.inflight.get() < MAX_INFLIGHT && c.held.get() < MAX_HELD || c.dead.get() {
                Poll::Ready(())
            } else {
                *c.reader_wait.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if c.dead.get() {
            return Ok(());
        }
    }
}

/// Splice a WRITE's payload from the socket into a pipe, when it is large
/// and the export takes it straight into a buffered host file (raw): the
/// socket's pages go to the pipe by reference, and the one copy is the
/// kernel's, into the page cache. `have` is the start of the payload,
/// received already with the header; it is written from memory. None:
/// receive the payload into memory instead (nothing was taken from the
/// socket). If the pipe fills before the payload's end, what it holds is
/// read back and the rest received behind it.
async fn splice_write(c: &Conn, req: &Request, have: &[u8]) -> io::Result<Option<Payload>> {
    let e = &*c.export;
    let len = req.len as usize;
    let (align, _, _) = e.block_sizes(c.server.max_request);
    let usable = matches!(c.wire, Wire::Plain(_))
        && req.ty == CMD_WRITE
        && (SPLICE_WRITE_MIN..=SPLICE_WRITE_MAX).contains(&req.len)
        && len - have.len() >= SPLICE_WRITE_MIN as usize / 2
        && !e.read_only
        && e.detect_zeroes == DetectZeroes::Off
        && req.offset.checked_add(req.len).is_some_and(|end| end <= e.size)
        && req.offset.is_multiple_of(u64::from(align))
        && req.len.is_multiple_of(u64::from(align));
    if !usable {
        return Ok(None);
    }
    let Some((fd, host)) = e.node.write_extent(req.offset + e.offset, req.len) else { return Ok(None) };
    let pipe = match c.pipes.borrow_mut().pop() {
        Some(p) => p,
        None => match Pipe::new(WRITE_PIPE_SIZE) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        },
    };
    let head = (!have.is_empty()).then(|| {
        let mut b = c.buffer(have.len());
        b[..have.len()].copy_from_slice(have);
        Stats::add(&c.server.stats.write_copied_bytes, have.len() as u64);
        b
    });
    let tail = len - have.len();
    let moved = c.socket().splice_in(&pipe, tail).await?;
    if moved == tail {
        Stats::add(&c.server.stats.spliced_in_bytes, tail as u64);
        return Ok(Some(Payload::Pipe { head, pipe, len: tail, fd, host: host + have.len() as u64 }));
    }
    let mut buf = c.buffer(len);
    buf[..have.len()].copy_from_slice(have);
    let got = pipe.drain(&mut buf[have.len()..have.len() + moved])?;
    if got != moved {
        return Err(io::Error::other(format!("pipe gave back {got} of {moved} payload bytes")));
    }
    Stats::add(&c.server.stats.write_copied_bytes, (have.len() + moved) as u64);
    if let Some(h) = head {
        c.recycle(h);
    }
    let (r, b) = c.recv_exact(buf, have.len() + moved..len).await;
    r?;
    c.pipes.borrow_mut().push(pipe);
    Ok(Some(Payload::Buf(b, 0..len)))
}

/// A request's payload: in memory, or in a pipe on its way to a file.
enum Payload {
    Buf(IoBuf, Range<usize>),
    /// The payload's start (`head`, received with the header, if any), then
    /// `len` bytes spliced from the socket, for the host file `fd` at `host`.
    Pipe {
        head: Option<IoBuf>,
        pipe: Pipe,
        len: usize,
        fd: std::os::fd::RawFd,
        host: u64,
    },
}

/// An error to send back: the wire errno and a message for the client.
struct Fail(u32, String);

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        let errno = match e.kind() {
            ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => EINVAL,
            ErrorKind::NoSpace => ENOSPC,
            ErrorKind::Unsupported => ENOTSUP,
            ErrorKind::ReadOnly | ErrorKind::PermissionDenied => EPERM,
            _ => wire_errno(e.to_errno()),
        };
        Fail(errno, e.to_string())
    }
}

fn fail(errno: u32, msg: impl Into<String>) -> Fail {
    Fail(errno, msg.into())
}

async fn handle(c: Rc<Conn>, req: Request, payload: Option<Payload>, held: usize) {
    let parts = match run(&c, &req, payload).await {
        Ok(parts) => parts,
        Err(Fail(errno, msg)) => error_reply(&c, &req, errno, &msg),
    };
    c.reply(parts, held);
}

fn header(c: &Conn, req: &Request, flags: u16, ty: u16, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + 8);
    chunk_header(&mut v, c.mode, flags, ty, req.cookie, req.offset, len);
    v
}

fn error_reply(c: &Conn, req: &Request, errno: u32, msg: &str) -> Vec<SendPart> {
    if c.mode == ReplyMode::Simple {
        return vec![SendPart::Bytes(simple_reply(req.cookie, errno))];
    }
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    let mut v = header(c, req, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u64);
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    vec![SendPart::Bytes(v)]
}

/// The reply to a request that succeeded and carries no data.
fn ok_reply(c: &Conn, req: &Request) -> Vec<SendPart> {
    if c.mode == ReplyMode::Simple {
        vec![SendPart::Bytes(simple_reply(req.cookie, 0))]
    } else {
        vec![SendPart::Bytes(header(c, req, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0))]
    }
}

/// Flags each command accepts.
fn allowed_flags(c: &Conn, ty: u16) -> u16 {
    let base = CMD_FLAG_FUA | if c.mode == ReplyMode::Extended { CMD_FLAG_PAYLOAD_LEN } else { 0 };
    match ty {
        CMD_READ => base | if c.mode != ReplyMode::Simple { CMD_FLAG_DF } else { 0 },
        CMD_WRITE_ZEROES => base | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => base | CMD_FLAG_REQ_ONE,
        _ => base,
    }
}

async fn run(c: &Conn, req: &Request, payload: Option<Payload>) -> Result<Vec<SendPart>, Fail> {
    let e = &*c.export;
    if req.flags & !allowed_flags(c, req.ty) != 0 {
        return Err(fail(EINVAL, format!("unsupported flags {:#x} for command {}", req.flags, req.ty)));
    }
    if req.ty != CMD_WRITE && payload.is_some() {
        return Err(fail(EINVAL, "unexpected payload"));
    }
    let writes = matches!(req.ty, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writes && e.read_only {
        return Err(fail(EPERM, "export is read-only"));
    }
    let in_range = req.offset.checked_add(req.len).is_some_and(|end| end <= e.size);
    if !in_range && req.ty != CMD_FLUSH {
        let errno = if matches!(req.ty, CMD_WRITE | CMD_WRITE_ZEROES) { ENOSPC } else { EINVAL };
        return Err(fail(
            errno,
            format!("request at {} of {} bytes is beyond the export's end ({})", req.offset, req.len, e.size),
        ));
    }
    let (align, _, _) = e.block_sizes(c.server.max_request);
    if align > 1
        && matches!(req.ty, CMD_READ | CMD_WRITE)
        && (!req.offset.is_multiple_of(u64::from(align)) || !req.len.is_multiple_of(u64::from(align)))
    {
        return Err(fail(EINVAL, format!("request is not aligned to {align} bytes")));
    }
    let node: &dyn BlockNode = &*e.node;
    let off = req.offset + e.offset;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.ty {
        CMD_READ => read(c, req).await,
        CMD_WRITE => {
            let (buf, range) = match payload.expect("WRITE has a payload") {
                Payload::Buf(buf, range) => (buf, range),
                Payload::Pipe { head, pipe, len, fd, host } => {
                    if let Some(h) = head {
                        let n = h.len();
                        let (r, h) = node.write_part(off, h, 0..n, WriteFlags { fua: false }).await;
                        c.recycle(h);
                        r?;
                    }
                    pipe.to_file(fd, host, len).await.map_err(|err| fail(EIO, format!("writing: {err}")))?;
                    c.pipes.borrow_mut().push(pipe);
                    if fua {
                        node.flush().await?;
                    }
                    return Ok(ok_reply(c, req));
                }
            };
            if req.len == 0 {
                return Ok(ok_reply(c, req));
            }
            if e.detect_zeroes != DetectZeroes::Off && buf[range.clone()].iter().all(|&b| b == 0) {
                let may_unmap = e.detect_zeroes == DetectZeroes::Unmap && e.discard;
                node.write_zeroes(off, req.len, ZeroFlags { may_unmap, no_fallback: false, fua }).await?;
                c.recycle(buf);
                return Ok(ok_reply(c, req));
            }
            let (r, buf) = node.write_part(off, buf, range, WriteFlags { fua }).await;
            c.recycle(buf);
            r?;
            Ok(ok_reply(c, req))
        }
        CMD_FLUSH => {
            node.flush().await?;
            Ok(ok_reply(c, req))
        }
        CMD_TRIM => {
            if e.discard && req.len > 0 {
                node.discard(off, req.len).await?;
                if fua {
                    node.flush().await?;
                }
            }
            Ok(ok_reply(c, req))
        }
        CMD_WRITE_ZEROES => {
            if req.len > 0 {
                let flags = ZeroFlags {
                    may_unmap: e.discard && req.flags & CMD_FLAG_NO_HOLE == 0,
                    no_fallback: req.flags & CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                match node.write_zeroes(off, req.len, flags).await {
                    Err(err) if flags.no_fallback && err.kind() == ErrorKind::Unsupported => {
                        return Err(fail(ENOTSUP, "zeroing this range would not be fast"))
                    }
                    r => r?,
                }
            }
            Ok(ok_reply(c, req))
        }
        CMD_CACHE => {
            // Prefetch: read the range into the host cache and drop it.
            const STEP: u64 = 4 << 20;
            let mut done = 0;
            let mut buf = IoBuf::heap(STEP.min(req.len.max(1)) as usize);
            while done < req.len {
                let n = (req.len - done).min(STEP) as usize;
                buf.set_len(n);
                let (r, b) = node.read(off + done, buf).await;
                r?;
                buf = b;
                done += n as u64;
            }
            Ok(ok_reply(c, req))
        }
        CMD_BLOCK_STATUS => block_status(c, req).await,
        _ => Err(fail(EINVAL, format!("unknown command {}", req.ty))),
    }
}

async fn read(c: &Conn, req: &Request) -> Result<Vec<SendPart>, Fail> {
    let e = &*c.export;
    if req.len > u64::from(c.server.max_request) {
        return Err(fail(EINVAL, format!("read of {} bytes exceeds the maximum of {}", req.len, c.server.max_request)));
    }
    let len = req.len as usize;
    if len == 0 {
        return Ok(ok_reply(c, req));
    }
    let off = req.offset + e.offset;
    let sparse = c.mode != ReplyMode::Simple && req.flags & CMD_FLAG_DF == 0 && req.len >= SPARSE_READ_MIN;
    if sparse {
        if let Some(parts) = sparse_read(c, req, off).await? {
            return Ok(parts);
        }
    }
    // Data in the page cache goes by splice: its pages are handed to the
    // socket by reference, copied nowhere, not even by the kernel into a
    // buffer of ours. Staged now, on this thread, behind the replies staged
    // before it; the writer sends them all with one splice.
    if let (Wire::Plain(sock), true) = (&c.wire, len <= STAGE_MAX) {
        if let Some((fd, host)) = e.node.cached_extent(off, len as u64) {
            match sock.stage_file(&data_header(c, req), fd, host, len) {
                Ok(Some(part)) => {
                    Stats::add(&c.server.stats.served_bytes, len as u64);
                    Stats::add(&c.server.stats.spliced_bytes, len as u64);
                    return Ok(vec![part]);
                }
                Ok(None) => {}
                Err(err) => {
                    // A partial reply is in the stage: the stream is broken.
                    c.server.log(format!("staging a read reply: {err}; dropping the connection"));
                    c.dead.set(true);
                    sock.shutdown();
                    return Err(fail(EIO, err.to_string()));
                }
            }
        }
    }
    // Large reads of a file that maps linearly (raw) go by splice from an
    // io_uring worker when the data may have to come from the disk.
    if len as u64 >= SPLICE_MIN && matches!(c.wire, Wire::Plain(_)) {
        if let Some((fd, base)) = e.node.passthrough_fd() {
            Stats::add(&c.server.stats.served_bytes, len as u64);
            Stats::add(&c.server.stats.spliced_bytes, len as u64);
            return Ok(vec![SendPart::Bytes(data_header(c, req)), SendPart::File { fd, offset: base + off, len }]);
        }
    }
    let (r, buf) = e.node.read(off, c.buffer(len)).await;
    if let Err(err) = r {
        c.recycle(buf);
        return Err(err.into());
    }
    Stats::add(&c.server.stats.served_bytes, len as u64);
    let hdr = data_header(c, req);
    Ok(vec![SendPart::Bytes(hdr), SendPart::Buf(buf, 0..len)])
}

/// The header in front of a read's data: a simple reply, or one
/// OFFSET_DATA chunk carrying the whole range.
fn data_header(c: &Conn, req: &Request) -> Vec<u8> {
    if c.mode == ReplyMode::Simple {
        simple_reply(req.cookie, 0)
    } else {
        let mut h = header(c, req, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + req.len);
        h.extend_from_slice(&req.offset.to_be_bytes());
        h
    }
}

/// A read split into data and hole chunks; None when the range is all data
/// (the caller sends it as one chunk).
async fn sparse_read(c: &Conn, req: &Request, off: u64) -> Result<Option<Vec<SendPart>>, Fail> {
    let node = &c.export.node;
    let mut segs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0;
    while pos < req.len {
        let (ext, _, _) = chain_status(node, off + pos, req.len - pos).await?;
        let l = ext.len.min(req.len - pos).max(1);
        let hole = ext.zero;
        match segs.last_mut() {
            Some(last) if last.2 == hole => last.1 += l,
            _ => segs.push((pos, l, hole)),
        }
        pos += l;
        if segs.len() > 64 {
            // Fragmented: not worth it, send it whole.
            return Ok(None);
        }
    }
    if segs.iter().all(|s| !s.2) {
        return Ok(None);
    }
    let mut buf = c.buffer(req.len as usize);
    for &(p, l, hole) in &segs {
        if !hole {
            let (r, b) = node.read_part(off + p, buf, p as usize..(p + l) as usize).await;
            buf = b;
            if let Err(err) = r {
                // Say where it failed: ERROR_OFFSET names the first bad byte.
                let f = Fail::from(err);
                let msg = &f.1.as_bytes()[..f.1.len().min(MAX_STRING)];
                let mut v = header(c, req, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, 6 + msg.len() as u64 + 8);
                v.extend_from_slice(&f.0.to_be_bytes());
                v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                v.extend_from_slice(msg);
                v.extend_from_slice(&(req.offset + p).to_be_bytes());
                return Ok(Some(vec![SendPart::Bytes(v)]));
            }
        }
    }
    let buf = Rc::new(buf);
    let mut parts = Vec::with_capacity(segs.len() * 2);
    let last = segs.len() - 1;
    for (i, &(p, l, hole)) in segs.iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        if hole {
            let mut h = header(c, req, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            h.extend_from_slice(&(req.offset + p).to_be_bytes());
            h.extend_from_slice(&(l as u32).to_be_bytes());
            parts.push(SendPart::Bytes(h));
        } else {
            let mut h = header(c, req, flags, REPLY_TYPE_OFFSET_DATA, 8 + l);
            h.extend_from_slice(&(req.offset + p).to_be_bytes());
            parts.push(SendPart::Bytes(h));
            parts.push(SendPart::Shared(buf.clone(), p as usize..(p + l) as usize));
            Stats::add(&c.server.stats.served_bytes, l);
        }
    }
    Ok(Some(parts))
}

async fn block_status(c: &Conn, req: &Request) -> Result<Vec<SendPart>, Fail> {
    if c.contexts.is_empty() {
        return Err(fail(EINVAL, "no metadata context was negotiated"));
    }
    if req.len == 0 {
        return Err(fail(EINVAL, "block status of zero bytes"));
    }
    let e = &*c.export;
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let ext = c.mode == ReplyMode::Extended;
    // Compact descriptors hold 32-bit lengths.
    let max_desc = if ext { u64::MAX } else { u64::from(u32::MAX) & !0xfff };
    let mut parts = Vec::with_capacity(c.contexts.len());
    for (i, &(id, ctx)) in c.contexts.iter().enumerate() {
        let mut descs: Vec<(u64, u32)> = Vec::new();
        let mut pos = req.offset;
        let end = req.offset + req.len;
        while pos < end && descs.len() < if one { 1 } else { MAX_EXTENTS } {
            let (x, depth, _) = chain_status(&e.node, pos + e.offset, end - pos).await?;
            let l = x.len.min(end - pos).max(1);
            let flags = match ctx {
                MetaContext::BaseAllocation => {
                    (if x.data { 0 } else { STATE_HOLE }) | if x.zero { STATE_ZERO } else { 0 }
                }
                MetaContext::AllocationDepth => {
                    if x.allocated {
                        depth + 1
                    } else {
                        0
                    }
                }
            };
            match descs.last_mut() {
                Some(d) if d.1 == flags && d.0 + l <= max_desc => d.0 += l,
                _ => descs.push((l.min(max_desc), flags)),
            }
            pos += l;
        }
        let done = if i == c.contexts.len() - 1 { REPLY_FLAG_DONE } else { 0 };
        let mut v;
        if ext {
            v = header(c, req, done, REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * descs.len() as u64);
            v.extend_from_slice(&id.to_be_bytes());
            v.extend_from_slice(&(descs.len() as u32).to_be_bytes());
            for (l, f) in descs {
                v.extend_from_slice(&l.to_be_bytes());
                v.extend_from_slice(&u64::from(f).to_be_bytes());
            }
        } else {
            v = header(c, req, done, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * descs.len() as u64);
            v.extend_from_slice(&id.to_be_bytes());
            for (l, f) in descs {
                v.extend_from_slice(&(l as u32).to_be_bytes());
                v.extend_from_slice(&f.to_be_bytes());
            }
        }
        parts.push(SendPart::Bytes(v));
    }
    Ok(parts)
}
