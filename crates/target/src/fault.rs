//! Error injection, like SPDK's error bdev (`bdev_error_inject_error`): the RPC
//! `fault_inject` arms a rule on a volume, and a request that matches it fails with
//! the rule's errno instead of doing its I/O; `fault_clear` disarms the volume's
//! rules. It lets tests and drills prove that disk errors reach the client on the
//! failing requests only, without a failing disk.
//!
//! A rule with `delay_ms` delays the requests it matches instead of failing them:
//! each is admitted (it pins its image stack, like any request) and then held that
//! long before its I/O starts — a slow disk, for drills of the backup drain
//! (`switchover`: a drain slower than its wait).
//!
//! # Where it acts
//! [`Faults::check`] runs once per request in the session's dispatch, the one place
//! the base fast path and the layered path both pass through, before any I/O. A
//! failed WRITE's payload is dropped: it is neither applied nor acknowledged. Rules
//! apply to every export of the volume (its backups' `VOL@NAME` too: they read the
//! same files).
//!
//! # Cost when unused
//! With no rule armed, `check` is one relaxed load of `armed`. Only while a rule is
//! armed does a request take the rules' mutex (a test facility: correctness over
//! speed there).
//!
//! # Ordering
//! `armed` mirrors "the rule list is not empty" and is only written under the mutex.
//! A request that races `fault_inject` may miss the new rule; every request the
//! client sends after the RPC returned sees it (the RPC reply and the NBD request
//! are ordered by the kernel's socket hand-offs).
//!
//! # Bounds
//! At most [`MAX_RULES`] rules per volume, so a check scans a bounded list.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::BlockError;
use crate::ops::IoKind;

/// Rules armed at once per volume at most.
pub const MAX_RULES: usize = 64;
/// Longest delay a rule may ask for.
pub const DELAY_MS_MAX: u64 = 60_000;

/// What an armed rule does to a request it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Fail it with this error, without I/O.
    Fail(BlockError),
    /// Hold it (admitted) this long, then run it.
    Delay(std::time::Duration),
}

/// Which requests a rule fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultOp {
    /// READ.
    Read,
    /// WRITE and WRITE_ZEROES (both change data).
    Write,
    /// FLUSH (it has no range: any rule offset matches).
    Flush,
    /// Every request that does I/O: the above plus TRIM and CACHE (not
    /// BLOCK_STATUS, which reads metadata only).
    Any,
}

impl FaultOp {
    fn matches(self, kind: IoKind) -> bool {
        match (self, kind) {
            (_, IoKind::BlockStatus) => false,
            (FaultOp::Any, _) => true,
            (FaultOp::Read, IoKind::Read) => true,
            (FaultOp::Write, IoKind::Write | IoKind::WriteZeroes) => true,
            (FaultOp::Flush, IoKind::Flush) => true,
            _ => false,
        }
    }
}

/// The errors a rule can inject: the two a disk gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum FaultErrno {
    #[default]
    #[serde(rename = "EIO")]
    Eio,
    #[serde(rename = "ENOSPC")]
    Enospc,
}

impl FaultErrno {
    /// The error the request fails with, through the one errno mapping.
    pub fn error(self) -> BlockError {
        BlockError::from_os_errno(match self {
            FaultErrno::Eio => libc::EIO,
            FaultErrno::Enospc => libc::ENOSPC,
        })
    }
}

/// What `fault_inject` asks for (its params, less the volume).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultSpec {
    pub op: FaultOp,
    pub errno: FaultErrno,
    /// Start of the byte range.
    pub offset: u64,
    /// Bytes from `offset`; `None`: to the end of the volume.
    pub length: Option<u64>,
    /// Requests to fail, then the rule goes; 0 = until cleared.
    pub count: u64,
    /// Non-zero: delay the requests this long instead of failing them.
    pub delay_ms: u64,
}

/// An armed rule, as `fault_inject` and `stats` report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultRule {
    pub id: u64,
    pub op: FaultOp,
    pub errno: FaultErrno,
    pub offset: u64,
    pub length: u64,
    /// As asked (0 = until cleared).
    pub count: u64,
    /// Requests failed (or delayed) by this rule so far.
    pub hits: u64,
    /// Non-zero: the rule delays requests by this much instead of failing them.
    pub delay_ms: u64,
}

impl FaultRule {
    /// Whether a request of kind `kind` on `[offset, offset + len)` falls under this rule.
    fn matches(&self, kind: IoKind, offset: u64, len: u32) -> bool {
        if !self.op.matches(kind) {
            return false;
        }
        if kind == IoKind::Flush {
            return true;
        }
        // Overlap of half-open ranges; both ends are within the volume (checked at
        // admission and at inject), so the sums cannot overflow.
        offset < self.offset + self.length && self.offset < offset + len as u64
    }
}

