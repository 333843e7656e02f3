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
//! A message (a *round*) visits every reactor in turn; on each it waits (timer
//! re-checks, never a spin) until that reactor's pins of every stack retired so far
//! reach zero — the old stack and any older one whose drain is still waiting. Then
//! the frozen image is stable: the backup is `ready`, its export serves reads, the
//! new delta is marked drained (partial first writes may read-merge from below),
//! and the stacks the round covered are freed (`image`: # Reclamation). A backup
//! is ready only when every stack up to the one its switch replaced is drained: a
//! request of an older epoch still writes into its frozen image.
//!
//! The reactors never block, and nobody holds `control` while a round runs.
//! `backup_create` waits for its round at most `drain_wait_ms` (default
//! [`DRAIN_WAIT`]); when requests of the old epoch outlast that (a slow disk), it
//! returns with the backup still `draining`, and a thread of the volume
//! (`finish_later`) waits for the round and makes the backup ready
//! when the last of them finishes; `backup_list` shows how many it waits for.
//! Nothing is freed early and no command fails for it (issue #11 item 8: the old
//! code left a timed-out stack retired, the next drain freed it under a pinned
//! request, and the backup stayed draining forever). Merges wait for their rounds
//! as long as it takes.
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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use ringblk_blockmap::{BeginMerge, BlockMap, Claim, Park};
use ringblk_reactor::{ForEachNext, Reactor, ReactorHandle};

use crate::image::{Delta, Pins, Stack};
use crate::volume::{check_name, BackupInfo, BackupState, Control, Volume};

/// How long a control thread waits to hand a drain round to a reactor whose inbox
/// is full.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `backup_create` waits for its drain by default before it returns with
/// the backup still `draining` (module docs: # Drain).
pub const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// Attempts of the drain thread to start a round before it leaves the backups
/// to the next command's round (which makes them ready too: `settle`).
const ROUND_START_TRIES: u32 = 50;
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
    #[error("volume {0:?} was deleted")]
    VolumeDeleted(String),
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
            SwitchError::VolumeDeleted(_) => libc::ENODEV,
        }
    }
}

pub(crate) fn home_reactor(vol: &Volume, n: usize) -> usize {
    vol.home_reactor(n)
}

/// A drain round in progress: one message visiting every reactor, waiting on each
/// until no request is pinned to any stack it covers (module docs: # Drain).
pub(crate) struct Round {
    done: crossbeam_channel::Receiver<()>,
    /// The retired stacks it covers, by epoch.
    epochs: Vec<u64>,
}

/// How a wait for a round ended without it completing.
#[derive(Debug, PartialEq, Eq)]
enum RoundWait {
    /// Still running (the wait's bound passed).
    Slow,
    /// Dropped by stopping reactors: it will never complete.
    Gone,
}

impl Round {
    fn wait(&self, bound: Duration) -> Result<(), RoundWait> {
        self.done.recv_timeout(bound).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => RoundWait::Slow,
            crossbeam_channel::RecvTimeoutError::Disconnected => RoundWait::Gone,
        })
    }

    /// Waits as long as it takes (control threads whose work needs the drain).
    fn wait_done(&self) -> Result<(), SwitchError> {
        self.done
            .recv()
            .map_err(|_| SwitchError::Io(std::io::Error::from_raw_os_error(libc::ESHUTDOWN)))
    }
}

/// Starts a drain round over every stack retired so far (call it after the
/// publish that retired the stack of interest, holding `control`).
pub(crate) fn start_round(
    reactors: &[ReactorHandle],
    vol: &Volume,
    ctl: &std::sync::MutexGuard<'_, Control>,
) -> Result<Round, SwitchError> {
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let retired = vol.retired_stacks(ctl);
    let epochs = retired.iter().map(|(e, _, _)| *e).collect();
    if reactors.is_empty() {
        let _ = tx.send(());
        return Ok(Round { done: rx, epochs });
    }
    // The round holds the pin counters it watches (not the stacks): it may outlive
    // its waiter, and the stacks may be freed by another round meanwhile.
    let pins: Arc<[Arc<Pins>]> = retired.into_iter().map(|(_, p, _)| p).collect();
    let step: ringblk_reactor::ForEachFn =
        Arc::new(move |r: &mut Reactor, next: ForEachNext| wait_unpinned(r, pins.clone(), next));
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
    Ok(Round { done: rx, epochs })
}

