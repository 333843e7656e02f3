//! The vhost-user-blk transport (`--vhost SOCKET`): a run's phases over the virtqueues
//! of one vhost-user-blk device, through libblkio's Rust core (the `blkio` crate,
//! driver `virtio-blk-vhost-user`) — a client we did not write, so a run against
//! ringblk is interoperability evidence, and the same run against
//! `qemu-storage-daemon --export type=vhost-user-blk` is the peer figure.
//!
//! # Streams, queues, threads
//! Queue `i` (`--queues N` is blkio's `num-queues`) is stream `i` of the workload
//! (`stream::Issuer`/`Tally`, shared with the NBD engine), served by its own OS
//! thread that owns the `Blkioq`. So a verify read pass reads every block through
//! another virtqueue than the one that wrote it, and with several queues the server
//! must serve several virtqueues at once.
//!
//! # Memory
//! A vhost-user back end can only reach memory the client shared with it (blkio's
//! `needs-mem-regions`): each queue gets one region from `alloc_mem_region` (a memfd)
//! registered with `map_mem_region` (vhost-user `ADD_MEM_REG`), cut into one buffer
//! per in-flight slot. Slot `k` of a queue only ever uses buffer `k`.
//!
//! # Completion (`--poll`)
//! `busy`: `do_io` with `min_completions = 0` in a loop — no syscall unless a kick is
//! due, as a polled driver runs. `adaptive`: the same for `--poll-us` after the last
//! completion, then `do_io(min 1)`, which enables used-buffer notifications and
//! sleeps on the queue's call eventfd (the back end must signal it). `interrupt`:
//! always sleeps.
//!
//! # Ownership
//! A buffer belongs to the device from its submission until its completion is
//! reaped: the slot is `busy` and nothing here reads or writes it. Regions are freed
//! only when the [`Device`] is dropped, after every worker thread has joined (a queue
//! that failed with requests in flight leaves them to the disconnect).
//!
//! # Read-only devices
//! blkio refuses to start a device that offers `VIRTIO_BLK_F_RO` unless the client
//! opened it read-only, and then fails writes itself (`EBADF`) without sending
//! them. A workload that only reads therefore opens read-only (and works on backup
//! exports); one that writes fails to start on a read-only device.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use ringblk_nbd::client::Cmd;
use ringblk_reactor::IdlePolicy;

use crate::stream::{
    ConnResult, EngineOpts, Issuer, Next, Outcome, PhaseResult, Progress, Tally, Timing,
};
use crate::workload::Phase;

/// The libblkio driver name of a vhost-user-blk client.
const DRIVER: &str = "virtio-blk-vhost-user";
/// virtio allows queue sizes up to 32768; more than this is no benchmark we run.
pub const QUEUE_SIZE_MAX: u32 = 4096;
/// Segments per request when the device caps segment length (`size_max`).
const SEGMENTS_MAX: usize = 256;
/// How long a blocked `do_io` waits before the worker looks at the clock (stall
/// detection and rate-limit deadlines); not a figure of any run.
const WAIT_SLICE: Duration = Duration::from_millis(200);

/// What to open and how.
#[derive(Clone, Debug)]
pub struct DeviceOpts {
    pub path: String,
    pub queues: u32,
    /// Virtqueue size; `None`: the smallest power of two ≥ 3 descriptors per slot
    /// (at least 256, blkio's default).
    pub queue_size: Option<u32>,
    pub read_only: bool,
    /// Requests in flight per queue and the size of each (the buffers).
    pub depth: u32,
    pub bs: u32,
}

/// What the device told blkio when it connected.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub path: String,
    pub capacity_bytes: u64,
    pub max_queues: i32,
    pub queues: u32,
    pub queue_size: u32,
    pub read_only: bool,
    pub request_alignment: i32,
    pub max_transfer: i32,
    pub max_segment_len: i32,
    pub max_segments: i32,
    pub max_discard_len: u64,
    pub max_write_zeroes_len: u64,
}

/// A started vhost-user-blk device with its queues and their buffers.
pub struct Device {
    pub info: DeviceInfo,
    queues: Vec<QueueMem>,
    // Dropped last (field order): the queues and regions above belong to it.
    blkio: Blkio,
}

/// One queue and the buffer region its slots use.
struct QueueMem {
    q: Blkioq,
    region: MemoryRegion,
    slot_bytes: usize,
    slots: usize,
}

