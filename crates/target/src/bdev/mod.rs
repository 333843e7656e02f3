//! The block I/O API: how a front end (NBD, later vhost or iSCSI) or an internal
//! client reads and writes a volume without knowing images, maps or backends
//! (SPDK's `lib/bdev`; plan #12 §2).
//!
//! Layer: rank 8. May import everything of rank ≤ 7 (`volume`, `datapath`, `stats`,
//! `fault`, `buf`, `image`, …). Front ends import only this module and the
//! vocabulary (`error`, `extent`, `ops`, `stats::Label`).
//!
//! - [`Bdev`]: one volume seen through one [`View`] (live, or a backup's read-only
//!   frozen image), opened by one front end with its stats [`Label`]. `Send + Sync`.
//! - [`Channel`]: that volume's per-reactor submission queue (`!Send`), from
//!   [`Bdev::channel`]. A session keeps its channel for its life.
//! - [`BlockOp`] in, [`IoResult`] out through [`Done`]: an [`IoSink`] plus a tag
//!   (no allocation per request), or [`Done::from_fn`] (boxes; tests, internal).
//!
//! # Usage
//! ```text
//! let label = Label::register("vhost")?;                     // once, control plane
//! let bdev = Bdev::open(volume, View::Live, label)?;        // per session
//! let ch = bdev.channel(r);                                  // on the session's reactor
//! let mut buf = ch.alloc(r, 4096);                           // pool buffer if it fits
//! buf.as_mut_slice()[..4096].fill(7);
//! let op = BlockOp::Write { offset: 0, len: 4096, data: buf.into(), fua: false };
//! let done = Done::new(sink.clone(), slot as u64);           // sink: Rc<dyn IoSink>
//! if ch.submit(r, &bdev, op, done) == Pressure::Full {
//!     stop_reading();                                        // queued, not refused
//!     ch.when_room(r, move |r| resume_reading(r));
//! }
//! // later, on this reactor: sink.complete(r, slot, Ok(IoOutput::Complete))
//! ```
//!
//! # Contracts
//! - **Validation** happens in `submit` only: `checked_add` of offset + length, the
//!   end against the size (`OutOfRange`), `len ≤ max_io_bytes` (`TooLarge`), block
//!   alignment of data ops (`Invalid`), a write-type op on a read-only view
//!   (`ReadOnly`), buffers at least `len` long (`Invalid`).
//! - **Completion**: `done` runs exactly once, on the submitting reactor, and never
//!   inside `submit`: results known at submit time (validation errors, faults, null
//!   backend, readahead, advisory unmaps) go through a reactor-local ready queue
//!   drained by a poller in the same `poll_once`. No recursion, bounded stack.
//! - **Back-pressure**: a valid request is never failed for lack of room. `submit`
//!   returns [`Pressure::Full`] when the channel has [`CHANNEL_DEPTH`] requests
//!   started or others waiting; the request is queued (FIFO) and starts as others
//!   complete. A front end should then stop reading and call [`Channel::when_room`].
//! - **Ordering**: requests start in submission order per channel; they complete in
//!   any order. A write completed before a flush was submitted is durable when the
//!   flush completes (on any channel of the volume).
//! - **Views**: a backup view is read-only and reads the frozen stack; once the
//!   backup is released its requests fail with `Removed`.
//!
//! # Departures from the plan (step 3, for now)
//! Channels are created lazily by the first `Bdev::channel(r)` on a reactor and live
//! while someone holds them (a reactor-local table of weak references), not in
//! `Target::add_volume`'s round. CompareAndWrite (`lock.rs`) grants one CAW per
//! volume at a time rather than one per overlapping range, and runs its
//! read-compare-write in `lock.rs` rather than `datapath/caw.rs`. Per-label
//! histograms and the buffer budget in `OwnBuf` come later.

use std::sync::Arc;

use ringblk_reactor::Reactor;

use crate::error::BlockError;
use crate::stats::Label;
use crate::volume::{Volume, PAYLOAD_MAX_BYTES};

mod channel;
mod lock;
mod request;

pub use crate::buf::{needs_bounce, DataBuf, OwnBuf, SgList, SG_SEGS_MAX};
pub use crate::events::{BdevEvent, Subscription};
pub use crate::volume::{BackupId, View};
pub use channel::{Channel, Pressure, CHANNEL_DEPTH};
pub use lock::CAW_MAX_BYTES;
pub use request::{
    BlockOp, Done, IoOutput, IoResult, IoSink, ReadData, StatusKind, STATUS_KINDS_MAX,
};

