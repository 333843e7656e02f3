use super::*;
use crate::testutil;
use proptest::prelude::*;

const READ10: [u8; 48] = [
    0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
    0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

const KNOWN_OPCODES: [u8; 17] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x31, 0x32,
    0x3f,
];

fn decode_all(
    stream: &[u8],
    digests: Digests,
    limits: DecoderLimits,
) -> Result<Vec<Pdu>, PduError> {
    let mut dec = PduDecoder::new(limits);
    dec.reconfigure(digests, limits);
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let (n, pdu) = dec.feed(rest)?;
        rest = &rest[n..];
        out.extend(pdu);
    }
    Ok(out)
}

fn big_limits() -> DecoderLimits {
    DecoderLimits {
        data_segment_max_bytes: 1 << 20,
        ahs_max_bytes: AHS_MAX_BYTES,
    }
}

/// RFC 3720 B.4's READ(10) PDU: every field where the RFC puts it. Negative control:
/// reading the EDTL from the CmdSN's offset in `decode` fails here (tried).
#[test]
fn rfc3720_read10_known_bytes() {
    let Bhs::ScsiCommand(cmd) = Bhs::decode(&READ10) else {
        panic!("not a SCSI command");
    };
    assert!(cmd.final_ && cmd.read && !cmd.write && !cmd.immediate);
    assert_eq!(cmd.itt, 0x1400_0000);
    assert_eq!(cmd.expected_data_len, 1024);
    assert_eq!(cmd.cmd_sn, 0x14);
    assert_eq!(cmd.exp_stat_sn, 0x18);
    assert_eq!(cmd.cdb[0], 0x28);
    assert_eq!(cmd.cdb[8], 2);
    assert_eq!(Bhs::ScsiCommand(cmd).encode(), READ10);
    // With a header digest the wire form ends in B.4's CRC bytes.
    let wire = Pdu::new(Bhs::ScsiCommand(cmd), vec![])
        .to_bytes(Digests {
            header: true,
            data: true,
        })
        .unwrap_or_default();
    assert_eq!(&wire[48..], &[0x56, 0x3a, 0x96, 0xd9]);
    let pdus = decode_all(
        &wire,
        Digests {
            header: true,
            data: true,
        },
        big_limits(),
    );
    assert_eq!(pdus.map(|p| p.len()), Ok(1));
}

/// Every PDU libiscsi and tgtd exchanged decodes, and encodes back to the very same
/// bytes: our field layout is theirs, for every opcode in the captures (login,
/// text, SCSI command/response, Data-In with status, logout; both directions).
/// Negative control: dropping the `S` bit from Data-In encoding fails this test on the
/// captures (tried).
#[test]
fn captures_round_trip_byte_exact() {
    for (name, stream) in testutil::ALL {
        let pdus = testutil::split(stream);
        assert!(!pdus.is_empty(), "{name}");
        let mut again = Vec::new();
        for pdu in &pdus {
            assert!(!matches!(pdu.bhs, Bhs::Unknown { .. }), "{name}: {pdu:?}");
            pdu.encode(Digests::default(), &mut again)
                .unwrap_or_default();
        }
        assert_eq!(again, stream, "{name}");
    }
}

/// What the captures hold, checked field by field where it matters later.
#[test]
fn captures_known_fields() {
    let pdus = testutil::split(testutil::READCAP16_T2I);
    let data_in: Vec<_> = pdus
        .iter()
        .filter_map(|p| match p.bhs {
            Bhs::DataIn(d) => Some(d),
            _ => None,
        })
        .collect();
    // tgt sends READ CAPACITY(16)'s data with the status in the same PDU.
    assert!(data_in.iter().any(|d| d.final_ && d.status == Some(0)));
    let Some(Bhs::LoginResponse(first)) = pdus.first().map(|p| p.bhs) else {
        panic!("no login response first");
    };
    assert_eq!((first.status_class, first.status_detail), (0, 0));
    assert_ne!(first.tsih, 0);
    let Some(Bhs::LoginResponse(refused)) = testutil::split(testutil::CHAP_WRONG_T2I)
        .iter()
        .rev()
        .find_map(|p| matches!(p.bhs, Bhs::LoginResponse(_)).then_some(p.bhs))
    else {
        panic!("no login response");
    };
    assert_eq!((refused.status_class, refused.status_detail), (2, 1));
}

