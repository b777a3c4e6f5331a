//! VFIO (type 1 IOMMU): the container, the device's IOMMU group, the device
//! itself (its BAR0 mapped, its config space, MSI-X eventfds), and DMA
//! mappings within the IOVA ranges the IOMMU reports. Knows nothing of NVMe.
//!
//! The uapi structures come from the `vfio-bindings` crate. Every VFIO
//! ioctl is `_IO(';', 100 + n)`: no size or direction bits, the structure's
//! `argsz` says how much the kernel may read and write.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use engine::error::{invalid, unsupported, Error, Result};
use vfio_bindings::bindings::vfio as uapi;

const fn vfio_ioctl(n: u32) -> libc::c_ulong {
    ((uapi::VFIO_TYPE as libc::c_ulong) << 8) | (uapi::VFIO_BASE + n) as libc::c_ulong
}
const GET_API_VERSION: libc::c_ulong = vfio_ioctl(0);
const CHECK_EXTENSION: libc::c_ulong = vfio_ioctl(1);
const SET_IOMMU: libc::c_ulong = vfio_ioctl(2);
const GROUP_GET_STATUS: libc::c_ulong = vfio_ioctl(3);
const GROUP_SET_CONTAINER: libc::c_ulong = vfio_ioctl(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_ioctl(6);
const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_ioctl(8);
const DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_ioctl(9);
const DEVICE_SET_IRQS: libc::c_ulong = vfio_ioctl(10);
const DEVICE_RESET: libc::c_ulong = vfio_ioctl(11);
const IOMMU_GET_INFO: libc::c_ulong = vfio_ioctl(12);
const IOMMU_MAP_DMA: libc::c_ulong = vfio_ioctl(13);
const IOMMU_UNMAP_DMA: libc::c_ulong = vfio_ioctl(14);

/// PCI config space: the command register and its bus master bit.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Legacy INTx off: we take MSI-X or poll.
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

fn os_err(what: String) -> Error {
    Error::os(&what, std::io::Error::last_os_error())
}

/// ioctl with a pointer argument; the result is the ioctl's return value.
///
/// # Safety
/// `arg` must point at memory laid out as the ioctl `req` expects, at
/// least as large as the `argsz` it carries, valid for the kernel to read
/// and write for the duration of the call.
unsafe fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> libc::c_int {
    // SAFETY: the caller's contract.
    unsafe { libc::ioctl(fd, req, arg) }
}

fn ioctl_val(fd: RawFd, req: libc::c_ulong, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: these requests take an integer argument, not a pointer.
    unsafe { libc::ioctl(fd, req, arg) }
}

/// An IOVA range the IOMMU can map, inclusive of `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRange {
    pub start: u64,
    pub end: u64,
}

/// A VFIO container holding one group, with the type 1 IOMMU set.
pub struct Container {
    fd: OwnedFd,
    /// Kept open: closing the group would detach it from the container.
    group: File,
    pub iova_ranges: Vec<IovaRange>,
    /// Smallest IOMMU page size.
    pub iommu_page: u64,
}

/// The PCI device: BAR0 mapped, config space through the device fd.
pub struct Device {
    fd: File,
    bdf: String,
    config_offset: u64,
    bar0: NonNull<u8>,
    bar0_len: usize,
}

// SAFETY: the BAR mapping is device memory reached only through volatile
// reads and writes (Device::read32 and friends), which any thread may make;
// the fd is a plain file.
unsafe impl Send for Device {}
// SAFETY: as for Send: no method hands out references into the mapping.
unsafe impl Sync for Device {}

/// The IOMMU group of a PCI device, from sysfs.
fn iommu_group(bdf: &str) -> Result<u32> {
    let link = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| {
        Error::os(&format!("PCI device {bdf}: no IOMMU group ({link}); is the IOMMU on and the address right?"), e)
    })?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.parse().map_err(|_| invalid(format!("PCI device {bdf}: odd IOMMU group link {}", target.display())))
}

/// The driver a PCI device is bound to, if any.
pub fn bound_driver(bdf: &str) -> Option<String> {
    let t = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).ok()?;
    t.file_name().and_then(|n| n.to_str()).map(str::to_string)
}

