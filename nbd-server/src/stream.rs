//! Blocking byte streams for the handshake phase (server and client): a
//! socket fd, or the same socket under TLS. Negotiation is a few small
//! messages per connection and runs on its own thread with socket timeouts;
//! transmission moves the fd (and the TLS state) onto a shard's ring.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// A connected stream socket read and written with plain syscalls.
pub struct FdStream(pub OwnedFd);

impl Read for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: reads at most buf.len() bytes into buf.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Write for FdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: sends at most buf.len() bytes from buf; MSG_NOSIGNAL turns
            // a closed peer into EPIPE instead of killing the process.
            let n = unsafe { libc::send(self.0.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FdStream {
    /// Bound every read and write (None: wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => libc::timeval {
                tv_sec: d.as_secs() as libc::time_t,
                tv_usec: d.subsec_micros().max(1) as libc::suseconds_t,
            },
            None => libc::timeval { tv_sec: 0, tv_usec: 0 },
        };
        for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: setsockopt with a live timeval of the right size.
            let r = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Set TCP_NODELAY on a TCP socket (replies are small and latency-bound);
/// harmless failure on unix sockets.
pub fn set_nodelay(fd: &OwnedFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a live int of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// The handshake's stream: plain until STARTTLS, then TLS.
pub enum HsStream<C> {
    Plain(FdStream),
    Tls(Box<rustls::StreamOwned<C, FdStream>>),
    /// Moved out (while being upgraded to TLS).
    Closed,
}

impl<C> HsStream<C> {
    /// The socket under the stream.
    pub fn fd(&self) -> io::Result<&FdStream> {
        match self {
            HsStream::Plain(s) => Ok(s),
            HsStream::Tls(t) => Ok(&t.sock),
            HsStream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// The socket and, if one was started, the TLS session, for transmission.
    pub fn into_parts(self) -> io::Result<(OwnedFd, Option<C>)> {
        match self {
            HsStream::Plain(s) => Ok((s.0, None)),
            HsStream::Tls(t) => {
                let t = *t;
                Ok((t.sock.0, Some(t.conn)))
            }
            HsStream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<C, S> Read for HsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            HsStream::Plain(s) => s.read(buf),
            HsStream::Tls(s) => s.read(buf),
            HsStream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<C, S> Write for HsStream<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            HsStream::Plain(s) => s.write(buf),
            HsStream::Tls(s) => s.write(buf),
            HsStream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            HsStream::Plain(s) => s.flush(),
            HsStream::Tls(s) => s.flush(),
            HsStream::Closed => Ok(()),
        }
    }
}

/// Read and throw away `n` bytes (an option too large to keep), in small
/// pieces so a hostile length costs time, never memory.
pub fn discard(r: &mut impl Read, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let k = (n as usize).min(buf.len());
        r.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}
