//! Host `errno` → [`NbdErrno`], the one place where OS errors are mapped to the wire set.
//!
//! Transitional (issue #12): the mapping used to be `NbdErrno::from_os_errno` in the NBD
//! code; it moved here when that code became the `ringblk-nbd` crate, which depends on
//! std and thiserror only (no libc). It is a trait so that call sites keep the
//! `NbdErrno::from_os_errno(e)` form. Step 1 of #12 replaces it with
//! `BlockError::from_os_errno` and a front-end mapping `BlockError` → `NbdErrno`.

use ringblk_nbd::NbdErrno;

/// Maps host errors to the NBD error set.
pub trait FromOsErrno: Sized {
    /// Maps a host `errno` (from a failed read/write/fsync).
    fn from_os_errno(errno: i32) -> Self;

    /// Maps an [`std::io::Error`]; errors without an OS code are `EIO`.
    fn from_io_error(err: &std::io::Error) -> Self;
}

impl FromOsErrno for NbdErrno {
    /// The spec asks for `EDQUOT`/`EFBIG` → `ENOSPC`; permission-like errors become
    /// `EPERM`; anything without a closer match is `EIO`.
    fn from_os_errno(errno: i32) -> NbdErrno {
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

    fn from_io_error(err: &std::io::Error) -> NbdErrno {
        err.raw_os_error()
            .map_or(NbdErrno::Io, NbdErrno::from_os_errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errno_mapping_never_leaks_host_values() {
        assert_eq!(NbdErrno::from_os_errno(libc::EDQUOT), NbdErrno::NoSpc);
        assert_eq!(NbdErrno::from_os_errno(libc::EFBIG), NbdErrno::NoSpc);
        assert_eq!(NbdErrno::from_os_errno(libc::EROFS), NbdErrno::Perm);
        assert_eq!(NbdErrno::from_os_errno(libc::EBADF), NbdErrno::Io);
        for raw in 0..200 {
            let e = NbdErrno::from_os_errno(raw);
            assert!(NbdErrno::ALL.contains(&e));
        }
        let io = std::io::Error::other("no os code");
        assert_eq!(NbdErrno::from_io_error(&io), NbdErrno::Io);
    }
}
