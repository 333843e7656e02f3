//! ringblk-reactor: the per-core io_uring event loop every other ringblk crate runs on.
//!
//! One OS thread per configured core ([`ReactorPool`]), each owning one io_uring
//! ([`Reactor`]), an in-flight slab that owns every buffer the kernel may touch until
//! the final CQE, a fixed-buffer pool ([`BufPool`]), pollers, timers and a bounded
//! inbox of messages from other reactors with an eventfd doorbell. No async runtime:
//! the reactor *is* the runtime. See ARCHITECTURE.md §2.
//!
//! # Layer
//! The bottom of the workspace: every other ringblk crate runs on it, and it imports
//! none of them. It may import std, io-uring, libc, nix, crossbeam-channel,
//! core_affinity, thiserror and tracing; it knows no volume, image or protocol.
//!
//! # Ownership
//! Each [`Reactor`] is `!Send` and touched only by its own thread; other threads
//! reach it through a [`ReactorHandle`] (messages). Every buffer and file an op
//! names moves into the in-flight slab and stays there until the op's final CQE,
//! whatever happens to its callback (cancel, orphan, shutdown): the kernel never
//! writes into freed memory. The op, buffers included, comes back in its
//! [`Completion`]. A [`ForeignBuf`] is the exception: caller memory on loan, which
//! its caller keeps valid until the callback runs (so it cancels, never orphans).
//!
//! # Back-pressure
//! Every queue is bounded. A full slab hands the op back from [`Reactor::submit`]
//! ([`Rejected`]) or parks it in a FIFO with [`Reactor::submit_or_wait`]; a full SQ
//! keeps SQEs in a backlog bounded by the slab; a full inbox refuses
//! [`ReactorHandle::send`] (`SendError::Full`), and [`Reactor::send_to`] retries it
//! from a timer instead of blocking one reactor on another (`reactor` module docs).
//!
//! # Ordering
//! Ops complete in any order; callbacks run one at a time on the reactor's thread,
//! never inside another callback. Waiting ops start in the order they waited.
//! Messages a sender's `send` got into the inbox run in that order; a `send_to`
//! retried from a timer may run after later ones.
//!
//! # Cancellation
//! [`Reactor::cancel`] asks the kernel; the callback still runs once, with the op's
//! real final result. [`Reactor::orphan`] drops the callback too. A waiting op
//! (no slot yet) cannot be cancelled: it owns no kernel resource.
//!
//! # Panics
//! Nothing a client, a disk or the kernel does makes the reactor panic: I/O results
//! are delivered as errno values, full queues are back-pressure. Panics are reserved
//! for programming errors (an op built with a length past its buffer).

mod buffers;
mod config;
mod iopoll;
mod msg;
mod op;
mod pool;
mod reactor;
mod slab;

pub use buffers::{AlignedBuf, BufPool, ForeignBuf, IoBuf, PoolBuf, DIRECT_IO_ALIGN};
pub use config::{IdlePolicy, ReactorConfig, SubmitPolicy};
pub use iopoll::{probe_iopoll, IopollSupport};
pub use msg::{Msg, ReactorHandle, ReactorStats, ReactorStatsSnapshot, SendError};
pub use op::{falloc, Completion, FileRef, Op, SockAddrBuf};
pub use pool::{manual_reactors, Init, ReactorPool};
pub use reactor::{
    ForEachFn, ForEachNext, PollResult, PollerId, Reactor, Rejected, Submitted, TimerId,
};
pub use slab::{Callback, OpId};

/// Errors setting up reactors. I/O errors of operations are not here: they come
/// back as errno values in [`Completion`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReactorError {
    #[error("invalid reactor configuration: {0}")]
    Config(String),
    #[error("{0} failed: {1}")]
    Ring(&'static str, #[source] std::io::Error),
}
