//! One NBD connection on one reactor: handshake, then the transmission phase.
//!
//! The protocol itself is the sans-IO [`ringblk_nbd`] codec; this module moves bytes
//! between it, the socket and the backend with reactor operations.
//!
//! # Ownership
//! A connection lives in an `Rc<RefCell<Conn>>` held by its reactor's connection set
//! and by the callbacks of its in-flight operations. Request buffers move into the
//! reactor's slab while the kernel uses them and come back in the completion.
//!
//! # Ordering
//! Requests execute concurrently and reply in completion order (NBD allows any
//! order; cookies match them up). At most one receive and one send are outstanding
//! per socket, so bytes are never reordered on the wire.
//!
//! # Bounds
//! A connection executes at most [`MAX_IN_FLIGHT`] requests and holds at most
//! [`MAX_IN_FLIGHT_BYTES`] of request buffers (one request may overshoot), counting
//! replies queued but not yet sent; past either it stops reading from the socket until
//! replies go out — TCP back-pressure, never unbounded queues. Every queued reply byte
//! counts (`unsent_bytes`): data replies, but also the greeting and handshake replies,
//! acknowledgements of zero-length requests and errors of refused ones. Those not
//! backed by the buffer budget are bounded on their own by [`REPLY_QUEUE_MAX_BYTES`]
//! (small replies are coalesced, so memory follows the count), so a client that
//! sends headers and never reads makes the server stop reading, not grow.
//!
//! # Buffer budget
//! A READ or WRITE takes its length from the server-wide budget (`admission`) when
//! its header is decoded; the connection stops reading while it waits (FIFO). The
//! connection gives bytes back as soon as it holds more than its executing requests
//! and unsent replies still use (`budget_held <= in_flight_bytes + unsent_bytes`
//! after every change), and all of it when it closes. A WRITE buffer is allocated
//! when the budget is granted, but large buffers are lazily mapped memory (see
//! `AlignedBuf`): a header whose payload never comes costs no memory.
//!
//! # Timeouts
//! The handshake has `handshake_timeout`. In transmission, a connection stalled on
//! its client — a WRITE payload or a refused payload being read with no byte for
//! `request_timeout`, or replies holding budget that the client does not read — is
//! closed (`request_timeouts`); time spent waiting on the server (budget, disk) does
//! not count. Progress is any byte received or sent, and on TCP any byte the peer
//! acknowledged (a large send completes only once all of it is out).
//!
//! # Closing
//! The socket descriptor is closed only when no receive or send referencing it is
//! in flight, so a reused descriptor number can never receive a stale operation.
//! An aborting connection cancels its receive and its send (a client that does not
//! read would otherwise hold the send, and the connection, forever), and gives its
//! whole budget back once closed.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ringblk_reactor::{falloc, AlignedBuf, Completion, FileRef, IoBuf, Op, OpId, Reactor, TimerId};

use crate::admission::{count, Waiter};
use crate::datapath::layered as io;
use crate::error::BlockError;
use crate::extent::{Extent, ExtentFlags};
use crate::fault::Fault;
use crate::image::{Delta, StackPin};
use crate::latency;
use crate::ops::IoKind;
use crate::server::ServerShared;
use crate::volume::{bump, Volume, META_CHANGED_PREFIX};
use ringblk_nbd::codec::{
    Command, CommandFlags, Event, Request, RequestPolicy, TransmissionDecoder, Unaligned,
};
use ringblk_nbd::handshake::{Handshake, HandshakeLimits, MetaContext, Status};
use ringblk_nbd::{proto, reply, NbdErrno};

/// Requests executing at once per connection.
pub const MAX_IN_FLIGHT: usize = 256;
/// Request buffer bytes held at once per connection.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// Receive buffer per connection.
const RX_BUF_BYTES: usize = 256 * 1024;
/// Replies gathered into one sendmsg at most.
const SEND_BATCH: usize = 64;
/// Largest piece a partially sent buffer's tail is copied into.
const PARTIAL_SEND_PIECE: usize = 256 * 1024;
/// Queued reply bytes not backed by the buffer budget (acknowledgements, errors,
/// handshake replies, READ headers) at which a connection stops reading.
const REPLY_QUEUE_MAX_BYTES: usize = 256 * 1024;
/// Small replies are appended to the last queued one up to this size, so that a
/// queue of tiny replies costs its bytes, not an allocation each.
const COALESCE_MAX_BYTES: usize = 64 * 1024;
/// Extents per BLOCK_STATUS reply at most.
const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;
/// Chunk size of the write-zeros fallback (when fallocate cannot zero).
const ZERO_FILL_CHUNK: u64 = 1024 * 1024;

type ConnRef = Rc<RefCell<Conn>>;

enum Reply {
    Bytes(Vec<u8>),
    Data {
        header: Vec<u8>,
        buf: IoBuf,
        len: usize,
    },
}

impl Reply {
    fn len(&self) -> usize {
        match self {
            Reply::Bytes(b) => b.len(),
            Reply::Data { header, len, .. } => header.len() + len,
        }
    }
}

enum Phase {
    Handshake(Box<Handshake>),
    Transmission(Box<Transmission>),
}

struct Transmission {
    volume: Arc<Volume>,
    /// `Some(name)` on a backup's read-only export `VOL@NAME`.
    backup: Option<String>,
    file: Option<FileRef>,
    structured: bool,
    contexts: Vec<MetaContext>,
    decoder: TransmissionDecoder,
    /// The WRITE whose payload is arriving.
    cur_write: Option<(Request, IoBuf, usize)>,
    /// Error reply to a refused WRITE, held until the decoder has drained its payload:
    /// a client still sending that payload (libnbd) cannot match a reply to it yet.
    refused_write_reply: Option<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Open,
    /// No more requests (DISC, EOF, shutdown): finish in-flight work, flush, close.
    Draining,
    /// Protocol violation or socket error: finish in-flight ops, send nothing, close.
    Aborting,
    Closed,
}

pub(crate) struct Conn {
    id: u64,
    sock: Option<OwnedFd>,
    sref: FileRef,
    shared: Arc<ServerShared>,
    phase: Phase,
    state: State,
    rx: Option<Vec<u8>>,
    rx_start: usize,
    rx_end: usize,
    recv_op: Option<OpId>,
    in_flight: usize,
    in_flight_bytes: usize,
    /// Bytes of replies queued by `finish` and not yet sent (part of the budget).
    unsent_bytes: usize,
    tx: VecDeque<Reply>,
    send_outstanding: bool,
    /// The outstanding sendmsg, cancelled when the connection aborts (a client that
    /// does not read would otherwise keep it, and the connection, forever).
    send_op: Option<OpId>,
    /// Bytes of the outstanding sendmsg.
    sending_bytes: usize,
    handshake_timer: Option<TimerId>,
    /// Bytes held from the server-wide buffer budget (module docs).
    budget_held: usize,
    /// A decoded READ or WRITE waiting for budget; the connection reads nothing more
    /// until it is granted.
    budget_wait: Option<Request>,
    /// When bytes last moved on the socket, or a receive or send was posted.
    last_progress: Instant,
    /// Bytes the TCP peer had acknowledged at the last stall check.
    acked_seen: u64,
    stall_timer: Option<TimerId>,
    /// This pause was counted already (counted once per pause, by reason).
    pause_counted: bool,
    /// When each executing request started, by cookie, for the latency histograms
    /// (at most `MAX_IN_FLIGHT` entries; a client reusing an in-flight cookie loses
    /// that sample rather than corrupting another).
    started: HashMap<u64, Instant>,
}

/// The connections of one reactor (reactor-local state).
#[derive(Default)]
pub(crate) struct ReactorConns {
    /// By server-wide connection id (`admission`).
    map: RefCell<HashMap<u64, ConnRef>>,
}

fn conns(r: &Reactor) -> Rc<ReactorConns> {
    // `install` runs on every server reactor; a reactor without it (a test's) simply
    // has no connections.
    r.local::<ReactorConns>().unwrap_or_default()
}

