//! CompareAndWrite: range locks over every reactor's channel, and the
//! read-compare-write they protect (plan §2.10, SPDK's `bdev_lock_lba_range`).
//!
//! # Protocol
//! 1. **Grant.** A CAW on reactor R asks the volume's home reactor for its range.
//!    The home grants one CAW per volume at a time, in FIFO order (simpler than the
//!    plan's overlap-aware grant; CAWs are rare).
//! 2. **Install round** over every reactor (`for_each_reactor`): the range goes into
//!    the reactor's [`LockCell`] of the volume, from then on a write-type request
//!    overlapping it parks instead of starting; the cell's write generation flips
//!    and the round waits (timer re-check) until every write that started before
//!    the install, counted in the old generation, has completed.
//! 3. **Execute** on R: read the range, compare with the CAW's snapshot of
//!    `compare`, and on a match write its snapshot of `write`; both through the
//!    normal admission, exempt from the CAW's own lock. A mismatch is
//!    `Miscompare { offset }` of the first differing byte.
//! 4. **Unlock round**: the range leaves every cell and each reactor's parked
//!    writes start, in order; then the home grants the next CAW.
//!
//! # Atomicity
//! A write W overlapping the range, on any reactor X, either started on X before
//! the install reached X (the round waited for it: W is wholly before the CAW's
//! read) or after (it parked, and starts after the unlock, after the CAW's write).
//! Started writes never wait for a lock, so a round never waits on a parked write.
//! Parked writes are not counted in a generation.
//!
//! # Ownership
//! A CAW's state (its request, buffers, channel) stays on R in [`LocalLocks`];
//! messages carry its id and the volume (`Arc`, `Send`). The snapshots are copies:
//! caller memory (an SG list) may change under us, and the compare must see the
//! bytes the write stores.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ringblk_reactor::{ForEachNext, Reactor};

use crate::buf::{DataBuf, OwnBuf};
use crate::error::BlockError;
use crate::ops::IoKind;
use crate::volume::Volume;

use super::channel::{BdevLocal, Channel, Req};
use super::request::{BlockOp, Done, IoOutput, ReadData};
use super::Bdev;

/// Largest CompareAndWrite (more is `Invalid`).
pub const CAW_MAX_BYTES: u64 = 64 * 1024;

/// How often an install round re-checks that the old generation's writes are done.
const DRAIN_RECHECK: Duration = Duration::from_micros(20);

/// Test-only: a planted bug for the negative control of the atomicity test.
pub(crate) mod planted {
    #[cfg(test)]
    thread_local! {
        pub static SKIP_CAW_LOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        pub static SKIP_PARK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Writes overlapping an installed lock start anyway instead of parking.
    #[inline]
    pub(crate) fn skip_park() -> bool {
        #[cfg(test)]
        return SKIP_PARK.with(|c| c.get());
        #[cfg(not(test))]
        false
    }

    /// CAWs execute at once, without asking for (or installing) their lock.
    #[inline]
    pub(crate) fn skip_caw_lock() -> bool {
        #[cfg(test)]
        return SKIP_CAW_LOCK.with(|c| c.get());
        #[cfg(not(test))]
        false
    }
}

type Parked = Box<dyn FnOnce(&mut Reactor)>;

/// One volume's range locks on one reactor, shared by its channel there.
#[derive(Default)]
pub(crate) struct LockCell {
    /// `(owner, start, end)`; normally empty.
    locks: RefCell<Vec<(u64, u64, u64)>>,
    gen: Cell<u8>,
    /// Started write-type requests per generation.
    writes: [Cell<u32>; 2],
    /// Writes that met a lock, in arrival order.
    parked: RefCell<VecDeque<Parked>>,
}

impl LockCell {
    /// Whether a write of `[offset, offset + len)` must wait (locks of `owner` excepted).
    #[inline]
    pub(super) fn blocks(&self, offset: u64, len: u64, owner: u64) -> bool {
        let locks = self.locks.borrow();
        if locks.is_empty() || planted::skip_park() {
            return false;
        }
        let end = offset.saturating_add(len);
        locks
            .iter()
            .any(|&(o, s, e)| o != owner && offset < e && s < end)
    }

