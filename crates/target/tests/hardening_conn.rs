//! Issue #11, items 5, 6, 14 and 19: no client can exhaust the server.
//!
//! - 5: replies to zero-length and refused requests count in the connection's bound,
//!   so a client that never reads them makes the server stop reading, not grow.
//! - 6: a server-wide budget for request buffers; a bare WRITE header waits for it
//!   and is closed after the request timeout when its payload never comes.
//! - 14: `x-ringblk:changed/NAME` is bound to the backup it was selected for, not to
//!   whichever backup carries that name later.
//! - 19: idle connections in the handshake have their own, smaller budget; the
//!   longest-idle one gives way, so a real client is served during a flood, and the
//!   limit warnings are rate-limited.
//!
//! The hostile clients are hand-written on raw `TcpStream`s; memory is the server's
//! peak RSS (`VmHWM`). Every check that could pass vacuously also asserts, through a
//! server counter, that the bad condition was really provoked.

mod common;
use common::nbd::*;
use common::*;
use ringblk_nbd::client::Cmd;
use ringblk_nbd::proto::*;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const NBD_EINVAL: u32 = NbdErrno::Inval as u32;

const MIB: u64 = 1 << 20;
/// Liveness bound on blocking socket calls and on waiting for the server to act.
/// Never a speed assertion.
const IO_BOUND: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The raw NBD client is `common::nbd::Client` (simple replies).

/// Greeting, fixed newstyle, GO `export`: a connection in the transmission phase.
fn open(port: u16, export: &str) -> io::Result<Client> {
    Client::open(port, export, IO_BOUND)
}

// ---------------------------------------------------------------------------------------
// Server-side observations

/// A field of /proc/PID/status in KiB (`VmHWM`: peak RSS, `VmRSS`: now).
fn status_kib(srv: &Server, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in the server's /proc status"))
}

/// The `server` section of the `stats` RPC.
fn server_stats(srv: &Server) -> Value {
    let out = run_ok(ctl(srv).args(["call", "stats", "{}"]));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("stats: {e}: {out}"));
    v.get("server")
        .cloned()
        .unwrap_or_else(|| panic!("stats has no server section: {v}"))
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("server stats lack {name}: {stats}"))
}

/// Raises this process's soft RLIMIT_NOFILE towards its hard limit (the server,
/// started afterwards, inherits it); returns the new soft limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        let want = lim.rlim_max.min(1 << 16);
        if lim.rlim_cur < want {
            lim.rlim_cur = want;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------
// Item 5: replies to zero-length and refused requests are bounded

/// Old code: each reply to a zero-length READ (an `Event::NoOp`) or a refused request
/// (`Event::Reject`) was queued outside the connection's bound, so a client that sent
/// such headers and never read grew the server without limit (3.4 GiB in 12 s).
#[test]
fn unread_replies_to_noop_and_refused_requests_are_bounded() {
    const REQUESTS: u64 = 3_000_000; // 84 MB of headers; ~300 MB queued by the old code
    const REFUSE_EVERY: u64 = 7;
    const VOL_BYTES: u64 = 16 * MIB;
    let srv = Server::start_logged(&["--volume", "v=,backend=mem,size=16M"]);
    let mut s = open(srv.port, "v").expect("handshake");
    let before = status_kib(&srv, "VmHWM:");
    let mut writer = s.s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut batch = Vec::with_capacity(28 * 4096);
        for i in 0..REQUESTS {
            // Zero-length READs are no-ops; one in REFUSE_EVERY starts past the end
            // of the export and is refused with EINVAL.
            let offset = if i % REFUSE_EVERY == 0 {
                VOL_BYTES + 4096
            } else {
                0
            };
            batch.extend_from_slice(&header(Cmd::Read, i, offset, 0));
            if batch.len() >= 28 * 4096 {
                writer.write_all(&batch)?;
                batch.clear();
            }
        }
        writer.write_all(&batch)
    });
    // Not reading: let the server queue what it will (until the sender is done, or
    // for a few seconds once the server pushes back). This wait only gives a server
    // without a bound the chance to show it; nothing below depends on its length.
    let start = Instant::now();
    while !sender.is_finished() && start.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let during = status_kib(&srv, "VmHWM:");
    // Now read every reply, in order (no-ops and refusals reply at once).
    let mut reader = BufReader::with_capacity(1 << 20, s.s.try_clone().expect("clone"));
    let mut h = [0u8; 16];
    for i in 0..REQUESTS {
        reader.read_exact(&mut h).expect("reply");
        assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "reply {i}");
        let want = if i % REFUSE_EVERY == 0 { NBD_EINVAL } else { 0 };
        assert_eq!((be32(&h[4..]), be64(&h[8..])), (want, i), "reply {i}");
    }
    sender.join().expect("sender").expect("send requests");
    // Still in step: a real request works on the same connection.
    let data = pattern(1, 4096);
    assert_eq!(s.write(1 << 40, 0, &data).unwrap(), 0);
    assert_eq!(s.read_ok((1 << 40) + 1, 0, 4096).unwrap(), data);
    s.disconnect();
    eprintln!("peak RSS {before} KiB before, {during} KiB while not reading");
    assert!(
        during < before + 64 * 1024,
        "server peak RSS grew from {before} KiB to {during} KiB for one client's unread replies"
    );
    let pushed_back = counter(&server_stats(&srv), "reply_queue_pauses");
    assert!(
        pushed_back > 0,
        "the server never pushed back on a client that did not read"
    );
    srv.stop();
}

