//! virtio-blk requests, sans IO: a walked descriptor chain in, a checked request
//! out ([`parse`]); the device limits the control plane advertises. (Block-layer
//! errors become status bytes in `crate::errors`, the one mapping.)
//!
//! Layer: the vhost data plane, above `virtq` and below `queue`. Imports vm-memory,
//! virtio-bindings and the block layer's vocabulary (`BlockError`, `SG_SEGS_MAX`);
//! no reactor, no channel: it runs in tests and the fuzz target as is.
//!
//! # Layout (virtio 1.x, VIRTIO_F_ANY_LAYOUT)
//! A request is device-readable bytes then device-writable bytes. The first 16
//! readable bytes are the header (`le32 type, le32 ioprio, le64 sector`), wherever
//! descriptors split them; the last writable byte is the status. Between them: OUT
//! data, or DISCARD/WRITE_ZEROES segments (readable), or IN/GET_ID data (writable).
//! A request is refused (`IOERR`) when data sits on the wrong side for its type, and
//! `UNSUPP` for unknown types and flags, as the spec says.
//!
//! # Errors
//! [`parse`] returns `Err` only when no status byte is reachable (no writable byte
//! last in the chain, a readable one after it, or its address outside memory): the
//! request cannot even be failed, and the queue marks itself broken. Everything else
//! becomes a [`Kind::Fail`] with the status to write.
//!
//! # Bounds
//! At most [`SG_SEGS_MAX`] data segments, at most `u32::MAX` data bytes (lengths are
//! summed in `u64`), at most [`DISCARD_SEG_MAX`] discard/zeroes segments of at most
//! [`DISCARD_SECTORS_MAX`] sectors each; every sector offset is `checked_mul`ed.
//! The block layer checks ranges against the volume.

use std::ptr::NonNull;

use ringblk_target::bdev::SG_SEGS_MAX;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtq::{host_ptr, read_volatile_bytes, Desc};

/// virtio-blk sectors are 512 bytes whatever the block size.
pub const SECTOR_BYTES: u64 = 512;
pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Bytes of a GET_ID answer (not NUL-terminated when the name fills them).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// `seg_max` to advertise: data segments of one request (header and status are
/// two more descriptors). Each becomes one entry of the request's `SgList`.
pub const SEG_MAX: u32 = SG_SEGS_MAX as u32 - 2;
/// `size_max` to advertise: bytes of one segment. With [`SEG_MAX`] it keeps a
/// request under the block layer's 32 MiB (`Geometry::max_io_bytes`).
pub const SIZE_MAX_BYTES: u32 = 128 << 10;
/// `max_discard_seg` and `max_write_zeroes_seg`.
pub const DISCARD_SEG_MAX: u32 = 16;
/// `max_discard_sectors` and `max_write_zeroes_sectors`: 4 GiB - 512 B, so that a
/// segment's byte length fits a `u32` (drivers compute it in 32 bits).
pub const DISCARD_SECTORS_MAX: u32 = u32::MAX >> 9;
/// Bytes of the request header.
pub const HEADER_BYTES: usize = 16;
/// Bytes of one discard/write-zeroes segment (`le64 sector, le32 num_sectors,
/// le32 flags`).
pub const DWZ_SEG_BYTES: usize = 16;

const _: () = assert!(SEG_MAX as usize + 2 <= SG_SEGS_MAX);

/// Bugs planted on purpose for the tests' negative controls (a check that cannot
/// fail proves nothing). Compiled in always, but only a test can set one: outside
/// `cfg(test)` [`planted`] is a constant `false`.
pub(crate) mod plant {
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Plant {
        /// `parse` hands data segments over in reverse order.
        ReverseSegments,
        /// `parse` skips the data-direction checks.
        NoDirectionCheck,
        /// `parse` ignores the queue's read-only flag.
        IgnoreReadOnly,
        /// `stop_queue` replies without waiting for requests in flight.
        ReplyEarly,
        /// The queue signals the call eventfd whatever EVENT_IDX says.
        AlwaysSignal,
        /// The queue keeps popping after the channel said `Full`.
        PopWhenFull,
        /// A stopped queue keeps its fds, mapping and inflight log past the reply.
        KeepResources,
    }

