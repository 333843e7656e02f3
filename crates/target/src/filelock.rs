//! One writer per file: the write lock the server holds on every file it writes
//! for a client (a volume's base image, a delta's data file, a copy job's
//! destination), so that two volumes, a copy job and a volume, or two servers
//! never write one file (issue #11 item 3: a second volume on a base showed its
//! writes in the other volume's frozen backup; a copy onto a live base truncated
//! it under its clients).
//!
//! # The lock
//! An open file description lock (`F_OFD_SETLK`, `F_WRLCK` over the whole file),
//! as qemu takes on its images; a conflict is refused at once, with qemu's wording
//! (`Failed to get "write" lock`). Such a lock belongs to the open file
//! description: it lasts while any descriptor of that description is open (dups
//! included) and conflicts with a lock taken through any other description of the
//! file — in this process too. So each file is locked exactly once, through the
//! descriptor its holder keeps for its whole life (the backend's, the delta's, the
//! copy job's): the lock goes when that descriptor closes (a volume dropped after
//! `volume_delete`, a delta after its release, a finished copy job, a stopped
//! server). Nothing else the server opens on such a file takes a lock (the
//! store's descriptors for fdatasync, reads of a backup's export), so it never
//! conflicts with itself. A delta file handed to the next backup (`switchover`'s
//! reuse) keeps its description, and with it the lock ([`WriteLock::transfer`]).
//!
//! # Naming the holder
//! The kernel does not say who holds an OFD lock (`F_OFD_GETLK` reports pid -1),
//! so the server keeps its own map (device, inode) → holder of the locks it took;
//! a conflict on a file in the map names the holder, any other conflict is
//! "another process".
//!
//! Filesystems without OFD locks: the file is used unlocked, with a warning (as
//! qemu does when locking is unsupported).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// (device, inode) of a locked file.
type Key = (u64, u64);

struct Held {
    token: u64,
    owner: String,
}

/// Locks this process holds, by file (module docs: # Naming the holder).
static HELD: Mutex<Option<HashMap<Key, Held>>> = Mutex::new(None);
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

fn with_held<R>(f: impl FnOnce(&mut HashMap<Key, Held>) -> R) -> R {
    let mut g = HELD.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// Another writer holds the file.
#[derive(Clone, Debug, thiserror::Error)]
#[error("Failed to get \"write\" lock on {path}: {holder}")]
pub struct LockError {
    pub path: String,
    /// Who holds it, and what to do.
    pub holder: String,
}

/// This process's registration of a lock it holds (the lock itself belongs to the
/// holder's descriptor; see the module docs). Dropped after that descriptor closes
/// (declare it after the `File` in the holder).
#[derive(Debug)]
pub struct WriteLock {
    key: Key,
    /// 0: not registered (locking unsupported).
    token: u64,
}

/// Takes the write lock on `file` (opened for writing) at `path` for `owner`, a
/// phrase naming the holder for others' error messages (`volume "vol0" (base
/// image)`). `Err(io)` whose inner error is a [`LockError`] when another writer
/// holds it.
pub fn lock(file: &File, path: &Path, owner: String) -> std::io::Result<WriteLock> {
    let meta = file.metadata()?;
    let key = (meta.dev(), meta.ino());
    // SAFETY: a zeroed flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, whatever its size becomes
                  // SAFETY: fcntl reads the flock, which outlives the call, on a descriptor the
                  // caller keeps open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        with_held(|h| h.insert(key, Held { token, owner }));
        return Ok(WriteLock { key, token });
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            let holder = with_held(|h| h.get(&key).map(|x| x.owner.clone()));
            let holder = match holder {
                Some(o) => format!("it is in use by {o}; use another file, or delete or stop that first"),
                None => "another process holds it (another ringblk, qemu, ...); stop it or use another file".to_string(),
            };
            Err(std::io::Error::other(LockError {
                path: path.display().to_string(),
                holder,
            }))
        }
        Some(libc::EINVAL) | Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
            tracing::warn!(path = %path.display(), error = %e, "the filesystem cannot lock this file; nothing stops a second writer");
            Ok(WriteLock { key, token: 0 })
        }
        _ => Err(e),
    }
}

/// The [`LockError`] inside an error of [`lock`], if that is what it is.
pub fn lock_error(e: &std::io::Error) -> Option<&LockError> {
    e.get_ref().and_then(|i| i.downcast_ref::<LockError>())
}

impl WriteLock {
    /// The same lock, now held for `owner` through a descriptor of the same open
    /// file description (a `try_clone` of the holder's file): this one no longer
    /// unregisters it when dropped.
    pub fn transfer(&self, owner: String) -> WriteLock {
        if self.token == 0 {
            return WriteLock {
                key: self.key,
                token: 0,
            };
        }
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        with_held(|h| h.insert(self.key, Held { token, owner }));
        WriteLock {
            key: self.key,
            token,
        }
    }
}

impl WriteLock {
    /// Gives the lock up while the holder's descriptor `file` stays open: a deleted
    /// volume whose last client lingers must not keep its base from a re-created
    /// volume once none of its I/O can run any more (`ServerShared::remove_volume`).
    pub fn release(&self, file: &File) {
        if self.token == 0 {
            return;
        }
        // SAFETY: a zeroed flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_UNLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: fcntl reads the flock, which outlives the call, on a descriptor the
        // caller keeps open.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot release a write lock; it goes when the file closes");
            return;
        }
        with_held(|h| {
            if h.get(&self.key).is_some_and(|x| x.token == self.token) {
                h.remove(&self.key);
            }
        });
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if self.token == 0 {
            return;
        }
        with_held(|h| {
            if h.get(&self.key).is_some_and(|x| x.token == self.token) {
                h.remove(&self.key);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_description_is_refused_and_the_holder_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("f.img");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .expect("open")
        };
        let f1 = open();
        let l1 = lock(&f1, &path, "volume \"a\" (base image)".into()).expect("first");
        let f2 = open();
        let e = lock(&f2, &path, "volume \"b\" (base image)".into()).expect_err("second");
        let msg = lock_error(&e).expect("a lock error").to_string();
        assert!(
            msg.starts_with("Failed to get \"write\" lock on ") && msg.contains("volume \"a\""),
            "{msg}"
        );
        // Reading needs no lock.
        assert!(std::fs::read(&path).is_ok());
        // A dup shares the lock: the holder's transfer keeps it after f1 closes.
        let f3 = f1.try_clone().expect("dup");
        let l3 = l1.transfer("volume \"c\" (delta 2)".into());
        drop(f1);
        drop(l1);
        let e = lock(&f2, &path, "x".into()).expect_err("still held");
        assert!(lock_error(&e)
            .expect("lock error")
            .to_string()
            .contains("volume \"c\""));
        // Closed: free for the next writer.
        drop(f3);
        drop(l3);
        let _l2 = lock(&f2, &path, "volume \"b\" (base image)".into()).expect("free now");
    }
}
