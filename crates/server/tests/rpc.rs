//! The JSON-RPC server driven through a real Unix socket by raw clients.
//!
//! Each test names the failure it guards against: a control socket that one bad client
//! can wedge, crash or starve is an outage of the whole management plane.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ringblk_server::rpc::{parse_params, RpcConfig, RpcError, RpcHandler, RpcServer};
use serde::Deserialize;
use serde_json::{json, Value};

/// A toy handler: `echo`, `add {a, b}`, `bump` (counts calls), `count`, `boom` (panics).
#[derive(Default)]
struct Toy {
    bumps: AtomicU64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddParams {
    a: i64,
    b: i64,
}

impl RpcHandler for Toy {
    fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        match method {
            "echo" => Ok(params),
            "add" => {
                let p: AddParams = parse_params(params)?;
                p.a.checked_add(p.b)
                    .map(|sum| json!(sum))
                    .ok_or_else(|| RpcError::invalid("overflow"))
            }
            "bump" => Ok(json!(self.bumps.fetch_add(1, Ordering::SeqCst) + 1)),
            "count" => Ok(json!(self.bumps.load(Ordering::SeqCst))),
            "boom" => panic!("toy handler exploded"),
            _ => Err(RpcError::method_not_found(method)),
        }
    }

    fn methods(&self) -> Vec<&'static str> {
        vec!["echo", "add", "bump", "count", "boom"]
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Option<RpcServer>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_config(RpcConfig::default())
    }

    fn with_config(config: RpcConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rpc.sock");
        let server =
            RpcServer::start_with_config(&path, Arc::new(Toy::default()), config).expect("start");
        assert_eq!(server.path(), path);
        Self {
            _dir: dir,
            path,
            server: Some(server),
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.path)
    }
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).expect("connect");
        // A hung test must fail, not hang CI.
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Self {
            stream,
            reader,
            next_id: 1,
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// One reply line, or `None` at EOF.
    fn reply(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "reply not newline-terminated: {line}");
                Some(serde_json::from_str(&line).expect("reply is JSON"))
            }
            // ECONNRESET after the reply counts as the server closing.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    fn expect_reply(&mut self) -> Value {
        self.reply().expect("server closed instead of replying")
    }

    fn expect_closed(&mut self) {
        assert_eq!(self.reply(), None, "expected the server to close");
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if !params.is_null() {
            request["params"] = params;
        }
        self.send_raw(format!("{request}\n").as_bytes());
        let reply = self.expect_reply();
        assert_eq!(reply["jsonrpc"], json!("2.0"));
        assert_eq!(reply["id"], json!(id));
        reply
    }
}

fn error_code(reply: &Value) -> i64 {
    reply["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error reply: {reply}"))
}

#[test]
fn normal_call_and_several_requests_per_connection() {
    let fx = Fixture::new();
    let mut c = fx.client();
    assert_eq!(c.call("add", json!({"a": 2, "b": 3}))["result"], json!(5));
    assert_eq!(c.call("add", json!([40, 2]))["result"], json!(42));
    assert_eq!(
        c.call("echo", json!({"x": [1, 2]}))["result"],
        json!({"x": [1, 2]})
    );
    assert_eq!(c.call("echo", Value::Null)["result"], Value::Null);
}

#[test]
fn back_to_back_objects_without_newlines() {
    let fx = Fixture::new();
    let mut c = fx.client();
    c.send_raw(
        br#"{"jsonrpc":"2.0","id":1,"method":"echo","params":[1]}{"jsonrpc":"2.0","id":2,"method":"echo","params":[2]}  {"jsonrpc":"2.0","id":"3","method":"echo","params":[3]}"#,
    );
    for (id, n) in [(json!(1), 1), (json!(2), 2), (json!("3"), 3)] {
        let r = c.expect_reply();
        assert_eq!(r["id"], id);
        assert_eq!(r["result"], json!([n]));
    }
}

#[test]
fn rpc_get_methods_lists_handler_methods() {
    let fx = Fixture::new();
    let mut c = fx.client();
    assert_eq!(
        c.call("rpc_get_methods", Value::Null)["result"],
        json!(["add", "boom", "bump", "count", "echo", "rpc_get_methods"])
    );
    // SPDK's clients send params; they are accepted.
    assert!(c.call("rpc_get_methods", json!({"current": true}))["result"].is_array());
}

