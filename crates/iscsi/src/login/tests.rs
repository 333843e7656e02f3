use super::*;
use crate::pdu::{Bhs, Pdu};
use crate::testutil;
use crate::text::{self, Pair};
use proptest::prelude::*;

const VOL0: &str = "iqn.2026-12.io.ringblk:vol0";
const ENTROPY: [u8; ENTROPY_BYTES] = [7; ENTROPY_BYTES];

fn cfg() -> LoginConfig {
    LoginConfig {
        targets: vec![TargetEntry {
            name: VOL0.into(),
            addresses: vec!["127.0.0.1:3260,1".into()],
            chap: None,
        }],
        ..LoginConfig::default()
    }
}

fn chap_cfg(mutual: bool) -> LoginConfig {
    let mut c = cfg();
    c.targets[0].chap = Some(ChapConfig {
        initiator: ChapCredentials {
            user: "alice".into(),
            secret: b"s3cretpasswd12".to_vec(),
        },
        target: mutual.then(|| ChapCredentials {
            user: "tgt".into(),
            secret: b"targetsecret99".to_vec(),
        }),
    });
    c
}

fn req(csg: u8, nsg: u8, transit: bool, cont: bool, body: &[(&str, &str)]) -> Pdu {
    let mut data = Vec::new();
    for (k, v) in body {
        text::push(&mut data, k, v);
    }
    Pdu::new(
        Bhs::LoginRequest(LoginRequest {
            transit,
            cont,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 5,
            cid: 0,
            cmd_sn: 100,
            exp_stat_sn: 0,
        }),
        data,
    )
}

fn answers(pdu: &Pdu) -> Vec<Pair> {
    text::parse(&pdu.data).unwrap_or_default()
}

fn answer(pdu: &Pdu, key: &str) -> Option<String> {
    answers(pdu)
        .into_iter()
        .find(|p| p.key == key)
        .map(|p| p.value)
}

fn resp(pdu: &Pdu) -> LoginResponse {
    match pdu.bhs {
        Bhs::LoginResponse(r) => r,
        other => panic!("not a login response: {other:?}"),
    }
}

fn status_of(step: &LoginStep) -> u16 {
    let pdu = match step {
        LoginStep::Continue(p) => p,
        LoginStep::Complete { response, .. } => response,
        LoginStep::Fail { response, .. } => response,
    };
    let r = resp(pdu);
    u16::from(r.status_class) << 8 | u16::from(r.status_detail)
}

const LEADING: [(&str, &str); 3] = [
    ("InitiatorName", "iqn.1994-05.com.example:host"),
    ("SessionType", "Normal"),
    ("TargetName", VOL0),
];

