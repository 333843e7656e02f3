//! HdrHistogram percentile-distribution text (`.hgrm`): the output of Java's
//! `Histogram.outputPercentileDistribution` and `HistogramLogProcessor`, which
//! HdrHistogram's plotter and most latency tooling read.
//!
//! # Format
//! ```text
//!        Value     Percentile TotalCount 1/(1-Percentile)
//!
//!       12.223 0.000000000000          1           1.00
//!       ...
//!      131.071 1.000000000000      40000
//! #[Mean    =       25.118, StdDeviation   =        6.012]
//! #[Max     =      131.071, Total count    =        40000]
//! #[Buckets =           27, SubBuckets     =         2048]
//! ```
//! Rows come from the percentile iterator with 5 ticks per half distance (Java's
//! default); values are divided by the output scaling ratio (1000: recorded in ns,
//! written in µs) and printed with as many decimals as the histogram has significant
//! digits, as Java does.
//!
//! # Reading it back
//! A row at percentile `q` holds exactly the histogram's value at `q`. A percentile
//! that falls between two rows is answered with the next row up, so it lies within
//! the two rows around it — that is the precision the file keeps.

use std::io::{self, Write};

use hdrhistogram::Histogram;

/// Java's default for `outputPercentileDistribution`.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// `subBucketCount` as Java computes it from the significant digits (the Rust crate
/// keeps it private).
fn sub_bucket_count(sigfig: u8) -> u64 {
    let largest_single_unit = 2 * 10u64.pow(u32::from(sigfig));
    let magnitude = (largest_single_unit as f64).log2().ceil() as u32;
    1 << magnitude.max(1)
}

/// Writes `h` as `.hgrm` text, values divided by `scale`.
pub fn write(h: &Histogram<u64>, scale: f64, out: &mut impl Write) -> io::Result<()> {
    let d = usize::from(h.sigfig());
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    if !h.is_empty() {
        let mut total = 0u64;
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = v.value_iterated_to() as f64 / scale;
            if q < 1.0 {
                writeln!(
                    out,
                    "{value:12.d$} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                )?;
            } else {
                writeln!(out, "{value:12.d$} {q:2.12} {total:10}")?;
            }
        }
    }
    let (mean, sd, max) = if !h.is_empty() {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    } else {
        (0.0, 0.0, 0.0)
    };
    writeln!(
        out,
        "#[Mean    = {mean:12.d$}, StdDeviation   = {sd:12.d$}]"
    )?;
    writeln!(
        out,
        "#[Max     = {max:12.d$}, Total count    = {:12}]",
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    )
}

/// One data row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub value: f64,
    /// 0.0 ..= 1.0
    pub quantile: f64,
    pub total_count: u64,
}

/// A parsed `.hgrm` file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hgrm {
    pub rows: Vec<Row>,
    pub mean: Option<f64>,
    pub stddev: Option<f64>,
    pub max: Option<f64>,
    pub total_count: Option<u64>,
}

/// Most rows accepted (a real file has a few hundred at most).
pub const ROWS_MAX: usize = 1_000_000;

fn footer_number(line: &str, key: &str) -> Option<f64> {
    let at = line.find(key)? + key.len();
    let rest = line[at..].trim_start().strip_prefix('=')?;
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+'))
        .collect();
    num.parse().ok()
}

/// Parses `.hgrm` text. Tolerates files without a footer (as converted from other
/// tools), but not rows out of order.
pub fn parse(text: &str) -> Result<Hgrm, String> {
    let mut h = Hgrm::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("Value") {
            continue;
        }
        if line.starts_with('#') {
            h.mean = h.mean.or(footer_number(line, "Mean"));
            h.stddev = h.stddev.or(footer_number(line, "StdDeviation"));
            h.max = h.max.or(footer_number(line, "Max"));
            h.total_count = h
                .total_count
                .or(footer_number(line, "Total count").map(|v| v as u64));
            continue;
        }
        let mut f = line.split_whitespace();
        let bad = || format!("line {}: not an .hgrm row: {line:?}", n + 1);
        let value: f64 = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let quantile: f64 = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let total_count: u64 = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if !(0.0..=1.0).contains(&quantile) || !value.is_finite() {
            return Err(bad());
        }
        if let Some(prev) = h.rows.last() {
            if quantile < prev.quantile || total_count < prev.total_count || value < prev.value {
                return Err(format!("line {}: rows out of order", n + 1));
            }
        }
        if h.rows.len() >= ROWS_MAX {
            return Err(format!("more than {ROWS_MAX} rows"));
        }
        h.rows.push(Row {
            value,
            quantile,
            total_count,
        });
    }
    if h.rows.is_empty() && h.total_count.unwrap_or(0) > 0 {
        return Err("no rows".into());
    }
    Ok(h)
}

