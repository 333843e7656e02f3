//! The transmission phase on ringblk reactors: each connection keeps `iodepth`
//! requests in flight on its socket and records the latency of every one.
//!
//! # One send and one receive in flight per connection
//! Requests are appended to a buffer; at most one `send` per socket is in flight and
//! the next one takes everything queued meanwhile (batching under load, one syscall
//! for many requests). Two concurrent sends on one stream socket could interleave
//! their bytes if the first were partial, so they are never issued. One `recv` into a
//! large buffer is always armed; replies are parsed in place by the sans-IO codec,
//! the tail of an incomplete reply is moved to the front, and the next `recv` fills
//! the rest.
//!
//! # Latency
//! As `stream` defines it, ending at the receive completion that delivered the
//! reply. Replies that arrive in one receive share a timestamp: that is when the
//! client learnt of them.
//!
//! The workload (what to issue, stop rules, rate, verify, accounting) is `stream`'s
//! [`Issuer`] and [`Tally`], shared with the vhost transport; this module only moves
//! NBD bytes.
//!
//! # Ownership
//! Buffers lent to the kernel live in the reactor's slab inside the `Op` until the
//! final CQE; the connection gets them back in the completion. A connection closes
//! its socket only when neither its send nor its receive is in flight.
//!
//! # Cancellation
//! A failing connection does not cancel ops: it shuts the socket down, which makes
//! the kernel complete them, and finishes when both are back.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::sys::socket::Shutdown;
use ringblk_reactor::{Completion, FileRef, IoBuf, Op, Reactor, ReactorConfig, ReactorPool};

use crate::connect::Connection;
use crate::stream::{
    ConnResult, EngineOpts, Issuer, Next, Outcome, PhaseResult, Progress, Tally, Timing,
};
use crate::workload::Phase;
use ringblk_nbd::client::{parse_reply, put_request, Cmd, Parsed};
use ringblk_nbd::proto;

/// How long a server may take to close after `NBD_CMD_DISC` before the client
/// closes anyway.
const DISC_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
struct Slot {
    busy: bool,
    seq: u32,
    cmd: Cmd,
    offset: u64,
    len: u32,
    t0: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    /// `NBD_CMD_DISC` queued; waiting for it to be sent and the server to close.
    Disconnecting,
    /// Socket shut down; waiting for the in-flight send/receive to come back.
    Closing,
    Finished,
}

type ConnRc = Rc<RefCell<Conn>>;

struct Conn {
    idx: usize,
    file: FileRef,
    fd: Option<OwnedFd>,
    phase: Arc<Phase>,
    issuer: Issuer,
    tally: Tally,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_use: u32,
    tx_next: Vec<u8>,
    tx_spare: Vec<u8>,
    tx_busy: bool,
    rx: Option<Vec<u8>>,
    rx_filled: usize,
    rx_busy: bool,
    timer_armed: bool,
    flushed: bool,
    state: State,
    progress: Arc<Progress>,
    done: mpsc::Sender<(usize, ConnResult)>,
}

impl Conn {
    fn new(
        r: &mut Reactor,
        idx: usize,
        fd: OwnedFd,
        phase: Arc<Phase>,
        timing: Timing,
        progress: Arc<Progress>,
        done: mpsc::Sender<(usize, ConnResult)>,
    ) -> Result<Conn, String> {
        let file = r
            .register_file(fd.as_raw_fd())
            .map_err(|e| format!("register socket with the ring: {e}"))?;
        let depth = phase.iodepth.max(1);
        let bs = phase.bs as usize;
        let slot = Slot {
            busy: false,
            seq: 0,
            cmd: Cmd::Read,
            offset: 0,
            len: 0,
            t0: timing.start,
        };
        let rx_cap = (4 * (proto::SIMPLE_REPLY_HEADER_LEN + bs)).max(256 * 1024);
        Ok(Conn {
            idx,
            file,
            fd: Some(fd),
            issuer: Issuer::new(&phase, idx, &timing),
            tally: Tally::new(&phase, &timing, &progress),
            slots: vec![slot; depth as usize],
            free: (0..depth).rev().collect(),
            in_use: 0,
            tx_next: Vec::with_capacity(64 * 1024),
            tx_spare: Vec::with_capacity(64 * 1024),
            tx_busy: false,
            rx: Some(vec![0u8; rx_cap]),
            rx_filled: 0,
            rx_busy: false,
            timer_armed: false,
            flushed: false,
            state: State::Running,
            phase,
            progress,
            done,
        })
    }

