//! `check` for qcow2: count every reference the image's metadata makes to
//! each host cluster (header, L1 and L2 tables, data and compressed
//! clusters, snapshots, refcount structures, extension areas), compare with
//! the stored refcounts and the COPIED flags, and repair what it is asked to:
//! leaks, wrong refcounts, flags, and, when refcount blocks themselves are
//! missing or broken, a new refcount structure written past the end of the
//! file. Messages follow qemu-img's wording; the report is QAPI ImageCheck.
//!
//! Reads come straight from the file (after a writeback), not through the
//! caches, so a check sees what a crash would leave.

use engine::block::{BlockNode, WriteFlags};
use engine::error::{Error, ErrorKind, Result};
use engine::runtime::IoBuf;

use super::header;
use super::layout::{self, get_refcount, set_refcount, OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK};
use super::Qcow2;

pub use engine::block::{CheckFix as Fix, CheckReport};

/// Counts gathered while walking; turned into a CheckReport at the end.
#[derive(Default)]
pub struct Report {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub messages: Vec<String>,
}

impl Report {
    pub fn corruptions_left(&self) -> u64 {
        self.corruptions
    }

    pub fn into_check_report(self) -> CheckReport {
        CheckReport {
            corruptions: self.corruptions,
            leaks: self.leaks,
            check_errors: self.check_errors,
            corruptions_fixed: self.corruptions_fixed,
            leaks_fixed: self.leaks_fixed,
            image_end_offset: Some(self.image_end_offset),
            total_clusters: Some(self.total_clusters),
            allocated_clusters: Some(self.allocated_clusters),
            fragmented_clusters: Some(self.fragmented_clusters),
            compressed_clusters: Some(self.compressed_clusters),
            messages: self.messages,
        }
    }
}

struct Counter {
    cluster_bits: u32,
    nb: u64,
    file_len: u64,
    refs: Vec<u32>,
}

impl Counter {
    fn new(cluster_bits: u32, file_len: u64) -> Counter {
        let nb = file_len.div_ceil(1 << cluster_bits);
        Counter { cluster_bits, nb, file_len, refs: vec![0; nb as usize] }
    }

    /// Count a reference to each cluster of [off, off+len). A region that
    /// ends less than a cluster past the end of the file (a misaligned
    /// cluster in the last one) is counted, growing the count; one further
    /// out is an error, as in qemu-img.
    fn inc(&mut self, r: &mut Report, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = 1u64 << self.cluster_bits;
        let first = off >> self.cluster_bits;
        let end = off.saturating_add(len);
        let last = (end - 1) >> self.cluster_bits;
        if last >= self.nb {
            if end >= self.file_len.saturating_add(cs) {
                r.messages.push(format!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {:#x} size {:#x}",
                    off, len
                ));
                r.corruptions += 1;
            } else {
                self.nb = last + 1;
                self.refs.resize(self.nb as usize, 0);
            }
        }
        for c in first..=last.min(self.nb.saturating_sub(1)) {
            let v = &mut self.refs[c as usize];
            *v = v.saturating_add(1);
        }
    }
}

