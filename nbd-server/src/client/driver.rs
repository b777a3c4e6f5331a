//! The `nbd` protocol driver: an export on an NBD server as a block node, so
//! every command works on `nbd://host:port/name`, `nbd+unix:///name?socket=P`
//! or `--image-opts driver=nbd,server.type=...`. Each shard talks over its own
//! connection when the server allows several (CAN_MULTI_CONN); otherwise all
//! requests go through the opening shard's one connection.

use std::rc::Rc;
use std::sync::{Arc, Weak};
use std::time::Duration;

use engine::block::{
    check_request, check_write, write_zero_buffers, BlockNode, BoxFuture, Driver, DriverKind, Extent, Limits,
};
use engine::block::{OpenCtx, Prealloc, WriteFlags, ZeroFlags};
use engine::error::{invalid, unsupported, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::{IoBuf, ShardHandle, ShardLocal};

use super::conn::{ClientConn, Reply};
use super::handshake::{connect, Addr, Connected, ExportInfo};
use crate::proto::*;
use crate::tls::TlsClient;

/// How long to wait for a server to greet an extra connection before
/// falling back to the first one (a server limited to one client queues the
/// rest without answering).
const EXTRA_CONN_TIMEOUT: Duration = Duration::from_secs(2);

pub struct NbdDriver;

/// A parsed NBD URI or legacy `nbd:` filename.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub addr: Option<Addr>,
    pub export: String,
    /// An `nbds` scheme.
    pub tls: bool,
    /// libnbd's query parameters: `tls-certificates=DIR` (QEMU's layout),
    /// `tls-verify-peer=false`, `tls-hostname=NAME`.
    pub tls_certificates: Option<String>,
    pub tls_verify_peer: bool,
    pub tls_hostname: Option<String>,
}

impl Target {
    fn new(addr: Addr, export: String) -> Target {
        Target { addr: Some(addr), export, tls_verify_peer: true, ..Default::default() }
    }
}

pub fn parse_filename(f: &str) -> Result<Target> {
    let bad = |why: &str| invalid(format!("invalid NBD URI '{f}': {why}"));
    if let Some(rest) = f.strip_prefix("nbd:").filter(|_| !f.starts_with("nbd://")) {
        // Legacy: nbd:unix:PATH[:exportname=N] or nbd:HOST:PORT[:exportname=N]
        let (main, export) = match rest.split_once(":exportname=") {
            Some((m, e)) => (m, e.to_string()),
            None => (rest, String::new()),
        };
        if let Some(p) = main.strip_prefix("unix:") {
            return Ok(Target::new(Addr::Unix(p.to_string()), export));
        }
        let (host, port) = main.rsplit_once(':').ok_or_else(|| bad("expected nbd:HOST:PORT"))?;
        let port = port.parse().map_err(|_| bad("bad port"))?;
        return Ok(Target::new(Addr::Tcp { host: host.to_string(), port }, export));
    }
    let (scheme, rest) = f.split_once("://").ok_or_else(|| bad("no scheme"))?;
    let (tls, unix) = match scheme {
        "nbd" | "nbd+tcp" => (false, false),
        "nbds" | "nbds+tcp" => (true, false),
        "nbd+unix" => (false, true),
        "nbds+unix" => (true, true),
        s => return Err(bad(&format!("unsupported scheme '{s}'"))),
    };
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let export = percent_decode(path);
    let mut socket = None;
    let mut t = Target { tls, tls_verify_peer: true, ..Default::default() };
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v);
        match k {
            "socket" => socket = Some(v),
            "tls-certificates" => t.tls_certificates = Some(v),
            "tls-hostname" => t.tls_hostname = Some(v),
            "tls-verify-peer" => {
                t.tls_verify_peer = engine::options::parse_bool(&v).ok_or_else(|| bad("bad tls-verify-peer"))?
            }
            _ => {}
        }
    }
    let addr = if unix {
        if !authority.is_empty() {
            return Err(bad("a unix socket URI has no host"));
        }
        Addr::Unix(socket.ok_or_else(|| bad("missing ?socket="))?)
    } else {
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            (h.to_string(), p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (authority.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => 10809,
        };
        Addr::Tcp { host: if host.is_empty() { "localhost".into() } else { host }, port }
    };
    t.addr = Some(addr);
    t.export = export;
    Ok(t)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filename QEMU shows for an NBD node.
fn display_name(addr: &Addr, export: &str) -> String {
    match addr {
        Addr::Unix(p) => format!("nbd+unix:///{export}?socket={p}"),
        Addr::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
    }
}

/// Closes the connection when the shard drops it (its reader task holds the
/// connection too, and ends once the socket is shut).
struct Held(Rc<ClientConn>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.kill("closed".into());
    }
}

