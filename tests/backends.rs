//! The file protocol under raw, on every I/O backend and cache mode: data round
//! trips checked against plain reads of the file, zeroing and discard, block
//! status over sparse files, short reads when the file shrinks underneath, and
//! misaligned O_DIRECT requests including concurrent read-modify-writes. Full
//! filesystems and block devices have their own files (`nospace.rs`,
//! `host_device.rs`).

use std::cell::RefCell;
use std::rc::Rc;

use engine::block::{WriteFlags, ZeroFlags};
use engine::runtime::spawn_local;
use engine::ErrorKind;
use ringblk_tests::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

ringblk_tests::per_combo!(round_trip, zeroes_and_discard, sparse_status, short_reads_at_eof, misaligned);

/// Aligned writes of random data at assorted offsets and lengths (below and above
/// the registered pool's 128 KiB buffers, so both fixed and plain buffers go
/// through), some with FUA, read back through the node and by plain reads.
fn round_trip(c: Combo) {
    const SIZE: u64 = 8 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.img");
    let mut rng = Rng::new(1);
    let mut model = vec![0u8; SIZE as usize];
    // Data written before the open must read back through the node too.
    let pre = rng.bytes(MIB as usize);
    make_file(&path, SIZE, None);
    std_write(&path, 4 * MIB, &pre);
    model[4 * MIB as usize..5 * MIB as usize].copy_from_slice(&pre);

    let p = path_str(&path);
    let model = on_shard(move || async move {
        let node = open_raw(c, &p).await;
        assert_eq!(node.size(), SIZE);
        assert_bytes_eq(&read_all(&*node).await, &model, "pre-written file read through the node");

        let mut cases: Vec<(u64, u64)> = vec![
            (0, 4 * KIB),
            (SIZE - 4 * KIB, 4 * KIB),
            (12 * KIB, 128 * KIB),
            (MIB, 128 * KIB + 4 * KIB),
            (2 * MIB - 8 * KIB, MIB + 64 * KIB),
            (4 * MIB + 512 * KIB, 8 * KIB),
            (6 * MIB, 2 * MIB),
        ];
        for _ in 0..24 {
            let off = rng.below(SIZE / (4 * KIB)) * 4 * KIB;
            let len = ((rng.below(64) + 1) * 4 * KIB).min(SIZE - off);
            cases.push((off, len));
        }
        for (i, &(off, len)) in cases.iter().enumerate() {
            let data = rng.bytes(len as usize);
            let flags = WriteFlags { fua: i % 3 == 0 };
            if let Err(e) = write_at(&*node, off, &data, flags).await {
                panic!("write {len} at {off} ({flags:?}): {e:?}");
            }
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let back = read_at(&*node, off, len as usize).await.unwrap_or_else(|e| panic!("read {len} at {off}: {e:?}"));
            assert_bytes_eq(&back, &data, &format!("read back {len} bytes at {off}"));
        }
        node.flush().await.expect("flush");
        assert_bytes_eq(&read_all(&*node).await, &model, "whole image through the node");
        model
    });
    assert_bytes_eq(&std::fs::read(&path).unwrap(), &model, "file contents by plain read");
}

