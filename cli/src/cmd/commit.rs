//! `ringblk commit`: write what an image holds into its backing file (or,
//! with -b, into a deeper image of its chain), then empty the image unless
//! -d (or -b, which implies it: the layers in between no longer match).

use clap::Args;
use engine::block::{backing_of, OpenFlags, WriteFlags, ZeroFlags};
use engine::error::{invalid, Result};
use engine::options::OptionTree;

use crate::common;
use crate::OpenArgs;

#[derive(Args)]
pub struct CommitArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// Commit into this image of the backing chain (implies -d)
    #[arg(short = 'b')]
    base: Option<String>,
    /// Do not empty the image after committing
    #[arg(short = 'd')]
    drop: bool,
    /// Cache mode
    #[arg(short = 't')]
    cache: Option<String>,
    /// Rate limit (accepted for compatibility; commit runs unthrottled)
    #[arg(short = 'r')]
    rate: Option<String>,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
}

pub fn run(a: CommitArgs) -> i32 {
    let quiet = a.quiet;
    let r = (|| -> Result<()> {
        let spec = common::spec(&a.open, &a.filename)?;
        // The chain is read with locks shared (the base is written through its
        // own node meanwhile); the top is reopened writable to empty it.
        let mut flags: OpenFlags = common::flags(&a.open, false);
        flags.force_share = true;
        if let Some(c) = &a.cache {
            flags.cache = c.parse()?;
        }
        let cache = flags.cache;
        let top_spec = spec.clone();
        let (base_name, keep) = (a.base.clone(), a.drop || a.base.is_some());
        let rt = common::small_runtime()?;
        rt.block_on(move || async move {
            let top = common::open(spec, flags).await?;
            // The chain below the top, to find the base and its depth.
            let mut chain = Vec::new();
            let mut cur = backing_of(&*top);
            while let Some(n) = cur {
                cur = backing_of(&*n);
                chain.push(n);
            }
            if chain.is_empty() {
                return Err(invalid("Image does not have a backing file").with_file(top.filename()));
            }
            let depth = match &base_name {
                None => 1,
                Some(b) => {
                    let want = std::fs::canonicalize(b).ok();
                    1 + chain
                        .iter()
                        .position(|n| n.filename() == *b || (want.is_some() && std::fs::canonicalize(n.filename()).ok() == want))
                        .ok_or_else(|| invalid(format!("'{b}' is not in the backing chain of '{}'", top.filename())))?
                }
            } as u32;
            let base_ro = &chain[depth as usize - 1];
            let mut o = OptionTree::new();
            o.set("driver", base_ro.driver());
            o.set("file.filename", base_ro.children().iter().find(|c| c.role == "file").map_or_else(|| base_ro.filename(), |c| c.node.filename()));
            let base = common::open(o, OpenFlags { write: true, cache, ..Default::default() }).await?;
            let size = top.size().min(base.size());
            let mut off = 0;
            while off < size {
                let (e, d, _) = engine::block::chain_status(&top, off, size - off).await?;
                let n = e.len.min(size - off);
                if e.allocated && d < depth {
                    if e.is_zero_hole() {
                        base.write_zeroes(off, n, ZeroFlags { may_unmap: true, ..Default::default() }).await?;
                    } else {
                        let mut pos = off;
                        while pos < off + n {
                            let k = (off + n - pos).min(2 << 20);
                            let buf = engine::block::read_vec(&*top, pos, k as usize).await?;
                            let (r, _) = base.write(pos, buf, WriteFlags::default()).await;
                            r?;
                            pos += k;
                        }
                    }
                }
                off += n;
            }
            base.flush().await?;
            base.close().await?;
            drop(base);
            drop(chain);
            drop(top);
            if !keep {
                let mut spec = top_spec;
                spec.set("backing", "null");
                let top = common::open(spec, OpenFlags { write: true, cache, ..Default::default() }).await?;
                top.make_empty().await?;
                top.close().await?;
            }
            Ok(())
        })
    })();
    match r {
        Ok(()) => {
            if !quiet {
                println!("Image committed.");
            }
            0
        }
        Err(e) => common::fail(e),
    }
}
