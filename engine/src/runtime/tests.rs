use std::future::Future;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;

use super::*;
use crate::aio::{AioFile, Backend};

/// Poll a future exactly once.
async fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> Option<F::Output> {
    let mut f = Some(f);
    std::future::poll_fn(move |cx| match f.take().expect("polled once").poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds is a live array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn nop_round_trips_and_many_tasks() {
    let rt = Runtime::single().unwrap();
    let n = rt.block_on(|| async {
        let done = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut hs = Vec::new();
        for _ in 0..1000 {
            let d = done.clone();
            hs.push(spawn_local(async move {
                assert_eq!(nop().await, 0);
                d.set(d.get() + 1);
            }));
        }
        for h in hs {
            h.await;
        }
        done.get()
    });
    assert_eq!(n, 1000);
}

#[test]
fn work_posted_to_every_shard_runs_there() {
    let rt = Runtime::new(RuntimeConfig { shards: 3, pin: false, ..Default::default() }).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..3)
        .map(|i| {
            let c = count.clone();
            rt.spawn_on(i, move || async move {
                nop().await;
                c.fetch_add(1, Ordering::SeqCst);
                current_shard()
            })
        })
        .collect();
    let shards: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
    assert_eq!(shards, vec![Some(0), Some(1), Some(2)]);
    // Shard 1 awaits a result computed on shard 2.
    let h2 = rt.handle(2);
    let v = rt.spawn_on(1, move || async move { h2.spawn(|| async { current_shard() }).await }).join();
    assert_eq!(v, Some(2));
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

/// A read dropped while the kernel (or a worker) still owns its buffer must not
/// return the buffer to the pool until the read has completed.
fn dropped_read_keeps_buffer(backend: Backend) {
    let rt = Runtime::single().unwrap();
    rt.block_on(move || async move {
        let (r, w) = pipe();
        let f = AioFile::new(r, backend);
        let (free0, total) = pool_stats();
        assert_eq!(free0, total);
        let buf = IoBuf::new(4096);
        assert_eq!(pool_stats().0, free0 - 1, "buffer came from the pool");
        {
            let mut fut = Box::pin(f.read(buf, 0, 4096, 0));
            assert!(poll_once(fut.as_mut()).await.is_none(), "pipe read must be pending");
        } // dropped mid-flight
        for _ in 0..10 {
            nop().await;
        }
        assert_eq!(pool_stats().0, free0 - 1, "buffer still owned by the in-flight read");
        // SAFETY: writes 5 bytes from a live array to our pipe.
        assert_eq!(unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&w), b"hello".as_ptr().cast(), 5) }, 5);
        for _ in 0..10_000 {
            if pool_stats().0 == free0 {
                return;
            }
            yield_now().await;
            nop().await;
        }
        panic!("buffer never returned to the pool after the read completed");
    });
}

#[test]
fn dropped_uring_read_keeps_buffer_until_completion() {
    dropped_read_keeps_buffer(Backend::IoUring);
}

#[test]
fn dropped_threads_read_keeps_buffer_until_completion() {
    dropped_read_keeps_buffer(Backend::Threads);
}

#[test]
fn shutdown_cancels_abandoned_reads() {
    // A read that never completes must not hang Runtime::drop.
    let rt = Runtime::single().unwrap();
    let w = rt.block_on(|| async {
        let (r, w) = pipe();
        let f = AioFile::new(r, Backend::IoUring);
        let mut fut = Box::pin(f.read(IoBuf::new(64), 0, 64, 0));
        assert!(poll_once(fut.as_mut()).await.is_none());
        drop(fut);
        w
    });
    drop(rt);
    drop(w);
}

#[test]
fn sqpoll_mode_runs_io() {
    let rt = Runtime::new(RuntimeConfig { shards: 1, poll: true, pin: false, ..Default::default() });
    let Ok(rt) = rt else {
        eprintln!("SQPOLL not permitted here; skipping");
        return;
    };
    let n = rt.block_on(|| async {
        let mut s = 0;
        for _ in 0..100 {
            s += nop().await;
        }
        s
    });
    assert_eq!(n, 0);
}

