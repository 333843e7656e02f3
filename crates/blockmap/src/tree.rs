//! The radix tree behind a map: interior nodes of `INNER_LEN` child pointers, leaves
//! of `LEAF_LEN` entry words, all allocated on first write below them.
//!
//! # Ownership
//! The tree owns every node. A node is reachable from the root from the moment its
//! parent's CAS installs it until the tree is dropped; nothing is unlinked or freed
//! before that, so a `&Leaf`/`&Inner` derived from `&Tree` is valid for the
//! borrow's lifetime. A thread that loses the install CAS frees its own node, which
//! nobody else has seen.
//!
//! Growth never reallocates: a taller root is a new interior node whose child 0 is
//! the old root, installed by CAS on the root pointer. The old root stays reachable
//! (as that child), so a reader still walking it is fine.
//!
//! # Ordering
//! Every node pointer is published with a `Release` CAS (`AcqRel`) and read with
//! `Acquire`, so a reader that finds a node also finds its zeroed contents and the
//! immutable `height` of an interior node.
//!
//! # Memory
//! Direct-indexed leaves make dense regions cheap and sparse ones dear (measured by
//! `cargo bench`, see `BENCHMARKS.md`): 8.3 bytes per chunk when dense (the 8-byte
//! word plus interior nodes), ~33 at one chunk in four, ~256 (a leaf) per isolated
//! chunk, and up to ~4.4 KiB for chunks so far apart that each also needs its own
//! bottom interior node. A hash map costs ~30 bytes per entry whatever the pattern.
//! Smaller leaves would trade lookup depth and iteration speed for at most ~30 % on
//! scattered maps; a sparse-leaf encoding could do better but would need
//! quiescent-point compaction (see Reclamation in the crate docs).

use std::ptr;

use crate::entry::PHYSICAL_MAX;
use crate::sync::stat::AtomicUsize;
use crate::sync::{AtomicPtr, AtomicU64, Ordering};

/// log2 of the entries per leaf. 32 entries = 256 bytes = 4 cache lines: dense
/// regions cost 8 bytes per chunk plus 1/4 byte of interior node, an isolated
/// mapped chunk costs one leaf. Loom models use 2 so that two chunks can share a
/// leaf and four chunks span two.
pub(crate) const LEAF_BITS: u32 = if cfg!(loom) { 1 } else { 5 };
/// log2 of the children per interior node: 512 pointers = 4 KiB, one page.
pub(crate) const INNER_BITS: u32 = if cfg!(loom) { 1 } else { 9 };
pub(crate) const LEAF_LEN: usize = 1 << LEAF_BITS;
pub(crate) const INNER_LEN: usize = 1 << INNER_BITS;
/// Tallest tree: 5 + 5 * 9 = 50 bits >= the 48 bits we allow; loom: 1 + 6 = 7 bits.
pub(crate) const MAX_HEIGHT: u32 = if cfg!(loom) { 6 } else { 5 };

/// Largest capacity, in chunks, of any map (also bounded by the physical field so
/// that a fully written volume's chunks all have distinct physical indexes).
pub const MAX_CAPACITY: u64 = {
    let tree = coverage(MAX_HEIGHT);
    let physical = PHYSICAL_MAX + 1;
    if tree < physical {
        tree
    } else {
        physical
    }
};

/// Chunks addressed by a tree whose root has `height` (>= 1) interior levels.
pub(crate) const fn coverage(height: u32) -> u64 {
    1u64 << (LEAF_BITS + height * INNER_BITS)
}

/// Chunks below one child of an interior node at `height`.
const fn child_span(height: u32) -> u64 {
    1u64 << (LEAF_BITS + (height - 1) * INNER_BITS)
}

/// Smallest height whose coverage is at least `capacity`.
pub(crate) const fn height_for(capacity: u64) -> u32 {
    let mut height = 1;
    while height < MAX_HEIGHT && coverage(height) < capacity {
        height += 1;
    }
    height
}

#[inline]
const fn child_slot(chunk: u64, height: u32) -> usize {
    ((chunk >> (LEAF_BITS + (height - 1) * INNER_BITS)) as usize) & (INNER_LEN - 1)
}

pub(crate) struct Leaf {
    entries: [AtomicU64; LEAF_LEN],
}

impl Leaf {
    fn new_raw() -> *mut Leaf {
        Box::into_raw(Box::new(Leaf {
            entries: std::array::from_fn(|_| AtomicU64::new(0)),
        }))
    }

    /// The entry word of `chunk` (the leaf's own index bits of it).
    #[inline]
    pub(crate) fn entry(&self, chunk: u64) -> &AtomicU64 {
        &self.entries[(chunk as usize) & (LEAF_LEN - 1)]
    }

    #[inline]
    pub(crate) fn entry_at(&self, index: usize) -> &AtomicU64 {
        &self.entries[index]
    }
}

