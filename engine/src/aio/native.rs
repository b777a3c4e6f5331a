//! The Linux AIO backend (`aio=native`): iocbs queued per shard and handed to the
//! kernel with one io_submit per loop turn; the context signals an eventfd whose
//! read stays armed on the shard's ring, and the loop reaps events with
//! io_getevents without blocking. Like QEMU, callers must use O_DIRECT: without it
//! io_submit does the I/O synchronously.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{errno_result, AioFile, Rw};
use crate::runtime::op::Op;
use crate::runtime::shard::{expect_current, Shard};
use crate::runtime::IoBuf;

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_FLAG_RESFD: u32 = 1;
/// Events the kernel context holds; more in flight wait in our queue.
const CTX_EVENTS: u32 = 1024;

/// `struct iocb` from <linux/aio_abi.h> (little-endian layout).
///
/// | off | size | field          |
/// |-----|------|----------------|
/// | 0   | 8    | aio_data       |
/// | 8   | 4    | aio_key        |
/// | 12  | 4    | aio_rw_flags   |
/// | 16  | 2    | aio_lio_opcode |
/// | 18  | 2    | aio_reqprio    |
/// | 20  | 4    | aio_fildes     |
/// | 24  | 8    | aio_buf        |
/// | 32  | 8    | aio_nbytes     |
/// | 40  | 8    | aio_offset     |
/// | 48  | 8    | aio_reserved2  |
/// | 56  | 4    | aio_flags      |
/// | 60  | 4    | aio_resfd      |
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// A shard's Linux AIO context, made on first use.
pub(crate) struct NativeCtx {
    ctx: libc::c_ulong,
    eventfd: OwnedFd,
    queued: Vec<Iocb>,
}

impl NativeCtx {
    fn new() -> io::Result<NativeCtx> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id to `ctx`, a live local.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, CTX_EVENTS as libc::c_long, &mut ctx as *mut libc::c_ulong) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: no memory arguments.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: ctx came from io_setup above.
            unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
            return Err(e);
        }
        // SAFETY: efd was just created and is owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        Ok(NativeCtx { ctx, eventfd, queued: Vec::new() })
    }

    pub(crate) fn destroy(self) {
        // SAFETY: ctx came from io_setup; io_destroy waits for outstanding iocbs,
        // whose buffers the op slab still holds at this point.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}

pub(super) async fn rw(f: &AioFile, mut buf: IoBuf, rw: Rw) -> (io::Result<usize>, IoBuf) {
    let Rw { at, len, off, write, fua } = rw;
    let shard = expect_current();
    if let Err(e) = ensure_ctx(&shard) {
        return (Err(e), buf);
    }
    let key = shard.ops.borrow_mut().insert(crate::runtime::shard::OpSlot::Waiting(None));
    // SAFETY: at + len <= buf.len() was asserted by the caller.
    let ptr = unsafe { buf.as_mut_ptr().add(at) };
    let efd = shard.native.borrow().as_ref().map(|c| c.eventfd.as_raw_fd()).expect("ctx ensured");
    let iocb = Iocb {
        aio_data: key as u64,
        aio_rw_flags: if fua { libc::RWF_DSYNC } else { 0 },
        aio_lio_opcode: if write { IOCB_CMD_PWRITE } else { IOCB_CMD_PREAD },
        aio_fildes: f.fd() as u32,
        aio_buf: ptr as u64,
        aio_nbytes: len as u64,
        aio_offset: off as i64,
        aio_flags: IOCB_FLAG_RESFD,
        aio_resfd: efd as u32,
        ..Default::default()
    };
    shard.native.borrow_mut().as_mut().expect("ctx ensured").queued.push(iocb);
    let (res, buf) = Op::new(shard, key, buf).await;
    (errno_result(res), buf)
}

fn ensure_ctx(shard: &Shard) -> io::Result<()> {
    if shard.native.borrow().is_some() {
        return Ok(());
    }
    let ctx = NativeCtx::new()?;
    shard.arm_native(ctx.eventfd.as_raw_fd());
    *shard.native.borrow_mut() = Some(ctx);
    Ok(())
}

/// Hand every queued iocb to the kernel: one io_submit per loop turn.
pub(crate) fn flush(shard: &Shard) {
    loop {
        let (ctx, mut ptrs) = {
            let native = shard.native.borrow();
            let Some(n) = native.as_ref() else { return };
            if n.queued.is_empty() {
                return;
            }
            (n.ctx, n.queued.iter().map(|i| i as *const Iocb).collect::<Vec<_>>())
        };
        // SAFETY: ptrs point into `queued`, which is not touched until io_submit
        // returns; the kernel copies the iocbs during the call. The buffers they
        // name are owned by their Op (or the slab, if abandoned) until reaped.
        let r = unsafe { libc::syscall(libc::SYS_io_submit, ctx, ptrs.len() as libc::c_long, ptrs.as_mut_ptr()) };
        let mut native = shard.native.borrow_mut();
        let n = native.as_mut().expect("checked above");
        if r >= 0 {
            n.queued.drain(..r as usize);
            if (r as usize) < ptrs.len() {
                return; // the context is full; the rest goes next turn
            }
            return;
        }
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        if errno == libc::EAGAIN {
            return;
        }
        // The first iocb was refused: fail it and try the rest.
        let bad = n.queued.remove(0);
        drop(native);
        shard.complete_op(bad.aio_data as usize, -errno);
    }
}

/// The AIO eventfd fired: collect finished events, then re-arm the eventfd read.
pub(crate) fn reap(shard: &Shard) {
    let Some((ctx, efd)) = shard.native.borrow().as_ref().map(|n| (n.ctx, n.eventfd.as_raw_fd())) else { return };
    let mut events = [IoEvent::default(); 128];
    loop {
        let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: events is a live array of the length we pass; zero is a live timespec.
        let r = unsafe {
            libc::syscall(libc::SYS_io_getevents, ctx, 0 as libc::c_long, events.len() as libc::c_long, events.as_mut_ptr(), &zero as *const libc::timespec)
        };
        if r <= 0 {
            break;
        }
        for ev in &events[..r as usize] {
            let res = if ev.res < 0 { ev.res as i32 } else { i32::try_from(ev.res).unwrap_or(i32::MAX) };
            shard.complete_op(ev.data as usize, res);
        }
        if (r as usize) < events.len() {
            break;
        }
    }
    shard.arm_native(efd);
}

#[cfg(test)]
mod tests {
    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<super::Iocb>(), 64);
        assert_eq!(std::mem::size_of::<super::IoEvent>(), 32);
    }
}