/// libiscsi's `iscsi-inq` login, captured against tgtd: one PDU, security stage skipped
/// (CSG=1, T=1, NSG=3). It must decode and our negotiation must accept it with the
/// values RFC 7143's result functions give.
#[test]
fn libiscsi_login_fixture_is_accepted() {
    let pdus = testutil::split(testutil::INQ_I2T);
    let mut login = Login::new(cfg(), ENTROPY, 0x1234, 77);
    let LoginStep::Complete { response, params } = login.handle(&pdus[0]) else {
        panic!("libiscsi's login was not accepted");
    };
    let r = resp(&response);
    assert!(r.transit && r.csg == 1 && r.nsg == 3);
    assert_eq!((r.status_class, r.status_detail, r.tsih), (0, 0, 0x1234));
    assert_eq!(r.stat_sn, 77);
    let Bhs::LoginRequest(q) = pdus[0].bhs else {
        panic!()
    };
    assert_eq!((r.itt, r.isid, r.exp_cmd_sn), (q.itt, q.isid, q.cmd_sn));
    assert_eq!(
        params.initiator_name,
        "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq"
    );
    assert_eq!(params.target, Some(0));
    assert_eq!(params.session_type, SessionType::Normal);
    // HeaderDigest=None,CRC32C: the initiator's first choice wins.
    assert!(!params.header_digest && !params.data_digest);
    assert!(!params.initial_r2t && params.immediate_data);
    assert_eq!(params.max_burst_length_bytes, 262_144);
    assert_eq!(params.first_burst_length_bytes, 65_536);
    assert_eq!(params.max_xmit_data_segment_length_bytes, 262_144);
    assert_eq!(params.default_time2retain_s, 0);
    assert_eq!(params.error_recovery_level, 0);
    assert_eq!(params.max_connections, 1);
    assert_eq!(params.exp_cmd_sn, q.cmd_sn);
    assert_eq!(params.stat_sn, 78);
    // Every key the initiator sent is answered except the declarative ones, and we
    // declare our receive limit and portal group.
    assert_eq!(
        answer(&response, "TargetPortalGroupTag").as_deref(),
        Some("1")
    );
    assert_eq!(
        answer(&response, "MaxRecvDataSegmentLength").as_deref(),
        Some("262144")
    );
    assert_eq!(answer(&response, "IFMarker").as_deref(), Some("No"));
    assert_eq!(answer(&response, "InitialR2T").as_deref(), Some("No"));
    assert_eq!(
        answer(&response, "FirstBurstLength").as_deref(),
        Some("65536")
    );
    // Negative control: the same login for a target we do not serve is refused 0x0203.
    let mut other = cfg();
    other.targets[0].name = "iqn.2026-12.io.ringblk:other".into();
    let step = Login::new(other, ENTROPY, 1, 0).handle(&pdus[0]);
    assert!(matches!(step, LoginStep::Fail { .. }));
    assert_eq!(status_of(&step), status::NOT_FOUND);
}

/// `iscsi-ls` against tgtd: a discovery login, then SendTargets=All. Our text answer is
/// byte for byte what tgtd sent.
#[test]
fn libiscsi_discovery_fixture() {
    let pdus = testutil::split(testutil::LS_DISCOVERY_I2T);
    let mut login = Login::new(cfg(), ENTROPY, 9, 0);
    let LoginStep::Complete { response, params } = login.handle(&pdus[0]) else {
        panic!("discovery login refused");
    };
    assert_eq!(params.session_type, SessionType::Discovery);
    assert_eq!(params.target, None);
    // Session keys of a normal session are irrelevant in discovery.
    assert_eq!(
        answer(&response, "MaxBurstLength").as_deref(),
        Some("Irrelevant")
    );
    assert_eq!(answer(&response, "TargetPortalGroupTag"), None);
    let Bhs::TextRequest(treq) = pdus[1].bhs else {
        panic!("second PDU is not a Text request");
    };
    let mut ex = crate::discovery::TextExchange::new();
    let reply = ex.handle(&treq, &pdus[1].data, &cfg(), &params);
    let tgt = testutil::split(testutil::LS_DISCOVERY_T2I);
    assert_eq!(reply.map(|r| r.data), Ok(tgt[1].data.clone()));
}

/// CHAP math against libiscsi: its CHAP_R for tgtd's CHAP_I/CHAP_C and the secret
/// `s3cretpasswd12` equals `chap_response`; for the wrong-secret capture it does not
/// (the negative control is the second capture itself).
#[test]
fn chap_response_matches_libiscsi() {
    let i2t = testutil::split(testutil::CHAP_I2T);
    let t2i = testutil::split(testutil::CHAP_T2I);
    let challenge = answer(&t2i[1], "CHAP_C").and_then(|c| text::parse_binary(&c, 1024));
    let id = answer(&t2i[1], "CHAP_I").and_then(|i| text::parse_number(&i));
    let r = answer(&i2t[2], "CHAP_R").and_then(|r| text::parse_binary(&r, 1024));
    let (Some(challenge), Some(id), Some(r)) = (challenge, id, r) else {
        panic!("capture lacks CHAP keys");
    };
    assert_eq!(
        r,
        chap_response(id as u8, b"s3cretpasswd12", &challenge).to_vec()
    );
    assert_ne!(
        r,
        chap_response(id as u8, b"s3cretpasswd13", &challenge).to_vec()
    );
    // The wrong-secret capture: libiscsi used `wrongpasswd1234`, and tgtd refused.
    let wi2t = testutil::split(testutil::CHAP_WRONG_I2T);
    let wt2i = testutil::split(testutil::CHAP_WRONG_T2I);
    let wc = answer(&wt2i[1], "CHAP_C").and_then(|c| text::parse_binary(&c, 1024));
    let wr = answer(&wi2t[2], "CHAP_R").and_then(|r| text::parse_binary(&r, 1024));
    let (Some(wc), Some(wr)) = (wc, wr) else {
        panic!("capture lacks CHAP keys");
    };
    assert_ne!(wr, chap_response(2, b"s3cretpasswd12", &wc).to_vec());
    assert_eq!(wr, chap_response(2, b"wrongpasswd1234", &wc).to_vec());
}