impl Container {
    /// Open the container and the group of `bdf`, and set the IOMMU.
    pub fn open(bdf: &str) -> Result<Container> {
        let group_no = iommu_group(bdf)?;
        match bound_driver(bdf).as_deref() {
            Some("vfio-pci") => {}
            other => {
                return Err(invalid(format!(
                    "PCI device {bdf} is bound to {}, not vfio-pci: echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override, unbind it, then echo {bdf} > /sys/bus/pci/drivers_probe",
                    other.unwrap_or("no driver")
                )))
            }
        }
        let container = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/vfio/vfio")
            .map_err(|e| Error::os("/dev/vfio/vfio (is the vfio module loaded?)", e))?;
        let cfd = container.as_raw_fd();
        if ioctl_val(cfd, GET_API_VERSION, 0) != uapi::VFIO_API_VERSION as i32 {
            return Err(unsupported("/dev/vfio/vfio: unknown VFIO API version"));
        }
        if ioctl_val(cfd, CHECK_EXTENSION, uapi::VFIO_TYPE1v2_IOMMU.into()) != 1 {
            return Err(unsupported("VFIO: no type 1 (v2) IOMMU (load vfio_iommu_type1)"));
        }
        let gpath = format!("/dev/vfio/{group_no}");
        let group = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&gpath)
            .map_err(|e| Error::os(&format!("{gpath} (PCI device {bdf})"), e))?;
        let mut status =
            uapi::vfio_group_status { argsz: std::mem::size_of::<uapi::vfio_group_status>() as u32, flags: 0 };
        // SAFETY: vfio_group_status with its argsz set, on our stack.
        if unsafe { ioctl_ptr(group.as_raw_fd(), GROUP_GET_STATUS, &mut status) } < 0 {
            return Err(os_err(format!("{gpath}: VFIO_GROUP_GET_STATUS")));
        }
        if status.flags & uapi::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(invalid(format!(
                "IOMMU group {group_no} of {bdf} is not viable: bind every device in it to vfio-pci"
            )));
        }
        let mut c = cfd;
        // SAFETY: the argument is a pointer to the container fd, as the
        // ioctl expects.
        if unsafe { ioctl_ptr(group.as_raw_fd(), GROUP_SET_CONTAINER, &mut c) } < 0 {
            return Err(os_err(format!("{gpath}: VFIO_GROUP_SET_CONTAINER")));
        }
        if ioctl_val(cfd, SET_IOMMU, uapi::VFIO_TYPE1v2_IOMMU.into()) < 0 {
            return Err(os_err("VFIO_SET_IOMMU (type 1 v2)".into()));
        }
        let (iova_ranges, iommu_page) = iommu_info(cfd)?;
        Ok(Container { fd: container.into(), group, iova_ranges, iommu_page })
    }

    /// Open the device `bdf` of the container's group: map BAR0, turn on
    /// memory decoding and bus mastering (without it every DMA the device
    /// makes is dropped).
    pub fn device(&self, bdf: &str) -> Result<Device> {
        let name = CString::new(bdf).map_err(|_| invalid("PCI address with a NUL byte"))?;
        // SAFETY: the argument is a NUL-terminated string, as the ioctl
        // expects; it outlives the call.
        let fd = unsafe { libc::ioctl(self.group.as_raw_fd(), GROUP_GET_DEVICE_FD, name.as_ptr()) };
        if fd < 0 {
            return Err(os_err(format!("PCI device {bdf}: VFIO_GROUP_GET_DEVICE_FD")));
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        let bar = region_info(fd.as_raw_fd(), uapi::VFIO_PCI_BAR0_REGION_INDEX)?;
        let cfg = region_info(fd.as_raw_fd(), uapi::VFIO_PCI_CONFIG_REGION_INDEX)?;
        if bar.flags & uapi::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x2000 {
            return Err(unsupported(format!("PCI device {bdf}: BAR0 cannot be mapped ({} bytes)", bar.size)));
        }
        let len = bar.size as usize;
        // SAFETY: a fresh shared mapping of the device's BAR0 region at the
        // offset VFIO gave; we check the result before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                bar.offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_err(format!("PCI device {bdf}: mmap of BAR0")));
        }
        let dev = Device {
            fd,
            bdf: bdf.to_string(),
            config_offset: cfg.offset,
            bar0: NonNull::new(p.cast()).expect("mmap succeeded, so not null"),
            bar0_len: len,
        };
        let cmd = dev.config_read16(PCI_COMMAND)?;
        dev.config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)?;
        Ok(dev)
    }

    /// Map `len` bytes at `vaddr` for the device to read and write at `iova`.
    pub fn map_dma(&self, vaddr: *const u8, iova: u64, len: usize) -> Result<()> {
        let mut m = uapi::vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dma_map>() as u32,
            flags: uapi::VFIO_DMA_MAP_FLAG_READ | uapi::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        // SAFETY: a dma_map structure with its argsz, on our stack; the
        // kernel pins the pages it names, which the caller keeps mapped
        // until unmap_dma.
        if unsafe { ioctl_ptr(self.fd.as_raw_fd(), IOMMU_MAP_DMA, &mut m) } < 0 {
            return Err(os_err(format!("VFIO_IOMMU_MAP_DMA of {len} bytes at IOVA {iova:#x}")));
        }
        Ok(())
    }

    pub fn unmap_dma(&self, iova: u64, len: usize) -> Result<()> {
        let mut m = uapi::vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len as u64,
            data: Default::default(),
        };
        // SAFETY: a dma_unmap structure with its argsz (no bitmap), on our stack.
        if unsafe { ioctl_ptr(self.fd.as_raw_fd(), IOMMU_UNMAP_DMA, &mut m) } < 0 {
            return Err(os_err(format!("VFIO_IOMMU_UNMAP_DMA of {len} bytes at IOVA {iova:#x}")));
        }
        Ok(())
    }
}