#[test]
fn limits_are_checked_before_allocating() {
    let mut hdr = Bhs::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 1,
        ttt: RESERVED_TAG,
        cmd_sn: 0,
        exp_stat_sn: 0,
    })
    .encode();
    hdr[5..8].copy_from_slice(&[0x00, 0x20, 0x01]); // 8193 bytes: one past login's limit
    let mut dec = PduDecoder::new(DecoderLimits::default());
    assert_eq!(
        dec.feed(&hdr),
        Err(PduError::DataSegmentTooLong {
            len: 8193,
            max: 8192
        })
    );
    // The stream is lost for good after an error.
    assert_eq!(dec.feed(&[0]), Err(PduError::Poisoned));
    hdr[5..8].copy_from_slice(&[0, 0, 0]);
    hdr[4] = 69; // 276 bytes of AHS, above the default cap of 272
    let mut dec = PduDecoder::new(DecoderLimits::default());
    assert_eq!(
        dec.feed(&hdr),
        Err(PduError::AhsTooLong { len: 276, max: 272 })
    );
}

#[test]
fn digests_catch_corruption() {
    let pdu = Pdu::new(
        Bhs::NopOut(NopOut {
            immediate: false,
            lun: 0,
            itt: 7,
            ttt: RESERVED_TAG,
            cmd_sn: 3,
            exp_stat_sn: 4,
        }),
        b"ping!".to_vec(),
    );
    let both = Digests {
        header: true,
        data: true,
    };
    let wire = pdu.to_bytes(both).unwrap_or_default();
    assert_eq!(wire.len(), 48 + 4 + 8 + 4);
    assert_eq!(decode_all(&wire, both, big_limits()), Ok(vec![pdu.clone()]));
    // Negative controls: one flipped bit in the header, in the padding, in each digest.
    for at in [20, 48, 57, 59, 63] {
        let mut bad = wire.clone();
        bad[at] ^= 0x10;
        let err = decode_all(&bad, both, big_limits());
        assert!(
            matches!(
                err,
                Err(PduError::HeaderDigest { .. } | PduError::DataDigest { .. })
            ),
            "byte {at}: {err:?}"
        );
    }
}

#[test]
fn ahs_extended_cdb_and_bidi_length() {
    let cdb: Vec<u8> = (0..32).collect();
    let ahs = build_ahs(&cdb, Some(4096)).unwrap_or_default();
    assert_eq!(ahs.len() % 4, 0);
    let info = parse_ahs(&ahs);
    assert_eq!(
        info,
        Ok(AhsInfo {
            extended_cdb: Some(&cdb[16..]),
            bidi_read_len: Some(4096)
        })
    );
    let mut cmd = match Bhs::decode(&READ10) {
        Bhs::ScsiCommand(c) => c,
        _ => unreachable!(),
    };
    cmd.cdb.copy_from_slice(&cdb[..16]);
    let pdu = Pdu {
        bhs: Bhs::ScsiCommand(cmd),
        ahs,
        data: vec![],
    };
    assert_eq!(pdu.cdb(), Ok(Some(cdb.clone())));
    // Malformed: length past the area; a repeated type.
    assert!(parse_ahs(&[0, 9, 1, 0, 0, 0, 0, 0]).is_err());
    assert!(parse_ahs(&[0, 5, 2, 0, 0, 0, 0, 1, 0, 5, 2, 0, 0, 0, 0, 1]).is_err());
    assert!(parse_ahs(&[0, 5]).is_err());
}

/// Every opcode the codec knows survives decode → encode → decode, and the opcode byte
/// is where RFC 7143 puts it.
#[test]
fn every_opcode_decodes_to_its_variant() {
    let known = KNOWN_OPCODES;
    for op in 0u8..64 {
        let mut b = [0u8; 48];
        b[0] = op;
        let bhs = Bhs::decode(&b);
        assert_eq!(bhs.opcode(), op);
        assert_eq!(
            known.contains(&op),
            !matches!(bhs, Bhs::Unknown { .. }),
            "{op:#x}"
        );
    }
}

fn arb_pdu_bytes() -> impl Strategy<Value = Vec<u8>> {
    // A random header of a random opcode with a small data segment and AHS entries that
    // parse: the generator builds valid framing so that the properties reach the end.
    (
        prop::array::uniform32(any::<u8>()),
        prop::array::uniform16(any::<u8>()),
        prop::collection::vec(any::<u8>(), 0..40),
        prop::option::of(prop::collection::vec(any::<u8>(), 17..40)),
    )
        .prop_map(|(a, b, data, cdb)| {
            let mut hdr = [0u8; 48];
            hdr[..32].copy_from_slice(&a);
            hdr[32..].copy_from_slice(&b);
            let ahs = cdb
                .map(|c| build_ahs(&c, None).unwrap_or_default())
                .unwrap_or_default();
            let pdu = Pdu {
                bhs: Bhs::decode(&hdr),
                ahs,
                data,
            };
            pdu.to_bytes(Digests::default()).unwrap_or_default()
        })
}

