//! `ringblk amend`: change format options of an existing image.

use clap::Args;
use engine::error::{invalid, Result};
use engine::options::OptionTree;

use crate::common;
use crate::OpenArgs;

#[derive(Args)]
pub struct AmendArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// Options to change (key=val,...; may repeat)
    #[arg(short = 'o', required = true)]
    options: Vec<String>,
    /// Cache mode
    #[arg(short = 't')]
    cache: Option<String>,
    /// Allow changes that may lose data (accepted for compatibility)
    #[arg(long)]
    force: bool,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
}

pub fn run(a: AmendArgs) -> i32 {
    let r = (|| -> Result<()> {
        let spec = common::spec(&a.open, &a.filename)?;
        let opts = OptionTree::parse(&common::join_opts(&a.options).unwrap_or_default(), None)?;
        if opts.contains("help") {
            return super::create::print_help(a.open.format.as_deref().unwrap_or("qcow2"));
        }
        if a.open.force_share {
            return Err(invalid("force-share=on can only be used with read-only images"));
        }
        let mut flags = common::flags(&a.open, true);
        flags.extra_perm = engine::block::Perm::RESIZE;
        if let Some(c) = &a.cache {
            flags.cache = c.parse()?;
        }
        let rt = common::small_runtime()?;
        rt.block_on(move || async move {
            let node = common::open(spec, flags).await?;
            node.amend(opts).await?;
            node.close().await
        })
    })();
    r.map_or_else(common::fail, |()| 0)
}
