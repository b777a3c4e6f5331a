//! The transmission phase of one connection, on one shard: a reader that
//! parses requests (many per receive) and starts each as its own task (the
//! commands themselves are in `cmd.rs`), and a writer that sends every
//! queued reply in one vectored send. Payloads go from the wire into the
//! buffer the block layer writes, or by splice into the file; read data goes
//! from the page cache by splice or from the buffer a read filled onto the
//! wire. Negotiation is not here (`handshake.rs`).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::ops::Range;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

use engine::net::{Pipe, SendPart, Socket, MAX_IOV};
use engine::runtime::IoBuf;

use super::cmd::{check, handle, read_now, write_now};
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
/// Writes of this size and up to SPLICE_WRITE_MAX go from the socket to the
/// file by splice (`splice_write`), through pipes of WRITE_PIPE_SIZE bytes.
const SPLICE_WRITE_MIN: u64 = 64 << 10;
const SPLICE_WRITE_MAX: u64 = 256 << 10;
const WRITE_PIPE_SIZE: usize = 1 << 20;
/// Most pipes one connection makes for write payloads (a pipe lost to an
/// error is not replaced).
const MAX_WRITE_PIPES: usize = 8;
/// Bytes of large buffers kept for reuse per connection: a fresh heap
/// buffer costs a page fault per page (nbdcopy's 256 KiB reads spent a
/// quarter of the server's time faulting in buffers with a cache of 16).
const BUF_CACHE_BYTES: usize = 32 << 20;

pub(super) type Wire = crate::wire::Wire<rustls::ServerConnection>;

pub(super) struct Conn {
    pub(super) wire: Wire,
    pub(super) server: Arc<Server>,
    pub(super) export: Arc<Export>,
    pub(super) mode: ReplyMode,
    pub(super) contexts: Vec<(u32, MetaContext)>,
    /// Reply parts waiting for the writer.
    pub(super) out: RefCell<Vec<SendPart>>,
    /// Requests and bytes the writer releases once `out` has been sent.
    pub(super) out_done: Cell<(usize, usize)>,
    pub(super) inflight: Cell<usize>,
    pub(super) held: Cell<usize>,
    pub(super) writer_wait: RefCell<Option<Waker>>,
    pub(super) reader_wait: RefCell<Option<Waker>>,
    /// No more requests will be read (DISC, EOF, a protocol violation).
    pub(super) closing: Cell<bool>,
    /// The peer is gone: replies are dropped.
    pub(super) dead: Cell<bool>,
    pub(super) bufs: RefCell<Vec<IoBuf>>,
    /// Bytes `bufs` holds.
    pub(super) bufs_held: Cell<usize>,
    /// Empty pipes for spliced write payloads, and how many were made.
    pub(super) pipes: RefCell<Vec<Pipe>>,
    pub(super) pipes_made: Cell<usize>,
}

/// Counts a connection in `Server::serving` while it lives.
struct Counted(Arc<Server>);

impl Counted {
    fn new(server: &Arc<Server>) -> Counted {
        server.serving.fetch_add(1, Ordering::Relaxed);
        Counted(server.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::Relaxed);
    }
}

fn wake(w: &RefCell<Option<Waker>>) {
    if let Some(w) = w.borrow_mut().take() {
        w.wake();
    }
}

/// Serve a negotiated connection until it ends. Runs on a shard.
pub async fn serve(server: Arc<Server>, n: Negotiated) {
    let Negotiated { fd, tls, export, mode, contexts } = n;
    let _counted = Counted::new(&server);
    let wire = Wire::new(fd, tls);
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
        bufs_held: Cell::new(0),
        pipes: RefCell::new(Vec::new()),
        pipes_made: Cell::new(0),
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
    c.wire.close().await;
}

impl Conn {
    pub(super) fn socket(&self) -> &Socket {
        self.wire.socket()
    }

    pub(super) async fn recv(&self, buf: IoBuf, range: Range<usize>) -> (io::Result<usize>, IoBuf) {
        self.wire.recv(buf, range).await
    }

    async fn recv_exact(&self, buf: IoBuf, range: Range<usize>) -> (io::Result<()>, IoBuf) {
        self.wire.recv_exact(buf, range).await
    }

    /// Send parts (all of them, in order), counting what TLS copies.
    pub(super) async fn send(&self, parts: Vec<SendPart>) -> (io::Result<()>, Vec<SendPart>) {
        if self.wire.is_tls() {
            for p in &parts {
                if let SendPart::Buf(..) | SendPart::Shared(..) = p {
                    Stats::add(&self.server.stats.read_copied_bytes, p.len() as u64);
                }
            }
        }
        self.wire.send(parts).await
    }

