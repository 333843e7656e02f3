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
//! # Back-pressure
//! The commit queue (the channel to the committer) is bounded per volume
//! (`--commit-queue-depth`, [`Persist::set_queue_depth`]). A request that finds it
//! full is not failed: it waits on its reactor, in a FIFO per volume, behind any
//! earlier ones, and the reactor registers a wake-up with the committer. Right after
//! the committer takes a batch off the queue it wakes every registered reactor, which
//! moves its waiting requests into the queue (they are served by the next commit).
//! Registering and then trying once more closes the race with a committer that
//! emptied the queue in between. A waiting FLUSH keeps counting in its connection's
//! in-flight requests, so a connection that floods FLUSHes stops being read once it
//! reaches its limit: that limit (the front end's requests per connection) is what
//! bounds the reactor's wait queue. Waits are counted in the volume's
//! `commit_queue_waits`.
//!
//! # Persistence
//! Volumes on a file or block device keep their backups across restarts: the
//! manifest and the deltas' journals live in the data dir. Volumes on `mem` or
//! `null` keep nothing (their base does not survive a restart); for them a commit
//! only syncs data files and their deltas are deleted when dropped.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use ringblk_reactor::{Reactor, ReactorHandle};

use crate::durable::commit::{commit, CommitOptions, CommitSet};
use crate::durable::manifest::ManifestCell;
use crate::durable::store::{DirStore, Store};
use crate::error::BlockError;
use crate::image::Delta;

type Waiter = Box<dyn FnOnce(io::Result<()>) + Send>;

/// What the committer thread shares with the volume.
pub(crate) struct PersistInner {
    /// Shared with the volume's deltas, which delete their files through it (so
    /// that it closes its descriptors of them; `store` module docs).
    pub store: Arc<DirStore>,
    /// `None`: the volume keeps nothing across restarts (see the module docs).
    pub manifest: Option<ManifestCell>,
    /// Store name of the base image file (absolute), if it is a file.
    base: Option<String>,
    /// Every delta of the volume, bottom to top (what commits cover).
    deltas: Mutex<Vec<Arc<Delta>>>,
    /// Held by a commit while it runs over its snapshot of `deltas`, and by
    /// `remove_delta`: once a delta has left the set, no commit still syncs or
    /// journals it by name, so its files may be renamed (reused for the next backup)
    /// or removed. A commit that synced a merged delta's file after the rename failed
    /// every waiting FLUSH with ENOENT (the soak's backup cycles under a FLUSH storm).
    commit_gate: Mutex<()>,
    /// Set by `volume_delete`: nothing may write the manifest again.
    destroyed: std::sync::atomic::AtomicBool,
    /// Commits run, and requests they served (stats: the group-commit ratio).
    commits: std::sync::atomic::AtomicU64,
    waiters: std::sync::atomic::AtomicU64,
    /// Reactors with requests waiting for room in the commit queue; woken (and
    /// emptied) each time the committer takes a batch. At most one entry per
    /// reactor at a time but for rare duplicates, which only cause a spurious
    /// wake-up (see [`RoomWaker`]).
    room: Mutex<Vec<RoomWaker>>,
}

impl PersistInner {
    fn live_manifest(&self) -> Option<&ManifestCell> {
        if self.destroyed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.manifest.as_ref()
    }

    fn run_commit(&self) -> io::Result<()> {
        let _gate = self.commit_gate.lock().unwrap_or_else(|p| p.into_inner());
        let deltas = self
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut data: Vec<String> = self.base.iter().cloned().collect();
        data.extend(deltas.iter().map(|d| crate::image::store_name(&d.path)));
        let set = CommitSet {
            manifest: self.live_manifest(),
            data,
            journals: deltas.iter().filter_map(|d| d.journal.as_ref()).collect(),
        };
        commit(&*self.store, &set, CommitOptions::default())
    }
}

/// A volume's durability state and its committer.
pub(crate) struct Persist {
    pub inner: Arc<PersistInner>,
    tx: Mutex<Option<crossbeam_channel::Sender<Waiter>>>,
    volume: String,
    /// Unique per `Persist` in the process: keys the reactors' wait queues (a
    /// re-created volume of the same name is a different key).
    key: u64,
    /// Bound of the commit queue (`set_queue_depth`), fixed when the committer starts.
    queue_depth: std::sync::atomic::AtomicUsize,
}

/// FLUSH/FUA requests of a volume queued for its group commit at most, unless
/// `--commit-queue-depth` says otherwise; more wait on their reactor.
pub(crate) const DEFAULT_COMMIT_QUEUE_DEPTH: usize = 4096;

/// Completion of a request without data, on the reactor that submitted it.
pub(crate) type Done = Box<dyn FnOnce(&mut Reactor, Result<(), crate::error::BlockError>)>;

