//! Queue rings: a submission queue and its completion queue in DMA memory,
//! their doorbells, the phase tag. `Rings` is the bare mechanism the admin
//! queue (under the controller's lock) and each shard's I/O queue share;
//! the I/O queue's command slots and waiting live in io.rs.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use engine::error::Result;

use super::dma::{Dma, DmaBuf};
use super::spec::{reg, Cqe, Sqe};
use super::vfio::Device;

pub struct Rings {
    pub qid: u16,
    /// Entries in each queue.
    pub depth: u16,
    pub sq: DmaBuf,
    pub cq: DmaBuf,
    sq_tail: u16,
    cq_head: u16,
    /// The phase tag a new completion carries: starts at 1 and flips each
    /// time the head wraps.
    phase: bool,
    /// Completions consumed since the head doorbell was last written.
    unacked: u16,
    dev: Arc<Device>,
    sq_db: usize,
    cq_db: usize,
}

// SAFETY: the doorbell offsets index the device's BAR through `dev`, and
// the DMA memory is owned; a Rings is used by one thread at a time (admin
// under a mutex, I/O queues by their shard).
unsafe impl Send for Rings {}

impl Rings {
    pub fn new(dma: &Arc<Dma>, dev: &Arc<Device>, stride: usize, qid: u16, depth: u16) -> Result<Rings> {
        let sq = DmaBuf::new(dma, usize::from(depth) * 64)?;
        let cq = DmaBuf::new(dma, usize::from(depth) * 16)?;
        let sq_db = reg::DOORBELLS + (2 * usize::from(qid)) * stride;
        let cq_db = reg::DOORBELLS + (2 * usize::from(qid) + 1) * stride;
        let mut r = Rings {
            qid,
            depth,
            sq,
            cq,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
            unacked: 0,
            dev: dev.clone(),
            sq_db,
            cq_db,
        };
        r.reset();
        Ok(r)
    }

    /// Back to the state of a queue just created: empty, phase 1. The
    /// controller must not be using the queue (disabled, or the queue
    /// deleted or not yet created).
    pub fn reset(&mut self) {
        // SAFETY: the controller does not use this memory now (contract above).
        unsafe {
            self.cq.bytes_mut().fill(0);
            self.sq.bytes_mut().fill(0);
        }
        self.sq_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        self.unacked = 0;
    }

    /// Put a command at the tail; the device sees it at the next ring_sq.
    /// The caller keeps fewer than `depth` commands outstanding, so the
    /// tail never catches the head.
    pub fn push(&mut self, sqe: &Sqe) {
        let at = usize::from(self.sq_tail) * 64;
        // SAFETY: the slot at the tail is not one the device has yet to
        // fetch (at most depth - 1 outstanding), and `at + 64 <= len`.
        unsafe { self.sq.bytes_mut()[at..at + 64].copy_from_slice(&sqe.to_bytes()) };
        self.sq_tail = (self.sq_tail + 1) % self.depth;
    }

    /// Tell the device about the commands pushed so far.
    ///
    /// Memory ordering: the commands were written with plain stores to
    /// cache-coherent memory; the doorbell is a store to the uncached BAR.
    /// The device may fetch the commands the moment it sees the doorbell,
    /// so every command store must be visible first: a SeqCst fence keeps
    /// the compiler and the CPU from moving the doorbell store ahead of
    /// them (an `mfence` on x86, where stores are already kept in order
    /// and the fence costs little next to the MMIO write itself).
    pub fn ring_sq(&self) {
        fence(Ordering::SeqCst);
        self.dev.write32(self.sq_db, u32::from(self.sq_tail));
    }

    /// The next completion, if the device has posted one.
    ///
    /// Memory ordering: dword 3 (with the phase tag) is read first, as a
    /// volatile load; the device writes an entry whole before its new phase
    /// tag can be seen, so once the tag matches, an Acquire fence orders
    /// the reads of the other dwords after it.
    pub fn pop(&mut self) -> Option<Cqe> {
        let at = usize::from(self.cq_head) * 16;
        let base = self.cq.as_ptr();
        // SAFETY: `at + 16 <= cq.len()`; u32-aligned (16-byte entries in a
        // page-aligned buffer); read volatile because the device writes it.
        let dw3 = u32::from_le(unsafe { base.add(at + 12).cast::<u32>().read_volatile() });
        if ((dw3 >> 16) & 1 == 1) != self.phase {
            return None;
        }
        fence(Ordering::Acquire);
        let mut d = [0u32; 4];
        for (i, w) in d.iter_mut().enumerate().take(3) {
            // SAFETY: as for dw3, within the same entry.
            *w = u32::from_le(unsafe { base.add(at + 4 * i).cast::<u32>().read_volatile() });
        }
        d[3] = dw3;
        self.cq_head += 1;
        if self.cq_head == self.depth {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        self.unacked += 1;
        Some(Cqe::decode(d))
    }

    /// Tell the device which completions we consumed (after a batch of pops),
    /// so it can reuse their slots.
    pub fn ring_cq(&mut self) {
        if self.unacked > 0 {
            self.unacked = 0;
            self.dev.write32(self.cq_db, u32::from(self.cq_head));
        }
    }
}
