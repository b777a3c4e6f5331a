//! The NBD server: what an export is, the server-wide settings and counters,
//! and how a new connection goes from accept to transmission. Negotiation is in
//! `handshake.rs`, the transmission phase in `conn.rs`, the accept loop in
//! `listen.rs`; TLS setup is the crate's `tls.rs`.

mod cmd;
mod conn;
mod handshake;
pub mod listen;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::block::BlockNode;
use engine::net::FileMap;

use crate::proto::*;

pub use handshake::{negotiate_bytes, BlankNode, Negotiated};

/// `--detect-zeroes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    Unmap,
}

/// One exported image.
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub node: Arc<dyn BlockNode>,
    /// `-o`: where the export starts in the image.
    pub offset: u64,
    pub size: u64,
    pub read_only: bool,
    /// `-A`: offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN.
    pub multi_conn: bool,
    /// `--discard=unmap`: TRIM and zero writes may deallocate.
    pub discard: bool,
    pub detect_zeroes: DetectZeroes,
    /// Mappings small cached reads are sent from (`cmd::mapped_read`).
    pub maps: FileMaps,
}

/// Shared mappings of the host files an export's data lies in, one per file
/// descriptor, made on first use (None: mapping failed; not tried again).
/// The descriptors are the export's nodes' own, open as long as the export.
#[derive(Default)]
pub struct FileMaps(std::sync::Mutex<Vec<(RawFd, Option<Arc<FileMap>>)>>);

impl FileMaps {
    /// The mapping of `fd`, whole as the file was when first asked for.
    pub fn get(&self, fd: RawFd) -> Option<Arc<FileMap>> {
        let mut maps = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = maps.iter().find(|(f, _)| *f == fd) {
            return m.clone();
        }
        // SAFETY: fstat of a descriptor the caller holds open, into a zeroed stat.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) == 0 {
                usize::try_from(st.st_size).unwrap_or(0)
            } else {
                0
            }
        };
        let m = FileMap::new(fd, size).ok().map(Arc::new);
        maps.push((fd, m.clone()));
        m
    }
}

impl Export {
    /// Transmission flags for this export.
    pub fn flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_DF
            | TF_SEND_CACHE
            | TF_SEND_FAST_ZERO;
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM;
        }
        if self.multi_conn {
            f |= TF_CAN_MULTI_CONN;
        }
        f
    }

    /// (minimum, preferred, maximum) block sizes advertised with NBD_INFO_BLOCK_SIZE.
    pub fn block_sizes(&self, max_request: u32) -> (u32, u32, u32) {
        let min = self.node.limits().request_alignment.max(1);
        (min, min.max(4096), max_request)
    }
}

/// Counters over the server's life, for `-v` and the benchmarks.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    /// Payload bytes sent to clients (reads).
    pub served_bytes: AtomicU64,
    /// Payload bytes received from clients (writes).
    pub received_bytes: AtomicU64,
    /// Bytes of read payload copied in user space on the way out (TLS
    /// encryption is a copy). Zero on the plain read path.
    pub read_copied_bytes: AtomicU64,
    /// Read payload bytes handed to the socket by splice, page-cache pages
    /// by reference: copied by no one, the kernel included.
    pub spliced_bytes: AtomicU64,
    /// Read payload bytes sent from a shared mapping of the file: copied
    /// once, by the kernel, from the page cache into the socket.
    pub mapped_bytes: AtomicU64,
    /// Write payload bytes spliced from the socket to the file (copied
    /// once, by the kernel, into the page cache).
    pub spliced_in_bytes: AtomicU64,
    /// Write payload bytes written at once from the receive buffer, on the
    /// connection's shard (`cmd::write_now`): no copy, no task.
    pub inline_write_bytes: AtomicU64,
    /// Of `spliced_in_bytes`, those written from the pipe on the shard's
    /// thread (`write_pipe_now`) rather than by an io_uring worker.
    pub inline_pipe_bytes: AtomicU64,
    /// Bytes of write payload copied in user space (the part of a payload
    /// that arrived in the same receive as its header).
    pub write_copied_bytes: AtomicU64,
    /// Receives and sends on the wire: requests per receive and replies per
    /// send show how well the connection batches.
    pub recvs: AtomicU64,
    pub sends: AtomicU64,
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn line(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "requests={} served-bytes={} user-copied-bytes={} spliced-bytes={} mapped-bytes={} received-bytes={} spliced-in-bytes={} inline-write-bytes={} inline-pipe-bytes={} write-copied-bytes={} recvs={} sends={}",
            g(&self.requests),
            g(&self.served_bytes),
            g(&self.read_copied_bytes),
            g(&self.spliced_bytes),
            g(&self.mapped_bytes),
            g(&self.received_bytes),
            g(&self.spliced_in_bytes),
            g(&self.inline_write_bytes),
            g(&self.inline_pipe_bytes),
            g(&self.write_copied_bytes),
            g(&self.recvs),
            g(&self.sends)
        )
    }
}

/// Server-wide settings.
pub struct Server {
    pub export: Arc<Export>,
    pub tls: Option<crate::tls::TlsServer>,
    /// Longest a client may take to finish negotiating (None: no limit).
    pub handshake_limit: Option<Duration>,
    /// Largest payload or read a request may ask for.
    pub max_request: u32,
    pub stats: Stats,
    pub verbose: bool,
    /// Shards of the runtime that serves the connections.
    pub shards: usize,
    /// Connections in transmission.
    pub serving: AtomicUsize,
}

/// 32 MiB: the largest request the spec says servers should accept.
pub const DEFAULT_MAX_REQUEST: u32 = 32 << 20;

impl Server {
    /// Are there at least as many connections as shards? Then every core has
    /// a connection's work to overlap with a write its shard does itself,
    /// and handing the write to an io_uring worker only adds a context
    /// switch.
    pub fn every_shard_busy(&self) -> bool {
        self.serving.load(Ordering::Relaxed) >= self.shards
    }

    pub fn log(&self, msg: impl std::fmt::Display) {
        if self.verbose {
            eprintln!("ringblk-nbd: {msg}");
        }
    }
}
