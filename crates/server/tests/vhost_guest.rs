//! A real Linux guest on a vhost-user-blk export (issue #13, "Real clients" item 2).
//!
//! QEMU (`qemu-system-x86_64`, TCG: no KVM here) boots a Debian cloud kernel with a
//! busybox initramfs (`tests/guest/build.sh` builds and caches both under
//! `target/guest/`; `tests/guest/init` is the guest's side of every check below) and a
//! `vhost-user-blk-pci` disk with 2 queues whose back end is the peer under test:
//!
//! - `ringblk serve --vhost vol0=SOCKET` on a file volume (the product), or
//! - `qemu-storage-daemon --export type=vhost-user-blk` on a file (the reference
//!   peer: when the harness fails against both, the harness is wrong).
//!
//! Each peer has its own test (`cargo test -p ringblk-server --test vhost_guest
//! ringblk`, or `... qemu_storage_daemon`); both run in CI.
//!
//! # Tests
//! - `linux_guest_on_ringblk`, `linux_guest_on_qemu_storage_daemon`: everything below;
//!   against ringblk also its per-queue counters (2 queues served, on 2 reactors, and
//!   nothing resubmitted) and the disk's serial (GET_ID: the volume's name).
//! - `linux_guest_writes_survive_kill9_and_restart_of_ringblk`: issue item 3 (its doc).
//! - `linux_guest_reads_a_backup_export_read_only`: a `VOL@BACKUP` vhost export.
//! - `queue_counter_check_refuses_one_queue_or_one_reactor`: the counter check's
//!   negative control, without a VM.
//!
//! Each guest boots in a few seconds and runs its checks in about 5-15 s under TCG;
//! the four VMs run in parallel and the binary takes about 40 s on this 2-core machine.
//!
//! # What is checked
//! In the guest (`RB RESULT` lines on the serial console, all must say PASS): `/dev/vda`
//! has the volume's size and 2 blk-mq queues; a pattern written with `dd oflag=direct`
//! reads back with `iflag=direct`; a buffered write followed by `sync` (a FLUSH) reads
//! back past the page cache; `blkdiscard` succeeds and the range reads back as zeros.
//! On the host, after the guest powered off: the volume's NBD export holds the guest's
//! bytes (every region compared byte for byte, the discarded range zeros and a hole
//! in NBD block status), and the backup below holds what it must.
//!
//! # The backup timeline (what the serial console can prove)
//! The guest writes block `i` of a sequence region with value `i` (`dd oflag=direct
//! conv=fsync`), one at a time, and prints `RB ACK i` only after `dd` returned. The
//! host, having read `ACK a` (a >= 5), takes the backup (RPC `backup_create`, or QMP
//! `blockdev-backup` for the reference peer), and once the command has returned sends
//! `GO` to the guest's serial input. Before starting each write the guest checks
//! whether GO arrived; the first time it did, it prints `RB MARK m` and writes
//! `SEQ_AFTER` more blocks. Hence:
//! - every write `<= a` completed before the host read its ACK, so before the command
//!   was sent: the backup must hold blocks `1..=a`;
//! - every write `>= m` began after the guest saw GO, so after the command returned:
//!   the backup must hold none of them;
//! - writes `a+1 .. m-1` overlap the command; serial output is buffered, so nothing
//!   says on which side of the switch they fell, and the test does not guess. It
//!   checks what a point-in-time copy of a one-at-a-time writer must look like: a
//!   prefix `1..=p` with `a <= p < m`, and no block holding anything but its own value
//!   or zeros.
//!
//! # Negative controls (run in every pass)
//! The byte check against a pattern of another seed must fail; the backup check run
//! against the live volume (which holds the writes after MARK) must fail, and so must
//! the backup check of a volume without the writes (all zeros).
//!
//! # Liveness
//! Every wait is bounded by `GUEST_DEADLINE` (a hang becomes a failure, never a speed
//! assertion); QEMU, the peer and the server are killed when their guards drop.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// The test volume (sparse file); the regions below are `tests/guest/init`'s layout.
const VOLUME_BYTES: u64 = 64 * MIB;
const PATTERN_OFF: u64 = MIB;
const SYNC_OFF: u64 = 4 * MIB;
const DISCARD_OFF: u64 = 8 * MIB;
const REGION_BYTES: u64 = MIB;
/// Sequence block `i` (4 KiB) sits at `SEQ_OFF + i * SEQ_BLOCK`, `1 <= i <= SEQ_MAX`.
const SEQ_OFF: u64 = 16 * MIB;
const SEQ_BLOCK: u64 = 4096;
/// Upper bound of the guest's write loop (it stops `SEQ_AFTER` writes after MARK).
const SEQ_MAX: u64 = 1000;
/// Writes the guest makes after it saw GO (the ones the backup must not hold).
const SEQ_AFTER: u64 = 4;
/// The host takes the backup once it has read this ACK (so some writes precede it).
const BACKUP_AFTER_ACK: u64 = 5;
const QUEUES: u32 = 2;
/// Liveness bound of one guest run: boot, checks, poweroff (about 15 s under TCG on
/// an idle machine). Past it QEMU is killed and the test fails with the transcript.
const GUEST_DEADLINE: Duration = Duration::from_secs(100);
const LINE: usize = 32;

