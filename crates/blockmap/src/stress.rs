//! Multi-threaded stress test with invariant checks, and its negative control.
//!
//! Threads hammer a small set of hot chunks (so that claims, pins, merges and
//! parking collide) with a simulated data store: every write adds 1 to its
//! chunk's value, a fill read-merges the value from "below", a merge copies it
//! down. The checker then knows what a lost write, a second fill owner, a merge
//! copying under a writer, a torn or foreign entry, a lost wake-up or a counter
//! drift look like, and counts each. The negative control plants a bug (a claim
//! that checks and then stores instead of CAS-ing) and requires the checker to
//! notice: a checker that cannot fail proves nothing.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::entry::{state_bits, with_state, writer_busy, MAPPED, MERGING, PENDING, UNMAPPED};
use crate::{BeginMerge, BlockMap, Claim, Park};

/// Test-only faults a map can be told to exhibit.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    claim_without_cas: AtomicBool,
    batch_stale_link: AtomicBool,
}

impl Faults {
    pub(crate) fn claim_without_cas(&self) -> bool {
        self.claim_without_cas.load(Ordering::Relaxed)
    }

    /// `lookup_batch`'s second pass reads the link found for the previous chunk
    /// of its tile: the negative control of the batch tests in `map.rs`.
    pub(crate) fn batch_stale_link(&self) -> bool {
        self.batch_stale_link.load(Ordering::Relaxed)
    }

    pub(crate) fn plant_batch_stale_link(&self) {
        self.batch_stale_link.store(true, Ordering::Relaxed);
    }
}

/// The planted bug: check-then-act. Returns true if it "won" an UNMAPPED chunk.
pub(crate) fn racy_claim_wins(entry: &crate::sync::AtomicU64) -> bool {
    let word = entry.load(Ordering::Acquire);
    if state_bits(word) != UNMAPPED {
        return false;
    }
    thread::yield_now(); // widen the window the bug lives in
    entry.store(with_state(word, PENDING), Ordering::Release);
    true
}

/// Few chunks, so operations collide; 20..44 straddles the boundary of the first
/// two 32-entry leaves, so the first writes also race to allocate leaves.
const HOT_CHUNKS: u64 = 24;
const FIRST_CHUNK: u64 = 20;

