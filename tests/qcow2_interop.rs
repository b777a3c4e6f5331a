//! qcow2 against the real QEMU, both ways: images qemu-img and qemu-io make
//! (every option combination we support) read here byte for byte as QEMU
//! reads them; images we create and write pass `qemu-img check` without
//! errors or leaks and compare equal to a plain model with `qemu-img
//! compare`; damaged images get the same verdict and exit code from our
//! `check` as from qemu-img's, and our repair leaves them clean for QEMU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use engine::block::{BlockNode, WriteFlags, ZeroFlags};
use engine::options::OptionTree;
use ringblk_tests::{bin, have, on_shard, path_str, Rng};

fn ringblk() -> PathBuf {
    bin("ringblk")
}

fn out(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(o: Output, what: &str) -> String {
    assert!(o.status.success(), "{what} failed ({}): {}{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn qi(args: &[&str]) -> Output {
    out(Command::new("qemu-img").args(args))
}

fn rb(args: &[&str]) -> Output {
    out(Command::new(ringblk()).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tools() -> bool {
    have("qemu-img") && have("qemu-io")
}

/// Read an image to raw with ringblk and with qemu-img; the bytes must match.
fn assert_reads_like_qemu(img: &Path, dir: &Path, what: &str) {
    let ours = dir.join("ours.raw");
    let theirs = dir.join("theirs.raw");
    ok(rb(&["convert", "-O", "raw", s(img), s(&ours)]), &format!("ringblk convert of {what}"));
    ok(qi(&["convert", "-O", "raw", s(img), s(&theirs)]), &format!("qemu-img convert of {what}"));
    let a = std::fs::read(&ours).unwrap();
    let b = std::fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i} ({:#x} vs {:#x})", a[i], b[i]);
    }
}

/// A qemu-io script that writes patterns, partial clusters, zeroes and
/// discards over a 8 MiB image.
fn qemu_io_workload(img: &Path) {
    let cmds = [
        "write -P 0x11 0 1M",
        "write -P 0x22 1536 3000",
        "write -P 0x33 2M 64k",
        "write -P 0x44 3M 512",
        "write -z 512k 256k",
        "write -P 0x55 4194000 9000",
        "discard 2M 64k",
        "write -z -u 5M 1M",
        "write -P 0x66 7M 100k",
    ];
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(s(img));
    ok(out(&mut c), "qemu-io workload");
}

#[test]
fn qemu_made_images_read_identically() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let combos = [
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536",
        "cluster_size=2M,refcount_bits=64",
        "compat=0.10",
        "cluster_size=65536,refcount_bits=8,lazy_refcounts=on",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k,compression_type=zstd",
    ];
    for o in combos {
        let img = d.path().join("q.qcow2");
        let _ = std::fs::remove_file(&img);
        ok(qi(&["create", "-q", "-f", "qcow2", "-o", o, s(&img), "8M"]), o);
        qemu_io_workload(&img);
        assert_reads_like_qemu(&img, d.path(), o);
        // Same check verdict: clean.
        let r = rb(&["check", s(&img)]);
        assert_eq!(r.status.code(), Some(0), "{o}: ringblk check: {}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        assert_eq!(ok(rb(&["info", "--output=json", s(&img)]), "info"), ok(qi(&["info", "--output=json", s(&img)]), "qemu info"), "{o}: info JSON");
    }
}

#[test]
fn qemu_compressed_images_read_identically() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("src.raw");
    let mut rng = Rng::new(9);
    let mut data = vec![0u8; 8 << 20];
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 => chunk.copy_from_slice(&rng.bytes(4096)),
            1 => chunk.fill((i % 251) as u8),
            2 => {}
            _ => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 64) as u8),
        }
    }
    std::fs::write(&raw, &data).unwrap();
    for ct in ["zlib", "zstd"] {
        let img = d.path().join(format!("c-{ct}.qcow2"));
        ok(qi(&["convert", "-c", "-O", "qcow2", "-o", &format!("compression_type={ct}"), s(&raw), s(&img)]), ct);
        assert_reads_like_qemu(&img, d.path(), ct);
        ok(qi(&["compare", s(&raw), s(&img)]), "qemu compare");
    }
}

