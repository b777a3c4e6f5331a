//! The thread-per-core runtime: starts shards, posts work to them, and gives
//! tasks the primitives they need (spawn, yield, NOP). The event loop itself is in
//! `shard.rs`; operation futures in `op.rs`; buffers in `buf.rs`.

pub mod buf;
mod join;
pub(crate) mod op;
pub(crate) mod shard;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread;

pub use buf::{BufPool, IoBuf, BUF_ALIGN};
pub use join::{JoinHandle, LocalJoinHandle};
pub(crate) use join::channel as join_channel;

use crate::error::{Error, Result};
use shard::{Shard, ShardShared};

/// How to build a runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Number of shards (threads); default: one per available core.
    pub shards: usize,
    /// Busy-poll: SQPOLL for io_uring and spinning on completions while
    /// operations are in flight. Off by default: idle shards sleep in the kernel.
    pub poll: bool,
    /// How long the SQPOLL kernel thread spins before it sleeps.
    pub sqpoll_idle_ms: u32,
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Buffers in each shard's registered pool, and their size.
    pub buffers: usize,
    pub buffer_size: usize,
    /// Submit once this many entries are queued in one turn of the loop,
    /// instead of only at its end (0: only at the end). The device starts
    /// on the first requests while the shard still builds the rest, and
    /// the kernel's plug merges them in smaller groups whose completions
    /// stagger: a growing qcow2 write of 64 KiB requests at depth 16 on a
    /// loop device took 1.03-1.12 s per 2 GiB with 4, 1.05-1.15 with 8,
    /// 1.17-1.27 with no limit (the 16 requests went out as one 1 MiB
    /// request and the device idled while they were refilled).
    pub submit_batch: u32,
    /// ... or once the reads and writes queued move this many bytes. What
    /// the batch is for is saving system calls on small requests; a few
    /// requests of 64 KiB are already worth a trip to the device of their
    /// own. A growing qcow2 write of 64 KiB requests, depth 16, loop ext4,
    /// 6 alternating runs: 0.68-0.73 s per 2 GiB in groups of 4, against
    /// 0.68-0.74 in groups of 8 (medians 0.69 and 0.70); from an earlier
    /// set of 5: 0.74-0.80 against 0.75-0.81. 1 MiB requests and 4 KiB
    /// random reads do not change (measured the same way).
    pub submit_bytes: u64,
    /// Send writes queued in one turn that follow each other in one file
    /// (same flags) as one vectored write, up to 64 writes and 1 MiB: a
    /// growing qcow2 image's 64 KiB writes are contiguous in the file, and
    /// the filesystem's cost per write (converting unwritten extents, a
    /// FUSE round trip) is paid once for the lot.
    pub merge_writes: bool,
    /// Pin shard i to CPU i (mod the CPUs we may run on). Off by default: the
    /// ring's io-wq workers (buffered writes, fallocate) inherit the mask and
    /// would then fight their shard for one core; measured, pinning gained
    /// nothing for reads and cost 20 % on convert.
    pub pin: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shards: thread::available_parallelism().map_or(1, |n| n.get()),
            poll: false,
            sqpoll_idle_ms: 100,
            ring_entries: 256,
            // Registering pins every page up front (about 3 ms per 4 MiB here),
            // so the default pool is small; bigger requests use heap buffers.
            buffers: 64,
            buffer_size: 64 * 1024,
            submit_batch: 8,
            submit_bytes: 256 * 1024,
            merge_writes: true,
            pin: false,
        }
    }
}

struct ShardThread {
    shared: Arc<ShardShared>,
    thread: Option<thread::JoinHandle<()>>,
}

/// A set of running shards. Dropping it stops them after their tasks finish.
pub struct Runtime {
    shards: Vec<ShardThread>,
}

/// A cheap, clonable, Send handle to post work to one shard.
#[derive(Clone)]
pub struct ShardHandle(Arc<ShardShared>);

impl ShardHandle {
    pub fn index(&self) -> usize {
        self.0.index
    }

    /// Run `f` on the shard and spawn the future it returns there.
    pub fn spawn<F, Fut, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = join::channel();
        self.0.post(Box::new(move || {
            let fut = f();
            spawn_local_unit(Box::pin(async move { tx.send(fut.await) }));
        }));
        rx
    }
}

