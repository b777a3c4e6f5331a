//! Property test: random sequences of write / write_zeroes / discard / flush /
//! resize against a flat in-memory model, over every cluster size class and
//! refcount width, extended L2 and v2, with and without a backing file. After
//! each run the image reads back as the model, and both our `check` and
//! `qemu-img check` find it clean, and `qemu-img compare` agrees.

use std::path::Path;
use std::process::Command;

use engine::block::{BlockNode, Prealloc, WriteFlags, ZeroFlags};
use engine::options::OptionTree;
use engine::runtime::IoBuf;
use ringblk_tests::{have, on_shard, path_str, read_all, Rng};

#[derive(Clone, Copy)]
struct Case {
    opts: &'static str,
    backing: bool,
    /// Discard granularity: the cluster or, with extended L2, the subcluster.
    gran: u64,
    v2: bool,
}

fn qemu(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img").args(args).output().expect("qemu-img runs")
}

fn ringblk(args: &[&str]) -> std::process::Output {
    Command::new(ringblk_tests::bin("ringblk")).args(args).output().expect("ringblk runs")
}

const START: u64 = 2 << 20;

async fn run_ops(node: &dyn BlockNode, model: &mut Vec<u8>, case: &Case, seed: u64) {
    let mut rng = Rng::new(seed);
    for step in 0..150 {
        let size = model.len() as u64;
        let op = rng.below(100);
        // Offsets: half aligned to a cluster-ish granule, half anywhere.
        let pick = |rng: &mut Rng, size: u64| -> (u64, u64) {
            let big = rng.below(4) == 0;
            let mut off = rng.below(size);
            if rng.below(2) == 0 {
                off -= off % 4096.min(case.gran);
            }
            let len = (1 + rng.below(if big { 300_000 } else { 20_000 })).min(size - off);
            (off, len)
        };
        match op {
            0..=49 => {
                let (off, len) = pick(&mut rng, size);
                if std::env::var_os("QCOW2_MODEL_EVERY_STEP").is_some() {
                    eprintln!("write {off} {len}");
                }
                let data = rng.bytes(len as usize);
                let (r, _) = node.write(off, IoBuf::from_slice(&data), WriteFlags { fua: rng.below(10) == 0 }).await;
                r.unwrap_or_else(|e| panic!("{}: step {step}: write {len}@{off}: {e}", case.opts));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            50..=64 => {
                let (off, len) = pick(&mut rng, size);
                if std::env::var_os("QCOW2_MODEL_EVERY_STEP").is_some() {
                    eprintln!("zero {off} {len}");
                }
                let f = ZeroFlags { may_unmap: rng.below(2) == 0, ..Default::default() };
                node.write_zeroes(off, len, f).await.unwrap_or_else(|e| panic!("{}: step {step}: zero {len}@{off}: {e}", case.opts));
                model[off as usize..(off + len) as usize].fill(0);
            }
            65..=79 => {
                let (off, len) = pick(&mut rng, size);
                if std::env::var_os("QCOW2_MODEL_EVERY_STEP").is_some() {
                    eprintln!("discard {off} {len} size {size}");
                }
                node.discard(off, len).await.unwrap_or_else(|e| panic!("{}: step {step}: discard: {e}", case.opts));
                // Whole granules (the last, partial one counts when the range
                // reaches the end) read as zeroes; the rest is untouched. v2
                // cannot hide a backing file's data, so it keeps everything.
                if !(case.v2 && case.backing) {
                    let end = off + len;
                    let a = off.next_multiple_of(case.gran);
                    let b = if end == size { end.next_multiple_of(case.gran) } else { end - end % case.gran };
                    if a < b {
                        model[a as usize..b.min(size) as usize].fill(0);
                    }
                }
            }
            80..=89 => node.flush().await.unwrap(),
            _ => {
                // Resize: grow anywhere; shrink only without a backing file
                // (growing again would expose the backing file's data).
                let new = if case.backing || rng.below(2) == 0 {
                    size + 512 * (1 + rng.below(4096))
                } else {
                    (size - 512 * rng.below(size / 1024)).max(512)
                };
                node.truncate(new, true, Prealloc::Off).await.unwrap_or_else(|e| panic!("{}: step {step}: resize to {new}: {e}", case.opts));
                // The grown part reads as zeroes, even where a longer backing
                // file has data (QEMU zeroes it too).
                model.resize(new as usize, 0);
            }
        }
        assert_eq!(node.size(), model.len() as u64, "{}: step {step}: size", case.opts);
        if std::env::var_os("QCOW2_MODEL_EVERY_STEP").is_some() {
            let all = read_all(node).await;
            if let Some(i) = all.iter().zip(model.iter()).position(|(a, b)| a != b) {
                panic!("{}: after step {step} (op {op}): byte {i} reads {:#x}, model {:#x}", case.opts, all[i], model[i]);
            }
        }
    }
}

fn run_case(case: Case, dir: &Path, n: usize) {
    let img = dir.join(format!("m{n}.qcow2"));
    let base = dir.join(format!("b{n}.raw"));
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", case.opts];
    let (bs, bp);
    let backing_size = 3 << 20;
    if case.backing {
        // A backing file bigger than the image: growing reveals it.
        std::fs::write(&base, vec![0xb7u8; backing_size as usize]).unwrap();
        bp = path_str(&base);
        args.extend(["-b", &bp, "-F", "raw"]);
    }
    let img_s = path_str(&img);
    args.push(&img_s);
    bs = START.to_string();
    args.push(&bs);
    let o = ringblk(&args);
    assert!(o.status.success(), "{}: create: {}", case.opts, String::from_utf8_lossy(&o.stderr));

    let p = img_s.clone();
    let opts = case.opts;
    let model = on_shard(move || async move {
        let mut o = OptionTree::new();
        o.set("driver", "qcow2");
        o.set("file.filename", &p);
        o.set("discard", "unmap");
        let node = ringblk_tests::open(ringblk_tests::IO_URING_WRITEBACK, o).await.unwrap_or_else(|e| panic!("{opts}: open: {e}"));
        let mut model = vec![if case.backing { 0xb7u8 } else { 0 }; START as usize];
        run_ops(&*node, &mut model, &case, 0x5eed ^ n as u64).await;
        let all = read_all(&*node).await;
        if let Some(i) = all.iter().zip(&model).position(|(a, b)| a != b) {
            panic!("{opts}: byte {i} reads {:#x}, model has {:#x}", all[i], model[i]);
        }
        let r = node.check(Default::default()).await.unwrap();
        assert!(r.corruptions == 0 && r.leaks == 0, "{opts}: our check before close: {:?}", r.messages);
        node.close().await.unwrap();
        model
    });
    let model_path = dir.join(format!("m{n}.raw"));
    std::fs::write(&model_path, &model).unwrap();
    let c = qemu(&["check", &img_s]);
    assert!(c.status.success(), "{}: qemu-img check: {}{}", case.opts, String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&c.stderr));
    let c = ringblk(&["check", &img_s]);
    assert!(c.status.success(), "{}: ringblk check: {}{}", case.opts, String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&c.stderr));
    let c = qemu(&["compare", "-f", "raw", "-F", "qcow2", &path_str(&model_path), &img_s]);
    assert!(c.status.success(), "{}: qemu-img compare: {}", case.opts, String::from_utf8_lossy(&c.stdout));
}

fn cases(backing: bool) -> Vec<Case> {
    let mut v = Vec::new();
    for cs in [512u64, 4096, 65536] {
        for rb in [1, 16, 64] {
            let opts: &'static str = Box::leak(format!("cluster_size={cs},refcount_bits={rb}").into_boxed_str());
            v.push(Case { opts, backing, gran: cs, v2: false });
        }
    }
    v.push(Case { opts: "cluster_size=2M,refcount_bits=8", backing, gran: 2 << 20, v2: false });
    v.push(Case { opts: "extended_l2=on,cluster_size=32k", backing, gran: 1024, v2: false });
    v.push(Case { opts: "compat=0.10,cluster_size=4096", backing, gran: 4096, v2: true });
    v.push(Case { opts: "lazy_refcounts=on,cluster_size=4096", backing, gran: 4096, v2: false });
    v
}

#[test]
fn random_operations_match_a_flat_model() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (i, c) in cases(false).into_iter().enumerate() {
        run_case(c, d.path(), i);
    }
}

#[test]
fn random_operations_over_a_backing_file_match_a_flat_model() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for (i, c) in cases(true).into_iter().enumerate() {
        run_case(c, d.path(), 100 + i);
    }
}
