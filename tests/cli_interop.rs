//! The `ringblk` binary against the real qemu-img and qemu-nbd: outputs that
//! must be identical, images QEMU must accept, exit codes that must agree, and
//! image locks both sides must respect.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ringblk_tests::{bin, have, Rng};

fn ringblk() -> PathBuf {
    bin("ringblk")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn rb(args: &[&str]) -> Output {
    output(Command::new(ringblk()).args(args))
}

fn qi(args: &[&str]) -> Output {
    output(Command::new("qemu-img").args(args))
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A sparse raw file of `size` bytes with random data runs, written zero runs and
/// holes, at 4 KiB granularity, plus an unaligned tail when `size` is unaligned.
fn mixed_image(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    let mut off = 0;
    while off < size {
        let len = ((rng.next_u64() % 64 + 1) * 4096).min(size - off);
        match rng.next_u64() % 3 {
            0 => {
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                f.write_all_at(&data, off).unwrap();
            }
            1 => f.write_all_at(&vec![0u8; len as usize], off).unwrap(),
            _ => {} // hole
        }
        off += len;
    }
}

#[test]
fn info_json_and_human_match_qemu_img_for_raw() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let created = d.path().join("created.raw");
    ok(rb(&["create", "-q", "-f", "raw", s(&created), "64M"]));
    let mixed = d.path().join("mixed.raw");
    mixed_image(&mixed, 3 << 20, 7);
    for img in [&created, &mixed] {
        let ours: serde_json::Value = serde_json::from_str(&ok(rb(&["info", "--output=json", s(img)]))).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(&ok(qi(&["info", "--output=json", s(img)]))).unwrap();
        assert_eq!(ours, theirs, "info json differs for {}", img.display());
        assert_eq!(ok(rb(&["info", s(img)])), ok(qi(&["info", s(img)])));
    }
    // The image we created is one QEMU reads as 64 MiB of zeroes.
    let zero = d.path().join("zero.raw");
    ok(qi(&["create", "-q", "-f", "raw", s(&zero), "64M"]));
    assert!(ok(qi(&["compare", "-s", s(&created), s(&zero)])).contains("identical"));
}

#[test]
fn map_json_is_identical_to_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(PathBuf, u64, u64)> =
        vec![("a", 8 << 20, 1), ("b", 5 << 20, 2), ("c", 1000, 3), ("d", (4 << 20) + 123, 4)]
            .into_iter()
            .map(|(n, size, seed)| (d.path().join(n), size, seed))
            .collect();
    for (p, size, seed) in &cases {
        mixed_image(p, *size, *seed);
        for fmt in [&["--output=json"][..], &[][..]] {
            let mut a = vec!["map"];
            a.extend_from_slice(fmt);
            a.push(s(p));
            let mut b = a.clone();
            b.insert(1, "-f");
            b.insert(2, "raw");
            assert_eq!(ok(rb(&b)), ok(qi(&b)), "map {:?} differs", fmt);
        }
    }
    // Fully sparse and fully allocated files.
    let hole = d.path().join("hole.raw");
    std::fs::File::create(&hole).unwrap().set_len(16 << 20).unwrap();
    let full = d.path().join("full.raw");
    std::fs::write(&full, vec![0xabu8; 1 << 20]).unwrap();
    for p in [&hole, &full] {
        let a = ["map", "--output=json", "-f", "raw", s(p)];
        assert_eq!(ok(rb(&a)), ok(qi(&a)));
    }
}

