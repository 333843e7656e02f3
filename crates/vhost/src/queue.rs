//! The data plane of one virtqueue on one reactor: the interface the control plane
//! uses ([`QueueSetup`], [`start_queue`], [`stop_queue`], [`set_mem`]) and the
//! queue's poller.
//!
//! Layer: the vhost data plane, on top of `blk` (request parsing) and `virtq`
//! (chains, guest ranges, the inflight log). Imports the reactor, the block layer's
//! public API (`bdev`, `error`), virtio-queue's `Queue` (avail ring, used ring,
//! notification suppression with EVENT_IDX) and vm-memory.
//!
//! # Flow
//! A poller per queue pops avail heads (at most [`POP_BATCH`] per call, and never
//! more than the queue has free slots), walks and parses each chain, and submits the
//! request through the volume's [`Channel`] with an `SgList` of host pointers into
//! guest memory (no copy). The block layer's `done` names the request's slot; it
//! writes the status byte, publishes the head to the used ring and marks the queue
//! for a notification. The poller sends notifications once per loop iteration, after
//! the block layer's completions (`bdev::install` runs first), when
//! `needs_notification` (EVENT_IDX) says so.
//!
//! # Ownership
//! A queue lives in an `Rc` held by its poller, by the reactor-local table of queues
//! (which [`stop_queue`] and [`set_mem`] look into), by every request's `Done` and by
//! its armed kick read. Every request slot holds an `Arc` of the guest mapping its
//! `SgList` points into until its `done` has run, so a new memory table never unmaps
//! memory the kernel is still reading or writing. The queue keeps host pointers to
//! the avail ring's index and to the used ring (checked in one region and aligned,
//! else `None` and virtio-queue's checked accesses), valid because the queue holds
//! the mapping they point into, and replaced with it by [`set_mem`]; each slot keeps
//! its status byte's pointer with the mapping it holds. The kick, call and error
//! eventfds are owned here and closed when the queue is dropped, after its kick
//! read's final completion.
//!
//! # Back-pressure and bounds
//! A queue has one slot per descriptor of its ring: it never holds more requests than
//! its size, whatever the driver's avail index says (a bad index breaks the queue).
//! When `Channel::submit` answers `Pressure::Full`, the poller stops popping (the
//! heads already popped are still submitted; the channel queues them) and resumes
//! from `Channel::when_room` (counted in [`QueueCounters::full`]). Per-request
//! memory is the slot and the `SgList`'s segment vector (at most `SG_SEGS_MAX`);
//! chain scratch space is per queue and bounded (`virtq`, `blk`).
//!
//! # Polling and parking
//! `IdlePolicy::Busy`: notifications stay off and the poller reads the avail index
//! every iteration. `Interrupt` (at the first idle iteration) and `Adaptive` (after
//! `poll_us` without work, the reactor's own rule): enable notifications, re-check
//! the avail index (a driver that published just before sees no notification
//! request, so the re-check catches it), then arm an 8-byte `Op::read` on the kick
//! eventfd; its completion disables notifications and resumes polling. Under
//! `Adaptive` the poller keeps a timer at `poll_us` while it is idle and unparked, so
//! a reactor that sleeps first (its idle clock started a little later than ours)
//! wakes up to let the queue park.
//!
//! # Errors
//! A malformed request is answered `IOERR`/`UNSUPP` (`blk`). A structural fault (a
//! chain that cannot be walked, no reachable status byte, an avail index more than
//! the ring size ahead, a ring outside guest memory) marks the queue broken: logged
//! once, the error eventfd signalled, nothing more popped; requests in flight still
//! complete. Never a panic.
//!
//! # Stopping
//! [`stop_queue`] stops popping, cancels the kick read, waits for every request in
//! flight, drops the queue's kick/call/err fds, guest mapping and inflight log, then
//! replies with the next avail index (the GET_VRING_BASE answer): by the reply the
//! queue holds nothing of the client's (its poller leaves on the reactor's next
//! pass, an empty shell). A reactor stop does the same for all its queues, without a reply; their index is
//! kept for a `stop_queue` that comes afterwards.
//!
//! # Ordering
//! Requests start in avail order (inflight resubmissions first) and complete in any
//! order. A request's data is in guest memory (the kernel's reads completed) before
//! its status byte is written, and the status byte before the used index is
//! published (virtio-queue stores it with `Release`). Notifications go after the
//! used index.
//!
//! # Inflight (INFLIGHT_SHMFD)
//! With a region, every popped head is logged and cleared at completion
//! (`virtq::inflight`). On start, heads a previous server left in flight are served
//! first, oldest pop first, counted in [`QueueCounters::resubmitted`]; the next avail
//! index is then the used ring's index plus their number (QEMU sets the vring base
//! to the used index after a back end died).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblk_reactor::{
    Completion, FileRef, IdlePolicy, Op, OpId, PollResult, PollerId, Reactor, TimerId,
};
use ringblk_target::bdev::{
    self, Bdev, BlockOp, Channel, DataBuf, Done, IoResult, IoSink, Pressure, SgList,
};
use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::blk::plant::{planted, Plant};
use crate::blk::{self, Kind, Scratch, ID_BYTES, S_IOERR, S_OK};
use crate::errors::virtio_status;
use crate::inflight::InflightQueue;
use crate::virtq::inflight::SplitInflight;
use crate::virtq::{self, Desc};

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;

