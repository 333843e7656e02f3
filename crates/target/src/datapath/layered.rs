//! The layered data path: requests over an image stack with deltas (backups present).
//!
//! Views without deltas take the fast path (`fast.rs`: one I/O per request, no map
//! lookups); everything else comes here. Requests are split at chunk boundaries;
//! each piece is resolved against the pinned stack and issued in parallel; the
//! request completes when every piece has.
//!
//! # Ordering
//! - Data before mapping: a filled chunk is published in the map only after its data
//!   write completed, so a reader never follows a mapping to unwritten data.
//! - Partial first writes (read-merge) of a chunk in a delta wait until no write
//!   admitted before the delta existed that may overlap the chunk is in flight
//!   (`Delta::below_settled`), so the merge reads include every old-epoch write to
//!   it (the one wait of the switchover). Waiting is a reactor timer re-check,
//!   never a spin or a lock.
//! - A merging top delta takes no new fills: writes to chunks it holds go in place
//!   (pinned, so the merge copies them after), writes to chunks it does not hold go to
//!   the layer beneath.
//!
//! # Back-pressure
//! A request becomes up to one operation per chunk (8 192 for a 32 MiB write in 4 KiB
//! chunks), more than a reactor's slab may hold. Every operation of a request, here
//! and on the fast path, goes through [`submit_io`]: one that finds the slab
//! full waits in the reactor's FIFO wait queue and is submitted as completions free
//! slots (SPDK's `spdk_bdev_queue_io_wait`), counted in the volume's `slab_waits`. A
//! valid request never fails for lack of slots. The queue is bounded by the
//! connections, not here: a connection executes at most its front end's bound
//! of requests and of payload bytes (one request may
//! overshoot) before it stops reading its socket, and a request has at most one
//! waiting operation per chunk it spans, plus one per read-merge; so the queue holds
//! at most, per connection, that many chunks' worth of operations.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ringblk_blockmap::{BlockMap, Claim, State};
use ringblk_reactor::{AlignedBuf, FileRef, IoBuf, Op, Reactor};

use crate::error::BlockError;
use crate::image::{Delta, StackPin};
use crate::park::park_chunk;
use crate::stats::counters::bump;

use super::{submit_io, DataVol, VolRef};

/// Completion of a request without data (defined with the committer, which completes
/// FLUSH/FUA requests too).
pub(crate) use crate::persist::Done;
pub(crate) type DoneBuf = Box<dyn FnOnce(&mut Reactor, Result<IoBuf, BlockError>)>;

/// How often a partial fill re-checks whether its delta has drained.
const DRAIN_RECHECK: Duration = Duration::from_micros(20);

/// Test-only fault injection: a planted ordering bug for the negative control of the
/// deterministic switchover test. Compiled out of the server.
pub(crate) mod planted {
    #[cfg(test)]
    thread_local! {
        pub static SKIP_DRAIN_WAIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Partial fills read-merge without waiting for the old epoch to drain.
    #[inline]
    pub(crate) fn skip_drain_wait() -> bool {
        #[cfg(test)]
        return SKIP_DRAIN_WAIT.with(|c| c.get());
        #[cfg(not(test))]
        false
    }
}

/// Where a piece of data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Loc {
    /// Identity-mapped base image: byte offset.
    Base(u64),
    /// Delta `layer` (index in the view), byte offset in its data file.
    Delta(usize, u64),
}

/// Finds `chunk` in `layers` (top down); `Base` when no delta holds it.
pub(super) fn resolve(layers: &[Arc<Delta>], chunk: u64, chunk_bytes: u64) -> Loc {
    for (i, d) in layers.iter().enumerate().rev() {
        if let Ok(e) = d.map.lookup(chunk) {
            // PENDING is read from below: its write is not acknowledged yet.
            if let State::Mapped(p) | State::Merging(p) = e.state() {
                return Loc::Delta(i, p * chunk_bytes);
            }
        }
    }
    Loc::Base(chunk * chunk_bytes)
}

fn file_of<V: DataVol + ?Sized>(vol: &V, layers: &[Arc<Delta>], loc: Loc) -> Option<FileRef> {
    match loc {
        Loc::Base(_) => vol.images().backend().raw_fd().map(FileRef::Raw),
        Loc::Delta(i, _) => Some(FileRef::Raw(layers[i].raw_fd())),
    }
}

/// A request piece: `len` bytes at request offset `at` stored at `loc`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    at: usize,
    len: usize,
    loc: Loc,
}

