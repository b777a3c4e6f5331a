//! The `nvme-passthru` protocol driver: NVMe read, write and flush commands
//! through the kernel's generic NVMe character device (`/dev/ngXnY`) with
//! io_uring passthrough (IORING_OP_URING_CMD, NVME_URING_CMD_IO). The
//! controller stays bound to the kernel's nvme driver; the block layer is
//! skipped. Each shard has its own ring with 128-byte entries (the command
//! rides in the entry) and 32-byte completions, its buffer pool registered
//! as fixed buffers, and an eventfd the ring signals, read through the
//! shard's main ring. Requests must be whole blocks (it is a benchmark
//! backend, not a general protocol: unaligned requests are refused).

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use engine::aio::{AioFile, Backend};
use engine::block::{
    check_request, check_write, write_zero_buffers, BlockNode, BoxFuture, Driver, DriverKind, Extent, Limits,
};
use engine::block::{OpenCtx, Prealloc, WriteFlags, ZeroFlags};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::{BufPool, IoBuf, ShardLocal};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::io::check_blocks;
use super::spec::nvm;
use super::{all_data, fixed_size, take_ignored};

/// `_IOWR('N', 0x80, struct nvme_uring_cmd)`: an I/O command on a namespace.
const NVME_URING_CMD_IO: u32 = 0xc048_4e80;
/// `_IO('N', 0x40)`: the namespace id of a namespace device.
const NVME_IOCTL_ID: libc::c_ulong = 0x4e40;
const RING_DEPTH: u32 = 128;

/// `struct nvme_uring_cmd` (72 bytes, native endian: it is read by the
/// kernel, which builds the wire command from it).
///
/// | offset | size | field         |
/// |--------|------|---------------|
/// | 0      | 1    | opcode        |
/// | 1      | 1    | flags         |
/// | 4      | 4    | nsid          |
/// | 16     | 8    | metadata      |
/// | 24     | 8    | addr (data)   |
/// | 32     | 4    | metadata_len  |
/// | 36     | 4    | data_len      |
/// | 40     | 24   | cdw10..cdw15  |
/// | 64     | 4    | timeout_ms    |
fn uring_cmd(opcode: u8, nsid: u32, addr: u64, len: u32, cdw: [u32; 6]) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[0] = opcode;
    c[4..8].copy_from_slice(&nsid.to_ne_bytes());
    c[24..32].copy_from_slice(&addr.to_ne_bytes());
    c[36..40].copy_from_slice(&len.to_ne_bytes());
    for (i, d) in cdw.iter().enumerate() {
        c[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_ne_bytes());
    }
    c
}

enum Slot {
    Free,
    Busy { waker: Option<Waker>, buf: Option<IoBuf>, abandoned: bool },
    Done { res: i32, buf: Option<IoBuf> },
}

/// A shard's passthrough ring.
struct PtRing {
    ring: RefCell<IoUring<squeue::Entry128, cqueue::Entry32>>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<usize>>,
    waiting: RefCell<Vec<Waker>>,
    in_flight: Cell<usize>,
    /// Entries pushed since the last submit, and whether a flush task is
    /// already queued for this turn.
    unsubmitted: Cell<u32>,
    flush_queued: Cell<bool>,
    idle: RefCell<Option<Waker>>,
    event: Rc<AioFile>,
    pool: Option<Arc<BufPool>>,
}

