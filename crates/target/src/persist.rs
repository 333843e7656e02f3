//! The server side of durability: which files of a volume a commit covers, and the
//! volume's committer thread (group commit).
//!
//! # Group commit
//! FLUSH and FUA requests of layered volumes (backups present) and the merge ask
//! the volume's committer thread for a commit. A request that arrives while a
//! commit runs waits for the next one, which serves every request queued by then:
//! one fdatasync per file serves them all. The committer runs blocking syscalls on
//! its own thread so that no reactor ever waits on fdatasync, and it never takes
//! the volume's `control` lock (held across drains, which may wait on requests that
//! wait on a commit).
//!
//! # Persistence
//! Volumes on a file or block device keep their backups across restarts: the
//! manifest and the deltas' journals live in the data dir. Volumes on `mem` or
//! `null` keep nothing (their base does not survive a restart); for them a commit
//! only syncs data files and their deltas are deleted when dropped.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringblk_reactor::Reactor;

use crate::durable::commit::{commit, CommitOptions, CommitSet};
use crate::durable::manifest::ManifestCell;
use crate::durable::store::{DirStore, Store};
use crate::image::Delta;
use crate::nbd::NbdErrno;

type Waiter = Box<dyn FnOnce(io::Result<()>) + Send>;

/// What the committer thread shares with the volume.
pub struct PersistInner {
    pub store: DirStore,
    /// `None`: the volume keeps nothing across restarts (see the module docs).
    pub manifest: Option<ManifestCell>,
    /// Store name of the base image file (absolute), if it is a file.
    base: Option<String>,
    /// Every delta of the volume, bottom to top (what commits cover).
    deltas: Mutex<Vec<Arc<Delta>>>,
    /// Set by `volume_delete`: nothing may write the manifest again.
    destroyed: std::sync::atomic::AtomicBool,
    /// Commits run, and requests they served (stats: the group-commit ratio).
    commits: std::sync::atomic::AtomicU64,
    waiters: std::sync::atomic::AtomicU64,
}

impl PersistInner {
    fn live_manifest(&self) -> Option<&ManifestCell> {
        if self.destroyed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.manifest.as_ref()
    }

    fn run_commit(&self) -> io::Result<()> {
        let deltas = self
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut data: Vec<String> = self.base.iter().cloned().collect();
        data.extend(deltas.iter().map(|d| d.path.display().to_string()));
        let set = CommitSet {
            manifest: self.live_manifest(),
            data,
            journals: deltas.iter().filter_map(|d| d.journal.as_ref()).collect(),
        };
        commit(&self.store, &set, CommitOptions::default())
    }
}

/// A volume's durability state and its committer.
pub struct Persist {
    pub inner: Arc<PersistInner>,
    tx: Mutex<Option<crossbeam_channel::Sender<Waiter>>>,
    volume: String,
    /// Bound of the commit queue (`set_queue_depth`), fixed when the committer starts.
    queue_depth: std::sync::atomic::AtomicUsize,
}

impl Persist {
    pub fn new(
        volume: &str,
        data_dir: &std::path::Path,
        manifest: Option<ManifestCell>,
        base: Option<String>,
        deltas: Vec<Arc<Delta>>,
    ) -> Persist {
        Persist {
            inner: Arc::new(PersistInner {
                store: DirStore::new(data_dir),
                manifest,
                base,
                deltas: Mutex::new(deltas),
                destroyed: std::sync::atomic::AtomicBool::new(false),
                commits: std::sync::atomic::AtomicU64::new(0),
                waiters: std::sync::atomic::AtomicU64::new(0),
            }),
            tx: Mutex::new(None),
            volume: volume.to_string(),
            queue_depth: std::sync::atomic::AtomicUsize::new(
                crate::config::DEFAULT_COMMIT_QUEUE_DEPTH,
            ),
        }
    }

