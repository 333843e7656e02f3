//! The INFLIGHT_SHMFD log of one split virtqueue, in QEMU's format
//! (docs/interop/vhost-user.rst, "Inflight I/O tracking"), so that a restarted
//! server resubmits the requests a client had in flight.
//!
//! ```text
//! struct QueueRegionSplit {          struct DescStateSplit {
//!     u64 features;      // 0            u8  inflight;    // 0
//!     u16 version;       // 8            u8  padding[5];
//!     u16 desc_num;      // 10           u16 next;        // 6
//!     u16 last_batch_head; // 12         u64 counter;     // 8
//!     u16 used_idx;      // 14       }                    // 16 bytes
//!     DescStateSplit desc[]; // 16
//! }
//! ```
//!
//! Layer: the vhost data plane; no imports beyond std. The control plane creates and
//! maps the region (GET/SET_INFLIGHT_FD) and hands each queue its part as a
//! [`Region`]; this module owns the format's per-queue logic.
//!
//! # Ordering (the protocol's steps)
//! - pop: `desc[head].counter = counter++`, then `desc[head].inflight = 1`;
//! - completion: `desc[head].next = last_batch_head`, `last_batch_head = head`, then
//!   the used ring is published, then `desc[head].inflight = 0` and `used_idx` = the
//!   used ring's idx. A crash between the used ring and the clear leaves `used_idx`
//!   behind the ring's idx: the reopen clears the last batch (walking `next` from
//!   `last_batch_head`), so a completed request is never resubmitted.
//!
//! The region is memory shared with the client (which only keeps it across our
//! restart) and survives our process: every access is a volatile read or write at
//! an offset checked against the region's length once, in [`SplitInflight::open`].
//! A hostile client can put anything in it; the worst it gets is its own requests
//! resubmitted (each is parsed and checked like any other).

use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

const HEADER_BYTES: usize = 16;
const DESC_STATE_BYTES: usize = 16;
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_NEXT: usize = 6;
const DESC_OFF_COUNTER: usize = 8;
/// The format version QEMU and libvhost-user write.
pub const INFLIGHT_VERSION: u16 = 1;

/// Bytes the region of a queue of `queue_size` descriptors takes.
pub const fn region_bytes(queue_size: u16) -> usize {
    HEADER_BYTES + DESC_STATE_BYTES * queue_size as usize
}

/// One queue's part of the inflight shared memory, as the control plane mapped it.
pub trait Region: Send {
    /// Start of the queue's `QueueRegionSplit`; mapped read/write, and valid for
    /// [`len`](Self::len) bytes while the value lives.
    fn as_ptr(&self) -> NonNull<u8>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a region cannot be used (the queue then runs without inflight tracking).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InflightError {
    #[error("inflight region of {len} bytes is too small for {desc_num} descriptors")]
    TooSmall { len: usize, desc_num: u16 },
    #[error("inflight region holds {desc_num} descriptors, the queue has {queue_size}")]
    TooFewDescs { desc_num: u16, queue_size: u16 },
    #[error("inflight region version {0} is not supported")]
    Version(u16),
}

/// The log of one queue.
pub struct SplitInflight<R: Region> {
    region: R,
    desc_num: u16,
    /// The next `counter` value (pop order).
    counter: u64,
}

impl<R: Region> SplitInflight<R> {
    /// Opens the log of a queue of `queue_size` whose used ring's idx is
    /// `ring_used_idx` now. A fresh region (version 0) is initialised. Otherwise the
    /// last batch is repaired and the heads still in flight are returned, oldest pop
    /// first (the order to resubmit them in).
    pub fn open(
        region: R,
        queue_size: u16,
        ring_used_idx: u16,
    ) -> Result<(SplitInflight<R>, Vec<u16>), InflightError> {
        let len = region.len();
        if len < HEADER_BYTES {
            return Err(InflightError::TooSmall { len, desc_num: 0 });
        }
        let mut log = SplitInflight {
            region,
            desc_num: 0,
            counter: 0,
        };
        let version = log.read_u16(OFF_VERSION);
        let mut desc_num = log.read_u16(OFF_DESC_NUM);
        if version == 0 && desc_num == 0 {
            // A region nobody described: take it for this queue if it fits.
            desc_num = queue_size;
        }
        if len < region_bytes(desc_num) {
            return Err(InflightError::TooSmall { len, desc_num });
        }
        if desc_num < queue_size {
            return Err(InflightError::TooFewDescs {
                desc_num,
                queue_size,
            });
        }
        log.desc_num = desc_num;
        match version {
            0 => {
                for i in 0..desc_num {
                    log.write_u8(desc_off(i) + DESC_OFF_INFLIGHT, 0);
                }
                log.write_u16(OFF_DESC_NUM, desc_num);
                log.write_u16(OFF_LAST_BATCH_HEAD, 0);
                log.write_u16(OFF_USED_IDX, ring_used_idx);
                fence(Ordering::Release);
                log.write_u16(OFF_VERSION, INFLIGHT_VERSION);
                Ok((log, Vec::new()))
            }
            INFLIGHT_VERSION => {
                log.repair_last_batch(ring_used_idx);
                let pending = log.pending(queue_size);
                log.counter = pending
                    .last()
                    .map_or(0, |&h| log.read_u64(desc_off(h) + DESC_OFF_COUNTER))
                    .wrapping_add(1);
                Ok((log, pending))
            }
            v => Err(InflightError::Version(v)),
        }
    }

