//! Shared by the integration tests: the real `ringblk` server on a loopback port and
//! the `ringblk-bench` binary under test.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub fn bench_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringblk-bench")
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

/// The server binary next to the bench binary (same target dir and profile), built
/// on first use when missing.
pub fn server_bin() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let bench = Path::new(bench_bin());
    let dir = bench.parent().expect("bench binary has a directory");
    let bin = dir.join("ringblk");
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !bin.exists() {
        // target/<profile>/ringblk-bench: the target dir is two levels up.
        let target_dir = dir.parent().expect("profile dir has a parent");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "ringblk-server", "--bin", "ringblk"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build of the ringblk server failed");
    }
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

/// A running `ringblk serve`, stopped with SIGTERM on drop.
pub struct Server {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Server {
    /// One `mem` volume `v` of 256 MiB on 127.0.0.1 and a free port.
    pub fn start() -> Server {
        Server::start_with(&["--listen", "127.0.0.1:0"])
    }

    pub fn start_with(listen: &[&str]) -> Server {
        let dir = tmpdir();
        let stderr = std::fs::File::create(dir.path().join("server.log")).expect("log file");
        let mut child = Command::new(server_bin())
            .arg("serve")
            .args(listen)
            .arg("--data-dir")
            .arg(dir.path())
            // Its own control socket: the default is host-wide (/run/ringblk), and
            // these tests run servers side by side.
            .arg("--rpc")
            .arg(dir.path().join("ringblk.sock"))
            .args(["--volume", "v=,backend=mem,size=256M"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start ringblk");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Keep draining stdout after the banner so the server never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let port = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains("listening on") => {
                    let after = line.split("listening on ").nth(1).expect("address");
                    let addr = after.split_whitespace().next().expect("address");
                    break addr
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let log =
                        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                    panic!("ringblk printed no banner within 30 s; its log:\n{log}");
                }
            }
        };
        Server { child, port, dir }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/v", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Our own child, not reaped yet: the pid cannot have been reused.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ringblk-bench` with `args`; never hangs past two minutes.
pub fn bench(args: &[&str]) -> Output {
    let child = Command::new(bench_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringblk-bench");
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("ringblk-bench output"),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            panic!("ringblk-bench {args:?} did not finish in 120 s");
        }
    }
}

/// Runs and asserts the exit status; returns stdout.
pub fn bench_ok(args: &[&str], code: i32) -> String {
    let out = bench(args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "ringblk-bench {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

pub fn json(args: &[&str], code: i32) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let s = bench_ok(&a, code);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}
