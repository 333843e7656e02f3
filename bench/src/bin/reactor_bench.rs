//! `reactor_bench`: the reactor benchmark of issue 2.
//!
//! 4 KiB random reads at a fixed queue depth (32) on one file, through one ringblk
//! reactor, printed next to `fio --ioengine=io_uring --direct=1` on the same file in
//! the same run, with the ratio of the medians (target: at least 0.95 of fio). Then
//! the CPU time of an idle `adaptive` reactor (target: under 2 % of a core).
//!
//! # Method
//! - The data file is fully written with non-zero, incompressible bytes: reading
//!   holes never reaches the disk and would flatter both sides.
//! - Each round runs fio, then ringblk once per `--submit` policy (`batch`: one
//!   `io_uring_enter` per loop iteration; `eager`: one after every callback that
//!   queued a read); even rounds run that order reversed (ABBA), so that a drift of
//!   the disk or of the machine does not favour one side. Each policy's ratio is of
//!   medians over the same fio runs.
//! - Both ramp for the same time, then measure for the same time. IOPS are
//!   completions inside the measured window divided by its length.
//! - Latency is submission to completion for both: ringblk records from the call to
//!   `Reactor::submit` to the start of the callback (the SQE waits in the ring until
//!   the policy's `io_uring_enter`, as fio's waits until its commit), fio reports
//!   its total latency (`lat_ns`, asked for with `--lat_percentiles=1`).
//! - The reactor's CPU time is `getrusage(RUSAGE_THREAD)` taken on the reactor thread
//!   itself (inside a completion callback or a message), so nothing else is counted.
//! - Each run also reports the CPU the hypervisor stole from the VM meanwhile
//!   (`/proc/stat`). On a shared VM this is the largest source of noise, and it does
//!   not hit both sides alike: fio enters the kernel (and kicks the virtual disk) once
//!   per I/O, a `batch` reactor once per loop iteration. Compare rounds with low steal.
//!
//! # Panics
//! None on anything the disk, fio or the kernel does: every failure is a
//! [`BenchError`] and a non-zero exit.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use ringblk_reactor::{
    Completion, FileRef, IdlePolicy, IoBuf, Op, Reactor, ReactorConfig, ReactorError,
    ReactorHandle, ReactorPool, ReactorStatsSnapshot, SubmitPolicy,
};
use serde::Serialize;

const BLOCK_BYTES: u64 = 4096;
const MIB: u64 = 1 << 20;
const SMOKE_SIZE_BYTES: u64 = 64 * MIB;
/// Bounds on what a user may ask for: a typo must not run for a day or fill the disk.
const MAX_ROUNDS: u32 = 100;
const MAX_RUNTIME_SECS: u64 = 3600;
const MAX_IODEPTH: u32 = 4096;
const MAX_SIZE_BYTES: u64 = 1 << 40;
/// How long past its planned end a run may take before we call it hung.
const HANG_GRACE: Duration = Duration::from_secs(30);
/// How long a control message to a reactor may wait for room or an answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// Let a fresh idle reactor finish its start-up before the idle window opens.
const IDLE_SETTLE: Duration = Duration::from_millis(200);
/// Steal (percent of all CPUs) under which a run counts as undisturbed by the host.
/// On a shared VM, rounds above it swing either way by far more than the 5 % the
/// target is about.
const CLEAN_STEAL_PCT: f64 = 2.0;
/// Histogram range: 1 ns .. 60 s at 3 significant digits.
const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// Writes of the data file go in chunks of this size.
const FILL_CHUNK_BYTES: usize = MIB as usize;

const LONG_ABOUT: &str = "\
Reactor benchmark (issue 2).

1. Creates (or reuses) a fully written, non-sparse data file on the real disk.
2. Runs, alternately for --rounds rounds:
     fio --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 ...
     one ringblk reactor doing the same, once per --submit policy (batch: one
     io_uring_enter per loop iteration; eager: one after every callback that queued
     a read): O_DIRECT file registered as a fixed file, 4 KiB aligned random reads
     into fixed pool buffers, each completion resubmitting.
   and prints each run's IOPS, latency percentiles and CPU, the medians and, per
   policy, the ratio ringblk/fio of the median IOPS (target: >= 0.95).
3. Measures, per --submit policy, the CPU time of an idle `adaptive` reactor over
   --idle-secs (target: < 2 % of one core), with its busy/idle loop ticks and sleeps.

