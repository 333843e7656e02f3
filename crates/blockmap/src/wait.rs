//! Parking a request on a busy chunk without a lock, a spin or a reactor dependency.
//!
//! A waiter is a `std::task::Waker` (the target builds one that posts a message to
//! the owning reactor). Waiters live in `SHARDS` Treiber stacks per map, the shard
//! chosen by a hash of the chunk. A stack is only ever pushed (one node at a time)
//! or taken whole (`swap(null)`), never popped node by node: so there is no ABA on
//! the head and no node is freed while another thread could still read it — the
//! taker owns the whole chain it swapped out.
//!
//! # The protocol (no lost wake-up)
//! Park (`BlockMap::park_until`): push a node, *then* set `WAITERS` in the entry
//! word with a CAS that expects the busy word just read; if the word changed, re-read
//! and retry; if it is no longer busy, return `Ready` and take-and-wake the shard
//! (so a node that raced a transition does not linger). Transition (publish, abort,
//! merge finish/abort, the last unpin): one RMW on the entry word that clears
//! `WAITERS`; if it was set, take the shard and wake every node in it.
//!
//! Why nothing is lost: RMWs on one word are totally ordered. If the waiter's CAS
//! comes first, the transition's RMW reads from it (or from a later RMW in its
//! release sequence), and with `AcqRel` on both the push happens-before the
//! transition's take. Push and take are RMWs on the shard head, so the take comes
//! after the push in the head's modification order: it finds the node — or an
//! earlier taker did, and woke it. If the transition comes first, the waiter's CAS
//! fails and the re-read sees the new state.
//!
//! # Ordering
//! - Waiter's `WAITERS` CAS: `AcqRel`; every transition RMW: `AcqRel` (above). With
//!   a `Relaxed` CAS nothing would order the push before the take on a weak memory
//!   model. (loom cannot show this one: its RMWs always read the newest store.)
//! - Push: `Release` CAS on the head; take: `Acquire` swap. The taker reads the
//!   nodes' fields (waker, next) that the pushers wrote (loom checks this).
//!
//! A take wakes *every* node of the shard, not only those of its chunk: putting the
//! others back would let a concurrent taker of the same shard miss them. Those
//! wake-ups are spurious; a woken request re-tries its operation and parks again if
//! its chunk is still busy. So a `Waker` may be woken spuriously, or after its
//! request stopped waiting (see # Cancellation in the crate docs).

use std::ptr;
use std::task::Waker;

use crate::sync::{AtomicPtr, Ordering, UnsafeCell};

const SHARD_BITS: u32 = if cfg!(loom) { 1 } else { 6 };
const SHARDS: usize = 1 << SHARD_BITS;

/// Both fields are written only by the pushing thread before its Release CAS
/// publishes the node, and read only by the thread whose Acquire swap took it.
/// (Cells rather than plain fields so that loom checks exactly that hand-off.)
struct WaitNode {
    waker: UnsafeCell<Waker>,
    next: UnsafeCell<*mut WaitNode>,
}

// SAFETY: a node is owned by one thread at a time — the pusher until its Release
// CAS publishes it, then the stack, then the thread whose swap took the chain —
// and its contents (a `Waker`, which is `Send`, and a link to another node of the
// same chain) may move between threads with that ownership. Never shared: no
// `Sync`.
unsafe impl Send for WaitNode {}

pub(crate) struct WaitList {
    /// Not cache-padded: parking is the rare, contended-chunk path; 8 bytes a
    /// shard keeps a small map small.
    shards: [AtomicPtr<WaitNode>; SHARDS],
    /// Under loom, woken nodes are kept (not freed) until the map is dropped. The
    /// push CAS compares node addresses; with frees, the allocator may hand a
    /// freed node's address to a new node, and whether a CAS then succeeds would
    /// depend on the allocator rather than on the schedule — loom needs every
    /// outcome to be a function of the schedule. (The real code is fine with
    /// that reuse: push-only + take-all stacks are ABA-safe, since a push that
    /// finds `head == current` links to exactly the node at the head.)
    #[cfg(loom)]
    #[allow(clippy::vec_box)] // the boxes *are* the point: their addresses stay taken
    graveyard: std::sync::Mutex<Vec<Box<std::mem::MaybeUninit<WaitNode>>>>,
}

