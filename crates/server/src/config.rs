//! `ringblk serve` configuration: command-line flags, an optional TOML file, and the
//! zero-configuration defaults. Flags override the file; the file overrides defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringblk_reactor::{IdlePolicy, ReactorConfig, SubmitPolicy};
use serde::Deserialize;

use crate::listen::ListenAddr;
use ringblk_target::admission::{
    AdmissionConfig, DEFAULT_BUFFER_BUDGET_BYTES, DEFAULT_MAX_HANDSHAKES, DEFAULT_REQUEST_TIMEOUT,
};
use ringblk_target::spec::BackendKind;
use ringblk_target::spec::{default_rpc_socket, SizeValue};
/// Moved to [`ringblk_target::spec`] (#12 step 1); re-exported so paths keep working.
pub use ringblk_target::spec::{parse_size, parse_volume};
use ringblk_target::volume::VolumeSpec;

use ringblk_nbd::frontend::{ExportAccess, NbdTls};
use ringblk_nbd::TlsMode;
use std::sync::Arc;

/// Settings the server runs with (built from the CLI and config file).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: ListenAddr,
    pub reactor: ReactorConfig,
    pub volumes: Vec<VolumeSpec>,
    pub max_connections: usize,
    /// FLUSH/FUA requests queued per volume for its group commit at most.
    pub commit_queue_depth: usize,
    pub handshake_timeout: Duration,
    /// Where delta images of backups are created.
    pub data_dir: PathBuf,
    /// `volumes` is the zero-configuration default (no flag or config file named
    /// a volume): only a data dir without a volume list gets it (see `catalog`).
    pub volumes_implicit: bool,
    /// `--rebind NAME`: the operator's override for these volumes (see `catalog`).
    pub rebind: Vec<String>,
    /// Server-wide limits: buffer budget, handshake slots, request timeout.
    pub admission: AdmissionConfig,
    /// NBD over TLS (#16): mode, credentials, per-volume access.
    pub tls: Arc<NbdTls>,
    /// The iSCSI portal (`--iscsi` or `[iscsi]`); off when `None`.
    pub iscsi: Option<IscsiConfig>,
}

/// The iSCSI front end's settings: where it listens, the IQN prefix of its target
/// names, and one-way CHAP (from the config file only, never the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IscsiConfig {
    pub listen: std::net::SocketAddr,
    pub prefix: String,
    pub chap: Option<ringblk_iscsi::login::ChapConfig>,
}

/// `--iscsi` without an address listens here (loopback, the IANA port).
pub const DEFAULT_ISCSI_LISTEN: &str = "127.0.0.1:3260";
pub const DEFAULT_ISCSI_PREFIX: &str = "iqn.2026-12.io.ringblk";

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_DATA_DIR: &str = "./ringblk-data";
pub const DEFAULT_VOLUME: &str = "vol0";
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

/// Parses a core list: `0,2,4-7`.
pub fn parse_cores(s: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid core list {s:?}: use e.g. 0,1 or 0-3");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err(format!("core list {s:?} is empty"));
    }
    Ok(out)
}

pub fn parse_poll(s: &str) -> Result<PollMode, String> {
    match s {
        "busy" => Ok(PollMode::Busy),
        "adaptive" => Ok(PollMode::Adaptive),
        "interrupt" => Ok(PollMode::Interrupt),
        _ => Err(format!(
            "invalid poll mode {s:?}: busy, adaptive or interrupt"
        )),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    Busy,
    Adaptive,
    Interrupt,
}

/// The TOML file: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub rpc: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub cores: Option<String>,
    pub poll: Option<PollMode>,
    pub poll_us: Option<u64>,
    /// `batch`, `eager` or `everyN`, as `--submit`.
    pub submit: Option<String>,
    pub max_connections: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    /// `--buffer-budget`: a size such as `"1G"`, or bytes as an integer.
    pub buffer_budget: Option<SizeValue>,
    pub max_handshakes: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    /// As `--max-in-flight`.
    pub max_in_flight: Option<usize>,
    /// As `--commit-queue-depth`.
    pub commit_queue_depth: Option<usize>,
    /// As `--tls`: off | on | require.
    pub tls: Option<String>,
    /// As `--tls-creds`.
    pub tls_creds: Option<PathBuf>,
    /// As `--tls-verify-peer`.
    pub tls_verify_peer: Option<bool>,
    #[serde(default)]
    pub volume: Vec<FileVolume>,
    /// As `--vhost VOL=SOCKET_PATH`, one table each.
    #[serde(default)]
    pub vhost: Vec<FileVhost>,
    /// `[iscsi]`: its presence turns the iSCSI portal on (as `--iscsi`).
    pub iscsi: Option<FileIscsi>,
}