async fn read_u64s(file: &dyn BlockNode, off: u64, n: usize) -> Result<Vec<u64>> {
    let (r, b) = file.read(off, IoBuf::new(n * 8)).await;
    r?;
    Ok(b.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes"))).collect())
}

/// A snapshot table entry's L1 table (offset, entries).
async fn snapshot_l1s(q: &Qcow2, r: &mut Report, counter: &mut Counter) -> Result<Vec<(u64, u32)>> {
    let (n, off) = {
        let h = q.header();
        (h.nb_snapshots, h.snapshots_offset)
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    let file = &*q.file;
    let mut out = Vec::new();
    let mut pos = off;
    for _ in 0..n.min(65536) {
        let (res, b) = file.read(pos, IoBuf::new(40)).await;
        res?;
        let l1_off = u64::from_be_bytes(b[0..8].try_into().expect("8"));
        let l1_size = u32::from_be_bytes(b[8..12].try_into().expect("4"));
        let id_len = u64::from(u16::from_be_bytes([b[12], b[13]]));
        let name_len = u64::from(u16::from_be_bytes([b[14], b[15]]));
        let extra = u64::from(u32::from_be_bytes(b[36..40].try_into().expect("4")));
        out.push((l1_off, l1_size));
        pos += (40 + extra + id_len + name_len).next_multiple_of(8);
    }
    counter.inc(r, off, pos - off);
    Ok(out)
}

/// Largest bitmap directory and bitmap table we read (QEMU's own limits are
/// 64 MiB for the directory and 2^27 entries, 1 GiB, per table).
const MAX_BITMAP_DIR: u64 = 64 << 20;
const MAX_BITMAP_TABLE: u64 = 1 << 27;

/// Count the persistent bitmaps' tables and the data clusters they point to
/// (the directory itself is counted by the caller). A table entry holds a
/// cluster offset in bits 9-55; 0 means all zeroes, or all ones with bit 0.
async fn bitmap_tables(q: &Qcow2, r: &mut Report, counter: &mut Counter, dir_off: u64, dir_size: u64, n: u32) -> Result<()> {
    if dir_size > MAX_BITMAP_DIR {
        r.messages.push(format!("ERROR bitmap directory at {dir_off:#x} is too large ({dir_size} bytes)"));
        r.corruptions += 1;
        return Ok(());
    }
    let (res, dir) = q.file.read(dir_off, IoBuf::new(dir_size as usize)).await;
    res?;
    let cs = 1u64 << counter.cluster_bits;
    let mut pos = 0usize;
    // Bound the work a hostile directory can ask for: QEMU's limit on the
    // number of bitmaps, each table read once, and no more entries in all
    // than the file could hold.
    let mut seen = std::collections::HashSet::new();
    let mut budget = q.file.size() / 8 + 1;
    let mut reported = 0u32;
    for i in 0..n.min(65535) {
        let Some(e) = dir.get(pos..pos + 24) else {
            r.messages.push(format!("ERROR bitmap directory entry {i} lies beyond the directory ({dir_size} bytes)"));
            r.corruptions += 1;
            break;
        };
        let table_off = u64::from_be_bytes(e[0..8].try_into().expect("8"));
        let table_size = u64::from(u32::from_be_bytes(e[8..12].try_into().expect("4")));
        let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra = u32::from_be_bytes(e[20..24].try_into().expect("4")) as usize;
        pos = (pos + 24 + extra + name_size).next_multiple_of(8);
        if table_off % cs != 0 || table_size > MAX_BITMAP_TABLE {
            r.messages.push(format!(
                "ERROR bitmap {i}: table at {table_off:#x} of {table_size} entries is misaligned or too large"
            ));
            r.corruptions += 1;
            continue;
        }
        counter.inc(r, table_off, table_size * 8);
        if table_size == 0 || table_off.saturating_add(table_size * 8) > q.file.size() || !seen.insert(table_off) {
            continue; // out of bounds (counted above as such) or read already
        }
        if table_size > budget {
            r.messages.push(format!("ERROR bitmap {i}: tables hold more entries than the file could"));
            r.corruptions += 1;
            break;
        }
        budget -= table_size;
        for entry in read_u64s(&*q.file, table_off, table_size as usize).await? {
            let data = entry & 0x00ff_ffff_ffff_fe00;
            if data == 0 {
                continue;
            }
            if data % cs != 0 {
                reported += 1;
                if reported <= 100 {
                    r.messages.push(format!("ERROR bitmap {i}: data cluster offset {data:#x} is not cluster aligned"));
                }
                r.corruptions += 1;
                continue;
            }
            counter.inc(r, data, cs);
        }
    }
    Ok(())
}

/// Count the references of one L1 table and its L2 tables. `active` also
/// checks COPIED flags against the stored refcounts and gathers statistics.
#[allow(clippy::too_many_arguments)]
async fn walk_l1(
    q: &Qcow2,
    r: &mut Report,
    counter: &mut Counter,
    l1_off: u64,
    l1_size: u32,
    active: bool,
    copied_fixes: &mut Vec<CopiedFix>,
    _stored: &StoredRefs,
) -> Result<()> {
    let geo = q.geo;
    let cs = geo.cluster_size();
    let file = &*q.file;
    let df = q.has_data_file();
    if u64::from(l1_size) * 8 > header::MAX_L1_BYTES || !l1_off.is_multiple_of(cs) {
        r.messages.push(format!("ERROR L1 table at {l1_off:#x} with {l1_size} entries is invalid"));
        r.corruptions += 1;
        return Ok(());
    }
    counter.inc(r, l1_off, u64::from(l1_size) * 8);
    let l1 = read_u64s(file, l1_off, l1_size as usize).await?;
    let mut next_contiguous = 0u64;
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & layout::L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) {
            r.messages.push(format!("ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"));
            r.corruptions += 1;
            continue;
        }
        if active {
            copied_fixes.push(CopiedFix::L1 { index: i, entry: e, host: l2 });
        }
        counter.inc(r, l2, cs);
        if l2 >> geo.cluster_bits >= counter.nb {
            continue;
        }
        let words = if geo.extended_l2 { 2 } else { 1 };
        let table = read_u64s(file, l2, (cs / 8) as usize).await?;
        for j in 0..geo.l2_entries() as usize {
            let e2 = table[j * words];
            let bm = if geo.extended_l2 { table[j * words + 1] } else { 0 };
            if e2 & OFLAG_COMPRESSED != 0 {
                if df {
                    r.messages.push(format!("ERROR compressed cluster {j} with data file: entry=0x{e2:x}"));
                    r.corruptions += 1;
                    continue;
                }
                if active {
                    r.allocated_clusters += 1;
                    r.compressed_clusters += 1;
                }
                let cr = layout::compressed_clusters(&geo, e2);
                counter.inc(r, cr.start * cs, (cr.end - cr.start) * cs);
                continue;
            }
            let host = e2 & layout::L2E_OFFSET_MASK;
            let allocated = host != 0 || (df && e2 & OFLAG_COPIED != 0);
            if geo.extended_l2 && (bm as u32) & ((bm >> 32) as u32) != 0 {
                r.messages.push(format!("ERROR invalid subcluster allocation bitmap in L2 table {l2:#x} entry {j}: {bm:#018x}"));
                r.corruptions += 1;
            }
            if !allocated {
                continue;
            }
            if !host.is_multiple_of(cs) {
                // Reported, then counted like any cluster (as qemu-img does):
                // its references land on the clusters the range straddles.
                r.messages.push(format!("ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."));
                r.corruptions += 1;
            }
            if active {
                r.allocated_clusters += 1;
                if next_contiguous != 0 && host != next_contiguous {
                    r.fragmented_clusters += 1;
                }
                next_contiguous = host + cs;
            }
            if df {
                continue;
            }
            if active {
                copied_fixes.push(CopiedFix::L2 { table: l2, word: j * words, entry: e2, host });
            }
            counter.inc(r, host, cs);
        }
    }
    Ok(())
}

