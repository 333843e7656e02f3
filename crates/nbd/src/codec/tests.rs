//! Transmission codec tests: header layout, validation table, decoder streaming and drain.

use super::*;
use crate::proto::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

/// A writable 64 MiB export with 4 KiB blocks, every feature, structured replies and one
/// metadata context.
fn full() -> RequestPolicy {
    RequestPolicy {
        size_bytes: 64 * MIB,
        transmission_flags: TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_DF
            | TF_CAN_MULTI_CONN
            | TF_SEND_CACHE
            | TF_SEND_FAST_ZERO,
        structured_replies: true,
        meta_context_count: 1,
        block_size_min: 4096,
        payload_max_bytes: PAYLOAD_MAX_BYTES,
        unaligned: Unaligned::Reject,
    }
}

/// What a client gets without negotiating anything: simple replies, no optional commands.
fn bare() -> RequestPolicy {
    RequestPolicy {
        transmission_flags: TF_HAS_FLAGS,
        structured_replies: false,
        meta_context_count: 0,
        block_size_min: 1,
        ..full()
    }
}

fn read_only() -> RequestPolicy {
    RequestPolicy {
        transmission_flags: TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_DF,
        ..full()
    }
}

fn req(command: Command, flags: CommandFlags, offset: u64, length: u32) -> Request {
    Request {
        cookie: 0xc0c0,
        command,
        flags,
        offset,
        length,
    }
}

fn plain(command: Command, offset: u64, length: u32) -> Request {
    req(command, CommandFlags::default(), offset, length)
}

const NONE: CommandFlags = CommandFlags::from_bits(0);

#[test]
fn header_layout_matches_the_spec() {
    let bytes: [u8; 28] = [
        0x25, 0x60, 0x95, 0x13, // NBD_REQUEST_MAGIC
        0x00, 0x01, // flags: FUA
        0x00, 0x01, // type: WRITE
        1, 2, 3, 4, 5, 6, 7, 8, // cookie
        0, 0, 0, 0, 0, 0, 0x20, 0, // offset 0x2000
        0, 0, 0x10, 0, // length 4096
    ];
    let r = decode_request_header(&bytes).unwrap();
    assert_eq!(
        r,
        Request {
            cookie: 0x0102_0304_0506_0708,
            command: Command::Write,
            flags: CommandFlags::FUA,
            offset: 0x2000,
            length: 4096,
        }
    );
    assert_eq!(r.payload_len(), 4096);
    assert_eq!(r.encode(), bytes);
}

#[test]
fn bad_request_magic_is_fatal() {
    let mut bytes = plain(Command::Read, 0, 4096).encode();
    bytes[3] = 0x14; // the reserved log magic 0x25609514
    assert_eq!(
        decode_request_header(&bytes),
        Err(ProtocolError::BadRequestMagic(0x2560_9514))
    );
    let mut dec = TransmissionDecoder::new(full());
    assert!(dec.feed(&bytes).is_err());
    // The position in the stream is lost: a valid header afterwards is not parsed.
    let valid = plain(Command::Read, 0, 4096).encode();
    assert_eq!(dec.feed(&valid), Err(ProtocolError::AfterFatalError));
}

#[test]
fn command_wire_values_round_trip() {
    for value in 0..=20u16 {
        assert_eq!(Command::from_wire(value).wire(), value);
    }
    assert_eq!(Command::from_wire(8), Command::Unknown(8));
}

#[test]
fn valid_requests_execute() {
    let p = full();
    let fua = CommandFlags::FUA;
    let cases = [
        req(Command::Read, NONE, 0, 4096),
        req(Command::Read, CommandFlags::DF, 4096, 65536),
        req(Command::Read, fua, 64 * MIB - 4096, 4096), // FUA is valid on every command
        req(Command::Write, fua, 0, PAYLOAD_MAX_BYTES),
        req(Command::Flush, NONE, 0, 0),
        req(Command::Trim, NONE, 0, PAYLOAD_MAX_BYTES + 4096), // no payload: no cap
        req(Command::WriteZeroes, CommandFlags::NO_HOLE, 0, 8192),
        req(Command::WriteZeroes, CommandFlags::FAST_ZERO, 0, 8192),
        req(Command::Cache, NONE, 1, 3), // a hint: no alignment needed
        req(Command::BlockStatus, CommandFlags::REQ_ONE, 0, 1),
    ];
    for r in cases {
        assert_eq!(validate(&r, &p), Ok(Admission::Execute), "{r:?}");
    }
}