/// write_zeroes with and without may_unmap, aligned and not; punched ranges and
/// discarded ranges report as zero, not data; neighbours keep their data.
fn zeroes_and_discard(c: Combo) {
    const SIZE: u64 = 8 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.img");
    let mut model = Rng::new(2).bytes(SIZE as usize);
    make_file(&path, SIZE, Some(&model));

    let p = path_str(&path);
    let model = on_shard(move || async move {
        let node = open_raw(c, &p).await;
        // The file is fully written: one data extent.
        assert_eq!(walk(&*node, 0, SIZE, SIZE).await, vec![Span { start: 0, len: SIZE, data: true, zero: false }]);

        let cases = [
            (MIB, MIB, true),
            (3 * MIB + 4 * KIB, 64 * KIB, false),
            (5 * MIB + 100, 5000, true),
            (5 * MIB + 64 * KIB + 7, 1000, false),
            (SIZE - 12 * KIB, 12 * KIB, false),
        ];
        for (off, len, may_unmap) in cases {
            let flags = ZeroFlags { may_unmap, ..Default::default() };
            node.write_zeroes(off, len, flags).await.unwrap_or_else(|e| panic!("write_zeroes {len} at {off} {flags:?}: {e:?}"));
            model[off as usize..(off + len) as usize].fill(0);
            let back = read_at(&*node, off, len as usize).await.unwrap();
            assert!(back.iter().all(|&b| b == 0), "{len} bytes at {off} read as zero after write_zeroes {flags:?}");
        }
        // A punched, aligned MiB is a hole: known zero, not data, all of it.
        let e = node.block_status(MIB, MIB).await.expect("block status");
        assert!(e.zero && !e.data && e.len == MIB, "1 MiB zeroed with may_unmap: {e:?}");
        // ...and the data around it is still data, ending exactly at the hole.
        let e = node.block_status(MIB - 4 * KIB, MIB).await.expect("block status");
        assert!(e.data && !e.zero && e.len == 4 * KIB, "data before the hole: {e:?}");
        let e = node.block_status(2 * MIB, 4 * KIB).await.expect("block status");
        assert!(e.data && !e.zero, "data after the hole: {e:?}");

        node.discard(6 * MIB, MIB).await.expect("discard");
        let e = node.block_status(6 * MIB, MIB).await.expect("block status");
        assert!(e.zero && !e.data && e.len == MIB, "discarded MiB of a regular file: {e:?}");
        // Discard punches holes in files, so the range reads as zero.
        model[6 * MIB as usize..7 * MIB as usize].fill(0);

        node.flush().await.expect("flush");
        assert_bytes_eq(&read_all(&*node).await, &model, "whole image through the node");
        model
    });
    assert_bytes_eq(&std::fs::read(&path).unwrap(), &model, "file contents by plain read");
}