/// An entry whose COPIED flag must agree with its cluster's refcount.
enum CopiedFix {
    L1 { index: usize, entry: u64, host: u64 },
    L2 { table: u64, word: usize, entry: u64, host: u64 },
}

/// The refcounts as stored on disk.
struct StoredRefs {
    order: u32,
    rb_bits: u32,
    blocks: Vec<Option<Vec<u8>>>,
}

impl StoredRefs {
    fn get(&self, c: u64) -> u64 {
        let rti = (c >> self.rb_bits) as usize;
        match self.blocks.get(rti) {
            Some(Some(b)) => get_refcount(self.order, b, (c & ((1 << self.rb_bits) - 1)) as usize),
            _ => 0,
        }
    }
}

/// Check `q` and repair what `fix` allows. The node must have been opened
/// writable for repairs.
pub async fn check(q: &Qcow2, fix: Fix) -> Result<Report> {
    check_with(q, fix, None).await
}

/// Rewrite the refcount structure with `order` (amend refcount_bits): the
/// references are counted as check counts them, then written anew.
pub async fn change_refcount_order(q: &Qcow2, order: u32) -> Result<()> {
    let r = check_with(q, Fix::default(), Some(order)).await?;
    if r.corruptions > 0 {
        return Err(Error::new(ErrorKind::Corrupt, "the image has errors; repair it with 'check -r all' before changing refcount_bits"));
    }
    Ok(())
}

