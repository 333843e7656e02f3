//! The backing store under the durability layer: named files in one directory.
//!
//! Journals, manifests, the merge's copies and every group commit go through
//! [`Store`], so the same code runs on real files ([`DirStore`]) and on the simulated
//! disk of the power-cut tests ([`super::sim::SimStore`]). The request data path
//! writes its data with io_uring on the same files; the store only has to *sync*
//! them, which works through any descriptor of the file.
//!
//! # Durability contract (what callers may assume, and all they may assume)
//! - `write_at` is durable only after a later `sync` of that file returned Ok; until
//!   then a power cut may drop, apply or tear it (per 512-byte sector).
//! - `create`, `rename` and `remove` are durable only after `sync_dir`.
//! - `rename` replaces the target atomically: after a cut either name holds the old
//!   or the new content, never a mix.
//!
//! Names are relative to the store's directory; an absolute name (a volume's base
//! image elsewhere) is used as is.
//!
//! # Descriptors
//! [`DirStore`] keeps the files it used open, by name, so that a group commit does
//! not reopen every journal and data file. A file it may have open is renamed or
//! deleted only through [`Store::rename`] / [`Store::remove`], which drop the cached
//! descriptor first: a descriptor left open on a deleted file would keep the file's
//! space allocated and, one per released backup, exhaust the descriptor limit. The
//! cache holds at most [`OPEN_FILES_MAX`] files; beyond that the oldest entry is
//! closed (the next use opens it again).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Named files with explicit durability points. See the module docs.
pub(crate) trait Store: Send + Sync {
    /// Creates `name` empty (truncating an existing file).
    fn create(&self, name: &str) -> io::Result<()>;
    fn exists(&self, name: &str) -> bool;
    /// Reads at most `buf.len()` bytes; fewer only at the end of the file.
    fn read_at(&self, name: &str, off: u64, buf: &mut [u8]) -> io::Result<usize>;
    fn write_at(&self, name: &str, off: u64, data: &[u8]) -> io::Result<()>;
    /// fdatasync: every completed write to `name` is durable afterwards.
    fn sync(&self, name: &str) -> io::Result<()>;
    fn len(&self, name: &str) -> io::Result<u64>;
    fn set_len(&self, name: &str, len: u64) -> io::Result<()>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creates, renames and removes in the directory durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// File names in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Frees the space of `[off, off + len)` (reads return zeros). Best effort.
    fn punch(&self, _name: &str, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Reads exactly `buf.len()` bytes; a short file reads as zeros past its end.
pub(crate) fn read_full(store: &dyn Store, name: &str, off: u64, buf: &mut [u8]) -> io::Result<()> {
    let n = store.read_at(name, off, buf)?;
    buf[n..].fill(0);
    Ok(())
}

/// Reads a whole (small) file.
pub(crate) fn read_all(store: &dyn Store, name: &str) -> io::Result<Vec<u8>> {
    let len = store.len(name)?;
    let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let mut buf = vec![0u8; len];
    read_full(store, name, 0, &mut buf)?;
    Ok(buf)
}

/// Replaces `name` atomically with `data`: temp file, sync, rename, sync directory.
pub(crate) fn replace_atomically(store: &dyn Store, name: &str, data: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    store.create(&tmp)?;
    store.write_at(&tmp, 0, data)?;
    store.sync(&tmp)?;
    store.rename(&tmp, name)?;
    store.sync_dir()
}

/// Files a [`DirStore`] keeps open at most (module docs: # Descriptors). A volume
/// uses about two per delta plus its base and manifest.
pub(crate) const OPEN_FILES_MAX: usize = 64;

/// Real files in a directory, with buffered (page cache) I/O of their own; the
/// data path's O_DIRECT descriptors of the same files stay coherent with it for
/// sync purposes (fdatasync flushes the inode, whichever descriptor asks).
#[derive(Debug)]
pub(crate) struct DirStore {
    dir: PathBuf,
    open: Mutex<OpenFiles>,
}

/// The descriptor cache: by name, and the names in the order they were opened.
#[derive(Debug, Default)]
struct OpenFiles {
    by_name: HashMap<String, Arc<File>>,
    order: VecDeque<String>,
}

impl OpenFiles {
    fn insert(&mut self, name: &str, f: Arc<File>) {
        self.remove(name);
        while self.by_name.len() >= OPEN_FILES_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // A caller still using it keeps its own Arc; it closes after that.
            self.by_name.remove(&oldest);
        }
        self.by_name.insert(name.to_string(), f);
        self.order.push_back(name.to_string());
    }

    fn remove(&mut self, name: &str) {
        if self.by_name.remove(name).is_some() {
            self.order.retain(|n| n != name);
        }
    }
}

impl DirStore {
    /// Files open in the cache (tests: it stays bounded and forgets removed files).
    #[cfg(test)]
    pub(crate) fn open_files(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_name
            .len()
    }

    pub(crate) fn new(dir: impl Into<PathBuf>) -> DirStore {
        DirStore {
            dir: dir.into(),
            open: Mutex::new(OpenFiles::default()),
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn file(&self, name: &str) -> io::Result<Arc<File>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.by_name.get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.path(name))?,
        );
        open.insert(name, f.clone());
        Ok(f)
    }

    fn forget(&self, name: &str) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

impl Store for DirStore {
    fn create(&self, name: &str) -> io::Result<()> {
        self.forget(name);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path(name))?;
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, Arc::new(f));
        Ok(())
    }

    fn exists(&self, name: &str) -> bool {
        self.path(name).exists()
    }

    fn read_at(&self, name: &str, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        let f = self.file(name)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, name: &str, off: u64, data: &[u8]) -> io::Result<()> {
        self.file(name)?.write_all_at(data, off)
    }

    fn sync(&self, name: &str) -> io::Result<()> {
        self.file(name)?.sync_data()
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(std::fs::metadata(self.path(name))?.len())
    }

    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.file(name)?.set_len(len)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        // Under the cache's lock: no other thread can cache either name between
        // the forget and the rename.
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(from);
        open.remove(to);
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(name);
        match std::fs::remove_file(self.path(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            if let Some(n) = e?.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    fn punch(&self, name: &str, off: u64, len: u64) -> io::Result<()> {
        let f = self.file(name)?;
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #11 item 7: the cache is bounded, and a removed or renamed file is no
    /// longer held open (its descriptor kept a deleted file's space).
    #[test]
    fn open_files_are_bounded_and_forgotten_on_remove_and_rename() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = DirStore::new(dir.path());
        for i in 0..OPEN_FILES_MAX + 10 {
            let name = format!("f{i}");
            store.create(&name).expect("create");
            store.write_at(&name, 0, b"x").expect("write");
        }
        assert_eq!(store.open_files(), OPEN_FILES_MAX);
        // An evicted file opens again on use.
        let mut b = [0u8; 1];
        assert_eq!(store.read_at("f0", 0, &mut b).expect("read"), 1);
        assert_eq!(&b, b"x");
        let n = store.open_files();
        store.remove("f0").expect("remove");
        assert_eq!(store.open_files(), n - 1);
        store.sync("f1").expect("sync");
        let n = store.open_files();
        store.rename("f1", "g1").expect("rename");
        assert_eq!(store.open_files(), n - 1);
        assert!(!store.exists("f1") && store.exists("g1"));
    }
}