/// `tests/guest/init`'s pattern: 32-byte lines `format!("{tag:<23}{n:08}\n")`.
fn pattern(tag: &str, len: u64) -> Vec<u8> {
    assert!(tag.len() <= 23, "tag {tag:?} longer than its field");
    let mut out = Vec::with_capacity(len as usize);
    for n in 0..len / LINE as u64 {
        out.extend_from_slice(format!("{tag:<23}{n:08}\n").as_bytes());
    }
    out
}

/// Sequence block `i`: the line `format!("{:<23}{i:08}\n", "Q")` repeated.
fn seq_block(i: u64) -> Vec<u8> {
    format!("{:<23}{i:08}\n", "Q")
        .as_bytes()
        .repeat(SEQ_BLOCK as usize / LINE)
}

/// `Ok` when `img[off..off+want.len()]` is `want`; else where the first difference is.
fn check_region(img: &[u8], off: u64, want: &[u8]) -> Result<(), String> {
    let got = img
        .get(off as usize..off as usize + want.len())
        .ok_or_else(|| format!("image too short for {off}+{}", want.len()))?;
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(p) => Err(format!(
            "byte {} differs: got {:?}, want {:?}",
            off + p as u64,
            String::from_utf8_lossy(&got[p - p % LINE..(p - p % LINE + LINE).min(got.len())]),
            String::from_utf8_lossy(&want[p - p % LINE..(p - p % LINE + LINE).min(want.len())])
        )),
    }
}

/// The sequence blocks an image holds: `Ok(p)` when blocks `1..=p` hold their own
/// values and every later block is zeros; `Err` for a gap, foreign bytes or a block
/// past `SEQ_MAX`'s region.
fn seq_prefix(img: &[u8]) -> Result<u64, String> {
    let mut p = 0;
    for i in 1..=SEQ_MAX {
        let off = (SEQ_OFF + i * SEQ_BLOCK) as usize;
        let got = img
            .get(off..off + SEQ_BLOCK as usize)
            .ok_or_else(|| format!("image too short for sequence block {i}"))?;
        if got == seq_block(i).as_slice() {
            if p + 1 != i {
                return Err(format!(
                    "block {i} is there but block {} is not: not a point in time",
                    p + 1
                ));
            }
            p = i;
        } else if got.iter().any(|&b| b != 0) {
            return Err(format!(
                "sequence block {i} holds foreign bytes: {:?}",
                String::from_utf8_lossy(&got[..LINE])
            ));
        }
    }
    Ok(p)
}

/// The backup rule of the module doc: it holds blocks `1..=p` with
/// `acked_before <= p < mark`.
fn verify_backup(img: &[u8], acked_before: u64, mark: u64) -> Result<u64, String> {
    let p = seq_prefix(img)?;
    if p < acked_before {
        return Err(format!(
            "the backup holds blocks 1..={p}, but the guest had acknowledged block \
             {acked_before} before the backup command was sent"
        ));
    }
    if p >= mark {
        return Err(format!(
            "the backup holds block {p}, but every write from {mark} on began after the \
             backup command returned"
        ));
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------
// The guest

/// The kernel and initramfs `tests/guest/build.sh` built (or found in its cache).
fn build_guest() -> (PathBuf, PathBuf) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // CARGO_TARGET_TMPDIR is <target>/tmp: the cache goes beside it, <target>/guest.
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("guest");
    let out = run_ok(Command::new(repo.join("tests/guest/build.sh")).arg(&cache));
    let get = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("build.sh printed no {key}: {out}"))
    };
    (get("KERNEL="), get("INITRD="))
}

/// A running QEMU whose serial console is read line by line; killed on drop.
struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    transcript: Vec<String>,
    stderr: PathBuf,
    deadline: Instant,
}

