//! `preallocate`: a filter between a format and its file that grows the file
//! in large aligned steps, so that the filesystem allocates in big pieces
//! instead of one cluster at a time (QEMU's filter of the same name and
//! options, `prealloc-align` and `prealloc-size`):
//!
//!   driver=qcow2,file.driver=preallocate,file.file.driver=file,file.file.filename=X
//!
//! The node remembers where the data ends (`data_end`, the size its parent
//! sees) apart from where the file ends (`file_end`). A write that reaches
//! past the file's end first extends the file to the write's end plus
//! `prealloc-size`, rounded up to `prealloc-align`; everything between the
//! two ends reads as zeroes. Beyond QEMU, the extension runs ahead of the
//! writer (`prealloc-ahead`): once the data comes within half a step of the
//! file's end, the next step is allocated in the background, so a sequential
//! writer does not wait for allocation, and the step doubles (up to
//! `prealloc-max-size`) while the writer keeps catching up with it and
//! allocating is cheap. How the file is extended (`prealloc-mode`) depends
//! on the filesystem: the size moved and the new range allocated on local
//! filesystems and through the page cache, only the size moved for O_DIRECT
//! on network filesystems and FUSE, zeroes written where fallocate fails. At close the file is cut
//! back to the end of the data.
//!
//! Through the page cache (a child without O_DIRECT), the filter also
//! writes behind a growing writer (`prealloc-write-behind`, default 32M):
//! once the data has grown by that much, writeback of the part one step
//! behind its end is started (sync_file_range, SYNC_FILE_RANGE_WRITE, on a
//! helper thread), so that the disk works while the writer fills the cache
//! instead of after it, at the final flush. Durability is unchanged: only
//! a flush says the data is on stable storage.
//!
//! A file left long by a crash carries a marker (the extended attribute
//! `user.ringblk.preallocate`, holding a data end the data reaches at least):
//! the next open through the filter finds the last non-zero byte past it
//! and cuts the file there, so the format above never sees the
//! preallocated tail as data.
//!
//! The filter needs to be the only writer and resizer of its file. Opened
//! read-only, or when another process shares the file for writing, it passes
//! everything through and says so once.

mod ahead;
mod marker;
mod open;
mod unwritten;

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, Weak};

use engine::block::{BlockNode, BoxFuture, Child, Extent, Limits, Prealloc, RangeTracker, WriteFlags, ZeroFlags};
use engine::error::{Error, ErrorKind, Result};
use engine::runtime::IoBuf;

pub use open::PreallocDriver;
use unwritten::Unwritten;

const MIB: u64 = 1 << 20;
/// A writer that comes back for the next step within this is streaming.
const STREAMING: std::time::Duration = std::time::Duration::from_secs(1);
/// An extension that allocated at least this many bytes a second was cheap:
/// its cost was the call, not the bytes (ext4 allocates 1 GiB of unwritten
/// extents in milliseconds), so a bigger step saves calls. Where allocating
/// costs in proportion to its size (a network filesystem, the slowfs rig at
/// 1 GiB/s), a bigger step saves nothing and leaves more to give back at
/// the end, so the step stays.
const CHEAP_ALLOC_RATE: u64 = 8 << 30;

/// How the file is extended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// fallocate: blocks allocated, reading as zeroes, the size moved.
    Falloc,
    /// Zeroes written: for filesystems without fallocate.
    Zeroes,
    /// Only the size moved, for O_DIRECT files on filesystems reached over a
    /// network (and FUSE): there fallocate is one request that holds the file's lock
    /// while the server allocates, so every write waits for it, and a
    /// write past the end is serialised with all others. Inside the size,
    /// writes go in parallel and the server allocates for each in parallel.
    Sparse,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Falloc => "falloc",
            Mode::Zeroes => "zeroes",
            Mode::Sparse => "sparse",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Config {
    align: u64,
    size: u64,
    max_size: u64,
    ahead: bool,
    mode: Mode,
    /// Start writeback once the data has grown by this much (0: never).
    write_behind: u64,
}

