//! The server's volume list, persisted in the data dir: what a restart brings back.
//!
//! # Truth
//! `volumes.json` in the data dir lists every volume the server had when it last
//! changed (created at start or over RPC, deleted over RPC). At start it is the
//! truth: every volume it lists comes back, `--volume` flags and the config file
//! add volumes it does not list, and a flag or config entry that names a listed
//! volume must agree with it on what makes the volume's data (backend, path, size,
//! block size, chunk size; `read-only` and `direct` only say how it is served and
//! may change), else the start fails with both values named. `--rebind NAME` makes
//! the flag's spec the new truth (and accepts another base image under existing
//! backups, see `Volume::open_with`).
//!
//! Volumes on `mem` or `null` come back too, empty (their base does not survive
//! a restart, nor do their backups).
//!
//! A deleted volume stays deleted, the zero-configuration default included: `vol0`
//! is only made up for a data dir without a list (a first start, or a data dir of
//! a release before the list existed). After `volume delete vol0` a restart without
//! flags serves what the list holds, possibly nothing (it says so in the log).
//!
//! # Format
//! See `durable::volumes` (private); a format this code does not know is refused,
//! never misread.
//!
//! # Durability
//! A `volume_create` answers after the list naming the volume is durable; a
//! `volume_delete` after the list without it is. A delete removes the volume's
//! manifest first and then the list entry, so a crash between the two brings
//! the volume back at the next start without its backups, never the other way
//! round (a listed-nowhere manifest that a later volume of the name would adopt).

use std::path::Path;

use crate::durable::store::{read_all, replace_atomically, DirStore, Store};
use crate::spec::BackendKind;
use crate::spec::VolumeSpec;

/// The on-disk format moved to [`crate::durable::volumes`] (#12 2A.3); re-exported so
/// paths keep working.
pub(crate) use crate::durable::volumes::{VolumeList, FILE_NAME};

/// The list in `data_dir`; `None` when there is none (a first start, or a data dir
/// of an older release).
pub(crate) fn load(data_dir: &Path) -> Result<Option<VolumeList>, String> {
    let store = DirStore::new(data_dir);
    if !store.exists(FILE_NAME) {
        return Ok(None);
    }
    let what = data_dir.join(FILE_NAME).display().to_string();
    let bytes = read_all(&store, FILE_NAME).map_err(|e| format!("{what}: {e}"))?;
    VolumeList::decode(&bytes).map(Some).map_err(|e| {
        format!(
            "{what}: {e}; the server's volume list cannot be trusted (restore it, or move it \
             away to start from the --volume flags and config file alone)"
        )
    })
}

/// Replaces the list in `data_dir` atomically; durable when it returns Ok.
pub(crate) fn save(data_dir: &Path, list: &VolumeList) -> std::io::Result<()> {
    replace_atomically(&DirStore::new(data_dir), FILE_NAME, &list.encode())
}

/// Removes the manifest, delta and journal files of `name` (every incarnation):
/// `volume_delete` of a volume that was never opened (it failed at start).
pub fn discard_volume_files(data_dir: &Path, name: &str) {
    let store = DirStore::new(data_dir);
    let manifest = crate::durable::manifest::manifest_name(name);
    let files = store.list().unwrap_or_default();
    for f in files
        .iter()
        .filter(|f| **f == manifest || crate::durable::manifest::delta_of_volume(name, f).is_some())
    {
        if let Err(e) = store.remove(f) {
            tracing::warn!(file = %f, error = %e, "cannot remove a file of a deleted volume");
        }
    }
    let _ = store.sync_dir();
}

/// Logs the volumes with backups in the data dir that no list names (created
/// over RPC by a release before the list existed): their spec is not known, so
/// they come back only when configured again.
pub fn warn_unlisted(data_dir: &Path, listed: &[VolumeSpec]) {
    let files = DirStore::new(data_dir).list().unwrap_or_default();
    for f in files {
        let Some(name) = f.strip_suffix(".manifest") else {
            continue;
        };
        if !listed.iter().any(|s| s.name == name) {
            tracing::warn!(volume = name, "the data dir holds backups of a volume that is not configured; serve it again with --volume {name}=PATH (its base image) to get them back");
        }
    }
}

/// Where a volume to open at start comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The persisted list (possibly with a flag's serving options).
    List,
    /// `--volume` or the config file, not in the list.
    Config,
}

