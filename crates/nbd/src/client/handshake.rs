//! Client side of the fixed newstyle handshake, sans-IO: server bytes in, client bytes
//! out, an [`Export`] at the end.
//!
//! # What is negotiated
//! One `NBD_OPT_GO` for the export, asking for `NBD_INFO_BLOCK_SIZE` (so the client
//! promises to honour the server's block sizes, which [`Export::check_io`] enforces).
//! Structured replies are deliberately *not* requested: READs then come back as simple
//! replies followed by the data, which is the cheapest thing to parse on the hot path
//! and what fio's nbd engine sees from servers too. A server that answers
//! `NBD_REP_ERR_UNSUP` to `NBD_OPT_GO` gets the `NBD_OPT_EXPORT_NAME` fallback the spec
//! allows for pre-GO servers.
//!
//! # Bounds
//! Option reply payloads are refused past [`REPLY_DATA_MAX_BYTES`], and the number of
//! replies to one option past [`REPLIES_MAX`], so a hostile server cannot make the
//! client buffer without limit.

use super::{be_u16, be_u32, be_u64};
use crate::proto::*;

/// Largest option reply payload accepted (a reply carries at most a 4 KiB string plus
/// a few fixed fields; 64 KiB leaves room for servers that send long descriptions).
pub const REPLY_DATA_MAX_BYTES: u32 = 64 * 1024;
/// Most replies accepted for the one `NBD_OPT_GO`.
pub const REPLIES_MAX: u32 = 64;

/// What the server said about the export, and what the client may send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub size_bytes: u64,
    pub transmission_flags: u16,
    /// From `NBD_INFO_BLOCK_SIZE`; the spec's defaults (1, 4096, 2^25) when absent.
    pub block_size_min: u32,
    pub block_size_preferred: u32,
    pub block_size_max: u32,
    /// Whether `NBD_OPT_GO` was used (false: `NBD_OPT_EXPORT_NAME` fallback).
    pub via_go: bool,
}

impl Export {
    pub fn read_only(&self) -> bool {
        self.transmission_flags & TF_READ_ONLY != 0
    }

    pub fn can_flush(&self) -> bool {
        self.transmission_flags & TF_SEND_FLUSH != 0
    }

    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & TF_CAN_MULTI_CONN != 0
    }

    /// Checks that requests of `len` bytes at multiples of `len` inside
    /// `[offset, offset + range)` obey the export's size and block-size constraints.
    pub fn check_io(&self, len: u32, offset: u64, range: u64) -> Result<(), String> {
        if len == 0 || len > self.block_size_max {
            return Err(format!(
                "block size {len} is outside the server's 1..={} bytes",
                self.block_size_max
            ));
        }
        let min = u64::from(self.block_size_min.max(1));
        if u64::from(len) % min != 0 || offset % min != 0 {
            return Err(format!(
                "block size {len} and offset {offset} must be multiples of the server's minimum block size {min}"
            ));
        }
        let end = offset
            .checked_add(range)
            .ok_or_else(|| "offset + range overflows".to_string())?;
        if end > self.size_bytes {
            return Err(format!(
                "region {offset}..{end} is past the export's end ({} bytes)",
                self.size_bytes
            ));
        }
        if range < u64::from(len) {
            return Err(format!(
                "region of {range} bytes is smaller than one block of {len}"
            ));
        }
        Ok(())
    }
}

