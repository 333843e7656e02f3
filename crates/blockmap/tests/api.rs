//! Single-threaded behaviour of the public API: states, guards, wake-ups, errors.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use ringblk_blockmap::{
    BeginMerge, BlockMap, Claim, Error, Park, State, MAX_CAPACITY, MAX_PINS, PHYSICAL_MAX,
};

#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting() -> (Arc<CountingWaker>, Waker) {
    let counter = Arc::new(CountingWaker::default());
    (Arc::clone(&counter), Waker::from(counter))
}

fn fill(map: &BlockMap, chunk: u64, physical: u64) {
    match map.claim(chunk).unwrap() {
        Claim::Fill(guard) => guard.publish(physical).unwrap(),
        other => panic!("chunk {chunk}: {other:?}"),
    }
}

#[test]
fn claim_publish_lookup() {
    let map = BlockMap::new(1000).unwrap();
    assert_eq!(map.lookup(7).unwrap().state(), State::Unmapped);
    let Claim::Fill(guard) = map.claim(7).unwrap() else {
        panic!()
    };
    assert_eq!(map.lookup(7).unwrap().state(), State::Pending);
    // A second claimant is told busy while the fill is in flight.
    assert!(matches!(map.claim(7).unwrap(), Claim::Busy(e) if e.state() == State::Pending));
    guard.publish(70).unwrap();
    assert_eq!(map.lookup(7).unwrap().state(), State::Mapped(70));
    assert_eq!(map.mapped_count(), 1);
    // ...and afterwards learns MAPPED(p), with a pin.
    let Claim::Mapped(pin) = map.claim(7).unwrap() else {
        panic!()
    };
    assert_eq!(pin.physical(), 70);
    assert_eq!(map.lookup(7).unwrap().pins(), 1);
    drop(pin);
    assert_eq!(map.lookup(7).unwrap().pins(), 0);
}

#[test]
fn dropping_a_fill_guard_aborts_and_wakes() {
    let map = BlockMap::new(64).unwrap();
    let (count, waker) = counting();
    let Claim::Fill(guard) = map.claim(3).unwrap() else {
        panic!()
    };
    assert_eq!(map.park(3, &waker).unwrap(), Park::Parked);
    assert!(map.lookup(3).unwrap().has_waiters());
    drop(guard);
    assert_eq!(count.0.load(Ordering::SeqCst), 1);
    let entry = map.lookup(3).unwrap();
    assert_eq!(entry.state(), State::Unmapped);
    assert!(!entry.has_waiters());
    assert_eq!(map.mapped_count(), 0);
}

#[test]
fn publish_wakes_and_park_on_a_free_chunk_is_ready() {
    let map = BlockMap::new(64).unwrap();
    let (count, waker) = counting();
    assert_eq!(
        map.park(5, &waker).unwrap(),
        Park::Ready(map.lookup(5).unwrap())
    );
    let Claim::Fill(guard) = map.claim(5).unwrap() else {
        panic!()
    };
    assert_eq!(map.park(5, &waker).unwrap(), Park::Parked);
    assert_eq!(map.park(5, &waker).unwrap(), Park::Parked);
    guard.publish(1).unwrap();
    assert_eq!(
        count.0.load(Ordering::SeqCst),
        2,
        "both registrations woken"
    );
    assert!(
        matches!(map.park(5, &waker).unwrap(), Park::Ready(e) if e.state() == State::Mapped(1))
    );
}

#[test]
fn out_of_range_physical_aborts_the_fill() {
    let map = BlockMap::new(64).unwrap();
    let Claim::Fill(guard) = map.claim(1).unwrap() else {
        panic!()
    };
    assert_eq!(
        guard.publish(PHYSICAL_MAX + 1),
        Err(Error::PhysicalOutOfRange {
            physical: PHYSICAL_MAX + 1
        })
    );
    assert_eq!(map.lookup(1).unwrap().state(), State::Unmapped);
    fill(&map, 1, PHYSICAL_MAX);
    assert_eq!(map.lookup(1).unwrap().state(), State::Mapped(PHYSICAL_MAX));
}

