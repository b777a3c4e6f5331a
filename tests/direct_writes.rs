//! Direct (cache=none) writes on btrfs. io_uring hands a direct write that
//! would block to its worker, and its worker runs a file's writes one at a
//! time unless the filesystem takes direct writes in parallel (ext4 and xfs
//! say they do, btrfs does not), so the file driver sends large direct
//! writes on such filesystems to the thread pool. Here: the driver tells
//! the filesystems apart, and what those writes carry lands, from `bench`,
//! `convert` (raw and qcow2, checked by qemu-img) and the library at depth.

use std::os::fd::AsRawFd;
use std::process::Command;

use engine::block::WriteFlags;
use engine::runtime::IoBuf;
use ringblk_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn large_direct_writes_on_btrfs_land() {
    if !root_or_skip("mounting loop filesystems") || !have("mkfs.btrfs") || !have("mkfs.ext4") || !have("qemu-img") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (bdir, edir) = (tmp.path().join("b"), tmp.path().join("e"));
    std::fs::create_dir_all(&bdir).unwrap();
    std::fs::create_dir_all(&edir).unwrap();
    let btrfs = FsMount::btrfs(&bdir, 320 * MIB);
    let ext4 = FsMount::ext4(&edir, 16 * MIB);
    let on = |dir: &std::path::Path| {
        let p = dir.join("probe");
        let f = std::fs::File::create(&p).unwrap();
        drivers::protocol::parallel_dio_writes(f.as_raw_fd())
    };
    assert!(!on(btrfs.dir()), "btrfs: io_uring serialises direct writes it punts");
    assert!(on(ext4.dir()), "ext4 takes direct writes in parallel");

    // bench: sixteen 1 MiB writes in flight, pattern byte 0x5a.
    let raw = btrfs.dir().join("bench.raw");
    make_file(&raw, 32 * MIB, None);
    run(Command::new(bin("ringblk"))
        .args(["bench", "-w", "-f", "raw", "-t", "none", "-i", "io_uring", "-s", "1M", "-d", "16", "-c", "32"])
        .args(["--pattern", "90", "--shards", "1"])
        .arg(&raw));
    let data = std::fs::read(&raw).unwrap();
    assert_eq!(data.len() as u64, 32 * MIB);
    if let Some(i) = data.iter().position(|&b| b != 90) {
        panic!("{}: byte {i} is {:#x}, not the pattern", raw.display(), data[i]);
    }

    // convert: random data with zero runs, to raw and to qcow2 on btrfs.
    let src = tmp.path().join("src.raw");
    let mut rng = Rng::new(11);
    let mut img = rng.bytes((40 * MIB) as usize);
    for k in 0..5 {
        let at = (k * 8 + 3) * MIB as usize;
        img[at..at + MIB as usize].fill(0);
    }
    std::fs::write(&src, &img).unwrap();
    for fmt in ["raw", "qcow2"] {
        let dst = btrfs.dir().join(format!("c.{fmt}"));
        run(Command::new(bin("ringblk")).args(["convert", "-t", "none", "-O", fmt]).arg(&src).arg(&dst));
        run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", fmt]).arg(&src).arg(&dst));
        if fmt == "qcow2" {
            let (code, report) = qemu_check(&dst, false);
            assert_eq!(code, 0, "qemu-img check {}: {report}", dst.display());
        }
    }

    // The library: 1 MiB writes (pooled) and 64 KiB ones (on the ring) in
    // flight together through the file driver, read back.
    let lib = btrfs.dir().join("lib.raw");
    make_file(&lib, 24 * MIB, None);
    let p = path_str(&lib);
    let want = Rng::new(5).bytes((24 * MIB) as usize);
    let w2 = want.clone();
    let got = on_shard(move || async move {
        let node = open_raw(IO_URING_NONE, &p).await;
        let want = std::rc::Rc::new(w2);
        let mut tasks = Vec::new();
        // 16 MiB in 1 MiB pieces, 8 MiB in 64 KiB pieces.
        let pieces: Vec<(u64, u64)> =
            (0..16).map(|i| (i * MIB, MIB)).chain((0..128).map(|i| (16 * MIB + i * (64 << 10), 64 << 10))).collect();
        for (off, len) in pieces {
            let (node, want) = (node.clone(), want.clone());
            tasks.push(engine::runtime::spawn_local(async move {
                let mut buf = IoBuf::new(len as usize);
                buf.copy_from_slice(&want[off as usize..(off + len) as usize]);
                let (r, _) = node.write(off, buf, WriteFlags::default()).await;
                r.unwrap_or_else(|e| panic!("write at {off}: {e}"));
            }));
        }
        for t in tasks {
            t.await;
        }
        node.flush().await.unwrap();
        let (r, buf) = node.read(0, IoBuf::new((24 * MIB) as usize)).await;
        r.unwrap();
        node.close().await.unwrap();
        buf.to_vec()
    });
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!("{}: byte {i} differs after writes through the file driver", lib.display());
    }
    assert_eq!(std::fs::read(&lib).unwrap(), want, "the file holds what was written");
}
