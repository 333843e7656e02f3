//! Volumes (named exports). The registry of them is `target::Registry`.
//!
//! # Sharing
//! A [`Volume`] is immutable after creation except for its counters and its
//! `removed` flag (and the control plane's own state: `control`, the published and
//! retired stacks in `image::Images`, `drain_helper`), so every reactor reads it through an `Arc` without locks. The
//! [`Registry`] map is behind an `RwLock` that only the control plane takes: the
//! handshake (to look an export up) and RPC calls. The data path never touches it.
//!
//! # Counters
//! Statistics are per reactor (`stats[reactor_id]`), each slot written by one thread
//! only, and summed on request.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use crate::backend::{self, Backend, BackendKind};
use crate::image::{Images, Stack, StackPin};
/// Moved to [`crate::spec`] (#12 step 1); re-exported so paths keep working.
pub use crate::spec::VolumeSpec;
use crate::stats::counters::VolumeCounters;
/// Moved to [`crate::stats::counters`] (#12 step 1); re-exported so paths keep working.
pub use crate::stats::counters::{bump, OpCounters, VolumeStats};
use crate::stats::Label;

/// Largest request payload served: [`crate::ops::IO_MAX_BYTES`] (moved there in #12
/// 2A so that `admission` need not import `volume`).
pub const PAYLOAD_MAX_BYTES: u32 = crate::ops::IO_MAX_BYTES;

