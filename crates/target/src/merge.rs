//! Release merges: folding a released backup's delta into the layer beneath it
//! (ARCHITECTURE.md §5; `switchover`: # Release), and resuming the merges a stop
//! interrupted.
//!
//! Layer: rank 9; imports `drain` (rounds, `SwitchError`), `volume`, `image` and
//! below. `switchover` (10) starts merges through it.
//!
//! # Ordering
//! Mark the delta merging, drain (every request sees the mark), copy each mapped
//! chunk down — publishing the copy below before unmapping it above, so a reader
//! never finds neither — then make the copies durable, drop the delta from the
//! manifest, drop it from the stack in one more swap, and drain again. Per-chunk
//! `MERGING` in the block map orders the copy against in-place writes.
//!
//! # Threads
//! A merge runs on a control thread of its own with blocking I/O; merges of one
//! volume serialise on `Volume::merge_lock`. A deleted volume's merge stops
//! between chunks (`check_live`).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use ringblk_blockmap::{BeginMerge, BlockMap, Claim, Park};
use ringblk_reactor::ReactorHandle;

use crate::drain::{finish_round, start_round, SwitchError};
use crate::image::{Delta, Stack};
use crate::volume::{BackupState, Control, Volume};

/// Hands the data file of a merged delta to the next backup (as the prepared
/// delta), so that its written prefix spares the next delta's fills the zero-ahead
/// writes, which otherwise double the bytes a fresh delta writes. Only after the
/// final drain: from then on no request can read or write the merged delta.
/// A prepared delta that was never used is replaced when the merged file has more
/// written space (it has none unless it is itself a reused file).
fn reuse_for_next(ctl: &mut Control, vol: &Volume, merged: &Delta) {
    if vol.read_only() || vol.is_removed() {
        return;
    }
    let have = ctl.prepared.as_ref().map_or(0, |p| p.zeroed_bytes());
    if merged.zeroed_bytes() <= have {
        return;
    }
    let Some(zeroed) = merged.take_for_reuse() else {
        return;
    };
    match vol.new_delta(ctl, Some((merged, zeroed))) {
        Ok(d) => {
            d.set_discard(true);
            tracing::debug!(
                volume = vol.name(),
                delta = d.id,
                zeroed,
                "merged delta file reused"
            );
            // The unused one it replaces deletes its files on drop (discard).
            ctl.prepared = Some(d);
        }
        Err(e) => {
            tracing::debug!(volume = vol.name(), error = %e, "merged delta file not reused")
        }
    }
}

/// Starts merging backup `name`'s delta down on a thread of its own (a release,
/// or a `resumed` one that was merging when the server stopped). The outcome goes
/// to the log: the backup disappears from the volume's list when it is done, and
/// stays `merging` when it fails.
pub(crate) fn spawn(
    reactors: Arc<[ReactorHandle]>,
    vol: &Arc<Volume>,
    name: &str,
    resumed: bool,
) -> std::io::Result<()> {
    let (vol2, name2) = (vol.clone(), name.to_string());
    std::thread::Builder::new()
        .name(format!("merge-{}", vol.name()))
        .spawn(move || match merge(&reactors, &vol2, &name2) {
            Ok(()) => {}
            Err(SwitchError::VolumeDeleted(_)) => merge_stopped(&vol2, &name2),
            Err(e) if resumed => {
                tracing::error!(volume = vol2.name(), backup = %name2, error = %e, "resumed merge failed; backup left merging")
            }
            Err(e) => {
                tracing::error!(volume = vol2.name(), backup = %name2, error = %e, "merge failed; backup left merging")
            }
        })
        .map(drop)
}

