//! What a run does: the phase description shared by every connection, and the
//! per-connection address generators.
//!
//! # Regions
//! The region `[offset, offset + range)` is cut into `bs`-sized blocks. Random
//! workloads pick blocks uniformly over the whole region on every connection.
//! Sequential workloads and verify passes give connection `i` of `n` its own
//! contiguous slice `[blocks*i/n, blocks*(i+1)/n)`, so connections never overlap and
//! each streams like fio's `offset_increment` jobs.
//!
//! # Verify passes
//! A pass touches every block of the slice exactly once, in order for sequential
//! workloads and in a seed-determined permutation for random ones (an LCG over the
//! next power of two with cycle walking: O(1) memory for any region). The read pass
//! rotates the slices by one connection so that every block is read back through a
//! different connection from the one that wrote it (when there are several).

use std::time::Duration;

use crate::pattern::Rng;

/// The fio-style workload names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Randread,
    Randwrite,
    Randrw,
    Read,
    Write,
    /// Sequential mixed reads and writes (fio's `rw`).
    Rw,
}

impl Workload {
    pub fn random(self) -> bool {
        matches!(
            self,
            Workload::Randread | Workload::Randwrite | Workload::Randrw
        )
    }

    /// Percentage of reads given the `--rwmix-read` value for mixed workloads.
    pub fn read_pct(self, rwmix_read: u32) -> u32 {
        match self {
            Workload::Randread | Workload::Read => 100,
            Workload::Randwrite | Workload::Write => 0,
            Workload::Randrw | Workload::Rw => rwmix_read.min(100),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Randrw => "randrw",
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Rw => "rw",
        }
    }
}

/// How a phase ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Runs for `ramp + runtime` (if set) or until `bytes_total` were issued (if set),
    /// whichever comes first. Completions during the ramp are not recorded.
    Timed {
        ramp: Duration,
        runtime: Option<Duration>,
        bytes_total: Option<u64>,
    },
    /// One pass over every block of the region (verify mode). `rotate` shifts the
    /// slice each connection takes.
    Pass { rotate: usize },
}

/// One phase of a run: everything a connection needs, shared read-only.
#[derive(Clone, Debug)]
pub struct Phase {
    pub name: String,
    pub random: bool,
    pub read_pct: u32,
    pub bs: u32,
    pub iodepth: u32,
    pub region_offset: u64,
    pub region_blocks: u64,
    pub connections: usize,
    pub mode: Mode,
    /// Total across all connections.
    pub rate_iops: Option<u64>,
    pub seed: u64,
    /// `Some(seed)`: writes carry the verify pattern, reads are checked against it.
    pub verify_seed: Option<u64>,
    /// Send `NBD_CMD_FLUSH` on every connection before disconnecting (verify writes:
    /// what the read pass checks was made durable, as the spec's FLUSH promises).
    pub flush_at_end: bool,
}

impl Phase {
    /// The slice of blocks connection `conn` owns in sequential and pass modes.
    pub fn slice(&self, conn: usize) -> (u64, u64) {
        let n = self.connections.max(1) as u64;
        let i = match self.mode {
            Mode::Pass { rotate } => ((conn + rotate) % self.connections.max(1)) as u64,
            Mode::Timed { .. } => conn as u64,
        };
        let b = self.region_blocks;
        // u128: blocks * i cannot overflow for any u64 region.
        let at = |k: u64| (u128::from(b) * u128::from(k) / u128::from(n)) as u64;
        (at(i), at(i + 1))
    }

    /// The gap between two requests of one connection under `--rate-iops`.
    pub fn interval(&self) -> Option<Duration> {
        let rate = self.rate_iops.filter(|r| *r > 0)?;
        let per_conn = rate as f64 / self.connections.max(1) as f64;
        Some(Duration::from_secs_f64(1.0 / per_conn))
    }

    /// Bytes connection `conn` may issue under `--size` (the total split evenly, the
    /// remainder of whole blocks to the first connections).
    pub fn budget_bytes(&self, conn: usize) -> Option<u64> {
        let Mode::Timed {
            bytes_total: Some(total),
            ..
        } = self.mode
        else {
            return None;
        };
        let bs = u64::from(self.bs);
        let blocks = total.div_ceil(bs);
        let n = self.connections.max(1) as u64;
        let mine = blocks / n + u64::from((conn as u64) < blocks % n);
        Some(mine * bs)
    }
}

/// Yields block indexes (relative to the region) for one connection.
#[derive(Clone, Debug)]
pub enum AddrGen {
    Random { blocks: u64 },
    Sequential { lo: u64, hi: u64, next: u64 },
    Pass(Permutation),
    PassSequential { next: u64, hi: u64 },
}

impl AddrGen {
    pub fn for_conn(phase: &Phase, conn: usize) -> AddrGen {
        let (lo, hi) = phase.slice(conn);
        match (&phase.mode, phase.random) {
            (Mode::Pass { .. }, true) => AddrGen::Pass(Permutation::new(
                lo,
                hi,
                phase.seed ^ (conn as u64).wrapping_mul(0x9E37_79B9),
            )),
            (Mode::Pass { .. }, false) => AddrGen::PassSequential { next: lo, hi },
            (Mode::Timed { .. }, true) => AddrGen::Random {
                blocks: phase.region_blocks,
            },
            (Mode::Timed { .. }, false) => AddrGen::Sequential { lo, hi, next: lo },
        }
    }

