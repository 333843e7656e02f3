//! `ringblk`: the block storage target.
//!
//! `ringblk serve` with no flags serves `./ringblk-data/vol0.img` (1 GiB, created
//! sparse) on 127.0.0.1:10809 with a JSON-RPC socket at `/run/ringblk/ringblk.sock`
//! (root) or `$XDG_RUNTIME_DIR/ringblk/ringblk.sock`, where `ringblk-ctl` looks too.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use ringblk_reactor::SubmitPolicy;
use ringblk_server::config::{self, Flags, PollMode};
use ringblk_server::methods::Methods;
use ringblk_server::rpc::RpcServer;
use ringblk_server::server::{ListenAddr, Server};
use ringblk_server::startup;
use ringblk_target::volume::VolumeSpec;

#[derive(Parser)]
#[command(
    name = "ringblk",
    version,
    about = "Polled-mode NBD and vhost-user-blk block storage target on io_uring",
    long_about = "ringblk serves volumes over the NBD protocol to fio (ioengine=nbd), \
qemu-img/qemu-io, nbdinfo/nbdcopy/nbdsh and the Linux nbd client, and as vhost-user-blk \
devices (--vhost) to QEMU guests and libblkio clients, with one io_uring reactor per \
core. Manage a running server with ringblk-ctl."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (zero configuration: vol0, 1 GiB, on 127.0.0.1:10809).
    #[command(after_help = "EXAMPLES:
  ringblk serve
  ringblk serve --listen 127.0.0.1:10809 --volume data=/dev/nvme0n1 --cores 0-1 --poll busy
  ringblk serve --volume ram=,backend=mem,size=4G --volume nul=,backend=null,size=1T
  ringblk serve --volume data=/var/tmp/data.img,size=10G --vhost data=/run/ringblk/data.vhost
  ringblk serve --config ringblk.toml

CONFIG FILE (TOML; flags override it):
  listen = \"127.0.0.1:10809\"
  rpc = \"/run/ringblk/ringblk.sock\"
  data_dir = \"/var/lib/ringblk\"
  cores = \"0-1\"
  poll = \"adaptive\"      # busy | adaptive | interrupt
  poll_us = 50
  submit = \"eager\"      # eager | batch | everyN
  buffer_budget = \"1G\"   # request buffers of all connections together
  max_handshakes = 128
  request_timeout_secs = 30
  tls = \"require\"      # off | on | require: NBD over TLS (STARTTLS)
  tls_creds = \"/etc/ringblk/tls\"   # ca-cert.pem, server-cert.pem, server-key.pem
  tls_verify_peer = true
  [[volume]]
  name = \"vol0\"
  path = \"/var/lib/ringblk/vol0.img\"
  size = \"10G\"           # binary units (1G = 2^30), \"1.5G\", or bytes: 10737418240
  block_size = 512       # or 4096
  backend = \"file\"       # file | mem | null
  read_only = false
  grow = false           # true: size may grow an existing smaller file
  tls_allow = [\"dns:alice\", \"dn:CN=bob, O=ringblk\"]   # NBD clients (certificate
                         # SAN or subject) that see this volume and its backups
  plaintext = false      # with tls = \"on\": serve it to clients without TLS too
  [[vhost]]              # as --vhost VOL=SOCKET_PATH
  volume = \"vol0\"        # or \"vol0@BACKUP\" (read-only)
  socket = \"/run/ringblk/vol0.vhost\"

An existing file smaller than size= is refused, never grown silently: add grow=true
to the --volume spec (grow = true in the file) to grow it. A size smaller than the
file serves the first SIZE bytes and leaves the file as it is.")]
    // Boxed: the flags make this variant far larger than the others.
    Serve(Box<ServeArgs>),
    /// Check a data dir's manifests and journals offline (like thin_check).
    #[command(
        after_help = "Checks, for VOLUME or every volume with a manifest in DIR: the manifest's
checksum and contents; that every delta it lists has its data file and journal;
that every journal's frames check out (a torn tail from a crash is reported, not an
error) and replay strictly (no install over a mapped chunk, no unmap of an unmapped
one, no physical chunk mapped twice or out of range); that the base image is the
file the backups were taken of; that the volume list (volumes.json) parses and its
volumes' base files exist. A volume the server would leave out at start is named
with the reason. Never writes nor locks: it may run beside a server on the same
data dir (a note says so).