/// Write through the engine API with a model alongside.
async fn random_writes(node: &dyn BlockNode, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng::new(seed);
    let size = model.len() as u64;
    for _ in 0..ops {
        let off = rng.below(size);
        let len = (1 + rng.below(200_000)).min(size - off);
        match rng.below(6) {
            0 => {
                node.write_zeroes(off, len, ZeroFlags { may_unmap: rng.below(2) == 0, ..Default::default() }).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                let data = rng.bytes(len as usize);
                let (r, _) = node.write(off, engine::runtime::IoBuf::from_slice(&data), WriteFlags::default()).await;
                r.unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
    }
}

fn open_qcow2_rw(path: &str, extra: &str) -> OptionTree {
    let mut o = OptionTree::parse(extra, None).unwrap();
    o.set("driver", "qcow2");
    o.set("file.filename", path);
    o
}

#[test]
fn ringblk_written_images_pass_qemu_check_and_compare() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let combos = [
        "cluster_size=512,refcount_bits=64",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=65536",
        "cluster_size=2M,refcount_bits=8",
        "compat=0.10",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k,compression_type=zstd",
        "lazy_refcounts=on",
    ];
    for (i, o) in combos.iter().enumerate() {
        let img = d.path().join(format!("w{i}.qcow2"));
        let model_path = d.path().join(format!("w{i}.raw"));
        ok(rb(&["create", "-q", "-f", "qcow2", "-o", o, s(&img), "6M"]), o);
        let p = path_str(&img);
        let model = on_shard(move || async move {
            let node = ringblk_tests::open(ringblk_tests::IO_URING_WRITEBACK, open_qcow2_rw(&p, "")).await.unwrap();
            let mut model = vec![0u8; 6 << 20];
            random_writes(&*node, &mut model, 100 + i as u64, 60).await;
            // What we read back is the model.
            let all = ringblk_tests::read_all(&*node).await;
            assert!(all == model, "read back after writes differs");
            node.close().await.unwrap();
            model
        });
        std::fs::write(&model_path, &model).unwrap();
        let c = qi(&["check", s(&img)]);
        assert!(c.status.success(), "{o}: qemu-img check: {}{}", String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&c.stderr));
        ok(qi(&["compare", "-f", "raw", "-F", "qcow2", s(&model_path), s(&img)]), &format!("{o}: qemu-img compare"));
    }
}

#[test]
fn overlay_writes_copy_from_the_backing_file() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&base), "4M"]), "base");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xab 0 4M", s(&base)])), "fill base");
    for o in ["cluster_size=65536", "extended_l2=on", "compat=0.10"] {
        let _ = std::fs::remove_file(&top);
        // A relative backing name resolves against the overlay's directory.
        ok(rb(&["create", "-q", "-f", "qcow2", "-o", o, "-b", "base.qcow2", "-F", "qcow2", s(&top)]), o);
        let p = path_str(&top);
        let model = on_shard(move || async move {
            let node = ringblk_tests::open(ringblk_tests::IO_URING_WRITEBACK, open_qcow2_rw(&p, "")).await.unwrap();
            assert_eq!(node.size(), 4 << 20, "size taken from the backing file");
            let mut model = vec![0xabu8; 4 << 20];
            random_writes(&*node, &mut model, 7, 30).await;
            node.close().await.unwrap();
            model
        });
        let model_path = d.path().join("model.raw");
        std::fs::write(&model_path, &model).unwrap();
        let c = qi(&["check", s(&top)]);
        assert!(c.status.success(), "{o}: {}", String::from_utf8_lossy(&c.stdout));
        ok(qi(&["compare", "-f", "raw", "-F", "qcow2", s(&model_path), s(&top)]), o);
        // Map depth: unwritten parts come from the backing file at depth 1.
        let ours = ok(rb(&["map", "--output=json", s(&top)]), "map");
        let theirs = ok(qi(&["map", "--output=json", s(&top)]), "qemu map");
        assert_eq!(ours, theirs, "{o}: map through the backing chain");
        for fmt in ["human", "json"] {
            let a = ok(rb(&["info", "--backing-chain", "--output", fmt, s(&top)]), "info chain");
            let b = ok(qi(&["info", "--backing-chain", "--output", fmt, s(&top)]), "qemu info chain");
            assert_eq!(a, b, "{o}: info --backing-chain ({fmt})");
        }
    }
}

