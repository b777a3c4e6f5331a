//! The host_device protocol on a real block device (a loop device over a
//! 16 MiB file, root only), on every backend and cache mode: size, round trips
//! (misaligned ones too), zeroing, discard, status, and the `file` driver's
//! refusal of a block device.

use std::path::Path;

use engine::block::{WriteFlags, ZeroFlags};
use engine::ErrorKind;
use ringblk_tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const SIZE: u64 = 16 * MIB;

ringblk_tests::per_combo!(loop_device);

fn loop_device(c: Combo) {
    if !root_or_skip("attaching a loop device") || !have("losetup") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("dev.img");
    let mut model = Rng::new(8).bytes(SIZE as usize);
    make_file(&backing, SIZE, Some(&model));
    // Detached on drop, also when an assertion fails; on_shard's runtime has
    // closed the device by then.
    let dev = LoopDev::attach(&backing);

    let d = dev.path().to_string();
    let model = on_shard(move || async move {
        let mut o = raw_opts(&d);
        o.set("file.driver", "host_device");
        let node = open(c, o).await.unwrap_or_else(|e| panic!("open {d} as host_device with {c:?}: {e:?}"));
        assert_eq!(node.size(), SIZE);
        assert_eq!(node.children()[0].node.driver(), "host_device");
        assert_bytes_eq(&read_all(&*node).await, &model, "device contents through the node");

        let mut rng = Rng::new(9);
        let mut cases = vec![(0, 4 * KIB), (SIZE - 64 * KIB, 64 * KIB), (3 * MIB, MIB + 128 * KIB), (100, 1000), (7 * MIB + 511, 2)];
        for _ in 0..8 {
            cases.push((rng.below(SIZE / 4096) * 4096, (rng.below(32) + 1) * 4096));
        }
        for (i, (off, len)) in cases.into_iter().enumerate() {
            let len = len.min(SIZE - off);
            let data = rng.bytes(len as usize);
            let flags = WriteFlags { fua: i % 2 == 0 };
            write_at(&*node, off, &data, flags).await.unwrap_or_else(|e| panic!("write {len} at {off}: {e:?}"));
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let back = read_at(&*node, off, len as usize).await.unwrap();
            assert_bytes_eq(&back, &data, &format!("read back {len} at {off}"));
        }

        for (off, len, may_unmap) in [(MIB, MIB, true), (5 * MIB, 64 * KIB, false), (9 * MIB + 512, 4096, false)] {
            let flags = ZeroFlags { may_unmap, ..Default::default() };
            node.write_zeroes(off, len, flags).await.unwrap_or_else(|e| panic!("write_zeroes {len} at {off} {flags:?}: {e:?}"));
            model[off as usize..(off + len) as usize].fill(0);
            let back = read_at(&*node, off, len as usize).await.unwrap();
            assert!(back.iter().all(|&b| b == 0), "{len} at {off} reads as zero after write_zeroes {flags:?}");
        }

        // Discard is a hint on devices; it must succeed, and leave other data alone.
        node.discard(12 * MIB, MIB).await.expect("discard on a loop device");
        let kept = read_at(&*node, 11 * MIB, MIB as usize).await.unwrap();
        assert_bytes_eq(&kept, &model[11 * MIB as usize..12 * MIB as usize], "data before the discarded range");
        let discarded = read_at(&*node, 12 * MIB, MIB as usize).await.unwrap();
        model[12 * MIB as usize..13 * MIB as usize].copy_from_slice(&discarded);

        let e = node.block_status(0, SIZE).await.expect("block status on a device");
        assert!(e.data && e.len > 0 && e.len <= SIZE, "{e:?}");

        node.flush().await.expect("flush");
        assert_bytes_eq(&read_all(&*node).await, &model, "device contents through the node");
        drop(node);

        // Without file.driver the protocol is probed: a block device is host_device.
        let node = open(c, raw_opts(&d)).await.expect("open with the protocol probed");
        assert_eq!(node.children()[0].node.driver(), "host_device");
        drop(node);

        let mut o = raw_opts(&d);
        o.set("file.driver", "file");
        let e = match open(c, o).await {
            Ok(_) => panic!("driver 'file' opened block device {d}"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&d) && msg.contains("host_device"), "error names the device and the right driver: {msg}");
        model
    });
    let dev_bytes = std_read(Path::new(dev.path()), 0, SIZE as usize);
    assert_bytes_eq(&dev_bytes, &model, "device contents by plain read");
    // The loop device wrote through to its file.
    assert_bytes_eq(&std::fs::read(&backing).unwrap(), &model, "backing file contents");
    drop(dev);
}
