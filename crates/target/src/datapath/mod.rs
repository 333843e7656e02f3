//! The data path: how a started block request becomes reactor operations on the
//! images of a volume.
//!
//! Layer: rank 5. May import `image`, `persist`, `backend`, `buf`, `extent`, `error`,
//! `park`, `stats`. It sees a volume only as [`DataVol`]: its images, its persist
//! and its counters (the volume, rank 6, is above it).
//!
//! There are two paths, and [`view_layers`] is the one place that picks between them:
//! a view with no delta goes to [`fast`] (one I/O on the base, no map lookup, the
//! request's stack pin carried in the callback so a later switchover's drain waits
//! for it); any other to [`layered`] (split at chunk boundaries, resolved against the
//! pinned stack). [`status`] answers block status on both. Nothing a request gets
//! back says which path ran.
//!
//! # Ordering
//! See `layered`'s docs: data before mapping, the drain rule for partial first
//! writes, merging deltas take no new fills. The fast path has no ordering of its
//! own: one operation per request, the kernel's.
//!
//! # Back-pressure
//! Every reactor operation goes through [`submit_io`], which waits for a slab slot
//! rather than failing (counted in `slab_waits`).
//!
//! # Completion
//! The fast path takes its completion as a generic `FnOnce` that moves into the
//! reactor operation's callback: no allocation of its own per request. It may call it
//! before returning (null backend, advisory no-ops); the caller (`bdev`) defers such
//! completions. The layered path boxes its completion once per request.

use std::sync::Arc;

use ringblk_reactor::{Completion, Op, Reactor, Submitted};

use crate::error::BlockError;
use crate::image::{Delta, Images, StackPin};
use crate::persist::Persist;
use crate::stats::counters::{bump, OpCounters};

/// What the data path needs of a volume: its images (base + stack), its committer
/// and its per-reactor counters. `volume::Volume` implements it (in `bdev`).
pub(crate) trait DataVol: 'static {
    fn images(&self) -> &Images;
    fn persist(&self) -> &Persist;
    fn counters(&self, reactor: usize) -> &OpCounters;
}

impl<T: DataVol + ?Sized> DataVol for Arc<T> {
    #[inline]
    fn images(&self) -> &Images {
        (**self).images()
    }

    #[inline]
    fn persist(&self) -> &Persist {
        (**self).persist()
    }

    #[inline]
    fn counters(&self, reactor: usize) -> &OpCounters {
        (**self).counters(reactor)
    }
}

/// A volume held by a multi-step request of the layered path.
pub(crate) type VolRef = Arc<dyn DataVol>;

pub(crate) mod fast;
pub(crate) mod layered;
pub(crate) mod status;

/// Submits one operation of a request of `vol`. When the reactor's slab is full the
/// operation waits for a slot in the reactor's queue (`layered` docs, *Back-pressure*)
/// and the wait is counted in the volume's `slab_waits`; it never fails for lack of
/// room. `cb` runs once, with the operation's result.
#[inline]
pub(crate) fn submit_io<V: DataVol + ?Sized>(
    r: &mut Reactor,
    vol: &V,
    op: Op,
    cb: impl FnOnce(&mut Reactor, Completion) + 'static,
) {
    if r.submit_or_wait(op, cb) == Submitted::Waiting {
        bump(&vol.counters(r.id()).slab_waits, 1);
    }
}

/// Which path a request takes, decided once per request from its pinned stack.
pub(crate) enum Layers {
    /// No delta in the view: the base alone.
    Fast,
    /// The view's deltas, bottom to top (empty for a live write-type request or
    /// flush, which use the pinned stack itself: no per-request copy of the list).
    Layered(Vec<Arc<Delta>>),
}

/// The layers request of `kind` sees through the view `backup` (`None`: live;
/// `Some(id)`: the read-only view of the backup whose delta has id `id`), from its
/// pinned stack: THE branch between the fast and the layered path (plan §2.12).
/// `Err(Removed)` when that backup is being released or gone (released while open).
#[inline]
pub(crate) fn view_layers(
    pin: &StackPin,
    backup: Option<u64>,
    needs_list: bool,
) -> Result<Layers, BlockError> {
    let deltas = &pin.stack().deltas;
    match backup {
        None if deltas.is_empty() => Ok(Layers::Fast),
        None if !needs_list => Ok(Layers::Layered(Vec::new())),
        None => Ok(Layers::Layered(deltas.clone())),
        Some(id) => match deltas.iter().position(|d| d.id == id) {
            // Being released: its merge moves newer data into the layers this view
            // reads, so the view is gone from the moment the delta is marked merging
            // (plan §2.11), not only once the delta has left the stack.
            Some(pos) if deltas[pos].is_merging() => Err(BlockError::Removed),
            Some(0) => Ok(Layers::Fast),
            Some(pos) => Ok(Layers::Layered(deltas[..pos].to_vec())),
            None => Err(BlockError::Removed),
        },
    }
}