impl Guest {
    /// `chardev_opts`: extra options of the vhost-user socket chardev (`,reconnect-ms=N`).
    fn boot(
        kernel: &Path,
        initrd: &Path,
        vhost: &Path,
        chardev_opts: &str,
        dir: &Path,
        append: &str,
    ) -> Guest {
        let stderr = dir.join("qemu-stderr.log");
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-accel", "tcg", "-smp", "2", "-m", "512"])
            // vhost-user needs the guest's memory shared with the back end.
            .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
            .args(["-numa", "node,memdev=mem"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=c0,path={}{chardev_opts}",
                vhost.display()
            ))
            .args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=c0,num-queues={QUEUES}"),
            ])
            .args(["-nographic", "-nodefaults", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("qemu stderr file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-system-x86_64: {e} (ci/test.sh installs qemu-system-x86)")
            });
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("qemu stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        if tx.send(line.trim_end().to_string()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Guest {
            child,
            stdin,
            lines,
            transcript: Vec::new(),
            stderr,
            deadline: Instant::now() + GUEST_DEADLINE,
        }
    }

    /// Panics with the console transcript and QEMU's stderr.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let tail = self.transcript.len().saturating_sub(60);
        panic!(
            "guest: {why}\n--- serial console (last lines) ---\n{}\n--- qemu stderr ---\n{}",
            self.transcript[tail..].join("\n"),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }

    /// The next `RB ...` line of the console (other lines are kept for failure messages).
    fn next(&mut self) -> String {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.transcript.push(line.clone());
                    if let Some(rb) = line.strip_prefix("RB ") {
                        return rb.to_string();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("no progress within {GUEST_DEADLINE:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait();
                    self.fail(&format!("QEMU's console closed early ({st:?})"))
                }
            }
        }
    }

    /// Sends a line to the guest's serial input.
    fn send(&mut self, line: &str) {
        let ok = self.stdin.as_mut().map(|s| {
            s.write_all(format!("{line}\n").as_bytes())
                .and_then(|_| s.flush())
        });
        if !matches!(ok, Some(Ok(()))) {
            self.fail(&format!("cannot send {line:?} to the console: {ok:?}"));
        }
    }

    /// Waits (bounded) for QEMU to exit after the guest's poweroff.
    fn wait_exit(&mut self) -> ExitStatus {
        // Drain the console to EOF so QEMU never blocks on a full pipe.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.transcript.push(line);
        }
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > self.deadline {
                self.fail("QEMU did not exit after the guest's poweroff");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the guest reported.
#[derive(Default, Debug)]
struct Report {
    /// `check -> (passed, detail)`.
    results: Vec<(String, bool, String)>,
    /// The highest ACK read before the backup command was sent.
    acked_before: u64,
    /// The guest's MARK (first write begun after it saw GO).
    mark: u64,
    /// The highest ACK of the run.
    last_ack: u64,
    /// `RB INFO` lines (kernel, serial, discard limit).
    info: Vec<String>,
}

fn parse_num(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// Drives one guest run: reads the console, takes the backup with `backup` once ACK
/// `BACKUP_AFTER_ACK` was read, sends GO, and collects everything up to `RB END`.
fn drive(guest: &mut Guest, backup: &mut dyn FnMut()) -> Report {
    let mut r = Report::default();
    let mut backup_taken = false;
    loop {
        let line = guest.next();
        if line == "END" {
            break;
        }
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match kind {
            "ACK" => {
                let Some(i) = parse_num(rest) else {
                    guest.fail(&format!("bad line {line:?}"))
                };
                r.last_ack = i;
                if !backup_taken && i >= BACKUP_AFTER_ACK {
                    // `i` is the highest ACK read so far: its write completed before now.
                    r.acked_before = i;
                    backup();
                    backup_taken = true;
                    guest.send("GO");
                }
            }
            "MARK" => match parse_num(rest) {
                Some(m) => r.mark = m,
                None => guest.fail(&format!("bad line {line:?}")),
            },
            "INFO" => r.info.push(rest.to_string()),
            "RESULT" => {
                let mut f = rest.splitn(3, ' ');
                let check = f.next().unwrap_or_default().to_string();
                let passed = f.next() == Some("PASS");
                r.results
                    .push((check, passed, f.next().unwrap_or_default().to_string()));
            }
            _ => {}
        }
    }
    let st = guest.wait_exit();
    assert!(st.success(), "QEMU exited with {st}");
    r
}

// ---------------------------------------------------------------------------------
// Peers

/// The back end under test.
enum Peer {
    Ringblk(Server),
    Qsd(Qsd),
}

impl Drop for Peer {
    /// A failing run shows the server's log (qemu-storage-daemon's stderr is inherited).
    fn drop(&mut self) {
        if let (true, Peer::Ringblk(srv)) = (std::thread::panicking(), &*self) {
            eprintln!("--- ringblk stderr ---\n{}", srv.stderr_log());
        }
    }
}

/// `qemu-storage-daemon` exporting one file as vhost-user-blk (2 queues) and NBD
/// (unix socket), with a QMP socket for the backup; killed on drop.
struct Qsd {
    child: Child,
    nbd: PathBuf,
    qmp: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `path` exists (a socket a peer creates).
fn wait_for_path(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{} never appeared: the peer exited ({st})", path.display());
        }
        assert!(
            start.elapsed() < TOOL_TIMEOUT,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Qsd {
    fn start(dir: &Path, vhost: &Path) -> Qsd {
        let img = dir.join("disk.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(VOLUME_BYTES))
            .expect("disk image");
        let nbd = dir.join("nbd.sock");
        let qmp = dir.join("qmp.sock");
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=on,discard=unmap",
                img.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=file0,addr.type=unix,addr.path={},\
                 writable=on,num-queues={QUEUES}",
                vhost.display()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", nbd.display()))
            .args(["--export", "type=nbd,id=n0,node-name=file0,name=vol0"])
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                qmp.display()
            ))
            .args(["--monitor", "chardev=qmp"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run qemu-storage-daemon: {e} (ci/test.sh installs qemu-utils)")
            });
        for p in [vhost, &nbd, &qmp] {
            wait_for_path(p, &mut child);
        }
        Qsd { child, nbd, qmp }
    }
}

/// A QMP connection (one command at a time; events are skipped).
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let w = UnixStream::connect(path).expect("connect QMP");
        w.set_read_timeout(Some(TOOL_TIMEOUT)).expect("timeout");
        let r = BufReader::new(w.try_clone().expect("clone"));
        let mut q = Qmp { w, r };
        q.read_reply(); // the greeting
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    fn read_reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            let n = self.r.read_line(&mut line).expect("QMP read");
            assert!(n > 0, "QMP closed");
            let v: Value = serde_json::from_str(&line).expect("QMP JSON");
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{msg}").expect("QMP write");
        let v = self.read_reply();
        assert!(v.get("error").is_none(), "QMP {name}: {v}");
        v["return"].clone()
    }
}

/// One JSON-RPC call on ringblk's control socket; returns `result`.
fn rpc(srv: &Server, method: &str, params: Value) -> Value {
    let v = rpc_call(srv, method, params);
    assert!(v.get("error").is_none(), "rpc {method} failed: {v}");
    v["result"].clone()
}

impl Peer {
    fn start(which: &str, dir: &Path, vhost: &Path) -> Peer {
        match which {
            "ringblk" => {
                let vol = format!(
                    "vol0={},size={VOLUME_BYTES}",
                    dir.join("vol0.img").display()
                );
                let vh = format!("vol0={}", vhost.display());
                // Two reactors, so the device can offer the guest's 2 queues.
                let mut srv =
                    Server::start_logged(&["--volume", &vol, "--vhost", &vh, "--cores", "0-1"]);
                wait_for_path(vhost, &mut srv.child);
                Peer::Ringblk(srv)
            }
            "qemu-storage-daemon" => Peer::Qsd(Qsd::start(dir, vhost)),
            other => panic!("unknown peer {other}"),
        }
    }

    fn nbd_uri(&self, export: &str) -> String {
        match self {
            Peer::Ringblk(srv) => srv.uri(export),
            Peer::Qsd(q) => format!("nbd+unix:///{export}?socket={}", q.nbd.display()),
        }
    }

    /// Takes the backup; returns when the command returned (the switch point is
    /// inside the command).
    fn backup_create(&mut self, dir: &Path) {
        match self {
            Peer::Ringblk(srv) => {
                rpc(
                    srv,
                    "backup_create",
                    json!({"volume": "vol0", "name": "b1"}),
                );
            }
            Peer::Qsd(q) => {
                let target = dir.join("backup.img");
                std::fs::File::create(&target)
                    .and_then(|f| f.set_len(VOLUME_BYTES))
                    .expect("backup image");
                let mut qmp = Qmp::connect(&q.qmp);
                qmp.cmd(
                    "blockdev-add",
                    json!({"driver": "file", "node-name": "bk", "filename": target}),
                );
                // A point-in-time copy: copy-before-write is in place when this returns.
                qmp.cmd(
                    "blockdev-backup",
                    json!({"job-id": "j0", "device": "file0", "target": "bk",
                           "sync": "full", "auto-dismiss": false}),
                );
            }
        }
    }

    /// The backup's bytes, once it is complete.
    fn backup_bytes(&mut self, dir: &Path) -> Vec<u8> {
        let start = Instant::now();
        match self {
            Peer::Ringblk(srv) => {
                loop {
                    let list = rpc(srv, "backup_list", json!({"volume": "vol0"}));
                    let ready = list
                        .as_array()
                        .and_then(|a| a.iter().find(|b| b["name"] == "b1"))
                        .is_some_and(|b| b["state"] == "ready");
                    if ready {
                        break;
                    }
                    assert!(start.elapsed() < TOOL_TIMEOUT, "backup never ready: {list}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                let uri = srv.uri("vol0@b1");
                nbd_bytes(&uri, dir)
            }
            Peer::Qsd(q) => {
                let mut qmp = Qmp::connect(&q.qmp);
                loop {
                    let jobs = qmp.cmd("query-jobs", json!({}));
                    let job = jobs
                        .as_array()
                        .and_then(|a| a.iter().find(|j| j["id"] == "j0"))
                        .cloned()
                        .unwrap_or_else(|| panic!("no backup job: {jobs}"));
                    if job["status"] == "concluded" {
                        assert!(job.get("error").is_none(), "backup job failed: {job}");
                        qmp.cmd("job-dismiss", json!({"id": "j0"}));
                        break;
                    }
                    assert!(start.elapsed() < TOOL_TIMEOUT, "backup never done: {job}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::fs::read(dir.join("backup.img")).expect("read backup image")
            }
        }
    }
}

/// `Ok` when `vhost_list` shows export vol0's queues 0 and 1 both served requests,
/// on different reactors (the guest wrote from both vCPUs; blk-mq maps each vCPU to
/// its own queue, and the server runs queue `i` on reactor `i % reactors`).
fn queues_served_by_reactors(list: &Value) -> Result<(), String> {
    let export = list
        .as_array()
        .and_then(|a| a.iter().find(|e| e["export"] == "vol0"))
        .ok_or_else(|| format!("vol0 not in vhost_list: {list}"))?;
    let busy: Vec<&Value> = export["queues"]
        .as_array()
        .map(|q| {
            q.iter()
                .filter(|q| q["served"].as_u64().unwrap_or(0) > 0)
                .collect()
        })
        .unwrap_or_default();
    let reactors: std::collections::BTreeSet<u64> =
        busy.iter().filter_map(|q| q["reactor"].as_u64()).collect();
    if busy.len() < 2 || reactors.len() < 2 {
        return Err(format!(
            "2 queues on 2 reactors should have served requests: {export}"
        ));
    }
    Ok(())
}

/// Requests export vol0's queues resubmitted after a reconnect (`vhost_list`).
fn resubmitted(list: &Value) -> u64 {
    list.as_array()
        .and_then(|a| a.iter().find(|e| e["export"] == "vol0"))
        .and_then(|e| e["queues"].as_array())
        .map(|q| q.iter().filter_map(|q| q["resubmitted"].as_u64()).sum())
        .unwrap_or(0)
}

/// The whole export, read through NBD with nbdcopy.
fn nbd_bytes(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("nbd-copy.img");
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").arg(uri).arg(&out));
    let mut bytes = Vec::new();
    std::fs::File::open(&out)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .expect("read nbdcopy output");
    let _ = std::fs::remove_file(&out);
    bytes
}

/// `Ok` when every extent of `[off, off+len)` is a hole in NBD block status
/// (`base:allocation`, read with `nbdinfo --map --json`).
fn nbd_is_hole(uri: &str, off: u64, len: u64) -> Result<(), String> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let map: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
    let extents = map.as_array().ok_or_else(|| format!("not a list: {out}"))?;
    let end = off + len;
    for e in extents {
        let (Some(eo), Some(el), Some(ty)) = (
            e["offset"].as_u64(),
            e["length"].as_u64(),
            e["type"].as_u64(),
        ) else {
            return Err(format!("bad extent {e}"));
        };
        if eo < end && eo + el > off && ty & 1 == 0 {
            return Err(format!("extent {e} in [{off}, {end}) is not a hole: {out}"));
        }
    }
    Ok(())
}

/// The product: every check of the module doc against `ringblk serve --vhost`, plus
/// ringblk's per-queue counters.
#[test]
fn linux_guest_on_ringblk() {
    guest_run("ringblk");
}

/// The reference peer: the same harness against qemu-storage-daemon, so a harness
/// that stopped matching QEMU's behaviour fails here too (not only against ringblk).
#[test]
fn linux_guest_on_qemu_storage_daemon() {
    guest_run("qemu-storage-daemon");
}

/// See the module doc.
fn guest_run(which: &str) {
    let (kernel, initrd) = build_guest();
    let dir = tmpdir();
    let vhost = dir.path().join("vhost.sock");
    let mut peer = Peer::start(which, dir.path(), &vhost);
    let seed = format!("{:08x}", rand::random::<u32>());
    let append = format!(
        "console=ttyS0 loglevel=1 panic=-1 rb_checks=size,queues,pattern,sync,discard,seq \
         rb_size={VOLUME_BYTES} rb_queues={QUEUES} rb_seed={seed} rb_seqmax={SEQ_MAX} \
         rb_seqafter={SEQ_AFTER}"
    );
    let started = Instant::now();
    let mut guest = Guest::boot(&kernel, &initrd, &vhost, "", dir.path(), &append);
    // ringblk's per-queue counters, read while the guest still runs (after the
    // pattern check wrote from both vCPUs, so through both queues).
    let mut vhost_list = None;
    let report = {
        let dir = dir.path().to_path_buf();
        let (peer, vhost_list) = (&mut peer, &mut vhost_list);
        drive(&mut guest, &mut || {
            peer.backup_create(&dir);
            if let Peer::Ringblk(srv) = peer {
                *vhost_list = Some(rpc(srv, "vhost_list", json!({})));
            }
        })
    };
    eprintln!(
        "guest on {which}: ran in {:.1} s; {report:?}",
        started.elapsed().as_secs_f64()
    );

    // The guest's own checks.
    for check in ["size", "queues", "pattern", "sync", "discard", "seq"] {
        match report.results.iter().find(|(c, _, _)| c == check) {
            Some((_, true, _)) => {}
            Some((_, false, detail)) => panic!("guest check {check} failed: {detail}"),
            None => panic!("guest check {check} never reported: {report:?}"),
        }
    }
    let failed: Vec<_> = report.results.iter().filter(|r| !r.1).collect();
    assert!(failed.is_empty(), "guest checks failed: {failed:?}");
    assert!(report.mark > report.acked_before, "{report:?}");
    assert_eq!(report.last_ack, report.mark + SEQ_AFTER - 1, "{report:?}");

    // The guest's bytes, read by the host through the volume's NBD export.
    let live = nbd_bytes(&peer.nbd_uri("vol0"), dir.path());
    assert_eq!(live.len() as u64, VOLUME_BYTES);
    let p = pattern(&format!("P-{seed}"), REGION_BYTES);
    check_region(&live, PATTERN_OFF, &p).expect("the O_DIRECT pattern through NBD");
    check_region(
        &live,
        SYNC_OFF,
        &pattern(&format!("S-{seed}"), REGION_BYTES),
    )
    .expect("the synced buffered write through NBD");
    check_region(&live, DISCARD_OFF, &vec![0; REGION_BYTES as usize])
        .expect("the discarded range reads zeros through NBD");
    nbd_is_hole(&peer.nbd_uri("vol0"), DISCARD_OFF, REGION_BYTES)
        .expect("the discarded range is a hole in NBD block status");
    assert_eq!(
        seq_prefix(&live),
        Ok(report.last_ack),
        "the live volume holds every acknowledged sequence write"
    );

    // The backup taken while the guest wrote.
    let backup = peer.backup_bytes(dir.path());
    let held = verify_backup(&backup, report.acked_before, report.mark)
        .unwrap_or_else(|e| panic!("{e}; {report:?}"));
    eprintln!(
        "backup holds sequence blocks 1..={held} (acked before the command: {}, \
         begun after it returned: {}..)",
        report.acked_before, report.mark
    );

    // Negative controls: each check fails on data that breaks its rule.
    let wrong = pattern(&format!("P-{seed}x"), REGION_BYTES);
    assert!(check_region(&live, PATTERN_OFF, &wrong).is_err());
    assert!(
        verify_backup(&live, report.acked_before, report.mark).is_err(),
        "the backup check must reject an image holding writes begun after the command"
    );
    assert!(
        verify_backup(&vec![0; live.len()], report.acked_before, report.mark).is_err(),
        "the backup check must reject an image without the acknowledged writes"
    );
    assert!(nbd_is_hole(&peer.nbd_uri("vol0"), PATTERN_OFF, REGION_BYTES).is_err());
    if let Peer::Ringblk(srv) = &mut peer {
        let list = vhost_list.expect("vhost_list read during the run");
        queues_served_by_reactors(&list).unwrap_or_else(|e| panic!("{e}"));
        // GET_ID answers the volume's name (the reference peer says "vhost_user_blk").
        assert!(
            report.info.iter().any(|i| i == "serial=vol0"),
            "GET_ID: {:?}",
            report.info
        );
        // The reconnect test's counter is 0 when nothing was left in flight.
        assert_eq!(resubmitted(&list), 0, "{list}");
        eprintln!("vhost_list during the run: {list}");
        srv.assert_alive();
    }
    drop(guest);
}

/// Negative control of the per-queue counter check (it runs in ringblk mode only):
/// one busy queue, or two busy queues on one reactor, must be refused.
#[test]
fn queue_counter_check_refuses_one_queue_or_one_reactor() {
    let list = |q: Value| json!([{"export": "vol0", "queues": q}]);
    let good = list(json!([{"index": 0, "reactor": 0, "served": 5},
                           {"index": 1, "reactor": 1, "served": 3}]));
    assert_eq!(queues_served_by_reactors(&good), Ok(()));
    let one_queue = list(json!([{"index": 0, "reactor": 0, "served": 5},
                                {"index": 1, "reactor": 1, "served": 0}]));
    assert!(queues_served_by_reactors(&one_queue).is_err());
    let one_reactor = list(json!([{"index": 0, "reactor": 0, "served": 5},
                                  {"index": 1, "reactor": 0, "served": 3}]));
    assert!(queues_served_by_reactors(&one_reactor).is_err());
    assert!(queues_served_by_reactors(&json!([])).is_err());
}

/// Issue #13 item 3, reconnect: ringblk is killed (-9) while the guest has writes in
/// flight, and restarted on the same socket; QEMU (`reconnect-ms`) reconnects and
/// hands over its INFLIGHT_SHMFD region, the restarted server resubmits the requests
/// recorded there, and the guest's writes complete and read back.
///
/// "In flight" is made certain, not hoped for: before the guest starts its four
/// O_DIRECT writes (two per vCPU, so on both queues), the host arms a 30 s delay on
/// the volume's writes (RPC `fault_inject`), and kills the server only once `stats`
/// counts at least 4 delayed requests, i.e. held inside the server, unanswered. Rules
/// are not persistent, so the restarted server runs the resubmitted writes at once.
/// Checks: the guest's read-back (`RB RESULT reconnect`), the bytes through NBD, and
/// the restarted server's `resubmitted` counter covers at least the requests held at
/// the kill. Negative controls: the same counter is 0 in `linux_guest_on_ringblk`
/// (no kill), and the byte check against the ranges' patterns swapped must fail.
#[test]
fn linux_guest_writes_survive_kill9_and_restart_of_ringblk() {
    let (kernel, initrd) = build_guest();
    let dir = tmpdir();
    let vhost = dir.path().join("vhost.sock");
    let vol = format!(
        "vol0={},size={VOLUME_BYTES}",
        dir.path().join("vol0.img").display()
    );
    let vh = format!("vol0={}", vhost.display());
    let args = ["--volume", &vol, "--vhost", &vh, "--cores", "0-1"];
    let mut srv = Some(Server::start_logged(&args));
    let seed = format!("{:08x}", rand::random::<u32>());
    let append = format!(
        "console=ttyS0 loglevel=1 panic=-1 rb_checks=size,reconnect rb_size={VOLUME_BYTES} \
         rb_seed={seed}"
    );
    let started = Instant::now();
    let mut guest = Guest::boot(
        &kernel,
        &initrd,
        &vhost,
        reconnect_opt(),
        dir.path(),
        &append,
    );
    let mut held_at_kill = 0;
    let mut results = Vec::new();
    loop {
        let line = guest.next();
        if line == "END" {
            break;
        }
        if let Some(r) = line.strip_prefix("RESULT ") {
            results.push(r.to_string());
        }
        if line != "HOLD-READY" {
            continue;
        }
        let live = srv.take().expect("the server runs");
        let rule = json!({"volume": "vol0", "op": "write", "delay_ms": 30_000, "count": 0});
        rpc(&live, "fault_inject", rule);
        guest.send("GO");
        let wait = Instant::now();
        loop {
            held_at_kill = vol0_stat(&live, "faults_delayed");
            if held_at_kill >= 4 {
                break;
            }
            assert!(
                wait.elapsed() < TOOL_TIMEOUT,
                "the guest's writes never reached the server"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Same data dir, same socket path: QEMU's reconnect finds the new server.
        srv = Some(live.restart(true, &args));
    }
    let st = guest.wait_exit();
    assert!(st.success(), "QEMU exited with {st}");
    eprintln!(
        "reconnect run: {:.1} s; {held_at_kill} writes held at the kill; {results:?}",
        started.elapsed().as_secs_f64()
    );
    let srv = srv.expect("the restarted server");
    assert!(
        results.iter().any(|r| r.starts_with("reconnect PASS")),
        "the guest's writes did not complete and verify: {results:?}"
    );
    assert!(results.iter().all(|r| r.contains(" PASS")), "{results:?}");
    let list = rpc(&srv, "vhost_list", json!({}));
    assert!(
        resubmitted(&list) >= held_at_kill,
        "{held_at_kill} writes were held in the killed server, the restarted one \
         resubmitted fewer: {list}"
    );
    let live = nbd_bytes(&srv.uri("vol0"), dir.path());
    for k in 0..4u64 {
        let want = pattern(&format!("R{k}-{seed}"), REGION_BYTES);
        check_region(&live, (32 + k) * MIB, &want)
            .unwrap_or_else(|e| panic!("range {k} through NBD: {e}"));
        let swapped = pattern(&format!("R{}-{seed}", (k + 1) % 4), REGION_BYTES);
        assert!(check_region(&live, (32 + k) * MIB, &swapped).is_err());
    }
}

/// The chardev option that makes QEMU reconnect to a restarted back end: QEMU 9.2
/// added `reconnect-ms` and deprecated `reconnect` (seconds); Debian's own QEMU 7.2
/// (the version ci/test.sh installs when qemu-utils came from the release itself)
/// knows only `reconnect`.
fn reconnect_opt() -> &'static str {
    let help = run(Command::new("qemu-system-x86_64").args(["-chardev", "socket,help"]));
    let text =
        String::from_utf8_lossy(&help.stdout).to_string() + &String::from_utf8_lossy(&help.stderr);
    if text.contains("reconnect-ms") {
        ",reconnect-ms=200"
    } else {
        ",reconnect=1"
    }
}

/// One counter of volume vol0 in RPC `stats`.
fn vol0_stat(srv: &Server, key: &str) -> u64 {
    let all = rpc(srv, "stats", json!({}));
    all["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "vol0"))
        .and_then(|v| v[key].as_u64())
        .unwrap_or_else(|| panic!("no {key} for vol0 in stats: {all}"))
}

/// A backup exported over vhost-user (`vhost_create` of `vol0@b1`) is a read-only
/// disk to a real guest (VIRTIO_BLK_F_RO): it reads the backup's bytes, not the live
/// volume's, and a write forced past the kernel's read-only flag (`blockdev --setrw`)
/// fails, leaving the backup unchanged. (Linux 6.1 refuses that write itself, EPERM:
/// `--setrw` does not lift a read-only disk, so the server's IOERR for a write on a
/// read-only export is not reached by this guest; a raw client has to test that.) The host wrote pattern B at 1 MiB, took the backup, then
/// wrote pattern L there; the guest must see B (the negative control: the same
/// region is checked against L and must differ).
#[test]
fn linux_guest_reads_a_backup_export_read_only() {
    let (kernel, initrd) = build_guest();
    let dir = tmpdir();
    let vol = format!(
        "vol0={},size={VOLUME_BYTES}",
        dir.path().join("vol0.img").display()
    );
    let mut srv = Server::start_logged(&["--volume", &vol, "--cores", "0-1"]);
    let seed = format!("{:08x}", rand::random::<u32>());
    let before = pattern(&format!("B-{seed}"), REGION_BYTES);
    let after = pattern(&format!("L-{seed}"), REGION_BYTES);
    let write = |bytes: &[u8]| {
        let src = dir.path().join("src.bin");
        std::fs::write(&src, bytes).expect("write source");
        let cmd = format!("write -s {} {PATTERN_OFF} {REGION_BYTES}", src.display());
        run_ok(Command::new("qemu-io").args(["-f", "raw", &srv.uri("vol0"), "-c", &cmd]));
    };
    write(&before);
    rpc(
        &srv,
        "backup_create",
        json!({"volume": "vol0", "name": "b1"}),
    );
    write(&after);
    let sock = dir.path().join("backup.sock");
    rpc(
        &srv,
        "vhost_create",
        json!({"volume": "vol0@b1", "socket": sock}),
    );
    let append = format!(
        "console=ttyS0 loglevel=1 panic=-1 rb_checks=size,ro rb_size={VOLUME_BYTES} \
         rb_seed={seed}"
    );
    let mut guest = Guest::boot(&kernel, &initrd, &sock, "", dir.path(), &append);
    let mut results = Vec::new();
    loop {
        let line = guest.next();
        if line == "END" {
            break;
        }
        if let Some(r) = line.strip_prefix("RESULT ") {
            results.push(r.to_string());
        }
    }
    let st = guest.wait_exit();
    assert!(st.success(), "QEMU exited with {st}");
    eprintln!("backup export guest: {results:?}");
    assert!(
        results.iter().any(|r| r.starts_with("ro PASS")) && results.len() == 2,
        "{results:?}"
    );
    assert!(results.iter().all(|r| r.contains(" PASS")), "{results:?}");
    let list = rpc(&srv, "vhost_list", json!({}));
    let export = list
        .as_array()
        .and_then(|a| a.iter().find(|e| e["export"] == "vol0@b1"))
        .unwrap_or_else(|| panic!("vol0@b1 not in vhost_list: {list}"));
    assert_eq!(export["read_only"], true, "{export}");
    // The backup and the live volume, through NBD: neither took the guest's write.
    let backup = nbd_bytes(&srv.uri("vol0@b1"), dir.path());
    check_region(&backup, PATTERN_OFF, &before).expect("the backup keeps pattern B");
    assert!(check_region(&backup, PATTERN_OFF, &after).is_err());
    let live = nbd_bytes(&srv.uri("vol0"), dir.path());
    check_region(&live, PATTERN_OFF, &after).expect("the live volume keeps pattern L");
    srv.assert_alive();
}
