//! `ringblk convert`: copy one or more images (concatenated) into a new or existing
//! image. Work is cut into chunks that `-m` workers, spread over every shard, claim
//! in order; block status decides what to read, zero detection (`-S`) what to skip,
//! and without `-W` writes land in chunk order as qemu-img's do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::sync::{Arc, Mutex};

use clap::Args;
use engine::block::{BlockNode, Extent, OpenFlags, Perm, WriteFlags, ZeroFlags};
use engine::error::{invalid, Error, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;

use crate::common;
use crate::progress::Progress;

/// Bytes one worker copies per claim.
const CHUNK: u64 = 2 << 20;
/// Blocks reserved ahead of the end of a target we created (as QEMU's
/// preallocate filter's default prealloc-size).
const RESERVE_AHEAD: u64 = 128 << 20;

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (probed when omitted)
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format (default raw)
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format options; may repeat
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Skip creating the target (it must exist)
    #[arg(short = 'n')]
    no_create: bool,
    /// Minimum run of zero bytes to leave sparse (0: fully allocate)
    #[arg(short = 'S', value_parser = common::parse_size_arg, default_value = "4096")]
    sparse: u64,
    /// Parallel requests (1-16)
    #[arg(short = 'm', default_value_t = 8)]
    coroutines: u32,
    /// Allow out-of-order writes
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Copy offload (copy_file_range) where both sides allow it
    #[arg(short = 'C')]
    copy_offload: bool,
    /// Compress the target (formats that support it)
    #[arg(short = 'c')]
    compress: bool,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Target cache mode. The default is qemu-img's: `unsafe`, no flush at the
    /// end; use -t writeback to have the output on stable storage on success
    #[arg(short = 't', default_value = "unsafe")]
    cache: String,
    /// Source cache mode
    #[arg(short = 'T', default_value = "writeback")]
    src_cache: String,
    /// Backing file of the target
    #[arg(short = 'B')]
    backing: Option<String>,
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Keep going on read errors, copying what can be read
    #[arg(long)]
    salvage: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "target-image-opts")]
    target_image_opts: bool,
    /// The existing target reads as zeroes (with -n)
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Source images, then the output (options may come between them, as
    /// qemu-img's getopt allows)
    #[arg(required = true)]
    files: Vec<String>,
}

/// One piece of work: a chunk of the target, aligned in the target (so -c
/// sees whole clusters), made of the pieces of the sources it concatenates.
struct Segment {
    dst_off: u64,
    len: u64,
    pieces: Vec<Piece>,
}

/// `len` bytes of source `src` at `src_off`, landing at `dst_off`.
struct Piece {
    src: usize,
    src_off: u64,
    dst_off: u64,
    len: u64,
}

/// Cut the concatenation of sources of these sizes into CHUNK-aligned segments.
fn segments(sizes: &[u64]) -> Vec<Segment> {
    let total: u64 = sizes.iter().sum();
    let mut out: Vec<Segment> = Vec::new();
    let mut dst = 0;
    while dst < total {
        let len = CHUNK.min(total - dst);
        out.push(Segment { dst_off: dst, len, pieces: Vec::new() });
        dst += len;
    }
    let mut base = 0;
    for (src, &size) in sizes.iter().enumerate() {
        let mut o = 0;
        while o < size {
            let d = base + o;
            let seg = &mut out[(d / CHUNK) as usize];
            let len = (seg.dst_off + seg.len - d).min(size - o);
            seg.pieces.push(Piece { src, src_off: o, dst_off: d, len });
            o += len;
        }
        base += size;
    }
    out
}

