//! Server side of the fixed newstyle handshake, sans-IO.
//!
//! [`Handshake::new`] queues the greeting; the caller sends [`Handshake::take_output`],
//! feeds whatever the client sends to [`Handshake::feed`], sends the output again, and so
//! on until `feed` reports [`Status::Done`] (enter transmission with the returned
//! [`Negotiated`]), [`Status::Aborted`] (send the output, then close) or an error (close
//! without sending more).
//!
//! # Bounds
//! - One option's data is buffered only up to [`HandshakeLimits::option_data_max_bytes`]
//!   (an `NBD_OPT_EXPORT_NAME` up to 4096 bytes); larger options are read and discarded
//!   without buffering, then answered with `NBD_REP_ERR_TOO_BIG` (or `NBD_REP_ERR_UNSUP`
//!   for options the server does not know, whose data is never buffered). Past
//!   [`HandshakeLimits::option_drain_max_bytes`] the connection is closed.
//! - Strings (export names, context queries) over 4096 bytes get `NBD_REP_ERR_TOO_BIG`;
//!   an over-long `NBD_OPT_EXPORT_NAME` closes the connection, as that option has no
//!   error reply.
//! - At most [`HandshakeLimits::options_max`] options per connection.
//! - `feed` stops consuming input while the pending output is at or above
//!   [`HandshakeLimits::output_high_water_bytes`] ([`Status::OutputFull`]), so a client that
//!   pipelines options without reading replies cannot grow the output without bound (it
//!   can exceed the mark by one option's replies).
//!
//! # Ordering
//! `feed` consumes input only up to the end of the option that finished the handshake;
//! bytes after it (the first transmission requests of an eager client) are left for the
//! transmission decoder. The option replies for that last option are still in the output
//! and must be sent before any transmission reply.
//!
//! # Choices the spec leaves open
//! - Only fixed newstyle: a client without `NBD_FLAG_C_FIXED_NEWSTYLE` is disconnected.
//! - TLS ([`TlsMode`], #16): with [`TlsMode::Off`] (NOTLS) `NBD_OPT_STARTTLS` gets
//!   `NBD_REP_ERR_UNSUP`. Otherwise it is acknowledged once (again: `NBD_REP_ERR_INVALID`)
//!   and `feed` stops with [`Status::StartTls`] right after it, so that the caller sends
//!   the ACK in the clear and reads everything after it through TLS. With
//!   [`TlsMode::Require`] (FORCEDTLS) every option before TLS but STARTTLS and ABORT gets
//!   `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` disconnects (it has no error
//!   reply). With [`TlsMode::On`] (SELECTIVETLS) the catalog decides which exports are
//!   TLS-only ([`ExportCatalog::needs_tls`]): INFO/GO on one before TLS gets
//!   `NBD_REP_ERR_TLS_REQD`. Which exports a client sees at all is the catalog's
//!   business too (the front end hands each connection a catalog filtered for it).
//! - `NBD_INFO_BLOCK_SIZE` is sent on every successful INFO/GO, requested or not, because
//!   volumes enforce their logical block size. With
//!   [`HandshakeLimits::require_block_size_request`] a GO that did not ask for it gets
//!   `NBD_REP_ERR_BLOCK_SIZE_REQD` on exports with a minimum block size above 1.
//! - A repeated `NBD_OPT_STRUCTURED_REPLY` is acknowledged again (idempotent).
//! - `NBD_OPT_LIST_META_CONTEXT` works without structured replies (the spec allows either);
//!   `NBD_OPT_SET_META_CONTEXT` without them is `NBD_REP_ERR_INVALID`.
//! - Context queries: exact names select; `ns:` (empty leaf) is a wildcard for the whole
//!   namespace in LIST and selects nothing in SET. A query without a namespace and colon
//!   is `NBD_REP_ERR_INVALID`. Selected contexts get ids 1, 2, … in catalog order.

use super::proto::{self, ProtocolError, Reader};

