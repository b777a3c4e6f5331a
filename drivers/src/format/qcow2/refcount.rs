//! Host cluster management: the refcount table, a cache of refcount blocks and
//! the cluster allocator. All of it sits behind one short mutex that is never
//! held across I/O: when a refcount block is needed, the lock is dropped, the
//! block is read, and the operation starts over.
//!
//! Frees are not applied at once. A freed cluster is queued, and the queue is
//! applied only after the L2 tables that stopped pointing at it are on disk
//! (`flush.rs`): so a crash can leak a cluster but never leave two owners.
//!
//! New refcount blocks are placed at the first cluster of the range they cover
//! (free by definition when the block does not exist yet). When the table is
//! full it is rebuilt past the end of its coverage, together with the new
//! blocks that cover it, and the header is pointed at it on the next flush.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use engine::block::BlockNode;
use engine::error::{Error, ErrorKind, Result};
use engine::runtime::IoBuf;

use super::layout::{get_refcount, set_refcount, Geometry, REFT_OFFSET_MASK};

/// Refcount table indexes are small integers: a multiply is hash enough
/// (SipHash showed up in allocation profiles).
#[derive(Default)]
pub struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, i: usize) {
        self.0 = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub type BlockMap = HashMap<usize, RefBlock, BuildHasherDefault<IndexHasher>>;

pub struct RefBlock {
    pub data: Box<[u8]>,
    pub mods: u64,
    pub written: u64,
    last_use: u64,
}

impl RefBlock {
    fn dirty(&self) -> bool {
        self.mods != self.written
    }
}

/// A change of the refcount table's place, to be written to the header.
#[derive(Clone, Copy, Debug)]
pub struct TableMove {
    pub offset: u64,
    pub clusters: u32,
    pub old_offset: u64,
    pub old_clusters: u32,
}

pub struct State {
    pub table: Vec<u64>,
    /// Where `table` lives (or will, once written).
    pub table_offset: u64,
    pub table_clusters: u32,
    pub table_mods: u64,
    pub table_written: u64,
    pub moved: Option<TableMove>,
    pub blocks: BlockMap,
    /// No free cluster below this index.
    pub free_hint: u64,
    /// Freed host byte ranges waiting for their L2 tables to reach the disk.
    pub pending_frees: Vec<(u64, u64, bool)>,
    /// Byte allocator for compressed clusters: next free byte in a partly
    /// used cluster (0: none).
    pub free_byte: u64,
    tick: u64,
    /// `tick` at the last `clean_unused`.
    clean_mark: u64,
    capacity: usize,
}

pub struct Refcounts {
    pub geo: Geometry,
    pub state: Mutex<State>,
}

/// Why an operation under the lock could not finish.
enum Need {
    Block(usize),
}

impl State {
    fn cluster_size(&self, geo: &Geometry) -> u64 {
        geo.cluster_size()
    }

    /// Refcount of cluster `c`, or Need if its block is not loaded.
    fn get(&mut self, geo: &Geometry, c: u64) -> std::result::Result<u64, Need> {
        let rti = (c >> geo.rb_bits) as usize;
        if rti >= self.table.len() || self.table[rti] & REFT_OFFSET_MASK == 0 {
            return Ok(0);
        }
        self.tick += 1;
        let tick = self.tick;
        match self.blocks.get_mut(&rti) {
            Some(b) => {
                b.last_use = tick;
                Ok(get_refcount(geo.refcount_order, &b.data, (c & (geo.refblock_entries() - 1)) as usize))
            }
            None => Err(Need::Block(rti)),
        }
    }

    /// Set the refcounts of clusters [c, c+n) to 1 (their blocks loaded).
    fn set_run(&mut self, geo: &Geometry, c: u64, n: u64) {
        let per = geo.refblock_entries();
        let mut x = c;
        while x < c + n {
            let rti = (x >> geo.rb_bits) as usize;
            let stop = (c + n).min(((rti as u64) + 1) << geo.rb_bits);
            let b = self.blocks.get_mut(&rti).expect("refcount block loaded before set");
            for y in x..stop {
                set_refcount(geo.refcount_order, &mut b.data, (y & (per - 1)) as usize, 1);
            }
            b.mods += 1;
            x = stop;
        }
    }

    /// Set the refcount of cluster `c`, whose block exists and is loaded.
    fn set(&mut self, geo: &Geometry, c: u64, v: u64) {
        let rti = (c >> geo.rb_bits) as usize;
        let b = self.blocks.get_mut(&rti).expect("refcount block loaded before set");
        set_refcount(geo.refcount_order, &mut b.data, (c & (geo.refblock_entries() - 1)) as usize, v);
        b.mods += 1;
    }

    /// Make sure cluster `c` has a refcount block, creating one (in memory,
    /// dirty) if the table has none for it. Ok(true) if something was created,
    /// which may have used clusters the caller had picked.
    fn ensure_block(&mut self, geo: &Geometry, c: u64) -> std::result::Result<bool, Need> {
        self.ensure_block_avoiding(geo, c, 0..0).map(|r| r.is_some_and(|placed| placed))
    }

    /// `ensure_block`, placing a new block outside `avoid` (the run being
    /// taken). Ok(None): the block cannot be placed outside it.
    fn ensure_block_avoiding(&mut self, geo: &Geometry, c: u64, avoid: std::ops::Range<u64>) -> std::result::Result<Option<bool>, Need> {
        let rti = (c >> geo.rb_bits) as usize;
        if rti >= self.table.len() {
            self.grow_table(geo, rti);
            return Ok(Some(true));
        }
        let off = self.table[rti] & REFT_OFFSET_MASK;
        if off != 0 {
            if !self.blocks.contains_key(&rti) {
                return Err(Need::Block(rti));
            }
            return Ok(Some(false));
        }
        // The whole range is free: the block goes in its own first cluster,
        // or right after the run being taken.
        let range_start = (rti as u64) << geo.rb_bits;
        let mut first = range_start;
        if avoid.contains(&first) {
            first = avoid.end;
            if first >= range_start + geo.refblock_entries() {
                return Ok(None);
            }
        }
        let cs = self.cluster_size(geo) as usize;
        let mut data = vec![0u8; cs].into_boxed_slice();
        set_refcount(geo.refcount_order, &mut data, (first - range_start) as usize, 1);
        self.blocks.insert(rti, RefBlock { data, mods: 1, written: 0, last_use: self.tick });
        self.table[rti] = first << geo.cluster_bits;
        self.table_mods += 1;
        Ok(Some(true))
    }

    /// Rebuild the table bigger, past the end of what the old one covers,
    /// with new blocks covering the new table and themselves.
    fn grow_table(&mut self, geo: &Geometry, need_rti: usize) {
        let cs = geo.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let old_len = self.table.len();
        let end = (old_len as u64) << geo.rb_bits; // first cluster not covered
        let want = (need_rti + 1).max(old_len + old_len / 2 + 1);
        let mut k = 1u64;
        let (t_clusters, new_len) = loop {
            let new_len = want.max(old_len + k as usize);
            let t = (new_len.div_ceil(per_cluster)) as u64;
            if k * geo.refblock_entries() >= k + t {
                break (t, (t as usize) * per_cluster);
            }
            k += 1;
        };
        let mut table = self.table.clone();
        table.resize(new_len, 0);
        for i in 0..k {
            let rti = old_len + i as usize;
            table[rti] = (end + i) << geo.cluster_bits;
            let data = vec![0u8; cs as usize].into_boxed_slice();
            self.blocks.insert(rti, RefBlock { data, mods: 1, written: 0, last_use: self.tick });
        }
        let old = self.moved.map(|m| (m.old_offset, m.old_clusters));
        let (cur_off, cur_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        for c in end..end + k + t_clusters {
            self.set(geo, c, 1);
        }
        let offset = (end + k) << geo.cluster_bits;
        // The table we replace is freed once the header points at the new one;
        // if it was itself never written (moved twice before a flush), it is
        // freed the same way.
        let (old_offset, old_clusters) = match old {
            Some((o, n)) => {
                self.pending_frees.push((cur_off, u64::from(cur_clusters) * cs, false));
                (o, n)
            }
            None => (cur_off, cur_clusters),
        };
        self.moved = Some(TableMove { offset, clusters: t_clusters as u32, old_offset, old_clusters });
        self.table_offset = offset;
        self.table_clusters = t_clusters as u32;
        self.table_mods += 1;
    }

    /// Find and take `n` contiguous free clusters at or after cluster `from`.
    fn try_alloc(&mut self, geo: &Geometry, from: u64, n: u64) -> std::result::Result<u64, Need> {
        'restart: loop {
            let mut start = self.free_hint.max(from);
            let mut c = start;
            // The first free cluster the scan meets: when the scan starts at
            // the hint, everything before it is in use, and the hint moves
            // there (else every allocation would rescan the used clusters
            // between the hint and the end of the image: quadratic).
            let mut first_free = None;
            // Scan a block at a time: one lookup per block, not per cluster.
            let per = geo.refblock_entries();
            'scan: while c < start + n {
                let rti = (c >> geo.rb_bits) as usize;
                let stop = (start + n).min(((rti as u64) + 1) << geo.rb_bits);
                if rti >= self.table.len() || self.table[rti] & REFT_OFFSET_MASK == 0 {
                    first_free.get_or_insert(c);
                    c = stop; // no block yet: all free
                    continue;
                }
                let Some(b) = self.blocks.get(&rti) else { return Err(Need::Block(rti)) };
                while c < stop {
                    if get_refcount(geo.refcount_order, &b.data, (c & (per - 1)) as usize) != 0 {
                        start = c + 1;
                        c = start;
                        continue 'scan;
                    }
                    first_free.get_or_insert(c);
                    c += 1;
                }
            }
            // One ensure per block the run touches.
            let mut c = start;
            while c < start + n {
                if self.ensure_block(geo, c)? {
                    continue 'restart;
                }
                c = ((c >> geo.rb_bits) + 1) << geo.rb_bits;
            }
            self.set_run(geo, start, n);
            if from <= self.free_hint {
                self.free_hint = match first_free {
                    Some(f) if f < start => f,
                    _ => start + n,
                };
            }
            return Ok(start << geo.cluster_bits);
        }
    }

    /// Take exactly clusters [c, c+n) if all are free. Ok(false) if not.
    fn try_alloc_exact(&mut self, geo: &Geometry, c: u64, n: u64) -> std::result::Result<bool, Need> {
        for x in c..c + n {
            if self.get(geo, x)? != 0 {
                return Ok(false);
            }
        }
        for x in c..c + n {
            if self.ensure_block_avoiding(geo, x, c..c + n)?.is_none() {
                return Ok(false);
            }
        }
        for x in c..c + n {
            if self.get(geo, x)? != 0 {
                return Ok(false);
            }
        }
        for x in c..c + n {
            self.set(geo, x, 1);
        }
        Ok(true)
    }

    fn change(&mut self, geo: &Geometry, c: u64, delta: i64) -> std::result::Result<std::result::Result<u64, String>, Need> {
        let cur = self.get(geo, c)?;
        let new = cur as i128 + delta as i128;
        if new < 0 || new as u128 > geo.refcount_max() as u128 {
            return Ok(Err(format!("refcount of cluster {c} would go from {cur} to {new}")));
        }
        if delta > 0 {
            self.ensure_block(geo, c)?;
        }
        self.set(geo, c, new as u64);
        if new == 0 {
            if c < self.free_hint {
                self.free_hint = c;
            }
            // Never pack more compressed data into a cluster that was freed.
            if self.free_byte >> geo.cluster_bits == c {
                self.free_byte = 0;
            }
        }
        Ok(Ok(new as u64))
    }

    /// `cache-clean-interval`: drop clean blocks unused since the last call.
    pub fn clean_unused(&mut self) {
        let mark = self.clean_mark;
        self.blocks.retain(|_, b| b.dirty() || b.last_use > mark);
        self.clean_mark = self.tick;
    }

    /// Evict clean blocks beyond capacity, least recently used first.
    fn trim(&mut self) {
        if self.blocks.len() <= self.capacity {
            return;
        }
        let mut clean: Vec<(u64, usize)> = self.blocks.iter().filter(|(_, b)| !b.dirty()).map(|(&k, b)| (b.last_use, k)).collect();
        clean.sort_unstable();
        let excess = self.blocks.len() - self.capacity;
        for (_, k) in clean.into_iter().take(excess) {
            self.blocks.remove(&k);
        }
    }
}

