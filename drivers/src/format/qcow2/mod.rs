//! The qcow2 format driver: opening an image (header, L1 table, refcount
//! table, backing file and data file children, runtime options), the node
//! that serves requests, and registration. The request paths live in `io.rs`,
//! metadata writeback in `flush.rs`, image creation in `create.rs`, the
//! consistency check in `check.rs`.
//!
//! Concurrency: a request runs on the shard that received it. Reads and
//! in-place writes take no lock (see `cache.rs`). Writes that allocate, zero
//! or discard whole clusters hold the guest clusters they change in
//! `cluster_locks` (a range tracker) for the duration, so two writes never
//! both allocate the same cluster; the allocator's mutex is held only for
//! in-memory work.

mod cache;
pub mod check;
mod compress;
mod amend;
mod create;
mod flush;
pub mod header;
mod io;
pub mod layout;
pub mod measure;
mod refcount;
mod zero;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use engine::block::{
    open_image, resolve_relative, BlockNode, BoxFuture, Child, CreateOpt, Driver, DriverKind, Extent, Limits, OpenCtx, Perm, Prealloc,
    RangeTracker, WriteFlags, ZeroFlags, MAX_CHAIN_DEPTH,
};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;
use serde_json::{json, Map, Value};

use cache::{L2Cache, L1};
use header::Header;
use layout::Geometry;
use refcount::Refcounts;

/// Default and ceiling of the L2 cache, as QEMU has them on Linux.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
const DEFAULT_L2_ENTRY_SIZE: u64 = 4096;

/// Runtime options of an open image.
#[derive(Clone, Debug)]
struct Options {
    /// Guest discards free clusters (`discard=unmap`).
    discard_unmap: bool,
    /// Punch freed clusters out of the file when the guest discarded them.
    pass_discard_request: bool,
    /// Punch clusters freed for other reasons (overwritten compressed data).
    pass_discard_other: bool,
    lazy_refcounts: bool,
}

pub struct Qcow2 {
    file: Arc<dyn BlockNode>,
    data_file: Option<Arc<dyn BlockNode>>,
    backing: Option<Arc<dyn BlockNode>>,
    geo: Geometry,
    header: Mutex<Header>,
    size: AtomicU64,
    read_only: bool,
    cache: L2Cache,
    refs: Refcounts,
    /// Guest cluster ranges being allocated, zeroed or discarded.
    cluster_locks: RangeTracker,
    /// L1 indexes whose L2 table is being allocated.
    table_locks: RangeTracker,
    /// One metadata writeback at a time.
    flush_lock: async_lock::Mutex<()>,
    /// Set once metadata inconsistency was found: no more writes.
    corrupt: AtomicBool,
    /// The header's dirty bit is set on disk (lazy refcounts).
    dirty_on_disk: AtomicBool,
    opts: Options,
    /// Filename as the user gave it (for messages and info).
    filename: String,
}

fn corrupt_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

impl Qcow2 {
    /// The node guest data lives in.
    fn data(&self) -> &dyn BlockNode {
        self.data_file.as_deref().unwrap_or(&*self.file)
    }

    fn header(&self) -> std::sync::MutexGuard<'_, Header> {
        self.header.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_data_file(&self) -> bool {
        self.data_file.is_some()
    }

    fn data_file_raw(&self) -> bool {
        self.header().data_file_raw()
    }

    fn is_v2(&self) -> bool {
        self.header().version == 2
    }

    fn err(&self, e: Error) -> Error {
        if e.file().is_some() {
            e
        } else {
            e.with_file(self.filename.clone())
        }
    }

    /// Refuse writes once the image is known corrupt.
    fn check_not_corrupt(&self) -> Result<()> {
        if self.corrupt.load(Ordering::Acquire) {
            return Err(corrupt_err("qcow2 image is marked corrupt; writes are refused (run 'ringblk check -r all')")
                .with_file(self.filename.clone()));
        }
        Ok(())
    }