/// One export as the server describes it to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name (what `NBD_OPT_LIST` shows and `NBD_INFO_NAME` returns).
    pub name: String,
    /// Human-readable text for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub description: String,
    /// Export size.
    pub size_bytes: u64,
    /// Refuse WRITE, TRIM and WRITE_ZEROES with `NBD_EPERM`.
    pub read_only: bool,
    /// Smallest addressable unit: a power of two, at most 64 KiB.
    pub block_size_min: u32,
    /// Smallest efficient I/O size: a power of two, at least `max(block_size_min, 512)`.
    pub block_size_preferred: u32,
    /// Largest payload accepted; capped at [`proto::PAYLOAD_MAX_BYTES`].
    pub block_size_max: u32,
    /// Advertise `NBD_CMD_TRIM`.
    pub can_trim: bool,
    /// Advertise `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`).
    pub can_write_zeroes: bool,
    /// Advertise `NBD_CMD_FLAG_FAST_ZERO` (needs `can_write_zeroes`).
    pub can_fast_zero: bool,
    /// Advertise `NBD_CMD_CACHE`.
    pub can_cache: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub can_multi_conn: bool,
    /// Advertise `NBD_CMD_FLUSH`.
    pub can_flush: bool,
    /// Advertise `NBD_CMD_FLAG_FUA`.
    pub can_fua: bool,
    /// Set `NBD_FLAG_ROTATIONAL`.
    pub rotational: bool,
}

impl ExportInfo {
    /// The transmission flags for this export.
    ///
    /// Write-type features are not advertised on a read-only export (they would all fail
    /// with `NBD_EPERM`); `SEND_DF` only with structured replies; `SEND_FAST_ZERO` only with
    /// `SEND_WRITE_ZEROES`, as the spec requires.
    pub fn transmission_flags(&self, structured_replies: bool) -> u16 {
        let writable = !self.read_only;
        let zeroes = writable && self.can_write_zeroes;
        let pairs = [
            (true, proto::TF_HAS_FLAGS),
            (self.read_only, proto::TF_READ_ONLY),
            (self.can_flush, proto::TF_SEND_FLUSH),
            (self.can_fua, proto::TF_SEND_FUA),
            (self.rotational, proto::TF_ROTATIONAL),
            (writable && self.can_trim, proto::TF_SEND_TRIM),
            (zeroes, proto::TF_SEND_WRITE_ZEROES),
            (structured_replies, proto::TF_SEND_DF),
            (self.can_multi_conn, proto::TF_CAN_MULTI_CONN),
            (self.can_cache, proto::TF_SEND_CACHE),
            (zeroes && self.can_fast_zero, proto::TF_SEND_FAST_ZERO),
        ];
        pairs
            .iter()
            .filter(|(on, _)| *on)
            .fold(0, |flags, (_, bit)| flags | bit)
    }

    /// The maximum payload advertised and enforced: `block_size_max` capped at 32 MiB.
    pub fn payload_max_bytes(&self) -> u32 {
        self.block_size_max.min(proto::PAYLOAD_MAX_BYTES)
    }

    /// Whether the block sizes obey the spec's rules ("Size constraints"). The handshake
    /// checks this with `debug_assert!`: a violation is a server configuration bug.
    pub fn block_sizes_valid(&self) -> bool {
        let min = self.block_size_min;
        let preferred = self.block_size_preferred;
        min.is_power_of_two()
            && min <= 1 << 16
            && preferred.is_power_of_two()
            && preferred >= min.max(512)
            && self.payload_max_bytes() >= preferred
    }
}

/// The server's set of exports, asked during the handshake.
pub trait ExportCatalog {
    /// Looks up an export by the name a client sent; `""` is the default export (the server
    /// decides which, or `None`). The returned `name` is the canonical name.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export to show in `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
    /// Metadata contexts the export (by canonical name) supports, e.g. `base:allocation`.
    fn meta_contexts(&self, export: &str) -> Vec<String>;
    /// What context `context` of `export` refers to at the moment it is selected, as
    /// an opaque token kept in [`MetaContext::binding`]: a context whose name can come
    /// to mean something else later (a backup released and re-created under the same
    /// name) is answered for what the client selected, or not at all. 0 by default.
    fn meta_context_binding(&self, _export: &str, _context: &str) -> u64 {
        0
    }
    /// Whether `name` exists but is served only over TLS, asked for a name `lookup`
    /// refused before TLS (the spec's `NBD_REP_ERR_TLS_REQD`). False by default.
    fn needs_tls(&self, _name: &str) -> bool {
        false
    }
}

/// The server's TLS policy, as the NBD spec names its modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// NOTLS: `NBD_OPT_STARTTLS` is unsupported.
    #[default]
    Off,
    /// SELECTIVETLS: TLS on the client's request; exports not marked plaintext-allowed
    /// are TLS-only.
    On,
    /// FORCEDTLS: nothing but STARTTLS and ABORT before TLS.
    Require,
}