impl Refcounts {
    pub fn new(geo: Geometry, table: Vec<u64>, table_offset: u64, table_clusters: u32, capacity: usize) -> Refcounts {
        Refcounts {
            geo,
            state: Mutex::new(State {
                table,
                table_offset,
                table_clusters,
                table_mods: 0,
                table_written: 0,
                moved: None,
                blocks: BlockMap::default(),
                free_hint: 0,
                pending_frees: Vec::new(),
                free_byte: 0,
                tick: 0,
                // An allocation touches at most two blocks (batches are capped
                // at one block's worth), a table growth a few more.
                clean_mark: 0,
                capacity: capacity.max(16),
            }),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn load(&self, file: &dyn BlockNode, rti: usize) -> Result<()> {
        let off = {
            let st = self.lock();
            if st.blocks.contains_key(&rti) {
                return Ok(());
            }
            st.table[rti] & REFT_OFFSET_MASK
        };
        let cs = self.geo.cluster_size();
        if off % cs != 0 {
            return Err(Error::new(ErrorKind::Corrupt, format!("refcount block {rti} at offset {off:#x} is not cluster aligned")));
        }
        let (r, buf) = file.read(off, IoBuf::new(cs as usize)).await;
        r?;
        let mut st = self.lock();
        let tick = st.tick;
        st.blocks.entry(rti).or_insert_with(|| RefBlock { data: buf.to_vec().into_boxed_slice(), mods: 0, written: 0, last_use: tick });
        st.trim();
        Ok(())
    }

    /// Run `f` under the lock, loading whatever block it needs first.
    async fn with<T>(&self, file: &dyn BlockNode, mut f: impl FnMut(&mut State) -> std::result::Result<T, Need>) -> Result<T> {
        loop {
            let need = {
                let mut st = self.lock();
                match f(&mut st) {
                    Ok(v) => return Ok(v),
                    Err(Need::Block(rti)) => rti,
                }
            };
            self.load(file, need).await?;
        }
    }

    /// Largest `n` for `alloc`: half a refcount block's range, so a run
    /// always fits beside a block placed at the start of its range.
    pub fn max_batch(&self) -> u64 {
        self.geo.refblock_entries() / 2
    }

    /// Allocate `n` (at most `max_batch`) contiguous clusters; returns the host
    /// offset of the first.
    pub async fn alloc(&self, file: &dyn BlockNode, n: u64) -> Result<u64> {
        let geo = self.geo;
        debug_assert!(n >= 1 && n <= self.max_batch());
        let off = self.with(file, |st| st.try_alloc(&geo, 0, n)).await?;
        if off.checked_add(n << geo.cluster_bits).is_none_or(|end| end > (1u64 << 56)) {
            return Err(Error::new(ErrorKind::NoSpace, "qcow2 image would grow past 64 PiB"));
        }
        Ok(off)
    }

    /// Like `alloc`, searching from cluster index `from`.
    pub async fn alloc_from(&self, file: &dyn BlockNode, from: u64, n: u64) -> Result<u64> {
        let geo = self.geo;
        self.with(file, |st| st.try_alloc(&geo, from, n)).await
    }

    /// Take clusters [off, off + n clusters) if they are all free.
    pub async fn alloc_exact(&self, file: &dyn BlockNode, off: u64, n: u64) -> Result<bool> {
        let geo = self.geo;
        self.with(file, |st| st.try_alloc_exact(&geo, off >> geo.cluster_bits, n)).await
    }

    /// Dirty refcount blocks have piled up past the cache's size.
    pub fn too_many_dirty(&self) -> bool {
        let st = self.lock();
        st.blocks.len() > st.capacity * 2 || st.pending_frees.len() > 4096
    }

    /// Allocate `len` bytes (< one cluster) for compressed data, packing them
    /// after the previous compressed cluster where they fit.
    pub async fn alloc_bytes(&self, file: &dyn BlockNode, len: u64) -> Result<u64> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        // Try the partly used cluster: it already has a reference per
        // compressed cluster in it.
        let placed = self
            .with(file, |st| {
                let fb = st.free_byte;
                if fb == 0 || fb % cs == 0 {
                    return Ok(None);
                }
                let c = fb >> geo.cluster_bits;
                let end = fb + len;
                let last = (end - 1) >> geo.cluster_bits;
                if last == c {
                    let v = st.get(&geo, c)?;
                    st.set(&geo, c, v + 1);
                    st.free_byte = end;
                    return Ok(Some(fb));
                }
                // Spills into the next cluster: only if that one is free.
                if last == c + 1 && st.get(&geo, c + 1)? == 0 {
                    if st.ensure_block(&geo, c + 1)? {
                        return Ok(None);
                    }
                    let v = st.get(&geo, c)?;
                    st.set(&geo, c, v + 1);
                    st.set(&geo, c + 1, 1);
                    st.free_byte = end;
                    return Ok(Some(fb));
                }
                Ok(None)
            })
            .await?;
        if let Some(off) = placed {
            return Ok(off);
        }
        let off = self.alloc(file, 1).await?;
        // A racing compressed write may have opened a cluster too; packing
        // continues in whichever was opened last.
        self.lock().free_byte = off + len;
        Ok(off)
    }

    /// Queue a free of the clusters covering [offset, offset+len); `punch`
    /// discards them from the file once free.
    pub fn free_later(&self, offset: u64, len: u64, punch: bool) {
        if len > 0 {
            self.lock().pending_frees.push((offset, len, punch));
        }
    }

    /// Drop a reference now (for clusters nothing on disk points to yet).
    pub async fn free_now(&self, file: &dyn BlockNode, offset: u64, len: u64) -> Result<Vec<u64>> {
        self.adjust(file, offset, len, -1).await
    }

    /// Change the refcount of every cluster of a byte range; returns the
    /// clusters that became free.
    pub async fn adjust(&self, file: &dyn BlockNode, offset: u64, len: u64, delta: i64) -> Result<Vec<u64>> {
        let geo = self.geo;
        let first = offset >> geo.cluster_bits;
        let last = (offset + len.max(1) - 1) >> geo.cluster_bits;
        let mut freed = Vec::new();
        for c in first..=last {
            let r = self.with(file, |st| st.change(&geo, c, delta)).await?;
            match r {
                Ok(0) => freed.push(c << geo.cluster_bits),
                Ok(_) => {}
                Err(msg) => return Err(Error::new(ErrorKind::Corrupt, msg).at(c << geo.cluster_bits)),
            }
        }
        Ok(freed)
    }

    /// Refcount of the cluster at host offset `off`.
    pub async fn refcount(&self, file: &dyn BlockNode, off: u64) -> Result<u64> {
        let geo = self.geo;
        self.with(file, |st| st.get(&geo, off >> geo.cluster_bits)).await
    }

    /// Bytes the highest allocated cluster reaches (needs every block loaded;
    /// used by shrink and check).
    pub async fn end_of_allocation(&self, file: &dyn BlockNode) -> Result<u64> {
        let geo = self.geo;
        let n = self.lock().table.len();
        let mut end = 0;
        for rti in 0..n {
            let present = self.lock().table[rti] & REFT_OFFSET_MASK != 0;
            if !present {
                continue;
            }
            self.load(file, rti).await?;
            let st = self.lock();
            if let Some(b) = st.blocks.get(&rti) {
                for i in (0..geo.refblock_entries() as usize).rev() {
                    if get_refcount(geo.refcount_order, &b.data, i) != 0 {
                        end = end.max(((rti as u64) << geo.rb_bits) + i as u64 + 1);
                        break;
                    }
                }
            }
        }
        Ok(end << geo.cluster_bits)
    }
}
