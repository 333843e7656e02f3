//! ringblk-target: volumes, images, backup switchover, NBD server and JSON-RPC.
//!
//! Layout: the sans-IO NBD protocol (handshake and transmission codec) is the
//! `ringblk-nbd` crate; `session` drives it over reactor sockets and maps the block
//! layer's vocabulary (`error::BlockError`, `extent::Extent`, `ops::IoKind`, which know
//! no protocol) to NBD's at its edge (it leaves this crate in #12 step 5), `admission`
//! holds the server-wide limits on what clients may hold, `target` holds the volumes
//! and their persisted list, `bdev` is the protocol-free block I/O API every front
//! end submits through (`datapath/` runs its requests), `server` wires listeners,
//! reactors and the target together, `rpc` is the JSON-RPC 2.0 control socket and `methods` the RPC methods.
//!
//! # Layers
//! A module may use `crate::X` only if X has a strictly lower rank (its own subtree
//! excepted); `ci/layers.py` checks it (`RANKS` there is this table) and
//! `docs/design/block-layer-plan.md` (a) gives the final layout. Ranks 0–12 are the
//! block device layer; 20 and up leave the crate in #12 step 5.
//!
//! | rank | modules | what |
//! |---|---|---|
//! | 0 | `error`, `ops`, `extent`, `spec`, `park`, `filelock`, `datadir` | vocabulary, leaf helpers |
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
//! | 30–35 | `rpc`, `listen`, `config`, `startup`, `server`, `methods` | the server (→ `crates/server`, step 5.1) |

pub mod admission;
pub mod backend;
pub mod bdev;
mod buf;
pub mod catalog;
pub mod config;
pub mod copyjob;
pub mod datadir;
mod datapath;
pub mod drain;
pub mod durable;
pub mod error;
pub mod events;
pub mod extent;
pub mod fault;
pub mod filelock;
pub mod image;
pub mod listen;
pub mod merge;
pub mod methods;
pub mod ops;
mod park;
pub mod persist;
pub mod rpc;
pub mod server;
mod session;
pub mod shared;
pub mod spec;
pub mod stats;
/// Moved to [`stats::latency`] (#12 step 1); re-exported so paths keep working.
pub use stats::latency;
pub mod startup;
pub mod switchover;
pub mod target;
pub mod volume;

#[cfg(test)]
mod sim_tests;
