//! What clients may hold of the server as a whole: the request buffer budget, the
//! handshake slots, and counters of how often clients were pushed back.
//!
//! Per-connection bounds live in the front end's session; this module holds the server-wide ones,
//! so that no number of connections can exhaust the server either.
//!
//! # Buffer budget
//! One budget (`--buffer-budget`) for the memory that request data buffers hold, on
//! every connection together, like SPDK's iobuf pools: a READ's or WRITE's length is
//! taken when its header is decoded, before its buffer exists, and given back as the
//! buffer goes (the WRITE landed, the READ's reply was sent). A connection that cannot
//! get its request's bytes stops reading and waits in one FIFO queue: nobody starves,
//! and a large request is not overtaken forever by small ones. The budget is at least
//! the largest request ([`crate::ops::IO_MAX_BYTES`]), so every valid request
//! runs once what others hold comes back — which it does, because what a connection
//! holds is tied to I/O in flight, to a payload arriving or to replies being read,
//! and the session's request timeout closes a client that stops sending or reading.
//!
//! The fast path is one atomic subtraction; the queue's mutex is taken only while
//! someone waits. Grants to waiters are handed over by message to the waiter's reactor
//! (the front end's `budget_granted`), which gives them back if the connection went away.
//!
//! # Handshake slots
//! Connections still negotiating (`--max-handshakes`) have their own budget, smaller
//! than `--max-connections`, so idle sockets can never take every slot. At the limit
//! the connection that made no progress for the longest time gives way to the new one
//! (least recently active, not oldest: a client that is negotiating moves to the back
//! with each option it sends, so a flood of silent sockets evicts only itself).
//!
//! # Memory
//! Request buffers hold at most the budget. Besides, a connection holds its receive
//! buffer (256 KiB), replies not backed by the budget (256 KiB, overshot by at most
//! the replies of requests already executing) and, while negotiating, one option's
//! data (64 KiB): the server's memory beyond its idle size stays under the budget
//! plus about 1 MiB per connection, whatever the clients do.
//!
//! # Ordering
//! Counters are statistics (relaxed). The budget's `available` and `waiting` use
//! `SeqCst` in the order "announce, then re-check" on both sides, so a release never
//! misses a waiter that a concurrent acquire is queueing (see [`BufferBudget::release`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ops::IO_MAX_BYTES;

/// Default `--buffer-budget`.
pub const DEFAULT_BUFFER_BUDGET_BYTES: u64 = 1 << 30;
/// Default `--max-handshakes`.
pub const DEFAULT_MAX_HANDSHAKES: usize = 128;
/// Default `--request-timeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Repeated warnings (limits reached, accept failures) are logged at most once per
/// this window, with the count of those left out.
pub const WARN_WINDOW: Duration = Duration::from_secs(5);

/// The server-wide limits (`serve` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Bytes request data buffers may hold, all connections together.
    pub buffer_budget_bytes: u64,
    /// Connections in the handshake at once.
    pub max_handshakes: usize,
    /// How long a transmission phase may stall inside a request (payload started and
    /// no byte for this long, or replies holding budget and not read) before the
    /// connection is closed and its budget returned.
    pub request_timeout: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            buffer_budget_bytes: DEFAULT_BUFFER_BUDGET_BYTES,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

impl AdmissionConfig {
    /// Refuses limits under which a valid request could never run.
    pub fn validate(&self) -> Result<(), String> {
        let max = u64::from(IO_MAX_BYTES);
        if self.buffer_budget_bytes < max {
            return Err(format!(
                "--buffer-budget {} bytes is smaller than the largest request (32 MiB): \
                 every valid request must fit in it; use 32M or more",
                self.buffer_budget_bytes
            ));
        }
        if usize::try_from(self.buffer_budget_bytes).is_err() {
            return Err("--buffer-budget is larger than this machine's address space".into());
        }
        if self.max_handshakes == 0 {
            return Err("--max-handshakes must be at least 1".into());
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be at least 1 second".into());
        }
        Ok(())
    }
}

/// A connection waiting for budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub reactor: usize,
    pub conn: u64,
    pub bytes: usize,
}

/// The server-wide budget of request buffer bytes (module docs).
#[derive(Debug)]
pub struct BufferBudget {
    total: usize,
    available: AtomicUsize,
    /// `queue.len()`, readable without the lock.
    waiting: AtomicUsize,
    queue: Mutex<VecDeque<Waiter>>,
}