/// `[iscsi]`: the iSCSI portal. CHAP secrets live only here (RFC 7143 wants 12 to 16
/// bytes at least; shorter ones are refused at start).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIscsi {
    /// `ADDR:PORT` [default: 127.0.0.1:3260]; `--iscsi ADDR:PORT` overrides it.
    pub listen: Option<String>,
    /// IQN prefix of target names [default: iqn.2026-12.io.ringblk].
    pub iqn_prefix: Option<String>,
    /// One-way CHAP: the initiator must prove this user and secret.
    pub chap_user: Option<String>,
    pub chap_secret: Option<String>,
}

/// `[[vhost]]`: a vhost-user-blk export at start (as `--vhost`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVhost {
    /// `VOL`, or `VOL@BACKUP` (read-only).
    pub volume: String,
    pub socket: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVolume {
    pub name: String,
    pub path: Option<PathBuf>,
    /// `"10G"`, `"1.5G"` or bytes as an integer (`67108864`).
    pub size: Option<SizeValue>,
    pub block_size: Option<u32>,
    pub backend: Option<BackendKind>,
    #[serde(default)]
    pub read_only: bool,
    pub direct: Option<bool>,
    pub chunk_size: Option<SizeValue>,
    /// Let `size` grow an existing smaller file (see `--volume ...,grow=true`).
    #[serde(default)]
    pub grow: bool,
    /// NBD clients allowed to see this volume and its backups, by certificate
    /// identity: `dns:NAME`, `ip:ADDR`, `uri:URI` (exact SANs) or `dn:SUBJECT`
    /// (exact subject DN). Empty: every client the TLS mode lets in.
    #[serde(default)]
    pub tls_allow: Vec<String>,
    /// With `--tls on`, serve this volume to clients without TLS too.
    #[serde(default)]
    pub plaintext: bool,
}

pub fn load_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Command-line values (all optional so the file and defaults can fill in).
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub rpc: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub cores: Option<String>,
    pub poll: Option<PollMode>,
    pub poll_us: Option<u64>,
    pub submit: Option<SubmitPolicy>,
    pub volumes: Vec<VolumeSpec>,
    pub max_connections: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    /// `--rebind NAME` (see `catalog`).
    pub rebind: Vec<String>,
    pub buffer_budget_bytes: Option<u64>,
    pub max_handshakes: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub commit_queue_depth: Option<usize>,
    /// `--vhost VOL=SOCKET_PATH` (repeatable).
    pub vhost: Vec<VhostArg>,
    /// `--tls`.
    pub tls: Option<TlsMode>,
    /// `--tls-creds DIR`.
    pub tls_creds: Option<PathBuf>,
    /// `--tls-verify-peer`.
    pub tls_verify_peer: bool,
    /// `--iscsi [ADDR:PORT]`.
    pub iscsi: Option<String>,
}

/// Parses `--tls`: off | on | require.
pub fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    match s {
        "off" => Ok(TlsMode::Off),
        "on" => Ok(TlsMode::On),
        "require" => Ok(TlsMode::Require),
        _ => Err(format!("invalid TLS mode {s:?}: use off, on or require")),
    }
}

/// Checks one allow-list entry: a known identity kind and a non-empty value.
fn check_identity(volume: &str, id: &str) -> Result<(), String> {
    let ok = ["dns:", "ip:", "uri:", "dn:"]
        .iter()
        .any(|p| id.strip_prefix(p).is_some_and(|v| !v.is_empty()));
    if !ok {
        return Err(format!(
            "volume {volume}: tls_allow entry {id:?}: use dns:NAME, ip:ADDR, uri:URI or dn:SUBJECT"
        ));
    }
    Ok(())
}

