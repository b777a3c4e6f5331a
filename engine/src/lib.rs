//! ringblk engine: the thread-per-core runtime, the I/O backends and the block
//! graph core (node trait, driver registry, options, image locking).

pub mod aio;
pub mod block;
pub mod error;
pub mod net;
pub mod options;
pub mod runtime;
pub mod objects;
pub mod size;

pub use error::{Error, ErrorKind, Result};

/// The kernel's page size (what a pipe buffer holds at most, what cachestat
/// counts), asked once.
pub fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}
