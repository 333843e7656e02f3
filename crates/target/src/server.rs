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
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringblk_reactor::{Reactor, ReactorHandle, ReactorPool};

use crate::admission::{count, more_suffix, Admission};
use crate::session;
use crate::volume::{Registry, Volume, VolumeError, VolumeSpec};

pub use crate::listen::ListenAddr;

/// Moved to [`crate::config`] (#12 2A); re-exported so paths keep working.
pub use crate::config::ServerConfig;

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
    /// Buffer budget, handshake slots and push-back counters (`admission`).
    pub admission: Admission,
    /// The persisted volume list and the volumes of it that could not be opened
    /// (see `catalog`). Held across a create or delete: they change it in turn.
    catalog: std::sync::Mutex<Catalog>,
}

/// What `catalog` persists, and what of it failed at start.
#[derive(Default)]
struct Catalog {
    specs: Vec<VolumeSpec>,
    /// Volume name → why it is not served (left out at start; still listed).
    failed: std::collections::BTreeMap<String, String>,
}

impl Catalog {
    fn save(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        crate::catalog::save(
            data_dir,
            &crate::catalog::VolumeList::new(self.specs.clone()),
        )
    }
}

/// The spec a volume is persisted with: its size and an absolute path, so the
/// next start opens the same thing whatever its working directory.
fn persisted_spec(v: &Volume) -> VolumeSpec {
    let mut s = v.spec().clone();
    s.size_bytes = Some(v.size_bytes());
    s.path = s.path.map(|p| std::path::absolute(&p).unwrap_or(p));
    s
}

/// How long `volume_delete` waits for the deleted volume's last requests before it
/// lets its base file go anyway to whoever outlives them (the lock then goes with
/// the volume's last reference).
const DELETE_IDLE_WAIT: Duration = Duration::from_secs(5);

