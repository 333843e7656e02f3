//! The running server: reactors, listeners, the volume registry and the RPC socket.
//!
//! # Threads
//! One reactor thread per core serves NBD connections. A thread of its own accepts
//! them ([`crate::listen`] says why not the ring) and hands each to reactor 0, which
//! passes it to the reactor with the fewest connections, so several connections to
//! one volume land on different reactors and are served in parallel. The JSON-RPC
//! server has its own thread (control plane). The main thread waits for SIGINT or
//! SIGTERM and then stops everything gracefully: the listener closes, connections
//! finish their in-flight requests, reactors join.
//!
//! # Start order
//! [`Server::start`] binds the listener before it opens (and maybe creates) any
//! volume file, so a port in use fails the start before anything is written.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringblk_reactor::{Reactor, ReactorConfig, ReactorHandle, ReactorPool};

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
    acceptor: Option<crate::listen::Acceptor>,
    /// The address actually bound (port 0 resolved).
    pub local_addr: ListenAddr,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The listener could not be bound (an operator message naming the address).
    #[error("{0}")]
    Listen(String),
    #[error("cannot start the NBD accept thread: {0}")]
    Accept(#[source] std::io::Error),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Reactor(#[from] ringblk_reactor::ReactorError),
}

impl Server {
    /// Binds the listener, opens the volumes and starts the reactors.
    pub fn start(config: ServerConfig) -> Result<Server, ServerError> {
        let listener = crate::listen::bind(&config.listen).map_err(ServerError::Listen)?;
        Self::start_on(config, listener)
    }

    /// [`Server::start`] on a listener bound beforehand (`ringblk serve` binds it
    /// before it creates any file, so that a port in use leaves nothing behind).
    /// `config.listen` is not used.
    pub fn start_on(
        config: ServerConfig,
        listener: crate::listen::Bound,
    ) -> Result<Server, ServerError> {
        let n = config.reactor.cores.len();
        let shared = Arc::new(ServerShared {
            registry: Arc::new(Registry::new()),
            connections: AtomicUsize::new(0),
            per_reactor: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            max_connections: config.max_connections,
            handshake_timeout: config.handshake_timeout,
            data_dir: config.data_dir.clone(),
            reactors: std::sync::OnceLock::new(),
        });
        for spec in config.volumes.clone() {
            shared.add_volume(spec)?;
        }
        let local_addr = listener.addr.clone();
        let init: ringblk_reactor::Init = Arc::new(move |r: &mut Reactor| {
            session::install(r);
            crate::latency::install(r);
        });
        let pool = ReactorPool::start(config.reactor.clone(), init)?;
        let _ = shared.reactors.set(pool.handles().clone());
        for v in shared.registry.list() {
            crate::switchover::resume_merges(pool.handles(), &v);
        }
        let acceptor = match start_acceptor(&shared, &pool, listener) {
            Ok(a) => a,
            Err(e) => {
                pool.shutdown();
                return Err(e);
            }
        };
        Ok(Server {
            shared,
            pool: Some(pool),
            acceptor: Some(acceptor),
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
        // First the listener: it is closed (and its Unix socket file removed) when
        // this returns, so no connection arrives at stopping reactors.
        if let Some(mut a) = self.acceptor.take() {
            a.stop();
        }
        if let Some(p) = self.pool.take() {
            p.shutdown();
        }
    }
}

/// Accepts on a thread of its own (see [`crate::listen`] for why not on the ring);
/// reactor 0 places each connection, as before.
fn start_acceptor(
    shared: &Arc<ServerShared>,
    pool: &ReactorPool,
    listener: crate::listen::Bound,
) -> Result<crate::listen::Acceptor, ServerError> {
    let sh = shared.clone();
    let deliver: crate::listen::Deliver = Arc::new(move |r, sock| accepted(r, &sh, sock));
    let Some(first) = pool.handles().first().cloned() else {
        return Err(ServerError::Accept(std::io::Error::other("no reactor")));
    };
    crate::listen::Acceptor::start(listener, first, deliver).map_err(ServerError::Accept)
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