/// Bounds on what one client may make the handshake do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest option data buffered and parsed; larger options are drained and refused.
    pub option_data_max_bytes: u32,
    /// Largest option data drained before refusing; past this, hard disconnect.
    pub option_drain_max_bytes: u32,
    /// Options per connection before hard disconnect.
    pub options_max: u32,
    /// Pending output at which `feed` stops consuming input until the output is taken.
    pub output_high_water_bytes: usize,
    /// Refuse GO without an `NBD_INFO_BLOCK_SIZE` request (and EXPORT_NAME) on exports with
    /// `block_size_min > 1`. Off by default: the spec asks servers not to refuse such
    /// clients, and the transmission validator rejects their unaligned requests anyway.
    pub require_block_size_request: bool,
    /// Whether and how `NBD_OPT_STARTTLS` is served (module docs).
    pub tls: TlsMode,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            option_data_max_bytes: 64 * 1024,
            option_drain_max_bytes: 16 * 1024 * 1024,
            options_max: 4096,
            output_high_water_bytes: 256 * 1024,
            require_block_size_request: false,
            tls: TlsMode::Off,
        }
    }
}

/// A metadata context selected with `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// Id to put in `NBD_REPLY_TYPE_BLOCK_STATUS` chunks.
    pub id: u32,
    /// Context name, e.g. `base:allocation`.
    pub name: String,
    /// [`ExportCatalog::meta_context_binding`] when it was selected.
    pub binding: u64,
}

/// What the handshake agreed on; everything the transmission phase needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export entered.
    pub export: ExportInfo,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured_replies: bool,
    /// Contexts selected by the last `NBD_OPT_SET_META_CONTEXT` for this export; empty
    /// means `NBD_CMD_BLOCK_STATUS` is refused.
    pub meta_contexts: Vec<MetaContext>,
    /// Whether the client set `NBD_FLAG_C_NO_ZEROES`.
    pub no_zeroes: bool,
    /// Whether the client entered with GO and asked for `NBD_INFO_BLOCK_SIZE` (it then
    /// MUST honour the advertised sizes).
    pub block_size_acknowledged: bool,
}

/// Where the handshake stands after a [`Handshake::feed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// All input consumed; feed more when it arrives.
    NeedInput,
    /// Pending output reached the high-water mark with input left over: send the output,
    /// then feed the unconsumed rest.
    OutputFull,
    /// Transmission phase begins: send the pending output, then hand any unconsumed
    /// input to the transmission decoder.
    Done(Negotiated),
    /// The client sent `NBD_OPT_ABORT`: send the pending output (its ACK), then close.
    Aborted,
    /// `NBD_OPT_STARTTLS` was acknowledged: send the pending output in the clear, then
    /// run TLS on every byte after `consumed` (leftover input included) and feed the
    /// decrypted bytes here. The handshake goes on (it is not finished).
    StartTls,
}

/// Result of one [`Handshake::feed`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input consumed; the rest must be fed again (or, after `Done`, handed to
    /// the transmission decoder).
    pub consumed: usize,
    /// What happens next.
    pub status: Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterDrain {
    Reply(u32),
    Abort,
    StartTls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        length: u32,
    },
    Drain {
        option: u32,
        remaining: u32,
        then: AfterDrain,
    },
    Finished,
    /// A fatal error was returned; the stream position is unknown.
    Failed,
}

#[derive(Clone, Debug)]
struct SelectedMeta {
    export: String,
    contexts: Vec<MetaContext>,
}

/// Server-side fixed newstyle negotiation for one connection.
#[derive(Debug)]
pub struct Handshake {
    limits: HandshakeLimits,
    state: State,
    /// Partial header or option data; never longer than `option_data_max_bytes`.
    buf: Vec<u8>,
    output: Vec<u8>,
    options_seen: u32,
    no_zeroes: bool,
    structured_replies: bool,
    meta: Option<SelectedMeta>,
    /// TLS has been initiated (`NBD_OPT_STARTTLS` acknowledged).
    tls_active: bool,
}

/// Buffer capacity kept between options; a larger one (after a big option) is freed.
const BUF_KEEP_BYTES: usize = 4096;

impl Handshake {
    /// Starts a handshake with the greeting already queued in the output.
    pub fn new(limits: HandshakeLimits) -> Handshake {
        let greeting = proto::FixedWriter::<{ proto::GREETING_LEN }>::new()
            .u64(proto::NBD_MAGIC)
            .u64(proto::IHAVEOPT)
            .u16(proto::SERVER_HANDSHAKE_FLAGS)
            .finish();
        Handshake {
            limits,
            state: State::ClientFlags,
            buf: Vec::new(),
            output: greeting.to_vec(),
            options_seen: 0,
            no_zeroes: false,
            structured_replies: false,
            meta: None,
            tls_active: false,
        }
    }

