//! NBD over TLS (#16) with real clients: nbdinfo and nbdcopy (libnbd, GnuTLS) and
//! qemu-img (qemu's tls-creds-x509) against `ringblk serve --tls ...`, with
//! certificates from `ringblk tls-init`. Each verifying test has a negative control
//! in the same run: the refused client is refused while the right one succeeds.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const OPT_STARTTLS: u32 = 5;
const OPT_EXPORT_NAME: u32 = 1;
const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ringblk"))
}

/// `ringblk tls-init DIR/name` (a CA, a server and a client certificate).
fn tls_init(dir: &Path, name: &str) -> PathBuf {
    tls_init_with(dir, name, &[])
}

/// [`tls_init`] with more clients: `name/clients/CLIENT/` each.
fn tls_init_with(dir: &Path, name: &str, clients: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut cmd = Command::new(bin());
    cmd.args(["tls-init"]).arg(&out);
    for c in clients {
        cmd.args(["--client", c]);
    }
    let st = cmd.output().expect("run tls-init");
    assert!(st.status.success(), "tls-init: {st:?}");
    out
}

fn nbdinfo(port: u16, export: &str, certs: Option<&Path>) -> Output {
    let uri = match certs {
        Some(c) => format!(
            "nbds://127.0.0.1:{port}/{export}?tls-certificates={}",
            c.display()
        ),
        None => format!("nbd://127.0.0.1:{port}/{export}"),
    };
    run(Command::new("timeout").args(["20", "nbdinfo", &uri]))
}

fn nbdinfo_list(port: u16, certs: &Path) -> String {
    let uri = format!(
        "nbds://127.0.0.1:{port}/?tls-certificates={}",
        certs.display()
    );
    let out = run(Command::new("timeout").args(["20", "nbdinfo", "--list", "--json", &uri]));
    assert!(out.status.success(), "nbdinfo --list: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn serve_tls(extra: &[&str], certs: &Path) -> Server {
    let mut args = vec!["--tls-creds", certs.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    Server::start_logged(&args)
}

/// Fixed newstyle greeting and client flags; returns the stream after them.
fn raw_negotiate(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).expect("greeting");
    assert_eq!(
        u64::from_be_bytes(greet[..8].try_into().expect("8")),
        NBD_MAGIC
    );
    s.write_all(&1u32.to_be_bytes()).expect("client flags"); // FIXED_NEWSTYLE
    s
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).expect("send option");
}

/// Reads option replies until a final one (not NBD_REP_INFO); returns its type.
fn final_reply(s: &mut impl Read) -> u32 {
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply");
        let ty = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        let mut d = vec![0u8; len];
        s.read_exact(&mut d).expect("reply data");
        if ty != 3 {
            return ty;
        }
    }
}

/// nbdinfo and qemu-img info over TLS; qemu-img convert writes, nbdcopy reads back
/// over TLS and the bytes match (negative control: a flipped byte does not).
#[test]
fn real_clients_over_tls_move_verified_bytes() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--volume",
            "ram=,backend=mem,size=16M",
        ],
        &certs,
    );
    let info = nbdinfo(srv.port, "ram", Some(&certs));
    assert!(info.status.success(), "nbdinfo over TLS: {info:?}");
    assert!(String::from_utf8_lossy(&info.stdout).contains("with TLS"));

    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=ram,tls-creds=tls0",
        srv.port
    );
    let qi = run(Command::new("timeout").args([
        "30",
        "qemu-img",
        "info",
        "--object",
        &creds,
        "--image-opts",
        &opts,
    ]));
    assert!(qi.status.success(), "qemu-img info over TLS: {qi:?}");
    assert!(String::from_utf8_lossy(&qi.stdout).contains("16 MiB"));

    let src = t.path().join("src.img");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).expect("write src");
    let conv = run(Command::new("timeout").args([
        "60",
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        "--object",
        &creds,
        src.to_str().expect("utf8"),
        "--target-image-opts",
        &opts,
    ]));
    assert!(conv.status.success(), "qemu-img convert over TLS: {conv:?}");
    let back = t.path().join("back.img");
    let uri = format!(
        "nbds://127.0.0.1:{}/ram?tls-certificates={}",
        srv.port,
        certs.display()
    );
    let cp =
        run(Command::new("timeout").args(["60", "nbdcopy", &uri, back.to_str().expect("utf8")]));
    assert!(cp.status.success(), "nbdcopy over TLS: {cp:?}");
    let got = std::fs::read(&back).expect("read back");
    assert!(got == data, "bytes read over TLS differ from those written");
    // Negative control: the comparison sees a single flipped byte.
    let mut bad = got.clone();
    bad[12345] ^= 1;
    assert!(bad != data);
}

