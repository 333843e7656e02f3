//! Data buffers of block requests: [`OwnBuf`] (layer-owned memory), [`SgList`] (caller
//! memory, a scatter-gather list) and [`DataBuf`] (either), plus the O_DIRECT bounce
//! rule [`needs_bounce`].
//!
//! Layer: rank 1. Imports `error` of this crate, and the reactor's buffer types.
//!
//! # Ownership
//! An `OwnBuf` is an ordinary owned buffer: a reactor pool buffer (registered, so
//! reads and writes into it are fixed-buffer I/O) when the length fits, else an
//! O_DIRECT-aligned heap buffer. It moves into the request and comes back in the
//! result of a read; a write's buffer is dropped when its I/O is done.
//!
//! An `SgList` names memory the caller owns (vhost guest memory, an iSCSI Data-Out
//! buffer). Its one constructor is `unsafe`: the caller promises the memory stays
//! valid until the request's `done` has run. On the fast path (no deltas) an SG list
//! goes as one readv/writev straight into caller memory (`IoBuf::Foreign`), unless
//! [`needs_bounce`] says O_DIRECT cannot take its segments; then, and on the layered
//! path, the request goes through an aligned bounce `OwnBuf`: the layer copies caller
//! memory into it before a write and out of it after a read (counted in
//! `sg_bounces`).
//!
//! # Bounds
//! An `SgList` has at most [`SG_SEGS_MAX`] segments and its length fits a `u64`
//! (checked in [`SgList::new`]).
//!
//! The server-wide buffer budget (plan §2.4, from `admission`) is not charged by
//! `OwnBuf` yet: front ends still take it themselves (NBD: at header decode).

use std::ptr::NonNull;

use ringblk_reactor::{AlignedBuf, ForeignBuf, IoBuf, Reactor};

use crate::error::BlockError;

/// Segments of one [`SgList`] at most.
pub const SG_SEGS_MAX: usize = 256;

/// Alignment assumed for O_DIRECT buffers when the file system does not say
/// (statx `dio_mem_align`); 512 is what every Linux block device accepts.
pub(crate) const DIO_MEM_ALIGN_DEFAULT: u32 = 512;

/// A layer-owned buffer (module docs, *Ownership*).
pub struct OwnBuf {
    buf: IoBuf,
}

impl OwnBuf {
    /// A buffer for `len` bytes on reactor `r`: a pool buffer when it fits and one is
    /// free, else aligned heap memory (lazily mapped when large: untouched pages cost
    /// nothing). Its length may exceed `len` (pool buffers have one size).
    pub fn alloc(r: &Reactor, len: usize) -> OwnBuf {
        if len <= r.buffers().buf_size() {
            if let Some(b) = r.get_buffer() {
                return OwnBuf { buf: b.into() };
            }
        }
        OwnBuf::aligned(len)
    }

    /// An aligned heap buffer of exactly `len` zeroed bytes.
    pub fn aligned(len: usize) -> OwnBuf {
        OwnBuf {
            buf: AlignedBuf::direct(len).into(),
        }
    }

    /// Wraps a reactor buffer (one the caller filled, or got back from an op).
    pub fn from_io(buf: IoBuf) -> OwnBuf {
        OwnBuf { buf }
    }

    /// The reactor buffer, for an operation or a reply.
    pub fn into_io(self) -> IoBuf {
        self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_slice()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.as_mut_slice()
    }
}

impl From<IoBuf> for OwnBuf {
    fn from(buf: IoBuf) -> OwnBuf {
        OwnBuf { buf }
    }
}

impl std::fmt::Debug for OwnBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnBuf").field("len", &self.len()).finish()
    }
}

/// Caller memory as a list of segments (module docs, *Ownership*). `!Send`: it
/// belongs to the reactor of the request that carries it.
pub struct SgList {
    segs: Segs,
    len: u64,
}

/// The segments of an [`SgList`]: a one-segment list (a 4 KiB request in one guest
/// page, the common case) allocates nothing. The enum is no larger than the `Vec`
/// (the tag sits in its pointer's niche), so requests carrying a list move no more
/// bytes than before (two inline segments made `BlockOp` moves memcpy calls: +86
/// Ir/request, more than the allocation they saved).
enum Segs {
    One((NonNull<u8>, u32)),
    Many(Vec<(NonNull<u8>, u32)>),
}