pub(crate) fn install(r: &mut Reactor) {
    r.set_local(Rc::new(ReactorConns::default()));
    r.on_stop(|r| {
        let all: Vec<ConnRef> = conns(r).map.borrow().values().cloned().collect();
        for c in all {
            begin_close(r, &c, State::Draining);
        }
    });
}

/// Closes (cleanly) every connection to backup export `volume@backup` here.
pub(crate) fn close_backup(r: &mut Reactor, volume: &str, backup: &str) {
    let all: Vec<ConnRef> = conns(r).map.borrow().values().cloned().collect();
    for c in all {
        let matches = matches!(&c.borrow().phase,
            Phase::Transmission(t) if t.volume.name() == volume && t.backup.as_deref() == Some(backup));
        if matches {
            begin_close(r, &c, State::Draining);
        }
    }
}

/// Closes (cleanly) every connection to `volume` on this reactor.
pub(crate) fn close_volume(r: &mut Reactor, volume: &str) {
    let all: Vec<ConnRef> = conns(r).map.borrow().values().cloned().collect();
    for c in all {
        let matches =
            matches!(&c.borrow().phase, Phase::Transmission(t) if t.volume.name() == volume);
        if matches {
            begin_close(r, &c, State::Draining);
        }
    }
}

/// Closes connection `id` if it is still negotiating: it was made to give way to a
/// new connection at the handshake limit (`server::accepted`).
pub(crate) fn evict_handshake(r: &mut Reactor, id: u64) {
    let Some(c) = conns(r).map.borrow().get(&id).cloned() else {
        return;
    };
    let negotiating = matches!(c.borrow().phase, Phase::Handshake(_));
    if negotiating {
        tracing::debug!(conn = id, "negotiation closed to make way for a new client");
        begin_close(r, &c, State::Aborting);
    }
}

/// Takes over an accepted socket on this reactor and starts the handshake. `id` is
/// the server-wide connection id its handshake slot was admitted under.
pub(crate) fn start(r: &mut Reactor, shared: Arc<ServerShared>, sock: OwnedFd, id: u64) {
    let set = conns(r);
    let hs = Handshake::new(HandshakeLimits::default());
    let sref = FileRef::Raw(sock.as_raw_fd());
    let timeout = shared.handshake_timeout;
    let conn = Rc::new(RefCell::new(Conn {
        id,
        sock: Some(sock),
        sref,
        shared,
        phase: Phase::Handshake(Box::new(hs)),
        state: State::Open,
        rx: Some(vec![0u8; RX_BUF_BYTES]),
        rx_start: 0,
        rx_end: 0,
        recv_op: None,
        in_flight: 0,
        in_flight_bytes: 0,
        unsent_bytes: 0,
        tx: VecDeque::new(),
        send_outstanding: false,
        send_op: None,
        sending_bytes: 0,
        handshake_timer: None,
        budget_held: 0,
        budget_wait: None,
        last_progress: Instant::now(),
        acked_seen: 0,
        stall_timer: None,
        pause_counted: false,
        started: HashMap::new(),
    }));
    set.map.borrow_mut().insert(id, conn.clone());
    // A client that stalls in the handshake is dropped after a bounded time.
    let weak = Rc::downgrade(&conn);
    let t = r.add_timer(timeout, move |r| {
        if let Some(c) = weak.upgrade() {
            let stalled = matches!(c.borrow().phase, Phase::Handshake(_));
            if stalled {
                tracing::info!(conn = id, "handshake timed out; closing");
                begin_close(r, &c, State::Aborting);
            }
        }
    });
    {
        let mut cb = conn.borrow_mut();
        cb.handshake_timer = Some(t);
        let greeting = match &mut cb.phase {
            Phase::Handshake(hs) => hs.take_output(),
            Phase::Transmission(_) => Vec::new(),
        };
        queue_bytes(&mut cb, greeting);
    }
    kick_send(r, &conn);
    post_recv(r, &conn);
}

/// Why a connection stopped reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pause {
    /// A request waits for the buffer budget (counted when it starts waiting).
    Budget,
    /// The connection's own in-flight bounds.
    Bounds,
    /// Too many reply bytes not backed by the budget (a client not reading).
    Replies,
}

fn pause_reason(c: &Conn) -> Option<Pause> {
    if c.budget_wait.is_some() {
        Some(Pause::Budget)
    } else if c.in_flight >= MAX_IN_FLIGHT
        || c.in_flight_bytes + c.unsent_bytes >= MAX_IN_FLIGHT_BYTES
    {
        Some(Pause::Bounds)
    } else if (c.in_flight_bytes + c.unsent_bytes).saturating_sub(c.budget_held)
        >= REPLY_QUEUE_MAX_BYTES
    {
        Some(Pause::Replies)
    } else {
        None
    }
}

fn paused(c: &Conn) -> bool {
    pause_reason(c).is_some()
}

/// Counts a pause once, when it begins (server `stats`).
fn note_pause(c: &mut Conn) {
    let reason = match pause_reason(c) {
        Some(r) if c.state == State::Open => r,
        _ => {
            c.pause_counted = false;
            return;
        }
    };
    if c.pause_counted {
        return;
    }
    c.pause_counted = true;
    let counters = &c.shared.admission.counters;
    match reason {
        Pause::Budget => {}
        Pause::Bounds => count(&counters.connection_bound_pauses),
        Pause::Replies => count(&counters.reply_queue_pauses),
    }
}

/// Queues reply bytes, counted in `unsent_bytes` and appended to the last queued
/// reply when that one is small (module docs: bounds).
fn queue_bytes(c: &mut Conn, bytes: Vec<u8>) {
    push_small(&mut c.tx, &mut c.unsent_bytes, bytes);
}

/// [`queue_bytes`] on the two fields, for callers that borrow other parts of `Conn`.
fn push_small(tx: &mut VecDeque<Reply>, unsent_bytes: &mut usize, bytes: Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    *unsent_bytes += bytes.len();
    if let Some(Reply::Bytes(last)) = tx.back_mut() {
        if last.len() + bytes.len() <= COALESCE_MAX_BYTES {
            last.extend_from_slice(&bytes);
            return;
        }
    }
    tx.push_back(Reply::Bytes(bytes));
}

/// Drops every queued reply (the connection aborts); only the outstanding send's
/// bytes stay counted, until it completes.
fn clear_tx(c: &mut Conn) {
    c.tx.clear();
    c.unsent_bytes = if c.send_outstanding {
        c.sending_bytes
    } else {
        0
    };
}

fn post_recv(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    if c.state != State::Open || c.recv_op.is_some() || paused(&c) || c.rx_start < c.rx_end {
        return;
    }
    let Some(buf) = c.rx.take() else { return };
    c.rx_start = 0;
    c.rx_end = 0;
    let len = buf.len() as u32;
    let conn2 = conn.clone();
    match r.submit(Op::recv(c.sref, buf, 0, len), move |r, comp| {
        on_recv(r, &conn2, comp)
    }) {
        Ok(id) => {
            c.recv_op = Some(id);
            c.last_progress = Instant::now();
            let watch = stalled_on_client(&c) && c.stall_timer.is_none();
            drop(c);
            if watch {
                arm_stall_timer(r, conn);
            }
        }
        Err(rej) => {
            // Slab full: the reactor is saturated. Retry when a buffer frees up.
            c.rx = rej.op.into_buf().and_then(|b| match b {
                IoBuf::Vec(v) => Some(v),
                _ => None,
            });
            drop(c);
            let conn2 = conn.clone();
            r.add_timer(std::time::Duration::from_micros(50), move |r| {
                post_recv(r, &conn2)
            });
        }
    }
}

fn on_recv(r: &mut Reactor, conn: &ConnRef, comp: Completion) {
    let n = comp.result;
    {
        let mut c = conn.borrow_mut();
        c.recv_op = None;
        c.rx = match comp.op.into_buf() {
            Some(IoBuf::Vec(v)) => Some(v),
            _ => Some(vec![0u8; RX_BUF_BYTES]),
        };
        if n > 0 {
            c.rx_end = n as usize;
            c.last_progress = Instant::now();
        }
    }
    if n == 0 {
        // EOF: the client went away (possibly mid-payload); finish and close.
        begin_close(r, conn, State::Draining);
        return;
    }
    if n < 0 {
        if -n != libc::ECANCELED {
            tracing::debug!(conn = conn.borrow().id, errno = -n, "recv failed");
        }
        begin_close(r, conn, State::Aborting);
        return;
    }
    process(r, conn);
}

