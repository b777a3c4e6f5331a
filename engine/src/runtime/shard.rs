//! One shard: a thread with its own io_uring, a single-threaded executor, a slab of
//! in-flight operations keyed by `user_data`, a registered buffer pool, a table of
//! registered files and a mailbox other threads post work to. It owns the event
//! loop; it does not know what the operations mean (see `op.rs` and `aio/`).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use crossbeam_queue::SegQueue;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;

use super::buf::BufPool;
use super::RuntimeConfig;
use crate::aio::native::NativeCtx;

/// user_data tags that are not slab keys.
const TAG_WAKE: u64 = u64::MAX;
const TAG_NATIVE: u64 = u64::MAX - 1;
const TAG_IGNORE: u64 = u64::MAX - 2;

/// Registered-file slots per ring; files beyond that use their plain fd.
const FILE_SLOTS: u32 = 64;

static NEXT_SHARD_UID: AtomicU64 = AtomicU64::new(1);

type Job = Box<dyn FnOnce() + Send>;

/// The part of a shard other threads may touch: its mailbox and wake-up.
pub(crate) struct ShardShared {
    pub(crate) index: usize,
    pub(crate) uid: u64,
    eventfd: OwnedFd,
    /// Set by the first remote poster since the shard last consumed the eventfd;
    /// later posters skip the write(2). Reset before draining (see `drain_remote`).
    notified: AtomicBool,
    jobs: SegQueue<Job>,
    wakes: SegQueue<usize>,
    pub(crate) shutdown: AtomicBool,
}

impl ShardShared {
    pub(crate) fn new(index: usize) -> std::io::Result<Arc<ShardShared>> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(ShardShared {
            index,
            uid: NEXT_SHARD_UID.fetch_add(1, Ordering::Relaxed),
            // SAFETY: fd was just created and is owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            notified: AtomicBool::new(false),
            jobs: SegQueue::new(),
            wakes: SegQueue::new(),
            shutdown: AtomicBool::new(false),
        }))
    }

    pub(crate) fn notify(&self) {
        // SeqCst pairs with the reset in drain_remote: a poster either sees `false`
        // and writes the eventfd, or its push happened before the reset and the
        // drain that follows the reset sees it.
        if !self.notified.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd.
            unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    pub(crate) fn post(&self, job: Job) {
        self.jobs.push(job);
        self.notify();
    }
}

pub(crate) enum OpSlot {
    Waiting(Option<Waker>),
    Done(i32),
    /// The future was dropped mid-flight: keep what the kernel may still touch
    /// until the completion is reaped.
    Abandoned(Box<dyn std::any::Any>),
    /// Writes sent as one vectored write (RuntimeConfig::merge_writes): its
    /// completion completes each member (slot key, length) with its share.
    /// The iovecs live here until then.
    Group(Vec<(usize, u32)>, Box<[libc::iovec]>),
}

/// Writes queued in this turn that follow each other in one file, not yet
/// in the SQ: they go out as one vectored write when the turn submits.
pub(crate) struct MergeWindow {
    pub(crate) target: Result<types::Fixed, types::Fd>,
    /// Where the first write starts and the last ends.
    pub(crate) off: u64,
    pub(crate) end: u64,
    pub(crate) rw_flags: i32,
    /// (op slot key, data, length, fixed-buffer index) in file order.
    pub(crate) members: Vec<(usize, *const u8, u32, Option<u16>)>,
}

/// At most this many writes, and this many bytes, in one vectored write.
const MERGE_MAX_WRITES: usize = 64;
const MERGE_MAX_BYTES: u64 = 1 << 20;

fn same_target(a: &Result<types::Fixed, types::Fd>, b: &Result<types::Fixed, types::Fd>) -> bool {
    match (a, b) {
        (Ok(x), Ok(y)) => x.0 == y.0,
        (Err(x), Err(y)) => x.0 == y.0,
        _ => false,
    }
}

