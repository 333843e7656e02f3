//! One iSCSI connection on one reactor: login ([`crate::login::Login`]), then the full
//! feature phase: SCSI commands as block requests through one `Channel`, Data-In with
//! status, Data-Out with R2T, NOP-Out/In, Task Management, Text, Logout and Reject.
//!
//! # Ownership
//! A connection lives in an `Rc<RefCell<Conn>>` held by its reactor's table and by the
//! callbacks of its socket operations and block requests (`Done::from_fn`).
//!
//! # Ordering
//! PDUs are handled in arrival order; commands run concurrently and are answered in
//! completion order. StatSN is assigned when a response is queued, and the queue is
//! sent in order by one send at a time, so StatSN rises on the wire.
//!
//! # Panics
//! None on input: every PDU field, CDB and Data-Out offset is checked (by the decoder,
//! [`crate::scsi::decode`] and [`crate::r2t::WriteTransfer`]) before it is used.
//!
//! # Bounds and back-pressure
//! At most [`WINDOW`] non-immediate commands run at once: the CmdSN window
//! ([`crate::window::CmdWindow`]) never grants more (commands past MaxCmdSN are
//! dropped); immediate commands beyond [`IMMEDIATE_MAX`] get TASK SET FULL. A write's
//! buffer is at most twice the maximum transfer, and a connection holds at most
//! `WRITE_BYTES_MAX` of them (TASK SET FULL past it); one receive buffer (`RX_BYTES`)
//! is processed whole once read. Reading stops while `TX_MAX_BYTES` of responses
//! are unsent, while the volume's channel reported `Pressure::Full` (until
//! `when_room`), during a logout and with more than 4 task management requests
//! waiting; never for the window itself, since writes waiting for Data-Out need
//! reading to go on. A reactor whose op slab is full delays a receive or a send
//! (retried after `SLAB_RETRY`); it never closes the connection.
//!
//! # Errors
//! Block errors become sense data only through [`crate::scsi::sense_for`]. A PDU the
//! decoder refuses, or a Data-Out that does not fit its transfer, closes the connection
//! (ErrorRecoveryLevel 0); an opcode we do not serve is answered with a Reject.
//!
//! # Task management
//! A block request cannot be recalled: ABORT TASK, ABORT TASK SET, LUN RESET and
//! TARGET WARM RESET mark the tasks aborted (no response is sent for them), drop those
//! still waiting for Data-Out, and answer once the aborted tasks' block requests have
//! finished.
//!
//! # Idle
//! Every [`PING_INTERVAL`] without a received byte the target sends a NOP-In ping; a
//! ping unanswered for [`PING_TIMEOUT`] closes the connection.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringblk_reactor::{Completion, FileRef, IoBuf, Op, OpId, Reactor};
use ringblk_target::bdev::{
    BackupId, Bdev, BlockOp, Channel, DataBuf, Done, IoOutput, IoResult, OwnBuf, Pressure,
    ReadData, StatusKind, View,
};
use ringblk_target::error::BlockError;
use ringblk_target::extent::ExtentFlags;

use super::{IscsiShared, SessionInfo};
use crate::discovery::TextExchange;
use crate::login::{Login, LoginConfig, LoginStep, SessionParams, SessionType};
use crate::pdu::{
    self, Bhs, DataOut, DecoderLimits, Digests, LogoutResponse, NopIn, Pdu, PduDecoder, R2t,
    ScsiCommand, TaskMgmtRequest, TaskMgmtResponse, RESERVED_TAG,
};
use crate::r2t::{BurstParams, WriteTransfer};
use crate::response::{data_in, scsi_response, Sns};
use crate::scsi::pages::{self, Identity, Provisioning};
use crate::scsi::pr::{PrError, Reservations};
use crate::scsi::sense::status;
use crate::scsi::{self, sense_for, Device, ScsiRequest, Sense};
use crate::window::{Admit, CmdWindow};

/// Non-immediate commands running at once (the CmdSN window).
pub const WINDOW: u32 = 64;
/// Immediate commands running at once.
pub const IMMEDIATE_MAX: usize = 8;
/// Receive buffer.
const RX_BYTES: usize = 256 * 1024;
/// Unsent response bytes at which reading stops.
const TX_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Bytes gathered into one send at most.
const SEND_MAX_BYTES: usize = 1024 * 1024;
/// PDUs gathered into one send at most (well under IOV_MAX).
const SEND_MAX_PDUS: usize = 64;
/// Wait before submitting again when the reactor's op slab was full.
const SLAB_RETRY: Duration = Duration::from_micros(50);
/// Idle time before a NOP-In ping, and how long the answer may take.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
pub const PING_TIMEOUT: Duration = Duration::from_secs(15);
/// Login must complete within this.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Extents one GET LBA STATUS asks the block layer for.
const LBA_STATUS_EXTENTS: u32 = 256;
/// Largest WRITE SAME with a non-zero pattern, in bytes (written as one buffer).
const WRITE_SAME_PATTERN_MAX: u64 = 32 << 20;
/// Maximum transfer length advertised (and the bound on one write's buffer).
const MAX_TRANSFER_BYTES: u32 = 8 << 20;
/// Write buffers one connection holds at most; a write past it gets TASK SET FULL.
const WRITE_BYTES_MAX: usize = 64 << 20;

type ConnRef = Rc<RefCell<Conn>>;

#[derive(Default)]
struct Conns(RefCell<HashMap<u64, ConnRef>>);

pub(super) fn install(r: &mut Reactor) {
    if r.local::<Conns>().is_none() {
        r.set_local(Rc::new(Conns::default()));
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Open,
    /// Flush what is queued, then close (logout, EOF).
    Draining,
    Closed,
}

/// What a finished command answers.
enum Answer {
    Data(Vec<u8>),
    Check(Sense),
    Status(u8),
}

enum TaskState {
    /// Collecting Data-Out.
    Data { xfer: WriteTransfer, buf: Vec<u8> },
    /// Block requests running (`parts` of them).
    Running,
}

struct Task {
    cmd: ScsiCommand,
    req: ScsiRequest,
    state: TaskState,
    parts: u32,
    /// Write buffer bytes counted in `Ff::write_bytes` until the task ends.
    held: usize,
    err: Option<BlockError>,
    aborted: bool,
    /// Data-In of a read (or the result page), built by parts.
    data: Vec<u8>,
    /// VERIFY with BYTCHK: what the initiator sent, compared to what was read.
    compare: Option<Vec<u8>>,
}

struct Volume {
    bdev: Bdev,
    channel: Channel,
    dev: Device,
    id: Identity,
    name: String,
    nexus: String,
}

struct Ff {
    params: SessionParams,
    window: CmdWindow,
    stat_sn: u32,
    text: TextExchange,
    cfg: LoginConfig,
    vol: Option<Volume>,
    tasks: HashMap<u32, Task>,
    immediate: usize,
    /// Bytes of write buffers held by tasks (at most [`WRITE_BYTES_MAX`]).
    write_bytes: usize,
    next_ttt: u32,
    /// TMF responses waiting for the named tasks to finish.
    tmf: Vec<(TaskMgmtRequest, HashSet<u32>)>,
    logout: Option<pdu::LogoutRequest>,
    /// A NOP-In ping sent at this time, not answered yet.
    ping: Option<Instant>,
    blocked_on_layer: bool,
}

pub(crate) struct Conn {
    id: u64,
    sock: Option<OwnedFd>,
    sref: FileRef,
    shared: Arc<IscsiShared>,
    state: State,
    dec: PduDecoder,
    digests: Digests,
    login: Option<Box<Login>>,
    ff: Option<Box<Ff>>,
    recv_op: Option<OpId>,
    /// The receive buffer while no receive holds it: reused, not allocated per read.
    rx: Option<Vec<u8>>,
    send_op: Option<OpId>,
    /// A [`retry_soon`] timer is pending.
    retry_armed: bool,
    tx: VecDeque<Vec<u8>>,
    tx_bytes: usize,
    last_rx: Instant,
    started: Instant,
}

fn entropy() -> [u8; 17] {
    let mut e = [0u8; 17];
    // SAFETY: getrandom writes at most `e.len()` bytes into the live local array.
    let n = unsafe { libc::getrandom(e.as_mut_ptr().cast(), e.len(), 0) };
    if n != e.len() as isize {
        // No entropy source: mix the clock in rather than fail the login.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in e.iter_mut().enumerate() {
            *b ^= (t >> ((i % 16) * 8)) as u8;
        }
    }
    e
}

