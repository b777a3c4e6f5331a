//! The `preallocate` filter: images written through it are QEMU's to read,
//! it changes no byte and no block status against the plain file under any
//! mix of requests, and a file left long by a killed writer is cut back at
//! the next open.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::block::{open_image, BlockNode, OpenCtx, OpenFlags, Prealloc, WriteFlags, ZeroFlags};
use engine::options::OptionTree;
use ringblk_tests::{bin, have, on_shard, path_str, qemu_check, read_all, run, write_at, write_patchy_disk, Rng};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn filtered_qcow2(img: &Path, extra: &str) -> String {
    format!("driver=qcow2,file.driver=preallocate,{extra}file.file.driver=file,file.file.filename={}", path_str(img))
}

#[test]
fn qcow2_written_through_the_filter_is_accepted_by_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let src = d.path().join("src.raw");
    let img = d.path().join("img.qcow2");
    write_patchy_disk(&src, 5, 3);
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("64M"));
    // Small steps, so that a convert crosses many of them.
    let opts = filtered_qcow2(&img, "file.prealloc-size=4M,file.prealloc-align=256K,");
    run(Command::new(bin("ringblk")).args(["convert", "-n", "-f", "raw", "--target-image-opts"]).arg(&src).arg(&opts));

    let (code, report) = qemu_check(&img, false);
    assert_eq!(code, 0, "qemu-img check: {report}");
    assert_eq!(report["leaks"].as_u64().unwrap_or(0), 0, "{report}");
    assert_eq!(report["corruptions"].as_u64().unwrap_or(0), 0, "{report}");
    // Cut back at close to where the data ends: no preallocated tail.
    let end = report["image-end-offset"].as_u64().expect("image-end-offset");
    assert_eq!(file_len(&img), end, "file length vs qemu-img's image end: {report}");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&img));

    // And through ringblk-nbd, written by nbdcopy, it is the same.
    if !have("nbdcopy") {
        return;
    }
    let img2 = d.path().join("img2.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img2).arg("64M"));
    let sock = d.path().join("s.sock");
    let via = ringblk_tests::nbdproc::Via::Unix(sock.clone());
    let srv = ringblk_tests::nbdproc::NbdServer::ringblk(
        via,
        &["-t", "--image-opts", &filtered_qcow2(&img2, "file.prealloc-size=8M,")],
    );
    run(Command::new("nbdcopy").arg(&src).arg(srv.uri("")));
    // While serving, the file runs ahead of the data.
    let (_, during) = qemu_check(&img2, true);
    let during_end = during["image-end-offset"].as_u64().unwrap();
    assert!(file_len(&img2) > during_end, "no preallocation while serving: {} vs {during_end}", file_len(&img2));
    srv.finish();
    let (code, report) = qemu_check(&img2, false);
    assert_eq!(code, 0, "{report}");
    assert_eq!(file_len(&img2), report["image-end-offset"].as_u64().unwrap(), "{report}");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(&src).arg(&img2));
}

async fn open(opts: OptionTree) -> Arc<dyn BlockNode> {
    let ctx = OpenCtx::new(nbd::registry(), OpenFlags { write: true, ..Default::default() });
    open_image(&ctx, opts).await.unwrap_or_else(|e| panic!("open: {e}"))
}

/// Status of every 4 KiB block of `node`: (reads as zero, has data).
async fn status_map(node: &dyn BlockNode) -> Vec<(bool, bool)> {
    let size = node.size();
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let e = node.block_status(off, size - off).await.unwrap();
        assert!(e.len > 0);
        let end = (off + e.len).min(size);
        // Block granularity: a block is "zero" only if all of it says so.
        while off < end {
            let b = (off / 4096) as usize;
            if out.len() <= b {
                out.push((true, false));
            }
            out[b].0 &= e.zero;
            out[b].1 |= e.data;
            off = end.min((off / 4096 + 1) * 4096);
        }
    }
    out
}

#[test]
fn the_filter_changes_no_byte_and_no_block_status() {
    for (seed, mode) in [(77, "auto"), (5, "auto"), (9, "auto"), (11, "sparse"), (12, "zeroes")] {
        filter_against_plain_file(seed, mode);
    }
}