impl WaitList {
    pub(crate) fn new() -> Self {
        WaitList {
            shards: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            #[cfg(loom)]
            graveyard: Default::default(),
        }
    }

    #[inline]
    fn shard(&self, chunk: u64) -> &AtomicPtr<WaitNode> {
        // Fibonacci hashing: neighbouring chunks (a sequential merge, a big write)
        // land in different shards.
        let index = chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS);
        &self.shards[index as usize]
    }

    /// Register `waker` for `chunk`. The caller then publishes the registration by
    /// an RMW on the chunk's entry word (see the module docs).
    pub(crate) fn push(&self, chunk: u64, waker: &Waker) {
        let node = Box::new(WaitNode {
            waker: UnsafeCell::new(waker.clone()),
            next: UnsafeCell::new(ptr::null_mut()),
        });
        let head = self.shard(chunk);
        let mut current = head.load(Ordering::Relaxed);
        let node = Box::into_raw(node);
        loop {
            // SAFETY: `node` is not yet published; this thread owns it exclusively.
            unsafe { (*node).next.with_mut(|next| *next = current) };
            // Release: a taker that swaps this node out sees `waker` and `next`.
            match head.compare_exchange_weak(current, node, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => current = now,
            }
        }
    }

    /// Take every node of `chunk`'s shard and wake it.
    pub(crate) fn wake(&self, chunk: u64) {
        // Acquire: pairs with the pushes' Release, for the nodes' contents.
        let taken = self.shard(chunk).swap(ptr::null_mut(), Ordering::Acquire);
        // SAFETY: the swap made this thread the only owner of the chain.
        unsafe { self.wake_chain(taken) };
    }

    /// Wake and free every node of a chain.
    ///
    /// # Safety
    /// The caller owns the chain exclusively (it swapped it out of a shard head)
    /// and every node came from `Box::into_raw` in `push`.
    unsafe fn wake_chain(&self, mut node: *mut WaitNode) {
        while !node.is_null() {
            // SAFETY: the caller's ownership of the chain covers every node in it.
            let (waker, next) = unsafe { self.release(node) };
            waker.wake();
            node = next;
        }
    }

    /// Take a node's contents and free it (under loom: retire it, see `graveyard`).
    ///
    /// # Safety
    /// The caller owns `node` exclusively; it came from `Box::into_raw` in `push`.
    unsafe fn release(&self, node: *mut WaitNode) -> (Waker, *mut WaitNode) {
        // SAFETY: exclusive ownership of the node (the caller's contract); the
        // waker is moved out exactly once: the node is then freed without dropping
        // its fields (as `MaybeUninit`), or, under loom, retired the same way.
        unsafe {
            let next = (*node).next.with(|next| *next);
            let waker = (*node).waker.with(|waker| ptr::read(waker));
            let retired = Box::from_raw(node.cast::<std::mem::MaybeUninit<WaitNode>>());
            #[cfg(loom)]
            if let Ok(mut graveyard) = self.graveyard.lock() {
                graveyard.push(retired);
            }
            #[cfg(not(loom))]
            drop(retired);
            (waker, next)
        }
    }
}

impl Drop for WaitList {
    fn drop(&mut self) {
        // Waiters still registered when the map goes away are woken rather than
        // forgotten: whatever they wait for will not happen here any more, and a
        // request must not hang on a map that no longer exists.
        for shard in &self.shards {
            let taken = shard.swap(ptr::null_mut(), Ordering::Acquire);
            // SAFETY: `&mut self`: nobody else can push or take.
            unsafe { self.wake_chain(taken) };
        }
    }
}
