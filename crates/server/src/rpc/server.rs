//! The Unix socket transport: an accept thread and one thread per connection.
//!
//! See the parent module's docs for the threads, bounds and error rules.

use std::cell::Cell;
use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde_json::Value;

use super::protocol::{error_response, handle_value};
use super::{RpcError, RpcHandler};

/// Limits of one server. [`RpcConfig::default`] is what `ringblk serve` uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcConfig {
    /// Largest request, counted from the first byte after the previous request (so
    /// whitespace between requests counts too). Larger: -32600, then the connection is
    /// closed, since the rest of the request cannot be skipped reliably.
    pub max_request_bytes: usize,
    /// Connections served at once; one more gets a -32000 reply and is closed.
    pub max_connections: usize,
    /// A connection with no byte received for this long is closed.
    pub idle_timeout: Duration,
    /// A request must arrive complete within this long of its first non-blank byte
    /// (checked when bytes arrive, so the worst case is this plus `idle_timeout`).
    pub request_timeout: Duration,
    /// A reply the client does not read within this long closes the connection.
    pub write_timeout: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: 1 << 20,
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// A running JSON-RPC server on a Unix socket. Dropping it shuts it down as
/// [`RpcServer::shutdown`] does.
pub struct RpcServer {
    path: PathBuf,
    shared: Arc<Shared>,
    /// Dropping this end makes the accept thread's epoll see EOF and return.
    wake: Option<UnixStream>,
    accept: Option<JoinHandle<()>>,
    /// (dev, ino) of the socket file we bound, so shutdown removes only our own file.
    socket_id: Option<(u64, u64)>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.path)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

const LISTENER_TOKEN: u64 = 0;
const WAKE_TOKEN: u64 = 1;
/// Pause after an accept error such as EMFILE, which would otherwise spin the
/// level-triggered epoll loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// The busy reply to a connection over the limit is written from the accept thread, so
/// it must not wait long for a client that does not read.
const REJECT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

impl RpcServer {
    /// Binds `path` with [`RpcConfig::default`]; see [`RpcServer::start_with_config`].
    pub fn start(path: &Path, handler: Arc<dyn RpcHandler>) -> Result<RpcServer, RpcError> {
        Self::start_with_config(path, handler, RpcConfig::default())
    }