/// After a round completed: frees the stacks it covered and makes ready every
/// backup that no longer waits for a retired stack.
pub(crate) fn finish_round(
    ctl: &mut std::sync::MutexGuard<'_, Control>,
    vol: &Volume,
    round: &Round,
) {
    vol.free_drained(ctl, &round.epochs);
    settle(ctl, vol);
}

/// Marks ready every draining backup whose switch's stack, and every stack older,
/// is drained and freed.
fn settle(ctl: &mut std::sync::MutexGuard<'_, Control>, vol: &Volume) {
    let draining: Vec<(String, u64, u64)> = ctl
        .backups
        .iter()
        .filter(|b| b.state == BackupState::Draining)
        .filter(|b| vol.undrained_upto(ctl, b.drain_epoch).is_none())
        .map(|b| (b.name.clone(), b.delta_id, b.drain_epoch))
        .collect();
    for (name, delta_id, epoch) in draining {
        // Its delta is in the current stack: a draining backup cannot be released.
        if let Some(d) =
            vol.with_stack(ctl, |s| s.deltas.iter().find(|d| d.id == delta_id).cloned())
        {
            d.set_drained();
        }
        let mut ready_us = None;
        if let Some(b) = ctl.backups.iter_mut().find(|b| b.name == name) {
            b.state = BackupState::Ready;
            ready_us = b.started.map(|t| t.elapsed().as_micros() as u64);
            b.ready_us = ready_us;
        }
        vol.set_backup_exported(&name, Some(delta_id));
        tracing::info!(
            volume = vol.name(),
            backup = %name,
            epoch = epoch + 1,
            ready_us,
            "backup ready"
        );
    }
}

/// Requests backup `name` still waits for (0 unless it is draining).
pub fn waiting_requests(ctl: &std::sync::MutexGuard<'_, Control>, vol: &Volume, name: &str) -> u64 {
    ctl.backups
        .iter()
        .find(|b| b.name == name && b.state == BackupState::Draining)
        .and_then(|b| vol.undrained_upto(ctl, b.drain_epoch))
        .unwrap_or(0)
}

