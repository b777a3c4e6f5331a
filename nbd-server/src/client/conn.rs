//! One client connection in transmission, on one shard: requests are sent
//! as they come (header and payload in one vectored send), a reader task
//! matches replies to requests by cookie and receives read data straight into
//! the caller's buffer. Structured and extended replies (data, holes, block
//! status, errors) are decoded here; what a request means is `driver.rs`'s.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};

use engine::net::SendPart;
use engine::runtime::IoBuf;

use super::handshake::ExportInfo;
use crate::proto::*;
use crate::wire::Wire;

/// Largest non-data reply payload accepted (block status, error messages).
const MAX_META_REPLY: u64 = 8 << 20;

/// What a finished request brings back.
#[derive(Default)]
pub struct Reply {
    /// The server's error, as a wire errno, and its message.
    pub error: Option<(u32, String)>,
    /// Block status descriptors per context id: (length, flags).
    pub extents: Vec<(u32, Vec<(u64, u64)>)>,
}

struct Waiting {
    offset: u64,
    len: u64,
    /// Destination of a read.
    buf: Option<IoBuf>,
    reply: Reply,
    done: bool,
    waker: Option<Waker>,
}

pub struct ClientConn {
    wire: Wire<rustls::ClientConnection>,
    pub info: ExportInfo,
    next: Cell<u64>,
    waiting: RefCell<HashMap<u64, Waiting>>,
    dead: RefCell<Option<String>>,
    send_busy: Cell<bool>,
    send_queue: RefCell<VecDeque<Waker>>,
}

fn gone(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("NBD connection lost: {msg}"))
}

impl ClientConn {
    /// Take over a negotiated socket (and its TLS session, if any) and start
    /// its reply reader on this shard.
    pub fn start(fd: std::os::fd::OwnedFd, tls: Option<rustls::ClientConnection>, info: ExportInfo) -> Rc<ClientConn> {
        let c = Rc::new(ClientConn {
            wire: Wire::new(fd, tls),
            info,
            next: Cell::new(1),
            waiting: RefCell::new(HashMap::new()),
            dead: RefCell::new(None),
            send_busy: Cell::new(false),
            send_queue: RefCell::new(VecDeque::new()),
        });
        let c2 = c.clone();
        engine::runtime::spawn_daemon(async move {
            let r = reader(&c2).await;
            c2.kill(match r {
                Ok(()) => "server closed the connection".into(),
                Err(e) => e.to_string(),
            });
        });
        c
    }

    pub fn is_dead(&self) -> bool {
        self.dead.borrow().is_some()
    }

    pub(crate) fn kill(&self, why: String) {
        if self.dead.borrow().is_none() {
            *self.dead.borrow_mut() = Some(why);
        }
        self.wire.socket().shutdown();
        for w in self.waiting.borrow_mut().values_mut() {
            w.done = true;
            if let Some(k) = w.waker.take() {
                k.wake();
            }
        }
    }

    fn extended(&self) -> bool {
        self.info.mode == ReplyMode::Extended
    }