/// Releases a deleted volume's write lock on its base once none of its requests
/// runs any more: its connections are closing and take no new ones, so from then on
/// nothing of it writes the file, although a client that stops reading can keep the
/// volume itself alive for a long time. Its deltas need no such release: a
/// re-created volume names its own (`durable::manifest::file_stem`).
fn release_base_when_idle(v: &Volume) {
    let deadline = std::time::Instant::now() + DELETE_IDLE_WAIT;
    loop {
        let busy = v.requests_in_flight();
        if busy == 0 {
            v.backend().release_write_lock();
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                volume = v.name(),
                requests = busy,
                "deleted volume still has requests running; its base stays locked until they end"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
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

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Volumes of the persisted list that are not served, and why.
    pub fn failed_volumes(&self) -> Vec<(VolumeSpec, String)> {
        let cat = self.catalog();
        cat.specs
            .iter()
            .filter_map(|s| cat.failed.get(&s.name).map(|e| (s.clone(), e.clone())))
            .collect()
    }

    /// Creates a volume (`volume_create`) and makes it visible to new connections;
    /// it is in the persisted volume list when this returns Ok.
    pub fn add_volume(&self, spec: VolumeSpec) -> Result<Arc<Volume>, VolumeError> {
        let mut cat = self.catalog();
        if let Some(why) = cat.failed.get(&spec.name) {
            return Err(VolumeError::Invalid {
                name: spec.name,
                reason: format!(
                    "the volume list has a volume of that name, left out at start ({why}); \
                     delete it first (its backups go with it)"
                ),
            });
        }
        let v = self.open_volume(spec, false)?;
        cat.specs.push(persisted_spec(&v));
        if let Err(source) = cat.save(&self.data_dir) {
            cat.specs.pop();
            let _ = self.registry.remove(v.name());
            return Err(VolumeError::Open {
                path: self
                    .data_dir
                    .join(crate::catalog::FILE_NAME)
                    .display()
                    .to_string(),
                source,
            });
        }
        Ok(v)
    }

    /// Opens a volume and registers it (not in the persisted list: the caller's).
    fn open_volume(&self, spec: VolumeSpec, rebind: bool) -> Result<Arc<Volume>, VolumeError> {
        if self.registry.get(&spec.name).is_some() {
            return Err(VolumeError::Exists(spec.name));
        }
        let v = Arc::new(Volume::open_with(
            spec,
            self.per_reactor.len(),
            &self.data_dir,
            rebind,
        )?);
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
            crate::merge::resume_merges(h, &v);
        }
        Ok(v)
    }

    /// Removes a volume; its connections finish in-flight requests and close. It
    /// leaves the persisted list (a restart does not bring it back).
    pub fn remove_volume(&self, name: &str) -> Result<(), VolumeError> {
        let mut cat = self.catalog();
        if cat.failed.remove(name).is_some() {
            // Never opened: its backups go with it here (nothing holds them).
            crate::catalog::discard_volume_files(&self.data_dir, name);
            return self.forget_volume(&mut cat, name);
        }
        let v = self.registry.remove(name)?;
        v.persist.destroy();
        if let Some(handles) = self.reactors.get() {
            // Its users close (every view); it is out of the registry, so nobody
            // opens it again (`events` # Ordering).
            crate::events::notify(handles, &v, |_| true, crate::events::BdevEvent::Removed);
            for h in handles.iter() {
                let n = name.to_string();
                let _ = h.send_blocking(
                    move |r| crate::latency::forget(r, &n),
                    Duration::from_secs(5),
                );
            }
        }
        release_base_when_idle(&v);
        tracing::info!(volume = name, "volume removed");
        self.forget_volume(&mut cat, name)
    }

    fn forget_volume(&self, cat: &mut Catalog, name: &str) -> Result<(), VolumeError> {
        cat.specs.retain(|s| s.name != name);
        cat.save(&self.data_dir).map_err(|source| {
            tracing::error!(volume = name, error = %source, "cannot write the volume list: the volume comes back at the next start");
            VolumeError::Open {
                path: self.data_dir.join(crate::catalog::FILE_NAME).display().to_string(),
                source,
            }
        })
    }

    /// Opens the volumes of the persisted list and the configuration (see
    /// `catalog`); `save_catalog` persists the list. A volume of the list that cannot be
    /// opened, or any that cannot be recovered, is left out and reported (log,
    /// `volume_list`) while the others serve; a configured volume that cannot be
    /// opened for another reason (a bad spec, a missing file) fails the start.
    fn open_all(&self, config: &ServerConfig) -> Result<(), ServerError> {
        let list_path = config.data_dir.join(crate::catalog::FILE_NAME);
        let list = crate::catalog::load(&config.data_dir).map_err(ServerError::Catalog)?;
        let todo = crate::catalog::reconcile(
            list.as_ref(),
            &config.volumes,
            config.volumes_implicit,
            &config.rebind,
            &list_path,
        )
        .map_err(ServerError::Catalog)?;
        let mut cat = self.catalog();
        for (spec, origin) in todo {
            let rebind = config.rebind.contains(&spec.name);
            match self.open_volume(spec.clone(), rebind) {
                Ok(v) => cat.specs.push(persisted_spec(&v)),
                Err(e)
                    if origin == crate::catalog::Origin::List
                        || matches!(e, VolumeError::Unrecoverable { .. }) =>
                {
                    tracing::error!(volume = %spec.name, error = %e, "volume left out; the others are served (ringblk-ctl volume list shows it; fix it and restart, or delete it)");
                    cat.failed.insert(spec.name.clone(), e.to_string());
                    cat.specs.push(spec);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.registry.list().is_empty() {
            tracing::warn!(list = %list_path.display(), "no volume to serve: every volume of the data dir's list was deleted or failed; create one with ringblk-ctl volume create or --volume");
        }
        crate::catalog::warn_unlisted(&config.data_dir, &cat.specs);
        Ok(())
    }

    /// Writes the volume list as `open_all` settled it, once the start can no
    /// longer fail for another reason (a start that fails changes nothing).
    fn save_catalog(&self) -> Result<(), ServerError> {
        self.catalog().save(&self.data_dir).map_err(|e| {
            ServerError::Catalog(format!(
                "cannot write {}: {e}",
                self.data_dir.join(crate::catalog::FILE_NAME).display()
            ))
        })
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
    /// The persisted volume list cannot be read, or the configuration contradicts it.
    #[error("{0}")]
    Catalog(String),
    #[error("{0}")]
    Config(String),
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
        let shared = Arc::new(ServerShared {
            registry: Arc::new(Registry::new()),
            connections: AtomicUsize::new(0),
            per_reactor: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            max_connections: config.max_connections,
            commit_queue_depth: config.commit_queue_depth,
            handshake_timeout: config.handshake_timeout,
            data_dir: config.data_dir.clone(),
            reactors: std::sync::OnceLock::new(),
            catalog: std::sync::Mutex::new(Catalog::default()),
            admission: Admission::new(config.admission.clone()),
        });
        shared.open_all(&config)?;
        let local_addr = listener.addr.clone();
        shared.save_catalog()?;
        let init: ringblk_reactor::Init = Arc::new(move |r: &mut Reactor| {
            session::install(r);
            crate::latency::install(r);
        });
        let pool = ReactorPool::start(config.reactor.clone(), init)?;
        let _ = shared.reactors.set(pool.handles().clone());
        for v in shared.registry.list() {
            crate::merge::resume_merges(pool.handles(), &v);
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
    let target = shared.pick_reactor();
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
            session::evict_handshake(r, victim);
        } else {
            r.send_to(on, move |r| session::evict_handshake(r, victim));
        }
    }
    set_nodelay(&sock);
    shared.connections.fetch_add(1, Ordering::Relaxed);
    shared.per_reactor[target].fetch_add(1, Ordering::Relaxed);
    let sh = shared.clone();
    if target == r.id() {
        session::start(r, sh, sock, id);
    } else {
        r.send_to(target, move |r| session::start(r, sh, sock, id));
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
