//! [`Channel`]: a volume's per-reactor submission queue; validation, faults, stats
//! and latency hooks; the ready queue of deferred completions.
//!
//! # Ownership
//! A channel is reactor-local (`Rc`). The reactor-local [`BdevLocal`] table maps a
//! volume to a weak reference to its channel there, consulted only by
//! [`Bdev::channel`], never per request: a front end keeps its `Channel`. A channel
//! holds its volume (`Arc`) while someone holds the channel.
//!
//! # Completion
//! A request's completion runs [`finish`]: the request leaves the channel's depth,
//! errors are counted, the latency recorded, then `done` runs, unless the request is
//! still being started on this stack (`starting`): then `done` goes to the ready
//! queue, which one poller per reactor drains in the same `poll_once`. So `done`
//! never runs inside `submit`, and a chain of immediate completions never recurses.
//!
//! # Back-pressure
//! At most [`CHANNEL_DEPTH`] requests are started at once per channel; more wait in
//! `waiting` (FIFO, never refused) and start as others complete. The queue is bounded
//! by the front ends' own in-flight bounds (NBD: 256 per connection, and it stops
//! reading on [`Pressure::Full`]).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Instant;

use ringblk_reactor::{Op, PollResult, Reactor};

use crate::buf::{dio_mem_align, needs_bounce, DataBuf, OwnBuf, SgList, DIO_MEM_ALIGN_DEFAULT};
use crate::datapath::{self, fast, layered, status, DataVol, Layers, VolRef};
use crate::error::BlockError;
use crate::events::{self, BdevEvent, Subscription};
use crate::extent::Extent;
use crate::fault::Fault;
use crate::image::{Images, StackPin};
use crate::ops::IoKind;
use crate::persist::Persist;
use crate::stats::counters::{bump, OpCounters};
use crate::stats::latency::{self, SharedHistograms};
use crate::stats::Label;
use crate::volume::{Volume, PAYLOAD_MAX_BYTES};

use super::lock;
use super::request::{BlockOp, Done, IoOutput, IoResult, ReadData, StatusKind, STATUS_KINDS_MAX};
use super::Bdev;

/// Test-only: a planted bug for the negative control of the deferral test.
pub(crate) mod planted {
    #[cfg(test)]
    thread_local! {
        pub static INLINE_DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Completions known at submit time run inline (breaking the rule).
    #[inline]
    pub(crate) fn inline_done() -> bool {
        #[cfg(test)]
        return INLINE_DONE.with(|c| c.get());
        #[cfg(not(test))]
        false
    }
}

/// Requests started at once per channel.
pub const CHANNEL_DEPTH: u32 = 1024;
/// `when_room` hooks run once the channel is back under this many started requests
/// (and nothing waits).
const LOW_WATER: u32 = CHANNEL_DEPTH / 4 * 3;
/// Extents per status list at most, whatever the request asks.
const STATUS_EXTENTS_MAX: u32 = 1 << 16;

/// Whether a channel has room (see the module docs, *Back-pressure*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    Room,
    /// The request was queued; stop submitting and call [`Channel::when_room`].
    Full,
}

type Hook = Box<dyn FnOnce(&mut Reactor)>;

enum Ready {
    Done(Done, IoResult),
    Hook(Hook),
}

/// Per-reactor state of the block layer: channels and the ready queue.
#[derive(Default)]
pub(crate) struct BdevLocal {
    ready: RefCell<VecDeque<Ready>>,
    channels: RefCell<HashMap<usize, Weak<ChannelInner>>>,
    /// CompareAndWrite state of this reactor (range locks, CAWs in progress).
    pub(super) locks: lock::LocalLocks,
}

impl BdevLocal {
    pub(super) fn get(r: &mut Reactor) -> Rc<BdevLocal> {
        if let Some(l) = r.local::<BdevLocal>() {
            return l;
        }
        let l = Rc::new(BdevLocal::default());
        r.set_local(l.clone());
        // The poller holds the table as the reactor's locals do: both live as long
        // as the reactor.
        let l2 = l.clone();
        r.add_poller(move |r| l2.drain(r));
        l
    }

    /// Runs the completions queued so far (not those they queue: next round).
    fn drain(&self, r: &mut Reactor) -> PollResult {
        let n = self.ready.borrow().len();
        if n == 0 {
            return PollResult::Idle;
        }
        for _ in 0..n {
            let Some(item) = self.ready.borrow_mut().pop_front() else {
                break;
            };
            match item {
                Ready::Done(done, res) => done.run(r, res),
                Ready::Hook(f) => f(r),
            }
        }
        PollResult::Busy
    }
}

pub(super) fn install(r: &mut Reactor) {
    BdevLocal::get(r);
}