/// libiscsi's CHAP login replayed to us: the first two steps go as with tgtd, and the
/// captured CHAP_R (computed for tgtd's challenge) is refused for ours: a replayed
/// response must never authenticate.
#[test]
fn chap_fixture_replay_is_refused() {
    let pdus = testutil::split(testutil::CHAP_I2T);
    let mut login = Login::new(chap_cfg(false), ENTROPY, 1, 0);
    let s1 = login.handle(&pdus[0]);
    let LoginStep::Continue(r1) = &s1 else {
        panic!("{s1:?}")
    };
    assert_eq!(answer(r1, "AuthMethod").as_deref(), Some("CHAP"));
    assert!(!resp(r1).transit, "must not leave security before CHAP");
    let s2 = login.handle(&pdus[1]);
    let LoginStep::Continue(r2) = &s2 else {
        panic!("{s2:?}")
    };
    assert_eq!(answer(r2, "CHAP_A").as_deref(), Some("5"));
    assert_eq!(answer(r2, "CHAP_I").as_deref(), Some("7"));
    assert_eq!(answer(r2, "CHAP_C"), Some(text::hex(&[7; 16])));
    let s3 = login.handle(&pdus[2]);
    assert!(matches!(s3, LoginStep::Fail { .. }), "{s3:?}");
    assert_eq!(status_of(&s3), status::AUTHENTICATION_FAILURE);
}

/// A CHAP login as an initiator computes it, one-way and mutual, to full feature.
#[test]
fn chap_login_one_way_and_mutual() {
    for mutual in [false, true] {
        let mut login = Login::new(chap_cfg(mutual), ENTROPY, 1, 0);
        let mut first = LEADING.to_vec();
        first.push(("AuthMethod", "None,CHAP"));
        assert!(matches!(
            login.handle(&req(0, 1, true, false, &first)),
            LoginStep::Continue(_)
        ));
        let step = login.handle(&req(0, 1, false, false, &[("CHAP_A", "7,5")]));
        let LoginStep::Continue(r) = step else {
            panic!()
        };
        let challenge = answer(&r, "CHAP_C").and_then(|c| text::parse_binary(&c, 64));
        let id = answer(&r, "CHAP_I").and_then(|i| text::parse_number(&i));
        let (Some(challenge), Some(id)) = (challenge, id) else {
            panic!()
        };
        let proof = text::hex(&chap_response(id as u8, b"s3cretpasswd12", &challenge));
        let mut body = vec![("CHAP_N", "alice"), ("CHAP_R", proof.as_str())];
        let c2 = text::hex(&[0x42; 16]);
        if mutual {
            body.push(("CHAP_I", "9"));
            body.push(("CHAP_C", c2.as_str()));
        }
        let step = login.handle(&req(0, 1, true, false, &body));
        let LoginStep::Continue(r) = step else {
            panic!("{step:?}")
        };
        assert!(resp(&r).transit && resp(&r).nsg == 1);
        if mutual {
            let expected = text::hex(&chap_response(9, b"targetsecret99", &[0x42; 16]));
            assert_eq!(answer(&r, "CHAP_N").as_deref(), Some("tgt"));
            assert_eq!(answer(&r, "CHAP_R"), Some(expected));
        }
        let step = login.handle(&req(1, 3, true, false, &[("MaxBurstLength", "65536")]));
        let LoginStep::Complete { params, .. } = step else {
            panic!("{step:?}")
        };
        assert_eq!(params.authenticated_user.as_deref(), Some("alice"));
        assert_eq!(params.max_burst_length_bytes, 65_536);
    }
}