#[test]
fn indexes_beyond_capacity_are_errors() {
    let map = BlockMap::new(10).unwrap();
    let out = Error::ChunkOutOfRange {
        chunk: 10,
        capacity: 10,
    };
    assert_eq!(map.lookup(10).unwrap_err(), out);
    assert_eq!(map.claim(10).unwrap_err(), out);
    assert_eq!(map.begin_merge(10).unwrap_err(), out);
    assert_eq!(map.park(10, &counting().1).unwrap_err(), out);
    assert_eq!(
        map.lookup(u64::MAX).unwrap_err(),
        Error::ChunkOutOfRange {
            chunk: u64::MAX,
            capacity: 10
        }
    );
    assert!(matches!(
        BlockMap::new(MAX_CAPACITY + 1),
        Err(Error::CapacityTooLarge { .. })
    ));
    assert!(matches!(map.grow(5), Err(Error::Shrink { .. })));
    assert!(matches!(
        map.grow(MAX_CAPACITY + 1),
        Err(Error::CapacityTooLarge { .. })
    ));
}

#[test]
fn grow_keeps_mappings_and_opens_new_chunks() {
    let map = BlockMap::new(10).unwrap();
    fill(&map, 9, 90);
    map.grow(MAX_CAPACITY).unwrap();
    assert_eq!(map.capacity(), MAX_CAPACITY);
    assert_eq!(map.lookup(9).unwrap().state(), State::Mapped(90));
    fill(&map, MAX_CAPACITY - 1, 1);
    assert_eq!(
        map.ranges(0, u64::MAX).collect::<Vec<_>>(),
        [9..10, MAX_CAPACITY - 1..MAX_CAPACITY]
    );
}

#[test]
fn merge_waits_for_in_place_writers_and_blocks_new_ones() {
    let map = BlockMap::new(64).unwrap();
    fill(&map, 4, 40);
    let Claim::Mapped(pin) = map.claim(4).unwrap() else {
        panic!()
    };
    let BeginMerge::Started(merge) = map.begin_merge(4).unwrap() else {
        panic!()
    };
    assert_eq!(merge.physical(), 40);
    assert_eq!(map.lookup(4).unwrap().state(), State::Merging(40));
    // New writers wait for the merge.
    assert!(matches!(map.claim(4).unwrap(), Claim::Busy(_)));
    assert!(matches!(map.begin_merge(4).unwrap(), BeginMerge::Busy(_)));
    let (writer_wakes, writer) = counting();
    assert_eq!(map.park(4, &writer).unwrap(), Park::Parked);
    // The merge may not copy while the pinned writer is in flight.
    assert!(!merge.is_drained());
    let (merger_wakes, merger) = counting();
    assert_eq!(merge.poll_drained(&merger), Park::Parked);
    let merge = merge
        .finish()
        .expect_err("finish before drain must be refused");
    drop(pin);
    assert_eq!(merger_wakes.0.load(Ordering::SeqCst), 1);
    assert!(merge.is_drained());
    assert!(matches!(merge.poll_drained(&merger), Park::Ready(_)));
    // The writer was woken too (shard-wide), found MERGING again and re-parks.
    assert_eq!(writer_wakes.0.load(Ordering::SeqCst), 1);
    assert_eq!(map.park(4, &writer).unwrap(), Park::Parked);
    merge.finish().unwrap();
    assert_eq!(writer_wakes.0.load(Ordering::SeqCst), 2);
    assert_eq!(map.lookup(4).unwrap().state(), State::Unmapped);
    assert_eq!(map.mapped_count(), 0);
    assert!(matches!(map.begin_merge(4).unwrap(), BeginMerge::Unmapped));
}

#[test]
fn aborted_merge_returns_to_mapped() {
    let map = BlockMap::new(64).unwrap();
    fill(&map, 4, 40);
    let BeginMerge::Started(merge) = map.begin_merge(4).unwrap() else {
        panic!()
    };
    let (wakes, waker) = counting();
    assert_eq!(map.park(4, &waker).unwrap(), Park::Parked);
    drop(merge);
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    assert_eq!(map.lookup(4).unwrap().state(), State::Mapped(40));
    assert_eq!(map.mapped_count(), 1);
}