pub(super) fn start(r: &mut Reactor, shared: Arc<IscsiShared>, sock: OwnedFd, id: u64) {
    install(r);
    let cfg = shared.login_config();
    let login = Login::new(cfg, entropy(), shared.tsih(), 1);
    let sref = FileRef::Raw(sock.as_raw_fd());
    let conn = Rc::new(RefCell::new(Conn {
        id,
        sock: Some(sock),
        sref,
        shared,
        state: State::Open,
        dec: PduDecoder::new(DecoderLimits::default()),
        digests: Digests::default(),
        login: Some(Box::new(login)),
        ff: None,
        recv_op: None,
        rx: None,
        send_op: None,
        retry_armed: false,
        tx: VecDeque::new(),
        tx_bytes: 0,
        last_rx: Instant::now(),
        started: Instant::now(),
    }));
    if let Some(c) = r.local::<Conns>() {
        c.0.borrow_mut().insert(id, conn.clone());
    }
    schedule_tick(r, &conn);
    post_recv(r, &conn);
}

fn schedule_tick(r: &mut Reactor, conn: &ConnRef) {
    let weak = Rc::downgrade(conn);
    r.add_timer(Duration::from_secs(1), move |r| {
        if let Some(c) = weak.upgrade() {
            tick(r, &c);
        }
    });
}

/// Login timeout, NOP-In pings and their timeout.
fn tick(r: &mut Reactor, conn: &ConnRef) {
    let mut close = false;
    {
        let mut c = conn.borrow_mut();
        if c.state == State::Closed {
            return;
        }
        let now = Instant::now();
        let idle = now.duration_since(c.last_rx);
        let c = &mut *c;
        match c.ff.as_mut() {
            None => close = now.duration_since(c.started) > LOGIN_TIMEOUT,
            Some(ff) => match ff.ping {
                Some(t) if now.duration_since(t) > PING_TIMEOUT => close = true,
                None if idle >= PING_INTERVAL && c.state == State::Open => {
                    ff.ping = Some(now);
                    let nop = Bhs::NopIn(NopIn {
                        lun: 0,
                        itt: RESERVED_TAG,
                        ttt: 1,
                        // A ping carries StatSN without advancing it.
                        stat_sn: ff.stat_sn,
                        exp_cmd_sn: ff.window.exp_cmd_sn(),
                        max_cmd_sn: ff.window.max_cmd_sn(),
                    });
                    let d = c.digests;
                    queue(c, d, &Pdu::new(nop, Vec::new()));
                }
                _ => {}
            },
        }
    }
    if close {
        tracing::debug!("iscsi connection timed out");
        close_now(r, conn);
        return;
    }
    flush(r, conn);
    schedule_tick(r, conn);
}

fn queue(c: &mut Conn, digests: Digests, pdu: &Pdu) {
    match pdu.to_bytes(digests) {
        Ok(b) => {
            c.tx_bytes += b.len();
            c.tx.push_back(b);
        }
        Err(e) => tracing::warn!("iscsi: cannot encode a response: {e}"),
    }
}

fn paused(c: &Conn) -> bool {
    if c.tx_bytes >= TX_MAX_BYTES {
        return true;
    }
    match &c.ff {
        Some(ff) => {
            // Not the window: it bounds commands already (the initiator sends none past
            // MaxCmdSN), and writes waiting for Data-Out need reading to go on.
            ff.blocked_on_layer || ff.logout.is_some() || ff.tmf.len() > 4
        }
        None => false,
    }
}

fn post_recv(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    if c.state != State::Open || c.recv_op.is_some() || paused(&c) {
        return;
    }
    let buf = c.rx.take().unwrap_or_else(|| vec![0u8; RX_BYTES]);
    let op = Op::recv(c.sref, buf, 0, RX_BYTES as u32);
    let conn2 = conn.clone();
    match r.submit(op, move |r, comp| on_recv(r, &conn2, comp)) {
        Ok(id) => c.recv_op = Some(id),
        Err(rej) => {
            c.rx = match rej.op.into_buf() {
                Some(IoBuf::Vec(v)) => Some(v),
                _ => None,
            };
            drop(c);
            retry_soon(r, conn);
        }
    }
}

fn on_recv(r: &mut Reactor, conn: &ConnRef, comp: Completion) {
    let n = match comp.bytes() {
        Ok(n) => n as usize,
        Err(_) => 0,
    };
    let buf = comp.op.into_buf();
    {
        let mut c = conn.borrow_mut();
        c.recv_op = None;
        if c.state == State::Closed {
            drop(c);
            maybe_release(r, conn);
            return;
        }
        if n == 0 {
            c.state = State::Draining;
        } else {
            c.last_rx = Instant::now();
        }
    }
    if let Some(buf) = buf {
        let mut input = &buf.as_slice()[..n.min(buf.len())];
        while !input.is_empty() {
            let fed = conn.borrow_mut().dec.feed(input);
            match fed {
                Ok((used, pdu)) => {
                    input = &input[used.min(input.len())..];
                    if let Some(pdu) = pdu {
                        handle_pdu(r, conn, pdu);
                    } else if used == 0 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("iscsi: closing a connection: {e}");
                    close_now(r, conn);
                    return;
                }
            }
            if conn.borrow().state == State::Closed {
                return;
            }
        }
        if let IoBuf::Vec(v) = buf {
            conn.borrow_mut().rx = Some(v);
        }
    }
    after_io(r, conn);
}

/// Flushes, reads on, or closes once drained.
fn after_io(r: &mut Reactor, conn: &ConnRef) {
    flush(r, conn);
    post_recv(r, conn);
    let done = {
        let c = conn.borrow();
        c.state == State::Draining
            && c.tx.is_empty()
            && c.send_op.is_none()
            && c.ff.as_ref().is_none_or(|f| f.tasks.is_empty())
    };
    if done {
        close_now(r, conn);
    }
}

