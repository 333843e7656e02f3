//! INFLIGHT_SHMFD: the shared region in which each virtqueue records which
//! descriptor heads it has taken from the avail ring and not yet completed, so that
//! a restarted server can resubmit them (QEMU `reconnect=`; SPDK and libvhost-user
//! do the same).
//!
//! Layer: the control plane of the vhost front end; imports libc, vm-memory and
//! `virtq::inflight`. This module only creates, checks and maps the region and cuts
//! it into per-queue parts ([`InflightQueue`]); the format's records and their
//! ordering have one implementation, `virtq::inflight::SplitInflight`, which the
//! data plane runs over a queue's part.
//!
//! # Layout (QEMU's docs/interop/vhost-user.rst, "Inflight I/O tracking", split
//! virtqueues)
//! One part per queue, each [`queue_region_bytes`] long (the format's
//! `QueueRegionSplit` size, rounded up to 64 bytes as libvhost-user and DPDK do),
//! queue `i` at `i * queue_region_bytes`.
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
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};

/// Each queue's part starts on this boundary (libvhost-user's and DPDK's choice).
pub const INFLIGHT_ALIGN_BYTES: u64 = 64;
/// Queues and queue size accepted at most (virtio's split-queue maximum).
pub const QUEUE_SIZE_MAX: u16 = 1024;
pub const QUEUES_MAX: u16 = 64;

