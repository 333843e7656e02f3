//! `stats --hist/--hgrm/--svg`: the server's latency histograms as a table and as
//! report files.
//!
//! The server sends, per volume, percentile summaries in µs (`latency.ops`), and with
//! `hist` every recorded value with its count in ns (`latency.histograms_ns`). The
//! files are written from a histogram rebuilt from those pairs, by the same `.hgrm`
//! writer and plotter as `ringblk-bench`, so both tools' reports compare directly.

use std::path::Path;

use hdrhistogram::Histogram;
use serde_json::Value;

use crate::client::CtlError;
use crate::table::{Align, Table};

use Align::{Left, Right};

/// Operation kinds in the server's report order, then their sum.
pub const OPS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "cache",
    "block_status",
    "all",
];

/// Same bounds as the server's histograms (1 ns .. 1 h, 3 digits).
const LATENCY_NS_MAX: u64 = 3_600_000_000_000;

fn micros(summary: &Value, key: &str) -> String {
    match summary.get(key).and_then(Value::as_f64) {
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

/// Percentiles per operation kind (kinds never seen left out) and, when the server
/// sent them, operation counts per reactor.
pub fn table(volume: &Value) -> String {
    let name = volume.get("name").and_then(Value::as_str).unwrap_or("-");
    let Some(lat) = volume.get("latency") else {
        return String::new();
    };
    let mut out = format!("\n{name}: latency (µs)\n");
    let mut t = Table::new(&[
        ("OP", Left),
        ("COUNT", Right),
        ("P50", Right),
        ("P90", Right),
        ("P99", Right),
        ("P99.9", Right),
        ("P99.99", Right),
        ("MAX", Right),
        ("MEAN", Right),
    ]);
    for op in OPS {
        let Some(s) = lat.get("ops").and_then(|o| o.get(op)) else {
            continue;
        };
        let count = s.get("count").and_then(Value::as_u64).unwrap_or(0);
        if count == 0 && op != "all" {
            continue;
        }
        let mut row = vec![op.to_string(), count.to_string()];
        for key in ["p50", "p90", "p99", "p99_9", "p99_99", "max", "mean"] {
            row.push(micros(s, key));
        }
        t.push(row);
    }
    out.push_str(&t.render());
    if let Some(reactors) = lat.get("reactors").and_then(Value::as_array) {
        let mut t = Table::new(&[
            ("REACTOR", Right),
            ("READS", Right),
            ("WRITES", Right),
            ("ALL", Right),
        ]);
        for r in reactors {
            let count = |op: &str| {
                r.get("counts")
                    .and_then(|c| c.get(op))
                    .map_or_else(|| "-".into(), Value::to_string)
            };
            let id = r.get("id").map_or_else(|| "-".into(), Value::to_string);
            t.push(vec![id, count("read"), count("write"), count("all")]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

/// Rebuilds the histogram of `op` on the one volume in a `stats` result.
pub fn histogram(result: &Value, op: &str) -> Result<Histogram<u64>, CtlError> {
    let bad = |what: &str| CtlError::Protocol(format!("stats: {what}"));
    let volumes = result
        .get("volumes")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no volumes list"))?;
    let [volume] = volumes.as_slice() else {
        return Err(bad("a report needs exactly one volume"));
    };
    let pairs = volume
        .pointer(&format!("/latency/histograms_ns/{op}"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no latency histograms (server too old?)"))?;
    let mut h =
        Histogram::<u64>::new_with_bounds(1, LATENCY_NS_MAX, 3).map_err(|e| bad(&e.to_string()))?;
    for p in pairs {
        let (Some(value), Some(count)) = (
            p.get(0).and_then(Value::as_u64),
            p.get(1).and_then(Value::as_u64),
        ) else {
            return Err(bad("histogram entry is not [ns, count]"));
        };
        h.saturating_record_n(value.clamp(1, LATENCY_NS_MAX), count);
    }
    Ok(h)
}

/// Writes `h` as `.hgrm` text (µs).
pub fn write_hgrm(h: &Histogram<u64>, path: &Path) -> Result<(), CtlError> {
    let err = |e: std::io::Error| CtlError::Output {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    ringblk_bench::hgrm::write(h, 1000.0, &mut f).map_err(err)?;
    std::io::Write::flush(&mut f).map_err(err)
}

/// Draws `h` as a percentile-spectrum SVG.
pub fn write_svg(h: &Histogram<u64>, path: &Path, title: &str) -> Result<(), CtlError> {
    let curve = ringblk_bench::curve_of(h, title.to_string());
    ringblk_bench::plot::draw(path, title, &[curve]).map_err(|message| CtlError::Output {
        path: path.to_owned(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rebuilds_the_servers_histogram() {
        let r = json!({"volumes": [{"name": "v", "latency": {"histograms_ns":
            {"read": [[1000, 3], [5000, 1]]}}}]});
        let h = histogram(&r, "read").expect("histogram");
        assert_eq!(h.len(), 4);
        assert_eq!(h.max(), h.highest_equivalent(5000));
        assert!(histogram(&r, "write").is_err());
        assert!(histogram(&json!({"volumes": []}), "read").is_err());
        assert!(table(&r["volumes"][0]).contains("latency"));
    }
}
