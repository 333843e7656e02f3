//! proptest: random operation sequences against a `BTreeMap` model — states, pins,
//! counts, wake-ups, the iterator and ranges, growth, records — plus the decoder
//! on garbage. Guards against any divergence of the lock-free map from the plain
//! sequential meaning of its operations.
#![cfg(not(loom))]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use proptest::prelude::*;
use ringblk_blockmap::{
    BeginMerge, BlockMap, Claim, Entry, FillGuard, MapRecord, MergeGuard, Park, State, WritePin,
};

#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Pending,
    Mapped(u64),
    Merging(u64),
}

#[derive(Clone, Copy, Debug)]
struct ModelEntry {
    kind: Kind,
    pins: u32,
}

#[derive(Clone, Debug)]
enum Op {
    Fill { chunk: u64, physical: u64 },
    Claim { chunk: u64 },
    Publish { index: usize, physical: u64 },
    AbortFill { index: usize },
    Unpin { index: usize },
    BeginMerge { chunk: u64 },
    PollDrained { index: usize },
    FinishMerge { index: usize },
    AbortMerge { index: usize },
    Park { chunk: u64 },
    Lookup { chunk: u64 },
    Iter { from: u64, to: u64 },
    Ranges { from: u64, to: u64 },
    Grow { extra: u64 },
}

const CHUNKS: u64 = 400; // chunk indexes drawn from here; capacity starts lower

fn chunk() -> impl Strategy<Value = u64> {
    // Mostly a dense little region (collisions), sometimes anywhere (holes, errors).
    prop_oneof![3 => 0..48u64, 1 => 0..CHUNKS]
}

fn op() -> impl Strategy<Value = Op> {
    let index = any::<prop::sample::Index>().prop_map(|i| i.index(1 << 16));
    prop_oneof![
        4 => (chunk(), 0..1u64 << 20).prop_map(|(chunk, physical)| Op::Fill { chunk, physical }),
        3 => chunk().prop_map(|chunk| Op::Claim { chunk }),
        2 => (index.clone(), 0..1u64 << 20).prop_map(|(index, physical)| Op::Publish { index, physical }),
        1 => index.clone().prop_map(|index| Op::AbortFill { index }),
        2 => index.clone().prop_map(|index| Op::Unpin { index }),
        2 => chunk().prop_map(|chunk| Op::BeginMerge { chunk }),
        1 => index.clone().prop_map(|index| Op::PollDrained { index }),
        2 => index.clone().prop_map(|index| Op::FinishMerge { index }),
        1 => index.prop_map(|index| Op::AbortMerge { index }),
        2 => chunk().prop_map(|chunk| Op::Park { chunk }),
        3 => chunk().prop_map(|chunk| Op::Lookup { chunk }),
        1 => (0..CHUNKS + 10, 0..CHUNKS + 10).prop_map(|(from, to)| Op::Iter { from, to }),
        1 => (0..CHUNKS + 10, 0..CHUNKS + 10).prop_map(|(from, to)| Op::Ranges { from, to }),
        1 => (0..200u64).prop_map(|extra| Op::Grow { extra }),
    ]
}

struct Harness<'m> {
    map: &'m BlockMap,
    model: BTreeMap<u64, ModelEntry>,
    capacity: u64,
    fills: Vec<FillGuard<&'m BlockMap>>,
    pins: Vec<WritePin<&'m BlockMap>>,
    merges: Vec<MergeGuard<&'m BlockMap>>,
    /// Wakers registered per chunk and not yet woken.
    parked: BTreeMap<u64, Vec<Arc<CountingWaker>>>,
}

impl<'m> Harness<'m> {
    fn expected_state(&self, chunk: u64) -> State {
        match self.model.get(&chunk).map(|e| e.kind) {
            None => State::Unmapped,
            Some(Kind::Pending) => State::Pending,
            Some(Kind::Mapped(p)) => State::Mapped(p),
            Some(Kind::Merging(p)) => State::Merging(p),
        }
    }