struct State {
    /// Where the data ends: the size the parent sees.
    data_end: u64,
    /// Where the file ends (>= data_end); [data_end, file_end) reads zeroes.
    file_end: u64,
    /// The next extension's step (prealloc-size, doubled while the writer
    /// keeps reaching the file's end, up to prealloc-max-size).
    step: u64,
    /// The data end the marker holds, if set.
    marked: Option<u64>,
    /// Extensions failed (a full filesystem): no more are tried.
    failed: bool,
    /// A background extension is in flight.
    ahead_running: bool,
    /// When the last background extension started.
    last_ahead: Option<std::time::Instant>,
    /// The last extension allocated at CHEAP_ALLOC_RATE or faster.
    cheap: bool,
    /// What the writer wrote while the last background extension ran.
    lead: u64,
    unwritten: Unwritten,
    /// Writeback has been started for the data below this.
    behind: u64,
    /// A write-behind is in flight.
    behind_running: bool,
}

pub struct PreallocNode {
    file: Arc<dyn BlockNode>,
    /// False: a pass-through (no write or resize permission of its own).
    active: bool,
    cfg: Config,
    /// The file's descriptor, for the marker (None: the child is not a plain
    /// file, and a crash leaves it long).
    fd: Option<RawFd>,
    st: Mutex<State>,
    /// A descriptor of our own for write-behind, when the child's file goes
    /// through the page cache: the call runs on a helper thread and may
    /// outlive the child's close.
    behind_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// One extension at a time (the whole range, serialising).
    growing: RangeTracker,
    me: Weak<PreallocNode>,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a).saturating_mul(a)
}

impl PreallocNode {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data_end(&self) -> u64 {
        self.state().data_end
    }

    fn err(&self, e: Error, what: &str) -> Error {
        Error::new(e.kind(), format!("preallocate: {what}: {e}")).with_file(self.file.filename())
    }

    /// Make sure the file reaches `end` before a write that ends there: the
    /// write waits only when it goes past the file's end (the data never
    /// does while the extensions run ahead).
    async fn reserve(&self, end: u64) -> Result<()> {
        if !self.active || end <= self.state().file_end {
            return Ok(());
        }
        let _one = self.growing.begin(0, u64::MAX, true).await;
        let (file_end, step, failed) = {
            let s = self.state();
            (s.file_end, s.step, s.failed)
        };
        if end <= file_end {
            return Ok(());
        }
        if failed {
            // Plain growth by the write itself; the file's end follows it.
            return Ok(());
        }
        let target = align_up(end.saturating_add(step), self.cfg.align);
        self.extend(file_end, target).await
    }

    /// Extend the file from `from` (its end) to `to`; the caller holds
    /// `growing`. The marker goes first, so a crash after the extension
    /// finds it.
    async fn extend(&self, from: u64, to: u64) -> Result<()> {
        let data_end = self.data_end();
        self.mark(data_end);
        let prealloc = match self.cfg.mode {
            Mode::Falloc => Prealloc::Falloc,
            Mode::Zeroes => Prealloc::Full,
            Mode::Sparse => Prealloc::Off,
        };
        let t0 = std::time::Instant::now();
        match self.file.truncate(to, false, prealloc).await {
            Ok(()) => {
                let secs = t0.elapsed().as_secs_f64();
                let mut s = self.state();
                s.cheap = (to - from) as f64 >= CHEAP_ALLOC_RATE as f64 * secs;
                s.file_end = to;
                s.unwritten.add(from, to);
                Ok(())
            }
            Err(e) => {
                // A full or odd filesystem: stop preallocating, keep what the
                // file has (the truncate may have moved its end), let writes
                // grow it themselves.
                let size = self.file.size().max(from);
                let mut s = self.state();
                s.failed = true;
                s.file_end = size;
                drop(s);
                if e.kind() == ErrorKind::NoSpace || e.kind() == ErrorKind::Unsupported {
                    Ok(())
                } else {
                    Err(self.err(e, "extending the file"))
                }
            }
        }
    }

