//! One NBD connection on one reactor: handshake, then the transmission phase.
//!
//! The protocol itself is this crate's sans-IO codec ([`crate::handshake`],
//! [`crate::codec`], [`crate::reply`]); this module moves bytes between it, the socket
//! and the block layer (`ringblk_target::bdev`: one `Bdev` and its `Channel` per
//! connection) with reactor operations. Layer: the NBD front end (moved here from the
//! target crate in #12 step 5.2); imports the target's public API, the reactor, and
//! `errors`, `extents`, `exports` and `NbdShared` beside it.
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
//! backed by the buffer budget are bounded on their own by `REPLY_QUEUE_MAX_BYTES`
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
//! # TLS
//! After an acknowledged `NBD_OPT_STARTTLS` the connection owns a `TlsConn`
//! (`tls.rs`): receives land in its ciphertext buffer and are decrypted into `rx`,
//! so everything above (handshake, decoder, bounds) sees plaintext as before; replies
//! are encrypted from `tx` into one ciphertext buffer per send. The socket I/O stays
//! the same io_uring receive and send; rustls only moves bytes between buffers on
//! this reactor. `unsent_bytes` keeps counting reply (plaintext) bytes: a batch's
//! count is released when its send completes.
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

use ringblk_reactor::{Completion, FileRef, IoBuf, Op, OpId, PollResult, Reactor, TimerId};
use ringblk_target::admission::{count, Waiter};
use ringblk_target::bdev::{
    BackupId, Bdev, BlockOp, Channel, DataBuf, Done, IoOutput, IoResult, IoSink, OwnBuf, Pressure,
    ReadData, StatusKind, Subscription, View,
};
use ringblk_target::error::BlockError;
use ringblk_target::stats::Label;
use ringblk_target::volume::{bump, Volume};

use super::errors::{errno_message, reply_errno};
use super::exports::META_CHANGED_PREFIX;
use super::extents::{nbd_extents, NbdContext};
use super::tls::{Gated, TlsConn, TLS_SEND_BATCH_BYTES};
use super::NbdShared;
use crate::codec::{
    Command, CommandFlags, Event, Request, RequestPolicy, TransmissionDecoder, Unaligned,
};
use crate::handshake::{Handshake, HandshakeLimits, MetaContext, Status};
use crate::{proto, reply, NbdErrno};

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
const BLOCK_STATUS_EXTENTS_MAX: u32 = 1024;

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
    /// The export opened in the block layer, its channel on this reactor and the
    /// connection's completion sink.
    bdev: Bdev,
    channel: Channel,
    sink: Rc<dyn IoSink>,
    structured: bool,
    contexts: Vec<MetaContext>,
    decoder: TransmissionDecoder,
    /// The WRITE whose payload is arriving.
    cur_write: Option<(Request, IoBuf, usize)>,
    /// `BdevEvent`s of this export close the connection (the volume deleted, the
    /// backup released); dropped with the connection.
    _events: Subscription,
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
    shared: Arc<NbdShared>,
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
    /// Requests in the block layer, by the slot their completion names.
    slots: Slots,
    /// The volume's channel was full at the last submit: reading waits for room
    /// (`Channel::when_room`).
    blocked_on_layer: bool,
    /// In the reactor's list of connections to kick at the end of the iteration.
    kick_queued: bool,
    /// TLS, from an acknowledged `NBD_OPT_STARTTLS` on (module docs: TLS).
    tls: Option<Box<TlsConn>>,
}

/// The connections of one reactor (reactor-local state).
pub(crate) struct ReactorConns {
    /// By server-wide connection id (`admission`).
    map: RefCell<HashMap<u64, ConnRef>>,
    /// This front end's stats label in the block layer ("nbd").
    label: Label,
    /// Connections with replies to send at the end of this iteration (`queue_kick`).
    dirty: RefCell<Vec<ConnRef>>,
}

impl Default for ReactorConns {
    fn default() -> ReactorConns {
        ReactorConns {
            map: RefCell::default(),
            dirty: RefCell::default(),
            // Registered once per process by name; with all label slots taken (cannot
            // happen with the layer's own few front ends) requests count as internal.
            label: Label::register("nbd").unwrap_or(Label::INTERNAL),
        }
    }
}

fn conns(r: &Reactor) -> Rc<ReactorConns> {
    // `install` runs on every server reactor; a reactor without it (a test's) simply
    // has no connections.
    r.local::<ReactorConns>().unwrap_or_default()
}

