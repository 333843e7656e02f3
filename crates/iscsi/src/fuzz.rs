//! Fuzz entry points: plain functions so the cargo-fuzz targets in `fuzz/`
//! (`iscsi_pdu`, `iscsi_login`), the corpus test and the proptests run the same code.
//!
//! Both take arbitrary bytes, must never panic on them, and check the codec with
//! oracles of their own (a panic here is a bug found):
//! - [`fuzz_pdu`]: consumption never exceeds the input; every PDU respects the limits;
//!   its wire length is what its header says (BHS + AHS + digests + padded data); it
//!   re-encodes to bytes that decode to the same PDU; its AHS parses; a SCSI command's
//!   CDB decodes to ranges inside the sample device.
//! - [`fuzz_login`]: every login request gets exactly one login response, to its ITT;
//!   a completed login's parameters are within RFC 7143's ranges, and with CHAP
//!   configured it is authenticated; after login, the rest of the stream is decoded
//!   with the negotiated digests and limits, Text requests are answered within the
//!   initiator's MaxRecvDataSegmentLength, and a write command's Data-Out never lands
//!   outside its buffer.
//!
//! # Input formats
//! - [`fuzz_pdu`]: byte 0 chooses how the rest is split into `feed` calls (0: one call;
//!   n: pseudo-random pieces of 1..=n bytes); byte 1: bit 0 header digest, bit 1 data
//!   digest, bits 2-3 the data limit (64, 512, 8192, 2^24-1 bytes); the rest is the
//!   stream.
//! - [`fuzz_login`]: byte 0: bit 0 CHAP required for the target, bit 1 mutual CHAP,
//!   bit 2 CHAP for discovery; byte 1: the split as above; then the initiator's stream
//!   from its first Login Request on.

use super::discovery::TextExchange;
use super::login::{
    ChapConfig, ChapCredentials, Login, LoginConfig, LoginStep, SessionType, TargetEntry,
    ENTROPY_BYTES,
};
use super::pdu::{
    padded, parse_ahs, Bhs, DecoderLimits, Digests, Pdu, PduDecoder, BHS_LEN,
    DATA_SEGMENT_MAX_BYTES,
};
use super::r2t::{BurstParams, WriteTransfer};
use super::scsi::{self, Device, ScsiRequest};

/// Splits input into pseudo-random pieces (see the module docs for `seed`).
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
        (1 + (self.state as usize % self.max)).min(available)
    }
}

/// The device CDBs are decoded against: 1 GiB of 512-byte blocks, thin.
pub fn sample_device() -> Device {
    Device::with_capacity(1 << 30, 512)
}

/// The targets and CHAP settings of the login fuzz target (`bits`: see the module docs).
pub fn sample_config(bits: u8) -> LoginConfig {
    let chap = ChapConfig {
        initiator: ChapCredentials {
            user: "alice".into(),
            secret: b"s3cretpasswd12".to_vec(),
        },
        target: (bits & 2 != 0).then(|| ChapCredentials {
            user: "tgt".into(),
            secret: b"targetsecret99".to_vec(),
        }),
    };
    LoginConfig {
        targets: vec![
            TargetEntry {
                name: "iqn.2026-12.io.ringblk:vol0".into(),
                addresses: vec!["127.0.0.1:3260,1".into()],
                chap: (bits & 1 != 0).then(|| chap.clone()),
            },
            TargetEntry {
                name: "iqn.2026-12.io.ringblk:vol0.b1".into(),
                addresses: vec!["127.0.0.1:3260,1".into(), "[::1]:3260,1".into()],
                chap: None,
            },
        ],
        discovery_chap: (bits & 4 != 0).then_some(chap),
        ..LoginConfig::default()
    }
}

/// Checks one decoded PDU against the oracles; `wire_len` is how many bytes it took.
fn check_pdu(pdu: &Pdu, digests: Digests, limits: DecoderLimits, wire_len: usize) {
    assert!(pdu.data.len() <= limits.data_segment_max_bytes as usize);
    assert!(pdu.ahs.len() <= limits.ahs_max_bytes && pdu.ahs.len() % 4 == 0);
    assert!(parse_ahs(&pdu.ahs).is_ok(), "the decoder passed a bad AHS");
    let expected = BHS_LEN
        + pdu.ahs.len()
        + if digests.header { 4 } else { 0 }
        + padded(pdu.data.len())
        + if digests.data && !pdu.data.is_empty() {
            4
        } else {
            0
        };
    assert_eq!(wire_len, expected, "PDU length disagrees with its header");
    // Re-encode and decode: the same PDU.
    let Ok(bytes) = pdu.to_bytes(digests) else {
        panic!("a decoded PDU does not encode");
    };
    assert_eq!(bytes.len(), expected);
    let mut dec = PduDecoder::new(limits);
    dec.reconfigure(digests, limits);
    match dec.feed(&bytes) {
        Ok((n, Some(again))) => {
            assert_eq!(n, bytes.len());
            assert_eq!(&again, pdu);
        }
        other => panic!("re-encoded PDU does not decode: {other:?}"),
    }
    if let Ok(Some(cdb)) = pdu.cdb() {
        check_cdb(&cdb);
    }
}