    #[cfg(test)]
    thread_local! {
        static PLANT: std::cell::Cell<Option<Plant>> = const { std::cell::Cell::new(None) };
    }

    /// Whether `p` is planted on this thread (the test's, which runs the reactor).
    pub(crate) fn planted(p: Plant) -> bool {
        #[cfg(test)]
        return PLANT.with(|c| c.get() == Some(p));
        #[cfg(not(test))]
        {
            let _ = p;
            false
        }
    }

    /// Runs `f` with `p` planted.
    #[cfg(test)]
    pub(crate) fn with<T>(p: Plant, f: impl FnOnce() -> T) -> T {
        PLANT.with(|c| c.set(Some(p)));
        let out = f();
        PLANT.with(|c| c.set(None));
        out
    }
}

use plant::{planted, Plant};
const _: () = assert!(SEG_MAX as u64 * SIZE_MAX_BYTES as u64 <= 32 << 20);

/// The GET_ID answer for a volume named `name`: its first 20 bytes, zero-padded.
pub fn serial(name: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = name.len().min(ID_BYTES);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

/// A discard or write-zeroes range in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What a request asks, once checked. Data segments and ranges are in [`Scratch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `Scratch::segs` hold `len` bytes of device-writable guest memory.
    Read {
        offset: u64,
        len: u32,
    },
    /// `Scratch::segs` hold `len` bytes of device-readable guest memory.
    Write {
        offset: u64,
        len: u32,
    },
    Flush,
    /// `Scratch::id` holds the device-writable guest ranges for the serial.
    GetId,
    /// `Scratch::ranges`, one block request each.
    Discard,
    WriteZeroes {
        unmap: bool,
    },
    /// Answer with this status, nothing else to do.
    Fail(u8),
}

/// A parsed request: where its status byte goes and what it asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Guest address of the status byte (checked to be in memory).
    pub status: u64,
    /// Its host address in the mapping `parse` was given (valid while it is held).
    pub status_ptr: NonNull<u8>,
    pub kind: Kind,
}

/// Per-queue buffers [`parse`] fills, reused from request to request (no
/// allocation per request once warm; each is bounded as the module docs say).
#[derive(Default)]
pub struct Scratch {
    /// Host pointers of the data segments (valid while the mapping is held).
    pub segs: Vec<(NonNull<u8>, u32)>,
    pub ranges: Vec<Range>,
    /// Guest ranges of a GET_ID answer.
    pub id: Vec<(u64, u32)>,
}

/// No status byte is reachable: the request cannot be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoStatus {
    #[error("the chain ends with no device-writable byte")]
    NotWritable,
    #[error("the status byte at {0:#x} is not in guest memory")]
    OutsideMemory(u64),
}

/// One side (readable or writable) of a chain, as a byte stream over descriptors.
#[derive(Clone, Copy)]
struct Side<'a> {
    descs: &'a [Desc],
}

