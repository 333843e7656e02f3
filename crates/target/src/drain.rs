//! Drain rounds: the part of the epoch protocol that a switch and a merge share
//! (ARCHITECTURE.md §5; `switchover`: # Drain, `image`: # Reclamation).
//!
//! After a control thread publishes a new stack (holding `Volume::control`), it
//! starts a *round*: one message that visits every reactor in turn, from the
//! volume's home reactor, and on each waits (timer re-checks, never a spin) until
//! that reactor's pins of every stack retired so far are zero. When the round is
//! done, [`finish_round`] frees exactly the stacks it covered (by epoch) and makes
//! ready every draining backup that no longer waits for a retired stack.
//!
//! Layer: rank 8 (beside `bdev`, which it does not use); imports `volume`, `image`
//! and the reactor crate. `merge` (9) and `switchover` (10) build on it.
//!
//! # Contracts
//! - A round holds the pin counters it watches, not the stacks: it may outlive its
//!   waiter, and another round may free the stacks meanwhile.
//! - Nobody holds `control` while waiting for a round; `start_round` and
//!   `finish_round` take its guard.
//! - Reactors never block: a reactor with pins left re-checks on a timer.

use std::sync::Arc;
use std::time::Duration;

use ringblk_reactor::{ForEachNext, Reactor, ReactorHandle};

use crate::image::Pins;
use crate::volume::{BackupState, Control, Volume};

/// How long a control thread waits to hand a drain round to a reactor whose inbox
/// is full.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a round re-checks a reactor's pins while requests are still on them.
const DRAIN_RECHECK: Duration = Duration::from_micros(10);

/// Why a backup command (create, release) or a merge failed.
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

/// A drain round in progress: one message visiting every reactor, waiting on each
/// until no request is pinned to any stack it covers (module docs: # Drain).
pub(crate) struct Round {
    pub(crate) done: crossbeam_channel::Receiver<()>,
    /// The retired stacks it covers, by epoch.
    pub(crate) epochs: Vec<u64>,
}

/// How a wait for a round ended without it completing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RoundWait {
    /// Still running (the wait's bound passed).
    Slow,
    /// Dropped by stopping reactors: it will never complete.
    Gone,
}

impl Round {
    pub(crate) fn wait(&self, bound: Duration) -> Result<(), RoundWait> {
        self.done.recv_timeout(bound).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => RoundWait::Slow,
            crossbeam_channel::RecvTimeoutError::Disconnected => RoundWait::Gone,
        })
    }

    /// Waits as long as it takes (control threads whose work needs the drain).
    pub(crate) fn wait_done(&self) -> Result<(), SwitchError> {
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
    let home = vol.home_reactor(reactors.len());
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

fn wait_unpinned(r: &mut Reactor, pins: Arc<[Arc<Pins>]>, next: ForEachNext) {
    if pins.iter().all(|p| p.pinned_on(r.id()) == 0) {
        next.next(r);
    } else {
        r.add_timer(DRAIN_RECHECK, move |r| wait_unpinned(r, pins, next));
    }
}
