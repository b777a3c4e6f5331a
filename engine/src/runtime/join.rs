//! Join handles: how a task's result gets back to whoever spawned it, on another
//! thread (`JoinHandle`, blocking join or await) or on the same shard
//! (`LocalJoinHandle`).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
    closed: bool,
}

pub(crate) struct Sender<T>(Arc<(Mutex<Slot<T>>, Condvar)>);

/// The result of a task spawned onto a shard from anywhere. `join()` blocks the
/// calling thread (never call it on a shard); `.await` works from another shard.
pub struct JoinHandle<T>(Arc<(Mutex<Slot<T>>, Condvar)>);

pub(crate) fn channel<T>() -> (Sender<T>, JoinHandle<T>) {
    let inner = Arc::new((Mutex::new(Slot { value: None, waker: None, closed: false }), Condvar::new()));
    (Sender(inner.clone()), JoinHandle(inner))
}

impl<T> Sender<T> {
    pub(crate) fn send(self, value: T) {
        let mut slot = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        slot.value = Some(value);
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
        self.0 .1.notify_all();
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut slot = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        slot.closed = true;
        if let Some(w) = slot.waker.take() {
            w.wake();
        }
        self.0 .1.notify_all();
    }
}

impl<T> JoinHandle<T> {
    /// Wait for the task. Panics if the task was dropped without finishing (its
    /// shard shut down or the task panicked), which is a bug in the caller's setup.
    pub fn join(self) -> T {
        let (lock, cv) = &*self.0;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = slot.value.take() {
                return v;
            }
            assert!(!slot.closed, "task dropped before it finished (shard stopped or task panicked)");
            slot = cv.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut slot = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = slot.value.take() {
            return Poll::Ready(v);
        }
        assert!(!slot.closed, "task dropped before it finished (shard stopped or task panicked)");
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

type LocalSlot<T> = Rc<RefCell<(Option<T>, Option<Waker>)>>;

/// The result of a task spawned on the current shard.
pub struct LocalJoinHandle<T>(pub(crate) LocalSlot<T>);

pub(crate) fn local_channel<T>() -> (LocalSlot<T>, LocalJoinHandle<T>) {
    let s = Rc::new(RefCell::new((None, None)));
    (s.clone(), LocalJoinHandle(s))
}

pub(crate) fn local_send<T>(slot: &LocalSlot<T>, v: T) {
    let waker = {
        let mut s = slot.borrow_mut();
        s.0 = Some(v);
        s.1.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

impl<T> Future for LocalJoinHandle<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.0.borrow_mut();
        match s.0.take() {
            Some(v) => Poll::Ready(v),
            None => {
                s.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
