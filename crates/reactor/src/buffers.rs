//! I/O buffers: heap buffers aligned for O_DIRECT, a per-reactor pool of fixed
//! (registered) buffers, and caller memory lent to the reactor ([`ForeignBuf`]).
//!
//! # Ownership
//! A buffer handed to an [`Op`](crate::Op) is owned by the reactor's in-flight slab
//! until the operation's final CQE; only then does [`Completion`](crate::Completion)
//! give it back. A [`PoolBuf`] returns to its pool when dropped, so a buffer whose
//! operation was orphaned returns to the pool only after the kernel is done with it.
//! A [`ForeignBuf`] is held the same way, but its memory belongs to the caller: the
//! reactor never frees it, and dropping the `ForeignBuf` only ends the loan.
//!
//! # Back-pressure
//! [`BufPool::get`] returns `None` when the pool is empty; callers wait with
//! [`Reactor::when_buffer_free`](crate::Reactor::when_buffer_free). The pool never
//! grows and never panics when exhausted.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;
use std::rc::Rc;

/// Alignment that satisfies O_DIRECT on every device we serve (4 KiB logical
/// blocks at most).
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Buffers at least this large (with an alignment the page size satisfies) are
/// mapped, not allocated: the kernel hands out zeroed pages as they are first
/// touched, so such a buffer costs memory only as it is written (a request buffer
/// whose payload has not arrived costs none), nothing memsets it, and unmapping
/// returns the memory at once instead of leaving it in the allocator's arenas.
pub const MMAP_MIN_BYTES: usize = 1 << 20;

/// Smallest page size of the platforms served; mmap addresses are multiples of it.
const PAGE_BYTES: usize = 4096;

/// A zero-initialised buffer whose address and length are multiples of its
/// alignment, as O_DIRECT requires: heap memory, or a private anonymous mapping from
/// [`MMAP_MIN_BYTES`] on.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    mapped: bool,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); no interior
// sharing, so moving it across threads is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`, which is Sync.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// If `align` is not a power of two or the size overflows; both are programming
    /// errors, never client input (callers bound request sizes first).
    pub fn new(len: usize, align: usize) -> Self {
        // Allocate at least one alignment unit: a zero-sized allocation is UB.
        let cap = len.max(1).next_multiple_of(align);
        let layout = Layout::from_size_align(cap, align).expect("valid buffer layout");
        if cap >= MMAP_MIN_BYTES && align <= PAGE_BYTES {
            // SAFETY: a fresh private anonymous mapping of `cap` bytes; no existing
            // memory is touched. The kernel zero-fills its pages on first access.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                alloc::handle_alloc_error(layout)
            }
            let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
                alloc::handle_alloc_error(layout)
            };
            return AlignedBuf {
                ptr,
                len,
                layout,
                mapped: true,
            };
        }
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            len,
            layout,
            mapped: false,
        }
    }

    /// A buffer aligned for O_DIRECT.
    pub fn direct(len: usize) -> Self {
        Self::new(len, DIRECT_IO_ALIGN)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for `layout.size() >= len` initialised (zeroed) bytes
        // and uniquely owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: ptr is the mapping of exactly `layout.size()` bytes made in
            // `new`, owned by self alone; nothing refers to it after the drop.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
            return;
        }
        // SAFETY: ptr was allocated with exactly this layout in `new`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

struct PoolInner {
    region: AlignedBuf,
    buf_size: usize,
    count: usize,
    free: RefCell<Vec<u16>>,
    registered: std::cell::Cell<bool>,
}

/// A fixed set of equally sized, O_DIRECT-aligned buffers carved from one region,
/// registered with the reactor's ring as fixed buffers (index = buffer index).
/// Reactor-local: not `Send`.
#[derive(Clone)]
pub struct BufPool(Rc<PoolInner>);

impl BufPool {
    /// Limit imposed by the u16 buffer index of fixed-buffer SQEs.
    pub const MAX_BUFFERS: usize = u16::MAX as usize;

    /// `count` buffers of `buf_size` bytes (rounded up to [`DIRECT_IO_ALIGN`]).
    pub fn new(count: usize, buf_size: usize) -> Self {
        let count = count.min(Self::MAX_BUFFERS);
        let buf_size = buf_size.max(1).next_multiple_of(DIRECT_IO_ALIGN);
        let region = AlignedBuf::direct(buf_size * count);
        // Hand out low indexes first (pop takes from the end).
        let free = (0..count as u16).rev().collect();
        BufPool(Rc::new(PoolInner {
            region,
            buf_size,
            count,
            free: RefCell::new(free),
            registered: std::cell::Cell::new(false),
        }))
    }

