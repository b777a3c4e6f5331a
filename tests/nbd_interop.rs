//! `ringblk-nbd` against real NBD clients (qemu-img, nbdinfo, nbdcopy,
//! nbdsh) over unix sockets and TCP, with qemu-nbd as the oracle for what a
//! client must see; and `ringblk` as a client of qemu-nbd and nbdkit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ringblk_tests::nbdproc::{free_port, NbdServer, Via};
use ringblk_tests::{bin, have, run, Rng};

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn qi(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

fn rb(args: &[&str]) -> String {
    run(Command::new(bin("ringblk")).args(args))
}

/// A qcow2 over a qcow2 backing file, with data in both layers, a zeroed
/// range and unallocated space: every state a map can show.
fn layered(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qi(&["create", "-q", "-f", "qcow2", b, "64M"]);
    run(Command::new("qemu-io").args(["-c", "write -P 0xaa 0 2M", "-c", "write -P 0x11 8M 1M", b]));
    qi(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    run(Command::new("qemu-io").args([
        "-c",
        "write -P 0xbb 1M 2M",
        "-c",
        "write -z 8M 512k",
        "-c",
        "write -P 0xcc 20M 64k",
        t,
    ]));
    top
}

/// Run a Python `script` in nbdsh with `env` set; its output.
fn nbdsh(script: &str, env: &[(&str, &str)]) -> String {
    // nbdsh runs the system python3, which has libnbd's bindings.
    let path = format!("/usr/bin:/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("nbdsh").env("PATH", path).envs(env.iter().copied()).args(["-c", script]))
}

fn random_raw(path: &Path, size: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    // Data with holes: every other MiB random, the rest zero.
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 0 {
            chunk.copy_from_slice(&rng.bytes(chunk.len()));
        }
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn qemu_img_reads_maps_and_converts_over_unix_and_tcp() {
    if !have("qemu-img") || !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let top = layered(d.path());
    let top_s = top.to_str().unwrap();
    for (i, via) in [Via::Unix(d.path().join("rb.sock")), Via::Tcp(free_port())].into_iter().enumerate() {
        let s = NbdServer::ringblk(via.clone(), &["-A", "-r", "-t", "-e", "4", "-x", "disk", "-f", "qcow2", top_s]);
        let q_via = match &via {
            Via::Unix(_) => Via::Unix(d.path().join("q.sock")),
            Via::Tcp(_) => Via::Tcp(free_port()),
        };
        let q = NbdServer::start(
            Path::new("qemu-nbd"),
            q_via,
            &["-A", "-t", "-e", "4", "-x", "disk", "-f", "qcow2", "-r", top_s],
        );
        let info = qi(&["info", "--output=json", &s.uri("disk")]);
        assert!(info.contains("\"virtual-size\": 67108864"), "{info}");
        // The same map as through qemu-nbd, in both contexts.
        for ctx in [None, Some("qemu:allocation-depth")] {
            let map = |v: &Via| {
                let mut o = v.image_opts("disk");
                if let Some(c) = ctx {
                    o += &format!(",x-dirty-bitmap={c}");
                }
                qi(&["map", "--output=json", "--image-opts", &o])
            };
            let (ours, theirs) = (map(&s.via), map(&q.via));
            assert_eq!(ours, theirs, "map with context {ctx:?}");
            if ctx.is_some() {
                // The tri-state: backing (depth 2), local (1) and absent (0)
                // all appear, each as its own run.
                assert!(ours.lines().count() >= 5, "{ours}");
            }
        }
        let out = d.path().join(format!("out{i}.qcow2"));
        qi(&["convert", "-O", "qcow2", &s.uri("disk"), out.to_str().unwrap()]);
        assert!(qi(&["compare", "-U", out.to_str().unwrap(), top_s]).contains("identical"));
        assert!(qi(&["compare", "-U", &s.uri("disk"), top_s]).contains("identical"));
        drop(q);
        let log = s.stop();
        assert!(!log.contains("panick"), "{log}");
    }
}

#[test]
fn qemu_img_writes_through_the_server() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let src = d.path().join("src.raw");
    random_raw(&src, 16 << 20, 7);
    let dst = d.path().join("dst.qcow2");
    qi(&["create", "-q", "-f", "qcow2", dst.to_str().unwrap(), "16M"]);
    let s = NbdServer::ringblk(
        Via::Unix(d.path().join("w.sock")),
        &["-t", "-e", "2", "--discard=unmap", "-f", "qcow2", dst.to_str().unwrap()],
    );
    qi(&["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &s.uri("")]);
    // FUA writes, zero writes with and without unmap, a trim.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -f -P 0x5a 4096 8192",
        "-c",
        "write -z 2M 1M",
        "-c",
        "write -z -u 4M 1M",
        "-c",
        "discard 6M 1M",
        // Trimmed bytes read as anything (the spec promises nothing); a
        // write after the trim must land.
        "-c",
        "write -P 0x77 6M 1M",
        &s.uri(""),
    ]));
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -f -P 0x5a 4096 8192",
        "-c",
        "write -z 2M 1M",
        "-c",
        "write -z 4M 1M",
        "-c",
        "write -P 0x77 6M 1M",
        src.to_str().unwrap(),
    ]));
    drop(s);
    assert!(qi(&["compare", "-f", "raw", "-F", "qcow2", src.to_str().unwrap(), dst.to_str().unwrap()])
        .contains("identical"));
    let check = output(Command::new("qemu-img").args(["check", dst.to_str().unwrap()]));
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn nbdinfo_lists_maps_and_answers_queries() {
    if !have("nbdinfo") || !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let top = layered(d.path());
    let top_s = top.to_str().unwrap();
    let s = NbdServer::ringblk(
        Via::Unix(d.path().join("i.sock")),
        &["-A", "-t", "-e", "4", "-x", "disk", "-D", "a test disk", top_s],
    );
    // qemu-nbd reads a copy: ours holds the image's write lock.
    let copy = d.path().join("copy.qcow2");
    std::fs::copy(&top, &copy).unwrap();
    let top_s = copy.to_str().unwrap();
    let q = NbdServer::start(
        Path::new("qemu-nbd"),
        Via::Unix(d.path().join("q.sock")),
        &["-A", "-t", "-e", "4", "-x", "disk", "-r", top_s],
    );
    let list = run(Command::new("nbdinfo").args(["--list", &s.uri("")]));
    for want in [
        "export=\"disk\"",
        "description: a test disk",
        "export-size: 67108864",
        "base:allocation",
        "qemu:allocation-depth",
        "can_multi_conn: true",
        "block_size_maximum: 33554432",
    ] {
        assert!(list.contains(want), "missing {want}:\n{list}");
    }
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let m = |srv: &NbdServer| run(Command::new("nbdinfo").arg(format!("--map={ctx}")).arg(srv.uri("disk")));
        assert_eq!(m(&s), m(&q), "nbdinfo --map={ctx}");
    }
    let can = |srv: &NbdServer, what: &str| {
        output(Command::new("nbdinfo").args(["--can", what, &srv.uri("disk")])).status.code()
    };
    for what in ["flush", "fua", "trim", "zero", "fast-zero", "cache", "df", "multi-conn"] {
        assert_eq!(can(&s, what), Some(0), "--can {what}");
    }
    let is_ro =
        |srv: &NbdServer| output(Command::new("nbdinfo").args(["--is", "read-only", &srv.uri("disk")])).status.code();
    assert_eq!(is_ro(&s), Some(2), "writable export is not read-only");
    drop(s);
    let r = NbdServer::ringblk(Via::Unix(d.path().join("r.sock")), &["-r", "-t", "-x", "disk", top_s]);
    assert_eq!(is_ro(&r), Some(0), "-r export is read-only");
    assert_eq!(can(&r, "trim"), Some(2), "a read-only export cannot trim");
    // -L prints what qemu-nbd -L prints for the same server.
    let ours = run(Command::new(bin("ringblk-nbd")).args(["-L", "-k", d.path().join("r.sock").to_str().unwrap()]));
    let theirs = run(Command::new("qemu-nbd").args(["-L", "-k", d.path().join("r.sock").to_str().unwrap()]));
    assert_eq!(ours, theirs);
}