impl Persist {
    pub(crate) fn new(
        volume: &str,
        store: Arc<DirStore>,
        manifest: Option<ManifestCell>,
        base: Option<String>,
        deltas: Vec<Arc<Delta>>,
    ) -> Persist {
        Persist {
            inner: Arc::new(PersistInner {
                store,
                manifest,
                base,
                deltas: Mutex::new(deltas),
                commit_gate: Mutex::new(()),
                destroyed: std::sync::atomic::AtomicBool::new(false),
                commits: std::sync::atomic::AtomicU64::new(0),
                waiters: std::sync::atomic::AtomicU64::new(0),
                room: Mutex::new(Vec::new()),
            }),
            tx: Mutex::new(None),
            volume: volume.to_string(),
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            queue_depth: std::sync::atomic::AtomicUsize::new(DEFAULT_COMMIT_QUEUE_DEPTH),
        }
    }

    /// The data dir's store (deltas create, rename and delete files through it).
    pub(crate) fn store(&self) -> &Arc<DirStore> {
        &self.inner.store
    }

    /// Sets the commit queue's bound (`--commit-queue-depth`); takes effect when the
    /// committer starts, at the first commit.
    pub(crate) fn set_queue_depth(&self, depth: usize) {
        self.queue_depth
            .store(depth.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn persistent(&self) -> bool {
        self.inner.manifest.is_some()
    }

    pub(crate) fn manifest(&self) -> Option<&ManifestCell> {
        self.inner.manifest.as_ref()
    }

    /// A new delta on top (at the switch, before it is published).
    pub(crate) fn add_delta(&self, d: Arc<Delta>) {
        self.inner
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
    }

    /// A merged delta leaves the commit set (after the manifest dropped it). Returns
    /// once no commit that may still cover it runs (`commit_gate`). Blocking: call it
    /// off the reactors (merges run on their own thread).
    pub(crate) fn remove_delta(&self, id: u64) {
        let _gate = self
            .inner
            .commit_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.inner
            .deltas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d| d.id != id);
    }

    /// Group commits run so far, and the requests they served.
    pub(crate) fn commit_counts(&self) -> (u64, u64) {
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.commits.load(relaxed),
            self.inner.waiters.load(relaxed),
        )
    }

