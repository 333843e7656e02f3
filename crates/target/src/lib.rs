//! ringblk-target: the block device layer. Volumes, image stacks, the data path,
//! backup switchover, merges, copy jobs, durability and statistics. It knows no
//! protocol.
//!
//! # Layer
//! Above `ringblk-reactor` and `ringblk-blockmap`, below every front end (NBD's is
//! `ringblk-nbd`'s `frontend`) and the server. It may import those two crates and
//! std-level crates (io-uring, nix, libc, crossbeam-channel, serde, serde_json,
//! hdrhistogram, sha2, crc32c, thiserror, tracing). It must not depend on
//! `ringblk-nbd`, `ringblk-server`, clap, toml or tracing-subscriber (`ci/layers.py`
//! checks the crate dependencies).
//!
//! What other crates see: the block I/O API ([`bdev`]: `Bdev`, `Channel`, `BlockOp`,
//! the buffer types), its protocol-free vocabulary ([`error`], [`extent`], [`ops`],
//! [`stats`]), what a volume is made of ([`spec`]), the control plane ([`target`]'s
//! `Target`, [`volume`]'s `Volume` accessors, [`switchover`], [`copyjob`], [`merge`],
//! [`events`], [`fault`]) and `ringblk check` (`target::Target::check_data_dir`).
//! The layers under them, `backend`, `image`, `datapath`, `durable`, `buf`, `park`
//! and `persist`, are private modules: images, block maps and backends are not
//! public outside this crate, so no front end compiles against them. The crate root
//! has `#![warn(unreachable_pub)]` (an error under clippy's `-D warnings`), and
//! `ci/layers.py` refuses a `pub mod` or `pub use` of them and any re-export of
//! `ringblk_blockmap`. Doc tests (compiled as another crate would be) hold it: the
//! public path compiles,
//! ```
//! fn serve(v: &ringblk_target::volume::Volume) -> (usize, bool) {
//!     (v.backup_count(), v.persistent())
//! }
//! ```
//! and the private layers do not:
//! ```compile_fail
//! use ringblk_target::image::Images;
//! ```
//! ```compile_fail
//! use ringblk_target::backend::Backend;
//! ```
//! ```compile_fail
//! use ringblk_target::durable::store::DirStore;
//! ```
//! ```compile_fail
//! use ringblk_target::persist::Persist;
//! ```
//! ```compile_fail
//! fn peek(v: &ringblk_target::volume::Volume) -> usize {
//!     v.images().size_bytes() as usize // pub(crate): the stacks stay inside
//! }
//! ```
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
//! excepted); `ci/layers.py` checks it (`RANKS` there is this table) and CI enforces
//! it, which also rules out module circles. `docs/design/block-layer-plan.md` (a)
//! gives the final layout. Private modules are marked (p).
//!
//! | rank | modules | what |
//! |---|---|---|
//! | 0 | `error`, `ops`, `extent`, `spec`, `park` (p), `filelock` | vocabulary, leaf helpers |
//! | 1 | `buf` (p), `durable/` (p), `backend/` (p), `admission` (→ `buf`) | buffers, storage primitives, list format |
//! | 2 | `stats/`, `fault` | accounting, injected errors |
//! | 3 | `image` (p) | deltas, stacks, pins, `Images` (base + published stack) |
//! | 4 | `persist` (p) | manifest cell, group commit |
//! | 5 | `datapath/` (p) | the data path: fast (no deltas) and layered |
//! | 6 | `volume` | `Volume`, `View`, `BackupId`, `BackupHold`, `home_reactor` |
//! | 7 | `events` | `BdevEvent`, per-reactor subscribers, notify rounds |
//! | 8 | `bdev/`, `drain` | the block I/O API; drain rounds, `SwitchError` |
//! | 9 | `merge` | release merges |
//! | 10 | `switchover`, `copyjob` | backup create/release/list, copy-out |
//! | 11 | `catalog` | volume list policy |
//! | 12 | `target` | `Target`: registry, catalog, reactors |
//!
//! # Ownership
//! `Target` owns the volumes (`Arc<Volume>`, alive while a request, connection,
//! merge or copy job holds one) and the persisted volume list. A `Volume` owns its
//! base backend and its image stacks; a request pins the stack current at its
//! admission, and a stack is freed only after a drain round shows no pin is left
//! (`image`, `drain`). A `Channel` is one reactor's (`!Send`); request buffers move
//! into the request and come back in a read's result, and caller memory (`SgList`)
//! stays the caller's until `done` has run (`buf`).
//!
//! # Back-pressure
//! A valid request is never failed for lack of internal room; it waits. A full
//! `Channel` queues it and answers `Pressure::Full` (the front end stops reading);
//! a full reactor slab parks its operations in the reactor's FIFO (`datapath`); a
//! full commit queue parks FLUSH/FUA on their reactor (`persist`); a chunk another
//! write is filling parks the writer in the block map. Every queue is bounded by the
//! requests the front ends admit.
//!
//! # Ordering
//! Requests start in submission order per channel and complete in any order. Data
//! before mapping: a delta's chunk is published (and journaled) only after its data
//! write completed. The switchover is one atomic stack publish; requests admitted
//! before it finish on the old stack, and a partial first write into the new delta
//! waits until no older write to its chunk is in flight (`datapath::layered`).
//!
//! # Durability
//! A volume is a disk with a volatile write cache: a write is durable once a FLUSH
//! or its own FUA has completed, on any channel of the volume. The group commit
//! (`persist`) syncs data files before the journals that map them, bottom to top;
//! manifests and the volume list are replaced atomically (write, fsync, rename,
//! fsync the directory). Recovery replays the journals and drops only a torn tail
//! (`durable`).
//!
//! # Cancellation
//! The layer never drops a request: `done` runs exactly once, on the submitting
//! reactor, even after the volume is removed or a backup released (then with
//! `Removed`). A front end that goes away lets its requests complete; events
//! (`events`) tell it to close, it is never closed by the layer. Copy jobs are
//! cancelled by flag and stop once their I/O has drained (`copyjob`).

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
pub mod spec;
pub mod stats;
/// Moved to [`stats::latency`] (#12 step 1); re-exported so paths keep working.
pub use stats::latency;
pub mod switchover;
pub mod target;
pub mod volume;

#[cfg(test)]
mod sim_tests;
