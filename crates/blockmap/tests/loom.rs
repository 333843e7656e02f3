//! loom models of the map's races. Run by `ci/loom.sh` (`--cfg loom`, release, a
//! bounded preemption count). Under loom the tree has 2-entry leaves and 2-way
//! interior nodes, node arenas start with 2-node slabs, and the waiter list has 2
//! shards, so small chunk numbers exercise leaf allocation, interior nodes, slab
//! refills, growth and shard sharing.
//!
//! Waiting goes through `loom::future::block_on`, whose waker blocks the loom
//! thread: a lost wake-up is a deadlock, which loom reports as a failure.
//!
//! The two-thread models are exhaustive (no preemption bound; about a second in
//! all). The three-thread model is bounded by `LOOM_MAX_PREEMPTIONS` (ci/loom.sh:
//! 2, ~10 s; 3 takes ~100 s).
//!
//! Known blind spot: loom lets an RMW read only the newest store, so it cannot
//! show why the waiter's `WAITERS` CAS must be `AcqRel` rather than `Relaxed`
//! (see the argument in `src/wait.rs`); every other ordering in the map was
//! checked by weakening it and watching a model here fail.
#![cfg(loom)]
// The `Arc<loom::cell::UnsafeCell<_>>`s stand for data on disk; sharing them
// unsynchronized is the point: loom reports any access the map fails to order.
#![allow(clippy::arc_with_non_send_sync)]

use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use loom::cell::UnsafeCell;
use loom::future::block_on;
use loom::model::Builder;
use loom::thread;
use ringblk_blockmap::{BeginMerge, BlockMap, Claim, Entry, Error, Park, State};

/// Explore every interleaving (two-thread models are small enough).
fn exhaustive(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = Builder::new();
    builder.preemption_bound = None;
    builder.check(f);
}

/// Explore interleavings up to `LOOM_MAX_PREEMPTIONS` preemptions.
fn bounded(f: impl Fn() + Sync + Send + 'static) {
    Builder::new().check(f);
}

/// Write `chunk` like the target does: fill it if unmapped (publishing `physical`),
/// write in place if mapped, park while busy. Returns what the write found.
fn write(map: &BlockMap, chunk: u64, physical: u64) -> State {
    block_on(poll_fn(|cx| loop {
        match map.claim(chunk).unwrap() {
            Claim::Fill(fill) => {
                fill.publish(physical).unwrap();
                return Poll::Ready(State::Unmapped);
            }
            Claim::Mapped(pin) => return Poll::Ready(State::Mapped(pin.physical())),
            Claim::Busy(_) => match map.park(chunk, cx.waker()).unwrap() {
                Park::Parked => return Poll::Pending,
                Park::Ready(_) => continue,
            },
        }
    }))
}

/// Guards against: two winners of one fill, or a loser that does not end up
/// seeing the winner's mapping (and a loser that parks forever).
#[test]
fn two_claimants_one_winner_loser_sees_published_entry() {
    exhaustive(|| {
        let map = Arc::new(BlockMap::new(4).unwrap());
        let threads: Vec<_> = [10, 20]
            .into_iter()
            .map(|physical| {
                let map = Arc::clone(&map);
                thread::spawn(move || (physical, write(&map, 1, physical)))
            })
            .collect();
        let results: Vec<(u64, State)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<u64> = results
            .iter()
            .filter(|(_, found)| *found == State::Unmapped)
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        let winner = winners[0];
        for (_, found) in results.iter().filter(|(p, _)| *p != winner) {
            assert_eq!(*found, State::Mapped(winner));
        }
        assert_eq!(map.lookup(1).unwrap().state(), State::Mapped(winner));
        assert_eq!(map.mapped_count(), 1);
    });
}

/// Fills chunk 2 with physical 7 on a new thread, after writing 42 to `data` (the
/// chunk's "contents"): what the lookup models race against.
fn spawn_filler(map: &Arc<BlockMap>, data: &Arc<UnsafeCell<u64>>) -> thread::JoinHandle<()> {
    let (map, data) = (Arc::clone(map), Arc::clone(data));
    thread::spawn(move || {
        let Claim::Fill(fill) = map.claim(2).unwrap() else {
            panic!("no contender")
        };
        // SAFETY: the chunk is PENDING and owned by this fill; readers touch the data
        // only after seeing MAPPED.
        data.with_mut(|d| unsafe { *d = 42 });
        fill.publish(7).unwrap();
    })
}

