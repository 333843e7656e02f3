//! The volume manifest: the image stack of one volume (its deltas, bottom to top,
//! and the backup each one sits above), replaced atomically on every change.
//!
//! # Format
//! `<volume>.manifest` in the data dir: one line of JSON, then a line
//! `crc32c=XXXXXXXX` over the JSON bytes. The JSON's `format` is the version:
//! - 1 (releases up to 3af0bc6): no incarnation, no base identity. Read as it is:
//!   its deltas keep their names (`VOL.ID.delta`), its base identity is recorded
//!   at the next open, and the next write makes it format 2.
//! - 2: adds `incarnation` (part of every delta and journal file name, see
//!   [`file_stem`]) and `base` (the identity of the base image file, checked at
//!   every open: backups are only ever served over the file they were taken of).
//!
//! A newer format than this code knows is refused, never misread.
//!
//! Written by
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

/// The format this code writes.
pub(crate) const FORMAT: u32 = 2;
/// The format of releases up to 3af0bc6 (read as it is; see the module docs).
pub(crate) const FORMAT_V1: u32 = 1;

pub(crate) fn manifest_name(volume: &str) -> String {
    format!("{volume}.manifest")
}

/// The prefix of a volume's delta and journal file names: `VOL@INCARNATION`, or
/// `VOL` for a manifest of format 1 (no incarnation).
///
/// Why an incarnation: a deleted volume may linger (a connection that does not
/// read keeps it alive) while a volume of the same name is created again; its
/// files, named by (volume, id) alone, were the new volume's, and it unlinked them
/// when it went. A fresh incarnation per volume lifetime keeps the two apart.
/// Volume names cannot contain '@' (`volume::check_name`), so `VOL@INC` never is
/// another volume's name, nor a format-1 prefix.
pub(crate) fn file_stem(volume: &str, incarnation: Option<&str>) -> String {
    match incarnation {
        Some(inc) => format!("{volume}@{inc}"),
        None => volume.to_string(),
    }
}

/// A new incarnation: 16 hex digits from the kernel's random source (time and pid
/// when that fails; uniqueness against files on disk is what matters, and the
/// caller's name check covers the rest).
pub(crate) fn new_incarnation() -> String {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the live local buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let v = if n == b.len() as isize {
        u64::from_ne_bytes(b)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ ((std::process::id() as u64) << 32)
    };
    format!("{v:016x}")
}

/// `stem` as from [`file_stem`].
pub(crate) fn delta_name(stem: &str, id: u64) -> String {
    format!("{stem}.{id}.delta")
}

pub(crate) fn journal_name(stem: &str, id: u64) -> String {
    format!("{stem}.{id}.journal")
}

/// `Some(id)` when `file` is a delta or journal file of `stem`.
pub(crate) fn delta_id_of(stem: &str, file: &str) -> Option<u64> {
    let rest = file.strip_prefix(stem)?.strip_prefix('.')?;
    let id = rest
        .strip_suffix(".delta")
        .or_else(|| rest.strip_suffix(".journal"))?;
    id.parse().ok()
}

/// `Some((incarnation, id))` when `file` is a delta or journal file of `volume`
/// in any incarnation (`None`: a format-1 name).
pub(crate) fn delta_of_volume<'a>(volume: &str, file: &'a str) -> Option<(Option<&'a str>, u64)> {
    let rest = file.strip_prefix(volume)?;
    match rest.strip_prefix('@') {
        None => delta_id_of(volume, file).map(|id| (None, id)),
        Some(r) => {
            let (inc, _) = r.split_once('.')?;
            if inc.is_empty() || !inc.bytes().all(|c| c.is_ascii_alphanumeric()) {
                return None;
            }
            let stem_len = volume.len() + 1 + inc.len();
            let id = delta_id_of(&file[..stem_len], file)?;
            Some((Some(&file[volume.len() + 1..stem_len]), id))
        }
    }
}

/// What identifies a volume's base image file: where it is, which inode it is
/// (and when that inode was born, so that a reused inode number is not taken for
/// the same file) and how long it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BaseIdentity {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    /// `st_rdev` of a block device (0 for a file).
    #[serde(default)]
    pub rdev: u64,
    pub size_bytes: u64,
    /// Birth time where the filesystem records one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub born_ns: Option<u64>,
}