    /// Metadata was found inconsistent while the image is writable: set the
    /// corrupt bit on disk (as QEMU does) so nothing writes to it until it is
    /// repaired, and turn the problem into the request's error.
    async fn mark_corrupt(&self, e: Error) -> Error {
        let e = self.err(e);
        if self.read_only || self.corrupt.swap(true, Ordering::AcqRel) {
            return e;
        }
        eprintln!("qcow2: Marking image as corrupt: {e}; further corruption events will be suppressed");
        if !self.is_v2() {
            let bits = {
                let mut h = self.header();
                h.incompatible |= header::INCOMPAT_CORRUPT;
                h.incompatible
            };
            let (r, _) = self.file.write(72, IoBuf::from_slice(&bits.to_be_bytes()), WriteFlags::default()).await;
            if r.is_ok() {
                let _ = self.file.flush().await;
            }
        }
        e
    }

    /// Reload the refcount table from the header after check rewrote refcounts.
    async fn reload_refcounts(&self) -> Result<()> {
        let (off, clusters) = {
            let h = self.header();
            (h.refcount_table_offset, h.refcount_table_clusters)
        };
        let n = (u64::from(clusters) * self.geo.cluster_size() / 8) as usize;
        let table = read_table(&*self.file, off, n).await?;
        let mut st = self.refs.lock();
        st.table = table;
        st.table_offset = off;
        st.table_clusters = clusters;
        st.table_mods = 0;
        st.table_written = 0;
        st.moved = None;
        st.blocks.clear();
        st.free_hint = 0;
        st.free_byte = 0;
        Ok(())
    }

    /// Clear the corrupt bit once a repair left no corruption.
    async fn clear_corrupt(&self) -> Result<()> {
        let bits = {
            let mut h = self.header();
            if h.incompatible & header::INCOMPAT_CORRUPT == 0 {
                return Ok(());
            }
            h.incompatible &= !header::INCOMPAT_CORRUPT;
            h.incompatible
        };
        let (r, _) = self.file.write(72, IoBuf::from_slice(&bits.to_be_bytes()), WriteFlags::default()).await;
        r?;
        self.file.flush().await?;
        self.corrupt.store(false, Ordering::Release);
        Ok(())
    }

