//! #17 item 5, "a CLI that behaves like its neighbours": one size grammar for `serve`,
//! TOML and `ringblk-ctl`; `VOL@NAME` everywhere; every argument described in
//! `--help`; `volume create` with `serve`'s volume options; qemu-nbd/nbdkit aliases
//! and `--fork`; the absolute default RPC socket; logs without ANSI off a terminal,
//! `--log-format json`, an invalid `--log` refused; `backup copy` refusing an
//! existing DEST without `--force`. Each test failed on the code before (see the
//! commit that adds this file).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ctl, run, run_ok, spawn_until_banner, tmpdir, Server};

fn ringblk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringblk"))
}

fn ctl_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_ringblk"))
        .parent()
        .expect("bin dir")
        .join("ringblk-ctl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn volume<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("no volume {name} in {list}"))
}

/// `10gb` is explained with the same words by `serve --volume` (it used to take it
/// as 10 GiB) and by `ringblk-ctl` (which called it ambiguous).
#[test]
fn an_ambiguous_size_is_refused_alike_everywhere() {
    let dir = tmpdir();
    let serve = run(ringblk()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--rpc")
        .arg(dir.path().join("s.sock"))
        .args(["--volume", "n=,backend=null,size=10gb"]));
    let ctl = run(Command::new(ctl_bin()).args([
        "--rpc",
        "/nonexistent/sock",
        "volume",
        "create",
        "n",
        "--backend",
        "null",
        "--size",
        "10gb",
    ]));
    let msg = "'10gb': suffix 'gb' is ambiguous";
    for (who, out) in [("serve", &serve), ("ringblk-ctl", &ctl)] {
        assert_eq!(out.status.code(), Some(2), "{who}: {}", stderr(out));
        assert!(stderr(out).contains(msg), "{who}: {}", stderr(out));
    }
}