/// Avail heads popped per poller call at most.
pub const POP_BATCH: usize = 64;
/// Kick reads that may end in EAGAIN in a row before the queue stops parking
/// (a kick fd io_uring cannot wait on would otherwise spin).
const KICK_EAGAIN_MAX: u32 = 16;

/// The guest's memory as mapped from SET_MEM_TABLE (an `Arc` of the mapping).
pub use crate::memory::GuestMem;

/// Everything a reactor needs to serve one virtqueue; built by the control plane
/// when the vring is started (kick set + enabled), sent to reactor `index % n`.
pub struct QueueSetup {
    pub index: u16,
    pub size: u16,
    /// Guest physical addresses of the split ring's parts.
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// SET_VRING_BASE.
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    pub mem: GuestMem,
    pub kick: OwnedFd,
    pub call: Option<OwnedFd>,
    pub err: Option<OwnedFd>,
    pub bdev: Bdev,
    /// Writes, discards and write-zeroes fail with IOERR (a backup export).
    pub read_only: bool,
    /// INFLIGHT_SHMFD region of this queue.
    pub inflight: Option<InflightQueue>,
    pub counters: Arc<QueueCounters>,
}

/// Per-queue counters, read by `vhost_list` from any thread.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Requests completed (any status).
    pub served: AtomicU64,
    /// Inflight requests resubmitted after a reconnect.
    pub resubmitted: AtomicU64,
    /// Requests completed with a status other than OK.
    pub errors: AtomicU64,
    /// Times the volume's channel said `Full` and the queue stopped popping until
    /// it had room again (module docs, *Back-pressure and bounds*).
    pub full: AtomicU64,
    /// The queue met a structural fault and stopped (module docs, *Errors*).
    pub broken: AtomicBool,
}

/// The control plane's handle of a started queue: plain data, `Send`, to send back
/// to the queue's reactor in messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueHandle {
    id: u64,
    pub index: u16,
    /// The reactor the queue runs on.
    pub reactor: usize,
}

// The control plane builds setups and keeps handles on its thread.
const _: () = {
    const fn send<T: Send>() {}
    send::<QueueSetup>();
    send::<QueueHandle>();
};

/// Process-wide queue ids (handles stay unique across restarts of a vring).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

type Reply = Box<dyn FnOnce(u16) + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    Broken,
    Stopping,
}

/// One request in flight.
#[derive(Default)]
struct Slot {
    head: u16,
    /// Guest address of the status byte.
    status: u64,
    /// Its host address in `mem` (`blk::parse` checked it is mapped).
    status_ptr: Option<NonNull<u8>>,
    /// Used length on success (data written + the status byte).
    ok_len: u32,
    /// Block requests not yet done (discard/zeroes segments are one each).
    pending: u32,
    /// The first non-OK status of its block requests.
    result: u8,
    /// The mapping the request's buffers point into; `Some` while in flight.
    mem: Option<GuestMem>,
}

struct Vq {
    id: u64,
    index: u16,
    queue: Queue,
    mem: GuestMem,
    /// Host address of the avail ring's `idx` in `mem` (2-aligned, mapped), for
    /// the empty-poll check in `pop`; `None`: read through virtio-queue only.
    avail_idx: Option<NonNull<u16>>,
    /// Host address of the used ring (flags, idx, elements) in `mem`, when it is
    /// in one region and 4-aligned: `finish` writes elements and the index through
    /// it. `None`: through virtio-queue's `add_used` (vm-memory).
    used_ring: Option<NonNull<u8>>,
    /// Used elements added since the last notification check (EVENT_IDX's window,
    /// as virtio-queue's `num_added`, which our own writes bypass).
    added: u16,
    /// `None` once stopped (as `call`, `err`, `inflight`; `mem` is then empty):
    /// released before the stop's reply, see [`Vq::release`].
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    err: Option<OwnedFd>,
    bdev: Bdev,
    channel: Channel,
    read_only: bool,
    serial: [u8; ID_BYTES],
    inflight: Option<SplitInflight<InflightQueue>>,
    counters: Arc<QueueCounters>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    descs: Vec<Desc>,
    scratch: Scratch,
    /// Heads a previous server left in flight, oldest first.
    resubmit: VecDeque<u16>,
    state: State,
    /// A structural fault was met (logged once; stays set while stopping).
    broken: bool,
    replies: Vec<Reply>,
    /// The channel said `Full`: no popping until `when_room`.
    blocked: bool,
    policy: IdlePolicy,
    kick_op: Option<OpId>,
    /// Notifications on, kick read armed: the poller waits for the kick.
    parked: bool,
    /// Kick reads failed: the queue polls instead of parking.
    kick_unusable: bool,
    kick_eagain: u32,
    idle_since: Option<Instant>,
    /// The timer that wakes a reactor that slept before the queue parked; cancelled
    /// when the queue parks or gets work (a timer that fires counts as work: the
    /// reactor would then spin another `poll_us` before sleeping, and at low rates
    /// each request cost two spells and 2.5 sleeps).
    wake_timer: Option<TimerId>,
    need_signal: bool,
    poller: Option<PollerId>,
    /// Avail pops made while waiting for room (tests: must stay 0).
    #[cfg(test)]
    pops_while_blocked: u64,
}