/// A rule could not be armed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FaultError {
    #[error("invalid fault rule: {0}")]
    Invalid(String),
    #[error("at most {MAX_RULES} fault rules per volume; clear them first")]
    TooMany,
}

/// A volume's armed rules.
#[derive(Debug, Default)]
pub struct Faults {
    /// Some rule is armed (see the module docs: the only data-path cost).
    armed: AtomicBool,
    rules: Mutex<Rules>,
    /// Requests failed by injection since the volume opened.
    injected: AtomicU64,
    /// Requests delayed by injection since the volume opened.
    delayed: AtomicU64,
}

#[derive(Debug, Default)]
struct Rules {
    list: Vec<FaultRule>,
    next_id: u64,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        // A panic elsewhere cannot leave the list half-updated (every change is one
        // Vec operation), so a poisoned lock is still usable.
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms a rule on a volume of `size_bytes`; returns it with its id.
    pub fn inject(&self, spec: FaultSpec, size_bytes: u64) -> Result<FaultRule, FaultError> {
        if spec.offset >= size_bytes {
            return Err(FaultError::Invalid(format!(
                "offset {} is not below the volume size {size_bytes}",
                spec.offset
            )));
        }
        let length = spec.length.unwrap_or(size_bytes - spec.offset);
        let in_volume = spec
            .offset
            .checked_add(length)
            .is_some_and(|end| end <= size_bytes);
        if length == 0 || !in_volume {
            return Err(FaultError::Invalid(format!(
                "range {}+{length} is empty or past the volume size {size_bytes}",
                spec.offset
            )));
        }
        if spec.delay_ms > DELAY_MS_MAX {
            return Err(FaultError::Invalid(format!(
                "delay_ms {} is over the maximum {DELAY_MS_MAX}",
                spec.delay_ms
            )));
        }
        let mut rules = self.lock();
        if rules.list.len() >= MAX_RULES {
            return Err(FaultError::TooMany);
        }
        rules.next_id += 1;
        let rule = FaultRule {
            id: rules.next_id,
            op: spec.op,
            errno: spec.errno,
            offset: spec.offset,
            length,
            count: spec.count,
            hits: 0,
            delay_ms: spec.delay_ms,
        };
        rules.list.push(rule.clone());
        self.armed.store(true, Ordering::Relaxed);
        Ok(rule)
    }

    /// Disarms every rule; returns how many there were.
    pub fn clear(&self) -> usize {
        let mut rules = self.lock();
        let n = rules.list.len();
        rules.list.clear();
        self.armed.store(false, Ordering::Relaxed);
        n
    }

    /// The armed rules, oldest first.
    pub fn rules(&self) -> Vec<FaultRule> {
        self.lock().list.clone()
    }

    /// Requests failed by injection so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Requests delayed by injection so far.
    pub fn delayed(&self) -> u64 {
        self.delayed.load(Ordering::Relaxed)
    }

    /// The error to fail this request with, if an armed rule matches it (the oldest
    /// such rule, which counts the hit and goes once its count is used up).
    #[inline]
    pub fn check(&self, kind: IoKind, offset: u64, len: u32) -> Option<BlockError> {
        match self.check_fault(kind, offset, len)? {
            Fault::Fail(e) => Some(e),
            // Callers that cannot hold a request run it at once.
            Fault::Delay(_) => None,
        }
    }