/// `1.5G` is an exact byte count for a flag and `ringblk-ctl`; a TOML size may be a
/// plain integer (it had to be a string).
#[test]
fn fractional_and_integer_sizes_work_in_flags_toml_and_ctl() {
    let cfg = tmpdir();
    let toml = cfg.path().join("c.toml");
    std::fs::write(
        &toml,
        "[[volume]]\nname = \"t\"\nbackend = \"null\"\nsize = 67108864\n",
    )
    .expect("toml");
    let srv = Server::start(&[
        "--config",
        toml.to_str().expect("utf-8"),
        "--volume",
        "f=,backend=null,size=1.5G",
    ]);
    run_ok(ctl(&srv).args([
        "volume",
        "create",
        "m",
        "--backend",
        "mem",
        "--size",
        "1.5M",
    ]));
    let list = json(&run_ok(ctl(&srv).args(["--json", "volume", "list"])));
    assert_eq!(volume(&list, "f")["size_bytes"], 3u64 << 29);
    assert_eq!(volume(&list, "t")["size_bytes"], 64u64 << 20);
    assert_eq!(volume(&list, "m")["size_bytes"], 3u64 << 19);
    // Not a whole number of bytes: refused, with the same words by both.
    let out = run(ctl(&srv).args([
        "volume",
        "create",
        "x",
        "--backend",
        "mem",
        "--size",
        "1.3K",
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a whole number of bytes"),
        "{}",
        stderr(&out)
    );
}

/// `backup create VOL@NAME`, as `release` and `copy` name a backup; the old
/// two-argument form still works, with a warning.
#[test]
fn backup_create_takes_vol_at_name() {
    let srv = Server::start(&["--volume", "v=,backend=mem,size=16M"]);
    run_ok(ctl(&srv).args(["backup", "create", "v@one"]));
    let out = run(ctl(&srv).args(["backup", "create", "v", "two"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("deprecated"), "{}", stderr(&out));
    let list = run_ok(ctl(&srv).args(["--json", "backup", "list", "v"]));
    assert!(
        list.contains("\"one\"") && list.contains("\"two\""),
        "{list}"
    );
    run_ok(ctl(&srv).args(["backup", "release", "v@two"]));
}

/// Every positional argument of every command has a description, and no usage line
/// shows the optional `--rpc` as if it were required.
#[test]
fn help_describes_every_argument() {
    let ctl_cmds: &[&[&str]] = &[
        &[],
        &["volume", "create"],
        &["volume", "delete"],
        &["stats"],
        &["backup", "create"],
        &["backup", "list"],
        &["backup", "release"],
        &["backup", "copy"],
        &["fault", "inject"],
        &["fault", "clear"],
        &["call"],
    ];
    let mut helps = Vec::new();
    for args in ctl_cmds {
        let out = run(Command::new(ctl_bin()).args(*args).arg("--help"));
        helps.push((format!("ringblk-ctl {args:?}"), stdout(&out)));
    }
    for args in [&["serve"][..], &["check"]] {
        let out = run(ringblk().args(args).arg("--help"));
        helps.push((format!("ringblk {args:?}"), stdout(&out)));
    }
    for (who, help) in &helps {
        assert!(help.contains("Usage:"), "{who}: {help}");
        let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap_or("");
        assert!(!usage.contains("--rpc"), "{who}: {usage}");
        let mut in_args = false;
        for line in help.lines() {
            if line == "Arguments:" {
                in_args = true;
                continue;
            }
            if in_args && !line.starts_with("  ") {
                in_args = false;
            }
            if in_args && line.trim_start().starts_with(['<', '[']) {
                let after = line.trim_start().split_once(['>', ']']).map_or("", |x| x.1);
                let after = after.trim_start_matches(['.', ']']);
                assert!(
                    !after.trim().is_empty(),
                    "{who}: blank description: {line:?}\n{help}"
                );
            }
        }
    }
}

/// `volume create` takes the volume options `serve --volume` does, and a mem
/// volume needs no `--path ""`.
#[test]
fn volume_create_takes_every_volume_option() {
    let srv = Server::start(&["--volume", "v=,backend=null,size=1M"]);
    let img = srv.path("f.img");
    run_ok(
        ctl(&srv)
            .args(["volume", "create", "f", "--path"])
            .arg(&img)
            .args(["--size", "8M", "--chunk-size", "64K", "--direct", "off"]),
    );
    run_ok(ctl(&srv).args(["volume", "create", "m", "--backend", "mem", "--size", "8M"]));
    let list = json(&run_ok(ctl(&srv).args(["--json", "volume", "list"])));
    assert_eq!(volume(&list, "f")["direct"], false);
    assert_eq!(volume(&list, "m")["backend"], "mem");
    // The chunk size reaches the server, which checks it.
    let out = run(ctl(&srv)
        .args(["volume", "create", "g", "--path"])
        .arg(srv.path("g.img"))
        .args(["--size", "8M", "--chunk-size", "3K"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("chunk"), "{}", stderr(&out));
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// qemu-nbd's `-p`, `-b` and `-r`.
#[test]
fn qemu_nbd_aliases_port_bind_read_only() {
    let dir = tmpdir();
    let port = free_port();
    let mut cmd = ringblk();
    cmd.args([
        "serve",
        "-p",
        &port.to_string(),
        "-b",
        "127.0.0.1",
        "-r",
        "--data-dir",
    ])
    .arg(dir.path())
    .arg("--rpc")
    .arg(dir.path().join("s.sock"))
    .args(["--volume", "v=,backend=mem,size=1M", "--foreground"])
    .env("RINGBLK_LOG", "warn");
    let (mut child, banner) = spawn_until_banner(cmd).expect("serves");
    let text = banner.join("\n");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        text.contains(&format!("listening on 127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.contains("(read-only)"), "{text}");
}

/// `--fork --pid-file`: the parent exits 0 once the server serves, the pid file
/// names the live server, which answers RPCs.
#[test]
fn fork_with_pid_file_returns_and_serves() {
    let dir = tmpdir();
    let pid_file = dir.path().join("ringblk.pid");
    let sock = dir.path().join("s.sock");
    // The server keeps the caller's stderr (its log) as qemu-nbd does: a file here,
    // since a pipe would stay open after the parent exits. Its stdout (the banner,
    // then /dev/null) too, so that nothing waits on the daemon's descriptors.
    let log = std::fs::File::create(dir.path().join("log")).expect("log");
    let banner = std::fs::File::create(dir.path().join("banner")).expect("banner");
    let mut child = ringblk()
        .args(["serve", "--fork", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--rpc")
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["--volume", "v=,backend=mem,size=1M"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(banner))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            start.elapsed() < common::TOOL_TIMEOUT,
            "the parent never exited"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let banner = std::fs::read_to_string(dir.path().join("banner")).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "parent: {banner}");
    assert!(banner.contains("listening on"), "{banner}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    let pid = nix::unistd::Pid::from_raw(pid);
    let listed = run(Command::new(ctl_bin())
        .arg("--rpc")
        .arg(&sock)
        .args(["volume", "list"]));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while nix::sys::signal::kill(pid, None).is_ok() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(stdout(&listed).contains('v'), "{}", stdout(&listed));
    assert!(
        !pid_file.exists(),
        "the pid file is removed at a clean stop"
    );
}

/// `serve` and `ringblk-ctl` name the same absolute default socket in `--help`.
#[test]
fn the_default_rpc_socket_is_absolute_and_shared() {
    let serve = stdout(&run(ringblk().args(["serve", "--help"])));
    let ctl = stdout(&run(Command::new(ctl_bin()).arg("--help")));
    for (who, help) in [("serve", &serve), ("ringblk-ctl", &ctl)] {
        let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("/run/ringblk/ringblk.sock"), "{who}: {help}");
        assert!(
            flat.contains("$XDG_RUNTIME_DIR/ringblk/ringblk.sock"),
            "{who}: {help}"
        );
    }
}

/// An invalid `--log` filter is an error naming it (it fell back to `info`).
#[test]
fn an_invalid_log_filter_is_an_error() {
    let dir = tmpdir();
    let out = run(ringblk()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--rpc")
        .arg(dir.path().join("s.sock"))
        .args(["--log", "ringblk=loud"]));
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("ringblk=loud"), "{}", stderr(&out));
}

/// Logs into a file carry no ANSI colour codes; `--log-format json` writes one JSON
/// object per line.
#[test]
fn logs_off_a_terminal_are_plain_or_json() {
    let srv = Server::start_logged(&["--log", "info", "--volume", "v=,backend=mem,size=1M"]);
    let text = srv.stderr_log();
    assert!(text.contains("JSON-RPC server listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "ANSI codes in a log file: {text:?}"
    );
    drop(srv);
    let srv = Server::start_logged(&[
        "--log",
        "info",
        "--log-format",
        "json",
        "--volume",
        "v=,backend=mem,size=1M",
    ]);
    let text = srv.stderr_log();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for l in lines {
        let v = json(l);
        assert!(v.get("level").is_some(), "{l}");
    }
}

/// `backup copy` does not overwrite an existing DEST without `--force`; the base of an
/// incremental copy (`--changed-since`) is updated as before.
#[test]
fn backup_copy_refuses_an_existing_dest_without_force() {
    let srv = Server::start(&["--volume", "v=,backend=mem,size=1M"]);
    run_ok(ctl(&srv).args(["backup", "create", "v@a"]));
    let dest = srv.path("unrelated.txt");
    std::fs::write(&dest, b"precious").expect("write");
    let out = run(ctl(&srv).args(["backup", "copy", "v@a"]).arg(&dest));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&dest).expect("read"), b"precious");
    run_ok(
        ctl(&srv)
            .args(["backup", "copy", "v@a", "--force"])
            .arg(&dest),
    );
    assert_eq!(std::fs::metadata(&dest).expect("dest").len(), 1 << 20);
    run_ok(ctl(&srv).args(["backup", "create", "v@b"]));
    run_ok(
        ctl(&srv)
            .args(["backup", "copy", "v@b", "--changed-since", "a"])
            .arg(&dest),
    );
}
