//! The qcow2 request paths: mapping guest ranges through L1/L2, reads (data,
//! zero, backing, compressed), writes in place, allocating writes with
//! copy-on-write of the untouched part of a cluster (or subcluster), block
//! status, compressed writes and resize (zeroing and discard: `zero.rs`). Metadata writeback
//! order is `flush.rs`'s business; this file only changes cached entries.

use std::ops::Range;

use engine::block::{check_request, check_write, check_writable, BlockNode, Extent, Prealloc, WriteFlags};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::runtime::IoBuf;

use super::layout::{self, decode, Mapping, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SUBCLUSTERS};
use super::{compress, corrupt_err, Qcow2};

/// Stay under this many bytes per allocating write batch.
pub(super) const MAX_ALLOC_BATCH: u64 = 8 << 20;

fn take(b: &mut IoBuf) -> IoBuf {
    std::mem::replace(b, IoBuf::empty())
}

/// Mask of the subclusters of a cluster that [start, end) (offsets within the
/// cluster) touches.
pub(super) fn sub_mask(sc: u64, start: u64, end: u64) -> u32 {
    if start >= end {
        return 0;
    }
    let first = (start / sc) as u32;
    let last = ((end - 1) / sc) as u32;
    let n = last - first + 1;
    if n >= SUBCLUSTERS {
        u32::MAX
    } else {
        ((1u32 << n) - 1) << first
    }
}

impl Qcow2 {
    fn entry_words(&self) -> usize {
        if self.geo.extended_l2 {
            2
        } else {
            1
        }
    }

    /// The L2 table of L1 entry `l1i` (0: none), validated.
    pub(super) fn l2_table(&self, l1i: usize) -> Result<(u64, u64)> {
        let l1 = self.cache.l1.load();
        if l1i >= l1.len() {
            return Ok((0, 0));
        }
        let e = l1.get(l1i);
        let off = layout::l1_l2_offset(&self.geo, e, l1i)?;
        if off != 0 && off.checked_add(self.geo.cluster_size()).is_none_or(|end| end > (1u64 << 56)) {
            return Err(corrupt_err(format!("L2 table offset {off:#x} in L1 entry {l1i} is out of range")));
        }
        Ok((off, e))
    }

    /// The raw entry (descriptor, bitmap) of the cluster holding guest offset `g`.
    pub(super) async fn entry(&self, g: u64) -> Result<Option<(u64, u64)>> {
        let l1i = self.geo.l1_index(layout::Guest(g));
        let (l2off, _) = self.l2_table(l1i)?;
        if l2off == 0 {
            return Ok(None);
        }
        let l2i = self.geo.l2_index(layout::Guest(g));
        let ew = self.entry_words();
        let ext = self.geo.extended_l2;
        let l1 = self.cache.l1.load();
        let read = |s: &super::cache::L2Slice, w: usize| (s.word(w), if ext { s.word(w + 1) } else { 0 });
        if let Some(v) = self.cache.peek(&l1, l1i, l2off, l2i, ew, read) {
            return Ok(Some(v));
        }
        drop(l1);
        let (s, w) = self.cache.get(&*self.file, l1i, l2off, l2i, ew).await?;
        Ok(Some(read(&s, w)))
    }

