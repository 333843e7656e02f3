//! Shared harness for integration tests: starts the real `ringblk` binary on a free
//! loopback port with a private data directory, and stops it (SIGTERM, then wait)
//! when dropped. Also runs real client tools with a bounded time.
#![allow(dead_code)] // each test binary uses a different subset

pub mod nbd;
pub mod vhost_target;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long any client tool may run before the test fails (liveness, not speed).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub rpc: PathBuf,
    pub stdout_lines: Vec<String>,
}

/// File in the data dir that [`Server::start_logged`] sends the server's stderr to.
pub const STDERR_LOG: &str = "server-stderr.log";

/// A temp dir on the real disk (O_DIRECT works there; /tmp may be tmpfs).
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir")
}

impl Server {
    /// `ringblk serve --listen 127.0.0.1:0 --data-dir <tmp> <extra...>`.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_in(tmpdir(), extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::start_in_with_stderr(dir, extra, Stdio::inherit())
    }

    /// Like [`Server::start`], but the server's stderr goes to a file that
    /// [`Server::stderr_log`] reads (to check that nothing panicked).
    pub fn start_logged(extra: &[&str]) -> Server {
        let dir = tmpdir();
        let log = std::fs::File::create(dir.path().join(STDERR_LOG)).expect("create stderr log");
        Self::start_in_with_stderr(dir, extra, Stdio::from(log))
    }

    /// The server's stderr so far (empty unless started with [`Server::start_logged`]).
    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(STDERR_LOG)).unwrap_or_default()
    }

    /// Panics unless the server is still running and its stderr shows no panic.
    pub fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("try_wait");
        let log = self.stderr_log();
        assert!(
            status.is_none(),
            "server exited ({status:?}); stderr:\n{log}"
        );
        assert!(!log.contains("panicked"), "server panicked; stderr:\n{log}");
    }

    pub fn start_in_with_stderr(dir: tempfile::TempDir, extra: &[&str], stderr: Stdio) -> Server {
        let bin = Path::new(env!("CARGO_BIN_EXE_ringblk"));
        match Server::try_start_with(bin, dir, extra, "warn", stderr) {
            Ok(srv) => srv,
            Err(failed) => panic!(
                "ringblk exited before serving ({}); output: {:?}",
                failed.status, failed.banner
            ),
        }
    }

    /// `BIN serve --listen 127.0.0.1:0 --data-dir <dir> --rpc <dir>/ringblk.sock
    /// <extra...>` with `RINGBLK_LOG=log_level` and its stderr to `stderr`. `Err` (with
    /// the data dir back) when it exits before serving.
    pub fn try_start_with(
        bin: &Path,
        dir: tempfile::TempDir,
        extra: &[&str],
        log_level: &str,
        stderr: Stdio,
    ) -> Result<Server, Failed> {
        let rpc = dir.path().join("ringblk.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path())
            .arg("--rpc")
            .arg(&rpc)
            .args(extra)
            .env("RINGBLK_LOG", log_level)
            .stderr(stderr);
        match spawn_until_banner(cmd) {
            Ok((child, lines)) => Ok(Server {
                child,
                port: banner_port(&lines).expect("banner names the port"),
                dir,
                rpc,
                stdout_lines: lines,
            }),
            Err((status, banner)) => Err(Failed {
                dir,
                status,
                banner,
            }),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Stops the server (SIGTERM, or SIGKILL when `kill9`) and starts a new one in
    /// the same data dir with `extra` arguments (recovery).
    pub fn restart(self, kill9: bool, extra: &[&str]) -> Server {
        Server::start_in(self.stop_keep_dir(kill9), extra)
    }

    /// Stops the server (SIGTERM, or SIGKILL when `kill9`) and hands back its data
    /// dir (for offline checks; `start_in` serves it again).
    pub fn stop_keep_dir(mut self, kill9: bool) -> tempfile::TempDir {
        if kill9 {
            let _ = self.child.kill();
            let _ = self.child.wait();
        } else {
            let st = self.terminate();
            assert!(st.success(), "graceful stop failed: {st}");
        }
        std::mem::replace(&mut self.dir, tmpdir())
    }

    /// Stops the server with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A server that exited before it served: its data dir, exit status and output.
pub struct Failed {
    pub dir: tempfile::TempDir,
    pub status: ExitStatus,
    pub banner: Vec<String>,
}

/// Spawns `cmd` (a `ringblk serve`; its stdout is taken here) and reads its banner, which
/// ends with the qemu-img line (or the exports list when none). `Ok`: the running child
/// and the banner lines; from then on a thread drains stdout so the server never blocks
/// on a full pipe. `Err`: the process exited before serving; its status and output.
pub fn spawn_until_banner(
    mut cmd: Command,
) -> Result<(Child, Vec<String>), (ExitStatus, Vec<String>)> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn ringblk");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stdout);
    loop {
        let mut line = String::new();
        // A read error is the end of the output too: the child is reaped below.
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            let status = child.wait().expect("wait");
            return Err((status, lines));
        }
        let last = line.trim_start().starts_with("qemu-img info");
        lines.push(line.trim_end().to_string());
        if last {
            break;
        }
    }
    std::thread::spawn(move || {
        let mut sink = String::new();
        while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    Ok((child, lines))
}

/// The port of the banner's `listening on 127.0.0.1:PORT` line.
pub fn banner_port(lines: &[String]) -> Option<u16> {
    lines.iter().find_map(|line| {
        let rest = line.split("listening on 127.0.0.1:").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// One JSON-RPC call on the server's socket, bounded by [`TOOL_TIMEOUT`]; the whole
/// response object (callers assert on `result` or `error`).
pub fn rpc_call(srv: &Server, method: &str, params: serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(&srv.rpc)
        .unwrap_or_else(|e| panic!("connect {}: {e}", srv.rpc.display()));
    s.set_read_timeout(Some(TOOL_TIMEOUT)).expect("timeout");
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(s, "{req}").expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("rpc reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {e}: {line:?}"))
}

/// Runs a command with a time bound; returns its output (never panics on a non-zero
/// exit: callers assert on what they expect).
pub fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd:?}: {e} (ci/test.sh installs the client tools)")
        });
    // Drain both pipes while waiting: a tool that writes more than a pipe buffer
    // (64 KiB) before exiting would otherwise block on the write and time out.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Output {
                status,
                stdout: stdout.join().expect("stdout reader"),
                stderr: stderr.join().expect("stderr reader"),
            };
        }
        if start.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} timed out; stderr: {}",
                String::from_utf8_lossy(&stderr.join().expect("stderr reader"))
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// Runs and requires success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's python3 (python3-libnbd is installed for it; another python3 may be first on PATH).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn ctl(server: &Server) -> Command {
    // ringblk-ctl is built by the workspace; find it next to the test's ringblk binary.
    let bin = Path::new(env!("CARGO_BIN_EXE_ringblk"))
        .parent()
        .expect("bin dir")
        .join("ringblk-ctl");
    let mut c = Command::new(bin);
    c.arg("--rpc").arg(&server.rpc);
    c
}

/// nbdsh under Debian's python3 (the `nbdsh` script runs whatever `python3` is first
/// on PATH, which may lack the nbd module).
pub fn nbdsh() -> Command {
    let mut c = Command::new(SYSTEM_PYTHON);
    c.args(["-m", "nbd"]);
    c
}