/// Set the 16-bit refcount of `cluster` in the first refcount block.
fn poke_refcount(img: &Path, cluster: u64, v: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut hdr = [0u8; 64];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let rt = u64::from_be_bytes(hdr[48..56].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).unwrap();
    let rb = u64::from_be_bytes(e);
    f.write_all_at(&v.to_be_bytes(), rb + cluster * 2).unwrap();
}

#[test]
fn check_finds_what_qemu_finds_and_repairs_it() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&img), "1M"]), "create");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write 0 128k", s(&img)])), "write");
    let cases: [(&str, &[(u64, u16)]); 3] = [
        ("leak", &[(3, 2)]),
        ("missing reference", &[(5, 0)]),
        ("both", &[(3, 2), (5, 0), (6, 3)]),
    ];
    for (what, pokes) in cases {
        let t = d.path().join(format!("{}.qcow2", what.replace(' ', "_")));
        std::fs::copy(&img, &t).unwrap();
        for &(c, v) in pokes {
            poke_refcount(&t, c, v);
        }
        for fmt in ["human", "json"] {
            let a = rb(&["check", "--output", fmt, s(&t)]);
            let b = qi(&["check", "--output", fmt, s(&t)]);
            assert_eq!(a.status.code(), b.status.code(), "{what}: exit codes");
            assert_eq!(String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout), "{what} ({fmt}): stdout");
            assert_eq!(String::from_utf8_lossy(&a.stderr), String::from_utf8_lossy(&b.stderr).replace("qemu-img:", "ringblk:"), "{what}: stderr");
        }
        let r = rb(&["check", "-r", "all", s(&t)]);
        assert_eq!(r.status.code(), Some(0), "{what}: repair: {}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        let c = qi(&["check", s(&t)]);
        assert!(c.status.success(), "{what}: qemu-img check after our repair: {}", String::from_utf8_lossy(&c.stdout));
    }
    // Leaks only: -r leaks is enough, and check says 3 before.
    let t = d.path().join("leaky.qcow2");
    std::fs::copy(&img, &t).unwrap();
    poke_refcount(&t, 3, 2);
    assert_eq!(rb(&["check", s(&t)]).status.code(), Some(3));
    assert_eq!(rb(&["check", "-r", "leaks", s(&t)]).status.code(), Some(0));
    assert!(qi(&["check", s(&t)]).status.success());
    // Raw cannot be checked: 63.
    let raw = d.path().join("r.raw");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    assert_eq!(rb(&["check", "-f", "raw", s(&raw)]).status.code(), Some(63));
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Damage in the tables rather than the refcounts: two L2 entries sharing a
/// host cluster, a data cluster and an L2 table past the end of the file, a
/// misaligned data cluster. check reports exactly what qemu-img reports, and
/// -r all ends where qemu-img's repair ends (clean where it gets clean, with
/// the same guest data).
#[test]
fn check_matches_qemu_on_damaged_tables() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&img), "1M"]), "create");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 0 256k", s(&img)])), "write");
    let b = std::fs::read(&img).unwrap();
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let copied = 1u64 << 63;
    let cases: [(&str, usize, u64); 4] = [
        ("overlapping clusters", l2 + 8, be64(&b, l2)),
        ("data cluster past the end", l2 + 16, (1 << 40) | copied),
        ("L2 table past the end", l1, (1 << 40) | copied),
        ("misaligned data cluster", l2 + 24, (be64(&b, l2 + 24) + 0x200) | copied),
    ];
    for (what, at, v) in cases {
        let name = what.replace(' ', "_");
        let t = d.path().join(format!("{name}.qcow2"));
        let mut img_bytes = b.clone();
        img_bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
        std::fs::write(&t, &img_bytes).unwrap();
        for fmt in ["human", "json"] {
            let (a, q) = (rb(&["check", "--output", fmt, s(&t)]), qi(&["check", "--output", fmt, s(&t)]));
            assert_eq!(a.status.code(), q.status.code(), "{what}: exit codes");
            assert_eq!(String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&q.stdout), "{what} ({fmt})");
        }
        let (ours, theirs) = (d.path().join(format!("{name}-rb.qcow2")), d.path().join(format!("{name}-qemu.qcow2")));
        std::fs::write(&ours, &img_bytes).unwrap();
        std::fs::write(&theirs, &img_bytes).unwrap();
        let (a, q) = (rb(&["check", "-r", "all", s(&ours)]), qi(&["check", "-r", "all", s(&theirs)]));
        assert_eq!(a.status.code(), q.status.code(), "{what}: repair exit codes: {}", String::from_utf8_lossy(&a.stdout));
        if q.status.success() {
            ok(qi(&["check", s(&ours)]), what);
            ok(qi(&["compare", s(&theirs), s(&ours)]), what);
        }
    }
}