    /// Whether `NBD_OPT_STARTTLS` was acknowledged on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Bytes waiting to be sent to the client.
    pub fn pending_output(&self) -> &[u8] {
        &self.output
    }

    /// Takes the bytes to send, leaving the output empty.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Bytes of client input held in the handshake's own buffer (bounded; for tests).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Whether `feed` returned `Done` or `Aborted`.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Consumes client bytes (any split: one byte at a time works) and queues replies.
    ///
    /// # Errors
    /// A [`ProtocolError`] means the connection must be closed without sending anything
    /// more (hard disconnect). Feeding a finished handshake is
    /// [`ProtocolError::HandshakeFinished`]; feeding after an error is
    /// [`ProtocolError::AfterFatalError`].
    pub fn feed(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, ProtocolError> {
        let result = self.feed_inner(input, catalog);
        if result.is_err() && self.state != State::Finished {
            self.state = State::Failed;
        }
        result
    }

    fn feed_inner(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Progress, ProtocolError> {
        match self.state {
            State::Finished => return Err(ProtocolError::HandshakeFinished),
            State::Failed => return Err(ProtocolError::AfterFatalError),
            _ => {}
        }
        let mut consumed = 0;
        loop {
            // With nothing left to consume, `NeedInput` says more: the caller sends the
            // output either way.
            let more = consumed < input.len();
            if more && self.output.len() >= self.limits.output_high_water_bytes {
                return Ok(Progress {
                    consumed,
                    status: Status::OutputFull,
                });
            }
            let (used, step) = self.step(&input[consumed..], catalog)?;
            consumed += used;
            match step {
                Step::Continue => {}
                Step::NeedInput => {
                    debug_assert_eq!(consumed, input.len());
                    return Ok(Progress {
                        consumed,
                        status: Status::NeedInput,
                    });
                }
                Step::Finished(Status::StartTls) => {
                    // Not finished: option haggling goes on over TLS.
                    return Ok(Progress {
                        consumed,
                        status: Status::StartTls,
                    });
                }
                Step::Finished(status) => {
                    self.state = State::Finished;
                    return Ok(Progress { consumed, status });
                }
            }
        }
    }

    /// Advances the state machine by at most one unit (a header, an option, a drain).
    fn step(
        &mut self,
        input: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<(usize, Step), ProtocolError> {
        match self.state {
            State::ClientFlags => {
                let used = self.fill(proto::CLIENT_FLAGS_LEN, input);
                if self.buf.len() < proto::CLIENT_FLAGS_LEN {
                    return Ok((used, Step::NeedInput));
                }
                let flags = Reader::new(&self.buf).u32().unwrap_or(0);
                self.buf.clear();
                self.on_client_flags(flags)?;
                Ok((used, Step::Continue))
            }
            State::OptionHeader => {
                let used = self.fill(proto::OPTION_HEADER_LEN, input);
                if self.buf.len() < proto::OPTION_HEADER_LEN {
                    return Ok((used, Step::NeedInput));
                }
                // The buffer holds exactly 16 bytes, so the defaults are never used; a zero
                // magic would be refused anyway.
                let mut r = Reader::new(&self.buf);
                let magic = r.u64().unwrap_or_default();
                let option = r.u32().unwrap_or_default();
                let length = r.u32().unwrap_or_default();
                self.buf.clear();
                self.state = self.on_option_header(magic, option, length)?;
                Ok((used, Step::Continue))
            }
            State::OptionData { option, length } => {
                let used = self.fill(length as usize, input);
                if self.buf.len() < length as usize {
                    return Ok((used, Step::NeedInput));
                }
                let data = std::mem::take(&mut self.buf);
                let finished = self.on_option(option, &data, catalog);
                self.recycle(data);
                self.state = State::OptionHeader;
                Ok((used, finished?.map_or(Step::Continue, Step::Finished)))
            }
            State::Drain {
                option,
                remaining,
                then,
            } => {
                let used = (remaining as usize).min(input.len());
                // `used <= remaining`, so the cast back cannot truncate.
                let remaining = remaining - used as u32;
                if remaining > 0 {
                    self.state = State::Drain {
                        option,
                        remaining,
                        then,
                    };
                    return Ok((used, Step::NeedInput));
                }
                self.state = State::OptionHeader;
                Ok((used, self.after_drain(option, then)))
            }
            State::Finished => Err(ProtocolError::HandshakeFinished),
            State::Failed => Err(ProtocolError::AfterFatalError),
        }
    }

    /// Copies up to `want - buf.len()` bytes into the buffer; returns how many.
    fn fill(&mut self, want: usize, input: &[u8]) -> usize {
        debug_assert!(
            want <= (self.limits.option_data_max_bytes as usize).max(proto::STRING_MAX_BYTES)
        );
        let n = want.saturating_sub(self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        n
    }

    fn recycle(&mut self, mut data: Vec<u8>) {
        data.clear();
        if data.capacity() > BUF_KEEP_BYTES {
            data = Vec::new();
        }
        self.buf = data;
    }

    fn on_client_flags(&mut self, flags: u32) -> Result<(), ProtocolError> {
        if flags & !proto::CLIENT_FLAGS_KNOWN != 0 {
            return Err(ProtocolError::UnknownClientFlags(flags));
        }
        if flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(ProtocolError::NotFixedNewstyle);
        }
        self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
        self.state = State::OptionHeader;
        Ok(())
    }

    /// Decides how to read an option's data: buffer it, or drain it and answer later.
    fn on_option_header(
        &mut self,
        magic: u64,
        option: u32,
        length: u32,
    ) -> Result<State, ProtocolError> {
        if magic != proto::IHAVEOPT {
            return Err(ProtocolError::BadOptionMagic(magic));
        }
        self.options_seen += 1;
        if self.options_seen > self.limits.options_max {
            return Err(ProtocolError::TooManyOptions(self.limits.options_max));
        }
        let forced = self.limits.tls == TlsMode::Require && !self.tls_active;
        if forced && option == proto::OPT_EXPORT_NAME {
            // FORCEDTLS: EXPORT_NAME cannot be refused with an error, so the spec says
            // to disconnect.
            return Err(ProtocolError::ExportNameRejected);
        }
        if option == proto::OPT_EXPORT_NAME {
            // No error reply exists for EXPORT_NAME: an impossible name closes the session.
            if length as usize > proto::STRING_MAX_BYTES {
                return Err(ProtocolError::ExportNameRejected);
            }
            return Ok(self.buffer_option(option, length));
        }
        let drain = |then| State::Drain {
            option,
            remaining: length,
            then,
        };
        if option == proto::OPT_ABORT {
            // The spec says to ignore data sent with ABORT.
            return Ok(drain(AfterDrain::Abort));
        }
        if length > self.limits.option_drain_max_bytes {
            return Err(ProtocolError::OptionTooLarge {
                option,
                length_bytes: length,
            });
        }
        if option == proto::OPT_STARTTLS && self.limits.tls != TlsMode::Off {
            // STARTTLS carries no data; anything else is refused before it is read.
            if length != 0 {
                return Ok(drain(AfterDrain::Reply(proto::REP_ERR_INVALID)));
            }
            return Ok(drain(AfterDrain::StartTls));
        }
        if forced {
            // FORCEDTLS: refused before its data is even looked at.
            return Ok(drain(AfterDrain::Reply(proto::REP_ERR_TLS_REQD)));
        }
        if !is_supported_option(option) {
            return Ok(drain(AfterDrain::Reply(proto::REP_ERR_UNSUP)));
        }
        if length > self.limits.option_data_max_bytes {
            return Ok(drain(AfterDrain::Reply(proto::REP_ERR_TOO_BIG)));
        }
        Ok(self.buffer_option(option, length))
    }

    fn buffer_option(&mut self, option: u32, length: u32) -> State {
        debug_assert!(self.buf.is_empty());
        self.buf.reserve_exact(length as usize);
        State::OptionData { option, length }
    }

    fn after_drain(&mut self, option: u32, then: AfterDrain) -> Step {
        match then {
            AfterDrain::Abort => {
                self.reply(option, proto::REP_ACK, &[]);
                Step::Finished(Status::Aborted)
            }
            AfterDrain::StartTls if self.tls_active => {
                let message = "TLS is already active";
                self.reply(option, proto::REP_ERR_INVALID, message.as_bytes());
                Step::Continue
            }
            AfterDrain::StartTls => {
                self.reply(option, proto::REP_ACK, &[]);
                self.tls_active = true;
                Step::Finished(Status::StartTls)
            }
            AfterDrain::Reply(reply_type) => {
                let message = match reply_type {
                    proto::REP_ERR_TOO_BIG => "option data too large",
                    proto::REP_ERR_TLS_REQD => "TLS is required: send NBD_OPT_STARTTLS first",
                    proto::REP_ERR_INVALID => "option takes no data",
                    _ => "option not supported",
                };
                self.reply(option, reply_type, message.as_bytes());
                Step::Continue
            }
        }
    }

    /// Handles one complete, bounded option. `Some` ends the handshake.
    fn on_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Option<Status>, ProtocolError> {
        match option {
            proto::OPT_EXPORT_NAME => self.export_name(data, catalog).map(Some),
            proto::OPT_LIST => {
                self.list(data, catalog);
                Ok(None)
            }
            proto::OPT_INFO | proto::OPT_GO => Ok(self.info_or_go(option, data, catalog)),
            proto::OPT_STRUCTURED_REPLY => {
                self.structured_reply(data);
                Ok(None)
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog);
                Ok(None)
            }
            _ => {
                debug_assert!(false, "option {option} should have been drained");
                self.reply(option, proto::REP_ERR_UNSUP, &[]);
                Ok(None)
            }
        }
    }

    fn export_name(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Status, ProtocolError> {
        let name = proto::parse_wire_string(data).ok_or(ProtocolError::ExportNameRejected)?;
        let export = catalog
            .lookup(name)
            .ok_or(ProtocolError::ExportNameRejected)?;
        debug_assert!(export.block_sizes_valid(), "bad block sizes: {export:?}");
        if self.limits.require_block_size_request && export.block_size_min > 1 {
            return Err(ProtocolError::BlockSizeRequired);
        }
        let flags = export.transmission_flags(self.structured_replies);
        let reply = proto::FixedWriter::<{ proto::EXPORT_NAME_REPLY_LEN }>::new()
            .u64(export.size_bytes)
            .u16(flags)
            .finish();
        self.output.extend_from_slice(&reply);
        if !self.no_zeroes {
            let zeroes = [0u8; proto::EXPORT_NAME_ZEROES_LEN];
            self.output.extend_from_slice(&zeroes);
        }
        Ok(Status::Done(self.negotiated(export, flags, false)))
    }

    fn negotiated(&mut self, export: ExportInfo, flags: u16, block_size_ack: bool) -> Negotiated {
        let meta_contexts = match self.meta.take() {
            Some(sel) if sel.export == export.name && self.structured_replies => sel.contexts,
            _ => Vec::new(),
        };
        Negotiated {
            export,
            transmission_flags: flags,
            structured_replies: self.structured_replies,
            meta_contexts,
            no_zeroes: self.no_zeroes,
            block_size_acknowledged: block_size_ack,
        }
    }

    fn list(&mut self, data: &[u8], catalog: &dyn ExportCatalog) {
        if !data.is_empty() {
            return self.reply_error(
                proto::OPT_LIST,
                proto::REP_ERR_INVALID,
                "LIST takes no data",
            );
        }
        for export in catalog.list() {
            let name = proto::clamp_string(&export.name);
            let description = proto::clamp_string(&export.description);
            let name_len = (name.len() as u32).to_be_bytes();
            let parts = [&name_len[..], name.as_bytes(), description.as_bytes()];
            self.reply_parts(proto::OPT_LIST, proto::REP_SERVER, &parts);
        }
        self.reply(proto::OPT_LIST, proto::REP_ACK, &[]);
    }

    fn structured_reply(&mut self, data: &[u8]) {
        let option = proto::OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.reply_error(option, proto::REP_ERR_INVALID, "option takes no data");
        }
        self.structured_replies = true;
        self.reply(option, proto::REP_ACK, &[]);
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Option<Status> {
        let request = match InfoRequest::parse(data) {
            Ok(request) => request,
            Err(rep) => {
                self.reply_error(option, rep.reply_type, rep.message);
                return None;
            }
        };
        let Some(export) = catalog.lookup(request.name) else {
            if !self.tls_active && catalog.needs_tls(request.name) {
                let message = "export is served over TLS only";
                self.reply_error(option, proto::REP_ERR_TLS_REQD, message);
            } else {
                self.reply_error(option, proto::REP_ERR_UNKNOWN, "no such export");
            }
            return None;
        };
        debug_assert!(export.block_sizes_valid(), "bad block sizes: {export:?}");
        let flags = export.transmission_flags(self.structured_replies);
        self.send_export_info(option, &export, flags, &request);
        let go = option == proto::OPT_GO;
        if go
            && self.limits.require_block_size_request
            && export.block_size_min > 1
            && !request.wants(proto::INFO_BLOCK_SIZE)
        {
            let message = "export requires NBD_INFO_BLOCK_SIZE";
            self.reply_error(option, proto::REP_ERR_BLOCK_SIZE_REQD, message);
            return None;
        }
        self.reply(option, proto::REP_ACK, &[]);
        if !go {
            return None;
        }
        let block_size_ack = request.wants(proto::INFO_BLOCK_SIZE);
        Some(Status::Done(self.negotiated(export, flags, block_size_ack)))
    }

    fn send_export_info(
        &mut self,
        option: u32,
        export: &ExportInfo,
        flags: u16,
        request: &InfoRequest<'_>,
    ) {
        let info_export = proto::FixedWriter::<12>::new()
            .u16(proto::INFO_EXPORT)
            .u64(export.size_bytes)
            .u16(flags)
            .finish();
        self.reply(option, proto::REP_INFO, &info_export);
        if request.wants(proto::INFO_NAME) {
            self.reply_info_string(option, proto::INFO_NAME, &export.name);
        }
        if request.wants(proto::INFO_DESCRIPTION) && !export.description.is_empty() {
            self.reply_info_string(option, proto::INFO_DESCRIPTION, &export.description);
        }
        let block_size = proto::FixedWriter::<14>::new()
            .u16(proto::INFO_BLOCK_SIZE)
            .u32(export.block_size_min)
            .u32(export.block_size_preferred)
            .u32(export.payload_max_bytes())
            .finish();
        self.reply(option, proto::REP_INFO, &block_size);
    }

    fn reply_info_string(&mut self, option: u32, info: u16, s: &str) {
        let s = proto::clamp_string(s);
        let parts = [&info.to_be_bytes()[..], s.as_bytes()];
        self.reply_parts(option, proto::REP_INFO, &parts);
    }

    fn meta_context(&mut self, option: u32, data: &[u8], catalog: &dyn ExportCatalog) {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata contexts
            // (including when this command fails)".
            self.meta = None;
            if !self.structured_replies {
                let message = "structured replies not negotiated";
                return self.reply_error(option, proto::REP_ERR_INVALID, message);
            }
        }
        let request = match MetaRequest::parse(data) {
            Ok(request) => request,
            Err(rep) => return self.reply_error(option, rep.reply_type, rep.message),
        };
        let Some(export) = catalog.lookup(request.export) else {
            return self.reply_error(option, proto::REP_ERR_UNKNOWN, "no such export");
        };
        let available = catalog.meta_contexts(&export.name);
        let mut selected = Vec::new();
        for name in available.iter().filter(|c| request.matches(c, set)) {
            let name = proto::clamp_string(name);
            // Ids start at 1 and are unique within the selection; LIST sends the reserved 0.
            let id = if set { selected.len() as u32 + 1 } else { 0 };
            let parts = [&id.to_be_bytes()[..], name.as_bytes()];
            self.reply_parts(option, proto::REP_META_CONTEXT, &parts);
            if set {
                selected.push(MetaContext {
                    id,
                    name: name.to_owned(),
                    binding: catalog.meta_context_binding(&export.name, name),
                });
            }
        }
        if set {
            self.meta = Some(SelectedMeta {
                export: export.name,
                contexts: selected,
            });
        }
        self.reply(option, proto::REP_ACK, &[]);
    }

    fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) {
        self.reply_parts(option, reply_type, &[data]);
    }

    fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) {
        debug_assert!(reply_type & (1 << 31) != 0);
        self.reply(option, reply_type, message.as_bytes());
    }