fn err(what: &str, e: blkio::Error) -> String {
    match e.message() {
        "" => format!("{what}: {}", e.errno()),
        m => format!("{what}: {m}"),
    }
}

impl Device {
    /// Connects to the back end at `o.path`, negotiates, starts `o.queues` queues and
    /// maps one buffer region per queue.
    pub fn open(o: &DeviceOpts) -> Result<Device, String> {
        let path = &o.path;
        let mut b = Blkio::new(DRIVER).map_err(|e| err("blkio", e))?;
        b.set_str("path", path).map_err(|e| err("path", e))?;
        b.set_bool("read-only", o.read_only)
            .map_err(|e| err("read-only", e))?;
        b.connect()
            .map_err(|e| err(&format!("cannot connect to {path}"), e))?;
        let max_queues = b.get_i32("max-queues").map_err(|e| err("max-queues", e))?;
        if i64::from(o.queues) > i64::from(max_queues) {
            return Err(format!(
                "{path}: the device has {max_queues} queue(s); --queues {} asks for more",
                o.queues
            ));
        }
        let queue_size = o.queue_size.unwrap_or_else(|| {
            (3 * o.depth.max(1))
                .next_power_of_two()
                .clamp(256, QUEUE_SIZE_MAX)
        });
        b.set_i32("num-queues", o.queues as i32)
            .map_err(|e| err("num-queues", e))?;
        b.set_i32("queue-size", queue_size as i32)
            .map_err(|e| err("queue-size", e))?;
        let get_i32 = |b: &Blkio, n: &str| b.get_i32(n).map_err(|e| err(n, e));
        let get_u64 = |b: &Blkio, n: &str| b.get_u64(n).map_err(|e| err(n, e));
        let info = DeviceInfo {
            path: path.clone(),
            capacity_bytes: get_u64(&b, "capacity")?,
            max_queues,
            queues: o.queues,
            queue_size,
            read_only: o.read_only,
            request_alignment: get_i32(&b, "request-alignment")?,
            max_transfer: get_i32(&b, "max-transfer")?,
            max_segment_len: get_i32(&b, "max-segment-len")?,
            max_segments: get_i32(&b, "max-segments")?,
            max_discard_len: get_u64(&b, "max-discard-len")?,
            max_write_zeroes_len: get_u64(&b, "max-write-zeroes-len")?,
        };
        if info.max_transfer > 0 && i64::from(o.bs) > i64::from(info.max_transfer) {
            return Err(format!(
                "{path}: --bs {} exceeds the device's largest request ({} bytes)",
                o.bs, info.max_transfer
            ));
        }
        let started = b.start().map_err(|e| {
            if e.errno() == blkio::Errno::ROFS {
                format!("{path}: the device is read-only; this workload writes")
            } else {
                err(&format!("cannot start {path}"), e)
            }
        })?;
        let align = get_u64(&b, "mem-region-alignment")?.max(1) as usize;
        let slot_bytes = (o.bs.max(1) as usize).next_multiple_of(align.max(4096));
        let slots = o.depth.max(1) as usize;
        let mut queues = Vec::with_capacity(started.queues.len());
        for q in started.queues {
            let len = slot_bytes
                .checked_mul(slots)
                .ok_or("request buffers overflow")?;
            let region = b
                .alloc_mem_region(len)
                .map_err(|e| err("alloc_mem_region", e))?;
            b.map_mem_region(&region)
                .map_err(|e| err("map_mem_region", e))?;
            queues.push(QueueMem {
                q,
                region,
                slot_bytes,
                slots,
            });
        }
        Ok(Device {
            info,
            queues,
            blkio: b,
        })
    }

