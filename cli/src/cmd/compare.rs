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

async fn read(node: &dyn BlockNode, off: u64, len: u64, buf: IoBuf) -> std::result::Result<IoBuf, (Error, IoBuf)> {
    let mut buf = buf;
    buf.set_len(len as usize);
    let (r, buf) = node.read(off, buf).await;
    match r {
        Ok(()) => Ok(buf),
        Err(e) => Err((Error::new(e.kind(), format!("error while reading offset {off}: {}", e.detail())).with_file(node.filename()), buf)),
    }
}

/// Check that [off, end) of `node` reads as zeroes; returns the first non-zero offset.
async fn check_zero(node: &dyn BlockNode, mut off: u64, end: u64, p: &Progress) -> std::result::Result<Option<u64>, (i32, Error)> {
    let mut buf = IoBuf::heap(CHUNK as usize);
    while off < end {
        let e = node.block_status(off, (end - off).min(CHUNK)).await.map_err(|e| (3, e))?;
        if !e.is_zero_hole() {
            let b = read(node, off, e.len, buf).await.map_err(|(e, _)| (4, e))?;
            if let Some(i) = b.iter().position(|&x| x != 0) {
                return Ok(Some(off + (i as u64 / 512 * 512)));
            }
            buf = b;
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
    let (mut b1, mut b2) = (IoBuf::heap(CHUNK as usize), IoBuf::heap(CHUNK as usize));
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
                let (node, buf) = if z1 { (&n2, &mut b2) } else { (&n1, &mut b1) };
                let b = std::mem::replace(buf, IoBuf::heap(0));
                match read(&**node, off, n, b).await {
                    Ok(b) => {
                        let r = b.iter().position(|&x| x != 0);
                        *buf = b;
                        r
                    }
                    Err((e, _)) => return Outcome::Fail(4, e),
                }
            } else {
                let x = std::mem::replace(&mut b1, IoBuf::heap(0));
                let y = std::mem::replace(&mut b2, IoBuf::heap(0));
                let x = match read(&*n1, off, n, x).await {
                    Ok(b) => b,
                    Err((e, _)) => return Outcome::Fail(4, e),
                };
                let y = match read(&*n2, off, n, y).await {
                    Ok(b) => b,
                    Err((e, _)) => return Outcome::Fail(4, e),
                };
                let r = first_diff(&x, &y);
                b1 = x;
                b2 = y;
                r
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
        let mut secrets = engine::secret::Secrets::default();
        for o in &a.objects {
            secrets.add_object(o)?;
        }
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