impl VolumeSpec {
    /// What can be checked of the spec alone, without touching a file: the name,
    /// block and chunk size, what the backend needs, a given size. [`Volume::open`]
    /// runs it first, and a start runs it for every volume before it creates anything.
    pub fn validate(&self) -> Result<(), VolumeError> {
        check_name(&self.name)?;
        let name = self.name.as_str();
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(invalid(name, "block size must be 512 or 4096"));
        }
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(4096..=1 << 20).contains(&cs) || cs < self.block_size {
            return Err(invalid(
                name,
                "chunk size must be a power of two from 4 KiB to 1 MiB",
            ));
        }
        match self.backend {
            BackendKind::File if self.path.is_none() => {
                return Err(invalid(name, "a file volume needs a path"))
            }
            BackendKind::Mem | BackendKind::Null if self.size_bytes.is_none() => {
                return Err(invalid(
                    name,
                    format!("a {} volume needs a size", self.backend),
                ))
            }
            _ => {}
        }
        match self.size_bytes {
            Some(s) if s == 0 || s % self.block_size as u64 != 0 => Err(invalid(
                name,
                format!(
                    "size {s} is not a positive multiple of the block size {}",
                    self.block_size
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// A volume could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    #[error("invalid volume {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("no volume named {0:?}")]
    NotFound(String),
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Its backups in the data dir cannot be brought back (damaged, or over another
    /// base image): the server leaves the volume out and serves the others.
    #[error("volume {name:?} cannot be recovered: {reason}")]
    Unrecoverable { name: String, reason: String },
    /// Another volume or process writes the file (`filelock`).
    #[error(transparent)]
    Locked(crate::filelock::LockError),
}

/// What a client of the volume sees: the live volume, or the frozen image of one
/// of its backups (read-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Live,
    Backup(BackupId),
}

/// Names a backup for the life of its volume: the id of the delta created at its
/// switch (never reused, unlike the backup's name; see `BackupInfo::delta_id`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackupId(pub u64);

/// State of one backup of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Switched; requests of the old epoch (or of an older one still draining) are
    /// still completing. Ready once the last of them finished, however long that
    /// takes (`switchover`: # Drain).
    Draining,
    /// Frozen image complete; its export serves reads.
    Ready,
    /// Released: the delta above it is being merged down.
    Merging,
}

/// Control-plane record of a backup (the data lives in the image stack).
#[derive(Clone, Debug, Serialize)]
pub struct BackupInfo {
    pub name: String,
    pub delta_id: u64,
    pub state: BackupState,
    pub created_unix_ms: u64,
    /// Time from the command to the published switch, and to `ready`.
    pub switch_us: u64,
    pub ready_us: Option<u64>,
    /// Epoch of the stack its switch replaced: the backup is ready once no retired
    /// stack of this epoch or older is left (0 for recovered backups: ready).
    #[serde(skip)]
    pub drain_epoch: u64,
    /// When the command started (for `ready_us`); `None` when recovered.
    #[serde(skip)]
    pub started: Option<std::time::Instant>,
}

/// Something above the volume (a copy job) that keeps backups from being released
/// while it runs. The volume keeps these in [`Control::copies`] without knowing what
/// they are: the layer that defines the holder (`copyjob`) sits above this one.
pub trait BackupHold: Send + Sync + std::fmt::Debug {
    /// The holder's id (a copy job's number), for the refusal message.
    fn id(&self) -> u64;
    /// Whether it still holds anything: a finished holder is forgotten.
    fn is_running(&self) -> bool;
    /// Whether it keeps backup `name` from being released.
    fn holds(&self, name: &str) -> bool;
    /// The backup it reads (for `backup_list`'s `copy` field).
    fn backup(&self) -> &str;
    /// Progress, 0 to 100 (for `backup_list`).
    fn percent(&self) -> u64;
}

/// Volume state only the control plane touches (backup commands serialise here).
#[derive(Debug, Default)]
pub struct Control {
    pub backups: Vec<BackupInfo>,
    pub next_delta_id: u64,
    pub next_epoch: u64,
    /// Copy jobs of this volume's backups. A running one holds its backup (and its
    /// `changed_since` backup) against release; see `copyjob`'s module docs.
    pub copies: Vec<Arc<dyn BackupHold>>,
    /// The next backup's delta, created ahead of its switch (`switchover::prepare`).
    pub(crate) prepared: Option<crate::image::Delta>,
}

impl Control {
    /// The running copy job that holds backup `name`, if any (finished jobs are
    /// forgotten here: their hold ended with them).
    pub fn copy_holding(&mut self, name: &str) -> Option<Arc<dyn BackupHold>> {
        self.copies.retain(|c| c.is_running());
        self.copies.iter().find(|c| c.holds(name)).cloned()
    }
}

/// A named export.
pub struct Volume {
    /// Base backend and image stacks (first: its stacks are freed before the other
    /// fields drop, as the data path's memory).
    images: Images,
    spec: VolumeSpec,
    removed: AtomicBool,
    connections: AtomicUsize,
    stats: VolumeCounters,
    reactors: usize,
    data_dir: PathBuf,
    /// A thread is finishing drains that outlasted their command's wait
    /// (`switchover::finish_later`): at most one per volume.
    pub(crate) drain_helper: AtomicBool,
    pub(crate) control: Mutex<Control>,
    /// Ready backups (their exports), by name, with the id of the delta above each
    /// (what binds `x-ringblk:changed/NAME` to that backup, not to the name).
    /// Separate from `control` because the handshake reads it on reactor threads, and
    /// `control` is held across drains, which wait for those very reactors.
    ready_backups: RwLock<Vec<(String, u64)>>,
    /// Serialises merges of this volume's deltas: a merge captures the layer below
    /// its delta at the start, which a concurrent merge could otherwise drop.
    pub(crate) merge_lock: Mutex<()>,
    /// Manifest, journals and the committer (see `persist`).
    pub(crate) persist: crate::persist::Persist,
    /// What recovery found at open, for the log and for resuming merges.
    pub recovered: Option<RecoverySummary>,
    /// Injected errors (`fault_inject`), checked once per request.
    pub(crate) faults: crate::fault::Faults,
    /// Prefix of this volume's delta and journal file names, unique to this
    /// lifetime of the volume (`durable::manifest::file_stem`).
    file_stem: String,
}

/// What `Volume::open` recovered from the data dir.
#[derive(Clone, Debug, Serialize)]
pub struct RecoverySummary {
    pub backups: Vec<String>,
    /// Backups whose release was merging when the server stopped (resumed).
    pub merging: Vec<String>,
    pub delta_chunks: u64,
    pub journal_frames: u64,
    pub torn_tail_bytes: u64,
    pub orphans_removed: Vec<String>,
    pub punched_chunks: u64,
    pub elapsed_ms: u64,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.spec.name)
            .finish()
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> VolumeError {
    VolumeError::Invalid {
        name: name.to_string(),
        reason: reason.into(),
    }
}

/// Export names may not contain '@' (reserved for backups, `VOL@NAME`) or control
/// characters, and are at most 256 bytes.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    if name.is_empty() || name.len() > 256 {
        return Err(invalid(name, "name must be 1 to 256 bytes"));
    }
    if name
        .chars()
        .any(|c| c == '@' || c == '/' || c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            name,
            "name may not contain '@', '/', spaces or control characters",
        ));
    }
    Ok(())
}

