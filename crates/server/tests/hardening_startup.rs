//! Issue #11, startup and listeners: what a restart, a second server, a failed start
//! and a volume spec may and may not do to the files and ports they find.
//!
//! - item 1: a restart right after `kill -9` or SIGTERM listens on the same port;
//! - item 2: a second server on the same data dir is refused and changes nothing;
//! - item 13: `--listen unix:PATH` removes only a stale socket at PATH;
//! - item 16: a failed start leaves no file (nor the data dir) behind;
//! - item 17: `size=` larger than an existing file is refused unless `grow=true`.

mod common;
use common::nbd::Client;
use common::*;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Liveness bound on a read from a server; never a speed assertion.
const IO_BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Starting the binary with any arguments (the common harness always passes port 0)

/// A server that printed its banner. Stopped with SIGTERM when dropped.
struct Running {
    child: Child,
    banner: Vec<String>,
    stderr: PathBuf,
}

/// What became of `ringblk serve ARGS`.
enum Started {
    Running(Running),
    Exited { code: Option<i32>, stderr: String },
}

impl Started {
    fn running(self, what: &str) -> Running {
        match self {
            Started::Running(r) => r,
            Started::Exited { code, stderr } => {
                panic!("{what}: the server exited ({code:?}) instead of serving; stderr:\n{stderr}")
            }
        }
    }

    /// The exit code and stderr of a start that must fail.
    fn refused(self, what: &str) -> (Option<i32>, String) {
        match self {
            Started::Exited { code, stderr } => (code, stderr),
            Started::Running(r) => {
                let banner = r.banner.join("\n");
                drop(r);
                panic!("{what}: the server started instead of refusing; banner:\n{banner}")
            }
        }
    }
}

/// Runs `ringblk serve ARGS` until it prints its banner (Running) or exits (Exited).
/// Its stderr goes to `log` (which must not be inside a directory the test expects to
/// stay untouched).
fn serve(args: &[&str], log: &Path) -> Started {
    let err = std::fs::File::create(log).expect("create the stderr log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringblk"));
    cmd.arg("serve")
        .args(args)
        .env("RINGBLK_LOG", "warn")
        // Its own RPC socket (an --rpc in ARGS wins): the default one is shared by
        // every server of the host since #17.
        .env("RINGBLK_RPC", log.with_extension("sock"))
        .stderr(Stdio::from(err));
    match spawn_until_banner(cmd) {
        Ok((child, banner)) => Started::Running(Running {
            child,
            banner,
            stderr: log.to_path_buf(),
        }),
        Err((status, _)) => Started::Exited {
            code: status.code(),
            stderr: std::fs::read_to_string(log).unwrap_or_default(),
        },
    }
}

impl Running {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, sig);
    }

    /// Waits for the process to exit (bounded: SIGKILL after 30 s) and reaps it.
    fn reap(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self, kill9: bool) -> std::process::ExitStatus {
        self.signal(if kill9 {
            nix::sys::signal::Signal::SIGKILL
        } else {
            nix::sys::signal::Signal::SIGTERM
        });
        self.reap()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(nix::sys::signal::Signal::SIGTERM);
            self.reap();
        }
    }
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("addr").port()
}

/// Every entry under `dir` with its size (directories as `None`), sorted.
fn listing(dir: &Path) -> Vec<(String, Option<u64>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            let e = e.expect("entry");
            let m = std::fs::symlink_metadata(e.path()).expect("stat");
            let name = e.file_name().to_string_lossy().into_owned();
            (name, m.is_file().then_some(m.len()))
        })
        .collect();
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------
// A client in the transmission phase

/// Connects to `port`, completes the handshake into `export` and reads its first
/// sector: a client in the transmission phase, as a real one would be.
fn nbd_session(port: u16, export: &str) -> Result<TcpStream, String> {
    let mut c = Client::open(port, export, IO_BOUND).map_err(|e| format!("handshake: {e}"))?;
    match c.read(7, 0, 512) {
        Ok((0, _)) => Ok(c.s),
        Ok((err, _)) => Err(format!("READ failed with NBD error {err}")),
        Err(e) => Err(format!("READ: {e}")),
    }
}