/// Internal snapshots and persistent bitmaps own clusters too (snapshot L1 and
/// L2 tables, bitmap tables and their data): check counts them, so a clean
/// image made by QEMU checks clean here, and a leak is still found.
#[test]
fn check_counts_snapshot_and_bitmap_clusters() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("sb.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&img), "64M"]), "create");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 1 0 4M", s(&img)])), "write");
    ok(qi(&["snapshot", "-c", "s1", s(&img)]), "snapshot");
    ok(qi(&["bitmap", "--add", s(&img), "b0"]), "bitmap b0");
    ok(qi(&["bitmap", "--add", "-g", "4096", s(&img), "b1"]), "bitmap b1");
    // Dirty the bitmaps so their tables point at data clusters.
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 2 1M 3M", "-c", "write -P 3 40M 64k", s(&img)])), "write");
    for fmt in ["human", "json"] {
        let a = rb(&["check", "--output", fmt, s(&img)]);
        let b = qi(&["check", "--output", fmt, s(&img)]);
        assert_eq!(b.status.code(), Some(0), "qemu-img finds the image clean");
        assert_eq!(a.status.code(), Some(0), "ringblk: {}", String::from_utf8_lossy(&a.stdout));
        assert_eq!(String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout), "{fmt} output");
    }
    let t = d.path().join("leak.qcow2");
    std::fs::copy(&img, &t).unwrap();
    let end = std::fs::metadata(&t).unwrap().len() / 65536;
    poke_refcount(&t, end - 1, 7); // overstated: a leak of 6
    let (a, b) = (rb(&["check", s(&t)]), qi(&["check", s(&t)]));
    assert_eq!(a.status.code(), b.status.code(), "exit codes on the damaged image");
    assert_eq!(String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout));
}

