//! `ringblk check`: an offline consistency check of a data dir, like thin_check.
//!
//! For every manifest (or one volume's): the manifest parses and its checksum
//! holds; every delta it lists has its data file and journal; every journal's
//! header matches, its frames check out up to at most a torn tail, and its records
//! replay strictly (no install over a mapped chunk, no unmap of an unmapped one, no
//! physical chunk mapped twice or out of range). Files of a volume the manifest
//! does not list are reported as leftovers (a restart removes them). The base
//! image must be the file the manifest recorded (else the server refuses the
//! volume). The server's volume list (`volumes.json`) must parse, and the base
//! file of every file volume it lists must exist. It never writes: a torn tail is
//! reported, not truncated.

use super::manifest::{delta_of_volume, BaseIdentity, Manifest};
use super::recover::load_delta;
use super::store::Store;

#[derive(Debug, Default)]
pub(crate) struct CheckReport {
    pub volumes: Vec<String>,
    /// Inconsistencies: a non-zero exit.
    pub errors: Vec<String>,
    /// Worth knowing, not wrong (torn tails, leftovers).
    pub notes: Vec<String>,
    /// One line per checked delta.
    pub lines: Vec<String>,
}

impl CheckReport {
    #[cfg(test)]
    pub(crate) fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks `volume`, or every volume with a manifest in the store.
pub(crate) fn check(store: &dyn Store, volume: Option<&str>) -> CheckReport {
    let mut rep = CheckReport::default();
    let files = match store.list() {
        Ok(f) => f,
        Err(e) => {
            rep.errors.push(format!("cannot list the data dir: {e}"));
            return rep;
        }
    };
    if volume.is_none() {
        check_volume_list(store, &mut rep);
    }
    let volumes: Vec<String> = match volume {
        Some(v) => vec![v.to_string()],
        None => files
            .iter()
            .filter_map(|f| f.strip_suffix(".manifest"))
            .map(str::to_string)
            .collect(),
    };
    for v in volumes {
        let m = match Manifest::load(store, &v) {
            Ok(Some(m)) => m,
            Ok(None) => {
                rep.errors.push(format!("{v}: no manifest ({v}.manifest)"));
                continue;
            }
            Err(e) => {
                rep.errors.push(e);
                continue;
            }
        };
        if m.volume != v {
            rep.errors
                .push(format!("{v}.manifest names volume {:?}", m.volume));
        }
        let cb = m.chunk_bytes;
        if !cb.is_power_of_two() || !(4096..=1 << 20).contains(&cb) {
            rep.errors.push(format!("{v}: bad chunk size {cb}"));
            continue;
        }
        let capacity = m.size_bytes.div_ceil(cb as u64);
        check_base(&v, &m, &mut rep);
        let stem = m.file_stem();
        let mut ids = std::collections::HashSet::new();
        for d in &m.deltas {
            if !ids.insert(d.id) || d.id >= m.next_delta_id {
                rep.errors.push(format!(
                    "{v}: delta id {} listed twice or not below next_delta_id {}",
                    d.id, m.next_delta_id
                ));
            }
            match load_delta(store, &stem, d, capacity, cb) {
                Ok((r, map, next)) => {
                    rep.lines.push(format!(
                        "{v}: delta {} (above backup {:?}, {:?}): {} frames, {} records, {} chunks mapped, allocator at {}",
                        d.id,
                        d.backup,
                        d.state,
                        r.frames,
                        r.records.len(),
                        map.mapped_count(),
                        next
                    ));
                    if r.torn_tail_bytes > 0 {
                        rep.notes.push(format!(
                            "{v}: delta {} journal has a torn tail of {} bytes after frame {} (a commit cut short; ignored on recovery)",
                            d.id, r.torn_tail_bytes, r.frames
                        ));
                    }
                }
                Err(e) => rep.errors.push(format!("{v}: {e}")),
            }
        }
        for f in &files {
            if let Some((inc, id)) = delta_of_volume(&v, f) {
                if inc != m.incarnation.as_deref() || !m.deltas.iter().any(|d| d.id == id) {
                    rep.notes.push(format!(
                        "{f}: not in the manifest (a delta prepared for the next backup, or left by a switch that never became durable; removed on restart)"
                    ));
                }
            }
        }
        rep.volumes.push(v);
    }
    rep
}

/// The base image file the manifest's deltas lie over must still be the one it
/// names (a restart refuses the volume otherwise, see `Volume::open`).
fn check_base(v: &str, m: &Manifest, rep: &mut CheckReport) {
    let Some(rec) = &m.base else {
        if m.format == super::manifest::FORMAT_V1 {
            rep.notes.push(format!(
                "{v}: manifest of format 1 (an older release): the base image's identity is recorded at the next start"
            ));
        }
        return;
    };
    match BaseIdentity::of(std::path::Path::new(&rec.path)) {
        Ok(found) if rec.matches(&found) => {}
        Ok(found) => rep.errors.push(format!(
            "{v}: the base image is not the file the backups were taken of: recorded {}, found {} (the server refuses the volume; `--rebind {v}` serves the backups over the new file)",
            rec.describe(),
            found.describe()
        )),
        Err(e) => rep.errors.push(format!(
            "{v}: the base image {} is gone ({e}); the server refuses the volume",
            rec.describe()
        )),
    }
}

/// The server's volume list (see `volumes`): what a restart would bring back.
fn check_volume_list(store: &dyn Store, rep: &mut CheckReport) {
    let name = super::volumes::FILE_NAME;
    if !store.exists(name) {
        return; // a data dir of an older release, or never started
    }
    let list = super::store::read_all(store, name)
        .map_err(|e| e.to_string())
        .and_then(|b| super::volumes::VolumeList::decode(&b));
    let list = match list {
        Ok(l) => l,
        Err(e) => {
            rep.errors.push(format!("{name}: {e}"));
            return;
        }
    };
    for v in &list.volumes {
        let Some(p) = v
            .path
            .as_ref()
            .filter(|_| v.backend == crate::spec::BackendKind::File)
        else {
            continue;
        };
        if let Err(e) = std::fs::metadata(p) {
            rep.errors.push(format!(
                "{}: the base image {} of the listed volume cannot be opened ({e}); the server leaves it out",
                v.name,
                p.display()
            ));
        }
    }
}
