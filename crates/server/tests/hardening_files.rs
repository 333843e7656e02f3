//! Hardening of the server's files (issue #11, items 3, 7 and 8), with the real
//! server and real clients:
//! - item 3: one writer per file. A second volume on a live volume's base, a backup
//!   copy onto another live volume's base, and a second server on the same base are
//!   refused with a message that names the file and its holder, and the base keeps
//!   its size and bytes. A deleted volume lets go of its file.
//! - item 7: backup create/release cycles leak no descriptors and keep no space of
//!   deleted files.
//! - item 8: a drain that outlasts its wait leaves the backup `draining` (the RPC
//!   says so, `backup_list` counts the requests it waits for), frees nothing a
//!   request may still use, and the backup becomes `ready` when the last old
//!   request finishes, with the right bytes.

mod common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn call(srv: &Server, method: &str, params: Value) -> Value {
    let out = run_ok(ctl(srv).args(["call", method, &params.to_string()]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method}: bad JSON {e}: {out}"))
}

fn ctl_json(srv: &Server, args: &[&str]) -> Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

fn qemu_io(uri: &str, read_only: bool, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    c.arg(uri);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run_ok(&mut c);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

fn w(p: u8, off: u64, len: u64) -> String {
    format!("write -P {p:#x} {off} {len}")
}

fn rd(p: u8, off: u64, len: u64) -> String {
    format!("read -P {p:#x} {off} {len}")
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().expect("hash").to_string()
}

/// Waits (bounded) until `backup list VOL` no longer lists `name`.
fn wait_gone(srv: &Server, vol: &str, name: &str) {
    let start = Instant::now();
    loop {
        let list = ctl_json(srv, &["backup", "list", vol]);
        if !list
            .as_array()
            .expect("array")
            .iter()
            .any(|b| b["name"] == name)
        {
            return;
        }
        assert!(
            start.elapsed() < TOOL_TIMEOUT,
            "{name} never released: {list}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn backup_entry(srv: &Server, vol: &str, name: &str) -> Value {
    ctl_json(srv, &["backup", "list", vol])
        .as_array()
        .expect("array")
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backup {vol}@{name}"))
}

// ----- item 3: one writer per file ------------------------------------------------

fn stderr_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Issue #11 item 3: `volume create --path` of another volume's base was accepted
/// (its writes then showed up in the other volume's frozen backup), and `backup copy
/// --dest` onto another live volume's base truncated it under its clients.
#[test]
fn a_second_writer_of_a_file_is_refused_and_named() {
    let dir = tmpdir();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let srv = Server::start_in(
        dir,
        &[
            "--volume",
            &format!("vol0={},size=16M", a.display()),
            "--volume",
            &format!("v2={},size=32M", b.display()),
        ],
    );
    qemu_io(&srv.uri("vol0"), false, &[w(0x11, 0, MIB)]);
    qemu_io(
        &srv.uri("v2"),
        false,
        &[w(0x22, 0, 4 * MIB), "flush".into()],
    );

    // A second volume on vol0's base.
    let out = run(ctl(&srv).args(["volume", "create", "v3", "--path"]).arg(&a));
    let text = stderr_of(&out);
    assert!(!out.status.success(), "v3 on vol0's base accepted: {text}");
    assert!(
        text.contains(r#"Failed to get "write" lock"#)
            && text.contains(&a.display().to_string())
            && text.contains("vol0"),
        "the refusal names the lock, the file and its holder: {text}"
    );
    let vols = ctl_json(&srv, &["volume", "list"]);
    assert_eq!(vols.as_array().expect("array").len(), 2, "{vols}");

    // A backup copy onto another live volume's base.
    let b_size = std::fs::metadata(&b).expect("b.img").len();
    let b_sha = sha256(&b);
    ctl_json(&srv, &["backup", "create", "vol0", "snap"]);
    // --force: past ringblk-ctl's refusal of an existing DEST, to the server's lock.
    let out = run(ctl(&srv)
        .args(["backup", "copy", "vol0@snap", "--force"])
        .arg(&b));
    let text = stderr_of(&out);
    assert!(
        !out.status.success(),
        "copy onto v2's base accepted: {text}"
    );
    assert!(
        text.contains(r#"Failed to get "write" lock"#)
            && text.contains(&b.display().to_string())
            && text.contains("v2"),
        "the refusal names the lock, the file and its holder: {text}"
    );
    assert_eq!(std::fs::metadata(&b).expect("b.img").len(), b_size);
    assert_eq!(sha256(&b), b_sha, "v2's base was changed");
    qemu_io(&srv.uri("v2"), true, &[rd(0x22, 0, 4 * MIB)]);
    // The backup's export still reads (read-only opens take no lock), and a copy to
    // a free file works.
    qemu_io(&srv.uri("vol0@snap"), true, &[rd(0x11, 0, MIB)]);
    let dest = srv.path("snap-copy.img");
    let out = run_ok(ctl(&srv).args(["backup", "copy", "vol0@snap"]).arg(&dest));
    assert!(out.contains("sha256"), "{out}");

    // A second server (its own data dir) on vol0's base.
    let other = tmpdir();
    let out = run(Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(other.path())
        .arg("--rpc")
        .arg(other.path().join("rpc.sock"))
        .arg("--volume")
        .arg(format!("x={},size=16M", a.display())));
    let text = stderr_of(&out);
    assert!(!out.status.success(), "second server started: {text}");
    assert!(
        text.contains(r#"Failed to get "write" lock"#)
            && text.contains(&a.display().to_string())
            && text.contains("another process"),
        "the refusal names the lock, the file and the holder: {text}"
    );
    qemu_io(&srv.uri("vol0"), false, &[rd(0x11, 0, MIB)]);

    // A deleted volume lets go of its file: the next volume on it is accepted.
    let c = srv.path("c.img");
    let size = format!("{}", 8 * MIB);
    let mk = |name: &str| {
        run(ctl(&srv)
            .args(["volume", "create", name, "--size", &size, "--path"])
            .arg(&c))
    };
    assert!(mk("v4").status.success());
    let refused = mk("v5");
    assert!(!refused.status.success(), "v5 on v4's base accepted");
    run_ok(ctl(&srv).args(["volume", "delete", "v4"]));
    let start = Instant::now();
    loop {
        let out = mk("v5");
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the deleted volume kept its lock: {}",
            stderr_of(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----- item 7: descriptors and space of released deltas ---------------------------

/// The server's open descriptors: (count, how many name a deleted file, bytes those
/// deleted files hold on disk).
fn fds(pid: u32) -> (usize, usize, u64) {
    let dir = PathBuf::from(format!("/proc/{pid}/fd"));
    let (mut n, mut deleted, mut bytes) = (0, 0, 0);
    for e in std::fs::read_dir(&dir).expect("/proc/PID/fd") {
        let Ok(e) = e else { continue };
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        n += 1;
        if target.to_string_lossy().ends_with(" (deleted)") {
            deleted += 1;
            if let Ok(m) = std::fs::metadata(e.path()) {
                bytes += m.blocks() * 512;
            }
        }
    }
    (n, deleted, bytes)
}

/// Bytes allocated to the files in `dir` but `except`, with their names.
fn du(dir: &Path, except: &Path) -> (u64, Vec<(String, u64)>) {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("data dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path() != except)
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().ok()?,
            ))
        })
        .filter(|(_, m)| m.is_file())
        .map(|(n, m)| (n, m.blocks() * 512))
        .collect();
    files.sort();
    (files.iter().map(|f| f.1).sum(), files)
}

/// Issue #11 item 7: `DirStore` kept every delta's data file and journal open after
/// the release deleted them: 2 descriptors and the delta's space per cycle.
#[test]
fn backup_cycles_leak_no_descriptors_and_no_space() {
    let dir = tmpdir();
    let img = dir.path().join("v.img");
    let srv = Server::start_in(dir, &["--volume", &format!("v={},size=64M", img.display())]);
    let live = srv.uri("v");
    let pid = srv.child.id();
    let cycle = |i: usize| {
        let name = format!("b{i}");
        ctl_json(&srv, &["backup", "create", "v", &name]);
        // Different ranges each time: the reused delta file cannot hold them all.
        let off = (i as u64 % 8) * 4 * MIB;
        qemu_io(&live, false, &[w(i as u8, off, 2 * MIB), "flush".into()]);
        run_ok(ctl(&srv).args(["backup", "release", &format!("v@{name}")]));
        wait_gone(&srv, "v", &name);
    };
    // One cycle first: the steady state has a prepared delta and a warm commit path.
    cycle(0);
    // Transient descriptors (an RPC connection closing, a merge thread's
    // duplicates as it returns) come and go: take the count once it is steady.
    let steady = || {
        let start = Instant::now();
        let mut last = fds(pid);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = fds(pid);
            if now == last || start.elapsed() > Duration::from_secs(5) {
                return now;
            }
            last = now;
        }
    };
    let (n0, _, _) = steady();
    let (du0, files0) = du(srv.dir.path(), &img);
    for i in 1..=30 {
        cycle(i);
    }
    // Back to the start count (bounded wait); none of a deleted file.
    let start = Instant::now();
    let (n1, del1, held) = loop {
        let now = fds(pid);
        if (now.0, now.1) == (n0, 0) || start.elapsed() > Duration::from_secs(10) {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (du1, files1) = du(srv.dir.path(), &img);
    assert_eq!(
        (n1, del1),
        (n0, 0),
        "descriptors before/after 30 cycles: {n0} -> {n1}, {del1} of deleted files holding {held} bytes"
    );
    // Left: what was there at the start (the manifest, the volume list, the data
    // dir's lock) and the next backup's prepared delta, a reused file whose written space is one cycle's data plus the
    // zero-ahead window (`image`), not the sum of the cycles.
    let deltas = files1.iter().filter(|(n, _)| n.ends_with(".delta")).count();
    let journals = files1
        .iter()
        .filter(|(n, _)| n.ends_with(".journal"))
        .count();
    assert!(
        files1.len() == files0.len() && deltas == 1 && journals == 0 && du1 <= 16 * MIB,
        "data dir went from {du0} to {du1} bytes over 30 cycles: {files0:?} -> {files1:?}"
    );
    // What was written is still there.
    qemu_io(&live, false, &[rd(30, 6 * 4 * MIB, 2 * MIB)]);
}

// ----- item 8: a drain slower than its wait ---------------------------------------

/// Issue #11 item 8: a drain that hit its timeout left the old stack on the retired
/// list, the next drain freed it while a request was still pinned to it, and the
/// backup stayed `draining` forever. Here a write admitted before the switch is
/// held in flight (an injected delay) past the drain's wait; another backup is taken
/// meanwhile; then the write finishes.
#[test]
fn a_slow_drain_stays_draining_then_becomes_ready() {
    let dir = tmpdir();
    let img = dir.path().join("v.img");
    let log = std::fs::File::create(dir.path().join(STDERR_LOG)).expect("log");
    let mut srv = Server::start_in_with_stderr(
        dir,
        &["--volume", &format!("v={},size=16M", img.display())],
        log.into(),
    );
    let live = srv.uri("v");
    qemu_io(&live, false, &[w(0x11, 0, 4 * MIB)]);
    // An older backup, released while the slow drain is on (its merge drains too).
    ctl_json(&srv, &["backup", "create", "v", "old"]);
    qemu_io(&live, false, &[w(0x33, 2 * MIB, MIB)]);

    // The next write to [0, 64K) is held 8 s after it was admitted (pinned): long
    // enough for what follows on a loaded machine.
    call(
        &srv,
        "fault_inject",
        json!({"volume": "v", "op": "write", "offset": 0, "length": 65536, "count": 1,
               "delay_ms": 8000}),
    );
    let held = std::thread::spawn({
        let live = live.clone();
        move || qemu_io(&live, false, &[w(0x22, 0, 65536)])
    });
    let start = Instant::now();
    loop {
        let st = ctl_json(&srv, &["stats", "v"]);
        if st["volumes"][0]["faults_delayed"].as_u64() == Some(1) {
            break;
        }
        assert!(
            start.elapsed() < TOOL_TIMEOUT,
            "the write never arrived: {st}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // The drain's wait (200 ms) ends long before the held write: the backup stays
    // draining, and the RPC says so.
    let b1 = call(
        &srv,
        "backup_create",
        json!({"volume": "v", "name": "b1", "drain_wait_ms": 200}),
    );
    assert_eq!(b1["state"], "draining", "{b1}");
    assert!(b1["waiting_requests"].as_u64() >= Some(1), "{b1}");
    let listed = backup_entry(&srv, "v", "b1");
    assert_eq!(listed["state"], "draining", "{listed}");
    assert!(listed["waiting_requests"].as_u64() >= Some(1), "{listed}");
    // Another backup and a release, whose drains complete around the held write
    // (before the fix they freed its stack under it).
    let b2 = call(
        &srv,
        "backup_create",
        json!({"volume": "v", "name": "b2", "drain_wait_ms": 200}),
    );
    // It waits for the held write too: b2's image holds it (admitted before b2).
    assert_eq!(b2["state"], "draining", "{b2}");
    // The CLI says what it waits for.
    let table = run_ok(ctl(&srv).args(["backup", "list", "v"]));
    assert!(table.contains("draining (1 requests)"), "{table}");
    run_ok(ctl(&srv).args(["backup", "release", "v@old"]));
    // New writes go on meanwhile.
    qemu_io(&live, false, &[w(0x44, 8 * MIB, MIB)]);

    let out = held.join().expect("held writer");
    assert!(out.contains("wrote"), "{out}");
    let start = Instant::now();
    loop {
        let s1 = backup_entry(&srv, "v", "b1");
        let s2 = backup_entry(&srv, "v", "b2");
        if s1["state"] == "ready" && s2["state"] == "ready" {
            assert_eq!(s1["waiting_requests"], 0, "{s1}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "backups never became ready: {s1} {s2}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_gone(&srv, "v", "old");
    // The held write was admitted before both switches: both backups hold it; the
    // write after b2 is in neither.
    let expect = [
        rd(0x22, 0, 65536),
        rd(0x11, 65536, 2 * MIB - 65536),
        rd(0x33, 2 * MIB, MIB),
        rd(0, 8 * MIB, MIB),
    ];
    qemu_io(&srv.uri("v@b1"), true, &expect);
    qemu_io(&srv.uri("v@b2"), true, &expect);
    qemu_io(&live, false, &[rd(0x22, 0, 65536), rd(0x44, 8 * MIB, MIB)]);
    // Releases still work and the live volume keeps its bytes.
    for b in ["b1", "b2"] {
        run_ok(ctl(&srv).args(["backup", "release", &format!("v@{b}")]));
        wait_gone(&srv, "v", b);
    }
    qemu_io(
        &live,
        false,
        &[
            rd(0x22, 0, 65536),
            rd(0x33, 2 * MIB, MIB),
            rd(0x44, 8 * MIB, MIB),
        ],
    );
    // No panic anywhere (a freed stack under a pinned request asserts in debug).
    srv.assert_alive();
}