    pub(super) fn park(&self, f: Parked) {
        self.parked.borrow_mut().push_back(f);
    }

    /// A write-type request starts: counted in the current generation, returned.
    #[inline]
    pub(super) fn enter(&self) -> u8 {
        let g = self.gen.get();
        let c = &self.writes[usize::from(g)];
        c.set(c.get() + 1);
        g
    }

    #[inline]
    pub(super) fn leave(&self, g: u8) {
        let c = &self.writes[usize::from(g)];
        c.set(c.get() - 1);
    }
}

/// A CAW waiting for its grant, on its own reactor.
struct Caw {
    ch: Channel,
    req: Req,
    backup: Option<u64>,
    offset: u64,
    len: u32,
    compare: OwnBuf,
    write: OwnBuf,
    fua: bool,
}

/// A grant request, at the home reactor.
struct Ask {
    vol: Arc<Volume>,
    offset: u64,
    end: u64,
    origin: usize,
    id: u64,
}

/// Per-reactor lock state (in `BdevLocal`).
#[derive(Default)]
pub(crate) struct LocalLocks {
    /// Cells by volume (`Arc::as_ptr`); a cell lives as long as the reactor's table
    /// or a channel holds it.
    cells: RefCell<HashMap<usize, Rc<LockCell>>>,
    caws: RefCell<HashMap<u64, Caw>>,
    next_id: Cell<u64>,
    /// Home-reactor side: per volume, whether a CAW holds the lock, and who waits.
    home: RefCell<HashMap<usize, (bool, VecDeque<Ask>)>>,
}

impl LocalLocks {
    /// The cell of volume `key` here, created on first use. Cells of volumes gone
    /// (no channel holds them, no lock) are dropped on the way.
    pub(super) fn cell(&self, key: usize) -> Rc<LockCell> {
        let mut cells = self.cells.borrow_mut();
        if let Some(c) = cells.get(&key) {
            return c.clone();
        }
        cells.retain(|_, c| Rc::strong_count(c) > 1 || !c.locks.borrow().is_empty());
        cells.entry(key).or_default().clone()
    }
}

fn key_of(vol: &Arc<Volume>) -> usize {
    Arc::as_ptr(vol) as usize
}

fn owner_of(origin: usize, id: u64) -> u64 {
    // Never 0 (0 means "no owner").
    ((origin as u64 + 1) << 48) | (id & ((1 << 48) - 1))
}

/// Starts a CAW (`Channel::start`): snapshots its buffers and asks for the lock.
pub(super) fn begin(r: &mut Reactor, ch: &Channel, bdev: &Bdev, req: Req, op: BlockOp) {
    let BlockOp::CompareAndWrite {
        offset,
        len,
        compare,
        write,
        fua,
    } = op
    else {
        return req.finish(r, Err(BlockError::Invalid));
    };
    let n = len as usize;
    let snapshot = |d: &DataBuf| {
        let mut b = OwnBuf::aligned(n);
        match d {
            DataBuf::Own(o) => b.as_mut_slice().copy_from_slice(&o.as_slice()[..n]),
            DataBuf::Sg(sg) => sg.copy_out(b.as_mut_slice()),
        }
        b
    };
    let (compare, write) = (snapshot(&compare), snapshot(&write));
    let local = ch.local().clone();
    let id = local.locks.next_id.get();
    local.locks.next_id.set(id + 1);
    local.locks.caws.borrow_mut().insert(
        id,
        Caw {
            ch: ch.clone(),
            req,
            backup: bdev.backup_delta(),
            offset,
            len,
            compare,
            write,
            fua,
        },
    );
    let vol = ch.volume().clone();
    if planted::skip_caw_lock() {
        return execute(r, vol, id);
    }
    let home = vol.home_reactor(r.peers().len());
    let ask = Ask {
        vol,
        offset,
        end: offset + u64::from(len),
        origin: r.id(),
        id,
    };
    r.send_to(home, move |r| request(r, ask));
}

/// At home: grants now or queues (one CAW per volume at a time, FIFO).
fn request(r: &mut Reactor, ask: Ask) {
    let local = BdevLocal::get(r);
    let key = key_of(&ask.vol);
    {
        let mut home = local.locks.home.borrow_mut();
        let (busy, queue) = home.entry(key).or_default();
        if *busy {
            queue.push_back(ask);
            return;
        }
        *busy = true;
    }
    grant(r, ask);
}

/// At home: the install round, then the CAW executes on its reactor.
fn grant(r: &mut Reactor, ask: Ask) {
    let key = key_of(&ask.vol);
    let owner = owner_of(ask.origin, ask.id);
    let (offset, end, origin, id) = (ask.offset, ask.end, ask.origin, ask.id);
    let vol = ask.vol;
    let step = Arc::new(move |r: &mut Reactor, next: ForEachNext| {
        let cell = BdevLocal::get(r).locks.cell(key);
        cell.locks.borrow_mut().push((owner, offset, end));
        let old = cell.gen.get();
        cell.gen.set(old ^ 1);
        wait_drained(r, cell, old, next);
    });
    let vol2 = vol.clone();
    r.for_each_reactor(step, move |r| {
        r.send_to(origin, move |r| execute(r, vol2, id));
    });
}

/// Moves the round on once the writes of generation `old` here have completed.
fn wait_drained(r: &mut Reactor, cell: Rc<LockCell>, old: u8, next: ForEachNext) {
    if cell.writes[usize::from(old)].get() == 0 {
        return next.next(r);
    }
    r.add_timer(DRAIN_RECHECK, move |r| wait_drained(r, cell, old, next));
}

/// On the CAW's reactor, its lock installed everywhere: read, compare, write.
fn execute(r: &mut Reactor, vol: Arc<Volume>, id: u64) {
    let local = BdevLocal::get(r);
    let Some(caw) = local.locks.caws.borrow_mut().remove(&id) else {
        return unlock(r, vol, id);
    };
    let owner = owner_of(r.id(), id);
    let Caw {
        ch,
        req,
        backup,
        offset,
        len,
        compare,
        write,
        fua,
    } = caw;
    let ch2 = ch.clone();
    let after_read = move |r: &mut Reactor, res: super::IoResult| {
        let data = match res {
            Ok(IoOutput::Read(ReadData::Data(DataBuf::Own(b)))) => b,
            Ok(IoOutput::Read(ReadData::Zeroes(_))) => OwnBuf::aligned(len as usize),
            Ok(_) => return end(r, vol, id, req, Err(BlockError::Io)),
            Err(e) => return end(r, vol, id, req, Err(e)),
        };
        let n = len as usize;
        let first_diff = data.as_slice()[..n]
            .iter()
            .zip(&compare.as_slice()[..n])
            .position(|(a, b)| a != b);
        if let Some(i) = first_diff {
            let e = BlockError::Miscompare {
                offset: offset + i as u64,
            };
            return end(r, vol, id, req, Err(e));
        }
        let op = BlockOp::Write {
            offset,
            len,
            data: DataBuf::Own(write),
            fua,
        };
        let done = Done::from_fn(move |r, res| end(r, vol, id, req, res));
        let wreq = internal(&ch2, IoKind::Write, owner, done);
        ch2.admit(r, backup, wreq, op, None);
    };
    let op = BlockOp::Read {
        offset,
        len,
        into: DataBuf::Own(OwnBuf::aligned(len as usize)),
    };
    let rreq = internal(&ch, IoKind::Read, owner, Done::from_fn(after_read));
    ch.admit(r, backup, rreq, op, None);
}

/// A CAW's own read or write.
fn internal(ch: &Channel, kind: IoKind, owner: u64, done: Done) -> Req {
    Req {
        ch: ch.clone(),
        done,
        kind,
        label: crate::stats::Label::INTERNAL,
        t0: std::time::Instant::now(),
        gen: None,
        owner,
        internal: true,
    }
}

/// The CAW's result, then the unlock (its `done` may run before the round ends:
/// parked writes start only after it).
fn end(r: &mut Reactor, vol: Arc<Volume>, id: u64, req: Req, res: super::IoResult) {
    let res = res.map(|_| IoOutput::Complete);
    req.finish(r, res);
    unlock(r, vol, id);
}

fn unlock(r: &mut Reactor, vol: Arc<Volume>, id: u64) {
    if planted::skip_caw_lock() {
        return;
    }
    let owner = owner_of(r.id(), id);
    let home = vol.home_reactor(r.peers().len());
    r.send_to(home, move |r| release(r, vol, owner));
}

/// At home: the unlock round, then the next CAW's grant.
fn release(r: &mut Reactor, vol: Arc<Volume>, owner: u64) {
    let key = key_of(&vol);
    let step = Arc::new(move |r: &mut Reactor, next: ForEachNext| {
        let cell = BdevLocal::get(r).locks.cell(key);
        cell.locks.borrow_mut().retain(|&(o, _, _)| o != owner);
        let parked = std::mem::take(&mut *cell.parked.borrow_mut());
        for f in parked {
            f(r);
        }
        next.next(r);
    });
    r.for_each_reactor(step, move |r| {
        let local = BdevLocal::get(r);
        let next = {
            let mut home = local.locks.home.borrow_mut();
            let (busy, queue) = home.entry(key).or_default();
            let next = queue.pop_front();
            *busy = next.is_some();
            if !*busy {
                home.remove(&key);
            }
            next
        };
        if let Some(ask) = next {
            grant(r, ask);
        }
    });
}

#[cfg(test)]
mod tests {
    //! Plan §2.10's test: CAW-increments of one block from two reactors, while plain
    //! writes hit its neighbours, never lose an increment; with the lock planted
    //! away they do.