fn flush(r: &mut Reactor, conn: &ConnRef) {
    let mut c = conn.borrow_mut();
    if c.send_op.is_some() || c.tx.is_empty() || c.state == State::Closed {
        return;
    }
    // One gather send of the queued PDUs as they are: no copy into one buffer.
    let mut bufs: Vec<IoBuf> = Vec::new();
    let mut lens = Vec::new();
    let mut total = 0usize;
    while total < SEND_MAX_BYTES && bufs.len() < SEND_MAX_PDUS {
        let Some(b) = c.tx.pop_front() else { break };
        total += b.len();
        lens.push(b.len());
        bufs.push(b.into());
    }
    let op = Op::sendmsg(c.sref, bufs, &lens);
    let conn2 = conn.clone();
    match r.submit(op, move |r, comp| on_sent(r, &conn2, comp, total)) {
        Ok(id) => c.send_op = Some(id),
        Err(rej) => {
            requeue_unsent(&mut c.tx, rej.op.into_bufs(), 0);
            drop(c);
            retry_soon(r, conn);
        }
    }
}

/// The reactor's op slab was full: try the receive and the send again shortly instead
/// of failing a healthy connection (back-pressure, not failure; the NBD session does
/// the same). One retry timer per connection at a time.
fn retry_soon(r: &mut Reactor, conn: &ConnRef) {
    {
        let mut c = conn.borrow_mut();
        if c.retry_armed {
            return;
        }
        c.retry_armed = true;
    }
    let weak = Rc::downgrade(conn);
    r.add_timer(SLAB_RETRY, move |r| {
        if let Some(c) = weak.upgrade() {
            c.borrow_mut().retry_armed = false;
            after_io(r, &c);
        }
    });
}

fn on_sent(r: &mut Reactor, conn: &ConnRef, comp: Completion, total: usize) {
    let res = comp.bytes();
    let bufs = comp.op.into_bufs();
    {
        let mut c = conn.borrow_mut();
        c.send_op = None;
        if c.state == State::Closed {
            drop(c);
            maybe_release(r, conn);
            return;
        }
        match res {
            Ok(n) if n > 0 => {
                let n = (n as usize).min(total);
                c.tx_bytes = c.tx_bytes.saturating_sub(n);
                if n < total {
                    requeue_unsent(&mut c.tx, bufs, n);
                }
            }
            _ => {
                drop(c);
                close_now(r, conn);
                return;
            }
        }
    }
    after_io(r, conn);
}

/// Puts back, at the head of `tx` and in order, what a short send left of `bufs`
/// after its first `sent` bytes.
fn requeue_unsent(tx: &mut VecDeque<Vec<u8>>, bufs: Vec<IoBuf>, mut sent: usize) {
    let mut rest = Vec::new();
    for b in bufs {
        let len = b.len();
        if sent >= len {
            sent -= len;
            continue;
        }
        let v = match b {
            IoBuf::Vec(mut v) => {
                v.drain(..sent);
                v
            }
            other => other.as_slice()[sent..].to_vec(),
        };
        sent = 0;
        rest.push(v);
    }
    for v in rest.into_iter().rev() {
        tx.push_front(v);
    }
}

