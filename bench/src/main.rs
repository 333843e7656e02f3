//! `ringblk-bench`: a load generator for NBD servers (on the ringblk reactor) and
//! vhost-user-blk back ends (through libblkio), with HdrHistogram latency reports
//! (table, JSON, `.hgrm`) and percentile-spectrum SVG plots. See `ringblk-bench --help`.
//!
//! Layout: `uri` (NBD URIs), `connect` (blocking handshake with
//! `ringblk_nbd::client`, the sans-IO client codec), `workload` (phases and address
//! generators), `pattern` (verify blocks), `stream` (one request stream: what to
//! issue, what a completion counts for — shared by both transports), `engine` (the
//! NBD transport: the reactor transmission loop), `vhost` (the vhost-user-blk
//! transport: blkio queues, one thread each, and the single requests of `io`),
//! `report` (table and JSON), `hgrm` (write and parse `.hgrm`), `plot` (SVG).
//!
//! Exit status: 0 success; 1 the run completed with I/O errors, verify errors or
//! failed connections; 2 the run could not start (arguments, connect, handshake).

mod connect;
mod engine;
mod pattern;
mod report;
mod stream;
mod uri;
mod vhost;
mod workload;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringblk_bench::{hgrm, plot};
use ringblk_reactor::IdlePolicy;

use crate::report::{PhaseReport, RunReport};
use crate::stream::{EngineOpts, OpStats, PhaseResult};
use crate::workload::{Mode, Phase, Workload};

#[derive(Parser)]
#[command(
    name = "ringblk-bench",
    version,
    about = "NBD and vhost-user-blk load generator with HdrHistogram latency reports and plots",
    long_about = "ringblk-bench drives any NBD server (ringblk, qemu-nbd, nbdkit, nbd-server) \
from ringblk's io_uring reactor, and any vhost-user-blk back end (ringblk --vhost, \
qemu-storage-daemon) through libblkio's virtio-blk-vhost-user driver: fio-style workloads \
over several connections or virtqueues, the latency of every operation in HdrHistogram, a \
table or JSON, .hgrm files and SVG percentile plots, and a verify mode that writes \
self-describing blocks and checks them on read-back.",
    after_help = "EXAMPLES:
  ringblk-bench run nbd://127.0.0.1:10809/vol0 --rw randread --bs 4k --iodepth 32 --runtime 10
  ringblk-bench run nbd://127.0.0.1/vol0 --rw randrw --rwmix-read 70 --connections 4 --reactors 2
  ringblk-bench run 'nbd+unix:///vol0?socket=/run/ringblk.sock' --rw write --bs 128k --size 1G
  ringblk-bench run nbd://127.0.0.1/vol0 --verify --range 64M --iodepth 16 --connections 2
  ringblk-bench run nbd://127.0.0.1/vol0 --iodepth 8 --hgrm qd8.hgrm --json > qd8.json
  ringblk-bench run --vhost /run/vol0.vhost --queues 2 --iodepth 32 --poll busy
  ringblk-bench io --vhost /run/vol0.vhost discard:0:1M zero:0:1M flush
  ringblk-bench plot --svg latency.svg ringblk=qd8.hgrm qemu-nbd=qemu.hgrm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per process: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run a workload against an NBD export.
    #[command(after_help = "EXAMPLES:
  4 KiB random reads at queue depth 32 for 10 s, after a 2 s ramp:
    ringblk-bench run nbd://127.0.0.1:10809/vol0 --iodepth 32 --runtime 10 --ramp 2
  70/30 random read/write over the first 1 GiB, 2 connections, capped at 20k IOPS:
    ringblk-bench run nbd://127.0.0.1/vol0 --rw randrw --rwmix-read 70 --range 1G \\
        --connections 2 --rate-iops 20000
  Write 512 MiB sequentially in 1 MiB requests, then stop:
    ringblk-bench run nbd://127.0.0.1/vol0 --rw write --bs 1M --iodepth 4 --size 512M
  Verify: write every 4 KiB block of 64 MiB, flush, read all back through other
  connections and check each block (exit status 1 on any mismatch):
    ringblk-bench run nbd://127.0.0.1/vol0 --verify --range 64M --connections 2
  Verify in two steps (e.g. across a server restart or a backup switchover):
    ringblk-bench run URI --verify --verify-phases write --verify-seed 7 --range 64M
    ringblk-bench run URI --verify --verify-phases read  --verify-seed 7 --range 64M

