//! Fuzz entry point: a plain function, so the cargo-fuzz target in `fuzz/`, the
//! corpus test and the proptest in this crate run the same code.
//!
//! [`fuzz_virtqueue`] lays arbitrary bytes out as a split virtqueue in a fake guest
//! memory (two mapped regions with a hole between them) and runs what the queue's
//! poller runs on the data path, minus the block layer: pop avail heads with
//! virtio-queue, [`walk`] each chain, [`parse`](crate::blk::parse) it,
//! answer it (status byte, GET_ID, used ring, notification check) and keep an
//! inflight log. It must never panic, and it asserts the parser's promises with an
//! independent oracle:
//! - a walk yields at most `CHAIN_DESCS_MAX` descriptors;
//! - the status byte of a parsed request is in guest memory;
//! - every data segment lies inside one mapped region, there are at most
//!   `SG_SEGS_MAX`, their lengths add up to the request's length, a multiple of 512;
//! - reads take no readable data, writes no writable data besides the status, and
//!   a read-only queue never yields a write, discard or write-zeroes;
//! - discard/zeroes ranges are at most `DISCARD_SEG_MAX` and end without overflow;
//! - no more heads are served than the ring's size.
//!
//! # Input format
//! byte 0: queue size `1 << (b % 9)` (1..=256); byte 1: bit 0 read-only, bit 1
//! EVENT_IDX, bit 2 an inflight log, bit 3 an inflight log left by a previous server
//! (its bytes follow the avail ring); bytes 2..4: next avail index (LE); then the
//! descriptor table (`size * 16` bytes, at guest address 0), the avail ring
//! (`4 + 2 * size + 2` bytes, at 0x1000), with bit 3 the old log
//! (`16 + 16 * size` bytes), and the rest at 0x3000 (data buffers; bytes past
//! 0xd000 go to the second region at 0x20000). Missing bytes are zeros.

use std::ptr::NonNull;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::blk::{self, Kind, Scratch, DISCARD_SEG_MAX, SECTOR_BYTES, S_OK};
use crate::virtq::inflight::{region_bytes, Region, SplitInflight};
use crate::virtq::{walk, Desc, CHAIN_DESCS_MAX};
use ringblk_target::bdev::SG_SEGS_MAX;

/// Guest layout of the fuzz queue.
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x1000;
pub const USED_RING: u64 = 0x2000;
pub const DATA: u64 = 0x3000;
/// The first region: `0..REGION0_BYTES`.
pub const REGION0_BYTES: usize = 0x10000;
/// The second region, after a hole.
pub const REGION1: u64 = 0x20000;
pub const REGION1_BYTES: usize = 0x1000;

struct Heap(Box<[u8]>);

