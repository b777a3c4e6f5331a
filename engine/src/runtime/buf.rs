//! Aligned I/O buffers and the per-shard pool of them that is registered with the
//! shard's ring. Owns allocation and return-to-pool; it does not know about
//! operations: an in-flight operation keeps its buffer alive by owning it.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

/// Alignment of every buffer: enough for O_DIRECT on any device we meet
/// (logical block sizes are at most 4096) and for NVMe PRPs.
pub const BUF_ALIGN: usize = 4096;

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// One contiguous, page-aligned region cut into equal buffers. The region is
/// registered with one ring as `count` fixed buffers, so a pool buffer's index is
/// its `buf_index` for READ_FIXED/WRITE_FIXED on that ring.
pub struct BufPool {
    id: u64,
    base: NonNull<u8>,
    buf_size: usize,
    count: usize,
    free: ArrayQueue<u32>,
}

// SAFETY: the region is plain memory; each buffer index is handed out to at most
// one IoBuf at a time through the lock-free `free` queue, so no two owners alias.
unsafe impl Send for BufPool {}
// SAFETY: as above; shared access only touches the atomic queue.
unsafe impl Sync for BufPool {}

impl BufPool {
    pub fn new(count: usize, buf_size: usize) -> Arc<BufPool> {
        assert!(buf_size.is_multiple_of(BUF_ALIGN) && buf_size > 0, "pool buffer size must be a multiple of {BUF_ALIGN}");
        let count = count.max(1);
        let layout = Layout::from_size_align(count * buf_size, BUF_ALIGN).expect("pool layout fits in isize");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let base = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let free = ArrayQueue::new(count);
        for i in 0..count as u32 {
            free.push(i).expect("queue sized to count");
        }
        Arc::new(BufPool { id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed), base, buf_size, count, free })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Buffers currently free (not owned by any IoBuf).
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// The iovecs to register with a ring, index i = buffer i.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.count)
            .map(|i| libc::iovec {
                // SAFETY: i < count, so the offset stays inside the allocation.
                iov_base: unsafe { self.base.as_ptr().add(i * self.buf_size) }.cast(),
                iov_len: self.buf_size,
            })
            .collect()
    }

    /// Take a buffer of `len` bytes, or None when the pool is empty or `len` too big.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<IoBuf> {
        if len > self.buf_size {
            return None;
        }
        let index = self.free.pop()?;
        // SAFETY: index < count, inside the allocation.
        let ptr = unsafe { self.base.as_ptr().add(index as usize * self.buf_size) };
        Some(IoBuf {
            ptr: NonNull::new(ptr).expect("pool base is non-null"),
            cap: self.buf_size,
            len,
            origin: Origin::Pool { pool: self.clone(), index },
        })
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.count * self.buf_size, BUF_ALIGN).expect("same layout as new");
        // SAFETY: allocated in new() with this layout; every IoBuf holds an Arc to the
        // pool, so none is alive when the pool drops.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
    }
}

enum Origin {
    /// `IoBuf::empty()`: no memory.
    Empty,
    Heap,
    Pool { pool: Arc<BufPool>, index: u32 },
    /// A private file mapping of its own (`IoBuf::from_mapping`), unmapped on drop.
    Mapping { base: NonNull<u8>, len: usize },
}

/// An owned, page-aligned byte buffer. Operations take it by value and give it
/// back with their result (the rent model), so the kernel never writes memory
/// nobody owns.
pub struct IoBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    origin: Origin,
}

// SAFETY: IoBuf owns its memory exclusively (heap allocation or a pool slot that
// is out of the free queue), like a Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// An aligned buffer from the current shard's pool when it fits, else the
    /// heap. Its contents are unspecified (a pool buffer holds what its last
    /// user left): use `zeroed` when that matters.
    pub fn new(len: usize) -> IoBuf {
        if let Some(b) = crate::runtime::try_pool_buf(len) {
            return b;
        }
        IoBuf::heap(len)
    }

    /// An aligned buffer of zeroes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut b = IoBuf::new(len);
        b.fill(0);
        b
    }

    /// A zeroed aligned heap buffer (never from a pool).
    pub fn heap(len: usize) -> IoBuf {
        let cap = len.max(1).next_multiple_of(BUF_ALIGN);
        let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("buffer layout fits in isize");
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf { ptr, cap, len, origin: Origin::Heap }
    }

    /// A buffer of no bytes that owns no memory: a placeholder to swap in
    /// while the real buffer is lent to an operation.
    pub fn empty() -> IoBuf {
        IoBuf { ptr: NonNull::<u64>::dangling().cast(), cap: 0, len: 0, origin: Origin::Empty }
    }

    /// Adopt a private file mapping (`mmap(MAP_PRIVATE)`, readable and
    /// writable) of `map_len` bytes at `base` as a buffer of the `len` bytes at
    /// `start` in it. The page cache's pages are the buffer's memory until
    /// someone writes to it, which copies the page privately (the file never
    /// changes). Reads the kernel serves from it, such as a write(2) from this
    /// buffer, copy straight from the source file's cache.
    ///
    /// # Safety
    /// `base..base + map_len` must be such a mapping, used by nothing else; the
    /// buffer unmaps it when dropped. `start + len <= map_len`.
    pub unsafe fn from_mapping(base: NonNull<u8>, map_len: usize, start: usize, len: usize) -> IoBuf {
        assert!(start + len <= map_len, "mapped buffer beyond its mapping");
        // SAFETY: in bounds of the mapping (asserted).
        let ptr = unsafe { NonNull::new_unchecked(base.as_ptr().add(start)) };
        IoBuf { ptr, cap: len, len, origin: Origin::Mapping { base, len: map_len } }
    }

    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the visible length (must not exceed capacity). Bytes exposed by growing
    /// hold whatever the buffer held before.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len {len} beyond capacity {}", self.cap);
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The fixed-buffer index for a ring that registered pool `pool_id`.
    pub fn fixed_index(&self, pool_id: u64) -> Option<u16> {
        match &self.origin {
            Origin::Pool { pool, index } if pool.id == pool_id => u16::try_from(*index).ok(),
            _ => None,
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, initialised (zeroed at alloc).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Empty => {}
            Origin::Heap => {
                let layout = Layout::from_size_align(self.cap, BUF_ALIGN).expect("same layout as alloc");
                // SAFETY: allocated in heap() with this layout, owned only by us.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
            }
            Origin::Pool { pool, index } => {
                // The pool was sized to hold every index, so the push cannot fail.
                let _ = pool.free.push(*index);
            }
            Origin::Mapping { base, len } => {
                // SAFETY: the mapping was given to us whole in from_mapping and
                // nothing else refers to it once the buffer is gone.
                unsafe { libc::munmap(base.as_ptr().cast(), *len) };
            }
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf(len={}, cap={})", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_each_buffer_once_and_takes_it_back() {
        let pool = BufPool::new(2, 4096);
        let a = pool.take(100).unwrap();
        let b = pool.take(4096).unwrap();
        assert!(pool.take(1).is_none());
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(a.as_ptr() as usize % BUF_ALIGN, 0);
        drop(a);
        assert_eq!(pool.available(), 1);
        assert!(pool.take(8192).is_none(), "too big for the pool");
        drop(b);
        assert_eq!(pool.available(), 2);
    }

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        let b = IoBuf::heap(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
    }
}
