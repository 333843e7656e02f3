//! Image stacks: the base image and the redirect-on-write delta images above it.
//!
//! A volume's data is `base ← delta₁ ← … ← deltaₙ`. Block *b* of the live volume is
//! found by walking from the top delta down; the first delta whose block map has
//! *b*'s chunk serves it, else the base (identity-mapped: block *b* at offset *b*).
//! Writes go to the top delta (in place if it holds the chunk, else into a newly
//! allocated chunk, read-merged from below for a partial chunk) — or straight to the
//! base when there is no delta, which is the no-backup fast path: no map lookups.
//!
//! # Epochs and pins
//! The current [`Stack`] is published through an atomic pointer. Every request
//! *pins* the stack it was admitted under ([`Volume::pin`](crate::volume::Volume::pin))
//! and uses that stack until it completes, so a switchover never changes a request
//! in flight. A pin is a per-reactor counter in the stack, written only by that
//! reactor; the drain after a switch visits every reactor (a message round) and
//! waits for its count of the old stack to reach zero.
//!
//! # Reclamation
//! A retired stack is freed only after such a drain: the drain message runs on each
//! reactor between requests (a quiescent point), after the new pointer was stored,
//! so no reactor can still be between loading the old pointer and pinning it.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ringblk_blockmap::{BlockMap, MapRecord};

use crate::durable::journal::{Journal, JournalHeader};
use crate::durable::manifest::{delta_name, journal_name};
use crate::durable::recover::RecoveredDelta;
use crate::durable::store::Store;

/// A redirect-on-write layer: a sparse data file plus its lookup table.
#[derive(Debug)]
pub struct Delta {
    /// Unique within the volume; names the data file.
    pub id: u64,
    /// The backup whose frozen image lies directly below this delta.
    pub backup: String,
    pub path: PathBuf,
    file: File,
    direct: bool,
    pub map: Arc<BlockMap>,
    /// Next free physical chunk (bump allocation: a logical chunk is filled at most
    /// once per delta, so this never exceeds the volume's chunk count).
    next_physical: AtomicU64,
    capacity_chunks: u64,
    /// Set when this delta is being merged into the layer below (release).
    merging: AtomicBool,
    /// Set once every request admitted before this delta existed has completed.
    drained: AtomicBool,
    /// End of the preallocated part of the data file.
    prealloc_end: AtomicU64,
    /// Set when every chunk was merged down, or the delta is not worth keeping (a
    /// volume without persistence, a deleted volume): its files go on drop.
    merged: AtomicBool,
    size_bytes: u64,
    /// Map changes waiting for the next group commit; `None` for volumes whose base
    /// does not survive a restart (mem, null), which keep nothing.
    pub journal: Option<Journal>,
    journal_path: PathBuf,
}

/// Delta data files are preallocated in steps of this size, ahead of use.
pub const PREALLOC_STEP_BYTES: u64 = 256 << 20;

impl Delta {
    /// Creates an empty delta data file (sparse, the volume's size).
    /// `store` (the data dir) creates the delta's journal; `None`: no journal.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        dir: &Path,
        volume: &str,
        id: u64,
        backup: &str,
        size_bytes: u64,
        chunk_bytes: u32,
        direct: bool,
        store: Option<&dyn Store>,
    ) -> std::io::Result<Delta> {
        let path = dir.join(delta_name(volume, id));
        let mut oo = OpenOptions::new();
        oo.read(true).write(true).create(true).truncate(true);
        let mut direct = direct;
        let file = match oo
            .clone()
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                direct = false;
                oo.open(&path)?
            }
            Err(e) => return Err(e),
        };
        file.set_len(size_bytes)?;
        // Preallocation (unwritten extents) happens on the data path, in steps ahead
        // of the allocator (`prealloc_due`): a direct write into a hole makes ext4
        // allocate under the inode lock, serialising every write to the delta; into
        // preallocated space it only converts the extent. The first step starts at the
        // first allocation, not here, so that the switch never waits for it. Best
        // effort: filesystems that refuse leave a sparse file that still works.
        let first = 0;
        let capacity_chunks = size_bytes.div_ceil(chunk_bytes as u64);
        let map = BlockMap::new(capacity_chunks)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let jname = journal_name(volume, id);
        let journal = match store {
            Some(st) => {
                let header = JournalHeader {
                    chunk_bytes,
                    capacity_chunks,
                    delta_id: id,
                };
                Some(Journal::create(st, &jname, header)?)
            }
            None => None,
        };
        Ok(Delta {
            journal,
            journal_path: dir.join(jname),
            id,
            backup: backup.to_string(),
            path,
            file,
            direct,
            map: Arc::new(map),
            next_physical: AtomicU64::new(0),
            capacity_chunks,
            merging: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            prealloc_end: AtomicU64::new(first),
            merged: AtomicBool::new(false),
            size_bytes,
        })
    }

    /// A delta brought back by recovery: its data file as it is, its map and
    /// allocator from the journal. Drained (nothing of an old epoch is in flight).
    pub fn recovered(
        dir: &Path,
        volume: &str,
        r: RecoveredDelta,
        size_bytes: u64,
        chunk_bytes: u32,
        direct: bool,
    ) -> std::io::Result<Delta> {
        let id = r.entry.id;
        let path = dir.join(delta_name(volume, id));
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        let mut direct = direct;
        let file = match oo
            .clone()
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                direct = false;
                oo.open(&path)?
            }
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < size_bytes {
            // The creating set_len may not have been durable: reads past the end
            // would be short, writes extend it; restore the full size anyway.
            file.set_len(size_bytes)?;
        }
        let capacity_chunks = size_bytes.div_ceil(chunk_bytes as u64);
        let merging = r.entry.state == crate::durable::manifest::DeltaState::Merging;
        Ok(Delta {
            id,
            backup: r.entry.backup.clone(),
            path,
            file,
            direct,
            map: Arc::new(r.map),
            next_physical: AtomicU64::new(r.next_physical),
            capacity_chunks,
            merging: AtomicBool::new(merging),
            drained: AtomicBool::new(true),
            // Preallocate again from the allocator's position on.
            prealloc_end: AtomicU64::new(0),
            merged: AtomicBool::new(false),
            size_bytes,
            journal: Some(r.journal),
            journal_path: dir.join(journal_name(volume, id)),
        })
    }

    /// Queues a map change for the next group commit. Call it *before* the change is
    /// made visible (publish, finish), so the journal's order is the map's order.
    pub fn journal(&self, rec: MapRecord) {
        if let Some(j) = &self.journal {
            j.append(rec);
        }
    }

    /// After allocating chunk `p`: the byte range to preallocate next, once, when the
    /// allocator has used half of the current preallocation step.
    pub fn prealloc_due(&self, p: u64, chunk_bytes: u64) -> Option<(u64, u64)> {
        let used = (p + 1) * chunk_bytes;
        let end = self.prealloc_end.load(Ordering::Relaxed);
        if end >= self.size_bytes || (end > 0 && used + PREALLOC_STEP_BYTES / 2 < end) {
            return None;
        }
        let next = (end + PREALLOC_STEP_BYTES).min(self.size_bytes);
        self.prealloc_end
            .compare_exchange(end, next, Ordering::Relaxed, Ordering::Relaxed)
            .ok()
            .map(|_| (end, next - end))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Allocates `n` consecutive physical chunks; `None` when the delta is full
    /// (cannot happen while the invariant above holds; reported as ENOSPC).
    pub fn alloc(&self, n: u64) -> Option<u64> {
        let p = self.next_physical.fetch_add(n, Ordering::Relaxed);
        (p + n <= self.capacity_chunks).then_some(p)
    }

    pub fn allocated_chunks(&self) -> u64 {
        self.next_physical
            .load(Ordering::Relaxed)
            .min(self.capacity_chunks)
    }

    pub fn is_merging(&self) -> bool {
        self.merging.load(Ordering::Acquire)
    }

    pub(crate) fn set_merging(&self) {
        self.merging.store(true, Ordering::Release);
    }

    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    pub(crate) fn set_drained(&self) {
        self.drained.store(true, Ordering::Release);
    }
}

