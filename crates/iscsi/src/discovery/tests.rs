use super::*;
use crate::login::tests_support::params_for;
use crate::login::{LoginConfig, SessionParams, SessionType, TargetEntry};

fn cfg(n: usize) -> LoginConfig {
    LoginConfig {
        targets: (0..n)
            .map(|i| TargetEntry {
                name: format!("iqn.2026-12.io.ringblk:vol{i}"),
                addresses: vec![format!("127.0.0.1:3260,1"), format!("[::1]:3260,1")],
                chap: None,
            })
            .collect(),
        ..LoginConfig::default()
    }
}

fn text_req(itt: u32, ttt: u32, cont: bool) -> TextRequest {
    TextRequest {
        immediate: true,
        final_: !cont,
        cont,
        lun: 0,
        itt,
        ttt,
        cmd_sn: 1,
        exp_stat_sn: 1,
    }
}

#[test]
fn send_targets_values() {
    let c = cfg(3);
    let mut p: SessionParams = params_for(SessionType::Discovery, None);
    let all = send_targets("All", &c, &p);
    assert_eq!(text::parse(&all).map(|v| v.len()), Ok(9));
    let one = send_targets("iqn.2026-12.io.ringblk:VOL1", &c, &p);
    assert!(one.starts_with(b"TargetName=iqn.2026-12.io.ringblk:vol1\0"));
    assert!(send_targets("iqn.x:none", &c, &p).is_empty());
    assert!(send_targets("", &c, &p).is_empty());
    p.target = Some(2);
    assert!(send_targets("", &c, &p).starts_with(b"TargetName=iqn.2026-12.io.ringblk:vol2\0"));
}

/// A response longer than the initiator's MaxRecvDataSegmentLength comes in C-bit pieces
/// that add up to the whole; an unknown tag is refused.
#[test]
fn long_response_in_pieces() {
    let c = cfg(40);
    let mut p = params_for(SessionType::Discovery, None);
    p.max_xmit_data_segment_length_bytes = 512;
    let mut ex = TextExchange::new();
    let mut whole = Vec::new();
    let mut r = ex.handle(
        &text_req(9, RESERVED_TAG, false),
        b"SendTargets=All\0",
        &c,
        &p,
    );
    let mut pieces = 0;
    loop {
        let Ok(reply) = r else { panic!("{r:?}") };
        assert!(reply.data.len() <= 512);
        assert_eq!(reply.itt, 9);
        pieces += 1;
        whole.extend_from_slice(&reply.data);
        if reply.final_ {
            assert!(!reply.cont && reply.ttt == RESERVED_TAG);
            break;
        }
        assert!(reply.cont && reply.ttt != RESERVED_TAG);
        r = ex.handle(&text_req(9, reply.ttt, false), b"", &c, &p);
    }
    assert!(pieces > 2);
    assert_eq!(whole, send_targets("All", &c, &p));
    // Negative control: a tag we never gave out.
    assert_eq!(
        ex.handle(&text_req(9, 0x1234, false), b"", &c, &p),
        Err(TextExchangeError::UnknownTag(0x1234))
    );
}

#[test]
fn continued_request_and_unknown_keys() {
    let c = cfg(1);
    let p = params_for(SessionType::Discovery, None);
    let mut ex = TextExchange::new();
    let ack = ex.handle(&text_req(3, RESERVED_TAG, true), b"SendTar", &c, &p);
    let Ok(ack) = ack else { panic!() };
    assert!(ack.data.is_empty() && !ack.final_);
    let r = ex.handle(&text_req(3, ack.ttt, false), b"gets=All\0X-y=1\0", &c, &p);
    let Ok(r) = r else { panic!("{r:?}") };
    let pairs = text::parse(&r.data).unwrap_or_default();
    assert_eq!(pairs.len(), 4);
    assert_eq!(pairs[3].value, "NotUnderstood");
}
