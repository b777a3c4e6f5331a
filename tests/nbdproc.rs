//! An NBD server process under test (ringblk-nbd, qemu-nbd or nbdkit) and
//! where it listens; shared by every NBD test file.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bin;

/// Where a server under test listens.
#[derive(Clone, Debug)]
pub enum Via {
    Unix(PathBuf),
    Tcp(u16),
}

impl Via {
    pub fn uri(&self, export: &str) -> String {
        match self {
            Via::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            Via::Tcp(port) => format!("nbd://127.0.0.1:{port}/{export}"),
        }
    }

    /// qemu-nbd/ringblk-nbd flags to listen here.
    pub fn flags(&self) -> Vec<String> {
        match self {
            Via::Unix(p) => vec!["-k".into(), p.display().to_string()],
            Via::Tcp(port) => vec!["-b".into(), "127.0.0.1".into(), "-p".into(), port.to_string()],
        }
    }

    /// `--image-opts` naming this server's export.
    pub fn image_opts(&self, export: &str) -> String {
        match self {
            Via::Unix(p) => format!("driver=nbd,server.type=unix,server.path={},export={export}", p.display()),
            Via::Tcp(port) => {
                format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}")
            }
        }
    }

    /// A connection, if something accepts one here.
    fn connect(&self) -> Option<Box<dyn Read>> {
        match self {
            Via::Unix(p) => std::os::unix::net::UnixStream::connect(p).ok().map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                Box::new(s) as Box<dyn Read>
            }),
            Via::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).ok().map(|s| {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                Box::new(s) as Box<dyn Read>
            }),
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A server process, its stderr in a log file. Stopped with SIGTERM (then
/// SIGKILL) and reaped on drop, which prints the log if the test is failing.
pub struct NbdServer {
    child: Option<Child>,
    pub via: Via,
    log: tempfile::TempPath,
}

impl NbdServer {
    /// Spawn `cmd` (which listens at `via`) and wait, up to 10 s, until a
    /// connection gets the NBD greeting: listening is not enough, as the
    /// socket may be bound before the image is open.
    pub fn spawn(mut cmd: Command, via: Via) -> NbdServer {
        let log = tempfile::Builder::new().prefix("nbd-server-").suffix(".log").tempfile_in("/var/tmp").unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log.reopen().unwrap());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let mut s = NbdServer { child: Some(child), via, log: log.into_temp_path() };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = s.child_mut().try_wait() {
                panic!("server exited ({st}) before listening: {}", s.log());
            }
            if let Some(mut c) = s.via.connect() {
                let mut g = [0u8; 18];
                c.read_exact(&mut g).unwrap_or_else(|e| panic!("no greeting from the server: {e}: {}", s.log()));
                assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT", "greeting");
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "server did not listen within 10 s: {}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `program` listening at `via`, with `args` after the listening flags.
    pub fn start(program: impl AsRef<std::ffi::OsStr>, via: Via, args: &[&str]) -> NbdServer {
        let mut cmd = Command::new(program);
        cmd.args(via.flags()).args(args);
        NbdServer::spawn(cmd, via)
    }

    /// `ringblk-nbd` listening at `via`.
    pub fn ringblk(via: Via, args: &[&str]) -> NbdServer {
        NbdServer::start(bin("ringblk-nbd"), via, args)
    }

    pub fn uri(&self, export: &str) -> String {
        self.via.uri(export)
    }

    /// The unix socket it listens on.
    pub fn sock(&self) -> &Path {
        match &self.via {
            Via::Unix(p) => p,
            Via::Tcp(_) => panic!("this server listens on TCP"),
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("server not stopped yet")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not stopped yet").id()
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server has not exited (nor panicked in a way that killed it).
    #[track_caller]
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child_mut().try_wait() {
            panic!("server exited ({st}): {}", self.log());
        }
    }

    /// A numeric field of /proc/PID/status ("VmRSS" in KiB, "Threads").
    pub fn status(&self, key: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = s.lines().find(|l| l.starts_with(&format!("{key}:"))).unwrap_or_else(|| panic!("no {key} in {s}"));
        line[key.len() + 1..].split_whitespace().next().unwrap().parse().unwrap()
    }

    pub fn rss_mib(&self) -> u64 {
        self.status("VmRSS") / 1024
    }

    /// The end of a test: the server must still be running, must exit
    /// cleanly on SIGTERM within 10 s, and no thread of it may have
    /// panicked. Returns its stderr.
    #[track_caller]
    pub fn stop(mut self) -> String {
        self.assert_alive();
        let st = terminate(self.child.take().expect("server not stopped yet"));
        let log = self.log();
        let st = st.unwrap_or_else(|| panic!("server did not exit within 10 s of SIGTERM: {log}"));
        assert!(st.success(), "server exited with {st} after SIGTERM: {log}");
        assert!(!log.contains("panicked"), "a server thread panicked: {log}");
        log
    }

    /// `stop`, for tests that do not look at the log.
    #[track_caller]
    pub fn finish(self) {
        self.stop();
    }
}

/// SIGTERM, then up to 10 s for the exit (SIGKILL after that: None).
fn terminate(mut child: Child) -> Option<std::process::ExitStatus> {
    // SAFETY: kill on the pid of a child we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
            if std::thread::panicking() {
                eprintln!("--- server log (last lines) ---");
                let log = self.log();
                let lines: Vec<&str> = log.lines().collect();
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}