/// FORCEDTLS: a plain GO gets NBD_REP_ERR_TLS_REQD and nbdinfo without TLS fails;
/// control: with `--tls on`, the same plain GO on a plaintext-allowed export is
/// acknowledged and a TLS-only one gets TLS_REQD (SELECTIVETLS).
#[test]
fn require_refuses_plain_clients_with_the_spec_error() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let srv = serve_tls(
        &["--tls", "require", "--volume", "ram=,backend=mem,size=1M"],
        &certs,
    );
    let mut s = raw_negotiate(srv.port);
    send_option(&mut s, OPT_GO, &nbd::go_data(b"ram"));
    assert_eq!(final_reply(&mut s), REP_ERR_TLS_REQD);
    // STARTTLS is still acknowledged on the same connection.
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(final_reply(&mut s), REP_ACK);
    let plain = nbdinfo(srv.port, "ram", None);
    assert!(
        !plain.status.success(),
        "plain nbdinfo served under --tls require"
    );
    drop(srv);

    let cfg = t.path().join("on.toml");
    std::fs::write(
        &cfg,
        "[[volume]]\nname = \"open\"\nbackend = \"mem\"\nsize = \"1M\"\nplaintext = true\n\
         [[volume]]\nname = \"tlsonly\"\nbackend = \"mem\"\nsize = \"1M\"\n",
    )
    .expect("config");
    let srv = serve_tls(
        &["--tls", "on", "--config", cfg.to_str().expect("utf8")],
        &certs,
    );
    let mut s = raw_negotiate(srv.port);
    send_option(&mut s, OPT_GO, &nbd::go_data(b"tlsonly"));
    assert_eq!(final_reply(&mut s), REP_ERR_TLS_REQD);
    // A missing name gets the same answer: a plain client learns no TLS-only name.
    send_option(&mut s, OPT_GO, &nbd::go_data(b"no-such-export"));
    assert_eq!(final_reply(&mut s), REP_ERR_TLS_REQD);
    send_option(&mut s, OPT_GO, &nbd::go_data(b"open"));
    assert_eq!(final_reply(&mut s), REP_ACK);
    assert!(nbdinfo(srv.port, "open", None).status.success());
    assert!(nbdinfo(srv.port, "tlsonly", Some(&certs)).status.success());
    // NBD_OPT_LIST: a plain client sees only the plaintext export, a TLS one both.
    let plain = run(Command::new("timeout").args([
        "20",
        "nbdinfo",
        "--list",
        "--json",
        &format!("nbd://127.0.0.1:{}/", srv.port),
    ]));
    let plain = String::from_utf8_lossy(&plain.stdout).into_owned();
    assert!(
        plain.contains("\"open\"") && !plain.contains("tlsonly"),
        "{plain}"
    );
    let tls = nbdinfo_list(srv.port, &certs);
    assert!(tls.contains("\"open\"") && tls.contains("tlsonly"), "{tls}");
}

