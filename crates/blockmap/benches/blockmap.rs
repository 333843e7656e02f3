//! Block map benchmarks, against `RwLock<HashMap>` and `DashMap` on the same
//! workloads. Run: `cargo bench -p ringblk-blockmap -- --warm-up-time 1 --measurement-time 2`.
//!
//! Prints a memory table (bytes per mapped chunk) first, then criterion groups:
//! lookup (hit/miss; random keys one by one, batched and prefetched), install,
//! iteration, and 1- vs 2-thread throughput at 10 % writes. Figures, not
//! assertions: the targets live in the issue, the numbers in the report.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
use ringblk_blockmap::{BlockMap, Claim, Entry, Error};

/// Chunks pre-mapped for the lookup and mixed workloads: 1 Mi chunks = a 4 GiB
/// volume fully written at 4 KiB chunks (8 MiB of leaves: beyond L2).
const DENSE: u64 = 1 << 20;
/// A small working set that stays in cache.
const HOT: u64 = 4096;
/// A 1 TiB volume of 4 KiB chunks (a 3-level tree).
const CAPACITY: u64 = 1 << 28;
/// Fresh chunks for the mixed workload's installs: one region per thread above
/// `DENSE`, never exhausted within a bench run.
const FRESH_REGION: u64 = 1 << 28;

/// xorshift64*: cheap enough not to dominate a 5 ns operation.
struct Rng(u64);