fio must be installed (ci/test.sh installs it). Use --smoke in CI (64 MiB, 1 s runs,
1 round, 1 s idle) and bench/reactor-bench.sh (release build) for real figures.";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
enum BenchError {
    #[error("invalid arguments: {0}")]
    Args(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{0}` not found: install fio (apt-get install fio; ci/test.sh does) or pass --fio PATH"
    )]
    FioMissing(String),
    #[error("fio failed: {0}")]
    Fio(String),
    #[error("reactor: {0}")]
    Reactor(#[from] ReactorError),
    #[error("ringblk run failed: {0}")]
    Run(String),
}

type Result<T> = std::result::Result<T, BenchError>;

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let context = context.into();
    move |source| BenchError::Io { context, source }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Poll {
    /// Spin forever (one core at 100 %).
    Busy,
    /// Spin for --poll-us after the last work, then sleep in io_uring_enter.
    Adaptive,
    /// Sleep as soon as a loop iteration finds no work.
    Interrupt,
}

impl Poll {
    fn policy(self, poll_us: u64) -> IdlePolicy {
        match self {
            Poll::Busy => IdlePolicy::Busy,
            Poll::Adaptive => IdlePolicy::Adaptive { poll_us },
            Poll::Interrupt => IdlePolicy::Interrupt,
        }
    }
}

/// A reactor [`SubmitPolicy`] on the command line and in the JSON report, as
/// `batch`, `eager` or `everyN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Submit(SubmitPolicy);

impl Submit {
    fn policy(self) -> SubmitPolicy {
        self.0
    }
}

impl std::fmt::Display for Submit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Submit {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        s.parse().map(Submit)
    }
}

impl Serialize for Submit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

#[derive(Parser, Debug)]
#[command(name = "reactor_bench", about = "ringblk reactor vs fio: 4 KiB random reads at QD32, and idle reactor CPU", long_about = LONG_ABOUT)]
struct Cli {
    /// Data file to read. Reused as is when it exists; created with --size otherwise.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Directory of the default data file. Must be on the disk under test (not tmpfs).
    #[arg(long, value_name = "DIR", default_value = "target/bench-data")]
    dir: PathBuf,
    /// Size of a data file this run creates (suffixes K, M, G, with or without iB).
    #[arg(long, value_name = "BYTES", default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Measured seconds per run (after the ramp).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    runtime_secs: u64,
    /// Seconds each run does I/O before measuring.
    #[arg(long, value_name = "SECS", default_value_t = 1)]
    ramp_secs: u64,
    /// Rounds of fio + ringblk.
    #[arg(long, value_name = "N", default_value_t = 3)]
    rounds: u32,
    /// Reads in flight, for both fio and ringblk.
    #[arg(long, value_name = "N", default_value_t = 32)]
    iodepth: u32,
    /// Idle policy of the reactor doing the reads.
    #[arg(long, value_enum, default_value_t = Poll::Adaptive)]
    poll: Poll,
    /// Submit policies of the reactor to run, each against the same fio run of a
    /// round (comma-separated; each gets its own ratio and idle measurement).
    /// batch: one io_uring_enter per loop iteration; eager: one after every callback
    /// that queued a read (like fio); everyN: one once N reads are queued.
    #[arg(long, value_delimiter = ',', value_name = "POLICY",
          default_values_t = [Submit(SubmitPolicy::Batch), Submit(SubmitPolicy::Eager)])]
    submit: Vec<Submit>,
    /// Spin time of the adaptive policy (I/O runs and the idle measurement).
    #[arg(long, value_name = "US", default_value_t = 50)]
    poll_us: u64,
    /// Give the reactor's ring a kernel submission-polling thread (IORING_SETUP_SQPOLL).
    #[arg(long)]
    sqpoll: bool,
    /// Idle timeout of the SQPOLL thread.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    sqpoll_idle_ms: u32,
    /// Pin the reactor to this core (fio gets --cpus_allowed=CORE). Default: unpinned.
    #[arg(long, value_name = "CORE")]
    core: Option<usize>,
    /// Seconds to measure the idle adaptive reactor; 0 skips it.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    idle_secs: u64,
    /// CI mode: 64 MiB file, 1 s runs, 1 round, 1 s idle (overrides those flags).
    #[arg(long)]
    smoke: bool,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// fio binary to run.
    #[arg(long, value_name = "PATH", default_value = "fio")]
    fio: PathBuf,
    /// Extra argument appended to fio's command line (repeatable), e.g.
    /// --fio-arg=--fixedbufs --fio-arg=--registerfiles.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    fio_arg: Vec<String>,
}

impl Cli {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.size = SMOKE_SIZE_BYTES;
            self.runtime_secs = 1;
            self.rounds = 1;
            self.idle_secs = 1;
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(BenchError::Args(m.to_string()));
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return bad("--rounds must be within 1..=100");
        }
        if !(1..=MAX_RUNTIME_SECS).contains(&self.runtime_secs)
            || self.ramp_secs > MAX_RUNTIME_SECS
            || self.idle_secs > MAX_RUNTIME_SECS
        {
            return bad(
                "--runtime-secs must be within 1..=3600, --ramp-secs and --idle-secs at most 3600",
            );
        }
        if self.submit.is_empty() {
            return bad("--submit needs at least one policy");
        }
        if (1..self.submit.len()).any(|i| self.submit[..i].contains(&self.submit[i])) {
            return bad("--submit lists a policy twice");
        }
        if !(1..=MAX_IODEPTH).contains(&self.iodepth) {
            return bad("--iodepth must be within 1..=4096");
        }
        if !(BLOCK_BYTES..=MAX_SIZE_BYTES).contains(&self.size) {
            return bad("--size must be within 4KiB..=1TiB");
        }
        Ok(())
    }

    fn ramp(&self) -> Duration {
        Duration::from_secs(self.ramp_secs)
    }

    fn runtime(&self) -> Duration {
        Duration::from_secs(self.runtime_secs)
    }
}

/// `1073741824`, `1G`, `1GiB`, `64M`, `64MiB`, `4k`.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    let shift = match unit
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size overflows: {s:?}"))
}

// ----- the data file -----------------------------------------------------------------

/// Returns the path of a fully written data file of at least one block.
fn prepare_file(cli: &Cli) -> Result<PathBuf> {
    let path = match &cli.file {
        Some(p) => p.clone(),
        None => cli
            .dir
            .join(format!("reactor-bench-{}.img", size_label(cli.size))),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    warn_if_tmpfs(dir);
    if let Ok(meta) = std::fs::metadata(&path) {
        let allocated_bytes = meta.blocks() * 512;
        let written = allocated_bytes >= meta.len();
        if cli.file.is_some() {
            if meta.len() < BLOCK_BYTES {
                return Err(BenchError::Args(format!(
                    "{} is smaller than one 4 KiB block",
                    path.display()
                )));
            }
            if !written {
                eprintln!(
                    "warning: {} is sparse ({} of {} bytes allocated): reads of holes do not reach the disk",
                    path.display(),
                    allocated_bytes,
                    meta.len()
                );
            }
            return Ok(path);
        }
        if meta.len() == cli.size && written {
            return Ok(path);
        }
    }
    fill_file(&path, cli.size)?;
    Ok(path)
}

fn size_label(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{}GiB", bytes >> 30)
    } else if bytes % MIB == 0 {
        format!("{}MiB", bytes / MIB)
    } else {
        format!("{bytes}B")
    }
}

