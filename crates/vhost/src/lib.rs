//! ringblk-vhost: the vhost-user-blk front end (issue #13). A VM (QEMU's
//! `vhost-user-blk-pci`) or a local client (libblkio's `virtio-blk-vhost-user`)
//! shares its memory with the server; requests sit in virtqueues that reactors poll,
//! and are submitted to the block layer without a copy.
//!
//! # Layer
//! A front end over the block I/O API, like `ringblk-nbd`'s. It may import
//! `ringblk_target`'s public API only — `bdev` (`Bdev`, `Channel`, `BlockOp`,
//! `SgList`, …), `error`, `stats::Label`, `target::Target` — never images, maps or
//! backends (private to that crate; `ci/layers.py` checks the paths we name),
//! `ringblk_reactor`, and the rust-vmm crates `vhost` (backend side of the
//! protocol), `vm-memory`, `virtio-queue`, `virtio-bindings`. The server
//! (`ringblk-server`) is the only crate that imports this one.
//!
//! - control plane: [`control`] (a thread per socket), [`device`] (features, config
//!   space, the protocol handler), [`memory`] (the client's memory table),
//!   [`inflight`] (INFLIGHT_SHMFD), [`errors`] (THE `BlockError` → virtio status
//!   mapping), and [`VhostFrontend`], the server's entry point;
//! - data plane: [`queue`] (one virtqueue on one reactor: `QueueSetup`,
//!   `start_queue`, `stop_queue`, `set_mem`) and what it uses.
//!
//! # Threading
//! Control plane on a thread, data plane on reactors (SPDK's split). Each socket
//! has a control thread that runs the `vhost` crate's `BackendReqHandler` over our
//! `VhostUserBackendReqHandlerMut` ([`device`]); control messages are rare and may
//! block (GET_VRING_BASE waits for a queue's drain). Virtqueue `i` of a device runs
//! on reactor `i % reactors`, so several queues are served by several cores. We do
//! **not** use the `vhost-user-backend` crate: it runs an epoll worker thread per
//! queue that would poll the rings beside (and against) the reactor, and wakes it
//! through its own eventfd loop, which fights the reactor's busy/adaptive/interrupt
//! idle policy and its io_uring park protocol.
//!
//! # Ownership of guest memory
//! The memory table is mapped by the control thread ([`memory::MemTable`]) and
//! shared as an `Arc` ([`memory::GuestMem`]); every started queue and every
//! in-flight request holds the `GuestMem` its buffers point into, so a new table
//! (SET_MEM_TABLE, ADD/REM_MEM_REG) or a disconnect never unmaps memory the kernel
//! may still read or write; the mapping goes when its last holder drops it.
//!
//! # Ordering
//! Requests of one queue start in avail-ring order and complete in any order (the
//! used ring says which). A stop (GET_VRING_BASE, SET_VRING_ENABLE 0, disconnect,
//! `delete`) returns only after the queue's in-flight requests completed.
//!
//! # Back-pressure
//! A queue holds at most its size in flight (the ring bounds it). When the block
//! layer's channel is full, the queue stops popping its avail ring and resumes from
//! `Channel::when_room`; the guest sees a slower device, never an error.
//!
//! # Durability
//! VIRTIO_BLK_T_FLUSH is the block layer's `Flush`: every write completed before it
//! was submitted is durable when it completes, whichever queue carried the write
//! (the layer's flush covers all channels). No CONFIG_WCE: the cache mode is
//! write-back, fixed.
//!
//! # Errors
//! [`errors::virtio_status`] is the one mapping of block-layer errors to the
//! request's status byte. A malformed descriptor chain fails that request with
//! IOERR when its status byte is reachable, otherwise the queue is marked broken;
//! a refused control message closes the connection. Nothing a client sends
//! panics the server.
//!
//! # What a hostile client can still do (known limits)
//! - Truncate its own memory file after SET_MEM_TABLE: the next access through
//!   the mapping faults (SIGBUS ends the server). Files sealed with
//!   `F_SEAL_SHRINK` (QEMU's `memory-backend-memfd`) cannot be; an unsealed one is
//!   logged once ([`memory`]). Requiring the seal would refuse
//!   `memory-backend-file` and hugetlbfs. The inflight memfd we create is sealed,
//!   and SET_INFLIGHT_FD seals the one it is given when the file still allows it.
//! - Clear `O_NONBLOCK` on its call eventfd (the flag lives in the file
//!   description it shares) and saturate the counter: the reactor's signal
//!   `write` then blocks. Kick/call/err fds must be eventfds and are made
//!   non-blocking when received ([`device`]), which stops every accidental case.
//! - Keep a stop waiting: GET_VRING_BASE, a disconnect and `vhost_delete` wait
//!   for the queue's in-flight requests (they may not be abandoned while they
//!   point into guest memory), so they last as long as the slowest request.
//! - Hold the socket: a socket serves one client at a time; a client that
//!   connects and stays idle keeps the next one waiting in the backlog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ringblk_target::stats::Label;
use ringblk_target::target::Target;

