//! Issue #11: no client can exhaust the server.
//!
//! - 14: `x-ringblk:changed/NAME` is bound to the backup it was selected for, not to
//!   whichever backup carries that name later.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Liveness bound on waiting for the server to act. Never a speed assertion.
const IO_BOUND: Duration = Duration::from_secs(60);

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
