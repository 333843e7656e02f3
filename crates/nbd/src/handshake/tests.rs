//! Handshake tests. Client byte sequences are built by hand from the spec's layouts; the
//! server's output is parsed back into (option, reply type, data) triples.

use super::*;
use crate::fuzz::StaticCatalog;
use crate::proto::*;
use crate::testutil::{client, meta_request, name_and_infos, opt};
use proptest::prelude::*;

const FLAGS_FIXED: u32 = FLAG_C_FIXED_NEWSTYLE;
const FLAGS_FIXED_NZ: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[derive(Debug, PartialEq, Eq)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

/// Parses option replies; panics on anything unframed (a server bug).
fn parse_replies(mut out: &[u8]) -> Vec<OptReply> {
    let mut replies = Vec::new();
    while !out.is_empty() {
        let mut r = Reader::new(out);
        assert_eq!(r.u64(), Some(OPTION_REPLY_MAGIC));
        let option = r.u32().unwrap();
        let kind = r.u32().unwrap();
        let len = r.u32().unwrap() as usize;
        let data = r.bytes(len).expect("reply data").to_vec();
        replies.push(OptReply { option, kind, data });
        out = &out[20 + len..];
    }
    replies
}

/// A handshake whose greeting was taken and checked.
fn started() -> Handshake {
    let mut hs = Handshake::new(HandshakeLimits::default());
    let greeting = hs.take_output();
    assert_eq!(
        greeting,
        [
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', // NBDMAGIC
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // IHAVEOPT
            0, 3, // FIXED_NEWSTYLE | NO_ZEROES
        ]
    );
    hs
}

/// Feeds everything at once; returns the status and the replies.
fn run(client: &[u8]) -> (Result<Status, ProtocolError>, Vec<u8>) {
    run_with(HandshakeLimits::default(), client)
}

fn run_with(limits: HandshakeLimits, client: &[u8]) -> (Result<Status, ProtocolError>, Vec<u8>) {
    let catalog = StaticCatalog::sample();
    let mut hs = Handshake::new(limits);
    hs.take_output();
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        let progress = match hs.feed(&client[pos..], &catalog) {
            Ok(p) => p,
            Err(e) => return (Err(e), out),
        };
        pos += progress.consumed;
        out.extend_from_slice(&hs.take_output());
        match progress.status {
            Status::OutputFull => continue,
            Status::NeedInput => assert_eq!(pos, client.len()),
            _ => {}
        }
        return (Ok(progress.status), out);
    }
}

fn done(status: Result<Status, ProtocolError>) -> Negotiated {
    match status {
        Ok(Status::Done(n)) => n,
        other => panic!("expected Done, got {other:?}"),
    }
}

fn info_payload(reply: &OptReply) -> (u16, &[u8]) {
    assert_eq!(reply.kind, REP_INFO);
    (
        u16::from_be_bytes([reply.data[0], reply.data[1]]),
        &reply.data[2..],
    )
}