/// Feeds received bytes to the protocol until they run out or the connection pauses.
fn process(r: &mut Reactor, conn: &ConnRef) {
    loop {
        let (more, handshake) = {
            let c = conn.borrow();
            let more = c.state == State::Open && c.rx_start < c.rx_end && !paused(&c);
            (more, matches!(c.phase, Phase::Handshake(_)))
        };
        if !more {
            break;
        }
        let ok = if handshake {
            process_handshake(r, conn)
        } else {
            process_transmission(r, conn)
        };
        if !ok {
            break;
        }
    }
    note_pause(&mut conn.borrow_mut());
    kick_send(r, conn);
    post_recv(r, conn);
    maybe_finish(r, conn);
}

/// Runs the handshake on buffered input; false stops processing.
fn process_handshake(r: &mut Reactor, conn: &ConnRef) -> bool {
    let mut c = conn.borrow_mut();
    let c = &mut *c;
    let Phase::Handshake(hs) = &mut c.phase else {
        return false;
    };
    let Some(rx) = c.rx.as_ref() else {
        return false;
    };
    let input = &rx[c.rx_start..c.rx_end];
    // Negotiating: the least recently active negotiation gives way first.
    c.shared.admission.handshakes.touch(c.id);
    let res = hs.feed(input, &*c.shared.registry);
    // The handshake's output counts in the reply bound like any reply: a client that
    // pipelines options and never reads stops being read (module docs: bounds).
    let out = hs.take_output();
    push_small(&mut c.tx, &mut c.unsent_bytes, out);
    match res {
        Err(e) => {
            tracing::info!(conn = c.id, error = %e, "handshake failed; closing");
            clear_tx(c);
            c.state = State::Aborting;
            false
        }
        Ok(p) => {
            c.rx_start += p.consumed;
            match p.status {
                Status::NeedInput | Status::OutputFull => true,
                Status::Aborted => {
                    c.state = State::Draining;
                    false
                }
                Status::Done(neg) => {
                    let Some((volume, backup)) = c.shared.registry.resolve(&neg.export.name) else {
                        // Removed between the option and now.
                        c.state = State::Aborting;
                        return false;
                    };
                    if let Some(t) = c.handshake_timer.take() {
                        r.cancel_timer(t);
                    }
                    c.shared.admission.handshakes.remove(c.id);
                    let policy = RequestPolicy::from_negotiated(&neg, Unaligned::Reject);
                    let contexts = neg
                        .meta_contexts
                        .iter()
                        .filter(|m| {
                            m.name == proto::META_BASE_ALLOCATION
                                || m.name.starts_with(META_CHANGED_PREFIX)
                        })
                        .cloned()
                        .collect();
                    volume.connection_opened();
                    tracing::debug!(
                        conn = c.id,
                        export = volume.name(),
                        structured = neg.structured_replies,
                        "negotiated"
                    );
                    c.phase = Phase::Transmission(Box::new(Transmission {
                        file: volume.backend().raw_fd().map(FileRef::Raw),
                        volume,
                        backup,
                        structured: neg.structured_replies,
                        contexts,
                        decoder: TransmissionDecoder::new(policy),
                        cur_write: None,
                        refused_write_reply: None,
                    }));
                    true
                }
            }
        }
    }
}

/// Decodes one event from buffered input and acts on it; false stops processing.
fn process_transmission(r: &mut Reactor, conn: &ConnRef) -> bool {
    let mut c = conn.borrow_mut();
    let cref = &mut *c;
    let Phase::Transmission(t) = &mut cref.phase else {
        return false;
    };
    let Some(rx) = cref.rx.as_ref() else {
        return false;
    };
    let input = &rx[cref.rx_start..cref.rx_end];
    let decoded = match t.decoder.feed(input) {
        Ok(d) => d,
        Err(e) => {
            tracing::info!(conn = cref.id, error = %e, "protocol error; closing");
            cref.state = State::Aborting;
            return false;
        }
    };
    cref.rx_start += decoded.consumed;
    if t.decoder.drain_remaining() == 0 {
        if let Some(out) = t.refused_write_reply.take() {
            // Counted when it was held back; `push_small` counts it again.
            cref.unsent_bytes = cref.unsent_bytes.saturating_sub(out.len());
            push_small(&mut cref.tx, &mut cref.unsent_bytes, out);
        }
    }
    let structured = t.structured;
    match decoded.event {
        None => true,
        Some(Event::Request(req)) if matches!(req.command, Command::Read | Command::Write) => {
            drop(c);
            admit_data(r, conn, req)
        }
        Some(Event::Payload { data, remaining }) => {
            if let Some((_, buf, filled)) = t.cur_write.as_mut() {
                buf.as_mut_slice()[*filled..*filled + data.len()].copy_from_slice(data);
                *filled += data.len();
            }
            if remaining == 0 {
                if let Some((req, buf, _)) = t.cur_write.take() {
                    drop(c);
                    execute(r, conn, req, Some(buf));
                }
            }
            true
        }
        Some(Event::Request(req)) => {
            cref.in_flight += 1;
            drop(c);
            execute(r, conn, req, None);
            true
        }
        Some(Event::NoOp(req)) => {
            let mut out = Vec::new();
            if req.command == Command::Read && structured {
                // A zero-length structured READ still needs a final chunk.
                out.extend_from_slice(&reply::none_chunk(req.cookie));
            } else {
                reply::success_reply(&mut out, structured, req.cookie);
            }
            push_small(&mut cref.tx, &mut cref.unsent_bytes, out);
            true
        }
        Some(Event::Reject { request, errno }) => {
            let mut out = Vec::new();
            reply::error_reply(
                &mut out,
                structured,
                request.cookie,
                errno,
                errno_message(errno),
            );
            bump(&t.volume.counters(r.id()).errors, 1);
            if t.decoder.drain_remaining() > 0 {
                // Counted now: it is memory held until the payload is drained.
                cref.unsent_bytes += out.len();
                t.refused_write_reply = Some(out);
            } else {
                push_small(&mut cref.tx, &mut cref.unsent_bytes, out);
            }
            true
        }
        Some(Event::Disconnect(_)) => {
            cref.state = State::Draining;
            false
        }
    }
}

/// Takes a READ's or WRITE's bytes from the buffer budget and starts it, or parks
/// it until the budget grants them (module docs); false stops processing.
fn admit_data(r: &mut Reactor, conn: &ConnRef, req: Request) -> bool {
    let (granted, woken) = {
        let mut c = conn.borrow_mut();
        let adm = &c.shared.admission;
        // The decoder caps lengths at 32 MiB and the budget is at least that.
        let bytes = (req.length as usize).min(adm.budget.total());
        let me = Waiter {
            reactor: r.id(),
            conn: c.id,
            bytes,
        };
        let (granted, woken) = adm.budget.acquire(me);
        if granted {
            c.budget_held += bytes;
        } else {
            count(&adm.counters.buffer_budget_waits);
            c.budget_wait = Some(req);
        }
        // The shared state is cloned (a contended count) only when someone is woken.
        (
            granted,
            (!woken.is_empty()).then(|| (c.shared.clone(), woken)),
        )
    };
    if let Some((shared, woken)) = woken {
        wake(r, &shared, woken);
    }
    if granted {
        start_data(r, conn, req);
    }
    granted
}

/// A READ or WRITE whose budget is held: a WRITE starts receiving its payload, a
/// READ executes.
fn start_data(r: &mut Reactor, conn: &ConnRef, req: Request) {
    let len = req.length as usize;
    let mut c = conn.borrow_mut();
    c.in_flight += 1;
    c.in_flight_bytes += len;
    if req.command == Command::Write {
        let buf = alloc_buf(r, len, true);
        if let Phase::Transmission(t) = &mut c.phase {
            t.cur_write = Some((req, buf, 0));
        }
        return;
    }
    drop(c);
    execute(r, conn, req, None);
}