/// The queue as its poller, table and requests hold it; the block layer's sink.
struct QueueCell(RefCell<Vq>);

impl IoSink for QueueCell {
    fn complete(&self, r: &mut Reactor, tag: u64, res: IoResult) {
        self.0.borrow_mut().complete(tag, res);
        finish_if_stopped(r, self);
    }
}

/// The queues of one reactor.
#[derive(Default)]
struct Local {
    queues: RefCell<HashMap<u64, Rc<QueueCell>>>,
    /// Next avail index of queues a reactor stop ended with no stop request
    /// pending, for a `stop_queue` that comes later (bounded by the queues that
    /// ran here; only a reactor stop adds to it).
    ended: RefCell<HashMap<u64, u16>>,
}

fn local(r: &mut Reactor) -> Rc<Local> {
    if let Some(l) = r.local::<Local>() {
        return l;
    }
    let l = Rc::new(Local::default());
    r.set_local(l.clone());
    r.on_stop(stop_all);
    l
}

fn lookup(r: &mut Reactor, h: &QueueHandle) -> Option<Rc<QueueCell>> {
    local(r).queues.borrow().get(&h.id).cloned()
}

/// Runs on the reactor: installs the queue's poller.
pub fn start_queue(r: &mut Reactor, s: QueueSetup) -> QueueHandle {
    // The block layer's ready-queue poller runs before ours in each iteration, so
    // completions of the iteration are signalled in the same iteration.
    bdev::install(r);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let handle = QueueHandle {
        id,
        index: s.index,
        reactor: r.id(),
    };
    let made = make_queue(&s);
    let (queue, fault) = match made {
        Ok(q) => (q, None),
        Err(why) => (placeholder_queue(s.next_avail), Some(why)),
    };
    let size = if fault.is_none() { s.size } else { 0 };
    let channel = s.bdev.channel(r);
    let mut vq = Vq {
        id,
        index: s.index,
        queue,
        serial: blk::serial(s.bdev.name()),
        avail_idx: None,
        used_ring: None,
        added: 0,
        mem: s.mem,
        kick: Some(s.kick),
        call: s.call,
        err: s.err,
        bdev: s.bdev,
        channel,
        read_only: s.read_only,
        inflight: None,
        counters: s.counters,
        slots: (0..size).map(|_| Slot::default()).collect(),
        free: (0..size).rev().collect(),
        descs: Vec::new(),
        scratch: Scratch::default(),
        resubmit: VecDeque::new(),
        state: State::Running,
        broken: false,
        replies: Vec::new(),
        blocked: false,
        policy: r.config().idle,
        kick_op: None,
        parked: false,
        kick_unusable: false,
        kick_eagain: 0,
        idle_since: None,
        wake_timer: None,
        need_signal: false,
        poller: None,
        #[cfg(test)]
        pops_while_blocked: 0,
    };
    match fault {
        Some(why) => vq.break_queue(why),
        None => {
            vq.avail_idx = avail_idx_ptr(&vq.queue, &vq.mem);
            vq.used_ring = used_ring_ptr(&vq.queue, &vq.mem);
            if let Some(region) = s.inflight {
                vq.open_inflight(region);
            }
            // Notifications off: the poller finds work itself until it parks.
            if let Err(e) = vq.queue.disable_notification(&*vq.mem) {
                vq.break_queue(format!("used ring: {e}"));
            }
        }
    }
    let cell = Rc::new(QueueCell(RefCell::new(vq)));
    let c = cell.clone();
    let poller = r.add_poller(move |r| poll(r, &c));
    cell.0.borrow_mut().poller = Some(poller);
    local(r).queues.borrow_mut().insert(id, cell);
    handle
}

/// Stop (GET_VRING_BASE / reset / disconnect): stop popping, wait for in-flight
/// requests to complete, then `reply(next_avail)`. Runs on the queue's reactor.
pub fn stop_queue(r: &mut Reactor, h: &QueueHandle, reply: Box<dyn FnOnce(u16) + Send>) {
    let Some(cell) = lookup(r, h) else {
        // Ended by a reactor stop (its index is kept), or never started here.
        let ended = local(r).ended.borrow_mut().remove(&h.id);
        if ended.is_none() {
            tracing::warn!(queue = h.index, "stop of a queue that is not running");
        }
        reply(ended.unwrap_or(0));
        return;
    };
    {
        let mut vq = cell.0.borrow_mut();
        vq.state = State::Stopping;
        vq.replies.push(reply);
        if let Some(op) = vq.kick_op {
            r.cancel(op);
        }
    }
    finish_if_stopped(r, &cell);
}