#[test]
fn convert_compressed_and_with_backing() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("text.raw");
    // Compressible data with holes and random stretches.
    let mut rng = Rng::new(21);
    let mut data = Vec::with_capacity(6 << 20);
    while data.len() < 6 << 20 {
        match rng.below(8) {
            0 => data.extend(rng.bytes(70_000)),
            1 => data.extend(std::iter::repeat_n(0u8, 200_000)),
            _ => data.extend(format!("block {} of many words ", rng.below(1000)).bytes()),
        }
    }
    data.truncate(6 << 20);
    std::fs::write(&raw, &data).unwrap();
    for ct in ["zlib", "zstd"] {
        let ours = d.path().join(format!("ours-{ct}.qcow2"));
        let theirs = d.path().join(format!("theirs-{ct}.qcow2"));
        ok(rb(&["convert", "-c", "-O", "qcow2", "-o", &format!("compression_type={ct}"), s(&raw), s(&ours)]), ct);
        ok(qi(&["convert", "-c", "-O", "qcow2", "-o", &format!("compression_type={ct}"), s(&raw), s(&theirs)]), ct);
        ok(qi(&["check", s(&ours)]), "qemu-img check of our compressed image");
        ok(qi(&["compare", s(&raw), s(&ours)]), "compare");
        let (a, b) = (std::fs::metadata(&ours).unwrap().len(), std::fs::metadata(&theirs).unwrap().len());
        assert!(a * 100 <= b * 105, "{ct}: ours {a} bytes is more than 5% larger than qemu-img's {b}");
        let info = ok(qi(&["check", "--output=json", s(&ours)]), "check json");
        assert!(info.contains("compressed-clusters"), "{ct}: clusters were compressed: {info}");
    }
    // -B: only what the source's top image allocates is copied; the rest
    // comes from the shared backing file.
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    let out_img = d.path().join("out.qcow2");
    ok(qi(&["convert", "-O", "qcow2", s(&raw), s(&base)]), "base");
    ok(qi(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top)]), "top");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 1M 300k", "-c", "write -z 3M 128k", s(&top)])), "top writes");
    ok(rb(&["convert", "-O", "qcow2", "-B", s(&base), "-F", "qcow2", s(&top), s(&out_img)]), "convert -B");
    ok(qi(&["compare", s(&top), s(&out_img)]), "compare -B output");
    let a = std::fs::metadata(&out_img).unwrap().len();
    assert!(a < 2 << 20, "-B output holds only the top layer's data ({a} bytes)");
    // convert reserves blocks ahead of the growing target; none stay behind.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out_img).unwrap()) * 512;
    assert!(blocks <= a.next_multiple_of(1 << 20), "{blocks} bytes allocated for a {a}-byte output");
    // -c with -B: whole clusters the top touches, compressed, and nothing else.
    let out_c = d.path().join("outc.qcow2");
    ok(rb(&["convert", "-c", "-O", "qcow2", "-B", s(&base), "-F", "qcow2", s(&top), s(&out_c)]), "convert -c -B");
    ok(qi(&["compare", s(&top), s(&out_c)]), "compare -c -B output");
    assert!(std::fs::metadata(&out_c).unwrap().len() < 2 << 20, "-c -B output holds only the top layer");

    // -c over holes smaller than a cluster, and over concatenated sources
    // whose sizes are not whole clusters: output clusters straddle both.
    let holes = d.path().join("holes.raw");
    let mut data = Rng::new(11).bytes(3 << 20);
    data.truncate(3_000_320);
    std::fs::write(&holes, &data).unwrap();
    for (off, len) in [(8192u64, 4096u64), (200_704, 65536), (1_050_000 / 512 * 512, 1024)] {
        let f = std::fs::OpenOptions::new().write(true).open(&holes).unwrap();
        // SAFETY: punching a hole in a file we own.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0x03, off as i64, len as i64) };
        assert_eq!(r, 0, "punch hole");
    }
    let small = d.path().join("small.raw");
    std::fs::write(&small, Rng::new(12).bytes(1_000_448)).unwrap();
    let joined = d.path().join("joined.raw");
    let mut all = std::fs::read(&small).unwrap();
    all.extend(std::fs::read(&holes).unwrap());
    std::fs::write(&joined, &all).unwrap();
    for (what, srcs) in [("holes", vec![&holes]), ("concatenated", vec![&small, &holes])] {
        let outp = d.path().join(format!("{what}.qcow2"));
        let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
        args.extend(srcs.iter().map(|p| s(p)));
        args.push(s(&outp));
        ok(rb(&args), what);
        let want = if srcs.len() == 1 { &holes } else { &joined };
        ok(qi(&["compare", "-f", "raw", "-F", "qcow2", s(want), s(&outp)]), what);
        ok(qi(&["check", s(&outp)]), what);
    }
}

