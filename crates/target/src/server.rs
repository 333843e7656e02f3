//! The running server: reactors, listeners, the volume registry and the RPC socket.
//!
//! # Threads
//! One reactor thread per core serves NBD connections; reactor 0 also accepts them
//! (accept is cheap; the accepted socket is handed to the reactor with the fewest
//! connections, so several connections to one volume land on different reactors and
//! are served in parallel). The JSON-RPC server has its own thread (control plane).
//! The main thread waits for SIGINT/SIGTERM and then stops everything gracefully:
//! listeners close, connections finish their in-flight requests, reactors join.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringblk_reactor::{FileRef, Op, Reactor, ReactorConfig, ReactorHandle, ReactorPool};

use crate::session;
use crate::volume::{Registry, Volume, VolumeError, VolumeSpec};

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

/// Settings the server runs with (built from the CLI and config file).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    pub reactor: ReactorConfig,
    pub volumes: Vec<VolumeSpec>,
    pub max_connections: usize,
    /// FLUSH/FUA requests queued per volume for its group commit at most.
    pub commit_queue_depth: usize,
    pub handshake_timeout: Duration,
    /// Where delta images of backups are created.
    pub data_dir: PathBuf,
}

/// State every reactor and the RPC thread share.
pub struct ServerShared {
    pub registry: Arc<Registry>,
    pub connections: AtomicUsize,
    pub per_reactor: Box<[AtomicUsize]>,
    pub max_connections: usize,
    pub commit_queue_depth: usize,
    pub handshake_timeout: Duration,
    pub data_dir: PathBuf,
    pub reactors: std::sync::OnceLock<Arc<[ReactorHandle]>>,
}

impl ServerShared {
    /// The reactor with the fewest connections (ties: lowest id).
    fn pick_reactor(&self) -> usize {
        self.per_reactor
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i)
    }

    /// Creates a volume and makes it visible to new connections.
    pub fn add_volume(&self, spec: VolumeSpec) -> Result<Arc<Volume>, VolumeError> {
        if self.registry.get(&spec.name).is_some() {
            return Err(VolumeError::Exists(spec.name));
        }
        let v = Arc::new(Volume::open(spec, self.per_reactor.len(), &self.data_dir)?);
        v.persist.set_queue_depth(self.commit_queue_depth);
        self.registry.insert(v.clone())?;
        tracing::info!(volume = v.name(), size = v.size_bytes(), backend = %v.backend().kind(), "volume added");
        if let Some(r) = &v.recovered {
            tracing::info!(
                volume = v.name(),
                backups = ?r.backups,
                merging = ?r.merging,
                delta_chunks = r.delta_chunks,
                journal_frames = r.journal_frames,
                torn_tail_bytes = r.torn_tail_bytes,
                orphans_removed = r.orphans_removed.len(),
                unreferenced_chunks_punched = r.punched_chunks,
                ms = r.elapsed_ms,
                "recovered from the data dir"
            );
        }
        // Releases interrupted by a stop continue (once the reactors run).
        if let Some(h) = self.reactors.get() {
            crate::switchover::resume_merges(h, &v);
        }
        Ok(v)
    }

    /// Removes a volume; its connections finish in-flight requests and close.
    pub fn remove_volume(&self, name: &str) -> Result<(), VolumeError> {
        let v = self.registry.remove(name)?;
        v.persist.destroy();
        if let Some(handles) = self.reactors.get() {
            for h in handles.iter() {
                let n = name.to_string();
                let _ = h.send_blocking(
                    move |r| {
                        session::close_volume(r, &n);
                        crate::latency::forget(r, &n);
                    },
                    Duration::from_secs(5),
                );
            }
        }
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }
}