    /// A write of [offset, end) through to the file (`io`): the file made
    /// long enough first, the range no longer unwritten, the data's end
    /// moved once it is done.
    async fn write_through<'a>(
        &'a self,
        offset: u64,
        end: u64,
        buf: IoBuf,
        io: impl FnOnce(IoBuf) -> BoxFuture<'a, (Result<()>, IoBuf)>,
    ) -> (Result<()>, IoBuf) {
        if let Err(e) = self.reserve(end).await {
            return (Err(e), buf);
        }
        self.written(offset, end);
        let (r, buf) = io(buf).await;
        if r.is_ok() {
            self.wrote(end);
        }
        (r, buf)
    }

    /// Before a write of [start, end): its range holds data from now on.
    fn written(&self, start: u64, end: u64) {
        if self.active {
            self.state().unwritten.remove(start, end);
        }
    }

    /// After a write that ended at `end`: move the data end, and start the
    /// next extension in the background once the data comes within half a
    /// step of the file's end.
    fn wrote(&self, end: u64) {
        if !self.active {
            return;
        }
        {
            let mut s = self.state();
            if end <= s.data_end {
                return;
            }
            s.data_end = end;
        }
        self.maybe_ahead();
        self.maybe_write_behind();
    }

    /// Cut the file back to the data's end (close, and shrinking truncates).
    async fn trim(&self) -> Result<()> {
        let _one = self.growing.begin(0, u64::MAX, true).await;
        let (data_end, file_end) = {
            let s = self.state();
            (s.data_end, s.file_end)
        };
        if file_end > data_end {
            self.file.truncate(data_end, false, Prealloc::Off).await.map_err(|e| self.err(e, "trimming the file"))?;
            let mut s = self.state();
            s.file_end = data_end;
            s.unwritten.remove(data_end, u64::MAX);
        }
        self.unmark();
        Ok(())
    }
}

