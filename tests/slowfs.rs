//! The slow-allocation rig (`slowfs`, bench/src/bin/slowfs.rs) and the
//! preallocate filter on it. The rig charges for what writes and fallocate
//! allocate and for nothing else, and passes through what the filter uses
//! (extended attributes, SEEK_DATA/SEEK_HOLE, O_DIRECT). On it, the filter
//! sees a FUSE filesystem and extends the file by moving its size only: the
//! image it writes there is QEMU's to read, ends where its data ends, and
//! nothing was allocated that the data did not need.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringblk_tests::{bin, path_str, qemu_check, run, write_patchy_disk, Rng};

/// A mounted slowfs over a fresh directory in /dev/shm; unmounted on drop.
struct SlowFs {
    child: Option<Child>,
    mnt: tempfile::TempDir,
    _backing: tempfile::TempDir,
}

fn mounted(mnt: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path_str(mnt).as_str()) && l.contains(" - fuse"))
}

impl SlowFs {
    fn mount(us_per_mib: u64) -> SlowFs {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the slow-allocation rig needs FUSE (and fusermount3, from fuse3)"
        );
        let backing = tempfile::tempdir_in("/dev/shm").unwrap();
        let mnt = tempfile::tempdir_in("/var/tmp").unwrap();
        let child = Command::new(bin("slowfs"))
            .arg("--alloc-us-per-mib")
            .arg(us_per_mib.to_string())
            .arg(backing.path())
            .arg(mnt.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let fs = SlowFs { child: Some(child), mnt, _backing: backing };
        let t0 = Instant::now();
        while !mounted(fs.mnt.path()) {
            assert!(t0.elapsed() < Duration::from_secs(10), "slowfs did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        fs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.path().join(name)
    }

    /// Unmount; the MiB the rig charged for (its closing report).
    fn unmount(mut self) -> u64 {
        run(Command::new("umount").arg(self.mnt.path()));
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "slowfs failed: {err}");
        // "slowfs: charged N allocations, M MiB, T ms"
        let mib = err.split(", ").nth(1).and_then(|s| s.strip_suffix(" MiB")).and_then(|s| s.parse().ok());
        mib.unwrap_or_else(|| panic!("no report from slowfs: {err}"))
    }
}

impl Drop for SlowFs {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("umount").arg("-l").arg(self.mnt.path()).status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn the_rig_charges_for_allocation_only_and_passes_through_what_the_filter_uses() {
    let fs = SlowFs::mount(1000);
    // fallocate of 16 MiB: charged.
    let a = File::create(fs.path("a")).unwrap();
    // SAFETY: a plain syscall on an open file.
    assert_eq!(unsafe { libc::fallocate(a.as_raw_fd(), 0, 0, 16 << 20) }, 0);
    // 8 MiB of new data with O_DIRECT: charged; written again: not.
    let b =
        File::options().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(fs.path("b")).unwrap();
    let mut buf = engine::runtime::IoBuf::zeroed(1 << 20);
    buf.copy_from_slice(&Rng::new(3).bytes(1 << 20));
    for pass in 0..2 {
        for i in 0..8u64 {
            b.write_all_at(&buf, i << 20).unwrap_or_else(|e| panic!("pass {pass}: {e}"));
        }
    }
    let mut back = engine::runtime::IoBuf::zeroed(1 << 20);
    b.read_exact_at(&mut back, 7 << 20).unwrap();
    assert!(back[..] == buf[..], "read back differs");
    // A hole after the data, found with SEEK_HOLE; growing by truncate is
    // not charged.
    b.set_len(32 << 20).unwrap();
    // SAFETY: plain syscalls on an open file.
    let (data, hole) =
        unsafe { (libc::lseek(b.as_raw_fd(), 0, libc::SEEK_DATA), libc::lseek(b.as_raw_fd(), 0, libc::SEEK_HOLE)) };
    assert_eq!((data, hole), (0, 8 << 20));
    // Extended attributes, as the filter's crash marker uses them.
    let name = c"user.ringblk.test";
    // SAFETY: an open file, a C string name and a live value.
    unsafe {
        assert_eq!(libc::fsetxattr(a.as_raw_fd(), name.as_ptr(), b"42".as_ptr().cast(), 2, 0), 0);
        let mut v = [0u8; 8];
        assert_eq!(libc::fgetxattr(a.as_raw_fd(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()), 2);
        assert_eq!(&v[..2], b"42");
        assert_eq!(libc::fremovexattr(a.as_raw_fd(), name.as_ptr()), 0);
    }
    drop((a, b));
    assert_eq!(fs.unmount(), 24, "charged for 16 MiB fallocated and 8 MiB written once");
}

#[test]
fn the_filter_on_slowfs_only_moves_the_size_and_qemu_accepts_the_image() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let src = d.path().join("src.raw");
    write_patchy_disk(&src, 11, 2);

    let fs = SlowFs::mount(200);
    let img = fs.path("img.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("64M"));
    let opts = format!(
        "driver=qcow2,file.driver=preallocate,file.prealloc-size=8M,file.file.driver=file,file.file.filename={}",
        path_str(&img)
    );
    // auto picks `sparse` on FUSE with O_DIRECT, `falloc` through the page
    // cache and on the local filesystem.
    let info = |opts: &str| -> serde_json::Value {
        let out = run(Command::new(bin("ringblk")).args(["info", "--output=json", "--image-opts", opts]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["children"][0]["info"]["format-specific"]["data"].clone()
    };
    let direct = format!("{opts},file.file.cache.direct=on");
    assert_eq!(info(&direct)["mode"], "sparse", "{}", info(&direct));
    assert_eq!(info(&opts)["mode"], "falloc", "{}", info(&opts));
    let local = d.path().join("local.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&local).arg("64M"));
    assert_eq!(info(&direct.replace(&path_str(&img), &path_str(&local)))["mode"], "falloc");

    run(Command::new(bin("ringblk"))
        .args(["convert", "-n", "-f", "raw", "-t", "none", "--target-image-opts"])
        .arg(&src)
        .arg(&opts));
    let (code, report) = qemu_check(&img, false);
    assert_eq!(code, 0, "qemu-img check: {report}");
    assert_eq!(report["leaks"].as_u64().unwrap_or(0), 0, "{report}");
    let end = report["image-end-offset"].as_u64().unwrap();
    assert_eq!(std::fs::metadata(&img).unwrap().len(), end, "cut back to the image's end: {report}");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&img));
    let charged = fs.unmount();
    // The data (19 MiB of it is not zero) and qcow2's metadata were
    // allocated; nothing past them was.
    assert!((19..=21).contains(&charged), "charged for {charged} MiB");
}
