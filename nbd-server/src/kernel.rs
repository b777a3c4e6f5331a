//! `ringblk-nbd -c DEV` and `-d DEV`: hand a connection to our own server to
//! the Linux NBD driver (ioctl interface of linux/nbd.h), and take it back.
//! The kernel speaks only simple replies, so this connection negotiates none
//! of the newer reply forms. Tested in the guest harness (scripts/vm; the
//! host has no nbd module): tests/vm_kernel_nbd.rs.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::error::{invalid, Error, Result};

use crate::client::handshake::{connect_simple, Addr};

const fn nbd_io(nr: u64) -> u64 {
    (0xab << 8) | nr
}
const NBD_SET_SOCK: u64 = nbd_io(0);
const NBD_SET_BLKSIZE: u64 = nbd_io(1);
const NBD_DO_IT: u64 = nbd_io(3);
const NBD_CLEAR_SOCK: u64 = nbd_io(4);
const NBD_CLEAR_QUE: u64 = nbd_io(5);
const NBD_SET_SIZE_BLOCKS: u64 = nbd_io(7);
const NBD_DISCONNECT: u64 = nbd_io(8);
const NBD_SET_FLAGS: u64 = nbd_io(10);

fn open_dev(dev: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| Error::os("Failed to open device", e).with_file(dev))
}

fn ioctl(dev: &str, f: &std::fs::File, req: u64, arg: u64) -> Result<()> {
    // SAFETY: the NBD ioctls take an integer argument, no memory.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg as libc::c_ulong) };
    if r < 0 {
        return Err(Error::os(&format!("NBD ioctl {req:#x}"), std::io::Error::last_os_error()).with_file(dev));
    }
    Ok(())
}

/// The address our own listener answers on.
fn own_addr(listeners: &[OwnedFd], socket: Option<&str>) -> Result<Addr> {
    if let Some(p) = socket {
        return Ok(Addr::Unix(p.to_string()));
    }
    let l = listeners.first().ok_or_else(|| invalid("no listening socket"))?;
    // SAFETY: sockaddr_storage is plain data; getsockname fills at most len bytes.
    let port = unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(l.as_raw_fd(), (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) != 0 {
            return Err(Error::os("getsockname", std::io::Error::last_os_error()));
        }
        match ss.ss_family as i32 {
            libc::AF_INET => {
                u16::from_be((*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()).sin_port)
            }
            libc::AF_INET6 => {
                u16::from_be((*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()).sin6_port)
            }
            _ => return Err(invalid("-c needs a TCP or unix listener")),
        }
    };
    Ok(Addr::Tcp { host: "localhost".into(), port })
}

/// The kernel side of `-c`: runs until the device is disconnected.
pub struct KernelClient {
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl KernelClient {
    /// Wait for the device's connection to end; its error, if it never ran.
    pub fn finish(mut self) -> Result<()> {
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(invalid("the NBD device thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for KernelClient {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `-c` tells the rest of the server.
pub struct Hooks {
    /// Called once the device is up (its size set, I/O flowing): releases
    /// the parent of a forked server, as qemu-nbd's does.
    pub ready: Box<dyn FnOnce() + Send>,
    /// Set, and the accept loop woken through `wake`, when the device's
    /// connection ends: the server exits with it, as qemu-nbd does.
    pub stop: Arc<AtomicBool>,
    pub wake: UnixStream,
}

/// `/sys/block/NAME/pid` exists while the kernel runs the device.
fn sys_pid_path(dev: &str) -> Option<std::path::PathBuf> {
    let real = std::fs::canonicalize(dev).ok()?;
    let name = real.file_name()?.to_str()?.to_string();
    Some(std::path::Path::new("/sys/block").join(name).join("pid"))
}

/// Connect `dev` to this server (already listening). The connection is
/// negotiated on a thread, since the accept loop that answers it has not
/// started yet; the thread then sits in NBD_DO_IT until `-d`.
pub fn connect(
    dev: &str,
    export: &str,
    listeners: &[OwnedFd],
    socket: Option<&str>,
    hooks: Hooks,
) -> Result<KernelClient> {
    let addr = own_addr(listeners, socket)?;
    let f = open_dev(dev)?;
    let pid_path = sys_pid_path(dev);
    if pid_path.as_ref().is_some_and(|p| p.exists()) {
        return Err(invalid("the NBD device is already connected").with_file(dev));
    }
    let (dev, export) = (dev.to_string(), export.to_string());
    let Hooks { ready, stop, wake } = hooks;
    let thread = std::thread::Builder::new()
        .name("nbd-device".into())
        .spawn(move || {
            let r = (|| -> Result<()> {
                let (fd, info) = connect_simple(&addr, &export, Some(Duration::from_secs(30)))
                    .map_err(|e| Error::os("NBD negotiation", e).with_file(dev.clone()))?;
                ioctl(&dev, &f, NBD_SET_BLKSIZE, 512)?;
                ioctl(&dev, &f, NBD_SET_SIZE_BLOCKS, info.size / 512)?;
                ioctl(&dev, &f, NBD_SET_FLAGS, u64::from(info.flags))?;
                ioctl(&dev, &f, NBD_CLEAR_SOCK, 0)?;
                ioctl(&dev, &f, NBD_SET_SOCK, fd.as_raw_fd() as u64)?;
                // NBD_DO_IT starts the device, then blocks until it is
                // disconnected; a watcher reports the start.
                let ended = Arc::new(AtomicBool::new(false));
                let watcher = {
                    let ended = ended.clone();
                    std::thread::spawn(move || {
                        let deadline = std::time::Instant::now() + Duration::from_secs(30);
                        while !ended.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                            if pid_path.as_ref().is_none_or(|p| p.exists()) {
                                ready();
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    })
                };
                let done = ioctl(&dev, &f, NBD_DO_IT, 0);
                ended.store(true, Ordering::Release);
                let _ = watcher.join();
                let _ = ioctl(&dev, &f, NBD_CLEAR_QUE, 0);
                let _ = ioctl(&dev, &f, NBD_CLEAR_SOCK, 0);
                drop(fd);
                // NBD_DO_IT fails (EIO) when the connection dies under the
                // device rather than by -d: worth a word, not an exit code.
                if let Err(e) = done {
                    eprintln!("ringblk-nbd: {dev}: the device's connection ended: {e}");
                }
                Ok(())
            })();
            stop.store(true, Ordering::Release);
            let _ = (&wake).write(&[1]);
            r
        })
        .map_err(|e| Error::os("spawning the NBD device thread", e))?;
    Ok(KernelClient { thread: Some(thread) })
}

/// `-d DEV`: tell the kernel to drop the device's connection.
pub fn disconnect(dev: &str) -> Result<()> {
    let f = open_dev(dev)?;
    ioctl(dev, &f, NBD_DISCONNECT, 0)?;
    ioctl(dev, &f, NBD_CLEAR_SOCK, 0)
}
