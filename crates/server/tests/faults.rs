//! Injected disk errors (`fault_inject`, like SPDK's error bdev) seen by a real
//! client, python3-libnbd: EIO and ENOSPC reach the client on the matching requests
//! only, a failed write is neither acknowledged nor applied, other requests and
//! connections go on, and the server keeps serving. Run on the base fast path (no
//! backup) and on the layered path (a backup present).
//!
//! Guards against: an error that kills the connection or the server, an error
//! reported on the wrong request, a failed write that still lands, and a mapping of
//! ENOSPC to EIO.

mod common;
use common::*;
use serde_json::{json, Value};
use std::process::Command;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

/// Runs a plan of NBD requests with libnbd, on numbered connections to one export
/// (opened on first use, all open until the end), and prints one result per step:
/// `{"ok": true, "fill": B}` for a read whose bytes are all B (-1 if they differ),
/// `{"ok": true}` for other requests, `{"ok": false, "errno": "EIO"}` on an error.
const STEPS: &str = r#"
import errno, json, sys
import nbd
uri, plan = sys.argv[1], json.loads(sys.argv[2])
conns = {}
def conn(i):
    if i not in conns:
        h = nbd.NBD()
        h.connect_uri(uri)
        conns[i] = h
    return conns[i]
def name(e):
    # libnbd gives the errno's name ('EIO'); older versions a number.
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e.errno, int) else e.errno
out = []
for s in plan:
    h = conn(s.get("conn", 0))
    op = s["op"]
    try:
        if op == "read":
            b = h.pread(s["len"], s["off"])
            out.append({"ok": True, "fill": b[0] if b.count(b[0:1]) == len(b) else -1})
            continue
        if op == "write":
            h.pwrite(bytes([s["fill"]]) * s["len"], s["off"])
        elif op == "zero":
            h.zero(s["len"], s["off"])
        elif op == "flush":
            h.flush()
        else:
            raise SystemExit("unknown op " + op)
        out.append({"ok": True})
    except nbd.Error as e:
        out.append({"ok": False, "errno": name(e)})
for h in conns.values():
    h.shutdown()
print(json.dumps(out))
"#;

fn rd(conn: u8, off: u64, len: u64) -> Value {
    json!({"conn": conn, "op": "read", "off": off, "len": len})
}

fn wr(conn: u8, off: u64, len: u64, fill: u8) -> Value {
    json!({"conn": conn, "op": "write", "off": off, "len": len, "fill": fill})
}

fn zero(conn: u8, off: u64, len: u64) -> Value {
    json!({"conn": conn, "op": "zero", "off": off, "len": len})
}

fn flush(conn: u8) -> Value {
    json!({"conn": conn, "op": "flush"})
}

/// What a step must give: data of one byte value, success, or an errno.
#[derive(Clone, Copy, Debug)]
enum Want {
    Fill(u8),
    Ok,
    Err(&'static str),
}

/// Runs `plan` (pairs of step and expected result) on `export` and checks every
/// result, reporting all mismatches at once.
fn expect(srv: &Server, export: &str, plan: &[(Value, Want)]) {
    let steps: Vec<&Value> = plan.iter().map(|(s, _)| s).collect();
    let out = run_ok(Command::new(SYSTEM_PYTHON).args([
        "-c",
        STEPS,
        &srv.uri(export),
        &serde_json::to_string(&steps).expect("plan"),
    ]));
    let got: Vec<Value> = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(got.len(), plan.len(), "{out}");
    let bad: Vec<String> = plan
        .iter()
        .zip(&got)
        .filter(|((_, want), got)| !matches(*want, got))
        .map(|((step, want), got)| format!("{step}: want {want:?}, got {got}"))
        .collect();
    assert!(bad.is_empty(), "on {export}:\n{}", bad.join("\n"));
}

fn matches(want: Want, got: &Value) -> bool {
    match want {
        Want::Fill(b) => got["ok"] == true && got["fill"] == b,
        Want::Ok => got["ok"] == true,
        Want::Err(e) => got["ok"] == false && got["errno"] == e,
    }
}

fn ctl_json(srv: &Server, args: &[&str]) -> Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {out}"))
}

fn stats(srv: &Server) -> Value {
    ctl_json(srv, &["stats", "v"])["volumes"][0].clone()
}

/// A file volume `v` of 64 MiB on the real disk; the image dir must outlive it.
fn start() -> (Server, tempfile::TempDir) {
    let images = tmpdir();
    let spec = format!("v={},size=64M", images.path().join("v.img").display());
    (Server::start_logged(&["--volume", &spec]), images)
}