#[test]
fn pool_is_registered_and_files_get_fixed_slots() {
    let rt = Runtime::single().unwrap();
    rt.block_on(|| async {
        assert!(pool_registered(), "the ring must take the pool as fixed buffers");
        // A read through the io_uring backend registers the file with the ring.
        let f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &f, &[7u8; 4096]).unwrap();
        let file = AioFile::new(OwnedFd::from(f), Backend::IoUring);
        let (r, buf) = file.read(IoBuf::new(4096), 0, 4096, 0).await;
        assert_eq!(r.unwrap(), 4096);
        assert!(buf.iter().all(|&b| b == 7));
        let shard = super::shard::expect_current();
        assert_eq!(shard.registered_files(), 1);
        drop(file);
        assert_eq!(shard.registered_files(), 0, "closing on the shard drops the slot at once");
    });
}

#[test]
fn sleep_waits_and_daemons_do_not_hold_shutdown() {
    use std::time::{Duration, Instant};
    let rt = Runtime::single().unwrap();
    let waited = rt.block_on(|| async {
        let t = Instant::now();
        crate::runtime::sleep(Duration::from_millis(50)).await;
        t.elapsed()
    });
    assert!(waited >= Duration::from_millis(45) && waited < Duration::from_secs(2), "slept {waited:?}");
    // A daemon asleep for an hour, and one that ends by itself.
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t2 = ticks.clone();
    rt.block_on(move || async move {
        crate::runtime::spawn_daemon(async { crate::runtime::sleep(Duration::from_secs(3600)).await });
        crate::runtime::spawn_daemon(async move {
            crate::runtime::sleep(Duration::from_millis(10)).await;
            t2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        crate::runtime::sleep(Duration::from_millis(100)).await;
    });
    assert_eq!(ticks.load(std::sync::atomic::Ordering::SeqCst), 1, "the short daemon ran to its end");
    let t = Instant::now();
    drop(rt);
    assert!(t.elapsed() < Duration::from_secs(2), "shutdown waited {:?} for a sleeping daemon", t.elapsed());
}

/// A temporary file, and the same file open for the io_uring backend.
fn uring_tempfile() -> (std::fs::File, std::rc::Rc<AioFile>) {
    let f = tempfile::tempfile().unwrap();
    let file = AioFile::new(OwnedFd::from(f.try_clone().unwrap()), Backend::IoUring);
    (f, std::rc::Rc::new(file))
}

/// Writes of `pattern(i)` to blocks `order[..]` of `file` (4 KiB each), all
/// started in one turn of the loop; their results in the same order.
async fn writes_in_one_turn(file: &std::rc::Rc<AioFile>, order: &[u64], fua: bool) -> Vec<std::io::Result<usize>> {
    let handles: Vec<_> = order
        .iter()
        .map(|&i| {
            let file = file.clone();
            spawn_local(async move {
                let buf = IoBuf::from_slice(&[i as u8 + 1; 4096]);
                file.write(buf, 0, 4096, i * 4096, fua).await.0
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await);
    }
    out
}

#[test]
fn contiguous_writes_in_one_turn_go_out_as_one_vectored_write() {
    use std::rc::Rc;
    let rt = Runtime::single().unwrap();
    rt.block_on(|| async {
        let (f, file) = uring_tempfile();
        // 0..6 contiguous, then a gap (9), then 10..12 contiguous, and a
        // FUA write (7) that must not join writes without FUA.
        let order = [0, 1, 2, 3, 4, 5, 9, 10, 11, 7];
        let before = merged_writes();
        let mut res = writes_in_one_turn(&file, &order[..9], false).await;
        res.extend(writes_in_one_turn(&file, &order[9..], true).await);
        for (r, &i) in res.iter().zip(&order) {
            assert_eq!(r.as_ref().map_err(|e| e.to_string()), Ok(&4096), "write of block {i}");
        }
        let merged = merged_writes() - before;
        assert!(merged >= 2, "no writes merged ({merged})");
        let mut back = vec![0u8; 12 * 4096];
        let n = std::os::unix::fs::FileExt::read_at(&f, &mut back, 0).unwrap();
        assert_eq!(n, back.len());
        for b in 0..12u64 {
            let want = if order.contains(&b) { b as u8 + 1 } else { 0 };
            let blk = &back[b as usize * 4096..(b as usize + 1) * 4096];
            assert!(blk.iter().all(|&x| x == want), "block {b} holds {} not {want}", blk[0]);
        }

        // An error reaches every member: a file open read-only.
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f))).unwrap();
        let ro = Rc::new(AioFile::new(OwnedFd::from(ro), Backend::IoUring));
        let before = merged_writes();
        for r in writes_in_one_turn(&ro, &[0, 1, 2, 3], false).await {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EBADF));
        }
        assert!(merged_writes() - before >= 2, "the failing writes were not merged");
    });
}

