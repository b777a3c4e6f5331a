//! DMA memory for the NVMe driver: the IOVA allocator over the ranges the
//! IOMMU reports, driver-owned mapped regions (queues, PRP lists, Identify
//! data, bounce buffers), and the lookup that turns a buffer's address into
//! the IOVA the device must use, or refuses a buffer that is not mapped.
//! Queue logic lives in queue.rs; this file knows only memory.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use engine::error::{invalid, Error, ErrorKind, Result};

use super::vfio::{Container, IovaRange};

/// The page size we run the controller with (CC.MPS = 0) and map in.
pub const PAGE: usize = 4096;

/// Where mapped memory is, for the device.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    vaddr: usize,
    len: usize,
    iova: u64,
    /// Driver-owned memory (queues, PRP lists, bounce buffers), which any
    /// queue may point a command at; a shard's pool is not: only that
    /// shard's queue, which knows its pool, translates into it.
    shared: bool,
}

/// The container plus an IOVA allocator and the table of what is mapped.
pub struct Dma {
    pub container: Container,
    state: Mutex<DmaState>,
}

struct DmaState {
    /// Next free IOVA per range (bump allocation).
    next: Vec<(IovaRange, u64)>,
    /// IOVA ranges given back (iova, length): reused for a mapping of the
    /// same length (bounce buffers come in powers of two, queues in a few
    /// sizes), or given back to `next` when they were the last handed out.
    free: Vec<(u64, usize)>,
    maps: Vec<Mapping>,
}

