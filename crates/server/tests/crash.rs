//! Real kill -9 (issue #6). A real NBD client (tests/python/crash_client.py: libnbd
//! under /usr/bin/python3, several requests in flight) writes self-identifying 4 KiB
//! blocks to two file-backed volumes (chunk size 4K, and 64K where partial writes
//! read-merge), flushes every few writes and sets FUA on some, and logs every write
//! it sends, every answer and every completed flush. The server is killed with
//! SIGKILL at a random moment; in some cycles a backup was taken during the run (its
//! delta is active at the kill), in others a release started just before the kill
//! (its merge is in progress; the restart resumes it) or earlier in the run (the
//! merge may finish under the load). Then, every cycle:
//!
//! 1. `ringblk check` passes on the data dir (a torn journal tail is only a note);
//! 2. the server restarts with the same command line (recovery);
//! 3. every backup confirmed before the kill is listed (unless released);
//! 4. every block is checked against the client's log:
//!    - live volume: the last write to the block that was durable (acknowledged
//!      before a completed FLUSH was sent, or acknowledged with FUA), or any later
//!      write to it (acknowledged or not); with no durable write, also the content
//!      at the start of the cycle;
//!    - a backup taken in the cycle: the last write durable (as above) and
//!      acknowledged before `backup create` was sent, or a later write sent before it
//!      returned; with none, also the content at the start of the cycle;
//!    - older backups: exactly what they held when last checked;
//! 5. resumed merges finish (the backup leaves `backup list`) and the live volume
//!    and the remaining backups still read exactly the same.
//!
//! At the end a graceful stop must leave a data dir that `ringblk check` passes and
//! that restarts to exactly the content read last.
//!
//! The client never has two writes to one block in flight, so a block's writes are
//! ordered by the log. The content read becomes the next cycle's baseline; the read
//! flushes first, so the baseline is durable too.
//!
//! Negative control (cycle 0, before the random ones): a fresh backup, then per
//! volume a flushed write, a FUA write and a write that no flush covers, each into a
//! chunk the new delta does not hold yet; kill -9. The verifier must accept the
//! real model and must reject a model that wrongly counts every acknowledged write
//! as durable — exactly at the unflushed block, which reads its old content (its
//! mapping was only in memory). It must also reject a block with one byte changed.
//!
//! Environment: RINGBLK_CRASH_CYCLES (random cycles, default 20), RINGBLK_CRASH_SEED
//! (replays a run's plan; the seed is printed), RINGBLK_CRASH_KEEP=1 (keep the data
//! and work dirs). ci/crash-soak.sh runs this test with hundreds of cycles.

mod common;
use common::*;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 4096;
/// 32 MiB volumes.
const BLOCKS: usize = 8192;
const VOL_SIZE: &str = "32M";
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/crash_client.py");
/// Most backups a volume holds at once (each is read back every cycle).
const MAX_BACKUPS: usize = 2;
/// How long a resumed merge may take after the restart.
const MERGE_TIMEOUT: Duration = Duration::from_secs(180);
static ZERO: [u8; BLOCK] = [0; BLOCK];

struct VolCfg {
    name: &'static str,
    tag: u64,
    chunk: &'static str,
}

const VOLS: [VolCfg; 2] = [
    VolCfg {
        name: "a",
        tag: 1,
        chunk: "4K",
    },
    VolCfg {
        name: "b",
        tag: 2,
        chunk: "64K",
    },
];

// ---------------------------------------------------------------------------
// The client's log.

#[derive(Debug, Clone)]
struct WriteRec {
    seq: u64,
    first: usize,
    n: usize,
    fua: bool,
    /// Log line (0-based) of the `W`: the write was sent after it.
    issued: usize,
    /// Log line of its `A`.
    acked: Option<usize>,
    /// Log line of its `X`.
    failed: Option<usize>,
}

#[derive(Debug, Default)]
struct ClientLog {
    writes: Vec<WriteRec>,
    by_seq: HashMap<u64, usize>,
    flush_sent: HashMap<u64, usize>,
    flushes_done: usize,
    /// Line of the latest `F` whose flush completed: every write acknowledged
    /// before that line is durable.
    durable_upto: Option<usize>,
    /// Errors other than a lost connection (the server answered with an error).
    errors: Vec<String>,
    ready: bool,
    connected: bool,
    end: Option<String>,
    lines: usize,
}

impl ClientLog {
    fn acked(&self) -> usize {
        self.writes.iter().filter(|w| w.acked.is_some()).count()
    }
}

/// Parses the complete lines of a client log.
fn parse_log(text: &str) -> Result<ClientLog, String> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    let mut log = ClientLog::default();
    for (pos, line) in complete.lines().enumerate() {
        log.lines = pos + 1;
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("log line {}: unexpected {line:?}", pos + 1);
        let num = |i: usize| -> Result<u64, String> {
            f.get(i).and_then(|s| s.parse().ok()).ok_or_else(bad)
        };
        match f.first().copied() {
            Some("C") => log.connected = true,
            Some("R") => log.ready = true,
            Some("W") => {
                let w = WriteRec {
                    seq: num(1)?,
                    first: num(2)? as usize,
                    n: num(3)? as usize,
                    fua: num(4)? == 1,
                    issued: pos,
                    acked: None,
                    failed: None,
                };
                if w.n == 0 || w.first + w.n > BLOCKS {
                    return Err(bad());
                }
                if log.by_seq.insert(w.seq, log.writes.len()).is_some() {
                    return Err(format!("{}: seq sent twice", bad()));
                }
                log.writes.push(w);
            }
            Some(k @ ("A" | "X")) => {
                if k == "X" && !lost_connection(f.get(2).copied()) {
                    log.errors.push(line.to_string());
                }
                let i = *log.by_seq.get(&num(1)?).ok_or_else(bad)?;
                let w = &mut log.writes[i];
                if w.acked.is_some() || w.failed.is_some() {
                    return Err(format!("{}: answered twice", bad()));
                }
                if k == "A" {
                    w.acked = Some(pos);
                } else {
                    w.failed = Some(pos);
                }
            }
            Some("F") => {
                log.flush_sent.insert(num(1)?, pos);
            }
            Some("FD") => {
                let at = *log.flush_sent.get(&num(1)?).ok_or_else(bad)?;
                log.durable_upto = log.durable_upto.max(Some(at));
                log.flushes_done += 1;
            }
            Some("FX") => {
                if !lost_connection(f.get(2).copied()) {
                    log.errors.push(line.to_string());
                }
            }
            Some("END") => log.end = Some(f[1..].join(" ")),
            _ => return Err(bad()),
        }
    }
    Ok(log)
}

