//! ringblk-nbd: the NBD protocol. Its codec is sans-IO: bytes in, events and replies
//! out; no sockets, no threads, no clocks, no storage. With the feature `frontend`
//! (default) it is also the NBD front end of the block layer: sessions on reactors.
//!
//! # What this crate may import
//! The codec (every module but `frontend`): `std` and `thiserror`, nothing else, and
//! nothing of ringblk; the fuzz targets and the load generator build it with
//! `default-features = false`, without the rest of the server. `frontend` imports
//! `ringblk-target` (its public, protocol-free block I/O API) and `ringblk-reactor`:
//! the target depends on no protocol, and this crate never on `ringblk-server`.
//! The mapping of the block layer's errors to [`NbdErrno`] is `frontend::nbd_errno`.
//!
//! - [`proto`]: wire constants, header lengths, [`NbdErrno`], [`ProtocolError`].
//! - [`handshake`]: server side of fixed newstyle negotiation ([`Handshake`]).
//! - [`codec`]: transmission requests: decoding, validation, [`TransmissionDecoder`].
//! - [`reply`]: simple and structured reply encoders.
//! - [`fuzz`]: entry points shared by the cargo-fuzz targets and the corpus test.
//! - `frontend` (feature): `NbdFrontend`, the session, `NbdShared`, `NbdExports`.
//! - [`client`]: the client side (handshake with `NBD_OPT_GO`, request encoder, simple
//!   reply parser), used by ringblk-bench and checked against the server side.
//!
//! # Driving a server connection
//! 1. `let mut hs = Handshake::new(HandshakeLimits::default())`; send `hs.take_output()`
//!    (the greeting).
//! 2. For every received buffer: `hs.feed(buf, &catalog)`; send `hs.take_output()`.
//!    `Status::OutputFull` means send, then feed `buf[consumed..]` again; `Aborted` means
//!    send, then close; an `Err` means close at once.
//! 3. On `Status::Done(negotiated)`: send the output, build
//!    `TransmissionDecoder::new(RequestPolicy::from_negotiated(&negotiated, Unaligned::Reject))`
//!    and give it `buf[consumed..]` and everything received after.
//! 4. Loop `decoder.feed(input)` (see [`codec`]); answer with [`reply`] encoders.
//!
//! The protocol reference is the NBD project's `doc/proto.md`; each module documents the
//! choices it makes where the spec leaves room.

pub mod client;
pub mod codec;
#[cfg(feature = "frontend")]
pub mod frontend;
pub mod fuzz;
pub mod handshake;
pub mod proto;
pub mod reply;
#[cfg(test)]
mod testutil;

pub use codec::{
    decode_request_header, validate, Admission, Command, CommandFlags, Decoded, Event, Request,
    RequestPolicy, TransmissionDecoder, Unaligned,
};
pub use fuzz::{fuzz_handshake, fuzz_transmission};
pub use handshake::{
    ExportCatalog, ExportInfo, Handshake, HandshakeLimits, MetaContext, Negotiated, Progress,
    Status, TlsMode,
};
pub use proto::{NbdErrno, ProtocolError};
pub use reply::Extent;
