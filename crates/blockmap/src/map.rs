//! `BlockMap`: the operations on entries. Contracts are in the crate docs.

use std::fmt;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Arc;
use std::task::Waker;

use crate::entry::{
    pins, state_bits, with_state, writer_busy, Entry, MAPPED, MAX_PINS, MERGING, PENDING, PIN_ONE,
    UNMAPPED, WAITERS,
};
use crate::error::Error;
use crate::guard::{FillGuard, MergeGuard, WritePin};
use crate::sync::stat;
use crate::sync::{AtomicU64, CachePadded, Ordering};
use crate::tree::{Tree, MAX_CAPACITY};
use crate::wait::WaitList;

/// The lookup table of one delta image: logical chunk -> [`Entry`].
///
/// Shared by every reactor through `&BlockMap` or `Arc<BlockMap>`; no operation
/// takes a lock. See the crate docs for states, ordering and reclamation.
pub struct BlockMap {
    /// Read by every operation; written only by `grow`. Shares a line with the root.
    capacity: AtomicU64,
    tree: Tree,
    /// Written by every publish and merge finish: kept off the read-mostly line.
    mapped: CachePadded<stat::AtomicU64>,
    waits: WaitList,
    #[cfg(all(test, not(loom)))]
    pub(crate) faults: crate::stress::Faults,
}

// Every reactor shares a map; guards move with requests between threads.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn sendable<T: Send>() {}
    shared::<BlockMap>();
    sendable::<FillGuard<Arc<BlockMap>>>();
    sendable::<MergeGuard<Arc<BlockMap>>>();
    sendable::<WritePin<&BlockMap>>();
};

/// Outcome of [`BlockMap::claim`].
#[must_use = "a fill guard must be published or aborted; a pin must be held for the write"]
#[derive(Debug)]
pub enum Claim<M: Deref<Target = BlockMap>> {
    /// The chunk was `UNMAPPED`; it is now `PENDING` and the caller alone fills it.
    Fill(FillGuard<M>),
    /// The chunk is `MAPPED`; the pin keeps a merge from copying it until dropped.
    /// Write in place at [`WritePin::physical`].
    Mapped(WritePin<M>),
    /// `PENDING`, `MERGING`, or `MAPPED` with [`MAX_PINS`] writers: [`BlockMap::park`]
    /// and claim again when woken.
    Busy(Entry),
}

/// Outcome of [`BlockMap::begin_merge`].
#[must_use = "a merge guard must be finished or aborted"]
#[derive(Debug)]
pub enum BeginMerge<M: Deref<Target = BlockMap>> {
    /// The chunk is now `MERGING`; copy it down once the guard is drained.
    Started(MergeGuard<M>),
    /// Nothing to merge.
    Unmapped,
    /// `PENDING` (a fill is in flight) or already `MERGING`: park and retry.
    Busy(Entry),
}

/// Outcome of [`BlockMap::park`] and [`MergeGuard::poll_drained`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// The chunk is not busy (any more): retry now. Carries the word that said so.
    Ready(Entry),
    /// Registered: the waker will be woken when the chunk leaves the busy state
    /// (possibly spuriously earlier — then retry and park again).
    Parked,
}

impl BlockMap {
    /// An empty map for a volume of `capacity_chunks` chunks.
    pub fn new(capacity_chunks: u64) -> Result<BlockMap, Error> {
        if capacity_chunks > MAX_CAPACITY {
            return Err(Error::CapacityTooLarge {
                requested: capacity_chunks,
                max: MAX_CAPACITY,
            });
        }
        Ok(BlockMap {
            capacity: AtomicU64::new(capacity_chunks),
            tree: Tree::new(capacity_chunks),
            mapped: CachePadded(stat::AtomicU64::new(0)),
            waits: WaitList::new(),
            #[cfg(all(test, not(loom)))]
            faults: Default::default(),
        })
    }

    /// Chunks addressable now.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Let the volume grow to `capacity_chunks` while every reactor keeps using the
    /// map: the tree gets taller by linking a new root above the old one, nothing
    /// is copied. Concurrent calls are fine (the larger capacity wins).
    pub fn grow(&self, capacity_chunks: u64) -> Result<(), Error> {
        let current = self.capacity();
        if capacity_chunks < current {
            return Err(Error::Shrink {
                current,
                requested: capacity_chunks,
            });
        }
        if capacity_chunks > MAX_CAPACITY {
            return Err(Error::CapacityTooLarge {
                requested: capacity_chunks,
                max: MAX_CAPACITY,
            });
        }
        // The taller root is published before the capacity that needs it: an
        // operation that reads the new capacity (Acquire) then finds the new root.
        self.tree.grow(capacity_chunks);
        self.capacity.fetch_max(capacity_chunks, Ordering::AcqRel);
        Ok(())
    }