/// The budget granted `bytes` to connection `id` (a message from the reactor that
/// released them). Gives them back if the connection no longer waits.
pub(crate) fn budget_granted(r: &mut Reactor, shared: Arc<ServerShared>, id: u64, bytes: usize) {
    let conn = conns(r).map.borrow().get(&id).cloned();
    let req = conn.as_ref().and_then(|c| {
        let mut cb = c.borrow_mut();
        let req = cb.budget_wait.take().filter(|_| cb.state == State::Open)?;
        cb.budget_held += bytes;
        Some(req)
    });
    let (Some(conn), Some(req)) = (conn, req) else {
        return give_back(r, &shared, bytes);
    };
    start_data(r, &conn, req);
    process(r, &conn);
}

/// Returns `bytes` to the budget and wakes the waiters it lets through.
fn give_back(r: &mut Reactor, shared: &Arc<ServerShared>, bytes: usize) {
    let woken = shared.admission.budget.release(bytes);
    wake(r, shared, woken);
}

/// Hands grants to their connections' reactors (by message, also to this one: the
/// caller may hold a connection borrowed).
fn wake(r: &mut Reactor, shared: &Arc<ServerShared>, woken: Vec<Waiter>) {
    for w in woken {
        let sh = shared.clone();
        r.send_to(w.reactor, move |r| budget_granted(r, sh, w.conn, w.bytes));
    }
}

/// Gives back budget this connection holds beyond what its executing requests and
/// unsent replies still use (module docs: buffer budget).
fn release_excess(r: &mut Reactor, conn: &ConnRef) {
    let (shared, woken) = {
        let mut c = conn.borrow_mut();
        let extra = c
            .budget_held
            .saturating_sub(c.in_flight_bytes + c.unsent_bytes);
        if extra == 0 {
            return;
        }
        c.budget_held -= extra;
        let woken = c.shared.admission.budget.release(extra);
        if woken.is_empty() {
            return;
        }
        (c.shared.clone(), woken)
    };
    wake(r, &shared, woken);
}

/// Whether the connection waits on its client in a way that holds resources
/// (module docs: timeouts).
fn stalled_on_client(c: &Conn) -> bool {
    if matches!(c.state, State::Aborting | State::Closed) {
        return false;
    }
    let Phase::Transmission(t) = &c.phase else {
        return false;
    };
    let mid_request =
        c.recv_op.is_some() && (t.cur_write.is_some() || t.decoder.drain_remaining() > 0);
    let unread = c.send_outstanding && c.budget_held > 0;
    mid_request || unread
}

/// Watches a connection stalled on its client; closes it after `request_timeout`
/// without progress. One timer per connection at most, re-armed while it waits.
fn arm_stall_timer(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    if c.stall_timer.is_some() {
        return;
    }
    let timeout = c.shared.admission.config.request_timeout;
    let due = timeout.saturating_sub(c.last_progress.elapsed());
    let weak = Rc::downgrade(conn);
    c.stall_timer = Some(r.add_timer(due, move |r| {
        if let Some(conn) = weak.upgrade() {
            stall_check(r, &conn, timeout);
        }
    }));
}

fn stall_check(r: &mut Reactor, conn: &ConnRef, timeout: std::time::Duration) {
    let expired = {
        let mut c = conn.borrow_mut();
        c.stall_timer = None;
        if !stalled_on_client(&c) {
            return; // re-armed when it waits on the client again
        }
        // A send completes only when all of it is out (io_uring retries a stream
        // socket's partial sends), which takes long for a big batch to a slow
        // reader: on TCP, what the peer acknowledged shows it is still reading.
        if c.send_outstanding {
            if let Some(acked) = tcp_bytes_acked(&c.sref) {
                if acked != c.acked_seen {
                    c.acked_seen = acked;
                    c.last_progress = Instant::now();
                }
            }
        }
        c.last_progress.elapsed() >= timeout
    };
    if !expired {
        return arm_stall_timer(r, conn);
    }
    let (id, shared) = {
        let c = conn.borrow();
        (c.id, c.shared.clone())
    };
    count(&shared.admission.counters.request_timeouts);
    tracing::info!(
        conn = id,
        timeout_s = timeout.as_secs(),
        "request stalled on the client (payload not arriving or replies not read); closing"
    );
    begin_close(r, conn, State::Aborting);
}

/// Bytes the peer of a TCP socket acknowledged so far (`None`: not TCP).
fn tcp_bytes_acked(sock: &FileRef) -> Option<u64> {
    let FileRef::Raw(fd) = *sock else {
        return None;
    };
    // SAFETY: an all-zero tcp_info is a valid value (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own; `fd` is
    // the connection's socket, open while the connection is (it closes in
    // `maybe_finish`, after which no stall check runs).
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Older kernels return a shorter struct without the counter.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
    (rc == 0 && len as usize >= needed).then_some(info.tcpi_bytes_acked)
}

/// The NBD command's block request kind; `None` for DISC and unknown commands, which
/// never reach the block layer (no fault, no latency, `Invalid` at most).
fn io_kind(cmd: Command) -> Option<IoKind> {
    Some(match cmd {
        Command::Read => IoKind::Read,
        Command::Write => IoKind::Write,
        Command::Flush => IoKind::Flush,
        Command::Trim => IoKind::Unmap,
        Command::WriteZeroes => IoKind::WriteZeroes,
        Command::Cache => IoKind::Readahead,
        Command::BlockStatus => IoKind::BlockStatus,
        Command::Disc | Command::Unknown(_) => return None,
    })
}

/// THE mapping from the block layer's errors to NBD's (plan §2.6). `kind` matters only
/// for `OutOfRange`: past the end is ENOSPC for a write-type request (the NBD spec's
/// choice), EINVAL otherwise. Moves to `ringblk_nbd::frontend::errors` in #12 step 5.
fn nbd_errno(kind: IoKind, e: BlockError) -> NbdErrno {
    // No wildcard arm: a new `BlockError` variant must be mapped here on purpose.
    match e {
        BlockError::ReadOnly => NbdErrno::Perm,
        BlockError::NoSpace => NbdErrno::NoSpc,
        BlockError::Invalid => NbdErrno::Inval,
        BlockError::OutOfRange if kind.is_write() => NbdErrno::NoSpc,
        BlockError::OutOfRange => NbdErrno::Inval,
        BlockError::TooLarge => NbdErrno::Overflow,
        BlockError::NotSupported => NbdErrno::NotSup,
        BlockError::Shutdown | BlockError::Removed => NbdErrno::Shutdown,
        // Kernel ENOMEM only: NBD_ENOMEM as before #12 step 1 (plan §2.6 folds it into EIO).
        BlockError::NoMemory => NbdErrno::NoMem,
        // NBD has no compare-and-write: unreachable from this front end.
        BlockError::Io | BlockError::Miscompare { .. } => NbdErrno::Io,
    }
}

/// [`nbd_errno`] for the reply to `cmd`. DISC and unknown commands only ever fail with
/// `Invalid` or `Removed`, for which the kind does not matter.
fn reply_errno(cmd: Command, e: BlockError) -> NbdErrno {
    nbd_errno(io_kind(cmd).unwrap_or(IoKind::Read), e)
}

/// Which NBD metadata context an extent list answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NbdContext {
    /// `base:allocation`: STATE_HOLE and STATE_ZERO.
    BaseAllocation,
    /// `x-ringblk:changed/NAME`: 1 where changed since the backup.
    Changed,
}

