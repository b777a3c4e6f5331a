//! `blkdebug`: a filter that fails chosen requests, for testing error paths the
//! way QEMU's blkdebug is used: `driver=blkdebug,image.filename=x,
//! inject-error.0.iotype=read,inject-error.0.sector=8,inject-error.0.errno=5`.
//! A rule matches requests of its `iotype` (read, write, write-zeroes, discard,
//! flush, block-status; default: read and write) that cover `sector` (512-byte
//! units; default: any); `once=on` disarms it after the first hit. Everything
//! else passes through to the `image` child unchanged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use engine::block::{
    open_image, BlockNode, BoxFuture, Child, Driver, DriverKind, Extent, Limits, OpenCtx, Prealloc, WriteFlags, ZeroFlags,
};
use engine::error::{invalid, Error, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl std::str::FromStr for IoType {
    type Err = Error;
    fn from_str(s: &str) -> Result<IoType> {
        Ok(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return Err(invalid(format!("blkdebug: invalid iotype '{s}'"))),
        })
    }
}

struct Rule {
    iotypes: Vec<IoType>,
    sector: Option<u64>,
    errno: i32,
    once: bool,
    spent: AtomicBool,
}

pub struct BlkdebugNode {
    image: Arc<dyn BlockNode>,
    rules: Vec<Rule>,
}

impl BlkdebugNode {
    fn check(&self, io: IoType, offset: u64, len: u64) -> Result<()> {
        for r in &self.rules {
            if !r.iotypes.contains(&io) || r.spent.load(Ordering::Relaxed) {
                continue;
            }
            let hit = match r.sector {
                None => true,
                Some(s) => {
                    let at = s * 512;
                    at < offset + len.max(1) && offset < at + 512
                }
            };
            if hit && !(r.once && r.spent.swap(true, Ordering::Relaxed)) {
                let at = r.sector.map_or(offset, |s| (s * 512).max(offset));
                return Err(Error::errno("injected error", r.errno).with_file(self.image.filename()).at(at));
            }
        }
        Ok(())
    }
}

impl BlockNode for BlkdebugNode {
    fn driver(&self) -> &'static str {
        "blkdebug"
    }
    fn filename(&self) -> String {
        self.image.filename()
    }
    fn size(&self) -> u64 {
        self.image.size()
    }
    fn limits(&self) -> Limits {
        self.image.limits()
    }
    fn read_only(&self) -> bool {
        self.image.read_only()
    }
    fn children(&self) -> Vec<Child> {
        vec![Child { role: "image", node: self.image.clone() }]
    }
    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = self.check(IoType::Read, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            self.image.read(offset, buf).await
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = self.check(IoType::Write, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            self.image.write(offset, buf, flags).await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check(IoType::WriteZeroes, offset, len)?;
            self.image.write_zeroes(offset, len, flags).await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check(IoType::Discard, offset, len)?;
            self.image.discard(offset, len).await
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.check(IoType::Flush, 0, 0)?;
            self.image.flush().await
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            self.check(IoType::BlockStatus, offset, len)?;
            self.image.block_status(offset, len).await
        })
    }
    fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        self.image.truncate(size, exact, prealloc)
    }
}

pub struct BlkdebugDriver;

/// The most rules one node takes (a bound on what options can allocate).
const MAX_RULES: usize = 64;

impl Driver for BlkdebugDriver {
    fn name(&self) -> &'static str {
        "blkdebug"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }
    fn open_filter<'a>(&'a self, ctx: &'a OpenCtx, mut opts: OptionTree) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move {
            let mut rules = Vec::new();
            for i in 0..MAX_RULES {
                let mut r = opts.take_subtree(&format!("inject-error.{i}"));
                if r.is_empty() {
                    continue;
                }
                // QEMU's rules also name a block-layer event; any is accepted here.
                r.take("event");
                r.take("state");
                r.take("immediately");
                let iotypes = match r.take("iotype") {
                    Some(t) => vec![t.parse()?],
                    None => vec![IoType::Read, IoType::Write],
                };
                let sector = r.take("sector").map(|s| s.parse::<u64>()).transpose().map_err(|_| invalid("blkdebug: invalid sector"))?;
                let errno = r.take("errno").map(|s| s.parse::<i32>()).transpose().map_err(|_| invalid("blkdebug: invalid errno"))?.unwrap_or(libc::EIO);
                if errno <= 0 {
                    return Err(invalid("blkdebug: errno must be positive"));
                }
                let once = r.take_bool("once")?.unwrap_or(false);
                r.ensure_consumed(&format!("blkdebug rule inject-error.{i}"))?;
                rules.push(Rule { iotypes, sector, errno, once, spent: AtomicBool::new(false) });
            }
            let image_opts = opts.take_subtree("image");
            opts.ensure_consumed("The 'blkdebug' filter")?;
            let image = open_image(ctx, image_opts).await?;
            Ok(Arc::new(BlkdebugNode { image, rules }) as Arc<dyn BlockNode>)
        })
    }
}
