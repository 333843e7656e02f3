//! Backend devices: where a volume's base image lives.
//!
//! - [`file`]: a regular file or block device, opened O_DIRECT where the filesystem
//!   allows it; every reactor submits to the same descriptor (the kernel serialises
//!   nothing for us: concurrent writes to one block are the client's business, as on
//!   a disk).
//! - [`mem`]: RAM, as a memfd, so it goes through exactly the file data path (and is
//!   sparse: TRIM and BLOCK_STATUS work).
//! - [`null`]: reads return zeros, writes are discarded without I/O; measures the
//!   protocol and reactor overhead alone.
//!
//! # Durability
//! File and mem backends are a disk with a volatile write cache: a write completion
//! means the data reached the file (O_DIRECT: the device), and FLUSH (`fdatasync`)
//! makes every completed write durable, whichever descriptor or reactor wrote it,
//! since they share one inode. That is what lets volumes advertise CAN_MULTI_CONN.

pub(crate) mod file;
pub(crate) mod mem;
pub(crate) mod null;

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use crate::extent::{Extent, ExtentFlags};

/// Moved to [`crate::spec`] (#12 step 1); re-exported so paths keep working.
pub(crate) use crate::spec::BackendKind;

/// An opened backend.
#[derive(Debug)]
pub(crate) struct Backend {
    kind: BackendKind,
    /// `None` for the null backend.
    file: Option<File>,
    /// The write lock held through `file` (writable file backends; `filelock`).
    /// After `file`: unregistered once the descriptor is closed.
    #[allow(dead_code)] // held for its Drop
    lock: Option<crate::filelock::WriteLock>,
    /// Whether the descriptor was opened O_DIRECT (buffers must be aligned).
    direct: bool,
    /// Whether fallocate punch-hole/zero-range may work on this file or device (the
    /// call can still answer EOPNOTSUPP: TRIM then keeps the data, FAST_ZERO fails
    /// with ENOTSUP and a plain WRITE_ZEROES writes zeros).
    can_punch: bool,
}

impl Backend {
    pub(crate) fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The descriptor every reactor submits I/O to; `None` for null.
    pub(crate) fn raw_fd(&self) -> Option<RawFd> {
        self.file.as_ref().map(|f| f.as_raw_fd())
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    pub(crate) fn can_punch(&self) -> bool {
        self.can_punch
    }

    /// Releases the write lock on the file (see [`crate::filelock::WriteLock::release`]).
    pub(crate) fn release_write_lock(&self) {
        if let (Some(lock), Some(file)) = (&self.lock, &self.file) {
            lock.release(file);
        }
    }

    /// Allocation status of `[offset, offset + len)` for `base:allocation`, at most
    /// `max_extents` extents covering a prefix of the range.
    /// Each extent may cost two `lseek` calls on the calling thread, taken from
    /// `*lseeks`; none when that is below two (then the result may be empty).
    pub(crate) fn block_status(
        &self,
        offset: u64,
        len: u32,
        max_extents: usize,
        lseeks: &mut u32,
    ) -> Vec<Extent> {
        match &self.file {
            None => vec![Extent {
                length_bytes: u64::from(len),
                flags: ExtentFlags::UNALLOCATED | ExtentFlags::ZEROES,
            }],
            Some(f) => file::seek_extents(f, offset, len, max_extents, lseeks),
        }
    }
}
