//! The block graph core: the node trait every driver implements, request flags,
//! block status, limits and the checks every node shares. Opening graphs from
//! options lives in `open.rs`, the driver registry in `registry.rs`, image locks
//! in `lock.rs`.

mod check;
mod lock;
mod open;
mod registry;
mod tracker;

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

pub use check::{CheckFix, CheckReport};
pub use lock::{ImageLock, Perm};
pub use open::{open_image, CacheMode, OpenCtx, OpenFlags, MAX_CHAIN_DEPTH};
pub use registry::{CreateOpt, Driver, DriverKind, Registry};
pub use tracker::{aligned_cover, read_covered, write_covered, RangeTracker, Tracked};

use crate::error::{Error, ErrorKind, Result};
use crate::runtime::IoBuf;

/// Futures returned by nodes: boxed (the trait is object-safe), not Send (they
/// run on the shard that started them).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Flags of a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force Unit Access: durable before the write completes.
    pub fua: bool,
}

/// Flags of a write_zeroes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated if it then reads as zeroes.
    pub may_unmap: bool,
    /// Fail with Unsupported rather than writing zero buffers.
    pub no_fallback: bool,
    pub fua: bool,
}

/// What `block_status` says about the extent starting at the asked offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Bytes from the asked offset that share this status (> 0).
    pub len: u64,
    /// Reads return data stored here (not known to be zero).
    pub data: bool,
    /// Reads are known to return zeroes.
    pub zero: bool,
    /// Allocated in this node (false: it comes from a backing node).
    pub allocated: bool,
    /// Where the data lives in the node's `file` child, if it maps linearly.
    pub offset: Option<u64>,
    pub compressed: bool,
}

impl Extent {
    /// Reads are known to return zeroes without any data stored for them.
    pub fn is_zero_hole(&self) -> bool {
        self.zero && !self.data
    }
}

/// Request size and alignment limits of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (1 when any byte works).
    pub request_alignment: u32,
    /// Buffer addresses must be multiples of this.
    pub mem_alignment: u32,
    /// Largest single request the node takes (0: no limit).
    pub max_transfer: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { request_alignment: 1, mem_alignment: 1, max_transfer: 0 }
    }
}

/// Preallocation for create and truncate, with QEMU's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Prealloc {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

impl std::str::FromStr for Prealloc {
    type Err = Error;
    fn from_str(s: &str) -> Result<Prealloc> {
        match s {
            "off" => Ok(Prealloc::Off),
            "metadata" => Ok(Prealloc::Metadata),
            "falloc" => Ok(Prealloc::Falloc),
            "full" => Ok(Prealloc::Full),
            _ => Err(crate::error::invalid(format!(
                "invalid preallocation mode '{s}': expected off, metadata, falloc or full"
            ))),
        }
    }
}

impl Prealloc {
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// A child of a node, by role.
pub struct Child {
    pub role: &'static str,
    pub node: Arc<dyn BlockNode>,
}

/// One open driver instance. Shared by all shards; every method's future runs on
/// the shard that called it and must not hold locks across I/O.
pub trait BlockNode: Send + Sync {
    /// Driver name ("raw", "file", ...).
    fn driver(&self) -> &'static str;
    /// The name users know this node by (the file name for protocol nodes).
    fn filename(&self) -> String;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    fn limits(&self) -> Limits {
        Limits::default()
    }
    fn read_only(&self) -> bool;
    fn children(&self) -> Vec<Child> {
        Vec::new()
    }

