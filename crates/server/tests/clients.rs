//! Acceptance of the NBD target with the real clients users run against it: fio
//! (ioengine=nbd), qemu-io, qemu-img, nbdinfo, nbdcopy and nbdsh (libnbd), each
//! talking to a real `ringblk serve` on loopback.
//!
//! Every test checks the bytes (read back through the server, and where it helps also
//! straight from the backing file), and every verifying check has a negative control
//! showing that the same check fails when the data is wrong.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// stdout and stderr together (tools disagree on where messages go).
fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `qemu-io -f raw URI -c CMD...`, not asserting anything.
fn qemu_io(uri: &str, cmds: &[String]) -> Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    run(&mut c)
}

/// qemu-io that must succeed with every `read -P` check passing.
fn qemu_io_ok(uri: &str, cmds: &[String]) -> String {
    let out = qemu_io(uri, cmds);
    let t = text(&out);
    assert!(
        out.status.success() && !t.contains("failed") && !t.contains("error"),
        "qemu-io {cmds:?} on {uri} failed ({}):\n{t}",
        out.status
    );
    t
}

/// The negative control of a qemu-io pattern check: a read expecting `pattern` where
/// the data is something else must be reported and make qemu-io fail.
fn assert_qemu_io_pattern_mismatch(uri: &str, pattern: u8, offset: u64, len: u64) {
    let out = qemu_io(uri, &[format!("read -P {pattern:#04x} {offset} {len}")]);
    let t = text(&out);
    assert!(
        !out.status.success() && t.contains("Pattern verification failed"),
        "a read expecting the wrong pattern {pattern:#04x} at {offset} must fail:\n{t}"
    );
}

/// libnbd's Python shell. `/usr/bin/nbdsh` runs `python3 -m nbd` from PATH, and the
/// nbd module is installed for Debian's python3 only, so put /usr/bin first.
fn nbdsh(uri: &str, script: &str) -> Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("/usr/bin/nbdsh")
        .env("PATH", path)
        .args(["-u", uri, "-c", script]))
}

/// One JSON-RPC call on the server's control socket; returns `result`.
fn rpc(srv: &Server, method: &str) -> Value {
    let mut s = UnixStream::connect(&srv.rpc)
        .unwrap_or_else(|e| panic!("connect {}: {e}", srv.rpc.display()));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    writeln!(s, r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#).expect("send");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("rpc reply");
    let v: Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("rpc reply {line:?}: {e}"));
    assert!(v.get("error").is_none(), "rpc {method} failed: {v}");
    v["result"].clone()
}

/// The server's counters for one volume.
fn stats(srv: &Server, volume: &str) -> Value {
    let all = rpc(srv, "stats");
    all["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
        .cloned()
        .unwrap_or_else(|| panic!("no stats for {volume}: {all}"))
}

fn counter(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {key} in {v}"))
}

/// A server whose volumes are given as `NAME=FILE,opts` with FILE relative to its
/// data directory, or `NAME=,opts` for mem and null.
fn start(volumes: &[&str]) -> Server {
    let dir = tmpdir();
    let mut args = Vec::new();
    for v in volumes {
        let (name, rest) = v.split_once('=').expect("NAME=SPEC");
        let spec = match rest.split_once(',') {
            Some((file, opts)) if !file.is_empty() => {
                format!("{name}={},{opts}", dir.path().join(file).display())
            }
            _ => v.to_string(),
        };
        args.push("--volume".to_string());
        args.push(spec);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_in(dir, &args)
}

/// Deterministic pseudo-random bytes (splitmix64: fast even in a debug build, where
/// rand's ChaCha takes seconds for 64 MiB).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    v.truncate(len);
    v
}

fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .expect("read backing file");
    buf
}

/// Where two byte strings differ: how many bytes, and the first few offsets. (Compares
/// 4 KiB at a time with memcmp first: byte loops are slow in debug builds.)
fn diffs(a: &[u8], b: &[u8]) -> (usize, Vec<usize>) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let (mut n, mut first) = (0, Vec::new());
    for (i, (x, y)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
        if x == y {
            continue;
        }
        for (j, _) in x.iter().zip(y).enumerate().filter(|(_, (p, q))| p != q) {
            n += 1;
            if first.len() < 8 {
                first.push(i * 4096 + j);
            }
        }
    }
    (n, first)
}