/// Why a handshake failed. Every variant ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("not an NBD server (greeting magic {0:#018x})")]
    NotNbd(u64),
    #[error("server speaks the oldstyle protocol, which this client does not")]
    Oldstyle,
    #[error("server does not speak fixed newstyle (handshake flags {0:#06x})")]
    NotFixedNewstyle(u16),
    #[error("export name longer than {STRING_MAX_BYTES} bytes")]
    NameTooLong,
    #[error("option reply magic {0:#018x} is wrong")]
    BadReplyMagic(u64),
    #[error("reply to option {got} while waiting for option {want}")]
    WrongOption { want: u32, got: u32 },
    #[error("option reply of {0} bytes is past the {REPLY_DATA_MAX_BYTES}-byte limit")]
    ReplyTooLarge(u32),
    #[error("more than {REPLIES_MAX} replies to one option")]
    TooManyReplies,
    #[error("malformed {0} reply")]
    Malformed(&'static str),
    #[error("server refused export {export:?}: {name}{}", if .message.is_empty() { String::new() } else { format!(" ({})", .message) })]
    Refused {
        export: String,
        name: &'static str,
        message: String,
    },
    #[error("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")]
    MissingExportInfo,
    #[error("server sent an unexpected option reply type {0:#x}")]
    UnexpectedReply(u32),
    #[error("server's block sizes {0}/{1}/{2} break the spec's rules")]
    BadBlockSizes(u32, u32, u32),
    #[error("the handshake is already finished")]
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    GoReply,
    GoReplyData { reply: u32, len: u32 },
    ExportNameReply,
    Finished,
}

/// Result of one [`ClientHandshake::feed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Send [`ClientHandshake::take_output`], then feed more server bytes.
    NeedInput,
    /// Send the output (if any); the transmission phase starts.
    Done(Export),
}

/// Client fixed-newstyle negotiation for one export.
#[derive(Debug)]
pub struct ClientHandshake {
    export: String,
    state: State,
    buf: Vec<u8>,
    out: Vec<u8>,
    no_zeroes: bool,
    replies: u32,
    size: Option<(u64, u16)>,
    block: Option<(u32, u32, u32)>,
}

impl ClientHandshake {
    pub fn new(export: &str) -> Result<ClientHandshake, HandshakeError> {
        if export.len() > STRING_MAX_BYTES {
            return Err(HandshakeError::NameTooLong);
        }
        Ok(ClientHandshake {
            export: export.to_string(),
            state: State::Greeting,
            buf: Vec::new(),
            out: Vec::new(),
            no_zeroes: false,
            replies: 0,
            size: None,
            block: None,
        })
    }

    /// Bytes to send to the server now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// How many bytes the handshake needs before it can make progress (a hint for
    /// blocking drivers, which must not read past the handshake).
    pub fn wants(&self) -> usize {
        let need = match self.state {
            State::Greeting => GREETING_LEN,
            State::GoReply => OPTION_REPLY_HEADER_LEN,
            State::GoReplyData { len, .. } => len as usize,
            State::ExportNameReply => self.export_name_reply_len(),
            State::Finished => 0,
        };
        need.saturating_sub(self.buf.len()).max(1)
    }

    fn export_name_reply_len(&self) -> usize {
        EXPORT_NAME_REPLY_LEN
            + if self.no_zeroes {
                0
            } else {
                EXPORT_NAME_ZEROES_LEN
            }
    }

