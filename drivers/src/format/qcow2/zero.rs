//! write_zeroes (zero flags, unmapping, or written zeroes where the image
//! cannot say "zero") and discard (`discard=unmap` punches the freed host
//! clusters) for qcow2. Like `io.rs`, this only changes cached entries.

use engine::block::{check_write, BlockNode, WriteFlags, ZeroFlags};
use engine::error::{Error, ErrorKind, Result};
use engine::runtime::IoBuf;

use super::io::{sub_mask, MAX_ALLOC_BATCH};
use super::layout::{self, Mapping, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::Qcow2;

impl Qcow2 {
    pub(super) async fn do_write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let r = self.zeroes_inner(offset, len, flags).await;
        match r {
            Err(e) if e.kind() == ErrorKind::Corrupt => Err(self.mark_corrupt(e).await),
            r => r.map_err(|e| self.err(e)),
        }
    }

    /// Reads of [g, g+n) already return zeroes without touching anything here.
    async fn reads_zero(&self, g: u64, n: u64) -> Result<bool> {
        let mut pos = g;
        while pos < g + n {
            let (m, k) = self.map(pos, g + n - pos).await?;
            let zero = match m {
                Mapping::Zero { .. } => true,
                Mapping::Unallocated => self.backing.as_ref().is_none_or(|b| pos >= b.size()),
                _ => false,
            };
            if !zero {
                return Ok(false);
            }
            pos += k;
        }
        Ok(true)
    }

    /// Zero a range the zero flags cannot express, by writing zeroes.
    async fn zero_by_writing(&self, g: u64, n: u64, fua: bool, no_fallback: bool) -> Result<()> {
        if n == 0 || self.reads_zero(g, n).await? {
            return Ok(());
        }
        if no_fallback {
            return Err(Error::new(ErrorKind::Unsupported, "zeroing this range needs writing zeroes"));
        }
        let mut b = IoBuf::zeroed(n as usize);
        self.write_inner(g, &mut b, 0..n as usize, WriteFlags { fua }).await
    }

    async fn zeroes_inner(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_write(self, offset, len)?;
        self.check_not_corrupt()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        if self.data_file_raw() {
            // The data file must stay a valid raw image: zero it there.
            return self.data().write_zeroes(offset, len, flags).await;
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        if !geo.zero_flag && !geo.extended_l2 {
            // v2: no zero flag. Write zeroes where reads would not give them.
            let mut pos = offset;
            while pos < end {
                let n = (end - pos).min(MAX_ALLOC_BATCH);
                self.zero_by_writing(pos, n, false, flags.no_fallback).await?;
                pos += n;
            }
            return self.finish_fua(flags.fua).await;
        }
        let gran = geo.subcluster_size();
        // Image sizes need not be cluster multiples: the last partial cluster
        // counts as whole.
        let size = self.size();
        let a = offset.next_multiple_of(gran);
        let b = if end == size { end.next_multiple_of(gran) } else { end - end % gran };
        if a >= b {
            self.zero_by_writing(offset, len, false, flags.no_fallback).await?;
            return self.finish_fua(flags.fua).await;
        }
        self.zero_by_writing(offset, a - offset, false, flags.no_fallback).await?;
        if b < end {
            self.zero_by_writing(b, end - b, false, flags.no_fallback).await?;
        }
        let mut pos = a;
        while pos < b {
            let c0 = geo.cluster_start(pos);
            let span = geo.l2_span();
            let stop = b.min((c0 / span + 1) * span).min(c0 + MAX_ALLOC_BATCH.max(cs));
            self.zero_clusters(pos, stop, flags).await?;
            pos = stop;
        }
        self.finish_fua(flags.fua).await
    }

    async fn finish_fua(&self, fua: bool) -> Result<()> {
        if fua {
            self.flush().await
        } else {
            self.writeback_if_needed().await
        }
    }

    /// Zero [a, b) (granule aligned, within one L2 table) by entry flags.
    async fn zero_clusters(&self, a: u64, b: u64, flags: ZeroFlags) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let sc = geo.subcluster_size();
        let c0 = geo.cluster_start(a);
        let _lock = self.cluster_locks.begin(c0, b.next_multiple_of(cs), true).await;
        let l1i = geo.l1_index(layout::Guest(c0));
        let no_backing = self.backing.as_ref().is_none_or(|bk| a >= bk.size());
        if self.l2_table(l1i)?.0 == 0 && no_backing {
            return Ok(()); // unallocated without a backing file: already zero
        }
        let l2off = self.ensure_l2(l1i).await?;
        self.before_allocation().await?;
        let mut c = c0;
        while c < b {
            let za = a.max(c) - c;
            let zb = b.min(c + cs) - c;
            let (e, bm) = self.entry(c).await?.unwrap_or((0, 0));
            if geo.extended_l2 {
                let mask = sub_mask(sc, za, zb);
                if e & OFLAG_COMPRESSED != 0 && mask != u32::MAX {
                    // Part of a compressed cluster: rewrite it uncompressed.
                    drop(_lock);
                    return self.zero_by_writing_range(c + za, c + zb, a, b, flags).await;
                }
                let keep_alloc = (bm as u32) & !mask;
                let mut new_e = if e & OFLAG_COMPRESSED != 0 { 0 } else { e };
                let mut freed = None;
                if e & OFLAG_COMPRESSED != 0 {
                    freed = Some(e);
                } else if keep_alloc == 0 && flags.may_unmap && layout::std_host_cluster(e).is_some() && e & OFLAG_COPIED != 0 {
                    freed = Some(e);
                    new_e = 0;
                }
                let zero = ((bm >> 32) as u32) | mask;
                self.set_entry(l1i, l2off, c, |_, _| (new_e, u64::from(keep_alloc) | (u64::from(zero) << 32))).await?;
                if let Some(old) = freed {
                    self.release(old, true);
                }
            } else {
                let host = layout::std_host_cluster(e);
                let keep = !flags.may_unmap && host.is_some() && e & OFLAG_COPIED != 0 && !self.has_data_file();
                let new_e = if keep || (self.has_data_file() && e & OFLAG_COPIED != 0) {
                    (e & (layout::L2E_OFFSET_MASK | OFLAG_COPIED)) | OFLAG_ZERO
                } else {
                    OFLAG_ZERO
                };
                if e != new_e {
                    self.set_entry(l1i, l2off, c, |_, _| (new_e, 0)).await?;
                    if new_e & layout::L2E_OFFSET_MASK == 0 {
                        self.release(e, true);
                    }
                }
            }
            c += cs;
        }
        Ok(())
    }

    async fn zero_by_writing_range(&self, s: u64, e: u64, a: u64, b: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_by_writing(s, e - s, false, flags.no_fallback).await?;
        if e < b {
            Box::pin(self.zero_clusters(e.max(a), b, flags)).await?;
        }
        Ok(())
    }

    pub(super) async fn do_discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(self, offset, len).map_err(|e| self.err(e))?;
        if !self.opts.discard_unmap || len == 0 {
            return Ok(());
        }
        self.check_not_corrupt()?;
        let r = self.discard_inner(offset, len).await;
        match r {
            Err(e) if e.kind() == ErrorKind::Corrupt => Err(self.mark_corrupt(e).await),
            r => r.map_err(|e| self.err(e)),
        }
    }

    async fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let gran = geo.subcluster_size();
        let size = self.size();
        let end = offset + len;
        let a = offset.next_multiple_of(gran);
        let b = if end == size { end.next_multiple_of(gran) } else { end - end % gran };
        if a >= b {
            return Ok(());
        }
        let has_backing = self.backing.is_some();
        if has_backing && !geo.zero_flag && !geo.extended_l2 {
            return Ok(()); // v2 cannot hide the backing file's data
        }
        let mut pos = a;
        while pos < b {
            let c0 = geo.cluster_start(pos);
            let span = geo.l2_span();
            let stop = b.min((c0 / span + 1) * span).min(c0 + MAX_ALLOC_BATCH.max(cs));
            let _lock = self.cluster_locks.begin(c0, stop.next_multiple_of(cs), true).await;
            let l1i = geo.l1_index(layout::Guest(c0));
            let (mut l2off, _) = self.l2_table(l1i)?;
            if l2off == 0 {
                if !has_backing {
                    pos = stop; // nothing allocated, nothing behind: reads zero already
                    continue;
                }
                // The backing file's data must stop showing through.
                l2off = self.ensure_l2(l1i).await?;
            }
            let mut c = c0;
            while c < stop {
                let za = pos.max(c) - c;
                let zb = stop.min(c + cs) - c;
                let (e, bm) = self.entry(c).await?.unwrap_or((0, 0));
                if geo.extended_l2 {
                    let mask = sub_mask(gran, za, zb);
                    if mask == u32::MAX {
                        let zero = if has_backing { u64::from(u32::MAX) << 32 } else { 0 };
                        if (e, bm) != (0, zero) {
                            self.set_entry(l1i, l2off, c, |_, _| (0, zero)).await?;
                            self.release(e, true);
                        }
                    } else if e & OFLAG_COMPRESSED == 0 {
                        let alloc = (bm as u32) & !mask;
                        let zero = if has_backing { ((bm >> 32) as u32) | mask } else { ((bm >> 32) as u32) & !mask };
                        self.set_entry(l1i, l2off, c, |e, _| (e, u64::from(alloc) | (u64::from(zero) << 32))).await?;
                    }
                } else if za == 0 && zb == cs {
                    let new_e = if has_backing { OFLAG_ZERO } else { 0 };
                    if e != new_e {
                        self.set_entry(l1i, l2off, c, |_, _| (new_e, 0)).await?;
                        if self.has_data_file() {
                            if let Some(h) = layout::std_host_cluster(e).or((e & OFLAG_COPIED != 0).then_some(c)) {
                                self.data().discard(h, cs.min(self.data().size().saturating_sub(h))).await.ok();
                            }
                        } else {
                            self.release(e, true);
                        }
                    }
                }
                c += cs;
            }
            pos = stop;
        }
        self.writeback_if_needed().await
    }

    // ---- block status ----

}
