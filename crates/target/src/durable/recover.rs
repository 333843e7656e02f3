//! Recovery on start: manifest + journals → the image stack of a volume.
//!
//! For a volume with a manifest in the data dir: every delta it lists gets its map
//! back by replaying its journal (a torn tail is dropped and truncated away; damage
//! in the middle is an error, never skipped), its allocator restarts after the
//! highest physical chunk a durable mapping references, and the space of chunks no
//! durable mapping references is punched out. Delta and journal files of the volume
//! that the manifest does not list (a switch that never became durable, or an
//! earlier incarnation of the volume: one deleted, see `manifest::file_stem`) are
//! removed.
//! The caller resumes merges of deltas in state `merging`.

use std::io;
use std::time::Instant;

use ringblk_blockmap::{BlockMap, MapRecord};

use super::journal::{replay, Journal, JournalHeader, Replay};
use super::manifest::{
    delta_name, delta_of_volume, journal_name, manifest_name, DeltaEntry, Manifest,
};
use super::store::{read_all, Store};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum RecoverError {
    #[error("{0}")]
    Corrupt(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> RecoverError {
    let what = what.into();
    move |source| RecoverError::Io { what, source }
}

/// One delta as recovered.
#[derive(Debug)]
pub(crate) struct RecoveredDelta {
    pub entry: DeltaEntry,
    pub map: BlockMap,
    pub journal: Journal,
    /// First physical chunk the allocator may hand out.
    pub next_physical: u64,
    /// Slots below `next_physical` that no durable mapping references (fills that
    /// never got journaled before the crash): handed out again first, so crashes do
    /// not leak the delta's space. Empty for a merging delta (it takes no fills).
    pub spare: Vec<u64>,
    pub frames: u64,
    pub torn_tail_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Recovered {
    pub manifest: Manifest,
    pub deltas: Vec<RecoveredDelta>,
    pub orphans_removed: Vec<String>,
    pub punched_chunks: u64,
    pub elapsed_ms: u64,
}

/// Checks one delta's journal: the map it describes, or why it cannot be trusted.
/// `stem`: the volume's file name prefix (`Manifest::file_stem`).
pub(crate) fn load_delta(
    store: &dyn Store,
    stem: &str,
    entry: &DeltaEntry,
    capacity: u64,
    chunk_bytes: u32,
) -> Result<(Replay, BlockMap, u64), RecoverError> {
    let jn = journal_name(stem, entry.id);
    if !store.exists(&jn) {
        return Err(RecoverError::Corrupt(format!(
            "{jn}: missing (the manifest lists delta {})",
            entry.id
        )));
    }
    if !store.exists(&delta_name(stem, entry.id)) {
        return Err(RecoverError::Corrupt(format!(
            "{}: missing (the manifest lists delta {})",
            delta_name(stem, entry.id),
            entry.id
        )));
    }
    let bytes = read_all(store, &jn).map_err(io_err(jn.clone()))?;
    let r = replay(&bytes);
    if let Some(c) = &r.corrupt {
        return Err(RecoverError::Corrupt(format!("{jn}: {c}")));
    }
    if let Some(h) = r.header {
        let want = JournalHeader {
            chunk_bytes,
            capacity_chunks: capacity,
            delta_id: entry.id,
        };
        if h != want {
            return Err(RecoverError::Corrupt(format!(
                "{jn}: header {h:?} does not match the manifest {want:?}"
            )));
        }
    }
    let map = BlockMap::from_records(capacity, r.records.iter().copied())
        .map_err(|e| RecoverError::Corrupt(format!("{jn}: {e}")))?;
    // Physical chunks are handed out once each: two mappings to one is corruption.
    let mut seen = std::collections::HashSet::new();
    let mut next = 0u64;
    for rec in map.records() {
        if let MapRecord::Install { logical, physical } = rec {
            if physical >= capacity || !seen.insert(physical) {
                return Err(RecoverError::Corrupt(format!(
                    "{jn}: chunk {logical} maps to physical chunk {physical}, which is out of range or mapped twice"
                )));
            }
            next = next.max(physical + 1);
        }
    }
    // Unmapped chunks were merged down; their slots are never reused (bump
    // allocation), so the allocator also resumes after every slot ever installed.
    for rec in &r.records {
        if let MapRecord::Install { physical, .. } = rec {
            next = next.max(physical + 1);
        }
    }
    Ok((r, map, next))
}

/// Recovers `volume` from `store`; `None` when it has no manifest (a fresh volume:
/// leftover delta files of it are removed).
pub(crate) fn recover(
    store: &dyn Store,
    volume: &str,
    size_bytes: u64,
    chunk_bytes: u32,
) -> Result<Option<Recovered>, RecoverError> {
    let t0 = Instant::now();
    let manifest = Manifest::load(store, volume).map_err(RecoverError::Corrupt)?;
    let mut orphans = Vec::new();
    let listed: Vec<u64> = manifest
        .as_ref()
        .map_or(Vec::new(), |m| m.deltas.iter().map(|d| d.id).collect());
    let incarnation = manifest.as_ref().and_then(|m| m.incarnation.clone());
    for f in store.list().map_err(io_err("data dir"))? {
        let orphan = match delta_of_volume(volume, &f) {
            Some((inc, id)) => {
                manifest.is_none() || inc != incarnation.as_deref() || !listed.contains(&id)
            }
            None => f == format!("{}.tmp", manifest_name(volume)),
        };
        if orphan {
            store.remove(&f).map_err(io_err(f.clone()))?;
            orphans.push(f);
        }
    }
    if !orphans.is_empty() {
        store.sync_dir().map_err(io_err("data dir"))?;
    }
    let Some(manifest) = manifest else {
        return Ok(None);
    };
    if manifest.size_bytes != size_bytes || manifest.chunk_bytes != chunk_bytes {
        return Err(RecoverError::Corrupt(format!(
            "{}: written for size {} and chunk size {}, but the volume has size {size_bytes} and chunk size {chunk_bytes}",
            manifest_name(volume),
            manifest.size_bytes,
            manifest.chunk_bytes
        )));
    }
    let capacity = size_bytes.div_ceil(chunk_bytes as u64);
    let mut deltas = Vec::new();
    let mut punched = 0u64;
    let stem = manifest.file_stem();
    for entry in &manifest.deltas {
        let (r, map, next) = load_delta(store, &stem, entry, capacity, chunk_bytes)?;
        let jn = journal_name(&stem, entry.id);
        if r.torn_tail_bytes > 0 {
            store.set_len(&jn, r.end).map_err(io_err(jn.clone()))?;
            store.sync(&jn).map_err(io_err(jn.clone()))?;
        }
        // Reclaim the space of slots no durable mapping references.
        let dn = delta_name(&stem, entry.id);
        let mut used: Vec<u64> = map
            .records()
            .filter_map(|r| match r {
                MapRecord::Install { physical, .. } => Some(physical),
                MapRecord::Unmap { .. } => None,
            })
            .collect();
        used.sort_unstable();
        let file_chunks = store
            .len(&dn)
            .map_err(io_err(dn.clone()))?
            .div_ceil(chunk_bytes as u64);
        // Counted: slots below the allocator's restart point (written, then lost
        // their mapping or merged down); the tail after it is punched uncounted.
        let merging = entry.state == super::manifest::DeltaState::Merging;
        let mut spare = Vec::new();
        let mut prev = 0u64;
        for p in used.iter().copied().chain([next]) {
            if !merging {
                spare.extend(prev..p.min(next));
            }
            prev = prev.max(p + 1);
        }
        let mut from = 0u64;
        for p in used.iter().copied().chain([file_chunks]) {
            if p > from {
                let cb = chunk_bytes as u64;
                if store.punch(&dn, from * cb, (p - from) * cb).is_ok() {
                    punched += p.min(next).saturating_sub(from);
                }
            }
            from = from.max(p + 1);
        }
        let header = JournalHeader {
            chunk_bytes,
            capacity_chunks: capacity,
            delta_id: entry.id,
        };
        deltas.push(RecoveredDelta {
            entry: entry.clone(),
            journal: Journal::resume(&jn, header, &r),
            map,
            next_physical: next,
            spare,
            frames: r.frames,
            torn_tail_bytes: r.torn_tail_bytes,
        });
    }
    Ok(Some(Recovered {
        manifest,
        deltas,
        orphans_removed: orphans,
        punched_chunks: punched,
        elapsed_ms: t0.elapsed().as_millis() as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::journal::Journal;
    use super::super::manifest::{DeltaEntry, DeltaState, ManifestCell};
    use super::super::sim::SimStore;
    use super::*;

    /// Slots a crash left unreferenced below the allocator are handed out again.
    #[test]
    fn unreferenced_slots_below_the_allocator_are_spare() {
        let st = SimStore::new();
        let (size, cb) = (64 * 4096u64, 4096u32);
        let mut m = Manifest::new("v", size, cb);
        m.next_delta_id = 2;
        m.deltas.push(DeltaEntry {
            id: 1,
            backup: "b".into(),
            state: DeltaState::Active,
            created_unix_ms: 0,
        });
        st.create(&delta_name("v", 1)).unwrap();
        let header = JournalHeader {
            chunk_bytes: cb,
            capacity_chunks: 64,
            delta_id: 1,
        };
        let j = Journal::create(&st, &journal_name("v", 1), header).unwrap();
        for (l, p) in [(7, 0), (3, 2), (9, 5)] {
            j.append(MapRecord::Install {
                logical: l,
                physical: p,
            });
        }
        j.write(&st, j.take(), true).unwrap();
        ManifestCell::new(m, false).write_if_dirty(&st).unwrap();
        let r = recover(&st, "v", size, cb).unwrap().expect("manifest");
        let d = &r.deltas[0];
        assert_eq!(d.next_physical, 6);
        assert_eq!(d.spare, [1, 3, 4]);
        assert_eq!(d.map.mapped_count(), 3);
    }

    /// A data dir of release 3af0bc6: its format-1 manifest (bytes from that
    /// release's writer) and its delta files named without an incarnation recover
    /// as they are; files of another incarnation of the volume are orphans.
    #[test]
    fn a_format_1_data_dir_recovers() {
        let st = SimStore::new();
        let (size, cb) = (1u64 << 20, 4096u32);
        let v1 = concat!(
            r#"{"format":1,"volume":"vol0","size_bytes":1048576,"chunk_bytes":4096,"generation":4,"next_delta_id":3,"deltas":[{"id":1,"backup":"b1","state":"active","created_unix_ms":1700000000000},{"id":2,"backup":"b2","state":"merging","created_unix_ms":1700000000001}],"copies":[]}"#,
            "\ncrc32c=05367cee\n"
        );
        st.create("vol0.manifest").unwrap();
        st.write_at("vol0.manifest", 0, v1.as_bytes()).unwrap();
        for id in [1u64, 2] {
            st.create(&format!("vol0.{id}.delta")).unwrap();
            let header = JournalHeader {
                chunk_bytes: cb,
                capacity_chunks: 256,
                delta_id: id,
            };
            let j = Journal::create(&st, &format!("vol0.{id}.journal"), header).unwrap();
            j.append(MapRecord::Install {
                logical: id,
                physical: 0,
            });
            j.write(&st, j.take(), true).unwrap();
        }
        st.create("vol0@00ff.1.delta").unwrap();
        let r = recover(&st, "vol0", size, cb).unwrap().expect("manifest");
        assert_eq!(r.manifest.file_stem(), "vol0");
        assert_eq!(r.deltas.len(), 2);
        assert_eq!(
            r.deltas[1].entry.state,
            super::super::manifest::DeltaState::Merging
        );
        assert_eq!(r.deltas[0].map.mapped_count(), 1);
        assert_eq!(r.orphans_removed, ["vol0@00ff.1.delta"]);
        assert!(st.exists("vol0.1.delta") && st.exists("vol0.2.journal"));
    }
}