impl Rng {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn install(map: &BlockMap, chunk: u64, physical: u64) {
    match map.claim(chunk) {
        Ok(Claim::Fill(fill)) => fill.publish(physical).expect("physical fits"),
        other => panic!("chunk {chunk} not fresh: {other:?}"),
    }
}

fn dense_map(n: u64) -> BlockMap {
    let map = BlockMap::new(CAPACITY).expect("capacity");
    for chunk in 0..n {
        install(&map, chunk, chunk + 7);
    }
    map
}

fn dense_hashmap(n: u64) -> RwLock<HashMap<u64, u64>> {
    RwLock::new((0..n).map(|c| (c, c + 7)).collect())
}

fn dense_dashmap(n: u64) -> DashMap<u64, u64> {
    (0..n).map(|c| (c, c + 7)).collect()
}

fn memory_report() {
    println!("memory: bytes per mapped chunk");
    println!(
        "{:<44} {:>10} {:>14} {:>10}",
        "pattern", "mapped", "bytes", "B/chunk"
    );
    let patterns: [(&str, u64, u64); 7] = [
        ("dense 0..1Mi", DENSE, 1),
        ("dense 0..1Mi+16 (slab rounding)", DENSE + 16, 1),
        ("dense 0..64Ki (small volume)", 1 << 16, 1),
        ("dense 0..64Ki+16 (slab rounding)", (1 << 16) + 16, 1),
        ("every 4th chunk (1Mi/4)", DENSE / 4, 4),
        ("every 32nd chunk (one per leaf)", DENSE / 32, 32),
        ("every 64Ki-th chunk (very sparse)", 4096, 1 << 16),
    ];
    for (name, count, stride) in patterns {
        let map = BlockMap::new(CAPACITY).expect("capacity");
        for i in 0..count {
            install(&map, i * stride, i);
        }
        let bytes = map.memory_bytes();
        println!(
            "{name:<44} {count:>10} {bytes:>14} {:>10.2}",
            bytes as f64 / count as f64
        );
    }
    // Random 4 KiB writes over a 1 TiB volume (2^28 chunks), 1 % of it written.
    let map = BlockMap::new(1 << 28).expect("capacity");
    let mut rng = Rng(42);
    let mut mapped = 0u64;
    for i in 0..(1u64 << 28) / 100 {
        let chunk = rng.next() % (1 << 28);
        if let Ok(Claim::Fill(fill)) = map.claim(chunk) {
            fill.publish(i).expect("physical fits");
            mapped += 1;
        }
    }
    let bytes = map.memory_bytes();
    println!(
        "{:<44} {mapped:>10} {bytes:>14} {:>10.2}",
        "random 1% of a 1 TiB volume",
        bytes as f64 / mapped as f64
    );
    // The hash maps for comparison (dense 1 Mi): table capacity x (entry + control
    // byte); allocator slack not counted.
    let hash = dense_hashmap(DENSE).into_inner().expect("not poisoned");
    let hash_bytes = hash.capacity() * (16 + 1);
    println!(
        "{:<44} {DENSE:>10} {hash_bytes:>14} {:>10.2}",
        "HashMap<u64,u64> dense 1Mi (approx.)",
        hash_bytes as f64 / DENSE as f64
    );
    let dash = dense_dashmap(DENSE);
    let dash_bytes = dash.capacity() * (16 + 1);
    println!(
        "{:<44} {DENSE:>10} {dash_bytes:>14} {:>10.2}",
        "DashMap<u64,u64> dense 1Mi (approx.)",
        dash_bytes as f64 / DENSE as f64
    );
    println!();
}

fn bench_lookup(c: &mut Criterion) {
    let map = dense_map(DENSE);
    let hash = dense_hashmap(DENSE);
    let dash = dense_dashmap(DENSE);
    let mut group = c.benchmark_group("lookup");
    group.throughput(Throughput::Elements(1));
    // Ranges are powers of two and keys are masked: a `%` would cost as much as
    // the lookup being measured.
    for (name, range) in [("hit_hot4Ki", HOT), ("hit_random1Mi", DENSE)] {
        let mask = range - 1;
        group.bench_function(BenchmarkId::new("blockmap", name), |b| {
            let mut rng = Rng(1);
            b.iter(|| black_box(map.lookup(rng.next() & mask)))
        });
        group.bench_function(BenchmarkId::new("rwlock_hashmap", name), |b| {
            let mut rng = Rng(1);
            b.iter(|| {
                let key = rng.next() & mask;
                black_box(hash.read().expect("not poisoned").get(&key).copied())
            })
        });
        group.bench_function(BenchmarkId::new("dashmap", name), |b| {
            let mut rng = Rng(1);
            b.iter(|| black_box(dash.get(&(rng.next() & mask)).map(|v| *v)))
        });
    }
    // The lookups above are independent: each key comes from the RNG, never from
    // a previous lookup's result, so the CPU overlaps several of them (a
    // throughput figure, with the RNG's ~1 ns inside the timed loop). Three more
    // variants make that explicit: the RNG alone, keys from a precomputed array
    // (what criterion users usually do: pure lookup throughput), and a chain in
    // which each key depends on the previous lookup's result (latency-bound).
    group.bench_function(BenchmarkId::new("rng_only", "random1Mi"), |b| {
        let mut rng = Rng(1);
        b.iter(|| black_box(rng.next() & (DENSE - 1)))
    });
    // 1 Mi keys: every cache line of the 8 MiB of leaves is touched between two
    // uses of a key (a short array would shrink the working set), as `u32` so that
    // streaming the array (4 MiB, sequential) costs little next to the lookups.
    let keys: Vec<u32> = {
        let mut rng = Rng(7);
        (0..DENSE)
            .map(|_| (rng.next() & (DENSE - 1)) as u32)
            .collect()
    };
    group.bench_function(BenchmarkId::new("blockmap", "hit_random1Mi_keys"), |b| {
        let mut i = 0usize;
        b.iter(|| {
            let key = u64::from(keys[i & (keys.len() - 1)]);
            i += 1;
            black_box(map.lookup(key))
        })
    });
    // The same keys through `lookup_batch`, `BATCH` at a time (64: the batch
    // API's tile; 16 and 32 for comparison), timed per lookup like the others.
    // Copying the `u32` keys into the batch's `u64` array is inside the timing.
    for (name, batch) in [
        ("hit_random1Mi_batch", 64),
        ("hit_random1Mi_batch32", 32),
        ("hit_random1Mi_batch16", 16),
    ] {
        group.bench_function(BenchmarkId::new("blockmap", name), |b| {
            let mut next = 0usize;
            b.iter_custom(|iters| lookup_batches(&map, &keys, batch, iters, &mut next))
        });
    }
    // The public `prefetch` hint PREFETCH_AHEAD keys ahead of a plain `lookup`:
    // two full walks per key (and no overlap of the leaf-pointer miss with the
    // entry miss), so it gains less than the batch API.
    group.bench_function(
        BenchmarkId::new("blockmap", "hit_random1Mi_prefetch"),
        |b| {
            let mut i = 0usize;
            b.iter(|| {
                let mask = keys.len() - 1;
                map.prefetch(u64::from(keys[(i + PREFETCH_AHEAD) & mask]));
                let key = u64::from(keys[i & mask]);
                i += 1;
                black_box(map.lookup(key))
            })
        },
    );
    group.bench_function(BenchmarkId::new("blockmap", "hit_random1Mi_chain"), |b| {
        let mut rng = Rng(1);
        let mut prev = 0u64;
        b.iter(|| {
            let entry = map.lookup((rng.next() ^ prev) & (DENSE - 1));
            // Always 0 (physical indexes here are small), but only known after the
            // load: the next key waits for this lookup.
            prev = entry.as_ref().map_or(1, |e| e.to_bits() >> 63);
            black_box(entry)
        })
    });
    let miss_mask = (1u64 << 27) - 1; // [DENSE, DENSE + 2^27): nothing mapped there
                                      // Misses: past the mapped region, where no leaf exists (the common miss of a
                                      // sparse delta), and inside an allocated leaf.
    let sparse = BlockMap::new(CAPACITY).expect("capacity");
    for i in 0..HOT {
        install(&sparse, i * 64, i);
    }
    group.bench_function(BenchmarkId::new("blockmap", "miss_no_leaf"), |b| {
        let mut rng = Rng(1);
        b.iter(|| black_box(map.lookup(DENSE + (rng.next() & miss_mask))))
    });
    group.bench_function(BenchmarkId::new("blockmap", "miss_in_leaf"), |b| {
        let mut rng = Rng(1);
        b.iter(|| black_box(sparse.lookup((rng.next() & (HOT - 1)) * 64 + 1)))
    });
    group.bench_function(BenchmarkId::new("rwlock_hashmap", "miss"), |b| {
        let mut rng = Rng(1);
        b.iter(|| {
            let key = DENSE + (rng.next() & miss_mask);
            black_box(hash.read().expect("not poisoned").get(&key).copied())
        })
    });
    group.bench_function(BenchmarkId::new("dashmap", "miss"), |b| {
        let mut rng = Rng(1);
        b.iter(|| black_box(dash.get(&(DENSE + (rng.next() & miss_mask))).map(|v| *v)))
    });
    group.finish();
}

/// Keys between `BlockMap::prefetch` and the `lookup` it is for: 8-32 measured
/// alike (BENCHMARKS.md).
const PREFETCH_AHEAD: usize = 16;
/// Largest batch `lookup_batches` takes.
const BATCH_MAX: usize = 64;

/// Time `iters` lookups through `lookup_batch`, `batch` keys at a time (the last
/// batch shorter), continuing through `keys` from `*next`.
fn lookup_batches(
    map: &BlockMap,
    keys: &[u32],
    batch: usize,
    iters: u64,
    next: &mut usize,
) -> Duration {
    assert!(batch <= BATCH_MAX && keys.len() % batch == 0);
    let mut chunks = [0u64; BATCH_MAX];
    let mut out: [Result<Entry, Error>; BATCH_MAX] = std::array::from_fn(|_| Ok(Entry::UNMAPPED));
    // Whole batches from a batch boundary: a short last batch of the previous
    // call leaves `next` in between.
    *next = next.next_multiple_of(batch);
    let mut left = iters;
    let start = Instant::now();
    while left > 0 {
        let len = batch.min(usize::try_from(left).unwrap_or(batch));
        let base = *next & (keys.len() - 1);
        for (chunk, &key) in chunks.iter_mut().zip(&keys[base..base + len]) {
            *chunk = u64::from(key);
        }
        let done = map.lookup_batch(black_box(&chunks[..len]), &mut out[..len]);
        black_box(&out);
        debug_assert_eq!(done, len);
        *next = next.wrapping_add(len);
        left -= len as u64;
    }
    start.elapsed()
}

/// Time `iters` installs of fresh chunks (sequential from `start`, or scattered
/// by `stride`), on a structure built outside the timing.
fn bench_install(c: &mut Criterion) {
    let mut group = c.benchmark_group("install");
    group.throughput(Throughput::Elements(1));
    for (name, stride) in [("sequential", 1u64), ("scattered_stride4Ki", 4096)] {
        group.bench_function(BenchmarkId::new("blockmap", name), |b| {
            b.iter_custom(|iters| {
                let map = BlockMap::new(CAPACITY).expect("capacity");
                let start = Instant::now();
                for i in 0..iters {
                    install(&map, (i * stride) % CAPACITY + (i * stride) / CAPACITY, i);
                }
                let elapsed = start.elapsed();
                drop(black_box(map));
                elapsed
            })
        });
        if stride > 1 {
            // The run above wraps around the 2^28-chunk volume after 64 Ki installs
            // (then installs land next to earlier ones, in existing leaves); here
            // every install is 16 MiB from the last one on a 4 PiB volume: each
            // one allocates its leaf and bottom node.
            group.bench_function(
                BenchmarkId::new("blockmap", format!("{name}_nowrap")),
                |b| {
                    b.iter_custom(|iters| {
                        let map = BlockMap::new(1 << 40).expect("capacity");
                        let start = Instant::now();
                        for i in 0..iters {
                            install(&map, i * stride, i);
                        }
                        let elapsed = start.elapsed();
                        drop(black_box(map));
                        elapsed
                    })
                },
            );
        }
        group.bench_function(BenchmarkId::new("rwlock_hashmap", name), |b| {
            b.iter_custom(|iters| {
                let hash = RwLock::new(HashMap::new());
                let start = Instant::now();
                for i in 0..iters {
                    hash.write().expect("not poisoned").insert(i * stride, i);
                }
                let elapsed = start.elapsed();
                drop(black_box(hash));
                elapsed
            })
        });
        group.bench_function(BenchmarkId::new("dashmap", name), |b| {
            b.iter_custom(|iters| {
                let dash = DashMap::new();
                let start = Instant::now();
                for i in 0..iters {
                    dash.insert(i * stride, i);
                }
                let elapsed = start.elapsed();
                drop(black_box(dash));
                elapsed
            })
        });
    }
    group.finish();
}

fn bench_iter(c: &mut Criterion) {
    let mut group = c.benchmark_group("iterate");
    let dense = dense_map(DENSE);
    group.throughput(Throughput::Elements(DENSE));
    group.bench_function("blockmap/dense_1Mi_per_entry", |b| {
        b.iter(|| black_box(dense.iter(0, u64::MAX).fold(0u64, |acc, (c, _)| acc ^ c)))
    });
    group.bench_function("blockmap/ranges_dense_1Mi", |b| {
        b.iter(|| black_box(dense.ranges(0, u64::MAX).count()))
    });
    let sparse = BlockMap::new(CAPACITY).expect("capacity");
    for i in 0..DENSE / 8 {
        install(&sparse, i * 8, i);
    }
    group.throughput(Throughput::Elements(DENSE / 8));
    group.bench_function("blockmap/every_8th_per_entry", |b| {
        b.iter(|| black_box(sparse.iter(0, u64::MAX).fold(0u64, |acc, (c, _)| acc ^ c)))
    });
    // An ordered walk is what BLOCK_STATUS and merge need; a hash map has to sort.
    let hash = dense_hashmap(DENSE);
    group.throughput(Throughput::Elements(DENSE));
    group.bench_function("rwlock_hashmap/dense_1Mi_sorted", |b| {
        b.iter(|| {
            let guard = hash.read().expect("not poisoned");
            let mut keys: Vec<u64> = guard.keys().copied().collect();
            keys.sort_unstable();
            black_box(keys.len())
        })
    });
    group.finish();
}

/// One structure under the mixed workload.
trait Mixed: Sync {
    fn read(&self, chunk: u64) -> bool;
    fn write(&self, chunk: u64, value: u64);
}

impl Mixed for BlockMap {
    #[inline]
    fn read(&self, chunk: u64) -> bool {
        self.lookup(chunk).is_ok_and(|e| e.has_data())
    }
    #[inline]
    fn write(&self, chunk: u64, value: u64) {
        install(self, chunk, value);
    }
}

impl Mixed for RwLock<HashMap<u64, u64>> {
    #[inline]
    fn read(&self, chunk: u64) -> bool {
        self.read().expect("not poisoned").contains_key(&chunk)
    }
    #[inline]
    fn write(&self, chunk: u64, value: u64) {
        self.write().expect("not poisoned").insert(chunk, value);
    }
}

impl Mixed for DashMap<u64, u64> {
    #[inline]
    fn read(&self, chunk: u64) -> bool {
        self.contains_key(&chunk)
    }
    #[inline]
    fn write(&self, chunk: u64, value: u64) {
        self.insert(chunk, value);
    }
}

/// `threads` threads share `iters` operations: 90 % lookups of random mapped
/// chunks, 10 % installs of fresh chunks (each thread its own fresh range).
/// Wall time from a common start to the last thread's end.
fn run_mixed<M: Mixed>(map: &M, threads: u64, iters: u64, fresh: &[AtomicU64]) -> Duration {
    let barrier = Barrier::new(threads as usize);
    let per_thread = iters.div_ceil(threads);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let next_fresh = &fresh[t as usize];
                s.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9 + t + next_fresh.load(Ordering::Relaxed));
                    let mut fresh = next_fresh.load(Ordering::Relaxed);
                    barrier.wait();
                    let start = Instant::now();
                    let mut hits = 0u64;
                    for _ in 0..per_thread {
                        let r = rng.next();
                        // 10 % writes: the low byte is uniform; 26/256 = 10.2 %.
                        if r & 0xFF < 26 {
                            map.write(fresh, fresh);
                            fresh += 1;
                        } else {
                            hits += u64::from(map.read((r >> 8) & (DENSE - 1)));
                        }
                    }
                    let elapsed = start.elapsed();
                    assert!(
                        fresh < DENSE + (t + 1) * FRESH_REGION,
                        "fresh region exhausted"
                    );
                    next_fresh.store(fresh, Ordering::Relaxed);
                    black_box(hits);
                    elapsed
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .max()
            .unwrap_or_default()
    })
}

