//! Reactor configuration and its validation.

use std::time::Duration;

/// The kernel's limit on submission queue entries per ring.
const MAX_RING_ENTRIES: u32 = 32_768;

/// What a reactor does when a loop iteration found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin forever (SPDK's default): lowest latency, one core at 100 %.
    Busy,
    /// Spin for `poll_us` after the last work, then sleep in `io_uring_enter` until a
    /// completion, a timer or the doorbell. The default: an idle server must not burn a core.
    Adaptive { poll_us: u64 },
    /// Sleep as soon as an iteration finds no work.
    Interrupt,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy::Adaptive { poll_us: 50 }
    }
}

impl std::fmt::Display for IdlePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdlePolicy::Busy => write!(f, "busy"),
            IdlePolicy::Adaptive { poll_us } => write!(f, "adaptive({poll_us}us)"),
            IdlePolicy::Interrupt => write!(f, "interrupt"),
        }
    }
}

/// When a reactor hands the SQEs it has queued to the kernel (`io_uring_enter`).
///
/// The trade is CPU per operation against the time a request waits before the
/// device sees it. One enter carrying `n` SQEs costs one system call, and for block
/// I/O one block-layer plug: the kernel plugs submissions of more than two SQEs, so
/// none of the `n` requests reaches the device until all `n` are prepared, and the
/// device is notified once. That is the cheapest per operation, but under load a
/// reactor reaps completions in clumps, resubmits them in clumps, and a device that
/// completes in clumps too sees its queue run short meanwhile: IOPS at a given queue
/// depth drop. Entering sooner gets requests to the device sooner, for more system
/// calls and device notifications (on a VM, one exit each) per operation.
///
/// `bench/reactor-bench.sh` measures the trade against fio (which enters once per
/// I/O by default). Four runs on this project's 2-vCPU VM (virtio disk; 3, 8, 8
/// and 8 rounds of QD32 random reads): median IOPS ratio to fio 0.97, 1.09, 1.04,
/// 1.02 with `Eager`, 0.81, 1.11, 1.01, 0.93 with `Batch`. In rounds where the
/// hypervisor stole little CPU, `Eager` was at 0.94-0.99 and `Batch` at
/// 0.83-0.95; in rounds with heavy steal `Batch` kept its IOPS while `Eager` and
/// fio (one enter, one VM exit per read) dropped together. `Batch` used ~32 % of a
/// core where `Eager` and fio used ~50 %, and had the lower p99. Over NBD
/// (`ringblk serve --submit`) the two were within noise. `Eager` is the default
/// because it was the one at or above 0.95 of fio in every run; choose `Batch` where
/// CPU is scarce. (A hybrid, `Eager` unless the reap found 8 or more CQEs, behaved
/// like `Batch`: clumps that big are common here, so it was not kept.)
///
/// No policy changes an idle reactor: with nothing queued, nothing is entered. Under
/// SQPOLL the kernel thread picks SQEs up on its own and the policy only decides how
/// often it is woken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SubmitPolicy {
    /// One `io_uring_enter` per loop iteration for everything queued in it: the
    /// fewest system calls, so the least CPU per operation.
    Batch,
    /// Enter right after each completion callback, timer, poller, message or buffer
    /// waiter that queued SQEs, as fio does by default (`iodepth_batch_submit=1`):
    /// each request reaches the device as soon as it exists, for up to one system
    /// call per operation. The default.
    #[default]
    Eager,
    /// Enter as soon as `sqes` SQEs are queued (checked after each callback, like
    /// `Eager`), and at the end of the iteration for the rest: fio's
    /// `iodepth_batch_submit=sqes`. A middle ground; `Every { sqes: 1 }` is `Eager`.
    Every { sqes: u32 },
}

impl SubmitPolicy {
    /// SQEs queued at which the reactor enters without waiting for the end of the
    /// loop iteration; `None` for `Batch`.
    pub(crate) fn threshold(self) -> Option<usize> {
        match self {
            SubmitPolicy::Batch => None,
            SubmitPolicy::Eager => Some(1),
            SubmitPolicy::Every { sqes } => Some(sqes as usize),
        }
    }
}

