//! Hostile and broken clients, written by hand on raw `TcpStream`s (no NBD library):
//! malformed handshakes, oversize and unknown options, transmission-phase garbage,
//! clients that vanish mid-request or stall, too many connections and a thousand
//! connections of random bytes.
//!
//! Throughout every test a well-behaved client (also hand-written, see [`GoodClient`])
//! writes and reads back checked data from another thread, and at the end each test
//! asserts that the server process is still running, never printed "panicked", and
//! released every connection's socket.

mod common;
use common::nbd::*;
use common::*;
use ringblk_nbd::proto::*;

use std::io::{self, Write};
use std::net::Shutdown;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// Wire values come from `ringblk_nbd::proto`; its test
// `wire_constants_match_the_spec_literals` checks each against the spec's number.
const NBD_EINVAL: u32 = NbdErrno::Inval as u32;
const NBD_ENOSPC: u32 = NbdErrno::NoSpc as u32;

const MIB: usize = 1 << 20;
const VOL0_BYTES: u64 = 64 << 20;
/// Where abusive writes may land (never `vol0`, which the good client verifies).
const SCRATCH: &str = "scratch";

/// Liveness bound on any single blocking read or write, and on waiting for the server
/// to close a connection or release a slot. Never a speed assertion.
const IO_BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// The hand-written NBD client is `common::nbd::Client`.

/// A full handshake into `export` with simple replies.
fn open(port: u16, export: &str) -> io::Result<Client> {
    Client::open(port, export, IO_BOUND)
}

/// Writes `pattern(write_seed)` at `offset`, reads it back and compares with
/// `pattern(expect_seed)` (the same seed unless a negative control says otherwise).
fn verify_round(
    c: &mut Client,
    cookie: u64,
    offset: u64,
    write_seed: u64,
    expect_seed: u64,
) -> Result<(), String> {
    const LEN: usize = 64 * 1024;
    let data = pattern(write_seed, LEN);
    let err = c
        .write(cookie, offset, &data)
        .map_err(|e| format!("write: {e}"))?;
    if err != 0 {
        return Err(format!("write failed with NBD error {err}"));
    }
    let (err, got) = c
        .read(cookie + 1, offset, LEN as u32)
        .map_err(|e| format!("read: {e}"))?;
    if err != 0 {
        return Err(format!("read failed with NBD error {err}"));
    }
    if got != pattern(expect_seed, LEN) {
        return Err(format!("read back wrong bytes at {offset}"));
    }
    c.request(CMD_FLUSH, 0, cookie + 2, 0, 0, &[])
        .map_err(|e| e.to_string())?;
    match c.simple_reply(cookie + 2, 0) {
        Ok((0, _)) => Ok(()),
        other => Err(format!("flush: {other:?}")),
    }
}

// ---------------------------------------------------------------------------------------
// The well-behaved client that runs during the abuse

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A new connection (full handshake) for every round.
    Reconnect,
    /// One connection for all rounds (holds one connection slot).
    Persistent,
}