/// Finishes on a thread of its own the drains of backups that outlasted their
/// command's wait: runs rounds until no backup of `vol` is draining (the first
/// one is `round`, if the command had one going). At most one such thread per
/// volume; a command that finds one running leaves its backup to it.
fn finish_later(reactors: &Arc<[ReactorHandle]>, vol: &Arc<Volume>, round: Option<Round>) {
    if vol.drain_helper.swap(true, Ordering::AcqRel) {
        return;
    }
    let (reactors, vol2) = (reactors.clone(), vol.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("drain-{}", vol.name()))
        .spawn(move || {
            let vol = vol2;
            let mut round = round;
            let mut failed_starts = 0;
            loop {
                let r = match round.take() {
                    Some(r) => r,
                    None => {
                        let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
                        if !ctl.backups.iter().any(|b| b.state == BackupState::Draining) {
                            // Under `control`: a command that switches after this
                            // sees the flag clear and starts a thread of its own.
                            vol.drain_helper.store(false, Ordering::Release);
                            return;
                        }
                        match start_round(&reactors, &vol, &ctl) {
                            Ok(r) => r,
                            Err(e) => {
                                failed_starts += 1;
                                if failed_starts >= ROUND_START_TRIES {
                                    vol.drain_helper.store(false, Ordering::Release);
                                    tracing::error!(volume = vol.name(), error = %e, "drain round not started; the backups stay draining until the next backup command's drain");
                                    return;
                                }
                                drop(ctl);
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                        }
                    }
                };
                if r.wait_done().is_err() {
                    // The reactors stopped: nothing more will drain.
                    vol.drain_helper.store(false, Ordering::Release);
                    return;
                }
                let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
                finish_round(&mut ctl, &vol, &r);
                drop(ctl);
                // The now ready backups survive a restart from here on.
                if let Err(e) = vol.persist.write_manifest() {
                    tracing::error!(volume = vol.name(), error = %e, "manifest write failed; the next flush retries it");
                }
                prepare(&vol);
            }
        });
    if let Err(e) = spawned {
        vol.drain_helper.store(false, Ordering::Release);
        tracing::error!(volume = vol.name(), error = %e, "cannot start a drain thread; the backup stays draining until the next backup command's drain");
    }
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

fn wait_unpinned(r: &mut Reactor, pins: Arc<[Arc<Pins>]>, next: ForEachNext) {
    if pins.iter().all(|p| p.pinned_on(r.id()) == 0) {
        next.next(r);
    } else {
        r.add_timer(DRAIN_RECHECK, move |r| wait_unpinned(r, pins, next));
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A switch that happened and whose old epoch still has to drain.
pub struct Switched {
    old_pins: Arc<Pins>,
    #[cfg_attr(not(test), allow(dead_code))] // read by `mark_ready` (tests)
    old_epoch: u64,
    delta: Arc<Delta>,
}

impl Switched {
    /// Whether `reactor` has no request left on the old stack. Call it on that
    /// reactor (between requests) for the answer to be a quiescent state.
    pub fn drained_on(&self, reactor: usize) -> bool {
        self.old_pins.pinned_on(reactor) == 0
    }
}

/// A new delta with the next id; `reuse` as in [`Delta::create`].
fn new_delta(
    ctl: &mut Control,
    vol: &Volume,
    reuse: Option<(&Delta, u64)>,
) -> std::io::Result<Delta> {
    let id = ctl.next_delta_id;
    ctl.next_delta_id += 1;
    Delta::create(
        vol.persist.store(),
        vol.file_stem(),
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
    let (mut deltas, old_epoch, old_pins, tracker) = vol.with_stack(ctl, |s| {
        (s.deltas.clone(), s.epoch, s.pins(), s.writes.clone())
    });
    // Old-epoch writes: of the stack replaced now, and of older ones still draining.
    let mut below_writes = vec![tracker];
    below_writes.extend(vol.retired_stacks(ctl).into_iter().map(|(_, _, w)| w));
    delta.set_below_writes(below_writes);
    deltas.push(delta.clone());
    let epoch = ctl.next_epoch;
    ctl.next_epoch += 1;
    // 2. Switch: one atomic store.
    vol.publish(ctl, Stack::new(epoch, deltas, vol.reactors()));
    ctl.backups.push(BackupInfo {
        name: name.to_string(),
        delta_id: id,
        state: BackupState::Draining,
        created_unix_ms: now_unix_ms(),
        switch_us: t0.elapsed().as_micros() as u64,
        ready_us: None,
        drain_epoch: old_epoch,
        started: Some(t0),
    });
    Ok(Switched {
        old_pins,
        old_epoch,
        delta,
    })
}

/// After the caller saw [`Switched::drained_on`] every reactor (at quiescent
/// points, with no older stack retired): the backup is ready and exported.
#[cfg(test)]
pub(crate) fn mark_ready(
    ctl: &mut std::sync::MutexGuard<'_, Control>,
    vol: &Volume,
    name: &str,
    sw: Switched,
) -> BackupInfo {
    let round = Round {
        done: crossbeam_channel::never(),
        epochs: vec![sw.old_epoch],
    };
    finish_round(ctl, vol, &round);
    debug_assert!(sw.delta.is_drained());
    ctl.backups
        .iter()
        .find(|b| b.name == name)
        .cloned()
        .unwrap_or_else(|| unreachable!("switch() recorded the backup"))
}

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
    match new_delta(ctl, vol, Some((merged, zeroed))) {
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

/// Freezes the volume's current image as backup `name` and redirects every request
/// admitted from now on to a new delta. Returns once the backup is ready, or after
/// `wait` with the backup still draining (module docs: # Drain).
pub fn backup_create(
    reactors: &Arc<[ReactorHandle]>,
    vol: &Arc<Volume>,
    name: &str,
    wait: Duration,
) -> Result<BackupInfo, SwitchError> {
    let t0 = Instant::now();
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    let sw = switch(&mut ctl, vol, name, t0)?;
    // 3. One message round over every reactor: afterwards the old stacks' write
    // trackers show every old-epoch write, and partial first writes wait per chunk.
    quiesce(reactors, vol, &sw);
    // 4. Drain the old epoch (and any older one still draining), without holding
    // `control`: other commands, `backup_list` included, go on meanwhile.
    let round = start_round(reactors, vol, &ctl);
    drop(ctl);
    match round {
        Ok(round) => match round.wait(wait) {
            Ok(()) => {
                let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
                finish_round(&mut ctl, vol, &round);
            }
            Err(RoundWait::Slow) => finish_later(reactors, vol, Some(round)),
            Err(RoundWait::Gone) => {} // stopping: recovery finds it at the next start
        },
        Err(e) => {
            tracing::warn!(volume = vol.name(), error = %e, "drain round not sent; a thread retries it");
            finish_later(reactors, vol, None);
        }
    }
    let info = {
        let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        ctl.backups.iter().find(|b| b.name == name).cloned()
    };
    // A backup may be released as soon as it is ready, even before we look again.
    let info = info.ok_or_else(|| SwitchError::NotFound(vol.name().into(), name.into()))?;
    if info.state == BackupState::Draining {
        tracing::warn!(
            volume = vol.name(),
            backup = name,
            wait_ms = wait.as_millis() as u64,
            "backup still draining: requests admitted before the switch are still running"
        );
    }
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
            return Err(SwitchError::Copying(name.into(), job.id()));
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
            match merge(&reactors, &vol2, &name2) {
                Ok(()) => {}
                Err(SwitchError::VolumeDeleted(_)) => merge_stopped(&vol2, &name2),
                Err(e) => {
                    tracing::error!(volume = vol2.name(), backup = %name2, error = %e, "merge failed; backup left merging")
                }
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
                match merge(&reactors, &vol2, &name) {
                    Ok(()) => {}
                    Err(SwitchError::VolumeDeleted(_)) => merge_stopped(&vol2, &name),
                    Err(e) => {
                        tracing::error!(volume = vol2.name(), backup = %name, error = %e, "resumed merge failed; backup left merging")
                    }
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

fn merge_stopped(vol: &Volume, backup: &str) {
    tracing::info!(
        volume = vol.name(),
        backup,
        "merge stopped: the volume was deleted"
    );
}

/// Fails once `volume_delete` removed the volume: a deleted volume's merge must
/// not go on writing into a base that a volume created again under its name (or
/// anyone else) may now own. Checked before each chunk, so it stops between
/// chunks, never inside one.
fn check_live(vol: &Volume) -> Result<(), SwitchError> {
    match vol.is_removed() {
        true => Err(SwitchError::VolumeDeleted(vol.name().to_string())),
        false => Ok(()),
    }
}

pub(crate) fn merge(
    reactors: &[ReactorHandle],
    vol: &Arc<Volume>,
    name: &str,
) -> Result<(), SwitchError> {
    let _serial = vol.merge_lock.lock().unwrap_or_else(|p| p.into_inner());
    check_live(vol)?;
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
        vol.publish(&ctl, Stack::new(epoch, deltas, vol.reactors()));
        let round = start_round(reactors, vol, &ctl)?;
        // However long it takes (a request of an older epoch may be slow): a
        // release is not given up for a slow request; `control` is free meanwhile.
        drop(ctl);
        round.wait_done()?;
        let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        finish_round(&mut ctl, vol, &round);
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
            check_live(vol)?;
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
    check_live(vol)?;
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
    vol.publish(&ctl, Stack::new(epoch, deltas, vol.reactors()));
    let round = start_round(reactors, vol, &ctl)?;
    drop(ctl);
    round.wait_done()?;
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    finish_round(&mut ctl, vol, &round);
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
                .find(|c| c.backup() == b.name)
                .map(|c| serde_json::json!({"job": c.id(), "percent": c.percent()}));
            serde_json::json!({
                "volume": vol.name(),
                "name": b.name,
                // Requests a draining backup still waits for (module docs: # Drain).
                "waiting_requests": waiting_requests(&ctl, vol, &b.name),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;
    use crate::volume::VolumeSpec;
    use ringblk_reactor::{manual_reactors, ReactorConfig};

    fn volume(dir: &std::path::Path) -> Arc<Volume> {
        let spec = VolumeSpec {
            name: "slow".into(),
            path: None,
            size_bytes: Some(1 << 20),
            block_size: 512,
            backend: BackendKind::Mem,
            read_only: false,
            direct: false,
            chunk_size: 4096,
            grow: false,
        };
        Arc::new(Volume::open(spec, 2, dir).expect("volume"))
    }

    /// Runs `f` on a thread while this one polls the reactors until it returns.
    fn on_thread<R: Send + 'static>(
        rs: &mut [Reactor],
        f: impl FnOnce() -> R + Send + 'static,
    ) -> R {
        let t = std::thread::spawn(f);
        let start = Instant::now();
        while !t.is_finished() {
            for r in rs.iter_mut() {
                r.poll_once();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "stalled");
        }
        t.join().expect("thread")
    }

    fn state(vol: &Volume, name: &str) -> (BackupState, u64) {
        let ctl = vol.control.lock().expect("control");
        let b = ctl.backups.iter().find(|b| b.name == name).expect("backup");
        (b.state, waiting_requests(&ctl, vol, name))
    }

    /// Issue #11 item 8: a request pinned to the stack of epoch 0 outlasts the
    /// drain's wait of two backups in a row. The old code freed that stack at the
    /// second backup's drain (Stack's Drop asserts no pin is left) and left the
    /// first backup draining forever.
    #[test]
    fn a_pinned_stack_outlives_slow_drains_and_backups_become_ready_after() {
        let dir = tempfile::tempdir().expect("tmp");
        let vol = volume(dir.path());
        let mut rs = manual_reactors(ReactorConfig {
            cores: vec![None, None],
            ..Default::default()
        })
        .expect("reactors");
        let handles = rs[0].peers().clone();
        let held = vol.pin(0);
        assert_eq!(held.stack().epoch, 0);
        let wait = Duration::from_millis(50);
        for name in ["b1", "b2"] {
            let (h, v, n) = (handles.clone(), vol.clone(), name.to_string());
            let info =
                on_thread(&mut rs, move || backup_create(&h, &v, &n, wait)).expect("backup_create");
            assert_eq!(info.state, BackupState::Draining, "{name}");
            assert_eq!(state(&vol, name), (BackupState::Draining, 1), "{name}");
        }
        // Still readable: nothing freed it.
        assert_eq!(held.stack().epoch, 0);
        assert!(
            vol.drain_helper.load(Ordering::Acquire),
            "a thread finishes them"
        );
        drop(held);
        let start = Instant::now();
        while state(&vol, "b1").0 != BackupState::Ready || state(&vol, "b2").0 != BackupState::Ready
        {
            for r in rs.iter_mut() {
                r.poll_once();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        }
        assert_eq!(state(&vol, "b2"), (BackupState::Ready, 0));
        assert_eq!(
            vol.ready_backups(),
            vec!["b1".to_string(), "b2".to_string()]
        );
        // Both deltas may read-merge freely now.
        let ctl = vol.control.lock().expect("control");
        assert!(vol.with_stack(&ctl, |s| s.deltas.iter().all(|d| d.is_drained())));
    }
}
