//! `ringblk-ctl backup copy`: start a server-side copy job, follow it, report.
//!
//! The server does the copy (`backup_copy`); this side polls `backup_copy_status`.
//! On a terminal it draws a progress bar with rate and ETA on stderr; with `--json`
//! it prints one JSON status object per line instead (the last one is final), so a
//! script can follow it line by line. Ctrl-C asks the server to cancel the job and
//! waits (bounded) until it says so.
//!
//! # Exit status
//! 0 when the job is done (human mode then prints `sha256 <hex>  DEST`, the format of
//! `sha256sum`); 1 when it failed or was cancelled, or the server could not be asked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::client::{Client, CtlError};

/// How often the job's status is polled.
const POLL: Duration = Duration::from_millis(200);
/// How long to wait for a cancelled job to report that it stopped.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: std::os::raw::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C sets a flag the poll loop checks, instead of killing the process before it
/// could cancel the server-side job.
fn catch_sigint() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_sigint),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an AtomicBool, which is async-signal-safe,
    // and no other code of this process installs a SIGINT handler.
    let installed = unsafe { sigaction(Signal::SIGINT, &action) };
    if let Err(e) = installed {
        eprintln!("warning: cannot catch Ctrl-C ({e}); it will not cancel the job");
    }
}

/// What `backup copy` was asked.
pub struct CopyArgs<'a> {
    pub volume: &'a str,
    pub name: &'a str,
    pub dest: &'a Path,
    pub changed_since: Option<&'a str>,
    pub json: bool,
}

/// DEST is opened by the server: a relative path means relative to here.
fn absolute(dest: &Path) -> PathBuf {
    if dest.is_absolute() {
        return dest.to_path_buf();
    }
    std::env::current_dir().map_or_else(|_| dest.to_path_buf(), |cwd| cwd.join(dest))
}

/// Why DEST may not be overwritten by a full copy without `--force`: it exists and
/// is not an empty regular file (an unrelated file, an earlier copy, a device).
/// `None`: it does not exist or is empty. DEST is on the server's host, which is
/// this one (the RPC socket is a Unix socket).
pub fn existing_dest(dest: &Path) -> Option<String> {
    let meta = std::fs::metadata(absolute(dest)).ok()?;
    if meta.is_file() && meta.len() == 0 {
        return None;
    }
    Some(if meta.is_file() {
        format!("exists ({} bytes)", meta.len())
    } else {
        "exists (not a regular file)".to_string()
    })
}

pub fn run(client: &Client, args: &CopyArgs<'_>) -> ExitCode {
    match follow(client, args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn start_params(args: &CopyArgs<'_>, dest: &Path) -> Value {
    let mut p = json!({"volume": args.volume, "name": args.name, "dest": dest});
    if let Some(older) = args.changed_since {
        p["changed_since"] = json!(older);
    }
    p
}

fn follow(client: &Client, args: &CopyArgs<'_>) -> Result<ExitCode, CtlError> {
    let dest = absolute(args.dest);
    catch_sigint();
    let started = client.call("backup_copy", Some(start_params(args, &dest)))?;
    let job = started
        .get("job")
        .and_then(Value::as_u64)
        .ok_or_else(|| CtlError::Protocol(format!("backup_copy returned {started}")))?;
    let total = started
        .get("bytes_total")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let bar = (!args.json).then(|| progress_bar(total));
    let mut cancel_sent: Option<Instant> = None;
    let status = loop {
        let status = client.call("backup_copy_status", Some(json!({ "job": job })))?;
        let state = status.get("state").and_then(Value::as_str).unwrap_or("");
        if args.json {
            emit_line(&status);
        } else if let Some(bar) = &bar {
            show(bar, &status);
        }
        if state != "running" {
            break status;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            match cancel_sent {
                None => {
                    // Best effort: if this fails, the job's status still decides.
                    let _ = client.call("backup_copy_cancel", Some(json!({ "job": job })));
                    cancel_sent = Some(Instant::now());
                }
                Some(t) if t.elapsed() > CANCEL_WAIT => {
                    eprintln!("error: job {job} did not stop within {CANCEL_WAIT:?}");
                    return Ok(ExitCode::FAILURE);
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(POLL);
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(report(&status, &dest, args.json))
}

/// Prints the final outcome; the exit status follows the job's state.
fn report(status: &Value, dest: &Path, json_mode: bool) -> ExitCode {
    let field = |k: &str| status.get(k).and_then(Value::as_str).unwrap_or("");
    match field("state") {
        "done" => {
            if !json_mode {
                let written = status.get("bytes_written").and_then(Value::as_u64);
                if let Some(w) = written {
                    eprintln!("copied: {} written", HumanBytes(w));
                }
                println!("sha256 {}  {}", field("sha256"), dest.display());
            }
            ExitCode::SUCCESS
        }
        "cancelled" => {
            eprintln!("cancelled; {} is incomplete", dest.display());
            ExitCode::FAILURE
        }
        other => {
            let error = status
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            eprintln!("error: copy {other}: {error}");
            ExitCode::FAILURE
        }
    }
}

fn emit_line(status: &Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head -1`) must not stop the job being followed.
    let _ = writeln!(out, "{status}").and_then(|()| out.flush());
}

fn progress_bar(total: u64) -> ProgressBar {
    // Draws on stderr only when it is a terminal (indicatif hides it otherwise).
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn show(bar: &ProgressBar, status: &Value) {
    let n = |k: &str| status.get(k).and_then(Value::as_u64);
    if let Some(done) = n("bytes_done") {
        bar.set_position(done);
    }
    let rate = n("rate_bytes_per_sec").map_or("-".into(), |r| format!("{}/s", HumanBytes(r)));
    let eta = n("eta_secs").map_or("-".into(), |s| format!("{s}s"));
    bar.set_message(format!("{rate} ETA {eta}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_or_empty_dest_is_free() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("d.img");
        assert_eq!(existing_dest(&p), None);
        std::fs::write(&p, b"").expect("write");
        assert_eq!(existing_dest(&p), None);
        std::fs::write(&p, b"x").expect("write");
        assert!(existing_dest(&p).is_some_and(|w| w.contains("1 bytes")));
        assert!(existing_dest(dir.path()).is_some());
    }

    #[test]
    fn relative_dest_is_made_absolute() {
        assert!(absolute(Path::new("x.img")).is_absolute());
        assert_eq!(absolute(Path::new("/a/b")), PathBuf::from("/a/b"));
    }

    #[test]
    fn start_params_carry_changed_since_only_when_given() {
        let mut a = CopyArgs {
            volume: "v",
            name: "b",
            dest: Path::new("/d"),
            changed_since: None,
            json: false,
        };
        let p = start_params(&a, Path::new("/d"));
        assert!(p.get("changed_since").is_none());
        a.changed_since = Some("a");
        assert_eq!(start_params(&a, Path::new("/d"))["changed_since"], "a");
    }
}
