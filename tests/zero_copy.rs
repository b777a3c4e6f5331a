//! The two page-cache shortcuts of the file protocol: `map_cached` hands out a
//! cached range as a private mapping instead of copying it (and only where
//! that is safe), and large buffered writes from any shard hop to the file's
//! home ring, landing intact whichever shard sent them.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use engine::block::{open_image, BlockNode, CacheMode, OpenCtx, OpenFlags, Perm, WriteFlags};
use engine::runtime::{IoBuf, Runtime, RuntimeConfig};
use ringblk_tests::*;

const MIB: u64 = 1 << 20;

fn open_with(path: &str, flags: OpenFlags, extra: &[(&str, &str)]) -> Arc<dyn BlockNode> {
    let mut o = raw_opts(path);
    for (k, v) in extra {
        o.set(k, *v);
    }
    let p = path.to_string();
    on_shard(move || async move {
        let ctx = OpenCtx::new(nbd::registry(), flags);
        open_image(&ctx, o).await.unwrap_or_else(|e| panic!("open {p}: {e:?}"))
    })
}

fn map(node: &Arc<dyn BlockNode>, off: u64, len: usize) -> Option<IoBuf> {
    let n = node.clone();
    on_shard(move || async move { n.map_cached(off, len) })
}

fn evict(path: &std::path::Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: advice on an fd we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

#[test]
fn map_cached_gives_cached_bytes_only_when_safe() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("src.img");
    let data = Rng::new(7).bytes(8 * MIB as usize);
    make_file(&path, 8 * MIB, Some(&data));
    let p = path_str(&path);
    // As convert opens sources: nobody else may write or resize the file.
    let ro = OpenFlags { write: false, shared: Perm::ALL.without(Perm::WRITE.union(Perm::RESIZE)), ..Default::default() };
    std_read(&path, 0, data.len()); // into the page cache

    let node = open_with(&p, ro.clone(), &[]);
    // Unaligned start, several pages: the bytes of the file.
    let off = MIB + 3 * 4096 + 100;
    let mut m = map(&node, off, 3 * MIB as usize).expect("a cached range of a read-only file maps");
    assert_bytes_eq(&m, &data[off as usize..(off + 3 * MIB) as usize], "mapped range");
    // The mapping is private: writing to the buffer leaves the file alone.
    m[0] ^= 0xff;
    drop(m);
    assert_eq!(std_read(&path, off, 1)[0], data[off as usize]);
    // Too small to be worth it, or past the end: read instead.
    assert!(map(&node, 0, 4096).is_none());
    assert!(map(&node, 7 * MIB, 2 * MIB as usize).is_none());
    // Not cached: mapping would block on the disk, so no.
    drop(node);
    evict(&path);
    let node = open_with(&p, ro.clone(), &[]);
    assert!(map(&node, 0, MIB as usize).is_none(), "an evicted range must not map");
    drop(node);
    std_read(&path, 0, data.len());

    // raw's offset option shifts the mapping like a read.
    let node = open_with(&p, ro.clone(), &[("offset", "65536")]);
    let m = map(&node, 0, MIB as usize).expect("maps through raw's offset");
    assert_bytes_eq(&m, &data[65536..65536 + MIB as usize], "mapped range with offset");
    drop(m);
    drop(node);

    // Where another writer may change the file under the mapping, or where
    // there is no page cache, never.
    let cases: [(&str, OpenFlags); 4] = [
        ("writable", OpenFlags { write: true, ..Default::default() }),
        ("sharing writes with others", OpenFlags { write: false, ..Default::default() }),
        ("force-share", OpenFlags { write: false, force_share: true, shared: ro.shared, ..Default::default() }),
        ("cache=none", OpenFlags { write: false, cache: "none".parse::<CacheMode>().unwrap(), shared: ro.shared, ..Default::default() }),
    ];
    for (what, flags) in cases {
        let node = open_with(&p, flags, &[]);
        assert!(map(&node, 0, MIB as usize).is_none(), "{what} open must not map");
    }
    let node = open_with(&p, ro, &[("file.locking", "off")]);
    assert!(map(&node, 0, MIB as usize).is_none(), "locking=off must not map");
}