/// The channel of `vol` on this reactor, created on first use.
pub(super) fn channel_of(r: &mut Reactor, vol: &Arc<Volume>) -> Channel {
    let local = BdevLocal::get(r);
    let key = Arc::as_ptr(vol) as usize;
    if let Some(ch) = local.channels.borrow().get(&key).and_then(Weak::upgrade) {
        return Channel(ch);
    }
    let inner = Rc::new(ChannelInner {
        vol: vol.clone(),
        dvol: vol.clone(),
        reactor: r.id(),
        in_flight: Cell::new(0),
        starting: Cell::new(false),
        waiting: RefCell::new(VecDeque::new()),
        room_waiters: RefCell::new(VecDeque::new()),
        hist: latency::histograms_of(r, vol.name()),
        local: local.clone(),
        mem_align: mem_align_of(vol),
        lock: local.locks.cell(key),
    });
    let mut chans = local.channels.borrow_mut();
    // Drop entries of channels nobody holds any more (the table stays as small as
    // the volumes in use here).
    chans.retain(|_, w| w.strong_count() > 0);
    chans.insert(key, Rc::downgrade(&inner));
    Channel(inner)
}

/// The data path sees a volume through this (it ranks below `volume`).
impl DataVol for Volume {
    fn images(&self) -> &Images {
        Volume::images(self)
    }

    fn persist(&self) -> &Persist {
        Volume::persist(self)
    }

    fn counters(&self, reactor: usize) -> &OpCounters {
        Volume::counters(self, reactor)
    }
}

/// The O_DIRECT memory alignment of `vol`'s base (the fallback for no file).
pub(super) fn mem_align_of(vol: &Volume) -> u32 {
    match vol.backend().raw_fd() {
        Some(fd) if vol.backend().is_direct() => dio_mem_align(fd),
        _ => DIO_MEM_ALIGN_DEFAULT,
    }
}

/// A volume's submission queue on one reactor. `!Send`; cheap to clone.
#[derive(Clone)]
pub struct Channel(Rc<ChannelInner>);

struct Waiting {
    bdev: Bdev,
    op: BlockOp,
    done: Done,
    t0: Instant,
}

struct ChannelInner {
    vol: Arc<Volume>,
    /// The same volume as the layered path holds it (no conversion per request).
    dvol: VolRef,
    reactor: usize,
    /// Requests started and not finished.
    in_flight: Cell<u32>,
    /// A request is being started on this stack: completions are deferred.
    starting: Cell<bool>,
    /// Admitted, not started (depth reached), FIFO.
    waiting: RefCell<VecDeque<Waiting>>,
    room_waiters: RefCell<VecDeque<Hook>>,
    hist: SharedHistograms,
    local: Rc<BdevLocal>,
    /// O_DIRECT memory alignment of the base file (`buf::dio_mem_align`).
    mem_align: u32,
    /// The volume's range locks on this reactor (CompareAndWrite, plan §2.10).
    lock: Rc<lock::LockCell>,
}

impl Channel {
    /// Submits `op` for `bdev` (a view of this channel's volume). Never fails a valid
    /// request for lack of room, and never runs `done` before returning (module docs).
    pub fn submit(&self, r: &mut Reactor, bdev: &Bdev, op: BlockOp, done: Done) -> Pressure {
        debug_assert_eq!(r.id(), self.0.reactor, "a channel is used on its reactor");
        debug_assert!(
            Arc::ptr_eq(bdev.volume(), &self.0.vol),
            "bdev of another volume"
        );
        let t0 = Instant::now();
        if let Err(e) = validate(bdev, &op) {
            bump(&self.0.vol.label_counters(r.id(), bdev.label()).errors, 1);
            self.defer(Ready::Done(done, Err(e)));
            return self.pressure();
        }
        let busy = !self.0.waiting.borrow().is_empty() || self.0.in_flight.get() >= CHANNEL_DEPTH;
        if busy {
            self.0.waiting.borrow_mut().push_back(Waiting {
                bdev: bdev.clone(),
                op,
                done,
                t0,
            });
            return Pressure::Full;
        }
        self.start(r, bdev, op, done, t0);
        self.pressure()
    }

    /// Runs `f` once (FIFO) when this channel is back under its low-water mark with
    /// nothing waiting; at once (deferred, never inline) when it is already.
    pub fn when_room(&self, _r: &mut Reactor, f: impl FnOnce(&mut Reactor) + 'static) {
        if self.has_room() {
            self.defer(Ready::Hook(Box::new(f)));
        } else {
            self.0.room_waiters.borrow_mut().push_back(Box::new(f));
        }
    }

    /// Calls `f` on this reactor for every event of `bdev` (its volume deleted, its
    /// backup released: `BdevEvent::Removed`; plan §2.11) until the returned
    /// [`Subscription`] is dropped. `f` must not hold what keeps the subscription
    /// alive (hold a weak reference). Subscribe in the same reactor step as the
    /// lookup that found the volume (`events` # Ordering).
    pub fn subscribe(
        &self,
        r: &mut Reactor,
        bdev: &Bdev,
        f: impl Fn(&mut Reactor, BdevEvent) + 'static,
    ) -> Subscription {
        events::subscribe(r, bdev.volume(), bdev.view(), f)
    }

    /// A layer-owned buffer for `len` bytes (a pool buffer if it fits, else aligned).
    pub fn alloc(&self, r: &mut Reactor, len: u32) -> OwnBuf {
        OwnBuf::alloc(r, len as usize)
    }

