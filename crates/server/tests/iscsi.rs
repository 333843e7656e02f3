//! The iSCSI front end (`ringblk serve --iscsi`) driven by real initiators: libiscsi's
//! tools (Debian `libiscsi-bin`: `iscsi-ls`, `iscsi-inq`, `iscsi-readcapacity16`,
//! `iscsi-perf`, the conformance suite `iscsi-test-cu`) and qemu's `iscsi://` driver
//! (`qemu-block-extra`). `ci/test.sh` installs both; a missing tool fails the test
//! (it never skips).
//!
//! Negative controls: a target name nobody serves is refused; a pattern that was not
//! written does not verify (qemu-io, over iSCSI and over NBD); a backup target refuses
//! writes and keeps its old data; the iscsi-test-cu parser is shown a suite that does
//! not pass (REPORT SUPPORTED OPERATION CODES, not implemented) and must not count it.
//!
//! # iscsi-test-cu (libiscsi 1.19, `-d`, a 64 MiB file volume)
//! [`CU_SUITES`] run; [`CU_PASS`] (152 tests) pass and are asserted to keep passing.
//! The SCSI.ReadOnly suite runs against a backup target and must not fail (it skips
//! its ORWRITE part). Known failures and skips (not asserted; the reasons):
//! - `*.DpoFua`, `*.Dpo` (13 tests): SKIPPED, REPORT SUPPORTED OPERATION CODES is
//!   not implemented; `SCSI.Reserve6.TargetColdReset`: SKIPPED, no cold reset;
//!   `SCSI.StartStopUnit.Simple`: SKIPPED, the medium is not removable.
//! - `SCSI.WriteSame10/16.ZeroBlocks`: SKIPPED (WSNZ: zero blocks are refused).
//! - `SCSI.GetLBAStatus.UnmapSingle`: FAILED ("lba offset in first descriptor does
//!   not match request" for LBA 8 after unmapping blocks 8..16), not understood yet:
//!   qemu-img map over iSCSI, which uses GET LBA STATUS, reports such holes exactly
//!   (asserted in the qemu test).
//!
//! Not run (they fail): `iSCSI.iSCSIdatasn` (a bad DataSN closes the connection),
//! `SCSI.PrinServiceactionRange` (READ FULL STATUS is not implemented). Not run yet:
//! MultipathIO, ExtendedCopy, Sanitize, OrWrite, Prefetch, WriteAtomic,
//! ReportSupportedOpcodes (not decoded).
//!
//! Every server here gets its own data dir and RPC socket (the harness) and stops when
//! dropped.

mod common;
use common::rpc_call as rpc;
use common::*;

use std::process::Command;

use serde_json::{json, Value};

const PREFIX: &str = "iqn.2026-12.io.ringblk";

/// Fails (never skips) when a tool is missing, naming the package.
fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is missing: install {package} (ci/test.sh does)"
    );
}

/// A server with a 64 MiB file volume `vol0` and the iSCSI portal on a free port.
fn start() -> (Server, u16) {
    let dir = tmpdir();
    let img = dir.path().join("vol0.img");
    let spec = format!("vol0={},size=64M", img.display());
    let srv = Server::start_in(
        dir,
        &["--cores", "0", "--volume", &spec, "--iscsi", "127.0.0.1:0"],
    );
    let port = portal_port(&srv);
    (srv, port)
}

/// The port of the banner's `iSCSI portal on 127.0.0.1:PORT` line.
fn portal_port(srv: &Server) -> u16 {
    srv.stdout_lines
        .iter()
        .find_map(|l| {
            let rest = l.split("iSCSI portal on 127.0.0.1:").nth(1)?;
            rest.trim_end_matches(':').parse().ok()
        })
        .unwrap_or_else(|| panic!("banner names the iSCSI portal: {:?}", srv.stdout_lines))
}

fn url(port: u16, target: &str) -> String {
    format!("iscsi://127.0.0.1:{port}/{target}/0")
}

