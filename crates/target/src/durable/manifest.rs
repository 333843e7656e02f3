//! The volume manifest: the image stack of one volume (its deltas, bottom to top,
//! and the backup each one sits above), replaced atomically on every change.
//!
//! # Format
//! `<volume>.manifest` in the data dir: one line of JSON, then a line
//! `crc32c=XXXXXXXX` over the JSON bytes. Written by
//! [`replace_atomically`](super::store::replace_atomically): temp file, fsync, rename,
//! fsync the directory, so a power cut leaves the old or the new manifest.
//!
//! # When it is written
//! A new delta enters the manifest before anything in it can be acknowledged as
//! durable: every group commit first writes the manifest if it changed
//! ([`ManifestCell::write_if_dirty`]). A released delta leaves it only after its
//! chunks were committed below it; its files are deleted after that.

use std::io;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::store::{replace_atomically, Store};

pub const FORMAT: u32 = 1;

pub fn manifest_name(volume: &str) -> String {
    format!("{volume}.manifest")
}

pub fn delta_name(volume: &str, id: u64) -> String {
    format!("{volume}.{id}.delta")
}

pub fn journal_name(volume: &str, id: u64) -> String {
    format!("{volume}.{id}.journal")
}

/// `Some(id)` when `file` is a delta or journal file of `volume`.
pub fn delta_id_of(volume: &str, file: &str) -> Option<u64> {
    let rest = file.strip_prefix(volume)?.strip_prefix('.')?;
    let id = rest
        .strip_suffix(".delta")
        .or_else(|| rest.strip_suffix(".journal"))?;
    id.parse().ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeltaState {
    /// Holds writes since its backup (the backup is served).
    Active,
    /// Its backup was released and it is being merged into the layer below; a
    /// restart resumes the merge.
    Merging,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEntry {
    pub id: u64,
    /// The backup whose frozen image lies directly below this delta.
    pub backup: String,
    pub state: DeltaState,
    pub created_unix_ms: u64,
}

/// A copy job to restart after a crash (`backup copy` that was running).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyEntry {
    pub backup: String,
    pub dest: String,
    #[serde(default)]
    pub changed_since: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub volume: String,
    pub size_bytes: u64,
    pub chunk_bytes: u32,
    pub generation: u64,
    pub next_delta_id: u64,
    /// Bottom to top.
    pub deltas: Vec<DeltaEntry>,
    #[serde(default)]
    pub copies: Vec<CopyEntry>,
}

impl Manifest {
    pub fn new(volume: &str, size_bytes: u64, chunk_bytes: u32) -> Manifest {
        Manifest {
            format: FORMAT,
            volume: volume.to_string(),
            size_bytes,
            chunk_bytes,
            generation: 0,
            next_delta_id: 1,
            deltas: Vec::new(),
            copies: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_string(self).unwrap_or_else(|_| unreachable!("plain data"));
        format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "manifest is not UTF-8".to_string())?;
        let mut lines = text.lines();
        let json = lines.next().ok_or("manifest is empty")?;
        let crc = lines
            .next()
            .and_then(|l| l.strip_prefix("crc32c="))
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or("manifest has no crc32c line")?;
        if crc32c::crc32c(json.as_bytes()) != crc {
            return Err("manifest checksum mismatch".into());
        }
        let m: Manifest =
            serde_json::from_str(json).map_err(|e| format!("manifest does not parse: {e}"))?;
        if m.format != FORMAT {
            return Err(format!("unsupported manifest format {}", m.format));
        }
        Ok(m)
    }

    pub fn load(store: &dyn Store, volume: &str) -> Result<Option<Manifest>, String> {
        let name = manifest_name(volume);
        if !store.exists(&name) {
            return Ok(None);
        }
        let bytes = super::store::read_all(store, &name).map_err(|e| format!("{name}: {e}"))?;
        Manifest::decode(&bytes)
            .map(Some)
            .map_err(|e| format!("{name}: {e}"))
    }
}

/// The manifest a volume wants on disk, and whether the disk has it yet.
#[derive(Debug)]
pub struct ManifestCell {
    st: Mutex<CellState>,
    /// Serialises writers so an older generation never overwrites a newer one.
    write: Mutex<()>,
}

#[derive(Debug)]
struct CellState {
    m: Manifest,
    durable_gen: Option<u64>,
}

impl ManifestCell {
    /// `durable`: whether `m` is what the disk already holds.
    pub fn new(m: Manifest, durable: bool) -> ManifestCell {
        let durable_gen = durable.then_some(m.generation);
        ManifestCell {
            st: Mutex::new(CellState { m, durable_gen }),
            write: Mutex::new(()),
        }
    }

    /// Changes the manifest (a new generation); durable at the next write.
    pub fn update<R>(&self, f: impl FnOnce(&mut Manifest) -> R) -> R {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut st.m);
        st.m.generation += 1;
        r
    }

    pub fn get(&self) -> Manifest {
        self.st.lock().unwrap_or_else(|p| p.into_inner()).m.clone()
    }

    pub fn is_dirty(&self) -> bool {
        let st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        st.durable_gen != Some(st.m.generation)
    }

    /// Holds off writers (a volume being destroyed removes the file under it).
    pub fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the manifest atomically if the disk's copy is older.
    pub fn write_if_dirty(&self, store: &dyn Store) -> io::Result<()> {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let (m, dirty) = {
            let st = self.st.lock().unwrap_or_else(|p| p.into_inner());
            (st.m.clone(), st.durable_gen != Some(st.m.generation))
        };
        if !dirty {
            return Ok(());
        }
        replace_atomically(store, &manifest_name(&m.volume), &m.encode())?;
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        st.durable_gen = Some(m.generation);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let mut m = Manifest::new("vol0", 1 << 30, 4096);
        m.deltas.push(DeltaEntry {
            id: 1,
            backup: "nightly".into(),
            state: DeltaState::Merging,
            created_unix_ms: 5,
        });
        let b = m.encode();
        assert_eq!(Manifest::decode(&b).unwrap(), m);
        let mut bad = b.clone();
        bad[10] ^= 1;
        assert!(Manifest::decode(&bad).is_err());
        assert!(Manifest::decode(&b[..b.len() - 12]).is_err());
    }

    #[test]
    fn file_names() {
        assert_eq!(delta_id_of("vol0", "vol0.12.delta"), Some(12));
        assert_eq!(delta_id_of("vol0", "vol0.12.journal"), Some(12));
        assert_eq!(delta_id_of("vol0", "vol0.1.5.delta"), None);
        assert_eq!(delta_id_of("vol0", "vol01.2.delta"), None);
        assert_eq!(delta_id_of("vol0", "vol0.manifest"), None);
    }
}