/// A CDB either fails with sense or gives ranges inside the sample device.
fn check_cdb(cdb: &[u8]) {
    let dev = sample_device();
    let Ok(req) = scsi::decode(cdb, &dev) else {
        return;
    };
    let end = match req {
        ScsiRequest::Read {
            offset_bytes,
            len_bytes,
            ..
        }
        | ScsiRequest::Write {
            offset_bytes,
            len_bytes,
            ..
        }
        | ScsiRequest::Verify {
            offset_bytes,
            len_bytes,
            ..
        }
        | ScsiRequest::CompareAndWrite {
            offset_bytes,
            len_bytes,
            ..
        } => {
            assert!(len_bytes <= dev.max_transfer_bytes);
            offset_bytes.checked_add(u64::from(len_bytes))
        }
        ScsiRequest::WriteSame {
            offset_bytes,
            len_bytes,
            ..
        } => offset_bytes.checked_add(len_bytes),
        _ => Some(0),
    };
    assert!(end.is_some_and(|e| e <= dev.capacity_bytes), "{req:?}");
}

/// Runs arbitrary bytes through the PDU decoder.
pub fn fuzz_pdu(data: &[u8]) {
    let [seed, mode, stream @ ..] = data else {
        return;
    };
    let digests = Digests {
        header: mode & 1 != 0,
        data: mode & 2 != 0,
    };
    let limits = DecoderLimits {
        data_segment_max_bytes: [64, 512, 8192, DATA_SEGMENT_MAX_BYTES][usize::from(mode >> 2 & 3)],
        ..DecoderLimits::default()
    };
    let mut dec = PduDecoder::new(limits);
    dec.reconfigure(digests, limits);
    let mut split = Splitter::new(*seed);
    let (mut pos, mut pdu_start) = (0, 0);
    while pos < stream.len() {
        let len = split.next_len(stream.len() - pos);
        let piece = &stream[pos..pos + len];
        let mut used = 0;
        while used < piece.len() {
            match dec.feed(&piece[used..]) {
                Ok((n, pdu)) => {
                    assert!(n <= piece.len() - used);
                    used += n;
                    if let Some(pdu) = pdu {
                        check_pdu(&pdu, digests, limits, pos + used - pdu_start);
                        pdu_start = pos + used;
                    } else {
                        assert_eq!(used, piece.len(), "stopped early without a PDU");
                    }
                }
                Err(_) => return,
            }
        }
        pos += len;
    }
}

/// Runs arbitrary bytes through the target's login and on into the full feature phase.
pub fn fuzz_login(data: &[u8]) {
    fuzz_login_report(data);
}

/// How far [`fuzz_login`] got: for tests that check that seeds reach the full feature
/// phase (a seed that never logs in exercises nothing after login).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoginReport {
    pub logged_in: bool,
    /// PDUs decoded after login.
    pub full_feature_pdus: usize,
    /// Bytes of write data accepted for the last write command.
    pub write_bytes: u32,
}

/// [`fuzz_login`], saying how far it got.
pub fn fuzz_login_report(data: &[u8]) -> LoginReport {
    let mut report = LoginReport::default();
    let [bits, seed, stream @ ..] = data else {
        return report;
    };
    let cfg = sample_config(*bits);
    let mut login = Login::new(cfg.clone(), [0x5a; ENTROPY_BYTES], 0x0101, 1000);
    let mut limits = DecoderLimits::default();
    let mut dec = PduDecoder::new(limits);
    let mut digests = Digests::default();
    let mut split = Splitter::new(*seed);
    let mut params = None;
    let mut text = TextExchange::new();
    let mut write = None;
    let mut pos = 0;
    while pos < stream.len() {
        let len = split.next_len(stream.len() - pos);
        let piece = &stream[pos..pos + len];
        pos += len;
        let mut used = 0;
        while used < piece.len() {
            let Ok((n, pdu)) = dec.feed(&piece[used..]) else {
                return report;
            };
            used += n;
            let Some(pdu) = pdu else { continue };
            check_pdu(&pdu, digests, limits, pdu_wire_len(&pdu, digests));
            let Some(p) = &params else {
                match login_step(&mut login, &pdu, &cfg) {
                    After::Done(done) => {
                        digests = Digests {
                            header: done.header_digest,
                            data: done.data_digest,
                        };
                        limits.data_segment_max_bytes = done.max_recv_data_segment_length_bytes;
                        dec.reconfigure(digests, limits);
                        params = Some(done);
                        report.logged_in = true;
                    }
                    After::Over => return report,
                    After::More => {}
                }
                continue;
            };
            report.full_feature_pdus += 1;
            check_write_data(&mut write, &pdu, p);
            report.write_bytes = write.as_ref().map_or(0, |w| w.2.received_bytes());
            if let Bhs::TextRequest(req) = pdu.bhs {
                if let Ok(reply) = text.handle(&req, &pdu.data, &cfg, p) {
                    assert!(reply.data.len() <= p.max_xmit_data_segment_length_bytes as usize);
                    assert!(reply.final_ != reply.cont || reply.data.is_empty());
                }
            }
        }
    }
    report
}

