//! Backup switchover, drain and release (ARCHITECTURE.md §5).
//!
//! # Switch
//! `backup_create` prepares a delta (data file + empty block map), then publishes a
//! new stack with the delta on top in one atomic pointer store. A request pins the
//! stack it was admitted under, so requests admitted before the store finish against
//! the old stack (their writes land in the frozen image) and requests admitted after
//! it write to the new delta. Nothing is queued, failed or retried for the switch.
//!
//! # Drain
//! A message visits every reactor in turn; on each it waits (timer re-checks, never a
//! spin) until that reactor's pins of the old stack reach zero. Then the frozen image
//! is stable: the backup is `ready`, its export serves reads, the new delta is marked
//! drained (partial first writes may read-merge from below), and the old stack is
//! freed. The RPC thread waits for the drain (bounded), the reactors never block.
//!
//! # Release
//! Releasing backup *k* merges delta *k* (the one created at *k*'s switch) into the
//! layer beneath it: mark it merging, drain (so every request sees the mark), copy
//! each mapped chunk down — publishing the copy below before unmapping it above, so a
//! reader never finds neither — then drop the delta in one more stack swap and drain.
//! The copy runs on a control thread with blocking I/O; per-chunk `MERGING` in the
//! block map orders it against concurrent in-place writes. Other backups' content is
//! unchanged: the merged layers read the same before and after. A backup that a
//! running copy job reads, or uses as its `changed_since` base, is not released
//! (EBUSY, [`SwitchError::Copying`]; see `copyjob`).
//!
//! After the last drain no request can reach the merged delta, so its data file
//! becomes the next backup's prepared delta (renamed, contents stale but never
//! read: a delta chunk is read only after a fill wrote all of it). Its written
//! space spares that delta the zero-ahead writes a fresh file needs.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use ringblk_blockmap::{BeginMerge, BlockMap, Claim, Park};
use ringblk_reactor::{ForEachNext, Reactor, ReactorHandle};

use crate::image::{Delta, Stack};
use crate::volume::{check_name, BackupInfo, BackupState, Control, Volume};

/// How long a backup command waits for in-flight requests of the old epoch.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_RECHECK: Duration = Duration::from_micros(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwitchError {
    #[error("invalid backup name: {0}")]
    Name(String),
    #[error("volume {0:?} already has a backup named {1:?}")]
    Exists(String, String),
    #[error("volume {0:?} has no backup named {1:?}")]
    NotFound(String, String),
    #[error("backup {0:?} is {1:?}; try again when it is ready")]
    Busy(String, BackupState),
    #[error("cannot create the delta image: {0}")]
    Io(#[from] std::io::Error),
    #[error("drain did not finish within {0:?}")]
    DrainTimeout(Duration),
    #[error("the volume is read-only")]
    ReadOnly,
    #[error("backup {0:?} is in use by running copy job {1}; cancel it (backup_copy_cancel) or wait for it")]
    Copying(String, u64),
}

impl SwitchError {
    /// Negative errno for the JSON-RPC error code.
    pub fn rpc_code(&self) -> i32 {
        -match self {
            SwitchError::Name(_) => libc::EINVAL,
            SwitchError::Exists(..) => libc::EEXIST,
            SwitchError::NotFound(..) => libc::ENOENT,
            SwitchError::Busy(..) => libc::EBUSY,
            SwitchError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            SwitchError::DrainTimeout(_) => libc::ETIMEDOUT,
            SwitchError::ReadOnly => libc::EROFS,
            SwitchError::Copying(..) => libc::EBUSY,
        }
    }
}

/// A stack pointer carried across threads by the drain messages. Only compared and
/// dereferenced while the stack is retired-but-not-freed (the drain is what frees it).
#[derive(Clone, Copy)]
struct StackAddr(usize);

pub(crate) fn home_reactor(vol: &Volume, n: usize) -> usize {
    vol.name()
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % n.max(1)
}

