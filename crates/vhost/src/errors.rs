//! THE mapping from the block layer's errors to virtio-blk's request status: the one
//! place a virtio status byte is chosen for a failed request (SPDK's
//! `spdk_bdev_io_get_scsi_status`, the NBD front end's `nbd_errno`).
//!
//! Layer: the vhost front end's edge; imports `ringblk_target::error` and
//! virtio-bindings' status constants only.
//!
//! virtio-blk has three statuses: OK, IOERR and UNSUPP. Linux turns IOERR into
//! `BLK_STS_IOERR` (EIO) and UNSUPP into `BLK_STS_NOTSUPP` (EOPNOTSUPP), which it
//! remembers per request type (a discard that is UNSUPP turns discard off). So
//! UNSUPP is kept for "this kind of request cannot work here", and everything else,
//! a write to a read-only export included (issue #13: "writes get IOERR"), is IOERR.

use ringblk_target::error::BlockError;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};

/// Request succeeded.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Request failed.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Request type not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

const _: () = assert!(STATUS_OK == 0 && STATUS_IOERR == 1 && STATUS_UNSUPP == 2);

/// THE mapping: the status byte of a request the block layer failed with `e`.
pub fn virtio_status(e: BlockError) -> u8 {
    // No wildcard arm: a new `BlockError` variant must be mapped here on purpose.
    match e {
        BlockError::NotSupported => STATUS_UNSUPP,
        BlockError::Io
        | BlockError::NoSpace
        | BlockError::ReadOnly
        | BlockError::Invalid
        | BlockError::OutOfRange
        | BlockError::TooLarge
        | BlockError::Shutdown
        | BlockError::Removed
        | BlockError::NoMemory
        | BlockError::Miscompare { .. } => STATUS_IOERR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table, typed out: only "not supported" is UNSUPP; a read-only export's
    /// writes, ranges past the end and removed backups are IOERR; nothing maps to OK.
    #[test]
    fn only_not_supported_is_unsupp() {
        let all = [
            BlockError::Io,
            BlockError::NoSpace,
            BlockError::ReadOnly,
            BlockError::Invalid,
            BlockError::OutOfRange,
            BlockError::TooLarge,
            BlockError::NotSupported,
            BlockError::Shutdown,
            BlockError::Removed,
            BlockError::NoMemory,
            BlockError::Miscompare { offset: 3 },
        ];
        for e in all {
            let want = if e == BlockError::NotSupported {
                STATUS_UNSUPP
            } else {
                STATUS_IOERR
            };
            assert_eq!(virtio_status(e), want, "{e:?}");
            assert_ne!(virtio_status(e), STATUS_OK);
        }
        // Host errnos reach the guest through the layer's own mapping.
        assert_eq!(
            virtio_status(BlockError::from_os_errno(libc::EROFS)),
            STATUS_IOERR
        );
        assert_eq!(
            virtio_status(BlockError::from_os_errno(libc::EOPNOTSUPP)),
            STATUS_UNSUPP
        );
    }
}