/// The RPC socket grants full control of the server: refuse a path whose directory
/// others can write (they could replace the socket, or race its creation).
pub fn check_rpc_dir(rpc: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(dir) = rpc.parent() else {
        return Ok(());
    };
    // A missing directory fails at bind with its own message.
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(format!(
            "--rpc {}: its directory {} is writable by others; put the socket in a private directory",
            rpc.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// One `--vhost VOL=SOCKET_PATH`: export `VOL` (or `VOL@BACKUP`, read-only) as a
/// vhost-user-blk device on a socket at `socket` (mode 0600).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostArg {
    pub export: String,
    pub socket: PathBuf,
}

/// Parses `VOL=SOCKET_PATH` (the first `=` separates them).
pub fn parse_vhost(s: &str) -> Result<VhostArg, String> {
    match s.split_once('=') {
        Some((vol, path)) if !vol.is_empty() && !path.is_empty() => Ok(VhostArg {
            export: vol.to_string(),
            socket: PathBuf::from(path),
        }),
        _ => Err(format!(
            "invalid --vhost {s:?}: use VOL=SOCKET_PATH, e.g. vol0=/run/ringblk/vol0.vhost"
        )),
    }
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub server: ServerConfig,
    pub rpc: PathBuf,
    /// `rpc` is the default socket (no flag, RINGBLK_RPC or file named one): its
    /// directory is created at start.
    pub rpc_default: bool,
    pub data_dir: PathBuf,
    /// vhost-user exports to create once the server runs.
    pub vhost: Vec<VhostArg>,
}

pub fn resolve(flags: Flags) -> Result<Resolved, String> {
    let file = match &flags.config {
        Some(p) => load_file(p)?,
        None => FileConfig::default(),
    };
    let data_dir = absolute(
        flags
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
    )?;
    let listen: ListenAddr = flags
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string())
        .parse()?;
    let rpc_default = flags.rpc.is_none() && file.rpc.is_none();
    let rpc = absolute(match flags.rpc.or(file.rpc) {
        Some(p) => p,
        None => default_rpc_socket(
            nix::unistd::geteuid().as_raw(),
            std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        )?,
    })?;
    let cores = match flags.cores.or(file.cores) {
        Some(list) => {
            let cores = parse_cores(&list)?;
            check_cores(&list, &cores, &core_ids())?;
            cores.into_iter().map(Some).collect()
        }
        None => {
            let ids = core_ids();
            if ids.is_empty() {
                vec![None]
            } else {
                ids.into_iter().map(Some).collect()
            }
        }
    };
    let poll_us = flags.poll_us.or(file.poll_us).unwrap_or(50);
    if poll_us > 10_000_000 {
        return Err("--poll-us must be at most 10000000 (10 s)".into());
    }
    let idle = match flags.poll.or(file.poll).unwrap_or(PollMode::Adaptive) {
        PollMode::Busy => IdlePolicy::Busy,
        PollMode::Adaptive => IdlePolicy::Adaptive { poll_us },
        PollMode::Interrupt => IdlePolicy::Interrupt,
    };
    let submit = match (flags.submit, file.submit) {
        (Some(s), _) => s,
        (None, Some(s)) => s.parse().map_err(|e| format!("submit: {e}"))?,
        (None, None) => SubmitPolicy::default(),
    };
    // Flags first, then the file's (flags add to the file here, like --volume).
    let mut vhost = flags.vhost;
    for v in file.vhost {
        if v.volume.is_empty() || v.socket.as_os_str().is_empty() {
            return Err("[[vhost]]: volume and socket must not be empty".into());
        }
        vhost.push(VhostArg {
            export: v.volume,
            socket: v.socket,
        });
    }
    let iscsi = resolve_iscsi(flags.iscsi, file.iscsi)?;
    let mut volumes = flags.volumes;
    let mut access = std::collections::HashMap::new();
    for v in &file.volume {
        for id in &v.tls_allow {
            check_identity(&v.name, id)?;
        }
        access.insert(
            v.name.clone(),
            ExportAccess {
                allow: v.tls_allow.clone(),
                plaintext: v.plaintext,
            },
        );
    }
    let tls_mode = match (flags.tls, &file.tls) {
        (Some(m), _) => m,
        (None, Some(s)) => parse_tls_mode(s)?,
        (None, None) => TlsMode::Off,
    };
    let tls_creds = flags.tls_creds.clone().or(file.tls_creds.clone());
    let verify_peer = flags.tls_verify_peer || file.tls_verify_peer.unwrap_or(false);
    let tls_config = match (tls_mode, &tls_creds) {
        (TlsMode::Off, None) if verify_peer => {
            return Err("--tls-verify-peer needs --tls on or require".into())
        }
        (TlsMode::Off, None) => None,
        (TlsMode::Off, Some(_)) => return Err("--tls-creds needs --tls on or require".into()),
        (_, None) => return Err("--tls on|require needs --tls-creds DIR".into()),
        (_, Some(dir)) => Some(NbdTls::load_config(dir, verify_peer).map_err(|e| e.to_string())?),
    };
    let tls = Arc::new(NbdTls {
        mode: tls_mode,
        config: tls_config,
        access,
    });
    for v in file.volume {
        volumes.push(VolumeSpec {
            name: v.name.clone(),
            path: v.path,
            size_bytes: v
                .size
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()
                .map_err(|e| format!("volume {}: size: {e}", v.name))?,
            block_size: v.block_size.unwrap_or(512),
            backend: v.backend.unwrap_or(BackendKind::File),
            read_only: v.read_only,
            direct: v.direct.unwrap_or(true),
            chunk_size: v
                .chunk_size
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()
                .map_err(|e| format!("volume {}: chunk_size: {e}", v.name))?
                .map_or(Ok(4096), |c| {
                    c.try_into().map_err(|_| "chunk_size too large".to_string())
                })?,
            grow: v.grow,
        });
    }
    // Only for a data dir without a volume list (see `catalog`).
    let volumes_implicit = volumes.is_empty();
    if volumes.is_empty() {
        // Its size is filled in below: 1 GiB for a new file; an existing vol0.img is
        // served at its own size (never grown, see `grow`).
        volumes.push(VolumeSpec::file(
            DEFAULT_VOLUME,
            Some(data_dir.join(format!("{DEFAULT_VOLUME}.img"))),
        ));
    }
    for v in volumes.iter_mut() {
        if let Some(p) = v.path.take() {
            v.path = Some(absolute(p)?);
        }
    }
    // A file volume given without a size: use the file's size, or the default for a new file.
    for v in volumes.iter_mut() {
        if v.backend == BackendKind::File && v.size_bytes.is_none() {
            if let Some(p) = &v.path {
                if !p.exists() {
                    v.size_bytes = Some(DEFAULT_VOLUME_BYTES);
                }
            }
        }
    }
    let max_connections = flags
        .max_connections
        .or(file.max_connections)
        .unwrap_or(1024);
    if max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    let commit_queue_depth = flags
        .commit_queue_depth
        .or(file.commit_queue_depth)
        .unwrap_or(DEFAULT_COMMIT_QUEUE_DEPTH);
    if !(1..=COMMIT_QUEUE_DEPTH_MAX).contains(&commit_queue_depth) {
        return Err(format!(
            "--commit-queue-depth must be within 1..={COMMIT_QUEUE_DEPTH_MAX}"
        ));
    }
    let handshake_timeout = Duration::from_secs(
        flags
            .handshake_timeout_secs
            .or(file.handshake_timeout_secs)
            .unwrap_or(10)
            .max(1),
    );
    let admission = AdmissionConfig {
        buffer_budget_bytes: match (flags.buffer_budget_bytes, file.buffer_budget) {
            (Some(b), _) => b,
            (None, Some(s)) => s.bytes().map_err(|e| format!("buffer_budget: {e}"))?,
            (None, None) => DEFAULT_BUFFER_BUDGET_BYTES,
        },
        max_handshakes: flags
            .max_handshakes
            .or(file.max_handshakes)
            .unwrap_or(DEFAULT_MAX_HANDSHAKES),
        request_timeout: flags
            .request_timeout_secs
            .or(file.request_timeout_secs)
            .map_or(DEFAULT_REQUEST_TIMEOUT, Duration::from_secs),
    };
    admission.validate()?;
    // Sockets open at once: the served connections and the negotiating ones that
    // `admission` lets exist beside them.
    let sockets = max_connections.saturating_add(admission.max_handshakes);
    let max_in_flight = slab_size(flags.max_in_flight.or(file.max_in_flight), sockets)?;
    Ok(Resolved {
        server: ServerConfig {
            listen,
            reactor: ReactorConfig {
                cores,
                idle,
                submit,
                max_in_flight,
                ..ReactorConfig::default()
            },
            volumes,
            max_connections,
            commit_queue_depth,
            handshake_timeout,
            data_dir: data_dir.clone(),
            volumes_implicit,
            rebind: flags.rebind,
            admission,
            tls,
            iscsi,
        },
        rpc,
        rpc_default,
        data_dir,
        vhost,
    })
}

/// The iSCSI portal from `--iscsi` and `[iscsi]`: on when either is given; the flag's
/// address wins over the file's.
fn resolve_iscsi(
    flag: Option<String>,
    file: Option<FileIscsi>,
) -> Result<Option<IscsiConfig>, String> {
    if flag.is_none() && file.is_none() {
        return Ok(None);
    }
    let file = file.unwrap_or_default();
    let addr = flag
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_ISCSI_LISTEN.to_string());
    let listen = addr
        .parse()
        .map_err(|_| format!("invalid --iscsi {addr:?}: use ADDR:PORT, e.g. 127.0.0.1:3260"))?;
    let prefix = file
        .iqn_prefix
        .unwrap_or_else(|| DEFAULT_ISCSI_PREFIX.to_string());
    ringblk_iscsi::names::check_iscsi_name(&format!("{prefix}:x"))
        .map_err(|e| format!("[iscsi] iqn_prefix {prefix:?}: {e}"))?;
    let chap = match (file.chap_user, file.chap_secret) {
        (None, None) => None,
        (Some(user), Some(secret)) if !user.is_empty() && secret.len() >= 12 => {
            Some(ringblk_iscsi::login::ChapConfig {
                initiator: ringblk_iscsi::login::ChapCredentials {
                    user,
                    secret: secret.into_bytes(),
                },
                target: None,
            })
        }
        _ => return Err(
            "[iscsi]: chap_user and chap_secret go together; the secret needs at least 12 bytes"
                .into(),
        ),
    };
    Ok(Some(IscsiConfig {
        listen,
        prefix,
        chap,
    }))
}