#[test]
fn zero_length_requests_are_no_ops() {
    let p = full();
    for command in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
        Command::Cache,
    ] {
        assert_eq!(validate(&plain(command, 4096, 0), &p), Ok(Admission::NoOp));
        // At the very end of the export too, but not past it.
        assert_eq!(
            validate(&plain(command, 64 * MIB, 0), &p),
            Ok(Admission::NoOp)
        );
        assert!(validate(&plain(command, 64 * MIB + 4096, 0), &p).is_err());
    }
    // A block status reply needs a nonzero extent, so zero length cannot be answered.
    assert_eq!(
        validate(&plain(Command::BlockStatus, 0, 0), &p),
        Err(NbdErrno::Inval)
    );
}

#[test]
fn offset_plus_length_wrapping_past_2_64_is_einval() {
    let p = RequestPolicy {
        size_bytes: u64::MAX,
        block_size_min: 1,
        ..full()
    };
    let offset = u64::MAX - 10;
    for command in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
    ] {
        assert_eq!(
            validate(&plain(command, offset, 4096), &p),
            Err(NbdErrno::Inval)
        );
    }
    assert_eq!(
        validate(&plain(Command::Read, offset, 10), &p),
        Ok(Admission::Execute),
        "ending exactly at 2^64 - 1 is fine"
    );
}

#[test]
fn past_the_end_is_einval_for_reads_and_enospc_for_writes() {
    let p = full();
    let end = 64 * MIB;
    assert_eq!(
        validate(&plain(Command::Read, end, 4096), &p),
        Err(NbdErrno::Inval)
    );
    assert_eq!(
        validate(&plain(Command::Read, end - 4096, 8192), &p),
        Err(NbdErrno::Inval)
    );
    assert_eq!(
        validate(&plain(Command::Trim, end, 4096), &p),
        Err(NbdErrno::Inval)
    );
    assert_eq!(
        validate(&plain(Command::Cache, end, 4096), &p),
        Err(NbdErrno::Inval)
    );
    let bs = plain(Command::BlockStatus, end, 4096);
    assert_eq!(validate(&bs, &p), Err(NbdErrno::Inval));
    assert_eq!(
        validate(&plain(Command::Write, end, 4096), &p),
        Err(NbdErrno::NoSpc)
    );
    let wz = plain(Command::WriteZeroes, end - 4096, 8192);
    assert_eq!(validate(&wz, &p), Err(NbdErrno::NoSpc));
}