#[test]
fn go_with_structured_replies_and_base_allocation() {
    // The order qemu uses: extended headers (refused), structured replies, contexts, GO.
    let bytes = client(
        FLAGS_FIXED_NZ,
        &[
            opt(OPT_EXTENDED_HEADERS, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(
                OPT_SET_META_CONTEXT,
                &meta_request("disk", &["base:allocation"]),
            ),
            opt(OPT_GO, &name_and_infos("disk", &[INFO_BLOCK_SIZE])),
        ],
    );
    let (status, out) = run(&bytes);
    let n = done(status);
    let replies = parse_replies(&out);
    assert_eq!(replies[0].option, OPT_EXTENDED_HEADERS);
    assert_eq!(replies[0].kind, REP_ERR_UNSUP);
    assert_eq!(
        (replies[1].option, replies[1].kind),
        (OPT_STRUCTURED_REPLY, REP_ACK)
    );
    assert_eq!(replies[2].kind, REP_META_CONTEXT);
    assert_eq!(&replies[2].data[..4], &1u32.to_be_bytes());
    assert_eq!(&replies[2].data[4..], b"base:allocation");
    assert_eq!(
        (replies[3].option, replies[3].kind),
        (OPT_SET_META_CONTEXT, REP_ACK)
    );
    // GO: INFO_EXPORT, INFO_BLOCK_SIZE, ACK.
    let (kind, payload) = info_payload(&replies[4]);
    assert_eq!(kind, INFO_EXPORT);
    assert_eq!(&payload[..8], &(64u64 << 20).to_be_bytes());
    let flags = u16::from_be_bytes([payload[8], payload[9]]);
    assert_eq!(flags, n.transmission_flags);
    let (kind, payload) = info_payload(&replies[5]);
    assert_eq!(kind, INFO_BLOCK_SIZE);
    assert_eq!(payload, [0, 0, 0x10, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    assert_eq!((replies[6].option, replies[6].kind), (OPT_GO, REP_ACK));
    assert_eq!(replies.len(), 7);

    assert!(n.structured_replies && n.no_zeroes && n.block_size_acknowledged);
    assert_eq!(n.export.name, "disk");
    assert_eq!(
        n.meta_contexts,
        vec![MetaContext {
            id: 1,
            name: "base:allocation".into(),
            binding: 0,
        }]
    );
    let expected = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_DF
        | TF_CAN_MULTI_CONN
        | TF_SEND_CACHE
        | TF_SEND_FAST_ZERO;
    assert_eq!(n.transmission_flags, expected);
}

#[test]
fn info_then_go_default_export_with_name_and_description() {
    let infos = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    let bytes = client(
        FLAGS_FIXED,
        &[
            opt(OPT_INFO, &name_and_infos("", &infos)),
            opt(OPT_GO, &name_and_infos("", &infos)),
        ],
    );
    let (status, out) = run(&bytes);
    let n = done(status);
    assert!(!n.structured_replies);
    assert_eq!(
        n.transmission_flags & TF_SEND_DF,
        0,
        "DF needs structured replies"
    );
    assert!(n.meta_contexts.is_empty());
    let replies = parse_replies(&out);
    // INFO and GO must carry the same information.
    let info: Vec<_> = replies.iter().filter(|r| r.option == OPT_INFO).collect();
    let go: Vec<_> = replies.iter().filter(|r| r.option == OPT_GO).collect();
    assert_eq!(info.len(), 5);
    for (a, b) in info.iter().zip(&go) {
        assert_eq!((a.kind, &a.data), (b.kind, &b.data));
    }
    assert_eq!(info_payload(info[1]), (INFO_NAME, &b"disk"[..]));
    assert_eq!(info_payload(info[2]), (INFO_DESCRIPTION, &b"fuzz disk"[..]));
    assert_eq!(info[4].kind, REP_ACK);
}

#[test]
fn info_does_not_finish_the_handshake() {
    let bytes = client(FLAGS_FIXED, &[opt(OPT_INFO, &name_and_infos("ro", &[]))]);
    let (status, out) = run(&bytes);
    assert_eq!(status, Ok(Status::NeedInput));
    let replies = parse_replies(&out);
    let (kind, payload) = info_payload(&replies[0]);
    assert_eq!(kind, INFO_EXPORT);
    let flags = u16::from_be_bytes([payload[8], payload[9]]);
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(
        flags & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO),
        0
    );
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
}

#[test]
fn export_name_sends_124_zeroes_without_no_zeroes() {
    let bytes = client(FLAGS_FIXED, &[opt(OPT_EXPORT_NAME, b"tiny")]);
    let (status, out) = run(&bytes);
    let n = done(status);
    assert!(!n.no_zeroes && !n.block_size_acknowledged);
    assert_eq!(out.len(), 10 + 124);
    assert_eq!(&out[..8], &3000u64.to_be_bytes());
    let flags = u16::from_be_bytes([out[8], out[9]]);
    assert_eq!(flags, TF_HAS_FLAGS | TF_ROTATIONAL | TF_CAN_MULTI_CONN);
    assert!(out[10..].iter().all(|&b| b == 0));
}

#[test]
fn export_name_with_no_zeroes_sends_ten_bytes() {
    let bytes = client(FLAGS_FIXED_NZ, &[opt(OPT_EXPORT_NAME, b"")]);
    let (status, out) = run(&bytes);
    let n = done(status);
    assert!(n.no_zeroes);
    assert_eq!(n.export.name, "disk", "empty name is the default export");
    assert_eq!(out.len(), 10);
}

#[test]
fn export_name_keeps_contexts_only_for_the_same_export() {
    let set = opt(
        OPT_SET_META_CONTEXT,
        &meta_request("ro", &["base:allocation"]),
    );
    let sr = opt(OPT_STRUCTURED_REPLY, &[]);
    let same = client(
        FLAGS_FIXED_NZ,
        &[sr.clone(), set.clone(), opt(OPT_EXPORT_NAME, b"ro")],
    );
    assert_eq!(done(run(&same).0).meta_contexts.len(), 1);
    let other = client(FLAGS_FIXED_NZ, &[sr, set, opt(OPT_EXPORT_NAME, b"disk")]);
    assert!(done(run(&other).0).meta_contexts.is_empty());
}

#[test]
fn unknown_export_name_closes() {
    let bytes = client(FLAGS_FIXED, &[opt(OPT_EXPORT_NAME, b"nope")]);
    assert_eq!(run(&bytes).0, Err(ProtocolError::ExportNameRejected));
    let bad_utf8 = client(FLAGS_FIXED, &[opt(OPT_EXPORT_NAME, &[0xff])]);
    assert_eq!(run(&bad_utf8).0, Err(ProtocolError::ExportNameRejected));
}

#[test]
fn export_name_longer_than_4096_closes_before_reading_it() {
    let mut bytes = client(FLAGS_FIXED, &[]);
    // Header only: the server must not wait for (or buffer) 5000 bytes.
    bytes.extend_from_slice(&opt(OPT_EXPORT_NAME, &[])[..12]);
    bytes.extend_from_slice(&5000u32.to_be_bytes());
    assert_eq!(run(&bytes).0, Err(ProtocolError::ExportNameRejected));
}

#[test]
fn unknown_export_for_go_is_err_unknown_and_negotiation_goes_on() {
    let bytes = client(
        FLAGS_FIXED,
        &[
            opt(OPT_GO, &name_and_infos("nope", &[])),
            opt(OPT_GO, &name_and_infos("tiny", &[])),
        ],
    );
    let (status, out) = run(&bytes);
    assert_eq!(done(status).export.name, "tiny");
    let replies = parse_replies(&out);
    assert_eq!(
        (replies[0].option, replies[0].kind),
        (OPT_GO, REP_ERR_UNKNOWN)
    );
    assert!(!replies[0].data.is_empty(), "error carries a message");
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
}

#[test]
fn list_returns_every_export_then_ack() {
    let (status, out) = run(&client(FLAGS_FIXED, &[opt(OPT_LIST, &[])]));
    assert_eq!(status, Ok(Status::NeedInput));
    let replies = parse_replies(&out);
    assert_eq!(replies.len(), 4);
    assert_eq!(replies[0].kind, REP_SERVER);
    assert_eq!(&replies[0].data[..4], &4u32.to_be_bytes());
    assert_eq!(&replies[0].data[4..8], b"disk");
    assert_eq!(&replies[0].data[8..], b"fuzz disk");
    assert_eq!(&replies[1].data, &[0, 0, 0, 2, b'r', b'o']);
    assert_eq!((replies[3].option, replies[3].kind), (OPT_LIST, REP_ACK));
}

#[test]
fn list_with_data_is_invalid() {
    let (_, out) = run(&client(FLAGS_FIXED, &[opt(OPT_LIST, b"x")]));
    assert_eq!(parse_replies(&out)[0].kind, REP_ERR_INVALID);
}

#[test]
fn abort_is_acknowledged_and_ends_the_handshake() {
    let mut bytes = client(FLAGS_FIXED, &[opt(OPT_ABORT, &[])]);
    bytes.extend_from_slice(b"trailing bytes are not consumed");
    let catalog = StaticCatalog::sample();
    let mut hs = started();
    let progress = hs.feed(&bytes, &catalog).unwrap();
    assert_eq!(progress.status, Status::Aborted);
    assert_eq!(progress.consumed, 4 + 16);
    let replies = parse_replies(&hs.take_output());
    assert_eq!(
        replies,
        vec![OptReply {
            option: OPT_ABORT,
            kind: REP_ACK,
            data: vec![]
        }]
    );
    assert_eq!(
        hs.feed(b"x", &catalog),
        Err(ProtocolError::HandshakeFinished)
    );
}

#[test]
fn abort_data_is_ignored() {
    let (status, out) = run(&client(FLAGS_FIXED, &[opt(OPT_ABORT, b"ignored")]));
    assert_eq!(status, Ok(Status::Aborted));
    assert_eq!(parse_replies(&out)[0].kind, REP_ACK);
}

#[test]
fn structured_reply_with_data_is_invalid_and_not_negotiated() {
    let bytes = client(
        FLAGS_FIXED,
        &[
            opt(OPT_STRUCTURED_REPLY, b"x"),
            opt(OPT_GO, &name_and_infos("disk", &[])),
        ],
    );
    let (status, out) = run(&bytes);
    assert!(!done(status).structured_replies);
    assert_eq!(parse_replies(&out)[0].kind, REP_ERR_INVALID);
}

#[test]
fn unsupported_options_get_err_unsup_and_negotiation_continues() {
    for option in [
        OPT_EXTENDED_HEADERS,
        OPT_STARTTLS,
        OPT_PEEK_EXPORT,
        0xdead_beef,
    ] {
        let bytes = client(
            FLAGS_FIXED,
            &[
                opt(option, b"some data the server must skip"),
                opt(OPT_GO, &name_and_infos("disk", &[])),
            ],
        );
        let (status, out) = run(&bytes);
        done(status);
        let replies = parse_replies(&out);
        assert_eq!(
            (replies[0].option, replies[0].kind),
            (option, REP_ERR_UNSUP)
        );
    }
}

#[test]
fn list_meta_context_queries() {
    let sr = opt(OPT_STRUCTURED_REPLY, &[]);
    let cases: [(&[&str], &[&str]); 5] = [
        (&[], &["base:allocation", "x-ringblk:changed/b1"]), // no query lists all
        (&["base:"], &["base:allocation"]),                  // base: wildcard
        (&["base:allocation"], &["base:allocation"]),
        (&["base:nope", "unknown-ns:x"], &[]), // unknown leaf and namespace: ignored
        (&["x-ringblk:"], &["x-ringblk:changed/b1"]),
    ];
    for (queries, expected) in cases {
        let list = opt(OPT_LIST_META_CONTEXT, &meta_request("disk", queries));
        let (status, out) = run(&client(FLAGS_FIXED, &[sr.clone(), list]));
        assert_eq!(status, Ok(Status::NeedInput));
        let replies = parse_replies(&out);
        let names: Vec<&[u8]> = replies[1..replies.len() - 1]
            .iter()
            .map(|r| {
                assert_eq!(r.kind, REP_META_CONTEXT);
                assert_eq!(&r.data[..4], &[0, 0, 0, 0], "LIST ids are reserved zero");
                &r.data[4..]
            })
            .collect();
        let expected: Vec<&[u8]> = expected.iter().map(|s| s.as_bytes()).collect();
        assert_eq!(names, expected, "queries {queries:?}");
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
    }
}

#[test]
fn set_meta_context_ignores_wildcards_and_assigns_unique_ids() {
    let set = opt(
        OPT_SET_META_CONTEXT,
        &meta_request(
            "disk",
            &[
                "base:",
                "x-ringblk:changed/b1",
                "base:allocation",
                "base:allocation",
            ],
        ),
    );
    let go = opt(OPT_GO, &name_and_infos("disk", &[]));
    let bytes = client(FLAGS_FIXED, &[opt(OPT_STRUCTURED_REPLY, &[]), set, go]);
    let n = done(run(&bytes).0);
    let names: Vec<_> = n.meta_contexts.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["base:allocation", "x-ringblk:changed/b1"]);
    assert_eq!(n.meta_contexts[0].id, 1);
    assert_eq!(n.meta_contexts[1].id, 2);
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let set = opt(
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &["base:allocation"]),
    );
    let go = opt(OPT_GO, &name_and_infos("disk", &[]));
    let (status, out) = run(&client(FLAGS_FIXED, &[set, go]));
    assert!(done(status).meta_contexts.is_empty());
    assert_eq!(parse_replies(&out)[0].kind, REP_ERR_INVALID);
}

