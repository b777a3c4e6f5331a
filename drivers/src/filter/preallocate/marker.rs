//! The crash marker: a file left longer than its data carries the data end
//! the data reaches at least, and the next open finds the real end past it.

use std::os::fd::RawFd;

use super::{align_up, PreallocNode, MIB};

/// The extended attribute that marks a file left longer than its data.
pub(super) const MARKER: &std::ffi::CStr = c"user.ringblk.preallocate";

impl PreallocNode {
    /// Record `data_end` in the marker (a lower bound of the data's end).
    pub(super) fn mark(&self, data_end: u64) {
        let Some(fd) = self.fd else { return };
        let mut s = self.state();
        if s.marked == Some(data_end) {
            return;
        }
        let v = data_end.to_string();
        // SAFETY: fd is the child's open file; name and value are live.
        let r = unsafe { libc::fsetxattr(fd, MARKER.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        if r == 0 {
            s.marked = Some(data_end);
        }
    }

    pub(super) fn unmark(&self) {
        let Some(fd) = self.fd else { return };
        if self.state().marked.take().is_some() {
            // SAFETY: fd is the child's open file; the name is live.
            unsafe { libc::fremovexattr(fd, MARKER.as_ptr()) };
        }
    }
}

/// The end of the data of a file left long (the marker says it was): the
/// byte after the last non-zero one past `floor`, rounded up to 512, or
/// `floor`. Holes (and, on most filesystems, fallocated but unwritten
/// blocks) are skipped with SEEK_DATA; data regions are read backwards.
pub(super) fn recover_end(fd: RawFd, floor: u64, len: u64) -> std::io::Result<u64> {
    let mut regions = Vec::new();
    let mut pos = floor;
    while pos < len && regions.len() < 1 << 16 {
        // SAFETY: lseek on our own fd.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d, libc::SEEK_HOLE) };
        let h = if h < 0 { len } else { (h as u64).min(len) };
        regions.push((d as u64, h));
        pos = h;
    }
    let mut buf = vec![0u8; MIB as usize];
    for &(start, end) in regions.iter().rev() {
        let mut hi = end;
        while hi > start {
            let lo = hi.saturating_sub(MIB).max(start);
            let n = (hi - lo) as usize;
            // SAFETY: reads at most n bytes into the live buffer.
            let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), n, lo as libc::off_t) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(i) = buf[..r as usize].iter().rposition(|&b| b != 0) {
                return Ok(align_up(lo + i as u64 + 1, 512).min(len).max(floor));
            }
            hi = lo;
        }
    }
    Ok(floor)
}

pub(super) fn read_marker(fd: RawFd) -> Option<u64> {
    let mut v = [0u8; 32];
    // SAFETY: reads at most v.len() bytes into the live array.
    let n = unsafe { libc::fgetxattr(fd, MARKER.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    if n <= 0 {
        return None;
    }
    std::str::from_utf8(&v[..n as usize]).ok()?.trim().parse().ok()
}