/// A state seen for chunk 2 while `spawn_filler` runs: UNMAPPED, PENDING, or
/// MAPPED(7) with the filler's data visible.
fn assert_old_or_complete(state: State, data: &UnsafeCell<u64>) {
    match state {
        State::Unmapped | State::Pending => {}
        State::Mapped(p) => {
            assert_eq!(p, 7);
            // SAFETY: MAPPED was seen with Acquire after the filler's write.
            assert_eq!(data.with(|d| unsafe { *d }), 42);
        }
        other => panic!("torn or impossible state {other:?}"),
    }
}

/// Guards against: a reader seeing anything but UNMAPPED, PENDING or the final
/// MAPPED(p), and a publish not ordered after the fill's data (loom's UnsafeCell
/// reports the data race if Release/Acquire are missing).
#[test]
fn lookup_racing_publish_sees_old_or_complete_entry() {
    exhaustive(|| {
        let map = Arc::new(BlockMap::new(4).unwrap());
        let data = Arc::new(UnsafeCell::new(0u64));
        let filler = spawn_filler(&map, &data);
        // A yield (not counted as a preemption) lets loom schedule the filler
        // first; without it loom's bounded search never has the reader observe
        // the publish (a Relaxed publish went unnoticed before this was added).
        thread::yield_now();
        assert_old_or_complete(map.lookup(2).unwrap().state(), &data);
        filler.join().unwrap();
        assert_eq!(map.lookup(2).unwrap().state(), State::Mapped(7));
    });
}

/// Guards against: two threads racing to allocate the same leaf (chunks 0 and 1)
/// or the same interior node (chunks 0 and 2: different leaves under one node)
/// losing a mapping, or keeping (and counting) both nodes.
#[test]
fn leaf_allocation_race_keeps_both_mappings() {
    for (a, b) in [(0, 1), (0, 2)] {
        exhaustive(move || {
            // Capacity 8 = height 2 under loom: root -> interior -> leaf.
            let sequential = BlockMap::new(8).unwrap();
            write(&sequential, a, 100);
            write(&sequential, b, 200);
            let map = Arc::new(BlockMap::new(8).unwrap());
            let other = {
                let map = Arc::clone(&map);
                thread::spawn(move || write(&map, b, 200))
            };
            thread::yield_now(); // see lookup_racing_publish
            assert_eq!(write(&map, a, 100), State::Unmapped);
            assert_eq!(other.join().unwrap(), State::Unmapped);
            assert_eq!(map.lookup(a).unwrap().state(), State::Mapped(100));
            assert_eq!(map.lookup(b).unwrap().state(), State::Mapped(200));
            assert_eq!(
                map.memory_bytes(),
                sequential.memory_bytes(),
                "each node kept once"
            );
            assert_eq!(map.ranges(0, 8).count(), if b == a + 1 { 1 } else { 2 });
        });
    }
}

/// Guards against: two threads handed the same node when both find a node arena's
/// slab full and race to install the next one (under loom a first slab holds two
/// nodes): chunks 4 and 6 fill the first leaf slab, so the writers of 0 and 2 both
/// need a new leaf slab, and race for the last node of the first bottom-node slab.
/// A shared leaf would alias chunks 0 and 2 (the second write would find MAPPED).
#[test]
fn slab_exhaustion_race_hands_out_distinct_nodes() {
    exhaustive(|| {
        let map = Arc::new(BlockMap::new(8).unwrap());
        write(&map, 4, 40);
        write(&map, 6, 60);
        let other = {
            let map = Arc::clone(&map);
            thread::spawn(move || write(&map, 2, 20))
        };
        thread::yield_now(); // see lookup_racing_publish
        assert_eq!(write(&map, 0, 10), State::Unmapped);
        assert_eq!(other.join().unwrap(), State::Unmapped);
        for (chunk, physical) in [(0, 10), (2, 20), (4, 40), (6, 60)] {
            assert_eq!(map.lookup(chunk).unwrap().state(), State::Mapped(physical));
            assert_eq!(map.lookup(chunk + 1).unwrap().state(), State::Unmapped);
        }
        assert_eq!(map.mapped_count(), 4);
        assert_eq!(map.iter(0, 8).count(), 4);
    });
}