    /// Requests started and not finished.
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.get() as usize
    }

    fn has_room(&self) -> bool {
        self.0.in_flight.get() < LOW_WATER && self.0.waiting.borrow().is_empty()
    }

    fn pressure(&self) -> Pressure {
        if self.0.waiting.borrow().is_empty() && self.0.in_flight.get() < CHANNEL_DEPTH {
            Pressure::Room
        } else {
            Pressure::Full
        }
    }

    fn defer(&self, item: Ready) {
        self.0.local.ready.borrow_mut().push_back(item);
    }

    /// Starts one admitted request: counts it, checks faults, pins its stack and
    /// hands it to the data path.
    fn start(&self, r: &mut Reactor, bdev: &Bdev, op: BlockOp, done: Done, t0: Instant) {
        let was = self.0.starting.replace(true);
        self.0.in_flight.set(self.0.in_flight.get() + 1);
        let kind = op.kind();
        let (offset, len) = op.range();
        let vol = &self.0.vol;
        let label = bdev.label();
        count_op(vol.label_counters(r.id(), label), kind, len);
        let req = Req {
            ch: self.clone(),
            done,
            kind,
            label,
            t0,
            gen: None,
            owner: 0,
            internal: false,
        };
        // Injected faults: here, where both paths start, before any I/O (a failed
        // write's data is dropped with the request: never applied).
        let len32 = u32::try_from(len).unwrap_or(u32::MAX);
        let delay = match vol.faults.check_fault(kind, offset, len32) {
            Some(Fault::Fail(e)) => {
                req.finish(r, Err(e));
                self.0.starting.set(was);
                return;
            }
            Some(Fault::Delay(d)) => Some(d),
            None => None,
        };
        if kind == IoKind::CompareAndWrite {
            // (An injected delay does not apply to it.)
            lock::begin(r, self, bdev, req, op);
        } else {
            self.admit(r, bdev.backup_delta(), req, op, delay);
        }
        self.0.starting.set(was);
    }

    /// The second half of `start`: a write-type request overlapping a range lock
    /// parks until the unlock (plan §2.10); any other is counted in the channel's
    /// write generation, pinned and dispatched. Also how a CompareAndWrite runs its
    /// read and write (`req.owner`: its own lock does not hold them).
    pub(super) fn admit(
        &self,
        r: &mut Reactor,
        backup: Option<u64>,
        mut req: Req,
        op: BlockOp,
        delay: Option<std::time::Duration>,
    ) {
        let kind = req.kind;
        let (offset, len) = op.range();
        let vol = &self.0.vol;
        if kind.is_write() {
            let cell = &self.0.lock;
            if cell.blocks(offset, len, req.owner) {
                let ch = self.clone();
                cell.park(Box::new(move |r| {
                    let was = ch.0.starting.replace(true);
                    ch.admit(r, backup, req, op, delay);
                    ch.0.starting.set(was);
                }));
                return;
            }
            req.gen = Some(cell.enter());
        }
        // Write-type requests register their chunks: a later epoch's partial first
        // writes wait only for the ones that overlap theirs (image module docs).
        let pin = if kind.is_write() {
            vol.pin_write(r.id(), offset, len)
        } else {
            vol.pin(r.id())
        };
        let needs_list = matches!(kind, IoKind::Read | IoKind::BlockStatus);
        let layers = match datapath::view_layers(&pin, backup, needs_list) {
            Ok(l) => l,
            Err(e) => {
                drop(pin);
                return req.finish(r, Err(e));
            }
        };
        match delay {
            // An injected delay holds the request admitted (pinned) before its I/O.
            Some(d) => {
                r.add_timer(d, move |r| {
                    let ch = req.ch.clone();
                    let was = ch.0.starting.replace(true);
                    dispatch(r, req, op, pin, layers);
                    ch.0.starting.set(was);
                });
            }
            None => dispatch(r, req, op, pin, layers),
        }
    }

    pub(super) fn volume(&self) -> &Arc<Volume> {
        &self.0.vol
    }

    pub(super) fn local(&self) -> &Rc<BdevLocal> {
        &self.0.local
    }

    /// Starts waiting requests while there is depth, then wakes `when_room` hooks.
    fn pump(&self, r: &mut Reactor) {
        while self.0.in_flight.get() < CHANNEL_DEPTH {
            let Some(w) = self.0.waiting.borrow_mut().pop_front() else {
                break;
            };
            self.start(r, &w.bdev, w.op, w.done, w.t0);
        }
        while self.has_room() {
            let Some(f) = self.0.room_waiters.borrow_mut().pop_front() else {
                break;
            };
            f(r);
        }
    }
}

/// A started request's completion state (no allocation: it rides in the callback).
pub(super) struct Req {
    pub(super) ch: Channel,
    pub(super) done: Done,
    pub(super) kind: IoKind,
    /// Who submitted it: the counters it counts in.
    pub(super) label: Label,
    pub(super) t0: Instant,
    /// The write generation it was counted in (write-type requests, `lock`).
    pub(super) gen: Option<u8>,
    /// The CompareAndWrite whose range lock does not hold this request back (0: none).
    pub(super) owner: u64,
    /// A CompareAndWrite's own read or write: no accounting, `done` at once.
    pub(super) internal: bool,
}