/// How libnbd fails the requests in flight when the server is gone.
fn lost_connection(errno: Option<&str>) -> bool {
    matches!(
        errno,
        Some("ENOTCONN" | "ECONNRESET" | "EPIPE" | "ESHUTDOWN")
    )
}

fn read_log(path: &Path) -> ClientLog {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    parse_log(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The model: which writes each block may hold after the crash.

struct Model<'a> {
    log: &'a ClientLog,
    /// Per block: indices into `log.writes`, in the order they were sent.
    hist: Vec<Vec<usize>>,
}

impl<'a> Model<'a> {
    fn new(log: &'a ClientLog) -> Result<Model<'a>, String> {
        let mut hist = vec![Vec::new(); BLOCKS];
        for (i, w) in log.writes.iter().enumerate() {
            for h in &mut hist[w.first..w.first + w.n] {
                if let Some(&p) = h.last() {
                    let prev: &WriteRec = &log.writes[p];
                    let answered = prev.acked.or(prev.failed);
                    if answered.is_none_or(|a| a >= w.issued) {
                        return Err(format!(
                            "client bug: write {} sent before write {} to the same block was answered",
                            w.seq, prev.seq
                        ));
                    }
                }
                h.push(i);
            }
        }
        Ok(Model { log, hist })
    }

    /// Durable: acknowledged with FUA, or acknowledged before a completed flush was
    /// sent. `naive` (negative control only) wrongly counts every acknowledged write.
    fn durable(&self, w: &WriteRec, naive: bool) -> bool {
        match w.acked {
            None => false,
            Some(a) => naive || w.fua || self.log.durable_upto.is_some_and(|f| a < f),
        }
    }

    fn live_allowed(&self, b: usize, baseline: u64, naive: bool) -> Vec<u64> {
        let h = &self.hist[b];
        let from = h
            .iter()
            .rposition(|&i| self.durable(&self.log.writes[i], naive));
        let mut v = Vec::with_capacity(h.len() + 1);
        if from.is_none() {
            v.push(baseline);
        }
        v.extend(
            h[from.unwrap_or(0)..]
                .iter()
                .map(|&i| self.log.writes[i].seq),
        );
        v
    }

    /// A backup whose `backup create` was sent when the log had `before` lines and
    /// returned when it had `after`.
    fn backup_allowed(&self, b: usize, baseline: u64, before: usize, after: usize) -> Vec<u64> {
        let h = &self.hist[b];
        let from = h.iter().rposition(|&i| {
            let w = &self.log.writes[i];
            w.acked.is_some_and(|a| a < before) && self.durable(w, false)
        });
        let mut v = Vec::with_capacity(h.len() + 1);
        if from.is_none() {
            v.push(baseline);
        }
        v.extend(
            h[from.unwrap_or(0)..]
                .iter()
                .map(|&i| &self.log.writes[i])
                .filter(|w| w.issued < after)
                .map(|w| w.seq),
        );
        v
    }

    /// The last write to `b` that was acknowledged (any acknowledged write counts).
    fn last_acked(&self, b: usize) -> Option<u64> {
        self.hist[b]
            .iter()
            .rev()
            .map(|&i| &self.log.writes[i])
            .find(|w| w.acked.is_some())
            .map(|w| w.seq)
    }

    fn describe(&self, seq: u64) -> String {
        if let Some(&i) = self.log.by_seq.get(&seq) {
            let w = &self.log.writes[i];
            let state = match (w.acked, w.failed) {
                (Some(a), _) => format!(
                    "acked at line {}{}",
                    a + 1,
                    if self.durable(w, false) {
                        if w.fua {
                            ", durable (FUA)"
                        } else {
                            ", durable (a completed flush was sent after it)"
                        }
                    } else {
                        ", not durable"
                    }
                ),
                (None, Some(x)) => format!("failed at line {}", x + 1),
                (None, None) => "never answered".into(),
            };
            format!(
                "seq {seq} (blocks {}..{}{}, sent at line {}, {state})",
                w.first,
                w.first + w.n,
                if w.fua { ", FUA" } else { "" },
                w.issued + 1
            )
        } else if seq == 0 {
            "zeros (never written)".into()
        } else {
            format!(
                "seq {seq} (written in cycle {}, before this one)",
                (seq >> 32).saturating_sub(1)
            )
        }
    }
}

// ---------------------------------------------------------------------------
// Block content.

fn record(tag: u64, block: usize, seq: u64) -> [u8; 32] {
    let mut r = [0u8; 32];
    r[..8].copy_from_slice(b"RBLKCRSH");
    r[8..16].copy_from_slice(&tag.to_le_bytes());
    r[16..24].copy_from_slice(&(block as u64).to_le_bytes());
    r[24..32].copy_from_slice(&seq.to_le_bytes());
    r
}

/// The write a block holds (0: zeros), or why it holds none of this test's writes.
fn decode(img: &[u8], b: usize, tag: u64) -> Result<u64, String> {
    let blk = &img[b * BLOCK..(b + 1) * BLOCK];
    if blk == &ZERO[..] {
        return Ok(0);
    }
    let u = |i: usize| u64::from_le_bytes(blk[i..i + 8].try_into().expect("8 bytes"));
    let (btag, bblock, bseq) = (u(8), u(16), u(24));
    if &blk[..8] == b"RBLKCRSH" {
        let want = record(btag, bblock as usize, bseq).repeat(BLOCK / 32);
        if blk == &want[..] {
            if btag == tag && bblock == b as u64 {
                return Ok(bseq);
            }
            return Err(format!(
                "holds block {bblock} of volume tag {btag} (seq {bseq}): misplaced"
            ));
        }
        let bad = blk
            .chunks_exact(32)
            .position(|r| r != &blk[..32])
            .unwrap_or(0);
        return Err(format!(
            "torn or mixed: starts as block {bblock} tag {btag} seq {bseq}, differs at byte {}",
            bad * 32
        ));
    }
    let head: String = blk[..16].iter().map(|x| format!("{x:02x}")).collect();
    Err(format!("not written by this test (starts {head})"))
}

struct Mismatch {
    block: usize,
    allowed: Vec<u64>,
    actual: Result<u64, String>,
}

/// Checks every block; returns what each holds (u64::MAX: garbage) and the mismatches.
fn verify(img: &[u8], tag: u64, allowed: impl Fn(usize) -> Vec<u64>) -> (Vec<u64>, Vec<Mismatch>) {
    assert_eq!(img.len(), BLOCKS * BLOCK, "short read of an export");
    let mut seen = Vec::with_capacity(BLOCKS);
    let mut bad = Vec::new();
    for b in 0..BLOCKS {
        let actual = decode(img, b, tag);
        let ok = match &actual {
            Ok(s) => {
                seen.push(*s);
                allowed(b).contains(s)
            }
            Err(_) => {
                seen.push(u64::MAX);
                false
            }
        };
        if !ok {
            bad.push(Mismatch {
                block: b,
                allowed: allowed(b),
                actual,
            });
        }
    }
    (seen, bad)
}

fn report(what: &str, bad: &[Mismatch], describe: impl Fn(u64) -> String) -> String {
    let mut s = format!(
        "{what}: {} block(s) hold content the model rejects",
        bad.len()
    );
    for m in bad.iter().take(8) {
        let allowed: Vec<String> = m.allowed.iter().map(|&q| describe(q)).collect();
        let actual = match &m.actual {
            Ok(q) => describe(*q),
            Err(e) => e.clone(),
        };
        s += &format!(
            "\n  block {}: actual {actual}\n    expected one of: [{}]",
            m.block,
            allowed.join("; ")
        );
    }
    if bad.len() > 8 {
        s += &format!("\n  ... and {} more", bad.len() - 8);
    }
    s
}

// ---------------------------------------------------------------------------
// Processes.

fn start_logged(dir: tempfile::TempDir, args: &[String], log: &Path) -> Server {
    let f = std::fs::File::create(log).expect("create server log");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in_with_stderr(dir, &args, Stdio::from(f))
}

struct Client {
    child: Child,
    log: PathBuf,
    stderr: PathBuf,
}

fn spawn_client(mode: &str, uri: &str, log: &Path, extra: &[String]) -> Client {
    let stderr = log.with_extension("stderr");
    let child = Command::new(SYSTEM_PYTHON)
        .arg(CLIENT)
        .arg(mode)
        .arg("--uri")
        .arg(uri)
        .arg("--log")
        .arg(log)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(&stderr).expect("client stderr"),
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {SYSTEM_PYTHON} {CLIENT}: {e}"));
    Client {
        child,
        log: log.to_path_buf(),
        stderr,
    }
}

impl Client {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the log satisfies `pred` (the client is connected, ready...).
    fn wait_for(&mut self, what: &str, pred: impl Fn(&ClientLog) -> bool) {
        let start = Instant::now();
        loop {
            if pred(&read_log(&self.log)) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "client exited ({st}) before {what}; stderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "client never got to {what}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// After the kill: the client notices the lost connection, logs how each
    /// request ended and exits.
    fn finish(mut self) -> ClientLog {
        let start = Instant::now();
        let st = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "client did not exit after the server was killed; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(st.success(), "client failed ({st}):\n{}", self.stderr());
        let log = read_log(&self.log);
        assert!(
            log.errors.is_empty(),
            "the server failed requests (not by going away): {:?}",
            log.errors
        );
        let end = log.end.clone().unwrap_or_default();
        assert!(
            end == "connection-lost" || end.starts_with("error:"),
            "client ended with {end:?}, not by losing the connection; stderr:\n{}",
            self.stderr()
        );
        log
    }
}

fn ctl_json(srv: &Server, args: &[&str]) -> serde_json::Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"))
}

/// Backup name -> state.
fn backup_list(srv: &Server, vol: &str) -> BTreeMap<String, String> {
    let list = ctl_json(srv, &["backup", "list", vol]);
    list.as_array()
        .unwrap_or_else(|| panic!("backup list: {list}"))
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap_or("").to_string(),
                b["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Reads whole exports (flushing first where asked) with libnbd: one reader process
/// per group, the groups in parallel.
fn dump(groups: &[Vec<(String, PathBuf, bool)>]) -> Vec<Vec<Vec<u8>>> {
    std::thread::scope(|s| {
        let readers: Vec<_> = groups
            .iter()
            .map(|jobs| {
                s.spawn(move || {
                    let mut c = Command::new(SYSTEM_PYTHON);
                    c.arg(CLIENT).arg("dump");
                    for (uri, out, flush) in jobs {
                        c.arg("--job")
                            .arg(uri)
                            .arg(out)
                            .arg(if *flush { "1" } else { "0" });
                    }
                    run_ok(&mut c);
                })
            })
            .collect();
        for r in readers {
            r.join().expect("reader thread");
        }
    });
    groups
        .iter()
        .map(|jobs| {
            jobs.iter()
                .map(|(_, out, _)| std::fs::read(out).expect("read dump"))
                .collect()
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A field of a (plain text) tracing line, without quotes.
fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

// ---------------------------------------------------------------------------
// The run.

#[derive(Default)]
struct Stats {
    cycles: usize,
    cycle_ms: Vec<u64>,
    recovery_ms: Vec<u64>,
    writes: usize,
    acked: usize,
    flushes: usize,
    backups_created: usize,
    releases: usize,
    /// Releases whose merge was running at the kill (resumed by the restart).
    releases_resumed: usize,
    /// Releases that were done before the kill.
    releases_done: usize,
    /// Releases the kill came before (the backup is still ready after it).
    releases_undone: usize,
    resumed_chunks: Vec<u64>,
    torn_tails: usize,
    leftovers: usize,
    /// Blocks holding a write no flush covered (it survived the kill).
    unflushed_kept: usize,
    /// Blocks whose last acknowledged, not durable write was lost.
    unflushed_lost: usize,
}

struct VolState {
    live: Vec<u64>,
    /// Confirmed backups and what they held when last checked.
    backups: BTreeMap<String, Vec<u64>>,
}

struct Created {
    vol: usize,
    name: String,
    before: usize,
    after: usize,
}

struct Run {
    seed: u64,
    rng: StdRng,
    work: Option<tempfile::TempDir>,
    srv: Option<Server>,
    args: Vec<String>,
    vols: Vec<VolState>,
    stats: Stats,
    cycle: usize,
    restarts: usize,
}

impl Run {
    fn work(&self) -> &Path {
        self.work.as_ref().expect("work dir").path()
    }

    fn srv(&self) -> &Server {
        self.srv.as_ref().expect("server")
    }

    /// Fails the cycle (the test's loop adds the cycle, the seed and the dirs).
    fn fail(&self, msg: &str) -> ! {
        panic!("{msg}")
    }

    /// After a failed cycle: stops the server, keeps the dirs, fails the test with
    /// the cycle, the seed and where to look.
    fn post_mortem(&mut self, msg: &str) -> ! {
        let work = self.work.take().map(|d| d.keep());
        let data = self.srv.as_mut().map(|s| {
            let _ = s.child.kill();
            let _ = s.child.wait();
            std::mem::replace(&mut s.dir, tmpdir()).keep()
        });
        panic!(
            "crash test failed in cycle {} (seed {}; RINGBLK_CRASH_SEED={} replays the plan):\n{msg}\n\
             work dir (client and server logs, dumps): {work:?}\ndata dir: {data:?}",
            self.cycle, self.seed, self.seed
        );
    }

    /// Runs one cycle; any failure in it ends the test through [`Run::post_mortem`].
    fn guarded(&mut self, f: fn(&mut Run)) {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        if let Err(p) = res {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            self.post_mortem(&msg);
        }
    }

    fn client_args(&mut self, v: usize) -> Vec<String> {
        vec![
            "--tag".into(),
            VOLS[v].tag.to_string(),
            "--seq-base".into(),
            ((self.cycle as u64 + 1) << 32).to_string(),
            "--blocks".into(),
            BLOCKS.to_string(),
            "--seed".into(),
            self.rng.gen::<u32>().to_string(),
        ]
    }

    fn kill9(&mut self) {
        let srv = self.srv.as_mut().expect("server");
        srv.child.kill().expect("SIGKILL");
        let _ = srv.child.wait();
    }

    /// `ringblk check` on the (stopped) server's data dir must pass.
    fn check(&mut self) {
        let dir = self.srv().dir.path().to_path_buf();
        let out = run(Command::new(env!("CARGO_BIN_EXE_ringblk"))
            .arg("check")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--json"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            self.fail(&format!(
                "ringblk check --data-dir {} failed ({}):\n{text}\n{}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let rep: serde_json::Value = serde_json::from_str(&text).expect("check JSON");
        for n in rep["notes"].as_array().into_iter().flatten() {
            let n = n.as_str().unwrap_or("");
            if n.contains("torn tail") {
                self.stats.torn_tails += 1;
            } else {
                self.stats.leftovers += 1;
            }
        }
    }

    /// Starts the server again in the same data dir with the same command line.
    fn restart(&mut self) -> PathBuf {
        self.restarts += 1;
        let log = self.work().join(format!("server.{}.log", self.restarts));
        let mut old = self.srv.take().expect("server");
        let dir = std::mem::replace(&mut old.dir, tmpdir());
        drop(old);
        self.srv = Some(start_logged(dir, &self.args, &log));
        log
    }

    /// The restarted server's log: recovery times, resumed merges; no errors.
    fn scan_server_log(&mut self, log: &Path) -> String {
        let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
        let mut notes = Vec::new();
        for line in text.lines() {
            if line.contains("panicked") || line.contains(" ERROR ") {
                self.fail(&format!("server log {}:\n{text}", log.display()));
            }
            if line.contains("recovered from the data dir") {
                if let Some(ms) = field(line, "ms").and_then(|m| m.parse().ok()) {
                    self.stats.recovery_ms.push(ms);
                    notes.push(format!(
                        "{} recovered in {ms} ms",
                        field(line, "volume").unwrap_or("?")
                    ));
                }
            }
            if line.contains("backup released") {
                let chunks = field(line, "chunks").and_then(|c| c.parse().ok());
                notes.push(format!(
                    "merge of {}@{} resumed and done: {} chunks, {} ms",
                    field(line, "volume").unwrap_or("?"),
                    field(line, "backup").unwrap_or("?"),
                    chunks.unwrap_or(0),
                    field(line, "ms").unwrap_or("?")
                ));
                self.stats.resumed_chunks.extend(chunks);
            }
        }
        notes.join(", ")
    }

    /// Waits until no backup of any volume is merging.
    fn wait_merges(&self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let merging: Vec<String> = VOLS
                .iter()
                .flat_map(|v| {
                    backup_list(self.srv(), v.name)
                        .into_iter()
                        .filter(|(_, s)| s != "ready")
                        .map(move |(n, s)| format!("{}@{n} ({s})", v.name))
                })
                .collect();
            if merging.is_empty() {
                return Ok(());
            }
            if start.elapsed() > MERGE_TIMEOUT {
                return Err(format!("resumed merges never finished: {merging:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a restart: backups listed as expected, every block of every volume and
    /// backup against the model; resumed merges finish and change nothing. The
    /// content read becomes the new state. Returns a one-line summary.
    fn verify_cycle(
        &mut self,
        logs: &[ClientLog],
        created: &[Created],
        released: &[(usize, String)],
        server_log: &Path,
    ) -> String {
        let summary = match self.try_verify_cycle(logs, created, released, server_log) {
            Ok(s) => s,
            Err(e) => self.fail(&e),
        };
        let notes = self.scan_server_log(server_log);
        if notes.is_empty() {
            summary
        } else {
            format!("{summary}; {notes}")
        }
    }

    /// Dump jobs for the live volume (flushed first) and the named backups.
    fn jobs(&self, v: usize, backups: &[String]) -> Vec<(String, PathBuf, bool)> {
        let name = VOLS[v].name;
        let mut jobs = vec![(
            self.srv().uri(name),
            self.work().join(format!("{name}.img")),
            true,
        )];
        for n in backups {
            jobs.push((
                self.srv().uri(&format!("{name}@{n}")),
                self.work().join(format!("{name}@{n}.img")),
                false,
            ));
        }
        jobs
    }

    fn try_verify_cycle(
        &mut self,
        logs: &[ClientLog],
        created: &[Created],
        released: &[(usize, String)],
        server_log: &Path,
    ) -> Result<String, String> {
        let mut summary = Vec::new();
        let mut resumed_any = false;
        // 1. Backup lists: what must be there, what may be.
        let mut readable = Vec::new();
        for (v, cfg) in VOLS.iter().enumerate() {
            let was_released = |n: &str| released.iter().any(|(rv, rn)| *rv == v && rn == n);
            let listed = backup_list(self.srv(), cfg.name);
            let mut problems = Vec::new();
            // Confirmed before the kill and not released: must be listed, ready.
            let must = self.vols[v]
                .backups
                .keys()
                .filter(|n| !was_released(n))
                .chain(created.iter().filter(|c| c.vol == v).map(|c| &c.name));
            for n in must {
                match listed.get(n).map(String::as_str) {
                    Some("ready") => {}
                    other => problems.push(format!(
                        "backup {}@{n}, confirmed before the kill, is {other:?} after the restart",
                        cfg.name
                    )),
                }
            }
            for (n, s) in &listed {
                let known = self.vols[v].backups.contains_key(n)
                    || created.iter().any(|c| c.vol == v && &c.name == n);
                if !known {
                    problems.push(format!("unexpected backup {}@{n} ({s})", cfg.name));
                }
            }
            if !problems.is_empty() {
                return Err(format!(
                    "backup list of {}: {listed:?}\n{}",
                    cfg.name,
                    problems.join("\n")
                ));
            }
            // A released backup is gone (its merge finished before the kill or since
            // the restart), merging (resumed by the restart) or still ready (the kill
            // came before the release was durable).
            let slog = strip_ansi(&std::fs::read_to_string(server_log).unwrap_or_default());
            for (_, rn) in released.iter().filter(|(rv, _)| *rv == v) {
                let resumed = slog.lines().any(|l| {
                    l.contains("resuming the release")
                        && field(l, "volume") == Some(cfg.name)
                        && field(l, "backup") == Some(rn.as_str())
                });
                let state = listed.get(rn).map(String::as_str);
                if resumed || state.is_some_and(|s| s != "ready") {
                    resumed_any = true;
                    self.stats.releases_resumed += 1;
                    summary.push(format!(
                        "{}@{rn} was merging at the kill: resumed",
                        cfg.name
                    ));
                } else if state.is_none() {
                    self.stats.releases_done += 1;
                    summary.push(format!("{}@{rn} was released before the kill", cfg.name));
                } else {
                    self.stats.releases_undone += 1;
                    summary.push(format!(
                        "{}@{rn}: the kill came before the release was durable (ready)",
                        cfg.name
                    ));
                }
            }
            readable.push(
                listed
                    .iter()
                    .filter(|(_, s)| *s == "ready")
                    .map(|(n, _)| n.clone())
                    .collect::<Vec<String>>(),
            );
        }
        // 2. Read everything (one reader per volume, in parallel).
        let groups: Vec<_> = (0..VOLS.len())
            .map(|v| self.jobs(v, &readable[v]))
            .collect();
        let imgs = dump(&groups);
        // 3. Check every block.
        let mut new_states = Vec::new();
        for (v, cfg) in VOLS.iter().enumerate() {
            let log = &logs[v];
            let model = Model::new(log)?;
            let st = &self.vols[v];
            let base = &st.live;
            let imgs = &imgs[v];
            let (live, bad) = verify(&imgs[0], cfg.tag, |b| model.live_allowed(b, base[b], false));
            if !bad.is_empty() {
                return Err(report(&format!("volume {}", cfg.name), &bad, |q| {
                    model.describe(q)
                }));
            }
            for b in 0..BLOCKS {
                let durable = model.live_allowed(b, base[b], false)[0];
                if live[b] != durable {
                    self.stats.unflushed_kept += 1;
                } else if model.last_acked(b).is_some_and(|q| q != live[b]) {
                    self.stats.unflushed_lost += 1;
                }
            }
            let mut backups = BTreeMap::new();
            for (n, img) in readable[v].iter().zip(&imgs[1..]) {
                let new = created.iter().find(|c| c.vol == v && &c.name == n);
                let (seen, bad) = match (new, st.backups.get(n)) {
                    (Some(c), _) => verify(img, cfg.tag, |b| {
                        model.backup_allowed(b, base[b], c.before, c.after)
                    }),
                    (None, Some(frozen)) => verify(img, cfg.tag, |b| vec![frozen[b]]),
                    (None, None) => unreachable!("checked against the list above"),
                };
                if !bad.is_empty() {
                    return Err(report(&format!("backup {}@{n}", cfg.name), &bad, |q| {
                        model.describe(q)
                    }));
                }
                backups.insert(n.clone(), seen);
            }
            summary.push(format!(
                "{}: {} writes ({} acked, {} flushes done), {} backup(s) ok",
                cfg.name,
                log.writes.len(),
                log.acked(),
                log.flushes_done,
                readable[v].len()
            ));
            self.stats.writes += log.writes.len();
            self.stats.acked += log.acked();
            self.stats.flushes += log.flushes_done;
            new_states.push(VolState { live, backups });
        }
        // 4. Merges resumed by the restart finish and change no content.
        if resumed_any {
            self.wait_merges()?;
            let mut groups = Vec::new();
            for (v, st) in new_states.iter_mut().enumerate() {
                let listed = backup_list(self.srv(), VOLS[v].name);
                st.backups.retain(|n, _| listed.contains_key(n));
                let names: Vec<String> = st.backups.keys().cloned().collect();
                groups.push(self.jobs(v, &names));
            }
            let imgs = dump(&groups);
            for (v, cfg) in VOLS.iter().enumerate() {
                let st = &new_states[v];
                let mut exact = vec![("live volume".to_string(), &st.live)];
                exact.extend(st.backups.iter().map(|(n, c)| (format!("backup {n}"), c)));
                for ((what, want), img) in exact.into_iter().zip(&imgs[v]) {
                    let (_, bad) = verify(img, cfg.tag, |b| vec![want[b]]);
                    if !bad.is_empty() {
                        return Err(report(
                            &format!("{}: {what} after the resumed merge finished", cfg.name),
                            &bad,
                            |q| format!("seq {q} (as read while the merge ran)"),
                        ));
                    }
                }
            }
        }
        // Released backups that are gone leave the state.
        for (v, st) in new_states.iter_mut().enumerate() {
            let listed = backup_list(self.srv(), VOLS[v].name);
            st.backups.retain(|n, _| listed.contains_key(n));
        }
        self.vols = new_states;
        Ok(summary.join("; "))
    }

    /// The end: a graceful stop leaves a data dir that checks out, and the restart
    /// reads exactly what was read last.
    fn graceful_stop(&mut self) {
        let srv = self.srv.as_mut().expect("server");
        let pid = nix::unistd::Pid::from_raw(srv.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let st = srv.child.wait().expect("wait");
        assert!(st.success(), "graceful stop: {st}");
        self.check();
        let slog = self.restart();
        let mut groups = Vec::new();
        for (v, cfg) in VOLS.iter().enumerate() {
            let listed = backup_list(self.srv(), cfg.name);
            let names: Vec<String> = self.vols[v].backups.keys().cloned().collect();
            let want: Vec<&String> = listed.keys().collect();
            assert_eq!(
                want,
                names.iter().collect::<Vec<_>>(),
                "backups after a graceful stop"
            );
            groups.push(self.jobs(v, &names));
        }
        let imgs = dump(&groups);
        for (v, cfg) in VOLS.iter().enumerate() {
            let st = &self.vols[v];
            let mut exact = vec![("live volume".to_string(), &st.live)];
            exact.extend(st.backups.iter().map(|(n, c)| (format!("backup {n}"), c)));
            for ((what, want), img) in exact.into_iter().zip(&imgs[v]) {
                let (_, bad) = verify(img, cfg.tag, |b| vec![want[b]]);
                if !bad.is_empty() {
                    self.fail(&report(
                        &format!("{}: {what} after a graceful stop and restart", cfg.name),
                        &bad,
                        |q| format!("seq {q}"),
                    ));
                }
            }
        }
        self.scan_server_log(&slog);
        let srv = self.srv.as_mut().expect("server");
        let pid = nix::unistd::Pid::from_raw(srv.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let st = srv.child.wait().expect("wait");
        assert!(st.success(), "graceful stop: {st}");
    }

    /// Cycle 0: the negative control (module docs).
    fn control_cycle(&mut self) {
        let t0 = Instant::now();
        // Fresh empty deltas: none of the blocks below has a chunk in them yet.
        let mut created = Vec::new();
        for (v, cfg) in VOLS.iter().enumerate() {
            let name = "ctl0".to_string();
            ctl_json(self.srv(), &["backup", "create", cfg.name, &name]);
            created.push(Created {
                vol: v,
                name,
                before: 0,
                after: 0,
            });
            self.stats.backups_created += 1;
        }
        // Blocks 10, 20 and 300 are in different chunks with 4K and 64K chunks.
        let mut clients = Vec::new();
        for (v, cfg) in VOLS.iter().enumerate() {
            let mut extra = self.client_args(v);
            extra.extend(["--plan".into(), "W:10,F,U:20,W:300".into()]);
            let log = self.work().join(format!("c0-{}.log", cfg.name));
            clients.push(spawn_client(
                "control",
                &self.srv().uri(cfg.name),
                &log,
                &extra,
            ));
        }
        for c in &mut clients {
            c.wait_for("the end of its plan", |l| l.ready);
        }
        self.kill9();
        let logs: Vec<ClientLog> = clients.into_iter().map(Client::finish).collect();
        self.check();
        let slog = self.restart();
        let before: Vec<Vec<u64>> = self.vols.iter().map(|s| s.live.clone()).collect();
        let summary = self.verify_cycle(&logs, &created, &[], &slog);
        // The real model passed; now the wrong one must fail, exactly at block 300.
        for (v, cfg) in VOLS.iter().enumerate() {
            let model = Model::new(&logs[v]).expect("model");
            let img = std::fs::read(self.work().join(format!("{}.img", cfg.name))).expect("dump");
            let seq = |b: usize| model.last_acked(b).expect("acked");
            assert_eq!(self.vols[v].live[10], seq(10), "flushed write");
            assert_eq!(self.vols[v].live[20], seq(20), "FUA write");
            let (_, bad) = verify(&img, cfg.tag, |b| model.live_allowed(b, before[v][b], true));
            let blocks: Vec<usize> = bad.iter().map(|m| m.block).collect();
            if blocks != [300] || bad[0].actual != Ok(before[v][300]) {
                let msg = format!(
                    "negative control on {}: a model that counts the unflushed write to block 300 \
                     as durable must fail exactly there (the write is lost by kill -9: its mapping \
                     was only in memory); mismatches at {blocks:?}",
                    cfg.name
                );
                self.fail(&msg);
            }
            // The backup taken before the writes must not be checked like the live
            // volume: the live image fails the backup's model at the durable writes.
            let (_, bad) = verify(&img, cfg.tag, |b| {
                model.backup_allowed(b, before[v][b], 0, 0)
            });
            let blocks: Vec<usize> = bad.iter().map(|m| m.block).collect();
            assert!(
                blocks.starts_with(&[10, 20]) && blocks.len() <= 3,
                "the live image checked as backup ctl0 must fail at blocks 10 and 20: {blocks:?}"
            );
            // And a changed byte inside a block is caught.
            let mut bent = img.clone();
            bent[10 * BLOCK + 1000] ^= 0x40;
            let (_, bad) = verify(&bent, cfg.tag, |b| {
                model.live_allowed(b, before[v][b], false)
            });
            assert!(
                bad.len() == 1 && bad[0].block == 10 && bad[0].actual.is_err(),
                "a torn block must be rejected"
            );
        }
        self.stats.cycle_ms.push(t0.elapsed().as_millis() as u64);
        eprintln!(
            "crash: cycle 0 (negative control): unflushed write lost and caught by a wrong model; {summary}"
        );
    }

    fn random_cycle(&mut self) {
        let t0 = Instant::now();
        let c = self.cycle;
        // Debug builds (CI's 20 cycles) run shorter: less to merge and read back.
        let run_ms: u64 = if cfg!(debug_assertions) {
            self.rng.gen_range(200..=1000)
        } else {
            self.rng.gen_range(250..=1500)
        };
        // (ms after the start, volume, action)
        let mut plan: Vec<(u64, usize, &'static str, String)> = Vec::new();
        for v in 0..VOLS.len() {
            let n = self.vols[v].backups.len();
            let r: f64 = self.rng.gen();
            let (create, release) = if n >= MAX_BACKUPS {
                (false, r < 0.6)
            } else if n > 0 {
                (r < 0.35, (0.35..0.7).contains(&r))
            } else {
                (r < 0.5, false)
            };
            if create {
                let at = self.rng.gen_range(run_ms / 10..=run_ms * 7 / 10);
                plan.push((at, v, "create", format!("c{c}")));
            }
            if release {
                let names: Vec<&String> = self.vols[v].backups.keys().collect();
                let name = names[self.rng.gen_range(0..names.len())].clone();
                // Mostly just before the kill (the merge is running then); some early
                // enough to finish first (writes go on into the merged image).
                let at = if self.rng.gen_bool(0.2) {
                    self.rng.gen_range(run_ms / 10..=run_ms / 2)
                } else {
                    run_ms - self.rng.gen_range(0..=60).min(run_ms)
                };
                plan.push((at, v, "release", name));
            }
        }
        plan.sort_by_key(|p| p.0);
        let mut clients = Vec::new();
        for (v, cfg) in VOLS.iter().enumerate() {
            let extra = self.client_args(v);
            let log = self.work().join(format!("c{c}-{}.log", cfg.name));
            clients.push(spawn_client(
                "load",
                &self.srv().uri(cfg.name),
                &log,
                &extra,
            ));
        }
        for cl in &mut clients {
            cl.wait_for("connecting", |l| l.connected);
        }
        let start = Instant::now();
        let mut created = Vec::new();
        let mut released = Vec::new();
        let mut what = Vec::new();
        for (at, v, action, name) in plan {
            let due = start + Duration::from_millis(at);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let vname = VOLS[v].name;
            if action == "create" {
                let before = read_log(&clients[v].log).lines;
                let made = ctl_json(self.srv(), &["backup", "create", vname, &name]);
                let after = read_log(&clients[v].log).lines;
                if made["state"] != "ready" {
                    self.fail(&format!("backup create {vname} {name}: {made}"));
                }
                what.push(format!("backup {vname}@{name} at {at} ms"));
                created.push(Created {
                    vol: v,
                    name,
                    before,
                    after,
                });
                self.stats.backups_created += 1;
            } else {
                let gap = run_ms - at;
                run_ok(ctl(self.srv()).args(["backup", "release", &format!("{vname}@{name}")]));
                what.push(format!("release {vname}@{name} {gap} ms before the kill"));
                released.push((v, name));
                self.stats.releases += 1;
            }
        }
        let due = start + Duration::from_millis(run_ms);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let t_kill = Instant::now();
        self.kill9();
        let logs: Vec<ClientLog> = clients.into_iter().map(Client::finish).collect();
        let t_clients = Instant::now();
        self.check();
        let t_check = Instant::now();
        let slog = self.restart();
        let t_restart = Instant::now();
        let summary = self.verify_cycle(&logs, &created, &released, &slog);
        let ms = t0.elapsed().as_millis() as u64;
        self.stats.cycle_ms.push(ms);
        let d = |a: Instant, b: Instant| b.duration_since(a).as_millis();
        eprintln!(
            "crash: cycle {c}: kill -9 after {run_ms} ms{}{}; {summary} ({ms} ms: setup {}, run {}, clients {}, check {}, restart {}, verify {})",
            if what.is_empty() { "" } else { "; " },
            what.join(", "),
            d(t0, start),
            d(start, t_kill),
            d(t_kill, t_clients),
            d(t_clients, t_check),
            d(t_check, t_restart),
            d(t_restart, Instant::now()),
        );
    }
}

#[test]
fn kill9_never_loses_a_flushed_write() {
    let cycles: usize = std::env::var("RINGBLK_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("RINGBLK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
        });
    eprintln!("crash: seed {seed} (RINGBLK_CRASH_SEED={seed} replays the plan), {cycles} cycles");
    let t_all = Instant::now();
    let work = tmpdir();
    let mut args = Vec::new();
    for cfg in &VOLS {
        args.push("--volume".to_string());
        args.push(format!(
            "{}={},size={VOL_SIZE},chunk-size={}",
            cfg.name,
            work.path().join(format!("{}.base", cfg.name)).display(),
            cfg.chunk
        ));
    }
    args.extend(["--log".to_string(), "info".to_string()]);
    let log0 = work.path().join("server.0.log");
    let srv = start_logged(tmpdir(), &args, &log0);
    let mut r = Run {
        seed,
        rng: StdRng::seed_from_u64(seed),
        work: Some(work),
        srv: Some(srv),
        args,
        vols: VOLS
            .iter()
            .map(|_| VolState {
                live: vec![0; BLOCKS],
                backups: BTreeMap::new(),
            })
            .collect(),
        stats: Stats::default(),
        cycle: 0,
        restarts: 0,
    };
    r.guarded(Run::control_cycle);
    for c in 1..=cycles {
        r.cycle = c;
        r.guarded(Run::random_cycle);
        r.stats.cycles += 1;
    }
    r.cycle = cycles + 1;
    r.guarded(Run::graceful_stop);
    let s = &r.stats;
    let avg = |v: &[u64]| v.iter().sum::<u64>() / v.len().max(1) as u64;
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    eprintln!(
        "crash: summary: seed {seed}: {} random cycles + 1 control, all passed in {:.1} s \
         (cycle avg {} ms, max {} ms)\n\
         crash:   {} writes sent, {} acked, {} flushes completed; {} backups created, \
         {} releases ({} resumed after the kill, {} done before it, {} not durable yet)\n\
         crash:   recovery ms: avg {} max {} over {} volume recoveries; resumed merges moved \
         {} chunks in total\n\
         crash:   check notes: {} torn journal tails, {} leftovers; blocks holding an \
         unflushed write: {}, blocks that lost an acked unflushed write: {}",
        s.cycles,
        t_all.elapsed().as_secs_f64(),
        avg(&s.cycle_ms),
        max(&s.cycle_ms),
        s.writes,
        s.acked,
        s.flushes,
        s.backups_created,
        s.releases,
        s.releases_resumed,
        s.releases_done,
        s.releases_undone,
        avg(&s.recovery_ms),
        max(&s.recovery_ms),
        s.recovery_ms.len(),
        s.resumed_chunks.iter().sum::<u64>(),
        s.torn_tails,
        s.leftovers,
        s.unflushed_kept,
        s.unflushed_lost
    );
    if std::env::var("RINGBLK_CRASH_KEEP").is_ok_and(|v| !v.is_empty() && v != "0") {
        let w = r.work.take().map(|d| d.keep());
        let d = r
            .srv
            .as_mut()
            .map(|s| std::mem::replace(&mut s.dir, tmpdir()).keep());
        eprintln!("crash: kept work dir {w:?}, data dir {d:?}");
    }
}
