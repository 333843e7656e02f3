//! Issue #11 item 15: the README's claims about exports hold in the code.
//!
//! - `export_list` lists the read-only `VOL@NAME` export of every ready backup, as
//!   the handshake's NBD_OPT_LIST does (it used to list only the live volumes).
//! - A volume on a block device advertises TRIM and FAST_ZERO like one on a file
//!   (it used to advertise neither), and TRIM / WRITE_ZEROES on it really zero the
//!   range, checked with qemu-io through a loop device.

mod common;

use std::process::Command;

use common::{ctl, run, run_ok, Server};

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn exports(srv: &Server) -> Vec<(String, bool)> {
    let out = run_ok(ctl(srv).args(["--json", "call", "export_list"]));
    json(&out)
        .as_array()
        .expect("export_list returns an array")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().expect("name").to_string(),
                e["read_only"].as_bool().expect("read_only"),
            )
        })
        .collect()
}

/// The export names nbdinfo --list sees (the handshake's NBD_OPT_LIST).
fn listed_by_nbdinfo(srv: &Server) -> Vec<String> {
    let out = run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd://127.0.0.1:{}", srv.port),
    ]));
    json(&out)["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().expect("export-name").to_string())
        .collect()
}

#[test]
fn export_list_names_the_backup_exports_the_handshake_lists() {
    let srv = Server::start(&[]);
    run_ok(ctl(&srv).args(["backup", "create", "vol0", "monday"]));
    let listed = exports(&srv);
    assert!(
        listed.contains(&("vol0".to_string(), false)),
        "live volume missing: {listed:?}"
    );
    assert!(
        listed.contains(&("vol0@monday".to_string(), true)),
        "export_list must name the backup's read-only export: {listed:?}"
    );
    let mut names: Vec<String> = listed.into_iter().map(|(n, _)| n).collect();
    let mut nbd = listed_by_nbdinfo(&srv);
    names.sort();
    nbd.sort();
    assert_eq!(names, nbd, "export_list and NBD_OPT_LIST disagree");

    // Negative control: a released backup leaves both lists.
    run_ok(ctl(&srv).args(["backup", "release", "vol0@monday"]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while exports(&srv).iter().any(|(n, _)| n == "vol0@monday") {
        assert!(
            std::time::Instant::now() < deadline,
            "release never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!listed_by_nbdinfo(&srv).contains(&"vol0@monday".to_string()));
}

/// A loop device over a sparse file, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn new(file: &std::path::Path) -> Loop {
        let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file));
        Loop {
            dev: out.trim().to_string(),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run(Command::new("losetup").args(["-d", &self.dev]));
    }
}

fn qemu_io(uri: &str, cmd: &str) -> String {
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]))
}

#[test]
fn block_device_volumes_advertise_and_honour_trim_and_fast_zero() {
    let dir = common::tmpdir();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(64 << 20))
        .expect("create disk.img");
    let lo = Loop::new(&img);
    let srv = Server::start(&["--volume", &format!("blk={}", lo.dev)]);
    let uri = srv.uri("blk");

    let info = json(&run_ok(Command::new("nbdinfo").args(["--json", &uri])));
    let export = &info["exports"][0];
    assert_eq!(export["can_trim"], true, "TRIM not advertised: {export}");
    assert_eq!(
        export["can_fast_zero"], true,
        "FAST_ZERO not advertised: {export}"
    );
    assert_eq!(export["can_zero"], true, "WRITE_ZEROES not advertised");

    // TRIM (qemu-io discard) and WRITE_ZEROES with unmap allowed both zero their range
    // on the device; the bytes around them stay.
    qemu_io(&uri, "write -P 0x5a 0 8M");
    qemu_io(&uri, "discard 1M 1M");
    qemu_io(&uri, "write -z -u 4M 1M");
    qemu_io(&uri, "read -P 0x5a 0 1M");
    qemu_io(&uri, "read -P 0x5a 2M 2M");
    qemu_io(&uri, "read -P 0 4M 1M");
    qemu_io(&uri, "read -P 0x5a 5M 3M");
    // The discard is advisory for NBD, but here it must not have lost the zeroing
    // promise of WRITE_ZEROES: read what TRIM left through the device itself.
    let dev = std::fs::read(&lo.dev).expect("read the loop device");
    assert!(
        dev[4 << 20..5 << 20].iter().all(|&b| b == 0),
        "zeroed range"
    );
    assert!(
        dev[..1 << 20].iter().all(|&b| b == 0x5a),
        "bytes before TRIM"
    );

    // Negative control: the pattern check sees a wrong byte.
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 4M 1M", &uri]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || text.contains("Pattern verification failed"),
        "qemu-io read -P must notice zeros where 0x5a was expected: {text}"
    );
}