    /// Step 1 of a reopen: completions published to the used ring but not yet
    /// cleared here (a crash between the two) are cleared.
    fn repair_last_batch(&mut self, ring_used_idx: u16) {
        let logged = self.read_u16(OFF_USED_IDX);
        if logged == ring_used_idx {
            return;
        }
        // At most one batch of at most `desc_num` entries; a corrupt `next` chain is
        // cut there.
        let batch = ring_used_idx.wrapping_sub(logged).min(self.desc_num);
        let mut head = self.read_u16(OFF_LAST_BATCH_HEAD);
        for _ in 0..batch {
            if head >= self.desc_num {
                break;
            }
            self.write_u8(desc_off(head) + DESC_OFF_INFLIGHT, 0);
            head = self.read_u16(desc_off(head) + DESC_OFF_NEXT);
        }
        self.write_u16(OFF_USED_IDX, ring_used_idx);
    }

    /// Heads marked in flight, by `counter` (pop order). Only heads below
    /// `queue_size` count, and so at most `queue_size` of them: a client's region may
    /// describe more descriptors than the queue has, and a head past the queue would
    /// break it on resubmission, while more than `queue_size` pending would move the
    /// next avail index (used + pending) past anything the guest published.
    fn pending(&self, queue_size: u16) -> Vec<u16> {
        #[cfg(test)]
        let queue_size = if plant::PLANT_ALL_PENDING.with(|p| p.get()) {
            self.desc_num
        } else {
            queue_size
        };
        let mut v: Vec<(u64, u16)> = (0..self.desc_num.min(queue_size))
            .filter(|&i| self.read_u8(desc_off(i) + DESC_OFF_INFLIGHT) == 1)
            .map(|i| (self.read_u64(desc_off(i) + DESC_OFF_COUNTER), i))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// A head was popped from the avail ring.
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let off = desc_off(head);
        self.write_u64(off + DESC_OFF_COUNTER, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::Release);
        self.write_u8(off + DESC_OFF_INFLIGHT, 1);
    }

    /// `head` is about to be published to the used ring.
    pub fn before_used(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let last = self.read_u16(OFF_LAST_BATCH_HEAD);
        self.write_u16(desc_off(head) + DESC_OFF_NEXT, last);
        self.write_u16(OFF_LAST_BATCH_HEAD, head);
        fence(Ordering::Release);
    }

    /// `head` was published; the used ring's idx is now `used_idx`.
    pub fn after_used(&mut self, head: u16, used_idx: u16) {
        fence(Ordering::Release);
        if head < self.desc_num {
            self.write_u8(desc_off(head) + DESC_OFF_INFLIGHT, 0);
        }
        fence(Ordering::Release);
        self.write_u16(OFF_USED_IDX, used_idx);
    }

    /// The address of `n` bytes at `off`, or `None` past the region. Offsets come
    /// from this module's layout with heads < desc_num, and `open` checked
    /// region_bytes(desc_num) <= len; still, a miss must not panic the server (the
    /// region is client memory): reads then see zero and writes are dropped.
    fn ptr(&self, off: usize, n: usize) -> Option<*mut u8> {
        let end = off.checked_add(n);
        if end.is_none_or(|e| e > self.region.len()) {
            // Negative control of `out_of_range_access_reads_zero_and_drops_writes`:
            // the old assert, planted back.
            #[cfg(test)]
            if plant::PLANT_PTR_ASSERT.with(|p| p.get()) {
                panic!("inflight offset past the region");
            }
            return None;
        }
        // SAFETY: in bounds of the region (just checked), which `R` keeps mapped.
        Some(unsafe { self.region.as_ptr().as_ptr().add(off) })
    }

