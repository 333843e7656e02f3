//! Results as people and scripts read them: the table, the JSON document, and the
//! numbers both are made of (so they cannot disagree).
//!
//! Latencies are reported in microseconds; MB/s is 10^6 bytes per second (fio's
//! "MB/s"); IOPS count completions recorded after the ramp, over the time from the
//! end of the ramp to the last recorded completion.

use std::io::{self, Write};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stream::{OpStats, PhaseResult};

/// Percentiles in the table and JSON, with their column names.
pub const PERCENTILES: [(f64, &str); 5] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (99.99, "p99.99"),
];

#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub stddev: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    #[serde(rename = "p99.99")]
    pub p99_99: f64,
    pub max: f64,
}

impl Latency {
    /// From a histogram recorded in nanoseconds.
    pub fn from_ns(h: &Histogram<u64>) -> Latency {
        let us = |v: u64| v as f64 / 1000.0;
        if h.is_empty() {
            return Latency {
                min: 0.0,
                mean: 0.0,
                stddev: 0.0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                p99_99: 0.0,
                max: 0.0,
            };
        }
        let p = |pct: f64| us(h.value_at_percentile(pct));
        Latency {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            stddev: h.stdev() / 1000.0,
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            p99_9: p(99.9),
            p99_99: p(99.99),
            max: us(h.max()),
        }
    }

    pub fn percentiles(&self) -> [f64; 5] {
        [self.p50, self.p90, self.p99, self.p99_9, self.p99_99]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    pub ops: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mb_s: f64,
    pub latency_us: Latency,
}

impl OpReport {
    pub fn new(op: &'static str, s: &OpStats, seconds: f64) -> OpReport {
        let per_s = |v: f64| if seconds > 0.0 { v / seconds } else { 0.0 };
        OpReport {
            op,
            ops: s.ops,
            bytes: s.bytes,
            iops: per_s(s.ops as f64),
            mb_s: per_s(s.bytes as f64) / 1e6,
            latency_us: Latency::from_ns(&s.hist),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub seed: u64,
    pub blocks_checked: u64,
    pub errors: u64,
    pub samples: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhaseReport {
    pub phase: String,
    pub seconds: f64,
    /// `read`, `write` (those that ran) and `total` when both did.
    pub ops: Vec<OpReport>,
    pub io_errors: u64,
    pub io_error_samples: Vec<String>,
    pub verify: Option<VerifyReport>,
    pub connection_errors: Vec<String>,
}

impl PhaseReport {
    pub fn new(r: &PhaseResult) -> PhaseReport {
        let secs = r.measured.as_secs_f64();
        let mut ops = Vec::new();
        if r.read.ops > 0 {
            ops.push(OpReport::new("read", &r.read, secs));
        }
        if r.write.ops > 0 {
            ops.push(OpReport::new("write", &r.write, secs));
        }
        if r.read.ops > 0 && r.write.ops > 0 {
            ops.push(OpReport::new("total", &r.total(), secs));
        }
        PhaseReport {
            phase: r.phase.name.clone(),
            seconds: secs,
            ops,
            io_errors: r.io_errors,
            io_error_samples: r.error_samples.clone(),
            // Only phases that read check anything.
            verify: r
                .phase
                .verify_seed
                .filter(|_| r.phase.read_pct > 0)
                .map(|seed| VerifyReport {
                    seed,
                    blocks_checked: r.verify_checked,
                    errors: r.verify_errors,
                    samples: r.verify_samples.clone(),
                }),
            connection_errors: r.fatal.clone(),
        }
    }

    pub fn failed(&self) -> bool {
        self.io_errors > 0
            || !self.connection_errors.is_empty()
            || self.verify.as_ref().is_some_and(|v| v.errors > 0)
    }
}

/// The whole run, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub tool: &'static str,
    pub version: &'static str,
    /// The NBD URI, or `vhost-user:SOCKET`.
    pub uri: String,
    /// `nbd` or `vhost-user-blk`.
    pub transport: &'static str,
    pub workload: String,
    pub bs: u32,
    pub iodepth: u32,
    pub connections: usize,
    pub reactors: usize,
    pub export_size: u64,
    pub region_offset: u64,
    pub region_bytes: u64,
    pub phases: Vec<PhaseReport>,
    pub ok: bool,
}

/// Latency with the precision the histogram has (3 significant digits).
pub fn fmt_us(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Prints the human table of a run.
pub fn print_table(run: &RunReport, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{} bs={} iodepth={} {}={} on {} (region {} bytes at {})",
        run.workload,
        run.bs,
        run.iodepth,
        if run.transport == "nbd" {
            "connections"
        } else {
            "queues"
        },
        run.connections,
        run.uri,
        run.region_bytes,
        run.region_offset
    )?;
    for ph in &run.phases {
        writeln!(out)?;
        writeln!(out, "phase {} ({:.2} s measured)", ph.phase, ph.seconds)?;
        write!(out, "{:<6} {:>10} {:>9}", "op", "IOPS", "MB/s")?;
        for (_, name) in PERCENTILES {
            write!(out, " {:>8}", name)?;
        }
        writeln!(out, " {:>8}   (latency in µs)", "max")?;
        for op in &ph.ops {
            write!(
                out,
                "{:<6} {:>10} {:>9}",
                op.op,
                fmt_rate(op.iops),
                fmt_rate(op.mb_s)
            )?;
            for v in op.latency_us.percentiles() {
                write!(out, " {:>8}", fmt_us(v))?;
            }
            writeln!(out, " {:>8}", fmt_us(op.latency_us.max))?;
        }
        if ph.ops.is_empty() {
            writeln!(out, "(no operation completed in the measured window)")?;
        }
        if let Some(v) = &ph.verify {
            writeln!(
                out,
                "verify: {} block(s) checked, {} error(s) (seed {})",
                v.blocks_checked, v.errors, v.seed
            )?;
            for s in &v.samples {
                writeln!(out, "  {s}")?;
            }
        }
        if ph.io_errors > 0 {
            writeln!(out, "I/O errors: {}", ph.io_errors)?;
            for s in &ph.io_error_samples {
                writeln!(out, "  {s}")?;
            }
        }
        for e in &ph.connection_errors {
            writeln!(out, "connection error: {e}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_formatting_keeps_three_digits() {
        assert_eq!(fmt_us(1.2345), "1.23");
        assert_eq!(fmt_us(25.087), "25.1");
        assert_eq!(fmt_us(1234.9), "1235");
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        let h = crate::stream::new_histogram();
        let l = Latency::from_ns(&h);
        assert_eq!(l.max, 0.0);
        assert_eq!(l.percentiles(), [0.0; 5]);
    }
}