pub struct NbdNode {
    me: Weak<NbdNode>,
    addr: Addr,
    export: String,
    context: Option<String>,
    info: ExportInfo,
    /// Extra connections (multi-conn) are made under TLS too.
    tls: Option<TlsClient>,
    writable: bool,
    /// The shard that opened the node and owns the first connection.
    home: ShardHandle,
    multi: bool,
    /// An extra connection failed: every shard uses home's from now on.
    no_extra: std::sync::atomic::AtomicBool,
    conns: ShardLocal<Held>,
}

enum Route {
    Here(Rc<ClientConn>),
    Home(ShardHandle),
}

impl NbdNode {
    async fn route(&self) -> Result<Route> {
        if let Some(h) = self.conns.get() {
            if !h.0.is_dead() {
                return Ok(Route::Here(h.0.clone()));
            }
        }
        let here = engine::runtime::current_shard();
        let at_home = here == Some(self.home.index());
        if !at_home && (!self.multi || self.no_extra.load(std::sync::atomic::Ordering::Relaxed)) {
            return Ok(Route::Home(self.home.clone()));
        }
        let (addr, export, tls) = (self.addr.clone(), self.export.clone(), self.tls.clone());
        let ctx: Vec<String> = self.context.iter().cloned().collect();
        let timeout = if at_home { None } else { Some(EXTRA_CONN_TIMEOUT) };
        let r = engine::aio::blocking(move || {
            let c: Vec<&str> = ctx.iter().map(String::as_str).collect();
            connect(&addr, &export, &c, timeout, tls.as_ref())
        })
        .await;
        match r {
            Ok(Connected { fd, tls, info }) => {
                // Another task on this shard may have connected meanwhile:
                // use its connection (ours closes unused), never replace a
                // live one that has requests in flight.
                if let Some(h) = self.conns.get().filter(|h| !h.0.is_dead()) {
                    return Ok(Route::Here(h.0.clone()));
                }
                let c = ClientConn::start(fd, tls, info);
                self.conns.set(Rc::new(Held(c.clone())));
                Ok(Route::Here(c))
            }
            Err(_) if !at_home => {
                self.no_extra.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(Route::Home(self.home.clone()))
            }
            Err(e) => Err(Error::os("NBD reconnect", e).with_file(self.filename())),
        }
    }

    /// Run one request on the right connection; `buf` is the payload of a
    /// write or the destination of a read, returned in every case.
    async fn call(
        &self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        is_read: bool,
    ) -> (Result<Reply>, Option<IoBuf>) {
        match self.route().await {
            Err(e) => (Err(e), buf),
            Ok(Route::Here(c)) => {
                let (payload, read_buf) = if is_read { (None, buf) } else { (buf, None) };
                let (r, b) = c.request(ty, flags, offset, len, payload, read_buf).await;
                (self.result(r, ty, offset), b)
            }
            Ok(Route::Home(home)) => {
                let Some(me) = self.me.upgrade() else {
                    return (Err(invalid("NBD node closed")), buf);
                };
                home.spawn(move || async move { me.call_home(ty, flags, offset, len, buf, is_read).await }).await
            }
        }
    }