/// Waits until no reactor has a request pinned on `old`.
fn drain(reactors: &[ReactorHandle], vol: &Volume, old: *const Stack) -> Result<(), SwitchError> {
    if reactors.is_empty() {
        return Ok(());
    }
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let addr = StackAddr(old as usize);
    let step: ringblk_reactor::ForEachFn =
        Arc::new(move |r: &mut Reactor, next: ForEachNext| wait_unpinned(r, addr, next));
    let home = home_reactor(vol, reactors.len());
    reactors[home]
        .send_blocking(
            move |r| {
                r.for_each_reactor(step, move |_| {
                    let _ = tx.send(());
                })
            },
            DRAIN_TIMEOUT,
        )
        .map_err(|_| SwitchError::DrainTimeout(DRAIN_TIMEOUT))?;
    rx.recv_timeout(DRAIN_TIMEOUT)
        .map_err(|_| SwitchError::DrainTimeout(DRAIN_TIMEOUT))
}

/// Visits every reactor once (between requests), then marks `delta` quiesced.
/// Does not wait: partial first writes wait for the whole drain until it is done.
pub fn quiesce(reactors: &[ReactorHandle], vol: &Volume, sw: &Switched) {
    if reactors.is_empty() {
        sw.delta.set_quiesced();
        return;
    }
    let d = sw.delta.clone();
    let step: ringblk_reactor::ForEachFn =
        Arc::new(|r: &mut Reactor, next: ForEachNext| next.next(r));
    let home = home_reactor(vol, reactors.len());
    let sent = reactors[home].send(move |r| r.for_each_reactor(step, move |_| d.set_quiesced()));
    if sent.is_err() {
        // Inbox full: the drain still releases the partial writes.
        tracing::debug!(
            volume = vol.name(),
            "quiesce round not sent; partial writes wait for the drain"
        );
    }
}

