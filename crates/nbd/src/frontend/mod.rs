//! The NBD front end (feature `frontend`, on by default): NBD sessions on reactors,
//! submitting through the block layer's protocol-free API (`ringblk_target::bdev`).
//!
//! Layer: above `ringblk-target` (its public API: `Target`, `bdev`, `admission`,
//! `stats`, `error`, `extent`, `ops`) and `ringblk-reactor`; below the server
//! (`ringblk-server`, which binds the listener and wires this in). The target crate
//! knows no protocol: every NBD word, errno and flag is chosen in this module tree.
//! Moved out of the target crate in #12 step 5.2.
//!
//! - `session`: one connection's state machine (handshake, then transmission).
//! - [`NbdShared`]: what sessions, the listener and RPC share (the export catalog,
//!   connection counters, timeouts, admission).
//! - [`exports`]: [`NbdExports`], the handshake's catalog over the `Target`.
//! - [`errors`]: THE mapping `BlockError` → `NbdErrno` ([`nbd_errno`]).
//! - [`tls`]: STARTTLS (#16): TLS settings, per-export access, the TLS state fed
//!   bytes by the session.
//! - `extents`: `ExtentFlags` → `base:allocation` / changed-context wire flags.
//!
//! # Wiring
//! On every reactor, once, at start: [`NbdFrontend::install`]. For every accepted
//! socket the listener admitted: [`NbdFrontend::start`] on the reactor chosen for it.
//! The front end counts its requests under the stats label `nbd` (registered by the
//! first install).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use ringblk_reactor::Reactor;

pub mod errors;
pub mod exports;
mod extents;
mod session;
mod shared;
pub mod tls;

pub use errors::nbd_errno;
pub use exports::{NbdExports, META_CHANGED_PREFIX};
pub use session::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
pub use shared::NbdShared;
pub use tls::{ExportAccess, NbdTls, TlsSetupError};

/// The NBD front end's entry points for the server's wiring (module docs).
pub struct NbdFrontend;

impl NbdFrontend {
    /// Installs the reactor's NBD connection table (after the block layer's poller);
    /// call once per reactor at start.
    pub fn install(r: &mut Reactor) {
        session::install(r)
    }

    /// Starts an NBD session (handshake, then transmission) on `sock`, accepted by
    /// the listener as connection `id`, on reactor `r`.
    pub fn start(r: &mut Reactor, shared: Arc<NbdShared>, sock: OwnedFd, id: u64) {
        session::start(r, shared, sock, id)
    }

    /// Closes connection `id` if it lives on `r` and is still negotiating (it gives
    /// way to a new client at the handshake limit).
    pub fn evict_handshake(r: &mut Reactor, id: u64) {
        session::evict_handshake(r, id)
    }
}