    fn start(rc: &ConnRc, r: &mut Reactor) {
        let mut me = rc.borrow_mut();
        me.arm_recv(rc, r);
        let now = Instant::now();
        me.refill(rc, r, now);
        me.kick(rc, r);
        me.maybe_disconnect(rc, r);
    }

    // ----- issuing --------------------------------------------------------------

    /// Queues requests until the depth is full or a stop rule says no more.
    fn refill(&mut self, rc: &ConnRc, r: &mut Reactor, now: Instant) {
        while self.state == State::Running && !self.free.is_empty() {
            match self.issuer.next(now) {
                Next::Issue { write, offset, t0 } => {
                    self.queue(if write { Cmd::Write } else { Cmd::Read }, offset, t0)
                }
                Next::Wait(due) => {
                    self.arm_rate_timer(rc, r, due.saturating_duration_since(now));
                    break;
                }
                Next::Stop => break,
            }
        }
    }

    fn queue(&mut self, cmd: Cmd, offset: u64, t0: Instant) {
        let Some(i) = self.free.pop() else {
            debug_assert!(false, "queue() without a free slot");
            return;
        };
        let len = if cmd == Cmd::Flush { 0 } else { self.phase.bs };
        let s = &mut self.slots[i as usize];
        debug_assert!(!s.busy);
        s.seq = s.seq.wrapping_add(1);
        *s = Slot {
            busy: true,
            cmd,
            offset,
            len,
            t0,
            seq: s.seq,
        };
        self.in_use += 1;
        let cookie = (u64::from(s.seq) << 32) | u64::from(i);
        put_request(&mut self.tx_next, cmd, 0, cookie, offset, len);
        if cmd == Cmd::Write {
            let at = self.tx_next.len();
            self.tx_next.resize(at + len as usize, 0);
            self.issuer.fill_write(&mut self.tx_next[at..], offset);
        }
    }

    fn arm_rate_timer(&mut self, rc: &ConnRc, r: &mut Reactor, after: Duration) {
        if self.timer_armed {
            return;
        }
        self.timer_armed = true;
        let rc2 = rc.clone();
        r.add_timer(after, move |r| {
            let mut me = rc2.borrow_mut();
            me.timer_armed = false;
            if me.state != State::Running {
                return;
            }
            me.refill(&rc2, r, Instant::now());
            me.kick(&rc2, r);
            // The deadline may have passed while nothing was in flight: no completion
            // would come to end the connection.
            me.maybe_disconnect(&rc2, r);
        });
    }

    // ----- sending ----------------------------------------------------------------

    /// Starts a send of everything queued, unless one is in flight.
    fn kick(&mut self, rc: &ConnRc, r: &mut Reactor) {
        if self.tx_busy || self.tx_next.is_empty() || self.state == State::Closing {
            return;
        }
        let buf = std::mem::replace(&mut self.tx_next, std::mem::take(&mut self.tx_spare));
        let len = buf.len() as u32;
        self.submit_send(rc, r, IoBuf::Vec(buf), 0, len);
    }

    fn submit_send(&mut self, rc: &ConnRc, r: &mut Reactor, buf: IoBuf, start: u32, len: u32) {
        let rc2 = rc.clone();
        let op = Op::send(self.file, buf, start, len);
        match r.submit(op, move |r, c| Conn::on_send(&rc2, r, c)) {
            Ok(_) => self.tx_busy = true,
            Err(_) => self.fail(r, "reactor slab full (send)".into()),
        }
    }

    fn on_send(rc: &ConnRc, r: &mut Reactor, c: Completion) {
        let mut me = rc.borrow_mut();
        me.tx_busy = false;
        let res = c.bytes();
        let Op::Send {
            buf, start, len, ..
        } = c.op
        else {
            unreachable!("on_send gets its send op back")
        };
        if me.state == State::Closing {
            return me.try_finish(r);
        }
        match res {
            Err(libc::EINTR) | Err(libc::EAGAIN) => me.submit_send(rc, r, buf, start, len),
            Err(e) => me.fail(r, format!("send: {}", std::io::Error::from_raw_os_error(e))),
            Ok(n) if n < len => me.submit_send(rc, r, buf, start + n, len - n),
            Ok(_) => {
                if let IoBuf::Vec(mut v) = buf {
                    v.clear();
                    me.tx_spare = v;
                }
                if me.state == State::Disconnecting && me.tx_next.is_empty() {
                    // DISC is out: the server closes; our receive then sees EOF.
                    me.shutdown(Shutdown::Write);
                    let rc2 = rc.clone();
                    r.add_timer(DISC_GRACE, move |r| {
                        let mut me = rc2.borrow_mut();
                        if me.state == State::Disconnecting {
                            me.state = State::Closing;
                            me.shutdown(Shutdown::Both);
                            me.try_finish(r);
                        }
                    });
                }
                me.kick(rc, r);
            }
        }
    }

