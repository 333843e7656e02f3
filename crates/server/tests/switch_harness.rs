//! Runs tests/python/switch_harness.py: under a 4-connection write load, every
//! backup holds exactly the writes admitted before its switch and none after, with
//! one switch point across connections. The same run with a planted post-switch
//! write must fail (negative control).

mod common;
use common::*;
use std::process::Command;

fn harness(negative: bool) -> (bool, String) {
    let srv = Server::start(&["--volume", "v=,backend=mem,size=64M"]);
    let ctl_bin = std::path::Path::new(env!("CARGO_BIN_EXE_ringblk"))
        .parent()
        .expect("bin dir")
        .join("ringblk-ctl");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/switch_harness.py"
    );
    let mut c = Command::new(SYSTEM_PYTHON);
    c.arg(script)
        .arg(format!("nbd://127.0.0.1:{}", srv.port))
        .arg(&ctl_bin)
        .arg(&srv.rpc);
    if negative {
        c.arg("--negative-control");
    }
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_backup_holds_exactly_the_writes_admitted_before_its_switch() {
    let (ok, text) = harness(false);
    assert!(ok, "{text}");
    assert!(text.contains("6 passed, 0 failed"), "{text}");
}

#[test]
fn harness_catches_a_post_switch_write_in_a_backup() {
    let (ok, text) = harness(true);
    assert!(!ok, "negative control must fail: {text}");
    assert!(text.contains("FAIL h"), "{text}");
}