#[test]
fn malformed_json_is_32700_then_close() {
    for garbage in [
        &b"{\"jsonrpc\": \"2.0\", nope}\n"[..],
        b"}{",
        b"\xff\xfe{}",
        b"tru",
    ] {
        let fx = Fixture::new();
        let mut c = fx.client();
        c.send_raw(garbage);
        if garbage == b"tru" {
            // An incomplete literal is only a parse error once the stream ends.
            c.stream.shutdown(Shutdown::Write).expect("shutdown");
        }
        let r = c.expect_reply();
        assert_eq!(
            error_code(&r),
            -32700,
            "{}",
            String::from_utf8_lossy(garbage)
        );
        assert_eq!(r["id"], Value::Null);
        c.expect_closed();
    }
}

#[test]
fn eof_in_the_middle_of_a_request_is_32700() {
    let fx = Fixture::new();
    let mut c = fx.client();
    c.send_raw(br#"{"jsonrpc":"2.0","id":1,"meth"#);
    c.stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(error_code(&c.expect_reply()), -32700);
    c.expect_closed();
}

#[test]
fn deep_nesting_is_rejected_without_overflowing_the_stack() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let deep = "[".repeat(100_000);
    c.send_raw(deep.as_bytes());
    assert_eq!(error_code(&c.expect_reply()), -32700);
    c.expect_closed();
    assert_eq!(fx.client().call("count", Value::Null)["result"], json!(0));
}

#[test]
fn invalid_requests_are_32600_and_the_connection_goes_on() {
    let fx = Fixture::new();
    let mut c = fx.client();
    for bad in [
        json!({"jsonrpc": "1.0", "id": 1, "method": "echo"}),
        json!({"id": 1, "method": "echo"}),
        json!({"jsonrpc": "2.0", "id": 1}),
        json!({"jsonrpc": "2.0", "id": 1, "method": 5}),
        json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": "str"}),
        json!([{"jsonrpc": "2.0", "id": 1, "method": "echo"}]),
        json!(42),
    ] {
        c.send_raw(format!("{bad}\n").as_bytes());
        assert_eq!(error_code(&c.expect_reply()), -32600, "{bad}");
    }
    assert_eq!(c.call("add", json!([1, 1]))["result"], json!(2));
}

