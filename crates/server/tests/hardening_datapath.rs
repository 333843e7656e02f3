//! Issue #11, items 4, 11 and 12: the data path never fails a valid request for lack
//! of internal room, and one request cannot make a reactor do unbounded work.
//!
//! - Item 4: a request turned into more reactor operations than the reactor's slab
//!   holds (a 32 MiB write over a backup is 8 192 chunk writes; many connections with
//!   deep queues on the fast path) waits for slots instead of failing with ENOMEM.
//! - Item 11: FLUSHes beyond a volume's commit queue wait to be queued instead of
//!   failing with ENOMEM.
//! - Item 12: BLOCK_STATUS over a multi-GiB volume with deltas answers in bounded
//!   pieces, and clients that loop over partial replies still get the right map
//!   (the per-request bound itself is counted by a unit test in `io.rs`).
//!
//! Each test checks that the condition was really provoked (a server counter > 0),
//! so none can pass without exercising the wait.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn ctl_json(srv: &Server, args: &[&str]) -> Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

fn stats(srv: &Server, vol: &str) -> Value {
    ctl_json(srv, &["stats", vol])["volumes"][0].clone()
}

fn counter(st: &Value, name: &str) -> u64 {
    st[name]
        .as_u64()
        .unwrap_or_else(|| panic!("stats has no counter {name}: {st}"))
}

/// Runs qemu-io commands on `uri`; fails on any "failed"/error line, since qemu-io
/// exits 0 after a failed write.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if uri.contains('@') {
        c.arg("-r"); // a backup's export is read-only
    }
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    let bad: Vec<&str> = out
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("failed") || l.contains("error") || l.contains("cannot")
        })
        .collect();
    assert!(bad.is_empty(), "qemu-io {cmds:?} on {uri}: {bad:?}\n{out}");
    out
}

/// Item 4: `qemu-io write -P 2 0 32M` twice over a backup failed with "Cannot allocate
/// memory" (one reactor operation per chunk, all submitted at once past the slab).
/// Now every 32 MiB write succeeds and reads back, with one and with two backups.
#[test]
fn writes_of_32_mib_succeed_over_one_and_two_backups() {
    let srv = Server::start_logged(&["--cores", "0"]);
    let uri = srv.uri("vol0");
    let write_and_verify = |p: u8| {
        let w: Vec<String> = (0..3)
            .map(|i| format!("write -P {} {}M 32M", p + i, i * 16))
            .collect();
        qemu_io(&uri, &w);
        // The same writes again: now every chunk is mapped, so they are submitted
        // at once (the case that failed), not paced by delta zeroing.
        qemu_io(&uri, &w);
        qemu_io(
            &uri,
            &[
                format!("read -P {p} 0 16M"),
                format!("read -P {} 16M 16M", p + 1),
                format!("read -P {} 32M 32M", p + 2),
            ],
        );
    };
    run_ok(ctl(&srv).args(["backup", "create", "vol0", "b1"]));
    write_and_verify(2);
    run_ok(ctl(&srv).args(["backup", "create", "vol0", "b2"]));
    write_and_verify(7);
    // The backups kept what was there at their switch.
    qemu_io(&srv.uri("vol0@b1"), &["read -P 0 0 64M".to_string()]);
    qemu_io(
        &srv.uri("vol0@b2"),
        &[
            "read -P 2 0 16M".to_string(),
            "read -P 3 16M 16M".to_string(),
            "read -P 4 32M 32M".to_string(),
        ],
    );
    let st = stats(&srv, "vol0");
    assert_eq!(counter(&st, "errors"), 0, "no request failed: {st}");
    assert!(
        counter(&st, "slab_waits") > 0,
        "8 192-chunk writes must have waited for slab room (else the test proves nothing): {st}"
    );
    let log = srv.stderr_log();
    assert!(!log.contains("panicked"), "server panicked:\n{log}");
}