pub(crate) struct Inner {
    /// Levels of interior nodes from here down, this one included: 1 means the
    /// children are leaves. Immutable after the node is published.
    height: u32,
    /// `*mut Leaf` when `height == 1`, else `*mut Inner`; null = nothing mapped below.
    children: [AtomicPtr<()>; INNER_LEN],
}

impl Inner {
    fn new_raw(height: u32, first_child: *mut ()) -> *mut Inner {
        debug_assert!((1..=MAX_HEIGHT).contains(&height));
        Box::into_raw(Box::new(Inner {
            height,
            children: std::array::from_fn(|i| {
                AtomicPtr::new(if i == 0 { first_child } else { ptr::null_mut() })
            }),
        }))
    }
}

pub(crate) struct Tree {
    root: AtomicPtr<Inner>,
    memory_bytes: AtomicUsize,
}

impl Tree {
    /// A tree tall enough for `capacity` chunks (`capacity <= MAX_CAPACITY`).
    pub(crate) fn new(capacity: u64) -> Tree {
        debug_assert!(capacity <= MAX_CAPACITY);
        Tree {
            root: AtomicPtr::new(Inner::new_raw(height_for(capacity), ptr::null_mut())),
            memory_bytes: AtomicUsize::new(size_of::<Inner>()),
        }
    }

    /// Bytes of nodes allocated so far.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    #[inline]
    fn root(&self) -> &Inner {
        let root = self.root.load(Ordering::Acquire);
        // SAFETY: the root is never null (set in `new`, replaced only by `grow` with
        // a new non-null node) and no node is freed before `Drop for Tree`, which
        // cannot run while `&self` is borrowed (Ownership in the module docs).
        unsafe { &*root }
    }

    /// The leaf holding `chunk`, if one was allocated. The caller checked `chunk`
    /// against the capacity *before* this call (with `Acquire`), so the root loaded
    /// here is tall enough to address it.
    #[inline]
    pub(crate) fn leaf(&self, chunk: u64) -> Option<&Leaf> {
        let mut node = self.root();
        debug_assert!(chunk < coverage(node.height));
        loop {
            let child = node.children[child_slot(chunk, node.height)].load(Ordering::Acquire);
            if child.is_null() {
                return None;
            }
            // SAFETY: non-null children are nodes installed by `child_or_alloc` and
            // live until the tree is dropped (Ownership); `height == 1` children are
            // leaves, others interior nodes (the `children` invariant).
            unsafe {
                if node.height == 1 {
                    return Some(&*child.cast::<Leaf>());
                }
                node = &*child.cast::<Inner>();
            }
        }
    }

    /// The leaf holding `chunk`, allocating it (and interior nodes) on the way.
    /// Same precondition as [`Tree::leaf`].
    pub(crate) fn leaf_or_alloc(&self, chunk: u64) -> &Leaf {
        let mut node = self.root();
        debug_assert!(chunk < coverage(node.height));
        loop {
            let child = self.child_or_alloc(node, child_slot(chunk, node.height));
            // SAFETY: as in `leaf`: `child` is installed, non-null, of the type the
            // parent's height says, and lives as long as `self`.
            unsafe {
                if node.height == 1 {
                    return &*child.cast::<Leaf>();
                }
                node = &*child.cast::<Inner>();
            }
        }
    }

    fn child_or_alloc(&self, node: &Inner, slot: usize) -> *mut () {
        let link = &node.children[slot];
        let child = link.load(Ordering::Acquire);
        if !child.is_null() {
            return child;
        }
        let (fresh, bytes) = if node.height == 1 {
            (Leaf::new_raw().cast::<()>(), size_of::<Leaf>())
        } else {
            (
                Inner::new_raw(node.height - 1, ptr::null_mut()).cast::<()>(),
                size_of::<Inner>(),
            )
        };
        // Release: whoever finds `fresh` must also see it zeroed (and its height).
        match link.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                self.memory_bytes.fetch_add(bytes, Ordering::Relaxed);
                fresh
            }
            Err(winner) => {
                // SAFETY: the CAS failed, so `fresh` was never published: this thread
                // still owns it exclusively, and it was made by `Box::into_raw` of
                // the type the parent's height says.
                unsafe { free_node(fresh, node.height - 1) };
                winner
            }
        }
    }

    /// Make the tree tall enough for `capacity` chunks (`<= MAX_CAPACITY`).
    pub(crate) fn grow(&self, capacity: u64) {
        debug_assert!(capacity <= MAX_CAPACITY);
        loop {
            let old = self.root.load(Ordering::Acquire);
            // SAFETY: as in `root`.
            let height = unsafe { (*old).height };
            if coverage(height) >= capacity {
                return;
            }
            let taller = Inner::new_raw(height + 1, old.cast::<()>());
            match self
                .root
                .compare_exchange(old, taller, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.memory_bytes
                        .fetch_add(size_of::<Inner>(), Ordering::Relaxed);
                }
                Err(_) => {
                    // SAFETY: never published; its only child link points at the old
                    // root, which it does not own, so free just this node, not the
                    // subtree.
                    drop(unsafe { Box::from_raw(taller) });
                }
            }
        }
    }

    /// First allocated leaf that may hold a mapped chunk in `[from, to)`, as
    /// `(index of its first chunk, leaf)`; skips unallocated subtrees whole.
    pub(crate) fn seek(&self, from: u64, to: u64) -> Option<(u64, &Leaf)> {
        seek_in(self.root(), 0, from, to)
    }

    /// Count mapped entries by walking everything (tests' cross-check of the counter).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn count_mapped_slow(&self) -> u64 {
        let mut count = 0;
        let mut from = 0;
        while let Some((base, leaf)) = self.seek(from, u64::MAX) {
            count += leaf
                .entries
                .iter()
                .filter(|e| crate::entry::has_data(e.load(Ordering::Acquire)))
                .count() as u64;
            from = base + LEAF_LEN as u64;
        }
        count
    }
}

