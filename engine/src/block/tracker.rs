//! In-flight request tracking for requests that must not overlap: a
//! read-modify-write (misaligned O_DIRECT write, later partial-cluster COW) is
//! *serialising*: it waits for every overlapping request in flight, and every
//! request that overlaps it waits for it. Plain requests never wait for each
//! other. Waiters park their wakers (any shard) and are woken when a request
//! they may be waiting for ends. Also here: the misaligned read and the
//! read-modify-write themselves, for nodes that only take aligned requests
//! (O_DIRECT files, NVMe namespaces).

use std::future::poll_fn;
use std::ops::Range;

use crate::error::Result;
use crate::runtime::IoBuf;
use std::sync::Mutex;
use std::task::{Poll, Waker};

struct Req {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    reqs: Vec<Req>,
    waiters: Vec<Waker>,
}

#[derive(Default)]
pub struct RangeTracker {
    inner: Mutex<Inner>,
}

/// A tracked request; dropping it ends the request.
pub struct Tracked<'a> {
    tracker: &'a RangeTracker,
    id: u64,
}

impl RangeTracker {
    pub fn new() -> RangeTracker {
        RangeTracker::default()
    }

    /// Register [start, end) once no conflicting request is in flight.
    pub async fn begin(&self, start: u64, end: u64, serialising: bool) -> Tracked<'_> {
        poll_fn(|cx| {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let conflict =
                g.reqs.iter().any(|r| r.start < end && start < r.end && (serialising || r.serialising));
            if conflict {
                g.waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            let id = g.next_id;
            g.next_id += 1;
            g.reqs.push(Req { id, start, end, serialising });
            Poll::Ready(Tracked { tracker: self, id })
        })
        .await
    }

    /// Requests in flight (for tests and assertions).
    pub fn in_flight(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).reqs.len()
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let waiters = {
            let mut g = self.tracker.inner.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = g.reqs.iter().position(|r| r.id == self.id) {
                g.reqs.swap_remove(i);
            }
            // Conflicts are rare (misaligned writes): waking every waiter to
            // re-check is simpler than matching ranges and costs nothing here.
            std::mem::take(&mut g.waiters)
        };
        for w in waiters {
            w.wake();
        }
    }
}

/// The `align`-aligned span `[start, end)` around `len` bytes at `offset`.
pub fn aligned_cover(offset: u64, len: usize, align: u64) -> (u64, u64) {
    (offset / align * align, (offset + len as u64).next_multiple_of(align))
}

/// Fill `buf[range]` with the `len` bytes at `offset` by reading the
/// aligned span around them into a buffer of our own: `read(start, tmp)`
/// fills all of `tmp` from `start`.
pub async fn read_covered(
    offset: u64,
    mut buf: IoBuf,
    range: Range<usize>,
    align: u64,
    read: impl AsyncFnOnce(u64, IoBuf) -> (Result<()>, IoBuf),
) -> (Result<()>, IoBuf) {
    let (start, end) = aligned_cover(offset, range.len(), align);
    let (r, tmp) = read(start, IoBuf::new((end - start) as usize)).await;
    if r.is_ok() {
        let s = (offset - start) as usize;
        let n = range.len();
        buf[range].copy_from_slice(&tmp[s..s + n]);
    }
    (r, buf)
}

/// Write `buf[range]` at `offset` by read-modify-write of the aligned span
/// around it, with overlapping requests held off (serialising, in
/// `tracker`) so no update is lost between our read and our write.
pub async fn write_covered(
    offset: u64,
    buf: IoBuf,
    range: Range<usize>,
    align: u64,
    tracker: &RangeTracker,
    read: impl AsyncFnOnce(u64, IoBuf) -> (Result<()>, IoBuf),
    write: impl AsyncFnOnce(u64, IoBuf) -> (Result<()>, IoBuf),
) -> (Result<()>, IoBuf) {
    let (start, end) = aligned_cover(offset, range.len(), align);
    let _t = tracker.begin(start, end, true).await;
    let (r, mut tmp) = read(start, IoBuf::new((end - start) as usize)).await;
    if let Err(e) = r {
        return (Err(e), buf);
    }
    let s = (offset - start) as usize;
    tmp[s..s + range.len()].copy_from_slice(&buf[range]);
    (write(start, tmp).await.0, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{spawn_local, yield_now, Runtime};
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn serialising_requests_exclude_overlaps_only() {
        let rt = Runtime::single().unwrap();
        let log = rt.block_on(|| async {
            let t = Rc::new(RangeTracker::new());
            let log = Rc::new(RefCell::new(Vec::new()));
            let plain = t.begin(0, 100, false).await;
            let plain2 = t.begin(50, 150, false).await; // plain overlaps plain: fine
            let (t2, l2) = (t.clone(), log.clone());
            let rmw = spawn_local(async move {
                let _g = t2.begin(90, 110, true).await;
                l2.borrow_mut().push("rmw");
            });
            let (t3, l3) = (t.clone(), log.clone());
            let far = spawn_local(async move {
                let _g = t3.begin(1000, 2000, true).await;
                l3.borrow_mut().push("far");
            });
            for _ in 0..10 {
                yield_now().await;
            }
            log.borrow_mut().push("plain done");
            drop(plain);
            drop(plain2);
            rmw.await;
            far.await;
            assert_eq!(t.in_flight(), 0);
            Rc::try_unwrap(log).unwrap().into_inner()
        });
        assert_eq!(log, vec!["far", "plain done", "rmw"]);
    }
}
