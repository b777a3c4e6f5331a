//! `ringblk-nbd` against hostile clients on raw sockets: bad magic, lengths
//! meant to make it allocate gigabytes, option floods, connections that never
//! speak, and clients that vanish mid-request. In every case the misbehaving
//! connection must end (or be answered with an error), the server's memory
//! must stay bounded, a well-behaved client must keep reading correct data
//! meanwhile, and the server must survive and still exit cleanly on SIGTERM.

#[path = "nbd_wire.rs"]
mod wire;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringblk_tests::Rng;
use wire::*;

/// The export: 96 MiB, random data in [0, 4 MiB) and [64 MiB, 68 MiB), holes
/// elsewhere. Large enough that a 64 MiB read is in range (so only the size
/// limit can refuse it).
const SIZE: u64 = 96 << 20;
const SEGMENTS: [u64; 2] = [0, 64 << 20];
const SEG_LEN: usize = 4 << 20;
/// The largest request the server accepts (the spec's recommended limit).
const MAX_REQUEST: u32 = 32 << 20;
/// `--handshake-limit` the server runs with, in seconds.
const HANDSHAKE_LIMIT: u64 = 2;
/// The server's resident memory must stay below this whatever clients do.
const RSS_LIMIT_MIB: u64 = 200;

struct Fixture {
    srv: NbdServer,
    img: PathBuf,
    /// What the image held when the server started: (offset, bytes).
    data: Vec<(u64, Vec<u8>)>,
    _dir: tempfile::TempDir,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("disk.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    let mut rng = Rng::new(0x5eed);
    let data: Vec<(u64, Vec<u8>)> = SEGMENTS.iter().map(|&off| (off, rng.bytes(SEG_LEN))).collect();
    for (off, d) in &data {
        f.write_all_at(d, *off).unwrap();
    }
    f.sync_all().unwrap();
    let sock = dir.path().join("nbd.sock");
    let limit = HANDSHAKE_LIMIT.to_string();
    let srv = NbdServer::ringblk(
        Via::Unix(sock),
        &["-v", "-t", "-e", "0", "--handshake-limit", &limit, "-f", "raw", img.to_str().unwrap()],
    );
    Fixture { srv, img, data, _dir: dir }
}

impl Fixture {
    fn sock(&self) -> &Path {
        self.srv.sock()
    }

    /// What [off, off+len) must read as.
    fn expect(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        for (s, d) in &self.data {
            let lo = off.max(*s);
            let hi = (off + len as u64).min(s + d.len() as u64);
            if lo < hi {
                v[(lo - off) as usize..(hi - off) as usize].copy_from_slice(&d[(lo - s) as usize..(hi - s) as usize]);
            }
        }
        v
    }

    /// Reads through `c` that cover data, holes, a segment's end and the
    /// export's end, each checked against what the image holds.
    #[track_caller]
    fn check_reads(&self, c: &mut Client) {
        for (off, len) in [(0, 4096), (1 << 20, 1 << 20), ((64 << 20) - 4096, 8192), (SIZE - 65536, 65536)] {
            let got = c.read(off, len).unwrap_or_else(|e| panic!("read {len} at {off}: error {e}"));
            assert!(got == self.expect(off, len as usize), "read {len} bytes at {off}: wrong data");
        }
    }

    /// A new well-behaved client connects, negotiates, reads correct data and
    /// disconnects.
    #[track_caller]
    fn check_new_client(&self) {
        let mut c = Client::connect(self.sock());
        assert_eq!(c.size, SIZE, "export size");
        self.check_reads(&mut c);
        c.disconnect();
    }

    fn rss_mib(&self) -> u64 {
        self.srv.rss_mib()
    }

    /// Open file descriptors of the server.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.srv.pid())).unwrap().count()
    }

