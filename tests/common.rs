//! Helpers shared by the cross-backend tests in this folder: the backend and
//! cache combinations every scenario runs under, opening raw images on a shard,
//! a seeded RNG, plain-std reads to check the engine against, block-status walks,
//! and the root-only fixtures (a loop-mounted ext4, a loop device) with guards
//! that tear them down on failure too. The scenarios themselves live in the test
//! files (`backends.rs`, `nospace.rs`, `host_device.rs`). `nbdproc` is the
//! NBD server process guard the NBD test files share.

pub mod nbdproc;

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use engine::aio::Backend;
use engine::block::{open_image, BlockNode, CacheMode, Extent, OpenCtx, OpenFlags, WriteFlags};
use engine::options::OptionTree;
use engine::runtime::{IoBuf, Runtime};
use engine::Result;

/// One backend under one cache mode.
#[derive(Clone, Copy, Debug)]
pub struct Combo {
    pub backend: Backend,
    /// A QEMU cache mode name ("none", "writeback", ...).
    pub cache: &'static str,
}

impl Combo {
    pub fn cache_mode(&self) -> CacheMode {
        self.cache.parse().expect("combos use valid cache mode names")
    }

    /// O_DIRECT: requests are subject to the storage's alignment.
    pub fn direct(&self) -> bool {
        self.cache_mode().direct
    }

    pub fn flags(&self) -> OpenFlags {
        OpenFlags { write: true, aio: self.backend, cache: self.cache_mode(), ..Default::default() }
    }
}

// aio=native needs O_DIRECT, so it only runs with cache=none; the other two run
// both through the page cache and around it.
pub const THREADS_WRITEBACK: Combo = Combo { backend: Backend::Threads, cache: "writeback" };
pub const THREADS_NONE: Combo = Combo { backend: Backend::Threads, cache: "none" };
pub const NATIVE_NONE: Combo = Combo { backend: Backend::Native, cache: "none" };
pub const IO_URING_WRITEBACK: Combo = Combo { backend: Backend::IoUring, cache: "writeback" };
pub const IO_URING_NONE: Combo = Combo { backend: Backend::IoUring, cache: "none" };

/// One module per combination, one `#[test]` per scenario in it, each calling
/// `scenario(combo)` from the invoking file: `threads_none::round_trip` etc.
#[macro_export]
macro_rules! per_combo {
    ($($scenario:ident),+ $(,)?) => {
        $crate::per_combo!(@mod threads_writeback, THREADS_WRITEBACK; $($scenario),+);
        $crate::per_combo!(@mod threads_none, THREADS_NONE; $($scenario),+);
        $crate::per_combo!(@mod native_none, NATIVE_NONE; $($scenario),+);
        $crate::per_combo!(@mod io_uring_writeback, IO_URING_WRITEBACK; $($scenario),+);
        $crate::per_combo!(@mod io_uring_none, IO_URING_NONE; $($scenario),+);
    };
    (@mod $name:ident, $combo:ident; $($scenario:ident),+) => {
        mod $name {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario($crate::$combo);
                }
            )+
        }
    };
}

/// Run `f`'s future on a fresh one-shard runtime and return its output. The
/// runtime is gone (rings closed) when this returns.
pub fn on_shard<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let rt = Runtime::single().expect("one-shard runtime starts (io_uring available)");
    rt.block_on(f)
}

/// Options for `driver=raw` over `file.filename=path`.
pub fn raw_opts(path: &str) -> OptionTree {
    let mut o = OptionTree::new();
    o.set("driver", "raw");
    o.set("file.filename", path);
    o
}

/// Open `opts` read-write under `combo`. Must run on a shard.
pub async fn open(combo: Combo, opts: OptionTree) -> Result<Arc<dyn BlockNode>> {
    let ctx = OpenCtx::new(nbd::registry(), combo.flags());
    open_image(&ctx, opts).await
}

/// Open `path` as raw read-write under `combo`, panicking with the error otherwise.
pub async fn open_raw(combo: Combo, path: &str) -> Arc<dyn BlockNode> {
    match open(combo, raw_opts(path)).await {
        Ok(n) => n,
        Err(e) => panic!("open {path} with {combo:?}: {e:?}"),
    }
}

