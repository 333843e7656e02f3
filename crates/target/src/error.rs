//! `BlockError`: why a block request failed, in the layer's own words (no protocol).
//!
//! Every failure on the data path (backend I/O, the layered path, group commit, injected
//! faults, copy jobs) is a `BlockError`. Host `errno`s become one here, in
//! [`BlockError::from_os_errno`], the only place that interprets them. A front end maps
//! `BlockError` to its wire set at its edge, in its own crate (for NBD: one function in
//! the NBD crate's `frontend::errors`). The layer never fails a valid request
//! for lack of internal room: it waits instead (back-pressure), so there is no
//! "out of room" error here; see [`BlockError::NoMemory`] for the one kernel case.

/// Why a block request failed.
///
/// Deliberately not `#[non_exhaustive]`: every front end maps it without a wildcard
/// arm (in its own crate), so a new variant fails their builds until it is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// A device error, or a failure with no closer match.
    #[error("I/O error")]
    Io,
    /// The backing store is full (ENOSPC, EDQUOT, EFBIG, a short write).
    #[error("out of space")]
    NoSpace,
    /// The view or the backing store does not take writes.
    #[error("read-only")]
    ReadOnly,
    /// The request is malformed (alignment, flags, an unknown backup).
    #[error("invalid request")]
    Invalid,
    /// The range is outside the view.
    #[error("range past the end of the device")]
    OutOfRange,
    /// The request is larger than the layer takes at once.
    #[error("request too large")]
    TooLarge,
    /// The operation (or its mode, such as "fast zero only") is not possible here.
    #[error("not supported")]
    NotSupported,
    /// The server is stopping.
    #[error("shutting down")]
    Shutdown,
    /// The volume was deleted, or the backup released, while the view was open.
    #[error("device removed")]
    Removed,
    /// The kernel failed an I/O with ENOMEM. Transitional (#12 step 1): kept so that a
    /// front end can still answer it as out-of-memory (NBD does, as before step 1); the plan (§2.6) folds it
    /// into `Io`. Nothing in the layer produces it for lack of its own room.
    #[error("kernel out of memory")]
    NoMemory,
    /// CompareAndWrite found different data, first at byte `offset` of the request.
    #[error("compare failed at byte {offset}")]
    Miscompare { offset: u64 },
}

impl BlockError {
    /// Maps a host `errno` (positive, from a failed read/write/fsync/fallocate).
    /// Permission-like errors are `ReadOnly`; `EDQUOT`/`EFBIG` are `NoSpace`; anything
    /// without a closer match is `Io`, so host values never leak to a client.
    pub fn from_os_errno(errno: i32) -> BlockError {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => BlockError::ReadOnly,
            libc::ENOMEM => BlockError::NoMemory,
            libc::EINVAL => BlockError::Invalid,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => BlockError::NoSpace,
            libc::EOVERFLOW => BlockError::TooLarge,
            libc::EOPNOTSUPP => BlockError::NotSupported,
            libc::ESHUTDOWN => BlockError::Shutdown,
            _ => BlockError::Io,
        }
    }

    /// Maps an [`std::io::Error`]; errors without an OS code are `Io`.
    pub fn from_io_error(err: &std::io::Error) -> BlockError {
        err.raw_os_error()
            .map_or(BlockError::Io, BlockError::from_os_errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errno_mapping() {
        assert_eq!(BlockError::from_os_errno(libc::EDQUOT), BlockError::NoSpace);
        assert_eq!(BlockError::from_os_errno(libc::EFBIG), BlockError::NoSpace);
        assert_eq!(BlockError::from_os_errno(libc::EROFS), BlockError::ReadOnly);
        assert_eq!(BlockError::from_os_errno(libc::EBADF), BlockError::Io);
        assert_eq!(BlockError::from_os_errno(libc::EIO), BlockError::Io);
        let io = std::io::Error::other("no os code");
        assert_eq!(BlockError::from_io_error(&io), BlockError::Io);
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(BlockError::from_io_error(&enospc), BlockError::NoSpace);
    }
}
