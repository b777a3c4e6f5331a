//! The `raw` format: the guest sees the file child's bytes, optionally a window of
//! them (`offset=`, `size=`). When the format was probed rather than named, a write
//! that would make sector 0 look like another format is refused, as QEMU does, so a
//! guest cannot turn its disk into, say, a qcow2 image pointing at host files.

use std::ops::Range;
use std::sync::Arc;

use engine::block::{
    check_request, check_write, BlockNode, BoxFuture, Child, CreateOpt, Driver, DriverKind, Extent, Limits, OpenCtx,
    Prealloc, Registry, WriteFlags, ZeroFlags,
};
use engine::error::{invalid, Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;

const SECTOR: u64 = 512;

pub struct RawNode {
    file: Arc<dyn BlockNode>,
    offset: u64,
    /// Fixed window size from `size=`, else the file's size minus `offset`.
    fixed_size: Option<u64>,
    probed: bool,
    registry: Arc<Registry>,
}

impl RawNode {
    /// For a probed image, refuse a write whose sector 0 would probe as a format.
    async fn check_sector0(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.probed || offset >= SECTOR {
            return Ok(());
        }
        let end = (offset + buf.len() as u64).min(SECTOR);
        let mut sector = vec![0u8; SECTOR.min(self.size()) as usize];
        if !(offset == 0 && end as usize == sector.len()) {
            let cur = engine::block::read_vec(self, 0, sector.len()).await?;
            sector.copy_from_slice(&cur);
        }
        let n = (end - offset) as usize;
        sector[offset as usize..offset as usize + n].copy_from_slice(&buf[..n]);
        if let Some(d) = self.registry.probe_format(&sector, &self.file.filename()) {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "refusing to write a '{}' header to sector 0 of an image whose raw format was probed; name the format with -f raw",
                    d.name()
                ),
            )
            .with_file(self.file.filename()));
        }
        Ok(())
    }
}

impl BlockNode for RawNode {
    fn driver(&self) -> &'static str {
        "raw"
    }
    fn filename(&self) -> String {
        self.file.filename()
    }
    fn size(&self) -> u64 {
        self.fixed_size.unwrap_or_else(|| self.file.size().saturating_sub(self.offset))
    }
    fn limits(&self) -> Limits {
        self.file.limits()
    }
    fn read_only(&self) -> bool {
        self.file.read_only()
    }
    fn children(&self) -> Vec<Child> {
        vec![Child { role: "file", node: self.file.clone() }]
    }

    fn read(&self, offset: u64, buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_request(self, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            self.file.read(offset + self.offset, buf).await
        })
    }

    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_write(self, offset, buf.len() as u64) {
                return (Err(e), buf);
            }
            if let Err(e) = self.check_sector0(offset, &buf).await {
                return (Err(e), buf);
            }
            self.file.write(offset + self.offset, buf, flags).await
        })
    }

    fn read_part(&self, offset: u64, buf: IoBuf, range: Range<usize>) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_request(self, offset, range.len() as u64) {
                return (Err(e), buf);
            }
            self.file.read_part(offset + self.offset, buf, range).await
        })
    }

    fn write_part(&self, offset: u64, buf: IoBuf, range: Range<usize>, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            if let Err(e) = check_write(self, offset, range.len() as u64) {
                return (Err(e), buf);
            }
            if let Err(e) = self.check_sector0(offset, &buf[range.clone()]).await {
                return (Err(e), buf);
            }
            self.file.write_part(offset + self.offset, buf, range, flags).await
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            self.file.write_zeroes(offset + self.offset, len, flags).await
        })
    }

    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            check_write(self, offset, len)?;
            self.file.discard(offset + self.offset, len).await
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        self.file.flush()
    }

    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move {
            let size = self.size();
            if offset >= size {
                return Err(invalid(format!("block status at offset {offset} beyond end ({size})")));
            }
            let mut e = self.file.block_status(offset + self.offset, len.min(size - offset)).await?;
            e.offset = Some(offset + self.offset);
            Ok(e)
        })
    }

    fn passthrough_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        self.file.passthrough_fd().map(|(fd, base)| (fd, base + self.offset))
    }

    fn cached_extent(&self, offset: u64, len: u64) -> Option<(std::os::fd::RawFd, u64)> {
        if offset.checked_add(len)? > self.size() {
            return None;
        }
        self.file.cached_extent(offset + self.offset, len)
    }

    fn write_now(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        // A probed image's sector 0 goes through `check_sector0` (write_part).
        if self.probed && offset < SECTOR || offset.checked_add(data.len() as u64)? > self.size() {
            return None;
        }
        self.file.write_now(offset + self.offset, data)
    }

    fn pipe_writable(&self, offset: u64, len: u64) -> bool {
        // A probed image's sector 0 is checked before it is written
        // (`check_sector0`), which needs the bytes in memory.
        !(self.probed && offset < SECTOR)
            && offset.checked_add(len).is_some_and(|end| end <= self.size()) && self.file.pipe_writable(offset + self.offset, len)
    }

    fn write_pipe_now(&self, offset: u64, pipe: &engine::net::Pipe, len: usize) -> Option<Result<()>> {
        if !self.pipe_writable(offset, len as u64) {
            return None;
        }
        self.file.write_pipe_now(offset + self.offset, pipe, len)
    }

    fn write_pipe(&self, offset: u64, pipe: engine::net::Pipe, len: usize) -> BoxFuture<'_, (Result<()>, engine::net::Pipe)> {
        self.file.write_pipe(offset + self.offset, pipe, len)
    }

    fn map_cached(&self, offset: u64, len: usize) -> Option<IoBuf> {
        if offset.checked_add(len as u64)? > self.size() {
            return None;
        }
        self.file.map_cached(offset + self.offset, len)
    }

    fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.fixed_size.is_some() {
                return Err(Error::new(ErrorKind::Unsupported, "Cannot resize fixed-size raw disks").with_file(self.filename()));
            }
            let total = size.checked_add(self.offset).ok_or_else(|| invalid("size overflows with the raw offset"))?;
            self.file.truncate(total, exact, prealloc).await
        })
    }
}

