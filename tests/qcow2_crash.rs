//! Crash consistency: the qcow2 driver runs over a storage layer that can stop
//! at any write or flush. What survives a crash is what was durable (flushed
//! or written with FUA), plus, in a second mode, an arbitrary subset of the
//! writes after the last flush (the disk may have persisted some, in any
//! order). After every such crash the image opens, `check -r all` leaves it
//! consistent (our check and qemu-img's), and every write acknowledged before
//! the last completed flush reads back intact.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use engine::block::{BlockNode, BoxFuture, CheckFix, Extent, OpenCtx, OpenFlags, Prealloc, WriteFlags, ZeroFlags};
use engine::error::{Error, ErrorKind, Result};
use engine::options::OptionTree;
use engine::runtime::IoBuf;
use ringblk_tests::{have, on_shard, path_str, Rng};

#[derive(Default)]
struct Disk {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last flush, in order (offset, bytes).
    unflushed: Vec<(u64, Vec<u8>)>,
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
}

/// An in-memory disk that forgets unflushed writes when it "crashes".
struct CrashNode(Mutex<Disk>);

fn crashed() -> Error {
    Error::new(ErrorKind::Io, "simulated power loss")
}

impl CrashNode {
    /// Count an operation; fail it (and everything after) at the crash point.
    fn tick(&self) -> Result<std::sync::MutexGuard<'_, Disk>> {
        let mut d = self.0.lock().unwrap();
        if d.crashed {
            return Err(crashed());
        }
        d.ops += 1;
        if d.crash_at == Some(d.ops) {
            d.crashed = true;
            return Err(crashed());
        }
        Ok(d)
    }

    fn apply(d: &mut Disk, off: u64, data: &[u8], durable: bool) {
        let end = off as usize + data.len();
        if d.current.len() < end {
            d.current.resize(end, 0);
        }
        d.current[off as usize..end].copy_from_slice(data);
        if durable {
            if d.durable.len() < end {
                d.durable.resize(end, 0);
            }
            d.durable[off as usize..end].copy_from_slice(data);
        } else {
            d.unflushed.push((off, data.to_vec()));
        }
    }
}

impl BlockNode for CrashNode {
    fn driver(&self) -> &'static str {
        "file"
    }
    fn filename(&self) -> String {
        "crash-disk".into()
    }
    fn size(&self) -> u64 {
        self.0.lock().unwrap().current.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, mut buf: IoBuf) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            let d = match self.tick() {
                Ok(d) => d,
                Err(e) => return (Err(e), buf),
            };
            let n = buf.len();
            for (i, b) in buf.iter_mut().enumerate().take(n) {
                *b = d.current.get(offset as usize + i).copied().unwrap_or(0);
            }
            (Ok(()), buf)
        })
    }
    fn write(&self, offset: u64, buf: IoBuf, flags: WriteFlags) -> BoxFuture<'_, (Result<()>, IoBuf)> {
        Box::pin(async move {
            let mut d = match self.tick() {
                Ok(d) => d,
                Err(e) => return (Err(e), buf),
            };
            Self::apply(&mut d, offset, &buf, flags.fua);
            (Ok(()), buf)
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut d = self.tick()?;
            Self::apply(&mut d, offset, &vec![0u8; len as usize], flags.fua);
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<()>> {
        self.write_zeroes(offset, len, ZeroFlags::default())
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut d = self.tick()?;
            d.durable = d.current.clone();
            d.unflushed.clear();
            Ok(())
        })
    }
    fn block_status(&self, offset: u64, len: u64) -> BoxFuture<'_, Result<Extent>> {
        Box::pin(async move { Ok(Extent { len, data: true, zero: false, allocated: true, offset: Some(offset), compressed: false }) })
    }
    fn truncate(&self, size: u64, _exact: bool, _p: Prealloc) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut d = self.tick()?;
            d.current.resize(size as usize, 0);
            // Size changes are metadata the filesystem persists on flush; keep
            // it simple: they are durable at once.
            d.durable.resize(size as usize, 0);
            Ok(())
        })
    }
}