impl PtRing {
    fn new() -> Result<Rc<PtRing>> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry32>::builder()
            .build(RING_DEPTH)
            .map_err(|e| Error::os("io_uring with 128-byte entries (NVMe passthrough needs Linux 5.19)", e))?;
        // Blocking: io_uring answers a read of a non-blocking fd with
        // EAGAIN at once instead of waiting.
        // SAFETY: plain eventfd creation; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::os("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: a new fd we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd()).map_err(|e| Error::os("IORING_REGISTER_EVENTFD", e))?;
        // The shard's pool as fixed buffers: the kernel maps them once.
        let pool = engine::runtime::current_pool().filter(|p| {
            let iov = p.iovecs();
            // SAFETY: the iovecs point into the pool, which PtRing keeps
            // alive (the `pool` field) as long as the ring.
            unsafe { ring.submitter().register_buffers(&iov) }.is_ok()
        });
        let n = RING_DEPTH as usize;
        Ok(Rc::new(PtRing {
            ring: RefCell::new(ring),
            slots: RefCell::new((0..n).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..n).rev().collect()),
            waiting: RefCell::new(Vec::new()),
            in_flight: Cell::new(0),
            unsubmitted: Cell::new(0),
            flush_queued: Cell::new(false),
            idle: RefCell::new(None),
            event: Rc::new(AioFile::new(efd, Backend::IoUring)),
            pool,
        }))
    }

    fn submit_now(self: &Rc<Self>) {
        self.flush_queued.set(false);
        let n = self.unsubmitted.replace(0);
        if n > 0 && self.ring.borrow().submit().is_err() {
            // EBUSY/EAGAIN (completions to reap first, or no memory): the
            // entries stay queued; try again next turn.
            self.unsubmitted.set(n);
            self.queue_flush(true);
        }
    }

    /// Submit what is queued once the tasks ready in this turn have run
    /// (they may queue more): one io_uring_enter per turn. `later`: after
    /// a yield, so completions get reaped first.
    fn queue_flush(self: &Rc<Self>, later: bool) {
        if !self.flush_queued.replace(true) {
            let me = self.clone();
            engine::runtime::spawn_local(async move {
                if later {
                    engine::runtime::yield_now().await;
                }
                me.submit_now()
            });
        }
    }

    /// Drain the completion queue.
    fn reap(&self) -> usize {
        let mut done = Vec::new();
        {
            let mut r = self.ring.borrow_mut();
            for c in r.completion() {
                done.push((c.user_data() as usize, c.result()));
            }
        }
        let mut wake = Vec::new();
        for &(k, res) in &done {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(k) else { continue };
            match std::mem::replace(s, Slot::Free) {
                Slot::Busy { abandoned: true, .. } => {
                    self.free.borrow_mut().push(k);
                    // Every waiter tries again (a waker may be stale).
                    wake.extend(self.waiting.borrow_mut().drain(..));
                }
                Slot::Busy { waker, buf, .. } => {
                    *s = Slot::Done { res, buf };
                    wake.extend(waker);
                }
                other => *s = other,
            }
        }
        self.in_flight.set(self.in_flight.get() - done.len().min(self.in_flight.get()));
        for w in wake {
            w.wake();
        }
        done.len()
    }
}

