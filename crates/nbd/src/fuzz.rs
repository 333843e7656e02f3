//! Fuzz entry points: plain functions so the cargo-fuzz targets in `fuzz/` and the corpus
//! test in this crate run the same code.
//!
//! Both take arbitrary bytes, must never panic on them, and assert the codec's invariants
//! with an independent oracle (a panic here is a bug found):
//! - consumption never exceeds the input, and the codec's own buffers stay bounded;
//! - every byte the server emits during the handshake frames as option replies (plus the
//!   `NBD_OPT_EXPORT_NAME` reply at the very end);
//! - a finished handshake's flags and contexts obey the spec's rules;
//! - every request the decoder accepts is within the export, aligned, within the payload
//!   limit, allowed on the export; every WRITE payload is delivered exactly once.
//!
//! # Input formats
//! - [`fuzz_handshake`]: byte 0 chooses how the rest is split into `feed` calls (0: one
//!   call; n: pseudo-random pieces of 1..=n bytes; 1 is byte-by-byte) and the TLS mode
//!   (0..=85 off, 86..=171 on, 172..=255 require; after an acknowledged STARTTLS the
//!   rest stands for the decrypted stream); the rest is the client's byte stream from
//!   the client flags on. After a successful GO/EXPORT_NAME the
//!   remaining bytes go to the transmission decoder.
//! - [`fuzz_transmission`]: byte 0 is an export configuration (bit 0 structured replies,
//!   bit 1 read-only, bit 2 one metadata context, bit 3 two, bit 4 allow unaligned,
//!   bits 5-6 minimum block size 1/512/4096/65536, bit 7 a minimal export without
//!   optional commands), byte 1 the split as above, bytes 2..10 the export size
//!   (big-endian u64), then the request stream.

use super::codec::{
    self, Admission, Command, CommandFlags, Event, Request, RequestPolicy, TransmissionDecoder,
    Unaligned,
};
use super::handshake::{ExportCatalog, ExportInfo, Handshake, HandshakeLimits, Negotiated, Status};
use super::proto::{self, NbdErrno, Reader};
use super::reply::{self, Extent};

/// An export catalog backed by a list; the first export is the default (`""`).
#[derive(Clone, Debug, Default)]
pub struct StaticCatalog {
    /// Exports with the metadata contexts each supports.
    pub exports: Vec<(ExportInfo, Vec<String>)>,
}

impl StaticCatalog {
    /// Three exports used by the fuzz targets, the corpus and tests: `disk` (64 MiB,
    /// 4 KiB blocks, every feature, two contexts), `ro` (read-only, 512-byte blocks) and
    /// `tiny` (3000 bytes, 1-byte blocks, minimal features).
    pub fn sample() -> StaticCatalog {
        let disk = ExportInfo {
            name: "disk".into(),
            description: "fuzz disk".into(),
            size_bytes: 64 << 20,
            read_only: false,
            block_size_min: 4096,
            block_size_preferred: 4096,
            block_size_max: proto::PAYLOAD_MAX_BYTES,
            can_trim: true,
            can_write_zeroes: true,
            can_fast_zero: true,
            can_cache: true,
            can_multi_conn: true,
            can_flush: true,
            can_fua: true,
            rotational: false,
        };
        let ro = ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size_bytes: 1 << 20,
            read_only: true,
            block_size_min: 512,
            block_size_max: 1 << 20,
            ..disk.clone()
        };
        let tiny = ExportInfo {
            name: "tiny".into(),
            description: "three thousand bytes".into(),
            size_bytes: 3000,
            block_size_min: 1,
            block_size_preferred: 512,
            can_trim: false,
            can_write_zeroes: false,
            can_fast_zero: false,
            can_cache: false,
            can_flush: false,
            can_fua: false,
            rotational: true,
            ..disk.clone()
        };
        let both = vec![
            proto::META_BASE_ALLOCATION.to_owned(),
            "x-ringblk:changed/b1".to_owned(),
        ];
        StaticCatalog {
            exports: vec![
                (disk, both),
                (ro, vec![proto::META_BASE_ALLOCATION.to_owned()]),
                (tiny, Vec::new()),
            ],
        }
    }
}