/// Runs fio over NBD: `jobs` connections, each with queue depth `qd`, writing and
/// verifying its own 16 MiB region with block sizes from 4 KiB to 256 KiB.
fn fio_verify(srv: &Server, export: &str, jobs: u32, qd: u32) {
    let out = run(Command::new("fio").args([
        "--name=deep",
        "--ioengine=nbd",
        &format!("--uri={}", srv.uri(export)),
        "--rw=randwrite",
        "--bsrange=4k-256k",
        &format!("--iodepth={qd}"),
        &format!("--numjobs={jobs}"),
        "--size=16m",
        "--offset_increment=16m",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        // No verify-state files left in the working directory.
        "--verify_state_save=0",
        "--group_reporting",
    ]));
    assert!(
        out.status.success(),
        "fio failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Item 4, many connections: the fast path failed a request with ENOMEM whenever the
/// reactor's slab was full (16 connections x 256 requests > 4 096 slots). With a
/// small slab, 12 connections at queue depth 64 overflow it on purpose; every request
/// must still succeed and verify, on the fast path and over a backup.
#[test]
fn deep_queues_on_many_connections_wait_for_a_small_slab() {
    let images = tmpdir();
    let spec = format!("v={},size=192M", images.path().join("v.img").display());
    let srv = Server::start_logged(&[
        "--cores",
        "0",
        "--volume",
        &spec,
        "--max-connections",
        "16",
        "--max-handshakes",
        "16",
        "--max-in-flight",
        "128",
    ]);
    fio_verify(&srv, "v", 12, 64);
    let st = stats(&srv, "v");
    assert_eq!(
        counter(&st, "errors"),
        0,
        "fast path: no request failed: {st}"
    );
    assert_eq!(
        counter(&st, "layered_ops"),
        0,
        "no backup: fast path only: {st}"
    );
    let fast_waits = counter(&st, "slab_waits");
    assert!(
        fast_waits > 0,
        "768 requests over 128 slots must have waited (else the test proves nothing): {st}"
    );
    run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    fio_verify(&srv, "v", 12, 64);
    let st = stats(&srv, "v");
    assert_eq!(
        counter(&st, "errors"),
        0,
        "layered path: no request failed: {st}"
    );
    assert!(counter(&st, "layered_ops") > 0, "{st}");
    assert!(
        counter(&st, "slab_waits") > fast_waits,
        "the layered path waited too: {st}"
    );
    assert!(!srv.stderr_log().contains("panicked"));
}

// ---------------------------------------------------------------------------------
// A minimal raw NBD client (fixed newstyle, OPT_GO, simple replies), so that FLUSHes
// can be pipelined exactly as many as wanted.

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const CMD_FLUSH: u16 = 3;
const IO_BOUND: Duration = Duration::from_secs(60);

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn open_raw(port: u16, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(IO_BOUND)).expect("timeout");
    s.set_write_timeout(Some(IO_BOUND)).expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!((be64(&g), be64(&g[8..])), (NBDMAGIC, IHAVEOPT), "greeting");
    // Client flags: fixed newstyle + no zeroes.
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&OPT_GO.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).expect("OPT_GO");
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        assert_eq!(be64(&h), OPTION_REPLY_MAGIC, "option reply magic");
        let kind = be32(&h[12..]);
        let mut body = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut body).expect("option reply body");
        assert_eq!(kind & (1 << 31), 0, "OPT_GO {export} refused: {kind:#x}");
        if kind == REP_ACK {
            return s;
        }
    }
}

/// Sends `n` FLUSHes back to back, then reads their replies; returns the errors.
fn flush_storm(port: u16, export: &str, n: u64) -> Vec<u32> {
    let mut s = open_raw(port, export);
    let mut reqs = Vec::with_capacity(28 * n as usize);
    for cookie in 0..n {
        reqs.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes());
        reqs.extend_from_slice(&CMD_FLUSH.to_be_bytes());
        reqs.extend_from_slice(&cookie.to_be_bytes());
        reqs.extend_from_slice(&0u64.to_be_bytes());
        reqs.extend_from_slice(&0u32.to_be_bytes());
    }
    s.write_all(&reqs).expect("send flushes");
    let mut errors = Vec::new();
    for _ in 0..n {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).expect("flush reply");
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "reply magic");
        let e = be32(&h[4..]);
        if e != 0 {
            errors.push(e);
        }
    }
    errors
}

/// Item 11: the commit queue was bounded and a FLUSH that found it full failed with
/// ENOMEM. With the bound made small, 16 connections pipelining 64 FLUSHes each over
/// a backup (the group-commit path) overflow it; every FLUSH must succeed.
#[test]
fn a_flush_storm_waits_for_the_commit_queue_and_never_fails() {
    let images = tmpdir();
    let spec = format!("v={},size=64M", images.path().join("v.img").display());
    let srv = Server::start_logged(&["--volume", &spec, "--commit-queue-depth", "4"]);
    run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    let port = srv.port;
    for round in 0..2 {
        let storms: Vec<_> = (0..16)
            .map(|_| std::thread::spawn(move || flush_storm(port, "v", 64)))
            .collect();
        for t in storms {
            let errors = t.join().expect("storm thread");
            assert!(
                errors.is_empty(),
                "round {round}: FLUSHes failed with NBD errors {errors:?}"
            );
        }
    }
    let st = stats(&srv, "v");
    assert_eq!(counter(&st, "errors"), 0, "{st}");
    assert_eq!(counter(&st, "flush_ops"), 2 * 16 * 64, "{st}");
    assert!(
        counter(&st, "commit_queue_waits") > 0,
        "2 048 FLUSHes over a queue of 4 must have waited (else the test proves nothing): {st}"
    );
    assert!(!srv.stderr_log().contains("panicked"));
}

