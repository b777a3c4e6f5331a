//! A shard's I/O queue pair: command slots (one per command id), the
//! future a request awaits, completion reaping (MSI-X eventfd read through
//! the shard's ring, or adaptive polling), the shard's buffer pool mapped
//! for DMA, PRP list pages and bounce buffers, and recovery after a
//! controller reset. One per shard per controller; never crosses threads.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use engine::aio::{AioFile, Backend};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::runtime::{BufPool, IoBuf};

use super::ctrl::Controller;
use super::dma::{build_prps, DmaBuf, PAGE};
use super::queue::Rings;
use super::spec::{Cqe, Sqe};

/// Entries per I/O queue (capped by CAP.MQES).
pub const IO_DEPTH: u16 = 256;
/// PRP entries in one list page: transfers up to 2 MiB + a page.
const PRP_PER_LIST: usize = PAGE / 8;
/// The status a command gets when the controller could not be recovered
/// (all status bits set: no status the device itself reports).
const FAILED: u16 = 0x7fff;
/// A command that has not completed in this many watchdog ticks (one a
/// second) means a hung controller.
const COMMAND_TIMEOUT_TICKS: u64 = 30;

/// What a command's memory is: the caller's buffer and, when that buffer
/// is not mapped for DMA, the bounce buffer the device uses instead. The
/// slot owns both while the command is in flight, so a request future
/// dropped mid-flight never frees memory the device may still write.
#[derive(Default)]
pub struct Held {
    pub buf: Option<IoBuf>,
    pub bounce: Option<DmaBuf>,
}

enum Slot {
    Free,
    /// `since`: the submission's sequence number (resubmission order) and
    /// the watchdog tick it was made in (its age, without reading a clock
    /// per command: in a guest without a usable TSC that read is a system
    /// call).
    Busy {
        sqe: Sqe,
        held: Held,
        waker: Option<Waker>,
        since: (u64, u64),
        abandoned: bool,
    },
    Done {
        cqe: Cqe,
        held: Held,
    },
}

pub struct IoQueue {
    pub ctrl: Arc<Controller>,
    rings: RefCell<Rings>,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u16>>,
    /// Requests waiting for a free command id.
    cid_waiters: RefCell<VecDeque<Waker>>,
    prp_lists: DmaBuf,
    in_flight: Cell<usize>,
    generation: Cell<u64>,
    /// The reaper, when it sleeps because nothing is in flight.
    idle: RefCell<Option<Waker>>,
    /// MSI-X eventfd of this queue's vector, read through the shard's ring.
    event: Option<Rc<AioFile>>,
    /// Poll the completion queue while commands are in flight instead of
    /// waiting for the interrupt.
    pub poll: bool,
    /// Describe data with one SGL descriptor instead of PRPs.
    sgl: bool,
    /// The shard's buffer pool and where it is mapped for the device.
    pool: Option<(Arc<BufPool>, u64)>,
    /// Bounce buffers not in use, by size.
    bounce_free: RefCell<Vec<DmaBuf>>,
    /// Commands completed, and how many of them were resubmitted after a reset.
    pub completed: Cell<u64>,
    pub resubmitted: Cell<u64>,
    /// Submissions so far, and watchdog ticks (seconds) so far.
    seq: Cell<u64>,
    tick: Cell<u64>,
    /// The controller could not be recovered: commands fail at once.
    broken: Cell<bool>,
}

impl IoQueue {
    /// Make this shard's queue pair on the controller and start its reaper.
    pub fn new(ctrl: &Arc<Controller>, poll: bool, sgl: bool) -> Result<Rc<IoQueue>> {
        let qid = ctrl.take_qid()?;
        match IoQueue::build(ctrl, qid, poll, sgl) {
            Ok(q) => Ok(q),
            Err(e) => {
                ctrl.put_qid(qid);
                Err(e)
            }
        }
    }