    /// Takes a free buffer, or `None` when all are in use (back-pressure).
    pub fn get(&self) -> Option<PoolBuf> {
        let index = self.0.free.borrow_mut().pop()?;
        Some(PoolBuf {
            pool: self.0.clone(),
            index,
        })
    }

    pub fn buf_size(&self) -> usize {
        self.0.buf_size
    }

    pub fn capacity(&self) -> usize {
        self.0.count
    }

    /// Buffers not handed out (in flight or held by callers).
    pub fn available(&self) -> usize {
        self.0.free.borrow().len()
    }

    /// Whether the region is registered with the ring (fixed-buffer opcodes usable).
    pub fn is_registered(&self) -> bool {
        self.0.registered.get()
    }

    pub(crate) fn set_registered(&self, v: bool) {
        self.0.registered.set(v)
    }

    /// One iovec per buffer, in index order, for `register_buffers`.
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        let base = self.0.region.as_ptr() as *mut u8;
        (0..self.0.count)
            .map(|i| libc::iovec {
                // SAFETY (pointer arithmetic): i * buf_size < region length.
                iov_base: base.wrapping_add(i * self.0.buf_size) as *mut libc::c_void,
                iov_len: self.0.buf_size,
            })
            .collect()
    }
}

/// One buffer of a [`BufPool`]; goes back to the pool on drop.
pub struct PoolBuf {
    pool: Rc<PoolInner>,
    index: u16,
}

impl PoolBuf {
    /// Index of this buffer in the ring's fixed-buffer table.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Whether fixed-buffer opcodes may name this buffer.
    pub fn is_registered(&self) -> bool {
        self.pool.registered.get()
    }

    pub fn len(&self) -> usize {
        self.pool.buf_size
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    fn base(&self) -> *mut u8 {
        (self.pool.region.as_ptr() as *mut u8)
            .wrapping_add(self.index as usize * self.pool.buf_size)
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.base()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.base()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slice [index*size, (index+1)*size) lies inside the region, which
        // lives as long as the Rc we hold; no other PoolBuf has the same index.
        unsafe { std::slice::from_raw_parts(self.base(), self.pool.buf_size) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base(), self.pool.buf_size) }
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        self.pool.free.borrow_mut().push(self.index);
    }
}

