//! Metadata writeback and the header: the one place that decides the order in
//! which qcow2 metadata reaches the disk, plus operations that move tables
//! (L1 growth on resize, shrink) and preallocation.
//!
//! Writeback order, and why:
//! 1. One snapshot, taken with the cache guard held for writing, of dirty
//!    refcount blocks, the refcount table, dirty L2 slices, dirty L1 entries
//!    and the queue of freed clusters. Every L2 change in it was made after
//!    the refcount change it depends on, so that one is in it too.
//! 2. Refcount blocks and table, then a flush: a cluster is counted before
//!    anything on disk points at it (refcount before L2 after allocation). If
//!    the table moved, the header follows, then another flush.
//! 3. L2 slices and L1 entries, then a flush.
//! 4. Only now are the queued frees applied (L2 before refcount after frees):
//!    a crash before this leaks clusters, never hands one out twice.
//!
//! With lazy refcounts, step 2 is skipped until close; the dirty bit, set
//! before the first allocation, makes the next open rebuild the refcounts.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use engine::block::{BlockNode, Prealloc, WriteFlags};
use engine::error::{invalid, ErrorKind, Result};
use engine::runtime::IoBuf;

use super::header;
use super::layout::{self, OFLAG_COPIED};
use super::Qcow2;

struct Snapshot {
    blocks: Vec<(usize, u64, u64, Vec<u8>)>,
    table: Option<(u64, u64, Vec<u8>)>,
    moved: Option<super::refcount::TableMove>,
    slices: Vec<(Arc<super::cache::L2Slice>, u64, Vec<u8>)>,
    l1: Vec<(u64, Vec<u8>)>,
    l1_dirty: Vec<usize>,
    frees: Vec<(u64, u64, bool)>,
}

impl Qcow2 {
    fn take_snapshot(&self, with_refcounts: bool) -> Snapshot {
        let _g = self.cache.guard.write().unwrap_or_else(|e| e.into_inner());
        let cs = self.geo.cluster_size();
        let mut snap = Snapshot { blocks: Vec::new(), table: None, moved: None, slices: Vec::new(), l1: Vec::new(), l1_dirty: Vec::new(), frees: Vec::new() };
        {
            let mut st = self.refs.lock();
            if with_refcounts {
                for (&rti, b) in st.blocks.iter() {
                    if b.mods != b.written {
                        snap.blocks.push((rti, st.table[rti] & layout::REFT_OFFSET_MASK, b.mods, b.data.to_vec()));
                    }
                }
                if st.table_mods != st.table_written {
                    let mut bytes = Vec::with_capacity(st.table_clusters as usize * cs as usize);
                    for e in &st.table {
                        bytes.extend_from_slice(&e.to_be_bytes());
                    }
                    bytes.resize(st.table_clusters as usize * cs as usize, 0);
                    snap.table = Some((st.table_offset, st.table_mods, bytes));
                }
                snap.moved = st.moved;
            }
            snap.frees = std::mem::take(&mut st.pending_frees);
        }
        for s in self.cache.dirty_slices() {
            let (m, bytes) = s.snapshot();
            snap.slices.push((s, m, bytes));
        }
        let dirty: Vec<usize> = std::mem::take(&mut *self.cache.l1_dirty.lock().unwrap_or_else(|e| e.into_inner())).into_iter().collect();
        let l1 = self.cache.l1.load();
        let l1_off = self.header().l1_table_offset;
        // L1 entries go out in 512-byte sectors (64 entries), as QEMU writes them.
        let mut last = usize::MAX;
        for &i in &dirty {
            let sector = i / 64;
            if sector == last || i >= l1.len() {
                continue;
            }
            last = sector;
            let start = sector * 64;
            let end = (start + 64).min(l1.len());
            snap.l1.push((l1_off + start as u64 * 8, l1.snapshot(start..end)));
        }
        snap.l1_dirty = dirty;
        snap
    }