// ---------------------------------------------------------------------------------
// 1. fio, ioengine=nbd, crc32c verify over 4 connections
// ---------------------------------------------------------------------------------

/// fio's JSON report (the nbd engine prints "fio: connected to NBD server" lines first).
fn fio_json(out: &Output) -> Value {
    let s = String::from_utf8_lossy(&out.stdout);
    let start = s
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| s.starts_with('{').then_some(0))
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{}", text(out)));
    serde_json::Deserializer::from_str(&s[start..])
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("bad fio JSON:\n{}", text(out)))
}

#[test]
fn fio_four_connections_crc32c_verify_and_verify_only_catches_corruption() {
    const JOBS: u64 = 4;
    const REGION: u64 = 8 * MIB; // per job, non-overlapping: job n owns [n*8M, (n+1)*8M)
    const BLOCKS: u64 = JOBS * REGION / (4 * KIB);
    let srv = start(&["vol0=vol0.img,size=64M"]);
    let uri = srv.uri("vol0");
    // fio keeps verify state files in its working directory.
    let work = tmpdir();
    let fio = |extra: &[&str]| {
        let mut c = Command::new("fio");
        c.current_dir(work.path()).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--numjobs={JOBS}"),
            &format!("--size={REGION}"),
            &format!("--offset_increment={REGION}"),
            "--verify=crc32c",
            // The same seed makes the verify pass regenerate the same offsets; the
            // random map (on by default) makes every block of each region written once.
            "--randrepeat=1",
            "--randseed=20240611",
            "--group_reporting",
            "--output-format=json",
        ]);
        c.args(extra);
        run(&mut c)
    };

    // Write pass: 4 jobs = 4 NBD connections, an NBD FLUSH every 16 writes.
    let w = fio(&["--do_verify=0", "--fsync=16"]);
    assert!(w.status.success(), "fio write pass failed:\n{}", text(&w));
    assert_eq!(
        text(&w).matches("fio: connected to NBD server").count(),
        JOBS as usize,
        "one connection per job:\n{}",
        text(&w)
    );
    let j = &fio_json(&w)["jobs"][0];
    assert_eq!(j["error"], 0, "{j}");
    assert_eq!(j["write"]["total_ios"].as_u64(), Some(BLOCKS), "{j}");
    let syncs = j["sync"]["total_ios"].as_u64().expect("sync count");
    assert!(syncs > 0, "--fsync=16 must issue flushes: {j}");
    // Every fio fsync reached the server as an NBD FLUSH, every write as a WRITE.
    let st = stats(&srv, "vol0");
    assert_eq!(counter(&st, "flush_ops"), syncs, "{st}");
    assert_eq!(counter(&st, "write_ops"), BLOCKS, "{st}");
    assert_eq!(counter(&st, "errors"), 0, "{st}");

    // Verify pass on fresh connections: every block read back and its crc32c checked.
    let v = fio(&["--verify_only"]);
    assert!(v.status.success(), "fio verify_only failed:\n{}", text(&v));
    let j = &fio_json(&v)["jobs"][0];
    assert_eq!(j["error"], 0, "{j}");
    assert_eq!(
        j["read"]["total_ios"].as_u64(),
        Some(BLOCKS),
        "every block verified: {j}"
    );
    let complaints = String::from_utf8_lossy(&v.stderr);
    assert!(
        !complaints.contains("verify"),
        "no verify complaints:\n{complaints}"
    );

    // Negative control: corrupt one block's header (job 1) and one block's payload
    // only (job 3), then the same verify must fail and name both blocks.
    let hdr = REGION + 37 * 4 * KIB;
    let payload = 3 * REGION + 100 * 4 * KIB;
    // fio really wrote these blocks (they are not zeros) ...
    assert_qemu_io_pattern_mismatch(&uri, 0, hdr, 4 * KIB);
    assert_qemu_io_pattern_mismatch(&uri, 0, payload, 4 * KIB);
    qemu_io_ok(
        &uri,
        &[
            format!("write -P 0x42 {hdr} 4k"),
            format!("write -P 0x42 {} 512", payload + 2048),
        ],
    );
    let bad = fio(&["--verify_only"]);
    let t = text(&bad);
    assert!(
        !bad.status.success(),
        "verify_only must fail after corruption:\n{t}"
    );
    assert!(
        t.contains("bad magic header 4242") && t.contains(&format!("offset {hdr},")),
        "header corruption at {hdr} must be reported:\n{t}"
    );
    assert!(
        t.contains("crc32c: verify failed") && t.contains(&format!("offset {payload},")),
        "payload corruption at {payload} must be reported:\n{t}"
    );
}