async fn check_with(q: &Qcow2, fix: Fix, new_order: Option<u32>) -> Result<Report> {
    let mut r = Report::default();
    let repairing = fix.leaks || fix.errors;
    if repairing && q.read_only {
        return Err(Error::new(ErrorKind::ReadOnly, "cannot repair an image opened read-only"));
    }
    if !q.read_only {
        // Everything, queued frees included, so the disk is what we check.
        q.writeback(true).await?;
    }
    let geo = q.geo;
    let cs = geo.cluster_size();
    let file = &*q.file;
    let fsize = file.size();
    let nb = fsize.div_ceil(cs);
    r.total_clusters = q.size().div_ceil(cs);
    let (l1_off, l1_size, rt_off, rt_clusters) = {
        let h = q.header();
        (h.l1_table_offset, h.l1_size, h.refcount_table_offset, h.refcount_table_clusters)
    };

    // The stored refcounts, and whether their structure is sound.
    let rt = read_u64s(file, rt_off, (u64::from(rt_clusters) * cs / 8) as usize).await?;
    let mut stored = StoredRefs { order: geo.refcount_order, rb_bits: geo.rb_bits, blocks: Vec::with_capacity(rt.len()) };
    let mut counter = Counter::new(geo.cluster_bits, fsize);
    let mut structure_broken = false;
    // Header and refcount table.
    counter.inc(&mut r, 0, cs);
    counter.inc(&mut r, rt_off, u64::from(rt_clusters) * cs);
    for (i, &e) in rt.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            stored.blocks.push(None);
            continue;
        }
        if !off.is_multiple_of(cs) || e & 0x1ff != 0 {
            r.messages.push(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
            r.corruptions += 1;
            structure_broken = true;
            stored.blocks.push(None);
            continue;
        }
        if off >> geo.cluster_bits >= nb {
            r.messages.push(format!("ERROR refcount block {i} is outside image"));
            r.corruptions += 1;
            structure_broken = true;
            stored.blocks.push(None);
            continue;
        }
        let (res, b) = file.read(off, IoBuf::new(cs as usize)).await;
        res?;
        stored.blocks.push(Some(b.to_vec()));
        counter.inc(&mut r, off, cs);
    }

    let mut copied_fixes = Vec::new();
    walk_l1(q, &mut r, &mut counter, l1_off, l1_size, true, &mut copied_fixes, &stored).await?;
    for (off, size) in snapshot_l1s(q, &mut r, &mut counter).await? {
        walk_l1(q, &mut r, &mut counter, off, size, false, &mut Vec::new(), &stored).await?;
    }
    // Extension areas: bitmap directory, crypto header.
    let exts: Vec<header::Extension> = q.header().other_extensions.clone();
    for e in exts {
        if e.ty == header::EXT_CRYPTO && e.data.len() >= 16 {
            let off = u64::from_be_bytes(e.data[0..8].try_into().expect("8"));
            let len = u64::from_be_bytes(e.data[8..16].try_into().expect("8"));
            counter.inc(&mut r, off, len);
        }
        if e.ty == header::EXT_BITMAPS && e.data.len() >= 24 {
            let size = u64::from_be_bytes(e.data[8..16].try_into().expect("8"));
            let off = u64::from_be_bytes(e.data[16..24].try_into().expect("8"));
            counter.inc(&mut r, off, size.min(MAX_BITMAP_DIR));
            let nb_bitmaps = u32::from_be_bytes(e.data[0..4].try_into().expect("4"));
            bitmap_tables(q, &mut r, &mut counter, off, size, nb_bitmaps).await?;
        }
    }

    // Compare.
    let mut set: Vec<(u64, u64)> = Vec::new();
    let mut highest = 0u64;
    for c in 0..counter.nb {
        let stored_rc = stored.get(c);
        let computed = u64::from(counter.refs[c as usize]);
        if computed > 0 || stored_rc > 0 {
            highest = c;
        }
        if stored_rc == computed {
            continue;
        }
        let leak = stored_rc > computed;
        let will_fix = (leak && fix.leaks) || (!leak && fix.errors);
        r.messages.push(format!(
            "{} cluster {c} refcount={stored_rc} reference={computed}",
            if will_fix { "Repairing" } else if leak { "Leaked" } else { "ERROR" }
        ));
        if will_fix {
            set.push((c, computed));
            if leak {
                r.leaks_fixed += 1;
            } else {
                r.corruptions_fixed += 1;
            }
        } else if leak {
            r.leaks += 1;
        } else {
            r.corruptions += 1;
        }
        // A referenced cluster without a refcount block needs a new structure.
        if computed > 0 && stored.blocks.get((c >> geo.rb_bits) as usize).is_none_or(|b| b.is_none()) {
            structure_broken = true;
        }
    }
    r.image_end_offset = (highest + 1) * cs;

    // COPIED flags, against the refcounts as they are after the repairs above.
    let fixed: std::collections::HashMap<u64, u64> = set.iter().copied().collect();
    let final_rc = |c: u64| fixed.get(&c).copied().unwrap_or_else(|| stored.get(c));
    let mut flag_fixes = Vec::new();
    for f in &copied_fixes {
        let (entry, host, what) = match *f {
            CopiedFix::L1 { index, entry, host } => (entry, host, format!("L2 cluster: l1_index={index} l1_entry={entry:x}")),
            CopiedFix::L2 { entry, host, .. } => (entry, host, format!("data cluster: l2_entry={entry:x}")),
        };
        let rc = final_rc(host >> geo.cluster_bits);
        if (rc == 1) == (entry & OFLAG_COPIED != 0) {
            continue;
        }
        let v = if rc == 1 { entry | OFLAG_COPIED } else { entry & !OFLAG_COPIED };
        if fix.errors {
            r.messages.push(format!("Repairing OFLAG_COPIED {what} refcount={rc}"));
            r.corruptions_fixed += 1;
            flag_fixes.push((f, v));
        } else {
            r.messages.push(format!("ERROR OFLAG_COPIED {what} refcount={rc}"));
            r.corruptions += 1;
        }
    }

    if let Some(order) = new_order {
        if r.corruptions == 0 {
            rebuild(q, &mut r, &counter, order).await?;
            q.reload_refcounts().await?;
        }
        return Ok(r);
    }
    if !repairing {
        return Ok(r);
    }
    let any_l2 = flag_fixes.iter().any(|(f, _)| matches!(f, CopiedFix::L2 { .. }));
    for (f, v) in flag_fixes {
        apply_copied_fix(q, f, v).await?;
    }
    if any_l2 {
        // Cached slices may hold the old words.
        q.cache.forget_all();
    }
    if structure_broken && fix.errors {
        rebuild(q, &mut r, &counter, geo.refcount_order).await?;
    } else if !set.is_empty() {
        write_refcounts(q, &stored, &set).await?;
    }
    q.reload_refcounts().await?;
    Ok(r)
}

