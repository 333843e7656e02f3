//! INFLIGHT_SHMFD: the shared region in which each virtqueue records which
//! descriptor heads it has taken from the avail ring and not yet completed, so that
//! a restarted server can resubmit them (QEMU `reconnect=`; SPDK and libvhost-user
//! do the same).
//!
//! Layer: the control plane of the vhost front end; imports libc and vm-memory.
//! The control plane creates or maps the region; the virtqueue code (`queue`)
//! reads and writes its queue's part through [`InflightQueue`].
//!
//! # Format (QEMU's docs/interop/vhost-user.rst, "Inflight I/O tracking", split
//! virtqueues; little-endian, this host's order)
//! One region per queue, each [`queue_region_bytes`] long (16 header bytes and 16
//! per descriptor, rounded up to 64), queue `i` at `i * queue_region_bytes`:
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! struct { u8 inflight; u8 padding[5]; u16 next; u64 counter; } desc[desc_num];
//! ```
//!
//! # Ownership and lifetime
//! GET_INFLIGHT_FD creates a memfd here and gives QEMU a duplicate of it; QEMU keeps
//! it and hands it back with SET_INFLIGHT_FD on every (re)connection, including to a
//! restarted server, which is how in-flight requests outlive us. The mapping lives in
//! an `Arc` shared by the connection and every started queue; it is unmapped when the
//! last of them drops it. We never resize nor shrink the file.
//!
//! # Concurrency
//! Each queue's part is written by that queue's reactor only, with volatile
//! accesses (the memory is shared with another process, which reads it only after
//! we died or disconnected). Ordering between the ring and these records (set
//! inflight before reading the request, clear after `add_used`) is the virtqueue
//! code's job.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};

/// Bytes of one queue's header.
pub const QUEUE_HEADER_BYTES: u64 = 16;
/// Bytes of one descriptor's record.
pub const DESC_STATE_BYTES: u64 = 16;
/// Each queue's part starts on this boundary (libvhost-user's and DPDK's choice).
pub const INFLIGHT_ALIGN_BYTES: u64 = 64;
/// Queues and queue size accepted at most (virtio's split-queue maximum).
pub const QUEUE_SIZE_MAX: u16 = 1024;
pub const QUEUES_MAX: u16 = 64;

/// Version written in a queue's header once it has been used.
pub const INFLIGHT_VERSION: u16 = 1;

/// One queue's part of the region, in bytes.
pub fn queue_region_bytes(queue_size: u16) -> u64 {
    let raw = QUEUE_HEADER_BYTES + DESC_STATE_BYTES * u64::from(queue_size);
    raw.div_ceil(INFLIGHT_ALIGN_BYTES) * INFLIGHT_ALIGN_BYTES
}

/// Why an inflight region was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InflightError {
    #[error("inflight region for {num_queues} queues of {queue_size} descriptors: out of range")]
    Shape { num_queues: u16, queue_size: u16 },
    #[error("inflight region of {have} bytes, {need} needed")]
    TooSmall { have: u64, need: u64 },
    #[error("inflight mmap offset {0:#x} is not page-aligned")]
    Unaligned(u64),
    #[error("inflight file: {0}")]
    File(String),
}

/// A memfd of `len` zero bytes (close-on-exec).
pub(crate) fn memfd(name: &str, len: u64) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create reads a NUL-terminated name we own; the descriptor it
    // returns is new and ours alone.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// The whole inflight region of a connection (every queue's part), mapped.
#[derive(Debug)]
pub struct InflightRegion {
    map: MmapRegion,
    /// A descriptor of the region's file, for GET_INFLIGHT_FD's reply.
    file: File,
    mmap_offset: u64,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// GET_INFLIGHT_FD: a new zeroed region for `num_queues` queues of `queue_size`
    /// descriptors; each queue's `desc_num` is set, its `version` left 0 (unused).
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Arc<InflightRegion>, InflightError> {
        check_shape(num_queues, queue_size)?;
        let len = u64::from(num_queues) * queue_region_bytes(queue_size);
        let file =
            memfd("ringblk-vhost-inflight", len).map_err(|e| InflightError::File(e.to_string()))?;
        let region = InflightRegion::map(file, len, 0, num_queues, queue_size)?;
        for q in 0..num_queues {
            if let Some(q) = region.queue(q) {
                q.set_desc_num(queue_size);
            }
        }
        Ok(region)
    }