// ---------------------------------------------------------------------------------------
// Item 6: bare WRITE headers and the buffer budget

/// Old code: the 32 MiB buffer of a WRITE was allocated and zeroed when its header
/// arrived, so connections sending only headers committed 32 MiB each, and nothing
/// ever timed them out.
#[test]
fn bare_write_headers_wait_for_the_buffer_budget_and_time_out() {
    const HOSTILE: usize = 64; // 2 GiB of write buffers if each got its own at once
    const BUDGET_MIB: u64 = 256;
    let srv = Server::start_logged(&[
        "--volume",
        "v=,backend=mem,size=64M",
        "--buffer-budget",
        "256M",
        "--request-timeout",
        "1",
    ]);
    let before = status_kib(&srv, "VmHWM:");
    let mut hostile: Vec<Client> = (0..HOSTILE)
        .map(|i| open(srv.port, "v").unwrap_or_else(|e| panic!("hostile {i}: {e}")))
        .collect();
    // All headers at once, so that they compete for the budget together.
    for (i, s) in hostile.iter_mut().enumerate() {
        s.send(&header(Cmd::Write, i as u64, 0, 32 << 20))
            .expect("header");
    }
    // A well-behaved client on its own connection: its requests wait their turn for
    // the budget (first come, first served) and then succeed, with the right data.
    let port = srv.port;
    let good = std::thread::spawn(move || -> Result<(), String> {
        let mut s = open(port, "v").map_err(|e| format!("handshake: {e}"))?;
        for i in 0..4u64 {
            let data = pattern(i, MIB as usize);
            let off = (16 + i) * MIB;
            match s.write(2 * i, off, &data) {
                Ok(0) => {}
                other => return Err(format!("write {i}: {other:?}")),
            }
            let got = s
                .read_ok(2 * i + 1, off, MIB as u32)
                .map_err(|e| e.to_string())?;
            if got != data {
                return Err(format!("read back wrong bytes at {off}"));
            }
        }
        s.disconnect();
        Ok(())
    });
    // Every hostile connection is closed once its request timed out.
    let deadline = Instant::now() + IO_BOUND;
    let open_ones: Vec<String> = hostile
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = s.wait_closed(left.max(Duration::from_millis(1))).err()?;
            Some(format!("hostile {i}: {e}"))
        })
        .collect();
    good.join().expect("good client").expect("good client");
    let after = status_kib(&srv, "VmHWM:");
    eprintln!("peak RSS {before} KiB before, {after} KiB after");
    assert!(
        after < before + (BUDGET_MIB + 64) * 1024,
        "server peak RSS grew from {before} KiB to {after} KiB: over the budget"
    );
    assert!(
        open_ones.is_empty(),
        "stalled WRITEs not closed: {open_ones:#?}"
    );
    let stats = server_stats(&srv);
    eprintln!("{stats}");
    assert!(
        counter(&stats, "request_timeouts") >= HOSTILE as u64,
        "stalled WRITEs were not timed out: {stats}"
    );
    assert!(
        counter(&stats, "buffer_budget_waits") > 0,
        "nobody waited for the budget: the test did not exhaust it: {stats}"
    );
    assert_eq!(counter(&stats, "buffer_budget_used_bytes"), 0, "{stats}");
    srv.stop();
}

/// READ replies that the client never reads hold their buffers' budget: without the
/// request timeout one such client could starve every other one for good.
#[test]
fn unread_read_replies_give_their_budget_back_after_the_timeout() {
    let srv = Server::start_logged(&[
        "--volume",
        "v=,backend=mem,size=64M",
        "--buffer-budget",
        "64M",
        "--request-timeout",
        "1",
    ]);
    let mut hog = open(srv.port, "v").expect("handshake");
    for i in 0..4 {
        hog.send(&header(Cmd::Read, i, 0, 32 << 20)).expect("READ");
    }
    // Another client's 32 MiB WRITE and READ need the budget the hog holds.
    let data = pattern(9, 32 << 20);
    let mut s = open(srv.port, "v").expect("handshake");
    assert_eq!(s.write(1, 0, &data).unwrap(), 0);
    assert!(s.read_ok(2, 0, 32 << 20).unwrap() == data, "wrong data");
    s.disconnect();
    hog.wait_closed(IO_BOUND).expect("the hog is closed");
    let stats = server_stats(&srv);
    assert!(counter(&stats, "request_timeouts") >= 1, "{stats}");
    assert_eq!(counter(&stats, "buffer_budget_used_bytes"), 0, "{stats}");
    srv.stop();
}