/// `--tls-verify-peer`: no client certificate, or one from another CA, is refused;
/// control: the CA's client in the same run is served.
#[test]
fn verify_peer_refuses_missing_and_foreign_certificates() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let other = tls_init(t.path(), "other");
    let srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--volume",
            "ram=,backend=mem,size=1M",
        ],
        &certs,
    );
    // Trusts our server (our CA) but has no client certificate.
    let anon = t.path().join("anon");
    std::fs::create_dir(&anon).expect("mkdir");
    std::fs::copy(certs.join("ca-cert.pem"), anon.join("ca-cert.pem")).expect("cp");
    // Trusts our server but presents a client certificate of another CA.
    let foreign = t.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::copy(certs.join("ca-cert.pem"), foreign.join("ca-cert.pem")).expect("cp");
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(f), foreign.join(f)).expect("cp");
    }
    let a = nbdinfo(srv.port, "ram", Some(&anon));
    assert!(!a.status.success(), "served without a client certificate");
    let f = nbdinfo(srv.port, "ram", Some(&foreign));
    assert!(!f.status.success(), "served a certificate of another CA");
    let ok = nbdinfo(srv.port, "ram", Some(&certs));
    assert!(ok.status.success(), "the CA's client was refused: {ok:?}");
}

/// One JSON-RPC call on the server's socket; the response line.
fn rpc(srv: &Server, method: &str, params: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(&srv.rpc).expect("rpc connect");
    let req =
        format!("{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"{method}\",\"params\":{params}}}\n");
    s.write_all(req.as_bytes()).expect("rpc send");
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).expect("rpc read") == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Allow-lists with two clients of one CA in the same run: alice lists and opens
/// `shared` and the backup `shared@b1` (covered by its volume's list); bob, not on
/// that list, sees neither in NBD_OPT_LIST and cannot open them (NBD_REP_ERR_UNKNOWN,
/// as for a missing export), while bob's own `bobs` is hidden from alice.
#[test]
fn allow_list_two_clients_same_run_covers_backups() {
    let t = tmpdir();
    let certs = tls_init_with(t.path(), "certs", &["alice", "bob"]);
    let alice = certs.join("clients/alice");
    let bob = certs.join("clients/bob");
    let img = t.path().join("shared.img");
    let cfg = t.path().join("acl.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[volume]]\nname = \"shared\"\npath = \"{}\"\nsize = \"4M\"\ntls_allow = [\"dns:alice\"]\n\
             [[volume]]\nname = \"bobs\"\nbackend = \"mem\"\nsize = \"1M\"\ntls_allow = [\"dn:CN=bob, O=ringblk\"]\n",
            img.display()
        ),
    )
    .expect("config");
    let srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--config",
            cfg.to_str().expect("utf8"),
        ],
        &certs,
    );
    let made = rpc(
        &srv,
        "backup_create",
        "{\"volume\":\"shared\",\"name\":\"b1\"}",
    );
    assert!(made.contains("ready"), "backup_create: {made}");
    let a = nbdinfo_list(srv.port, &alice);
    assert!(
        a.contains("\"shared\"") && a.contains("shared@b1"),
        "alice: {a}"
    );
    assert!(!a.contains("bobs"), "alice sees bob's export: {a}");
    let b = nbdinfo_list(srv.port, &bob);
    assert!(!b.contains("shared"), "bob sees alice's exports: {b}");
    assert!(
        b.contains("\"bobs\""),
        "bob does not see his export (dn:): {b}"
    );
    for export in ["shared", "shared@b1"] {
        assert!(
            nbdinfo(srv.port, export, Some(&alice)).status.success(),
            "{export}"
        );
        let refused = nbdinfo(srv.port, export, Some(&bob));
        assert!(!refused.status.success(), "bob opened {export}");
    }
    // qemu (GnuTLS, OPT_GO) with bob's credentials is refused too.
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        bob.display()
    );
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export=shared,tls-creds=tls0",
        srv.port
    );
    let qi = run(Command::new("timeout").args([
        "30",
        "qemu-img",
        "info",
        "--object",
        &creds,
        "--image-opts",
        &opts,
    ]));
    assert!(!qi.status.success(), "qemu-img opened shared as bob");
    // NBD_OPT_EXPORT_NAME over TLS: bob is disconnected (the option has no error
    // reply), alice gets the export's size; same run, same server.
    let export_name = |who: &Path| {
        let (mut c, mut sock) = tls_session(srv.port, who);
        let mut st = rustls::Stream::new(&mut c, &mut sock);
        send_option(&mut st, OPT_EXPORT_NAME, b"shared");
        let mut reply = [0u8; 10];
        st.read_exact(&mut reply).ok().map(|()| reply)
    };
    let a = export_name(&alice).expect("alice: EXPORT_NAME refused");
    assert_eq!(u64::from_be_bytes(a[..8].try_into().expect("8")), 4 << 20);
    assert!(export_name(&bob).is_none(), "bob: EXPORT_NAME served");
}

