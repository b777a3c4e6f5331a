//! Small Linux syscall wrappers the file protocol needs: block device ioctls,
//! direct-I/O alignment discovery, SEEK_DATA/SEEK_HOLE, fstat.

use std::io;
use std::os::fd::RawFd;

/// `_IO(0x12, 104)`: logical block size of a block device.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `_IOR(0x12, 114, u64)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `_IOR('f', 1, long)` / `_IOW('f', 2, long)`: inode flags.
const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;
const FS_NOCOW_FL: libc::c_long = 0x0080_0000;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: st is plain data that fstat fills.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        cvt(libc::fstat(fd, &mut st))?;
        Ok(st)
    }
}

pub fn is_block_device(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFBLK
}

pub fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the live local.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

pub fn block_device_sector_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the live local.
    cvt(unsafe { libc::ioctl(fd, BLKSSZGET, &mut size as *mut libc::c_int) })?;
    Ok(size as u32)
}

pub fn block_device_discard(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD reads two u64 from the live array.
    cvt(unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) }).map(drop)
}

/// (memory alignment, offset alignment) for O_DIRECT on a regular file, from
/// statx(STATX_DIOALIGN), when the filesystem reports it.
pub fn dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: stx is plain data statx fills; the empty path with AT_EMPTY_PATH
    // names fd itself.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::statx(fd, c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &mut stx);
        if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
            return None;
        }
        Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
    }
}

/// Find the smallest read size/offset alignment O_DIRECT accepts by trying reads,
/// for filesystems that do not report it. Returns 4096 when nothing can be learnt.
pub fn probe_dio_align(fd: RawFd) -> u32 {
    let buf = engine::runtime::IoBuf::heap(4096);
    for align in [512u32, 1024, 2048, 4096] {
        // SAFETY: reads at most `align` <= 4096 bytes into a live 4096-byte buffer.
        let r = unsafe { libc::pread(fd, buf.as_ptr() as *mut libc::c_void, align as usize, 0) };
        if r >= 0 {
            return align;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    4096
}

pub enum Seek {
    /// Data from the offset up to the given end.
    Data(u64),
    /// A hole from the offset up to the given end.
    Hole(u64),
}

/// SEEK_DATA/SEEK_HOLE around `off` on a file of `size` bytes.
pub fn seek_extent(fd: RawFd, off: u64, size: u64) -> io::Result<Seek> {
    // SAFETY: lseek has no memory arguments.
    let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data after `off`: a hole up to EOF.
            Some(libc::ENXIO) => Ok(Seek::Hole(size)),
            _ => Err(e),
        };
    }
    let data = data as u64;
    if data > off {
        return Ok(Seek::Hole(data.min(size)));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Seek::Data((hole as u64).min(size).max(off + 1)))
}

/// Set FS_NOCOW_FL (btrfs); a no-op error on filesystems without it is ignored by callers.
pub fn set_nocow(fd: RawFd) -> io::Result<()> {
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS/SETFLAGS read and write one long from the live local.
    unsafe {
        cvt(libc::ioctl(fd, FS_IOC_GETFLAGS, &mut flags as *mut libc::c_long))?;
        flags |= FS_NOCOW_FL;
        cvt(libc::ioctl(fd, FS_IOC_SETFLAGS, &flags as *const libc::c_long))?;
    }
    Ok(())
}

/// `cachestat(2)` (Linux 6.5): page cache statistics of a file range.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Is every page of [off, off+len) (page aligned) in the page cache? Asks
/// cachestat, which walks folios, not pages; kernels without it answer no.
fn all_cached(fd: RawFd, off: u64, len: u64) -> bool {
    cached_pages(fd, off, len).is_some_and(|n| n >= len / 4096)
}

/// How many of the pages of [off, off+len) are in the page cache (None when
/// the kernel has no cachestat).
fn cached_pages(fd: RawFd, off: u64, len: u64) -> Option<u64> {
    let range = CachestatRange { off, len };
    let mut cs = Cachestat::default();
    // SAFETY: the kernel reads `range` and fills `cs`, both live locals.
    let r = unsafe { libc::syscall(SYS_CACHESTAT, fd, &range as *const CachestatRange, &mut cs as *mut Cachestat, 0u32) };
    (r == 0).then_some(cs.nr_cache)
}

/// Whether ranges of a file are in the page cache, cheaply enough to ask
/// per request. Now and then the whole file is asked of cachestat; while the
/// answer is "all of it", each range is taken as cached without a system
/// call. That answer is trusted for a hundred times as long as asking took
/// (at least `TRUST_MIN`), so a huge file costs at most 1 % of a core. While
/// some of the file is not cached, each range is asked about on its own.
/// A page evicted inside the trust window is read from the disk by whoever
/// relies on the answer: a rare stall, never a wrong byte.
#[derive(Default)]
pub struct Residency {
    /// Whether the whole file was cached when last asked.
    all: Answer,
}