struct ThreadWaker {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

#[derive(Default, Debug)]
struct Violations {
    double_owner: AtomicU64,
    copy_under_writer: AtomicU64,
    foreign_entry: AtomicU64,
    finish_refused: AtomicU64,
    lost_wakeup: AtomicU64,
    iter_order: AtomicU64,
    lost_write: AtomicU64,
    counter_drift: AtomicU64,
    leftover_state: AtomicU64,
    panics: AtomicU64,
}

impl Violations {
    fn total(&self) -> u64 {
        [
            &self.double_owner,
            &self.copy_under_writer,
            &self.foreign_entry,
            &self.finish_refused,
            &self.lost_wakeup,
            &self.iter_order,
            &self.lost_write,
            &self.counter_drift,
            &self.leftover_state,
            &self.panics,
        ]
        .iter()
        .map(|v| v.load(Ordering::Relaxed))
        .sum()
    }
}

/// Everything the threads share besides the map: the simulated data store.
struct World {
    map: BlockMap,
    /// Per chunk: exclusive owners (fill or merge) right now; must be 0 or 1.
    owners: Vec<AtomicU32>,
    /// Per chunk: in-place writers right now.
    writers: Vec<AtomicU32>,
    /// Per chunk: writes acknowledged so far (each adds 1 to the chunk's value).
    acked: Vec<AtomicU64>,
    /// Per chunk: the value in the layer below.
    below: Vec<AtomicU64>,
    /// Per physical chunk: its value, and which logical chunk (+1) it belongs to.
    data: Vec<AtomicU64>,
    owner_of: Vec<AtomicU64>,
    next_physical: AtomicU64,
    stop: AtomicBool,
    bad: Violations,
    ops: AtomicU64,
    /// How often the wait paths ran (to show the test exercises them).
    parked: AtomicU64,
    merges_finished: AtomicU64,
}

impl World {
    fn violation(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        if self.map.faults.claim_without_cas() {
            // The negative control needs only one; stop before the broken state
            // snowballs.
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Worker<'w> {
    world: &'w World,
    rng: Rng,
    waker: Waker,
    signal: Arc<ThreadWaker>,
}

impl Worker<'_> {
    fn index(chunk: u64) -> usize {
        (chunk - FIRST_CHUNK) as usize
    }

    /// Park on `chunk` until woken; a lost wake-up is a chunk that stays not-busy
    /// for seconds without our waker firing.
    fn wait(&self, chunk: u64, parked: impl FnOnce(&Waker) -> Park) {
        self.signal.woken.store(false, Ordering::Relaxed);
        if let Park::Ready(_) = parked(&self.waker) {
            return;
        }
        self.world.parked.fetch_add(1, Ordering::Relaxed);
        let mut idle_since: Option<Instant> = None;
        while !self.signal.woken.swap(false, Ordering::Acquire) {
            if self.world.stop.load(Ordering::Relaxed) {
                return;
            }
            thread::park_timeout(Duration::from_millis(50));
            let busy = self
                .world
                .map
                .lookup(chunk)
                .map(|e| writer_busy(e.to_bits()) || e.pins() != 0);
            match (busy, idle_since) {
                (Ok(true), _) => idle_since = None,
                (_, None) => idle_since = Some(Instant::now()),
                (_, Some(t)) if t.elapsed() > Duration::from_secs(3) => {
                    if !self.signal.woken.load(Ordering::Acquire) {
                        self.world.violation(&self.world.bad.lost_wakeup);
                    }
                    return;
                }
                _ => {}
            }
        }
    }

    fn lookup(&mut self, chunk: u64) {
        let w = self.world;
        let Ok(entry) = w.map.lookup(chunk) else {
            return w.violation(&w.bad.foreign_entry);
        };
        if let Some(p) = entry.physical() {
            // Acquire on the lookup: the filler's owner_of store is visible.
            if w.owner_of
                .get(p as usize)
                .map(|o| o.load(Ordering::Relaxed))
                != Some(chunk + 1)
            {
                w.violation(&w.bad.foreign_entry);
            }
        }
    }

    fn write(&mut self, chunk: u64, abort_fill: bool) {
        let w = self.world;
        let i = Self::index(chunk);
        loop {
            if w.stop.load(Ordering::Relaxed) {
                return;
            }
            match w.map.claim(chunk) {
                Ok(Claim::Fill(fill)) => {
                    if w.owners[i].fetch_add(1, Ordering::AcqRel) != 0 {
                        w.violation(&w.bad.double_owner);
                        std::mem::forget(fill); // state is broken; keep it out of asserts
                        w.owners[i].fetch_sub(1, Ordering::AcqRel);
                        return;
                    }
                    let p = w.next_physical.fetch_add(1, Ordering::Relaxed);
                    if abort_fill || p as usize >= w.data.len() {
                        w.owners[i].fetch_sub(1, Ordering::AcqRel);
                        fill.abort();
                        return;
                    }
                    // Read-merge from below, then the write itself.
                    let value = w.below[i].load(Ordering::Acquire) + 1;
                    w.data[p as usize].store(value, Ordering::Relaxed);
                    w.owner_of[p as usize].store(chunk + 1, Ordering::Relaxed);
                    w.owners[i].fetch_sub(1, Ordering::AcqRel);
                    if fill.publish(p).is_err() {
                        return w.violation(&w.bad.foreign_entry);
                    }
                    w.acked[i].fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Claim::Mapped(pin)) => {
                    w.writers[i].fetch_add(1, Ordering::AcqRel);
                    w.data[pin.physical() as usize].fetch_add(1, Ordering::Relaxed);
                    w.writers[i].fetch_sub(1, Ordering::AcqRel);
                    drop(pin);
                    w.acked[i].fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Claim::Busy(_)) => self.wait(chunk, |waker| {
                    w.map
                        .park(chunk, waker)
                        .unwrap_or(Park::Ready(crate::Entry::UNMAPPED))
                }),
                Err(_) => return w.violation(&w.bad.foreign_entry),
            }
        }
    }

    fn merge(&mut self, chunk: u64, abort: bool) {
        let w = self.world;
        let i = Self::index(chunk);
        let merge = match w.map.begin_merge(chunk) {
            Ok(BeginMerge::Started(merge)) => merge,
            Ok(BeginMerge::Busy(_)) => {
                // Exercise the wait path too; do not retry (merges are opportunistic).
                return self.wait(chunk, |waker| {
                    w.map
                        .park(chunk, waker)
                        .unwrap_or(Park::Ready(crate::Entry::UNMAPPED))
                });
            }
            Ok(BeginMerge::Unmapped) => return,
            Err(_) => return w.violation(&w.bad.foreign_entry),
        };
        if w.owners[i].fetch_add(1, Ordering::AcqRel) != 0 {
            w.violation(&w.bad.double_owner);
            std::mem::forget(merge);
            w.owners[i].fetch_sub(1, Ordering::AcqRel);
            return;
        }
        if abort {
            w.owners[i].fetch_sub(1, Ordering::AcqRel);
            merge.abort();
            return;
        }
        while !merge.is_drained() {
            self.wait(chunk, |waker| merge.poll_drained(waker));
            if w.stop.load(Ordering::Relaxed) {
                w.owners[i].fetch_sub(1, Ordering::AcqRel);
                return; // drop = abort
            }
        }
        if w.writers[i].load(Ordering::Acquire) != 0 {
            w.violation(&w.bad.copy_under_writer);
        }
        let value = w.data[merge.physical() as usize].load(Ordering::Relaxed);
        w.below[i].store(value, Ordering::Release);
        w.owners[i].fetch_sub(1, Ordering::AcqRel);
        match merge.finish() {
            Ok(()) => {
                w.merges_finished.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => w.violation(&w.bad.finish_refused),
        }
    }

    fn iterate(&mut self) {
        let w = self.world;
        let mut last = None;
        for (chunk, entry) in w.map.iter(0, u64::MAX) {
            if last.is_some_and(|l| l >= chunk)
                || !entry.has_data()
                || !(FIRST_CHUNK..FIRST_CHUNK + HOT_CHUNKS).contains(&chunk)
            {
                w.violation(&w.bad.iter_order);
            }
            last = Some(chunk);
        }
    }

    fn run(&mut self, ops: u64) {
        let w = self.world;
        for done in 0..ops {
            if w.stop.load(Ordering::Relaxed) {
                break;
            }
            let chunk = FIRST_CHUNK + self.rng.below(HOT_CHUNKS);
            match self.rng.below(1000) {
                0 => self.iterate(),
                1..=599 => self.lookup(chunk),
                600..=849 => self.write(chunk, false),
                850..=879 => self.write(chunk, true),
                880..=979 => self.merge(chunk, false),
                _ => self.merge(chunk, true),
            }
            if done % 1024 == 0 {
                w.ops.fetch_add(1024, Ordering::Relaxed);
            }
        }
    }
}

/// Run `threads` workers for `ops_per_thread` operations each, then check the
/// quiescent state. Returns the world so callers can read the violations.
fn run_stress(threads: usize, ops_per_thread: u64, plant_racy_claim: bool) -> Arc<World> {
    let n = HOT_CHUNKS as usize;
    // Fills are ~8 % of operations; a fill beyond this is aborted, not an error.
    let physical = (threads as u64 * ops_per_thread / 8 + 4096) as usize;
    let world = Arc::new(World {
        map: BlockMap::new(4096).unwrap(),
        owners: (0..n).map(|_| AtomicU32::new(0)).collect(),
        writers: (0..n).map(|_| AtomicU32::new(0)).collect(),
        acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
        below: (0..n).map(|_| AtomicU64::new(0)).collect(),
        data: (0..physical).map(|_| AtomicU64::new(0)).collect(),
        owner_of: (0..physical).map(|_| AtomicU64::new(0)).collect(),
        next_physical: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        bad: Violations::default(),
        ops: AtomicU64::new(0),
        parked: AtomicU64::new(0),
        merges_finished: AtomicU64::new(0),
    });
    world
        .map
        .faults
        .claim_without_cas
        .store(plant_racy_claim, Ordering::Relaxed);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let world = Arc::clone(&world);
            thread::spawn(move || {
                let signal = Arc::new(ThreadWaker {
                    thread: thread::current(),
                    woken: AtomicBool::new(false),
                });
                let mut worker = Worker {
                    world: &world,
                    rng: Rng(
                        0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)
                    ),
                    waker: Waker::from(Arc::clone(&signal)),
                    signal,
                };
                worker.run(ops_per_thread);
            })
        })
        .collect();
    for handle in handles {
        if handle.join().is_err() {
            // A debug_assert inside the map fired: an invariant check too.
            world.bad.panics.fetch_add(1, Ordering::Relaxed);
        }
    }
    check_quiescent(&world);
    world
}