/// Writes `size` bytes of pseudo-random data (never a hole, never zero pages that a
/// thin-provisioned or deduplicating backend could skip) and syncs them.
fn fill_file(path: &Path, size: u64) -> Result<()> {
    eprintln!(
        "writing {} ({} MiB) ...",
        path.display(),
        size.div_ceil(MIB)
    );
    let ctx = || format!("write {}", path.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(ctx()))?;
    let mut chunk = vec![0u8; FILL_CHUNK_BYTES];
    let mut rng = XorShift::new(0x5EED_F11E);
    let mut left = size;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        let n = left.min(FILL_CHUNK_BYTES as u64) as usize;
        f.write_all(&chunk[..n]).map_err(io_err(ctx()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(io_err(ctx()))
}

fn warn_if_tmpfs(dir: &Path) {
    if let Ok(st) = nix::sys::statfs::statfs(dir) {
        if st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
            eprintln!(
                "warning: {} is on tmpfs: this measures memory, not a disk",
                dir.display()
            );
        }
    }
}

/// xorshift64*: cheap, and good enough to spread reads over the file.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.max(1))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (multiply-shift, no modulo bias worth the name).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

// ----- results -------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    iops: f64,
    ios: u64,
    window_secs: f64,
    lat_mean_us: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    lat_p999_us: f64,
    /// CPU time of the thread doing the I/O (fio's job, the reactor) over the window,
    /// in percent of one core.
    cpu_pct: f64,
    /// CPU time the hypervisor stole from this VM during the whole run (ramp
    /// included), in percent of all CPUs: a run with much steal is not comparable.
    steal_pct: f64,
    /// ringblk only: loop statistics over the measured window.
    #[serde(skip_serializing_if = "Option::is_none")]
    reactor: Option<LoopStats>,
}

#[derive(Clone, Copy, Debug, Serialize)]
struct LoopStats {
    busy_ticks: u64,
    idle_ticks: u64,
    sleeps: u64,
    /// Submitting `io_uring_enter` calls per completed read.
    enters_per_io: f64,
    fixed_buffers: bool,
}

/// One ringblk run of a round, with the submit policy it used.
#[derive(Debug, Serialize)]
struct PolicyRun {
    submit: Submit,
    /// Position in the round's run order (0 = first).
    order: usize,
    result: RunResult,
}

#[derive(Debug, Serialize)]
struct Round {
    fio_first: bool,
    fio: RunResult,
    ringblk: Vec<PolicyRun>,
}

/// Medians over the rounds for one submit policy.
#[derive(Debug, Serialize)]
struct PolicySummary {
    submit: Submit,
    median_iops: f64,
    /// Median IOPS over fio's median IOPS.
    ratio: f64,
    median_p99_us: f64,
    median_cpu_pct: f64,
    /// Rounds in which neither this run nor fio's saw more than
    /// [`CLEAN_STEAL_PCT`] steal.
    clean_rounds: usize,
    /// Median over those rounds of IOPS / the same round's fio IOPS; `None` without any.
    clean_round_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct IdleResult {
    policy: String,
    submit: Submit,
    window_secs: f64,
    thread_cpu_secs: f64,
    thread_cpu_pct: f64,
    process_cpu_pct: f64,
    busy_ticks: u64,
    idle_ticks: u64,
    sleeps: u64,
    messages: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    file: String,
    file_bytes: u64,
    block_bytes: u64,
    iodepth: u32,
    runtime_secs: u64,
    ramp_secs: u64,
    poll: Poll,
    poll_us: u64,
    sqpoll: bool,
    core: Option<usize>,
    fio_version: String,
    fio_command: Vec<String>,
    rounds: Vec<Round>,
    fio_median_iops: f64,
    fio_median_p99_us: f64,
    fio_median_cpu_pct: f64,
    /// One per --submit policy, in the order given.
    ringblk: Vec<PolicySummary>,
    idle: Vec<IdleResult>,
}

// ----- fio ---------------------------------------------------------------------------------

fn fio_args(cli: &Cli, path: &Path) -> Vec<String> {
    let mut args = vec![
        "--name=randread".to_string(),
        format!("--filename={}", path.display()),
        "--ioengine=io_uring".to_string(),
        "--direct=1".to_string(),
        "--rw=randread".to_string(),
        "--bs=4k".to_string(),
        format!("--iodepth={}", cli.iodepth),
        "--numjobs=1".to_string(),
        "--time_based".to_string(),
        format!("--runtime={}", cli.runtime_secs),
        format!("--ramp_time={}", cli.ramp_secs),
        // Total (submission to completion) latency percentiles, like ringblk's.
        "--lat_percentiles=1".to_string(),
        "--percentile_list=50:99:99.9".to_string(),
        "--output-format=json".to_string(),
    ];
    if let Some(core) = cli.core {
        args.push(format!("--cpus_allowed={core}"));
    }
    args.extend(cli.fio_arg.iter().cloned());
    args
}

fn fio_command(cli: &Cli) -> Command {
    Command::new(&cli.fio)
}

fn spawn_err(cli: &Cli) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |e| match e.kind() {
        std::io::ErrorKind::NotFound => BenchError::FioMissing(cli.fio.display().to_string()),
        _ => BenchError::Io {
            context: format!("run {}", cli.fio.display()),
            source: e,
        },
    }
}

