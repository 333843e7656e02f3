//! Backup copy jobs (`backup_copy`): a ready backup's frozen image copied out to a
//! file or block device on the server host, whole or incrementally, with a SHA-256
//! of the result that equals `sha256sum DEST`.
//!
//! # Where the work runs
//! A job runs on its volume's home reactor (`Volume::home_reactor`, the reactor
//! that owns the volume's control plane). It walks the image in units of
//! [`UNIT_BYTES`], reads each through [`io::read`] — a fresh stack pin per unit and
//! `backup_view(name)` taken from that pin, like a read on the `VOL@NAME` export —
//! and writes DEST with io_uring writes on the same ring. At most [`WINDOW`] units are
//! between "issued" and "hashed", which bounds the I/O in flight and the memory held
//! (about two buffers of a unit each).
//!
//! SHA-256 runs on a helper thread per job, the role SPDK gives its accel framework:
//! hashing costs as much CPU per byte as the copy itself, and a reactor that hashes a
//! MiB stalls every connection it serves for that long. The reactor hands the hasher
//! each unit in image order; the hasher wakes the reactor with a message when a unit
//! is hashed, which opens the window for the next one.
//!
//! # Sparseness
//! A chunk is a *hole* when no delta of the view holds it and the base reports it as
//! reading zeros (`Backend::block_status`); a unit made of holes only is not read.
//! Data read is checked for zeros chunk by chunk, and zero chunks are not written
//! either. A full copy truncates a regular DEST to zero and then to the volume size
//! first, so whatever is not written reads as zeros and stays unallocated. A block
//! device cannot be truncated: there the skipped ranges are zeroed with fallocate
//! `ZERO_RANGE` (the kernel issues write-zeroes, or writes zeros itself).
//!
//! # Incremental copy
//! With `changed_since = OLDER`, only chunks *changed since OLDER* are written: those
//! held by a delta from the one created at OLDER's switch up to the copied backup's
//! view top — the rule of the `x-ringblk:changed/OLDER` metadata context
//! ([`io::changed_layers`]). DEST must already hold OLDER's copy (only its size is
//! checked); changed chunks that now read as zeros are punched (regular file) or
//! zeroed (block device). The rest of the image is still read (holes excepted) so
//! that the SHA-256 covers all of it: incremental copies save writes, not reads.
//!
//! # Release while copying
//! A running job *holds* its backup and its `changed_since` backup: `backup_release`
//! of either is refused with EBUSY (`SwitchError::Copying`) instead of cancelling the
//! copy — a copy someone started is not lost to another command; cancel it first
//! (`backup_copy_cancel`). The hold is the job's entry in `Control::copies`, checked
//! under the control lock that also serialises `backup_release`; it ends when the job
//! leaves the running state, an atomic store, so the reactor never takes the control
//! lock (held across drains, which wait for reactors).
//!
//! # Cancellation
//! `backup_copy_cancel` sets a flag and wakes the reactor. The job issues nothing
//! more, waits for its reads and writes in flight (their buffers belong to the kernel
//! until their completions) and then reports `cancelled`. DEST is left as it is,
//! partial. A server shutdown or the volume's deletion stops a job the same way and
//! reports `failed`.
//!
//! # Durability
//! `done` (with the SHA-256) is reported only after an fdatasync of DEST succeeded.
//!
//! # One writer
//! A job holds DEST's write lock (`filelock`) from its open, before anything in
//! DEST changes, until the job is dropped: a DEST that a volume (its base or a
//! delta) or another job or process writes is refused untouched.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ringblk_reactor::{falloc, AlignedBuf, Callback, FileRef, IoBuf, Op, Reactor, ReactorHandle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::datapath::{layered as io, status};
use crate::durable::manifest::CopyEntry;
use crate::error::BlockError;
use crate::extent::ExtentFlags;
use crate::filelock::WriteLock;
use crate::image::Delta;
use crate::volume::{BackupState, Control, Volume};

/// Bytes per unit of work: one read, its writes, one hash step. A multiple of every
/// chunk size (at most 1 MiB).
pub const UNIT_BYTES: u64 = 1 << 20;
/// Units issued and not yet hashed, at most.
pub const WINDOW: u64 = 8;
/// Copy jobs running at once per server, at most.
pub const JOBS_RUNNING_MAX: usize = 16;
/// Finished jobs remembered for `backup_copy_status`, at most (oldest forgotten).
pub const JOBS_KEPT_MAX: usize = 64;
/// Back-off before re-offering an operation the reactor's slab had no room for.
const RETRY: Duration = Duration::from_millis(1);
/// How long RPC threads wait to hand a message to a reactor with a full inbox.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum JobState {
    Running = 0,
    Done = 1,
    Failed = 2,
    Cancelled = 3,
}