    /// Decode the entries of one slice from `l2i` on into one run starting at
    /// guest offset `g` (at most `max` bytes).
    fn walk(&self, s: &super::cache::L2Slice, w: usize, g: u64, l2i: usize, max: u64) -> Result<(Mapping, u64)> {
        let geo = &self.geo;
        let cs = geo.cluster_size();
        let ew = self.entry_words();
        let ext = geo.extended_l2;
        let df = self.has_data_file();
        let per_slice = self.cache.slice_words / ew;
        let mut word = w;
        let in_c = geo.in_cluster(g);
        let (m, n) = decode(geo, s.word(word), if ext { s.word(word + 1) } else { 0 }, in_c, df)?;
        let mut run = n;
        let mut idx = l2i % per_slice;
        if n == cs - in_c {
            while run < max && idx + 1 < per_slice {
                idx += 1;
                word += ew;
                let (m2, n2) = decode(geo, s.word(word), if ext { s.word(word + 1) } else { 0 }, 0, df)?;
                let same = match (m, m2) {
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero { host: None }, Mapping::Zero { host: None }) => true,
                    (Mapping::Zero { host: Some(a) }, Mapping::Zero { host: Some(b) }) => b == a + in_c + run,
                    (Mapping::Data { host: a, copied: ca }, Mapping::Data { host: b, copied: cb }) => ca == cb && b == a + run,
                    _ => false,
                };
                if !same {
                    break;
                }
                run += n2;
                if n2 < cs {
                    break;
                }
            }
        }
        Ok((m, run.min(max)))
    }

    /// `map` from the cache alone, without waiting: None when a slice must be
    /// loaded first (or anything needs reporting; `map` then does it).
    pub(super) fn map_cached(&self, g: u64, max: u64) -> Option<(Mapping, u64)> {
        let geo = &self.geo;
        let l1i = geo.l1_index(layout::Guest(g));
        let l1 = self.cache.l1.load();
        if l1i >= l1.len() {
            return None;
        }
        let l2off = layout::l1_l2_offset(geo, l1.get(l1i), l1i).ok()?;
        if l2off == 0 {
            return None;
        }
        let l2i = geo.l2_index(layout::Guest(g));
        self.cache.peek(&l1, l1i, l2off, l2i, self.entry_words(), |s, w| self.walk(s, w, g, l2i, max)).and_then(|r| r.ok())
    }

    /// What guest offset `g` maps to, and how many bytes (at most `max`) from
    /// there map the same way (contiguous on the host for data).
    pub(super) async fn map(&self, g: u64, max: u64) -> Result<(Mapping, u64)> {
        let geo = &self.geo;
        let l1i = geo.l1_index(layout::Guest(g));
        let (l2off, _) = self.l2_table(l1i)?;
        if l2off == 0 {
            let span = geo.l2_span();
            return Ok((Mapping::Unallocated, max.min(span - g % span)));
        }
        let l2i = geo.l2_index(layout::Guest(g));
        let ew = self.entry_words();
        let l1 = self.cache.l1.load();
        if let Some(r) = self.cache.peek(&l1, l1i, l2off, l2i, ew, |s, w| self.walk(s, w, g, l2i, max)) {
            return r;
        }
        drop(l1);
        let (s, w) = self.cache.get(&*self.file, l1i, l2off, l2i, ew).await?;
        self.walk(&s, w, g, l2i, max)
    }

    // ---- reads ----

    pub(super) async fn do_read(&self, offset: u64, mut buf: IoBuf, range: Range<usize>) -> (Result<()>, IoBuf) {
        if let Err(e) = check_request(self, offset, range.len() as u64) {
            return (Err(self.err(e)), buf);
        }
        // Hot path: one cached run of data covers the request. The general
        // path is boxed so this future stays small.
        if let Some((Mapping::Data { host, .. }, n)) = self.map_cached(offset, range.len() as u64) {
            if n == range.len() as u64 {
                return self.data().read_part(host, buf, range).await;
            }
        }
        let r = Box::pin(self.read_inner(offset, &mut buf, range)).await;
        (r.map_err(|e| self.err(e)), buf)
    }

    async fn read_inner(&self, offset: u64, buf: &mut IoBuf, range: Range<usize>) -> Result<()> {
        let mut pos = range.start;
        while pos < range.end {
            let g = offset + (pos - range.start) as u64;
            let want = (range.end - pos) as u64;
            let (m, n) = self.map(g, want).await?;
            let r = pos..pos + n as usize;
            match m {
                Mapping::Unallocated => self.read_backing(g, buf, r).await?,
                Mapping::Zero { .. } => buf[r].fill(0),
                Mapping::Data { host, .. } => {
                    let (res, b) = self.data().read_part(host, take(buf), r).await;
                    *buf = b;
                    res?;
                }
                Mapping::Compressed { offset: coff, len } => {
                    let cluster = self.read_compressed(coff, len).await?;
                    let in_c = self.geo.in_cluster(g) as usize;
                    buf[r.clone()].copy_from_slice(&cluster[in_c..in_c + r.len()]);
                }
            }
            pos += n as usize;
        }
        Ok(())
    }

    /// Fill `buf[r]` with what the backing file has at `g` (zeroes past its end
    /// or without one).
    async fn read_backing(&self, g: u64, buf: &mut IoBuf, r: Range<usize>) -> Result<()> {
        let Some(b) = &self.backing else {
            buf[r].fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let k = if g >= bsize { 0 } else { ((bsize - g) as usize).min(r.len()) };
        if k > 0 {
            let (res, nb) = b.read_part(g, take(buf), r.start..r.start + k).await;
            *buf = nb;
            res?;
        }
        buf[r.start + k..r.end].fill(0);
        Ok(())
    }

    async fn read_compressed(&self, coff: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size() as usize;
        let (r, raw) = self.file.read(coff, IoBuf::new(len as usize)).await;
        r?;
        let ty = self.header().compression;
        compress::decompress(ty, &raw, cs).map_err(|e| e.at(coff))
    }

    /// Guest contents of [start, end) as they read now (zeroes past the end).
    async fn read_guest(&self, buf: &mut IoBuf, at: usize, start: u64, end: u64) -> Result<()> {
        if start >= end {
            return Ok(());
        }
        let size = self.size();
        let stop = end.min(size).max(start);
        if stop > start {
            self.read_inner(start, buf, at..at + (stop - start) as usize).await?;
        }
        let z = at + (stop - start) as usize;
        buf[z..at + (end - start) as usize].fill(0);
        Ok(())
    }

    // ---- writes ----

    pub(super) async fn do_write(&self, offset: u64, mut buf: IoBuf, range: Range<usize>, flags: WriteFlags) -> (Result<()>, IoBuf) {
        // Hot path: an in-place write into one cached run of our own clusters.
        if !self.read_only && !self.corrupt.load(std::sync::atomic::Ordering::Relaxed) && check_request(self, offset, range.len() as u64).is_ok() {
            if let Some((Mapping::Data { host, copied: true }, n)) = self.map_cached(offset, range.len() as u64) {
                if n == range.len() as u64 {
                    return self.data().write_part(host, buf, range, flags).await;
                }
            }
        }
        let r = Box::pin(self.write_inner(offset, &mut buf, range, flags)).await;
        let r = match r {
            Err(e) if e.kind() == ErrorKind::Corrupt => Err(self.mark_corrupt(e).await),
            r => r.map_err(|e| self.err(e)),
        };
        (r, buf)
    }

    pub(super) async fn write_inner(&self, offset: u64, buf: &mut IoBuf, range: Range<usize>, flags: WriteFlags) -> Result<()> {
        check_write(self, offset, range.len() as u64)?;
        self.check_not_corrupt()?;
        let mut pos = range.start;
        let mut allocated = false;
        while pos < range.end {
            let g = offset + (pos - range.start) as u64;
            let want = (range.end - pos) as u64;
            let (m, n) = self.map(g, want).await?;
            if let Mapping::Data { host, copied: true } = m {
                let n = n.min(want) as usize;
                let (res, b) = self.data().write_part(host, take(buf), pos..pos + n, flags).await;
                *buf = b;
                res?;
                pos += n;
                continue;
            }
            let n = self.write_allocating(g, buf, pos..range.end).await?;
            allocated |= n > 0;
            pos += n;
        }
        if allocated {
            if flags.fua {
                self.flush().await?;
            } else {
                self.writeback_if_needed().await?;
            }
        }
        Ok(())
    }

    /// The L2 table of L1 entry `l1i`, allocated (zeroed on disk) if missing.
    pub(super) async fn ensure_l2(&self, l1i: usize) -> Result<u64> {
        loop {
            let (off, e) = self.l2_table(l1i)?;
            if off != 0 {
                if e & OFLAG_COPIED == 0 {
                    // Only snapshots share tables, and images with snapshots
                    // open read-only; a lone missing flag is repaired.
                    if self.refs.refcount(&*self.file, off).await? != 1 {
                        return Err(Error::new(ErrorKind::Unsupported, "L2 table is shared with an internal snapshot"));
                    }
                    let _g = self.cache.guard.read().unwrap_or_else(|e| e.into_inner());
                    self.cache.l1.load().entries[l1i].fetch_or(OFLAG_COPIED, std::sync::atomic::Ordering::AcqRel);
                    self.cache.mark_l1_dirty(l1i);
                }
                return Ok(off);
            }
            let _t = self.table_locks.begin(l1i as u64, l1i as u64 + 1, true).await;
            if self.l2_table(l1i)?.0 != 0 {
                continue;
            }
            self.before_allocation().await?;
            let cs = self.geo.cluster_size();
            let off = self.refs.alloc(&*self.file, 1).await?;
            let (r, _) = self.file.write(off, IoBuf::zeroed(cs as usize), WriteFlags::default()).await;
            r?;
            self.cache.mark_fresh(off);
            // The cache might still hold slices of a table this entry had
            // before (freed by a shrink): they are dropped on their next use,
            // as their host offset no longer matches.
            let _g = self.cache.guard.read().unwrap_or_else(|e| e.into_inner());
            self.cache.l1.load().entries[l1i].store(off | OFLAG_COPIED, std::sync::atomic::Ordering::Release);
            self.cache.mark_l1_dirty(l1i);
            return Ok(off);
        }
    }

    /// Lazy refcounts: the dirty bit goes on disk before the first change
    /// whose refcount update may be postponed.
    pub(super) async fn before_allocation(&self) -> Result<()> {
        if self.opts.lazy_refcounts && !self.dirty_on_disk.load(std::sync::atomic::Ordering::Acquire) {
            self.set_dirty_bit().await?;
        }
        Ok(())
    }

    /// Set entry words of cluster `c` (guest offset); returns the old words.
    pub(super) async fn set_entry(&self, l1i: usize, l2off: u64, c: u64, f: impl FnOnce(u64, u64) -> (u64, u64)) -> Result<(u64, u64)> {
        let l2i = self.geo.l2_index(layout::Guest(c));
        let ext = self.geo.extended_l2;
        self.cache
            .modify(&*self.file, l1i, l2off, l2i, self.entry_words(), |e| {
                let old = (e.slice.word(e.word), if ext { e.slice.word(e.word + 1) } else { 0 });
                let (n, bm) = f(old.0, old.1);
                if ext {
                    // Bitmap first: a reader that sees the new descriptor
                    // (read after the bitmap) also sees the new bitmap.
                    e.slice.set_word(e.word + 1, bm);
                }
                e.slice.set_word(e.word, n);
                old
            })
            .await
    }

    /// Queue the release of whatever host storage an old entry held.
    pub(super) fn release(&self, old: u64, guest_discard: bool) {
        if self.has_data_file() {
            return;
        }
        let punch = if guest_discard { self.opts.pass_discard_request } else { self.opts.pass_discard_other };
        if old & OFLAG_COMPRESSED != 0 {
            let r = layout::compressed_clusters(&self.geo, old);
            let cs = self.geo.cluster_size();
            self.refs.free_later(r.start * cs, (r.end - r.start) * cs, punch);
        } else if let Some(h) = layout::std_host_cluster(old) {
            self.refs.free_later(h, self.geo.cluster_size(), punch);
        }
    }

    /// Write the part of `buf[r]` (guest offset `g`) that starts in a cluster
    /// needing allocation (or a zeroed/partly allocated one), with
    /// copy-on-write. Returns the bytes consumed (0: the cluster turned out
    /// writable in place; map again).
    async fn write_allocating(&self, g: u64, buf: &mut IoBuf, r: Range<usize>) -> Result<usize> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let sc = geo.subcluster_size();
        let ext = geo.extended_l2;
        let end_g = g + r.len() as u64;
        let c0 = geo.cluster_start(g);
        let span = geo.l2_span();
        let batch_cap = (MAX_ALLOC_BATCH / cs).clamp(1, self.refs.max_batch());
        let c_end = end_g.next_multiple_of(cs).min(c0 + batch_cap * cs).min((c0 / span + 1) * span);
        let _lock = self.cluster_locks.begin(c0, c_end, true).await;

        let l1i = geo.l1_index(layout::Guest(c0));
        let l2off = self.ensure_l2(l1i).await?;

        // What each cluster needs: a new host cluster, or its own (reused).
        #[derive(PartialEq)]
        enum Need {
            InPlace,
            Reuse(u64),
            New,
        }
        let df = self.has_data_file();
        let classify = |e: u64, bm: u64, ws: u64, we: u64| -> Need {
            if e & OFLAG_COMPRESSED != 0 {
                return Need::New;
            }
            let host = e & layout::L2E_OFFSET_MASK;
            let has_host = host != 0 || (df && e & OFLAG_COPIED != 0);
            if !has_host || e & OFLAG_COPIED == 0 {
                return Need::New;
            }
            if ext {
                let mask = sub_mask(sc, ws, we);
                if bm as u32 & mask == mask {
                    return Need::InPlace;
                }
                return Need::Reuse(host);
            }
            if geo.zero_flag && e & OFLAG_ZERO != 0 {
                return Need::Reuse(host);
            }
            Need::InPlace
        };

        let mut olds = Vec::new();
        let mut k = 0u64;
        let mut reuse = None;
        while c0 + k * cs < c_end {
            let c = c0 + k * cs;
            let (e, bm) = self.entry(c).await?.unwrap_or((0, 0));
            let ws = g.max(c) - c;
            let we = end_g.min(c + cs) - c;
            match classify(e, bm, ws, we) {
                Need::New => olds.push((e, bm)),
                Need::InPlace => break,
                Need::Reuse(h) => {
                    if k == 0 {
                        reuse = Some((h, e, bm));
                    }
                    break;
                }
            }
            k += 1;
        }
        if k == 0 && reuse.is_none() {
            return Ok(0);
        }
        self.before_allocation().await?;
        if let Some((h, e, bm)) = reuse {
            return self.write_reuse(g, end_g, c0, h, e, bm, buf, r, l1i, l2off).await;
        }

        let wend = end_g.min(c0 + k * cs);
        // COW bounds: whole clusters, or whole subclusters with extended L2
        // when the old cluster keeps nothing we must carry over.
        let whole = |e: u64| -> bool { !ext || e & OFLAG_COMPRESSED != 0 || layout::std_host_cluster(e).is_some() };
        let cow_start = if whole(olds[0].0) { c0 } else { g - (g - c0) % sc };
        let last = c0 + (k - 1) * cs;
        let cow_end = if whole(olds[k as usize - 1].0) { last + cs } else { (wend - last).next_multiple_of(sc) + last };

        let host = if df { c0 } else { self.refs.alloc(&*self.file, k).await? };
        let result = self.write_cow(g, wend, cow_start, cow_end, host + (cow_start - c0), buf, r.start).await;
        if let Err(e) = result {
            if !df {
                // Nothing points at the new clusters yet: give them back now.
                let _ = self.refs.free_now(&*self.file, host, k * cs).await;
            }
            return Err(e);
        }
        for (i, &(old, _)) in olds.iter().enumerate() {
            let c = c0 + i as u64 * cs;
            let h = host + i as u64 * cs;
            let mask = if whole(old) { u32::MAX } else { sub_mask(sc, cow_start.max(c) - c, cow_end.min(c + cs) - c) };
            let (old, _) = self
                .set_entry(l1i, l2off, c, |_, obm| {
                    let alloc = (obm as u32) | mask;
                    let zero = ((obm >> 32) as u32) & !mask;
                    let bm = if ext { u64::from(alloc) | (u64::from(zero) << 32) } else { 0 };
                    (h | OFLAG_COPIED, if old & OFLAG_COMPRESSED != 0 { u64::from(u32::MAX) } else { bm })
                })
                .await?;
            self.release(old, false);
        }
        Ok((wend - g) as usize)
    }

    /// Write guest [g, wend) from `buf[at..]`, padded to [cow_start, cow_end)
    /// with the current contents, at `host`.
    #[allow(clippy::too_many_arguments)]
    async fn write_cow(&self, g: u64, wend: u64, cow_start: u64, cow_end: u64, host: u64, buf: &mut IoBuf, at: usize) -> Result<()> {
        let n = (wend - g) as usize;
        if cow_start == g && cow_end == wend {
            let (res, b) = self.data().write_part(host, take(buf), at..at + n, WriteFlags::default()).await;
            *buf = b;
            return res;
        }
        let mut tmp = IoBuf::new((cow_end - cow_start) as usize);
        let head = (g - cow_start) as usize;
        self.read_guest(&mut tmp, 0, cow_start, g).await?;
        tmp[head..head + n].copy_from_slice(&buf[at..at + n]);
        self.read_guest(&mut tmp, head + n, wend, cow_end).await?;
        let (res, _) = self.data().write(host, tmp, WriteFlags::default()).await;
        res
    }

    /// A write into a cluster that keeps its host cluster: a zero cluster with
    /// preallocated storage, or (extended L2) unallocated subclusters of an
    /// allocated cluster.
    #[allow(clippy::too_many_arguments)]
    async fn write_reuse(
        &self,
        g: u64,
        end_g: u64,
        c0: u64,
        host: u64,
        _e: u64,
        _bm: u64,
        buf: &mut IoBuf,
        r: Range<usize>,
        l1i: usize,
        l2off: u64,
    ) -> Result<usize> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let sc = geo.subcluster_size();
        let wend = end_g.min(c0 + cs);
        let (cow_start, cow_end) = if geo.extended_l2 { (g - (g - c0) % sc, c0 + (wend - c0).next_multiple_of(sc)) } else { (c0, c0 + cs) };
        self.write_cow(g, wend, cow_start, cow_end, host + (cow_start - c0), buf, r.start).await?;
        let mask = sub_mask(sc, cow_start - c0, cow_end - c0);
        self.set_entry(l1i, l2off, c0, |e, bm| {
            if geo.extended_l2 {
                let alloc = (bm as u32) | mask;
                let zero = ((bm >> 32) as u32) & !mask;
                (e, u64::from(alloc) | (u64::from(zero) << 32))
            } else {
                ((e & !OFLAG_ZERO) | OFLAG_COPIED, 0)
            }
        })
        .await?;
        Ok((wend - g) as usize)
    }

    /// Start a writeback when dirty metadata outgrows the caches.
    pub(super) async fn writeback_if_needed(&self) -> Result<()> {
        if self.cache.over_capacity() && !self.cache.evict() {
            return Ok(());
        }
        if self.cache.over_capacity() || self.refs.too_many_dirty() {
            self.writeback(false).await?;
            self.cache.evict();
        }
        Ok(())
    }

    // ---- compressed writes ----

    pub(super) async fn do_write_compressed(&self, offset: u64, mut buf: IoBuf) -> (Result<()>, IoBuf) {
        let r = self.write_compressed_inner(offset, &mut buf).await;
        let r = match r {
            Err(e) if e.kind() == ErrorKind::Corrupt => Err(self.mark_corrupt(e).await),
            r => r.map_err(|e| self.err(e)),
        };
        (r, buf)
    }

    async fn write_compressed_inner(&self, offset: u64, buf: &mut IoBuf) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let len = buf.len() as u64;
        check_write(self, offset, len)?;
        self.check_not_corrupt()?;
        if !offset.is_multiple_of(cs) || (len != cs && offset + len != self.size()) || len > cs {
            return Err(invalid(format!("compressed writes must cover exactly one cluster ({cs} bytes) at an aligned offset")));
        }
        if self.has_data_file() {
            return Err(Error::new(ErrorKind::Unsupported, "Compression is not supported with an external data file"));
        }
        let ty = self.header().compression;
        let data: std::borrow::Cow<'_, [u8]> = if len == cs {
            std::borrow::Cow::Borrowed(&buf[..])
        } else {
            let mut v = buf.to_vec();
            v.resize(cs as usize, 0);
            std::borrow::Cow::Owned(v)
        };
        let Some(packed) = compress::compress(ty, &data, cs as usize)? else {
            // Does not compress: store it as is.
            let n = buf.len();
            return self.write_inner(offset, buf, 0..n, WriteFlags::default()).await;
        };
        let _lock = self.cluster_locks.begin(offset, offset + cs, true).await;
        let l1i = geo.l1_index(layout::Guest(offset));
        let l2off = self.ensure_l2(l1i).await?;
        self.before_allocation().await?;
        let clen = packed.len() as u64;
        let off = self.refs.alloc_bytes(&*self.file, clen).await?;
        let (r, _) = self.file.write(off, IoBuf::from_slice(&packed), WriteFlags::default()).await;
        if let Err(e) = r {
            let _ = self.refs.free_now(&*self.file, off, clen).await;
            return Err(e);
        }
        let entry = layout::compressed_entry(&geo, off, clen);
        let (old, _) = self.set_entry(l1i, l2off, offset, |_, _| (entry, 0)).await?;
        self.release(old, false);
        self.writeback_if_needed().await
    }

    pub(super) async fn do_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        let size = self.size();
        if offset >= size || len == 0 {
            return Err(invalid(format!("block status at offset {offset} beyond end ({size})")).with_file(self.filename.clone()));
        }
        let (m, n) = self.map(offset, len.min(size - offset)).await.map_err(|e| self.err(e))?;
        let e = match m {
            Mapping::Unallocated => Extent { len: n, data: false, zero: false, allocated: false, offset: None, compressed: false },
            Mapping::Zero { host } => {
                let in_c = self.geo.in_cluster(offset);
                Extent { len: n, data: false, zero: true, allocated: true, offset: host.map(|h| h + in_c), compressed: false }
            }
            Mapping::Data { host, .. } => Extent { len: n, data: true, zero: false, allocated: true, offset: Some(host), compressed: false },
            Mapping::Compressed { .. } => Extent { len: n, data: true, zero: false, allocated: true, offset: None, compressed: true },
        };
        Ok(e)
    }

    // ---- resize ----

    pub(super) async fn do_truncate(&self, size: u64, _exact: bool, prealloc: Prealloc) -> Result<()> {
        check_writable(self).map_err(|e| self.err(e))?;
        self.check_not_corrupt()?;
        let cur = self.size();
        if !size.is_multiple_of(512) {
            return Err(invalid("The new size must be a multiple of 512").with_file(self.filename.clone()));
        }
        if size == cur {
            return Ok(());
        }
        let r = if size < cur {
            if prealloc != Prealloc::Off {
                return Err(invalid("Preallocation can only be used for growing images").with_file(self.filename.clone()));
            }
            self.shrink(size).await
        } else {
            self.grow(cur, size, prealloc).await
        };
        r.map_err(|e| self.err(e))
    }
}