    /// Consumes server bytes (any split). Returns the bytes consumed: after `Done`,
    /// the rest of `input` belongs to the transmission phase.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Status), HandshakeError> {
        let mut used = 0;
        loop {
            if self.state == State::Finished {
                return Err(HandshakeError::Finished);
            }
            let need = match self.state {
                State::Greeting => GREETING_LEN,
                State::GoReply => OPTION_REPLY_HEADER_LEN,
                State::GoReplyData { len, .. } => len as usize,
                State::ExportNameReply => self.export_name_reply_len(),
                State::Finished => unreachable!("checked above"),
            };
            let take = need.saturating_sub(self.buf.len()).min(input.len() - used);
            self.buf.extend_from_slice(&input[used..used + take]);
            used += take;
            if self.buf.len() < need {
                return Ok((used, Status::NeedInput));
            }
            let msg = std::mem::take(&mut self.buf);
            if let Some(export) = self.step(&msg)? {
                self.state = State::Finished;
                return Ok((used, Status::Done(export)));
            }
        }
    }

    fn step(&mut self, msg: &[u8]) -> Result<Option<Export>, HandshakeError> {
        match self.state {
            State::Greeting => self.on_greeting(msg).map(|()| None),
            State::GoReply => self.on_reply_header(msg),
            State::GoReplyData { reply, .. } => self.on_reply(reply, msg),
            State::ExportNameReply => Ok(Some(Export {
                size_bytes: be_u64(&msg[0..8]),
                transmission_flags: be_u16(&msg[8..10]),
                block_size_min: 1,
                block_size_preferred: 4096,
                block_size_max: PAYLOAD_DEFAULT_MAX_BYTES,
                via_go: false,
            })),
            State::Finished => Err(HandshakeError::Finished),
        }
    }

    fn on_greeting(&mut self, msg: &[u8]) -> Result<(), HandshakeError> {
        let magic = be_u64(&msg[0..8]);
        if magic != NBD_MAGIC {
            return Err(HandshakeError::NotNbd(magic));
        }
        match be_u64(&msg[8..16]) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => return Err(HandshakeError::Oldstyle),
            other => return Err(HandshakeError::NotNbd(other)),
        }
        let flags = be_u16(&msg[16..18]);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle(flags));
        }
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if self.no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        self.out.extend_from_slice(&cflags.to_be_bytes());
        // NBD_OPT_GO: name length, name, one information request (block sizes).
        let name = self.export.as_bytes();
        let data_len = 4 + name.len() + 2 + 2;
        put_option_header(&mut self.out, OPT_GO, data_len as u32);
        self.out
            .extend_from_slice(&(name.len() as u32).to_be_bytes());
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(&1u16.to_be_bytes());
        self.out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.state = State::GoReply;
        Ok(())
    }

    fn on_reply_header(&mut self, msg: &[u8]) -> Result<Option<Export>, HandshakeError> {
        let magic = be_u64(&msg[0..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(HandshakeError::BadReplyMagic(magic));
        }
        let option = be_u32(&msg[8..12]);
        if option != OPT_GO {
            return Err(HandshakeError::WrongOption {
                want: OPT_GO,
                got: option,
            });
        }
        self.replies += 1;
        if self.replies > REPLIES_MAX {
            return Err(HandshakeError::TooManyReplies);
        }
        let reply = be_u32(&msg[12..16]);
        let len = be_u32(&msg[16..20]);
        if len > REPLY_DATA_MAX_BYTES {
            return Err(HandshakeError::ReplyTooLarge(len));
        }
        if len == 0 {
            return self.on_reply(reply, &[]);
        }
        self.state = State::GoReplyData { reply, len };
        Ok(None)
    }

    fn on_reply(&mut self, reply: u32, data: &[u8]) -> Result<Option<Export>, HandshakeError> {
        self.state = State::GoReply;
        match reply {
            REP_INFO => self.on_info(data).map(|()| None),
            REP_ACK => self.on_ack().map(Some),
            REP_ERR_UNSUP => {
                // A pre-GO server: fall back to NBD_OPT_EXPORT_NAME (no error path;
                // the server just drops the connection for an unknown export).
                let name = self.export.as_bytes();
                put_option_header(&mut self.out, OPT_EXPORT_NAME, name.len() as u32);
                self.out.extend_from_slice(name);
                self.state = State::ExportNameReply;
                Ok(None)
            }
            r if r & REP_FLAG_ERROR != 0 => Err(HandshakeError::Refused {
                export: self.export.clone(),
                name: rep_err_name(r),
                message: String::from_utf8_lossy(&data[..data.len().min(STRING_MAX_BYTES)])
                    .into_owned(),
            }),
            other => Err(HandshakeError::UnexpectedReply(other)),
        }
    }

    fn on_info(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if data.len() < 2 {
            return Err(HandshakeError::Malformed("NBD_REP_INFO"));
        }
        match be_u16(&data[0..2]) {
            INFO_EXPORT => {
                if data.len() != INFO_EXPORT_LEN {
                    return Err(HandshakeError::Malformed("NBD_INFO_EXPORT"));
                }
                self.size = Some((be_u64(&data[2..10]), be_u16(&data[10..12])));
            }
            INFO_BLOCK_SIZE => {
                if data.len() != INFO_BLOCK_SIZE_LEN {
                    return Err(HandshakeError::Malformed("NBD_INFO_BLOCK_SIZE"));
                }
                let (min, pref, max) = (
                    be_u32(&data[2..6]),
                    be_u32(&data[6..10]),
                    be_u32(&data[10..14]),
                );
                let ok = min.is_power_of_two()
                    && min <= 65_536
                    && pref.is_power_of_two()
                    && pref >= min.max(512)
                    && max >= min
                    && (max == u32::MAX || max % min == 0);
                if !ok {
                    return Err(HandshakeError::BadBlockSizes(min, pref, max));
                }
                self.block = Some((min, pref, max));
            }
            // The spec: a client MUST ignore information it does not understand.
            _ => {}
        }
        Ok(())
    }

    fn on_ack(&mut self) -> Result<Export, HandshakeError> {
        let (size_bytes, transmission_flags) =
            self.size.ok_or(HandshakeError::MissingExportInfo)?;
        let (min, pref, max) = self.block.unwrap_or((1, 4096, PAYLOAD_DEFAULT_MAX_BYTES));
        Ok(Export {
            size_bytes,
            transmission_flags,
            block_size_min: min,
            block_size_preferred: pref,
            block_size_max: max,
            via_go: true,
        })
    }
}