/// Refuses to serve a manifest's deltas over another base image than the one
/// they were taken of, unless `rebind` (the operator's override). Runs before
/// recovery so that a refused volume's files are left exactly as they are.
fn check_base_identity(
    store: &crate::durable::store::DirStore,
    name: &str,
    found: Option<&crate::durable::manifest::BaseIdentity>,
    rebind: bool,
) -> Result<(), VolumeError> {
    let unrecoverable = |reason: String| VolumeError::Unrecoverable {
        name: name.to_string(),
        reason,
    };
    let m = crate::durable::manifest::Manifest::load(store, name).map_err(unrecoverable)?;
    let Some(m) = m else { return Ok(()) };
    let (Some(rec), Some(found)) = (&m.base, found) else {
        return Ok(()); // format 1 (recorded now) or not a file
    };
    if rec.matches(found) || (m.deltas.is_empty() && m.copies.is_empty()) {
        return Ok(()); // nothing lies over the base: it may change freely
    }
    if rebind {
        tracing::warn!(
            volume = name,
            recorded = %rec.describe(),
            found = %found.describe(),
            "--rebind: serving the backups over another base image than they were taken of"
        );
        return Ok(());
    }
    Err(unrecoverable(format!(
        "its backups were taken of base image {}, but the base found is {}; \
         refusing to serve them over another file (start with --rebind {name} if the \
         new file really is that image, e.g. restored from a copy)",
        rec.describe(),
        found.describe()
    )))
}

impl Volume {
    /// Opens the backend and checks the spec. `reactors` sizes the per-reactor
    /// arrays; delta images of backups go in `data_dir`.
    pub fn open(
        spec: VolumeSpec,
        reactors: usize,
        data_dir: &std::path::Path,
    ) -> Result<Volume, VolumeError> {
        Self::open_with(spec, reactors, data_dir, false)
    }

