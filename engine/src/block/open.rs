//! Opening a graph from an option tree: pick the protocol for the filename, probe
//! the format when none is named (falling back to raw, with QEMU's warning when
//! such an image is opened for writing), and pass the open flags (read/write,
//! permissions, cache mode, aio) down to the drivers.

use std::str::FromStr;
use std::sync::Arc;

use super::{read_vec, BlockNode, DriverKind, Perm, Registry};
use crate::aio::Backend;
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::options::OptionTree;

/// QEMU's cache modes, as the three flags they stand for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheMode {
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// Ignore flushes (cache=unsafe).
    pub no_flush: bool,
    /// Every write is durable when it completes (O_DSYNC).
    pub writethrough: bool,
}

impl CacheMode {
    pub const WRITEBACK: CacheMode = CacheMode { direct: false, no_flush: false, writethrough: false };
}

impl Default for CacheMode {
    fn default() -> Self {
        CacheMode::WRITEBACK
    }
}

impl FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<CacheMode> {
        let (direct, no_flush, writethrough) = match s {
            "none" | "off" => (true, false, false),
            "writeback" => (false, false, false),
            "writethrough" => (false, false, true),
            "directsync" => (true, false, true),
            "unsafe" => (false, true, false),
            _ => {
                return Err(invalid(format!(
                    "invalid cache mode '{s}': expected none, writeback, writethrough, directsync or unsafe"
                )))
            }
        };
        Ok(CacheMode { direct, no_flush, writethrough })
    }
}

/// How an image is being opened.
#[derive(Clone, Debug)]
pub struct OpenFlags {
    pub write: bool,
    /// Permissions beyond read (and write, when `write`): RESIZE for resize.
    pub extra_perm: Perm,
    /// What we let other openers do.
    pub shared: Perm,
    /// -U: share everything; only for read-only opens.
    pub force_share: bool,
    /// Metadata only (info, measure): no consistent-read permission taken.
    pub no_io: bool,
    pub cache: CacheMode,
    /// Backend when the options name none.
    pub aio: Backend,
    /// Open the backing file an image names in its own header. An image from
    /// an untrusted source can name any host file there; with this off such an
    /// image fails to open unless the options say what the backing is (or
    /// `backing=null`).
    pub follow_backing: bool,
    /// How deep in a backing chain this open is (bounded by MAX_CHAIN_DEPTH).
    pub depth: u32,
    /// Opened to check or repair: a format lets a corrupt image open writable.
    pub repair: bool,
    /// Discards free space (QEMU's BDRV_O_UNMAP, `discard=unmap` for the
    /// whole graph, as qemu-nbd's --discard=unmap): the default of each
    /// node's own `discard` option.
    pub discard_unmap: bool,
}

/// Longest backing chain we open: longer ones are almost surely a loop.
pub const MAX_CHAIN_DEPTH: u32 = 64;

impl Default for OpenFlags {
    fn default() -> Self {
        OpenFlags {
            write: false,
            extra_perm: Perm::NONE,
            shared: Perm::ALL,
            force_share: false,
            no_io: false,
            cache: CacheMode::default(),
            aio: Backend::IoUring,
            follow_backing: true,
            depth: 0,
            repair: false,
            discard_unmap: false,
        }
    }
}

impl OpenFlags {
    /// Permissions this open uses.
    pub fn perm(&self) -> Perm {
        let mut p = self.extra_perm;
        if !self.no_io {
            p = p.union(Perm::CONSISTENT_READ);
        }
        if self.write {
            p = p.union(Perm::WRITE);
        }
        p
    }
}

/// Everything an open needs besides the options.
#[derive(Clone)]
pub struct OpenCtx {
    pub registry: Arc<Registry>,
    pub flags: OpenFlags,
    /// Where user-facing warnings go (the CLI prints them to stderr).
    pub warn: fn(&str),
}

fn warn_stderr(msg: &str) {
    eprintln!("{msg}");
}

impl OpenCtx {
    pub fn new(registry: Arc<Registry>, flags: OpenFlags) -> OpenCtx {
        OpenCtx { registry, flags, warn: warn_stderr }
    }

    /// Open a protocol node (or a filter over one, such as preallocate):
    /// `opts.driver` if given, else by filename.
    pub async fn open_protocol(&self, mut opts: OptionTree) -> Result<Arc<dyn BlockNode>> {
        let filename = opts.get("filename").map(str::to_string);
        let driver = match opts.take("driver") {
            Some(name) => self.registry.get(&name).ok_or_else(|| unknown_driver(&name))?,
            None => {
                let f = filename.as_deref().ok_or_else(|| invalid("no filename given"))?;
                self.registry.probe_protocol(f).ok_or_else(|| invalid(format!("no protocol driver for '{f}'")))?
            }
        };
        match driver.kind() {
            DriverKind::Protocol => driver.open_protocol(self, opts).await,
            // A filter between a format and its file (preallocate).
            DriverKind::Filter => driver.open_filter(self, opts).await,
            DriverKind::Format => {
                Err(invalid(format!("'{}' is a format, not a protocol: it cannot be a 'file' child", driver.name())))
            }
        }
    }
}

fn unknown_driver(name: &str) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("Unknown driver '{name}'"))
}

/// Bytes of the image read for format probing.
const PROBE_BYTES: u64 = 2048;

/// Open an image from its options: `driver` names the format (probed when absent),
/// `file.*` the protocol child; a top-level `filename` is the child's filename.
pub async fn open_image(ctx: &OpenCtx, mut opts: OptionTree) -> Result<Arc<dyn BlockNode>> {
    if ctx.flags.force_share && ctx.flags.write {
        return Err(invalid("force-share=on can only be used with read-only images"));
    }
    let driver = match opts.take("driver") {
        Some(name) => Some(ctx.registry.get(&name).ok_or_else(|| unknown_driver(&name))?),
        None => None,
    };
    if let Some(d) = driver {
        match d.kind() {
            DriverKind::Protocol => {
                opts.set("driver", d.name());
                return ctx.open_protocol(opts).await;
            }
            // Filters open their own children (any image) with open_image.
            DriverKind::Filter => return d.open_filter(ctx, opts).await,
            DriverKind::Format => {}
        }
    }
    let mut file_opts = opts.take_subtree("file");
    if let Some(f) = opts.take("filename") {
        file_opts.set_default("filename", f);
    }
    if let Some(f) = opts.take("file") {
        file_opts.set_default("filename", f);
    }
    let mut child_ctx = ctx.clone();
    if let Some(d) = driver {
        child_ctx.flags.shared = Perm(ctx.flags.shared.0 & d.child_shared().0);
    }
    let file = child_ctx.open_protocol(file_opts).await?;
    match driver {
        Some(d) => d.open_format(ctx, opts, file, false).await,
        None => {
            let n = file.size().min(PROBE_BYTES) as usize;
            let header = if n > 0 {
                read_vec(&*file, 0, n).await.map_err(|e| e.with_file(file.filename()))?.to_vec()
            } else {
                Vec::new()
            };
            let filename = file.filename();
            match ctx.registry.probe_format(&header, &filename) {
                Some(d) => d.open_format(ctx, opts, file, true).await,
                None => {
                    let raw = ctx.registry.get("raw").ok_or_else(|| unknown_driver("raw"))?;
                    raw.open_format(ctx, opts, file, true).await
                }
            }
        }
    }
}