    /// A buffer for `len` bytes of payload: the shard's registered pool for
    /// small ones, else a recycled large buffer.
    pub(super) fn buffer(&self, len: usize) -> IoBuf {
        if len <= 64 << 10 {
            return IoBuf::new(len);
        }
        let mut cache = self.bufs.borrow_mut();
        if let Some(i) = cache.iter().position(|b| b.capacity() >= len) {
            let mut b = cache.swap_remove(i);
            self.bufs_held.set(self.bufs_held.get() - b.capacity());
            b.set_len(len);
            return b;
        }
        IoBuf::heap(len)
    }

    pub(super) fn recycle(&self, b: IoBuf) {
        let held = self.bufs_held.get();
        if b.capacity() > 64 << 10 && held + b.capacity() <= BUF_CACHE_BYTES {
            self.bufs_held.set(held + b.capacity());
            self.bufs.borrow_mut().push(b);
        }
    }

    /// Queue a request's reply parts and account for the request's end.
    pub(super) fn reply(&self, parts: Vec<SendPart>, held: usize) {
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
            if have == len {
                if let Some(parts) = write_now(c, &req, &stage[start..start + len]) {
                    start += len;
                    Stats::add(&c.server.stats.received_bytes, len as u64);
                    c.inflight.set(c.inflight.get() + 1);
                    c.reply(parts, 0);
                    continue;
                }
            }
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
        if payload.is_none() {
            if let Some(parts) = read_now(c, &req) {
                c.inflight.set(c.inflight.get() + 1);
                c.reply(parts, 0);
                continue;
            }
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
    let usable = matches!(c.wire, Wire::Plain(_))
        && req.ty == CMD_WRITE
        && (SPLICE_WRITE_MIN..=SPLICE_WRITE_MAX).contains(&req.len)
        && len - have.len() >= SPLICE_WRITE_MIN as usize / 2
        && e.detect_zeroes == DetectZeroes::Off;
    // A request that will fail its checks (permission, range, alignment,
    // flags) keeps its payload in memory: a pipe lost to it would not be
    // replaced.
    if !usable || check(c, req, true).is_err() {
        return Ok(None);
    }
    if !e.node.pipe_writable(req.offset + e.offset, req.len) {
        return Ok(None);
    }
    let pooled = c.pipes.borrow_mut().pop();
    let pipe = match pooled {
        Some(p) => p,
        // Each pipe is two file descriptors: a few per connection, no more.
        None if c.pipes_made.get() >= MAX_WRITE_PIPES => return Ok(None),
        None => match Pipe::new(WRITE_PIPE_SIZE) {
            Ok(p) => {
                c.pipes_made.set(c.pipes_made.get() + 1);
                p
            }
            Err(_) => return Ok(None),
        },
    };
    let tail = len - have.len();
    let moved = c.socket().splice_in(&pipe, tail).await?;
    if moved == tail {
        let head = (!have.is_empty()).then(|| {
            let mut b = c.buffer(have.len());
            b[..have.len()].copy_from_slice(have);
            b
        });
        Stats::add(&c.server.stats.write_copied_bytes, have.len() as u64);
        Stats::add(&c.server.stats.spliced_in_bytes, tail as u64);
        return Ok(Some(Payload::Pipe { head, pipe, len: tail }));
    }
    let mut buf = c.buffer(len);
    buf[..have.len()].copy_from_slice(have);
    let got = pipe.drain(&mut buf[have.len()..have.len() + moved])?;
    if got != moved {
        return Err(io::Error::other(format!("pipe gave back {got} of {moved} payload bytes")));
    }
    Stats::add(&c.server.stats.write_copied_bytes, (have.len() + moved) as u64);
    let (r, b) = c.recv_exact(buf, have.len() + moved..len).await;
    r?;
    c.pipes.borrow_mut().push(pipe);
    Ok(Some(Payload::Buf(b, 0..len)))
}

/// A request's payload: in memory, or in a pipe on its way to a file.
pub(super) enum Payload {
    Buf(IoBuf, Range<usize>),
    /// The payload's start (`head`, received with the header, if any), then
    /// `len` bytes spliced from the socket into `pipe`.
    Pipe {
        head: Option<IoBuf>,
        pipe: Pipe,
        len: usize,
    },
}