struct GoodClient {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl GoodClient {
    /// Starts the client and waits (bounded) for its first verified round.
    fn spawn(port: u16, mode: Mode) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (s, r, e) = (stop.clone(), rounds.clone(), errors.clone());
        let thread = std::thread::spawn(move || {
            let mut conn: Option<Client> = None;
            let mut i: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                i += 1;
                let res = (|| -> Result<(), String> {
                    if conn.is_none() {
                        conn = Some(open(port, "vol0").map_err(|e| format!("handshake: {e}"))?);
                    }
                    let c = conn.as_mut().expect("connected");
                    // Rounds cycle over the first 8 MiB of vol0.
                    let offset = (i % 128) * 64 * 1024;
                    verify_round(c, i * 4, offset, i, i)
                })();
                match res {
                    Ok(()) => {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(err) => {
                        e.lock().unwrap().push(format!("round {i}: {err}"));
                        conn = None;
                        // Keep trying (the test fails anyway), without spinning.
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                if mode == Mode::Reconnect {
                    if let Some(c) = conn.take() {
                        c.disconnect();
                    }
                }
            }
            if let Some(c) = conn.take() {
                c.disconnect();
            }
        });
        let g = GoodClient {
            stop,
            rounds,
            errors,
            thread: Some(thread),
        };
        g.await_rounds(1);
        g
    }

    fn await_rounds(&self, n: usize) {
        let start = Instant::now();
        while self.rounds.load(Ordering::SeqCst) < n {
            let errs = self.errors.lock().unwrap().clone();
            assert!(errs.is_empty(), "well-behaved client failed: {errs:#?}");
            assert!(
                start.elapsed() < 2 * IO_BOUND,
                "well-behaved client made no progress"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Requires two more verified rounds (the server still serves after the abuse), stops
    /// the client and asserts it never failed. Returns the number of rounds.
    fn finish(mut self) -> usize {
        let now = self.rounds.load(Ordering::SeqCst);
        self.await_rounds(now + 2);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("good client thread");
        }
        let errs = self.errors.lock().unwrap().clone();
        assert!(errs.is_empty(), "well-behaved client failed: {errs:#?}");
        self.rounds.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------------------
// Test rig: a server with vol0 (64 MiB file) and scratch (16 MiB mem), a good client,
// and the end-of-test checks.

struct Rig {
    srv: Server,
    _images: tempfile::TempDir,
    baseline_sockets: usize,
    good: Option<GoodClient>,
}

fn server_sockets(srv: &Server) -> usize {
    let dir = format!("/proc/{}/fd", srv.child.id());
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| l.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

fn peak_rss_kib(srv: &Server) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", srv.child.id())).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Rig {
    fn start(extra: &[&str], mode: Mode) -> Rig {
        let images = tmpdir();
        let vol0 = format!("vol0={},size=64M", images.path().join("vol0.img").display());
        let scratch = format!("{SCRATCH}=,backend=mem,size=16M");
        let mut args = vec!["--volume", &vol0, "--volume", &scratch];
        args.extend_from_slice(extra);
        let srv = Server::start_logged(&args);
        let baseline_sockets = server_sockets(&srv);
        let good = Some(GoodClient::spawn(srv.port, mode));
        Rig {
            srv,
            _images: images,
            baseline_sockets,
            good,
        }
    }

    fn port(&self) -> u16 {
        self.srv.port
    }

    /// The server is alive and has not panicked, and the well-behaved client completes
    /// a new verified round now, in the middle of the abuse.
    fn assert_alive(&mut self) {
        self.srv.assert_alive();
        if let Some(g) = &self.good {
            g.await_rounds(g.rounds.load(Ordering::SeqCst) + 1);
        }
        self.srv.assert_alive();
    }

    /// The good client kept working; the server is alive, did not panic, released every
    /// connection, and stops cleanly.
    fn finish(mut self) {
        self.assert_alive();
        if let Some(g) = self.good.take() {
            let rounds = g.finish();
            eprintln!("well-behaved client: {rounds} verified rounds");
        }
        self.assert_alive();
        let start = Instant::now();
        loop {
            let n = server_sockets(&self.srv);
            if n <= self.baseline_sockets {
                break;
            }
            assert!(
                start.elapsed() < IO_BOUND,
                "server still holds {n} sockets (baseline {}): leaked connections",
                self.baseline_sockets
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.assert_alive();
        let st = self.srv.stop();
        assert!(st.success(), "server did not stop cleanly: {st}");
    }
}

// ---------------------------------------------------------------------------------------
// Handshake abuse

#[test]
fn bad_client_flags_close_the_connection() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    let cases: [(u32, &str); 5] = [
        (0x8000_0001, "unknown client flag bit 31"),
        (FLAG_C_FIXED_NEWSTYLE | 0x100, "unknown client flag bit 8"),
        (0, "no fixed-newstyle flag"),
        (0xffff_ffff, "all client flags"),
        (
            (NBD_MAGIC >> 32) as u32,
            "server magic echoed as client flags",
        ),
    ];
    for round in 0..10 {
        for (flags, what) in cases {
            let mut c = Client::connect(rig.port(), IO_BOUND).unwrap();
            c.greeting().unwrap();
            c.flags(flags).unwrap();
            // Whatever follows must not be parsed: an option that would get a reply.
            let _ = c.option(OPT_LIST, &[]);
            c.expect_silent_close(&format!("{what} (round {round})"));
        }
        rig.assert_alive();
    }
    // Negative control: valid flags, and the same option is answered.
    let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
    c.option(OPT_LIST, &[]).unwrap();
    let r = c.replies(OPT_LIST).unwrap();
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert_eq!(listed(&r), [b"scratch".to_vec(), b"vol0".to_vec()]);
    assert!(
        c.wait_closed(Duration::from_millis(500)).is_err(),
        "a valid client was closed"
    );
    // Leave properly (else the server holds it until the handshake timeout).
    assert_eq!(c.ask(OPT_ABORT, &[]).unwrap(), REP_ACK);
    assert!(c.wait_closed(IO_BOUND).unwrap().is_empty());
    rig.finish();
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    let magics = [IHAVEOPT ^ 1, NBD_MAGIC, OPTION_REPLY_MAGIC, 0, u64::MAX];
    for round in 0..10 {
        for magic in magics {
            let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
            // A valid option first (answered), then the bad header.
            assert_eq!(c.ask(OPT_STRUCTURED_REPLY, &[]).unwrap(), REP_ACK);
            c.option_header(magic, OPT_LIST, 0).unwrap();
            c.expect_silent_close(&format!("option magic {magic:#x} (round {round})"));
        }
        rig.assert_alive();
    }
    // Negative control: the right magic gets an answer and the connection stays.
    let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
    c.option_header(IHAVEOPT, OPT_LIST, 0).unwrap();
    assert_eq!(c.replies(OPT_LIST).unwrap().last().unwrap().kind, REP_ACK);
    assert!(
        c.wait_closed(Duration::from_millis(500)).is_err(),
        "a valid client was closed"
    );
    // Leave properly (else the server holds it until the handshake timeout).
    assert_eq!(c.ask(OPT_ABORT, &[]).unwrap(), REP_ACK);
    assert!(c.wait_closed(IO_BOUND).unwrap().is_empty());
    rig.finish();
}

#[test]
fn oversize_option_lengths_are_drained_or_closed_never_buffered() {
    // No handshake timeout in play: a close can only come from the length checks.
    let mut rig = Rig::start(&["--handshake-timeout", "3600"], Mode::Reconnect);
    let rss_before = peak_rss_kib(&rig.srv);
    let junk = vec![0xa5u8; MIB];
    for (option, length) in [
        (OPT_LIST, 1u32 << 30),
        (OPT_GO, 1 << 30),
        (OPT_INFO, u32::MAX),
        (0xdead, 1 << 30),
        (OPT_EXPORT_NAME, 1 << 30),
        (OPT_EXPORT_NAME, 4097),
        (OPT_GO, (16 << 20) + 1),
    ] {
        for _ in 0..3 {
            let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
            c.option_header(IHAVEOPT, option, length).unwrap();
            // Keep sending data: a server that buffered or drained it would keep reading.
            let _ = c.send(&junk[..(length as usize).min(MIB) - 1]);
            c.expect_silent_close(&format!("option {option:#x} with length {length}"));
        }
        rig.assert_alive();
    }
    // Up to the drain limit the data is read and discarded, the option refused, and the
    // negotiation continues.
    let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
    for (option, len, want) in [
        (OPT_GO, MIB, REP_ERR_TOO_BIG),
        (OPT_LIST, 100 * 1024, REP_ERR_TOO_BIG),
        (0xdead, 16 * MIB, REP_ERR_UNSUP),
        (OPT_INFO, 16 * MIB, REP_ERR_TOO_BIG),
    ] {
        c.option_header(IHAVEOPT, option, len as u32).unwrap();
        for _ in 0..len / MIB {
            c.send(&junk).unwrap();
        }
        c.send(&junk[..len % MIB]).unwrap();
        let r = c.replies(option).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, want, "option {option:#x} with {len} bytes");
    }
    assert_eq!(
        c.go(b"vol0").unwrap().expect("GO after refused options").0,
        VOL0_BYTES
    );
    let (err, _) = c.read(7, 0, 4096).unwrap();
    assert_eq!(err, 0);
    c.disconnect();
    // ABORT's data is ignored, however long: drained then acknowledged.
    let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
    c.option_header(IHAVEOPT, OPT_ABORT, 3 * MIB as u32)
        .unwrap();
    for _ in 0..3 {
        c.send(&junk).unwrap();
    }
    assert_eq!(c.replies(OPT_ABORT).unwrap()[0].kind, REP_ACK);
    assert!(c.wait_closed(IO_BOUND).unwrap().is_empty());
    let rss_after = peak_rss_kib(&rig.srv);
    // Nothing above may have been buffered: 1 GiB and 4 GiB options never allocate.
    assert!(
        rss_after < rss_before + 64 * 1024,
        "server peak RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    rig.finish();
}

#[test]
fn export_names_long_unknown_and_malformed() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    let long = vec![b'a'; 5000];
    let max_len_unknown = vec![b'b'; 4096];
    for _ in 0..5 {
        let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
        assert_eq!(
            c.go(&long).unwrap(),
            Err(REP_ERR_TOO_BIG),
            "GO with a 5000-byte name"
        );
        assert_eq!(c.ask(OPT_INFO, &go_data(&long)).unwrap(), REP_ERR_TOO_BIG);
        assert_eq!(
            c.go(&max_len_unknown).unwrap(),
            Err(REP_ERR_UNKNOWN),
            "GO with a 4096-byte name"
        );
        assert_eq!(c.go(b"nope").unwrap(), Err(REP_ERR_UNKNOWN));
        assert_eq!(c.go(b"vol0@snap").unwrap(), Err(REP_ERR_UNKNOWN));
        assert_eq!(c.go(b"vol").unwrap(), Err(REP_ERR_UNKNOWN));
        assert_eq!(
            c.go(b"vol0\0").unwrap(),
            Err(REP_ERR_INVALID),
            "NUL in the name"
        );
        assert_eq!(
            c.go(&[0xff, 0xfe]).unwrap(),
            Err(REP_ERR_INVALID),
            "name not UTF-8"
        );
        // Name length field past the option data.
        let mut bad = go_data(b"vol0");
        bad[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(c.ask(OPT_GO, &bad).unwrap(), REP_ERR_INVALID);
        // Info request count not matching the data.
        let mut bad = go_data(b"vol0");
        bad.extend_from_slice(&[0, 3]);
        assert_eq!(c.ask(OPT_GO, &bad).unwrap(), REP_ERR_INVALID);
        // After all that, the negotiation still works.
        let (size, _) = c.go(b"vol0").unwrap().expect("GO vol0");
        assert_eq!(size, VOL0_BYTES);
        assert_eq!(c.read(1, 0, 512).unwrap().0, 0);
        c.disconnect();
    }
    // EXPORT_NAME has no error reply: an unknown or over-long name closes.
    for name in [&b"nope"[..], &long, &max_len_unknown, b""] {
        let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
        if name.is_empty() {
            // The empty name is the default export: it works (control for this loop).
            c.option(OPT_EXPORT_NAME, name).unwrap();
            let r = c.read_n(10).unwrap();
            assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), VOL0_BYTES);
            continue;
        }
        c.option(OPT_EXPORT_NAME, name).unwrap();
        c.expect_silent_close(&format!("EXPORT_NAME of {} bytes", name.len()));
    }
    rig.assert_alive();
    // Negative control: EXPORT_NAME vol0 enters transmission (10 bytes, no zeroes).
    let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
    c.option(OPT_EXPORT_NAME, b"vol0").unwrap();
    let r = c.read_n(10).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), VOL0_BYTES);
    let data = pattern(99, 4096);
    assert_eq!(c.write(5, 40 * MIB as u64, &data).unwrap(), 0);
    assert_eq!(c.read(6, 40 * MIB as u64, 4096).unwrap(), (0, data.clone()));
    c.disconnect();
    // Without NO_ZEROES the reply carries 124 zero bytes, and the stream is in step after.
    let mut c = Client::connect(rig.port(), IO_BOUND).unwrap();
    c.greeting().unwrap();
    c.flags(FLAG_C_FIXED_NEWSTYLE).unwrap();
    c.option(OPT_EXPORT_NAME, b"vol0").unwrap();
    let r = c.read_n(10 + 124).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), VOL0_BYTES);
    assert!(r[10..].iter().all(|&b| b == 0), "padding is not zeros");
    assert_eq!(c.read(7, 40 * MIB as u64, 4096).unwrap(), (0, data));
    c.disconnect();
    rig.finish();
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    for _ in 0..5 {
        let mut c = Client::start(rig.port(), IO_BOUND).unwrap();
        for (option, data) in [
            (0x1234u32, &b"0123456789"[..]),
            (0, b""),
            (OPT_STARTTLS, b""),
            (OPT_EXTENDED_HEADERS, b""),
            (4, b"peek"), // NBD_OPT_PEEK_EXPORT, withdrawn
            (u32::MAX, &[0u8; 300][..]),
            (1 << 31, b"x"),
        ] {
            assert_eq!(
                c.ask(option, data).unwrap(),
                REP_ERR_UNSUP,
                "option {option:#x}"
            );
        }
        assert_eq!(
            c.ask(OPT_STRUCTURED_REPLY, b"junk").unwrap(),
            REP_ERR_INVALID
        );
        assert_eq!(c.ask(OPT_LIST, b"junk").unwrap(), REP_ERR_INVALID);
        let (size, _) = c.go(b"vol0").unwrap().expect("GO after unknown options");
        assert_eq!(size, VOL0_BYTES);
        let data = pattern(7, 8192);
        assert_eq!(c.write(1, 41 * MIB as u64, &data).unwrap(), 0);
        assert_eq!(c.read(2, 41 * MIB as u64, 8192).unwrap(), (0, data));
        c.disconnect();
        rig.assert_alive();
    }
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// Transmission abuse

#[test]
fn transmission_garbage_closes_the_connection() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    for round in 0..10u64 {
        // Bad magic straight away.
        let mut c = open(rig.port(), SCRATCH).unwrap();
        c.send(&request_bytes(
            REQUEST_MAGIC ^ 0x100,
            CMD_READ,
            0,
            1,
            0,
            512,
            &[],
        ))
        .unwrap();
        c.expect_silent_close("bad request magic");
        // Garbage right behind a valid READ: a hard disconnect. The READ's reply may or
        // may not go out first (the server may abort in-flight replies), but nothing
        // else, and never a partial reply.
        let mut c = open(rig.port(), SCRATCH).unwrap();
        let mut b = request_bytes(REQUEST_MAGIC, CMD_READ, 0, 42, 0, 512, &[]);
        b.extend_from_slice(&pattern(round, 28));
        c.send(&b).unwrap();
        let got = c.wait_closed(IO_BOUND).unwrap();
        if !got.is_empty() {
            assert_eq!(got.len(), 16 + 512, "READ reply before the close");
            assert_eq!(got[0..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(got[4..8], [0; 4]);
            assert_eq!(got[8..16], 42u64.to_be_bytes());
        }
        // Plain text on the wire.
        let mut c = open(rig.port(), SCRATCH).unwrap();
        c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        c.expect_silent_close("HTTP request in transmission");
        // Anything after NBD_CMD_DISC.
        let mut c = open(rig.port(), SCRATCH).unwrap();
        let mut b = request_bytes(REQUEST_MAGIC, CMD_DISC, 0, 1, 0, 0, &[]);
        b.extend_from_slice(&request_bytes(REQUEST_MAGIC, CMD_READ, 0, 2, 0, 512, &[]));
        c.send(&b).unwrap();
        c.expect_silent_close("request after DISC");
        rig.assert_alive();
    }
    // Negative control: the valid request alone is answered and the connection stays.
    let mut c = open(rig.port(), SCRATCH).unwrap();
    assert_eq!(c.read(1, 0, 512).unwrap().0, 0);
    assert!(
        c.wait_closed(Duration::from_millis(500)).is_err(),
        "a valid client was closed"
    );
    assert_eq!(c.read(2, 512, 512).unwrap().0, 0);
    c.disconnect();
    rig.finish();
}

#[test]
fn unknown_commands_and_bad_flags_get_einval_and_stay_in_step() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    let mut c = open(rig.port(), SCRATCH).unwrap();
    let data = pattern(3, 4096);
    assert_eq!(c.write(1, 8192, &data).unwrap(), 0);
    let mut cookie = 100;
    for cmd in [8u16, 9, 0x42, 0x7fff, 0xffff] {
        for len in [0u32, 512, 1 << 20, u32::MAX] {
            cookie += 1;
            c.request(cmd, 0, cookie, 8192, len, &[]).unwrap();
            assert_eq!(
                c.simple_reply(cookie, 0).unwrap().0,
                NBD_EINVAL,
                "command {cmd:#x} len {len}"
            );
        }
    }
    // A refused WRITE's payload is skipped, not parsed as requests: fill it with valid
    // request headers that would each get a reply if the stream got out of step.
    let fake: Vec<u8> = (0..147u64)
        .flat_map(|i| request_bytes(REQUEST_MAGIC, CMD_READ, 0, 0xbad0 + i, 0, 512, &[]))
        .take(4096)
        .collect();
    for (flags, offset, want) in [
        (1u16 << 15, 8192u64, NBD_EINVAL),
        (1 << 3, 8192, NBD_EINVAL),
        (0, (16 << 20) - 2048, NBD_ENOSPC),
        (0, 100, NBD_EINVAL),
        (0, u64::MAX - 1024, NBD_EINVAL),
    ] {
        cookie += 1;
        c.request(CMD_WRITE, flags, cookie, offset, 4096, &fake)
            .unwrap();
        assert_eq!(
            c.simple_reply(cookie, 0).unwrap().0,
            want,
            "WRITE flags {flags:#x} offset {offset}"
        );
    }
    // Pipelined: several requests in one segment, replies matched by cookie.
    let mut b = Vec::new();
    for i in 0..8u64 {
        b.extend_from_slice(&request_bytes(REQUEST_MAGIC, 0x55, 0, 1000 + i, 0, 0, &[]));
        b.extend_from_slice(&request_bytes(
            REQUEST_MAGIC,
            CMD_READ,
            0,
            2000 + i,
            8192,
            4096,
            &[],
        ));
    }
    c.send(&b).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..16 {
        let h = c.read_n(16).unwrap();
        assert_eq!(h[0..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let ck = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if ck >= 2000 {
            assert_eq!(err, 0);
            assert_eq!(c.read_n(4096).unwrap(), data, "pipelined READ {ck}");
        } else {
            assert_eq!(err, NBD_EINVAL, "pipelined unknown command {ck}");
        }
        assert!(seen.insert(ck), "duplicate reply {ck}");
    }
    rig.assert_alive();
    // The data is what the one valid WRITE put there; nothing else was written.
    assert_eq!(c.read(9, 8192, 4096).unwrap(), (0, data));
    c.disconnect();
    rig.finish();
}

#[test]
fn clients_vanishing_mid_request_release_their_slots() {
    // 4 slots: the good client holds one, so three leaked connections would lock
    // everybody out.
    let mut rig = Rig::start(&["--max-connections", "4"], Mode::Persistent);
    let port = rig.port();
    let offset = 42 * MIB as u64;
    let before = pattern(1, 64 * 1024);
    {
        let mut c = open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND).unwrap();
        assert_eq!(c.write(1, offset, &before).unwrap(), 0);
        c.disconnect();
    }
    let junk = pattern(2, 100 * 1024);
    for round in 0..12 {
        let mut c = open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        match round % 4 {
            // Mid-WRITE payload (1 MiB announced, 100 KiB sent), then FIN.
            0 => {
                c.request(CMD_WRITE, 0, 1, offset, MIB as u32, &junk)
                    .unwrap();
            }
            // Same, then RST instead of FIN.
            1 => {
                c.request(CMD_WRITE, 0, 1, offset, 64 * 1024, &junk[..1000])
                    .unwrap();
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                nix::sys::socket::setsockopt(&c.s, nix::sys::socket::sockopt::Linger, &linger)
                    .unwrap();
            }
            // Mid-header.
            2 => c
                .send(&request_bytes(REQUEST_MAGIC, CMD_WRITE, 0, 1, offset, 4096, &[])[..14])
                .unwrap(),
            // A 32 MiB WRITE, 1 byte short.
            _ => {
                let big = vec![0x77u8; 32 * MIB - 1];
                c.request(CMD_WRITE, 0, 1, offset, 32 * MIB as u32, &big)
                    .unwrap();
            }
        }
        drop(c);
        rig.assert_alive();
    }
    // Every slot came back: three more clients fit next to the good one...
    let mut held: Vec<Client> = (0..3)
        .map(|i| {
            open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND)
                .unwrap_or_else(|e| panic!("slot {i}: {e}"))
        })
        .collect();
    // ...and an incomplete WRITE was never applied.
    assert_eq!(held[0].read(3, offset, 64 * 1024).unwrap(), (0, before));
    for c in held.drain(..) {
        c.disconnect();
    }
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// Resource limits

/// A client that pipelines big READs but does not read the replies must be stopped by
/// back-pressure (the server stops reading requests), not buffered without bound.
#[test]
fn unread_replies_are_bounded_by_back_pressure() {
    const REQUESTS: u64 = 24; // 768 MiB of replies if the server queued them all
    const LEN: u32 = 32 << 20;
    let mut rig = Rig::start(&[], Mode::Reconnect);
    let before = peak_rss_kib(&rig.srv);
    assert!(before > 0, "cannot read the server's peak RSS");
    let mut c = open(rig.port(), "vol0").unwrap();
    // Above the good client's first 8 MiB.
    let at = 32 << 20;
    let base = pattern(8, 4096);
    assert_eq!(c.write(1, at + 4096, &base).unwrap(), 0);
    let mut b = Vec::new();
    for i in 0..REQUESTS {
        b.extend_from_slice(&request_bytes(
            REQUEST_MAGIC,
            CMD_READ,
            0,
            100 + i,
            at,
            LEN,
            &[],
        ));
    }
    c.send(&b).unwrap();
    // Give a server without back-pressure time to queue replies (this pause can only
    // make the check below stricter; it asserts nothing about time).
    std::thread::sleep(Duration::from_secs(2));
    rig.assert_alive();
    // Now read everything: every reply is complete, in step, with the right bytes.
    // NBD lets replies come in any order (big READs are split across pieces that
    // complete independently), so each handle must appear exactly once.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..REQUESTS {
        let h = c.read_n(16).unwrap();
        assert_eq!(h[0..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[4..8], [0; 4], "reply {i} failed");
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert!(
            (100..100 + REQUESTS).contains(&handle) && seen.insert(handle),
            "reply {i} has an unexpected or repeated handle {handle}"
        );
        let data = c.read_n(LEN as usize).unwrap();
        assert!(
            data[4096..8192] == base[..],
            "READ {handle} returned the wrong bytes"
        );
    }
    c.disconnect();
    let after = peak_rss_kib(&rig.srv);
    eprintln!("peak RSS before {before} KiB, after {after} KiB");
    assert!(
        after < before + 384 * 1024,
        "server peak RSS grew from {before} KiB to {after} KiB for one client's unread replies"
    );
    rig.finish();
}

#[test]
fn stalled_handshakes_are_dropped_after_the_timeout() {
    let mut rig = Rig::start(&["--handshake-timeout", "1"], Mode::Reconnect);
    let port = rig.port();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        // Silent after connecting.
        stalled.push(("silent", Client::connect(port, IO_BOUND).unwrap()));
        // Silent after the client flags.
        stalled.push(("after flags", Client::start(port, IO_BOUND).unwrap()));
        // Half an option header.
        let mut c = Client::start(port, IO_BOUND).unwrap();
        c.send(&IHAVEOPT.to_be_bytes()[..6]).unwrap();
        stalled.push(("half option header", c));
        // Option data promised, partly sent.
        let mut c = Client::start(port, IO_BOUND).unwrap();
        c.option_header(IHAVEOPT, OPT_GO, 100).unwrap();
        c.send(&[0; 10]).unwrap();
        stalled.push(("partial option data", c));
        // An ABORT whose (ignored) data never ends.
        let mut c = Client::start(port, IO_BOUND).unwrap();
        c.option_header(IHAVEOPT, OPT_ABORT, 1 << 30).unwrap();
        stalled.push(("endless ABORT data", c));
        // Busy negotiating, never finishing: options answered, but no GO.
        let mut c = Client::start(port, IO_BOUND).unwrap();
        assert_eq!(c.ask(OPT_LIST, &[]).unwrap(), REP_ACK);
        stalled.push(("negotiating forever", c));
    }
    // A client that finished its handshake is not affected by the timer.
    let mut done = open(port, "vol0").unwrap();
    for (what, mut c) in stalled {
        let got = c
            .wait_closed(IO_BOUND)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // The greeting (unread by the silent client) may arrive first; nothing else.
        assert!(
            got.is_empty() || got.len() == 18,
            "{what}: got {} bytes",
            got.len()
        );
        rig.assert_alive();
    }
    // Negative control: the established client outlives several timeouts (the
    // wait_closed check above can report "still open") and still works.
    assert!(
        done.wait_closed(Duration::from_secs(3)).is_err(),
        "established client was dropped"
    );
    let data = pattern(5, 4096);
    assert_eq!(done.write(1, 43 * MIB as u64, &data).unwrap(), 0);
    assert_eq!(done.read(2, 43 * MIB as u64, 4096).unwrap(), (0, data));
    done.disconnect();
    rig.finish();
}

#[test]
fn connection_limit_refuses_extras_and_recovers() {
    let mut rig = Rig::start(&["--max-connections", "4"], Mode::Persistent);
    let port = rig.port();
    // The good client holds one slot; three more fill the limit.
    let mut held: Vec<Client> = (0..3)
        .map(|i| {
            open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND)
                .unwrap_or_else(|e| panic!("holder {i}: {e}"))
        })
        .collect();
    for i in 0..6 {
        let mut c = Client::connect(port, IO_BOUND).unwrap();
        // Closed at once: not even a greeting.
        c.expect_silent_close(&format!("extra connection {i}"));
        rig.assert_alive();
    }
    // The held connections still work while extras are refused.
    for (i, c) in held.iter_mut().enumerate() {
        assert_eq!(c.read(i as u64, 0, 4096).unwrap().0, 0, "holder {i}");
    }
    // Negative control for the refusal check: with one slot free, a client is served.
    held.pop().unwrap().disconnect();
    let c = open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND)
        .expect("a slot freed by a leaving client");
    held.push(c);
    let mut c = Client::connect(port, IO_BOUND).unwrap();
    c.expect_silent_close("extra connection after refill");
    // Everybody leaves; a full set of new clients is accepted again.
    for c in held.drain(..) {
        c.disconnect();
    }
    let mut again: Vec<Client> = (0..3)
        .map(|i| {
            open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND)
                .unwrap_or_else(|e| panic!("after release {i}: {e}"))
        })
        .collect();
    for (i, c) in again.iter_mut().enumerate() {
        assert_eq!(c.read(i as u64, 4096, 4096).unwrap().0, 0);
    }
    for c in again {
        c.disconnect();
    }
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// Random bytes

