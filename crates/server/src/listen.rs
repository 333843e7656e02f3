//! The NBD listening socket and the thread that accepts on it.
//!
//! # Why accept is not on the ring
//! An accept (or poll) queued on io_uring holds a reference to the listening socket
//! until the kernel reaps the request. When the process is killed, the ring is torn
//! down asynchronously, after the process is gone: for milliseconds the dead server's
//! socket is still in LISTEN and a restart on the same port fails with EADDRINUSE
//! (`SO_REUSEADDR` does not help against a listener). So one plain thread accepts with
//! `poll` + `accept4` and hands each connection to reactor 0 ([`Acceptor`]): the last
//! reference to the listener is a descriptor of this process, closed synchronously by
//! `exit` or by [`Acceptor::stop`]. Connections themselves stay on the rings.
//!
//! # Ownership
//! [`bind`] returns a [`Bound`] listener; [`Acceptor::start`] moves it into the accept
//! thread, which drops it when it exits. Dropping a [`Bound`] closes the socket and, for
//! a Unix socket, removes the socket file if it is still the one we bound (never a file
//! someone put there since).
//!
//! # Back-pressure
//! When reactor 0's inbox is full, the accept thread waits for room and accepts nothing
//! meanwhile: new clients wait in the kernel's backlog instead of being dropped.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType};
use ringblk_reactor::{Reactor, ReactorHandle, SendError};

/// Where to listen for NBD clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|e| format!("invalid listen address {s:?} ({e}); use ADDR:PORT or unix:PATH"))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listening socket, bound and listening, not yet accepted on.
#[derive(Debug)]
pub struct Bound {
    sock: Sock,
    /// The address actually bound (port 0 resolved).
    pub addr: ListenAddr,
    /// (dev, ino) of the Unix socket file we created, so that only it is removed.
    unix_file: Option<(u64, u64)>,
}

