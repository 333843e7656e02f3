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
//! *pins* the stack it was admitted under ([`Images::pin`])
//! and uses that stack until it completes, so a switchover never changes a request
//! in flight. A pin is a per-reactor counter in the stack, written only by that
//! reactor; the drain after a switch visits every reactor (a message round) and
//! waits for its count of the old stack to reach zero.
//!
//! # Old-epoch writes per chunk
//! A write-type request also registers the chunks it covers in its stack's
//! [`WriteTracker`] (per-reactor counters in hashed buckets, written only by that
//! reactor; a request wider than [`TRACK_WIDE_CHUNKS`] counts as covering every
//! chunk). A new delta keeps the tracker of the stack it replaced, so a first partial
//! write of a chunk (read-merge) waits only while an old-epoch write that may
//! overlap that chunk is in flight — after one message round over every reactor
//! (`quiesced`), which makes every old-epoch admission visible; before that round it
//! waits for the whole drain. Bucket collisions only make it wait longer.
//!
//! A new delta's tracker list also holds the trackers of every stack retired
//! earlier and not yet drained (a drain slower than its wait): their writes may
//! overlap the chunk too.
//!
//! # Reclamation
//! A retired stack is freed only after a drain round that started after it was
//! unpublished found its pins at zero on every reactor: the round's message runs
//! on each reactor between requests (a quiescent point), after the new pointer was
//! stored, so no reactor can still be between loading the old pointer and pinning
//! it, and a count that reached zero there stays zero. A round that outlives its
//! waiter keeps the pin counters it watches alive itself ([`Pins`] is shared), so
//! freeing the stack never pulls memory from under it. Rounds free exactly the
//! stacks they covered (by epoch), never "everything retired before": an older
//! stack whose drain is still waiting for a request stays (issue #11 item 8).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringblk_blockmap::{BlockMap, MapRecord};

use crate::backend::Backend;
use crate::durable::journal::{Journal, JournalHeader};
use crate::durable::manifest::{delta_name, journal_name};
use crate::durable::recover::RecoveredDelta;
use crate::durable::store::{DirStore, Store};
use crate::filelock::WriteLock;

/// A redirect-on-write layer: a sparse data file plus its lookup table.
#[derive(Debug)]
pub(crate) struct Delta {
    /// Unique within the volume; names the data file.
    pub id: u64,
    /// The backup whose frozen image lies directly below this delta.
    pub backup: String,
    pub path: PathBuf,
    file: File,
    /// The data file's write lock, held through `file` (`filelock`).
    lock: WriteLock,
    direct: bool,
    pub map: Arc<BlockMap>,
    /// Next free physical chunk (bump allocation: a logical chunk is filled at most
    /// once per delta, so this never exceeds the volume's chunk count).
    next_physical: AtomicU64,
    /// Chunks of fills that failed before they were journaled (ENOSPC, EIO), handed
    /// out again first: without it every failed fill would use up a chunk for good,
    /// and a client retrying on a full disk would exhaust the allocator, so writes
    /// kept failing with ENOSPC after space was freed. Holds each chunk at most once,
    /// so at most `capacity_chunks` entries.
    spare: Mutex<Vec<u64>>,
    /// `spare.len()`, read without the lock: the allocation path's only extra cost.
    spare_count: AtomicU64,
    capacity_chunks: u64,
    /// Set when this delta is being merged into the layer below (release).
    merging: AtomicBool,
    /// Set once every request admitted before this delta existed has completed.
    drained: AtomicBool,
    /// Bytes `[0, zeroed_end)` of the data file are written (zeros ahead of the
    /// allocator, or data): a fill there overwrites allocated blocks.
    zeroed_end: AtomicU64,
    /// A zero-ahead write is in flight (at most one; it covers
    /// `[zeroed_end, zeroed_end + len)`).
    zeroing: AtomicBool,
    /// Zeroing ahead failed (full disk, unaligned tail): fills write into holes.
    zeroing_off: AtomicBool,
    /// Writes of the stack this delta's switch replaced (see the module docs).
    below_writes: std::sync::OnceLock<Vec<Arc<WriteTracker>>>,
    /// Every reactor passed a quiescent point after the switch: `below_writes`
    /// shows every old-epoch write still in flight.
    quiesced: AtomicBool,
    /// Set when every chunk was merged down, or the delta is not worth keeping (a
    /// volume without persistence, a deleted volume): its files go on drop.
    merged: AtomicBool,
    size_bytes: u64,
    /// Map changes waiting for the next group commit; `None` for volumes whose base
    /// does not survive a restart (mem, null), which keep nothing.
    pub journal: Option<Journal>,
    /// Store name of the journal file.
    journal_name: String,
    /// The volume's store: the delta's files are renamed and deleted through it, so
    /// that it closes the descriptors it keeps of them (`durable::store`).
    store: Arc<DirStore>,
}