impl JobState {
    fn from_u8(v: u8) -> JobState {
        match v {
            0 => JobState::Running,
            1 => JobState::Done,
            2 => JobState::Failed,
            _ => JobState::Cancelled,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    #[error("volume {0:?} has no backup named {1:?}")]
    NotFound(String, String),
    #[error("backup {0:?} is {1:?}; only a ready backup can be copied")]
    NotReady(String, BackupState),
    #[error("changed_since {0:?} must name a backup taken before {1:?}")]
    NotOlder(String, String),
    #[error("cannot use {path}: {source}")]
    Dest {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is neither a regular file nor a block device")]
    DestKind(String),
    #[error("{0} is one of the volume's own files")]
    DestIsVolume(String),
    /// Another volume, job or process writes DEST.
    #[error(transparent)]
    Locked(crate::filelock::LockError),
    #[error("{path} is {have} bytes; {need}")]
    DestSize {
        path: String,
        have: u64,
        need: String,
    },
    #[error("{0} copy jobs are running already")]
    TooMany(usize),
    #[error("no copy job {0}")]
    NoJob(u64),
    #[error("the server has no reactors")]
    NoReactors,
    #[error("cannot start the job: {0}")]
    Start(String),
}

/// Progress and outcome of one job, shared by its reactor, its hasher thread and the
/// RPC threads. Counters only grow; the state leaves `Running` once.
pub struct CopyShared {
    pub id: u64,
    pub volume: String,
    pub backup: String,
    pub changed_since: Option<String>,
    pub dest: PathBuf,
    pub bytes_total: u64,
    home: usize,
    started: Instant,
    state: AtomicU8,
    cancel: AtomicBool,
    /// Bytes hashed, in image order (the progress figure).
    bytes_done: AtomicU64,
    /// Data bytes written to DEST (zeroed ranges not counted).
    bytes_written: AtomicU64,
    /// Bytes made zero in DEST by fallocate (incremental copies, block devices).
    bytes_zeroed: AtomicU64,
    units_hashed: AtomicU64,
    elapsed_ms_at_end: AtomicU64,
    sha256: OnceLock<String>,
    error: OnceLock<String>,
}

impl std::fmt::Debug for CopyShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyShared")
            .field("id", &self.id)
            .field("backup", &self.backup)
            .field("state", &self.state())
            .finish()
    }
}

impl CopyShared {
    pub fn state(&self) -> JobState {
        JobState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn is_running(&self) -> bool {
        self.state() == JobState::Running
    }

    /// Whether this job keeps backup `name` from being released.
    pub fn holds(&self, name: &str) -> bool {
        self.is_running() && (self.backup == name || self.changed_since.as_deref() == Some(name))
    }

    pub fn percent(&self) -> u64 {
        let done = self.bytes_done.load(Ordering::Relaxed) as u128;
        (done * 100 / (self.bytes_total.max(1) as u128)) as u64
    }

    /// Ends the job (first call wins). The error is published before the state, so
    /// a reader that sees `failed` sees why.
    fn finish(&self, state: JobState, error: Option<String>) {
        debug_assert!(state != JobState::Running);
        if let Some(e) = error {
            let _ = self.error.set(e);
        }
        let ms = self.started.elapsed().as_millis() as u64;
        let _ = self
            .state
            .compare_exchange(
                JobState::Running as u8,
                state as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map(|_| self.elapsed_ms_at_end.store(ms, Ordering::Release));
    }

    /// The `backup_copy_status` result.
    pub fn status_json(&self) -> Value {
        let state = self.state();
        let done = self.bytes_done.load(Ordering::Relaxed);
        let elapsed_ms = match state {
            JobState::Running => self.started.elapsed().as_millis() as u64,
            _ => self.elapsed_ms_at_end.load(Ordering::Acquire),
        };
        let rate = (done as u128 * 1000 / elapsed_ms.max(1) as u128) as u64;
        let eta = match state {
            JobState::Running if rate > 0 => {
                Some(json!(self.bytes_total.saturating_sub(done).div_ceil(rate)))
            }
            JobState::Running => None,
            _ => Some(json!(0)),
        };
        let mut v = json!({
            "job": self.id,
            "volume": self.volume,
            "name": self.backup,
            "export": format!("{}@{}", self.volume, self.backup),
            "dest": self.dest,
            "changed_since": self.changed_since,
            "state": state,
            "bytes_done": done,
            "bytes_total": self.bytes_total,
            "bytes_written": self.bytes_written.load(Ordering::Relaxed),
            "bytes_zeroed": self.bytes_zeroed.load(Ordering::Relaxed),
            "rate_bytes_per_sec": rate,
            "eta_secs": eta,
            "elapsed_ms": elapsed_ms,
        });
        if state == JobState::Done {
            v["sha256"] = json!(self.sha256.get());
        }
        if let Some(e) = self.error.get() {
            v["error"] = json!(e);
        }
        v
    }
}

impl crate::volume::BackupHold for CopyShared {
    fn id(&self) -> u64 {
        self.id
    }

    fn is_running(&self) -> bool {
        CopyShared::is_running(self)
    }

    fn holds(&self, name: &str) -> bool {
        CopyShared::holds(self, name)
    }

    fn backup(&self) -> &str {
        &self.backup
    }

    fn percent(&self) -> u64 {
        CopyShared::percent(self)
    }
}

/// Every copy job of the server, by id (the RPC methods' table).
#[derive(Default)]
pub struct CopyJobs {
    jobs: Mutex<BTreeMap<u64, Arc<CopyShared>>>,
    next_id: AtomicU64,
}

impl CopyJobs {
    pub fn new() -> CopyJobs {
        CopyJobs::default()
    }

    pub fn get(&self, id: u64) -> Result<Arc<CopyShared>, CopyError> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.get(&id).cloned().ok_or(CopyError::NoJob(id))
    }

    fn running(&self) -> usize {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.values().filter(|j| j.is_running()).count()
    }

    /// Adds a job, forgetting the oldest finished ones beyond [`JOBS_KEPT_MAX`].
    fn insert(&self, job: Arc<CopyShared>) -> Result<(), CopyError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if jobs.values().filter(|j| j.is_running()).count() >= JOBS_RUNNING_MAX {
            return Err(CopyError::TooMany(JOBS_RUNNING_MAX));
        }
        let finished: Vec<u64> = jobs
            .values()
            .filter(|j| !j.is_running())
            .map(|j| j.id)
            .collect();
        let excess = finished.len().saturating_sub(JOBS_KEPT_MAX - 1);
        for id in &finished[..excess] {
            jobs.remove(id);
        }
        jobs.insert(job.id, job);
        Ok(())
    }

    /// Asks job `id` to stop; it reports `cancelled` once its I/O has drained.
    pub fn cancel(
        &self,
        id: u64,
        reactors: &[ReactorHandle],
    ) -> Result<Arc<CopyShared>, CopyError> {
        let job = self.get(id)?;
        if job.is_running() {
            job.cancel.store(true, Ordering::Release);
            if let Some(h) = reactors.get(job.home) {
                // The job also notices at its next completion; this wakes an idle one.
                let _ = h.send_blocking(move |r| pump_id(r, id), SEND_TIMEOUT);
            }
        }
        Ok(job)
    }
}

/// What `backup_copy` asks for.
#[derive(Clone, Copy, Debug)]
pub struct CopySpec<'a> {
    pub backup: &'a str,
    pub dest: &'a Path,
    pub changed_since: Option<&'a str>,
}

/// Checks that the backups exist, are ready and (for an incremental copy) are in
/// switch order. Returns nothing: the caller holds `ctl` across what depends on it.
fn validate(
    ctl: &std::sync::MutexGuard<'_, Control>,
    vol: &Volume,
    spec: &CopySpec<'_>,
) -> Result<(), CopyError> {
    let ready = |name: &str| -> Result<(), CopyError> {
        let b = ctl
            .backups
            .iter()
            .find(|b| b.name == name)
            .ok_or_else(|| CopyError::NotFound(vol.name().into(), name.into()))?;
        match b.state {
            BackupState::Ready => Ok(()),
            s => Err(CopyError::NotReady(name.into(), s)),
        }
    };
    ready(spec.backup)?;
    if let Some(older) = spec.changed_since {
        ready(older)?;
        // Deltas are in switch order; each is tagged with the backup below it.
        let order = vol.with_stack(ctl, |s| {
            let pos = |n: &str| s.deltas.iter().position(|d| d.backup == n);
            (pos(older), pos(spec.backup))
        });
        if !matches!(order, (Some(a), Some(b)) if a < b) {
            return Err(CopyError::NotOlder(older.into(), spec.backup.into()));
        }
    }
    Ok(())
}

