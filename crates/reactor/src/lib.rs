//! ringblk-reactor: the per-core io_uring event loop every other ringblk crate runs on.
//!
//! One OS thread per configured core ([`ReactorPool`]), each owning one io_uring
//! ([`Reactor`]), an in-flight slab that owns every buffer the kernel may touch until
//! the final CQE, a fixed-buffer pool ([`BufPool`]), pollers, timers and a bounded
//! inbox of messages from other reactors with an eventfd doorbell. No async runtime:
//! the reactor *is* the runtime. See ARCHITECTURE.md §2.
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