#[test]
fn measure_matches_qemu_img() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("m.raw");
    let mut data = vec![0u8; 5 << 20];
    data[100_000..700_000].fill(1);
    data[3 << 20..(3 << 20) + 5000].fill(2);
    std::fs::write(&raw, &data).unwrap();
    let q = d.path().join("m.qcow2");
    ok(qi(&["convert", "-O", "qcow2", s(&raw), s(&q)]), "convert");
    for src in [s(&raw), s(&q)] {
        for o in ["cluster_size=65536", "cluster_size=512,refcount_bits=64", "cluster_size=2M,refcount_bits=1", "cluster_size=16k,extended_l2=on", "preallocation=falloc"] {
            for fmt in ["human", "json"] {
                let a = ok(rb(&["measure", "--output", fmt, "-O", "qcow2", "-o", o, src]), "ringblk measure");
                let b = ok(qi(&["measure", "--output", fmt, "-O", "qcow2", "-o", o, src]), "qemu-img measure");
                assert_eq!(a, b, "measure -o {o} of {src} ({fmt})");
            }
        }
    }
    for size in ["1G", "1234567", "100T"] {
        let a = ok(rb(&["measure", "-O", "qcow2", "--size", size]), "ringblk measure");
        let b = ok(qi(&["measure", "-O", "qcow2", "--size", size]), "qemu-img measure");
        assert_eq!(a, b, "--size {size}");
    }
}

/// A base with data, an overlay over it with writes of its own.
fn chain(dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(format!("base-{tag}.qcow2"));
    let top = dir.join(format!("top-{tag}.qcow2"));
    ok(qi(&["create", "-q", "-f", "qcow2", s(&base), "4M"]), "base");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 3M", s(&base)])), "base data");
    ok(qi(&["create", "-q", "-f", "qcow2", "-b", s(&base), "-F", "qcow2", s(&top)]), "top");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x22 512k 100k", "-c", "write -z 2M 64k", "-c", "write -P 0x33 3M 200k", s(&top)])), "top data");
    (base, top)
}

#[test]
fn commit_matches_qemu_img_commit() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (b1, t1) = chain(d.path(), "ours");
    let (b2, t2) = chain(d.path(), "theirs");
    let before = d.path().join("before.raw");
    ok(qi(&["convert", "-O", "raw", s(&t1), s(&before)]), "view before");
    let o = ok(rb(&["commit", s(&t1)]), "ringblk commit");
    assert_eq!(o, "Image committed.\n");
    ok(qi(&["commit", "-q", s(&t2)]), "qemu-img commit");
    ok(qi(&["compare", s(&b1), s(&b2)]), "committed bases match");
    ok(qi(&["compare", s(&before), s(&t1)]), "the top still reads the same");
    ok(qi(&["check", s(&b1)]), "base check");
    ok(qi(&["check", s(&t1)]), "top check");
    // Emptied like qemu-img's: nothing allocated in the top any more.
    assert_eq!(ok(rb(&["map", "--output=json", s(&t1)]), "map"), ok(qi(&["map", "--output=json", s(&t2)]), "qemu map"));
}

#[test]
fn rebase_keeps_the_guest_view_and_unsafe_only_renames() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (_b1, top) = chain(d.path(), "r");
    let other = d.path().join("other.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&other), "4M"]), "other");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x44 1M 1M", s(&other)])), "other data");
    let before = d.path().join("before.raw");
    ok(qi(&["convert", "-O", "raw", s(&top), s(&before)]), "view before");
    ok(rb(&["rebase", "-b", "other.qcow2", "-F", "qcow2", s(&top)]), "safe rebase");
    ok(qi(&["compare", s(&before), s(&top)]), "same view after a safe rebase");
    ok(qi(&["check", s(&top)]), "check");
    let info = ok(qi(&["info", "--output=json", s(&top)]), "info");
    assert!(info.contains("\"backing-filename\": \"other.qcow2\""), "{info}");
    // -u: only the name changes (the view now shows the new base where the
    // top is unallocated).
    let third = d.path().join("third.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&third), "4M"]), "third");
    ok(rb(&["rebase", "-u", "-b", s(&third), "-F", "qcow2", s(&top)]), "unsafe rebase");
    let info = ok(qi(&["info", "--output=json", s(&top)]), "info");
    assert!(info.contains(&format!("\"backing-filename\": \"{}\"", s(&third))), "{info}");
    assert!(!qi(&["compare", s(&before), s(&top)]).status.success(), "-u copied nothing");
    // Rebasing onto nothing keeps the view too.
    ok(rb(&["rebase", "-u", "-b", s(&_b1), "-F", "qcow2", s(&top)]), "back");
    ok(rb(&["rebase", "-b", "", s(&top)]), "flatten");
    ok(qi(&["compare", s(&before), s(&top)]), "same view without a backing file");
    assert!(!ok(qi(&["info", s(&top)]), "info").contains("backing file"));
}