/// fio's nbd engine (fio 3.33, libnbd) runs a verify job over `nbds://`. fio does not
/// allow libnbd's `tls-certificates=` (a local file in a URI), so the server here
/// does not ask for a client certificate and libnbd uses its default trust.
/// Negative control: a verify job expecting another
/// pattern over the same data fails.
#[test]
fn fio_verify_job_over_nbds() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let srv = serve_tls(
        &[
            "--tls",
            "require",
            "--log",
            "info",
            "--volume",
            "ram=,backend=mem,size=16M",
        ],
        &certs,
    );
    let uri = format!("--uri=nbds://127.0.0.1:{}/ram", srv.port);
    let fio = |extra: &[&str]| {
        let mut c = Command::new("timeout");
        c.args([
            "120",
            "fio",
            "--name=tls",
            "--ioengine=nbd",
            &uri,
            "--bs=4k",
            "--iodepth=16",
        ]);
        c.args(["--size=8M", "--verify_state_save=0"]).args(extra);
        c.current_dir(t.path());
        run(&mut c)
    };
    let ok = fio(&["--rw=randwrite", "--verify=crc32c", "--do_verify=1"]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && out.contains("err= 0"),
        "fio verify: {ok:?}"
    );
    let bad = fio(&["--rw=read", "--verify=pattern", "--verify_pattern=0xaa"]);
    assert!(
        !bad.status.success(),
        "negative control: a wrong pattern verified"
    );
    // Under `--tls require` nothing but STARTTLS is served before TLS (see
    // `require_refuses_plain_clients_with_the_spec_error`), so fio's success above
    // was over TLS; the server logs each TLS session at info.
    assert!(
        srv.stderr_log().contains("TLS established"),
        "fio did not use TLS"
    );
}

/// `--rpc` in a directory others can write is refused (the socket gives full control);
/// control: the same server starts with the socket in a private directory.
#[test]
fn rpc_socket_refused_in_world_writable_directory() {
    use std::os::unix::fs::PermissionsExt;
    let t = tmpdir();
    let open = t.path().join("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let data = t.path().join("data");
    let out = run(Command::new(bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--volume",
            "r=,backend=mem,size=1M",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--rpc")
        .arg(open.join("s.sock")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writable by others"),
        "{out:?}"
    );
    // Control: a private directory (the harness's) works.
    let srv = Server::start(&["--volume", "r=,backend=mem,size=1M"]);
    let mode = std::fs::metadata(&srv.rpc)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "RPC socket mode");
}

/// Allow-lists: the client (`dns:client`) lists and opens `mine`, but `theirs`
/// (allowing only `dns:someone-else`) is absent from its list and refused like a
/// missing export.
#[test]
fn allow_list_hides_exports_from_unlisted_clients() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let cfg = t.path().join("acl.toml");
    std::fs::write(
        &cfg,
        "[[volume]]\nname = \"mine\"\nbackend = \"mem\"\nsize = \"1M\"\ntls_allow = [\"dns:client\"]\n\
         [[volume]]\nname = \"theirs\"\nbackend = \"mem\"\nsize = \"1M\"\ntls_allow = [\"dns:someone-else\", \"dn:CN=x\"]\n",
    )
    .expect("config");
    let srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--config",
            cfg.to_str().expect("utf8"),
        ],
        &certs,
    );
    let list = nbdinfo_list(srv.port, &certs);
    assert!(
        list.contains("\"mine\""),
        "listed client does not see its export: {list}"
    );
    assert!(!list.contains("theirs"), "unlisted export shown: {list}");
    assert!(nbdinfo(srv.port, "mine", Some(&certs)).status.success());
    let refused = nbdinfo(srv.port, "theirs", Some(&certs));
    assert!(
        !refused.status.success(),
        "unlisted client opened the export"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("unknown") || err.contains("No such"), "{err}");
}

