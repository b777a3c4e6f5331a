//! The `nvme` protocol driver: an NVMe namespace driven from userspace over
//! VFIO, one I/O queue pair per shard, DMA straight into the shard's buffer
//! pool. Names as QEMU's: `nvme://0000:01:00.0/1`, or
//! `driver=nvme,device=0000:01:00.0,namespace=1`; ours on top: `poll=on`
//! (poll completions while commands are in flight instead of waiting for
//! the MSI-X interrupt), `sgl=on|off` (data pointers as one SGL descriptor
//! where the controller takes SGLs, the default, or as PRPs).
//!
//! Files: spec.rs (wire structures), vfio.rs (container, device, DMA
//! mapping), dma.rs (IOVA allocation, DMA memory, PRPs), queue.rs (rings and
//! doorbells), ctrl.rs (bring-up, admin, reset, shutdown), io.rs (a shard's
//! queue pair and completion loop). This file: options and the BlockNode.
//! passthru.rs is the other way to a namespace, through the kernel's
//! driver: io_uring NVMe passthrough on /dev/ngXnY.

pub mod ctrl;
pub mod dma;
pub mod io;
pub mod passthru;
pub mod queue;
pub mod spec;
pub mod vfio;

use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use engine::block::{
    check_request, check_write, write_zero_buffers, BlockNode, BoxFuture, Driver, DriverKind, Extent, Limits,
};
use engine::block::{read_covered, write_covered, OpenCtx, Prealloc, RangeTracker, WriteFlags, ZeroFlags};
use engine::error::{invalid, unsupported, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::{IoBuf, ShardLocal};

use ctrl::Controller;
use io::{check_blocks, Held, IoQueue};
use spec::{nvm, Sqe};

pub struct NvmeDriver;

/// Parse `nvme://DDDD:BB:SS.F/NSID` into (PCI address, namespace).
pub fn parse_filename(f: &str) -> Result<(String, u32)> {
    let rest = f
        .strip_prefix("nvme://")
        .ok_or_else(|| invalid(format!("'{f}' is not an NVMe URI (nvme://0000:01:00.0/1)")))?;
    let (dev, ns) = rest
        .split_once('/')
        .ok_or_else(|| invalid(format!("NVMe URI '{f}' names no namespace (nvme://0000:01:00.0/1)")))?;
    let ns = ns.parse().map_err(|_| invalid(format!("NVMe URI '{f}': bad namespace '{ns}'")))?;
    Ok((ctrl::parse_bdf(dev)?, ns))
}

/// Largest data transfer we put in one command: what one PRP list page
/// covers (2 MiB), or less when the controller says so (MDTS).
const MAX_PRP_TRANSFER: usize = 2 << 20;
/// Blocks per write zeroes or discard command (NLB and DSM range lengths
/// are 16 and 32 bits; stay well under both).
const ZERO_BLOCKS: u64 = 1 << 16;

/// One command's share of a read or write: `len` bytes at `offset`, the
/// data at `at` in the request's buffer.
struct Piece {
    op: u8,
    offset: u64,
    at: usize,
    len: usize,
    flags: u32,
    direct_only: bool,
}

pub struct NvmeNode {
    ctrl: Arc<Controller>,
    name: String,
    nsid: u32,
    block: u32,
    size: u64,
    max_transfer: usize,
    read_only: bool,
    poll: bool,
    /// Data pointers as SGL descriptors (`sgl`, default on where offered).
    sgl: bool,
    queues: ShardLocal<IoQueue>,
    /// Writes in flight, for read-modify-write of partial blocks.
    inflight: RangeTracker,
}

impl NvmeDriver {
    async fn open(&self, ctx: &OpenCtx, mut opts: OptionTree) -> Result<Arc<dyn BlockNode>> {
        let (bdf, nsid) = match opts.take("filename") {
            Some(f) => parse_filename(&f)?,
            None => {
                let dev = opts
                    .take("device")
                    .ok_or_else(|| invalid("driver 'nvme' needs 'device' (a PCI address) or a filename nvme://..."))?;
                let ns = match opts.take("namespace") {
                    Some(n) => n.parse().map_err(|_| invalid(format!("nvme: bad namespace '{n}'")))?,
                    None => 1,
                };
                (ctrl::parse_bdf(&dev)?, ns)
            }
        };
        let poll = opts.take_bool("poll")?.unwrap_or(false);
        let sgl = opts.take_bool("sgl")?;
        take_ignored(&mut opts);
        opts.ensure_consumed("The 'nvme' block driver")?;
        Ok(NvmeNode::open(ctx, &bdf, nsid, poll, sgl).await?)
    }
}

/// QEMU's and the file driver's knobs that mean nothing to a namespace:
/// accepted (as qemu-img does for its nvme driver) and dropped.
fn take_ignored(opts: &mut OptionTree) {
    for k in ["aio", "aio-max-batch", "discard", "cache.direct", "cache.no-flush", "locking"] {
        opts.take(k);
    }
}

/// Both NVMe paths see a namespace as data everywhere (no block status to
/// ask the device for).
fn all_data(offset: u64, len: u64, size: u64) -> Extent {
    Extent {
        len: len.min(size - offset),
        data: true,
        zero: false,
        allocated: true,
        offset: Some(offset),
        compressed: false,
    }
}

/// A namespace's size is the device's: a truncate to it succeeds, any other fails.
fn fixed_size(name: &str, size: u64, want: u64) -> Result<()> {
    if want == size {
        return Ok(());
    }
    Err(Error::new(ErrorKind::Unsupported, "Cannot resize an NVMe namespace").with_file(name))
}

impl NvmeNode {
    /// Open namespace `nsid` of the controller at `bdf` (bringing the
    /// controller up unless this process has it already). Data goes by SGL
    /// when the controller takes them, unless `sgl` says otherwise.
    pub async fn open(ctx: &OpenCtx, bdf: &str, nsid: u32, poll: bool, sgl: Option<bool>) -> Result<Arc<NvmeNode>> {
        let name = format!("nvme://{bdf}/{nsid}");
        let ctrl = engine::aio::blocking({
            let bdf = bdf.to_string();
            move || Controller::get(&bdf)
        })
        .await
        .map_err(|e| e.with_file(&name))?;
        if sgl == Some(true) && !ctrl.id.has_sgl() {
            return Err(unsupported("sgl=on: the NVMe controller does not take SGLs").with_file(&name));
        }
        let ns = ctrl.namespace(nsid).map_err(|e| e.with_file(&name))?;
        let max_transfer = ctrl.id.max_transfer(ctrl.cap.min_page).unwrap_or(usize::MAX).min(MAX_PRP_TRANSFER);
        let max_transfer = max_transfer - max_transfer % ns.block_size as usize;
        if max_transfer == 0 {
            return Err(unsupported(format!(
                "namespace {nsid}: {}-byte blocks, larger than the controller's largest transfer",
                ns.block_size
            ))
            .with_file(&name));
        }
        Ok(Arc::new(NvmeNode {
            name,
            nsid,
            block: ns.block_size,
            size: ns.blocks * u64::from(ns.block_size),
            max_transfer,
            read_only: !ctx.flags.write,
            poll,
            sgl: sgl.unwrap_or_else(|| ctrl.id.has_sgl()),
            ctrl,
            queues: ShardLocal::default(),
            inflight: RangeTracker::new(),
        }))
    }
}

impl NvmeNode {
    fn err(&self, e: Error, offset: u64) -> Error {
        e.with_file(&self.name).at(offset)
    }

    /// This shard's queue pair, made on first use.
    fn queue(&self) -> Result<Rc<IoQueue>> {
        if let Some(q) = self.queues.get() {
            return Ok(q);
        }
        let q = IoQueue::new(&self.ctrl, self.poll, self.sgl).map_err(|e| e.with_file(&self.name))?;
        self.queues.set(q.clone());
        Ok(q)
    }

    /// One read or write command for `len` bytes at `offset`, the data at
    /// `range.start` of `buf`: straight from the buffer when the device can
    /// reach it, else through a bounce buffer (or refused when `direct_only`).
    async fn rw_one(&self, q: &Rc<IoQueue>, p: Piece, mut buf: IoBuf) -> (Result<()>, IoBuf) {
        let Piece { op, offset, at, len, flags, direct_only } = p;
        let lba = offset / u64::from(self.block);
        let blocks = (len / self.block as usize) as u32;
        let mut sqe = Sqe::rw(op, self.nsid, lba, blocks, flags);
        // SAFETY: `at + len <= buf.len()` (the callers split within it).
        let data = unsafe { buf.as_mut_ptr().add(at) };
        // PRPs carry dword-aligned addresses; anything else is bounced.
        let reachable = if (data as usize).is_multiple_of(4) {
            q.iova_of(data, len)
        } else {
            Err(invalid(format!("buffer at {data:p} is not dword aligned")))
        };
        let (iova, bounce) = match reachable {
            Ok(iova) => (iova, None),
            Err(e) if direct_only => return (Err(self.err(e, offset)), buf),
            Err(_) => match q.bounce(len) {
                Ok(b) => {
                    if op == nvm::WRITE {
                        // SAFETY: the bounce buffer is ours, no command uses it yet.
                        unsafe { b.bytes_mut()[..len].copy_from_slice(&buf[at..at + len]) };
                    }
                    (b.iova, Some(b))
                }
                Err(e) => return (Err(self.err(e, offset)), buf),
            },
        };
        let cid = q.acquire().await;
        if let Err(e) = q.set_data(cid, &mut sqe, iova, len) {
            q.release_unused(cid);
            return (Err(self.err(e, offset)), buf);
        }
        let (r, held) = q.submit(cid, sqe, Held { buf: Some(buf), bounce }).await;
        let mut buf = held.buf.expect("the command gives back the buffer it held");
        if let Some(b) = held.bounce {
            if r.is_ok() && op == nvm::READ {
                // SAFETY: the read completed; the device is done with it.
                buf[at..at + len].copy_from_slice(unsafe { &b.bytes()[..len] });
            }
            q.give_back_bounce(b);
        }
        (r.map(drop).map_err(|e| self.err(e, offset)), buf)
    }

    /// Read or write `buf[range]` at `offset` (block aligned), split at the
    /// transfer limit; the pieces go one after another (the buffer is lent
    /// to one command at a time).
    async fn rw(
        &self,
        op: u8,
        offset: u64,
        buf: IoBuf,
        range: Range<usize>,
        flags: u32,
        direct_only: bool,
    ) -> (Result<()>, IoBuf) {
        let len = range.len() as u64;
        if let Err(e) = check_blocks(offset, len, self.block, self.size) {
            return (Err(e.with_file(&self.name)), buf);
        }
        let q = match self.queue() {
            Ok(q) => q,
            Err(e) => return (Err(e), buf),
        };
        let mut buf = buf;
        let mut done = 0usize;
        while (done as u64) < len {
            let n = (len as usize - done).min(self.max_transfer);
            let piece = Piece { op, offset: offset + done as u64, at: range.start + done, len: n, flags, direct_only };
            let (r, b) = self.rw_one(&q, piece, buf).await;
            buf = b;
            if r.is_err() {
                return (r, buf);
            }
            done += n;
        }
        (Ok(()), buf)
    }

    fn aligned(&self, offset: u64, len: usize) -> bool {
        let b = u64::from(self.block);
        offset.is_multiple_of(b) && (len as u64).is_multiple_of(b)
    }

    /// A read that does not start or end on a block: the blocks around it,
    /// into a buffer of our own.
    async fn read_unaligned(&self, offset: u64, buf: IoBuf, range: Range<usize>) -> (Result<()>, IoBuf) {
        if let Err(e) = check_request(self, offset, range.len() as u64) {
            return (Err(e), buf);
        }
        let read = async |start, tmp: IoBuf| {
            let n = tmp.len();
            self.rw(nvm::READ, start, tmp, 0..n, 0, false).await
        };
        read_covered(offset, buf, range, u64::from(self.block), read).await
    }

    /// A write that does not start or end on a block: read-modify-write of
    /// the blocks around it.
    async fn write_unaligned(&self, offset: u64, buf: IoBuf, range: Range<usize>, flags: u32) -> (Result<()>, IoBuf) {
        let read = async |start, tmp: IoBuf| {
            let n = tmp.len();
            self.rw(nvm::READ, start, tmp, 0..n, 0, false).await
        };
        let write = async |start, tmp: IoBuf| {
            let n = tmp.len();
            self.rw(nvm::WRITE, start, tmp, 0..n, flags, false).await
        };
        write_covered(offset, buf, range, u64::from(self.block), &self.inflight, read, write).await
    }

    /// Read without a bounce buffer: a buffer the device cannot reach (not
    /// from the shard's pool) is refused before any command is built.
    pub async fn read_zero_copy(&self, offset: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let n = buf.len();
        self.rw(nvm::READ, offset, buf, 0..n, 0, true).await
    }

    /// Reset the controller now (a test and recovery hook): every shard's
    /// queue is made again and its commands in flight resubmitted.
    pub fn reset_controller(&self) -> Result<()> {
        self.ctrl.reset(self.ctrl.generation(), "asked for").map_err(|e| e.with_file(&self.name))
    }

    /// Commands this shard's queue completed, and resubmitted after resets.
    pub fn queue_stats(&self) -> Option<(u16, u64, u64)> {
        self.queues.get().map(|q| (q.qid(), q.completed.get(), q.resubmitted.get()))
    }

    /// A command with no data (flush) or with one DMA page of it (discard ranges).
    async fn simple(&self, sqe: Sqe, page: Option<&[u8]>, offset: u64) -> Result<()> {
        let q = self.queue()?;
        let mut sqe = sqe;
        let bounce = match page {
            Some(p) => {
                let b = q.bounce(p.len()).map_err(|e| self.err(e, offset))?;
                // SAFETY: our bounce buffer, not in use by any command.
                unsafe { b.bytes_mut()[..p.len()].copy_from_slice(p) };
                sqe.set_prp(b.iova, 0);
                Some(b)
            }
            None => None,
        };
        let cid = q.acquire().await;
        let (r, held) = q.submit(cid, sqe, Held { buf: None, bounce }).await;
        if let Some(b) = held.bounce {
            q.give_back_bounce(b);
        }
        r.map(drop).map_err(|e| self.err(e, offset))
    }
}

impl BlockNode for NvmeNode {
    fn driver(&self) -> &'static str {
        "nvme"
    }
    fn filename(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: self.block, mem_alignment: 4, max_transfer: 0 }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let n = buf.len();
        self.read_part(offset, buf, 0..n)
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let n = buf.len();
        self.write_part(offset, buf, 0..n, flags)
    }

    fn read_part(&self, offset: u64, buf: IoBuf, range: Range<usize>) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if range.is_empty() {
                return (Ok(()), buf);
            }
            if !self.aligned(offset, range.len()) {
                return self.read_unaligned(offset, buf, range).await;
            }
            self.rw(nvm::READ, offset, buf, range, 0, false).await
        })
    }

    fn write_part(
        &self,
        offset: u64,
        buf: IoBuf,
        range: Range<usize>,
        flags: WriteFlags,
    ) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_write(self, offset, range.len() as u64) {
                return (Err(e), buf);
            }
            if range.is_empty() {
                return (Ok(()), buf);
            }
            let f = if flags.fua { nvm::FUA } else { 0 };
            if !self.aligned(offset, range.len()) {
                return self.write_unaligned(offset, buf, range, f).await;
            }
            // Held against a read-modify-write of the same blocks.
            let _t = self.inflight.begin(offset, offset + range.len() as u64, false).await;
            self.rw(nvm::WRITE, offset, buf, range, f, false).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            if !self.aligned(offset, len as usize) {
                // Partial blocks: zeroes written through read-modify-write.
                return write_zero_buffers(self, offset, len, flags.fua).await;
            }
            check_blocks(offset, len, self.block, self.size).map_err(|e| e.with_file(&self.name))?;
            if !self.ctrl.id.has_write_zeroes() {
                if flags.no_fallback {
                    return Err(unsupported("the NVMe controller has no Write Zeroes command").with_file(&self.name));
                }
                return write_zero_buffers(self, offset, len, flags.fua).await;
            }
            let b = u64::from(self.block);
            let mut lba = offset / b;
            let end = (offset + len) / b;
            let mut f = if flags.may_unmap { nvm::DEAC } else { 0 };
            if flags.fua {
                f |= nvm::FUA;
            }
            while lba < end {
                let n = (end - lba).min(ZERO_BLOCKS);
                self.simple(Sqe::rw(nvm::WRITE_ZEROES, self.nsid, lba, n as u32, f), None, lba * b).await?;
                lba += n;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            if !self.ctrl.id.has_dsm() || len == 0 {
                return Ok(()); // discard is a hint
            }
            // Whole blocks inside the range only.
            let b = u64::from(self.block);
            let (mut lba, end) = (offset.div_ceil(b), (offset + len).min(self.size) / b);
            while lba < end {
                let n = (end - lba).min(ZERO_BLOCKS);
                let mut sqe = Sqe::new(nvm::DSM, self.nsid);
                sqe.set_cdw(10, 0); // one range (0-based)
                sqe.set_cdw(11, nvm::DSM_AD);
                self.simple(sqe, Some(&spec::dsm_range(lba, n as u32)), lba * b).await?;
                lba += n;
            }
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // Without a volatile write cache a completed write is durable.
            if !self.ctrl.id.volatile_cache || self.read_only {
                return Ok(());
            }
            self.simple(Sqe::new(nvm::FLUSH, self.nsid), None, 0).await
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            check_request(self, offset, len)?;
            Ok(all_data(offset, len, self.size))
        })
    }

    fn truncate(&self, size: u64, _exact: bool, _prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { fixed_size(&self.name, self.size, size) })
    }

    fn format_specific(&self) -> Option<serde_json::Value> {
        let id = &self.ctrl.id;
        Some(serde_json::json!({
            "serial": id.serial, "model": id.model, "firmware": id.firmware,
            "namespace": self.nsid, "block-size": self.block, "max-transfer": self.max_transfer,
            "volatile-write-cache": id.volatile_cache, "io-queues": self.ctrl.io_queues,
            "write-zeroes": id.has_write_zeroes(), "dsm": id.has_dsm(),
            "resets": self.ctrl.resets.load(std::sync::atomic::Ordering::Relaxed),
            "poll": self.poll, "sgl": self.sgl,
        }))
    }
}

impl Driver for NvmeDriver {
    fn name(&self) -> &'static str {
        "nvme"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn probe_filename(&self, f: &str) -> u32 {
        if f.starts_with("nvme://") {
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
    fn nvme_uris() {
        assert_eq!(parse_filename("nvme://0000:01:00.0/1").unwrap(), ("0000:01:00.0".to_string(), 1));
        assert_eq!(parse_filename("nvme://01:00.0/2").unwrap(), ("0000:01:00.0".to_string(), 2));
        for bad in ["nvme://0000:01:00.0", "nvme://0000:01:00.0/x", "file://x", "nvme:///1"] {
            assert!(parse_filename(bad).is_err(), "{bad}");
        }
    }
}