/// Resumes the releases that were merging when the server stopped (recovery).
pub fn resume_merges(reactors: &Arc<[ReactorHandle]>, vol: &Arc<Volume>) {
    let names: Vec<String> = {
        let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        ctl.backups
            .iter()
            .filter(|b| b.state == BackupState::Merging)
            .map(|b| b.name.clone())
            .collect()
    };
    for name in names {
        tracing::info!(volume = vol.name(), backup = %name, "resuming the release of a backup that was merging");
        let spawned = spawn(reactors.clone(), vol, &name, true);
        if let Err(e) = spawned {
            tracing::error!(volume = vol.name(), error = %e, "cannot start a merge thread");
        }
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

fn merge_stopped(vol: &Volume, backup: &str) {
    tracing::info!(
        volume = vol.name(),
        backup,
        "merge stopped: the volume was deleted"
    );
}

/// Fails once `volume_delete` removed the volume: a deleted volume's merge must
/// not go on writing into a base that a volume created again under its name (or
/// anyone else) may now own. Checked before each chunk, so it stops between
/// chunks, never inside one.
fn check_live(vol: &Volume) -> Result<(), SwitchError> {
    match vol.is_removed() {
        true => Err(SwitchError::VolumeDeleted(vol.name().to_string())),
        false => Ok(()),
    }
}

pub(crate) fn merge(
    reactors: &[ReactorHandle],
    vol: &Arc<Volume>,
    name: &str,
) -> Result<(), SwitchError> {
    let _serial = vol.merge_lock.lock().unwrap_or_else(|p| p.into_inner());
    check_live(vol)?;
    let t0 = Instant::now();
    let ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    let (delta, below) = vol
        .with_stack(&ctl, |s| {
            let pos = s.deltas.iter().position(|d| d.backup == name);
            pos.map(|i| {
                (
                    s.deltas[i].clone(),
                    i.checked_sub(1).map(|j| s.deltas[j].clone()),
                )
            })
        })
        .ok_or_else(|| SwitchError::NotFound(vol.name().into(), name.into()))?;
    drop(ctl);
    // A restart resumes the merge: the manifest says so before any chunk moves.
    if let Some(m) = vol.persist.manifest() {
        m.update(|m| {
            for d in m.deltas.iter_mut().filter(|d| d.id == delta.id) {
                d.state = crate::durable::manifest::DeltaState::Merging;
            }
        });
    }
    vol.persist.write_manifest()?;
    // Every request must see `merging` before chunks move: mark, then drain the
    // requests admitted before the mark, via a no-op stack swap.
    delta.set_merging();
    {
        let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        let deltas = vol.with_stack(&ctl, |s| s.deltas.clone());
        let epoch = ctl.next_epoch;
        ctl.next_epoch += 1;
        vol.publish(&ctl, Stack::new(epoch, deltas, vol.reactors()));
        let round = start_round(reactors, vol, &ctl)?;
        // However long it takes (a request of an older epoch may be slow): a
        // release is not given up for a slow request; `control` is free meanwhile.
        drop(ctl);
        round.wait_done()?;
        let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
        finish_round(&mut ctl, vol, &round);
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let cb = vol.chunk_bytes() as u64;
    let src = dup_file(delta.raw_fd())?;
    let dst_fd = below
        .as_ref()
        .map(|d| d.raw_fd())
        .or(vol.backend().raw_fd());
    let dst = dst_fd.map(dup_file).transpose()?;
    let mut buf = ringblk_reactor::AlignedBuf::direct(cb as usize);
    let mut merged = 0u64;
    let cap = delta.map.capacity();
    loop {
        let chunks: Vec<u64> = delta.map.iter(0, cap).map(|(c, _)| c).collect();
        if chunks.is_empty() {
            break;
        }
        for c in chunks {
            check_live(vol)?;
            let guard = loop {
                match BlockMap::begin_merge_shared(&delta.map, c) {
                    Ok(BeginMerge::Started(g)) => break Some(g),
                    Ok(BeginMerge::Unmapped) | Err(_) => break None,
                    Ok(BeginMerge::Busy(_)) => {
                        if let Ok(Park::Parked) = delta.map.park(c, &waker) {
                            std::thread::park_timeout(Duration::from_millis(5));
                        }
                    }
                }
            };
            let Some(mut g) = guard else { continue };
            while let Park::Parked = g.poll_drained(&waker) {
                std::thread::park_timeout(Duration::from_millis(5));
            }
            src.read_exact_at(buf.as_mut_slice(), g.physical() * cb)?;
            // Publish the copy below first.
            match (&below, &dst) {
                (Some(b), Some(dst)) => copy_into_delta(b, dst, c, cb, buf.as_slice(), &waker)?,
                (None, Some(dst)) => {
                    let end = ((c + 1) * cb).min(vol.size_bytes());
                    dst.write_all_at(&buf.as_slice()[..(end - c * cb) as usize], c * cb)?
                }
                _ => {} // null base: nothing to keep
            }
            // Before the unmap is visible (journal order = map order); the commit
            // writes it only after the copy's own records below (durable::commit).
            delta.journal(ringblk_blockmap::MapRecord::Unmap { logical: c });
            loop {
                match g.finish() {
                    Ok(()) => break,
                    Err(back) => {
                        g = back;
                        std::thread::park_timeout(Duration::from_millis(1));
                    }
                }
            }
            merged += 1;
        }
    }
    // The copies (data and their mappings below) and the unmaps are durable before
    // the manifest forgets the delta.
    let _ = dst;
    check_live(vol)?;
    vol.persist.commit_blocking()?;
    if let Some(m) = vol.persist.manifest() {
        m.update(|m| m.deltas.retain(|d| d.id != delta.id));
    }
    vol.persist.write_manifest()?;
    vol.persist.remove_delta(delta.id);
    delta.set_merged();
    // Drop the empty delta in one stack swap, then drain and free.
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    let deltas: Vec<Arc<Delta>> = vol.with_stack(&ctl, |s| {
        s.deltas
            .iter()
            .filter(|d| d.id != delta.id)
            .cloned()
            .collect()
    });
    let epoch = ctl.next_epoch;
    ctl.next_epoch += 1;
    vol.publish(&ctl, Stack::new(epoch, deltas, vol.reactors()));
    let round = start_round(reactors, vol, &ctl)?;
    drop(ctl);
    round.wait_done()?;
    let mut ctl = vol.control.lock().unwrap_or_else(|p| p.into_inner());
    finish_round(&mut ctl, vol, &round);
    ctl.backups.retain(|b| b.name != name);
    reuse_for_next(&mut ctl, vol, &delta);
    drop(ctl);
    tracing::info!(
        volume = vol.name(),
        backup = name,
        chunks = merged,
        ms = t0.elapsed().as_millis() as u64,
        "backup released"
    );
    Ok(())
}

/// An owned duplicate of a descriptor the volume keeps open.
fn dup_file(fd: std::os::fd::RawFd) -> std::io::Result<File> {
    // SAFETY: dup of a descriptor owned (and kept open) by the delta or backend.
    let d = unsafe { libc::dup(fd) };
    if d < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `d` is a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(d) })
}

/// Writes one chunk into delta `b` (the merge target): in place if `b` holds the
/// chunk, else into a newly allocated chunk, published after the data is written.
fn copy_into_delta(
    b: &Delta,
    dst: &File,
    c: u64,
    cb: u64,
    data: &[u8],
    waker: &Waker,
) -> Result<(), SwitchError> {
    loop {
        match BlockMap::claim_shared(&b.map, c) {
            Ok(Claim::Mapped(pin)) => {
                dst.write_all_at(data, pin.physical() * cb)?;
                return Ok(());
            }
            Ok(Claim::Fill(g)) => {
                let Some(p) = b.alloc(1) else {
                    g.abort();
                    return Err(SwitchError::Io(std::io::Error::from_raw_os_error(
                        libc::ENOSPC,
                    )));
                };
                if let Err(e) = zeroed_blocking(b, dst, p, cb) {
                    g.abort();
                    return Err(SwitchError::Io(e));
                }
                dst.write_all_at(data, p * cb)?;
                b.journal(ringblk_blockmap::MapRecord::Install {
                    logical: c,
                    physical: p,
                });
                g.publish(p)
                    .map_err(|e| SwitchError::Io(std::io::Error::other(e.to_string())))?;
                return Ok(());
            }
            Ok(Claim::Busy(_)) => {
                if let Ok(Park::Parked) = b.map.park(c, waker) {
                    std::thread::park_timeout(Duration::from_millis(5));
                }
            }
            Err(e) => return Err(SwitchError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

/// Waits until physical chunk `p` of `b` may be written (`Delta::fill_ready`),
/// doing the zero-ahead write itself when it is due (blocking: the merge thread).
fn zeroed_blocking(b: &Delta, dst: &File, p: u64, cb: u64) -> std::io::Result<()> {
    loop {
        if let Some((off, len)) = b.zero_due(p, cb) {
            let zeros = ringblk_reactor::AlignedBuf::direct(len as usize);
            let res = dst.write_all_at(zeros.as_slice(), off);
            b.zero_done(len, res.is_ok());
        }
        if b.fill_ready(p, cb) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}