impl BufferBudget {
    pub fn new(total: usize) -> BufferBudget {
        BufferBudget {
            total,
            available: AtomicUsize::new(total),
            waiting: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes granted and not given back.
    pub fn used(&self) -> usize {
        self.total
            .saturating_sub(self.available.load(Ordering::Relaxed))
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.available
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |a| a.checked_sub(bytes))
            .is_ok()
    }

    /// Takes `w.bytes` (at most the total) for `w`: `true` when granted now;
    /// `false` when `w` was queued, to be granted through a later `release` or
    /// `cancel`. The waiters this call granted in passing are returned to be woken.
    pub fn acquire(&self, w: Waiter) -> (bool, Vec<Waiter>) {
        debug_assert!(w.bytes <= self.total, "request larger than the budget");
        // Nobody waiting: the fast path. Someone waiting: queue behind them (FIFO).
        if self.waiting.load(Ordering::SeqCst) == 0 && self.take(w.bytes) {
            return (true, Vec::new());
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // Announce before re-checking `available`: a `release` that added bytes after
        // our failed `take` either sees this waiter or its bytes are seen below.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        q.push_back(w);
        let mut woken = self.dispatch(&mut q);
        let granted = match woken.iter().position(|x| x.conn == w.conn) {
            Some(i) => {
                woken.remove(i);
                true
            }
            None => false,
        };
        (granted, woken)
    }

    /// Gives `bytes` back; returns the waiters that got their grant (FIFO order).
    pub fn release(&self, bytes: usize) -> Vec<Waiter> {
        if bytes == 0 {
            return Vec::new();
        }
        let prev = self.available.fetch_add(bytes, Ordering::SeqCst);
        debug_assert!(prev + bytes <= self.total, "budget released twice");
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return Vec::new();
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.dispatch(&mut q)
    }

    /// Withdraws `conn`'s wait: `true` if it was still queued (so no grant will come).
    /// Also returns the waiters that its leaving let through.
    pub fn cancel(&self, conn: u64) -> (bool, Vec<Waiter>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pos) = q.iter().position(|w| w.conn == conn) else {
            return (false, Vec::new());
        };
        q.remove(pos);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        (true, self.dispatch(&mut q))
    }

    /// Grants the queue's head while the budget has room for it.
    fn dispatch(&self, q: &mut VecDeque<Waiter>) -> Vec<Waiter> {
        let mut out = Vec::new();
        while let Some(&head) = q.front() {
            if !self.take(head.bytes) {
                break;
            }
            q.pop_front();
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            out.push(head);
        }
        out
    }
}

/// Connections in the handshake, by recency of progress (module docs).
#[derive(Debug)]
pub struct HandshakeSlots {
    max: usize,
    inner: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    next_seq: u64,
    /// Sequence of last progress -> (connection, reactor); first = least recent.
    by_seq: BTreeMap<u64, (u64, usize)>,
    seq_of: HashMap<u64, u64>,
}

impl HandshakeSlots {
    pub fn new(max: usize) -> HandshakeSlots {
        HandshakeSlots {
            max: max.max(1),
            inner: Mutex::new(Slots::default()),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections negotiating now.
    pub fn len(&self) -> usize {
        self.lock().by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `conn` (served on `reactor`). At the limit, or when `make_room` (the
    /// server is at its connection limit), the least recently active negotiating
    /// connection is returned to be closed. `None` when `make_room` finds nobody to
    /// give way: refuse the new connection.
    pub fn admit(
        &self,
        conn: u64,
        reactor: usize,
        make_room: bool,
    ) -> Option<Option<(u64, usize)>> {
        let mut s = self.lock();
        let evict = make_room || s.by_seq.len() >= self.max;
        let evicted = if evict {
            match s.by_seq.pop_first() {
                Some((_, victim)) => {
                    s.seq_of.remove(&victim.0);
                    Some(victim)
                }
                None if make_room => return None,
                None => None,
            }
        } else {
            None
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        s.by_seq.insert(seq, (conn, reactor));
        s.seq_of.insert(conn, seq);
        Some(evicted)
    }

    /// `conn` made progress: it becomes the most recently active.
    pub fn touch(&self, conn: u64) {
        let mut s = self.lock();
        let Some(old) = s.seq_of.get(&conn).copied() else {
            return;
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        if let Some(v) = s.by_seq.remove(&old) {
            s.by_seq.insert(seq, v);
        }
        s.seq_of.insert(conn, seq);
    }

    /// `conn` finished its handshake or closed.
    pub fn remove(&self, conn: u64) {
        let mut s = self.lock();
        if let Some(seq) = s.seq_of.remove(&conn) {
            s.by_seq.remove(&seq);
        }
    }
}

/// How often clients were pushed back, server-wide (the `stats` RPC's `server`).
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    /// Refused at the connection limit with nobody negotiating to give way.
    pub connections_refused: AtomicU64,
    /// Negotiating connections closed to make way for a new one.
    pub handshake_evictions: AtomicU64,
    /// Requests that waited for the buffer budget.
    pub buffer_budget_waits: AtomicU64,
    /// Times a connection stopped reading because its queued replies (those not
    /// backed by the budget: acknowledgements, errors, handshake replies) reached
    /// their bound: a client not reading its replies.
    pub reply_queue_pauses: AtomicU64,
    /// Times a connection stopped reading at its own in-flight bounds (requests or
    /// bytes executing plus replies unsent).
    pub connection_bound_pauses: AtomicU64,
    /// Connections closed because a request stalled (request timeout).
    pub request_timeouts: AtomicU64,
}

/// Adds one to a server-wide counter.
pub fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The `server` section of `stats`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ServerStats {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub handshakes: usize,
    pub max_handshakes: usize,
    pub handshake_evictions: u64,
    pub buffer_budget_bytes: usize,
    pub buffer_budget_used_bytes: usize,
    pub buffer_budget_waiting: usize,
    pub buffer_budget_waits: u64,
    pub reply_queue_pauses: u64,
    pub connection_bound_pauses: u64,
    pub request_timeouts: u64,
    pub request_timeout_secs: u64,
}

/// Logs a repeated warning at most once per window (module docs).
#[derive(Debug)]
pub struct Throttle {
    window: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(window: Duration) -> Throttle {
        Throttle {
            window,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` occurrences left out since the last
    /// one logged; `None`: leave this one out (it is counted).
    pub fn check(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < self.window => {
                s.1 += 1;
                None
            }
            _ => {
                s.0 = Some(now);
                Some(std::mem::take(&mut s.1))
            }
        }
    }
}

/// " (N more in the last 5 s)" for a throttled warning, or nothing.
pub fn more_suffix(left_out: u64) -> String {
    if left_out == 0 {
        String::new()
    } else {
        format!(" ({left_out} more in the last {} s)", WARN_WINDOW.as_secs())
    }
}

/// Everything of this module one server holds.
#[derive(Debug)]
pub struct Admission {
    pub config: AdmissionConfig,
    pub budget: BufferBudget,
    pub handshakes: HandshakeSlots,
    pub counters: Counters,
    /// Server-wide connection ids (the handshake slots and budget waiters name
    /// connections on every reactor).
    pub next_conn_id: AtomicU64,
    pub refuse_warn: Throttle,
    pub evict_warn: Throttle,
    pub accept_warn: Throttle,
}

impl Admission {
    /// `config` must have passed [`AdmissionConfig::validate`].
    pub fn new(config: AdmissionConfig) -> Admission {
        let budget = usize::try_from(config.buffer_budget_bytes).unwrap_or(usize::MAX);
        Admission {
            budget: BufferBudget::new(budget),
            handshakes: HandshakeSlots::new(config.max_handshakes),
            counters: Counters::default(),
            next_conn_id: AtomicU64::new(1),
            refuse_warn: Throttle::new(WARN_WINDOW),
            evict_warn: Throttle::new(WARN_WINDOW),
            accept_warn: Throttle::new(WARN_WINDOW),
            config,
        }
    }

    pub fn stats(&self) -> ServerStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections_accepted: l(&c.connections_accepted),
            connections_refused: l(&c.connections_refused),
            handshakes: self.handshakes.len(),
            max_handshakes: self.handshakes.max(),
            handshake_evictions: l(&c.handshake_evictions),
            buffer_budget_bytes: self.budget.total(),
            buffer_budget_used_bytes: self.budget.used(),
            buffer_budget_waiting: self.budget.waiting(),
            buffer_budget_waits: l(&c.buffer_budget_waits),
            reply_queue_pauses: l(&c.reply_queue_pauses),
            connection_bound_pauses: l(&c.connection_bound_pauses),
            request_timeouts: l(&c.request_timeouts),
            request_timeout_secs: self.config.request_timeout.as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(conn: u64, bytes: usize) -> Waiter {
        Waiter {
            reactor: 0,
            conn,
            bytes,
        }
    }

    #[test]
    fn budget_grants_in_fifo_order_and_never_overcommits() {
        let b = BufferBudget::new(100);
        assert_eq!(b.acquire(w(1, 60)), (true, vec![]));
        // 2 waits for 50; 3 (small) queues behind it rather than overtaking.
        assert_eq!(b.acquire(w(2, 50)), (false, vec![]));
        assert_eq!(b.acquire(w(3, 10)), (false, vec![]));
        assert_eq!(b.waiting(), 2);
        assert_eq!(b.used(), 60);
        // 1 gives back: 2 and then 3 fit, in order.
        assert_eq!(b.release(60), vec![w(2, 50), w(3, 10)]);
        assert_eq!((b.used(), b.waiting()), (60, 0));
        assert_eq!(b.release(50), vec![]);
        assert_eq!(b.release(10), vec![]);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_cancelled_waiter_lets_the_next_through() {
        let b = BufferBudget::new(100);
        assert!(b.acquire(w(1, 70)).0);
        assert!(!b.acquire(w(2, 80)).0);
        assert!(!b.acquire(w(3, 20)).0);
        // 2 leaves: 3 fits in what is left at once.
        assert_eq!(b.cancel(2), (true, vec![w(3, 20)]));
        assert_eq!(b.cancel(2), (false, vec![]));
        assert_eq!(b.used(), 90);
    }

    #[test]
    fn concurrent_acquire_and_release_never_lose_a_waiter() {
        // Grants to waiters go to their owner's mailbox (a reactor's inbox in the
        // server). Every acquire is eventually granted, and the budget ends where it
        // started: a lost wake-up would hang this test.
        const THREADS: u64 = 4;
        let b = std::sync::Arc::new(BufferBudget::new(64));
        let mail: std::sync::Arc<Vec<Mutex<Vec<Waiter>>>> =
            std::sync::Arc::new((0..THREADS).map(|_| Mutex::new(Vec::new())).collect());
        let deliver = {
            let mail = mail.clone();
            move |woken: Vec<Waiter>| {
                for x in woken {
                    mail[(x.conn / 1_000_000) as usize].lock().unwrap().push(x);
                }
            }
        };
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (b, mail, deliver) = (b.clone(), mail.clone(), deliver.clone());
                std::thread::spawn(move || {
                    let mut held: Vec<Waiter> = Vec::new();
                    for i in 0..2000u64 {
                        let me = w(t * 1_000_000 + i, 1 + (i % 32) as usize);
                        let (now, woken) = b.acquire(me);
                        deliver(woken);
                        if !now {
                            // Give back everything held until the grant arrives.
                            loop {
                                for h in held.drain(..) {
                                    deliver(b.release(h.bytes));
                                }
                                let got = std::mem::take(&mut *mail[t as usize].lock().unwrap());
                                assert!(got.iter().all(|x| *x == me), "{got:?}");
                                if !got.is_empty() {
                                    break;
                                }
                                std::thread::yield_now();
                            }
                        }
                        held.push(me);
                        if held.len() > 2 {
                            let h = held.remove(0);
                            deliver(b.release(h.bytes));
                        }
                    }
                    for h in held {
                        deliver(b.release(h.bytes));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!((b.used(), b.waiting()), (0, 0));
    }

    #[test]
    fn handshake_slots_evict_the_least_recently_active() {
        let s = HandshakeSlots::new(3);
        for c in 1..=3 {
            assert_eq!(s.admit(c, 0, false), Some(None));
        }
        s.touch(1); // 1 is negotiating: 2 is now the least recently active
        assert_eq!(s.admit(4, 1, false), Some(Some((2, 0))));
        assert_eq!(s.admit(5, 0, false), Some(Some((3, 0))));
        s.remove(1);
        assert_eq!(s.len(), 2);
        // At the connection limit a negotiating one gives way; with none, refuse.
        assert_eq!(s.admit(6, 0, true), Some(Some((4, 1))));
        let empty = HandshakeSlots::new(3);
        assert_eq!(empty.admit(1, 0, true), None);
        assert!(empty.is_empty());
    }

    #[test]
    fn throttle_counts_what_it_leaves_out() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.check(), Some(0));
        assert_eq!(t.check(), None);
        assert_eq!(t.check(), None);
        let t0 = Throttle::new(Duration::ZERO);
        assert_eq!(t0.check(), Some(0));
        assert_eq!(t0.check(), Some(0));
        assert_eq!(more_suffix(2), " (2 more in the last 5 s)");
    }

    #[test]
    fn budgets_below_the_largest_request_are_refused() {
        let mut c = AdmissionConfig {
            buffer_budget_bytes: 16 << 20,
            ..AdmissionConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("32 MiB"));
        c.buffer_budget_bytes = 32 << 20;
        assert!(c.validate().is_ok());
        c.max_handshakes = 0;
        assert!(c.validate().is_err());
    }
}