/// Hostile bytes around the TLS handshake close only their own connection (garbage
/// after STARTTLS, a truncated record, a client that stops mid-handshake and is cut
/// by the handshake timeout) while a verified client keeps writing and reading.
#[test]
fn tls_robustness_beside_a_working_client() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let mut srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--handshake-timeout",
            "1",
            "--volume",
            "ram=,backend=mem,size=4M",
        ],
        &certs,
    );
    let port = srv.port;
    let starttls = |s: &mut TcpStream| {
        send_option(s, OPT_STARTTLS, &[]);
        assert_eq!(final_reply(s), REP_ACK);
    };
    // Garbage instead of a ClientHello: the server closes (EOF or reset).
    let mut g = raw_negotiate(port);
    starttls(&mut g);
    g.write_all(&[0xffu8; 512]).expect("garbage");
    assert_closed(&mut g, "garbage instead of a ClientHello");
    let mut b = [0u8; 64];
    // A truncated record: a handshake header promising more than is sent.
    let mut tr = raw_negotiate(port);
    starttls(&mut tr);
    tr.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00])
        .expect("partial");
    // A client that stalls mid-handshake (after STARTTLS, sends nothing).
    let mut st = raw_negotiate(port);
    starttls(&mut st);
    // Garbage before the NBD handshake is done (bad option magic).
    let mut pre = raw_negotiate(port);
    pre.write_all(&[0x55u8; 64]).expect("garbage");
    assert_closed(&mut pre, "garbage option magic before STARTTLS");

    // The verified client writes and reads beside them.
    let src = t.path().join("src.img");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).expect("write");
    let uri = format!(
        "nbds://127.0.0.1:{port}/ram?tls-certificates={}",
        certs.display()
    );
    let up =
        run(Command::new("timeout").args(["60", "nbdcopy", src.to_str().expect("utf8"), &uri]));
    assert!(up.status.success(), "{up:?}");
    // The stalled and truncated handshakes are cut by the timeout (1 s).
    for (name, s) in [("stalled", &mut st), ("truncated", &mut tr)] {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0) | Err(_))
                && !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{name} handshake not closed: {r:?}"
        );
    }
    let back = t.path().join("back.img");
    let down =
        run(Command::new("timeout").args(["60", "nbdcopy", &uri, back.to_str().expect("utf8")]));
    assert!(down.status.success(), "{down:?}");
    assert!(std::fs::read(&back).expect("read") == data);
    srv.assert_alive();
}

/// A rustls client with `certs`' CA and client certificate.
fn client_config(certs: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(certs.join("ca-cert.pem")).expect("ca");
    roots.add(ca).expect("add ca");
    let chain = vec![CertificateDer::from_pem_file(certs.join("client-cert.pem")).expect("cert")];
    let key = PrivateKeyDer::from_pem_file(certs.join("client-key.pem")).expect("key");
    #[allow(deprecated)] // ring, as the server uses
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    std::sync::Arc::new(cfg)
}

/// NBD negotiation up to an acknowledged STARTTLS.
fn after_starttls(port: u16) -> TcpStream {
    let mut s = raw_negotiate(port);
    send_option(&mut s, OPT_STARTTLS, &[]);
    assert_eq!(final_reply(&mut s), REP_ACK);
    s
}

/// A completed TLS session after STARTTLS.
fn tls_session(port: u16, certs: &Path) -> (rustls::ClientConnection, TcpStream) {
    let mut s = after_starttls(port);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut c = rustls::ClientConnection::new(client_config(certs), name).expect("client");
    while c.is_handshaking() {
        c.complete_io(&mut s).expect("TLS handshake");
    }
    (c, s)
}

/// Whether the server closes `s` within `bound` (alerts before the close are read
/// and dropped).
fn closed_within(s: &mut TcpStream, bound: Duration) -> bool {
    s.set_read_timeout(Some(bound)).expect("timeout");
    let mut b = vec![0u8; 64 * 1024];
    for _ in 0..1000 {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true, // reset
        }
    }
    false // the server keeps sending
}

fn assert_closed(s: &mut TcpStream, what: &str) {
    assert!(
        closed_within(s, Duration::from_secs(5)),
        "{what}: connection still open after 5 s"
    );
}