    /// Queues one option reply whose data is the concatenation of `parts`.
    fn reply_parts(&mut self, option: u32, reply_type: u32, parts: &[&[u8]]) {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        // Server-built data: names and messages are clamped to 4096 bytes.
        debug_assert!(length <= 3 * proto::STRING_MAX_BYTES);
        let header = proto::FixedWriter::<{ proto::OPTION_REPLY_HEADER_LEN }>::new()
            .u64(proto::OPTION_REPLY_MAGIC)
            .u32(option)
            .u32(reply_type)
            .u32(length as u32)
            .finish();
        self.output.extend_from_slice(&header);
        for part in parts {
            self.output.extend_from_slice(part);
        }
    }
}

enum Step {
    Continue,
    NeedInput,
    Finished(Status),
}

fn is_supported_option(option: u32) -> bool {
    matches!(
        option,
        proto::OPT_EXPORT_NAME
            | proto::OPT_ABORT
            | proto::OPT_LIST
            | proto::OPT_INFO
            | proto::OPT_GO
            | proto::OPT_STRUCTURED_REPLY
            | proto::OPT_LIST_META_CONTEXT
            | proto::OPT_SET_META_CONTEXT
    )
}

/// An option error reply: type and a message for the human at the client.
#[derive(Debug)]
struct Refusal {
    reply_type: u32,
    message: &'static str,
}