    /// Mapped chunks (`MAPPED` or `MERGING`). Exact when no operation is in flight.
    pub fn mapped_count(&self) -> u64 {
        self.mapped.0.load(Ordering::Relaxed)
    }

    /// Bytes of memory the map holds: the struct and its node arenas' slabs, used
    /// or not (at most 1/8 more than the nodes in use, plus a small first slab per
    /// arena; see the `arena` module). Parked waiters (transient, one small node
    /// each) are not counted.
    pub fn memory_bytes(&self) -> usize {
        size_of::<BlockMap>() + self.tree.memory_bytes()
    }

    #[inline]
    fn check(&self, chunk: u64) -> Result<(), Error> {
        // Acquire: pairs with `grow`, so the root loaded next covers `chunk`.
        let capacity = self.capacity.load(Ordering::Acquire);
        if chunk < capacity {
            Ok(())
        } else {
            Err(Error::ChunkOutOfRange { chunk, capacity })
        }
    }

    /// The entry of `chunk`. Wait-free: a bounded walk of atomic loads, no
    /// allocation; never blocks, never retries.
    #[inline]
    pub fn lookup(&self, chunk: u64) -> Result<Entry, Error> {
        self.check(chunk)?;
        Ok(match self.tree.leaf(chunk) {
            // Acquire: pairs with the Release of the publish (or merge finish) that
            // wrote the word, so what was done before it is visible.
            Some(leaf) => Entry::from_word(leaf.entry(chunk).load(Ordering::Acquire)),
            None => Entry::UNMAPPED,
        })
    }

    /// Start a write to `chunk`: exactly one concurrent claimant of an `UNMAPPED`
    /// chunk wins the fill; the others learn it is `MAPPED` (and get a pin to write
    /// in place) or busy.
    pub fn claim(&self, chunk: u64) -> Result<Claim<&BlockMap>, Error> {
        claim_in(self, chunk)
    }

    /// [`BlockMap::claim`] for callers that keep the guard beyond a borrow (a
    /// request in a reactor's slab): the guard holds an `Arc`.
    pub fn claim_shared(this: &Arc<BlockMap>, chunk: u64) -> Result<Claim<Arc<BlockMap>>, Error> {
        claim_in(Arc::clone(this), chunk)
    }

    /// Start merging `chunk` down: `MAPPED(p)` -> `MERGING(p)`. Writers that arrive
    /// now wait; writers already pinned drain (see [`MergeGuard::poll_drained`]).
    pub fn begin_merge(&self, chunk: u64) -> Result<BeginMerge<&BlockMap>, Error> {
        begin_merge_in(self, chunk)
    }

    /// [`BlockMap::begin_merge`] with the guard holding an `Arc`.
    pub fn begin_merge_shared(
        this: &Arc<BlockMap>,
        chunk: u64,
    ) -> Result<BeginMerge<Arc<BlockMap>>, Error> {
        begin_merge_in(Arc::clone(this), chunk)
    }

    /// Park a writer that got [`Claim::Busy`] or [`BeginMerge::Busy`]: `waker` is
    /// woken once `chunk` is no longer `PENDING`, `MERGING` or pin-saturated —
    /// unless it already is not, then `Ready` comes back and nothing is registered.
    /// Readers never need this: a `PENDING` chunk is read from below, a `MERGING`
    /// one from here.
    pub fn park(&self, chunk: u64, waker: &Waker) -> Result<Park, Error> {
        self.check(chunk)?;
        Ok(match self.tree.leaf(chunk) {
            Some(leaf) => self.park_until(chunk, leaf.entry(chunk), waker, writer_busy),
            None => Park::Ready(Entry::UNMAPPED),
        })
    }

    /// Register `waker`, then re-check: the protocol of `wait.rs`.
    pub(crate) fn park_until(
        &self,
        chunk: u64,
        slot: &AtomicU64,
        waker: &Waker,
        busy: fn(u64) -> bool,
    ) -> Park {
        let mut word = slot.load(Ordering::Acquire);
        if !busy(word) {
            return Park::Ready(Entry::from_word(word));
        }
        self.waits.push(chunk, waker);
        loop {
            if !busy(word) {
                // Our node raced the transition and nobody will take it for us.
                self.waits.wake(chunk);
                return Park::Ready(Entry::from_word(word));
            }
            // Release: the transition that reads WAITERS sees our push. An RMW even
            // if WAITERS is already set, so the transition is ordered after it.
            match slot.compare_exchange_weak(
                word,
                word | WAITERS,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Park::Parked,
                Err(now) => word = now,
            }
        }
    }