    fn writer_busy(&self, chunk: u64) -> bool {
        match self.model.get(&chunk) {
            Some(ModelEntry {
                kind: Kind::Mapped(_),
                pins,
            }) => *pins == ringblk_blockmap::MAX_PINS,
            Some(_) => true,
            None => false,
        }
    }

    /// A transition that clears WAITERS happened on `chunk`: everyone parked on it
    /// must have been woken.
    fn assert_woken(&mut self, chunk: u64) {
        for waker in self.parked.remove(&chunk).unwrap_or_default() {
            assert!(
                waker.0.load(Ordering::SeqCst) > 0,
                "lost wake-up on chunk {chunk}"
            );
        }
    }

    fn mapped(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.model.iter().filter_map(|(&c, e)| match e.kind {
            Kind::Mapped(p) | Kind::Merging(p) => Some((c, p)),
            Kind::Pending => None,
        })
    }

    /// `lookup_batch` of the chunks around `chunk` (three tiles' worth, so tile
    /// boundaries fall inside; beyond the capacity too), checked against the model.
    /// Run with every `Lookup` op rather than as an op of its own, so that the
    /// seeds in `model.proptest-regressions` still generate the cases they
    /// recorded.
    fn check_batch_around(&self, chunk: u64) {
        let chunks: Vec<u64> = (chunk.saturating_sub(70)..chunk + 70).collect();
        let mut out = vec![Ok(Entry::UNMAPPED); chunks.len()];
        assert_eq!(self.map.lookup_batch(&chunks, &mut out), chunks.len());
        for (&chunk, entry) in chunks.iter().zip(out) {
            if self.in_range(chunk, entry.is_ok()) {
                let entry = entry.unwrap();
                assert_eq!(entry.state(), self.expected_state(chunk), "chunk {chunk}");
                assert_eq!(entry.pins(), self.model.get(&chunk).map_or(0, |e| e.pins));
            }
        }
    }

    fn in_range(&self, chunk: u64, result_is_ok: bool) -> bool {
        assert_eq!(
            result_is_ok,
            chunk < self.capacity,
            "range check for chunk {chunk}"
        );
        result_is_ok
    }

