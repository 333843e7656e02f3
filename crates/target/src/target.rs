//! The block device layer's root object: every volume, the persisted list of them,
//! and the reactors they are served on. What a server (the `ringblk` binary, a test
//! harness) holds to add, remove, find and start volumes; front ends reach volumes
//! through it ([`Target::open`], and a front end's catalog of what it serves reads
//! the [`Registry`]).
//!
//! Layer: rank 12, the top of the layer; may import every module of it. It imports
//! no front end and nothing of the server's listeners, config or RPC.
//!
//! # Ownership
//! `Target` owns the [`Registry`] (front ends read it through [`Target::registry`])
//! and the catalog: the persisted volume
//! list and the volumes of it that could not be opened. Volumes are `Arc`s: a
//! removed volume lives on while a connection, request or merge holds it.
//!
//! # Ordering and durability
//! Creates and deletes serialise on the catalog's mutex. `add_volume` answers once
//! the list naming the volume is durable; `remove_volume` marks the volume removed,
//! destroys its manifest, tells its users (`events`: `BdevEvent::Removed` to every
//! view), then writes the list without it (`catalog` module docs: # Durability).
//!
//! # Threads
//! Every method here runs on a control thread (RPC, start), never on a reactor:
//! removal waits for an event round and for the volume's last requests (bounded).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use ringblk_reactor::ReactorHandle;

use crate::bdev::{Bdev, OpenError};
use crate::events::BdevEvent;
use crate::spec::VolumeSpec;
use crate::stats::Label;
use crate::volume::{BackupId, View};
use crate::volume::{Volume, VolumeError};

/// Why the volumes could not be opened at start, or the list not written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The persisted volume list cannot be read or written, or the configuration
    /// contradicts it.
    #[error("{0}")]
    Catalog(String),
}

/// Every volume, the catalog and the reactors (module docs).
pub struct Target {
    registry: Arc<Registry>,
    /// Where volumes keep their deltas, journals and manifests, and the volume list.
    data_dir: PathBuf,
    /// Reactors the volumes are served on (sizes their per-reactor arrays).
    reactor_count: usize,
    /// FLUSH/FUA requests queued per volume for its group commit at most.
    commit_queue_depth: usize,
    /// Set once by [`start`](Self::start), when the reactors run.
    reactors: OnceLock<Arc<[ReactorHandle]>>,
    /// The persisted volume list and the volumes of it that could not be opened
    /// (see `catalog`). Held across a create or delete: they change it in turn.
    catalog: Mutex<Catalog>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("data_dir", &self.data_dir)
            .field("reactor_count", &self.reactor_count)
            .finish()
    }
}

/// What `catalog` persists, and what of it failed at start.
#[derive(Default)]
struct Catalog {
    specs: Vec<VolumeSpec>,
    /// Volume name → why it is not served (left out at start; still listed).
    failed: std::collections::BTreeMap<String, String>,
}

impl Catalog {
    fn save(&self, data_dir: &std::path::Path) -> std::io::Result<()> {
        crate::catalog::save(
            data_dir,
            &crate::catalog::VolumeList::new(self.specs.clone()),
        )
    }
}

/// The spec a volume is persisted with: its size and an absolute path, so the
/// next start opens the same thing whatever its working directory.
fn persisted_spec(v: &Volume) -> VolumeSpec {
    let mut s = v.spec().clone();
    s.size_bytes = Some(v.size_bytes());
    s.path = s.path.map(|p| std::path::absolute(&p).unwrap_or(p));
    s
}

/// How long `volume_delete` waits for the deleted volume's last requests before it
/// lets its base file go anyway to whoever outlives them (the lock then goes with
/// the volume's last reference).
const DELETE_IDLE_WAIT: Duration = Duration::from_secs(5);