/// Memory the caller owns and lends to one operation: a vhost guest's pages, an
/// iSCSI Data-Out buffer, one segment of a scatter-gather list. Readv/writev over
/// several of them move data straight between the file and caller memory.
///
/// # Ownership
/// The loan runs from [`ForeignBuf::new`] until the `ForeignBuf` is dropped. Handed
/// to an [`Op`](crate::Op), it sits in the in-flight slab like any [`IoBuf`] until
/// the op's final CQE, and then comes back in the [`Completion`](crate::Completion)
/// (or, for an orphaned op, is dropped by the slab at that CQE). Dropping it never
/// frees or touches the memory. The caller learns that the kernel is done with the
/// memory from the op's callback; an op holding foreign memory should therefore be
/// cancelled ([`Reactor::cancel`](crate::Reactor::cancel): the callback still runs)
/// rather than orphaned, unless the caller waits for the reactor to drain instead.
///
/// Not `Send`: the loan is to one reactor thread.
pub struct ForeignBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl ForeignBuf {
    /// Lends `len` bytes at `ptr` to the reactor.
    ///
    /// # Safety
    /// - `ptr` is valid for reads and writes of `len` bytes from this call until the
    ///   returned `ForeignBuf` is dropped. If it is handed to an op, that is no
    ///   earlier than the op's final CQE: the memory must stay mapped and valid
    ///   until the callback has run (or, for an orphaned op, until
    ///   [`Reactor::in_flight`](crate::Reactor::in_flight) no longer counts it).
    /// - While the `ForeignBuf` lives, nothing else reads or writes that memory: the
    ///   kernel may be writing it (a read or receive) at any moment of an op, and
    ///   [`IoBuf::as_slice`] hands out references to it.
    /// - The ranges of foreign buffers in one op do not overlap when the op writes
    ///   memory (read, readv, receive).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> ForeignBuf {
        ForeignBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lent address (the caller's own pointer, unchanged).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `new`'s contract: valid for `len` bytes while self lives and
        // accessed only through self; no op holds it while the caller has it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for ForeignBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

/// A buffer an operation can own: a pool buffer (fixed where registered), an
/// aligned heap buffer (O_DIRECT-safe), a plain `Vec` (sockets, buffered files), or
/// caller memory on loan ([`ForeignBuf`]; O_DIRECT only if the caller aligned it).
pub enum IoBuf {
    Pool(PoolBuf),
    Aligned(AlignedBuf),
    Vec(Vec<u8>),
    Foreign(ForeignBuf),
}

impl IoBuf {
    pub fn len(&self) -> usize {
        match self {
            IoBuf::Pool(b) => b.len(),
            IoBuf::Aligned(b) => b.len(),
            IoBuf::Vec(v) => v.len(),
            IoBuf::Foreign(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuf::Pool(b) => b.as_slice(),
            IoBuf::Aligned(b) => b.as_slice(),
            IoBuf::Vec(v) => v,
            IoBuf::Foreign(b) => b.as_slice(),
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            IoBuf::Pool(b) => b.as_mut_slice(),
            IoBuf::Aligned(b) => b.as_mut_slice(),
            IoBuf::Vec(v) => v,
            IoBuf::Foreign(b) => b.as_mut_slice(),
        }
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        match self {
            // The caller's pointer itself, without making a reference to its memory.
            IoBuf::Foreign(b) => b.ptr.as_ptr(),
            other => other.as_mut_slice().as_mut_ptr(),
        }
    }

    /// The fixed-buffer index when this is a registered pool buffer.
    pub(crate) fn fixed_index(&self) -> Option<u16> {
        match self {
            IoBuf::Pool(b) if b.is_registered() => Some(b.index()),
            _ => None,
        }
    }
}

impl From<PoolBuf> for IoBuf {
    fn from(b: PoolBuf) -> Self {
        IoBuf::Pool(b)
    }
}

impl From<AlignedBuf> for IoBuf {
    fn from(b: AlignedBuf) -> Self {
        IoBuf::Aligned(b)
    }
}

impl From<ForeignBuf> for IoBuf {
    fn from(b: ForeignBuf) -> Self {
        IoBuf::Foreign(b)
    }
}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> Self {
        IoBuf::Vec(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffer_is_aligned_and_zeroed() {
        let b = AlignedBuf::direct(10_000);
        assert_eq!(b.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        assert_eq!(b.len(), 10_000);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        let z = AlignedBuf::direct(0);
        assert!(z.is_empty());
    }

    /// Large buffers are mapped: the same contract (aligned, zeroed, writable to
    /// the end), and their memory is committed only as it is touched.
    #[test]
    fn large_buffers_are_mapped_lazily() {
        let len = 32 << 20;
        let mut b = AlignedBuf::direct(len);
        assert!(b.mapped);
        assert_eq!(b.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        assert_eq!(b.as_slice()[len - 1], 0);
        b.as_mut_slice()[len - 1] = 7;
        b.as_mut_slice()[0] = 1;
        assert_eq!((b.as_slice()[0], b.as_slice()[len - 1]), (1, 7));
        assert!(b.as_slice()[1..len - 1]
            .iter()
            .step_by(4096)
            .all(|&x| x == 0));
        assert!(!AlignedBuf::direct(MMAP_MIN_BYTES - 4096).mapped);
        // Alignment above the page size stays on the heap.
        let big = AlignedBuf::new(MMAP_MIN_BYTES, 1 << 16);
        assert!(!big.mapped && big.as_ptr() as usize % (1 << 16) == 0);
    }

    #[test]
    fn pool_hands_out_each_buffer_once_and_takes_it_back() {
        let pool = BufPool::new(4, 5000);
        assert_eq!(pool.buf_size(), 8192);
        let bufs: Vec<_> = (0..4).map(|_| pool.get().expect("free buffer")).collect();
        assert!(pool.get().is_none(), "empty pool must say so, not grow");
        let mut idx: Vec<_> = bufs.iter().map(|b| b.index()).collect();
        idx.sort();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        for b in &bufs {
            assert_eq!(b.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        }
        drop(bufs);
        assert_eq!(pool.available(), 4);
    }
}