// ---------------------------------------------------------------------------------------
// Item 1: a restart listens at once on the same port

/// Guards against: `ringblk serve` restarted right after a `kill -9` (or a SIGTERM)
/// failing with "Address already in use", so that a supervisor restart fails.
/// Each round leaves a client in the transmission phase, stops the server (SIGKILL and
/// SIGTERM in turn), closes the client (the server's side of that connection ends in
/// TIME_WAIT), and once the process is reaped: the port must be free for a listener
/// with SO_REUSEADDR at once, and a server restarted on it must serve a new client.
#[test]
fn a_restart_listens_on_the_same_port_after_kill9_and_sigterm() {
    let dir = tmpdir();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data");
    let log = dir.path().join("stderr.log");
    let args = [
        "--listen",
        &listen,
        "--data-dir",
        data.to_str().expect("utf8"),
        "--cores",
        "0",
        "--volume",
        "v=,backend=mem,size=16M",
    ];
    let mut srv = serve(&args, &log).running("first start");
    for round in 0..6 {
        let kill9 = round % 2 == 0;
        let what = if kill9 { "kill -9" } else { "SIGTERM" };
        let client = nbd_session(port, "v").unwrap_or_else(|e| panic!("round {round}: {e}"));
        let status = srv.stop(kill9);
        assert!(kill9 || status.success(), "round {round}: {what}: {status}");
        drop(client);
        // The old server is gone: nothing of it may still listen on the port.
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            panic!(
                "round {round}: after {what}, the reaped server's port {port} is still taken: {e}"
            );
        }
        srv = match serve(&args, &log) {
            Started::Running(r) => r,
            Started::Exited { code, stderr } => {
                panic!("round {round}: restart right after {what} failed ({code:?}):\n{stderr}")
            }
        };
        let again = nbd_session(port, "v");
        assert!(again.is_ok(), "round {round}: after {what}: {again:?}");
    }
    assert!(!srv.stderr().contains("panicked"), "{}", srv.stderr());
}

// ---------------------------------------------------------------------------------------
// Item 2: one server per data dir

fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String, String> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if uri.contains('@') {
        c.arg("-r"); // a backup is a read-only export
    }
    c.arg(uri);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() && !text.contains("failed") {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Guards against: a second `ringblk serve` on a running server's data dir running
/// recovery there, which removed the running server's prepared delta as an orphan, so
/// that its next FLUSH failed and its backup was lost at the next start. The second
/// start (another port, another RPC socket) must exit non-zero naming the holder's pid,
/// before it reads or writes anything in the data dir.
#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tmpdir();
    let img = dir.path().join("v.img");
    let spec = format!("v={},size=64M", img.display());
    let srv = Server::start_in(dir, &["--volume", &spec]);
    let uri = srv.uri("v");
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]).expect("base data");
    run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    qemu_io(&uri, &["write -P 0x22 0 512k", "flush"]).expect("data over the backup");
    let before = listing(srv.dir.path());

    let other = tmpdir();
    let rpc = other.path().join("b.sock");
    let second = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            srv.dir.path().to_str().expect("utf8"),
            "--rpc",
            rpc.to_str().expect("utf8"),
            "--volume",
            &spec,
        ],
        &other.path().join("second.log"),
    );
    let (code, stderr) = second.refused("second server on the same data dir");
    assert_eq!(code, Some(1), "{stderr}");
    let pid = srv.child.id().to_string();
    assert!(
        stderr.contains(&pid) && stderr.contains(&srv.dir.path().display().to_string()),
        "the refusal must name the data dir and the holder's pid {pid}: {stderr}"
    );
    assert_eq!(
        listing(srv.dir.path()),
        before,
        "the refused start changed the data dir"
    );

    // `ringblk check` reads only: it runs beside the server, and says so.
    let check = run_ok(
        Command::new(env!("CARGO_BIN_EXE_ringblk"))
            .args(["check", "--data-dir"])
            .arg(srv.dir.path()),
    );
    assert!(check.contains("consistent"), "{check}");
    assert!(
        check.contains(&pid),
        "check should say a server runs: {check}"
    );

    // The first server is untouched: its next group commit works ...
    qemu_io(&uri, &["write -P 0x33 512k 512k", "flush"]).expect("FLUSH after the refused start");
    // ... and its backup comes back after a restart.
    let srv = srv.restart(false, &["--volume", &spec]);
    let list = run_ok(ctl(&srv).args(["--json", "backup", "list", "v"]));
    assert!(list.contains("\"b1\""), "{list}");
    qemu_io(&srv.uri("v@b1"), &["read -P 0x11 0 1M"]).expect("the backup's data");
    qemu_io(
        &srv.uri("v"),
        &["read -P 0x22 0 512k", "read -P 0x33 512k 512k"],
    )
    .expect("the live data");
}