/// Stops all I/O on the socket; the descriptor closes once no operation refers to it.
fn close_now(r: &mut Reactor, conn: &ConnRef) {
    {
        let mut c = conn.borrow_mut();
        if c.state == State::Closed {
            return;
        }
        c.state = State::Closed;
        if let Some(id) = c.recv_op {
            r.cancel(id);
        }
        if let Some(id) = c.send_op {
            r.cancel(id);
        }
        let id = c.id;
        // I_T nexus loss releases its legacy reservation (SPC-2 §5.5.1).
        if let Some(vol) = c.ff.as_ref().and_then(|f| f.vol.as_ref()) {
            let _ = with_reservations(&c.shared, &vol.name, |p| p.release_legacy(&vol.nexus));
        }
        if let Ok(mut s) = c.shared.sessions.lock() {
            s.remove(&id);
        }
        c.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(n) = c.shared.per_reactor.get(r.id()) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
    maybe_release(r, conn);
}

fn maybe_release(r: &mut Reactor, conn: &ConnRef) {
    let id = {
        let mut c = conn.borrow_mut();
        if c.recv_op.is_some() || c.send_op.is_some() {
            return;
        }
        c.sock = None;
        c.tx.clear();
        c.id
    };
    if let Some(t) = r.local::<Conns>() {
        t.0.borrow_mut().remove(&id);
    }
}

fn sns(ff: &Ff) -> Sns {
    Sns {
        stat_sn: ff.stat_sn,
        exp_cmd_sn: ff.window.exp_cmd_sn(),
        max_cmd_sn: ff.window.max_cmd_sn(),
    }
}

fn handle_pdu(r: &mut Reactor, conn: &ConnRef, pdu: Pdu) {
    let mut guard = conn.borrow_mut();
    let c = &mut *guard;
    if let Some(login) = c.login.as_mut() {
        match login.handle(&pdu) {
            LoginStep::Continue(p) => {
                let d = c.digests;
                queue(c, d, &p);
            }
            LoginStep::Fail { response, error } => {
                tracing::debug!("iscsi login refused: {error}");
                let d = c.digests;
                queue(c, d, &response);
                c.login = None;
                c.state = State::Draining;
            }
            LoginStep::Complete { response, params } => {
                let d = c.digests;
                queue(c, d, &response);
                c.login = None;
                let cfg = c.shared.login_config();
                match enter_ff(r, c, params, cfg) {
                    Ok(ff) => c.ff = Some(ff),
                    Err(()) => c.state = State::Draining,
                }
            }
        }
        return;
    }
    let Some(ff) = c.ff.as_mut() else {
        c.state = State::Draining;
        return;
    };
    let d = c.digests;
    match pdu.bhs {
        Bhs::ScsiCommand(cmd) => {
            drop(guard);
            scsi_command(r, conn, cmd, pdu);
        }
        Bhs::DataOut(dout) => {
            drop(guard);
            data_out(r, conn, dout, pdu.data);
        }
        Bhs::NopOut(nop) => {
            if nop.itt == RESERVED_TAG {
                // The answer to our ping.
                ff.ping = None;
                return;
            }
            if ff.window.admit(nop.cmd_sn, nop.immediate) == Admit::Drop {
                return;
            }
            if !nop.immediate {
                ff.window.complete();
            }
            let s = sns(ff);
            ff.stat_sn = ff.stat_sn.wrapping_add(1);
            let reply = Bhs::NopIn(NopIn {
                lun: nop.lun,
                itt: nop.itt,
                ttt: RESERVED_TAG,
                stat_sn: s.stat_sn,
                exp_cmd_sn: s.exp_cmd_sn,
                max_cmd_sn: s.max_cmd_sn,
            });
            queue(c, d, &Pdu::new(reply, pdu.data));
        }
        Bhs::TextRequest(req) => {
            if ff.window.admit(req.cmd_sn, req.immediate) == Admit::Drop {
                return;
            }
            if !req.immediate {
                ff.window.complete();
            }
            match ff.text.handle(&req, &pdu.data, &ff.cfg, &ff.params) {
                Ok(reply) => {
                    let s = sns(ff);
                    ff.stat_sn = ff.stat_sn.wrapping_add(1);
                    let p = reply.to_pdu(req.lun, s.stat_sn, s.exp_cmd_sn, s.max_cmd_sn);
                    queue(c, d, &p);
                }
                Err(e) => {
                    tracing::debug!("iscsi text request refused: {e}");
                    reject(c, pdu::reject_reason::PROTOCOL_ERROR);
                }
            }
        }
        Bhs::TaskMgmtRequest(tmf) => {
            drop(guard);
            task_mgmt(r, conn, tmf);
        }
        Bhs::LogoutRequest(req) => {
            let _ = ff.window.admit(req.cmd_sn, req.immediate);
            if !req.immediate {
                ff.window.complete();
            }
            ff.logout = Some(req);
            drop(guard);
            maybe_logout(conn);
        }
        _ => reject(c, pdu::reject_reason::COMMAND_NOT_SUPPORTED),
    }
}

fn reject(c: &mut Conn, reason: u8) {
    let d = c.digests;
    let header = *c.dec.last_header();
    let Some(ff) = c.ff.as_mut() else { return };
    let s = sns(ff);
    ff.stat_sn = ff.stat_sn.wrapping_add(1);
    let p = pdu::reject(reason, &header, s.stat_sn, s.exp_cmd_sn, s.max_cmd_sn);
    queue(c, d, &p);
}

/// FNV-1a of the volume name: its unit serial and NAA id until those are persisted.
fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn enter_ff(
    r: &mut Reactor,
    c: &mut Conn,
    params: SessionParams,
    cfg: LoginConfig,
) -> Result<Box<Ff>, ()> {
    c.digests = Digests {
        header: params.header_digest,
        data: params.data_digest,
    };
    c.dec.reconfigure(
        c.digests,
        DecoderLimits {
            data_segment_max_bytes: params.max_recv_data_segment_length_bytes,
            ..DecoderLimits::default()
        },
    );
    let mut target_name = String::new();
    let vol = if params.session_type == SessionType::Normal {
        let Some(entry) = params.target.and_then(|i| cfg.targets.get(i)) else {
            return Err(());
        };
        target_name = entry.name.clone();
        let Some((vname, backup)) = crate::names::parse_target_name(&c.shared.prefix, &entry.name)
        else {
            return Err(());
        };
        let Some(v) = c.shared.target.registry().get(&vname) else {
            return Err(());
        };
        let view = match &backup {
            None => View::Live,
            Some(b) => View::Backup(BackupId(v.ready_backup_delta(b).ok_or(())?)),
        };
        let bdev = Bdev::open(v.clone(), view, c.shared.label).map_err(|_| ())?;
        let channel = bdev.channel(r);
        let g = bdev.geometry();
        let caps = bdev.capabilities();
        let dev = Device {
            read_only: caps.read_only,
            thin: caps.unmap,
            write_cache: caps.flush,
            max_transfer_bytes: MAX_TRANSFER_BYTES,
            // UNMAP and WRITE SAME ranges as long as a transfer: a WRITE SAME with a
            // pattern is written from one buffer, and libiscsi wants at most 1 Mi blocks.
            max_unmap_blocks: MAX_TRANSFER_BYTES / g.block_size.max(1),
            ..Device::with_capacity(g.size_bytes, g.block_size)
        };
        let h = name_hash(&vname);
        let id = Identity::new(
            "ringblk volume",
            &format!("{h:016x}"),
            (u128::from(h) << 64) | u128::from(name_hash(&entry.name)),
        );
        let isid: String = params.isid.iter().map(|b| format!("{b:02x}")).collect();
        let nexus = format!("{},i,0x{isid}", params.initiator_name);
        Some(Volume {
            bdev,
            channel,
            dev,
            id,
            name: vname,
            nexus,
        })
    } else {
        None
    };
    let window = CmdWindow::new(params.exp_cmd_sn, WINDOW);
    if let Ok(mut s) = c.shared.sessions.lock() {
        s.insert(
            c.id,
            SessionInfo {
                initiator: params.initiator_name.clone(),
                target: target_name,
                tsih: params.tsih,
                reactor: r.id(),
                exp_cmd_sn: window.exp_cmd_sn(),
                max_cmd_sn: window.max_cmd_sn(),
            },
        );
    }
    Ok(Box::new(Ff {
        stat_sn: params.stat_sn,
        params,
        window,
        text: TextExchange::new(),
        cfg,
        vol,
        tasks: HashMap::new(),
        immediate: 0,
        write_bytes: 0,
        next_ttt: 1,
        tmf: Vec::new(),
        logout: None,
        ping: None,
        blocked_on_layer: false,
    }))
}

/// Answers `cmd` at once (no task, no block request).
fn answer_now(c: &mut Conn, cmd: &ScsiCommand, a: Answer, slot: bool) {
    let d = c.digests;
    let Some(ff) = c.ff.as_mut() else { return };
    if slot && !cmd.immediate {
        ff.window.complete();
    }
    let pdus = build_answer(ff, cmd, a, None);
    for p in &pdus {
        queue(c, d, p);
    }
}

/// `out_len`: the Data-Out length the CDB asks for (`None`: as the EDTL says); the
/// residual of a write is counted against it.
fn build_answer(ff: &mut Ff, cmd: &ScsiCommand, a: Answer, out_len: Option<u64>) -> Vec<Pdu> {
    let s = sns(ff);
    ff.stat_sn = ff.stat_sn.wrapping_add(1);
    let edtl = cmd.expected_data_len;
    match a {
        Answer::Data(data) if cmd.read && !data.is_empty() && edtl > 0 => {
            let seq = data_in(
                cmd.itt,
                &data,
                edtl,
                ff.params.max_xmit_data_segment_length_bytes,
                s,
                true,
            );
            let mut pdus = seq.pdus;
            if !seq.status_sent {
                pdus.push(scsi_response(
                    cmd.itt,
                    status::GOOD,
                    None,
                    edtl,
                    data.len() as u64,
                    0,
                    s,
                ));
            }
            pdus
        }
        Answer::Data(data) => {
            // Writes, commands without data, and data the initiator expects none of
            // (EDTL 0: all of it is overflow residual).
            let moved = if cmd.write || out_len.is_some_and(|n| n > 0) {
                out_len.unwrap_or(u64::from(edtl))
            } else {
                data.len() as u64
            };
            vec![scsi_response(
                cmd.itt,
                status::GOOD,
                None,
                edtl,
                moved,
                0,
                s,
            )]
        }
        Answer::Check(sense) => vec![scsi_response(
            cmd.itt,
            status::CHECK_CONDITION,
            Some(&sense),
            edtl,
            0,
            0,
            s,
        )],
        Answer::Status(st) => vec![scsi_response(cmd.itt, st, None, edtl, 0, 0, s)],
    }
}

fn scsi_command(r: &mut Reactor, conn: &ConnRef, cmd: ScsiCommand, pdu: Pdu) {
    let mut guard = conn.borrow_mut();
    let c = &mut *guard;
    let Some(ff) = c.ff.as_mut() else { return };
    if ff.window.admit(cmd.cmd_sn, cmd.immediate) == Admit::Drop {
        return;
    }
    if ff.tasks.contains_key(&cmd.itt) {
        reject(c, pdu::reject_reason::PROTOCOL_ERROR);
        if let Some(ff) = c.ff.as_mut() {
            if !cmd.immediate {
                ff.window.complete();
            }
        }
        return;
    }
    if cmd.immediate && ff.immediate >= IMMEDIATE_MAX {
        answer_now(c, &cmd, Answer::Status(status::TASK_SET_FULL), true);
        return;
    }
    let Some(vol) = ff.vol.as_ref() else {
        // A discovery session carries no SCSI commands.
        reject(c, pdu::reject_reason::PROTOCOL_ERROR);
        if let Some(ff) = c.ff.as_mut() {
            if !cmd.immediate {
                ff.window.complete();
            }
        }
        return;
    };
    let cdb = match pdu.cdb() {
        Ok(Some(cdb)) => cdb,
        _ => cmd.cdb.to_vec(),
    };
    if scsi::lun_index(cmd.lun) != Some(0) {
        let sense = Sense::LUN_NOT_SUPPORTED;
        // REPORT LUNS and INQUIRY answer on any LUN; everything else is refused.
        if !matches!(cdb.first(), Some(0xa0) | Some(0x12)) {
            answer_now(c, &cmd, Answer::Check(sense), true);
            return;
        }
    }
    let req = match scsi::decode(&cdb, &vol.dev) {
        Ok(req) => req,
        Err(sense) => {
            answer_now(c, &cmd, Answer::Check(sense), true);
            return;
        }
    };
    let out_len = req.data_out_len(&vol.dev);
    let bp = BurstParams::from(&ff.params);
    if matches!(
        req,
        ScsiRequest::CompareAndWrite { .. } | ScsiRequest::WriteSame { ndob: false, .. }
    ) && u64::from(cmd.expected_data_len) != out_len
    {
        // SBC-4 §5.3: a Data-Out size other than twice the blocks (one block for WRITE
        // SAME) is refused (libiscsi's InvalidDataOutSize tests expect this sense); with
        // 0 blocks (256
        // does not fit the CDB's byte) the CDB itself is at fault.
        let sense = if out_len == 0 {
            Sense::INVALID_FIELD_IN_CDB
        } else {
            Sense::new(crate::scsi::sense::key::ILLEGAL_REQUEST, 0, 0)
        };
        answer_now(c, &cmd, Answer::Check(sense), true);
        return;
    }
    let state = if out_len > 0 {
        // A WRITE whose EDTL disagrees with its CDB writes the smaller of the two (whole
        // blocks) and reports the residual, as libiscsi's iSCSIResiduals expects; other
        // commands need all their parameter data.
        let is_write = matches!(req, ScsiRequest::Write { .. });
        if !is_write && (!cmd.write || u64::from(cmd.expected_data_len) < out_len) {
            answer_now(c, &cmd, Answer::Check(Sense::INVALID_FIELD_IN_CDB), true);
            return;
        }
        let edtl = cmd.expected_data_len;
        if edtl > MAX_TRANSFER_BYTES * 2 + 4096 {
            answer_now(c, &cmd, Answer::Check(Sense::INVALID_FIELD_IN_CDB), true);
            return;
        }
        let imm = pdu.data.len() as u32;
        let xfer = match WriteTransfer::new(bp, edtl, imm, cmd.final_) {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!("iscsi: bad write data: {e}");
                drop(guard);
                close_now(r, conn);
                return;
            }
        };
        if ff.write_bytes + edtl as usize > WRITE_BYTES_MAX {
            // Enough write data held already: the initiator retries later.
            answer_now(c, &cmd, Answer::Status(status::TASK_SET_FULL), true);
            return;
        }
        ff.write_bytes += edtl as usize;
        let mut buf = vec![0u8; edtl as usize];
        let n = pdu.data.len().min(buf.len());
        buf[..n].copy_from_slice(&pdu.data[..n]);
        TaskState::Data { xfer, buf }
    } else {
        TaskState::Running
    };
    if cmd.immediate {
        ff.immediate += 1;
    }
    let held = match &state {
        TaskState::Data { buf, .. } => buf.len(),
        TaskState::Running => 0,
    };
    // `held > 0` only in the Data state, so the state alone says it.
    let waiting = matches!(state, TaskState::Data { .. });
    ff.tasks.insert(
        cmd.itt,
        Task {
            cmd,
            req,
            state,
            parts: 0,
            held,
            err: None,
            aborted: false,
            data: Vec::new(),
            compare: None,
        },
    );
    drop(guard);
    if waiting {
        data_progress(r, conn, cmd.itt);
    } else {
        execute(r, conn, cmd.itt, Vec::new());
    }
}

