//! One request stream — an NBD connection or a vhost-user virtqueue — as the workload
//! sees it: what to issue next and when ([`Issuer`]), what a write carries
//! ([`Issuer::fill_write`]), and what a completion counts for ([`Tally`]); plus the
//! results every transport reports ([`ConnResult`], [`PhaseResult`]).
//!
//! The transports only move bytes: `engine` (NBD sockets on the ringblk reactor) and
//! `vhost` (virtqueues through libblkio) both drive their streams with this module,
//! so a workload, a verify pass and a latency figure mean the same on either.
//!
//! # Latency
//! From the moment a request is issued (or, under `--rate-iops`, from the moment it
//! was *scheduled*: an open-loop client must not hide the server's stalls behind its
//! own waiting — "coordinated omission") to the moment the transport learnt of its
//! completion. Completions before the end of the ramp are not recorded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ringblk_nbd::client::Cmd;
use ringblk_reactor::IdlePolicy;

use crate::pattern::{self, Rng};
use crate::workload::{AddrGen, Mode, Phase};

/// Latency histograms cover 1 ns ..= 100 s at 3 significant digits; slower
/// operations are clamped to 100 s (and still counted).
pub const LATENCY_MAX_NS: u64 = 100_000_000_000;
pub const LATENCY_SIGFIG: u8 = 3;
/// Error descriptions kept per stream (the count is always exact).
pub const SAMPLES_MAX: usize = 16;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, LATENCY_SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// Per-operation-type counts of one stream or a whole phase.
#[derive(Clone, Debug)]
pub struct OpStats {
    pub ops: u64,
    pub bytes: u64,
    pub hist: Histogram<u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            ops: 0,
            bytes: 0,
            hist: new_histogram(),
        }
    }
}

impl OpStats {
    pub fn merge(&mut self, other: &OpStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        // Same bounds on both sides: addition cannot fail.
        let _ = self.hist.add(&other.hist);
    }
}

/// What one stream (connection or queue) did in one phase.
#[derive(Clone, Debug, Default)]
pub struct ConnResult {
    pub read: OpStats,
    pub write: OpStats,
    pub last_completion: Option<Instant>,
    pub io_errors: u64,
    pub error_samples: Vec<String>,
    pub verify_checked: u64,
    pub verify_errors: u64,
    pub verify_samples: Vec<String>,
    pub fatal: Option<String>,
}

/// Counters the progress line reads while the phase runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// Instants every stream of a phase agrees on.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub start: Instant,
    /// Completions before this are not recorded.
    pub ramp_end: Instant,
    /// No request is issued at or after this.
    pub deadline: Option<Instant>,
}

impl Timing {
    pub fn for_phase(phase: &Phase, start: Instant) -> Timing {
        match &phase.mode {
            Mode::Timed { ramp, runtime, .. } => Timing {
                start,
                ramp_end: start + *ramp,
                deadline: runtime.map(|r| start + *ramp + r),
            },
            Mode::Pass { .. } => Timing {
                start,
                ramp_end: start,
                deadline: None,
            },
        }
    }
}

/// Engine knobs that are not part of the workload.
#[derive(Clone, Copy, Debug)]
pub struct EngineOpts {
    /// Reactor threads (NBD); the vhost transport runs one thread per queue.
    pub reactors: usize,
    pub idle: IdlePolicy,
    /// Abort when no operation completes for this long.
    pub stall_timeout: Duration,
}

/// What a stream should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Issue a read (`write == false`) or a write at `offset`; its latency counts from `t0`.
    Issue {
        write: bool,
        offset: u64,
        t0: Instant,
    },
    /// Rate-limited: nothing may be issued before this instant.
    Wait(Instant),
    /// The stream issues nothing more in this phase.
    Stop,
}

