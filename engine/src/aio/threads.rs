//! The thread-pool backend (`aio=threads`) and the helper pool for work that can
//! only block. Workers run preadv2/pwritev2/fdatasync/fallocate and hand the result
//! back by waking the waiting task, which crosses to its shard through the
//! shard's mailbox eventfd. The job owns the buffer while it runs, so a dropped
//! future cannot free memory a worker is still writing.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use crossbeam_channel::{unbounded, Receiver, Sender};

use super::Rw;
use crate::runtime::IoBuf;

/// The most worker threads the pool grows to (QEMU's pool uses the same bound).
const MAX_WORKERS: usize = 64;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    tx: Sender<Job>,
    rx: Receiver<Job>,
    workers: AtomicUsize,
    idle: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = unbounded();
        Pool { tx, rx, workers: AtomicUsize::new(0), idle: AtomicUsize::new(0) }
    })
}

fn submit(job: Job) {
    let p = pool();
    p.tx.send(job).expect("pool receiver lives in a static");
    // Grow while nobody is idle to take the job.
    if p.idle.load(Ordering::Acquire) == 0 && p.workers.load(Ordering::Acquire) < MAX_WORKERS {
        p.workers.fetch_add(1, Ordering::AcqRel);
        let rx = p.rx.clone();
        let spawned = std::thread::Builder::new().name("ringblk-worker".into()).spawn(move || {
            let p = pool();
            loop {
                p.idle.fetch_add(1, Ordering::AcqRel);
                let job = rx.recv();
                p.idle.fetch_sub(1, Ordering::AcqRel);
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            }
        });
        if spawned.is_err() {
            p.workers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

struct Shared<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

struct PoolFuture<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

impl<T> Future for PoolFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        match s.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Jobs that must run one at a time, in order (buffered writes to one file).
/// Like io-wq's hashed work: one worker drains the queue while others stay
/// free, instead of many workers queueing on the inode lock.
#[derive(Default)]
pub(crate) struct SerialQueue {
    /// (a worker is draining the queue, jobs waiting)
    inner: Mutex<(bool, VecDeque<Job>)>,
}

fn submit_serial(q: &Arc<SerialQueue>, job: Job) {
    {
        let mut g = q.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 {
            g.1.push_back(job);
            return;
        }
        g.0 = true;
    }
    let q = q.clone();
    submit(Box::new(move || {
        let mut job = job;
        loop {
            job();
            let mut g = q.inner.lock().unwrap_or_else(|e| e.into_inner());
            match g.1.pop_front() {
                Some(next) => job = next,
                None => {
                    g.0 = false;
                    return;
                }
            }
        }
    }));
}

/// Run `f` on a worker and await its result.
pub(super) fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> impl Future<Output = T> {
    run_on(None, f)
}

/// Run `f` on a worker, through `serial` when given, and await its result.
fn run_on<T: Send + 'static>(serial: Option<&Arc<SerialQueue>>, f: impl FnOnce() -> T + Send + 'static) -> impl Future<Output = T> {
    let shared = Arc::new(Mutex::new(Shared { value: None, waker: None }));
    let s2 = shared.clone();
    let job: Job = Box::new(move || {
        let v = f();
        let w = {
            let mut s = s2.lock().unwrap_or_else(|e| e.into_inner());
            s.value = Some(v);
            s.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    });
    match serial {
        Some(q) => submit_serial(q, job),
        None => submit(job),
    }
    PoolFuture { shared }
}

fn cvt(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

struct SendBuf(IoBuf);

pub(super) async fn rw(fd: Arc<OwnedFd>, serial: Option<&Arc<SerialQueue>>, buf: IoBuf, rw: Rw) -> (io::Result<usize>, IoBuf) {
    let Rw { at, len, off, write, fua } = rw;
    let sb = SendBuf(buf);
    let (r, sb) = run_on(serial, move || {
        let mut sb = sb;
        // SAFETY: at + len <= buf.len() (asserted by the caller); the buffer is owned
        // by this job for the duration of the call.
        let ptr = unsafe { sb.0.as_mut_ptr().add(at) };
        let iov = libc::iovec { iov_base: ptr.cast(), iov_len: len };
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let fd = fd.as_raw_fd();
        // SAFETY: iov describes memory owned by this job; the job holds the fd open.
        let io = |off: libc::off_t| unsafe {
            if write {
                libc::pwritev2(fd, &iov, 1, off, flags)
            } else {
                libc::preadv2(fd, &iov, 1, off, 0)
            }
        };
        let mut r = io(off as libc::off_t);
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESPIPE) {
            // Not seekable (a pipe): use the stream position, as io_uring does.
            r = io(-1);
        }
        (cvt(r), sb)
    })
    .await;
    (r, sb.0)
}

pub(super) async fn fsync(fd: Arc<OwnedFd>, datasync: bool) -> io::Result<()> {
    run(move || {
        let fd = fd.as_raw_fd();
        // SAFETY: plain syscall on an fd the job holds open.
        let r = unsafe { if datasync { libc::fdatasync(fd) } else { libc::fsync(fd) } };
        cvt(r as isize).map(drop)
    })
    .await
}

pub(super) async fn fallocate(fd: Arc<OwnedFd>, mode: i32, off: u64, len: u64) -> io::Result<()> {
    run(move || {
        let fd = fd.as_raw_fd();
        // SAFETY: plain syscall on an fd the job holds open.
        let r = unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) };
        cvt(r as isize).map(drop)
    })
    .await
}
