//! The NVMe controller: bring-up (disable, admin queues, enable, Identify,
//! number of queues, MSI-X), admin commands, I/O queue creation and
//! deletion for the shards, reset and recovery, and the shutdown
//! notification at the end. The I/O path is io.rs.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use engine::error::{invalid, unsupported, Error, ErrorKind, Result};

use super::dma::{Dma, DmaBuf, PAGE};
use super::queue::Rings;
use super::spec::{admin, cc, csts, reg, Cap, IdController, IdNamespace, Sqe};
use super::vfio::{Container, Device};

/// Admin queue entries: a handful of commands at a time is plenty.
const ADMIN_DEPTH: u16 = 32;
/// I/O queue pairs we ask for: one per shard, and shards are capped at
/// the CPUs we have.
const MAX_IO_QUEUES: u16 = 64;

struct Admin {
    rings: Rings,
    /// 4 KiB for Identify data.
    data: DmaBuf,
    next_cid: u16,
}

pub struct Controller {
    pub dev: Arc<Device>,
    pub dma: Arc<Dma>,
    pub cap: Cap,
    pub id: IdController,
    admin: Mutex<Admin>,
    /// Bumped by every reset: an I/O queue made under an older generation
    /// no longer exists on the device and must be made again.
    generation: AtomicU64,
    /// I/O queue pairs the controller granted.
    pub io_queues: u16,
    /// Which qids (1..=io_queues) a shard holds.
    qids: Mutex<Vec<bool>>,
    /// Eventfds of MSI-X vectors 0..: vector q belongs to I/O queue q.
    vectors: Vec<OwnedFd>,
    pub resets: AtomicU64,
}

fn ctrl_err(bdf: &str, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("NVMe controller {bdf}: {what}"))
}

/// Controllers open in this process, by PCI address: a device's VFIO group
/// can be opened once, and every namespace of it shares the controller.
static OPEN: Mutex<Vec<(String, Weak<Controller>)>> = Mutex::new(Vec::new());

impl Controller {
    /// The controller at `bdf`, brought up, or the one already open.
    pub fn get(bdf: &str) -> Result<Arc<Controller>> {
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(c) = open.iter().find(|(b, _)| b == bdf).and_then(|(_, w)| w.upgrade()) {
            return Ok(c);
        }
        let c = Arc::new(Controller::bring_up(bdf)?);
        open.push((bdf.to_string(), Arc::downgrade(&c)));
        Ok(c)
    }

    fn bring_up(bdf: &str) -> Result<Controller> {
        let container = Container::open(bdf)?;
        let dev = Arc::new(container.device(bdf)?);
        let dma = Dma::new(container);
        let cap = Cap::decode(dev.read64(reg::CAP));
        if !cap.nvm_command_set {
            return Err(unsupported(format!("NVMe controller {bdf} does not offer the NVM command set")));
        }
        if cap.min_page > PAGE || cap.max_page < PAGE {
            return Err(unsupported(format!(
                "NVMe controller {bdf}: pages of {}..{} bytes, we need {PAGE}",
                cap.min_page, cap.max_page
            )));
        }
        let rings =
            Rings::new(&dma, &dev, cap.doorbell_stride, 0, u32::from(ADMIN_DEPTH).min(cap.max_queue_entries) as u16)?;
        let data = DmaBuf::new(&dma, PAGE)?;
        let mut c = Controller {
            dev,
            dma,
            cap,
            id: IdController::default(),
            admin: Mutex::new(Admin { rings, data, next_cid: 0 }),
            generation: AtomicU64::new(0),
            io_queues: 0,
            qids: Mutex::new(Vec::new()),
            vectors: Vec::new(),
            resets: AtomicU64::new(0),
        };
        c.io_queues = {
            let mut a = c.lock_admin();
            c.enable(&mut a)?;
            c.set_queue_count(&mut a)?
        };
        let mut raw = [0u8; 4096];
        c.identify(admin::CNS_CONTROLLER, 0, &mut raw)?;
        c.id = IdController::parse(&raw);
        *c.qids.lock().unwrap_or_else(|e| e.into_inner()) = vec![false; usize::from(c.io_queues) + 1];
        // MSI-X: vector 0 is the admin queue's (we poll it, but give it an
        // eventfd too so the table is whole), vector q is I/O queue q's.
        let want = (u32::from(c.io_queues) + 1).min(c.dev.msix_count());
        if want >= 2 {
            let mut fds = Vec::new();
            for _ in 0..want {
                // Blocking: io_uring answers a read of a non-blocking fd
                // with EAGAIN at once instead of waiting for the interrupt.
                // SAFETY: plain eventfd creation; checked below.
                let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if fd < 0 {
                    return Err(Error::os("eventfd", std::io::Error::last_os_error()));
                }
                // SAFETY: a new fd we own.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            c.dev.set_msix(&raw)?;
            c.vectors = fds;
        }
        Ok(c)
    }

    fn lock_admin(&self) -> MutexGuard<'_, Admin> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bdf(&self) -> &str {
        self.dev.bdf()
    }