impl BlockNode for PreallocNode {
    fn driver(&self) -> &'static str {
        "preallocate"
    }
    fn filename(&self) -> String {
        self.file.filename()
    }
    fn size(&self) -> u64 {
        if self.active {
            self.data_end()
        } else {
            self.file.size()
        }
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn read_only(&self) -> bool {
        self.file.read_only()
    }
    fn children(&self) -> Vec<Child> {
        vec![Child { role: "file", node: self.file.clone() }]
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let len = buf.len();
        self.read_part(offset, buf, 0..len)
    }
    fn read_part(
        &self,
        offset: u64,
        mut buf: IoBuf,
        range: std::ops::Range<usize>,
    ) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if !self.active {
                return self.file.read_part(offset, buf, range).await;
            }
            // Past the data's end everything reads as zeroes.
            let end = self.data_end();
            let len = range.len() as u64;
            let inside = end.saturating_sub(offset).min(len) as usize;
            buf[range.start + inside..range.end].fill(0);
            if inside == 0 {
                return (Ok(()), buf);
            }
            self.file.read_part(offset, buf, range.start..range.start + inside).await
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let len = buf.len();
        self.write_part(offset, buf, 0..len, flags)
    }
    fn write_part(
        &self,
        offset: u64,
        buf: IoBuf,
        range: std::ops::Range<usize>,
        flags: WriteFlags,
    ) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let end = offset.saturating_add(range.len() as u64);
        Box::pin(self.write_through(offset, end, buf, move |buf| self.file.write_part(offset, buf, range, flags)))
    }
    fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let end = offset.saturating_add(buf.len() as u64);
        Box::pin(self.write_through(offset, end, buf, move |buf| self.file.write_compressed(offset, buf)))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let end = offset.saturating_add(len);
            if !self.active {
                return self.file.write_zeroes(offset, len, flags).await;
            }
            // What lies past the data's end is zero already: only the part
            // below it is zeroed, then the data's end moves.
            let data_end = self.data_end();
            if offset < data_end {
                self.file.write_zeroes(offset, end.min(data_end) - offset, flags).await?;
            }
            if end > data_end {
                self.reserve(end).await?;
                self.wrote(end);
                if flags.fua {
                    self.flush().await?;
                }
            }
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let end =
                if self.active { offset.saturating_add(len).min(self.data_end()) } else { offset.saturating_add(len) };
            if end <= offset {
                return Ok(());
            }
            self.file.discard(offset, end - offset).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.active {
                let (data_end, file_end) = {
                    let s = self.state();
                    (s.data_end, s.file_end)
                };
                if file_end > data_end {
                    self.mark(data_end);
                }
            }
            self.file.flush().await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            if !self.active {
                return self.file.block_status(offset, len).await;
            }
            let (end, (inside, next)) = {
                let s = self.state();
                (s.data_end, s.unwritten.at(offset))
            };
            if offset >= end {
                return Ok(Extent { len, data: false, zero: true, allocated: false, offset: None, compressed: false });
            }
            let len = len.min(end - offset);
            if let Some(e) = inside {
                // Allocated by us, never written: a hole to the reader.
                let n = (e - offset).min(len);
                return Ok(Extent {
                    len: n,
                    data: false,
                    zero: true,
                    allocated: true,
                    offset: Some(offset),
                    compressed: false,
                });
            }
            let len = next.map_or(len, |n| len.min(n - offset));
            self.file.block_status(offset, len).await
        })
    }
    fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.active {
                return self.file.truncate(size, exact, prealloc).await;
            }
            let data_end = self.data_end();
            if size < data_end {
                // Shrinking: the file goes down with the data, so that what
                // is cut reads as zeroes if the data grows back over it.
                {
                    let _one = self.growing.begin(0, u64::MAX, true).await;
                    self.file.truncate(size, exact, Prealloc::Off).await?;
                    let mut s = self.state();
                    s.data_end = size;
                    s.file_end = size;
                    s.behind = s.behind.min(size);
                    s.unwritten.remove(size, u64::MAX);
                }
                self.unmark();
                return Ok(());
            }
            if size > self.state().file_end {
                let _one = self.growing.begin(0, u64::MAX, true).await;
                let file_end = self.state().file_end;
                if size > file_end {
                    self.file.truncate(size, exact, prealloc).await?;
                    // Never written: zeroes, though the filesystem block
                    // holding the old end may have been allocated by us.
                    let mut s = self.state();
                    s.file_end = size;
                    s.unwritten.add(file_end, size);
                }
            }
            // Inside the preallocated part: zeroes, allocated already.
            let mut s = self.state();
            s.data_end = s.data_end.max(size);
            Ok(())
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let trimmed = if self.active && !self.file.read_only() { self.trim().await } else { Ok(()) };
            let closed = self.file.close().await;
            trimmed.and(closed)
        })
    }
    fn allocated_size(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        self.file.allocated_size()
    }
    fn passthrough_fd(&self) -> Option<(RawFd, u64)> {
        self.file.passthrough_fd()
    }
    fn cached_extent(&self, offset: u64, len: u64) -> Option<(RawFd, u64)> {
        (offset.checked_add(len)? <= self.size()).then(|| self.file.cached_extent(offset, len))?
    }
    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        // Only writes inside the data: growing ones take `write_part`.
        (offset.checked_add(data.len() as u64)? <= self.size()).then(|| self.file.write_now(offset, data))?
    }
    fn map_cached(&self, offset: u64, len: usize) -> Option<IoBuf> {
        (offset.checked_add(len as u64)? <= self.size()).then(|| self.file.map_cached(offset, len))?
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        let s = self.state();
        Some(serde_json::json!({
            "type": "preallocate",
            "data": {
                "active": self.active,
                "mode": self.cfg.mode.name(),
                "prealloc-align": self.cfg.align,
                "prealloc-size": self.cfg.size,
                "prealloc-max-size": self.cfg.max_size,
                "prealloc-ahead": self.cfg.ahead,
                "prealloc-write-behind": if self.behind_fd.is_some() { self.cfg.write_behind } else { 0 },
                "written-behind": s.behind,
                "step": s.step,
                "data-end": s.data_end,
                "file-end": s.file_end,
            }
        }))
    }
}
