//! Client side of the NBD protocol, sans-IO: bytes in, bytes and events out.
//!
//! - [`wire`]: the constants the client needs (its own copy of the spec's values).
//! - [`handshake`]: fixed newstyle negotiation with `NBD_OPT_GO` ([`ClientHandshake`]).
//! - [`codec`]: request encoder and simple-reply parser for the transmission phase.
//!
//! Sockets live in `connect` (blocking handshake) and `engine` (reactor transmission).

pub mod codec;
pub mod handshake;
#[cfg(test)]
mod interop;
pub mod wire;

pub use codec::{parse_reply, put_request, Cmd, Parsed};
pub use handshake::{ClientHandshake, Export, Status};
