//! `ringblk-nbd`: export an image over NBD with qemu-nbd's command line, or
//! (`-L`) list a server's exports. Parses flags, opens the image, binds the
//! listeners and runs the accept loop; the protocol lives in the library.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use engine::block::{open_image, BlockNode, CacheMode, OpenCtx, OpenFlags};
use engine::error::{invalid, Result};
use engine::options::OptionTree;
use engine::runtime::{Runtime, RuntimeConfig};

use ringblk_nbd::server::listen::{self, ListenOpts, Waker};
use ringblk_nbd::server::{DetectZeroes, Export, Server, DEFAULT_MAX_REQUEST};
use ringblk_nbd::tls::TlsServer;

const DEFAULT_PORT: u16 = 10809;
const DEFAULT_BIND: &str = "0.0.0.0";

#[derive(Parser)]
#[command(name = "ringblk-nbd", version, about = "Export a disk image over NBD (qemu-nbd compatible)")]
struct Args {
    /// Image to export (image options with --image-opts)
    filename: Option<String>,
    /// --object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off],
    /// authz-simple,id=ID,identity=DN, or secret,id=ID,...
    #[arg(long = "object")]
    objects: Vec<String>,
    /// TCP port to listen on (or to connect to with -L)
    #[arg(short = 'p', long = "port", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Where the export starts in the image
    #[arg(short = 'o', long = "offset", value_parser = parse_size)]
    offset: Option<u64>,
    /// Address to bind to (or connect to with -L)
    #[arg(short = 'b', long = "bind", default_value = DEFAULT_BIND)]
    bind: String,
    /// Use a unix socket at PATH
    #[arg(short = 'k', long = "socket")]
    socket: Option<String>,
    /// Treat FILENAME as image options (driver=...,file.filename=...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Image format (probed when omitted)
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Export read-only
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Offer the qemu:allocation-depth metadata context
    #[arg(short = 'A', long = "allocation-depth")]
    allocation_depth: bool,
    /// Export the persistent dirty bitmap NAME as qemu:dirty-bitmap:NAME
    #[arg(short = 'B', long = "bitmap")]
    bitmap: Vec<String>,
    /// Write to a temporary overlay instead of the image
    #[arg(short = 's', long = "snapshot")]
    snapshot: bool,
    /// Export an internal snapshot read-only
    #[arg(short = 'l', long = "load-snapshot")]
    load_snapshot: Option<String>,
    /// Cache mode: none, writeback (default), writethrough, directsync, unsafe
    #[arg(long = "cache")]
    cache: Option<String>,
    /// Same as --cache=none
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// I/O backend: threads, native or io_uring (default)
    #[arg(long = "aio")]
    aio: Option<String>,
    /// ignore|off (default) or unmap|on: pass trims to the image
    #[arg(long = "discard", default_value = "ignore")]
    discard: String,
    /// off (default), on or unmap: turn writes of zeroes into zero writes
    #[arg(long = "detect-zeroes", default_value = "off")]
    detect_zeroes: String,
    /// Connect the image to the kernel NBD device DEV
    #[arg(short = 'c', long = "connect")]
    connect: Option<String>,
    /// Disconnect the kernel NBD device given as FILENAME
    #[arg(short = 'd', long = "disconnect")]
    disconnect: bool,
    /// Most clients at once (0: no limit)
    #[arg(short = 'e', long = "shared", default_value_t = 1)]
    shared: usize,
    /// Keep running after the last client disconnects
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Export name
    #[arg(short = 'x', long = "export-name", default_value = "")]
    export_name: String,
    /// Export description
    #[arg(short = 'D', long = "description")]
    description: Option<String>,
    /// Seconds a client may take to negotiate (0: no limit)
    #[arg(long = "handshake-limit", default_value_t = 10)]
    handshake_limit: u64,
    /// List the exports of a server (as a client)
    #[arg(short = 'L', long = "list")]
    list: bool,
    /// TLS credentials object id
    #[arg(long = "tls-creds")]
    tls_creds: Option<String>,
    /// Hostname to check the server certificate against (-L)
    #[arg(long = "tls-hostname")]
    tls_hostname: Option<String>,
    /// Authorization object id (authz-simple) clients must match
    #[arg(long = "tls-authz")]
    tls_authz: Option<String>,
    /// Run in the background once the server is listening
    #[arg(long = "fork")]
    fork: bool,
    /// Write the server's process id to PATH
    #[arg(long = "pid-file")]
    pid_file: Option<String>,
    /// Log connections and protocol errors to stderr
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Trace events (accepted for compatibility; ignored)
    #[arg(short = 'T', long = "trace")]
    trace: Option<String>,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    engine::size::parse_size(s).map_err(|e| e.to_string())
}