    /// Sets the commit queue's bound (`--commit-queue-depth`); takes effect when the
    /// committer starts, at the first commit.
    pub fn set_queue_depth(&self, depth: usize) {
        self.queue_depth
            .store(depth.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn persistent(&self) -> bool {
        self.inner.manifest.is_some()
    }

    pub fn manifest(&self) -> Option<&ManifestCell> {
        self.inner.manifest.as_ref()
    }

    /// A new delta on top (at the switch, before it is published).
    pub fn add_delta(&self, d: Arc<Delta>) {
        self.inner
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
    }

    /// A merged delta leaves the commit set (after the manifest dropped it).
    pub fn remove_delta(&self, id: u64) {
        self.inner
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| d.id != id);
    }

    /// Group commits run so far, and the requests they served.
    pub fn commit_counts(&self) -> (u64, u64) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.commits.load(relaxed),
            self.inner.waiters.load(relaxed),
        )
    }

    /// Marks every delta's files for deletion when it drops.
    pub fn discard_deltas(&self) {
        for d in self
            .inner
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            d.set_merged();
        }
    }

    /// `volume_delete`: the volume's backups go with it (manifest now, delta and
    /// journal files when the last request lets go of them).
    pub fn destroy(&self) {
        self.inner
            .destroyed
            .store(true, std::sync::atomic::Ordering::Release);
        let _w = self.inner.manifest.as_ref().map(|m| m.write_lock());
        if let Some(m) = &self.inner.manifest {
            let name = crate::durable::manifest::manifest_name(&m.get().volume);
            if let Err(e) = self.inner.store.remove(&name) {
                tracing::warn!(file = %name, error = %e, "cannot remove the manifest");
            }
            let _ = self.inner.store.sync_dir();
        }
        self.discard_deltas();
    }

    /// Writes the manifest now if it changed (control plane, blocking).
    pub fn write_manifest(&self) -> io::Result<()> {
        let Some(m) = self.inner.live_manifest() else {
            return Ok(());
        };
        // Journals are created lazily (off the switch); the manifest names them.
        let deltas = self
            .inner
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for j in deltas.iter().filter_map(|d| d.journal.as_ref()) {
            j.ensure_file(&self.inner.store)?;
        }
        m.write_if_dirty(&self.inner.store)
    }

    fn sender(&self) -> io::Result<crossbeam_channel::Sender<Waiter>> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tx.as_ref() {
            return Ok(t.clone());
        }
        // Bounded: a flood of flushes back-pressures the callers (a full queue
        // fails the send below, which the caller reports as EAGAIN-like ENOMEM).
        let (t, rx) = crossbeam_channel::bounded::<Waiter>(
            self.queue_depth.load(std::sync::atomic::Ordering::Relaxed),
        );
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .name(format!("commit-{}", self.volume))
            .spawn(move || {
                // Ends when the volume (the only sender) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let res = inner.run_commit();
                    let relaxed = std::sync::atomic::Ordering::Relaxed;
                    inner.commits.fetch_add(1, relaxed);
                    inner.waiters.fetch_add(batch.len() as u64, relaxed);
                    if let Err(e) = &res {
                        tracing::error!(error = %e, "group commit failed; the flushes waiting for it fail");
                    }
                    for w in batch {
                        w(match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(io::Error::from_raw_os_error(
                                e.raw_os_error().unwrap_or(libc::EIO),
                            )),
                        });
                    }
                }
            })?;
        *tx = Some(t.clone());
        Ok(t)
    }

    /// Asks for a commit from a reactor; `done` runs on this reactor afterwards.
    pub fn commit_async(&self, r: &mut Reactor, done: crate::io::Done) {
        let slot: Arc<Mutex<Option<io::Result<()>>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let waker = crate::park::suspend(r, move |r| {
            let res = slot2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EIO)));
            done(
                r,
                res.map_err(|e| NbdErrno::from_os_errno(e.raw_os_error().unwrap_or(libc::EIO))),
            )
        });
        let waiter: Waiter = Box::new(move |res| {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(res);
            waker.wake();
        });
        match self.sender() {
            Ok(tx) => {
                if let Err(e) = tx.try_send(waiter) {
                    // Too many flushes queued: fail this one (through its waker, so
                    // `done` still runs on this reactor, after we return).
                    (e.into_inner())(Err(io::Error::from_raw_os_error(libc::ENOMEM)));
                }
            }
            Err(e) => waiter(Err(e)),
        }
    }

    /// A commit from a control thread (merge, shutdown); waits for it.
    pub fn commit_blocking(&self) -> io::Result<()> {
        let (t, rx) = crossbeam_channel::bounded(1);
        let waiter: Waiter = Box::new(move |res| {
            let _ = t.send(res);
        });
        self.sender()?
            .send_timeout(waiter, Duration::from_secs(60))
            .map_err(|_| io::Error::from_raw_os_error(libc::ETIMEDOUT))?;
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::EIO)))
    }
}