/// Memory table changed: the queue takes the new mapping for new requests
/// (requests in flight keep the one they were parsed in).
pub fn set_mem(r: &mut Reactor, h: &QueueHandle, mem: GuestMem) {
    if let Some(cell) = lookup(r, h) {
        let mut vq = cell.0.borrow_mut();
        // A queue broken from the start has a placeholder ring: no pointer.
        (vq.avail_idx, vq.used_ring) = if vq.slots.is_empty() {
            (None, None)
        } else {
            (
                avail_idx_ptr(&vq.queue, &mem),
                used_ring_ptr(&vq.queue, &mem),
            )
        };
        vq.mem = mem;
    }
}

/// The next avail index of a running queue (tests: how many heads it popped).
#[cfg(test)]
pub(crate) fn next_avail_of(r: &mut Reactor, h: &QueueHandle) -> Option<u16> {
    lookup(r, h).map(|c| c.0.borrow().queue.next_avail())
}

/// Whether a running queue has its kick read armed (tests).
#[cfg(test)]
pub(crate) fn parked_of(r: &mut Reactor, h: &QueueHandle) -> Option<bool> {
    lookup(r, h).map(|c| c.0.borrow().kick_op.is_some())
}

/// How often a running queue popped its avail ring while waiting for room in the
/// channel (tests: must be 0).
#[cfg(test)]
pub(crate) fn pops_while_blocked(r: &mut Reactor, h: &QueueHandle) -> Option<u64> {
    lookup(r, h).map(|c| c.0.borrow().pops_while_blocked)
}

/// Reactor stop: every queue stops as in [`stop_queue`], without a reply.
fn stop_all(r: &mut Reactor) {
    let cells: Vec<_> = local(r).queues.borrow().values().cloned().collect();
    for cell in cells {
        {
            let mut vq = cell.0.borrow_mut();
            vq.state = State::Stopping;
            if let Some(op) = vq.kick_op {
                r.cancel(op);
            }
        }
        finish_if_stopped(r, &cell);
    }
}

/// A stopping queue with nothing in flight and no kick read leaves its reactor and
/// answers its stop requests.
fn finish_if_stopped(r: &mut Reactor, cell: &QueueCell) {
    let (replies, next_avail, poller, id) = {
        let mut vq = cell.0.borrow_mut();
        let drained = vq.in_flight() == 0 || planted(Plant::ReplyEarly);
        if vq.state != State::Stopping || !drained || vq.kick_op.is_some() {
            return;
        }
        vq.signal();
        if !planted(Plant::KeepResources) {
            vq.release();
        }
        (
            std::mem::take(&mut vq.replies),
            vq.queue.next_avail(),
            vq.poller.take(),
            vq.id,
        )
    };
    if let Some(p) = poller {
        r.remove_poller(p);
        let l = local(r);
        l.queues.borrow_mut().remove(&id);
        if replies.is_empty() {
            l.ended.borrow_mut().insert(id, next_avail);
        }
    }
    for reply in replies {
        reply(next_avail);
    }
}

/// virtio-queue's `Queue` for the setup, checked against guest memory.
fn make_queue(s: &QueueSetup) -> Result<Queue, String> {
    let mut q = Queue::new(s.size).map_err(|e| format!("queue size {}: {e}", s.size))?;
    q.try_set_desc_table_address(GuestAddress(s.desc_table))
        .map_err(|e| format!("descriptor table: {e}"))?;
    q.try_set_avail_ring_address(GuestAddress(s.avail_ring))
        .map_err(|e| format!("avail ring: {e}"))?;
    q.try_set_used_ring_address(GuestAddress(s.used_ring))
        .map_err(|e| format!("used ring: {e}"))?;
    q.set_event_idx(s.event_idx);
    q.set_ready(true);
    if !q.is_valid(&*s.mem) {
        return Err("rings outside guest memory".into());
    }
    // The used index continues where the ring says (a restart, a reconnect).
    let used = q
        .used_idx(&*s.mem, Ordering::Acquire)
        .map_err(|e| format!("used ring: {e}"))?;
    q.set_next_used(used.0);
    q.set_next_avail(s.next_avail);
    Ok(q)
}

/// The host address of the avail ring's `idx` field in `mem`, when it is mapped and
/// 2-aligned (the spec aligns the avail ring to 2; anything else reads through
/// virtio-queue). Valid while `mem` is held: the queue holds it, and replaces the
/// pointer with the mapping (`set_mem`).
fn avail_idx_ptr(q: &Queue, mem: &GuestMem) -> Option<NonNull<u16>> {
    let at = q.avail_ring().checked_add(2)?;
    let p = virtq::host_ptr(mem, at, 2)?;
    if p.as_ptr() as usize % 2 != 0 {
        return None;
    }
    Some(p.cast())
}