    fn format_specific_json(&self) -> Value {
        let h = self.header();
        // QEMU's order (ImageInfoSpecificQCow2 as qemu-img prints it).
        let mut d = Map::new();
        d.insert("compat".into(), json!(h.compat_name()));
        d.insert("compression-type".into(), json!(h.compression.name()));
        let v3 = h.version >= 3;
        if v3 {
            d.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        }
        d.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if v3 && h.has_data_file() {
            if let Some(df) = &h.data_file {
                d.insert("data-file".into(), json!(df));
            }
            d.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        if v3 {
            d.insert("corrupt".into(), json!(h.incompatible & header::INCOMPAT_CORRUPT != 0));
            d.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        json!({ "type": "qcow2", "data": Value::Object(d) })
    }
}

impl BlockNode for Qcow2 {
    fn driver(&self) -> &'static str {
        "qcow2"
    }
    fn filename(&self) -> String {
        self.filename.clone()
    }
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: 1, mem_alignment: self.file.limits().mem_alignment, max_transfer: 0 }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.geo.cluster_size())
    }
    fn children(&self) -> Vec<Child> {
        let mut v = vec![Child { role: "file", node: self.file.clone() }];
        if let Some(d) = &self.data_file {
            v.push(Child { role: "data-file", node: d.clone() });
        }
        if let Some(b) = &self.backing {
            v.push(Child { role: "backing", node: b.clone() });
        }
        v
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let n = buf.len();
        self.read_part(offset, buf, 0..n)
    }
    fn cached_extent(&self, offset: u64, len: u64) -> Option<(std::os::fd::RawFd, u64)> {
        // Read-only images only: the caller sends the host pages later, and
        // a writable image could free the cluster and reuse it for other
        // guest data in between (a discard, then an allocating write).
        if !self.read_only || offset.checked_add(len)? > self.size() {
            return None;
        }
        match self.map_cached(offset, len)? {
            (layout::Mapping::Data { host, .. }, n) if n >= len => self.data().cached_extent(host, len),
            _ => None,
        }
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        let n = buf.len();
        self.write_part(offset, buf, 0..n, flags)
    }
    fn read_part(&self, offset: u64, buf: IoBuf, range: Range<usize>) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(self.do_read(offset, buf, range))
    }
    fn write_part(&self, offset: u64, buf: IoBuf, range: Range<usize>, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(self.do_write(offset, buf, range, flags))
    }
    fn write_compressed(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(self.do_write_compressed(offset, buf))
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_write_zeroes(offset, len, flags))
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_discard(offset, len))
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            self.writeback(false).await?;
            self.file.flush().await?;
            if let Some(d) = &self.data_file {
                d.flush().await?;
            }
            Ok(())
        })
    }
    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !self.read_only {
                self.writeback(true).await?;
                self.file.flush().await?;
            }
            for c in self.children() {
                c.node.close().await?;
            }
            Ok(())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(self.do_block_status(offset, len))
    }
    fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.do_truncate(size, exact, prealloc))
    }
    fn format_specific(&self) -> Option<Value> {
        Some(self.format_specific_json())
    }
    fn allocated_size(&self) -> BoxFuture<'_, Result<Option<u64>>> {
        // The image file only, as qemu-img reports it.
        self.file.allocated_size()
    }
    fn check(&self, fix: engine::block::CheckFix) -> BoxFuture<'_, Result<engine::block::CheckReport>> {
        Box::pin(async move {
            let r = check::check(self, fix).await.map_err(|e| self.err(e))?;
            if (fix.leaks || fix.errors) && r.corruptions == 0 {
                self.clear_corrupt().await?;
            }
            Ok(r.into_check_report())
        })
    }
    fn set_backing(&self, backing: Option<(String, Option<String>)>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            engine::block::check_writable(self)?;
            if backing.is_some() && self.data_file_raw() {
                return Err(invalid("data-file-raw requires that the image has no backing file").with_file(self.filename()));
            }
            {
                let mut h = self.header();
                match backing {
                    Some((name, fmt)) => {
                        h.backing_file = Some(name);
                        h.backing_format = fmt;
                    }
                    None => {
                        h.backing_file = None;
                        h.backing_format = None;
                    }
                }
            }
            self.write_header().await.map_err(|e| self.err(e))?;
            self.file.flush().await
        })
    }
    fn amend(&self, opts: OptionTree) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.do_amend(opts).await.map_err(|e| self.err(e)) })
    }
    fn make_empty(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.empty_all().await.map_err(|e| self.err(e)) })
    }
    fn dirty(&self) -> bool {
        self.dirty_on_disk.load(Ordering::Acquire)
    }
    fn backing_name(&self) -> Option<(String, Option<String>)> {
        let h = self.header();
        h.backing_file.clone().map(|b| (b, h.backing_format.clone()))
    }
}

pub struct Qcow2Driver;