#[derive(Clone)]
struct Outcome {
    /// Guest contents as of the last completed flush.
    flushed: Vec<u8>,
    /// Guest ranges changed since that flush (their contents are unknown).
    since: Vec<Range<usize>>,
    file_ops: u64,
}

const SIZE: usize = 1 << 20;

/// Run the workload over `disk` until it ends or the disk crashes.
async fn workload(disk: Arc<CrashNode>, gran: u64, seed: u64) -> Outcome {
    let ctx = OpenCtx::new(nbd::registry(), OpenFlags { write: true, ..Default::default() });
    let mut o = OptionTree::new();
    o.set("discard", "unmap");
    let mut out = Outcome { flushed: vec![0; SIZE], since: Vec::new(), file_ops: 0 };
    let driver = ctx.registry.get("qcow2").unwrap();
    let node = match driver.open_format(&ctx, o, disk.clone(), false).await {
        Ok(n) => n,
        Err(_) => return out,
    };
    let mut model = vec![0u8; SIZE];
    let mut rng = Rng::new(seed);
    for _ in 0..60 {
        let off = rng.below(SIZE as u64 - 1);
        let len = (1 + rng.below(150_000)).min(SIZE as u64 - off);
        let r = off as usize..(off + len) as usize;
        let res = match rng.below(10) {
            0..=5 => {
                let data = rng.bytes(len as usize);
                let (res, _) = node.write(off, IoBuf::from_slice(&data), WriteFlags::default()).await;
                if res.is_ok() {
                    model[r.clone()].copy_from_slice(&data);
                }
                res
            }
            6 => {
                let res = node.write_zeroes(off, len, ZeroFlags { may_unmap: true, ..Default::default() }).await;
                if res.is_ok() {
                    model[r.clone()].fill(0);
                }
                res
            }
            7 => {
                // Discard: whole granules read as zeroes afterwards.
                let res = node.discard(off, len).await;
                if res.is_ok() {
                    let end = off + len;
                    let a = off.next_multiple_of(gran);
                    let b = if end == SIZE as u64 { end } else { end - end % gran };
                    if a < b {
                        model[a as usize..b as usize].fill(0);
                    }
                }
                res
            }
            _ => {
                let res = node.flush().await;
                if res.is_ok() {
                    out.flushed = model.clone();
                    out.since.clear();
                }
                res
            }
        };
        // Anything attempted (even failed) may or may not have landed.
        out.since.push(r);
        if res.is_err() {
            break;
        }
    }
    if disk.0.lock().unwrap().crashed {
        out.file_ops = disk.0.lock().unwrap().ops;
        return out;
    }
    if node.close().await.is_ok() {
        out.flushed = model;
        out.since.clear();
    }
    out.file_ops = disk.0.lock().unwrap().ops;
    out
}

