//! Malformed qcow2 images: hand-made damage (huge tables, tables and clusters
//! past the end of the file, bad cluster sizes, unknown features, garbage
//! compressed data, refcount blocks pointing at each other) gives a clear
//! error naming the file, and random mutations of a real image's metadata
//! never panic the process: open, read, write, check and repair all either
//! work or fail with an error. The same parsing runs under libFuzzer in
//! `fuzz/` (cargo fuzz run qcow2_open).

use std::path::Path;
use std::process::Command;

use engine::block::{open_image, CheckFix, OpenCtx, OpenFlags, WriteFlags};
use engine::error::Result;
use engine::options::OptionTree;
use engine::runtime::IoBuf;
use ringblk_tests::{have, on_shard, path_str, Rng};

fn put(img: &mut [u8], at: usize, v: &[u8]) {
    img[at..at + v.len()].copy_from_slice(v);
}

/// Open (read-write unless `ro`), read everything, write a little, check,
/// repair. Returns the first error; must never panic.
async fn exercise(path: String, ro: bool) -> Result<()> {
    let ctx = OpenCtx::new(nbd::registry(), OpenFlags { write: !ro, follow_backing: false, ..Default::default() });
    let mut o = OptionTree::new();
    o.set("driver", "qcow2");
    o.set("file.filename", &path);
    o.set("backing", "null");
    let node = open_image(&ctx, o).await?;
    let size = node.size().min(8 << 20);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(1 << 20);
        let (r, _) = node.read(off, IoBuf::new(n as usize)).await;
        r?;
        off += n;
    }
    if !ro && size > 0 {
        let (r, _) = node.write(size / 2, IoBuf::from_slice(&[7u8; 5000][..(size - size / 2).min(5000) as usize]), WriteFlags::default()).await;
        r?;
        node.check(CheckFix { leaks: true, errors: true }).await?;
    } else {
        node.check(CheckFix::default()).await?;
    }
    node.close().await
}

fn base_image(dir: &Path) -> Vec<u8> {
    let img = dir.join("base.qcow2");
    let raw = dir.join("src.raw");
    let mut rng = Rng::new(5);
    let mut data = rng.bytes(2 << 20);
    data[512 << 10..1 << 20].fill(0);
    std::fs::write(&raw, &data).unwrap();
    // Small clusters: many tables in little space. Some clusters compressed.
    let st = Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2", "-o", "cluster_size=4096", &path_str(&raw), &path_str(&img)]).status().unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -c -P 0x33 512k 64k", &path_str(&img)]).stdout(std::process::Stdio::null()).status().unwrap();
    assert!(st.success());
    std::fs::read(&img).unwrap()
}

#[test]
fn damaged_headers_and_tables_give_clear_errors() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = base_image(d.path());
    let path = d.path().join("bad.qcow2");
    type Damage = (&'static str, fn(&mut Vec<u8>), &'static str);
    let cases: &[Damage] = &[
        ("cluster_bits 30", |i| put(i, 20, &30u32.to_be_bytes()), "cluster size"),
        ("cluster_bits 8", |i| put(i, 20, &8u32.to_be_bytes()), "cluster size"),
        ("version 9", |i| put(i, 4, &9u32.to_be_bytes()), "version"),
        ("huge L1", |i| put(i, 36, &u32::MAX.to_be_bytes()), "L1 table"),
        ("L1 too small", |i| put(i, 36, &0u32.to_be_bytes()), "L1 table is too small"),
        ("L1 past EOF", |i| put(i, 40, &(1u64 << 40).to_be_bytes()), "past the end"),
        ("L1 misaligned", |i| put(i, 40, &0x3_0100u64.to_be_bytes()), "aligned"),
        ("huge refcount table", |i| put(i, 56, &u32::MAX.to_be_bytes()), "Reference count table"),
        ("no refcount table", |i| put(i, 56, &0u32.to_be_bytes()), "reference count table"),
        ("unknown incompatible", |i| put(i, 72, &(1u64 << 33).to_be_bytes()), "Unknown incompatible feature"),
        ("refcount order 7", |i| put(i, 96, &7u32.to_be_bytes()), "Reference count entry width"),
        ("header length 13", |i| put(i, 100, &13u32.to_be_bytes()), "header length"),
        ("backing name overflow", |i| {
            put(i, 8, &4090u64.to_be_bytes());
            put(i, 16, &100u32.to_be_bytes());
        }, "Backing file name"),
        ("not qcow2", |i| put(i, 0, b"XXXX"), "not in qcow2 format"),
    ];
    for (what, damage, expect) in cases {
        let mut img = base.clone();
        damage(&mut img);
        std::fs::write(&path, &img).unwrap();
        let p = path_str(&path);
        let e = on_shard(move || async move { exercise(p, true).await }).expect_err(what);
        let msg = e.to_string();
        assert!(msg.to_lowercase().contains(&expect.to_lowercase()), "{what}: message '{msg}' lacks '{expect}'");
        assert_eq!(e.file(), Some(path_str(&path).as_str()), "{what}: error names the file: {msg}");
    }
}