/// How DEST gets its zeros where nothing is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestKind {
    Regular,
    Block,
}

fn dest_error(path: &Path) -> impl Fn(std::io::Error) -> CopyError + '_ {
    move |source| CopyError::Dest {
        path: path.display().to_string(),
        source,
    }
}

/// Opens DEST (creating a regular file for a full copy) and refuses what must never
/// be overwritten: something that is neither a file nor a block device, one of
/// the volume's own files (its base or a delta), or a file another writer holds;
/// returns it with its write lock (module docs: # One writer).
fn open_dest(
    vol: &Volume,
    ctl: &std::sync::MutexGuard<'_, Control>,
    path: &Path,
    backup: &str,
    incremental: bool,
) -> Result<(File, DestKind, WriteLock), CopyError> {
    let shown = || path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!incremental)
        .open(path)
        .map_err(dest_error(path))?;
    let meta = file.metadata().map_err(dest_error(path))?;
    let kind = if meta.file_type().is_file() {
        DestKind::Regular
    } else if meta.file_type().is_block_device() {
        DestKind::Block
    } else {
        return Err(CopyError::DestKind(shown()));
    };
    let same = |fd: std::os::fd::RawFd| {
        // SAFETY: fstat writes into a zeroed local stat of the right type; `fd` is a
        // descriptor the volume keeps open while we hold its control lock.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let ok = unsafe { libc::fstat(fd, &mut st) } == 0;
        ok && ((st.st_dev == meta.dev() && st.st_ino == meta.ino())
            || (kind == DestKind::Block && st.st_rdev == meta.rdev()))
    };
    let mut fds: Vec<std::os::fd::RawFd> = vol.with_stack(ctl, |s| {
        s.deltas.iter().map(|d: &Arc<Delta>| d.raw_fd()).collect()
    });
    fds.extend(vol.backend().raw_fd());
    if fds.into_iter().any(same) {
        return Err(CopyError::DestIsVolume(shown()));
    }
    let owner = format!("the backup copy of {}@{backup}", vol.name());
    let lock =
        crate::filelock::lock(&file, path, owner).map_err(
            |e| match crate::filelock::lock_error(&e) {
                Some(l) => CopyError::Locked(l.clone()),
                None => dest_error(path)(e),
            },
        )?;
    Ok((file, kind, lock))
}

/// Sizes DEST: a full copy into a regular file starts from an empty file of the
/// volume's size (all holes); otherwise DEST must be large enough already (and, for
/// an incremental copy into a regular file, exactly the volume's size).
fn prepare_dest(
    file: &mut File,
    path: &Path,
    kind: DestKind,
    size: u64,
    incremental: bool,
) -> Result<(), CopyError> {
    let err = dest_error(path);
    let have = match kind {
        DestKind::Regular => file.metadata().map_err(&err)?.len(),
        DestKind::Block => file.seek(SeekFrom::End(0)).map_err(&err)?,
    };
    let size_error = |need: String| CopyError::DestSize {
        path: path.display().to_string(),
        have,
        need,
    };
    match (kind, incremental) {
        (DestKind::Regular, false) => {
            file.set_len(0).map_err(&err)?;
            file.set_len(size).map_err(&err)?;
        }
        (DestKind::Regular, true) if have != size => {
            return Err(size_error(format!(
                "an incremental copy needs DEST to hold the older backup's copy ({size} bytes)"
            )));
        }
        (DestKind::Block, _) if have < size => {
            return Err(size_error(format!("the volume needs {size} bytes")));
        }
        _ => {}
    }
    Ok(())
}

/// Starts copying backup `spec.backup` of `vol` to `spec.dest`; returns at once with
/// the job (poll it with `backup_copy_status`).
pub fn start(
    jobs: &CopyJobs,
    reactors: &Arc<[ReactorHandle]>,
    vol: &Arc<Volume>,
    spec: CopySpec<'_>,
) -> Result<Arc<CopyShared>, CopyError> {
    if reactors.is_empty() {
        return Err(CopyError::NoReactors);
    }
    if jobs.running() >= JOBS_RUNNING_MAX {
        return Err(CopyError::TooMany(JOBS_RUNNING_MAX));
    }
    let incremental = spec.changed_since.is_some();
    let home = vol.home_reactor(reactors.len());
    let (shared, mut file, kind, lock) = {
        let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        // Validate before DEST is touched: a mistyped backup name must not create or
        // truncate anything. The lock is held through the open (a control-plane wait
        // at worst), so what was validated is what gets held.
        validate(&ctl, vol, &spec)?;
        let (file, kind, lock) = open_dest(vol, &ctl, spec.dest, spec.backup, incremental)?;
        let shared = Arc::new(CopyShared {
            id: jobs.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            volume: vol.name().to_string(),
            backup: spec.backup.to_string(),
            changed_since: spec.changed_since.map(str::to_string),
            dest: spec.dest.to_path_buf(),
            bytes_total: vol.size_bytes(),
            home,
            started: Instant::now(),
            state: AtomicU8::new(JobState::Running as u8),
            cancel: AtomicBool::new(false),
            bytes_done: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            bytes_zeroed: AtomicU64::new(0),
            units_hashed: AtomicU64::new(0),
            elapsed_ms_at_end: AtomicU64::new(0),
            sha256: OnceLock::new(),
            error: OnceLock::new(),
        });
        // From here on the job holds its backups; every failure below ends it.
        ctl.copies.retain(|c| c.is_running());
        ctl.copies.push(shared.clone());
        (shared, file, kind, lock)
    };
    // A restart resumes the job (from the start: DEST is rewritten, or for an
    // incremental copy the changed chunks again), so the manifest names it.
    if let Some(m) = vol.persist.manifest() {
        let entry = CopyEntry {
            backup: spec.backup.to_string(),
            dest: spec.dest.display().to_string(),
            changed_since: spec.changed_since.map(str::to_string),
        };
        m.update(|m| {
            m.copies.retain(|c| *c != entry);
            m.copies.push(entry);
        });
        if let Err(e) = vol.persist.write_manifest() {
            tracing::warn!(volume = vol.name(), error = %e, "manifest write failed: the copy job would not be resumed after a crash");
        }
    }
    let launched = (|| {
        prepare_dest(&mut file, spec.dest, kind, vol.size_bytes(), incremental)?;
        jobs.insert(shared.clone())?;
        launch(reactors, vol, shared.clone(), (file, lock), kind)
    })();
    if let Err(e) = launched {
        shared.finish(JobState::Failed, Some(e.to_string()));
        return Err(e);
    }
    tracing::info!(
        job = shared.id,
        volume = vol.name(),
        backup = spec.backup,
        dest = %spec.dest.display(),
        changed_since = ?spec.changed_since,
        "backup copy started"
    );
    Ok(shared)
}

