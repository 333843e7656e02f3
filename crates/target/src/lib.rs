//! ringblk-target: volumes, images, backup switchover, NBD server and JSON-RPC.
//!
//! Layout: `nbd/` is the sans-IO NBD protocol (handshake and transmission codec),
//! `rpc` the JSON-RPC 2.0 control socket.

pub mod nbd;
pub mod rpc;