/// Splits `[offset, offset + len)` into pieces by location, merging neighbours that
/// are contiguous in the same file.
fn plan_read(layers: &[Arc<Delta>], chunk_bytes: u64, offset: u64, len: u64) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let chunk = pos / chunk_bytes;
        let intra = pos % chunk_bytes;
        let n = (chunk_bytes - intra).min(end - pos);
        let loc = match resolve(layers, chunk, chunk_bytes) {
            Loc::Base(b) => Loc::Base(b + intra),
            Loc::Delta(i, b) => Loc::Delta(i, b + intra),
        };
        let at = (pos - offset) as usize;
        let merged = match out.last_mut() {
            Some(last) => {
                let contiguous = match (last.loc, loc) {
                    (Loc::Base(a), Loc::Base(b)) => a + last.len as u64 == b,
                    (Loc::Delta(i, a), Loc::Delta(j, b)) => i == j && a + last.len as u64 == b,
                    _ => false,
                };
                if contiguous {
                    last.len += n as usize;
                }
                contiguous
            }
            None => false,
        };
        if !merged {
            out.push(Piece {
                at,
                len: n as usize,
                loc,
            });
        }
        pos += n;
    }
    out
}

fn loc_offset(loc: Loc) -> u64 {
    match loc {
        Loc::Base(o) | Loc::Delta(_, o) => o,
    }
}

/// Reads `[offset, offset + len)` of the view `layers` (+ base) into a new buffer.
pub(crate) fn read<V: DataVol + ?Sized>(
    r: &mut Reactor,
    vol: &V,
    pin: Rc<StackPin>,
    layers: Vec<Arc<Delta>>,
    offset: u64,
    len: u32,
    done: DoneBuf,
) {
    let out: IoBuf = AlignedBuf::direct(len as usize).into();
    read_into(r, vol, pin, layers, (offset, len), out, done)
}

/// Reads `[offset, offset + len)` of the view `layers` (+ base) into `out` (at
/// least `len` long; zeroed here first, so holes and short reads read as zeros).
pub(crate) fn read_into<V: DataVol + ?Sized>(
    r: &mut Reactor,
    vol: &V,
    pin: Rc<StackPin>,
    layers: Vec<Arc<Delta>>,
    (offset, len): (u64, u32),
    mut out: IoBuf,
    done: DoneBuf,
) {
    out.as_mut_slice()[..len as usize].fill(0);
    let cb = vol.images().chunk_bytes() as u64;
    let pieces = plan_read(&layers, cb, offset, len as u64);
    struct St {
        out: Option<IoBuf>,
        remaining: usize,
        err: Option<BlockError>,
        done: Option<DoneBuf>,
    }
    let st = Rc::new(RefCell::new(St {
        out: Some(out),
        remaining: pieces.len(),
        err: None,
        done: Some(done),
    }));
    for p in pieces {
        let Some(file) = file_of(vol, &layers, p.loc) else {
            // Null base: zeros, already in the zeroed buffer.
            finish_piece(r, &st, None, p, Ok(0));
            continue;
        };
        let st2 = st.clone();
        let pin2 = pin.clone();
        let buf = AlignedBuf::direct(p.len);
        submit_io(
            r,
            vol,
            Op::read(file, loc_offset(p.loc), buf, p.len as u32),
            move |r, c| {
                let _hold = pin2;
                let n = c.bytes();
                finish_piece(r, &st2, c.op.into_buf(), p, n)
            },
        );
    }

    fn finish_piece(
        r: &mut Reactor,
        st: &Rc<RefCell<St>>,
        buf: Option<IoBuf>,
        p: Piece,
        n: Result<u32, i32>,
    ) {
        let fin = {
            let mut s = st.borrow_mut();
            match n {
                Err(e) => s.err = Some(BlockError::from_os_errno(e)),
                Ok(n) => {
                    if let (Some(b), Some(out)) = (buf, s.out.as_mut()) {
                        let n = (n as usize).min(p.len);
                        out.as_mut_slice()[p.at..p.at + n].copy_from_slice(&b.as_slice()[..n]);
                        // A short read (end of file) leaves zeros.
                    }
                }
            }
            s.remaining -= 1;
            if s.remaining == 0 {
                let res = match s.err {
                    Some(e) => Err(e),
                    None => s.out.take().ok_or(BlockError::Io),
                };
                s.done.take().map(|d| (d, res))
            } else {
                None
            }
        };
        if let Some((d, res)) = fin {
            d(r, res);
        }
    }
}