struct Job {
    srcs: Vec<Arc<dyn BlockNode>>,
    dst: Arc<dyn BlockNode>,
    segments: Vec<Segment>,
    next: AtomicU64,
    /// Index of the next segment allowed to write (in-order mode).
    turn: AtomicU64,
    waiters: Mutex<HashMap<u64, Waker>>,
    in_order: bool,
    sparse: u64,
    target_zero: bool,
    salvage: bool,
    offload: Option<(i32, u64, i32, u64)>,
    /// -c: write whole clusters of this size compressed.
    compress: Option<u64>,
    /// -B: the target has a backing file (the source's): copy only what the
    /// source's top image allocates, and write zeroes explicitly.
    target_backing: bool,
    progress: Arc<Progress>,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

/// A worker's buffer, allocated (one chunk) the first time it is needed.
fn chunk_buf(buf: IoBuf) -> IoBuf {
    if buf.capacity() >= CHUNK as usize {
        buf
    } else {
        IoBuf::heap(CHUNK as usize)
    }
}

fn is_zero(b: &[u8]) -> bool {
    // Data usually shows itself in the first bytes: reject it before scanning.
    if b.first().is_some_and(|&x| x != 0) || b.last().is_some_and(|&x| x != 0) {
        return false;
    }
    let (pre, mid, post) = {
        // SAFETY: any bit pattern is a valid u64; align_to handles the edges.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0) && mid.iter().fold(0, |a, &x| a | x) == 0
}

/// Split `buf` into (offset, len, is_zero) runs; zero runs shorter than `min` or
/// not on 512-byte units count as data.
fn zero_runs(buf: &[u8], min: u64) -> Vec<(usize, usize, bool)> {
    const UNIT: usize = 512;
    let min = (min as usize / UNIT * UNIT).max(UNIT);
    // Whole zero chunks are common (written zeroes): one vectorised pass.
    if buf.len() >= min && buf.len().is_multiple_of(UNIT) && is_zero(buf) {
        return vec![(0, buf.len(), true)];
    }
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = 0;
    while i < buf.len() {
        let n = UNIT.min(buf.len() - i);
        let z = n == UNIT && is_zero(&buf[i..i + n]);
        match runs.last_mut() {
            Some(r) if r.2 == z => r.1 += n,
            _ => runs.push((i, n, z)),
        }
        i += n;
    }
    // Demote short zero runs to data and merge neighbours.
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (o, n, z) in runs {
        let z = z && n >= min;
        match out.last_mut() {
            Some(r) if r.2 == z => r.1 += n,
            _ => out.push((o, n, z)),
        }
    }
    out
}

impl Job {
    fn fail(&self, e: Error) {
        self.failed.store(true, Ordering::SeqCst);
        // Release everyone parked in wait_turn.
        let parked: Vec<_> = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, w)| w).collect();
        for w in parked {
            w.wake();
        }
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    }

