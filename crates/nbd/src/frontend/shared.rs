//! What the NBD sessions share with the listener and the RPC methods: the block
//! layer's `Target`, the handshake's export catalog, the server-wide connection
//! counters and limits, the handshake timeout, admission (buffer budget,
//! handshake slots, push-back counters) and the TLS settings (`tls`: mode,
//! credentials, per-volume access; read-only after start).
//!
//! Layer: the NBD front end; imports `ringblk_target::{target, admission}` and
//! `exports`. The server (`ringblk-server`'s `server.rs`, the wiring) builds it and
//! starts sessions through `NbdFrontend`, so the session never reaches up to the
//! server. Moved from the target crate's `ServerShared` in #12 step 5.2.
//!
//! # Sharing
//! One `Arc<NbdShared>` per server, read by every reactor and the RPC thread;
//! the counters are atomics, each written where a connection opens or closes.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use ringblk_target::admission::Admission;
use ringblk_target::target::Target;

use super::{NbdExports, NbdTls};

/// State every reactor and the RPC thread share: the target (volumes) and what
/// the NBD front end and the listeners need (connections, limits, admission).
pub struct NbdShared {
    /// Volumes, their persisted list, the reactors (`target`).
    pub target: Arc<Target>,
    /// The handshake's catalog over `target`.
    pub exports: Arc<NbdExports>,
    pub connections: AtomicUsize,
    pub per_reactor: Box<[AtomicUsize]>,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// Buffer budget, handshake slots and push-back counters (`admission`).
    pub admission: Admission,
    /// TLS mode, credentials and per-export access (#16; `NbdTls::default()`: no TLS).
    pub tls: Arc<NbdTls>,
}