fn bench_mixed(c: &mut Criterion) {
    let mut group = c.benchmark_group("mixed_10pct_writes");
    group.throughput(Throughput::Elements(1));
    let fresh_regions = || -> Vec<AtomicU64> {
        (0..2)
            .map(|t| AtomicU64::new(DENSE + t * FRESH_REGION))
            .collect()
    };
    for threads in [1u64, 2] {
        // Fresh structures per run, so every run starts from the same 1 Mi entries.
        let map = BlockMap::new(DENSE + 2 * FRESH_REGION).expect("capacity");
        for chunk in 0..DENSE {
            install(&map, chunk, chunk + 7);
        }
        let fresh = fresh_regions();
        group.bench_function(BenchmarkId::new("blockmap", threads), |b| {
            b.iter_custom(|iters| run_mixed(&map, threads, iters, &fresh))
        });
        drop(map);
        let hash = dense_hashmap(DENSE);
        let fresh = fresh_regions();
        group.bench_function(BenchmarkId::new("rwlock_hashmap", threads), |b| {
            b.iter_custom(|iters| run_mixed(&hash, threads, iters, &fresh))
        });
        drop(hash);
        let dash = dense_dashmap(DENSE);
        let fresh = fresh_regions();
        group.bench_function(BenchmarkId::new("dashmap", threads), |b| {
            b.iter_custom(|iters| run_mixed(&dash, threads, iters, &fresh))
        });
    }
    group.finish();
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs each bench once
    // as a smoke test, where the (slow, 650 MB) memory table is skipped.
    if std::env::args().any(|arg| arg == "--bench") {
        memory_report();
    }
    let mut c = Criterion::default().configure_from_args();
    bench_lookup(&mut c);
    bench_install(&mut c);
    bench_iter(&mut c);
    bench_mixed(&mut c);
    c.final_summary();
}
