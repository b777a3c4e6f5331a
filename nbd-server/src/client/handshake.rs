//! Client side of fixed newstyle negotiation, blocking: connect to a server
//! (TCP or unix), upgrade to TLS if asked (STARTTLS before any other option,
//! so nothing is said in plain text), ask for extended headers (else
//! structured replies), select meta contexts and GO; or list every export
//! with its details (`-L`). Transmission is in `conn.rs`.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::time::Duration;

use crate::proto::*;
use crate::stream::{discard, FdStream, HsStream};
use crate::tls::TlsClient;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Tcp { host: String, port: u16 },
    Unix(String),
}

impl Addr {
    pub fn connect(&self, timeout: Option<Duration>) -> io::Result<OwnedFd> {
        match self {
            Addr::Unix(p) => Ok(std::os::unix::net::UnixStream::connect(p)?.into()),
            Addr::Tcp { host, port } => {
                use std::net::ToSocketAddrs;
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("no address for {host}"));
                for a in (host.as_str(), *port).to_socket_addrs()? {
                    let r = match timeout {
                        Some(t) => std::net::TcpStream::connect_timeout(&a, t),
                        None => std::net::TcpStream::connect(a),
                    };
                    match r {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(s.into());
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }
}

/// What negotiation learned about an export.
#[derive(Clone, Debug, Default)]
pub struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
    pub mode: ReplyMode,
    /// Meta contexts: selected ones with their ids (GO), or all the server
    /// lists (list mode, ids 0).
    pub contexts: Vec<(u32, String)>,
}

/// Largest option reply we accept: bounds what a hostile server can make us hold.
const MAX_REPLY: u32 = 1 << 20;

struct Neg {
    s: HsStream<rustls::ClientConnection>,
}

struct OptReply {
    ty: u32,
    data: Vec<u8>,
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl Neg {
    /// Read the greeting, answer it, and with `tls` upgrade to TLS before
    /// anything else is said.
    fn start(fd: OwnedFd, timeout: Option<Duration>, tls: Option<&TlsClient>) -> io::Result<Neg> {
        let s = FdStream(fd);
        s.set_timeout(timeout)?;
        let mut n = Neg { s: HsStream::Plain(s) };
        let mut h = [0u8; 18];
        n.s.read_exact(&mut h)?;
        if be64(&h[0..8]) != NBDMAGIC {
            return Err(proto_err("not an NBD server (bad magic)"));
        }
        if be64(&h[8..16]) != IHAVEOPT {
            return Err(proto_err("server only speaks the oldstyle protocol, which is not supported"));
        }
        let sflags = be16(&h[16..18]);
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("server does not support fixed newstyle negotiation"));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if sflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        n.s.write_all(&cflags.to_be_bytes())?;
        if let Some(t) = tls {
            n.starttls(t)?;
        }
        Ok(n)
    }

    fn starttls(&mut self, tls: &TlsClient) -> io::Result<()> {
        self.send(OPT_STARTTLS, &[])?;
        let r = self.recv(OPT_STARTTLS)?;
        if r.ty != REP_ACK {
            let msg = String::from_utf8_lossy(&r.data);
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the server refused TLS{}{msg}", if msg.is_empty() { "" } else { ": " }),
            ));
        }
        let HsStream::Plain(fs) = std::mem::replace(&mut self.s, HsStream::Closed) else {
            return Err(proto_err("TLS started twice"));
        };
        let mut t = rustls::StreamOwned::new(tls.session()?, fs);
        while t.conn.is_handshaking() {
            t.conn.complete_io(&mut t.sock).map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
        }
        self.s = HsStream::Tls(Box::new(t));
        Ok(())
    }

