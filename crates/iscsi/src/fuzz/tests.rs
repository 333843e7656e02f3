//! Runs the fuzz corpus through both entry points, keeps the hand-made seeds in step with
//! their generator, and runs the entry points on random and mutated input (proptest),
//! so CI covers them without libFuzzer. Regenerate the seeds with
//! `RINGBLK_BLESS_CORPUS=1 cargo test -p ringblk-iscsi fuzz`.

use super::*;
use crate::login::chap_response;
use crate::pdu::{LoginRequest, NopOut, ScsiCommand, TextRequest, RESERVED_TAG};
use crate::testutil;
use crate::text;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn login_req(csg: u8, nsg: u8, transit: bool, cmd_sn: u32, body: &[(&str, &str)]) -> Pdu {
    let mut data = Vec::new();
    for (k, v) in body {
        text::push(&mut data, k, v);
    }
    Pdu::new(
        Bhs::LoginRequest(LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0x12, 0x34, 0x56, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn,
            exp_stat_sn: 0,
        }),
        data,
    )
}

/// A CHAP login with the fuzz target's fixed challenge, digests on, then a READ(10),
/// a NOP-Out and SendTargets in the full feature phase. `secret` wrong: the negative
/// control (it must not log in).
fn chap_session(secret: &[u8], mutual: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let none = Digests::default();
    let leading = [
        ("InitiatorName", "iqn.1994-05.com.example:fuzz"),
        ("SessionType", "Normal"),
        ("TargetName", "iqn.2026-12.io.ringblk:vol0"),
        ("AuthMethod", "CHAP,None"),
    ];
    let proof = text::hex(&chap_response(0x5a, secret, &[0x5a; 16]));
    let c2 = text::hex(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
    let mut answer = vec![("CHAP_N", "alice"), ("CHAP_R", proof.as_str())];
    if mutual {
        answer.extend([("CHAP_I", "17"), ("CHAP_C", c2.as_str())]);
    }
    let ops = [
        ("HeaderDigest", "CRC32C,None"),
        ("DataDigest", "CRC32C,None"),
        ("MaxRecvDataSegmentLength", "4096"),
        ("ImmediateData", "Yes"),
    ];
    for pdu in [
        login_req(0, 1, true, 1, &leading),
        login_req(0, 1, false, 1, &[("CHAP_A", "5")]),
        login_req(0, 1, true, 1, &answer),
        login_req(1, 3, true, 1, &ops),
    ] {
        let _ = pdu.encode(none, &mut out);
    }
    append_full_feature(
        &mut out,
        Digests {
            header: true,
            data: true,
        },
    );
    out
}

fn append_full_feature(out: &mut Vec<u8>, digests: Digests) {
    let mut cdb = [0u8; 16];
    cdb[..10].copy_from_slice(&[0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]);
    let read = Bhs::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: true,
        write: false,
        attr: 1,
        lun: 0,
        itt: 2,
        expected_data_len: 4096,
        cmd_sn: 1,
        exp_stat_sn: 1,
        cdb,
    });
    let nop = Bhs::NopOut(NopOut {
        immediate: true,
        lun: 0,
        itt: 3,
        ttt: RESERVED_TAG,
        cmd_sn: 2,
        exp_stat_sn: 1,
    });
    let st = Bhs::TextRequest(TextRequest {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt: 4,
        ttt: RESERVED_TAG,
        cmd_sn: 2,
        exp_stat_sn: 1,
    });
    // WRITE(10) of 8 KiB at LBA 16: 4 KiB immediate, the rest after an R2T (the fuzz
    // target hands out tag 1 first).
    let mut wcdb = [0u8; 16];
    wcdb[..10].copy_from_slice(&[0x2a, 0, 0, 0, 0, 16, 0, 0, 16, 0]);
    let write = Bhs::ScsiCommand(ScsiCommand {
        immediate: false,
        final_: true,
        read: false,
        write: true,
        attr: 1,
        lun: 0,
        itt: 5,
        expected_data_len: 8192,
        cmd_sn: 2,
        exp_stat_sn: 1,
        cdb: wcdb,
    });
    let data_out = Bhs::DataOut(crate::pdu::DataOut {
        final_: true,
        lun: 0,
        itt: 5,
        ttt: 1,
        exp_stat_sn: 1,
        data_sn: 0,
        buffer_offset: 4096,
    });
    for pdu in [
        Pdu::new(read, vec![]),
        Pdu::new(nop, b"ping".to_vec()),
        Pdu::new(st, b"SendTargets=All\0".to_vec()),
        Pdu::new(write, vec![0xab; 4096]),
        Pdu::new(data_out, vec![0xcd; 4096]),
    ] {
        let _ = pdu.encode(digests, out);
    }
}

fn with(prefix: [u8; 2], stream: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(stream);
    v
}