    /// Binds `path`, sets its mode to 0600 and spawns the accept thread.
    ///
    /// An existing socket file is replaced only if nothing answers on it (a stale file
    /// left by a crash); a live server there is refused with -98 (EADDRINUSE), and a path
    /// that is not a socket is never removed (-17, EEXIST). Other failures carry the
    /// negative errno of the failed call.
    ///
    /// The mode is set right after `bind`, so for that instant the socket has the mode the
    /// umask gives it; keep the socket's directory private (0700) to close that window.
    pub fn start_with_config(
        path: &Path,
        handler: Arc<dyn RpcHandler>,
        config: RpcConfig,
    ) -> Result<RpcServer, RpcError> {
        assert!(config.max_request_bytes > 0 && config.max_connections > 0);
        assert!(!config.idle_timeout.is_zero() && !config.write_timeout.is_zero());
        let shown = path.display();
        remove_stale_socket(path)?;
        let listener =
            UnixListener::bind(path).map_err(|e| RpcError::from_io(format!("bind {shown}"), &e))?;
        // From here on, a failure must not leave our socket file behind.
        let cleanup = |err: RpcError| {
            let _ = fs::remove_file(path);
            err
        };
        let io = |what: &'static str| move |e: io::Error| RpcError::from_io(what, &e);
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| cleanup(RpcError::from_io(format!("chmod 0600 {shown}"), &e)))?;
        let meta = fs::metadata(path)
            .map_err(|e| cleanup(RpcError::from_io(format!("stat {shown}"), &e)))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| cleanup(io("set_nonblocking")(e)))?;
        let (wake, wake_rx) = UnixStream::pair().map_err(|e| cleanup(io("socketpair")(e)))?;
        let epoll = new_epoll(&listener, &wake_rx).map_err(cleanup)?;
        let shared = Arc::new(Shared {
            handler,
            config,
            conns: Mutex::new(Connections::default()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("rpc-accept".into())
            .spawn(move || {
                accept_loop(&epoll, &listener, &accept_shared);
                // Closed only now: while the thread runs, the wake pair must stay open.
                drop(wake_rx);
            })
            .map_err(|e| cleanup(io("spawn rpc-accept")(e)))?;
        tracing::info!(path = %shown, "JSON-RPC server listening");
        Ok(RpcServer {
            path: path.to_owned(),
            shared,
            wake: Some(wake),
            accept: Some(accept),
            socket_id: Some((meta.dev(), meta.ino())),
        })
    }

    /// The socket path this server is bound to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes every connection, removes the socket file and joins all
    /// threads. A handler call in progress is waited for (handlers are expected to
    /// return promptly; the control plane never blocks on the data path).
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Idempotent: every step takes what it tears down.
    fn stop(&mut self) {
        drop(self.wake.take());
        if let Some(accept) = self.accept.take() {
            if accept.join().is_err() {
                tracing::error!("rpc-accept thread panicked");
            }
        }
        let threads = {
            // The accept thread has been joined, so no connection can be added now.
            let mut conns = self.shared.lock_conns();
            for stream in conns.live.values() {
                // Wakes a connection blocked in read (EOF) or write (EPIPE).
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("rpc connection thread panicked");
            }
        }
        if let Some((dev, ino)) = self.socket_id.take() {
            // Remove the file only if it is still the socket we bound: an operator may
            // have removed it and started another server in the meantime.
            match fs::symlink_metadata(&self.path) {
                Ok(meta) if meta.dev() == dev && meta.ino() == ino => {
                    if let Err(e) = fs::remove_file(&self.path) {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot remove RPC socket");
                    }
                }
                _ => {}
            }
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes `path` if it is a socket nobody listens on; refuses a live one.
fn remove_stale_socket(path: &Path) -> Result<(), RpcError> {
    let shown = path.display();
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RpcError::from_io(format!("stat {shown}"), &e)),
    };
    if !meta.file_type().is_socket() {
        return Err(RpcError::exists(format!(
            "{shown} exists and is not a socket; refusing to replace it"
        )));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(RpcError::errno(
            libc::EADDRINUSE,
            format!("another server is already listening on {shown}"),
        )),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            tracing::info!(path = %shown, "removing stale RPC socket");
            match fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    Err(RpcError::from_io(format!("remove stale {shown}"), &e))
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(RpcError::from_io(format!("probe {shown}"), &e)),
    }
}

fn new_epoll(listener: &UnixListener, wake_rx: &UnixStream) -> Result<Epoll, RpcError> {
    let errno = |what: &str, e: Errno| RpcError::errno(e as i32, format!("{what}: {e}"));
    let epoll =
        Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| errno("epoll_create", e))?;
    epoll
        .add(
            listener.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN),
        )
        .map_err(|e| errno("epoll_ctl", e))?;
    epoll
        .add(
            wake_rx.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN),
        )
        .map_err(|e| errno("epoll_ctl", e))?;
    Ok(epoll)
}

struct Shared {
    handler: Arc<dyn RpcHandler>,
    config: RpcConfig,
    conns: Mutex<Connections>,
}

#[derive(Default)]
struct Connections {
    next_id: u64,
    /// A clone of every open connection's stream, for shutdown to close.
    live: HashMap<u64, UnixStream>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    /// Never blocks for long (no I/O under it), and a poisoned lock is still usable:
    /// the map is updated in single steps that leave it consistent.
    fn lock_conns(&self) -> MutexGuard<'_, Connections> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn accept_loop(epoll: &Epoll, listener: &UnixListener, shared: &Arc<Shared>) {
    let mut events = [EpollEvent::empty(); 2];
    loop {
        let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed; RPC server stops accepting");
                return;
            }
        };
        if events[..ready].iter().any(|ev| ev.data() == WAKE_TOKEN) {
            return;
        }
        accept_pending(listener, shared);
    }
}

