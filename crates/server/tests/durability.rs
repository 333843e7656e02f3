//! Durability on real files: `ringblk check` on a data dir the server left, a torn
//! journal tail (ignored and truncated by recovery), damage in the middle of a
//! journal and a damaged manifest (reported by the check with a non-zero exit, and
//! refused by the server with a clear error instead of serving a wrong image).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

fn check(dir: &Path) -> (i32, String) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(["check", "--data-dir"])
        .arg(dir));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Writes with flushes in between, so the journal holds several frames.
fn write_frames(srv: &Server, frames: usize) {
    let mut script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri('{}')\n",
        srv.uri("v")
    );
    for i in 0..frames {
        script += &format!(
            "h.pwrite(bytes([{}]) * 8192, {})\nh.flush()\n",
            0x10 + i,
            i * 65536
        );
    }
    let out = run(Command::new(SYSTEM_PYTHON).args(["-c", &script]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Delta 1's journal of volume `v`: `v@INCARNATION.1.journal` (any incarnation).
fn journal(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            n.starts_with("v@") && n.ends_with(".1.journal")
        })
        .unwrap_or_else(|| dir.join("v.1.journal"))
}

#[test]
fn check_reports_torn_tails_and_refuses_damage() {
    let img_dir = tmpdir();
    let img = img_dir.path().join("v.img");
    let spec = format!("v={},size=16M", img.display());
    let args = ["--volume", spec.as_str()];
    let srv = Server::start(&args);
    let out = run_ok(ctl(&srv).args(["backup", "create", "v", "b1"]));
    assert!(out.contains("b1"), "{out}");
    write_frames(&srv, 4);
    // kill -9 after the flushes; the data dir stays for the checks.
    let data = srv.stop_keep_dir(true);
    let dir = data.path().to_path_buf();

    let (code, text) = check(&dir);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("delta 1") && text.contains("consistent"),
        "{text}"
    );
    assert!(
        text.contains("4 frames, 8 records, 8 chunks mapped"),
        "{text}"
    );

    // A torn tail (a commit cut short): a note, exit 0; recovery drops it.
    let j = journal(&dir);
    let good = std::fs::read(&j).expect("journal");
    let mut torn = good.clone();
    torn.extend_from_slice(b"JFRM");
    torn.resize(good.len() + 512, 0xAB);
    std::fs::write(&j, &torn).expect("write");
    let (code, text) = check(&dir);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("torn tail"), "{text}");

    // Damage in the middle: the second frame's payload flipped, later frames intact.
    let mut bad = good.clone();
    bad[1024 + 30] ^= 0xff;
    std::fs::write(&j, &bad).expect("write");
    let (code, text) = check(&dir);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("ERROR") && text.contains("damaged"), "{text}");
    // The server refuses the volume rather than serving a wrong image: it leaves
    // it out (and would serve any other volume), saying why.
    let log_path = dir.join("refused.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringblk"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .args(["--rpc"])
        .arg(dir.join("other.sock"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn");
    let t0 = std::time::Instant::now();
    let err = loop {
        let err = std::fs::read_to_string(&log_path).unwrap_or_default();
        if err.contains("volume left out") || t0.elapsed() > std::time::Duration::from_secs(30) {
            break err;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        err.contains("volume left out")
            && err.contains("recovery failed")
            && err.contains("ringblk check"),
        "must refuse: {err}"
    );

    // A damaged manifest is an error too.
    std::fs::write(&j, &torn).expect("write");
    let m = dir.join("v.manifest");
    let mut mb = std::fs::read(&m).expect("manifest");
    mb[5] ^= 0x01;
    std::fs::write(&m, &mb).expect("write");
    let (code, text) = check(&dir);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("checksum"), "{text}");
    mb[5] ^= 0x01;
    std::fs::write(&m, &mb).expect("write");

    // Back to the torn tail only: the server recovers, serves the flushed data and
    // truncates the tail, after which the check has nothing to note.
    let srv = Server::start_in(data, &args);
    let out = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x10 0 8k",
        "-c",
        "read -P 0x13 192k 8k",
        &srv.uri("v"),
    ]));
    assert!(!out.contains("verification failed"), "{out}");
    assert_eq!(
        std::fs::metadata(&j).expect("journal").len(),
        good.len() as u64
    );
    let _data = srv.stop_keep_dir(false);
    let (code, text) = check(&dir);
    assert!(code == 0 && !text.contains("torn tail"), "{text}");
}