    // ----- receiving ----------------------------------------------------------------

    fn arm_recv(&mut self, rc: &ConnRc, r: &mut Reactor) {
        let Some(buf) = self.rx.take() else {
            debug_assert!(false, "receive armed twice");
            return;
        };
        let cap = buf.len();
        debug_assert!(self.rx_filled < cap, "a whole reply always fits");
        let rc2 = rc.clone();
        let op = Op::recv(
            self.file,
            buf,
            self.rx_filled as u32,
            (cap - self.rx_filled) as u32,
        );
        match r.submit(op, move |r, c| Conn::on_recv(&rc2, r, c)) {
            Ok(_) => self.rx_busy = true,
            Err(rej) => {
                if let Some(IoBuf::Vec(v)) = rej.op.into_buf() {
                    self.rx = Some(v);
                }
                self.fail(r, "reactor slab full (recv)".into());
            }
        }
    }

    fn on_recv(rc: &ConnRc, r: &mut Reactor, c: Completion) {
        let now = Instant::now();
        let mut me = rc.borrow_mut();
        me.rx_busy = false;
        let res = c.bytes();
        let Some(IoBuf::Vec(buf)) = c.op.into_buf() else {
            unreachable!("on_recv gets its Vec buffer back")
        };
        me.rx = Some(buf);
        match (me.state, res) {
            (State::Closing, _) => me.try_finish(r),
            (_, Err(libc::EINTR)) | (_, Err(libc::EAGAIN)) => me.arm_recv(rc, r),
            (State::Disconnecting, Ok(0)) => {
                me.state = State::Closing;
                me.try_finish(r);
            }
            (_, Ok(0)) => {
                let n = me.in_use;
                me.fail(
                    r,
                    format!("server closed the connection with {n} request(s) in flight"),
                )
            }
            (_, Err(e)) => me.fail(r, format!("recv: {}", std::io::Error::from_raw_os_error(e))),
            (_, Ok(n)) => {
                me.rx_filled += n as usize;
                if let Err(e) = me.parse_replies(now) {
                    return me.fail(r, e);
                }
                me.refill(rc, r, now);
                me.kick(rc, r);
                me.maybe_disconnect(rc, r);
                if me.state != State::Closing {
                    me.arm_recv(rc, r);
                }
            }
        }
    }