    /// The segments of slot `k`'s first `len` bytes, each at most the device's
    /// segment length.
    fn iovecs(&self, qi: usize, k: usize, len: usize) -> Vec<blkio::iovec> {
        let qm = &self.queues[qi];
        let seg = match self.info.max_segment_len {
            n if n > 0 => (n as usize).max(len.div_ceil(SEGMENTS_MAX)),
            _ => len.max(1),
        };
        let base = qm.region.addr + k * qm.slot_bytes;
        (0..len)
            .step_by(seg)
            .map(|at| blkio::iovec {
                iov_base: (base + at) as *mut libc::c_void,
                iov_len: seg.min(len - at),
            })
            .collect()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        for qm in &self.queues {
            self.blkio.unmap_mem_region(&qm.region);
        }
        // The regions are freed with the Blkio (its registry), after the queues.
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    busy: bool,
    cmd: Cmd,
    offset: u64,
    len: u32,
    t0: Instant,
}

/// One queue's buffers as a worker thread sees them (addresses, not references: the
/// device reads and writes them concurrently while a slot is in flight).
struct Buffers {
    base: usize,
    slot_bytes: usize,
    iovs: Vec<Vec<blkio::iovec>>,
}

// SAFETY: the addresses point into a memfd mapping owned by the `Device`, which
// outlives every worker (scoped threads); each slot's buffer is used by one thread.
unsafe impl Send for Buffers {}

impl Buffers {
    /// Slot `k`'s buffer, first `len` bytes.
    ///
    /// # Safety
    /// The slot must not be in flight (the device is not using the buffer), and no
    /// other reference to it may be live.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, k: usize, len: usize) -> &mut [u8] {
        debug_assert!(len <= self.slot_bytes);
        // SAFETY: inside the region (k < slots, len ≤ slot_bytes); exclusivity and
        // the device not using it are the caller's contract.
        unsafe { std::slice::from_raw_parts_mut((self.base + k * self.slot_bytes) as *mut u8, len) }
    }
}

/// Runs one phase over the device's queues (stream `i` on queue `i`).
pub fn run_phase(
    dev: &mut Device,
    phase: Arc<Phase>,
    opts: EngineOpts,
    tick: Duration,
    mut on_tick: impl FnMut(&Progress, Instant),
) -> Result<PhaseResult, String> {
    let n = phase.connections;
    if n > dev.queues.len() {
        return Err(format!("{n} streams but {} queue(s)", dev.queues.len()));
    }
    if phase.bs as usize > dev.queues[0].slot_bytes || phase.iodepth as usize > dev.queues[0].slots
    {
        return Err("phase larger than the device's buffers".into());
    }
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let timing = Timing::for_phase(&phase, start);
    let mut bufs: Vec<Buffers> = (0..n)
        .map(|qi| Buffers {
            base: dev.queues[qi].region.addr,
            slot_bytes: dev.queues[qi].slot_bytes,
            iovs: (0..phase.iodepth as usize)
                .map(|k| dev.iovecs(qi, k, phase.bs as usize))
                .collect(),
        })
        .collect();
    let mut result = PhaseResult::new(phase.clone());
    let mut last_completion = None;
    std::thread::scope(|sc| {
        let (tx, rx) = mpsc::channel();
        for (idx, (qm, buf)) in dev.queues.iter_mut().zip(bufs.drain(..)).enumerate() {
            let (phase, progress, tx) = (phase.clone(), progress.clone(), tx.clone());
            let q = &mut qm.q;
            sc.spawn(move || {
                let r = Worker::new(q, buf, &phase, idx, &timing, &progress, opts).run();
                let _ = tx.send((idx, r));
            });
        }
        drop(tx);
        let mut done = 0;
        while done < n {
            match rx.recv_timeout(tick) {
                Ok((idx, c)) => {
                    last_completion = last_completion.max(c.last_completion);
                    result.merge_stream("queue", idx, c);
                    done += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    result
                        .fatal
                        .push(format!("{} queue(s) never reported", n - done));
                    break;
                }
            }
            on_tick(&progress, start);
        }
    });
    result.finish(&timing, last_completion);
    Ok(result)
}

/// One queue's loop: issue up to the depth, reap, repeat.
struct Worker<'a> {
    q: &'a mut Blkioq,
    buf: Buffers,
    phase: Arc<Phase>,
    issuer: Issuer,
    tally: Tally,
    progress: Arc<Progress>,
    opts: EngineOpts,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_use: usize,
    comps: Vec<MaybeUninit<Completion>>,
}