    /// The next block, or `None` when a pass is complete (or the slice is empty).
    pub fn next(&mut self, rng: &mut Rng) -> Option<u64> {
        match self {
            AddrGen::Random { blocks } => (*blocks > 0).then(|| rng.below(*blocks)),
            AddrGen::Sequential { lo, hi, next } => {
                if lo >= hi {
                    return None;
                }
                let b = *next;
                *next = if b + 1 >= *hi { *lo } else { b + 1 };
                Some(b)
            }
            AddrGen::PassSequential { next, hi } => {
                let b = *next;
                (b < *hi).then(|| {
                    *next += 1;
                    b
                })
            }
            AddrGen::Pass(p) => p.next(),
        }
    }
}

/// Knuth's MMIX multiplier forced to ≡ 1 (mod 4).
const LCG_MUL: u64 = (0x5851_F42D_4C95_7F2D & !3) | 1;

/// Every value of `lo..hi` exactly once, in a scrambled order.
#[derive(Clone, Debug)]
pub struct Permutation {
    lo: u64,
    n: u64,
    mask: u64,
    x: u64,
    c: u64,
    emitted: u64,
}

impl Permutation {
    pub fn new(lo: u64, hi: u64, seed: u64) -> Permutation {
        let n = hi.saturating_sub(lo);
        let m = n.max(1).next_power_of_two();
        let mut r = Rng::new(seed);
        Permutation {
            lo,
            n,
            mask: m - 1,
            x: r.next_u64() & (m - 1),
            // An odd increment and a multiplier ≡ 1 (mod 4) give the LCG full period
            // modulo a power of two (Hull–Dobell).
            c: r.next_u64() | 1,
            emitted: 0,
        }
    }

    fn next(&mut self) -> Option<u64> {
        if self.emitted >= self.n {
            return None;
        }
        // Cycle walking: at most m - n < n values are skipped per full period.
        loop {
            self.x = self.x.wrapping_mul(LCG_MUL).wrapping_add(self.c) & self.mask;
            if self.x < self.n {
                self.emitted += 1;
                return Some(self.lo + self.x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(mode: Mode, random: bool, blocks: u64, conns: usize) -> Phase {
        Phase {
            name: "t".into(),
            random,
            read_pct: 100,
            bs: 4096,
            iodepth: 4,
            region_offset: 0,
            region_blocks: blocks,
            connections: conns,
            mode,
            rate_iops: None,
            seed: 1,
            verify_seed: None,
            flush_at_end: false,
        }
    }

    #[test]
    fn permutation_visits_each_block_once() {
        for (lo, hi) in [(0, 1), (5, 6), (0, 7), (10, 1034), (0, 4096), (3, 3)] {
            let mut p = Permutation::new(lo, hi, 99);
            let mut seen: Vec<u64> = std::iter::from_fn(|| p.next()).collect();
            let scrambled = seen.windows(2).any(|w| w[1] != w[0] + 1);
            seen.sort_unstable();
            assert_eq!(seen, (lo..hi).collect::<Vec<_>>(), "{lo}..{hi}");
            if hi - lo > 16 {
                assert!(scrambled, "random passes must not be sequential");
            }
        }
    }

    #[test]
    fn pass_slices_cover_the_region_and_rotate() {
        let write = phase(Mode::Pass { rotate: 0 }, true, 1000, 3);
        let read = phase(Mode::Pass { rotate: 1 }, true, 1000, 3);
        let mut all = Vec::new();
        for c in 0..3 {
            let mut g = AddrGen::for_conn(&write, c);
            let mut rng = Rng::new(0);
            all.extend(std::iter::from_fn(|| g.next(&mut rng)));
            assert_eq!(read.slice(c), write.slice((c + 1) % 3));
        }
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn sequential_wraps_inside_its_slice() {
        let p = phase(
            Mode::Timed {
                ramp: Duration::ZERO,
                runtime: None,
                bytes_total: None,
            },
            false,
            10,
            2,
        );
        let mut g = AddrGen::for_conn(&p, 1);
        let mut rng = Rng::new(0);
        let got: Vec<u64> = (0..7).filter_map(|_| g.next(&mut rng)).collect();
        assert_eq!(got, vec![5, 6, 7, 8, 9, 5, 6]);
    }

    #[test]
    fn budget_splits_whole_blocks() {
        let p = phase(
            Mode::Timed {
                ramp: Duration::ZERO,
                runtime: None,
                bytes_total: Some(4096 * 10 + 1),
            },
            true,
            100,
            3,
        );
        let b: Vec<u64> = (0..3).filter_map(|c| p.budget_bytes(c)).collect();
        assert_eq!(b, vec![4 * 4096, 4 * 4096, 3 * 4096]);
        assert_eq!(
            phase(Mode::Pass { rotate: 0 }, true, 1, 1).budget_bytes(0),
            None
        );
    }

    #[test]
    fn rate_is_split_over_connections() {
        let mut p = phase(Mode::Pass { rotate: 0 }, true, 1, 4);
        p.rate_iops = Some(1000);
        assert_eq!(p.interval(), Some(Duration::from_millis(4)));
        p.rate_iops = Some(0);
        assert_eq!(p.interval(), None);
    }
}