// ---------------------------------------------------------------------------------------
// Item 13: `--listen unix:PATH` replaces only a stale socket

/// Guards against: `--listen unix:PATH` deleting whatever was at PATH when nothing
/// answered a connect there (a regular file was lost). A regular file or a directory
/// is an error naming PATH and stays; a live socket is refused and keeps its server;
/// only a stale socket is replaced.
#[test]
fn unix_listen_replaces_only_a_stale_socket() {
    let dir = tmpdir();
    let log = dir.path().join("stderr.log");
    let data = dir.path().join("data");
    let start = |path: &Path| {
        let listen = format!("unix:{}", path.display());
        serve(
            &[
                "--listen",
                &listen,
                "--data-dir",
                data.to_str().expect("utf8"),
                "--cores",
                "0",
                "--volume",
                "v=,backend=mem,size=1M",
            ],
            &log,
        )
    };

    let file = dir.path().join("precious.txt");
    std::fs::write(&file, b"precious").expect("write");
    let (code, err) = start(&file).refused("unix:PATH at a regular file");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&file).expect("still there"), b"precious");

    let sub = dir.path().join("a-directory");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::write(sub.join("inside"), b"x").expect("write");
    let (code, err) = start(&sub).refused("unix:PATH at a directory");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&sub.display().to_string()), "{err}");
    assert!(sub.join("inside").exists());

    let live = dir.path().join("live.sock");
    let listener = std::os::unix::net::UnixListener::bind(&live).expect("bind");
    let (code, err) = start(&live).refused("unix:PATH at a live socket");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&live.display().to_string()), "{err}");
    std::os::unix::net::UnixStream::connect(&live).expect("the live socket still answers");
    drop(listener); // leaves the socket file: now a stale socket

    let srv = start(&live).running("unix:PATH at a stale socket");
    let uri = format!("nbd+unix:///v?socket={}", live.display());
    run_ok(Command::new("nbdinfo").args(["--size", &uri]));
    drop(srv);
}

// ---------------------------------------------------------------------------------------
// Item 16: a failed start leaves nothing behind