/// Installs the block layer on reactor `r` (its ready-queue poller); otherwise done
/// by the first `Bdev::channel` there. A front end that adds pollers of its own which
/// must run after the layer's completions in each loop iteration calls this first.
pub fn install(r: &mut Reactor) {
    channel::install(r);
}

/// Why `Target::open` found nothing to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    #[error("no such volume or backup")]
    NotFound,
    #[error("the backup is not ready yet (its old epoch is still draining)")]
    NotReady,
    #[error("the volume or backup is being removed")]
    Removed,
}

/// Sizes a front end advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size_bytes: u64,
    pub block_size: u32,
    pub optimal_io_bytes: u32,
    /// Largest read or write (32 MiB).
    pub max_io_bytes: u32,
    /// Memory alignment of O_DIRECT buffers (SG segments not aligned to it bounce).
    pub mem_align: u32,
}

/// What a view supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub read_only: bool,
    pub unmap: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub flush: bool,
    pub fua: bool,
    pub readahead: bool,
    pub compare_and_write: bool,
    /// A flush on one channel covers writes completed on every channel (NBD
    /// CAN_MULTI_CONN).
    pub flush_covers_all_channels: bool,
    pub rotational: bool,
}

/// One volume through one view, opened by one front end. Cheap to clone.
#[derive(Clone)]
pub struct Bdev(Arc<BdevInner>);

struct BdevInner {
    vol: Arc<Volume>,
    view: View,
    label: Label,
    name: String,
}

impl std::fmt::Debug for Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bdev")
            .field("name", &self.0.name)
            .field("view", &self.0.view)
            .finish()
    }
}

impl Bdev {
    /// Opens `vol` through `view`. A backup view must be of a ready backup
    /// (`Removed` otherwise).
    pub fn open(vol: Arc<Volume>, view: View, label: Label) -> Result<Bdev, BlockError> {
        let name = match view {
            View::Live => vol.name().to_string(),
            View::Backup(id) => {
                let b = vol
                    .ready_backups()
                    .into_iter()
                    .find(|b| vol.ready_backup_delta(b) == Some(id.0))
                    .ok_or(BlockError::Removed)?;
                format!("{}@{b}", vol.name())
            }
        };
        Ok(Bdev(Arc::new(BdevInner {
            vol,
            view,
            label,
            name,
        })))
    }

    /// Opens ready backup `backup` of `vol` by name.
    pub fn open_backup(vol: Arc<Volume>, backup: &str, label: Label) -> Result<Bdev, BlockError> {
        let id = vol.ready_backup_delta(backup).ok_or(BlockError::Removed)?;
        Bdev::open(vol, View::Backup(BackupId(id)), label)
    }

    /// Canonical name: `vol` or `vol@backup`.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    pub fn view(&self) -> View {
        self.0.view
    }

    pub fn label(&self) -> Label {
        self.0.label
    }

    pub fn geometry(&self) -> Geometry {
        let v = &self.0.vol;
        Geometry {
            size_bytes: v.size_bytes(),
            block_size: v.block_size(),
            optimal_io_bytes: v.block_size().max(4096),
            max_io_bytes: PAYLOAD_MAX_BYTES,
            mem_align: channel::mem_align_of(v),
        }
    }

    pub fn capabilities(&self) -> Capabilities {
        let v = &self.0.vol;
        let live = self.0.view == View::Live;
        let punch = live && v.backend().can_punch();
        Capabilities {
            read_only: !live || v.read_only(),
            unmap: punch,
            write_zeroes: live,
            fast_zero: punch,
            flush: true,
            fua: true,
            readahead: true,
            compare_and_write: live && !v.read_only(),
            flush_covers_all_channels: true,
            rotational: false,
        }
    }

    /// This reactor's channel of the volume (created on first use here).
    pub fn channel(&self, r: &mut Reactor) -> Channel {
        channel::channel_of(r, &self.0.vol)
    }

    pub(crate) fn volume(&self) -> &Arc<Volume> {
        &self.0.vol
    }

    /// The backup delta id of a backup view.
    pub(crate) fn backup_delta(&self) -> Option<u64> {
        match self.0.view {
            View::Live => None,
            View::Backup(id) => Some(id.0),
        }
    }

    /// Whether write-type requests are refused.
    pub(crate) fn is_read_only(&self) -> bool {
        self.0.view != View::Live || self.0.vol.read_only()
    }
}
