//! ringblk-target: the block device layer. Volumes, image stacks, the data path,
//! backup switchover, merges, copy jobs, durability and statistics; and, until #12
//! step 5.2 moves it to `ringblk-nbd`, the NBD session.
//!
//! Layout: the sans-IO NBD protocol (handshake and transmission codec) is the
//! `ringblk-nbd` crate; `session` drives it over reactor sockets and maps the block
//! layer's vocabulary (`error::BlockError`, `extent::Extent`, `ops::IoKind`, which know
//! no protocol) to NBD's at its edge, `shared` is what the sessions share with the
//! listeners and RPC methods, `admission` holds the server-wide limits on what clients
//! may hold, `target` holds the volumes and their persisted list, and `bdev` is the
//! protocol-free block I/O API every front end submits through (`datapath/` runs its
//! requests). The `ringblk`
//! binary, its configuration, listeners, wiring and JSON-RPC server are the
//! `ringblk-server` crate (`crates/server`, #12 step 5.1), which uses this one; it
//! reaches the session only through [`nbd_session_transitional`].
//!
//! # Layers
//! A module may use `crate::X` only if X has a strictly lower rank (its own subtree
//! excepted); `ci/layers.py` checks it (`RANKS` there is this table) and
//! `docs/design/block-layer-plan.md` (a) gives the final layout. Ranks 0–12 are the
//! block device layer; 20–21 leave the crate in #12 step 5.2.
//!
//! | rank | modules | what |
//! |---|---|---|
//! | 0 | `error`, `ops`, `extent`, `spec`, `park`, `filelock` | vocabulary, leaf helpers |
//! | 1 | `buf`, `durable/`, `backend/`, `admission` (→ `buf`) | buffers, storage primitives, list format |
//! | 2 | `stats/`, `fault` | accounting, injected errors |
//! | 3 | `image` | deltas, stacks, pins, `Images` (base + published stack) |
//! | 4 | `persist` | manifest cell, group commit |
//! | 5 | `datapath/` | the data path: fast (no deltas) and layered |
//! | 6 | `volume` | `Volume`, `View`, `BackupId`, `BackupHold`, `home_reactor` |
//! | 7 | `events` | `BdevEvent`, per-reactor subscribers, notify rounds |
//! | 8 | `bdev/`, `drain` | the block I/O API; drain rounds, `SwitchError` |
//! | 9 | `merge` | release merges |
//! | 10 | `switchover`, `copyjob` | backup create/release/list, copy-out |
//! | 11 | `catalog` | volume list policy |
//! | 12 | `target` | `Target`: registry, catalog, reactors |
//! | 20–21 | `shared`, `session` | NBD front end (→ `ringblk-nbd`, step 5.2) |

#![warn(unreachable_pub)]

pub mod admission;
mod backend;
pub mod bdev;
mod buf;
pub mod catalog;
pub mod copyjob;
mod datapath;
pub mod drain;
mod durable;
pub mod error;
pub mod events;
pub mod extent;
pub mod fault;
pub mod filelock;
mod image;
pub mod merge;
pub mod ops;
mod park;
mod persist;
// Leaves for ringblk-nbd in #12 step 5.2 (its items become that crate's API there).
#[allow(unreachable_pub)]
mod session;
pub mod shared;
pub mod spec;
pub mod stats;
/// Moved to [`stats::latency`] (#12 step 1); re-exported so paths keep working.
pub use stats::latency;
pub mod switchover;
pub mod target;
pub mod volume;

/// The NBD session, reachable from the server crate until it leaves this crate (#12
/// step 5.2 moves `session` to `ringblk-nbd` and deletes this module). These three
/// calls are all `ringblk-server` needs to serve NBD: install the per-reactor
/// connection table, start a session on an accepted socket, and close a negotiating
/// connection the listener's admission makes give way. `shared::ServerShared` is the
/// state they share with the listener and the RPC methods.
#[doc(hidden)]
pub mod nbd_session_transitional {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    use ringblk_reactor::Reactor;

    use crate::shared::ServerShared;

    /// Installs the reactor's NBD connection table; call once per reactor at start.
    pub fn install(r: &mut Reactor) {
        crate::session::install(r)
    }

    /// Starts an NBD session (handshake, then transmission) on `sock`, accepted by
    /// the listener as connection `id`, on reactor `r`.
    pub fn start(r: &mut Reactor, shared: Arc<ServerShared>, sock: OwnedFd, id: u64) {
        crate::session::start(r, shared, sock, id)
    }

    /// Closes connection `id` if it lives on `r` and is still negotiating.
    pub fn evict_handshake(r: &mut Reactor, id: u64) {
        crate::session::evict_handshake(r, id)
    }
}

#[cfg(test)]
mod sim_tests;