/// qemu-img's order and wording for `create -f qcow2 -o help`.
pub const CREATE_OPTS: &[CreateOpt] = &[
    CreateOpt { name: "backing_file", ty: "str", help: "File name of a base image" },
    CreateOpt { name: "backing_fmt", ty: "str", help: "Image format of the base image" },
    CreateOpt { name: "cluster_size", ty: "size", help: "qcow2 cluster size" },
    CreateOpt { name: "compat", ty: "str", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
    CreateOpt { name: "compression_type", ty: "str", help: "Compression method used for image cluster compression" },
    CreateOpt { name: "data_file", ty: "str", help: "File name of an external data file" },
    CreateOpt {
        name: "data_file_raw",
        ty: "bool (on/off)",
        help: "The external data file must stay valid as a raw image",
    },
    CreateOpt { name: "extended_l2", ty: "bool (on/off)", help: "Extended L2 tables" },
    CreateOpt { name: "lazy_refcounts", ty: "bool (on/off)", help: "Postpone refcount updates" },
    CreateOpt { name: "nocow", ty: "bool (on/off)", help: "Turn off copy-on-write (valid only on btrfs)" },
    CreateOpt {
        name: "preallocation",
        ty: "str",
        help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
    },
    CreateOpt { name: "refcount_bits", ty: "num", help: "Width of a reference count entry in bits" },
    CreateOpt { name: "size", ty: "size", help: "Virtual disk size" },
];

async fn read_header(file: &dyn BlockNode) -> Result<Header> {
    let fsize = file.size();
    let first = engine::block::read_vec(file, 0, fsize.min(512) as usize).await?;
    if first.len() < 72 {
        return Err(Error::new(ErrorKind::InvalidImage, "Image is not in qcow2 format (file too short)"));
    }
    let cluster_bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
    let cs = if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&cluster_bits) { 1u64 << cluster_bits } else { 512 };
    let buf = engine::block::read_vec(file, 0, cs.min(fsize.max(512)) as usize).await?;
    Header::parse(&buf)
}

async fn read_table(file: &dyn BlockNode, offset: u64, entries: usize) -> Result<Vec<u64>> {
    if entries == 0 {
        return Ok(Vec::new());
    }
    let buf = engine::block::read_vec(file, offset, entries * 8).await?;
    Ok(buf.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect())
}

