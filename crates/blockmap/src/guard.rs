//! Guards that own a chunk's transient state and always end it with a wake-up.
//!
//! `FillGuard` owns `PENDING`, `MergeGuard` owns `MERGING`, `WritePin` owns one pin.
//! Each ends its state with one RMW on the entry word and, if that RMW saw
//! `WAITERS`, wakes the chunk's waiter shard. `Drop` of an unfinished guard aborts
//! (fill -> `UNMAPPED`, merge -> `MAPPED`, pin -> released), so forgetting the wake-up
//! is impossible short of `mem::forget` — which leaves the chunk busy forever (a
//! leak, not unsoundness).
//!
//! Guards are generic over the map handle: `&BlockMap` for scoped use, or
//! `Arc<BlockMap>` for a request that keeps its guard in a reactor's slab.

use std::fmt;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::ptr::NonNull;
use std::task::Waker;

use crate::entry::{
    has_data, mapped_word, physical, pins, state_bits, with_state, MAPPED, MAX_PINS, MERGING,
    PENDING, PHYSICAL_MAX, PIN_ONE, UNMAPPED, WAITERS,
};
use crate::error::Error;
use crate::map::{BlockMap, Park};
use crate::sync::{AtomicU64, Ordering};

/// The state a guard owns: the map handle, the chunk and its entry word.
struct Held<M: Deref<Target = BlockMap>> {
    map: M,
    chunk: u64,
    /// Points into a leaf of `map`'s tree.
    slot: NonNull<AtomicU64>,
}

// SAFETY: `slot` is a shared reference to an atomic inside the map `M` refers to
// (see `Held::slot`); sending or sharing a `Held` is sending or sharing `M` plus an
// `&AtomicU64`, which is `Send + Sync`.
unsafe impl<M: Deref<Target = BlockMap> + Send> Send for Held<M> {}
// SAFETY: as above.
unsafe impl<M: Deref<Target = BlockMap> + Sync> Sync for Held<M> {}

impl<M: Deref<Target = BlockMap>> Held<M> {
    #[inline]
    fn slot(&self) -> &AtomicU64 {
        // SAFETY: `slot` was derived from `map`'s tree, whose leaves are freed only
        // when the map is dropped; `self.map` (a borrow or an `Arc`) keeps the map
        // alive at least as long as `self`.
        unsafe { self.slot.as_ref() }
    }
}

/// `debug_assert!` for code that also runs in `Drop`: while unwinding from another
/// panic it stays quiet, so a broken invariant reports instead of aborting.
macro_rules! invariant {
    ($cond:expr, $($msg:tt)+) => {
        debug_assert!($cond || std::thread::panicking(), $($msg)+)
    };
}

/// Take `self.held` out of a guard whose `Drop` must then not run.
macro_rules! defuse {
    ($guard:expr) => {{
        let guard = ManuallyDrop::new($guard);
        // SAFETY: `guard` is never used or dropped again, so the field is moved out
        // exactly once.
        unsafe { std::ptr::read(&guard.held) }
    }};
}

/// Exclusive right to fill a chunk that was `UNMAPPED`: it is `PENDING` until
/// [`publish`](FillGuard::publish) or [`abort`](FillGuard::abort) (or `Drop`, = abort).
#[must_use = "dropping a fill guard aborts the fill"]
pub struct FillGuard<M: Deref<Target = BlockMap>> {
    held: Held<M>,
}

impl<M: Deref<Target = BlockMap>> FillGuard<M> {
    /// # Safety
    /// `slot` is `chunk`'s entry in `map`'s tree, and the caller's CAS just moved
    /// it from `UNMAPPED` to `PENDING`.
    pub(crate) unsafe fn new(map: M, chunk: u64, slot: NonNull<AtomicU64>) -> Self {
        FillGuard {
            held: Held { map, chunk, slot },
        }
    }

    /// The logical chunk being filled.
    pub fn chunk(&self) -> u64 {
        self.held.chunk
    }

