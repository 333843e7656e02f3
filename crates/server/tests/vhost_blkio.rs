//! ringblk's vhost-user-blk front end driven by a real client: libblkio's
//! `virtio-blk-vhost-user` driver inside `ringblk-bench` (`run --vhost`, `io --vhost`).
//! Every check reads bytes back through the device and compares them, and each has a
//! negative control showing the same check fails on wrong data.
//!
//! `RINGBLK_VHOST_TEST_PEER=qsd` runs the tests that do not need ringblk's own RPCs
//! against qemu-storage-daemon instead (to check the tests themselves).

mod common;

use common::vhost_target::*;
use common::*;

const MIB: u64 = 1 << 20;

fn rpc(srv: &Server, method: &str, params: serde_json::Value) -> serde_json::Value {
    let out = run_ok(ctl(srv).args(["call", method, &params.to_string()]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: bad JSON {e}: {out}"))
}

/// Random writes of every 4 KiB block of 16 MiB through two virtqueues, a flush, and
/// random reads of every block through the *other* queue, each checked against its
/// self-describing pattern. Guards against requests of one queue landing at another's
/// offsets, torn or misdirected blocks, and queues that share state wrongly.
///
/// Negative control: 5 blocks are overwritten with another seed's pattern, and the
/// same read pass must then name exactly those 5 blocks and exit 1.
#[test]
fn random_io_over_two_queues_reads_back_every_block() {
    let t = Target::start(64, &[]);
    let common = [
        "--verify",
        "--rw",
        "randread",
        "--range",
        "16M",
        "--queues",
        "2",
        "--iodepth",
        "16",
    ];
    let out = t.bench(&common);
    let doc = out.expect(0).json();
    assert_eq!(doc["transport"], "vhost-user-blk");
    let w = phase(&doc, "verify-write");
    assert_eq!(
        op(w, "write")["ops"],
        4096,
        "every block written once: {w:#}"
    );
    let r = phase(&doc, "verify-read");
    assert_eq!(r["verify"]["blocks_checked"], 4096, "{r:#}");
    assert_eq!(r["verify"]["errors"], 0, "{r:#}");
    assert_eq!(r["io_errors"], 0, "{r:#}");

    // Negative control: overwrite 5 blocks with seed 99 (through queue 1), then the
    // read pass of seed 1 must fail on exactly them.
    for off in [0u64, 4096, 3 * MIB, 8 * MIB + 4096, 16 * MIB - 4096] {
        let op = format!("write:{off}:4k:99");
        t.io(&["--queues", "2", "--queue", "1", &op]).expect(0);
    }
    let mut read_only = common.to_vec();
    read_only.extend(["--verify-phases", "read"]);
    let bad = t.bench(&read_only);
    let doc = bad.expect(1).json();
    let r = phase(&doc, "verify-read");
    assert_eq!(r["verify"]["errors"], 5, "the 5 overwritten blocks: {r:#}");
    let samples = r["verify"]["samples"].to_string();
    assert!(samples.contains("offset 3145728"), "{samples}");
    if let Some(srv) = t.server.as_ref() {
        assert!(
            !srv.stderr_log().contains("panicked"),
            "{}",
            srv.stderr_log()
        );
    }
}

/// FLUSH, DISCARD and WRITE_ZEROES (with and without unmap) through the device: a
/// discarded or zeroed range reads back as zeros, its neighbours keep their data,
/// and the discarded range is a hole in NBD block status of the volume's NBD export.
///
/// Negative controls: the zero check fails on a range that holds data, and the
/// written neighbours are reported as data (not holes) by the same block-status query.
#[test]
fn flush_discard_and_write_zeroes_read_back_as_zeros() {
    let t = Target::start(64, &[]);
    let dev = t.io(&["write:0:16M:3", "flush"]);
    let doc = dev.expect(0).json();
    assert_eq!(doc["device"]["capacity_bytes"], 64 * MIB);
    assert!(
        doc["device"]["max_discard_len"].as_u64() > Some(0),
        "DISCARD offered: {doc:#}"
    );

    // Negative control of the zero check: written data is not zeros.
    let not_zero = t.io(&["zero:4M:4k"]);
    let doc = not_zero.expect(1).json();
    let err = doc["ops"][0]["error"].as_str().expect("an error");
    assert!(err.contains("not zero"), "{err}");

    t.io(&[
        "discard:4M:4M",
        "zero:4M:4M",
        "write-zeroes:9M:1M",
        "zero:9M:1M",
        "write-zeroes-keep:11M:1M",
        "zero:11M:1M",
        "flush",
        // Neighbours keep their data.
        "verify:0:4M:3",
        "verify:8M:1M:3",
        "verify:10M:1M:3",
        "verify:12M:4M:3",
    ])
    .expect(0);

    // The discarded range is a hole through NBD block status, and reads as zeros
    // through NBD too; the written ranges around it are data.
    let map = nbd_map(&t.nbd_uri);
    assert!(
        map_covers(&map, 4 * MIB, 4 * MIB, 1),
        "discarded [4M, 8M) must be a hole: {map:?}"
    );
    assert!(
        !map_covers(&map, 0, 4 * MIB, 1) && !map_covers(&map, 12 * MIB, 4 * MIB, 1),
        "written ranges must not be holes: {map:?}"
    );
}

/// A backup export `v@b1` across a switchover: write A, `backup_create`, write B; the
/// backup's vhost export reads A, the live volume reads B, and a write to the backup
/// export fails and changes nothing.
///
/// libblkio refuses to start a device that offers VIRTIO_BLK_F_RO for a read-write
/// client, and fails writes on a read-only client itself: both are checked (the
/// first shows the export offers RO), and the backup's bytes are verified after.
///
/// Negative control: the backup read with B's seed, and the live volume with A's,
/// must each fail on every block.
#[test]
fn backup_export_reads_the_data_before_the_switchover() {
    if peer() == Peer::Qsd {
        eprintln!("RINGBLK_VHOST_TEST_PEER=qsd: backups are ringblk's; not run");
        return;
    }
    let t = Target::start(64, &[]);
    let srv = t.server();
    t.io(&["--queues", "2", "write:0:4M:1", "flush"]).expect(0);
    run_ok(ctl(srv).args(["backup", "create", "v@b1"]));
    t.io(&["--queues", "2", "--queue", "1", "write:0:4M:2", "flush"])
        .expect(0);
    let bsock = t.dir.path().join("v-b1.vhost");
    rpc(
        srv,
        "vhost_create",
        serde_json::json!({"volume": "v@b1", "socket": bsock}),
    );
    wait_socket(&bsock);

    io_on(&bsock, &["--read-only", "verify:0:4M:1"]).expect(0);
    t.io(&["verify:0:4M:2"]).expect(0);
    // Negative controls: the other seed fails.
    let doc = io_on(&bsock, &["--read-only", "verify:0:4k:2"])
        .expect(1)
        .json();
    assert!(
        doc["ops"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("offset 0"),
        "{doc:#}"
    );
    t.io(&["verify:0:4k:1"]).expect(1);

    // Writes to the backup export fail...
    let rw = io_on(&bsock, &["write:0:4k:7"]);
    rw.expect(2);
    assert!(rw.stderr.contains("read-only"), "{}", rw.stderr);
    let doc = io_on(&bsock, &["--read-only", "write:0:4k:7"])
        .expect(1)
        .json();
    assert_eq!(doc["device"]["read_only"], true);
    assert_eq!(doc["ops"][0]["ok"], false, "{doc:#}");
    // ... and change nothing.
    io_on(&bsock, &["--read-only", "verify:0:4M:1"]).expect(0);
    t.io(&["verify:0:4M:2"]).expect(0);
    srv_alive(srv);
}

fn srv_alive(srv: &Server) {
    let log = srv.stderr_log();
    assert!(!log.contains("panicked"), "server panicked: {log}");
}

/// `(queue index, reactor, requests served)` of every queue of the export on `sock`,
/// from RPC `vhost_list`.
fn served_by_queue(srv: &Server, sock: &std::path::Path) -> Vec<(u64, u64, u64)> {
    let list = rpc(srv, "vhost_list", serde_json::json!({}));
    let exports = list
        .as_array()
        .or_else(|| list["exports"].as_array())
        .unwrap_or_else(|| panic!("vhost_list: no export list: {list:#}"));
    let ours = exports
        .iter()
        .find(|e| e["socket"].as_str() == sock.to_str())
        .unwrap_or_else(|| panic!("vhost_list does not list {}: {list:#}", sock.display()));
    ours["queues"]
        .as_array()
        .unwrap_or_else(|| panic!("no queues: {ours:#}"))
        .iter()
        .map(|q| {
            let n = |k: &str| {
                q[k].as_u64()
                    .unwrap_or_else(|| panic!("queue without {k}: {q:#}"))
            };
            (n("index"), n("reactor"), n("served"))
        })
        .collect()
}

/// Two virtqueues of one device on a two-reactor server (`--cores 0,1`) are served by
/// both reactors: the per-queue served counters of `vhost_list` name two reactors,
/// each with requests, and together count at least what the client completed.
///
/// Negative control: the same check on a one-queue run of a fresh export finds one
/// reactor only.
#[test]
fn two_queues_are_served_by_two_reactors() {
    if peer() == Peer::Qsd {
        eprintln!("RINGBLK_VHOST_TEST_PEER=qsd: reactor counters are ringblk's; not run");
        return;
    }
    let t = Target::start(64, &["--cores", "0,1"]);
    let srv = t.server();
    let doc = t
        .bench(&[
            "--rw",
            "randread",
            "--queues",
            "2",
            "--iodepth",
            "8",
            "--size",
            "32M",
        ])
        .expect(0)
        .json();
    let completed = op(phase(&doc, "run"), "read")["ops"].as_u64().expect("ops");
    let per_queue = served_by_queue(srv, &t.sock);
    let busy: Vec<_> = per_queue.iter().filter(|q| q.2 > 0).collect();
    let reactors: std::collections::BTreeSet<u64> = busy.iter().map(|q| q.1).collect();
    assert_eq!(
        reactors.len(),
        2,
        "two reactors served the queues: {per_queue:?}"
    );
    let served: u64 = per_queue.iter().map(|q| q.2).sum();
    assert!(
        served >= completed,
        "served {served} < completed {completed}"
    );

    // Negative control: one queue only, on a second export of the same volume.
    let one = t.dir.path().join("v-one.vhost");
    rpc(
        srv,
        "vhost_create",
        serde_json::json!({"volume": VOL, "socket": one}),
    );
    wait_socket(&one);
    run_on(&one, &["--rw", "randread", "--queues", "1", "--size", "4M"]).expect(0);
    let per_queue = served_by_queue(srv, &one);
    let reactors: std::collections::BTreeSet<u64> =
        per_queue.iter().filter(|q| q.2 > 0).map(|q| q.1).collect();
    assert_eq!(reactors.len(), 1, "one queue, one reactor: {per_queue:?}");
    srv_alive(srv);
}
