//! A connection's transmission-phase byte stream on a shard, for the server
//! and the client alike: the socket itself, or the socket under the TLS
//! session the handshake set up. Under TLS every byte is encrypted in user
//! space, so the zero-copy paths (splices) are only for `Wire::Plain`.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::ops::{DerefMut, Range};
use std::os::fd::OwnedFd;

use engine::net::{SendPart, Socket};
use engine::runtime::IoBuf;

/// Ciphertext received per socket read under TLS.
const TLS_RECV: usize = 64 << 10;

pub enum Wire<C> {
    Plain(Socket),
    /// `pending` holds ciphertext received and not yet given to rustls.
    Tls {
        sock: Socket,
        tls: Box<RefCell<C>>,
        pending: RefCell<Vec<u8>>,
    },
}

impl<C, S> Wire<C>
where
    C: DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    /// Take over a negotiated socket and, if the handshake started one, its
    /// TLS session.
    pub fn new(fd: OwnedFd, tls: Option<C>) -> Wire<C> {
        let sock = Socket::new(fd);
        match tls {
            None => Wire::Plain(sock),
            Some(mut t) => {
                t.set_buffer_limit(None);
                Wire::Tls { sock, tls: Box::new(RefCell::new(t)), pending: RefCell::new(Vec::new()) }
            }
        }
    }

    pub fn socket(&self) -> &Socket {
        match self {
            Wire::Plain(s) | Wire::Tls { sock: s, .. } => s,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Wire::Tls { .. })
    }

    /// Receive some bytes into `buf[range]` (decrypted under TLS); Ok(0) at
    /// the end of the stream.
    pub async fn recv(&self, mut buf: IoBuf, range: Range<usize>) -> (io::Result<usize>, IoBuf) {
        let (sock, tls, pending) = match self {
            Wire::Plain(s) => return s.recv(buf, range).await,
            Wire::Tls { sock, tls, pending } => (sock, tls, pending),
        };
        loop {
            {
                let mut t = tls.borrow_mut();
                match t.reader().read(&mut buf[range.clone()]) {
                    Ok(n) => return (Ok(n), buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return (Err(e), buf),
                }
                let mut p = pending.borrow_mut();
                if !p.is_empty() {
                    let mut rd = &p[..];
                    let r = t.read_tls(&mut rd);
                    let used = p.len() - rd.len();
                    p.drain(..used);
                    if let Err(e) = r.and_then(|_| t.process_new_packets().map(drop).map_err(io::Error::other)) {
                        return (Err(e), buf);
                    }
                    continue;
                }
            }
            let (r, tmp) = sock.recv(IoBuf::new(TLS_RECV), 0..TLS_RECV).await;
            match r {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => pending.borrow_mut().extend_from_slice(&tmp[..n]),
                Err(e) => return (Err(e), buf),
            }
        }
    }

    /// Fill `buf[range]` completely; the stream ending first is UnexpectedEof.
    pub async fn recv_exact(&self, mut buf: IoBuf, mut range: Range<usize>) -> (io::Result<()>, IoBuf) {
        if let Wire::Plain(s) = self {
            return s.recv_exact(buf, range).await;
        }
        while !range.is_empty() {
            let (r, b) = self.recv(buf, range.clone()).await;
            buf = b;
            match r {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => range.start += n,
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Send whatever TLS has encrypted and not yet sent.
    async fn flush_tls(&self) -> io::Result<()> {
        let Wire::Tls { sock, tls, .. } = self else {
            return Ok(());
        };
        loop {
            let mut v = Vec::new();
            {
                let mut t = tls.borrow_mut();
                while t.wants_write() {
                    t.write_tls(&mut v)?;
                }
            }
            if v.is_empty() {
                return Ok(());
            }
            sock.send_all(vec![SendPart::Bytes(v)]).await.0?;
        }
    }

    /// Send parts, all of them, in order. Under TLS only parts held in
    /// memory can be sent (the callers never stage file pages then).
    pub async fn send(&self, parts: Vec<SendPart>) -> (io::Result<()>, Vec<SendPart>) {
        match self {
            Wire::Plain(s) => s.send_all(parts).await,
            Wire::Tls { tls, .. } => {
                {
                    let mut t = tls.borrow_mut();
                    for p in &parts {
                        if let Err(e) = t.writer().write_all(p.slice()) {
                            return (Err(e), parts);
                        }
                    }
                }
                (self.flush_tls().await, parts)
            }
        }
    }

    /// End the stream: TLS's close_notify, then shut the socket down.
    pub async fn close(&self) {
        if let Wire::Tls { tls, .. } = self {
            tls.borrow_mut().send_close_notify();
            let _ = self.flush_tls().await;
        }
        self.socket().shutdown();
    }
}
