//! Transmission reply encoders: simple replies and structured reply chunks.
//!
//! Fixed-size headers are returned as arrays so the caller can send them with an I/O
//! buffer in one vectored send (READ data is never copied here: [`offset_data_header`]
//! returns only the 28 bytes that go in front of it). Variable-size chunks are appended to
//! a caller `Vec<u8>`.
//!
//! # Which reply to use
//! Without structured replies only simple replies exist. With them, READ must get a
//! structured reply (even an early error); other commands may get either. The
//! [`error_reply`] and [`success_reply`] helpers make that choice.
//!
//! # Panics
//! Encoders assert the spec's shape rules that only a server bug can break (zero-length
//! data or hole chunk, empty or over-long extent list, zero-length extent). Nothing a
//! client sends reaches these asserts: lengths come from validated requests.

use super::proto::{self, NbdErrno};

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent in bytes; nonzero.
    pub length: u32,
    /// Status flags defined by the context (`STATE_HOLE`, `STATE_ZERO` for base:allocation).
    pub flags: u32,
}

/// A simple reply header; for a successful READ the data follows it.
pub fn simple_reply(cookie: u64, error: Option<NbdErrno>) -> [u8; proto::SIMPLE_REPLY_HEADER_LEN] {
    proto::FixedWriter::new()
        .u32(proto::SIMPLE_REPLY_MAGIC)
        .u32(error.map_or(0, NbdErrno::wire))
        .u64(cookie)
        .finish()
}

/// A structured reply chunk header announcing `length` payload bytes.
pub fn chunk_header(
    cookie: u64,
    reply_type: u16,
    done: bool,
    length: u32,
) -> [u8; proto::STRUCTURED_REPLY_HEADER_LEN] {
    let flags = if done { proto::REPLY_FLAG_DONE } else { 0 };
    proto::FixedWriter::new()
        .u32(proto::STRUCTURED_REPLY_MAGIC)
        .u16(flags)
        .u16(reply_type)
        .u64(cookie)
        .u32(length)
        .finish()
}

/// `NBD_REPLY_TYPE_NONE` with `DONE`: ends a structured reply (success if no error chunk).
pub fn none_chunk(cookie: u64) -> [u8; proto::STRUCTURED_REPLY_HEADER_LEN] {
    chunk_header(cookie, proto::REPLY_TYPE_NONE, true, 0)
}

