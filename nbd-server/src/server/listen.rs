//! Accepting connections: the listening sockets (TCP, unix, or inherited by
//! systemd socket activation), the `-e` limit on clients, a thread per
//! negotiation, and handing each negotiated connection to a shard in turn.
//! Ends when a signal asks, or (without `-t`) when the last client leaves.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use engine::runtime::Runtime;

use super::{conn, handshake, Server};

/// How the accept loop behaves.
pub struct ListenOpts {
    /// `-e`: most clients at once (0: no limit).
    pub shared: usize,
    /// `-t`: keep serving after the last client leaves.
    pub persistent: bool,
}

/// The wake-up channel of the accept loop: signals and ending connections
/// write a byte to it.
pub struct Waker {
    rx: UnixStream,
    tx: UnixStream,
}

impl Waker {
    pub fn new() -> std::io::Result<Waker> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Waker { rx, tx })
    }

    /// A second handle to the writing end (for signal handlers).
    pub fn sender(&self) -> std::io::Result<UnixStream> {
        self.tx.try_clone()
    }

    fn wake(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!((&self.rx).read(&mut b), Ok(n) if n > 0) {}
    }
}

struct State {
    active: AtomicUsize,
    /// Clients that reached transmission (for the exit without -t).
    served: AtomicUsize,
    /// A dup of every live client socket, to shut them down at exit.
    sockets: Mutex<Vec<(u64, OwnedFd)>>,
}

/// Accept and serve until `stop` is set (by a signal, which also wakes the
/// loop) or, without -t, until the last client that negotiated has left.
pub fn run(
    server: Arc<Server>,
    rt: &Runtime,
    listeners: &[OwnedFd],
    opts: &ListenOpts,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
) {
    let st =
        Arc::new(State { active: AtomicUsize::new(0), served: AtomicUsize::new(0), sockets: Mutex::new(Vec::new()) });
    let mut next_shard = 0usize;
    let mut next_id = 0u64;
    loop {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let active = st.active.load(Ordering::Acquire);
        if !opts.persistent && active == 0 && st.served.load(Ordering::Acquire) > 0 {
            break;
        }
        let accepting = opts.shared == 0 || active < opts.shared;
        let mut fds = vec![libc::pollfd { fd: waker.rx.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if accepting {
            fds.extend(listeners.iter().map(|l| libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 }));
        }
        // SAFETY: fds is a live array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            waker.drain();
        }
        for p in &fds[1..] {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            let Some(fd) = accept(p.fd) else { continue };
            if opts.shared != 0 && st.active.load(Ordering::Acquire) >= opts.shared {
                // Over the limit (several listeners were ready at once): the
                // client sees the connection close.
                continue;
            }
            let peer = peer_name(&fd);
            server.log(format!("{peer}: connected"));
            crate::stream::set_nodelay(&fd);
            st.active.fetch_add(1, Ordering::AcqRel);
            next_id += 1;
            let id = next_id;
            if let Ok(d) = fd.try_clone() {
                st.sockets.lock().unwrap_or_else(|e| e.into_inner()).push((id, d));
            }
            let shard = rt.handle(next_shard);
            next_shard = next_shard.wrapping_add(1);
            let (server2, st2, waker) = (server.clone(), st.clone(), waker.clone());
            let spawned = std::thread::Builder::new().name("nbd-handshake".into()).spawn(move || {
                let (server, st) = (server2, st2);
                let end = move |st: &State| {
                    st.sockets.lock().unwrap_or_else(|e| e.into_inner()).retain(|(i, _)| *i != id);
                    st.active.fetch_sub(1, Ordering::AcqRel);
                    waker.wake();
                };
                match handshake::negotiate(&server, fd, &peer) {
                    Ok(Some(n)) => {
                        server.log(format!("{peer}: negotiated, serving on shard {}", shard.index()));
                        st.served.fetch_add(1, Ordering::AcqRel);
                        let srv = server.clone();
                        // The shard counts the connection out when it ends;
                        // this thread is done.
                        drop(shard.spawn(move || async move {
                            conn::serve(srv.clone(), n).await;
                            srv.log(format!("{peer}: disconnected"));
                            end(&st);
                        }));
                        return;
                    }
                    Ok(None) => server.log(format!("{peer}: left during negotiation")),
                    Err(e) => server.log(format!("{peer}: negotiation failed: {e}")),
                }
                end(&st);
            });
            if spawned.is_err() {
                server.log("cannot start a thread for a new client; dropping it");
                st.active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
    // Stop every client: their receives end and their tasks finish.
    for (_, s) in st.sockets.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        // SAFETY: shutdown on a socket fd we own (a dup of the client's).
        unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
    }
    while st.active.load(Ordering::Acquire) > 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn accept(listener: RawFd) -> Option<OwnedFd> {
    // SAFETY: accept4 with null address arguments; the result is checked.
    let fd = unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    // SAFETY: a new fd owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn peer_name(fd: &OwnedFd) -> String {
    // SAFETY: sockaddr_storage is plain data; getpeername fills at most len bytes.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(fd.as_raw_fd(), (&mut ss as *mut libc::sockaddr_storage).cast(), &mut len) != 0 {
            return "client".into();
        }
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let a = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                format!("{}:{}", std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port))
            }
            libc::AF_INET6 => {
                let a = &*(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                format!("[{}]:{}", std::net::Ipv6Addr::from(a.sin6_addr.s6_addr), u16::from_be(a.sin6_port))
            }
            _ => "unix client".into(),
        }
    }
}
