//! `ringblk measure`: how big an image of a format would be for a given size or
//! source image (required and fully-allocated bytes).

use clap::Args;
use engine::error::{invalid, Result};
use engine::options::OptionTree;
use serde_json::json;

use crate::common::{self, OutputFormat};
use crate::OpenArgs;

#[derive(Args)]
pub struct MeasureArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Output format (default raw)
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    #[arg(short = 'o')]
    options: Vec<String>,
    #[arg(long, value_parser = common::parse_size_arg)]
    size: Option<u64>,
    /// Snapshot to measure (not supported for formats without snapshots)
    #[arg(short = 'l')]
    snapshot: Option<String>,
    filename: Option<String>,
}

/// (required, fully allocated) for `fmt` holding `size` bytes, of which
/// `data` bytes (whole clusters of the target) are allocated.
fn measure(fmt: &str, opts: &mut OptionTree, size: u64, data: u64) -> Result<(u64, u64)> {
    match fmt {
        "qcow2" => drivers::format::qcow2::measure::measure(opts, size, data),
        "raw" => {
            // Preallocation does not change a raw file's size, only its allocation.
            let _ = opts.take_parsed::<engine::block::Prealloc>("preallocation")?;
            opts.take("nocow");
            opts.take("extent_size_hint");
            opts.ensure_consumed("Block format 'raw'")?;
            Ok((size, size))
        }
        other => Err(invalid(format!("Format driver '{other}' does not support measure"))),
    }
}

pub fn run(a: MeasureArgs) -> i32 {
    let mut bitmaps = false;
    let r = (|| -> Result<(u64, u64)> {
        let mut opts = match common::join_opts(&a.options) {
            Some(s) => OptionTree::parse(&s, None)?,
            None => OptionTree::new(),
        };
        if nbd::registry().get(&a.out_format).is_none() {
            return Err(invalid(format!("Unknown file format '{}'", a.out_format)));
        }
        if a.snapshot.is_some() {
            return Err(invalid("snapshots are not supported by this image's format"));
        }
        let cluster = opts.get("cluster_size").map(engine::size::parse_size).transpose()?.unwrap_or(65536).max(512);
        let (size, data) = match (a.size, &a.filename) {
            (Some(_), Some(_)) => return Err(invalid("--size N cannot be used together with a filename")),
            (Some(s), None) => (s, 0),
            (None, None) => return Err(invalid("Either --size N or one filename must be specified")),
            (None, Some(f)) => {
                let spec = common::spec(&a.open, f)?;
                let flags = common::flags(&a.open, false);
                let rt = common::small_runtime()?;
                let (size, data, fmt) = rt.block_on(move || async move {
                    let n = common::open(spec, flags).await?;
                    let size = n.size();
                    let data = super::map::allocated_data(&n, cluster).await?;
                    Ok::<_, engine::Error>((size, data, n.driver()))
                })?;
                bitmaps = fmt == "qcow2";
                (size, data)
            }
        };
        measure(&a.out_format, &mut opts, size, data)
    })();
    match r {
        Ok((req, full)) => {
            match a.output {
                // qemu-img adds the size of persistent bitmaps for qcow2 sources.
                OutputFormat::Human if bitmaps => println!("required size: {req}\nfully allocated size: {full}\nbitmaps size: 0"),
                OutputFormat::Human => println!("required size: {req}\nfully allocated size: {full}"),
                OutputFormat::Json if bitmaps => println!(
                    "{}",
                    super::info::to_qemu_json(&json!({ "bitmaps": 0, "required": req, "fully-allocated": full }))
                ),
                OutputFormat::Json => {
                    println!("{}", super::info::to_qemu_json(&json!({ "required": req, "fully-allocated": full })))
                }
            }
            0
        }
        Err(e) => common::fail(e),
    }
}