    fn fd_targets(&self) -> Vec<String> {
        let dir = std::fs::read_dir(format!("/proc/{}/fd", self.srv.pid())).unwrap();
        dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).map(|p| p.display().to_string()).collect()
    }

    /// Threads of the server that are negotiating with a client.
    fn handshake_threads(&self) -> usize {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.srv.pid())).unwrap();
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "nbd-handshake")
            .count()
    }

    /// Wait (up to `within`) until the server holds no more than `fds` file
    /// descriptors and no handshake thread: every connection it was handling
    /// is gone, nothing leaked.
    #[track_caller]
    fn settles_to(&self, fds: usize, within: Duration) {
        let t0 = Instant::now();
        loop {
            let (f, t) = (self.fds(), self.handshake_threads());
            if f <= fds && t == 0 {
                return;
            }
            assert!(
                t0.elapsed() < within,
                "server still holds {f} fds (baseline {fds}) and {t} handshake threads after {within:?}: {:?}",
                self.fd_targets()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's fds once it has served a client and that client, like
    /// the one made to see it listen, has gone.
    fn baseline(&self) -> usize {
        self.check_new_client();
        self.settles_to(usize::MAX, Duration::from_secs(5));
        self.fds()
    }
}

#[test]
fn bad_magic_closes_only_the_offending_connection() {
    let f = start();
    let mut keep = Client::connect(f.sock());
    f.check_reads(&mut keep);

    // Option phase: a header whose magic is not IHAVEOPT.
    let mut s = greet(f.sock());
    let mut bad = option(OPT_LIST, &[]);
    bad[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    s.write_all(&bad).unwrap();
    let got = wait_closed(&mut s, IO_TIMEOUT);
    assert!(got.is_empty(), "server answered a bad option magic with {} bytes", got.len());

    // Option phase: one good option, then garbage. The good one is answered.
    let mut s = greet(f.sock());
    let mut v = option(OPT_LIST, &[]);
    v.extend_from_slice(&[0xa5; 64]);
    s.write_all(&v).unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().ty, REP_SERVER);
    assert_eq!(read_option_reply(&mut s).unwrap().ty, REP_ACK);
    let got = wait_closed(&mut s, IO_TIMEOUT);
    assert!(got.is_empty(), "{} bytes after the garbage", got.len());

    // Unknown client flags end the handshake at once.
    let mut s = connect(f.sock());
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0003u32.to_be_bytes()).unwrap();
    assert!(wait_closed(&mut s, IO_TIMEOUT).is_empty());

    // Transmission: garbage where a request header belongs.
    let mut c = Client::connect(f.sock());
    let mut junk = request(CMD_READ, 0, 1, 0, 4096);
    junk[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    c.s.write_all(&junk).unwrap();
    let got = wait_closed(&mut c.s, IO_TIMEOUT);
    assert!(got.is_empty(), "server answered a bad request magic with {} bytes", got.len());

    // Transmission: a good READ, then garbage in the same send. The READ is
    // answered in full before the connection closes; nothing else comes.
    let mut c = Client::connect(f.sock());
    let mut v = request(CMD_READ, 0, 77, 4096, 4096).to_vec();
    v.extend_from_slice(&[0x5a; 28]);
    c.s.write_all(&v).unwrap();
    let got = wait_closed(&mut c.s, IO_TIMEOUT);
    assert_eq!(got.len(), 16 + 4096, "one simple reply with its data, then EOF");
    assert_eq!(be32(&got[0..4]), SIMPLE_REPLY_MAGIC);
    assert_eq!(be32(&got[4..8]), 0, "error field");
    assert_eq!(be64(&got[8..16]), 77, "cookie");
    assert!(got[16..] == f.expect(4096, 4096), "data of the READ before the garbage");

    // The client connected all along, and a new one, are served.
    f.check_reads(&mut keep);
    f.check_new_client();
    keep.disconnect();
    f.srv.finish();
}

#[test]
fn oversize_lengths_are_refused_without_allocating() {
    let f = start();
    let vm0 = f.srv.status("VmSize") >> 10;
    let mut keep = Client::connect(f.sock());

    // An option claiming 4 GiB of data: the server may read and drop it or
    // hang up, but must not allocate it. Send 16 MiB of it, then go quiet.
    let mut s = greet(f.sock());
    s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    s.write_all(&OPT_LIST.to_be_bytes()).unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..256 {
        if s.write_all(&chunk).is_err() {
            break; // the server hung up: allowed
        }
    }
    let (rss, vm) = (f.rss_mib(), f.srv.status("VmSize") >> 10);
    eprintln!("4 GiB option: RSS {rss} MiB, virtual {vm} MiB (was {vm0} MiB)");
    assert!(rss < RSS_LIMIT_MIB, "RSS {rss} MiB after a 4 GiB option");
    assert!(vm < vm0 + 1024, "virtual size grew from {vm0} to {vm} MiB: the option was allocated");
    f.check_reads(&mut keep);
    // Silent now: the handshake limit ends it, with no reply to the option.
    let got = wait_closed(&mut s, Duration::from_secs(HANDSHAKE_LIMIT + 8));
    assert!(got.is_empty(), "{} bytes of reply to a never-finished option", got.len());

    // An option too large to keep, sent in full (8 MiB): it is consumed and
    // refused, and the same connection negotiates on in step.
    let mut s = greet(f.sock());
    s.write_all(&option(OPT_LIST, &vec![0x42; 8 << 20])).unwrap();
    let r = read_option_reply(&mut s).unwrap();
    assert_eq!(r.opt, OPT_LIST);
    assert!(r.ty & 0x8000_0000 != 0, "an 8 MiB NBD_OPT_LIST must be refused, got {:#x}", r.ty);
    let mut c = Client::go(s);
    f.check_reads(&mut c);
    c.disconnect();

    // A WRITE announcing a 1 GiB payload: the server hangs up without
    // allocating it and without replying.
    let mut c = Client::connect(f.sock());
    c.s.write_all(&request(CMD_WRITE, 0, 9, 0, 1 << 30)).unwrap();
    c.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..16 {
        if c.s.write_all(&chunk).is_err() {
            break;
        }
    }
    let (rss, vm) = (f.rss_mib(), f.srv.status("VmSize") >> 10);
    eprintln!("1 GiB WRITE: RSS {rss} MiB, virtual {vm} MiB (was {vm0} MiB)");
    assert!(rss < RSS_LIMIT_MIB, "RSS {rss} MiB after a 1 GiB WRITE header");
    assert!(vm < vm0 + 768, "virtual size grew from {vm0} to {vm} MiB: the payload was allocated");
    let got = wait_closed(&mut c.s, IO_TIMEOUT);
    assert!(got.is_empty(), "server replied {} bytes to a 1 GiB WRITE", got.len());
    let mut on_disk = vec![0u8; 1 << 20];
    std::fs::File::open(&f.img).unwrap().read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk == f.expect(0, 1 << 20), "the refused WRITE changed the image");

    // A 64 MiB READ (in range, over the 32 MiB limit): EINVAL, and the
    // connection stays usable; a READ of exactly the limit succeeds.
    let mut c = Client::connect(f.sock());
    assert_eq!(c.read(0, 64 << 20), Err(EINVAL), "64 MiB READ");
    assert_eq!(c.read(0, MAX_REQUEST + 4096), Err(EINVAL), "READ of the limit plus 4 KiB");
    let got = c.read((60 << 20) + 4096, MAX_REQUEST).expect("READ of exactly the limit");
    assert!(got == f.expect((60 << 20) + 4096, MAX_REQUEST as usize), "32 MiB READ data");
    // Past the export's end: EINVAL too, and still in step.
    assert_eq!(c.read(SIZE - 4096, 8192), Err(EINVAL), "READ past the end");
    f.check_reads(&mut c);
    c.disconnect();

    let rss = f.rss_mib();
    assert!(rss < RSS_LIMIT_MIB, "RSS {rss} MiB at the end");
    f.check_reads(&mut keep);
    keep.disconnect();
    f.srv.finish();
}

#[test]
fn option_flood_keeps_memory_bounded() {
    const N: usize = 200_000;
    const BATCH: usize = 1000;
    let f = start();
    let batch: Vec<u8> = (0..BATCH).flat_map(|_| option(OPT_LIST, &[])).collect();

    // A floods and never reads a reply.
    let mut a = greet(f.sock());
    a.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut a_reader = a.try_clone().unwrap();
    let b1 = batch.clone();
    let flood_a = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < N && a.write_all(&b1).is_ok() {
            sent += BATCH;
        }
        sent
    });
    // B floods and drains the replies as they come.
    let mut b = greet(f.sock());
    b.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b_reader = b.try_clone().unwrap();
    let b2 = batch.clone();
    let flood_b = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < N && b.write_all(&b2).is_ok() {
            sent += BATCH;
        }
        sent
    });
    let drain_b = std::thread::spawn(move || {
        let mut replies = 0usize;
        let mut bad = None;
        while let Ok(r) = read_option_reply(&mut b_reader) {
            if r.opt != OPT_LIST || !matches!(r.ty, REP_SERVER | REP_ACK) {
                bad = Some(r);
                break;
            }
            replies += 1;
        }
        (replies, bad)
    });

    let t0 = Instant::now();
    let mut peak = 0;
    let mut served = 0;
    while !(flood_a.is_finished() && flood_b.is_finished() && drain_b.is_finished()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "the flood did not end within 30 s");
        peak = peak.max(f.rss_mib());
        f.check_new_client();
        served += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let (sent_a, sent_b) = (flood_a.join().unwrap(), flood_b.join().unwrap());
    let (replies_b, bad) = drain_b.join().unwrap();
    assert!(bad.is_none(), "unexpected reply in the flood: {bad:?}");
    assert!(replies_b <= 2 * sent_b, "{replies_b} replies to {sent_b} options");
    // A's connection ends too (it never read: the server cannot send to it,
    // and the handshake limit runs out).
    wait_closed(&mut a_reader, Duration::from_secs(HANDSHAKE_LIMIT + 8));
    peak = peak.max(f.rss_mib());
    eprintln!("flood: A sent {sent_a}, B sent {sent_b} and read {replies_b} replies; peak RSS {peak} MiB; {served} good clients served meanwhile");
    assert!(peak < RSS_LIMIT_MIB, "server RSS peaked at {peak} MiB during the option flood");
    assert!(served > 0);
    f.check_new_client();
    f.srv.finish();
}

