//! `ringblk-bench --vhost` against qemu-storage-daemon's vhost-user-blk export (the
//! peer of issue #13): verify mode over two virtqueues with its negative control, the
//! stop rules and reports, and `io`'s single requests (discard, write-zeroes, flush)
//! read back. A real back end we did not write checks our client; the server-side
//! tests (crates/server/tests/vhost_blkio.rs) then use the same client on ringblk.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// `qemu-storage-daemon` exporting a 64 MiB file (O_DIRECT) over vhost-user-blk with
/// two queues; killed on drop.
struct Qsd {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qsd {
    fn start() -> Qsd {
        let dir = tmpdir();
        let img = dir.path().join("v.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 * MIB))
            .expect("create the backing file");
        let sock = dir.path().join("v.vhost");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},cache.direct=on,discard=unmap",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                 writable=on,num-queues=2",
                sock.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-storage-daemon: {e} (package qemu-utils; ci/test.sh installs it)")
            });
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "qemu-storage-daemon does not listen on {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd {
            child,
            sock,
            _dir: dir,
        }
    }

    fn sock(&self) -> &str {
        self.sock.to_str().expect("UTF-8 path")
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        // Our own child, not reaped yet: the pid cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn phase<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .find(|p| p["phase"] == name)
        .unwrap_or_else(|| panic!("no phase {name} in {doc:#}"))
}

/// Every block of 16 MiB written through one queue and read back through the other,
/// in random order; then, as the negative control, 3 blocks overwritten with another
/// seed (by `io`, through queue 1) must be the 3 errors of the same read pass.
#[test]
fn verify_over_two_queues_and_its_negative_control() {
    let q = Qsd::start();
    let s = q.sock();
    let common = [
        "--vhost",
        s,
        "--verify",
        "--rw",
        "randread",
        "--range",
        "16M",
        "--queues",
        "2",
        "--iodepth",
        "8",
    ];
    let mut args = vec!["run"];
    args.extend(common);
    let doc = json(&args, 0);
    assert_eq!(doc["transport"], "vhost-user-blk");
    assert_eq!(doc["connections"], 2, "two queues");
    let w = phase(&doc, "verify-write");
    assert_eq!(w["ops"][0]["ops"], 4096);
    let r = phase(&doc, "verify-read");
    assert_eq!(r["verify"]["blocks_checked"], 4096);
    assert_eq!(r["verify"]["errors"], 0, "{r:#}");

    for off in ["0", "5M", "16380k"] {
        let op = format!("write:{off}:4k:77");
        bench_ok(
            &["io", "--vhost", s, "--queues", "2", "--queue", "1", &op],
            0,
        );
    }
    args.extend(["--verify-phases", "read"]);
    let doc = json(&args, 1);
    let v = &phase(&doc, "verify-read")["verify"];
    assert_eq!(v["errors"], 3, "{v:#}");
    let samples = v["samples"].to_string();
    for off in [0, 5 * MIB, 16380 * 1024] {
        assert!(
            samples.contains(&format!("offset {off}:")),
            "{off}: {samples}"
        );
    }
}

/// `--size` stops after exactly that many bytes over both queues, a mixed workload
/// does both operations, busy and interrupt completion both work, and `--hgrm`
/// writes a histogram of every recorded operation.
#[test]
fn stop_rules_mixes_polling_modes_and_hgrm() {
    let q = Qsd::start();
    let s = q.sock();
    let dir = tmpdir();
    let hgrm = dir.path().join("run.hgrm");
    for poll in ["busy", "interrupt", "adaptive"] {
        let doc = json(
            &[
                "run",
                "--vhost",
                s,
                "--rw",
                "randrw",
                "--size",
                "8M",
                "--queues",
                "2",
                "--iodepth",
                "4",
                "--poll",
                poll,
                "--hgrm",
                hgrm.to_str().expect("path"),
            ],
            0,
        );
        let ph = phase(&doc, "run");
        let ops = ph["ops"].as_array().expect("ops");
        let get = |name: &str| {
            ops.iter()
                .find(|o| o["op"] == name)
                .map_or(0, |o| o["ops"].as_u64().expect("count"))
        };
        assert!(get("read") > 0 && get("write") > 0, "{poll}: {ph:#}");
        assert_eq!(get("total"), 2048, "{poll}: 8 MiB in 4 KiB requests");
        let text = std::fs::read_to_string(&hgrm).expect("hgrm written");
        assert!(text.contains("Total count    =         2048"), "{text}");
    }
}

/// `io`: discard and write-zeroes (with and without unmap) read back as zeros, their
/// neighbours keep their data, flush succeeds; the zero check fails on data (its
/// negative control) and names the offset.
#[test]
fn io_discard_write_zeroes_and_flush() {
    let q = Qsd::start();
    let s = q.sock();
    let out = bench_ok(&["io", "--vhost", s, "--json", "write:0:4M:5", "flush"], 0);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(doc["device"]["capacity_bytes"], 64 * MIB);
    assert_eq!(doc["ok"], true);

    let out = bench_ok(&["io", "--vhost", s, "--json", "zero:1M:4k"], 1);
    assert!(
        out.contains("offset 1048576") && out.contains("not zero"),
        "{out}"
    );

    bench_ok(
        &[
            "io",
            "--vhost",
            s,
            "discard:1M:1M",
            "zero:1M:1M",
            "write-zeroes:2M:512k",
            "zero:2M:512k",
            "write-zeroes-keep:3M:512k",
            "zero:3M:512k",
            "flush",
            "verify:0:1M:5",
            "verify:2560k:512k:5",
            "verify:3584k:512k:5",
        ],
        0,
    );
    // Bad arguments are refused before anything is sent.
    bench_ok(&["io", "--vhost", s, "write:1:4k"], 2);
    bench_ok(&["io", "--vhost", s, "frobnicate:0:4k"], 2);
}