fn accept_pending(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => admit(shared, stream),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e)
                if e.kind() == ErrorKind::Interrupted
                    || e.raw_os_error() == Some(libc::ECONNABORTED) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                thread::sleep(ACCEPT_ERROR_BACKOFF);
                return;
            }
        }
    }
}

/// Registers a connection and spawns its thread, or turns it away when at the limit.
fn admit(shared: &Arc<Shared>, stream: UnixStream) {
    let config = &shared.config;
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(config.idle_timeout)))
        .and_then(|()| stream.set_write_timeout(Some(config.write_timeout)))
        .and_then(|()| stream.try_clone());
    let clone = match setup {
        Ok(clone) => clone,
        Err(e) => {
            tracing::warn!(error = %e, "cannot set up RPC connection");
            return;
        }
    };
    let mut conns = shared.lock_conns();
    conns.threads.retain(|thread| !thread.is_finished());
    if conns.live.len() >= config.max_connections {
        let live = conns.live.len();
        drop(conns);
        tracing::warn!(live, "RPC connection refused: too many connections");
        reject(&stream, config.max_connections);
        return;
    }
    let id = conns.next_id;
    conns.next_id += 1;
    conns.live.insert(id, clone);
    let conn_shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("rpc-conn-{id}"))
        .spawn(move || {
            let _registration = Registration {
                shared: &conn_shared,
                id,
            };
            serve_connection(&conn_shared, &stream);
        });
    match spawned {
        Ok(thread) => conns.threads.push(thread),
        Err(e) => {
            conns.live.remove(&id);
            tracing::warn!(error = %e, "cannot spawn RPC connection thread");
        }
    }
}

fn reject(stream: &UnixStream, limit: usize) {
    let err = RpcError::new(
        RpcError::SERVER_BUSY,
        format!("too many connections (limit {limit}); try again later"),
    );
    let _ = stream.set_write_timeout(Some(REJECT_WRITE_TIMEOUT));
    let _ = write_reply(stream, &error_response(Value::Null, &err));
}

/// Deregisters a connection when its thread ends, even by a panic, so a bug cannot
/// leak a slot of the connection limit.
struct Registration<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.lock_conns().live.remove(&self.id);
    }
}

/// Serves requests on one connection until EOF, an error or shutdown.
fn serve_connection(shared: &Shared, stream: &UnixStream) {
    let budget = Rc::new(Budget::new(&shared.config));
    let reader = BoundedReader {
        inner: BufReader::new(stream),
        budget: Rc::clone(&budget),
    };
    let mut values = serde_json::Deserializer::from_reader(reader).into_iter::<Value>();
    loop {
        match values.next() {
            None => return,
            Some(Ok(value)) => {
                budget.reset();
                if let Some(reply) = handle_value(shared.handler.as_ref(), value) {
                    if let Err(e) = write_reply(stream, &reply) {
                        tracing::debug!(error = %e, "RPC client went away before the reply");
                        return;
                    }
                }
            }
            Some(Err(err)) => {
                if let Some(reply_err) = read_error_reply(err, &budget, &shared.config) {
                    let _ = write_reply(stream, &error_response(Value::Null, &reply_err));
                }
                return;
            }
        }
    }
}

/// What to tell the client when reading a request failed; the connection closes either
/// way, since after a syntax error or a cut-off request the stream cannot be resynced.
fn read_error_reply(
    err: serde_json::Error,
    budget: &Budget,
    config: &RpcConfig,
) -> Option<RpcError> {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Data => {
            Some(RpcError::parse_error(format!("parse error: {err}")))
        }
        Category::Eof => Some(RpcError::parse_error(
            "parse error: connection closed in the middle of a request",
        )),
        Category::Io => {
            let io_err = io::Error::from(err);
            let limit = io_err
                .get_ref()
                .and_then(|e| e.downcast_ref::<LimitExceeded>());
            match (limit, io_err.kind()) {
                (Some(LimitExceeded::Size), _) => Some(
                    RpcError::invalid_request(format!(
                        "request exceeds {} bytes",
                        config.max_request_bytes
                    ))
                    .with_data(serde_json::json!({"max_request_bytes": config.max_request_bytes})),
                ),
                (Some(LimitExceeded::Time), _) => Some(RpcError::invalid_request(format!(
                    "request not received within {:?}",
                    config.request_timeout
                ))),
                (None, ErrorKind::WouldBlock | ErrorKind::TimedOut) if budget.in_request() => {
                    Some(RpcError::invalid_request(format!(
                        "request stalled for {:?}",
                        config.idle_timeout
                    )))
                }
                (None, kind) => {
                    tracing::debug!(?kind, error = %io_err, "RPC connection closed");
                    None
                }
            }
        }
    }
}