/// Raise the open-file limit to its hard maximum: a connection holds a few
/// pipes for splicing besides its socket, and the soft limit (often 1024)
/// would cap a server at a few hundred connections. Failure is harmless.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the live local `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    raise_fd_limit();
    let mut args = Args::parse();
    // -c without -k: a private unix socket, as qemu-nbd (never a TCP port
    // open to the network for what is meant to be a local device).
    let private = match private_socket(&mut args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ringblk-nbd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = real_main(args);
    if let Some(dir) = private {
        let _ = std::fs::remove_dir_all(dir);
    }
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ringblk-nbd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: Args) -> Result<ExitCode> {
    engine::objects::define_all(&args.objects)?;
    if args.list {
        let tls = (args.tls_creds.as_deref(), args.tls_hostname.as_deref());
        return ringblk_nbd::list::run(&args.bind, args.port, args.socket.as_deref(), tls).map(|()| ExitCode::SUCCESS);
    }
    if args.disconnect {
        let dev = args.filename.as_deref().ok_or_else(|| invalid("-d needs the device to disconnect"))?;
        return ringblk_nbd::kernel::disconnect(dev).map(|()| {
            println!("{dev} disconnected");
            ExitCode::SUCCESS
        });
    }
    let filename = args.filename.clone().ok_or_else(|| invalid("Expecting one image file name"))?;
    if !args.bitmap.is_empty() {
        return Err(invalid(format!(
            "Bitmap '{}' is not found (persistent bitmaps are not exported yet)",
            args.bitmap[0]
        )));
    }
    if args.load_snapshot.is_some() {
        return Err(invalid("--load-snapshot: internal snapshots cannot be exported yet"));
    }
    let discard = match args.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        d => return Err(invalid(format!("Invalid discard mode '{d}': expected ignore, off, unmap or on"))),
    };
    let detect_zeroes = match args.detect_zeroes.as_str() {
        "off" => DetectZeroes::Off,
        "on" => DetectZeroes::On,
        "unmap" if discard => DetectZeroes::Unmap,
        "unmap" => {
            return Err(invalid(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ))
        }
        d => return Err(invalid(format!("Invalid detect-zeroes mode '{d}': expected off, on or unmap"))),
    };
    let cache: CacheMode = match (&args.cache, args.nocache) {
        (Some(_), true) => return Err(invalid("-n and --cache can only be specified once")),
        (Some(c), false) => c.parse()?,
        (None, true) => "none".parse()?,
        (None, false) => CacheMode::default(),
    };
    let aio = match &args.aio {
        Some(a) => a.parse()?,
        None => engine::aio::Backend::IoUring,
    };
    if args.tls_authz.is_some() && args.tls_creds.is_none() {
        return Err(invalid("--tls-authz is not permitted without --tls-creds"));
    }
    if args.tls_hostname.is_some() {
        return Err(invalid("--tls-hostname is only permitted with --list"));
    }
    let tls = match &args.tls_creds {
        Some(id) => {
            if args.connect.is_some() {
                return Err(invalid("TLS is not supported with a host device"));
            }
            Some(TlsServer::new(id, args.tls_authz.as_deref())?)
        }
        None => None,
    };
    let mut spec = if args.image_opts {
        if args.format.is_some() {
            return Err(invalid("--image-opts and --format are mutually exclusive"));
        }
        OptionTree::parse(&filename, Some("file.filename"))?
    } else if let Some(j) = filename.strip_prefix("json:") {
        OptionTree::from_json(j)?
    } else {
        let mut t = OptionTree::new();
        t.set("file.filename", filename.as_str());
        t
    };
    if let Some(f) = &args.format {
        spec.set_default("driver", f.as_str());
    }

    // Sockets come first: inherited ones (systemd), else the ones we bind.
    let listeners = listeners(&args)?;
    // -c runs in the background unless -v, as qemu-nbd: the parent returns
    // once the device is up (or the server has failed, and said why).
    let ready_pipe = if args.fork || (args.connect.is_some() && !args.verbose) { Some(fork_server()?) } else { None };
    let verbose = args.verbose;
    let release = move || {
        if let Some(fd) = ready_pipe {
            release_parent(fd, verbose);
        }
    };

    // (shards, buffers) sized for a server: pool buffers receive every
    // payload up to 64 KiB and hold every read of that size.
    let rt = Runtime::new(RuntimeConfig { buffers: 256, ..Default::default() })?;
    let flags = OpenFlags { write: !args.read_only, cache, aio, discard_unmap: discard, ..Default::default() };
    let registry = ringblk_nbd::registry();
    let snapshot = args.snapshot;
    let node: Arc<dyn BlockNode> = rt.block_on(move || async move {
        let ctx = OpenCtx::new(registry.clone(), flags.clone());
        if snapshot {
            snapshot_overlay(&ctx, spec).await
        } else {
            open_image(&ctx, spec).await
        }
    })?;
    let size = node.size();
    let offset = args.offset.unwrap_or(0);
    if offset > size {
        return Err(invalid(format!("Offset {offset} is beyond the image's size of {size} bytes")));
    }
    let read_only = args.read_only || node.read_only();
    let export = Arc::new(Export {
        name: args.export_name.clone(),
        description: args.description.clone(),
        node: node.clone(),
        offset,
        size: size - offset,
        read_only,
        allocation_depth: args.allocation_depth,
        // As qemu-nbd: only when several clients may connect at once; a
        // multi-conn client would otherwise wait for connections never accepted.
        multi_conn: args.shared != 1,
        discard,
        detect_zeroes,
        maps: Default::default(),
    });
    let server = Arc::new(Server {
        export,
        tls,
        handshake_limit: (args.handshake_limit > 0).then(|| Duration::from_secs(args.handshake_limit)),
        max_request: DEFAULT_MAX_REQUEST,
        stats: Default::default(),
        verbose: args.verbose,
        shards: rt.shards(),
        serving: Default::default(),
    });

    let stop = Arc::new(AtomicBool::new(false));
    let waker = Arc::new(Waker::new().map_err(|e| engine::Error::os("socketpair", e))?);
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| engine::Error::os("signal", e))?;
        let tx = waker.sender().map_err(|e| engine::Error::os("socketpair", e))?;
        signal_hook::low_level::pipe::register(sig, tx).map_err(|e| engine::Error::os("signal", e))?;
    }
    if let Some(p) = &args.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| engine::Error::os("writing pid file", e).with_file(p.clone()))?;
    }
    let kernel = match &args.connect {
        Some(dev) => {
            let hooks = ringblk_nbd::kernel::Hooks {
                ready: Box::new(release),
                stop: stop.clone(),
                wake: waker.sender().map_err(|e| engine::Error::os("socketpair", e))?,
            };
            Some(ringblk_nbd::kernel::connect(dev, &args.export_name, &listeners, args.socket.as_deref(), hooks)?)
        }
        None => {
            release();
            None
        }
    };
    let opts = ListenOpts { shared: args.shared, persistent: args.persistent };
    listen::run(server.clone(), &rt, &listeners, &opts, waker, stop);
    let device = kernel.map_or(Ok(()), |k| k.finish());

    let n2 = node.clone();
    let closed = rt.block_on(move || async move { n2.close().await });
    drop(rt);
    if let Some(path) = &args.socket {
        let _ = std::fs::remove_file(path);
    }
    if args.verbose || std::env::var_os("RINGBLK_NBD_STATS").is_some() {
        eprintln!("ringblk-nbd: {}", server.stats.line());
    }
    closed?;
    device?;
    Ok(ExitCode::SUCCESS)
}

