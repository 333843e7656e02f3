//! One server per data dir: an exclusive lock on `DATA_DIR/ringblk.lock`.
//!
//! A second server on a running server's data dir used to run recovery there and
//! remove the first one's prepared delta as an orphan (its next group commit failed,
//! its backup was lost at the next start). `ringblk serve` takes this lock right after
//! it creates the data dir and before it reads or writes anything in it.
//!
//! # Contract
//! - The lock is an open file description (OFD) write lock on the whole file, as
//!   qemu's image locks are: it belongs to the descriptor [`DataDirLock`] holds, so the
//!   kernel drops it when the process ends however it ends (`kill -9` included), and a
//!   stale lock file never blocks a start.
//! - The holder writes its pid (decimal, one line) into the file, for the refusal
//!   message and for `ringblk check`. The pid is information; the lock is the truth.
//! - A lock file may be removed only by its holder. A starter that locked a file
//!   which was unlinked meanwhile (its inode no longer the path's) retries, so two
//!   servers never both believe they hold the dir.
//! - [`holder`] only tests the lock (`F_OFD_GETLK`): it never takes it, so a check
//!   running beside a server cannot make a server's start fail.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "ringblk.lock";

/// Attempts at locking a lock file that keeps being replaced under us.
const LOCK_ATTEMPTS: usize = 8;

/// The data dir's lock, held until dropped (or [`DataDirLock::release`]).
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    path: PathBuf,
}

/// A whole-file lock request of `kind` (F_WRLCK, F_UNLCK).
fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: libc::flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, whatever the file's size
    fl.l_pid = 0; // required by the OFD commands
    fl
}

/// The pid a holder wrote into the lock file, if readable.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl DataDirLock {
    /// Locks `dir` (which must exist) for this process, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, String> {
        let path = dir.join(LOCK_FILE);
        let shown = path.display();
        for _ in 0..LOCK_ATTEMPTS {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .map_err(|e| format!("cannot open the data dir lock {shown}: {e}"))?;
            match fcntl(
                file.as_raw_fd(),
                FcntlArg::F_OFD_SETLK(&whole_file(libc::F_WRLCK)),
            ) {
                Ok(_) => {}
                Err(Errno::EAGAIN | Errno::EACCES) => {
                    let pid = read_pid(&mut file)
                        .map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"));
                    return Err(format!(
                        "data dir {} is in use by another ringblk server ({pid}; lock {shown}): \
                         stop that server first, or give this one its own --data-dir",
                        dir.display()
                    ));
                }
                Err(e) => return Err(format!("cannot lock {shown}: {e}")),
            }
            if !same_file(&file, &path) {
                continue; // its holder removed it before we locked it: lock the new one
            }
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.write_all(pid.as_bytes()))
                .map_err(|e| format!("cannot write the data dir lock {shown}: {e}"))?;
            return Ok(DataDirLock { file, path });
        }
        Err(format!(
            "cannot lock {shown}: it was replaced {LOCK_ATTEMPTS} times while locking it"
        ))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the lock file, then releases the lock (a failed start leaves nothing;
    /// a stopped server leaves a tidy dir). Safe for a concurrent starter: see the
    /// module docs.
    pub fn release(self) {
        if same_file(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
        drop(self.file);
    }
}

/// The pid written by the server that holds `dir`'s lock now (`Some(None)`: held, pid
/// unreadable); `None` when no server holds it. Never locks or writes.
pub fn holder(dir: &Path) -> Option<Option<u32>> {
    let mut file = File::open(dir.join(LOCK_FILE)).ok()?;
    let mut fl = whole_file(libc::F_WRLCK);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).ok()?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return None;
    }
    Some(read_pid(&mut file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_check_sees_it() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(holder(dir.path()), None);
        let lock = DataDirLock::acquire(dir.path()).expect("first");
        // Another open file description, as a second process would have.
        let err = DataDirLock::acquire(dir.path()).expect_err("second");
        let me = std::process::id().to_string();
        assert!(err.contains(&me) && err.contains("in use"), "{err}");
        assert_eq!(holder(dir.path()), Some(Some(std::process::id())));
        lock.release();
        assert!(!dir.path().join(LOCK_FILE).exists());
        assert_eq!(holder(dir.path()), None);
        // A stale lock file (a killed holder) does not block.
        std::fs::write(dir.path().join(LOCK_FILE), "999999999\n").expect("write");
        assert_eq!(holder(dir.path()), None);
        let lock = DataDirLock::acquire(dir.path()).expect("over a stale file");
        let text = std::fs::read_to_string(lock.path()).expect("read");
        assert_eq!(text, format!("{me}\n"));
    }
}
