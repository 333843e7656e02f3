//! Client side of the transmission phase, sans-IO: requests are appended to a byte
//! buffer, simple replies are parsed out of one.
//!
//! # Replies
//! Without structured replies a simple reply does not say how long its payload is:
//! only the client knows (a successful READ carries exactly the requested length).
//! [`parse_reply`] therefore asks the caller, through a closure, what the cookie it just
//! read stands for. The parser never copies: a complete reply comes back as a borrowed
//! slice of the input, an incomplete one as [`Parsed::Incomplete`], and the caller keeps
//! the unconsumed tail for the next receive.

use super::{be_u32, be_u64};
use crate::proto::*;

/// Commands the load generator sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Read,
    Write,
    Flush,
    Disc,
}

impl Cmd {
    pub const fn wire(self) -> u16 {
        match self {
            Cmd::Read => CMD_READ,
            Cmd::Write => CMD_WRITE,
            Cmd::Flush => CMD_FLUSH,
            Cmd::Disc => CMD_DISC,
        }
    }
}

/// Appends one request header (and, for WRITE, nothing else: the caller appends the
/// `len` payload bytes right after it).
pub fn put_request(out: &mut Vec<u8>, cmd: Cmd, flags: u16, cookie: u64, offset: u64, len: u32) {
    let start = out.len();
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&cmd.wire().to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    debug_assert_eq!(out.len() - start, REQUEST_HEADER_LEN);
}

/// A protocol violation by the server: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    #[error("server sent a structured reply, which was not negotiated")]
    Structured,
    #[error("reply magic {0:#010x} is wrong (stream out of step)")]
    BadMagic(u32),
    #[error("reply for cookie {0:#x}, which is not in flight")]
    UnknownCookie(u64),
}

/// One parse step.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// Not a whole reply yet: keep the input and receive more.
    Incomplete,
    Reply {
        cookie: u64,
        /// 0 on success, else the NBD error value (see [`errno_name`]).
        error: u32,
        /// The READ data (empty for other commands and for errors).
        payload: &'a [u8],
        /// Bytes of the input this reply took.
        consumed: usize,
    },
}

/// Parses the simple reply at the start of `input`. `payload_len(cookie)` returns the
/// data length a *successful* reply to that cookie carries (the READ length, else 0),
/// or `None` when the cookie is not in flight. It is called once per complete header.
pub fn parse_reply<'a>(
    input: &'a [u8],
    payload_len: impl FnOnce(u64) -> Option<u32>,
) -> Result<Parsed<'a>, ReplyError> {
    if input.len() < 4 {
        return Ok(Parsed::Incomplete);
    }
    match be_u32(&input[0..4]) {
        SIMPLE_REPLY_MAGIC => {}
        STRUCTURED_REPLY_MAGIC => return Err(ReplyError::Structured),
        other => return Err(ReplyError::BadMagic(other)),
    }
    if input.len() < SIMPLE_REPLY_HEADER_LEN {
        return Ok(Parsed::Incomplete);
    }
    let error = be_u32(&input[4..8]);
    let cookie = be_u64(&input[8..16]);
    let len = payload_len(cookie).ok_or(ReplyError::UnknownCookie(cookie))?;
    // The spec: an error reply to READ carries no data.
    let len = if error == 0 { len as usize } else { 0 };
    let end = SIMPLE_REPLY_HEADER_LEN + len;
    if input.len() < end {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Reply {
        cookie,
        error,
        payload: &input[SIMPLE_REPLY_HEADER_LEN..end],
        consumed: end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::be_u16;

    fn simple(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
        let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&error.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    #[test]
    fn request_header_layout() {
        let mut out = vec![0xAA];
        put_request(&mut out, Cmd::Write, 1, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(out.len(), 1 + REQUEST_HEADER_LEN);
        let h = &out[1..];
        assert_eq!(be_u32(&h[0..4]), REQUEST_MAGIC);
        assert_eq!(be_u16(&h[4..6]), 1);
        assert_eq!(be_u16(&h[6..8]), CMD_WRITE);
        assert_eq!(be_u64(&h[8..16]), 0x0102_0304_0506_0708);
        assert_eq!(be_u64(&h[16..24]), 4096);
        assert_eq!(be_u32(&h[24..28]), 512);
    }

    #[test]
    fn read_reply_is_returned_whole_or_not_at_all() {
        let data: Vec<u8> = (0..100u8).collect();
        let wire = simple(7, 0, &data);
        for cut in 0..wire.len() {
            let p = parse_reply(&wire[..cut], |_| Some(100)).expect("parse");
            assert_eq!(p, Parsed::Incomplete, "cut at {cut}");
        }
        let mut two = wire.clone();
        two.extend(simple(8, 0, &[]));
        let p = parse_reply(&two, |c| (c == 7).then_some(100)).expect("parse");
        assert_eq!(
            p,
            Parsed::Reply {
                cookie: 7,
                error: 0,
                payload: &data,
                consumed: wire.len()
            }
        );
        let p = parse_reply(&two[wire.len()..], |_| Some(0)).expect("parse");
        assert!(matches!(
            p,
            Parsed::Reply {
                cookie: 8,
                consumed: 16,
                ..
            }
        ));
    }

    #[test]
    fn error_reply_to_read_has_no_payload() {
        let mut wire = simple(3, 5, &[]);
        wire.extend(simple(4, 0, &[]));
        let p = parse_reply(&wire, |_| Some(4096)).expect("parse");
        assert_eq!(
            p,
            Parsed::Reply {
                cookie: 3,
                error: 5,
                payload: &[],
                consumed: 16
            }
        );
        assert_eq!(errno_name(5), "NBD_EIO");
    }

    #[test]
    fn protocol_violations() {
        assert_eq!(
            parse_reply(&simple(1, 0, &[]), |_| None),
            Err(ReplyError::UnknownCookie(1))
        );
        let mut s = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        s.extend([0; 16]);
        assert_eq!(parse_reply(&s, |_| Some(0)), Err(ReplyError::Structured));
        assert_eq!(
            parse_reply(&[1, 2, 3, 4, 5], |_| Some(0)),
            Err(ReplyError::BadMagic(0x0102_0304))
        );
    }
}
