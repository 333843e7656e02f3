//! Server-side request latency histograms: per volume, per reactor, per operation.
//!
//! A request's latency runs from `Channel::submit` (`bdev`) to just before its `done`
//! runs. Requests answered without executing —
//! refused by the decoder (`Event::Reject`) or zero-length no-ops — are not recorded:
//! they never reach the storage path, and the volume's op counters skip them too.
//!
//! # Ownership
//! Each reactor owns a [`ReactorLatency`] (reactor-local state, installed with the
//! sessions), so recording on the data path takes no lock and touches no shared cache
//! line. The `stats` RPC sends a closure to every reactor that clones (and, for a new
//! interval, clears) its histograms, and merges the clones on the RPC thread.
//!
//! # Bounds
//! Values are nanoseconds, 3 significant digits, at most [`LATENCY_NS_MAX`]; larger
//! values are clamped, so recording never fails or panics. A volume's histograms are
//! allocated on its first request of each kind on a reactor and dropped when the
//! volume is removed. (Requests still draining at removal can record a few samples
//! after that; they would show up under a new volume of the same name.) Requests on a
//! backup export `VOL@NAME` count under `VOL`, like its op counters.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use hdrhistogram::Histogram;
use ringblk_reactor::Reactor;
use serde_json::{json, Value};

use crate::ops::IoKind;

/// Largest latency kept apart: one hour. Longer requests count as one hour.
pub const LATENCY_NS_MAX: u64 = 3_600_000_000_000;
/// Significant digits of every histogram.
pub const SIGFIG: u8 = 3;

/// Operation kinds, in report order; the index is the histogram slot.
pub const OPS: [&str; 7] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "cache",
    "block_status",
];

/// The slot of `kind` in [`OPS`], `None` for a kind that has no histogram yet.
pub fn op_index(kind: IoKind) -> Option<usize> {
    match kind {
        IoKind::Read => Some(0),
        IoKind::Write => Some(1),
        IoKind::Flush => Some(2),
        IoKind::Unmap => Some(3),
        IoKind::WriteZeroes => Some(4),
        IoKind::Readahead => Some(5),
        IoKind::BlockStatus => Some(6),
        IoKind::CompareAndWrite => None,
    }
}

/// An empty histogram with the bounds above.
pub fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds (1 <= low, high >= 2 * low, sigfig <= 5): cannot fail.
    Histogram::new_with_bounds(1, LATENCY_NS_MAX, SIGFIG).unwrap_or_else(|_| unreachable!())
}

/// One volume's histograms, one slot per operation kind (allocated on first use).
#[derive(Clone, Default)]
pub struct OpHistograms {
    pub ops: [Option<Histogram<u64>>; OPS.len()],
}

impl OpHistograms {
    /// Records one request of `kind` (kinds without a histogram are skipped).
    #[inline]
    pub fn record_kind(&mut self, kind: IoKind, latency_ns: u64) {
        if let Some(op) = op_index(kind) {
            self.record(op, latency_ns)
        }
    }

    fn record(&mut self, op: usize, latency_ns: u64) {
        debug_assert!(op < OPS.len());
        let h = self.ops[op].get_or_insert_with(new_histogram);
        h.saturating_record(latency_ns.clamp(1, LATENCY_NS_MAX));
    }

    /// Adds `other` into `self`. Both have the same bounds, so this cannot fail.
    pub fn merge(&mut self, other: &OpHistograms) {
        for (mine, theirs) in self.ops.iter_mut().zip(&other.ops) {
            if let Some(t) = theirs {
                let _ = mine.get_or_insert_with(new_histogram).add(t);
            }
        }
    }

    /// Every operation together.
    pub fn all(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for h in self.ops.iter().flatten() {
            let _ = all.add(h);
        }
        all
    }

    pub fn count(&self, op: usize) -> u64 {
        self.ops[op].as_ref().map_or(0, |h| h.len())
    }
}

/// One reactor's histograms by volume name, as [`snapshot`] returns them.
pub type VolumeHistograms = HashMap<String, OpHistograms>;

/// One volume's histograms on one reactor, shared with its channel (`bdev`), which
/// records into them without a lookup.
pub type SharedHistograms = Rc<RefCell<OpHistograms>>;

/// The histograms of one reactor, by volume name.
#[derive(Default)]
pub struct ReactorLatency {
    volumes: RefCell<HashMap<String, SharedHistograms>>,
}

pub fn install(r: &mut Reactor) {
    r.set_local(Rc::new(ReactorLatency::default()));
}

/// The histograms of `volume` on this reactor, created on first use; a channel
/// keeps them and records with [`OpHistograms::record_kind`] (data path: an index,
/// no lock, no lookup). On a reactor without the table (a test's), detached ones.
pub(crate) fn histograms_of(r: &Reactor, volume: &str) -> SharedHistograms {
    let Some(lat) = r.local::<ReactorLatency>() else {
        return SharedHistograms::default();
    };
    let mut vols = lat.volumes.borrow_mut();
    vols.entry(volume.to_string()).or_default().clone()
}

