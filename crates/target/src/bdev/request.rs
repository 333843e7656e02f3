//! Block requests and their completion: [`BlockOp`], [`IoResult`], [`Done`], [`IoSink`].
//!
//! # Ownership
//! A request owns its buffers from `submit` until its `done` runs. A read's buffer
//! comes back in [`IoOutput::Read`]; a write's `OwnBuf` is dropped when its I/O is
//! done; on error the layer drops `OwnBuf`s. An `SgList`'s memory belongs to the
//! caller again once `done` has run.

use std::cell::RefCell;
use std::rc::Rc;

use ringblk_reactor::Reactor;

use crate::buf::{DataBuf, OwnBuf};
use crate::error::BlockError;
use crate::extent::Extent;
use crate::ops::IoKind;
use crate::volume::BackupId;

/// Kinds of block status one request may ask for at most.
pub const STATUS_KINDS_MAX: usize = 16;

/// What a block status request describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusKind {
    /// Allocation: `UNALLOCATED` (hole) and `ZEROES` flags.
    Allocation,
    /// `CHANGED` where a delta from the one created at that backup up to the view's
    /// top holds the data. `Err(Invalid)` once that backup is gone or being released.
    ChangedSince(BackupId),
}

/// One block request (plan §2.3). Offsets and lengths are bytes.
#[derive(Debug)]
pub enum BlockOp {
    /// Reads `len` bytes into `into` (at least `len` long).
    Read {
        offset: u64,
        len: u32,
        into: DataBuf,
    },
    /// Writes the first `len` bytes of `data`; `fua`: durable before `done`.
    Write {
        offset: u64,
        len: u32,
        data: DataBuf,
        fua: bool,
    },
    /// Everything completed before is durable when `done` runs.
    Flush,
    /// Advisory discard: the range reads back as old data or zeros after.
    Unmap { offset: u64, len: u64, fua: bool },
    /// Zeros the range. `may_unmap`: it may be deallocated (a hole); `fast_only`:
    /// refuse (`NotSupported`) unless it is quick (no data written).
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    },
    /// One list of extents per kind, same order, all from one pinned stack.
    BlockStatus {
        offset: u64,
        len: u64,
        kinds: Vec<StatusKind>,
        max_extents: u32,
    },
    /// A hint; succeeds at once (O_DIRECT volumes have no page cache to warm).
    Readahead { offset: u64, len: u64 },
    /// Atomically: reads the range, compares it with `compare` and, when equal,
    /// writes `write` (`Miscompare { offset }` of the first differing byte
    /// otherwise). At most `CAW_MAX_BYTES`; live views only (`bdev::lock`).
    CompareAndWrite {
        offset: u64,
        len: u32,
        compare: DataBuf,
        write: DataBuf,
        fua: bool,
    },
}

impl BlockOp {
    pub fn kind(&self) -> IoKind {
        match self {
            BlockOp::Read { .. } => IoKind::Read,
            BlockOp::Write { .. } => IoKind::Write,
            BlockOp::Flush => IoKind::Flush,
            BlockOp::Unmap { .. } => IoKind::Unmap,
            BlockOp::WriteZeroes { .. } => IoKind::WriteZeroes,
            BlockOp::BlockStatus { .. } => IoKind::BlockStatus,
            BlockOp::Readahead { .. } => IoKind::Readahead,
            BlockOp::CompareAndWrite { .. } => IoKind::CompareAndWrite,
        }
    }

    /// `(offset, len)` of the range it touches (`(0, 0)` for a flush).
    pub fn range(&self) -> (u64, u64) {
        match *self {
            BlockOp::Read { offset, len, .. }
            | BlockOp::Write { offset, len, .. }
            | BlockOp::CompareAndWrite { offset, len, .. } => (offset, u64::from(len)),
            BlockOp::Unmap { offset, len, .. }
            | BlockOp::WriteZeroes { offset, len, .. }
            | BlockOp::BlockStatus { offset, len, .. }
            | BlockOp::Readahead { offset, len } => (offset, len),
            BlockOp::Flush => (0, 0),
        }
    }
}

/// A read's data.
#[derive(Debug)]
pub enum ReadData {
    /// The request's buffer, holding the data.
    Data(DataBuf),
    /// The request's own buffer, untouched: the range reads as zeros (a null or
    /// hole base). A front end may send zeros without reading it (NBD: a hole chunk).
    /// An SG list is zeroed instead and comes back as `Data`.
    Zeroes(OwnBuf),
}

/// What a successful request returns.
#[derive(Debug)]
pub enum IoOutput {
    /// Write, flush, unmap, write zeroes, readahead.
    Complete,
    Read(ReadData),
    /// One list per `StatusKind` of the request, same order (plan §2.9).
    Status(Vec<Vec<Extent>>),
}

pub type IoResult = Result<IoOutput, BlockError>;

/// Where a front end gets its results: one sink per session, `tag` names the request
/// (SPDK's `cb` + `cb_arg`; no allocation per request).
pub trait IoSink {
    fn complete(&self, r: &mut Reactor, tag: u64, res: IoResult);
}

/// A request's completion: runs exactly once, on the submitting reactor, never inside
/// `Channel::submit`.
pub struct Done {
    sink: Rc<dyn IoSink>,
    tag: u64,
}

impl Done {
    pub fn new(sink: Rc<dyn IoSink>, tag: u64) -> Done {
        Done { sink, tag }
    }

    /// A completion from a closure (boxes it: for tests and internal clients).
    pub fn from_fn(f: impl FnOnce(&mut Reactor, IoResult) + 'static) -> Done {
        let sink: Rc<dyn IoSink> = Rc::new(FnSink(RefCell::new(Some(Box::new(f)))));
        Done { sink, tag: 0 }
    }

    pub(crate) fn run(self, r: &mut Reactor, res: IoResult) {
        self.sink.complete(r, self.tag, res)
    }
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done").field("tag", &self.tag).finish()
    }
}

type DoneFn = Box<dyn FnOnce(&mut Reactor, IoResult)>;

struct FnSink(RefCell<Option<DoneFn>>);

impl IoSink for FnSink {
    fn complete(&self, r: &mut Reactor, _tag: u64, res: IoResult) {
        let f = self.0.borrow_mut().take();
        if let Some(f) = f {
            f(r, res)
        }
    }
}
