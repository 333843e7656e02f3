//! The control thread of one vhost-user socket: it listens, serves one client at a
//! time with the `vhost` crate's `BackendReqHandler` over our [`Conn`], and after a
//! disconnect stops the queues and accepts the next client (QEMU's `reconnect=`).
//!
//! Layer: the control plane of the vhost front end; imports `device` and the `vhost`
//! crate's backend handler; std's Unix sockets and libc's `poll`/`eventfd`.
//!
//! # Why a thread, and not the reactor
//! Control messages are rare and some block on purpose: GET_VRING_BASE waits until
//! the queue's reactor has drained it. On a thread of its own that wait costs no
//! reactor anything (SPDK splits the same way). We accept with our own
//! `UnixListener` rather than the crate's `BackendListener`, which hands its
//! backend to the first connection only (a second `accept` would find none).
//!
//! # Stopping
//! [`Control::stop`] sets a flag, writes the thread's eventfd (the thread polls it
//! beside the listener and the connection between messages) and shuts the live
//! connection's socket down (waking a read blocked inside a message). The thread
//! then stops the queues (waiting for their drain) and exits; `stop` joins it and
//! removes the socket file if it is still ours.
//!
//! # Errors
//! A message the handler refuses is answered (an error ack under REPLY_ACK) and
//! then the connection is closed: the frontend's view and ours may differ after a
//! refused message, and a clean restart of the protocol is what QEMU does on a
//! disconnect anyway. Nothing a client sends panics this thread.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::device::{Conn, DeviceShared};

/// What wakes the control thread.
struct Stop {
    flag: AtomicBool,
    efd: OwnedFd,
    /// A clone of the live connection's socket, to shut it down on stop.
    conn: Mutex<Option<UnixStream>>,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new
        // descriptor owned by nothing else.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stop {
            flag: AtomicBool::new(false),
            // SAFETY: `fd` is the fresh descriptor from eventfd above.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            conn: Mutex::new(None),
        })
    }

    fn signal(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our eventfd. A failure (the
        // counter is saturated) still leaves it readable, which is all we need.
        unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(c) = self.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn set_conn(&self, c: Option<UnixStream>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }
}

enum Wake {
    Ready,
    Stop,
}

/// Waits until `fd` is readable (or hung up) or the stop eventfd fires.
fn wait(fd: BorrowedFd<'_>, stop: &Stop) -> io::Result<Wake> {
    loop {
        if stop.is_set() {
            return Ok(Wake::Stop);
        }
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll reads and writes the two pollfd structs of the local array,
        // whose length it is given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 || stop.is_set() {
            return Ok(Wake::Stop);
        }
        if fds[0].revents != 0 {
            return Ok(Wake::Ready);
        }
    }
}

/// A bound socket and the identity of its file (to remove only our own).
pub(crate) struct Bound {
    listener: UnixListener,
    dev_ino: (u64, u64),
}

/// Why a socket path cannot be used, or `None` (free, or a stale socket we may
/// replace). Only sockets are ever replaced; a live listener is never taken over.
pub(crate) fn path_problem(p: &Path) -> Option<String> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(e.to_string()),
        Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            Some("it exists and is not a socket (only a stale socket there is replaced)".into())
        }
        Ok(_) => match UnixStream::connect(p) {
            Ok(_) => Some("another server is listening on it".into()),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => None,
            Err(e) => Some(format!("probing it: {e}")),
        },
    }
}

