//! The qcow2 header: parsing and validation of the first cluster (fixed fields,
//! additional v3 fields, header extensions, backing file name) and writing it
//! back with unknown extensions and unknown additional fields preserved. It does
//! not touch tables; `mod.rs` loads them from the offsets found here.
//!
//! Fixed header (big endian), as `qemu-interop-qcow2.txt` gives it:
//!
//! | offset | size | field                   |
//! |--------|------|-------------------------|
//! | 0      | 4    | magic "QFI\xfb"         |
//! | 4      | 4    | version (2 or 3)        |
//! | 8      | 8    | backing_file_offset     |
//! | 16     | 4    | backing_file_size       |
//! | 20     | 4    | cluster_bits            |
//! | 24     | 8    | size (virtual, bytes)   |
//! | 32     | 4    | crypt_method            |
//! | 36     | 4    | l1_size (entries)       |
//! | 40     | 8    | l1_table_offset         |
//! | 48     | 8    | refcount_table_offset   |
//! | 56     | 4    | refcount_table_clusters |
//! | 60     | 4    | nb_snapshots            |
//! | 64     | 8    | snapshots_offset        |
//! | 72     | 8    | incompatible_features   (v3) |
//! | 80     | 8    | compatible_features     (v3) |
//! | 88     | 8    | autoclear_features      (v3) |
//! | 96     | 4    | refcount_order          (v3) |
//! | 100    | 4    | header_length           (v3) |
//! | 104    | 1    | compression_type (if header_length > 104) |
//!
//! Extensions follow at `header_length`: {type u32, len u32, data, pad to 8},
//! ended by type 0.

use engine::error::{Error, ErrorKind, Result};

pub const MAGIC: [u8; 4] = *b"QFI\xfb";

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;

pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
pub const AUTOCLEAR_KNOWN: u64 = 0x3;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

pub const V2_HEADER_LEN: u32 = 72;
/// What we write for v3: the fields through compression_type, padded to 8.
pub const V3_HEADER_LEN: u32 = 112;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits, which keep a hostile header from making us allocate much.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_BACKING_NAME: u32 = 1023;

