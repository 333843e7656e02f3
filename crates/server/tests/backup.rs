//! Backup switchover with real clients: image fleecing (as qemu's iotest does it),
//! read-only backup exports, backups under a verified fio load, stable backup
//! content while the live volume changes, and release back to a bare base image.

mod common;
use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, read_only: bool, cmds: &[String]) -> String {
    let (ok, text) = qemu_io_status(uri, read_only, cmds);
    assert!(ok, "qemu-io failed: {text}");
    text
}

fn qemu_io_status(uri: &str, read_only: bool, cmds: &[String]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    c.arg(uri);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(&mut c);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn assert_reads(uri: &str, read_only: bool, cmds: &[String]) {
    let text = qemu_io(uri, read_only, cmds);
    assert!(!text.contains("verification failed"), "{uri}: {text}");
    let reads = text.matches("read ").count();
    assert_eq!(reads, cmds.len(), "every read must run: {text}");
}

fn ctl_json(srv: &Server, args: &[&str]) -> serde_json::Value {
    let out = run_ok(ctl(srv).arg("--json").args(args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"))
}

/// Waits until backup `name` (or, with `None`, every backup) of `vol` is gone.
fn wait_released(srv: &Server, vol: &str, name: Option<&str>) {
    let start = std::time::Instant::now();
    loop {
        let list = ctl_json(srv, &["backup", "list", vol]);
        let left = list.as_array().map_or(0, |a| {
            a.iter()
                .filter(|b| name.is_none_or(|n| b["name"] == n))
                .count()
        });
        if left == 0 {
            return;
        }
        assert!(
            start.elapsed() < TOOL_TIMEOUT,
            "release never finished: {list}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Fleecing: patterns covering a whole chunk, the left part of one, the right part
/// of one and the last chunk; backup; overwrite; the backup still reads the old
/// patterns and zeros, the live volume the new ones. Run with 4 KiB chunks and with
/// 64 KiB chunks (where the partial writes need a read-merge).
fn fleecing(chunk: &str) {
    let size = 64 * MIB;
    let srv = Server::start(&[
        "--volume",
        &format!("v=,backend=mem,size=64M,chunk-size={chunk}"),
    ]);
    let live = srv.uri("v");
    let c = if chunk == "4K" { 4096u64 } else { 65536 };
    let last = size - c;
    let w = |p: u8, off: u64, len: u64| format!("write -P {p:#x} {off} {len}");
    let rd = |p: u8, off: u64, len: u64| format!("read -P {p:#x} {off} {len}");
    // Chunk 0 whole; left part of chunk 2; right part of chunk 4; last chunk.
    qemu_io(
        &live,
        false,
        &[
            w(0x11, 0, c),
            w(0x22, 2 * c, c / 4),
            w(0x33, 5 * c - c / 4, c / 4),
            w(0x44, last, c),
        ],
    );
    let made = ctl_json(&srv, &["backup", "create", "v", "fleece"]);
    assert_eq!(made["state"], "ready");
    // Overwrite everything the backup holds, partially and wholly.
    qemu_io(
        &live,
        false,
        &[
            w(0x55, 0, c / 2),
            w(0x66, 2 * c, c),
            w(0x77, 4 * c, c / 2),
            w(0x88, last + c / 2, c / 2),
            w(0x99, 10 * c, c),
        ],
    );
    let backup = srv.uri("v@fleece");
    let old = [
        rd(0x11, 0, c),
        rd(0x22, 2 * c, c / 4),
        rd(0, 2 * c + c / 4, c - c / 4),
        rd(0, 4 * c, c - c / 4),
        rd(0x33, 5 * c - c / 4, c / 4),
        rd(0x44, last, c),
        rd(0, 10 * c, c),
    ];
    assert_reads(&backup, true, &old);
    let new = [
        rd(0x55, 0, c / 2),
        rd(0x11, c / 2, c / 2),
        rd(0x66, 2 * c, c),
        rd(0x77, 4 * c, c / 2),
        rd(0, 4 * c + c / 2, c / 2 - c / 4),
        rd(0x33, 5 * c - c / 4, c / 4),
        rd(0x44, last, c / 2),
        rd(0x88, last + c / 2, c / 2),
        rd(0x99, 10 * c, c),
    ];
    assert_reads(&live, false, &new);
    // Negative control: the backup must not show a new pattern.
    let (ok, text) = qemu_io_status(&backup, true, &[rd(0x55, 0, c / 2)]);
    assert!(!ok && text.contains("verification failed"), "{text}");

    // Release: the live volume keeps its content and becomes a bare base again.
    run_ok(ctl(&srv).args(["backup", "release", "v@fleece"]));
    wait_released(&srv, "v", None);
    assert_reads(&live, false, &new);
    let stats = ctl_json(&srv, &["stats", "v"]);
    assert_eq!(stats["volumes"][0]["deltas"], 0);
    let layered = stats["volumes"][0]["layered_ops"].as_u64().expect("n");
    assert!(
        layered > 0,
        "reads with a backup present went through the stack"
    );
    assert_reads(&live, false, &new);
    let after = ctl_json(&srv, &["stats", "v"])["volumes"][0]["layered_ops"]
        .as_u64()
        .expect("n");
    assert_eq!(
        after, layered,
        "a volume without backups must do no map lookups"
    );
}

#[test]
fn fleecing_with_4k_chunks() {
    fleecing("4K");
}

#[test]
fn fleecing_with_64k_chunks_read_merges_partial_writes() {
    fleecing("64K");
}

#[test]
fn backup_export_is_read_only_and_listed() {
    let srv = Server::start(&["--volume", "v=,backend=mem,size=16M"]);
    ctl_json(&srv, &["backup", "create", "v", "ro"]);
    let list =
        run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", srv.port)]));
    assert!(list.contains("export=\"v@ro\""), "{list}");
    let is_ro = run(Command::new("nbdinfo").args(["--is", "read-only", &srv.uri("v@ro")]));
    assert!(is_ro.status.success(), "backup export must be read-only");
    let live_ro = run(Command::new("nbdinfo").args(["--is", "read-only", &srv.uri("v")]));
    assert!(
        !live_ro.status.success(),
        "negative control: the live volume is writable"
    );
    let script = "import errno\nh.set_strict_mode(0)\ntry:\n    h.pwrite(b'x' * 512, 0)\n    print('WROTE')\nexcept nbd.Error as e:\n    print('ERRNO', e.errno in ('EPERM', errno.EPERM))\ntry:\n    h.zero(4096, 0)\n    print('ZEROED')\nexcept nbd.Error as e:\n    print('ERRNO', e.errno in ('EPERM', errno.EPERM))\n";
    let out = run_ok(nbdsh().args(["-u", &srv.uri("v@ro"), "-c", script]));
    assert_eq!(out.matches("ERRNO True").count(), 2, "{out}");
    // An unknown backup is not an export.
    assert!(!run(Command::new("nbdinfo").arg(srv.uri("v@nope")))
        .status
        .success());
}

/// fio randwrite with verify on 2 connections while 10 backups are created and
/// released; verify passes afterwards, and a backup's content hashes the same twice
/// with live writes in between.
#[test]
fn backups_under_verified_fio_load() {
    let srv = Server::start(&["--volume", "v=,backend=mem,size=128M"]);
    let uri = srv.uri("v");
    let fio_args = |verify_only: bool| {
        let mut a = vec![
            "--name=load".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=8".into(),
            "--numjobs=2".into(),
            "--size=32M".into(),
            "--offset_increment=64M".into(),
            "--verify=crc32c".into(),
            "--do_verify=1".into(),
            "--randrepeat=1".into(),
            "--verify_state_save=0".into(),
            "--group_reporting".into(),
        ];
        if verify_only {
            a.push("--verify_only".into());
        }
        a
    };
    let fio = Command::new("fio")
        .args(fio_args(false))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio");
    for i in 0..10 {
        let name = format!("b{i}");
        ctl_json(&srv, &["backup", "create", "v", &name]);
        if i % 2 == 1 {
            // Release the previous one while fio keeps writing.
            run_ok(ctl(&srv).args(["backup", "release", &format!("v@b{}", i - 1)]));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = fio.wait_with_output().expect("fio");
    assert!(
        out.status.success(),
        "fio with verify failed under backups: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A ready backup's content is stable while the live volume changes.
    let hash = |u: &str| {
        let sh = format!("nbdcopy '{u}' - | sha256sum");
        run_ok(Command::new("sh").args(["-c", &sh]))
    };
    let list = ctl_json(&srv, &["backup", "list", "v"]);
    let ready: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .filter(|b| b["state"] == "ready")
        .map(|b| b["name"].as_str().expect("name").to_string())
        .collect();
    assert!(!ready.is_empty(), "{list}");
    let b = srv.uri(&format!("v@{}", ready[ready.len() - 1]));
    let h1 = hash(&b);
    let live1 = hash(&uri);
    qemu_io(
        &uri,
        false,
        &["write -P 0xee 0 1M".into(), "write -P 0xef 100M 1M".into()],
    );
    let h2 = hash(&b);
    let live2 = hash(&uri);
    assert_eq!(h1, h2, "backup content changed while live writes went on");
    assert_ne!(live1, live2, "negative control: the live volume did change");
    // Release everything; fio's data verifies on the bare volume.
    for name in &ready {
        run_ok(ctl(&srv).args(["backup", "release", &format!("v@{name}")]));
        wait_released(&srv, "v", Some(name));
    }
    wait_released(&srv, "v", None);
    assert_eq!(ctl_json(&srv, &["stats", "v"])["volumes"][0]["deltas"], 0);
    let out = run(Command::new("fio").args(fio_args(true)));
    // The 1 MiB overwrites above hit fio's regions: expect verify failures exactly
    // there? No: fio's regions start at 0 and 64M; 0..1M and 100M..101M overlap them,
    // so verify must fail — the negative control that the verify pass can fail.
    assert!(
        !out.status.success(),
        "verify must notice the 0xee/0xef overwrites"
    );
}

/// Backups survive a restart: after a graceful stop and after kill -9 (every write
/// here was flushed: qemu-io flushes before it disconnects), the live volume and
/// both backup exports read as before. Negative control: a write that was never
/// flushed into a new chunk of the delta is lost by kill -9 (its mapping was only in
/// memory) — the same reads then fail, so they can see a loss.
#[test]
fn backups_survive_graceful_stop_and_kill9() {
    let img_dir = tmpdir();
    let img = img_dir.path().join("v.img");
    let spec = format!("v={},size=16M", img.display());
    let args = ["--volume", spec.as_str()];
    let live_expect: Vec<String> = vec![
        "read -P 0x22 0 16k".into(),
        "read -P 0x33 16k 8k".into(),
        "read -P 0x22 24k 8k".into(),
        "read -P 0x11 32k 32k".into(),
    ];
    let b1_expect: Vec<String> = vec!["read -P 0x11 0 64k".into()];
    let b2_expect: Vec<String> = vec!["read -P 0x22 0 32k".into(), "read -P 0x11 32k 32k".into()];
    let check = |srv: &Server| {
        assert_reads(&srv.uri("v"), false, &live_expect);
        assert_reads(&srv.uri("v@b1"), true, &b1_expect);
        assert_reads(&srv.uri("v@b2"), true, &b2_expect);
        let list = ctl_json(srv, &["backup", "list", "v"]);
        let names: Vec<&str> = list
            .as_array()
            .expect("array")
            .iter()
            .map(|b| b["name"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(names, ["b1", "b2"], "{list}");
    };
    let srv = Server::start(&args);
    let live = srv.uri("v");
    qemu_io(&live, false, &["write -P 0x11 0 64k".into()]);
    ctl_json(&srv, &["backup", "create", "v", "b1"]);
    qemu_io(&live, false, &["write -P 0x22 0 32k".into()]);
    ctl_json(&srv, &["backup", "create", "v", "b2"]);
    qemu_io(&live, false, &["write -P 0x33 16k 8k".into()]);
    check(&srv);

    let srv = srv.restart(false, &args);
    check(&srv);
    let srv = srv.restart(true, &args);
    check(&srv);

    // Negative control: an unflushed write into a fresh chunk of the top delta
    // (b2's), held open across the kill so no disconnect flush happens.
    let script = format!(
        "import nbd, os, signal, sys\n\
h = nbd.NBD()\n\
h.connect_uri('{}')\n\
h.pwrite(b'\\x44' * 16384, 0)\n\
os.kill({}, signal.SIGKILL)\n",
        srv.uri("v"),
        srv.child.id()
    );
    let out = run(Command::new(SYSTEM_PYTHON).args(["-c", &script]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let srv = srv.restart(true, &args);
    let (ok, text) = qemu_io_status(&srv.uri("v"), false, &["read -P 0x44 0 16k".into()]);
    assert!(
        !ok || text.contains("verification failed"),
        "the unflushed write must not survive kill -9 here: {text}"
    );
    check(&srv);
}

/// Bytes allocated to the `.delta` files in the data dir, one entry per file.
fn delta_files(srv: &Server) -> Vec<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<(String, u64)> = std::fs::read_dir(srv.dir.path())
        .expect("data dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".delta"))
        .map(|e| {
            let m = e.metadata().expect("metadata");
            (
                e.file_name().to_string_lossy().into_owned(),
                m.blocks() * 512,
            )
        })
        .collect();
    v.sort();
    v
}

/// A release hands its delta's data file (written space and all) to the next
/// backup, which then needs no zeroing ahead. The old contents must never show:
/// not through unmapped chunks, not through a partial first write's read-merge,
/// not in the next backup's export.
#[test]
fn a_released_delta_file_is_reused_and_its_old_data_never_shows() {
    let dir = tmpdir();
    let img = dir.path().join("v.img");
    let srv = Server::start_in(
        dir,
        &[
            "--volume",
            &format!("v={},size=64M,chunk-size=64K", img.display()),
        ],
    );
    let live = srv.uri("v");
    let c = 65536u64;
    let w = |p: u8, off: u64, len: u64| format!("write -P {p:#x} {off} {len}");
    let rd = |p: u8, off: u64, len: u64| format!("read -P {p:#x} {off} {len}");
    qemu_io(&live, false, &[w(0x11, 0, 8 * MIB)]);
    // b1's delta takes 8 MiB of 0xaa; the release merges it down.
    ctl_json(&srv, &["backup", "create", "v", "b1"]);
    qemu_io(&live, false, &[w(0xaa, 0, 8 * MIB), "flush".into()]);
    let before = delta_files(&srv);
    run_ok(ctl(&srv).args(["backup", "release", "v@b1"]));
    wait_released(&srv, "v", None);
    // What is left is one prepared delta for the next backup: b1's file, renamed,
    // with its written space (a fresh prepared delta is sparse).
    let after = delta_files(&srv);
    assert_eq!(after.len(), 1, "one prepared delta: {after:?}");
    assert!(
        !before.iter().any(|(name, _)| *name == after[0].0),
        "the prepared delta is a new one: {before:?} -> {after:?}"
    );
    assert!(
        after[0].1 >= 8 * MIB,
        "the prepared delta holds b1's written space: {after:?}"
    );
    assert_reads(&live, false, &[rd(0xaa, 0, 8 * MIB), rd(0, 8 * MIB, MIB)]);

    // b2 lands on the reused file, whose first chunks hold 0xaa.
    ctl_json(&srv, &["backup", "create", "v", "b2"]);
    qemu_io(
        &live,
        false,
        &[
            w(0x55, c / 4, c / 4),   // a partial first write: read-merges from below
            w(0x66, 200 * c, c),     // a whole chunk, beyond the old data
            w(0x77, 8 * MIB + c, c), // a chunk the base never had
            "flush".into(),
        ],
    );
    let live_now = [
        rd(0xaa, 0, c / 4),
        rd(0x55, c / 4, c / 4),
        rd(0xaa, c / 2, 8 * MIB - c / 2),
        rd(0, 8 * MIB, c),
        rd(0x77, 8 * MIB + c, c),
        rd(0, 8 * MIB + 2 * c, c),
        rd(0x66, 200 * c, c),
    ];
    assert_reads(&live, false, &live_now);
    let b2 = srv.uri("v@b2");
    assert_reads(
        &b2,
        true,
        &[
            rd(0xaa, 0, 8 * MIB),
            rd(0, 8 * MIB, 2 * c),
            rd(0, 200 * c, c),
        ],
    );
    // Negative control: the check sees a wrong byte.
    let (ok, text) = qemu_io_status(&b2, true, &[rd(0xaa, 200 * c, c)]);
    assert!(!ok && text.contains("verification failed"), "{text}");
    // Released again, the live volume keeps exactly what it showed.
    run_ok(ctl(&srv).args(["backup", "release", "v@b2"]));
    wait_released(&srv, "v", None);
    assert_reads(&live, false, &live_now);
}
