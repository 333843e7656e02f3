//! ringblk-server: the library of the `ringblk` binary (`src/main.rs`). It turns a
//! configuration into a running server: the listeners, the wiring of reactors, the
//! block device layer (`ringblk_target`) and the NBD front end, and the JSON-RPC
//! control socket with its methods.
//!
//! # Layer
//! The top of the workspace: nothing imports this crate except its own binary and
//! integration tests (`tests/`, which drive the built `ringblk` and `ringblk-ctl`).
//! It may import `ringblk_target`'s public API (its images, block maps, backends
//! and durable formats are private to it, so the server reads volumes through
//! `Volume`, `Target`, `switchover` and `bdev` methods), `ringblk_reactor` and
//! `ringblk_nbd::frontend` (the NBD front end: `NbdFrontend::{install, start,
//! evict_handshake}`, `NbdShared`, `NbdExports`), `ringblk_vhost` (the vhost-user-blk
//! front end: `VhostFrontend::{create, delete, list, shutdown}`), plus clap, toml and
//! tracing-subscriber, which the block layer must not depend on.
//!
//! Inside, lower modules do not use higher ones: `rpc` (JSON-RPC 2.0 transport, knows
//! no method) and `datadir` (the data-dir lock) use nothing of this crate; `listen`
//! (bind, accept thread) < `config` (flags, TOML, defaults) < `startup` (validate
//! before creating, undo a failed start) < `server` (wiring, connection admission) <
//! `methods` (the RPC methods) < `main`.
//!
//! # Ownership
//! [`server::Server`] owns the reactor pool and the accept thread; reactors, the
//! accept thread and the RPC thread share one `Arc<ServerShared>`
//! (`ringblk_nbd::frontend::NbdShared`: the `Target`, the export catalog, connection
//! counters, limits, admission). It also owns the vhost-user front end
//! (`Server::vhost`: a control thread per socket). [`server::Server::shutdown`]
//! closes the listener first, then stops the vhost exports (their queues drain on
//! the reactors, which still run), then lets connections finish their requests and
//! joins the reactors.
//!
//! # Ordering
//! Start order: the listener is bound and every file is checked before any file is
//! created ([`startup`]); a failed start removes what it created.
//!
//! # Back-pressure
//! A full reactor inbox stops the accept thread, so new clients wait in the
//! kernel's backlog; connection and handshake slots bound the sockets held
//! (`server`, `ringblk_target::admission`). The RPC server bounds its clients and
//! request sizes (`rpc`).
//!
//! # Durability
//! At a stop, the binary syncs every volume that has backups
//! (`Volume::sync_metadata`) so they are kept for the next start, like a disk
//! flushing its cache at power-off. What a write's durability means is the block
//! layer's (`ringblk_target` docs).
//!
//! # Errors
//! [`methods`] holds the one mapping of the block layer's control-plane errors to
//! JSON-RPC codes (negative errnos, SPDK style); no request, file or client input
//! may panic the server.

pub mod config;
pub mod datadir;
pub mod listen;
pub mod methods;
pub mod rpc;
pub mod server;
pub mod startup;
pub mod tlsinit;