struct TaskSlot {
    fut: Option<Pin<Box<dyn Future<Output = ()>>>>,
    waker: Waker,
    /// Background work (cache cleaning timers) that does not keep the shard
    /// alive: at shutdown, once only daemons are left, they are dropped.
    daemon: bool,
}

struct TaskWaker {
    task: usize,
    shared: Arc<ShardShared>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let local = CURRENT.with(|c| match &*c.borrow() {
            Some(s) if s.shared.uid == self.shared.uid => {
                s.ready.borrow_mut().push_back(self.task);
                true
            }
            _ => false,
        });
        if !local {
            self.shared.wakes.push(self.task);
            self.shared.notify();
        }
    }
}

pub(crate) struct Shard {
    pub(crate) shared: Arc<ShardShared>,
    // Field order is drop order: the ring goes before the pool it registered.
    ring: RefCell<IoUring>,
    pub(crate) pool: Arc<BufPool>,
    pub(crate) pool_registered: bool,
    pub(crate) ops: RefCell<Slab<OpSlot>>,
    tasks: RefCell<Slab<TaskSlot>>,
    daemons: Cell<usize>,
    /// Sleeps in flight: they count as operations for shutdown, not as work
    /// worth busy-polling for.
    pub(crate) timers: Cell<usize>,
    ready: RefCell<VecDeque<usize>>,
    /// Entries pushed to the SQ since the last io_uring_enter.
    unsubmitted: Cell<u32>,
    /// Bytes the reads and writes among them move.
    unsubmitted_bytes: Cell<u64>,
    poll_mode: bool,
    /// RuntimeConfig::submit_batch.
    submit_batch: u32,
    /// RuntimeConfig::submit_bytes.
    submit_bytes: u64,
    /// RuntimeConfig::merge_writes.
    pub(crate) merge_writes: bool,
    /// The kernel flags pending task work in the SQ (IORING_SETUP_TASKRUN_FLAG):
    /// a turn with nothing to submit and nothing flagged skips io_uring_enter.
    taskrun_flag: bool,
    merge: RefCell<Option<MergeWindow>>,
    /// Writes that went out as part of a vectored write of several.
    merged: Cell<u64>,
    /// Targets of the eventfd reads that stay armed for the ring's lifetime. Leaked
    /// (16 bytes a shard) because the kernel may finish such a read while the ring
    /// is being torn down, after the shard's own memory is gone.
    wake_buf: &'static Cell<u64>,
    pub(crate) native: RefCell<Option<NativeCtx>>,
    native_buf: &'static Cell<u64>,
    /// (file uid, slot) for files registered with this ring.
    files: RefCell<Vec<(u64, u32)>>,
    free_file_slots: RefCell<Vec<u32>>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// The shard running on this thread, if any.
pub(crate) fn current() -> Option<Rc<Shard>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The shard running on this thread; panics off-shard with a message saying so.
pub(crate) fn expect_current() -> Rc<Shard> {
    current().expect("ringblk I/O must run on a runtime shard (use Runtime::block_on or spawn_on)")
}

impl Shard {
    pub(crate) fn build(shared: Arc<ShardShared>, cfg: &RuntimeConfig) -> std::io::Result<Rc<Shard>> {
        let mut b = IoUring::builder();
        b.setup_cqsize(cfg.ring_entries * 4);
        if cfg.poll {
            b.setup_sqpoll(cfg.sqpoll_idle_ms);
        } else {
            // Completions are only reaped by this thread, so the kernel need not
            // interrupt it to run task work; the flag tells us when some is
            // waiting (see submit).
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        let (ring, taskrun_flag) = match b.build(cfg.ring_entries) {
            Ok(r) => (r, !cfg.poll),
            // Kernels without COOP_TASKRUN: plain ring.
            Err(_) if !cfg.poll => (IoUring::new(cfg.ring_entries)?, false),
            Err(e) => return Err(e),
        };
        let pool = BufPool::new(cfg.buffers, cfg.buffer_size);
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs point into `pool`, which the shard keeps alive longer
        // than the ring (field order), so registered memory outlives its use.
        let pool_registered = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        let files_ok = ring.submitter().register_files_sparse(FILE_SLOTS).is_ok();
        let free_file_slots = if files_ok { (0..FILE_SLOTS).rev().collect() } else { Vec::new() };
        let shard = Rc::new(Shard {
            shared,
            ring: RefCell::new(ring),
            pool,
            pool_registered,
            ops: RefCell::new(Slab::with_capacity(cfg.ring_entries as usize)),
            tasks: RefCell::new(Slab::new()),
            daemons: Cell::new(0),
            timers: Cell::new(0),
            ready: RefCell::new(VecDeque::new()),
            unsubmitted: Cell::new(0),
            unsubmitted_bytes: Cell::new(0),
            poll_mode: cfg.poll,
            submit_batch: cfg.submit_batch,
            submit_bytes: cfg.submit_bytes,
            merge_writes: cfg.merge_writes,
            taskrun_flag,
            merge: RefCell::new(None),
            merged: Cell::new(0),
            wake_buf: Box::leak(Box::new(Cell::new(0))),
            native: RefCell::new(None),
            native_buf: Box::leak(Box::new(Cell::new(0))),
            files: RefCell::new(Vec::new()),
            free_file_slots: RefCell::new(free_file_slots),
        });
        Ok(shard)
    }

    pub(crate) fn enter(self: &Rc<Self>) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    pub(crate) fn leave() {
        CURRENT.with(|c| c.borrow_mut().take());
    }

    /// Queue an SQE; the loop submits everything queued in one io_uring_enter.
    pub(crate) fn push_sqe(&self, sqe: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        loop {
            // SAFETY: every SQE we build points at memory owned by its operation
            // (buffer in an Op or OpSlot::Abandoned, or a shard-owned Box) that
            // lives until the completion is reaped.
            if unsafe { ring.submission().push(sqe) }.is_ok() {
                self.unsubmitted.set(self.unsubmitted.get() + 1);
                return;
            }
            // SQ full: hand what we have to the kernel now to make room.
            let _ = ring.submit();
            self.unsubmitted.set(0);
            self.unsubmitted_bytes.set(0);
        }
    }

    /// Count the bytes of a read or write just queued (for submit_bytes).
    pub(crate) fn queued_bytes(&self, n: u64) {
        self.unsubmitted_bytes.set(self.unsubmitted_bytes.get() + n);
    }

    /// Queue a write to go out with the writes before it, if it follows them
    /// in the same file with the same flags; otherwise the window so far is
    /// pushed and this write starts the next. Returns the write's slot key.
    pub(crate) fn merge_write(
        &self,
        target: Result<types::Fixed, types::Fd>,
        off: u64,
        data: *const u8,
        len: u32,
        fixed: Option<u16>,
        rw_flags: i32,
    ) -> usize {
        let key = self.ops.borrow_mut().insert(OpSlot::Waiting(None));
        let member = (key, data, len, fixed);
        let mut w = self.merge.borrow_mut();
        let joins = w.as_ref().is_some_and(|w| {
            same_target(&w.target, &target)
                && w.end == off
                && w.rw_flags == rw_flags
                && w.members.len() < MERGE_MAX_WRITES
                && w.end - w.off + u64::from(len) <= MERGE_MAX_BYTES
        });
        let full = if let (true, Some(w)) = (joins, w.as_mut()) {
            w.end += u64::from(len);
            w.members.push(member);
            None
        } else {
            let next = MergeWindow { target, off, end: off + u64::from(len), rw_flags, members: vec![member] };
            w.replace(next)
        };
        // A window that cannot grow goes to the SQ now. Until then its
        // writes count toward neither submit_batch nor submit_bytes: a
        // stream of 64 KiB writes goes to the device 1 MiB at a time.
        let full =
            full.or_else(|| w.take_if(|w| w.members.len() == MERGE_MAX_WRITES || w.end - w.off >= MERGE_MAX_BYTES));
        drop(w);
        if let Some(full) = full {
            self.push_window(full);
        }
        key
    }

    /// Push the writes waiting in the merge window to the SQ.
    pub(crate) fn flush_merge(&self) {
        let w = self.merge.borrow_mut().take();
        if let Some(w) = w {
            self.push_window(w);
        }
    }

    fn push_window(&self, w: MergeWindow) {
        let sqe = if let [(key, ..)] = w.members[..] {
            crate::aio::uring::window_sqe(&w, None).user_data(key as u64)
        } else {
            self.merged.set(self.merged.get() + w.members.len() as u64);
            let iov: Box<[libc::iovec]> = w
                .members
                .iter()
                .map(|&(_, data, len, _)| libc::iovec { iov_base: data.cast_mut().cast(), iov_len: len as usize })
                .collect();
            let sqe = crate::aio::uring::window_sqe(&w, Some(&iov));
            let members = w.members.iter().map(|&(key, _, len, _)| (key, len)).collect();
            // The iovecs move with their box: the SQE's pointer stays good.
            let key = self.ops.borrow_mut().insert(OpSlot::Group(members, iov));
            sqe.user_data(key as u64)
        };
        self.push_sqe(&sqe);
        self.queued_bytes(w.end - w.off);
    }

    /// Writes sent as part of a vectored write of several so far.
    pub(crate) fn merged_writes(&self) -> u64 {
        self.merged.get()
    }

    /// Submit a tracked operation and return its slab key.
    pub(crate) fn submit_op(&self, sqe: squeue::Entry) -> usize {
        let key = self.ops.borrow_mut().insert(OpSlot::Waiting(None));
        self.push_sqe(&sqe.user_data(key as u64));
        key
    }

    /// Mark an operation complete; called for io_uring CQEs and Linux AIO events.
    pub(crate) fn complete_op(&self, key: usize, res: i32) {
        let mut ops = self.ops.borrow_mut();
        let Some(slot) = ops.get_mut(key) else { return };
        match std::mem::replace(slot, OpSlot::Done(res)) {
            OpSlot::Waiting(w) => {
                drop(ops);
                if let Some(w) = w {
                    w.wake();
                }
            }
            OpSlot::Abandoned(keep) => {
                ops.remove(key);
                drop(ops);
                // Now the kernel is done with it: free buffers (back to the pool).
                drop(keep);
            }
            OpSlot::Group(members, iov) => {
                ops.remove(key);
                drop(ops);
                // In file order: each member gets what of it was written. A
                // member past a short write is told to try again (EINTR), and
                // its retry meets whatever cut the write short.
                let mut left = res;
                for (k, len) in members {
                    let r = if res < 0 {
                        res
                    } else if left > 0 {
                        let n = left.min(i32::try_from(len).unwrap_or(i32::MAX));
                        left -= n;
                        n
                    } else {
                        -libc::EINTR
                    };
                    self.complete_op(k, r);
                }
                drop(iov);
            }
            OpSlot::Done(_) => unreachable!("operation {key} completed twice"),
        }
    }

    pub(crate) fn spawn_local(&self, fut: Pin<Box<dyn Future<Output = ()>>>) {
        self.spawn_task(fut, false);
    }

    pub(crate) fn spawn_daemon(&self, fut: Pin<Box<dyn Future<Output = ()>>>) {
        self.daemons.set(self.daemons.get() + 1);
        self.spawn_task(fut, true);
    }

    fn spawn_task(&self, fut: Pin<Box<dyn Future<Output = ()>>>, daemon: bool) {
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let key = entry.key();
        let waker = Waker::from(Arc::new(TaskWaker { task: key, shared: self.shared.clone() }));
        entry.insert(TaskSlot { fut: Some(fut), waker, daemon });
        self.ready.borrow_mut().push_back(key);
    }

    /// Drop every daemon task (shutdown, nothing else left). Their futures go
    /// after the borrow ends: dropping one abandons its operations.
    fn drop_daemons(&self) {
        let gone: Vec<TaskSlot> = {
            let mut tasks = self.tasks.borrow_mut();
            let keys: Vec<usize> = tasks.iter().filter(|(_, t)| t.daemon).map(|(k, _)| k).collect();
            keys.into_iter().map(|k| tasks.remove(k)).collect()
        };
        self.daemons.set(0);
        drop(gone);
    }

    /// Slot of a registered file, registering it on first use on this ring;
    /// the flag says it was registered just now.
    pub(crate) fn file_slot(&self, uid: u64, fd: RawFd) -> Option<(u32, bool)> {
        if let Some(&(_, slot)) = self.files.borrow().iter().find(|(u, _)| *u == uid) {
            return Some((slot, false));
        }
        let slot = self.free_file_slots.borrow_mut().pop()?;
        let ok = self.ring.borrow().submitter().register_files_update(slot, &[fd]).is_ok();
        if !ok {
            self.free_file_slots.borrow_mut().push(slot);
            return None;
        }
        self.files.borrow_mut().push((uid, slot));
        Some((slot, true))
    }

    /// Files this ring holds registered.
    #[cfg(test)]
    pub(crate) fn registered_files(&self) -> usize {
        self.files.borrow().len()
    }

    /// Drop the ring's reference to a file (so its locks go with the last close).
    pub(crate) fn unregister_file(&self, uid: u64) {
        let mut files = self.files.borrow_mut();
        if let Some(i) = files.iter().position(|(u, _)| *u == uid) {
            let (_, slot) = files.swap_remove(i);
            let _ = self.ring.borrow().submitter().register_files_update(slot, &[-1]);
            self.free_file_slots.borrow_mut().push(slot);
        }
    }

    fn arm_wake(&self) {
        let sqe = opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), self.wake_buf.as_ptr().cast(), 8)
            .build()
            .user_data(TAG_WAKE);
        self.push_sqe(&sqe);
    }

