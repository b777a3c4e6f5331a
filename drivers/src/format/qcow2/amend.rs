//! `amend -o` for qcow2: the options QEMU lets change on an existing image:
//! compat (up, or down when nothing needs v3), lazy_refcounts, refcount_bits
//! (the refcount structure is rewritten), backing file name and format, and
//! size. Run it on an image nothing else uses; the node should be closed
//! right after.

use engine::block::{BlockNode, Prealloc, WriteFlags};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;

use super::header::{self, CompressionType};
use super::layout::{self, OFLAG_COPIED, OFLAG_ZERO};
use super::{check, Qcow2};

fn unsupported(what: &str) -> Error {
    Error::new(ErrorKind::Unsupported, format!("Changing {what} is not supported"))
}

impl Qcow2 {
    pub(super) async fn do_amend(&self, mut opts: OptionTree) -> Result<()> {
        engine::block::check_writable(self)?;
        self.check_not_corrupt()?;
        let version = match opts.take("compat").as_deref() {
            None => None,
            Some("1.1") | Some("v3") => Some(3),
            Some("0.10") | Some("v2") => Some(2),
            Some(v) => return Err(invalid(format!("Invalid compatibility level: '{v}'"))),
        };
        let lazy = opts.take_bool("lazy_refcounts")?;
        let refcount_bits = match opts.take("refcount_bits") {
            None => None,
            Some(v) => {
                let n: u64 = v.parse().map_err(|_| invalid(format!("'{v}' is not a number")))?;
                if n == 0 || n > 64 || !n.is_power_of_two() {
                    return Err(invalid("Refcount width must be a power of two and may not exceed 64 bits"));
                }
                Some(n.trailing_zeros())
            }
        };
        let size = opts.take_size("size")?;
        let backing_file = opts.take("backing_file");
        let backing_fmt = opts.take("backing_fmt");
        for (k, what) in [
            ("cluster_size", "the cluster size"),
            ("extended_l2", "extended L2 entries"),
            ("compression_type", "the compression type"),
            ("preallocation", "the preallocation mode"),
            ("data_file", "the data file"),
            ("data_file_raw", "data-file-raw"),
        ] {
            if let Some(v) = opts.take(k) {
                // Restating the current value is fine, as in QEMU.
                let same = match k {
                    "cluster_size" => engine::size::parse_size(&v).ok() == Some(self.geo.cluster_size()),
                    "extended_l2" => engine::options::parse_bool(&v) == Some(self.geo.extended_l2),
                    "compression_type" => v == self.header().compression.name(),
                    _ => false,
                };
                if !same {
                    return Err(unsupported(what));
                }
            }
        }
        if opts.keys().any(|k| k.starts_with("encrypt")) {
            return Err(unsupported("encryption"));
        }
        opts.ensure_consumed("Block format 'qcow2'")?;

        let cur_version = self.header().version;
        let target_version = version.unwrap_or(cur_version);
        let cur_lazy = self.header().lazy_refcounts();
        let target_lazy = lazy.unwrap_or(cur_lazy && target_version >= 3);
        if target_lazy && target_version < 3 {
            return Err(invalid("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)"));
        }
        let target_order = refcount_bits.unwrap_or(self.geo.refcount_order);
        if target_version < 3 && target_order != 4 {
            return Err(invalid("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
        }
        if target_version < cur_version {
            let h = self.header().clone();
            if h.extended_l2() {
                return Err(invalid("Cannot downgrade an image with extended L2 entries"));
            }
            if h.has_data_file() {
                return Err(invalid("Cannot downgrade an image with a data file"));
            }
            if h.compression != CompressionType::Zlib {
                return Err(invalid("Cannot downgrade an image with a non-zlib compression type"));
            }
        }

        if let Some(s) = size {
            self.truncate(s, true, Prealloc::Off).await?;
        }
        if backing_file.is_some() || backing_fmt.is_some() {
            let cur = self.backing_name();
            let name = backing_file.or(cur.as_ref().map(|c| c.0.clone()));
            let fmt = backing_fmt.or(cur.and_then(|c| c.1));
            match name {
                Some(n) if !n.is_empty() => self.set_backing(Some((n, fmt))).await?,
                _ => self.set_backing(None).await?,
            }
        }
        self.writeback(true).await?;
        // Zero clusters are expanded while the allocator still works in the
        // refcount width the node was opened with; the refcount structure is
        // rewritten last (after it, nothing may allocate).
        if target_version < cur_version {
            self.expand_zero_clusters().await?;
        }
        if target_order != self.geo.refcount_order {
            check::change_refcount_order(self, target_order).await?;
        }
        {
            let mut h = self.header();
            if target_lazy {
                h.compatible |= header::COMPAT_LAZY_REFCOUNTS;
            } else {
                h.compatible &= !header::COMPAT_LAZY_REFCOUNTS;
            }
            if target_version != h.version {
                h.version = target_version;
                if target_version == 2 {
                    h.header_length = header::V2_HEADER_LEN;
                    h.incompatible = 0;
                    h.compatible = 0;
                    h.autoclear = 0;
                    h.extra_fields.clear();
                } else {
                    h.header_length = header::V3_HEADER_LEN;
                }
            }
        }
        self.write_header().await?;
        self.file.flush().await
    }

    /// v2 has no zero flag: turn zero clusters into clusters of zeroes (or
    /// into nothing, when nothing shows through them).
    async fn expand_zero_clusters(&self) -> Result<()> {
        let cs = self.geo.cluster_size();
        for (i, l2off, clusters) in self.mapped_tables()? {
            for c in clusters.step_by(cs as usize) {
                let (e, _) = self.entry(c).await?.unwrap_or((0, 0));
                if e & layout::OFLAG_COMPRESSED == 0 && e & OFLAG_ZERO != 0 {
                    let host = layout::std_host_cluster(e);
                    let behind = self.backing.as_ref().is_some_and(|b| c < b.size());
                    let new = match host {
                        Some(h) if e & OFLAG_COPIED != 0 => {
                            let (r, _) = self.file.write(h, IoBuf::zeroed(cs as usize), WriteFlags::default()).await;
                            r?;
                            h | OFLAG_COPIED
                        }
                        _ if behind => {
                            let h = self.refs.alloc(&*self.file, 1).await?;
                            let (r, _) = self.file.write(h, IoBuf::zeroed(cs as usize), WriteFlags::default()).await;
                            r?;
                            h | OFLAG_COPIED
                        }
                        _ => 0,
                    };
                    let (old, _) = self.set_entry(i, l2off, c, |_, _| (new, 0)).await?;
                    if new & layout::L2E_OFFSET_MASK != old & layout::L2E_OFFSET_MASK {
                        self.release(old, false);
                    }
                }
            }
        }
        self.writeback(true).await?;
        Ok(())
    }
}