#[test]
fn failed_set_meta_context_clears_the_previous_selection() {
    let sr = opt(OPT_STRUCTURED_REPLY, &[]);
    let good = opt(
        OPT_SET_META_CONTEXT,
        &meta_request("disk", &["base:allocation"]),
    );
    let bad = opt(
        OPT_SET_META_CONTEXT,
        &meta_request("nope", &["base:allocation"]),
    );
    let go = opt(OPT_GO, &name_and_infos("disk", &[]));
    let (status, out) = run(&client(FLAGS_FIXED, &[sr, good, bad, go]));
    assert!(done(status).meta_contexts.is_empty());
    assert!(parse_replies(&out)
        .iter()
        .any(|r| r.option == OPT_SET_META_CONTEXT && r.kind == REP_ERR_UNKNOWN));
}

#[test]
fn contexts_set_for_another_export_are_not_used() {
    let sr = opt(OPT_STRUCTURED_REPLY, &[]);
    let set = opt(
        OPT_SET_META_CONTEXT,
        &meta_request("ro", &["base:allocation"]),
    );
    let go = opt(OPT_GO, &name_and_infos("disk", &[]));
    assert!(done(run(&client(FLAGS_FIXED, &[sr, set, go])).0)
        .meta_contexts
        .is_empty());
}

