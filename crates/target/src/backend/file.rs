//! File and block-device backends.
//!
//! Opened O_DIRECT by default so that reads and writes bypass the page cache, as an
//! SPDK bdev would; when the filesystem refuses O_DIRECT (e.g. an old tmpfs) the file
//! is opened buffered and a warning says so. A missing (or empty) file is created
//! sparse at the requested size. An existing file smaller than the requested size is
//! refused unless `grow` is set (then it is grown sparse): a wrong size must never
//! change a user's image. A requested size smaller than the file serves the first
//! `size` bytes; the file is never shrunk.
//!
//! A writable backend holds the file's write lock (`filelock`) for as long as it is
//! open, taken before anything changes the file (the growing `set_len`): a file
//! another volume or process writes is refused untouched.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{Backend, BackendKind};
use crate::extent::{Extent, ExtentFlags};

/// How to open a file backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FileOptions {
    /// Size to create or grow to; `None` = use the file's size.
    pub size_bytes: Option<u64>,
    pub read_only: bool,
    /// Try O_DIRECT first.
    pub direct: bool,
    /// Let `size_bytes` grow an existing non-empty file that is smaller.
    pub grow: bool,
}

/// Opens (creating if needed) a file or block device; returns the backend and its size.
/// `owner` names the volume in the lock conflicts of later writers (`filelock`).
pub(crate) fn open(path: &Path, opts: FileOptions, owner: &str) -> std::io::Result<(Backend, u64)> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(!opts.read_only);
    if !opts.read_only && opts.size_bytes.is_some() {
        oo.create(true);
    }
    let mut direct = opts.direct;
    let file = match oo
        .clone()
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
    {
        Ok(f) => f,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(path = %path.display(), "O_DIRECT refused by the filesystem; using buffered I/O");
            direct = false;
            oo.open(path)?
        }
        Err(e) => return Err(e),
    };
    let lock = match opts.read_only {
        true => None,
        false => Some(crate::filelock::lock(&file, path, owner.to_string())?),
    };
    let meta = file.metadata()?;
    let is_block = meta.file_type().is_block_device();
    let mut size = if is_block {
        block_device_size(&file)?
    } else {
        meta.len()
    };
    if let Some(want) = opts.size_bytes {
        if want <= size {
            size = want;
        } else if is_block || opts.read_only {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is {size} bytes, smaller than the requested {want}",
                    path.display()
                ),
            ));
        } else if size > 0 && !opts.grow {
            return Err(refuse_growth(path, size, want));
        } else {
            if size > 0 {
                tracing::info!(path = %path.display(), from = size, to = want, "growing the file (grow=true)");
            }
            file.set_len(want)?;
            size = want;
        }
    }
    let backend = Backend {
        kind: BackendKind::File,
        file: Some(file),
        lock,
        direct,
        // Block devices take fallocate too (Linux >= 4.9): PUNCH_HOLE zeroes through
        // the device's write-zeroes/discard and answers EOPNOTSUPP rather than fall back
        // to writing zeros (a fast zero, or nothing), ZERO_RANGE falls back in the kernel.
        can_punch: true,
    };
    Ok((backend, size))
}

/// An existing non-empty file smaller than the size asked for, without `grow`.
/// (An empty file holds nothing to protect: it is sized like a new one, which is also
/// what a start interrupted between creating and sizing a file leaves.)
fn refuse_growth(path: &Path, size: u64, want: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "{} is {size} bytes, smaller than the size asked for ({want} bytes); an existing \
             image is never grown unless asked: add grow=true to the volume \
             (--volume NAME=PATH,size=SIZE,grow=true; `grow = true` in the config file; \
             \"grow\": true in volume_create), or give its size",
            path.display()
        ),
    )
}

/// What [`open`] would refuse about the size of the existing file at `path` (a start
/// checks this before it creates any file). A missing file passes.
pub(crate) fn check_size(path: &Path, opts: FileOptions) -> std::io::Result<()> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is a directory", path.display()),
        ));
    }
    match opts.size_bytes {
        Some(want) if meta.is_file() && want > meta.len() && meta.len() > 0 && !opts.grow => {
            Err(refuse_growth(path, meta.len(), want))
        }
        _ => Ok(()),
    }
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
thread_local! {
    /// `lseek` calls made by this thread (tests bound BLOCK_STATUS's work with it).
    pub(crate) static LSEEKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn lseek(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    #[cfg(test)]
    LSEEKS.with(|c| c.set(c.get() + 1));
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Data/hole extents of `[offset, offset + len)` using SEEK_DATA/SEEK_HOLE, at most
/// `max_extents` of them and at most `*lseeks` lseek calls (decremented by the calls
/// made): the extents cover a prefix of the range, empty only when `*lseeks < 2`.
/// Falls back to "all data" when the filesystem cannot tell (that is always correct).
pub(crate) fn seek_extents(
    file: &File,
    offset: u64,
    len: u32,
    max_extents: usize,
    lseeks: &mut u32,
) -> Vec<Extent> {
    let end = offset.saturating_add(len as u64);
    let mut out = Vec::new();
    let mut pos = offset;
    // An extent costs up to two calls: SEEK_DATA, then SEEK_HOLE when pos is data.
    while pos < end && out.len() < max_extents.max(1) && *lseeks >= 2 {
        *lseeks -= 1;
        let data = lseek(file, pos, libc::SEEK_DATA);
        let (flags, next) = match data {
            // ENXIO: no data at or after pos: the rest is a hole.
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                (ExtentFlags::UNALLOCATED | ExtentFlags::ZEROES, end)
            }
            None => (ExtentFlags::NONE, end),
            Some(d) if d > pos => (ExtentFlags::UNALLOCATED | ExtentFlags::ZEROES, d.min(end)),
            Some(_) => {
                *lseeks -= 1;
                (
                    ExtentFlags::NONE,
                    lseek(file, pos, libc::SEEK_HOLE).unwrap_or(end).min(end),
                )
            }
        };
        let next = next.max(pos + 1).min(end);
        // Merge with the previous extent when the flags match (SEEK can split).
        match out.last_mut() {
            Some(Extent {
                length_bytes,
                flags: f,
            }) if *f == flags => *length_bytes += next - pos,
            _ => out.push(Extent {
                length_bytes: next - pos,
                flags,
            }),
        }
        pos = next;
    }
    out
}