    /// After a transition's RMW returned `old`: wake the shard if `old` had waiters.
    #[inline]
    pub(crate) fn wake_if_waiters(&self, chunk: u64, old: u64) {
        if old & WAITERS != 0 {
            self.waits.wake(chunk);
        }
    }

    #[inline]
    pub(crate) fn count_mapped(&self, delta: i64) {
        if delta > 0 {
            self.mapped.0.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.mapped
                .0
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    #[cfg(all(test, not(loom)))]
    pub(crate) fn count_mapped_slow(&self) -> u64 {
        self.tree.count_mapped_slow()
    }

    pub(crate) fn tree(&self) -> &Tree {
        &self.tree
    }
}

fn claim_in<M: Deref<Target = BlockMap>>(map: M, chunk: u64) -> Result<Claim<M>, Error> {
    map.check(chunk)?;
    let slot = NonNull::from(map.tree.leaf_or_alloc(chunk).entry(chunk));
    // SAFETY: the entry lives in a leaf of `map`'s tree, freed only when the map is
    // dropped; `map` is alive for this whole function.
    let entry = unsafe { slot.as_ref() };
    #[cfg(all(test, not(loom)))]
    if map.faults.claim_without_cas() && crate::stress::racy_claim_wins(entry) {
        // SAFETY: `slot` is `chunk`'s entry in `map`, kept alive by the guard. The
        // exclusivity the contract also asks for is deliberately broken here: this
        // is the planted bug of the stress test's negative control. It breaks the
        // map's logic, not memory safety (a guard only does atomic ops on `slot`).
        return Ok(Claim::Fill(unsafe { FillGuard::new(map, chunk, slot) }));
    }
    let mut word = entry.load(Ordering::Acquire);
    loop {
        let next = match state_bits(word) {
            UNMAPPED => with_state(word, PENDING),
            MAPPED if pins(word) < MAX_PINS => word + PIN_ONE,
            _ => return Ok(Claim::Busy(Entry::from_word(word))),
        };
        // Acquire on success: the winner of a fill sees what the last merge finish
        // published (the copy below); a pinner sees what the publish published.
        match entry.compare_exchange_weak(word, next, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) if state_bits(word) == UNMAPPED => {
                // SAFETY: `slot` is the entry of `chunk` in `map`, which the guard
                // keeps alive, and the CAS made this caller the PENDING owner.
                return Ok(Claim::Fill(unsafe { FillGuard::new(map, chunk, slot) }));
            }
            Ok(_) => {
                // SAFETY: as above; the CAS took one pin on a MAPPED entry.
                return Ok(Claim::Mapped(unsafe {
                    WritePin::new(map, chunk, slot, word)
                }));
            }
            Err(now) => word = now,
        }
    }
}

fn begin_merge_in<M: Deref<Target = BlockMap>>(map: M, chunk: u64) -> Result<BeginMerge<M>, Error> {
    map.check(chunk)?;
    let Some(leaf) = map.tree.leaf(chunk) else {
        return Ok(BeginMerge::Unmapped);
    };
    let slot = NonNull::from(leaf.entry(chunk));
    // SAFETY: as in `claim_in`.
    let entry = unsafe { slot.as_ref() };
    let mut word = entry.load(Ordering::Acquire);
    loop {
        match state_bits(word) {
            UNMAPPED => return Ok(BeginMerge::Unmapped),
            MAPPED => {}
            _ => return Ok(BeginMerge::Busy(Entry::from_word(word))),
        }
        // Keep pins (they drain) and WAITERS (pin-saturated writers stay parked).
        match entry.compare_exchange_weak(
            word,
            with_state(word, MERGING),
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // SAFETY: as in `claim_in`; the CAS made this caller the MERGING owner.
                return Ok(BeginMerge::Started(unsafe {
                    MergeGuard::new(map, chunk, slot, word)
                }));
            }
            Err(now) => word = now,
        }
    }
}

impl fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockMap")
            .field("capacity", &self.capacity())
            .field("mapped", &self.mapped_count())
            .field("memory_bytes", &self.memory_bytes())
            .finish_non_exhaustive()
    }
}
