//! Cross-reactor messages and the doorbell that wakes a sleeping reactor.
//!
//! # Ordering
//! Park protocol: the reactor stores `sleeping = true`, issues a SeqCst fence,
//! re-checks its inbox, and only then sleeps. A sender pushes into the channel,
//! issues a SeqCst fence, and rings the eventfd doorbell only if it then sees
//! `sleeping`. Either the reactor sees the message in its re-check or the sender
//! sees the flag: no lost wake-up, and no syscall per message while the reactor spins.
//!
//! # Bounds
//! Inboxes are bounded channels; a full inbox is reported to the sender
//! ([`SendError::Full`]) instead of growing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::reactor::Reactor;

/// A closure run on the receiving reactor's thread.
pub type Msg = Box<dyn FnOnce(&mut Reactor) + Send>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("reactor inbox is full")]
    Full,
    #[error("reactor has stopped")]
    Stopped,
}

/// Per-reactor counters, written only by the reactor thread (Relaxed) and read by
/// anyone (for `reactor list`).
#[derive(Default, Debug)]
pub struct ReactorStats {
    /// Loop iterations that found work, and the time spent in them.
    pub busy_ticks: AtomicU64,
    pub busy_ns: AtomicU64,
    /// Loop iterations that found none (spinning or about to sleep), and their time.
    pub idle_ticks: AtomicU64,
    pub idle_ns: AtomicU64,
    /// Times the reactor went to sleep in the kernel.
    pub sleeps: AtomicU64,
    pub ops_submitted: AtomicU64,
    pub ops_completed: AtomicU64,
    pub messages: AtomicU64,
    /// Submissions to the kernel: `io_uring_enter` calls that carried SQEs (with
    /// SQPOLL, flushes that may only wake the poller); sleeps and reaps are not
    /// counted. Per op, this is what the [`SubmitPolicy`](crate::SubmitPolicy) trades.
    pub submit_enters: AtomicU64,
    /// Ops that found the slab full and waited for a slot (`submit_or_wait`).
    pub slot_waits: AtomicU64,
}

/// A copy of [`ReactorStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReactorStatsSnapshot {
    pub busy_ticks: u64,
    pub busy_ns: u64,
    pub idle_ticks: u64,
    pub idle_ns: u64,
    pub sleeps: u64,
    pub ops_submitted: u64,
    pub ops_completed: u64,
    pub messages: u64,
    pub submit_enters: u64,
    pub slot_waits: u64,
}

impl ReactorStats {
    pub(crate) fn add(c: &AtomicU64, v: u64) {
        // Single writer: a load+store is enough and avoids a locked RMW.
        c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ReactorStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReactorStatsSnapshot {
            busy_ticks: l(&self.busy_ticks),
            busy_ns: l(&self.busy_ns),
            idle_ticks: l(&self.idle_ticks),
            idle_ns: l(&self.idle_ns),
            sleeps: l(&self.sleeps),
            ops_submitted: l(&self.ops_submitted),
            ops_completed: l(&self.ops_completed),
            messages: l(&self.messages),
            submit_enters: l(&self.submit_enters),
            slot_waits: l(&self.slot_waits),
        }
    }
}

pub(crate) struct Shared {
    pub id: usize,
    pub core: Option<usize>,
    pub sleeping: AtomicBool,
    pub stop: AtomicBool,
    pub stopped: AtomicBool,
    pub doorbell: OwnedFd,
    pub stats: ReactorStats,
    pub policy: crate::IdlePolicy,
}

/// A cheap, clonable, `Send` handle to one reactor.
#[derive(Clone)]
pub struct ReactorHandle {
    pub(crate) tx: Sender<Msg>,
    pub(crate) shared: Arc<Shared>,
}

impl ReactorHandle {
    pub(crate) fn new(
        id: usize,
        core: Option<usize>,
        policy: crate::IdlePolicy,
        capacity: usize,
    ) -> std::io::Result<(ReactorHandle, Receiver<Msg>)> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let doorbell = unsafe { OwnedFd::from_raw_fd(fd) };
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let shared = Arc::new(Shared {
            id,
            core,
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            doorbell,
            stats: ReactorStats::default(),
            policy,
        });
        Ok((ReactorHandle { tx, shared }, rx))
    }

    /// Index of the reactor in its pool.
    pub fn id(&self) -> usize {
        self.shared.id
    }

    /// Core the reactor is pinned to, if any.
    pub fn core(&self) -> Option<usize> {
        self.shared.core
    }

    pub fn policy(&self) -> crate::IdlePolicy {
        self.shared.policy
    }

    pub fn stats(&self) -> ReactorStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Whether the reactor is asleep in the kernel right now.
    pub fn is_sleeping(&self) -> bool {
        self.shared.sleeping.load(Ordering::Relaxed)
    }

    /// Queues `f` to run on the reactor; never blocks.
    pub fn send(&self, f: impl FnOnce(&mut Reactor) + Send + 'static) -> Result<(), SendError> {
        self.send_boxed(Box::new(f))
    }

    pub fn send_boxed(&self, m: Msg) -> Result<(), SendError> {
        self.try_send_boxed(m).map_err(|(e, _)| e)
    }

    /// Like `send_boxed`, but a refused message comes back for a retry.
    pub(crate) fn try_send_boxed(&self, m: Msg) -> Result<(), (SendError, Msg)> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err((SendError::Stopped, m));
        }
        match self.tx.try_send(m) {
            Ok(()) => {}
            Err(TrySendError::Full(m)) => return Err((SendError::Full, m)),
            Err(TrySendError::Disconnected(m)) => return Err((SendError::Stopped, m)),
        }
        self.ring_if_sleeping();
        Ok(())
    }

    /// For control-plane threads (never a reactor): waits up to `timeout` for room.
    pub fn send_blocking(
        &self,
        f: impl FnOnce(&mut Reactor) + Send + 'static,
        timeout: Duration,
    ) -> Result<(), SendError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(SendError::Stopped);
        }
        self.tx
            .send_timeout(Box::new(f), timeout)
            .map_err(|e| match e {
                crossbeam_channel::SendTimeoutError::Timeout(_) => SendError::Full,
                crossbeam_channel::SendTimeoutError::Disconnected(_) => SendError::Stopped,
            })?;
        self.ring_if_sleeping();
        Ok(())
    }

    /// Asks the reactor to stop (graceful; see [`Reactor::on_stop`]).
    pub fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.ring();
    }

    fn ring_if_sleeping(&self) {
        // Pairs with the fence in Reactor::sleep (see module docs).
        fence(Ordering::SeqCst);
        if self.shared.sleeping.load(Ordering::Relaxed) {
            self.ring();
        }
    }

    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. EAGAIN (counter
        // saturated) means a wake-up is already pending, so the result is ignored.
        unsafe {
            libc::write(
                self.shared.doorbell.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}