#[test]
fn oversized_payloads() {
    let over = PAYLOAD_MAX_BYTES + 4096;
    let structured = full();
    let simple = RequestPolicy {
        structured_replies: false,
        transmission_flags: full().transmission_flags & !TF_SEND_DF,
        ..full()
    };
    let read = plain(Command::Read, 0, over);
    assert_eq!(validate(&read, &structured), Err(NbdErrno::Overflow));
    assert_eq!(validate(&read, &simple), Err(NbdErrno::Inval));
    let write = plain(Command::Write, 0, over);
    assert_eq!(validate(&write, &structured), Err(NbdErrno::Inval));
    // Commands without payload may exceed the payload limit.
    for command in [
        Command::Trim,
        Command::WriteZeroes,
        Command::Cache,
        Command::BlockStatus,
    ] {
        assert_eq!(
            validate(&plain(command, 0, over), &structured),
            Ok(Admission::Execute)
        );
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let p = read_only();
    for command in [Command::Write, Command::Trim, Command::WriteZeroes] {
        assert_eq!(validate(&plain(command, 0, 4096), &p), Err(NbdErrno::Perm));
        // Even when the request is otherwise invalid: EPERM is what the spec asks for.
        assert_eq!(validate(&plain(command, 1, 1), &p), Err(NbdErrno::Perm));
    }
    assert_eq!(
        validate(&plain(Command::Read, 0, 4096), &p),
        Ok(Admission::Execute)
    );
    assert_eq!(
        validate(&plain(Command::Flush, 0, 0), &p),
        Ok(Admission::Execute)
    );
}

#[test]
fn unknown_commands_and_flags_are_einval() {
    let p = full();
    assert_eq!(
        validate(&plain(Command::Unknown(8), 0, 0), &p),
        Err(NbdErrno::Inval)
    );
    assert_eq!(
        validate(&plain(Command::Unknown(0xffff), 0, 0), &p),
        Err(NbdErrno::Inval)
    );
    for bits in [1 << 5, 1 << 15, 0xffe0] {
        let r = req(Command::Read, CommandFlags::from_bits(bits), 0, 4096);
        assert_eq!(validate(&r, &p), Err(NbdErrno::Inval), "bits {bits:#x}");
    }
    // Known flags on commands they are not documented for.
    let misplaced = [
        (Command::Read, CommandFlags::REQ_ONE),
        (Command::Read, CommandFlags::NO_HOLE),
        (Command::Write, CommandFlags::DF),
        (Command::Write, CommandFlags::FAST_ZERO),
        (Command::Trim, CommandFlags::NO_HOLE),
        (Command::BlockStatus, CommandFlags::DF),
        (Command::Cache, CommandFlags::REQ_ONE),
        (Command::Flush, CommandFlags::NO_HOLE),
    ];
    for (command, flag) in misplaced {
        assert_eq!(
            validate(&req(command, flag, 0, 4096), &p),
            Err(NbdErrno::Inval)
        );
    }
}

#[test]
fn flags_and_commands_need_their_transmission_flag() {
    let p = bare();
    let cases = [
        req(Command::Read, CommandFlags::DF, 0, 4096), // DF without structured replies
        req(Command::Write, CommandFlags::FUA, 0, 4096),
        req(Command::WriteZeroes, NONE, 0, 4096),
        req(Command::Trim, NONE, 0, 4096),
        req(Command::Flush, NONE, 0, 0),
        req(Command::BlockStatus, NONE, 0, 4096),
    ];
    for r in cases {
        assert_eq!(validate(&r, &p), Err(NbdErrno::Inval), "{r:?}");
    }
    // Clients send CACHE without the flag; it is harmless, so it is served.
    assert_eq!(
        validate(&plain(Command::Cache, 0, 512), &p),
        Ok(Admission::Execute)
    );
    // FAST_ZERO needs SEND_FAST_ZERO even when WRITE_ZEROES is advertised.
    let no_fast = RequestPolicy {
        transmission_flags: full().transmission_flags & !TF_SEND_FAST_ZERO,
        ..full()
    };
    let fast = req(Command::WriteZeroes, CommandFlags::FAST_ZERO, 0, 4096);
    assert_eq!(validate(&fast, &no_fast), Err(NbdErrno::Inval));
}

#[test]
fn block_status_needs_a_context_and_structured_replies() {
    let no_context = RequestPolicy {
        meta_context_count: 0,
        ..full()
    };
    let r = plain(Command::BlockStatus, 0, 4096);
    assert_eq!(validate(&r, &no_context), Err(NbdErrno::Inval));
    assert_eq!(validate(&r, &full()), Ok(Admission::Execute));
}

#[test]
fn flush_offset_and_length_must_be_zero() {
    let p = full();
    assert_eq!(
        validate(&plain(Command::Flush, 4096, 0), &p),
        Err(NbdErrno::Inval)
    );
    assert_eq!(
        validate(&plain(Command::Flush, 0, 4096), &p),
        Err(NbdErrno::Inval)
    );
}

#[test]
fn unaligned_requests_on_a_4096_block_export() {
    let strict = full();
    let rmw = RequestPolicy {
        unaligned: Unaligned::Allow,
        ..full()
    };
    for command in [
        Command::Read,
        Command::Write,
        Command::Trim,
        Command::WriteZeroes,
    ] {
        for (offset, length) in [(512, 4096), (0, 512), (4096, 4097)] {
            let r = plain(command, offset, length);
            assert_eq!(validate(&r, &strict), Err(NbdErrno::Inval), "{r:?}");
            assert_eq!(validate(&r, &rmw), Ok(Admission::Execute), "{r:?}");
        }
    }
    // Hints are rounded by the backend, not refused.
    let bs = plain(Command::BlockStatus, 512, 100);
    assert_eq!(validate(&bs, &strict), Ok(Admission::Execute));
}

#[test]
fn disconnect_ends_the_stream() {
    let mut dec = TransmissionDecoder::new(full());
    let disc = plain(Command::Disc, 0, 0).encode();
    let d = dec.feed(&disc).unwrap();
    assert!(matches!(d.event, Some(Event::Disconnect(_))));
    assert_eq!(dec.feed(b"more"), Err(ProtocolError::DataAfterDisconnect));
}

/// An owned copy of an event, for comparing whole streams.
#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Request(Request),
    NoOp(Request),
    Reject(Request, NbdErrno),
    Payload(Vec<u8>),
    Disconnect,
}

