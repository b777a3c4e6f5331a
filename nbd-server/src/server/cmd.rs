//! The commands of the transmission phase: what each request does to the
//! export and the reply parts it makes (`conn.rs` receives the requests and
//! sends the replies).

use engine::block::{chain_status, BlockNode, WriteFlags, ZeroFlags};
use engine::error::{Error, ErrorKind};
use engine::net::SendPart;
use engine::runtime::IoBuf;
use std::rc::Rc;

use super::conn::{Conn, Payload, Wire};
use super::handshake::MetaContext;
use super::{DetectZeroes, Stats};
use crate::proto::*;

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
/// Reads up to this size whose data is in the page cache are sent from a
/// mapping of the file (`mapped_read`); larger ones are staged. The kernel's
/// copy of a 4 KiB page costs less than the two system calls that stage it
/// (server CPU per fio 4k read: 5.0 us mapped, 5.5 us staged), but a large
/// read's copy does not, and neither does faulting in a cold mapping (a
/// first nbdcopy pass with 256 KiB reads ran at a third of the staged speed).
const MAP_MAX: usize = 16 << 10;
/// Most extents one block status reply describes.
const MAX_EXTENTS: usize = 2048;

/// An error to send back: the wire errno and a message for the client.
pub(super) struct Fail(u32, String);

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