    fn call_home(
        &self,
        ty: u16,
        flags: u16,
        offset: u64,
        len: u64,
        buf: Option<IoBuf>,
        is_read: bool,
    ) -> BoxFuture<'_, (Result<Reply>, Option<IoBuf>)> {
        Box::pin(self.call(ty, flags, offset, len, buf, is_read))
    }

    fn result(&self, r: std::io::Result<Reply>, ty: u16, offset: u64) -> Result<Reply> {
        let op = match ty {
            CMD_READ => "NBD read",
            CMD_WRITE => "NBD write",
            CMD_FLUSH => "NBD flush",
            CMD_TRIM => "NBD trim",
            CMD_WRITE_ZEROES => "NBD write zeroes",
            CMD_BLOCK_STATUS => "NBD block status",
            _ => "NBD request",
        };
        let reply = r.map_err(|e| Error::os(op, e).with_file(self.filename()))?;
        if let Some((errno, msg)) = &reply.error {
            let e = Error::errno(op, host_errno(*errno)).with_file(self.filename()).at(offset);
            let e = if msg.is_empty() {
                e
            } else {
                Error::new(e.kind(), format!("{op}: {msg}")).with_file(self.filename()).at(offset)
            };
            return Err(e);
        }
        Ok(reply)
    }

    fn has(&self, f: u16) -> bool {
        self.info.flags & f != 0
    }

    /// Largest length one request may carry for commands without payload.
    fn max_len(&self) -> u64 {
        if self.info.mode == ReplyMode::Extended {
            1 << 62
        } else {
            u64::from(u32::MAX) & !(u64::from(self.info.min_block.max(1)) - 1).max(4095)
        }
    }

    fn max_io(&self) -> usize {
        (self.info.max_block.clamp(self.info.min_block.max(512), 32 << 20)) as usize
    }
}

impl BlockNode for NbdNode {
    fn driver(&self) -> &'static str {
        "nbd"
    }
    fn filename(&self) -> String {
        display_name(&self.addr, &self.export)
    }
    fn size(&self) -> u64 {
        self.info.size
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: self.info.min_block.max(1), mem_alignment: 1, max_transfer: self.max_io() as u64 }
    }
    fn read_only(&self) -> bool {
        !self.writable
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_request(self, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            let max = self.max_io();
            if buf.len() <= max {
                let len = buf.len() as u64;
                let (r, b) = self.call(CMD_READ, 0, offset, len, Some(buf), true).await;
                return (r.map(drop), b.unwrap_or_else(IoBuf::empty));
            }
            // Larger than the server takes at once: in pieces, in place.
            let mut buf = buf;
            let mut at = 0;
            while at < buf.len() {
                let n = (buf.len() - at).min(max);
                let (r, b) = self.read_part(offset + at as u64, buf, at..at + n).await;
                buf = b;
                if r.is_err() {
                    return (r, buf);
                }
                at += n;
            }
            (Ok(()), buf)
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_write(self, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            if buf.len() > self.max_io() {
                let mut buf = buf;
                let n = buf.len();
                let max = self.max_io();
                let mut at = 0;
                while at < n {
                    let k = (n - at).min(max);
                    let (r, b) = self.write_part(offset + at as u64, buf, at..at + k, flags).await;
                    buf = b;
                    if r.is_err() {
                        return (r, buf);
                    }
                    at += k;
                }
                return (Ok(()), buf);
            }
            let fua = flags.fua && self.has(TF_SEND_FUA);
            let len = buf.len() as u64;
            let (r, b) = self.call(CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, offset, len, Some(buf), false).await;
            let b = b.unwrap_or_else(IoBuf::empty);
            if r.is_ok() && flags.fua && !fua {
                return (self.flush().await, b);
            }
            (r.map(drop), b)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            if !self.has(TF_SEND_WRITE_ZEROES) || (flags.no_fallback && !self.has(TF_SEND_FAST_ZERO)) {
                if flags.no_fallback {
                    return Err(unsupported("the NBD server cannot zero quickly"));
                }
                return write_zero_buffers(self, offset, len, flags.fua).await;
            }
            let mut f = 0;
            if !flags.may_unmap {
                f |= CMD_FLAG_NO_HOLE;
            }
            if flags.no_fallback {
                f |= CMD_FLAG_FAST_ZERO;
            }
            if flags.fua && self.has(TF_SEND_FUA) {
                f |= CMD_FLAG_FUA;
            }
            let mut done = 0;
            while done < len {
                let n = (len - done).min(self.max_len().min(1 << 30));
                match self.call(CMD_WRITE_ZEROES, f, offset + done, n, None, false).await.0 {
                    Err(e) if e.kind() == ErrorKind::Unsupported && flags.no_fallback => return Err(e),
                    r => r?,
                };
                done += n;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            if !self.has(TF_SEND_TRIM) {
                return Ok(());
            }
            let mut done = 0;
            while done < len {
                let n = (len - done).min(self.max_len().min(1 << 30));
                self.call(CMD_TRIM, 0, offset + done, n, None, false).await.0?;
                done += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.writable || !self.has(TF_SEND_FLUSH) {
                return Ok(());
            }
            self.call(CMD_FLUSH, 0, 0, 0, None, false).await.0.map(drop)
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            let size = self.size();
            if offset >= size {
                return Err(invalid(format!("block status at offset {offset} beyond end ({size})")));
            }
            let len = len.min(size - offset);
            // Offsets are the export's own, as for any protocol node (QEMU
            // reports them valid too, so `map` shows them).
            let all_data =
                Extent { len, data: true, zero: false, allocated: true, offset: Some(offset), compressed: false };
            let Some(&(id, _)) = self.info.contexts.first() else {
                return Ok(all_data);
            };
            let ask = len.min(self.max_len());
            let reply = self.call(CMD_BLOCK_STATUS, 0, offset, ask, None, false).await.0?;
            let first = reply.extents.iter().find(|(i, _)| *i == id).and_then(|(_, d)| d.first().copied());
            let Some((l, flags)) = first else {
                return Err(Error::new(ErrorKind::Io, "NBD server sent no extent for a block status request")
                    .with_file(self.filename()));
            };
            if l == 0 {
                return Err(Error::new(ErrorKind::Io, "NBD server sent an empty extent").with_file(self.filename()));
            }
            let flags = flags as u32;
            Ok(Extent {
                len: l.min(len),
                data: flags & STATE_HOLE == 0,
                zero: flags & STATE_ZERO != 0,
                allocated: true,
                offset: Some(offset),
                compressed: false,
            })
        })
    }

    fn truncate(&self, size: u64, _exact: bool, _prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if size == self.size() {
                return Ok(());
            }
            Err(unsupported("an NBD export cannot be resized"))
        })
    }

    fn allocated_size(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async move { Ok(None) })
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if let Some(h) = self.conns.get() {
                h.0.disconnect().await;
            }
            self.conns.remove();
            Ok(())
        })
    }
}