/// The feature name table QEMU writes into every v3 image.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension we keep as bytes (the known ones are also decoded into
/// fields of `Header`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub ty: u32,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    /// Additional v3 fields past compression_type that we do not know, kept
    /// verbatim (bytes 105..header_length).
    pub extra_fields: Vec<u8>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// Extensions other than backing format, data file and feature table, in
    /// the order found (bitmaps, crypto header, unknown ones).
    pub other_extensions: Vec<Extension>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidImage, msg)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    pub fn has_data_file(&self) -> bool {
        self.incompatible & INCOMPAT_DATA_FILE != 0
    }
    pub fn data_file_raw(&self) -> bool {
        self.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible & COMPAT_LAZY_REFCOUNTS != 0
    }
    pub fn compat_name(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }

    /// A new header for `create`.
    pub fn new(version: u32, cluster_bits: u32, size: u64, refcount_order: u32) -> Header {
        Header {
            version,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order,
            header_length: if version == 2 { V2_HEADER_LEN } else { V3_HEADER_LEN },
            compression: CompressionType::Zlib,
            extra_fields: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            other_extensions: Vec::new(),
        }
    }

    /// Parse and validate the first cluster (or as much of it as the file has).
    /// `buf` must hold at least the fixed header; the caller reads one cluster
    /// once cluster_bits is known.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize || buf[..4] != MAGIC {
            return Err(bad("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::new(ErrorKind::Unsupported, format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "Unsupported cluster size: 2^{cluster_bits} (must be between 512 bytes and 2 MiB)"
            ))
            .at(20));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header::new(version, cluster_bits, be64(buf, 24), 4);
        let backing_offset = be64(buf, 8);
        let backing_size = be32(buf, 16);
        h.crypt_method = be32(buf, 32);
        h.l1_size = be32(buf, 36);
        h.l1_table_offset = be64(buf, 40);
        h.refcount_table_offset = be64(buf, 48);
        h.refcount_table_clusters = be32(buf, 56);
        h.nb_snapshots = be32(buf, 60);
        h.snapshots_offset = be64(buf, 64);
        if version == 3 {
            if buf.len() < 104 {
                return Err(bad("qcow2 v3 header is truncated"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(bad(format!("qcow2 header length {} is invalid (at least 104, a multiple of 8)", h.header_length)).at(100));
            }
            if u64::from(h.header_length) > cs || h.header_length as usize > buf.len() {
                return Err(bad("qcow2 header exceeds cluster size").at(100));
            }
            if h.header_length > 104 {
                h.compression = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(bad(format!("Unknown compression type {t}")).at(104)),
                };
                let extra = &buf[105..h.header_length as usize];
                // Zero bytes here are padding; anything else is a newer field we keep.
                if extra.iter().any(|&b| b != 0) {
                    h.extra_fields = extra.to_vec();
                }
            }
            let unknown = h.incompatible & !INCOMPAT_KNOWN;
            if unknown != 0 {
                let names = feature_names(buf, h.header_length as usize, cs as usize);
                let list: Vec<String> = (0..64)
                    .filter(|b| unknown & (1u64 << b) != 0)
                    .map(|b| match names.iter().find(|(t, bit, _)| *t == 0 && *bit == b) {
                        Some((_, _, n)) => n.clone(),
                        None => format!("Unknown incompatible feature: {:x}", 1u64 << b),
                    })
                    .collect();
                return Err(Error::new(ErrorKind::Unsupported, format!("Unsupported qcow2 feature(s): {}", list.join(", "))).at(72));
            }
            if h.refcount_order > 6 {
                return Err(bad(format!("Reference count entry width too large; may not exceed 64 bits (refcount_order {})", h.refcount_order)).at(96));
            }
            let compression_bit = h.incompatible & INCOMPAT_COMPRESSION != 0;
            if compression_bit != (h.compression != CompressionType::Zlib) {
                return Err(bad(if compression_bit {
                    "Compression type incompatible feature bit is set, but compression type is zlib"
                } else {
                    "Compression type incompatible feature bit must be set for non-zlib compression"
                })
                .at(72));
            }
        } else {
            h.header_length = V2_HEADER_LEN;
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(bad("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes").at(20));
        }
        if h.data_file_raw() && !h.has_data_file() {
            return Err(bad("data-file-raw requires a data file").at(88));
        }
        for (name, off, at) in [
            ("L1 table", h.l1_table_offset, 40),
            ("Reference count table", h.refcount_table_offset, 48),
            ("Snapshot table", h.snapshots_offset, 64),
        ] {
            if off % cs != 0 {
                return Err(bad(format!("{name} offset {off:#x} is not aligned to the cluster size")).at(at));
            }
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("Active L1 table too large ({} entries)", h.l1_size)).at(36));
        }
        if u64::from(h.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(bad(format!("Reference count table too large ({} clusters)", h.refcount_table_clusters)).at(56));
        }
        if h.refcount_table_clusters == 0 {
            return Err(bad("Image has no reference count table").at(56));
        }
        h.parse_extensions(buf, cs as usize)?;
        if backing_offset != 0 {
            if backing_size > MAX_BACKING_NAME {
                return Err(bad(format!("Backing file name too long ({backing_size} bytes)")).at(16));
            }
            let end = backing_offset.checked_add(u64::from(backing_size)).filter(|&e| e <= cs && e as usize <= buf.len());
            let Some(end) = end else {
                return Err(bad("Backing file name is not within the header cluster").at(8));
            };
            let name = &buf[backing_offset as usize..end as usize];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, buf: &[u8], cs: usize) -> Result<()> {
        if self.version == 2 {
            // v2 images may carry extensions too (QEMU writes the backing format).
        }
        let limit = buf.len().min(cs);
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > limit {
                // No end marker within the cluster: QEMU treats running off the
                // end as the end of the list.
                return Ok(());
            }
            let ty = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_at = at + 8;
            if len > limit - data_at {
                return Err(bad(format!("qcow2 header extension {ty:#010x} overflows the header cluster")).at(at as u64));
            }
            let data = &buf[data_at..data_at + len];
            match ty {
                EXT_BACKING_FORMAT => self.backing_format = Some(String::from_utf8_lossy(data).into_owned()),
                EXT_DATA_FILE => self.data_file = Some(String::from_utf8_lossy(data).into_owned()),
                EXT_FEATURE_TABLE => {} // regenerated on write
                _ => self.other_extensions.push(Extension { ty, data: data.to_vec() }),
            }
            at = data_at + len.next_multiple_of(8);
        }
    }

    pub fn has_extension(&self, ty: u32) -> bool {
        self.other_extensions.iter().any(|e| e.ty == ty)
    }

    /// The header cluster's contents as we would write them. The feature
    /// name table is optional: like QEMU, we leave it out when it does not fit.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        self.serialize_with(true).or_else(|_| self.serialize_with(false))
    }

    fn serialize_with(&self, feature_table: bool) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; self.header_length as usize];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b[104] = match self.compression {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
                let n = self.extra_fields.len().min(self.header_length as usize - 105);
                b[105..105 + n].copy_from_slice(&self.extra_fields[..n]);
            }
        }
        let push_ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push_ext(&mut b, EXT_DATA_FILE, f.as_bytes());
        }
        for e in self.other_extensions.iter().filter(|e| e.ty == EXT_CRYPTO) {
            push_ext(&mut b, e.ty, &e.data);
        }
        if self.version >= 3 && feature_table {
            let mut t = Vec::with_capacity(FEATURE_NAMES.len() * 48);
            for (ty, bit, name) in FEATURE_NAMES {
                let mut e = [0u8; 48];
                e[0] = *ty;
                e[1] = *bit;
                e[2..2 + name.len()].copy_from_slice(name.as_bytes());
                t.extend_from_slice(&e);
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &t);
        }
        for e in self.other_extensions.iter().filter(|e| e.ty != EXT_CRYPTO) {
            push_ext(&mut b, e.ty, &e.data);
        }
        b.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() > cs {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("qcow2 header does not fit in one cluster ({} > {cs} bytes); use a larger cluster size or shorter names", b.len()),
            ));
        }
        Ok(b)
    }
}