    /// Fill `buf` from `offset`. Returns the buffer in every case.
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)>;
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)>;

    /// Fill only `buf[range]` from `offset` (formats scatter one guest request
    /// over several host extents this way). The default bounces through a
    /// temporary buffer; nodes that can read in place override it.
    fn read_part(&self, offset: u64, buf: IoBuf, range: Range<usize>) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            let mut buf = buf;
            if range.is_empty() {
                return (Ok(()), buf);
            }
            let (r, tmp) = self.read(offset, IoBuf::new(range.len())).await;
            if r.is_ok() {
                buf[range].copy_from_slice(&tmp);
            }
            (r, buf)
        })
    }

    /// Write only `buf[range]` at `offset`. The default bounces like `read_part`.
    fn write_part(
        &self,
        offset: u64,
        buf: IoBuf,
        range: Range<usize>,
        flags: WriteFlags,
    ) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if range.is_empty() {
                return (Ok(()), buf);
            }
            let tmp = IoBuf::from_slice(&buf[range]);
            let (r, _) = self.write(offset, tmp, flags).await;
            (r, buf)
        })
    }

    /// Write a whole cluster compressed (convert -c). Formats without
    /// compression say Unsupported.
    fn write_compressed(&self, _offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            (Err(Error::new(ErrorKind::Unsupported, format!("'{}' does not support compression", self.driver()))), buf)
        })
    }

    /// Allocation unit of a format with clusters (`cluster-size` in info).
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Write back everything the node caches (tables, dirty bits) so the
    /// image is complete on its file even when flushes are ignored
    /// (cache=unsafe), then close the children. Call it once, when done; the
    /// node stays usable for reads.
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for c in self.children() {
                c.node.close().await?;
            }
            Ok(())
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>>;
    /// A hint: the range's contents may be dropped. May do nothing.
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>>;
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
    /// Status of the extent at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>>;
    /// Change the size. `exact` false allows rounding up to the node's granularity.
    fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> BoxFuture<'_, Result<()>>;

    /// Bytes this node takes on its host storage, if known (`disk size` in info).
    fn allocated_size(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        Box::pin(async move {
            let mut total = None;
            for c in self.children() {
                if let Some(n) = c.node.allocated_size().await? {
                    total = Some(total.unwrap_or(0) + n);
                }
            }
            Ok(total)
        })
    }

    /// The host fd and offset where this node's bytes lie linearly, for copy
    /// offload (copy_file_range). Only protocol nodes and pass-through formats.
    fn passthrough_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }

    /// Where `len` bytes at `offset` lie, whole, contiguous and guest data,
    /// in a buffered host file whose pages are in the page cache, found
    /// without waiting: (fd, host offset). A server can then splice them to
    /// a socket by reference without blocking. `None`: read them instead.
    fn cached_extent(&self, _offset: u64, _len: u64) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }

    /// Write `data` at `offset` right now, on this thread, if the node can
    /// do so without blocking for long (a buffered write into pages already
    /// in the page cache, `x-inline-writes`): a server then writes a payload
    /// straight from its receive buffer, with no copy and no task. `None`:
    /// not possible now (nothing was written); use `write_part`. Not durable
    /// until a flush.
    fn write_now(&self, _offset: u64, _data: &[u8]) -> Option<Result<()>> {
        None
    }

    /// Can `len` bytes at `offset` be written from a pipe (`write_pipe`):
    /// the range inside the node, writable, lying contiguously in a buffered
    /// host file, needing no metadata update? A server then splices a
    /// payload from its socket into a pipe, never into memory.
    fn pipe_writable(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Write `len` bytes from `pipe` at `offset`, where `pipe_writable`
    /// said yes (anything else fails with Unsupported). Not durable until
    /// a flush. The pipe comes back with the result.
    fn write_pipe(&self, _offset: u64, pipe: crate::net::Pipe, _len: usize) -> BoxFuture<'_, (Result<()>, crate::net::Pipe)> {
        Box::pin(async move { (Err(Error::new(ErrorKind::Unsupported, "writing from a pipe")), pipe) })
    }

    /// `write_pipe` done at once on this thread, when the node can do it
    /// without waiting (under `write_now`'s conditions, for sizes up to 256
    /// KiB); None: not possible now (nothing was taken from the pipe), use
    /// `write_pipe`. It saves the hand-off to an io_uring worker, at the cost
    /// of the thread's time: for a caller with other work to overlap.
    fn write_pipe_now(&self, _offset: u64, _pipe: &crate::net::Pipe, _len: usize) -> Option<Result<()>> {
        None
    }

    /// `len` bytes at `offset` as a buffer that maps the host's page cache, a
    /// read without a copy, when the node can give one without blocking: a
    /// buffered regular file opened read-only and locked against writers, the
    /// range inside it and already cached. `None`: read the range instead.
    fn map_cached(&self, _offset: u64, _len: usize) -> Option<IoBuf> {
        None
    }

    /// Check the image's metadata and repair what `fix` allows. Formats
    /// without metadata to check say Unsupported (qemu-img's exit code 63).
    fn check(&self, _fix: CheckFix) -> BoxFuture<'_, Result<CheckReport>> {
        Box::pin(async move {
            Err(Error::new(ErrorKind::Unsupported, format!("This image format ({}) does not support checks", self.driver())))
        })
    }

    /// Whether the image says it was not closed cleanly (`dirty-flag`).
    fn dirty(&self) -> bool {
        false
    }

    /// Record a new backing file (name, format) in the image, or none. Only
    /// the image's metadata changes (rebase decides what data to copy).
    fn set_backing(&self, _backing: Option<(String, Option<String>)>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            Err(Error::new(ErrorKind::Unsupported, format!("'{}' images have no backing file", self.driver())))
        })
    }

    /// Drop everything this image holds, so it reads through to its backing
    /// file (commit empties the committed image this way).
    fn make_empty(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            Err(Error::new(ErrorKind::Unsupported, format!("'{}' images cannot be emptied", self.driver())))
        })
    }

    /// Change format options of an existing image (`amend -o`); formats
    /// refuse what they cannot change, naming the option.
    fn amend(&self, _opts: crate::options::OptionTree) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            Err(Error::new(ErrorKind::Unsupported, format!("Format driver '{}' does not support option amendment", self.driver())))
        })
    }

    /// The backing file name the image records, and its format.
    fn backing_name(&self) -> Option<(String, Option<String>)> {
        None
    }

    /// `format-specific` block of `info`, as QAPI JSON ({"type":..,"data":..}).
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Check a request against a node's size; returns an OutOfBounds error naming
/// the node otherwise.
pub fn check_request(node: &dyn BlockNode, offset: u64, len: u64) -> Result<()> {
    let size = node.size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::new(
            ErrorKind::OutOfBounds,
            format!("request of {len} bytes at offset {offset} is beyond the end of the image ({size} bytes)"),
        )
        .with_file(node.filename())),
    }
}