// ---------------------------------------------------------------------------------
// 2. qemu-io: every command qemu's NBD driver sends, bytes checked
// ---------------------------------------------------------------------------------

#[test]
fn qemu_io_writes_zeroes_fua_discard_aio_and_flush_round_trip() {
    let srv = start(&["vol0=vol0.img,size=64M"]);
    let uri = srv.uri("vol0");
    // What the first 4 MiB must hold afterwards.
    let mut model = vec![0u8; 4 * MIB as usize];
    let mut set =
        |off: u64, len: u64, byte: u8| model[off as usize..(off + len) as usize].fill(byte);
    let cmds: Vec<String> = [
        // plain write and read
        "write -P 0x11 0 64k",
        "read -P 0x11 0 64k",
        // WRITE_ZEROES (NO_HOLE) over written data, neighbours untouched
        "write -P 0x22 64k 128k",
        "write -z 64k 64k",
        "read -P 0 64k 64k",
        "read -P 0x22 128k 64k",
        "read -P 0x11 0 64k",
        // WRITE_ZEROES that may punch a hole
        "write -P 0x33 192k 64k",
        "write -z -u 192k 64k",
        "read -P 0 192k 64k",
        // FUA write, and FUA write-zeroes
        "write -f -P 0x44 256k 64k",
        "read -P 0x44 256k 64k",
        "write -P 0x45 320k 64k",
        "write -z -f 320k 32k",
        "read -P 0 320k 32k",
        "read -P 0x45 352k 32k",
        // TRIM of written data (file volumes punch a hole: reads as zeros)
        "write -P 0x55 1M 1M",
        "discard 1M 1M",
        "read -P 0 1M 1M",
        // several writes in flight at once, then one flush for all of them
        "aio_write -P 0x66 2M 64k",
        "aio_write -P 0x67 2112k 64k",
        "aio_write -P 0x68 2176k 64k",
        "aio_write -P 0x69 2240k 64k",
        "aio_flush",
        "read -P 0x66 2M 64k",
        "read -P 0x67 2112k 64k",
        "read -P 0x68 2176k 64k",
        "read -P 0x69 2240k 64k",
        // one sector, odd offset in the MiB
        "write -P 0x7a 3073k 512",
        "read -P 0x7a 3073k 512",
        "read -P 0 3072k 1k",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = qemu_io_ok(&uri, &cmds);
    let reads = cmds.iter().filter(|c| c.starts_with("read ")).count();
    assert_eq!(
        out.matches("\nread ").count() + usize::from(out.starts_with("read ")),
        reads,
        "every read ran:\n{out}"
    );
    set(0, 64 * KIB, 0x11);
    set(128 * KIB, 64 * KIB, 0x22);
    set(256 * KIB, 64 * KIB, 0x44);
    set(352 * KIB, 32 * KIB, 0x45);
    set(2 * MIB, 64 * KIB, 0x66);
    set(2 * MIB + 64 * KIB, 64 * KIB, 0x67);
    set(2 * MIB + 128 * KIB, 64 * KIB, 0x68);
    set(2 * MIB + 192 * KIB, 64 * KIB, 0x69);
    set(3073 * KIB, 512, 0x7a);

    // qemu sent the real commands, not emulations of them.
    let st = stats(&srv, "vol0");
    assert!(
        counter(&st, "zero_ops") >= 3,
        "write -z must be NBD WRITE_ZEROES: {st}"
    );
    assert!(
        counter(&st, "trim_ops") >= 1,
        "discard must be NBD TRIM: {st}"
    );
    assert!(
        counter(&st, "flush_ops") >= 2,
        "aio_flush and flush must be NBD FLUSH: {st}"
    );
    assert_eq!(counter(&st, "errors"), 0, "{st}");

    // The bytes landed where they belong: the backing file equals the model.
    let disk = read_file_range(&srv.path("vol0.img"), 0, model.len());
    let (n, first) = diffs(&disk, &model);
    assert_eq!(
        n, 0,
        "backing file differs from the model in {n} bytes, first at {first:?}"
    );

    // Negative controls: a wrong pattern is reported, for data and for zeros.
    assert_qemu_io_pattern_mismatch(&uri, 0x12, 0, 4 * KIB);
    assert_qemu_io_pattern_mismatch(&uri, 0x55, MIB, 4 * KIB);
}

// ---------------------------------------------------------------------------------
// 3. qemu-img map / compare / convert
// ---------------------------------------------------------------------------------

/// qemu-img map's JSON: (start, length, zero, data).
fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", uri]));
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("map JSON: {e}\n{out}"));
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["zero"].as_bool().expect("zero"),
                e["data"].as_bool().expect("data"),
            )
        })
        .collect()
}