/// Sends the R2Ts a write's transfer asks for, or executes it once its data is in.
fn data_progress(r: &mut Reactor, conn: &ConnRef, itt: u32) {
    let mut guard = conn.borrow_mut();
    let c = &mut *guard;
    let d = c.digests;
    let Some(ff) = c.ff.as_mut() else { return };
    let Some(task) = ff.tasks.get_mut(&itt) else {
        return;
    };
    let TaskState::Data { xfer, .. } = &mut task.state else {
        return;
    };
    if xfer.is_complete() {
        let TaskState::Data { buf, .. } = std::mem::replace(&mut task.state, TaskState::Running)
        else {
            return;
        };
        drop(guard);
        execute(r, conn, itt, buf);
        return;
    }
    let lun = task.cmd.lun;
    let mut r2ts = Vec::new();
    loop {
        let ttt = ff.next_ttt;
        let Some(x) = (match &mut ff.tasks.get_mut(&itt).map(|t| &mut t.state) {
            Some(TaskState::Data { xfer, .. }) => xfer.next_r2t(ttt),
            _ => None,
        }) else {
            break;
        };
        ff.next_ttt = ff.next_ttt.wrapping_add(1).max(1);
        if ff.next_ttt == RESERVED_TAG {
            ff.next_ttt = 1;
        }
        let s = sns(ff);
        r2ts.push(Pdu::new(
            Bhs::R2t(R2t {
                lun,
                itt,
                ttt: x.ttt,
                stat_sn: s.stat_sn,
                exp_cmd_sn: s.exp_cmd_sn,
                max_cmd_sn: s.max_cmd_sn,
                r2t_sn: x.r2t_sn,
                buffer_offset: x.buffer_offset,
                desired_len: x.desired_len,
            }),
            Vec::new(),
        ));
    }
    for p in &r2ts {
        queue(c, d, p);
    }
}

fn data_out(r: &mut Reactor, conn: &ConnRef, dout: DataOut, data: Vec<u8>) {
    let bad = {
        let mut guard = conn.borrow_mut();
        let Some(ff) = guard.ff.as_mut() else { return };
        let Some(task) = ff.tasks.get_mut(&dout.itt) else {
            // Data for a task already answered or aborted: ignored.
            return;
        };
        let TaskState::Data { xfer, buf } = &mut task.state else {
            return;
        };
        match xfer.data_out(&dout, data.len() as u32) {
            Ok(at) => {
                let at = at as usize;
                match buf.get_mut(at..at + data.len()) {
                    Some(dst) => {
                        dst.copy_from_slice(&data);
                        false
                    }
                    None => true,
                }
            }
            Err(e) => {
                tracing::debug!("iscsi: bad Data-Out: {e}");
                true
            }
        }
    };
    if bad {
        close_now(r, conn);
        return;
    }
    data_progress(r, conn, dout.itt);
}

fn submit(r: &mut Reactor, conn: &ConnRef, itt: u32, op: BlockOp) {
    let (bdev, channel) = {
        let mut c = conn.borrow_mut();
        let Some(ff) = c.ff.as_mut() else { return };
        let Some(vol) = ff.vol.as_ref() else { return };
        let pair = (vol.bdev.clone(), vol.channel.clone());
        if let Some(t) = ff.tasks.get_mut(&itt) {
            t.parts += 1;
        }
        pair
    };
    let conn2 = conn.clone();
    let offset = op.range().0;
    let done = Done::from_fn(move |r, res| part_done(r, &conn2, itt, offset, res));
    if channel.submit(r, &bdev, op, done) == Pressure::Full {
        if let Some(ff) = conn.borrow_mut().ff.as_mut() {
            ff.blocked_on_layer = true;
        }
        let conn3 = conn.clone();
        channel.when_room(r, move |r| {
            if let Some(ff) = conn3.borrow_mut().ff.as_mut() {
                ff.blocked_on_layer = false;
            }
            post_recv(r, &conn3);
        });
    }
}