/// Decodes `bytes` in pieces of the given sizes; merges consecutive payload pieces.
fn decode_all(
    policy: RequestPolicy,
    bytes: &[u8],
    sizes: &[usize],
) -> (Vec<Owned>, Option<ProtocolError>) {
    let mut dec = TransmissionDecoder::new(policy);
    let mut events = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let len = sizes[i % sizes.len()].max(1).min(bytes.len() - pos);
        i += 1;
        let mut piece = &bytes[pos..pos + len];
        pos += len;
        while !piece.is_empty() {
            let d = match dec.feed(piece) {
                Ok(d) => d,
                Err(e) => return (events, Some(e)),
            };
            assert!(d.consumed > 0);
            assert!(dec.buffered_bytes() < REQUEST_HEADER_LEN);
            piece = &piece[d.consumed..];
            let owned = match d.event {
                None => continue,
                Some(Event::Request(r)) => Owned::Request(r),
                Some(Event::NoOp(r)) => Owned::NoOp(r),
                Some(Event::Reject { request, errno }) => Owned::Reject(request, errno),
                Some(Event::Disconnect(_)) => Owned::Disconnect,
                Some(Event::Payload { data, .. }) => {
                    if let Some(Owned::Payload(p)) = events.last_mut() {
                        p.extend_from_slice(data);
                        continue;
                    }
                    Owned::Payload(data.to_vec())
                }
            };
            events.push(owned);
        }
    }
    (events, None)
}

fn stream(parts: &[(&Request, &[u8])]) -> Vec<u8> {
    let mut v = Vec::new();
    for (r, payload) in parts {
        v.extend_from_slice(&r.encode());
        v.extend_from_slice(payload);
    }
    v
}

#[test]
fn write_payload_follows_its_request_and_rejected_writes_are_drained() {
    let good = plain(Command::Write, 0, 4096);
    let unaligned = plain(Command::Write, 100, 4096);
    let read = plain(Command::Read, 8192, 4096);
    let payload_a = vec![0xaa; 4096];
    let payload_b = vec![0xbb; 4096];
    let bytes = stream(&[
        (&good, &payload_a),
        (&unaligned, &payload_b),
        (&read, &[]),
        (&plain(Command::Disc, 0, 0), &[]),
    ]);
    let expected = vec![
        Owned::Request(good),
        Owned::Payload(payload_a),
        Owned::Reject(unaligned, NbdErrno::Inval),
        Owned::Request(read),
        Owned::Disconnect,
    ];
    for sizes in [&[usize::MAX][..], &[1], &[27, 29, 4095, 3]] {
        let (events, err) = decode_all(full(), &bytes, sizes);
        assert_eq!(err, None);
        assert_eq!(events, expected, "sizes {sizes:?}");
    }
}