/// Check that a node may be written.
pub fn check_writable(node: &dyn BlockNode) -> Result<()> {
    if node.read_only() {
        return Err(Error::new(ErrorKind::ReadOnly, "image is opened read-only").with_file(node.filename()));
    }
    Ok(())
}

/// Check a modifying request: the node is writable and the range inside it.
pub fn check_write(node: &dyn BlockNode, offset: u64, len: u64) -> Result<()> {
    check_writable(node)?;
    check_request(node, offset, len)
}

/// Write zeroes by writing zero buffers in chunks: the fallback every node may use.
pub async fn write_zero_buffers(node: &dyn BlockNode, offset: u64, len: u64, fua: bool) -> Result<()> {
    // 1 MiB writes, 8 in flight: storage that allocates as it writes (a
    // network filesystem) does so for each write in parallel.
    const CHUNK: u64 = 1 << 20;
    const DEPTH: usize = 8;
    let end = offset.saturating_add(len);
    let mut next = offset;
    let mut running: Vec<BoxFuture<'_, (Result<()>, IoBuf)>> = Vec::with_capacity(DEPTH);
    let mut spare: Vec<IoBuf> = Vec::new();
    let mut failed = None;
    loop {
        while failed.is_none() && next < end && running.len() < DEPTH {
            let n = (end - next).min(CHUNK) as usize;
            let mut buf = spare.pop().unwrap_or_else(|| IoBuf::zeroed(CHUNK.min(len) as usize));
            buf.set_len(n);
            running.push(node.write(next, buf, WriteFlags { fua }));
            next += n as u64;
        }
        if running.is_empty() {
            return failed.map_or(Ok(()), Err);
        }
        let (r, buf) = std::future::poll_fn(|cx| {
            for i in 0..running.len() {
                if let std::task::Poll::Ready(v) = running[i].as_mut().poll(cx) {
                    drop(running.swap_remove(i));
                    return std::task::Poll::Ready(v);
                }
            }
            std::task::Poll::Pending
        })
        .await;
        spare.push(buf);
        if let Err(e) = r {
            failed.get_or_insert(e);
        }
    }
}

/// The node's backing image, if it has one.
pub fn backing_of(node: &dyn BlockNode) -> Option<Arc<dyn BlockNode>> {
    node.children().into_iter().find(|c| c.role == "backing").map(|c| c.node)
}

/// A file name an image records (a backing file) resolved as QEMU resolves
/// it: relative names against the image's directory; absolute names, URLs
/// and `json:` specs as they are.
pub fn resolve_relative(image: &str, name: &str) -> String {
    if name.starts_with('/') || name.contains("://") || name.starts_with("json:") {
        return name.to_string();
    }
    match std::path::Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name).to_string_lossy().into_owned(),
        _ => name.to_string(),
    }
}

/// Where the data of a node lives: its data file or file child.
fn data_name(node: &Arc<dyn BlockNode>) -> String {
    let children = node.children();
    children
        .iter()
        .find(|c| c.role == "data-file")
        .or_else(|| children.iter().find(|c| c.role == "file"))
        .map_or_else(|| node.filename(), |c| c.node.filename())
}

/// Status at `off` looked up through the backing chain: the extent, the depth
/// it was found at and the file holding it. Unallocated ranges at the bottom
/// of the chain (or past a backing file's end) read as zeroes.
pub async fn chain_status(node: &Arc<dyn BlockNode>, off: u64, len: u64) -> Result<(Extent, u32, String)> {
    let mut cur = node.clone();
    let mut depth = 0;
    let mut len = len;
    loop {
        let mut e = cur.block_status(off, len).await?;
        let backing = backing_of(&*cur);
        if e.allocated {
            return Ok((e, depth, data_name(&cur)));
        }
        match backing {
            Some(b) if off < b.size() => {
                len = e.len.min(b.size() - off);
                cur = b;
                depth += 1;
            }
            Some(_) => {
                // Past the backing file's end: zeroes, reported at the next depth.
                e.zero = true;
                return Ok((e, depth + 1, data_name(&cur)));
                // (allocated stays false: not present in any layer)
            }
            None => {
                e.zero = true;
                return Ok((e, depth, data_name(&cur)));
            }
        }
    }
}

/// Read `len` bytes at `offset` into a new buffer.
pub async fn read_vec(node: &dyn BlockNode, offset: u64, len: usize) -> Result<IoBuf> {
    let (r, b) = node.read(offset, IoBuf::new(len)).await;
    r.map(|()| b)
}