fn fio_version(cli: &Cli) -> Result<String> {
    let out = fio_command(cli)
        .arg("--version")
        .output()
        .map_err(spawn_err(cli))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run_fio(cli: &Cli, path: &Path) -> Result<RunResult> {
    let out = fio_command(cli)
        .args(fio_args(cli, path))
        .output()
        .map_err(spawn_err(cli))?;
    if !out.status.success() {
        return Err(BenchError::Fio(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_fio_json(&out.stdout, cli.runtime_secs)
}

/// Reads IOPS, latency percentiles and CPU of job 0 from fio's JSON output.
fn parse_fio_json(stdout: &[u8], runtime_secs: u64) -> Result<RunResult> {
    let text = String::from_utf8_lossy(stdout);
    // fio may print notes before the document.
    let start = text
        .find('{')
        .ok_or_else(|| BenchError::Fio("no JSON in fio's output".into()))?;
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .map_err(|e| BenchError::Fio(format!("bad JSON: {e}")))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(BenchError::Fio(format!("job error {}", job["error"])));
    }
    let read = &job["read"];
    // `lat_ns` has percentiles only with --lat_percentiles=1; fall back to clat.
    let lat = if read["lat_ns"]["percentile"].is_object() {
        &read["lat_ns"]
    } else {
        &read["clat_ns"]
    };
    let field = |v: &serde_json::Value, name: &str| {
        v.as_f64()
            .ok_or_else(|| BenchError::Fio(format!("fio JSON lacks {name}")))
    };
    let pct = |k: &str| field(&lat["percentile"][k], k).map(|ns| ns / 1000.0);
    let window_secs = read["runtime"].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(RunResult {
        iops: field(&read["iops"], "read.iops")?,
        ios: read["total_ios"].as_u64().unwrap_or(0),
        window_secs: if window_secs > 0.0 {
            window_secs
        } else {
            runtime_secs as f64
        },
        lat_mean_us: field(&lat["mean"], "lat mean")? / 1000.0,
        lat_p50_us: pct("50.000000")?,
        lat_p99_us: pct("99.000000")?,
        lat_p999_us: pct("99.900000")?,
        cpu_pct: job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0),
        steal_pct: 0.0,
        reactor: None,
    })
}

// ----- ringblk -----------------------------------------------------------------------------

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

/// CPU time of the whole process (every thread, live or joined).
fn process_cpu() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: all-zero is a valid `rusage` (plain integers).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage; `who` is RUSAGE_THREAD or RUSAGE_SELF,
    // for which getrusage cannot fail.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    debug_assert_eq!(rc, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A reading on the reactor thread: when, its CPU time, its loop counters.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    cpu: Duration,
    stats: ReactorStatsSnapshot,
}

impl Sample {
    /// Must run on the reactor's own thread (thread CPU time).
    fn take(r: &Reactor, at: Instant) -> Sample {
        Sample {
            at,
            cpu: thread_cpu(),
            stats: r.handle().stats(),
        }
    }
}

/// Parameters a load needs on the reactor thread.
#[derive(Clone, Copy)]
struct LoadParams {
    iodepth: u32,
    ramp: Duration,
    runtime: Duration,
    seed: u64,
}

type RunReply = std::result::Result<RunResult, String>;

/// State of one QD-N random-read run, owned by the reactor thread.
struct Load {
    file: Option<File>,
    fref: FileRef,
    blocks: u64,
    rng: XorShift,
    ramp_end: Instant,
    end: Instant,
    in_flight: u32,
    hist: Histogram<u64>,
    ios: u64,
    window_start: Option<Sample>,
    window_end: Option<Sample>,
    first_error: Option<String>,
    fixed_buffers: bool,
    reply: Option<mpsc::Sender<RunReply>>,
}

impl Load {
    fn next_offset(&mut self) -> u64 {
        self.rng.below(self.blocks) * BLOCK_BYTES
    }

    fn note_error(&mut self, what: String) {
        self.first_error.get_or_insert(what);
    }

    /// Opens and closes the window at the first completion past each boundary, and
    /// records the completions in between.
    fn account(&mut self, r: &Reactor, started: Instant, now: Instant) {
        if self.window_start.is_none() {
            if now >= self.ramp_end {
                self.window_start = Some(Sample::take(r, now));
            }
            return;
        }
        if self.window_end.is_some() {
            return;
        }
        if now >= self.end {
            self.window_end = Some(Sample::take(r, now));
            return;
        }
        let latency_ns = now.saturating_duration_since(started).as_nanos();
        self.hist
            .saturating_record(latency_ns.min(u64::MAX as u128) as u64);
        self.ios += 1;
    }

    fn result(&self) -> RunReply {
        if let Some(e) = &self.first_error {
            return Err(e.clone());
        }
        let (Some(a), Some(b)) = (self.window_start, self.window_end) else {
            return Err("no completion inside the measured window".into());
        };
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let us = |q: f64| self.hist.value_at_quantile(q) as f64 / 1000.0;
        Ok(RunResult {
            iops: self.ios as f64 / secs,
            ios: self.ios,
            window_secs: secs,
            lat_mean_us: self.hist.mean() / 1000.0,
            lat_p50_us: us(0.50),
            lat_p99_us: us(0.99),
            lat_p999_us: us(0.999),
            cpu_pct: b.cpu.saturating_sub(a.cpu).as_secs_f64() / secs * 100.0,
            steal_pct: 0.0,
            reactor: Some(LoopStats {
                busy_ticks: b.stats.busy_ticks - a.stats.busy_ticks,
                idle_ticks: b.stats.idle_ticks - a.stats.idle_ticks,
                sleeps: b.stats.sleeps - a.stats.sleeps,
                enters_per_io: (b.stats.submit_enters - a.stats.submit_enters) as f64
                    / self.ios.max(1) as f64,
                fixed_buffers: self.fixed_buffers,
            }),
        })
    }
}

/// Runs on the reactor: registers the file and puts `iodepth` reads in flight.
fn start_load(r: &mut Reactor, file: File, p: LoadParams, reply: mpsc::Sender<RunReply>) {
    let fail = |msg: String| {
        let _ = reply.send(Err(msg));
    };
    let blocks = match file.metadata() {
        Ok(m) => m.len() / BLOCK_BYTES,
        Err(e) => return fail(format!("stat data file: {e}")),
    };
    let hist = match Histogram::new_with_bounds(1, LATENCY_NS_MAX, 3) {
        Ok(h) => h,
        Err(e) => return fail(format!("histogram: {e:?}")),
    };
    let fref = match r.register_file(file.as_raw_fd()) {
        Ok(f) => f,
        Err(e) => return fail(format!("register fixed file: {e}")),
    };
    let now = Instant::now();
    let load = Rc::new(RefCell::new(Load {
        file: Some(file),
        fref,
        blocks,
        rng: XorShift::new(p.seed),
        ramp_end: now + p.ramp,
        end: now + p.ramp + p.runtime,
        in_flight: 0,
        hist,
        ios: 0,
        window_start: None,
        window_end: None,
        first_error: None,
        fixed_buffers: r.buffers().is_registered(),
        reply: Some(reply),
    }));
    for _ in 0..p.iodepth {
        let Some(buf) = r.get_buffer() else {
            load.borrow_mut()
                .note_error("buffer pool smaller than the queue depth".into());
            break;
        };
        submit_read(r, &load, buf.into());
    }
    finish_if_drained(r, &load);
}

fn submit_read(r: &mut Reactor, load: &Rc<RefCell<Load>>, buf: IoBuf) {
    let (fref, offset) = {
        let mut l = load.borrow_mut();
        l.in_flight += 1;
        (l.fref, l.next_offset())
    };
    let l2 = load.clone();
    let started = Instant::now();
    let op = Op::read(fref, offset, buf, BLOCK_BYTES as u32);
    if r.submit(op, move |r, c| on_read(r, &l2, started, c))
        .is_err()
    {
        // Slab full: cannot happen with iodepth <= max_in_flight, but if it does the
        // run is invalid rather than silently shallower.
        let mut l = load.borrow_mut();
        l.in_flight -= 1;
        l.note_error("reactor slab full".into());
    }
}

fn on_read(r: &mut Reactor, load: &Rc<RefCell<Load>>, started: Instant, c: Completion) {
    let now = Instant::now();
    let again = {
        let mut l = load.borrow_mut();
        debug_assert!(l.in_flight > 0);
        l.in_flight -= 1;
        if c.result != BLOCK_BYTES as i32 {
            let what = match c.bytes() {
                Ok(n) => format!("short read: {n} bytes"),
                Err(errno) => format!("read failed: {}", std::io::Error::from_raw_os_error(errno)),
            };
            l.note_error(what);
        }
        l.account(r, started, now);
        l.first_error.is_none() && now < l.end
    };
    match c.op.into_buf() {
        Some(buf) if again => submit_read(r, load, buf),
        _ => finish_if_drained(r, load),
    }
}

/// Once the last read is back: unregisters and closes the file and sends the result.
fn finish_if_drained(r: &mut Reactor, load: &Rc<RefCell<Load>>) {
    let mut l = load.borrow_mut();
    if l.in_flight > 0 {
        return;
    }
    let Some(reply) = l.reply.take() else { return };
    if let Err(e) = r.unregister_file(l.fref) {
        l.note_error(format!("unregister fixed file: {e}"));
    }
    drop(l.file.take());
    let _ = reply.send(l.result());
}

fn reactor_config(cli: &Cli, idle: IdlePolicy, submit: Submit) -> ReactorConfig {
    ReactorConfig {
        cores: vec![cli.core],
        idle,
        submit: submit.policy(),
        sqpoll_idle_ms: cli.sqpoll.then_some(cli.sqpoll_idle_ms),
        ..Default::default()
    }
}

fn run_ringblk(cli: &Cli, path: &Path, seed: u64, submit: Submit) -> Result<RunResult> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(io_err(format!("open {} O_DIRECT", path.display())))?;
    let config = ReactorConfig {
        // Exactly one 4 KiB fixed buffer per read in flight.
        buffer_count: cli.iodepth as usize,
        buffer_size: BLOCK_BYTES as usize,
        ..reactor_config(cli, cli.poll.policy(cli.poll_us), submit)
    };
    let pool = ReactorPool::start(config, Arc::new(|_: &mut Reactor| {}))?;
    let params = LoadParams {
        iodepth: cli.iodepth,
        ramp: cli.ramp(),
        runtime: cli.runtime(),
        seed,
    };
    let (tx, rx) = mpsc::channel();
    let sent =
        pool.handles()[0].send_blocking(move |r| start_load(r, file, params, tx), CONTROL_TIMEOUT);
    let reply = match sent {
        Ok(()) => rx
            .recv_timeout(cli.ramp() + cli.runtime() + HANG_GRACE)
            .map_err(|e| format!("no result from the reactor: {e}")),
        Err(e) => Err(format!("start message: {e}")),
    };
    pool.shutdown();
    reply.and_then(|r| r).map_err(BenchError::Run)
}