fn region_info(fd: RawFd, index: u32) -> Result<uapi::vfio_region_info> {
    let mut r = uapi::vfio_region_info {
        argsz: std::mem::size_of::<uapi::vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: a region_info structure with its argsz, on our stack.
    if unsafe { ioctl_ptr(fd, DEVICE_GET_REGION_INFO, &mut r) } < 0 {
        return Err(os_err(format!("VFIO_DEVICE_GET_REGION_INFO {index}")));
    }
    Ok(r)
}

/// The IOMMU's IOVA ranges and smallest page size (VFIO_IOMMU_GET_INFO and
/// its capability chain). A kernel too old to report ranges gets the
/// conventional x86 one: below the MSI window, above the first page.
fn iommu_info(cfd: RawFd) -> Result<(Vec<IovaRange>, u64)> {
    let base = std::mem::size_of::<uapi::vfio_iommu_type1_info>();
    let mut buf = vec![0u64; base.div_ceil(8)];
    let mut argsz = base as u32;
    loop {
        buf.resize((argsz as usize).div_ceil(8), 0);
        buf[0] = u64::from(argsz);
        // SAFETY: buf is at least argsz bytes, 8-byte aligned, and starts
        // with the info structure's argsz field (low half of word 0, on a
        // little-endian machine; flags start zero).
        if unsafe { ioctl_ptr(cfd, IOMMU_GET_INFO, buf.as_mut_ptr()) } < 0 {
            return Err(os_err("VFIO_IOMMU_GET_INFO".into()));
        }
        let wanted = buf[0] as u32;
        if wanted <= argsz {
            break;
        }
        argsz = wanted;
    }
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
    let flags = u32_at(4).unwrap_or(0);
    let pgsizes = u64_at(8).unwrap_or(4096);
    let page = if pgsizes == 0 { 4096 } else { 1u64 << pgsizes.trailing_zeros() };
    let mut ranges = Vec::new();
    if flags & uapi::VFIO_IOMMU_INFO_CAPS != 0 {
        let mut off = u32_at(16).unwrap_or(0) as usize;
        // Walk the chain; each header is (id u16, version u16, next u32).
        let mut hops = 0;
        while off != 0 && off + 16 <= bytes.len() && hops < 64 {
            hops += 1;
            let id = u32_at(off).unwrap_or(0) & 0xffff;
            let next = u32_at(off + 4).unwrap_or(0) as usize;
            if id == uapi::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                let n = u32_at(off + 8).unwrap_or(0) as usize;
                for i in 0..n.min(1024) {
                    let o = off + 16 + i * 16;
                    if let (Some(start), Some(end)) = (u64_at(o), u64_at(o + 8)) {
                        ranges.push(IovaRange { start, end });
                    }
                }
            }
            off = next;
        }
    }
    if ranges.is_empty() {
        ranges.push(IovaRange { start: 0x1_0000, end: 0xfedf_ffff });
    }
    Ok((ranges, page))
}

impl Device {
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    fn reg_ptr<T>(&self, off: usize) -> *mut T {
        assert!(
            off.is_multiple_of(std::mem::size_of::<T>()) && off + std::mem::size_of::<T>() <= self.bar0_len,
            "register offset {off:#x} outside BAR0 or misaligned"
        );
        // SAFETY: checked above to lie within the mapping.
        unsafe { self.bar0.as_ptr().add(off).cast() }
    }

