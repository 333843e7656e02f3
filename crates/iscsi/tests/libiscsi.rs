//! Interoperability of the sans-IO pieces with a real initiator: a deliberately minimal,
//! blocking, test-only target (one thread, one connection at a time, a zero-filled
//! 64 MiB read-only LU 0) built from the crate's public API, driven by libiscsi's
//! `iscsi-ls`, `iscsi-inq` and `iscsi-readcapacity16` (Debian `libiscsi-bin`).
//!
//! This is not the front end (no reactor, no block layer, no writes): it checks that
//! login, CHAP, discovery, the PDU codec, CDB decoding and the response builders are
//! what a real initiator accepts. Without the tools the tests fail, naming the package
//! (`libiscsi-bin`); the other tests do not depend on them. Negative control: the wrong CHAP secret and the
//! missing one must fail (asserted below).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use ringblk_iscsi::discovery::TextExchange;
use ringblk_iscsi::login::{
    ChapConfig, ChapCredentials, Login, LoginConfig, LoginStep, SessionParams, TargetEntry,
};
use ringblk_iscsi::pdu::{
    Bhs, DecoderLimits, Digests, LogoutResponse, NopIn, Pdu, PduDecoder, RESERVED_TAG,
};
use ringblk_iscsi::response::{data_in, scsi_response, Sns};
use ringblk_iscsi::scsi::pages::{self, Identity};
use ringblk_iscsi::scsi::sense::status;
use ringblk_iscsi::scsi::{self, Device, ScsiRequest};
use ringblk_iscsi::window::{Admit, CmdWindow};

const VOL: &str = "iqn.2026-12.io.ringblk:vol0";
const SECURE: &str = "iqn.2026-12.io.ringblk:secure";
const MUTUAL: &str = "iqn.2026-12.io.ringblk:mutual";

fn config(port: u16) -> LoginConfig {
    let addr = format!("127.0.0.1:{port},1");
    LoginConfig {
        targets: vec![
            TargetEntry {
                name: VOL.into(),
                addresses: vec![addr.clone()],
                chap: None,
            },
            TargetEntry {
                name: SECURE.into(),
                addresses: vec![addr],
                chap: Some(ChapConfig {
                    initiator: ChapCredentials {
                        user: "alice".into(),
                        secret: b"s3cretpasswd12".to_vec(),
                    },
                    target: None,
                }),
            },
            TargetEntry {
                name: MUTUAL.into(),
                addresses: vec![format!("127.0.0.1:{port},1")],
                chap: Some(ChapConfig {
                    initiator: ChapCredentials {
                        user: "alice".into(),
                        secret: b"s3cretpasswd12".to_vec(),
                    },
                    target: Some(ChapCredentials {
                        user: "tgt".into(),
                        secret: b"targetsecret99".to_vec(),
                    }),
                }),
            },
        ],
        ..LoginConfig::default()
    }
}

struct Conn {
    sock: TcpStream,
    digests: Digests,
}

impl Conn {
    fn send(&mut self, pdu: &Pdu) -> std::io::Result<()> {
        if std::env::var_os("RINGBLK_ISCSI_TRACE").is_some() {
            eprintln!("-> {:?} {:?}", pdu.bhs, String::from_utf8_lossy(&pdu.data));
        }
        let bytes = pdu
            .to_bytes(self.digests)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.sock.write_all(&bytes)
    }
}