fn check_quiescent(w: &World) {
    for (i, chunk) in (FIRST_CHUNK..FIRST_CHUNK + HOT_CHUNKS).enumerate() {
        let entry = w.map.lookup(chunk).unwrap();
        let word = entry.to_bits();
        let value = match state_bits(word) {
            MAPPED => w.data[entry.physical().unwrap() as usize].load(Ordering::Relaxed),
            UNMAPPED => w.below[i].load(Ordering::Relaxed),
            PENDING | MERGING => {
                w.violation(&w.bad.leftover_state);
                continue;
            }
            _ => unreachable!(),
        };
        if entry.pins() != 0 || entry.has_waiters() {
            w.violation(&w.bad.leftover_state);
        }
        if value != w.acked[i].load(Ordering::Relaxed) {
            w.violation(&w.bad.lost_write);
        }
    }
    let by_iter = w.map.iter(0, u64::MAX).count() as u64;
    if w.map.mapped_count() != by_iter || w.map.count_mapped_slow() != by_iter {
        w.violation(&w.bad.counter_drift);
    }
}

fn ops_per_thread() -> u64 {
    // Millions of operations in release; debug builds are ~10x slower per op.
    if cfg!(debug_assertions) {
        2_000_000
    } else {
        8_000_000
    }
}

#[test]
fn stress_three_threads_hot_chunks_no_violation() {
    let start = Instant::now();
    let world = run_stress(3, ops_per_thread(), false);
    eprintln!(
        "stress: {} ops in {:?}: {} fills, {} merges, {} parks; violations: {:?}",
        world.ops.load(Ordering::Relaxed),
        start.elapsed(),
        world.next_physical.load(Ordering::Relaxed),
        world.merges_finished.load(Ordering::Relaxed),
        world.parked.load(Ordering::Relaxed),
        world.bad
    );
    assert_eq!(world.bad.total(), 0, "{:?}", world.bad);
    assert!(world.acked.iter().all(|a| a.load(Ordering::Relaxed) > 0));
    assert!(
        world.parked.load(Ordering::Relaxed) > 0,
        "the wait path never ran"
    );
}

/// Negative control: with a claim that does not CAS, two writers can both "win" a
/// fill, and the checker must say so. Guards against a checker that cannot fail.
#[test]
fn stress_negative_control_catches_a_claim_without_cas() {
    let world = run_stress(3, ops_per_thread() / 2, true);
    eprintln!("negative control violations: {:?}", world.bad);
    assert!(
        world.bad.total() > 0,
        "the planted racy claim went unnoticed"
    );
}