    use std::time::Instant;

    use ringblk_reactor::{manual_reactors, ReactorConfig};

    use super::*;
    use crate::bdev::{IoResult, View};
    use crate::spec::{BackendKind, VolumeSpec};
    use crate::stats::Label;

    const BLOCK: u32 = 512;
    /// The CAW covers the counter's block. (Plain writes overlapping it, which park,
    /// made manually polled reactors stall in the kernel here: see the report.)
    const CAW_LEN: u32 = BLOCK;
    const PER_REACTOR: u64 = 150;

    #[derive(Clone, PartialEq, Eq, Debug)]
    enum Phase {
        Idle,
        Reading,
        Read(Vec<u8>),
        Swapping,
    }

    type Slot = Rc<RefCell<Option<IoResult>>>;

    fn own(bytes: &[u8]) -> DataBuf {
        let mut b = OwnBuf::aligned(bytes.len());
        b.as_mut_slice().copy_from_slice(bytes);
        DataBuf::Own(b)
    }

    fn block_of(v: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[..8].copy_from_slice(&v.to_le_bytes());
        b
    }

    /// Returns (successful CAWs, final counter, miscompares).
    fn run(plant: bool) -> (u64, u64, u64) {
        planted::SKIP_CAW_LOCK.with(|c| c.set(plant));
        let dir = tempfile::tempdir().expect("tmp");
        let spec = VolumeSpec {
            name: "caw".into(),
            path: None,
            size_bytes: Some(1 << 20),
            block_size: BLOCK,
            backend: BackendKind::Mem,
            read_only: false,
            direct: false,
            chunk_size: 16 << 10,
            grow: false,
        };
        let vol = Arc::new(Volume::open(spec, 2, dir.path()).expect("volume"));
        let mut rs = manual_reactors(ReactorConfig {
            cores: vec![None, None],
            ..Default::default()
        })
        .expect("reactors");
        let bdev = Bdev::open(vol, View::Live, Label::INTERNAL).expect("open");
        let chans: Vec<Channel> = rs.iter_mut().map(|r| bdev.channel(r)).collect();
        let mut phase = [Phase::Idle, Phase::Idle];
        let slots: [Slot; 2] = [Rc::default(), Rc::default()];
        let mut wins = [0u64; 2];
        let mut miscompares = 0;
        let plain: Slot = Rc::default();
        let mut k = 0u64;
        let t0 = Instant::now();
        while wins.iter().sum::<u64>() < 2 * PER_REACTOR {
            assert!(t0.elapsed() < Duration::from_secs(60), "stalled: {phase:?}");
            for i in 0..2 {
                let r = &mut rs[i];
                let done = slots[i].borrow_mut().take();
                let p = std::mem::replace(&mut phase[i], Phase::Idle);
                phase[i] = match (p, done) {
                    (Phase::Idle, _) if wins[i] < PER_REACTOR => {
                        let s = slots[i].clone();
                        let op = BlockOp::Read {
                            offset: 0,
                            len: CAW_LEN,
                            into: own(&[0u8; CAW_LEN as usize]),
                        };
                        let done = Done::from_fn(move |_, res| *s.borrow_mut() = Some(res));
                        chans[i].submit(r, &bdev, op, done);
                        Phase::Reading
                    }
                    (Phase::Reading, Some(res)) => {
                        let seen = match res.expect("read") {
                            IoOutput::Read(ReadData::Data(DataBuf::Own(b))) => {
                                b.as_slice()[..CAW_LEN as usize].to_vec()
                            }
                            IoOutput::Read(ReadData::Zeroes(_)) => vec![0u8; CAW_LEN as usize],
                            other => panic!("{other:?}"),
                        };
                        Phase::Read(seen)
                    }
                    (Phase::Read(seen), _) => {
                        let s = slots[i].clone();
                        let v = u64::from_le_bytes(seen[..8].try_into().expect("8"));
                        let mut next = seen.clone();
                        next[..8].copy_from_slice(&(v + 1).to_le_bytes());
                        let op = BlockOp::CompareAndWrite {
                            offset: 0,
                            len: CAW_LEN,
                            compare: own(&seen),
                            write: own(&next),
                            fua: false,
                        };
                        let done = Done::from_fn(move |_, res| *s.borrow_mut() = Some(res));
                        chans[i].submit(r, &bdev, op, done);
                        Phase::Swapping
                    }
                    (Phase::Swapping, Some(Ok(_))) => {
                        wins[i] += 1;
                        Phase::Idle
                    }
                    (Phase::Swapping, Some(Err(BlockError::Miscompare { offset }))) => {
                        assert!(
                            offset < 8 || offset >= u64::from(BLOCK),
                            "only the counter and the shared block change: {offset}"
                        );
                        miscompares += 1;
                        Phase::Idle
                    }
                    (Phase::Swapping, Some(Err(e))) => panic!("caw: {e}"),
                    (p, None) => p,
                    (p, Some(res)) => panic!("{p:?} got {res:?}"),
                };
                // A plain write to a neighbouring block, one at a time.
                if plain.borrow_mut().take().is_some() || k == 0 {
                    k += 1;
                    let s = plain.clone();
                    let off = u64::from(BLOCK) * (1 + k % 7);
                    let op = BlockOp::Write {
                        offset: off,
                        len: BLOCK,
                        data: own(&block_of(k)),
                        fua: false,
                    };
                    let done = Done::from_fn(move |_, res| {
                        assert!(res.is_ok(), "plain write: {res:?}");
                        *s.borrow_mut() = Some(Ok(IoOutput::Complete));
                    });
                    chans[i].submit(r, &bdev, op, done);
                }
                r.poll_once();
            }
        }
        // Let the last unlock rounds and writes finish, then read the counter.
        let s: Slot = Rc::default();
        let s2 = s.clone();
        let op = BlockOp::Read {
            offset: 0,
            len: BLOCK,
            into: own(&block_of(0)),
        };
        chans[0].submit(
            &mut rs[0],
            &bdev,
            op,
            Done::from_fn(move |_, res| *s2.borrow_mut() = Some(res)),
        );
        while s.borrow().is_none() {
            rs[0].poll_once();
            rs[1].poll_once();
        }
        let last = match s.borrow_mut().take() {
            Some(Ok(IoOutput::Read(ReadData::Data(DataBuf::Own(b))))) => {
                u64::from_le_bytes(b.as_slice()[..8].try_into().expect("8"))
            }
            other => panic!("{other:?}"),
        };
        planted::SKIP_CAW_LOCK.with(|c| c.set(false));
        (wins.iter().sum(), last, miscompares)
    }