/// Releases a deleted volume's write lock on its base once none of its requests
/// runs any more: its connections are closing and take no new ones, so from then on
/// nothing of it writes the file, although a client that stops reading can keep the
/// volume itself alive for a long time. Its deltas need no such release: a
/// re-created volume names its own (`durable::manifest::file_stem`).
fn release_base_when_idle(v: &Volume) {
    let deadline = std::time::Instant::now() + DELETE_IDLE_WAIT;
    loop {
        let busy = v.requests_in_flight();
        if busy == 0 {
            v.backend().release_write_lock();
            return;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                volume = v.name(),
                requests = busy,
                "deleted volume still has requests running; its base stays locked until they end"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Target {
    /// An empty target: no volume yet ([`open_all`](Self::open_all),
    /// [`add_volume`](Self::add_volume)), no reactor yet ([`start`](Self::start)).
    pub fn new(data_dir: PathBuf, reactor_count: usize, commit_queue_depth: usize) -> Target {
        Target {
            registry: Arc::new(Registry::new()),
            data_dir,
            reactor_count,
            commit_queue_depth,
            reactors: OnceLock::new(),
            catalog: Mutex::new(Catalog::default()),
        }
    }

    /// The reactors run: volumes are served from now on, and the releases a stop
    /// interrupted continue. Call it once.
    pub fn start(&self, reactors: Arc<[ReactorHandle]>) {
        let _ = self.reactors.set(reactors.clone());
        for v in self.registry.list() {
            crate::merge::resume_merges(&reactors, &v);
        }
    }

    /// The reactors, once [`start`](Self::start)ed.
    pub fn reactors(&self) -> Option<&Arc<[ReactorHandle]>> {
        self.reactors.get()
    }

    /// Every volume, by name (front ends list and resolve their exports in it).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Opens `VOL` or `VOL@BACKUP` in the block layer ([`Registry::open`]).
    pub fn open(&self, name: &str, label: Label) -> Result<Bdev, OpenError> {
        self.registry.open(name, label)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Volumes of the persisted list that are not served, and why.
    pub fn failed_volumes(&self) -> Vec<(VolumeSpec, String)> {
        let cat = self.catalog();
        cat.specs
            .iter()
            .filter_map(|s| cat.failed.get(&s.name).map(|e| (s.clone(), e.clone())))
            .collect()
    }

    /// Creates a volume (`volume_create`) and makes it visible to new connections;
    /// it is in the persisted volume list when this returns Ok.
    pub fn add_volume(&self, spec: VolumeSpec) -> Result<Arc<Volume>, VolumeError> {
        let mut cat = self.catalog();
        if let Some(why) = cat.failed.get(&spec.name) {
            return Err(VolumeError::Invalid {
                name: spec.name,
                reason: format!(
                    "the volume list has a volume of that name, left out at start ({why}); \
                     delete it first (its backups go with it)"
                ),
            });
        }
        let v = self.open_volume(spec, false)?;
        cat.specs.push(persisted_spec(&v));
        if let Err(source) = cat.save(&self.data_dir) {
            cat.specs.pop();
            let _ = self.registry.remove(v.name());
            return Err(VolumeError::Open {
                path: self
                    .data_dir
                    .join(crate::catalog::FILE_NAME)
                    .display()
                    .to_string(),
                source,
            });
        }
        Ok(v)
    }

    /// Opens a volume and registers it (not in the persisted list: the caller's).
    fn open_volume(&self, spec: VolumeSpec, rebind: bool) -> Result<Arc<Volume>, VolumeError> {
        if self.registry.get(&spec.name).is_some() {
            return Err(VolumeError::Exists(spec.name));
        }
        let v = Arc::new(Volume::open_with(
            spec,
            self.reactor_count,
            &self.data_dir,
            rebind,
        )?);
        v.persist.set_queue_depth(self.commit_queue_depth);
        self.registry.insert(v.clone())?;
        tracing::info!(volume = v.name(), size = v.size_bytes(), backend = %v.backend().kind(), "volume added");
        if let Some(r) = &v.recovered {
            tracing::info!(
                volume = v.name(),
                backups = ?r.backups,
                merging = ?r.merging,
                delta_chunks = r.delta_chunks,
                journal_frames = r.journal_frames,
                torn_tail_bytes = r.torn_tail_bytes,
                orphans_removed = r.orphans_removed.len(),
                unreferenced_chunks_punched = r.punched_chunks,
                ms = r.elapsed_ms,
                "recovered from the data dir"
            );
        }
        // Releases interrupted by a stop continue (once the reactors run).
        if let Some(h) = self.reactors.get() {
            crate::merge::resume_merges(h, &v);
        }
        Ok(v)
    }

    /// Removes a volume; its connections finish in-flight requests and close. It
    /// leaves the persisted list (a restart does not bring it back).
    pub fn remove_volume(&self, name: &str) -> Result<(), VolumeError> {
        let mut cat = self.catalog();
        if cat.failed.remove(name).is_some() {
            // Never opened: its backups go with it here (nothing holds them).
            crate::catalog::discard_volume_files(&self.data_dir, name);
            return self.forget_volume(&mut cat, name);
        }
        let v = self.registry.remove(name)?;
        v.persist.destroy();
        if let Some(handles) = self.reactors.get() {
            // Its users close (every view); it is out of the registry, so nobody
            // opens it again (`events` # Ordering).
            crate::events::notify(handles, &v, |_| true, BdevEvent::Removed);
            for h in handles.iter() {
                let n = name.to_string();
                let _ = h.send_blocking(
                    move |r| crate::latency::forget(r, &n),
                    Duration::from_secs(5),
                );
            }
        }
        release_base_when_idle(&v);
        tracing::info!(volume = name, "volume removed");
        self.forget_volume(&mut cat, name)
    }

    fn forget_volume(&self, cat: &mut Catalog, name: &str) -> Result<(), VolumeError> {
        cat.specs.retain(|s| s.name != name);
        cat.save(&self.data_dir).map_err(|source| {
            tracing::error!(volume = name, error = %source, "cannot write the volume list: the volume comes back at the next start");
            VolumeError::Open {
                path: self.data_dir.join(crate::catalog::FILE_NAME).display().to_string(),
                source,
            }
        })
    }

    /// Opens the volumes of the persisted list and the configuration (see
    /// `catalog`); `save_catalog` persists the list. A volume of the list that cannot be
    /// opened, or any that cannot be recovered, is left out and reported (log,
    /// `volume_list`) while the others serve; a configured volume that cannot be
    /// opened for another reason (a bad spec, a missing file) fails the start.
    pub fn open_all(
        &self,
        volumes: &[VolumeSpec],
        implicit: bool,
        rebind: &[String],
    ) -> Result<(), TargetError> {
        let list_path = self.data_dir.join(crate::catalog::FILE_NAME);
        let list = crate::catalog::load(&self.data_dir).map_err(TargetError::Catalog)?;
        let todo = crate::catalog::reconcile(list.as_ref(), volumes, implicit, rebind, &list_path)
            .map_err(TargetError::Catalog)?;
        let mut cat = self.catalog();
        for (spec, origin) in todo {
            let rebind = rebind.contains(&spec.name);
            match self.open_volume(spec.clone(), rebind) {
                Ok(v) => cat.specs.push(persisted_spec(&v)),
                Err(e)
                    if origin == crate::catalog::Origin::List
                        || matches!(e, VolumeError::Unrecoverable { .. }) =>
                {
                    tracing::error!(volume = %spec.name, error = %e, "volume left out; the others are served (ringblk-ctl volume list shows it; fix it and restart, or delete it)");
                    cat.failed.insert(spec.name.clone(), e.to_string());
                    cat.specs.push(spec);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.registry.list().is_empty() {
            tracing::warn!(list = %list_path.display(), "no volume to serve: every volume of the data dir's list was deleted or failed; create one with ringblk-ctl volume create or --volume");
        }
        crate::catalog::warn_unlisted(&self.data_dir, &cat.specs);
        Ok(())
    }

    /// Writes the volume list as `open_all` settled it, once the start can no
    /// longer fail for another reason (a start that fails changes nothing).
    pub fn save_catalog(&self) -> Result<(), TargetError> {
        self.catalog().save(&self.data_dir).map_err(|e| {
            TargetError::Catalog(format!(
                "cannot write {}: {e}",
                self.data_dir.join(crate::catalog::FILE_NAME).display()
            ))
        })
    }
}

/// Offline checks and defaults the server needs before (or without) a `Target`:
/// protocol-free facades over the private `durable`, `backend` and `persist`
/// modules, so no front end or tool names the on-disk formats (#12 step 5.3).
impl Target {
    /// FLUSH/FUA requests queued for one volume's group commit at most, unless the
    /// configuration says otherwise; more wait on their reactor (`persist` docs).
    pub const DEFAULT_COMMIT_QUEUE_DEPTH: usize = crate::persist::DEFAULT_COMMIT_QUEUE_DEPTH;

    /// `ringblk check`: reads the data dir `data_dir` (`volume`, or every volume and
    /// the volume list) and reports what does not add up. Only reads files.
    pub fn check_data_dir(data_dir: &Path, volume: Option<&str>) -> CheckReport {
        let store = crate::durable::store::DirStore::new(data_dir);
        let r = crate::durable::check::check(&store, volume);
        CheckReport {
            volumes: r.volumes,
            errors: r.errors,
            notes: r.notes,
            lines: r.lines,
        }
    }

    /// Refuses, before anything is created, a file volume whose existing file the
    /// start would refuse to open: a directory, or a non-empty file smaller than
    /// `spec.size_bytes` without `spec.grow`. A missing file is fine (it is created).
    pub fn check_volume_file(spec: &VolumeSpec, path: &Path) -> std::io::Result<()> {
        let opts = crate::backend::file::FileOptions {
            size_bytes: spec.size_bytes,
            read_only: spec.read_only,
            direct: spec.direct,
            grow: spec.grow,
        };
        crate::backend::file::check_size(path, opts)
    }
}

/// What [`Target::check_data_dir`] found: plain text lines, so the durable formats
/// stay private to the crate.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// The volumes checked.
    pub volumes: Vec<String>,
    /// Inconsistencies: a non-zero exit.
    pub errors: Vec<String>,
    /// Worth knowing, not wrong (torn tails, leftovers).
    pub notes: Vec<String>,
    /// One line per checked delta.
    pub lines: Vec<String>,
}

impl CheckReport {
    /// No inconsistency was found.
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Every volume, by name.
#[derive(Default)]
pub struct Registry {
    volumes: RwLock<BTreeMap<String, Arc<Volume>>>,
    /// Export served to clients that ask for the empty name.
    default_export: RwLock<Option<String>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn insert(&self, v: Arc<Volume>) -> Result<(), VolumeError> {
        let mut map = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(v.name()) {
            return Err(VolumeError::Exists(v.name().to_string()));
        }
        let mut def = self
            .default_export
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if def.is_none() {
            *def = Some(v.name().to_string());
        }
        map.insert(v.name().to_string(), v);
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        let mut map = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        let v = map
            .remove(name)
            .ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        v.mark_removed();
        let mut def = self
            .default_export
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if def.as_deref() == Some(name) {
            *def = map.keys().next().cloned();
        }
        Ok(v)
    }

    /// Opens `VOL` (live) or `VOL@BACKUP` (a ready backup, read-only) in the block
    /// layer for a front end that counts its requests under `label` (plan §2.1).
    pub fn open(&self, name: &str, label: Label) -> Result<Bdev, OpenError> {
        let (vol, backup) = match name.split_once('@') {
            None => (self.get(name).ok_or(OpenError::NotFound)?, None),
            Some((v, b)) => {
                let vol = self.get(v).filter(|_| !v.is_empty());
                (vol.ok_or(OpenError::NotFound)?, Some(b))
            }
        };
        if vol.is_removed() {
            return Err(OpenError::Removed);
        }
        let view = match backup {
            None => View::Live,
            Some(b) => match vol.ready_backup_delta(b) {
                Some(id) => View::Backup(BackupId(id)),
                None if vol
                    .control
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .backups
                    .iter()
                    .any(|i| i.name == b) =>
                {
                    return Err(OpenError::NotReady)
                }
                None => return Err(OpenError::NotFound),
            },
        };
        Bdev::open(vol, view, label).map_err(|_| OpenError::Removed)
    }

    /// Resolves an export name: `VOL` (the live volume) or `VOL@BACKUP` (a ready
    /// backup, read-only).
    pub fn resolve(&self, export: &str) -> Option<(Arc<Volume>, Option<String>)> {
        match export.split_once('@') {
            None => self.get(export).map(|v| (v, None)),
            Some((vol, backup)) => {
                let v = self.get(vol).filter(|_| !vol.is_empty())?;
                let ready = v.ready_backups().iter().any(|b| b == backup);
                ready.then(|| (v, Some(backup.to_string())))
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        let map = self.volumes.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() {
            let def = self
                .default_export
                .read()
                .unwrap_or_else(|p| p.into_inner());
            return def.as_ref().and_then(|d| map.get(d).cloned());
        }
        map.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Volume>> {
        let map = self.volumes.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;
    use crate::spec::BackendKind;

    /// `Target::open` (plan §2.1): live and backup names, and each way it refuses.
    #[test]
    fn open_resolves_names_and_refuses_what_is_not_there() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = Target::new(dir.path().to_path_buf(), 1, 64);
        let spec = VolumeSpec {
            name: "v".into(),
            path: None,
            size_bytes: Some(1 << 20),
            block_size: 512,
            backend: BackendKind::Mem,
            read_only: false,
            direct: false,
            chunk_size: 16 << 10,
            grow: false,
        };
        let vol = t.add_volume(spec).expect("volume");
        let live = t.open("v", Label::INTERNAL).expect("live");
        assert_eq!((live.name(), live.view()), ("v", View::Live));
        assert_eq!(
            t.open("w", Label::INTERNAL).err(),
            Some(OpenError::NotFound)
        );
        assert_eq!(
            t.open("v@b", Label::INTERNAL).err(),
            Some(OpenError::NotFound)
        );
        assert_eq!(
            t.open("@b", Label::INTERNAL).err(),
            Some(OpenError::NotFound)
        );
        // A ready backup opens read-only by its delta's id.
        vol.set_backup_exported("b", Some(7));
        let b = t.open("v@b", Label::INTERNAL).expect("backup");
        assert_eq!((b.name(), b.view()), ("v@b", View::Backup(BackupId(7))));
        assert!(b.capabilities().read_only);
        vol.mark_removed();
        assert_eq!(t.open("v", Label::INTERNAL).err(), Some(OpenError::Removed));
    }
}