impl Req {
    /// Completion hooks (module docs): depth, errors, latency, then `done`.
    pub(super) fn finish(self, r: &mut Reactor, res: IoResult) {
        let ch = &self.ch.0;
        if let Some(g) = self.gen {
            ch.lock.leave(g);
        }
        if self.internal {
            return self.done.run(r, res);
        }
        ch.in_flight.set(ch.in_flight.get() - 1);
        if res.is_err() {
            bump(&ch.vol.label_counters(r.id(), self.label).errors, 1);
        }
        let ns = u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        ch.hist.borrow_mut().record_kind(self.kind, ns);
        if ch.starting.get() && !planted::inline_done() {
            // The ready-queue poller completes it later in this iteration, and its
            // reply SQEs should share one enter with what the caller queues now.
            r.hold_submit();
            let mut ready = ch.local.ready.borrow_mut();
            ready.push_back(Ready::Done(self.done, res));
            if !ch.waiting.borrow().is_empty() || !ch.room_waiters.borrow().is_empty() {
                // Depth freed while starting (a delayed request's timer, say): start
                // the waiting ones from the ready queue, not from this stack.
                let chan = self.ch.clone();
                ready.push_back(Ready::Hook(Box::new(move |r| chan.pump(r))));
            }
            return;
        }
        self.done.run(r, res);
        if !ch.waiting.borrow().is_empty() || !ch.room_waiters.borrow().is_empty() {
            let chan = self.ch.clone();
            chan.pump(r);
        }
    }

    fn finish_unit(self, r: &mut Reactor, res: Result<(), BlockError>) {
        self.finish(r, res.map(|()| IoOutput::Complete))
    }
}

fn count_op(c: &OpCounters, kind: IoKind, len: u64) {
    match kind {
        IoKind::Read => {
            bump(&c.read_ops, 1);
            bump(&c.read_bytes, len)
        }
        IoKind::Write => {
            bump(&c.write_ops, 1);
            bump(&c.write_bytes, len)
        }
        IoKind::Flush => bump(&c.flush_ops, 1),
        IoKind::Unmap => bump(&c.trim_ops, 1),
        IoKind::WriteZeroes => bump(&c.zero_ops, 1),
        IoKind::Readahead => bump(&c.cache_ops, 1),
        IoKind::BlockStatus => bump(&c.block_status_ops, 1),
        IoKind::CompareAndWrite => {}
    }
}

/// All validation of a request (bdev module docs, *Contracts*).
fn validate(bdev: &Bdev, op: &BlockOp) -> Result<(), BlockError> {
    let kind = op.kind();
    if kind.is_write() && bdev.is_read_only() {
        return Err(BlockError::ReadOnly);
    }
    let vol = bdev.volume();
    let (offset, len) = op.range();
    // Too large for any volume comes before where it lies.
    if matches!(op, BlockOp::Read { .. } | BlockOp::Write { .. })
        && len > u64::from(PAYLOAD_MAX_BYTES)
    {
        return Err(BlockError::TooLarge);
    }
    let end = offset.checked_add(len).ok_or(BlockError::OutOfRange)?;
    if end > vol.size_bytes() {
        return Err(BlockError::OutOfRange);
    }
    let bs = u64::from(vol.block_size().max(1));
    let aligned = offset % bs == 0 && len % bs == 0;
    let short = |b: &DataBuf| b.len() < len;
    let bad = match op {
        BlockOp::Read { into: b, .. } | BlockOp::Write { data: b, .. } => short(b) || !aligned,
        BlockOp::CompareAndWrite { compare, write, .. } => {
            len > lock::CAW_MAX_BYTES || short(compare) || short(write) || !aligned
        }
        BlockOp::Unmap { .. } | BlockOp::WriteZeroes { .. } => !aligned,
        BlockOp::BlockStatus { kinds, .. } => kinds.is_empty() || kinds.len() > STATUS_KINDS_MAX,
        BlockOp::Flush | BlockOp::Readahead { .. } => false,
    };
    if bad {
        return Err(BlockError::Invalid);
    }
    Ok(())
}