    /// Marks every delta's files for deletion when it drops.
    pub(crate) fn discard_deltas(&self) {
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
    pub(crate) fn destroy(&self) {
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
    pub(crate) fn write_manifest(&self) -> io::Result<()> {
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
            j.ensure_file(&*self.inner.store)?;
        }
        m.write_if_dirty(&*self.inner.store)
    }

    fn sender(&self) -> io::Result<crossbeam_channel::Sender<Waiter>> {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tx.as_ref() {
            return Ok(t.clone());
        }
        // Bounded: a flood of flushes waits on its reactors (module docs).
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
                    // The queue has room again: let waiting reactors fill it for the
                    // next commit while this one runs. After the drain, so that a
                    // reactor that registered before this point finds room when woken
                    // and one that registers after it finds room when it tries again.
                    let wake = {
                        let mut room = inner.room.lock().unwrap_or_else(|p| p.into_inner());
                        std::mem::take(&mut *room)
                    };
                    for w in wake {
                        w.wake();
                    }
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
    /// When the commit queue is full the request waits on this reactor to be queued
    /// (module docs, *Back-pressure*): `Queued::Waiting`, never a failure.
    pub(crate) fn commit_async(&self, r: &mut Reactor, done: Done) -> Queued {
        let slot: Arc<Mutex<Option<io::Result<()>>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let waker = crate::park::suspend(r, move |r| {
            let res = slot2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .unwrap_or_else(|| Err(io::Error::from_raw_os_error(libc::EIO)));
            done(r, res.map_err(|e| BlockError::from_io_error(&e)))
        });
        let waiter: Waiter = Box::new(move |res| {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(res);
            waker.wake();
        });
        let tx = match self.sender() {
            Ok(tx) => tx,
            // No committer thread: fail through the waker, so `done` still runs on
            // this reactor, after we return.
            Err(e) => {
                waiter(Err(e));
                return Queued::Now;
            }
        };
        let waits = commit_waits(r);
        let mut by_volume = waits.by_volume.borrow_mut();
        if let Some(o) = by_volume.get_mut(&self.key) {
            // Others of this reactor wait already: behind them (FIFO), and their
            // wake-up is registered.
            o.waiting.push_back(waiter);
            return Queued::Waiting;
        }
        match tx.try_send(waiter) {
            Ok(()) => Queued::Now,
            Err(TrySendError::Full(waiter)) => {
                by_volume.insert(
                    self.key,
                    Overflow {
                        tx,
                        inner: self.inner.clone(),
                        waiting: VecDeque::from([waiter]),
                        armed: false,
                    },
                );
                drop(by_volume);
                move_waiting(r, self.key);
                Queued::Waiting
            }
            // The committer is gone (it ends only with the volume): as a failed commit.
            Err(TrySendError::Disconnected(waiter)) => {
                waiter(Err(io::Error::from_raw_os_error(libc::EIO)));
                Queued::Now
            }
        }
    }

    /// A commit from a control thread (merge, shutdown); waits for it.
    pub(crate) fn commit_blocking(&self) -> io::Result<()> {
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

/// What [`Persist::commit_async`] did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Queued {
    /// In the commit queue (or already answered).
    Now,
    /// The queue was full: the request waits on its reactor to be queued.
    Waiting,
}

/// Source of [`Persist`] keys.
static NEXT_KEY: AtomicU64 = AtomicU64::new(0);

/// One reactor's requests waiting for room in one volume's commit queue.
struct Overflow {
    tx: Sender<Waiter>,
    inner: Arc<PersistInner>,
    /// In arrival order. Bounded by the connections' in-flight limits (module docs).
    waiting: VecDeque<Waiter>,
    /// A wake-up is registered with the committer and has not run yet.
    armed: bool,
}

/// Commit requests of this reactor waiting for queue room, by [`Persist`] key
/// (reactor-local state: the waiters' callbacks stay on their reactor).
#[derive(Default)]
struct CommitWaits {
    by_volume: RefCell<HashMap<u64, Overflow>>,
}

fn commit_waits(r: &mut Reactor) -> Rc<CommitWaits> {
    match r.local::<CommitWaits>() {
        Some(w) => w,
        None => {
            let w = Rc::new(CommitWaits::default());
            r.set_local(w.clone());
            w
        }
    }
}

/// Asks a reactor to move its waiting requests for one volume into the queue.
/// A spurious wake-up (the requests were moved already) finds nothing to do.
struct RoomWaker {
    reactor: ReactorHandle,
    key: u64,
}

impl RoomWaker {
    fn wake(self) {
        let key = self.key;
        let resume = move |r: &mut Reactor| {
            if let Some(o) = commit_waits(r).by_volume.borrow_mut().get_mut(&key) {
                o.armed = false;
            }
            move_waiting(r, key);
        };
        // Called on the committer thread: a full inbox gets a short blocking retry,
        // as the block map's wakers do (`park`). A stopped reactor needs nothing.
        if let Err(ringblk_reactor::SendError::Full) = self.reactor.send(resume) {
            let _ = self.reactor.send_blocking(resume, Duration::from_secs(1));
        }
    }
}

/// Moves this reactor's waiting requests for volume `key` into its commit queue, in
/// order, until the queue is full again; then makes sure a wake-up is registered.
fn move_waiting(r: &mut Reactor, key: u64) {
    let waits = commit_waits(r);
    let mut by_volume = waits.by_volume.borrow_mut();
    let Some(o) = by_volume.get_mut(&key) else {
        return;
    };
    let mut failed = Vec::new();
    while let Some(w) = o.waiting.pop_front() {
        match o.tx.try_send(w) {
            Ok(()) => {}
            Err(TrySendError::Full(w)) => {
                o.waiting.push_front(w);
                if o.armed {
                    break; // a wake-up is on its way
                }
                o.armed = true;
                o.inner
                    .room
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(RoomWaker {
                        reactor: r.handle().clone(),
                        key,
                    });
                // Loop once more: the committer may have emptied the queue between
                // the failed send and the registration, and would not wake us.
            }
            Err(TrySendError::Disconnected(w)) => failed.push(w),
        }
    }
    if o.waiting.is_empty() {
        by_volume.remove(&key);
    }
    drop(by_volume);
    // Answered through their wakers: `done` runs on this reactor later, not here.
    for w in failed {
        w(Err(io::Error::from_raw_os_error(libc::EIO)));
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use ringblk_reactor::{manual_reactors, ReactorConfig};

    use super::*;

    /// Guards issue #11 item 11: a commit request that found the queue full failed
    /// with ENOMEM. With a queue of one, a burst of requests from one reactor must
    /// overflow it, wait, be moved into the queue by the committer's wake-ups (no
    /// timer), and all succeed in the order they were made.
    #[test]
    fn a_full_commit_queue_makes_requests_wait_in_order() {
        const N: usize = 200;
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(crate::durable::store::DirStore::new(dir.path()));
        let persist = Persist::new("q", store, None, None, Vec::new());
        persist.set_queue_depth(1);
        let mut rs = manual_reactors(ReactorConfig::default()).expect("reactor");
        let r = &mut rs[0];
        let done = Rc::new(RefCell::new(Vec::new()));
        let mut waited = 0;
        for i in 0..N {
            let d = done.clone();
            let q = persist.commit_async(
                r,
                Box::new(move |_, res| d.borrow_mut().push((i, res.is_ok()))),
            );
            waited += usize::from(q == Queued::Waiting);
        }
        assert!(waited > 0, "{N} requests over a queue of 1: some must wait");
        let start = Instant::now();
        while done.borrow().len() < N {
            r.poll_once();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "requests stalled"
            );
        }
        let done = done.borrow();
        assert!(done.iter().all(|(_, ok)| *ok), "every commit succeeds");
        let order: Vec<usize> = done.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..N).collect::<Vec<_>>(), "in request order");
        assert!(
            commit_waits(r).by_volume.borrow().is_empty(),
            "nothing left waiting"
        );
    }
}