/// `-s`: a temporary qcow2 overlay over the image, deleted once open.
async fn snapshot_overlay(ctx: &OpenCtx, spec: OptionTree) -> Result<Arc<dyn BlockNode>> {
    let mut ro = ctx.clone();
    ro.flags.write = false;
    let base = open_image(&ro, spec.clone()).await?;
    let size = base.size();
    let fmt = base.driver();
    let base_name =
        base.children().into_iter().find(|c| c.role == "file").map_or_else(|| base.filename(), |c| c.node.filename());
    let base_name = std::fs::canonicalize(&base_name).map_or(base_name, |p| p.to_string_lossy().into_owned());
    drop(base);
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = tempfile_path(&dir);
    let mut opts = OptionTree::new();
    opts.set("size", size.to_string());
    opts.set("backing_file", base_name);
    opts.set("backing_fmt", fmt);
    let qcow2 = ctx.registry.get("qcow2").ok_or_else(|| invalid("qcow2 driver missing"))?;
    qcow2.create(ctx, &tmp, opts).await?;
    let mut o = OptionTree::new();
    o.set("driver", "qcow2");
    o.set("file.filename", tmp.as_str());
    let r = open_image(ctx, o).await;
    let _ = std::fs::remove_file(&tmp);
    r
}

fn tempfile_path(dir: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{dir}/ringblk-nbd-snapshot.{}.{t}", std::process::id())
}