    pub(crate) fn arm_native(&self, eventfd: RawFd) {
        let sqe = opcode::Read::new(types::Fd(eventfd), self.native_buf.as_ptr().cast(), 8)
            .build()
            .user_data(TAG_NATIVE);
        self.push_sqe(&sqe);
    }

    fn drain_remote(&self) {
        self.shared.notified.store(false, Ordering::SeqCst);
        while let Some(job) = self.shared.jobs.pop() {
            job();
        }
        let mut ready = self.ready.borrow_mut();
        while let Some(t) = self.shared.wakes.pop() {
            ready.push_back(t);
        }
    }

    fn run_ready(&self) {
        // A budget keeps one busy task set from starving completions.
        for _ in 0..1024 {
            let Some(key) = self.ready.borrow_mut().pop_front() else { return };
            let (fut, waker) = {
                let mut tasks = self.tasks.borrow_mut();
                match tasks.get_mut(key) {
                    Some(t) => match t.fut.take() {
                        Some(f) => (f, t.waker.clone()),
                        None => continue, // already being polled (woken from inside its own poll)
                    },
                    None => continue, // stale wake of a finished task
                }
            };
            let mut fut = fut;
            let mut cx = Context::from_waker(&waker);
            let r = fut.as_mut().poll(&mut cx);
            if self.submit_batch > 0
                && (self.unsubmitted.get() >= self.submit_batch || self.unsubmitted_bytes.get() >= self.submit_bytes)
            {
                self.submit(false);
            }
            match r {
                Poll::Ready(()) => {
                    if self.tasks.borrow_mut().remove(key).daemon {
                        self.daemons.set(self.daemons.get() - 1);
                    }
                }
                Poll::Pending => {
                    if let Some(t) = self.tasks.borrow_mut().get_mut(key) {
                        t.fut = Some(fut);
                    }
                }
            }
        }
    }

