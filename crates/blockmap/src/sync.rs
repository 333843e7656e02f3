//! The atomics the map synchronizes through, swapped for loom's under `cfg(loom)` so
//! the models in `tests/loom.rs` explore every interleaving of them (crossbeam-epoch's
//! `primitive` module does the same).
//!
//! Statistics counters (`stat`) are always std atomics: they are `Relaxed`, order
//! nothing, and routing them through loom would only multiply the interleavings a
//! model has to explore without checking anything.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize};

pub(crate) use std::sync::atomic::Ordering;

/// Counters that synchronize nothing (see the module docs).
pub(crate) mod stat {
    pub(crate) use std::sync::atomic::{AtomicU64, AtomicUsize};
}

/// Keeps a hot, written field off the cache line of read-mostly fields. 128 bytes
/// because x86's adjacent-line prefetcher pulls cache lines in pairs.
#[repr(align(128))]
#[derive(Debug, Default)]
pub(crate) struct CachePadded<T>(pub(crate) T);

/// A cell loom checks for data races (`loom::cell::UnsafeCell`), or a thin std
/// equivalent with the same `with`/`with_mut` API. Used for the waiter nodes, whose
/// plain fields pass from the pushing thread to the thread that takes the stack.
#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(value: T) -> Self {
        UnsafeCell(std::cell::UnsafeCell::new(value))
    }

    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}