/// Serves one connection until logout or close; returns the digests it ended with.
fn serve(sock: TcpStream, cfg: &LoginConfig, tsih: u16) -> std::io::Result<Digests> {
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut conn = Conn {
        sock,
        digests: Digests::default(),
    };
    let mut dec = PduDecoder::new(DecoderLimits::default());
    // Entropy from the clock is good enough for a test; a real target reads the OS's.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.subsec_nanos());
    let mut login = Login::new(cfg.clone(), [(nanos % 251) as u8; 17], tsih, 1);
    let mut session: Option<(SessionParams, CmdWindow, u32)> = None;
    let mut text = TextExchange::new();
    let dev = Device {
        read_only: true,
        ..Device::with_capacity(64 << 20, 512)
    };
    let id = Identity::new("TEST", "serial0", 0x1234);
    let mut buf = vec![0u8; 65536];
    loop {
        let n = conn.sock.read(&mut buf)?;
        if n == 0 {
            return Ok(conn.digests);
        }
        let mut input = &buf[..n];
        while !input.is_empty() {
            let (used, pdu) = dec
                .feed(input)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            input = &input[used..];
            let Some(pdu) = pdu else { continue };
            if std::env::var_os("RINGBLK_ISCSI_TRACE").is_some() {
                eprintln!("<- {:?} {:?}", pdu.bhs, String::from_utf8_lossy(&pdu.data));
            }
            let Some((params, window, stat_sn)) = session.as_mut() else {
                match login.handle(&pdu) {
                    LoginStep::Continue(r) => conn.send(&r)?,
                    LoginStep::Fail { response, .. } => {
                        conn.send(&response)?;
                        return Ok(conn.digests);
                    }
                    LoginStep::Complete { response, params } => {
                        conn.send(&response)?;
                        conn.digests = Digests {
                            header: params.header_digest,
                            data: params.data_digest,
                        };
                        dec.reconfigure(
                            conn.digests,
                            DecoderLimits {
                                data_segment_max_bytes: params.max_recv_data_segment_length_bytes,
                                ..DecoderLimits::default()
                            },
                        );
                        let window = CmdWindow::new(params.exp_cmd_sn, 32);
                        let stat_sn = params.stat_sn;
                        session = Some((params, window, stat_sn));
                    }
                }
                continue;
            };
            let sns = |w: &CmdWindow, s: u32| Sns {
                stat_sn: s,
                exp_cmd_sn: w.exp_cmd_sn(),
                max_cmd_sn: w.max_cmd_sn(),
            };
            match pdu.bhs {
                Bhs::TextRequest(req) => {
                    if window.admit(req.cmd_sn, req.immediate) == Admit::Drop {
                        continue;
                    }
                    let reply = text
                        .handle(&req, &pdu.data, cfg, params)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    if !req.immediate {
                        window.complete();
                    }
                    let s = sns(window, *stat_sn);
                    conn.send(&reply.to_pdu(req.lun, s.stat_sn, s.exp_cmd_sn, s.max_cmd_sn))?;
                    *stat_sn += 1;
                }
                Bhs::NopOut(nop) if nop.itt != RESERVED_TAG => {
                    let _ = window.admit(nop.cmd_sn, nop.immediate);
                    if !nop.immediate {
                        window.complete();
                    }
                    let s = sns(window, *stat_sn);
                    let reply = Bhs::NopIn(NopIn {
                        lun: nop.lun,
                        itt: nop.itt,
                        ttt: RESERVED_TAG,
                        stat_sn: s.stat_sn,
                        exp_cmd_sn: s.exp_cmd_sn,
                        max_cmd_sn: s.max_cmd_sn,
                    });
                    conn.send(&Pdu::new(reply, pdu.data.clone()))?;
                    *stat_sn += 1;
                }
                Bhs::LogoutRequest(req) => {
                    let _ = window.admit(req.cmd_sn, req.immediate);
                    let s = sns(window, *stat_sn);
                    let reply = Bhs::LogoutResponse(LogoutResponse {
                        response: 0,
                        itt: req.itt,
                        stat_sn: s.stat_sn,
                        exp_cmd_sn: s.exp_cmd_sn,
                        max_cmd_sn: s.max_cmd_sn,
                        time2wait: 0,
                        time2retain: 0,
                    });
                    conn.send(&Pdu::new(reply, vec![]))?;
                    return Ok(conn.digests);
                }
                Bhs::ScsiCommand(cmd) => {
                    if window.admit(cmd.cmd_sn, cmd.immediate) == Admit::Drop {
                        continue;
                    }
                    let cdb = pdu.cdb().ok().flatten().unwrap_or_default();
                    let answer = answer(&cdb, &dev, &id);
                    if !cmd.immediate {
                        window.complete();
                    }
                    let s = sns(window, *stat_sn);
                    match answer {
                        Ok(data) => {
                            let seq = data_in(
                                cmd.itt,
                                &data,
                                cmd.expected_data_len,
                                params.max_xmit_data_segment_length_bytes,
                                s,
                                true,
                            );
                            for p in &seq.pdus {
                                conn.send(p)?;
                            }
                            if !seq.status_sent {
                                let r = scsi_response(
                                    cmd.itt,
                                    status::GOOD,
                                    None,
                                    cmd.expected_data_len,
                                    0,
                                    0,
                                    s,
                                );
                                conn.send(&r)?;
                            }
                        }
                        Err(sense) => {
                            let r = scsi_response(
                                cmd.itt,
                                status::CHECK_CONDITION,
                                Some(&sense),
                                cmd.expected_data_len,
                                0,
                                0,
                                s,
                            );
                            conn.send(&r)?;
                        }
                    }
                    *stat_sn += 1;
                }
                _ => {}
            }
        }
    }
}