const TRUST_MIN: std::time::Duration = std::time::Duration::from_millis(500);

fn epoch() -> std::time::Instant {
    static E: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *E.get_or_init(std::time::Instant::now)
}

/// A yes or no worth asking for only now and then, shared by all threads:
/// the answer (low bit) and the time until which it holds (nanoseconds
/// since `epoch()`, the other bits).
#[derive(Default)]
struct Answer(std::sync::atomic::AtomicU64);

impl Answer {
    const fn new() -> Answer {
        Answer(std::sync::atomic::AtomicU64::new(0))
    }

    /// The answer, from `ask` (the answer and how long to trust it) when
    /// the last one has run out.
    fn get(&self, ask: impl FnOnce() -> (bool, std::time::Duration)) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = epoch().elapsed().as_nanos() as u64;
        let st = self.0.load(Relaxed);
        if now < st >> 1 {
            return st & 1 == 1;
        }
        let (yes, trust) = ask();
        self.0.store((now + trust.as_nanos() as u64) << 1 | u64::from(yes), Relaxed);
        yes
    }
}

impl Residency {
    /// Are all pages of [off, off+len) of `fd` (which is `size` bytes long)
    /// in the page cache?
    pub fn cached(&self, fd: RawFd, size: u64, off: u64, len: u64) -> bool {
        let page = page_size();
        let all = self.all.get(|| {
            let t = std::time::Instant::now();
            let pages = size.div_ceil(page);
            let all = cached_pages(fd, 0, pages * page).is_some_and(|n| n >= pages);
            (all, (t.elapsed() * 100).max(TRUST_MIN))
        });
        if all {
            return true;
        }
        let start = off - off % page;
        let end = (off + len).next_multiple_of(page);
        cached_pages(fd, start, end - start).is_some_and(|n| n >= (end - start) / page)
    }
}

/// The kernel's page size, for byte counts.
fn page_size() -> u64 {
    engine::page_size() as u64
}

/// Is the system's dirty page cache (dirty plus under writeback) below the
/// background writeback threshold? Below it the kernel never throttles a
/// writer (it starts to at the midpoint of the background and hard limits),
/// so a small write into cached pages returns without sleeping. Read from
/// /proc at most every `DIRTY_RECHECK` (about 50 us each time), any thread.
pub fn dirty_headroom() -> bool {
    static HEADROOM: Answer = Answer::new();
    HEADROOM.get(|| (dirty_below_background().unwrap_or(false), DIRTY_RECHECK))
}

const DIRTY_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

fn dirty_below_background() -> Option<bool> {
    let vm = std::fs::read_to_string("/proc/vmstat").ok()?;
    let dirty = (stat_field(&vm, "nr_dirty ")? + stat_field(&vm, "nr_writeback ")?) * page_size();
    let sysctl = |name: &str| -> Option<u64> { std::fs::read_to_string(format!("/proc/sys/vm/{name}")).ok()?.trim().parse().ok() };
    match sysctl("dirty_background_bytes")? {
        0 => {
            // The kernel takes the ratio of the memory that can hold dirty
            // pages (free and page cache); MemAvailable is close to it.
            let ratio = sysctl("dirty_background_ratio")?;
            let mem = std::fs::read_to_string("/proc/meminfo").ok()?;
            Some(dirty < stat_field(&mem, "MemAvailable:")? * 1024 / 100 * ratio && memcg_below_background(ratio)?)
        }
        b => Some(dirty < b),
    }
}

/// The first number after `key` at the start of a line of `text` (the
/// format of /proc/vmstat, /proc/meminfo and memory.stat).
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

/// Under cgroup v2, writeback throttles a writer against its memory
/// cgroup's own limit too: is this process's cgroup (when it has a memory
/// limit) below `ratio` percent of it in dirty and writeback pages? Only
/// the cgroup itself is asked, not its ancestors. Cgroup v1 (no per-cgroup
/// dirty throttling) and unlimited cgroups answer yes.
fn memcg_below_background(ratio: u64) -> Option<bool> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let Some(path) = cg.lines().find_map(|l| l.strip_prefix("0::")) else { return Some(true) };
    let dir = format!("/sys/fs/cgroup{}", path.trim());
    let Ok(max) = std::fs::read_to_string(format!("{dir}/memory.max")) else { return Some(true) };
    let stat = std::fs::read_to_string(format!("{dir}/memory.stat")).ok()?;
    Some(memcg_dirty_ok(&max, &stat, ratio))
}