#[test]
fn nbdcopy_both_ways_with_one_and_four_connections() {
    if !have("nbdcopy") {
        return;
    }
    let d = tmp();
    let src = d.path().join("src.raw");
    random_raw(&src, 48 << 20, 3);
    for conns in ["1", "4"] {
        // Out of the server.
        let s = NbdServer::ringblk(
            Via::Unix(d.path().join("c.sock")),
            &["-r", "-t", "-e", "8", "-f", "raw", src.to_str().unwrap()],
        );
        let out = d.path().join("out.raw");
        run(Command::new("nbdcopy").arg(format!("--connections={conns}")).arg(s.uri("")).arg(&out));
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap(), "nbdcopy out with {conns} connections");
        drop(s);
        // Into the server.
        let dst = d.path().join("dst.qcow2");
        qi(&["create", "-q", "-f", "qcow2", dst.to_str().unwrap(), "48M"]);
        let s = NbdServer::ringblk(Via::Tcp(free_port()), &["-t", "-e", "8", "-f", "qcow2", dst.to_str().unwrap()]);
        run(Command::new("nbdcopy").arg(format!("--connections={conns}")).arg(&src).arg(s.uri("")));
        drop(s);
        assert!(qi(&["compare", "-f", "raw", "-F", "qcow2", src.to_str().unwrap(), dst.to_str().unwrap()])
            .contains("identical"));
        assert!(output(Command::new("qemu-img").args(["check", dst.to_str().unwrap()])).status.success());
    }
}