/// The host address of the used ring (`le16 flags, le16 idx`, then `size` elements
/// of `le32 id, le32 len`) in `mem`, when all of it lies in one region and it is
/// 4-aligned (the spec's alignment; anything else goes through virtio-queue). Valid
/// while `mem` is held, as [`avail_idx_ptr`].
fn used_ring_ptr(q: &Queue, mem: &GuestMem) -> Option<NonNull<u8>> {
    let bytes = 4 + 8 * u32::from(q.size());
    let p = virtq::host_ptr(mem, q.used_ring(), bytes)?;
    if p.as_ptr() as usize % 4 != 0 {
        return None;
    }
    Some(p)
}

/// The queue value of a queue broken from the start (never popped from).
fn placeholder_queue(next_avail: u16) -> Queue {
    // A size of 1 is a power of two: `new` cannot refuse it (not client input).
    let mut q = Queue::new(1).expect("queue size 1 is valid");
    q.set_next_avail(next_avail);
    q
}

/// The queue's poller (module docs, *Polling and parking*).
fn poll(r: &mut Reactor, cell: &Rc<QueueCell>) -> PollResult {
    let mut vq = cell.0.borrow_mut();
    let mut work = vq.signal();
    if vq.state != State::Running || vq.parked {
        return busy_if(work);
    }
    if !vq.blocked || planted(Plant::PopWhenFull) {
        work |= vq.serve_resubmits(cell, r);
        work |= vq.pop(cell, r);
        // Requests answered at once (malformed, GET_ID) are signalled now.
        work |= vq.signal();
    }
    if work {
        vq.idle_since = None;
        vq.cancel_wake_timer(r);
        return PollResult::Busy;
    }
    if vq.blocked || vq.free.is_empty() || !vq.resubmit.is_empty() || vq.state != State::Running {
        // Waiting for completions, which wake the reactor.
        return PollResult::Idle;
    }
    busy_if(vq.idle(cell, r))
}

fn busy_if(work: bool) -> PollResult {
    if work {
        PollResult::Busy
    } else {
        PollResult::Idle
    }
}

