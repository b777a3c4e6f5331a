//! Server side of fixed newstyle negotiation: the greeting, every option a
//! client may send (in any order, any number of times), STARTTLS, and the
//! choice of reply mode and meta contexts that transmission then uses. Runs
//! blocking, on the connection's own thread, bounded by the handshake limit.
//! It does not serve requests (`conn.rs` does).

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use super::{Export, Server};
use crate::proto::*;
use crate::stream::{discard, FdStream, HsStream};

/// Options larger than this are read and dropped with NBD_REP_ERR_TOO_BIG;
/// it bounds the memory a client can make a handshake hold.
const MAX_OPTION: u32 = 64 << 10;

/// Shuts a socket down when a negotiation outlives its limit; dropping it
/// (negotiation over) stands it down.
struct Watchdog {
    state: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl Watchdog {
    fn start(fd: &OwnedFd, limit: std::time::Duration) -> io::Result<Watchdog> {
        let dup = fd.try_clone()?;
        let state = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let st = state.clone();
        std::thread::Builder::new().name("nbd-handshake-limit".into()).spawn(move || {
            let (lock, cv) = &*st;
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let (done, _) = cv.wait_timeout_while(guard, limit, |done| !*done).unwrap_or_else(|e| e.into_inner());
            if !*done {
                // Decided under the lock: negotiation cannot finish meanwhile.
                // SAFETY: shutdown on a dup of the socket that we own.
                unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&dup), libc::SHUT_RDWR) };
            }
        })?;
        Ok(Watchdog { state })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// A meta context the client selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaContext {
    BaseAllocation,
    AllocationDepth,
}

impl MetaContext {
    fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => CTX_BASE_ALLOCATION,
            MetaContext::AllocationDepth => CTX_ALLOCATION_DEPTH,
        }
    }
    fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
        }
    }
}

/// What a successful negotiation hands to transmission.
pub struct Negotiated {
    pub fd: OwnedFd,
    pub tls: Option<rustls::ServerConnection>,
    pub export: Arc<Export>,
    pub mode: ReplyMode,
    /// Selected contexts with their ids.
    pub contexts: Vec<(u32, MetaContext)>,
}

enum Next {
    Continue,
    /// The client is done negotiating and wants this export.
    Transmit,
    /// Close the connection.
    Close,
}

struct Hs<'a> {
    server: &'a Server,
    s: HsStream<rustls::ServerConnection>,
    mode: ReplyMode,
    contexts: Vec<(u32, MetaContext)>,
    no_zeroes: bool,
    deadline: Option<Instant>,
}

/// Negotiate with a new client. `Ok(None)`: it left (ABORT, EOF, or a
/// violation that ends the connection) without starting transmission.
pub fn negotiate(server: &Server, fd: OwnedFd, peer: &str) -> io::Result<Option<Negotiated>> {
    let fs = FdStream(fd);
    fs.set_timeout(server.handshake_limit)?;
    // The limit is on the whole negotiation, not on each read: a client
    // dripping a byte at a time must not hold its slot. At the deadline a
    // watchdog shuts the socket, which ends whatever read or write is on.
    let _watchdog = match server.handshake_limit {
        Some(limit) => Some(Watchdog::start(&fs.0, limit)?),
        None => None,
    };
    let mut hs = Hs {
        server,
        s: HsStream::Plain(fs),
        mode: ReplyMode::Simple,
        contexts: Vec::new(),
        no_zeroes: false,
        deadline: server.handshake_limit.map(|d| Instant::now() + d),
    };
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    hs.s.write_all(&greet)?;
    let mut cf = [0u8; 4];
    hs.s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        server.log(format!("{peer}: unknown client flags {cflags:#x}, closing"));
        return Ok(None);
    }
    hs.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    loop {
        if hs.deadline.is_some_and(|d| Instant::now() > d) {
            server.log(format!("{peer}: handshake took too long, closing"));
            return Ok(None);
        }
        let mut h = [0u8; 16];
        hs.s.read_exact(&mut h)?;
        let magic = be64(&h[0..8]);
        let opt = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if magic != IHAVEOPT {
            server.log(format!("{peer}: bad option magic {magic:#x}, closing"));
            return Ok(None);
        }
        if len > MAX_OPTION {
            discard(&mut hs.s, u64::from(len))?;
            // EXPORT_NAME cannot be answered with an error: it ends the connection.
            if opt == OPT_EXPORT_NAME {
                return Ok(None);
            }
            hs.reply(opt, REP_ERR_TOO_BIG, b"option too large")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        hs.s.read_exact(&mut data)?;
        match hs.option(opt, &data, peer)? {
            Next::Continue => {}
            Next::Close => return Ok(None),
            Next::Transmit => {
                let Hs { s, mode, contexts, .. } = hs;
                if matches!(s, HsStream::Closed) {
                    return Ok(None);
                }
                s.fd()?.set_timeout(None)?;
                let (fd, tls) = s.into_parts()?;
                return Ok(Some(Negotiated { fd, tls, export: server.export.clone(), mode, contexts }));
            }
        }
    }
}

