//! `ringblk serve`'s start: check everything before creating anything, and undo what
//! a failed start created.
//!
//! # Order
//! 1. [`validate`]: what the configuration alone can tell (volume specs, duplicate
//!    names; `config::resolve` has checked the cores) — nothing on disk is touched.
//! 2. The data dir is created if missing, then locked ([`crate::datadir`]) before
//!    anything in it is read or written.
//! 3. Read-only checks of the files the start will use: volume files (a directory, a
//!    missing parent, an existing image smaller than `size=` without `grow`), the RPC
//!    socket path and the `--vhost` socket paths (a live server, or something that
//!    is not a socket).
//! 4. The NBD listener is bound (a port in use fails here).
//! 5. The caller opens the volumes (creating new files, running recovery), starts the
//!    reactors and the RPC socket, and then calls [`Prepared::started`].
//!
//! # Undo
//! Dropping a [`Prepared`] that was not marked started removes what this start
//! created: volume files that did not exist at step 3, the lock file, and the data
//! dir (and parents) if this start made them and they are empty. Files that existed
//! before are never removed.

use std::path::{Path, PathBuf};

use crate::config::Resolved;
use crate::datadir::DataDirLock;
use crate::listen::Bound;
use ringblk_target::spec::BackendKind;
use ringblk_target::target::Target;

/// A start that passed every check, holding the data dir lock and the listener.
pub struct Prepared {
    lock: Option<DataDirLock>,
    listener: Option<Bound>,
    /// Directories this start created, deepest first.
    created_dirs: Vec<PathBuf>,
    /// Volume files that did not exist when the start checked them.
    new_files: Vec<PathBuf>,
    started: bool,
}

/// Step 1: the checks that need nothing but the configuration.
pub fn validate(resolved: &Resolved) -> Result<(), String> {
    let vols = &resolved.server.volumes;
    for (i, v) in vols.iter().enumerate() {
        v.validate().map_err(|e| e.to_string())?;
        if vols[..i].iter().any(|w| w.name == v.name) {
            return Err(format!(
                "volume {:?} is given twice: each volume needs its own name",
                v.name
            ));
        }
    }
    Ok(())
}

/// Steps 1 to 4.
pub fn prepare(resolved: &Resolved) -> Result<Prepared, String> {
    validate(resolved)?;
    let mut p = Prepared {
        lock: None,
        listener: None,
        created_dirs: create_dirs(&resolved.data_dir)?,
        new_files: Vec::new(),
        started: false,
    };
    // From here on, an early return drops `p`, which undoes what was created.
    p.lock = Some(DataDirLock::acquire(&resolved.data_dir)?);
    p.new_files = check_files(resolved)?;
    p.listener = Some(crate::listen::bind(&resolved.server.listen)?);
    Ok(p)
}

/// `create_dir_all`, returning the directories it made (deepest first).
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
    Ok(missing)
}

/// Step 3; returns the volume files the start will create.
fn check_files(resolved: &Resolved) -> Result<Vec<PathBuf>, String> {
    let mut new_files = Vec::new();
    for v in &resolved.server.volumes {
        let Some(path) = v.path.as_ref().filter(|_| v.backend == BackendKind::File) else {
            continue;
        };
        let bad = |why: String| format!("volume {:?}: {why}", v.name);
        Target::check_volume_file(v, path).map_err(|e| bad(e.to_string()))?;
        if path.exists() {
            continue;
        }
        if v.read_only {
            return Err(bad(format!(
                "{} does not exist (a read-only volume is not created)",
                path.display()
            )));
        }
        match path.parent() {
            Some(d) if !d.is_dir() => {
                return Err(bad(format!(
                    "cannot create {}: directory {} does not exist",
                    path.display(),
                    d.display()
                )))
            }
            _ => new_files.push(path.clone()),
        }
    }
    for v in &resolved.vhost {
        if let Some(why) = ringblk_vhost::socket_problem(&v.socket) {
            return Err(format!(
                "--vhost {}={}: {why}",
                v.export,
                v.socket.display()
            ));
        }
    }
    crate::listen::unix_path_problem(&resolved.rpc).map_or(Ok(()), |why| {
        Err(format!(
            "cannot start the RPC socket {}: {why}",
            resolved.rpc.display()
        ))
    })?;
    Ok(new_files)
}

impl Prepared {
    /// The bound NBD listener, for [`crate::server::Server::start_on`].
    pub fn take_listener(&mut self) -> Option<Bound> {
        self.listener.take()
    }

    /// The start succeeded: nothing is undone; the returned lock is held until the
    /// server has stopped.
    pub fn started(mut self) -> Option<DataDirLock> {
        self.started = true;
        self.lock.take()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if self.started {
            return;
        }
        drop(self.listener.take()); // removes its Unix socket file
        for f in &self.new_files {
            if std::fs::remove_file(f).is_ok() {
                tracing::info!(path = %f.display(), "removed the file this failed start created");
            }
        }
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
        for d in &self.created_dirs {
            let _ = std::fs::remove_dir(d); // only if empty
        }
    }
}
