//! Issue #11's soak: real clients at every request size while backups come and go
//! every 200 ms and hostile clients try to exhaust the server beside them.
//!
//! - 16 fio jobs (`ioengine=nbd`, one connection each) mix reads and writes of 4 KiB to
//!   32 MiB (`bsrange`) at QD2 over their own 64 MiB region of a 1 GiB volume, with
//!   `verify=crc32c`: every byte a job wrote is read back and checked while it runs.
//!   QD x largest block x jobs = 1 GiB of request buffers at most.
//! - A backup is created and the previous one released every 200 ms.
//! - Hostile clients, on their own connections: one sends zero-length READs and never
//!   reads a reply (item 5), 8 send a bare 32 MiB WRITE header and nothing more,
//!   again each time the server's request timeout closes them (item 6), 24 pipeline
//!   FLUSHes as fast as the server takes them (item 11).
//!
//! Checked: fio verified every byte and no request failed (its own exit status and
//! error counts), no backup command and no storm FLUSH failed, the server's RSS
//! sampled every 50 ms stayed under a bound derived from its configured budgets, its
//! counters show the hostile clients were pushed back, and its open descriptors return
//! to their starting count once everything is released.
//!
//! Length: `RINGBLK_SOAK_SECS` (default 20, CI's); `ci/soak.sh --long` runs 10 minutes
//! on a release build.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::nbd::{header, Client};
use common::{ctl, run, run_ok, tmpdir, Server};
use ringblk_nbd::client::Cmd;
use ringblk_nbd::proto::SIMPLE_REPLY_MAGIC;

/// The server-wide budget for request data buffers the soak configures.
const BUFFER_BUDGET_MIB: u64 = 384;
const VOLUME_MIB: u64 = 1024;
const JOBS: u64 = 16;
/// The server's request timeout in the soak: a bare WRITE header holds 32 MiB of the
/// buffer budget until then, so the hostile clients below hold two thirds of it (8 x
/// 32 MiB of 384 MiB) most of the time, and fio's large requests wait for the rest.
const REQUEST_TIMEOUT_SECS: u64 = 3;
/// Connections sending bare WRITE headers.
const BARE_HEADERS: u64 = 8;

