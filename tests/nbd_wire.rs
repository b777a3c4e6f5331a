//! Shared by `nbd_tls.rs` and `nbd_hostile.rs` (each includes it with
//! `#[path]`): a bare-bones NBD client on std sockets (the server process
//! guard is the test library's `nbdproc`). The wire constants are written out here from the protocol
//! spec rather than taken from the server's own `proto` module, so a mistake
//! shared by both sides cannot hide.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub use ringblk_tests::nbdproc::{NbdServer, Via};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;

pub const EINVAL: u32 = 22;

/// How long any single socket operation of a test client may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A connection with both directions bounded by IO_TIMEOUT.
pub fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Connect and do the fixed newstyle greeting: check the server's 18 bytes,
/// answer with client flags FIXED_NEWSTYLE | NO_ZEROES.
pub fn greet(sock: &Path) -> UnixStream {
    let mut s = connect(sock);
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("server greeting");
    assert_eq!(be64(&g[0..8]), NBDMAGIC, "greeting magic");
    assert_eq!(be64(&g[8..16]), IHAVEOPT, "newstyle magic");
    let flags = be16(&g[16..18]);
    assert_eq!(flags & 3, 3, "server flags {flags:#x}: fixed newstyle and no zeroes expected");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// An option request: IHAVEOPT, option, length, data.
pub fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// NBD_OPT_GO/INFO data: export name, no information requests.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub opt: u32,
    pub ty: u32,
    pub data: Vec<u8>,
}

pub fn read_option_reply(s: &mut impl Read) -> io::Result<OptReply> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(be64(&h[0..8]), REPLY_MAGIC_OPT, "option reply magic in {h:02x?}");
    let len = be32(&h[16..20]);
    assert!(len <= 1 << 20, "option reply of {len} bytes");
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok(OptReply { opt: be32(&h[8..12]), ty: be32(&h[12..16]), data })
}

/// Wait until the server closes `s`: returns every byte received before
/// EOF (or a reset). Panics if the connection is still open at `within`.
#[track_caller]
pub fn wait_closed(s: &mut UnixStream, within: Duration) -> Vec<u8> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection still open after {within:?} (received {} bytes)", got.len());
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading until close: {e}"),
        }
    }
}

/// A transmission request header (compact form).
pub fn request(ty: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&ty.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

/// A well-behaved client in transmission with simple replies (it never
/// asks for structured replies).
pub struct Client {
    pub s: UnixStream,
    pub size: u64,
    pub tflags: u16,
    next_cookie: u64,
}

impl Client {
    pub fn connect(sock: &Path) -> Client {
        Client::go(greet(sock))
    }

    /// NBD_OPT_GO for the default export on a greeted stream.
    pub fn go(mut s: UnixStream) -> Client {
        s.write_all(&option(OPT_GO, &go_data(""))).unwrap();
        let mut export = None;
        loop {
            let r = read_option_reply(&mut s).expect("reply to NBD_OPT_GO");
            assert_eq!(r.opt, OPT_GO, "reply to the wrong option: {r:?}");
            match r.ty {
                REP_ACK => break,
                REP_INFO => {
                    if be16(&r.data) == INFO_EXPORT {
                        assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                        export = Some((be64(&r.data[2..10]), be16(&r.data[10..12])));
                    }
                }
                t => panic!("NBD_OPT_GO answered {t:#x}: {}", String::from_utf8_lossy(&r.data)),
            }
        }
        let (size, tflags) = export.expect("NBD_INFO_EXPORT before the ACK");
        Client { s, size, tflags, next_cookie: 1 }
    }

    pub fn send(&mut self, ty: u16, flags: u16, offset: u64, len: u32) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.s.write_all(&request(ty, flags, cookie, offset, len)).unwrap();
        cookie
    }

    /// The simple reply to `cookie`: Ok(data of `len` bytes) or Err(errno).
    pub fn reply(&mut self, cookie: u64, len: usize) -> Result<Vec<u8>, u32> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply header");
        assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC, "simple reply magic in {h:02x?}");
        assert_eq!(be64(&h[8..16]), cookie, "reply cookie");
        let err = be32(&h[4..8]);
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).expect("read reply data");
        Ok(data)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.send(CMD_READ, 0, offset, len);
        self.reply(c, len as usize)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), u32> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut v = request(CMD_WRITE, 0, cookie, offset, data.len() as u32).to_vec();
        v.extend_from_slice(data);
        self.s.write_all(&v).unwrap();
        self.reply(cookie, 0).map(drop)
    }

    /// NBD_CMD_DISC; the server then closes without a reply.
    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0);
        let rest = wait_closed(&mut self.s, IO_TIMEOUT);
        assert!(rest.is_empty(), "{} bytes after NBD_CMD_DISC", rest.len());
    }
}