    fn parse_replies(&mut self, now: Instant) -> Result<(), String> {
        let Some(mut buf) = self.rx.take() else {
            return Err("receive buffer missing".into());
        };
        let filled = self.rx_filled;
        let mut pos = 0;
        let (mut ops, mut bytes) = (0u64, 0u64);
        let out = loop {
            let step = parse_reply(&buf[pos..filled], |cookie| self.payload_len(cookie));
            match step {
                Ok(Parsed::Incomplete) => break Ok(()),
                Ok(Parsed::Reply {
                    cookie,
                    error,
                    payload,
                    consumed,
                }) => {
                    bytes += self.complete(cookie, error, payload, now);
                    ops += 1;
                    pos += consumed;
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        buf.copy_within(pos..filled, 0);
        self.rx_filled = filled - pos;
        self.rx = Some(buf);
        self.progress.ops.fetch_add(ops, Ordering::Relaxed);
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        out
    }

    /// The payload a successful reply to `cookie` carries, or `None` if not in flight.
    fn payload_len(&self, cookie: u64) -> Option<u32> {
        let s = self.slots.get((cookie & 0xFFFF_FFFF) as usize)?;
        (s.busy && u64::from(s.seq) == cookie >> 32).then_some(if s.cmd == Cmd::Read {
            s.len
        } else {
            0
        })
    }

    /// Retires one request; returns the bytes it moved.
    fn complete(&mut self, cookie: u64, error: u32, payload: &[u8], now: Instant) -> u64 {
        let i = (cookie & 0xFFFF_FFFF) as u32;
        let s = self.slots[i as usize];
        self.slots[i as usize].busy = false;
        self.free.push(i);
        self.in_use -= 1;
        let outcome = match error {
            0 => Outcome::Ok(payload),
            e => Outcome::Err(proto::errno_name(e).to_string()),
        };
        self.tally
            .complete(s.cmd, s.offset, s.len, s.t0, now, outcome)
    }

    // ----- the end ------------------------------------------------------------------

    fn maybe_disconnect(&mut self, rc: &ConnRc, r: &mut Reactor) {
        if self.state != State::Running || self.issuer.issuing() || self.in_use > 0 {
            return;
        }
        if self.phase.flush_at_end && !self.flushed {
            self.flushed = true;
            self.queue(Cmd::Flush, 0, Instant::now());
            return self.kick(rc, r);
        }
        self.state = State::Disconnecting;
        put_request(&mut self.tx_next, Cmd::Disc, 0, 0, 0, 0);
        self.kick(rc, r);
    }

    /// Shuts the socket down (the descriptor stays open until both ops are back).
    /// ENOTCONN — the peer already went — changes nothing, so errors are ignored.
    fn shutdown(&self, how: Shutdown) {
        if let Some(fd) = &self.fd {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), how);
        }
    }

    fn fail(&mut self, r: &mut Reactor, why: String) {
        self.tally.fatal(why);
        self.issuer.stop();
        self.state = State::Closing;
        self.shutdown(Shutdown::Both);
        self.try_finish(r);
    }

    /// Reports and closes once the kernel holds nothing of this connection.
    fn try_finish(&mut self, r: &mut Reactor) {
        if self.state != State::Closing || self.tx_busy || self.rx_busy {
            return;
        }
        self.state = State::Finished;
        if let Err(e) = r.unregister_file(self.file) {
            self.tally
                .result
                .fatal
                .get_or_insert(format!("unregister socket: {e}"));
        }
        self.fd = None; // close
        let res = std::mem::take(&mut self.tally.result);
        // The receiver outlives every connection unless the run was abandoned.
        let _ = self.done.send((self.idx, res));
    }
}

/// Runs one phase over already-negotiated connections. `on_tick` is called about
/// every `tick` with the progress counters and the phase start (for a progress line).
pub fn run_phase(
    phase: Arc<Phase>,
    conns: Vec<Connection>,
    opts: EngineOpts,
    tick: Duration,
    mut on_tick: impl FnMut(&Progress, Instant),
) -> Result<PhaseResult, String> {
    let n = conns.len();
    let reactors = opts.reactors.clamp(1, n.max(1));
    let per_reactor = n.div_ceil(reactors);
    let config = ReactorConfig {
        cores: vec![None; reactors],
        idle: opts.idle,
        // Sockets only: no disk buffers to register.
        buffer_count: 0,
        // Per connection: one send, one receive, a timer; plus headroom.
        max_in_flight: 4 * per_reactor + 64,
        ring_entries: (4 * per_reactor + 64).next_power_of_two().min(4096) as u32,
        ..ReactorConfig::default()
    };
    let pool = ReactorPool::start(config, Arc::new(|_r: &mut Reactor| {}))
        .map_err(|e| format!("reactor: {e}"))?;
    let progress = Arc::new(Progress::default());
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let timing = Timing::for_phase(&phase, start);
    for (idx, c) in conns.into_iter().enumerate() {
        let (phase, progress, tx) = (phase.clone(), progress.clone(), tx.clone());
        let h = &pool.handles()[idx % reactors];
        let sent = h.send_blocking(
            move |r| match Conn::new(r, idx, c.fd, phase, timing, progress, tx.clone()) {
                Ok(conn) => {
                    let rc = Rc::new(RefCell::new(conn));
                    Conn::start(&rc, r);
                }
                Err(e) => {
                    let _ = tx.send((
                        idx,
                        ConnResult {
                            fatal: Some(e),
                            ..ConnResult::default()
                        },
                    ));
                }
            },
            Duration::from_secs(10),
        );
        if let Err(e) = sent {
            pool.shutdown();
            return Err(format!("cannot start connection {idx}: {e}"));
        }
    }
    drop(tx);
    let mut result = PhaseResult::new(phase.clone());
    let mut last_completion: Option<Instant> = None;
    let (mut seen_ops, mut last_progress) = (0u64, Instant::now());
    let mut done = 0;
    while done < n {
        match rx.recv_timeout(tick) {
            Ok((idx, c)) => {
                last_completion = last_completion.max(c.last_completion);
                result.merge_stream("conn", idx, c);
                done += 1;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                result
                    .fatal
                    .push(format!("{} connection(s) never reported", n - done));
                break;
            }
        }
        on_tick(&progress, start);
        let ops = progress.ops.load(Ordering::Relaxed);
        if ops != seen_ops {
            (seen_ops, last_progress) = (ops, Instant::now());
        } else if last_progress.elapsed() > opts.stall_timeout && phase.rate_iops.is_none() {
            // Reactor threads may hold wedged sockets: leave them to process exit.
            return Err(format!(
                "no operation completed for {:?}: server stalled?",
                opts.stall_timeout
            ));
        }
    }
    pool.shutdown();
    result.finish(&timing, last_completion);
    Ok(result)
}