SIZES take k, m, g, t suffixes (powers of 1024: 4k = 4096). DURATIONS are seconds,
or take ms, s, m suffixes.

OUTPUT: a table per phase (IOPS; MB/s = 10^6 bytes/s; latency percentiles in µs from
the moment a request is queued — or scheduled, under --rate-iops — to its reply).
--json prints the same numbers as JSON on stdout. --hgrm writes the latency of all
recorded operations as HdrHistogram percentile text (values in µs); --svg plots it.
A progress line is shown on stderr when it is a terminal.")]
    Run(RunArgs),
    /// Run single requests on a vhost-user-blk device and check what they return.
    #[command(after_help = "EXAMPLES:
  Write a pattern through queue 0, read it back through queue 1:
    ringblk-bench io --vhost /run/v.sock --queues 2 write:0:1M:7
    ringblk-bench io --vhost /run/v.sock --queues 2 --queue 1 verify:0:1M:7
  Discard a range and check that it reads back as zeros:
    ringblk-bench io --vhost /run/v.sock discard:64k:128k zero:64k:128k flush
  A backup export (read-only: open it with --read-only):
    ringblk-bench io --vhost /run/v-snap.sock --read-only verify:0:1M:7 --json

OPS run in order, one request at a time, on one queue; the first failure ends the
run (exit status 1):
  write:OFF:LEN[:SEED]     the verify pattern of every 4 KiB block (seed default 1)
  verify:OFF:LEN[:SEED]    read back and check that pattern, block by block
  zero:OFF:LEN             read back and check that every byte is zero
  read:OFF:LEN             read; check only that it succeeds
  discard:OFF:LEN          VIRTIO_BLK_T_DISCARD
  write-zeroes:OFF:LEN     VIRTIO_BLK_T_WRITE_ZEROES with the unmap flag
  write-zeroes-keep:OFF:LEN   ... without it (BLKIO_REQ_NO_UNMAP)
  flush                    VIRTIO_BLK_T_FLUSH
