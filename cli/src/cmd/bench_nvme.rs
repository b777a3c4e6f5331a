//! The NVMe contenders of `ringblk bench`: the namespace behind an NVMe
//! block device, reached through io_uring passthrough on its generic device
//! (`/dev/ngXnY`, no unbinding) and through our VFIO driver (the controller
//! rebound to vfio-pci for the run and handed back to nvme after it).
//! Knows sysfs and binding; the I/O is the drivers'.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::error::{invalid, Error, Result};

/// An NVMe namespace as the kernel shows it.
#[derive(Clone, Debug)]
pub struct Namespace {
    /// `nvme0n1`
    pub block: String,
    /// `/dev/ng0n1`
    pub generic: String,
    /// The controller's PCI address.
    pub bdf: String,
    pub nsid: u32,
    /// `nvme0`
    pub ctrl: String,
}

fn read_trim(p: &str) -> Result<String> {
    std::fs::read_to_string(p).map(|s| s.trim().to_string()).map_err(|e| Error::os(p, e))
}

/// The namespace behind `/dev/nvmeXnY` (or `/dev/ngXnY`).
pub fn namespace_of(path: &str) -> Result<Namespace> {
    let real = std::fs::canonicalize(path).map_err(|e| Error::os(path, e))?;
    let base = real.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    let rest = base
        .strip_prefix("nvme")
        .or_else(|| base.strip_prefix("ng"))
        .filter(|r| r.contains('n') && !r.contains('p'))
        .ok_or_else(|| {
            invalid(format!("{path} is not an NVMe namespace (/dev/nvmeXnY): io_uring_cmd and vfio need one"))
        })?;
    let block = format!("nvme{rest}");
    let ctrl = format!("nvme{}", rest.split('n').next().unwrap_or(""));
    let generic = format!("/dev/ng{rest}");
    // With native multipath the block device is the subsystem's head and
    // its `device` is the subsystem; the controller of the same number is
    // the way to the PCI device then.
    let pci = std::fs::canonicalize(format!("/sys/block/{block}/device/device"))
        .ok()
        .filter(|p| p.join("config").exists())
        .or_else(|| std::fs::canonicalize(format!("/sys/class/nvme/{ctrl}/device")).ok())
        .ok_or_else(|| invalid(format!("no PCI device found for {block}")))?;
    let bdf = pci.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    let nsid = read_trim(&format!("/sys/block/{block}/nsid"))?
        .parse()
        .map_err(|_| invalid(format!("/sys/block/{block}/nsid is not a number")))?;
    Ok(Namespace { block, generic, bdf, nsid, ctrl })
}

/// The block device of namespace 1's position under the nvme driver
/// (`nvmeXnY` of the controller at `bdf`), once it exists.
fn kernel_namespace(bdf: &str) -> Option<String> {
    let ctrl = std::fs::read_dir(format!("/sys/bus/pci/devices/{bdf}/nvme")).ok()?.flatten().next()?;
    let ctrl = ctrl.file_name().to_string_lossy().into_owned();
    let n =
        std::fs::read_dir("/sys/block").ok()?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).find(
            |b| {
                b.strip_prefix(ctrl.as_str())
                    .is_some_and(|r| r.starts_with('n') && r[1..].chars().all(|c| c.is_ascii_digit()))
            },
        )?;
    Path::new(&format!("/dev/{n}")).exists().then_some(n)
}

fn driver_of(bdf: &str) -> Option<String> {
    let t = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).ok()?;
    t.file_name().and_then(|n| n.to_str()).map(str::to_string)
}

fn write_sys(p: &str, v: &str) -> Result<()> {
    std::fs::write(p, v).map_err(|e| Error::os(&format!("writing '{}' to {p}", v.trim()), e))
}

/// The controller bound to vfio-pci for as long as this lives; dropped, it
/// goes back to the nvme driver and we wait for its namespaces to return.
pub struct VfioBinding {
    ns: Namespace,
}

impl VfioBinding {
    pub fn bind(ns: &Namespace) -> Result<VfioBinding> {
        // Unbinding pulls every namespace of the controller from under its
        // users: refuse if any is mounted or held.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let prefix = format!("/dev/{}n", ns.ctrl);
        if let Some(m) = mounts.lines().find(|l| l.starts_with(&prefix)) {
            return Err(invalid(format!("{} is in use ({}): the vfio run would unbind its controller", ns.ctrl, m)));
        }
        let dev = format!("/sys/bus/pci/devices/{}", ns.bdf);
        if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
            return Err(invalid("the vfio-pci driver is not loaded (modprobe vfio-pci)"));
        }
        if let Some(d) = driver_of(&ns.bdf) {
            write_sys(&format!("/sys/bus/pci/drivers/{d}/unbind"), &ns.bdf)?;
        }
        let b = VfioBinding { ns: ns.clone() };
        write_sys(&format!("{dev}/driver_override"), "vfio-pci")?;
        write_sys("/sys/bus/pci/drivers_probe", &ns.bdf)?;
        match driver_of(&ns.bdf).as_deref() {
            Some("vfio-pci") => Ok(b),
            other => {
                Err(invalid(format!("{} did not bind to vfio-pci (bound to {})", ns.bdf, other.unwrap_or("nothing"))))
            }
        }
    }
}

impl Drop for VfioBinding {
    fn drop(&mut self) {
        let bdf = &self.ns.bdf;
        if let Some(d) = driver_of(bdf) {
            let _ = write_sys(&format!("/sys/bus/pci/drivers/{d}/unbind"), bdf);
        }
        let _ = write_sys(&format!("/sys/bus/pci/devices/{bdf}/driver_override"), "\n");
        let _ = write_sys("/sys/bus/pci/drivers_probe", bdf);
        // The kernel names the controller afresh (the lowest free number),
        // so the namespace may come back under another name: wait for the
        // one under this PCI device.
        let deadline = Instant::now() + Duration::from_secs(10);
        let name = loop {
            if let Some(n) = kernel_namespace(bdf) {
                break Some(n);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        match name {
            Some(n) if n != self.ns.block => {
                eprintln!("ringblk bench: {bdf} is back with the nvme driver, its namespace now /dev/{n}")
            }
            Some(_) => {}
            None => {
                eprintln!("ringblk bench: {bdf} went back to {:?}, but its namespace has not come back", driver_of(bdf))
            }
        }
    }
}
