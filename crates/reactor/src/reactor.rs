//! One reactor: an io_uring, its in-flight slab, pollers, timers and inbox, driven
//! by one thread.
//!
//! # Loop
//! Each iteration: reap completions into a batch → run their callbacks → fire
//! timers → run pollers → drain a bounded batch of messages → wake buffer waiters →
//! push the backlog and submit. Callbacks only *queue* SQEs; when they are entered
//! into the kernel is the [`SubmitPolicy`](crate::SubmitPolicy): once per iteration
//! (`Batch`), after every callback that queued any (`Eager`) or once `n` are queued
//! (`Every`). Either way the enter happens from the loop between callbacks, never
//! from inside a reap: CQEs it posts are reaped by the next iteration, so no callback
//! runs inside another.
//!
//! # Back-pressure
//! A full slab makes [`Reactor::submit`] hand the op back ([`Rejected`]);
//! [`Reactor::submit_or_wait`] instead parks it in the reactor's FIFO wait queue
//! (SPDK's `spdk_bdev_queue_io_wait`), and the loop puts waiting ops in flight, in
//! order, as completions free slots: no timer polls for room. A full SQ keeps
//! prepared SQEs in a backlog (bounded by the slab, since every SQE but a cancel
//! belongs to a slab entry) that is pushed on the next iteration.
//!
//! The wait queue holds ops its callers created, so the callers bound it: the
//! reactor does not refuse a waiting op (refusing would be the failure the queue
//! exists to avoid). A caller that can create ops without limit must use `submit`
//! and stop on [`Rejected`]. Ops that may stay in flight indefinitely (socket
//! receives and sends, which complete only when a peer acts) must not be able to
//! fill the slab on their own, or the ops waiting for them never get a slot: size
//! `max_in_flight` above the most such ops a reactor holds.
//!
//! # Cancellation
//! [`Reactor::cancel`] asks the kernel to cancel; the callback still runs with the
//! op's real final result (often `-ECANCELED`). [`Reactor::orphan`] also drops the
//! callback: the buffers are freed at the final CQE, never before.
//!
//! # Shutdown
//! On a stop request the reactor runs its `on_stop` hooks (which close listeners and
//! connections), keeps serving until every in-flight op has completed, cancels what
//! is left after `shutdown_timeout`, and exits. If the kernel still holds ops after a
//! second timeout, their memory is leaked on purpose rather than freed under it.

use std::any::{Any, TypeId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::buffers::{BufPool, PoolBuf};
use crate::config::{IdlePolicy, ReactorConfig};
use crate::msg::{Msg, ReactorHandle, ReactorStats, SendError};
use crate::op::{Completion, FileRef, Op};
use crate::slab::{Callback, OpId, Slab, Tag, USER_DATA_DOORBELL, USER_DATA_INTERNAL};
use crate::ReactorError;

/// `IORING_ENTER_GETEVENTS` from the kernel ABI (the io-uring crate keeps `sys` private).
const IORING_ENTER_GETEVENTS: u32 = 1;

/// A poller's verdict for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollResult {
    Busy,
    Idle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(u64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

/// A submission refused because the slab is full; the op and callback come back.
pub struct Rejected {
    pub op: Op,
    pub cb: Callback,
}

impl std::fmt::Debug for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rejected(slab full)")
    }
}

/// What [`Reactor::submit_or_wait`] did with an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    /// In flight now.
    Now(OpId),
    /// The slab was full, or other ops were already waiting for it: the op waits in
    /// the reactor's FIFO and goes in flight when a completion frees a slot.
    Waiting,
}

/// How long a message to a full inbox waits before it is offered again.
const INBOX_RETRY: Duration = Duration::from_micros(20);

/// The per-reactor step of [`Reactor::for_each_reactor`].
pub type ForEachFn = Arc<dyn Fn(&mut Reactor, ForEachNext) + Send + Sync>;

type Poller = Box<dyn FnMut(&mut Reactor) -> PollResult>;
type Hook = Box<dyn FnOnce(&mut Reactor)>;

/// Which ring an SQE goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RingKind {
    Main,
    Polled,
}