/// THE dispatch of a started request to the fast or the layered path (plan §2.12).
fn dispatch(r: &mut Reactor, req: Req, op: BlockOp, pin: StackPin, layers: Layers) {
    // One Rc increment, not two atomic Arc ones: `req` moves into the callbacks.
    let ch = req.ch.clone();
    let (vol, dvol) = (&ch.0.vol, &ch.0.dvol);
    if let Layers::Layered(_) = layers {
        bump(&vol.label_counters(r.id(), req.label).layered_ops, 1);
    }
    match op {
        // Nothing to do (a layered split of nothing would never complete).
        BlockOp::Read { len: 0, into, .. } => {
            drop(pin);
            req.finish(r, Ok(IoOutput::Read(ReadData::Data(into))))
        }
        BlockOp::Write { len: 0, .. }
        | BlockOp::Unmap { len: 0, .. }
        | BlockOp::WriteZeroes { len: 0, .. } => {
            drop(pin);
            req.finish(r, Ok(IoOutput::Complete))
        }
        BlockOp::Read { offset, len, into } => {
            read(r, req, (vol, dvol), pin, layers, (offset, len), into)
        }
        BlockOp::Write {
            offset,
            len,
            data,
            fua,
        } => {
            let direct = match &data {
                DataBuf::Sg(sg) => sg_direct(&req.ch.0, &layers, sg),
                DataBuf::Own(_) => false,
            };
            if let (true, DataBuf::Sg(sg)) = (direct, &data) {
                let bufs = sg.foreign(u64::from(len));
                let make = move |f| Op::writev(f, offset, bufs);
                return fast::write(r, vol, pin, len, make, fua, move |r, res| {
                    drop(data); // the caller's memory is theirs again with `done`
                    req.finish_unit(r, res)
                });
            }
            if let DataBuf::Sg(_) = data {
                bump(&vol.label_counters(r.id(), req.label).sg_bounces, 1);
            }
            let (buf, _sg) = own_data(r, data, len);
            match layers {
                Layers::Fast => {
                    let make = move |f| Op::write(f, offset, buf, len);
                    fast::write(r, vol, pin, len, make, fua, move |r, res| {
                        req.finish_unit(r, res)
                    })
                }
                Layers::Layered(_) => {
                    let pin = Rc::new(pin);
                    let then = layered_fua(dvol.clone(), pin.clone(), fua, req);
                    layered::write(r, dvol, pin, offset, buf, len, then)
                }
            }
        }
        BlockOp::Flush => match layers {
            Layers::Fast => fast::flush(r, vol, pin, move |r, res| req.finish_unit(r, res)),
            Layers::Layered(_) => layered::flush(
                r,
                dvol,
                Rc::new(pin),
                Box::new(move |r, res| req.finish_unit(r, res)),
            ),
        },
        BlockOp::Unmap { offset, len, fua } => match layers {
            Layers::Fast => fast::unmap(r, vol, pin, (offset, len), fua, move |r, res| {
                req.finish_unit(r, res)
            }),
            // Advisory: with deltas the base is shared with backups, so ignore it.
            Layers::Layered(_) => layered_fua(dvol.clone(), Rc::new(pin), fua, req)(r, Ok(())),
        },
        BlockOp::WriteZeroes {
            offset,
            len,
            may_unmap,
            fast_only,
            fua,
        } => match layers {
            Layers::Fast => fast::write_zeroes(
                r,
                vol,
                pin,
                (offset, len),
                may_unmap,
                fast_only,
                fua,
                move |r, res| req.finish_unit(r, res),
            ),
            // The layered path always refuses a fast-only zeroing (it writes data).
            Layers::Layered(_) if fast_only => {
                drop(pin);
                req.finish(r, Err(BlockError::NotSupported))
            }
            Layers::Layered(_) => {
                let pin = Rc::new(pin);
                let then = layered_fua(dvol.clone(), pin.clone(), fua, req);
                layered::write_zeroes(r, dvol, pin, offset, len, then)
            }
        },
        BlockOp::BlockStatus {
            offset,
            len,
            kinds,
            max_extents,
        } => {
            let res = block_status(vol, &pin, &layers, (offset, len), &kinds, max_extents);
            drop(pin);
            req.finish(r, res.map(IoOutput::Status))
        }
        BlockOp::Readahead { .. } => {
            drop(pin);
            req.finish(r, Ok(IoOutput::Complete))
        }
        BlockOp::CompareAndWrite { .. } => {
            // Runs through `lock`, never dispatched as one request.
            drop(pin);
            req.finish(r, Err(BlockError::Invalid))
        }
    }
}

/// A layered request's completion, with FUA: flush the stack before `req` finishes.
fn layered_fua(vol: VolRef, pin: Rc<StackPin>, fua: bool, req: Req) -> layered::Done {
    Box::new(move |r, res| {
        if fua && res.is_ok() {
            layered::flush(
                r,
                &vol,
                pin,
                Box::new(move |r, res| req.finish_unit(r, res)),
            );
        } else {
            drop(pin);
            req.finish_unit(r, res)
        }
    })
}

/// Whether an SG request goes straight into caller memory: on the fast path, over
/// a file, with segments O_DIRECT can take (`buf::needs_bounce`, with the file's
/// memory alignment probed when the channel was made).
fn sg_direct(ch: &ChannelInner, layers: &Layers, sg: &SgList) -> bool {
    let b = ch.vol.backend();
    matches!(layers, Layers::Fast)
        && b.raw_fd().is_some()
        && !needs_bounce(sg, b.is_direct(), ch.mem_align)
}

/// The request's data as one reactor buffer: an `OwnBuf` as it is, an SG list
/// copied into an aligned bounce buffer (until I/O straight into caller memory
/// lands, plan §2.4).
fn own_data(r: &Reactor, data: DataBuf, len: u32) -> (ringblk_reactor::IoBuf, Option<SgList>) {
    match data {
        DataBuf::Own(b) => (b.into_io(), None),
        DataBuf::Sg(sg) => {
            let mut b = OwnBuf::alloc(r, len as usize);
            sg.copy_out(&mut b.as_mut_slice()[..len as usize]);
            (b.into_io(), Some(sg))
        }
    }
}