    /// SET_INFLIGHT_FD: maps the region QEMU hands (back) to us.
    pub fn open(
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<InflightRegion>, InflightError> {
        check_shape(num_queues, queue_size)?;
        let need = u64::from(num_queues) * queue_region_bytes(queue_size);
        if mmap_size < need {
            return Err(InflightError::TooSmall {
                have: mmap_size,
                need,
            });
        }
        let len = file
            .metadata()
            .map_err(|e| InflightError::File(e.to_string()))?
            .len();
        let end = mmap_offset
            .checked_add(need)
            .ok_or(InflightError::TooSmall { have: len, need })?;
        if len < end {
            return Err(InflightError::TooSmall {
                have: len,
                need: end,
            });
        }
        InflightRegion::map(file, need, mmap_offset, num_queues, queue_size)
    }

    fn map(
        file: File,
        len: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<InflightRegion>, InflightError> {
        // SAFETY: sysconf has no memory effects.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        if page == 0 || mmap_offset % page != 0 {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        let dup = file
            .try_clone()
            .map_err(|e| InflightError::File(e.to_string()))?;
        let size = usize::try_from(len).map_err(|e| InflightError::File(e.to_string()))?;
        let map = MmapRegion::from_file(FileOffset::new(dup, mmap_offset), size)
            .map_err(|e| InflightError::File(e.to_string()))?;
        Ok(Arc::new(InflightRegion {
            map,
            file,
            mmap_offset,
            num_queues,
            queue_size,
        }))
    }

    /// Queue `index`'s part (`None` past the region's queue count).
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let offset =
            usize::try_from(u64::from(index) * queue_region_bytes(self.queue_size)).ok()?;
        Some(InflightQueue {
            region: self.clone(),
            offset,
            queue_size: self.queue_size,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped (GET_INFLIGHT_FD's `mmap_size`).
    pub fn mmap_size(&self) -> u64 {
        self.map.size() as u64
    }

    pub fn mmap_offset(&self) -> u64 {
        self.mmap_offset
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }
}

fn check_shape(num_queues: u16, queue_size: u16) -> Result<(), InflightError> {
    if num_queues == 0 || num_queues > QUEUES_MAX || queue_size == 0 || queue_size > QUEUE_SIZE_MAX
    {
        return Err(InflightError::Shape {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

/// One virtqueue's inflight records (module docs, *Format*). Cloning shares them.
/// Every accessor is bounds-checked: a head at or past `queue_size` reads as not in
/// flight and is not written.
#[derive(Clone, Debug)]
pub struct InflightQueue {
    region: Arc<InflightRegion>,
    offset: usize,
    queue_size: u16,
}

impl InflightQueue {
    /// Start of this queue's part (its `QueueRegionSplit` header), for the data
    /// plane's own accessors (`virtq::inflight`). Mapped read/write and valid for
    /// [`len`](Self::len) bytes while this value (or a clone) lives.
    pub fn as_ptr(&self) -> std::ptr::NonNull<u8> {
        // `map` is a live mapping (never null); `offset` is inside it (see `queue`).
        std::ptr::NonNull::new(self.ptr::<u8>(0)).unwrap_or(std::ptr::NonNull::dangling())
    }

    /// Bytes of this queue's part ([`queue_region_bytes`] of the region's size).
    pub fn len(&self) -> usize {
        queue_region_bytes(self.queue_size) as usize
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Descriptors this region tracks (heads `0..queue_size`). A vring larger than
    /// this cannot be tracked here.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    pub fn features(&self) -> u64 {
        self.read(0)
    }

    pub fn set_features(&self, v: u64) {
        self.write(0, v)
    }

    /// 0 until the queue was first used with this region; then [`INFLIGHT_VERSION`].
    pub fn version(&self) -> u16 {
        self.read(8)
    }

    pub fn set_version(&self, v: u16) {
        self.write(8, v)
    }

    pub fn desc_num(&self) -> u16 {
        self.read(10)
    }

    pub fn set_desc_num(&self, v: u16) {
        self.write(10, v)
    }

    pub fn last_batch_head(&self) -> u16 {
        self.read(12)
    }

    pub fn set_last_batch_head(&self, v: u16) {
        self.write(12, v)
    }

    pub fn used_idx(&self) -> u16 {
        self.read(14)
    }

    pub fn set_used_idx(&self, v: u16) {
        self.write(14, v)
    }

    /// Whether head `head` is recorded as taken and not yet completed.
    pub fn inflight(&self, head: u16) -> bool {
        self.desc_at(head)
            .is_some_and(|at| self.read::<u8>(at) != 0)
    }

    pub fn set_inflight(&self, head: u16, v: bool) {
        if let Some(at) = self.desc_at(head) {
            self.write(at, u8::from(v))
        }
    }

    pub fn next(&self, head: u16) -> u16 {
        self.desc_at(head).map_or(0, |at| self.read(at + 6))
    }

    pub fn set_next(&self, head: u16, v: u16) {
        if let Some(at) = self.desc_at(head) {
            self.write(at + 6, v)
        }
    }

    /// The order in which heads were taken (resubmission sorts by it).
    pub fn counter(&self, head: u16) -> u64 {
        self.desc_at(head).map_or(0, |at| self.read(at + 8))
    }

    pub fn set_counter(&self, head: u16, v: u64) {
        if let Some(at) = self.desc_at(head) {
            self.write(at + 8, v)
        }
    }

    /// Offset of head `head`'s record within this queue's part.
    fn desc_at(&self, head: u16) -> Option<usize> {
        (head < self.queue_size)
            .then(|| QUEUE_HEADER_BYTES as usize + DESC_STATE_BYTES as usize * usize::from(head))
    }

    fn ptr<T>(&self, at: usize) -> *mut T {
        let end = self.offset + at + std::mem::size_of::<T>();
        // Callers pass offsets inside the header or a checked head's record, which
        // `queue_region_bytes` covers; `InflightRegion::queue` placed `offset`.
        assert!(
            end <= self.region.map.size(),
            "inflight access out of its region"
        );
        // SAFETY: `offset + at + size_of::<T>()` is inside the mapping (checked
        // just above), so the pointer stays within one allocation.
        unsafe { self.region.map.as_ptr().add(self.offset + at).cast::<T>() }
    }

    fn read<T: Copy>(&self, at: usize) -> T {
        // SAFETY: in bounds (see `ptr`); aligned: the mapping is page-aligned, each
        // queue's part starts on 64 bytes and every field sits at a multiple of its
        // size. Volatile: another process shares the memory.
        unsafe { std::ptr::read_volatile(self.ptr::<T>(at)) }
    }

    fn write<T: Copy>(&self, at: usize, v: T) {
        // SAFETY: as in `read`; the mapping is writable (PROT_WRITE, MAP_SHARED).
        unsafe { std::ptr::write_volatile(self.ptr::<T>(at), v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The sizes QEMU's peers (libvhost-user, DPDK) compute, so that a region we
    /// create fits what they would expect and the other way round.
    #[test]
    fn queue_region_sizes_match_the_peers() {
        assert_eq!(queue_region_bytes(128), 2112);
        assert_eq!(queue_region_bytes(256), 4160);
        assert_eq!(queue_region_bytes(1), 64);
        for q in [1u16, 2, 4, 64, 128, 256, 1024] {
            let raw = 16 + 16 * u64::from(q);
            let libvhost_user = (16 * u64::from(q) + 2).div_ceil(64) * 64;
            assert!(queue_region_bytes(q) >= raw);
            assert_eq!(queue_region_bytes(q), libvhost_user.max(64), "q={q}");
        }
    }

    /// Records land at the offsets of the format (read back through the file, as a
    /// restarted server or QEMU sees them), survive a re-open of the same file, and
    /// out-of-range heads neither read nor write.
    #[test]
    fn records_sit_where_the_format_says_and_survive_reopen() {
        let r = InflightRegion::create(2, 128).expect("create");
        assert_eq!(r.mmap_size(), 2 * 2112);
        let q1 = r.queue(1).expect("q1");
        assert_eq!(q1.desc_num(), 128);
        assert_eq!(q1.version(), 0);
        q1.set_version(INFLIGHT_VERSION);
        q1.set_inflight(5, true);
        q1.set_counter(5, 0x1122_3344_5566_7788);
        q1.set_next(5, 9);
        q1.set_used_idx(77);
        q1.set_inflight(128, true); // past the end: ignored
        assert!(!q1.inflight(128));
        assert!(r.queue(2).is_none());

        let f = r.file().try_clone().expect("dup");
        let base = 2112u64;
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, base).expect("header");
        assert_eq!(u16::from_le_bytes([b[8], b[9]]), 1);
        assert_eq!(u16::from_le_bytes([b[10], b[11]]), 128);
        assert_eq!(u16::from_le_bytes([b[14], b[15]]), 77);
        f.read_exact_at(&mut b, base + 16 + 5 * 16).expect("desc 5");
        assert_eq!(b[0], 1);
        assert_eq!(u16::from_le_bytes([b[6], b[7]]), 9);
        assert_eq!(
            u64::from_le_bytes(b[8..16].try_into().expect("8")),
            0x1122_3344_5566_7788
        );
        // Queue 0 untouched.
        assert!(!r.queue(0).expect("q0").inflight(5));

        let again = InflightRegion::open(f, r.mmap_size(), 0, 2, 128).expect("open");
        let q1b = again.queue(1).expect("q1");
        assert!(q1b.inflight(5));
        assert_eq!(q1b.counter(5), 0x1122_3344_5566_7788);
        q1b.set_inflight(5, false);
        assert!(!q1.inflight(5), "both mappings share the file");
    }

    #[test]
    fn bad_regions_are_refused() {
        assert!(matches!(
            InflightRegion::create(0, 128),
            Err(InflightError::Shape { .. })
        ));
        assert!(matches!(
            InflightRegion::create(1, 2048),
            Err(InflightError::Shape { .. })
        ));
        let small = memfd("t", 1000).expect("memfd");
        assert!(matches!(
            InflightRegion::open(small, 2112, 0, 1, 128),
            Err(InflightError::TooSmall { .. })
        ));
        let f = memfd("t", 8192).expect("memfd");
        assert!(matches!(
            InflightRegion::open(f.try_clone().expect("dup"), 100, 0, 1, 128),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightRegion::open(f.try_clone().expect("dup"), 2112, 100, 1, 128),
            Err(InflightError::Unaligned(100))
        ));
        assert!(matches!(
            InflightRegion::open(f, 2112, 8192, 1, 128),
            Err(InflightError::TooSmall { .. })
        ));
    }
}