/// Block status extents in NBD's wire form for `ctx` (plan §2.9): base:allocation
/// `flags = (UNALLOCATED → STATE_HOLE) | (ZEROES → STATE_ZERO)`, the changed context
/// `flags = CHANGED → 1`. An extent list covers a prefix of the request, whose length
/// is a u32, so every length fits.
fn nbd_extents(ctx: NbdContext, extents: &[Extent]) -> Vec<reply::Extent> {
    extents
        .iter()
        .map(|e| {
            let mut flags = 0;
            match ctx {
                NbdContext::BaseAllocation => {
                    if e.flags.contains(ExtentFlags::UNALLOCATED) {
                        flags |= proto::STATE_HOLE;
                    }
                    if e.flags.contains(ExtentFlags::ZEROES) {
                        flags |= proto::STATE_ZERO;
                    }
                }
                NbdContext::Changed => {
                    if e.flags.contains(ExtentFlags::CHANGED) {
                        flags |= 1;
                    }
                }
            }
            debug_assert!(e.length_bytes <= u64::from(u32::MAX));
            reply::Extent {
                length: u32::try_from(e.length_bytes).unwrap_or(u32::MAX),
                flags,
            }
        })
        .collect()
}

fn errno_message(e: NbdErrno) -> &'static str {
    match e {
        NbdErrno::Perm => "export is read-only",
        NbdErrno::Inval => "invalid request (range, alignment, command or flags)",
        NbdErrno::NoSpc => "request past the end of the export or out of space",
        NbdErrno::Overflow => "request larger than the 32 MiB maximum",
        NbdErrno::NotSup => "fast zeroing is not possible here",
        NbdErrno::Shutdown => "server is shutting down",
        NbdErrno::NoMem => "out of memory",
        NbdErrno::Io => "I/O error",
    }
}

/// A buffer for `len` bytes: a fixed pool buffer when it fits, else aligned heap.
fn alloc_buf(r: &Reactor, len: usize, _direct: bool) -> IoBuf {
    if len <= r.buffers().buf_size() {
        if let Some(b) = r.get_buffer() {
            return b.into();
        }
    }
    AlignedBuf::direct(len).into()
}

fn file_of(conn: &ConnRef) -> (Option<FileRef>, Arc<Volume>, bool) {
    let c = conn.borrow();
    match &c.phase {
        Phase::Transmission(t) => (t.file, t.volume.clone(), t.structured),
        Phase::Handshake(_) => unreachable!("requests exist only in transmission"),
    }
}

fn backup_of(conn: &ConnRef) -> Option<String> {
    match &conn.borrow().phase {
        Phase::Transmission(t) => t.backup.clone(),
        Phase::Handshake(_) => None,
    }
}

/// Starts the I/O for one admitted request: pins the volume's current image stack
/// (the request's epoch) and takes the base fast path when no delta is involved.
fn execute(r: &mut Reactor, conn: &ConnRef, req: Request, payload: Option<IoBuf>) {
    conn.borrow_mut().started.insert(req.cookie, Instant::now());
    let (_, volume, _) = file_of(conn);
    // Injected faults (`fault`): here, where both data paths start, before any I/O.
    // A failed WRITE's payload is dropped with the request: never applied.
    let fault = io_kind(req.command)
        .and_then(|kind| volume.faults.check_fault(kind, req.offset, req.length));
    let delay = match fault {
        Some(Fault::Fail(e)) => {
            count_op(&volume, r.id(), &req);
            return complete(r, conn, req, Err(e));
        }
        Some(Fault::Delay(d)) => Some(d),
        None => None,
    };
    // Write-type requests register their chunks: a later epoch's partial first
    // writes wait only for the ones that overlap theirs (image module docs).
    let pin = Rc::new(match req.command {
        Command::Write | Command::WriteZeroes | Command::Trim => {
            volume.pin_write(r.id(), req.offset, req.length as u64)
        }
        _ => volume.pin(r.id()),
    });
    let layers = match backup_of(conn) {
        None if pin.stack().deltas.is_empty() => None,
        // Writes and flushes of the live volume use the pinned stack itself: no
        // per-request copy of the layer list (an Arc count per delta that every
        // reactor touches); reads and block status take it.
        None if !matches!(req.command, Command::Read | Command::BlockStatus) => Some(Vec::new()),
        None => Some(pin.stack().deltas.clone()),
        Some(b) => match pin.stack().backup_view(&b) {
            Some([]) => None,
            Some(v) => Some(v.to_vec()),
            // Released while this connection was open.
            None => return complete(r, conn, req, Err(BlockError::Removed)),
        },
    };
    // An injected delay holds the request admitted (pinned) before its I/O.
    if let Some(d) = delay {
        let conn = conn.clone();
        r.add_timer(d, move |r| match layers {
            None => execute_base(r, &conn, req, payload, pin),
            Some(layers) => execute_layered(r, &conn, req, payload, pin, layers),
        });
        return;
    }
    match layers {
        None => execute_base(r, conn, req, payload, pin),
        Some(layers) => execute_layered(r, conn, req, payload, pin, layers),
    }
}

/// Requests on a stack with deltas go through the `io` module.
fn execute_layered(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    payload: Option<IoBuf>,
    pin: Rc<StackPin>,
    layers: Vec<Arc<Delta>>,
) {
    let volume = file_of(conn).1;
    count_op(&volume, r.id(), &req);
    bump(&volume.counters(r.id()).layered_ops, 1);
    let fua = req.flags.contains(CommandFlags::FUA);
    let conn2 = conn.clone();
    let pin2 = pin.clone();
    let vol2 = volume.clone();
    // FUA: flush the stack before replying.
    let then_reply: io::Done = Box::new(move |r, res| {
        if fua && res.is_ok() {
            let c3 = conn2.clone();
            io::flush(
                r,
                &vol2,
                pin2,
                Box::new(move |r, res| complete(r, &c3, req, res)),
            );
        } else {
            complete(r, &conn2, req, res)
        }
    });
    match req.command {
        Command::Read => {
            let c2 = conn.clone();
            let (off, len) = (req.offset, req.length);
            io::read(
                r,
                &volume,
                pin,
                layers,
                off,
                len,
                Box::new(move |r, res| complete_read(r, &c2, req, res.map(Some))),
            );
        }
        Command::Write => match payload {
            Some(buf) => io::write(r, &volume, pin, req.offset, buf, req.length, then_reply),
            None => then_reply(r, Err(BlockError::Io)),
        },
        Command::Flush => {
            let c2 = conn.clone();
            io::flush(
                r,
                &volume,
                pin,
                Box::new(move |r, res| complete(r, &c2, req, res)),
            );
        }
        // TRIM is advisory: with deltas the base is shared with backups, so ignore it.
        Command::Trim | Command::Cache => then_reply(r, Ok(())),
        Command::WriteZeroes if req.flags.contains(CommandFlags::FAST_ZERO) => {
            then_reply(r, Err(BlockError::NotSupported))
        }
        Command::WriteZeroes => {
            io::write_zeroes(r, &volume, pin, req.offset, req.length as u64, then_reply)
        }
        Command::BlockStatus => block_status(r, conn, req, &pin, &layers),
        Command::Disc | Command::Unknown(_) => complete(r, conn, req, Err(BlockError::Invalid)),
    }
}