    /// [`open`](Self::open); `rebind`: serve the data dir's backups of this volume
    /// even over another base image than they were taken of (see
    /// [`check_base_identity`]), and record the new one.
    pub fn open_with(
        spec: VolumeSpec,
        reactors: usize,
        data_dir: &std::path::Path,
        rebind: bool,
    ) -> Result<Volume, VolumeError> {
        check_name(&spec.name)?;
        // Before the backend is opened: a bad spec must not create a file.
        spec.validate()?;
        let name = spec.name.as_str();
        let cs = spec.chunk_size;
        let (backend, size_bytes) = match spec.backend {
            BackendKind::File => {
                let path = spec
                    .path
                    .as_ref()
                    .ok_or_else(|| invalid(name, "a file volume needs a path"))?;
                let opts = backend::file::FileOptions {
                    size_bytes: spec.size_bytes,
                    read_only: spec.read_only,
                    direct: spec.direct,
                    grow: spec.grow,
                };
                let owner = format!("volume {name:?} (its base image)");
                backend::file::open(path, opts, &owner).map_err(|source| {
                    match crate::filelock::lock_error(&source) {
                        Some(e) => VolumeError::Locked(e.clone()),
                        None => VolumeError::Open {
                            path: path.display().to_string(),
                            source,
                        },
                    }
                })?
            }
            BackendKind::Mem => {
                let size = spec
                    .size_bytes
                    .ok_or_else(|| invalid(name, "a mem volume needs a size"))?;
                let b = backend::mem::open(name, size).map_err(|source| VolumeError::Open {
                    path: "memfd".into(),
                    source,
                })?;
                (b, size)
            }
            BackendKind::Null => {
                let size = spec
                    .size_bytes
                    .ok_or_else(|| invalid(name, "a null volume needs a size"))?;
                (backend::null::open(), size)
            }
        };
        if size_bytes == 0 || size_bytes % spec.block_size as u64 != 0 {
            return Err(invalid(
                name,
                format!(
                    "size {size_bytes} is not a positive multiple of the block size {}",
                    spec.block_size
                ),
            ));
        }
        // Durability: volumes on a file or device keep backups across restarts.
        let persistent = spec.backend == BackendKind::File;
        let mut control = Control {
            next_epoch: 1,
            next_delta_id: 1,
            ..Control::default()
        };
        let mut deltas: Vec<Arc<crate::image::Delta>> = Vec::new();
        let mut ready = Vec::new();
        let mut summary = None;
        // A new lifetime of the volume, unless recovery finds the one it continues.
        let incarnation = crate::durable::manifest::new_incarnation();
        let mut file_stem = crate::durable::manifest::file_stem(name, Some(&incarnation));
        // One store per volume: recovery, commits and the deltas' files share its
        // descriptors (`durable::store` module docs).
        let store = Arc::new(crate::durable::store::DirStore::new(data_dir));
        let (manifest, base) = if persistent {
            use crate::durable::manifest::{BaseIdentity, Manifest, ManifestCell};
            let found = match &spec.path {
                Some(p) => Some(BaseIdentity::of(p).map_err(|source| VolumeError::Open {
                    path: p.display().to_string(),
                    source,
                })?),
                None => None,
            };
            check_base_identity(&store, name, found.as_ref(), rebind)?;
            let rec =
                crate::durable::recover::recover(&*store, name, size_bytes, cs).map_err(|e| {
                    VolumeError::Unrecoverable {
                        name: name.to_string(),
                        reason: format!(
                            "recovery failed: {e} (see `ringblk check --data-dir {}`)",
                            data_dir.display()
                        ),
                    }
                })?;
            let manifest = match rec {
                None => {
                    let mut m = Manifest::new(name, size_bytes, cs);
                    m.incarnation = Some(incarnation);
                    m.base = found.clone();
                    ManifestCell::new(m, false)
                }
                Some(rec) => {
                    file_stem = rec.manifest.file_stem();
                    let mut sum = RecoverySummary {
                        backups: Vec::new(),
                        merging: Vec::new(),
                        delta_chunks: 0,
                        journal_frames: 0,
                        torn_tail_bytes: 0,
                        orphans_removed: rec.orphans_removed.clone(),
                        punched_chunks: rec.punched_chunks,
                        elapsed_ms: rec.elapsed_ms,
                    };
                    control.next_delta_id = rec.manifest.next_delta_id;
                    let direct = backend.is_direct();
                    for rd in rec.deltas {
                        sum.delta_chunks += rd.map.mapped_count();
                        sum.journal_frames += rd.frames;
                        sum.torn_tail_bytes += rd.torn_tail_bytes;
                        let entry = rd.entry.clone();
                        let d = crate::image::Delta::recovered(
                            &store, &file_stem, rd, size_bytes, cs, direct,
                        )
                        .map_err(|source| VolumeError::Open {
                            path: crate::durable::manifest::delta_name(&file_stem, entry.id),
                            source,
                        })?;
                        let merging = entry.state == crate::durable::manifest::DeltaState::Merging;
                        control.backups.push(BackupInfo {
                            name: entry.backup.clone(),
                            delta_id: entry.id,
                            state: if merging {
                                BackupState::Merging
                            } else {
                                BackupState::Ready
                            },
                            created_unix_ms: entry.created_unix_ms,
                            switch_us: 0,
                            ready_us: None,
                            drain_epoch: 0,
                            started: None,
                        });
                        if merging {
                            sum.merging.push(entry.backup.clone());
                        } else {
                            ready.push((entry.backup.clone(), entry.id));
                        }
                        sum.backups.push(entry.backup);
                        deltas.push(Arc::new(d));
                    }
                    summary = Some(sum);
                    let cell = ManifestCell::new(rec.manifest, true);
                    if cell.get().base != found {
                        // Format 1 (no identity yet), --rebind, or a base nothing
                        // lies over: the file served now is the one to check next.
                        cell.update(|m| m.base = found.clone());
                    }
                    cell
                }
            };
            (Some(manifest), found.map(|f| f.path))
        } else {
            (None, None)
        };
        let persist = crate::persist::Persist::new(name, store, manifest, base, deltas.clone());
        if summary.is_some() {
            // The identity recorded above, durable before anything is served.
            persist
                .write_manifest()
                .map_err(|source| VolumeError::Open {
                    path: crate::durable::manifest::manifest_name(name),
                    source,
                })?;
        }
        let images = Images::new(backend, size_bytes, cs, Stack::new(0, deltas, reactors));
        Ok(Volume {
            images,
            persist,
            recovered: summary,
            spec,
            removed: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            stats: VolumeCounters::new(reactors),
            reactors: reactors.max(1),
            data_dir: data_dir.to_path_buf(),
            drain_helper: AtomicBool::new(false),
            control: Mutex::new(control),
            ready_backups: RwLock::new(ready),
            merge_lock: Mutex::new(()),
            faults: crate::fault::Faults::default(),
            file_stem,
        })
    }

