//! `measure -O qcow2`: the bytes a qcow2 image needs for a virtual size and
//! an amount of guest data, by qemu-img's formulas, so both tools print the
//! same numbers: header, L2 and L1 tables and refcount structures for a
//! fully allocated image, less the data a sparse source does not have.

use engine::block::Prealloc;
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;

/// Refcount table and blocks needed to count `clusters` clusters, themselves
/// included (the fixed point where adding them needs nothing more).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = cluster_size * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cluster_size;
        }
    }
}

/// Size of a fully allocated image of `size` virtual bytes.
pub fn prealloc_size(size: u64, cluster_size: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.next_multiple_of(cluster_size);
    let mut meta = cluster_size; // header
    let l2e = if extended_l2 { 16 } else { 8 };
    let nl2e = (aligned / cluster_size).next_multiple_of(cluster_size / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).next_multiple_of(cluster_size / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cluster_size, cluster_size, refcount_order);
    meta + aligned
}

/// (required, fully allocated) bytes for an image of `virtual_size` holding
/// `data` bytes of allocated guest data (whole clusters), under `opts`.
pub fn measure(opts: &mut OptionTree, virtual_size: u64, data: u64) -> Result<(u64, u64)> {
    if opts.keys().any(|k| k.starts_with("encrypt")) {
        return Err(Error::new(ErrorKind::Unsupported, "measuring encrypted qcow2 images is not supported yet"));
    }
    let cluster_size = opts.take_size("cluster_size")?.unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(invalid("Cluster size must be a power of two between 512 and 2048k"));
    }
    let refcount_bits = match opts.take("refcount_bits") {
        Some(v) => v.parse::<u64>().map_err(|_| invalid(format!("'{v}' is not a number")))?,
        None => 16,
    };
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(invalid("Refcount width must be a power of two and may not exceed 64 bits"));
    }
    let extended_l2 = opts.take_bool("extended_l2")?.unwrap_or(false);
    if extended_l2 && cluster_size < 16384 {
        return Err(invalid("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"));
    }
    let prealloc: Prealloc = opts.take_parsed("preallocation")?.unwrap_or_default();
    for k in ["compat", "lazy_refcounts", "compression_type", "data_file", "data_file_raw", "backing_file", "backing_fmt", "nocow", "extent_size_hint", "size"] {
        let _ = opts.take(k);
    }
    opts.ensure_consumed("Block format 'qcow2'")?;
    // Data is counted in whole clusters, so is the virtual size it replaces.
    let virtual_size = virtual_size.next_multiple_of(cluster_size);
    let full = prealloc_size(virtual_size, cluster_size, refcount_bits.trailing_zeros(), extended_l2);
    let data = if prealloc == Prealloc::Off { data.min(virtual_size) } else { virtual_size };
    Ok((full - virtual_size + data, full))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_qemu_img_for_an_empty_1g_image() {
        // qemu-img measure -O qcow2 --size 1G
        assert_eq!(prealloc_size(1 << 30, 65536, 4, false), 1_074_135_040);
        let (req, full) = measure(&mut OptionTree::new(), 1 << 30, 0).unwrap();
        assert_eq!((req, full), (393_216, 1_074_135_040));
    }
}