/// FLUSH/FUA requests queued for one volume's group commit at most; more wait on
/// their reactor (`persist` module docs).
pub const DEFAULT_COMMIT_QUEUE_DEPTH: usize =
    ringblk_target::target::Target::DEFAULT_COMMIT_QUEUE_DEPTH;
const COMMIT_QUEUE_DEPTH_MAX: usize = 1 << 20;
/// Reactor operations in flight per reactor by default.
const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
/// Slab slots kept beyond the connections' own socket operations: the listener's
/// accept, backup copy jobs, merges and zero-ahead writes.
const SLAB_RESERVE: usize = 64;

/// The per-reactor slab size. I/O that finds the slab full waits for a slot, which
/// frees when an operation in flight completes; a connection may keep a receive and
/// a send in flight indefinitely (a client that sends nothing, or reads nothing), so
/// a slab that those could fill would never free a slot for the I/O waiting on it.
/// Every reactor may get every connection, hence the floor of two per connection.
fn slab_size(asked: Option<usize>, sockets: usize) -> Result<usize, String> {
    let floor = sockets.saturating_mul(2).saturating_add(SLAB_RESERVE);
    match asked {
        None => Ok(DEFAULT_MAX_IN_FLIGHT.max(floor)),
        Some(n) if n >= floor && n <= u32::MAX as usize => Ok(n),
        Some(n) if n > u32::MAX as usize => Err(format!(
            "--max-in-flight {n} is too large (at most {})",
            u32::MAX
        )),
        Some(n) => Err(format!(
            "--max-in-flight {n} is too small for {sockets} sockets (--max-connections plus \
             --max-handshakes): each may keep a receive and a send in flight, so at least \
             {floor} are needed; raise --max-in-flight or lower --max-connections"
        )),
    }
}