impl Region for Heap {
    fn as_ptr(&self) -> NonNull<u8> {
        NonNull::new(self.0.as_ptr() as *mut u8).expect("a box is never null")
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Runs one input (module docs). Panics only when an invariant is broken.
pub fn fuzz_virtqueue(data: &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let size: u16 = 1 << (byte(0) % 9);
    let flags = byte(1);
    let read_only = flags & 1 != 0;
    let event_idx = flags & 2 != 0;
    let next_avail = u16::from_le_bytes([byte(2), byte(3)]);
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), REGION0_BYTES),
        (GuestAddress(REGION1), REGION1_BYTES),
    ]) else {
        return;
    };
    let rest = data.get(4..).unwrap_or(&[]);
    let desc_bytes = usize::from(size) * 16;
    let avail_bytes = 4 + 2 * usize::from(size) + 2;
    let (table, rest) = rest.split_at(desc_bytes.min(rest.len()));
    let (avail, rest) = rest.split_at(avail_bytes.min(rest.len()));
    // Bit 3: the inflight region left by a previous server comes from the input.
    let (old_log, rest) = if flags & 8 != 0 {
        rest.split_at(region_bytes(size).min(rest.len()))
    } else {
        rest.split_at(0)
    };
    let data0 = REGION0_BYTES - DATA as usize;
    let (buf0, buf1) = rest.split_at(data0.min(rest.len()));
    let buf1 = &buf1[..buf1.len().min(REGION1_BYTES)];
    for (bytes, at) in [
        (table, DESC_TABLE),
        (avail, AVAIL_RING),
        (buf0, DATA),
        (buf1, REGION1),
    ] {
        if mem.write_slice(bytes, GuestAddress(at)).is_err() {
            return;
        }
    }
    let Ok(mut q) = Queue::new(size) else {
        return;
    };
    for r in [
        q.try_set_desc_table_address(GuestAddress(DESC_TABLE)),
        q.try_set_avail_ring_address(GuestAddress(AVAIL_RING)),
        q.try_set_used_ring_address(GuestAddress(USED_RING)),
    ] {
        if r.is_err() {
            return;
        }
    }
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.set_next_avail(next_avail);
    assert!(q.is_valid(&mem), "the fuzz rings are in memory");
    // The used ring's index is 0 (fresh memory); with a log, pending heads are
    // served first and the avail ring continues after them, as `queue` does.
    let mut resubmit = Vec::new();
    let mut log = if flags & 12 != 0 {
        let mut bytes = vec![0u8; region_bytes(size)];
        bytes[..old_log.len()].copy_from_slice(old_log);
        match SplitInflight::open(Heap(bytes.into_boxed_slice()), size, 0) {
            Ok((l, pending)) => {
                assert!(
                    pending.len() <= usize::from(size),
                    "more pending than the ring"
                );
                if !pending.is_empty() {
                    q.set_next_avail(pending.len() as u16);
                }
                resubmit = pending;
                Some(l)
            }
            Err(_) => None,
        }
    } else {
        None
    };

    let id = blk::serial("fuzz-volume-with-a-long-name");
    let mut descs: Vec<Desc> = Vec::new();
    let mut scratch = Scratch::default();
    let mut heads = resubmit;
    let resubmits = heads.len();
    {
        let Ok(mut it) = q.iter(&mem) else {
            return;
        };
        for chain in it.by_ref() {
            heads.push(chain.head_index());
            assert!(
                heads.len() - resubmits <= usize::from(size),
                "more heads than the ring"
            );
        }
    }
    for (k, head) in heads.into_iter().enumerate() {
        if walk(&mem, DESC_TABLE, size, head, &mut descs).is_err() {
            // The queue would be broken here: nothing more is served.
            return;
        }
        assert!(descs.len() <= CHAIN_DESCS_MAX);
        if let Some(l) = &mut log {
            if k >= resubmits {
                l.begin(head);
            }
        }
        let Ok(req) = blk::parse(&mem, &descs, read_only, &mut scratch) else {
            return;
        };
        check(&mem, &descs, read_only, &req, &scratch);
        let st = match req.kind {
            Kind::GetId => {
                let n = blk::write_id(&mem, &scratch.id, &id);
                assert!(n.is_none_or(|n| n as usize <= blk::ID_BYTES));
                S_OK
            }
            Kind::Fail(st) => st,
            _ => S_OK,
        };
        assert!(mem.write_obj(st, GuestAddress(req.status)).is_ok());
        if let Some(l) = &mut log {
            l.before_used(head);
        }
        if q.add_used(&mem, head, 1).is_err() {
            return;
        }
        if let Some(l) = &mut log {
            l.after_used(head, q.next_used());
        }
        let _ = q.needs_notification(&mem);
    }
    let _ = q.enable_notification(&mem);
}

