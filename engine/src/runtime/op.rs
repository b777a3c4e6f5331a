//! The future of one tracked operation on the current shard's ring (or its Linux
//! AIO context): waits for the completion, hands back the resources it owns. If
//! dropped mid-flight it parks those resources in the op slab until the kernel is
//! done with them. It does not build SQEs; callers in `aio/` do.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use super::shard::{OpSlot, Shard};

/// An in-flight operation that owns `R` (buffers, iovecs) until completion.
/// Not Send: it must be polled and dropped on the shard that submitted it.
pub(crate) struct Op<R: 'static> {
    shard: Rc<Shard>,
    key: Option<usize>,
    res: Option<R>,
    _not_send: PhantomData<*const ()>,
}

impl<R: 'static> Op<R> {
    pub(crate) fn new(shard: Rc<Shard>, key: usize, res: R) -> Op<R> {
        Op { shard, key: Some(key), res: Some(res), _not_send: PhantomData }
    }
}

// Op holds no self-references; pinning it guarantees nothing we rely on.
impl<R: 'static> Unpin for Op<R> {}

impl<R: 'static> Future for Op<R> {
    /// The raw result (>= 0 success, negative errno) and the resources back.
    type Output = (i32, R);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<(i32, R)> {
        let this = self.get_mut();
        let key = this.key.expect("Op polled after completion");
        let mut ops = this.shard.ops.borrow_mut();
        match ops.get_mut(key) {
            Some(OpSlot::Done(r)) => {
                let r = *r;
                ops.remove(key);
                this.key = None;
                Poll::Ready((r, this.res.take().expect("resources present until completion")))
            }
            Some(OpSlot::Waiting(w)) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            _ => unreachable!("op slot {key} vanished while its future was alive"),
        }
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut ops = self.shard.ops.borrow_mut();
        match ops.get_mut(key) {
            Some(OpSlot::Done(_)) => {
                ops.remove(key);
            }
            Some(slot) => {
                // Still in the kernel's hands: the buffers must outlive this future.
                let res = self.res.take().map(|r| Box::new(r) as Box<dyn std::any::Any>);
                *slot = OpSlot::Abandoned(res.unwrap_or_else(|| Box::new(())));
            }
            None => {}
        }
    }
}