impl Dma {
    pub fn new(container: Container) -> Arc<Dma> {
        let next = container
            .iova_ranges
            .iter()
            // Keep IOVA 0 and the first page out of it: a zero address
            // in a command is more likely a bug than a buffer.
            .map(|r| (*r, r.start.max(0x10_0000).next_multiple_of(PAGE as u64)))
            .collect();
        Arc::new(Dma { container, state: Mutex::new(DmaState { next, free: Vec::new(), maps: Vec::new() }) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DmaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Map `len` bytes at `vaddr` (page aligned) at a free IOVA. `shared`:
    /// driver memory any queue may use (see `translate`).
    pub fn map(&self, vaddr: *const u8, len: usize, shared: bool) -> Result<u64> {
        let len = len.next_multiple_of(PAGE);
        let mut st = self.lock();
        let iova = if let Some(i) = st.free.iter().position(|&(_, l)| l == len) {
            st.free.swap_remove(i).0
        } else {
            let slot = st
                .next
                .iter_mut()
                .find(|(r, n)| n.checked_add(len as u64).is_some_and(|end| end - 1 <= r.end))
                .ok_or_else(|| {
                    Error::new(ErrorKind::NoSpace, format!("no IOVA space left for {len} bytes of DMA memory"))
                })?;
            slot.1 += len as u64;
            slot.1 - len as u64
        };
        if let Err(e) = self.container.map_dma(vaddr, iova, len) {
            st.free.push((iova, len));
            return Err(e);
        }
        st.maps.push(Mapping { vaddr: vaddr as usize, len, iova, shared });
        Ok(iova)
    }

    /// Unmap what `map` mapped at `iova`.
    pub fn unmap(&self, iova: u64) {
        let mut st = self.lock();
        let Some(i) = st.maps.iter().position(|m| m.iova == iova) else { return };
        let m = st.maps.swap_remove(i);
        // Unmapping can only fail if the device was torn down under us;
        // the memory is still ours to free either way.
        let _ = self.container.unmap_dma(m.iova, m.len);
        if let Some(slot) = st.next.iter_mut().find(|(_, n)| *n == m.iova + m.len as u64) {
            slot.1 = m.iova;
        } else {
            st.free.push((m.iova, m.len));
        }
    }

    /// The IOVA of `len` bytes at `vaddr`, all inside one mapping of driver
    /// memory, or None. Shards' pools are left out: a buffer of another
    /// shard's pool could be sent here while that shard unmaps its pool.
    pub fn translate(&self, vaddr: *const u8, len: usize) -> Option<u64> {
        let a = vaddr as usize;
        self.lock()
            .maps
            .iter()
            .find(|m| m.shared && a >= m.vaddr && a.checked_add(len).is_some_and(|e| e <= m.vaddr + m.len))
            .map(|m| m.iova + (a - m.vaddr) as u64)
    }
}

/// Anonymous memory of whole pages, mapped for the device as long as it lives.
pub struct DmaBuf {
    dma: Arc<Dma>,
    ptr: NonNull<u8>,
    len: usize,
    pub iova: u64,
}

// SAFETY: plain memory that the DmaBuf owns; who writes where is up to the
// queue code, which is shard-local.
unsafe impl Send for DmaBuf {}
// SAFETY: as for Send.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    pub fn new(dma: &Arc<Dma>, len: usize) -> Result<DmaBuf> {
        let len = len.max(1).next_multiple_of(PAGE);
        // SAFETY: a fresh private anonymous mapping; checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::os(&format!("DMA memory of {len} bytes"), std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast()).expect("mmap succeeded, so not null");
        match dma.map(ptr.as_ptr(), len, true) {
            Ok(iova) => Ok(DmaBuf { dma: dma.clone(), ptr, len, iova }),
            Err(e) => {
                // SAFETY: our mapping, never handed out.
                unsafe { libc::munmap(p, len) };
                Err(e)
            }
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// The bytes, for the driver's own reads and writes of memory the
    /// device is not using at the time (Identify data after completion,
    /// bounce buffers around a command).
    ///
    /// # Safety
    /// No command that writes this memory may be in flight.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: len bytes of our mapping; the caller rules out device writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
    /// # Safety
    /// No command that reads or writes this memory may be in flight.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: len bytes of our mapping; the caller rules out device
        // access and other references.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        self.dma.unmap(self.iova);
        // SAFETY: our mapping; the device can no longer reach it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The PRP entries for `len` bytes at `iova` (first entry may be offset into
/// its page; the rest are page aligned). `list` receives the PRP list when
/// the transfer spans more than two pages; its IOVA is `list_iova`. Returns
/// (PRP1, PRP2).
pub fn build_prps(iova: u64, len: usize, list: &mut [u64], list_iova: u64) -> Result<(u64, u64)> {
    if len == 0 {
        return Err(invalid("a data transfer of 0 bytes"));
    }
    if !iova.is_multiple_of(4) {
        return Err(invalid(format!("DMA address {iova:#x} is not dword aligned")));
    }
    let page = PAGE as u64;
    let first = page - (iova % page);
    if len as u64 <= first {
        return Ok((iova, 0));
    }
    let second = (iova / page + 1) * page;
    let rest = len as u64 - first;
    if rest <= page {
        return Ok((iova, second));
    }
    let pages = rest.div_ceil(page) as usize;
    if pages > list.len() {
        return Err(invalid(format!(
            "a transfer of {len} bytes needs {pages} PRP entries, more than the {} a list holds",
            list.len()
        )));
    }
    for (i, e) in list.iter_mut().take(pages).enumerate() {
        *e = (second + i as u64 * page).to_le();
    }
    Ok((iova, list_iova))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prps_for_one_two_and_many_pages() {
        let mut list = [0u64; 512];
        assert_eq!(build_prps(0x10_0000, 4096, &mut list, 0x9000).unwrap(), (0x10_0000, 0));
        assert_eq!(build_prps(0x10_0200, 512, &mut list, 0x9000).unwrap(), (0x10_0200, 0));
        // Crossing one page boundary: PRP2 is the second page itself.
        assert_eq!(build_prps(0x10_0200, 4096, &mut list, 0x9000).unwrap(), (0x10_0200, 0x10_1000));
        assert_eq!(build_prps(0x10_0000, 8192, &mut list, 0x9000).unwrap(), (0x10_0000, 0x10_1000));
        // Three pages and more: PRP2 points at the list of pages 2..
        assert_eq!(build_prps(0x10_0000, 3 * 4096, &mut list, 0x9000).unwrap(), (0x10_0000, 0x9000));
        assert_eq!(&list[..2], &[0x10_1000u64.to_le(), 0x10_2000u64.to_le()]);
        let (_, p2) = build_prps(0x20_0800, 64 * 1024, &mut list, 0xa000).unwrap();
        assert_eq!(p2, 0xa000);
        assert_eq!(u64::from_le(list[15]), 0x20_0000 + 16 * 4096);
        assert!(build_prps(0x10_0000, 4 << 20, &mut list, 0x9000).is_err(), "more entries than a list page");
        assert!(build_prps(0x10_0002, 512, &mut list, 0x9000).is_err(), "PRPs must be dword aligned");
    }
}