fn check_access(shared: &IscsiShared, vol: &Volume, req: &ScsiRequest) -> Result<(), Answer> {
    let media = matches!(
        req,
        ScsiRequest::Read { .. }
            | ScsiRequest::Write { .. }
            | ScsiRequest::Verify { .. }
            | ScsiRequest::Unmap { .. }
            | ScsiRequest::WriteSame { .. }
            | ScsiRequest::CompareAndWrite { .. }
            | ScsiRequest::SynchronizeCache { .. }
            | ScsiRequest::GetLbaStatus { .. }
            | ScsiRequest::ModeSelect { .. }
    );
    // Under an SPC-2 reservation these conflict too (SPC-2 §5.5.1).
    let legacy_only = matches!(
        req,
        ScsiRequest::ModeSense { .. }
            | ScsiRequest::ReadCapacity10
            | ScsiRequest::ReadCapacity16 { .. }
            | ScsiRequest::StartStopUnit { .. }
    );
    if !media && !legacy_only {
        return Ok(());
    }
    let Ok(map) = shared.reservations.lock() else {
        return Ok(());
    };
    let Some(res) = map.get(&vol.name) else {
        return Ok(());
    };
    if legacy_only {
        return match res.legacy_holder() {
            Some(h) if h != vol.nexus => Err(Answer::Status(status::RESERVATION_CONFLICT)),
            _ => Ok(()),
        };
    }
    match res.check_access(&vol.nexus, req.writes()) {
        Ok(()) => Ok(()),
        Err(PrError::Conflict) => Err(Answer::Status(status::RESERVATION_CONFLICT)),
        Err(PrError::Check(s)) => Err(Answer::Check(s)),
    }
}

fn with_reservations<T>(
    shared: &IscsiShared,
    vol: &str,
    f: impl FnOnce(&mut Reservations) -> T,
) -> Option<T> {
    let mut map = shared.reservations.lock().ok()?;
    Some(f(map.entry(vol.to_string()).or_default()))
}

fn pr_answer<T>(r: Result<T, PrError>, ok: impl FnOnce(T) -> Answer) -> Answer {
    match r {
        Ok(v) => ok(v),
        Err(PrError::Conflict) => Answer::Status(status::RESERVATION_CONFLICT),
        Err(PrError::Check(s)) => Answer::Check(s),
    }
}

fn own(r: &mut Reactor, data: &[u8]) -> DataBuf {
    let mut b = OwnBuf::alloc(r, data.len());
    b.as_mut_slice()[..data.len()].copy_from_slice(data);
    DataBuf::Own(b)
}

/// Runs a task whose data (if any) is in `buf`: answers at once, or submits block
/// requests whose completions answer.
fn execute(r: &mut Reactor, conn: &ConnRef, itt: u32, buf: Vec<u8>) {
    let (req, answer, dev) = {
        let c = conn.borrow();
        let Some(ff) = c.ff.as_ref() else { return };
        let Some(vol) = ff.vol.as_ref() else { return };
        let Some(task) = ff.tasks.get(&itt) else {
            return;
        };
        let req = task.req.clone();
        let answer = match check_access(&c.shared, vol, &req) {
            Err(a) => Some(a),
            Ok(()) => answer_without_io(&c.shared, vol, &req, &buf),
        };
        (req, answer, vol.dev.clone())
    };
    match answer {
        Some(a) => finish(r, conn, itt, Some(a)),
        None => submit_io(r, conn, itt, req, &buf, &dev),
    }
    after_io(r, conn);
}

/// The answer of a command that needs no block request (`None`: it needs some).
fn answer_without_io(
    shared: &IscsiShared,
    vol: &Volume,
    req: &ScsiRequest,
    buf: &[u8],
) -> Option<Answer> {
    let trunc = |d: Vec<u8>, n: usize| Answer::Data(pages::truncate(d, n));
    Some(match &req {
        ScsiRequest::TestUnitReady | ScsiRequest::StartStopUnit { .. } => Answer::Data(Vec::new()),
        ScsiRequest::Inquiry {
            evpd: false,
            alloc_len,
            ..
        } => trunc(pages::inquiry_standard(&vol.id), usize::from(*alloc_len)),
        ScsiRequest::Inquiry {
            page, alloc_len, ..
        } => match pages::inquiry_vpd(*page, &vol.id, &vol.dev) {
            Ok(d) => trunc(d, usize::from(*alloc_len)),
            Err(s) => Answer::Check(s),
        },
        ScsiRequest::ReportLuns { alloc_len, .. } => {
            trunc(pages::report_luns(), *alloc_len as usize)
        }
        ScsiRequest::ReadCapacity10 => Answer::Data(pages::read_capacity10(&vol.dev)),
        ScsiRequest::ReadCapacity16 { alloc_len } => {
            trunc(pages::read_capacity16(&vol.dev), *alloc_len as usize)
        }
        ScsiRequest::ModeSense {
            ten,
            dbd,
            pc,
            page,
            subpage,
            alloc_len,
        } => match pages::mode_sense(&vol.dev, *ten, *dbd, *pc, *page, *subpage) {
            Ok(d) => trunc(d, usize::from(*alloc_len)),
            Err(s) => Answer::Check(s),
        },
        ScsiRequest::ModeSelect { ten, .. } => match pages::mode_select(buf, *ten, &vol.dev) {
            Ok(_) => Answer::Data(Vec::new()),
            Err(s) => Answer::Check(s),
        },
        ScsiRequest::RequestSense { alloc_len } => {
            trunc(Sense::NONE.to_fixed().to_vec(), usize::from(*alloc_len))
        }
        ScsiRequest::Reserve => pr_answer(
            with_reservations(shared, &vol.name, |p| p.reserve_legacy(&vol.nexus))
                .unwrap_or(Ok(())),
            |_| Answer::Data(Vec::new()),
        ),
        ScsiRequest::Release => pr_answer(
            with_reservations(shared, &vol.name, |p| p.release_legacy(&vol.nexus))
                .unwrap_or(Ok(())),
            |_| Answer::Data(Vec::new()),
        ),
        ScsiRequest::PersistentReserveIn { action, alloc_len } => pr_answer(
            with_reservations(shared, &vol.name, |p| p.reserve_in(*action))
                .unwrap_or(Ok(Vec::new())),
            |d| Answer::Data(pages::truncate(d, usize::from(*alloc_len))),
        ),
        ScsiRequest::PersistentReserveOut {
            action,
            scope,
            pr_type,
            ..
        } => pr_answer(
            with_reservations(shared, &vol.name, |p| {
                p.reserve_out(&vol.nexus, *action, *scope, *pr_type, buf)
            })
            .unwrap_or(Ok(Default::default())),
            |_| Answer::Data(Vec::new()),
        ),
        ScsiRequest::Verify { compare: false, .. } => Answer::Data(Vec::new()),
        ScsiRequest::Unmap { .. } => match scsi::parse_unmap(buf, &vol.dev) {
            Ok(ranges) if ranges.is_empty() => Answer::Data(Vec::new()),
            Ok(_) => return None,
            Err(s) => Answer::Check(s),
        },
        _ => return None,
    })
}

