//! vhost-user exports managed over RPC and `--vhost` (issue #13): create, list and
//! delete; the socket's mode; refused params and paths; and the control plane
//! answering a vhost-user frontend (rust-vmm's `vhost` crate, frontend side) on the
//! socket: features, queue count, config space, a refused message closing that
//! connection and the next client being served.
//!
//! The real-client proofs (libblkio, a QEMU guest) are `vhost_blkio.rs` and
//! `vhost_guest.rs`; this file checks the management surface and the protocol's
//! control messages.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;

/// One JSON-RPC call on the server's socket; the whole response object.
fn rpc(srv: &Server, method: &str, params: Value) -> Value {
    let mut s = UnixStream::connect(&srv.rpc).expect("connect rpc");
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    s.write_all(format!("{req}\n").as_bytes()).expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {e}: {line}"))
}

fn ok(srv: &Server, method: &str, params: Value) -> Value {
    let r = rpc(srv, method, params.clone());
    assert!(r.get("error").is_none(), "{method} {params}: {r}");
    r["result"].clone()
}

fn code(srv: &Server, method: &str, params: Value) -> i64 {
    let r = rpc(srv, method, params.clone());
    r["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("{method} {params}: expected an error, got {r}"))
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

const VOL: &str = "v=,backend=mem,size=64M";

#[test]
fn vhost_exports_are_created_listed_and_deleted() {
    let srv = Server::start(&["--cores", "0", "--volume", VOL]);
    let sock = srv.path("v.vhost");
    let s = sock.to_str().expect("utf8");
    assert_eq!(ok(&srv, "vhost_list", json!({})), json!([]));

    let created = ok(&srv, "vhost_create", json!({"volume": "v", "socket": s}));
    assert_eq!(created["export"], "v");
    assert_eq!(created["read_only"], false);
    assert_eq!(created["size_bytes"], 64 << 20);
    // Default: one queue per reactor (one core here).
    assert_eq!(created["num_queues"], 1);
    assert!(is_socket(&sock));
    assert_eq!(mode_of(&sock), 0o600, "default socket mode");

    // Two queues on one reactor: both on reactor 0 (index % reactors).
    let sock2 = srv.path("v2.vhost");
    let s2 = sock2.to_str().expect("utf8");
    let two = ok(
        &srv,
        "vhost_create",
        json!({"volume": "v", "socket": s2, "mode": "0660", "num_queues": 2}),
    );
    // Negative control of the mode check: a different mode is seen as different.
    assert_eq!(mode_of(&sock2), 0o660);
    let queues = two["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 2);
    for q in queues {
        assert_eq!(q["reactor"], 0);
        assert_eq!(q["running"], false);
        assert_eq!(q["served"], 0);
    }

    let list = ok(&srv, "vhost_list", json!({}));
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|e| e["connected"] == false));

    assert_eq!(ok(&srv, "vhost_delete", json!({"socket": s})), true);
    assert!(!sock.exists(), "socket file removed");
    assert_eq!(
        code(&srv, "vhost_delete", json!({"socket": s})),
        -2,
        "ENOENT"
    );
    assert_eq!(
        ok(&srv, "vhost_list", json!({})).as_array().map(Vec::len),
        Some(1)
    );
    // The same path can be used again.
    ok(&srv, "vhost_create", json!({"volume": "v", "socket": s}));
    // A clean stop removes every socket.
    let st = srv.stop();
    assert!(st.success());
    assert!(
        !sock.exists() && !sock2.exists(),
        "sockets left after a stop"
    );
}

#[test]
fn bad_vhost_params_are_refused() {
    let srv = Server::start(&["--cores", "0", "--volume", VOL]);
    let sock = srv.path("x.vhost");
    let s = sock.to_str().expect("utf8");
    let einval = -22;
    assert_eq!(
        code(&srv, "vhost_create", json!({"volume": "nope", "socket": s})),
        -19
    );
    assert_eq!(
        code(
            &srv,
            "vhost_create",
            json!({"volume": "v@nope", "socket": s})
        ),
        -19
    );
    assert_eq!(
        code(&srv, "vhost_create", json!({"volume": "", "socket": s})),
        einval
    );
    assert_eq!(code(&srv, "vhost_create", json!({"volume": "v"})), -32602);
    assert_eq!(
        code(
            &srv,
            "vhost_create",
            json!({"volume": "v", "socket": s, "color": 1})
        ),
        -32602
    );
    for mode in [json!("999"), json!("rw"), json!(0o1777), json!(-1)] {
        let p = json!({"volume": "v", "socket": s, "mode": mode});
        assert_eq!(code(&srv, "vhost_create", p), -32602, "mode {mode}");
    }
    for n in [0, 17] {
        let p = json!({"volume": "v", "socket": s, "num_queues": n});
        assert_eq!(code(&srv, "vhost_create", p), einval, "num_queues {n}");
    }
    assert!(!sock.exists(), "a refused create leaves no socket");

    // A regular file is never replaced, and is left as it was.
    let file = srv.path("precious");
    std::fs::write(&file, b"keep me").expect("write");
    let f = file.to_str().expect("utf8");
    assert_eq!(
        code(&srv, "vhost_create", json!({"volume": "v", "socket": f})),
        -17
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
    // A socket this server already exports on, and one another server listens on.
    ok(&srv, "vhost_create", json!({"volume": "v", "socket": s}));
    assert_eq!(
        code(&srv, "vhost_create", json!({"volume": "v", "socket": s})),
        -17
    );
    let live = srv.path("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).expect("bind");
    let l = live.to_str().expect("utf8");
    assert_eq!(
        code(&srv, "vhost_create", json!({"volume": "v", "socket": l})),
        -98
    );
    // A stale socket (nothing listens) is replaced.
    let stale = srv.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let st = stale.to_str().expect("utf8");
    ok(&srv, "vhost_create", json!({"volume": "v", "socket": st}));
    assert_eq!(code(&srv, "vhost_delete", json!({})), -32602);
    assert_eq!(code(&srv, "vhost_delete", json!({"socket": f})), -2);
}

#[test]
fn vhost_flag_exports_at_start_and_refuses_bad_paths() {
    let dir = tmpdir();
    let sock = dir.path().join("v.vhost");
    let arg = format!("v={}", sock.display());
    let srv = Server::start_in(dir, &["--cores", "0", "--volume", VOL, "--vhost", &arg]);
    assert!(
        srv.stdout_lines.iter().any(|l| l.contains("vhost-user")),
        "{:?}",
        srv.stdout_lines
    );
    let list = ok(&srv, "vhost_list", json!({}));
    assert_eq!(list[0]["export"], "v");
    assert_eq!(list[0]["socket"], sock.to_str().expect("utf8"));
    assert_eq!(mode_of(&sock), 0o600);
    drop(srv);

    // A path that is a regular file: the start fails, names it, and keeps the file.
    let dir = tmpdir();
    let file = dir.path().join("f");
    std::fs::write(&file, b"data").expect("write");
    let arg = format!("v={}", file.display());
    let bin = Path::new(env!("CARGO_BIN_EXE_ringblk"));
    let failed = Server::try_start_with(
        bin,
        dir,
        &["--cores", "0", "--volume", VOL, "--vhost", &arg],
        "warn",
        std::process::Stdio::piped(),
    );
    let Err(failed) = failed else {
        panic!("a --vhost path that is a regular file was accepted");
    };
    assert!(!failed.status.success());
    assert_eq!(std::fs::read(&file).expect("read"), b"data");

    // The flag's grammar.
    let out = run(Command::new(bin).args(["serve", "--vhost", "nosocket"]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("VOL=SOCKET_PATH"));
    let help = run_ok(Command::new(bin).args(["serve", "--help"]));
    assert!(help.contains("--vhost <VOL=SOCKET_PATH>"), "{help}");
}

/// The control plane over the wire: what a frontend reads (features, protocol
/// features, queue count, the config space's capacity), a refused message (a vring
/// size that is not a power of two) closing that connection without harming the
/// server, and the next client being served on the same socket.
#[test]
fn a_vhost_user_frontend_negotiates_and_bad_messages_close_its_connection() {
    let mut srv = Server::start_logged(&["--cores", "0", "--volume", VOL]);
    let sock = srv.path("v.vhost");
    let s = sock.to_str().expect("utf8");
    ok(
        &srv,
        "vhost_create",
        json!({"volume": "v", "socket": s, "num_queues": 2}),
    );

    let mut fe = Frontend::connect(&sock, 2).expect("connect");
    fe.set_owner().expect("owner");
    let features = fe.get_features().expect("features");
    assert!(features & (1 << 32) != 0, "VERSION_1");
    assert!(features & (1 << 30) != 0, "PROTOCOL_FEATURES");
    assert!(features & (1 << 5) == 0, "RO on a live volume");
    fe.set_features(features).expect("set features");
    let proto = fe.get_protocol_features().expect("protocol features");
    let want = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(proto.contains(want), "{proto:?}");
    fe.set_protocol_features(want)
        .expect("set protocol features");
    assert_eq!(fe.get_queue_num().expect("queue num"), 2);
    let (_, cfg) = fe
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        .expect("config");
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().expect("8")),
        (64 << 20) / 512
    );
    assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 2);
    let listed = ok(&srv, "vhost_list", json!({}));
    assert_eq!(listed[0]["connected"], true);

    // REPLY_ACK is on: the refused size comes back as an error, then the server
    // closes the connection.
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    assert!(
        fe.set_vring_num(0, 3).is_err(),
        "a vring size of 3 was accepted"
    );
    assert!(fe.get_features().is_err(), "the connection stayed open");
    drop(fe);

    // The next client is served.
    let fe = Frontend::connect(&sock, 2).expect("reconnect");
    fe.set_owner().expect("owner");
    assert_eq!(fe.get_features().expect("features"), features);
    drop(fe);
    let listed = ok(&srv, "vhost_list", json!({}));
    assert!(listed[0]["connections"].as_u64() >= Some(2), "{listed}");
    assert!(listed[0]["last_error"].is_string(), "{listed}");
    srv.assert_alive();
}