/// Many writers on both shards race to allocate the same clusters (each
/// writes its own 4 KiB piece): every piece survives, and no cluster is
/// allocated twice (qemu-img check finds no leak and no corruption).
#[test]
fn concurrent_allocating_writes_never_double_allocate() {
    if !tools() {
        return;
    }
    use std::sync::Arc;
    let d = tempfile::tempdir().unwrap();
    for o in ["cluster_size=65536", "cluster_size=65536,extended_l2=on", "cluster_size=4096,refcount_bits=1"] {
        let img = d.path().join("race.qcow2");
        let _ = std::fs::remove_file(&img);
        ok(rb(&["create", "-q", "-f", "qcow2", "-o", o, s(&img), "16M"]), o);
        let rt = engine::runtime::Runtime::new(engine::runtime::RuntimeConfig { shards: 2, ..Default::default() }).unwrap();
        let p = path_str(&img);
        let node = rt.block_on(move || async move { ringblk_tests::open(ringblk_tests::IO_URING_WRITEBACK, open_qcow2_rw(&p, "")).await.unwrap() });
        // 64 tasks per shard, 4 rounds: pieces k of clusters 0..32 (64 KiB),
        // so every cluster is hit by many writers at once.
        let mut handles = Vec::new();
        for t in 0..128u64 {
            let n = node.clone();
            handles.push(rt.spawn_on((t % 2) as usize, move || async move {
                for round in 0..4u64 {
                    let piece = t * 4 + round; // 512 pieces of 4 KiB = 2 MiB
                    let off = (piece % 32) * 65536 + (piece / 32) * 4096;
                    let (r, _) = n.write(off, engine::runtime::IoBuf::from_slice(&vec![(piece % 251) as u8 + 1; 4096]), WriteFlags::default()).await;
                    r.unwrap();
                    engine::runtime::yield_now().await;
                }
            }));
        }
        for h in handles {
            h.join();
        }
        let n = Arc::clone(&node);
        let all = rt.block_on(move || async move {
            let all = ringblk_tests::read_all(&*n).await;
            n.close().await.unwrap();
            all
        });
        drop(node);
        drop(rt);
        for piece in 0..512u64 {
            let off = ((piece % 32) * 65536 + (piece / 32) * 4096) as usize;
            assert!(all[off..off + 4096].iter().all(|&b| b == (piece % 251) as u8 + 1), "{o}: piece {piece} lost");
        }
        let c = qi(&["check", s(&img)]);
        assert!(c.status.success(), "{o}: {}{}", String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&c.stderr));
    }
}

#[test]
fn amend_changes_what_qemu_allows_and_keeps_the_data() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (_base, img) = chain(d.path(), "amend");
    let view = d.path().join("view.raw");
    ok(qi(&["convert", "-O", "raw", s(&img), s(&view)]), "view");
    // Includes zero clusters over a backing file: the downgrade must turn
    // them into real zeroes.
    for o in ["refcount_bits=1", "refcount_bits=64", "lazy_refcounts=on", "lazy_refcounts=off", "refcount_bits=16,compat=0.10", "compat=1.1", "refcount_bits=8"] {
        ok(rb(&["amend", "-o", o, s(&img)]), o);
        ok(qi(&["check", s(&img)]), &format!("{o}: qemu-img check"));
        ok(qi(&["compare", s(&view), s(&img)]), &format!("{o}: same data"));
        let info = ok(qi(&["info", "--output=json", s(&img)]), "info");
        for kv in o.split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            let want = match k {
                "refcount_bits" => format!("\"refcount-bits\": {v}"),
                "lazy_refcounts" => format!("\"lazy-refcounts\": {}", v == "on"),
                _ => format!("\"compat\": \"{v}\""),
            };
            assert!(info.contains(&want), "{o}: {info}");
        }
    }
    let r = rb(&["amend", "-o", "cluster_size=4k", s(&img)]);
    assert!(!r.status.success() && String::from_utf8_lossy(&r.stderr).contains("cluster size"));
}