/// The seeds: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut digested = Vec::new();
    for pdu in testutil::split(testutil::INQ_I2T) {
        let _ = pdu.encode(
            Digests {
                header: true,
                data: true,
            },
            &mut digested,
        );
    }
    let mut inq_then_ffp = testutil::INQ_I2T.to_vec();
    append_full_feature(&mut inq_then_ffp, Digests::default());
    vec![
        (
            "iscsi_pdu",
            "libiscsi-inq-i2t",
            with([0, 0b1100], testutil::INQ_I2T),
        ),
        (
            "iscsi_pdu",
            "tgtd-inq-t2i-split",
            with([7, 0b1100], testutil::INQ_T2I),
        ),
        (
            "iscsi_pdu",
            "tgtd-chap-t2i-bytewise",
            with([1, 0b1000], testutil::CHAP_T2I),
        ),
        ("iscsi_pdu", "digests-crc32c", with([5, 0b1111], &digested)),
        ("iscsi_login", "libiscsi-inq", with([0, 0], &inq_then_ffp)),
        (
            "iscsi_login",
            "libiscsi-discovery",
            with([0, 3], testutil::LS_DISCOVERY_I2T),
        ),
        (
            "iscsi_login",
            "libiscsi-chap-replay",
            with([1, 0], testutil::CHAP_I2T),
        ),
        (
            "iscsi_login",
            "chap-digests",
            with([1, 0], &chap_session(b"s3cretpasswd12", false)),
        ),
        (
            "iscsi_login",
            "chap-mutual-split",
            with([3, 9], &chap_session(b"s3cretpasswd12", true)),
        ),
        (
            "iscsi_login",
            "chap-wrong-secret",
            with([1, 0], &chap_session(b"wrong", false)),
        ),
    ]
}

#[test]
fn seed_corpus_matches_the_generator() {
    let bless = std::env::var_os("RINGBLK_BLESS_CORPUS").is_some();
    for (target, name, bytes) in seeds() {
        let path = corpus_dir().join(target).join(name);
        if bless {
            let _ = std::fs::create_dir_all(corpus_dir().join(target));
            assert!(std::fs::write(&path, &bytes).is_ok(), "{}", path.display());
            continue;
        }
        match std::fs::read(&path) {
            Ok(on_disk) => assert_eq!(on_disk, bytes, "{} is stale", path.display()),
            Err(e) => panic!(
                "{}: {e} (bless with RINGBLK_BLESS_CORPUS=1)",
                path.display()
            ),
        }
    }
}

/// Every corpus file, ours and the NBD targets', through both entry points.
#[test]
fn every_corpus_file_passes_both_entry_points() {
    let mut files = 0;
    let Ok(dirs) = std::fs::read_dir(corpus_dir()) else {
        panic!("fuzz/corpus is missing");
    };
    for dir in dirs.flatten() {
        let Ok(entries) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for file in entries.flatten() {
            let Ok(bytes) = std::fs::read(file.path()) else {
                continue;
            };
            eprintln!("corpus: {}", file.path().display());
            fuzz_pdu(&bytes);
            fuzz_login(&bytes);
            files += 1;
        }
    }
    // Negative control: an empty or missing corpus must not pass silently.
    assert!(files >= seeds().len(), "only {files} corpus files found");
}

/// The login seeds get where they should: libiscsi's logins and the CHAP sessions reach
/// the full feature phase (and decode their PDUs there with digests on); the replayed
/// and the wrong-secret CHAP logins do not.
#[test]
fn seeds_reach_full_feature() {
    for (target, name, bytes) in seeds() {
        if target != "iscsi_login" {
            continue;
        }
        let r = fuzz_login_report(&bytes);
        let should = !matches!(name, "libiscsi-chap-replay" | "chap-wrong-secret");
        assert_eq!(r.logged_in, should, "{name}: {r:?}");
        if should && name != "libiscsi-discovery" {
            assert!(r.full_feature_pdus >= 5, "{name}: {r:?}");
            assert_eq!(r.write_bytes, 8192, "{name}: the write seed completes");
        }
    }
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)]) -> Vec<u8> {
    if bytes.len() > 2 {
        for &(at, v) in edits {
            let i = 2 + at % (bytes.len() - 2);
            bytes[i] ^= v;
        }
    }
    bytes
}

proptest! {
    #[test]
    fn pdu_entry_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        fuzz_pdu(&bytes);
    }

    #[test]
    fn login_entry_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        fuzz_login(&bytes);
    }

    /// Seeds with a few flipped bits: deep paths with malformed details.
    #[test]
    fn mutated_seeds(which in 0usize..10, edits in prop::collection::vec((any::<usize>(), 1u8..), 1..6),
                     prefix in any::<[u8; 2]>()) {
        let seeds = seeds();
        let (_, _, bytes) = &seeds[which % seeds.len()];
        let mut m = mutate(bytes.clone(), &edits);
        fuzz_pdu(&m);
        fuzz_login(&m);
        m[..2].copy_from_slice(&prefix);
        fuzz_pdu(&m);
        fuzz_login(&m);
    }
}