/// 400 random requests (writes in and past the end, zeroes, discards,
/// truncates, flushes) on the filter (extending the file as `mode` says)
/// over one file and on a plain second file, compared every 50.
fn filter_against_plain_file(seed: u64, mode: &'static str) {
    let d = tmp();
    let a = path_str(&d.path().join("a.img"));
    let b = path_str(&d.path().join("b.img"));
    let (a2, b2) = (a.clone(), b.clone());
    on_shard(move || async move {
        let mut oa = OptionTree::new();
        oa.set("driver", "preallocate");
        oa.set("prealloc-size", "1M");
        oa.set("prealloc-align", "64K");
        oa.set("prealloc-mode", mode);
        // Small, so that writeback is started behind the writer all along.
        oa.set("prealloc-write-behind", "64K");
        oa.set("file.driver", "file");
        oa.set("file.filename", a2.as_str());
        let mut ob = OptionTree::new();
        ob.set("driver", "file");
        ob.set("filename", b2.as_str());
        for p in [&a2, &b2] {
            std::fs::write(p, b"").unwrap();
        }
        let na = open(oa).await;
        let nb = open(ob).await;
        let mut rng = Rng::new(seed);
        for i in 0..400 {
            let size = nb.size();
            assert_eq!(na.size(), size, "sizes differ before op {i}");
            let off = rng.below(size + (3 << 20)) & !511;
            let len = (rng.below(256 << 10) + 1 + 511) & !511;
            match rng.below(10) {
                0..=4 => {
                    let data = rng.bytes(len as usize);
                    write_at(&*na, off, &data, WriteFlags::default()).await.unwrap();
                    write_at(&*nb, off, &data, WriteFlags::default()).await.unwrap();
                }
                5 | 6 => {
                    // Inside the file, as for the file driver.
                    if off < size {
                        let len = len.min(size - off);
                        let f = ZeroFlags { may_unmap: rng.below(2) == 0, ..Default::default() };
                        na.write_zeroes(off, len, f).await.unwrap();
                        nb.write_zeroes(off, len, f).await.unwrap();
                    }
                }
                7 => {
                    if off < size {
                        let len = len.min(size - off);
                        na.discard(off, len).await.unwrap();
                        nb.discard(off, len).await.unwrap();
                    }
                }
                8 => {
                    let to = rng.below(size + (2 << 20)) & !511;
                    na.truncate(to, false, Prealloc::Off).await.unwrap();
                    nb.truncate(to, false, Prealloc::Off).await.unwrap();
                }
                _ => {
                    na.flush().await.unwrap();
                    nb.flush().await.unwrap();
                }
            }
            if i % 50 == 49 {
                assert_eq!(na.size(), nb.size(), "sizes differ after op {i}");
                assert!(read_all(&*na).await == read_all(&*nb).await, "contents differ after op {i} ({mode})");
                let (sa, sb) = (status_map(&*na).await, status_map(&*nb).await);
                // Block status: where the plain file has a hole, so does the
                // filtered one (the preallocated parts are no less sparse),
                // and every block either calls zero reads as zeroes. (Where
                // the two filesystems' answers differ otherwise, it is ext4
                // calling unwritten blocks under a cached folio data.)
                let denser = sa.iter().zip(&sb).position(|(a, b)| b.0 && !a.0);
                assert!(
                    denser.is_none(),
                    "the filter ({mode}) reports data where the plain file has a hole, after op {i}: block {denser:?}"
                );
                let content = read_all(&*na).await;
                for map in [&sa, &sb] {
                    for (k, &(zero, _)) in map.iter().enumerate() {
                        let blk = &content[k * 4096..((k + 1) * 4096).min(content.len())];
                        assert!(
                            !zero || blk.iter().all(|&x| x == 0),
                            "block {k} said zero but is not, after op {i} ({mode})"
                        );
                    }
                }
            }
        }
        let size = nb.size();
        na.close().await.unwrap();
        nb.close().await.unwrap();
        size
    });
    // Closed: the filtered file is exactly as long as the plain one, and equal.
    assert_eq!(file_len(Path::new(&a)), file_len(Path::new(&b)));
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "files differ after close ({mode})");
}

/// Pages of `path` in [0, len): (in the page cache, dirty), from cachestat(2).
fn cache_state(path: &str, len: u64) -> (u64, u64) {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let f = std::fs::File::open(path).unwrap();
    let range = Range { off: 0, len };
    let mut st = Stat::default();
    // SAFETY: cachestat (451) reads `range` and writes `st`, both live.
    let r = unsafe {
        libc::syscall(451, std::os::fd::AsRawFd::as_raw_fd(&f), &range as *const Range, &mut st as *mut Stat, 0)
    };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    (st.cache, st.dirty)
}