pub(super) async fn handle(c: Rc<Conn>, req: Request, payload: Option<Payload>, held: usize) {
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

/// The checks every request passes before it runs: flags, payload,
/// permission, range and alignment.
pub(super) fn check(c: &Conn, req: &Request, has_payload: bool) -> Result<(), Fail> {
    let e = &*c.export;
    if req.flags & !allowed_flags(c, req.ty) != 0 {
        return Err(fail(EINVAL, format!("unsupported flags {:#x} for command {}", req.flags, req.ty)));
    }
    if req.ty != CMD_WRITE && has_payload {
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
    if req.ty == CMD_READ && req.len > u64::from(c.server.max_request) {
        return Err(fail(EINVAL, format!("read of {} bytes exceeds the maximum of {}", req.len, c.server.max_request)));
    }
    Ok(())
}

/// A read answered at once, without a task of its own, when its data is in
/// the page cache and can be staged (`stage_read`); None: run it as a task.
pub(super) fn read_now(c: &Conn, req: &Request) -> Option<Vec<SendPart>> {
    if req.ty != CMD_READ || req.len == 0 || check(c, req, false).is_err() {
        return None;
    }
    if wants_sparse(c, req) {
        return None;
    }
    mapped_read(c, req).or_else(|| stage_read(c, req).unwrap_or(None).map(|p| vec![p]))
}

/// A small write whose payload arrived whole with its header, into pages
/// in the page cache: written at once from the receive buffer (no copy, no
/// task), its reply queued. None: run it as a task.
pub(super) fn write_now(c: &Conn, req: &Request, data: &[u8]) -> Option<Vec<SendPart>> {
    let e = &*c.export;
    if req.ty != CMD_WRITE || req.flags & CMD_FLAG_FUA != 0 || e.detect_zeroes != DetectZeroes::Off {
        return None;
    }
    check(c, req, true).ok()?;
    Some(match e.node.write_now(req.offset + e.offset, data)? {
        Ok(()) => {
            Stats::add(&c.server.stats.inline_write_bytes, data.len() as u64);
            ok_reply(c, req)
        }
        Err(err) => {
            let Fail(errno, msg) = err.into();
            error_reply(c, req, errno, &msg)
        }
    })
}

/// Small reads of page-cached data go out from a shared mapping of the
/// file: one sendmsg carries a batch of replies, the kernel copying each
/// from the page cache into the socket, with no system call per request.
/// None: read it another way.
fn mapped_read(c: &Conn, req: &Request) -> Option<Vec<SendPart>> {
    let len = req.len as usize;
    if len > MAP_MAX || !matches!(c.wire, Wire::Plain(_)) {
        return None;
    }
    let e = &*c.export;
    let (fd, host) = e.node.cached_extent(req.offset + e.offset, req.len)?;
    let map = e.maps.get(fd)?;
    let start = usize::try_from(host).ok()?;
    let end = start.checked_add(len).filter(|&end| end <= map.len())?;
    Stats::add(&c.server.stats.served_bytes, len as u64);
    Stats::add(&c.server.stats.mapped_bytes, len as u64);
    Some(vec![SendPart::Bytes(data_header(c, req)), SendPart::Mapped(map, start..end)])
}

async fn run(c: &Conn, req: &Request, payload: Option<Payload>) -> Result<Vec<SendPart>, Fail> {
    check(c, req, payload.is_some())?;
    let e = &*c.export;
    let node: &dyn BlockNode = &*e.node;
    let off = req.offset + e.offset;
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.ty {
        CMD_READ => read(c, req).await,
        CMD_WRITE => {
            let (buf, range) = match payload.expect("WRITE has a payload") {
                Payload::Buf(buf, range) => (buf, range),
                Payload::Pipe { head, pipe, len } => {
                    let at = head.as_ref().map_or(0, |h| h.len());
                    if let Some(h) = head {
                        let (r, h) = node.write_part(off, h, 0..at, WriteFlags { fua: false }).await;
                        c.recycle(h);
                        r?;
                    }
                    // While some core has no connection, a worker's write of
                    // this payload runs there, beside the shard receiving
                    // the next one (one stream runs faster); once every
                    // shard has a connection, the hand-off to a worker
                    // costs a third of the server's CPU per byte (nbdcopy
                    // with 2 connections: 0.38 vs 0.55 s per GiB).
                    let now = if c.server.every_shard_busy() {
                        node.write_pipe_now(off + at as u64, &pipe, len)
                    } else {
                        None
                    };
                    let (r, pipe) = match now {
                        Some(r) => {
                            Stats::add(&c.server.stats.inline_pipe_bytes, len as u64);
                            (r, pipe)
                        }
                        None => node.write_pipe(off + at as u64, pipe, len).await,
                    };
                    r?;
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

/// Is a read split into data and hole chunks (`sparse_read`) first? Large
/// ones, when the client takes structured replies and did not ask for one
/// piece (DF).
fn wants_sparse(c: &Conn, req: &Request) -> bool {
    c.mode != ReplyMode::Simple && req.flags & CMD_FLAG_DF == 0 && req.len >= SPARSE_READ_MIN
}

async fn read(c: &Conn, req: &Request) -> Result<Vec<SendPart>, Fail> {
    let e = &*c.export;
    let len = req.len as usize;
    if len == 0 {
        return Ok(ok_reply(c, req));
    }
    let off = req.offset + e.offset;
    if wants_sparse(c, req) {
        if let Some(parts) = sparse_read(c, req, off).await? {
            return Ok(parts);
        }
    }
    if let Some(parts) = mapped_read(c, req) {
        return Ok(parts);
    }
    if let Some(part) = stage_read(c, req)? {
        return Ok(vec![part]);
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

/// Data in the page cache goes by splice: its pages are handed to the
/// socket by reference, copied nowhere, not even by the kernel into a buffer
/// of ours. Staged now, on this thread, behind the replies staged before it
/// (so the caller queues the part before anything else can stage); the
/// writer sends them all with one splice. Ok(None): read it another way.
fn stage_read(c: &Conn, req: &Request) -> Result<Option<SendPart>, Fail> {
    let Wire::Plain(sock) = &c.wire else { return Ok(None) };
    let len = req.len as usize;
    if len > STAGE_MAX {
        return Ok(None);
    }
    let e = &*c.export;
    let Some((fd, host)) = e.node.cached_extent(req.offset + e.offset, req.len) else { return Ok(None) };
    match sock.stage_file(&data_header(c, req), fd, host, len) {
        Ok(Some(part)) => {
            Stats::add(&c.server.stats.served_bytes, len as u64);
            Stats::add(&c.server.stats.spliced_bytes, len as u64);
            Ok(Some(part))
        }
        Ok(None) => Ok(None),
        Err(err) => {
            // A partial reply is in the stage: the stream is broken.
            c.server.log(format!("staging a read reply: {err}; dropping the connection"));
            c.dead.set(true);
            sock.shutdown();
            Err(fail(EIO, err.to_string()))
        }
    }
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
