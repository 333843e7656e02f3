//! Split-virtqueue pieces virtio-queue does not give us in the shape we need:
//! descriptor chains walked with explicit errors ([`walk`]), guest ranges turned
//! into host pointers with checks ([`host_ptr`]), and the INFLIGHT_SHMFD log of one
//! split queue ([`inflight`]).
//!
//! Layer: the vhost crate's data plane, below `blk` and `queue`. Imports vm-memory,
//! virtio-queue's descriptor type and virtio-bindings; nothing of the reactor or the
//! block layer, so that it runs in tests and the fuzz target without either.
//!
//! # Why not `virtio_queue::DescriptorChain`
//! Its iterator ends a chain silently on every fault (an index past the table, a loop
//! that exhausts its budget, a nested indirect table, an unreadable descriptor): a
//! malformed chain looks like a short one, and a virtio-blk device would then take
//! the last descriptor it saw for the status byte. [`walk`] reports each fault, so
//! the queue can mark itself broken instead of guessing. The avail ring, used ring and
//! notification suppression still come from virtio-queue's `Queue`.
//!
//! # Bounds
//! A chain is at most its table's size long (more is a loop), an indirect table at
//! most [`INDIRECT_DESCS_MAX`] entries, and a walk yields at most
//! [`CHAIN_DESCS_MAX`] descriptors.
//!
//! # Memory
//! Guest memory is hostile and shared: descriptors are read with `read_obj` (a copy),
//! so a guest changing them under us changes nothing after the walk. Host pointers
//! from [`host_ptr`] are valid while the caller holds the mapping (`Arc`) they came
//! from; the data behind them may change at any time (the guest's own business).

use std::ptr::NonNull;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

pub mod inflight;
#[cfg(test)]
pub(crate) mod testdriver;

/// Bytes of one split descriptor.
pub const DESC_BYTES: u64 = 16;
/// Entries of one indirect table at most (Linux allocates one per request, sized by
/// the segment count: `seg_max` + 2 is far below this).
pub const INDIRECT_DESCS_MAX: u32 = 1024;
/// Descriptors one chain yields at most (direct and indirect together).
pub const CHAIN_DESCS_MAX: usize = 1024;

const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// One buffer of a chain, as the driver described it (unchecked address and length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// Why a chain cannot be walked: the queue's structure is broken, not one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("descriptor index {index} outside a table of {size}")]
    IndexOutOfRange { index: u16, size: u32 },
    #[error("chain longer than its table (a loop)")]
    Loop,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    #[error("indirect table of {len} bytes")]
    BadIndirectTable { len: u32 },
    #[error("descriptor at {addr:#x} is not in guest memory")]
    Unreadable { addr: u64 },
    #[error("more than {CHAIN_DESCS_MAX} descriptors")]
    TooLong,
}

/// Walks the chain at `head` of the split descriptor table at `table` (`size`
/// entries) into `out` (cleared first), following one indirect table.
pub fn walk(
    mem: &GuestMemoryMmap,
    table: u64,
    size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = table;
    let mut table_size = u32::from(size);
    // Descriptors this table may still yield: a chain visiting more than its table
    // holds has visited one twice.
    let mut ttl = table_size;
    let mut index = head;
    let mut indirect = false;
    // The whole table in one region (the usual case): one translation per table
    // instead of one vm-memory read per descriptor. Otherwise each descriptor is
    // read on its own, as before (a table may straddle regions, or end outside
    // memory past the descriptors the chain uses).
    let mut fast = host_range(mem, table, u64::from(table_size) * DESC_BYTES);
    loop {
        if u32::from(index) >= table_size {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table_size,
            });
        }
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        ttl -= 1;
        // index < table_size <= 65536 and DESC_BYTES = 16: no overflow in the product.
        let addr = table
            .checked_add(u64::from(index) * DESC_BYTES)
            .ok_or(ChainError::Unreadable { addr: table })?;
        let d: Descriptor = match fast {
            Some(base) => {
                let mut raw = [0u8; DESC_BYTES as usize];
                // SAFETY: `index < table_size`, and `host_range` found all
                // `table_size` descriptors of this table mapped in one region of
                // `mem`, which the caller holds for the walk.
                unsafe {
                    let p = base.add(usize::from(index) * DESC_BYTES as usize);
                    read_volatile_bytes(p, &mut raw);
                }
                descriptor(&raw)
            }
            None => mem
                .read_obj(GuestAddress(addr))
                .map_err(|_| ChainError::Unreadable { addr })?,
        };
        let flags = d.flags();
        if flags & F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if flags & F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let len = d.len();
            let entries = len / DESC_BYTES as u32;
            if len == 0 || len % DESC_BYTES as u32 != 0 || entries > INDIRECT_DESCS_MAX {
                return Err(ChainError::BadIndirectTable { len });
            }
            table = d.addr().0;
            table_size = entries;
            ttl = entries;
            fast = host_range(mem, table, u64::from(len));
            index = 0;
            indirect = true;
            continue;
        }
        if out.len() >= CHAIN_DESCS_MAX {
            return Err(ChainError::TooLong);
        }
        out.push(Desc {
            addr: d.addr().0,
            len: d.len(),
            writable: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Ok(());
        }
        index = d.next();
    }
}