#[test]
fn half_open_connections_do_not_block_others_and_are_closed_at_the_limit() {
    let f = start();
    let fds0 = f.baseline();
    let t0 = Instant::now();
    let mut idle: Vec<_> = (0..200).map(|_| connect(f.sock())).collect();
    // Served at once, not after the idle ones time out.
    let t1 = Instant::now();
    f.check_new_client();
    let took = t1.elapsed();
    assert!(took < Duration::from_secs(HANDSHAKE_LIMIT) / 2, "a good client took {took:?} beside 200 idle ones");
    // Every idle connection got the greeting, then is closed once the
    // handshake limit has passed, not before.
    let mut first_closed = None;
    for (i, s) in idle.iter_mut().enumerate() {
        let left = Duration::from_secs(HANDSHAKE_LIMIT + 6).saturating_sub(t0.elapsed());
        let got = wait_closed(s, left.max(Duration::from_millis(1)));
        assert!(got.len() == 18 && got.starts_with(b"NBDMAGICIHAVEOPT"), "idle connection {i} got {got:02x?}");
        first_closed.get_or_insert(t0.elapsed());
    }
    let first = first_closed.unwrap();
    assert!(
        first >= Duration::from_secs(HANDSHAKE_LIMIT) - Duration::from_millis(200),
        "the first idle connection was closed after {first:?}, before the {HANDSHAKE_LIMIT} s limit"
    );
    drop(idle);
    // Nothing left behind: no socket, no handshake thread.
    f.settles_to(fds0, Duration::from_secs(5));
    f.check_new_client();
    f.srv.finish();
}

