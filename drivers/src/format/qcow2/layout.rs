//! qcow2 geometry and table entry encoding: how a guest offset splits into L1
//! index, L2 index and offset in cluster; what an L1 or L2 entry (standard or
//! extended, with its subcluster bitmap) says about a guest range; compressed
//! cluster descriptors; refcount entries of any width. Pure functions, no I/O.
//!
//! L2 entry bits (big endian u64 on disk):
//!
//! | bits   | standard cluster                     | compressed cluster              |
//! |--------|--------------------------------------|---------------------------------|
//! | 0      | reads as zero (v3, not extended L2)  | \ host byte offset (x bits)     |
//! | 1-8    | reserved                             |  > then additional 512-byte     |
//! | 9-55   | host cluster offset                  | / sectors (cluster_bits-8 bits) |
//! | 56-61  | reserved                             |                                 |
//! | 62     | 0                                    | 1 (compressed)                  |
//! | 63     | COPIED: refcount is exactly one      | 0                               |
//!
//! Extended L2 adds a second u64: bits 0-31 allocated, 32-63 reads-as-zero,
//! one bit per subcluster (32 per cluster).

use engine::error::{Error, ErrorKind, Result};

pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
pub const OFLAG_ZERO: u64 = 1;
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2E_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;

pub const SUBCLUSTERS: u32 = 32;

/// A guest (virtual disk) byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Guest(pub u64);

/// A host (image or data file) byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Host(pub u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cluster_bits: u32,
    /// log2 of L2 entries per table.
    pub l2_bits: u32,
    pub extended_l2: bool,
    pub refcount_order: u32,
    /// log2 of refcount entries per refcount block.
    pub rb_bits: u32,
    /// v3 zero flag is available (v3 and not extended L2).
    pub zero_flag: bool,
}

impl Geometry {
    pub fn new(cluster_bits: u32, extended_l2: bool, refcount_order: u32, version: u32) -> Geometry {
        let entry_bits = if extended_l2 { 4 } else { 3 };
        Geometry {
            cluster_bits,
            l2_bits: cluster_bits - entry_bits,
            extended_l2,
            refcount_order,
            rb_bits: cluster_bits + 3 - refcount_order,
            zero_flag: version >= 3 && !extended_l2,
        }
    }
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }
    /// Bytes of one L2 entry (8 or 16).
    pub fn l2_entry_bytes(&self) -> usize {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        1 << (self.cluster_bits + self.l2_bits)
    }
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / u64::from(SUBCLUSTERS)
        } else {
            self.cluster_size()
        }
    }
    pub fn l1_index(&self, g: Guest) -> usize {
        (g.0 >> (self.cluster_bits + self.l2_bits)) as usize
    }
    pub fn l2_index(&self, g: Guest) -> usize {
        ((g.0 >> self.cluster_bits) & (self.l2_entries() - 1)) as usize
    }
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
    pub fn cluster_start(&self, off: u64) -> u64 {
        off & !(self.cluster_size() - 1)
    }
    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_span())
    }
    pub fn refblock_entries(&self) -> u64 {
        1 << self.rb_bits
    }
    pub fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.refcount_order)) - 1
        }
    }
    /// Bits of a compressed descriptor's host offset field.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
}

/// What a guest range maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: the backing file's data, or zeroes.
    Unallocated,
    /// Reads as zeroes; `host` is kept for a preallocated cluster.
    Zero { host: Option<u64> },
    /// Data at this host offset (for the first byte of the asked range).
    Data { host: u64, copied: bool },
    /// A compressed cluster: `offset` and `len` of the compressed bytes.
    Compressed { offset: u64, len: u64 },
}

fn corrupt(msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

/// Validate an L1 entry; returns the L2 table offset (0: none).
pub fn l1_l2_offset(geo: &Geometry, e: u64, index: usize) -> Result<u64> {
    let off = e & L1E_OFFSET_MASK;
    if e & L1E_RESERVED != 0 {
        return Err(corrupt(format!("L1 entry {index} has reserved bits set ({e:#018x})")));
    }
    if !off.is_multiple_of(geo.cluster_size()) {
        return Err(corrupt(format!("L2 table offset {off:#x} in L1 entry {index} is not cluster aligned")));
    }
    Ok(off)
}

/// Decode the entry for the guest range starting `in_cluster` bytes into a
/// cluster. Returns the mapping of that first byte and how many bytes from
/// there (up to the end of the cluster) share it.
pub fn decode(geo: &Geometry, entry: u64, bitmap: u64, in_cluster: u64, has_data_file: bool) -> Result<(Mapping, u64)> {
    let cs = geo.cluster_size();
    let rest = cs - in_cluster;
    if entry & OFLAG_COMPRESSED != 0 {
        if has_data_file {
            return Err(corrupt(format!("compressed cluster descriptor {entry:#018x} in an image with a data file")));
        }
        let (offset, len) = compressed_range(geo, entry);
        return Ok((Mapping::Compressed { offset, len }, rest));
    }
    if entry & L2E_STD_RESERVED != 0 {
        return Err(corrupt(format!("L2 entry {entry:#018x} has reserved bits set")));
    }
    let host = entry & L2E_OFFSET_MASK;
    let copied = entry & OFLAG_COPIED != 0;
    if !host.is_multiple_of(cs) {
        return Err(corrupt(format!("cluster offset {host:#x} in L2 entry {entry:#018x} is not cluster aligned")));
    }
    let allocated = host != 0 || (copied && has_data_file);
    if !geo.extended_l2 {
        if geo.zero_flag && entry & OFLAG_ZERO != 0 {
            return Ok((Mapping::Zero { host: allocated.then_some(host) }, rest));
        }
        if allocated {
            return Ok((Mapping::Data { host: host + in_cluster, copied }, rest));
        }
        return Ok((Mapping::Unallocated, rest));
    }
    let alloc = bitmap as u32;
    let zero = (bitmap >> 32) as u32;
    if alloc & zero != 0 {
        return Err(corrupt(format!("subcluster bitmap {bitmap:#018x} marks subclusters both allocated and zero")));
    }
    if alloc != 0 && !allocated {
        return Err(corrupt(format!("subclusters allocated in L2 entry {entry:#018x} without a host cluster")));
    }
    let sc = geo.subcluster_size();
    let first = (in_cluster / sc) as u32;
    let class = |i: u32| -> u8 {
        if alloc & (1 << i) != 0 {
            1
        } else if zero & (1 << i) != 0 {
            2
        } else {
            0
        }
    };
    let c = class(first);
    let mut last = first + 1;
    while last < SUBCLUSTERS && class(last) == c {
        last += 1;
    }
    let n = u64::from(last) * sc - in_cluster;
    let m = match c {
        1 => Mapping::Data { host: host + in_cluster, copied },
        2 => Mapping::Zero { host: allocated.then_some(host) },
        _ => Mapping::Unallocated,
    };
    Ok((m, n))
}

/// Host byte range of a compressed cluster's data.
pub fn compressed_range(geo: &Geometry, entry: u64) -> (u64, u64) {
    let shift = geo.csize_shift();
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (geo.cluster_bits - 8)) - 1)) + 1;
    let len = sectors * 512 - (offset & 511);
    (offset, len)
}