#[test]
fn pins_saturate_into_busy_not_overflow() {
    let map = BlockMap::new(64).unwrap();
    fill(&map, 2, 20);
    let mut pins = Vec::new();
    for _ in 0..MAX_PINS {
        let Claim::Mapped(pin) = map.claim(2).unwrap() else {
            panic!()
        };
        pins.push(pin);
    }
    assert_eq!(map.lookup(2).unwrap().pins(), MAX_PINS);
    assert!(matches!(map.claim(2).unwrap(), Claim::Busy(_)));
    let (wakes, waker) = counting();
    assert_eq!(map.park(2, &waker).unwrap(), Park::Parked);
    pins.pop();
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    assert!(matches!(map.claim(2).unwrap(), Claim::Mapped(_)));
    drop(pins);
    let entry = map.lookup(2).unwrap();
    assert_eq!(
        (entry.pins(), entry.has_waiters(), entry.state()),
        (0, false, State::Mapped(20))
    );
}

#[test]
fn guards_can_hold_an_arc_and_move_threads() {
    let map = Arc::new(BlockMap::new(64).unwrap());
    let Claim::Fill(guard) = BlockMap::claim_shared(&map, 1).unwrap() else {
        panic!()
    };
    std::thread::spawn(move || guard.publish(11).unwrap())
        .join()
        .unwrap();
    let BeginMerge::Started(merge) = BlockMap::begin_merge_shared(&map, 1).unwrap() else {
        panic!()
    };
    std::thread::spawn(move || merge.finish().unwrap())
        .join()
        .unwrap();
    assert_eq!(map.lookup(1).unwrap().state(), State::Unmapped);
}

#[test]
fn iterator_and_ranges_respect_bounds_and_skip_holes() {
    let map = BlockMap::new(1 << 30).unwrap();
    for chunk in [0, 1, 2, 31, 32, 33, 100, 1 << 20, (1 << 30) - 1] {
        fill(&map, chunk, chunk + 1000);
    }
    let Claim::Fill(pending) = map.claim(3).unwrap() else {
        panic!()
    };
    let all: Vec<u64> = map.iter(0, u64::MAX).map(|(c, _)| c).collect();
    assert_eq!(all, [0, 1, 2, 31, 32, 33, 100, 1 << 20, (1 << 30) - 1]);
    assert_eq!(
        map.iter(2, 33)
            .map(|(c, e)| (c, e.physical().unwrap()))
            .collect::<Vec<_>>(),
        [(2, 1002), (31, 1031), (32, 1032)]
    );
    assert_eq!(
        map.ranges(0, u64::MAX).collect::<Vec<_>>(),
        [
            0..3,
            31..34,
            100..101,
            1 << 20..(1 << 20) + 1,
            (1 << 30) - 1..1 << 30
        ]
    );
    assert_eq!(map.ranges(1, 32).collect::<Vec<_>>(), [1..3, 31..32]);
    assert_eq!(map.ranges(34, 100).count(), 0);
    assert_eq!(map.iter(50, 10).count(), 0);
    pending.abort();
}

#[test]
fn memory_grows_with_what_is_mapped() {
    let sparse = BlockMap::new(1 << 30).unwrap();
    let empty = sparse.memory_bytes();
    assert!(empty < 16 << 10, "empty map costs {empty} bytes");
    fill(&sparse, 123_456_789, 1);
    let one = sparse.memory_bytes();
    assert!(one > empty && one < empty + (16 << 10), "{empty} -> {one}");

    let dense = BlockMap::new(1 << 20).unwrap();
    for chunk in 0..1 << 20 {
        fill(&dense, chunk, chunk);
    }
    let per_chunk = dense.memory_bytes() as f64 / f64::from(1 << 20);
    assert!(per_chunk <= 10.0, "{per_chunk} bytes per mapped chunk");
}

#[test]
fn records_round_trip_through_the_loader() {
    let map = BlockMap::new(1 << 20).unwrap();
    for chunk in (0..5000).step_by(7) {
        fill(&map, chunk, chunk * 3);
    }
    let mut bytes = Vec::new();
    for record in map.records() {
        record.encode(&mut bytes);
    }
    let mut decoded = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (record, used) = ringblk_blockmap::MapRecord::decode(&bytes[at..]).unwrap();
        decoded.push(record);
        at += used;
    }
    let loaded = BlockMap::from_records(1 << 20, decoded).unwrap();
    assert!(loaded.iter(0, u64::MAX).eq(map.iter(0, u64::MAX)));
    assert_eq!(loaded.mapped_count(), map.mapped_count());
}
