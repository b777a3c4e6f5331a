//! The io_uring backend: reads and writes go to the current shard's ring, with
//! READ_FIXED/WRITE_FIXED when the buffer comes from the shard's registered pool
//! and a registered-file slot when one is free.

use std::io;

use io_uring::{opcode, squeue, types};

use super::{errno_result, AioFile, Rw};
use crate::runtime::op::Op;
use crate::runtime::shard::{expect_current, MergeWindow, Shard};
use crate::runtime::IoBuf;

fn target(shard: &Shard, f: &AioFile) -> Result<types::Fixed, types::Fd> {
    match shard.file_slot(f.uid, f.fd()) {
        Some((slot, new)) => {
            if new {
                // Remember the shard so closing the file drops the ring's reference.
                let mut reg = f.registered_on.lock().unwrap_or_else(|e| e.into_inner());
                reg.push(std::sync::Arc::downgrade(&shard.shared));
            }
            Ok(types::Fixed(slot))
        }
        None => Err(types::Fd(f.fd())),
    }
}

macro_rules! with_target {
    ($t:expr, |$fd:ident| $body:expr) => {
        match $t {
            Ok($fd) => $body,
            Err($fd) => $body,
        }
    };
}

pub(super) async fn rw(f: &AioFile, buf: IoBuf, rw: Rw) -> (io::Result<usize>, IoBuf) {
    let shard = expect_current();
    let t = target(&shard, f);
    submit_rw(shard, t, buf, rw, f.merge_writes).await
}

/// A read or write on the current shard by plain fd (a request that hopped
/// here from another shard: the file may not be registered with this ring).
pub(super) async fn rw_fd(fd: &std::os::fd::OwnedFd, buf: IoBuf, rw: Rw) -> (io::Result<usize>, IoBuf) {
    use std::os::fd::AsRawFd;
    // Only page-cache writes hop, and those gain from merging anywhere.
    submit_rw(expect_current(), Err(types::Fd(fd.as_raw_fd())), buf, rw, true).await
}

async fn submit_rw(
    shard: std::rc::Rc<Shard>,
    t: Result<types::Fixed, types::Fd>,
    mut buf: IoBuf,
    rw: Rw,
    merge: bool,
) -> (io::Result<usize>, IoBuf) {
    let Rw { at, len, off, write, fua } = rw;
    let len32 = u32::try_from(len).expect("single I/O is below 4 GiB (block layer splits)");
    // SAFETY: at + len <= buf.len() was asserted by the caller.
    let ptr = unsafe { buf.as_mut_ptr().add(at) };
    let fixed = if shard.pool_registered { buf.fixed_index(shard.pool.id()) } else { None };
    let rw_flags = if fua { libc::RWF_DSYNC } else { 0 };
    if write && merge && shard.merge_writes {
        // It may go out with its neighbours in one vectored write.
        let key = shard.merge_write(t, off, ptr, len32, fixed, rw_flags);
        let (res, buf) = Op::new(shard, key, buf).await;
        return (errno_result(res), buf);
    }
    let sqe: squeue::Entry = match (write, fixed) {
        (false, Some(i)) => {
            with_target!(t, |fd| opcode::ReadFixed::new(fd, ptr, len32, i).offset(off).build())
        }
        (false, None) => with_target!(t, |fd| opcode::Read::new(fd, ptr, len32).offset(off).build()),
        (true, Some(i)) => with_target!(t, |fd| opcode::WriteFixed::new(fd, ptr, len32, i)
            .offset(off)
            .rw_flags(rw_flags)
            .build()),
        (true, None) => {
            with_target!(t, |fd| opcode::Write::new(fd, ptr, len32).offset(off).rw_flags(rw_flags).build())
        }
    };
    let key = shard.submit_op(sqe);
    shard.queued_bytes(len as u64);
    let (res, buf) = Op::new(shard, key, buf).await;
    (errno_result(res), buf)
}

/// The SQE for a merge window: its one write as it would have gone alone,
/// or a vectored write of `iov` (one entry per member) at the window's start.
pub(crate) fn window_sqe(w: &MergeWindow, iov: Option<&[libc::iovec]>) -> squeue::Entry {
    match (iov, w.members.first()) {
        (Some(iov), _) => with_target!(w.target, |fd| opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
            .offset(w.off)
            .rw_flags(w.rw_flags)
            .build()),
        (None, Some(&(_, data, len, Some(i)))) => with_target!(w.target, |fd| opcode::WriteFixed::new(fd, data, len, i)
            .offset(w.off)
            .rw_flags(w.rw_flags)
            .build()),
        (None, Some(&(_, data, len, None))) => with_target!(w.target, |fd| opcode::Write::new(fd, data, len)
            .offset(w.off)
            .rw_flags(w.rw_flags)
            .build()),
        (None, None) => unreachable!("a merge window holds at least one write"),
    }
}

pub(super) async fn fsync(f: &AioFile, datasync: bool) -> io::Result<()> {
    let shard = expect_current();
    let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
    let sqe = with_target!(target(&shard, f), |fd| opcode::Fsync::new(fd).flags(flags).build());
    let key = shard.submit_op(sqe);
    errno_result(Op::new(shard, key, ()).await.0).map(drop)
}

pub(super) async fn fallocate(f: &AioFile, mode: i32, off: u64, len: u64) -> io::Result<()> {
    let shard = expect_current();
    let sqe = with_target!(target(&shard, f), |fd| opcode::Fallocate::new(fd, len).offset(off).mode(mode).build());
    let key = shard.submit_op(sqe);
    errno_result(Op::new(shard, key, ()).await.0).map(drop)
}