#[test]
fn socket_activation_serves_libnbd_tools() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let d = tmp();
    let src = d.path().join("src.raw");
    random_raw(&src, 4 << 20, 11);
    let nbd = bin("ringblk-nbd");
    // nbdinfo and nbdcopy start the server themselves with LISTEN_FDS.
    let info = run(Command::new("nbdinfo").args([
        "--size",
        "--",
        "[",
        nbd.to_str().unwrap(),
        "-r",
        "-f",
        "raw",
        src.to_str().unwrap(),
        "]",
    ]));
    assert_eq!(info.trim(), (4 << 20).to_string());
    let out = d.path().join("out.raw");
    run(Command::new("nbdcopy")
        .args(["--", "[", nbd.to_str().unwrap(), "-r", "-f", "raw", src.to_str().unwrap(), "]"])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&src).unwrap());
}

#[test]
fn fork_and_pid_file_and_exit_after_last_client() {
    if !have("nbdinfo") {
        return;
    }
    let d = tmp();
    let src = d.path().join("src.raw");
    random_raw(&src, 1 << 20, 5);
    let sock = d.path().join("f.sock");
    let pidf = d.path().join("pid");
    // --fork returns once the server listens; without -t it exits after
    // its first client is done.
    run(Command::new(bin("ringblk-nbd")).args([
        "--fork",
        "--pid-file",
        pidf.to_str().unwrap(),
        "-k",
        sock.to_str().unwrap(),
        "-f",
        "raw",
        src.to_str().unwrap(),
    ]));
    let pid: i32 = std::fs::read_to_string(&pidf).unwrap().trim().parse().unwrap();
    let size = run(Command::new("nbdinfo").args(["--size", &format!("nbd+unix:///?socket={}", sock.display())]));
    assert_eq!(size.trim(), (1 << 20).to_string());
    let t0 = Instant::now();
    // SAFETY: kill with signal 0 only probes the pid.
    while unsafe { libc::kill(pid, 0) } == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "server did not exit after its client left");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn nbdsh_pokes_the_edges() {
    if !have("nbdsh") {
        return;
    }
    let d = tmp();
    let img = d.path().join("e.raw");
    random_raw(&img, 8 << 20, 9);
    let s = NbdServer::ringblk(
        Via::Unix(d.path().join("e.sock")),
        &["-t", "-e", "4", "--discard=unmap", "-f", "raw", img.to_str().unwrap()],
    );
    let script = r#"
import errno, os
uri = os.environ["URI"]
size = 8 << 20

def expect_err(f, code, what):
    try:
        f()
    except nbd.Error as e:
        assert e.errnum == code, "%s: errno %s, expected %s" % (what, e.errnum, code)
        return
    raise AssertionError("%s: no error" % what)

# Every option, out of order, in option mode.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_list(lambda name, desc: 0)
h.opt_list_meta_context(lambda ctx: 0)
h.opt_info()
assert h.get_size() == size
h.opt_list(lambda name, desc: 0)
h.set_export_name("nosuch")
expect_err(lambda: h.opt_info(), errno.ENOENT, "INFO of a missing export")
h.set_export_name("")
h.add_meta_context("base:allocation")
h.opt_go()
assert h.can_meta_context("base:allocation")

# Unaligned and zero-length requests.
data = h.pread(777, 12345)
with open(os.environ["IMG"], "rb") as f:
    f.seek(12345)
    assert data == f.read(777), "unaligned read"
h.pwrite(b"x" * 333, 4097, nbd.CMD_FLAG_FUA)
assert h.pread(333, 4097) == b"x" * 333
h.set_strict_mode(0)
assert h.pread(0, 100) == b""
h.pwrite(b"", 100)
h.flush()

# Out of range.
expect_err(lambda: h.pread(4096, size - 100), errno.EINVAL, "read past the end")
expect_err(lambda: h.pwrite(b"y" * 4096, size - 100), errno.ENOSPC, "write past the end")
expect_err(lambda: h.trim(4096, size), errno.EINVAL, "trim past the end")
h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_BOUNDS | nbd.STRICT_ZERO_SIZE | nbd.STRICT_ALIGN)