/// The workload side of one stream: the stop rules (deadline, byte budget, end of a
/// verify pass), the rate limit, the address generator and the read/write mix.
pub struct Issuer {
    phase: Arc<Phase>,
    deadline: Option<Instant>,
    gen: AddrGen,
    rng: Rng,
    budget: Option<u64>,
    interval: Option<Duration>,
    next_due: Instant,
    issuing: bool,
    /// What plain (non-verify) writes carry, stamped per block.
    filler: Vec<u8>,
}

impl Issuer {
    pub fn new(phase: &Arc<Phase>, idx: usize, timing: &Timing) -> Issuer {
        let mut rng = Rng::new(phase.seed ^ (idx as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let filler: Vec<u8> = if phase.read_pct < 100 {
            (0..phase.bs).map(|_| rng.next_u64() as u8).collect()
        } else {
            Vec::new()
        };
        Issuer {
            deadline: timing.deadline,
            gen: AddrGen::for_conn(phase, idx),
            rng,
            budget: phase.budget_bytes(idx),
            interval: phase.interval(),
            next_due: timing.start,
            issuing: true,
            filler,
            phase: phase.clone(),
        }
    }

    /// False once a stop rule fired (or [`Issuer::stop`] was called).
    pub fn issuing(&self) -> bool {
        self.issuing
    }

    /// Issues nothing more (the stream failed).
    pub fn stop(&mut self) {
        self.issuing = false;
    }

    pub fn next(&mut self, now: Instant) -> Next {
        let bs = u64::from(self.phase.bs);
        if !self.issuing {
            return Next::Stop;
        }
        if self.deadline.is_some_and(|d| now >= d) || self.budget.is_some_and(|b| b < bs) {
            self.issuing = false;
            return Next::Stop;
        }
        let t0 = match self.interval {
            Some(iv) => {
                if now < self.next_due {
                    return Next::Wait(self.next_due);
                }
                let due = self.next_due;
                self.next_due += iv;
                due
            }
            None => now,
        };
        let Some(block) = self.gen.next(&mut self.rng) else {
            self.issuing = false;
            return Next::Stop;
        };
        let write = match self.phase.read_pct {
            100 => false,
            0 => true,
            pct => self.rng.below(100) >= u64::from(pct),
        };
        if let Some(b) = self.budget.as_mut() {
            *b -= bs;
        }
        Next::Issue {
            write,
            offset: self.phase.region_offset + block * bs,
            t0,
        }
    }

    /// Fills `buf` (one block of the phase's size) with what a write at `offset`
    /// carries: the verify pattern in verify phases, else the stamped filler.
    pub fn fill_write(&self, buf: &mut [u8], offset: u64) {
        match self.phase.verify_seed {
            Some(seed) => pattern::fill_verify(buf, offset, seed),
            None => {
                let n = buf.len().min(self.filler.len());
                buf[..n].copy_from_slice(&self.filler[..n]);
                pattern::stamp_load(buf, offset, self.phase.seed);
            }
        }
    }
}

/// How one request ended, as the transport saw it.
pub enum Outcome<'a> {
    /// Success; a read's data (empty for other commands).
    Ok(&'a [u8]),
    /// The device or server failed it; the description names the error.
    Err(String),
}

/// The completion side of one stream: counts, verify checks and latency.
pub struct Tally {
    pub result: ConnResult,
    phase: Arc<Phase>,
    ramp_end: Instant,
    progress: Arc<Progress>,
}

impl Tally {
    pub fn new(phase: &Arc<Phase>, timing: &Timing, progress: &Arc<Progress>) -> Tally {
        Tally {
            result: ConnResult::default(),
            phase: phase.clone(),
            ramp_end: timing.ramp_end,
            progress: progress.clone(),
        }
    }

    /// Records one completed request; returns the bytes it moved (0 if it failed).
    /// The caller adds ops and bytes to the progress counters (in batches).
    pub fn complete(
        &mut self,
        cmd: Cmd,
        offset: u64,
        len: u32,
        t0: Instant,
        now: Instant,
        outcome: Outcome<'_>,
    ) -> u64 {
        let res = &mut self.result;
        let payload = match outcome {
            Outcome::Err(why) => {
                res.io_errors += 1;
                self.progress.errors.fetch_add(1, Ordering::Relaxed);
                if res.error_samples.len() < SAMPLES_MAX {
                    res.error_samples
                        .push(format!("{cmd:?} at offset {offset} length {len}: {why}"));
                }
                return 0;
            }
            Outcome::Ok(p) => p,
        };
        if cmd == Cmd::Read {
            if let Some(seed) = self.phase.verify_seed {
                res.verify_checked += 1;
                if let Err(m) = pattern::check_verify(payload, offset, seed) {
                    res.verify_errors += 1;
                    self.progress.errors.fetch_add(1, Ordering::Relaxed);
                    if res.verify_samples.len() < SAMPLES_MAX {
                        res.verify_samples
                            .push(format!("block at offset {offset}: {m}"));
                    }
                }
            }
        }
        // FLUSH is housekeeping at the end of a phase, not part of the workload.
        if now >= self.ramp_end && cmd != Cmd::Flush {
            let ns = now.saturating_duration_since(t0).as_nanos();
            let ns = (ns as u64).clamp(1, LATENCY_MAX_NS);
            let st = match cmd {
                Cmd::Write => &mut res.write,
                _ => &mut res.read,
            };
            st.ops += 1;
            st.bytes += u64::from(len);
            st.hist.saturating_record(ns);
            res.last_completion = Some(now);
        }
        u64::from(len)
    }

    /// The stream cannot go on: keeps the first reason.
    pub fn fatal(&mut self, why: String) {
        if self.result.fatal.is_none() {
            self.result.fatal = Some(why);
            self.progress.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The result of one phase over all streams.
#[derive(Clone, Debug)]
pub struct PhaseResult {
    pub phase: Arc<Phase>,
    pub read: OpStats,
    pub write: OpStats,
    /// From the end of the ramp to the last recorded completion.
    pub measured: Duration,
    pub io_errors: u64,
    pub error_samples: Vec<String>,
    pub verify_checked: u64,
    pub verify_errors: u64,
    pub verify_samples: Vec<String>,
    pub fatal: Vec<String>,
}

impl PhaseResult {
    pub fn new(phase: Arc<Phase>) -> PhaseResult {
        PhaseResult {
            phase,
            read: OpStats::default(),
            write: OpStats::default(),
            measured: Duration::ZERO,
            io_errors: 0,
            error_samples: Vec::new(),
            verify_checked: 0,
            verify_errors: 0,
            verify_samples: Vec::new(),
            fatal: Vec::new(),
        }
    }

    pub fn total(&self) -> OpStats {
        let mut t = self.read.clone();
        t.merge(&self.write);
        t
    }

    /// Adds stream `idx`'s result; `what` names streams in samples ("conn", "queue").
    pub fn merge_stream(&mut self, what: &str, idx: usize, c: ConnResult) {
        self.read.merge(&c.read);
        self.write.merge(&c.write);
        self.io_errors += c.io_errors;
        self.verify_checked += c.verify_checked;
        self.verify_errors += c.verify_errors;
        let room = |v: &Vec<String>| v.len() < SAMPLES_MAX;
        for s in c.error_samples {
            if room(&self.error_samples) {
                self.error_samples.push(format!("{what} {idx}: {s}"));
            }
        }
        for s in c.verify_samples {
            if room(&self.verify_samples) {
                self.verify_samples.push(format!("{what} {idx}: {s}"));
            }
        }
        if let Some(f) = c.fatal {
            self.fatal.push(format!("{what} {idx}: {f}"));
        }
    }

    /// Sets `measured` from the last recorded completion of any stream.
    pub fn finish(&mut self, timing: &Timing, last_completion: Option<Instant>) {
        self.measured = last_completion
            .map(|l| l.saturating_duration_since(timing.ramp_end))
            .unwrap_or_default();
    }
}