    fn send(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut v = Vec::with_capacity(16 + data.len());
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v)
    }

    fn recv(&mut self, opt: u32) -> io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        if be64(&h[0..8]) != REPLY_MAGIC_OPT {
            return Err(proto_err("bad option reply magic"));
        }
        if be32(&h[8..12]) != opt {
            return Err(proto_err(format!("reply to option {} while waiting for {opt}", be32(&h[8..12]))));
        }
        let ty = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        if len > MAX_REPLY {
            discard(&mut self.s, u64::from(len))?;
            return Err(proto_err(format!("option reply of {len} bytes is too large")));
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data)?;
        Ok(OptReply { ty, data })
    }

    /// Send an option that is answered by a single ACK or error.
    fn simple(&mut self, opt: u32) -> io::Result<bool> {
        self.send(opt, &[])?;
        let r = self.recv(opt)?;
        Ok(r.ty == REP_ACK)
    }

    fn negotiate_mode(&mut self) -> io::Result<ReplyMode> {
        if self.simple(OPT_EXTENDED_HEADERS)? {
            return Ok(ReplyMode::Extended);
        }
        if self.simple(OPT_STRUCTURED_REPLY)? {
            return Ok(ReplyMode::Structured);
        }
        Ok(ReplyMode::Simple)
    }

    /// LIST_META_CONTEXT or SET_META_CONTEXT: (id, name) of each reply.
    fn meta(&mut self, opt: u32, export: &str, queries: &[&str]) -> io::Result<Vec<(u32, String)>> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.send(opt, &d)?;
        let mut out = Vec::new();
        loop {
            let r = self.recv(opt)?;
            match r.ty {
                REP_META_CONTEXT if r.data.len() >= 4 => {
                    out.push((be32(&r.data[0..4]), String::from_utf8_lossy(&r.data[4..]).into_owned()));
                }
                REP_ACK => return Ok(out),
                t if t & REP_FLAG_ERROR != 0 => return Ok(Vec::new()),
                _ => return Err(proto_err("unexpected reply to a meta context option")),
            }
        }
    }

    /// INFO or GO for `export`; Err with the server's message on refusal.
    fn info(&mut self, opt: u32, export: &str, info: &mut ExportInfo) -> io::Result<()> {
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        let reqs = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        self.send(opt, &d)?;
        info.name = export.to_string();
        let mut have_export = false;
        loop {
            let r = self.recv(opt)?;
            match r.ty {
                REP_INFO if r.data.len() >= 2 => {
                    let b = &r.data;
                    match be16(&b[0..2]) {
                        INFO_EXPORT if b.len() == 12 => {
                            info.size = be64(&b[2..10]);
                            info.flags = be16(&b[10..12]);
                            have_export = true;
                        }
                        INFO_NAME => info.name = String::from_utf8_lossy(&b[2..]).into_owned(),
                        INFO_DESCRIPTION => info.description = Some(String::from_utf8_lossy(&b[2..]).into_owned()),
                        INFO_BLOCK_SIZE if b.len() == 14 => {
                            info.min_block = be32(&b[2..6]);
                            info.pref_block = be32(&b[6..10]);
                            info.max_block = be32(&b[10..14]);
                        }
                        _ => {}
                    }
                }
                REP_ACK if have_export => return Ok(()),
                REP_ACK => return Err(proto_err("server acknowledged an export without describing it")),
                REP_ERR_TLS_REQD => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the server requires TLS (give the client tls-creds)",
                    ))
                }
                t if t & REP_FLAG_ERROR != 0 => {
                    let msg = String::from_utf8_lossy(&r.data).into_owned();
                    let kind = if t == REP_ERR_UNSUP { io::ErrorKind::Unsupported } else { io::ErrorKind::NotFound };
                    return Err(io::Error::new(
                        kind,
                        if msg.is_empty() { format!("export '{export}' refused") } else { msg },
                    ));
                }
                _ => return Err(proto_err("unexpected reply to NBD_OPT_GO")),
            }
        }
    }
}

/// A negotiated connection, ready for transmission.
pub struct Connected {
    pub fd: OwnedFd,
    pub tls: Option<rustls::ClientConnection>,
    pub info: ExportInfo,
}

/// Connect (over TLS with `tls`) and negotiate transmission of `export`,
/// selecting `contexts`.
pub fn connect(
    addr: &Addr,
    export: &str,
    contexts: &[&str],
    timeout: Option<Duration>,
    tls: Option<&TlsClient>,
) -> io::Result<Connected> {
    connect_with(addr, export, contexts, timeout, true, tls)
}