/// Guards against: `ringblk serve --cores 5` (or a port in use, or a bad volume spec)
/// creating the default 1 GiB `vol0.img` (and the data dir) before it failed.
#[test]
fn a_failed_start_creates_nothing() {
    let dir = tmpdir();
    let log = dir.path().join("stderr.log");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf8");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let missing_core = (cores + 3).to_string();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr").to_string();
    let extra = dir.path().join("extra.img");
    let extra_spec = format!("x={},size=1M", extra.display());
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        (
            "a core that does not exist",
            vec!["--listen", "127.0.0.1:0", "--cores", &missing_core],
            "core",
        ),
        ("a port in use", vec!["--listen", &taken_addr], &taken_addr),
        (
            "a bad block size on a second volume",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--volume",
                &extra_spec,
                "--volume",
                "y=,backend=mem,size=1M,block-size=1024",
            ],
            "block size",
        ),
        (
            "two volumes with one name",
            vec![
                "--listen",
                "127.0.0.1:0",
                "--volume",
                &extra_spec,
                "--volume",
                "x=,backend=mem,size=1M",
            ],
            "\"x\"",
        ),
    ];
    for (what, args, needle) in &cases {
        let mut all = vec!["--data-dir", data_s];
        all.extend(args);
        let (code, err) = serve(&all, &log).refused(what);
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(
            err.contains(needle),
            "{what}: the error should name {needle}: {err}"
        );
        assert!(
            !data.exists(),
            "{what}: the failed start created {}: {:?}",
            data.display(),
            listing(&data)
        );
        assert!(
            !extra.exists(),
            "{what}: the failed start created {}",
            extra.display()
        );
    }

    // With an existing data dir, the same failures leave it as it was.
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::write(data.join("keep"), b"k").expect("write");
    let before = listing(&data);
    for (what, args, _) in &cases {
        let mut all = vec!["--data-dir", data_s];
        all.extend(args);
        serve(&all, &log).refused(what);
        assert_eq!(
            listing(&data),
            before,
            "{what}: the failed start changed the data dir"
        );
        assert!(
            !extra.exists(),
            "{what}: the failed start created {}",
            extra.display()
        );
    }
    drop(taken);

    // A failure after the start created a volume file (another process holds the
    // second volume's file: its write lock is refused when the volume opens) removes
    // that file and keeps every other one. (A second volume whose recovery fails no
    // longer fails the start: it is left out while the others serve.)
    let y = data.join("y.img");
    std::fs::write(&y, vec![0u8; 1 << 20]).expect("write y");
    let held = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&y)
        .expect("open y");
    // SAFETY: a zeroed flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl reads the flock, which outlives the call, on a descriptor we hold.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&held),
            libc::F_OFD_SETLK,
            &fl,
        )
    };
    assert_eq!(rc, 0, "lock y.img: {}", std::io::Error::last_os_error());
    let before = listing(&data);
    let x = data.join("x.img");
    let x_spec = format!("x={},size=1M", x.display());
    let y_spec = format!("y={}", y.display());
    let args = [
        "--data-dir",
        data_s,
        "--listen",
        "127.0.0.1:0",
        "--volume",
        &x_spec,
        "--volume",
        &y_spec,
    ];
    let (code, err) = serve(&args, &log).refused("the second volume's file is locked");
    drop(held);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("y.img") && err.contains(r#"Failed to get "write" lock"#),
        "{err}"
    );
    assert!(!x.exists(), "the failed start left {} behind", x.display());
    assert_eq!(
        listing(&data),
        before,
        "the failed start changed the data dir"
    );
}

// ---------------------------------------------------------------------------------------
// Item 17: size= never grows an existing file unless asked

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read")
}