    /// What to do to this request, if an armed rule matches it (as [`check`](Self::check)).
    #[inline]
    pub fn check_fault(&self, kind: IoKind, offset: u64, len: u32) -> Option<Fault> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        self.check_armed(kind, offset, len)
    }

    #[cold]
    fn check_armed(&self, kind: IoKind, offset: u64, len: u32) -> Option<Fault> {
        let mut rules = self.lock();
        let i = rules
            .list
            .iter()
            .position(|r| r.matches(kind, offset, len))?;
        let rule = &mut rules.list[i];
        rule.hits += 1;
        let fault = match rule.delay_ms {
            0 => Fault::Fail(rule.errno.error()),
            ms => Fault::Delay(std::time::Duration::from_millis(ms)),
        };
        if rule.count != 0 && rule.hits >= rule.count {
            rules.list.remove(i);
            self.armed.store(!rules.list.is_empty(), Ordering::Relaxed);
        }
        match fault {
            Fault::Fail(_) => self.injected.fetch_add(1, Ordering::Relaxed),
            Fault::Delay(_) => self.delayed.fetch_add(1, Ordering::Relaxed),
        };
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn spec(op: FaultOp, offset: u64, length: Option<u64>, count: u64) -> FaultSpec {
        FaultSpec {
            op,
            errno: FaultErrno::Eio,
            offset,
            length,
            count,
            delay_ms: 0,
        }
    }

    #[test]
    fn nothing_armed_fails_nothing() {
        let f = Faults::default();
        for cmd in [IoKind::Read, IoKind::Write, IoKind::Flush] {
            assert_eq!(f.check(cmd, 0, 4096), None);
        }
        assert_eq!(f.injected(), 0);
    }

    #[test]
    fn a_rule_fails_matching_requests_in_its_range_count_times() {
        let f = Faults::default();
        f.inject(spec(FaultOp::Read, 8192, Some(4096), 2), SIZE)
            .expect("inject");
        // Outside the range, or another op: untouched (and the count is not used).
        assert_eq!(f.check(IoKind::Read, 0, 8192), None);
        assert_eq!(f.check(IoKind::Read, 12288, 4096), None);
        assert_eq!(f.check(IoKind::Write, 8192, 4096), None);
        // Overlapping at either end: fails, twice, then the rule is gone.
        assert_eq!(f.check(IoKind::Read, 4096, 8192), Some(BlockError::Io));
        assert_eq!(f.check(IoKind::Read, 12287, 1), Some(BlockError::Io));
        assert_eq!(f.check(IoKind::Read, 8192, 4096), None);
        assert_eq!(f.injected(), 2);
        assert!(f.rules().is_empty());
        assert!(!f.armed.load(Ordering::Relaxed));
    }

    #[test]
    fn count_zero_lasts_until_cleared_and_errno_is_kept() {
        let f = Faults::default();
        let mut s = spec(FaultOp::Write, 0, None, 0);
        s.errno = FaultErrno::Enospc;
        let rule = f.inject(s, SIZE).expect("inject");
        assert_eq!(rule.length, SIZE);
        for _ in 0..100 {
            assert_eq!(f.check(IoKind::Write, 0, 512), Some(BlockError::NoSpace));
            assert_eq!(
                f.check(IoKind::WriteZeroes, 0, 512),
                Some(BlockError::NoSpace)
            );
        }
        assert_eq!(f.check(IoKind::Read, 0, 512), None);
        assert_eq!(f.clear(), 1);
        assert_eq!(f.check(IoKind::Write, 0, 512), None);
    }

    #[test]
    fn flush_and_any() {
        let f = Faults::default();
        f.inject(spec(FaultOp::Flush, 4096, Some(512), 1), SIZE)
            .expect("inject");
        assert_eq!(f.check(IoKind::Read, 4096, 512), None);
        // FLUSH has no range: the rule's range does not restrict it.
        assert_eq!(f.check(IoKind::Flush, 0, 0), Some(BlockError::Io));
        f.inject(spec(FaultOp::Any, 0, None, 0), SIZE)
            .expect("inject");
        for cmd in [
            IoKind::Read,
            IoKind::Write,
            IoKind::WriteZeroes,
            IoKind::Unmap,
            IoKind::Readahead,
            IoKind::Flush,
        ] {
            assert_eq!(f.check(cmd, 0, 512), Some(BlockError::Io), "{cmd:?}");
        }
        assert_eq!(f.check(IoKind::BlockStatus, 0, 512), None);
    }

    #[test]
    fn bad_ranges_and_too_many_rules_are_refused() {
        let f = Faults::default();
        for (off, len) in [
            (SIZE, None),
            (0, Some(0)),
            (4096, Some(SIZE)),
            (1, Some(u64::MAX)),
        ] {
            let e = f
                .inject(spec(FaultOp::Read, off, len, 1), SIZE)
                .expect_err("refused");
            assert!(matches!(e, FaultError::Invalid(_)), "{off}+{len:?}: {e}");
        }
        for _ in 0..MAX_RULES {
            f.inject(spec(FaultOp::Read, 0, None, 1), SIZE)
                .expect("inject");
        }
        let e = f
            .inject(spec(FaultOp::Read, 0, None, 1), SIZE)
            .expect_err("bounded");
        assert!(matches!(e, FaultError::TooMany), "{e}");
        assert_eq!(f.clear(), MAX_RULES);
    }

    #[test]
    fn op_and_errno_names() {
        let op: FaultOp = serde_json::from_value(serde_json::json!("any")).unwrap();
        assert_eq!(op, FaultOp::Any);
        let e: FaultErrno = serde_json::from_value(serde_json::json!("ENOSPC")).unwrap();
        assert_eq!(e.error(), BlockError::NoSpace);
        assert_eq!(FaultErrno::default().error(), BlockError::Io);
        // Only the errors a disk gives, by their usual names.
        for bad in ["trim", "EPERM", "eio"] {
            let v = serde_json::json!(bad);
            assert!(serde_json::from_value::<FaultOp>(v.clone()).is_err());
            assert!(serde_json::from_value::<FaultErrno>(v).is_err(), "{bad}");
        }
    }
}