/// One queue's part of the region, in bytes.
pub fn queue_region_bytes(queue_size: u16) -> u64 {
    // The format's size (`virtq::inflight`, the one implementation of the format).
    let raw = crate::virtq::inflight::region_bytes(queue_size) as u64;
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

/// A memfd of `len` zero bytes (close-on-exec), sealed against any size change.
/// The seals matter because GET_INFLIGHT_FD hands the client a duplicate: without
/// `F_SEAL_SHRINK` it could truncate the file under our mapping and make the next
/// access of a reactor fault (SIGBUS kills the server). `F_SEAL_SEAL` keeps it
/// from lifting them.
pub(crate) fn memfd(name: &str, len: u64) -> std::io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create reads a NUL-terminated name we own; the descriptor it
    // returns is new and ours alone.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
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
    /// descriptors. All zeros is the format's "unused" (version 0, desc_num 0):
    /// `virtq::inflight` initialises a queue's part when the queue first opens it.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Arc<InflightRegion>, InflightError> {
        check_shape(num_queues, queue_size)?;
        let len = u64::from(num_queues) * queue_region_bytes(queue_size);
        let file =
            memfd("ringblk-vhost-inflight", len).map_err(|e| InflightError::File(e.to_string()))?;
        InflightRegion::map(file, len, 0, num_queues, queue_size)
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
        // The region is never resized: seal it against shrinking when its file
        // still allows it (a memfd made with MFD_ALLOW_SEALING, as ours are), so
        // that the client cannot truncate it under the reactors' writes. Files
        // that cannot be sealed are logged.
        // SAFETY: F_ADD_SEALS on a descriptor we own; no memory is passed.
        let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        crate::memory::warn_if_shrinkable(&file, "inflight");
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
        // SAFETY: `index < num_queues` and the mapping is `num_queues *
        // queue_region_bytes` long, so `offset + queue_region_bytes` stays inside
        // that one mapping.
        let p = unsafe { self.map.as_ptr().add(offset) };
        Some(InflightQueue {
            _region: self.clone(),
            // A live mapping is never at address 0.
            ptr: std::ptr::NonNull::new(p)?,
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

/// One virtqueue's part of the region (module docs, *Layout*). Cloning shares it.
/// Its records are read and written through `virtq::inflight` only; the queue's
/// data plane runs `SplitInflight` straight over it (the start address is computed
/// once, here, not on each record access).
#[derive(Clone, Debug)]
pub struct InflightQueue {
    /// Keeps the mapping `ptr` points into alive (never read).
    _region: Arc<InflightRegion>,
    /// Start of this queue's part of `_region`'s mapping.
    ptr: std::ptr::NonNull<u8>,
    queue_size: u16,
}

// SAFETY: `ptr` points into the shared mapping `_region` keeps alive (an
// `Arc<InflightRegion>`, itself `Send`); the memory is touched only by the queue's
// reactor, the thread that owns the value once the queue runs.
unsafe impl Send for InflightQueue {}

impl InflightQueue {
    /// Start of this queue's part (its `QueueRegionSplit` header), for the data
    /// plane's own accessors (`virtq::inflight`). Mapped read/write and valid for
    /// [`len`](Self::len) bytes while this value (or a clone) lives.
    pub fn as_ptr(&self) -> std::ptr::NonNull<u8> {
        self.ptr
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
}

/// The data plane's view of a queue's part (`virtq::inflight` runs over it).
impl crate::virtq::inflight::Region for InflightQueue {
    fn as_ptr(&self) -> std::ptr::NonNull<u8> {
        InflightQueue::as_ptr(self)
    }

    fn len(&self) -> usize {
        InflightQueue::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtq::inflight::SplitInflight;
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

    /// Reads the 16-byte record at `at` of the region's file.
    fn record(f: &File, at: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        f.read_exact_at(&mut b, at).expect("read record");
        b
    }

    fn u16_at(b: &[u8; 16], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u64_at(b: &[u8; 16], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8"))
    }

    /// Records that `virtq::inflight` writes through a queue's part land at the
    /// byte offsets of QEMU's format in the region's file (as QEMU or a restarted
    /// server sees them), in that queue's part only, and a re-open of the same file
    /// finds them. The bug guarded: a part placed at the wrong offset (queues
    /// overwriting each other, or a restarted server resubmitting nothing).
    #[test]
    fn records_sit_where_the_format_says_and_survive_reopen() {
        let r = InflightRegion::create(2, 128).expect("create");
        assert_eq!(r.mmap_size(), 2 * 2112);
        assert!(r.queue(2).is_none());
        let f = r.file().try_clone().expect("dup");
        let mut before = vec![0u8; 2 * 2112];
        f.read_exact_at(&mut before, 0).expect("read");
        assert!(before.iter().all(|&b| b == 0), "a new region is all zeros");

        let q1 = r.queue(1).expect("q1");
        assert_eq!((q1.len(), q1.queue_size()), (2112, 128));
        let (mut log, pending) = SplitInflight::open(q1, 128, 40).expect("open q1");
        assert!(pending.is_empty());
        log.begin(3); // counter 0
        log.begin(5); // counter 1
        log.begin(9); // counter 2
        log.before_used(9);
        log.after_used(9, 41);
        log.begin(128); // past the queue: ignored

        let base = 2112u64;
        let h = record(&f, base);
        assert_eq!(u16_at(&h, 8), 1, "version");
        assert_eq!(u16_at(&h, 10), 128, "desc_num");
        assert_eq!(u16_at(&h, 12), 9, "last_batch_head");
        assert_eq!(u16_at(&h, 14), 41, "used_idx");
        let d5 = record(&f, base + 16 + 5 * 16);
        assert_eq!((d5[0], u64_at(&d5, 8)), (1, 1), "desc 5: inflight, counter");
        let d9 = record(&f, base + 16 + 9 * 16);
        assert_eq!(d9[0], 0, "desc 9 completed");
        assert_eq!(u16_at(&d9, 6), 0, "desc 9's next: the batch head before it");
        assert_eq!(u64_at(&d9, 8), 2);
        // Negative control: the same reads at queue 0's offsets see nothing, so the
        // checks above can fail, and queue 1's records did not spill into queue 0.
        let mut q0 = vec![0u8; 2112];
        f.read_exact_at(&mut q0, 0).expect("q0");
        assert!(q0.iter().all(|&b| b == 0), "queue 0 untouched");

        // A record written through the file (as a previous server left it) is
        // found by a re-open of the same file, in pop order.
        let mut d7 = [0u8; 16];
        d7[0] = 1;
        d7[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        f.write_all_at(&d7, base + 16 + 7 * 16)
            .expect("write desc 7");
        let again = InflightRegion::open(f, r.mmap_size(), 0, 2, 128).expect("reopen");
        let (_, pending) =
            SplitInflight::open(again.queue(1).expect("q1"), 128, 41).expect("open q1 again");
        assert_eq!(pending, [3, 5, 7]);
        let (_, pending) =
            SplitInflight::open(again.queue(0).expect("q0"), 128, 0).expect("open q0");
        assert!(pending.is_empty());
    }

    /// The region handed to the client cannot be resized by it: the bug guarded is
    /// a client truncating its duplicate of our memfd, after which a reactor's next
    /// inflight write faults (SIGBUS). Negative control: an unsealed file of the
    /// same kind shrinks.
    #[test]
    fn the_region_file_cannot_be_shrunk_by_the_client() {
        let r = InflightRegion::create(1, 128).expect("create");
        let theirs = r.file().try_clone().expect("dup");
        assert!(theirs.set_len(0).is_err(), "the client shrank the region");
        assert!(
            theirs.set_len(1 << 20).is_err(),
            "the client grew the region"
        );
        assert_eq!(theirs.metadata().expect("stat").len(), 2112);
        let unsealed = tempfile::tempfile().expect("tmp");
        unsealed.set_len(2112).expect("len");
        assert!(
            unsealed.set_len(0).is_ok(),
            "the control: an unsealed file shrinks"
        );
    }

    /// A client's region that can still be sealed is sealed against shrinking by
    /// SET_INFLIGHT_FD's open. Negative control: the same file shrinks before.
    #[test]
    fn an_opened_client_region_is_sealed_against_shrinking() {
        let name = std::ffi::CString::new("client").expect("name");
        // SAFETY: memfd_create reads a NUL-terminated name we own.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is the fresh descriptor just created.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(8192).expect("len");
        f.set_len(4096)
            .expect("the control: an unsealed memfd shrinks");
        let theirs = f.try_clone().expect("dup");
        let r = InflightRegion::open(f, 2112, 0, 1, 128).expect("open");
        assert!(theirs.set_len(0).is_err(), "the client shrank its region");
        drop(r);
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