impl BaseIdentity {
    /// The identity of the file at `path` now (the path made canonical).
    pub(crate) fn of(path: &std::path::Path) -> io::Result<BaseIdentity> {
        use std::os::unix::fs::MetadataExt;
        let canon = std::fs::canonicalize(path)?;
        let md = std::fs::metadata(&canon)?;
        let born_ns = md
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as u64);
        Ok(BaseIdentity {
            path: canon.display().to_string(),
            dev: md.dev(),
            ino: md.ino(),
            rdev: md.rdev(),
            size_bytes: md.len(),
            born_ns,
        })
    }

    /// For messages: `PATH (device D, inode I, N bytes)`.
    pub(crate) fn describe(&self) -> String {
        let born = self
            .born_ns
            .map_or(String::new(), |b| format!(", born {b} ns"));
        let rdev = match self.rdev {
            0 => String::new(),
            r => format!(", rdev {r:#x}"),
        };
        format!(
            "{} (device {:#x}, inode {}{rdev}, {} bytes{born})",
            self.path, self.dev, self.ino, self.size_bytes
        )
    }

    /// Whether `found` is the file this identity was recorded of.
    pub(crate) fn matches(&self, found: &BaseIdentity) -> bool {
        let born = match (self.born_ns, found.born_ns) {
            (Some(a), Some(b)) => a == b,
            _ => true, // a filesystem without birth times: the rest must do
        };
        self.path == found.path
            && self.dev == found.dev
            && self.ino == found.ino
            && self.rdev == found.rdev
            && self.size_bytes == found.size_bytes
            && born
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DeltaState {
    /// Holds writes since its backup (the backup is served).
    Active,
    /// Its backup was released and it is being merged into the layer below; a
    /// restart resumes the merge.
    Merging,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeltaEntry {
    pub id: u64,
    /// The backup whose frozen image lies directly below this delta.
    pub backup: String,
    pub state: DeltaState,
    pub created_unix_ms: u64,
}

/// A copy job to restart after a crash (`backup copy` that was running).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CopyEntry {
    pub backup: String,
    pub dest: String,
    #[serde(default)]
    pub changed_since: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Manifest {
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
    /// Format 2: see [`file_stem`]. `None` in format 1 (names without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    /// Format 2: the base image file the deltas lie over. `None` in format 1 (not
    /// known) and for volumes whose base is not a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseIdentity>,
}

impl Manifest {
    pub(crate) fn new(volume: &str, size_bytes: u64, chunk_bytes: u32) -> Manifest {
        Manifest {
            format: FORMAT,
            volume: volume.to_string(),
            size_bytes,
            chunk_bytes,
            generation: 0,
            next_delta_id: 1,
            deltas: Vec::new(),
            copies: Vec::new(),
            incarnation: None,
            base: None,
        }
    }

    /// The prefix of this volume's delta and journal file names.
    pub(crate) fn file_stem(&self) -> String {
        file_stem(&self.volume, self.incarnation.as_deref())
    }

    /// Always in the current [`FORMAT`] (a format-1 manifest read is upgraded).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.format = FORMAT;
        let json = serde_json::to_string(&m).unwrap_or_else(|_| unreachable!("plain data"));
        format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes())).into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Manifest, String> {
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
        match m.format {
            FORMAT => {}
            // Format 1 has neither field: one that does was not written by it.
            FORMAT_V1 if m.incarnation.is_none() && m.base.is_none() => {}
            f => {
                return Err(format!(
                    "unsupported manifest format {f} (this ringblk reads formats {FORMAT_V1} and {FORMAT}; a newer release wrote it)"
                ))
            }
        }
        Ok(m)
    }

    pub(crate) fn load(store: &dyn Store, volume: &str) -> Result<Option<Manifest>, String> {
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
pub(crate) struct ManifestCell {
    st: Mutex<CellState>,
    /// Serialises writers so an older generation never overwrites a newer one.
    /// Holds `true` once the volume is destroyed: no write may follow.
    write: Mutex<bool>,
}

#[derive(Debug)]
struct CellState {
    m: Manifest,
    durable_gen: Option<u64>,
}

impl ManifestCell {
    /// `durable`: whether `m` is what the disk already holds.
    pub(crate) fn new(m: Manifest, durable: bool) -> ManifestCell {
        let durable_gen = durable.then_some(m.generation);
        ManifestCell {
            st: Mutex::new(CellState { m, durable_gen }),
            write: Mutex::new(false),
        }
    }

    /// Changes the manifest (a new generation); durable at the next write.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Manifest) -> R) -> R {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut st.m);
        st.m.generation += 1;
        r
    }

    pub(crate) fn get(&self) -> Manifest {
        self.st.lock().unwrap_or_else(|p| p.into_inner()).m.clone()
    }

    /// Holds off writers while a volume being destroyed removes the file, and
    /// retires the cell: a writer that was already waiting for the lock (a group
    /// commit that read the manifest before the volume was deleted) must not put
    /// the file back afterwards, where a volume created again under the name would
    /// find it and recover the deleted volume's backups.
    pub(crate) fn write_lock(&self) -> std::sync::MutexGuard<'_, bool> {
        let mut w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        *w = true;
        w
    }

    /// Writes the manifest atomically if the disk's copy is older.
    pub(crate) fn write_if_dirty(&self, store: &dyn Store) -> io::Result<()> {
        let retired = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if *retired {
            return Ok(()); // the volume was deleted (see `write_lock`)
        }
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

    /// A writer that waited for the lock while the volume was destroyed does not
    /// put the manifest back.
    #[test]
    fn a_destroyed_volumes_manifest_stays_gone() {
        let st = crate::durable::sim::SimStore::new();
        let cell = ManifestCell::new(Manifest::new("v", 1 << 20, 4096), false);
        cell.write_if_dirty(&st).expect("write");
        assert!(st.exists("v.manifest"));
        cell.update(|m| m.next_delta_id = 7);
        {
            let _w = cell.write_lock();
            st.remove("v.manifest").expect("rm");
        }
        cell.write_if_dirty(&st).expect("no-op");
        assert!(!st.exists("v.manifest"));
    }

    #[test]
    fn file_names() {
        assert_eq!(delta_id_of("vol0", "vol0.12.delta"), Some(12));
        assert_eq!(delta_id_of("vol0", "vol0.12.journal"), Some(12));
        assert_eq!(delta_id_of("vol0", "vol0.1.5.delta"), None);
        assert_eq!(delta_id_of("vol0", "vol01.2.delta"), None);
        assert_eq!(delta_id_of("vol0", "vol0.manifest"), None);
        let stem = file_stem("vol0", Some("00ab"));
        assert_eq!(delta_name(&stem, 3), "vol0@00ab.3.delta");
        assert_eq!(journal_name(&stem, 3), "vol0@00ab.3.journal");
        assert_eq!(delta_id_of(&stem, "vol0@00ab.3.delta"), Some(3));
        assert_eq!(delta_id_of("vol0", "vol0@00ab.3.delta"), None);
        assert_eq!(
            delta_of_volume("vol0", "vol0@00ab.3.journal"),
            Some((Some("00ab"), 3))
        );
        assert_eq!(delta_of_volume("vol0", "vol0.7.delta"), Some((None, 7)));
        assert_eq!(delta_of_volume("vol0", "vol0@.7.delta"), None);
        assert_eq!(delta_of_volume("vol0", "vol01@ab.7.delta"), None);
        assert_eq!(delta_of_volume("vol0", "vol0@ab.manifest"), None);
        assert_ne!(new_incarnation(), new_incarnation());
    }

    /// A manifest exactly as release 3af0bc6 wrote it (bytes from its writer,
    /// captured before format 2 existed): read as it is, never misread; written
    /// back, it becomes format 2 with the same contents.
    #[test]
    fn format_1_from_release_3af0bc6_is_read_as_it_is() {
        let v1 = concat!(
            r#"{"format":1,"volume":"vol0","size_bytes":1048576,"chunk_bytes":4096,"generation":4,"next_delta_id":3,"deltas":[{"id":1,"backup":"b1","state":"active","created_unix_ms":1700000000000},{"id":2,"backup":"b2","state":"merging","created_unix_ms":1700000000001}],"copies":[]}"#,
            "\ncrc32c=05367cee\n"
        );
        let m = Manifest::decode(v1.as_bytes()).expect("a format-1 manifest reads");
        assert_eq!(m.format, FORMAT_V1);
        assert_eq!(
            (m.size_bytes, m.chunk_bytes, m.next_delta_id),
            (1 << 20, 4096, 3)
        );
        assert_eq!(m.deltas.len(), 2);
        assert_eq!(m.deltas[1].state, DeltaState::Merging);
        assert_eq!((m.incarnation.as_deref(), m.base.as_ref()), (None, None));
        // Its files keep the names that release gave them.
        assert_eq!(delta_name(&m.file_stem(), 2), "vol0.2.delta");
        let again = Manifest::decode(&m.encode()).expect("upgraded");
        assert_eq!(again.format, FORMAT);
        assert_eq!(again.deltas, m.deltas);
        assert_eq!(again.file_stem(), "vol0");
        // A format this code does not know is refused, and so is a "format 1"
        // with format-2 fields.
        let json = r#"{"format":3,"volume":"vol0","size_bytes":1048576,"chunk_bytes":4096,"generation":4,"next_delta_id":3,"deltas":[]}"#;
        let v3 = format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes()));
        let e = Manifest::decode(v3.as_bytes()).expect_err("format 3");
        assert!(e.contains("format 3"), "{e}");
        let json = r#"{"format":1,"volume":"vol0","size_bytes":1048576,"chunk_bytes":4096,"generation":4,"next_delta_id":3,"deltas":[],"incarnation":"ab"}"#;
        let bad = format!("{json}\ncrc32c={:08x}\n", crc32c::crc32c(json.as_bytes()));
        assert!(Manifest::decode(bad.as_bytes()).is_err());
    }

    #[test]
    fn base_identity_tells_files_apart() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&a, [1u8; 4096]).expect("a");
        std::fs::write(&b, [1u8; 4096]).expect("b");
        let ia = BaseIdentity::of(&a).expect("a");
        assert!(ia.matches(&BaseIdentity::of(&a).expect("a")));
        let ib = BaseIdentity::of(&b).expect("b");
        assert!(!ia.matches(&ib));
        // Another file moved to the same path is not the same file.
        std::fs::rename(&b, &a).expect("mv");
        assert!(!ia.matches(&BaseIdentity::of(&a).expect("a")));
        assert!(ia.describe().contains("a.img"));
    }
}