/// Whether the map covers `[start, start + len)` entirely with extents of this kind.
fn map_covers(
    map: &[(u64, u64, bool, bool)],
    start: u64,
    len: u64,
    zero: bool,
    data: bool,
) -> bool {
    let mut pos = start;
    for &(s, l, z, d) in map {
        if s <= pos && pos < s + l {
            if z != zero || d != data {
                return false;
            }
            pos = s + l;
            if pos >= start + len {
                return true;
            }
        }
    }
    false
}

fn qemu_img_compare(a: &Path, uri: &str) -> Output {
    run(Command::new("qemu-img")
        .arg("compare")
        .args(["-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(uri))
}

#[test]
fn qemu_img_map_shows_discarded_hole_compare_and_convert() {
    let srv = start(&["vol0=vol0.img,size=64M", "conv=conv.img,size=16M"]);
    let uri = srv.uri("vol0");
    let work = tmpdir();

    qemu_io_ok(&uri, &["write -P 0xa1 0 4M".to_string()]);
    let before = qemu_img_map(&uri);
    qemu_io_ok(&uri, &["discard 1M 1M".to_string()]);
    let after = qemu_img_map(&uri);
    // The discarded, aligned MiB is a hole that reads as zeros; its neighbours are data.
    assert!(
        map_covers(&after, MIB, MIB, true, false),
        "1M..2M must be a hole: {after:?}"
    );
    assert!(
        map_covers(&after, 0, MIB, false, true),
        "0..1M is data: {after:?}"
    );
    assert!(
        map_covers(&after, 2 * MIB, 2 * MIB, false, true),
        "2M..4M is data: {after:?}"
    );
    assert!(
        map_covers(&after, 4 * MIB, 60 * MIB, true, false),
        "never written: hole: {after:?}"
    );
    // Negative control: the same check on the map before the discard fails.
    assert!(
        !map_covers(&before, MIB, MIB, true, false),
        "no hole before the discard: {before:?}"
    );

    // compare against a reference file built with the same writes.
    let mut reference = vec![0u8; 64 * MIB as usize];
    reference[..4 * MIB as usize].fill(0xa1);
    reference[MIB as usize..2 * MIB as usize].fill(0);
    let ref_path = work.path().join("ref.raw");
    std::fs::write(&ref_path, &reference).expect("write ref");
    let same = qemu_img_compare(&ref_path, &uri);
    assert!(
        same.status.success() && text(&same).contains("Images are identical"),
        "export must equal the reference:\n{}",
        text(&same)
    );
    // Negative control: one byte different in the reference -> exit status 1.
    reference[3 * MIB as usize + 7] ^= 0x01;
    let bad_path = work.path().join("bad.raw");
    std::fs::write(&bad_path, &reference).expect("write bad ref");
    let diff = qemu_img_compare(&bad_path, &uri);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "a differing file must compare unequal:\n{}",
        text(&diff)
    );
    assert!(text(&diff).contains("Content mismatch"), "{}", text(&diff));

    // convert -n into an export filled with 0xff, from a source with a zero MiB in
    // it: the export must then equal the source, zeros included.
    let conv = srv.uri("conv");
    qemu_io_ok(&conv, &["write -P 0xff 0 16M".to_string()]);
    let mut src = random_bytes(16 * MIB as usize, 3);
    src[5 * MIB as usize..6 * MIB as usize].fill(0);
    let src_path = work.path().join("src.raw");
    std::fs::write(&src_path, &src).expect("write src");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src_path)
            .arg(&conv),
    );
    let same = qemu_img_compare(&src_path, &conv);
    assert!(
        same.status.success() && text(&same).contains("Images are identical"),
        "converted export must equal its source:\n{}",
        text(&same)
    );
    assert!(
        read_file_range(&srv.path("conv.img"), 0, src.len()) == src,
        "backing file of the converted export differs from the source"
    );
    // Negative control: change 512 bytes in the export; compare must notice.
    qemu_io_ok(&conv, &[format!("write -P 0x5c {} 512", 9 * MIB)]);
    let diff = qemu_img_compare(&src_path, &conv);
    assert_eq!(diff.status.code(), Some(1), "{}", text(&diff));
}