    /// A new delta with the next id of `ctl` (this volume's control state);
    /// `reuse` as in [`Delta::create`](crate::image::Delta::create).
    pub(crate) fn new_delta(
        &self,
        ctl: &mut Control,
        reuse: Option<(&crate::image::Delta, u64)>,
    ) -> std::io::Result<crate::image::Delta> {
        let id = ctl.next_delta_id;
        ctl.next_delta_id += 1;
        crate::image::Delta::create(
            self.persist.store(),
            self.file_stem(),
            id,
            "",
            self.size_bytes(),
            self.chunk_bytes(),
            self.backend().is_direct() || self.backend().raw_fd().is_none(),
            self.persist.persistent(),
            reuse,
        )
    }

    /// Prefix of this volume's delta and journal file names in the data dir.
    pub fn file_stem(&self) -> &str {
        &self.file_stem
    }

    pub fn chunk_bytes(&self) -> u32 {
        self.images.chunk_bytes()
    }

    /// The base backend and image stacks: what the data path works on.
    pub(crate) fn images(&self) -> &Images {
        &self.images
    }

    /// Manifest, journals and the committer.
    pub(crate) fn persist(&self) -> &crate::persist::Persist {
        &self.persist
    }

    /// Injected errors (`fault_inject`), checked once per request.
    pub fn faults(&self) -> &crate::fault::Faults {
        &self.faults
    }

    /// [`Images::pin`].
    pub(crate) fn pin(&self, reactor: usize) -> StackPin {
        self.images.pin(reactor)
    }

    /// [`Images::pin_write`].
    pub(crate) fn pin_write(&self, reactor: usize, offset: u64, len: u64) -> StackPin {
        self.images.pin_write(reactor, offset, len)
    }

    /// The current stack, for control-plane reads that do not outlive the call.
    /// The guard proves the caller holds `control`: stacks are published and freed
    /// only under it, so the current one cannot be freed during `f`.
    pub(crate) fn with_stack<R>(
        &self,
        control: &std::sync::MutexGuard<'_, Control>,
        f: impl FnOnce(&Stack) -> R,
    ) -> R {
        self.images.with_stack(control, f)
    }

    /// Publishes `stack` (the switch) and retires the old one until a drain round
    /// covers it. Call it holding `control` (stacks change only under it).
    pub(crate) fn publish(&self, control: &std::sync::MutexGuard<'_, Control>, stack: Stack) {
        self.images.publish(control, stack)
    }

    /// [`Images::retired_stacks`].
    pub(crate) fn retired_stacks(
        &self,
        control: &std::sync::MutexGuard<'_, Control>,
    ) -> Vec<(
        u64,
        Arc<crate::image::Pins>,
        Arc<crate::image::WriteTracker>,
    )> {
        self.images.retired_stacks(control)
    }

    /// [`Images::undrained_upto`].
    pub(crate) fn undrained_upto(
        &self,
        control: &std::sync::MutexGuard<'_, Control>,
        upto: u64,
    ) -> Option<u64> {
        self.images.undrained_upto(control, upto)
    }

    /// [`Images::free_drained`].
    pub(crate) fn free_drained(
        &self,
        control: &std::sync::MutexGuard<'_, Control>,
        epochs: &[u64],
    ) {
        self.images.free_drained(control, epochs)
    }