#[test]
fn malformed_meta_context_requests_are_invalid() {
    let sr = opt(OPT_STRUCTURED_REPLY, &[]);
    let mut past_end = meta_request("disk", &["base:allocation"]);
    let n = past_end.len();
    past_end[n - 19..n - 15].copy_from_slice(&100u32.to_be_bytes()); // query length lies
    let mut count_lies = meta_request("disk", &["base:allocation"]);
    count_lies[8..12].copy_from_slice(&2u32.to_be_bytes());
    let mut trailing = meta_request("disk", &[]);
    trailing.push(0);
    let cases = [
        past_end,
        count_lies,
        trailing,
        meta_request("disk", &["no-colon"]),
        meta_request("disk", &[":empty-namespace"]),
        vec![0, 0, 0], // truncated name length
    ];
    for data in cases {
        for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let (status, out) = run(&client(FLAGS_FIXED, &[sr.clone(), opt(option, &data)]));
            assert_eq!(status, Ok(Status::NeedInput));
            let replies = parse_replies(&out);
            assert_eq!(replies.len(), 2, "no context replies before the error");
            assert_eq!(replies[1].kind, REP_ERR_INVALID, "data {data:?}");
        }
    }
}

#[test]
fn strings_over_4096_bytes_are_too_big() {
    let long = "a".repeat(STRING_MAX_BYTES + 1);
    let query = format!("base:{}", "b".repeat(STRING_MAX_BYTES));
    let at_limit = "a".repeat(STRING_MAX_BYTES);
    let sr = opt(OPT_STRUCTURED_REPLY, &[]);
    let cases = [
        (opt(OPT_GO, &name_and_infos(&long, &[])), REP_ERR_TOO_BIG),
        (opt(OPT_INFO, &name_and_infos(&long, &[])), REP_ERR_TOO_BIG),
        (
            opt(OPT_LIST_META_CONTEXT, &meta_request(&long, &[])),
            REP_ERR_TOO_BIG,
        ),
        (
            opt(OPT_SET_META_CONTEXT, &meta_request("disk", &[&query])),
            REP_ERR_TOO_BIG,
        ),
        // 4096 bytes is a legal string: the export just does not exist.
        (
            opt(OPT_GO, &name_and_infos(&at_limit, &[])),
            REP_ERR_UNKNOWN,
        ),
    ];
    for (option, expected) in cases {
        let (status, out) = run(&client(FLAGS_FIXED, &[sr.clone(), option]));
        assert_eq!(status, Ok(Status::NeedInput));
        assert_eq!(parse_replies(&out)[1].kind, expected);
    }
}