/// Header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `data_len` bytes of data follow it.
///
/// # Panics
/// If `data_len` is 0 (use a hole or `NONE`) or above [`proto::OFFSET_DATA_MAX_BYTES`].
pub fn offset_data_header(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> [u8; proto::OFFSET_DATA_HEADER_LEN] {
    assert!(data_len > 0, "OFFSET_DATA chunk must carry data");
    assert!(data_len <= proto::OFFSET_DATA_MAX_BYTES);
    let header = chunk_header(cookie, proto::REPLY_TYPE_OFFSET_DATA, done, data_len + 8);
    proto::FixedWriter::new().put(&header).u64(offset).finish()
}

/// A whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zero.
///
/// # Panics
/// If `hole_len` is 0 (the spec: "MUST be nonzero").
pub fn offset_hole_chunk(
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) -> [u8; proto::OFFSET_HOLE_CHUNK_LEN] {
    assert!(hole_len > 0, "OFFSET_HOLE size must be nonzero");
    let header = chunk_header(cookie, proto::REPLY_TYPE_OFFSET_HOLE, done, 12);
    proto::FixedWriter::new()
        .put(&header)
        .u64(offset)
        .u32(hole_len)
        .finish()
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one metadata context.
///
/// # Panics
/// If `extents` is empty, longer than [`proto::EXTENTS_MAX`], or has a zero-length extent.
pub fn put_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
    done: bool,
) {
    assert!(
        !extents.is_empty(),
        "BLOCK_STATUS needs at least one extent"
    );
    assert!(extents.len() <= proto::EXTENTS_MAX);
    assert!(
        extents.iter().all(|e| e.length > 0),
        "extent length must be nonzero"
    );
    // At most 4 + 8 * 2^20 bytes: fits in u32.
    let length = (4 + proto::EXTENT_LEN * extents.len()) as u32;
    out.reserve(proto::STRUCTURED_REPLY_HEADER_LEN + length as usize);
    out.extend_from_slice(&chunk_header(
        cookie,
        proto::REPLY_TYPE_BLOCK_STATUS,
        done,
        length,
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for extent in extents {
        out.extend_from_slice(&extent.length.to_be_bytes());
        out.extend_from_slice(&extent.flags.to_be_bytes());
    }
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk. `message` (shown to the user) is cut to 4096
/// bytes on a character boundary.
pub fn put_error(out: &mut Vec<u8>, cookie: u64, errno: NbdErrno, message: &str, done: bool) {
    let message = proto::clamp_string(message);
    let length = (4 + 2 + message.len()) as u32;
    out.extend_from_slice(&chunk_header(cookie, proto::REPLY_TYPE_ERROR, done, length));
    put_error_body(out, errno, message);
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: the error happened at `offset`.
pub fn put_error_offset(
    out: &mut Vec<u8>,
    cookie: u64,
    errno: NbdErrno,
    offset: u64,
    message: &str,
    done: bool,
) {
    let message = proto::clamp_string(message);
    let length = (4 + 2 + message.len() + 8) as u32;
    let header = chunk_header(cookie, proto::REPLY_TYPE_ERROR_OFFSET, done, length);
    out.extend_from_slice(&header);
    put_error_body(out, errno, message);
    out.extend_from_slice(&offset.to_be_bytes());
}

fn put_error_body(out: &mut Vec<u8>, errno: NbdErrno, message: &str) {
    debug_assert!(message.len() <= proto::STRING_MAX_BYTES);
    out.extend_from_slice(&errno.wire().to_be_bytes());
    // Clamped to 4096 bytes above, so it fits in u16.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends a complete error reply: a final `ERROR` chunk with structured replies (required
/// for READ, preferred otherwise because it carries `message`), else a simple reply.
pub fn error_reply(
    out: &mut Vec<u8>,
    structured: bool,
    cookie: u64,
    errno: NbdErrno,
    message: &str,
) {
    if structured {
        put_error(out, cookie, errno, message, true);
    } else {
        out.extend_from_slice(&simple_reply(cookie, Some(errno)));
    }
}

/// Appends a complete success reply without data (every command but a nonzero READ; a
/// zero-length READ too): `NONE` + `DONE` with structured replies, else a simple reply.
pub fn success_reply(out: &mut Vec<u8>, structured: bool, cookie: u64) {
    if structured {
        out.extend_from_slice(&none_chunk(cookie));
    } else {
        out.extend_from_slice(&simple_reply(cookie, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOKIE: u64 = 0x0102_0304_0506_0708;

    // Expected bytes are written out by hand from the spec's message layouts.

    #[test]
    fn simple_reply_layout() {
        let ok = simple_reply(COOKIE, None);
        assert_eq!(
            ok,
            [
                0x67, 0x44, 0x66, 0x98, // NBD_SIMPLE_REPLY_MAGIC
                0, 0, 0, 0, // error
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
            ]
        );
        let err = simple_reply(COOKIE, Some(NbdErrno::NoSpc));
        assert_eq!(&err[4..8], &[0, 0, 0, 28]);
    }

    #[test]
    fn none_chunk_layout() {
        assert_eq!(
            none_chunk(COOKIE),
            [
                0x66, 0x8e, 0x33, 0xef, // NBD_STRUCTURED_REPLY_MAGIC
                0, 1, // flags: DONE
                0, 0, // type: NONE
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0, 0, 0, 0, // length
            ]
        );
    }

    #[test]
    fn offset_data_header_layout() {
        let h = offset_data_header(COOKIE, 0x1000, 512, false);
        assert_eq!(
            h,
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 0, // flags: not done
                0, 1, // type: OFFSET_DATA
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0, 0, 2, 8, // length: 8 + 512
                0, 0, 0, 0, 0, 0, 0x10, 0, // offset
            ]
        );
        let done = offset_data_header(COOKIE, 0, 1, true);
        assert_eq!(&done[4..6], &[0, 1]);
    }

    #[test]
    #[should_panic(expected = "must carry data")]
    fn offset_data_refuses_empty_data() {
        let _ = offset_data_header(COOKIE, 0, 0, true);
    }

    #[test]
    fn offset_hole_layout() {
        let c = offset_hole_chunk(COOKIE, 4096, 8192, true);
        assert_eq!(
            c,
            [
                0x66, 0x8e, 0x33, 0xef, // magic
                0, 1, // flags: DONE
                0, 2, // type: OFFSET_HOLE
                1, 2, 3, 4, 5, 6, 7, 8, // cookie
                0, 0, 0, 12, // length
                0, 0, 0, 0, 0, 0, 0x10, 0, // offset
                0, 0, 0x20, 0, // hole size
            ]
        );
    }

    #[test]
    fn block_status_layout() {
        let mut out = Vec::new();
        let extents = [
            Extent {
                length: 0x1000,
                flags: 0,
            },
            Extent {
                length: 0x2000,
                flags: proto::STATE_HOLE | proto::STATE_ZERO,
            },
        ];
        put_block_status(&mut out, COOKIE, 1, &extents, true);
        let expected: Vec<u8> = vec![
            0x66, 0x8e, 0x33, 0xef, // magic
            0, 1, // flags: DONE
            0, 5, // type: BLOCK_STATUS
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 20, // length: 4 + 2 * 8
            0, 0, 0, 1, // context id
            0, 0, 0x10, 0, 0, 0, 0, 0, // extent 1
            0, 0, 0x20, 0, 0, 0, 0, 3, // extent 2: hole + zero
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn error_chunk_layout() {
        let mut out = Vec::new();
        put_error(&mut out, COOKIE, NbdErrno::Inval, "bad", true);
        let expected: Vec<u8> = vec![
            0x66, 0x8e, 0x33, 0xef, // magic
            0, 1, // flags: DONE
            0x80, 0x01, // type: ERROR
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 9, // length: 4 + 2 + 3
            0, 0, 0, 22, // error: EINVAL
            0, 3, // message length
            b'b', b'a', b'd',
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn error_offset_chunk_layout() {
        let mut out = Vec::new();
        put_error_offset(&mut out, COOKIE, NbdErrno::Io, 0x200, "", false);
        let expected: Vec<u8> = vec![
            0x66, 0x8e, 0x33, 0xef, // magic
            0, 0, // flags
            0x80, 0x02, // type: ERROR_OFFSET
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 14, // length: 4 + 2 + 0 + 8
            0, 0, 0, 5, // error: EIO
            0, 0, // message length
            0, 0, 0, 0, 0, 0, 2, 0, // offset
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn error_message_is_clamped_to_the_string_limit() {
        let mut out = Vec::new();
        let long = "x".repeat(10_000);
        put_error(&mut out, COOKIE, NbdErrno::Io, &long, true);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert_eq!(msg_len, proto::STRING_MAX_BYTES);
        assert_eq!(out.len(), 20 + 6 + proto::STRING_MAX_BYTES);
        let chunk_len = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
        assert_eq!(chunk_len, out.len() - 20);
    }

    #[test]
    fn error_and_success_helpers_pick_the_reply_kind() {
        let mut simple = Vec::new();
        error_reply(&mut simple, false, COOKIE, NbdErrno::Perm, "read-only");
        assert_eq!(simple, simple_reply(COOKIE, Some(NbdErrno::Perm)));
        let mut structured = Vec::new();
        error_reply(&mut structured, true, COOKIE, NbdErrno::Perm, "read-only");
        assert_eq!(
            &structured[..4],
            &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes()
        );
        assert_eq!(structured[5] & 1, 1, "error reply must be final");

        let mut ok = Vec::new();
        success_reply(&mut ok, false, COOKIE);
        assert_eq!(ok, simple_reply(COOKIE, None));
        ok.clear();
        success_reply(&mut ok, true, COOKIE);
        assert_eq!(ok, none_chunk(COOKIE));
    }
}