#[test]
fn convert_output_matches_source_and_qemu_convert() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    mixed_image(&src, 24 << 20, 11);
    let variants: Vec<Vec<&str>> = vec![
        vec![],
        vec!["-W", "-m", "16"],
        vec!["-m", "1"],
        vec!["-S", "0"],
        vec!["-C"],
        vec!["-S", "64k", "-t", "none"],
    ];
    let theirs = d.path().join("qemu.raw");
    ok(qi(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&theirs)]));
    for (i, v) in variants.iter().enumerate() {
        let out = d.path().join(format!("out{i}.raw"));
        let mut a = vec!["convert", "-q", "-f", "raw", "-O", "raw"];
        a.extend(v.iter().copied());
        a.push(s(&src));
        a.push(s(&out));
        ok(rb(&a));
        let c = qi(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&out)]);
        assert!(c.status.success(), "convert {v:?}: {}", String::from_utf8_lossy(&c.stdout));
        if v.is_empty() || v[0] == "-W" {
            // Same sparseness as qemu-img's own convert.
            let m = |p: &Path| ok(qi(&["map", "--output=json", "-f", "raw", s(p)]));
            assert_eq!(m(&out), m(&theirs), "convert {v:?} allocated differently from qemu-img convert");
        }
        if v.first() == Some(&"-S") && v[1] == "0" {
            let info: serde_json::Value = serde_json::from_str(&ok(qi(&["info", "--output=json", s(&out)]))).unwrap();
            assert!(info["actual-size"].as_u64().unwrap() >= 24 << 20, "-S 0 must allocate everything");
        }
    }
    // -n onto an existing image full of garbage: zero regions must be zeroed.
    let existing = d.path().join("existing.raw");
    std::fs::write(&existing, vec![0x5au8; 24 << 20]).unwrap();
    ok(rb(&["convert", "-q", "-n", "-f", "raw", "-O", "raw", s(&src), s(&existing)]));
    assert!(qi(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&existing)]).status.success());
    // -p ends with qemu-img's progress figure.
    let out = ok(rb(&["convert", "-p", "-f", "raw", "-O", "raw", s(&src), s(&d.path().join("p.raw"))]));
    assert!(out.contains("(100.00/100%)"), "{out}");
    // Two sources are concatenated.
    let cat = d.path().join("cat.raw");
    ok(rb(&["convert", "-q", "-f", "raw", "-O", "raw", s(&src), s(&src), s(&cat)]));
    assert_eq!(std::fs::metadata(&cat).unwrap().len(), 48 << 20);
    let qcat = d.path().join("qcat.raw");
    ok(qi(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&src), s(&qcat)]));
    assert!(qi(&["compare", s(&cat), s(&qcat)]).status.success());
}