#[test]
fn oversized_write_is_drained_without_buffering() {
    // u32::MAX payload bytes: drained by counting, fed from one reused 1 MiB buffer.
    let huge = plain(Command::Write, 0, u32::MAX);
    let mut dec = TransmissionDecoder::new(full());
    let header = huge.encode();
    let d = dec.feed(&header).unwrap();
    assert_eq!(
        d.event,
        Some(Event::Reject {
            request: huge,
            errno: NbdErrno::Inval
        })
    );
    assert_eq!(dec.drain_remaining(), u32::MAX);
    let chunk = vec![0u8; 1 << 20];
    let mut left = u64::from(u32::MAX);
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        let d = dec.feed(&chunk[..n]).unwrap();
        assert_eq!(d.consumed, n);
        assert_eq!(d.event, None);
        left -= n as u64;
    }
    assert_eq!(dec.drain_remaining(), 0);
    let next = plain(Command::Read, 0, 4096);
    let header = next.encode();
    let d = dec.feed(&header).unwrap();
    assert_eq!(d.event, Some(Event::Request(next)));
}

#[test]
fn write_past_the_end_and_on_read_only_exports_are_drained() {
    let cases = [
        (
            full(),
            plain(Command::Write, 64 * MIB, 4096),
            NbdErrno::NoSpc,
        ),
        (read_only(), plain(Command::Write, 0, 4096), NbdErrno::Perm),
        (
            full(),
            plain(Command::Write, 0, PAYLOAD_MAX_BYTES + 4096),
            NbdErrno::Inval,
        ),
    ];
    for (policy, write, errno) in cases {
        let payload = vec![0x5a; write.length as usize];
        let flush = plain(Command::Flush, 0, 0);
        let bytes = stream(&[(&write, &payload), (&flush, &[])]);
        let (events, err) = decode_all(policy, &bytes, &[65536]);
        assert_eq!(err, None);
        // The FLUSH right after the drained payload proves the stream stayed in step.
        assert_eq!(
            events,
            vec![Owned::Reject(write, errno), Owned::Request(flush)]
        );
    }
}

#[test]
fn zero_length_write_has_no_payload() {
    let w = plain(Command::Write, 0, 0);
    let r = plain(Command::Read, 0, 4096);
    let (events, _) = decode_all(full(), &stream(&[(&w, &[]), (&r, &[])]), &[5]);
    assert_eq!(events, vec![Owned::NoOp(w), Owned::Request(r)]);
}

#[test]
fn payload_can_bypass_feed() {
    let w = plain(Command::Write, 0, 8192);
    let mut dec = TransmissionDecoder::new(full());
    assert_eq!(
        dec.feed(&w.encode()).unwrap().event,
        Some(Event::Request(w))
    );
    assert_eq!(dec.payload_remaining(), 8192);
    // The caller received 8000 bytes straight into its buffer.
    dec.advance_payload(8000);
    let d = dec.feed(&[1u8; 300]).unwrap();
    assert_eq!(d.consumed, 192);
    assert_eq!(
        d.event,
        Some(Event::Payload {
            data: &[1u8; 192],
            remaining: 0
        })
    );
    assert_eq!(dec.payload_remaining(), 0);
}

#[test]
#[should_panic(expected = "past the payload end")]
fn advance_payload_past_the_end_is_a_caller_bug() {
    let mut dec = TransmissionDecoder::new(full());
    dec.advance_payload(1);
}

#[test]
fn from_negotiated_copies_the_export_and_caps_the_payload() {
    use crate::fuzz::StaticCatalog;
    use crate::handshake::ExportCatalog;
    let mut export = StaticCatalog::sample().lookup("disk").unwrap();
    export.block_size_max = u32::MAX;
    let n = Negotiated {
        transmission_flags: export.transmission_flags(true),
        export,
        structured_replies: true,
        meta_contexts: vec![],
        no_zeroes: true,
        block_size_acknowledged: true,
    };
    let p = RequestPolicy::from_negotiated(&n, Unaligned::Reject);
    assert_eq!(p.payload_max_bytes, PAYLOAD_MAX_BYTES);
    assert_eq!(p.block_size_min, 4096);
    assert_eq!(p.size_bytes, 64 * MIB);
    assert_eq!(p.meta_context_count, 0);
}