/// The no-delta fast path: one I/O on the base, no map lookups. `pin` rides in the
/// callbacks so the drain of a later switchover waits for this request.
fn execute_base(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    payload: Option<IoBuf>,
    pin: Rc<StackPin>,
) {
    let (file, volume, _) = file_of(conn);
    let ctr = volume.counters(r.id());
    let fua = req.flags.contains(CommandFlags::FUA);
    let Some(file) = file else {
        // Null backend: no I/O at all.
        match req.command {
            Command::Read => {
                bump(&ctr.read_ops, 1);
                bump(&ctr.read_bytes, req.length as u64);
                complete_read(r, conn, req, Ok(None));
            }
            // BLOCK_STATUS needs its extents reply (one hole for null), not a bare ack.
            Command::BlockStatus => {
                bump(&ctr.block_status_ops, 1);
                block_status(r, conn, req, &pin, &[]);
            }
            _ => {
                count_op(&volume, r.id(), &req);
                complete(r, conn, req, Ok(()));
            }
        }
        return;
    };
    let conn2 = conn.clone();
    // Every operation goes through `io::submit_io`: past a full slab it waits for a
    // slot (io module docs, *Back-pressure*), never fails.
    match req.command {
        Command::Read => {
            bump(&ctr.read_ops, 1);
            bump(&ctr.read_bytes, req.length as u64);
            let buf = alloc_buf(r, req.length as usize, true);
            io::submit_io(
                r,
                &volume,
                Op::read(file, req.offset, buf, req.length),
                move |r, comp| {
                    drop(pin);
                    let res = match comp.bytes() {
                        Ok(n) => {
                            let mut buf = comp.op.into_buf();
                            // Short read = end of file: the rest reads as zeros.
                            if let Some(b) = buf.as_mut() {
                                b.as_mut_slice()[n as usize..req.length as usize].fill(0);
                            }
                            Ok(buf)
                        }
                        Err(e) => Err(BlockError::from_os_errno(e)),
                    };
                    complete_read(r, &conn2, req, res)
                },
            )
        }
        Command::Write => {
            bump(&ctr.write_ops, 1);
            bump(&ctr.write_bytes, req.length as u64);
            let Some(buf) = payload else {
                complete(r, conn, req, Err(BlockError::Io));
                return;
            };
            io::submit_io(
                r,
                &volume,
                Op::write(file, req.offset, buf, req.length),
                move |r, comp| {
                    drop(pin); // the write has landed: the drain may count it done
                    let res = match comp.bytes() {
                        Ok(n) if n == req.length => Ok(()),
                        // A short O_DIRECT write means the device is out of space.
                        Ok(_) => Err(BlockError::NoSpace),
                        Err(e) => Err(BlockError::from_os_errno(e)),
                    };
                    finish_with_fua(r, &conn2, req, file, fua, res)
                },
            )
        }
        Command::Flush => {
            bump(&ctr.flush_ops, 1);
            io::submit_io(r, &volume, Op::fdatasync(file), move |r, comp| {
                drop(pin);
                let res = comp.bytes().map(|_| ()).map_err(BlockError::from_os_errno);
                complete(r, &conn2, req, res)
            })
        }
        Command::Trim => {
            bump(&ctr.trim_ops, 1);
            if !volume.backend().can_punch() {
                // TRIM is advisory: a device that cannot discard keeps the data.
                complete(r, conn, req, Ok(()));
                return;
            }
            let op = Op::fallocate(file, req.offset, req.length as u64, falloc::PUNCH_HOLE);
            io::submit_io(r, &volume, op, move |r, comp| {
                drop(pin);
                let res = match comp.bytes() {
                    // TRIM is advisory: a device without a fast zero/discard keeps the data.
                    Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL => Ok(()),
                    res => res.map(|_| ()).map_err(BlockError::from_os_errno),
                };
                finish_with_fua(r, &conn2, req, file, fua, res)
            })
        }
        Command::WriteZeroes => {
            bump(&ctr.zero_ops, 1);
            let fast = req.flags.contains(CommandFlags::FAST_ZERO);
            if !volume.backend().can_punch() {
                if fast {
                    complete(r, conn, req, Err(BlockError::NotSupported));
                } else {
                    zero_fill(r, conn, req, file, 0, pin);
                }
                return;
            }
            let mode = if req.flags.contains(CommandFlags::NO_HOLE) {
                falloc::ZERO_RANGE
            } else {
                falloc::PUNCH_HOLE
            };
            let op = Op::fallocate(file, req.offset, req.length as u64, mode);
            io::submit_io(r, &volume, op, move |r, comp| match comp.bytes() {
                Ok(_) => finish_with_fua(r, &conn2, req, file, fua, Ok(())),
                Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL => {
                    if fast {
                        complete(r, &conn2, req, Err(BlockError::NotSupported))
                    } else {
                        zero_fill(r, &conn2, req, file, 0, pin)
                    }
                }
                Err(e) => complete(r, &conn2, req, Err(BlockError::from_os_errno(e))),
            })
        }
        Command::Cache => {
            // A hint: O_DIRECT volumes have no page cache to warm, so succeed at once.
            bump(&ctr.cache_ops, 1);
            complete(r, conn, req, Ok(()));
        }
        Command::BlockStatus => {
            bump(&ctr.block_status_ops, 1);
            block_status(r, conn, req, &pin, &[]);
        }
        Command::Disc | Command::Unknown(_) => complete(r, conn, req, Err(BlockError::Invalid)),
    }
}

fn count_op(volume: &Volume, reactor: usize, req: &Request) {
    let c = volume.counters(reactor);
    match req.command {
        Command::Read => {
            bump(&c.read_ops, 1);
            bump(&c.read_bytes, req.length as u64)
        }
        Command::Write => {
            bump(&c.write_ops, 1);
            bump(&c.write_bytes, req.length as u64)
        }
        Command::Flush => bump(&c.flush_ops, 1),
        Command::Trim => bump(&c.trim_ops, 1),
        Command::WriteZeroes => bump(&c.zero_ops, 1),
        Command::Cache => bump(&c.cache_ops, 1),
        Command::BlockStatus => bump(&c.block_status_ops, 1),
        _ => {}
    }
}

/// FUA: the reply waits until the data is durable.
fn finish_with_fua(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    file: FileRef,
    fua: bool,
    res: Result<(), BlockError>,
) {
    if !fua || res.is_err() {
        return complete(r, conn, req, res);
    }
    let conn2 = conn.clone();
    let volume = file_of(conn).1;
    io::submit_io(r, &volume, Op::fdatasync(file), move |r, comp| {
        complete(
            r,
            &conn2,
            req,
            comp.bytes().map(|_| ()).map_err(BlockError::from_os_errno),
        )
    });
}

/// Writes zeros chunk by chunk where fallocate cannot (block devices).
fn zero_fill(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    file: FileRef,
    done: u64,
    pin: Rc<StackPin>,
) {
    let total = req.length as u64;
    if done >= total {
        drop(pin);
        let fua = req.flags.contains(CommandFlags::FUA);
        return finish_with_fua(r, conn, req, file, fua, Ok(()));
    }
    let n = (total - done).min(ZERO_FILL_CHUNK);
    let buf = AlignedBuf::direct(n as usize);
    let conn2 = conn.clone();
    let volume = file_of(conn).1;
    io::submit_io(
        r,
        &volume,
        Op::write(file, req.offset + done, buf, n as u32),
        move |r, comp| match comp.bytes() {
            Ok(w) if w as u64 == n => zero_fill(r, &conn2, req, file, done + n, pin),
            Ok(_) => complete(r, &conn2, req, Err(BlockError::NoSpace)),
            Err(e) => complete(r, &conn2, req, Err(BlockError::from_os_errno(e))),
        },
    );
}

/// Extents of one selected context for `req`, over the view `layers` (a prefix of
/// the pinned stack's deltas: all of them on the live export).
fn context_extents(
    volume: &Volume,
    ctx: &MetaContext,
    req: &Request,
    pin: &StackPin,
    layers: &[Arc<Delta>],
    max: usize,
) -> Result<Vec<reply::Extent>, &'static str> {
    let (off, len) = (req.offset, req.length);
    if ctx.name == proto::META_BASE_ALLOCATION {
        let extents = if layers.is_empty() {
            let mut lseeks = io::BLOCK_STATUS_LSEEKS_MAX;
            volume.backend().block_status(off, len, max, &mut lseeks)
        } else {
            io::block_status(volume, layers, off, len, max)
        };
        return Ok(nbd_extents(NbdContext::BaseAllocation, &extents));
    }
    if !ctx.name.starts_with(META_CHANGED_PREFIX) {
        return Err("unknown metadata context");
    }
    // Bound to the backup selected, by its delta's id: gone once that backup is being
    // released (its changes merge into older ones), even if a new backup took its name.
    match io::changed_layers_of(&pin.stack().deltas, layers.len(), ctx.binding) {
        Some(changed) => Ok(nbd_extents(
            NbdContext::Changed,
            &io::changed_status(volume, changed, off, len, max),
        )),
        None => Err("that backup was released: changes since it are no longer tracked"),
    }
}