Requests longer than 64 KiB (or the device's discard/write-zeroes limit) are split.
--json prints the device's configuration and each op's result.")]
    Io(IoArgs),
    /// Plot .hgrm files as latency percentile spectra in one SVG.
    #[command(after_help = "EXAMPLES:
  ringblk-bench plot --svg out.svg a.hgrm b.hgrm
  ringblk-bench plot --svg out.svg --title '4k randread QD32' ringblk=r.hgrm qemu-nbd=q.hgrm

Each FILE is PATH or LABEL=PATH; the label (default: the file name without .hgrm)
names the curve in the legend. The x axis is the percentile on a log scale of
1/(1-p) (90%, 99%, 99.9%, ... evenly spaced), the y axis the latency in µs.")]
    Plot(PlotArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Poll {
    /// Spin forever: lowest latency, one core per reactor at 100 %.
    Busy,
    /// Spin --poll-us after the last work, then sleep until a completion.
    Adaptive,
    /// Sleep in the kernel whenever there is nothing to do.
    Interrupt,
}

#[derive(Args)]
struct RunArgs {
    /// nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (or --vhost)
    #[arg(required_unless_present = "vhost", conflicts_with = "vhost")]
    uri: Option<String>,
    /// Drive a vhost-user-blk back end at this Unix socket (libblkio's
    /// virtio-blk-vhost-user driver) instead of an NBD server.
    #[arg(long, value_name = "SOCKET")]
    vhost: Option<PathBuf>,
    /// Virtqueues (--vhost), one thread each; requests in flight are per queue.
    #[arg(long, value_name = "N", default_value_t = 1, requires = "vhost", value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,
    /// Virtqueue size (--vhost) [default: 3 descriptors per request in flight, at
    /// least 256].
    #[arg(long, value_name = "N", requires = "vhost", value_parser = parse_queue_size)]
    queue_size: Option<u32>,
    /// Workload.
    #[arg(long, value_enum, default_value = "randread")]
    rw: Workload,
    /// Percentage of reads in randrw and rw.
    #[arg(long, value_name = "PCT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    rwmix_read: u32,
    /// Request size.
    #[arg(long, value_name = "SIZE", default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per connection (per queue with --vhost).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    iodepth: u32,
    /// NBD connections (each its own socket, spread over the reactors).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    connections: u64,
    /// Reactor threads the connections are spread over.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    reactors: u64,
    /// Measured run time, after the ramp [default: 10 s unless --size is given].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    runtime: Option<Duration>,
    /// Stop after issuing this many bytes in total (with --runtime: whichever first).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,
    /// Warm-up time whose completions are not recorded.
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_duration)]
    ramp: Duration,
    /// Total request rate limit over all connections (open loop).
    #[arg(long, value_name = "N")]
    rate_iops: Option<u64>,
    /// Start of the region to use.
    #[arg(long, value_name = "SIZE", default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Length of the region [default: from --offset to the end of the export].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    range: Option<u64>,
    /// Write every block of the region with a self-describing pattern, flush, then
    /// read every block back (through other connections) and check it.
    #[arg(long)]
    verify: bool,
    /// Verify phases to run: write, read or write,read.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "write,read",
        value_delimiter = ','
    )]
    verify_phases: Vec<VerifyPhase>,
    /// Seed stamped into verify blocks; a read phase must use the write phase's seed.
    #[arg(long, value_name = "N", default_value_t = 1)]
    verify_seed: u64,
    /// Seed of the offset and read/write choices.
    #[arg(long, value_name = "N", default_value_t = 1)]
    seed: u64,
    /// Reactor idle policy; with --vhost, how each queue's thread waits for
    /// completions (busy: blkio do_io polling with no syscall; interrupt: sleeping on
    /// the queue's call eventfd).
    #[arg(long, value_enum, default_value = "adaptive")]
    poll: Poll,
    /// Spin time of an adaptive reactor (or --vhost queue) before it sleeps.
    #[arg(long, value_name = "US", default_value_t = 50)]
    poll_us: u64,
    /// Connect and handshake timeout.
    #[arg(long, value_name = "DURATION", default_value = "10", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Write the latency histogram of all recorded operations as .hgrm text.
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,
    /// Draw the latency percentile spectrum of this run as SVG.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Name of this run in plots [default: the workload].
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// No progress line, even on a terminal.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct IoArgs {
    /// The vhost-user-blk back end's Unix socket.
    #[arg(long, value_name = "SOCKET")]
    vhost: PathBuf,
    /// Virtqueues to start.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: u32,
    /// The queue the ops run on (0-based).
    #[arg(long, value_name = "N", default_value_t = 0)]
    queue: u32,
    /// Open the device read-only (required for a read-only device such as a backup
    /// export; libblkio then fails writes itself, without sending them).
    #[arg(long)]
    read_only: bool,
    /// Print the device's configuration and each op's result as JSON.
    #[arg(long)]
    json: bool,
    /// The ops, in order (see below).
    #[arg(value_name = "OP", required = true, value_parser = parse_io_op)]
    ops: Vec<vhost::IoOp>,
}

fn parse_io_op(s: &str) -> Result<vhost::IoOp, String> {
    vhost::IoOp::parse(s, parse_size)
}

fn parse_queue_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("bad queue size {s:?}"))?;
    if !n.is_power_of_two() || n > vhost::QUEUE_SIZE_MAX {
        return Err(format!(
            "the queue size must be a power of two up to {}",
            vhost::QUEUE_SIZE_MAX
        ));
    }
    Ok(n)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum VerifyPhase {
    Write,
    Read,
}

#[derive(Args)]
struct PlotArgs {
    /// Output SVG file.
    #[arg(long, value_name = "FILE")]
    svg: PathBuf,
    /// Plot title.
    #[arg(long, default_value = "Latency by percentile")]
    title: String,
    /// .hgrm files, as PATH or LABEL=PATH.
    #[arg(value_name = "FILE", required = true)]
    files: Vec<String>,
}