impl Qcow2Driver {
    async fn open(&self, ctx: &OpenCtx, mut opts: OptionTree, file: Arc<dyn BlockNode>) -> Result<Arc<Qcow2>> {
        let filename = file.filename();
        let fsize = file.size();
        let mut h = read_header(&*file).await.map_err(|e| e.with_file(filename.clone()))?;
        let geo = Geometry::new(h.cluster_bits, h.extended_l2(), h.refcount_order, h.version);
        let cs = geo.cluster_size();
        let write = ctx.flags.write;
        let bad = |msg: String| Error::new(ErrorKind::InvalidImage, msg).with_file(filename.clone());

        if h.crypt_method != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "encrypted qcow2 images are not supported yet (encryption comes in a later release)",
            )
            .with_file(filename));
        }
        if write && h.nb_snapshots > 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("image has {} internal snapshot(s); writing such images is not supported yet: open it read-only", h.nb_snapshots),
            )
            .with_file(filename));
        }
        if write && h.has_extension(header::EXT_BITMAPS) && h.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "image has persistent dirty bitmaps; writing such images is not supported yet: open it read-only",
            )
            .with_file(filename));
        }
        if write && h.incompatible & header::INCOMPAT_CORRUPT != 0 && !ctx.flags.repair {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "qcow2: Image is corrupt; cannot be opened read/write (run 'ringblk check -r all' to repair it)",
            )
            .with_file(filename));
        }
        if h.data_file_raw() && h.backing_file.is_some() {
            return Err(bad("data-file-raw requires that the image has no backing file".into()));
        }
        let needed_l1 = geo.l1_entries_for(h.size);
        if u64::from(h.l1_size) < needed_l1 {
            return Err(bad(format!("L1 table is too small ({} entries for a {} byte image)", h.l1_size, h.size)));
        }
        if h.size > (header::MAX_L1_BYTES / 8) * geo.l2_span() {
            return Err(bad(format!("Image size {} is too large for the cluster size", h.size)));
        }
        for (what, off, len) in [
            ("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8),
            ("Reference count table", h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs),
        ] {
            if len > 0 && (off == 0 || off.checked_add(len).is_none_or(|e| e > (1u64 << 56))) {
                return Err(bad(format!("{what} offset {off:#x} (length {len}) is invalid")));
            }
            // A table past the end of the file reads as zeroes; refuse it rather
            // than guess.
            if len > 0 && off >= fsize.max(cs) && fsize > 0 {
                return Err(bad(format!("{what} at offset {off:#x} lies past the end of the file ({fsize} bytes)")));
            }
        }

        // Runtime options (QEMU's names).
        let lazy = opts.take_bool("lazy-refcounts")?.unwrap_or(h.lazy_refcounts());
        if lazy && h.version == 2 {
            return Err(invalid("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"));
        }
        let discard_unmap = match opts.take("discard").as_deref() {
            None => ctx.flags.discard_unmap,
            Some("ignore") | Some("off") => false,
            Some("unmap") | Some("on") => true,
            Some(v) => return Err(invalid(format!("Invalid discard option '{v}' (expected ignore or unmap)"))),
        };
        let pass_discard_request = opts.take_bool("pass-discard-request")?.unwrap_or(true);
        let _ = opts.take_bool("pass-discard-snapshot")?;
        let pass_discard_other = opts.take_bool("pass-discard-other")?.unwrap_or(false);
        let cache_size = opts.take_size("cache-size")?;
        let l2_cache_size = opts.take_size("l2-cache-size")?;
        let rc_cache_size = opts.take_size("refcount-cache-size")?;
        let entry_size = opts.take_size("l2-cache-entry-size")?;
        let clean_interval = opts.take_parsed::<CleanInterval>("cache-clean-interval")?.unwrap_or(CleanInterval(600));
        for k in ["overlap-check", "discard-no-unref", "detect-zeroes"] {
            let _ = opts.take(k);
        }
        let _ = opts.take_subtree("overlap-check");
        if cache_size.is_some() && l2_cache_size.is_some() && rc_cache_size.is_some() {
            return Err(invalid("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"));
        }
        let table_bytes = cs;
        let entry_size = entry_size.unwrap_or(DEFAULT_L2_ENTRY_SIZE.min(cs));
        if !entry_size.is_power_of_two() || entry_size < 512 || entry_size > cs {
            return Err(invalid(format!(
                "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
            )));
        }
        let max_l2 = needed_l1.max(1) * table_bytes;
        let rc_min = 4 * cs;
        let l2_size = match (l2_cache_size, cache_size, rc_cache_size) {
            (Some(l2), _, _) => l2,
            (None, Some(total), rc) => total.saturating_sub(rc.unwrap_or(rc_min)).min(max_l2),
            (None, None, _) => DEFAULT_L2_CACHE_MAX.min(max_l2),
        };
        let rc_size = rc_cache_size.unwrap_or_else(|| cache_size.map_or(rc_min, |t| t.saturating_sub(l2_size).max(rc_min)));
        let l2_slices = (l2_size / entry_size).max(2) as usize;

        // Children: data file, backing.
        let data_file = open_data_file(ctx, &mut opts, &h, &filename).await?;
        let backing = open_backing(ctx, &mut opts, &h, &filename).await?;
        opts.ensure_consumed("Block format 'qcow2'")?;

        let l1 = read_table(&*file, h.l1_table_offset, h.l1_size as usize).await.map_err(|e| e.with_file(filename.clone()))?;
        let rt_entries = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
        let rt = read_table(&*file, h.refcount_table_offset, rt_entries).await.map_err(|e| e.with_file(filename.clone()))?;
        for (i, &e) in rt.iter().enumerate() {
            if (e & 0x1ff != 0 || !(e & layout::REFT_OFFSET_MASK).is_multiple_of(cs))
                && write && !ctx.flags.repair {
                    return Err(Error::new(ErrorKind::Corrupt, format!("Reference count table entry {i} ({e:#x}) is invalid"))
                        .with_file(filename));
                }
        }

        let mut header_changed = false;
        if write && h.autoclear & !header::AUTOCLEAR_KNOWN != 0 {
            // Unknown autoclear features: clear them before writing, as the spec says.
            h.autoclear &= header::AUTOCLEAR_KNOWN;
            header_changed = true;
        }
        if write && h.autoclear & header::AUTOCLEAR_BITMAPS != 0 && !h.has_extension(header::EXT_BITMAPS) {
            h.autoclear &= !header::AUTOCLEAR_BITMAPS;
            header_changed = true;
        }
        let dirty = h.incompatible & header::INCOMPAT_DIRTY != 0;
        let size = h.size;
        let corrupt = h.incompatible & header::INCOMPAT_CORRUPT != 0;
        let node = Arc::new(Qcow2 {
            refs: Refcounts::new(geo, rt, h.refcount_table_offset, h.refcount_table_clusters, (rc_size / cs) as usize),
            cache: L2Cache::new(L1::new(l1), entry_size as usize, table_bytes as usize, l2_slices),
            file,
            data_file,
            backing,
            geo,
            header: Mutex::new(h),
            size: AtomicU64::new(size),
            read_only: !write,
            cluster_locks: RangeTracker::new(),
            table_locks: RangeTracker::new(),
            flush_lock: async_lock::Mutex::new(()),
            corrupt: AtomicBool::new(corrupt && !ctx.flags.repair),
            dirty_on_disk: AtomicBool::new(dirty),
            opts: Options { discard_unmap, pass_discard_request, pass_discard_other, lazy_refcounts: lazy },
            filename,
        });
        if clean_interval.0 > 0 {
            let weak = Arc::downgrade(&node);
            let every = std::time::Duration::from_secs(clean_interval.0);
            engine::runtime::spawn_daemon(async move {
                loop {
                    engine::runtime::sleep(every).await;
                    let Some(q) = weak.upgrade() else { return };
                    q.clean_caches();
                }
            });
        }
        if header_changed {
            node.write_header().await?;
        }
        if write && dirty && !ctx.flags.repair {
            // Refcounts may be stale after a crash with lazy refcounts: rebuild
            // them from the tables before anything is allocated.
            let report = check::check(&node, check::Fix { leaks: true, errors: true }).await?;
            for m in &report.messages {
                (ctx.warn)(m);
            }
            if report.corruptions_left() > 0 {
                return Err(Error::new(ErrorKind::Corrupt, "could not repair the dirty image's refcounts").with_file(node.filename()));
            }
            node.clear_dirty_bit().await?;
        }
        Ok(node)
    }
}

