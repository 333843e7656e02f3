//! THE mapping from the block layer's errors to NBD's (plan §2.6): the one place an
//! NBD client's errno is chosen, with the message its structured error reply carries.
//!
//! Layer: the NBD front end's edge; imports `ringblk_target::{error, ops}` (the
//! protocol-free vocabulary) and this crate's codec. Moved from the target crate's
//! `session.rs` in #12 step 5.2, with its table tests.

use ringblk_target::error::BlockError;
use ringblk_target::ops::IoKind;

use crate::codec::Command;
use crate::NbdErrno;

/// The NBD command's block request kind; `None` for DISC and unknown commands, which
/// never reach the block layer (no fault, no latency, `Invalid` at most).
pub(crate) fn io_kind(cmd: Command) -> Option<IoKind> {
    Some(match cmd {
        Command::Read => IoKind::Read,
        Command::Write => IoKind::Write,
        Command::Flush => IoKind::Flush,
        Command::Trim => IoKind::Unmap,
        Command::WriteZeroes => IoKind::WriteZeroes,
        Command::Cache => IoKind::Readahead,
        Command::BlockStatus => IoKind::BlockStatus,
        Command::Disc | Command::Unknown(_) => return None,
    })
}

/// THE mapping from the block layer's errors to NBD's (plan §2.6). `kind` matters only
/// for `OutOfRange`: past the end is ENOSPC for a write-type request (the NBD spec's
/// choice), EINVAL otherwise.
pub fn nbd_errno(kind: IoKind, e: BlockError) -> NbdErrno {
    // No wildcard arm: a new `BlockError` variant must be mapped here on purpose.
    match e {
        BlockError::ReadOnly => NbdErrno::Perm,
        BlockError::NoSpace => NbdErrno::NoSpc,
        BlockError::Invalid => NbdErrno::Inval,
        BlockError::OutOfRange if kind.is_write() => NbdErrno::NoSpc,
        BlockError::OutOfRange => NbdErrno::Inval,
        BlockError::TooLarge => NbdErrno::Overflow,
        BlockError::NotSupported => NbdErrno::NotSup,
        BlockError::Shutdown | BlockError::Removed => NbdErrno::Shutdown,
        // Kernel ENOMEM only: NBD_ENOMEM as before #12 step 1 (plan §2.6 folds it into EIO).
        BlockError::NoMemory => NbdErrno::NoMem,
        // NBD has no compare-and-write: unreachable from this front end.
        BlockError::Io | BlockError::Miscompare { .. } => NbdErrno::Io,
    }
}

/// [`nbd_errno`] for the reply to `cmd`. DISC and unknown commands only ever fail with
/// `Invalid` or `Removed`, for which the kind does not matter.
pub(crate) fn reply_errno(cmd: Command, e: BlockError) -> NbdErrno {
    nbd_errno(io_kind(cmd).unwrap_or(IoKind::Read), e)
}

/// The message of a structured error reply with errno `e`.
pub(crate) fn errno_message(e: NbdErrno) -> &'static str {
    match e {
        NbdErrno::Perm => "export is read-only",
        NbdErrno::Inval => "invalid request (range, alignment, command or flags)",
        NbdErrno::NoSpc => "request past the end of the export or out of space",
        NbdErrno::Overflow => "request larger than the 32 MiB maximum",
        NbdErrno::NotSup => "fast zeroing is not possible here",
        NbdErrno::Shutdown => "server is shutting down",
        NbdErrno::NoMem => "out of memory",
        NbdErrno::Io => "I/O error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OS errno → NBD table as it was before #12 step 1 (`os_errno.rs`), typed
    /// out again: the errors clients see must not change.
    fn nbd_before_step1(errno: i32) -> NbdErrno {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => NbdErrno::Perm,
            libc::ENOMEM => NbdErrno::NoMem,
            libc::EINVAL => NbdErrno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::NoSpc,
            libc::EOVERFLOW => NbdErrno::Overflow,
            libc::EOPNOTSUPP => NbdErrno::NotSup,
            libc::ESHUTDOWN => NbdErrno::Shutdown,
            _ => NbdErrno::Io,
        }
    }

    #[test]
    fn errno_mapping_gives_todays_nbd_errors() {
        for kind in IoKind::ALL {
            for errno in 0..200 {
                let e = nbd_errno(kind, BlockError::from_os_errno(errno));
                assert_eq!(e, nbd_before_step1(errno), "{kind:?} errno {errno}");
                assert!(NbdErrno::ALL.contains(&e));
            }
        }
        // The spot checks of the old os_errno test.
        let via = |errno| nbd_errno(IoKind::Write, BlockError::from_os_errno(errno));
        assert_eq!(via(libc::EDQUOT), NbdErrno::NoSpc);
        assert_eq!(via(libc::EFBIG), NbdErrno::NoSpc);
        assert_eq!(via(libc::EROFS), NbdErrno::Perm);
        assert_eq!(via(libc::EBADF), NbdErrno::Io);
        let io = std::io::Error::other("no os code");
        assert_eq!(
            nbd_errno(IoKind::Flush, BlockError::from_io_error(&io)),
            NbdErrno::Io
        );
    }

    #[test]
    fn layer_only_errors_map_as_the_plan_says() {
        // A backup released under an open connection: ESHUTDOWN, as before.
        assert_eq!(
            nbd_errno(IoKind::Read, BlockError::Removed),
            NbdErrno::Shutdown
        );
        // Short writes / fast zero impossible / a DISC or unknown command.
        assert_eq!(
            nbd_errno(IoKind::Write, BlockError::NoSpace),
            NbdErrno::NoSpc
        );
        assert_eq!(
            nbd_errno(IoKind::WriteZeroes, BlockError::NotSupported),
            NbdErrno::NotSup
        );
        assert_eq!(
            reply_errno(Command::Unknown(99), BlockError::Invalid),
            NbdErrno::Inval
        );
        for kind in IoKind::ALL {
            let want = if kind.is_write() {
                NbdErrno::NoSpc
            } else {
                NbdErrno::Inval
            };
            assert_eq!(nbd_errno(kind, BlockError::OutOfRange), want, "{kind:?}");
        }
        let miscompare = BlockError::Miscompare { offset: 7 };
        assert_eq!(nbd_errno(IoKind::CompareAndWrite, miscompare), NbdErrno::Io);
        // Injected faults reach clients as EIO and ENOSPC, as before.
        use ringblk_target::fault::FaultErrno;
        assert_eq!(
            nbd_errno(IoKind::Read, FaultErrno::Eio.error()),
            NbdErrno::Io
        );
        assert_eq!(
            nbd_errno(IoKind::Write, FaultErrno::Enospc.error()),
            NbdErrno::NoSpc
        );
    }
}