impl Delta {
    /// Marks the delta's data as merged into the layer below (or as not worth
    /// keeping): its files go when the last reference drops.
    pub(crate) fn set_merged(&self) {
        self.merged.store(true, Ordering::Release);
    }
}

impl Drop for Delta {
    fn drop(&mut self) {
        if self.merged.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_file(&self.journal_path);
        } else if self.journal.is_none() {
            // No journal: the file means nothing without the map in memory.
            tracing::warn!(path = %self.path.display(), "delta image kept: its data was not merged");
        }
        // Journaled deltas stay for the next start (the manifest lists them).
    }
}

/// One published arrangement of a volume's layers.
#[derive(Debug)]
pub struct Stack {
    pub epoch: u64,
    /// Bottom to top; the base is implicit below them.
    pub deltas: Vec<Arc<Delta>>,
    /// Requests admitted under this stack and not finished, per reactor.
    pins: Box<[AtomicU64]>,
}

impl Stack {
    pub fn new(epoch: u64, deltas: Vec<Arc<Delta>>, reactors: usize) -> Stack {
        Stack {
            epoch,
            deltas,
            pins: (0..reactors.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn slot(&self, reactor: usize) -> &AtomicU64 {
        &self.pins[reactor.min(self.pins.len() - 1)]
    }

    /// Requests of this stack still running on `reactor`.
    pub fn pinned_on(&self, reactor: usize) -> u64 {
        self.slot(reactor).load(Ordering::Acquire)
    }

    /// The layers a backup's export reads: every delta strictly below the delta
    /// created at that backup's switch. `None` if the backup is not in this stack.
    pub fn backup_view(&self, backup: &str) -> Option<&[Arc<Delta>]> {
        let pos = self.deltas.iter().position(|d| d.backup == backup)?;
        Some(&self.deltas[..pos])
    }
}

/// A request's hold on the stack it was admitted under. Reactor-local (`!Send`).
pub struct StackPin {
    stack: *const Stack,
    reactor: usize,
}

impl StackPin {
    /// # Safety
    /// `stack` must be the volume's published stack, loaded by this reactor in the
    /// current loop iteration (so no drain of it can have completed yet).
    pub(crate) unsafe fn new(stack: *const Stack, reactor: usize) -> StackPin {
        // SAFETY: per the contract the stack is alive; see the module docs.
        let s = unsafe { &*stack };
        let slot = s.slot(reactor);
        // Single writer per slot: load + store, Release so the drain's Acquire load
        // that sees the decrement also sees the request's effects.
        slot.store(slot.load(Ordering::Relaxed) + 1, Ordering::Release);
        StackPin { stack, reactor }
    }

    pub fn stack(&self) -> &Stack {
        // SAFETY: a pinned stack is not freed before the pin drops (the drain waits
        // for every pin of a retired stack).
        unsafe { &*self.stack }
    }
}

impl Drop for StackPin {
    fn drop(&mut self) {
        let slot = self.stack().slot(self.reactor);
        slot.store(slot.load(Ordering::Relaxed) - 1, Ordering::Release);
    }
}
