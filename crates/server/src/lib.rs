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

// Pure-move glue (#12 5.1): the moved files still say `crate::X` for the target's
// modules. The next commit spells them `ringblk_target::X` and drops these.
use ringblk_target::nbd_session_transitional as session;
use ringblk_target::{
    admission, backend, copyjob, fault, latency, persist, shared, spec, switchover, target, volume,
};
