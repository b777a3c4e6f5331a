//! In-flight request tracking for requests that must not overlap: a
//! read-modify-write (misaligned O_DIRECT write, later partial-cluster COW) is
//! *serialising*: it waits for every overlapping request in flight, and every
//! request that overlaps it waits for it. Plain requests never wait for each
//! other. Waiters park their wakers (any shard) and are woken when a request
//! they may be waiting for ends.

use std::future::poll_fn;
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
