//! Group commit: what one FLUSH (or FUA write, or merge step) makes durable, in
//! which order.
//!
//! # Order (ARCHITECTURE.md §6: data before the mapping that points at it)
//! 1. The manifest, if it changed (a new delta must be known before its journal
//!    counts), after creating any journal file it names that does not exist yet.
//! 2. Take the pending records of every journal, **top delta first**: a merge appends
//!    `Install` below before `Unmap` above, so whenever the taken `Unmap` is in the
//!    snapshot, so is the `Install` it depends on.
//! 3. fdatasync every data file (base and deltas): the data of every taken record,
//!    and of every write completed before the commit started, is durable.
//! 4. Write and fdatasync the journals **bottom first**, so an `Unmap` never becomes
//!    durable before the `Install` below it.
//!
//! On an error the untaken records go back into their journals (the next commit
//! retries them) and the commit fails: no waiter is told "durable".

use std::io;

use super::journal::{Journal, Taken};
use super::manifest::ManifestCell;
use super::store::Store;

/// The files of one volume a commit covers.
pub(crate) struct CommitSet<'a> {
    pub manifest: Option<&'a ManifestCell>,
    /// Data files to fdatasync (store names).
    pub data: Vec<String>,
    /// Journals of the deltas, bottom to top.
    pub journals: Vec<&'a Journal>,
}

/// Test-only knobs (negative controls). The server always uses the default.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CommitOptions {
    /// fdatasync the journals (off only to prove the power-cut test catches it).
    pub sync_journal: bool,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions { sync_journal: true }
    }
}

/// Runs one commit; see the module docs.
pub(crate) fn commit(
    store: &dyn Store,
    set: &CommitSet<'_>,
    opts: CommitOptions,
) -> io::Result<()> {
    if let Some(m) = set.manifest {
        // The manifest may name a journal created lazily: it must exist first.
        for j in &set.journals {
            j.ensure_file(store)?;
        }
        m.write_if_dirty(store)?;
    }
    let mut taken: Vec<Taken> = set.journals.iter().rev().map(|j| j.take()).collect();
    taken.reverse();
    for d in &set.data {
        if let Err(e) = store.sync(d) {
            for (j, t) in set.journals.iter().zip(taken) {
                j.restore(t);
            }
            return Err(e);
        }
    }
    let mut it = set.journals.iter().zip(taken);
    while let Some((j, t)) = it.next() {
        if let Err(e) = j.write(store, t, opts.sync_journal) {
            for (j, t) in it {
                j.restore(t);
            }
            return Err(e);
        }
    }
    Ok(())
}