const fn invalid(message: &'static str) -> Refusal {
    Refusal {
        reply_type: proto::REP_ERR_INVALID,
        message,
    }
}

const fn too_big(message: &'static str) -> Refusal {
    Refusal {
        reply_type: proto::REP_ERR_TOO_BIG,
        message,
    }
}

/// Reads a length-prefixed client string: the length must fit the data (else INVALID),
/// then at most 4096 bytes (else TOO_BIG), then UTF-8 without NUL (else INVALID).
fn read_string<'a>(r: &mut Reader<'a>, what: &'static str) -> Result<&'a str, Refusal> {
    let len = r.u32().ok_or(invalid(what))?;
    let bytes = r.bytes(len as usize).ok_or(invalid(what))?;
    if bytes.len() > proto::STRING_MAX_BYTES {
        return Err(too_big("string longer than 4096 bytes"));
    }
    proto::parse_wire_string(bytes).ok_or(invalid("string is not UTF-8 or contains NUL"))
}

/// Data of `NBD_OPT_INFO`/`NBD_OPT_GO`: name, then a count of 16-bit info requests.
struct InfoRequest<'a> {
    name: &'a str,
    /// Exactly `2 * count` bytes of big-endian info types.
    infos: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, Refusal> {
        let mut r = Reader::new(data);
        let name = read_string(&mut r, "bad export name length")?;
        let count = r.u16().ok_or(invalid("missing info request count"))?;
        if r.remaining() != 2 * count as usize {
            return Err(invalid("info request count does not match option length"));
        }
        let infos = r.bytes(r.remaining()).unwrap_or_default();
        Ok(InfoRequest { name, infos })
    }

    fn wants(&self, info: u16) -> bool {
        self.infos
            .chunks_exact(2)
            .any(|c| u16::from_be_bytes([c[0], c[1]]) == info)
    }
}