fn read(
    r: &mut Reactor,
    req: Req,
    (vol, dvol): (&Arc<Volume>, &VolRef),
    pin: StackPin,
    layers: Layers,
    (offset, len): (u64, u32),
    into: DataBuf,
) {
    if let DataBuf::Sg(sg) = &into {
        if sg_direct(&req.ch.0, &layers, sg) {
            let bufs = sg.foreign(u64::from(len));
            return fast::read_sg(r, vol, pin, offset, bufs, move |r, res| {
                let res = res.map(|n| {
                    if let DataBuf::Sg(sg) = &into {
                        // End of file (or a null base): the rest reads as zeros.
                        sg.fill_zero_range(u64::from(n), u64::from(len));
                    }
                    IoOutput::Read(ReadData::Data(into))
                });
                req.finish(r, res)
            });
        }
        bump(&vol.label_counters(r.id(), req.label).sg_bounces, 1);
    }
    let (buf, sg) = match into {
        DataBuf::Own(b) => (b.into_io(), None),
        DataBuf::Sg(sg) => (OwnBuf::alloc(r, len as usize).into_io(), Some(sg)),
    };
    let out = move |buf: ringblk_reactor::IoBuf, zeros: bool| -> IoOutput {
        let data = match sg {
            None if zeros => ReadData::Zeroes(OwnBuf::from_io(buf)),
            None => ReadData::Data(DataBuf::Own(OwnBuf::from_io(buf))),
            Some(sg) => {
                if zeros {
                    sg.fill_zero(u64::from(len));
                } else {
                    sg.copy_in(&buf.as_slice()[..len as usize]);
                }
                ReadData::Data(DataBuf::Sg(sg))
            }
        };
        IoOutput::Read(data)
    };
    match layers {
        Layers::Fast => fast::read(r, vol, pin, (offset, len), buf, move |r, res| {
            req.finish(r, res.map(|f| out(f.buf, f.zeros)))
        }),
        Layers::Layered(list) => layered::read_into(
            r,
            dvol,
            Rc::new(pin),
            list,
            (offset, len),
            buf,
            Box::new(move |r, res| req.finish(r, res.map(|b| out(b, false)))),
        ),
    }
}