impl Hgrm {
    /// The value at `percentile` (0..=100): the first row at or above it.
    pub fn value_at_percentile(&self, percentile: f64) -> Option<f64> {
        let q = percentile / 100.0;
        // Rows' quantiles are sums of float ticks: allow their rounding error.
        self.rows
            .iter()
            .find(|r| r.quantile >= q - 1e-12)
            .or(self.rows.last())
            .map(|r| r.value)
    }

    #[cfg(test)]
    /// The rows just below and at-or-above `percentile`: the true value lies in between.
    pub fn bracket(&self, percentile: f64) -> Option<(f64, f64)> {
        let q = percentile / 100.0;
        let i = self.rows.iter().position(|r| r.quantile >= q - 1e-12)?;
        let lo = if i == 0 { 0.0 } else { self.rows[i - 1].value };
        Some((lo, self.rows[i].value))
    }

    pub fn max_value(&self) -> Option<f64> {
        self.max.or(self.rows.last().map(|r| r.value))
    }

    /// Points for a percentile-spectrum plot: (1/(1-q), value), the 100 % row left out
    /// (it is at infinity on that axis).
    pub fn spectrum(&self) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter(|r| r.quantile < 1.0)
            .map(|r| (1.0 / (1.0 - r.quantile), r.value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 100_000_000_000, 3).expect("hist");
        let mut x = 7u64;
        for _ in 0..50_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // 10..~300 µs with a long tail, in ns.
            let v = 10_000 + (x >> 40) % 40_000 + if x % 997 == 0 { 2_000_000 } else { 0 };
            h.record(v).expect("record");
        }
        h
    }

    #[test]
    fn java_layout() {
        let h = sample();
        let mut out = Vec::new();
        write(&h, 1000.0, &mut out).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "       Value     Percentile TotalCount 1/(1-Percentile)"
        );
        assert_eq!(lines[1], "");
        // A first row as Java prints it: %12.3f %2.12f %10d %14.2f
        let first = lines[2];
        assert_eq!(first.len(), 12 + 1 + 14 + 1 + 10 + 1 + 14, "{first:?}");
        assert!(first.ends_with("           1.00"), "{first:?}");
        let last_row = lines[lines.len() - 4];
        assert!(
            last_row.contains(" 1.000000000000      50000"),
            "{last_row:?}"
        );
        assert!(lines[lines.len() - 3].starts_with("#[Mean    = "));
        assert!(lines[lines.len() - 2].starts_with("#[Max     = "));
        assert!(lines[lines.len() - 1].ends_with("SubBuckets     =         2048]"));
    }

    #[test]
    fn parses_back_to_the_histogram_percentiles() {
        let h = sample();
        let mut out = Vec::new();
        write(&h, 1000.0, &mut out).expect("write");
        let p = parse(std::str::from_utf8(&out).expect("utf8")).expect("parse");
        assert_eq!(p.total_count, Some(50_000));
        let us = |v: u64| v as f64 / 1000.0;
        assert!((p.max_value().expect("max") - us(h.max())).abs() < 1e-9);
        assert!((p.mean.expect("mean") - h.mean() / 1000.0).abs() < 1e-3);
        // 0, 50 and 90 % are rows: exact.
        for pct in [0.0, 50.0, 90.0] {
            let got = p.value_at_percentile(pct).expect("value");
            let want = if pct == 0.0 {
                us(h.highest_equivalent(h.min()))
            } else {
                us(h.value_at_percentile(pct))
            };
            assert!((got - want).abs() < 1e-9, "p{pct}: {got} vs {want}");
        }
        // Others lie between the two rows around them.
        for pct in [99.0, 99.9, 99.99] {
            let (lo, hi) = p.bracket(pct).expect("bracket");
            let want = us(h.value_at_percentile(pct));
            assert!(
                lo <= want && want <= hi,
                "p{pct}: {want} not in [{lo}, {hi}]"
            );
        }
        assert!(p.spectrum().iter().all(|(x, _)| x.is_finite() && *x >= 1.0));
    }

    #[test]
    fn empty_histogram_and_foreign_files() {
        let h = Histogram::<u64>::new_with_bounds(1, 1000, 2).expect("hist");
        let mut out = Vec::new();
        write(&h, 1.0, &mut out).expect("write");
        let p = parse(std::str::from_utf8(&out).expect("utf8")).expect("parse");
        assert!(p.rows.is_empty());
        assert_eq!(p.total_count, Some(0));
        // Footerless rows, as compare.sh writes from fio's percentiles.
        let p = parse("  10.0 0.5 5 2.0\n  20.0 0.99 99 100.0\n").expect("parse");
        assert_eq!(p.value_at_percentile(90.0), Some(20.0));
        assert_eq!(p.max_value(), Some(20.0));
        assert!(parse("1.0 0.9 10\n0.5 0.95 11\n").is_err(), "out of order");
        assert!(parse("hello world\n").is_err());
        assert!(parse("1.0 1.5 3\n").is_err(), "quantile past 1");
    }
}
