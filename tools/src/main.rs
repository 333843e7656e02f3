//! `ringblk-ctl`: manage a running ringblk target over its JSON-RPC control socket.
//!
//! One command is one connection and one request. Results print as tables, or as the
//! raw pretty-printed JSON result with `--json`.
//!
//! # Errors
//!
//! Exit status 0 on success; 1 when the request failed (the server's JSON-RPC error is
//! printed as `error: <message> (code N)` on stderr, a connection problem names the
//! socket path); 2 for usage errors (clap's convention).

mod client;
mod copy;
mod latency;
mod render;
mod size;
mod table;

use std::io::{ErrorKind, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use client::{Client, CtlError};

/// Where `ringblk serve` puts its socket unless told otherwise (the one default of
/// both, `ringblk_target::spec::default_rpc_socket`), for `--help`.
const DEFAULT_RPC_HELP: &str = "Path of the server's JSON-RPC socket [default: \
/run/ringblk/ringblk.sock as root, else $XDG_RUNTIME_DIR/ringblk/ringblk.sock, as for \
`ringblk serve`]";

#[derive(Debug, Parser)]
#[command(
    name = "ringblk-ctl",
    version,
    about = "Manage a running ringblk target over its JSON-RPC control socket",
    long_about = "Manage a running ringblk target over its JSON-RPC control socket.\n\n\
        Each command sends one JSON-RPC 2.0 request to the socket of `ringblk serve` and \
        prints the result as a table, or as JSON with --json.",
    after_help = "Examples:\n  \
        ringblk-ctl volume create vol0 --path /var/lib/ringblk/vol0.img --size 10G\n  \
        ringblk-ctl volume list\n  \
        ringblk-ctl --json stats vol0\n  \
        ringblk-ctl backup create vol0@nightly\n  \
        ringblk-ctl --rpc /run/ringblk/ringblk.sock reactor list\n  \
        ringblk-ctl call volume_list '{}'",
    propagate_version = true
)]
struct Cli {
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "RINGBLK_RPC",
        help = DEFAULT_RPC_HELP
    )]
    rpc: Option<PathBuf>,

    /// Print the raw JSON result (pretty-printed) instead of a table.
    #[arg(long, global = true)]
    json: bool,

    /// Seconds to wait for the server's reply (fractions allowed).
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value = "30",
        value_parser = parse_timeout
    )]
    timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list and delete volumes.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            ringblk-ctl volume create vol0 --path /var/lib/ringblk/vol0.img --size 10G\n  \
            ringblk-ctl volume list\n  \
            ringblk-ctl volume delete vol0"
    )]
    Volume(VolumeCommand),

    /// List the NBD exports clients can connect to.
    #[command(subcommand, after_help = "Example:\n  ringblk-ctl export list")]
    Export(ExportCommand),

    /// Show I/O counters per volume (and per reactor when the server reports them).
    #[command(after_help = "Examples:\n  \
        ringblk-ctl stats\n  \
        ringblk-ctl stats vol0\n  \
        ringblk-ctl --json stats vol0    # every field\n  \
        ringblk-ctl stats vol0 --hist    # latency percentiles per operation\n  \
        ringblk-ctl stats vol0 --hgrm vol0.hgrm --svg vol0.svg --op write\n  \
        ringblk-ctl stats vol0 --hist --reset    # report this interval, start a new one\n\n\
        Latency runs from a request's start on its reactor to its reply being queued; \
        requests refused without executing are not counted.")]
    Stats {
        /// Show only this volume.
        volume: Option<String>,
        /// Also show server-side latency percentiles per operation and counts per reactor.
        #[arg(long)]
        hist: bool,
        /// Write the latency of --op as HdrHistogram percentile text (.hgrm, µs).
        #[arg(long, value_name = "FILE", requires = "volume")]
        hgrm: Option<PathBuf>,
        /// Write the latency of --op as a percentile-spectrum plot (SVG).
        #[arg(long, value_name = "FILE", requires = "volume")]
        svg: Option<PathBuf>,
        /// Operation kind for --hgrm and --svg.
        #[arg(long, value_name = "OP", default_value = "all",
              value_parser = clap::builder::PossibleValuesParser::new(latency::OPS))]
        op: String,
        /// Start a new latency interval (the reply holds the one that ends).
        #[arg(long)]
        reset: bool,
    },

    /// Show the reactors (one polling thread per core) and how busy they are.
    #[command(subcommand, after_help = "Example:\n  ringblk-ctl reactor list")]
    Reactor(ReactorCommand),

    /// Take, list and release backups: a backup freezes the volume's image and sends
    /// every later I/O to a new delta, without pausing I/O in flight.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            ringblk-ctl backup create vol0@nightly\n  \
            qemu-img convert -f raw -O qcow2 nbd://127.0.0.1:10809/vol0@nightly vol0.qcow2\n  \
            ringblk-ctl backup list vol0\n  \
            ringblk-ctl backup copy vol0@nightly /backup/vol0.img\n  \
            ringblk-ctl backup release vol0@nightly"
    )]
    Backup(BackupCommand),

    /// Inject I/O errors into a volume's requests (as SPDK's error bdev does), to
    /// test how clients and the stack above handle a failing disk.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            ringblk-ctl fault inject vol0 --op read --offset 1M --length 64K --count 3\n  \
            ringblk-ctl fault inject vol0 --op write --errno ENOSPC --count 0\n  \
            ringblk-ctl fault clear vol0"
    )]
    Fault(FaultCommand),

    /// Export volumes as vhost-user-blk devices on Unix sockets, for QEMU guests
    /// (vhost-user-blk-pci) and libblkio clients (virtio-blk-vhost-user).
    #[command(
        subcommand,
        after_help = "Examples:\n  \
            ringblk-ctl vhost create vol0 /run/ringblk/vol0.vhost\n  \
            ringblk-ctl vhost create vol0@nightly /run/ringblk/nightly.vhost --mode 0660\n  \
            ringblk-ctl vhost list\n  \
            ringblk-ctl vhost delete /run/ringblk/vol0.vhost\n\n\
            QEMU: -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
            -chardev socket,id=c0,path=/run/ringblk/vol0.vhost,reconnect=1 \
            -device vhost-user-blk-pci,chardev=c0,num-queues=2"
    )]
    Vhost(VhostCommand),

    /// List every RPC method the server answers.
    #[command(after_help = "Example:\n  ringblk-ctl methods")]
    Methods,

    /// Call any RPC method with raw JSON params and print the JSON result.
    #[command(after_help = "Examples:\n  \
        ringblk-ctl call rpc_get_methods\n  \
        ringblk-ctl call volume_delete '{\"name\": \"vol0\"}'\n  \
        ringblk-ctl call vhost_create '{\"volume\": \"vol0\", \"socket\": \"/run/ringblk/vol0.vhost\"}'\n  \
        ringblk-ctl call vhost_list\n  \
        ringblk-ctl call vhost_delete '{\"socket\": \"/run/ringblk/vol0.vhost\"}'")]
    Call {
        /// The method name, e.g. volume_list.
        method: String,
        /// Params as a JSON object or array; omitted from the request when absent.
        #[arg(value_name = "JSON_PARAMS", value_parser = parse_json_params)]
        params: Option<Value>,
    },
}