    fn build(ctrl: &Arc<Controller>, qid: u16, poll: bool, sgl: bool) -> Result<Rc<IoQueue>> {
        let depth = IO_DEPTH.min(ctrl.cap.max_queue_entries.min(u32::from(u16::MAX)) as u16);
        let mut rings = Rings::new(&ctrl.dma, &ctrl.dev, ctrl.cap.doorbell_stride, qid, depth)?;
        // Command ids 0..depth-1: one fewer than the entries, so the SQ can
        // never fill up.
        let ids = depth - 1;
        let prp_lists = DmaBuf::new(&ctrl.dma, usize::from(ids) * PAGE)?;
        let event = match ctrl.vector(qid) {
            Some(fd) => {
                // SAFETY: dup of an eventfd the controller keeps open.
                let dup = unsafe { libc::dup(fd) };
                if dup < 0 {
                    return Err(Error::os("dup of an MSI-X eventfd", std::io::Error::last_os_error()));
                }
                // SAFETY: the dup is a new fd nothing else owns.
                Some(Rc::new(AioFile::new(unsafe { OwnedFd::from_raw_fd(dup) }, Backend::IoUring)))
            }
            None => None,
        };
        let pool = match engine::runtime::current_pool() {
            Some(p) => {
                let (base, len) = p.region();
                Some((p.clone(), ctrl.dma.map(base, len, false)?))
            }
            None => None,
        };
        let generation = match ctrl.create_io_queue(&mut rings) {
            Ok(g) => g,
            Err(e) => {
                // Nothing points at the pool yet: unmap it, or a retry
                // would map it again and this mapping would outlive it.
                if let Some((_, iova)) = &pool {
                    ctrl.dma.unmap(*iova);
                }
                return Err(e);
            }
        };
        let q = Rc::new(IoQueue {
            ctrl: ctrl.clone(),
            rings: RefCell::new(rings),
            slots: RefCell::new((0..ids).map(|_| Slot::Free).collect()),
            free: RefCell::new((0..ids).rev().collect()),
            cid_waiters: RefCell::new(VecDeque::new()),
            prp_lists,
            in_flight: Cell::new(0),
            generation: Cell::new(generation),
            idle: RefCell::new(None),
            poll: poll || event.is_none(),
            sgl,
            event,
            pool,
            bounce_free: RefCell::new(Vec::new()),
            completed: Cell::new(0),
            resubmitted: Cell::new(0),
            seq: Cell::new(0),
            tick: Cell::new(0),
            broken: Cell::new(false),
        });
        engine::runtime::spawn_daemon(reaper(Rc::downgrade(&q)));
        engine::runtime::spawn_daemon(watchdog(Rc::downgrade(&q)));
        Ok(q)
    }