#[test]
fn malformed_info_requests_are_invalid() {
    let mut name_too_long = name_and_infos("disk", &[]);
    name_too_long[..4].copy_from_slice(&5u32.to_be_bytes()); // eats the count
    let mut count_lies = name_and_infos("disk", &[INFO_NAME]);
    count_lies[8..10].copy_from_slice(&2u16.to_be_bytes());
    let mut nul = name_and_infos("di\0k", &[]);
    nul[4..8].copy_from_slice(b"di\0k");
    for data in [name_too_long, count_lies, nul, vec![], vec![0, 0, 0, 0, 0]] {
        let (status, out) = run(&client(FLAGS_FIXED, &[opt(OPT_GO, &data)]));
        assert_eq!(status, Ok(Status::NeedInput));
        assert_eq!(
            parse_replies(&out)[0].kind,
            REP_ERR_INVALID,
            "data {data:?}"
        );
    }
}

#[test]
fn option_past_data_limit_is_drained_then_too_big() {
    let limits = HandshakeLimits {
        option_data_max_bytes: 1024,
        ..HandshakeLimits::default()
    };
    let big = vec![0xaa; 5000];
    let bytes = client(
        FLAGS_FIXED,
        &[opt(OPT_GO, &big), opt(OPT_GO, &name_and_infos("disk", &[]))],
    );
    // Byte by byte: the drain must never buffer.
    let catalog = StaticCatalog::sample();
    let mut hs = Handshake::new(limits);
    hs.take_output();
    let mut out = Vec::new();
    let mut result = None;
    for (i, b) in bytes.iter().enumerate() {
        let progress = hs.feed(std::slice::from_ref(b), &catalog).unwrap();
        assert_eq!(progress.consumed, 1);
        assert!(hs.buffered_bytes() <= 1024);
        out.extend_from_slice(&hs.take_output());
        if let Status::Done(n) = progress.status {
            assert_eq!(i, bytes.len() - 1);
            result = Some(n);
        }
    }
    assert!(result.is_some());
    let replies = parse_replies(&out);
    assert_eq!(
        (replies[0].option, replies[0].kind),
        (OPT_GO, REP_ERR_TOO_BIG)
    );
}

