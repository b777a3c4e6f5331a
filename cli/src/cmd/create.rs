//! `ringblk create`: make a new image with a format's create options.

use clap::Args;
use engine::block::{OpenCtx, OpenFlags};
use engine::error::{invalid, Result};
use engine::options::OptionTree;

use crate::common;

#[derive(Args)]
pub struct CreateArgs {
    /// Image format (default raw)
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Format options (key=val,...; "help" lists them); may repeat
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Backing file
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Unsafe: do not open the backing file to check it
    #[arg(short = 'u')]
    unsafe_backing: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(long = "object")]
    objects: Vec<String>,
    /// Required unless -o help
    filename: Option<String>,
    #[arg(value_parser = common::parse_size_arg)]
    size: Option<u64>,
}

/// Print a driver's create options as `-o help` does.
pub fn print_help(fmt: &str) -> Result<()> {
    let reg = nbd::registry();
    let d = reg.get(fmt).ok_or_else(|| invalid(format!("Unknown file format '{fmt}'")))?;
    println!("Supported {fmt} options:");
    for o in d.create_opts() {
        println!("  {:<24}- {}", format!("{}=<{}>", o.name, o.ty), o.help);
    }
    Ok(())
}

/// Create `filename` as `fmt` with options `opts` (size included).
/// `open_backing` false is `-u`: the backing file is not opened to check it.
pub async fn create_image(fmt: &str, filename: &str, opts: OptionTree, open_backing: bool) -> Result<()> {
    let reg = nbd::registry();
    let d = reg.get(fmt).ok_or_else(|| invalid(format!("Unknown file format '{fmt}'")))?;
    let ctx = OpenCtx::new(reg.clone(), OpenFlags { write: true, follow_backing: open_backing, ..Default::default() });
    d.create(&ctx, filename, opts).await
}

/// "Formatting 'x', fmt=raw size=N ..." line.
pub fn formatting_line(fmt: &str, filename: &str, opts: &OptionTree) -> String {
    let mut s = format!("Formatting '{filename}', fmt={fmt}");
    if fmt == "qcow2" {
        // qemu-img's order, with the defaults it always shows.
        const ORDER: &[(&str, Option<&str>)] = &[
            ("cluster_size", Some("65536")),
            ("extended_l2", Some("off")),
            ("preallocation", None),
            ("compression_type", Some("zlib")),
            ("size", None),
            ("compat", None),
            ("backing_file", None),
            ("backing_fmt", None),
            ("data_file", None),
            ("data_file_raw", None),
            ("lazy_refcounts", Some("off")),
            ("refcount_bits", Some("16")),
            ("nocow", None),
            ("extent_size_hint", None),
        ];
        for (k, def) in ORDER {
            let v = match (*k, opts.get(k)) {
                ("cluster_size" | "extent_size_hint", Some(v)) => {
                    engine::size::parse_size(v).map_or_else(|_| v.to_string(), |n| n.to_string())
                }
                (_, Some(v)) => match engine::options::parse_bool(v) {
                    Some(b) if ["extended_l2", "lazy_refcounts", "data_file_raw", "nocow"].contains(k) => {
                        (if b { "on" } else { "off" }).to_string()
                    }
                    _ => v.to_string(),
                },
                (_, None) => match def {
                    Some(d) => d.to_string(),
                    None => continue,
                },
            };
            s.push_str(&format!(" {k}={v}"));
        }
        return s;
    }
    if let Some(size) = opts.get("size") {
        s.push_str(&format!(" size={size}"));
    }
    for (k, v) in opts.iter().filter(|(k, _)| *k != "size") {
        s.push_str(&format!(" {k}={v}"));
    }
    s
}

pub fn run(a: CreateArgs) -> i32 {
    let r = (|| -> Result<i32> {
        engine::objects::define_all(&a.objects)?;
        let mut opts = match common::join_opts(&a.options) {
            Some(s) => OptionTree::parse(&s, Some("help"))?,
            None => OptionTree::new(),
        };
        if opts.take("help").is_some() || opts.get("?").is_some() {
            print_help(&a.format)?;
            return Ok(0);
        }
        let filename = a.filename.clone().ok_or_else(|| invalid("Expecting image file name"))?;
        if let Some(b) = &a.backing {
            opts.set("backing_file", b.clone());
        }
        if let Some(f) = &a.backing_fmt {
            opts.set("backing_fmt", f.clone());
        }
        match a.size {
            Some(s) => opts.set("size", s.to_string()),
            None if opts.contains("size") => {
                let s = opts.take_size("size")?.expect("present");
                opts.set("size", s.to_string());
            }
            // Without a size, a format with a backing file takes the backing
            // file's (unless -u forbids opening it).
            None if opts.contains("backing_file") && !a.unsafe_backing => {}
            None => return Err(invalid("Image creation needs a size parameter")),
        }
        let reg = nbd::registry();
        let d = reg.get(&a.format).ok_or_else(|| invalid(format!("Unknown file format '{}'", a.format)))?;
        if opts.contains("backing_file") && !d.create_opts().iter().any(|o| o.name == "backing_file") {
            return Err(invalid(format!("Backing file not supported for file format '{}'", a.format)));
        }
        if !a.quiet {
            println!("{}", formatting_line(&a.format, &filename, &opts));
        }
        let rt = common::small_runtime()?;
        let fmt = a.format.clone();
        let follow = !a.unsafe_backing;
        rt.block_on(move || async move { create_image(&fmt, &filename, opts, follow).await })?;
        Ok(0)
    })();
    r.unwrap_or_else(common::fail)
}