const EIO: Want = Want::Err("EIO");
const ENOSPC: Want = Want::Err("ENOSPC");

#[test]
fn injected_read_and_write_errors_fail_only_those_requests() {
    use Want::{Fill, Ok};
    let (mut srv, _images) = start();
    expect(
        &srv,
        "v",
        &[
            (wr(0, 0, M, 0x11), Ok),
            (wr(0, M, M, 0x22), Ok),
            (wr(0, 2 * M, M, 0x33), Ok),
            (flush(0), Ok),
            // Negative control: without a rule this very read succeeds, so the EIO
            // below comes from the injection and the check is not vacuous.
            (rd(0, M, 4 * K), Fill(0x22)),
        ],
    );
    // A later step expecting EIO for this read would fail: prove the helper can.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        expect(&srv, "v", &[(rd(0, M, 4 * K), EIO)])
    }));
    assert!(
        caught.is_err(),
        "an expected EIO that did not happen must fail"
    );

    // Reads of [1M, 1M+64K): three fail, then the rule is used up.
    let armed = ctl_json(
        &srv,
        &[
            "fault", "inject", "v", "--op", "read", "--offset", "1M", "--length", "64K", "--count",
            "3",
        ],
    );
    assert_eq!(armed["rule"]["length"], 64 * K);
    expect(
        &srv,
        "v",
        &[
            (rd(0, M, 4 * K), EIO),
            // Another connection, outside the range: the right bytes.
            (rd(1, 0, 4 * K), Fill(0x11)),
            // Overlapping the range's end, from the other connection: fails.
            (rd(1, M + 60 * K, 8 * K), EIO),
            // The failing connection goes on outside the range; writes are not
            // matched by a read rule.
            (rd(0, 2 * M, 64 * K), Fill(0x33)),
            (wr(0, M + 128 * K, 4 * K, 0x22), Ok),
            // Overlapping the range's start: the third and last failure.
            (rd(0, M - 4 * K, 8 * K), EIO),
            (rd(0, M, 64 * K), Fill(0x22)),
            (rd(1, M, 4 * K), Fill(0x22)),
        ],
    );
    let st = stats(&srv);
    assert_eq!(st["faults_injected"], 3, "{st}");
    assert_eq!(st["errors"], 3, "injected errors are counted: {st}");
    assert_eq!(st["fault_rules"], json!([]), "a used-up rule goes: {st}");

    // A write that fails is never applied: the old data stays.
    ctl_json(
        &srv,
        &[
            "fault", "inject", "v", "--op", "write", "--offset", "2M", "--length", "4K",
        ],
    );
    expect(
        &srv,
        "v",
        &[
            (wr(0, 2 * M, 4 * K, 0x44), EIO),
            (rd(0, 2 * M, 4 * K), Fill(0x33)),
            (wr(1, 2 * M + 4 * K, 4 * K, 0x55), Ok),
            (wr(0, 2 * M, 4 * K, 0x44), Ok),
            (rd(1, 2 * M, 4 * K), Fill(0x44)),
            (rd(1, 2 * M + 4 * K, 4 * K), Fill(0x55)),
        ],
    );

    // ENOSPC until cleared (count 0); WRITE_ZEROES counts as a write.
    ctl_json(
        &srv,
        &[
            "fault", "inject", "v", "--op", "write", "--errno", "ENOSPC", "--offset", "3M",
            "--length", "1M", "--count", "0",
        ],
    );
    let mut plan = vec![];
    for _ in 0..5 {
        plan.push((wr(0, 3 * M, 4 * K, 0x66), ENOSPC));
    }
    plan.extend([
        (zero(1, 3 * M + 64 * K, 4 * K), ENOSPC),
        (rd(0, 3 * M, 4 * K), Fill(0)),
        (wr(0, 4 * M, 4 * K, 0x77), Ok),
    ]);
    expect(&srv, "v", &plan);
    let cleared = ctl_json(&srv, &["fault", "clear", "v"]);
    assert_eq!(cleared["cleared"], 1);
    expect(
        &srv,
        "v",
        &[
            (wr(0, 3 * M, 4 * K, 0x66), Ok),
            (rd(0, 3 * M, 4 * K), Fill(0x66)),
        ],
    );

    // FLUSH, then `any` (every kind of request) twice.
    ctl_json(&srv, &["fault", "inject", "v", "--op", "flush"]);
    expect(&srv, "v", &[(flush(0), EIO), (flush(0), Ok)]);
    ctl_json(
        &srv,
        &[
            "fault", "inject", "v", "--op", "any", "--offset", "10M", "--count", "2",
        ],
    );
    expect(
        &srv,
        "v",
        &[
            (rd(0, 10 * M, 4 * K), EIO),
            (wr(0, 10 * M, 4 * K, 0x88), EIO),
            (rd(0, 10 * M, 4 * K), Fill(0)),
        ],
    );

    // Everything written and acknowledged reads back; the server is alive.
    expect(
        &srv,
        "v",
        &[
            (rd(0, 0, M), Fill(0x11)),
            (rd(0, M, M), Fill(0x22)),
            (rd(0, 2 * M, 4 * K), Fill(0x44)),
            (rd(0, 2 * M + 4 * K, 4 * K), Fill(0x55)),
            (rd(0, 2 * M + 8 * K, M - 8 * K), Fill(0x33)),
            (rd(0, 3 * M, 4 * K), Fill(0x66)),
            (rd(0, 4 * M, 4 * K), Fill(0x77)),
        ],
    );
    let st = stats(&srv);
    assert_eq!(st["faults_injected"], 3 + 1 + 6 + 1 + 2, "{st}");
    assert_eq!(st["layered_ops"], 0, "no backup: the base fast path: {st}");
    srv.assert_alive();
}