impl Hs<'_> {
    fn reply(&mut self, opt: u32, ty: u32, data: &[u8]) -> io::Result<()> {
        self.s.write_all(&option_reply(opt, ty, data))?;
        self.s.flush()
    }

    fn tls_pending(&self) -> bool {
        self.server.tls.is_some() && matches!(self.s, HsStream::Plain(_))
    }

    fn option(&mut self, opt: u32, data: &[u8], peer: &str) -> io::Result<Next> {
        if self.tls_pending() && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            if opt == OPT_EXPORT_NAME {
                self.server.log(format!("{peer}: EXPORT_NAME without TLS, closing"));
                return Ok(Next::Close);
            }
            self.reply(opt, REP_ERR_TLS_REQD, b"TLS is required")?;
            return Ok(Next::Continue);
        }
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data);
                if name != self.server.export.name {
                    self.server.log(format!("{peer}: unknown export '{name}', closing"));
                    return Ok(Next::Close);
                }
                let e = &self.server.export;
                let mut v = Vec::with_capacity(134);
                v.extend_from_slice(&e.size.to_be_bytes());
                v.extend_from_slice(&e.flags().to_be_bytes());
                if !self.no_zeroes {
                    v.extend_from_slice(&[0u8; 124]);
                }
                self.s.write_all(&v)?;
                self.s.flush()?;
                Ok(Next::Transmit)
            }
            OPT_ABORT => {
                // Best effort: the client may already be gone.
                let _ = self.reply(opt, REP_ACK, &[]);
                Ok(Next::Close)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.reply(opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    return Ok(Next::Continue);
                }
                let e = &self.server.export;
                let mut v = Vec::new();
                v.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                v.extend_from_slice(e.name.as_bytes());
                if let Some(d) = &e.description {
                    v.extend_from_slice(d.as_bytes());
                }
                self.reply(opt, REP_SERVER, &v)?;
                self.reply(opt, REP_ACK, &[])?;
                Ok(Next::Continue)
            }
            OPT_STARTTLS => self.starttls(data, peer),
            OPT_INFO | OPT_GO => self.info(opt, data),
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                let ext = opt == OPT_EXTENDED_HEADERS;
                if !data.is_empty() {
                    self.reply(opt, REP_ERR_INVALID, b"option takes no data")?;
                } else if self.mode == ReplyMode::Extended {
                    // Asked again, or structured replies after extended
                    // headers: extended headers stay in force.
                    self.reply(opt, REP_ERR_INVALID, b"extended headers already negotiated")?;
                } else if !ext && self.mode == ReplyMode::Structured {
                    self.reply(opt, REP_ERR_INVALID, b"structured replies already negotiated")?;
                } else {
                    self.mode = if ext { ReplyMode::Extended } else { ReplyMode::Structured };
                    // Context ids were handed out for the old reply form.
                    self.contexts.clear();
                    self.reply(opt, REP_ACK, &[])?;
                }
                Ok(Next::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(opt, data),
            _ => {
                self.reply(opt, REP_ERR_UNSUP, b"unknown option")?;
                Ok(Next::Continue)
            }
        }
    }

    fn starttls(&mut self, data: &[u8], peer: &str) -> io::Result<Next> {
        let opt = OPT_STARTTLS;
        if !data.is_empty() {
            self.reply(opt, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")?;
            return Ok(Next::Continue);
        }
        let Some(tls) = &self.server.tls else {
            self.reply(opt, REP_ERR_POLICY, b"TLS is not configured")?;
            return Ok(Next::Continue);
        };
        if !self.tls_pending() {
            self.reply(opt, REP_ERR_INVALID, b"TLS already started")?;
            return Ok(Next::Continue);
        }
        self.reply(opt, REP_ACK, &[])?;
        let conn = rustls::ServerConnection::new(tls.config.clone()).map_err(io::Error::other)?;
        let HsStream::Plain(fs) = std::mem::replace(&mut self.s, HsStream::Closed) else {
            unreachable!("tls_pending checked the stream is plain")
        };
        let mut t = rustls::StreamOwned::new(conn, fs);
        while t.conn.is_handshaking() {
            if let Err(e) = t.conn.complete_io(&mut t.sock) {
                self.server.log(format!("{peer}: TLS handshake failed: {e}"));
                return Ok(Next::Close);
            }
        }
        if let Err(why) = tls.authorize(&t.conn) {
            self.server.log(format!("{peer}: {why}, closing"));
            return Ok(Next::Close);
        }
        // A fresh start: nothing negotiated in plain text carries over.
        self.mode = ReplyMode::Simple;
        self.contexts.clear();
        self.s = HsStream::Tls(Box::new(t));
        Ok(Next::Continue)
    }

    fn info(&mut self, opt: u32, data: &[u8]) -> io::Result<Next> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string32()?;
            let n = c.u16()? as usize;
            let mut reqs = Vec::with_capacity(n.min(16));
            for _ in 0..n {
                reqs.push(c.u16()?);
            }
            (c.remaining() == 0).then_some((name, reqs))
        })();
        let Some((name, reqs)) = parsed else {
            self.reply(opt, REP_ERR_INVALID, b"malformed request")?;
            return Ok(Next::Continue);
        };
        let e = self.server.export.clone();
        if name != e.name {
            self.reply(opt, REP_ERR_UNKNOWN, format!("export '{name}' not present").as_bytes())?;
            return Ok(Next::Continue);
        }
        let mut v = Vec::new();
        v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        v.extend_from_slice(&e.size.to_be_bytes());
        v.extend_from_slice(&e.flags().to_be_bytes());
        self.reply(opt, REP_INFO, &v)?;
        if reqs.contains(&INFO_NAME) {
            let mut v = INFO_NAME.to_be_bytes().to_vec();
            v.extend_from_slice(e.name.as_bytes());
            self.reply(opt, REP_INFO, &v)?;
        }
        if let (true, Some(d)) = (reqs.contains(&INFO_DESCRIPTION), &e.description) {
            let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
            v.extend_from_slice(d.as_bytes());
            self.reply(opt, REP_INFO, &v)?;
        }
        let (min, pref, max) = e.block_sizes(self.server.max_request);
        let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for x in [min, pref, max] {
            v.extend_from_slice(&x.to_be_bytes());
        }
        self.reply(opt, REP_INFO, &v)?;
        self.reply(opt, REP_ACK, &[])?;
        Ok(if opt == OPT_GO { Next::Transmit } else { Next::Continue })
    }

    /// What the export offers, in the order we list it.
    fn available(&self) -> Vec<MetaContext> {
        let mut v = vec![MetaContext::BaseAllocation];
        if self.server.export.allocation_depth {
            v.push(MetaContext::AllocationDepth);
        }
        v
    }

    fn meta(&mut self, opt: u32, data: &[u8]) -> io::Result<Next> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && self.mode == ReplyMode::Simple {
            self.reply(opt, REP_ERR_INVALID, b"structured replies have not been negotiated")?;
            return Ok(Next::Continue);
        }
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string32()?;
            let n = c.u32()? as usize;
            // Every query takes at least its 4-byte length: a count beyond
            // that is a lie, refused before anything is allocated for it.
            if n > c.remaining() / 4 {
                return None;
            }
            let mut q = Vec::with_capacity(n);
            for _ in 0..n {
                q.push(c.string32()?);
            }
            (c.remaining() == 0).then_some((name, q))
        })();
        let Some((name, queries)) = parsed else {
            self.reply(opt, REP_ERR_INVALID, b"malformed request")?;
            return Ok(Next::Continue);
        };
        if name != self.server.export.name {
            self.reply(opt, REP_ERR_UNKNOWN, format!("export '{name}' not present").as_bytes())?;
            return Ok(Next::Continue);
        }
        let avail = self.available();
        let mut chosen: Vec<MetaContext> = Vec::new();
        let mut add = |m: MetaContext| {
            if !chosen.contains(&m) {
                chosen.push(m);
            }
        };
        if queries.is_empty() && !set {
            avail.iter().copied().for_each(&mut add);
        }
        for q in &queries {
            for &m in &avail {
                let exact = q == m.name();
                // A bare namespace lists everything in it (LIST only).
                let ns = !set && q.ends_with(':') && m.name().starts_with(q.as_str());
                if exact || ns {
                    add(m);
                }
            }
        }
        if set {
            self.contexts = chosen.iter().map(|&m| (m.id(), m)).collect();
        }
        for m in chosen {
            let mut v = (if set { m.id() } else { 0 }).to_be_bytes().to_vec();
            v.extend_from_slice(m.name().as_bytes());
            self.reply(opt, REP_META_CONTEXT, &v)?;
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok(Next::Continue)
    }
}

