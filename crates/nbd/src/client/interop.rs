//! The client's state machines against the server's (handshake, request decoder, reply
//! encoders): guards against both sides agreeing with themselves while disagreeing with
//! each other about the spec. The two sides share `proto`'s constants, which
//! `proto::tests::wire_constants_match_the_spec_literals` checks against the spec.

use crate as server;
use crate::{ExportCatalog, ExportInfo, HandshakeLimits};

use super::codec::{parse_reply, put_request, Cmd, Parsed};
use super::handshake::{ClientHandshake, Export, HandshakeError, Status};

struct Catalog(ExportInfo);

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == self.0.name || name.is_empty()).then(|| self.0.clone())
    }
    fn list(&self) -> Vec<ExportInfo> {
        vec![self.0.clone()]
    }
    fn meta_contexts(&self, _: &str) -> Vec<String> {
        Vec::new()
    }
}

fn info(read_only: bool) -> ExportInfo {
    ExportInfo {
        name: "vol0".into(),
        description: "test volume".into(),
        size_bytes: 256 << 20,
        read_only,
        block_size_min: 512,
        block_size_preferred: 4096,
        block_size_max: 1 << 25,
        can_trim: true,
        can_write_zeroes: true,
        can_fast_zero: true,
        can_cache: true,
        can_multi_conn: true,
        can_flush: true,
        can_fua: true,
        rotational: false,
    }
}

/// Runs both state machines against each other; `chunk` splits every transfer.
fn negotiate(name: &str, catalog: &Catalog, chunk: usize) -> Result<Export, HandshakeError> {
    let mut srv = server::Handshake::new(HandshakeLimits::default());
    let mut cli = ClientHandshake::new(name)?;
    let mut to_client = srv.take_output();
    for _round in 0..100 {
        let mut to_server = Vec::new();
        for piece in to_client.chunks(chunk.max(1)) {
            let (used, st) = cli.feed(piece)?;
            assert_eq!(
                used,
                piece.len(),
                "the server sends nothing past the handshake"
            );
            to_server.extend(cli.take_output());
            if let Status::Done(export) = st {
                return Ok(export);
            }
        }
        let mut pending: &[u8] = &to_server;
        to_client = Vec::new();
        while !pending.is_empty() {
            let p = srv
                .feed(pending, catalog)
                .unwrap_or_else(|e| panic!("server refused the client's bytes: {e}"));
            pending = &pending[p.consumed..];
            to_client.extend(srv.take_output());
            if let server::Status::Done(n) = &p.status {
                assert!(!n.structured_replies, "the client never asks for them");
                assert!(
                    n.block_size_acknowledged,
                    "NBD_INFO_BLOCK_SIZE was requested"
                );
            }
        }
    }
    panic!("handshake did not finish in 100 rounds");
}

#[test]
fn client_handshake_agrees_with_the_server() {
    let catalog = Catalog(info(false));
    for chunk in [1, 3, 7, 4096] {
        let e = negotiate("vol0", &catalog, chunk).expect("negotiated");
        assert_eq!(e.size_bytes, catalog.0.size_bytes);
        assert_eq!(e.transmission_flags, catalog.0.transmission_flags(false));
        assert_eq!(
            (e.block_size_min, e.block_size_preferred, e.block_size_max),
            (512, 4096, catalog.0.payload_max_bytes())
        );
        assert!(e.via_go && e.can_flush() && e.can_multi_conn() && !e.read_only());
    }
    let ro = negotiate("", &Catalog(info(true)), 5).expect("default export");
    assert!(ro.read_only());
}

#[test]
fn unknown_export_is_a_clean_refusal() {
    let err = negotiate("missing", &Catalog(info(false)), 64).expect_err("unknown");
    assert!(
        matches!(
            err,
            HandshakeError::Refused {
                name: "NBD_REP_ERR_UNKNOWN",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn requests_decode_on_the_server_side() {
    for (cmd, want) in [
        (Cmd::Read, server::Command::Read),
        (Cmd::Write, server::Command::Write),
        (Cmd::Flush, server::Command::Flush),
        (Cmd::Disc, server::Command::Disc),
    ] {
        let mut out = Vec::new();
        put_request(&mut out, cmd, 0, 0xDEAD_BEEF_0000_0042, 8192, 4096);
        let hdr: [u8; 28] = out[..].try_into().expect("28 bytes");
        let r = server::decode_request_header(&hdr).expect("valid header");
        assert_eq!(r.command, want);
        assert_eq!(
            (r.cookie, r.offset, r.length),
            (0xDEAD_BEEF_0000_0042, 8192, 4096)
        );
    }
}

#[test]
fn server_replies_parse_on_the_client_side() {
    let mut wire = server::reply::simple_reply(9, None).to_vec();
    wire.extend_from_slice(&[0x5A; 512]);
    wire.extend_from_slice(&server::reply::simple_reply(
        10,
        Some(server::NbdErrno::NoSpc),
    ));
    let Parsed::Reply {
        cookie,
        error,
        payload,
        consumed,
    } = parse_reply(&wire, |_| Some(512)).expect("parse")
    else {
        panic!("incomplete")
    };
    assert_eq!((cookie, error, payload.len()), (9, 0, 512));
    let p = parse_reply(&wire[consumed..], |_| Some(512)).expect("parse");
    assert!(matches!(
        p,
        Parsed::Reply {
            cookie: 10,
            error: 28,
            payload: [],
            ..
        }
    ));
}