/// The descriptor for `len` compressed bytes at host `offset`.
pub fn compressed_entry(geo: &Geometry, offset: u64, len: u64) -> u64 {
    let shift = geo.csize_shift();
    let extra = ((offset + len - 1) >> 9) - (offset >> 9);
    OFLAG_COMPRESSED | (extra << shift) | offset
}

/// Host clusters a compressed cluster's bytes touch.
pub fn compressed_clusters(geo: &Geometry, entry: u64) -> std::ops::Range<u64> {
    let (offset, len) = compressed_range(geo, entry);
    // The last sector may lie past the real end of the data; QEMU counts the
    // clusters of every sector the descriptor names.
    let end = (offset & !511) + (len + (offset & 511));
    (offset >> geo.cluster_bits)..((end - 1) >> geo.cluster_bits) + 1
}

/// Host cluster an L2 entry holds a reference on (standard clusters only).
pub fn std_host_cluster(entry: u64) -> Option<u64> {
    if entry & OFLAG_COMPRESSED != 0 {
        return None;
    }
    match entry & L2E_OFFSET_MASK {
        0 => None,
        h => Some(h),
    }
}

/// Read refcount `index` of a refcount block.
pub fn get_refcount(order: u32, block: &[u8], index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            u64::from((block[bit / 8] >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[index]),
        4 => u64::from(u16::from_be_bytes([block[index * 2], block[index * 2 + 1]])),
        5 => u64::from(u32::from_be_bytes(block[index * 4..index * 4 + 4].try_into().expect("4 bytes"))),
        _ => u64::from_be_bytes(block[index * 8..index * 8 + 8].try_into().expect("8 bytes")),
    }
}

/// Write refcount `index` of a refcount block (the value must fit the width).
pub fn set_refcount(order: u32, block: &mut [u8], index: usize, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => block[index] = v as u8,
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => block[index * 8..index * 8 + 8].copy_from_slice(&v.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip_without_touching_neighbours() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
            for i in 0..entries {
                set_refcount(order, &mut block, i, (i as u64 * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(get_refcount(order, &block, i), (i as u64 * 7) & max, "order {order} index {i}");
            }
        }
        // Bit 0 is the least significant bit of the first byte.
        let mut b = [0u8; 1];
        set_refcount(0, &mut b, 0, 1);
        assert_eq!(b[0], 1);
        set_refcount(2, &mut [0u8; 1], 1, 3);
    }

    #[test]
    fn compressed_descriptors_round_trip() {
        let geo = Geometry::new(16, false, 4, 3);
        let e = compressed_entry(&geo, 0x12345, 3000);
        let (o, l) = compressed_range(&geo, e);
        assert_eq!(o, 0x12345);
        assert!((3000..3000 + 512).contains(&l), "{l}");
        assert_eq!(e & OFLAG_COMPRESSED, OFLAG_COMPRESSED);
    }

    #[test]
    fn extended_entries_split_into_runs_of_subclusters() {
        let geo = Geometry::new(16, true, 4, 3);
        let sc = geo.subcluster_size();
        // subclusters 0-1 allocated, 2 zero, rest unallocated
        let bitmap = 0b11u64 | (0b100u64 << 32);
        let e = 0x50000 | OFLAG_COPIED;
        assert_eq!(decode(&geo, e, bitmap, 0, false).unwrap(), (Mapping::Data { host: 0x50000, copied: true }, 2 * sc));
        assert_eq!(decode(&geo, e, bitmap, 2 * sc + 5, false).unwrap(), (Mapping::Zero { host: Some(0x50000) }, sc - 5));
        assert_eq!(decode(&geo, e, bitmap, 3 * sc, false).unwrap(), (Mapping::Unallocated, 29 * sc));
        assert!(decode(&geo, e, 1 | (1 << 32), 0, false).is_err(), "allocated and zero at once");
    }
}
