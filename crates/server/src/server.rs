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
//! # Limits
//! At most `max_connections` connections are served, of which at most
//! `max_handshakes` may still be negotiating (`accepted`); request buffers of all
//! connections share one budget. See `admission` for both.
//!
//! # Start order
//! [`Server::start`] binds the listener before it opens (and maybe creates) any
//! volume file, so a port in use fails the start before anything is written.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ringblk_iscsi::frontend::{IscsiFrontend, IscsiShared};
use ringblk_nbd::frontend::{NbdExports, NbdFrontend};
use ringblk_reactor::{Reactor, ReactorHandle, ReactorPool};

use ringblk_target::admission::{count, more_suffix, Admission};
use ringblk_target::target::{Target, TargetError};
use ringblk_target::volume::VolumeError;
use ringblk_vhost::VhostFrontend;

pub use crate::listen::ListenAddr;

/// Moved to [`crate::config`] (#12 2A); re-exported so paths keep working.
pub use crate::config::ServerConfig;

/// What sessions, the listener and RPC share: the NBD front end's
/// [`NbdShared`](ringblk_nbd::frontend::NbdShared) (the `Target`, the export catalog,
/// connection counters, timeouts, admission), under its old name (#12 5.2).
pub use ringblk_nbd::frontend::NbdShared as ServerShared;

/// The reactor with the fewest connections (ties: lowest id).
fn pick_reactor(shared: &ServerShared) -> usize {
    shared
        .per_reactor
        .iter()
        .enumerate()
        .min_by_key(|(_, c)| c.load(Ordering::Relaxed))
        .map_or(0, |(i, _)| i)
}

/// A running server.
pub struct Server {
    pub shared: Arc<ServerShared>,
    pool: Option<ReactorPool>,
    acceptor: Option<crate::listen::Acceptor>,
    /// The vhost-user exports (a control thread each); stopped before the reactors.
    pub vhost: Arc<VhostFrontend>,
    /// The address actually bound (port 0 resolved).
    pub local_addr: ListenAddr,
    /// The iSCSI front end (`--iscsi`), its portal's address and its accept thread.
    pub iscsi: Option<Arc<IscsiShared>>,
    pub iscsi_addr: Option<ListenAddr>,
    iscsi_acceptor: Option<crate::listen::Acceptor>,
}

/// iSCSI connections served at once; more are closed at accept.
pub const ISCSI_MAX_CONNECTIONS: usize = 1024;