impl Vq {
    /// A stopped, drained queue drops what ties it to the client before its stop
    /// is answered: kick/call/err fds, the guest mapping and the inflight log. The
    /// poller (and so this value) only leaves the reactor on its next pass, and the
    /// control plane takes the reply to mean all of them are gone (it reports the
    /// mapping unmapped, counts fds). The ring pointers point into the mapping and
    /// go with it; a released queue neither pops nor signals (state is Stopping).
    fn release(&mut self) {
        self.avail_idx = None;
        self.used_ring = None;
        self.mem = Arc::new(GuestMemoryMmap::default());
        self.kick = None;
        self.call = None;
        self.err = None;
        self.inflight = None;
        self.need_signal = false;
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn open_inflight(&mut self, region: InflightQueue) {
        let used = self.queue.next_used();
        match SplitInflight::open(region, self.queue.size(), used) {
            Ok((log, pending)) => {
                if !pending.is_empty() {
                    // Popped = used + in flight (module docs, *Inflight*).
                    let n = pending.len() as u16;
                    self.queue.set_next_avail(used.wrapping_add(n));
                    tracing::info!(
                        queue = self.index,
                        requests = pending.len(),
                        "resubmitting requests left in flight"
                    );
                }
                self.resubmit = pending.into();
                self.inflight = Some(log);
            }
            Err(e) => {
                tracing::warn!(queue = self.index, error = %e, "inflight region unusable; not tracking");
            }
        }
    }

    /// Marks the queue broken (module docs, *Errors*); logs once.
    fn break_queue(&mut self, why: impl std::fmt::Display) {
        if self.state == State::Running {
            self.state = State::Broken;
        }
        if self.broken {
            return;
        }
        self.broken = true;
        self.counters.broken.store(true, Ordering::Relaxed);
        tracing::error!(queue = self.index, "virtqueue broken: {why}");
        if let Some(fd) = &self.err {
            write_eventfd(fd);
        }
    }

    /// Sends the call notification when completions need one; whether it did work.
    fn signal(&mut self) -> bool {
        if !self.need_signal {
            return false;
        }
        self.need_signal = false;
        match self.needs_notification() {
            Ok(false) if !planted(Plant::AlwaysSignal) => {}
            Ok(_) => {
                if let Some(fd) = &self.call {
                    write_eventfd(fd);
                }
            }
            Err(e) => self.break_queue(format!("avail ring (used_event, flags): {e}")),
        }
        true
    }

    /// Whether the driver wants a notification for what was just used: EVENT_IDX's
    /// `used_event` (virtio-queue), else the avail ring's `VRING_AVAIL_F_NO_INTERRUPT`
    /// flag, which virtio-queue ignores and a polling driver (libblkio without
    /// EVENT_IDX) sets: honouring it saves an eventfd write per batch.
    fn needs_notification(&mut self) -> Result<bool, virtio_queue::Error> {
        if self.queue.event_idx_enabled() {
            // virtio-queue's rule with our own count of elements added since the
            // last check (Linux's vring_need_event): notify when `used_event` lies
            // in [old, new).
            let new = std::num::Wrapping(self.queue.next_used());
            let old = new - std::num::Wrapping(self.added);
            self.added = 0;
            // The used index stores before the used_event load.
            std::sync::atomic::fence(Ordering::SeqCst);
            let at = 4 + 2 * u64::from(self.queue.size());
            let addr = self
                .queue
                .avail_ring()
                .checked_add(at)
                .ok_or(virtio_queue::Error::AddressOverflow)?;
            let used_event: u16 = self
                .mem
                .load(GuestAddress(addr), Ordering::Relaxed)
                .map_err(virtio_queue::Error::GuestMemory)?;
            let used_event = std::num::Wrapping(u16::from_le(used_event));
            return Ok(new - used_event - std::num::Wrapping(1) < new - old);
        }
        // The used index stores before the flags load (the driver orders the other
        // way), as in `needs_notification`.
        std::sync::atomic::fence(Ordering::SeqCst);
        let flags: u16 = self
            .mem
            .load(GuestAddress(self.queue.avail_ring()), Ordering::Relaxed)
            .map_err(virtio_queue::Error::GuestMemory)?;
        Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }

    fn serve_resubmits(&mut self, cell: &Rc<QueueCell>, r: &mut Reactor) -> bool {
        let mut work = false;
        while !self.free.is_empty() && !self.blocked && self.state == State::Running {
            let Some(head) = self.resubmit.pop_front() else {
                break;
            };
            self.counters.resubmitted.fetch_add(1, Ordering::Relaxed);
            let mem = self.mem.clone();
            self.serve(cell, r, &mem, head, true);
            work = true;
        }
        work
    }

    /// Pops and serves up to a batch of avail heads.
    fn pop(&mut self, cell: &Rc<QueueCell>, r: &mut Reactor) -> bool {
        let want = self.free.len().min(POP_BATCH);
        if want == 0 || self.state != State::Running {
            return false;
        }
        #[cfg(test)]
        if self.blocked {
            self.pops_while_blocked += 1;
        }
        if let Some(p) = self.avail_idx {
            // The empty poll of a busy reactor: one load instead of virtio-queue's
            // checked read (a stale value only defers the pop to the next call;
            // `iter` reads the index again, with Acquire, when there is work).
            // SAFETY: `avail_idx_ptr` checked the two bytes are mapped and
            // 2-aligned in `self.mem`, which the queue holds.
            let idx = u16::from_le(unsafe { std::ptr::read_volatile(p.as_ptr()) });
            if idx == self.queue.next_avail() {
                return false;
            }
        }
        let mut heads = [0u16; POP_BATCH];
        // No Arc clone on an empty poll (the busy path): the iterator borrows the
        // queue and the mapping as disjoint fields.
        let popped = match self.queue.iter(&*self.mem) {
            Ok(mut it) => {
                let mut n = 0;
                while n < want {
                    match it.next() {
                        Some(chain) => {
                            heads[n] = chain.head_index();
                            n += 1;
                        }
                        None => break,
                    }
                }
                Ok(n)
            }
            Err(e) => Err(e),
        };
        let n = match popped {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) => {
                self.break_queue(format!("avail ring: {e}"));
                return true;
            }
        };
        let mem = self.mem.clone();
        // Every popped head is served, even once the channel is full (it queues).
        for &head in &heads[..n] {
            if self.state != State::Running {
                break;
            }
            self.serve(cell, r, &mem, head, false);
        }
        n > 0
    }