#[test]
fn absurd_option_length_closes() {
    let mut bytes = client(FLAGS_FIXED, &[]);
    let mut header = opt(OPT_GO, &[]);
    header[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    bytes.extend_from_slice(&header);
    let err = run(&bytes).0.unwrap_err();
    assert_eq!(
        err,
        ProtocolError::OptionTooLarge {
            option: OPT_GO,
            length_bytes: u32::MAX
        }
    );
}

#[test]
fn bad_option_magic_closes() {
    let mut bad = opt(OPT_LIST, &[]);
    bad[0] ^= 1;
    let err = run(&client(FLAGS_FIXED, &[bad])).0.unwrap_err();
    assert!(matches!(err, ProtocolError::BadOptionMagic(_)));
}

#[test]
fn errors_are_latched() {
    let catalog = StaticCatalog::sample();
    let mut hs = started();
    let err = hs.feed(&0xffu32.to_be_bytes(), &catalog);
    assert_eq!(err, Err(ProtocolError::UnknownClientFlags(0xff)));
    let valid = client(FLAGS_FIXED, &[opt(OPT_LIST, &[])]);
    assert_eq!(
        hs.feed(&valid, &catalog),
        Err(ProtocolError::AfterFatalError)
    );
    assert!(hs.take_output().is_empty());
}

#[test]
fn client_flags_are_checked() {
    assert_eq!(
        run(&client(FLAGS_FIXED | 4, &[])).0,
        Err(ProtocolError::UnknownClientFlags(5))
    );
    assert_eq!(
        run(&client(0x8000_0001, &[])).0,
        Err(ProtocolError::UnknownClientFlags(0x8000_0001))
    );
    assert_eq!(run(&client(0, &[])).0, Err(ProtocolError::NotFixedNewstyle));
    assert_eq!(
        run(&client(FLAG_C_NO_ZEROES, &[])).0,
        Err(ProtocolError::NotFixedNewstyle)
    );
}

#[test]
fn too_many_options_close() {
    let limits = HandshakeLimits {
        options_max: 3,
        ..HandshakeLimits::default()
    };
    let list = opt(OPT_LIST, &[]);
    let three = client(FLAGS_FIXED, &[list.clone(), list.clone(), list.clone()]);
    assert_eq!(run_with(limits.clone(), &three).0, Ok(Status::NeedInput));
    let four = client(
        FLAGS_FIXED,
        &[list.clone(), list.clone(), list.clone(), list],
    );
    assert_eq!(
        run_with(limits, &four).0,
        Err(ProtocolError::TooManyOptions(3))
    );
}

#[test]
fn pipelined_options_stop_at_the_output_high_water_mark() {
    let limits = HandshakeLimits {
        output_high_water_bytes: 100,
        ..HandshakeLimits::default()
    };
    let list = opt(OPT_LIST, &[]);
    let bytes = client(FLAGS_FIXED, &[list.clone(), list.clone(), list]);
    let catalog = StaticCatalog::sample();
    let mut hs = Handshake::new(limits);
    // The greeting is not taken: 18 bytes pending.
    let first = hs.feed(&bytes, &catalog).unwrap();
    assert_eq!(first.status, Status::OutputFull);
    assert_eq!(first.consumed, 4 + 16, "one LIST answered, then stop");
    assert!(hs.pending_output().len() >= 100);
    hs.take_output();
    let second = hs.feed(&bytes[first.consumed..], &catalog).unwrap();
    assert_eq!(second.status, Status::OutputFull);
    hs.take_output();
    let third = hs
        .feed(&bytes[first.consumed + second.consumed..], &catalog)
        .unwrap();
    assert_eq!(third.status, Status::NeedInput);
}

#[test]
fn bytes_after_go_are_left_for_transmission() {
    let mut bytes = client(FLAGS_FIXED, &[opt(OPT_GO, &name_and_infos("disk", &[]))]);
    let go_end = bytes.len();
    bytes.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]);
    let catalog = StaticCatalog::sample();
    let mut hs = started();
    let progress = hs.feed(&bytes, &catalog).unwrap();
    assert!(matches!(progress.status, Status::Done(_)));
    assert_eq!(progress.consumed, go_end);
    assert!(hs.is_finished());
}

