//! nvme-guest: the guest half of tests/vm_nvme.rs, run inside the emulated
//! guest against NVMe controllers bound to vfio-pci, through the `nvme`
//! protocol driver. Also runs on the host to print what a workload leaves
//! on the namespace (`expect`), which the host test compares with the
//! backing file after the guest powers off.
//!
//!   nvme-guest identify BDF
//!   nvme-guest workload BDF SIZE SHARDS WORKERS OPS SEED [reset] [poll] [prp]
//!   nvme-guest expect SIZE BLOCK SHARDS WORKERS OPS SEED OUT
//!   nvme-guest refuse BDF
//!
//! The workload gives each worker (WORKERS per shard, SHARDS shards, so as
//! many queue pairs) its own slice of the namespace and its own random
//! stream of writes (some FUA, some larger than a command may carry),
//! write zeroes, discards, flushes and reads, and checks every read against
//! a model of the slice. Discarded blocks read as zeroes or as what was
//! there; the model marks them unknown until written again, and at the end
//! every unknown block is zeroed so the final contents are fixed. With
//! `reset`, worker 0 resets the controller halfway: the other workers' reads
//! must still find every write they were told had completed. With `poll`,
//! completions are polled (poll=on) instead of taken from MSI-X interrupts;
//! with `prp`, data goes by PRPs (and PRP lists) rather than SGLs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use drivers::protocol::nvme::NvmeNode;
use engine::block::{BlockNode, OpenCtx, OpenFlags, WriteFlags, ZeroFlags};
use engine::runtime::{IoBuf, Runtime, RuntimeConfig};
use ringblk_tests::Rng;

fn fail(msg: String) -> ! {
    eprintln!("nvme-guest: FAIL: {msg}");
    std::process::exit(1)
}

fn arg<T: std::str::FromStr>(a: &[String], i: usize, what: &str) -> T {
    a.get(i).and_then(|v| v.parse().ok()).unwrap_or_else(|| fail(format!("argument {i} ({what}) missing or bad")))
}

async fn open(bdf: &str, poll: bool, sgl: Option<bool>) -> Arc<NvmeNode> {
    let ctx = OpenCtx::new(drivers::registry(), OpenFlags { write: true, ..Default::default() });
    NvmeNode::open(&ctx, bdf, 1, poll, sgl).await.unwrap_or_else(|e| fail(format!("open {bdf}: {e}")))
}

