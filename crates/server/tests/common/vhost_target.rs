//! vhost-user-blk test targets and the blkio client that drives them.
//!
//! The client is `ringblk-bench` (`run --vhost` for verified workloads, `io --vhost`
//! for single requests), which talks vhost-user through libblkio's
//! `virtio-blk-vhost-user` driver: a client we did not write.
//!
//! The target is `ringblk serve --vhost VOL=SOCKET` with a `mem` volume, or — with
//! `RINGBLK_VHOST_TEST_PEER=qsd`, a test-only switch for checking the tests
//! themselves — `qemu-storage-daemon` exporting a file over vhost-user-blk (and NBD,
//! for block status), the same way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{run, tmpdir, Server, TOOL_TIMEOUT};

/// Volume (and export) name of every target.
pub const VOL: &str = "v";

/// `ringblk-bench` next to the test's `ringblk` binary, built on first use when
/// missing (a narrow `cargo test -p ringblk-server` does not build it).
pub fn bench_bin() -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let ringblk = Path::new(env!("CARGO_BIN_EXE_ringblk"));
    let dir = ringblk.parent().expect("bin dir");
    let bin = dir.join("ringblk-bench");
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !bin.exists() {
        // target/<profile>/ringblk: the target dir is one level up.
        let target_dir = dir.parent().expect("profile dir has a parent");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "ringblk-bench", "--bin", "ringblk-bench"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build of ringblk-bench failed");
    }
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

/// Which back end the tests drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Ringblk,
    /// `RINGBLK_VHOST_TEST_PEER=qsd`: qemu-storage-daemon (test development only).
    Qsd,
}

pub fn peer() -> Peer {
    match std::env::var("RINGBLK_VHOST_TEST_PEER").as_deref() {
        Ok("qsd") => Peer::Qsd,
        _ => Peer::Ringblk,
    }
}

/// A running vhost-user-blk back end with volume [`VOL`] on socket `sock`, and the
/// same volume's NBD export at `nbd_uri`.
pub struct Target {
    pub sock: PathBuf,
    pub nbd_uri: String,
    pub server: Option<Server>,
    qsd: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl Target {
    /// A `size_mib` MiB volume exported over vhost-user-blk; `extra` are more
    /// `ringblk serve` flags (ignored for the peer).
    pub fn start(size_mib: u64, extra: &[&str]) -> Target {
        let dir = tmpdir();
        let sock = dir.path().join("v.vhost");
        match peer() {
            Peer::Ringblk => {
                let vol = format!("{VOL}=,backend=mem,size={size_mib}M");
                let vhost = format!("{VOL}={}", sock.display());
                let mut args = vec!["--volume", &vol, "--vhost", &vhost];
                args.extend_from_slice(extra);
                let server = Server::start_logged(&args);
                wait_socket(&sock);
                Target {
                    nbd_uri: server.uri(VOL),
                    sock,
                    server: Some(server),
                    qsd: None,
                    dir,
                }
            }
            Peer::Qsd => Self::start_qsd(dir, sock, size_mib),
        }
    }

    fn start_qsd(dir: tempfile::TempDir, sock: PathBuf, size_mib: u64) -> Target {
        let img = dir.path().join("v.img");
        let f = std::fs::File::create(&img).expect("create image");
        f.set_len(size_mib << 20).expect("size image");
        let nbd = dir.path().join("v.nbd");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={},cache.direct=on,discard=unmap",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},\
                 writable=on,num-queues=2",
                sock.display()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .arg("--export")
            .arg(format!("type=nbd,id=n,node-name=f,name={VOL},writable=on"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-storage-daemon: {e} (package qemu-system-common)")
            });
        wait_socket(&sock);
        wait_socket(&nbd);
        Target {
            nbd_uri: format!("nbd+unix:///{VOL}?socket={}", nbd.display()),
            sock,
            server: None,
            qsd: Some(child),
            dir,
        }
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("a ringblk target")
    }

    /// `ringblk-bench io --vhost SOCK ARGS...` on this target's socket.
    pub fn io(&self, args: &[&str]) -> BenchOut {
        io_on(&self.sock, args)
    }

    /// `ringblk-bench run --vhost SOCK ARGS... --json`.
    pub fn bench(&self, args: &[&str]) -> BenchOut {
        run_on(&self.sock, args)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = self.qsd.as_mut() {
            // Our own child, not reaped yet: the pid cannot have been reused.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until the back end listens on `sock` (liveness bound, not speed).
pub fn wait_socket(sock: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < TOOL_TIMEOUT,
            "nothing listens on {} after {TOOL_TIMEOUT:?}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a `ringblk-bench` run printed and how it exited.
pub struct BenchOut {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl BenchOut {
    /// The JSON document on stdout.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "ringblk-bench printed no JSON ({e}); exit {:?}\nstdout: {}\nstderr: {}",
                self.code, self.stdout, self.stderr
            )
        })
    }

    /// Panics unless the exit status is `code`; returns the JSON document when
    /// there is one.
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "ringblk-bench exit status\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
}

fn bench(args: &[&str]) -> BenchOut {
    let out = run(Command::new(bench_bin()).args(args));
    BenchOut {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ringblk-bench io --vhost SOCK --json ARGS...`.
pub fn io_on(sock: &Path, args: &[&str]) -> BenchOut {
    let sock = sock.to_str().expect("UTF-8 socket path");
    let mut a = vec!["io", "--vhost", sock, "--json"];
    a.extend_from_slice(args);
    bench(&a)
}

/// `ringblk-bench run --vhost SOCK --json --quiet ARGS...`.
pub fn run_on(sock: &Path, args: &[&str]) -> BenchOut {
    let sock = sock.to_str().expect("UTF-8 socket path");
    let mut a = vec!["run", "--vhost", sock, "--json", "--quiet"];
    a.extend_from_slice(args);
    bench(&a)
}

/// The phase named `name` of a `run --json` document.
pub fn phase<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .find(|p| p["phase"] == name)
        .unwrap_or_else(|| panic!("no phase {name} in {doc:#}"))
}

/// The ops of `ph` named `name` (`read`, `write`, `total`).
pub fn op<'a>(ph: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    ph["ops"]
        .as_array()
        .expect("ops")
        .iter()
        .find(|o| o["op"] == name)
        .unwrap_or_else(|| panic!("no op {name} in {ph:#}"))
}

/// `nbdinfo --map` of `uri`: `(offset, length, type)` per extent, type bit 0 = hole,
/// bit 1 = zero (context base:allocation).
pub fn nbd_map(uri: &str) -> Vec<(u64, u64, u32)> {
    let out = run(Command::new("nbdinfo").args(["--map", "--json", uri]));
    assert!(
        out.status.success(),
        "nbdinfo --map {uri} failed (package libnbd-bin): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("nbdinfo --map --json prints JSON");
    doc.as_array()
        .expect("an array of extents")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type") as u32,
            )
        })
        .collect()
}

/// Whether every byte of `[off, off+len)` is in extents with all of `flags` set.
pub fn map_covers(map: &[(u64, u64, u32)], off: u64, len: u64, flags: u32) -> bool {
    let end = off + len;
    let mut at = off;
    for &(o, l, t) in map {
        if o <= at && at < o + l {
            if t & flags != flags {
                return false;
            }
            at = o + l;
            if at >= end {
                return true;
            }
        }
    }
    false
}