#[test]
fn unknown_method_is_32601() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let r = c.call("volume_frobnicate", json!({}));
    assert_eq!(error_code(&r), -32601);
    assert!(r["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("volume_frobnicate")));
    assert_eq!(c.call("add", json!([1, 2]))["result"], json!(3));
}

#[test]
fn bad_params_are_32602_with_serde_message() {
    let fx = Fixture::new();
    let mut c = fx.client();
    let r = c.call("add", json!({"a": 1}));
    assert_eq!(error_code(&r), -32602);
    assert!(r["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("missing field `b`")));
    assert_eq!(
        error_code(&c.call("add", json!({"a": "x", "b": 1}))),
        -32602
    );
    assert_eq!(
        error_code(&c.call("add", json!({"a": 1, "b": 1, "c": 1}))),
        -32602
    );
    assert_eq!(error_code(&c.call("add", Value::Null)), -32602);
    // An application error (negative errno) passes through unchanged.
    assert_eq!(error_code(&c.call("add", json!([i64::MAX, 1]))), -22);
}

#[test]
fn notifications_run_but_get_no_reply() {
    let fx = Fixture::new();
    let mut c = fx.client();
    c.send_raw(
        b"{\"jsonrpc\":\"2.0\",\"method\":\"bump\"}\n{\"jsonrpc\":\"2.0\",\"method\":\"bump\"}\n",
    );
    // Also a notification that fails: still silent.
    c.send_raw(b"{\"jsonrpc\":\"2.0\",\"method\":\"no_such\"}\n");
    // Replies are in order, so the next reply is to this call and proves the
    // notifications sent before it got none.
    let r = c.call("count", Value::Null);
    assert_eq!(r["result"], json!(2));
}

#[test]
fn handler_panic_is_32603_and_server_keeps_answering() {
    let fx = Fixture::new();
    let mut c = fx.client();
    for _ in 0..3 {
        let r = c.call("boom", Value::Null);
        assert_eq!(error_code(&r), -32603);
        assert!(r["error"]["data"]["panic"]
            .as_str()
            .is_some_and(|m| m.contains("exploded")));
        // Same connection still served.
        assert_eq!(c.call("add", json!([2, 2]))["result"], json!(4));
    }
    assert_eq!(fx.client().call("add", json!([3, 3]))["result"], json!(6));
}

#[test]
fn one_clients_garbage_does_not_disturb_another() {
    let fx = Fixture::new();
    let path = fx.path.clone();
    let good = thread::spawn(move || {
        let mut c = Client::connect(&path);
        for i in 0..200_i64 {
            assert_eq!(c.call("add", json!([i, 1]))["result"], json!(i + 1));
        }
    });
    for _ in 0..50 {
        let mut bad = fx.client();
        bad.send_raw(b"{\"jsonrpc\": \"2.0\", \"id\": 1, \"method\": [}\n");
        assert_eq!(error_code(&bad.expect_reply()), -32700);
        bad.expect_closed();
        let mut panicky = fx.client();
        assert_eq!(error_code(&panicky.call("boom", Value::Null)), -32603);
    }
    good.join().expect("good client failed");
}

#[test]
fn oversized_request_is_rejected_and_closed() {
    // Default bound (1 MiB): the writer is still sending when the server gives up.
    let fx = Fixture::new();
    let mut c = fx.client();
    let mut writer = c.stream.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        let head = br#"{"jsonrpc":"2.0","id":1,"method":"echo","params":[""#;
        let body = vec![b'a'; 2 << 20];
        // EPIPE/ECONNRESET once the server closes is expected.
        let _ = writer
            .write_all(head)
            .and_then(|()| writer.write_all(&body))
            .and_then(|()| writer.write_all(b"\"]}\n"));
    });
    let r = c.expect_reply();
    assert_eq!(error_code(&r), -32600);
    assert_eq!(r["error"]["data"]["max_request_bytes"], json!(1 << 20));
    c.expect_closed();
    sender.join().expect("sender");
    assert_eq!(fx.client().call("add", json!([1, 1]))["result"], json!(2));
}

#[test]
fn request_just_under_the_bound_is_served() {
    let fx = Fixture::with_config(RpcConfig {
        max_request_bytes: 4096,
        ..RpcConfig::default()
    });
    let mut c = fx.client();
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": ["x"]});
    let filler = 4096 - request.to_string().len();
    let big =
        json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": ["x".repeat(1 + filler)]});
    assert_eq!(big.to_string().len(), 4096);
    // The bound resets per request, so many full-size requests in a row are fine.
    for _ in 0..3 {
        c.send_raw(big.to_string().as_bytes());
        assert!(c.expect_reply().get("result").is_some());
    }
    c.send_raw(format!("{}\n", big.to_string().replace("\"x", "\"xx")).as_bytes());
    assert_eq!(error_code(&c.expect_reply()), -32600);
    c.expect_closed();
}

#[test]
fn connection_limit_turns_extra_clients_away() {
    let fx = Fixture::with_config(RpcConfig {
        max_connections: 2,
        ..RpcConfig::default()
    });
    let mut a = fx.client();
    let mut b = fx.client();
    // A round trip on each proves both are registered.
    a.call("count", Value::Null);
    b.call("count", Value::Null);
    let mut extra = fx.client();
    let r = extra.expect_reply();
    assert_eq!(error_code(&r), -32000);
    extra.expect_closed();
    assert_eq!(a.call("add", json!([1, 1]))["result"], json!(2));
    drop(b);
    // The slot frees when b's thread notices EOF; retry briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = fx.client();
        // A rejected client may find the socket closed before it writes (EPIPE); the
        // busy reply is still there to read.
        let _ = c
            .stream
            .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"count\"}\n");
        let r = c.expect_reply();
        if r.get("result").is_some() {
            break;
        }
        assert_eq!(error_code(&r), -32000);
        assert!(Instant::now() < deadline, "slot never freed");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn idle_connection_is_closed_silently() {
    let fx = Fixture::with_config(RpcConfig {
        idle_timeout: Duration::from_millis(200),
        ..RpcConfig::default()
    });
    let mut c = fx.client();
    c.call("count", Value::Null);
    let started = Instant::now();
    c.expect_closed();
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[test]
fn stalled_request_gets_an_error_and_is_closed() {
    let fx = Fixture::with_config(RpcConfig {
        idle_timeout: Duration::from_millis(200),
        ..RpcConfig::default()
    });
    let mut c = fx.client();
    c.send_raw(br#"{"jsonrpc": "2.0", "id": 1, "#);
    assert_eq!(error_code(&c.expect_reply()), -32600);
    c.expect_closed();
}

#[test]
fn slow_drip_request_hits_the_request_timeout() {
    // A client that sends one byte just inside the idle timeout must not hold a
    // connection forever.
    let fx = Fixture::with_config(RpcConfig {
        idle_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_millis(300),
        ..RpcConfig::default()
    });
    let mut c = fx.client();
    let mut writer = c.stream.try_clone().expect("clone");
    let drip = thread::spawn(move || {
        for byte in br#"{"jsonrpc": "2.0", "id": 1, "method": "count"}"# {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let r = c.expect_reply();
    assert_eq!(error_code(&r), -32600);
    assert!(r["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("within")));
    c.expect_closed();
    drip.join().expect("drip");
}

#[test]
fn socket_mode_is_0600() {
    let fx = Fixture::new();
    let mode = std::fs::metadata(&fx.path)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rpc.sock");
    // A listener that went away without removing its file, as after a crash.
    drop(UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let server = RpcServer::start(&path, Arc::new(Toy::default())).expect("stale not replaced");
    assert_eq!(
        Client::connect(&path).call("add", json!([1, 2]))["result"],
        json!(3)
    );
    server.shutdown();
}

#[test]
fn live_socket_is_refused_and_keeps_serving() {
    let fx = Fixture::new();
    let err = RpcServer::start(&fx.path, Arc::new(Toy::default()))
        .expect_err("second server on a live socket");
    assert_eq!(err.code, -libc::EADDRINUSE);
    assert!(err.message.contains("already listening"), "{err}");
    assert_eq!(fx.client().call("add", json!([1, 2]))["result"], json!(3));
}

#[test]
fn regular_file_at_the_path_is_never_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rpc.sock");
    std::fs::write(&path, b"precious").expect("write");
    let err =
        RpcServer::start(&path, Arc::new(Toy::default())).expect_err("started over a regular file");
    assert_eq!(err.code, -libc::EEXIST);
    assert_eq!(std::fs::read(&path).expect("read"), b"precious");
}

#[test]
fn missing_directory_is_an_errno_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("no/such/dir/rpc.sock");
    let err = RpcServer::start(&path, Arc::new(Toy::default())).expect_err("bind in a missing dir");
    assert_eq!(err.code, -libc::ENOENT);
}

#[test]
fn shutdown_closes_connections_and_removes_the_socket() {
    let mut fx = Fixture::new();
    let mut idle = fx.client();
    idle.call("count", Value::Null);
    let mut partial = fx.client();
    partial.send_raw(b"{\"jsonrpc\":");
    let started = Instant::now();
    fx.server.take().expect("server").shutdown();
    // Must not wait for the 30 s idle timeout of the connected clients.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!fx.path.exists());
    idle.expect_closed();
    let mut rest = Vec::new();
    let _ = partial.reader.read_to_end(&mut rest);
    assert!(UnixStream::connect(&fx.path).is_err());
}

#[test]
fn restart_on_the_same_path_after_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rpc.sock");
    for i in 0..3_i64 {
        let server = RpcServer::start(&path, Arc::new(Toy::default())).expect("start");
        assert_eq!(
            Client::connect(&path).call("add", json!([i, 0]))["result"],
            json!(i)
        );
        drop(server); // Drop shuts down like shutdown().
        assert!(!path.exists());
    }
}