fn put_option_header(out: &mut Vec<u8>, option: u32, len: u32) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(flags: u16) -> Vec<u8> {
        let mut g = NBD_MAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&flags.to_be_bytes());
        g
    }

    fn reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut r = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        r
    }

    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&size.to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        d
    }

    fn info_block(min: u32, pref: u32, max: u32) -> Vec<u8> {
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_with_block_sizes_byte_by_byte() {
        let mut hs = ClientHandshake::new("vol0").expect("name");
        let mut server = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        server.extend(reply(OPT_GO, REP_INFO, &info_block(512, 4096, 1 << 20)));
        // Unknown info types must be ignored, not refused.
        server.extend(reply(OPT_GO, REP_INFO, &[0, 99, 1, 2, 3]));
        server.extend(reply(OPT_GO, REP_INFO, &info_export(1 << 30, 0x0d)));
        server.extend(reply(OPT_GO, REP_ACK, &[]));
        let mut done = None;
        for (i, b) in server.iter().enumerate() {
            let (used, st) = hs.feed(std::slice::from_ref(b)).expect("feed");
            assert_eq!(used, 1);
            if let Status::Done(e) = st {
                assert_eq!(i, server.len() - 1, "done only at the last byte");
                done = Some(e);
            }
        }
        let e = done.expect("handshake finished");
        assert_eq!(e.size_bytes, 1 << 30);
        assert_eq!(e.transmission_flags, 0x0d);
        assert_eq!((e.block_size_min, e.block_size_max), (512, 1 << 20));
        assert!(e.via_go && e.can_flush() && !e.read_only());

        let out = hs.take_output();
        assert_eq!(
            &out[0..4],
            &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()
        );
        assert_eq!(be_u64(&out[4..12]), IHAVEOPT);
        assert_eq!(be_u32(&out[12..16]), OPT_GO);
        assert_eq!(be_u32(&out[16..20]) as usize, 4 + 4 + 2 + 2);
        assert_eq!(be_u32(&out[20..24]), 4);
        assert_eq!(&out[24..28], b"vol0");
        assert_eq!(be_u16(&out[28..30]), 1);
        assert_eq!(be_u16(&out[30..32]), INFO_BLOCK_SIZE);
        assert_eq!(out.len(), 32);
    }

    #[test]
    fn refused_export_reports_the_error_and_message() {
        let mut hs = ClientHandshake::new("nope").expect("name");
        let mut server = greeting(FLAG_FIXED_NEWSTYLE);
        server.extend(reply(OPT_GO, REP_FLAG_ERROR + 6, b"no such export"));
        let err = hs.feed(&server).expect_err("refused");
        assert!(
            matches!(&err, HandshakeError::Refused { name: "NBD_REP_ERR_UNKNOWN", message, .. } if message == "no such export"),
            "{err}"
        );
    }

    #[test]
    fn export_name_fallback_reads_padding_unless_no_zeroes() {
        for no_zeroes in [false, true] {
            let flags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
            let mut hs = ClientHandshake::new("x").expect("name");
            let mut server = greeting(flags);
            server.extend(reply(OPT_GO, REP_ERR_UNSUP, &[]));
            server.extend_from_slice(&4096u64.to_be_bytes());
            server.extend_from_slice(&3u16.to_be_bytes());
            if !no_zeroes {
                server.extend_from_slice(&[0; EXPORT_NAME_ZEROES_LEN]);
            }
            server.extend_from_slice(b"TRANSMISSION");
            let (used, st) = hs.feed(&server).expect("feed");
            let Status::Done(e) = st else {
                panic!("not done: {st:?}")
            };
            assert_eq!(used, server.len() - 12, "must not eat transmission bytes");
            assert_eq!(
                (e.size_bytes, e.transmission_flags, e.via_go),
                (4096, 3, false)
            );
            let out = hs.take_output();
            let tail = &out[out.len() - 17..];
            assert_eq!(be_u64(&tail[0..8]), IHAVEOPT);
            assert_eq!(be_u32(&tail[8..12]), OPT_EXPORT_NAME);
            assert_eq!(be_u32(&tail[12..16]), 1);
            assert_eq!(&tail[16..], b"x");
        }
    }

    #[test]
    fn hostile_or_broken_servers_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
                "not an NBD server",
            ),
            (
                {
                    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
                    g.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
                    g.extend_from_slice(&[0, 0]);
                    g
                },
                "oldstyle",
            ),
            (greeting(0), "fixed newstyle"),
            (
                {
                    let mut s = greeting(FLAG_FIXED_NEWSTYLE);
                    let mut r = reply(OPT_GO, REP_INFO, &[]);
                    r[16..20].copy_from_slice(&(REPLY_DATA_MAX_BYTES + 1).to_be_bytes());
                    s.extend(r);
                    s
                },
                "limit",
            ),
            (
                {
                    let mut s = greeting(FLAG_FIXED_NEWSTYLE);
                    s.extend(reply(OPT_GO, REP_ACK, &[]));
                    s
                },
                "without NBD_INFO_EXPORT",
            ),
            (
                {
                    let mut s = greeting(FLAG_FIXED_NEWSTYLE);
                    s.extend(reply(OPT_GO, REP_INFO, &info_block(3, 4096, 4096)));
                    s
                },
                "block sizes",
            ),
            (
                {
                    let mut s = greeting(FLAG_FIXED_NEWSTYLE);
                    s.extend(reply(OPT_EXPORT_NAME, REP_ACK, &[]));
                    s
                },
                "while waiting",
            ),
        ];
        for (bytes, want) in cases {
            let mut hs = ClientHandshake::new("v").expect("name");
            let err = hs.feed(&bytes).expect_err(want);
            assert!(err.to_string().contains(want), "{err} lacks {want:?}");
        }
        assert_eq!(
            ClientHandshake::new(&"n".repeat(STRING_MAX_BYTES + 1)).err(),
            Some(HandshakeError::NameTooLong)
        );
    }

    #[test]
    fn check_io_enforces_the_negotiated_constraints() {
        let e = Export {
            size_bytes: 1 << 20,
            transmission_flags: 1,
            block_size_min: 512,
            block_size_preferred: 4096,
            block_size_max: 65_536,
            via_go: true,
        };
        assert!(e.check_io(4096, 0, 1 << 20).is_ok());
        assert!(e.check_io(256, 0, 1 << 20).is_err(), "below minimum");
        assert!(e.check_io(131_072, 0, 1 << 20).is_err(), "above maximum");
        assert!(e.check_io(4096, 100, 4096).is_err(), "unaligned offset");
        assert!(e.check_io(4096, 4096, 1 << 20).is_err(), "past the end");
        assert!(
            e.check_io(4096, 0, 512).is_err(),
            "region smaller than a block"
        );
        assert!(e.check_io(4096, u64::MAX - 10, 4096).is_err(), "overflow");
    }
}