pub mod blk;
pub mod control;
pub mod device;
pub mod errors;
pub mod fuzz;
pub mod inflight;
pub mod memory;
pub mod queue;
pub mod virtq;

pub use errors::virtio_status;
pub use inflight::InflightRegion;
pub use memory::GuestMem;

/// Socket mode of a new export unless the caller gives one.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Options of [`VhostFrontend::create`].
#[derive(Clone, Copy, Debug)]
pub struct CreateOptions {
    /// Permission bits of the socket file (at most 0o777).
    pub mode: u32,
    /// Virtqueues offered (default: one per reactor, at most
    /// [`device::QUEUES_MAX`]).
    pub num_queues: Option<u16>,
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            mode: DEFAULT_SOCKET_MODE,
            num_queues: None,
        }
    }
}

/// Why an export could not be created or deleted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhostError {
    #[error("no volume or ready backup named {0:?}")]
    NoExport(String),
    #[error("export {0:?} is being removed")]
    Removed(String),
    #[error("socket {0}: it exists and is not a socket (only a stale socket is replaced)")]
    NotASocket(PathBuf),
    #[error("socket {path}: {why}")]
    SocketInUse { path: PathBuf, why: String },
    #[error("socket {0} is already a vhost export of this server")]
    Exists(PathBuf),
    #[error("no vhost export on socket {0}")]
    NotFound(PathBuf),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the server has no reactors running")]
    NoReactors,
    #[error("socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `vhost_list` shows of one queue.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QueueInfo {
    pub index: u16,
    /// The reactor that serves it (`index % reactors`).
    pub reactor: usize,
    /// Started by the connected client.
    pub running: bool,
    /// Requests completed, over the export's life.
    pub served: u64,
    /// In-flight requests resubmitted after a reconnect.
    pub resubmitted: u64,
    pub errors: u64,
    /// The queue met a structural fault (a chain without a reachable status byte)
    /// and stopped serving until the client sets it up again.
    pub broken: bool,
}

/// What `vhost_list` shows of one export.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportInfo {
    /// `VOL` or `VOL@BACKUP`.
    pub export: String,
    pub socket: PathBuf,
    pub read_only: bool,
    pub size_bytes: u64,
    pub block_size: u32,
    pub num_queues: u16,
    pub connected: bool,
    /// Clients served so far (a reconnect counts again).
    pub connections: u64,
    pub last_error: Option<String>,
    pub queues: Vec<QueueInfo>,
}

struct Export {
    dev: Arc<device::DeviceShared>,
    control: control::Control,
    socket: PathBuf,
}

/// The vhost-user front end of a server: its exports by socket path. The server
/// creates one after its reactors started and calls [`VhostFrontend::shutdown`]
/// before it stops them (a stop drains queues on their reactors).
pub struct VhostFrontend {
    target: Arc<Target>,
    label: Label,
    exports: Mutex<BTreeMap<PathBuf, Export>>,
}

impl VhostFrontend {
    /// Registers the stats label `vhost` (requests show under it in `stats`).
    pub fn new(target: Arc<Target>) -> Result<VhostFrontend, VhostError> {
        let label = Label::register("vhost").map_err(|e| VhostError::Invalid(e.to_string()))?;
        Ok(VhostFrontend {
            target,
            label,
            exports: Mutex::new(BTreeMap::new()),
        })
    }