fn any_policy() -> impl Strategy<Value = RequestPolicy> {
    (
        any::<u16>(),
        any::<bool>(),
        0usize..3,
        0u32..4,
        any::<bool>(),
        0u64..(1 << 40),
    )
        .prop_map(
            |(flags, structured, contexts, bs, rmw, size)| RequestPolicy {
                size_bytes: size,
                transmission_flags: flags | TF_HAS_FLAGS,
                structured_replies: structured,
                meta_context_count: contexts,
                block_size_min: [1, 512, 4096, 65536][bs as usize],
                payload_max_bytes: PAYLOAD_MAX_BYTES,
                unaligned: if rmw {
                    Unaligned::Allow
                } else {
                    Unaligned::Reject
                },
            },
        )
}

/// Requests biased towards the interesting values; WRITE lengths kept small enough to
/// carry a real payload in the test.
fn any_request() -> impl Strategy<Value = Request> {
    let command = prop_oneof![
        (0u16..9).prop_map(Command::from_wire),
        any::<u16>().prop_map(Command::from_wire)
    ];
    let offset = prop_oneof![
        Just(0u64),
        Just(u64::MAX - 100),
        0u64..(1 << 41),
        any::<u64>()
    ];
    let length = prop_oneof![Just(0u32), 0u32..20_000, any::<u32>()];
    (any::<u64>(), command, 0u16..64, offset, length).prop_map(
        |(cookie, command, flags, offset, length)| {
            let length = if command == Command::Write {
                length % 20_000
            } else {
                length
            };
            Request {
                cookie,
                command,
                flags: CommandFlags::from_bits(flags),
                offset,
                length,
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Well-framed request streams: every request comes back once, in order, with its
    /// payload when accepted; the split does not matter.
    #[test]
    fn framed_streams_decode_the_same_under_any_split(
        policy in any_policy(),
        requests in prop::collection::vec(any_request(), 0..12),
        sizes in prop::collection::vec(1usize..100, 1..6),
    ) {
        let requests: Vec<Request> =
            requests.into_iter().filter(|r| r.command != Command::Disc).collect();
        let payloads: Vec<Vec<u8>> = requests
            .iter()
            .map(|r| vec![(r.cookie & 0xff) as u8; r.payload_len() as usize])
            .collect();
        let parts: Vec<(&Request, &[u8])> =
            requests.iter().zip(&payloads).map(|(r, p)| (r, &p[..])).collect();
        let bytes = stream(&parts);
        let (whole, err) = decode_all(policy.clone(), &bytes, &[usize::MAX]);
        prop_assert_eq!(err, None);
        let (split, _) = decode_all(policy.clone(), &bytes, &sizes);
        prop_assert_eq!(&whole, &split);
        let mut events = whole.into_iter();
        for (r, payload) in requests.iter().zip(&payloads) {
            match validate(r, &policy) {
                Ok(Admission::Execute) => {
                    prop_assert_eq!(events.next(), Some(Owned::Request(*r)));
                    if r.payload_len() > 0 {
                        prop_assert_eq!(events.next(), Some(Owned::Payload(payload.clone())));
                    }
                }
                Ok(Admission::NoOp) => prop_assert_eq!(events.next(), Some(Owned::NoOp(*r))),
                Err(errno) => prop_assert_eq!(events.next(), Some(Owned::Reject(*r, errno))),
            }
        }
        prop_assert_eq!(events.next(), None);
    }

    /// Garbage: no panic, bounded state, and the same outcome under any split.
    #[test]
    fn random_bytes_never_panic(
        policy in any_policy(),
        tail in prop::collection::vec(any::<u8>(), 0..512),
        sizes in prop::collection::vec(1usize..64, 1..6),
    ) {
        // Start with the magic so the garbage gets past the first check.
        let mut bytes = REQUEST_MAGIC.to_be_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let whole = decode_all(policy.clone(), &bytes, &[usize::MAX]);
        let split = decode_all(policy, &bytes, &sizes);
        prop_assert_eq!(whole, split);
    }
}