/// Shared state of one multi-piece write.
struct WriteReq {
    vol: VolRef,
    pin: Rc<StackPin>,
    data: IoBuf,
    offset: u64,
    /// Request length (`data` may be a larger pool buffer).
    len: u32,
    remaining: usize,
    err: Option<BlockError>,
    done: Option<Done>,
}

type WriteRef = Rc<RefCell<WriteReq>>;

/// Writes `data[..len]` at `offset` of the live view (`pin`'s stack).
pub(crate) fn write(
    r: &mut Reactor,
    vol: &VolRef,
    pin: Rc<StackPin>,
    offset: u64,
    data: IoBuf,
    len: u32,
    done: Done,
) {
    let cb = vol.images().chunk_bytes() as u64;
    let end = offset + len as u64;
    let first = offset / cb;
    let last = (end - 1) / cb;
    let n = (last - first + 1) as usize;
    let w = Rc::new(RefCell::new(WriteReq {
        vol: vol.clone(),
        pin,
        data,
        offset,
        len,
        remaining: n,
        err: None,
        done: Some(done),
    }));
    for chunk in first..=last {
        let lo = (chunk * cb).max(offset);
        let hi = ((chunk + 1) * cb).min(end);
        let top = w.borrow().pin.stack().deltas.len();
        write_piece(r, &w, chunk, lo, hi, top);
    }
}

fn piece_done(r: &mut Reactor, w: &WriteRef, res: Result<(), BlockError>) {
    let fin = {
        let mut s = w.borrow_mut();
        if let Err(e) = res {
            s.err.get_or_insert(e);
        }
        s.remaining -= 1;
        if s.remaining == 0 {
            let res = match s.err {
                Some(e) => Err(e),
                None => Ok(()),
            };
            s.done.take().map(|d| (d, res))
        } else {
            None
        }
    };
    if let Some((d, res)) = fin {
        d(r, res);
    }
}

/// The bytes of piece `[lo, hi)` for its write. A piece that is the whole request
/// (the common single-chunk write) takes the request's own buffer instead of a copy:
/// each piece is written at most once, and the read-merge path, which reads the
/// request's bytes in place, never takes it (it is never the caller here).
fn piece_bytes(w: &WriteRef, lo: u64, hi: u64) -> IoBuf {
    let mut s = w.borrow_mut();
    let at = (lo - s.offset) as usize;
    let n = (hi - lo) as usize;
    if at == 0 && s.len as usize == n && s.data.len() >= n {
        return std::mem::replace(&mut s.data, IoBuf::from(Vec::new()));
    }
    let mut b = AlignedBuf::direct(n);
    b.as_mut_slice()
        .copy_from_slice(&s.data.as_slice()[at..at + n]);
    b.into()
}

/// Writes bytes `[lo, hi)` (within one chunk) into layer `layer - 1` of the pinned
/// stack, or the base when `layer == 0`.
fn write_piece(r: &mut Reactor, w: &WriteRef, chunk: u64, lo: u64, hi: u64, layer: usize) {
    let (vol, delta) = {
        let s = w.borrow();
        let d = layer
            .checked_sub(1)
            .map(|i| s.pin.stack().deltas[i].clone());
        (s.vol.clone(), d)
    };
    let Some(delta) = delta else {
        // Base, identity-mapped.
        let Some(fd) = vol.images().backend().raw_fd() else {
            return piece_done(r, w, Ok(())); // null base
        };
        let buf = piece_bytes(w, lo, hi);
        return submit_write(r, w, FileRef::Raw(fd), lo, (buf, (hi - lo) as u32), None);
    };
    let cb = vol.images().chunk_bytes() as u64;
    if delta.is_merging() {
        // No new fills in a merging delta: chunks it does not hold go below.
        match delta.map.lookup(chunk).map(|e| e.state()) {
            Ok(State::Unmapped) => return write_piece(r, w, chunk, lo, hi, layer - 1),
            Ok(_) => {}
            Err(_) => return piece_done(r, w, Err(BlockError::Invalid)),
        }
    }
    match BlockMap::claim_shared(&delta.map, chunk) {
        Err(_) => piece_done(r, w, Err(BlockError::Invalid)),
        Ok(Claim::Mapped(pin)) => {
            let off = pin.physical() * cb + (lo - chunk * cb);
            let buf = piece_bytes(w, lo, hi);
            // The pin rides in the callback: a merge cannot copy this chunk under us.
            submit_write(
                r,
                w,
                FileRef::Raw(delta.raw_fd()),
                off,
                (buf, (hi - lo) as u32),
                Some(Box::new(pin)),
            );
        }
        Ok(Claim::Busy(_)) => {
            let w2 = w.clone();
            park_chunk(r, &delta.map, chunk, move |r| {
                write_piece(r, &w2, chunk, lo, hi, layer)
            });
        }
        Ok(Claim::Fill(guard)) => {
            if delta.is_merging() {
                // The chunk finished merging between our lookup and claim: undo, retry.
                guard.abort();
                return write_piece(r, w, chunk, lo, hi, layer);
            }
            let Some(p) = delta.alloc(1) else {
                guard.abort();
                return piece_done(r, w, Err(BlockError::NoSpace));
            };
            let w2 = w.clone();
            let d2 = delta.clone();
            when_zeroed(r, delta, p, cb, move |r| {
                fill(r, &w2, d2, chunk, lo, hi, layer, guard, p)
            });
        }
    }
}

