//! The server starts with zero configuration and a real client can use it.

mod common;
use common::*;
use std::process::Command;

#[test]
fn qemu_io_pattern_round_trip_and_clean_shutdown() {
    let srv = Server::start(&[]);
    let uri = srv.uri("vol0");
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -z 64k 64k",
        "-c",
        "read -P 0 64k 64k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Negative control: a wrong expected pattern must be reported.
    let bad = run(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0xcd 0 4k"]));
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
    let st = srv.stop();
    assert!(st.success(), "SIGTERM should stop the server cleanly: {st}");
}
