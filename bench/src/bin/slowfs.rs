//! `slowfs`: the slow-allocation rig. A FUSE filesystem that passes every
//! file through to a backing directory, but charges time for allocation: a
//! write or fallocate that covers bytes of a file no write or fallocate
//! covered before (in 4 KiB blocks) sleeps `--alloc-us-per-mib` for every
//! MiB of them before it answers. It
//! stands in for filesystems whose allocation is slow by design (NFS, GPFS,
//! Lustre), where a writer that waits for each allocation crawls and one
//! that allocates ahead of itself does not.
//!
//!   slowfs BACKING_DIR MOUNTPOINT [--alloc-us-per-mib 1000] [--threads 8]
//!
//! Runs in the foreground until the mount goes away (`umount MOUNTPOINT`),
//! then prints what it charged. Reads, writes, fallocate and fsync are
//! served by a pool of threads, so a request that sleeps holds up only
//! itself, as an allocation on a network filesystem would. Extended
//! attributes, SEEK_DATA/SEEK_HOLE and fallocate's modes pass through.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};

#[derive(Parser)]
#[command(about = "A FUSE passthrough whose allocation costs time: the slow-allocation rig")]
struct Args {
    /// The directory whose files the mount shows.
    backing: PathBuf,
    /// Where to mount it.
    mountpoint: PathBuf,
    /// Microseconds charged for each MiB a write or fallocate allocates.
    #[arg(long, default_value_t = 1000)]
    alloc_us_per_mib: u64,
    /// Threads serving reads, writes, fallocate and fsync.
    #[arg(long, default_value_t = 8)]
    threads: usize,
}

/// Attribute and entry lifetime in the kernel's cache: short, since the
/// backing files are ours alone but sizes change under writes.
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = 1;
/// Open flags of the FUSE protocol (fuse_kernel.h): a file opened with
/// O_DIRECT bypasses the kernel's cache and takes direct writes in
/// parallel, as a network filesystem does (the kernel still serialises
/// writes past the end of the file).
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
/// Init capability (fuse_kernel.h): asynchronous direct I/O submission.
const FUSE_ASYNC_DIO: u64 = 1 << 15;

fn open_reply_flags(flags: i32) -> u32 {
    if flags & libc::O_DIRECT != 0 {
        FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
    } else {
        0
    }
}

#[derive(Default)]
struct Charged {
    allocated: AtomicU64,
    slept_us: AtomicU64,
    requests: AtomicU64,
}

/// What the rig counts as allocated in one file: byte ranges in 4 KiB
/// blocks, sorted and disjoint (start -> end). Kept by the rig rather than
/// read back from the backing file: concurrent writes would each see the
/// other's blocks in st_blocks, and tmpfs calls fallocated pages holes.
#[derive(Default)]
struct Extents(BTreeMap<u64, u64>);

const BLOCK: u64 = 4096;

impl Extents {
    /// From the backing file's data ranges (a file the rig did not write).
    fn scan(f: &File) -> Extents {
        let mut x = Extents::default();
        let fd = f.as_raw_fd();
        let mut pos = 0i64;
        loop {
            // SAFETY: plain lseeks on an open file (positioned I/O only here,
            // so moving its offset disturbs nothing).
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                return x;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole <= data {
                return x;
            }
            x.add(data as u64, hole as u64);
            pos = hole;
        }
    }

    /// Cover [a, b); the bytes that were not covered before.
    fn add(&mut self, a: u64, b: u64) -> u64 {
        let (a, b) = (a / BLOCK * BLOCK, b.div_ceil(BLOCK) * BLOCK);
        if a >= b {
            return 0;
        }
        let (mut start, mut end, mut new) = (a, b, b - a);
        let touching: Vec<(u64, u64)> =
            self.0.range(..=b).rev().take_while(|&(_, &e)| e >= a).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.0.remove(&s);
            new -= e.min(b).saturating_sub(s.max(a));
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
        new
    }

    /// Uncover the whole blocks inside [a, b).
    fn remove(&mut self, a: u64, b: u64) {
        let (a, b) = (a.div_ceil(BLOCK) * BLOCK, b / BLOCK * BLOCK);
        if a >= b {
            return;
        }
        let hit: Vec<(u64, u64)> =
            self.0.range(..b).rev().take_while(|&(_, &e)| e > a).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in hit {
            self.0.remove(&s);
            if s < a {
                self.0.insert(s, a);
            }
            if e > b {
                self.0.insert(b, e);
            }
        }
    }
}