impl SgList {
    /// # Safety
    /// Every segment is valid for reads and writes of its length, and stays mapped
    /// and unused by the caller (guest access aside, which the layer tolerates: it
    /// copies once) until `done` for the request that carries it has run (`done`
    /// always runs).
    pub unsafe fn new(segs: &[(NonNull<u8>, u32)]) -> Result<SgList, BlockError> {
        if segs.len() > SG_SEGS_MAX {
            return Err(BlockError::Invalid);
        }
        let len = segs.iter().map(|&(_, n)| u64::from(n)).sum();
        let segs = match segs {
            [one] => Segs::One(*one),
            _ => Segs::Many(segs.to_vec()),
        };
        Ok(SgList { segs, len })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn segments(&self) -> &[(NonNull<u8>, u32)] {
        match &self.segs {
            Segs::One(one) => std::slice::from_ref(one),
            Segs::Many(v) => v,
        }
    }

    /// Copies `dst.len()` bytes from the list's start into `dst` (at most the list).
    pub fn copy_out(&self, dst: &mut [u8]) {
        let mut at = 0;
        for &(p, n) in self.segments() {
            if at >= dst.len() {
                break;
            }
            let k = (n as usize).min(dst.len() - at);
            // SAFETY: the constructor's contract: the segment is valid for reads of
            // `n >= k` bytes until `done`. Segments may overlap one another (a guest
            // can point two descriptors at the same bytes), but each copy is between
            // one segment and `dst`, which the `&mut` borrow keeps apart from
            // caller memory the list names.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst[at..].as_mut_ptr(), k) };
            at += k;
        }
    }

    /// Copies `src` into the list from its start (at most the list's length).
    pub fn copy_in(&self, src: &[u8]) {
        let mut at = 0;
        for &(p, n) in self.segments() {
            if at >= src.len() {
                break;
            }
            let k = (n as usize).min(src.len() - at);
            // SAFETY: the constructor's contract: the segment is valid for writes of
            // `n >= k` bytes until `done`. Segments may overlap one another (a guest
            // can point two descriptors at the same bytes: the later segment's bytes
            // win, the guest's own doing), but each copy is between one segment and
            // `src` (a layer bounce buffer in every caller), never memory the list names.
            unsafe { std::ptr::copy_nonoverlapping(src[at..].as_ptr(), p.as_ptr(), k) };
            at += k;
        }
    }

    /// Zeroes the first `len` bytes of the list.
    pub fn fill_zero(&self, len: u64) {
        self.fill_zero_range(0, len)
    }

    /// Zeroes bytes `[from, to)` of the list (clamped to its length).
    pub fn fill_zero_range(&self, from: u64, to: u64) {
        let mut at = 0u64;
        for &(p, n) in self.segments() {
            let (lo, hi) = (at.max(from), (at + u64::from(n)).min(to));
            if lo < hi {
                // SAFETY: the constructor's contract: the segment is valid for writes
                // of `n` bytes, and `[lo - at, hi - at)` lies within it.
                unsafe {
                    std::ptr::write_bytes(p.as_ptr().add((lo - at) as usize), 0, (hi - lo) as usize)
                };
            }
            at += u64::from(n);
            if at >= to {
                break;
            }
        }
    }

    /// The first `len` bytes of the list lent to the reactor, one `IoBuf::Foreign`
    /// per segment (cut at `len`), for a readv/writev straight into caller memory.
    pub(crate) fn foreign(&self, len: u64) -> Vec<IoBuf> {
        let mut out = Vec::with_capacity(self.segments().len());
        let mut left = len;
        for &(p, n) in self.segments() {
            if left == 0 {
                break;
            }
            let k = u64::from(n).min(left);
            // SAFETY: the constructor's contract: the segment stays valid, and unused
            // by the caller, until the request's `done` has run, which is after the
            // operation's final CQE (the layer runs `done` from the op's callback);
            // segments of one list do not overlap.
            out.push(IoBuf::Foreign(unsafe { ForeignBuf::new(p, k as usize) }));
            left -= k;
        }
        out
    }
}

impl std::fmt::Debug for SgList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgList")
            .field("segments", &self.segments().len())
            .field("len", &self.len)
            .finish()
    }
}

/// The data of a read or write request.
#[derive(Debug)]
pub enum DataBuf {
    Own(OwnBuf),
    Sg(SgList),
}

