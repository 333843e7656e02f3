//! Bump allocation of tree nodes from slabs that live exactly as long as the map.
//!
//! One arena per node type (leaves, bottom and upper interior nodes), so every slot
//! of a slab has the same size and nothing is lost to fitting. An allocation is one
//! `fetch_add` on the current slab's cursor plus zeroing the node; a new slab is
//! needed once per slab, not once per node (the old per-node `Box` cost a `malloc`,
//! and often a page fault, per scattered install).
//!
//! # Reclamation
//! A slab is freed only when its arena is dropped, i.e. with the whole map (`Drop`
//! takes `&mut`: no reactor holds the map any more). Nothing is freed or reused
//! while the map is shared, so a node, once handed out, stays valid until the
//! map's drop — which is what lets the tree hand out `&Leaf` for the borrow of the
//! map. A node whose install CAS lost stays unused in its slab (nobody else ever
//! saw it; it is counted in [`Arena::held_bytes`]); a slab whose install CAS lost
//! was never seen by another thread either and is freed at once by its maker.
//!
//! # Slab sizes
//! The first slab holds `first` nodes; each next one an eighth of all slabs before
//! it (at least `first` nodes, at most `MAX_SLAB_BYTES` = 2 MiB). So an arena holds
//! at most 1/8 more than the nodes it has handed out, plus one small slab: a
//! nearly empty map holds a few KiB, a dense one stays within 10 bytes per chunk.
//! Slabs of 2 MiB (an arena past 16 MiB) are 2 MiB-aligned and advised to the
//! kernel as transparent-huge-page candidates (`MADV_HUGEPAGE`, Linux): one TLB
//! entry then covers 2 MiB of nodes instead of 4 KiB, and a fresh slab costs one
//! page fault instead of 512.
//!
//! # Ordering
//! A slab descriptor is written before the `AcqRel` CAS that installs it as
//! `current` and read after an `Acquire` load of `current`. The cursor is a
//! `Relaxed` `fetch_add`: its total modification order alone makes the indexes
//! handed out distinct. The arena publishes no node contents: the thread that got
//! an index zeroes the node, and the tree's install CAS (`Release`) publishes it.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ptr::{self, NonNull};

use crate::sync::stat;
use crate::sync::{AtomicPtr, AtomicUsize, Ordering};

/// Largest slab; also the huge-page size slabs of this size are aligned to.
const MAX_SLAB_BYTES: usize = 2 << 20;

/// A node type the arena can hand out.
///
/// # Safety
/// `init` must leave a valid node, equal to a freshly constructed empty one, in
/// `*node`, and `Self` must not need dropping (slabs are freed without dropping
/// their nodes).
pub(crate) unsafe trait Node: Sized {
    /// Write an empty node to `node`.
    ///
    /// # Safety
    /// `node` is valid for writes of `Self`, aligned, and owned by the caller.
    unsafe fn init(node: *mut Self);
}

/// Nodes of one type, bump-allocated from slabs the arena owns.
pub(crate) struct Arena<T: Node> {
    /// Newest slab (older ones are linked from it); null before the first node.
    current: AtomicPtr<Slab<T>>,
    /// Nodes in the first slab.
    first: usize,
    /// Bytes of slabs and descriptors (statistics only).
    held: stat::AtomicUsize,
}

struct Slab<T> {
    base: NonNull<T>,
    /// Nodes the slab has room for.
    nodes: usize,
    /// Next index to hand out; runs past `nodes` once the slab is full.
    next: AtomicUsize,
    /// Nodes in this slab and all older ones (sizes the next slab).
    cumulative: usize,
    layout: Layout,
    /// The slab before this one, or null. Immutable.
    prev: *mut Slab<T>,
}

impl<T: Node> Arena<T> {
    /// An arena whose first slab will hold `first` nodes (allocated on first use).
    pub(crate) fn new(first: usize) -> Arena<T> {
        const {
            assert!(!std::mem::needs_drop::<T>());
            assert!(size_of::<T>() > 0);
        }
        debug_assert!(first >= 1 && first <= Self::max_nodes());
        Arena {
            current: AtomicPtr::new(ptr::null_mut()),
            first,
            held: stat::AtomicUsize::new(0),
        }
    }

    /// Nodes in the largest slab (loom: tiny, so that models cross slab ends).
    const fn max_nodes() -> usize {
        if cfg!(loom) {
            4
        } else {
            MAX_SLAB_BYTES / size_of::<T>()
        }
    }

    /// Bytes of memory the arena holds: slabs (used or not) and their descriptors.
    pub(crate) fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A zeroed node, exclusively the caller's until it publishes it. Lock-free:
    /// a retry happens only when another thread installed a new slab meanwhile.
    pub(crate) fn alloc(&self) -> NonNull<T> {
        let mut slab = self.current.load(Ordering::Acquire);
        loop {
            // SAFETY: a non-null `current` is a descriptor installed by the CAS
            // below; descriptors are freed only in `Drop` (`&mut self`).
            let full = match unsafe { slab.as_ref() } {
                Some(s) => {
                    let index = s.next.fetch_add(1, Ordering::Relaxed);
                    if index < s.nodes {
                        // SAFETY: `index < nodes`, so the slot is inside the slab,
                        // and the `fetch_add` gave `index` to this thread alone.
                        return unsafe { init(s.base.add(index)) };
                    }
                    s.cumulative
                }
                None => 0,
            };
            let nodes = (full / 8).clamp(self.first, Self::max_nodes());
            let fresh = Slab::<T>::new_raw(nodes, full, slab);
            // Release: whoever loads `fresh` from `current` sees its fields.
            match self
                .current
                .compare_exchange(slab, fresh, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: just installed, never freed before `Drop`; its index 0
                    // was reserved for its maker (`next` starts at 1).
                    let s = unsafe { &*fresh };
                    self.held
                        .fetch_add(s.layout.size() + size_of::<Slab<T>>(), Ordering::Relaxed);
                    // SAFETY: slot 0 of a slab with at least one node, ours alone.
                    return unsafe { init(s.base) };
                }
                Err(now) => {
                    // SAFETY: the CAS failed, so `fresh` was never published: this
                    // thread owns it and its memory exclusively.
                    unsafe { Slab::free_raw(fresh) };
                    slab = now;
                }
            }
        }
    }
}