    fn wait_csts(&self, what: &str, done: impl Fn(u32) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_millis(self.cap.timeout_ms);
        loop {
            let s = self.dev.read32(reg::CSTS);
            if done(s) {
                return Ok(());
            }
            if s == u32::MAX {
                return Err(ctrl_err(self.bdf(), format!("gone while {what} (registers read all ones)")));
            }
            if Instant::now() > deadline {
                return Err(ctrl_err(
                    self.bdf(),
                    format!("timed out after {} ms {what} (CSTS {s:#x})", self.cap.timeout_ms),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Disable (waiting for RDY to clear, as the spec asks even when EN was
    /// already 0), set up the admin queues afresh, enable, wait for RDY.
    fn enable(&self, a: &mut Admin) -> Result<()> {
        let cfg = self.dev.read32(reg::CC);
        if cfg & cc::EN != 0 {
            self.dev.write32(reg::CC, cfg & !cc::EN);
        }
        self.wait_csts("disabling", |s| s & csts::RDY == 0)?;
        a.rings.reset();
        let d = u32::from(a.rings.depth) - 1;
        self.dev.write32(reg::AQA, (d << 16) | d);
        self.dev.write64(reg::ASQ, a.rings.sq.iova);
        self.dev.write64(reg::ACQ, a.rings.cq.iova);
        self.dev.write32(reg::CC, cc::EN | cc::IOSQES | cc::IOCQES | cc::mps(PAGE));
        self.wait_csts("enabling", |s| s & (csts::RDY | csts::CFS) != 0)?;
        if self.dev.read32(reg::CSTS) & csts::CFS != 0 {
            return Err(ctrl_err(self.bdf(), "fatal status right after enable"));
        }
        Ok(())
    }

    /// Run one admin command to completion (polled: admin commands are
    /// rare, and a shard that needs one waits for it anyway).
    fn admin_locked(&self, a: &mut Admin, mut sqe: Sqe) -> Result<u32> {
        let cid = a.next_cid;
        a.next_cid = a.next_cid.wrapping_add(1);
        sqe.set_cid(cid);
        a.rings.push(&sqe);
        a.rings.ring_sq();
        let deadline = Instant::now() + Duration::from_millis(self.cap.timeout_ms.max(5000));
        loop {
            if let Some(c) = a.rings.pop() {
                a.rings.ring_cq();
                if c.cid != cid {
                    continue; // a late completion of a command we gave up on
                }
                if !c.status.ok() {
                    return Err(Error::os(
                        &format!(
                            "NVMe controller {}: admin command {:#04x} failed: {}",
                            self.bdf(),
                            sqe.opcode(),
                            c.status
                        ),
                        std::io::Error::from_raw_os_error(c.status.errno()),
                    ));
                }
                return Ok(c.result);
            }
            if Instant::now() > deadline {
                return Err(ctrl_err(self.bdf(), format!("admin command {:#04x} timed out", sqe.opcode())));
            }
            std::hint::spin_loop();
        }
    }

    pub fn admin(&self, sqe: Sqe) -> Result<u32> {
        let mut a = self.lock_admin();
        self.admin_locked(&mut a, sqe)
    }

    pub fn identify(&self, cns: u32, nsid: u32, out: &mut [u8; 4096]) -> Result<()> {
        let mut a = self.lock_admin();
        let mut sqe = Sqe::new(admin::IDENTIFY, nsid);
        sqe.set_prp(a.data.iova, 0);
        sqe.set_cdw(10, cns);
        self.admin_locked(&mut a, sqe)?;
        // SAFETY: the command completed; nothing else uses the admin data
        // page while we hold the admin lock.
        out.copy_from_slice(unsafe { &a.data.bytes()[..4096] });
        Ok(())
    }

    pub fn namespace(&self, nsid: u32) -> Result<IdNamespace> {
        if nsid == 0 || nsid > self.id.namespaces {
            return Err(invalid(format!(
                "NVMe controller {}: no namespace {nsid} (it has {})",
                self.bdf(),
                self.id.namespaces
            )));
        }
        let mut raw = [0u8; 4096];
        self.identify(admin::CNS_NAMESPACE, nsid, &mut raw)?;
        let ns = IdNamespace::parse(&raw).ok_or_else(|| {
            invalid(format!(
                "NVMe controller {}: namespace {nsid} is inactive or has an unusable LBA format",
                self.bdf()
            ))
        })?;
        if ns.metadata_size != 0 {
            return Err(unsupported(format!(
                "NVMe controller {}: namespace {nsid} has {} bytes of metadata per block",
                self.bdf(),
                ns.metadata_size
            )));
        }
        Ok(ns)
    }

    /// Set Features, number of queues: must come before any I/O queue is
    /// made after an enable, so it runs under the admin lock the enable held.
    fn set_queue_count(&self, a: &mut Admin) -> Result<u16> {
        let want = u32::from(MAX_IO_QUEUES - 1);
        let mut sqe = Sqe::new(admin::SET_FEATURES, 0);
        sqe.set_cdw(10, admin::FEAT_NUM_QUEUES);
        sqe.set_cdw(11, (want << 16) | want);
        let r = self.admin_locked(a, sqe)?;
        Ok(((r & 0xffff).min(r >> 16) as u16).saturating_add(1).min(MAX_IO_QUEUES))
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A free qid for a shard's queue pair.
    pub fn take_qid(&self) -> Result<u16> {
        let mut q = self.qids.lock().unwrap_or_else(|e| e.into_inner());
        let i = (1..q.len()).find(|&i| !q[i]).ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                format!("NVMe controller {}: all {} I/O queues in use", self.bdf(), self.io_queues),
            )
        })?;
        q[i] = true;
        Ok(i as u16)
    }

    pub fn put_qid(&self, qid: u16) {
        if let Some(s) = self.qids.lock().unwrap_or_else(|e| e.into_inner()).get_mut(usize::from(qid)) {
            *s = false;
        }
    }

    /// The eventfd MSI-X vector `qid` fires, if interrupts are set up.
    pub fn vector(&self, qid: u16) -> Option<std::os::fd::RawFd> {
        self.vectors.get(usize::from(qid)).map(|f| f.as_raw_fd())
    }

    /// Create I/O queue `rings.qid` on the device (CQ, then its SQ). Returns
    /// the generation it was made in.
    pub fn create_io_queue(&self, rings: &mut Rings) -> Result<u64> {
        let mut a = self.lock_admin();
        let generation = self.generation();
        rings.reset();
        let qid = u32::from(rings.qid);
        let size = (u32::from(rings.depth) - 1) << 16;
        let mut cq = Sqe::new(admin::CREATE_IO_CQ, 0);
        cq.set_prp(rings.cq.iova, 0);
        cq.set_cdw(10, size | qid);
        // Physically contiguous (PC); interrupts (IEN) on vector qid when we
        // have one for it.
        let ien = if self.vector(rings.qid).is_some() { (qid << 16) | 2 } else { 0 };
        cq.set_cdw(11, ien | 1);
        self.admin_locked(&mut a, cq)?;
        let mut sq = Sqe::new(admin::CREATE_IO_SQ, 0);
        sq.set_prp(rings.sq.iova, 0);
        sq.set_cdw(10, size | qid);
        sq.set_cdw(11, (qid << 16) | 1);
        if let Err(e) = self.admin_locked(&mut a, sq) {
            let mut del = Sqe::new(admin::DELETE_IO_CQ, 0);
            del.set_cdw(10, qid);
            let _ = self.admin_locked(&mut a, del);
            return Err(e);
        }
        Ok(generation)
    }

    /// Delete I/O queue `qid` (SQ first: the spec requires a CQ to have no
    /// SQs left when it goes). Nothing to do if a reset has already wiped
    /// it. True when the device is done with the queue's commands: a
    /// deleted SQ's commands are completed or aborted before the delete
    /// completes.
    pub fn delete_io_queue(&self, qid: u16, generation: u64) -> bool {
        let mut a = self.lock_admin();
        if generation != self.generation() {
            return true;
        }
        let mut ok = true;
        for op in [admin::DELETE_IO_SQ, admin::DELETE_IO_CQ] {
            let mut s = Sqe::new(op, 0);
            s.set_cdw(10, u32::from(qid));
            ok &= self.admin_locked(&mut a, s).is_ok();
        }
        ok
    }

    /// Controller reset and recovery: disable, bring the admin queue up
    /// again, ask for the queues again. Every shard's I/O queue sees the new
    /// generation at its next turn, makes its queue pair again and
    /// resubmits the commands it had in flight (none of them was
    /// acknowledged: a command is done only when its completion is read).
    pub fn reset(&self, seen: u64, why: &str) -> Result<()> {
        {
            let mut a = self.lock_admin();
            // Several shards may see the same hang: the first resets, the
            // others find the generation moved on and leave it at that.
            if self.generation() != seen {
                return Ok(());
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.resets.fetch_add(1, Ordering::Relaxed);
            eprintln!("ringblk: NVMe controller {}: resetting ({why})", self.bdf());
            let n = self.enable(&mut a).and_then(|()| self.set_queue_count(&mut a));
            match n {
                Ok(n) if n >= self.io_queues => {}
                Ok(n) => {
                    self.stop_dma();
                    return Err(ctrl_err(
                        self.bdf(),
                        format!("granted {n} I/O queues after reset, {} before", self.io_queues),
                    ));
                }
                Err(e) => {
                    self.stop_dma();
                    return Err(e);
                }
            }
        }
        // Wake every shard sleeping on its interrupt so it notices.
        for fd in &self.vectors {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to an eventfd we own.
            let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
        Ok(())
    }

    /// The controller could not be brought back: turn off its bus mastering
    /// so that it can no longer touch memory, before the commands it held
    /// are failed and their buffers handed back.
    pub fn stop_dma(&self) {
        if let Err(e) = self.dev.stop_dma() {
            eprintln!("ringblk: NVMe controller {}: {e}", self.bdf());
        }
    }

    /// Is the controller in fatal status (CSTS.CFS) or gone?
    pub fn failed(&self) -> bool {
        let s = self.dev.read32(reg::CSTS);
        s == u32::MAX || s & csts::CFS != 0
    }
}

impl Drop for Controller {
    /// Normal shutdown notification, then wait for the controller to say
    /// it is done: a volatile write cache is written back by then.
    fn drop(&mut self) {
        let cfg = self.dev.read32(reg::CC);
        if cfg & cc::EN == 0 {
            return;
        }
        self.dev.write32(reg::CC, (cfg & !cc::SHN_MASK) | cc::SHN_NORMAL);
        if let Err(e) = self.wait_csts("shutting down", |s| s & csts::SHST_MASK == csts::SHST_COMPLETE) {
            eprintln!("ringblk: {e}");
        }
        self.dev.disable_msix();
    }
}

/// Parse `0000:01:00.0` (domain optional) into its canonical form.
pub fn parse_bdf(s: &str) -> Result<String> {
    let bad = || invalid(format!("'{s}' is not a PCI address (expected DDDD:BB:SS.F, e.g. 0000:01:00.0)"));
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s.to_string() };
    let (dom, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (slot, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |v: &str, max: u32| u32::from_str_radix(v, 16).ok().filter(|&n| n <= max && !v.is_empty());
    match (hex(dom, 0xffff), hex(bus, 0xff), hex(slot, 0x1f), hex(func, 7)) {
        (Some(d), Some(b), Some(sl), Some(f)) => Ok(format!("{d:04x}:{b:02x}:{sl:02x}.{f}")),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        assert_eq!(parse_bdf("0000:01:00.0").unwrap(), "0000:01:00.0");
        assert_eq!(parse_bdf("01:00.0").unwrap(), "0000:01:00.0");
        assert_eq!(parse_bdf("0000:0A:1f.7").unwrap(), "0000:0a:1f.7");
        for bad in ["", "0000:01:00", "0000:01:20.0", "0000:01:00.8", "x:01:00.0", "0000:100:00.0"] {
            assert!(parse_bdf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_controller_that_is_not_there_gives_a_clear_error() {
        let e = Controller::get("0000:fe:1f.7").err().expect("no such device");
        assert!(e.to_string().contains("0000:fe:1f.7"), "{e}");
    }
}