fn wait_unpinned(r: &mut Reactor, addr: StackAddr, next: ForEachNext) {
    // SAFETY: the stack is retired and only freed after this drain completes, which
    // cannot happen before this step calls `next`.
    let pinned = unsafe { &*(addr.0 as *const Stack) }.pinned_on(r.id());
    if pinned == 0 {
        next.next(r);
    } else {
        r.add_timer(DRAIN_RECHECK, move |r| wait_unpinned(r, addr, next));
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A switch that happened and whose old epoch still has to drain.
pub struct Switched {
    old: StackAddr,
    delta: Arc<Delta>,
    epoch: u64,
    t0: Instant,
}

impl Switched {
    /// Whether `reactor` has no request left on the old stack. Call it on that
    /// reactor (between requests) for the answer to be a quiescent state.
    pub fn drained_on(&self, reactor: usize) -> bool {
        // SAFETY: the old stack is retired, and only freed by `mark_ready`, which
        // consumes `self`.
        unsafe { &*(self.old.0 as *const Stack) }.pinned_on(reactor) == 0
    }
}

/// A new delta with the next id; `reuse` as in [`Delta::create`].
fn new_delta(
    ctl: &mut Control,
    vol: &Volume,
    reuse: Option<(&std::path::Path, u64)>,
) -> std::io::Result<Delta> {
    let id = ctl.next_delta_id;
    ctl.next_delta_id += 1;
    Delta::create(
        vol.data_dir(),
        vol.name(),
        id,
        "",
        vol.size_bytes(),
        vol.chunk_bytes(),
        vol.backend().is_direct() || vol.backend().raw_fd().is_none(),
        vol.persist.persistent(),
        reuse,
    )
}

/// Creates the next backup's delta ahead of time, so that the next switch does no
/// file creation. Unused, it is deleted with the volume, or at the next start as a
/// file the manifest does not list.
pub fn prepare(vol: &Volume) {
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    if ctl.prepared.is_some() || vol.read_only() || vol.is_removed() {
        return;
    }
    match new_delta(&mut ctl, vol, None) {
        Ok(d) => {
            d.set_discard(true);
            ctl.prepared = Some(d);
        }
        Err(e) => tracing::debug!(volume = vol.name(), error = %e, "no delta prepared ahead"),
    }
}

/// Steps 1 and 2: prepares a delta and publishes the stack with it on top.
pub fn switch(
    ctl: &mut std::sync::MutexGuard<'_, Control>,
    vol: &Volume,
    name: &str,
    t0: Instant,
) -> Result<Switched, SwitchError> {
    check_name(name).map_err(|e| SwitchError::Name(e.to_string()))?;
    if vol.read_only() {
        return Err(SwitchError::ReadOnly);
    }
    if ctl.backups.iter().any(|b| b.name == name) {
        return Err(SwitchError::Exists(vol.name().into(), name.into()));
    }
    // 1. Prepare, before the switch: the data file and its empty lookup table —
    // made ahead of time by the previous backup command when possible (`prepare`).
    let mut delta = match ctl.prepared.take() {
        Some(d) => d,
        None => new_delta(ctl, vol, None)?,
    };
    delta.backup = name.to_string();
    delta.set_discard(false);
    let id = delta.id;
    let delta = Arc::new(delta);
    // The manifest lists the delta before anything in it can be acknowledged as
    // durable: every commit writes a changed manifest first (durable::commit).
    if let Some(m) = vol.persist.manifest() {
        m.update(|m| {
            m.next_delta_id = id + 1;
            m.deltas.push(crate::durable::manifest::DeltaEntry {
                id,
                backup: name.to_string(),
                state: crate::durable::manifest::DeltaState::Active,
                created_unix_ms: now_unix_ms(),
            });
        });
    }
    vol.persist.add_delta(delta.clone());
    let (mut deltas, below_writes) = vol.with_stack(ctl, |s| (s.deltas.clone(), s.writes.clone()));
    delta.set_below_writes(below_writes);
    deltas.push(delta.clone());
    let epoch = ctl.next_epoch;
    ctl.next_epoch += 1;
    // 2. Switch: one atomic store.
    let old = vol.publish(Stack::new(epoch, deltas, vol.reactors()));
    ctl.backups.push(BackupInfo {
        name: name.to_string(),
        delta_id: id,
        state: BackupState::Draining,
        created_unix_ms: now_unix_ms(),
        switch_us: t0.elapsed().as_micros() as u64,
        ready_us: None,
    });
    Ok(Switched {
        old: StackAddr(old as usize),
        delta,
        epoch,
        t0,
    })
}

/// After the drain: the frozen image is stable; the backup is ready and exported.
pub fn mark_ready(
    ctl: &mut std::sync::MutexGuard<'_, Control>,
    vol: &Volume,
    name: &str,
    sw: Switched,
) -> BackupInfo {
    sw.delta.set_drained();
    vol.free_retired(sw.old.0 as *const Stack);
    let ready_us = sw.t0.elapsed().as_micros() as u64;
    let mut info = None;
    if let Some(b) = ctl.backups.iter_mut().find(|b| b.name == name) {
        b.state = BackupState::Ready;
        b.ready_us = Some(ready_us);
        info = Some(b.clone());
    }
    vol.set_backup_exported(name, Some(sw.delta.id));
    tracing::info!(
        volume = vol.name(),
        backup = name,
        epoch = sw.epoch,
        ready_us,
        "backup ready"
    );
    info.unwrap_or_else(|| unreachable!("switch() recorded the backup under the same lock"))
}

/// Freezes the volume's current image as backup `name` and redirects every request
/// admitted from now on to a new delta. Returns once the backup is ready.
/// Hands the data file of a merged delta to the next backup (as the prepared
/// delta), so that its written prefix spares the next delta's fills the zero-ahead
/// writes, which otherwise double the bytes a fresh delta writes. Only after the
/// final drain: from then on no request can read or write the merged delta.
/// A prepared delta that was never used is replaced when the merged file has more
/// written space (it has none unless it is itself a reused file).
fn reuse_for_next(ctl: &mut Control, vol: &Volume, merged: &Delta) {
    if vol.read_only() || vol.is_removed() {
        return;
    }
    let have = ctl.prepared.as_ref().map_or(0, |p| p.zeroed_bytes());
    if merged.zeroed_bytes() <= have {
        return;
    }
    let Some(zeroed) = merged.take_for_reuse() else {
        return;
    };
    match new_delta(ctl, vol, Some((merged.path(), zeroed))) {
        Ok(d) => {
            d.set_discard(true);
            tracing::debug!(
                volume = vol.name(),
                delta = d.id,
                zeroed,
                "merged delta file reused"
            );
            // The unused one it replaces deletes its files on drop (discard).
            ctl.prepared = Some(d);
        }
        Err(e) => {
            tracing::debug!(volume = vol.name(), error = %e, "merged delta file not reused")
        }
    }
}

pub fn backup_create(
    reactors: &[ReactorHandle],
    vol: &Arc<Volume>,
    name: &str,
) -> Result<BackupInfo, SwitchError> {
    let t0 = Instant::now();
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    let sw = switch(&mut ctl, vol, name, t0)?;
    // 3. One message round over every reactor: afterwards the old stack's write
    // tracker shows every old-epoch write, and partial first writes wait per chunk.
    quiesce(reactors, vol, &sw);
    // 4. Drain the old epoch.
    drain(reactors, vol, sw.old.0 as *const Stack)?;
    let info = mark_ready(&mut ctl, vol, name, sw);
    drop(ctl);
    // The backup survives a restart from here on.
    if let Err(e) = vol.persist.write_manifest() {
        tracing::error!(volume = vol.name(), backup = name, error = %e, "manifest write failed; the next flush retries it");
        return Err(SwitchError::Io(e));
    }
    prepare(vol);
    Ok(info)
}

/// Starts releasing backup `name`: its export closes, and the delta above it merges
/// down in the background. The backup disappears from `backup_list` when done.
pub fn backup_release(
    reactors: Arc<[ReactorHandle]>,
    vol: &Arc<Volume>,
    name: &str,
) -> Result<BackupInfo, SwitchError> {
    let info = {
        let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = ctl.backups.iter_mut().find(|b| b.name == name) else {
            return Err(SwitchError::NotFound(vol.name().into(), name.into()));
        };
        if b.state != BackupState::Ready {
            return Err(SwitchError::Busy(name.into(), b.state));
        }
        // A running copy keeps its backup (and its changed-since base) stable: refuse
        // rather than cancel someone's copy behind their back (copyjob module docs).
        if let Some(job) = ctl.copy_holding(name) {
            return Err(SwitchError::Copying(name.into(), job.id));
        }
        let Some(b) = ctl.backups.iter_mut().find(|b| b.name == name) else {
            return Err(SwitchError::NotFound(vol.name().into(), name.into()));
        };
        b.state = BackupState::Merging;
        b.clone()
    };
    vol.set_backup_exported(name, None);
    // Connections to the backup's export go away first (it is no longer listed).
    for h in reactors.iter() {
        let (v, n) = (vol.name().to_string(), name.to_string());
        let _ = h.send_blocking(
            move |r| crate::session::close_backup(r, &v, &n),
            Duration::from_secs(5),
        );
    }
    let vol2 = vol.clone();
    let name2 = name.to_string();
    std::thread::Builder::new()
        .name(format!("merge-{}", vol.name()))
        .spawn(move || {
            if let Err(e) = merge(&reactors, &vol2, &name2) {
                tracing::error!(volume = vol2.name(), backup = %name2, error = %e, "merge failed; backup left merging");
            }
        })?;
    Ok(info)
}

/// Resumes the releases that were merging when the server stopped (recovery).
pub fn resume_merges(reactors: &Arc<[ReactorHandle]>, vol: &Arc<Volume>) {
    let names: Vec<String> = {
        let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        ctl.backups
            .iter()
            .filter(|b| b.state == BackupState::Merging)
            .map(|b| b.name.clone())
            .collect()
    };
    for name in names {
        tracing::info!(volume = vol.name(), backup = %name, "resuming the release of a backup that was merging");
        let (reactors, vol2) = (reactors.clone(), vol.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("merge-{}", vol.name()))
            .spawn(move || {
                if let Err(e) = merge(&reactors, &vol2, &name) {
                    tracing::error!(volume = vol2.name(), backup = %name, error = %e, "resumed merge failed; backup left merging");
                }
            });
        if let Err(e) = spawned {
            tracing::error!(volume = vol.name(), error = %e, "cannot start a merge thread");
        }
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn merge(reactors: &[ReactorHandle], vol: &Arc<Volume>, name: &str) -> Result<(), SwitchError> {
    let _serial = vol.merge_lock.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    let (delta, below) = vol
        .with_stack(&ctl, |s| {
            let pos = s.deltas.iter().position(|d| d.backup == name);
            pos.map(|i| {
                (
                    s.deltas[i].clone(),
                    i.checked_sub(1).map(|j| s.deltas[j].clone()),
                )
            })
        })
        .ok_or_else(|| SwitchError::NotFound(vol.name().into(), name.into()))?;
    drop(ctl);
    // A restart resumes the merge: the manifest says so before any chunk moves.
    if let Some(m) = vol.persist.manifest() {
        m.update(|m| {
            for d in m.deltas.iter_mut().filter(|d| d.id == delta.id) {
                d.state = crate::durable::manifest::DeltaState::Merging;
            }
        });
    }
    vol.persist.write_manifest()?;
    // Every request must see `merging` before chunks move: mark, then drain the
    // requests admitted before the mark, via a no-op stack swap.
    delta.set_merging();
    {
        let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        let deltas = vol.with_stack(&ctl, |s| s.deltas.clone());
        let epoch = ctl.next_epoch;
        ctl.next_epoch += 1;
        let old = vol.publish(Stack::new(epoch, deltas, vol.reactors()));
        drain(reactors, vol, old)?;
        vol.free_retired(old);
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let cb = vol.chunk_bytes() as u64;
    let src = dup_file(delta.raw_fd())?;
    let dst_fd = below
        .as_ref()
        .map(|d| d.raw_fd())
        .or(vol.backend().raw_fd());
    let dst = dst_fd.map(dup_file).transpose()?;
    let mut buf = ringblk_reactor::AlignedBuf::direct(cb as usize);
    let mut merged = 0u64;
    let cap = delta.map.capacity();
    loop {
        let chunks: Vec<u64> = delta.map.iter(0, cap).map(|(c, _)| c).collect();
        if chunks.is_empty() {
            break;
        }
        for c in chunks {
            let guard = loop {
                match BlockMap::begin_merge_shared(&delta.map, c) {
                    Ok(BeginMerge::Started(g)) => break Some(g),
                    Ok(BeginMerge::Unmapped) | Err(_) => break None,
                    Ok(BeginMerge::Busy(_)) => {
                        if let Ok(Park::Parked) = delta.map.park(c, &waker) {
                            std::thread::park_timeout(Duration::from_millis(5));
                        }
                    }
                }
            };
            let Some(mut g) = guard else { continue };
            while let Park::Parked = g.poll_drained(&waker) {
                std::thread::park_timeout(Duration::from_millis(5));
            }
            src.read_exact_at(buf.as_mut_slice(), g.physical() * cb)?;
            // Publish the copy below first.
            match (&below, &dst) {
                (Some(b), Some(dst)) => copy_into_delta(b, dst, c, cb, buf.as_slice(), &waker)?,
                (None, Some(dst)) => {
                    let end = ((c + 1) * cb).min(vol.size_bytes());
                    dst.write_all_at(&buf.as_slice()[..(end - c * cb) as usize], c * cb)?
                }
                _ => {} // null base: nothing to keep
            }
            // Before the unmap is visible (journal order = map order); the commit
            // writes it only after the copy's own records below (durable::commit).
            delta.journal(ringblk_blockmap::MapRecord::Unmap { logical: c });
            loop {
                match g.finish() {
                    Ok(()) => break,
                    Err(back) => {
                        g = back;
                        std::thread::park_timeout(Duration::from_millis(1));
                    }
                }
            }
            merged += 1;
        }
    }
    // The copies (data and their mappings below) and the unmaps are durable before
    // the manifest forgets the delta.
    let _ = dst;
    vol.persist.commit_blocking()?;
    if let Some(m) = vol.persist.manifest() {
        m.update(|m| m.deltas.retain(|d| d.id != delta.id));
    }
    vol.persist.write_manifest()?;
    vol.persist.remove_delta(delta.id);
    delta.set_merged();
    // Drop the empty delta in one stack swap, then drain and free.
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    let deltas: Vec<Arc<Delta>> = vol.with_stack(&ctl, |s| {
        s.deltas
            .iter()
            .filter(|d| d.id != delta.id)
            .cloned()
            .collect()
    });
    let epoch = ctl.next_epoch;
    ctl.next_epoch += 1;
    let old = vol.publish(Stack::new(epoch, deltas, vol.reactors()));
    drain(reactors, vol, old)?;
    vol.free_retired(old);
    ctl.backups.retain(|b| b.name != name);
    reuse_for_next(&mut ctl, vol, &delta);
    drop(ctl);
    tracing::info!(
        volume = vol.name(),
        backup = name,
        chunks = merged,
        ms = t0.elapsed().as_millis() as u64,
        "backup released"
    );
    Ok(())
}

/// An owned duplicate of a descriptor the volume keeps open.
fn dup_file(fd: std::os::fd::RawFd) -> std::io::Result<File> {
    // SAFETY: dup of a descriptor owned (and kept open) by the delta or backend.
    let d = unsafe { libc::dup(fd) };
    if d < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `d` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(d) })
}

/// Writes one chunk into delta `b` (the merge target): in place if `b` holds the
/// chunk, else into a newly allocated chunk, published after the data is written.
fn copy_into_delta(
    b: &Delta,
    dst: &File,
    c: u64,
    cb: u64,
    data: &[u8],
    waker: &Waker,
) -> Result<(), SwitchError> {
    loop {
        match BlockMap::claim_shared(&b.map, c) {
            Ok(Claim::Mapped(pin)) => {
                dst.write_all_at(data, pin.physical() * cb)?;
                return Ok(());
            }
            Ok(Claim::Fill(g)) => {
                let Some(p) = b.alloc(1) else {
                    g.abort();
                    return Err(SwitchError::Io(std::io::Error::from_raw_os_error(
                        libc::ENOSPC,
                    )));
                };
                if let Err(e) = zeroed_blocking(b, dst, p, cb) {
                    g.abort();
                    return Err(SwitchError::Io(e));
                }
                dst.write_all_at(data, p * cb)?;
                b.journal(ringblk_blockmap::MapRecord::Install {
                    logical: c,
                    physical: p,
                });
                g.publish(p)
                    .map_err(|e| SwitchError::Io(std::io::Error::other(e.to_string())))?;
                return Ok(());
            }
            Ok(Claim::Busy(_)) => {
                if let Ok(Park::Parked) = b.map.park(c, waker) {
                    std::thread::park_timeout(Duration::from_millis(5));
                }
            }
            Err(e) => return Err(SwitchError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Waits until physical chunk `p` of `b` may be written (`Delta::fill_ready`),
/// doing the zero-ahead write itself when it is due (blocking: the merge thread).
fn zeroed_blocking(b: &Delta, dst: &File, p: u64, cb: u64) -> std::io::Result<()> {
    loop {
        if let Some((off, len)) = b.zero_due(p, cb) {
            let zeros = ringblk_reactor::AlignedBuf::direct(len as usize);
            let res = dst.write_all_at(zeros.as_slice(), off);
            b.zero_done(len, res.is_ok());
        }
        if b.fill_ready(p, cb) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Backups of `vol` with their delta sizes, for `backup_list` and `stats`.
pub fn backup_list(vol: &Volume) -> Vec<serde_json::Value> {
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    ctl.copies.retain(|c| c.is_running());
    let cb = vol.chunk_bytes() as u64;
    ctl.backups
        .iter()
        .map(|b| {
            let chunks = vol.with_stack(&ctl, |s| {
                s.deltas
                    .iter()
                    .find(|d| d.id == b.delta_id)
                    .map_or(0, |d| d.map.mapped_count())
            });
            // A running copy out of this backup, as `copying 42%` in the CLI.
            let copy = ctl
                .copies
                .iter()
                .find(|c| c.backup == b.name)
                .map(|c| serde_json::json!({"job": c.id, "percent": c.percent()}));
            serde_json::json!({
                "volume": vol.name(),
                "name": b.name,
                "copy": copy,
                "export": format!("{}@{}", vol.name(), b.name),
                "state": b.state,
                "delta_chunks": chunks,
                "delta_bytes": chunks * cb,
                "created_unix_ms": b.created_unix_ms,
                "switch_us": b.switch_us,
                "ready_us": b.ready_us,
            })
        })
        .collect()
}