    /// `PENDING` -> `MAPPED(physical)`, waking waiters. Call it only once the data
    /// at `physical` is complete (the read-merge and the write both done): a reader
    /// that sees the entry may read it at once. If `physical > PHYSICAL_MAX` the
    /// fill is aborted instead (waiters woken) and the error returned.
    pub fn publish(self, physical: u64) -> Result<(), Error> {
        let held = defuse!(self);
        if physical > PHYSICAL_MAX {
            end_fill(&held);
            return Err(Error::PhysicalOutOfRange { physical });
        }
        held.map.count_mapped(1);
        // Release: the fill's effects happen-before any Acquire load that sees
        // MAPPED. Acquire: see the pushes of waiters whose WAITERS bit we clear.
        let old = held.slot().swap(mapped_word(physical), Ordering::AcqRel);
        debug_assert_eq!(state_bits(old), PENDING, "publish of a chunk not PENDING");
        debug_assert_eq!(pins(old), 0);
        held.map.wake_if_waiters(held.chunk, old);
        Ok(())
    }

    /// `PENDING` -> `UNMAPPED` (the write failed or was cancelled), waking waiters.
    pub fn abort(self) {
        let held = defuse!(self);
        end_fill(&held);
    }
}

fn end_fill<M: Deref<Target = BlockMap>>(held: &Held<M>) {
    let old = held.slot().swap(UNMAPPED, Ordering::AcqRel);
    invariant!(
        state_bits(old) == PENDING,
        "abort of a chunk not PENDING: {old:#x}"
    );
    held.map.wake_if_waiters(held.chunk, old);
}

impl<M: Deref<Target = BlockMap>> Drop for FillGuard<M> {
    fn drop(&mut self) {
        end_fill(&self.held);
    }
}

impl<M: Deref<Target = BlockMap>> fmt::Debug for FillGuard<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FillGuard")
            .field("chunk", &self.held.chunk)
            .finish()
    }
}

/// One in-place writer on a `MAPPED` chunk. While any pin is held a merge of the
/// chunk cannot copy it (it stays `MERGING` and undrained). Dropping releases it.
#[must_use = "dropping the pin ends the in-place write"]
pub struct WritePin<M: Deref<Target = BlockMap>> {
    held: Held<M>,
    physical: u64,
}

impl<M: Deref<Target = BlockMap>> WritePin<M> {
    /// # Safety
    /// `slot` is `chunk`'s entry in `map`'s tree and the caller's CAS just added a
    /// pin to it; `word` is the `MAPPED` word the CAS replaced.
    pub(crate) unsafe fn new(map: M, chunk: u64, slot: NonNull<AtomicU64>, word: u64) -> Self {
        debug_assert_eq!(state_bits(word), MAPPED);
        WritePin {
            held: Held { map, chunk, slot },
            physical: physical(word),
        }
    }

    /// The logical chunk.
    pub fn chunk(&self) -> u64 {
        self.held.chunk
    }

    /// Where to write in place.
    pub fn physical(&self) -> u64 {
        self.physical
    }
}

impl<M: Deref<Target = BlockMap>> Drop for WritePin<M> {
    fn drop(&mut self) {
        let slot = self.held.slot();
        let mut word = slot.load(Ordering::Relaxed);
        loop {
            invariant!(pins(word) > 0 && has_data(word), "unpin of {word:#x}");
            if pins(word) == 0 {
                return; // Broken invariant (release build): do not borrow into state bits.
            }
            let mut next = word - PIN_ONE;
            // The last pin out releases a draining merge; the pin below the limit
            // releases saturated writers. Either way the waiters are woken.
            let release = word & WAITERS != 0 && (pins(next) == 0 || pins(word) == MAX_PINS);
            if release {
                next &= !WAITERS;
            }
            // Release: the in-place write happens-before the merge's copy, which
            // starts after an Acquire load that sees the pins drained.
            match slot.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    if release {
                        self.held.map.wake_if_waiters(self.held.chunk, word);
                    }
                    return;
                }
                Err(now) => word = now,
            }
        }
    }
}

impl<M: Deref<Target = BlockMap>> fmt::Debug for WritePin<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritePin")
            .field("chunk", &self.held.chunk)
            .field("physical", &self.physical)
            .finish()
    }
}

