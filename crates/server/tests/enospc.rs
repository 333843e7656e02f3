//! A real full disk: the data dir is a 64 MiB tmpfs, the base image (256 MiB) is on
//! the real disk, and a backup sends every write into a delta on the tmpfs until it
//! fills up. The client (python3-libnbd) must get ENOSPC, never EIO; every
//! acknowledged write must still read back, from another connection too; once space
//! is freed, writes and FLUSH succeed again, and that FLUSH makes everything durable
//! (checked across a kill -9).
//!
//! Guards against: ENOSPC mapped to EIO; a failed fill that is acknowledged or
//! corrupts a neighbour; a FLUSH that claims success while the journal could not be
//! written; and failed fills using up the delta's allocator, which made a client that
//! retried on the full disk see ENOSPC forever, even after space was freed.
//!
//! Runs as root (CI does): mounting the tmpfs needs it. It does not skip itself: a
//! failed mount fails the test, with the reason.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const M: u64 = 1 << 20;
const VOLUME_BYTES: u64 = 256 * M;
const FILLER_BYTES: usize = 8 << 20;
/// Failed 1 MiB writes after the disk is full: 250 × 256 failed chunk fills are
/// more than the delta's 65536 chunks less the ~14400 in use, so leaking one chunk
/// per failed fill would exhaust its allocator.
const RETRIES: u32 = 250;

/// A tmpfs mounted on `path` for the guard's lifetime (unmounted on drop, also when
/// the test fails).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        // mode=0700: a tmpfs root is 1777 by default, and the server refuses an RPC
        // socket (it lives in the data directory) in a directory others can write.
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs -o size={size},mode=0700 on {} failed ({}): {}\n\
             this test needs root (CI runs it as root) and does not skip itself",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a server that did not exit): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The client, in phases (one run each): `base` writes the base image's last MiB
/// before the backup; `fill` writes distinct data until the disk is full, retries,
/// tries a FLUSH, verifies on a second connection; `after` (space freed) flushes,
/// writes and verifies; `verify` verifies only. Every 4 KiB block written holds
/// (offset, generation) repeated, so misplaced or stale data is caught. The
/// acknowledged writes are kept in the state file between phases.
const CLIENT: &str = r#"
import errno, json, os, struct, sys
import nbd
phase, uri, state_path = sys.argv[1:4]
M, B, W = 1 << 20, 4096, 256 << 10
SIZE = int(sys.argv[4])
st = json.load(open(state_path)) if os.path.exists(state_path) else {"acked": []}
out = {}

def name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e.errno, int) else e.errno

def block(off, gen):
    return struct.pack("<QQ", off, gen) * (B // 16)

def data(off, n, gen):
    return b"".join(block(off + i, gen) for i in range(0, n, B))

def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h

def write(h, off, n, gen):
    """Returns None when acknowledged (and records it), else the errno name."""
    try:
        h.pwrite(data(off, n, gen), off)
    except nbd.Error as e:
        return name(e)
    st["acked"].append([off, n, gen])
    return None

def flush(h):
    try:
        h.flush()
        return "ok"
    except nbd.Error as e:
        return name(e)

def expected():
    want = {}
    for off, n, gen in st["acked"]:
        for b in range(off, off + n, B):
            want[b] = gen
    return want

def verify(h):
    """Reads back every acknowledged block (1 MiB at a time); returns mismatches."""
    want, bad = expected(), []
    for start in sorted({b - b % M for b in want}):
        got = h.pread(M, start)
        for b in range(start, start + M, B):
            if b in want and got[b - start:b - start + B] != block(b, want[b]):
                bad.append(b)
    return {"blocks": len(want), "bad": bad[:10], "bad_count": len(bad)}

if phase == "base":
    h = connect()
    out["write"] = write(h, SIZE - M, M, 1)
    out["flush"] = flush(h)
elif phase == "fill":
    h, h2 = connect(), connect()
    off = 0
    while off + W <= SIZE - M:
        err = write(h, off, W, 2)
        if err:
            out["first_error"], out["failed_at"] = err, off
            break
        off += W
    out["filled_bytes"] = off
    # A client retrying on the full disk, just past the failed write: 1 MiB of
    # chunks no delta holds, so every one is a new fill.
    errs = {}
    for _ in range(int(sys.argv[5])):
        e = write(h, off + M, M, 3) or "acknowledged"
        errs[e] = errs.get(e, 0) + 1
    out["retry_results"] = errs
    out["flush_full"] = flush(h)
    # The same connection still reads; the second one verifies everything.
    out["read_after_error"] = h.pread(B, 0) == block(0, 2)
    out["verify"] = verify(h2)
    # The failed ranges hold, per block, zeros (the base) or one of the versions
    # written there: never anything else.
    got = h2.pread(2 * M, off)
    odd = [b for b in range(0, 2 * M, B)
           if got[b:b + B] not in (bytes(B), block(off + b, 2), block(off + b, 3))]
    out["failed_range_odd_blocks"] = len(odd)
    st["failed_at"] = off
elif phase == "after":
    h, h2 = connect(), connect()
    out["flush_first"] = flush(h)
    off = st["failed_at"]
    out["writes"] = [write(h, off, M, 4), write(h, off + M, 2 * M, 4),
                     write(h2, 0, W, 5)]
    out["flush"] = flush(h)
    out["verify"] = verify(h2)
elif phase == "verify":
    out["verify"] = verify(connect())
json.dump(st, open(state_path, "w"))
print(json.dumps(out))
"#;

fn client(srv: &Server, phase: &str, state: &Path) -> Value {
    let out = run_ok(Command::new(SYSTEM_PYTHON).args([
        "-c",
        CLIENT,
        phase,
        &srv.uri("v"),
        state.to_str().expect("utf-8 path"),
        &VOLUME_BYTES.to_string(),
        &RETRIES.to_string(),
    ]));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{phase}: {e}: {out}"))
}

#[track_caller]
fn assert_verified(result: &Value, min_blocks: u64) {
    let v = &result["verify"];
    assert_eq!(v["bad_count"], 0, "acknowledged data changed: {result}");
    assert!(
        v["blocks"].as_u64().unwrap_or(0) >= min_blocks,
        "too little verified: {result}"
    );
}

fn ctl_json(srv: &Server, args: &[&str]) -> Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

fn start(data: tempfile::TempDir, spec: &str, log: &Path) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("server log");
    Server::start_in_with_stderr(data, &["--volume", spec], Stdio::from(log))
}