// ----- idle CPU ----------------------------------------------------------------------------

/// Takes a [`Sample`] on the reactor thread by message.
fn probe(h: &ReactorHandle) -> Result<Sample> {
    let (tx, rx) = mpsc::sync_channel(1);
    h.send_blocking(
        move |r| {
            let _ = tx.send(Sample::take(r, Instant::now()));
        },
        CONTROL_TIMEOUT,
    )
    .map_err(|e| BenchError::Run(format!("probe message: {e}")))?;
    rx.recv_timeout(CONTROL_TIMEOUT)
        .map_err(|e| BenchError::Run(format!("probe reply: {e}")))
}

/// One adaptive reactor with nothing to do, watched for `--idle-secs`.
fn measure_idle(cli: &Cli, submit: Submit) -> Result<IdleResult> {
    let policy = IdlePolicy::Adaptive {
        poll_us: cli.poll_us,
    };
    // The server's defaults (buffer pool and all): an idle server is what is measured.
    let pool = ReactorPool::start(
        reactor_config(cli, policy, submit),
        Arc::new(|_: &mut Reactor| {}),
    )?;
    let h = pool.handles()[0].clone();
    std::thread::sleep(IDLE_SETTLE);
    let measured = (|| {
        let a = probe(&h)?;
        let proc_a = process_cpu();
        std::thread::sleep(Duration::from_secs(cli.idle_secs));
        let b = probe(&h)?;
        let proc_b = process_cpu();
        Ok::<_, BenchError>((a, b, proc_b.saturating_sub(proc_a)))
    })();
    pool.shutdown();
    let (a, b, proc_cpu) = measured?;
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let cpu = b.cpu.saturating_sub(a.cpu).as_secs_f64();
    Ok(IdleResult {
        policy: policy.to_string(),
        submit,
        window_secs: secs,
        thread_cpu_secs: cpu,
        thread_cpu_pct: cpu / secs * 100.0,
        process_cpu_pct: proc_cpu.as_secs_f64() / secs * 100.0,
        busy_ticks: b.stats.busy_ticks - a.stats.busy_ticks,
        idle_ticks: b.stats.idle_ticks - a.stats.idle_ticks,
        sleeps: b.stats.sleeps - a.stats.sleeps,
        messages: b.stats.messages - a.stats.messages,
    })
}