/// RFC 7143 §12.1.3: an initiator that hands our own challenge back (to make us compute
/// a response it can replay) is refused even with the right CHAP_R.
#[test]
fn reflected_challenge_is_refused() {
    let mut login = Login::new(chap_cfg(true), ENTROPY, 1, 0);
    let mut first = LEADING.to_vec();
    first.push(("AuthMethod", "CHAP"));
    login.handle(&req(0, 1, false, false, &first));
    login.handle(&req(0, 1, false, false, &[("CHAP_A", "5")]));
    let proof = text::hex(&chap_response(7, b"s3cretpasswd12", &[7; 16]));
    let ours = text::hex(&[7; 16]);
    let body = [
        ("CHAP_N", "alice"),
        ("CHAP_R", proof.as_str()),
        ("CHAP_I", "7"),
        ("CHAP_C", ours.as_str()),
    ];
    let step = login.handle(&req(0, 1, true, false, &body));
    assert_eq!(status_of(&step), status::AUTHENTICATION_FAILURE);
    // Control: the same with a fresh challenge passes.
    let mut login = Login::new(chap_cfg(true), ENTROPY, 1, 0);
    login.handle(&req(0, 1, false, false, &first));
    login.handle(&req(0, 1, false, false, &[("CHAP_A", "5")]));
    let fresh = text::hex(&[8; 16]);
    let body = [
        ("CHAP_N", "alice"),
        ("CHAP_R", proof.as_str()),
        ("CHAP_I", "7"),
        ("CHAP_C", fresh.as_str()),
    ];
    assert!(matches!(
        login.handle(&req(0, 1, true, false, &body)),
        LoginStep::Continue(_)
    ));
}