impl std::fmt::Display for SubmitPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitPolicy::Batch => write!(f, "batch"),
            SubmitPolicy::Eager => write!(f, "eager"),
            SubmitPolicy::Every { sqes } => write!(f, "every{sqes}"),
        }
    }
}

impl std::str::FromStr for SubmitPolicy {
    type Err = String;

    /// `batch`, `eager` or `everyN` (N within 1..=32768), as printed by `Display`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "batch" => Ok(SubmitPolicy::Batch),
            "eager" => Ok(SubmitPolicy::Eager),
            _ => s
                .strip_prefix("every")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| (1..=MAX_RING_ENTRIES).contains(n))
                .map(|sqes| SubmitPolicy::Every { sqes })
                .ok_or_else(|| {
                    format!("unknown submit policy {s:?} (batch, eager or everyN, N in 1..=32768)")
                }),
        }
    }
}

/// Everything a reactor pool needs; see the builder methods on
/// [`ReactorPool`](crate::ReactorPool).
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// One reactor per entry; `Some(core)` pins it with core_affinity.
    pub cores: Vec<Option<usize>>,
    /// Submission queue entries per ring (completion queue is twice that).
    pub ring_entries: u32,
    pub idle: IdlePolicy,
    /// When queued SQEs are entered into the kernel; see [`SubmitPolicy`].
    pub submit: SubmitPolicy,
    /// Kernel submission polling thread, idle timeout in ms; `None` = off.
    pub sqpoll_idle_ms: Option<u32>,
    /// Add a second, IOPOLL ring per reactor for O_DIRECT files on devices with
    /// polled queues (see [`probe_iopoll`](crate::probe_iopoll)).
    pub iopoll: bool,
    /// Operations in flight per reactor; a full slab is back-pressure.
    pub max_in_flight: usize,
    /// Fixed buffers per reactor and their size.
    pub buffer_count: usize,
    pub buffer_size: usize,
    /// Fixed-file table slots per reactor.
    pub fixed_files: u32,
    /// Messages waiting in a reactor's inbox at most.
    pub inbox_capacity: usize,
    /// Messages run per loop iteration at most.
    pub inbox_batch: usize,
    /// How long shutdown waits for in-flight ops before cancelling them.
    pub shutdown_timeout: Duration,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cores: vec![None],
            ring_entries: 256,
            idle: IdlePolicy::default(),
            submit: SubmitPolicy::default(),
            sqpoll_idle_ms: None,
            iopoll: false,
            max_in_flight: 4096,
            buffer_count: 256,
            buffer_size: 128 * 1024,
            fixed_files: 1024,
            inbox_capacity: 65_536,
            inbox_batch: 256,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl ReactorConfig {
    /// Sets the [`SubmitPolicy`].
    #[must_use]
    pub fn with_submit(mut self, submit: SubmitPolicy) -> Self {
        self.submit = submit;
        self
    }

    /// Rejects values that would make a reactor misbehave instead of failing later.
    pub fn validate(&self) -> Result<(), crate::ReactorError> {
        let bad = |m: &str| Err(crate::ReactorError::Config(m.to_string()));
        if self.cores.is_empty() {
            return bad("at least one reactor core is required");
        }
        if !(1..=MAX_RING_ENTRIES).contains(&self.ring_entries) {
            return bad("ring_entries must be within 1..=32768");
        }
        if let SubmitPolicy::Every { sqes } = self.submit {
            // Above the ring size the threshold is never reached: that is Batch.
            if !(1..=self.ring_entries).contains(&sqes) {
                return bad("submit Every { sqes } must be within 1..=ring_entries");
            }
        }
        if self.max_in_flight == 0 || self.inbox_capacity == 0 || self.inbox_batch == 0 {
            return bad("max_in_flight, inbox_capacity and inbox_batch must be positive");
        }
        if self.buffer_count > crate::BufPool::MAX_BUFFERS {
            return bad("buffer_count exceeds the fixed-buffer index range");
        }
        if self.buffer_size > 1 << 30 {
            return bad("buffer_size must be at most 1 GiB");
        }
        let mut seen = std::collections::HashSet::new();
        for c in self.cores.iter().flatten() {
            if !seen.insert(c) {
                return bad("a core is listed twice");
            }
        }
        Ok(())
    }
}