#[test]
fn clients_vanishing_mid_request_leave_the_server_serving() {
    let f = start();
    let fds0 = f.baseline();
    let mut keep = Client::connect(f.sock());

    // Half a WRITE payload, then gone.
    let mut c = Client::connect(f.sock());
    c.s.write_all(&request(CMD_WRITE, 0, 1, 1 << 20, 256 << 10)).unwrap();
    c.s.write_all(&vec![0xee; 100 << 10]).unwrap();
    drop(c);

    // Half a WRITE payload, then a half-close: the server sees EOF mid-payload
    // and must close its side rather than wait.
    let mut c = Client::connect(f.sock());
    c.s.write_all(&request(CMD_WRITE, 0, 2, 2 << 20, 8192)).unwrap();
    c.s.write_all(&[0xee; 4096]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    let got = wait_closed(&mut c.s, IO_TIMEOUT);
    assert!(got.is_empty(), "{} bytes of reply to an unfinished WRITE", got.len());

    // 64 reads of 1 MiB in flight, then gone before any reply is read.
    let mut c = Client::connect(f.sock());
    for i in 0..64u64 {
        let off = SEGMENTS[(i % 2) as usize] + (i % 4) * (1 << 20);
        c.send(CMD_READ, 0, off, 1 << 20);
    }
    drop(c);

    // Reads of cached data (staged in a pipe, answered by the reader at
    // once) past what the stage holds, then gone.
    let mut c = Client::connect(f.sock());
    for i in 0..200u64 {
        c.send(CMD_READ, 0, (i % 16) << 16, 65536);
    }
    drop(c);

    // The same, gone after reading part of the first reply.
    let mut c = Client::connect(f.sock());
    for i in 0..64u64 {
        c.send(CMD_READ, 0, (i % 4) << 20, 1 << 20);
    }
    let mut part = [0u8; 1000];
    c.s.read_exact(&mut part).unwrap();
    drop(c);

    // Reads in flight, then a half-close: every read started is still
    // answered in full, then the server closes.
    let mut c = Client::connect(f.sock());
    let cookies: Vec<_> = (0..32u64).map(|i| (c.send(CMD_READ, 0, (i % 8) << 19, 1 << 19), (i % 8) << 19)).collect();
    c.s.shutdown(Shutdown::Write).unwrap();
    for (cookie, off) in cookies {
        let got = c.reply(cookie, 1 << 19).unwrap_or_else(|e| panic!("read at {off} after half-close: error {e}"));
        assert!(got == f.expect(off, 1 << 19), "read at {off} after half-close: wrong data");
    }
    assert!(wait_closed(&mut c.s, IO_TIMEOUT).is_empty(), "bytes after the last reply");

    // Still serving, and the unfinished WRITEs changed nothing.
    f.check_reads(&mut keep);
    f.check_new_client();
    let now = keep.read(1 << 20, 256 << 10).unwrap();
    assert!(now == f.expect(1 << 20, 256 << 10), "the abandoned WRITE at 1 MiB landed");
    let now = keep.read(2 << 20, 8192).unwrap();
    assert!(now == f.expect(2 << 20, 8192), "the abandoned WRITE at 2 MiB landed");
    keep.disconnect();
    // Every connection's resources are released.
    f.settles_to(fds0, Duration::from_secs(5));
    f.srv.finish();
}

/// A client that asks for far more data than its socket can hold and reads
/// none of it must not stall the server: replies wait for room on the ring,
/// never in a system call on the shard's thread. Clients on every shard
/// (several connections land on each) are still served meanwhile.
#[test]
fn a_client_that_never_reads_stalls_no_one() {
    let f = start();
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let mut hog = Client::connect(f.sock());
        // 2000 cached 4 KiB reads: 8 MiB of replies against a socket buffer
        // of a few hundred KiB. The requests go in one write (56 KiB), which
        // the socket's receive side holds even if the server reads none.
        let reqs: Vec<u8> = (0..2000u64).flat_map(|i| request(CMD_READ, 0, i + 1, (i % 512) << 12, 4096)).collect();
        hog.s.write_all(&reqs).unwrap();
        hogs.push(hog);
    }
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        let mut c = Client::connect(f.sock());
        f.check_reads(&mut c);
        c.disconnect();
    }
    drop(hogs);
    f.srv.finish();
}

