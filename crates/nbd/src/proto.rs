//! NBD wire constants, header layouts, the errno set and the protocol error type, for
//! both sides: the server (`handshake`, `codec`, `reply`) and the client (`client`).
//! Each wire value is defined once, here.
//!
//! Every value here is taken from `shared/reference/nbd-proto.md`; the comment on each
//! group names the section, and the test `wire_constants_match_the_spec_literals`
//! checks each one against the number as the spec writes it. All integers on the wire are big-endian with the explicit
//! widths used below.
//!
//! # Layout
//! Headers are not `repr(C)` structs: they are encoded into and decoded from fixed-size
//! byte arrays (`[u8; *_LEN]`) field by field, so neither alignment nor host byte order
//! can leak onto the wire. Each `*_LEN` constant carries a compile-time assertion that it
//! is the sum of its fields' widths as the spec lists them.

use std::fmt;

// ---------------------------------------------------------------------------------------
// Handshake ("Newstyle negotiation", "Fixed newstyle negotiation")

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word and the magic in front of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Second greeting word of the oldstyle protocol (`cliserv_magic`): clients refuse it
/// by name, the server never sends it.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic in front of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag the server understands; any other bit set means hard disconnect.
pub const CLIENT_FLAGS_KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
const _: () = assert!(GREETING_LEN == 8 + 8 + 2);
/// Client flags: one 32-bit word.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option header: `IHAVEOPT`, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
const _: () = assert!(OPTION_HEADER_LEN == 8 + 4 + 4);
/// Option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
const _: () = assert!(OPTION_REPLY_HEADER_LEN == 8 + 4 + 4 + 4);
/// Reply to `NBD_OPT_EXPORT_NAME` without padding: export size, transmission flags.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
const _: () = assert!(EXPORT_NAME_REPLY_LEN == 8 + 2);
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_ZEROES_LEN: usize = 124;

/// Longest string (export name, query, message) the spec allows ("Conventions").
pub const STRING_MAX_BYTES: usize = 4096;

// Option types ("Option types").
/// `NBD_OPT_EXPORT_NAME`
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_PEEK_EXPORT` (withdrawn)
pub const OPT_PEEK_EXPORT: u32 = 4;
/// `NBD_OPT_STARTTLS`
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS` (experimental; qemu 10 asks for it first; we answer UNSUP)
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types ("Option reply types").
/// `NBD_REP_ACK`
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 of a reply type marks an option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
/// `NBD_REP_ERR_POLICY`
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
/// `NBD_REP_ERR_INVALID`
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
/// `NBD_REP_ERR_PLATFORM`
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
/// `NBD_REP_ERR_TLS_REQD`
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
/// `NBD_REP_ERR_UNKNOWN`
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
/// `NBD_REP_ERR_SHUTDOWN`
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
/// `NBD_REP_ERR_TOO_BIG`
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;

// Information types inside NBD_REP_INFO ("NBD_REP_INFO").
/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum payload.
pub const INFO_BLOCK_SIZE: u16 = 3;
/// `NBD_INFO_EXPORT` payload: type, size, transmission flags.
pub const INFO_EXPORT_LEN: usize = 12;
const _: () = assert!(INFO_EXPORT_LEN == 2 + 8 + 2);
/// `NBD_INFO_BLOCK_SIZE` payload: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_LEN: usize = 14;
const _: () = assert!(INFO_BLOCK_SIZE_LEN == 2 + 4 + 4 + 4);

