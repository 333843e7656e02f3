//! A backup's release and a volume's deletion close the connections to exactly what
//! went away (#12 2A.5: `events::notify` with `BdevEvent::Removed`, which replaced
//! `session::close_backup` and `close_volume`), and only those: the live volume, the
//! other backups and the other volumes keep serving.
//!
//! Negative control (run by hand when this was written): without the `notify` call
//! in `switchover::backup_release`, the release test fails at "the connection to
//! v@b1 is closed"; without the one in `Target::remove_volume`, the delete test fails
//! at "the connection to v is closed".

mod common;
use common::*;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const C_FIXED_NEWSTYLE: u32 = 1;
const C_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR: u32 = 1 << 31;
const CMD_READ: u16 = 0;

/// Liveness bound on blocking socket calls and on waiting for the server to act.
/// Never a speed assertion.
const IO_BOUND: Duration = Duration::from_secs(30);

fn read_n(s: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// Greeting, fixed newstyle, GO `export`: a connection in the transmission phase.
fn open(port: u16, export: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(IO_BOUND)).expect("timeout");
    s.set_write_timeout(Some(IO_BOUND)).expect("timeout");
    let g = read_n(&mut s, 18).expect("greeting");
    assert!(
        be64(&g) == NBDMAGIC && be64(&g[8..]) == IHAVEOPT,
        "bad greeting {g:02x?}"
    );
    let mut out = (C_FIXED_NEWSTYLE | C_NO_ZEROES).to_be_bytes().to_vec();
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_GO.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&data);
    s.write_all(&out).expect("GO");
    loop {
        let h = read_n(&mut s, 20).expect("option reply");
        let len = be32(&h[16..]) as usize;
        assert!(
            be64(&h) == OPTION_REPLY_MAGIC && len <= 1 << 20,
            "bad option reply {h:02x?}"
        );
        let kind = be32(&h[12..]);
        read_n(&mut s, len).expect("option data");
        assert!(kind & REP_ERR == 0, "GO {export} refused: {kind:#x}");
        if kind == REP_ACK {
            return s;
        }
    }
}

/// READs the first 4 KiB: the connection still serves (a reply with no error).
fn serves(s: &mut TcpStream, what: &str) {
    let mut req = [0u8; 28];
    req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
    req[8..16].copy_from_slice(&7u64.to_be_bytes());
    req[24..28].copy_from_slice(&4096u32.to_be_bytes());
    s.write_all(&req).unwrap_or_else(|e| panic!("{what}: {e}"));
    let h = read_n(s, 16).unwrap_or_else(|e| panic!("{what}: no reply: {e}"));
    assert_eq!(be32(&h), SIMPLE_REPLY_MAGIC, "{what}: bad reply {h:02x?}");
    assert_eq!(be32(&h[4..]), 0, "{what}: READ failed");
    read_n(s, 4096).unwrap_or_else(|e| panic!("{what}: no data: {e}"));
}

/// Reads until the server closes the connection; panics if it is still open after
/// `IO_BOUND`.
fn closed(s: &mut TcpStream, what: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                return
            }
            Err(e) => panic!("{what}: still open after {IO_BOUND:?}: {e}"),
        }
    }
}

fn two_volumes_two_backups() -> Server {
    let srv = Server::start(&[
        "--volume",
        "v=,backend=mem,size=16M",
        "--volume",
        "w=,backend=mem,size=16M",
    ]);
    run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    run_ok(ctl(&srv).args(["backup", "create", "v", "b2"]));
    run_ok(ctl(&srv).args(["backup", "create", "w", "b1"]));
    srv
}

#[test]
fn a_released_backups_connections_close_and_nothing_else() {
    let srv = two_volumes_two_backups();
    let mut live = open(srv.port, "v");
    let mut b1 = open(srv.port, "v@b1");
    let mut b2 = open(srv.port, "v@b2");
    // Another volume's backup of the same name.
    let mut w_b1 = open(srv.port, "w@b1");
    serves(&mut b1, "v@b1 before the release");

    run_ok(ctl(&srv).args(["backup", "release", "v@b1"]));
    closed(&mut b1, "the connection to v@b1 is closed");
    serves(&mut live, "v after releasing v@b1");
    serves(&mut b2, "v@b2 after releasing v@b1");
    serves(&mut w_b1, "w@b1 after releasing v@b1");
    srv.stop();
}

#[test]
fn a_deleted_volumes_connections_close_and_nothing_else() {
    let srv = two_volumes_two_backups();
    let mut live = open(srv.port, "v");
    let mut b2 = open(srv.port, "v@b2");
    let mut w = open(srv.port, "w");
    let mut w_b1 = open(srv.port, "w@b1");

    run_ok(ctl(&srv).args(["volume", "delete", "v"]));
    closed(&mut live, "the connection to v is closed");
    closed(&mut b2, "the connection to v@b2 is closed");
    serves(&mut w, "w after deleting v");
    serves(&mut w_b1, "w@b1 after deleting v");
    srv.stop();
}