fn tool(args: &[&str]) -> (bool, String) {
    let out = run(Command::new(args[0]).args(&args[1..]));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn libiscsi_tools_discover_inquire_and_measure() {
    need("iscsi-ls", "libiscsi-bin");
    need("iscsi-perf", "libiscsi-bin");
    let (srv, port) = start();
    let vol0 = format!("{PREFIX}:vol0");
    let (ok, out) = tool(&["iscsi-ls", "-s", &format!("iscsi://127.0.0.1:{port}")]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("Target:{vol0} Portal:127.0.0.1:{port},1")),
        "{out}"
    );
    assert!(out.contains("Lun:0"), "{out}");
    let (ok, out) = tool(&["iscsi-inq", &url(port, &vol0)]);
    assert!(
        ok && out.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{out}"
    );
    let (ok, out) = tool(&["iscsi-inq", "-e", "1", "-c", "131", &url(port, &vol0)]);
    assert!(ok && out.contains("DEVICE_IDENTIFICATION"), "{out}");
    assert!(out.contains("NAA"), "{out}");
    let (ok, out) = tool(&["iscsi-readcapacity16", &url(port, &vol0)]);
    assert!(ok && out.contains("Total size:67108864"), "{out}");
    // Negative control: a target nobody serves.
    let (ok, out) = tool(&["iscsi-inq", &url(port, &format!("{PREFIX}:nosuchvol"))]);
    assert!(!ok, "{out}");
    // iscsi_list shows the target, and a session while one is logged in.
    let list = rpc(&srv, "iscsi_list", json!({}));
    assert_eq!(
        list["result"]["targets"][0]["name"],
        vol0.as_str(),
        "{list}"
    );
    let mut perf = Command::new("iscsi-perf");
    perf.args(["-t", "3", &url(port, &vol0)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = perf.spawn().expect("iscsi-perf");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let list = rpc(&srv, "iscsi_list", json!({}));
    let out = child.wait_with_output().expect("iscsi-perf output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let iops: f64 = text
        .split("iops average ")
        .last()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    assert!(iops > 0.0, "{text}");
    eprintln!("iscsi-perf (debug build, 4 KiB reads, QD 32): {iops} IOPS");
    let sessions = list["result"]["sessions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        sessions.iter().any(|s| s["target"] == vol0.as_str()),
        "a session while iscsi-perf runs: {list}"
    );
}

#[test]
fn qemu_io_over_iscsi_reads_back_through_nbd_and_backups_are_read_only() {
    need("qemu-io", "qemu-utils");
    let (srv, port) = start();
    let vol0 = url(port, &format!("{PREFIX}:vol0"));
    let nbd = srv.uri("vol0");
    let qio = |uri: &str, cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(uri);
        let out = run(&mut c);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            !text.contains("Unable to load module iscsi"),
            "qemu's iscsi driver is missing: install qemu-block-extra at the qemu-utils version (ci/test.sh does): {text}"
        );
        text
    };
    // 64 writes of 1 MiB at once, each needing R2Ts: the session keeps reading their
    // Data-Out while every window slot is taken (pausing on a full window deadlocks
    // here: tried; run() bounds it).
    let out = run(Command::new("qemu-img").args([
        "bench", "-f", "raw", "-w", "-c", "64", "-d", "64", "-s", "1M", &vol0,
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = qio(&vol0, &["write -P 0xab 4096 1M", "write -P 0x5c 8M 64k"]);
    assert!(!out.contains("failed") && out.contains("wrote"), "{out}");
    // Byte-exact through NBD from the same volume.
    let out = qio(&nbd, &["read -P 0xab 4096 1M", "read -P 0x5c 8M 64k"]);
    assert!(!out.contains("fail"), "{out}");
    // Negative control: a pattern that was not written does not verify.
    let out = qio(&nbd, &["read -P 0xac 4096 4096"]);
    assert!(out.contains("Pattern verification failed"), "{out}");
    let out = qio(&vol0, &["read -P 0x5d 8M 4096"]);
    assert!(out.contains("Pattern verification failed"), "{out}");
    // Discard over iSCSI (UNMAP) succeeds.
    let out = qio(&vol0, &["discard 16M 1M"]);
    assert!(!out.contains("failed"), "{out}");
    // qemu maps the volume with GET LBA STATUS: the discarded range is a hole, the
    // written one data (each the other's negative control).
    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &vol0]));
    let map: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img map: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let at = |off: u64| {
        map.as_array()
            .and_then(|m| {
                m.iter().find(|e| {
                    let start = e["start"].as_u64().unwrap_or(u64::MAX);
                    start <= off && off < start + e["length"].as_u64().unwrap_or(0)
                })
            })
            .map(|e| e["data"].clone())
    };
    assert_eq!(at(16 << 20), Some(json!(false)), "{map}");
    assert_eq!(at(4096), Some(json!(true)), "{map}");

    // A backup is a read-only target with the data of its time.
    let made = rpc(
        &srv,
        "backup_create",
        json!({"volume": "vol0", "name": "b1"}),
    );
    assert!(made.get("error").is_none(), "{made}");
    let mut backup = None;
    for _ in 0..200 {
        let list = rpc(&srv, "iscsi_list", json!({}));
        backup = list["result"]["targets"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["backup"] == "b1"))
            .and_then(|t| t["name"].as_str().map(str::to_string));
        if backup.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let backup = url(port, &backup.expect("the backup is listed as a target"));
    let out = qio(&nbd, &["write -P 0xcd 4096 4096"]);
    assert!(out.contains("wrote"), "{out}");
    let out = qio(&backup, &["read -P 0xab 4096 1M"]);
    assert!(!out.contains("fail"), "{out}");
    let out = qio(&vol0, &["read -P 0xcd 4096 4096"]);
    assert!(!out.contains("fail"), "{out}");
    // Negative control: the backup refuses writes (DATA PROTECT).
    let out = qio(&backup, &["write -P 0xee 0 4096"]);
    assert!(!out.contains("wrote"), "{out}");
}

/// CHAP from the config file's `[iscsi]` table: the right secret lists and opens the
/// target; a wrong one and none are refused (the negative controls).
#[test]
fn chap_from_the_config_file() {
    need("iscsi-ls", "libiscsi-bin");
    let dir = tmpdir();
    let img = dir.path().join("vol0.img");
    let cfg = dir.path().join("ringblk.toml");
    std::fs::write(
        &cfg,
        "[iscsi]\nlisten = \"127.0.0.1:0\"\nchap_user = \"alice\"\nchap_secret = \"s3cretpasswd12\"\n",
    )
    .expect("write config");
    let spec = format!("vol0={},size=64M", img.display());
    let cfg_arg = cfg.display().to_string();
    let srv = Server::start_in(
        dir,
        &["--cores", "0", "--volume", &spec, "--config", &cfg_arg],
    );
    let port = portal_port(&srv);
    let vol0 = format!("{PREFIX}:vol0");
    let with = |secret: &str| format!("iscsi://alice%{secret}@127.0.0.1:{port}");
    let (ok, out) = tool(&["iscsi-ls", "-s", &with("s3cretpasswd12")]);
    assert!(ok && out.contains(&vol0), "{out}");
    let (ok, out) = tool(&["iscsi-inq", &format!("{}/{vol0}/0", with("s3cretpasswd12"))]);
    assert!(ok && out.contains("DIRECT_ACCESS"), "{out}");
    let (ok, out) = tool(&["iscsi-inq", &format!("{}/{vol0}/0", with("wrongpasswd123"))]);
    assert!(!ok, "a wrong secret is refused: {out}");
    let (ok, out) = tool(&["iscsi-inq", &url(port, &vol0)]);
    assert!(!ok, "no CHAP is refused: {out}");
    let (ok, out) = tool(&["iscsi-ls", "-s", &format!("iscsi://127.0.0.1:{port}")]);
    assert!(
        !ok || !out.contains(&vol0),
        "discovery without CHAP is refused: {out}"
    );
}

/// Results of an `iscsi-test-cu` run (verbose output): test name and its outcome.
fn cu_results(out: &str) -> Vec<(String, &'static str)> {
    let mut res = Vec::new();
    for chunk in out.split("Test: ").skip(1) {
        let name = chunk.split(" ...").next().unwrap_or("").trim().to_string();
        let body = chunk.split("Run Summary").next().unwrap_or(chunk);
        let outcome = if body.contains("SKIPPED") {
            "skipped"
        } else if body.contains("FAILED") {
            "failed"
        } else if body.contains("passed") {
            "passed"
        } else {
            "unknown"
        };
        res.push((name, outcome));
    }
    res
}

/// Suites run, in this order (the reservation suites last: a persistent reservation
/// left behind by one of them would make later media access conflict).
const CU_SUITES: &[&str] = &[
    "SCSI.TestUnitReady",
    "SCSI.Inquiry",
    "SCSI.ReadCapacity10",
    "SCSI.ReadCapacity16",
    "SCSI.Read6",
    "SCSI.Read10",
    "SCSI.Read12",
    "SCSI.Read16",
    "SCSI.Write10",
    "SCSI.Write12",
    "SCSI.Write16",
    "SCSI.Verify10",
    "SCSI.Verify12",
    "SCSI.Verify16",
    "SCSI.WriteVerify10",
    "SCSI.WriteVerify12",
    "SCSI.WriteVerify16",
    "SCSI.CompareAndWrite",
    "SCSI.Unmap",
    "SCSI.WriteSame10",
    "SCSI.WriteSame16",
    "SCSI.GetLBAStatus",
    "SCSI.ModeSense6",
    "SCSI.StartStopUnit",
    "SCSI.NoMedia",
    "SCSI.Mandatory",
    "iSCSI.iSCSIcmdsn",
    "iSCSI.iSCSITMF",
    "iSCSI.iSCSIResiduals",
    "SCSI.Reserve6",
    "SCSI.PrinReadKeys",
    "SCSI.PrinReportCapabilities",
    "SCSI.ProutRegister",
    "SCSI.ProutClear",
    "SCSI.ProutPreempt",
    "SCSI.ProutReserve",
];

/// Tests that pass (asserted: a regression fails this test).
const CU_PASS: &[&str] = &[
    "SCSI.TestUnitReady.Simple",
    "SCSI.Inquiry.Standard",
    "SCSI.Inquiry.AllocLength",
    "SCSI.Inquiry.EVPD",
    "SCSI.Inquiry.BlockLimits",
    "SCSI.Inquiry.MandatoryVPDSBC",
    "SCSI.Inquiry.SupportedVPD",
    "SCSI.Inquiry.VersionDescriptors",
    "SCSI.ReadCapacity10.Simple",
    "SCSI.ReadCapacity16.Simple",
    "SCSI.ReadCapacity16.Alloclen",
    "SCSI.ReadCapacity16.PI",
    "SCSI.ReadCapacity16.Support",
    "SCSI.Read6.Simple",
    "SCSI.Read6.BeyondEol",
    "SCSI.Read10.Simple",
    "SCSI.Read10.BeyondEol",
    "SCSI.Read10.ZeroBlocks",
    "SCSI.Read10.ReadProtect",
    "SCSI.Read10.Async",
    "SCSI.Read12.Simple",
    "SCSI.Read12.BeyondEol",
    "SCSI.Read12.ZeroBlocks",
    "SCSI.Read12.ReadProtect",
    "SCSI.Read16.Simple",
    "SCSI.Read16.BeyondEol",
    "SCSI.Read16.ZeroBlocks",
    "SCSI.Read16.ReadProtect",
    "SCSI.Write10.Simple",
    "SCSI.Write10.BeyondEol",
    "SCSI.Write10.ZeroBlocks",
    "SCSI.Write10.WriteProtect",
    "SCSI.Write10.Async",
    "SCSI.Write12.Simple",
    "SCSI.Write12.BeyondEol",
    "SCSI.Write12.ZeroBlocks",
    "SCSI.Write12.WriteProtect",
    "SCSI.Write16.Simple",
    "SCSI.Write16.BeyondEol",
    "SCSI.Write16.ZeroBlocks",
    "SCSI.Write16.WriteProtect",
    "SCSI.Verify10.Simple",
    "SCSI.Verify10.BeyondEol",
    "SCSI.Verify10.ZeroBlocks",
    "SCSI.Verify10.VerifyProtect",
    "SCSI.Verify10.Flags",
    "SCSI.Verify10.Mismatch",
    "SCSI.Verify10.MismatchNoCmp",
    "SCSI.Verify12.Simple",
    "SCSI.Verify12.BeyondEol",
    "SCSI.Verify12.ZeroBlocks",
    "SCSI.Verify12.VerifyProtect",
    "SCSI.Verify12.Flags",
    "SCSI.Verify12.Mismatch",
    "SCSI.Verify12.MismatchNoCmp",
    "SCSI.Verify16.Simple",
    "SCSI.Verify16.BeyondEol",
    "SCSI.Verify16.ZeroBlocks",
    "SCSI.Verify16.VerifyProtect",
    "SCSI.Verify16.Flags",
    "SCSI.Verify16.Mismatch",
    "SCSI.Verify16.MismatchNoCmp",
    "SCSI.WriteVerify10.Simple",
    "SCSI.WriteVerify10.BeyondEol",
    "SCSI.WriteVerify10.ZeroBlocks",
    "SCSI.WriteVerify10.WriteProtect",
    "SCSI.WriteVerify10.Flags",
    "SCSI.WriteVerify12.Simple",
    "SCSI.WriteVerify12.BeyondEol",
    "SCSI.WriteVerify12.ZeroBlocks",
    "SCSI.WriteVerify12.WriteProtect",
    "SCSI.WriteVerify12.Flags",
    "SCSI.WriteVerify16.Simple",
    "SCSI.WriteVerify16.BeyondEol",
    "SCSI.WriteVerify16.ZeroBlocks",
    "SCSI.WriteVerify16.WriteProtect",
    "SCSI.WriteVerify16.Flags",
    "SCSI.CompareAndWrite.Simple",
    "SCSI.CompareAndWrite.Miscompare",
    "SCSI.CompareAndWrite.Unwritten",
    "SCSI.CompareAndWrite.InvalidDataOutSize",
    "SCSI.Unmap.Simple",
    "SCSI.Unmap.VPD",
    "SCSI.Unmap.ZeroBlocks",
    "SCSI.WriteSame10.Simple",
    "SCSI.WriteSame10.BeyondEol",
    "SCSI.WriteSame10.WriteProtect",
    "SCSI.WriteSame10.Unmap",
    "SCSI.WriteSame10.UnmapUnaligned",
    "SCSI.WriteSame10.UnmapUntilEnd",
    "SCSI.WriteSame10.UnmapVPD",
    "SCSI.WriteSame10.Check",
    "SCSI.WriteSame10.InvalidDataOutSize",
    "SCSI.WriteSame16.Simple",
    "SCSI.WriteSame16.BeyondEol",
    "SCSI.WriteSame16.WriteProtect",
    "SCSI.WriteSame16.Unmap",
    "SCSI.WriteSame16.UnmapUnaligned",
    "SCSI.WriteSame16.UnmapUntilEnd",
    "SCSI.WriteSame16.UnmapVPD",
    "SCSI.WriteSame16.Check",
    "SCSI.WriteSame16.InvalidDataOutSize",
    "SCSI.GetLBAStatus.Simple",
    "SCSI.GetLBAStatus.BeyondEol",
    "SCSI.ModeSense6.AllPages",
    "SCSI.ModeSense6.Control",
    "SCSI.ModeSense6.Control-D_SENSE",
    "SCSI.ModeSense6.Control-SWP",
    "SCSI.ModeSense6.Residuals",
    "SCSI.StartStopUnit.PwrCnd",
    "SCSI.StartStopUnit.NoLoej",
    "SCSI.NoMedia.NoMediaSBC",
    "SCSI.Mandatory.MandatorySBC",
    "iSCSI.iSCSIcmdsn.iSCSICmdSnTooHigh",
    "iSCSI.iSCSIcmdsn.iSCSICmdSnTooLow",
    "iSCSI.iSCSITMF.AbortTaskSimpleAsync",
    "iSCSI.iSCSITMF.LUNResetSimpleAsync",
    "iSCSI.iSCSIResiduals.Read10Invalid",
    "iSCSI.iSCSIResiduals.Read10Residuals",
    "iSCSI.iSCSIResiduals.Read12Residuals",
    "iSCSI.iSCSIResiduals.Read16Residuals",
    "iSCSI.iSCSIResiduals.Write10Residuals",
    "iSCSI.iSCSIResiduals.Write12Residuals",
    "iSCSI.iSCSIResiduals.Write16Residuals",
    "iSCSI.iSCSIResiduals.WriteVerify10Residuals",
    "iSCSI.iSCSIResiduals.WriteVerify12Residuals",
    "iSCSI.iSCSIResiduals.WriteVerify16Residuals",
    "SCSI.Reserve6.Simple",
    "SCSI.Reserve6.2Initiators",
    "SCSI.Reserve6.Logout",
    "SCSI.Reserve6.ITNexusLoss",
    "SCSI.Reserve6.TargetWarmReset",
    "SCSI.Reserve6.LUNReset",
    "SCSI.PrinReadKeys.Simple",
    "SCSI.PrinReadKeys.Truncate",
    "SCSI.PrinReportCapabilities.Simple",
    "SCSI.ProutRegister.Simple",
    "SCSI.ProutClear.Simple",
    "SCSI.ProutPreempt.RemoveRegistration",
    "SCSI.ProutReserve.Simple",
    "SCSI.ProutReserve.AccessEA",
    "SCSI.ProutReserve.AccessWE",
    "SCSI.ProutReserve.AccessEARO",
    "SCSI.ProutReserve.AccessWERO",
    "SCSI.ProutReserve.AccessEAAR",
    "SCSI.ProutReserve.AccessWEAR",
    "SCSI.ProutReserve.OwnershipEA",
    "SCSI.ProutReserve.OwnershipWE",
    "SCSI.ProutReserve.OwnershipEARO",
    "SCSI.ProutReserve.OwnershipWERO",
    "SCSI.ProutReserve.OwnershipEAAR",
    "SCSI.ProutReserve.OwnershipWEAR",
];

#[test]
fn iscsi_test_cu_suites_pass() {
    need("iscsi-test-cu", "libiscsi-bin");
    let (srv, port) = start();
    let target = url(port, &format!("{PREFIX}:vol0"));
    let mut passed = Vec::new();
    let mut other = Vec::new();
    for suite in CU_SUITES {
        let (_, out) = tool(&["iscsi-test-cu", "-d", "-t", suite, &target]);
        let res = cu_results(&out);
        assert!(!res.is_empty(), "{suite} ran no test: {out}");
        for (name, outcome) in res {
            let full = format!("{suite}.{name}");
            if outcome == "passed" {
                passed.push(full);
            } else {
                other.push(format!("{full}: {outcome}"));
            }
        }
    }
    eprintln!("iscsi-test-cu passed: {passed:#?}\nnot passed: {other:#?}");
    let missing: Vec<&&str> = CU_PASS
        .iter()
        .filter(|t| !passed.iter().any(|p| p == **t))
        .collect();
    assert!(
        missing.is_empty(),
        "no longer pass: {missing:?}\nnot passed: {other:#?}"
    );
    // The ReadOnly suite against a backup target: nothing fails (its one test skips
    // the part that needs ORWRITE).
    let made = rpc(
        &srv,
        "backup_create",
        json!({"volume": "vol0", "name": "ro"}),
    );
    assert!(made.get("error").is_none(), "{made}");
    let ro = url(port, &format!("{PREFIX}:vol0:ro"));
    let mut out = String::new();
    for _ in 0..100 {
        out = tool(&["iscsi-test-cu", "-d", "-t", "SCSI.ReadOnly", &ro]).1;
        if !cu_results(&out).is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let res = cu_results(&out);
    assert!(
        !res.is_empty() && res.iter().all(|(_, o)| *o != "failed"),
        "{res:?}: {out}"
    );
    // Negative control of the parser: a suite we know does not pass is not counted.
    let (_, out) = tool(&[
        "iscsi-test-cu",
        "-t",
        "SCSI.ReportSupportedOpcodes.Simple",
        &target,
    ]);
    let res = cu_results(&out);
    assert!(
        !res.is_empty() && res.iter().all(|(_, o)| *o != "passed"),
        "{res:?}: {out}"
    );
}