/// Exclusive right to merge a chunk down: it is `MERGING(p)` until
/// [`finish`](MergeGuard::finish) (-> `UNMAPPED`) or [`abort`](MergeGuard::abort)
/// (-> `MAPPED(p)`; also what `Drop` does).
///
/// Protocol: wait for [`poll_drained`](MergeGuard::poll_drained) to say `Ready`
/// (no in-place writer left), copy `physical()` to the layer below, publish the copy
/// there, then `finish` — so a reader always finds the chunk in one layer or the
/// other, and no acknowledged write is lost.
#[must_use = "dropping a merge guard aborts the merge"]
pub struct MergeGuard<M: Deref<Target = BlockMap>> {
    held: Held<M>,
    physical: u64,
}

impl<M: Deref<Target = BlockMap>> MergeGuard<M> {
    /// # Safety
    /// `slot` is `chunk`'s entry in `map`'s tree and the caller's CAS just moved it
    /// from `word` (`MAPPED`) to `MERGING`.
    pub(crate) unsafe fn new(map: M, chunk: u64, slot: NonNull<AtomicU64>, word: u64) -> Self {
        debug_assert_eq!(state_bits(word), MAPPED);
        MergeGuard {
            held: Held { map, chunk, slot },
            physical: physical(word),
        }
    }

    /// The logical chunk.
    pub fn chunk(&self) -> u64 {
        self.held.chunk
    }

    /// Where the chunk's data is in this delta: the copy's source.
    pub fn physical(&self) -> u64 {
        self.physical
    }

    /// No in-place writer is left. Once true it stays true: new writers wait.
    pub fn is_drained(&self) -> bool {
        pins(self.held.slot().load(Ordering::Acquire)) == 0
    }

    /// `Ready` if drained (Acquire: the writers' data is complete), else `Parked`:
    /// `waker` is woken when the last pin is dropped.
    pub fn poll_drained(&self, waker: &Waker) -> Park {
        self.held
            .map
            .park_until(self.held.chunk, self.held.slot(), waker, |w| pins(w) != 0)
    }

    /// `MERGING` -> `UNMAPPED`, after the copy was published below; wakes waiters
    /// (who then write below). Refused, handing the guard back, if not drained:
    /// the copy must not have started before the writers drained.
    pub fn finish(self) -> Result<(), MergeGuard<M>> {
        let slot = self.held.slot();
        let mut word = slot.load(Ordering::Acquire);
        loop {
            if pins(word) != 0 {
                return Err(self);
            }
            // Release: the copy below happens-before whoever sees UNMAPPED here.
            match slot.compare_exchange_weak(word, UNMAPPED, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => word = now,
            }
        }
        let held = defuse!(self);
        debug_assert_eq!(state_bits(word), MERGING, "finish of a chunk not MERGING");
        held.map.count_mapped(-1);
        held.map.wake_if_waiters(held.chunk, word);
        Ok(())
    }

    /// `MERGING(p)` -> `MAPPED(p)`: the chunk stays in this delta; waiters woken.
    pub fn abort(self) {
        let held = defuse!(self);
        end_merge(&held);
    }
}

fn end_merge<M: Deref<Target = BlockMap>>(held: &Held<M>) {
    let slot = held.slot();
    let mut word = slot.load(Ordering::Relaxed);
    loop {
        invariant!(
            state_bits(word) == MERGING,
            "abort of a merge not MERGING: {word:#x}"
        );
        // Pins are kept: in-place writers may still be draining.
        let next = with_state(word, MAPPED) & !WAITERS;
        match slot.compare_exchange_weak(word, next, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => break,
            Err(now) => word = now,
        }
    }
    held.map.wake_if_waiters(held.chunk, word);
}

impl<M: Deref<Target = BlockMap>> Drop for MergeGuard<M> {
    fn drop(&mut self) {
        end_merge(&self.held);
    }
}

impl<M: Deref<Target = BlockMap>> fmt::Debug for MergeGuard<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergeGuard")
            .field("chunk", &self.held.chunk)
            .field("physical", &self.physical)
            .finish()
    }
}