/// Block status over a sparse file made by set_len and a few writes: the walk
/// tiles the file exactly, data where written and zero holes elsewhere, whatever
/// the step asked for; the same for a file whose size is not a sector multiple.
fn sparse_status(c: Combo) {
    const SIZE: u64 = 8 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse.img");
    let written = [(0, 4 * KIB), (MIB, 64 * KIB), (3 * MIB + 8 * KIB, 4 * KIB), (SIZE - 4 * KIB, 4 * KIB)];
    let mut rng = Rng::new(3);
    let mut model = vec![0u8; SIZE as usize];
    make_file(&path, SIZE, None);
    for &(off, len) in &written {
        let d = rng.bytes(len as usize);
        std_write(&path, off, &d);
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    let mut expect = Vec::new();
    let mut at = 0;
    for &(off, len) in &written {
        if off > at {
            expect.push(Span { start: at, len: off - at, data: false, zero: true });
        }
        expect.push(Span { start: off, len, data: true, zero: false });
        at = off + len;
    }
    assert_eq!(at, SIZE, "the last write ends the file");

    // 1 MiB + 100 bytes: data at the start and in the partial last block.
    let odd = dir.path().join("odd.img");
    let odd_size = MIB + 100;
    make_file(&odd, odd_size, None);
    let head = rng.bytes(4096);
    let tail = rng.bytes(100);
    std_write(&odd, 0, &head);
    std_write(&odd, MIB, &tail);

    let (p, q) = (path_str(&path), path_str(&odd));
    on_shard(move || async move {
        let node = open_raw(c, &p).await;
        for step in [SIZE, 64 * KIB, 4 * KIB + 512] {
            assert_eq!(walk(&*node, 0, SIZE, step).await, expect, "extents of the sparse file, step {step}");
        }
        // Starting mid-extent reports from there.
        let e = node.block_status(MIB + 4 * KIB, SIZE).await.unwrap();
        assert!(e.data && e.len == 60 * KIB, "inside the 64 KiB data run: {e:?}");
        let e = node.block_status(2 * MIB, SIZE).await.unwrap();
        assert!(e.zero && !e.data && e.len == MIB + 8 * KIB, "inside the second hole: {e:?}");
        // Status beyond the end is an error, not an empty extent.
        assert!(node.block_status(SIZE, 4096).await.is_err(), "block status at the end");
        // What status says is what reads return.
        for s in &expect {
            let b = read_at(&*node, s.start, s.len as usize).await.unwrap();
            assert_bytes_eq(&b, &model[s.start as usize..(s.start + s.len) as usize], &format!("{s:?}"));
        }
        drop(node);

        let node = open_raw(c, &q).await;
        // Sizes are whole sectors; the tail past EOF reads as zero.
        assert_eq!(node.size(), MIB + 512);
        let spans = walk(&*node, 0, node.size(), node.size()).await;
        assert_eq!(spans[0], Span { start: 0, len: 4096, data: true, zero: false }, "{spans:?}");
        assert_eq!(spans[1], Span { start: 4096, len: MIB - 4096, data: false, zero: true }, "{spans:?}");
        assert!(spans[2].start == MIB && spans[2].data, "partial last block is data: {spans:?}");
        if c.direct() {
            // Like QEMU, extents come in whole units of the request alignment.
            let a = u64::from(node.limits().request_alignment);
            for s in &spans {
                assert!(s.start % a == 0 && s.len % a == 0, "extent {s:?} not aligned to {a}: {spans:?}");
            }
        }
        let b = read_at(&*node, MIB, 512).await.unwrap();
        assert_bytes_eq(&b[..100], &tail, "partial last block");
        assert!(b[100..].iter().all(|&x| x == 0), "bytes past EOF read as zero");
    });
}

/// The file shrinks underneath the open node: reads of the old range return the
/// remaining data and zeroes past the new EOF, without error; requests beyond
/// the node's size fail with OutOfBounds naming the file.
fn short_reads_at_eof(c: Combo) {
    const SIZE: u64 = MIB;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shrink.img");
    let model = Rng::new(4).bytes(SIZE as usize);
    make_file(&path, SIZE, Some(&model));
    // Not a sector multiple: O_DIRECT reads end short inside a sector.
    let new_len = 512 * KIB + 100;

    let p = path_str(&path);
    let path2 = path.clone();
    on_shard(move || async move {
        let node = open_raw(c, &p).await;
        assert_eq!(node.size(), SIZE);
        let _ = read_at(&*node, 0, 4096).await.unwrap(); // the file works before
        std::fs::OpenOptions::new().write(true).open(&path2).unwrap().set_len(new_len).unwrap();
        let n = new_len as usize;

        for (off, len) in [(256 * KIB, 512 * KIB), (512 * KIB, 4 * KIB), (768 * KIB, 4 * KIB), (SIZE - 128 * KIB, 128 * KIB)] {
            let b = read_at(&*node, off, len as usize).await.unwrap_or_else(|e| panic!("read {len} at {off} after shrink: {e:?}"));
            let (o, l) = (off as usize, len as usize);
            let keep = n.saturating_sub(o).min(l);
            assert_bytes_eq(&b[..keep], &model[o..o + keep], &format!("data before the new EOF in {len} at {off}"));
            assert!(b[keep..].iter().all(|&x| x == 0), "{len} at {off}: bytes past the new EOF read as zero");
        }
        // Misaligned too (bounced under O_DIRECT).
        let b = read_at(&*node, 512 * KIB + 50, 1000).await.expect("misaligned read across the new EOF");
        assert_bytes_eq(&b[..50], &model[n - 50..n], "misaligned read before the new EOF");
        assert!(b[50..].iter().all(|&x| x == 0), "misaligned read past the new EOF");

        // The node's size is what it was at open; beyond it is out of bounds.
        let size = node.size();
        for (off, len) in [(size, 4096), (size - 4096, 8192), (size + MIB, 512)] {
            let e = read_at(&*node, off, len).await.expect_err("read beyond the node's size");
            assert_eq!(e.kind(), ErrorKind::OutOfBounds, "read {len} at {off}: {e:?}");
            assert_eq!(e.file(), Some(p.as_str()), "error names the file: {e}");
            let e = write_at(&*node, off, &vec![1u8; len], WriteFlags::default()).await.expect_err("write beyond the size");
            assert_eq!(e.kind(), ErrorKind::OutOfBounds, "write {len} at {off}: {e:?}");
            let e = node.write_zeroes(off, len as u64, ZeroFlags::default()).await.expect_err("zeroes beyond the size");
            assert_eq!(e.kind(), ErrorKind::OutOfBounds, "write_zeroes {len} at {off}: {e:?}");
        }
        let e = read_at(&*node, u64::MAX - 10, 4096).await.expect_err("offset overflow");
        assert_eq!(e.kind(), ErrorKind::OutOfBounds, "{e:?}");
    });
}

/// Requests that are not multiples of the O_DIRECT alignment (bounced reads,
/// read-modify-write writes), checked by plain reads; then many tasks writing
/// misaligned pieces of the same blocks at once, where every piece must survive,
/// and (under O_DIRECT) overlapping misaligned writes, whose result must be the
/// writes applied in the order they completed.
fn misaligned(c: Combo) {
    const SIZE: u64 = MIB;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mis.img");
    let mut model = Rng::new(5).bytes(SIZE as usize);
    make_file(&path, SIZE, Some(&model));

    let p = path_str(&path);
    let model = on_shard(move || async move {
        let node = open_raw(c, &p).await;
        let align = node.limits().request_alignment;
        if c.direct() {
            assert!(align >= 512, "O_DIRECT reports its alignment, got {align}");
        }
        let mut rng = Rng::new(6);
        let cases = [
            (100, 1000, false),
            (4 * KIB, 3000, false),
            (2 * 8 * KIB + 7, 10_000, true),
            (511, 2, false),
            (SIZE - 1000, 1000, true),
            (64 * KIB - 1, 128 * KIB + 2, false),
        ];
        for (off, len, fua) in cases {
            let data = rng.bytes(len as usize);
            write_at(&*node, off, &data, WriteFlags { fua }).await.unwrap_or_else(|e| panic!("write {len} at {off}: {e:?}"));
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            let back = read_at(&*node, off, len as usize).await.unwrap_or_else(|e| panic!("read {len} at {off}: {e:?}"));
            assert_bytes_eq(&back, &data, &format!("read back {len} at {off}"));
            // A misaligned read around it sees the neighbours too.
            let (o, l) = (off.saturating_sub(33), (len + 66).min(SIZE - off.saturating_sub(33)));
            let back = read_at(&*node, o, l as usize).await.unwrap();
            assert_bytes_eq(&back, &model[o as usize..(o + l) as usize], &format!("read {l} at {o}"));
        }

        // Many tasks, non-overlapping misaligned pieces sharing sectors and blocks.
        let node2 = node.clone();
        let base = 256 * KIB + 37;
        let mut tasks = Vec::new();
        for i in 0..100u64 {
            let off = base + i * 83;
            let data = rng.bytes(83);
            model[off as usize..off as usize + 83].copy_from_slice(&data);
            let n = node2.clone();
            tasks.push(spawn_local(async move { write_at(&*n, off, &data, WriteFlags::default()).await.map_err(|e| (off, e)) }));
        }
        for t in tasks {
            if let Err((off, e)) = t.await {
                panic!("concurrent write at {off}: {e:?}");
            }
        }
        let back = read_at(&*node, 256 * KIB, 16 * KIB as usize).await.unwrap();
        assert_bytes_eq(&back, &model[256 * KIB as usize..272 * KIB as usize], "concurrent non-overlapping pieces");

        if c.direct() {
            // Overlapping misaligned writes: each is a read-modify-write of its
            // aligned cover, held off while an overlapping one runs, so the
            // order they finish in is the order they were applied in.
            let order = Rc::new(RefCell::new(Vec::new()));
            let base = 512 * KIB;
            let mut writes = Vec::new();
            let mut tasks = Vec::new();
            for i in 0..32 {
                let off = (base + rng.below(8 * KIB)) | 1; // odd: never aligned
                let len = rng.below(3000) + 1;
                let data = rng.bytes(len as usize);
                writes.push((off, data.clone()));
                let (n, order) = (node.clone(), order.clone());
                tasks.push(spawn_local(async move {
                    let r = write_at(&*n, off, &data, WriteFlags::default()).await;
                    order.borrow_mut().push(i);
                    r
                }));
            }
            for t in tasks {
                t.await.expect("overlapping misaligned write");
            }
            for &i in order.borrow().iter() {
                let (off, data) = &writes[i];
                model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            let back = read_at(&*node, base, 12 * KIB as usize).await.unwrap();
            assert_bytes_eq(&back, &model[base as usize..(base + 12 * KIB) as usize], "overlapping writes in completion order");
        }
        node.flush().await.expect("flush");
        model
    });
    assert_bytes_eq(&std::fs::read(&path).unwrap(), &model, "file contents by plain read");
}

/// A misaligned O_DIRECT write read-modify-writes its aligned cover. An aligned
/// write or a write_zeroes already in flight over that cover is not waited for,
/// so the RMW can read the old bytes and write them back after the other request
/// landed, undoing it outside the misaligned range: an outcome no order of the two
/// requests explains. Each sub-case runs many times and counts such outcomes.
fn rmw_vs_in_flight(c: Combo) {
    const ROUNDS: u32 = 100;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.img");
    make_file(&path, 2 * MIB, None);

    let p = path_str(&path);
    let (lost_writes, lost_zeroes) = on_shard(move || async move {
        let node = open_raw(c, &p).await;
        let mut lost = [0u32; 2];
        for (case, lost) in lost.iter_mut().enumerate() {
            for round in 0..ROUNDS {
                let fill = (round % 100) as u8 + 2;
                let old = fill + 100;
                write_at(&*node, 0, &vec![old; MIB as usize], WriteFlags::default()).await.unwrap();
                let (n1, n2) = (node.clone(), node.clone());
                let first = spawn_local(async move {
                    if case == 0 {
                        write_at(&*n1, 0, &vec![fill; MIB as usize], WriteFlags::default()).await
                    } else {
                        n1.write_zeroes(0, MIB, ZeroFlags::default()).await
                    }
                });
                let rmw = spawn_local(async move { write_at(&*n2, 100, &[0xff; 1000], WriteFlags::default()).await });
                first.await.expect("first request");
                rmw.await.expect("misaligned write");
                let want = if case == 0 { fill } else { 0 };
                let got = read_at(&*node, 0, 4096).await.unwrap();
                if got[..100].iter().chain(&got[1100..]).any(|&b| b != want) {
                    *lost += 1;
                }
            }
        }
        (lost[0], lost[1])
    });
    assert_eq!(
        (lost_writes, lost_zeroes),
        (0, 0),
        "rounds (of {ROUNDS}) where a concurrent misaligned write undid an in-flight aligned write / write_zeroes"
    );
}

// A read-modify-write must wait for every overlapping write, zeroing and
// discard in flight, and they for it (engine::block::RangeTracker).
mod rmw_races {
    use ringblk_tests::*;

    #[test]
    fn threads_none() {
        super::rmw_vs_in_flight(THREADS_NONE);
    }

    #[test]
    fn native_none() {
        super::rmw_vs_in_flight(NATIVE_NONE);
    }

    #[test]
    fn io_uring_none() {
        super::rmw_vs_in_flight(IO_URING_NONE);
    }
}
