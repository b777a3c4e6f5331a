//! `ringblk check`: ask the format to check its metadata (and repair with
//! `-r`), print the result as qemu-img does (human or ImageCheck JSON), and
//! exit with qemu-img's codes: 0 clean, 1 check failed, 2 corruptions left,
//! 3 only leaks left, 63 the format cannot be checked.

use clap::Args;
use engine::block::{CheckFix, CheckReport, OpenFlags};
use engine::error::{ErrorKind, Result};
use serde_json::{json, Map, Value};

use crate::cmd::info::to_qemu_json;
use crate::common::{self, OutputFormat};
use crate::OpenArgs;

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    open: OpenArgs,
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Repair: "leaks" or "all"
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Cache mode for the image
    #[arg(short = 'T')]
    cache: Option<String>,
    #[arg(short = 'q')]
    quiet: bool,
    filename: String,
}

fn print_human(r: &CheckReport, quiet: bool) {
    let mut out = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        out.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            out.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            out.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            out.push_str(&format!("\n{} internal errors have occurred during the check.\n", r.check_errors));
        }
    }
    let (total, alloc) = (r.total_clusters.unwrap_or(0), r.allocated_clusters.unwrap_or(0));
    if total != 0 && alloc != 0 {
        let pct = |a: u64, b: u64| a as f64 * 100.0 / b as f64;
        out.push_str(&format!(
            "{alloc}/{total} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            pct(alloc, total),
            pct(r.fragmented_clusters.unwrap_or(0), alloc),
            pct(r.compressed_clusters.unwrap_or(0), alloc)
        ));
    }
    if let Some(e) = r.image_end_offset {
        out.push_str(&format!("Image end offset: {e}\n"));
    }
    if !quiet {
        print!("{out}");
    }
}

fn to_json(r: &CheckReport, filename: &str, format: &str) -> Value {
    // Keys in the order qemu-img prints them.
    let mut m = Map::new();
    if let Some(e) = r.image_end_offset {
        m.insert("image-end-offset".into(), json!(e));
    }
    if let Some(t) = r.total_clusters {
        m.insert("total-clusters".into(), json!(t));
    }
    if r.corruptions > 0 {
        m.insert("corruptions".into(), json!(r.corruptions));
    }
    if let Some(c) = r.compressed_clusters.filter(|&c| c > 0) {
        m.insert("compressed-clusters".into(), json!(c));
    }
    m.insert("check-errors".into(), json!(r.check_errors));
    if r.leaks_fixed > 0 {
        m.insert("leaks-fixed".into(), json!(r.leaks_fixed));
    }
    if r.corruptions_fixed > 0 {
        m.insert("corruptions-fixed".into(), json!(r.corruptions_fixed));
    }
    if r.leaks > 0 {
        m.insert("leaks".into(), json!(r.leaks));
    }
    if let Some(a) = r.allocated_clusters.filter(|&a| a > 0) {
        m.insert("allocated-clusters".into(), json!(a));
    }
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(format));
    if let Some(f) = r.fragmented_clusters.filter(|&f| f > 0) {
        m.insert("fragmented-clusters".into(), json!(f));
    }
    Value::Object(m)
}

pub fn run(a: CheckArgs) -> i32 {
    let fix = match a.repair.as_deref() {
        None => CheckFix::default(),
        Some("leaks") => CheckFix { leaks: true, errors: false },
        Some("all") => CheckFix { leaks: true, errors: true },
        Some(o) => {
            eprintln!("ringblk: Unknown option for -r: '{o}' (expected leaks or all)");
            return 1;
        }
    };
    let repairing = fix.leaks || fix.errors;
    let spec = match common::spec(&a.open, &a.filename) {
        Ok(s) => s,
        Err(e) => return common::fail(e),
    };
    let rt = match common::small_runtime() {
        Ok(r) => r,
        Err(e) => return common::fail(e),
    };
    let mut flags: OpenFlags = common::flags(&a.open, repairing);
    flags.repair = true;
    if let Some(c) = &a.cache {
        match c.parse() {
            Ok(m) => flags.cache = m,
            Err(e) => return common::fail(e),
        }
    }
    let r: Result<(CheckReport, String, String)> = rt.block_on(move || async move {
        let node = common::open(spec, flags).await?;
        let first = node.check(fix).await?;
        for m in &first.messages {
            eprintln!("{m}");
        }
        let mut report = first.clone();
        if repairing && first.corruptions_fixed + first.leaks_fixed > 0 {
            if a.output == OutputFormat::Human && !a.quiet {
                println!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                    first.leaks_fixed, first.corruptions_fixed
                );
            }
            let second = node.check(CheckFix::default()).await?;
            for m in &second.messages {
                eprintln!("{m}");
            }
            report = CheckReport { leaks_fixed: first.leaks_fixed, corruptions_fixed: first.corruptions_fixed, ..second };
        }
        if repairing {
            node.close().await?;
        }
        Ok((report, node.filename(), node.driver().to_string()))
    });
    let (report, filename, format) = match r {
        Ok(x) => x,
        Err(e) if e.kind() == ErrorKind::Unsupported && e.to_string().contains("does not support checks") => {
            eprintln!("ringblk: This image format does not support checks");
            return 63;
        }
        Err(e) => {
            eprintln!("ringblk: Check failed: {e}");
            return 1;
        }
    };
    match a.output {
        OutputFormat::Human => print_human(&report, a.quiet),
        OutputFormat::Json => println!("{}", to_qemu_json(&to_json(&report, &filename, &format))),
    }
    if report.check_errors > 0 {
        1
    } else if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}
