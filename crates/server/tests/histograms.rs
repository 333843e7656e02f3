//! Server-side latency histograms (`stats --hist/--hgrm/--svg/--reset`): they count
//! exactly the operations a real client sent, on whichever reactors served them,
//! and the report files agree with the numbers.
//!
//! Guards against: a request path that skips `finish` (or records twice), per-reactor
//! histograms lost in the merge, `--reset` that does not start a new interval, and a
//! `.hgrm`/SVG report that does not match the server's data.

mod common;

use std::process::Command;

use common::{ctl, run_ok, Server};
use serde_json::Value;

const WRITES: u64 = 23;
const READS: u64 = 17;

fn stats(srv: &Server, extra: &[&str]) -> Value {
    let out = run_ok(
        ctl(srv)
            .args(["--json", "stats", "vol0", "--hist"])
            .args(extra),
    );
    let v: Value = serde_json::from_str(&out).expect("stats JSON");
    v["volumes"][0].clone()
}

fn op_count(vol: &Value, op: &str) -> u64 {
    vol["latency"]["ops"][op]["count"]
        .as_u64()
        .unwrap_or_else(|| panic!("no latency count for {op}: {vol}"))
}

/// Checks the histogram counts against what the client sent and against the volume's
/// own op counters; `Err` names the first mismatch.
fn check_counts(vol: &Value, writes: u64, reads: u64) -> Result<(), String> {
    let flushes = vol["flush_ops"].as_u64().unwrap_or(0);
    let want = [
        ("write", writes, "write_ops"),
        ("read", reads, "read_ops"),
        ("flush", flushes, "flush_ops"),
    ];
    for (op, n, counter) in want {
        let got = op_count(vol, op);
        if got != n || vol[counter].as_u64() != Some(n) {
            return Err(format!(
                "{op}: histogram {got}, counter {}, sent {n}",
                vol[counter]
            ));
        }
    }
    let all = op_count(vol, "all");
    if all != writes + reads + flushes {
        return Err(format!("all: {all} != {}", writes + reads + flushes));
    }
    // The merge: per-reactor counts add up to the total.
    let per_reactor: u64 = vol["latency"]["reactors"]
        .as_array()
        .ok_or("no per-reactor counts")?
        .iter()
        .map(|r| r["counts"]["all"].as_u64().unwrap_or(0))
        .sum();
    if per_reactor != all {
        return Err(format!("reactors sum to {per_reactor}, total {all}"));
    }
    Ok(())
}

#[test]
fn histograms_count_exactly_what_the_client_sent() {
    let srv = Server::start(&["--cores", "0,1"]);
    let uri = srv.uri("vol0");
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw", &uri]);
    for i in 0..WRITES {
        qemu.arg("-c").arg(format!("write -P 0x5a {} 4k", i * 4096));
    }
    for i in 0..READS {
        qemu.arg("-c").arg(format!("read -P 0x5a {} 4k", i * 4096));
    }
    qemu.args(["-c", "flush"]);
    let out = run_ok(&mut qemu);
    assert!(!out.contains("failed"), "{out}");

    let vol = stats(&srv, &[]);
    check_counts(&vol, WRITES, READS).expect("counts");
    // qemu-io sends our flush and may add one at close.
    let flushes = op_count(&vol, "flush");
    assert!((1..=2).contains(&flushes), "flushes {flushes}");
    assert_eq!(op_count(&vol, "trim"), 0);
    // Negative control: a wrong expectation is caught.
    assert!(check_counts(&vol, WRITES + 1, READS).is_err());
    assert!(check_counts(&vol, WRITES, READS - 1).is_err());
    let w = &vol["latency"]["ops"]["write"];
    let (p50, p99, max) = (
        w["p50"].as_f64().expect("p50"),
        w["p99"].as_f64().expect("p99"),
        w["max"].as_f64().expect("max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{w}");

    // Report files for the write histogram.
    let hgrm = srv.path("w.hgrm");
    let svg = srv.path("w.svg");
    let human = run_ok(
        ctl(&srv)
            .args(["stats", "vol0", "--op", "write", "--hgrm"])
            .arg(&hgrm)
            .arg("--svg")
            .arg(&svg),
    );
    assert!(
        human.contains("P99.9") && human.contains("write"),
        "{human}"
    );
    let text = std::fs::read_to_string(&hgrm).expect("hgrm");
    let parsed = parse_hgrm(&text);
    assert_eq!(parsed.1, WRITES, "{text}");
    assert!(
        (parsed.0 - max).abs() < 1e-3,
        "hgrm max {} vs stats max {max}",
        parsed.0
    );
    let svg_text = std::fs::read_to_string(&svg).expect("svg");
    let doc = roxmltree::Document::parse(&svg_text).expect("SVG is XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");

    // --reset reports the ending interval, then counts start from zero.
    let ended = stats(&srv, &["--reset"]);
    check_counts(&ended, WRITES, READS).expect("interval that ended");
    let fresh = stats(&srv, &[]);
    for op in ["read", "write", "flush", "all"] {
        assert_eq!(op_count(&fresh, op), 0, "{op} after reset: {fresh}");
    }
    assert!(check_counts(&fresh, WRITES, READS).is_err());
}

/// (max µs, total count) from the `.hgrm` footer, as HdrHistogram's tools read it.
fn parse_hgrm(text: &str) -> (f64, u64) {
    let line = text
        .lines()
        .find(|l| l.starts_with("#[Max"))
        .unwrap_or_else(|| panic!("no Max footer:\n{text}"));
    let num = |key: &str| -> &str {
        let at = line.find(key).expect(key) + key.len();
        line[at..]
            .trim_start_matches([' ', '='])
            .split([',', ']'])
            .next()
            .expect("number")
            .trim()
    };
    (
        num("Max").parse().expect("max"),
        num("Total count").parse().expect("count"),
    )
}