    fn exports(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, Export>> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Exports `export` (`VOL`, or `VOL@BACKUP` read-only) on a new socket at
    /// `socket`. Refuses a path that exists and is not a socket, or where a server
    /// listens; a stale socket is replaced.
    pub fn create(
        &self,
        export: &str,
        socket: &Path,
        opts: CreateOptions,
    ) -> Result<ExportInfo, VhostError> {
        if export.is_empty() || export.starts_with('@') || export.ends_with('@') {
            return Err(VhostError::Invalid(format!("export name {export:?}")));
        }
        if opts.mode > 0o777 {
            return Err(VhostError::Invalid(format!("socket mode {:#o}", opts.mode)));
        }
        if socket.as_os_str().is_empty() || socket.file_name().is_none() {
            return Err(VhostError::Invalid(format!(
                "socket path {}",
                socket.display()
            )));
        }
        let reactors = self
            .target
            .reactors()
            .cloned()
            .ok_or(VhostError::NoReactors)?;
        if reactors.is_empty() {
            return Err(VhostError::NoReactors);
        }
        let default_queues = u16::try_from(reactors.len())
            .unwrap_or(device::QUEUES_MAX)
            .min(device::QUEUES_MAX);
        let num_queues = opts.num_queues.unwrap_or(default_queues);
        if num_queues == 0 || num_queues > device::QUEUES_MAX {
            return Err(VhostError::Invalid(format!(
                "num_queues {num_queues}: 1 to {}",
                device::QUEUES_MAX
            )));
        }
        let socket = absolute(socket)?;
        let mut exports = self.exports();
        if exports.contains_key(&socket) {
            return Err(VhostError::Exists(socket));
        }
        let not_socket = std::fs::symlink_metadata(&socket)
            .is_ok_and(|m| !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        if not_socket {
            return Err(VhostError::NotASocket(socket));
        }
        if let Some(why) = control::path_problem(&socket) {
            return Err(VhostError::SocketInUse { path: socket, why });
        }
        let bdev = self.target.open(export, self.label).map_err(|e| match e {
            ringblk_target::bdev::OpenError::Removed => VhostError::Removed(export.into()),
            _ => VhostError::NoExport(export.into()),
        })?;
        let dev = Arc::new(device::DeviceShared::new(
            bdev.name().to_string(),
            bdev,
            num_queues,
            reactors,
        ));
        let io = |source| VhostError::Io {
            path: socket.clone(),
            source,
        };
        let bound = control::bind(&socket, opts.mode).map_err(io)?;
        let control = control::Control::spawn(dev.clone(), bound, socket.clone()).map_err(io)?;
        tracing::info!(export = %dev.export, socket = %socket.display(), num_queues, "vhost-user export created");
        let e = Export {
            dev,
            control,
            socket: socket.clone(),
        };
        let info = info_of(&e);
        exports.insert(socket, e);
        Ok(info)
    }

    /// Stops the export on `socket`: its client is disconnected once its queues
    /// drained, and the socket file is removed.
    pub fn delete(&self, socket: &Path) -> Result<(), VhostError> {
        let socket = absolute(socket)?;
        // Out of the map first, stopped without the lock: a drain may take a while.
        let e = self
            .exports()
            .remove(&socket)
            .ok_or(VhostError::NotFound(socket))?;
        e.control.stop();
        tracing::info!(export = %e.dev.export, socket = %e.socket.display(), "vhost-user export deleted");
        Ok(())
    }

    /// Deletes every export of volume `volume` (live or a backup of it): the server
    /// calls it before it removes the volume, whose files an export keeps open and
    /// whose requests could only fail from then on. Returns how many went.
    pub fn delete_volume_exports(&self, volume: &str) -> usize {
        let of_volume = |export: &str| {
            export == volume
                || export
                    .strip_prefix(volume)
                    .is_some_and(|rest| rest.starts_with('@'))
        };
        let gone: Vec<Export> = {
            let mut exports = self.exports();
            let keys: Vec<PathBuf> = exports
                .iter()
                .filter(|(_, e)| of_volume(&e.dev.export))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| exports.remove(k)).collect()
        };
        let n = gone.len();
        for e in gone {
            e.control.stop();
            tracing::info!(export = %e.dev.export, socket = %e.socket.display(), "vhost-user export deleted with its volume");
        }
        n
    }

    /// Every export, by socket path.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.exports().values().map(info_of).collect()
    }

    /// Deletes every export (server stop, before the reactors stop).
    pub fn shutdown(&self) {
        let all: Vec<Export> = std::mem::take(&mut *self.exports()).into_values().collect();
        for e in all {
            e.control.stop();
        }
    }
}

impl Drop for VhostFrontend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Why `path` cannot take a new vhost socket (it exists and is not a socket, or a
/// server listens on it), or `None`. For start-up checks before anything is created.
pub fn socket_problem(path: &Path) -> Option<String> {
    control::path_problem(path)
}

fn absolute(p: &Path) -> Result<PathBuf, VhostError> {
    std::path::absolute(p).map_err(|source| VhostError::Io {
        path: p.to_path_buf(),
        source,
    })
}

fn info_of(e: &Export) -> ExportInfo {
    let d = &e.dev;
    let st = d.state().clone();
    let n = d.reactors.len().max(1);
    let geo = d.bdev.geometry();
    ExportInfo {
        export: d.export.clone(),
        socket: e.socket.clone(),
        read_only: d.read_only,
        size_bytes: geo.size_bytes,
        block_size: geo.block_size,
        num_queues: d.num_queues,
        connected: st.connected,
        connections: st.connections,
        last_error: st.last_error,
        queues: d
            .counters
            .iter()
            .enumerate()
            .map(|(i, c)| QueueInfo {
                index: i as u16,
                reactor: st.running.get(i).copied().flatten().unwrap_or(i % n),
                running: st.running.get(i).is_some_and(Option::is_some),
                served: c.served.load(Ordering::Relaxed),
                resubmitted: c.resubmitted.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                broken: c.broken.load(Ordering::Relaxed),
            })
            .collect(),
    }
}