#[derive(Debug, Subcommand)]
enum VhostCommand {
    /// Export VOLUME (or VOLUME@BACKUP, read-only) on a new socket at SOCKET (a stale
    /// socket there is replaced; anything else is refused).
    #[command(after_help = "Examples:\n  \
        ringblk-ctl vhost create vol0 /run/ringblk/vol0.vhost\n  \
        ringblk-ctl vhost create vol0 /run/ringblk/vol0.vhost --mode 0660 --queues 4")]
    Create {
        /// The volume, or VOLUME@BACKUP.
        export: String,
        /// Path of the Unix socket to create.
        socket: PathBuf,
        /// Socket permission bits, octal [default: 0600].
        #[arg(long, value_name = "OCTAL")]
        mode: Option<String>,
        /// Virtqueues offered [default: one per reactor, at most 16].
        #[arg(long, value_name = "N")]
        queues: Option<u16>,
    },
    /// List the vhost-user exports, one line per queue: its reactor and counters.
    #[command(after_help = "Example:\n  ringblk-ctl vhost list")]
    List,
    /// Stop the export on SOCKET: its client is disconnected once its queues drained.
    #[command(after_help = "Example:\n  ringblk-ctl vhost delete /run/ringblk/vol0.vhost")]
    Delete {
        /// The export's socket path.
        socket: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume and export it.
    #[command(after_help = "Examples:\n  \
        ringblk-ctl volume create vol0 --path /var/lib/ringblk/vol0.img --size 10G\n  \
        ringblk-ctl volume create scratch --backend mem --size 512M\n  \
        ringblk-ctl volume create fast --path /data/fast.img --size 1.5G --chunk-size 64K --direct off\n  \
        ringblk-ctl volume create golden --path /images/golden.img --read-only")]
    Create(CreateArgs),

    /// List volumes with their size, backend and connection count.
    #[command(after_help = "Examples:\n  \
        ringblk-ctl volume list\n  \
        ringblk-ctl --json volume list")]
    List,

    /// Delete a volume (the server may refuse while clients are connected).
    #[command(after_help = "Example:\n  ringblk-ctl volume delete vol0")]
    Delete {
        /// Name of the volume to delete.
        name: String,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Volume name; also the NBD export name.
    name: String,

    /// Backing file or image path, on the server's host (needed for the file
    /// backend; mem and null volumes have none).
    #[arg(long, value_name = "PATH")]
    path: Option<String>,

    /// Size: bytes, or a number with a binary suffix K, M, G, T (or KiB, MiB, GiB,
    /// TiB; 1K = 1024), e.g. 4096, 512M, 10G, 1.5G; when omitted the server chooses
    /// (e.g. the size of an existing backing file).
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    size: Option<u64>,

    /// Redirect-on-write granularity of backups' deltas: a power of two from 4K to
    /// 1M, at least the block size [default: 4K].
    #[arg(long, value_name = "SIZE", value_parser = parse_chunk_size)]
    chunk_size: Option<u32>,

    /// Open the backing file O_DIRECT (on) or through the page cache (off)
    /// [default: on].
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    direct: Option<bool>,

    /// Logical block size in bytes.
    #[arg(long, value_name = "512|4096", value_parser = parse_block_size)]
    block_size: Option<u32>,

    /// Where the data lives: a file, memory, or nowhere (the null backend).
    #[arg(long, value_enum)]
    backend: Option<Backend>,

    /// Export the volume read-only.
    #[arg(long)]
    read_only: bool,

    /// Let --size grow an existing, smaller backing file (refused without it).
    #[arg(long)]
    grow: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Backend {
    File,
    Mem,
    Null,
}

impl Backend {
    fn as_str(self) -> &'static str {
        match self {
            Backend::File => "file",
            Backend::Mem => "mem",
            Backend::Null => "null",
        }
    }
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Freeze VOLUME's image as backup NAME (served read-only as VOLUME@NAME).
    #[command(after_help = "Example:\n  ringblk-ctl backup create vol0@nightly\n\n\
        The older form `backup create VOLUME NAME` still works, with a warning.")]
    Create {
        /// The backup to take, as VOLUME@NAME (as `release` and `copy` name it).
        #[arg(value_name = "VOLUME@NAME")]
        backup: String,
        /// Deprecated second argument of `backup create VOLUME NAME`.
        #[arg(hide = true)]
        legacy_name: Option<String>,
    },
    /// List backups with their state and delta size.
    #[command(after_help = "Examples:\n  ringblk-ctl backup list\n  ringblk-ctl backup list vol0")]
    List {
        /// Only this volume's backups [default: every volume's].
        volume: Option<String>,
    },
    /// Release VOLUME@NAME: its delta merges down online and the backup disappears.
    #[command(after_help = "Example:\n  ringblk-ctl backup release vol0@nightly")]
    Release {
        /// The backup as VOLUME@NAME.
        #[arg(value_parser = parse_backup_ref)]
        backup: (String, String),
    },
    /// Copy VOLUME@NAME out to DEST, a file or block device on the server's host:
    /// sparse (holes and zeros are not written), with a SHA-256 of the image that
    /// `sha256sum DEST` reproduces. Follows the job with a progress bar (or, with
    /// --json, one JSON status object per line); Ctrl-C cancels it. Exit status 1
    /// when the copy failed or was cancelled. A backup cannot be released while it is
    /// being copied.
    #[command(after_help = "Examples:\n  \
        ringblk-ctl backup copy vol0@monday /backup/vol0.img\n  \
        ringblk-ctl backup copy vol0@tuesday /backup/vol0.img --changed-since monday\n  \
        ringblk-ctl --json backup copy vol0@monday /dev/sdb")]
    Copy {
        /// The backup as VOLUME@NAME.
        #[arg(value_parser = parse_backup_ref)]
        backup: (String, String),
        /// Destination file or block device, on the server's host (a relative path is
        /// taken relative to the current directory). A full copy creates or truncates
        /// a file.
        dest: PathBuf,
        /// Incremental: DEST already holds the copy of the older backup OLDER (of the
        /// same volume); write only the chunks changed since, so that DEST ends equal
        /// to VOLUME@NAME.
        #[arg(long, value_name = "OLDER")]
        changed_since: Option<String>,
        /// Overwrite an existing DEST (a full copy refuses one without it; with
        /// --changed-since DEST is the base being updated and must exist).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum FaultCommand {
    /// Arm a rule: the next COUNT requests of kind OP that touch the byte range fail
    /// with ERRNO instead of doing their I/O (a failed write is not applied).
    #[command(after_help = "Examples:\n  \
        ringblk-ctl fault inject vol0 --op read --offset 1M --length 64K --count 3\n  \
        ringblk-ctl fault inject vol0 --op any --count 0    # every request, until cleared")]
    Inject(FaultArgs),
    /// Disarm every rule of VOLUME.
    #[command(after_help = "Example:\n  ringblk-ctl fault clear vol0")]
    Clear {
        /// The volume whose rules go.
        volume: String,
    },
}

#[derive(Debug, Args)]
struct FaultArgs {
    /// The volume (its backups' exports are affected too).
    volume: String,

    /// Requests to fail: write also covers WRITE_ZEROES; any is every I/O request.
    #[arg(long, value_enum)]
    op: FaultOp,

    /// The error the client gets.
    #[arg(long, value_enum, default_value = "EIO")]
    errno: FaultErrno,

    /// Start of the byte range (K, M, G, T suffixes).
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    offset: Option<u64>,

    /// Length of the byte range; default: to the end of the volume.
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    length: Option<u64>,

    /// How many requests fail before the rule goes; 0 = until `fault clear`.
    #[arg(long, value_name = "N", default_value = "1")]
    count: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FaultOp {
    Read,
    Write,
    Flush,
    Any,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FaultErrno {
    #[value(name = "EIO")]
    Eio,
    #[value(name = "ENOSPC")]
    Enospc,
}

fn fault_params(args: &FaultArgs) -> Value {
    let op = match args.op {
        FaultOp::Read => "read",
        FaultOp::Write => "write",
        FaultOp::Flush => "flush",
        FaultOp::Any => "any",
    };
    let errno = match args.errno {
        FaultErrno::Eio => "EIO",
        FaultErrno::Enospc => "ENOSPC",
    };
    let mut p = json!({ "volume": args.volume, "op": op, "errno": errno, "count": args.count });
    if let Some(offset) = args.offset {
        p["offset"] = json!(offset);
    }
    if let Some(length) = args.length {
        p["length"] = json!(length);
    }
    p
}

/// `backup create VOL@NAME`, or the deprecated `backup create VOL NAME` (with a
/// warning on stderr).
fn create_ref(backup: &str, legacy_name: Option<&str>) -> Result<(String, String), String> {
    match legacy_name {
        None => parse_backup_ref(backup),
        Some(name) if !backup.contains('@') => {
            eprintln!(
                "warning: `backup create {backup} {name}` is deprecated; write \
                 `backup create {backup}@{name}`"
            );
            Ok((backup.to_string(), name.to_string()))
        }
        Some(name) => Err(format!(
            "'{backup}' already names the backup; drop the extra argument '{name}'"
        )),
    }
}

fn parse_chunk_size(text: &str) -> Result<u32, String> {
    let bytes = size::parse_size(text)?;
    u32::try_from(bytes).map_err(|_| format!("'{text}': a chunk size is at most 1M"))
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text.trim() {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("'{text}': use on or off")),
    }
}

fn parse_backup_ref(text: &str) -> Result<(String, String), String> {
    match text.split_once('@') {
        Some((v, n)) if !v.is_empty() && !n.is_empty() => Ok((v.to_string(), n.to_string())),
        _ => Err(format!("'{text}': expected VOLUME@NAME, e.g. vol0@nightly")),
    }
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// List NBD exports with their volume, size and mode.
    #[command(after_help = "Example:\n  ringblk-ctl export list")]
    List,
}

#[derive(Debug, Subcommand)]
enum ReactorCommand {
    /// List reactors: core, connections, busy share and poll policy.
    #[command(after_help = "Example:\n  ringblk-ctl reactor list")]
    List,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!(
            "'{text}': must be more than 0 and at most 86400 seconds"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{text}': {e}"))
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    match text.trim() {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("'{text}': block size must be 512 or 4096")),
    }
}

fn parse_json_params(text: &str) -> Result<Value, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("params are not valid JSON: {e}"))?;
    if value.is_object() || value.is_array() {
        Ok(value)
    } else {
        Err("params must be a JSON object or array, e.g. '{\"name\": \"vol0\"}'".into())
    }
}

/// The request a command sends: method and params.
fn request(command: &Command) -> (&str, Option<Value>) {
    match command {
        Command::Volume(VolumeCommand::Create(args)) => {
            ("volume_create", Some(create_params(args)))
        }
        Command::Volume(VolumeCommand::List) => ("volume_list", Some(json!({}))),
        Command::Volume(VolumeCommand::Delete { name }) => {
            ("volume_delete", Some(json!({ "name": name })))
        }
        Command::Export(ExportCommand::List) => ("export_list", Some(json!({}))),
        Command::Stats {
            volume,
            hist,
            hgrm,
            svg,
            reset,
            ..
        } => {
            let mut p = json!({});
            if let Some(v) = volume {
                p["volume"] = json!(v);
            }
            if *hist || hgrm.is_some() || svg.is_some() {
                p["hist"] = json!(true);
            }
            if *reset {
                p["reset"] = json!(true);
            }
            ("stats", Some(p))
        }
        Command::Reactor(ReactorCommand::List) => ("reactor_list", Some(json!({}))),
        Command::Backup(BackupCommand::Create {
            backup,
            legacy_name,
        }) => {
            // Checked in `main` before any request is made.
            let (volume, name) = create_ref(backup, legacy_name.as_deref()).unwrap_or_default();
            (
                "backup_create",
                Some(json!({ "volume": volume, "name": name })),
            )
        }
        Command::Backup(BackupCommand::List { volume }) => match volume {
            Some(v) => ("backup_list", Some(json!({ "volume": v }))),
            None => ("backup_list", Some(json!({}))),
        },
        Command::Backup(BackupCommand::Release { backup: (v, n) }) => {
            ("backup_release", Some(json!({ "volume": v, "name": n })))
        }
        Command::Backup(BackupCommand::Copy {
            backup: (v, n),
            dest,
            changed_since,
            ..
        }) => {
            let mut p = json!({ "volume": v, "name": n, "dest": dest });
            if let Some(older) = changed_since {
                p["changed_since"] = json!(older);
            }
            ("backup_copy", Some(p))
        }
        Command::Fault(FaultCommand::Inject(args)) => ("fault_inject", Some(fault_params(args))),
        Command::Fault(FaultCommand::Clear { volume }) => {
            ("fault_clear", Some(json!({ "volume": volume })))
        }
        Command::Vhost(VhostCommand::Create {
            export,
            socket,
            mode,
            queues,
        }) => {
            let mut p = json!({ "volume": export, "socket": absolute(socket) });
            if let Some(m) = mode {
                p["mode"] = json!(m);
            }
            if let Some(q) = queues {
                p["num_queues"] = json!(q);
            }
            ("vhost_create", Some(p))
        }
        Command::Vhost(VhostCommand::List) => ("vhost_list", Some(json!({}))),
        Command::Vhost(VhostCommand::Delete { socket }) => {
            ("vhost_delete", Some(json!({ "socket": absolute(socket) })))
        }
        Command::Methods => ("rpc_get_methods", None),
        Command::Call { method, params } => (method.as_str(), params.clone()),
    }
}

/// A socket path as the server must see it: relative to this shell's directory,
/// not the server's.
fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Optional fields are sent only when given, so the server's defaults apply.
fn create_params(args: &CreateArgs) -> Value {
    let mut params = Map::new();
    params.insert("name".into(), json!(args.name));
    if let Some(path) = &args.path {
        params.insert("path".into(), json!(path));
    }
    if let Some(size) = args.size {
        params.insert("size_bytes".into(), json!(size));
    }
    if let Some(block_size) = args.block_size {
        params.insert("block_size".into(), json!(block_size));
    }
    if let Some(backend) = args.backend {
        params.insert("backend".into(), json!(backend.as_str()));
    }
    if args.read_only {
        params.insert("read_only".into(), json!(true));
    }
    if args.grow {
        params.insert("grow".into(), json!(true));
    }
    if let Some(chunk) = args.chunk_size {
        params.insert("chunk_size".into(), json!(chunk));
    }
    if let Some(direct) = args.direct {
        params.insert("direct".into(), json!(direct));
    }
    Value::Object(params)
}

/// Human output for a command's result.
fn render(command: &Command, result: &Value) -> Result<String, CtlError> {
    match command {
        Command::Volume(VolumeCommand::Create(args)) => {
            Ok(render::created_volume(result, &args.name))
        }
        Command::Volume(VolumeCommand::List) => render::volumes(result),
        Command::Volume(VolumeCommand::Delete { name }) => Ok(format!("deleted volume {name}\n")),
        Command::Export(ExportCommand::List) => render::exports(result),
        Command::Stats { .. } => {
            let mut out = render::stats(result)?;
            let volumes = result.get("volumes").and_then(Value::as_array);
            for v in volumes.into_iter().flatten() {
                out.push_str(&latency::table(v));
            }
            Ok(out)
        }
        Command::Reactor(ReactorCommand::List) => render::reactors(result),
        Command::Methods => render::methods(result),
        Command::Vhost(VhostCommand::Create { .. }) => {
            render::vhost(&Value::Array(vec![result.clone()]))
        }
        Command::Vhost(VhostCommand::List) => render::vhost(result),
        Command::Vhost(VhostCommand::Delete { socket }) => Ok(format!(
            "deleted the vhost-user export on {}\n",
            socket.display()
        )),
        Command::Backup(BackupCommand::Create { .. }) => Ok(render::backup_created(result)),
        Command::Backup(BackupCommand::List { .. }) => render::backups(result),
        Command::Backup(BackupCommand::Release { backup: (v, n) }) => {
            Ok(format!("releasing {v}@{n}: its delta is merging down\n"))
        }
        Command::Backup(BackupCommand::Copy { .. }) => Ok(render::json(result)),
        Command::Fault(FaultCommand::Inject(_)) => Ok(render::fault_injected(result)),
        Command::Fault(FaultCommand::Clear { volume }) => Ok(format!(
            "cleared {} fault rule(s) on {volume}\n",
            result.get("cleared").unwrap_or(&Value::Null)
        )),
        Command::Call { .. } => Ok(render::json(result)),
    }
}

fn run(cli: &Cli, rpc: &std::path::Path) -> Result<String, CtlError> {
    let (method, params) = request(&cli.command);
    let result = Client::new(rpc, cli.timeout).call(method, params)?;
    if let Command::Stats {
        volume: Some(volume),
        hgrm,
        svg,
        op,
        ..
    } = &cli.command
    {
        if hgrm.is_some() || svg.is_some() {
            let h = latency::histogram(&result, op)?;
            if let Some(path) = hgrm {
                latency::write_hgrm(&h, path)?;
            }
            if let Some(path) = svg {
                latency::write_svg(&h, path, &format!("{volume} {op} latency (server)"))?;
            }
        }
    }
    if cli.json {
        Ok(render::json(&result))
    } else {
        render(&cli.command, &result)
    }
}

/// `--rpc`, `RINGBLK_RPC`, or the default that `ringblk serve` uses too.
fn rpc_path(cli: &Cli) -> Result<PathBuf, String> {
    match &cli.rpc {
        Some(p) => Ok(p.clone()),
        None => ringblk_target::spec::default_rpc_socket(
            nix::unistd::geteuid().as_raw(),
            std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        ),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rpc = match rpc_path(&cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Backup(BackupCommand::Create {
        backup,
        legacy_name,
    }) = &cli.command
    {
        if let Err(e) = create_ref(backup, legacy_name.as_deref()) {
            eprintln!("error: invalid value for <VOLUME@NAME>: {e}");
            return ExitCode::from(2);
        }
    }
    if let Command::Volume(VolumeCommand::Create(args)) = &cli.command {
        if args.path.is_none() && matches!(args.backend, None | Some(Backend::File)) {
            eprintln!(
                "error: --path <PATH> is needed for a file volume (mem and null volumes \
                 take none)"
            );
            return ExitCode::from(2);
        }
    }
    if let Command::Backup(BackupCommand::Copy {
        backup: (volume, name),
        dest,
        changed_since,
        force,
    }) = &cli.command
    {
        if changed_since.is_none() && !force {
            if let Some(why) = copy::existing_dest(dest) {
                eprintln!(
                    "error: {} {why}; a full copy would overwrite it: pass --force to \
                     overwrite it, or --changed-since OLDER to update the copy of an \
                     older backup it holds",
                    dest.display()
                );
                return ExitCode::FAILURE;
            }
        }
        // A job to follow, not one request and one result.
        let args = copy::CopyArgs {
            volume,
            name,
            dest,
            changed_since: changed_since.as_deref(),
            json: cli.json,
        };
        return copy::run(&Client::new(&rpc, cli.timeout), &args);
    }
    match run(&cli, &rpc) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                // `ringblk-ctl volume list | head -1` is not an error.
                Err(e) if e.kind() != ErrorKind::BrokenPipe => {
                    eprintln!("error: writing output: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(err) => {
            eprintln!("error: {err}");
            if let CtlError::Rpc {
                data: Some(data), ..
            } = &err
            {
                eprintln!("  data: {data}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeout_and_block_size_parsers() {
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("nan").is_err());
        assert!(parse_timeout("inf").is_err());
        assert_eq!(parse_block_size("4096"), Ok(4096));
        assert!(parse_block_size("1024").is_err());
    }

    #[test]
    fn json_params_must_be_structured() {
        assert!(parse_json_params("{\"a\": 1}").is_ok());
        assert!(parse_json_params("[1]").is_ok());
        assert!(parse_json_params("1").is_err());
        assert!(parse_json_params("{").is_err());
    }
}