/// A split descriptor from its 16 little-endian bytes (`le64 addr, le32 len,
/// le16 flags, le16 next`).
fn descriptor(raw: &[u8; DESC_BYTES as usize]) -> Descriptor {
    let u64_at = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&raw[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let (addr, rest) = (u64_at(0), u64_at(8));
    Descriptor::new(addr, rest as u32, (rest >> 32) as u16, (rest >> 48) as u16)
}

/// The host address of guest range `addr..addr + len` (`len > 0`), when the whole
/// range lies in one mapped region (checked arithmetic: no wrap past `u64::MAX`).
/// The region lookup and the two bound checks only: vm-memory's `get_slice` does the
/// same checks but builds a `VolatileSlice` (with its dirty bitmap) on the way, which
/// cost ~100 instructions per call on the per-request path (callgrind).
pub fn host_ptr(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Option<NonNull<u8>> {
    host_range(mem, addr, u64::from(len))
}

fn host_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Option<NonNull<u8>> {
    if len == 0 {
        return None;
    }
    let end = addr.checked_add(len)?;
    let region = mem.find_region(GuestAddress(addr))?;
    let start = region.start_addr().0;
    // `find_region` returns the region with start <= addr <= its last address, so
    // neither subtraction wraps; a range running past the region's end is refused.
    if end - start > region.len() {
        return None;
    }
    let p = region
        .get_host_address(MemoryRegionAddress(addr - start))
        .ok()?;
    NonNull::new(p)
}

/// Copies `out.len()` bytes of guest memory at host pointer `p` (from [`host_ptr`]
/// for at least that length) with volatile loads: the guest may write them at any
/// time, and each byte is read once.
///
/// # Safety
/// `p..p + out.len()` is mapped and readable (the caller holds the mapping).
pub unsafe fn read_volatile_bytes(p: NonNull<u8>, out: &mut [u8]) {
    let src = p.as_ptr();
    if out.len() == 16 && (src as usize) % 8 == 0 {
        // SAFETY: 16 readable bytes (the caller), 8-aligned: two aligned u64 loads.
        let (a, b) = unsafe {
            (
                std::ptr::read_volatile(src.cast::<u64>()),
                std::ptr::read_volatile(src.add(8).cast::<u64>()),
            )
        };
        out[..8].copy_from_slice(&a.to_ne_bytes());
        out[8..].copy_from_slice(&b.to_ne_bytes());
        return;
    }
    for (i, o) in out.iter_mut().enumerate() {
        // SAFETY: `i < out.len()`: inside the caller's readable range.
        *o = unsafe { std::ptr::read_volatile(src.add(i)) };
    }
}

/// Whether a whole guest range lies in one mapped region.
pub fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u32) -> bool {
    len == 0 || host_ptr(mem, addr, len).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two adjacent regions: [0, 4 KiB) and [4 KiB, 8 KiB).
    fn two_regions() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .expect("guest memory")
    }

    fn put(mem: &GuestMemoryMmap, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(table + i * DESC_BYTES))
            .expect("descriptor write");
    }

    /// The one-translation path (aligned and unaligned tables) and the
    /// per-descriptor path (a table across two regions) walk the same chain.
    #[test]
    fn walk_is_the_same_with_and_without_one_table_translation() {
        let mem = two_regions();
        let mut want = None;
        // 0x100: in one region, aligned; 0x203: unaligned (byte loads); 0xfd0: the
        // table straddles the region boundary (vm-memory reads).
        for table in [0x100u64, 0x203, 0xfd0] {
            put(&mem, table, 0, 0x1100, 16, F_NEXT, 2);
            put(&mem, table, 2, 0x1200, 4096 - 512, F_NEXT | F_WRITE, 3);
            put(&mem, table, 3, 0x1f00, 1, F_WRITE, 0);
            assert_eq!(
                host_range(&mem, table, 4 * DESC_BYTES).is_some(),
                table != 0xfd0
            );
            let mut out = Vec::new();
            walk(&mem, table, 4, 0, &mut out).expect("walk");
            assert_eq!(out.len(), 3, "table {table:#x}");
            assert_eq!(
                out[1],
                Desc {
                    addr: 0x1200,
                    len: 4096 - 512,
                    writable: true
                }
            );
            match &want {
                None => want = Some(out),
                Some(w) => assert_eq!(&out, w, "table {table:#x}"),
            }
        }
    }

    #[test]
    fn host_ptr_keeps_ranges_inside_one_region() {
        let mem = two_regions();
        assert!(host_ptr(&mem, 0xfff, 1).is_some());
        assert!(host_ptr(&mem, 0xfff, 2).is_none(), "across two regions");
        assert!(host_ptr(&mem, 0x1000, 0x1000).is_some());
        assert!(host_ptr(&mem, 0x1000, 0x1001).is_none(), "past the end");
        assert!(host_ptr(&mem, 0x2000, 1).is_none(), "outside memory");
        assert!(host_ptr(&mem, u64::MAX, 1).is_none(), "wraps");
        assert!(host_ptr(&mem, 0, 0).is_none(), "empty");
        // The same byte through vm-memory and through the pointer.
        mem.write_obj(0xa5u8, GuestAddress(0x1234)).expect("write");
        let p = host_ptr(&mem, 0x1234, 1).expect("mapped");
        // SAFETY: `mem` is alive and maps the byte.
        assert_eq!(unsafe { std::ptr::read_volatile(p.as_ptr()) }, 0xa5);
    }
}