    /// Walks, parses and submits the request at `head`.
    fn serve(
        &mut self,
        cell: &Rc<QueueCell>,
        r: &mut Reactor,
        mem: &GuestMem,
        head: u16,
        resubmitted: bool,
    ) {
        let (table, size) = (self.queue.desc_table(), self.queue.size());
        if let Err(e) = virtq::walk(mem, table, size, head, &mut self.descs) {
            self.break_queue(format!("chain at head {head}: {e}"));
            return;
        }
        if !resubmitted {
            if let Some(log) = &mut self.inflight {
                log.begin(head);
            }
        }
        let req = match blk::parse(mem, &self.descs, self.read_only, &mut self.scratch) {
            Ok(req) => req,
            Err(e) => {
                self.break_queue(format!("request at head {head}: {e}"));
                return;
            }
        };
        let Some(slot) = self.free.pop() else {
            // Callers pop only as many heads as there are free slots.
            self.break_queue("more requests than slots");
            return;
        };
        let slot = usize::from(slot);
        self.slots[slot] = Slot {
            head,
            status: req.status,
            status_ptr: Some(req.status_ptr),
            ok_len: 1,
            pending: 1,
            result: S_OK,
            mem: Some(mem.clone()),
        };
        match req.kind {
            Kind::Fail(st) => self.finish(slot, st),
            Kind::Flush => self.submit(cell, r, slot, BlockOp::Flush),
            Kind::Read { offset, len } | Kind::Write { offset, len } => {
                if len == 0 {
                    self.finish(slot, S_OK);
                    return;
                }
                // SAFETY: every segment is a range `virtq::host_ptr` found inside one
                // region of `mem`, mapped read/write; the slot holds `mem` (an Arc of
                // the mapping) until this request's `done` has run (`complete`), and
                // the queue touches the ranges no more (the guest may: tolerated).
                let sg = match unsafe { SgList::new(&self.scratch.segs) } {
                    Ok(sg) => DataBuf::Sg(sg),
                    Err(e) => {
                        self.finish(slot, virtio_status(e));
                        return;
                    }
                };
                let op = if let Kind::Read { .. } = req.kind {
                    self.slots[slot].ok_len = len.saturating_add(1);
                    BlockOp::Read {
                        offset,
                        len,
                        into: sg,
                    }
                } else {
                    BlockOp::Write {
                        offset,
                        len,
                        data: sg,
                        fua: false,
                    }
                };
                self.submit(cell, r, slot, op);
            }
            Kind::GetId => match blk::write_id(mem, &self.scratch.id, &self.serial) {
                Some(n) => {
                    self.slots[slot].ok_len = n + 1;
                    self.finish(slot, S_OK);
                }
                None => self.finish(slot, S_IOERR),
            },
            Kind::Discard | Kind::WriteZeroes { .. } => {
                let n = self.scratch.ranges.len();
                self.slots[slot].pending = n as u32;
                for i in 0..n {
                    let rg = self.scratch.ranges[i];
                    let op = match req.kind {
                        Kind::WriteZeroes { unmap } => BlockOp::WriteZeroes {
                            offset: rg.offset,
                            len: rg.len,
                            may_unmap: unmap,
                            fast_only: false,
                            fua: false,
                        },
                        _ => BlockOp::Unmap {
                            offset: rg.offset,
                            len: rg.len,
                            fua: false,
                        },
                    };
                    self.submit(cell, r, slot, op);
                }
            }
        }
    }

    fn submit(&mut self, cell: &Rc<QueueCell>, r: &mut Reactor, slot: usize, op: BlockOp) {
        let sink: Rc<dyn IoSink> = cell.clone();
        let done = Done::new(sink, slot as u64);
        if self.channel.submit(r, &self.bdev, op, done) == Pressure::Full && !self.blocked {
            self.blocked = true;
            self.counters.full.fetch_add(1, Ordering::Relaxed);
            let w = Rc::downgrade(cell);
            self.channel.when_room(r, move |_| {
                if let Some(c) = w.upgrade() {
                    c.0.borrow_mut().blocked = false;
                }
            });
        }
    }