fn run(opts: &'static str, gran: u64, lazy: bool) {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fresh.qcow2");
    let rb = ringblk_tests::bin("ringblk");
    let create_opts = if lazy { format!("{opts},lazy_refcounts=on") } else { opts.to_string() };
    let st = std::process::Command::new(&rb).args(["create", "-q", "-f", "qcow2", "-o", &create_opts, &path_str(&img), &SIZE.to_string()]).status().unwrap();
    assert!(st.success());
    let fresh = std::fs::read(&img).unwrap();
    let new_disk = |crash_at: Option<u64>| {
        Arc::new(CrashNode(Mutex::new(Disk { current: fresh.clone(), durable: fresh.clone(), crash_at, ..Default::default() })))
    };
    // A clean run tells how many file operations the workload makes.
    let disk = new_disk(None);
    let total = on_shard(move || async move { workload(disk, gran, 11).await.file_ops });
    assert!(total > 20, "workload too small ({total} file ops)");
    let step = (total / 80).max(1);
    let mut rng = Rng::new(3);
    for crash_at in (1..=total).step_by(step as usize) {
        for keep_some in [false, true] {
            let disk = new_disk(Some(crash_at));
            let d2 = disk.clone();
            let out = on_shard(move || async move { workload(d2, gran, 11).await });
            let mut image = {
                let d = disk.0.lock().unwrap();
                let mut image = d.durable.clone();
                if keep_some {
                    for (off, data) in &d.unflushed {
                        if rng.below(2) == 0 {
                            let end = *off as usize + data.len();
                            if image.len() < end {
                                image.resize(end, 0);
                            }
                            image[*off as usize..end].copy_from_slice(data);
                        }
                    }
                }
                image
            };
            if image.len() < 512 {
                image.resize(512, 0);
            }
            let path = dir.path().join("crashed.qcow2");
            std::fs::write(&path, &image).unwrap();
            let p = path_str(&path);
            let what = format!("{opts} lazy={lazy} crash at op {crash_at}/{total} keep_some={keep_some}");
            let w2 = what.clone();
            let flushed = out.flushed.clone();
            let since = out.since.clone();
            on_shard(move || async move {
                // Opening repairs a dirty (lazy refcounts) image by itself; a
                // check -r all then leaves anything else consistent.
                let mut flags = OpenFlags { write: true, ..Default::default() };
                flags.follow_backing = false;
                let ctx = OpenCtx::new(nbd::registry(), flags);
                let mut o = OptionTree::new();
                o.set("driver", "qcow2");
                o.set("file.filename", &p);
                let node = engine::block::open_image(&ctx, o).await.unwrap_or_else(|e| panic!("{w2}: open after crash: {e}"));
                // The write ordering's promise: a crash may leak clusters,
                // never corrupt (a dirty lazy-refcounts image was repaired
                // when it opened).
                let r = node.check(CheckFix::default()).await.unwrap_or_else(|e| panic!("{w2}: check: {e}"));
                assert_eq!(r.corruptions, 0, "{w2}: corruption after a crash: {:?}", r.messages);
                let r = node.check(CheckFix { leaks: true, errors: true }).await.unwrap_or_else(|e| panic!("{w2}: repair: {e}"));
                assert_eq!(r.check_errors, 0, "{w2}");
                let r = node.check(CheckFix::default()).await.unwrap();
                assert!(r.corruptions == 0 && r.leaks == 0, "{w2}: still inconsistent after repair: {:?}", r.messages);
                // Acknowledged-before-flush data is intact outside what changed since.
                let (res, all) = node.read(0, IoBuf::new(SIZE)).await;
                res.unwrap_or_else(|e| panic!("{w2}: read: {e}"));
                let mut touched = vec![false; SIZE];
                for r in &since {
                    touched[r.clone()].iter_mut().for_each(|t| *t = true);
                }
                if let Some(i) = (0..SIZE).find(|&i| !touched[i] && all[i] != flushed[i]) {
                    panic!("{w2}: byte {i} reads {:#x}, flushed data was {:#x}", all[i], flushed[i]);
                }
                node.close().await.unwrap();
            });
            if crash_at % (step * 10) == 1 || step == 1 && crash_at % 10 == 1 {
                let c = std::process::Command::new("qemu-img").args(["check", &path_str(&path)]).output().unwrap();
                assert!(c.status.success(), "{what}: qemu-img check after repair: {}", String::from_utf8_lossy(&c.stdout));
            }
        }
    }
}

#[test]
fn crash_at_any_point_loses_nothing_flushed() {
    run("cluster_size=4096", 4096, false);
}

#[test]
fn crash_with_lazy_refcounts_is_repaired_on_open() {
    run("cluster_size=4096", 4096, true);
}

#[test]
fn crash_with_extended_l2() {
    run("cluster_size=16384,extended_l2=on", 512, false);
}