    /// Registers are read and written with one volatile access of their
    /// width: the device sees exactly the accesses we make, in order.
    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: an aligned register inside BAR0 (reg_ptr checks).
        u32::from_le(unsafe { self.reg_ptr::<u32>(off).read_volatile() })
    }
    pub fn write32(&self, off: usize, v: u32) {
        // SAFETY: an aligned register inside BAR0 (reg_ptr checks).
        unsafe { self.reg_ptr::<u32>(off).write_volatile(v.to_le()) }
    }
    /// 64-bit registers as two 32-bit halves, low first: controllers must
    /// accept that, while not every host bridge passes 64-bit MMIO.
    pub fn read64(&self, off: usize) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }
    pub fn write64(&self, off: usize, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }
    /// A doorbell register's address, for a queue that rings it itself.
    pub fn doorbell(&self, off: usize) -> *mut u32 {
        self.reg_ptr(off)
    }

    pub fn config_read16(&self, off: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.fd
            .read_exact_at(&mut b, self.config_offset + off)
            .map_err(|e| Error::os(&format!("PCI device {}: config read at {off:#x}", self.bdf), e))?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn config_write16(&self, off: u64, v: u16) -> Result<()> {
        self.fd
            .write_all_at(&v.to_le_bytes(), self.config_offset + off)
            .map_err(|e| Error::os(&format!("PCI device {}: config write at {off:#x}", self.bdf), e))
    }

    /// MSI-X vectors the device has.
    pub fn msix_count(&self) -> u32 {
        let mut i = uapi::vfio_irq_info {
            argsz: std::mem::size_of::<uapi::vfio_irq_info>() as u32,
            index: uapi::VFIO_PCI_MSIX_IRQ_INDEX,
            ..Default::default()
        };
        // SAFETY: an irq_info structure with its argsz, on our stack.
        if unsafe { ioctl_ptr(self.fd.as_raw_fd(), DEVICE_GET_IRQ_INFO, &mut i) } < 0 {
            return 0;
        }
        i.count
    }

    /// Route MSI-X vectors `0..fds.len()` to the eventfds (-1: none).
    pub fn set_msix(&self, fds: &[RawFd]) -> Result<()> {
        let head = std::mem::size_of::<uapi::vfio_irq_set>();
        let len = head + 4 * fds.len();
        let mut buf = vec![0u32; len.div_ceil(4)];
        buf[0] = len as u32;
        buf[1] = uapi::VFIO_IRQ_SET_DATA_EVENTFD | uapi::VFIO_IRQ_SET_ACTION_TRIGGER;
        buf[2] = uapi::VFIO_PCI_MSIX_IRQ_INDEX;
        buf[3] = 0;
        buf[4] = fds.len() as u32;
        for (i, fd) in fds.iter().enumerate() {
            buf[head / 4 + i] = *fd as u32;
        }
        // SAFETY: buf holds an irq_set header (argsz = its length) and the
        // eventfd array after it, 4-byte aligned as the structure needs.
        if unsafe { ioctl_ptr(self.fd.as_raw_fd(), DEVICE_SET_IRQS, buf.as_mut_ptr()) } < 0 {
            return Err(os_err(format!(
                "PCI device {}: VFIO_DEVICE_SET_IRQS (MSI-X, {} vectors)",
                self.bdf,
                fds.len()
            )));
        }
        Ok(())
    }

    /// Turn bus mastering off: the device can no longer read or write memory.
    pub fn stop_dma(&self) -> Result<()> {
        let cmd = self.config_read16(PCI_COMMAND)?;
        self.config_write16(PCI_COMMAND, cmd & !PCI_COMMAND_MASTER)
    }

    /// Tear down the MSI-X routing (DATA_NONE with no vectors).
    pub fn disable_msix(&self) {
        let mut s = uapi::vfio_irq_set {
            argsz: std::mem::size_of::<uapi::vfio_irq_set>() as u32,
            flags: uapi::VFIO_IRQ_SET_DATA_NONE | uapi::VFIO_IRQ_SET_ACTION_TRIGGER,
            index: uapi::VFIO_PCI_MSIX_IRQ_INDEX,
            start: 0,
            count: 0,
            data: Default::default(),
        };
        // SAFETY: an irq_set header with its argsz and no data, on our stack.
        let _ = unsafe { ioctl_ptr(self.fd.as_raw_fd(), DEVICE_SET_IRQS, &mut s) };
    }

    /// Function-level reset, where the device offers one.
    pub fn reset(&self) -> bool {
        ioctl_val(self.fd.as_raw_fd(), DEVICE_RESET, 0) == 0
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: our own mapping of BAR0, unused from here on.
        unsafe { libc::munmap(self.bar0.as_ptr().cast(), self.bar0_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_follow_the_uapi() {
        // _IO(';', 100) and _IO(';', 113), as linux/vfio.h defines them.
        assert_eq!(GET_API_VERSION, 0x3b64);
        assert_eq!(IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(std::mem::size_of::<uapi::vfio_iommu_type1_dma_map>(), 32);
        assert_eq!(std::mem::size_of::<uapi::vfio_irq_set>(), 20);
    }

    #[test]
    fn a_device_without_an_iommu_group_is_refused_by_name() {
        let e = Container::open("0000:ff:1f.7").err().expect("no such device");
        assert!(e.to_string().contains("0000:ff:1f.7"), "{e}");
    }
}