// ----- driver and output --------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Cumulative (steal, total) CPU ticks of the machine, from /proc/stat.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .take(8) // user nice system idle iowait irq softirq steal (guest is in user)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    Some((*ticks.get(7)?, ticks.iter().sum()))
}

/// Runs `f` and fills in the steal time the machine saw meanwhile.
fn with_steal(f: impl FnOnce() -> Result<RunResult>) -> Result<RunResult> {
    let before = cpu_ticks();
    let mut r = f()?;
    if let (Some((s0, t0)), Some((s1, t1))) = (before, cpu_ticks()) {
        if t1 > t0 {
            r.steal_pct = s1.saturating_sub(s0) as f64 / (t1 - t0) as f64 * 100.0;
        }
    }
    Ok(r)
}

/// One step of a round: fio, or ringblk with one submit policy.
#[derive(Clone, Copy)]
enum Side {
    Fio,
    Ringblk(Submit),
}

/// The run order of round `i`: fio then the policies in odd rounds, the reverse in
/// even ones (ABBA), so that no side always runs on a disk another just warmed.
fn round_order(i: u32, submit: &[Submit]) -> Vec<Side> {
    let mut order = vec![Side::Fio];
    order.extend(submit.iter().map(|&s| Side::Ringblk(s)));
    if i % 2 == 1 {
        order.reverse();
    }
    order
}

fn run_rounds(cli: &Cli, path: &Path) -> Result<Vec<Round>> {
    let mut rounds = Vec::with_capacity(cli.rounds as usize);
    for i in 0..cli.rounds {
        let seed = 0xB10C_0000 + u64::from(i);
        let order = round_order(i, &cli.submit);
        let mut fio = None;
        let mut ringblk = Vec::with_capacity(cli.submit.len());
        for (pos, side) in order.iter().enumerate() {
            match *side {
                Side::Fio => fio = Some(with_steal(|| run_fio(cli, path))?),
                Side::Ringblk(submit) => ringblk.push(PolicyRun {
                    submit,
                    order: pos,
                    result: with_steal(|| run_ringblk(cli, path, seed, submit))?,
                }),
            }
        }
        let Some(fio) = fio else {
            return Err(BenchError::Run("round without a fio run".into()));
        };
        // Report the policies in the order given, whatever order they ran in.
        ringblk.sort_by_key(|r| cli.submit.iter().position(|&s| s == r.submit));
        if !cli.json {
            let mut line = format!("round {}: fio {:.0} IOPS", i + 1, fio.iops);
            for r in &ringblk {
                line.push_str(&format!(", ringblk/{} {:.0} IOPS", r.submit, r.result.iops));
            }
            eprintln!("{line}");
        }
        rounds.push(Round {
            fio_first: matches!(order.first(), Some(Side::Fio)),
            fio,
            ringblk,
        });
    }
    Ok(rounds)
}

fn summarise(rounds: &[Round], submit: Submit, fio_median_iops: f64) -> PolicySummary {
    let col = |f: fn(&RunResult) -> f64| {
        median(
            rounds
                .iter()
                .flat_map(|r| r.ringblk.iter())
                .filter(|p| p.submit == submit)
                .map(|p| f(&p.result))
                .collect(),
        )
    };
    let median_iops = col(|r| r.iops);
    let clean: Vec<f64> = rounds
        .iter()
        .filter(|r| r.fio.steal_pct < CLEAN_STEAL_PCT)
        .flat_map(|r| {
            r.ringblk
                .iter()
                .filter(|p| p.submit == submit && p.result.steal_pct < CLEAN_STEAL_PCT)
                .map(|p| p.result.iops / r.fio.iops)
        })
        .collect();
    PolicySummary {
        submit,
        median_iops,
        ratio: median_iops / fio_median_iops,
        median_p99_us: col(|r| r.lat_p99_us),
        median_cpu_pct: col(|r| r.cpu_pct),
        clean_rounds: clean.len(),
        clean_round_ratio: (!clean.is_empty()).then(|| median(clean)),
    }
}