impl<'a> Worker<'a> {
    fn new(
        q: &'a mut Blkioq,
        buf: Buffers,
        phase: &Arc<Phase>,
        idx: usize,
        timing: &Timing,
        progress: &Arc<Progress>,
        opts: EngineOpts,
    ) -> Worker<'a> {
        let depth = phase.iodepth.max(1) as usize;
        let idle = Slot {
            busy: false,
            cmd: Cmd::Read,
            offset: 0,
            len: 0,
            t0: timing.start,
        };
        Worker {
            q,
            buf,
            issuer: Issuer::new(phase, idx, timing),
            tally: Tally::new(phase, timing, progress),
            phase: phase.clone(),
            progress: progress.clone(),
            opts,
            slots: vec![idle; depth],
            free: (0..depth).rev().collect(),
            in_use: 0,
            comps: (0..depth).map(|_| MaybeUninit::uninit()).collect(),
        }
    }

    fn run(mut self) -> ConnResult {
        let mut flushed = false;
        let mut last_activity = Instant::now();
        loop {
            let now = Instant::now();
            let mut due = None;
            while !self.free.is_empty() {
                match self.issuer.next(now) {
                    Next::Issue { write, offset, t0 } => {
                        let cmd = if write { Cmd::Write } else { Cmd::Read };
                        self.submit(cmd, offset, t0);
                    }
                    Next::Wait(t) => {
                        due = Some(t);
                        break;
                    }
                    Next::Stop => break,
                }
            }
            if self.in_use == 0 {
                if let Some(t) = due {
                    // Rate-limited with nothing in flight: wait for the schedule.
                    std::thread::sleep(t.saturating_duration_since(Instant::now()));
                    continue;
                }
                if self.phase.flush_at_end && !flushed && self.tally.result.fatal.is_none() {
                    // Verify writes end with a FLUSH: what the read pass checks was
                    // made durable, as the FLUSH command promises.
                    flushed = true;
                    self.submit(Cmd::Flush, 0, Instant::now());
                } else {
                    break;
                }
            }
            let spin = match self.opts.idle {
                IdlePolicy::Busy => true,
                IdlePolicy::Adaptive { poll_us } => {
                    last_activity.elapsed() < Duration::from_micros(poll_us)
                }
                _ => false,
            };
            match self.reap(spin, due) {
                Ok(0) => {
                    if last_activity.elapsed() > self.opts.stall_timeout
                        && self.phase.rate_iops.is_none()
                    {
                        self.tally.fatal(format!(
                            "no completion for {:?} with {} request(s) in flight: device stalled?",
                            self.opts.stall_timeout, self.in_use
                        ));
                        break;
                    }
                }
                Ok(_) => last_activity = Instant::now(),
                Err(e) => {
                    self.tally.fatal(e);
                    break;
                }
            }
        }
        self.tally.result
    }

    /// Queues one request in a free slot (the kick happens in the next `do_io`).
    fn submit(&mut self, cmd: Cmd, offset: u64, t0: Instant) {
        let Some(k) = self.free.pop() else {
            debug_assert!(false, "submit() without a free slot");
            return;
        };
        let len = if cmd == Cmd::Flush { 0 } else { self.phase.bs };
        self.slots[k] = Slot {
            busy: true,
            cmd,
            offset,
            len,
            t0,
        };
        self.in_use += 1;
        let iov = &self.buf.iovs[k];
        match cmd {
            Cmd::Read => self
                .q
                .readv(offset, iov.as_ptr(), iov.len() as u32, k, ReqFlags::empty()),
            Cmd::Write => {
                // SAFETY: slot k was free (popped from the free list): the device
                // holds no request on its buffer, and this thread is its only user.
                let b = unsafe { self.buf.slot(k, len as usize) };
                self.issuer.fill_write(b, offset);
                self.q
                    .writev(offset, iov.as_ptr(), iov.len() as u32, k, ReqFlags::empty())
            }
            _ => self.q.flush(k, ReqFlags::empty()),
        }
    }

    /// Polls (`spin`) or waits for completions and retires them; returns how many.
    fn reap(&mut self, spin: bool, due: Option<Instant>) -> Result<usize, String> {
        let (min, mut timeout) = if spin {
            (0, None)
        } else {
            let until = due.map_or(WAIT_SLICE, |d| d.saturating_duration_since(Instant::now()));
            (1, Some(until.min(WAIT_SLICE)))
        };
        let n = match self.q.do_io(&mut self.comps, min, timeout.as_mut(), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME || e.errno() == blkio::Errno::INTR => 0,
            Err(e) => return Err(err("do_io", e)),
        };
        let now = Instant::now();
        let (mut ops, mut bytes) = (0u64, 0u64);
        for i in 0..n.min(self.comps.len()) {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { self.comps[i].assume_init_read() };
            let k = c.user_data;
            let Some(s) = self.slots.get(k).copied().filter(|s| s.busy) else {
                return Err(format!("completion for slot {k}, which is not in flight"));
            };
            self.slots[k].busy = false;
            self.free.push(k);
            self.in_use -= 1;
            let outcome = if c.ret == 0 {
                let data: &[u8] = if s.cmd == Cmd::Read {
                    // SAFETY: the completion was reaped: the device is done with the
                    // buffer and it is back in the free list, unused until resubmitted.
                    unsafe { self.buf.slot(k, s.len as usize) }
                } else {
                    &[]
                };
                Outcome::Ok(data)
            } else {
                Outcome::Err(completion_error(&c))
            };
            bytes += self
                .tally
                .complete(s.cmd, s.offset, s.len, s.t0, now, outcome);
            ops += 1;
        }
        self.progress.ops.fetch_add(ops, Ordering::Relaxed);
        self.progress.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(n)
    }
}