fn seek_in(node: &Inner, base: u64, from: u64, to: u64) -> Option<(u64, &Leaf)> {
    let span = child_span(node.height);
    let first = if from > base {
        ((from - base) / span) as usize
    } else {
        0
    };
    for slot in first..INNER_LEN {
        let child_base = base + slot as u64 * span;
        if child_base >= to {
            return None;
        }
        let child = node.children[slot].load(Ordering::Acquire);
        if child.is_null() {
            continue;
        }
        // SAFETY: as in `Tree::leaf`.
        unsafe {
            if node.height == 1 {
                return Some((child_base, &*child.cast::<Leaf>()));
            }
            if let Some(found) = seek_in(&*child.cast::<Inner>(), child_base, from, to) {
                return Some(found);
            }
        }
    }
    None
}

/// Free a node and everything below it.
///
/// # Safety
/// `node` came from `Leaf::new_raw` (`height == 0`) or `Inner::new_raw` (`height`
/// interior levels), the caller owns it exclusively, and nothing uses it afterwards.
unsafe fn free_node(node: *mut (), height: u32) {
    if height == 0 {
        // SAFETY: the caller guarantees a `Leaf` from `Box::into_raw` it owns.
        drop(unsafe { Box::from_raw(node.cast::<Leaf>()) });
        return;
    }
    // SAFETY: the caller guarantees an `Inner` from `Box::into_raw` it owns.
    let inner = unsafe { Box::from_raw(node.cast::<Inner>()) };
    debug_assert_eq!(inner.height, height);
    for child in &inner.children {
        let child = child.load(Ordering::Relaxed);
        if !child.is_null() {
            // SAFETY: owning a node means owning the subtree below it; children of
            // a height-h node have h-1 interior levels.
            unsafe { free_node(child, height - 1) };
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let root = self.root.load(Ordering::Relaxed);
        // SAFETY: `&mut self` means no other thread holds a reference into the tree
        // (Reclamation in the crate docs); the root is an `Inner` of its height.
        unsafe {
            let height = (*root).height;
            free_node(root.cast::<()>(), height);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn heights_cover_capacities() {
        assert_eq!(height_for(0), 1);
        assert_eq!(height_for(coverage(1)), 1);
        assert_eq!(height_for(coverage(1) + 1), 2);
        assert!(coverage(height_for(MAX_CAPACITY)) >= MAX_CAPACITY);
        assert_eq!(MAX_CAPACITY, 1 << 48);
    }

    #[test]
    fn leaves_are_allocated_lazily_and_found_again() {
        let tree = Tree::new(1 << 20);
        let base = tree.memory_bytes();
        assert!(tree.leaf(12345).is_none());
        let leaf = tree.leaf_or_alloc(12345) as *const Leaf;
        assert_eq!(tree.leaf(12345).map(|l| l as *const Leaf), Some(leaf));
        assert_eq!(tree.leaf(12344).map(|l| l as *const Leaf), Some(leaf));
        assert!(tree.leaf(12345 + LEAF_LEN as u64).is_none());
        // Height for 2^20 chunks is 2: one interior node and one leaf were added.
        assert_eq!(
            tree.memory_bytes(),
            base + size_of::<Inner>() + size_of::<Leaf>()
        );
    }

    #[test]
    fn growing_keeps_existing_leaves_reachable() {
        let tree = Tree::new(LEAF_LEN as u64);
        let leaf = tree.leaf_or_alloc(3) as *const Leaf;
        tree.grow(MAX_CAPACITY);
        assert_eq!(tree.leaf(3).map(|l| l as *const Leaf), Some(leaf));
        let far = MAX_CAPACITY - 1;
        tree.leaf_or_alloc(far);
        assert_eq!(tree.seek(0, u64::MAX).map(|(b, _)| b), Some(0));
        assert_eq!(
            tree.seek(LEAF_LEN as u64, u64::MAX).map(|(b, _)| b),
            Some(far & !(LEAF_LEN as u64 - 1))
        );
        assert!(tree
            .seek(LEAF_LEN as u64, far & !(LEAF_LEN as u64 - 1))
            .is_none());
    }
}
