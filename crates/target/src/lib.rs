//! ringblk-target: the block device layer. Volumes, image stacks, the data path,
//! backup switchover, merges, copy jobs, durability and statistics. It knows no
//! protocol.
//!
//! Layout: `bdev` is the protocol-free block I/O API every front end submits through
//! (`datapath/` runs its requests); its vocabulary (`error::BlockError`,
//! `extent::Extent`, `ops::IoKind`) is mapped to a wire protocol by each front end at
//! its edge, in the front end's own crate (NBD's is `ringblk-nbd`'s `frontend`,
//! #12 step 5.2). `admission` holds the server-wide limits on what clients may hold,
//! and `target` holds the volumes and their persisted list. The `ringblk` binary, its
//! configuration, listeners, wiring and JSON-RPC server are the `ringblk-server`
//! crate (`crates/server`), which uses this one and wires the front ends to it.
//!
//! # Layers
//! A module may use `crate::X` only if X has a strictly lower rank (its own subtree
//! excepted); `ci/layers.py` checks it (`RANKS` there is this table) and
//! `docs/design/block-layer-plan.md` (a) gives the final layout.
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

pub mod admission;
pub mod backend;
pub mod bdev;
mod buf;
pub mod catalog;
pub mod copyjob;
mod datapath;
pub mod drain;
pub mod durable;
pub mod error;
pub mod events;
pub mod extent;
pub mod fault;
pub mod filelock;
pub mod image;
pub mod merge;
pub mod ops;
mod park;
pub mod persist;
pub mod spec;
pub mod stats;
/// Moved to [`stats::latency`] (#12 step 1); re-exported so paths keep working.
pub use stats::latency;
pub mod switchover;
pub mod target;
pub mod volume;

#[cfg(test)]
mod sim_tests;
