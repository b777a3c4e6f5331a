//! A full filesystem surfaces as ErrorKind::NoSpace naming the file, on every
//! backend and cache mode, for writes and for write_zeroes that must allocate;
//! never a panic or a silent short write. Uses a real loop-mounted ext4 (root).

use engine::block::{WriteFlags, ZeroFlags};
use engine::ErrorKind;
use ringblk_tests::*;

const MIB: u64 = 1 << 20;

ringblk_tests::per_combo!(fill_until_no_space);

fn fill_until_no_space(c: Combo) {
    if !root_or_skip("mounting a loop ext4 filesystem") || !have("mkfs.ext4") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Unmounted on drop, also when an assertion fails; on_shard's runtime (and
    // with it every file we open there) is gone before this guard drops.
    let fs = FsMount::ext4(tmp.path(), 16 * MIB);
    let path = fs.dir().join("fill.img");
    // Larger than the filesystem, sparse: the node's size is not what stops us.
    make_file(&path, 64 * MIB, None);
    let zpath = fs.dir().join("zero.img");
    make_file(&zpath, 64 * MIB, None);

    let (p, zp) = (path_str(&path), path_str(&zpath));
    let written = on_shard(move || async move {
        let node = open_raw(c, &p).await;
        let chunk = Rng::new(7).bytes(MIB as usize);
        let mut off = 0;
        let err = loop {
            assert!(off < node.size(), "wrote {off} bytes to a 16 MiB filesystem without an error");
            match write_at(&*node, off, &chunk, WriteFlags::default()).await {
                Ok(()) => off += MIB,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), ErrorKind::NoSpace, "{err:?}");
        assert_eq!(err.file(), Some(p.as_str()), "{err:?}");
        assert!(err.to_string().contains(&p), "message names the file: {err}");
        assert_eq!(err.to_errno(), libc::ENOSPC, "{err:?}");

        // Zeroing that must allocate fails the same way, on another file.
        let z = open_raw(c, &zp).await;
        let flags = ZeroFlags { may_unmap: false, ..Default::default() };
        let e = z.write_zeroes(0, 32 * MIB, flags).await.expect_err("allocating 32 MiB of zeroes on a full 16 MiB fs");
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{e:?}");
        assert!(e.to_string().contains(&zp), "message names the file: {e}");

        // The node stays usable: what fit reads back.
        let b = read_at(&*node, 0, MIB as usize).await.expect("read after ENOSPC");
        assert_bytes_eq(&b, &chunk, "first MiB after ENOSPC");
        off
    });
    assert!(written >= MIB, "the filesystem took at least one MiB before filling up ({written})");
    drop(fs);
}