impl Side<'_> {
    fn bytes(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.len)).sum()
    }

    /// Calls `f(addr, len)` for each piece of bytes `skip..skip + take` of the
    /// stream; stops at the first `Err`.
    fn pieces<E>(
        &self,
        skip: u64,
        take: u64,
        mut f: impl FnMut(u64, u32) -> Result<(), E>,
    ) -> Result<(), E> {
        let (mut skip, mut take) = (skip, take);
        for d in self.descs {
            if take == 0 {
                break;
            }
            let len = u64::from(d.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let n = (len - skip).min(take);
            // A piece past u64::MAX saturates there, where every translation,
            // read and write of one byte or more fails.
            f(d.addr.saturating_add(skip), n as u32)?;
            skip = 0;
            take -= n;
        }
        Ok(())
    }

    /// Copies bytes `skip..skip + out.len()` of the stream into `out`.
    fn read(&self, mem: &GuestMemoryMmap, skip: u64, out: &mut [u8]) -> Result<(), ()> {
        let mut at = 0usize;
        self.pieces(skip, out.len() as u64, |addr, n| {
            let end = at + n as usize;
            match host_ptr(mem, addr, n) {
                // SAFETY: `host_ptr` found `n` bytes mapped in one region of `mem`,
                // which the caller holds; `out[at..end]` is `n` bytes long.
                Some(p) => unsafe { read_volatile_bytes(p, &mut out[at..end]) },
                // A piece across two regions: vm-memory's read walks them.
                None => mem
                    .read_slice(&mut out[at..end], GuestAddress(addr))
                    .map_err(|_| ())?,
            }
            at = end;
            Ok(())
        })?;
        if at == out.len() {
            Ok(())
        } else {
            Err(())
        }
    }
}

