//! ringblk-ctl against a real server: volumes added and removed at run time, stats,
//! reactors, and the README's RPC method table kept complete.

mod common;
use common::*;
use std::process::Command;

fn ctl_json(srv: &Server, args: &[&str]) -> serde_json::Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

#[test]
fn every_rpc_method_is_documented_in_the_readme() {
    let srv = Server::start(&[]);
    let methods = ctl_json(&srv, &["methods"]);
    let names: Vec<String> = methods
        .as_array()
        .expect("array")
        .iter()
        .map(|m| m.as_str().expect("name").to_string())
        .collect();
    assert!(names.len() >= 7, "{names:?}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !readme.contains(&format!("| `{n}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "RPC methods missing from README's table: {missing:?}"
    );
    // Negative control: a name that is not a method is not "documented" either.
    assert!(!readme.contains("| `no_such_method` |"));
}

#[test]
fn volumes_are_added_and_removed_at_run_time() {
    let srv = Server::start(&[]);
    let img = srv.path("extra.img");
    let created = ctl_json(
        &srv,
        &[
            "volume",
            "create",
            "extra",
            "--path",
            img.to_str().expect("utf8"),
            "--size",
            "64M",
        ],
    );
    assert_eq!(created["size_bytes"], 64 << 20);
    let list = ctl_json(&srv, &["volume", "list"]);
    assert_eq!(list.as_array().expect("array").len(), 2);
    let table = run_ok(ctl(&srv).args(["volume", "list"]));
    assert!(table.contains("extra") && table.contains("vol0"), "{table}");

    // The new export serves real data.
    let uri = srv.uri("extra");
    run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x5a 0 64k"]));
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x5a 0 64k"]));
    assert!(!out.contains("verification failed"), "{out}");
    let stats = ctl_json(&srv, &["stats", "extra"]);
    let v = &stats["volumes"][0];
    assert_eq!(v["name"], "extra");
    assert!(v["write_ops"].as_u64().expect("n") >= 1);
    assert!(v["read_bytes"].as_u64().expect("n") >= 64 << 10);

    // Duplicate names and bad parameters are JSON-RPC errors, not crashes.
    let dup = run(ctl(&srv).args([
        "volume",
        "create",
        "extra",
        "--path",
        img.to_str().expect("utf8"),
    ]));
    assert_eq!(dup.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("-17"),
        "{dup:?}"
    );
    let bad = run(ctl(&srv).args([
        "call",
        "volume_create",
        r#"{"name":"x@y","backend":"mem","size_bytes":4096}"#,
    ]));
    assert_eq!(bad.status.code(), Some(1));
    let bad = run(ctl(&srv).args(["call", "volume_create", r#"{"nmae":"x"}"#]));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("-32602"),
        "{bad:?}"
    );

    // Removing a volume with an open connection closes it cleanly; the other export
    // keeps working.
    let mut holder = nbdsh()
        .args([
            "-u",
            &uri,
            "-c",
            "import time\nh.pread(4096, 0)\ntime.sleep(60)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nbdsh");
    let start = std::time::Instant::now();
    loop {
        let v = ctl_json(&srv, &["stats", "extra"]);
        if v["volumes"][0]["connections"] == 1 {
            break;
        }
        assert!(start.elapsed() < TOOL_TIMEOUT, "holder never connected");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        ctl_json(&srv, &["volume", "delete", "extra"]),
        serde_json::json!(true)
    );
    assert_eq!(
        ctl_json(&srv, &["volume", "list"])
            .as_array()
            .expect("array")
            .len(),
        1
    );
    let gone = run(Command::new("nbdinfo").arg(&uri));
    assert!(!gone.status.success(), "deleted export must be gone");
    let missing = run(ctl(&srv).args(["volume", "delete", "extra"]));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("-19"),
        "{missing:?}"
    );
    run_ok(Command::new("qemu-io").args(["-f", "raw", &srv.uri("vol0"), "-c", "read 0 4k"]));
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn reactor_list_reports_every_reactor() {
    let srv = Server::start(&["--cores", "0,1", "--poll", "adaptive"]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", &srv.uri("vol0"), "-c", "read 0 4k"]));
    let list = ctl_json(&srv, &["reactor", "list"]);
    let rs = list.as_array().expect("array");
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0]["core"], 0);
    assert_eq!(rs[1]["core"], 1);
    assert!(rs.iter().any(|r| r["busy_ticks"].as_u64().expect("n") > 0));
    let table = run_ok(ctl(&srv).args(["reactor", "list"]));
    assert!(table.contains("adaptive"), "{table}");
}
