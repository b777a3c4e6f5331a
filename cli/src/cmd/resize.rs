//! `ringblk resize`: grow or shrink an image's virtual size.

use clap::Args;
use engine::block::{Perm, Prealloc};
use engine::error::{invalid, Result};

use crate::common;
use crate::OpenArgs;

#[derive(Args)]
pub struct ResizeArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// Preallocation for the new area (off, falloc, full, metadata)
    #[arg(long)]
    preallocation: Option<String>,
    /// Allow shrinking (data past the new end is lost)
    #[arg(long)]
    shrink: bool,
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
    /// New size, or +N / -N relative to the current size
    #[arg(allow_hyphen_values = true)]
    size: String,
}

pub fn run(a: ResizeArgs) -> i32 {
    let r = (|| -> Result<()> {
        let spec = common::spec(&a.open, &a.filename)?;
        let prealloc: Prealloc = a.preallocation.as_deref().map(str::parse).transpose()?.unwrap_or_default();
        let (rel, num) = match a.size.as_bytes().first() {
            Some(b'+') => (1i8, &a.size[1..]),
            Some(b'-') => (-1i8, &a.size[1..]),
            _ => (0, a.size.as_str()),
        };
        let n = engine::size::parse_size(num)?;
        let mut flags = common::flags(&a.open, true);
        flags.extra_perm = Perm::RESIZE;
        if a.open.force_share {
            return Err(invalid("force-share=on can only be used with read-only images"));
        }
        let shrink = a.shrink;
        let rt = common::small_runtime()?;
        rt.block_on(move || async move {
            let node = common::open(spec, flags).await?;
            let cur = node.size();
            let new = match rel {
                1 => cur.checked_add(n).ok_or_else(|| invalid("new size overflows"))?,
                -1 => cur.checked_sub(n).ok_or_else(|| invalid("Image size cannot be negative"))?,
                _ => n,
            };
            if new < cur && !shrink {
                eprintln!("ringblk: Use the --shrink option to perform a shrink operation.");
                return Err(invalid(
                    "warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
                ));
            }
            node.truncate(new, true, prealloc).await?;
            node.flush().await?;
            node.close().await
        })
    })();
    match r {
        Ok(()) => {
            if !a.quiet {
                println!("Image resized.");
            }
            0
        }
        Err(e) => common::fail(e),
    }
}
