//! Image locking compatible with QEMU: open file description (OFD) byte-range
//! locks on the image file, so ringblk and a running qemu-img/qemu-nbd/QEMU see
//! each other. Byte 100+b is read-locked by every opener that *uses* permission
//! bit b; byte 200+b by every opener that does *not share* it. An open conflicts
//! when someone else locks 200+b for a b it uses, or 100+b for a b it unshares.
//! All locks are shared (read) locks; conflicts are found with F_OFD_GETLK asking
//! for a write lock, which other open file descriptions' read locks block.

use std::os::fd::RawFd;

use crate::error::{Error, ErrorKind, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// Block layer permissions, bit-compatible with QEMU's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perm(pub u8);

impl Perm {
    pub const CONSISTENT_READ: Perm = Perm(1 << 0);
    pub const WRITE: Perm = Perm(1 << 1);
    pub const WRITE_UNCHANGED: Perm = Perm(1 << 2);
    pub const RESIZE: Perm = Perm(1 << 3);
    pub const NONE: Perm = Perm(0);
    pub const ALL: Perm = Perm(0x0f);
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }
    pub fn without(self, other: Perm) -> Perm {
        Perm(self.0 & !other.0)
    }
    fn bits(self) -> impl Iterator<Item = usize> {
        (0..4).filter(move |b| self.0 & (1 << b) != 0)
    }
}

/// The lock bytes one open holds on one file, released when this drops.
/// OFD semantics would release them when the file's last reference closes,
/// but the kernel can hold a reference a little past our close (an
/// io_uring request being freed by an io-wq worker, a ring torn down in
/// the background after the process exits): the next opener then found
/// the image still locked (cli_interop's locks_are_gone_when_the_process_exits,
/// once in 40 runs). So the lock keeps a duplicate of the fd (same open
/// file description, so the same locks) and unlocks through it.
pub struct ImageLock {
    fd: std::os::fd::OwnedFd,
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        unlock_all(std::os::fd::AsRawFd::as_raw_fd(&self.fd));
    }
}

fn unlock_all(fd: RawFd) {
    for byte in [PERM_BASE, SHARED_BASE] {
        for b in 0..4 {
            let _ = ofd(fd, libc::F_OFD_SETLK, libc::F_UNLCK as libc::c_short, byte + b);
        }
    }
}

fn ofd(fd: RawFd, cmd: libc::c_int, ty: libc::c_short, start: i64) -> std::io::Result<libc::flock> {
    let mut fl = libc::flock {
        l_type: ty,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    };
    // SAFETY: fl is a live, initialised flock; the kernel reads and may write it.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

fn locked_by_other(fd: RawFd, byte: i64) -> std::io::Result<bool> {
    let fl = ofd(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

impl ImageLock {
    /// Take the lock bytes for `perm`/`shared` on `fd` and check for conflicts
    /// with other openers. On conflict the bytes we took are released.
    pub fn acquire(fd: RawFd, filename: &str, perm: Perm, shared: Perm) -> Result<ImageLock> {
        let unshared = Perm::ALL.without(shared);
        let take = |byte: i64| {
            ofd(fd, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, byte)
                .map_err(|e| Error::os("taking image lock", e).with_file(filename))
        };
        let result = (|| {
            for b in perm.bits() {
                take(PERM_BASE + b as i64)?;
            }
            for b in unshared.bits() {
                take(SHARED_BASE + b as i64)?;
            }
            for b in perm.bits() {
                if locked_by_other(fd, SHARED_BASE + b as i64).map_err(|e| Error::os("checking image lock", e))? {
                    return Err(conflict(filename, format!("Failed to get \"{}\" lock", Perm::NAMES[b])));
                }
            }
            for b in unshared.bits() {
                if locked_by_other(fd, PERM_BASE + b as i64).map_err(|e| Error::os("checking image lock", e))? {
                    return Err(conflict(filename, format!("Failed to get shared \"{}\" lock", Perm::NAMES[b])));
                }
            }
            // SAFETY: F_DUPFD_CLOEXEC on an fd the caller holds open;
            // checked below.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(Error::os("taking image lock", std::io::Error::last_os_error()).with_file(filename));
            }
            // SAFETY: a new fd nothing else owns.
            Ok(ImageLock { fd: unsafe { std::os::fd::FromRawFd::from_raw_fd(dup) } })
        })();
        if result.is_err() {
            unlock_all(fd);
        }
        result
    }
}

fn conflict(filename: &str, what: String) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!("{what}. Is another process using the image? Use -U (--force-share) to open it read-only anyway"),
    )
    .with_file(filename)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn two_opens_of_one_file_see_each_other() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = std::fs::OpenOptions::new().read(true).write(true).open(f.path()).unwrap();
        let b = std::fs::OpenOptions::new().read(true).write(true).open(f.path()).unwrap();
        let rw = Perm::CONSISTENT_READ.union(Perm::WRITE);
        // a writes and does not share write; b wants to write too.
        let la = ImageLock::acquire(a.as_raw_fd(), "x", rw, Perm::ALL.without(Perm::WRITE)).unwrap();
        let e = ImageLock::acquire(b.as_raw_fd(), "x", rw, Perm::ALL).err().expect("must conflict");
        assert_eq!(e.kind(), ErrorKind::Locked);
        assert!(e.to_string().contains("Failed to get \"write\" lock"), "{e}");
        // A reader that shares write is fine.
        let _lb = ImageLock::acquire(b.as_raw_fd(), "x", Perm::CONSISTENT_READ, Perm::ALL).unwrap();
        // A reader that does not share write conflicts with a's use of write.
        let c = std::fs::File::open(f.path()).unwrap();
        let e = ImageLock::acquire(c.as_raw_fd(), "x", Perm::CONSISTENT_READ, Perm::ALL.without(Perm::WRITE)).err().unwrap();
        assert!(e.to_string().contains("Failed to get shared \"write\" lock"), "{e}");
        // The lock goes with the ImageLock, even while the file stays open
        // (and however long the kernel keeps a reference to it).
        drop(la);
        ImageLock::acquire(c.as_raw_fd(), "x", Perm::CONSISTENT_READ, Perm::ALL.without(Perm::WRITE)).unwrap();
        drop(a);
    }
}