#[test]
fn block_size_request_can_be_required() {
    let limits = HandshakeLimits {
        require_block_size_request: true,
        ..HandshakeLimits::default()
    };
    let without = client(FLAGS_FIXED, &[opt(OPT_GO, &name_and_infos("disk", &[]))]);
    let (status, out) = run_with(limits.clone(), &without);
    assert_eq!(status, Ok(Status::NeedInput));
    let replies = parse_replies(&out);
    // The block size info goes out before the refusal, to save a round trip.
    assert!(replies
        .iter()
        .any(|r| r.kind == REP_INFO && r.data[..2] == [0, 3]));
    assert_eq!(replies.last().unwrap().kind, REP_ERR_BLOCK_SIZE_REQD);
    let with = client(
        FLAGS_FIXED,
        &[opt(OPT_GO, &name_and_infos("disk", &[INFO_BLOCK_SIZE]))],
    );
    assert!(done(run_with(limits.clone(), &with).0).block_size_acknowledged);
    // A 1-byte-block export needs no acknowledgement.
    let tiny = client(FLAGS_FIXED, &[opt(OPT_GO, &name_and_infos("tiny", &[]))]);
    done(run_with(limits.clone(), &tiny).0);
    let export_name = client(FLAGS_FIXED, &[opt(OPT_EXPORT_NAME, b"disk")]);
    assert_eq!(
        run_with(limits, &export_name).0,
        Err(ProtocolError::BlockSizeRequired)
    );
}

/// A realistic qemu-style session used by the split tests.
fn qemu_like_session() -> Vec<u8> {
    client(
        FLAGS_FIXED_NZ,
        &[
            opt(OPT_EXTENDED_HEADERS, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_LIST, &[]),
            opt(OPT_LIST_META_CONTEXT, &meta_request("disk", &[])),
            opt(
                OPT_SET_META_CONTEXT,
                &meta_request("disk", &["base:allocation"]),
            ),
            opt(
                OPT_INFO,
                &name_and_infos("disk", &[INFO_NAME, INFO_BLOCK_SIZE]),
            ),
            opt(OPT_GO, &name_and_infos("disk", &[INFO_BLOCK_SIZE])),
        ],
    )
}

/// Feeds `bytes` in pieces of the given sizes (cycled); returns status and full output.
fn run_split(bytes: &[u8], sizes: &[usize]) -> (Result<Status, ProtocolError>, Vec<u8>, usize) {
    let catalog = StaticCatalog::sample();
    let mut hs = Handshake::new(HandshakeLimits::default());
    let mut out = hs.take_output();
    let mut pos = 0;
    let mut i = 0;
    while pos < bytes.len() {
        let len = sizes[i % sizes.len()].max(1).min(bytes.len() - pos);
        i += 1;
        let mut piece = &bytes[pos..pos + len];
        loop {
            let progress = match hs.feed(piece, &catalog) {
                Ok(p) => p,
                // How far the failing feed got is not reported, so `pos` is not compared.
                Err(e) => return (Err(e), out, usize::MAX),
            };
            pos += progress.consumed;
            piece = &piece[progress.consumed..];
            out.extend_from_slice(&hs.take_output());
            match progress.status {
                Status::NeedInput => break,
                Status::OutputFull => continue,
                status => return (Ok(status), out, pos),
            }
        }
    }
    (Ok(Status::NeedInput), out, pos)
}

#[test]
fn byte_by_byte_feeding_gives_the_same_result() {
    let bytes = qemu_like_session();
    let (whole_status, whole_out, whole_pos) = run_split(&bytes, &[usize::MAX]);
    let (split_status, split_out, split_pos) = run_split(&bytes, &[1]);
    assert!(matches!(whole_status, Ok(Status::Done(_))));
    assert_eq!(whole_status, split_status);
    assert_eq!(whole_out, split_out);
    assert_eq!(whole_pos, split_pos);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any split of a valid session gives the same output and outcome.
    #[test]
    fn any_split_gives_the_same_result(sizes in prop::collection::vec(1usize..64, 1..16)) {
        let bytes = qemu_like_session();
        let whole = run_split(&bytes, &[usize::MAX]);
        let split = run_split(&bytes, &sizes);
        prop_assert_eq!(whole, split);
    }

    /// Random bytes after valid client flags: no panic, bounded buffers, and the same
    /// outcome whether fed at once or in pieces.
    #[test]
    fn random_option_bytes_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..2048),
        sizes in prop::collection::vec(1usize..300, 1..8),
    ) {
        let mut bytes = FLAGS_FIXED.to_be_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let whole = run_split(&bytes, &[usize::MAX]);
        let split = run_split(&bytes, &sizes);
        prop_assert_eq!(&whole, &split);
    }

    /// Random option headers with plausible magic and random lengths/types.
    #[test]
    fn random_options_with_valid_framing(
        options in prop::collection::vec((0u32..16, prop::collection::vec(any::<u8>(), 0..64)), 0..12),
    ) {
        let opts: Vec<Vec<u8>> = options.iter().map(|(o, d)| opt(*o, d)).collect();
        let bytes = client(FLAGS_FIXED, &opts);
        let (status, out, _) = run_split(&bytes, &[7]);
        // Whatever happened, the output is framed option replies after the greeting,
        // except an EXPORT_NAME reply at the very end.
        if !matches!(status, Ok(Status::Done(_))) {
            parse_replies(&out[GREETING_LEN..]);
        }
    }
}