/// Hostile TLS inside the session, each on its own connection: garbage in the
/// middle of a ClientHello, a record cut short then EOF, a record cut short then a
/// stall (the handshake timeout, 1 s, cuts it), a corrupted record after the TLS
/// handshake. Each closes only itself: a well-behaved TLS client on the same path
/// (the control) opens the export, and a verified nbdcopy writes and reads back the
/// same bytes beside them; the server stays up.
#[test]
fn hostile_tls_records_close_only_their_connection() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let mut srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--handshake-timeout",
            "1",
            "--volume",
            "ram=,backend=mem,size=4M",
        ],
        &certs,
    );
    let port = srv.port;
    // Garbage inside the TLS handshake: half a real ClientHello, then junk.
    let mut g = after_starttls(port);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut c = rustls::ClientConnection::new(client_config(&certs), name).expect("client");
    let mut hello = Vec::new();
    c.write_tls(&mut hello).expect("client hello");
    g.write_all(&hello[..hello.len() / 2]).expect("half hello");
    g.write_all(&[0xa5u8; 300]).expect("junk");
    // A truncated record after the TLS handshake, then EOF.
    let (_c1, mut eof) = tls_session(port, &certs);
    eof.write_all(&[23, 3, 3, 0, 200, 1, 2, 3])
        .expect("torn record");
    eof.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // A truncated record, then nothing (NBD handshake unfinished: the timeout).
    let (_c2, mut stall) = tls_session(port, &certs);
    stall
        .write_all(&[23, 3, 3, 0, 200, 1, 2, 3])
        .expect("torn record");
    // A corrupted record: a real encrypted option with a flipped byte.
    let (mut c3, mut bad) = tls_session(port, &certs);
    send_option(&mut c3.writer(), OPT_GO, &nbd::go_data(b"ram"));
    let mut rec = Vec::new();
    while c3.wants_write() {
        c3.write_tls(&mut rec).expect("record");
    }
    let last = rec.len() - 3;
    rec[last] ^= 0x40;
    bad.write_all(&rec).expect("corrupt record");

    // Control: the same path without the damage opens the export.
    let (mut ok, mut ok_sock) = tls_session(port, &certs);
    {
        let mut st = rustls::Stream::new(&mut ok, &mut ok_sock);
        send_option(&mut st, OPT_GO, &nbd::go_data(b"ram"));
        assert_eq!(final_reply(&mut st), REP_ACK, "control client refused");
    }
    // The verified client writes and reads beside them.
    let src = t.path().join("src.img");
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(&src, &data).expect("write");
    let uri = format!(
        "nbds://127.0.0.1:{port}/ram?tls-certificates={}",
        certs.display()
    );
    let up =
        run(Command::new("timeout").args(["60", "nbdcopy", src.to_str().expect("utf8"), &uri]));
    assert!(up.status.success(), "{up:?}");
    assert_closed(&mut g, "garbage in the ClientHello");
    assert_closed(&mut eof, "torn record then EOF");
    assert_closed(&mut stall, "torn record then stall");
    assert_closed(&mut bad, "corrupted record");
    // Negative control of the check: the healthy session is not seen as closed.
    assert!(!closed_within(&mut ok_sock, Duration::from_secs(1)));
    // NBD_CMD_DISC: the server ends the TLS session cleanly with close_notify
    // (rustls reports a close without it as UnexpectedEof).
    {
        let mut st = rustls::Stream::new(&mut ok, &mut ok_sock);
        let mut disc = 0x2560_9513u32.to_be_bytes().to_vec();
        disc.extend_from_slice(&[0, 0, 0, 2]); // flags 0, NBD_CMD_DISC
        disc.extend_from_slice(&[0u8; 20]); // cookie, offset, length
        st.write_all(&disc).expect("disc");
        let mut b = [0u8; 16];
        let r = st.read(&mut b);
        assert!(matches!(r, Ok(0)), "no clean TLS close after DISC: {r:?}");
    }
    let back = t.path().join("back.img");
    let down =
        run(Command::new("timeout").args(["60", "nbdcopy", &uri, back.to_str().expect("utf8")]));
    assert!(down.status.success(), "{down:?}");
    assert!(std::fs::read(&back).expect("read") == data);
    srv.assert_alive();
}