    /// In-order mode: wait until every earlier segment has been written. The
    /// waiter parks its waker under its index; `pass_turn` wakes exactly the next
    /// one, whichever shard it runs on.
    async fn wait_turn(&self, idx: u64) {
        if !self.in_order {
            return;
        }
        std::future::poll_fn(|cx| {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if self.turn.load(Ordering::Acquire) == idx || self.failed.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            w.insert(idx, cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn pass_turn(&self, idx: u64) {
        let next = {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            self.turn.store(idx + 1, Ordering::Release);
            w.remove(&(idx + 1))
        };
        if let Some(waker) = next {
            waker.wake();
        }
    }

    async fn zero(&self, off: u64, len: u64) -> Result<()> {
        if self.target_zero && self.sparse > 0 {
            return Ok(());
        }
        let flags = ZeroFlags { may_unmap: self.sparse > 0, ..Default::default() };
        self.dst.write_zeroes(off, len, flags).await
    }

    /// Read `buf[range]` from `src` at `off`; with --salvage, sectors that
    /// fail read as zeroes.
    async fn read(&self, src: &dyn BlockNode, off: u64, buf: IoBuf, range: std::ops::Range<usize>) -> (Result<()>, IoBuf) {
        let (r, mut buf) = src.read_part(off, buf, range.clone()).await;
        match r {
            Err(e) if self.salvage => {
                eprintln!("ringblk: error while reading at byte {off}: {}; salvaging sector by sector", e.detail());
                let mut sector = IoBuf::new(512);
                let mut i = range.start;
                while i < range.end {
                    let k = 512.min(range.end - i);
                    sector.set_len(k);
                    let (r, s) = src.read(off + (i - range.start) as u64, sector).await;
                    sector = s;
                    if r.is_ok() {
                        buf[i..i + k].copy_from_slice(&sector);
                    } else {
                        buf[i..i + k].fill(0);
                    }
                    i += k;
                }
                (Ok(()), buf)
            }
            Err(e) => {
                let e = Error::new(e.kind(), format!("error while reading at byte {off}: {}", e.detail())).with_file(src.filename());
                (Err(e), buf)
            }
            Ok(()) => (Ok(()), buf),
        }
    }

    async fn copy_data(&self, src: &dyn BlockNode, src_off: u64, dst_off: u64, len: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        if let Some((sfd, sbase, dfd, dbase)) = self.offload {
            let r = engine::aio::blocking(move || copy_file_range(sfd, sbase + src_off, dfd, dbase + dst_off, len)).await;
            return (r.map_err(|e| Error::os("copy offload", e).at(src_off)), buf);
        }
        // A cached source is mapped rather than copied into our buffer: the
        // write then copies straight from the source's page cache.
        if let Some(mapped) = src.map_cached(src_off, len as usize) {
            return (self.write_data(dst_off, mapped).await.0, buf);
        }
        let mut buf = chunk_buf(buf);
        buf.set_len(len as usize);
        let (r, buf) = self.read(src, src_off, buf, 0..len as usize).await;
        if let Err(e) = r {
            return (Err(e), buf);
        }
        self.write_data(dst_off, buf).await
    }

    /// Write what was read at `dst_off`: compressed with -c, else with its
    /// zero runs (`-S`) written as zeroes.
    async fn write_data(&self, dst_off: u64, mut buf: IoBuf) -> (Result<()>, IoBuf) {
        let runs = if self.sparse > 0 { zero_runs(&buf, self.sparse) } else { vec![(0, buf.len(), false)] };
        for (o, n, z) in runs {
            let r = if z {
                self.zero(dst_off + o as u64, n as u64).await
            } else {
                let (r, b) = self.dst.write_part(dst_off + o as u64, buf, o..o + n, WriteFlags::default()).await;
                buf = b;
                r
            };
            if let Err(e) = r {
                return (Err(e), buf);
            }
        }
        (Ok(()), buf)
    }

    /// -c: each cluster of `buf` (at `dst_off`, cluster aligned) compressed,
    /// but those `skip` marks (nothing to copy under -B); all-zero clusters
    /// are left out when the target already reads zero.
    async fn write_compressed(&self, dst_off: u64, cs: u64, buf: IoBuf, skip: &[bool]) -> (Result<()>, IoBuf) {
        let mut o = 0usize;
        while o < buf.len() {
            let n = (cs as usize).min(buf.len() - o);
            let piece = &buf[o..o + n];
            let r = if skip.get(o / cs as usize).copied().unwrap_or(false) || (is_zero(piece) && self.target_zero) {
                Ok(())
            } else if is_zero(piece) {
                self.dst.write_zeroes(dst_off + o as u64, n as u64, ZeroFlags::default()).await
            } else {
                self.dst.write_compressed(dst_off + o as u64, IoBuf::from_slice(piece)).await.0
            };
            if let Err(e) = r {
                return (Err(e), buf);
            }
            o += n;
        }
        (Ok(()), buf)
    }

    /// Block status of a piece, extent by extent (offsets relative to it).
    async fn plan(&self, p: &Piece) -> Result<Vec<(u64, Extent)>> {
        let src = &*self.srcs[p.src];
        let mut plan = Vec::new();
        let mut off = 0;
        while off < p.len {
            let e = src.block_status(p.src_off + off, p.len - off).await?;
            plan.push((off, e));
            off += e.len;
        }
        Ok(plan)
    }

    async fn segment(&self, idx: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let seg = &self.segments[idx as usize];
        // Plan from block status first, so reads can run before our turn.
        let mut plans = Vec::with_capacity(seg.pieces.len());
        for p in &seg.pieces {
            match self.plan(p).await {
                Ok(plan) => plans.push(plan),
                Err(e) => return (Err(e), buf),
            }
        }
        if let Some(cs) = self.compress {
            return self.compress_segment(seg, &plans, cs, buf).await;
        }
        let mut buf = buf;
        self.wait_turn(idx).await;
        for (p, plan) in seg.pieces.iter().zip(plans) {
            let src = &*self.srcs[p.src];
            for (o, e) in plan {
                let r = if self.target_backing && !e.allocated {
                    Ok(()) // comes from the backing file the target shares
                } else if e.is_zero_hole() {
                    self.zero(p.dst_off + o, e.len).await
                } else {
                    let (r, b) = self.copy_data(src, p.src_off + o, p.dst_off + o, e.len, buf).await;
                    buf = b;
                    r
                };
                if let Err(e) = r {
                    return (Err(e), buf);
                }
            }
        }
        self.pass_turn(idx);
        self.progress.add(seg.len);
        (Ok(()), buf)
    }

    /// -c: gather the whole segment (holes as zeroes), then write it cluster
    /// by cluster, whatever the sources' boundaries and holes inside clusters.
    async fn compress_segment(&self, seg: &Segment, plans: &[Vec<(u64, Extent)>], cs: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let mut buf = chunk_buf(buf);
        buf.set_len(seg.len as usize);
        let mut skip = vec![self.target_backing; seg.len.div_ceil(cs) as usize];
        for (p, plan) in seg.pieces.iter().zip(plans) {
            let src = &*self.srcs[p.src];
            for &(o, e) in plan {
                let at = (p.dst_off + o - seg.dst_off) as usize;
                let range = at..at + e.len as usize;
                if e.allocated || !self.target_backing {
                    for c in skip.iter_mut().take(range.end.div_ceil(cs as usize)).skip(at / cs as usize) {
                        *c = false;
                    }
                }
                if e.is_zero_hole() {
                    buf[range].fill(0);
                    continue;
                }
                let (r, b) = self.read(src, p.src_off + o, buf, range).await;
                buf = b;
                if let Err(e) = r {
                    return (Err(e), buf);
                }
            }
        }
        let (r, buf) = self.write_compressed(seg.dst_off, cs, buf, &skip).await;
        if r.is_ok() {
            self.progress.add(seg.len);
        }
        (r, buf)
    }

    async fn worker(self: Arc<Self>) {
        // Allocated on first need: a mapped source never needs it.
        let mut buf = IoBuf::empty();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            let idx = self.next.fetch_add(1, Ordering::AcqRel);
            if idx as usize >= self.segments.len() {
                return;
            }
            let (r, b) = self.segment(idx, buf).await;
            buf = b;
            if let Err(e) = r {
                self.fail(e);
                return;
            }
        }
    }
}

fn copy_file_range(sfd: i32, mut soff: u64, dfd: i32, mut doff: u64, mut len: u64) -> std::io::Result<()> {
    while len > 0 {
        let mut si = soff as libc::loff_t;
        let mut di = doff as libc::loff_t;
        // SAFETY: offsets are live locals; the fds stay open while the job holds the nodes.
        let r = unsafe { libc::copy_file_range(sfd, &mut si, dfd, &mut di, len as usize, 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        soff += r as u64;
        doff += r as u64;
        len -= r as u64;
    }
    Ok(())
}

pub fn run(a: ConvertArgs) -> i32 {
    match convert(a) {
        Ok(()) => 0,
        Err(e) => common::fail(e),
    }
}

fn convert(a: ConvertArgs) -> Result<()> {
    engine::objects::define_all(&a.objects)?;
    if !(1..=16).contains(&a.coroutines) {
        return Err(invalid("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16"));
    }
    if a.target_image_opts && !a.no_create {
        return Err(invalid("--target-image-opts requires use of -n flag"));
    }
    if a.target_is_zero && !a.no_create {
        return Err(invalid("--target-is-zero requires use of -n flag"));
    }
    if a.copy_offload && a.compress {
        return Err(invalid("Cannot enable copy offloading when -c is used"));
    }
    if a.compress && a.out_format == "raw" {
        return Err(invalid("Compression not supported for this file format"));
    }
    if a.files.len() < 2 {
        return Err(invalid("Expecting a source image and a target image"));
    }
    let (out, srcs) = a.files.split_last().expect("checked: two files at least");
    let src_cache: engine::block::CacheMode = a.src_cache.parse()?;
    let dst_cache: engine::block::CacheMode = a.cache.parse()?;
    let mut create_opts = match common::join_opts(&a.options) {
        Some(s) => OptionTree::parse(&s, None)?,
        None => OptionTree::new(),
    };
    if let Some(b) = &a.backing {
        create_opts.set("backing_file", b.clone());
        if let Some(f) = &a.backing_fmt {
            create_opts.set("backing_fmt", f.clone());
        }
    }
    let src_specs = srcs
        .iter()
        .map(|s| common::image_spec(s, a.format.as_deref(), a.image_opts))
        .collect::<Result<Vec<_>>>()?;
    let dst_spec = if a.target_image_opts {
        common::image_spec(out, None, true)?
    } else {
        common::image_spec(out, Some(&a.out_format), false)?
    };
    let rt = common::full_runtime()?;
    // Like qemu-img, nobody may write to or resize a source while we copy it
    // (a running VM's image needs -U); that also lets cached raw sources be
    // mapped instead of copied.
    let src_flags = OpenFlags {
        force_share: a.force_share,
        cache: src_cache,
        shared: Perm::ALL.without(Perm::WRITE.union(Perm::RESIZE)),
        ..Default::default()
    };
    let dst_flags = OpenFlags { write: true, cache: dst_cache, ..Default::default() };
    let (no_create, fmt, out_name, quiet, progress) = (a.no_create, a.out_format.clone(), out.clone(), a.quiet, a.progress);
    let has_backing = create_opts.contains("backing_file");
    let prealloc_off = create_opts.get("preallocation").is_none_or(|p| p == "off");
    let (sparse, in_order, salvage, offload, target_is_zero, m) =
        (a.sparse, !a.out_of_order, a.salvage, a.copy_offload, a.target_is_zero, a.coroutines);
    let compress_flag = a.compress;
    // Compression is the slow part: keeping writes in order would run it on
    // one core at a time. Compressed clusters are packed wherever they land,
    // so order buys nothing there.
    let in_order = in_order && !compress_flag;

    let (srcs, dst) = rt.block_on(move || async move {
        let mut nodes = Vec::new();
        for s in src_specs {
            nodes.push(common::open(s, src_flags.clone()).await?);
        }
        let total: u64 = nodes.iter().map(|n| n.size()).sum();
        if !no_create {
            let reg = nbd::registry();
            let d = reg.get(&fmt).ok_or_else(|| invalid(format!("Unknown file format '{fmt}'")))?;
            if has_backing && !d.create_opts().iter().any(|o| o.name == "backing_file") {
                return Err(invalid(format!("Backing file not supported for file format '{fmt}'")));
            }
            let mut o = create_opts;
            o.set("size", total.to_string());
            super::create::create_image(&fmt, &out_name, o, true).await?;
        }
        let mut dst_spec = dst_spec;
        if !no_create && !out_name.starts_with("json:") && std::path::Path::new(&out_name).is_file() {
            // A target we created grows as we write it: have the filesystem
            // allocate its blocks ahead, in big pieces (released at close).
            dst_spec.set_default("file.x-reserve-ahead", RESERVE_AHEAD.to_string());
        }
        let dst = common::open(dst_spec, dst_flags).await?;
        if no_create && dst.size() < total {
            return Err(invalid("output file is smaller than input file").with_file(dst.filename()));
        }
        Ok::<_, Error>((nodes, dst))
    })?;

    let total: u64 = srcs.iter().map(|n| n.size()).sum();
    let segments = segments(&srcs.iter().map(|n| n.size()).collect::<Vec<_>>());
    let compress = if compress_flag {
        let cs = dst.cluster_size().ok_or_else(|| invalid("Compression not supported for this file format"))?;
        // Chunks must hold whole clusters.
        if !CHUNK.is_multiple_of(cs) {
            return Err(invalid(format!("cluster size {cs} does not divide the copy chunk")));
        }
        Some(cs)
    } else {
        None
    };
    let offload = if offload {
        match (srcs.as_slice(), dst.passthrough_fd()) {
            ([s], Some((dfd, dbase))) => s.passthrough_fd().map(|(sfd, sbase)| (sfd, sbase, dfd, dbase)),
            _ => None,
        }
    } else {
        None
    };
    let job = Arc::new(Job {
        srcs,
        dst,
        segments,
        next: AtomicU64::new(0),
        turn: AtomicU64::new(0),
        waiters: Mutex::new(HashMap::new()),
        in_order,
        sparse,
        target_zero: ((!no_create && prealloc_off) || target_is_zero) && !has_backing,
        compress,
        target_backing: has_backing,
        salvage,
        offload,
        progress: Progress::new(total, progress && !quiet),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    let handles: Vec<_> = (0..m as usize)
        .map(|i| {
            let j = job.clone();
            rt.spawn_on(i % rt.shards(), move || j.worker())
        })
        .collect();
    for h in handles {
        h.join();
    }
    job.progress.finish();
    if let Some(e) = job.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    let j = job.clone();
    rt.block_on(move || async move {
        j.dst.flush().await?;
        // Formats write back their tables here whatever the cache mode.
        j.dst.close().await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_respect_minimum() {
        let mut b = vec![1u8; 512];
        b.extend(vec![0u8; 4096]);
        b.extend(vec![2u8; 100]);
        let r = zero_runs(&b, 4096);
        assert_eq!(r, vec![(0, 512, false), (512, 4096, true), (4608, 100, false)]);
        let r = zero_runs(&b, 8192);
        assert_eq!(r, vec![(0, b.len(), false)]);
    }
}