fn tls_limits(tls: TlsMode) -> HandshakeLimits {
    HandshakeLimits {
        tls,
        ..HandshakeLimits::default()
    }
}

/// FORCEDTLS (#16): before TLS every option but STARTTLS and ABORT gets TLS_REQD
/// (LIST, INFO, GO, unknown ones alike), and STARTTLS stops the feed right after
/// its ACK so the caller switches to TLS there.
#[test]
fn require_refuses_options_before_starttls_then_acks_it() {
    let bytes = client(
        FLAGS_FIXED,
        &[
            opt(OPT_LIST, &[]),
            opt(OPT_GO, &name_and_infos("disk", &[])),
            opt(0xdead_beef, b"x"),
            opt(OPT_STARTTLS, &[]),
            // Sent by a client that did not wait: must not be consumed as NBD.
            opt(OPT_GO, &name_and_infos("disk", &[])),
        ],
    );
    let catalog = StaticCatalog::sample();
    let mut hs = Handshake::new(tls_limits(TlsMode::Require));
    hs.take_output();
    let p = hs.feed(&bytes, &catalog).expect("feed");
    assert_eq!(p.status, Status::StartTls);
    let tail = opt(OPT_GO, &name_and_infos("disk", &[]));
    assert_eq!(
        p.consumed,
        bytes.len() - tail.len(),
        "consumed past STARTTLS"
    );
    let kinds: Vec<u32> = parse_replies(&hs.take_output())
        .iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_ACK
        ]
    );
    assert!(hs.tls_active() && !hs.is_finished());
    // Over TLS: GO works and a second STARTTLS is INVALID, never TLS_REQD.
    let more = [opt(OPT_STARTTLS, &[]), tail].concat();
    let p = hs.feed(&more, &catalog).expect("feed");
    done(Ok(p.status));
    let replies = parse_replies(&hs.take_output());
    assert_eq!(replies[0].kind, REP_ERR_INVALID);
    assert!(replies.iter().all(|r| r.kind != REP_ERR_TLS_REQD));
}

/// FORCEDTLS: EXPORT_NAME before TLS has no error reply, so it disconnects; control:
/// the same with TLS off enters transmission.
#[test]
fn require_disconnects_export_name_before_tls() {
    let bytes = client(FLAGS_FIXED, &[opt(OPT_EXPORT_NAME, b"disk")]);
    let (status, _) = run_with(tls_limits(TlsMode::Require), &bytes);
    assert!(status.is_err(), "{status:?}");
    let (status, _) = run_with(tls_limits(TlsMode::Off), &bytes);
    done(status);
}

/// SELECTIVETLS: STARTTLS with data is INVALID (not acknowledged), and options work
/// before TLS; with TLS off STARTTLS stays UNSUP.
#[test]
fn selective_tls_serves_plain_options_and_checks_starttls_data() {
    let bytes = client(
        FLAGS_FIXED,
        &[
            opt(OPT_STARTTLS, b"junk"),
            opt(OPT_GO, &name_and_infos("disk", &[])),
        ],
    );
    let (status, out) = run_with(tls_limits(TlsMode::On), &bytes);
    done(status);
    assert_eq!(parse_replies(&out)[0].kind, REP_ERR_INVALID);
    let bytes = client(FLAGS_FIXED, &[opt(OPT_STARTTLS, &[])]);
    let (status, out) = run_with(tls_limits(TlsMode::Off), &bytes);
    assert_eq!(status, Ok(Status::NeedInput));
    assert_eq!(parse_replies(&out)[0].kind, REP_ERR_UNSUP);
}
