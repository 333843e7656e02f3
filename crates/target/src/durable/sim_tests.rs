//! Power-cut tests of the durability layer, on the simulated disk of [`super::sim`].
//!
//! What is simulated: one small volume (4 KiB chunks, 512-byte sectors) made of a
//! base image and a stack of up to three deltas, driven from one thread by a
//! seeded workload of full and partial writes, flushes, backup creates (the
//! switchover) and releases, whose merge runs a few chunks per step interleaved
//! with everything else. Only the front end is re-implemented here ([`SimVolume`]:
//! where a write goes, read-merge, slot allocation, the merge's copies), following
//! the server's protocol step by step; everything that makes the volume durable is
//! the real code: [`Journal`], [`ManifestCell`], [`commit`], [`recover`] (and
//! [`check`], which must agree with it). Simplifications: one release at a time;
//! a merge step sometimes commits its batch (the server commits once, at the end:
//! committing more often is allowed, and puts cuts between a merge's journal
//! writes); the base image starts empty rather than preallocated.
//!
//! Each run stops at a seeded cut point: the n-th mutating store call fails, and so
//! does every call after it (the process died there). Then the power goes: every
//! write not yet synced is kept, dropped or torn per sector, and a prefix of the
//! unsynced directory changes survives. Cut points are random, plus some aimed at
//! journal writes and syncs (a commit half done). After recovery:
//! - every sector of the live volume holds the value it had at the last successful
//!   commit, or one acknowledged after it (each sector on its own: a torn write may
//!   leave some sectors old and some new);
//! - every backup whose create completed and whose release did not start still
//!   exists, and its frozen image obeys the same rule (its values at create time,
//!   exactly once a commit followed); a released backup whose manifest update
//!   completed is gone;
//! - the restart may die too (in recovery or in the resumed merge); the next one
//!   must show exactly the same data, the resumed merge must not change a visible
//!   byte, and a last power cut after it changes nothing (all of it is durable);
//! - the recovered volume then runs on (journals, allocators, manifest and delta
//!   ids continue where recovery left them), dies again at a random point, and the
//!   same rules hold with what it recovered as the flushed state.
//!
//! A second sweep with rare commits in a larger volume makes journal frames span
//! several sectors, so that cuts aimed at their syncs tear them (a torn tail that
//! recovery must drop and truncate).
//!
//! Negative controls: the same runs with the journals left unsynced, with the
//! journals committed before the data files are synced, or with the journals
//! written top first, must find violations.
//!
//! Replay one failure with `RINGBLK_SIM_SEED=<seed>` (every cut of that seed) or
//! `RINGBLK_SIM_SEED=<seed>:<cut>`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringblk_blockmap::{BeginMerge, BlockMap, Claim, MapRecord, State};

use super::check::check;
use super::commit::{commit, CommitOptions, CommitSet};
use super::journal::{Journal, JournalHeader, Taken};
use super::manifest::{delta_name, journal_name, DeltaEntry, DeltaState, Manifest, ManifestCell};
use super::recover::recover;
use super::sim::SimStore;
use super::store::{read_full, Store};

const VOL: &str = "vol";
/// The base image's store name (not a name `recover` would take for an orphan).
const BASE: &str = "base";
const CB: u64 = 4096;
const SECTOR: usize = super::sim::SECTOR;
/// Sectors per chunk.
const SPC: u64 = CB / SECTOR as u64;
/// Deltas at most (the workload creates no backup beyond it).
const MAX_DEPTH: usize = 3;

type CommitFn = fn(&dyn Store, &CommitSet<'_>, CommitOptions) -> io::Result<()>;

/// One test's setup: how the volume commits, its size, the workload's mix and
/// how many runs.
#[derive(Clone, Copy)]
struct Config {
    /// The real [`commit`], or a planted bug.
    commit: CommitFn,
    opts: CommitOptions,
    chunks: u64,
    /// Operations per run.
    steps: usize,
    /// Percent of operations that FLUSH, create a backup, release one.
    flush_pct: u32,
    create_pct: u32,
    release_pct: u32,
    /// Chance that a merge step commits its batch.
    merge_commit: f64,
    /// Writes go to the chunks in turn (many first writes, so many `Install`s
    /// per commit), not to random ones.
    write_in_turn: bool,
    /// The count run checks the front end against the model every this many steps.
    check_every: usize,
    seeds: u64,
    /// Cuts per seed at random mutating calls, and aimed at journal writes and
    /// syncs; plus one after the workload.
    random_cuts: usize,
    aimed_cuts: usize,
    /// Aim only at the syncs of journal frames longer than a sector.
    aim_at_big_frames: bool,
}

/// The main sweep: a 16-chunk volume, busy with everything.
const MAIN: Config = Config {
    commit,
    opts: CommitOptions { sync_journal: true },
    chunks: 16,
    steps: 60,
    flush_pct: 12,
    create_pct: 8,
    release_pct: 7,
    merge_commit: 0.5,
    write_in_turn: false,
    check_every: 3,
    seeds: 100,
    random_cuts: 9,
    aimed_cuts: 2,
    aim_at_big_frames: false,
};

/// Mostly writes and rare commits in a larger volume: a commit's journal frame
/// spans sectors, and cuts aimed at its sync can tear it (in `MAIN` every frame
/// fits in one sector, a sector is never torn).
const BIG_FRAMES: Config = Config {
    chunks: 48,
    steps: 200,
    flush_pct: 3,
    // Three deltas early, then writes to the top one: first writes, `Install`s.
    create_pct: 30,
    release_pct: 0,
    write_in_turn: true,
    check_every: 25,
    seeds: 12,
    random_cuts: 1,
    aimed_cuts: 10,
    aim_at_big_frames: true,
    ..MAIN
};

impl Config {
    fn size(&self) -> u64 {
        self.chunks * CB
    }

    fn sectors(&self) -> usize {
        (self.chunks * SPC) as usize
    }
}

/// The content of `sector` written by the write with `tag`: (tag, sector) over and
/// over, so a read names the write it came from. The simulated disk tears only
/// at sector boundaries; a sector with anything else in it (garbage) names none.
/// Tag 0 is the initial zeros.
fn pattern(tag: u64, sector: u64) -> Vec<u8> {
    if tag == 0 {
        return vec![0; SECTOR];
    }
    let mut unit = [0u8; 16];
    unit[..8].copy_from_slice(&tag.to_le_bytes());
    unit[8..].copy_from_slice(&sector.to_le_bytes());
    unit.repeat(SECTOR / 16)
}

/// The tag whose pattern `buf` is, if any.
fn tag_of(buf: &[u8], sector: u64) -> Option<u64> {
    // Equal to itself shifted by 16 bytes: the first 16 bytes repeat throughout.
    if buf[16..] != buf[..SECTOR - 16] {
        return None;
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[..8]);
    let tag = u64::from_le_bytes(w);
    w.copy_from_slice(&buf[8..16]);
    let at = u64::from_le_bytes(w);
    (at == if tag == 0 { 0 } else { sector }).then_some(tag)
}

// ---------------------------------------------------------------------------
// The volume: the server's front end over the real durability code.

/// The simulated disk as the volume sees it, noting where the mutating calls on
/// journals are: cut points that leave a commit half done.
struct Tap<'s> {
    sim: &'s SimStore,
    /// `sim.ops()` before each journal write (with its length) or sync (0).
    journal_ops: Mutex<Vec<(u64, usize)>>,
}