#[test]
fn injected_errors_on_the_layered_path_with_a_backup() {
    use Want::{Fill, Ok};
    let (mut srv, _images) = start();
    expect(
        &srv,
        "v",
        &[(wr(0, 0, M, 0x11), Ok), (wr(0, M, M, 0x22), Ok)],
    );
    ctl_json(&srv, &["backup", "create", "v", "b1"]);
    // Into the backup's delta: a fill of chunks the delta does not hold yet.
    expect(
        &srv,
        "v",
        &[(wr(0, 0, 64 * K, 0x33), Ok), (rd(0, 0, 4 * K), Fill(0x33))],
    );
    let before = stats(&srv)["layered_ops"].as_u64().expect("layered_ops");

    ctl_json(
        &srv,
        &[
            "fault", "inject", "v", "--op", "read", "--length", "64K", "--count", "0",
        ],
    );
    expect(
        &srv,
        "v",
        &[
            (rd(0, 0, 4 * K), EIO),
            (rd(1, M, 4 * K), Fill(0x22)),
            (rd(0, 60 * K, 4 * K), EIO),
        ],
    );
    // Rules cover the volume's backup exports too: they read the same files.
    expect(
        &srv,
        "v@b1",
        &[(rd(0, 0, 4 * K), EIO), (rd(0, M, 4 * K), Fill(0x22))],
    );
    ctl_json(&srv, &["fault", "clear", "v"]);
    expect(&srv, "v", &[(rd(0, 0, 4 * K), Fill(0x33))]);
    expect(&srv, "v@b1", &[(rd(0, 0, 4 * K), Fill(0x11))]);

    // A failed fill (a chunk the delta does not hold) and a failed in-place write (a
    // chunk it holds) are not applied; neighbours are.
    ctl_json(
        &srv,
        &[
            "fault", "inject", "v", "--op", "write", "--offset", "1M", "--length", "4K",
        ],
    );
    ctl_json(
        &srv,
        &["fault", "inject", "v", "--op", "write", "--length", "4K"],
    );
    expect(
        &srv,
        "v",
        &[
            (wr(0, M, 4 * K, 0x44), EIO),
            (wr(1, 0, 4 * K, 0x55), EIO),
            (rd(0, M, 4 * K), Fill(0x22)),
            (rd(1, 0, 4 * K), Fill(0x33)),
            (wr(0, M + 4 * K, 4 * K, 0x66), Ok),
            (wr(0, M, 4 * K, 0x44), Ok),
            (wr(1, 0, 4 * K, 0x55), Ok),
            (flush(0), Ok),
            (rd(0, M, 4 * K), Fill(0x44)),
            (rd(0, M + 4 * K, 4 * K), Fill(0x66)),
            (rd(0, 0, 4 * K), Fill(0x55)),
            (rd(0, 4 * K, 60 * K), Fill(0x33)),
        ],
    );
    // The backup never saw any of it.
    expect(
        &srv,
        "v@b1",
        &[(rd(0, 0, M), Fill(0x11)), (rd(0, M, M), Fill(0x22))],
    );
    let st = stats(&srv);
    let after = st["layered_ops"].as_u64().expect("layered_ops");
    assert!(after > before, "requests took the layered path: {st}");
    assert_eq!(st["faults_injected"], 3 + 2, "{st}");
    srv.assert_alive();
}