/// Submits the block requests of a media command; their completions answer it.
fn submit_io(
    r: &mut Reactor,
    conn: &ConnRef,
    itt: u32,
    req: ScsiRequest,
    buf: &[u8],
    dev: &Device,
) {
    match req {
        ScsiRequest::Read {
            offset_bytes,
            len_bytes,
            ..
        }
        | ScsiRequest::Verify {
            offset_bytes,
            len_bytes,
            compare: true,
        } => {
            if let ScsiRequest::Verify { .. } = req {
                if let Some(ff) = conn.borrow_mut().ff.as_mut() {
                    if let Some(t) = ff.tasks.get_mut(&itt) {
                        t.compare = Some(buf[..len_bytes as usize].to_vec());
                    }
                }
            }
            if len_bytes == 0 {
                finish(r, conn, itt, None);
                return;
            }
            let into = DataBuf::Own(OwnBuf::alloc(r, len_bytes as usize));
            submit(
                r,
                conn,
                itt,
                BlockOp::Read {
                    offset: offset_bytes,
                    len: len_bytes,
                    into,
                },
            );
        }
        ScsiRequest::Write {
            offset_bytes,
            len_bytes,
            fua,
        } => {
            // The smaller of the CDB's length and what the initiator sent, in blocks.
            let bs = dev.block_size_bytes.max(1);
            let len_bytes = len_bytes.min(buf.len() as u32) / bs * bs;
            if len_bytes == 0 {
                finish(r, conn, itt, None);
                return;
            }
            let data = own(r, &buf[..len_bytes as usize]);
            submit(
                r,
                conn,
                itt,
                BlockOp::Write {
                    offset: offset_bytes,
                    len: len_bytes,
                    data,
                    fua,
                },
            );
        }
        ScsiRequest::CompareAndWrite {
            offset_bytes,
            len_bytes,
            fua,
        } => {
            let n = len_bytes as usize;
            let compare = own(r, &buf[..n]);
            let write = own(r, &buf[n..2 * n]);
            submit(
                r,
                conn,
                itt,
                BlockOp::CompareAndWrite {
                    offset: offset_bytes,
                    len: len_bytes,
                    compare,
                    write,
                    fua,
                },
            );
        }
        ScsiRequest::SynchronizeCache { .. } => submit(r, conn, itt, BlockOp::Flush),
        ScsiRequest::Unmap { .. } => {
            let ranges = scsi::parse_unmap(buf, dev).unwrap_or_default();
            for u in ranges {
                submit(
                    r,
                    conn,
                    itt,
                    BlockOp::Unmap {
                        offset: u.offset_bytes,
                        len: u.len_bytes,
                        fua: false,
                    },
                );
            }
        }
        ScsiRequest::WriteSame {
            offset_bytes,
            len_bytes,
            unmap,
            ndob,
        } => {
            let zero = ndob || buf.iter().all(|b| *b == 0);
            if len_bytes == 0 {
                finish(r, conn, itt, None);
            } else if zero {
                submit(
                    r,
                    conn,
                    itt,
                    BlockOp::WriteZeroes {
                        offset: offset_bytes,
                        len: len_bytes,
                        may_unmap: unmap,
                        fast_only: false,
                        fua: false,
                    },
                );
            } else if len_bytes > WRITE_SAME_PATTERN_MAX {
                // A non-zero pattern cannot deallocate: with UNMAP it is written anyway
                // (deallocation is the device server's choice, SBC-4 5.50). Too long a
                // pattern is refused rather than buffered.
                finish(
                    r,
                    conn,
                    itt,
                    Some(Answer::Check(Sense::INVALID_FIELD_IN_CDB)),
                );
            } else {
                let bs = dev.block_size_bytes as usize;
                let mut pattern = Vec::with_capacity(len_bytes as usize);
                while pattern.len() < len_bytes as usize {
                    pattern.extend_from_slice(&buf[..bs.min(buf.len())]);
                }
                let data = own(r, &pattern);
                submit(
                    r,
                    conn,
                    itt,
                    BlockOp::Write {
                        offset: offset_bytes,
                        len: len_bytes as u32,
                        data,
                        fua: false,
                    },
                );
            }
        }
        ScsiRequest::GetLbaStatus { offset_bytes, .. } => {
            let len = dev.capacity_bytes.saturating_sub(offset_bytes).min(1 << 30);
            if len == 0 {
                finish(r, conn, itt, Some(Answer::Check(Sense::LBA_OUT_OF_RANGE)));
                return;
            }
            submit(
                r,
                conn,
                itt,
                BlockOp::BlockStatus {
                    offset: offset_bytes,
                    len,
                    kinds: vec![StatusKind::Allocation],
                    max_extents: LBA_STATUS_EXTENTS,
                },
            );
        }
        _ => finish(r, conn, itt, Some(Answer::Check(Sense::INVALID_OPCODE))),
    }
}

fn part_done(r: &mut Reactor, conn: &ConnRef, itt: u32, offset: u64, res: IoResult) {
    let last = {
        let mut c = conn.borrow_mut();
        let Some(ff) = c.ff.as_mut() else { return };
        let dev = ff.vol.as_ref().map(|v| v.dev.clone());
        let Some(t) = ff.tasks.get_mut(&itt) else {
            return;
        };
        t.parts = t.parts.saturating_sub(1);
        match res {
            Err(e) => {
                if t.err.is_none() {
                    t.err = Some(e);
                }
            }
            // The layer's buffer may be longer than the request (a pool buffer): only
            // the requested bytes are the data.
            Ok(IoOutput::Read(ReadData::Data(DataBuf::Own(b)))) => {
                let n = read_len(&t.req).min(b.len());
                t.data = b.as_slice()[..n].to_vec();
            }
            Ok(IoOutput::Read(ReadData::Zeroes(_))) => t.data = vec![0; read_len(&t.req)],
            Ok(IoOutput::Read(ReadData::Data(_))) => {}
            Ok(IoOutput::Status(lists)) => {
                let mut at = offset;
                let mut ext = Vec::new();
                for e in lists.first().map(|l| l.as_slice()).unwrap_or(&[]) {
                    let p = if e.flags.contains(ExtentFlags::UNALLOCATED) {
                        Provisioning::Deallocated
                    } else {
                        Provisioning::Mapped
                    };
                    ext.push((at, e.length_bytes, p));
                    at += e.length_bytes;
                }
                if let (Some(dev), ScsiRequest::GetLbaStatus { alloc_len, .. }) = (dev, &t.req) {
                    let d = pages::get_lba_status(&dev, &ext, LBA_STATUS_EXTENTS as usize);
                    t.data = pages::truncate(d, *alloc_len as usize);
                }
            }
            Ok(IoOutput::Complete) => {}
        }
        t.parts == 0
    };
    if last {
        finish(r, conn, itt, None);
    }
}

/// Bytes a READ or VERIFY asks for (0 for other commands).
fn read_len(req: &ScsiRequest) -> usize {
    match *req {
        ScsiRequest::Read { len_bytes, .. } | ScsiRequest::Verify { len_bytes, .. } => {
            len_bytes as usize
        }
        _ => 0,
    }
}