struct Shared {
    us_per_mib: u64,
    charged: Charged,
    /// Inode number -> what is allocated in it.
    extents: Mutex<HashMap<u64, Extents>>,
}

impl Shared {
    fn extents(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Extents>> {
        self.extents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Know what `f` (inode `ino`) already has, if the rig has not seen it.
    fn track(&self, ino: u64, f: &File) {
        self.extents().entry(ino).or_insert_with(|| Extents::scan(f));
    }

    /// Sleep for the bytes of [a, b) in `ino` nothing allocated before.
    fn charge(&self, ino: u64, a: u64, b: u64) {
        let new = self.extents().entry(ino).or_default().add(a, b);
        if new == 0 {
            return;
        }
        let us = new * self.us_per_mib / (1 << 20);
        self.charged.allocated.fetch_add(new, Ordering::Relaxed);
        self.charged.slept_us.fetch_add(us, Ordering::Relaxed);
        self.charged.requests.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_micros(us));
    }

    fn release(&self, ino: u64, a: u64, b: u64) {
        if let Some(x) = self.extents().get_mut(&ino) {
            x.remove(a, b);
        }
    }
}

struct SlowFs {
    backing: PathBuf,
    /// Inode number -> backing path (the backing inode's number, 1 for the root).
    inodes: HashMap<u64, PathBuf>,
    files: HashMap<u64, Arc<File>>,
    next_fh: u64,
    shared: Arc<Shared>,
    pool: crossbeam_channel::Sender<Box<dyn FnOnce() + Send>>,
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// errno of the last failed libc call.
fn last_errno() -> i32 {
    errno(&std::io::Error::last_os_error())
}

fn reply_empty(reply: ReplyEmpty, r: std::io::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Answer getxattr/listxattr from a libc call's result `r` into `buf`:
/// the length asked for (`size` 0), or the bytes.
fn reply_xattr(reply: ReplyXattr, size: u32, r: isize, buf: &[u8]) {
    if r < 0 {
        reply.error(last_errno())
    } else if size == 0 {
        reply.size(r as u32)
    } else {
        reply.data(&buf[..r as usize])
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH
    }
}

fn lstat(p: &Path) -> std::io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and st is writable.
    if unsafe { libc::lstat(cpath(p).as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl SlowFs {
    fn ino_of(&self, st: &libc::stat, path: &Path) -> u64 {
        if path == self.backing {
            ROOT
        } else if st.st_ino == ROOT {
            // The backing filesystem's inode 1 (never a regular file on
            // Linux filesystems, but keep the root's number ours).
            u64::MAX
        } else {
            st.st_ino
        }
    }

    fn attr(&self, st: &libc::stat, path: &Path) -> FileAttr {
        FileAttr {
            ino: self.ino_of(st, path),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    fn path(&self, ino: u64) -> Option<PathBuf> {
        self.inodes.get(&ino).cloned()
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.inodes.get(&parent).map(|p| p.join(name))
    }

    /// Stat `path`, remember its inode, and give its attributes.
    fn remember(&mut self, path: PathBuf) -> std::io::Result<FileAttr> {
        let st = lstat(&path)?;
        let attr = self.attr(&st, &path);
        self.inodes.insert(attr.ino, path);
        Ok(attr)
    }

    fn reply_attr(&self, p: &Path, reply: ReplyAttr) {
        match lstat(p) {
            Ok(st) => reply.attr(&TTL, &self.attr(&st, p)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn reply_entry(&mut self, p: PathBuf, reply: ReplyEntry) {
        match self.remember(p) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn add_file(&mut self, f: File) -> u64 {
        self.next_fh += 1;
        self.files.insert(self.next_fh, Arc::new(f));
        self.next_fh
    }

    /// Run `job` on the pool (the session thread goes on reading requests).
    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.pool.send(Box::new(job));
    }

    fn file(&self, fh: u64) -> Option<Arc<File>> {
        self.files.get(&fh).cloned()
    }
}

fn open_options(flags: i32) -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => o.read(true),
        libc::O_WRONLY => o.write(true),
        _ => o.read(true).write(true),
    };
    // O_DIRECT stays with the client: our buffers are not aligned, and the
    // rig is about allocation, not the backing store's cache.
    o.custom_flags(flags & !(libc::O_ACCMODE | libc::O_DIRECT | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC));
    o
}

impl Filesystem for SlowFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Asynchronous direct I/O: without it the kernel sends an O_DIRECT
        // writer's requests one at a time, whatever its queue depth.
        let _ = config.add_capabilities(FUSE_ASYNC_DIO);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        self.reply_entry(p, reply)
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        self.reply_attr(&p, reply)
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let c = cpath(&p);
        if let Some(size) = size {
            // Growing by truncate allocates nothing: it is not charged;
            // shrinking frees what lay past the new end.
            let r = match fh.and_then(|h| self.file(h)) {
                Some(f) => f.set_len(size),
                None => std::fs::OpenOptions::new().write(true).open(&p).and_then(|f| f.set_len(size)),
            };
            if let Err(e) = r {
                return reply.error(errno(&e));
            }
            self.shared.release(ino, size, u64::MAX);
        }
        if let Some(mode) = mode {
            // SAFETY: c is a valid C string.
            if unsafe { libc::chmod(c.as_ptr(), mode & 0o7777) } != 0 {
                return reply.error(last_errno());
            }
        }
        if atime.is_some() || mtime.is_some() {
            let ts = |t: Option<TimeOrNow>| match t {
                None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
                }
            };
            let times = [ts(atime), ts(mtime)];
            // SAFETY: c is a valid C string and times holds two timespecs.
            if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
                return reply.error(last_errno());
            }
        }
        self.reply_attr(&p, reply)
    }

    fn mkdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let Some(p) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        // SAFETY: a valid C string.
        if unsafe { libc::mkdir(cpath(&p).as_ptr(), mode & !umask) } != 0 {
            return reply.error(last_errno());
        }
        self.reply_entry(p, reply)
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(p) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        let ino = lstat(&p).map(|st| self.ino_of(&st, &p));
        match std::fs::remove_file(&p) {
            Ok(()) => {
                if let Ok(ino) = ino {
                    self.shared.extents().remove(&ino);
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(p) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        reply_empty(reply, std::fs::remove_dir(&p))
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let (Some(from), Some(to)) = (self.child(parent, name), self.child(newparent, newname)) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::rename(&from, &to) {
            Ok(()) => {
                let _ = self.remember(to);
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        match open_options(flags).open(&p) {
            Ok(f) => {
                self.shared.track(ino, &f);
                let fh = self.add_file(f);
                reply.opened(fh, open_reply_flags(flags))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(p) = self.child(parent, name) else { return reply.error(libc::ENOENT) };
        let mut o = open_options(flags);
        o.create(true).mode(mode & !umask);
        if flags & libc::O_EXCL != 0 {
            o.create_new(true);
        }
        if flags & libc::O_TRUNC != 0 {
            o.truncate(true);
        }
        let f = match o.open(&p) {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        match self.remember(p) {
            Ok(a) => {
                self.shared.track(a.ino, &f);
                let fh = self.add_file(f);
                reply.created(&TTL, &a, 0, fh, open_reply_flags(flags))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(fh) else { return reply.error(libc::EBADF) };
        self.spawn(move || {
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                match f.read_at(&mut buf[done..], offset as u64 + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return reply.error(errno(&e)),
                }
            }
            reply.data(&buf[..done])
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(fh) else { return reply.error(libc::EBADF) };
        let data = data.to_vec();
        let shared = self.shared.clone();
        self.spawn(move || {
            shared.charge(ino, offset as u64, offset as u64 + data.len() as u64);
            if let Err(e) = f.write_all_at(&data, offset as u64) {
                return reply.error(errno(&e));
            }
            reply.written(data.len() as u32)
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: ReplyEmpty) {
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(&fh);
        reply.ok()
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let Some(f) = self.file(fh) else { return reply.error(libc::EBADF) };
        self.spawn(move || reply_empty(reply, if datasync { f.sync_data() } else { f.sync_all() }));
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.file(fh) else { return reply.error(libc::EBADF) };
        let shared = self.shared.clone();
        self.spawn(move || {
            let (a, b) = (offset as u64, offset as u64 + length as u64);
            if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                shared.release(ino, a, b);
            } else {
                shared.charge(ino, a, b);
            }
            // SAFETY: f is an open file; fallocate takes plain integers.
            if unsafe { libc::fallocate(f.as_raw_fd(), mode, offset, length) } != 0 {
                return reply.error(last_errno());
            }
            reply.ok()
        });
    }

    fn lseek(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, offset: i64, whence: i32, reply: ReplyLseek) {
        let Some(f) = self.file(fh) else { return reply.error(libc::EBADF) };
        // SAFETY: f is an open file. SEEK_DATA/SEEK_HOLE move only this
        // handle's offset, which no read or write here uses (they are
        // positioned).
        let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
        if r < 0 {
            return reply.error(last_errno());
        }
        reply.offset(r)
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let rd = match std::fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut entries: Vec<(u64, FileType, OsString)> =
            vec![(ino, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
        for e in rd.flatten() {
            let Ok(st) = lstat(&e.path()) else { continue };
            entries.push((self.ino_of(&st, &e.path()), kind(st.st_mode), e.file_name()));
        }
        for (i, (ino, k, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as i64 + 1, k, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        // SAFETY: an all-zero statvfs is valid to be overwritten.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a writable struct.
        if unsafe { libc::statvfs(cpath(&self.backing).as_ptr(), &mut s) } != 0 {
            return reply.error(last_errno());
        }
        reply.statfs(
            s.f_blocks,
            s.f_bfree,
            s.f_bavail,
            s.f_files,
            s.f_ffree,
            s.f_bsize as u32,
            s.f_namemax as u32,
            s.f_frsize as u32,
        )
    }

    fn setxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let n = CString::new(name.as_bytes()).unwrap_or_default();
        // SAFETY: valid C strings and a live value slice.
        let r = unsafe { libc::lsetxattr(cpath(&p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
        if r != 0 {
            return reply.error(last_errno());
        }
        reply.ok()
    }

    fn getxattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let n = CString::new(name.as_bytes()).unwrap_or_default();
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid C strings; buf holds size bytes (none when size is 0,
        // which asks for the length).
        let r = unsafe { libc::lgetxattr(cpath(&p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        reply_xattr(reply, size, r, &buf)
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let mut buf = vec![0u8; size as usize];
        // SAFETY: as in getxattr.
        let r = unsafe { libc::llistxattr(cpath(&p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        reply_xattr(reply, size, r, &buf)
    }

    fn removexattr(&mut self, _req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let n = CString::new(name.as_bytes()).unwrap_or_default();
        // SAFETY: valid C strings.
        if unsafe { libc::lremovexattr(cpath(&p).as_ptr(), n.as_ptr()) } != 0 {
            return reply.error(last_errno());
        }
        reply.ok()
    }
}

fn main() {
    let args = Args::parse();
    let backing = match std::fs::canonicalize(&args.backing) {
        Ok(p) if p.is_dir() => p,
        _ => {
            eprintln!("slowfs: {}: not a directory", args.backing.display());
            std::process::exit(2);
        }
    };
    let shared = Arc::new(Shared {
        us_per_mib: args.alloc_us_per_mib,
        charged: Charged::default(),
        extents: Mutex::new(HashMap::new()),
    });
    let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn FnOnce() + Send>>();
    let workers: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let rx = rx.clone();
            std::thread::spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
        })
        .collect();
    let fs = SlowFs {
        inodes: HashMap::from([(ROOT, backing.clone())]),
        backing,
        files: HashMap::new(),
        next_fh: 0,
        shared: shared.clone(),
        pool: tx,
    };
    let opts = [MountOption::FSName("slowfs".into()), MountOption::AllowOther, MountOption::DefaultPermissions];
    if let Err(e) = fuser::mount2(fs, &args.mountpoint, &opts) {
        eprintln!("slowfs: mounting at {}: {e}", args.mountpoint.display());
        std::process::exit(1);
    }
    // The session (and with it the pool's sender) is gone: the workers end.
    for w in workers {
        let _ = w.join();
    }
    let c = &shared.charged;
    eprintln!(
        "slowfs: charged {} allocations, {} MiB, {} ms",
        c.requests.load(Ordering::Relaxed),
        c.allocated.load(Ordering::Relaxed) >> 20,
        c.slept_us.load(Ordering::Relaxed) / 1000
    );
}

#[cfg(test)]
mod tests {
    use super::Extents;

    #[test]
    fn extents_count_each_block_once() {
        let mut x = Extents::default();
        assert_eq!(x.add(0, 8192), 8192);
        assert_eq!(x.add(4096, 12288), 4096);
        assert_eq!(x.add(100, 200), 0, "inside a covered block");
        assert_eq!(x.add(20480, 24576), 4096);
        assert_eq!(x.add(0, 24576), 8192, "the gap between");
        assert_eq!(x.0.len(), 1);
        x.remove(4096, 8192);
        assert_eq!(x.add(0, 24576), 4096);
        x.remove(10000, u64::MAX);
        assert_eq!(x.0.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(), vec![(0, 12288)]);
    }
}