EXIT STATUS: 0 consistent, 1 inconsistencies found (listed), 2 usage error.

EXAMPLES:
  ringblk check --data-dir ./ringblk-data
  ringblk check --data-dir /var/lib/ringblk vol0"
    )]
    Check(CheckArgs),
    /// Make a CA, a server and a client certificate for NBD over TLS (quick start).
    #[command(
        after_help = "Writes, in DIR (created 0700): ca-cert.pem, ca-key.pem, server-cert.pem,
server-key.pem (qemu's tls-creds-x509 layout for `ringblk serve --tls-creds DIR`),
and client-cert.pem, client-key.pem for clients (nbdinfo's tls-certificates=DIR and
qemu's tls-creds-x509 endpoint=client read the same directory). The client
certificate's identities for tls_allow are printed. Existing files are not
overwritten.

EXAMPLES:
  ringblk tls-init /etc/ringblk/tls --server-name nbd.example.com --client-name alice"
    )]
    TlsInit(ringblk_server::tlsinit::TlsInitArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The server's data dir.
    #[arg(long, value_name = "DIR", default_value = "./ringblk-data")]
    data_dir: PathBuf,
    /// Only this volume [default: every volume with a manifest].
    volume: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn check(args: CheckArgs) -> ExitCode {
    if !args.data_dir.is_dir() {
        eprintln!(
            "ringblk check: {} is not a directory",
            args.data_dir.display()
        );
        return ExitCode::from(2);
    }
    // A running server is no error (check only reads), but what it reads is a moment
    // of files being written: say so, with the server's pid.
    let server = ringblk_server::datadir::holder(&args.data_dir).map(|pid| {
        let who = pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}"));
        format!(
            "a ringblk server ({who}) is running on this data dir: this is a snapshot of \
             files in use (a journal tail being written may show as torn)"
        )
    });
    let mut rep =
        ringblk_target::target::Target::check_data_dir(&args.data_dir, args.volume.as_deref());
    rep.notes.extend(server);
    if args.json {
        let v = serde_json::json!({
            "ok": rep.ok(),
            "volumes": rep.volumes,
            "deltas": rep.lines,
            "notes": rep.notes,
            "errors": rep.errors,
        });
        println!("{v:#}");
    } else {
        println!(
            "ringblk check {}: {} volume(s)",
            args.data_dir.display(),
            rep.volumes.len()
        );
        for l in &rep.lines {
            println!("  {l}");
        }
        for n in &rep.notes {
            println!("  note: {n}");
        }
        for e in &rep.errors {
            println!("  ERROR: {e}");
        }
        println!(
            "{}",
            if rep.ok() {
                "consistent".to_string()
            } else {
                format!("{} inconsistencies", rep.errors.len())
            }
        );
    }
    if rep.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (see below); flags override its values.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// NBD listen address: ADDR:PORT or unix:PATH [default: 127.0.0.1:10809].
    /// Port 0 picks a free port (printed at start).
    #[arg(long, value_name = "ADDR:PORT|unix:PATH", conflicts_with_all = ["port", "bind"])]
    listen: Option<String>,
    /// TCP port to listen on, as qemu-nbd's and nbdkit's -p [default: 10809].
    #[arg(short = 'p', long, value_name = "PORT")]
    port: Option<u16>,
    /// Address to listen on, as qemu-nbd's -b [default: 127.0.0.1].
    #[arg(short = 'b', long, value_name = "ADDR")]
    bind: Option<String>,
    /// Export the volumes of --volume and the file (and the default vol0) read-only,
    /// as qemu-nbd's and nbdkit's -r (volumes created later over RPC are not).
    #[arg(short = 'r', long)]
    read_only: bool,
    /// Stay in the foreground (the default; accepted as nbdkit's --foreground).
    #[arg(long, conflicts_with = "fork")]
    foreground: bool,
    /// Fork into the background once serving, as qemu-nbd's --fork: the parent exits
    /// 0 when the server is ready (1, with the child's error on stderr, if it failed to
    /// start). The fork happens before any thread starts; the server's stdout goes to
    /// /dev/null once the banner is printed, its stderr (the log) stays.
    #[arg(long)]
    fork: bool,
    /// Write the server's process id to FILE once it serves (removed at a clean stop).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// JSON-RPC Unix socket for ringblk-ctl (or RINGBLK_RPC, or rpc= in the file)
    /// [default: /run/ringblk/ringblk.sock as root, else
    /// $XDG_RUNTIME_DIR/ringblk/ringblk.sock; ringblk-ctl's default too].
    #[arg(long, value_name = "PATH")]
    rpc: Option<PathBuf>,
    /// Directory for the default volume, backups' deltas and manifests;
    /// one server at a time (it holds DATA_DIR/ringblk.lock) [default: ./ringblk-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Cores to run one reactor each on, e.g. 0,1 or 0-3 [default: every core].
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Idle policy: busy (spin, lowest latency), adaptive (spin poll_us then sleep),
    /// interrupt (sleep at once) [default: adaptive].
    #[arg(long, value_parser = config::parse_poll)]
    poll: Option<PollMode>,
    /// Spin time before an adaptive reactor sleeps [default: 50].
    #[arg(long, value_name = "N")]
    poll_us: Option<u64>,
    /// When the reactors enter queued I/O into the kernel: eager (after each
    /// completion that queued any, as fio does), batch (once per loop iteration: fewest
    /// system calls) or everyN (once N are queued) [default: eager].
    #[arg(long, value_name = "POLICY", value_parser = parse_submit)]
    submit: Option<SubmitPolicy>,
    /// A volume: NAME=PATH[,size=SIZE][,block-size=512|4096][,chunk-size=4K..1M][,backend=file|mem|null][,read-only][,direct=on|off][,grow=true].
    /// SIZE: bytes, or a number with a binary suffix K, M, G, T (or KiB, MiB, GiB,
    /// TiB; 1K = 1024), e.g. 4096, 512M, 10G, 1.5G; KB/MB/GB are refused as ambiguous.
    /// Repeatable. The data dir keeps the list of volumes the server had (those
    /// created over RPC too) and a restart brings them all back: --volume adds to
    /// that list and must agree with what it says of a volume it names (see
    /// --rebind). Without any, a first start serves vol0 from DATA_DIR/vol0.img
    /// (1 GiB); once deleted, vol0 stays deleted. A new file is created at SIZE; an
    /// existing smaller one is grown only with grow=true.
    #[arg(long = "volume", value_name = "SPEC", value_parser = config::parse_volume)]
    volumes: Vec<VolumeSpec>,
    /// Export VOL (or a backup, VOL@BACKUP, read-only) as a vhost-user-blk device on
    /// a Unix socket at SOCKET_PATH (mode 0600; a stale socket there is replaced,
    /// anything else refused), for QEMU's vhost-user-blk-pci or libblkio's
    /// virtio-blk-vhost-user. One virtqueue per reactor, at most 16. Repeatable.
    /// RPC vhost_create/vhost_delete/vhost_list manage them while the server runs.
    #[arg(long = "vhost", value_name = "VOL=SOCKET_PATH", value_parser = config::parse_vhost)]
    vhost: Vec<config::VhostArg>,
    /// Serve every volume as an iSCSI target (IQN iqn.2026-12.io.ringblk:VOL, LUN 0)
    /// and every backup VOL@NAME as a read-only one (…:VOL:NAME) on ADDR:PORT; without
    /// a value on loopback, 127.0.0.1:3260. Off by default. The IQN prefix and CHAP
    /// (chap_user, chap_secret) are set in the config file's [iscsi] table, never here.
    /// RPC iscsi_list shows targets and sessions.
    #[arg(long = "iscsi", value_name = "ADDR:PORT", num_args = 0..=1, default_missing_value = config::DEFAULT_ISCSI_LISTEN)]
    iscsi: Option<String>,
    /// Accept a changed volume: VOLUME's --volume spec replaces what the data dir's
    /// volume list says of it, and its backups are served over its base image even
    /// if that is not the file they were taken of (restored from a copy, moved to
    /// another filesystem). Without it such a start refuses the volume and names the
    /// recorded and the found file. Repeatable.
    #[arg(long, value_name = "VOLUME")]
    rebind: Vec<String>,
    /// Most NBD connections at once [default: 1024].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// I/O operations in flight per reactor; more wait in the reactor's queue until
    /// one completes. At least 2 per socket (--max-connections + --max-handshakes)
    /// + 64 [default: 4096, or that floor if it is more].
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// FLUSH/FUA requests of a volume queued for its group commit at most; more wait
    /// on their reactor until the committer takes the queue [default: 4096].
    #[arg(long, value_name = "N")]
    commit_queue_depth: Option<usize>,
    /// Seconds a client may take to finish the handshake [default: 10].
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Connections that may be negotiating at once; at the limit the least recently
    /// active one gives way to a new one [default: 128].
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Memory that request data buffers (READ and WRITE) of all connections may hold
    /// together; a connection waits for its turn when it is used up. At least 32M,
    /// the largest request; binary units (1G = 2^30) [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = config::parse_size)]
    buffer_budget: Option<u64>,
    /// Seconds a request may stall on its client (WRITE payload started but not
    /// arriving, or replies holding buffers not being read) before the connection
    /// is closed [default: 30].
    #[arg(long, value_name = "SECS")]
    request_timeout: Option<u64>,
    /// Log filter (tracing syntax), e.g. info, debug, ringblk_target=trace [default: info,
    /// or RINGBLK_LOG]. An invalid filter is an error.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Log line format on stderr: text (coloured only when stderr is a terminal) or
    /// json (one object per line).
    #[arg(long, value_name = "FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// NBD over TLS (STARTTLS): off; on (TLS when the client asks; plain clients
    /// see only volumes marked plaintext = true in the config file); require (no
    /// option but STARTTLS before TLS) [default: off, or tls= in the file].
    #[arg(long, value_name = "MODE", value_parser = config::parse_tls_mode)]
    tls: Option<ringblk_nbd::TlsMode>,
    /// Directory with ca-cert.pem, server-cert.pem and server-key.pem (qemu's
    /// tls-creds-x509 layout; `ringblk tls-init DIR` makes one).
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<PathBuf>,
    /// Require a client certificate signed by ca-cert.pem.
    #[arg(long)]
    tls_verify_peer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_submit(s: &str) -> Result<SubmitPolicy, String> {
    s.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check(args),
        Command::TlsInit(args) => match ringblk_server::tlsinit::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringblk tls-init: {e}");
                ExitCode::from(1)
            }
        },
        Command::Serve(args) => match serve(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringblk: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs go to stderr: ANSI colours only when it is a terminal (never into a log
/// file), text or JSON lines. A filter that does not parse is an error naming it
/// (it used to fall back to `info` silently).
fn init_logging(filter: Option<&str>, format: LogFormat) -> Result<(), String> {
    use std::io::IsTerminal;
    let (filter, from) = match filter {
        Some(f) => (f.to_string(), "--log"),
        None => match std::env::var("RINGBLK_LOG") {
            Ok(f) => (f, "RINGBLK_LOG"),
            Err(_) => ("info".to_string(), "the default"),
        },
    };
    let env = tracing_subscriber::EnvFilter::builder()
        .parse(&filter)
        .map_err(|e| format!("invalid log filter {filter:?} ({from}): {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}

/// `--port`/`--bind` as a `--listen` address (`None` when neither is given).
fn listen_from(bind: Option<&str>, port: Option<u16>) -> Option<String> {
    if bind.is_none() && port.is_none() {
        return None;
    }
    let host = bind.unwrap_or("127.0.0.1");
    let port = port.unwrap_or(10809);
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// `--fork`: forks while this process has one thread (nothing started yet). The
/// parent waits for the child to say it serves (one byte on a pipe) and exits 0, or
/// exits 1 when the pipe closes without it (the child failed; its error went to the
/// shared stderr). Returns, in the child, the pipe's write end for [`ready`].
fn fork_and_wait() -> Result<std::os::fd::OwnedFd, String> {
    use nix::unistd::{fork, pipe, setsid, ForkResult};
    let (rx, tx) = pipe().map_err(|e| format!("--fork: pipe: {e}"))?;
    // SAFETY: no thread has been started yet (the fork comes first in `serve`), so
    // the child is a full copy of a single-threaded process and may do anything.
    match unsafe { fork() }.map_err(|e| format!("--fork: {e}"))? {
        ForkResult::Parent { child } => {
            drop(tx);
            let mut byte = [0u8; 1];
            let mut f = std::fs::File::from(rx);
            let ready = std::io::Read::read(&mut f, &mut byte).unwrap_or(0) == 1;
            if ready {
                std::process::exit(0);
            }
            let _ = nix::sys::wait::waitpid(child, None);
            std::process::exit(1);
        }
        ForkResult::Child => {
            drop(rx);
            // Leave the caller's session: a closed terminal must not stop the server.
            let _ = setsid();
            Ok(tx)
        }
    }
}

/// Tells the `--fork` parent that the server serves, and sends stdout (which the
/// parent's caller may be reading to its end) to /dev/null.
fn ready(tx: std::os::fd::OwnedFd) {
    let mut f = std::fs::File::from(tx);
    let _ = f.write_all(b"1");
    drop(f);
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = std::io::stdout().flush();
        // SAFETY: dup2 onto fd 1 of a descriptor we own; stdout's Rust handle keeps
        // writing to fd 1, now /dev/null.
        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) };
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    // First, while this process has a single thread.
    let fork_ready = if args.fork {
        Some(fork_and_wait()?)
    } else {
        None
    };
    init_logging(args.log.as_deref(), args.log_format)?;
    let listen = args
        .listen
        .or_else(|| listen_from(args.bind.as_deref(), args.port));
    let rpc = args
        .rpc
        .or_else(|| std::env::var_os("RINGBLK_RPC").map(PathBuf::from));
    let mut resolved = config::resolve(Flags {
        config: args.config,
        listen,
        rpc,
        data_dir: args.data_dir,
        cores: args.cores,
        poll: args.poll,
        poll_us: args.poll_us,
        submit: args.submit,
        volumes: args.volumes,
        max_connections: args.max_connections,
        handshake_timeout_secs: args.handshake_timeout,
        rebind: args.rebind,
        buffer_budget_bytes: args.buffer_budget,
        max_handshakes: args.max_handshakes,
        request_timeout_secs: args.request_timeout,
        max_in_flight: args.max_in_flight,
        commit_queue_depth: args.commit_queue_depth,
        vhost: args.vhost,
        tls: args.tls,
        tls_creds: args.tls_creds,
        tls_verify_peer: args.tls_verify_peer,
        iscsi: args.iscsi,
    })?;
    if args.read_only {
        // The implicit vol0 only when its file exists: a read-only volume is never
        // created, and a data dir with a volume list drops vol0 anyway (`catalog`).
        let implicit = resolved.server.volumes_implicit;
        for v in &mut resolved.server.volumes {
            if !implicit || v.path.as_ref().is_some_and(|p| p.exists()) {
                v.read_only = true;
            }
        }
    }
    if !resolved.rpc_default {
        // The default's directory is made 0700 below; a chosen one is checked.
        config::check_rpc_dir(&resolved.rpc)?;
    }
    if resolved.rpc_default {
        if let Some(dir) = resolved.rpc.parent() {
            use std::os::unix::fs::DirBuilderExt;
            // Private: the socket's mode is set just after bind (see RpcServer).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    raise_nofile_limit(&resolved.server);
    // Everything is checked, the data dir locked and the listener bound before any
    // file is created; dropping `start` on an error undoes what this start created.
    let mut start = startup::prepare(&resolved)?;

    // Block the stop signals before any thread starts so that every thread inherits
    // the mask and only the main thread's sigwait sees them.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let reactors = resolved.server.reactor.cores.len();
    let idle = resolved.server.reactor.idle;
    let listener = start
        .take_listener()
        .ok_or("the NBD listener was not bound")?;
    let server = Server::start_on(resolved.server, listener).map_err(|e| e.to_string())?;
    for v in &resolved.vhost {
        let opts = ringblk_vhost::CreateOptions::default();
        if let Err(e) = server.vhost.create(&v.export, &v.socket, opts) {
            server.shutdown();
            return Err(format!("--vhost {}={}: {e}", v.export, v.socket.display()));
        }
    }
    let methods = Methods::new(server.shared.clone())
        .with_vhost(server.vhost.clone())
        .with_iscsi(server.iscsi.clone());
    let rpc = match RpcServer::start(&resolved.rpc, Arc::new(methods)) {
        Ok(rpc) => rpc,
        Err(e) => {
            server.shutdown();
            return Err(format!(
                "cannot start the RPC socket {}: {}",
                resolved.rpc.display(),
                e.message
            ));
        }
    };
    let lock = start.started();

    print_banner(&server, reactors, &idle.to_string(), &resolved.rpc);
    if let Some(path) = &args.pid_file {
        if let Err(e) = std::fs::write(path, format!("{}\n", std::process::id())) {
            rpc.shutdown();
            server.shutdown();
            return Err(format!("--pid-file {}: {e}", path.display()));
        }
    }
    if let Some(tx) = fork_ready {
        ready(tx);
    }

    let sig = sigs.wait().map_err(|e| format!("sigwait: {e}"))?;
    tracing::info!(signal = ?sig, "stopping: finishing in-flight requests");
    rpc.shutdown();
    let volumes = server.shared.target.registry().list();
    server.shutdown();
    // Like a disk flushing its cache at power-off: everything acknowledged so far
    // becomes durable; backups stay in the data dir for the next start.
    for v in volumes {
        let backups = v.backup_count();
        if backups == 0 {
            continue;
        }
        match v.sync_metadata() {
            Ok(()) if v.persistent() => {
                tracing::info!(
                    volume = v.name(),
                    backups,
                    "backups kept for the next start"
                )
            }
            Ok(()) => tracing::warn!(
                volume = v.name(),
                backups,
                "backups of a mem/null volume end with the server"
            ),
            Err(e) => tracing::error!(volume = v.name(), error = %e, "final commit failed"),
        }
    }
    // Only now may another server use the data dir.
    if let Some(lock) = lock {
        lock.release();
    }
    if let Some(path) = &args.pid_file {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Raises the soft descriptor limit to the hard one: every connection is a socket,
/// and a 1024 soft limit (the usual default) is below `--max-connections 1024`
/// plus the handshake slots, volumes and rings. Warns when even the hard limit is.
fn raise_nofile_limit(server: &ringblk_server::server::ServerConfig) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    // An unlimited hard limit cannot be the soft one (the kernel caps descriptors at
    // fs.nr_open, 1 Mi by default).
    let want = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads one rlimit struct that we own; raising the soft
        // limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return;
        }
    }
    let need = (server.max_connections + server.admission.max_handshakes) as u64 + 256;
    if lim.rlim_max < need {
        tracing::warn!(
            "the descriptor limit (RLIMIT_NOFILE {}) is below what --max-connections {} needs (about {need}); raise it (ulimit -n) or lower --max-connections",
            lim.rlim_max,
            server.max_connections
        );
    }
}

fn print_banner(server: &Server, reactors: usize, idle: &str, rpc: &std::path::Path) {
    let (uri_base, host_port) = match &server.local_addr {
        ListenAddr::Tcp(a) => (format!("nbd://{a}"), Some(a.to_string())),
        ListenAddr::Unix(p) => (format!("nbd+unix://?socket={}", p.display()), None),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "ringblk {}: listening on {} with {reactors} reactor(s) ({idle}); RPC {}",
        env!("CARGO_PKG_VERSION"),
        server.local_addr,
        rpc.display()
    );
    let vols = server.shared.target.registry().list();
    let _ = writeln!(out, "exports:");
    for v in &vols {
        let path = v
            .spec()
            .path
            .as_ref()
            .map_or_else(|| "-".to_string(), |p| p.display().to_string());
        let _ = writeln!(
            out,
            "  {:<12} {:>10}  {}-byte blocks  {:<5} {}{}",
            v.name(),
            human(v.size_bytes()),
            v.block_size(),
            v.backend_kind(),
            path,
            if v.read_only() { "  (read-only)" } else { "" }
        );
    }
    if let (Some(i), Some(a)) = (&server.iscsi, &server.iscsi_addr) {
        let _ = writeln!(out, "iSCSI portal on {a}:");
        for (name, _, _) in i.targets() {
            let _ = writeln!(out, "  iscsi://{a}/{name}/0");
        }
    }
    let vhost = server.vhost.list();
    if !vhost.is_empty() {
        let _ = writeln!(out, "vhost-user:");
        for e in &vhost {
            let _ = writeln!(
                out,
                "  {:<12} {}  {} queue(s){}",
                e.export,
                e.socket.display(),
                e.num_queues,
                if e.read_only { "  (read-only)" } else { "" }
            );
        }
    }
    if let Some(v) = vols.first() {
        let uri = match &host_port {
            Some(_) => format!("{uri_base}/{}", v.name()),
            None => match &server.local_addr {
                ListenAddr::Unix(p) => format!("nbd+unix:///{}?socket={}", v.name(), p.display()),
                ListenAddr::Tcp(_) => uri_base.clone(),
            },
        };
        let size = v.size_bytes().min(1 << 30);
        let _ = writeln!(out, "try:");
        let _ = writeln!(
            out,
            "  fio --name=ringblk --ioengine=nbd --uri={uri} --rw=randrw --bs=4k --iodepth=32 --size={size} --time_based --runtime=10"
        );
        let _ = writeln!(out, "  qemu-img info {uri}");
    }
    let _ = out.flush();
}