/// BLOCK_STATUS: one reply chunk per selected context, all computed against the
/// request's pinned stack, so they describe the same instant. A context that cannot
/// be answered fails the whole request (EINVAL, with the reason).
fn block_status(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    pin: &StackPin,
    layers: &[Arc<Delta>],
) {
    let (_, volume, _) = file_of(conn);
    let contexts = match &conn.borrow().phase {
        Phase::Transmission(t) => t.contexts.clone(),
        Phase::Handshake(_) => Vec::new(),
    };
    let max = if req.flags.contains(CommandFlags::REQ_ONE) {
        1
    } else {
        BLOCK_STATUS_EXTENTS_MAX
    };
    let answers: Result<Vec<_>, &str> = contexts
        .iter()
        .map(|ctx| context_extents(&volume, ctx, &req, pin, layers, max).map(|e| (ctx.id, e)))
        .collect();
    let answers = match answers {
        Ok(a) if a.is_empty() || a.iter().any(|(_, e)| e.is_empty()) => {
            Err("no metadata context selected")
        }
        other => other,
    };
    let mut out = Vec::new();
    let failed = match answers {
        Ok(a) => {
            for (i, (id, extents)) in a.iter().enumerate() {
                reply::put_block_status(&mut out, req.cookie, *id, extents, i + 1 == a.len());
            }
            false
        }
        Err(message) => {
            reply::error_reply(&mut out, true, req.cookie, NbdErrno::Inval, message);
            true
        }
    };
    finish(r, conn, req, Reply::Bytes(out), failed);
}

fn complete(r: &mut Reactor, conn: &ConnRef, req: Request, res: Result<(), BlockError>) {
    let structured = file_of(conn).2;
    let mut out = Vec::new();
    let failed = res.is_err();
    match res {
        Ok(()) => reply::success_reply(&mut out, structured, req.cookie),
        Err(e) => {
            let e = reply_errno(req.command, e);
            reply::error_reply(&mut out, structured, req.cookie, e, errno_message(e))
        }
    }
    finish(r, conn, req, Reply::Bytes(out), failed);
}

/// Replies to a READ with data (`None` = zeros without a buffer, for null).
fn complete_read(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    res: Result<Option<IoBuf>, BlockError>,
) {
    let structured = file_of(conn).2;
    let len = req.length as usize;
    let reply = match res {
        Err(e) => {
            let mut out = Vec::new();
            let e = reply_errno(req.command, e);
            reply::error_reply(&mut out, structured, req.cookie, e, errno_message(e));
            return finish(r, conn, req, Reply::Bytes(out), true);
        }
        Ok(None) if structured => Reply::Bytes(
            reply::offset_hole_chunk(req.cookie, req.offset, req.length, true).to_vec(),
        ),
        Ok(None) => {
            let mut out = reply::simple_reply(req.cookie, None).to_vec();
            out.resize(out.len() + len, 0);
            Reply::Bytes(out)
        }
        Ok(Some(buf)) => {
            let header = if structured {
                reply::offset_data_header(req.cookie, req.offset, req.length, true).to_vec()
            } else {
                reply::simple_reply(req.cookie, None).to_vec()
            };
            Reply::Data { header, buf, len }
        }
    };
    finish(r, conn, req, reply, false);
}

/// Queues the reply, releases the request's budget and resumes a paused reader.
fn finish(r: &mut Reactor, conn: &ConnRef, req: Request, reply: Reply, failed: bool) {
    let was_paused;
    {
        let mut c = conn.borrow_mut();
        was_paused = paused(&c);
        c.in_flight -= 1;
        if matches!(req.command, Command::Read | Command::Write) {
            c.in_flight_bytes -= req.length as usize;
        }
        let started = c.started.remove(&req.cookie);
        if let Phase::Transmission(t) = &c.phase {
            if failed {
                bump(&t.volume.counters(r.id()).errors, 1);
            }
            if let (Some(t0), Some(kind)) = (started, io_kind(req.command)) {
                let latency_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                latency::record(r, t.volume.name(), kind, latency_ns);
            }
        }
        if c.state != State::Aborting {
            match reply {
                Reply::Bytes(b) => queue_bytes(&mut c, b),
                data => {
                    c.unsent_bytes += data.len();
                    c.tx.push_back(data);
                }
            }
        }
    }
    release_excess(r, conn);
    kick_send(r, conn);
    if was_paused {
        process(r, conn);
    } else {
        maybe_finish(r, conn);
    }
}

/// Sends queued replies: one sendmsg at a time per socket, batching replies.
fn kick_send(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    if c.send_outstanding || c.tx.is_empty() || c.sock.is_none() || c.state == State::Aborting {
        return;
    }
    let mut bufs: Vec<IoBuf> = Vec::new();
    let mut lens = Vec::new();
    let mut total = 0usize;
    let mut replies = 0;
    while replies < SEND_BATCH {
        let Some(rep) = c.tx.pop_front() else { break };
        total += rep.len();
        replies += 1;
        match rep {
            Reply::Bytes(b) => {
                lens.push(b.len());
                bufs.push(b.into());
            }
            Reply::Data { header, buf, len } => {
                lens.push(header.len());
                bufs.push(header.into());
                lens.push(len);
                bufs.push(buf);
            }
        }
    }
    let op = Op::sendmsg(c.sref, bufs, &lens);
    let lens_copy = lens.clone();
    let conn2 = conn.clone();
    let res = r.submit(op, move |r, comp| on_sent(r, &conn2, comp, lens, total));
    match res {
        Ok(id) => {
            c.send_outstanding = true;
            c.send_op = Some(id);
            c.sending_bytes = total;
            c.last_progress = Instant::now();
            let watch = stalled_on_client(&c) && c.stall_timer.is_none();
            drop(c);
            if watch {
                arm_stall_timer(r, conn);
            }
        }
        Err(rej) => {
            // Slab full: keep the bytes, in order, and retry shortly.
            let mut bytes = Vec::with_capacity(total);
            for (b, &l) in rej.op.into_bufs().iter().zip(&lens_copy) {
                bytes.extend_from_slice(&b.as_slice()[..l]);
            }
            c.tx.push_front(Reply::Bytes(bytes));
            drop(c);
            let conn2 = conn.clone();
            r.add_timer(std::time::Duration::from_micros(50), move |r| {
                kick_send(r, &conn2)
            });
        }
    }
}

fn on_sent(r: &mut Reactor, conn: &ConnRef, comp: Completion, lens: Vec<usize>, total: usize) {
    let res = comp.result;
    let resume;
    {
        let mut c = conn.borrow_mut();
        c.send_outstanding = false;
        c.send_op = None;
        c.sending_bytes = 0;
        let was_paused = paused(&c);
        if res > 0 {
            // Saturating only for an aborted connection, whose queue was dropped.
            debug_assert!(c.state == State::Aborting || res as usize <= c.unsent_bytes);
            c.unsent_bytes = c.unsent_bytes.saturating_sub(res as usize);
            c.last_progress = Instant::now();
        }
        resume = was_paused && !paused(&c);
        if res < 0 {
            if -res != libc::ECANCELED {
                tracing::debug!(conn = c.id, errno = -res, "send failed; closing");
            }
            c.state = State::Aborting;
            clear_tx(&mut c);
        } else if (res as usize) < total {
            // Partial send: queue the unsent rest first, in order. Untouched buffers go
            // back as they are; only the cut buffer's tail is copied, in pieces of at
            // most PARTIAL_SEND_PIECE, so copying stays linear in the bytes sent (copying
            // the whole unsent rest each time was quadratic for large READ replies).
            let mut skip = res as usize;
            let mut rest = Vec::new();
            for (b, &l) in comp.op.into_bufs().into_iter().zip(&lens) {
                if skip >= l {
                    skip -= l;
                    continue;
                }
                if skip == 0 {
                    rest.push(Reply::Data {
                        header: Vec::new(),
                        buf: b,
                        len: l,
                    });
                } else {
                    let tail = &b.as_slice()[skip..l];
                    rest.extend(
                        tail.chunks(PARTIAL_SEND_PIECE)
                            .map(|p| Reply::Bytes(p.to_vec())),
                    );
                    skip = 0;
                }
            }
            for rep in rest.into_iter().rev() {
                c.tx.push_front(rep);
            }
        }
    }
    release_excess(r, conn);
    kick_send(r, conn);
    if resume {
        process(r, conn); // sends, reads again and closes as needed
    } else {
        maybe_finish(r, conn);
    }
}