    /// Send one request (with its payload) and wait for its whole reply.
    /// `read_buf` receives a read's data; it comes back with the reply.
    pub async fn request(
        &self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<IoBuf>,
        read_buf: Option<IoBuf>,
    ) -> (io::Result<Reply>, Option<IoBuf>) {
        if let Some(why) = &*self.dead.borrow() {
            return (Err(gone(why)), payload.or(read_buf));
        }
        let cookie = self.next.get();
        self.next.set(cookie + 1);
        self.waiting
            .borrow_mut()
            .insert(cookie, Waiting { offset, len, buf: read_buf, reply: Reply::default(), done: false, waker: None });
        let req = Request { flags, ty, cookie, offset, len };
        let mut parts = vec![SendPart::Bytes(req.encode(self.extended()))];
        if let Some(p) = payload {
            let n = p.len();
            parts.push(SendPart::Buf(p, 0..n));
        }
        // One sender at a time: requests must not interleave on the wire.
        poll_fn(|cx| {
            if !self.send_busy.get() {
                self.send_busy.set(true);
                Poll::Ready(())
            } else {
                self.send_queue.borrow_mut().push_back(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let (r, mut parts) = self.wire.send(parts).await;
        self.send_busy.set(false);
        if let Some(w) = self.send_queue.borrow_mut().pop_front() {
            w.wake();
        }
        let payload = match parts.pop() {
            Some(SendPart::Buf(b, _)) => Some(b),
            _ => None,
        };
        if let Err(e) = r {
            self.kill(e.to_string());
            let w = self.waiting.borrow_mut().remove(&cookie);
            return (Err(e), payload.or(w.and_then(|w| w.buf)));
        }
        poll_fn(|cx| {
            let mut map = self.waiting.borrow_mut();
            match map.get_mut(&cookie) {
                Some(w) if !w.done => {
                    w.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                _ => Poll::Ready(()),
            }
        })
        .await;
        let w = self.waiting.borrow_mut().remove(&cookie);
        let Some(w) = w else {
            return (Err(gone("request lost")), payload);
        };
        let buf = payload.or(w.buf);
        if w.reply.error.is_none() {
            if let Some(why) = &*self.dead.borrow() {
                return (Err(gone(why)), buf);
            }
        }
        (Ok(w.reply), buf)
    }

    /// Tell the server we are leaving (NBD_CMD_DISC has no reply).
    pub async fn disconnect(&self) {
        if self.is_dead() {
            return;
        }
        let req = Request { flags: 0, ty: CMD_DISC, cookie: 0, offset: 0, len: 0 };
        let _ = self.wire.send(vec![SendPart::Bytes(req.encode(self.extended()))]).await;
        self.wire.close().await;
        self.kill("disconnected".into());
    }

    fn finish(&self, cookie: u64, done: bool) {
        if done {
            if let Some(w) = self.waiting.borrow_mut().get_mut(&cookie) {
                w.done = true;
                if let Some(k) = w.waker.take() {
                    k.wake();
                }
            }
        }
    }
}

async fn recv_vec(c: &ClientConn, hdr: IoBuf, n: usize) -> io::Result<(Vec<u8>, IoBuf)> {
    let mut b = IoBuf::heap(n.max(1));
    b.set_len(n);
    let (r, b) = c.wire.recv_exact(b, 0..n).await;
    r?;
    Ok((b.to_vec(), hdr))
}

/// Receive replies until the connection ends.
async fn reader(c: &ClientConn) -> io::Result<()> {
    let mut hdr = IoBuf::heap(32);
    loop {
        let (r, h) = c.wire.recv(hdr, 0..4).await;
        hdr = h;
        match r? {
            0 => return Ok(()),
            n if n < 4 => {
                let (r, h) = c.wire.recv_exact(hdr, n..4).await;
                hdr = h;
                r?;
            }
            _ => {}
        }
        let magic = be32(&hdr[0..4]);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let (r, h) = c.wire.recv_exact(hdr, 4..16).await;
                hdr = h;
                r?;
                let error = be32(&hdr[4..8]);
                let cookie = be64(&hdr[8..16]);
                let (has_buf, len) = match c.waiting.borrow().get(&cookie) {
                    Some(w) => (w.buf.is_some(), w.len),
                    None => return Err(proto_err_io(format!("reply for unknown cookie {cookie}"))),
                };
                if error == 0 && has_buf {
                    let buf = c.waiting.borrow_mut().get_mut(&cookie).and_then(|w| w.buf.take());
                    if let Some(buf) = buf {
                        let (r, buf) = c.wire.recv_exact(buf, 0..len as usize).await;
                        if let Some(w) = c.waiting.borrow_mut().get_mut(&cookie) {
                            w.buf = Some(buf);
                        }
                        r?;
                    }
                } else if error != 0 {
                    if let Some(w) = c.waiting.borrow_mut().get_mut(&cookie) {
                        w.reply.error = Some((error, String::new()));
                    }
                }
                c.finish(cookie, true);
            }
            STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                let ext = magic == EXTENDED_REPLY_MAGIC;
                if ext != c.extended() {
                    return Err(proto_err_io("reply header form does not match what was negotiated".into()));
                }
                let total = if ext { 32 } else { 20 };
                let (r, h) = c.wire.recv_exact(hdr, 4..total).await;
                hdr = h;
                r?;
                let flags = be16(&hdr[4..6]);
                let ty = be16(&hdr[6..8]);
                let cookie = be64(&hdr[8..16]);
                let plen = if ext { be64(&hdr[24..32]) } else { u64::from(be32(&hdr[16..20])) };
                let (req_off, req_len) = match c.waiting.borrow().get(&cookie) {
                    Some(w) => (w.offset, w.len),
                    None => return Err(proto_err_io(format!("reply for unknown cookie {cookie}"))),
                };
                hdr = chunk(c, hdr, cookie, ty, plen, req_off, req_len).await?;
                c.finish(cookie, flags & REPLY_FLAG_DONE != 0);
            }
            m => return Err(proto_err_io(format!("bad reply magic {m:#x}"))),
        }
    }
}

fn proto_err_io(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One structured chunk's payload.
async fn chunk(
    c: &ClientConn,
    hdr: IoBuf,
    cookie: u64,
    ty: u16,
    plen: u64,
    req_off: u64,
    req_len: u64,
) -> io::Result<IoBuf> {
    let in_req = |off: u64, len: u64| off >= req_off && off.checked_add(len).is_some_and(|e| e <= req_off + req_len);
    match ty {
        REPLY_TYPE_NONE => {
            if plen != 0 {
                return Err(proto_err_io("NONE chunk with a payload".into()));
            }
            Ok(hdr)
        }
        REPLY_TYPE_OFFSET_DATA => {
            if plen < 8 {
                return Err(proto_err_io("short OFFSET_DATA chunk".into()));
            }
            let (v, hdr) = recv_vec(c, hdr, 8).await?;
            let off = be64(&v);
            let dlen = plen - 8;
            if !in_req(off, dlen) {
                return Err(proto_err_io(format!("data chunk at {off}+{dlen} outside the request")));
            }
            let buf = c.waiting.borrow_mut().get_mut(&cookie).and_then(|w| w.buf.take());
            let Some(buf) = buf else {
                return Err(proto_err_io("data chunk for a request that reads nothing".into()));
            };
            let at = (off - req_off) as usize;
            let (r, buf) = c.wire.recv_exact(buf, at..at + dlen as usize).await;
            if let Some(w) = c.waiting.borrow_mut().get_mut(&cookie) {
                w.buf = Some(buf);
            }
            r?;
            Ok(hdr)
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if plen != 12 {
                return Err(proto_err_io("bad OFFSET_HOLE chunk".into()));
            }
            let (v, hdr) = recv_vec(c, hdr, 12).await?;
            let off = be64(&v[0..8]);
            let hlen = u64::from(be32(&v[8..12]));
            if !in_req(off, hlen) {
                return Err(proto_err_io(format!("hole chunk at {off}+{hlen} outside the request")));
            }
            if let Some(b) = c.waiting.borrow_mut().get_mut(&cookie).and_then(|w| w.buf.as_mut()) {
                let at = (off - req_off) as usize;
                b[at..at + hlen as usize].fill(0);
            }
            Ok(hdr)
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
            let ext = ty == REPLY_TYPE_BLOCK_STATUS_EXT;
            if plen > MAX_META_REPLY || plen < if ext { 8 } else { 4 } {
                return Err(proto_err_io(format!("block status chunk of {plen} bytes")));
            }
            let (v, hdr) = recv_vec(c, hdr, plen as usize).await?;
            let id = be32(&v[0..4]);
            let mut ex = Vec::new();
            if ext {
                for d in v[8..].chunks_exact(16) {
                    ex.push((be64(&d[0..8]), be64(&d[8..16])));
                }
            } else {
                for d in v[4..].chunks_exact(8) {
                    ex.push((u64::from(be32(&d[0..4])), u64::from(be32(&d[4..8]))));
                }
            }
            if let Some(w) = c.waiting.borrow_mut().get_mut(&cookie) {
                w.reply.extents.push((id, ex));
            }
            Ok(hdr)
        }
        t if t & (1 << 15) != 0 => {
            if !(6..=MAX_META_REPLY).contains(&plen) {
                return Err(proto_err_io(format!("error chunk of {plen} bytes")));
            }
            let (v, hdr) = recv_vec(c, hdr, plen as usize).await?;
            let errno = be32(&v[0..4]);
            let mlen = (be16(&v[4..6]) as usize).min(v.len() - 6);
            let msg = String::from_utf8_lossy(&v[6..6 + mlen]).into_owned();
            if let Some(w) = c.waiting.borrow_mut().get_mut(&cookie) {
                w.reply.error = Some((if errno == 0 { EIO } else { errno }, msg));
            }
            Ok(hdr)
        }
        _ => {
            // An unknown informational chunk: skip it.
            if plen > MAX_META_REPLY {
                return Err(proto_err_io(format!("unknown chunk of {plen} bytes")));
            }
            let (_, hdr) = recv_vec(c, hdr, plen as usize).await?;
            Ok(hdr)
        }
    }
}
