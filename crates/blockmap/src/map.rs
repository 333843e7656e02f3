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
use crate::tree::{Link, Tree, MAX_CAPACITY};
use crate::wait::WaitList;

/// Chunks whose misses [`BlockMap::lookup_batch`] overlaps: one tile goes through
/// each pass before the next pass starts. Measured on random lookups over 1 Mi
/// mapped chunks (BENCHMARKS.md): 16 and 32 leave DRAM latency partly exposed,
/// 64 and 128 do about as well as each other; 64 keeps the pass arrays at 1 KiB
/// of stack.
const BATCH_TILE: usize = 64;

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

    /// Hint that `chunk` will be looked up soon: walks the upper tree levels,
    /// loads the leaf pointer and asks the CPU to bring the line of `chunk`'s
    /// entry word into cache (x86-64 `prefetcht0`), so that a [`BlockMap::lookup`]
    /// issued a few hundred nanoseconds later finds it there instead of in DRAM.
    ///
    /// A pure hint: no effect on the map or on what any operation returns. Never
    /// faults, never allocates, never blocks. A chunk beyond the capacity or
    /// without a leaf is a no-op; so is the whole call on other architectures and
    /// under loom. The leaf pointer load may itself miss (the prefetch needs its
    /// value); [`BlockMap::lookup_batch`] overlaps those misses too.
    #[inline]
    pub fn prefetch(&self, chunk: u64) {
        #[cfg(not(loom))]
        if chunk < self.capacity() {
            if let Some(link) = self.tree.walker().link(chunk) {
                let _ = link.entry(chunk);
            }
        }
        #[cfg(loom)]
        let _ = chunk;
    }

    /// [`BlockMap::lookup`] of each chunk of `chunks`, written to the same index of
    /// `out`. Returns how many were looked up: `min(chunks.len(), out.len())`,
    /// the first that many of each; entries of `out` beyond them are untouched.
    /// Mismatched lengths are not a panic (nothing in this crate panics on
    /// caller input), so check the count if the lengths can differ.
    ///
    /// For many independent lookups of a large map, where each one is a cache miss
    /// (on the leaf word, often on the bottom node too): the chunks are taken in
    /// tiles of 64 and each tile in three passes — walk the upper
    /// levels and prefetch the bottom-node lines, load the leaf pointers and
    /// prefetch the entry lines, load the entry words — so a tile's misses overlap
    /// instead of following one another. A throughput gain: one lookup takes as
    /// long as before.
    ///
    /// # Ordering
    /// Each result is what `lookup` would return at some moment during this call:
    /// each entry word is one `Acquire` load, as in `lookup`, and a chunk whose
    /// leaf or interior node is missing is `UNMAPPED` as of the load that found it
    /// missing. Results for different chunks may come from different moments, as
    /// with a loop of `lookup`s. The capacity is loaded once per tile, so an
    /// out-of-range error carries the capacity as of the start of its tile.
    /// Wait-free and allocation-free (one tile of pointers on the stack); the
    /// prefetches are hints with no effect on the results.
    ///
    /// ```
    /// use ringblk_blockmap::{BlockMap, Claim, Entry, State};
    ///
    /// let map = BlockMap::new(1 << 20)?;
    /// let Claim::Fill(fill) = map.claim(7)? else { unreachable!() };
    /// fill.publish(42)?;
    /// let chunks = [7, 8, 1 << 20];
    /// let mut out = [const { Ok(Entry::UNMAPPED) }; 3];
    /// assert_eq!(map.lookup_batch(&chunks, &mut out), 3);
    /// assert_eq!(out[0].as_ref().map(|e| e.state()), Ok(State::Mapped(42)));
    /// assert_eq!(out[1].as_ref().map(|e| e.state()), Ok(State::Unmapped));
    /// assert!(out[2].is_err()); // beyond the capacity
    /// # Ok::<(), ringblk_blockmap::Error>(())
    /// ```
    pub fn lookup_batch(&self, chunks: &[u64], out: &mut [Result<Entry, Error>]) -> usize {
        let n = chunks.len().min(out.len());
        for (chunks, out) in chunks[..n]
            .chunks(BATCH_TILE)
            .zip(out[..n].chunks_mut(BATCH_TILE))
        {
            self.lookup_tile(chunks, out);
        }
        n
    }

    /// One tile of [`BlockMap::lookup_batch`]: its three passes.
    #[inline]
    fn lookup_tile(&self, chunks: &[u64], out: &mut [Result<Entry, Error>]) {
        debug_assert!(chunks.len() == out.len() && chunks.len() <= BATCH_TILE);
        // Acquire: pairs with `grow`, so the root the walker loads next covers
        // every chunk below `capacity`.
        let capacity = self.capacity();
        let walker = self.tree.walker();
        // Caching the links and entries between passes is sound: nodes are never
        // unlinked or moved (see `tree::Walker`).
        let mut links: [Option<Link<'_>>; BATCH_TILE] = [None; BATCH_TILE];
        for (link, &chunk) in links.iter_mut().zip(chunks) {
            if chunk < capacity {
                *link = walker.link(chunk);
            }
        }
        #[cfg(all(test, not(loom)))]
        if self.faults.batch_stale_link() {
            // The planted bug of the batch tests' negative control: an off-by-one
            // between passes (chunk i's entry taken from chunk i - 1's link).
            links.copy_within(..chunks.len().saturating_sub(1), 1);
        }
        let mut entries: [Option<&AtomicU64>; BATCH_TILE] = [None; BATCH_TILE];
        for ((entry, link), &chunk) in entries.iter_mut().zip(&links).zip(chunks) {
            *entry = link.and_then(|link| link.entry(chunk));
        }
        for ((result, entry), &chunk) in out.iter_mut().zip(&entries).zip(chunks) {
            *result = if chunk < capacity {
                // Acquire: as in `lookup`.
                Ok(entry.map_or(Entry::UNMAPPED, |e| {
                    Entry::from_word(e.load(Ordering::Acquire))
                }))
            } else {
                Err(Error::ChunkOutOfRange { chunk, capacity })
            };
        }
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

#[cfg(all(test, not(loom)))]
mod tests {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestError, TestRunner};

    use super::*;
    use crate::entry::State;

    /// A map to batch-look-up: its capacity, the chunks written (each with what to
    /// leave it in) and the keys of the batch.
    #[derive(Clone, Debug)]
    struct Case {
        capacity: u64,
        writes: Vec<(u64, Leave)>,
        keys: Vec<u64>,
    }

    #[derive(Clone, Copy, Debug)]
    enum Leave {
        Mapped,
        /// `MAPPED` with a pin held: the word has pin bits.
        Pinned,
        Pending,
        Merging,
    }

    fn leave() -> impl Strategy<Value = Leave> {
        prop_oneof![
            4 => Just(Leave::Mapped),
            1 => Just(Leave::Pinned),
            1 => Just(Leave::Pending),
            1 => Just(Leave::Merging),
        ]
    }

    /// Small maps (one bottom node, several leaves) and large sparse ones (unallocated
    /// bottom nodes and leaves); keys next to written chunks (same or neighbouring
    /// leaf, in any state), anywhere below the capacity (mostly no leaf), just above
    /// it, and anywhere at all (errors); 0 to 3 tiles and a bit.
    fn case() -> impl Strategy<Value = Case> {
        prop_oneof![1..3000u64, (1u64 << 20)..(1u64 << 22)]
            .prop_flat_map(|capacity| {
                let writes = prop::collection::vec((0..capacity, leave()), 0..48);
                (Just(capacity), writes)
            })
            .prop_flat_map(|(capacity, writes)| {
                let near: Vec<u64> = writes.iter().map(|&(c, _)| c).chain([0]).collect();
                let key = prop_oneof![
                    4 => (prop::sample::select(near), -20i64..20)
                        .prop_map(|(c, d)| c.saturating_add_signed(d)),
                    2 => 0..capacity,
                    1 => capacity..capacity + 64,
                    1 => any::<u64>(),
                ];
                let keys = prop::collection::vec(key, 0..3 * BATCH_TILE + 10);
                (Just(capacity), Just(writes), keys)
            })
            .prop_map(|(capacity, writes, keys)| Case {
                capacity,
                writes,
                keys,
            })
    }

    /// Build the case's map, leave its chunks in their states (holding the guards)
    /// and run `check` on it.
    fn with_map<R>(case: &Case, plant_bug: bool, check: impl FnOnce(&BlockMap) -> R) -> R {
        let map = BlockMap::new(case.capacity).expect("capacity");
        if plant_bug {
            map.faults.plant_batch_stale_link();
        }
        let (mut fills, mut pins, mut merges) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &(chunk, leave)) in case.writes.iter().enumerate() {
            let Ok(Claim::Fill(fill)) = map.claim(chunk) else {
                continue; // written twice: the first write's state stays
            };
            if let Leave::Pending = leave {
                fills.push(fill);
                continue;
            }
            fill.publish(i as u64 + 1).expect("physical fits");
            match leave {
                Leave::Pinned => match map.claim(chunk) {
                    Ok(Claim::Mapped(pin)) => pins.push(pin),
                    other => panic!("{other:?}"),
                },
                Leave::Merging => match map.begin_merge(chunk) {
                    Ok(BeginMerge::Started(merge)) => merges.push(merge),
                    other => panic!("{other:?}"),
                },
                Leave::Mapped | Leave::Pending => {}
            }
        }
        check(&map)
    }

    /// `lookup_batch` returns what `lookup` returns, key by key.
    fn batch_equals_lookups(map: &BlockMap, keys: &[u64]) -> Result<(), TestCaseError> {
        let mut out = vec![
            Err(Error::Shrink {
                current: 0,
                requested: 0
            });
            keys.len()
        ];
        prop_assert_eq!(map.lookup_batch(keys, &mut out), keys.len());
        for (i, (&chunk, batched)) in keys.iter().zip(&out).enumerate() {
            prop_assert_eq!(batched, &map.lookup(chunk), "key {} = chunk {}", i, chunk);
        }
        Ok(())
    }

    proptest! {
        /// Guards against any divergence of the pipelined batch (tiles, cached
        /// links and entries, one capacity load per tile) from plain lookups.
        #[test]
        fn lookup_batch_equals_lookup(case in case()) {
            with_map(&case, false, |map| batch_equals_lookups(map, &case.keys))?;
        }
    }

    /// Negative control: the same property over the same cases must catch an
    /// off-by-one between the batch's passes, or it proves nothing.
    #[test]
    fn lookup_batch_check_catches_planted_stale_link() {
        let mut runner = TestRunner::new(Config {
            cases: 256,
            failure_persistence: None,
            max_shrink_iters: 0,
            ..Config::default()
        });
        let result = runner.run(&case(), |case| {
            with_map(&case, true, |map| batch_equals_lookups(map, &case.keys))
        });
        assert!(
            matches!(result, Err(TestError::Fail(..))),
            "the planted bug went unnoticed: {result:?}"
        );
    }

    /// Guards against a panic or a write out of bounds when the lengths differ:
    /// the shorter wins and the rest of `out` is left alone.
    #[test]
    fn lookup_batch_takes_the_shorter_length() {
        let map = BlockMap::new(100).expect("capacity");
        let Ok(Claim::Fill(fill)) = map.claim(3) else {
            panic!("fresh map")
        };
        fill.publish(9).expect("physical fits");
        let untouched = Err(Error::Shrink {
            current: 1,
            requested: 0,
        });
        let mut out = vec![untouched.clone(); 4];
        assert_eq!(map.lookup_batch(&[3, 200], &mut out), 2);
        assert_eq!(out[0].as_ref().map(|e| e.state()), Ok(State::Mapped(9)));
        assert_eq!(
            out[1],
            Err(Error::ChunkOutOfRange {
                chunk: 200,
                capacity: 100
            })
        );
        assert_eq!(out[2..], [untouched.clone(), untouched.clone()]);
        let mut short = vec![untouched.clone(); 1];
        assert_eq!(map.lookup_batch(&[3, 4, 5], &mut short), 1);
        assert_eq!(short[0], map.lookup(3));
        assert_eq!(map.lookup_batch(&[], &mut out), 0);
        assert_eq!(map.lookup_batch(&[3], &mut []), 0);
    }

    /// Guards against `prefetch` faulting or changing anything on any chunk: below
    /// and beyond the capacity, with and without a leaf, before and after growth.
    #[test]
    fn prefetch_is_only_a_hint() {
        let map = BlockMap::new(1 << 20).expect("capacity");
        let Ok(Claim::Fill(fill)) = map.claim(5000) else {
            panic!("fresh map")
        };
        fill.publish(1).expect("physical fits");
        let before = (map.memory_bytes(), map.mapped_count());
        for chunk in [
            0,
            5000,
            5001,
            1 << 19,
            (1 << 20) - 1,
            1 << 20,
            1 << 40,
            u64::MAX,
        ] {
            map.prefetch(chunk);
        }
        assert_eq!((map.memory_bytes(), map.mapped_count()), before);
        assert_eq!(map.lookup(5000).map(|e| e.state()), Ok(State::Mapped(1)));
        map.grow(1 << 40).expect("grow");
        map.prefetch(5000);
        map.prefetch((1 << 40) - 1);
        assert_eq!(map.lookup(5000).map(|e| e.state()), Ok(State::Mapped(1)));
    }
}