# Zeroes, fast and slow, with and without holes.
h.zero(65536, 1 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 1 << 20) == bytes(65536)
h.zero(65536, 2 << 20)
try:
    h.zero(65536, 4096, nbd.CMD_FLAG_FAST_ZERO)
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
h.trim(5 << 20, 1 << 20, nbd.CMD_FLAG_FUA)
h.cache(1 << 20, 0)
h.flush()

# Block status, whole and REQ_ONE.
seen = []
h.block_status(size, 0, lambda ctx, off, ents, err: seen.append(ents))
assert sum(seen[0][0::2]) == size, seen
one = []
h.block_status(size, 0, lambda ctx, off, ents, err: one.append(ents), nbd.CMD_FLAG_REQ_ONE)
assert len(one[0]) == 2, one

# DF reads come back in one piece; many requests in flight complete.
assert len(h.pread(1 << 20, 0, nbd.CMD_FLAG_DF)) == 1 << 20
cookies = [h.aio_pread(nbd.Buffer(4096), i * 4096) for i in range(64)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
h.shutdown()
print("ok")
"#;
    let out = nbdsh(script, &[("URI", &s.uri("")), ("IMG", img.to_str().unwrap())]);
    assert!(out.contains("ok"), "{out}");
    let log = s.stop();
    assert!(!log.contains("panick"), "{log}");
}