impl Runtime {
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime> {
        let n = cfg.shards.max(1);
        let cpus = allowed_cpus();
        let mut shards = Vec::with_capacity(n);
        for i in 0..n {
            let shared = ShardShared::new(i).map_err(|e| Error::os("eventfd", e))?;
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
            let cfg2 = cfg.clone();
            let sh = shared.clone();
            // In poll mode the SQPOLL kernel thread inherits the shard thread's
            // affinity; pinned to the same core, the two spinners starve each
            // other. Leave both to the scheduler then.
            let cpu = if cfg.pin && !cfg.poll && !cpus.is_empty() { Some(cpus[i % cpus.len()]) } else { None };
            let thread = thread::Builder::new()
                .name(format!("ringblk-shard-{i}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_to(cpu);
                    }
                    let shard = match Shard::build(sh, &cfg2) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    shard.enter();
                    shard.run();
                    Shard::leave();
                    drop(shard);
                })
                .map_err(|e| Error::os("spawn shard thread", e))?;
            let ready = ready_rx.recv().unwrap_or_else(|_| Err(std::io::Error::other("shard thread died")));
            shards.push(ShardThread { shared, thread: Some(thread) });
            if let Err(e) = ready {
                let rt = Runtime { shards };
                drop(rt);
                return Err(Error::os("io_uring setup", e));
            }
        }
        Ok(Runtime { shards })
    }

    /// One shard, defaults otherwise: what tests and simple tools use.
    pub fn single() -> Result<Runtime> {
        Runtime::new(RuntimeConfig { shards: 1, pin: false, ..Default::default() })
    }

    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    pub fn handle(&self, shard: usize) -> ShardHandle {
        ShardHandle(self.shards[shard % self.shards.len()].shared.clone())
    }

    pub fn spawn_on<F, Fut, T>(&self, shard: usize, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.handle(shard).spawn(f)
    }

    /// Run a future on shard 0 and wait for it on this (non-shard) thread.
    pub fn block_on<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.spawn_on(0, f).join()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for s in &self.shards {
            s.shared.shutdown.store(true, Ordering::Release);
            s.shared.notify();
        }
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}

fn spawn_local_unit(fut: Pin<Box<dyn Future<Output = ()>>>) {
    shard::expect_current().spawn_local(fut);
}

/// Spawn a task on the current shard.
pub fn spawn_local<Fut, T>(fut: Fut) -> LocalJoinHandle<T>
where
    Fut: Future<Output = T> + 'static,
    T: 'static,
{
    let (slot, handle) = join::local_channel();
    spawn_local_unit(Box::pin(async move { join::local_send(&slot, fut.await) }));
    handle
}

/// Spawn background work on the current shard that does not keep it alive:
/// when the runtime shuts down and only such tasks are left, they are dropped
/// wherever they wait.
pub fn spawn_daemon<Fut>(fut: Fut)
where
    Fut: Future<Output = ()> + 'static,
{
    shard::expect_current().spawn_daemon(Box::pin(fut));
}

/// Wait `d` on the current shard's ring (IORING_OP_TIMEOUT); the shard sleeps
/// or serves other tasks meanwhile.
pub async fn sleep(d: std::time::Duration) {
    struct Timer(std::rc::Rc<Shard>);
    impl Drop for Timer {
        fn drop(&mut self) {
            self.0.timers.set(self.0.timers.get() - 1);
        }
    }
    let shard = shard::expect_current();
    // The op owns the timespec until the kernel is done with it.
    // Clamped so the kernel never sees a negative time (it would refuse at once).
    let ts = Box::new(io_uring::types::Timespec::new().sec(d.as_secs().min(i64::MAX as u64 / 2)).nsec(d.subsec_nanos()));
    let sqe = io_uring::opcode::Timeout::new(&*ts as *const io_uring::types::Timespec).build();
    let key = shard.submit_op(sqe);
    shard.timers.set(shard.timers.get() + 1);
    let _timer = Timer(shard.clone());
    let _ = op::Op::new(shard, key, ts).await;
}