impl<'s> Tap<'s> {
    fn new(sim: &'s SimStore) -> Tap<'s> {
        Tap {
            sim,
            journal_ops: Mutex::new(Vec::new()),
        }
    }

    fn note(&self, name: &str, len: usize) {
        if name.ends_with(".journal") {
            self.journal_ops.lock().unwrap().push((self.sim.ops(), len));
        }
    }
}

impl Store for Tap<'_> {
    fn create(&self, name: &str) -> io::Result<()> {
        self.sim.create(name)
    }
    fn exists(&self, name: &str) -> bool {
        self.sim.exists(name)
    }
    fn read_at(&self, name: &str, off: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.sim.read_at(name, off, buf)
    }
    fn write_at(&self, name: &str, off: u64, data: &[u8]) -> io::Result<()> {
        self.note(name, data.len());
        self.sim.write_at(name, off, data)
    }
    fn sync(&self, name: &str) -> io::Result<()> {
        self.note(name, 0);
        self.sim.sync(name)
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        self.sim.len(name)
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.sim.set_len(name, len)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.sim.rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.sim.remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.sim.sync_dir()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.sim.list()
    }
}

struct Delta {
    id: u64,
    data: String,
    map: BlockMap,
    journal: Journal,
    /// Bump allocator of physical chunks (slots are never reused).
    next: Cell<u64>,
    /// Its backup was released: it is being merged into the layer below.
    merging: bool,
}

/// A volume as the server runs it, minus concurrency: between two operations no
/// chunk is `Pending` or `Merging`, so the map guards are taken and ended inline.
struct SimVolume<'s> {
    store: &'s Tap<'s>,
    cfg: Config,
    cell: ManifestCell,
    /// Bottom to top.
    deltas: Vec<Delta>,
}

/// What a recovery repaired (to show the repair paths are exercised).
#[derive(Clone, Copy, Debug, Default)]
struct Repairs {
    /// Journals with a torn tail (a commit cut short), truncated.
    torn_tails: u64,
    /// Delta files the manifest does not list (a create or release cut short).
    orphans: u64,
}

impl std::ops::AddAssign for Repairs {
    fn add_assign(&mut self, o: Repairs) {
        self.torn_tails += o.torn_tails;
        self.orphans += o.orphans;
    }
}