// ---------------------------------------------------------------------------------
// 4. nbdinfo
// ---------------------------------------------------------------------------------

/// `nbdinfo --can/--is WHAT URI`: Some(true) = exit 0, Some(false) = exit 2.
fn nbdinfo_flag(kind: &str, what: &str, uri: &str) -> bool {
    let out = run(Command::new("nbdinfo").args([kind, what, uri]));
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {kind} {what} {uri} failed ({}):\n{}",
            out.status,
            text(&out)
        ),
    }
}

/// `nbdinfo --map URI` text lines: (offset, length, description).
fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, String)> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", uri]));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "map line {l:?}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[3].to_string(),
            )
        })
        .collect()
}

#[test]
fn nbdinfo_json_list_map_and_capabilities() {
    let dir = tmpdir();
    let ro_img = dir.path().join("ro.img");
    let vol0_img = dir.path().join("vol0.img");
    let ro_bytes = random_bytes(16 * MIB as usize, 4);
    std::fs::write(&ro_img, &ro_bytes).expect("ro image");
    let srv = Server::start_in(
        dir,
        &[
            "--volume",
            &format!("vol0={},size=64M", vol0_img.display()),
            "--volume",
            &format!("ro={},read-only", ro_img.display()),
            "--volume",
            "m=,backend=mem,size=16M",
        ],
    );
    let uri = srv.uri("vol0");

    // --json on one export.
    let info: Value = serde_json::from_str(&run_ok(Command::new("nbdinfo").args(["--json", &uri])))
        .expect("json");
    assert_eq!(info["protocol"], "newstyle-fixed", "{info}");
    assert_eq!(info["structured"], true, "{info}");
    let e = &info["exports"][0];
    assert_eq!(e["export-name"], "vol0", "{e}");
    assert_eq!(e["export-size"].as_u64(), Some(64 * MIB), "{e}");
    assert_eq!(e["is_read_only"], false, "{e}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512), "{e}");
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "{e}"
    );
    for key in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
    ] {
        assert_eq!(e[key], true, "{key}: {e}");
    }
    assert_eq!(
        run_ok(Command::new("nbdinfo").args(["--size", &uri])).trim(),
        (64 * MIB).to_string()
    );

    // --can, as advertised (exit 0), and the exit status really distinguishes false.
    for what in [
        "connect",
        "read",
        "write",
        "multi-conn",
        "fua",
        "flush",
        "trim",
        "zero",
        "fast-zero",
        "cache",
        "df",
        "structured-reply",
    ] {
        assert!(
            nbdinfo_flag("--can", what, &uri),
            "vol0 must advertise {what}"
        );
    }
    assert!(!nbdinfo_flag("--is", "read-only", &uri), "vol0 is writable");
    assert!(
        !nbdinfo_flag("--is", "rotational", &uri),
        "vol0 is not rotational"
    );

    // The read-only volume.
    let ro = srv.uri("ro");
    assert!(nbdinfo_flag("--is", "read-only", &ro), "ro is read-only");
    for what in ["trim", "zero", "fast-zero", "write"] {
        assert!(
            !nbdinfo_flag("--can", what, &ro),
            "ro must not advertise {what}"
        );
    }
    assert!(nbdinfo_flag("--can", "connect", &ro) && nbdinfo_flag("--can", "read", &ro));
    // ... and the server enforces it (libnbd's client-side check switched off so the
    // request reaches the server), while the same write to vol0 works.
    let write = "h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_COMMANDS)
