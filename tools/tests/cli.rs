//! Runs the real `ringblk-ctl` binary against a fake JSON-RPC server that records the
//! request and answers with a canned reply, so the wire format and the printed output
//! of every subcommand are pinned down without a running target.

use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_ringblk-ctl");

/// What the fake server does with the one connection it accepts.
enum Reply {
    /// `{"result": ..}` with the request's id.
    Result(Value),
    /// `{"error": ..}` with the request's id.
    Error(Value),
    /// These bytes, verbatim.
    Raw(&'static [u8]),
    /// Read the request, then hold the connection open without answering.
    Silent(Duration),
}

struct FakeServer {
    _dir: tempfile::TempDir,
    path: PathBuf,
    thread: JoinHandle<Value>,
}

impl FakeServer {
    fn start(reply: Reply) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ringblk.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let thread = thread::spawn(move || serve_one(&listener, reply));
        Self {
            _dir: dir,
            path,
            thread,
        }
    }

    /// Runs `ringblk-ctl --rpc <socket> args..`.
    fn run(&self, args: &[&str]) -> Output {
        let mut full = vec!["--rpc", self.path.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        ctl(&full)
    }

    /// The request the server received.
    fn request(self) -> Value {
        self.thread.join().expect("fake server panicked")
    }
}

fn serve_one(listener: &UnixListener, reply: Reply) -> Value {
    let (mut stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let request: Value = serde_json::Deserializer::from_reader(BufReader::new(&stream))
        .into_iter::<Value>()
        .next()
        .expect("no request")
        .expect("request is not JSON");
    let id = request["id"].clone();
    let bytes = match reply {
        Reply::Result(result) => json!({"jsonrpc": "2.0", "id": id, "result": result})
            .to_string()
            .into_bytes(),
        Reply::Error(error) => json!({"jsonrpc": "2.0", "id": id, "error": error})
            .to_string()
            .into_bytes(),
        Reply::Raw(bytes) => bytes.to_vec(),
        Reply::Silent(hold) => {
            thread::sleep(hold);
            Vec::new()
        }
    };
    let _ = stream
        .write_all(&bytes)
        .and_then(|()| stream.write_all(b"\n"));
    request
}

fn ctl(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RINGBLK_RPC")
        .output()
        .expect("run ringblk-ctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
}

/// Checks the envelope and returns (method, params).
#[track_caller]
fn method_params(request: &Value) -> (String, Option<Value>) {
    assert_eq!(request["jsonrpc"], json!("2.0"), "{request}");
    assert!(request["id"].is_number(), "{request}");
    let method = request["method"].as_str().expect("method").to_owned();
    (method, request.get("params").cloned())
}

fn volume(name: &str, size: u64, connections: u64) -> Value {
    json!({
        "name": name, "path": format!("/data/{name}.img"), "size_bytes": size,
        "block_size": 4096, "backend": "file", "read_only": false,
        "connections": connections, "uuid": "ignored-extra-field"
    })
}

#[test]
fn volume_create_sends_all_options() {
    let fake = FakeServer::start(Reply::Result(volume("vol0", 10 << 30, 0)));
    let out = fake.run(&[
        "volume",
        "create",
        "vol0",
        "--path",
        "/data/vol0.img",
        "--size",
        "10G",
        "--block-size",
        "4096",
        "--backend",
        "file",
        "--read-only",
    ]);
    assert_success(&out);
    assert_eq!(
        stdout(&out),
        "NAME      SIZE  BLOCK  BACKEND  RO  CONNS  PATH\n\
         vol0  10.0 GiB   4096  file     no      0  /data/vol0.img\n"
    );
    let (method, params) = method_params(&fake.request());
    assert_eq!(method, "volume_create");
    assert_eq!(
        params,
        Some(json!({
            "name": "vol0", "path": "/data/vol0.img", "size_bytes": 10_737_418_240_u64,
            "block_size": 4096, "backend": "file", "read_only": true
        }))
    );
}

#[test]
fn volume_create_omits_absent_options() {
    let fake = FakeServer::start(Reply::Result(volume("v", 1 << 20, 0)));
    let out = fake.run(&["volume", "create", "v", "--path", "/x", "--backend", "mem"]);
    assert_success(&out);
    let (_, params) = method_params(&fake.request());
    assert_eq!(
        params,
        Some(json!({"name": "v", "path": "/x", "backend": "mem"}))
    );
}

#[test]
fn volume_list_prints_a_table() {
    let fake = FakeServer::start(Reply::Result(json!([
        volume("vol0", 1 << 30, 2),
        volume("scratch-volume", 512 << 20, 0),
    ])));
    let out = fake.run(&["volume", "list"]);
    assert_success(&out);
    assert_eq!(
        stdout(&out),
        concat!(
            "NAME                 SIZE  BLOCK  BACKEND  RO  CONNS  PATH\n",
            "vol0              1.0 GiB   4096  file     no      2  /data/vol0.img\n",
            "scratch-volume  512.0 MiB   4096  file     no      0  /data/scratch-volume.img\n",
        )
    );
    let (method, params) = method_params(&fake.request());
    assert_eq!((method.as_str(), params), ("volume_list", Some(json!({}))));
}

#[test]
fn volume_list_empty() {
    let fake = FakeServer::start(Reply::Result(json!([])));
    let out = fake.run(&["volume", "list"]);
    assert_success(&out);
    assert_eq!(stdout(&out), "no volumes\n");
}

#[test]
fn json_flag_prints_the_raw_result_in_any_position() {
    let result = json!([volume("vol0", 4096, 1)]);
    for args in [
        &["--json", "volume", "list"][..],
        &["volume", "list", "--json"],
    ] {
        let fake = FakeServer::start(Reply::Result(result.clone()));
        let out = fake.run(args);
        assert_success(&out);
        let printed: Value = serde_json::from_str(&stdout(&out)).expect("stdout is JSON");
        assert_eq!(printed, result);
        assert!(stdout(&out).contains("\n  "), "not pretty-printed");
    }
}

#[test]
fn volume_delete() {
    let fake = FakeServer::start(Reply::Result(json!(true)));
    let out = fake.run(&["volume", "delete", "vol0"]);
    assert_success(&out);
    assert_eq!(stdout(&out), "deleted volume vol0\n");
    let (method, params) = method_params(&fake.request());
    assert_eq!(
        (method.as_str(), params),
        ("volume_delete", Some(json!({"name": "vol0"})))
    );
}

#[test]
fn export_list() {
    let fake = FakeServer::start(Reply::Result(json!([
        {"name": "vol0", "volume": "vol0", "size_bytes": 1 << 30, "read_only": false},
        {"name": "golden", "volume": "golden", "size_bytes": 2048, "read_only": true},
    ])));
    let out = fake.run(&["export", "list"]);
    assert_success(&out);
    assert_eq!(
        stdout(&out),
        "NAME    VOLUME     SIZE  RO\n\
         vol0    vol0    1.0 GiB  no\n\
         golden  golden  2.0 KiB  yes\n"
    );
    let (method, params) = method_params(&fake.request());
    assert_eq!((method.as_str(), params), ("export_list", Some(json!({}))));
}

fn stats_result() -> Value {
    json!({
        "volumes": [{
            "name": "vol0", "read_ops": 1000, "write_ops": 250, "flush_ops": 3,
            "trim_ops": 0, "zero_ops": 1, "read_bytes": 4096000, "write_bytes": 1 << 20,
            "errors": 0, "read_latency_us_p99": 87
        }],
        "reactors": [{"id": 0, "core": 2, "connections": 1, "busy_ticks": 30,
                      "idle_ticks": 70, "poll_policy": "busy"}]
    })
}

#[test]
fn stats_all_and_one_volume() {
    let fake = FakeServer::start(Reply::Result(stats_result()));
    let out = fake.run(&["stats"]);
    assert_success(&out);
    assert_eq!(
        stdout(&out),
        "VOLUME  READS  WRITES  FLUSHES  TRIMS  ZEROES     READ  WRITTEN  ERRORS\n\
         vol0     1000     250        3      0       1  3.9 MiB  1.0 MiB       0\n\
         \n\
         ID  CORE  CONNS  BUSY%  BUSY_TICKS  IDLE_TICKS  POLICY\n \
          0     2      1   30.0          30          70  busy\n"
    );
    let (method, params) = method_params(&fake.request());
    assert_eq!((method.as_str(), params), ("stats", Some(json!({}))));

    let fake = FakeServer::start(Reply::Result(json!({"volumes": []})));
    let out = fake.run(&["stats", "vol0"]);
    assert_success(&out);
    assert_eq!(stdout(&out), "no volumes\n");
    let (_, params) = method_params(&fake.request());
    assert_eq!(params, Some(json!({"volume": "vol0"})));
}

#[test]
fn reactor_list() {
    let fake = FakeServer::start(Reply::Result(json!([
        {"id": 0, "core": 0, "connections": 3, "busy_ticks": 900, "idle_ticks": 100, "poll_policy": "busy"},
        {"id": 1, "core": 1, "connections": 0, "busy_ticks": 0, "idle_ticks": 0, "poll_policy": "adaptive"},
    ])));
    let out = fake.run(&["reactor", "list"]);
    assert_success(&out);
    assert_eq!(
        stdout(&out),
        "ID  CORE  CONNS  BUSY%  BUSY_TICKS  IDLE_TICKS  POLICY\n \
          0     0      3   90.0         900         100  busy\n \
          1     1      0      -           0           0  adaptive\n"
    );
    let (method, params) = method_params(&fake.request());
    assert_eq!((method.as_str(), params), ("reactor_list", Some(json!({}))));
}

#[test]
fn methods_one_per_line() {
    let fake = FakeServer::start(Reply::Result(json!(["rpc_get_methods", "volume_list"])));
    let out = fake.run(&["methods"]);
    assert_success(&out);
    assert_eq!(stdout(&out), "rpc_get_methods\nvolume_list\n");
    let (method, params) = method_params(&fake.request());
    assert_eq!((method.as_str(), params), ("rpc_get_methods", None));
}

#[test]
fn call_passes_raw_params_and_prints_json() {
    let fake = FakeServer::start(Reply::Result(json!({"ok": [1, 2]})));
    let out = fake.run(&["call", "backup_create", r#"{"volume": "vol0", "n": [1]}"#]);
    assert_success(&out);
    let printed: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    assert_eq!(printed, json!({"ok": [1, 2]}));
    let (method, params) = method_params(&fake.request());
    assert_eq!(method, "backup_create");
    assert_eq!(params, Some(json!({"volume": "vol0", "n": [1]})));

    let fake = FakeServer::start(Reply::Result(json!(null)));
    assert_success(&fake.run(&["call", "ping"]));
    let (method, params) = method_params(&fake.request());
    assert_eq!((method.as_str(), params), ("ping", None));
}

#[test]
fn server_error_exits_1_with_message_and_code() {
    let fake = FakeServer::start(Reply::Error(json!({
        "code": -17, "message": "volume vol0 already exists"
    })));
    let out = fake.run(&["volume", "create", "vol0", "--path", "/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: volume vol0 already exists (code -17)\n"
    );
    assert_eq!(stdout(&out), "");
    fake.request();
}

#[test]
fn server_error_data_is_shown() {
    let fake = FakeServer::start(Reply::Error(json!({
        "code": -32603, "message": "internal error", "data": {"panic": "oops"}
    })));
    let out = fake.run(&["volume", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).starts_with("error: internal error (code -32603)\n  data: "));
    fake.request();
}

#[test]
fn missing_socket_names_the_path_and_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.sock");
    let out = ctl(&["--rpc", path.to_str().expect("utf-8"), "volume", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(path.to_str().expect("utf-8")), "{err}");
    assert!(err.contains("ringblk serve"), "{err}");
}

#[test]
fn default_socket_path_is_used_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["volume", "list"])
        .env_remove("RINGBLK_RPC")
        .current_dir(dir.path())
        .output()
        .expect("run");
    // The default is absolute (the same as `ringblk serve`'s, #17): /run/ringblk as
    // root, $XDG_RUNTIME_DIR/ringblk otherwise, whatever the current directory.
    let expected = if nix::unistd::geteuid().is_root() {
        "/run/ringblk/ringblk.sock".to_string()
    } else {
        format!(
            "{}/ringblk/ringblk.sock",
            std::env::var("XDG_RUNTIME_DIR").unwrap_or_default()
        )
    };
    if !nix::unistd::geteuid().is_root() && std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("XDG_RUNTIME_DIR"), "{}", stderr(&out));
        return;
    }
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
}

#[test]
fn stale_socket_is_connection_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stale.sock");
    drop(UnixListener::bind(&path).expect("bind"));
    let out = ctl(&["--rpc", path.to_str().expect("utf-8"), "methods"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("refused") && err.contains("ringblk serve"),
        "{err}"
    );
    assert!(err.contains(path.to_str().expect("utf-8")), "{err}");
}

#[test]
fn env_var_selects_the_socket() {
    let fake = FakeServer::start(Reply::Result(json!([])));
    let out = Command::new(BIN)
        .args(["export", "list"])
        .env("RINGBLK_RPC", &fake.path)
        .output()
        .expect("run");
    assert_success(&out);
    assert_eq!(stdout(&out), "no exports\n");
    fake.request();
}

#[test]
fn timeout_when_the_server_does_not_answer() {
    let fake = FakeServer::start(Reply::Silent(Duration::from_secs(3)));
    let out = fake.run(&["--timeout", "0.3", "volume", "list"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("no reply") && err.contains("--timeout"),
        "{err}"
    );
    fake.request();
}

#[test]
fn malformed_reply_is_an_error_not_a_panic() {
    for raw in [
        &b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"result\": [1,"[..],
        b"not json",
        b"[1]",
    ] {
        let fake = FakeServer::start(Reply::Raw(raw));
        let out = fake.run(&["volume", "list"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(raw)
        );
        assert!(
            stderr(&out).starts_with("error: bad reply from the server"),
            "{}",
            stderr(&out)
        );
        fake.request();
    }
}

#[test]
fn wrong_result_shape_is_an_error() {
    let fake = FakeServer::start(Reply::Result(json!({"unexpected": true})));
    let out = fake.run(&["volume", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("expected a list"), "{}", stderr(&out));
    fake.request();
}

#[test]
fn usage_errors_exit_2_without_connecting() {
    for (args, needle) in [
        (
            &["volume", "create", "v", "--path", "/x", "--size", "10X"][..],
            "unknown size suffix",
        ),
        (
            &["volume", "create", "v", "--path", "/x", "--size", "10GB"],
            "ambiguous",
        ),
        (
            &[
                "volume",
                "create",
                "v",
                "--path",
                "/x",
                "--block-size",
                "1024",
            ],
            "512 or 4096",
        ),
        (
            &["volume", "create", "v", "--path", "/x", "--backend", "tape"],
            "tape",
        ),
        (&["volume", "create", "v"], "--path"),
        (&["call", "m", "{oops"], "not valid JSON"),
        (&["call", "m", "3"], "object or array"),
        (&["--timeout", "0", "methods"], "more than 0"),
        (&["frobnicate"], "unrecognized subcommand"),
        (&[], "Usage"),
    ] {
        let out = ctl(&[&["--rpc", "/nonexistent/sock"][..], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn help_at_every_level_has_an_example() {
    for args in [
        &[][..],
        &["volume"],
        &["volume", "create"],
        &["volume", "list"],
        &["volume", "delete"],
        &["export"],
        &["export", "list"],
        &["stats"],
        &["reactor"],
        &["reactor", "list"],
        &["methods"],
        &["call"],
    ] {
        let out = ctl(&[args, &["--help"]].concat());
        assert_success(&out);
        let help = stdout(&out);
        assert!(help.contains("Example"), "{args:?}:\n{help}");
        assert!(help.contains("ringblk-ctl "), "{args:?}:\n{help}");
    }
    let help = stdout(&ctl(&["--help"]));
    assert!(help.contains("RINGBLK_RPC") && help.contains("/run/ringblk/ringblk.sock"));
}

/// Guards against the CLI and the server drifting apart on framing: the real
/// `ringblk-ctl` request must be a single newline-terminated object.
#[test]
fn request_is_one_newline_terminated_object() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raw.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let server = thread::spawn(move || raw_request(&listener));
    let out = ctl(&[
        "--rpc",
        path.to_str().expect("utf-8"),
        "--timeout",
        "2",
        "methods",
    ]);
    let raw = server.join().expect("server");
    assert!(raw.ends_with(b"\n"), "{}", String::from_utf8_lossy(&raw));
    let value: Value = serde_json::from_slice(&raw).expect("JSON");
    assert_eq!(value["method"], json!("rpc_get_methods"));
    // The fake closed without replying.
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("without replying"),
        "{}",
        stderr(&out)
    );
}

fn raw_request(listener: &UnixListener) -> Vec<u8> {
    use std::io::Read;
    let (mut stream, _): (UnixStream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        raw.extend_from_slice(&buf[..n]);
        if raw.ends_with(b"\n") {
            break;
        }
    }
    raw
}

#[test]
fn fault_inject_sends_the_rule_and_describes_it() {
    let fake = FakeServer::start(Reply::Result(json!({"volume": "v", "rule": {
        "id": 1, "op": "read", "errno": "EIO", "offset": 1048576, "length": 65536,
        "count": 3, "hits": 0}})));
    let out = fake.run(&[
        "fault", "inject", "v", "--op", "read", "--offset", "1M", "--length", "64K", "--count", "3",
    ]);
    assert_success(&out);
    assert_eq!(
        stdout(&out),
        "fault rule 1 on v: read EIO at 1.0 MiB (+64.0 KiB) fails the next 3 requests\n"
    );
    let (method, params) = method_params(&fake.request());
    assert_eq!(method, "fault_inject");
    assert_eq!(
        params,
        Some(
            json!({"volume": "v", "op": "read", "errno": "EIO", "offset": 1048576,
                    "length": 65536, "count": 3})
        )
    );
}

#[test]
fn fault_inject_defaults_and_clear() {
    let fake = FakeServer::start(Reply::Result(json!({"volume": "v", "rule": {}})));
    assert_success(&fake.run(&["fault", "inject", "v", "--op", "write", "--errno", "ENOSPC"]));
    let (_, params) = method_params(&fake.request());
    // Offset and length are left to the server (0, to the end of the volume).
    assert_eq!(
        params,
        Some(json!({"volume": "v", "op": "write", "errno": "ENOSPC", "count": 1}))
    );
    let fake = FakeServer::start(Reply::Result(json!({"volume": "v", "cleared": 2})));
    let out = fake.run(&["fault", "clear", "v"]);
    assert_success(&out);
    assert_eq!(stdout(&out), "cleared 2 fault rule(s) on v\n");
    let (method, params) = method_params(&fake.request());
    assert_eq!(
        (method.as_str(), params),
        ("fault_clear", Some(json!({"volume": "v"})))
    );
    // Only the errors a disk gives, and only the known ops.
    assert!(
        !ctl(&["fault", "inject", "v", "--op", "read", "--errno", "EPERM"])
            .status
            .success()
    );
    assert!(!ctl(&["fault", "inject", "v", "--op", "trim"])
        .status
        .success());
}