proptest! {
    /// decode ∘ encode is the identity on decoded headers. The opcode is drawn from the
    /// known ones so that every variant is hit (uniform bytes hit one in 64). Negative
    /// control: dropping the Data-In S bit from `encode` fails this (tried).
    #[test]
    fn bhs_decode_encode_idempotent(a in prop::array::uniform32(any::<u8>()),
                                     b in prop::array::uniform16(any::<u8>()),
                                     op in prop::sample::select(&KNOWN_OPCODES[..])) {
        let mut hdr = [0u8; 48];
        hdr[..32].copy_from_slice(&a);
        hdr[0] = (hdr[0] & 0xc0) | op;
        hdr[32..].copy_from_slice(&b);
        let bhs = Bhs::decode(&hdr);
        prop_assert_eq!(Bhs::decode(&bhs.encode()), bhs);
    }

    /// Any split of a stream of PDUs yields the same PDUs as feeding it whole, with and
    /// without digests.
    #[test]
    fn chunking_does_not_matter(pdus in prop::collection::vec(arb_pdu_bytes(), 1..6),
                                cuts in prop::collection::vec(1usize..70, 1..40),
                                hd: bool, dd: bool) {
        let digests = Digests { header: hd, data: dd };
        let mut stream = Vec::new();
        for p in &pdus {
            let whole = decode_all(p, Digests::default(), big_limits());
            prop_assert!(whole.is_ok());
            for pdu in whole.unwrap_or_default() {
                pdu.encode(digests, &mut stream).unwrap_or_default();
            }
        }
        let whole = decode_all(&stream, digests, big_limits());
        prop_assert!(whole.is_ok());
        let mut dec = PduDecoder::new(big_limits());
        dec.reconfigure(digests, big_limits());
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut i = 0;
        while !rest.is_empty() {
            let take = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            let mut piece = &rest[..take];
            while !piece.is_empty() {
                let r = dec.feed(piece);
                prop_assert!(r.is_ok());
                let (n, pdu) = r.unwrap_or((0, None));
                prop_assert!(n <= piece.len());
                piece = &piece[n..];
                got.extend(pdu);
            }
            rest = &rest[take..];
        }
        prop_assert!(dec.is_idle());
        prop_assert_eq!(Ok(got), whole);
    }

    /// Arbitrary bytes never panic, never consume more than given, and every decoded PDU
    /// respects the limits.
    #[test]
    fn garbage_is_bounded(bytes in prop::collection::vec(any::<u8>(), 0..600), hd: bool, dd: bool) {
        let limits = DecoderLimits { data_segment_max_bytes: 64, ahs_max_bytes: 64 };
        let mut dec = PduDecoder::new(limits);
        dec.reconfigure(Digests { header: hd, data: dd }, limits);
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match dec.feed(rest) {
                Ok((n, pdu)) => {
                    prop_assert!(n <= rest.len());
                    if let Some(p) = pdu {
                        prop_assert!(p.data.len() <= 64 && p.ahs.len() <= 64);
                    }
                    rest = &rest[n..];
                }
                Err(_) => break,
            }
        }
    }
}

/// A Reject carries the offending header exactly as received, reserved bits and all
/// (a re-encoded header would drop them). SNACK (ERL > 0) is such a PDU here.
#[test]
fn reject_carries_the_received_header() {
    let mut snack = [0u8; 48];
    snack[0] = opcode::SNACK_REQUEST;
    snack[1] = 0x81;
    snack[16..20].copy_from_slice(&9u32.to_be_bytes());
    snack[40] = 0xee; // a field this codec does not model
    let mut dec = PduDecoder::new(DecoderLimits::default());
    let Ok((48, Some(pdu))) = dec.feed(&snack) else {
        panic!("SNACK did not frame");
    };
    assert_eq!(
        pdu.bhs,
        Bhs::Unknown {
            opcode: 0x10,
            itt: 9
        }
    );
    let rej = reject(
        reject_reason::COMMAND_NOT_SUPPORTED,
        dec.last_header(),
        1,
        2,
        3,
    );
    assert_eq!(rej.data, snack);
    let wire = rej.to_bytes(Digests::default()).unwrap_or_default();
    assert_eq!(wire[0], opcode::REJECT);
    assert_eq!(wire[2], 0x05);
    assert_eq!(&wire[16..20], &[0xff; 4], "Reject's ITT is reserved");
    assert_eq!(&wire[48..], &snack);
}