try:
    h.pwrite(b'\\x99' * 4096, 0)
    print('WRITE OK')
except nbd.Error as e:
    print('WRITE REFUSED', e.errno, e.string)
print('FIRST', h.pread(4096, 0)[:4].hex())
";
    let out = nbdsh(&ro, write);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("WRITE REFUSED EPERM") && t.contains("command failed"),
        "server must refuse: {t}"
    );
    assert!(t.contains(&format!("FIRST {}", hex(&ro_bytes[..4]))), "{t}");
    assert_eq!(
        std::fs::read(&ro_img).expect("ro image"),
        ro_bytes,
        "read-only image changed"
    );
    let out = nbdsh(&uri, write);
    assert!(
        text(&out).contains("WRITE OK") && text(&out).contains("FIRST 99999999"),
        "{}",
        text(&out)
    );

    // --list shows every export.
    let list: Value = serde_json::from_str(&run_ok(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd://127.0.0.1:{}", srv.port),
    ])))
    .expect("list json");
    let mut names: Vec<(String, u64, bool)> = list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().expect("name").to_string(),
                e["export-size"].as_u64().expect("size"),
                e["is_read_only"].as_bool().expect("ro"),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("m".to_string(), 16 * MIB, false),
            ("ro".to_string(), 16 * MIB, true),
            ("vol0".to_string(), 64 * MIB, false)
        ],
        "{list}"
    );
    let text_list =
        run_ok(Command::new("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", srv.port)]));
    for n in ["export=\"vol0\"", "export=\"ro\"", "export=\"m\""] {
        assert!(text_list.contains(n), "{n} missing:\n{text_list}");
    }

    // --map: a fresh volume is all hole; after writing 1 MiB at 0 it is data then hole.
    let m = srv.uri("m");
    let fresh = nbdinfo_map(&m);
    assert!(
        fresh.iter().all(|(_, _, d)| d == "hole,zero"),
        "fresh volume: {fresh:?}"
    );
    qemu_io_ok(&m, &["write -P 0x31 0 1M".to_string()]);
    let map = nbdinfo_map(&m);
    assert_eq!(map.first(), Some(&(0, MIB, "data".to_string())), "{map:?}");
    assert!(map[1..].iter().all(|(_, _, d)| d == "hole,zero"), "{map:?}");
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), 16 * MIB, "{map:?}");
    // Negative control: the fresh map fails the data check above.
    assert_ne!(fresh.first(), Some(&(0, MIB, "data".to_string())));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

// ---------------------------------------------------------------------------------
// 5. nbdcopy
// ---------------------------------------------------------------------------------

#[test]
fn nbdcopy_to_and_from_an_export_is_byte_identical() {
    let srv = start(&["cp=cp.img,size=64M"]);
    let uri = srv.uri("cp");
    let work = tmpdir();
    let src = random_bytes(64 * MIB as usize, 5);
    let src_path = work.path().join("src.raw");
    std::fs::write(&src_path, &src).expect("write src");

    // In (multi-conn, as advertised), with a flush at the end; then back out.
    run_ok(
        Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src_path)
            .arg(&uri),
    );
    assert!(
        read_file_range(&srv.path("cp.img"), 0, src.len()) == src,
        "backing file differs from source"
    );
    let back = work.path().join("back.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len(), src.len());
    let (n, first) = diffs(&got, &src);
    assert_eq!(n, 0, "copy-back differs in {n} bytes, first at {first:?}");

    // Negative control: change one byte in the export; the copy now differs there only.
    let off = 12345usize;
    let byte = src[off] ^ 0xff;
    qemu_io_ok(&uri, &[format!("write -P {byte:#04x} {off} 1")]);
    let back2 = work.path().join("back2.raw");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back2));
    let got2 = std::fs::read(&back2).expect("read back2");
    assert_eq!(
        diffs(&got2, &src),
        (1, vec![off]),
        "exactly the changed byte must differ"
    );
}