// Transmission flags ("Transmission flags").
/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: only with structured replies.
pub const TF_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`: only together with `SEND_WRITE_ZEROES`.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------
// Transmission ("Request message", "Simple reply message", "Structured reply chunk message")

/// `NBD_REQUEST_MAGIC`
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Request header: magic, command flags, type, cookie, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
const _: () = assert!(REQUEST_HEADER_LEN == 4 + 2 + 2 + 8 + 8 + 4);
/// Simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
const _: () = assert!(SIMPLE_REPLY_HEADER_LEN == 4 + 4 + 8);
/// Structured reply chunk header: magic, flags, type, cookie, payload length.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
const _: () = assert!(STRUCTURED_REPLY_HEADER_LEN == 4 + 2 + 2 + 8 + 4);
/// Chunk header plus the 64-bit offset that opens an `OFFSET_DATA` payload.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_REPLY_HEADER_LEN + 8;
/// Whole `OFFSET_HOLE` chunk: header, offset, hole size.
pub const OFFSET_HOLE_CHUNK_LEN: usize = STRUCTURED_REPLY_HEADER_LEN + 8 + 4;
/// One block status descriptor: extent length, status flags.
pub const EXTENT_LEN: usize = 8;
const _: () = assert!(EXTENT_LEN == 4 + 4);

/// The spec's interoperable payload ceiling, 2^25: what a client may assume when the
/// server names no maximum block size.
pub const PAYLOAD_DEFAULT_MAX_BYTES: u32 = 1 << 25;
/// Largest READ/WRITE payload this server accepts: the spec's interoperable maximum
/// (a policy choice of the server, so a name of its own).
pub const PAYLOAD_MAX_BYTES: u32 = PAYLOAD_DEFAULT_MAX_BYTES;
/// The spec's ceiling on descriptors in one `BLOCK_STATUS` chunk.
pub const EXTENTS_MAX: usize = 1 << 20;
/// Largest payload of an `OFFSET_DATA` chunk: the 32-bit length also covers the offset.
pub const OFFSET_DATA_MAX_BYTES: u32 = u32::MAX - 8;

// Command types ("Request types").
/// `NBD_CMD_READ`
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`
pub const CMD_BLOCK_STATUS: u16 = 7;