/// Reads of a page-cached image go out from a mapping of the file (small
/// ones) or are spliced from the page cache (staged in a pipe, replies back
/// to back), large writes are spliced from the socket into the file:
/// thousands of requests of every size and alignment, many in flight, must
/// leave and return exactly the file's bytes, and the server's counters
/// must show the mapping and the splices carried them with nothing copied in
/// user space, and small writes written straight from the receive buffer.
#[test]
fn page_cached_reads_are_spliced_and_match_the_file() {
    if !have("nbdsh") {
        return;
    }
    let d = tmp();
    let img = d.path().join("s.raw");
    let mut rng = Rng::new(31);
    // Not a multiple of 4096, nor of 512: the last partial sector is read too.
    std::fs::write(&img, rng.bytes((16 << 20) + 777)).unwrap();
    for via in [Via::Unix(d.path().join("s.sock")), Via::Tcp(free_port())] {
        let mut cmd = Command::new(bin("ringblk-nbd"));
        cmd.args(via.flags()).args(["-t", "-e", "0", "-f", "raw", img.to_str().unwrap()]);
        cmd.env("RINGBLK_NBD_STATS", "1");
        let s = NbdServer::spawn(cmd, via);
        let script = r#"
import os, random
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
img = bytearray(open(os.environ["IMG"], "rb").read())
size = h.get_size()
assert size == (len(img) + 511) // 512 * 512, (size, len(img))
img += bytes(size - len(img))
random.seed(int(os.environ["SEED"]))
pending = []
idle = []
def drain(limit):
    while len(pending) > limit:
        h.poll(-1)
        for p in list(pending):
            c, buf, off, n = p
            if h.aio_command_completed(c):
                got = buf.to_bytearray()
                assert got == img[off:off + n], "read of %d at %d differs" % (n, off)
                pending.remove(p)
for i in range(4000):
    if i == 2000:
        # From here on every shard has a connection (these idle ones and
        # h): large writes are written from the pipe on h's shard.
        drain(0)
        for _ in range(int(os.environ["SHARDS"])):
            idle.append(nbd.NBD())
            idle[-1].connect_uri(os.environ["URI"])
    n = random.choice([1, 512, 4096, 4096, 4096, 4096, 65536, 262144, random.randint(1, 300000)])
    off = random.choice([random.randrange(0, size - n + 1), size - n])
    if random.random() < 0.05:
        drain(0)
        data = os.urandom(n)
        h.pwrite(data, off)
        img[off:off + n] = data
    else:
        buf = nbd.Buffer(n)
        pending.append((h.aio_pread(buf, off), buf, off, n))
        drain(48)
drain(0)
h.flush()
disk = open(os.environ["IMG"], "rb").read()
assert disk == img[:len(disk)] and not any(img[len(disk):]), "the file differs from what was written"
h.shutdown()
for i in idle:
    i.shutdown()
print("ok")
"#;
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
        let env = [("URI", s.uri("")), ("IMG", img.to_str().unwrap().into()), ("SEED", "7".into()), ("SHARDS", shards)];
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = nbdsh(script, &env);
        assert!(out.contains("ok"), "{out}");
        let log = s.stop();
        assert!(!log.contains("panick"), "{log}");
        let stat = |k: &str| -> u64 {
            let line = log.lines().find(|l| l.contains("served-bytes=")).unwrap_or_else(|| panic!("no stats: {log}"));
            let v = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}=")));
            v.unwrap_or_else(|| panic!("no {k} in {line}")).parse().unwrap()
        };
        assert_eq!(stat("user-copied-bytes"), 0, "{log}");
        // All but the reads too large to stage or touching the partial sector.
        assert!((stat("spliced-bytes") + stat("mapped-bytes")) * 10 >= stat("served-bytes") * 8, "{log}");
        assert!(stat("mapped-bytes") > 0 && stat("spliced-bytes") > 0, "both ways must have carried reads: {log}");
        // Writes of 64-256 KiB arrive by splice (the first after a small
        // request may have been received with its header).
        assert!(stat("spliced-in-bytes") > 0, "{log}");
        // Alone, by an io_uring worker; with every shard busy, on the
        // shard's own thread.
        assert!(stat("inline-pipe-bytes") > 0 && stat("inline-pipe-bytes") < stat("spliced-in-bytes"), "{log}");
        // Small writes that arrived whole are written from the receive buffer.
        assert!(stat("inline-write-bytes") > 0, "{log}");
    }
}

