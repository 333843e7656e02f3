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
//! The merge itself is [`crate::merge`]; the drain rounds both use are
//! [`crate::drain`].
//!
//! After the last drain no request can reach the merged delta, so its data file
//! becomes the next backup's prepared delta (renamed, contents stale but never
//! read: a delta chunk is read only after a fill wrote all of it). Its written
//! space spares that delta the zero-ahead writes a fresh file needs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblk_reactor::{ForEachNext, Reactor, ReactorHandle};

use crate::drain::{finish_round, start_round, Round, RoundWait};
/// Moved to [`crate::drain`] (#12 2A.4); re-exported so paths keep working.
pub use crate::drain::{SwitchError, DRAIN_TIMEOUT};
use crate::events::BdevEvent;
use crate::image::{Delta, Pins, Stack};
/// Moved to [`crate::merge`] (#12 2A.4); re-exported for sim_tests' path.
#[cfg(test)]
pub(crate) use crate::merge::merge;
/// Moved to [`crate::merge`] (#12 2A.4); re-exported so paths keep working.
pub use crate::merge::resume_merges;
use crate::volume::{check_name, BackupId, BackupInfo, BackupState, Control, View, Volume};

/// How long `backup_create` waits for its drain by default before it returns with
/// the backup still `draining` (module docs: # Drain).
pub const DRAIN_WAIT: Duration = Duration::from_secs(60);
/// Attempts of the drain thread to start a round before it leaves the backups
/// to the next command's round (which makes them ready too: `settle`).
const ROUND_START_TRIES: u32 = 50;

pub(crate) fn home_reactor(vol: &Volume, n: usize) -> usize {
    vol.home_reactor(n)
}

/// Requests backup `name` still waits for (0 unless it is draining).
pub fn waiting_requests(vol: &Volume, name: &str) -> u64 {
    let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    waiting_requests_locked(&ctl, vol, name)
}

/// [`waiting_requests`] under the caller's `control` lock.
fn waiting_requests_locked(
    ctl: &std::sync::MutexGuard<'_, Control>,
    vol: &Volume,
    name: &str,
) -> u64 {
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

/// Creates the next backup's delta ahead of time, so that the next switch does no
/// file creation. Unused, it is deleted with the volume, or at the next start as a
/// file the manifest does not list.
pub fn prepare(vol: &Volume) {
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    if ctl.prepared.is_some() || vol.read_only() || vol.is_removed() {
        return;
    }
    match vol.new_delta(&mut ctl, None) {
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
        None => vol.new_delta(ctl, None)?,
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
    // Users of the backup's view go away first (it is no longer listed, so nobody
    // opens it again: `events` # Ordering).
    let view = View::Backup(BackupId(info.delta_id));
    crate::events::notify(&reactors, vol, move |v| v == view, BdevEvent::Removed);
    crate::merge::spawn(reactors, vol, name, false)?;
    Ok(info)
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
                "waiting_requests": waiting_requests_locked(&ctl, vol, &b.name),
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
        (b.state, waiting_requests_locked(&ctl, vol, name))
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