// Structured reply flags and types ("Structured reply flags", "Structured reply types").
/// `NBD_REPLY_FLAG_DONE`: last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation status flags ("base:allocation metadata context").
/// `NBD_STATE_HOLE`
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO`
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context the spec defines.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

// ---------------------------------------------------------------------------------------
// Errors

/// The only error values allowed on the wire ("Error values").
///
/// Anything the server hits is mapped to one of these in exactly one place. OS errors
/// become a `BlockError` in ringblk-target (`BlockError::from_os_errno`), and the NBD
/// front end maps those (today `session::nbd_errno` there), because this crate depends on
/// std and thiserror only; host errno values never reach the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdErrno {
    /// `NBD_EPERM`: write to a read-only export.
    Perm = 1,
    /// `NBD_EIO`
    Io = 5,
    /// `NBD_ENOMEM` (the spec asks servers to avoid it)
    NoMem = 12,
    /// `NBD_EINVAL`: bad command, flag, alignment or range.
    Inval = 22,
    /// `NBD_ENOSPC`: write past the end, or out of space.
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: request too large to serve (structured READ).
    Overflow = 75,
    /// `NBD_ENOTSUP`: only for `WRITE_ZEROES` with `FAST_ZERO`.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is shutting down.
    Shutdown = 108,
}

impl NbdErrno {
    /// Every variant, for tests.
    pub const ALL: [NbdErrno; 8] = [
        NbdErrno::Perm,
        NbdErrno::Io,
        NbdErrno::NoMem,
        NbdErrno::Inval,
        NbdErrno::NoSpc,
        NbdErrno::Overflow,
        NbdErrno::NotSup,
        NbdErrno::Shutdown,
    ];

    /// The 32-bit value sent in a reply's error field.
    pub const fn wire(self) -> u32 {
        self as u32
    }

    /// Parses a wire value; `None` for anything the spec does not define (including 0).
    pub fn from_wire(value: u32) -> Option<NbdErrno> {
        NbdErrno::ALL.into_iter().find(|e| e.wire() == value)
    }
}

impl NbdErrno {
    /// The spec's name, e.g. `NBD_EIO`.
    pub const fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "NBD_EPERM",
            NbdErrno::Io => "NBD_EIO",
            NbdErrno::NoMem => "NBD_ENOMEM",
            NbdErrno::Inval => "NBD_EINVAL",
            NbdErrno::NoSpc => "NBD_ENOSPC",
            NbdErrno::Overflow => "NBD_EOVERFLOW",
            NbdErrno::NotSup => "NBD_ENOTSUP",
            NbdErrno::Shutdown => "NBD_ESHUTDOWN",
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Name of an error value as a peer sent it in a reply, for messages: the spec's name,
/// or `NBD_E(unknown)` for a value the spec does not define.
pub fn errno_name(value: u32) -> &'static str {
    NbdErrno::from_wire(value).map_or("NBD_E(unknown)", NbdErrno::name)
}

/// Name of an option error reply type (`NBD_REP_ERR_*`), for messages.
pub fn rep_err_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "NBD_REP_ERR_(unknown)",
    }
}

/// A protocol violation or limit breach after which the connection must be closed
/// (a hard disconnect in the spec's words). Errors a client can recover from are
/// option error replies or [`NbdErrno`] replies instead, never this type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Client flags carry bits the server does not know; the spec says drop the connection.
    #[error("client flags {0:#010x} contain unknown bits")]
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; this server speaks only fixed newstyle.
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE")]
    NotFixedNewstyle,
    /// An option header did not start with `IHAVEOPT`.
    #[error("option magic {0:#018x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    /// An option's data length is past what the server is willing even to drain.
    #[error("option {option} announces {length_bytes} bytes of data, more than the drain limit")]
    OptionTooLarge {
        /// Option type.
        option: u32,
        /// Announced data length.
        length_bytes: u32,
    },
    /// The client sent more options than the per-connection limit.
    #[error("more than {0} options in one handshake")]
    TooManyOptions(u32),
    /// `NBD_OPT_EXPORT_NAME` named an export that cannot be served; it cannot return an error.
    #[error("NBD_OPT_EXPORT_NAME for an unknown or malformed export name")]
    ExportNameRejected,
    /// `NBD_OPT_EXPORT_NAME` on an export whose block size must be acknowledged first.
    #[error("NBD_OPT_EXPORT_NAME on an export that requires NBD_INFO_BLOCK_SIZE")]
    BlockSizeRequired,
    /// The handshake already finished; the caller fed it more input.
    #[error("handshake already finished")]
    HandshakeFinished,
    /// A transmission request did not start with `NBD_REQUEST_MAGIC`.
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadRequestMagic(u32),
    /// The client sent bytes after `NBD_CMD_DISC`.
    #[error("data after NBD_CMD_DISC")]
    DataAfterDisconnect,
    /// The caller fed input after an earlier fatal error; the connection must be closed.
    #[error("input after a fatal protocol error")]
    AfterFatalError,
}

// ---------------------------------------------------------------------------------------
// Byte helpers shared by the codec modules.

/// Builds a fixed-size wire header field by field.
///
/// # Panics
/// `put` panics if a header is written past its length: a layout bug in this module,
/// which every encoder test would hit. `finish` checks in debug builds that every byte
/// was written.
pub(crate) struct FixedWriter<const N: usize> {
    buf: [u8; N],
    pos: usize,
}

impl<const N: usize> FixedWriter<N> {
    pub(crate) const fn new() -> Self {
        FixedWriter {
            buf: [0; N],
            pos: 0,
        }
    }

    pub(crate) fn put(mut self, bytes: &[u8]) -> Self {
        self.buf[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
        self
    }

    pub(crate) fn u16(self, v: u16) -> Self {
        self.put(&v.to_be_bytes())
    }

    pub(crate) fn u32(self, v: u32) -> Self {
        self.put(&v.to_be_bytes())
    }

    pub(crate) fn u64(self, v: u64) -> Self {
        self.put(&v.to_be_bytes())
    }

    pub(crate) fn finish(self) -> [u8; N] {
        debug_assert_eq!(self.pos, N, "wire header not filled");
        self.buf
    }
}

/// Reads big-endian integers from client-controlled bytes; every read is bounds-checked
/// and returns `None` past the end, so a short or lying length can never panic.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) const fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn array<const W: usize>(&mut self) -> Option<[u8; W]> {
        let mut out = [0u8; W];
        out.copy_from_slice(self.bytes(W)?);
        Some(out)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(crate) const fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Checks a client string against the spec's rules: UTF-8, no NUL. Length is checked by
/// the caller because the error differs (too big versus invalid).
pub(crate) fn parse_wire_string(bytes: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(bytes).ok()?;
    (!s.contains('\0')).then_some(s)
}

/// Truncates a server string to the spec's 4096-byte limit on a character boundary.
pub(crate) fn clamp_string(s: &str) -> &str {
    if s.len() <= STRING_MAX_BYTES {
        return s;
    }
    let mut end = STRING_MAX_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_wire_values_are_the_spec_values() {
        let expected = [1, 5, 12, 22, 28, 75, 95, 108];
        let got: Vec<u32> = NbdErrno::ALL.iter().map(|e| e.wire()).collect();
        assert_eq!(got, expected);
        for e in NbdErrno::ALL {
            assert_eq!(NbdErrno::from_wire(e.wire()), Some(e));
        }
        assert_eq!(NbdErrno::from_wire(0), None);
        assert_eq!(NbdErrno::from_wire(2), None);
    }

    /// `bit n` in the spec's flag lists.
    const fn bit(n: u32) -> u64 {
        1 << n
    }

    /// Every wire constant of this crate against the number exactly as
    /// `shared/reference/nbd-proto.md` writes it (hex magics verbatim, `2^31 + 1`,
    /// `bit 8`, `(7)`). The constants are shared by the server and the client side, so
    /// this table, not the interop tests, is what catches a wrong value.
    #[test]
    fn wire_constants_match_the_spec_literals() {
        use crate::codec::CommandFlags;
        macro_rules! table {
            ($($name:expr => $spec:expr),* $(,)?) => {
                vec![$((stringify!($name), u64::from($name), $spec as u64)),*]
            };
        }
        let table: Vec<(&str, u64, u64)> = table![
            // "Newstyle negotiation", "Oldstyle negotiation"
            NBD_MAGIC => 0x4e42444d41474943u64,
            IHAVEOPT => 0x49484156454F5054u64,
            OLDSTYLE_MAGIC => 0x00420281861253u64,
            OPTION_REPLY_MAGIC => 0x3e889045565a9u64,
            // "Handshake flags", "Client flags"
            FLAG_FIXED_NEWSTYLE => bit(0),
            FLAG_NO_ZEROES => bit(1),
            FLAG_C_FIXED_NEWSTYLE => bit(0),
            FLAG_C_NO_ZEROES => bit(1),
            // "Transmission flags"
            TF_HAS_FLAGS => bit(0),
            TF_READ_ONLY => bit(1),
            TF_SEND_FLUSH => bit(2),
            TF_SEND_FUA => bit(3),
            TF_ROTATIONAL => bit(4),
            TF_SEND_TRIM => bit(5),
            TF_SEND_WRITE_ZEROES => bit(6),
            TF_SEND_DF => bit(7),
            TF_CAN_MULTI_CONN => bit(8),
            TF_SEND_CACHE => bit(10),
            TF_SEND_FAST_ZERO => bit(11),
            // "Option types"
            OPT_EXPORT_NAME => 1,
            OPT_ABORT => 2,
            OPT_LIST => 3,
            OPT_PEEK_EXPORT => 4,
            OPT_STARTTLS => 5,
            OPT_INFO => 6,
            OPT_GO => 7,
            OPT_STRUCTURED_REPLY => 8,
            OPT_LIST_META_CONTEXT => 9,
            OPT_SET_META_CONTEXT => 10,
            OPT_EXTENDED_HEADERS => 11,
            // "Option reply types"
            REP_ACK => 1,
            REP_SERVER => 2,
            REP_INFO => 3,
            REP_META_CONTEXT => 4,
            REP_FLAG_ERROR => bit(31),
            REP_ERR_UNSUP => bit(31) + 1,
            REP_ERR_POLICY => bit(31) + 2,
            REP_ERR_INVALID => bit(31) + 3,
            REP_ERR_PLATFORM => bit(31) + 4,
            REP_ERR_TLS_REQD => bit(31) + 5,
            REP_ERR_UNKNOWN => bit(31) + 6,
            REP_ERR_SHUTDOWN => bit(31) + 7,
            REP_ERR_BLOCK_SIZE_REQD => bit(31) + 8,
            REP_ERR_TOO_BIG => bit(31) + 9,
            // "NBD_REP_INFO"
            INFO_EXPORT => 0,
            INFO_NAME => 1,
            INFO_DESCRIPTION => 2,
            INFO_BLOCK_SIZE => 3,
            // "Request message", "Simple reply message", "Structured reply chunk message"
            REQUEST_MAGIC => 0x25609513,
            SIMPLE_REPLY_MAGIC => 0x67446698,
            STRUCTURED_REPLY_MAGIC => 0x668e33ef,
            // "Request types"
            CMD_READ => 0,
            CMD_WRITE => 1,
            CMD_DISC => 2,
            CMD_FLUSH => 3,
            CMD_TRIM => 4,
            CMD_CACHE => 5,
            CMD_WRITE_ZEROES => 6,
            CMD_BLOCK_STATUS => 7,
            // "Command flags"
            CommandFlags::FUA.bits() => bit(0),
            CommandFlags::NO_HOLE.bits() => bit(1),
            CommandFlags::DF.bits() => bit(2),
            CommandFlags::REQ_ONE.bits() => bit(3),
            CommandFlags::FAST_ZERO.bits() => bit(4),
            // "Structured reply flags", "Structured reply types"
            REPLY_FLAG_DONE => bit(0),
            REPLY_TYPE_NONE => 0,
            REPLY_TYPE_OFFSET_DATA => 1,
            REPLY_TYPE_OFFSET_HOLE => 2,
            REPLY_TYPE_BLOCK_STATUS => 5,
            REPLY_TYPE_ERROR => (1u64 << 15) + 1,
            REPLY_TYPE_ERROR_OFFSET => (1u64 << 15) + 2,
            // "base:allocation metadata context"
            STATE_HOLE => bit(0),
            STATE_ZERO => bit(1),
            // "Error values"
            NbdErrno::Perm.wire() => 1,
            NbdErrno::Io.wire() => 5,
            NbdErrno::NoMem.wire() => 12,
            NbdErrno::Inval.wire() => 22,
            NbdErrno::NoSpc.wire() => 28,
            NbdErrno::Overflow.wire() => 75,
            NbdErrno::NotSup.wire() => 95,
            NbdErrno::Shutdown.wire() => 108,
            // Sizes the spec states as numbers ("Conventions", "Newstyle negotiation",
            // "Block size constraints", "NBD_REPLY_TYPE_BLOCK_STATUS")
            STRING_MAX_BYTES as u64 => 4096,
            EXPORT_NAME_ZEROES_LEN as u64 => 124,
            PAYLOAD_DEFAULT_MAX_BYTES => 33_554_432,
            EXTENTS_MAX as u64 => 1_048_576,
        ];
        let wrong: Vec<String> = table
            .iter()
            .filter(|(_, got, spec)| got != spec)
            .map(|(name, got, spec)| format!("{name} is {got:#x}, the spec says {spec:#x}"))
            .collect();
        assert!(wrong.is_empty(), "{wrong:#?}");

        // Every `pub const` of this file is in the table, or derived from the spec's
        // field widths (the `*_LEN` constants, asserted at compile time), or a choice of
        // this crate that the spec does not fix. A new constant must be added to one.
        const DERIVED_OR_POLICY: &[&str] = &[
            "SERVER_HANDSHAKE_FLAGS",
            "CLIENT_FLAGS_KNOWN",
            "PAYLOAD_MAX_BYTES",
            "OFFSET_DATA_MAX_BYTES",
            "META_BASE_ALLOCATION",
        ];
        let names: Vec<&str> = table.iter().map(|(n, _, _)| *n).collect();
        let (mut unchecked, mut scanned) = (Vec::new(), 0);
        for line in include_str!("proto.rs").lines() {
            let Some(rest) = line.strip_prefix("pub const ") else {
                continue;
            };
            scanned += 1;
            let name = rest.split(':').next().unwrap_or_default();
            let listed = names.iter().any(|n| n.split(' ').next() == Some(name));
            if !listed && !name.ends_with("_LEN") && !DERIVED_OR_POLICY.contains(&name) {
                unchecked.push(name.to_string());
            }
        }
        assert!(
            unchecked.is_empty(),
            "not checked against the spec: {unchecked:?}"
        );
        // Negative control: the scan must see this file's constants at all.
        assert!(scanned > 80, "only {scanned} constants found in proto.rs");
    }

    #[test]
    fn magic_values_match_the_spec_text() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
        assert_eq!(REPLY_TYPE_ERROR, 0x8001);
        assert_eq!(REPLY_TYPE_ERROR_OFFSET, 0x8002);
    }

    #[test]
    fn reader_refuses_to_read_past_the_end() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
        assert_eq!(r.remaining(), 1);
        assert_eq!(r.bytes(usize::MAX), None);
    }

    #[test]
    fn strings_follow_the_spec_rules() {
        assert_eq!(parse_wire_string(b"disk"), Some("disk"));
        assert_eq!(parse_wire_string(b"di\0sk"), None);
        assert_eq!(parse_wire_string(&[0xff, 0xfe]), None);
        let long = "é".repeat(STRING_MAX_BYTES); // 2 bytes per char
        let clamped = clamp_string(&long);
        assert!(clamped.len() <= STRING_MAX_BYTES);
        assert!(clamped.len() >= STRING_MAX_BYTES - 1);
    }
}