/// One connection of random bytes at a random protocol stage; then the client half-closes
/// and the server must close too (within the liveness bound).
fn random_session(rng: &mut StdRng, port: u16, kind: u32) -> Result<(), String> {
    let mut c = Client::connect(port, IO_BOUND).map_err(|e| format!("connect: {e}"))?;
    let mut out = Vec::new();
    match kind {
        // Random bytes before even reading the greeting.
        0 => {
            let n = rng.gen_range(1..512);
            out.extend((0..n).map(|_| rng.gen::<u8>()));
        }
        // Random client flags and options.
        1 => {
            c.greeting().map_err(|e| format!("greeting: {e}"))?;
            let n = rng.gen_range(1..512);
            out.extend((0..n).map(|_| rng.gen::<u8>()));
        }
        // Valid flags, then option headers with mostly valid magic and random fields.
        2 => {
            c.greeting().map_err(|e| format!("greeting: {e}"))?;
            out.extend_from_slice(
                &(FLAG_C_FIXED_NEWSTYLE | (rng.gen_range(0..2) * FLAG_C_NO_ZEROES)).to_be_bytes(),
            );
            for _ in 0..rng.gen_range(1..8) {
                let magic = if rng.gen_bool(0.9) {
                    IHAVEOPT
                } else {
                    rng.gen()
                };
                let option: u32 = if rng.gen_bool(0.8) {
                    rng.gen_range(0..13)
                } else {
                    rng.gen()
                };
                let len: u32 = if rng.gen_bool(0.9) {
                    rng.gen_range(0..300)
                } else {
                    rng.gen()
                };
                out.extend_from_slice(&magic.to_be_bytes());
                out.extend_from_slice(&option.to_be_bytes());
                out.extend_from_slice(&len.to_be_bytes());
                let sent = if rng.gen_bool(0.8) {
                    len.min(300)
                } else {
                    rng.gen_range(0..300)
                };
                out.extend((0..sent).map(|_| rng.gen::<u8>()));
            }
        }
        // A real handshake into the scratch export, then random requests.
        _ => {
            c = open(port, SCRATCH).map_err(|e| format!("handshake: {e}"))?;
            for _ in 0..rng.gen_range(1..8) {
                let magic = if rng.gen_bool(0.9) {
                    REQUEST_MAGIC
                } else {
                    rng.gen()
                };
                let flags = if rng.gen_bool(0.8) { 0 } else { rng.gen() };
                let cmd = if rng.gen_bool(0.9) {
                    rng.gen_range(0..9)
                } else {
                    rng.gen()
                };
                let offset = if rng.gen_bool(0.7) {
                    rng.gen_range(0..(32u64 << 20) / 512) * 512
                } else {
                    rng.gen()
                };
                let len: u32 = if rng.gen_bool(0.7) {
                    rng.gen_range(0..128) * 512
                } else {
                    rng.gen()
                };
                // Mostly the announced WRITE payload; sometimes stray bytes.
                let payload_len = if cmd == CMD_WRITE && len <= 64 * 1024 && rng.gen_bool(0.8) {
                    len
                } else if rng.gen_bool(0.1) {
                    rng.gen_range(0..4096)
                } else {
                    0
                };
                let payload: Vec<u8> = (0..payload_len).map(|_| rng.gen()).collect();
                out.extend_from_slice(&request_bytes(
                    magic,
                    cmd,
                    flags,
                    rng.gen(),
                    offset,
                    len,
                    &payload,
                ));
            }
        }
    }
    // The server may close part way through; that is fine.
    let _ = c.send(&out);
    let _ = c.s.shutdown(Shutdown::Write);
    c.wait_closed(IO_BOUND).map(|_| ())
}