/// The data a command returns (an empty vector for commands without data).
fn answer(cdb: &[u8], dev: &Device, id: &Identity) -> Result<Vec<u8>, scsi::Sense> {
    let trunc = |d: Vec<u8>, n: usize| pages::truncate(d, n);
    Ok(match scsi::decode(cdb, dev)? {
        ScsiRequest::Inquiry {
            evpd: false,
            alloc_len,
            ..
        } => trunc(pages::inquiry_standard(id), alloc_len.into()),
        ScsiRequest::Inquiry {
            page, alloc_len, ..
        } => trunc(pages::inquiry_vpd(page, id, dev)?, alloc_len.into()),
        ScsiRequest::ReadCapacity10 => pages::read_capacity10(dev),
        ScsiRequest::ReadCapacity16 { alloc_len } => {
            trunc(pages::read_capacity16(dev), alloc_len as usize)
        }
        ScsiRequest::ReportLuns { alloc_len, .. } => {
            trunc(pages::report_luns(), alloc_len as usize)
        }
        ScsiRequest::ModeSense {
            ten,
            dbd,
            pc,
            page,
            subpage,
            alloc_len,
        } => trunc(
            pages::mode_sense(dev, ten, dbd, pc, page, subpage)?,
            alloc_len.into(),
        ),
        ScsiRequest::Read { len_bytes, .. } => vec![0; len_bytes as usize],
        _ => Vec::new(),
    })
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Fails (a test never skips because a tool is absent) naming the package.
fn need(tool: &str) {
    assert!(
        have(tool),
        "{tool} is missing: install Debian's libiscsi-bin (ci/test.sh does)"
    );
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout").arg("30").args(args).output();
    match out {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
        ),
        Err(e) => (false, e.to_string()),
    }
}