impl<'s> SimVolume<'s> {
    /// A new volume: a zeroed base image and an empty manifest, both durable.
    fn create(store: &'s Tap<'s>, cfg: Config) -> io::Result<SimVolume<'s>> {
        // Empty reads as zeros (`read_full`); writes extend it. No `set_len`: on
        // the simulated disk it costs more than the rest of a run.
        store.create(BASE)?;
        store.sync(BASE)?;
        let cell = ManifestCell::new(Manifest::new(VOL, cfg.size(), CB as u32), false);
        // Its sync_dir also makes the base image's name durable.
        cell.write_if_dirty(store)?;
        Ok(SimVolume {
            store,
            cfg,
            cell,
            deltas: Vec::new(),
        })
    }

    /// The volume a restart finds: the stack as [`recover`] rebuilds it, and what
    /// recovery had to repair.
    fn recover(store: &'s Tap<'s>, cfg: Config) -> Result<(SimVolume<'s>, Repairs), String> {
        let r = recover(store, VOL, cfg.size(), CB as u32)
            .map_err(|e| format!("recovery failed: {e}"))?
            .ok_or("recovery found no manifest")?;
        let repairs = Repairs {
            torn_tails: r.deltas.iter().filter(|d| d.torn_tail_bytes > 0).count() as u64,
            orphans: r.orphans_removed.len() as u64,
        };
        let deltas = r
            .deltas
            .into_iter()
            .map(|d| Delta {
                id: d.entry.id,
                data: delta_name(VOL, d.entry.id),
                merging: d.entry.state == DeltaState::Merging,
                map: d.map,
                journal: d.journal,
                next: Cell::new(d.next_physical),
            })
            .collect();
        let vol = SimVolume {
            store,
            cfg,
            cell: ManifestCell::new(r.manifest, true),
            deltas,
        };
        Ok((vol, repairs))
    }

    fn merging(&self) -> Option<usize> {
        self.deltas.iter().position(|d| d.merging)
    }

    fn position(&self, id: u64) -> Option<usize> {
        self.deltas.iter().position(|d| d.id == id)
    }

    /// Chunk `c` as seen through the lowest `level` deltas (all of them: the live
    /// volume; fewer: a backup's frozen image) and the base.
    fn read_chunk(&self, level: usize, c: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; CB as usize];
        for d in self.deltas[..level].iter().rev() {
            match d.map.lookup(c).expect("chunk in range").state() {
                State::Mapped(p) | State::Merging(p) => {
                    read_full(self.store, &d.data, p * CB, &mut buf)?;
                    return Ok(buf);
                }
                State::Unmapped => {}
                State::Pending => unreachable!("no fill runs between operations"),
            }
        }
        read_full(self.store, BASE, c * CB, &mut buf)?;
        Ok(buf)
    }

    /// A client write of whole sectors at `off` in chunk `c`, acknowledged on `Ok`.
    fn write(&self, c: u64, off: usize, data: &[u8]) -> io::Result<()> {
        self.write_at_level(self.deltas.len(), c, off, data)
    }

    fn write_at_level(&self, level: usize, c: u64, off: usize, data: &[u8]) -> io::Result<()> {
        let Some(d) = level.checked_sub(1).map(|i| &self.deltas[i]) else {
            return self.store.write_at(BASE, c * CB + off as u64, data);
        };
        match d.map.lookup(c).expect("chunk in range").state() {
            State::Mapped(p) => self.store.write_at(&d.data, p * CB + off as u64, data),
            // A merging delta takes no new chunks (they would have to be merged
            // again): the write goes where the merge is going.
            State::Unmapped if d.merging => self.write_at_level(level - 1, c, off, data),
            State::Unmapped => {
                let chunk = if data.len() == CB as usize {
                    data.to_vec()
                } else {
                    // Read-merge: the rest of the chunk comes from below.
                    let mut chunk = self.read_chunk(level - 1, c)?;
                    chunk[off..off + data.len()].copy_from_slice(data);
                    chunk
                };
                self.fill(d, c, &chunk)
            }
            s => unreachable!("chunk {c} is {s:?} between operations"),
        }
    }

    /// Puts a whole chunk `c` into delta `d`, which does not map it: data at a new
    /// slot first, then the `Install` record, then the publish (the server's order).
    fn fill(&self, d: &Delta, c: u64, chunk: &[u8]) -> io::Result<()> {
        let Claim::Fill(fill) = d.map.claim(c).expect("chunk in range") else {
            unreachable!("chunk {c} is unmapped and nothing else runs");
        };
        let p = d.next.get();
        d.next.set(p + 1);
        // On an error the guard drops: the fill is aborted, nothing is published.
        self.store.write_at(&d.data, p * CB, chunk)?;
        d.journal.append(MapRecord::Install {
            logical: c,
            physical: p,
        });
        fill.publish(p).expect("physical chunk in range");
        Ok(())
    }

    /// A group commit of everything (a FLUSH, or a merge's commit).
    fn commit(&self) -> io::Result<()> {
        let data = std::iter::once(BASE.to_string())
            .chain(self.deltas.iter().map(|d| d.data.clone()))
            .collect();
        let set = CommitSet {
            manifest: Some(&self.cell),
            data,
            journals: self.deltas.iter().map(|d| &d.journal).collect(),
        };
        (self.cfg.commit)(self.store, &set, self.cfg.opts)
    }

    fn next_delta_id(&self) -> u64 {
        self.cell.get().next_delta_id
    }

    /// Backup create (the switchover): a new delta on top, and the manifest that
    /// lists it durable before the reply.
    fn create_backup(&mut self) -> io::Result<u64> {
        let id = self.next_delta_id();
        let data = delta_name(VOL, id);
        self.store.create(&data)?;
        self.store.set_len(&data, self.cfg.size())?;
        let header = JournalHeader {
            chunk_bytes: CB as u32,
            capacity_chunks: self.cfg.chunks,
            delta_id: id,
        };
        let journal = Journal::create(self.store, &journal_name(VOL, id), header)?;
        self.cell.update(|m| {
            m.next_delta_id = id + 1;
            m.deltas.push(DeltaEntry {
                id,
                backup: format!("backup{id}"),
                state: DeltaState::Active,
                created_unix_ms: 0,
            })
        });
        self.deltas.push(Delta {
            id,
            data,
            map: BlockMap::new(self.cfg.chunks).expect("small map"),
            journal,
            next: Cell::new(0),
            merging: false,
        });
        self.cell.write_if_dirty(self.store)?;
        Ok(id)
    }

    /// Release of the backup below delta `k`: the delta turns `merging` (durably,
    /// so a restart resumes the merge).
    fn start_release(&mut self, k: usize) -> io::Result<()> {
        let id = self.deltas[k].id;
        self.deltas[k].merging = true;
        self.cell.update(|m| {
            for e in m.deltas.iter_mut().filter(|e| e.id == id) {
                e.state = DeltaState::Merging;
            }
        });
        self.cell.write_if_dirty(self.store)
    }

    /// Merges up to `n` chunks of delta `k` into the layer below, each in the
    /// server's order: copy down (an `Install` below if the chunk is new there),
    /// then `Unmap` here and finish.
    fn merge_step(&self, k: usize, n: usize) -> io::Result<()> {
        let d = &self.deltas[k];
        let todo: Vec<u64> = d
            .map
            .iter(0, self.cfg.chunks)
            .take(n)
            .map(|(c, _)| c)
            .collect();
        for c in todo {
            let BeginMerge::Started(merge) = d.map.begin_merge(c).expect("chunk in range") else {
                unreachable!("chunk {c} is mapped and nothing else runs");
            };
            let mut buf = vec![0u8; CB as usize];
            read_full(self.store, &d.data, merge.physical() * CB, &mut buf)?;
            match k.checked_sub(1).map(|i| &self.deltas[i]) {
                None => self.store.write_at(BASE, c * CB, &buf)?,
                Some(below) => match below.map.lookup(c).expect("chunk in range").state() {
                    State::Mapped(p) => self.store.write_at(&below.data, p * CB, &buf)?,
                    State::Unmapped => self.fill(below, c, &buf)?,
                    s => unreachable!("chunk {c} below is {s:?} between operations"),
                },
            }
            d.journal.append(MapRecord::Unmap { logical: c });
            merge.finish().expect("no in-place writer holds a pin");
        }
        Ok(())
    }

    /// End of a release, after the commit that made the merge durable: the delta
    /// leaves the manifest, then its files are deleted.
    fn drop_delta(&mut self, k: usize) -> io::Result<()> {
        let d = self.deltas.remove(k);
        self.cell.update(|m| m.deltas.retain(|e| e.id != d.id));
        self.cell.write_if_dirty(self.store)?;
        self.store.remove(&d.data)?;
        self.store.remove(&d.journal.name)
    }

    /// Finishes the merge of delta `k` (a restart resuming it): step by step with
    /// a commit after each, then the final commit and the manifest update.
    fn finish_merge(&mut self, k: usize) -> io::Result<()> {
        while self.deltas[k].map.mapped_count() > 0 {
            self.merge_step(k, 4)?;
            self.commit()?;
        }
        self.commit()?;
        self.drop_delta(k)
    }

    /// The image at `level` (see [`read_chunk`](Self::read_chunk)), per sector the
    /// tag that wrote it (`None`: no single write's content).
    fn image(&self, level: usize) -> io::Result<Vec<Option<u64>>> {
        let mut out = Vec::with_capacity(self.cfg.sectors());
        for c in 0..self.cfg.chunks {
            let chunk = self.read_chunk(level, c)?;
            for (i, s) in chunk.chunks_exact(SECTOR).enumerate() {
                out.push(tag_of(s, c * SPC + i as u64));
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// The model: what each sector may hold after a power cut.

#[derive(Clone, Debug, Default)]
struct Sector {
    /// The value at the last successful commit.
    flushed: u64,
    /// Values acknowledged since, oldest first.
    since: Vec<u64>,
}

impl Sector {
    fn current(&self) -> u64 {
        self.since.last().copied().unwrap_or(self.flushed)
    }

    fn allows(&self, tag: u64) -> bool {
        tag == self.flushed || self.since.contains(&tag)
    }

    fn flush(&mut self) {
        self.flushed = self.current();
        self.since.clear();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    /// The create started but did not complete: it may or may not exist.
    Creating,
    /// Created, not released: it must exist.
    Live,
    /// The release started: it may exist (and may be merging).
    Releasing,
    /// Its delta left the manifest durably: it must not exist.
    Gone,
}

struct Backup {
    id: u64,
    life: Life,
    /// Its frozen image: the live volume's sectors when it was created.
    image: Vec<Sector>,
}

struct Model {
    live: Vec<Sector>,
    backups: Vec<Backup>,
    last_tag: u64,
}

impl Model {
    fn new(cfg: &Config) -> Model {
        Model {
            live: vec![Sector::default(); cfg.sectors()],
            backups: Vec::new(),
            last_tag: 0,
        }
    }

    /// A commit succeeded: every acknowledged write is durable.
    fn flushed(&mut self) {
        let images = self.backups.iter_mut().map(|b| &mut b.image);
        for s in std::iter::once(&mut self.live).chain(images).flatten() {
            s.flush();
        }
    }

    /// The model after a restart: what it showed is durable, every backup it
    /// shows is live. Tags go on after `last_tag`.
    fn recovered(snap: &Snapshot, last_tag: u64) -> Model {
        let durable = |img: &[Option<u64>]| {
            let value = |t: &Option<u64>| Sector {
                flushed: t.expect("verified"),
                since: Vec::new(),
            };
            img.iter().map(value).collect::<Vec<_>>()
        };
        Model {
            live: durable(&snap.live),
            backups: (snap.backups.iter())
                .map(|(&id, img)| Backup {
                    id,
                    life: Life::Live,
                    image: durable(img),
                })
                .collect(),
            last_tag,
        }
    }

    fn backup(&mut self, id: u64) -> &mut Backup {
        self.backups
            .iter_mut()
            .find(|b| b.id == id)
            .expect("backup in the model")
    }
}

/// Checks an image read after recovery against the model of its sectors.
fn check_image(what: &str, got: &[Option<u64>], want: &[Sector]) -> Result<(), String> {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !g.is_some_and(|t| w.allows(t)) {
            let held = g.map_or("no single write's data".into(), |t| format!("write {t}"));
            return Err(format!(
                "{what}: sector {i} (chunk {}) holds {held}; allowed: write {} (flushed) or acked since {:?}",
                i as u64 / SPC,
                w.flushed,
                w.since
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The workload.

/// The kind of workload operation a cut lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Write,
    Flush,
    /// Backup create: the switchover to a new delta.
    Create,
    /// Start of a release: the delta turns `merging` in the manifest.
    Release,
    /// A merge step: copies down, `Install` below, `Unmap` above (and sometimes
    /// a commit).
    Merge,
    /// End of a release: commit, manifest without the delta, file deletion.
    Finish,
}

const KINDS: [Kind; 6] = [
    Kind::Write,
    Kind::Flush,
    Kind::Create,
    Kind::Release,
    Kind::Merge,
    Kind::Finish,
];

/// Runs the seeded operations of a run. Stops at the first error (the simulated
/// crash) with `kind` saying which operation it hit. `check`: every
/// `check_every` steps the live volume and every backup must read exactly as the
/// model's current values (the front end's own correctness, before any cut).
fn workload(
    vol: &mut SimVolume<'_>,
    model: &mut Model,
    rng: &mut StdRng,
    steps: usize,
    kind: &mut Kind,
    check: bool,
) -> io::Result<()> {
    let cfg = vol.cfg;
    for step in 0..steps {
        one_step(vol, model, rng, kind)?;
        if check && (step % cfg.check_every == 0 || step + 1 == steps) {
            let current =
                |img: &[Sector]| img.iter().map(|s| Some(s.current())).collect::<Vec<_>>();
            assert_eq!(
                vol.image(vol.deltas.len())?,
                current(&model.live),
                "step {step} ({kind:?}): the live volume reads wrong"
            );
            for b in model.backups.iter().filter(|b| b.life == Life::Live) {
                let level = vol.position(b.id).expect("live backup has a delta");
                assert_eq!(
                    vol.image(level)?,
                    current(&b.image),
                    "step {step} ({kind:?}): backup {} reads wrong",
                    b.id
                );
            }
        }
    }
    Ok(())
}

fn one_step(
    vol: &mut SimVolume<'_>,
    model: &mut Model,
    rng: &mut StdRng,
    kind: &mut Kind,
) -> io::Result<()> {
    let merging = vol.merging();
    let (f, c, rel) = (vol.cfg.flush_pct, vol.cfg.create_pct, vol.cfg.release_pct);
    let r = rng.gen_range(0..100);
    if r < f {
        *kind = Kind::Flush;
        vol.commit()?;
        model.flushed();
    } else if r < f + c && vol.deltas.len() < MAX_DEPTH {
        *kind = Kind::Create;
        let id = vol.next_delta_id();
        model.backups.push(Backup {
            id,
            life: Life::Creating,
            image: model.live.clone(),
        });
        assert_eq!(vol.create_backup()?, id);
        model.backup(id).life = Life::Live;
    } else if (f + c..f + c + rel).contains(&r) && merging.is_none() && !vol.deltas.is_empty() {
        *kind = Kind::Release;
        let k = rng.gen_range(0..vol.deltas.len());
        model.backup(vol.deltas[k].id).life = Life::Releasing;
        vol.start_release(k)?;
    } else if let Some(k) = merging.filter(|_| (f + c + rel..f + c + rel + 38).contains(&r)) {
        if vol.deltas[k].map.mapped_count() > 0 {
            *kind = Kind::Merge;
            vol.merge_step(k, rng.gen_range(1..=4))?;
            // Some merge steps commit their batch (as a merge may, to bound what a
            // restart redoes): cuts then land between its journal writes.
            if rng.gen_bool(vol.cfg.merge_commit) {
                vol.commit()?;
                model.flushed();
            }
        } else {
            *kind = Kind::Finish;
            vol.commit()?;
            model.flushed();
            let id = vol.deltas[k].id;
            vol.drop_delta(k)?;
            model.backup(id).life = Life::Gone;
        }
    } else {
        *kind = Kind::Write;
        let c = if vol.cfg.write_in_turn {
            model.last_tag % vol.cfg.chunks
        } else {
            rng.gen_range(0..vol.cfg.chunks)
        };
        let (first, n) = if rng.gen_bool(0.4) {
            (0, SPC)
        } else {
            let first = rng.gen_range(0..SPC);
            (first, rng.gen_range(1..=SPC - first))
        };
        model.last_tag += 1;
        let tag = model.last_tag;
        let sectors = c * SPC + first..c * SPC + first + n;
        let mut data = Vec::with_capacity(n as usize * SECTOR);
        for s in sectors.clone() {
            data.extend_from_slice(&pattern(tag, s));
        }
        vol.write(c, first as usize * SECTOR, &data)?;
        for s in sectors {
            model.live[s as usize].since.push(tag);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Runs: the workload, a cut, restarts, checks.

/// What a recovered volume shows: the live image and each backup's image (of
/// deltas not being merged away).
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    live: Vec<Option<u64>>,
    backups: BTreeMap<u64, Vec<Option<u64>>>,
}

fn snapshot(vol: &SimVolume<'_>) -> Result<Snapshot, String> {
    let err = |e: io::Error| format!("read after recovery: {e}");
    let mut backups = BTreeMap::new();
    for (k, d) in vol.deltas.iter().enumerate() {
        if !d.merging {
            backups.insert(d.id, vol.image(k).map_err(err)?);
        }
    }
    Ok(Snapshot {
        live: vol.image(vol.deltas.len()).map_err(err)?,
        backups,
    })
}

/// Checks a freshly recovered volume against the model.
fn verify(vol: &SimVolume<'_>, model: &Model) -> Result<Snapshot, String> {
    let ids: Vec<u64> = vol.deltas.iter().map(|d| d.id).collect();
    if ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("delta ids out of order: {ids:?}"));
    }
    for d in &vol.deltas {
        match model.backups.iter().find(|b| b.id == d.id).map(|b| b.life) {
            None | Some(Life::Gone) => {
                return Err(format!(
                    "delta {} exists but its backup never did or was released",
                    d.id
                ))
            }
            Some(Life::Live | Life::Creating) if d.merging => {
                return Err(format!("delta {} is merging but was never released", d.id))
            }
            Some(_) => {}
        }
    }
    let snap = snapshot(vol)?;
    check_image("live volume", &snap.live, &model.live)?;
    for b in &model.backups {
        match (b.life, snap.backups.get(&b.id)) {
            (Life::Live, None) => return Err(format!("backup {} was lost", b.id)),
            (Life::Live | Life::Creating, Some(img)) => {
                check_image(&format!("backup {}", b.id), img, &b.image)?
            }
            _ => {}
        }
    }
    Ok(snap)
}

/// The workload of `seed` without a crash (checking the front end against the
/// model): its mutating store calls, and the indexes (and lengths) of those on
/// journals.
fn count_ops(cfg: Config, seed: u64) -> (u64, Vec<(u64, usize)>) {
    let sim = SimStore::new();
    let tap = Tap::new(&sim);
    let mut vol = SimVolume::create(&tap, cfg).expect("setup");
    let mut model = Model::new(&cfg);
    let ops0 = sim.ops();
    tap.journal_ops.lock().unwrap().clear();
    let mut rng = StdRng::seed_from_u64(seed);
    workload(
        &mut vol,
        &mut model,
        &mut rng,
        cfg.steps,
        &mut Kind::Write,
        true,
    )
    .unwrap_or_else(|e| panic!("the workload failed without a crash: {e}"));
    let journal_ops = tap
        .journal_ops
        .lock()
        .unwrap()
        .iter()
        .map(|&(o, n)| (o - ops0, n))
        .collect();
    (sim.ops() - ops0, journal_ops)
}

/// The cut points of `seed`: random ones, ones at journal writes and syncs (or
/// at the syncs after frames longer than a sector), and one past the end.
fn cuts(cfg: Config, seed: u64, (ops, journal_ops): (u64, Vec<(u64, usize)>)) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC0_7C07);
    let mut v: Vec<u64> = (0..cfg.random_cuts)
        .map(|_| rng.gen_range(0..ops))
        .collect();
    let aims: Vec<u64> = if cfg.aim_at_big_frames {
        // A frame's write is followed by the journal's sync.
        let big = journal_ops.iter().filter(|&&(_, n)| n > SECTOR);
        big.map(|&(o, _)| o + 1).collect()
    } else {
        journal_ops.iter().map(|&(o, _)| o).collect()
    };
    if !aims.is_empty() {
        v.extend((0..cfg.aimed_cuts).map(|_| aims[rng.gen_range(0..aims.len())]));
    }
    v.push(ops);
    v
}

/// Seeds of the power cuts and of the restart's fault, from the run's seed and cut.
fn mix(seed: u64, cut: u64, what: u64) -> u64 {
    (seed.rotate_left(32) ^ cut ^ what.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(what)
}

/// The first restart dies at its n-th mutating call, n below this (if it makes
/// that many: recovery itself makes a few, a resumed merge more).
const RESTART_CUTS: u64 = 40;

/// Where a run's faults landed.
#[derive(Clone, Copy, Debug)]
struct Landed {
    /// The operation the process died in; `None`: the power went after the
    /// workload, with the process alive.
    kind: Option<Kind>,
    /// The first restart died too (in recovery or in the resumed merge).
    restart_died: bool,
    /// The recovered volume's second life died in an operation, too.
    second_died: bool,
    repairs: Repairs,
}

/// Runs the workload with the process dying at mutating call `cut` (if it gets
/// there), then cuts the power: the kind of operation that died, if any.
fn life(
    vol: &mut SimVolume<'_>,
    sim: &SimStore,
    model: &mut Model,
    steps: usize,
    rng_seed: u64,
    cut: u64,
) -> Option<Kind> {
    let mut rng = StdRng::seed_from_u64(rng_seed);
    let mut kind = Kind::Write;
    sim.crash_after(cut);
    let died = match workload(vol, model, &mut rng, steps, &mut kind, false) {
        Ok(()) => None,
        Err(e) => {
            assert!(
                sim.is_dead() && e.raw_os_error() == Some(libc::EIO),
                "{kind:?} failed with {e}, not the simulated crash"
            );
            Some(kind)
        }
    };
    sim.power_cut(rng_seed ^ cut.rotate_left(7));
    died
}

/// Mutating calls into its second life at which a recovered volume dies (if it
/// gets that far).
const SECOND_LIFE_CUTS: u64 = 80;

/// One run of `seed`: the process dies at mutating call `cut` (none if `cut` is
/// past the end: the power goes right after the workload), the power goes, and
/// the restarts are checked. Then the recovered volume runs on (the journals,
/// allocators and manifest continue where recovery left them), dies at a random
/// point and is checked once more. `Err`: a durability violation.
fn run_cut(cfg: Config, seed: u64, cut: u64) -> Result<Landed, String> {
    let sim = SimStore::new();
    let tap = Tap::new(&sim);
    let mut vol = SimVolume::create(&tap, cfg).expect("setup");
    let mut model = Model::new(&cfg);
    let kind = life(&mut vol, &sim, &mut model, cfg.steps, seed, cut);
    drop(vol);

    // The first restart may die as well (a crash loop): the next one must still
    // find the same volume.
    let mut seen = None;
    let mut repairs = Repairs::default();
    let n = StdRng::seed_from_u64(mix(seed, cut, 2)).gen_range(0..RESTART_CUTS);
    sim.crash_after(n);
    let restart_died = match restart(&tap, cfg, &model, &mut seen, &mut repairs) {
        Ok(()) => false,
        Err(_) if sim.is_dead() => true,
        Err(e) => return Err(e),
    };
    sim.power_cut(mix(seed, cut, 3));
    if restart_died {
        restart(&tap, cfg, &model, &mut seen, &mut repairs)
            .map_err(|e| format!("after a restart died: {e}"))?;
        sim.power_cut(mix(seed, cut, 4));
    }
    let seen = seen.expect("a restart completed");
    // Everything is durable now: one more power cut changes nothing.
    let (mut vol, _) = SimVolume::recover(&tap, cfg)?;
    if snapshot(&vol)? != seen {
        return Err("a power cut after the restart changed the volume or a backup".into());
    }

    // Second life: what was recovered is the new flushed state.
    let mut model = Model::recovered(&seen, model.last_tag);
    let cut2 = StdRng::seed_from_u64(mix(seed, cut, 5)).gen_range(0..SECOND_LIFE_CUTS);
    let second = life(
        &mut vol,
        &sim,
        &mut model,
        cfg.steps / 4,
        mix(seed, cut, 6),
        cut2,
    );
    drop(vol);
    let mut seen = None;
    restart(&tap, cfg, &model, &mut seen, &mut repairs)
        .map_err(|e| format!("second life (cut {cut2}): {e}"))?;
    Ok(Landed {
        kind,
        restart_died,
        second_died: second.is_some(),
        repairs,
    })
}

/// A restart: recovery, the check against the model, and the resumed merge if a
/// release was in progress (it must not change a visible byte). `seen`: what an
/// earlier restart showed, which this one must show again; then what this one
/// shows.
fn restart(
    tap: &Tap<'_>,
    cfg: Config,
    model: &Model,
    seen: &mut Option<Snapshot>,
    repairs: &mut Repairs,
) -> Result<(), String> {
    // The offline check agrees with recovery: what a power cut leaves is no error
    // (torn tails and leftovers are notes), and a recovered store is clean.
    let report = check(tap, Some(VOL));
    if !report.ok() {
        return Err(format!("check after the power cut: {:?}", report.errors));
    }
    let (mut vol, r) = SimVolume::recover(tap, cfg)?;
    *repairs += r;
    let report = check(tap, Some(VOL));
    if !report.ok() || !report.notes.is_empty() {
        return Err(format!(
            "check after recovery: {:?} {:?}",
            report.errors, report.notes
        ));
    }
    let snap = verify(&vol, model)?;
    if seen.as_ref().is_some_and(|s| *s != snap) {
        return Err("a second restart shows other data than the first".into());
    }
    if let Some(k) = vol.merging() {
        let id = vol.deltas[k].id;
        vol.finish_merge(k)
            .map_err(|e| format!("resuming the merge of delta {id}: {e}"))?;
        if snapshot(&vol)? != snap {
            return Err(format!(
                "resuming the merge of delta {id} changed the volume or a backup"
            ));
        }
    }
    *seen = Some(snap);
    Ok(())
}

/// `RINGBLK_SIM_SEED=<seed>` or `<seed>:<cut>`: replay just that.
fn replay_filter() -> Option<(u64, Option<u64>)> {
    let v = std::env::var("RINGBLK_SIM_SEED").ok()?;
    let bad = "RINGBLK_SIM_SEED=<seed>[:<cut>]";
    let mut it = v.split(':');
    let seed = it.next()?.trim().parse().expect(bad);
    let cut = it.next().map(|c| c.trim().parse().expect(bad));
    Some((seed, cut))
}

/// Runs `f` for one seed (and cut); a panic in it names them before unwinding.
fn in_context<T>(seed: u64, cut: Option<u64>, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let replay = cut.map_or(seed.to_string(), |c| format!("{seed}:{c}"));
        eprintln!("panicked in seed {seed} cut {cut:?} (replay: RINGBLK_SIM_SEED={replay})");
        std::panic::resume_unwind(p)
    })
}

/// Runs every cut of every seed; returns the first violation as (seed, cut, what).
fn sweep(cfg: Config, mut landed: impl FnMut(Landed)) -> Option<(u64, u64, String)> {
    for seed in 0..cfg.seeds {
        let ops = in_context(seed, None, || count_ops(cfg, seed));
        for cut in cuts(cfg, seed, ops) {
            match in_context(seed, Some(cut), || run_cut(cfg, seed, cut)) {
                Ok(l) => landed(l),
                Err(e) => return Some((seed, cut, e)),
            }
        }
    }
    None
}

/// Totals of a sweep.
#[derive(Debug, Default)]
struct Tally {
    /// Cuts per kind of operation they landed in.
    kinds: BTreeMap<Kind, u64>,
    /// Power cuts after the workload, the process alive.
    after_workload: u64,
    restarts_died: u64,
    second_lives_died: u64,
    repairs: Repairs,
}

/// Runs a correct configuration's sweep (or the replay of `RINGBLK_SIM_SEED`);
/// panics on a violation, naming the seed and cut.
fn sweep_ok(name: &str, cfg: Config) -> Option<Tally> {
    if let Some((seed, cut)) = replay_filter() {
        let cuts = cut.map_or_else(|| cuts(cfg, seed, count_ops(cfg, seed)), |c| vec![c]);
        for cut in cuts {
            let l = run_cut(cfg, seed, cut)
                .unwrap_or_else(|e| panic!("{name}: seed {seed} cut {cut}: {e}"));
            println!("{name}: seed {seed} cut {cut}: {l:?}, ok");
        }
        return None;
    }
    let t0 = Instant::now();
    let mut t = Tally::default();
    let failure = sweep(cfg, |l| {
        match l.kind {
            Some(k) => *t.kinds.entry(k).or_default() += 1,
            None => t.after_workload += 1,
        }
        t.restarts_died += u64::from(l.restart_died);
        t.second_lives_died += u64::from(l.second_died);
        t.repairs += l.repairs;
    });
    if let Some((seed, cut, e)) = failure {
        panic!("{name}: seed {seed} cut {cut}: {e}\n(replay: RINGBLK_SIM_SEED={seed}:{cut})");
    }
    println!(
        "{name}: {} cuts in operations {:?}, {} after the workload; {} first restarts \
         died too; {} second lives died in an operation; recoveries repaired {:?}; {:.1?}",
        t.kinds.values().sum::<u64>(),
        t.kinds,
        t.after_workload,
        t.restarts_died,
        t.second_lives_died,
        t.repairs,
        t0.elapsed()
    );
    Some(t)
}

#[test]
fn power_cuts_keep_flushed_writes_and_backups() {
    let Some(t) = sweep_ok("main", MAIN) else {
        return;
    };
    let total: u64 = t.kinds.values().sum();
    assert!(total >= 1000, "only {total} cuts landed in an operation");
    for k in KINDS {
        let n = t.kinds.get(&k).copied().unwrap_or(0);
        assert!(n >= 20, "only {n} cuts landed in a {k:?}: {:?}", t.kinds);
    }
    assert!(
        t.restarts_died >= 100,
        "only {} restarts died",
        t.restarts_died
    );
    assert!(t.repairs.orphans >= 20, "few leftovers: {:?}", t.repairs);
}

#[test]
fn power_cuts_tear_multi_sector_journal_frames() {
    let Some(t) = sweep_ok("big frames", BIG_FRAMES) else {
        return;
    };
    assert!(
        t.repairs.torn_tails >= 5,
        "few torn journal tails: {:?}",
        t.repairs
    );
}

// ---------------------------------------------------------------------------
// Negative controls: planted bugs the sweep must catch.

/// Runs the main sweep with a planted bug; it must find a violation.
fn expect_violation(name: &str, commit: CommitFn, opts: CommitOptions) {
    let cfg = Config {
        commit,
        opts,
        ..MAIN
    };
    match sweep(cfg, |_| {}) {
        Some((seed, cut, e)) => println!("{name}: caught at seed {seed} cut {cut}: {e}"),
        None => panic!(
            "{name}: no violation in {} seeds: the test does not catch it",
            cfg.seeds
        ),
    }
}

#[test]
fn negative_control_unsynced_journal_is_caught() {
    let opts = CommitOptions {
        sync_journal: false,
    };
    expect_violation("journals not synced", commit, opts);
}

/// [`commit`] with steps 3 and 4 swapped: the mappings become durable before the
/// data they point at. (Errors just return: a run stops at its first one.)
fn commit_journals_before_data(
    store: &dyn Store,
    set: &CommitSet<'_>,
    opts: CommitOptions,
) -> io::Result<()> {
    if let Some(m) = set.manifest {
        m.write_if_dirty(store)?;
    }
    let mut taken: Vec<Taken> = set.journals.iter().rev().map(|j| j.take()).collect();
    taken.reverse();
    for (j, t) in set.journals.iter().zip(taken) {
        j.write(store, t, opts.sync_journal)?;
    }
    for d in &set.data {
        store.sync(d)?;
    }
    Ok(())
}

#[test]
fn negative_control_journal_before_data_is_caught() {
    expect_violation(
        "journals before data",
        commit_journals_before_data,
        CommitOptions::default(),
    );
}

/// [`commit`] writing the journals top first: a merge's `Unmap` above can become
/// durable while the `Install` below it is not, and the chunk falls through to
/// older data. Only a cut between two journal writes of one commit during a
/// merge shows it: the aimed cuts find it.
fn commit_journals_top_first(
    store: &dyn Store,
    set: &CommitSet<'_>,
    opts: CommitOptions,
) -> io::Result<()> {
    if let Some(m) = set.manifest {
        m.write_if_dirty(store)?;
    }
    let taken: Vec<Taken> = set.journals.iter().rev().map(|j| j.take()).collect();
    for d in &set.data {
        store.sync(d)?;
    }
    for (j, t) in set.journals.iter().rev().zip(taken) {
        j.write(store, t, opts.sync_journal)?;
    }
    Ok(())
}

#[test]
fn negative_control_unmap_before_install_is_caught() {
    expect_violation(
        "journals top first",
        commit_journals_top_first,
        CommitOptions::default(),
    );
}
