//! Issue #11, items 4, 11 and 12: the data path never fails a valid request for lack
//! of internal room, and one request cannot make a reactor do unbounded work.
//!
//! - Item 4: a request turned into more reactor operations than the reactor's slab
//!   holds (a 32 MiB write over a backup is 8 192 chunk writes; many connections with
//!   deep queues on the fast path) waits for slots instead of failing with ENOMEM.
//! - Item 11: FLUSHes beyond a volume's commit queue wait to be queued instead of
//!   failing with ENOMEM.
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
        "--max-in-flight",
        "96",
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
        "768 requests over 96 slots must have waited (else the test proves nothing): {st}"
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
