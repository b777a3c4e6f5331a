//! `ringblk rebase`: give an image a new backing file. Safe mode (the
//! default) first copies into the image every range it does not allocate
//! where the old and the new backing files differ, so what the guest reads
//! does not change; `-u` only rewrites the name.

use clap::Args;
use engine::block::{BlockNode, OpenFlags, WriteFlags};
use engine::error::{invalid, Result};

use crate::common;
use crate::OpenArgs;

#[derive(Args)]
pub struct RebaseArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// New backing file ("" for none)
    #[arg(short = 'b')]
    backing: String,
    /// New backing file's format
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Unsafe: only change the name, copy nothing
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Cache mode of the image
    #[arg(short = 't')]
    cache: Option<String>,
    /// Cache mode of the backing files
    #[arg(short = 'T')]
    src_cache: Option<String>,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
}

/// Granularity of the old-vs-new comparison.
const STEP: u64 = 64 << 10;

async fn copy_differences(node: &dyn BlockNode, new: Option<&dyn BlockNode>) -> Result<()> {
    let size = node.size();
    let mut off = 0;
    while off < size {
        let e = node.block_status(off, size - off).await?;
        if e.allocated {
            off += e.len;
            continue;
        }
        // Unallocated here: the guest sees the old backing file's data.
        let end = off + e.len;
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(STEP - pos % STEP);
            let old = engine::block::read_vec(node, pos, n as usize).await?;
            let mut newer = vec![0u8; n as usize];
            if let Some(b) = new {
                let bs = b.size();
                if pos < bs {
                    let k = (bs - pos).min(n) as usize;
                    let got = engine::block::read_vec(b, pos, k).await?;
                    newer[..k].copy_from_slice(&got);
                }
            }
            if old[..] != newer[..] {
                let (r, _) = node.write(pos, old, WriteFlags::default()).await;
                r?;
            }
            pos += n;
        }
        off = end;
    }
    Ok(())
}

pub fn run(a: RebaseArgs) -> i32 {
    let r = (|| -> Result<()> {
        let spec = common::spec(&a.open, &a.filename)?;
        if a.open.force_share {
            return Err(invalid("force-share=on can only be used with read-only images"));
        }
        let mut flags: OpenFlags = common::flags(&a.open, true);
        if let Some(c) = &a.cache {
            flags.cache = c.parse()?;
        }
        if a.unsafe_mode {
            // The old backing file may be gone: that is what -u is for.
            flags.follow_backing = false;
        }
        let new_name = (!a.backing.is_empty()).then(|| a.backing.clone());
        let (fmt, unsafe_mode) = (a.backing_fmt.clone(), a.unsafe_mode);
        let src_cache = a.src_cache.clone();
        let rt = common::small_runtime()?;
        rt.block_on(move || async move {
            let mut spec = spec;
            if unsafe_mode {
                spec.set("backing", "null");
            }
            let node = common::open(spec, flags).await?;
            if !unsafe_mode {
                let new = match &new_name {
                    None => None,
                    Some(name) => {
                        // Relative names are relative to the image, as in the header.
                        let path = engine::block::resolve_relative(&node.filename(), name);
                        let mut o = engine::options::OptionTree::new();
                        o.set("file.filename", path);
                        if let Some(f) = &fmt {
                            o.set("driver", f.clone());
                        }
                        let mut bflags = OpenFlags { force_share: false, ..Default::default() };
                        if let Some(c) = &src_cache {
                            bflags.cache = c.parse()?;
                        }
                        Some(common::open(o, bflags).await?)
                    }
                };
                copy_differences(&*node, new.as_deref()).await?;
            }
            node.set_backing(new_name.map(|n| (n, fmt))).await?;
            node.close().await
        })
    })();
    match r {
        Ok(()) => 0,
        Err(e) => common::fail(e),
    }
}
