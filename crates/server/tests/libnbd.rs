//! NBD protocol edge cases driven by a real client: python3-libnbd with strict mode
//! off, so out-of-bounds, oversize, misaligned and badly flagged requests reach the
//! server. The checks live in `tests/python/edge_cases.py`; this file starts the server,
//! runs the script with Debian's python3 and checks its verdict.

mod common;
use common::*;
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/edge_cases.py");
/// Tests in the script's normal mode; all must pass.
const EXPECTED_PASSED: usize = 19;
/// Deliberately wrong checks in `--negative-control` mode; all must fail.
const NEGATIVE_CONTROLS: usize = 4;

/// A server with the exports the script expects: `vol0` (64 MiB, writable, sparse) and
/// `ro` (1 MiB of 0x5a, read-only). Returns the image dir too (it must outlive the server).
fn start() -> (Server, tempfile::TempDir) {
    let images = tmpdir();
    let ro = images.path().join("ro.img");
    std::fs::write(&ro, vec![0x5a_u8; 1 << 20]).expect("write ro image");
    let vol0 = images.path().join("vol0.img");
    let vol0_spec = format!("vol0={},size=64M", vol0.display());
    let ro_spec = format!("ro={},read-only", ro.display());
    let srv = Server::start_logged(&["--volume", &vol0_spec, "--volume", &ro_spec]);
    (srv, images)
}

fn run_script(srv: &Server, extra: &[&str]) -> (Output, String) {
    let port = srv.port.to_string();
    let out = run(Command::new(SYSTEM_PYTHON)
        .arg(SCRIPT)
        .args(["127.0.0.1", &port])
        .args(extra));
    let text = format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// The script's last line: `N passed, M failed`.
fn summary(out: &Output, text: &str) -> (usize, usize) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let nums: Vec<usize> = last
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    assert!(
        nums.len() == 2 && last.ends_with(" failed"),
        "no summary line in the script's output:\n{text}"
    );
    (nums[0], nums[1])
}

#[test]
fn libnbd_edge_cases_all_pass() {
    let (mut srv, _images) = start();
    let (out, text) = run_script(&srv, &[]);
    eprintln!("{text}");
    let (passed, failed) = summary(&out, &text);
    assert_eq!(failed, 0, "edge cases failed:\n{text}");
    assert_eq!(
        passed, EXPECTED_PASSED,
        "unexpected number of tests:\n{text}"
    );
    assert!(out.status.success(), "script exited non-zero:\n{text}");
    srv.assert_alive();
    let st = srv.stop();
    assert!(st.success(), "server did not stop cleanly: {st}");
}

/// Negative control: checks that assert the wrong bytes, the wrong errno, an error on a
/// valid request and a hole on written data must each be reported as failures, and the
/// script must then exit non-zero.
#[test]
fn libnbd_negative_controls_fail() {
    let (mut srv, _images) = start();
    let (out, text) = run_script(&srv, &["--negative-control"]);
    eprintln!("{text}");
    assert!(!out.status.success(), "negative control exited 0:\n{text}");
    assert_eq!(summary(&out, &text), (0, NEGATIVE_CONTROLS), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fails: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(fails.len(), NEGATIVE_CONTROLS, "{text}");
    // Each failed for the deliberate reason, not an incidental error.
    for line in fails {
        assert!(
            line.contains("deliberately"),
            "negative control failed for another reason: {line}"
        );
    }
    srv.assert_alive();
}