#[test]
fn tables_pointing_outside_the_file_are_corruption_not_crashes() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = base_image(d.path());
    let path = d.path().join("bad.qcow2");
    let l1_off = u64::from_be_bytes(base[40..48].try_into().unwrap()) as usize;
    let rt_off = u64::from_be_bytes(base[48..56].try_into().unwrap()) as usize;
    let l2_off = (u64::from_be_bytes(base[l1_off..l1_off + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    type Pokes = Vec<(usize, Vec<u8>)>;
    let cases: Vec<(&str, Pokes)> = vec![
        ("L2 table past EOF", vec![(l1_off, ((1u64 << 50) | (1 << 63)).to_be_bytes().to_vec())]),
        ("L2 table misaligned", vec![(l1_off, (0x1200u64 | (1 << 63)).to_be_bytes().to_vec())]),
        ("data cluster past EOF", vec![(l2_off + 8 * 20, ((1u64 << 48) | (1 << 63)).to_be_bytes().to_vec())]),
        ("data cluster misaligned", vec![(l2_off + 8 * 20, (0x5_0200u64 | (1 << 63)).to_be_bytes().to_vec())]),
        ("reserved bits", vec![(l2_off + 8 * 21, (0x5_0000u64 | (1 << 60) | (1 << 63)).to_be_bytes().to_vec())]),
        ("garbage compressed data", vec![(l2_off + 8 * 22, ((1u64 << 62) | (3 << 58) | 0x200).to_be_bytes().to_vec())]),
        ("refcount block is the header", vec![(rt_off, 0u64.to_be_bytes().to_vec()), (rt_off + 8, 0u64.to_be_bytes().to_vec())]),
        ("refcount blocks pointing at each other", vec![(rt_off + 8, (rt_off as u64).to_be_bytes().to_vec())]),
        ("L2 table is the L1 table", vec![(l1_off, ((l1_off as u64) | (1 << 63)).to_be_bytes().to_vec())]),
    ];
    for (what, pokes) in cases {
        let mut img = base.clone();
        for (at, v) in pokes {
            put(&mut img, at, &v);
        }
        for ro in [true, false] {
            std::fs::write(&path, &img).unwrap();
            let p = path_str(&path);
            // Either it works (the damage is repairable or harmless) or it fails
            // with an error; the process never panics.
            let r = on_shard(move || async move { exercise(p, ro).await });
            if let Err(e) = r {
                assert!(e.file().is_some(), "{what}: error without a file name: {e}");
            }
        }
    }
}

#[test]
fn random_metadata_mutations_never_panic() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = base_image(d.path());
    let path = d.path().join("fuzz.qcow2");
    let mut rng = Rng::new(0xf022);
    // Metadata lives in the first clusters and in the L2/refcount clusters;
    // mutate anywhere in the first 64 KiB plus the table areas.
    let l1_off = u64::from_be_bytes(base[40..48].try_into().unwrap()) as usize;
    let meta_end = (l1_off + 4096).min(base.len());
    let mut errors = 0;
    for i in 0..300 {
        let mut img = base.clone();
        for _ in 0..1 + rng.below(6) {
            let at = if rng.below(3) == 0 { rng.below(128) as usize } else { rng.below(meta_end as u64) as usize };
            match rng.below(3) {
                0 => img[at] ^= 1 << rng.below(8),
                1 => img[at] = rng.below(256) as u8,
                _ => {
                    let v = rng.next_u64().to_be_bytes();
                    let n = (img.len() - at).min(8);
                    img[at..at + n].copy_from_slice(&v[..n]);
                }
            }
        }
        std::fs::write(&path, &img).unwrap();
        let p = path_str(&path);
        let ro = i % 2 == 0;
        if on_shard(move || async move { exercise(p, ro).await }).is_err() {
            errors += 1;
        }
    }
    // Most single-field mutations must be caught (not all: some land in padding).
    assert!(errors > 0, "no mutation was detected");
}
