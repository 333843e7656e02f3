//! The iSCSI front end (feature `frontend`, on by default): iSCSI sessions on
//! reactors over the block layer's protocol-free API (`ringblk_target::bdev`), built
//! from this crate's sans-IO pieces. Without the feature the crate is the sans-IO part
//! only (the fuzz crate builds it that way).
//!
//! Layer: above `ringblk-target` (`Target`, `bdev`, `stats`, `error`, `extent`) and
//! `ringblk-reactor`; below the server, which binds the listener and wires this in.
//!
//! # Targets
//! Every volume is a target named [`crate::names::target_name`]`(prefix, VOL, None)`
//! and every ready backup `VOL@NAME` a read-only one (`…:vol:name`), LUN 0 each; names
//! that do not fit an iSCSI name are left out (logged once per login config). The list
//! is built at each connection's login, so volumes created later are served.
//!
//! # Wiring
//! On every reactor, once, at start: [`IscsiFrontend::install`]. For every accepted
//! socket: [`IscsiFrontend::start`] on the reactor chosen for it. Requests are counted
//! under the stats label `iscsi`.
//!
//! # Limitations (see the crate's top doc)
//! Unit serials and NAA ids derive from the volume name (not yet persisted per volume
//! incarnation); persistent reservations live in memory, shared by all sessions of the
//! server (APTPL is not persisted); LUN RESET aborts this session's tasks only.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ringblk_reactor::Reactor;
use ringblk_target::stats::Label;
use ringblk_target::target::Target;

use crate::login::{ChapConfig, LoginConfig, TargetEntry};
use crate::scsi::pr::Reservations;

mod session;

/// One logged-in connection, as `iscsi_list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub initiator: String,
    /// The target name (empty for discovery sessions).
    pub target: String,
    pub tsih: u16,
    pub reactor: usize,
    /// ExpCmdSN and MaxCmdSN at login.
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// What sessions, the listener and RPC share.
pub struct IscsiShared {
    pub target: Arc<Target>,
    /// IQN prefix of target names (`iqn.2026-12.io.ringblk` by default).
    pub prefix: String,
    /// `host:port` SendTargets reports.
    pub portal: String,
    /// CHAP required for every target and discovery when set.
    pub chap: Option<ChapConfig>,
    pub connections: AtomicUsize,
    pub per_reactor: Box<[AtomicUsize]>,
    label: Label,
    next_tsih: AtomicU16,
    pub(crate) sessions: Mutex<BTreeMap<u64, SessionInfo>>,
    /// Reservations per volume name (the live view's; backups are read-only).
    pub(crate) reservations: Mutex<HashMap<String, Reservations>>,
}

impl IscsiShared {
    pub fn new(
        target: Arc<Target>,
        prefix: String,
        portal: String,
        chap: Option<ChapConfig>,
        reactors: usize,
    ) -> IscsiShared {
        IscsiShared {
            target,
            prefix,
            portal,
            chap,
            connections: AtomicUsize::new(0),
            per_reactor: (0..reactors).map(|_| AtomicUsize::new(0)).collect(),
            // All label slots taken: count as internal rather than fail.
            label: Label::register("iscsi").unwrap_or(Label::INTERNAL),
            next_tsih: AtomicU16::new(1),
            sessions: Mutex::new(BTreeMap::new()),
            reservations: Mutex::new(HashMap::new()),
        }
    }

    /// The logged-in connections, by connection id.
    pub fn sessions(&self) -> Vec<(u64, SessionInfo)> {
        match self.sessions.lock() {
            Ok(s) => s.iter().map(|(k, v)| (*k, v.clone())).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The target names served now, each with its volume and backup.
    pub fn targets(&self) -> Vec<(String, String, Option<String>)> {
        let mut out = Vec::new();
        for v in self.target.registry().list() {
            let vol = v.name().to_string();
            if let Ok(n) = crate::names::target_name(&self.prefix, &vol, None) {
                out.push((n, vol.clone(), None));
            }
            for b in v.ready_backups() {
                if let Ok(n) = crate::names::target_name(&self.prefix, &vol, Some(&b)) {
                    out.push((n, vol.clone(), Some(b)));
                }
            }
        }
        out
    }

    fn login_config(&self) -> LoginConfig {
        let addr = format!("{},1", self.portal);
        LoginConfig {
            targets: self
                .targets()
                .into_iter()
                .map(|(name, _, _)| TargetEntry {
                    name,
                    addresses: vec![addr.clone()],
                    chap: self.chap.clone(),
                })
                .collect(),
            discovery_chap: self.chap.clone(),
            ..LoginConfig::default()
        }
    }

    fn tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

/// The iSCSI front end's entry points for the server's wiring (module docs).
pub struct IscsiFrontend;

impl IscsiFrontend {
    /// Installs the reactor's iSCSI connection table; call once per reactor at start.
    pub fn install(r: &mut Reactor) {
        session::install(r)
    }

    /// Starts an iSCSI connection (login, then full feature phase) on `sock`.
    pub fn start(r: &mut Reactor, shared: Arc<IscsiShared>, sock: OwnedFd, id: u64) {
        session::start(r, shared, sock, id)
    }
}