/// Runs `cont` once physical chunk `p` of `delta` may be written (its space was
/// zeroed ahead: `Delta::fill_ready`), starting the next zero-ahead write when due.
/// Waiting is a reactor timer re-check; it happens only when fills outrun zeroing.
fn when_zeroed(
    r: &mut Reactor,
    delta: Arc<Delta>,
    p: u64,
    cb: u64,
    cont: impl FnOnce(&mut Reactor) + 'static,
) {
    if let Some((off, len)) = delta.zero_due(p, cb) {
        let fd = FileRef::Raw(delta.raw_fd());
        let d2 = delta.clone();
        let buf = AlignedBuf::direct(len as usize);
        // Waits for a slab slot, ahead of the fills' own writes (which wait for it):
        // giving the turn back instead starved zeroing whenever those writes kept
        // the slab full, and every fill's re-check then allocated and dropped
        // another zero buffer. At most one per delta is in flight or waiting.
        r.submit_or_wait_first(Op::write(fd, off, buf, len as u32), move |_, c| {
            d2.zero_done(len, matches!(c.bytes(), Ok(n) if n as u64 == len))
        });
    }
    if delta.fill_ready(p, cb) {
        cont(r)
    } else {
        r.add_timer(ZERO_RECHECK, move |r| when_zeroed(r, delta, p, cb, cont));
    }
}

/// How often a fill that outran zeroing re-checks.
const ZERO_RECHECK: Duration = Duration::from_micros(50);

/// Writes a newly allocated chunk `p` of `delta`: the piece itself when it covers the
/// chunk, else read-merged with the chunk's content from below.
#[allow(clippy::too_many_arguments)]
fn fill(
    r: &mut Reactor,
    w: &WriteRef,
    delta: Arc<Delta>,
    chunk: u64,
    lo: u64,
    hi: u64,
    layer: usize,
    guard: Guard,
    p: u64,
) {
    let cb = w.borrow().vol.images().chunk_bytes() as u64;
    let full = lo == chunk * cb && hi == (chunk + 1) * cb;
    if full {
        let buf = piece_bytes(w, lo, hi);
        write_fill(r, w, &delta, chunk, p, (buf, (hi - lo) as u32), guard);
    } else {
        read_merge(r, w, delta, chunk, lo, hi, layer, guard, p);
    }
}

type Guard = ringblk_blockmap::FillGuard<Arc<BlockMap>>;

/// Writes the whole new content of `chunk` to its slot `p` in `delta`, then
/// publishes it (`publish_after`). The fill stays claimed (PENDING) while the write
/// waits for a slab slot: other writers to the chunk park on it meanwhile.
fn write_fill(
    r: &mut Reactor,
    w: &WriteRef,
    delta: &Arc<Delta>,
    chunk: u64,
    p: u64,
    (buf, len): (IoBuf, u32),
    guard: Guard,
) {
    let vol = w.borrow().vol.clone();
    let cb = vol.images().chunk_bytes() as u64;
    let (w2, d2) = (w.clone(), delta.clone());
    let op = Op::write(FileRef::Raw(delta.raw_fd()), p * cb, buf, len);
    submit_io(r, &vol, op, move |r, c| {
        let res = publish_after(c.bytes(), len, guard, &d2, chunk, p);
        piece_done(r, &w2, res)
    });
}