/// Binds `path` with `mode`. The socket is bound under a temporary name in the same
/// directory, given its mode, then renamed into place, so that no client can
/// connect to it while it still has the umask's mode. A path too long for that
/// falls back to bind-then-chmod.
pub(crate) fn bind(path: &Path, mode: u32) -> io::Result<Bound> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp_name = format!(
        ".rbv-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = path.with_file_name(tmp_name);
    let listener = match UnixListener::bind(&tmp) {
        Ok(l) => {
            let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
                .and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            l
        }
        Err(_) => {
            if std::fs::symlink_metadata(path).is_ok() {
                std::fs::remove_file(path)?; // a stale socket (checked by the caller)
            }
            let l = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            l
        }
    };
    // Non-blocking: a client that connects and goes away between our poll and
    // our accept must not leave the thread blocked in accept, deaf to a stop.
    listener.set_nonblocking(true)?;
    let m = std::fs::symlink_metadata(path)?;
    Ok(Bound {
        listener,
        dev_ino: (m.dev(), m.ino()),
    })
}

/// The running control thread of one socket.
pub(crate) struct Control {
    thread: Option<JoinHandle<()>>,
    stop: Arc<Stop>,
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl Control {
    pub(crate) fn spawn(
        dev: Arc<DeviceShared>,
        bound: Bound,
        path: PathBuf,
    ) -> io::Result<Control> {
        let stop = Arc::new(Stop::new()?);
        let s = stop.clone();
        let Bound { listener, dev_ino } = bound;
        let thread = std::thread::Builder::new()
            .name("vhost-ctl".into())
            .spawn(move || run(&dev, &listener, &s))?;
        Ok(Control {
            thread: Some(thread),
            stop,
            path,
            dev_ino,
        })
    }

    /// Stops the thread (its queues drained) and removes the socket file.
    pub(crate) fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.stop.signal();
        let _ = t.join();
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.dev_ino);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run(dev: &Arc<DeviceShared>, listener: &UnixListener, stop: &Stop) {
    loop {
        match wait(listener.as_fd(), stop) {
            Ok(Wake::Ready) => {}
            Ok(Wake::Stop) => return,
            Err(e) => {
                tracing::error!(export = %dev.export, error = %e, "vhost socket poll failed; the socket stops accepting");
                return;
            }
        }
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // A transient failure (out of descriptors): keep listening, but
                // not in a hot loop while the pending connection stays readable.
                tracing::warn!(export = %dev.export, error = %e, "vhost accept failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        serve(dev, sock, stop);
        if stop.is_set() {
            return;
        }
    }
}

/// Serves one client until it disconnects, sends a message we refuse, or we stop;
/// then stops its queues (waiting for their drain) and drops its memory.
fn serve(dev: &Arc<DeviceShared>, sock: UnixStream, stop: &Stop) {
    if let Err(e) = sock.set_nonblocking(false) {
        tracing::warn!(export = %dev.export, error = %e, "vhost connection setup failed");
        return;
    }
    let watch = match sock.try_clone() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(export = %dev.export, error = %e, "vhost connection setup failed");
            return;
        }
    };
    stop.set_conn(watch.try_clone().ok());
    {
        let mut st = dev.state();
        st.connected = true;
        st.connections += 1;
    }
    tracing::info!(export = %dev.export, "vhost-user client connected");
    let conn = Arc::new(Mutex::new(Conn::new(dev.clone())));
    let mut handler = BackendReqHandler::from_stream(sock, conn.clone());
    let why = loop {
        match wait(watch.as_fd(), stop) {
            Ok(Wake::Ready) => {}
            Ok(Wake::Stop) => break None,
            Err(e) => break Some(e.to_string()),
        }
        match handler.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected | VuError::PartialMessage) => break None,
            Err(VuError::SocketBroken(_)) if stop.is_set() => break None,
            Err(e) => break Some(e.to_string()),
        }
    };
    // Queues first (their drain), then the socket: the frontend sees the
    // disconnect only once nothing of ours touches its rings any more.
    conn.lock().unwrap_or_else(|p| p.into_inner()).reset();
    drop(handler);
    stop.set_conn(None);
    let mut st = dev.state();
    st.connected = false;
    match why {
        Some(e) => {
            tracing::warn!(export = %dev.export, error = %e, "vhost-user connection closed after a refused message");
            st.last_error = Some(e);
        }
        None => tracing::info!(export = %dev.export, "vhost-user client disconnected"),
    }
}