/// A merged write whose future is dropped before the window goes out keeps
/// its buffer until the vectored write completes; the others complete.
#[test]
fn a_merged_write_dropped_before_submission_keeps_its_buffer() {
    let rt = Runtime::single().unwrap();
    rt.block_on(|| async {
        let (f, file) = uring_tempfile();
        let (free0, _) = pool_stats();
        let mut a = Box::pin(file.write(IoBuf::from_slice(&[1; 4096]), 0, 4096, 0, false));
        assert!(poll_once(a.as_mut()).await.is_none(), "queued, not done");
        let b = file.write(IoBuf::from_slice(&[2; 4096]), 0, 4096, 4096, false);
        // `a` is dropped while its write waits in the window with `b`'s.
        drop(a);
        assert_eq!(b.await.0.unwrap(), 4096);
        for _ in 0..1000 {
            if pool_stats().0 == free0 {
                break;
            }
            nop().await;
        }
        assert_eq!(pool_stats().0, free0, "buffers back in the pool once the write completed");
        let mut back = vec![0u8; 8192];
        std::os::unix::fs::FileExt::read_at(&f, &mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 1) && back[4096..].iter().all(|&x| x == 2));
    });
}

#[test]
fn large_direct_writes_go_to_the_pool_when_asked_and_land_where_sent() {
    // O_DIRECT on the test's own filesystem; the routing does not depend on
    // which one (the file driver decides when to ask for it).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("direct.img");
    std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let rt = Runtime::single().unwrap();
    rt.block_on(move || async move {
        let file = std::rc::Rc::new(AioFile::new(OwnedFd::from(f), Backend::IoUring).with_pooled_writes(256 << 10));
        // Four 1 MiB writes (pooled) and four 64 KiB ones (on the ring), all
        // in flight together, each with its own byte.
        let mut tasks = Vec::new();
        for i in 0..8u64 {
            let file = file.clone();
            let (len, off) = if i < 4 { (1 << 20, i << 20) } else { (64 << 10, (4 << 20) + (i - 4) * (64 << 10)) };
            tasks.push(crate::runtime::spawn_local(async move {
                let mut buf = IoBuf::new(len);
                buf.fill(i as u8 + 1);
                let (r, _) = file.write(buf, 0, len, off, false).await;
                assert_eq!(r.unwrap(), len);
            }));
        }
        for t in tasks {
            t.await;
        }
        assert_eq!(file.pooled_writes(), 4, "the 1 MiB writes, and only they, went to the pool");
        for i in 0..8u64 {
            let (len, off) = if i < 4 { (1 << 20, i << 20) } else { (64 << 10, (4 << 20) + (i - 4) * (64 << 10)) };
            let (r, buf) = file.read(IoBuf::new(len), 0, len, off).await;
            assert_eq!(r.unwrap(), len);
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "write {i} at {off} reads back");
        }
    });
}