/// One operation of a worker's stream; the same stream drives the device
/// in the guest and the model on the host.
enum Op {
    Write { off: u64, len: usize, fua: bool, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Read { off: u64, len: usize },
    Flush,
}

struct Stream {
    rng: Rng,
    base: u64,
    len: u64,
    block: u64,
}

impl Stream {
    fn new(seed: u64, worker: u64, base: u64, len: u64, block: u64) -> Stream {
        Stream { rng: Rng::new(seed * 1000 + worker + 1), base, len, block }
    }
    /// A block-aligned range inside the slice, up to `max` bytes.
    fn range(&mut self, max: u64) -> (u64, u64) {
        let blocks = self.len / self.block;
        let n = 1 + self.rng.below((max / self.block).min(blocks));
        let at = self.rng.below(blocks - n + 1);
        (self.base + at * self.block, n * self.block)
    }
    fn next(&mut self) -> Op {
        match self.rng.below(20) {
            0..=7 => {
                // Now and then bigger than one command carries (MDTS).
                let max = if self.rng.below(8) == 0 { 1 << 20 } else { 64 << 10 };
                let (off, len) = self.range(max);
                Op::Write { off, len: len as usize, fua: self.rng.below(4) == 0, seed: self.rng.next_u64() }
            }
            8..=9 => {
                let (off, len) = self.range(256 << 10);
                Op::Zero { off, len, unmap: self.rng.below(2) == 0 }
            }
            10 => {
                let (off, len) = self.range(256 << 10);
                Op::Discard { off, len }
            }
            11 => Op::Flush,
            _ => {
                let (off, len) = self.range(256 << 10);
                Op::Read { off, len: len as usize }
            }
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// What a slice holds: bytes, and which blocks are unknown (discarded).
struct Model {
    base: u64,
    block: u64,
    data: Vec<u8>,
    unknown: Vec<bool>,
}

impl Model {
    fn new(base: u64, len: u64, block: u64) -> Model {
        // The namespace starts as the host left it: zeroes.
        Model { base, block, data: vec![0; len as usize], unknown: vec![false; (len / block) as usize] }
    }
    fn set(&mut self, off: u64, bytes: &[u8]) {
        let o = (off - self.base) as usize;
        self.data[o..o + bytes.len()].copy_from_slice(bytes);
        let (b0, b1) = (o / self.block as usize, (o + bytes.len()) / self.block as usize);
        self.unknown[b0..b1].fill(false);
    }
    fn forget(&mut self, off: u64, len: u64) {
        let o = ((off - self.base) / self.block) as usize;
        self.unknown[o..o + (len / self.block) as usize].fill(true);
    }
    fn check(&self, off: u64, got: &[u8], what: &str) {
        let o = (off - self.base) as usize;
        let bs = self.block as usize;
        for (i, chunk) in got.chunks(bs).enumerate() {
            let b = o / bs + i;
            let want = &self.data[b * bs..(b + 1) * bs];
            if self.unknown[b] {
                if chunk.iter().all(|&x| x == 0) || chunk == want {
                    continue;
                }
                fail(format!(
                    "{what}: discarded block at {} holds neither zeroes nor its old data",
                    b * bs + self.base as usize
                ));
            }
            if chunk != want {
                fail(format!("{what}: block at {} differs from what was written", b * bs + self.base as usize));
            }
        }
    }
    /// The blocks still unknown at the end, as ranges: they get zeroed.
    fn unknown_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.unknown.len() {
            if self.unknown[i] {
                let s = i;
                while i < self.unknown.len() && self.unknown[i] {
                    i += 1;
                }
                out.push((self.base + s as u64 * self.block, (i - s) as u64 * self.block));
            } else {
                i += 1;
            }
        }
        out
    }
}

/// Apply one op to the model (host side, or the guest's own model).
fn model_apply(m: &mut Model, op: &Op) {
    match *op {
        Op::Write { off, len, seed, .. } => m.set(off, &pattern(seed, len)),
        Op::Zero { off, len, .. } => m.set(off, &vec![0; len as usize]),
        Op::Discard { off, len } => m.forget(off, len),
        Op::Read { .. } | Op::Flush => {}
    }
}

fn slices(size: u64, block: u64, workers: u64) -> Vec<(u64, u64)> {
    let per = size / workers / block * block;
    (0..workers).map(|w| (w * per, per)).collect()
}

/// One worker: its slice of the namespace and its stream.
struct Job {
    w: u64,
    base: u64,
    len: u64,
    ops: u64,
    seed: u64,
    reset: bool,
}

async fn run_worker(node: Arc<NvmeNode>, job: Job, acked: Arc<AtomicU64>) {
    let Job { w, base, len, ops, seed, reset } = job;
    let block = u64::from(node.limits().request_alignment);
    let mut s = Stream::new(seed, w, base, len, block);
    let mut m = Model::new(base, len, block);
    for i in 0..ops {
        if reset && i == ops / 2 {
            node.reset_controller().unwrap_or_else(|e| fail(format!("reset: {e}")));
            println!("nvme-guest: worker {w} reset the controller after {i} ops");
        }
        let op = s.next();
        match op {
            Op::Write { off, len, fua, seed } => {
                let (r, _) = node.write(off, IoBuf::from_slice(&pattern(seed, len)), WriteFlags { fua }).await;
                r.unwrap_or_else(|e| fail(format!("worker {w} op {i}: write at {off}+{len}: {e}")));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Op::Zero { off, len, unmap } => {
                node.write_zeroes(off, len, ZeroFlags { may_unmap: unmap, ..Default::default() })
                    .await
                    .unwrap_or_else(|e| fail(format!("worker {w} op {i}: write zeroes at {off}+{len}: {e}")));
            }
            Op::Discard { off, len } => {
                node.discard(off, len)
                    .await
                    .unwrap_or_else(|e| fail(format!("worker {w} op {i}: discard at {off}+{len}: {e}")));
            }
            Op::Flush => node.flush().await.unwrap_or_else(|e| fail(format!("worker {w} op {i}: flush: {e}"))),
            Op::Read { off, len } => {
                let (r, b) = node.read(off, IoBuf::new(len)).await;
                r.unwrap_or_else(|e| fail(format!("worker {w} op {i}: read at {off}+{len}: {e}")));
                m.check(off, &b, &format!("worker {w} op {i}: read at {off}+{len}"));
            }
        }
        model_apply(&mut m, &op);
    }
    for (off, len) in m.unknown_ranges() {
        node.write_zeroes(off, len, ZeroFlags::default()).await.unwrap_or_else(|e| fail(format!("final zeroing: {e}")));
        m.set(off, &vec![0; len as usize]);
    }
    // Every byte of the slice, read back in 1 MiB pieces.
    let mut off = base;
    while off < base + len {
        let n = (base + len - off).min(1 << 20) as usize;
        let (r, b) = node.read(off, IoBuf::new(n)).await;
        r.unwrap_or_else(|e| fail(format!("final read at {off}: {e}")));
        m.check(off, &b, &format!("worker {w}: final read at {off}"));
        off += n as u64;
    }
}

fn workload(a: &[String]) {
    let bdf: String = arg(a, 2, "BDF");
    let size: u64 = arg(a, 3, "SIZE");
    let shards: usize = arg(a, 4, "SHARDS");
    let workers: u64 = arg(a, 5, "WORKERS per shard");
    let ops: u64 = arg(a, 6, "OPS");
    let seed: u64 = arg(a, 7, "SEED");
    let reset = a[8..].iter().any(|v| v == "reset");
    let poll = a[8..].iter().any(|v| v == "poll");
    let prp = a[8..].iter().any(|v| v == "prp");
    let rt = Runtime::new(RuntimeConfig { shards, ..Default::default() }).unwrap();
    let b2 = bdf.clone();
    let sgl = prp.then_some(false);
    let node = rt.block_on(move || async move { open(&b2, poll, sgl).await });
    if node.size() < size {
        fail(format!("namespace of {} bytes, asked for {size}", node.size()));
    }
    let block = u64::from(node.limits().request_alignment);
    let acked = Arc::new(AtomicU64::new(0));
    let total = shards as u64 * workers;
    let handles: Vec<_> = slices(size, block, total)
        .into_iter()
        .enumerate()
        .map(|(w, (base, len))| {
            let (n, acked) = (node.clone(), acked.clone());
            let shard = w % shards;
            rt.spawn_on(shard, move || async move {
                let job = Job { w: w as u64, base, len, ops, seed, reset: reset && w == 0 };
                run_worker(n.clone(), job, acked).await;
                n.flush().await.unwrap_or_else(|e| fail(format!("final flush: {e}")));
                n.queue_stats()
            })
        })
        .collect();
    let mut qids = std::collections::BTreeSet::new();
    let (mut completed, mut resubmitted) = (0, 0);
    for h in handles {
        if let Some((q, c, r)) = h.join() {
            if qids.insert(q) {
                completed += c;
                resubmitted += r;
            }
        }
    }
    if qids.len() != shards {
        fail(format!("{shards} shards used {} queue pairs: {qids:?}", qids.len()));
    }
    let info = node.format_specific().unwrap_or_default();
    println!(
        "nvme-guest: workload ok: {total} workers on {shards} queue pairs {qids:?}, {} acknowledged writes, {completed} commands, {resubmitted} resubmitted, {info}",
        acked.load(Ordering::Relaxed)
    );
    // QEMU's controller takes SGLs: the default uses them, `prp` not.
    if info["sgl"].as_bool() != Some(!prp) {
        fail(format!("asked for sgl={}, the node says {}", !prp, info["sgl"]));
    }
    if info["poll"].as_bool() != Some(poll) {
        fail(format!("asked for poll={poll}, the node says {}", info["poll"]));
    }
    if reset && info["resets"].as_u64() != Some(1) {
        fail(format!("asked for one reset, the controller saw {}", info["resets"]));
    }
    drop(rt);
    drop(node);
}

/// Host side: the namespace contents a workload leaves, to OUT.
fn expect(a: &[String]) {
    let size: u64 = arg(a, 2, "SIZE");
    let block: u64 = arg(a, 3, "BLOCK");
    let shards: u64 = arg(a, 4, "SHARDS");
    let workers: u64 = arg(a, 5, "WORKERS");
    let ops: u64 = arg(a, 6, "OPS");
    let seed: u64 = arg(a, 7, "SEED");
    let out: String = arg(a, 8, "OUT");
    let mut image = vec![0u8; size as usize];
    for (w, (base, len)) in slices(size, block, shards * workers).into_iter().enumerate() {
        let mut s = Stream::new(seed, w as u64, base, len, block);
        let mut m = Model::new(base, len, block);
        for _ in 0..ops {
            let op = s.next();
            model_apply(&mut m, &op);
        }
        for (off, len) in m.unknown_ranges() {
            m.set(off, &vec![0; len as usize]);
        }
        image[base as usize..(base + len) as usize].copy_from_slice(&m.data);
    }
    std::fs::write(&out, image).unwrap_or_else(|e| fail(format!("{out}: {e}")));
}

fn identify(a: &[String]) {
    let bdf: String = arg(a, 2, "BDF");
    let node = ringblk_tests::on_shard(move || async move { open(&bdf, false, None).await });
    println!(
        "nvme-guest: identify: size {} block {} {}",
        node.size(),
        node.limits().request_alignment,
        node.format_specific().unwrap_or_default()
    );
}

/// A buffer the device cannot reach is refused before it gets there; a
/// pool buffer (mapped, zero copy) is read into.
fn refuse(a: &[String]) {
    let bdf: String = arg(a, 2, "BDF");
    ringblk_tests::on_shard(move || async move {
        let node = open(&bdf, false, None).await;
        let (r, _) = node.read_zero_copy(0, IoBuf::heap(4096)).await;
        match r {
            Err(e) if e.to_string().contains("not mapped for DMA") => println!("nvme-guest: refused: {e}"),
            Err(e) => fail(format!("a heap buffer failed for another reason: {e}")),
            Ok(()) => fail("a buffer outside every DMA mapping was read into".into()),
        }
        let (r, _) = node.read_zero_copy(0, IoBuf::new(4096)).await;
        r.unwrap_or_else(|e| fail(format!("a pool buffer was refused: {e}")));
        // The bounce path takes the same heap buffer.
        let (r, _) = node.read(0, IoBuf::heap(4096)).await;
        r.unwrap_or_else(|e| fail(format!("a heap buffer did not go through a bounce buffer: {e}")));
        println!("nvme-guest: refuse ok");
    });
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("identify") => identify(&a),
        Some("workload") => workload(&a),
        Some("expect") => expect(&a),
        Some("refuse") => refuse(&a),
        _ => fail("usage: nvme-guest identify|workload|expect|refuse ...".into()),
    }
}