    fn apply(&mut self, op: Op) {
        let map = self.map;
        match op {
            Op::Fill { chunk, physical } => {
                let claim = map.claim(chunk);
                if !self.in_range(chunk, claim.is_ok()) {
                    return;
                }
                match (claim.unwrap(), self.model.get(&chunk).copied()) {
                    (Claim::Fill(fill), None) => {
                        fill.publish(physical).unwrap();
                        self.model.insert(
                            chunk,
                            ModelEntry {
                                kind: Kind::Mapped(physical),
                                pins: 0,
                            },
                        );
                    }
                    (
                        Claim::Mapped(pin),
                        Some(ModelEntry {
                            kind: Kind::Mapped(p),
                            ..
                        }),
                    ) => {
                        assert_eq!(pin.physical(), p);
                    }
                    (Claim::Busy(e), Some(_)) => {
                        assert!(self.writer_busy(chunk));
                        assert_eq!(e.state(), self.expected_state(chunk));
                    }
                    (got, want) => panic!("claim {chunk}: got {got:?}, model {want:?}"),
                }
            }
            Op::Claim { chunk } => {
                let claim = map.claim(chunk);
                if !self.in_range(chunk, claim.is_ok()) {
                    return;
                }
                match (claim.unwrap(), self.model.get_mut(&chunk)) {
                    (Claim::Fill(fill), None) => {
                        self.fills.push(fill);
                        self.model.insert(
                            chunk,
                            ModelEntry {
                                kind: Kind::Pending,
                                pins: 0,
                            },
                        );
                    }
                    (Claim::Mapped(pin), Some(e)) => {
                        assert_eq!(e.kind, Kind::Mapped(pin.physical()));
                        e.pins += 1;
                        self.pins.push(pin);
                    }
                    (Claim::Busy(_), Some(_)) => assert!(self.writer_busy(chunk)),
                    (got, want) => panic!("claim {chunk}: got {got:?}, model {want:?}"),
                }
            }
            Op::Publish { index, physical } => {
                if self.fills.is_empty() {
                    return;
                }
                let fill = self.fills.swap_remove(index % self.fills.len());
                let chunk = fill.chunk();
                fill.publish(physical).unwrap();
                self.model.insert(
                    chunk,
                    ModelEntry {
                        kind: Kind::Mapped(physical),
                        pins: 0,
                    },
                );
                self.assert_woken(chunk);
            }
            Op::AbortFill { index } => {
                if self.fills.is_empty() {
                    return;
                }
                let fill = self.fills.swap_remove(index % self.fills.len());
                let chunk = fill.chunk();
                drop(fill);
                self.model.remove(&chunk);
                self.assert_woken(chunk);
            }
            Op::Unpin { index } => {
                if self.pins.is_empty() {
                    return;
                }
                let pin = self.pins.swap_remove(index % self.pins.len());
                let chunk = pin.chunk();
                drop(pin);
                let entry = self.model.get_mut(&chunk).unwrap();
                entry.pins -= 1;
                if entry.pins == 0 {
                    self.assert_woken(chunk);
                }
            }
            Op::BeginMerge { chunk } => {
                let begun = map.begin_merge(chunk);
                if !self.in_range(chunk, begun.is_ok()) {
                    return;
                }
                match (begun.unwrap(), self.model.get_mut(&chunk)) {
                    (BeginMerge::Started(merge), Some(e)) => {
                        assert_eq!(e.kind, Kind::Mapped(merge.physical()));
                        e.kind = Kind::Merging(merge.physical());
                        self.merges.push(merge);
                    }
                    (BeginMerge::Unmapped, None) => {}
                    (BeginMerge::Busy(_), Some(e)) => {
                        assert!(matches!(e.kind, Kind::Pending | Kind::Merging(_)));
                    }
                    (got, want) => panic!("begin_merge {chunk}: got {got:?}, model {want:?}"),
                }
            }
            Op::PollDrained { index } => {
                if self.merges.is_empty() {
                    return;
                }
                let merge = &self.merges[index % self.merges.len()];
                let chunk = merge.chunk();
                let drained = self.model[&chunk].pins == 0;
                assert_eq!(merge.is_drained(), drained);
                let waker = Arc::new(CountingWaker::default());
                match merge.poll_drained(&Waker::from(Arc::clone(&waker))) {
                    Park::Ready(_) => assert!(drained),
                    Park::Parked => {
                        assert!(!drained);
                        self.parked.entry(chunk).or_default().push(waker);
                    }
                }
            }
            Op::FinishMerge { index } => {
                if self.merges.is_empty() {
                    return;
                }
                let merge = self.merges.swap_remove(index % self.merges.len());
                let chunk = merge.chunk();
                match merge.finish() {
                    Ok(()) => {
                        assert_eq!(self.model[&chunk].pins, 0);
                        self.model.remove(&chunk);
                        self.assert_woken(chunk);
                    }
                    Err(merge) => {
                        assert_ne!(self.model[&chunk].pins, 0);
                        self.merges.push(merge);
                    }
                }
            }
            Op::AbortMerge { index } => {
                if self.merges.is_empty() {
                    return;
                }
                let merge = self.merges.swap_remove(index % self.merges.len());
                let (chunk, physical) = (merge.chunk(), merge.physical());
                merge.abort();
                self.model.get_mut(&chunk).unwrap().kind = Kind::Mapped(physical);
                self.assert_woken(chunk);
            }
            Op::Park { chunk } => {
                let waker = Arc::new(CountingWaker::default());
                let parked = map.park(chunk, &Waker::from(Arc::clone(&waker)));
                if !self.in_range(chunk, parked.is_ok()) {
                    return;
                }
                match parked.unwrap() {
                    Park::Ready(e) => {
                        assert!(!self.writer_busy(chunk));
                        assert_eq!(e.state(), self.expected_state(chunk));
                    }
                    Park::Parked => {
                        assert!(self.writer_busy(chunk));
                        self.parked.entry(chunk).or_default().push(waker);
                    }
                }
            }
            Op::Lookup { chunk } => {
                let entry = map.lookup(chunk);
                if self.in_range(chunk, entry.is_ok()) {
                    let entry = entry.unwrap();
                    assert_eq!(entry.state(), self.expected_state(chunk));
                    assert_eq!(entry.pins(), self.model.get(&chunk).map_or(0, |e| e.pins));
                }
                self.check_batch_around(chunk);
            }
            Op::Iter { from, to } => {
                let got: Vec<(u64, u64)> = map
                    .iter(from, to)
                    .map(|(c, e)| (c, e.physical().unwrap()))
                    .collect();
                let want: Vec<(u64, u64)> = self
                    .mapped()
                    .filter(|&(c, _)| c >= from && c < to.min(self.capacity))
                    .collect();
                assert_eq!(got, want, "iter({from}, {to})");
            }
            Op::Ranges { from, to } => {
                let got: Vec<_> = map.ranges(from, to).collect();
                let mut want: Vec<std::ops::Range<u64>> = Vec::new();
                for (c, _) in self.mapped().filter(|&(c, _)| c >= from && c < to) {
                    match want.last_mut() {
                        Some(run) if run.end == c => run.end += 1,
                        _ => want.push(c..c + 1),
                    }
                }
                assert_eq!(got, want, "ranges({from}, {to})");
            }
            Op::Grow { extra } => {
                self.capacity += extra;
                map.grow(self.capacity).unwrap();
                assert_eq!(map.capacity(), self.capacity);
            }
        }
        assert_eq!(map.mapped_count(), self.mapped().count() as u64);
    }
}

