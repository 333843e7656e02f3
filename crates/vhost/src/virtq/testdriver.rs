//! A test-side virtio driver: writes descriptors, the avail ring and request
//! buffers into a fake guest memory (anonymous mappings) by hand, and reads the used
//! ring back. Independent of the device code: it shares no helper with `walk` or
//! `parse`, so a bug there cannot hide itself.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest layout: one region of [`MEM_BYTES`] at 0.
pub const MEM_BYTES: usize = 8 << 20;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x10000;
pub const USED: u64 = 0x20000;
const HEAP: u64 = 0x40000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// A request as the driver built it.
#[derive(Clone, Copy, Debug)]
pub struct Req {
    pub head: u16,
    pub status: u64,
    /// The data buffer (reads land here; writes come from here).
    pub data: u64,
}

pub struct Driver {
    pub mem: Arc<GuestMemoryMmap>,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    heap: u64,
}

impl Driver {
    /// A queue of `size` descriptors in a fresh memory.
    pub fn new(size: u16) -> Driver {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
            .expect("anonymous guest memory");
        Driver {
            mem: Arc::new(mem),
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            heap: HEAP,
        }
    }

    /// `len` bytes of guest memory, 4 KiB aligned (a bump allocator).
    pub fn alloc(&mut self, len: usize) -> u64 {
        let at = self.heap;
        self.heap = (self.heap + len.max(1) as u64 + 4095) & !4095;
        assert!(self.heap <= MEM_BYTES as u64, "test guest memory exhausted");
        at
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("driver write");
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("driver read");
        v
    }

    pub fn byte(&self, addr: u64) -> u8 {
        self.read(addr, 1)[0]
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn set_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(table + u64::from(i) * 16, &d);
    }

    /// Writes `chain` (`(addr, len, flags)`, NEXT added) into consecutive
    /// descriptors of the ring's table; returns the head.
    pub fn chain(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let next = (i + 1) % self.size;
            let f = if k + 1 < chain.len() {
                flags | F_NEXT
            } else {
                flags
            };
            self.set_desc(DESC, i, addr, len, f, next);
        }
        self.next_desc = (head + chain.len() as u16) % self.size;
        head
    }

    /// Writes `chain` as an indirect table in guest memory and one INDIRECT
    /// descriptor in the ring's table pointing at it; returns the head.
    pub fn indirect(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
        let table = self.alloc(chain.len() * 16);
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let f = if k + 1 < chain.len() {
                flags | F_NEXT
            } else {
                flags
            };
            self.set_desc(table, k as u16, addr, len, f, k as u16 + 1);
        }
        self.chain(&[(table, (chain.len() * 16) as u32, F_INDIRECT)])
    }

    /// Puts `head` in the avail ring and publishes the new index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write(AVAIL + 2, &self.avail_idx.to_le_bytes());
    }

    /// Sets the avail index without adding entries (hostile drivers).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write(AVAIL + 2, &idx.to_le_bytes());
    }

    /// EVENT_IDX: the driver's `used_event` (after the avail ring).
    pub fn set_used_event(&self, v: u16) {
        self.write(AVAIL + 4 + 2 * u64::from(self.size), &v.to_le_bytes());
    }

    pub fn used_idx(&self) -> u16 {
        let b = self.read(USED + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Used entries `(id, len)` published since the last call.
    pub fn used(&mut self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = USED + 4 + 8 * u64::from(self.used_seen % self.size);
            let b = self.read(at, 8);
            out.push((
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// A 16-byte request header in guest memory.
    pub fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let at = self.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(at, &h);
        at
    }

    /// A status byte, pre-set to 0xff so that an untouched one shows.
    pub fn status_byte(&mut self) -> u64 {
        let at = self.alloc(1);
        self.write(at, &[0xff]);
        at
    }

    /// IN of `len` bytes at `sector`: header, one data buffer, status.
    pub fn read_req(&mut self, sector: u64, len: u32) -> Req {
        let hdr = self.header(0, sector);
        let data = self.alloc(len as usize);
        let status = self.status_byte();
        let head = self.chain(&[(hdr, 16, 0), (data, len, F_WRITE), (status, 1, F_WRITE)]);
        Req { head, status, data }
    }

    /// OUT of `bytes` at `sector`: header, one data buffer, status.
    pub fn write_req(&mut self, sector: u64, bytes: &[u8]) -> Req {
        let hdr = self.header(1, sector);
        let data = self.alloc(bytes.len());
        self.write(data, bytes);
        let status = self.status_byte();
        let head = self.chain(&[
            (hdr, 16, 0),
            (data, bytes.len() as u32, 0),
            (status, 1, F_WRITE),
        ]);
        Req { head, status, data }
    }

    /// A request of `kind` with no data: header and status.
    pub fn bare_req(&mut self, kind: u32) -> Req {
        let hdr = self.header(kind, 0);
        let status = self.status_byte();
        let head = self.chain(&[(hdr, 16, 0), (status, 1, F_WRITE)]);
        Req {
            head,
            status,
            data: 0,
        }
    }

    /// DISCARD (11) or WRITE_ZEROES (13) of `segs` (`sector, sectors, flags`).
    pub fn dwz_req(&mut self, kind: u32, segs: &[(u64, u32, u32)]) -> Req {
        let hdr = self.header(kind, 0);
        let data = self.alloc(segs.len() * 16);
        for (k, &(sector, n, flags)) in segs.iter().enumerate() {
            let mut s = [0u8; 16];
            s[..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&n.to_le_bytes());
            s[12..].copy_from_slice(&flags.to_le_bytes());
            self.write(data + 16 * k as u64, &s);
        }
        let status = self.status_byte();
        let head = self.chain(&[
            (hdr, 16, 0),
            (data, (segs.len() * 16) as u32, 0),
            (status, 1, F_WRITE),
        ]);
        Req { head, status, data }
    }
}
