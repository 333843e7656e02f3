//! Transmission phase, sans-IO: request header decoding, request validation against the
//! negotiated export, and a streaming decoder that keeps the byte stream in step even
//! when a WRITE is refused.
//!
//! # Driving it
//! ```text
//! let mut dec = TransmissionDecoder::new(RequestPolicy::from_negotiated(&negotiated, Unaligned::Reject));
//! while !input.is_empty() {
//!     let Decoded { consumed, event } = dec.feed(input)?;   // Err => hard disconnect
//!     input = &input[consumed..];
//!     match event {
//!         None => {}                                        // partial header, or a drain
//!         Some(Event::Request(req)) => start(req),           // WRITE: Payload events follow
//!         Some(Event::Payload { data, remaining }) => copy(data), // remaining == 0: complete
//!         Some(Event::NoOp(req)) => reply success now,
//!         Some(Event::Reject { request, errno }) => reply errno now (payload is drained),
//!         Some(Event::Disconnect(_)) => finish in-flight, then close; stop feeding,
//!     }
//! }
//! ```
//!
//! # Bounds
//! The decoder owns a 28-byte header buffer and nothing else: payload is handed out as
//! slices of the caller's input, and a refused WRITE's payload (up to `u32::MAX` bytes) is
//! counted down without buffering. It never allocates.
//!
//! # Choices the spec leaves open
//! - Zero-length READ/WRITE/TRIM/WRITE_ZEROES/CACHE are valid no-ops ([`Admission::NoOp`]);
//!   zero-length BLOCK_STATUS is `EINVAL` because its reply needs a nonzero extent.
//! - `offset + length` wrapping past 2^64 is `EINVAL`; past the end of the export is
//!   `ENOSPC` for WRITE and WRITE_ZEROES (the spec's SHOULD) and `EINVAL` otherwise.
//! - A READ longer than the maximum payload is `EOVERFLOW` with structured replies (the
//!   spec's explicit permission) and `EINVAL` with simple replies; a longer WRITE is
//!   `EINVAL`. TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS have no payload and no cap.
//! - With [`Unaligned::Reject`], READ, WRITE, TRIM and WRITE_ZEROES must be aligned to the
//!   minimum block size (`EINVAL`); CACHE and BLOCK_STATUS are hints the backend rounds.
//! - CACHE is accepted even when not advertised: the spec notes clients that send it anyway.
//! - On a read-only export, WRITE/TRIM/WRITE_ZEROES are `EPERM` before any other check.

use super::handshake::Negotiated;
use super::proto::{self, NbdErrno, ProtocolError};