/// Clones this reactor's histograms of `volumes` (all when `None`), then clears them
/// if `reset`: in one step on the reactor, so no request falls between two intervals.
/// Cleared in place: channels keep recording into the same histograms.
pub fn snapshot(r: &Reactor, volumes: Option<&[String]>, reset: bool) -> VolumeHistograms {
    let Some(lat) = r.local::<ReactorLatency>() else {
        return HashMap::new();
    };
    let vols = lat.volumes.borrow();
    let wanted = |name: &str| volumes.is_none_or(|v| v.iter().any(|n| n == name));
    // A channel creates its volume's entry before any request: empty ones are not
    // reported, as before channels.
    vols.iter()
        .filter(|(n, h)| wanted(n) && h.borrow().ops.iter().any(Option::is_some))
        .map(|(n, h)| {
            let out = (n.clone(), h.borrow().clone());
            if reset {
                *h.borrow_mut() = OpHistograms::default();
            }
            out
        })
        .collect()
}

/// Drops the histograms of a removed volume (a new volume of that name starts empty;
/// channels of the removed one record into their detached copy until they close).
pub(crate) fn forget(r: &Reactor, volume: &str) {
    if let Some(lat) = r.local::<ReactorLatency>() {
        lat.volumes.borrow_mut().remove(volume);
    }
}

/// Percentiles reported for each operation.
const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99_9", 99.9),
    ("p99_99", 99.99),
];

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// `{count, p50, …, p99_99, max, mean}`, latencies in µs.
pub fn summary_json(h: &Histogram<u64>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("count".into(), json!(h.len()));
    for (name, p) in PERCENTILES {
        m.insert(name.into(), json!(us(h.value_at_percentile(p))));
    }
    m.insert("max".into(), json!(us(h.max())));
    m.insert("mean".into(), json!(h.mean() / 1000.0));
    Value::Object(m)
}

/// `[[value_ns, count], …]`: every distinct recorded value, enough for a client to
/// rebuild the histogram exactly (`record_n`) and write `.hgrm` or plot it.
pub fn buckets_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

/// The `latency` member of one volume's `stats`: the merge of `per_reactor`
/// (reactor id, that reactor's histograms of this volume). With `hist`, also
/// per-reactor counts and the histograms themselves.
pub fn volume_json(per_reactor: &[(usize, Option<&OpHistograms>)], hist: bool) -> Value {
    let mut merged = OpHistograms::default();
    for (_, h) in per_reactor {
        if let Some(h) = h {
            merged.merge(h);
        }
    }
    let all = merged.all();
    let mut ops = serde_json::Map::new();
    let empty = new_histogram();
    for (i, name) in OPS.iter().enumerate() {
        ops.insert(
            (*name).into(),
            summary_json(merged.ops[i].as_ref().unwrap_or(&empty)),
        );
    }
    ops.insert("all".into(), summary_json(&all));
    let mut out = json!({ "unit": "us", "ops": ops });
    if hist {
        let reactors: Vec<Value> = per_reactor
            .iter()
            .map(|(id, h)| {
                let mut counts = serde_json::Map::new();
                let mut total = 0;
                for (i, name) in OPS.iter().enumerate() {
                    let n = h.map_or(0, |h| h.count(i));
                    total += n;
                    counts.insert((*name).into(), json!(n));
                }
                counts.insert("all".into(), json!(total));
                json!({ "id": id, "counts": counts })
            })
            .collect();
        out["reactors"] = Value::Array(reactors);
        let mut hs = serde_json::Map::new();
        for (i, name) in OPS.iter().enumerate() {
            hs.insert(
                (*name).into(),
                buckets_json(merged.ops[i].as_ref().unwrap_or(&empty)),
            );
        }
        hs.insert("all".into(), buckets_json(&all));
        out["histograms_ns"] = Value::Object(hs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The histogram slots and their JSON names are `IoKind`'s stat names, in order
    /// (`ringblk-ctl stats --op` and the `stats` JSON read them).
    #[test]
    fn slots_follow_io_kind_stat_names() {
        for (i, name) in OPS.iter().enumerate() {
            assert_eq!(IoKind::ALL[i].stat_name(), *name);
            assert_eq!(op_index(IoKind::ALL[i]), Some(i));
        }
        assert_eq!(op_index(IoKind::CompareAndWrite), None);
    }

    #[test]
    fn clamps_instead_of_failing() {
        let mut h = OpHistograms::default();
        h.record(0, 0);
        h.record(0, u64::MAX);
        h.record(1, 5_000);
        assert_eq!(h.count(0), 2);
        assert_eq!(h.count(1), 1);
        assert_eq!(h.count(2), 0);
        let all = h.all();
        assert_eq!(all.len(), 3);
        assert!(all.max() >= LATENCY_NS_MAX && all.max() <= LATENCY_NS_MAX + LATENCY_NS_MAX / 500);
        let mut m = OpHistograms::default();
        m.merge(&h);
        m.merge(&h);
        assert_eq!(m.count(0), 4);
    }
}