    fn read_u8(&self, off: usize) -> u8 {
        match self.ptr(off, 1) {
            // SAFETY: `ptr` checked the bounds; volatile because the memory is shared.
            Some(p) => unsafe { p.read_volatile() },
            None => 0,
        }
    }

    fn write_u8(&mut self, off: usize, v: u8) {
        if let Some(p) = self.ptr(off, 1) {
            // SAFETY: as in `read_u8`.
            unsafe { p.write_volatile(v) }
        }
    }

    fn read_u16(&self, off: usize) -> u16 {
        let mut b = [0u8; 2];
        for (i, x) in b.iter_mut().enumerate() {
            *x = self.read_u8(off.saturating_add(i));
        }
        u16::from_le_bytes(b)
    }

    fn write_u16(&mut self, off: usize, v: u16) {
        for (i, x) in v.to_le_bytes().into_iter().enumerate() {
            self.write_u8(off.saturating_add(i), x);
        }
    }

    fn read_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = self.read_u8(off.saturating_add(i));
        }
        u64::from_le_bytes(b)
    }

    fn write_u64(&mut self, off: usize, v: u64) {
        for (i, x) in v.to_le_bytes().into_iter().enumerate() {
            self.write_u8(off.saturating_add(i), x);
        }
    }
}

fn desc_off(head: u16) -> usize {
    HEADER_BYTES + DESC_STATE_BYTES * head as usize
}

/// Planted bugs for the negative controls (test builds only).
#[cfg(test)]
pub(crate) mod plant {
    use std::cell::Cell;