impl ExportCatalog for StaticCatalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.is_empty() {
            return self.exports.first().map(|(e, _)| e.clone());
        }
        self.exports
            .iter()
            .find(|(e, _)| e.name == name)
            .map(|(e, _)| e.clone())
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports.iter().map(|(e, _)| e.clone()).collect()
    }

    fn meta_contexts(&self, export: &str) -> Vec<String> {
        self.exports
            .iter()
            .find(|(e, _)| e.name == export)
            .map(|(_, c)| c.clone())
            .unwrap_or_default()
    }
}

/// Limits small enough for the fuzzer to reach every bound with short inputs.
pub fn fuzz_limits() -> HandshakeLimits {
    HandshakeLimits {
        option_data_max_bytes: 8192,
        option_drain_max_bytes: 1 << 16,
        options_max: 64,
        output_high_water_bytes: 4096,
        require_block_size_request: false,
        tls: crate::TlsMode::Off,
    }
}

/// Splits input into pseudo-random pieces (see the module docs for the meaning of `seed`).
struct Splitter {
    max: usize,
    state: u32,
}

impl Splitter {
    fn new(seed: u8) -> Splitter {
        Splitter {
            max: usize::from(seed),
            state: u32::from(seed) | 0x9e37_0000,
        }
    }

    fn next_len(&mut self, available: usize) -> usize {
        if self.max == 0 {
            return available;
        }
        // xorshift32: deterministic, so a crashing input replays exactly.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        let len = 1 + (self.state as usize % self.max);
        len.min(available)
    }
}

/// Runs arbitrary bytes through the handshake, then through the transmission decoder.
pub fn fuzz_handshake(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let catalog = StaticCatalog::sample();
    // The seed also picks the TLS mode (#16): NOTLS, SELECTIVETLS or FORCEDTLS; after
    // an acknowledged STARTTLS the rest of the input stands for decrypted bytes.
    let tls = match seed / 86 {
        0 => crate::TlsMode::Off,
        1 => crate::TlsMode::On,
        _ => crate::TlsMode::Require,
    };
    let limits = HandshakeLimits {
        tls,
        ..fuzz_limits()
    };
    let mut hs = Handshake::new(limits.clone());
    // Where in `sent` the replies over TLS begin.
    let mut tls_from: Option<usize> = None;
    let mut split = Splitter::new(seed);
    let mut sent = hs.take_output();
    let mut pos = 0;
    let buffer_max = (limits.option_data_max_bytes as usize).max(proto::STRING_MAX_BYTES);
    while pos < stream.len() {
        let len = split.next_len(stream.len() - pos);
        let progress = match hs.feed(&stream[pos..pos + len], &catalog) {
            Ok(progress) => progress,
            Err(_) => return check_handshake_output(&sent, false),
        };
        assert!(progress.consumed <= len);
        assert!(hs.buffered_bytes() <= buffer_max);
        assert!(hs.pending_output().len() < limits.output_high_water_bytes + 64 * 1024);
        pos += progress.consumed;
        sent.extend_from_slice(&hs.take_output());
        match progress.status {
            Status::NeedInput => assert_eq!(progress.consumed, len),
            Status::OutputFull => {}
            Status::Aborted => {
                check_no_tls_reqd(&sent, tls_from);
                return check_handshake_output(&sent, false);
            }
            Status::StartTls => {
                // Acknowledged once, and only by a server offering TLS.
                assert!(tls != crate::TlsMode::Off && tls_from.is_none());
                tls_from = Some(sent.len());
            }
            Status::Done(negotiated) => {
                // FORCEDTLS: no export before TLS.
                assert!(tls != crate::TlsMode::Require || hs.tls_active());
                check_handshake_output(&sent, true);
                check_no_tls_reqd(&sent, tls_from);
                check_negotiated(&negotiated, &catalog);
                let policy = RequestPolicy::from_negotiated(&negotiated, Unaligned::Reject);
                return run_transmission(policy, &stream[pos..], &mut split);
            }
        }
    }
    check_no_tls_reqd(&sent, tls_from);
    check_handshake_output(&sent, false);
}

/// Runs arbitrary bytes through the transmission decoder under a fuzzed export policy.
pub fn fuzz_transmission(data: &[u8]) {
    if data.len() < 10 {
        return;
    }
    let (config, split_seed) = (data[0], data[1]);
    let mut size = [0u8; 8];
    size.copy_from_slice(&data[2..10]);
    let policy = fuzz_policy(config, u64::from_be_bytes(size));
    run_transmission(policy, &data[10..], &mut Splitter::new(split_seed));
}