pub struct Reactor {
    // Field order matters for Drop: the rings go before the slab and the pool,
    // so registered buffers are unregistered before their memory is freed.
    ring: IoUring,
    polled_ring: Option<IoUring>,
    slab: Slab,
    polled_in_flight: usize,
    backlog: VecDeque<(squeue::Entry, RingKind)>,
    /// Set by `hold_submit`: no eager submit until this iteration's final flush.
    hold_submit: bool,
    cqe_batch: Vec<(u64, i32, u32)>,
    pollers: Vec<(PollerId, Poller)>,
    removed_pollers: Vec<PollerId>,
    next_id: u64,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    timer_cbs: HashMap<u64, Hook>,
    inbox: Receiver<Msg>,
    me: ReactorHandle,
    peers: Arc<[ReactorHandle]>,
    pool: BufPool,
    buf_waiters: VecDeque<Hook>,
    /// Ops waiting for a slab slot, in submission order (`submit_or_wait`).
    slot_waiters: VecDeque<(Op, Callback)>,
    doorbell_buf: Box<u64>,
    doorbell_armed: bool,
    stop_hooks: Vec<Hook>,
    stopping: Option<Instant>,
    cancelled_all: bool,
    free_files: Vec<u32>,
    locals: HashMap<TypeId, Rc<dyn Any>>,
    config: ReactorConfig,
    idle_since: Option<Instant>,
    tick_start: Instant,
}

impl Reactor {
    pub(crate) fn new(
        config: &ReactorConfig,
        me: ReactorHandle,
        inbox: Receiver<Msg>,
        peers: Arc<[ReactorHandle]>,
    ) -> Result<Reactor, ReactorError> {
        let mut b = IoUring::builder();
        b.setup_cqsize(config.ring_entries.saturating_mul(2))
            .setup_clamp();
        if let Some(ms) = config.sqpoll_idle_ms {
            b.setup_sqpoll(ms);
        } else {
            // Only this thread submits; lets the kernel skip cross-thread locking.
            // TASKRUN_FLAG: with COOP_TASKRUN, completions wait as task work until this
            // thread enters the kernel; the flag tells the loop when to enter for them.
            b.setup_single_issuer()
                .setup_coop_taskrun()
                .setup_taskrun_flag();
        }
        let ring = b
            .build(config.ring_entries)
            .map_err(|e| ReactorError::Ring("io_uring_setup", e))?;
        if !ring.params().is_feature_ext_arg() {
            return Err(ReactorError::Ring(
                "io_uring EXT_ARG feature (kernel >= 5.11)",
                io::Error::from_raw_os_error(libc::ENOSYS),
            ));
        }
        let polled_ring = if config.iopoll {
            let mut pb = IoUring::builder();
            pb.setup_iopoll();
            Some(
                pb.build(config.ring_entries)
                    .map_err(|e| ReactorError::Ring("io_uring_setup(IOPOLL)", e))?,
            )
        } else {
            None
        };
        ring.submitter()
            .register_files_sparse(config.fixed_files)
            .map_err(|e| ReactorError::Ring("register_files_sparse", e))?;
        let pool = BufPool::new(config.buffer_count, config.buffer_size);
        if config.buffer_count > 0 {
            let iov = pool.iovecs();
            // SAFETY: the iovecs describe the pool's region, which outlives the ring:
            // the ring is declared before `pool` in Reactor (dropped first), and the
            // pool's memory is reference-counted by every outstanding PoolBuf.
            match unsafe { ring.submitter().register_buffers(&iov) } {
                Ok(()) => pool.set_registered(true),
                // Non-root users may lack RLIMIT_MEMLOCK room: fall back to plain
                // opcodes, which is slower but correct, and say so.
                Err(e) => tracing::warn!(reactor = me.id(), error = %e,
                    "fixed buffers not registered; using unregistered buffers"),
            }
            if let Some(pr) = &polled_ring {
                // SAFETY: as above; the polled ring is also dropped before the pool.
                if unsafe { pr.submitter().register_buffers(&iov) }.is_err() {
                    pool.set_registered(false);
                }
            }
        }
        Ok(Reactor {
            ring,
            polled_ring,
            slab: Slab::with_capacity(config.max_in_flight),
            polled_in_flight: 0,
            backlog: VecDeque::new(),
            hold_submit: false,
            cqe_batch: Vec::with_capacity(config.ring_entries as usize * 2),
            pollers: Vec::new(),
            removed_pollers: Vec::new(),
            next_id: 0,
            timers: BinaryHeap::new(),
            timer_cbs: HashMap::new(),
            inbox,
            me,
            peers,
            pool,
            buf_waiters: VecDeque::new(),
            slot_waiters: VecDeque::new(),
            doorbell_buf: Box::new(0),
            doorbell_armed: false,
            stop_hooks: Vec::new(),
            stopping: None,
            cancelled_all: false,
            free_files: (0..config.fixed_files).rev().collect(),
            locals: HashMap::new(),
            config: config.clone(),
            idle_since: None,
            tick_start: Instant::now(),
        })
    }

