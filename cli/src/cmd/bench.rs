//! `ringblk bench`: qemu-img bench's workload (count requests of a buffer size at
//! a queue depth, sequential with a step) plus random offsets, several shards, and
//! several I/O backends compared in one run. With no filename it makes a temporary
//! 1 GiB image and compares 4k random reads and writes on every backend. On
//! an NVMe namespace (`/dev/nvmeXnY`) two more contenders: `io_uring_cmd`
//! (NVMe passthrough on /dev/ngXnY) and `vfio` (our userspace driver; the
//! controller is rebound to vfio-pci for that run, which goes last).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use engine::aio::Backend;
use engine::block::{BlockNode, CacheMode, OpenFlags, WriteFlags};
use engine::error::{invalid, Error, Result};
use engine::runtime::{spawn_local, yield_now, IoBuf, Runtime, RuntimeConfig};
use serde_json::json;

use crate::common::{self, OutputFormat};
use crate::OpenArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    open: OpenArgs,
    /// Requests per run
    #[arg(short = 'c')]
    count: Option<u64>,
    /// Requests in flight per shard
    #[arg(short = 'd')]
    depth: Option<u32>,
    /// Flush after this many requests (0: never)
    #[arg(long = "flush-interval", default_value_t = 0)]
    flush_interval: u64,
    /// I/O backend (threads, native, io_uring; on an NVMe namespace also
    /// io_uring_cmd and vfio)
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Several backends to compare: e.g. threads,native,io_uring,io_uring_cmd,vfio
    #[arg(long = "aio", value_delimiter = ',')]
    aio_list: Vec<String>,
    /// Bypass the host page cache (cache=none)
    #[arg(short = 'n')]
    nocache: bool,
    /// Do not wait for in-flight requests before a flush
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// First offset
    #[arg(short = 'o', value_parser = common::parse_size_arg, default_value = "0")]
    offset: u64,
    /// seq or rand (access pattern), or a number (byte written by -w, as qemu-img)
    #[arg(long)]
    pattern: Option<String>,
    #[arg(short = 'q')]
    quiet: bool,
    /// Buffer size per request
    #[arg(short = 's', value_parser = common::parse_size_arg)]
    buffer_size: Option<u64>,
    /// Step between sequential requests (default: the buffer size)
    #[arg(short = 'S', value_parser = common::parse_size_arg)]
    step: Option<u64>,
    /// Cache mode
    #[arg(short = 't')]
    cache: Option<String>,
    /// Write instead of read
    #[arg(short = 'w')]
    write: bool,
    /// Shards (threads) to run on; default one per core
    #[arg(long)]
    shards: Option<usize>,
    /// Busy-poll (SQPOLL) instead of sleeping in the kernel; the vfio run
    /// polls its completion queue (poll=on)
    #[arg(long)]
    poll: bool,
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    filename: Option<String>,
}

#[derive(Clone)]
struct Workload {
    write: bool,
    count: u64,
    depth: u32,
    bufsize: u64,
    offset: u64,
    step: u64,
    random: bool,
    fill: u8,
    flush_interval: u64,
    no_drain: bool,
}

/// What one run goes through: an aio backend of the file drivers, or one
/// of the NVMe paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Aio(Backend),
    UringCmd,
    Vfio,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Aio(b) => b.name(),
            Contender::UringCmd => "io_uring_cmd",
            Contender::Vfio => "vfio",
        }
    }
    fn parse(s: &str) -> Result<Contender> {
        match s {
            "io_uring_cmd" => Ok(Contender::UringCmd),
            "vfio" => Ok(Contender::Vfio),
            s => s.parse().map(Contender::Aio).map_err(|_| {
                invalid(format!("invalid aio mode '{s}': expected threads, native, io_uring, io_uring_cmd or vfio"))
            }),
        }
    }
}

struct Outcome {
    backend: Contender,
    cache: String,
    workload: Workload,
    shards: usize,
    seconds: f64,
}