/// Write commands and their Data-Out through a [`WriteTransfer`]: every accepted PDU's
/// data lands inside the command's buffer, never more than its length in total.
fn check_write_data(
    write: &mut Option<(u32, u32, WriteTransfer)>,
    pdu: &Pdu,
    p: &super::login::SessionParams,
) {
    match pdu.bhs {
        Bhs::ScsiCommand(cmd) if cmd.write => {
            let len = u32::try_from(pdu.data.len()).unwrap_or(u32::MAX);
            *write =
                WriteTransfer::new(BurstParams::from(p), cmd.expected_data_len, len, cmd.final_)
                    .ok()
                    .map(|w| (cmd.itt, cmd.expected_data_len, w));
        }
        Bhs::DataOut(d) => {
            let Some((itt, edtl, w)) = write.as_mut() else {
                return;
            };
            if d.itt != *itt {
                return;
            }
            // Tags 1.. for R2Ts; at most MaxOutstandingR2T come back.
            let mut tag = 1;
            while w.next_r2t(tag).is_some() {
                tag += 1;
                assert!(tag <= u32::from(p.max_outstanding_r2t.max(1)) + 1);
            }
            let len = u32::try_from(pdu.data.len()).unwrap_or(u32::MAX);
            if let Ok(at) = w.data_out(&d, len) {
                assert!(u64::from(at) + u64::from(len) <= u64::from(*edtl));
            }
            assert!(w.received_bytes() <= *edtl);
        }
        _ => {}
    }
}

fn pdu_wire_len(pdu: &Pdu, digests: Digests) -> usize {
    BHS_LEN
        + pdu.ahs.len()
        + if digests.header { 4 } else { 0 }
        + padded(pdu.data.len())
        + if digests.data && !pdu.data.is_empty() {
            4
        } else {
            0
        }
}

/// Where a login stands after one step.
enum After {
    More,
    Done(super::login::SessionParams),
    Over,
}

/// One login step with its oracles.
fn login_step(login: &mut Login, pdu: &Pdu, cfg: &LoginConfig) -> After {
    let step = login.handle(pdu);
    let response = match &step {
        LoginStep::Continue(r) | LoginStep::Complete { response: r, .. } => r,
        LoginStep::Fail { response, .. } => response,
    };
    let Bhs::LoginResponse(resp) = response.bhs else {
        panic!("login answered with {:?}", response.bhs);
    };
    if let Bhs::LoginRequest(req) = pdu.bhs {
        assert_eq!(resp.itt, req.itt);
        assert_eq!(resp.isid, req.isid);
    }
    assert!(response.data.len() <= super::text::TEXT_MAX_BYTES);
    match step {
        LoginStep::Continue(_) => After::More,
        LoginStep::Fail { .. } => {
            assert_ne!(resp.status_class, 0);
            After::Over
        }
        LoginStep::Complete { params, .. } => {
            assert_eq!((resp.status_class, resp.status_detail), (0, 0));
            assert!(resp.transit && resp.nsg == 3 && resp.tsih != 0);
            assert!((512..1 << 24).contains(&params.max_xmit_data_segment_length_bytes));
            assert!((512..1 << 24).contains(&params.max_burst_length_bytes));
            assert!(params.first_burst_length_bytes <= params.max_burst_length_bytes);
            assert!(params.max_burst_length_bytes <= cfg.max_burst_length_bytes);
            assert_eq!(
                (params.error_recovery_level, params.max_connections),
                (0, 1)
            );
            let chap = match params.session_type {
                SessionType::Normal => {
                    let t = params.target.and_then(|i| cfg.targets.get(i));
                    assert!(t.is_some(), "normal session without a target");
                    t.and_then(|t| t.chap.as_ref()).is_some()
                }
                SessionType::Discovery => cfg.discovery_chap.is_some(),
            };
            assert!(
                !chap || params.authenticated_user.is_some(),
                "CHAP bypassed"
            );
            After::Done(params)
        }
    }
}

#[cfg(test)]
mod tests;