    // ----- identity and peers -------------------------------------------------

    pub fn id(&self) -> usize {
        self.me.id()
    }

    pub fn handle(&self) -> &ReactorHandle {
        &self.me
    }

    /// Every reactor of the pool, indexed by id (this one included).
    pub fn peers(&self) -> &Arc<[ReactorHandle]> {
        &self.peers
    }

    pub fn config(&self) -> &ReactorConfig {
        &self.config
    }

    fn stats(&self) -> &ReactorStats {
        &self.me.shared.stats
    }

    // ----- reactor-local state ------------------------------------------------

    /// Stores per-reactor state of type `T` (one value per type).
    pub fn set_local<T: 'static>(&mut self, v: Rc<T>) {
        self.locals.insert(TypeId::of::<T>(), v);
    }

    pub fn local<T: 'static>(&self) -> Option<Rc<T>> {
        self.locals
            .get(&TypeId::of::<T>())
            .cloned()
            .and_then(|rc| rc.downcast::<T>().ok())
    }

    // ----- operations -----------------------------------------------------------

    /// Submits `op`; `cb` runs on this thread with the final result. The SQE is
    /// queued now and entered into the kernel when the
    /// [`SubmitPolicy`](crate::SubmitPolicy) says: at the end of the loop iteration,
    /// or (`Eager`, `Every`) as soon as the running callback returns.
    pub fn submit(
        &mut self,
        op: Op,
        cb: impl FnOnce(&mut Reactor, Completion) + 'static,
    ) -> Result<OpId, Rejected> {
        self.submit_to(op, Box::new(cb), RingKind::Main)
    }

    /// Like [`submit`](Self::submit), but an op that finds the slab full is not
    /// handed back: it waits in the reactor's FIFO wait queue and is submitted, in
    /// order, as completions free slots (module docs, *Back-pressure*). Once ops
    /// wait, later ones queue behind them even if a slot is free, so a waiting op is
    /// never overtaken by the stream of new ones. The caller bounds how many ops it
    /// makes wait; a waiting op cannot be cancelled (it owns no kernel resources).
    pub fn submit_or_wait(
        &mut self,
        op: Op,
        cb: impl FnOnce(&mut Reactor, Completion) + 'static,
    ) -> Submitted {
        let cb: Callback = Box::new(cb);
        if self.slot_waiters.is_empty() {
            match self.submit_to(op, cb, RingKind::Main) {
                Ok(id) => return Submitted::Now(id),
                Err(rej) => self.slot_waiters.push_back((rej.op, rej.cb)),
            }
        } else {
            self.slot_waiters.push_back((op, cb));
        }
        ReactorStats::add(&self.stats().slot_waits, 1);
        Submitted::Waiting
    }

    /// Like [`submit_or_wait`](Self::submit_or_wait), but a waiting op goes to the
    /// head of the wait queue: for an op that other waiting work depends on (a
    /// delta's zero-ahead write, which every fill behind it waits for). The caller
    /// keeps such ops few (one at a time per delta), so they cannot starve the rest.
    pub fn submit_or_wait_first(
        &mut self,
        op: Op,
        cb: impl FnOnce(&mut Reactor, Completion) + 'static,
    ) -> Submitted {
        match self.submit_to(op, Box::new(cb), RingKind::Main) {
            Ok(id) => Submitted::Now(id),
            Err(rej) => {
                self.slot_waiters.push_front((rej.op, rej.cb));
                ReactorStats::add(&self.stats().slot_waits, 1);
                Submitted::Waiting
            }
        }
    }

    /// Ops waiting for a slab slot (`submit_or_wait`).
    pub fn waiting_for_slots(&self) -> usize {
        self.slot_waiters.len()
    }

    /// Like [`submit`](Self::submit) but on the IOPOLL ring (O_DIRECT file data ops
    /// on a polled device only). Without one, the completion reports `-EOPNOTSUPP`.
    pub fn submit_polled(
        &mut self,
        op: Op,
        cb: impl FnOnce(&mut Reactor, Completion) + 'static,
    ) -> Result<OpId, Rejected> {
        if self.polled_ring.is_none() || !op.is_disk_data() {
            let cb: Callback = Box::new(cb);
            // Report through the normal completion path so callers have one code path.
            return self.submit(Op::Nop, move |r, _| {
                cb(
                    r,
                    Completion {
                        result: -libc::EOPNOTSUPP,
                        op,
                    },
                )
            });
        }
        self.submit_to(op, Box::new(cb), RingKind::Polled)
    }

    fn submit_to(&mut self, op: Op, cb: Callback, kind: RingKind) -> Result<OpId, Rejected> {
        let id = match self.slab.insert(op, Some(cb)) {
            Ok(id) => id,
            Err((op, cb)) => {
                return Err(Rejected {
                    op,
                    cb: cb.expect("inserted with a callback"),
                })
            }
        };
        let entry = match self.slab.get_mut(id) {
            Some(inflight) => inflight.op.build_sqe().user_data(id.user_data()),
            None => unreachable!("slot just inserted"),
        };
        if kind == RingKind::Polled {
            self.polled_in_flight += 1;
        }
        ReactorStats::add(&self.stats().ops_submitted, 1);
        self.push_sqe(entry, kind);
        Ok(id)
    }

    fn push_sqe(&mut self, entry: squeue::Entry, kind: RingKind) {
        // Keep submission order: once anything waits in the backlog, queue behind it.
        if self.backlog.is_empty() && self.try_push(&entry, kind) {
            return;
        }
        self.backlog.push_back((entry, kind));
    }

    fn try_push(&mut self, entry: &squeue::Entry, kind: RingKind) -> bool {
        let ring = match kind {
            RingKind::Main => &mut self.ring,
            RingKind::Polled => match self.polled_ring.as_mut() {
                Some(r) => r,
                None => return false,
            },
        };
        // SAFETY: every pointer in the entry refers to heap memory owned by a slab
        // entry (or by `self.doorbell_buf`) that stays alive until the op's final CQE.
        unsafe { ring.submission().push(entry).is_ok() }
    }

    /// Asks the kernel to cancel `id`. The callback still runs with the final result.
    pub fn cancel(&mut self, id: OpId) {
        if self.slab.get_mut(id).is_none() {
            return;
        }
        let entry = opcode::AsyncCancel::new(id.user_data())
            .build()
            .user_data(USER_DATA_INTERNAL);
        self.push_sqe(entry, RingKind::Main);
    }

    /// Cancels `id` and forgets its callback; its buffers are released at the final
    /// CQE. Returns false when the op had already completed.
    pub fn orphan(&mut self, id: OpId) -> bool {
        let Some(inflight) = self.slab.get_mut(id) else {
            return false;
        };
        inflight.cb = None;
        self.cancel(id);
        true
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slab.len()
    }

    // ----- files and buffers ---------------------------------------------------

    /// Puts `fd` in this reactor's fixed-file table. The caller keeps `fd` open
    /// while the slot is in use, and unregisters it before closing.
    pub fn register_file(&mut self, fd: RawFd) -> io::Result<FileRef> {
        let Some(slot) = self.free_files.pop() else {
            return Err(io::Error::from_raw_os_error(libc::ENFILE));
        };
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => Ok(FileRef::Fixed(slot)),
            Err(e) => {
                self.free_files.push(slot);
                Err(e)
            }
        }
    }

    /// Frees a fixed-file slot. In-flight ops keep their own file reference.
    pub fn unregister_file(&mut self, file: FileRef) -> io::Result<()> {
        if let FileRef::Fixed(slot) = file {
            self.ring.submitter().register_files_update(slot, &[-1])?;
            self.free_files.push(slot);
        }
        Ok(())
    }

    pub fn buffers(&self) -> &BufPool {
        &self.pool
    }

    /// A fixed buffer, or `None` when the pool is empty (then use `when_buffer_free`).
    pub fn get_buffer(&self) -> Option<PoolBuf> {
        self.pool.get()
    }

    /// Runs `f` once a pool buffer is free, in FIFO order.
    pub fn when_buffer_free(&mut self, f: impl FnOnce(&mut Reactor) + 'static) {
        self.buf_waiters.push_back(Box::new(f));
    }

    // ----- pollers, timers, hooks ---------------------------------------------

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn add_poller(&mut self, f: impl FnMut(&mut Reactor) -> PollResult + 'static) -> PollerId {
        let id = PollerId(self.next_id());
        self.pollers.push((id, Box::new(f)));
        id
    }

    pub fn remove_poller(&mut self, id: PollerId) {
        self.removed_pollers.push(id);
    }

    /// Runs `f` on this reactor after `after`.
    pub fn add_timer(
        &mut self,
        after: Duration,
        f: impl FnOnce(&mut Reactor) + 'static,
    ) -> TimerId {
        let id = self.next_id();
        self.timers.push(Reverse((Instant::now() + after, id)));
        self.timer_cbs.insert(id, Box::new(f));
        TimerId(id)
    }

    pub fn cancel_timer(&mut self, id: TimerId) -> bool {
        self.timer_cbs.remove(&id.0).is_some()
    }

    /// Runs `f` when a stop is requested; hooks close long-lived ops (listeners,
    /// idle receives) so that shutdown can finish.
    pub fn on_stop(&mut self, f: impl FnOnce(&mut Reactor) + 'static) {
        self.stop_hooks.push(Box::new(f));
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    // ----- messaging -------------------------------------------------------------

    /// Sends `f` to reactor `to`; if its inbox is full, retries from a timer so
    /// that a reactor never blocks on another.
    pub fn send_to(&mut self, to: usize, f: impl FnOnce(&mut Reactor) + Send + 'static) {
        self.send_boxed_to(to, Box::new(f))
    }

    fn send_boxed_to(&mut self, to: usize, m: Msg) {
        let Some(h) = self.peers.get(to).cloned() else {
            tracing::error!(to, "message to a reactor that does not exist dropped");
            return;
        };
        match h.try_send_boxed(m) {
            Ok(()) => {}
            // The number of retries pending is bounded by the messages the caller
            // made; each waits in a timer rather than blocking this reactor.
            Err((SendError::Full, m)) => {
                self.add_timer(INBOX_RETRY, move |r| r.send_boxed_to(to, m));
            }
            Err(_) => tracing::debug!(to, "message to a stopped reactor dropped"),
        }
    }

    /// Runs `f` on every reactor in id order (each may finish asynchronously by
    /// calling [`ForEachNext::next`]), then `done` on this reactor. Like
    /// `spdk_for_each_channel`; the switchover drains epochs with it.
    pub fn for_each_reactor(
        &mut self,
        f: ForEachFn,
        done: impl FnOnce(&mut Reactor) + Send + 'static,
    ) {
        let cursor = ForEachNext {
            index: 0,
            origin: self.id(),
            f: f.clone(),
            done: Box::new(done),
        };
        let target = 0;
        self.send_to(target, move |r| f(r, cursor));
    }

    // ----- the loop --------------------------------------------------------------

    /// Runs one loop iteration; returns whether it found any work. Public so that
    /// deterministic tests can drive several reactors from one thread.
    pub fn poll_once(&mut self) -> bool {
        let mut work = self.reap() > 0;
        work |= self.dispatch_completions();
        // Right after the completions that freed the slots: waiting ops go first.
        work |= self.wake_slot_waiters();
        work |= self.run_timers();
        work |= self.run_pollers();
        work |= self.drain_inbox();
        work |= self.wake_buffer_waiters();
        self.flush();
        self.hold_submit = false;
        work
    }

    /// Holds the submit policy's eager enters until the end of this loop iteration:
    /// what is queued from now on goes into the kernel with the iteration's final
    /// flush, in one `io_uring_enter`. For a caller that knows more SQEs follow later
    /// in this iteration: the block layer sets it when it completes a request from
    /// its ready queue (drained by a poller), so a front end's receive re-arm, queued
    /// in the receive callback, and the reply the poller queues go in together. With
    /// `Eager`, they took two enters per request at queue depth 1 (measured: 3 enters
    /// per request instead of 2 on a null volume, about 7 % of the IOPS).
    pub fn hold_submit(&mut self) {
        self.hold_submit = true;
    }

    /// Whether `hold_submit` is in force for the rest of this iteration.
    pub fn submit_held(&self) -> bool {
        self.hold_submit
    }

    fn reap(&mut self) -> usize {
        let before = self.cqe_batch.len();
        // Completions queued as task work (COOP_TASKRUN) or overflowed reach the CQ
        // only inside io_uring_enter; a spinning loop that never enters would not see
        // them until a timer tick. The kernel raises IORING_SQ_TASKRUN for the former.
        let pending = {
            let sq = self.ring.submission();
            sq.taskrun() || sq.cq_overflow()
        };
        if pending {
            // SAFETY: no argument pointer is passed.
            let _ = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
            };
        }
        for cqe in self.ring.completion() {
            self.cqe_batch
                .push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        if self.polled_in_flight > 0 {
            if let Some(pr) = &self.polled_ring {
                // IOPOLL completions are found only by polling with GETEVENTS;
                // min_complete = 0 polls once without blocking.
                // SAFETY: no argument pointer is passed.
                let _ = unsafe {
                    pr.submitter()
                        .enter::<libc::sigset_t>(0, 0, IORING_ENTER_GETEVENTS, None)
                };
            }
            if let Some(pr) = self.polled_ring.as_mut() {
                for cqe in pr.completion() {
                    self.polled_in_flight -= 1;
                    self.cqe_batch
                        .push((cqe.user_data(), cqe.result(), cqe.flags()));
                }
            }
        }
        self.cqe_batch.len() - before
    }

    fn dispatch_completions(&mut self) -> bool {
        if self.cqe_batch.is_empty() {
            return false;
        }
        let mut batch = std::mem::take(&mut self.cqe_batch);
        for (user_data, result, flags) in batch.drain(..) {
            match OpId::decode(user_data) {
                Tag::Doorbell => self.doorbell_armed = false,
                Tag::Internal => {}
                Tag::Op(id) => {
                    if cqueue::more(flags) {
                        // Not the final CQE: the kernel still owns the buffers.
                        continue;
                    }
                    let Some(inflight) = self.slab.remove(id) else {
                        debug_assert!(false, "CQE for an unknown op {user_data:#x}");
                        continue;
                    };
                    ReactorStats::add(&self.stats().ops_completed, 1);
                    match inflight.cb {
                        Some(cb) => {
                            cb(
                                self,
                                Completion {
                                    result,
                                    op: inflight.op,
                                },
                            );
                            self.submit_if_eager();
                        }
                        // Orphan: dropping the op here, after its final CQE, is what
                        // makes it safe to free its buffers.
                        None => drop(inflight.op),
                    }
                }
            }
        }
        // Keep the allocation; callbacks may have pushed nothing into cqe_batch.
        debug_assert!(self.cqe_batch.is_empty());
        self.cqe_batch = batch;
        true
    }

    fn run_timers(&mut self) -> bool {
        let mut fired = false;
        let now = Instant::now();
        while let Some(Reverse((when, id))) = self.timers.peek().copied() {
            if when > now {
                break;
            }
            self.timers.pop();
            if let Some(cb) = self.timer_cbs.remove(&id) {
                cb(self);
                self.submit_if_eager();
                fired = true;
            }
        }
        fired
    }

    fn run_pollers(&mut self) -> bool {
        if self.pollers.is_empty() {
            return false;
        }
        let mut pollers = std::mem::take(&mut self.pollers);
        let mut busy = false;
        for (id, p) in pollers.iter_mut() {
            if !self.removed_pollers.contains(id) {
                busy |= p(self) == PollResult::Busy;
                self.submit_if_eager();
            }
        }
        if !self.removed_pollers.is_empty() {
            let removed = std::mem::take(&mut self.removed_pollers);
            pollers.retain(|(id, _)| !removed.contains(id));
        }
        // Pollers added while running were pushed to self.pollers.
        pollers.append(&mut self.pollers);
        self.pollers = pollers;
        busy
    }

    fn drain_inbox(&mut self) -> bool {
        let mut n = 0;
        while n < self.config.inbox_batch {
            let Ok(m) = self.inbox.try_recv() else { break };
            m(self);
            self.submit_if_eager();
            n += 1;
        }
        ReactorStats::add(&self.stats().messages, n as u64);
        n > 0
    }

    /// Puts waiting ops in flight, oldest first, while the slab has room.
    fn wake_slot_waiters(&mut self) -> bool {
        let mut n = 0usize;
        while !self.slab.is_full() {
            let Some((op, cb)) = self.slot_waiters.pop_front() else {
                break;
            };
            if let Err(rej) = self.submit_to(op, cb, RingKind::Main) {
                // Cannot happen (the slab had room); keep the op and its turn.
                debug_assert!(false, "slab refused an op with room");
                self.slot_waiters.push_front((rej.op, rej.cb));
                break;
            }
            n += 1;
        }
        if n > 0 {
            self.submit_if_eager();
        }
        n > 0
    }

    fn wake_buffer_waiters(&mut self) -> bool {
        let n = self.pool.available().min(self.buf_waiters.len());
        for _ in 0..n {
            if let Some(w) = self.buf_waiters.pop_front() {
                w(self);
                self.submit_if_eager();
            }
        }
        n > 0
    }

    /// Under [`SubmitPolicy::Eager`](crate::SubmitPolicy::Eager) (or `Every` once
    /// enough are queued), enters what the callback that just returned queued. Safe
    /// between callbacks: the enter may post CQEs, but they are reaped (and their
    /// callbacks run) only by the next iteration, so no callback runs inside another.
    fn submit_if_eager(&mut self) {
        let Some(at_least) = self.config.submit.threshold() else {
            return;
        };
        if self.hold_submit {
            return;
        }
        let polled = self
            .polled_ring
            .as_mut()
            .map_or(0, |pr| pr.submission().len());
        if self.ring.submission().len() + polled >= at_least {
            self.flush();
        }
    }

    fn flush(&mut self) {
        while let Some((entry, kind)) = self.backlog.front() {
            let (entry, kind) = (entry.clone(), *kind);
            if !self.try_push(&entry, kind) {
                break;
            }
            self.backlog.pop_front();
        }
        if !self.ring.submission().is_empty() {
            ReactorStats::add(&self.stats().submit_enters, 1);
            // EBUSY/EAGAIN mean the kernel is short of resources: the SQEs stay
            // queued and go in with the next enter.
            if let Err(e) = self.ring.submit() {
                tracing::trace!(error = %e, "submit deferred");
            }
        }
        if let Some(pr) = &mut self.polled_ring {
            if !pr.submission().is_empty() {
                let _ = pr.submit();
            }
        }
    }

    /// Sleeps in the kernel until a CQE, the doorbell or the next timer.
    fn sleep(&mut self) {
        if self.polled_in_flight > 0
            || !self.backlog.is_empty()
            || !self.buf_waiters.is_empty() && self.pool.available() > 0
            || !self.slot_waiters.is_empty() && !self.slab.is_full()
        {
            return; // polled completions need polling, not sleeping
        }
        let shared = self.me.shared.clone();
        shared.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if !self.inbox.is_empty() || shared.stop.load(Ordering::SeqCst) && self.stopping.is_none() {
            shared.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        if !self.doorbell_armed {
            let ptr = &mut *self.doorbell_buf as *mut u64 as *mut u8;
            let fd = shared.doorbell.as_raw_fd();
            let entry = opcode::Read::new(types::Fd(fd), ptr, 8)
                .build()
                .user_data(USER_DATA_DOORBELL);
            if self.try_push(&entry, RingKind::Main) {
                self.doorbell_armed = true;
            } else {
                // SQ full: stay awake; the next flush makes room.
                shared.sleeping.store(false, Ordering::SeqCst);
                return;
            }
        }
        ReactorStats::add(&self.stats().sleeps, 1);
        // Cancelled timers leave their heap entry behind (`cancel_timer` drops only
        // the callback): drop them here, or a sleep would end at a cancelled timer's
        // time and the adaptive policy spin another `poll_us` for nothing (a vhost
        // queue cancels its wake timer when it parks: 1.6 sleeps per request at
        // 2,000 IOPS before this).
        while let Some(Reverse((_, id))) = self.timers.peek().copied() {
            if self.timer_cbs.contains_key(&id) {
                break;
            }
            self.timers.pop();
        }
        let next_timer = self.timers.peek().map(|Reverse((when, _))| *when);
        let res = match next_timer {
            Some(when) => {
                let ts = types::Timespec::from(when.saturating_duration_since(Instant::now()));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        if let Err(e) = res {
            // ETIME (timer due) and EINTR are ordinary wake-ups.
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
            ) {
                tracing::warn!(error = %e, "io_uring wait failed");
            }
        }
        shared.sleeping.store(false, Ordering::SeqCst);
    }

    fn account(&mut self, work: bool) {
        let now = Instant::now();
        let ns = now.duration_since(self.tick_start).as_nanos() as u64;
        self.tick_start = now;
        let s = &self.me.shared.stats;
        if work {
            ReactorStats::add(&s.busy_ticks, 1);
            ReactorStats::add(&s.busy_ns, ns);
        } else {
            ReactorStats::add(&s.idle_ticks, 1);
            ReactorStats::add(&s.idle_ns, ns);
        }
    }

    fn idle(&mut self, work: bool) {
        if work {
            self.idle_since = None;
            return;
        }
        match self.config.idle {
            IdlePolicy::Busy => {}
            IdlePolicy::Interrupt => self.sleep(),
            IdlePolicy::Adaptive { poll_us } => {
                let since = *self.idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_micros(poll_us) {
                    self.sleep();
                    self.idle_since = None;
                }
            }
        }
    }

    /// Checks for a stop request; returns true when the reactor may exit.
    fn check_stop(&mut self) -> bool {
        if self.stopping.is_none() && self.me.shared.stop.load(Ordering::SeqCst) {
            self.stopping = Some(Instant::now());
            for hook in std::mem::take(&mut self.stop_hooks) {
                hook(self);
            }
            self.flush();
        }
        let Some(since) = self.stopping else {
            return false;
        };
        // Waiting ops belong to requests still being served: they run first.
        if self.slab.len() == 0 && self.backlog.is_empty() && self.slot_waiters.is_empty() {
            return true;
        }
        if !self.cancelled_all && since.elapsed() > self.config.shutdown_timeout {
            tracing::warn!(
                reactor = self.id(),
                in_flight = self.slab.len(),
                "shutdown timeout: cancelling operations still in flight"
            );
            for ud in self.slab.in_flight_ids() {
                if let Tag::Op(id) = OpId::decode(ud) {
                    self.cancel(id);
                }
            }
            self.cancelled_all = true;
            self.flush();
        }
        false
    }

    /// Runs the loop until a stop request has been served.
    pub fn run(&mut self) {
        self.tick_start = Instant::now();
        loop {
            let work = self.poll_once();
            self.account(work);
            if self.check_stop() {
                break;
            }
            self.idle(work);
        }
        self.me.shared.stopped.store(true, Ordering::Release);
        self.release_doorbell();
    }

    /// Cancels the armed doorbell read and waits for its CQE so its buffer can go.
    fn release_doorbell(&mut self) {
        if !self.doorbell_armed {
            return;
        }
        let entry = opcode::AsyncCancel::new(USER_DATA_DOORBELL)
            .build()
            .user_data(USER_DATA_INTERNAL);
        self.push_sqe(entry, RingKind::Main);
        self.flush();
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.doorbell_armed && Instant::now() < deadline {
            // Ring the doorbell too: a completed read is as good as a cancelled one.
            self.me.ring();
            let _ = self.ring.submit_and_wait(1);
            self.reap();
            self.dispatch_completions();
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        if self.slab.len() > 0 || self.doorbell_armed {
            // The kernel may still write into slab-owned buffers: leak them rather
            // than free memory under it. Reaching this is a bug in shutdown.
            tracing::error!(
                reactor = self.id(),
                in_flight = self.slab.len(),
                "reactor dropped with operations in flight; leaking their buffers"
            );
            let slab = std::mem::replace(&mut self.slab, Slab::with_capacity(1));
            std::mem::forget(slab);
            let bell = std::mem::replace(&mut self.doorbell_buf, Box::new(0));
            std::mem::forget(bell);
        }
    }
}

/// Continuation of [`Reactor::for_each_reactor`]: call [`next`](Self::next) when
/// this reactor's part is done.
pub struct ForEachNext {
    index: usize,
    origin: usize,
    f: ForEachFn,
    done: Box<dyn FnOnce(&mut Reactor) + Send>,
}

impl ForEachNext {
    /// Index of the reactor this step runs on.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Moves on to the next reactor, or back to the origin with `done`.
    pub fn next(self, r: &mut Reactor) {
        let n = r.peers().len();
        if self.index + 1 < n {
            let f = self.f.clone();
            let cursor = ForEachNext {
                index: self.index + 1,
                ..self
            };
            r.send_to(cursor.index, move |r| f(r, cursor));
        } else {
            let done = self.done;
            r.send_to(self.origin, move |r| done(r));
        }
    }
}
