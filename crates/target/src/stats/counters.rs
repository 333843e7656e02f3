//! Per-reactor, per-label operation counters of a volume, and their sums for `stats`.
//!
//! Each reactor writes only its own [`OpCounters`] slots (relaxed atomics, one writer),
//! so the data path never contends; a `stats` call sums the slots. A volume has one
//! slot per (reactor, [`Label`]) ([`VolumeCounters`]): the block layer counts each
//! request under the label of the front end that submitted it, and work that belongs
//! to no request (slab and commit-queue waits, refused requests) under
//! [`Label::INTERNAL`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::{Label, LABELS_MAX};

/// Per-reactor operation counters of one volume.
#[derive(Default, Debug)]
#[repr(align(128))] // one slot per cache line pair: no false sharing between reactors
pub struct OpCounters {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub trim_ops: AtomicU64,
    pub zero_ops: AtomicU64,
    pub cache_ops: AtomicU64,
    pub block_status_ops: AtomicU64,
    pub errors: AtomicU64,
    /// Requests that went through the image-stack path (map lookups) rather than
    /// the base fast path: zero growth proves a volume without backups does none.
    pub layered_ops: AtomicU64,
    /// Reactor operations of this volume's requests that found the reactor's slab
    /// full and waited for a slot (back-pressure, never a failure).
    pub slab_waits: AtomicU64,
    /// FLUSH/FUA commits that found the commit queue full and waited on their
    /// reactor to be queued (`persist` module docs).
    pub commit_queue_waits: AtomicU64,
    /// Scatter-gather requests copied through an aligned bounce buffer instead of
    /// going straight into caller memory (`buf` module docs).
    pub sg_bounces: AtomicU64,
}

/// Summed counters, as reported by `stats`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VolumeStats {
    pub name: String,
    /// The volume's totals over every label (flattened: the JSON fields are
    /// `read_ops`, `write_ops`, … at the top level, as before labels).
    #[serde(flatten)]
    pub totals: LabelStats,
    pub connections: usize,
    /// The same counts by the label of who submitted the requests (labels with
    /// nothing counted are left out).
    pub by_label: BTreeMap<String, LabelStats>,
}

/// One label's share of a volume's counters.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LabelStats {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub trim_ops: u64,
    pub zero_ops: u64,
    pub cache_ops: u64,
    pub block_status_ops: u64,
    pub errors: u64,
    pub layered_ops: u64,
    pub slab_waits: u64,
    pub commit_queue_waits: u64,
    pub sg_bounces: u64,
}

impl LabelStats {
    fn add(&mut self, c: &OpCounters) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.read_ops += l(&c.read_ops);
        self.read_bytes += l(&c.read_bytes);
        self.write_ops += l(&c.write_ops);
        self.write_bytes += l(&c.write_bytes);
        self.flush_ops += l(&c.flush_ops);
        self.trim_ops += l(&c.trim_ops);
        self.zero_ops += l(&c.zero_ops);
        self.cache_ops += l(&c.cache_ops);
        self.block_status_ops += l(&c.block_status_ops);
        self.errors += l(&c.errors);
        self.layered_ops += l(&c.layered_ops);
        self.slab_waits += l(&c.slab_waits);
        self.commit_queue_waits += l(&c.commit_queue_waits);
        self.sg_bounces += l(&c.sg_bounces);
    }
}

/// A volume's counters: one [`OpCounters`] per (reactor, label).
#[derive(Debug)]
pub struct VolumeCounters {
    slots: Box<[OpCounters]>,
    reactors: usize,
}

impl VolumeCounters {
    pub fn new(reactors: usize) -> VolumeCounters {
        let reactors = reactors.max(1);
        VolumeCounters {
            slots: (0..reactors * LABELS_MAX)
                .map(|_| OpCounters::default())
                .collect(),
            reactors,
        }
    }

    /// The slot of `label` on `reactor` (reactor ids beyond the volume's share the
    /// last reactor's slots).
    #[inline]
    pub fn get(&self, reactor: usize, label: Label) -> &OpCounters {
        let r = reactor.min(self.reactors - 1);
        &self.slots[r * LABELS_MAX + label.index()]
    }

    /// The sums for `stats`: the volume's totals and, per label, its share.
    pub fn stats(&self, name: &str, connections: usize) -> VolumeStats {
        let mut by_label: BTreeMap<String, LabelStats> = BTreeMap::new();
        let mut total = LabelStats::default();
        for i in 0..LABELS_MAX {
            let mut mine = LabelStats::default();
            for r in 0..self.reactors {
                mine.add(&self.slots[r * LABELS_MAX + i]);
            }
            if mine != LabelStats::default() {
                total.add_stats(&mine);
                by_label.insert(Label::from_index(i).name().to_string(), mine);
            }
        }
        VolumeStats {
            name: name.to_string(),
            totals: total,
            connections,
            by_label,
        }
    }
}

impl LabelStats {
    fn add_stats(&mut self, o: &LabelStats) {
        self.read_ops += o.read_ops;
        self.read_bytes += o.read_bytes;
        self.write_ops += o.write_ops;
        self.write_bytes += o.write_bytes;
        self.flush_ops += o.flush_ops;
        self.trim_ops += o.trim_ops;
        self.zero_ops += o.zero_ops;
        self.cache_ops += o.cache_ops;
        self.block_status_ops += o.block_status_ops;
        self.errors += o.errors;
        self.layered_ops += o.layered_ops;
        self.slab_waits += o.slab_waits;
        self.commit_queue_waits += o.commit_queue_waits;
        self.sg_bounces += o.sg_bounces;
    }
}

/// Adds one to a per-reactor counter (single writer per slot).
pub fn bump(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}