pub async fn write_at(node: &dyn BlockNode, off: u64, data: &[u8], flags: WriteFlags) -> Result<()> {
    let (r, _) = node.write(off, IoBuf::from_slice(data), flags).await;
    r
}

/// Read through the node into a buffer pre-filled with 0xA5, so a read that
/// leaves bytes untouched cannot pass for one that read zeroes.
pub async fn read_at(node: &dyn BlockNode, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = IoBuf::new(len);
    buf.fill(0xa5);
    let (r, b) = node.read(off, buf).await;
    r.map(|()| b.to_vec())
}

/// Read the whole node in 1 MiB pieces.
pub async fn read_all(node: &dyn BlockNode) -> Vec<u8> {
    let size = node.size();
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20) as usize;
        match read_at(node, off, n).await {
            Ok(b) => out.extend_from_slice(&b),
            Err(e) => panic!("read {n} bytes at {off}: {e:?}"),
        }
        off += n as u64;
    }
    out
}

/// `len` bytes of `path` at `off` by plain pread; bytes past EOF read as zero.
pub fn std_read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
    buf
}

/// A file of `size` bytes: a hole, or `data` written at 0 when given. Synced, so
/// block status sees the allocation the filesystem settled on.
pub fn make_file(path: &Path, size: u64, data: Option<&[u8]>) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    if let Some(d) = data {
        f.write_all_at(d, 0).unwrap();
    }
    f.sync_all().unwrap();
}

/// pwrite `data` at `off` into an existing file and sync it.
pub fn std_write(path: &Path, off: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

/// Compare byte strings, reporting the first difference and how many bytes
/// differ instead of printing megabytes.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(first) = got.iter().zip(want).position(|(a, b)| a != b) {
        let n = got.iter().zip(want).filter(|(a, b)| a != b).count();
        let end = (first + 16).min(got.len());
        panic!(
            "{what}: {n} bytes differ, first at {first}: got {:02x?}, want {:02x?}",
            &got[first..end],
            &want[first..end]
        );
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_str().expect("temp paths are UTF-8").to_string()
}

/// xorshift64: reproducible test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        // Never all zero: zero runs would hide writes that did not happen.
        (0..n).map(|_| (self.next_u64() as u8) | 1).collect()
    }
}

/// A 64 MiB raw disk at `path` whose first 24 MiB are random but for every
/// fifth MiB from `zero_at`, left zero like the rest: data, zero runs and a
/// tail for a convert to tell apart.
pub fn write_patchy_disk(path: &Path, seed: u64, zero_at: usize) {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; 64 << 20];
    for chunk in 0..24 {
        if chunk % 5 != zero_at {
            data[chunk << 20..(chunk + 1) << 20].copy_from_slice(&rng.bytes(1 << 20));
        }
    }
    std::fs::write(path, &data).unwrap();
}

/// `qemu-img check --output=json -f qcow2` (with -U when `shared`: another
/// process has the image open): (exit status, the report).
pub fn qemu_check(img: &Path, shared: bool) -> (i32, serde_json::Value) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["check", "--output=json", "-f", "qcow2"]);
    if shared {
        cmd.arg("-U");
    }
    let o = cmd.arg(img).output().unwrap();
    let v = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| serde_json::json!({"stderr": String::from_utf8_lossy(&o.stderr)}));
    (o.status.code().unwrap_or(-1), v)
}

/// An extent reported by block status, with where it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub len: u64,
    pub data: bool,
    pub zero: bool,
}

/// Walk block status over [off, off+len) asking for at most `step` bytes at a
/// time, checking each answer is non-empty, within what was asked, and maps
/// linearly (raw over a file); then merge neighbours of equal status.
pub async fn walk(node: &dyn BlockNode, off: u64, len: u64, step: u64) -> Vec<Span> {
    let end = off + len;
    let mut spans: Vec<Span> = Vec::new();
    let mut at = off;
    while at < end {
        let ask = (end - at).min(step);
        let e: Extent = match node.block_status(at, ask).await {
            Ok(e) => e,
            Err(err) => panic!("block status at {at} (+{ask}): {err:?}"),
        };
        assert!(e.len > 0 && e.len <= ask, "block status at {at} asked {ask} bytes, answered {e:?}");
        assert_eq!(e.offset, Some(at), "raw over a file maps linearly: {e:?}");
        assert!(!(e.data && e.zero), "an extent is data or known zero, not both: {e:?}");
        match spans.last_mut() {
            Some(s) if s.data == e.data && s.zero == e.zero && s.start + s.len == at => s.len += e.len,
            _ => spans.push(Span { start: at, len: e.len, data: e.data, zero: e.zero }),
        }
        at += e.len;
    }
    assert_eq!(at, end, "extents end exactly where asked");
    spans
}

