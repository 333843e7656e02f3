//! What the NBD handshake offers: [`NbdExports`], the [`ExportCatalog`] over the
//! block layer's [`Target`], the `ExportInfo` of a volume or backup, and the metadata
//! contexts (`base:allocation`, `x-ringblk:changed/NAME`) with their bindings.
//!
//! Layer: the NBD front end; imports the block layer's public API (`target`, `bdev`,
//! `volume`, `stats::Label`) and this crate's handshake types. The layer knows no
//! export: it gives names, sizes (`bdev::Geometry`), what a view supports
//! (`bdev::Capabilities`) and the ready backups with their delta ids; the NBD words
//! for them are chosen here. Moved from the target crate (`impl ExportCatalog for
//! Registry` in target.rs, `Volume::{export_info, backup_export_info}` and
//! `META_CHANGED_PREFIX` in volume.rs) in #12 step 5.2.
//!
//! # Threads
//! Read by every reactor's handshakes; it only takes the registry's and the volumes'
//! read locks, never `control` (held across drains that wait for those reactors).

use std::sync::Arc;

use ringblk_target::bdev::{Bdev, View};
use ringblk_target::stats::Label;
use ringblk_target::target::Target;
use ringblk_target::volume::Volume;

use crate::{proto, ExportCatalog, ExportInfo};

/// Metadata context prefix of "chunks changed since backup NAME" (incremental
/// backup): `x-ringblk:changed/NAME`, flags bit 0 set on changed chunks.
pub const META_CHANGED_PREFIX: &str = "x-ringblk:changed/";

/// The handshake's export catalog: every volume of `target` (`VOL`) and every ready
/// backup of it (`VOL@BACKUP`, read-only).
pub struct NbdExports {
    target: Arc<Target>,
}

impl NbdExports {
    pub fn new(target: Arc<Target>) -> NbdExports {
        NbdExports { target }
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }
}

/// What the handshake tells clients about volume `v`'s live export: its geometry
/// and capabilities as the block layer gives them for a live view.
pub fn export_info(v: &Arc<Volume>) -> ExportInfo {
    // A live view always opens (only a backup view can be gone); it submits nothing.
    let bdev = Bdev::open(v.clone(), View::Live, Label::INTERNAL).ok();
    let geo = bdev.as_ref().map(Bdev::geometry);
    let caps = bdev.as_ref().map(Bdev::capabilities);
    let bs = v.block_size();
    ExportInfo {
        name: v.name().to_string(),
        description: format!("ringblk {} volume", v.spec().backend),
        size_bytes: v.size_bytes(),
        read_only: v.read_only(),
        block_size_min: bs,
        block_size_preferred: geo.map_or(bs.max(4096), |g| g.optimal_io_bytes),
        block_size_max: geo.map_or(proto::PAYLOAD_MAX_BYTES, |g| g.max_io_bytes),
        can_trim: caps.is_some_and(|c| c.unmap),
        can_write_zeroes: caps.is_none_or(|c| c.write_zeroes),
        can_fast_zero: caps.is_some_and(|c| c.fast_zero),
        can_cache: caps.is_none_or(|c| c.readahead),
        can_multi_conn: caps.is_none_or(|c| c.flush_covers_all_channels),
        can_flush: caps.is_none_or(|c| c.flush),
        can_fua: caps.is_none_or(|c| c.fua),
        rotational: caps.is_some_and(|c| c.rotational),
    }
}

/// The read-only export of backup `backup` of `v` (`VOL@BACKUP`).
pub fn backup_export_info(v: &Arc<Volume>, backup: &str) -> ExportInfo {
    let mut info = export_info(v);
    info.name = format!("{}@{backup}", v.name());
    info.description = format!("ringblk backup {backup} of {}", v.name());
    info.read_only = true;
    info.can_trim = false;
    info.can_write_zeroes = false;
    info.can_fast_zero = false;
    info
}

