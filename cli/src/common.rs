//! What every subcommand shares: turning a filename (plain, `json:{}` or
//! `--image-opts`) and flags into an option tree, opening it on a runtime,
//! printing errors the way qemu-img users expect, and output format selection.

use std::sync::Arc;

use engine::block::{open_image, BlockNode, OpenCtx, OpenFlags};
use engine::error::{invalid, Error, Result};
use engine::options::OptionTree;
use engine::runtime::{Runtime, RuntimeConfig};

use crate::OpenArgs;

/// Print an error as `ringblk: message`.
pub fn report(e: &Error) {
    eprintln!("ringblk: {e}");
}

/// Exit status of a command that failed with `e`.
pub fn fail(e: Error) -> i32 {
    report(&e);
    1
}

/// `--output=human|json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// Build the option tree for an image argument.
pub fn image_spec(filename: &str, format: Option<&str>, image_opts: bool) -> Result<OptionTree> {
    let mut t = if image_opts {
        if format.is_some() {
            return Err(invalid("--image-opts and -f are mutually exclusive"));
        }
        OptionTree::parse(filename, Some("file.filename"))?
    } else if let Some(json) = filename.strip_prefix("json:") {
        OptionTree::from_json(json)?
    } else {
        let mut t = OptionTree::new();
        t.set("file.filename", filename);
        t
    };
    if let Some(f) = format {
        t.set_default("driver", f);
    }
    Ok(t)
}

/// The option tree for the image argument of a command with the shared
/// open arguments (its `--object`s checked first).
pub fn spec(args: &OpenArgs, filename: &str) -> Result<OptionTree> {
    objects(args)?;
    image_spec(filename, args.format.as_deref(), args.image_opts)
}

/// Define the command line's `--object`s (process-wide, as in QEMU).
pub fn objects(args: &OpenArgs) -> Result<()> {
    engine::objects::define_all(&args.objects)
}

/// Open an image on the current shard.
pub async fn open(spec: OptionTree, flags: OpenFlags) -> Result<Arc<dyn BlockNode>> {
    let ctx = OpenCtx::new(nbd::registry(), flags);
    open_image(&ctx, spec).await
}

/// A runtime with one shard, for commands that do little I/O.
pub fn small_runtime() -> Result<Runtime> {
    Runtime::new(RuntimeConfig { shards: 1, pin: false, buffers: 16, ..Default::default() })
}

/// A runtime with a shard per core, for copy commands (which use their own
/// large buffers, so each shard's registered pool stays tiny).
pub fn full_runtime() -> Result<Runtime> {
    Runtime::new(RuntimeConfig { buffers: 8, ..Default::default() })
}

/// Flags for opening an image per the shared arguments.
pub fn flags(args: &OpenArgs, write: bool) -> OpenFlags {
    OpenFlags { write, force_share: args.force_share, ..Default::default() }
}

pub fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    engine::size::parse_size(s).map_err(|e| e.to_string())
}

/// Join repeated `-o` options.
pub fn join_opts(v: &[String]) -> Option<String> {
    if v.is_empty() {
        None
    } else {
        Some(v.join(","))
    }
}