/// May this test set up root-only fixtures? Outside CI a non-root run skips with
/// a printed reason; in CI (env CI set) it fails, as a missing tool does.
pub fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var_os("CI").is_none(), "{what} needs root, which CI provides; run the suite as root");
        eprintln!("skipping: {what} needs root");
    }
    root
}

/// Is an external tool present? Skips outside CI, fails in CI.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "{tool} is required in CI but not installed");
        eprintln!("skipping: {tool} not installed");
    }
    ok
}

/// Run a command; panic with its output unless it succeeds. Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}): {}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("command output is UTF-8")
}

/// Boot the guest harness (scripts/vm/run.sh) in `dir` on `script` (a path
/// from the repository's root), with the harness options `args` adds, and
/// wait for the guest to power off. Panics, with the console, unless the
/// script succeeded and printed `done`. Returns the console.
pub fn run_guest(dir: &Path, script: &str, done: &str, args: impl FnOnce(&mut Command) -> &mut Command) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent");
    let log = dir.join("console.log");
    let mut cmd = Command::new(root.join("scripts/vm/run.sh"));
    cmd.arg("--script").arg(root.join(script)).arg("--log").arg(&log).current_dir(dir);
    args(&mut cmd);
    let out = cmd.output().expect("scripts/vm/run.sh runs");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "guest run failed ({}): {}\nconsole:\n{console}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(console.contains(done), "console:\n{console}");
    console
}

/// Loop devices are handed out by a find-free-then-claim dance; tests in one
/// binary run in parallel, so take turns.
static LOOP_SETUP: Mutex<()> = Mutex::new(());

/// A small filesystem (ext4, btrfs) in a file, loop-mounted; unmounted on drop.
pub struct FsMount {
    mnt: PathBuf,
}

impl FsMount {
    /// Make `dir/fs.img` of `size` bytes, make an ext4 filesystem on it and
    /// mount it on `dir/mnt`.
    pub fn ext4(dir: &Path, size: u64) -> FsMount {
        // -m 0: no blocks reserved for root, who runs this; -F: it is a file.
        FsMount::new(dir, size, Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]))
    }

    /// The same with btrfs (at least 114 MiB).
    pub fn btrfs(dir: &Path, size: u64) -> FsMount {
        FsMount::new(dir, size, Command::new("mkfs.btrfs").args(["-q", "-f"]))
    }

    fn new(dir: &Path, size: u64, mkfs: &mut Command) -> FsMount {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        File::create(&img).unwrap().set_len(size).unwrap();
        std::fs::create_dir(&mnt).unwrap();
        run(mkfs.arg(&img));
        let _turn = LOOP_SETUP.lock().unwrap_or_else(|e| e.into_inner());
        run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt));
        FsMount { mnt }
    }

    pub fn dir(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        // A ring's registered-file reference can outlive the runtime by a moment
        // (the kernel tears rings down asynchronously), so busy is retried; a
        // lazy unmount is the last resort so a failed test never leaves a mount.
        for _ in 0..50 {
            let ok = Command::new("umount").arg(&self.mnt).output().is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("umount {} stayed busy; unmounting lazily", self.mnt.display());
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// A loop device over a file; detached on drop.
pub struct LoopDev {
    dev: String,
}

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        let _turn = LOOP_SETUP.lock().unwrap_or_else(|e| e.into_inner());
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(file)).trim().to_string();
        assert!(dev.starts_with("/dev/"), "losetup printed {dev:?}");
        LoopDev { dev }
    }

    pub fn path(&self) -> &str {
        &self.dev
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // Detaching a device still open elsewhere sets autoclear: it goes away
        // with the last close, so this cannot leak it either way.
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A workspace binary (`ringblk`, `ringblk-nbd`) next to the test binary's
/// directory: target/<profile>/deps/<test> -> target/<profile>/<name>.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(p.exists(), "{} missing: build the workspace binaries first (scripts/test.sh does)", p.display());
    p
}