/// The oracle of [`blk::parse`]'s promises (module docs).
fn check(mem: &GuestMemoryMmap, descs: &[Desc], read_only: bool, req: &blk::Request, s: &Scratch) {
    assert!(
        crate::virtq::in_memory(mem, req.status, 1),
        "status byte outside memory"
    );
    let readable: u64 = descs
        .iter()
        .filter(|d| !d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    let writable: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    match req.kind {
        Kind::Read { len, .. } | Kind::Write { len, .. } => {
            assert!(s.segs.len() <= SG_SEGS_MAX);
            let total: u64 = s.segs.iter().map(|&(_, n)| u64::from(n)).sum();
            assert_eq!(total, u64::from(len), "segments do not add up");
            assert_eq!(u64::from(len) % SECTOR_BYTES, 0);
            for &(p, n) in &s.segs {
                assert!(n > 0 && mapped(mem, p, n), "segment outside guest memory");
            }
            if let Kind::Read { .. } = req.kind {
                assert_eq!(
                    readable,
                    blk::HEADER_BYTES as u64,
                    "read with readable data"
                );
                assert_eq!(writable, u64::from(len) + 1);
            } else {
                assert!(!read_only, "write on a read-only queue");
                assert_eq!(writable, 1, "write with writable data");
                assert_eq!(readable, blk::HEADER_BYTES as u64 + u64::from(len));
            }
        }
        Kind::Discard | Kind::WriteZeroes { .. } => {
            assert!(!read_only, "discard or zeroes on a read-only queue");
            assert!(!s.ranges.is_empty() && s.ranges.len() <= DISCARD_SEG_MAX as usize);
            for r in &s.ranges {
                assert!(r.offset.checked_add(r.len).is_some());
            }
        }
        Kind::GetId => assert!(!s.id.is_empty()),
        Kind::Flush | Kind::Fail(_) => {}
    }
}

/// Whether host range `p..p + n` lies inside one region's mapping.
fn mapped(mem: &GuestMemoryMmap, p: NonNull<u8>, n: u32) -> bool {
    let start = p.as_ptr() as usize;
    let Some(end) = start.checked_add(n as usize) else {
        return false;
    };
    mem.iter().any(|r| {
        let Ok(base) = r.get_host_address(MemoryRegionAddress(0)) else {
            return false;
        };
        let base = base as usize;
        start >= base && end <= base + r.len() as usize
    })
}

/// Builds inputs in the format above (the corpus seeds and the proptest's
/// starting points).
#[cfg(test)]
pub(crate) mod seed {
    use super::DATA;

    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;
    pub const INDIRECT: u16 = 4;

    pub struct Input {
        size: u16,
        flags: u8,
        next_avail: u16,
        avail_idx: u16,
        table: Vec<u8>,
        avail: Vec<u8>,
        /// The old inflight log (input bit 3).
        log: Vec<u8>,
        data: Vec<u8>,
    }

    impl Input {
        pub fn new(size: u16, flags: u8) -> Input {
            assert!(size.is_power_of_two() && size <= 256);
            Input {
                size,
                flags,
                next_avail: 0,
                avail_idx: 0,
                table: vec![0; usize::from(size) * 16],
                avail: vec![0; 4 + 2 * usize::from(size) + 2],
                log: vec![0; 16 + 16 * usize::from(size)],
                data: Vec::new(),
            }
        }

        pub fn next_avail(mut self, v: u16) -> Input {
            self.next_avail = v;
            self
        }

        /// Descriptor `i` of a table (the ring's when `table` is `None`).
        pub fn desc(
            &mut self,
            table: Option<u64>,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            match table {
                None => {
                    let o = usize::from(i) * 16;
                    self.table[o..o + 16].copy_from_slice(&d);
                }
                Some(at) => {
                    let o = (at - DATA) as usize + usize::from(i) * 16;
                    if self.data.len() < o + 16 {
                        self.data.resize(o + 16, 0);
                    }
                    self.data[o..o + 16].copy_from_slice(&d);
                }
            }
        }

        /// Bytes in the data area; returns their guest address.
        pub fn put(&mut self, bytes: &[u8]) -> u64 {
            let at = DATA + self.data.len() as u64;
            self.data.extend_from_slice(bytes);
            at
        }

        pub fn header(&mut self, kind: u32, sector: u64) -> u64 {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.put(&h)
        }

        /// `chain` in ring descriptors `first..`; returns the head.
        pub fn chain(&mut self, first: u16, chain: &[(u64, u32, u16)]) -> u16 {
            for (k, &(addr, len, flags)) in chain.iter().enumerate() {
                let i = first + k as u16;
                let f = if k + 1 < chain.len() {
                    flags | NEXT
                } else {
                    flags
                };
                self.desc(None, i, addr, len, f, i + 1);
            }
            first
        }

        /// `chain` as an indirect table, named by ring descriptor `at`.
        pub fn indirect(&mut self, at: u16, chain: &[(u64, u32, u16)]) -> u16 {
            let table = self.put(&vec![0u8; chain.len() * 16]);
            for (k, &(addr, len, flags)) in chain.iter().enumerate() {
                let f = if k + 1 < chain.len() {
                    flags | NEXT
                } else {
                    flags
                };
                self.desc(Some(table), k as u16, addr, len, f, k as u16 + 1);
            }
            self.desc(None, at, table, (chain.len() * 16) as u32, INDIRECT, 0);
            at
        }

        pub fn publish(&mut self, head: u16) {
            let i = usize::from(self.next_avail.wrapping_add(self.avail_idx) % self.size);
            self.avail[4 + 2 * i..6 + 2 * i].copy_from_slice(&head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            let idx = self.next_avail.wrapping_add(self.avail_idx);
            self.avail[2..4].copy_from_slice(&idx.to_le_bytes());
        }

        /// The old log says `head` is in flight, popped `counter`-th.
        pub fn logged(&mut self, head: u16, counter: u64) {
            self.log[8] = 1; // version
            self.log[10..12].copy_from_slice(&self.size.to_le_bytes());
            let o = 16 + 16 * usize::from(head);
            self.log[o] = 1;
            self.log[o + 8..o + 16].copy_from_slice(&counter.to_le_bytes());
        }

        pub fn bytes(&self) -> Vec<u8> {
            let mut v = vec![self.size.trailing_zeros() as u8, self.flags];
            v.extend_from_slice(&self.next_avail.to_le_bytes());
            v.extend_from_slice(&self.table);
            v.extend_from_slice(&self.avail);
            if self.flags & 8 != 0 {
                v.extend_from_slice(&self.log);
            }
            v.extend_from_slice(&self.data);
            v
        }
    }

    /// Seeds: every request type, layouts, and malformed chains.
    pub fn all() -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        // A read and a write with two segments.
        let mut q = Input::new(8, 0);
        let h = q.header(0, 1);
        let d = q.put(&[0; 512]);
        let s = q.put(&[0xff]);
        let a = q.chain(0, &[(h, 16, 0), (d, 512, WRITE), (s, 1, WRITE)]);
        q.publish(a);
        let h = q.header(1, 2);
        let d = q.put(&[7; 1024]);
        let s = q.put(&[0xff]);
        let b = q.chain(
            3,
            &[(h, 16, 0), (d, 512, 0), (d + 512, 512, 0), (s, 1, WRITE)],
        );
        q.publish(b);
        out.push(("read-write", q.bytes()));
        // Flush, GET_ID, an unknown type, wrapping avail index.
        let mut q = Input::new(4, 0).next_avail(0xfffe);
        let h = q.header(4, 0);
        let s = q.put(&[0xff]);
        let a = q.chain(0, &[(h, 16, 0), (s, 1, WRITE)]);
        q.publish(a);
        let h = q.header(8, 0);
        let d = q.put(&[0; 21]);
        let b = q.chain(2, &[(h, 16, 0), (d, 21, WRITE)]);
        q.publish(b);
        let h = q.header(2, 0);
        let s = q.put(&[0xff]);
        let c = q.chain(0, &[(h, 16, 0), (s, 1, WRITE)]);
        q.publish(c);
        out.push(("flush-getid-unknown", q.bytes()));
        // Discard and write zeroes with flags.
        let mut q = Input::new(8, 0);
        for (i, kind) in [(0u16, 11u32), (3, 13)] {
            let h = q.header(kind, 0);
            let mut seg = Vec::new();
            for (sector, n, flags) in [(8u64, 8u32, 0u32), (64, 16, u32::from(kind == 13))] {
                seg.extend_from_slice(&sector.to_le_bytes());
                seg.extend_from_slice(&n.to_le_bytes());
                seg.extend_from_slice(&flags.to_le_bytes());
            }
            let d = q.put(&seg);
            let s = q.put(&[0xff]);
            let head = q.chain(i, &[(h, 16, 0), (d, 32, 0)]);
            q.desc(None, i + 1, d, 32, NEXT, i + 2);
            q.desc(None, i + 2, s, 1, WRITE, 0);
            q.publish(head);
        }
        out.push(("discard-zeroes", q.bytes()));
        // Indirect read; a split header; status inside the data buffer.
        let mut q = Input::new(4, 2);
        let h = q.header(0, 0);
        let d = q.put(&[0; 4097]);
        let a = q.indirect(0, &[(h, 8, 0), (h + 8, 8, 0), (d, 4097, WRITE)]);
        q.publish(a);
        out.push(("indirect-anylayout", q.bytes()));
        // Malformed: a loop, a nested indirect table, a head past the table.
        let mut q = Input::new(4, 0);
        let h = q.header(0, 0);
        q.desc(None, 0, h, 16, NEXT, 1);
        q.desc(None, 1, h, 16, NEXT | WRITE, 0);
        q.publish(0);
        out.push(("loop", q.bytes()));
        let mut q = Input::new(4, 0);
        let inner = q.put(&[0; 16]);
        let t = q.put(&[0; 16]);
        q.desc(Some(t), 0, inner, 16, INDIRECT, 0);
        q.desc(None, 0, t, 16, INDIRECT, 0);
        q.publish(0);
        q.publish(9);
        out.push(("nested-indirect", q.bytes()));
        // Read-only queue, a write; buffers in the second region and across the hole.
        let mut q = Input::new(8, 1 | 4);
        let h = q.header(1, 0);
        let s = q.put(&[0xff]);
        let a = q.chain(0, &[(h, 16, 0), (super::REGION1, 512, 0), (s, 1, WRITE)]);
        q.publish(a);
        let h = q.header(0, 0);
        let b = q.chain(4, &[(h, 16, 0), (0xff00, 512, WRITE), (s, 1, WRITE)]);
        q.publish(b);
        out.push(("read-only-regions", q.bytes()));
        // Too many segments (an indirect table of 260).
        let mut q = Input::new(2, 0);
        let h = q.header(0, 0);
        let s = q.put(&[0xff]);
        let mut chain = vec![(h, 16, 0)];
        chain.extend((0..258u64).map(|i| (super::REGION1 + 8 * i, 8, WRITE)));
        chain.push((s, 1, WRITE));
        let a = q.indirect(0, &chain);
        q.publish(a);
        out.push(("too-many-segments", q.bytes()));
        // A restart: the old log holds two reads in flight (popped in the other
        // order), the avail ring one more after them.
        let mut q = Input::new(8, 8);
        for (first, counter) in [(0u16, 7u64), (3, 2)] {
            let h = q.header(0, u64::from(first));
            let d = q.put(&[0; 512]);
            let s = q.put(&[0xff]);
            let head = q.chain(first, &[(h, 16, 0), (d, 512, WRITE), (s, 1, WRITE)]);
            q.logged(head, counter);
            q.publish(head);
        }
        let h = q.header(1, 0);
        let d = q.put(&[5; 512]);
        let s = q.put(&[0xff]);
        let c = q.chain(5, &[(h, 16, 0), (d, 512, 0), (s, 1, WRITE)]);
        q.publish(c);
        out.push(("resubmit", q.bytes()));
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fuzz/corpus/virtqueue");

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// Random bytes through the fuzz entry (what CI runs in place of libFuzzer).
        #[test]
        fn random_queues_never_panic(data in proptest::collection::vec(any::<u8>(), 0..6000)) {
            fuzz_virtqueue(&data);
        }

        /// Seeds with random bytes overwritten: mostly-valid queues, the part random
        /// bytes alone never reach.
        #[test]
        fn mutated_seeds_never_panic(
            pick in 0usize..64,
            edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..16),
        ) {
            let seeds = seed::all();
            let mut data = seeds[pick % seeds.len()].1.clone();
            for (at, b) in edits {
                let n = data.len();
                data[usize::from(at) % n] = b;
            }
            fuzz_virtqueue(&data);
        }
    }

    /// The oracle can fail: a parser planted to ignore the read-only flag hands the
    /// read-only seed's write over, and the entry panics on it.
    #[test]
    fn oracle_negative_control() {
        use crate::blk::plant::{self, Plant};
        let seeds = seed::all();
        let (_, ro) = seeds
            .iter()
            .find(|(n, _)| *n == "read-only-regions")
            .expect("seed");
        fuzz_virtqueue(ro);
        let caught = std::panic::catch_unwind(|| {
            plant::with(Plant::IgnoreReadOnly, || fuzz_virtqueue(ro));
        });
        assert!(
            caught.is_err(),
            "a write on a read-only queue passed the oracle"
        );
    }

    /// The seeds in `fuzz/corpus/virtqueue` are the ones `seed::all` builds
    /// (`RINGBLK_BLESS_CORPUS=1` rewrites them), and every file there passes.
    #[test]
    fn corpus_is_current_and_passes() {
        let bless = std::env::var_os("RINGBLK_BLESS_CORPUS").is_some();
        if bless {
            std::fs::create_dir_all(CORPUS).expect("corpus dir");
        }
        for (name, bytes) in seed::all() {
            let path = format!("{CORPUS}/{name}");
            if bless {
                std::fs::write(&path, &bytes).expect("write seed");
            }
            let on_disk = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(on_disk, bytes, "{path} is stale: RINGBLK_BLESS_CORPUS=1");
        }
        let mut n = 0;
        for e in std::fs::read_dir(CORPUS).expect("fuzz/corpus/virtqueue") {
            let p = e.expect("entry").path();
            fuzz_virtqueue(&std::fs::read(&p).expect("corpus file"));
            n += 1;
        }
        assert!(n > 0, "no corpus files in {CORPUS}");
    }
}