/// The budget must hold the largest request, or some valid request could never run.
#[test]
fn a_buffer_budget_below_the_largest_request_is_refused() {
    let dir = tmpdir();
    let out = run(Command::new(env!("CARGO_BIN_EXE_ringblk")).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--volume",
        "v=,backend=mem,size=16M",
        "--buffer-budget",
        "16M",
    ]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a 16 MiB budget: {err}");
    assert!(
        err.contains("--buffer-budget") && err.contains("32 MiB"),
        "the error must name the flag and the minimum: {err}"
    );
}

// ---------------------------------------------------------------------------------------
// Item 14: the changed-blocks context follows the backup, not the name

/// Old code: `x-ringblk:changed/b1` was looked up by name at every BLOCK_STATUS, so
/// after b1 was released and a new b1 created, a connection that had selected the old
/// one silently got the changes since the new one.
#[test]
fn changed_context_is_bound_to_the_backup_it_was_selected_for() {
    let srv = Server::start_logged(&["--volume", "v=,backend=mem,size=16M"]);
    run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    let script = r#"
import sys, nbd
h = nbd.NBD()
h.add_meta_context("x-ringblk:changed/b1")
h.connect_uri(sys.argv[1])
assert h.can_meta_context("x-ringblk:changed/b1")
def status():
    got = []
    def cb(ctx, off, entries, err):
        got.extend(zip(entries[0::2], entries[1::2]))
    try:
        h.block_status(4 << 20, 0, cb)
    except nbd.Error as e:
        return "error errno=%s" % e.errno
    return "ok %s" % got
h.pwrite(b"\x01" * 4096, 1 << 20)
print("before", status(), flush=True)
sys.stdin.readline()
h.pwrite(b"\x02" * 4096, 2 << 20)
print("after", status(), flush=True)
h.shutdown()
"#;
    let mut py = Command::new(SYSTEM_PYTHON)
        .args(["-c", script, &srv.uri("v")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(py.stdout.take().expect("stdout")).lines();
    let before = lines.next().expect("a line").expect("read");
    // Positive control: while b1 exists the context shows the chunk written since.
    assert_eq!(
        before, "before ok [(1048576, 0), (4096, 1), (3141632, 0)]",
        "changed/b1 before the release"
    );
    run_ok(ctl(&srv).args(["backup", "release", "v@b1"]));
    let start = Instant::now();
    while run_ok(ctl(&srv).args(["backup", "list", "v"])).contains("b1") {
        assert!(start.elapsed() < IO_BOUND, "release of b1 never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    writeln!(py.stdin.as_mut().expect("stdin")).expect("go");
    let after = lines.next().expect("a line").expect("read");
    assert!(py.wait().expect("python").success());
    assert_eq!(
        after, "after error errno=EINVAL",
        "changed/b1 selected for the released b1 must fail, not describe the new b1"
    );
    srv.stop();
}

// ---------------------------------------------------------------------------------------
// Item 19: idle connections do not lock out real clients

/// Old code: 1 500 connections that never sent a byte took all 1 024 slots until the
/// handshake timeout; a real client was refused and every refusal logged a warning.
#[test]
fn idle_connections_do_not_lock_out_real_clients() {
    const IDLE: usize = 1500;
    let nofile = raise_nofile();
    assert!(
        nofile >= IDLE as u64 + 256,
        "RLIMIT_NOFILE hard limit {nofile} is too low for this test"
    );
    let srv = Server::start_logged(&[
        "--volume",
        "v=,backend=mem,size=16M",
        "--handshake-timeout",
        "60",
    ]);
    let idle: Vec<Client> = (0..IDLE)
        .map(|i| {
            Client::connect(srv.port, IO_BOUND)
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect();
    // The server has dealt with every idle connection before the real client comes:
    // each got its greeting (accepted) or was closed (refused, or made to give way).
    // Reading is not sending: the idle clients still never send a byte.
    let mut idle = idle;
    for (i, s) in idle.iter_mut().enumerate() {
        let mut b = [0u8; 18];
        if let Err(e) = s.s.read(&mut b) {
            assert!(
                e.kind() == io::ErrorKind::ConnectionReset,
                "idle connection {i}: neither greeted nor closed: {e}"
            );
        }
    }
    // Real clients, while the idle connections are still open.
    for i in 0..3 {
        let out = run_ok(Command::new("nbdinfo").arg("--size").arg(srv.uri("v")));
        assert_eq!(out.trim(), (16 * MIB).to_string(), "nbdinfo {i}");
    }
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        &srv.uri("v"),
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "read -P 0x5a 0 1M",
    ]));
    let stats = server_stats(&srv);
    drop(idle);
    let log = srv.stderr_log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("limit")).collect();
    eprintln!("{stats}\n{}", warnings.join("\n"));
    assert!(
        counter(&stats, "handshake_evictions") > 0,
        "no idle connection was ever made to give way: {stats}"
    );
    assert!(
        warnings.len() <= 4,
        "{} limit warnings (rate-limit them):\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(!log.contains("panicked"), "{log}");
    srv.stop();
}
