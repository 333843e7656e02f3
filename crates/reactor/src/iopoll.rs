//! IOPOLL support detection.
//!
//! IOPOLL rings complete O_DIRECT I/O by polling the device's completion queue, which
//! only works on block devices with polled queues (NVMe with `poll_queues`). On
//! anything else the kernel fails the I/O with `EOPNOTSUPP`. We probe with one real
//! read instead of guessing from sysfs, and report the answer.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use io_uring::{opcode, types, IoUring};

use crate::buffers::AlignedBuf;

#[derive(Debug, PartialEq, Eq)]
pub enum IopollSupport {
    Supported,
    /// The kernel or device cannot poll; the reason names the errno.
    Unsupported(String),
}

/// Tries one O_DIRECT 4 KiB read at offset 0 of `path` on an IOPOLL ring.
pub fn probe_iopoll(path: &Path) -> std::io::Result<IopollSupport> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let mut ring = match IoUring::builder().setup_iopoll().build(4) {
        Ok(r) => r,
        Err(e) => {
            return Ok(IopollSupport::Unsupported(format!(
                "io_uring_setup(IOPOLL): {e}"
            )))
        }
    };
    let mut buf = AlignedBuf::direct(4096);
    let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), 4096)
        .offset(0)
        .build()
        .user_data(1);
    // SAFETY: `buf` and `file` outlive the wait below, which reaps the only CQE.
    unsafe { ring.submission().push(&sqe) }
        .map_err(|_| std::io::Error::other("fresh ring has a full SQ"))?;
    ring.submit_and_wait(1)?;
    let res = ring
        .completion()
        .next()
        .map(|c: io_uring::cqueue::Entry| c.result())
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    Ok(match res {
        r if r >= 0 => IopollSupport::Supported,
        r if -r == libc::EOPNOTSUPP => IopollSupport::Unsupported(format!(
            "{}: EOPNOTSUPP: the device has no polled queues",
            path.display()
        )),
        r => IopollSupport::Unsupported(format!(
            "{}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(-r)
        )),
    })
}