/// Parses the request whose chain is `descs` (from [`crate::virtq::walk`]).
/// `read_only`: writes, discards and write-zeroes fail with `IOERR` before anything
/// is touched. Data segments and ranges land in `scratch`.
pub fn parse(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    read_only: bool,
    scratch: &mut Scratch,
) -> Result<Request, NoStatus> {
    scratch.segs.clear();
    scratch.ranges.clear();
    scratch.id.clear();
    // Readable first, then writable; empty descriptors count on neither side.
    let nonempty = |d: &&Desc| d.len > 0;
    let last = descs
        .iter()
        .rev()
        .find(nonempty)
        .ok_or(NoStatus::NotWritable)?;
    if !last.writable {
        return Err(NoStatus::NotWritable);
    }
    let status = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or(NoStatus::OutsideMemory(last.addr))?;
    let status_ptr = host_ptr(mem, status, 1).ok_or(NoStatus::OutsideMemory(status))?;
    let fail = |st| {
        Ok(Request {
            status,
            status_ptr,
            kind: Kind::Fail(st),
        })
    };
    // Split at the first writable descriptor; a readable one after it is out of
    // order (the spec's "device-readable before device-writable").
    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    let read_only = read_only && !planted(Plant::IgnoreReadOnly);
    let directions = !planted(Plant::NoDirectionCheck);
    if descs[split..].iter().any(|d| !d.writable && d.len > 0) {
        return fail(S_IOERR);
    }
    let rd = Side {
        descs: &descs[..split],
    };
    let wr = Side {
        descs: &descs[split..],
    };
    let (rd_bytes, wr_bytes) = (rd.bytes(), wr.bytes());
    let mut hdr = [0u8; HEADER_BYTES];
    if rd_bytes < HEADER_BYTES as u64 || rd.read(mem, 0, &mut hdr).is_err() {
        return fail(S_IOERR);
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    // Data bytes on each side once header and status are taken off.
    let rd_data = rd_bytes - HEADER_BYTES as u64;
    let wr_data = wr_bytes - 1;
    let k = match kind {
        VIRTIO_BLK_T_IN => {
            if rd_data != 0 && directions {
                return fail(S_IOERR);
            }
            data(mem, wr, 0, wr_data, sector, scratch)
                .map(|(offset, len)| Kind::Read { offset, len })
        }
        VIRTIO_BLK_T_OUT => {
            if wr_data != 0 && directions {
                return fail(S_IOERR);
            }
            if read_only {
                return fail(S_IOERR);
            }
            data(mem, rd, HEADER_BYTES as u64, rd_data, sector, scratch)
                .map(|(offset, len)| Kind::Write { offset, len })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Kind::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if wr_data == 0 {
                return fail(S_IOERR);
            }
            let take = wr_data.min(ID_BYTES as u64);
            let id = &mut scratch.id;
            let _ = wr.pieces(0, take, |addr, n| {
                id.push((addr, n));
                Ok::<(), ()>(())
            });
            Ok(Kind::GetId)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if wr_data != 0 {
                return fail(S_IOERR);
            }
            if read_only {
                return fail(S_IOERR);
            }
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            segments(mem, rd, rd_data, zeroes, scratch)
        }
        _ => Err(S_UNSUPP),
    };
    match k {
        Ok(kind) => Ok(Request {
            status,
            status_ptr,
            kind,
        }),
        Err(st) => fail(st),
    }
}

/// Translates data bytes `skip..skip + bytes` of `side` into host segments in
/// `scratch.segs`; returns the byte offset of `sector` and the length.
fn data(
    mem: &GuestMemoryMmap,
    side: Side<'_>,
    skip: u64,
    bytes: u64,
    sector: u64,
    scratch: &mut Scratch,
) -> Result<(u64, u32), u8> {
    let len = u32::try_from(bytes).map_err(|_| S_IOERR)?;
    if u64::from(len) % SECTOR_BYTES != 0 {
        return Err(S_IOERR);
    }
    let offset = sector.checked_mul(SECTOR_BYTES).ok_or(S_IOERR)?;
    let segs = &mut scratch.segs;
    side.pieces(skip, bytes, |addr, n| {
        if segs.len() >= SG_SEGS_MAX {
            return Err(S_IOERR);
        }
        let p = host_ptr(mem, addr, n).ok_or(S_IOERR)?;
        segs.push((p, n));
        Ok(())
    })?;
    if planted(Plant::ReverseSegments) {
        segs.reverse();
    }
    Ok((offset, len))
}

/// Reads and checks the discard/write-zeroes segments (`bytes` readable bytes
/// after the header) into `scratch.ranges`.
fn segments(
    mem: &GuestMemoryMmap,
    side: Side<'_>,
    bytes: u64,
    zeroes: bool,
    scratch: &mut Scratch,
) -> Result<Kind, u8> {
    let n = bytes / DWZ_SEG_BYTES as u64;
    if bytes == 0 || bytes % DWZ_SEG_BYTES as u64 != 0 || n > u64::from(DISCARD_SEG_MAX) {
        return Err(S_IOERR);
    }
    let mut unmap_all = true;
    for i in 0..n {
        let mut s = [0u8; DWZ_SEG_BYTES];
        let at = HEADER_BYTES as u64 + i * DWZ_SEG_BYTES as u64;
        side.read(mem, at, &mut s).map_err(|_| S_IOERR)?;
        let sector = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        let sectors = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
        let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
        // Unknown flags, and UNMAP on a discard, are UNSUPP (virtio 1.2 5.2.6.2).
        let allowed = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 {
            return Err(S_UNSUPP);
        }
        unmap_all &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if sectors > DISCARD_SECTORS_MAX {
            return Err(S_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_BYTES).ok_or(S_IOERR)?;
        let len = u64::from(sectors) * SECTOR_BYTES;
        offset.checked_add(len).ok_or(S_IOERR)?;
        scratch.ranges.push(Range { offset, len });
    }
    Ok(if zeroes {
        // One request's segments share one zeroing mode: deallocate only when
        // every segment allows it.
        Kind::WriteZeroes { unmap: unmap_all }
    } else {
        Kind::Discard
    })
}

/// Writes the GET_ID answer into the ranges [`parse`] left in `scratch.id`; returns
/// the bytes written.
pub fn write_id(mem: &GuestMemoryMmap, ranges: &[(u64, u32)], id: &[u8; ID_BYTES]) -> Option<u32> {
    let mut at = 0usize;
    for &(addr, n) in ranges {
        let end = (at + n as usize).min(ID_BYTES);
        if end <= at {
            break;
        }
        mem.write_slice(&id[at..end], GuestAddress(addr)).ok()?;
        at = end;
    }
    Some(at as u32)
}