    fn reap(&self) {
        loop {
            // Copy out a batch so no ring borrow is held while waking tasks.
            let mut batch: [(u64, i32); 64] = [(0, 0); 64];
            let n = {
                let mut ring = self.ring.borrow_mut();
                let mut n = 0;
                for cqe in ring.completion() {
                    batch[n] = (cqe.user_data(), cqe.result());
                    n += 1;
                    if n == batch.len() {
                        break;
                    }
                }
                n
            };
            for &(ud, res) in &batch[..n] {
                match ud {
                    TAG_WAKE => self.arm_wake(),
                    TAG_NATIVE => crate::aio::native::reap(self),
                    TAG_IGNORE => {}
                    key => self.complete_op(key as usize, res),
                }
            }
            if n < batch.len() {
                return;
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.ops.borrow().len()
    }

    fn submit(&self, wait: bool) {
        self.flush_merge();
        if !wait && self.unsubmitted.get() == 0 && self.taskrun_flag {
            // A busy turn (tasks ready, or polling a device queue) with no
            // new entries: enter the kernel only if completions wait there
            // as task work or in an overflowed CQ. Otherwise a polling shard
            // would make one system call per turn for nothing.
            let mut ring = self.ring.borrow_mut();
            let sq = ring.submission();
            if !sq.taskrun() && !sq.cq_overflow() {
                return;
            }
        }
        let ring = self.ring.borrow();
        let want = usize::from(wait);
        let r = ring.submitter().submit_and_wait(want);
        self.unsubmitted.set(0);
        self.unsubmitted_bytes.set(0);
        match r {
            Ok(_) => {}
            // Interrupted, or the kernel is short of memory for this batch:
            // the entries stay queued and the next turn tries again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOMEM)) => {}
            // EBUSY: the CQ overflowed; reaping (next step of the loop) makes room.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => panic!("io_uring_enter failed: {e}"),
        }
    }

    /// The event loop. Returns when shutdown was asked for, every task has finished
    /// and every operation the kernel holds memory for has completed.
    pub(crate) fn run(self: &Rc<Self>) {
        self.arm_wake();
        let mut cancelled = false;
        loop {
            self.drain_remote();
            self.run_ready();
            crate::aio::native::flush(self);
            let shutting_down =
                self.shared.shutdown.load(Ordering::Acquire) && self.tasks.borrow().len() == self.daemons.get();
            if shutting_down && self.daemons.get() > 0 {
                self.drop_daemons();
            }
            if shutting_down {
                if self.in_flight() == 0 {
                    break;
                }
                if !cancelled {
                    self.cancel_all();
                    cancelled = true;
                }
            }
            let busy = !self.ready.borrow().is_empty() || !self.shared.jobs.is_empty() || !self.shared.wakes.is_empty();
            let spin = self.poll_mode && self.in_flight() > self.timers.get();
            if busy || spin {
                // In SQPOLL mode this is a flag check unless the kernel thread
                // went to sleep; asking every turn also covers a sleep that raced
                // with our last tail update (the flag can be seen late).
                self.submit(false);
            } else {
                self.submit(true);
            }
            self.reap();
        }
        // Let go of registered files synchronously: a ring torn down at close
        // releases its file references later, from a kernel worker, and until
        // then the files' OFD image locks would outlive this process.
        let ring = self.ring.borrow();
        if ring.submitter().unregister_files().is_ok() {
            self.files.borrow_mut().clear();
        }
    }

    fn cancel_all(&self) {
        let keys: Vec<usize> = self.ops.borrow().iter().map(|(k, _)| k).collect();
        for k in keys {
            let sqe = opcode::AsyncCancel::new(k as u64).build().user_data(TAG_IGNORE);
            self.push_sqe(&sqe);
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        if let Some(ctx) = self.native.borrow_mut().take() {
            ctx.destroy();
        }
    }
}