fn forget_persisted(vol: &Volume, backup: &str, dest: &Path) {
    if let Some(m) = vol.persist.manifest() {
        let dest = dest.display().to_string();
        if m.get()
            .copies
            .iter()
            .any(|c| c.backup == backup && c.dest == dest)
        {
            m.update(|m| m.copies.retain(|c| !(c.backup == backup && c.dest == dest)));
        }
    }
}

/// Restarts the copy jobs of `vol` that were running when the server stopped
/// (recovery; see `start`). A job that cannot start again is logged and forgotten.
pub fn resume(jobs: &CopyJobs, reactors: &Arc<[ReactorHandle]>, vol: &Arc<Volume>) {
    let Some(m) = vol.persist.manifest() else {
        return;
    };
    for c in m.get().copies {
        let dest = PathBuf::from(&c.dest);
        let spec = CopySpec {
            backup: &c.backup,
            dest: &dest,
            changed_since: c.changed_since.as_deref(),
        };
        match start(jobs, reactors, vol, spec) {
            Ok(job) => tracing::info!(
                job = job.id,
                volume = vol.name(),
                backup = %c.backup,
                dest = %c.dest,
                "resumed a backup copy interrupted by the last stop (from the start)"
            ),
            Err(e) => {
                tracing::error!(volume = vol.name(), backup = %c.backup, dest = %c.dest, error = %e, "cannot resume a backup copy; forgotten");
                forget_persisted(vol, &c.backup, &dest);
                let _ = vol.persist.write_manifest();
            }
        }
    }
}

/// Starts the hasher thread and hands the job to its home reactor.
fn launch(
    reactors: &Arc<[ReactorHandle]>,
    vol: &Arc<Volume>,
    shared: Arc<CopyShared>,
    (dest, dest_lock): (File, WriteLock),
    kind: DestKind,
) -> Result<(), CopyError> {
    let home = reactors[shared.home].clone();
    // Capacity: the window bounds the units sent and not hashed, plus `Finish`.
    let capacity = HASH_MSGS_PER_UNIT_MAX * WINDOW as usize + 1;
    let (tx, rx) = crossbeam_channel::bounded::<HashMsg>(capacity);
    let (s2, h2) = (shared.clone(), home.clone());
    std::thread::Builder::new()
        .name(format!("copy-hash-{}", shared.id))
        .spawn(move || hasher(rx, s2, h2))
        .map_err(|e| CopyError::Start(e.to_string()))?;
    let size = vol.size_bytes();
    let job = Job {
        zero_dest: kind == DestKind::Block || shared.changed_since.is_some(),
        punch_mode: match kind {
            DestKind::Regular => falloc::PUNCH_HOLE,
            DestKind::Block => falloc::ZERO_RANGE,
        },
        shared,
        vol: vol.clone(),
        dest,
        dest_lock,
        units: size.div_ceil(UNIT_BYTES),
        next_issue: 0,
        in_flight: 0,
        ready: BTreeMap::new(),
        next_send: 0,
        hasher: Some(tx),
        stop: None,
        finish_sent: false,
        sync: SyncState::NotStarted,
        pumping: false,
        repump: false,
        ended: false,
    };
    // `Job` is plain `Send` data; `adopt` wraps it in an `Rc` on the reactor.
    home.send_blocking(move |r| adopt(r, job), SEND_TIMEOUT)
        .map_err(|e| CopyError::Start(format!("home reactor: {e:?}")))
}

// ----- the hasher thread ------------------------------------------------------------

/// Messages one unit sends the hasher at most: zeros before its data, the data,
/// zeros after it, and the end mark.
const HASH_MSGS_PER_UNIT_MAX: usize = 4;

enum HashMsg {
    Data(AlignedBuf, usize),
    Zeros(u64),
    /// The unit is complete: count it and wake the reactor (the window moves).
    UnitEnd,
    /// Every unit was sent: publish the digest and wake the reactor.
    Finish,
}

fn hasher(rx: Receiver<HashMsg>, shared: Arc<CopyShared>, home: ReactorHandle) {
    let mut h = Sha256::new();
    let zeros = vec![0u8; UNIT_BYTES as usize];
    let id = shared.id;
    let wake = |home: &ReactorHandle| {
        if home.send(move |r| pump_id(r, id)).is_err() {
            let _ = home.send_blocking(move |r| pump_id(r, id), SEND_TIMEOUT);
        }
    };
    // Ends when the reactor drops its sender (a stopped job) or after `Finish`.
    for msg in rx.iter() {
        if shared.cancel.load(Ordering::Relaxed) {
            return; // the digest of a cancelled copy is never shown
        }
        match msg {
            HashMsg::Data(buf, n) => {
                h.update(&buf.as_slice()[..n]);
                shared.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
            }
            HashMsg::Zeros(mut n) => {
                shared.bytes_done.fetch_add(n, Ordering::Relaxed);
                while n > 0 {
                    let k = n.min(zeros.len() as u64);
                    h.update(&zeros[..k as usize]);
                    n -= k;
                }
            }
            HashMsg::UnitEnd => {
                shared.units_hashed.fetch_add(1, Ordering::Release);
                wake(&home);
            }
            HashMsg::Finish => {
                let digest = h.finalize();
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                let _ = shared.sha256.set(hex);
                wake(&home);
                return;
            }
        }
    }
}

// ----- the job on its home reactor ----------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncState {
    NotStarted,
    InFlight,
    Done,
}

struct Job {
    shared: Arc<CopyShared>,
    vol: Arc<Volume>,
    /// Kept open until the job is dropped, which is after its last completion (every
    /// callback holds the job).
    dest: File,
    /// DEST's write lock, held through `dest` (after it: unregistered once closed).
    #[allow(dead_code)] // held for its Drop
    dest_lock: WriteLock,
    /// Ranges DEST must read as zeros but that are not written must be zeroed
    /// explicitly (a block device, or an incremental copy over older data).
    zero_dest: bool,
    punch_mode: i32,
    units: u64,
    next_issue: u64,
    /// Units issued whose I/O has not all completed.
    in_flight: u64,
    /// Completed units waiting for their turn to be hashed.
    ready: BTreeMap<u64, Vec<HashMsg>>,
    next_send: u64,
    hasher: Option<Sender<HashMsg>>,
    /// Why the job stops early (first reason wins): cancelled, or failed with a message.
    stop: Option<(JobState, Option<String>)>,
    finish_sent: bool,
    sync: SyncState,
    pumping: bool,
    repump: bool,
    ended: bool,
}

