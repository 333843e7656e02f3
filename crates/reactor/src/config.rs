//! Reactor configuration and its validation.

use std::time::Duration;

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

/// Everything a reactor pool needs; see the builder methods on
/// [`ReactorPool`](crate::ReactorPool).
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// One reactor per entry; `Some(core)` pins it with core_affinity.
    pub cores: Vec<Option<usize>>,
    /// Submission queue entries per ring (completion queue is twice that).
    pub ring_entries: u32,
    pub idle: IdlePolicy,
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
    /// Rejects values that would make a reactor misbehave instead of failing later.
    pub fn validate(&self) -> Result<(), crate::ReactorError> {
        let bad = |m: &str| Err(crate::ReactorError::Config(m.to_string()));
        if self.cores.is_empty() {
            return bad("at least one reactor core is required");
        }
        if !(1..=32_768).contains(&self.ring_entries) {
            return bad("ring_entries must be within 1..=32768");
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