fn begin_close(r: &mut Reactor, conn: &ConnRef, how: State) {
    let (recv, send) = {
        let mut c = conn.borrow_mut();
        if c.state == State::Closed {
            return;
        }
        if c.state == State::Open || how == State::Aborting {
            c.state = how;
        }
        if how == State::Aborting {
            clear_tx(&mut c);
        }
        // A WRITE whose payload never fully arrived will not execute: release its
        // budget, or `maybe_finish` waits for it forever and the connection leaks.
        let partial = match &mut c.phase {
            Phase::Transmission(t) => t.cur_write.take(),
            Phase::Handshake(_) => None,
        };
        if let Some((req, _, _)) = partial {
            c.in_flight -= 1;
            c.in_flight_bytes -= req.length as usize;
        }
        // A request waiting for budget will not run: it was decoded, so a clean
        // close answers it (ESHUTDOWN) rather than leaving the client waiting.
        if let Some(req) = c.budget_wait.take() {
            cancel_budget_wait(r, &c);
            if c.state == State::Draining {
                let structured = matches!(&c.phase, Phase::Transmission(t) if t.structured);
                let mut out = Vec::new();
                let e = NbdErrno::Shutdown;
                reply::error_reply(&mut out, structured, req.cookie, e, errno_message(e));
                queue_bytes(&mut c, out);
            }
        }
        // A client that does not read would hold the send (and the connection)
        // forever.
        let send = c.send_op.filter(|_| how == State::Aborting);
        (c.recv_op, send)
    };
    if let Some(id) = recv {
        r.cancel(id); // on_recv runs with ECANCELED and calls maybe_finish
    }
    if let Some(id) = send {
        r.cancel(id); // on_sent runs with ECANCELED (or the bytes it sent)
    }
    release_excess(r, conn);
    kick_send(r, conn);
    maybe_finish(r, conn);
}

/// Withdraws the connection's wait for budget (a grant already on its way is given
/// back by `budget_granted`).
fn cancel_budget_wait(r: &mut Reactor, c: &Conn) {
    let (_, woken) = c.shared.admission.budget.cancel(c.id);
    wake(r, &c.shared, woken);
}

/// Closes the socket once nothing refers to it any more.
fn maybe_finish(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    let idle = c.recv_op.is_none()
        && !c.send_outstanding
        && c.in_flight == 0
        && (c.tx.is_empty() || c.state == State::Aborting);
    if c.state == State::Open || c.state == State::Closed || !idle {
        return;
    }
    c.state = State::Closed;
    if let Some(t) = c.handshake_timer.take() {
        r.cancel_timer(t);
    }
    if let Some(t) = c.stall_timer.take() {
        r.cancel_timer(t);
    }
    if let Phase::Transmission(t) = &c.phase {
        t.volume.connection_closed();
    }
    if c.budget_wait.take().is_some() {
        cancel_budget_wait(r, &c);
    }
    c.shared.admission.handshakes.remove(c.id);
    c.sock = None; // closes the descriptor
    c.shared.connections.fetch_sub(1, Ordering::Relaxed);
    c.shared.per_reactor[r.id()].fetch_sub(1, Ordering::Relaxed);
    let id = c.id;
    let held = std::mem::take(&mut c.budget_held);
    let shared = c.shared.clone();
    drop(c);
    give_back(r, &shared, held);
    conns(r).map.borrow_mut().remove(&id);
    tracing::debug!(conn = id, "connection closed");
}

#[cfg(test)]
mod edge_tests {
    use super::*;

    /// The OS errno → NBD table as it was before #12 step 1 (`os_errno.rs`), typed
    /// out again: the errors clients see must not change.
    fn nbd_before_step1(errno: i32) -> NbdErrno {
        match errno {
            libc::EPERM | libc::EACCES | libc::EROFS => NbdErrno::Perm,
            libc::ENOMEM => NbdErrno::NoMem,
            libc::EINVAL => NbdErrno::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdErrno::NoSpc,
            libc::EOVERFLOW => NbdErrno::Overflow,
            libc::EOPNOTSUPP => NbdErrno::NotSup,
            libc::ESHUTDOWN => NbdErrno::Shutdown,
            _ => NbdErrno::Io,
        }
    }

    #[test]
    fn errno_mapping_gives_todays_nbd_errors() {
        for kind in IoKind::ALL {
            for errno in 0..200 {
                let e = nbd_errno(kind, BlockError::from_os_errno(errno));
                assert_eq!(e, nbd_before_step1(errno), "{kind:?} errno {errno}");
                assert!(NbdErrno::ALL.contains(&e));
            }
        }
        // The spot checks of the old os_errno test.
        let via = |errno| nbd_errno(IoKind::Write, BlockError::from_os_errno(errno));
        assert_eq!(via(libc::EDQUOT), NbdErrno::NoSpc);
        assert_eq!(via(libc::EFBIG), NbdErrno::NoSpc);
        assert_eq!(via(libc::EROFS), NbdErrno::Perm);
        assert_eq!(via(libc::EBADF), NbdErrno::Io);
        let io = std::io::Error::other("no os code");
        assert_eq!(
            nbd_errno(IoKind::Flush, BlockError::from_io_error(&io)),
            NbdErrno::Io
        );
    }

    #[test]
    fn layer_only_errors_map_as_the_plan_says() {
        // A backup released under an open connection: ESHUTDOWN, as before.
        assert_eq!(
            nbd_errno(IoKind::Read, BlockError::Removed),
            NbdErrno::Shutdown
        );
        // Short writes / fast zero impossible / a DISC or unknown command.
        assert_eq!(
            nbd_errno(IoKind::Write, BlockError::NoSpace),
            NbdErrno::NoSpc
        );
        assert_eq!(
            nbd_errno(IoKind::WriteZeroes, BlockError::NotSupported),
            NbdErrno::NotSup
        );
        assert_eq!(
            reply_errno(Command::Unknown(99), BlockError::Invalid),
            NbdErrno::Inval
        );
        for kind in IoKind::ALL {
            let want = if kind.is_write() {
                NbdErrno::NoSpc
            } else {
                NbdErrno::Inval
            };
            assert_eq!(nbd_errno(kind, BlockError::OutOfRange), want, "{kind:?}");
        }
        let miscompare = BlockError::Miscompare { offset: 7 };
        assert_eq!(nbd_errno(IoKind::CompareAndWrite, miscompare), NbdErrno::Io);
        // Injected faults reach clients as EIO and ENOSPC, as before.
        use crate::fault::FaultErrno;
        assert_eq!(
            nbd_errno(IoKind::Read, FaultErrno::Eio.error()),
            NbdErrno::Io
        );
        assert_eq!(
            nbd_errno(IoKind::Write, FaultErrno::Enospc.error()),
            NbdErrno::NoSpc
        );
    }

    #[test]
    fn extent_flags_map_to_wire_flags() {
        let ext = |length_bytes, flags| Extent {
            length_bytes,
            flags,
        };
        let list = [
            ext(4096, ExtentFlags::NONE),
            ext(8192, ExtentFlags::UNALLOCATED | ExtentFlags::ZEROES),
            ext(512, ExtentFlags::ZEROES),
            ext(1024, ExtentFlags::CHANGED),
        ];
        let base = nbd_extents(NbdContext::BaseAllocation, &list);
        let got: Vec<_> = base.iter().map(|e| (e.length, e.flags)).collect();
        let hole_zero = proto::STATE_HOLE | proto::STATE_ZERO;
        assert_eq!(
            got,
            [
                (4096, 0),
                (8192, hole_zero),
                (512, proto::STATE_ZERO),
                (1024, 0)
            ]
        );
        let changed = nbd_extents(NbdContext::Changed, &list);
        let got: Vec<_> = changed.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(got, [(4096, 0), (8192, 0), (512, 0), (1024, 1)]);
    }
}