type JobRef = Rc<RefCell<Job>>;

/// The jobs living on one reactor, for the hasher's and the RPC's wake-ups.
#[derive(Default)]
struct JobTable {
    jobs: RefCell<HashMap<u64, JobRef>>,
}

fn table(r: &mut Reactor) -> Rc<JobTable> {
    match r.local::<JobTable>() {
        Some(t) => t,
        None => {
            let t = Rc::new(JobTable::default());
            r.set_local(t.clone());
            // A stopping server stops its jobs (each reports failed once its I/O
            // drained): one hook per reactor, not one per job.
            r.on_stop(|r| {
                let jobs: Vec<JobRef> = table(r).jobs.borrow().values().cloned().collect();
                for job in jobs {
                    pump(r, &job);
                }
            });
            t
        }
    }
}

fn adopt(r: &mut Reactor, job: Job) {
    let id = job.shared.id;
    let job = Rc::new(RefCell::new(job));
    table(r).jobs.borrow_mut().insert(id, job.clone());
    pump(r, &job);
}

fn pump_id(r: &mut Reactor, id: u64) {
    let job = table(r).jobs.borrow().get(&id).cloned();
    if let Some(job) = job {
        pump(r, &job);
    }
}

fn stop_with(job: &JobRef, state: JobState, error: Option<String>) {
    let mut j = job.borrow_mut();
    if j.stop.is_none() {
        j.stop = Some((state, error));
    }
}

/// Issues units while the window allows, and ends the job when it is over. Not
/// re-entered: a completion that runs inside (synchronous reads of a null base)
/// asks for another round instead.
fn pump(r: &mut Reactor, job: &JobRef) {
    {
        let mut j = job.borrow_mut();
        if j.ended {
            return;
        }
        if j.pumping {
            j.repump = true;
            return;
        }
        j.pumping = true;
    }
    loop {
        check_stop(r, job);
        while let Some(u) = next_unit(job) {
            issue(r, job, u);
        }
        let again = {
            let mut j = job.borrow_mut();
            std::mem::take(&mut j.repump)
        };
        if !again {
            break;
        }
    }
    job.borrow_mut().pumping = false;
    maybe_end(r, job);
}

fn check_stop(r: &Reactor, job: &JobRef) {
    let (cancel, removed) = {
        let j = job.borrow();
        (j.shared.cancel.load(Ordering::Acquire), j.vol.is_removed())
    };
    if cancel {
        stop_with(job, JobState::Cancelled, None);
    } else if removed {
        stop_with(job, JobState::Failed, Some("the volume was deleted".into()));
    } else if r.is_stopping() {
        stop_with(
            job,
            JobState::Failed,
            Some("the server is shutting down".into()),
        );
    }
}

fn next_unit(job: &JobRef) -> Option<u64> {
    let mut j = job.borrow_mut();
    let hashed = j.shared.units_hashed.load(Ordering::Acquire);
    let open = j.stop.is_none()
        && j.next_issue < j.units
        && j.in_flight < WINDOW
        && j.next_issue < hashed + WINDOW;
    if !open {
        return None;
    }
    let u = j.next_issue;
    j.next_issue += 1;
    j.in_flight += 1;
    Some(u)
}

/// One chunk of a unit, as planned before reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkPlan {
    /// No layer of the view has data here: reads as zeros without reading.
    hole: bool,
    /// DEST must end equal to this chunk (every chunk of a full copy; the changed
    /// ones of an incremental copy).
    target: bool,
}

/// Plans the chunks of `[off, off + len)` of `view` (`changed`: the layers holding
/// the changes of an incremental copy). A chunk counts as a hole only when the base
/// positively reports zeros for all of it; anything unanswered is read.
fn plan_unit(
    vol: &Volume,
    view: &[Arc<Delta>],
    changed: Option<&[Arc<Delta>]>,
    off: u64,
    len: u64,
) -> Vec<ChunkPlan> {
    let cb = vol.chunk_bytes() as u64;
    let first = off / cb;
    let n = len.div_ceil(cb);
    let held: Vec<bool> = (first..first + n)
        .map(|c| status::held_by_any(view, c))
        .collect();
    let base_zero = if held.iter().all(|&h| h) {
        Vec::new() // the base is not consulted
    } else {
        base_zero_chunks(vol, off, len)
    };
    (first..first + n)
        .zip(0..)
        .map(|(c, i)| ChunkPlan {
            hole: !held[i] && base_zero.get(i).copied().unwrap_or(false),
            target: changed.is_none_or(|l| status::held_by_any(l, c)),
        })
        .collect()
}

/// For each chunk of `[off, off + len)`: whether the base reports it all zeros.
fn base_zero_chunks(vol: &Volume, off: u64, len: u64) -> Vec<bool> {
    let cb = vol.chunk_bytes() as u64;
    let end = off + len;
    let mut zero = vec![true; len.div_ceil(cb) as usize];
    let mut pos = off;
    while pos < end {
        let before = pos;
        // A copy job's unit is bounded already; its lseeks are not limited here.
        let mut lseeks = u32::MAX;
        for e in vol
            .backend()
            .block_status(pos, (end - pos) as u32, 64, &mut lseeks)
        {
            let e_end = (pos + e.length_bytes).min(end);
            if !e.flags.contains(ExtentFlags::ZEROES) {
                let (a, b) = ((pos - off) / cb, (e_end - off).div_ceil(cb));
                zero[a as usize..b as usize].fill(false);
            }
            pos = e_end;
        }
        if pos == before {
            break; // no answer: the rest counts as data
        }
    }
    if pos < end {
        let covered = ((pos - off) / cb) as usize; // a partly covered chunk is data
        zero[covered..].fill(false);
    }
    zero
}