/// Paths are made absolute once, at start: the durable store names files relative
/// to the data dir, and a relative data dir joined to a relative file path named a
/// file that did not exist (every FLUSH over a backup failed with ENOENT when the
/// default `./ringblk-data` was used).
fn absolute(p: PathBuf) -> Result<PathBuf, String> {
    std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Every core of `--cores LIST` must be one this process may run on (checked before
/// the start creates anything; the reactor pool would refuse it later). An empty
/// `available` (unknown) accepts any list.
fn check_cores(list: &str, cores: &[usize], available: &[usize]) -> Result<(), String> {
    match cores
        .iter()
        .find(|c| !available.is_empty() && !available.contains(c))
    {
        None => Ok(()),
        Some(c) => Err(format!(
            "--cores {list}: core {c} is not available to this process (available: {})",
            available
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )),
    }
}

fn core_ids() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn cores() {
        assert_eq!(parse_cores("0,2-4"), Ok(vec![0, 2, 3, 4]));
        assert!(parse_cores("3-1").is_err());
        assert!(parse_cores("x").is_err());
        assert!(parse_cores("").is_err());
        assert_eq!(check_cores("0-1", &[0, 1], &[0, 1, 2]), Ok(()));
        let err = check_cores("0,5", &[0, 5], &[0, 1]).expect_err("core 5");
        assert!(err.contains("core 5") && err.contains("0,1"), "{err}");
        assert_eq!(check_cores("7", &[7], &[]), Ok(()));
    }

    #[test]
    fn volumes() {
        let v = parse_volume("a=/x/y.img,size=1G,block-size=4096,read-only").expect("valid");
        assert_eq!(v.name, "a");
        assert_eq!(v.path, Some(PathBuf::from("/x/y.img")));
        assert_eq!(v.size_bytes, Some(1 << 30));
        assert_eq!(v.block_size, 4096);
        assert!(v.read_only);
        let m = parse_volume("ram=,backend=mem,size=64M").expect("valid");
        assert_eq!(m.backend, BackendKind::Mem);
        assert!(m.path.is_none());
        assert!(parse_volume("novalue").is_err());
        assert!(parse_volume("a=b,colour=red").is_err());
        assert!(parse_volume("a=b,backend=tape").is_err());
        assert!(
            !v.grow,
            "growing an existing file is asked for, never the default"
        );
        assert!(parse_volume("a=b,size=1G,grow=true").expect("valid").grow);
        assert!(parse_volume("a=b,size=1G,grow").expect("valid").grow);
        assert!(!parse_volume("a=b,grow=false").expect("valid").grow);
        assert!(parse_volume("a=b,grow=maybe").is_err());
    }

    #[test]
    fn zero_config_defaults() {
        let r = match resolve(Flags::default()) {
            Err(e) if e.contains("no default RPC socket") => return,
            r => r.expect("defaults"),
        };
        assert_eq!(r.server.listen, DEFAULT_LISTEN.parse().expect("addr"));
        let cwd = std::env::current_dir().expect("cwd");
        // Absolute and the same as ringblk-ctl's: not under the data dir (#17).
        let euid = nix::unistd::geteuid().as_raw();
        let xdg = std::env::var_os("XDG_RUNTIME_DIR");
        if let Ok(sock) = default_rpc_socket(euid, xdg.as_deref()) {
            assert_eq!(r.rpc, sock);
            assert!(r.rpc_default);
        }
        assert_eq!(r.data_dir, cwd.join("ringblk-data"));
        assert_eq!(
            r.server.volumes[0].path.as_deref(),
            Some(cwd.join("ringblk-data/vol0.img").as_path())
        );
        assert_eq!(r.server.volumes.len(), 1);
        assert_eq!(r.server.volumes[0].name, "vol0");
        if !cwd.join("ringblk-data/vol0.img").exists() {
            assert_eq!(r.server.volumes[0].size_bytes, Some(DEFAULT_VOLUME_BYTES));
        }
        assert!(matches!(r.server.reactor.idle, IdlePolicy::Adaptive { .. }));
        assert_eq!(r.server.reactor.submit, SubmitPolicy::Eager);
    }

    /// A slab that the connections' receives and sends alone could fill would leave
    /// I/O waiting for a slot forever: refused, with both flags named.
    #[test]
    fn max_in_flight_has_a_floor_per_connection() {
        let with = |in_flight: Option<usize>, conns: Option<usize>| {
            resolve(Flags {
                max_in_flight: in_flight,
                max_connections: conns,
                max_handshakes: Some(8),
                ..Default::default()
            })
        };
        let r = with(None, None).expect("defaults");
        assert_eq!(r.server.reactor.max_in_flight, 4096);
        assert_eq!(r.server.commit_queue_depth, DEFAULT_COMMIT_QUEUE_DEPTH);
        let r = with(None, Some(4000)).expect("default grows with connections");
        assert_eq!(
            r.server.reactor.max_in_flight,
            2 * (4000 + 8) + SLAB_RESERVE
        );
        let r = with(Some(112), Some(16)).expect("2 x (16 + 8) + 64");
        assert_eq!(r.server.reactor.max_in_flight, 112);
        let err = with(Some(111), Some(16)).expect_err("below the floor");
        assert!(
            err.contains("--max-in-flight 111") && err.contains("24 sockets"),
            "{err}"
        );
        // The negotiating connections count too: without them the floor is lower.
        let r = resolve(Flags {
            max_in_flight: Some(111),
            max_connections: Some(16),
            max_handshakes: Some(1),
            ..Default::default()
        });
        assert!(r.is_ok(), "2 x (16 + 1) + 64 = 98 <= 111: {r:?}");
        let err = resolve(Flags {
            commit_queue_depth: Some(0),
            ..Default::default()
        })
        .expect_err("empty commit queue");
        assert!(err.contains("--commit-queue-depth"), "{err}");
    }

    #[test]
    fn submit_policy_from_flag_or_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "submit = \"every4\"\n").expect("write");
        let from_file = |flag: Option<SubmitPolicy>| {
            resolve(Flags {
                config: Some(p.clone()),
                submit: flag,
                ..Default::default()
            })
        };
        let r = from_file(None).expect("file");
        assert_eq!(r.server.reactor.submit, SubmitPolicy::Every { sqes: 4 });
        let r = from_file(Some(SubmitPolicy::Batch)).expect("flag wins");
        assert_eq!(r.server.reactor.submit, SubmitPolicy::Batch);
        std::fs::write(&p, "submit = \"sometimes\"\n").expect("write");
        let err = from_file(None).expect_err("bad policy");
        assert!(err.contains("submit") && err.contains("sometimes"), "{err}");
    }

    /// TOML sizes follow the one size grammar and may be plain integers (#17: `size =
    /// 67108864` was refused).
    #[test]
    fn toml_sizes_are_integers_or_the_size_grammar() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "rpc = \"/tmp/x.sock\"\nbuffer_budget = 67108864\n[[volume]]\nname = \"a\"\nbackend = \"null\"\nsize = 67108864\nchunk_size = 8192\n[[volume]]\nname = \"b\"\nbackend = \"null\"\nsize = \"1.5G\"\n",
        )
        .expect("write");
        let flags = Flags {
            config: Some(p.clone()),
            ..Default::default()
        };
        let r = resolve(flags.clone()).expect("integer sizes");
        assert_eq!(r.server.volumes[0].size_bytes, Some(64 << 20));
        assert_eq!(r.server.volumes[0].chunk_size, 8192);
        assert_eq!(r.server.volumes[1].size_bytes, Some(3 << 29));
        assert_eq!(r.server.admission.buffer_budget_bytes, 64 << 20);
        assert!(!r.rpc_default);
        std::fs::write(&p, "[[volume]]\nname = \"a\"\nsize = \"10gb\"\n").expect("write");
        let err = resolve(flags).expect_err("ambiguous");
        assert!(
            err.contains("volume a: size") && err.contains("ambiguous"),
            "{err}"
        );
    }

    #[test]
    fn toml_file_and_flag_override() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "listen = \"127.0.0.1:20000\"\npoll = \"busy\"\n[[volume]]\nname = \"v\"\nbackend = \"null\"\nsize = \"1G\"\n",
        )
        .expect("write");
        let r = resolve(Flags {
            config: Some(p.clone()),
            listen: Some("127.0.0.1:20001".into()),
            ..Default::default()
        })
        .expect("resolve");
        assert_eq!(r.server.listen, "127.0.0.1:20001".parse().expect("addr"));
        assert_eq!(r.server.reactor.idle, IdlePolicy::Busy);
        assert_eq!(r.server.volumes[0].backend, BackendKind::Null);
        std::fs::write(&p, "listn = 1\n").expect("write");
        let err = resolve(Flags {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("unknown key");
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn admission_limits_from_flag_or_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "buffer_budget = \"64M\"\nmax_handshakes = 8\nrequest_timeout_secs = 5\n",
        )
        .expect("write");
        let r = resolve(Flags {
            config: Some(p.clone()),
            max_handshakes: Some(9),
            ..Default::default()
        })
        .expect("resolve");
        let a = &r.server.admission;
        assert_eq!(a.buffer_budget_bytes, 64 << 20);
        assert_eq!(a.max_handshakes, 9, "the flag wins");
        assert_eq!(a.request_timeout, Duration::from_secs(5));
        let d = resolve(Flags::default())
            .expect("defaults")
            .server
            .admission;
        assert_eq!(d, AdmissionConfig::default());
        // Below the largest request: refused, naming the flag and the minimum.
        let err = resolve(Flags {
            buffer_budget_bytes: Some(16 << 20),
            ..Default::default()
        })
        .expect_err("too small");
        assert!(
            err.contains("--buffer-budget") && err.contains("32 MiB"),
            "{err}"
        );
        std::fs::write(&p, "buffer_budget = \"lots\"\n").expect("write");
        let err = resolve(Flags {
            config: Some(p),
            ..Default::default()
        })
        .expect_err("bad size");
        assert!(err.contains("buffer_budget"), "{err}");
    }

    /// `--iscsi` and `[iscsi]`: off unless one is given; the flag's address wins; CHAP
    /// needs both halves and a secret of 12 bytes or more (the refusals are the
    /// negative controls).
    #[test]
    fn iscsi_flag_and_table_resolve() {
        assert_eq!(resolve_iscsi(None, None), Ok(None));
        let on = resolve_iscsi(Some(DEFAULT_ISCSI_LISTEN.into()), None)
            .ok()
            .flatten()
            .expect("on");
        assert_eq!(on.listen.to_string(), "127.0.0.1:3260");
        assert_eq!(on.prefix, DEFAULT_ISCSI_PREFIX);
        assert_eq!(on.chap, None);
        let table = || FileIscsi {
            listen: Some("127.0.0.2:3261".into()),
            iqn_prefix: Some("iqn.2027-01.org.example".into()),
            chap_user: Some("alice".into()),
            chap_secret: Some("s3cretpasswd12".into()),
        };
        let both = resolve_iscsi(Some("127.0.0.3:3262".into()), Some(table()))
            .ok()
            .flatten()
            .expect("on");
        assert_eq!(both.listen.to_string(), "127.0.0.3:3262");
        assert_eq!(both.prefix, "iqn.2027-01.org.example");
        assert_eq!(
            both.chap.map(|c| (c.initiator.user, c.initiator.secret)),
            Some(("alice".to_string(), b"s3cretpasswd12".to_vec()))
        );
        let file_only = resolve_iscsi(None, Some(table()))
            .ok()
            .flatten()
            .expect("on");
        assert_eq!(file_only.listen.to_string(), "127.0.0.2:3261");
        let short = FileIscsi {
            chap_secret: Some("short".into()),
            ..table()
        };
        assert!(resolve_iscsi(None, Some(short)).is_err());
        let half = FileIscsi {
            chap_secret: None,
            ..table()
        };
        assert!(resolve_iscsi(None, Some(half)).is_err());
        let bad_prefix = FileIscsi {
            iqn_prefix: Some("IQN with spaces".into()),
            ..table()
        };
        assert!(resolve_iscsi(None, Some(bad_prefix)).is_err());
        assert!(resolve_iscsi(Some("nowhere".into()), None).is_err());
    }

    /// `--vhost`'s grammar: the first `=` splits, a backup export keeps its `@`, and
    /// a missing half is an error naming the form.
    #[test]
    fn vhost_flag_parses_vol_and_socket() {
        let a = parse_vhost("vol0@mon=/tmp/a=b.sock").expect("parse");
        assert_eq!(a.export, "vol0@mon");
        assert_eq!(a.socket, PathBuf::from("/tmp/a=b.sock"));
        for bad in ["vol0", "=/tmp/x", "vol0=", ""] {
            let e = parse_vhost(bad).expect_err(bad);
            assert!(e.contains("VOL=SOCKET_PATH"), "{e}");
        }
    }

    /// `[[vhost]]` tables add exports after the `--vhost` flags; an unknown key is
    /// refused like everywhere in the file.
    #[test]
    fn vhost_tables_in_the_config_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[[vhost]]\nvolume = \"vol0@b\"\nsocket = \"/run/b.vhost\"\n",
        )
        .expect("write");
        let r = resolve(Flags {
            config: Some(file.clone()),
            vhost: vec![parse_vhost("vol0=/run/a.vhost").expect("flag")],
            ..Default::default()
        })
        .expect("resolve");
        let got: Vec<_> = r
            .vhost
            .iter()
            .map(|v| (v.export.as_str(), v.socket.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("vol0", PathBuf::from("/run/a.vhost")),
                ("vol0@b", PathBuf::from("/run/b.vhost"))
            ]
        );
        std::fs::write(
            &file,
            "[[vhost]]\nvolume = \"v\"\nsocket = \"/s\"\nmode = 1\n",
        )
        .expect("write");
        let e = resolve(Flags {
            config: Some(file),
            ..Default::default()
        })
        .expect_err("unknown key");
        assert!(e.contains("mode"), "{e}");
    }

    /// TLS settings that cannot work are refused at start, not at the first client
    /// (#16): a mode without credentials, credentials or verification without a
    /// mode, an allow-list entry of no known kind.
    #[test]
    fn tls_settings_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let bad = |flags: Flags, what: &str| {
            let err = resolve(flags).expect_err(what);
            assert!(err.contains("tls"), "{what}: {err}");
        };
        bad(
            Flags {
                tls: Some(TlsMode::On),
                ..Default::default()
            },
            "on without creds",
        );
        bad(
            Flags {
                tls_creds: Some(dir.path().to_path_buf()),
                ..Default::default()
            },
            "creds without a mode",
        );
        bad(
            Flags {
                tls_verify_peer: true,
                ..Default::default()
            },
            "verify without a mode",
        );
        // Credentials that are not there name the file.
        let err = resolve(Flags {
            tls: Some(TlsMode::Require),
            tls_creds: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .expect_err("missing files");
        assert!(err.contains("server-cert.pem"), "{err}");
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[[volume]]\nname = \"a\"\nbackend = \"null\"\nsize = 4096\ntls_allow = [\"alice\"]\n",
        )
        .expect("write");
        bad(
            Flags {
                config: Some(p.clone()),
                ..Default::default()
            },
            "allow entry without a kind",
        );
        // Control: the same file with a known kind resolves (TLS off: hidden).
        std::fs::write(
            &p,
            "[[volume]]\nname = \"a\"\nbackend = \"null\"\nsize = 4096\ntls_allow = [\"dns:alice\"]\n",
        )
        .expect("write");
        let r = resolve(Flags {
            config: Some(p),
            ..Default::default()
        })
        .expect("valid allow-list");
        assert_eq!(r.server.tls.access["a"].allow, ["dns:alice"]);
    }
}