#[track_caller]
fn assert_no_panic(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!text.contains("panicked"), "server panicked:\n{text}");
}

#[test]
fn a_full_delta_gives_enospc_and_recovers_when_space_is_freed() {
    // The base image and everything the test keeps live on the real disk.
    let disk = tmpdir();
    let state = disk.path().join("client-state.json");
    let log = disk.path().join("server-stderr.log");
    let spec = format!(
        "v={},size={}",
        disk.path().join("v.img").display(),
        VOLUME_BYTES
    );
    // Declared before the server: dropped after it (unmount once it has exited).
    let data = tmpdir();
    let _tmpfs = Tmpfs::mount(data.path(), "64m");
    let filler = data.path().join("filler");
    std::fs::write(&filler, vec![0xa5u8; FILLER_BYTES]).expect("write the filler");
    let srv = start(data, &spec, &log);

    let r = client(&srv, "base", &state);
    assert!(r["write"].is_null() && r["flush"] == "ok", "{r}");
    let made = ctl_json(&srv, &["backup", "create", "v", "b1"]);
    assert_eq!(made["state"], "ready", "{made}");

    let r = client(&srv, "fill", &state);
    eprintln!("full disk: {r}");
    assert_eq!(r["first_error"], "ENOSPC", "a full disk is ENOSPC: {r}");
    let filled = r["filled_bytes"].as_u64().expect("filled_bytes");
    assert!(
        (16 * M..(64 * M - FILLER_BYTES as u64)).contains(&filled),
        "the tmpfs, less the filler, bounds what fits: {r}"
    );
    assert_eq!(
        r["retry_results"],
        serde_json::json!({ "ENOSPC": RETRIES }),
        "every retry on the full disk is ENOSPC: {r}"
    );
    // FLUSH cannot write the journal of the acknowledged fills: it must fail, and
    // with ENOSPC (the cause, which the client can act on), never claim success.
    assert_eq!(r["flush_full"], "ENOSPC", "{r}");
    assert_eq!(r["read_after_error"], true, "{r}");
    assert_verified(&r, filled / 4096);
    assert_eq!(r["failed_range_odd_blocks"], 0, "{r}");
    let stats = ctl_json(&srv, &["stats", "v"]);
    let errors = stats["volumes"][0]["errors"].as_u64().expect("errors");
    assert!(
        errors > u64::from(RETRIES),
        "failed requests are counted: {stats}"
    );
    assert_no_panic(&log);

    // Free space: writes and FLUSH succeed again.
    std::fs::remove_file(&filler).expect("remove the filler");
    let r = client(&srv, "after", &state);
    eprintln!("space freed: {r}");
    assert_eq!(r["flush_first"], "ok", "{r}");
    assert_eq!(
        r["writes"],
        serde_json::json!([null, null, null]),
        "writes succeed once space is free: {r}"
    );
    assert_eq!(r["flush"], "ok", "{r}");
    assert_verified(&r, filled / 4096 + 3 * M / 4096);
    assert_no_panic(&log);

    // The FLUSH after the failed one made every acknowledged write durable.
    let srv = srv.restart(true, &["--volume", &spec]);
    let r = client(&srv, "verify", &state);
    assert_verified(&r, filled / 4096 + 3 * M / 4096);
    drop(srv);
    assert_no_panic(&log);
}