fn build_report(
    cli: &Cli,
    path: &Path,
    fio_version: String,
    rounds: Vec<Round>,
    idle: Vec<IdleResult>,
) -> Result<Report> {
    let fio_col = |f: fn(&RunResult) -> f64| median(rounds.iter().map(|r| f(&r.fio)).collect());
    let fio_median_iops = fio_col(|r| r.iops);
    let file_bytes = std::fs::metadata(path)
        .map_err(io_err(format!("stat {}", path.display())))?
        .len();
    let mut fio_command = vec![cli.fio.display().to_string()];
    fio_command.extend(fio_args(cli, path));
    let ringblk = cli
        .submit
        .iter()
        .map(|&s| summarise(&rounds, s, fio_median_iops))
        .collect();
    Ok(Report {
        file: path.display().to_string(),
        file_bytes,
        block_bytes: BLOCK_BYTES,
        iodepth: cli.iodepth,
        runtime_secs: cli.runtime_secs,
        ramp_secs: cli.ramp_secs,
        poll: cli.poll,
        poll_us: cli.poll_us,
        sqpoll: cli.sqpoll,
        core: cli.core,
        fio_version,
        fio_command,
        fio_median_iops,
        fio_median_p99_us: fio_col(|r| r.lat_p99_us),
        fio_median_cpu_pct: fio_col(|r| r.cpu_pct),
        ringblk,
        rounds,
        idle,
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn lat(r: &RunResult) -> String {
    format!(
        "{:.0}/{:.0}/{:.0}",
        r.lat_p50_us, r.lat_p99_us, r.lat_p999_us
    )
}

fn print_report(rep: &Report) {
    let policy = rep.poll.policy(rep.poll_us);
    println!(
        "4 KiB random reads, QD{}, {} s after {} s ramp, file {} ({} MiB)",
        rep.iodepth,
        rep.runtime_secs,
        rep.ramp_secs,
        rep.file,
        rep.file_bytes / MIB
    );
    println!(
        "fio:     {} ({})",
        rep.fio_command.join(" "),
        rep.fio_version
    );
    let fixed = rep
        .rounds
        .first()
        .and_then(|r| r.ringblk.first())
        .and_then(|p| p.result.reactor);
    println!(
        "ringblk: 1 reactor, core {}, poll {policy}, sqpoll {}, fixed file, fixed buffers {}",
        rep.core.map_or("any".to_string(), |c| c.to_string()),
        if rep.sqpoll { "on" } else { "off" },
        if fixed.is_some_and(|s| s.fixed_buffers) {
            "yes"
        } else {
            "NO"
        },
    );
    println!();
    print_rounds(rep);
    println!();
    print_summary(rep);
    for idle in &rep.idle {
        print_idle(idle);
    }
}

/// Column widths of the rounds table; the first three columns are left-aligned.
const COLUMNS: [usize; 12] = [5, 8, 5, 7, 6, 19, 6, 6, 6, 10, 7, 9];
const LEFT_COLUMNS: usize = 3;

fn print_row(cells: &[String]) {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(COLUMNS).enumerate() {
        let pad = width.saturating_sub(cell.chars().count());
        if i < LEFT_COLUMNS {
            line.push_str(&format!("{cell}{} ", " ".repeat(pad)));
        } else {
            line.push_str(&format!("{}{cell} ", " ".repeat(pad)));
        }
    }
    println!("{}", line.trim_end());
}

fn run_row(round: usize, side: String, order: usize, r: &RunResult, fio_iops: f64) -> Vec<String> {
    let s = r.reactor;
    vec![
        round.to_string(),
        side,
        (order + 1).to_string(),
        format!("{:.0}", r.iops),
        format!("{:.3}", r.iops / fio_iops),
        lat(r),
        format!("{:.0}", r.lat_mean_us),
        format!("{:.1}%", r.cpu_pct),
        format!("{:.1}%", r.steal_pct),
        s.map_or(String::new(), |s| s.busy_ticks.to_string()),
        s.map_or(String::new(), |s| s.sleeps.to_string()),
        s.map_or(String::new(), |s| format!("{:.2}", s.enters_per_io)),
    ]
}

fn print_rounds(rep: &Report) {
    let head = [
        "round",
        "side",
        "order",
        "IOPS",
        "ratio",
        "lat p50/p99/p99.9",
        "mean",
        "cpu",
        "steal",
        "busy ticks",
        "sleeps",
        "enters/IO",
    ];
    print_row(&head.map(String::from));
    for (i, r) in rep.rounds.iter().enumerate() {
        let fio_order = if r.fio_first { 0 } else { r.ringblk.len() };
        print_row(&run_row(i + 1, "fio".into(), fio_order, &r.fio, r.fio.iops));
        for p in &r.ringblk {
            let side = format!("rb/{}", p.submit);
            print_row(&run_row(i + 1, side, p.order, &p.result, r.fio.iops));
        }
    }
    println!(
        "(ratio: IOPS over the same round's fio; latency in us, submission to completion; \
         cpu: the I/O thread, % of one core; steal: CPU the hypervisor took from this VM \
         during the run, % of all CPUs; enters/IO: submitting io_uring_enter calls per read)"
    );
}

fn print_summary(rep: &Report) {
    println!(
        "median over {} rounds: fio {:.0} IOPS, p99 {:.0} us, cpu {:.1}%",
        rep.rounds.len(),
        rep.fio_median_iops,
        rep.fio_median_p99_us,
        rep.fio_median_cpu_pct
    );
    for p in &rep.ringblk {
        println!(
            "ratio ringblk/fio (median IOPS), submit {:<5}: {:.3}  target >= 0.95: {}  \
             ({:.0} IOPS, p99 {:.0} us, cpu {:.1}%)",
            p.submit.to_string(),
            p.ratio,
            verdict(p.ratio >= 0.95),
            p.median_iops,
            p.median_p99_us,
            p.median_cpu_pct
        );
        let clean = p
            .clean_round_ratio
            .map_or("-".to_string(), |r| format!("{r:.3}"));
        println!(
            "  rounds with steal < {CLEAN_STEAL_PCT} % on both sides: {} of {}, median of their ratios {clean}",
            p.clean_rounds,
            rep.rounds.len()
        );
    }
}

fn print_idle(idle: &IdleResult) {
    println!(
        "idle {} reactor, submit {}, over {:.1} s: thread CPU {:.4} s = {:.3} % of a core (process {:.3} %)  target < 2 %: {}",
        idle.policy,
        idle.submit,
        idle.window_secs,
        idle.thread_cpu_secs,
        idle.thread_cpu_pct,
        idle.process_cpu_pct,
        verdict(idle.thread_cpu_pct < 2.0)
    );
    println!(
        "  busy ticks {}, idle ticks {}, sleeps {}, messages {} (the start probe included)",
        idle.busy_ticks, idle.idle_ticks, idle.sleeps, idle.messages
    );
}

fn run(mut cli: Cli) -> Result<()> {
    cli.apply_smoke();
    cli.validate()?;
    // Fail on a missing fio before spending time writing the data file.
    let version = fio_version(&cli)?;
    let path = prepare_file(&cli)?;
    let rounds = run_rounds(&cli, &path)?;
    let idle = match cli.idle_secs {
        0 => Vec::new(),
        _ => cli
            .submit
            .iter()
            .map(|&s| measure_idle(&cli, s))
            .collect::<Result<_>>()?,
    };
    let report = build_report(&cli, &path, version, rounds, idle)?;
    if cli.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| BenchError::Run(format!("serialise report: {e}")))?;
        println!("{text}");
    } else {
        print_report(&report);
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reactor_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err(), "overflow is an error");
    }

    #[test]
    fn rounds_alternate_the_run_order() {
        let both = [Submit(SubmitPolicy::Batch), Submit(SubmitPolicy::Eager)];
        let names = |v: Vec<Side>| {
            v.iter()
                .map(|s| match s {
                    Side::Fio => "fio".to_string(),
                    Side::Ringblk(p) => p.to_string(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(names(round_order(0, &both)), ["fio", "batch", "eager"]);
        assert_eq!(names(round_order(1, &both)), ["eager", "batch", "fio"]);
    }

    #[test]
    fn duplicate_or_missing_submit_policies_are_rejected() {
        let parse = |args: &[&str]| {
            let mut cli = Cli::try_parse_from(args).expect("parses");
            cli.apply_smoke();
            cli.validate()
        };
        assert!(parse(&["reactor_bench"]).is_ok(), "defaults are valid");
        assert!(parse(&["reactor_bench", "--submit", "eager,every4"]).is_ok());
        assert!(parse(&["reactor_bench", "--submit", "batch,batch"]).is_err());
        assert!(Cli::try_parse_from(["reactor_bench", "--submit", "every0"]).is_err());
        assert!(Cli::try_parse_from(["reactor_bench", "--submit", "lazy"]).is_err());
    }

    #[test]
    fn clean_round_ratio_leaves_out_rounds_with_steal() {
        let run = |iops: f64, steal_pct: f64| RunResult {
            iops,
            ios: 0,
            window_secs: 1.0,
            lat_mean_us: 0.0,
            lat_p50_us: 0.0,
            lat_p99_us: 0.0,
            lat_p999_us: 0.0,
            cpu_pct: 0.0,
            steal_pct,
            reactor: None,
        };
        let eager = Submit(SubmitPolicy::Eager);
        let round = |fio: RunResult, rb: RunResult| Round {
            fio_first: true,
            fio,
            ringblk: vec![PolicyRun {
                submit: eager,
                order: 1,
                result: rb,
            }],
        };
        let rounds = [
            round(run(100.0, 0.5), run(96.0, 0.5)),
            round(run(100.0, 0.5), run(98.0, 1.0)),
            // Disturbed on one side or the other: must not count.
            round(run(100.0, 9.0), run(300.0, 0.0)),
            round(run(100.0, 0.0), run(10.0, 9.0)),
        ];
        let s = summarise(&rounds, eager, 100.0);
        assert_eq!(s.clean_rounds, 2);
        assert_eq!(s.clean_round_ratio, Some(0.97));
        let none = summarise(&rounds[2..], eager, 100.0);
        assert_eq!((none.clean_rounds, none.clean_round_ratio), (0, None));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn random_offsets_stay_inside_the_file() {
        let mut rng = XorShift::new(7);
        assert!((0..100_000).all(|_| rng.below(3) < 3));
    }

    #[test]
    fn fio_json_is_parsed_and_errors_are_reported() {
        let doc = br#"note: something
        {"jobs":[{"error":0,"usr_cpu":5.0,"sys_cpu":40.0,"read":{"iops":31000.5,
        "total_ios":31000,"runtime":1000,
        "lat_ns":{"mean":1000000.0,"percentile":{"50.000000":600000,"99.000000":3000000,"99.900000":5000000}},
        "clat_ns":{"mean":900000.0}}}]}"#;
        let r = parse_fio_json(doc, 1).expect("parses");
        assert_eq!(r.iops, 31000.5);
        assert_eq!(r.lat_p99_us, 3000.0);
        assert_eq!(r.cpu_pct, 45.0);
        // Negative control: a failed job must not be read as figures.
        let bad = br#"{"jobs":[{"error":5,"read":{}}]}"#;
        assert!(parse_fio_json(bad, 1).is_err());
    }

    #[test]
    fn help_documents_the_targets_and_smoke_mode() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "0.95", "2 %", "--smoke", "--rounds", "--poll", "--sqpoll", "--file", "--submit",
            "eager",
        ] {
            assert!(help.contains(needle), "--help lacks {needle}");
        }
    }
}