/// 1 MiB writes from both shards at once, to a file opened on shard 0: every
/// byte lands where it was sent.
#[test]
fn large_writes_from_every_shard_land() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dst.img");
    make_file(&path, 64 * MIB, None);
    let p = path_str(&path);
    let rt = Runtime::new(RuntimeConfig { shards: 2, ..Default::default() }).unwrap();
    let node = rt.block_on(move || async move { open_raw(IO_URING_WRITEBACK, &p).await });
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let n = node.clone();
            rt.spawn_on(t as usize % 2, move || async move {
                for i in 0..8u64 {
                    let chunk = t * 8 + i;
                    let fill = vec![(chunk % 251) as u8 + 1; MIB as usize];
                    write_at(&*n, chunk * MIB, &fill, WriteFlags::default()).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join();
    }
    drop(rt);
    drop(node);
    for chunk in 0..64u64 {
        let got = std_read(&path, chunk * MIB, MIB as usize);
        assert!(got.iter().all(|&b| b == (chunk % 251) as u8 + 1), "chunk {chunk} holds the wrong bytes");
    }
}

/// A node whose opening runtime is gone still writes: the hop falls back to
/// the current ring instead of posting to a stopped shard.
#[test]
fn large_writes_outlive_the_home_shard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dst.img");
    make_file(&path, 4 * MIB, None);
    let p = path_str(&path);
    let node = on_shard(move || async move { open_raw(IO_URING_WRITEBACK, &p).await });
    let n = node.clone();
    on_shard(move || async move {
        write_at(&*n, MIB, &vec![0x5a; 2 * MIB as usize], WriteFlags::default()).await.unwrap();
    });
    drop(node);
    assert!(std_read(&path, MIB, 2 * MIB as usize).iter().all(|&b| b == 0x5a));
    assert!(std_read(&path, 0, MIB as usize).iter().all(|&b| b == 0));
}

/// `x-reserve-ahead`: a file grown by writes past its end has blocks
/// reserved beyond EOF while open (its size unchanged), and gives them back
/// on close; what was written reads back.
#[test]
fn reserve_ahead_reserves_past_eof_and_gives_back() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.img");
    make_file(&path, 0, None);
    let p = path_str(&path);
    let path2 = path.clone();
    let (size_open, blocks_open) = on_shard(move || async move {
        // The protocol node itself: formats that append (qcow2) write past EOF.
        let mut o = engine::options::OptionTree::new();
        o.set("driver", "file");
        o.set("filename", p.as_str());
        o.set("x-reserve-ahead", "16M");
        let ctx = OpenCtx::new(nbd::registry(), OpenFlags { write: true, ..Default::default() });
        let node = ctx.open_protocol(o).await.unwrap();
        for i in 0..4u64 {
            write_at(&*node, i * MIB, &vec![i as u8 + 1; MIB as usize], WriteFlags::default()).await.unwrap();
        }
        let m = std::fs::metadata(&path2).unwrap();
        let r = (m.len(), m.blocks() * 512);
        node.close().await.unwrap();
        r
    });
    assert_eq!(size_open, 4 * MIB, "reserving must not change the size");
    assert!(blocks_open >= 16 * MIB, "blocks reserved past EOF while open: {blocks_open}");
    let m = std::fs::metadata(&path).unwrap();
    assert_eq!(m.len(), 4 * MIB);
    assert!(m.blocks() * 512 <= 4 * MIB + MIB, "reserved blocks given back on close: {}", m.blocks() * 512);
    for i in 0..4u64 {
        assert!(std_read(&path, i * MIB, MIB as usize).iter().all(|&b| b == i as u8 + 1));
    }
}

/// Bytes this thread has passed to write system calls (`wchar`).
fn thread_wchar() -> u64 {
    let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).unwrap().trim().parse().unwrap()
}

/// `x-inline-writes`: a small write into cached pages of a buffered file runs
/// as a pwrite on the shard's own thread (whose write count grows by it),
/// not in an io_uring worker; with the option off, or into pages that are
/// not in the page cache, it does not. The bytes land every way.
#[test]
fn small_cached_writes_run_inline_on_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inline.img");
    make_file(&path, 4 * MIB, Some(&vec![1u8; 4 * MIB as usize]));
    let p = path_str(&path);
    let flags = OpenFlags { write: true, aio: engine::aio::Backend::IoUring, ..Default::default() };
    for (i, (opt, evicted, inline)) in [("on", false, true), ("off", false, false), ("on", true, false)].into_iter().enumerate() {
        if evicted {
            // Dirty pages stay cached: write them back first.
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
            evict(&path);
        } else {
            std_read(&path, 0, 4 * MIB as usize);
        }
        let node = open_with(&p, flags.clone(), &[("file.x-inline-writes", opt)]);
        let n = node.clone();
        let off = (i as u64 + 1) * 65536;
        let on_thread = on_shard(move || async move {
            let before = thread_wchar();
            write_at(&*n, off, &[i as u8 + 7; 4096], WriteFlags::default()).await.unwrap();
            thread_wchar() - before
        });
        assert_eq!(on_thread >= 4096, inline, "x-inline-writes={opt} evicted={evicted}: {on_thread} bytes written on the shard");
        on_shard(move || async move { node.close().await.unwrap() });
        assert!(std_read(&path, off, 4096).iter().all(|&b| b == i as u8 + 7));
    }
}