/// Ends a task: its answer (given, or from its block requests), unless aborted.
fn finish(r: &mut Reactor, conn: &ConnRef, itt: u32, given: Option<Answer>) {
    {
        let mut guard = conn.borrow_mut();
        let c = &mut *guard;
        let d = c.digests;
        let Some(ff) = c.ff.as_mut() else { return };
        let Some(task) = ff.tasks.remove(&itt) else {
            return;
        };
        ff.write_bytes = ff.write_bytes.saturating_sub(task.held);
        if task.cmd.immediate {
            ff.immediate = ff.immediate.saturating_sub(1);
        } else {
            ff.window.complete();
        }
        for (_, waits) in ff.tmf.iter_mut() {
            waits.remove(&itt);
        }
        if !task.aborted && c.state != State::Closed {
            let a = given.unwrap_or_else(|| match (&task.err, &task.req) {
                (Some(e), _) => Answer::Check(sense_for(e)),
                (None, ScsiRequest::Verify { .. }) => {
                    let diff = task
                        .compare
                        .as_ref()
                        .and_then(|want| want.iter().zip(&task.data).position(|(a, b)| a != b));
                    match diff {
                        Some(at) => {
                            Answer::Check(sense_for(&BlockError::Miscompare { offset: at as u64 }))
                        }
                        None => Answer::Data(Vec::new()),
                    }
                }
                (None, _) => Answer::Data(task.data),
            });
            let out_len = ff.vol.as_ref().map(|v| task.req.data_out_len(&v.dev));
            let pdus = build_answer(ff, &task.cmd, a, out_len);
            for p in &pdus {
                queue(c, d, p);
            }
        }
        tmf_answers(c);
    }
    maybe_logout(conn);
    after_io(r, conn);
}

fn tmf_answers(c: &mut Conn) {
    let d = c.digests;
    let Some(ff) = c.ff.as_mut() else { return };
    let mut ready = Vec::new();
    ff.tmf.retain(|(req, waits)| {
        if waits.is_empty() {
            ready.push(*req);
            false
        } else {
            true
        }
    });
    let mut pdus = Vec::new();
    for req in ready {
        let s = sns(ff);
        ff.stat_sn = ff.stat_sn.wrapping_add(1);
        pdus.push(Pdu::new(
            Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: 0,
                itt: req.itt,
                stat_sn: s.stat_sn,
                exp_cmd_sn: s.exp_cmd_sn,
                max_cmd_sn: s.max_cmd_sn,
            }),
            Vec::new(),
        ));
    }
    for p in &pdus {
        queue(c, d, p);
    }
}

/// TMF functions (RFC 7143 §11.5.1).
mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    /// Responses.
    pub const NOT_SUPPORTED: u8 = 5;
}

fn task_mgmt(r: &mut Reactor, conn: &ConnRef, req: TaskMgmtRequest) {
    {
        let mut guard = conn.borrow_mut();
        let c = &mut *guard;
        let d = c.digests;
        let Some(ff) = c.ff.as_mut() else { return };
        if ff.window.admit(req.cmd_sn, req.immediate) == Admit::Drop {
            return;
        }
        if !req.immediate {
            ff.window.complete();
        }
        let which: Vec<u32> = match req.function {
            tmf::ABORT_TASK => ff
                .tasks
                .keys()
                .copied()
                .filter(|k| *k == req.referenced_tag)
                .collect(),
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET | tmf::LUN_RESET | tmf::TARGET_WARM_RESET => {
                ff.tasks.keys().copied().collect()
            }
            _ => {
                let s = sns(ff);
                ff.stat_sn = ff.stat_sn.wrapping_add(1);
                let p = Pdu::new(
                    Bhs::TaskMgmtResponse(TaskMgmtResponse {
                        response: tmf::NOT_SUPPORTED,
                        itt: req.itt,
                        stat_sn: s.stat_sn,
                        exp_cmd_sn: s.exp_cmd_sn,
                        max_cmd_sn: s.max_cmd_sn,
                    }),
                    Vec::new(),
                );
                queue(c, d, &p);
                drop(guard);
                after_io(r, conn);
                return;
            }
        };
        if matches!(req.function, tmf::LUN_RESET | tmf::TARGET_WARM_RESET) {
            if let Some(vol) = ff.vol.as_ref() {
                // A reset drops the legacy (RESERVE 6/10) reservation, whoever holds it;
                // persistent ones stay (SPC-5 §5.14).
                let _ = with_reservations(&c.shared, &vol.name, |p| p.reset());
            }
        }
        let Some(ff) = c.ff.as_mut() else { return };
        let mut waits = HashSet::new();
        let mut dropped = Vec::new();
        for itt in which {
            if let Some(t) = ff.tasks.get_mut(&itt) {
                t.aborted = true;
                if matches!(t.state, TaskState::Data { .. }) || t.parts == 0 {
                    dropped.push(itt);
                } else {
                    waits.insert(itt);
                }
            }
        }
        ff.tmf.push((req, waits));
        for itt in dropped {
            if let Some(t) = ff.tasks.remove(&itt) {
                ff.write_bytes = ff.write_bytes.saturating_sub(t.held);
                if t.cmd.immediate {
                    ff.immediate = ff.immediate.saturating_sub(1);
                } else {
                    ff.window.complete();
                }
            }
        }
        tmf_answers(c);
    }
    maybe_logout(conn);
    after_io(r, conn);
}

/// Answers a logout once no task is left.
fn maybe_logout(conn: &ConnRef) {
    let mut guard = conn.borrow_mut();
    let c = &mut *guard;
    let d = c.digests;
    let Some(ff) = c.ff.as_mut() else { return };
    if !ff.tasks.is_empty() {
        return;
    }
    let Some(req) = ff.logout.take() else { return };
    let s = sns(ff);
    ff.stat_sn = ff.stat_sn.wrapping_add(1);
    let p = Pdu::new(
        Bhs::LogoutResponse(LogoutResponse {
            response: 0,
            itt: req.itt,
            stat_sn: s.stat_sn,
            exp_cmd_sn: s.exp_cmd_sn,
            max_cmd_sn: s.max_cmd_sn,
            time2wait: 0,
            time2retain: 0,
        }),
        Vec::new(),
    );
    queue(c, d, &p);
    c.state = State::Draining;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short gather send must put back exactly the unsent bytes, in order, ahead of
    /// what was queued after the send: a lost or reordered byte desynchronises the
    /// initiator's PDU framing.
    #[test]
    fn short_send_requeues_the_rest_in_order() {
        let mut tx = VecDeque::from([b"later".to_vec()]);
        let bufs = vec![
            IoBuf::from(b"abc".to_vec()),
            IoBuf::from(b"defg".to_vec()),
            IoBuf::from(b"hi".to_vec()),
        ];
        requeue_unsent(&mut tx, bufs, 4);
        let got: Vec<Vec<u8>> = tx.into_iter().collect();
        assert_eq!(
            got,
            vec![b"efg".to_vec(), b"hi".to_vec(), b"later".to_vec()]
        );
    }

    #[test]
    fn short_send_on_a_buffer_boundary_requeues_whole_buffers() {
        let mut tx = VecDeque::new();
        let bufs = vec![IoBuf::from(b"abc".to_vec()), IoBuf::from(b"de".to_vec())];
        requeue_unsent(&mut tx, bufs, 3);
        assert_eq!(tx.into_iter().collect::<Vec<_>>(), vec![b"de".to_vec()]);
    }
}