/// `memory.max` and `memory.stat` of a cgroup: are its dirty and writeback
/// file pages below `ratio` percent of its limit ("max": no limit)?
fn memcg_dirty_ok(max: &str, stat: &str, ratio: u64) -> bool {
    let Ok(max) = max.trim().parse::<u64>() else { return true };
    match (stat_field(stat, "file_dirty "), stat_field(stat, "file_writeback ")) {
        (Some(d), Some(w)) => d + w < max / 100 * ratio,
        _ => false,
    }
}

/// A private mapping of `len` bytes of `fd` at `off`, when every page of the
/// range is in the page cache (cachestat), so touching it does not wait for
/// the disk. The pages are mapped by the faults of first touch (each maps
/// its neighbours too); populating them up front (MADV_POPULATE_READ) cost
/// more than it saved, 330 ms against 294 ms for the mixed convert. As with
/// any mapping, a process that ignores the image lock and cuts the file
/// short under us would raise SIGBUS. Returns (base, mapping
/// length, offset of `off` in the mapping), or None when some page is not
/// cached or the kernel refuses. The caller owns the mapping (munmap).
pub fn map_resident(fd: RawFd, off: u64, len: usize) -> Option<(std::ptr::NonNull<u8>, usize, usize)> {
    const PAGE: u64 = 4096;
    let start = off - off % PAGE;
    let delta = (off - start) as usize;
    let map_len = (delta + len).next_multiple_of(PAGE as usize);
    if !all_cached(fd, start, map_len as u64) {
        return None;
    }
    // SAFETY: a fresh private mapping at an address of the kernel's choosing;
    // it aliases nothing of ours.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE, fd, start as libc::off_t)
    };
    if p == libc::MAP_FAILED {
        return None;
    }
    Some((std::ptr::NonNull::new(p.cast())?, map_len, delta))
}

/// The file lives on a filesystem reached over a network, or through FUSE
/// (statfs magic numbers, <linux/magic.h> and the projects' own).
pub fn remote_fs(fd: RawFd) -> bool {
    const REMOTE: [i64; 10] = [
        0x6969,     // NFS
        0xFF534D42, // CIFS
        0xFE534D42, // SMB2
        0x65735546, // FUSE
        0x00c36400, // Ceph
        0x0BD00BD0, // Lustre
        0x47504653, // GPFS
        0x01021997, // 9P
        0x5346414F, // AFS
        0x6B414653, // kAFS
    ];
    fs_type(fd).is_some_and(|t| REMOTE.contains(&t))
}

/// The magic number of the filesystem `fd` is on (statfs f_type), if
/// fstatfs answers.
fn fs_type(fd: RawFd) -> Option<i64> {
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open file and st is writable.
    (unsafe { libc::fstatfs(fd, &mut st) } == 0).then_some(st.f_type as i64)
}

/// Does io_uring issue direct writes to this file's filesystem in parallel
/// when it has to hand them to its workers? Only where the filesystem says
/// it takes them so (FOP_DIO_PARALLEL_WRITE: ext4 and xfs); elsewhere
/// (btrfs, FUSE, network filesystems, ...) io-wq runs one write per file at
/// a time.
pub fn parallel_dio_writes(fd: RawFd) -> bool {
    const PARALLEL: [i64; 2] = [
        0xEF53,     // ext2, ext3, ext4
        0x58465342, // xfs
    ];
    fs_type(fd).is_none_or(|t| PARALLEL.contains(&t))
}

#[cfg(test)]
mod dirty_tests {
    use super::*;

    #[test]
    fn memcg_dirty_headroom_follows_the_cgroup_limit() {
        let stat = "anon 1\nfile 400\nfile_dirty 60000000\nfile_writeback 5000000\nshmem 0\n";
        // 65 MB dirty or under writeback: within 10 % of 1 GB, not of 512 MB.
        assert!(memcg_dirty_ok("1000000000\n", stat, 10));
        assert!(!memcg_dirty_ok("512000000\n", stat, 10));
        assert!(memcg_dirty_ok("max\n", stat, 10));
        // A stat without the fields (an old kernel) is not trusted.
        assert!(!memcg_dirty_ok("1000000000\n", "anon 1\n", 10));
        assert_eq!(stat_field(stat, "file_dirty "), Some(60000000));
        assert_eq!(stat_field(stat, "file "), Some(400));
    }

    #[test]
    fn the_system_dirty_check_answers() {
        // Whatever the answer, asking must work on this kernel.
        assert!(dirty_below_background().is_some());
    }
}
