//! The one mapping from backend errors (Linux errno values from io_uring completions
//! or syscalls) to the NBD protocol's error values.
//!
//! Only the spec's values reach the wire. ENOSPC and EDQUOT stay ENOSPC (the client can
//! act on "out of space"); permission-like errors become EPERM; everything else that is
//! not one of the spec's values is reported as EIO, the generic "the I/O failed".

use crate::nbd::NbdErrno;

/// Maps a positive Linux errno to the NBD error sent to the client.
pub fn nbd_errno(errno: i32) -> NbdErrno {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_errors_map_to_spec_values_only() {
        assert_eq!(nbd_errno(libc::EIO), NbdErrno::Io);
        assert_eq!(nbd_errno(libc::ENOSPC), NbdErrno::NoSpc);
        assert_eq!(nbd_errno(libc::EDQUOT), NbdErrno::NoSpc);
        assert_eq!(nbd_errno(libc::EROFS), NbdErrno::Perm);
        assert_eq!(nbd_errno(libc::EBADF), NbdErrno::Io);
        assert_eq!(nbd_errno(libc::ECANCELED), NbdErrno::Io);
        for e in 1..200 {
            assert!(NbdErrno::ALL.contains(&nbd_errno(e)));
        }
    }
}