#[test]
fn libiscsi_tools_against_the_sans_io_pieces() {
    for tool in ["iscsi-ls", "iscsi-inq", "iscsi-readcapacity16"] {
        need(tool);
    }
    let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
        panic!("cannot listen on loopback");
    };
    let port = listener.local_addr().map_or(0, |a| a.port());
    let cfg = config(port);
    // A thread per connection: iscsi-ls keeps its discovery session open while it logs
    // in to each target.
    std::thread::spawn(move || {
        for (i, sock) in listener.incoming().enumerate() {
            if let Ok(sock) = sock {
                let cfg = cfg.clone();
                std::thread::spawn(move || serve(sock, &cfg, 1 + i as u16));
            }
        }
    });
    let portal = format!("iscsi://127.0.0.1:{port}");
    // Discovery, then a normal login per target to list its LUNs (with the CHAP
    // credentials, which the target without CHAP answers with AuthMethod=None).
    let with_chap = format!("iscsi://alice%s3cretpasswd12@127.0.0.1:{port}");
    let (ok, out) = run(&["iscsi-ls", "-s", &with_chap]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("Target:{VOL} Portal:127.0.0.1:{port},1")),
        "{out}"
    );
    assert!(out.contains(SECURE), "{out}");
    assert!(out.contains("Lun:0"), "{out}");
    let (ok, out) = run(&["iscsi-inq", &format!("{portal}/{VOL}/0")]);
    assert!(ok && out.contains("Vendor:RINGBLK"), "{out}");
    let (ok, out) = run(&[
        "iscsi-inq",
        "-e",
        "1",
        "-c",
        "0x83",
        &format!("{portal}/{VOL}/0"),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["iscsi-readcapacity16", &format!("{portal}/{VOL}/0")]);
    assert!(ok && out.contains("Total size:67108864"), "{out}");
    assert!(out.contains("LBPME:1"), "{out}");
    // CHAP: the right secret logs in, a wrong one and none are refused.
    let good = format!("iscsi://alice%s3cretpasswd12@127.0.0.1:{port}/{SECURE}/0");
    let (ok, out) = run(&["iscsi-inq", &good]);
    assert!(ok && out.contains("Vendor:RINGBLK"), "{out}");
    let bad = format!("iscsi://alice%wrongpasswd1234@127.0.0.1:{port}/{SECURE}/0");
    let (ok, out) = run(&["iscsi-inq", &bad]);
    assert!(!ok && out.contains("Authentication failure"), "{out}");
    let (ok, out) = run(&["iscsi-inq", &format!("{portal}/{SECURE}/0")]);
    assert!(!ok, "{out}");
    // Mutual CHAP: libiscsi checks our CHAP_R; with the wrong target secret it must
    // refuse us (the negative control of our side's answer).
    let mutual = |secret: &str| {
        format!(
            "iscsi://alice%s3cretpasswd12@127.0.0.1:{port}/{MUTUAL}/0?target_user=tgt&target_password={secret}"
        )
    };
    let (ok, out) = run(&["iscsi-inq", &mutual("targetsecret99")]);
    assert!(ok && out.contains("Vendor:RINGBLK"), "{out}");
    let (ok, out) = run(&["iscsi-inq", &mutual("notthesecret00")]);
    assert!(!ok, "{out}");
}

/// CRC32C header digests with libiscsi: libiscsi offers `None,CRC32C`, so a portal that
/// requires digests makes it use them; every PDU after login then carries a header
/// digest that both sides check. (libiscsi 1.19 offers no data digest.) Negative
/// control: sending the digest big-endian (`digest::to_wire`) fails this (tried).
#[test]
fn libiscsi_with_header_digests() {
    need("iscsi-inq");
    let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
        panic!("cannot listen on loopback");
    };
    let port = listener.local_addr().map_or(0, |a| a.port());
    let cfg = LoginConfig {
        digests_required: true,
        ..config(port)
    };
    let digests_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = digests_seen.clone();
    std::thread::spawn(move || {
        for (i, sock) in listener.incoming().enumerate() {
            if let Ok(sock) = sock {
                let cfg = cfg.clone();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    let on = serve(sock, &cfg, 1 + i as u16);
                    if on.is_ok_and(|d| d.header) {
                        seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        }
    });
    let url = format!("iscsi://127.0.0.1:{port}/{VOL}/0");
    let (ok, out) = run(&["iscsi-inq", &url]);
    assert!(ok && out.contains("Vendor:RINGBLK"), "{out}");
    let (ok, out) = run(&["iscsi-readcapacity16", &url]);
    assert!(ok && out.contains("Total size:67108864"), "{out}");
    assert!(
        digests_seen.load(std::sync::atomic::Ordering::SeqCst),
        "no session used digests"
    );
}
