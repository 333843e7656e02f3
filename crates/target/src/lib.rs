//! ringblk-target: volumes, images, backup switchover, NBD server and JSON-RPC.
//!
//! Layout: the sans-IO NBD protocol (handshake and transmission codec) is the
//! `ringblk-nbd` crate; `session` drives it over reactor sockets and maps the block
//! layer's vocabulary (`error::BlockError`, `extent::Extent`, `ops::IoKind`, which know
//! no protocol) to NBD's at its edge (it leaves this crate in #12 step 5), `admission` holds the server-wide
//! limits on what clients may hold, `bdev` is the protocol-free block I/O API every
//! front end submits through (`datapath/` runs its requests: the fast path without
//! deltas and the layered one), `volume` and `backend/` are the storage side, `server` wires listeners, reactors and volumes together, `rpc` is the
//! JSON-RPC 2.0 control socket and `methods` the RPC methods.

pub mod admission;
pub mod backend;
pub mod bdev;
mod buf;
pub mod catalog;
pub mod config;
pub mod copyjob;
pub mod datadir;
mod datapath;
pub mod durable;
pub mod error;
pub mod extent;
pub mod fault;
pub mod filelock;
pub mod image;
pub mod listen;
pub mod methods;
pub mod ops;
mod park;
pub mod persist;
pub mod rpc;
pub mod server;
mod session;
pub mod spec;
pub mod stats;
/// Moved to [`stats::latency`] (#12 step 1); re-exported so paths keep working.
pub use stats::latency;
pub mod startup;
pub mod switchover;
pub mod volume;

#[cfg(test)]
mod sim_tests;