/// Guards against: `--volume v=PATH,size=SIZE` silently growing an existing image that
/// is smaller than SIZE. Refused with the file's size and how to ask for growth;
/// `grow=true` (flag or TOML) grows it; a smaller SIZE serves the first SIZE bytes and
/// leaves the file as it is; a new file is created at SIZE.
#[test]
fn size_larger_than_an_existing_file_needs_grow() {
    const MIB: u64 = 1 << 20;
    let dir = tmpdir();
    let log = dir.path().join("stderr.log");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf8");
    let img = dir.path().join("user.img");
    let content: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&img, &content).expect("write the image");
    let vol = |opts: &str| format!("v={}{opts}", img.display());
    let base = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data_s,
        "--cores",
        "0",
    ];
    let with = |spec: &str| {
        let mut a = base.to_vec();
        a.extend(["--volume", spec]);
        a.into_iter().map(str::to_string).collect::<Vec<_>>()
    };

    // Each start below is the first of its data dir as far as this volume goes: the
    // volume list a start persists (volumes.json) would otherwise hold the previous
    // start's size, and a differing size is refused for that reason first (tested in
    // hardening_persist).
    let forget = || {
        let _ = std::fs::remove_file(data.join("volumes.json"));
    };
    let args = with(&vol(",size=4M"));
    let (code, err) = serve(&strs(&args), &log).refused("size= larger than the file");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&img.display().to_string())
            && err.contains(&MIB.to_string())
            && err.contains("grow=true"),
        "the refusal must name the file, its size and grow=true: {err}"
    );
    assert_eq!(
        file_bytes(&img),
        content,
        "the refused start changed the image"
    );

    // A smaller size serves the first bytes and leaves the file alone.
    forget();
    let args = with(&vol(",size=512K"));
    let srv = serve(&strs(&args), &log).running("size= smaller than the file");
    assert!(
        srv.banner
            .iter()
            .any(|l| l.contains("v ") && l.contains("512.0 KiB")),
        "{:?}",
        srv.banner
    );
    drop(srv);
    assert_eq!(
        file_bytes(&img),
        content,
        "a smaller size= changed the image"
    );

    // grow=true grows it, sparse, keeping the data.
    forget();
    let args = with(&vol(",size=4M,grow=true"));
    let srv = serve(&strs(&args), &log).running("grow=true");
    assert!(
        srv.banner.iter().any(|l| l.contains("4.0 MiB")),
        "{:?}",
        srv.banner
    );
    drop(srv);
    let grown = file_bytes(&img);
    assert_eq!(grown.len() as u64, 4 * MIB);
    assert_eq!(&grown[..MIB as usize], &content[..]);

    // The config file's `grow = true` does the same.
    let toml = dir.path().join("c.toml");
    std::fs::write(
        &toml,
        format!(
            "[[volume]]\nname = \"v\"\npath = \"{}\"\nsize = \"8M\"\n",
            img.display()
        ),
    )
    .expect("write toml");
    let mut a = base.to_vec();
    let toml_s = toml.to_str().expect("utf8");
    a.extend(["--config", toml_s]);
    forget();
    let (_, err) = serve(&a, &log).refused("TOML size larger than the file");
    assert!(err.contains("grow"), "{err}");
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), 4 * MIB);
    let mut text = std::fs::read_to_string(&toml).expect("read toml");
    text.push_str("grow = true\n");
    std::fs::write(&toml, text).expect("write toml");
    forget();
    drop(serve(&a, &log).running("TOML grow = true"));
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), 8 * MIB);

    // A new file is created at the size asked for.
    let new = dir.path().join("new.img");
    let spec = format!("n={},size=2M", new.display());
    forget();
    drop(serve(&strs(&with(&spec)), &log).running("a new file"));
    assert_eq!(std::fs::metadata(&new).expect("stat").len(), 2 * MIB);

    // Zero configuration over an existing, smaller vol0.img serves it at its size.
    let zero = dir.path().join("zero");
    std::fs::create_dir(&zero).expect("mkdir");
    std::fs::write(zero.join("vol0.img"), &content).expect("write vol0.img");
    let zero_args = [
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        zero.to_str().expect("utf8"),
        "--cores",
        "0",
    ];
    let srv = serve(&zero_args, &log).running("zero config over a 1 MiB vol0.img");
    assert!(
        srv.banner
            .iter()
            .any(|l| l.contains("vol0") && l.contains("1.0 MiB")),
        "{:?}",
        srv.banner
    );
    drop(srv);
    assert_eq!(file_bytes(&zero.join("vol0.img")), content);

    // The RPC refuses the same growth, and the help says how to ask for it.
    let srv = Server::start(&["--volume", "ram=,backend=mem,size=1M"]);
    let img_s = img.to_str().expect("utf8");
    let create = ["volume", "create", "u", "--path", img_s, "--size", "16M"];
    let out = run(ctl(&srv).args(create));
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("grow"),
        "{out:?}"
    );
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), 8 * MIB);
    run_ok(ctl(&srv).args(create).arg("--grow"));
    assert_eq!(std::fs::metadata(&img).expect("stat").len(), 16 * MIB);
    let help = run_ok(Command::new(env!("CARGO_BIN_EXE_ringblk")).args(["serve", "--help"]));
    assert!(
        help.contains("grow=true") && help.contains("grow = true"),
        "{help}"
    );
}