#[test]
fn a_thousand_random_byte_connections() {
    let mut rig = Rig::start(&[], Mode::Reconnect);
    let port = rig.port();
    let seed: u64 = std::env::var("RINGBLK_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("random connections: seed {seed} (RINGBLK_FUZZ_SEED={seed} repeats it)");
    const THREADS: u64 = 4;
    const PER_THREAD: u32 = 250;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ (t << 56));
                let mut failures = Vec::new();
                for i in 0..PER_THREAD {
                    let kind = i % 4;
                    if let Err(e) = random_session(&mut rng, port, kind) {
                        failures.push(format!("thread {t} connection {i} (kind {kind}): {e}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("random worker"))
        .collect();
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    rig.assert_alive();
    // A real client (qemu-io) works afterwards, with checked bytes.
    let uri = rig.srv.uri("vol0");
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0x5c 48M 64k",
        "-c",
        "read -P 0x5c 48M 64k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Negative control: qemu-io reports a wrong pattern.
    let bad = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x5d 48M 4k"]));
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// Negative controls for the harness itself

#[test]
fn negative_controls_for_the_checks() {
    let rig = Rig::start(&["--max-connections", "2"], Mode::Persistent);
    let port = rig.port();
    // 1. The good client's verification detects wrong bytes.
    let mut c = open_when_accepted(port, "vol0", IO_BOUND, IO_BOUND).unwrap();
    assert!(verify_round(&mut c, 1, 44 * MIB as u64, 10, 10).is_ok());
    let err =
        verify_round(&mut c, 5, 44 * MIB as u64, 11, 12).expect_err("wrong bytes must be detected");
    assert!(err.contains("wrong bytes"), "{err}");
    // 2. wait_closed reports an open connection as open.
    assert!(c.wait_closed(Duration::from_millis(300)).is_err());
    // 3. With every slot held (as leaked connections would), open_when_accepted fails:
    //    the slot-release check in clients_vanishing_mid_request_release_their_slots can
    //    fail.
    let refused = open_when_accepted(port, "vol0", IO_BOUND, Duration::from_secs(1));
    assert!(
        refused.is_err(),
        "a third client was accepted with --max-connections 2"
    );
    c.disconnect();
    rig.finish();

    // 4. assert_alive notices a panic message and a dead server.
    let mut srv = Server::start_logged(&["--volume", "v=,backend=null,size=1M"]);
    srv.assert_alive();
    let log = srv.dir.path().join(STDERR_LOG);
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(
        f,
        "NEGATIVE CONTROL (fake line): thread 'x' panicked at nowhere"
    )
    .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| srv.assert_alive()));
    assert!(r.is_err(), "a panic message in stderr went unnoticed");
    std::fs::write(&log, b"").unwrap();
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| srv.assert_alive()));
    assert!(r.is_err(), "a dead server went unnoticed");
}