/// Index of the shard running this code, if any.
pub fn current_shard() -> Option<usize> {
    shard::current().map(|s| s.shared.index)
}

/// Did the current shard's ring accept its buffer pool as fixed buffers (so
/// pool buffers go out as READ_FIXED/WRITE_FIXED)?
pub fn pool_registered() -> bool {
    shard::current().is_some_and(|s| s.pool_registered)
}

/// The current shard's buffer pool (a driver maps it for DMA).
pub fn current_pool() -> Option<Arc<BufPool>> {
    shard::current().map(|s| s.pool.clone())
}

pub(crate) fn try_pool_buf(len: usize) -> Option<IoBuf> {
    shard::current().and_then(|s| s.pool.take(len))
}

/// Let other tasks on this shard run before continuing.
pub fn yield_now() -> impl Future<Output = ()> {
    struct Yield(bool);
    impl Future for Yield {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    Yield(false)
}

/// One IORING_OP_NOP round trip through the ring: the runtime's floor cost.
pub async fn nop() -> i32 {
    let shard = shard::expect_current();
    let key = shard.submit_op(io_uring::opcode::Nop::new().build());
    op::Op::new(shard, key, ()).await.0
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; pinning failure is harmless (we just run unpinned).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests;

/// Writes the current shard has sent as part of a vectored write of
/// several (RuntimeConfig::merge_writes); 0 off-shard.
pub fn merged_writes() -> u64 {
    shard::current().map_or(0, |s| s.merged_writes())
}

/// (free, total) buffers in the current shard's pool; (0, 0) off-shard.
pub fn pool_stats() -> (usize, usize) {
    shard::current().map_or((0, 0), |s| (s.pool.available(), s.pool.count()))
}

/// A handle to the shard running this code, to post work back to it from
/// another shard.
pub fn current_handle() -> Option<ShardHandle> {
    shard::current().map(|s| ShardHandle(s.shared.clone()))
}

thread_local! {
    static LOCALS: std::cell::RefCell<std::collections::HashMap<u64, std::rc::Rc<dyn std::any::Any>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

static NEXT_LOCAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// State a shared (Send + Sync) object keeps per shard, such as a network
/// connection whose tasks live on that shard. Each shard sees its own value;
/// dropping the owner drops every shard's value on that shard.
pub struct ShardLocal<T: 'static> {
    uid: u64,
    on: std::sync::Mutex<Vec<std::sync::Weak<ShardShared>>>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: 'static> Default for ShardLocal<T> {
    fn default() -> Self {
        ShardLocal {
            uid: NEXT_LOCAL.fetch_add(1, Ordering::Relaxed),
            on: std::sync::Mutex::new(Vec::new()),
            _t: std::marker::PhantomData,
        }
    }
}

impl<T: 'static> ShardLocal<T> {
    /// This shard's value, if set.
    pub fn get(&self) -> Option<std::rc::Rc<T>> {
        LOCALS.with(|l| l.borrow().get(&self.uid).cloned()).and_then(|v| v.downcast::<T>().ok())
    }

    /// Set this shard's value (must run on a shard).
    pub fn set(&self, v: std::rc::Rc<T>) {
        let here = shard::expect_current();
        let old = LOCALS.with(|l| l.borrow_mut().insert(self.uid, v));
        if old.is_none() {
            self.on.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&here.shared));
        }
        drop(old);
    }

    /// Drop this shard's value.
    pub fn remove(&self) {
        let old = LOCALS.with(|l| l.borrow_mut().remove(&self.uid));
        drop(old);
    }
}

impl<T: 'static> Drop for ShardLocal<T> {
    fn drop(&mut self) {
        let uid = self.uid;
        for weak in std::mem::take(&mut *self.on.lock().unwrap_or_else(|e| e.into_inner())) {
            let Some(shared) = weak.upgrade() else {
                continue;
            };
            match shard::current() {
                Some(s) if s.shared.uid == shared.uid => {
                    let old = LOCALS.with(|l| l.borrow_mut().remove(&uid));
                    drop(old);
                }
                _ => shared.post(Box::new(move || {
                    let old = LOCALS.with(|l| l.borrow_mut().remove(&uid));
                    drop(old);
                })),
            }
        }
    }
}