// ---------------------------------------------------------------------------------
// 6. Backends: mem, 4096-byte blocks, null
// ---------------------------------------------------------------------------------

fn pattern_round_trip(uri: &str) {
    let cmds: Vec<String> = [
        "write -P 0x5a 0 64k",
        "write -P 0x5b 64k 64k",
        "read -P 0x5a 0 64k",
        "read -P 0x5b 64k 64k",
        "write -z 64k 16k",
        "read -P 0 64k 16k",
        "read -P 0x5b 80k 48k",
        "write -f -P 0x5c 1M 1M",
        "discard 1M 1M",
        "read -P 0 1M 1M",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_io_ok(uri, &cmds);
    assert_qemu_io_pattern_mismatch(uri, 0x5b, 0, 64 * KIB);
}

#[test]
fn mem_backend_round_trip() {
    let srv = start(&["m=,backend=mem,size=64M"]);
    pattern_round_trip(&srv.uri("m"));
    let st = stats(&srv, "m");
    assert!(
        counter(&st, "write_ops") >= 3 && counter(&st, "errors") == 0,
        "{st}"
    );
}

#[test]
fn block_4096_volume_round_trip_and_refuses_unaligned_requests() {
    let srv = start(&[
        "b4=b4.img,size=64M,block-size=4096",
        "m=,backend=mem,size=64M",
    ]);
    let uri = srv.uri("b4");
    pattern_round_trip(&uri);
    // qemu honours the 4096 minimum and does read-modify-write for a 512-byte write.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0x77 512 512".to_string(),
            "read -P 0x5a 0 512".to_string(),
            "read -P 0x77 512 512".to_string(),
            "read -P 0x5a 1k 63k".to_string(),
        ],
    );
    assert_eq!(
        read_file_range(&srv.path("b4.img"), 0, 1536),
        [vec![0x5a; 512], vec![0x77; 512], vec![0x5a; 512]].concat()
    );

    // libnbd refuses unaligned requests itself unless STRICT_ALIGN is cleared; then
    // they reach the server, which must answer EINVAL ("command failed" = a server
    // reply) and keep the connection usable and the data unchanged.
    let script = "assert h.get_block_size(nbd.SIZE_MINIMUM) in (512, 4096)
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
for what, call in (('pread', lambda: h.pread(512, 512)),
                   ('pwrite', lambda: h.pwrite(b'\\x99' * 512, 512)),
                   ('zero', lambda: h.zero(512, 1024))):
    try:
        call()
        print(what, 'ACCEPTED')
    except nbd.Error as e:
        print(what, 'REFUSED', e.errno, e.string)
print('HEAD', h.pread(4096, 0)[:1536].hex())
";
    let out = nbdsh(&uri, script);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for what in ["pread", "pwrite", "zero"] {
        let line = t
            .lines()
            .find(|l| l.starts_with(what))
            .unwrap_or_else(|| panic!("{what}: {t}"));
        assert!(
            line.contains("REFUSED EINVAL") && line.contains("command failed"),
            "an unaligned {what} on a 4096-byte-block volume must be refused by the server: {line}"
        );
    }
    let head = hex(&[vec![0x5a; 512], vec![0x77; 512], vec![0x5a; 512]].concat());
    assert!(
        t.contains(&format!("HEAD {head}")),
        "data changed or connection lost:\n{t}"
    );
    // Negative control: the same requests on a 512-byte-block volume are accepted.
    let out = nbdsh(&srv.uri("m"), script);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    for what in ["pread", "pwrite", "zero"] {
        assert!(
            t.contains(&format!("{what} ACCEPTED")),
            "{what} on a 512 volume: {t}"
        );
    }
}