/// `tls-init` never overwrites: a second run on the same directory fails and leaves
/// the CA as it was (a quick start must not replace a CA clients already trust).
#[test]
fn tls_init_refuses_to_overwrite() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let ca = std::fs::read(certs.join("ca-cert.pem")).expect("ca");
    let again = run(Command::new(bin()).arg("tls-init").arg(&certs));
    assert!(!again.status.success(), "second tls-init succeeded");
    assert_eq!(std::fs::read(certs.join("ca-cert.pem")).expect("ca"), ca);
    // Control: a fresh directory works, and its keys are private.
    use std::os::unix::fs::PermissionsExt;
    let other = tls_init(t.path(), "other");
    let mode = std::fs::metadata(other.join("server-key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "server key readable by others");
}

/// A TLS session that completed GO on `export` (transmission phase).
fn tls_transmission(
    port: u16,
    certs: &Path,
    export: &str,
) -> (rustls::ClientConnection, TcpStream) {
    let (mut c, mut s) = tls_session(port, certs);
    {
        let mut st = rustls::Stream::new(&mut c, &mut s);
        send_option(&mut st, OPT_GO, &nbd::go_data(export.as_bytes()));
        assert_eq!(final_reply(&mut st), REP_ACK, "GO over TLS");
    }
    (c, s)
}

/// An NBD request header (simple, no flags).
fn request(kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&offset.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

/// The transmission-phase cases of the raw-socket suite, inside TLS: a bad request
/// magic, a WRITE whose payload stops (cut by `--request-timeout`), a torn record
/// mid-request then EOF. Each closes only itself; a healthy TLS session on the
/// same export writes and reads its bytes back (the control) beside them.
#[test]
fn transmission_hostility_over_tls() {
    let t = tmpdir();
    let certs = tls_init(t.path(), "certs");
    let mut srv = serve_tls(
        &[
            "--tls",
            "require",
            "--tls-verify-peer",
            "--request-timeout",
            "1",
            "--volume",
            "ram=,backend=mem,size=4M",
        ],
        &certs,
    );
    let port = srv.port;
    let (mut c1, mut magic) = tls_transmission(port, &certs, "ram");
    rustls::Stream::new(&mut c1, &mut magic)
        .write_all(&[0x5au8; 28])
        .expect("bad magic");
    let (mut c2, mut stall) = tls_transmission(port, &certs, "ram");
    {
        let mut st = rustls::Stream::new(&mut c2, &mut stall);
        st.write_all(&request(1, 7, 0, 65536))
            .expect("write header");
        st.write_all(&[1u8; 100]).expect("part of the payload");
    }
    let (_c3, mut torn) = tls_transmission(port, &certs, "ram");
    torn.write_all(&[23, 3, 3, 0, 64, 9, 9])
        .expect("torn record");
    torn.shutdown(std::net::Shutdown::Write).expect("shutdown");

    // Control: a healthy session writes 4 KiB and reads it back.
    let (mut ok, mut ok_sock) = tls_transmission(port, &certs, "ram");
    {
        let mut st = rustls::Stream::new(&mut ok, &mut ok_sock);
        let block = vec![0xc3u8; 4096];
        st.write_all(&request(1, 1, 8192, 4096)).expect("write");
        st.write_all(&block).expect("payload");
        let mut reply = [0u8; 16];
        st.read_exact(&mut reply).expect("write reply");
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "write failed");
        st.write_all(&request(0, 2, 8192, 4096)).expect("read");
        st.read_exact(&mut reply).expect("read reply");
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "read failed");
        let mut got = vec![0u8; 4096];
        st.read_exact(&mut got).expect("read data");
        assert!(got == block, "bytes differ");
    }
    assert_closed(&mut magic, "bad request magic over TLS");
    assert_closed(&mut stall, "WRITE payload stalled over TLS");
    assert_closed(&mut torn, "torn record mid-transmission");
    assert!(!closed_within(&mut ok_sock, Duration::from_millis(1500)));
    srv.assert_alive();
}