pub struct RawDriver;

impl Driver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    // Raw is the fallback, never a probe winner.
    fn probe(&self, _header: &[u8], _filename: &str) -> u32 {
        0
    }

    fn open_format<'a>(
        &'a self,
        ctx: &'a OpenCtx,
        mut opts: OptionTree,
        file: Arc<dyn BlockNode>,
        probed: bool,
    ) -> BoxFuture<'a, Result<Arc<dyn BlockNode>>> {
        Box::pin(async move {
            let offset = opts.take_size("offset")?.unwrap_or(0);
            let fixed_size = opts.take_size("size")?;
            opts.ensure_consumed("Block format 'raw'")?;
            let fsize = file.size();
            if offset > fsize {
                return Err(invalid(format!("offset ({offset}) cannot be greater than size of the containing file ({fsize})"))
                    .with_file(file.filename()));
            }
            if let Some(s) = fixed_size {
                if offset.checked_add(s).is_none_or(|end| end > fsize) {
                    return Err(invalid(format!(
                        "The sum of offset ({offset}) and size ({s}) has to be smaller or equal to the actual size of the containing file ({fsize})"
                    ))
                    .with_file(file.filename()));
                }
            }
            if probed && ctx.flags.write {
                (ctx.warn)(&format!(
                    "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.",
                    file.filename()
                ));
            }
            Ok(Arc::new(RawNode { file, offset, fixed_size, probed, registry: ctx.registry.clone() }) as Arc<dyn BlockNode>)
        })
    }

    fn create_opts(&self) -> &'static [CreateOpt] {
        // raw adds nothing of its own: the protocol creates the file.
        crate::protocol::file::FILE_CREATE_OPTS
    }

    fn create<'a>(&'a self, ctx: &'a OpenCtx, filename: &'a str, opts: OptionTree) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let proto = ctx
                .registry
                .probe_protocol(filename)
                .ok_or_else(|| invalid(format!("no protocol driver for '{filename}'")))?;
            proto.create(ctx, filename, opts).await
        })
    }
}
