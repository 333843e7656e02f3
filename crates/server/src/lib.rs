//! ringblk-server: the `ringblk` binary's library. Configuration (flags and TOML),
//! the listeners, the wiring of reactors, the block device layer and the NBD front
//! end, and the JSON-RPC control socket with its methods.

pub mod config;
pub mod datadir;
pub mod listen;
pub mod methods;
pub mod rpc;
pub mod server;
pub mod startup;