/// Guards against: an in-place write lost by a concurrent merge (the copy taken
/// before the write, or the write landing in the delta after the copy), and a
/// writer parked on MERGING never woken. The merge copies `data` to `below`; a
/// writer that finds the chunk merged away writes `below` directly (the merging
/// delta is the top layer). Either way `below` must end up with the write.
#[test]
fn merge_racing_an_in_place_writer_loses_nothing() {
    exhaustive(|| {
        let map = Arc::new(BlockMap::new(4).unwrap());
        write(&map, 3, 5);
        let data = Arc::new(UnsafeCell::new(1u64)); // physical chunk 5
        let below = Arc::new(UnsafeCell::new(0u64));
        let merger = {
            let (map, data, below) = (Arc::clone(&map), Arc::clone(&data), Arc::clone(&below));
            thread::spawn(move || {
                let BeginMerge::Started(merge) = map.begin_merge(3).unwrap() else {
                    panic!("nobody else merges")
                };
                block_on(poll_fn(|cx| match merge.poll_drained(cx.waker()) {
                    Park::Ready(_) => Poll::Ready(()),
                    Park::Parked => Poll::Pending,
                }));
                // SAFETY: drained: no pinned writer; new writers wait for MERGING.
                let value = data.with(|d| unsafe { *d });
                // SAFETY: only the merge writes below until it finishes.
                below.with_mut(|b| unsafe { *b = value });
                merge.finish().unwrap();
            })
        };
        thread::yield_now(); // see lookup_racing_publish
        let wrote_below = block_on(poll_fn(|cx| loop {
            match map.claim(3).unwrap() {
                Claim::Mapped(pin) => {
                    assert_eq!(pin.physical(), 5);
                    // SAFETY: the pin keeps the merge from reading `data` meanwhile.
                    data.with_mut(|d| unsafe { *d += 10 });
                    return Poll::Ready(false);
                }
                Claim::Fill(fill) => {
                    // Merged away: this delta no longer holds the chunk.
                    fill.abort();
                    // SAFETY: the claim saw UNMAPPED (Acquire) after the finish
                    // (Release), so the merge's write below happened before.
                    below.with_mut(|b| unsafe { *b += 10 });
                    return Poll::Ready(true);
                }
                Claim::Busy(_) => match map.park(3, cx.waker()).unwrap() {
                    Park::Parked => return Poll::Pending,
                    Park::Ready(_) => continue,
                },
            }
        }));
        merger.join().unwrap();
        // SAFETY: both threads are joined.
        let below = below.with(|b| unsafe { *b });
        assert_eq!(below, 11, "wrote below: {wrote_below}");
        assert_eq!(map.lookup(3).unwrap().state(), State::Unmapped);
        assert_eq!(map.mapped_count(), 0);
    });
}

/// Guards against lost wake-ups: waiters on two chunks that share a waiter shard
/// (0 and 2 under loom), one woken by an abort (guard dropped), one by a publish.
/// A waiter that misses its wake-up deadlocks, and loom fails the model.
#[test]
fn park_and_wake_loses_no_waiter() {
    bounded(|| {
        let map = Arc::new(BlockMap::new(4).unwrap());
        let Claim::Fill(aborted) = BlockMap::claim_shared(&map, 0).unwrap() else {
            panic!()
        };
        let Claim::Fill(published) = BlockMap::claim_shared(&map, 2).unwrap() else {
            panic!()
        };
        let waiters: Vec<_> = [0, 2]
            .into_iter()
            .map(|chunk| {
                let map = Arc::clone(&map);
                thread::spawn(move || write(&map, chunk, 50 + chunk))
            })
            .collect();
        thread::yield_now(); // see lookup_racing_publish
        drop(aborted);
        published.publish(9).unwrap();
        let found: Vec<State> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        // Chunk 0 was aborted: its waiter filled it. Chunk 2 was published: its
        // waiter found the mapping (or raced ahead of the park and saw it anyway).
        assert_eq!(found, [State::Unmapped, State::Mapped(9)]);
        assert_eq!(map.lookup(0).unwrap().state(), State::Mapped(50));
    });
}

