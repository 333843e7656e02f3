//! The mem backend: a memfd of the volume's size. Using a memfd instead of a heap
//! array keeps one data path for all backends (io_uring reads and writes on a
//! descriptor), avoids data races between reactors writing the same bytes, and is
//! sparse: TRIM punches holes and BLOCK_STATUS sees them.

use std::fs::File;
use std::os::fd::FromRawFd;

use super::{Backend, BackendKind};

/// A zero-filled RAM backend of `size_bytes`.
pub(crate) fn open(name: &str, size_bytes: u64) -> std::io::Result<Backend> {
    let cname = std::ffi::CString::new(format!("ringblk-{name}"))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: cname is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size_bytes)?;
    Ok(Backend {
        kind: BackendKind::Mem,
        file: Some(file),
        lock: None, // a memfd nobody else can open
        direct: false,
        can_punch: true,
    })
}