/// Refusals, each with the status RFC 7143 §11.13.5 gives it.
#[test]
fn refusals_carry_their_status() {
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = LEADING.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let cases: Vec<(LoginConfig, Pdu, u16)> = vec![
        // CHAP required, the initiator skips security.
        (
            chap_cfg(false),
            req(1, 3, true, false, &LEADING),
            status::AUTHENTICATION_FAILURE,
        ),
        // CHAP required, the initiator offers None only.
        (
            chap_cfg(false),
            req(0, 1, true, false, &with(&[("AuthMethod", "None")])),
            status::AUTHENTICATION_FAILURE,
        ),
        // No CHAP configured, the initiator insists on it.
        (
            cfg(),
            req(0, 1, true, false, &with(&[("AuthMethod", "CHAP")])),
            status::AUTHENTICATION_FAILURE,
        ),
        // No AuthMethod but CHAP is required and the initiator wants to leave security.
        (
            chap_cfg(false),
            req(0, 1, true, false, &LEADING),
            status::AUTHENTICATION_FAILURE,
        ),
        (
            cfg(),
            req(1, 3, true, false, &LEADING[..2]),
            status::MISSING_PARAMETER,
        ),
        (
            cfg(),
            req(1, 3, true, false, &LEADING[1..]),
            status::MISSING_PARAMETER,
        ),
        (
            cfg(),
            req(
                1,
                3,
                true,
                false,
                &with(&[("MaxBurstLength", "512"), ("MaxBurstLength", "512")]),
            ),
            status::INITIATOR_ERROR,
        ),
        (
            cfg(),
            req(1, 3, true, false, &[LEADING[0], ("SessionType", "Bogus")]),
            status::SESSION_TYPE_NOT_SUPPORTED,
        ),
        // T and C together; CSG = 2; NSG backwards.
        (
            cfg(),
            req(1, 3, true, true, &LEADING),
            status::INITIATOR_ERROR,
        ),
        (
            cfg(),
            req(2, 3, true, false, &LEADING),
            status::INITIATOR_ERROR,
        ),
        (
            cfg(),
            req(1, 0, true, false, &LEADING),
            status::INITIATOR_ERROR,
        ),
        // Security keys in the operational stage.
        (
            cfg(),
            req(1, 3, true, false, &with(&[("AuthMethod", "None")])),
            status::INITIATOR_ERROR,
        ),
    ];
    for (i, (c, pdu, want)) in cases.into_iter().enumerate() {
        let step = Login::new(c, ENTROPY, 1, 0).handle(&pdu);
        assert!(matches!(step, LoginStep::Fail { .. }), "case {i}: {step:?}");
        assert_eq!(status_of(&step), want, "case {i}");
    }
    // Header-only refusals.
    let mut p = req(1, 3, true, false, &LEADING);
    if let Bhs::LoginRequest(r) = &mut p.bhs {
        r.tsih = 5;
    }
    assert_eq!(
        status_of(&Login::new(cfg(), ENTROPY, 1, 0).handle(&p)),
        status::SESSION_DOES_NOT_EXIST
    );
    if let Bhs::LoginRequest(r) = &mut p.bhs {
        r.tsih = 0;
        r.version_min = 1;
        r.version_max = 2;
    }
    assert_eq!(
        status_of(&Login::new(cfg(), ENTROPY, 1, 0).handle(&p)),
        status::UNSUPPORTED_VERSION
    );
    let nop = Pdu::new(
        Bhs::NopOut(crate::pdu::NopOut {
            immediate: true,
            lun: 0,
            itt: 1,
            ttt: u32::MAX,
            cmd_sn: 0,
            exp_stat_sn: 0,
        }),
        vec![],
    );
    assert_eq!(
        status_of(&Login::new(cfg(), ENTROPY, 1, 0).handle(&nop)),
        status::INVALID_DURING_LOGIN
    );
}

/// Keys we do not know, values out of range, and the C bit spanning PDUs.
#[test]
fn answers_and_continuation() {
    let mut login = Login::new(cfg(), ENTROPY, 1, 0);
    // The leading text split in two PDUs by the C bit, the cut inside a key.
    let mut text = Vec::new();
    for (k, v) in LEADING {
        text::push(&mut text, k, v);
    }
    text::push(&mut text, "X-com.example.Foo", "1");
    text::push(&mut text, "MaxBurstLength", "100");
    text::push(&mut text, "DefaultTime2Wait", "5");
    text::push(&mut text, "HeaderDigest", "CRC32C,None");
    text::push(&mut text, "ImmediateData", "Maybe");
    // InitialR2T's result is the OR: the initiator's Yes wins over our No.
    text::push(&mut text, "InitialR2T", "Yes");
    let (a, b) = text.split_at(20);
    let mut p1 = req(1, 3, false, true, &[]);
    p1.data = a.to_vec();
    let LoginStep::Continue(ack) = login.handle(&p1) else {
        panic!()
    };
    assert!(ack.data.is_empty() && !resp(&ack).transit);
    let mut p2 = req(1, 3, true, false, &[]);
    p2.data = b.to_vec();
    let LoginStep::Complete { response, params } = login.handle(&p2) else {
        panic!("continued login refused");
    };
    assert_eq!(
        answer(&response, "X-com.example.Foo").as_deref(),
        Some("NotUnderstood")
    );
    assert_eq!(
        answer(&response, "MaxBurstLength").as_deref(),
        Some("Reject")
    );
    assert_eq!(
        answer(&response, "ImmediateData").as_deref(),
        Some("Reject")
    );
    assert_eq!(answer(&response, "DefaultTime2Wait").as_deref(), Some("5"));
    assert_eq!(answer(&response, "HeaderDigest").as_deref(), Some("CRC32C"));
    assert!(params.header_digest);
    assert_eq!(answer(&response, "InitialR2T").as_deref(), Some("Yes"));
    assert!(params.initial_r2t);
    assert_eq!(
        params.max_burst_length_bytes, 262_144,
        "a rejected value keeps the default"
    );
    // Stat SNs advance by one per response.
    assert_eq!(resp(&response).stat_sn, resp(&ack).stat_sn + 1);
}

