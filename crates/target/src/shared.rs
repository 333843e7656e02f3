//! What the NBD sessions, the listeners and the RPC methods share: the target and
//! the server-wide connection state (counters, limits, admission).
//!
//! It sits below both `session` and `server` so that neither imports the other's
//! upward half: `server` (the wiring) starts sessions, sessions read this. Layer:
//! rank 20; imports `target` and `admission`. It leaves the crate with the session
//! (#12 step 5, as the front end's own `NbdShared`).
//!
//! # Sharing
//! One `Arc<ServerShared>` per server, read by every reactor and the RPC thread;
//! the counters are atomics, each written where a connection opens or closes.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use crate::target::{Registry, Target};

/// State every reactor and the RPC thread share: the target (volumes) and what
/// the NBD front end and the listeners need (connections, limits, admission).
pub struct ServerShared {
    /// Volumes, their persisted list, the reactors (`target`).
    pub target: Arc<Target>,
    /// `target.registry()`, for the NBD handshake.
    pub registry: Arc<Registry>,
    pub connections: AtomicUsize,
    pub per_reactor: Box<[AtomicUsize]>,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Buffer budget, handshake slots and push-back counters (`admission`).
    pub admission: Admission,
}