fn soak_secs() -> u64 {
    std::env::var("RINGBLK_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

// ---------------------------------------------------------------------------
// The hostile side must do what no real client does: `common::nbd` is the raw client.

/// Connects and negotiates `export` (no structured replies).
fn nbd_connect(port: u16, export: &str) -> std::io::Result<TcpStream> {
    // Bounds on liveness only: a group commit under the fio load takes seconds.
    Ok(Client::open(port, export, Duration::from_secs(120))?.s)
}

/// Item 5: zero-length READs sent as fast as the socket takes them, replies never
/// read; again on a new connection each time the server closes one (its request
/// timeout reaps a client that reads nothing). Returns (bytes of requests the server
/// took, connections it closed).
fn zero_length_reader(port: u16, stop: Arc<AtomicBool>) -> std::io::Result<(u64, u64)> {
    let batch: Vec<u8> = (0..256u64)
        .flat_map(|i| header(Cmd::Read, i, 0, 0))
        .collect();
    let (mut sent, mut closed) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        let mut s = nbd_connect(port, "soak")?;
        s.set_write_timeout(Some(Duration::from_millis(200)))?;
        // Where in the batch the stream stands: a partial write must be continued, not
        // restarted, or the requests lose their framing (and become protocol errors).
        let mut at = 0;
        while !stop.load(Ordering::Relaxed) {
            match s.write(&batch[at..]) {
                Ok(n) => {
                    sent += n as u64;
                    at = (at + n) % batch.len();
                }
                // The server stopped reading: back-pressure, as it should.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    Ok((sent, closed))
}

/// Item 6: a bare 32 MiB WRITE header, then silence until the server closes the
/// connection (its request timeout) or `stop`; again and again. Returns how many
/// connections the server closed.
fn bare_write_header(port: u16, i: u64, stop: Arc<AtomicBool>) -> std::io::Result<u64> {
    let mut closed = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut s = nbd_connect(port, "soak")?;
        s.write_all(&header(Cmd::Write, i, 0, 32 << 20))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut b = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    Ok(closed)
}

/// Item 11: FLUSHes pipelined 256 deep without pause; every reply must be success.
/// Returns (FLUSHes answered, failures, the last failure's NBD error).
fn flush_storm(port: u16, stop: Arc<AtomicBool>) -> std::io::Result<(u64, u64, u32)> {
    let mut s = nbd_connect(port, "soak")?;
    let mut rd = s.try_clone()?;
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let (sent2, done2) = (sent.clone(), done.clone());
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, u64, u32)> {
        let (mut ok, mut failed, mut last_error) = (0u64, 0u64, 0u32);
        let mut h = [0u8; 16];
        loop {
            if done2.load(Ordering::Acquire) && ok + failed == sent2.load(Ordering::Acquire) {
                return Ok((ok, failed, last_error));
            }
            match rd.read_exact(&mut h) {
                Ok(()) => {}
                Err(e) => return Err(e),
            }
            let magic = u32::from_be_bytes(h[0..4].try_into().unwrap_or_default());
            if magic != SIMPLE_REPLY_MAGIC {
                return Err(std::io::Error::other(format!("bad reply {h:02x?}")));
            }
            match u32::from_be_bytes(h[4..8].try_into().unwrap_or_default()) {
                0 => ok += 1,
                e => {
                    failed += 1;
                    last_error = e;
                }
            }
        }
    });
    let batch: Vec<u8> = (0..256u64)
        .flat_map(|i| header(Cmd::Flush, i, 0, 0))
        .collect();
    while !stop.load(Ordering::Relaxed) {
        s.write_all(&batch)?;
        sent.fetch_add(256, Ordering::AcqRel);
    }
    done.store(true, Ordering::Release);
    let res = reader
        .join()
        .map_err(|_| std::io::Error::other("reader panicked"))?;
    let _ = s.shutdown(std::net::Shutdown::Both);
    res
}

// ---------------------------------------------------------------------------

fn proc_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Sum of every numeric field named `key` anywhere in `v`.
fn sum_field(v: &serde_json::Value, key: &str) -> u64 {
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, x)| {
                if k == key {
                    x.as_u64().unwrap_or(0)
                } else {
                    sum_field(x, key)
                }
            })
            .sum(),
        serde_json::Value::Array(a) => a.iter().map(|x| sum_field(x, key)).sum(),
        _ => 0,
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn backups(srv: &Server) -> usize {
    json(&run_ok(ctl(srv).args(["--json", "call", "backup_list"])))
        .as_array()
        .map_or(0, |a| a.len())
}

/// Creates `b{i}` and releases `b{i-1}` every 200 ms until `stop`; returns the
/// number of cycles and every failure's output.
fn backup_cycles(srv_rpc: std::path::PathBuf, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let ctl_bin = std::path::Path::new(env!("CARGO_BIN_EXE_ringblk"))
        .parent()
        .expect("bin dir")
        .join("ringblk-ctl");
    let call = |args: &[&str]| {
        let out = run(Command::new(&ctl_bin).arg("--rpc").arg(&srv_rpc).args(args));
        if out.status.success() {
            None
        } else {
            Some(format!(
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let mut failures = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + Duration::from_millis(200);
        failures.extend(call(&["backup", "create", "soak", &format!("b{i}")]));
        if i > 0 {
            failures.extend(call(&["backup", "release", &format!("soak@b{}", i - 1)]));
        }
        i += 1;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    if i > 0 {
        failures.extend(call(&["backup", "release", &format!("soak@b{}", i - 1)]));
    }
    (i, failures)
}

fn fio(uri: &str, secs: u64) -> Command {
    let mut c = Command::new("fio");
    c.args([
        "--name=soak",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--numjobs={JOBS}"),
        &format!("--size={}M", VOLUME_MIB / JOBS),
        &format!("--offset_increment={}M", VOLUME_MIB / JOBS),
        "--rw=randrw",
        "--bsrange=4k-32m",
        "--iodepth=2",
        "--verify=crc32c",
        "--verify_backlog=16",
        "--verify_fatal=1",
        "--time_based",
        &format!("--runtime={secs}"),
        "--group_reporting",
        "--output-format=json",
    ]);
    c
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    std::thread::spawn(f)
}

#[test]
fn soak_every_size_with_backups_and_hostile_clients() {
    let secs = soak_secs();
    let images = tmpdir();
    let vol = format!(
        "soak={},size={VOLUME_MIB}M",
        images.path().join("soak.img").display()
    );
    let budget = format!("{BUFFER_BUDGET_MIB}M");
    let mut srv = Server::start_logged(&[
        "--volume",
        &vol,
        "--buffer-budget",
        &budget,
        "--request-timeout",
        &REQUEST_TIMEOUT_SECS.to_string(),
    ]);
    let pid = srv.child.id();
    // One backup cycle first: its commit opens the base for fdatasync through the
    // store's descriptor cache and its release leaves the next backup's prepared
    // delta open, both for the server's life. The descriptors counted at the end must
    // return to this steady state, not to the pristine one.
    let uri = srv.uri("soak");
    run_ok(ctl(&srv).args(["backup", "create", "soak", "warmup"]));
    run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 1 0 1M",
        "-c",
        "flush",
        &uri,
    ]));
    run_ok(ctl(&srv).args(["backup", "release", "soak@warmup"]));
    let deadline = Instant::now() + Duration::from_secs(60);
    while backups(&srv) > 0 {
        assert!(
            Instant::now() < deadline,
            "the warm-up release never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let fds_at_start = proc_fds(pid);
    let stop = Arc::new(AtomicBool::new(false));

    // RSS sampler.
    let rss_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, rss_max) = (stop.clone(), rss_max.clone());
        spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rss_max.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let fio_child = fio(&srv.uri("soak"), secs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio (ci/test.sh installs it)");
    let cycles = {
        let (rpc, stop) = (srv.rpc.clone(), stop.clone());
        spawn(move || backup_cycles(rpc, stop))
    };
    let port = srv.port;
    let zero = {
        let stop = stop.clone();
        spawn(move || zero_length_reader(port, stop))
    };
    let bare: Vec<_> = (0..BARE_HEADERS)
        .map(|i| {
            let stop = stop.clone();
            spawn(move || bare_write_header(port, i, stop))
        })
        .collect();
    let storms: Vec<_> = (0..24)
        .map(|_| {
            let stop = stop.clone();
            spawn(move || flush_storm(port, stop))
        })
        .collect();

    let fio_out = fio_child.wait_with_output().expect("fio output");
    // Counters while the hostile clients still hold their ground.
    let stats = json(&run_ok(ctl(&srv).args(["--json", "call", "stats"])));
    stop.store(true, Ordering::Relaxed);
    let (cycles, backup_failures) = cycles.join().expect("backup thread");
    let zero_sent = zero.join().expect("zero-length thread");
    let mut bare_closed = 0;
    for b in bare {
        bare_closed += b
            .join()
            .expect("bare-header thread")
            .expect("bare-header client");
    }
    let mut storm_ok = 0;
    for s in storms {
        match s.join().expect("storm thread") {
            Ok((ok, failed, error)) => {
                assert_eq!(
                    failed,
                    0,
                    "{failed} storm FLUSHes failed, the last with NBD error {error}; server log:\n{}",
                    srv.stderr_log()
                );
                storm_ok += ok;
            }
            Err(e) => panic!(
                "a FLUSH storm connection broke: {e}; server log:\n{}",
                srv.stderr_log()
            ),
        }
    }
    sampler.join().expect("sampler");
    srv.assert_alive();

    // fio: exit status and its own error counts.
    let fio_text = String::from_utf8_lossy(&fio_out.stdout);
    assert!(
        fio_out.status.success(),
        "fio failed ({}): {}\n{}",
        fio_out.status,
        String::from_utf8_lossy(&fio_out.stderr),
        fio_text
    );
    // fio's nbd engine prints "fio: connected to NBD server" lines before the JSON.
    let report = json(&fio_text[fio_text.find('{').unwrap_or(0)..]);
    let job = &report["jobs"][0];
    let (reads, writes) = (
        job["read"]["total_ios"].as_u64().unwrap_or(0),
        job["write"]["total_ios"].as_u64().unwrap_or(0),
    );
    assert_eq!(job["error"], 0, "fio job error: {job}");
    assert!(reads > 0 && writes > 0, "fio did no I/O: {job}");
    assert!(
        backup_failures.is_empty(),
        "backup commands failed: {backup_failures:#?}"
    );
    assert!(cycles >= 3, "only {cycles} backup cycles");
    let (zero_sent, zero_closed) = zero_sent.expect("zero-length client");

    // Pushed back: the server stopped reading the hostile sockets at some point.
    let pushed_back: Vec<(&str, u64)> = [
        "reply_queue_pauses",
        "buffer_budget_waits",
        "request_timeouts",
        "commit_queue_waits",
        "slab_waits",
    ]
    .iter()
    .map(|k| (*k, sum_field(&stats, k)))
    .collect();
    eprintln!(
        "soak {secs}s: fio {reads} reads, {writes} writes; {cycles} backup cycles; \
         {storm_ok} storm FLUSHes; {zero_sent} B of zero-length READs \
         ({zero_closed} connections closed by the server); \
         {bare_closed} bare-header connections closed by the server; \
         RSS max {} MiB; pushed back {pushed_back:?}",
        rss_max.load(Ordering::Relaxed) / 1024
    );
    // Each hostile client was pushed back: the unread replies paused its reading, the
    // bare headers waited for budget and were closed at the timeout.
    for key in [
        "reply_queue_pauses",
        "buffer_budget_waits",
        "request_timeouts",
    ] {
        assert!(
            sum_field(&stats, key) > 0,
            "{key} did not move: the hostile clients were not pushed back: {stats}"
        );
    }
    assert!(
        bare_closed > 0,
        "the server never closed a bare-header client"
    );
    // No request of any client failed (fio's and the storms' are checked above; this
    // covers the hostile clients' valid requests too).
    let errors: u64 = stats["volumes"].as_array().map_or(0, |v| {
        v.iter().map(|v| v["errors"].as_u64().unwrap_or(0)).sum()
    });
    assert_eq!(errors, 0, "requests failed: {stats}");

    // RSS bound: the buffer budget, each connection's receive buffer and reply room
    // (16 fio + 57 hostile), and a fixed allowance for the binary, reactors' rings and
    // buffer pools, block maps and histograms.
    let conns = JOBS + 1 + BARE_HEADERS + 24;
    let bound_mib = BUFFER_BUDGET_MIB + conns * 2 + 384;
    let rss_max_mib = rss_max.load(Ordering::Relaxed) / 1024;
    assert!(
        rss_max_mib <= bound_mib,
        "RSS peaked at {rss_max_mib} MiB, over the {bound_mib} MiB bound"
    );

    // Everything released: descriptors return to where they started. Releases queue
    // faster than merges finish (one chunk at a time), so the backlog to wait for
    // grows with the run's length.
    let deadline = Instant::now() + Duration::from_secs(120 + 4 * secs);
    loop {
        let now = proc_fds(pid);
        if backups(&srv) == 0 && now.len() <= fds_at_start.len() {
            assert!(
                !now.iter().any(|l| l.contains("(deleted)")),
                "deleted files still open: {now:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors did not return: {} at start {fds_at_start:?}, now {now:?}",
            fds_at_start.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    srv.assert_alive();
}

/// Negative control for fio's verification as the soak uses it: a block changed
/// behind fio's back between its write and its verify pass fails the run.
#[test]
fn fio_verify_notices_a_changed_block() {
    let images = tmpdir();
    let vol = format!("v={},size=64M", images.path().join("v.img").display());
    let srv = Server::start(&["--volume", &vol]);
    let uri = srv.uri("v");
    let job = |extra: &[&str]| {
        let mut c = Command::new("fio");
        c.args([
            "--name=ctl",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--size=8M",
            "--rw=write",
            "--bs=64k",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]);
        c.args(extra);
        c
    };
    run_ok(&mut job(&["--do_verify=0"]));
    run_ok(&mut job(&["--verify_only"])); // unchanged: verifies
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 1M 4k", &uri]));
    let out = run(&mut job(&["--verify_only"]));
    assert!(
        !out.status.success(),
        "fio verify passed over a changed block: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