    #[test]
    fn compare_and_write_is_atomic() {
        let (wins, last, miscompares) = run(false);
        assert_eq!(
            last, wins,
            "an increment was lost ({miscompares} miscompares)"
        );
        assert!(
            miscompares > 0,
            "the two reactors never raced: the test proves nothing"
        );
    }

    #[test]
    fn planted_missing_lock_loses_increments() {
        let (wins, last, _) = run(true);
        assert!(
            last < wins,
            "without the lock, increments must be lost ({last} of {wins})"
        );
    }

    /// A write overlapping a CAW's range that arrives while the lock is installed
    /// parks and completes only after the CAW (null volume: no I/O, so only the
    /// protocol's order shows). Returns the completion order.
    fn park_order(plant: bool) -> Vec<&'static str> {
        planted::SKIP_PARK.with(|c| c.set(plant));
        let dir = tempfile::tempdir().expect("tmp");
        let spec = VolumeSpec {
            name: "park".into(),
            path: None,
            size_bytes: Some(1 << 20),
            block_size: BLOCK,
            backend: BackendKind::Null,
            read_only: false,
            direct: false,
            chunk_size: 16 << 10,
            grow: false,
        };
        let vol = Arc::new(Volume::open(spec, 2, dir.path()).expect("volume"));
        let mut rs = manual_reactors(ReactorConfig {
            cores: vec![None, None],
            ..Default::default()
        })
        .expect("reactors");
        let bdev = Bdev::open(vol.clone(), View::Live, Label::INTERNAL).expect("open");
        let chans: Vec<Channel> = rs.iter_mut().map(|r| bdev.channel(r)).collect();
        let order: Rc<RefCell<Vec<&'static str>>> = Rc::default();
        let o = order.clone();
        let caw = BlockOp::CompareAndWrite {
            offset: 0,
            len: BLOCK,
            compare: own(&[0u8; BLOCK as usize]),
            write: own(&block_of(1)),
            fua: false,
        };
        chans[0].submit(
            &mut rs[0],
            &bdev,
            caw,
            Done::from_fn(move |_, res| {
                assert!(res.is_ok(), "caw: {res:?}");
                o.borrow_mut().push("caw");
            }),
        );
        // Poll only reactor 1 (the home here, or a peer) until its cell holds the
        // lock; reactor 0 then has not executed the CAW yet.
        let key = key_of(&vol);
        let t0 = Instant::now();
        let locked = |r: &mut Reactor| !BdevLocal::get(r).locks.cell(key).locks.borrow().is_empty();
        while !plant && !locked(&mut rs[1]) {
            rs[1].poll_once();
            rs[0].poll_once();
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "lock never installed"
            );
            if !order.borrow().is_empty() {
                break;
            }
        }
        let o = order.clone();
        let w = BlockOp::Write {
            offset: 256 * 2,
            len: BLOCK,
            data: own(&block_of(9)),
            fua: false,
        };
        chans[1].submit(
            &mut rs[1],
            &bdev,
            w,
            Done::from_fn(move |_, res| {
                assert!(res.is_ok(), "write: {res:?}");
                o.borrow_mut().push("write");
            }),
        );
        while order.borrow().len() < 2 {
            rs[1].poll_once();
            rs[0].poll_once();
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "stalled: {:?}",
                order.borrow()
            );
        }
        planted::SKIP_PARK.with(|c| c.set(false));
        let v = order.borrow().clone();
        v
    }

    #[test]
    fn a_write_meeting_the_lock_waits_for_the_caw() {
        assert_eq!(park_order(false), ["caw", "write"]);
    }

    #[test]
    fn planted_missing_park_lets_the_write_through() {
        assert_eq!(park_order(true), ["write", "caw"]);
    }
}