/// `4096`, `4k`, `128K`, `1m`, `1MiB`, `2G`, `1t`: powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("bad size unit in {s:?} (k, m, g, t)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// `10`, `2.5`, `500ms`, `30s`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(v) = t.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = t.strip_suffix('m') {
        (v, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    if !(0.0..=1e7).contains(&v) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Run(a) => run(a),
        Command::Io(a) => io_cmd(a),
        Command::Plot(a) => plot_cmd(a).map(|()| true),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ringblk-bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn idle_policy(a: &RunArgs) -> IdlePolicy {
    match a.poll {
        Poll::Busy => IdlePolicy::Busy,
        Poll::Adaptive => IdlePolicy::Adaptive { poll_us: a.poll_us },
        Poll::Interrupt => IdlePolicy::Interrupt,
    }
}

/// Builds the phases of a run from the arguments and what the export allows.
fn phases(a: &RunArgs, target: &TargetCaps, region_blocks: u64) -> Result<Vec<Phase>, String> {
    let bs = a.bs as u32;
    if writes(a) && target.read_only {
        return Err("the export is read-only; this workload writes".into());
    }
    let base = Phase {
        name: "run".into(),
        random: a.rw.random(),
        read_pct: a.rw.read_pct(a.rwmix_read),
        bs,
        iodepth: a.iodepth,
        region_offset: a.offset,
        region_blocks,
        connections: target.streams,
        mode: Mode::Timed {
            ramp: a.ramp,
            runtime: match (a.runtime, a.size) {
                (None, None) => Some(Duration::from_secs(10)),
                (r, _) => r,
            },
            bytes_total: a.size,
        },
        rate_iops: a.rate_iops,
        seed: a.seed,
        verify_seed: None,
        flush_at_end: false,
    };
    if !a.verify {
        return Ok(vec![base]);
    }
    if (bs as usize) < pattern::VERIFY_BLOCK_MIN {
        return Err(format!(
            "--verify needs --bs of at least {} bytes",
            pattern::VERIFY_BLOCK_MIN
        ));
    }
    let mut out = Vec::new();
    for p in &a.verify_phases {
        let (name, read_pct, rotate) = match p {
            VerifyPhase::Write => ("verify-write", 0, 0),
            // Read every block through another connection than the one that wrote it.
            VerifyPhase::Read => ("verify-read", 100, 1),
        };
        out.push(Phase {
            name: name.into(),
            read_pct,
            mode: Mode::Pass { rotate },
            verify_seed: Some(a.verify_seed),
            flush_at_end: read_pct == 0 && target.can_flush,
            ..base.clone()
        });
    }
    Ok(out)
}

/// Whether the run writes anything.
fn writes(a: &RunArgs) -> bool {
    if a.verify {
        a.verify_phases.contains(&VerifyPhase::Write)
    } else {
        a.rw.read_pct(a.rwmix_read) < 100
    }
}

/// What the phases need to know of the target, whichever the transport.
struct TargetCaps {
    read_only: bool,
    can_flush: bool,
    /// Connections (NBD) or queues (vhost).
    streams: usize,
}

/// The run's size checks: the region in bytes, whole blocks of `--bs`.
fn region_bytes(a: &RunArgs, size_bytes: u64) -> Result<u64, String> {
    let range = match a.range {
        Some(r) => r,
        None => size_bytes.checked_sub(a.offset).ok_or_else(|| {
            format!(
                "--offset {} is past the end ({} bytes)",
                a.offset, size_bytes
            )
        })?,
    };
    Ok(range - range % a.bs)
}

fn run(a: RunArgs) -> Result<bool, String> {
    if a.bs == 0 || a.bs > u64::from(ringblk_nbd::proto::PAYLOAD_DEFAULT_MAX_BYTES) {
        return Err(format!(
            "--bs must be within 1..={} bytes",
            ringblk_nbd::proto::PAYLOAD_DEFAULT_MAX_BYTES
        ));
    }
    if a.vhost.is_none() && (a.queues != 1 || a.queue_size.is_some()) {
        return Err("--queues and --queue-size go with --vhost (NBD: --connections)".into());
    }
    let results = match (&a.uri, &a.vhost) {
        (_, Some(path)) => run_vhost(&a, path)?,
        (Some(u), None) => run_nbd(&a, u)?,
        (None, None) => return Err("give an NBD URI or --vhost SOCKET".into()),
    };
    report_run(&a, results)
}

/// The phases' results and what the report says of the target.
struct Ran {
    results: Vec<PhaseResult>,
    target: String,
    transport: &'static str,
    size_bytes: u64,
    region_bytes: u64,
    threads: usize,
}

fn engine_opts(a: &RunArgs, threads: usize) -> EngineOpts {
    EngineOpts {
        reactors: threads,
        idle: idle_policy(a),
        stall_timeout: Duration::from_secs(60),
    }
}

fn run_vhost(a: &RunArgs, path: &std::path::Path) -> Result<Ran, String> {
    let path_str = path
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", path.display()))?
        .to_string();
    let mut dev = vhost::Device::open(&vhost::DeviceOpts {
        path: path_str.clone(),
        queues: a.queues,
        queue_size: a.queue_size,
        // A read-only device starts only for a read-only client (see `vhost`).
        read_only: !writes(a),
        depth: a.iodepth,
        bs: a.bs as u32,
    })?;
    let size = dev.info.capacity_bytes;
    let range = region_bytes(a, size)?;
    let end = a
        .offset
        .checked_add(range)
        .ok_or("--offset + --range overflows")?;
    let align = dev.info.request_alignment.max(1) as u64;
    if end > size || a.offset % align != 0 || a.bs % align != 0 {
        return Err(format!(
            "the region [{}, {end}) with --bs {} does not fit the device ({size} bytes, \
             requests aligned to {align})",
            a.offset, a.bs
        ));
    }
    let caps = TargetCaps {
        read_only: dev.info.read_only,
        can_flush: true,
        streams: a.queues as usize,
    };
    let opts = engine_opts(a, a.queues as usize);
    let mut results = Vec::new();
    for phase in phases(a, &caps, range / a.bs)? {
        let phase = Arc::new(phase);
        let mut line = ProgressLine::new(!a.quiet && std::io::stderr().is_terminal(), &phase);
        let r = vhost::run_phase(
            &mut dev,
            phase,
            opts,
            Duration::from_millis(250),
            |p, t0| line.tick(p, t0),
        );
        line.clear();
        results.push(r?);
    }
    Ok(Ran {
        results,
        target: format!("vhost-user:{path_str}"),
        transport: "vhost-user-blk",
        size_bytes: size,
        region_bytes: range,
        threads: opts.reactors,
    })
}

fn run_nbd(a: &RunArgs, uri_text: &str) -> Result<Ran, String> {
    let uri = uri::parse(uri_text)?;
    let bs = a.bs as u32;
    let first = connect::connect(&uri, a.timeout)?;
    let export = first.export.clone();
    let range = region_bytes(a, export.size_bytes)?;
    export.check_io(bs, a.offset, range)?;
    let region_blocks = range / a.bs;
    if a.connections > 1 && !export.can_multi_conn() {
        eprintln!("ringblk-bench: note: the export does not advertise NBD_FLAG_CAN_MULTI_CONN");
    }
    let caps = TargetCaps {
        read_only: export.read_only(),
        can_flush: export.can_flush(),
        streams: a.connections as usize,
    };
    let phases = phases(a, &caps, region_blocks)?;
    let opts = engine_opts(a, a.reactors as usize);
    let show_progress = !a.quiet && std::io::stderr().is_terminal();
    let mut first = Some(first);
    let mut results: Vec<PhaseResult> = Vec::new();
    for phase in phases {
        let mut conns = Vec::with_capacity(phase.connections);
        conns.extend(first.take());
        while conns.len() < phase.connections {
            conns.push(connect::connect(&uri, a.timeout)?);
        }
        let phase = Arc::new(phase);
        let mut line = ProgressLine::new(show_progress, &phase);
        let r = engine::run_phase(
            phase.clone(),
            conns,
            opts,
            Duration::from_millis(250),
            |p, t0| line.tick(p, t0),
        );
        line.clear();
        results.push(r?);
    }
    Ok(Ran {
        results,
        target: uri.to_string(),
        transport: "nbd",
        size_bytes: export.size_bytes,
        region_bytes: range,
        threads: opts.reactors,
    })
}

/// Prints the report of a run and writes its `.hgrm` and SVG; `Ok(false)` when any
/// phase failed.
fn report_run(a: &RunArgs, ran: Ran) -> Result<bool, String> {
    let Ran {
        results,
        target,
        transport,
        size_bytes,
        region_bytes: range,
        threads,
    } = ran;
    let bs = a.bs as u32;
    let reports: Vec<PhaseReport> = results.iter().map(PhaseReport::new).collect();
    let ok = !reports.iter().any(PhaseReport::failed);
    let run = RunReport {
        tool: "ringblk-bench",
        version: env!("CARGO_PKG_VERSION"),
        uri: target,
        transport,
        workload: if a.verify {
            format!(
                "verify ({} order)",
                if a.rw.random() {
                    "random"
                } else {
                    "sequential"
                }
            )
        } else {
            a.rw.name().to_string()
        },
        bs,
        iodepth: a.iodepth,
        connections: if transport == "nbd" {
            a.connections as usize
        } else {
            a.queues as usize
        },
        reactors: threads,
        export_size: size_bytes,
        region_offset: a.offset,
        region_bytes: range,
        phases: reports,
        ok,
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &run).map_err(|e| format!("json: {e}"))?;
        writeln!(out).map_err(|e| e.to_string())?;
    } else {
        report::print_table(&run, &mut out).map_err(|e| e.to_string())?;
    }
    let mut all = OpStats::default();
    for r in &results {
        all.merge(&r.total());
    }
    if let Some(path) = &a.hgrm {
        let mut f = std::fs::File::create(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        hgrm::write(&all.hist, 1000.0, &mut f)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        let label = a.label.clone().unwrap_or_else(|| {
            format!(
                "{} bs={} qd={} conns={}",
                run.workload, bs, a.iodepth, a.connections
            )
        });
        let curve = plot_curve_of(&all, label);
        plot::draw(path, "Latency by percentile", &[curve])?;
    }
    Ok(ok)
}

/// `ringblk-bench io`: the ops in order; `Ok(false)` when one failed (the rest are
/// not run: later ops usually depend on earlier ones).
fn io_cmd(a: IoArgs) -> Result<bool, String> {
    let path = a
        .vhost
        .to_str()
        .ok_or_else(|| format!("{}: not UTF-8", a.vhost.display()))?
        .to_string();
    if a.queue >= a.queues {
        return Err(format!("--queue {} of --queues {}", a.queue, a.queues));
    }
    let mut dev = vhost::Device::open(&vhost::DeviceOpts {
        path,
        queues: a.queues,
        queue_size: None,
        read_only: a.read_only,
        depth: 1,
        bs: vhost::IO_CHUNK_BYTES,
    })?;
    #[derive(serde::Serialize)]
    struct OpResult {
        op: String,
        ok: bool,
        error: Option<String>,
    }
    let mut done = Vec::new();
    for op in &a.ops {
        let r = dev.run_op(a.queue as usize, op);
        done.push(OpResult {
            op: op.to_string(),
            ok: r.is_ok(),
            error: r.err(),
        });
        if !a.json {
            let last = &done[done.len() - 1];
            match &last.error {
                None => println!("{}: ok", last.op),
                Some(e) => println!("{}: FAILED: {e}", last.op),
            }
        }
        if done.last().is_some_and(|d| !d.ok) {
            break;
        }
    }
    let ok = done.iter().all(|d| d.ok) && done.len() == a.ops.len();
    if a.json {
        let doc = serde_json::json!({ "device": dev.info, "ops": done, "ok": ok });
        println!("{doc:#}");
    }
    Ok(ok)
}

/// A run's histogram as a plot curve (see [`ringblk_bench::curve_of`]).
fn plot_curve_of(stats: &OpStats, label: String) -> plot::Curve {
    ringblk_bench::curve_of(&stats.hist, label)
}

fn plot_cmd(a: PlotArgs) -> Result<(), String> {
    let mut curves = Vec::new();
    let mut summary = Vec::new();
    for f in &a.files {
        let (label, path) = match f.split_once('=') {
            Some((l, p)) if !l.is_empty() && !std::path::Path::new(f).exists() => {
                (l.to_string(), PathBuf::from(p))
            }
            _ => {
                let p = PathBuf::from(f);
                let stem = p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| f.clone());
                (stem, p)
            }
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let h = hgrm::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        summary.push((label.clone(), h.clone()));
        curves.push(plot::Curve {
            label,
            points: h.spectrum(),
        });
    }
    plot::draw(&a.svg, &a.title, &curves)?;
    print_hgrm_summary(&summary, &mut std::io::stdout().lock()).map_err(|e| e.to_string())
}

/// The table `plot` prints: each file's percentiles as read back from it.
fn print_hgrm_summary(files: &[(String, hgrm::Hgrm)], out: &mut impl Write) -> std::io::Result<()> {
    let w = files.iter().map(|(l, _)| l.len()).max().unwrap_or(0).max(5);
    write!(out, "{:<w$}", "curve")?;
    for (_, name) in report::PERCENTILES {
        write!(out, " {name:>8}")?;
    }
    writeln!(out, " {:>8}   (latency in µs)", "max")?;
    for (label, h) in files {
        write!(out, "{label:<w$}")?;
        for (pct, _) in report::PERCENTILES {
            let v = h
                .value_at_percentile(pct)
                .map_or("-".into(), report::fmt_us);
            write!(out, " {v:>8}")?;
        }
        let max = h.max_value().map_or("-".into(), report::fmt_us);
        writeln!(out, " {max:>8}")?;
    }
    Ok(())
}

/// The one-line progress display on a terminal.
struct ProgressLine {
    on: bool,
    name: String,
    planned: Option<Duration>,
    last: Instant,
    last_ops: u64,
    last_bytes: u64,
}

impl ProgressLine {
    fn new(on: bool, phase: &Phase) -> ProgressLine {
        let planned = match &phase.mode {
            Mode::Timed { ramp, runtime, .. } => runtime.map(|r| r + *ramp),
            Mode::Pass { .. } => None,
        };
        ProgressLine {
            on,
            name: phase.name.clone(),
            planned,
            last: Instant::now(),
            last_ops: 0,
            last_bytes: 0,
        }
    }

    fn tick(&mut self, p: &stream::Progress, t0: Instant) {
        if !self.on || self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let (ops, bytes) = (
            p.ops.load(Ordering::Relaxed),
            p.bytes.load(Ordering::Relaxed),
        );
        let dt = self.last.elapsed().as_secs_f64();
        let iops = (ops - self.last_ops) as f64 / dt;
        let mbs = (bytes - self.last_bytes) as f64 / dt / 1e6;
        let elapsed = t0.elapsed().as_secs_f64();
        let of = self
            .planned
            .map(|d| format!("/{:.0}s", d.as_secs_f64()))
            .unwrap_or_default();
        let errors = p.errors.load(Ordering::Relaxed);
        eprint!(
            "\r\x1b[K[{}] {elapsed:.0}s{of}  {iops:.0} IOPS  {mbs:.1} MB/s  {ops} ops  {errors} errors",
            self.name
        );
        (self.last, self.last_ops, self.last_bytes) = (Instant::now(), ops, bytes);
    }

    fn clear(&self) {
        if self.on {
            eprint!("\r\x1b[K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("99999999999t").is_err());
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1").is_err());
    }

    /// Splits a command line the way a shell would for the examples: whitespace,
    /// single quotes, and `\` line continuations (already joined).
    fn shell_words(line: &str) -> Vec<String> {
        let (mut words, mut cur, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
        for c in line.chars() {
            match c {
                '\'' => (quoted, any) = (!quoted, true),
                c if c.is_whitespace() && !quoted => {
                    if any {
                        words.push(std::mem::take(&mut cur));
                        any = false;
                    }
                }
                c => {
                    cur.push(c);
                    any = true;
                }
            }
        }
        if any {
            words.push(cur);
        }
        words
    }

    /// Every example in every --help text parses: the help cannot promise a flag
    /// that does not exist.
    #[test]
    fn help_examples_parse() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut helps = vec![cmd.render_long_help().to_string()];
        for sub in cmd.get_subcommands_mut() {
            helps.push(sub.render_long_help().to_string());
        }
        let mut checked = 0;
        for help in helps {
            let joined = help.replace("\\\n", " ");
            for line in joined.lines().map(str::trim) {
                if !(line.starts_with("ringblk-bench run ")
                    || line.starts_with("ringblk-bench plot ")
                    || line.starts_with("ringblk-bench io "))
                {
                    continue;
                }
                // A redirection ends the command.
                let args: Vec<String> = shell_words(line)
                    .into_iter()
                    .take_while(|w| w != ">")
                    .collect();
                Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{line}: {e}"));
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} examples found");
    }
}
