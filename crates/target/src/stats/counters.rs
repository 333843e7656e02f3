//! Per-reactor operation counters of a volume, and their sum for `stats`.
//!
//! Each reactor writes only its own [`OpCounters`] slot (relaxed atomics, one writer),
//! so the data path never contends; a `stats` call sums the slots.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

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
}

/// Summed counters, as reported by `stats`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct VolumeStats {
    pub name: String,
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
    pub connections: usize,
}

/// Adds one to a per-reactor counter (single writer per slot).
pub fn bump(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}