/// (type, bit, name) entries of the feature name table, for error messages.
fn feature_names(buf: &[u8], start: usize, cs: usize) -> Vec<(u8, u32, String)> {
    let limit = buf.len().min(cs);
    let mut at = start;
    let mut out = Vec::new();
    while at + 8 <= limit {
        let ty = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        if ty == EXT_END || len > limit - at - 8 {
            break;
        }
        if ty == EXT_FEATURE_TABLE {
            for e in buf[at + 8..at + 8 + len].chunks_exact(48) {
                let name = &e[2..];
                let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                out.push((e[0], u32::from(e[1]), String::from_utf8_lossy(&name[..end]).into_owned()));
            }
        }
        at += 8 + len.next_multiple_of(8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_extensions_and_backing_name() {
        let mut h = Header::new(3, 16, 1 << 30, 4);
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.other_extensions.push(Extension { ty: 0x1234_5678, data: vec![1, 2, 3] });
        let b = h.serialize().unwrap();
        let mut cluster = b.clone();
        cluster.resize(65536, 0);
        let p = Header::parse(&cluster).unwrap();
        assert_eq!(p, h);
    }

    #[test]
    fn unknown_incompatible_bit_is_refused_by_name() {
        let mut h = Header::new(3, 16, 1 << 20, 4);
        h.refcount_table_clusters = 1;
        h.refcount_table_offset = 0x10000;
        let mut b = h.serialize().unwrap();
        b.resize(65536, 0);
        b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("Unknown incompatible feature: 10000000000"), "{e}");
    }
}