/// Negotiate simple replies only (the kernel's client knows no other form).
pub fn connect_simple(addr: &Addr, export: &str, timeout: Option<Duration>) -> io::Result<(OwnedFd, ExportInfo)> {
    let c = connect_with(addr, export, &[], timeout, false, None)?;
    Ok((c.fd, c.info))
}

fn connect_with(
    addr: &Addr,
    export: &str,
    contexts: &[&str],
    timeout: Option<Duration>,
    structured: bool,
    tls: Option<&TlsClient>,
) -> io::Result<Connected> {
    let fd = addr.connect(timeout)?;
    negotiate(fd, export, contexts, timeout, structured, tls).map_err(|e| closed_hint(e, tls.is_some()))
}

/// A server that hangs up mid-negotiation says nothing of why; under TLS
/// the likely reason is that it does not authorize our certificate. The
/// hang-up shows as an end of stream, or, when we were writing at the
/// time, as a broken pipe or a reset.
fn closed_hint(e: io::Error, tls: bool) -> io::Error {
    use io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    if !matches!(e.kind(), UnexpectedEof | BrokenPipe | ConnectionReset) {
        return e;
    }
    let why = if tls { " (it may not authorize this client's certificate)" } else { "" };
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("the server closed the connection during negotiation{why}"))
}

fn negotiate(
    fd: OwnedFd,
    export: &str,
    contexts: &[&str],
    timeout: Option<Duration>,
    structured: bool,
    tls: Option<&TlsClient>,
) -> io::Result<Connected> {
    let mut n = Neg::start(fd, timeout, tls)?;
    let mode = if structured { n.negotiate_mode()? } else { ReplyMode::Simple };
    let mut info = ExportInfo { mode, ..Default::default() };
    if info.mode != ReplyMode::Simple && !contexts.is_empty() {
        info.contexts = n.meta(OPT_SET_META_CONTEXT, export, contexts)?;
    }
    match n.info(OPT_GO, export, &mut info) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            // A server without NBD_OPT_GO: the old way, which ends negotiation.
            n.send(OPT_EXPORT_NAME, export.as_bytes())?;
            let mut b = [0u8; 10];
            n.s.read_exact(&mut b)?;
            info.size = be64(&b[0..8]);
            info.flags = be16(&b[8..10]);
            info.name = export.to_string();
        }
        Err(e) => return Err(e),
    }
    if info.min_block == 0 {
        (info.min_block, info.pref_block, info.max_block) = (1, 4096, 32 << 20);
    }
    n.s.fd()?.set_timeout(None)?;
    let (fd, tls) = n.s.into_parts()?;
    Ok(Connected { fd, tls, info })
}

/// Every export a server offers, with its details and meta contexts.
pub fn list(addr: &Addr, timeout: Option<Duration>, tls: Option<&TlsClient>) -> io::Result<Vec<ExportInfo>> {
    let fd = addr.connect(timeout)?;
    list_exports(fd, timeout, tls).map_err(|e| closed_hint(e, tls.is_some()))
}

fn list_exports(fd: OwnedFd, timeout: Option<Duration>, tls: Option<&TlsClient>) -> io::Result<Vec<ExportInfo>> {
    let mut n = Neg::start(fd, timeout, tls)?;
    let mode = n.negotiate_mode()?;
    n.send(OPT_LIST, &[])?;
    let mut names = Vec::new();
    loop {
        let r = n.recv(OPT_LIST)?;
        match r.ty {
            REP_SERVER if r.data.len() >= 4 => {
                let l = (be32(&r.data[0..4]) as usize).min(r.data.len() - 4);
                names.push(String::from_utf8_lossy(&r.data[4..4 + l]).into_owned());
            }
            REP_ACK => break,
            t if t & REP_FLAG_ERROR != 0 => return Err(proto_err("server refused to list its exports")),
            _ => return Err(proto_err("unexpected reply to NBD_OPT_LIST")),
        }
    }
    let mut out = Vec::new();
    for name in names {
        let mut info = ExportInfo { mode, ..Default::default() };
        n.info(OPT_INFO, &name, &mut info)?;
        info.contexts = n.meta(OPT_LIST_META_CONTEXT, &name, &[])?;
        out.push(info);
    }
    let _ = n.simple(OPT_ABORT);
    Ok(out)
}