/// `cache-clean-interval`: every this many seconds (QEMU's default, 600;
/// 0 never), metadata cache entries unused since the last round are dropped,
/// so an idle image gives its cache memory back. A daemon task on the shard
/// that opened the image does it; it holds only a weak reference.
struct CleanInterval(u64);

impl std::str::FromStr for CleanInterval {
    type Err = Error;
    fn from_str(s: &str) -> Result<CleanInterval> {
        match s.parse::<u64>() {
            Ok(v) if v <= u64::from(u32::MAX) => Ok(CleanInterval(v)),
            _ => Err(invalid(format!("cache-clean-interval: '{s}' is not a number of seconds up to {}", u32::MAX))),
        }
    }
}

impl Qcow2 {
    /// One `cache-clean-interval` round over the L2 and refcount caches.
    fn clean_caches(&self) {
        self.cache.clean_unused();
        self.refs.state.lock().unwrap_or_else(|e| e.into_inner()).clean_unused();
    }
}

async fn open_data_file(ctx: &OpenCtx, opts: &mut OptionTree, h: &Header, image: &str) -> Result<Option<Arc<dyn BlockNode>>> {
    let sub = opts.take_subtree("data-file");
    let named = opts.take("data-file");
    if !h.has_data_file() {
        if !sub.is_empty() || named.is_some() {
            return Err(invalid("'data-file' can only be set for images with an external data file"));
        }
        return Ok(None);
    }
    let mut child_opts = sub;
    if let Some(n) = named {
        child_opts.set_default("filename", n);
    }
    if child_opts.is_empty() {
        let Some(name) = &h.data_file else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Missing external data file name: the image needs a 'data-file' option",
            )
            .with_file(image));
        };
        // QEMU opens the name as recorded: relative names are relative to
        // the working directory (unlike backing file names).
        child_opts.set("filename", name.clone());
    }
    let mut child_ctx = ctx.clone();
    child_ctx.flags.shared = Perm::ALL;
    let node = if child_opts.contains("driver") && !child_opts.contains("file") && child_ctx.registry.get(child_opts.get("driver").unwrap_or("")).is_some_and(|d| d.kind() == DriverKind::Protocol) {
        child_ctx.open_protocol(child_opts).await?
    } else if child_opts.contains("driver") {
        open_image(&child_ctx, child_opts).await?
    } else {
        child_ctx.open_protocol(child_opts).await?
    };
    Ok(Some(node))
}