#[test]
fn null_backend_reads_zeros_and_accepts_writes() {
    let srv = start(&["nul=,backend=null,size=64M"]);
    let uri = srv.uri("nul");
    let cmds: Vec<String> = [
        "write -P 0x5a 0 64k",
        "write -f -P 0x5a 64k 64k",
        "aio_write -P 0x5a 1M 64k",
        "aio_flush",
        "read -P 0 0 128k",
        "read -P 0 1M 64k",
        "write -z 2M 1M",
        "discard 4M 1M",
        "read -P 0 2M 4M",
        "flush",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_io_ok(&uri, &cmds);
    // Negative control: the written pattern is not stored.
    assert_qemu_io_pattern_mismatch(&uri, 0x5a, 0, 64 * KIB);
    // BLOCK_STATUS: the whole volume is one hole that reads as zeros (the NBD spec
    // requires at least one extent per selected context in every reply).
    assert_eq!(
        nbdinfo_map(&uri),
        vec![(0, 64 * MIB, "hole,zero".to_string())]
    );
    let map = qemu_img_map(&uri);
    assert!(map_covers(&map, 0, 64 * MIB, true, false), "{map:?}");
    let st = stats(&srv, "nul");
    assert!(
        counter(&st, "write_ops") >= 3 && counter(&st, "errors") == 0,
        "{st}"
    );
}

// ---------------------------------------------------------------------------------
// A client that stops reading replies
// ---------------------------------------------------------------------------------

/// The server's per-connection budget of request bytes (session::MAX_IN_FLIGHT_BYTES).
const BUDGET: u64 = 64 * MIB;

/// A raw old-style client: fixed newstyle, NBD_OPT_EXPORT_NAME (simple replies only).
fn raw_connect(port: u16, export: &str) -> std::net::TcpStream {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(TOOL_TIMEOUT)).expect("timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("greeting");
    assert_eq!(&hello[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes())
        .expect("client flags: FIXED_NEWSTYLE | NO_ZEROES");
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).expect("EXPORT_NAME");
    let mut info = [0u8; 10];
    s.read_exact(&mut info).expect("export info");
    s
}

#[test]
fn a_client_that_does_not_read_replies_gets_back_pressure_not_unbounded_queues() {
    use std::io::Read;
    const READ_LEN: u64 = 32 * MIB; // the largest request the server takes
    const N: u64 = 8; // 256 MiB of replies, 4x the budget
    let srv = start(&["m=,backend=mem,size=64M"]);
    qemu_io_ok(&srv.uri("m"), &["write -P 0x3c 0 32M".to_string()]);
    let reads_before = counter(&stats(&srv, "m"), "read_ops");

    let mut s = raw_connect(srv.port, "m");
    let mut reqs = Vec::new();
    for cookie in 0..N {
        reqs.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes()); // flags
        reqs.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        reqs.extend_from_slice(&cookie.to_be_bytes());
        reqs.extend_from_slice(&0u64.to_be_bytes()); // offset
        reqs.extend_from_slice(&(READ_LEN as u32).to_be_bytes());
    }
    s.write_all(&reqs).expect("send READs");

    // Liveness: the server starts on them ...
    let executed = || counter(&stats(&srv, "m"), "read_ops") - reads_before;
    let start = std::time::Instant::now();
    while executed() < 2 {
        assert!(
            start.elapsed() < TOOL_TIMEOUT,
            "the server never executed the READs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and, however long it is given, may not run further ahead of the client than
    // its budget: the replies of at most BUDGET / READ_LEN + 1 READs (the last may
    // overshoot) are held while nobody reads them. The kernel's socket buffers absorb
    // a few MiB at most (receive autotuning grows only when the client reads), far
    // less than one READ. (Not a speed check: a correct server can never exceed this;
    // the pause only gives a wrong one the chance to.)
    std::thread::sleep(Duration::from_millis(500));
    let ahead = executed();
    assert!(
        ahead <= BUDGET / READ_LEN + 1,
        "the server executed {ahead} of {N} 32 MiB READs whose replies nobody read: it queues replies without bound"
    );

    // Reading the replies lets every READ complete, with the right bytes.
    let want = vec![0x3cu8; READ_LEN as usize];
    let mut got = vec![0u8; READ_LEN as usize];
    let mut cookies = Vec::new();
    for _ in 0..N {
        let mut hdr = [0u8; 16];
        s.read_exact(&mut hdr).expect("reply header");
        assert_eq!(hdr[..4], 0x6744_6698u32.to_be_bytes(), "simple reply magic");
        assert_eq!(hdr[4..8], [0, 0, 0, 0], "READ error");
        cookies.push(u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes")));
        s.read_exact(&mut got).expect("reply data");
        assert!(got == want, "READ data differs");
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..N).collect::<Vec<_>>());
    assert_eq!(executed(), N);
}