/// Shared with the fuzz target and tests: run one negotiation over the
/// bytes `input` (what a client would send), against an export of `node`.
/// Returns what the server wrote back. Never panics on any input.
#[doc(hidden)]
pub fn negotiate_bytes(node: Arc<dyn engine::block::BlockNode>, input: &[u8]) -> Vec<u8> {
    use std::os::unix::net::UnixStream;
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let size = node.size();
    let server = Server {
        export: Arc::new(Export {
            name: String::new(),
            description: Some("fuzz".into()),
            node,
            offset: 0,
            size,
            read_only: false,
            allocation_depth: true,
            multi_conn: true,
            discard: true,
            detect_zeroes: super::DetectZeroes::Off,
            maps: Default::default(),
        }),
        tls: None,
        handshake_limit: Some(std::time::Duration::from_secs(5)),
        max_request: super::DEFAULT_MAX_REQUEST,
        stats: Default::default(),
        shards: 1,
        serving: Default::default(),
        verbose: false,
    };
    let data = input.to_vec();
    let mut client = theirs;
    let reader = std::thread::spawn(move || {
        // Feed the input, then read everything the server says until it closes.
        let _ = client.write_all(&data);
        let _ = client.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out);
        out
    });
    let r = negotiate(&server, ours.into(), "fuzz");
    drop(r);
    reader.join().unwrap_or_default()
}