/// A transmission command (`type` field of a request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`
    Read,
    /// `NBD_CMD_WRITE`: `length` payload bytes follow the header.
    Write,
    /// `NBD_CMD_DISC`: no reply.
    Disc,
    /// `NBD_CMD_FLUSH`
    Flush,
    /// `NBD_CMD_TRIM`
    Trim,
    /// `NBD_CMD_CACHE`
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`
    BlockStatus,
    /// Anything else; always refused with `EINVAL`.
    Unknown(u16),
}

impl Command {
    /// Parses the wire value.
    pub const fn from_wire(value: u16) -> Command {
        match value {
            proto::CMD_READ => Command::Read,
            proto::CMD_WRITE => Command::Write,
            proto::CMD_DISC => Command::Disc,
            proto::CMD_FLUSH => Command::Flush,
            proto::CMD_TRIM => Command::Trim,
            proto::CMD_CACHE => Command::Cache,
            proto::CMD_WRITE_ZEROES => Command::WriteZeroes,
            proto::CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The wire value.
    pub const fn wire(self) -> u16 {
        match self {
            Command::Read => proto::CMD_READ,
            Command::Write => proto::CMD_WRITE,
            Command::Disc => proto::CMD_DISC,
            Command::Flush => proto::CMD_FLUSH,
            Command::Trim => proto::CMD_TRIM,
            Command::Cache => proto::CMD_CACHE,
            Command::WriteZeroes => proto::CMD_WRITE_ZEROES,
            Command::BlockStatus => proto::CMD_BLOCK_STATUS,
            Command::Unknown(other) => other,
        }
    }

    /// WRITE, TRIM and WRITE_ZEROES: refused with `EPERM` on a read-only export.
    pub const fn modifies_data(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }
}

/// Command flags of a request, including bits this server does not know.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CommandFlags(u16);

impl CommandFlags {
    /// `NBD_CMD_FLAG_FUA`
    pub const FUA: CommandFlags = CommandFlags(1 << 0);
    /// `NBD_CMD_FLAG_NO_HOLE`
    pub const NO_HOLE: CommandFlags = CommandFlags(1 << 1);
    /// `NBD_CMD_FLAG_DF`
    pub const DF: CommandFlags = CommandFlags(1 << 2);
    /// `NBD_CMD_FLAG_REQ_ONE`
    pub const REQ_ONE: CommandFlags = CommandFlags(1 << 3);
    /// `NBD_CMD_FLAG_FAST_ZERO`
    pub const FAST_ZERO: CommandFlags = CommandFlags(1 << 4);
    /// Every flag this server understands.
    pub const KNOWN: CommandFlags = CommandFlags(0x1f);

    /// Wraps raw wire bits (unknown bits are kept).
    pub const fn from_bits(bits: u16) -> CommandFlags {
        CommandFlags(bits)
    }

    /// The raw wire bits.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: CommandFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits outside [`CommandFlags::KNOWN`].
    pub const fn unknown_bits(self) -> u16 {
        self.0 & !Self::KNOWN.0
    }

    /// Both sets of bits.
    pub const fn union(self, other: CommandFlags) -> CommandFlags {
        CommandFlags(self.0 | other.0)
    }
}

/// One decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Opaque client value echoed in every reply.
    pub cookie: u64,
    /// What to do.
    pub command: Command,
    /// Command flags as sent.
    pub flags: CommandFlags,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length (for WRITE also the payload length).
    pub length: u32,
}

impl Request {
    /// Payload bytes that follow this header on the wire: `length` for WRITE, else 0.
    pub const fn payload_len(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }

    /// Encodes the header as a client would send it (tests, fuzz corpus, load generators).
    pub fn encode(&self) -> [u8; proto::REQUEST_HEADER_LEN] {
        proto::FixedWriter::new()
            .u32(proto::REQUEST_MAGIC)
            .u16(self.flags.bits())
            .u16(self.command.wire())
            .u64(self.cookie)
            .u64(self.offset)
            .u32(self.length)
            .finish()
    }
}

/// Decodes a 28-byte request header.
///
/// # Errors
/// [`ProtocolError::BadRequestMagic`]: the stream is out of step; close the connection.
pub fn decode_request_header(
    bytes: &[u8; proto::REQUEST_HEADER_LEN],
) -> Result<Request, ProtocolError> {
    // Fixed offsets into a fixed-size array: the reads cannot fail, so the defaults are
    // never used (and a zero magic would be refused).
    let mut r = proto::Reader::new(bytes);
    let magic = r.u32().unwrap_or_default();
    if magic != proto::REQUEST_MAGIC {
        return Err(ProtocolError::BadRequestMagic(magic));
    }
    let flags = CommandFlags::from_bits(r.u16().unwrap_or_default());
    let command = Command::from_wire(r.u16().unwrap_or_default());
    let cookie = r.u64().unwrap_or_default();
    let offset = r.u64().unwrap_or_default();
    let length = r.u32().unwrap_or_default();
    debug_assert_eq!(r.remaining(), 0);
    Ok(Request {
        cookie,
        command,
        flags,
        offset,
        length,
    })
}

/// What to do with requests not aligned to the minimum block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unaligned {
    /// Refuse with `EINVAL` (the spec's SHOULD).
    Reject,
    /// Accept; the backend does read-modify-write.
    Allow,
}

/// Everything validation needs to know about the negotiated export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Export size.
    pub size_bytes: u64,
    /// Transmission flags sent to the client: a command or flag not advertised is refused.
    pub transmission_flags: u16,
    /// Whether structured replies were negotiated.
    pub structured_replies: bool,
    /// Number of selected metadata contexts; 0 refuses BLOCK_STATUS.
    pub meta_context_count: usize,
    /// Minimum block size (alignment unit).
    pub block_size_min: u32,
    /// Largest READ/WRITE payload.
    pub payload_max_bytes: u32,
    /// Alignment policy.
    pub unaligned: Unaligned,
}

impl RequestPolicy {
    /// The policy for a finished handshake.
    pub fn from_negotiated(negotiated: &Negotiated, unaligned: Unaligned) -> RequestPolicy {
        RequestPolicy {
            size_bytes: negotiated.export.size_bytes,
            transmission_flags: negotiated.transmission_flags,
            structured_replies: negotiated.structured_replies,
            meta_context_count: negotiated.meta_contexts.len(),
            block_size_min: negotiated.export.block_size_min.max(1),
            payload_max_bytes: negotiated.export.payload_max_bytes(),
            unaligned,
        }
    }

    fn advertised(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }

    fn read_only(&self) -> bool {
        self.advertised(proto::TF_READ_ONLY)
    }
}

/// How an accepted request is to be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Do the I/O, then reply.
    Execute,
    /// Zero-length request: reply success without touching the backend.
    NoOp,
}

/// Checks a request against the negotiated export. `Err` is the errno to reply with;
/// the connection stays up. `NBD_CMD_DISC` is always `Execute`.
pub fn validate(request: &Request, policy: &RequestPolicy) -> Result<Admission, NbdErrno> {
    let command = request.command;
    if let Command::Unknown(_) = command {
        return Err(NbdErrno::Inval);
    }
    if command == Command::Disc {
        return Ok(Admission::Execute);
    }
    if command.modifies_data() && policy.read_only() {
        return Err(NbdErrno::Perm);
    }
    check_flags(request, policy)?;
    check_advertised(command, policy)?;
    check_range(request, policy)
}

/// Flags must be known, documented for the command, and advertised where the spec says so.
fn check_flags(request: &Request, policy: &RequestPolicy) -> Result<(), NbdErrno> {
    let flags = request.flags;
    let per_command = match request.command {
        Command::Read => CommandFlags::DF,
        Command::WriteZeroes => CommandFlags::NO_HOLE.union(CommandFlags::FAST_ZERO),
        Command::BlockStatus => CommandFlags::REQ_ONE,
        _ => CommandFlags::default(),
    };
    let allowed = per_command.union(CommandFlags::FUA);
    if flags.bits() & !allowed.bits() != 0 {
        return Err(NbdErrno::Inval);
    }
    let needs = [
        (CommandFlags::FUA, proto::TF_SEND_FUA),
        (CommandFlags::DF, proto::TF_SEND_DF),
        (CommandFlags::FAST_ZERO, proto::TF_SEND_FAST_ZERO),
    ];
    for (flag, transmission_flag) in needs {
        if flags.contains(flag) && !policy.advertised(transmission_flag) {
            return Err(NbdErrno::Inval);
        }
    }
    Ok(())
}

fn check_advertised(command: Command, policy: &RequestPolicy) -> Result<(), NbdErrno> {
    let ok = match command {
        Command::Flush => policy.advertised(proto::TF_SEND_FLUSH),
        Command::Trim => policy.advertised(proto::TF_SEND_TRIM),
        Command::WriteZeroes => policy.advertised(proto::TF_SEND_WRITE_ZEROES),
        Command::BlockStatus => policy.structured_replies && policy.meta_context_count > 0,
        Command::Read | Command::Write | Command::Cache | Command::Disc => true,
        Command::Unknown(_) => false,
    };
    if ok {
        Ok(())
    } else {
        Err(NbdErrno::Inval)
    }
}

fn check_range(request: &Request, policy: &RequestPolicy) -> Result<Admission, NbdErrno> {
    let Request {
        command,
        offset,
        length,
        ..
    } = *request;
    if command == Command::Flush {
        // "length and offset are reserved, and MUST be set to all-zero".
        let zero = offset == 0 && length == 0;
        return if zero {
            Ok(Admission::Execute)
        } else {
            Err(NbdErrno::Inval)
        };
    }
    let end = offset
        .checked_add(u64::from(length))
        .ok_or(NbdErrno::Inval)?;
    if length > policy.payload_max_bytes {
        match command {
            Command::Read if policy.structured_replies => return Err(NbdErrno::Overflow),
            Command::Read | Command::Write => return Err(NbdErrno::Inval),
            _ => {}
        }
    }
    if end > policy.size_bytes {
        return Err(match command {
            Command::Write | Command::WriteZeroes => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        });
    }
    let must_align = matches!(
        command,
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
    );
    if must_align && policy.unaligned == Unaligned::Reject {
        let min = u64::from(policy.block_size_min.max(1));
        if offset % min != 0 || u64::from(length) % min != 0 {
            return Err(NbdErrno::Inval);
        }
    }
    match (length, command) {
        (0, Command::BlockStatus) => Err(NbdErrno::Inval),
        (0, _) => Ok(Admission::NoOp),
        _ => Ok(Admission::Execute),
    }
}

/// What one [`TransmissionDecoder::feed`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A valid request to execute. For WRITE, `length` bytes follow as `Payload` events
    /// (or via [`TransmissionDecoder::advance_payload`]).
    Request(Request),
    /// A valid zero-length request: reply success without I/O.
    NoOp(Request),
    /// A refused request: reply with `errno`. A refused WRITE's payload is drained by the
    /// decoder; the reply may be sent at once.
    Reject {
        /// The request as decoded.
        request: Request,
        /// The error to reply with.
        errno: NbdErrno,
    },
    /// The next bytes of the current WRITE's payload, in order.
    Payload {
        /// Payload bytes (a slice of the input).
        data: &'a [u8],
        /// Payload bytes still to come after these; 0 means the payload is complete.
        remaining: u32,
    },
    /// `NBD_CMD_DISC`: finish in-flight requests, then close. Feed nothing more.
    Disconnect(Request),
}

/// Result of one [`TransmissionDecoder::feed`].
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// Input bytes consumed; always at least 1 when the input was not empty.
    pub consumed: usize,
    /// `None` when the input ran out inside a header or a drained payload.
    pub event: Option<Event<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DecodeState {
    Header,
    Payload {
        remaining: u32,
    },
    Drain {
        remaining: u32,
    },
    Disconnected,
    /// A fatal error was returned; the stream position is unknown.
    Failed,
}

/// Splits the client's byte stream into requests and WRITE payloads.
#[derive(Debug)]
pub struct TransmissionDecoder {
    policy: RequestPolicy,
    header: [u8; proto::REQUEST_HEADER_LEN],
    header_len: usize,
    state: DecodeState,
}

impl TransmissionDecoder {
    /// A decoder for a connection that negotiated `policy`.
    pub fn new(policy: RequestPolicy) -> TransmissionDecoder {
        TransmissionDecoder {
            policy,
            header: [0; proto::REQUEST_HEADER_LEN],
            header_len: 0,
            state: DecodeState::Header,
        }
    }

    /// The policy requests are validated against.
    pub fn policy(&self) -> &RequestPolicy {
        &self.policy
    }

    /// Payload bytes of the current accepted WRITE not yet delivered.
    pub fn payload_remaining(&self) -> u32 {
        match self.state {
            DecodeState::Payload { remaining } => remaining,
            _ => 0,
        }
    }

    /// Payload bytes of a refused WRITE still to be discarded.
    pub fn drain_remaining(&self) -> u32 {
        match self.state {
            DecodeState::Drain { remaining } => remaining,
            _ => 0,
        }
    }

    /// Bytes of a partial request header held (0..28).
    pub fn buffered_bytes(&self) -> usize {
        self.header_len
    }

    /// Records that `n` payload bytes of the current WRITE were received outside `feed`,
    /// e.g. straight into an I/O buffer.
    ///
    /// # Panics
    /// If `n` exceeds [`payload_remaining`](Self::payload_remaining): a caller bug that
    /// would put the stream out of step.
    pub fn advance_payload(&mut self, n: u32) {
        let remaining = self.payload_remaining();
        assert!(
            n <= remaining,
            "advance_payload({n}) past the payload end ({remaining})"
        );
        let remaining = remaining - n;
        self.state = if remaining == 0 {
            DecodeState::Header
        } else {
            DecodeState::Payload { remaining }
        };
    }

    /// Consumes input until one event is ready or the input runs out.
    ///
    /// # Errors
    /// A [`ProtocolError`] means close the connection: bad request magic, any bytes
    /// after `NBD_CMD_DISC`, or any input after an earlier error.
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, ProtocolError> {
        let result = self.feed_inner(input);
        if result.is_err() {
            self.state = DecodeState::Failed;
        }
        result
    }

    fn feed_inner<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, ProtocolError> {
        let mut consumed = 0;
        while consumed < input.len() {
            let rest = &input[consumed..];
            match self.state {
                DecodeState::Disconnected => return Err(ProtocolError::DataAfterDisconnect),
                DecodeState::Failed => return Err(ProtocolError::AfterFatalError),
                DecodeState::Payload { remaining } => {
                    let n = (remaining as usize).min(rest.len());
                    // `n <= remaining`, so it fits in u32.
                    self.advance_payload(n as u32);
                    let event = Event::Payload {
                        data: &rest[..n],
                        remaining: self.payload_remaining(),
                    };
                    return Ok(Decoded {
                        consumed: consumed + n,
                        event: Some(event),
                    });
                }
                DecodeState::Drain { remaining } => {
                    let n = (remaining as usize).min(rest.len());
                    let remaining = remaining - n as u32;
                    consumed += n;
                    self.state = if remaining == 0 {
                        DecodeState::Header
                    } else {
                        DecodeState::Drain { remaining }
                    };
                }
                DecodeState::Header => {
                    let want = proto::REQUEST_HEADER_LEN - self.header_len;
                    let n = want.min(rest.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&rest[..n]);
                    self.header_len += n;
                    consumed += n;
                    if self.header_len == proto::REQUEST_HEADER_LEN {
                        self.header_len = 0;
                        let event = self.on_header()?;
                        return Ok(Decoded {
                            consumed,
                            event: Some(event),
                        });
                    }
                }
            }
        }
        Ok(Decoded {
            consumed,
            event: None,
        })
    }

    fn on_header<'a>(&mut self) -> Result<Event<'a>, ProtocolError> {
        let request = decode_request_header(&self.header)?;
        let payload = request.payload_len();
        let verdict = validate(&request, &self.policy);
        let (state, event) = match verdict {
            _ if request.command == Command::Disc => {
                (DecodeState::Disconnected, Event::Disconnect(request))
            }
            Err(errno) if payload > 0 => (
                DecodeState::Drain { remaining: payload },
                Event::Reject { request, errno },
            ),
            Err(errno) => (DecodeState::Header, Event::Reject { request, errno }),
            Ok(Admission::NoOp) => (DecodeState::Header, Event::NoOp(request)),
            Ok(Admission::Execute) if payload > 0 => (
                DecodeState::Payload { remaining: payload },
                Event::Request(request),
            ),
            Ok(Admission::Execute) => (DecodeState::Header, Event::Request(request)),
        };
        self.state = state;
        Ok(event)
    }
}

#[cfg(test)]
mod tests;