impl From<TargetError> for ServerError {
    fn from(e: TargetError) -> ServerError {
        match e {
            TargetError::Volume(e) => ServerError::Volume(e),
            TargetError::Catalog(why) => ServerError::Catalog(why),
            // TargetError is non_exhaustive; a new kind reads as a catalog message.
            #[allow(unreachable_patterns)]
            e => ServerError::Catalog(e.to_string()),
        }
    }
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
    /// The persisted volume list cannot be read, or the configuration contradicts it.
    #[error("{0}")]
    Catalog(String),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Vhost(#[from] ringblk_vhost::VhostError),
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
        config.admission.validate().map_err(ServerError::Config)?;
        // The iSCSI portal is bound before any volume file is opened, as the NBD one.
        let iscsi_listener = match &config.iscsi {
            Some(c) => Some(
                crate::listen::bind(&ListenAddr::Tcp(c.listen))
                    .map_err(|e| ServerError::Listen(format!("--iscsi: {e}")))?,
            ),
            None => None,
        };
        let target = Arc::new(Target::new(
            config.data_dir.clone(),
            n,
            config.commit_queue_depth,
        ));
        let shared = Arc::new(ServerShared {
            exports: Arc::new(NbdExports::new(target.clone())),
            target,
            connections: AtomicUsize::new(0),
            per_reactor: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            max_connections: config.max_connections,
            handshake_timeout: config.handshake_timeout,
            admission: Admission::new(config.admission.clone()),
            tls: config.tls.clone(),
        });
        shared
            .target
            .open_all(&config.volumes, config.volumes_implicit, &config.rebind)?;
        let local_addr = listener.addr.clone();
        shared.target.save_catalog()?;
        let init: ringblk_reactor::Init = Arc::new(move |r: &mut Reactor| {
            NbdFrontend::install(r);
            IscsiFrontend::install(r);
            ringblk_target::latency::install(r);
        });
        let pool = ReactorPool::start(config.reactor.clone(), init)?;
        shared.target.start(pool.handles().clone());
        let vhost = match VhostFrontend::new(shared.target.clone()) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                pool.shutdown();
                return Err(e.into());
            }
        };
        let acceptor = match start_acceptor(&shared, &pool, listener) {
            Ok(a) => a,
            Err(e) => {
                pool.shutdown();
                return Err(e);
            }
        };
        let (iscsi, iscsi_addr, iscsi_acceptor) = match (iscsi_listener, &config.iscsi) {
            (Some(l), Some(c)) => {
                let addr = l.addr.clone();
                let ish = Arc::new(IscsiShared::new(
                    shared.target.clone(),
                    c.prefix.clone(),
                    addr.to_string(),
                    c.chap.clone(),
                    n,
                ));
                match start_iscsi_acceptor(&ish, &pool, l) {
                    Ok(a) => (Some(ish), Some(addr), Some(a)),
                    Err(e) => {
                        let mut acceptor = acceptor;
                        acceptor.stop();
                        pool.shutdown();
                        return Err(e);
                    }
                }
            }
            _ => (None, None, None),
        };
        Ok(Server {
            shared,
            pool: Some(pool),
            acceptor: Some(acceptor),
            vhost,
            local_addr,
            iscsi,
            iscsi_addr,
            iscsi_acceptor,
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
        if let Some(mut a) = self.iscsi_acceptor.take() {
            a.stop();
        }
        // Then the vhost exports: their queues drain on the reactors, which must
        // still run; their socket files go.
        self.vhost.shutdown();
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
    accept_on_first(pool, listener, deliver)
}

/// Admits a new connection into a handshake slot (see `admission`): at the
/// handshake limit, or at the connection limit, the least recently active
/// negotiating connection gives way; at the connection limit with nobody
/// negotiating, the new one is refused. Connections made to give way close
/// asynchronously, so the sockets open are bounded by `max_connections +
/// max_handshakes`, a hard cap. Warnings are rate-limited with a count.
fn accepted(r: &mut Reactor, shared: &Arc<ServerShared>, sock: OwnedFd) {
    let adm = &shared.admission;
    let open = shared.connections.load(Ordering::Relaxed);
    let at_limit = open >= shared.max_connections;
    let id = adm.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let target = pick_reactor(shared);
    let hard_cap = shared.max_connections + adm.config.max_handshakes;
    let admitted = if open >= hard_cap {
        None
    } else {
        adm.handshakes.admit(id, target, at_limit)
    };
    let Some(evicted) = admitted else {
        count(&adm.counters.connections_refused);
        if let Some(n) = adm.refuse_warn.check() {
            tracing::warn!(
                "connection limit reached ({} connections, none negotiating); refusing a client{}",
                shared.max_connections,
                more_suffix(n)
            );
        }
        return; // dropping the descriptor closes it
    };
    count(&adm.counters.connections_accepted);
    if let Some((victim, on)) = evicted {
        count(&adm.counters.handshake_evictions);
        if let Some(n) = adm.evict_warn.check() {
            tracing::warn!(
                "handshake limit reached ({} connections negotiating, or {} in all); closing the least recently active negotiation for a new client{}",
                adm.config.max_handshakes,
                shared.max_connections,
                more_suffix(n)
            );
        }
        if on == r.id() {
            NbdFrontend::evict_handshake(r, victim);
        } else {
            r.send_to(on, move |r| NbdFrontend::evict_handshake(r, victim));
        }
    }
    set_nodelay(&sock);
    shared.connections.fetch_add(1, Ordering::Relaxed);
    shared.per_reactor[target].fetch_add(1, Ordering::Relaxed);
    let sh = shared.clone();
    if target == r.id() {
        NbdFrontend::start(r, sh, sock, id);
    } else {
        r.send_to(target, move |r| NbdFrontend::start(r, sh, sock, id));
    }
}

/// The iSCSI portal's accept thread: each connection goes to the reactor with the
/// fewest iSCSI connections; past [`ISCSI_MAX_CONNECTIONS`] it is closed at once.
fn start_iscsi_acceptor(
    shared: &Arc<IscsiShared>,
    pool: &ReactorPool,
    listener: crate::listen::Bound,
) -> Result<crate::listen::Acceptor, ServerError> {
    let sh = shared.clone();
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let deliver: crate::listen::Deliver = Arc::new(move |r, sock| {
        if sh.connections.load(Ordering::Relaxed) >= ISCSI_MAX_CONNECTIONS {
            tracing::warn!(
                "iSCSI connection limit ({ISCSI_MAX_CONNECTIONS}) reached; refusing a client"
            );
            return;
        }
        let target = sh
            .per_reactor
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        set_nodelay(&sock);
        sh.connections.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = sh.per_reactor.get(target) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let sh2 = sh.clone();
        if target == r.id() {
            IscsiFrontend::start(r, sh2, sock, id);
        } else {
            r.send_to(target, move |r| IscsiFrontend::start(r, sh2, sock, id));
        }
    });
    accept_on_first(pool, listener, deliver)
}

/// Starts an accept thread whose connections reactor 0 hands to `deliver`.
fn accept_on_first(
    pool: &ReactorPool,
    listener: crate::listen::Bound,
    deliver: crate::listen::Deliver,
) -> Result<crate::listen::Acceptor, ServerError> {
    let Some(first) = pool.handles().first().cloned() else {
        return Err(ServerError::Accept(std::io::Error::other("no reactor")));
    };
    crate::listen::Acceptor::start(listener, first, deliver).map_err(ServerError::Accept)
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
