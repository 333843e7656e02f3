//! Fixtures shared by the unit tests: byte streams captured from real peers.
//!
//! Where they came from: `testdata/record_proxy.py` (a recording TCP proxy) between
//! libiscsi 1.19.0 (Debian 12 `libiscsi-bin`) and tgtd 1.0.85 (Debian 12 `tgt`) on
//! loopback, target `iqn.2026-12.io.ringblk:vol0` with LUN 1 on a 64 MiB file. Each
//! connection is stored as `NAME.i2t` (initiator to target) and `NAME.t2i`:
//! - `libiscsi-ls-discovery`: `iscsi-ls -s iscsi://127.0.0.1:3261` (discovery session,
//!   SendTargets=All, then a normal session per target to list LUNs is in other files);
//! - `libiscsi-inq-login`: `iscsi-inq iscsi://127.0.0.1:3261/iqn.2026-12.io.ringblk:vol0/1`;
//! - `libiscsi-readcapacity16`: `iscsi-readcapacity16` on the same URL;
//! - `libiscsi-inq-chap`: `iscsi-inq` with CHAP user `alice`, secret `s3cretpasswd12`
//!   (tgtadm `--mode account`);
//! - `libiscsi-inq-chap-wrong`: the same with secret `wrongpasswd1234` (refused 0x0201).
//! - `libiscsi-test-cu-subset.i2t`: the initiator side of every connection (in order,
//!   concatenated: each ends at a PDU boundary) of `iscsi-test-cu -d -t T` for T in
//!   SCSI.ProutRegister, ProutReserve, ProutClear, ProutPreempt, PrinReadKeys,
//!   PrinReportCapabilities, Reserve6, ModeSense6, Inquiry, ReadCapacity16,
//!   TestUnitReady, StartStopUnit (libiscsi 1.19.0's conformance suite, against tgtd).

use crate::pdu::{DecoderLimits, Digests, Pdu, PduDecoder, DATA_SEGMENT_MAX_BYTES};

pub(crate) const LS_DISCOVERY_I2T: &[u8] = include_bytes!("../testdata/libiscsi-ls-discovery.i2t");
pub(crate) const LS_DISCOVERY_T2I: &[u8] = include_bytes!("../testdata/libiscsi-ls-discovery.t2i");
pub(crate) const INQ_I2T: &[u8] = include_bytes!("../testdata/libiscsi-inq-login.i2t");
pub(crate) const INQ_T2I: &[u8] = include_bytes!("../testdata/libiscsi-inq-login.t2i");
pub(crate) const READCAP16_I2T: &[u8] = include_bytes!("../testdata/libiscsi-readcapacity16.i2t");
pub(crate) const READCAP16_T2I: &[u8] = include_bytes!("../testdata/libiscsi-readcapacity16.t2i");
pub(crate) const CHAP_I2T: &[u8] = include_bytes!("../testdata/libiscsi-inq-chap.i2t");
pub(crate) const CHAP_T2I: &[u8] = include_bytes!("../testdata/libiscsi-inq-chap.t2i");
pub(crate) const CHAP_WRONG_I2T: &[u8] = include_bytes!("../testdata/libiscsi-inq-chap-wrong.i2t");
pub(crate) const CHAP_WRONG_T2I: &[u8] = include_bytes!("../testdata/libiscsi-inq-chap-wrong.t2i");

pub(crate) const TEST_CU_I2T: &[u8] = include_bytes!("../testdata/libiscsi-test-cu-subset.i2t");

/// Every fixture stream, named.
pub(crate) const ALL: [(&str, &[u8]); 11] = [
    ("test-cu-subset.i2t", TEST_CU_I2T),
    ("ls-discovery.i2t", LS_DISCOVERY_I2T),
    ("ls-discovery.t2i", LS_DISCOVERY_T2I),
    ("inq.i2t", INQ_I2T),
    ("inq.t2i", INQ_T2I),
    ("readcap16.i2t", READCAP16_I2T),
    ("readcap16.t2i", READCAP16_T2I),
    ("chap.i2t", CHAP_I2T),
    ("chap.t2i", CHAP_T2I),
    ("chap-wrong.i2t", CHAP_WRONG_I2T),
    ("chap-wrong.t2i", CHAP_WRONG_T2I),
];

/// Splits a captured stream (no digests: neither capture negotiated them) into PDUs.
pub(crate) fn split(stream: &[u8]) -> Vec<Pdu> {
    let mut dec = PduDecoder::new(DecoderLimits {
        data_segment_max_bytes: DATA_SEGMENT_MAX_BYTES,
        ..DecoderLimits::default()
    });
    dec.reconfigure(Digests::default(), dec.limits());
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        match dec.feed(rest) {
            Ok((n, pdu)) => {
                rest = &rest[n..];
                out.extend(pdu);
            }
            Err(e) => panic!("fixture does not decode: {e}"),
        }
    }
    assert!(dec.is_idle(), "fixture ends inside a PDU");
    out
}