/// After a fill's data write: journal the mapping (before it is visible, so the
/// journal's order is the map's) and publish it; or, when the write failed, give the
/// logical chunk back (abort) and the physical one too (`Delta::give_back`). A short
/// write is the device running out of space: ENOSPC, like the OS error.
fn publish_after(
    n: Result<u32, i32>,
    want: u32,
    guard: Guard,
    delta: &Delta,
    chunk: u64,
    p: u64,
) -> Result<(), BlockError> {
    match n {
        Ok(n) if n == want => {
            delta.journal(ringblk_blockmap::MapRecord::Install {
                logical: chunk,
                physical: p,
            });
            guard.publish(p).map_err(|_| BlockError::Io)
        }
        Ok(_) => {
            guard.abort();
            delta.give_back(p);
            Err(BlockError::NoSpace)
        }
        Err(e) => {
            guard.abort();
            delta.give_back(p);
            Err(BlockError::from_os_errno(e))
        }
    }
}

/// First write of part of a chunk into `delta`: read the whole chunk from below,
/// overlay the new bytes, write it to `p`, then publish.
#[allow(clippy::too_many_arguments)]
fn read_merge(
    r: &mut Reactor,
    w: &WriteRef,
    delta: Arc<Delta>,
    chunk: u64,
    lo: u64,
    hi: u64,
    layer: usize,
    guard: Guard,
    p: u64,
) {
    if !delta.below_settled(chunk) && !planted::skip_drain_wait() {
        // An old-epoch write to this chunk may still be landing below: wait for it
        // (per chunk once every reactor was visited after the switch; image docs).
        let w2 = w.clone();
        r.add_timer(DRAIN_RECHECK, move |r| {
            read_merge(r, &w2, delta, chunk, lo, hi, layer, guard, p)
        });
        return;
    }
    let (vol, below) = {
        let s = w.borrow();
        (s.vol.clone(), s.pin.stack().deltas[..layer - 1].to_vec())
    };
    let cb = vol.images().chunk_bytes() as u64;
    let w2 = w.clone();
    let vol2 = vol.clone();
    let pin = w.borrow().pin.clone();
    read(
        r,
        &vol,
        pin,
        below,
        chunk * cb,
        cb as u32,
        Box::new(move |r, res| {
            let mut buf = match res {
                Ok(b) => b,
                Err(e) => {
                    guard.abort();
                    delta.give_back(p);
                    return piece_done(r, &w2, Err(e));
                }
            };
            {
                let s = w2.borrow();
                let at = (lo - s.offset) as usize;
                let intra = (lo - chunk * cb) as usize;
                let n = (hi - lo) as usize;
                buf.as_mut_slice()[intra..intra + n]
                    .copy_from_slice(&s.data.as_slice()[at..at + n]);
            }
            write_fill(r, &w2, &delta, chunk, p, (buf, cb as u32), guard);
            drop(vol2);
        }),
    );
}

fn submit_write(
    r: &mut Reactor,
    w: &WriteRef,
    file: FileRef,
    off: u64,
    (buf, len): (IoBuf, u32),
    hold: Option<Box<dyn std::any::Any>>,
) {
    let w2 = w.clone();
    let vol = w.borrow().vol.clone();
    submit_io(r, &vol, Op::write(file, off, buf, len), move |r, c| {
        drop(hold); // unpin only after the data is written
        let res = match c.bytes() {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(BlockError::NoSpace),
            Err(e) => Err(BlockError::from_os_errno(e)),
        };
        piece_done(r, &w2, res)
    });
}

/// FLUSH of a layered volume: a group commit (data files, then the journals of the
/// mappings that point at the data; `durable::commit`). Every write completed before
/// is durable when `done` runs.
pub(crate) fn flush(r: &mut Reactor, vol: &VolRef, pin: Rc<StackPin>, done: Done) {
    // The commit covers every delta of the volume, not only the pinned stack's.
    drop(pin);
    if vol.persist().commit_async(r, done) == crate::persist::Queued::Waiting {
        bump(&vol.counters(r.id()).commit_queue_waits, 1);
    }
}

/// WRITE_ZEROES on a stack with deltas: zeros written through the delta path in
/// pieces of at most 1 MiB, one after another.
pub(crate) fn write_zeroes(
    r: &mut Reactor,
    vol: &VolRef,
    pin: Rc<StackPin>,
    offset: u64,
    len: u64,
    done: Done,
) {
    if len == 0 {
        return done(r, Ok(()));
    }
    let n = len.min(1 << 20);
    let buf: IoBuf = AlignedBuf::direct(n as usize).into();
    let vol2 = vol.clone();
    let pin2 = pin.clone();
    write(
        r,
        vol,
        pin,
        offset,
        buf,
        n as u32,
        Box::new(move |r, res| match res {
            Ok(()) => write_zeroes(r, &vol2, pin2, offset + n, len - n, done),
            Err(e) => done(r, Err(e)),
        }),
    );
}