impl DataBuf {
    /// Bytes available.
    pub fn len(&self) -> u64 {
        match self {
            DataBuf::Own(b) => b.len() as u64,
            DataBuf::Sg(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<OwnBuf> for DataBuf {
    fn from(b: OwnBuf) -> DataBuf {
        DataBuf::Own(b)
    }
}

/// The memory alignment O_DIRECT I/O on `fd` needs: statx's `dio_mem_align`
/// (Linux 6.1+, where the file system reports it), else
/// [`DIO_MEM_ALIGN_DEFAULT`]. One system call: call it once per file and keep it.
pub(crate) fn dio_mem_align(fd: std::os::fd::RawFd) -> u32 {
    // SAFETY: an all-zero statx is a valid value (plain integers).
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor of the caller's; the empty path with
    // AT_EMPTY_PATH names it; statx writes at most one `struct statx` into `st`,
    // which we own.
    let rc = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    let told = rc == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0;
    match st.stx_dio_mem_align {
        // Only powers of two make sense; anything else is ignored.
        a if told && a.is_power_of_two() => a,
        _ => DIO_MEM_ALIGN_DEFAULT,
    }
}

/// Whether I/O for `sg` on a file opened `direct` must bounce through an aligned
/// buffer: only when some segment's address or length is not a multiple of
/// `mem_align` (O_DIRECT's memory rule; offsets are block-aligned already).
pub fn needs_bounce(sg: &SgList, direct: bool, mem_align: u32) -> bool {
    let a = mem_align.max(1) as usize;
    direct
        && sg
            .segments()
            .iter()
            .any(|&(p, n)| (p.as_ptr() as usize) % a != 0 || (n as usize) % a != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sg_of(bufs: &mut [Vec<u8>]) -> SgList {
        let segs: Vec<_> = bufs
            .iter_mut()
            .map(|b| {
                (
                    NonNull::new(b.as_mut_ptr()).expect("non-null"),
                    b.len() as u32,
                )
            })
            .collect();
        // SAFETY: the vectors outlive the list in each test and are not touched
        // while it is used.
        unsafe { SgList::new(&segs) }.expect("short list")
    }

    #[test]
    fn sg_copies_across_segments_and_zeroes() {
        let mut bufs = vec![vec![1u8; 3], vec![2u8; 5], vec![3u8; 4]];
        let sg = sg_of(&mut bufs);
        assert_eq!(sg.len(), 12);
        let mut out = [0u8; 12];
        sg.copy_out(&mut out);
        assert_eq!(out, [1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3]);
        sg.copy_in(&[9u8; 7]);
        sg.fill_zero(2);
        sg.copy_out(&mut out);
        assert_eq!(out, [0, 0, 9, 9, 9, 9, 9, 2, 3, 3, 3, 3]);
    }

    #[test]
    fn sg_list_is_bounded() {
        let mut b = vec![0u8; 1];
        let p = NonNull::new(b.as_mut_ptr()).expect("non-null");
        let segs = vec![(p, 1u32); SG_SEGS_MAX + 1];
        // SAFETY: refused before any use.
        assert!(unsafe { SgList::new(&segs) }.is_err());
    }

    /// One-segment lists (inline) and longer ones (heap) keep every segment, in
    /// order, and their length.
    #[test]
    fn sg_list_keeps_segments_inline_and_on_the_heap() {
        let mut b = vec![0u8; 512];
        for n in [0usize, 1, 2, SG_SEGS_MAX] {
            let segs: Vec<_> = (0..n)
                .map(|i| {
                    let p = NonNull::new(b[i % 500..].as_mut_ptr()).expect("non-null");
                    (p, i as u32 + 1)
                })
                .collect();
            // SAFETY: `b` outlives the list; only its segment table is read.
            let sg = unsafe { SgList::new(&segs) }.expect("list");
            assert_eq!(sg.segments(), &segs[..], "{n} segments");
            let len: u64 = (1..=n as u64).sum();
            assert_eq!(sg.len(), len);
            assert_eq!(sg.foreign(len).len(), n);
        }
    }

    #[test]
    fn sg_list_is_no_larger_than_before() {
        assert!(std::mem::size_of::<SgList>() <= 32);
    }

    #[test]
    fn dio_alignment_is_a_power_of_two() {
        let f = tempfile::tempfile().expect("tmp");
        let a = dio_mem_align(std::os::fd::AsRawFd::as_raw_fd(&f));
        assert!(a.is_power_of_two() && a <= 4096, "{a}");
    }

    #[test]
    fn bounce_only_for_misaligned_direct() {
        let mut a = AlignedBuf::direct(8192);
        let p = NonNull::new(a.as_mut_ptr()).expect("non-null");
        // SAFETY: `a` outlives the lists and is not otherwise used.
        let aligned = unsafe { SgList::new(&[(p, 4096)]) }.expect("list");
        let p1 = NonNull::new(a.as_mut_slice()[1..].as_mut_ptr()).expect("non-null");
        // SAFETY: as above.
        let odd = unsafe { SgList::new(&[(p1, 4096)]) }.expect("list");
        assert!(!needs_bounce(&aligned, true, 512));
        assert!(needs_bounce(&odd, true, 512));
        assert!(!needs_bounce(&odd, false, 512));
    }
}