/// One allocation extent as nbdinfo reports it: (offset, length, is_data).
type Ext = (u64, u64, bool);

fn merge(exts: impl IntoIterator<Item = Ext>) -> Vec<Ext> {
    let mut out: Vec<Ext> = Vec::new();
    for (off, len, data) in exts {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len, data)),
        }
    }
    out
}

/// Item 12: BLOCK_STATUS over a volume with deltas scanned up to 65 536 chunks with
/// two lseeks each per request on the reactor. Now each reply covers a bounded piece;
/// `nbdinfo --map` (which loops over partial replies) must still print the exact map
/// of a 6 GiB sparse volume whose data is partly in the base, partly in a delta, and
/// fragmented in both.
#[test]
fn block_status_map_of_a_sparse_volume_with_deltas_is_exact() {
    const SIZE: u64 = 6 * GIB;
    const BLOCK: u64 = 4096;
    let images = tmpdir();
    let spec = format!("big={},size=6G", images.path().join("big.img").display());
    let srv = Server::start_logged(&["--volume", &spec]);
    let uri = srv.uri("big");
    // (offset, length) written before the backup (base) and after (delta).
    let mut base: Vec<(u64, u64)> = vec![(0, MIB), (GIB + BLOCK, 64 << 10), (3 * GIB, BLOCK)];
    base.extend((0..300).map(|i| (5 * GIB + i * 2 * BLOCK, BLOCK)));
    let mut delta: Vec<(u64, u64)> = vec![
        (2 * GIB, BLOCK),
        (3 * GIB + 2 * BLOCK, 3 * BLOCK),
        (SIZE - BLOCK, BLOCK),
    ];
    delta.extend((0..300).map(|i| (4 * GIB + i * 2 * BLOCK, BLOCK)));
    // Delta chunks interleaved with base data: every other base hole gets a delta chunk.
    delta.extend((0..100).map(|i| (5 * GIB + (i * 4 + 1) * BLOCK, BLOCK)));
    let writes = |w: &[(u64, u64)]| {
        let cmds: Vec<String> = w
            .iter()
            .map(|(o, l)| format!("write -P 9 {o} {l}"))
            .collect();
        qemu_io(&uri, &cmds);
    };
    writes(&base);
    run_ok(ctl(&srv).args(["backup", "create", "big", "b1"]));
    writes(&delta);

    // The model: 4 KiB blocks holding data.
    let mut data_blocks = std::collections::BTreeSet::new();
    for (o, l) in base.iter().chain(&delta) {
        data_blocks.extend((o / BLOCK)..((o + l) / BLOCK));
    }
    let mut want = Vec::new();
    let mut pos = 0;
    for &b in &data_blocks {
        want.push((pos, b * BLOCK - pos, false));
        want.push((b * BLOCK, BLOCK, true));
        pos = (b + 1) * BLOCK;
    }
    want.push((pos, SIZE - pos, false));
    let want = merge(want);

    let before = counter(&stats(&srv, "big"), "block_status_ops");
    // Not `run_ok`: it reads the output only after the tool exits, and a map larger
    // than a pipe buffer then blocks nbdinfo forever. `timeout` bounds it instead.
    let res = Command::new("timeout")
        .args(["120", "nbdinfo", "--map", "--json", &uri])
        .output()
        .expect("run nbdinfo");
    assert!(
        res.status.success(),
        "nbdinfo --map failed ({}): {}",
        res.status,
        String::from_utf8_lossy(&res.stderr)
    );
    let out = String::from_utf8_lossy(&res.stdout);
    let map: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON {e}: {out}"));
    let got = merge(map.as_array().expect("extent array").iter().map(|e| {
        let ty = e["type"].as_u64().expect("type");
        (
            e["offset"].as_u64().expect("offset"),
            e["length"].as_u64().expect("length"),
            // bit 0: hole; data is "not a hole" (zero-flagged data still holds data).
            ty & 1 == 0,
        )
    }));
    assert_eq!(
        got.iter().map(|e| e.0 + e.1).max(),
        Some(SIZE),
        "the map covers the whole volume"
    );
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "map differs (first at entry {first:?}): got {} entries, want {}\ngot  {:?}\nwant {:?}",
            got.len(),
            want.len(),
            first.map(|i| &got[i..(i + 4).min(got.len())]),
            first.map(|i| &want[i..(i + 4).min(want.len())]),
        );
    }
    let requests = counter(&stats(&srv, "big"), "block_status_ops") - before;
    eprintln!("nbdinfo --map used {requests} BLOCK_STATUS requests");
    let st = stats(&srv, "big");
    assert_eq!(counter(&st, "errors"), 0, "{st}");
    assert!(!srv.stderr_log().contains("panicked"));
}