async fn reaper(weak: std::rc::Weak<PtRing>) {
    let mut ev = IoBuf::heap(8);
    loop {
        let Some(q) = weak.upgrade() else { return };
        q.reap();
        if q.in_flight() == 0 {
            drop(q);
            std::future::poll_fn(|cx| {
                let Some(q) = weak.upgrade() else { return Poll::Ready(()) };
                if q.in_flight() > 0 {
                    return Poll::Ready(());
                }
                *q.idle.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            continue;
        }
        let f = q.event.clone();
        drop(q);
        let (r, b) = f.read(ev, 0, 8, 0).await;
        ev = b;
        if r.is_err() {
            engine::runtime::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

impl PtRing {
    fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Run one passthrough command; `buf` is the data (if any).
    async fn exec(self: &Rc<Self>, fd: RawFd, cmd: [u8; 80], buf: Option<IoBuf>) -> (Result<()>, Option<IoBuf>) {
        let key = std::future::poll_fn(|cx| {
            if let Some(k) = self.free.borrow_mut().pop() {
                return Poll::Ready(k);
            }
            self.waiting.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let fixed = match (&buf, &self.pool) {
            (Some(b), Some(p)) => b.fixed_index(p.id()),
            _ => None,
        };
        let mut op = opcode::UringCmd80::new(types::Fd(fd), NVME_URING_CMD_IO).cmd(cmd);
        if let Some(i) = fixed {
            op = op.buf_index(Some(i));
        }
        let sqe = op.build().user_data(key as u64);
        self.slots.borrow_mut()[key] = Slot::Busy { waker: None, buf, abandoned: false };
        // The SQ has as many entries as there are slots, and a slot is
        // taken above: there is always room.
        // SAFETY: the command's data buffer is owned by the slot until the
        // completion is reaped; the command bytes are copied in.
        let pushed = unsafe { self.ring.borrow_mut().submission().push(&sqe) };
        debug_assert!(pushed.is_ok(), "passthrough SQ full with a free slot");
        self.in_flight.set(self.in_flight.get() + 1);
        self.unsubmitted.set(self.unsubmitted.get() + 1);
        self.queue_flush(false);
        if let Some(w) = self.idle.borrow_mut().take() {
            w.wake();
        }
        let mut guard = Guard { q: self.clone(), key, done: false };
        let (res, buf) = std::future::poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            match &mut slots[key] {
                Slot::Busy { waker, .. } => {
                    *waker = Some(cx.waker().clone());
                    Poll::Pending
                }
                s => match std::mem::replace(s, Slot::Free) {
                    Slot::Done { res, buf } => Poll::Ready((res, buf)),
                    _ => unreachable!("passthrough slot {key} free while awaited"),
                },
            }
        })
        .await;
        guard.done = true;
        self.free.borrow_mut().push(key);
        let ws: Vec<Waker> = self.waiting.borrow_mut().drain(..).collect();
        for w in ws {
            w.wake();
        }
        let r = match res {
            0 => Ok(()),
            e if e < 0 => Err(Error::errno("NVMe passthrough command", -e)),
            status => Err(Error::new(
                ErrorKind::Io,
                format!("NVMe passthrough command failed: {}", super::spec::Status(status as u16)),
            )),
        };
        (r, buf)
    }
}

/// Marks a command abandoned if its future is dropped before completion.
struct Guard {
    q: Rc<PtRing>,
    key: usize,
    done: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut slots = self.q.slots.borrow_mut();
        match &mut slots[self.key] {
            Slot::Busy { abandoned, .. } => *abandoned = true,
            s => {
                *s = Slot::Free;
                drop(slots);
                self.q.free.borrow_mut().push(self.key);
            }
        }
    }
}

impl Drop for PtRing {
    /// The kernel tears the ring down in the background and may still be
    /// moving data for commands nobody waits for: their buffers are leaked
    /// rather than freed under it.
    fn drop(&mut self) {
        for s in self.slots.get_mut().iter_mut() {
            if let Slot::Busy { buf, .. } = s {
                std::mem::forget(buf.take());
            }
        }
        if let Some(w) = self.idle.get_mut().take() {
            w.wake();
        }
    }
}

pub struct PassthruDriver;

pub struct PassthruNode {
    file: std::fs::File,
    name: String,
    nsid: u32,
    block: u32,
    size: u64,
    max_transfer: usize,
    read_only: bool,
    rings: ShardLocal<PtRing>,
}

/// `/dev/ngXnY` -> `nvmeXnY`, the block device of the same namespace.
fn block_name(path: &str) -> Result<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.strip_prefix("ng")
        .map(|r| format!("nvme{r}"))
        .ok_or_else(|| invalid(format!("'{path}' is not an NVMe generic device (/dev/ngXnY)")))
}

fn sysfs_u64(p: &str) -> Result<u64> {
    let s = std::fs::read_to_string(p).map_err(|e| Error::os(p, e))?;
    s.trim().parse().map_err(|_| invalid(format!("{p}: not a number: {s}")))
}

impl PassthruNode {
    fn ring(&self) -> Result<Rc<PtRing>> {
        if let Some(r) = self.rings.get() {
            return Ok(r);
        }
        let r = PtRing::new().map_err(|e| e.with_file(&self.name))?;
        engine::runtime::spawn_daemon(reaper(Rc::downgrade(&r)));
        self.rings.set(r.clone());
        Ok(r)
    }

    async fn rw(&self, op: u8, offset: u64, mut buf: IoBuf, flags: u32) -> (Result<()>, IoBuf) {
        let len = buf.len() as u64;
        if let Err(e) = check_blocks(offset, len, self.block, self.size) {
            return (Err(e.with_file(&self.name)), buf);
        }
        let q = match self.ring() {
            Ok(q) => q,
            Err(e) => return (Err(e), buf),
        };
        let mut done = 0usize;
        while (done as u64) < len {
            let n = (len as usize - done).min(self.max_transfer);
            let lba = (offset + done as u64) / u64::from(self.block);
            let nlb = (n / self.block as usize) as u32 - 1;
            // SAFETY: done + n <= buf.len().
            let addr = unsafe { buf.as_mut_ptr().add(done) } as u64;
            let cmd = uring_cmd(op, self.nsid, addr, n as u32, [lba as u32, (lba >> 32) as u32, nlb | flags, 0, 0, 0]);
            let (r, b) = q.exec(self.file.as_raw_fd(), cmd, Some(buf)).await;
            buf = b.expect("the command gives back its buffer");
            if let Err(e) = r {
                return (Err(e.with_file(&self.name).at(offset + done as u64)), buf);
            }
            done += n;
        }
        (Ok(()), buf)
    }
}

impl BlockNode for PassthruNode {
    fn driver(&self) -> &'static str {
        "nvme-passthru"
    }
    fn filename(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: self.block, mem_alignment: 4, max_transfer: self.max_transfer as u64 }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(self.rw(nvm::READ, offset, buf, 0))
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_write(self, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            self.rw(nvm::WRITE, offset, buf, if flags.fua { nvm::FUA } else { 0 }).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            write_zero_buffers(self, offset, len, flags.fua).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { check_write(self, offset, len) })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            let q = self.ring()?;
            let cmd = uring_cmd(nvm::FLUSH, self.nsid, 0, 0, [0; 6]);
            q.exec(self.file.as_raw_fd(), cmd, None).await.0.map_err(|e| e.with_file(&self.name))
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
}

impl PassthruDriver {
    async fn open(&self, ctx: &OpenCtx, mut opts: OptionTree) -> Result<Arc<dyn BlockNode>> {
        let name =
            opts.take("filename").ok_or_else(|| invalid("driver 'nvme-passthru' needs a 'filename' (/dev/ngXnY)"))?;
        take_ignored(&mut opts);
        opts.ensure_consumed("The 'nvme-passthru' block driver")?;
        let blk = block_name(&name)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(ctx.flags.write)
            .open(&name)
            .map_err(|e| Error::os("open", e).with_file(&name))?;
        let nsid = ioctl_id(&file).map_err(|e| e.with_file(&name))?;
        let block = sysfs_u64(&format!("/sys/block/{blk}/queue/logical_block_size"))? as u32;
        let size = sysfs_u64(&format!("/sys/block/{blk}/size"))? * 512;
        let max_kb = sysfs_u64(&format!("/sys/block/{blk}/queue/max_hw_sectors_kb")).unwrap_or(128);
        let max_transfer = ((max_kb as usize) << 10).min(1 << 20);
        Ok(Arc::new(PassthruNode {
            file,
            name,
            nsid,
            block,
            size,
            max_transfer,
            read_only: !ctx.flags.write,
            rings: ShardLocal::default(),
        }))
    }
}

fn ioctl_id(f: &std::fs::File) -> Result<u32> {
    // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), NVME_IOCTL_ID) };
    if r <= 0 {
        return Err(Error::os("NVME_IOCTL_ID", std::io::Error::last_os_error()));
    }
    Ok(r as u32)
}

impl Driver for PassthruDriver {
    fn name(&self) -> &'static str {
        "nvme-passthru"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }
    fn open_protocol<'a>(&'a self, ctx: &'a OpenCtx, opts: OptionTree) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(self.open(ctx, opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uring_cmd_layout() {
        let c = uring_cmd(nvm::READ, 1, 0x1000, 4096, [8, 0, 7, 0, 0, 0]);
        assert_eq!(c[0], nvm::READ);
        assert_eq!(u32::from_ne_bytes(c[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_ne_bytes(c[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u32::from_ne_bytes(c[36..40].try_into().unwrap()), 4096);
        assert_eq!(u32::from_ne_bytes(c[48..52].try_into().unwrap()), 7);
        // _IOWR('N', 0x80, 72 bytes)
        assert_eq!(NVME_URING_CMD_IO, (3 << 30) | (72 << 16) | (u32::from(b'N') << 8) | 0x80);
    }

    #[test]
    fn generic_device_names() {
        assert_eq!(block_name("/dev/ng0n1").unwrap(), "nvme0n1");
        assert!(block_name("/dev/nvme0n1").is_err());
    }
}