impl ExportCatalog for NbdExports {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let (v, backup) = self.target.registry().resolve(name)?;
        Some(match backup {
            None => export_info(&v),
            Some(b) => backup_export_info(&v, &b),
        })
    }

    fn list(&self) -> Vec<ExportInfo> {
        let mut out = Vec::new();
        for v in self.target.registry().list() {
            out.push(export_info(&v));
            let ready = v.ready_backups();
            out.extend(ready.iter().map(|b| backup_export_info(&v, b)));
        }
        out
    }

    /// `base:allocation` everywhere; `x-ringblk:changed/NAME` for every ready backup
    /// NAME taken before the export's own point in time: all of them for the live
    /// volume, the older ones for a backup's export. A backup being released is no
    /// longer ready, so its context is no longer offered (see `io::changed_layers`).
    fn meta_contexts(&self, export: &str) -> Vec<String> {
        let mut out = vec![proto::META_BASE_ALLOCATION.to_string()];
        if let Some((v, backup)) = self.target.registry().resolve(export) {
            // In switch order: backups become ready one at a time, under `control`.
            let ready = v.ready_backups();
            let upto = match backup {
                None => ready.len(),
                Some(b) => ready.iter().position(|x| *x == b).unwrap_or(0),
            };
            out.extend(
                ready[..upto]
                    .iter()
                    .map(|x| format!("{META_CHANGED_PREFIX}{x}")),
            );
        }
        out
    }

    /// `x-ringblk:changed/NAME`: the id of the delta above backup NAME now, so that
    /// the context keeps meaning that backup after a new one takes its name (0: none).
    fn meta_context_binding(&self, export: &str, context: &str) -> u64 {
        let Some(since) = context.strip_prefix(META_CHANGED_PREFIX) else {
            return 0;
        };
        self.target
            .registry()
            .resolve(export)
            .and_then(|(v, _)| v.ready_backup_delta(since))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringblk_target::spec::VolumeSpec;

    /// What the handshake offers for live volumes: the `ExportInfo` that
    /// `Volume::export_info` gave before it moved here (typed out), the default
    /// export, the contexts and bindings of a volume without backups, and no export
    /// for a name that is not there.
    #[test]
    fn live_exports_are_described_as_before_the_move() {
        let dir = tempfile::tempdir().expect("tmp");
        let target = Arc::new(Target::new(dir.path().to_path_buf(), 1, 64));
        let parse = |s: &str| s.parse::<VolumeSpec>().expect("spec");
        target
            .add_volume(parse("v=,backend=mem,size=1M,block-size=512"))
            .expect("v");
        target
            .add_volume(parse("w=,backend=null,size=1M,block-size=4096,ro"))
            .expect("w");
        let exports = NbdExports::new(target.clone());
        let want = |name: &str, kind: &str, bs: u32, read_only: bool| ExportInfo {
            name: name.to_string(),
            description: format!("ringblk {kind} volume"),
            size_bytes: 1 << 20,
            read_only,
            block_size_min: bs,
            block_size_preferred: bs.max(4096),
            block_size_max: 32 << 20,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
            can_flush: true,
            can_fua: true,
            rotational: false,
        };
        let (v, w) = (want("v", "mem", 512, false), want("w", "null", 4096, true));
        assert_eq!(exports.lookup("v"), Some(v.clone()));
        assert_eq!(exports.lookup("w"), Some(w.clone()));
        // The default export is the first volume.
        assert_eq!(exports.lookup(""), Some(v.clone()));
        assert_eq!(exports.lookup("x"), None);
        assert_eq!(exports.lookup("v@b"), None);
        let mut list = exports.list();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(list, [v, w]);
        assert_eq!(exports.meta_contexts("v"), [proto::META_BASE_ALLOCATION]);
        assert_eq!(exports.meta_context_binding("v", "x-ringblk:changed/b"), 0);
        // A backup's export is its volume's, read-only, with nothing that writes.
        let vol = target.registry().get("v").expect("v");
        let b = backup_export_info(&vol, "b");
        assert_eq!((b.name.as_str(), b.read_only), ("v@b", true));
        assert_eq!(b.description, "ringblk backup b of v");
        assert!(!b.can_trim && !b.can_write_zeroes && !b.can_fast_zero);
        assert_eq!(
            (b.size_bytes, b.block_size_min, b.can_flush),
            (1 << 20, 512, true)
        );
    }
}