/// Digest choice: the initiator's order, unless we require digests.
#[test]
fn digest_negotiation() {
    let run = |c: LoginConfig, offer: &'static str| {
        let mut body = LEADING.to_vec();
        body.push(("HeaderDigest", offer));
        match Login::new(c, ENTROPY, 1, 0).handle(&req(1, 3, true, false, &body)) {
            LoginStep::Complete { response, params } => {
                (answer(&response, "HeaderDigest"), params.header_digest)
            }
            other => panic!("{other:?}"),
        }
    };
    let required = LoginConfig {
        digests_required: true,
        ..cfg()
    };
    let refused = LoginConfig {
        digests_allowed: false,
        ..cfg()
    };
    assert_eq!(run(cfg(), "None,CRC32C"), (Some("None".into()), false));
    assert_eq!(
        run(required.clone(), "None,CRC32C"),
        (Some("CRC32C".into()), true)
    );
    assert_eq!(run(required, "None"), (Some("Reject".into()), false));
    assert_eq!(run(refused, "CRC32C,None"), (Some("None".into()), false));
}

/// An unbounded C-bit text is cut off at the bound.
#[test]
fn continuation_is_bounded() {
    let mut c = cfg();
    c.text_max_bytes = 1000;
    let mut login = Login::new(c, ENTROPY, 1, 0);
    let mut p = req(1, 3, false, true, &[]);
    p.data = vec![b'a'; 600];
    assert!(matches!(login.handle(&p), LoginStep::Continue(_)));
    let step = login.handle(&p);
    assert_eq!(status_of(&step), status::INITIATOR_ERROR);
}

proptest! {
    /// Arbitrary sequences of login requests (random stages, bits and keys drawn from the
    /// real ones) never panic; every answer is a login response to the request's ITT;
    /// a completed login's parameters are within RFC 7143's ranges.
    #[test]
    fn arbitrary_logins_are_safe(steps in prop::collection::vec(
        (0u8..4, 0u8..4, any::<bool>(), any::<bool>(),
         prop::collection::vec((prop::sample::select(&KEYS[..]), "[A-Za-z0-9,=x]{0,12}"), 0..6)),
        1..8), chap: bool) {
        let mut login = Login::new(if chap { chap_cfg(true) } else { cfg() }, ENTROPY, 3, 0);
        for (i, (csg, nsg, t, c, keys)) in steps.into_iter().enumerate() {
            let mut body: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
            if i == 0 {
                body.extend_from_slice(&LEADING);
            }
            let step = login.handle(&req(csg, nsg, t, c, &body));
            let (pdu, done) = match &step {
                LoginStep::Continue(p) => (p, false),
                LoginStep::Complete { response, params } => {
                    prop_assert!(params.max_burst_length_bytes >= 512);
                    prop_assert!(params.first_burst_length_bytes <= params.max_burst_length_bytes);
                    prop_assert!(params.max_connections == 1);
                    prop_assert!(params.error_recovery_level == 0);
                    prop_assert!(params.max_xmit_data_segment_length_bytes >= 512);
                    prop_assert!(!chap || params.authenticated_user.is_some());
                    (response, true)
                }
                LoginStep::Fail { response, .. } => (response, true),
            };
            prop_assert_eq!(resp(pdu).itt, 5);
            if done {
                break;
            }
        }
    }
}

const KEYS: [&str; 16] = [
    "AuthMethod",
    "CHAP_A",
    "CHAP_N",
    "CHAP_R",
    "HeaderDigest",
    "DataDigest",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "ErrorRecoveryLevel",
    "MaxRecvDataSegmentLength",
    "DefaultTime2Wait",
    "X-foo",
    "SessionType",
];