/// Guards against: a chunk below a freshly grown capacity addressed through the
/// old, shorter root (it would alias a low chunk's entry).
#[test]
fn grow_racing_a_writer_never_aliases_chunks() {
    exhaustive(|| {
        // Height 1 under loom covers 4 chunks; growing to 8 adds a root level.
        let map = Arc::new(BlockMap::new(4).unwrap());
        let grower = {
            let map = Arc::clone(&map);
            thread::spawn(move || map.grow(8).unwrap())
        };
        thread::yield_now(); // see lookup_racing_publish
        write(&map, 1, 11);
        let wrote_high = match map.claim(5) {
            Ok(Claim::Fill(fill)) => {
                fill.publish(55).unwrap();
                true
            }
            Ok(other) => panic!("chunk 5 was never written: {other:?}"),
            Err(_) => false, // capacity still 4
        };
        grower.join().unwrap();
        assert_eq!(map.lookup(1).unwrap().state(), State::Mapped(11));
        let high = map.lookup(5).unwrap().state();
        assert_eq!(
            high,
            if wrote_high {
                State::Mapped(55)
            } else {
                State::Unmapped
            }
        );
        assert_eq!(map.mapped_count(), 1 + u64::from(wrote_high));
    });
}

/// Guards against: a batched lookup (whose passes cache links and entry pointers
/// and load the capacity once) reading a torn or impossible entry, reading the
/// same chunk older the second time, or seeing MAPPED without the filler's data
/// (Acquire missing on its entry load: loom's UnsafeCell reports the race).
#[test]
fn lookup_batch_racing_publish_sees_old_or_complete_entries() {
    exhaustive(|| {
        let map = Arc::new(BlockMap::new(4).unwrap());
        let data = Arc::new(UnsafeCell::new(0u64));
        let filler = spawn_filler(&map, &data);
        thread::yield_now(); // see lookup_racing_publish
        let mut out = [const { Ok(Entry::UNMAPPED) }; 4];
        assert_eq!(map.lookup_batch(&[2, 3, 2, 9], &mut out), 4);
        let states: Vec<State> = out[..3]
            .iter()
            .map(|r| r.as_ref().unwrap().state())
            .collect();
        for state in [states[0], states[2]] {
            assert_old_or_complete(state, &data);
        }
        // Read-read coherence: the later read of chunk 2 is not older.
        let rank = |s: State| match s {
            State::Unmapped => 0,
            State::Pending => 1,
            _ => 2,
        };
        assert!(rank(states[0]) <= rank(states[2]), "{states:?}");
        assert_eq!(states[1], State::Unmapped);
        assert_eq!(
            out[3],
            Err(Error::ChunkOutOfRange {
                chunk: 9,
                capacity: 4
            })
        );
        filler.join().unwrap();
    });
}

/// Guards against: a batched lookup racing a growth walking a root too short for
/// a chunk below the capacity it loaded (the walker's debug assertion), or
/// returning anything but "out of range", UNMAPPED, PENDING or the final entry.
#[test]
fn lookup_batch_racing_grow_and_write() {
    exhaustive(|| {
        let map = Arc::new(BlockMap::new(4).unwrap());
        write(&map, 1, 11);
        let grower = {
            let map = Arc::clone(&map);
            thread::spawn(move || {
                map.grow(8).unwrap();
                write(&map, 5, 55);
            })
        };
        thread::yield_now(); // see lookup_racing_publish
        let mut out = [const { Ok(Entry::UNMAPPED) }; 2];
        assert_eq!(map.lookup_batch(&[5, 1], &mut out), 2);
        match &out[0] {
            Err(Error::ChunkOutOfRange {
                chunk: 5,
                capacity: 4,
            }) => {}
            Ok(e)
                if matches!(
                    e.state(),
                    State::Unmapped | State::Pending | State::Mapped(55)
                ) => {}
            other => panic!("impossible result {other:?}"),
        }
        assert_eq!(out[1].as_ref().map(|e| e.state()), Ok(State::Mapped(11)));
        grower.join().unwrap();
    });
}