/// The client's TLS, if any: `tls-creds=ID` (QEMU), else an `nbds` URI's
/// `tls-certificates` directory (libnbd). The certificate must name the
/// TCP host, or `tls-hostname`; over a unix socket no name is checked
/// unless one is given, as QEMU does.
fn tls_setup(opts: &mut OptionTree, t: &Target, addr: &Addr) -> Result<Option<TlsClient>> {
    let hostname = opts.take("tls-hostname").or_else(|| t.tls_hostname.clone()).or_else(|| match addr {
        Addr::Tcp { host, .. } => Some(host.clone()),
        Addr::Unix(_) => None,
    });
    if let Some(id) = opts.take("tls-creds") {
        return TlsClient::from_object(&id, hostname.as_deref()).map(Some);
    }
    if !t.tls {
        return Ok(None);
    }
    let dir = t.tls_certificates.as_deref().ok_or_else(|| {
        invalid(
            "nbd: an nbds URI needs credentials: add ?tls-certificates=DIR, or use --object \
             tls-creds-x509,id=ID,dir=DIR,endpoint=client with tls-creds=ID",
        )
    })?;
    TlsClient::from_dir(std::path::Path::new(dir), t.tls_verify_peer, hostname.as_deref()).map(Some)
}

impl NbdDriver {
    async fn open(&self, ctx: &OpenCtx, mut opts: OptionTree) -> Result<Arc<dyn BlockNode>> {
        let mut t = match opts.take("filename") {
            Some(f) => parse_filename(&f)?,
            None => Target::default(),
        };
        let addr = match t.addr.take() {
            Some(a) => a,
            None => {
                let ty = opts.take("server.type").unwrap_or_else(|| "inet".into());
                match ty.as_str() {
                    "unix" => Addr::Unix(
                        opts.take("server.path")
                            .ok_or_else(|| invalid("nbd: server.path is required for server.type=unix"))?,
                    ),
                    "inet" => Addr::Tcp {
                        host: opts.take("server.host").ok_or_else(|| invalid("nbd: server.host is required"))?,
                        port: match opts.take("server.port") {
                            Some(p) => p.parse().map_err(|_| invalid(format!("nbd: invalid port '{p}'")))?,
                            None => 10809,
                        },
                    },
                    t => return Err(invalid(format!("nbd: unsupported server.type '{t}'"))),
                }
            }
        };
        let mut export = t.export.clone();
        if let Some(e) = opts.take("export") {
            export = e;
        }
        let tls = tls_setup(&mut opts, &t, &addr)?;
        let context = Some(opts.take("x-dirty-bitmap").unwrap_or_else(|| CTX_BASE_ALLOCATION.to_string()));
        for k in ["reconnect-delay", "open-timeout"] {
            opts.take(k);
        }
        opts.ensure_consumed("nbd")?;
        let home = engine::runtime::current_handle().ok_or_else(|| invalid("nbd: open must run on a shard"))?;
        let (a2, e2, c2) = (addr.clone(), export.clone(), context.clone());
        let name = display_name(&addr, &export);
        let t2 = tls.clone();
        let Connected { fd, tls: session, info } = engine::aio::blocking(move || {
            let c: Vec<&str> = c2.iter().map(String::as_str).collect();
            connect(&a2, &e2, &c, Some(Duration::from_secs(30)), t2.as_ref())
        })
        .await
        .map_err(|e| Error::os("Failed to connect to the NBD server", e).with_file(name.clone()))?;
        if ctx.flags.write && info.flags & TF_READ_ONLY != 0 {
            return Err(Error::new(ErrorKind::ReadOnly, "the NBD export is read-only").with_file(name));
        }
        let multi = info.flags & TF_CAN_MULTI_CONN != 0;
        let conn = ClientConn::start(fd, session, info.clone());
        let node = Arc::new_cyclic(|me| NbdNode {
            me: me.clone(),
            addr,
            export,
            tls,
            context,
            info,
            writable: ctx.flags.write,
            home,
            multi,
            no_extra: std::sync::atomic::AtomicBool::new(false),
            conns: ShardLocal::default(),
        });
        node.conns.set(Rc::new(Held(conn)));
        Ok(node)
    }
}

