//! Client side of the NBD protocol, sans-IO: bytes in, bytes and events out.
//!
//! - [`handshake`]: fixed newstyle negotiation with `NBD_OPT_GO` ([`ClientHandshake`]).
//! - [`codec`]: request encoder and simple-reply parser for the transmission phase.
//!
//! The wire constants are the crate's [`crate::proto`], shared with the server side;
//! the test `proto::tests::wire_constants_match_the_spec_literals` checks each against
//! the spec's number, and the interop tests (`client::interop`) run this client's state
//! machines against the server's. Sockets are the caller's (ringblk-bench: a blocking
//! handshake, then transmission on a reactor).

pub mod codec;
pub mod handshake;
#[cfg(test)]
mod interop;

pub use codec::{parse_reply, put_request, Cmd, Parsed, ReplyError};
pub use handshake::{ClientHandshake, Export, HandshakeError, Status};

// Callers check lengths first: every use reads a fixed-size field of a message whose
// length was checked against the header layout.
fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