#[derive(Debug)]
enum Sock {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let (ListenAddr::Unix(p), Some(id)) = (&self.addr, self.unix_file) {
            if file_id(p) == Some(id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds and listens on `addr`. TCP: `SO_REUSEADDR`, so that the previous server's
/// connections on the port (in TIME_WAIT, or still open in a dying ring) do not block
/// a restart (without it, the restart test fails at once); backlog SOMAXCONN, so a
/// burst of clients waits in the kernel rather than being refused.
/// Unix: a stale socket file at the path (nothing accepts on it) is replaced; a live
/// socket or anything that is not a socket is an error that names the path, and is
/// left as it is. Errors are operator messages.
pub fn bind(addr: &ListenAddr) -> Result<Bound, String> {
    let shown = addr.to_string();
    let (sock, addr, unix_file) = match addr {
        ListenAddr::Tcp(a) => {
            let l = bind_tcp(a).map_err(|e| match e.raw_os_error() {
                Some(libc::EADDRINUSE) => format!(
                    "cannot listen on {shown}: {e}: another process listens there; stop it \
                     or choose another --listen address"
                ),
                _ => format!("cannot listen on {shown}: {e}"),
            })?;
            let local = l
                .local_addr()
                .map_err(|e| format!("cannot listen on {shown}: {e}"))?;
            if !a.ip().is_loopback() {
                tracing::warn!(addr = %local, "listening on a non-loopback address: NBD has no authentication");
            }
            (Sock::Tcp(l), ListenAddr::Tcp(local), None)
        }
        ListenAddr::Unix(p) => {
            if let Some(why) = unix_path_problem(p) {
                return Err(format!("cannot listen on {shown}: {why}"));
            }
            remove_stale_socket(p)?;
            let l = UnixListener::bind(p).map_err(|e| format!("cannot listen on {shown}: {e}"))?;
            let id = file_id(p);
            (Sock::Unix(l), addr.clone(), id)
        }
    };
    let bound = Bound {
        sock,
        addr,
        unix_file,
    };
    // Non-blocking: a client that resets between the epoll wakeup and accept must not
    // block the accept thread (it could not see a stop then).
    match &bound.sock {
        Sock::Tcp(l) => l.set_nonblocking(true),
        Sock::Unix(l) => l.set_nonblocking(true),
    }
    .map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    Ok(bound)
}

fn bind_tcp(a: &SocketAddr) -> io::Result<TcpListener> {
    let family = match a {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match a {
        SocketAddr::V4(v4) => socket::bind(fd.as_raw_fd(), &socket::SockaddrIn::from(*v4))?,
        SocketAddr::V6(v6) => socket::bind(fd.as_raw_fd(), &socket::SockaddrIn6::from(*v6))?,
    }
    socket::listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

/// Why a Unix socket cannot be bound at `p` (`None`: it can), without changing
/// anything: a live socket, or a file that is not a socket, is never replaced; a stale
/// socket (nothing accepts on it) will be. Shared with the start's checks of the RPC
/// socket path.
pub fn unix_path_problem(p: &Path) -> Option<String> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(e.to_string()),
        Ok(m) if !m.file_type().is_socket() => Some(
            "it exists and is not a socket; only a stale socket there is replaced: \
             move it away or choose another path"
                .into(),
        ),
        Ok(_) => match UnixStream::connect(p) {
            Ok(_) => Some("another server is listening on it".into()),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => None,
            Err(e) => Some(format!("probing it: {e}")),
        },
    }
}

/// Removes `p` if it is a socket nothing accepts on (left by a killed server).
fn remove_stale_socket(p: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() => {
            tracing::info!(path = %p.display(), "removing a stale NBD socket");
            match std::fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(format!(
                    "cannot remove the stale socket {}: {e}",
                    p.display()
                )),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

impl Bound {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.sock {
            Sock::Tcp(l) => l.as_fd(),
            Sock::Unix(l) => l.as_fd(),
        }
    }

    fn accept(&self) -> io::Result<OwnedFd> {
        match &self.sock {
            Sock::Tcp(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
            Sock::Unix(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
        }
    }
}

/// Runs on reactor 0 with each accepted connection.
pub type Deliver = Arc<dyn Fn(&mut Reactor, OwnedFd) + Send + Sync>;

/// The accept thread. [`Acceptor::stop`] (or dropping it) stops it and closes the
/// listener before it returns.
pub struct Acceptor {
    /// Written once to wake the thread's poll for a stop.
    wake: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// How long one wait for room in reactor 0's inbox lasts before the stop flag is
/// looked at again.
const HANDOFF_WAIT: Duration = Duration::from_millis(100);
/// Pause after an accept error such as EMFILE, which would otherwise spin.
const ERROR_PAUSE: Duration = Duration::from_millis(100);
const LISTENER_TOKEN: u64 = 0;
const WAKE_TOKEN: u64 = 1;

impl Acceptor {
    /// Starts accepting on `l`; every connection runs `deliver` on `to`.
    pub fn start(l: Bound, to: ReactorHandle, deliver: Deliver) -> io::Result<Acceptor> {
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                accept_loop(&l, &wake_rx, &to, &deliver);
                drop(l); // closes the listener before stop() returns
            })?;
        Ok(Acceptor {
            wake: Some(OwnedFd::from(wake_tx)),
            thread: Some(thread),
        })
    }

    /// Stops accepting and closes the listener (idempotent).
    pub fn stop(&mut self) {
        // Closing our end makes the thread's poll see the pair hang up.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("nbd-accept thread panicked");
            }
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(l: &Bound, wake: &UnixStream, to: &ReactorHandle, deliver: &Deliver) {
    let epoll = match new_epoll(l, wake) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot wait on the NBD listener; not accepting");
            return;
        }
    };
    let mut events = [EpollEvent::empty(); 2];
    loop {
        match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "epoll on the NBD listener failed; not accepting");
                return;
            }
        }
        if stopped(wake) {
            return;
        }
        match l.accept() {
            Ok(sock) => {
                if !hand_over(sock, wake, to, deliver) {
                    return;
                }
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                _ => {
                    tracing::warn!(error = %e, "accept failed");
                    // A pause instead of spinning on EMFILE (level-triggered epoll).
                    std::thread::sleep(ERROR_PAUSE);
                }
            },
        }
    }
}

fn new_epoll(l: &Bound, wake: &UnixStream) -> nix::Result<Epoll> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(l.fd(), EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN))?;
    epoll.add(wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
    Ok(epoll)
}

/// Whether [`Acceptor::stop`] closed the other end of the (non-blocking) wake pair.
fn stopped(mut wake: &UnixStream) -> bool {
    use std::io::Read;
    match wake.read(&mut [0u8; 1]) {
        Err(e) => e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted,
        // 0: EOF. Nothing is ever written to the pair, so any byte also means stop.
        Ok(_n) => true,
    }
}

/// Queues `sock` for reactor 0, waiting while its inbox is full. `false`: stop now.
fn hand_over(sock: OwnedFd, wake: &UnixStream, to: &ReactorHandle, deliver: &Deliver) -> bool {
    // A refused message is dropped by `send_blocking`; the socket stays in the slot
    // for the next try.
    let slot = Arc::new(Mutex::new(Some(sock)));
    loop {
        let (s, d) = (slot.clone(), deliver.clone());
        let msg = move |r: &mut Reactor| {
            let sock = s.lock().ok().and_then(|mut g| g.take());
            if let Some(sock) = sock {
                d(r, sock);
            }
        };
        match to.send_blocking(msg, HANDOFF_WAIT) {
            Ok(()) => return true,
            Err(SendError::Full) if !stopped(wake) => {}
            // Stopping: the connection closes with the slot.
            Err(_) => return false,
        }
    }
}