    thread_local! {
        /// Plants the old `assert!` back into `ptr` (negative control).
        pub(crate) static PLANT_PTR_ASSERT: Cell<bool> = const { Cell::new(false) };
        /// Plants back pending heads up to `desc_num` rather than the queue size.
        pub(crate) static PLANT_ALL_PENDING: Cell<bool> = const { Cell::new(false) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plant::*;

    /// A heap region standing in for the shared memory.
    struct Heap(Box<[u8]>);

    impl Region for Heap {
        fn as_ptr(&self) -> NonNull<u8> {
            NonNull::new(self.0.as_ptr() as *mut u8).expect("non-null")
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    fn heap(n: u16) -> Heap {
        Heap(vec![0u8; region_bytes(n)].into_boxed_slice())
    }

    /// Simulates a crash: the region's bytes survive, the log object does not.
    fn reopen(log: SplitInflight<Heap>, n: u16, used: u16) -> (SplitInflight<Heap>, Vec<u16>) {
        let bytes = log.region.0.clone();
        SplitInflight::open(Heap(bytes), n, used).expect("reopen")
    }

    #[test]
    fn fresh_region_is_initialised_and_has_nothing_pending() {
        let (log, pending) = SplitInflight::open(heap(8), 8, 0).expect("open");
        assert!(pending.is_empty());
        assert_eq!(log.read_u16(OFF_VERSION), INFLIGHT_VERSION);
        assert_eq!(log.read_u16(OFF_DESC_NUM), 8);
    }

    /// Guards the resubmission order and the completed-not-resubmitted rule.
    #[test]
    fn pending_heads_come_back_in_pop_order() {
        let (mut log, _) = SplitInflight::open(heap(8), 8, 0).expect("open");
        for h in [5, 2, 7, 0] {
            log.begin(h);
        }
        // 2 completes fully.
        log.before_used(2);
        log.after_used(2, 1);
        let (mut log, pending) = reopen(log, 8, 1);
        assert_eq!(pending, vec![5, 7, 0]);
        // The counter continues after the newest pending pop.
        log.begin(3);
        let (_, pending) = reopen(log, 8, 1);
        assert_eq!(pending, vec![5, 7, 0, 3]);
    }

    /// A crash after the used ring was published but before the log was cleared:
    /// the reopen must not resubmit that request.
    #[test]
    fn crash_between_used_ring_and_clear_is_repaired() {
        let (mut log, _) = SplitInflight::open(heap(8), 8, 0).expect("open");
        log.begin(4);
        log.begin(6);
        log.before_used(6);
        // (used ring idx becomes 1 here; the process dies before after_used)
        let (_, pending) = reopen(log, 8, 1);
        assert_eq!(pending, vec![4]);
    }

    /// Negative control of the repair test: without the used ring having moved, the
    /// same log resubmits both (so the test above checks the repair, not luck).
    #[test]
    fn crash_before_used_ring_resubmits_both() {
        let (mut log, _) = SplitInflight::open(heap(8), 8, 0).expect("open");
        log.begin(4);
        log.begin(6);
        log.before_used(6);
        let (_, pending) = reopen(log, 8, 0);
        assert_eq!(pending, vec![4, 6]);
    }

    #[test]
    fn hostile_regions_are_refused_or_bounded() {
        // Too small for its own desc_num.
        let mut h = heap(4);
        h.0[OFF_DESC_NUM] = 200;
        h.0[OFF_VERSION] = 1;
        assert!(matches!(
            SplitInflight::open(h, 4, 0),
            Err(InflightError::TooSmall { .. })
        ));
        // Fewer descriptors than the queue.
        let mut h = heap(4);
        h.0[OFF_DESC_NUM] = 4;
        h.0[OFF_VERSION] = 1;
        assert!(matches!(
            SplitInflight::open(h, 8, 0),
            Err(InflightError::TooFewDescs { .. })
        ));
        // Unknown version.
        let mut h = heap(4);
        h.0[OFF_VERSION] = 9;
        h.0[OFF_DESC_NUM] = 4;
        assert!(SplitInflight::open(h, 4, 0).is_err());
        // A `next` chain pointing everywhere and a huge batch: bounded, no panic.
        let mut h = heap(4);
        h.0[OFF_VERSION] = 1;
        h.0[OFF_DESC_NUM] = 4;
        h.0[OFF_LAST_BATCH_HEAD] = 3;
        for i in 0..4u16 {
            let o = desc_off(i);
            h.0[o] = 1;
            h.0[o + DESC_OFF_NEXT] = 0xff;
            h.0[o + DESC_OFF_NEXT + 1] = 0xff;
        }
        let (log, pending) = SplitInflight::open(h, 4, 0x8000).expect("open");
        assert_eq!(pending, vec![0, 1, 2]);
        // Heads past the table are ignored.
        let mut log = log;
        log.begin(60_000);
        log.before_used(60_000);
        log.after_used(60_000, 1);
    }

    /// Out-of-range accesses (client memory: a region smaller than the layout
    /// assumes) read as zero and drop writes instead of panicking.
    fn out_of_range() -> std::thread::Result<()> {
        std::panic::catch_unwind(|| {
            let (mut log, _) = SplitInflight::open(heap(4), 4, 0).expect("open");
            let end = region_bytes(4);
            assert_eq!(log.read_u8(end), 0);
            assert_eq!(log.read_u64(end - 4), 0, "straddling read");
            assert_eq!(log.read_u16(usize::MAX), 0, "offset overflow");
            log.write_u64(end - 4, u64::MAX);
            log.write_u8(usize::MAX, 1);
            // The in-range half of a straddling write lands; nothing past the end.
            assert_eq!(log.region.0.len(), end);
            assert_eq!(log.read_u16(end - 4), 0xffff);
        })
    }

    #[test]
    fn out_of_range_access_reads_zero_and_drops_writes() {
        out_of_range().expect("no panic");
    }

    #[test]
    fn out_of_range_access_negative_control() {
        PLANT_PTR_ASSERT.with(|p| p.set(true));
        let r = out_of_range();
        PLANT_PTR_ASSERT.with(|p| p.set(false));
        assert!(r.is_err(), "the planted assert did not fire");
    }

    /// A client region describing 64 descriptors for a queue of 8, with heads both
    /// below and above 8 (and more than 8 of them) in flight.
    fn oversized_region() -> Vec<u16> {
        let mut h = heap(64);
        h.0[OFF_VERSION] = 1;
        h.0[OFF_DESC_NUM] = 64;
        for (c, i) in [40u16, 3, 9, 63, 0, 7, 8, 12, 20, 30, 1, 2, 4, 5, 6]
            .into_iter()
            .enumerate()
        {
            let o = desc_off(i);
            h.0[o] = 1;
            h.0[o + DESC_OFF_COUNTER] = c as u8;
        }
        let (_, pending) = SplitInflight::open(h, 8, 0).expect("open");
        pending
    }

    #[test]
    fn pending_heads_past_the_queue_are_ignored() {
        assert_eq!(oversized_region(), vec![3, 0, 7, 1, 2, 4, 5, 6]);
    }

    #[test]
    fn pending_heads_past_the_queue_negative_control() {
        PLANT_ALL_PENDING.with(|p| p.set(true));
        let pending = oversized_region();
        PLANT_ALL_PENDING.with(|p| p.set(false));
        assert_eq!(pending.len(), 15, "the planted bug did not show");
    }
}
