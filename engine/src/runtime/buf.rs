//! Aligned I/O buffers and the per-shard pool of them that is registered with the
//! shard's ring. Owns allocation and return-to-pool; it does not know about
//! operations: an in-flight operation keeps its buffer alive by owning it.

use std::alloc::Layout;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
        assert!(
            buf_size.is_multiple_of(BUF_ALIGN) && buf_size > 0,
            "pool buffer size must be a multiple of {BUF_ALIGN}"
        );
        let count = count.max(1);
        let base = map_huge(count * buf_size);
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

    /// The pool's memory as one region (start, bytes): what a driver maps
    /// for a device to reach every buffer of the pool (VFIO DMA).
    pub fn region(&self) -> (*const u8, usize) {
        (self.base.as_ptr(), self.count * self.buf_size)
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
        // SAFETY: mapped in new() with this length; every IoBuf holds an Arc to
        // the pool, so none is alive when the pool drops.
        unsafe { unmap_huge(self.base, self.count * self.buf_size) };
    }
}

/// The size of a transparent huge page on x86-64 and arm64 (4K base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Map `len` bytes (rounded up to whole huge pages) of zeroed anonymous
/// memory aligned to a huge page, and ask for transparent huge pages. I/O
/// buffers want them: a 4 KiB-page buffer is one DMA segment per page, and
/// devices take few (a loop device 128), so the block layer splits a 1 MiB
/// request of scattered pages in two; in huge pages it is 16 segments of
/// 64 KiB. Where THP is off, the mapping is ordinary memory.
fn map_huge(len: usize) -> NonNull<u8> {
    let len = len.max(1).next_multiple_of(HUGE_PAGE);
    let over = len + HUGE_PAGE;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        std::alloc::handle_alloc_error(Layout::from_size_align(len, HUGE_PAGE).expect("huge layout fits in isize"));
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    // SAFETY: the head [start, aligned) and the tail after aligned + len lie in
    // the mapping just made and nothing refers to them; the madvise range is
    // inside what remains.
    unsafe {
        if aligned > start {
            libc::munmap(p, aligned - start);
        }
        let tail = start + over - (aligned + len);
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8).expect("mmap never returns null on success")
}

/// # Safety
/// `base` and `len` must be a `map_huge` mapping that nothing refers to.
unsafe fn unmap_huge(base: NonNull<u8>, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { libc::munmap(base.as_ptr().cast(), len.max(1).next_multiple_of(HUGE_PAGE)) };
}

/// Buffers of 64 KiB to 32 MiB that no pool holds come from a process-wide
/// cache of huge-page-backed blocks in power-of-two sizes: blocks up to a
/// huge page are cut from huge pages, larger ones are mappings of their own.
/// A freed block goes back to its size's free list, so a request loop reuses
/// the same few blocks without a system call or a page fault.
const LARGE_MIN: usize = 64 << 10;
const LARGE_CLASSES: usize = 10; // 64 KiB << 0..=9, up to 32 MiB
/// Free blocks kept per size above a huge page; more are unmapped.
const LARGE_KEEP_BYTES: usize = 64 << 20;

static LARGE_FREE: [Mutex<Vec<usize>>; LARGE_CLASSES] = [const { Mutex::new(Vec::new()) }; LARGE_CLASSES];

fn large_class(len: usize) -> Option<usize> {
    if !(LARGE_MIN..=LARGE_MIN << (LARGE_CLASSES - 1)).contains(&len) {
        return None;
    }
    Some((len.next_power_of_two() / LARGE_MIN).trailing_zeros() as usize)
}

fn large_take(class: usize) -> NonNull<u8> {
    let size = LARGE_MIN << class;
    let mut free = LARGE_FREE[class].lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = free.pop() {
        return NonNull::new(p as *mut u8).expect("free list holds non-null blocks");
    }
    if size >= HUGE_PAGE {
        drop(free);
        return map_huge(size);
    }
    // Cut a fresh huge page into blocks of this size; keep the rest.
    let page = map_huge(HUGE_PAGE).as_ptr() as usize;
    free.extend((1..HUGE_PAGE / size).map(|i| page + i * size));
    NonNull::new(page as *mut u8).expect("map_huge never returns null")
}

fn large_give(class: usize, p: NonNull<u8>) {
    let size = LARGE_MIN << class;
    let mut free = LARGE_FREE[class].lock().unwrap_or_else(|e| e.into_inner());
    if size > HUGE_PAGE && (free.len() + 1) * size > LARGE_KEEP_BYTES {
        drop(free);
        // SAFETY: a block above a huge page is a mapping of its own, and the
        // buffer that held it is gone.
        unsafe { unmap_huge(p, size) };
        return;
    }
    free.push(p.as_ptr() as usize);
}

enum Origin {
    /// `IoBuf::empty()`: no memory.
    Empty,
    Heap,
    /// A block of the large-buffer cache, of size class `class`.
    Large {
        class: usize,
    },
    Pool {
        pool: Arc<BufPool>,
        index: u32,
    },
    /// A private file mapping of its own (`IoBuf::from_mapping`), unmapped on drop.
    Mapping {
        base: NonNull<u8>,
        len: usize,
    },
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
        if let Some(class) = large_class(len) {
            return IoBuf { ptr: large_take(class), cap: LARGE_MIN << class, len, origin: Origin::Large { class } };
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
            Origin::Large { class } => large_give(*class, self.ptr),
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
    fn large_buffers_come_back_for_reuse_and_never_overlap() {
        assert_eq!(large_class(64 << 10), Some(0));
        assert_eq!(large_class((64 << 10) + 1), Some(1));
        assert_eq!(large_class(32 << 20), Some(9));
        assert_eq!(large_class((32 << 20) + 1), None);
        assert_eq!(large_class(4096), None);
        let mut held: Vec<IoBuf> = (0..40).map(|i| IoBuf::new(300_000 + i * 1000)).collect();
        let mut spans: Vec<(usize, usize)> = held.iter().map(|b| (b.as_ptr() as usize, b.capacity())).collect();
        for b in &mut held {
            assert_eq!(b.capacity(), 512 << 10);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            b.fill(0xa5);
        }
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "blocks overlap: {w:?}");
        }
        drop(held);
        let big = IoBuf::new(3 << 20);
        assert_eq!((big.capacity(), big.as_ptr() as usize % HUGE_PAGE), (4 << 20, 0));
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