    /// A block request of slot `tag` is done.
    fn complete(&mut self, tag: u64, res: IoResult) {
        let Some(s) = usize::try_from(tag)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            debug_assert!(false, "completion of an unknown slot {tag}");
            return;
        };
        if s.mem.is_none() || s.pending == 0 {
            debug_assert!(false, "completion of an idle slot {tag}");
            return;
        }
        if let Err(e) = &res {
            if s.result == S_OK {
                s.result = virtio_status(*e);
            }
        }
        s.pending -= 1;
        if s.pending == 0 {
            let st = s.result;
            self.finish(tag as usize, st);
        }
    }

    /// Answers slot `i` with `st`: status byte, used ring, inflight log, counters.
    fn finish(&mut self, i: usize, st: u8) {
        let s = &mut self.slots[i];
        let Some(mem) = s.mem.take() else {
            return;
        };
        let (head, status) = (s.head, s.status);
        let len = if st == S_OK { s.ok_len } else { 1 };
        s.pending = 0;
        let status_ptr = s.status_ptr.take();
        self.free.push(i as u16);
        match status_ptr {
            // SAFETY: `parse` translated the status byte in `mem`, the mapping this
            // slot held from then until here; one volatile store (the guest shares
            // the byte).
            Some(p) => unsafe { std::ptr::write_volatile(p.as_ptr(), st) },
            None => {
                if mem.write_obj(st, GuestAddress(status)).is_err() {
                    self.break_queue(format!("status byte at {status:#x}"));
                }
            }
        }
        drop(mem);
        self.counters.served.fetch_add(1, Ordering::Relaxed);
        if st != S_OK {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(log) = &mut self.inflight {
            log.before_used(head);
        }
        if let Err(e) = self.add_used(head, len) {
            self.break_queue(format!("used ring: {e}"));
            return;
        }
        if let Some(log) = &mut self.inflight {
            log.after_used(head, self.queue.next_used());
        }
        self.need_signal = true;
    }

    /// Publishes `head` in the used ring: the element, then the index with
    /// `Release` (so the status byte and data before it are visible first), as
    /// virtio-queue's `add_used` does, through the host pointer when there is one.
    fn add_used(&mut self, head: u16, len: u32) -> Result<(), virtio_queue::Error> {
        let size = self.queue.size();
        let Some(base) = self.used_ring else {
            self.queue.add_used(&*self.mem, head, len)?;
            self.added = self.added.wrapping_add(1);
            return Ok(());
        };
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let next = self.queue.next_used();
        let elem = 4 + 8 * usize::from(next % size);
        let new = next.wrapping_add(1);
        // SAFETY: `used_ring_ptr` found the `4 + 8 * size` bytes of the ring mapped
        // in one region of `self.mem` (held) and 4-aligned; `elem + 8` is within
        // them, the idx at offset 2 is 2-aligned. The guest shares the ring: volatile
        // stores for the element, an atomic store for the index.
        unsafe {
            let e = base.as_ptr().add(elem);
            std::ptr::write_volatile(e.cast::<u32>(), u32::from(head).to_le());
            std::ptr::write_volatile(e.add(4).cast::<u32>(), len.to_le());
            let idx = &*base.as_ptr().add(2).cast::<std::sync::atomic::AtomicU16>();
            idx.store(new.to_le(), Ordering::Release);
        }
        self.queue.set_next_used(new);
        self.added = self.added.wrapping_add(1);
        Ok(())
    }

    /// Idle and unparked (module docs, *Polling and parking*); whether work showed
    /// up meanwhile.
    fn idle(&mut self, cell: &Rc<QueueCell>, r: &mut Reactor) -> bool {
        match self.policy {
            IdlePolicy::Busy => false,
            IdlePolicy::Interrupt => self.park(cell, r),
            IdlePolicy::Adaptive { poll_us } => {
                let now = Instant::now();
                let since = *self.idle_since.get_or_insert(now);
                let spell = Duration::from_micros(poll_us);
                if now.duration_since(since) >= spell {
                    return self.park(cell, r);
                }
                if self.wake_timer.is_none() {
                    let w = Rc::downgrade(cell);
                    self.wake_timer = Some(r.add_timer(spell, move |_| {
                        if let Some(c) = w.upgrade() {
                            c.0.borrow_mut().wake_timer = None;
                        }
                    }));
                }
                false
            }
        }
    }

    /// Enables notifications, re-checks, arms the kick read. Returns true when it
    /// did not park because there is work (or it could not arm: keep polling).
    fn park(&mut self, cell: &Rc<QueueCell>, r: &mut Reactor) -> bool {
        if self.kick_unusable || self.kick_op.is_some() {
            return false;
        }
        match self.queue.enable_notification(&*self.mem) {
            Ok(false) => {}
            Ok(true) => {
                // Published while we were deciding: serve it first.
                self.notifications_off();
                return true;
            }
            Err(e) => {
                self.break_queue(format!("used ring: {e}"));
                return false;
            }
        }
        let Some(kick) = &self.kick else {
            // Released: the queue has stopped (not reached while running).
            return false;
        };
        let c = cell.clone();
        let op = Op::read(FileRef::Raw(kick.as_raw_fd()), 0, vec![0u8; 8], 8);
        match r.submit(op, move |r, done| on_kick(r, &c, done)) {
            Ok(id) => {
                self.kick_op = Some(id);
                self.parked = true;
                self.cancel_wake_timer(r);
                false
            }
            Err(_) => {
                // The reactor's slab is full: poll on; its completions free it.
                self.notifications_off();
                true
            }
        }
    }

    fn cancel_wake_timer(&mut self, r: &mut Reactor) {
        if let Some(t) = self.wake_timer.take() {
            r.cancel_timer(t);
        }
    }

    fn notifications_off(&mut self) {
        if let Err(e) = self.queue.disable_notification(&*self.mem) {
            self.break_queue(format!("used ring: {e}"));
        }
    }
}

/// The kick read completed: resume polling.
fn on_kick(r: &mut Reactor, cell: &Rc<QueueCell>, done: Completion) {
    {
        let mut vq = cell.0.borrow_mut();
        vq.kick_op = None;
        vq.parked = false;
        vq.idle_since = None;
        match done.result {
            8 => vq.kick_eagain = 0,
            n if n >= 0 => {
                // Not an eventfd (a file at EOF reads 0 at once, forever): parking
                // on it would spin, so poll instead.
                tracing::warn!(
                    queue = vq.index,
                    bytes = n,
                    "kick fd is not an eventfd; polling"
                );
                vq.kick_unusable = true;
            }
            e if e == -libc::ECANCELED => {}
            e if e == -libc::EAGAIN || e == -libc::EINTR => {
                vq.kick_eagain += 1;
                if vq.kick_eagain >= KICK_EAGAIN_MAX {
                    tracing::warn!(
                        queue = vq.index,
                        "kick reads keep failing with EAGAIN; polling"
                    );
                    vq.kick_unusable = true;
                }
            }
            e => {
                tracing::warn!(queue = vq.index, errno = -e, "kick read failed; polling");
                vq.kick_unusable = true;
            }
        }
        if vq.state == State::Running {
            vq.notifications_off();
        }
    }
    finish_if_stopped(r, cell);
}

/// Signals an eventfd (call or error). EAGAIN means its counter is saturated: the
/// other side will see a signal anyway.
fn write_eventfd(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor this queue owns.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            tracing::debug!(error = %e, "eventfd write failed");
        }
    }
}