/// Data of `NBD_OPT_{LIST,SET}_META_CONTEXT`: export name, then counted queries. Parsing
/// validates every query up front, so `queries()` afterwards cannot fail.
struct MetaRequest<'a> {
    export: &'a str,
    count: u32,
    /// The query list, validated by `parse`.
    queries: &'a [u8],
}

impl<'a> MetaRequest<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, Refusal> {
        let mut r = Reader::new(data);
        let export = read_string(&mut r, "bad export name length")?;
        let count = r.u32().ok_or(invalid("missing query count"))?;
        let queries = r.bytes(r.remaining()).unwrap_or_default();
        let mut q = Reader::new(queries);
        for _ in 0..count {
            let query = read_string(&mut q, "query length past option end")?;
            if !has_namespace(query) {
                return Err(invalid("query must start with a namespace and a colon"));
            }
        }
        if q.remaining() != 0 {
            return Err(invalid("trailing data after the queries"));
        }
        Ok(MetaRequest {
            export,
            count,
            queries,
        })
    }

    fn queries(&self) -> impl Iterator<Item = &'a str> + '_ {
        let mut r = Reader::new(self.queries);
        (0..self.count).map_while(move |_| read_string(&mut r, "").ok())
    }

    /// Whether `context` is selected (SET) or listed (LIST) by this request.
    fn matches(&self, context: &str, set: bool) -> bool {
        if self.count == 0 {
            // LIST with no queries lists everything; SET with none selects nothing.
            return !set;
        }
        self.queries().any(|query| {
            let wildcard = query.ends_with(':');
            if wildcard {
                !set && context.starts_with(query)
            } else {
                query == context
            }
        })
    }
}

/// A query must be `namespace:leaf` with a non-empty namespace of printable,
/// non-whitespace characters (the leaf may be empty).
fn has_namespace(query: &str) -> bool {
    match query.split_once(':') {
        Some((namespace, _)) => {
            !namespace.is_empty()
                && namespace
                    .chars()
                    .all(|c| !c.is_whitespace() && !c.is_control())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests;