/// One zero-ahead write (see [`Delta::zero_due`]).
pub(crate) const ZERO_STEP_BYTES: u64 = 2 << 20;
/// Zeroing starts the next step when the allocator is this close to its end.
pub(crate) const ZERO_LOOKAHEAD_BYTES: u64 = 8 << 20;

impl Delta {
    /// Creates an empty delta data file (sparse, the volume's size).
    /// `journaled`: the delta gets a journal in `dir` (persistent volumes).
    /// `reuse`: `(from, zeroed)` takes the data file of a merged delta instead
    /// (`from`'s file, renamed to this delta's name) whose first `zeroed` bytes are
    /// written ([`take_for_reuse`](Self::take_for_reuse)): fills there overwrite
    /// allocated blocks without zeroing ahead first. Its old contents are never
    /// read: a chunk is read from a delta only once a fill wrote all of it. The
    /// file keeps its open file description, and with it its write lock.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create(
        store: &Arc<DirStore>,
        volume: &str,
        id: u64,
        backup: &str,
        size_bytes: u64,
        chunk_bytes: u32,
        direct: bool,
        journaled: bool,
        reuse: Option<(&Delta, u64)>,
    ) -> std::io::Result<Delta> {
        let path = store.dir().join(delta_name(volume, id));
        let owner = format!("volume {volume:?} (its delta {id})");
        let (file, direct, lock, zeroed) = match reuse {
            Some((from, zeroed)) => {
                let file = from.file.try_clone()?;
                store.rename(&store_name(from.path()), &store_name(&path))?;
                let lock = from.lock.transfer(owner);
                (file, from.direct, lock, zeroed.min(size_bytes))
            }
            None => {
                let mut oo = OpenOptions::new();
                // Emptied only once locked: a file someone else writes (another
                // server on this data dir) is refused untouched.
                oo.read(true).write(true).create(true).truncate(false);
                let (file, direct) = open_data_file(&oo, &path, direct)?;
                let lock = crate::filelock::lock(&file, &path, owner)?;
                file.set_len(0)?;
                (file, direct, lock, 0)
            }
        };
        file.set_len(size_bytes)?;
        // Space is written with zeros ahead of the allocator, on the data path
        // (`zero_due`), not here, so that the switch never waits for it.
        let capacity_chunks = size_bytes.div_ceil(chunk_bytes as u64);
        let map = BlockMap::new(capacity_chunks)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let jname = journal_name(volume, id);
        let journal = match journaled {
            true => {
                let header = JournalHeader {
                    chunk_bytes,
                    capacity_chunks,
                    delta_id: id,
                };
                // The file itself is created before a manifest names it, not on
                // the switch path (`Journal::lazy`).
                Some(Journal::lazy(&jname, header))
            }
            false => None,
        };
        Ok(Delta {
            journal,
            journal_name: jname,
            store: store.clone(),
            id,
            backup: backup.to_string(),
            path,
            file,
            lock,
            direct,
            map: Arc::new(map),
            next_physical: AtomicU64::new(0),
            spare: Mutex::new(Vec::new()),
            spare_count: AtomicU64::new(0),
            capacity_chunks,
            merging: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            zeroed_end: AtomicU64::new(zeroed),
            zeroing: AtomicBool::new(false),
            zeroing_off: AtomicBool::new(false),
            below_writes: std::sync::OnceLock::new(),
            quiesced: AtomicBool::new(false),
            merged: AtomicBool::new(false),
            size_bytes,
        })
    }

    /// A delta brought back by recovery: its data file as it is, its map and
    /// allocator from the journal. Drained (nothing of an old epoch is in flight).
    pub(crate) fn recovered(
        store: &Arc<DirStore>,
        volume: &str,
        r: RecoveredDelta,
        size_bytes: u64,
        chunk_bytes: u32,
        direct: bool,
    ) -> std::io::Result<Delta> {
        let id = r.entry.id;
        let path = store.dir().join(delta_name(volume, id));
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        let (file, direct) = open_data_file(&oo, &path, direct)?;
        let lock =
            crate::filelock::lock(&file, &path, format!("volume {volume:?} (its delta {id})"))?;
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
            lock,
            direct,
            map: Arc::new(r.map),
            next_physical: AtomicU64::new(r.next_physical),
            spare_count: AtomicU64::new(r.spare.len() as u64),
            spare: Mutex::new(r.spare),
            capacity_chunks,
            merging: AtomicBool::new(merging),
            drained: AtomicBool::new(true),
            // Below the allocator: data, or slots never used again.
            zeroed_end: AtomicU64::new((r.next_physical * chunk_bytes as u64).min(size_bytes)),
            zeroing: AtomicBool::new(false),
            zeroing_off: AtomicBool::new(false),
            below_writes: std::sync::OnceLock::new(),
            quiesced: AtomicBool::new(true),
            merged: AtomicBool::new(false),
            size_bytes,
            journal: Some(r.journal),
            journal_name: journal_name(volume, id),
            store: store.clone(),
        })
    }

    /// Queues a map change for the next group commit. Call it *before* the change is
    /// made visible (publish, finish), so the journal's order is the map's order.
    pub(crate) fn journal(&self, rec: MapRecord) {
        if let Some(j) = &self.journal {
            j.append(rec);
        }
    }

    /// Whether a fill of physical chunk `p` may write now: its space was zeroed
    /// ahead (or zeroing is off). A fill must not write where a zero-ahead write may
    /// still land: the two are not ordered against each other.
    ///
    /// Why zero ahead: on ext4 a direct write into a hole allocates under the inode
    /// lock, and into preallocated (unwritten) space it converts the extent, a
    /// journaled metadata change per write; both cost a fresh delta a third or more
    /// of the IOPS of the base. Fills go to consecutive physical chunks (bump
    /// allocation), so one large zero write ahead of them turns every fill into a
    /// plain overwrite.
    pub(crate) fn fill_ready(&self, p: u64, chunk_bytes: u64) -> bool {
        self.zeroing_off.load(Ordering::Acquire)
            || ((p + 1) * chunk_bytes).min(self.size_bytes)
                <= self.zeroed_end.load(Ordering::Acquire)
    }

    /// After allocating chunk `p`: the range to zero next, if the allocator is near
    /// the end of the zeroed space and no zero write is in flight. The caller writes
    /// zeros there and then calls [`zero_done`](Self::zero_done).
    pub(crate) fn zero_due(&self, p: u64, chunk_bytes: u64) -> Option<(u64, u64)> {
        if self.zeroing_off.load(Ordering::Acquire) {
            return None;
        }
        let end = self.zeroed_end.load(Ordering::Acquire);
        let want = ((p + 1) * chunk_bytes + ZERO_LOOKAHEAD_BYTES).min(self.size_bytes);
        if end >= want {
            return None;
        }
        self.zeroing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        // Re-read under the flag: only the flag holder moves `zeroed_end`.
        let end = self.zeroed_end.load(Ordering::Acquire);
        let len = ZERO_STEP_BYTES.min(self.size_bytes - end);
        if len == 0 {
            self.zeroing.store(false, Ordering::Release);
            return None;
        }
        Some((end, len))
    }

    /// For a merged delta that no request can reach any more (after the final
    /// drain): stops zeroing ahead for good and returns how many bytes at the start
    /// of its data file are written, for [`create`](Self::create)'s `reuse`.
    /// `None` while a zero write is in flight (it could land after the next delta's
    /// fills) or when nothing was written.
    pub(crate) fn take_for_reuse(&self) -> Option<u64> {
        self.zeroing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        // The flag stays taken: no zero write starts on this file again.
        self.zeroing_off.store(true, Ordering::Release);
        let zeroed = self.zeroed_end.load(Ordering::Acquire);
        (zeroed > 0).then_some(zeroed)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes at the start of the data file known to be written (zeroed or filled).
    pub(crate) fn zeroed_bytes(&self) -> u64 {
        self.zeroed_end.load(Ordering::Acquire)
    }

    /// The zero write of `zero_due` finished: `ok` moves the zeroed end, an error
    /// turns zeroing off for this delta (fills then write into holes, as before).
    pub(crate) fn zero_done(&self, len: u64, ok: bool) {
        if ok {
            self.zeroed_end.fetch_add(len, Ordering::AcqRel);
        } else {
            self.zeroing_off.store(true, Ordering::Release);
        }
        self.zeroing.store(false, Ordering::Release);
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Allocates `n` consecutive physical chunks; `None` when the delta is full
    /// (cannot happen while the invariant above holds; reported as ENOSPC).
    pub(crate) fn alloc(&self, n: u64) -> Option<u64> {
        if n == 1 && self.spare_count.load(Ordering::Relaxed) > 0 {
            let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = spare.pop() {
                self.spare_count
                    .store(spare.len() as u64, Ordering::Relaxed);
                return Some(p);
            }
        }
        let p = self.next_physical.fetch_add(n, Ordering::Relaxed);
        (p + n <= self.capacity_chunks).then_some(p)
    }

    /// Gives back chunk `p` of `alloc(1)` whose fill failed: it was neither journaled
    /// nor published, so nothing refers to it (whatever part of it was written is
    /// overwritten by the next fill, which writes the whole chunk).
    pub(crate) fn give_back(&self, p: u64) {
        debug_assert!(p < self.capacity_chunks, "chunk {p} was never allocated");
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        spare.push(p);
        self.spare_count
            .store(spare.len() as u64, Ordering::Relaxed);
    }

    pub(crate) fn is_merging(&self) -> bool {
        self.merging.load(Ordering::Acquire)
    }

    pub(crate) fn set_merging(&self) {
        self.merging.store(true, Ordering::Release);
    }

    /// Whether a first partial write of `chunk` may read-merge from below now: no
    /// old-epoch write that may overlap the chunk is still in flight.
    pub(crate) fn below_settled(&self, chunk: u64) -> bool {
        if self.is_drained() {
            return true;
        }
        if !self.quiesced.load(Ordering::Acquire) {
            return false;
        }
        match self.below_writes.get() {
            Some(ts) => !ts.iter().any(|t| t.busy(chunk)),
            None => false,
        }
    }

    /// The trackers of the stack this delta's switch replaced and of every older
    /// stack still undrained (module docs).
    pub(crate) fn set_below_writes(&self, t: Vec<Arc<WriteTracker>>) {
        let _ = self.below_writes.set(t);
    }

    pub(crate) fn set_quiesced(&self) {
        self.quiesced.store(true, Ordering::Release);
    }

    pub(crate) fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    pub(crate) fn set_drained(&self) {
        self.drained.store(true, Ordering::Release);
    }
}

impl Delta {
    /// Marks the delta's data as merged into the layer below (or as not worth
    /// keeping): its files go when the last reference drops.
    /// A delta prepared ahead of its switch is not kept if it is never used.
    pub(crate) fn set_discard(&self, discard: bool) {
        self.merged.store(discard, Ordering::Release);
    }

    pub(crate) fn set_merged(&self) {
        self.merged.store(true, Ordering::Release);
    }
}

impl Drop for Delta {
    fn drop(&mut self) {
        if self.merged.load(Ordering::Acquire) {
            // Through the store: it closes its descriptors of both files first.
            let _ = self.store.remove(&store_name(&self.path));
            let _ = self.store.remove(&self.journal_name);
        } else if self.journal.is_none() {
            // No journal: the file means nothing without the map in memory.
            tracing::warn!(path = %self.path.display(), "delta image kept: its data was not merged");
        }
        // Journaled deltas stay for the next start (the manifest lists them).
    }
}

/// The name a data file has in the store: its path (the store takes an absolute
/// name as is), as the commit names it (`persist`).
pub(crate) fn store_name(path: &Path) -> String {
    path.display().to_string()
}

/// Opens a delta's data file O_DIRECT when asked and the filesystem allows it
/// (EINVAL: tmpfs and others), else through the page cache; says which it got.
fn open_data_file(oo: &OpenOptions, path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    if direct {
        match oo.clone().custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((oo.open(path)?, false))
}

/// One published arrangement of a volume's layers.
#[derive(Debug)]
pub(crate) struct Stack {
    pub epoch: u64,
    /// Bottom to top; the base is implicit below them.
    pub deltas: Vec<Arc<Delta>>,
    /// Requests admitted under this stack and not finished, per reactor.
    pins: Arc<Pins>,
    /// Write-type requests of this stack in flight, by chunk (module docs).
    pub writes: Arc<WriteTracker>,
}

/// Requests admitted under one stack and not finished, per reactor: each slot is
/// written only by its reactor (load + store), read by drains.
#[derive(Debug)]
pub(crate) struct Pins(Box<[AtomicU64]>);

impl Pins {
    fn slot(&self, reactor: usize) -> &AtomicU64 {
        &self.0[reactor.min(self.0.len() - 1)]
    }

    /// Requests still running on `reactor`.
    pub(crate) fn pinned_on(&self, reactor: usize) -> u64 {
        self.slot(reactor).load(Ordering::Acquire)
    }

    /// Requests still running on any reactor (a snapshot, for reports).
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().map(|p| p.load(Ordering::Acquire)).sum()
    }
}

/// Buckets per reactor of a [`WriteTracker`].
const TRACK_BUCKETS: usize = 1024;
/// Requests covering more chunks than this count as covering all of them.
pub(crate) const TRACK_WIDE_CHUNKS: u64 = 64;

/// In-flight write-type requests of one stack, per reactor, by hashed chunk. Each
/// reactor writes only its own slot (load + store, like the pins).
#[derive(Debug)]
pub(crate) struct WriteTracker {
    slots: Box<[TrackSlot]>,
}

#[derive(Debug)]
#[repr(align(128))]
struct TrackSlot {
    buckets: Box<[AtomicU64]>,
    wide: AtomicU64,
}

fn bump_slot(a: &AtomicU64, up: bool) {
    let v = a.load(Ordering::Relaxed);
    a.store(if up { v + 1 } else { v - 1 }, Ordering::Release);
}

impl WriteTracker {
    pub(crate) fn new(reactors: usize) -> WriteTracker {
        WriteTracker {
            slots: (0..reactors.max(1))
                .map(|_| TrackSlot {
                    buckets: (0..TRACK_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
                    wide: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    fn slot(&self, reactor: usize) -> &TrackSlot {
        &self.slots[reactor.min(self.slots.len() - 1)]
    }

    /// Adds (`up`) or removes a request over chunks `[first, first + n)` on
    /// `reactor` (call it on that reactor's thread only).
    fn mark(&self, reactor: usize, first: u64, n: u64, up: bool) {
        let s = self.slot(reactor);
        if n > TRACK_WIDE_CHUNKS {
            bump_slot(&s.wide, up);
        } else {
            for c in first..first + n {
                bump_slot(&s.buckets[c as usize % TRACK_BUCKETS], up);
            }
        }
    }

    /// Whether a request that may overlap `chunk` is in flight on any reactor.
    pub(crate) fn busy(&self, chunk: u64) -> bool {
        let b = chunk as usize % TRACK_BUCKETS;
        self.slots
            .iter()
            .any(|s| s.wide.load(Ordering::Acquire) > 0 || s.buckets[b].load(Ordering::Acquire) > 0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Freed with a request still pinned to it: a use after free (issue #11
        // item 8). Checked in debug builds, which every test runs.
        debug_assert!(
            self.pins.total() == 0,
            "stack of epoch {} freed while a request is pinned to it",
            self.epoch
        );
    }
}

impl Stack {
    pub(crate) fn new(epoch: u64, deltas: Vec<Arc<Delta>>, reactors: usize) -> Stack {
        Stack {
            epoch,
            deltas,
            pins: Arc::new(Pins(
                (0..reactors.max(1)).map(|_| AtomicU64::new(0)).collect(),
            )),
            writes: Arc::new(WriteTracker::new(reactors)),
        }
    }

    fn slot(&self, reactor: usize) -> &AtomicU64 {
        self.pins.slot(reactor)
    }

    /// The stack's pin counters, for a drain round that may outlive the stack's
    /// memory (module docs: # Reclamation).
    pub(crate) fn pins(&self) -> Arc<Pins> {
        self.pins.clone()
    }

    /// The layers a backup's export reads: every delta strictly below the delta
    /// created at that backup's switch. `None` if the backup is not in this stack.
    pub(crate) fn backup_view(&self, backup: &str) -> Option<&[Arc<Delta>]> {
        let pos = self.deltas.iter().position(|d| d.backup == backup)?;
        Some(&self.deltas[..pos])
    }
}

/// A request's hold on the stack it was admitted under. Reactor-local (`!Send`).
pub(crate) struct StackPin {
    stack: *const Stack,
    reactor: usize,
    /// Chunks `(first, n)` registered in the stack's write tracker.
    writes: Option<(u64, u64)>,
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
        StackPin {
            stack,
            reactor,
            writes: None,
        }
    }

    /// Registers this request as a write-type request over chunks
    /// `[first, first + n)` of its stack (see the module docs).
    pub(crate) fn track_writes(&mut self, first: u64, n: u64) {
        if self.writes.is_none() && n > 0 {
            self.stack().writes.mark(self.reactor, first, n, true);
            self.writes = Some((first, n));
        }
    }

    pub(crate) fn stack(&self) -> &Stack {
        // SAFETY: a pinned stack is not freed before the pin drops (the drain waits
        // for every pin of a retired stack).
        unsafe { &*self.stack }
    }
}

impl Drop for StackPin {
    fn drop(&mut self) {
        if let Some((first, n)) = self.writes {
            self.stack().writes.mark(self.reactor, first, n, false);
        }
        let slot = self.stack().slot(self.reactor);
        slot.store(slot.load(Ordering::Relaxed) - 1, Ordering::Release);
    }
}

/// A retired stack waiting for its drain; freed afterwards (module docs: # Reclamation).
struct Retired {
    stack: *mut Stack,
    /// Its epoch: unique within the volume, what drain rounds name it by (an
    /// address can be reused by a later stack).
    epoch: u64,
}
// SAFETY: the pointer is only dereferenced (freed) by the control plane after the
// drain proved no reactor uses it; Stack itself is Send + Sync.
unsafe impl Send for Retired {}

/// A volume's images: the base backend and the published stack of deltas above it,
/// with the retired stacks still draining. What the data path reads and writes
/// through; it knows nothing of backups' names' policy, RPC or front ends.
///
/// # Ownership and ordering
/// The stack pointer changes only in [`publish`](Self::publish), and stacks are
/// freed only in [`free_drained`](Self::free_drained) and on drop. Both, and every
/// control-plane read of a stack, take a guard of the one mutex that serialises the
/// owner's stack changes (`Volume::control`): the guard is the proof that no stack
/// is freed during the call. Reactors only [`pin`](Self::pin).
pub(crate) struct Images {
    backend: Backend,
    size_bytes: u64,
    chunk_bytes: u32,
    /// The published image stack (see the module docs for the pin/drain protocol).
    current: AtomicPtr<Stack>,
    retired: Mutex<Vec<Retired>>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images")
            .field("size_bytes", &self.size_bytes)
            .field("chunk_bytes", &self.chunk_bytes)
            .finish()
    }
}

impl Images {
    /// `stack` is published at once (the stack recovery rebuilt, or an empty one).
    pub(crate) fn new(backend: Backend, size_bytes: u64, chunk_bytes: u32, stack: Stack) -> Images {
        Images {
            backend,
            size_bytes,
            chunk_bytes,
            current: AtomicPtr::new(Box::into_raw(Box::new(stack))),
            retired: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    pub(crate) fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub(crate) fn chunk_bytes(&self) -> u32 {
        self.chunk_bytes
    }

    /// Pins the current stack for one request admitted on `reactor` (call it on that
    /// reactor's thread, and only there).
    pub(crate) fn pin(&self, reactor: usize) -> StackPin {
        let p = self.current.load(Ordering::Acquire);
        // SAFETY: `p` is the published stack, loaded on this reactor in this loop
        // iteration; a stack is freed only after a drain round that ran on every
        // reactor after it was unpublished (module docs).
        unsafe { StackPin::new(p, reactor) }
    }

    /// Pins the current stack for a write-type request (WRITE, WRITE_ZEROES, TRIM)
    /// over `[offset, offset + len)`: also registers its chunks, so that first
    /// partial writes of a later epoch wait only for the ones that overlap theirs.
    pub(crate) fn pin_write(&self, reactor: usize, offset: u64, len: u64) -> StackPin {
        let mut pin = self.pin(reactor);
        let cb = self.chunk_bytes as u64;
        if len > 0 {
            let first = offset / cb;
            let last = offset.saturating_add(len - 1) / cb;
            pin.track_writes(first, last - first + 1);
        }
        pin
    }

    /// The current stack, for control-plane reads that do not outlive the call.
    /// `_serial` is the guard of the owner's control mutex (type docs): stacks are
    /// published and freed only under it, so the current one cannot be freed during `f`.
    pub(crate) fn with_stack<C, R>(
        &self,
        _serial: &std::sync::MutexGuard<'_, C>,
        f: impl FnOnce(&Stack) -> R,
    ) -> R {
        // SAFETY: see above; `free_drained` only frees stacks already replaced.
        f(unsafe { &*self.current.load(Ordering::Acquire) })
    }

    /// Publishes `stack` (the switch) and retires the old one until a drain round
    /// covers it. Call it holding the control mutex (stacks change only under it).
    pub(crate) fn publish<C>(&self, _serial: &std::sync::MutexGuard<'_, C>, stack: Stack) {
        let new = Box::into_raw(Box::new(stack));
        let old = self.current.swap(new, Ordering::AcqRel);
        // SAFETY: `old` was the published stack; only the control plane (which we
        // hold) frees stacks, and only retired ones.
        let epoch = unsafe { &*old }.epoch;
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Retired { stack: old, epoch });
    }

    /// What a drain round started now must watch: every retired stack, by epoch,
    /// with its pin counters and write tracker.
    pub(crate) fn retired_stacks<C>(
        &self,
        _serial: &std::sync::MutexGuard<'_, C>,
    ) -> Vec<(u64, Arc<Pins>, Arc<WriteTracker>)> {
        let list = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .map(|r| {
                // SAFETY: listed, so not freed; freeing needs the control mutex, held here.
                let s = unsafe { &*r.stack };
                (r.epoch, s.pins(), s.writes.clone())
            })
            .collect()
    }

    /// Requests still pinned to retired stacks of epoch `upto` or older; `None`
    /// when no such stack is left (what a backup switched at `upto` waits for).
    pub(crate) fn undrained_upto<C>(
        &self,
        _serial: &std::sync::MutexGuard<'_, C>,
        upto: u64,
    ) -> Option<u64> {
        let list = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let mut older = list.iter().filter(|r| r.epoch <= upto).peekable();
        older.peek()?;
        // SAFETY: listed, so not freed; freeing needs the control mutex, held here.
        Some(older.map(|r| unsafe { &*r.stack }.pins().total()).sum())
    }

    /// Frees the retired stacks of `epochs`: a drain round that started after they
    /// were unpublished found no request pinned to them on any reactor (module docs:
    /// # Reclamation). Epochs already freed by another round are skipped.
    pub(crate) fn free_drained<C>(&self, _serial: &std::sync::MutexGuard<'_, C>, epochs: &[u64]) {
        let mut list = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|r| {
            if !epochs.contains(&r.epoch) {
                return true;
            }
            // SAFETY: drained (above): no request holds it, no reactor can load it;
            // rounds still running hold only its `Pins`.
            drop(unsafe { Box::from_raw(r.stack) });
            false
        });
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        // The owner is gone, so no request or reactor can hold a pin, and no drain
        // round has a waiter (each holds the owner); a round still on the reactors
        // holds only its `Pins`.
        let cur = *self.current.get_mut();
        // SAFETY: allocated by Box::into_raw in new/publish; freed exactly once.
        drop(unsafe { Box::from_raw(cur) });
        for r in self
            .retired
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            // SAFETY: as above.
            drop(unsafe { Box::from_raw(r.stack) });
        }
    }
}