fn fuzz_policy(config: u8, size_bytes: u64) -> RequestPolicy {
    let bit = |n: u8| config & (1 << n) != 0;
    let block_size_min = [1, 512, 4096, 65536][usize::from((config >> 5) & 3)];
    let full = !bit(7);
    let export = ExportInfo {
        name: "fuzz".into(),
        description: String::new(),
        size_bytes,
        read_only: bit(1),
        block_size_min,
        block_size_preferred: block_size_min.max(4096),
        block_size_max: proto::PAYLOAD_MAX_BYTES,
        can_trim: full,
        can_write_zeroes: full,
        can_fast_zero: full,
        can_cache: full,
        can_multi_conn: full,
        can_flush: full,
        can_fua: full,
        rotational: false,
    };
    let structured = bit(0);
    RequestPolicy {
        size_bytes,
        transmission_flags: export.transmission_flags(structured),
        structured_replies: structured,
        meta_context_count: usize::from(bit(2)) + usize::from(bit(3)),
        block_size_min,
        payload_max_bytes: export.payload_max_bytes(),
        unaligned: if bit(4) {
            Unaligned::Allow
        } else {
            Unaligned::Reject
        },
    }
}

/// Walks the server's handshake output: greeting, option replies, and (only when the
/// handshake finished) possibly one trailing EXPORT_NAME reply.
/// The spec: no `NBD_REP_ERR_TLS_REQD` once TLS is active (replies from `from` on).
fn check_no_tls_reqd(out: &[u8], from: Option<usize>) {
    let Some(from) = from else { return };
    let mut r = Reader::new(&out[from..]);
    while r.u64() == Some(proto::OPTION_REPLY_MAGIC) {
        let (_option, kind) = (r.u32(), r.u32());
        assert_ne!(kind, Some(proto::REP_ERR_TLS_REQD), "TLS_REQD over TLS");
        let len = r.u32().unwrap_or(u32::MAX) as usize;
        if r.bytes(len).is_none() {
            return;
        }
    }
}

fn check_handshake_output(out: &[u8], done: bool) {
    let mut r = Reader::new(out);
    assert_eq!(r.u64(), Some(proto::NBD_MAGIC));
    assert_eq!(r.u64(), Some(proto::IHAVEOPT));
    assert_eq!(r.u16(), Some(proto::SERVER_HANDSHAKE_FLAGS));
    while r.remaining() > 0 {
        let left = r.remaining();
        if r.u64() != Some(proto::OPTION_REPLY_MAGIC) {
            // Only an EXPORT_NAME reply is unframed, and it ends the handshake. (No sample
            // export's size equals the option reply magic.)
            let zeroes = proto::EXPORT_NAME_REPLY_LEN + proto::EXPORT_NAME_ZEROES_LEN;
            assert!(done && (left == proto::EXPORT_NAME_REPLY_LEN || left == zeroes));
            return;
        }
        let (_option, _kind) = (r.u32(), r.u32());
        let len = r.u32().unwrap_or(u32::MAX) as usize;
        assert!(r.bytes(len).is_some(), "option reply length past output");
    }
}

fn check_negotiated(n: &Negotiated, catalog: &StaticCatalog) {
    let flags = n.transmission_flags;
    assert!(flags & proto::TF_HAS_FLAGS != 0);
    assert_eq!(flags & proto::TF_SEND_DF != 0, n.structured_replies);
    if flags & proto::TF_SEND_FAST_ZERO != 0 {
        assert!(flags & proto::TF_SEND_WRITE_ZEROES != 0);
    }
    assert!(n.meta_contexts.is_empty() || n.structured_replies);
    for (i, context) in n.meta_contexts.iter().enumerate() {
        assert!(context.id != 0);
        assert!(n.meta_contexts[..i].iter().all(|c| c.id != context.id));
        assert!(catalog
            .meta_contexts(&n.export.name)
            .contains(&context.name));
    }
    assert_eq!(catalog.lookup(&n.export.name).as_ref(), Some(&n.export));
}

