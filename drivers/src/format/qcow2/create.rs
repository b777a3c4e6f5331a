//! `create -f qcow2`: option parsing with qemu-img's rules and messages, the
//! initial layout (header, one refcount table cluster, one refcount block),
//! then the L1 table, backing and data file names and preallocation through
//! the open node, so creation and later growth share one code path.

use engine::block::{open_image, resolve_relative, BlockNode, OpenCtx, Prealloc, WriteFlags};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;

use super::header::{self, CompressionType, Header};
use super::layout::{set_refcount, Geometry};
use super::Qcow2Driver;

/// What `create` was asked for.
struct Spec {
    size: u64,
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    lazy: bool,
    extended_l2: bool,
    compression: CompressionType,
    prealloc: Prealloc,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
}

fn parse_spec(opts: &mut OptionTree, filename: &str) -> Result<(Spec, OptionTree)> {
    let err = |m: String| Error::new(ErrorKind::InvalidArgument, m).with_file(filename);
    if opts.keys().any(|k| k.starts_with("encrypt")) {
        let _ = opts.take_subtree("encrypt");
        let _ = opts.take("encrypt.format");
        let _ = opts.take("encryption");
        return Err(Error::new(ErrorKind::Unsupported, "encrypted qcow2 images are not supported yet").with_file(filename));
    }
    let size = opts.take_size("size")?;
    let version = match opts.take("compat").as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(v) => return Err(err(format!("Invalid compatibility level: '{v}'"))),
    };
    let cluster_size = opts.take_size("cluster_size")?.unwrap_or(65536);
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(err("Cluster size must be a power of two between 512 and 2048k".to_string()));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let refcount_bits = opts.take_parsed::<u64Parse>("refcount_bits")?.map_or(16, |v| v.0);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(err("Refcount width must be a power of two and may not exceed 64 bits".into()));
    }
    if version == 2 && refcount_bits != 16 {
        return Err(err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into()));
    }
    let lazy = opts.take_bool("lazy_refcounts")?.unwrap_or(false);
    if lazy && version == 2 {
        return Err(err("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
    }
    let extended_l2 = opts.take_bool("extended_l2")?.unwrap_or(false);
    if extended_l2 {
        if version == 2 {
            return Err(err("Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
        }
        if cluster_bits < 14 {
            return Err(err("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes".into()));
        }
    }
    let compression = match opts.take("compression_type").as_deref() {
        None | Some("zlib") => CompressionType::Zlib,
        Some("zstd") => CompressionType::Zstd,
        Some(v) => return Err(err(format!("Parameter 'compression-type' does not accept value '{v}'"))),
    };
    if compression != CompressionType::Zlib && version == 2 {
        return Err(err("Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)".into()));
    }
    let prealloc: Prealloc = opts.take_parsed("preallocation")?.unwrap_or_default();
    let backing_file = opts.take("backing_file");
    let backing_fmt = opts.take("backing_fmt");
    let data_file = opts.take("data_file");
    let data_file_raw = opts.take_bool("data_file_raw")?.unwrap_or(false);
    if data_file.is_some() && version == 2 {
        return Err(err("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into()));
    }
    if data_file_raw && data_file.is_none() {
        return Err(err("data-file-raw requires data-file".into()));
    }
    if data_file_raw && backing_file.is_some() {
        return Err(err("Backing file and preallocation can only be used at the same time if the external data file is not raw".into()));
    }
    if backing_fmt.is_some() && backing_file.is_none() {
        return Err(err("Backing format cannot be used without backing file".into()));
    }
    // Whatever is left goes to the protocol (nocow, extent_size_hint, ...).
    let mut proto = OptionTree::new();
    for k in ["nocow", "extent_size_hint"] {
        if let Some(v) = opts.take(k) {
            proto.set(k, v);
        }
    }
    opts.ensure_consumed("Block format 'qcow2'")?;
    Ok((
        Spec {
            size: size.unwrap_or(u64::MAX),
            version,
            cluster_bits,
            refcount_order: refcount_bits.trailing_zeros(),
            lazy,
            extended_l2,
            compression,
            prealloc,
            backing_file,
            backing_fmt,
            data_file,
            data_file_raw,
        },
        proto,
    ))
}

/// A plain number option (refcount_bits).
#[allow(non_camel_case_types)]
struct u64Parse(u64);

impl std::str::FromStr for u64Parse {
    type Err = Error;
    fn from_str(s: &str) -> Result<u64Parse> {
        s.parse().map(u64Parse).map_err(|_| invalid(format!("'{s}' is not a number")))
    }
}

/// Open the named backing file to check it and learn its size.
async fn backing_size(ctx: &OpenCtx, filename: &str, spec: &Spec) -> Result<Option<u64>> {
    let Some(b) = &spec.backing_file else { return Ok(None) };
    let mut o = OptionTree::new();
    o.set("file.filename", resolve_relative(filename, b));
    if let Some(f) = &spec.backing_fmt {
        o.set("driver", f.clone());
    }
    let mut bctx = ctx.clone();
    bctx.flags.write = false;
    bctx.flags.no_io = true;
    bctx.flags.shared = engine::block::Perm::ALL;
    bctx.flags.depth += 1;
    let node = open_image(&bctx, o).await.map_err(|e| {
        Error::new(e.kind(), format!("Could not open backing image: {e}")).with_file(filename)
    })?;
    let size = node.size();
    let fmt = node.driver();
    node.close().await?;
    if spec.backing_fmt.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("Backing file specified without backing format\nDetected format of {fmt}."),
        )
        .with_file(filename));
    }
    Ok(Some(size))
}

pub async fn create(ctx: &OpenCtx, filename: &str, mut opts: OptionTree) -> Result<()> {
    let (mut spec, mut proto) = parse_spec(&mut opts, filename)?;
    // -u (follow_backing off): take the size as given, do not open the backing file.
    if ctx.flags.follow_backing {
        if let Some(bs) = backing_size(ctx, filename, &spec).await? {
            if spec.size == u64::MAX {
                spec.size = bs;
            }
        }
    } else if spec.backing_file.is_some() && spec.backing_fmt.is_none() {
        return Err(Error::new(ErrorKind::InvalidArgument, "Backing file specified without backing format").with_file(filename));
    }
    if spec.size == u64::MAX {
        return Err(invalid("Image creation needs a size parameter").with_file(filename));
    }
    let geo = Geometry::new(spec.cluster_bits, spec.extended_l2, spec.refcount_order, spec.version);
    if geo.l1_entries_for(spec.size) * 8 > header::MAX_L1_BYTES {
        return Err(invalid(format!("Image size {} is too large for a cluster size of {}", spec.size, geo.cluster_size())).with_file(filename));
    }
    let proto_driver = ctx
        .registry
        .probe_protocol(filename)
        .ok_or_else(|| invalid(format!("no protocol driver for '{filename}'")))?;
    proto.set("size", "0");
    proto_driver.create(ctx, filename, proto.clone()).await?;
    if let Some(df) = &spec.data_file {
        // Like QEMU, a data file name is used as given (relative to the
        // working directory, not to the image).
        let path = df.clone();
        let mut p = OptionTree::new();
        p.set("size", "0");
        proto_driver.create(ctx, &path, p).await?;
    }

    // Cluster 0: header; 1: refcount table; 2: refcount block.
    let cs = geo.cluster_size();
    let mut h = Header::new(spec.version, spec.cluster_bits, 0, spec.refcount_order);
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = 1;
    if spec.version >= 3 {
        if spec.lazy {
            h.compatible |= header::COMPAT_LAZY_REFCOUNTS;
        }
        if spec.extended_l2 {
            h.incompatible |= header::INCOMPAT_EXTL2;
        }
        if spec.compression != CompressionType::Zlib {
            h.incompatible |= header::INCOMPAT_COMPRESSION;
            h.compression = spec.compression;
        }
        if spec.data_file.is_some() {
            h.incompatible |= header::INCOMPAT_DATA_FILE;
            h.data_file = spec.data_file.clone();
            if spec.data_file_raw {
                h.autoclear |= header::AUTOCLEAR_DATA_FILE_RAW;
            }
        }
    }
    h.backing_file = spec.backing_file.clone();
    h.backing_format = spec.backing_fmt.clone();
    let hbytes = h.serialize().map_err(|e| e.with_file(filename))?;
    let mut img = vec![0u8; 3 * cs as usize];
    img[..hbytes.len()].copy_from_slice(&hbytes);
    img[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    for i in 0..3 {
        set_refcount(spec.refcount_order, &mut img[2 * cs as usize..], i, 1);
    }

    let mut fopts = OptionTree::new();
    fopts.set("filename", filename);
    let mut wctx = ctx.clone();
    wctx.flags.write = true;
    let file = wctx.open_protocol(fopts).await?;
    let (r, _) = file.write(0, IoBuf::from_slice(&img), WriteFlags::default()).await;
    r?;
    file.flush().await?;
    drop(file);

    // Open it as qcow2 (without following the backing file) and grow it.
    let mut o = OptionTree::new();
    if spec.backing_file.is_some() {
        o.set("backing", "null");
    }
    if spec.data_file.is_some() {
        o.set("data-file.filename", spec.data_file.clone().unwrap_or_default());
    }
    let mut f = OptionTree::new();
    f.set("filename", filename);
    let file = wctx.open_protocol(f).await?;
    let node = Qcow2Driver.open(&wctx, o, file).await?;
    node.truncate(spec.size, true, Prealloc::Off).await?;
    // A raw data file must be readable as the disk: every cluster is mapped.
    let prealloc = if spec.data_file_raw && spec.prealloc == Prealloc::Off { Prealloc::Metadata } else { spec.prealloc };
    if prealloc != Prealloc::Off {
        node.preallocate(0, spec.size, prealloc).await?;
    }
    node.close().await?;
    Ok(())
}