/// The volumes to open at start: see the module docs. `implicit`: `config` is the
/// zero-configuration default, which only a data dir without a list gets.
pub(crate) fn reconcile(
    list: Option<&VolumeList>,
    config: &[VolumeSpec],
    implicit: bool,
    rebind: &[String],
    list_path: &Path,
) -> Result<Vec<(VolumeSpec, Origin)>, String> {
    let Some(list) = list else {
        return Ok(config.iter().map(|s| (s.clone(), Origin::Config)).collect());
    };
    let mut out: Vec<(VolumeSpec, Origin)> = list
        .volumes
        .iter()
        .map(|s| (s.clone(), Origin::List))
        .collect();
    if implicit {
        return Ok(out);
    }
    for (i, c) in config.iter().enumerate() {
        if config[..i].iter().any(|x| x.name == c.name) {
            return Err(format!("volume {:?} is configured twice", c.name));
        }
        let Some(slot) = out.iter_mut().find(|(s, _)| s.name == c.name) else {
            out.push((c.clone(), Origin::Config));
            continue;
        };
        if rebind.contains(&c.name) {
            slot.0 = c.clone();
            continue;
        }
        if let Some(why) = differs(&slot.0, c) {
            return Err(format!(
                "volume {:?}: {why}. The data dir's volume list {} is what ran last: \
                 give the same values, delete the volume first (ringblk-ctl volume delete {}), \
                 or start with --rebind {} to make the new values the volume's",
                c.name,
                list_path.display(),
                c.name,
                c.name
            ));
        }
        slot.0.read_only = c.read_only;
        slot.0.direct = c.direct;
    }
    Ok(out)
}

/// How `given` contradicts `listed` on what makes the volume's data, if it does.
fn differs(listed: &VolumeSpec, given: &VolumeSpec) -> Option<String> {
    let show = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or_else(|| "none".to_string(), |p| p.display().to_string())
    };
    if listed.backend != given.backend {
        return Some(format!(
            "given backend {}, but the volume list says {}",
            given.backend, listed.backend
        ));
    }
    if listed.backend == BackendKind::File && listed.path != given.path {
        return Some(format!(
            "given path {}, but the volume list says {}",
            show(&given.path),
            show(&listed.path)
        ));
    }
    if given.size_bytes.is_some() && given.size_bytes != listed.size_bytes {
        return Some(format!(
            "given size {:?} bytes, but the volume list says {:?}",
            given.size_bytes, listed.size_bytes
        ));
    }
    if listed.block_size != given.block_size || listed.chunk_size != given.chunk_size {
        return Some(format!(
            "given block size {} and chunk size {}, but the volume list says {} and {}",
            given.block_size, given.chunk_size, listed.block_size, listed.chunk_size
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(name: &str, path: &str, size: Option<u64>) -> VolumeSpec {
        crate::spec::parse_volume(&format!("{name}={path}"))
            .map(|mut s| {
                s.size_bytes = size;
                s
            })
            .expect("spec")
    }

    #[test]
    fn the_list_is_the_truth_and_flags_add_to_it() {
        let p = PathBuf::from("/d/volumes.json");
        let l = VolumeList::new(vec![
            spec("a", "/x/a.img", Some(1 << 20)),
            spec("r", "/x/r.img", Some(2 << 20)),
        ]);
        // No list: the flags (or the default) as they are.
        let got = reconcile(None, &[spec("vol0", "/d/vol0.img", None)], true, &[], &p).unwrap();
        assert_eq!(got.len(), 1);
        // A list and only the zero-config default: the list alone (a deleted vol0
        // stays deleted).
        let got = reconcile(
            Some(&l),
            &[spec("vol0", "/d/vol0.img", None)],
            true,
            &[],
            &p,
        )
        .unwrap();
        let names: Vec<_> = got.iter().map(|(s, _)| s.name.as_str()).collect();
        assert_eq!(names, ["a", "r"]);
        // A flag naming a listed volume with the same data; one more volume.
        let mut ro = spec("a", "/x/a.img", None);
        ro.read_only = true;
        let got = reconcile(Some(&l), &[ro, spec("n", "/x/n.img", None)], false, &[], &p).unwrap();
        assert_eq!(got.len(), 3);
        assert!(got[0].0.read_only && got[0].0.size_bytes == Some(1 << 20));
        assert_eq!(got[2], (spec("n", "/x/n.img", None), Origin::Config));
        // Another path: refused, naming both; --rebind takes it.
        let other = spec("a", "/x/other.img", Some(1 << 20));
        let e = reconcile(Some(&l), std::slice::from_ref(&other), false, &[], &p).unwrap_err();
        assert!(e.contains("/x/other.img") && e.contains("/x/a.img"), "{e}");
        assert!(
            e.contains("--rebind a") && e.contains("/d/volumes.json"),
            "{e}"
        );
        let got = reconcile(
            Some(&l),
            std::slice::from_ref(&other),
            false,
            &["a".into()],
            &p,
        )
        .unwrap();
        assert_eq!(got[0].0, other);
        let twice = [spec("n", "/x/n.img", None), spec("n", "/x/n.img", None)];
        let e = reconcile(Some(&l), &twice, false, &[], &p).unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = reconcile(
            Some(&l),
            &[spec("r", "/x/r.img", Some(1 << 20))],
            false,
            &[],
            &p,
        )
        .unwrap_err();
        assert!(e.contains("size"), "{e}");
    }
}