#[test]
fn external_data_files_both_ways() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // Data file names are relative to the working directory (as in QEMU):
    // give absolute ones.
    let df = d.path().join("df.raw");
    let img = d.path().join("df.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", "-o", &format!("data_file={}", s(&df)), s(&img), "4M"]), "create");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 5 0 1M", "-c", "write -z 2M 64k", "-c", "write -P 6 3M 10k", s(&img)])), "qemu-io");
    assert_reads_like_qemu(&img, d.path(), "data_file");
    let model = d.path().join("model.raw");
    ok(qi(&["convert", "-O", "raw", s(&img), s(&model)]), "model");
    // We write (plain and raw data files), QEMU checks and reads; a raw data
    // file is the disk itself.
    for (name, extra) in [("dw", ""), ("dr", ",data_file_raw=on")] {
        let ours = d.path().join(format!("{name}.qcow2"));
        let o = &format!("data_file={}{extra}", s(&d.path().join(format!("{name}.raw"))));
        ok(rb(&["create", "-q", "-f", "qcow2", "-o", o, s(&ours), "4M"]), o);
        ok(rb(&["convert", "-n", "-O", "qcow2", s(&model), s(&ours)]), o);
        ok(qi(&["check", s(&ours)]), o);
        ok(qi(&["compare", s(&model), s(&ours)]), o);
        let info = ok(qi(&["info", "--output=json", s(&ours)]), "info");
        assert!(info.contains(&format!("{name}.raw\"")), "{info}");
    }
    assert_eq!(std::fs::read(d.path().join("dr.raw")).unwrap(), std::fs::read(&model).unwrap(), "raw data file is the disk");
}

#[test]
fn preallocation_and_resize_match_qemu() {
    if !tools() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for p in ["metadata", "falloc", "full"] {
        let ours = d.path().join(format!("ours-{p}.qcow2"));
        let theirs = d.path().join(format!("theirs-{p}.qcow2"));
        ok(rb(&["create", "-q", "-f", "qcow2", "-o", &format!("preallocation={p}"), s(&ours), "8M"]), p);
        ok(qi(&["create", "-q", "-f", "qcow2", "-o", &format!("preallocation={p}"), s(&theirs), "8M"]), p);
        ok(qi(&["check", s(&ours)]), p);
        ok(qi(&["compare", s(&ours), s(&theirs)]), p);
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (std::fs::metadata(&ours).unwrap(), std::fs::metadata(&theirs).unwrap());
        assert_eq!(a.len(), b.len(), "{p}: file length");
        assert_eq!(a.blocks(), b.blocks(), "{p}: allocated blocks");
    }
    // Shrink drops data and the file's tail; growing with preallocation reads zeroes.
    let img = d.path().join("r.qcow2");
    ok(qi(&["create", "-q", "-f", "qcow2", s(&img), "8M"]), "create");
    ok(out(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 3 0 8M", s(&img)])), "fill");
    let before = std::fs::metadata(&img).unwrap().len();
    assert!(!rb(&["resize", s(&img), "3M"]).status.success(), "shrinking needs --shrink");
    ok(rb(&["resize", "--shrink", s(&img), "3M"]), "shrink");
    ok(qi(&["check", s(&img)]), "check after shrink");
    assert!(std::fs::metadata(&img).unwrap().len() < before / 2, "the file shrank on the host");
    ok(rb(&["resize", "--preallocation=falloc", s(&img), "+5M"]), "grow");
    ok(qi(&["check", s(&img)]), "check after grow");
    let model = d.path().join("m.raw");
    let mut m = vec![3u8; 3 << 20];
    m.resize(8 << 20, 0);
    std::fs::write(&model, &m).unwrap();
    ok(qi(&["compare", "-f", "raw", s(&model), s(&img)]), "contents after shrink and grow");
}
