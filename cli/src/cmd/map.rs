//! `ringblk map`: the allocation map of an image, merged into runs, printed as
//! qemu-img prints it (human table of mapped data, or one JSON object per run).

use std::sync::Arc;

use clap::Args;
use engine::block::BlockNode;
use engine::error::Result;

use crate::common::{self, OutputFormat};
use crate::OpenArgs;

#[derive(Args)]
pub struct MapArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    #[arg(long = "start-offset", value_parser = common::parse_size_arg, default_value = "0")]
    start_offset: u64,
    #[arg(long = "max-length", value_parser = common::parse_size_arg)]
    max_length: Option<u64>,
    filename: String,
}

/// One run of the map.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
    pub filename: String,
}

impl Run {
    fn extends(&self, next: &Run) -> bool {
        self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    pub fn json(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

/// Bytes of guest data (not zero) anywhere in the chain, counted in whole
/// clusters of `cluster` bytes as qemu-img's measure counts them.
pub async fn allocated_data(node: &Arc<dyn BlockNode>, cluster: u64) -> Result<u64> {
    let size = node.size();
    let mut off = 0;
    let mut total = 0;
    while off < size {
        let (e, _, _) = engine::block::chain_status(node, off, size - off).await?;
        let mut n = e.len;
        if !e.zero && e.data {
            // Extend to the end of the cluster; count from the cluster's start.
            n = (off + n).next_multiple_of(cluster) - off;
            total += off % cluster + n;
        }
        off += n;
    }
    Ok(total)
}

/// Collect the merged runs of [start, end).
pub async fn runs(node: &Arc<dyn BlockNode>, start: u64, end: u64) -> Result<Vec<Run>> {
    let mut out: Vec<Run> = Vec::new();
    let mut off = start;
    while off < end {
        let (e, depth, file_name) = engine::block::chain_status(node, off, end - off).await?;
        let run = Run {
            start: off,
            length: e.len,
            depth,
            present: e.allocated || e.data,
            zero: e.zero,
            data: e.data,
            compressed: e.compressed,
            offset: e.offset,
            filename: file_name,
        };
        match out.last_mut() {
            Some(last) if last.extends(&run) => last.length += run.length,
            _ => out.push(run),
        }
        off += e.len;
    }
    Ok(out)
}

fn hex(v: u64) -> String {
    // C's "%#x" prints 0 without the prefix.
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

pub fn run(a: MapArgs) -> i32 {
    let spec = match common::spec(&a.open, &a.filename) {
        Ok(s) => s,
        Err(e) => return common::fail(e),
    };
    let rt = match common::small_runtime() {
        Ok(r) => r,
        Err(e) => return common::fail(e),
    };
    let flags = common::flags(&a.open, false);
    let (start, max_len) = (a.start_offset, a.max_length);
    let r = rt.block_on(move || async move {
        let node = common::open(spec, flags).await?;
        let size = node.size();
        let end = max_len.map_or(size, |m| start.saturating_add(m).min(size));
        runs(&node, start.min(size), end).await
    });
    let runs = match r {
        Ok(r) => r,
        Err(e) => return common::fail(e),
    };
    match a.output {
        OutputFormat::Json => {
            let body: Vec<String> = runs.iter().map(Run::json).collect();
            println!("[{}]", body.join(",\n"));
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for r in runs.iter().filter(|r| r.data) {
                if let Some(o) = r.offset {
                    println!("{:<16}{:<16}{:<16}{}", hex(r.start), hex(r.length), hex(o), r.filename);
                }
            }
        }
    }
    0
}