impl Outcome {
    fn iops(&self) -> f64 {
        self.workload.count as f64 / self.seconds
    }
    fn mib_s(&self) -> f64 {
        self.iops() * self.workload.bufsize as f64 / (1 << 20) as f64
    }
    fn json(&self) -> serde_json::Value {
        json!({
            "backend": self.backend.name(),
            "cache": self.cache,
            "op": if self.workload.write { "write" } else { "read" },
            "pattern": if self.workload.random { "rand" } else { "seq" },
            "requests": self.workload.count,
            "buffer-size": self.workload.bufsize,
            "depth": self.workload.depth,
            "shards": self.shards,
            "seconds": self.seconds,
            "iops": self.iops().round(),
            "mib-per-sec": (self.mib_s() * 10.0).round() / 10.0,
        })
    }
}

/// Per-shard request loop: `depth` tasks pull request numbers from one counter.
async fn shard_run(node: Arc<dyn BlockNode>, w: Workload, shard: u64, shards: u64) -> Result<()> {
    let mine = w.count / shards + u64::from(shard < w.count % shards);
    let next = Rc::new(Cell::new(0u64));
    let err: Rc<Cell<Option<Error>>> = Rc::new(Cell::new(None));
    let inflight = Rc::new(Cell::new(0u32));
    let draining = Rc::new(Cell::new(0u32));
    let span = node.size().saturating_sub(w.offset);
    if span < w.bufsize {
        return Err(invalid("image too small for the requested buffer size and offset"));
    }
    let positions = (span - w.bufsize) / w.step + 1;
    let mut tasks = Vec::new();
    for t in 0..w.depth {
        let (node, w, next, err) = (node.clone(), w.clone(), next.clone(), err.clone());
        let (inflight, draining) = (inflight.clone(), draining.clone());
        tasks.push(spawn_local(async move {
            let mut buf = IoBuf::new(w.bufsize as usize);
            buf.fill(w.fill);
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (shard << 32 | u64::from(t)).wrapping_mul(0x2545_f491_4f6c_dd1d);
            loop {
                let i = next.get();
                if i >= mine {
                    return;
                }
                next.set(i + 1);
                let pos = if w.random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % positions
                } else {
                    (i * shards + shard) % positions
                };
                let off = w.offset + pos * w.step;
                while draining.get() > 0 {
                    yield_now().await;
                }
                inflight.set(inflight.get() + 1);
                let (r, b) = if w.write { node.write(off, buf, WriteFlags::default()).await } else { node.read(off, buf).await };
                buf = b;
                inflight.set(inflight.get() - 1);
                let r = match r {
                    Ok(()) if w.flush_interval > 0 && (i + 1) % w.flush_interval == 0 => {
                        // Drain (unless --no-drain): hold new requests and let the
                        // ones in flight finish before the flush, as qemu-img does.
                        if !w.no_drain {
                            draining.set(draining.get() + 1);
                            while inflight.get() > 0 {
                                yield_now().await;
                            }
                        }
                        let r = node.flush().await;
                        if !w.no_drain {
                            draining.set(draining.get() - 1);
                        }
                        r
                    }
                    r => r,
                };
                if let Err(e) = r {
                    err.set(Some(e));
                    next.set(mine);
                    return;
                }
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    match err.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn run_one(spec: &engine::options::OptionTree, flags: OpenFlags, w: &Workload, shards: usize, poll: bool) -> Result<f64> {
    let rt = Runtime::new(RuntimeConfig { shards, poll, ..Default::default() })?;
    let spec = spec.clone();
    let node = rt.block_on(move || async move { common::open(spec, flags).await })?;
    let start = Instant::now();
    let hs: Vec<_> = (0..rt.shards())
        .map(|s| {
            let (node, w, n) = (node.clone(), w.clone(), rt.shards() as u64);
            rt.spawn_on(s, move || shard_run(node, w, s as u64, n))
        })
        .collect();
    let results: Vec<Result<()>> = hs.into_iter().map(|h| h.join()).collect();
    let secs = start.elapsed().as_secs_f64();
    for r in results {
        r?;
    }
    if w.write {
        rt.block_on(move || async move {
            node.flush().await?;
            node.close().await
        })?;
    }
    Ok(secs)
}

/// `driver=raw,file.driver=DRIVER,file.K=V...`
fn nvme_spec(driver: &str, kv: &[(&str, &str)]) -> engine::options::OptionTree {
    let mut t = engine::options::OptionTree::new();
    t.set("driver", "raw");
    t.set("file.driver", driver);
    for (k, v) in kv {
        t.set(&format!("file.{k}"), *v);
    }
    t
}

/// The temporary image of the default run: 1 GiB of non-zero data.
fn make_default_image() -> Result<tempfile::TempPath> {
    use std::io::Write;
    let mut f = tempfile::Builder::new().prefix("ringblk-bench-").suffix(".raw").tempfile().map_err(|e| Error::os("creating temporary image", e))?;
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1).collect();
    for _ in 0..1024 {
        f.write_all(&block).map_err(|e| Error::os("writing temporary image", e))?;
    }
    f.flush().map_err(|e| Error::os("writing temporary image", e))?;
    // Write it back now, so the kernel's writeback of our setup does not land
    // in the middle of one backend's run and skew the comparison.
    f.as_file().sync_all().map_err(|e| Error::os("syncing temporary image", e))?;
    Ok(f.into_temp_path())
}

pub fn run(a: BenchArgs) -> i32 {
    match bench(a) {
        Ok(()) => 0,
        Err(e) => common::fail(e),
    }
}

fn bench(a: BenchArgs) -> Result<()> {
    common::objects(&a.open)?;
    let default_run = a.filename.is_none();
    let _tmp;
    let filename = match &a.filename {
        Some(f) => f.clone(),
        None => {
            if !a.quiet && a.output == OutputFormat::Human {
                eprintln!("No image given: benchmarking a temporary 1 GiB raw image (4k random reads and writes, every backend).");
            }
            let p = make_default_image()?;
            let s = p.to_string_lossy().into_owned();
            _tmp = p;
            s
        }
    };
    let (random, fill) = match a.pattern.as_deref() {
        None => (default_run, 0xa5),
        Some("rand") | Some("random") => (true, 0xa5),
        Some("seq") | Some("sequential") => (false, 0xa5),
        Some(n) => (false, n.parse::<u8>().map_err(|_| invalid(format!("Invalid pattern specified: '{n}'")))?),
    };
    let mut backends: Vec<Contender> = if !a.aio_list.is_empty() {
        a.aio_list.iter().map(|s| Contender::parse(s)).collect::<Result<_>>()?
    } else if let Some(i) = &a.aio {
        vec![Contender::parse(i)?]
    } else if default_run {
        Backend::ALL.iter().map(|&b| Contender::Aio(b)).collect()
    } else {
        vec![Contender::Aio(Backend::IoUring)]
    };
    // The vfio run takes the controller from the kernel: it goes last, so
    // the others find their block device.
    backends.sort_by_key(|c| *c == Contender::Vfio);
    let nvme = if backends.iter().any(|c| matches!(c, Contender::UringCmd | Contender::Vfio)) {
        Some(super::bench_nvme::namespace_of(&filename)?)
    } else {
        None
    };
    let cache_name = match (&a.cache, a.nocache) {
        (Some(c), _) => c.clone(),
        (None, true) => "none".into(),
        (None, false) => "writeback".into(),
    };
    let cache: CacheMode = cache_name.parse()?;
    let bufsize = a.buffer_size.unwrap_or(4096);
    if bufsize == 0 {
        return Err(invalid("buffer size must be greater than zero"));
    }
    let base = Workload {
        write: a.write,
        count: a.count.unwrap_or(if default_run { 400_000 } else { 75_000 }),
        depth: a.depth.unwrap_or(if default_run { 32 } else { 64 }),
        bufsize,
        offset: a.offset,
        step: a.step.unwrap_or(bufsize).max(1),
        random,
        fill,
        flush_interval: a.flush_interval,
        no_drain: a.no_drain,
    };
    let ops: Vec<bool> = if default_run { vec![false, true] } else { vec![a.write] };
    let shards = a.shards.unwrap_or_else(|| RuntimeConfig::default().shards);
    let spec = common::image_spec(&filename, a.open.format.as_deref().or(default_run.then_some("raw")), a.open.image_opts)?;
    let mut outcomes = Vec::new();
    for &write in &ops {
        for &backend in &backends {
            let mut w = base.clone();
            w.write = write;
            // Linux AIO is only asynchronous with O_DIRECT; QEMU refuses it
            // otherwise. The NVMe paths have no page cache.
            let direct = matches!(backend, Contender::Aio(Backend::Native) | Contender::UringCmd | Contender::Vfio);
            let (cache, cname) = if direct && !cache.direct {
                (CacheMode { direct: true, ..cache }, "none".to_string())
            } else {
                (cache, cache_name.clone())
            };
            if backends.len() == 1 && ops.len() == 1 && !a.quiet && a.output == OutputFormat::Human {
                if w.random {
                    println!("Sending {} random {} requests, {} bytes each, {} in parallel", w.count, if write { "write" } else { "read" }, w.bufsize, w.depth);
                } else {
                    println!(
                        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
                        w.count, if write { "write" } else { "read" }, w.bufsize, w.depth, w.offset, w.step
                    );
                }
            }
            let aio = match backend {
                Contender::Aio(b) => b,
                _ => Backend::IoUring,
            };
            let flags = OpenFlags { write, aio, cache, force_share: a.open.force_share, ..Default::default() };
            let (spec, _binding) = match (backend, &nvme) {
                (Contender::UringCmd, Some(ns)) => (nvme_spec("nvme-passthru", &[("filename", &ns.generic)]), None),
                (Contender::Vfio, Some(ns)) => {
                    let binding = super::bench_nvme::VfioBinding::bind(ns)?;
                    let nsid = ns.nsid.to_string();
                    let poll = if a.poll { "on" } else { "off" };
                    let s = nvme_spec("nvme", &[("device", &ns.bdf), ("namespace", &nsid), ("poll", poll)]);
                    (s, Some(binding))
                }
                _ => (spec.clone(), None),
            };
            // SQPOLL is the io_uring paths' polling; the vfio run polls its
            // own queue (poll=on) instead.
            let sqpoll = a.poll && backend != Contender::Vfio;
            let seconds = run_one(&spec, flags, &w, shards, sqpoll)?;
            outcomes.push(Outcome { backend, cache: cname, workload: w, shards, seconds });
        }
    }
    if a.output == OutputFormat::Json {
        println!("{}", super::info::to_qemu_json(&serde_json::Value::Array(outcomes.iter().map(Outcome::json).collect())));
        return Ok(());
    }
    if a.quiet {
        return Ok(());
    }
    if outcomes.len() == 1 {
        println!("Run completed in {:.3} seconds.", outcomes[0].seconds);
        return Ok(());
    }
    println!("{:<10} {:<10} {:<6} {:<5} {:>6} {:>6} {:>10} {:>10} {:>9}", "backend", "cache", "op", "pat", "shards", "depth", "requests", "IOPS", "MiB/s");
    for o in &outcomes {
        println!(
            "{:<10} {:<10} {:<6} {:<5} {:>6} {:>6} {:>10} {:>10.0} {:>9.1}",
            o.backend.name(),
            o.cache,
            if o.workload.write { "write" } else { "read" },
            if o.workload.random { "rand" } else { "seq" },
            o.shards,
            o.workload.depth,
            o.workload.count,
            o.iops(),
            o.mib_s()
        );
    }
    Ok(())
}