/// Small cached reads are sent from a shared mapping of the image file. A
/// process that ignores our lock and cuts the file short under that mapping
/// must not kill the server (user space never touches the mapping, so no
/// SIGBUS): reads past the new end fail or see zeroes, and the server keeps
/// serving.
#[test]
fn a_file_truncated_under_the_mapping_does_not_kill_the_server() {
    if !have("nbdsh") {
        return;
    }
    let d = tmp();
    let img = d.path().join("t.raw");
    std::fs::write(&img, Rng::new(5).bytes(8 << 20)).unwrap();
    let via = Via::Unix(d.path().join("t.sock"));
    let mut cmd = Command::new(bin("ringblk-nbd"));
    cmd.args(via.flags()).args(["-t", "-e", "4", "-f", "raw", img.to_str().unwrap()]);
    cmd.env("RINGBLK_NBD_STATS", "1");
    let mut s = NbdServer::spawn(cmd, via);
    let script = r#"
import os, random, time
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
size = h.get_size()
t0 = time.time()
reads = errors = 0
while time.time() - t0 < 2:
    try:
        h.pread(4096, random.randrange(0, size // 4096) * 4096)
        reads += 1
    except nbd.Error:
        errors += 1
        try:
            h.shutdown()
        except nbd.Error:
            pass
        h = nbd.NBD()
        h.connect_uri(os.environ["URI"])
print("reads", reads, "errors", errors)
"#;
    let uri = s.uri("");
    let reader = {
        let uri = uri.clone();
        std::thread::spawn(move || nbdsh(script, &[("URI", &uri)]))
    };
    std::thread::sleep(Duration::from_millis(700));
    std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(1 << 20).unwrap();
    let out = reader.join().unwrap();
    assert!(out.contains("reads"), "{out}");
    s.assert_alive();
    // Still serving: a new client reads what is left of the file.
    let left = nbdsh(
        "h = nbd.NBD()\nh.connect_uri(os.environ['URI'])\nprint(len(h.pread(4096, 0)))",
        &[("URI", &uri)],
    );
    assert_eq!(left.trim(), "4096");
    let log = s.stop();
    assert!(!log.contains("mapped-bytes=0 "), "no read went out from the mapping: {log}");
    assert!(log.contains("mapped-bytes="), "{log}");
}

#[test]
fn ringblk_is_a_client_of_qemu_nbd_and_nbdkit() {
    if !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let top = layered(d.path());
    let top_s = top.to_str().unwrap();
    let raw = d.path().join("flat.raw");
    qi(&["convert", "-O", "raw", top_s, raw.to_str().unwrap()]);
    let mut servers = vec![NbdServer::start(
        Path::new("qemu-nbd"),
        Via::Unix(d.path().join("q.sock")),
        &["-r", "-t", "-e", "4", "-f", "qcow2", top_s],
    )];
    if have("nbdkit") {
        let sock = d.path().join("k.sock");
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "-r", "-U", sock.to_str().unwrap(), "file", raw.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        servers.push(NbdServer::spawn(cmd, Via::Unix(sock)));
    }
    for s in &servers {
        let uri = s.uri("");
        let info = rb(&["info", &uri]);
        assert!(info.contains("virtual size: 64 MiB (67108864 bytes)"), "{info}");
        // Our map of the export agrees with qemu-img's.
        assert_eq!(rb(&["map", "--output=json", &uri]), qi(&["map", "--output=json", &uri]), "map of {uri}");
        let out = d.path().join("copy.qcow2");
        rb(&["convert", "-O", "qcow2", &uri, out.to_str().unwrap()]);
        assert!(
            qi(&["compare", "-U", out.to_str().unwrap(), raw.to_str().unwrap()]).contains("identical"),
            "convert of {uri}"
        );
        assert!(rb(&["compare", &uri, raw.to_str().unwrap()]).contains("identical"));
        let o = Command::new(bin("ringblk"))
            .args(["info", "--output=json", "--image-opts", &s.via.image_opts("")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn extended_headers_carry_64_bit_lengths() {
    use nbd::client::conn::ClientConn;
    use nbd::proto::*;
    let d = tmp();
    let img = d.path().join("big.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(6 << 30).unwrap();
    let s = NbdServer::ringblk(Via::Unix(d.path().join("x.sock")), &["-t", "-f", "raw", img.to_str().unwrap()]);
    let addr = nbd::client::Addr::Unix(d.path().join("x.sock").to_str().unwrap().into());
    let nbd::client::Connected { fd, tls, info } =
        nbd::client::connect(&addr, "", &[CTX_BASE_ALLOCATION], None, None).unwrap();
    assert!(tls.is_none());
    assert_eq!(info.mode, ReplyMode::Extended);
    assert_eq!(info.contexts.len(), 1);
    let rt = engine::runtime::Runtime::single().unwrap();
    let (zero, status) = rt.block_on(move || async move {
        let c = ClientConn::start(fd, None, info);
        // Write some data past 4 GiB, then zero 5 GiB in one request.
        let mut buf = engine::runtime::IoBuf::new(4096);
        buf.fill(0x42);
        let (r, _) = c.request(CMD_WRITE, 0, (5 << 30) + 4096, 4096, Some(buf), None).await;
        assert!(r.unwrap().error.is_none());
        let (z, _) = c.request(CMD_WRITE_ZEROES, 0, 0, 5 << 30, None, None).await;
        let (st, _) = c.request(CMD_BLOCK_STATUS, 0, 0, 6 << 30, None, None).await;
        c.disconnect().await;
        (z.unwrap(), st.unwrap())
    });
    assert!(zero.error.is_none(), "{:?}", zero.error);
    let ex = &status.extents[0].1;
    // One extent covers the zeroed 5 GiB (beyond a 32-bit length), holes
    // and zeroes; the data block past it follows.
    assert!(ex[0].0 >= 5 << 30, "{ex:?}");
    assert_eq!(ex[0].1, u64::from(STATE_HOLE | STATE_ZERO));
    assert!(ex.iter().any(|&(_, f)| f == 0), "the written block is data: {ex:?}");
    assert_eq!(ex.iter().map(|e| e.0).sum::<u64>(), 6 << 30);
    drop(s);
}

#[test]
fn snapshot_overlay_and_offset() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let d = tmp();
    let img = d.path().join("s.raw");
    random_raw(&img, 4 << 20, 13);
    let orig = std::fs::read(&img).unwrap();
    // -s: writes land in a temporary overlay; the image never changes.
    let s = NbdServer::ringblk(Via::Unix(d.path().join("s.sock")), &["-s", "-t", "-f", "raw", img.to_str().unwrap()]);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 0 1M", &s.uri("")]));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x33 0 1M", &s.uri("")]));
    drop(s);
    assert!(std::fs::read(&img).unwrap() == orig, "-s must not write the image");
    // -o: the export starts 1 MiB in; -e 1 means no multi-conn, so
    // nbdcopy's extra connections are not left waiting.
    let s = NbdServer::ringblk(
        Via::Unix(d.path().join("o.sock")),
        &["-o", "1M", "-r", "-t", "-f", "raw", img.to_str().unwrap()],
    );
    let multi = output(Command::new("nbdinfo").args(["--can", "multi-conn", &s.uri("")]));
    assert_eq!(multi.status.code(), Some(2), "-e 1 does not advertise multi-conn");
    let out = d.path().join("tail.raw");
    run(Command::new("nbdcopy").arg(s.uri("")).arg(&out));
    assert!(std::fs::read(&out).unwrap() == orig[1 << 20..], "-o 1M exports the image from 1 MiB on");
}