/// Block status: every kind from the one pinned stack (plan §2.9).
fn block_status(
    vol: &Volume,
    pin: &StackPin,
    layers: &Layers,
    (offset, len): (u64, u64),
    kinds: &[StatusKind],
    max_extents: u32,
) -> Result<Vec<Vec<Extent>>, BlockError> {
    // Lists cover a prefix: a range longer than a u32 is answered for its start.
    let bs = u64::from(vol.block_size().max(1));
    let len = len.min(u64::from(u32::MAX) / bs * bs) as u32;
    let max = max_extents.clamp(1, STATUS_EXTENTS_MAX) as usize;
    let view: &[Arc<crate::image::Delta>] = match layers {
        Layers::Fast => &[],
        Layers::Layered(l) => l,
    };
    kinds
        .iter()
        .map(|k| match *k {
            StatusKind::Allocation => Ok(status::allocation(vol.images(), view, offset, len, max)),
            StatusKind::ChangedSince(id) => status::changed_since(
                vol.images(),
                &pin.stack().deltas,
                view.len(),
                id.0,
                (offset, len),
                max,
            )
            .ok_or(BlockError::Invalid),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    //! The channel's own contracts: `done` never inside `submit`, validation in one
    //! place, back-pressure that queues instead of failing.

    use std::time::Duration;

    use ringblk_reactor::{manual_reactors, ReactorConfig};

    use super::*;
    use crate::bdev::View;
    use crate::spec::{BackendKind, VolumeSpec};

    const SIZE: u64 = 4 << 20;

    fn volume(dir: &std::path::Path, backend: BackendKind, read_only: bool) -> Arc<Volume> {
        let spec = VolumeSpec {
            name: "ch".into(),
            path: None,
            size_bytes: Some(SIZE),
            block_size: 512,
            backend,
            read_only,
            direct: false,
            chunk_size: 16 << 10,
            grow: false,
        };
        Arc::new(Volume::open(spec, 1, dir).expect("volume"))
    }

    fn reactor() -> Reactor {
        manual_reactors(ReactorConfig {
            cores: vec![None],
            ..Default::default()
        })
        .expect("reactor")
        .pop()
        .expect("one")
    }

    type Results = Rc<RefCell<Vec<IoResult>>>;

    fn collect(out: &Results) -> Done {
        let out = out.clone();
        Done::from_fn(move |_, res| out.borrow_mut().push(res))
    }

    fn poll_until(r: &mut Reactor, mut f: impl FnMut() -> bool) {
        let t0 = Instant::now();
        while !f() {
            r.poll_once();
            assert!(t0.elapsed() < Duration::from_secs(30), "stalled");
        }
    }

    fn read_op(r: &Reactor, offset: u64, len: u32) -> BlockOp {
        BlockOp::Read {
            offset,
            len,
            into: DataBuf::Own(OwnBuf::alloc(r, len as usize)),
        }
    }

    /// Immediate results (null backend, validation errors) wait for the ready
    /// queue: a front end that submits from its completion handler never recurses.
    /// Negative control: with the deferral planted away, `done` runs inside submit.
    fn done_inside_submit(plant: bool) -> bool {
        planted::INLINE_DONE.with(|c| c.set(plant));
        let dir = tempfile::tempdir().expect("tmp");
        let vol = volume(dir.path(), BackendKind::Null, false);
        let mut r = reactor();
        let bdev = Bdev::open(vol, View::Live, Label::INTERNAL).expect("open");
        let ch = bdev.channel(&mut r);
        let out: Results = Rc::default();
        let (a, b) = (read_op(&r, 0, 4096), read_op(&r, SIZE, 4096));
        ch.submit(&mut r, &bdev, a, collect(&out));
        ch.submit(&mut r, &bdev, b, collect(&out));
        let inline = !out.borrow().is_empty();
        poll_until(&mut r, || out.borrow().len() == 2);
        planted::INLINE_DONE.with(|c| c.set(false));
        let res = out.borrow();
        assert!(matches!(res[0], Ok(IoOutput::Read(ReadData::Zeroes(_)))));
        assert!(matches!(res[1], Err(BlockError::OutOfRange)));
        inline
    }

    #[test]
    fn done_never_runs_inside_submit() {
        assert!(!done_inside_submit(false));
    }

    #[test]
    fn planted_inline_done_is_caught() {
        assert!(done_inside_submit(true), "the negative control must see it");
    }

    #[test]
    fn validation_refuses_bad_requests_in_one_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let ro = volume(dir.path(), BackendKind::Mem, true);
        let mut r = reactor();
        let bdev = Bdev::open(ro, View::Live, Label::INTERNAL).expect("open");
        let ch = bdev.channel(&mut r);
        let out: Results = Rc::default();
        // Exact lengths (a pool buffer would be larger than asked).
        let own = |_: &Reactor, n: usize| DataBuf::Own(OwnBuf::aligned(n));
        let cases = vec![
            (
                BlockOp::Write {
                    offset: 0,
                    len: 512,
                    data: own(&r, 512),
                    fua: false,
                },
                BlockError::ReadOnly,
            ),
            (read_op(&r, u64::MAX - 511, 512), BlockError::OutOfRange),
            (read_op(&r, SIZE - 512, 1024), BlockError::OutOfRange),
            (read_op(&r, 1, 512), BlockError::Invalid),
            (
                BlockOp::Read {
                    offset: 0,
                    len: 4096,
                    into: own(&r, 512),
                },
                BlockError::Invalid,
            ),
            (
                BlockOp::Read {
                    offset: 0,
                    len: PAYLOAD_MAX_BYTES + 512,
                    into: own(&r, 512),
                },
                BlockError::TooLarge,
            ),
            (
                BlockOp::BlockStatus {
                    offset: 0,
                    len: 512,
                    kinds: Vec::new(),
                    max_extents: 1,
                },
                BlockError::Invalid,
            ),
        ];
        let want: Vec<BlockError> = cases.iter().map(|(_, e)| *e).collect();
        for (op, _) in cases {
            ch.submit(&mut r, &bdev, op, collect(&out));
        }
        poll_until(&mut r, || out.borrow().len() == want.len());
        let got: Vec<BlockError> = out
            .borrow()
            .iter()
            .map(|res| *res.as_ref().expect_err("refused"))
            .collect();
        assert_eq!(got, want);
        assert_eq!(ch.in_flight(), 0, "refused requests never start");
    }

    /// More requests than the channel's depth, without polling: the extra ones are
    /// queued (`Full`), none fails, `when_room` fires once there is room again.
    #[test]
    fn back_pressure_queues_and_never_fails() {
        let dir = tempfile::tempdir().expect("tmp");
        let vol = volume(dir.path(), BackendKind::Mem, false);
        let mut r = reactor();
        let bdev = Bdev::open(vol, View::Live, Label::INTERNAL).expect("open");
        let ch = bdev.channel(&mut r);
        let out: Results = Rc::default();
        let n = CHANNEL_DEPTH as usize + 100;
        let mut full = 0;
        for i in 0..n {
            let mut b = OwnBuf::alloc(&r, 4096);
            b.as_mut_slice()[..4096].fill(i as u8);
            let op = BlockOp::Write {
                offset: (i as u64 * 4096) % SIZE,
                len: 4096,
                data: DataBuf::Own(b),
                fua: false,
            };
            if ch.submit(&mut r, &bdev, op, collect(&out)) == Pressure::Full {
                full += 1;
            }
        }
        assert!(full >= 100, "the channel reported Full ({full})");
        assert!(ch.in_flight() <= CHANNEL_DEPTH as usize);
        let room = Rc::new(Cell::new(false));
        let room2 = room.clone();
        ch.when_room(&mut r, move |_| room2.set(true));
        assert!(!room.get(), "not while full");
        poll_until(&mut r, || out.borrow().len() == n && room.get());
        assert!(out.borrow().iter().all(|res| res.is_ok()));
    }

    /// Requests count under the label of the front end that submitted them, and the
    /// volume's totals are the sum of the labels (plan §2.8: `by_label`).
    #[test]
    fn requests_count_under_their_label() {
        let dir = tempfile::tempdir().expect("tmp");
        let vol = volume(dir.path(), BackendKind::Null, false);
        let mut r = reactor();
        // "s0": a name `stats`' own test registers too (the table is process-wide
        // and that test fills it), so this finds it whichever test runs first.
        let label = Label::register("s0").expect("label");
        let mine = Bdev::open(vol.clone(), View::Live, label).expect("open");
        let internal = Bdev::open(vol.clone(), View::Live, Label::INTERNAL).expect("open");
        let out: Results = Rc::default();
        for (bdev, n) in [(&mine, 3), (&internal, 2)] {
            let ch = bdev.channel(&mut r);
            for _ in 0..n {
                let op = read_op(&r, 0, 4096);
                ch.submit(&mut r, bdev, op, collect(&out));
            }
        }
        let op = read_op(&r, SIZE, 4096); // refused: an error of `mine`
        mine.channel(&mut r)
            .submit(&mut r, &mine, op, collect(&out));
        poll_until(&mut r, || out.borrow().len() == 6);
        let st = vol.stats();
        assert_eq!(
            (st.totals.read_ops, st.totals.read_bytes, st.totals.errors),
            (5, 5 * 4096, 1)
        );
        let by = |name: &str| st.by_label.get(name).cloned().unwrap_or_default();
        assert_eq!((by("s0").read_ops, by("s0").errors), (3, 1));
        assert_eq!((by("internal").read_ops, by("internal").errors), (2, 0));
    }

    /// Segments of `sizes` bytes cut out of `mem`, each after a 1-byte gap (so that
    /// segments are misaligned and guard bytes sit between them).
    fn sg_over(mem: &mut [u8], sizes: &[u32]) -> SgList {
        let mut segs = Vec::new();
        let mut at = 1;
        for &n in sizes {
            let p = std::ptr::NonNull::new(mem[at..].as_mut_ptr()).expect("non-null");
            segs.push((p, n));
            at += n as usize + 1;
        }
        assert!(at <= mem.len());
        // SAFETY: the segments lie inside `mem`, do not overlap, and `mem` outlives
        // the request (the test waits for `done` before touching it).
        unsafe { SgList::new(&segs) }.expect("short list")
    }

    fn sg_roundtrip(vol: Arc<Volume>, want_bounces: bool) {
        let mut r = reactor();
        let bdev = Bdev::open(vol.clone(), View::Live, Label::INTERNAL).expect("open");
        let ch = bdev.channel(&mut r);
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut src = vec![0xEEu8; 8192 + 16];
        let sg = sg_over(&mut src, &[1000, 3096, 4096]);
        sg.copy_in(&data);
        let out: Results = Rc::default();
        let op = BlockOp::Write {
            offset: 4096,
            len: 8192,
            data: DataBuf::Sg(sg),
            fua: true,
        };
        ch.submit(&mut r, &bdev, op, collect(&out));
        poll_until(&mut r, || out.borrow().len() == 1);
        assert!(out.borrow()[0].is_ok(), "{:?}", out.borrow()[0]);
        // Read back into a different cut of caller memory.
        let mut dst = vec![0x55u8; 8192 + 16];
        let sg = sg_over(&mut dst, &[512, 7680]);
        let op = BlockOp::Read {
            offset: 4096,
            len: 8192,
            into: DataBuf::Sg(sg),
        };
        ch.submit(&mut r, &bdev, op, collect(&out));
        poll_until(&mut r, || out.borrow().len() == 2);
        let back = match out.borrow_mut().pop() {
            Some(Ok(IoOutput::Read(ReadData::Data(DataBuf::Sg(sg))))) => {
                let mut b = vec![0u8; 8192];
                sg.copy_out(&mut b);
                b
            }
            other => panic!("read: {other:?}"),
        };
        assert!(back == data, "the data read back differs");
        // Guard bytes around the segments are untouched.
        assert_eq!((dst[0], dst[513], dst[8194]), (0x55, 0x55, 0x55));
        // And an ordinary read sees the same bytes.
        let op = read_op(&r, 4096, 8192);
        ch.submit(&mut r, &bdev, op, collect(&out));
        poll_until(&mut r, || out.borrow().len() == 2);
        match out.borrow_mut().pop() {
            Some(Ok(IoOutput::Read(ReadData::Data(DataBuf::Own(b))))) => {
                assert!(b.as_slice()[..8192] == data[..], "own read differs")
            }
            other => panic!("read: {other:?}"),
        }
        let bounces = vol.stats().totals.sg_bounces;
        assert_eq!(bounces > 0, want_bounces, "sg_bounces {bounces}");
    }

    /// SG lists go straight into caller memory when the file takes them (buffered
    /// file: any alignment), and bounce when O_DIRECT cannot (misaligned segments);
    /// the data is the same either way.
    #[test]
    fn sg_lists_direct_and_bounced() {
        let dir = tempfile::tempdir().expect("tmp");
        sg_roundtrip(volume(dir.path(), BackendKind::Mem, false), false);
        let path = dir.path().join("direct.img");
        let spec = VolumeSpec {
            name: "dio".into(),
            path: Some(path),
            size_bytes: Some(SIZE),
            block_size: 512,
            backend: BackendKind::File,
            read_only: false,
            direct: true,
            chunk_size: 16 << 10,
            grow: false,
        };
        let vol = Arc::new(Volume::open(spec, 1, dir.path()).expect("volume"));
        // A filesystem without O_DIRECT falls back to buffered I/O: no bounce then.
        let direct = vol.backend().is_direct();
        sg_roundtrip(vol, direct);
    }
}
