//! NBD wire constants the client side needs, from `shared/reference/nbd-proto.md`.
//!
//! The bench keeps its own copy rather than importing the server's: the interop tests
//! (`nbd::interop`) then check two independent readings of the spec against each other,
//! and the load generator still builds while the server crate is being changed.
//! All integers on the wire are big-endian with the widths noted.

// "Newstyle negotiation"
/// `NBDMAGIC`: first 8 bytes from the server.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word, and the magic in front of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Second greeting word of the oldstyle protocol (refused, named in the error only).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
const _: () = assert!(GREETING_LEN == 8 + 8 + 2);
/// Option header: `IHAVEOPT`, 32-bit option, 32-bit data length.
pub const OPTION_HEADER_LEN: usize = 16;
const _: () = assert!(OPTION_HEADER_LEN == 8 + 4 + 4);
/// Option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
const _: () = assert!(OPTION_REPLY_HEADER_LEN == 8 + 4 + 4 + 4);
/// Reply to `NBD_OPT_EXPORT_NAME`: 64-bit size, 16-bit transmission flags.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
const _: () = assert!(EXPORT_NAME_REPLY_LEN == 8 + 2);
/// Zero padding after that reply unless both sides agreed to `NO_ZEROES`.
pub const EXPORT_NAME_ZEROES_LEN: usize = 124;
/// Longest export name or message the spec allows ("Conventions").
pub const STRING_MAX_BYTES: usize = 4096;

// "Option types"
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_GO: u32 = 7;

// "Option reply types"
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
/// Bit 31 marks an error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;

/// Name of an option error reply, for messages.
pub fn rep_err_name(reply: u32) -> &'static str {
    match reply.wrapping_sub(REP_FLAG_ERROR) {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "NBD_REP_ERR_(unknown)",
    }
}

// "NBD_REP_INFO"
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;
/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub const INFO_EXPORT_LEN: usize = 12;
const _: () = assert!(INFO_EXPORT_LEN == 2 + 8 + 2);
/// `NBD_INFO_BLOCK_SIZE` payload: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_LEN: usize = 14;
const _: () = assert!(INFO_BLOCK_SIZE_LEN == 2 + 4 + 4 + 4);

// "Transmission flags"
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// "Request message", "Simple reply message"
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Request header: magic, flags, type, cookie, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
const _: () = assert!(REQUEST_HEADER_LEN == 4 + 2 + 2 + 8 + 8 + 4);
/// Simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
const _: () = assert!(SIMPLE_REPLY_HEADER_LEN == 4 + 4 + 8);

// "Request types"
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

/// The spec's interoperable payload ceiling (2^25) when the server names none.
pub const PAYLOAD_DEFAULT_MAX_BYTES: u32 = 1 << 25;

/// Name of an error value in a reply ("Error values"), for messages.
pub fn errno_name(error: u32) -> &'static str {
    match error {
        1 => "NBD_EPERM",
        5 => "NBD_EIO",
        12 => "NBD_ENOMEM",
        22 => "NBD_EINVAL",
        28 => "NBD_ENOSPC",
        75 => "NBD_EOVERFLOW",
        95 => "NBD_ENOTSUP",
        108 => "NBD_ESHUTDOWN",
        _ => "NBD_E(unknown)",
    }
}

pub(crate) fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
