//! `ringblk compare`: are two images' guest-visible contents the same? Exit codes
//! as qemu-img documents: 0 identical, 1 different, 2 open error, 3 block status
//! error, 4 read error.

use std::sync::Arc;

use clap::Args;
use engine::block::{BlockNode, OpenFlags};
use engine::error::{Error, Result};
use engine::runtime::IoBuf;

use crate::common;
use crate::progress::Progress;

const CHUNK: u64 = 2 << 20;

#[derive(Args)]
pub struct CompareArgs {
    /// First image's format
    #[arg(short = 'f')]
    format1: Option<String>,
    /// Second image's format
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict: sizes and allocation must match too
    #[arg(short = 's')]
    strict: bool,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode for both images
    #[arg(short = 'T', default_value = "writeback")]
    cache: String,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "object")]
    objects: Vec<String>,
    filename1: String,
    filename2: String,
}

enum Outcome {
    Identical,
    Differ(String),
    Fail(i32, Error),
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Read [off, off+len) of `node` into the buffer kept in `slot` (taken for the
/// read and always put back), naming the file and offset on error.
async fn read_into<'b>(node: &dyn BlockNode, off: u64, len: u64, slot: &'b mut Option<IoBuf>) -> Result<&'b IoBuf> {
    let mut buf = slot.take().expect("compare buffers are always put back");
    buf.set_len(len as usize);
    let (r, buf) = node.read(off, buf).await;
    let buf = slot.insert(buf);
    r.map_err(|e| Error::new(e.kind(), format!("error while reading offset {off}: {}", e.detail())).with_file(node.filename()))?;
    Ok(buf)
}

fn chunk_buf() -> Option<IoBuf> {
    Some(IoBuf::heap(CHUNK as usize))
}

/// Check that [off, end) of `node` reads as zeroes; returns the first non-zero offset.
async fn check_zero(node: &dyn BlockNode, mut off: u64, end: u64, p: &Progress) -> std::result::Result<Option<u64>, (i32, Error)> {
    let mut buf = chunk_buf();
    while off < end {
        let e = node.block_status(off, (end - off).min(CHUNK)).await.map_err(|e| (3, e))?;
        if !e.is_zero_hole() {
            let b = read_into(node, off, e.len, &mut buf).await.map_err(|e| (4, e))?;
            if let Some(i) = b.iter().position(|&x| x != 0) {
                return Ok(Some(off + (i as u64 / 512 * 512)));
            }
        }
        p.add(e.len);
        off += e.len;
    }
    Ok(None)
}

async fn compare(n1: Arc<dyn BlockNode>, n2: Arc<dyn BlockNode>, strict: bool, p: Arc<Progress>) -> Outcome {
    let (s1, s2) = (n1.size(), n2.size());
    if strict && s1 != s2 {
        return Outcome::Differ("Strict mode: Image size mismatch!".into());
    }
    if s1 != s2 && !p.quiet() {
        println!("Warning: Image size mismatch!");
    }
    let common = s1.min(s2);
    let (mut b1, mut b2) = (chunk_buf(), chunk_buf());
    let mut off = 0;
    while off < common {
        // Strict mode compares whole extents, as qemu-img does: the status and
        // the extent length must agree.
        let lim = if strict { common - off } else { (common - off).min(CHUNK) };
        let e1 = match n1.block_status(off, lim).await {
            Ok(e) => e,
            Err(e) => return Outcome::Fail(3, e),
        };
        let e2 = match n2.block_status(off, lim).await {
            Ok(e) => e,
            Err(e) => return Outcome::Fail(3, e),
        };
        let n = e1.len.min(e2.len).min(CHUNK);
        if strict && (e1.allocated, e1.data, e1.zero, e1.len) != (e2.allocated, e2.data, e2.zero, e2.len) {
            return Outcome::Differ(format!("Strict mode: Offset {off} block status mismatch!"));
        }
        let (z1, z2) = (e1.is_zero_hole(), e2.is_zero_hole());
        if !(z1 && z2) {
            let mismatch = if z1 || z2 {
                // One side is a known hole: the other must read as zeroes.
                let (node, buf) = if z1 { (&n2, &mut b2) } else { (&n1, &mut b1) };
                match read_into(&**node, off, n, buf).await {
                    Ok(b) => b.iter().position(|&x| x != 0),
                    Err(e) => return Outcome::Fail(4, e),
                }
            } else {
                let x = match read_into(&*n1, off, n, &mut b1).await {
                    Ok(b) => b,
                    Err(e) => return Outcome::Fail(4, e),
                };
                let y = match read_into(&*n2, off, n, &mut b2).await {
                    Ok(b) => b,
                    Err(e) => return Outcome::Fail(4, e),
                };
                first_diff(x, y)
            };
            if let Some(i) = mismatch {
                return Outcome::Differ(format!("Content mismatch at offset {}!", off + (i as u64 / 512 * 512)));
            }
        }
        p.add(n);
        off += n;
    }
    if s1 != s2 {
        let bigger = if s1 > s2 { &n1 } else { &n2 };
        match check_zero(&**bigger, common, s1.max(s2), &p).await {
            Ok(Some(o)) => return Outcome::Differ(format!("Content mismatch at offset {o}!")),
            Ok(None) => {}
            Err((c, e)) => return Outcome::Fail(c, e),
        }
    }
    Outcome::Identical
}

pub fn run(a: CompareArgs) -> i32 {
    let setup = (|| -> Result<_> {
        engine::objects::define_all(&a.objects)?;
        let s1 = common::image_spec(&a.filename1, a.format1.as_deref(), a.image_opts)?;
        let s2 = common::image_spec(&a.filename2, a.format2.as_deref(), a.image_opts)?;
        let cache: engine::block::CacheMode = a.cache.parse()?;
        Ok((s1, s2, cache, common::small_runtime()?))
    })();
    let (s1, s2, cache, rt) = match setup {
        Ok(x) => x,
        Err(e) => {
            common::report(&e);
            return 2;
        }
    };
    let flags = OpenFlags { force_share: a.force_share, cache, ..Default::default() };
    let (strict, show, quiet) = (a.strict, a.progress && !a.quiet, a.quiet);
    let out = rt.block_on(move || async move {
        let n1 = match common::open(s1, flags.clone()).await {
            Ok(n) => n,
            Err(e) => return Outcome::Fail(2, e),
        };
        let n2 = match common::open(s2, flags).await {
            Ok(n) => n,
            Err(e) => return Outcome::Fail(2, e),
        };
        let p = Progress::new(n1.size().max(n2.size()), show).with_quiet(quiet);
        let r = compare(n1, n2, strict, p.clone()).await;
        p.finish();
        r
    });
    match out {
        Outcome::Identical => {
            if !a.quiet {
                println!("Images are identical.");
            }
            0
        }
        Outcome::Differ(msg) => {
            if !a.quiet {
                println!("{msg}");
            }
            1
        }
        Outcome::Fail(code, e) => {
            common::report(&e);
            code
        }
    }
}