/// A chunk of a large map, often just around a node boundary (bottom nodes cover
/// 2^10 chunks, upper nodes 2^20 and 2^30), so that walks cross nodes and levels.
fn far_chunk() -> impl Strategy<Value = u64> {
    let near = |shift: u32| (1..12u64, 0..40u64).prop_map(move |(r, o)| (r << shift) + o - 20);
    prop_oneof![near(10), near(20), near(30), 0..(1u64 << 34)]
}

// 256 cases by default (proptest's default; `PROPTEST_CASES=5000` for a deeper run).
proptest! {
    /// Guards against: iterators or ranges skipping or repeating chunks where the
    /// walk moves to another leaf, bottom node or upper node, in a tall (possibly
    /// grown) tree. The main model uses few chunks, all under one bottom node.
    #[test]
    fn iteration_across_nodes_matches_model(
        chunks in prop::collection::vec(far_chunk(), 1..200),
        unmaps in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        bounds in prop::collection::vec((far_chunk(), far_chunk()), 1..20),
        grown in any::<bool>(),
    ) {
        let capacity = 1u64 << 34;
        let map = if grown {
            let map = BlockMap::new(1000).unwrap();
            map.grow(capacity).unwrap();
            map
        } else {
            BlockMap::new(capacity).unwrap()
        };
        let mut model = BTreeMap::new();
        for (physical, &chunk) in chunks.iter().enumerate() {
            match map.claim(chunk).unwrap() {
                Claim::Fill(fill) => {
                    fill.publish(physical as u64).unwrap();
                    model.insert(chunk, physical as u64);
                }
                Claim::Mapped(pin) => {
                    prop_assert_eq!(Some(pin.physical()), model.get(&chunk).copied())
                }
                Claim::Busy(entry) => panic!("nothing is in flight: {entry:?}"),
            }
        }
        for index in unmaps {
            let Some(&chunk) = model.keys().nth(index.index(model.len().max(1))) else {
                break;
            };
            let BeginMerge::Started(merge) = map.begin_merge(chunk).unwrap() else {
                panic!("mapped")
            };
            merge.finish().unwrap();
            model.remove(&chunk);
        }
        let all: Vec<(u64, u64)> =
            map.iter(0, u64::MAX).map(|(c, e)| (c, e.physical().unwrap())).collect();
        prop_assert_eq!(all, model.iter().map(|(&c, &p)| (c, p)).collect::<Vec<_>>());
        for (from, to) in bounds {
            let got: Vec<u64> = map.iter(from, to).map(|(c, _)| c).collect();
            let want: Vec<u64> = if from < to {
                model.range(from..to).map(|(&c, _)| c).collect()
            } else {
                Vec::new()
            };
            prop_assert_eq!(&got, &want, "iter({}, {})", from, to);
            let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
            for c in want {
                match runs.last_mut() {
                    Some(run) if run.end == c => run.end += 1,
                    _ => runs.push(c..c + 1),
                }
            }
            let got_runs: Vec<_> = map.ranges(from, to).collect();
            prop_assert_eq!(got_runs, runs, "ranges({}, {})", from, to);
        }
        prop_assert_eq!(map.mapped_count(), model.len() as u64);
    }

    #[test]
    fn map_matches_btreemap_model(initial in 1..CHUNKS, ops in prop::collection::vec(op(), 1..250)) {
        let map = BlockMap::new(initial).unwrap();
        let mut h = Harness {
            map: &map,
            model: BTreeMap::new(),
            capacity: initial,
            fills: Vec::new(),
            pins: Vec::new(),
            merges: Vec::new(),
            parked: BTreeMap::new(),
        };
        for op in ops {
            h.apply(op);
        }
        // A checkpoint of the final state replays to the same mapping.
        let mapped: Vec<(u64, u64)> = h.mapped().collect();
        let loaded = BlockMap::from_records(h.capacity, map.records()).unwrap();
        let replayed: Vec<(u64, u64)> =
            loaded.iter(0, u64::MAX).map(|(c, e)| (c, e.physical().unwrap())).collect();
        prop_assert_eq!(replayed, mapped);
        // Dropping the guards ends every transient state and wakes every waiter.
        let chunks: Vec<u64> = h.parked.keys().copied().collect();
        h.fills.clear();
        h.pins.clear();
        h.merges.clear();
        for chunk in chunks {
            h.assert_woken(chunk);
        }
        for (chunk, _) in h.model.iter().filter(|(_, e)| e.kind == Kind::Pending) {
            prop_assert_eq!(map.lookup(*chunk).unwrap().state(), State::Unmapped);
        }
    }

    #[test]
    fn records_round_trip(records in prop::collection::vec(
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(logical, physical)| MapRecord::Install { logical, physical }),
            any::<u64>().prop_map(|logical| MapRecord::Unmap { logical }),
        ], 0..50)) {
        let mut bytes = Vec::new();
        for r in &records {
            r.encode(&mut bytes);
        }
        let mut at = 0;
        for r in &records {
            let (got, used) = MapRecord::decode(&bytes[at..]).unwrap();
            prop_assert_eq!(&got, r);
            prop_assert_eq!(used, r.encoded_len());
            at += used;
        }
        prop_assert_eq!(at, bytes.len());
    }

    #[test]
    fn decode_never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok((record, used)) = MapRecord::decode(&bytes) {
            prop_assert!(used <= bytes.len() && used == record.encoded_len());
            let mut again = Vec::new();
            record.encode(&mut again);
            prop_assert_eq!(&again[..], &bytes[..used]);
        }
    }

    #[test]
    fn loader_never_panics_on_arbitrary_records(records in prop::collection::vec(
        prop_oneof![
            (0..100u64, prop_oneof![0..100u64, any::<u64>()]).prop_map(|(logical, physical)| MapRecord::Install { logical, physical }),
            (0..100u64).prop_map(|logical| MapRecord::Unmap { logical }),
        ], 0..60)) {
        let _ = BlockMap::from_records(90, records);
    }
}