/// Plans unit `u` against a fresh pin of the stack and reads its data span.
fn issue(r: &mut Reactor, job: &JobRef, u: u64) {
    let (vol, backup, older) = {
        let j = job.borrow();
        (
            j.vol.clone(),
            j.shared.backup.clone(),
            j.shared.changed_since.clone(),
        )
    };
    let size = vol.size_bytes();
    let off = u * UNIT_BYTES;
    let len = UNIT_BYTES.min(size - off);
    let pin = Rc::new(vol.pin(r.id()));
    let stack = pin.stack();
    let Some(view) = stack.backup_view(&backup) else {
        // Cannot happen while the job holds the backup; fail rather than copy garbage.
        stop_with(
            job,
            JobState::Failed,
            Some(format!("backup {backup:?} disappeared")),
        );
        return unit_failed(r, job);
    };
    let changed = match &older {
        None => None,
        Some(o) => match status::changed_layers(&stack.deltas, view.len(), o) {
            Some(l) => Some(l),
            None => {
                stop_with(
                    job,
                    JobState::Failed,
                    Some(format!("backup {o:?} disappeared")),
                );
                return unit_failed(r, job);
            }
        },
    };
    let plan = plan_unit(&vol, view, changed, off, len);
    let cb = vol.chunk_bytes() as u64;
    let data: Vec<usize> = (0..plan.len()).filter(|&i| !plan[i].hole).collect();
    let unit = Rc::new(RefCell::new(Unit {
        index: u,
        off,
        len,
        pending: 1,
        hash: Vec::new(),
    }));
    let (Some(&lo), Some(&hi)) = (data.first(), data.last()) else {
        // Holes only: nothing to read; zero what DEST must show as zeros.
        unit.borrow_mut().hash.push(HashMsg::Zeros(len));
        zero_targets(r, job, &unit, &plan, None);
        return unit_op_done(r, job, &unit);
    };
    let span_off = off + lo as u64 * cb;
    let span_end = (off + (hi as u64 + 1) * cb).min(off + len);
    let view = view.to_vec();
    let (job2, unit2) = (job.clone(), unit.clone());
    io::read(
        r,
        &vol,
        pin.clone(),
        view,
        span_off,
        (span_end - span_off) as u32,
        Box::new(move |r, res| match res {
            Ok(buf) => read_done(r, &job2, &unit2, &plan, span_off, buf),
            Err(BlockError::NoMemory) => retry_unit(r, &job2, &unit2),
            Err(e) => {
                let msg = format!("reading the backup at offset {span_off}: {e:?}");
                stop_with(&job2, JobState::Failed, Some(msg));
                unit_op_done(r, &job2, &unit2);
            }
        }),
    );
    drop(pin);
}

/// The kernel failed the unit's reads with ENOMEM: offer it again shortly.
fn retry_unit(r: &mut Reactor, job: &JobRef, unit: &Rc<RefCell<Unit>>) {
    let u = unit.borrow().index;
    let job2 = job.clone();
    r.add_timer(RETRY, move |r| {
        if job2.borrow().stop.is_some() {
            // Stopping anyway: count the unit as finished without data.
            return unit_failed(r, &job2);
        }
        issue(r, &job2, u)
    });
}

/// A unit that will never complete normally (the job is stopping).
fn unit_failed(r: &mut Reactor, job: &JobRef) {
    job.borrow_mut().in_flight -= 1;
    pump(r, job);
}

/// A unit in progress: its read, then its writes and zeroings.
struct Unit {
    index: u64,
    off: u64,
    len: u64,
    /// Operations not completed, plus one for the issuing step itself.
    pending: usize,
    /// What the hasher gets for this unit, in order.
    hash: Vec<HashMsg>,
}

fn is_zero(b: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this; a byte loop is 8x the iterations.
    // SAFETY: every bit pattern is a valid u64, and align_to only reinterprets the
    // aligned middle of the slice, within its bounds.
    let (pre, words, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&x| x == 0)
}

fn read_done(
    r: &mut Reactor,
    job: &JobRef,
    unit: &Rc<RefCell<Unit>>,
    plan: &[ChunkPlan],
    span_off: u64,
    buf: IoBuf,
) {
    let (off, len) = {
        let u = unit.borrow();
        (u.off, u.len)
    };
    let cb = job.borrow().vol.chunk_bytes() as u64;
    let span_len = buf.len();
    let data = match buf {
        IoBuf::Aligned(a) => a,
        other => {
            let mut a = AlignedBuf::direct(other.len());
            a.as_mut_slice().copy_from_slice(other.as_slice());
            a
        }
    };
    // Which target chunks read as zeros (holes included), and which carry data.
    let mut zero = vec![false; plan.len()];
    for (i, p) in plan.iter().enumerate() {
        let c_off = off + i as u64 * cb;
        let c_end = (c_off + cb).min(off + len);
        zero[i] = p.hole
            || c_off < span_off
            || c_end > span_off + span_len as u64
            || is_zero(&data.as_slice()[(c_off - span_off) as usize..(c_end - span_off) as usize]);
    }
    if job.borrow().stop.is_none() {
        write_runs(r, job, unit, plan, &zero, span_off, &data);
        zero_targets(r, job, unit, plan, Some(&zero));
    }
    {
        let mut u = unit.borrow_mut();
        let pre = span_off - off;
        let post = off + len - (span_off + span_len as u64);
        if pre > 0 {
            u.hash.push(HashMsg::Zeros(pre));
        }
        u.hash.push(HashMsg::Data(data, span_len));
        if post > 0 {
            u.hash.push(HashMsg::Zeros(post));
        }
    }
    unit_op_done(r, job, unit);
}

/// Maximal runs of consecutive chunk indexes where `pick` holds.
fn runs(n: usize, pick: impl Fn(usize) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if !pick(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && pick(i) {
            i += 1;
        }
        out.push((start, i));
    }
    out
}