async fn apply_copied_fix(q: &Qcow2, f: &CopiedFix, v: u64) -> Result<()> {
    let off = match *f {
        CopiedFix::L1 { index, .. } => {
            let l1 = q.cache.l1.load();
            if index < l1.len() {
                l1.entries[index].store(v, std::sync::atomic::Ordering::Release);
            }
            q.header().l1_table_offset + index as u64 * 8
        }
        CopiedFix::L2 { table, word, .. } => table + word as u64 * 8,
    };
    let (r, _) = q.file.write(off, IoBuf::from_slice(&v.to_be_bytes()), WriteFlags::default()).await;
    r?;
    Ok(())
}

/// Set individual refcounts in the existing blocks.
async fn write_refcounts(q: &Qcow2, stored: &StoredRefs, set: &[(u64, u64)]) -> Result<()> {
    let geo = q.geo;
    let rt = q.refs.lock().table.clone();
    let mut touched: std::collections::BTreeMap<usize, Vec<u8>> = Default::default();
    for &(c, v) in set {
        let rti = (c >> geo.rb_bits) as usize;
        let Some(Some(b)) = stored.blocks.get(rti) else { continue };
        let blk = touched.entry(rti).or_insert_with(|| b.clone());
        set_refcount(geo.refcount_order, blk, (c & (geo.refblock_entries() - 1)) as usize, v.min(geo.refcount_max()));
    }
    for (rti, data) in touched {
        let off = rt[rti] & REFT_OFFSET_MASK;
        let (r, _) = q.file.write(off, IoBuf::from_slice(&data), WriteFlags::default()).await;
        r?;
    }
    q.file.flush().await
}