#[test]
fn compare_agrees_with_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    mixed_image(&base, 6 << 20, 5);
    let mut cases = Vec::new();
    let same = d.path().join("same.raw");
    std::fs::copy(&base, &same).unwrap();
    cases.push(same.clone());
    for (i, off) in [0u64, 511, 4096 * 7 + 3, (6 << 20) - 1].iter().enumerate() {
        let p = d.path().join(format!("diff{i}.raw"));
        std::fs::copy(&base, &p).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, *off).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], *off).unwrap();
        cases.push(p);
    }
    let zero_tail = d.path().join("zerotail.raw");
    std::fs::copy(&base, &zero_tail).unwrap();
    std::fs::OpenOptions::new().write(true).open(&zero_tail).unwrap().set_len(8 << 20).unwrap();
    cases.push(zero_tail);
    let data_tail = d.path().join("datatail.raw");
    std::fs::copy(&base, &data_tail).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&data_tail).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[1], (7 << 20) + 5).unwrap();
    cases.push(data_tail);
    // Holes against written zeroes.
    let dense = d.path().join("dense.raw");
    std::fs::write(&dense, std::fs::read(&base).unwrap()).unwrap();
    cases.push(dense);
    for c in &cases {
        for strict in [false, true] {
            let mut a = vec!["compare", "-f", "raw", "-F", "raw"];
            if strict {
                a.push("-s");
            }
            a.push(s(&base));
            a.push(s(c));
            let (o, q) = (rb(&a), qi(&a));
            assert_eq!(o.status.code(), q.status.code(), "exit code for {a:?}");
            assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&q.stdout), "output for {a:?}");
        }
    }
    let o = rb(&["compare", "/nonexistent/x.raw", s(&base)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/x.raw"));
}

#[test]
fn dd_resize_measure_match_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    mixed_image(&src, 10 << 20, 9);
    for ops in [vec!["bs=64k", "count=100", "skip=20"], vec!["bs=4k"], vec!["bs=1M", "skip=3"], vec!["bs=512", "count=7"]] {
        let (a, b) = (d.path().join("a.raw"), d.path().join("b.raw"));
        let args = |out: &Path| {
            let mut v = vec!["dd".to_string(), "-f".into(), "raw".into(), "-O".into(), "raw".into()];
            v.extend(ops.iter().map(|x| x.to_string()));
            v.push(format!("if={}", s(&src)));
            v.push(format!("of={}", s(out)));
            v
        };
        ok(output(Command::new(ringblk()).args(args(&a))));
        ok(output(Command::new("qemu-img").args(args(&b))));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "dd {ops:?}");
    }
    let img = d.path().join("r.raw");
    ok(rb(&["create", "-q", "-f", "raw", s(&img), "10M"]));
    assert_eq!(ok(rb(&["resize", "-f", "raw", s(&img), "+2M"])), "Image resized.\n");
    let size = |p: &Path| {
        serde_json::from_str::<serde_json::Value>(&ok(qi(&["info", "--output=json", s(p)]))).unwrap()["virtual-size"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(size(&img), 12 << 20);
    let o = rb(&["resize", "-f", "raw", s(&img), "1M"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shrink"));
    assert_eq!(size(&img), 12 << 20, "a refused shrink must not change the image");
    ok(rb(&["resize", "-f", "raw", "--shrink", s(&img), "-11M"]));
    assert_eq!(size(&img), 1 << 20);
    let actual = |p: &Path| {
        serde_json::from_str::<serde_json::Value>(&ok(qi(&["info", "--output=json", s(p)]))).unwrap()["actual-size"]
            .as_u64()
            .unwrap()
    };
    let before = actual(&img);
    ok(rb(&["resize", "-f", "raw", "--preallocation=full", s(&img), "4M"]));
    assert_eq!(size(&img), 4 << 20);
    assert!(actual(&img) >= before + (3 << 20), "full preallocation allocates the new 3 MiB");
    let before = actual(&img);
    ok(rb(&["resize", "-f", "raw", "--preallocation=falloc", s(&img), "8M"]));
    assert_eq!(size(&img), 8 << 20);
    assert!(actual(&img) >= before + (4 << 20), "falloc preallocation allocates the new 4 MiB");
    let o = rb(&["resize", "-f", "raw", "--preallocation=metadata", s(&img), "9M"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("metadata"));
    for args in [vec!["measure", "--output=json", "-O", "raw", "--size", "3G"], vec!["measure", "-O", "raw", "-f", "raw", s(&src)]] {
        assert_eq!(ok(rb(&args)), ok(qi(&args)));
    }
}

/// Wait (bounded) until `path`'s OFD locks appear in /proc/locks.
fn wait_for_locks(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    for _ in 0..200 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if locks.lines().any(|l| l.contains("OFDLCK") && l.contains(&format!(":{ino} "))) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("no locks appeared on {}", path.display());
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn qemu_nbd_locks_keep_ringblk_out() {
    if !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // qemu-nbd serving qcow2 does not share "write" on the file.
    let q = d.path().join("img.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&q), "16M"]));
    let sock = d.path().join("nbd.sock");
    let _nbd = Kill(Command::new("qemu-nbd").args(["-f", "qcow2", "--socket", s(&sock), s(&q)]).spawn().unwrap());
    wait_for_locks(&q);
    let o = rb(&["bench", "-w", "-c", "4", "-f", "raw", s(&q)]);
    assert!(!o.status.success(), "write open of a file qemu-nbd holds must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Failed to get \"write\" lock") && err.contains(s(&q)), "{err}");
    // Reading with -U still works.
    ok(rb(&["bench", "-U", "-c", "4", "-f", "raw", s(&q)]));
    drop(_nbd);

    // qemu-nbd serving raw does not share "resize".
    let r = d.path().join("img.raw");
    ok(rb(&["create", "-q", "-f", "raw", s(&r), "16M"]));
    let _nbd = Kill(Command::new("qemu-nbd").args(["-f", "raw", "--socket", s(&sock), s(&r)]).spawn().unwrap());
    wait_for_locks(&r);
    let o = rb(&["resize", "-f", "raw", s(&r), "32M"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Failed to get \"resize\" lock"));
    ok(rb(&["info", s(&r)]));
}

#[test]
fn ringblk_locks_keep_qemu_out() {
    if !have("qemu-img") || !have("qemu-nbd") {
        return;
    }
    use engine::block::{open_image, OpenCtx, OpenFlags, Perm};
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("held.raw");
    ok(qi(&["create", "-q", "-f", "raw", s(&r), "16M"]));
    let rt = engine::runtime::Runtime::single().unwrap();
    let path = s(&r).to_string();
    // Hold the image as a writer that shares neither write nor resize (what a
    // format driver that owns its metadata does).
    let node = rt.block_on(move || async move {
        let flags = OpenFlags { write: true, shared: Perm::ALL.without(Perm::WRITE.union(Perm::RESIZE)), ..Default::default() };
        let ctx = OpenCtx::new(nbd::registry(), flags);
        let mut o = engine::options::OptionTree::new();
        o.set("driver", "raw");
        o.set("file.filename", path);
        open_image(&ctx, o).await.unwrap()
    });
    let o = qi(&["bench", "-w", "-c", "1", "-f", "raw", s(&r)]);
    assert!(!o.status.success(), "qemu-img must not write an image ringblk holds");
    assert!(String::from_utf8_lossy(&o.stderr).contains("lock"));
    let o = qi(&["resize", "-f", "raw", s(&r), "32M"]);
    assert!(!o.status.success());
    let sock = d.path().join("n.sock");
    let o = output(Command::new("timeout").args(["5", "qemu-nbd", "-f", "raw", "--socket", s(&sock), s(&r)]));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("lock"), "qemu-nbd must refuse: {o:?}");
    // Readers that share write may still look.
    assert!(qi(&["info", s(&r)]).status.success());
    // Do I/O through the ring (which registers the file with it), then close the
    // node while the runtime lives on: the ring must let go of the file so the
    // OFD locks go with it.
    let n2 = node.clone();
    rt.block_on(move || async move {
        let (r, _) = n2.read(0, engine::runtime::IoBuf::new(4096)).await;
        r.unwrap();
    });
    drop(node);
    let mut released = false;
    for _ in 0..100 {
        if qi(&["resize", "-f", "raw", s(&r), "32M"]).status.success() {
            released = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(released, "locks must go away when the node is closed, runtime still running");
    drop(rt);
}

#[test]
fn bench_compares_backends_in_one_run() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("b.raw");
    ok(rb(&["create", "-q", "-f", "raw", s(&img), "64M"]));
    let out = ok(rb(&["bench", "-f", "raw", "-c", "3000", "-d", "8", "--pattern", "rand", "--aio", "threads,native,io_uring", "--output=json", s(&img)]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 3);
    for (r, want) in runs.iter().zip(["threads", "native", "io_uring"]) {
        assert_eq!(r["backend"], want);
        assert!(r["iops"].as_f64().unwrap() > 0.0);
        assert_eq!(r["requests"], 3000);
    }
    assert_eq!(runs[1]["cache"], "none", "native runs with O_DIRECT");
    // The NVMe paths need an NVMe namespace, and say so by name.
    for b in ["io_uring_cmd", "vfio", "threads,vfio"] {
        let o = rb(&["bench", "-f", "raw", "-c", "10", "--aio", b, s(&img)]);
        assert!(!o.status.success(), "--aio {b} on a plain file");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("b.raw") && err.contains("not an NVMe namespace"), "--aio {b}: {err}");
    }
    let o = rb(&["bench", "-c", "10", "--aio", "spdk", s(&img)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("expected threads, native, io_uring, io_uring_cmd or vfio"));
    // qemu-img's output lines for a single run.
    let out = ok(rb(&["bench", "-w", "-f", "raw", "-c", "100", "-d", "4", "--pattern=5", s(&img)]));
    assert!(out.starts_with("Sending 100 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)\n"), "{out}");
    assert!(out.contains("Run completed in "));
    let data = std::fs::read(&img).unwrap();
    assert!(data[..100 * 4096].iter().all(|&b| b == 5), "--pattern=5 fills written blocks with 5");
    // Flushes every 10 requests, with and without draining.
    for extra in [&[][..], &["--no-drain"][..]] {
        let mut a = vec!["bench", "-w", "-f", "raw", "-c", "200", "-d", "8", "--flush-interval=10", "--output=json"];
        a.extend_from_slice(extra);
        a.push(s(&img));
        let v: serde_json::Value = serde_json::from_str(&ok(rb(&a))).unwrap();
        assert_eq!(v[0]["requests"], 200);
    }
    // The default run (no image) compares every backend on a temporary image.
    let out = ok(rb(&["bench", "-c", "2000"]));
    for b in ["threads", "native", "io_uring"] {
        assert_eq!(out.lines().filter(|l| l.starts_with(b)).count(), 2, "{b} read and write rows in:\n{out}");
    }
}

#[test]
fn errors_name_the_file_and_exit_nonzero() {
    let o = rb(&["info", "/nonexistent/dir/img.raw"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("/nonexistent/dir/img.raw") && e.contains("No such file"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.raw");
    ok(rb(&["create", "-q", "-f", "raw", s(&img), "1M"]));
    let o = rb(&["info", "--image-opts", &format!("driver=raw,file.filename={},bogus=1", s(&img))]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bogus"));
    let o = rb(&["info", &format!("json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}", s(&img))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = rb(&["bench", "-c", "1", "--image-opts", &format!("driver=raw,file.filename={},file.aio=native", s(&img))]);
    assert!(!o.status.success(), "aio=native without cache.direct must be refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cache.direct"));
    let o = rb(&["create", "-f", "raw", s(&img), "12Q"]);
    assert!(!o.status.success());
}

#[test]
fn locks_are_gone_when_the_process_exits() {
    // Each convert creates its target, which needs nobody else writing it; the
    // previous run's io_uring-registered file must not keep its lock alive
    // after that process has exited.
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("s.raw"), d.path().join("d.raw"));
    mixed_image(&src, 1 << 20, 3);
    for i in 0..40 {
        let o = rb(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&dst)]);
        assert!(o.status.success(), "run {i}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn raw_offset_and_size_window_matches_qemu() {
    if !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("w.raw");
    mixed_image(&src, 8 << 20, 21);
    let spec = format!("json:{{\"driver\":\"raw\",\"offset\":1048576,\"size\":2097152,\"file\":{{\"driver\":\"file\",\"filename\":\"{}\"}}}}", s(&src));
    let info: serde_json::Value = serde_json::from_str(&ok(rb(&["info", "--output=json", &spec]))).unwrap();
    assert_eq!(info["virtual-size"], 2 << 20);
    let (a, b) = (d.path().join("a.raw"), d.path().join("b.raw"));
    ok(rb(&["convert", "-O", "raw", &spec, s(&a)]));
    ok(qi(&["convert", "-O", "raw", &spec, s(&b)]));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&src).unwrap()[1 << 20..3 << 20].to_vec());
    assert_eq!(ok(rb(&["map", "--output=json", &spec])), ok(qi(&["map", "--output=json", &spec])));
    // The same window through --image-opts.
    let opts = format!("driver=raw,offset=1M,size=2M,file.filename={}", s(&src));
    let info: serde_json::Value = serde_json::from_str(&ok(rb(&["info", "--output=json", "--image-opts", &opts]))).unwrap();
    assert_eq!(info["virtual-size"], 2 << 20);
    // A window past the end of the file is refused, naming the file.
    let bad = format!("driver=raw,offset=7M,size=2M,file.filename={}", s(&src));
    let o = rb(&["info", "--image-opts", &bad]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(s(&src)));
    // A raw window cannot be resized.
    let o = rb(&["resize", "--image-opts", &opts, "3M"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("fixed-size"));
}

#[test]
fn probed_raw_warns_on_write_and_cache_modes_work() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("p.raw");
    ok(rb(&["create", "-q", "-f", "raw", s(&img), "4M"]));
    let o = rb(&["bench", "-w", "-c", "10", s(&img)]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("probing guessed raw"), "writing a probed raw image warns");
    let o = rb(&["bench", "-w", "-c", "10", "-f", "raw", s(&img)]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("probing"), "no warning when the format is named");
    for cache in ["none", "writeback", "writethrough", "directsync", "unsafe"] {
        let out = ok(rb(&["bench", "-w", "-f", "raw", "-t", cache, "-c", "64", "-d", "4", "--flush-interval=8", "--pattern=7", "--output=json", s(&img)]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["cache"], cache);
        assert!(std::fs::read(&img).unwrap()[..64 * 4096].iter().all(|&b| b == 7), "cache={cache} wrote the data");
    }
    assert!(!rb(&["bench", "-f", "raw", "-t", "sometimes", s(&img)]).status.success());
}

#[test]
fn locking_off_skips_the_lock() {
    if !have("qemu-nbd") || !have("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // Fully preallocated, so a write at 8M lands in guest data, not metadata.
    let q = d.path().join("l.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", "-o", "preallocation=full", s(&q), "16M"]));
    let sock = d.path().join("l.sock");
    let _nbd = Kill(Command::new("qemu-nbd").args(["-f", "qcow2", "--socket", s(&sock), s(&q)]).spawn().unwrap());
    wait_for_locks(&q);
    let on = format!("driver=raw,file.filename={},file.locking=on", s(&q));
    let off = format!("driver=raw,file.filename={},file.locking=off", s(&q));
    let o = rb(&["bench", "-w", "-c", "1", "-o", "8M", "--image-opts", &off]);
    assert!(o.status.success(), "locking=off must not check locks: {}", String::from_utf8_lossy(&o.stderr));
    let o = rb(&["bench", "-w", "-c", "1", "-o", "8M", "--image-opts", &on]);
    assert!(!o.status.success(), "locking=on must see qemu-nbd's lock");
}

#[test]
fn injected_errors_give_documented_exit_codes_and_salvage_recovers() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("e.raw");
    // All data, so every sector is read (no holes to skip).
    let mut rng = Rng::new(77);
    std::fs::write(&src, rng.bytes(1 << 20)).unwrap();
    let copy = d.path().join("copy.raw");
    std::fs::copy(&src, &copy).unwrap();
    let bad = |iotype: &str| format!("driver=blkdebug,image.driver=raw,image.file.filename={},inject-error.0.iotype={iotype},inject-error.0.sector=8,inject-error.0.errno=5", s(&src));

    // compare: 4 for a read error, 3 for a block status error; the message names the file.
    for (iotype, code) in [("read", 4), ("block-status", 3)] {
        let o = rb(&["compare", "--image-opts", &bad(iotype), &format!("driver=raw,file.filename={}", s(&copy))]);
        assert_eq!(o.status.code(), Some(code), "compare with a failing {iotype}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(s(&src)));
    }

    // convert stops at the failing read and says where.
    let out = d.path().join("out.raw");
    let o = rb(&["convert", "--image-opts", "-O", "raw", &bad("read"), s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("error while reading") && e.contains(s(&src)), "{e}");

    // --salvage copies everything readable and zeroes the failing sector.
    let o = rb(&["convert", "--salvage", "--image-opts", "-O", "raw", &bad("read"), s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut want = std::fs::read(&src).unwrap();
    want[8 * 512..9 * 512].fill(0);
    assert_eq!(std::fs::read(&out).unwrap(), want);

    // A failing write on the target stops convert and names the target.
    let tgt = d.path().join("t.raw");
    std::fs::File::create(&tgt).unwrap().set_len(1 << 20).unwrap();
    let wbad = format!("driver=blkdebug,image.driver=raw,image.file.filename={},inject-error.0.iotype=write,inject-error.0.errno=28", s(&tgt));
    let o = rb(&["convert", "-n", "-f", "raw", "--target-image-opts", s(&src), &wbad]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(s(&tgt)) && e.contains("No space left"), "{e}");

    // A hostile option set is refused, not trusted.
    let o = rb(&["info", "--image-opts", &format!("driver=blkdebug,image.filename={},inject-error.0.errno=-1", s(&src))]);
    assert!(!o.status.success());
}

#[test]
fn sigusr1_prints_progress() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("big.raw");
    let mut rng = Rng::new(5);
    let chunk = rng.bytes(1 << 20);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
    }
    let out = d.path().join("slow.raw");
    // One worker and synchronous writes keep the copy running for a while.
    let mut child = Command::new(ringblk())
        .args(["convert", "-m", "1", "-t", "directsync", "-f", "raw", "-O", "raw", s(&src), s(&out)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut sent = 0;
    while child.try_wait().unwrap().is_none() && sent < 500 {
        // SAFETY: kill with a pid we spawned and have not reaped yet.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        sent += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "convert must survive SIGUSR1");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(sent > 0, "convert finished before any signal could be sent");
    assert!(stdout.contains("/100%)"), "no progress report after {sent} SIGUSR1s: {stdout:?}");
}

#[test]
fn host_device_info_and_map_match_qemu_img() {
    if !have("qemu-img") || !ringblk_tests::root_or_skip("a loop device") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let backing = d.path().join("lo.img");
    mixed_image(&backing, 16 << 20, 13);
    let dev = ringblk_tests::LoopDev::attach(&backing);
    for args in [vec!["info", dev.path()], vec!["info", "--output=json", dev.path()], vec!["map", "--output=json", dev.path()]] {
        assert_eq!(ok(rb(&args)), ok(qi(&args)), "{args:?}");
    }
    // Converting from the device gives the backing file's contents.
    let out = d.path().join("from-dev.raw");
    ok(rb(&["convert", "-O", "raw", dev.path(), s(&out)]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&backing).unwrap());
}