/// Writes the target chunks that carry data, one write per run of them.
fn write_runs(
    r: &mut Reactor,
    job: &JobRef,
    unit: &Rc<RefCell<Unit>>,
    plan: &[ChunkPlan],
    zero: &[bool],
    span_off: u64,
    data: &AlignedBuf,
) {
    let (off, len) = {
        let u = unit.borrow();
        (u.off, u.len)
    };
    let (cb, fd) = {
        let j = job.borrow();
        (j.vol.chunk_bytes() as u64, j.dest.as_raw_fd())
    };
    for (a, b) in runs(plan.len(), |i| plan[i].target && !zero[i]) {
        let w_off = off + a as u64 * cb;
        let w_end = (off + b as u64 * cb).min(off + len);
        let n = (w_end - w_off) as usize;
        let mut buf = AlignedBuf::direct(n);
        let at = (w_off - span_off) as usize;
        buf.as_mut_slice()
            .copy_from_slice(&data.as_slice()[at..at + n]);
        unit.borrow_mut().pending += 1;
        let (job2, unit2) = (job.clone(), unit.clone());
        let op = Op::write(FileRef::Raw(fd), w_off, buf, n as u32);
        submit_or_retry(
            r,
            op,
            Box::new(move |r, c| {
                match c.bytes() {
                    Ok(k) if k as usize == n => {
                        let j = job2.borrow();
                        j.shared
                            .bytes_written
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(k) => {
                        let msg = format!("short write to DEST at {w_off}: {k} of {n} bytes");
                        stop_with(&job2, JobState::Failed, Some(msg));
                    }
                    Err(e) => {
                        let msg = format!(
                            "writing DEST at {w_off}: {}",
                            std::io::Error::from_raw_os_error(e)
                        );
                        stop_with(&job2, JobState::Failed, Some(msg));
                    }
                }
                unit_op_done(r, &job2, &unit2)
            }),
        );
    }
}

/// Zeroes the target chunks that read as zeros, where DEST does not already read
/// zeros there (`zero: None` = every chunk is a hole).
fn zero_targets(
    r: &mut Reactor,
    job: &JobRef,
    unit: &Rc<RefCell<Unit>>,
    plan: &[ChunkPlan],
    zero: Option<&[bool]>,
) {
    if !job.borrow().zero_dest {
        return;
    }
    let (off, len) = {
        let u = unit.borrow();
        (u.off, u.len)
    };
    let cb = job.borrow().vol.chunk_bytes() as u64;
    for (a, b) in runs(plan.len(), |i| plan[i].target && zero.is_none_or(|z| z[i])) {
        let z_off = off + a as u64 * cb;
        let z_end = (off + b as u64 * cb).min(off + len);
        zero_range(r, job, unit, z_off, z_end - z_off);
    }
}

/// fallocate zeroing (punch on files, write-zeroes on block devices); a filesystem
/// or device without it gets zeros written.
fn zero_range(r: &mut Reactor, job: &JobRef, unit: &Rc<RefCell<Unit>>, off: u64, len: u64) {
    let (fd, mode) = {
        let j = job.borrow();
        (j.dest.as_raw_fd(), j.punch_mode)
    };
    unit.borrow_mut().pending += 1;
    let (job2, unit2) = (job.clone(), unit.clone());
    let op = Op::fallocate(FileRef::Raw(fd), off, len, mode);
    submit_or_retry(
        r,
        op,
        Box::new(move |r, c| {
            match c.bytes() {
                Ok(_) => {
                    let j = job2.borrow();
                    j.shared.bytes_zeroed.fetch_add(len, Ordering::Relaxed);
                }
                Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL => {
                    write_zeros(r, &job2, &unit2, off, len)
                }
                Err(e) => {
                    let msg = format!(
                        "zeroing DEST at {off}: {}",
                        std::io::Error::from_raw_os_error(e)
                    );
                    stop_with(&job2, JobState::Failed, Some(msg));
                }
            }
            unit_op_done(r, &job2, &unit2)
        }),
    );
}

fn write_zeros(r: &mut Reactor, job: &JobRef, unit: &Rc<RefCell<Unit>>, off: u64, len: u64) {
    let fd = job.borrow().dest.as_raw_fd();
    unit.borrow_mut().pending += 1;
    let (job2, unit2) = (job.clone(), unit.clone());
    // At most one unit long: the buffer is bounded like the data buffers.
    let buf = AlignedBuf::direct(len as usize);
    let op = Op::write(FileRef::Raw(fd), off, buf, len as u32);
    submit_or_retry(
        r,
        op,
        Box::new(move |r, c| {
            match c.bytes() {
                Ok(k) if k as u64 == len => {
                    let j = job2.borrow();
                    j.shared.bytes_written.fetch_add(len, Ordering::Relaxed);
                }
                Ok(_) | Err(_) => {
                    let msg = format!("writing zeros to DEST at {off} failed");
                    stop_with(&job2, JobState::Failed, Some(msg));
                }
            }
            unit_op_done(r, &job2, &unit2)
        }),
    );
}

/// Submits `op`; a full slab is back-pressure: offer it again after [`RETRY`].
fn submit_or_retry(r: &mut Reactor, op: Op, cb: Callback) {
    if let Err(rej) = r.submit(op, cb) {
        r.add_timer(RETRY, move |r| submit_or_retry(r, rej.op, rej.cb));
    }
}

/// One operation of `unit` completed; the last one completes the unit.
fn unit_op_done(r: &mut Reactor, job: &JobRef, unit: &Rc<RefCell<Unit>>) {
    let (index, hash) = {
        let mut u = unit.borrow_mut();
        u.pending -= 1;
        if u.pending > 0 {
            return;
        }
        (u.index, std::mem::take(&mut u.hash))
    };
    {
        let mut j = job.borrow_mut();
        j.in_flight -= 1;
        if j.stop.is_none() {
            j.ready.insert(index, hash);
        }
    }
    send_in_order(job);
    pump(r, job);
}

/// Hands the hasher every completed unit whose predecessors are all hashed or sent.
fn send_in_order(job: &JobRef) {
    let mut j = job.borrow_mut();
    loop {
        let next = j.next_send;
        let Some(msgs) = j.ready.remove(&next) else {
            return;
        };
        let sent = j.hasher.as_ref().is_some_and(|tx| {
            msgs.into_iter()
                .chain(std::iter::once(HashMsg::UnitEnd))
                .all(|m| tx.try_send(m).is_ok())
        });
        if !sent {
            // A cancel stops the hasher at once, before this reactor sees it: then the
            // closed queue means the cancel. Otherwise the window keeps the queue below
            // its capacity, so a full or closed queue is a bug, reported as a failure
            // rather than a wrong hash.
            let stop = if j.shared.cancel.load(Ordering::Acquire) {
                (JobState::Cancelled, None)
            } else {
                (JobState::Failed, Some("hash queue refused a unit".into()))
            };
            j.stop.get_or_insert(stop);
            return;
        }
        j.next_send += 1;
    }
}

/// Ends the job once nothing is in flight: early (cancelled, failed), or after the
/// last unit was hashed and DEST synced.
fn maybe_end(r: &mut Reactor, job: &JobRef) {
    let (stop, all_sent, finish_sent, sync, digest) = {
        let j = job.borrow();
        if j.ended || j.in_flight > 0 || j.sync == SyncState::InFlight {
            return;
        }
        (
            j.stop.clone(),
            j.next_send == j.units,
            j.finish_sent,
            j.sync,
            j.shared.sha256.get().is_some(),
        )
    };
    if let Some((state, error)) = stop {
        return end(r, job, state, error);
    }
    if !all_sent {
        return;
    }
    if !finish_sent {
        let mut j = job.borrow_mut();
        j.finish_sent = true;
        let sent = j
            .hasher
            .as_ref()
            .is_some_and(|tx| tx.try_send(HashMsg::Finish).is_ok());
        if !sent {
            // As in `send_in_order`: a closed queue after a cancel is the cancel.
            j.stop = Some(if j.shared.cancel.load(Ordering::Acquire) {
                (JobState::Cancelled, None)
            } else {
                (JobState::Failed, Some("hash queue refused".into()))
            });
            drop(j);
            return maybe_end(r, job);
        }
    }
    match sync {
        SyncState::NotStarted => start_sync(r, job),
        SyncState::Done if digest => end(r, job, JobState::Done, None),
        _ => {} // waiting for the hasher's digest (it wakes us)
    }
}

fn start_sync(r: &mut Reactor, job: &JobRef) {
    let fd = {
        let mut j = job.borrow_mut();
        j.sync = SyncState::InFlight;
        j.dest.as_raw_fd()
    };
    let job2 = job.clone();
    submit_or_retry(
        r,
        Op::fdatasync(FileRef::Raw(fd)),
        Box::new(move |r, c| {
            job2.borrow_mut().sync = SyncState::Done;
            if let Err(e) = c.bytes() {
                let msg = format!("syncing DEST: {}", std::io::Error::from_raw_os_error(e));
                stop_with(&job2, JobState::Failed, Some(msg));
            }
            maybe_end(r, &job2)
        }),
    );
}

fn end(r: &mut Reactor, job: &JobRef, state: JobState, error: Option<String>) {
    let (shared, vol) = {
        let mut j = job.borrow_mut();
        j.ended = true;
        j.hasher = None; // a hasher still waiting for units exits
        j.ready.clear();
        (j.shared.clone(), j.vol.clone())
    };
    table(r).jobs.borrow_mut().remove(&shared.id);
    // Over: not to be resumed — unless a server stop interrupted it. Only the
    // in-memory manifest changes here (no I/O on a reactor); the next manifest
    // write makes it durable, and until then a restart redoes a finished copy.
    if !(state == JobState::Failed && r.is_stopping()) {
        forget_persisted(&vol, &shared.backup, &shared.dest);
    }
    tracing::info!(
        job = shared.id,
        volume = %shared.volume,
        backup = %shared.backup,
        state = ?state,
        error = ?error,
        bytes_written = shared.bytes_written.load(Ordering::Relaxed),
        "backup copy ended"
    );
    shared.finish(state, error);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;
    use crate::volume::VolumeSpec;
    use std::os::unix::fs::FileExt;

    const CHUNK: u64 = 64 * 1024;

    /// A mem volume whose size ends in a partial chunk.
    fn volume(dir: &Path) -> Volume {
        let spec = VolumeSpec {
            name: "plan".into(),
            path: None,
            size_bytes: Some(UNIT_BYTES + 4096),
            block_size: 512,
            backend: BackendKind::Mem,
            read_only: false,
            direct: false,
            chunk_size: CHUNK as u32,
            grow: false,
        };
        Volume::open(spec, 1, dir).expect("volume")
    }

    fn base_write(vol: &Volume, off: u64, data: &[u8]) {
        let fd = vol.backend().raw_fd().expect("mem has a descriptor");
        // SAFETY: borrowing the volume's descriptor for one pwrite; ManuallyDrop keeps
        // the File from closing it.
        let f = std::mem::ManuallyDrop::new(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        });
        f.write_all_at(data, off).expect("pwrite");
    }

    /// Guards against copying a base chunk with data as a hole (a lost write in
    /// DEST) and against reading holes the base reports.
    #[test]
    fn base_holes_and_data_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path());
        base_write(&vol, CHUNK + 100, b"x"); // chunk 1: one byte of data
        let plan = plan_unit(&vol, &[], None, 0, UNIT_BYTES);
        assert_eq!(plan.len(), (UNIT_BYTES / CHUNK) as usize);
        assert!(plan[0].hole && plan[2].hole && plan[15].hole);
        assert!(!plan[1].hole, "a chunk with data is read");
        assert!(plan.iter().all(|p| p.target), "a full copy targets all");
        // The last unit is one partial chunk, a hole, then data.
        let tail = plan_unit(&vol, &[], None, UNIT_BYTES, 4096);
        assert_eq!(
            tail,
            vec![ChunkPlan {
                hole: true,
                target: true
            }]
        );
        base_write(&vol, UNIT_BYTES + 4095, b"y");
        let tail = plan_unit(&vol, &[], None, UNIT_BYTES, 4096);
        assert!(!tail[0].hole);
    }

    /// Chunks a delta of the view holds are data even where the base is a hole, and
    /// an incremental plan targets only the changed layers' chunks.
    #[test]
    fn delta_chunks_are_data_and_changes_are_targets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path());
        let size = vol.size_bytes();
        let delta = |id: u64, name: &str| {
            Arc::new(
                Delta::create(
                    vol.persist.store(),
                    "plan",
                    id,
                    name,
                    size,
                    CHUNK as u32,
                    false,
                    false,
                    None,
                )
                .expect("delta"),
            )
        };
        let (d1, d2) = (delta(1, "a"), delta(2, "b"));
        let publish = |d: &Delta, chunk: u64, p: u64| match ringblk_blockmap::BlockMap::claim_shared(
            &d.map, chunk,
        ) {
            Ok(ringblk_blockmap::Claim::Fill(g)) => g.publish(p).expect("publish"),
            _ => panic!("chunk {chunk} not fillable"),
        };
        publish(&d1, 3, 0);
        publish(&d2, 5, 0);
        let view = vec![d1.clone(), d2.clone()];
        let plan = plan_unit(&vol, &view, None, 0, UNIT_BYTES);
        assert!(!plan[3].hole && !plan[5].hole && plan[4].hole);
        // Changed since "b" (d2 and up): only chunk 5.
        let changed = status::changed_layers(&view, 2, "b").expect("b is tracked");
        let plan = plan_unit(&vol, &view, Some(changed), 0, UNIT_BYTES);
        let targets: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].target).collect();
        assert_eq!(targets, vec![5]);
        // Negative control: since "a" (d1 and up) chunk 3 changed too.
        let changed = status::changed_layers(&view, 2, "a").expect("a is tracked");
        let plan = plan_unit(&vol, &view, Some(changed), 0, UNIT_BYTES);
        let targets: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].target).collect();
        assert_eq!(targets, vec![3, 5]);
        // A merging (released) delta stops the tracking.
        d2.set_merging();
        assert!(status::changed_layers(&view, 2, "b").is_none());
        assert!(
            status::changed_layers(&view, 1, "b").is_none(),
            "not below the view"
        );
    }

    #[test]
    fn runs_are_maximal() {
        let v = [true, true, false, true, false, false, true];
        assert_eq!(runs(v.len(), |i| v[i]), vec![(0, 2), (3, 4), (6, 7)]);
        assert_eq!(runs(0, |_| true), vec![]);
        assert_eq!(runs(3, |_| false), vec![]);
    }

    #[test]
    fn zero_check_sees_every_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 1, 7, 8, 2048, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
        assert!(is_zero(&b[3..]));
    }

    #[test]
    fn state_round_trips() {
        for s in [
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ] {
            assert_eq!(JobState::from_u8(s as u8), s);
        }
    }
}