/// A failed completion's errno and libblkio's message, if any.
fn completion_error(c: &Completion) -> String {
    let errno = std::io::Error::from_raw_os_error(c.ret.saturating_neg());
    if c.error_msg.is_null() {
        return errno.to_string();
    }
    // SAFETY: libblkio sets error_msg to null or to a NUL-terminated static string.
    let msg = unsafe { std::ffi::CStr::from_ptr(c.error_msg) };
    format!("{errno}: {}", msg.to_string_lossy())
}

// ----- single requests (`ringblk-bench io`) ----------------------------------------

/// Bytes each request of an [`IoOp`] moves at most (longer ops are split).
pub const IO_CHUNK_BYTES: u32 = 64 << 10;
/// Verify pattern block of [`IoOp::Write`] and [`IoOp::Verify`].
pub const IO_BLOCK_BYTES: u64 = 4096;
/// How long one request of `io` may take before it is reported as stalled
/// (liveness, not speed).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The request kinds of `io` (the bench's workload needs only read, write, flush).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Req {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One step of `ringblk-bench io`, as written on its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// `write:OFF:LEN[:SEED]`: the verify pattern, one 4 KiB block at a time.
    Write { offset: u64, len: u64, seed: u64 },
    /// `verify:OFF:LEN[:SEED]`: read back and check that pattern.
    Verify { offset: u64, len: u64, seed: u64 },
    /// `zero:OFF:LEN`: read back and check that every byte is zero.
    Zero { offset: u64, len: u64 },
    /// `read:OFF:LEN`: read, check nothing (does it succeed?).
    Read { offset: u64, len: u64 },
    /// `discard:OFF:LEN`.
    Discard { offset: u64, len: u64 },
    /// `write-zeroes:OFF:LEN` (may unmap) and `write-zeroes-keep:OFF:LEN` (NO_UNMAP).
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// `flush`.
    Flush,
}

impl IoOp {
    /// Parses `NAME[:OFF:LEN[:SEED]]` (sizes as `parse_size` takes them).
    pub fn parse(s: &str, parse_size: fn(&str) -> Result<u64, String>) -> Result<IoOp, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let size = |i: usize| -> Result<u64, String> {
            parts
                .get(i)
                .ok_or_else(|| format!("{s:?}: missing field {i}"))
                .and_then(|v| parse_size(v))
        };
        let seed = || -> Result<u64, String> {
            parts.get(3).map_or(Ok(1), |v| {
                v.parse().map_err(|_| format!("{s:?}: bad seed {v:?}"))
            })
        };
        let (name, max_fields) = (parts[0], if parts[0] == "flush" { 1 } else { 3 });
        let max_fields = max_fields + usize::from(matches!(name, "write" | "verify"));
        if parts.len() > max_fields || (name != "flush" && parts.len() < 3) {
            return Err(format!("{s:?}: wrong number of fields"));
        }
        let op = match name {
            "write" => IoOp::Write {
                offset: size(1)?,
                len: size(2)?,
                seed: seed()?,
            },
            "verify" => IoOp::Verify {
                offset: size(1)?,
                len: size(2)?,
                seed: seed()?,
            },
            "zero" => IoOp::Zero {
                offset: size(1)?,
                len: size(2)?,
            },
            "read" => IoOp::Read {
                offset: size(1)?,
                len: size(2)?,
            },
            "discard" => IoOp::Discard {
                offset: size(1)?,
                len: size(2)?,
            },
            "write-zeroes" | "write-zeroes-keep" => IoOp::WriteZeroes {
                offset: size(1)?,
                len: size(2)?,
                unmap: name == "write-zeroes",
            },
            "flush" => IoOp::Flush,
            _ => {
                return Err(format!(
                    "{s:?}: unknown op (write, verify, zero, read, discard, write-zeroes, \
                     write-zeroes-keep, flush)"
                ))
            }
        };
        if let IoOp::Write { offset, len, .. } | IoOp::Verify { offset, len, .. } = op {
            if offset % IO_BLOCK_BYTES != 0 || len % IO_BLOCK_BYTES != 0 {
                return Err(format!(
                    "{s:?}: offset and length must be multiples of 4 KiB"
                ));
            }
        }
        Ok(op)
    }
}

