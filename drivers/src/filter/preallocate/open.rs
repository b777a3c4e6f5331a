//! Opening the filter: its options, the permissions it takes on its file,
//! recovery of a file left long, and the choice of how to extend it.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use engine::block::{BlockNode, BoxFuture, Driver, DriverKind, OpenCtx, Perm, Prealloc, RangeTracker};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;

use super::marker::{read_marker, recover_end, MARKER};
use super::{Config, Mode, PreallocNode, State, Unwritten, MIB};

/// The file was opened with O_DIRECT (cache=none): no page cache to write
/// behind.
fn direct_io(fd: RawFd) -> bool {
    // SAFETY: F_GETFL on the child's open file.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    fl < 0 || fl & libc::O_DIRECT != 0
}

/// Does the file's filesystem fallocate? Asked with KEEP_SIZE past the end
/// (the size stays), then given back by a truncate to the same size.
fn probe_falloc(fd: RawFd, len: u64) -> bool {
    // SAFETY: fallocate and ftruncate on our own fd, to sizes it has.
    unsafe {
        let ok = libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, len as libc::off_t, 4096) == 0;
        if ok {
            libc::ftruncate(fd, len as libc::off_t);
        }
        ok
    }
}

pub struct PreallocDriver;

impl Driver for PreallocDriver {
    fn name(&self) -> &'static str {
        "preallocate"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }
    fn open_filter<'a>(&'a self, ctx: &'a OpenCtx, mut opts: OptionTree) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move {
            let align = opts.take_size("prealloc-align")?.unwrap_or(MIB);
            let size = opts.take_size("prealloc-size")?.unwrap_or(128 * MIB);
            let max_size = opts.take_size("prealloc-max-size")?.unwrap_or(size.max(1 << 30));
            let ahead = opts.take_bool("prealloc-ahead")?.unwrap_or(true);
            let write_behind = opts.take_size("prealloc-write-behind")?.unwrap_or(32 * MIB);
            let mode = opts.take("prealloc-mode");
            if align == 0 || !align.is_power_of_two() {
                return Err(invalid(format!("prealloc-align must be a power of two, not {align}")));
            }
            if size > 1 << 40 || max_size > 1 << 40 {
                return Err(invalid("prealloc-size and prealloc-max-size may be at most 1T"));
            }
            if max_size < size {
                return Err(invalid(format!("prealloc-max-size ({max_size}) is below prealloc-size ({size})")));
            }
            let file_opts = opts.take_subtree("file");
            opts.ensure_consumed("The 'preallocate' filter")?;

            // Exclusive write and resize on the file; without write, or when
            // someone else writes to it, a pass-through.
            let mut excl = ctx.clone();
            excl.flags.extra_perm = excl.flags.extra_perm.union(Perm::RESIZE);
            excl.flags.shared = excl.flags.shared.without(Perm::WRITE.union(Perm::RESIZE));
            let (file, active) = if !ctx.flags.write {
                (ctx.open_protocol(file_opts).await?, false)
            } else {
                match excl.open_protocol(file_opts.clone()).await {
                    Ok(f) => (f, true),
                    Err(e) if e.kind() == ErrorKind::Locked => {
                        let f = ctx.open_protocol(file_opts).await?;
                        (ctx.warn)(&format!(
                            "preallocate: {}: shared with another writer, so not preallocating ({e})",
                            f.filename()
                        ));
                        (f, false)
                    }
                    Err(e) => return Err(e),
                }
            };
            let fd = file.passthrough_fd().map(|(fd, _)| fd);
            let mut len = file.size();
            if active {
                if let Some((fd, m)) = fd.and_then(|fd| read_marker(fd).map(|m| (fd, m))) {
                    // Left long by a crash: cut the preallocated tail.
                    let end = recover_end(fd, m.min(len), len)
                        .map_err(|e| Error::os("finding the end of the data", e).with_file(file.filename()))?;
                    if end < len {
                        file.truncate(end, false, Prealloc::Off).await?;
                        (ctx.warn)(&format!(
                            "preallocate: {}: the file was left preallocated (a crash?): cut from {len} to {end} bytes",
                            file.filename()
                        ));
                        len = end;
                    }
                    // SAFETY: fd is the child's open file; the name is live.
                    unsafe { libc::fremovexattr(fd, MARKER.as_ptr()) };
                }
            }
            let direct = fd.is_none_or(direct_io);
            let mode = match mode.as_deref() {
                Some("falloc") => Mode::Falloc,
                Some("zeroes") => Mode::Zeroes,
                Some("sparse") => Mode::Sparse,
                None | Some("auto") => match fd {
                    // Through the page cache every write holds the file's
                    // lock anyway (and io_uring runs buffered writes to one
                    // file one at a time), so they gain nothing from
                    // allocating in parallel, and lose each one's own
                    // allocation round trip: fallocate ahead, as locally.
                    Some(fd) if direct && crate::protocol::sys::remote_fs(fd) => Mode::Sparse,
                    Some(fd) if active && !probe_falloc(fd, len) => Mode::Zeroes,
                    _ => Mode::Falloc,
                },
                Some(m) => {
                    return Err(invalid(format!(
                        "invalid prealloc-mode '{m}': expected auto, falloc, zeroes or sparse"
                    )))
                }
            };
            let cfg = Config { align, size, max_size, ahead, mode, write_behind };
            let behind_fd = match fd {
                Some(fd) if active && write_behind > 0 && !direct => {
                    // SAFETY: fd is the child's open file, open for this call.
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok().map(Arc::new)
                }
                _ => None,
            };
            let st = State {
                data_end: len,
                file_end: len,
                step: size,
                marked: None,
                failed: false,
                ahead_running: false,
                last_ahead: None,
                cheap: false,
                lead: 0,
                unwritten: Unwritten::default(),
                behind: len,
                behind_running: false,
            };
            Ok(Arc::new_cyclic(|me| PreallocNode {
                file,
                active,
                cfg,
                fd,
                st: Mutex::new(st),
                behind_fd,
                growing: RangeTracker::new(),
                me: me.clone(),
            }) as Arc<dyn BlockNode>)
        })
    }
}