    pub fn qid(&self) -> u16 {
        self.rings.borrow().qid
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// The IOVA of `len` bytes at `p`, if the device may reach them: the
    /// shard's pool (zero copy) or the driver's own DMA memory. Anything
    /// else is refused here, before a command could carry it to the device.
    pub fn iova_of(&self, p: *const u8, len: usize) -> Result<u64> {
        if let Some((pool, iova)) = &self.pool {
            let (base, plen) = pool.region();
            let (a, b) = (p as usize, base as usize);
            if a >= b && a + len <= b + plen {
                return Ok(iova + (a - b) as u64);
            }
        }
        self.ctrl.dma.translate(p, len).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("buffer at {p:p} ({len} bytes) is not mapped for DMA: refused"),
            )
        })
    }

    /// A bounce buffer of at least `len` bytes.
    pub fn bounce(&self, len: usize) -> Result<DmaBuf> {
        let mut f = self.bounce_free.borrow_mut();
        if let Some(i) = f.iter().position(|b| b.len() >= len) {
            return Ok(f.swap_remove(i));
        }
        drop(f);
        DmaBuf::new(&self.ctrl.dma, len.next_power_of_two().max(PAGE))
    }

    pub fn give_back_bounce(&self, b: DmaBuf) {
        let mut f = self.bounce_free.borrow_mut();
        // Keep a few: enough for a queue's worth of small requests.
        if f.len() < 64 {
            f.push(b);
        }
    }

    /// Wait for a free command id.
    pub async fn acquire(self: &Rc<Self>) -> u16 {
        std::future::poll_fn(|cx| {
            if let Some(c) = self.free.borrow_mut().pop() {
                return Poll::Ready(c);
            }
            self.cid_waiters.borrow_mut().push_back(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Give back a command id that was never submitted.
    pub fn release_unused(&self, cid: u16) {
        self.release(cid);
    }

    fn release(&self, cid: u16) {
        self.slots.borrow_mut()[usize::from(cid)] = Slot::Free;
        self.free.borrow_mut().push(cid);
        self.wake_cid_waiters();
    }

    /// Every request waiting for a command id tries again: a waker may be
    /// stale (its future dropped) or repeated, so handing the one free id
    /// to one waker could leave a live waiter asleep. Waiting only happens
    /// with all 255 ids busy.
    fn wake_cid_waiters(&self) {
        let ws: Vec<Waker> = self.cid_waiters.borrow_mut().drain(..).collect();
        for w in ws {
            w.wake();
        }
    }

    /// Fill in the data pointer of `sqe` for `len` bytes at `iova`: one SGL
    /// descriptor, or PRPs with the command's own PRP list page when it
    /// needs one.
    pub fn set_data(&self, cid: u16, sqe: &mut Sqe, iova: u64, len: usize) -> Result<()> {
        if self.sgl {
            sqe.set_sgl(iova, len as u32);
            return Ok(());
        }
        let at = usize::from(cid) * PAGE;
        // SAFETY: the list page of a command id that is ours and not in
        // flight; the device reads it only after we submit.
        let page = unsafe { &mut self.prp_lists.bytes_mut()[at..at + PAGE] };
        // SAFETY: a page-aligned 4096-byte slice reinterpreted as 512 u64s.
        let list = unsafe { std::slice::from_raw_parts_mut(page.as_mut_ptr().cast::<u64>(), PRP_PER_LIST) };
        let (p1, p2) = build_prps(iova, len, list, self.prp_lists.iova + at as u64)?;
        sqe.set_prp(p1, p2);
        Ok(())
    }

    /// Submit `sqe` under command id `cid` (from `acquire`) and wait for its
    /// completion. Gives back what it held.
    pub fn submit(self: &Rc<Self>, cid: u16, mut sqe: Sqe, held: Held) -> Exec {
        sqe.set_cid(cid);
        if self.broken.get() {
            let cqe = Cqe { cid, status: super::spec::Status(FAILED), ..Default::default() };
            self.slots.borrow_mut()[usize::from(cid)] = Slot::Done { cqe, held };
            return Exec { q: self.clone(), cid, done: false };
        }
        self.slots.borrow_mut()[usize::from(cid)] =
            Slot::Busy { sqe, held, waker: None, since: (self.seq.get(), self.tick.get()), abandoned: false };
        self.seq.set(self.seq.get() + 1);
        self.in_flight.set(self.in_flight.get() + 1);
        if self.generation.get() == self.ctrl.generation() {
            let mut r = self.rings.borrow_mut();
            r.push(&sqe);
            r.ring_sq();
        }
        // else: the reaper remakes the queue and resubmits every busy slot.
        if let Some(w) = self.idle.borrow_mut().take() {
            w.wake();
        }
        Exec { q: self.clone(), cid, done: false }
    }

    /// Reap what the device completed. Returns how many commands it
    /// finished (completions for ids not in flight, which a misbehaving or
    /// just-reset device might post, are dropped and not counted).
    pub fn reap(&self) -> usize {
        let mut n = 0;
        let mut freed = false;
        let mut wake = Vec::new();
        {
            let mut r = self.rings.borrow_mut();
            let mut slots = self.slots.borrow_mut();
            while let Some(c) = r.pop() {
                let Some(slot) = slots.get_mut(usize::from(c.cid)) else { continue };
                match std::mem::replace(slot, Slot::Free) {
                    Slot::Busy { abandoned: true, .. } => {
                        // Nobody waits: the memory it held goes now, the id
                        // back to the free list.
                        self.free.borrow_mut().push(c.cid);
                        freed = true;
                        n += 1;
                    }
                    Slot::Busy { held, waker, .. } => {
                        *slot = Slot::Done { cqe: c, held };
                        wake.extend(waker);
                        n += 1;
                    }
                    other => *slot = other,
                }
            }
            r.ring_cq();
        }
        self.in_flight.set(self.in_flight.get() - n.min(self.in_flight.get()));
        self.completed.set(self.completed.get() + n as u64);
        if freed {
            self.wake_cid_waiters();
        }
        for w in wake {
            w.wake();
        }
        n
    }

    /// After a controller reset: make the queue pair again and resubmit,
    /// oldest first, every command still in flight.
    fn recover(&self) -> Result<()> {
        let mut r = self.rings.borrow_mut();
        let generation = self.ctrl.create_io_queue(&mut r)?;
        self.generation.set(generation);
        // Resubmitted commands start their timeout afresh.
        let tick = self.tick.get();
        let mut busy: Vec<((u64, u64), Sqe)> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(|s| match s {
                Slot::Busy { sqe, since, .. } => {
                    since.1 = tick;
                    Some((*since, *sqe))
                }
                _ => None,
            })
            .collect();
        busy.sort_by_key(|b| b.0);
        for (_, sqe) in &busy {
            r.push(sqe);
        }
        if !busy.is_empty() {
            r.ring_sq();
        }
        self.resubmitted.set(self.resubmitted.get() + busy.len() as u64);
        Ok(())
    }

    /// Fail every command in flight, and every later one: the controller
    /// could not be recovered (and its bus mastering is off, so the memory
    /// the commands held is safe to hand back).
    fn fail_all(&self, errno: i32) {
        self.broken.set(true);
        self.generation.set(self.ctrl.generation());
        let mut wake = Vec::new();
        for (cid, slot) in self.slots.borrow_mut().iter_mut().enumerate() {
            if let Slot::Busy { held, waker, abandoned, .. } = std::mem::replace(slot, Slot::Free) {
                let status = super::spec::Status(FAILED);
                let cqe = Cqe { cid: cid as u16, status, result: errno as u32, ..Default::default() };
                if abandoned {
                    self.free.borrow_mut().push(cid as u16);
                } else {
                    *slot = Slot::Done { cqe, held };
                    wake.extend(waker);
                }
            }
        }
        self.in_flight.set(0);
        self.wake_cid_waiters();
        for w in wake {
            w.wake();
        }
    }

    /// The oldest command in flight has waited this many ticks.
    fn oldest(&self) -> Option<u64> {
        self.slots
            .borrow()
            .iter()
            .filter_map(|s| match s {
                Slot::Busy { since, .. } => Some(self.tick.get() - since.1),
                _ => None,
            })
            .max()
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // A reaper waiting for the interrupt or for work wakes, finds us
        // gone and ends.
        if let Some(w) = self.idle.borrow_mut().take() {
            w.wake();
        }
        if let Some(f) = &self.event {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to our own eventfd.
            let _ = unsafe { libc::write(f.fd(), one.as_ptr().cast(), 8) };
        }
        let qid = self.rings.borrow().qid;
        if !self.ctrl.delete_io_queue(qid, self.generation.get()) {
            // The controller would not delete the queue: it may still read
            // the SQ and PRP lists and move data for commands nobody waits
            // for. Cut its bus mastering before all that memory is freed.
            self.ctrl.stop_dma();
        }
        self.ctrl.put_qid(qid);
        if let Some((_, iova)) = &self.pool {
            self.ctrl.dma.unmap(*iova);
        }
    }
}

/// A submitted command's completion.
pub struct Exec {
    q: Rc<IoQueue>,
    cid: u16,
    done: bool,
}

impl Future for Exec {
    type Output = (Result<Cqe>, Held);
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let cid = usize::from(self.cid);
        let mut slots = self.q.slots.borrow_mut();
        match &mut slots[cid] {
            Slot::Busy { waker, .. } => {
                *waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Slot::Done { .. } => {
                let Slot::Done { cqe, held } = std::mem::replace(&mut slots[cid], Slot::Free) else { unreachable!() };
                drop(slots);
                self.done = true;
                self.q.release(self.cid);
                let r = if cqe.status.ok() {
                    Ok(cqe)
                } else if cqe.status.0 == FAILED {
                    Err(Error::new(ErrorKind::Io, "NVMe command failed: the controller could not be recovered"))
                } else {
                    Err(Error::os(
                        &format!("NVMe command failed: {}", cqe.status),
                        std::io::Error::from_raw_os_error(cqe.status.errno()),
                    ))
                };
                Poll::Ready((r, held))
            }
            Slot::Free => unreachable!("command {cid} awaited while free"),
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut slots = self.q.slots.borrow_mut();
        match &mut slots[usize::from(self.cid)] {
            Slot::Busy { abandoned, .. } => *abandoned = true,
            Slot::Done { .. } => {
                drop(slots);
                self.q.release(self.cid);
            }
            Slot::Free => {}
        }
    }
}

/// The shard's completion loop for one queue: reap, then wait for more
/// (MSI-X eventfd through the ring, or polling while commands flow), sleep
/// when nothing is in flight; remake the queue after a controller reset.
/// Holds the queue only between waits, so a queue nobody uses any more
/// goes, and its reaper with it.
async fn reaper(weak: std::rc::Weak<IoQueue>) {
    let mut ev = IoBuf::heap(8);
    loop {
        let Some(q) = weak.upgrade() else { return };
        if q.generation.get() != q.ctrl.generation() {
            // A queue failed before gets another try with each new reset.
            match q.recover() {
                Ok(()) => q.broken.set(false),
                Err(e) => {
                    eprintln!("ringblk: NVMe queue {}: {e}", q.qid());
                    q.fail_all(libc::EIO);
                }
            }
        }
        let got = q.reap();
        if q.in_flight() == 0 {
            // Sleep until a submission (or a reset) wakes us.
            drop(q);
            std::future::poll_fn(|cx| {
                let Some(q) = weak.upgrade() else { return Poll::Ready(()) };
                if q.in_flight() > 0 || q.generation.get() != q.ctrl.generation() {
                    return Poll::Ready(());
                }
                *q.idle.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            continue;
        }
        match (&q.event, q.poll) {
            (Some(f), false) if got == 0 => {
                let f = f.clone();
                drop(q);
                // Wait for the interrupt. A count left over from completions
                // already reaped costs one extra turn, no more.
                let (r, b) = f.read(ev, 0, 8, 0).await;
                ev = b;
                if r.is_err() {
                    engine::runtime::sleep(Duration::from_millis(1)).await;
                }
            }
            _ => {
                drop(q);
                engine::runtime::yield_now().await;
            }
        }
    }
}

/// Once a second: a command older than COMMAND_TIMEOUT, or a controller in
/// fatal status, resets the controller (every shard's reaper then remakes
/// its queue and resubmits).
async fn watchdog(weak: std::rc::Weak<IoQueue>) {
    loop {
        engine::runtime::sleep(Duration::from_secs(1)).await;
        let Some(q) = weak.upgrade() else { return };
        q.tick.set(q.tick.get() + 1);
        if q.in_flight() == 0 {
            continue;
        }
        let why = match q.oldest() {
            Some(age) if age > COMMAND_TIMEOUT_TICKS => format!("a command waited {age} s"),
            _ if q.ctrl.failed() => "controller fatal status".to_string(),
            _ => continue,
        };
        if let Err(e) = q.ctrl.reset(q.generation.get(), &why) {
            eprintln!("ringblk: {e}");
            q.fail_all(libc::EIO);
        }
    }
}

/// Validate a request against the namespace: block aligned, in range.
pub fn check_blocks(offset: u64, len: u64, block: u32, size: u64) -> Result<()> {
    let b = u64::from(block);
    if !offset.is_multiple_of(b) || !len.is_multiple_of(b) {
        return Err(
            invalid(format!("request at {offset} of {len} bytes is not aligned to the {block}-byte blocks")).at(offset)
        );
    }
    if offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(Error::new(
            ErrorKind::OutOfBounds,
            format!("request at {offset} of {len} bytes ends beyond {size}"),
        )
        .at(offset));
    }
    Ok(())
}