/// `--handshake-limit` bounds the whole negotiation (as in qemu-nbd), not
/// each read: a client that drips a byte now and then must still be cut
/// off once the limit has passed.
#[test]

fn slow_drip_negotiation_is_cut_off_at_the_handshake_limit() {
    let f = start();
    let mut s = greet(f.sock());
    // An option announcing 4 GiB of data, then one byte of it every 300 ms.
    s.write_all(&option(OPT_LIST, &[])[..12]).unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let drip = std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(HANDSHAKE_LIMIT + 6) {
            if w.write_all(&[0]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    // The same with the 16-byte option header itself dripped.
    let mut s2 = greet(f.sock());
    let mut w2 = s2.try_clone().unwrap();
    let drip2 = std::thread::spawn(move || {
        for b in option(OPT_LIST, &[]) {
            if w2.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(600));
        }
    });
    let t0 = Instant::now();
    wait_closed(&mut s, Duration::from_secs(HANDSHAKE_LIMIT + 3));
    let left = Duration::from_secs(HANDSHAKE_LIMIT + 3).saturating_sub(t0.elapsed());
    let got = wait_closed(&mut s2, left.max(Duration::from_millis(1)));
    assert!(got.is_empty(), "a dripped option was answered: it took longer than the limit");
    drip.join().unwrap();
    drip2.join().unwrap();
    f.check_new_client();
    f.srv.finish();
}
