//! `ringblk dd`: copy `count` blocks of `bs` bytes, skipping `skip` blocks of the
//! input, into a newly created output image, as `qemu-img dd` does.

use clap::Args;
use engine::block::{OpenFlags, WriteFlags};
use engine::error::{invalid, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;

use crate::common;
use crate::OpenArgs;

#[derive(Args)]
pub struct DdArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// Output format (default raw)
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// bs=BLOCK_SIZE count=BLOCKS skip=BLOCKS if=INPUT of=OUTPUT
    #[arg(required = true)]
    operands: Vec<String>,
}

struct Operands {
    bs: u64,
    count: Option<u64>,
    skip: u64,
    input: String,
    output: String,
}

fn parse(ops: &[String]) -> Result<Operands> {
    let (mut bs, mut count, mut skip, mut input, mut output) = (512, None, 0, None, None);
    for op in ops {
        let (k, v) = op.split_once('=').ok_or_else(|| invalid(format!("unrecognized operand {op}")))?;
        match k {
            "bs" => {
                bs = engine::size::parse_size(v)?;
                if bs == 0 {
                    return Err(invalid(format!("invalid number: '{v}'")));
                }
            }
            "count" => count = Some(engine::size::parse_size(v)?),
            "skip" => skip = engine::size::parse_size(v)?,
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            _ => return Err(invalid(format!("unrecognized operand {op}"))),
        }
    }
    Ok(Operands {
        bs,
        count,
        skip,
        input: input.ok_or_else(|| invalid("Must specify both input and output files"))?,
        output: output.ok_or_else(|| invalid("Must specify both input and output files"))?,
    })
}

pub fn run(a: DdArgs) -> i32 {
    let r = (|| -> Result<()> {
        common::objects(&a.open)?;
        let ops = parse(&a.operands)?;
        let spec = common::image_spec(&ops.input, a.open.format.as_deref(), a.open.image_opts)?;
        let src_flags = common::flags(&a.open, false);
        let fmt = a.out_format.clone();
        let rt = common::small_runtime()?;
        rt.block_on(move || async move {
            let src = common::open(spec, src_flags).await?;
            let start = ops.skip.checked_mul(ops.bs).ok_or_else(|| invalid("skip overflows"))?;
            if start > src.size() {
                return Err(invalid(format!("cannot skip to specified offset ({start} > {})", src.size())));
            }
            // As qemu-img dd does, `count` blocks are counted from the start of
            // the input, skipped ones included.
            let end = ops.count.map_or(src.size(), |c| c.saturating_mul(ops.bs).min(src.size()));
            let len = end.saturating_sub(start);
            let mut o = OptionTree::new();
            o.set("size", len.to_string());
            super::create::create_image(&fmt, &ops.output, o, true).await?;
            let dst = common::open(common::image_spec(&ops.output, Some(&fmt), false)?, OpenFlags { write: true, ..Default::default() }).await?;
            let step = (1u64 << 20).div_ceil(ops.bs) * ops.bs;
            let mut buf = IoBuf::heap(step as usize);
            let mut done = 0;
            while done < len {
                let n = step.min(len - done);
                buf.set_len(n as usize);
                let (r, b) = src.read(start + done, buf).await;
                r.map_err(|e| e.at(start + done))?;
                let (r, b) = dst.write(done, b, WriteFlags::default()).await;
                r?;
                buf = b;
                done += n;
            }
            dst.flush().await?;
            dst.close().await
        })
    })();
    r.map_or_else(common::fail, |()| 0)
}