impl<T: Node> Drop for Arena<T> {
    fn drop(&mut self) {
        let mut slab = self.current.load(Ordering::Relaxed);
        while !slab.is_null() {
            // SAFETY: `&mut self`: no other thread holds a node or a descriptor of
            // this arena (Reclamation); each slab is on the chain exactly once.
            slab = unsafe { Slab::free_raw(slab) };
        }
    }
}

/// Zero the node at `node` and hand it out.
///
/// # Safety
/// As [`Node::init`].
unsafe fn init<T: Node>(node: NonNull<T>) -> NonNull<T> {
    // SAFETY: forwarded from the caller.
    unsafe { T::init(node.as_ptr()) };
    node
}

impl<T> Slab<T> {
    /// A new slab of `nodes` nodes after `prev`, with index 0 reserved.
    fn new_raw(nodes: usize, before: usize, prev: *mut Slab<T>) -> *mut Slab<T> {
        let bytes = nodes * size_of::<T>();
        let huge = !cfg!(loom) && bytes >= MAX_SLAB_BYTES;
        let align = if huge {
            MAX_SLAB_BYTES
        } else {
            align_of::<T>()
        };
        let layout = Layout::from_size_align(bytes, align).expect("slab layout");
        // SAFETY: `layout` has a non-zero size (`nodes >= 1`, `T` is not a ZST).
        let base = unsafe { alloc(layout) };
        let Some(base) = NonNull::new(base) else {
            handle_alloc_error(layout)
        };
        if huge {
            advise_huge_pages(base.as_ptr(), bytes);
        }
        Box::into_raw(Box::new(Slab {
            base: base.cast(),
            nodes,
            next: AtomicUsize::new(1),
            cumulative: before + nodes,
            layout,
            prev,
        }))
    }

    /// Free a slab and its descriptor; returns the previous slab.
    ///
    /// # Safety
    /// `slab` came from `new_raw`, the caller owns it exclusively, and nothing
    /// uses its nodes afterwards.
    unsafe fn free_raw(slab: *mut Slab<T>) -> *mut Slab<T> {
        // SAFETY: forwarded from the caller: a `Box` from `new_raw`, owned.
        let slab = unsafe { Box::from_raw(slab) };
        // SAFETY: `base` was allocated with `layout`; the nodes need no drop (`Node`).
        unsafe { dealloc(slab.base.as_ptr().cast(), slab.layout) };
        slab.prev
    }
}

/// Ask Linux to back `[base, base + len)` with transparent huge pages (with THP in
/// `madvise` mode, as on most distributions, it otherwise never does). Advisory:
/// failure only costs TLB misses; a no-op elsewhere and under loom.
fn advise_huge_pages(base: *mut u8, len: usize) {
    #[cfg(all(target_os = "linux", not(loom)))]
    // SAFETY: the range is a live allocation this thread owns exclusively;
    // MADV_HUGEPAGE changes neither its contents nor its mapping, only how the
    // kernel may back it. The result is ignored: failure (THP disabled) is harmless.
    unsafe {
        libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(all(target_os = "linux", not(loom))))]
    let _ = (base, len);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU64;

    #[repr(align(64))]
    struct Line([AtomicU64; 8]);

    // SAFETY: all-zero bytes are eight `AtomicU64(0)`s; no drop glue.
    unsafe impl Node for Line {
        unsafe fn init(node: *mut Self) {
            // SAFETY: forwarded from the caller.
            unsafe { node.write_bytes(0, 1) };
        }
    }

    #[test]
    fn slabs_double_up_to_the_cap_and_nodes_are_distinct_and_zeroed() {
        let arena = Arena::<Line>::new(2);
        let mut seen = std::collections::HashSet::new();
        let count = 3 * Arena::<Line>::max_nodes();
        for i in 0..count {
            let node = arena.alloc();
            // SAFETY: freshly allocated, ours alone, zeroed.
            let line = unsafe { node.as_ref() };
            assert!(line.0.iter().all(|w| w.load(Ordering::Relaxed) == 0));
            line.0[0].store(i as u64 + 1, Ordering::Relaxed);
            assert!(seen.insert(node.as_ptr() as usize));
            assert_eq!(node.as_ptr() as usize % 64, 0);
        }
        // Each slab an eighth of the ones before (2 MiB at most): at most 1/8
        // spare, plus the small first slabs and the descriptors.
        let held = arena.held_bytes();
        let used = count * size_of::<Line>();
        assert!(
            held >= used && held <= used + used / 8 + 16 * 1024,
            "{held} {used}"
        );
    }

    #[test]
    fn concurrent_allocations_never_share_a_node() {
        let arena = Arena::<Line>::new(1);
        let nodes: Vec<Vec<usize>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..20_000)
                            .map(|_| arena.alloc().as_ptr() as usize)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let all: std::collections::HashSet<usize> = nodes.iter().flatten().copied().collect();
        assert_eq!(all.len(), 80_000);
    }
}