/// Decodes a request stream, checks every event against an oracle, and encodes replies.
fn run_transmission(policy: RequestPolicy, stream: &[u8], split: &mut Splitter) {
    let mut dec = TransmissionDecoder::new(policy.clone());
    let mut write: Option<(Request, u64)> = None;
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < stream.len() {
        let len = split.next_len(stream.len() - pos);
        let mut piece = &stream[pos..pos + len];
        pos += len;
        while !piece.is_empty() {
            let decoded = match dec.feed(piece) {
                Ok(decoded) => decoded,
                Err(_) => return,
            };
            assert!(decoded.consumed > 0 && decoded.consumed <= piece.len());
            assert!(dec.buffered_bytes() < proto::REQUEST_HEADER_LEN);
            piece = &piece[decoded.consumed..];
            out.clear();
            match decoded.event {
                None => {}
                Some(Event::Disconnect(request)) => {
                    assert_eq!(request.command, Command::Disc);
                    return;
                }
                Some(event) => on_event(&policy, event, &mut write, &mut out),
            }
        }
    }
}

fn on_event(
    policy: &RequestPolicy,
    event: Event<'_>,
    write: &mut Option<(Request, u64)>,
    out: &mut Vec<u8>,
) {
    let structured = policy.structured_replies;
    if !matches!(event, Event::Payload { .. }) {
        assert!(write.is_none(), "new event before the WRITE payload ended");
    }
    match event {
        Event::Request(request) => {
            check_accepted(policy, &request, false);
            encode_success(policy, &request, out);
            if request.command == Command::Write {
                *write = Some((request, 0));
            }
        }
        Event::NoOp(request) => {
            check_accepted(policy, &request, true);
            reply::success_reply(out, structured, request.cookie);
        }
        Event::Reject { request, errno } => {
            assert!(NbdErrno::ALL.contains(&errno));
            assert_eq!(codec::validate(&request, policy), Err(errno));
            reply::error_reply(out, structured, request.cookie, errno, "refused");
        }
        Event::Payload { data, remaining } => {
            let Some((request, seen)) = write.as_mut() else {
                panic!("payload without an accepted WRITE");
            };
            *seen += data.len() as u64;
            assert_eq!(*seen + u64::from(remaining), u64::from(request.length));
            if remaining == 0 {
                *write = None;
            }
        }
        Event::Disconnect(_) => {}
    }
}

/// The oracle: an accepted request must satisfy these, independently of `validate`.
fn check_accepted(policy: &RequestPolicy, request: &Request, no_op: bool) {
    let command = request.command;
    assert!(!matches!(command, Command::Unknown(_) | Command::Disc));
    assert_eq!(request.flags.unknown_bits(), 0);
    let read_only = policy.transmission_flags & proto::TF_READ_ONLY != 0;
    assert!(!(read_only && command.modifies_data()));
    assert_eq!(no_op, request.length == 0 && command != Command::Flush);
    let end = request.offset.checked_add(u64::from(request.length));
    assert!(end.is_some_and(|end| end <= policy.size_bytes));
    if matches!(command, Command::Read | Command::Write) {
        assert!(request.length <= policy.payload_max_bytes);
    }
    if command == Command::BlockStatus {
        assert!(policy.structured_replies && policy.meta_context_count > 0);
        assert!(request.length > 0);
    }
    if request.flags.contains(CommandFlags::DF) {
        assert!(policy.structured_replies && command == Command::Read);
    }
    let aligned_commands = [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
    ];
    if policy.unaligned == Unaligned::Reject && aligned_commands.contains(&command) {
        let min = u64::from(policy.block_size_min);
        assert_eq!(request.offset % min, 0);
        assert_eq!(u64::from(request.length) % min, 0);
    }
    let admission = if no_op {
        Admission::NoOp
    } else {
        Admission::Execute
    };
    assert_eq!(codec::validate(request, policy), Ok(admission));
}

/// Encodes the replies a server would send for an accepted request (lengths only).
fn encode_success(policy: &RequestPolicy, request: &Request, out: &mut Vec<u8>) {
    let structured = policy.structured_replies;
    let cookie = request.cookie;
    match request.command {
        Command::Read if structured => {
            let header = reply::offset_data_header(cookie, request.offset, request.length, true);
            out.extend_from_slice(&header);
        }
        Command::BlockStatus => {
            let extent = Extent {
                length: request.length,
                flags: proto::STATE_ZERO,
            };
            for id in 1..=policy.meta_context_count as u32 {
                let done = id == policy.meta_context_count as u32;
                reply::put_block_status(out, cookie, id, &[extent], done);
            }
        }
        _ => reply::success_reply(out, structured, cookie),
    }
}

#[cfg(test)]
mod tests;