/// Write a whole new refcount structure past the end of the file, from the
/// computed references, and point the header at it.
async fn rebuild(q: &Qcow2, r: &mut Report, counter: &Counter, order: u32) -> Result<()> {
    r.messages.push("Rebuilding refcount structure".into());
    let geo = layout::Geometry::new(q.geo.cluster_bits, q.geo.extended_l2, order, q.header().version);
    let cs = geo.cluster_size();
    let per_block = geo.refblock_entries();
    // Computed references, without the old refcount structure (it is dropped).
    let mut refs: Vec<u64> = counter.refs.iter().map(|&v| u64::from(v)).collect();
    {
        let h = q.header();
        let first = h.refcount_table_offset / cs;
        for c in first..first + u64::from(h.refcount_table_clusters) {
            if let Some(v) = refs.get_mut(c as usize) {
                *v = v.saturating_sub(1);
            }
        }
    }
    for e in q.refs.lock().table.iter() {
        let off = e & REFT_OFFSET_MASK;
        if off != 0 && off.is_multiple_of(cs) {
            if let Some(v) = refs.get_mut((off / cs) as usize) {
                *v = v.saturating_sub(1);
            }
        }
    }
    if let Some(c) = refs.iter().position(|&v| v > geo.refcount_max()) {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("cluster {c} has {} references, more than {}-bit refcounts can hold", refs[c], 1u32 << order),
        ));
    }
    let start = refs.len() as u64; // new structure goes here
    let (blocks, table_clusters) = {
        let mut t = 1u64;
        loop {
            let total = start + t;
            let nblocks = total.div_ceil(per_block);
            let total = start + nblocks + t;
            let nblocks = total.div_ceil(per_block);
            let need_t = (nblocks * 8).div_ceil(cs);
            if need_t <= t {
                break (nblocks, t);
            }
            t = need_t;
        }
    };
    let table_off = start * cs;
    let blocks_off = table_off + table_clusters * cs;
    refs.resize((start + table_clusters + blocks) as usize, 1);
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for b in 0..blocks {
        let mut data = vec![0u8; cs as usize];
        let base = b * per_block;
        for i in 0..per_block {
            let c = base + i;
            if let Some(&v) = refs.get(c as usize) {
                set_refcount(geo.refcount_order, &mut data, i as usize, v.min(geo.refcount_max()));
            }
        }
        let off = blocks_off + b * cs;
        let (res, _) = q.file.write(off, IoBuf::from_slice(&data), WriteFlags::default()).await;
        res?;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let (res, _) = q.file.write(table_off, IoBuf::from_slice(&table), WriteFlags::default()).await;
    res?;
    q.file.flush().await?;
    {
        let mut h = q.header();
        h.refcount_table_offset = table_off;
        h.refcount_table_clusters = table_clusters as u32;
        h.refcount_order = order;
        h.incompatible &= !header::INCOMPAT_CORRUPT;
    }
    q.write_header().await?;
    q.file.flush().await?;
    r.image_end_offset = blocks_off + blocks * cs;
    Ok(())
}