/// The command-line form, as `IoOp::parse` reads it.
impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            IoOp::Write { offset, len, seed } => write!(f, "write:{offset}:{len}:{seed}"),
            IoOp::Verify { offset, len, seed } => write!(f, "verify:{offset}:{len}:{seed}"),
            IoOp::Zero { offset, len } => write!(f, "zero:{offset}:{len}"),
            IoOp::Read { offset, len } => write!(f, "read:{offset}:{len}"),
            IoOp::Discard { offset, len } => write!(f, "discard:{offset}:{len}"),
            IoOp::WriteZeroes { offset, len, unmap } => {
                let name = if unmap {
                    "write-zeroes"
                } else {
                    "write-zeroes-keep"
                };
                write!(f, "{name}:{offset}:{len}")
            }
            IoOp::Flush => write!(f, "flush"),
        }
    }
}

impl Device {
    /// Runs one op on queue `qi`, one request at a time; `Err` says what failed (the
    /// request's error, or the first block that did not read back as expected).
    pub fn run_op(&mut self, qi: usize, op: &IoOp) -> Result<(), String> {
        if qi >= self.queues.len() {
            return Err(format!("queue {qi} of {}", self.queues.len()));
        }
        let chunk = (self.queues[qi].slot_bytes as u64).min(u64::from(IO_CHUNK_BYTES));
        match *op {
            IoOp::Flush => self.one(qi, Req::Flush, 0, 0, ReqFlags::empty()),
            IoOp::Discard { offset, len } => {
                let max = self.info.max_discard_len;
                self.ranges(offset, len, max, |d, at, n| {
                    d.one(qi, Req::Discard, at, n, ReqFlags::empty())
                })
            }
            IoOp::WriteZeroes { offset, len, unmap } => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                let max = self.info.max_write_zeroes_len;
                self.ranges(offset, len, max, |d, at, n| {
                    d.one(qi, Req::WriteZeroes, at, n, flags)
                })
            }
            IoOp::Write { offset, len, seed } => self.ranges(offset, len, chunk, |d, at, n| {
                // SAFETY: depth-1 use: no request is in flight on this queue.
                let b = unsafe { d.buffer(qi, n) };
                for (i, blk) in b.chunks_mut(IO_BLOCK_BYTES as usize).enumerate() {
                    crate::pattern::fill_verify(blk, at + i as u64 * IO_BLOCK_BYTES, seed);
                }
                d.one(qi, Req::Write, at, n, ReqFlags::empty())
            }),
            IoOp::Verify { offset, len, seed } => self.ranges(offset, len, chunk, |d, at, n| {
                d.one(qi, Req::Read, at, n, ReqFlags::empty())?;
                // SAFETY: the read completed; nothing is in flight on this queue.
                let b = unsafe { d.buffer(qi, n) };
                for (i, blk) in b.chunks(IO_BLOCK_BYTES as usize).enumerate() {
                    let o = at + i as u64 * IO_BLOCK_BYTES;
                    crate::pattern::check_verify(blk, o, seed)
                        .map_err(|m| format!("block at offset {o}: {m}"))?;
                }
                Ok(())
            }),
            IoOp::Zero { offset, len } => self.ranges(offset, len, chunk, |d, at, n| {
                d.one(qi, Req::Read, at, n, ReqFlags::empty())?;
                // SAFETY: the read completed; nothing is in flight on this queue.
                let b = unsafe { d.buffer(qi, n) };
                match b.iter().position(|&x| x != 0) {
                    None => Ok(()),
                    Some(p) => Err(format!(
                        "byte at offset {} is {:#04x}, not zero",
                        at + p as u64,
                        b[p]
                    )),
                }
            }),
            IoOp::Read { offset, len } => self.ranges(offset, len, chunk, |d, at, n| {
                d.one(qi, Req::Read, at, n, ReqFlags::empty())
            }),
        }
    }

    /// Calls `f(self, at, n)` for consecutive pieces of `[offset, offset+len)` of at
    /// most `max` bytes (`0`: one piece).
    fn ranges(
        &mut self,
        offset: u64,
        len: u64,
        max: u64,
        mut f: impl FnMut(&mut Device, u64, u64) -> Result<(), String>,
    ) -> Result<(), String> {
        let end = offset.checked_add(len).ok_or("offset + length overflows")?;
        let step = if max == 0 { len.max(1) } else { max };
        let mut at = offset;
        while at < end {
            let n = step.min(end - at);
            f(self, at, n)?;
            at += n;
        }
        Ok(())
    }

    /// Queue `qi`'s first buffer, `len` bytes.
    ///
    /// # Safety
    /// No request may be in flight on queue `qi`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn buffer(&self, qi: usize, len: u64) -> &mut [u8] {
        let qm = &self.queues[qi];
        let len = (len as usize).min(qm.slot_bytes);
        // SAFETY: inside queue qi's region; nothing in flight (caller).
        unsafe { std::slice::from_raw_parts_mut(qm.region.addr as *mut u8, len) }
    }

    /// Submits one request on queue `qi` (data in its first buffer) and waits for it.
    fn one(
        &mut self,
        qi: usize,
        cmd: Req,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> Result<(), String> {
        let iov = self.iovecs(qi, 0, len as usize);
        let q = &mut self.queues[qi].q;
        match cmd {
            Req::Read => q.readv(offset, iov.as_ptr(), iov.len() as u32, 0, flags),
            Req::Write => q.writev(offset, iov.as_ptr(), iov.len() as u32, 0, flags),
            Req::Flush => q.flush(0, flags),
            Req::Discard => q.discard(offset, len, 0, flags),
            Req::WriteZeroes => q.write_zeroes(offset, len, 0, flags),
        }
        let mut comps = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = IO_TIMEOUT;
        // `iov` lives until the request completed (blkio may read it until then).
        let n = q
            .do_io(&mut comps, 1, Some(&mut timeout), None)
            .map_err(|e| err(&format!("{cmd:?} at {offset} length {len}"), e))?;
        drop(iov);
        if n != 1 {
            return Err(format!("{cmd:?} at {offset}: no completion"));
        }
        // SAFETY: do_io initialised one entry.
        let c = unsafe { comps[0].assume_init_read() };
        match c.ret {
            0 => Ok(()),
            _ => Err(format!(
                "{cmd:?} at {offset} length {len}: {}",
                completion_error(&c)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(s: &str) -> Result<u64, String> {
        s.trim_end_matches('k')
            .parse::<u64>()
            .map(|v| if s.ends_with('k') { v << 10 } else { v })
            .map_err(|e| e.to_string())
    }

    /// Every op prints as it parses, and malformed ops are refused before anything
    /// is sent (a typo must not become a request at offset 0).
    #[test]
    fn io_ops_round_trip_and_bad_ones_are_refused() {
        for text in [
            "write:0:8192:3",
            "verify:4096:4096:1",
            "zero:512:1024",
            "read:0:1",
            "discard:0:4096",
            "write-zeroes:0:4096",
            "write-zeroes-keep:0:4096",
            "flush",
        ] {
            let op = IoOp::parse(text, size).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(op.to_string(), text);
        }
        assert_eq!(
            IoOp::parse("write:4k:4k", size),
            Ok(IoOp::Write {
                offset: 4096,
                len: 4096,
                seed: 1
            })
        );
        for bad in [
            "write:1:4096",
            "verify:0:100",
            "zero:0",
            "discard:0:1:2",
            "flush:0",
            "frob:0:1",
            "write:0:4k:x",
            "",
        ] {
            assert!(IoOp::parse(bad, size).is_err(), "{bad:?} accepted");
        }
    }
}