    pub fn reactors(&self) -> usize {
        self.reactors
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// Ready backups, served as `VOL@NAME` exports.
    pub fn ready_backups(&self) -> Vec<String> {
        self.ready_backups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The id of the delta above ready backup `name` (unique for the volume's life).
    pub fn ready_backup_delta(&self, name: &str) -> Option<u64> {
        let list = self.ready_backups.read().unwrap_or_else(|p| p.into_inner());
        list.iter().find(|(n, _)| n == name).map(|&(_, id)| id)
    }

    /// Exports backup `name`, whose delta is `delta` (`Some`), or stops (`None`).
    pub(crate) fn set_backup_exported(&self, name: &str, delta: Option<u64>) {
        let mut list = self
            .ready_backups
            .write()
            .unwrap_or_else(|p| p.into_inner());
        list.retain(|(b, _)| b != name);
        if let Some(id) = delta {
            list.push((name.to_string(), id));
        }
    }

    /// Requests of this volume still running, on any stack (a snapshot).
    pub(crate) fn requests_in_flight(&self) -> u64 {
        let ctl = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.with_stack(&ctl, |s| s.pins().total());
        current + self.undrained_upto(&ctl, u64::MAX).unwrap_or(0)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The reactor (of `n`) that serializes this volume's control plane: switchover
    /// rounds, merges, copy jobs. A hash of the name, so it is the same after a restart.
    pub fn home_reactor(&self, n: usize) -> usize {
        self.name()
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % n.max(1)
    }

    pub fn spec(&self) -> &VolumeSpec {
        &self.spec
    }

    pub fn size_bytes(&self) -> u64 {
        self.images.size_bytes()
    }

    pub fn block_size(&self) -> u32 {
        self.spec.block_size
    }

    pub fn read_only(&self) -> bool {
        self.spec.read_only
    }

    pub(crate) fn backend(&self) -> &Backend {
        self.images.backend()
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// A front end's connection to this volume opened (the `connections` stat).
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A front end's connection to this volume closed.
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// This reactor's counters of work that belongs to no front end's request
    /// (label `internal`; reactor ids beyond the array share the last slot).
    pub fn counters(&self, reactor: usize) -> &OpCounters {
        self.stats.get(reactor, Label::INTERNAL)
    }

    /// This reactor's counters of requests submitted under `label` (`bdev`).
    pub fn label_counters(&self, reactor: usize, label: Label) -> &OpCounters {
        self.stats.get(reactor, label)
    }

    pub fn stats(&self) -> VolumeStats {
        self.stats.stats(self.name(), self.connections())
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if self.is_removed() {
            // Its last connection or merge let go: its delta files go now (they
            // are its own, see `durable::manifest::file_stem`).
            tracing::info!(volume = self.name(), files = %self.file_stem, "deleted volume released");
        }
        if !self.persist.persistent() {
            // Nothing of a mem/null volume survives it: neither do its deltas.
            self.persist.discard_deltas();
        }
        // The image stacks are freed when `images` drops, right after this.
    }
}

/// What the server reads of a volume's control-plane state, without naming the
/// crate's private layers (`image`, `persist`): the plan's visibility rule (#12 5.3)
/// keeps images, stacks and the manifest out of every front end's reach.
impl Volume {
    /// What the volume's base is (`file`, `mem`, `null`).
    pub fn backend_kind(&self) -> BackendKind {
        self.backend().kind()
    }

    /// The base file is open O_DIRECT (false: the page cache, or not a file).
    pub fn is_direct(&self) -> bool {
        self.backend().is_direct()
    }

    /// Backups of this volume, in any state.
    pub fn backup_count(&self) -> usize {
        self.control.lock().map_or(0, |c| c.backups.len())
    }

    /// Deltas in the current image stack (one per live backup, plus merging ones).
    pub fn delta_count(&self) -> usize {
        let ctl = self.control.lock().unwrap_or_else(|p| p.into_inner());
        self.with_stack(&ctl, |s| s.deltas.len())
    }

    /// Group commits run, and the FLUSH/FUA requests and merges they served.
    pub fn commit_counts(&self) -> (u64, u64) {
        self.persist.commit_counts()
    }

    /// The volume keeps a manifest (its backups survive a restart).
    pub fn persistent(&self) -> bool {
        self.persist.persistent()
    }

    /// Makes every acknowledged write and the manifest durable, blocking the calling
    /// thread (not a reactor) until the group commit that covers them is done.
    pub fn sync_metadata(&self) -> std::io::Result<()> {
        self.persist.commit_blocking()
    }
}