/// A 1 MiB node that stores nothing: negotiation only asks a node for its
/// size and limits (tests and the fuzz target use it).
#[doc(hidden)]
pub struct BlankNode;
impl engine::block::BlockNode for BlankNode {
    fn driver(&self) -> &'static str {
        "blank"
    }
    fn filename(&self) -> String {
        "blank".into()
    }
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(
        &self,
        _: u64,
        b: engine::runtime::IoBuf,
    ) -> engine::block::BoxFuture<'_, (engine::Result<()>, engine::runtime::IoBuf)> {
        Box::pin(async move { (Ok(()), b) })
    }
    fn write(
        &self,
        _: u64,
        b: engine::runtime::IoBuf,
        _: engine::block::WriteFlags,
    ) -> engine::block::BoxFuture<'_, (engine::Result<()>, engine::runtime::IoBuf)> {
        Box::pin(async move { (Ok(()), b) })
    }
    fn write_zeroes(
        &self,
        _: u64,
        _: u64,
        _: engine::block::ZeroFlags,
    ) -> engine::block::BoxFuture<'_, engine::Result<()>> {
        Box::pin(async move { Ok(()) })
    }
    fn discard(&self, _: u64, _: u64) -> engine::block::BoxFuture<'_, engine::Result<()>> {
        Box::pin(async move { Ok(()) })
    }
    fn flush(&self) -> engine::block::BoxFuture<'_, engine::Result<()>> {
        Box::pin(async move { Ok(()) })
    }
    fn block_status(&self, _: u64, len: u64) -> engine::block::BoxFuture<'_, engine::Result<engine::block::Extent>> {
        Box::pin(async move {
            Ok(engine::block::Extent { len, data: true, zero: false, allocated: true, offset: None, compressed: false })
        })
    }
    fn truncate(
        &self,
        _: u64,
        _: bool,
        _: engine::block::Prealloc,
    ) -> engine::block::BoxFuture<'_, engine::Result<()>> {
        Box::pin(async move { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    /// Option replies in `out` after the 18-byte greeting: (option, type).
    fn replies(out: &[u8]) -> Vec<(u32, u32)> {
        let mut v = Vec::new();
        let mut b = &out[18.min(out.len())..];
        while b.len() >= 20 && be64(&b[..8]) == REPLY_MAGIC_OPT {
            let len = be32(&b[16..20]) as usize;
            v.push((be32(&b[8..12]), be32(&b[12..16])));
            b = &b[(20 + len).min(b.len())..];
        }
        v
    }

    #[test]
    fn options_in_any_order_get_the_right_answers() {
        let mut input = 3u32.to_be_bytes().to_vec();
        let meta = |names: &[&str]| {
            let mut d = 0u32.to_be_bytes().to_vec();
            d.extend_from_slice(&(names.len() as u32).to_be_bytes());
            for n in names {
                d.extend_from_slice(&(n.len() as u32).to_be_bytes());
                d.extend_from_slice(n.as_bytes());
            }
            d
        };
        input.extend(opt(OPT_SET_META_CONTEXT, &meta(&["base:allocation"])));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(OPT_LIST_META_CONTEXT, &meta(&["qemu:"])));
        input.extend(opt(OPT_SET_META_CONTEXT, &meta(&["base:allocation", "nosuch:x"])));
        input.extend(opt(OPT_STARTTLS, &[]));
        input.extend(opt(99, b"?"));
        input.extend(opt(OPT_LIST, b"junk"));
        input.extend(opt(OPT_INFO, &[0, 0, 0, 5, b'x']));
        input.extend(opt(OPT_ABORT, &[]));
        let out = negotiate_bytes(Arc::new(BlankNode), &input);
        let r = replies(&out);
        let want = vec![
            (OPT_SET_META_CONTEXT, REP_ERR_INVALID), // before structured replies
            (OPT_STRUCTURED_REPLY, REP_ACK),
            (OPT_STRUCTURED_REPLY, REP_ERR_INVALID),
            (OPT_EXTENDED_HEADERS, REP_ACK),
            (OPT_LIST_META_CONTEXT, REP_META_CONTEXT), // qemu:allocation-depth
            (OPT_LIST_META_CONTEXT, REP_ACK),
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT), // only the one we know
            (OPT_SET_META_CONTEXT, REP_ACK),
            (OPT_STARTTLS, REP_ERR_POLICY),
            (99, REP_ERR_UNSUP),
            (OPT_LIST, REP_ERR_INVALID),
            (OPT_INFO, REP_ERR_INVALID),
            (OPT_ABORT, REP_ACK),
        ];
        assert_eq!(r, want);
    }

    #[test]
    fn random_and_mutated_handshakes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let node: Arc<dyn engine::block::BlockNode> = Arc::new(BlankNode);
        let mut good = 3u32.to_be_bytes().to_vec();
        good.extend(opt(OPT_EXTENDED_HEADERS, &[]));
        good.extend(opt(OPT_GO, &[0, 0, 0, 0, 0, 1, 0, 3]));
        for i in 0..300 {
            let mut input = good.clone();
            // Flip, cut and extend: lengths and counts turn hostile.
            for _ in 0..(1 + next() % 4) {
                let at = (next() as usize) % input.len();
                input[at] = next() as u8;
            }
            if i % 3 == 0 {
                input.truncate((next() as usize) % input.len());
            }
            if i % 5 == 0 {
                input.extend((0..next() % 64).map(|_| next() as u8));
            }
            negotiate_bytes(node.clone(), &input);
        }
    }
}
