//! The first five minutes of a new user: `ringblk serve` with no arguments in an empty
//! directory, then the two commands its banner suggests, run as printed.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEFAULT_PORT: u16 = 10809;
/// Liveness bound for start-up and for the stop after SIGTERM (not a speed check).
const BOUND: Duration = Duration::from_secs(30);

/// Kills the server if the test fails before stopping it.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn sigterm(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
}

/// Splits a printed command line the way a shell would for these plain words.
fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn serve_with_no_arguments_then_run_the_banner_commands() {
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", DEFAULT_PORT)) {
        panic!(
            "127.0.0.1:{DEFAULT_PORT} (the NBD port `ringblk serve` uses by default) is busy on this machine \
             ({e}); stop whatever listens there (another ringblk, nbd-server, qemu-nbd, nbdkit) and rerun"
        );
    }
    let cwd = tmpdir();
    assert!(
        std::fs::read_dir(cwd.path()).expect("cwd").next().is_none(),
        "cwd starts empty"
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .arg("serve")
        .current_dir(cwd.path())
        .env_remove("RINGBLK_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringblk serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let mut guard = Guard(Some(child));

    // The banner, line by line, on a thread (so a silent server cannot hang the test);
    // then keep draining both pipes so the server never blocks on a full one.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            let _ = tx.send(line.trim_end().to_string());
            line.clear();
        }
    });
    let (etx, erx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        let _ = etx.send(all);
    });
    let mut banner = Vec::new();
    let start = Instant::now();
    loop {
        let left = BOUND.checked_sub(start.elapsed()).unwrap_or_default();
        match rx.recv_timeout(left) {
            Ok(l) => {
                let last = l.trim_start().starts_with("qemu-img ");
                banner.push(l);
                if last {
                    break;
                }
            }
            Err(_) => {
                drop(guard);
                panic!(
                    "no complete banner within {BOUND:?}: {banner:?}\nstderr: {}",
                    erx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
                );
            }
        }
    }
    let text = banner.join("\n");
    assert!(
        text.contains(&format!("listening on 127.0.0.1:{DEFAULT_PORT}")),
        "{text}"
    );
    assert!(text.contains("vol0"), "{text}");

    // The default volume: ./ringblk-data/vol0.img, 1 GiB, created sparse.
    let data = cwd.path().join("ringblk-data");
    let img = data.join("vol0.img");
    let meta = std::fs::metadata(&img).unwrap_or_else(|e| panic!("{}: {e}\n{text}", img.display()));
    assert_eq!(meta.len(), 1 << 30, "vol0.img is 1 GiB");
    let allocated = meta.blocks() * 512;
    assert!(
        allocated < 1 << 20,
        "vol0.img must be created sparse, but {allocated} bytes are allocated"
    );
    // The RPC socket: at the absolute default ringblk-ctl looks at too (#17; it was
    // ./ringblk-data/ringblk.sock), owner-only.
    let sock = ringblk_target::spec::default_rpc_socket(
        nix::unistd::geteuid().as_raw(),
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
    )
    .expect("root or XDG_RUNTIME_DIR");
    let smeta = std::fs::metadata(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    assert!(
        smeta.file_type().is_socket(),
        "{} is not a socket",
        sock.display()
    );
    assert_eq!(smeta.permissions().mode() & 0o777, 0o600, "RPC socket mode");

    // The printed fio line, run as printed, except --runtime=10 -> --runtime=2 to keep
    // CI fast.
    let fio_line = banner
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("fio "))
        .unwrap_or_else(|| panic!("no fio line in the banner:\n{text}"));
    let mut fio = words(fio_line);
    for w in fio.iter_mut() {
        if w.starts_with("--runtime=") {
            *w = "--runtime=2".into();
        }
    }
    assert!(fio.iter().any(|w| w == "--ioengine=nbd"), "{fio_line}");
    let work = tmpdir(); // wherever fio might leave files
    let out = run_ok(
        Command::new(&fio[0])
            .args(&fio[1..])
            .current_dir(work.path()),
    );
    assert!(out.contains("err= 0"), "fio reported an error:\n{out}");

    // The printed qemu-img line, exactly as printed.
    let qemu_line = banner
        .iter()
        .map(|l| l.trim())
        .find(|l| l.starts_with("qemu-img "))
        .expect("qemu-img line");
    let q = words(qemu_line);
    let out = run_ok(Command::new(&q[0]).args(&q[1..]).current_dir(work.path()));
    assert!(
        out.contains("virtual size: 1 GiB (1073741824 bytes)"),
        "{out}"
    );

    // A backup cycle with the relative default data dir, as a new user would run it
    // from the same directory: ringblk-ctl's default socket, a flushed write on top of
    // the backup, and a release that merges it down.
    let ctl_bin = std::path::Path::new(env!("CARGO_BIN_EXE_ringblk"))
        .parent()
        .expect("bin dir")
        .join("ringblk-ctl");
    let ctl = |args: &[&str]| run_ok(Command::new(&ctl_bin).args(args).current_dir(cwd.path()));
    ctl(&["backup", "create", "vol0", "first"]);
    let uri = format!("nbd://127.0.0.1:{DEFAULT_PORT}/vol0");
    let qemu_io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run_ok(c.arg(&uri).current_dir(work.path()))
    };
    let out = qemu_io(&["write -P 0x5a 1M 1M", "flush"]);
    assert!(
        !out.contains("failed"),
        "write + flush over a backup: {out}"
    );
    ctl(&["backup", "release", "vol0@first"]);
    let start = Instant::now();
    loop {
        let list = ctl(&["backup", "list", "vol0"]);
        if !list.contains("vol0@first") {
            break;
        }
        assert!(
            start.elapsed() < BOUND,
            "the release did not finish within {BOUND:?}: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = qemu_io(&["read -P 0x5a 1M 1M"]);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "{out}"
    );

    // Negative control: a second zero-config server in the same directory cannot take
    // the data dir (locked before the port is tried), says who holds it and exits
    // non-zero, and the first one keeps serving.
    let second = run(Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .arg("serve")
        .current_dir(cwd.path()));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second server on the same port must fail"
    );
    let first_pid = guard.0.as_ref().expect("child").id().to_string();
    assert!(
        err.contains("ringblk-data") && err.contains("in use") && err.contains(&first_pid),
        "the failure must name the data dir and its holder's pid: {err}"
    );
    assert!(
        sock.exists(),
        "the second server must not remove the first one's RPC socket"
    );
    run_ok(Command::new(&q[0]).args(&q[1..]));

    // SIGTERM: a clean exit (status 0) within the bound, socket removed.
    let mut child = guard.0.take().expect("child");
    sigterm(&child);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringblk did not exit within {BOUND:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = erx.recv_timeout(BOUND).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\nstderr: {log}"
    );
    assert!(!sock.exists(), "the RPC socket is removed on exit");
    assert!(img.exists(), "the volume stays");
}