/// Through the page cache, the data grown by `prealloc-write-behind` is
/// sent to the disk while the writer goes on: after 64 MiB of 1 MiB writes,
/// none of what lies a step behind the end is still dirty, while without
/// write-behind (and under O_DIRECT, which has no page cache to write) it
/// all is (or nothing happens).
#[test]
fn write_behind_starts_writeback_of_the_grown_data() {
    let d = tmp();
    for (name, behind, direct) in [("wb.img", "8M", false), ("off.img", "0", false), ("direct.img", "8M", true)] {
        let p = path_str(&d.path().join(name));
        std::fs::write(&p, b"").unwrap();
        let p2 = p.clone();
        let (reported, written_behind) = on_shard(move || async move {
            let mut o = OptionTree::new();
            o.set("driver", "preallocate");
            o.set("prealloc-write-behind", behind);
            o.set("file.driver", "file");
            o.set("file.filename", p2.as_str());
            o.set("file.cache.direct", if direct { "on" } else { "off" });
            let n = open(o).await;
            let mut rng = Rng::new(3);
            let chunk = rng.bytes(1 << 20);
            for i in 0..64u64 {
                write_at(&*n, i << 20, &chunk, WriteFlags::default()).await.unwrap();
            }
            // The write-behind runs on a helper thread: wait for it.
            let t0 = Instant::now();
            let status = || n.format_specific().unwrap()["data"].clone();
            let waits = behind != "0" && !direct;
            while waits
                && status()["written-behind"].as_u64().unwrap() < 56 << 20
                && t0.elapsed() < Duration::from_secs(10)
            {
                engine::runtime::sleep(Duration::from_millis(10)).await;
            }
            let s = status();
            let (cache, dirty) = cache_state(&p2, 56 << 20);
            if !direct {
                assert!(cache > 0, "{name}: nothing of the buffered writes in the page cache");
            }
            match (behind, direct) {
                ("8M", false) => assert_eq!(dirty, 0, "{name}: {dirty} pages still dirty behind the writer ({s})"),
                _ => assert_eq!(s["written-behind"], 0, "{name}: wrote behind with {behind}, direct {direct}"),
            }
            if behind == "0" {
                assert!(
                    dirty > 56 * 256 / 2,
                    "{name}: only {dirty} pages dirty without write-behind: the control is void"
                );
            }
            let r = (s["prealloc-write-behind"].as_u64().unwrap(), s["written-behind"].as_u64().unwrap());
            n.close().await.unwrap();
            r
        });
        match (behind, direct) {
            ("8M", false) => assert_eq!((reported, written_behind), (8 << 20, 56 << 20), "{name}"),
            _ => assert_eq!((reported, written_behind), (0, 0), "{name}"),
        }
        let back = std::fs::read(&p).unwrap();
        assert_eq!(back.len(), 64 << 20, "{name}: trimmed to the data at close");
        let chunk = Rng::new(3).bytes(1 << 20);
        assert!(back.chunks(1 << 20).all(|c| c == chunk.as_slice()), "{name}: contents differ");
    }
}

#[test]
fn a_file_left_long_by_a_killed_writer_is_cut_back_at_the_next_open() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let img = d.path().join("k.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&img).arg("2G"));
    let opts = filtered_qcow2(&img, "file.prealloc-size=64M,");
    // A sequential writer through the filter, killed once the file has run
    // well ahead of its data.
    let mut writer = Command::new(bin("ringblk"))
        .args(["bench", "-w", "--pattern", "seq", "-s", "64k", "-c", "32768", "-t", "none", "--image-opts", &opts])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while file_len(&img) < 96 << 20 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the writer never grew the file");
        assert!(writer.try_wait().unwrap().is_none(), "the writer ended before it was killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    writer.kill().unwrap();
    writer.wait().unwrap();
    let long = file_len(&img);
    // The dead writer's io_uring lets go of the file (and its lock) a moment
    // after the process is gone.
    let t0 = Instant::now();
    let before = loop {
        let (code, v) = qemu_check(&img, false);
        if code != 1 || t0.elapsed() > Duration::from_secs(20) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(before["corruptions"].as_u64().unwrap_or(0), 0, "{before}");
    // What was written lies well short of the file's end: the tail is the
    // preallocated, never written, part.
    let data = std::fs::read(&img).unwrap();
    let last = data.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
    assert!(long >= last + (16 << 20), "nothing preallocated at the kill: file {long}, data to {last}");

    // The next open through the filter cuts the tail; check repairs what a
    // kill leaves (leaked clusters at most), and the file ends with the data.
    let out = Command::new(bin("ringblk")).args(["check", "-r", "leaks", "--image-opts", &opts]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("left preallocated"), "no word of the trim: {err}");
    let (code, after) = qemu_check(&img, false);
    assert_eq!(code, 0, "qemu-img check after the repair: {after}\n{err}");
    // Cut where the written bytes end (to the sector), not before.
    let len = file_len(&img);
    assert_eq!(len, last.next_multiple_of(512).max(after["image-end-offset"].as_u64().unwrap()), "{err}");
}