fn write_reply(mut stream: &UnixStream, reply: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(reply).map_err(io::Error::from)?;
    bytes.push(b'\n');
    stream.write_all(&bytes)?;
    stream.flush()
}

/// Per-request byte and time budget shared between the reader (which spends it) and the
/// connection loop (which resets it after each complete request).
struct Budget {
    max_bytes: usize,
    request_timeout: Duration,
    used_bytes: Cell<usize>,
    /// When the current request's first non-blank byte arrived.
    started: Cell<Option<Instant>>,
}

impl Budget {
    fn new(config: &RpcConfig) -> Self {
        Self {
            max_bytes: config.max_request_bytes,
            request_timeout: config.request_timeout,
            used_bytes: Cell::new(0),
            started: Cell::new(None),
        }
    }

    fn reset(&self) {
        self.used_bytes.set(0);
        self.started.set(None);
    }

    fn in_request(&self) -> bool {
        self.started.get().is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LimitExceeded {
    Size,
    Time,
}

impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitExceeded::Size => "request too large",
            LimitExceeded::Time => "request too slow",
        })
    }
}

impl std::error::Error for LimitExceeded {}

/// A reader that fails once the current request has used its byte or time budget.
/// It sits *above* the `BufReader`, so it counts bytes the parser consumed, not bytes
/// the kernel happened to deliver together with them.
struct BoundedReader<R> {
    inner: R,
    budget: Rc<Budget>,
}

impl<R: Read> Read for BoundedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let budget = &*self.budget;
        if let Some(started) = budget.started.get() {
            if started.elapsed() > budget.request_timeout {
                return Err(io::Error::new(ErrorKind::TimedOut, LimitExceeded::Time));
            }
        }
        let left = budget.max_bytes.saturating_sub(budget.used_bytes.get());
        if left == 0 {
            return Err(io::Error::new(ErrorKind::InvalidData, LimitExceeded::Size));
        }
        let len = buf.len().min(left);
        let n = self.inner.read(&mut buf[..len])?;
        budget.used_bytes.set(budget.used_bytes.get() + n);
        if budget.started.get().is_none() && buf[..n].iter().any(|b| !b.is_ascii_whitespace()) {
            budget.started.set(Some(Instant::now()));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(data: &'static [u8], max_bytes: usize) -> BoundedReader<&'static [u8]> {
        let config = RpcConfig {
            max_request_bytes: max_bytes,
            ..RpcConfig::default()
        };
        BoundedReader {
            inner: data,
            budget: Rc::new(Budget::new(&config)),
        }
    }

    #[test]
    fn bounded_reader_stops_at_the_limit() {
        let mut reader = bounded(b"0123456789", 4);
        let mut buf = [0u8; 16];
        assert_eq!(reader.read(&mut buf).ok(), Some(4));
        let err = reader.read(&mut buf).err();
        let kind = err
            .as_ref()
            .and_then(|e| e.get_ref()?.downcast_ref::<LimitExceeded>());
        assert_eq!(kind, Some(&LimitExceeded::Size));
        reader.budget.reset();
        assert_eq!(reader.read(&mut buf).ok(), Some(4));
    }

    #[test]
    fn whitespace_does_not_start_the_request_clock() {
        let mut reader = bounded(b"\n \r\n{", 100);
        let mut buf = [0u8; 4];
        assert_eq!(reader.read(&mut buf).ok(), Some(4));
        assert!(!reader.budget.in_request());
        assert_eq!(reader.read(&mut buf).ok(), Some(1));
        assert!(reader.budget.in_request());
    }
}