/// The listening sockets: systemd's (LISTEN_PID/LISTEN_FDS), else a unix
/// socket (-k), else TCP on every address `-b` resolves to.
fn listeners(args: &Args) -> Result<Vec<OwnedFd>> {
    if let Some(fds) = socket_activation()? {
        if args.socket.is_some() || args.port != DEFAULT_PORT || args.bind != DEFAULT_BIND {
            return Err(invalid("-k, -p and -b cannot be used with socket activation"));
        }
        return Ok(fds);
    }
    if let Some(path) = &args.socket {
        // A stale socket from an earlier run would make bind fail.
        if std::fs::symlink_metadata(path).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
            let _ = std::fs::remove_file(path);
        }
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| engine::Error::os("Failed to bind socket", e).with_file(path.clone()))?;
        return Ok(vec![l.into()]);
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<_> = (args.bind.as_str(), args.port)
        .to_socket_addrs()
        .map_err(|e| engine::Error::os(&format!("address resolution failed for {}:{}", args.bind, args.port), e))?
        .collect();
    let mut out = Vec::new();
    let mut last = None;
    for a in addrs {
        match std::net::TcpListener::bind(a) {
            Ok(l) => out.push(l.into()),
            Err(e) => last = Some(engine::Error::os(&format!("Failed to bind socket to {a}"), e)),
        }
    }
    match (out.is_empty(), last) {
        (true, Some(e)) => Err(e),
        (true, None) => Err(invalid(format!("no address to bind for {}", args.bind))),
        _ => Ok(out),
    }
}

fn socket_activation() -> Result<Option<Vec<OwnedFd>>> {
    let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: i32 = n.parse().map_err(|_| invalid(format!("invalid LISTEN_FDS '{n}'")))?;
    if !(1..=64).contains(&n) {
        return Err(invalid(format!("LISTEN_FDS={n}: expected 1 to 64 sockets")));
    }
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    // SAFETY: systemd passes fds 3..3+n open and ours; we take each once.
    let fds = (3..3 + n).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect::<Vec<_>>();
    for fd in &fds {
        // SAFETY: fcntl on an fd we now own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(Some(fds))
}

/// `--fork`: the parent waits until the child says it is listening (a byte
/// on a pipe) and exits with success, or failure if the child died first.
/// Returns the child's end of the pipe.
fn fork_server() -> Result<OwnedFd> {
    let mut p = [0i32; 2];
    // SAFETY: pipe2 fills two ints.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(engine::Error::os("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds are new and ours.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    std::io::stdout().flush().ok();
    // SAFETY: no other threads exist yet (the runtime starts after this).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(engine::Error::os("fork", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(wr);
        let mut b = [0u8; 1];
        // SAFETY: reads at most one byte into a live buffer.
        let n = unsafe { libc::read(rd.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        if n == 1 {
            std::process::exit(0);
        }
        // The server failed before it was ready: wait for it to have said
        // why (on the stderr it still shares) and exit as it did.
        let mut status = 0;
        // SAFETY: waits for our own child, writing a live int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        let code = if r == pid && libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 };
        std::process::exit(if code == 0 { 1 } else { code });
    }
    drop(rd);
    // SAFETY: setsid has no arguments.
    unsafe { libc::setsid() };
    // stderr stays until release_parent, so that a failure to start still
    // reaches the terminal.
    null_onto(&[0, 1]);
    Ok(wr)
}

/// Point the standard descriptors `fds` at /dev/null.
fn null_onto(fds: &[i32]) {
    // SAFETY: open, dup2 and close of descriptors, no memory arguments but
    // the NUL-terminated path.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for &fd in fds {
                libc::dup2(null, fd);
            }
            libc::close(null);
        }
    }
}

/// Tell the waiting parent the server is up, and (unless -v) let go of the
/// terminal's stderr.
fn release_parent(fd: OwnedFd, verbose: bool) {
    // SAFETY: writes one byte from a live buffer to the pipe we own.
    unsafe { libc::write(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    if !verbose {
        null_onto(&[2]);
    }
    drop(fd);
}

/// For -c with no -k, -p or -b: a unix socket in a new private folder,
/// which the caller removes at exit.
fn private_socket(args: &mut Args) -> Result<Option<std::path::PathBuf>> {
    let defaults = args.port == DEFAULT_PORT && args.bind == DEFAULT_BIND;
    if args.connect.is_none() || args.socket.is_some() || !defaults || std::env::var_os("LISTEN_FDS").is_some() {
        return Ok(None);
    }
    let template = std::env::temp_dir().join("ringblk-nbd.XXXXXX");
    let mut t = std::ffi::CString::new(template.into_os_string().into_encoded_bytes())
        .map_err(|_| invalid("temporary folder path has a NUL byte"))?
        .into_bytes_with_nul();
    // SAFETY: t is a NUL-terminated template mkdtemp rewrites in place.
    if unsafe { libc::mkdtemp(t.as_mut_ptr().cast()) }.is_null() {
        return Err(engine::Error::os("creating a private socket folder", std::io::Error::last_os_error()));
    }
    t.pop();
    let dir = std::path::PathBuf::from(std::ffi::OsString::from_vec(t));
    args.socket = Some(dir.join("nbd.sock").to_string_lossy().into_owned());
    Ok(Some(dir))
}