async fn open_backing(ctx: &OpenCtx, opts: &mut OptionTree, h: &Header, image: &str) -> Result<Option<Arc<dyn BlockNode>>> {
    let sub = opts.take_subtree("backing");
    let named = opts.take("backing");
    if named.as_deref() == Some("null") || named.as_deref() == Some("") {
        return Ok(None);
    }
    let mut bopts = sub;
    if let Some(n) = named {
        bopts.set_default("file.filename", n);
    }
    if bopts.is_empty() {
        let Some(name) = &h.backing_file else { return Ok(None) };
        if !ctx.flags.follow_backing {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("image names backing file '{name}', and following backing names found in images is turned off; name the backing file in the options or pass backing=null"),
            )
            .with_file(image));
        }
        bopts.set("file.filename", resolve_relative(image, name));
        if let Some(f) = &h.backing_format {
            bopts.set("driver", f.clone());
        }
    }
    if ctx.flags.depth + 1 >= MAX_CHAIN_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidImage,
            format!("backing chain is deeper than {MAX_CHAIN_DEPTH} images (a loop?)"),
        )
        .with_file(image));
    }
    let mut bctx = ctx.clone();
    bctx.flags.write = false;
    bctx.flags.extra_perm = Perm::NONE;
    bctx.flags.depth += 1;
    bctx.flags.repair = false;
    bctx.flags.shared = Perm::ALL;
    let b = open_image(&bctx, bopts).await.map_err(|e| {
        let msg = format!("Could not open backing file: {e}");
        Error::new(e.kind(), msg).with_file(image)
    })?;
    Ok(Some(b))
}

impl Driver for Qcow2Driver {
    fn name(&self) -> &'static str {
        "qcow2"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn probe(&self, header: &[u8], _filename: &str) -> u32 {
        if header.len() >= 8 && header[..4] == header::MAGIC {
            let v = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes"));
            if v >= 2 {
                return 100;
            }
        }
        0
    }
    fn child_shared(&self) -> Perm {
        // Like QEMU: nobody else may write or resize the file under a qcow2 node.
        Perm::ALL.without(Perm::WRITE.union(Perm::RESIZE))
    }
    fn open_format<'a>(
        &'a self,
        ctx: &'a OpenCtx,
        opts: OptionTree,
        file: Arc<dyn BlockNode>,
        _probed: bool,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move { Ok(self.open(ctx, opts, file).await? as Arc<dyn BlockNode>) })
    }
    fn create_opts(&self) -> &'static [CreateOpt] {
        CREATE_OPTS
    }
    fn create<'a>(&'a self, ctx: &'a OpenCtx, filename: &'a str, opts: OptionTree) -> BoxFuture<'a, Result<()>> {
        Box::pin(create::create(ctx, filename, opts))
    }
}
