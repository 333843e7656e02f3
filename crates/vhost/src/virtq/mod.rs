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
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
        let d: Descriptor = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| ChainError::Unreadable { addr })?;
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

/// The host address of guest range `addr..addr + len` (`len > 0`), when the whole
/// range lies in one mapped region (checked arithmetic: no wrap past `u64::MAX`).
pub fn host_ptr(mem: &GuestMemoryMmap, addr: u64, len: u32) -> Option<NonNull<u8>> {
    if len == 0 {
        return None;
    }
    addr.checked_add(u64::from(len))?;
    // `get_slice` finds the region holding `addr` and checks `offset + len` against
    // its length; a range running into the next region is refused.
    let slice = mem.get_slice(GuestAddress(addr), len as usize).ok()?;
    NonNull::new(slice.ptr_guard_mut().as_ptr())
}

/// Whether a whole guest range lies in one mapped region.
pub fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u32) -> bool {
    len == 0 || host_ptr(mem, addr, len).is_some()
}