    /// Write back dirty metadata in the order the format needs (see the top
    /// of this file). `closing` also writes postponed refcounts and clears
    /// the dirty bit.
    pub(super) async fn writeback(&self, closing: bool) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _f = self.flush_lock.lock().await;
        // Applying frees dirties refcount blocks again: closing repeats until
        // nothing is left.
        let rounds = if closing { 8 } else { 1 };
        for _ in 0..rounds {
            let with_refcounts = !self.opts.lazy_refcounts || closing;
            let snap = self.take_snapshot(with_refcounts);
            let frees = snap.frees.clone();
            let l1_dirty = snap.l1_dirty.clone();
            let idle = snap.blocks.is_empty() && snap.table.is_none() && snap.slices.is_empty() && snap.l1.is_empty() && frees.is_empty();
            if let Err(e) = self.write_snapshot(snap).await {
                // Put back what was not applied; dirty slices and blocks stay dirty.
                let mut st = self.refs.lock();
                st.pending_frees.extend(frees);
                drop(st);
                for i in l1_dirty {
                    self.cache.mark_l1_dirty(i);
                }
                return Err(self.err(e));
            }
            if idle {
                break;
            }
        }
        if closing && self.dirty_on_disk.load(Ordering::Acquire) {
            self.clear_dirty_bit().await?;
        }
        Ok(())
    }

    async fn write_snapshot(&self, snap: Snapshot) -> Result<()> {
        let file = &*self.file;
        // 2. refcounts
        if !snap.blocks.is_empty() || snap.table.is_some() {
            if let Some(d) = &self.data_file {
                d.flush().await?;
            }
            for (_, off, _, data) in &snap.blocks {
                write_all(file, *off, data).await?;
            }
            if let Some((off, _, bytes)) = &snap.table {
                write_all(file, *off, bytes).await?;
            }
            file.flush().await?;
            if let Some(m) = snap.moved {
                {
                    let mut h = self.header();
                    h.refcount_table_offset = m.offset;
                    h.refcount_table_clusters = m.clusters;
                }
                self.write_header().await?;
                file.flush().await?;
                let mut st = self.refs.lock();
                if st.moved.is_some_and(|c| c.offset == m.offset) {
                    st.moved = None;
                }
                let cs = self.geo.cluster_size();
                st.pending_frees.push((m.old_offset, u64::from(m.old_clusters) * cs, false));
            }
            let mut st = self.refs.lock();
            for (rti, _, mods, _) in &snap.blocks {
                if let Some(b) = st.blocks.get_mut(rti) {
                    b.written = b.written.max(*mods);
                }
            }
            if let Some((_, mods, _)) = &snap.table {
                st.table_written = st.table_written.max(*mods);
            }
        } else if (!snap.slices.is_empty() || !snap.l1.is_empty()) && self.data_file.is_some() {
            if let Some(d) = &self.data_file {
                d.flush().await?;
            }
        }
        // 3. L2 and L1
        if !snap.slices.is_empty() || !snap.l1.is_empty() {
            if self.opts.lazy_refcounts && !self.dirty_on_disk.load(Ordering::Acquire) {
                self.set_dirty_bit().await?;
            }
            for (s, _, bytes) in &snap.slices {
                write_all(file, s.host, bytes).await?;
            }
            for (off, bytes) in &snap.l1 {
                write_all(file, *off, bytes).await?;
            }
            file.flush().await?;
            for (s, m, _) in &snap.slices {
                s.mark_written(*m);
            }
        }
        // 4. frees
        if !snap.frees.is_empty() {
            self.apply_frees(&snap.frees).await?;
        }
        Ok(())
    }

    async fn apply_frees(&self, frees: &[(u64, u64, bool)]) -> Result<()> {
        for (i, &(off, len, punch)) in frees.iter().enumerate() {
            match self.refs.adjust(&*self.file, off, len, -1).await {
                Ok(freed) => {
                    if punch {
                        let cs = self.geo.cluster_size();
                        for c in freed {
                            // A hint: a file that cannot punch keeps the bytes.
                            let _ = self.file.discard(c, cs.min(self.file.size().saturating_sub(c))).await;
                        }
                    }
                }
                Err(e) => {
                    // Keep the rest for the next round; report this one.
                    self.refs.lock().pending_frees.extend_from_slice(&frees[i + 1..]);
                    if e.kind() == ErrorKind::Corrupt {
                        eprintln!("qcow2: {}: {e} (leaving it for 'check -r all')", self.filename);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Rewrite the header cluster from `self.header`.
    pub(super) async fn write_header(&self) -> Result<()> {
        let bytes = self.header().serialize()?;
        let cs = self.geo.cluster_size() as usize;
        let mut b = IoBuf::zeroed(cs);
        b[..bytes.len()].copy_from_slice(&bytes);
        let (r, _) = self.file.write(0, b, WriteFlags::default()).await;
        r
    }

    async fn write_incompatible(&self, bits: u64) -> Result<()> {
        let (r, _) = self.file.write(72, IoBuf::from_slice(&bits.to_be_bytes()), WriteFlags::default()).await;
        r?;
        self.file.flush().await
    }

    pub(super) async fn set_dirty_bit(&self) -> Result<()> {
        let bits = {
            let mut h = self.header();
            h.incompatible |= header::INCOMPAT_DIRTY;
            h.incompatible
        };
        self.write_incompatible(bits).await?;
        self.dirty_on_disk.store(true, Ordering::Release);
        Ok(())
    }

    pub(super) async fn clear_dirty_bit(&self) -> Result<()> {
        let bits = {
            let mut h = self.header();
            h.incompatible &= !header::INCOMPAT_DIRTY;
            h.incompatible
        };
        self.file.flush().await?;
        self.write_incompatible(bits).await?;
        self.dirty_on_disk.store(false, Ordering::Release);
        Ok(())
    }

    /// Grow the virtual size, the L1 table with it, and preallocate the new
    /// range if asked.
    pub(super) async fn grow(&self, cur: u64, size: u64, prealloc: Prealloc) -> Result<()> {
        let need = self.geo.l1_entries_for(size);
        if need * 8 > header::MAX_L1_BYTES {
            return Err(invalid(format!("image size {size} needs an L1 table larger than {} bytes", header::MAX_L1_BYTES)));
        }
        let have = self.cache.l1.load().len() as u64;
        if need > have {
            self.grow_l1(need as usize).await?;
        }
        {
            self.header().size = size;
        }
        self.size.store(size, Ordering::Release);
        self.write_header().await?;
        self.file.flush().await?;
        // The new area reads as zeroes: a longer backing file must not show
        // through (QEMU zeroes it too), nor what a shrink left in the last
        // partial cluster.
        let mut zero_end = cur.next_multiple_of(self.geo.cluster_size()).min(size);
        if let Some(b) = &self.backing {
            zero_end = zero_end.max(b.size().min(size));
        }
        if zero_end > cur {
            self.do_write_zeroes(cur, zero_end - cur, engine::block::ZeroFlags::default()).await?;
        }
        if prealloc != Prealloc::Off {
            self.preallocate(cur, size, prealloc).await?;
        }
        Ok(())
    }

    /// Move the L1 table to a bigger place: write it there, then point the
    /// header at it, then free the old one.
    async fn grow_l1(&self, n: usize) -> Result<()> {
        self.writeback(false).await?;
        let cs = self.geo.cluster_size();
        let bytes = (n as u64 * 8).next_multiple_of(cs);
        let clusters = bytes / cs;
        let off = self.alloc_contiguous(clusters).await?;
        let (old_off, old_len) = {
            let h = self.header();
            (h.l1_table_offset, u64::from(h.l1_size))
        };
        let new_l1 = {
            let _g = self.cache.guard.write().unwrap_or_else(|e| e.into_inner());
            let cur = self.cache.l1.load();
            let new = cur.resized(n);
            // Only the entries are written (as QEMU does): the rest of the
            // last cluster is never read.
            let data = new.snapshot(0..n);
            self.cache.l1.store(Arc::new(new));
            data
        };
        write_all(&*self.file, off, &new_l1).await?;
        // The refcounts of the new table, then the table, before the header.
        self.writeback(false).await?;
        self.file.flush().await?;
        {
            let mut h = self.header();
            h.l1_table_offset = off;
            h.l1_size = n as u32;
        }
        self.write_header().await?;
        self.file.flush().await?;
        if old_len > 0 {
            self.refs.free_later(old_off, (old_len * 8).next_multiple_of(cs), false);
        }
        Ok(())
    }

    /// `n` contiguous clusters, however many refcount blocks they span.
    pub(super) async fn alloc_contiguous(&self, n: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let batch = self.refs.max_batch();
        let mut from = 0u64;
        for _ in 0..1024 {
            let first = self.refs.alloc_from(&*self.file, from, n.min(batch)).await?;
            let mut got = n.min(batch);
            let mut ok = true;
            while got < n {
                let k = (n - got).min(batch);
                if !self.refs.alloc_exact(&*self.file, first + got * cs, k).await? {
                    ok = false;
                    break;
                }
                got += k;
            }
            if ok {
                return Ok(first);
            }
            self.refs.free_now(&*self.file, first, got * cs).await?;
            from = (first >> self.geo.cluster_bits) + got + 1;
        }
        Err(engine::error::Error::new(ErrorKind::NoSpace, format!("found no {n} contiguous free clusters")))
    }

    /// Shrink: drop the clusters past the new end, then the file's tail.
    pub(super) async fn shrink(&self, size: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let cur = self.size();
        // Free data clusters wholly past the new end.
        let first = size.next_multiple_of(cs);
        let mut pos = first;
        while pos < cur {
            let c0 = geo.cluster_start(pos);
            let span = geo.l2_span();
            let stop = cur.min((c0 / span + 1) * span);
            let l1i = geo.l1_index(layout::Guest(c0));
            let (l2off, _) = self.l2_table(l1i)?;
            if l2off != 0 {
                let mut c = c0;
                while c < stop {
                    let (e, _) = self.entry(c).await?.unwrap_or((0, 0));
                    if e != 0 {
                        let (old, _) = self.set_entry(l1i, l2off, c, |_, _| (0, 0)).await?;
                        self.release(old, true);
                    }
                    c += cs;
                }
            }
            pos = stop;
        }
        // Free L2 tables that map nothing any more.
        let need = geo.l1_entries_for(size) as usize;
        let l1len = self.cache.l1.load().len();
        for i in need..l1len {
            let (l2off, _) = self.l2_table(i)?;
            if l2off != 0 {
                self.drop_table(i, l2off, true);
            }
        }
        {
            self.header().size = size;
        }
        self.size.store(size, Ordering::Release);
        self.writeback(false).await?;
        self.write_header().await?;
        self.file.flush().await?;
        // Frees were applied by the writeback after the L2 tables; persist
        // them and cut the file after the last used cluster.
        self.writeback(false).await?;
        let end = self.refs.end_of_allocation(&*self.file).await?;
        if end < self.file.size() {
            self.file.truncate(end, false, Prealloc::Off).await.ok();
        }
        Ok(())
    }

    /// Every L1 entry that has an L2 table: (L1 index, table offset, the guest
    /// cluster offsets it maps up to the image's end).
    pub(super) fn mapped_tables(&self) -> Result<Vec<(usize, u64, std::ops::Range<u64>)>> {
        let geo = self.geo;
        let end = self.size().next_multiple_of(geo.cluster_size());
        let mut out = Vec::new();
        for i in 0..self.cache.l1.load().len() {
            let (l2off, _) = self.l2_table(i)?;
            if l2off != 0 {
                let start = i as u64 * geo.l2_span();
                out.push((i, l2off, start..(start + geo.l2_span()).min(end)));
            }
        }
        Ok(out)
    }

    /// Unmap every cluster and free every L2 table: the image reads through
    /// to its backing file (or as zeroes).
    pub(super) async fn empty_all(&self) -> Result<()> {
        engine::block::check_writable(self)?;
        self.check_not_corrupt()?;
        let cs = self.geo.cluster_size();
        for (i, l2off, clusters) in self.mapped_tables()? {
            for c in clusters.step_by(cs as usize) {
                let (e, bm) = self.entry(c).await?.unwrap_or((0, 0));
                if e != 0 || bm != 0 {
                    let (old, _) = self.set_entry(i, l2off, c, |_, _| (0, 0)).await?;
                    self.release(old, false);
                }
            }
            self.drop_table(i, l2off, false);
        }
        self.writeback(true).await
    }

    /// Unhook L2 table `l2off` from L1 entry `i` and free it once that is on disk.
    fn drop_table(&self, i: usize, l2off: u64, punch: bool) {
        {
            let _g = self.cache.guard.read().unwrap_or_else(|e| e.into_inner());
            self.cache.l1.load().entries[i].store(0, Ordering::Release);
            self.cache.mark_l1_dirty(i);
        }
        self.cache.forget_table(i);
        self.refs.free_later(l2off, self.geo.cluster_size(), punch);
    }

    /// Allocate every cluster of guest [from, to) (metadata), and with
    /// falloc/full the host space of the data too.
    pub(super) async fn preallocate(&self, from: u64, to: u64, mode: Prealloc) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut pos = geo.cluster_start(from);
        while pos < to {
            let l1i = geo.l1_index(layout::Guest(pos));
            let span = geo.l2_span();
            let l2off = self.ensure_l2(l1i).await?;
            let stop = to.min((pos / span + 1) * span);
            let mut c = pos;
            while c < stop {
                // Runs of unallocated clusters, allocated together.
                let (e, _) = self.entry(c).await?.unwrap_or((0, 0));
                if layout::std_host_cluster(e).is_some() || e & layout::OFLAG_COMPRESSED != 0 || (self.has_data_file() && e & OFLAG_COPIED != 0) {
                    c += cs;
                    continue;
                }
                let mut k = 1;
                while c + k * cs < stop && k < self.refs.max_batch() {
                    let (e2, _) = self.entry(c + k * cs).await?.unwrap_or((0, 0));
                    if e2 != 0 {
                        break;
                    }
                    k += 1;
                }
                let host = if self.has_data_file() { c } else { self.refs.alloc(&*self.file, k).await? };
                for i in 0..k {
                    let h = host + i * cs;
                    let bm = if geo.extended_l2 { u64::from(u32::MAX) } else { 0 };
                    self.set_entry(l1i, l2off, c + i * cs, |_, _| (h | OFLAG_COPIED, bm)).await?;
                }
                c += k * cs;
            }
            pos = stop;
        }
        self.writeback(false).await?;
        let data = self.data();
        let end = if self.has_data_file() { to } else { self.refs.end_of_allocation(&*self.file).await? };
        if end > data.size() {
            data.truncate(end, false, if mode == Prealloc::Metadata { Prealloc::Off } else { mode }).await?;
        }
        Ok(())
    }
}

async fn write_all(file: &dyn BlockNode, off: u64, data: &[u8]) -> Result<()> {
    let (r, _) = file.write(off, IoBuf::from_slice(data), WriteFlags::default()).await;
    r.map_err(|e| if e.offset().is_some() { e } else { e.at(off) })
}