pub(crate) fn install(r: &mut Reactor) {
    // The block layer's ready-queue poller first, so that the kick poller runs after
    // it in each iteration (`queue_kick`).
    ringblk_target::bdev::install(r);
    let set = Rc::new(ReactorConns::default());
    r.set_local(set.clone());
    // The poller holds the set as the reactor's local table does: both live as
    // long as the reactor.
    let set2 = set.clone();
    r.add_poller(move |r| kick_queued(r, &set2));
    r.on_stop(|r| {
        let all: Vec<ConnRef> = conns(r).map.borrow().values().cloned().collect();
        for c in all {
            begin_close(r, &c, State::Draining);
        }
    });
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
pub(crate) fn start(r: &mut Reactor, shared: Arc<NbdShared>, sock: OwnedFd, id: u64) {
    let set = conns(r);
    let limits = HandshakeLimits {
        tls: shared.tls.mode,
        ..HandshakeLimits::default()
    };
    let hs = Handshake::new(limits);
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
        slots: Slots::default(),
        blocked_on_layer: false,
        kick_queued: false,
        tls: None,
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
    /// The volume's channel is full (`Pressure::Full`): waits for room.
    Layer,
}

fn pause_reason(c: &Conn) -> Option<Pause> {
    if c.budget_wait.is_some() {
        Some(Pause::Budget)
    } else if c.blocked_on_layer {
        Some(Pause::Layer)
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
        Pause::Budget | Pause::Layer => {}
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
    if let Some(tls) = c.tls.as_mut() {
        tls.front_offset = 0;
        tls.wire_out.clear();
        tls.wire_plain = 0;
    }
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
    c.rx_start = 0;
    c.rx_end = 0;
    let tls = c.tls.is_some();
    if c.tls.as_ref().is_some_and(|t| t.has_input()) {
        // Ciphertext left over (`rx` was full when it was decrypted; `rx` is larger
        // than `cin`, so this is not expected): decrypt it now and process it on the
        // next turn of the loop (from here, processing would recurse).
        let failed = {
            let c = &mut *c;
            let (Some(tls), Some(rx)) = (c.tls.as_mut(), c.rx.as_mut()) else {
                return;
            };
            tls_pump(c.id, tls, rx, &mut c.rx_end).is_err()
        };
        drop(c);
        let conn2 = conn.clone();
        r.add_timer(std::time::Duration::ZERO, move |r| {
            if failed {
                begin_close(r, &conn2, State::Aborting)
            } else {
                process(r, &conn2)
            }
        });
        return;
    }
    let buf = match c.tls.as_mut() {
        // After close_notify nothing more is read.
        Some(t) if t.eof => return,
        Some(t) => t.cin.take(),
        None => c.rx.take(),
    };
    let Some(buf) = buf else { return };
    let len = buf.len() as u32;
    let conn2 = conn.clone();
    match r.submit(Op::recv(c.sref, buf, 0, len), move |r, comp| {
        if tls {
            on_recv_tls(r, &conn2, comp)
        } else {
            on_recv(r, &conn2, comp)
        }
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
            let back = rej.op.into_buf().and_then(|b| match b {
                IoBuf::Vec(v) => Some(v),
                _ => None,
            });
            match c.tls.as_mut() {
                Some(t) => t.cin = back,
                None => c.rx = back,
            }
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

/// A receive of ciphertext completed: decrypt it into `rx`, then as `on_recv`.
fn on_recv_tls(r: &mut Reactor, conn: &ConnRef, comp: Completion) {
    let n = comp.result;
    let outcome = {
        let mut c = conn.borrow_mut();
        let c = &mut *c;
        c.recv_op = None;
        let back = match comp.op.into_buf() {
            Some(IoBuf::Vec(v)) => v,
            _ => vec![0u8; super::tls::TLS_RX_BYTES],
        };
        match (c.tls.as_mut(), c.rx.as_mut()) {
            (Some(tls), Some(rx)) if n > 0 => {
                tls.cin = Some(back);
                tls.cin_start = 0;
                tls.cin_end = n as usize;
                c.last_progress = Instant::now();
                tls_pump(c.id, tls, rx, &mut c.rx_end)
            }
            (Some(tls), _) => {
                tls.cin = Some(back);
                Ok(false)
            }
            _ => Err(()),
        }
    };
    if n == 0 {
        begin_close(r, conn, State::Draining);
        return;
    }
    if n < 0 || outcome.is_err() {
        if n < 0 && -n != libc::ECANCELED {
            tracing::debug!(conn = conn.borrow().id, errno = -n, "recv failed");
        }
        begin_close(r, conn, State::Aborting);
        return;
    }
    process(r, conn);
    let eof = conn.borrow().tls.as_ref().is_some_and(|t| t.eof);
    if eof {
        // close_notify: like EOF, finish what was asked and close.
        begin_close(r, conn, State::Draining);
    }
}

/// Decrypts what `tls` holds into `rx`; Err: the TLS session failed (logged).
fn tls_pump(id: u64, tls: &mut TlsConn, rx: &mut [u8], rx_end: &mut usize) -> Result<bool, ()> {
    match tls.pump(rx, rx_end) {
        Ok(true) => {
            tracing::info!(conn = id, peer = ?tls.peer, "TLS established");
            Ok(true)
        }
        Ok(false) => Ok(false),
        Err(e) => {
            tracing::info!(conn = id, error = %e.0, "TLS failed; closing");
            Err(())
        }
    }
}

/// `NBD_OPT_STARTTLS` was acknowledged: the ACK (and anything queued before it) goes
/// out in the clear, every byte after it goes through TLS. False: closing.
fn start_tls(c: &mut Conn, leftover_from: usize) -> bool {
    let Some(config) = c.shared.tls.config.clone() else {
        // The handshake acknowledges STARTTLS only with a mode other than Off, which
        // the server sets only with credentials.
        c.state = State::Aborting;
        return false;
    };
    // Everything queued so far goes in the clear, in order (a partial send's rest
    // comes back as `Reply::Data` too).
    let mut clear = Vec::new();
    for rep in c.tx.drain(..) {
        let [a, b] = reply_pieces(&rep);
        clear.extend_from_slice(a);
        clear.extend_from_slice(b);
    }
    let mut tls = match TlsConn::new(config, clear) {
        Ok(t) => Box::new(t),
        Err(e) => {
            tracing::info!(conn = c.id, error = %e.0, "TLS setup failed; closing");
            c.state = State::Aborting;
            return false;
        }
    };
    let Some(rx) = c.rx.as_mut() else {
        c.state = State::Aborting;
        return false;
    };
    // A client must wait for the ACK; whatever it sent after STARTTLS is TLS input.
    let pushed = tls.push_input(&rx[leftover_from..c.rx_end]);
    c.rx_start = 0;
    c.rx_end = 0;
    let ok = pushed.is_ok() && tls_pump(c.id, &mut tls, rx, &mut c.rx_end).is_ok();
    c.tls = Some(tls);
    if !ok {
        clear_tx(c);
        c.state = State::Aborting;
    }
    ok
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
    if r.submit_held() {
        // The block layer completes a request later in this iteration (its ready
        // queue): re-arm the receive after that reply is queued, so the kernel
        // sends the reply before it arms the receive (same enter, SQE order).
        queue_kick(r, conn);
    } else {
        post_recv(r, conn);
    }
    maybe_finish(r, conn);
}

/// Runs the handshake on buffered input; false stops processing.
fn process_handshake(r: &mut Reactor, conn: &ConnRef) -> bool {
    let weak_self = Rc::downgrade(conn);
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
    // The catalog as this client may see it (`tls.rs`: access rules).
    let gated = Gated {
        inner: &*c.shared.exports,
        tls: &c.shared.tls,
        tls_active: hs.tls_active(),
        peer: c.tls.as_ref().map_or(&[][..], |t| &t.peer[..]),
    };
    let res = hs.feed(input, &gated);
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
                Status::StartTls => {
                    let from = c.rx_start;
                    start_tls(c, from)
                }
                Status::Done(neg) => {
                    let resolved = c.shared.target.registry().resolve(&neg.export.name);
                    // A backup's view is named by its delta's id, not its name.
                    let view = resolved.as_ref().and_then(|(v, b)| match b {
                        None => Some(View::Live),
                        Some(b) => v.ready_backup_delta(b).map(|id| View::Backup(BackupId(id))),
                    });
                    let (Some((volume, _)), Some(view)) = (resolved, view) else {
                        // Removed (or released) between the option and now.
                        c.state = State::Aborting;
                        return false;
                    };
                    let Ok(bdev) = Bdev::open(volume.clone(), view, conns(r).label) else {
                        // Released between the lookup and now.
                        c.state = State::Aborting;
                        return false;
                    };
                    let channel = bdev.channel(r);
                    // In this same reactor step as the lookup (`events` # Ordering).
                    let weak = Rc::downgrade(conn);
                    let events = channel.subscribe(r, &bdev, move |r, _| {
                        if let Some(c) = weak.upgrade() {
                            begin_close(r, &c, State::Draining);
                        }
                    });
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
                    let sink: Rc<dyn IoSink> = Rc::new(ConnSink(weak_self));
                    volume.connection_opened();
                    tracing::debug!(
                        conn = c.id,
                        export = volume.name(),
                        structured = neg.structured_replies,
                        "negotiated"
                    );
                    c.phase = Phase::Transmission(Box::new(Transmission {
                        bdev,
                        channel,
                        sink,
                        volume,
                        structured: neg.structured_replies,
                        contexts,
                        decoder: TransmissionDecoder::new(policy),
                        cur_write: None,
                        refused_write_reply: None,
                        _events: events,
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
            bump(&t.volume.label_counters(r.id(), t.bdev.label()).errors, 1);
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
        let buf = OwnBuf::alloc(r, len).into_io();
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
pub(crate) fn budget_granted(r: &mut Reactor, shared: Arc<NbdShared>, id: u64, bytes: usize) {
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
fn give_back(r: &mut Reactor, shared: &Arc<NbdShared>, bytes: usize) {
    let woken = shared.admission.budget.release(bytes);
    wake(r, shared, woken);
}

/// Hands grants to their connections' reactors (by message, also to this one: the
/// caller may hold a connection borrowed).
fn wake(r: &mut Reactor, shared: &Arc<NbdShared>, woken: Vec<Waiter>) {
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

/// Whether the connection negotiated structured replies.
fn structured(conn: &ConnRef) -> bool {
    matches!(&conn.borrow().phase, Phase::Transmission(t) if t.structured)
}

/// The block request of an NBD request (its payload, for a WRITE), or the error
/// to reply without submitting anything. `None` for DISC and unknown commands,
/// which never reach the block layer.
fn block_op(
    r: &Reactor,
    t: &Transmission,
    req: &Request,
    payload: Option<IoBuf>,
) -> Option<Result<BlockOp, (BlockError, &'static str)>> {
    let (offset, len) = (req.offset, req.length);
    let fua = req.flags.contains(CommandFlags::FUA);
    Some(Ok(match req.command {
        Command::Read => BlockOp::Read {
            offset,
            len,
            into: DataBuf::Own(OwnBuf::alloc(r, len as usize)),
        },
        Command::Write => match payload {
            Some(buf) => BlockOp::Write {
                offset,
                len,
                data: DataBuf::Own(OwnBuf::from_io(buf)),
                fua,
            },
            None => return Some(Err((BlockError::Io, "I/O error"))),
        },
        Command::Flush => BlockOp::Flush,
        Command::Trim => BlockOp::Unmap {
            offset,
            len: u64::from(len),
            fua,
        },
        Command::WriteZeroes => BlockOp::WriteZeroes {
            offset,
            len: u64::from(len),
            may_unmap: !req.flags.contains(CommandFlags::NO_HOLE),
            fast_only: req.flags.contains(CommandFlags::FAST_ZERO),
            fua,
        },
        Command::Cache => BlockOp::Readahead {
            offset,
            len: u64::from(len),
        },
        Command::BlockStatus => {
            let mut kinds = Vec::with_capacity(t.contexts.len());
            for ctx in &t.contexts {
                if ctx.name == proto::META_BASE_ALLOCATION {
                    kinds.push(StatusKind::Allocation);
                } else if ctx.name.starts_with(META_CHANGED_PREFIX) {
                    // Bound to the backup selected, by its delta's id: gone once that
                    // backup is being released, even if a new backup took its name.
                    kinds.push(StatusKind::ChangedSince(BackupId(ctx.binding)));
                } else {
                    return Some(Err((BlockError::Invalid, "unknown metadata context")));
                }
            }
            if kinds.is_empty() {
                return Some(Err((BlockError::Invalid, "no metadata context selected")));
            }
            let max_extents = if req.flags.contains(CommandFlags::REQ_ONE) {
                1
            } else {
                BLOCK_STATUS_EXTENTS_MAX
            };
            BlockOp::BlockStatus {
                offset,
                len: u64::from(len),
                kinds,
                max_extents,
            }
        }
        Command::Disc | Command::Unknown(_) => return None,
    }))
}

/// Starts one admitted request: submits it through the volume's channel, with
/// the connection's sink and the request's slot as its completion. A full channel
/// pauses reading until it has room (plan §2.7).
fn execute(r: &mut Reactor, conn: &ConnRef, req: Request, payload: Option<IoBuf>) {
    let built = match &conn.borrow().phase {
        Phase::Transmission(t) => block_op(r, t, &req, payload),
        Phase::Handshake(_) => return,
    };
    let op = match built {
        Some(Ok(op)) => op,
        Some(Err((e, message))) => return refuse(r, conn, req, e, message),
        None => return refuse(r, conn, req, BlockError::Invalid, "invalid command"),
    };
    let full = {
        let mut c = conn.borrow_mut();
        let c = &mut *c;
        let slot = c.slots.insert(req);
        let Phase::Transmission(t) = &c.phase else {
            return;
        };
        // The connection stays borrowed across submit: the layer never calls back
        // into it there (`done` and `when_room` hooks run from the ready queue).
        let pressure = t
            .channel
            .submit(r, &t.bdev, op, Done::new(t.sink.clone(), slot));
        let full = pressure == Pressure::Full && !c.blocked_on_layer;
        if full {
            c.blocked_on_layer = true;
        }
        full.then(|| t.channel.clone())
    };
    if let Some(ch) = full {
        let conn2 = conn.clone();
        ch.when_room(r, move |r| {
            conn2.borrow_mut().blocked_on_layer = false;
            process(r, &conn2);
        });
    }
}

/// Replies an error to a request that never reached the block layer.
fn refuse(r: &mut Reactor, conn: &ConnRef, req: Request, e: BlockError, message: &str) {
    let mut out = Vec::new();
    let errno = reply_errno(req.command, e);
    let structured = structured(conn) || req.command == Command::BlockStatus;
    reply::error_reply(&mut out, structured, req.cookie, errno, message);
    if let Phase::Transmission(t) = &conn.borrow().phase {
        bump(&t.volume.label_counters(r.id(), t.bdev.label()).errors, 1);
    }
    finish(r, conn, req, Reply::Bytes(out));
}

/// The connection's requests in flight in the block layer, by slot: the slot is the
/// tag of the request's `Done`. Bounded by the connection's in-flight bound.
#[derive(Default)]
struct Slots {
    reqs: Vec<Option<Request>>,
    free: Vec<u32>,
}

impl Slots {
    fn insert(&mut self, req: Request) -> u64 {
        match self.free.pop() {
            Some(i) => {
                self.reqs[i as usize] = Some(req);
                u64::from(i)
            }
            None => {
                self.reqs.push(Some(req));
                (self.reqs.len() - 1) as u64
            }
        }
    }

    fn take(&mut self, tag: u64) -> Option<Request> {
        let req = self.reqs.get_mut(usize::try_from(tag).ok()?)?.take()?;
        self.free.push(tag as u32);
        Some(req)
    }
}

/// The block layer's completions for one connection.
struct ConnSink(std::rc::Weak<RefCell<Conn>>);

impl IoSink for ConnSink {
    fn complete(&self, r: &mut Reactor, tag: u64, res: IoResult) {
        // A connection lives while it has requests in flight (`maybe_finish`).
        let Some(conn) = self.0.upgrade() else { return };
        let Some(req) = conn.borrow_mut().slots.take(tag) else {
            debug_assert!(false, "completion for an unknown slot {tag}");
            return;
        };
        match req.command {
            Command::Read => {
                let res = res.map(|out| match out {
                    IoOutput::Read(ReadData::Data(DataBuf::Own(b))) => Some(b.into_io()),
                    _ => None, // zeros
                });
                complete_read(r, &conn, req, res)
            }
            Command::BlockStatus => block_status_reply(r, &conn, req, res),
            _ => complete(r, &conn, req, res.map(|_| ())),
        }
    }
}

/// BLOCK_STATUS: one reply chunk per selected context, all computed by the layer
/// against one pinned stack, so they describe the same instant. A context that
/// cannot be answered fails the whole request (EINVAL, with the reason).
fn block_status_reply(r: &mut Reactor, conn: &ConnRef, req: Request, res: IoResult) {
    let contexts = match &conn.borrow().phase {
        Phase::Transmission(t) => t.contexts.clone(),
        Phase::Handshake(_) => Vec::new(),
    };
    let mut out = Vec::new();
    let lists = match res {
        Ok(IoOutput::Status(lists)) if lists.iter().all(|l| !l.is_empty()) => lists,
        Ok(_) => {
            // An answer with nothing in it counts as an error, as before the layer.
            if let Phase::Transmission(t) = &conn.borrow().phase {
                bump(&t.volume.label_counters(r.id(), t.bdev.label()).errors, 1);
            }
            reply::error_reply(
                &mut out,
                true,
                req.cookie,
                NbdErrno::Inval,
                "no metadata context selected",
            );
            return finish(r, conn, req, Reply::Bytes(out));
        }
        Err(BlockError::Invalid) => {
            let message = "that backup was released: changes since it are no longer tracked";
            reply::error_reply(&mut out, true, req.cookie, NbdErrno::Inval, message);
            return finish(r, conn, req, Reply::Bytes(out));
        }
        Err(e) => {
            let e = reply_errno(req.command, e);
            reply::error_reply(&mut out, true, req.cookie, e, errno_message(e));
            return finish(r, conn, req, Reply::Bytes(out));
        }
    };
    for (i, (ctx, list)) in contexts.iter().zip(&lists).enumerate() {
        let which = if ctx.name == proto::META_BASE_ALLOCATION {
            NbdContext::BaseAllocation
        } else {
            NbdContext::Changed
        };
        let extents = nbd_extents(which, list);
        reply::put_block_status(&mut out, req.cookie, ctx.id, &extents, i + 1 == lists.len());
    }
    finish(r, conn, req, Reply::Bytes(out));
}

fn complete(r: &mut Reactor, conn: &ConnRef, req: Request, res: Result<(), BlockError>) {
    let structured = structured(conn);
    let mut out = Vec::new();
    match res {
        Ok(()) => reply::success_reply(&mut out, structured, req.cookie),
        Err(e) => {
            let e = reply_errno(req.command, e);
            reply::error_reply(&mut out, structured, req.cookie, e, errno_message(e))
        }
    }
    finish(r, conn, req, Reply::Bytes(out));
}

/// Replies to a READ with data (`None` = zeros without a buffer, for null).
fn complete_read(
    r: &mut Reactor,
    conn: &ConnRef,
    req: Request,
    res: Result<Option<IoBuf>, BlockError>,
) {
    let structured = structured(conn);
    let len = req.length as usize;
    let reply = match res {
        Err(e) => {
            let mut out = Vec::new();
            let e = reply_errno(req.command, e);
            reply::error_reply(&mut out, structured, req.cookie, e, errno_message(e));
            return finish(r, conn, req, Reply::Bytes(out));
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
    finish(r, conn, req, reply);
}

/// Queues the reply, releases the request's budget and resumes a paused reader.
/// (Errors and latency are counted by the block layer, or by the caller for requests
/// that never reached it.)
fn finish(r: &mut Reactor, conn: &ConnRef, req: Request, reply: Reply) {
    let was_paused;
    {
        let mut c = conn.borrow_mut();
        was_paused = paused(&c);
        c.in_flight -= 1;
        if matches!(req.command, Command::Read | Command::Write) {
            c.in_flight_bytes -= req.length as usize;
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
    queue_kick(r, conn);
    if was_paused {
        process(r, conn);
    } else {
        maybe_finish(r, conn);
    }
}

/// Sends the replies of a request later in this loop iteration, after the other
/// completions of the iteration (the block layer's ready queue, the reactor's
/// completions), so that they go in one sendmsg: the kick poller runs after the
/// block layer's (`install`), and re-arms the receive after them (`process`).
/// Without the poller (a reactor without `install`), at once.
fn queue_kick(r: &mut Reactor, conn: &ConnRef) {
    let Some(set) = r.local::<ReactorConns>() else {
        kick_send(r, conn);
        return post_recv(r, conn);
    };
    let mut c = conn.borrow_mut();
    if !c.kick_queued {
        c.kick_queued = true;
        set.dirty.borrow_mut().push(conn.clone());
    }
}

/// The kick poller: sends what `queue_kick` left for this iteration. Pops one at a
/// time (the list keeps its allocation; nothing here queues more).
fn kick_queued(r: &mut Reactor, set: &ReactorConns) -> PollResult {
    let mut work = PollResult::Idle;
    loop {
        let Some(conn) = set.dirty.borrow_mut().pop() else {
            return work;
        };
        work = PollResult::Busy;
        conn.borrow_mut().kick_queued = false;
        kick_send(r, &conn);
        post_recv(r, &conn);
        maybe_finish(r, &conn);
    }
}

/// Sends queued replies: one sendmsg at a time per socket, batching replies.
fn kick_send(r: &mut Reactor, conn: &ConnRef) {
    if conn.borrow().tls.is_some() {
        return kick_send_tls(r, conn);
    }
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
        Ok(id) => send_submitted(r, conn, c, id, total),
        Err(rej) => {
            // Slab full: keep the bytes, in order, and retry shortly.
            let mut bytes = Vec::with_capacity(total);
            for (b, &l) in rej.op.into_bufs().iter().zip(&lens_copy) {
                bytes.extend_from_slice(&b.as_slice()[..l]);
            }
            c.tx.push_front(Reply::Bytes(bytes));
            drop(c);
            retry_send_soon(r, conn);
        }
    }
}

/// A send was submitted (plain or TLS): one outstanding per socket, carrying
/// `reply_bytes` of queued replies; a client that stops reading is watched.
fn send_submitted(
    r: &mut Reactor,
    conn: &ConnRef,
    mut c: std::cell::RefMut<'_, Conn>,
    id: OpId,
    reply_bytes: usize,
) {
    c.send_outstanding = true;
    c.send_op = Some(id);
    c.sending_bytes = reply_bytes;
    c.last_progress = Instant::now();
    let watch = stalled_on_client(&c) && c.stall_timer.is_none();
    drop(c);
    if watch {
        arm_stall_timer(r, conn);
    }
}

/// The slab had no room for a send: try again shortly (the bytes stay queued).
fn retry_send_soon(r: &mut Reactor, conn: &ConnRef) {
    let conn2 = conn.clone();
    r.add_timer(std::time::Duration::from_micros(50), move |r| {
        kick_send(r, &conn2)
    });
}

/// The bytes of a queued reply, as two pieces (header and data).
fn reply_pieces(rep: &Reply) -> [&[u8]; 2] {
    match rep {
        Reply::Bytes(b) => [&b[..], &[]],
        Reply::Data { header, buf, len } => [&header[..], &buf.as_slice()[..*len]],
    }
}

/// Encrypts up to `TLS_SEND_BATCH_BYTES` of queued replies (only once the previous
/// ciphertext is out: module docs of `tls.rs`, bounds) and takes rustls's records.
/// The batch goes to rustls in one vectored write, so replies share full records
/// (a reply's header and data, and many small replies, are not a record each).
fn fill_tls(tls: &mut TlsConn, tx: &mut VecDeque<Reply>) -> Result<(), super::tls::TlsFailed> {
    if tls.established && tls.wire_out.is_empty() {
        let mut pieces: Vec<std::io::IoSlice<'_>> = Vec::new();
        let mut moved = 0usize;
        let mut done = 0usize; // replies sent whole
        let mut from = tls.front_offset;
        for rep in tx.iter() {
            if moved >= TLS_SEND_BATCH_BYTES {
                break;
            }
            let [a, b] = reply_pieces(rep);
            let total = a.len() + b.len();
            let upto = total.min(from + (TLS_SEND_BATCH_BYTES - moved));
            let (a_from, a_to) = (from.min(a.len()), upto.min(a.len()));
            let (b_from, b_to) = (from.max(a.len()) - a.len(), upto.max(a.len()) - a.len());
            pieces.extend(
                [&a[a_from..a_to], &b[b_from..b_to]]
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(std::io::IoSlice::new),
            );
            moved += upto - from;
            if upto < total {
                from = upto;
                break;
            }
            done += 1;
            from = 0;
        }
        tls.encrypt(&pieces, moved)?;
        drop(pieces);
        tx.drain(..done);
        tls.front_offset = from;
        tls.wire_plain += moved;
    }
    tls.drain_records()
}

/// [`kick_send`] for a TLS connection: one send of ciphertext at a time.
fn kick_send_tls(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    if c.send_outstanding || c.sock.is_none() || c.state == State::Aborting {
        return;
    }
    let cref = &mut *c;
    let Some(tls) = cref.tls.as_mut() else { return };
    if let Err(e) = fill_tls(tls, &mut cref.tx) {
        tracing::info!(conn = cref.id, error = %e.0, "TLS failed; closing");
        drop(c);
        return begin_close(r, conn, State::Aborting);
    }
    if tls.wire_out.is_empty() {
        return;
    }
    let bytes = std::mem::take(&mut tls.wire_out);
    let plain = std::mem::take(&mut tls.wire_plain);
    let total = bytes.len();
    let conn2 = conn.clone();
    let op = Op::sendmsg(cref.sref, vec![bytes.into()], &[total]);
    match r.submit(op, move |r, comp| {
        on_sent_tls(r, &conn2, comp, total, plain)
    }) {
        Ok(id) => send_submitted(r, conn, c, id, plain),
        Err(rej) => {
            // Slab full: keep the ciphertext, in order, and retry shortly.
            let buf = rej.op.into_bufs().into_iter().next();
            if let (Some(tls), Some(IoBuf::Vec(v))) = (c.tls.as_mut(), buf) {
                tls.wire_out = v;
                tls.wire_plain = plain;
            }
            drop(c);
            retry_send_soon(r, conn);
        }
    }
}

/// A ciphertext send completed: release its reply bytes, keep an unsent tail.
fn on_sent_tls(r: &mut Reactor, conn: &ConnRef, comp: Completion, total: usize, plain: usize) {
    let res = comp.result;
    let resume;
    {
        let mut c = conn.borrow_mut();
        c.send_outstanding = false;
        c.send_op = None;
        c.sending_bytes = 0;
        let was_paused = paused(&c);
        // The batch's reply bytes are encrypted: what is left is bounded ciphertext.
        c.unsent_bytes = c.unsent_bytes.saturating_sub(plain);
        if res > 0 {
            c.last_progress = Instant::now();
        }
        resume = was_paused && !paused(&c);
        if res < 0 {
            if -res != libc::ECANCELED {
                tracing::debug!(conn = c.id, errno = -res, "send failed; closing");
            }
            c.state = State::Aborting;
            clear_tx(&mut c);
        } else if let (Some(tls), Some(IoBuf::Vec(mut v))) =
            (c.tls.as_mut(), comp.op.into_bufs().into_iter().next())
        {
            // The sent buffer becomes `wire_out` again: an unsent tail moves to its
            // front in place, and a fully sent one keeps its capacity, so the next
            // batch's records are not written into a new, growing Vec each send
            // (bounded by one batch of ciphertext per connection).
            v.truncate(total);
            v.drain(..(res as usize).min(total));
            v.append(&mut tls.wire_out);
            tls.wire_out = v;
        }
    }
    kick_send(r, conn);
    if resume {
        process(r, conn);
    } else {
        maybe_finish(r, conn);
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
            if let Some(tls) = c.tls.as_mut() {
                // Sent in the clear before STARTTLS took over: the rest still goes in
                // the clear, ahead of the ACK and the TLS records (`start_tls`).
                let mut clear = Vec::new();
                for rep in &rest {
                    let [a, b] = reply_pieces(rep);
                    clear.extend_from_slice(a);
                    clear.extend_from_slice(b);
                }
                tls.wire_plain += clear.len();
                clear.append(&mut tls.wire_out);
                tls.wire_out = clear;
            } else {
                for rep in rest.into_iter().rev() {
                    c.tx.push_front(rep);
                }
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
    let wire_idle = c.tls.as_ref().is_none_or(|t| t.wire_out.is_empty());
    let idle = c.recv_op.is_none()
        && !c.send_outstanding
        && c.in_flight == 0
        && ((c.tx.is_empty() && wire_idle) || c.state == State::Aborting);
    if c.state == State::Open || c.state == State::Closed || !idle {
        return;
    }
    if c.state == State::Draining {
        // A clean close ends the TLS session with close_notify, sent last (GnuTLS
        // clients report a close without it as a truncation).
        if let Some(tls) = c.tls.as_mut().filter(|t| t.established && !t.close_sent) {
            tls.close_sent = true;
            tls.conn.send_close_notify();
            drop(c);
            kick_send(r, conn); // its completion calls maybe_finish again
            if !conn.borrow().send_outstanding {
                // Nothing went out (no record, or a send to retry): close now or
                // when the retried send completes (`wire_out` keeps us not idle).
                maybe_finish(r, conn);
            }
            return;
        }
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