impl Driver for NbdDriver {
    fn name(&self) -> &'static str {
        "nbd"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn probe_filename(&self, f: &str) -> u32 {
        let schemes = ["nbd:", "nbds:", "nbd+unix:", "nbds+unix:", "nbd+tcp:", "nbds+tcp:"];
        if schemes.iter().any(|s| f.starts_with(s)) {
            100
        } else {
            0
        }
    }
    fn open_protocol<'a>(&'a self, ctx: &'a OpenCtx, opts: OptionTree) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(self.open(ctx, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nbd_uris_and_legacy_names() {
        let t = |f: &str| {
            let t = parse_filename(f).unwrap();
            (t.addr.unwrap(), t.export, t.tls)
        };
        assert_eq!(
            t("nbd://example.com:1234/disk"),
            (Addr::Tcp { host: "example.com".into(), port: 1234 }, "disk".into(), false)
        );
        assert_eq!(t("nbd://localhost"), (Addr::Tcp { host: "localhost".into(), port: 10809 }, "".into(), false));
        assert_eq!(
            t("nbd+unix:///my%20disk?socket=/tmp/s.sock"),
            (Addr::Unix("/tmp/s.sock".into()), "my disk".into(), false)
        );
        assert_eq!(t("nbds://[::1]:99/x"), (Addr::Tcp { host: "::1".into(), port: 99 }, "x".into(), true));
        assert_eq!(t("nbd:unix:/tmp/s:exportname=e"), (Addr::Unix("/tmp/s".into()), "e".into(), false));
        assert_eq!(t("nbd:localhost:10810"), (Addr::Tcp { host: "localhost".into(), port: 10810 }, "".into(), false));
        let q = parse_filename("nbds+unix:///e?socket=/s&tls-certificates=/pki%2fx&tls-verify-peer=false").unwrap();
        assert_eq!((q.tls, q.tls_certificates.as_deref(), q.tls_verify_peer), (true, Some("/pki/x"), false));
        assert!(parse_filename("nbds://h/?tls-verify-peer=maybe").is_err());
        assert!(parse_filename("nbd+unix:///x").is_err(), "a unix URI needs its socket");
        assert!(parse_filename("nbd://h:notaport/").is_err());
        assert_eq!(percent_decode("a%2fb%zz%"), "a/b%zz%");
    }
}