/// A running server.
pub struct Server {
    pub shared: Arc<ServerShared>,
    pool: Option<ReactorPool>,
    /// The address actually bound (port 0 resolved).
    pub local_addr: ListenAddr,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Reactor(#[from] ringblk_reactor::ReactorError),
}

fn bind(addr: &ListenAddr) -> Result<(OwnedFd, ListenAddr), ServerError> {
    let err = |source| ServerError::Listen {
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Tcp(a) => {
            let l = std::net::TcpListener::bind(a).map_err(err)?;
            let local = l.local_addr().map_err(err)?;
            if !a.ip().is_loopback() {
                tracing::warn!(addr = %local, "listening on a non-loopback address: NBD has no authentication");
            }
            Ok((OwnedFd::from(l), ListenAddr::Tcp(local)))
        }
        ListenAddr::Unix(p) => {
            if p.exists() && std::os::unix::net::UnixStream::connect(p).is_err() {
                let _ = std::fs::remove_file(p); // stale socket from a killed server
            }
            let l = std::os::unix::net::UnixListener::bind(p).map_err(err)?;
            Ok((OwnedFd::from(l), addr.clone()))
        }
    }
}

impl Server {
    /// Opens the volumes, binds the listener and starts the reactors.
    pub fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let n = config.reactor.cores.len();
        let shared = Arc::new(ServerShared {
            registry: Arc::new(Registry::new()),
            connections: AtomicUsize::new(0),
            per_reactor: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            max_connections: config.max_connections,
            commit_queue_depth: config.commit_queue_depth,
            handshake_timeout: config.handshake_timeout,
            data_dir: config.data_dir.clone(),
            reactors: std::sync::OnceLock::new(),
        });
        for spec in config.volumes.clone() {
            shared.add_volume(spec)?;
        }
        let (listener, local_addr) = bind(&config.listen)?;
        let listener = Arc::new(std::sync::Mutex::new(Some(listener)));
        let sh = shared.clone();
        let init: ringblk_reactor::Init = Arc::new(move |r: &mut Reactor| {
            session::install(r);
            crate::latency::install(r);
            if r.id() == 0 {
                let fd = listener.lock().ok().and_then(|mut l| l.take());
                if let Some(fd) = fd {
                    start_accepting(r, sh.clone(), fd);
                }
            }
        });
        let pool = ReactorPool::start(config.reactor.clone(), init)?;
        let _ = shared.reactors.set(pool.handles().clone());
        for v in shared.registry.list() {
            crate::switchover::resume_merges(pool.handles(), &v);
        }
        Ok(Server {
            shared,
            pool: Some(pool),
            local_addr,
        })
    }

    pub fn reactors(&self) -> &Arc<[ReactorHandle]> {
        match &self.pool {
            Some(p) => p.handles(),
            None => unreachable!("pool lives until shutdown"),
        }
    }

    /// Stops accepting, lets connections finish, joins the reactors.
    pub fn shutdown(mut self) {
        if let Some(p) = self.pool.take() {
            p.shutdown();
        }
        if let ListenAddr::Unix(p) = &self.local_addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct Listener {
    fd: Option<OwnedFd>,
    accept: Option<ringblk_reactor::OpId>,
    stopping: bool,
}

fn start_accepting(r: &mut Reactor, shared: Arc<ServerShared>, fd: OwnedFd) {
    let l = std::rc::Rc::new(std::cell::RefCell::new(Listener {
        fd: Some(fd),
        accept: None,
        stopping: false,
    }));
    let l2 = l.clone();
    r.on_stop(move |r| {
        let mut lb = l2.borrow_mut();
        lb.stopping = true;
        match lb.accept {
            Some(id) => r.cancel(id),
            None => lb.fd = None,
        }
    });
    post_accept(r, shared, l);
}

fn post_accept(
    r: &mut Reactor,
    shared: Arc<ServerShared>,
    l: std::rc::Rc<std::cell::RefCell<Listener>>,
) {
    let raw = match l.borrow().fd.as_ref() {
        Some(fd) => fd.as_raw_fd(),
        None => return,
    };
    let l2 = l.clone();
    let sh = shared.clone();
    let res = r.submit(Op::accept(FileRef::Raw(raw)), move |r, comp| {
        l2.borrow_mut().accept = None;
        if l2.borrow().stopping {
            l2.borrow_mut().fd = None; // close the listener
            if comp.result >= 0 {
                // SAFETY: a successful accept returns a new descriptor we own.
                drop(unsafe { OwnedFd::from_raw_fd(comp.result) });
            }
            return;
        }
        if comp.result >= 0 {
            // SAFETY: a successful accept returns a new descriptor we own.
            let sock = unsafe { OwnedFd::from_raw_fd(comp.result) };
            accepted(r, &sh, sock);
        } else if comp.result != -libc::ECANCELED {
            tracing::warn!(errno = -comp.result, "accept failed");
        }
        post_accept(r, sh, l2);
    });
    match res {
        Ok(id) => l.borrow_mut().accept = Some(id),
        Err(_) => {
            let l2 = l.clone();
            r.add_timer(Duration::from_millis(1), move |r| {
                post_accept(r, shared, l2)
            });
        }
    }
}

fn accepted(r: &mut Reactor, shared: &Arc<ServerShared>, sock: OwnedFd) {
    if shared.connections.load(Ordering::Relaxed) >= shared.max_connections {
        tracing::warn!(
            max = shared.max_connections,
            "connection limit reached; refusing a client"
        );
        return; // dropping the descriptor closes it
    }
    set_nodelay(&sock);
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let target = shared.pick_reactor();
    shared.per_reactor[target].fetch_add(1, Ordering::Relaxed);
    let sh = shared.clone();
    if target == r.id() {
        session::start(r, sh, sock);
    } else {
        r.send_to(target, move |r| session::start(r, sh, sock));
    }
}

fn set_nodelay(sock: &OwnedFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local; failure (not TCP, e.g. a
    // Unix socket) is harmless and ignored.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
