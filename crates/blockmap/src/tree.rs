//! The radix tree behind a map: leaves of `LEAF_LEN` entry words, bottom interior
//! nodes of `BOTTOM_LEN` leaf pointers, upper interior nodes of `UPPER_LEN` child
//! pointers; all allocated on first write below them, from per-type arenas.
//!
//! # Shape
//! ```text
//!  height h >= 2: upper node, 1024 children (8 KiB), each covering coverage(h - 1)
//!  height 1:      bottom node, 64 leaves (512 B), covering 1 Ki chunks
//!  leaf:          16 entry words (128 B, two cache lines)
//! ```
//! Coverage is 2^10 chunks at height 1, 2^20 at 2, 2^30 at 3 (a 4 TiB volume of
//! 4 KiB chunks; a lookup is then the root pointer, the root, one upper node, one
//! bottom node and the leaf word), 2^40 at 4. The root pointer carries the height
//! in its low bits (nodes are 64-byte aligned), so a walk reads no node headers:
//! nodes are bare arrays of atomics.
//!
//! # Ownership
//! The tree owns every node, through its arenas (`arena` module). A node is
//! reachable from the root from the moment its parent's CAS installs it until the
//! tree is dropped; nothing is unlinked or freed before that, so a `&Leaf` derived
//! from `&Tree` is valid for the borrow's lifetime. A thread that loses an install
//! CAS leaves its node unused in the arena; nobody else has seen it.
//!
//! Growth never reallocates: a taller root is a new upper node whose child 0 is the
//! old root, installed by CAS on the root pointer. The old root stays reachable (as
//! that child), so a reader still walking it is fine.
//!
//! # Ordering
//! Every node pointer is published with a `Release` CAS (`AcqRel`) and read with
//! `Acquire`, so a reader that finds a node also finds it zeroed (the allocating
//! thread zeroed it before the CAS), and a reader of a taller root finds its child 0.
//! A batched lookup (`Walker`) loads the root once per tile and keeps the links it
//! found between passes: installed pointers never change, so that is the same
//! walk done earlier. Its prefetches (`prefetcht0`) are hints: no architectural
//! access, no fault, no effect on ordering.
//!
//! # Memory
//! Direct-indexed leaves make dense regions cheap and sparse ones dear (measured by
//! `cargo bench`, see `BENCHMARKS.md`): a dense region costs the 8-byte word plus
//! 0.5 byte of bottom node per chunk; an isolated chunk costs a leaf (128 B) plus,
//! when no neighbour within 1 Ki chunks is mapped, a bottom node (512 B), plus an
//! upper node (8 KiB) per 1 Mi chunks touched. Leaves of 16 (were 32) and bottom
//! nodes of 64 (were 512) make scattered maps ~1.4-3.7x smaller than before, at
//! the cost of one more leaf pointer per 16 chunks. Arenas hold up to 1/8 more
//! than the nodes in use; `memory_bytes` counts what they hold.

use std::marker::PhantomData;
use std::ptr;

use crate::arena::{Arena, Node};
use crate::entry::PHYSICAL_MAX;
use crate::sync::{AtomicPtr, AtomicU64, Ordering};

/// log2 of the entries per leaf: 16 entries = 128 bytes. Loom models use 1 so that
/// two chunks share a leaf and four span two.
pub(crate) const LEAF_BITS: u32 = if cfg!(loom) { 1 } else { 4 };
/// log2 of the leaf pointers per bottom node: 64 = 512 bytes, covering 1 Ki chunks.
pub(crate) const BOTTOM_BITS: u32 = if cfg!(loom) { 1 } else { 6 };
/// log2 of the children per upper node: 1024 = 8 KiB. Wide, so that volumes up to
/// 4 TiB (2^30 chunks) are three levels deep; upper nodes are few and stay cached.
pub(crate) const UPPER_BITS: u32 = if cfg!(loom) { 1 } else { 10 };
pub(crate) const LEAF_LEN: usize = 1 << LEAF_BITS;
const BOTTOM_LEN: usize = 1 << BOTTOM_BITS;
const UPPER_LEN: usize = 1 << UPPER_BITS;
/// Tallest tree: 4 + 6 + 4 * 10 = 50 bits >= the 48 bits we allow; loom: 7 bits.
pub(crate) const MAX_HEIGHT: u32 = if cfg!(loom) { 6 } else { 5 };
/// Low bits of the root pointer that hold the height.
const HEIGHT_MASK: usize = 0b111;

/// Nodes in each arena's first slab: small, so that a nearly empty map stays a
/// few KiB (1 KiB of leaves, 1 KiB of bottom nodes, one upper node).
const LEAF_FIRST: usize = if cfg!(loom) { 2 } else { 8 };
const BOTTOM_FIRST: usize = 2;
const UPPER_FIRST: usize = if cfg!(loom) { 2 } else { 1 };

const _: () = {
    assert!(MAX_HEIGHT as usize <= HEIGHT_MASK);
    assert!(align_of::<Leaf>() > HEIGHT_MASK && align_of::<Upper>() > HEIGHT_MASK);
    assert!(align_of::<Bottom>() > HEIGHT_MASK);
};

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
    1u64 << child_shift(height + 1)
}

/// log2 of the chunks below one child of an interior node at `height`.
const fn child_shift(height: u32) -> u32 {
    if height == 1 {
        LEAF_BITS
    } else {
        LEAF_BITS + BOTTOM_BITS + (height - 2) * UPPER_BITS
    }
}

/// Smallest height whose coverage is at least `capacity`.
pub(crate) const fn height_for(capacity: u64) -> u32 {
    let mut height = 1;
    while height < MAX_HEIGHT && coverage(height) < capacity {
        height += 1;
    }
    height
}

/// Index of `chunk`'s child in an interior node at `height`.
#[inline]
const fn child_slot(chunk: u64, height: u32) -> usize {
    let mask = if height == 1 {
        BOTTOM_LEN - 1
    } else {
        UPPER_LEN - 1
    };
    ((chunk >> child_shift(height)) as usize) & mask
}

#[repr(align(64))]
pub(crate) struct Leaf {
    entries: [AtomicU64; LEAF_LEN],
}

impl Leaf {
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

/// An interior node: `*mut Leaf` children at height 1 (`Bottom`), `*mut Bottom` at
/// height 2 and `*mut Upper` above (`Upper`); null = nothing mapped below. The
/// height is not stored: a walk knows it from the root pointer's tag.
#[repr(align(64))]
struct Inner<const N: usize> {
    children: [AtomicPtr<()>; N],
}

type Bottom = Inner<BOTTOM_LEN>;
type Upper = Inner<UPPER_LEN>;

// SAFETY: outside loom, all-zero bytes are sixteen `AtomicU64(0)` (same in-memory
// representation as `u64`); under loom a constructed node is written. No drop glue
// (the arena asserts it).
unsafe impl Node for Leaf {
    unsafe fn init(node: *mut Leaf) {
        #[cfg(not(loom))]
        // SAFETY: forwarded from the caller (valid, aligned, owned).
        unsafe {
            node.write_bytes(0, 1)
        };
        #[cfg(loom)]
        // SAFETY: as above.
        unsafe {
            node.write(Leaf {
                entries: std::array::from_fn(|_| AtomicU64::new(0)),
            })
        };
    }
}

// SAFETY: outside loom, all-zero bytes are null `AtomicPtr`s (same in-memory
// representation as `*mut T`); under loom a constructed node is written. No drop
// glue (the arena asserts it).
unsafe impl<const N: usize> Node for Inner<N> {
    unsafe fn init(node: *mut Self) {
        #[cfg(not(loom))]
        // SAFETY: forwarded from the caller (valid, aligned, owned).
        unsafe {
            node.write_bytes(0, 1)
        };
        #[cfg(loom)]
        // SAFETY: as above.
        unsafe {
            node.write(Inner {
                children: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            })
        };
    }
}

pub(crate) struct Tree {
    /// The root node, tagged with its height (`HEIGHT_MASK` bits). Never null.
    root: AtomicPtr<()>,
    leaves: Arena<Leaf>,
    bottoms: Arena<Bottom>,
    uppers: Arena<Upper>,
}

#[inline]
fn untag(tagged: *mut ()) -> (*mut (), u32) {
    (
        tagged.map_addr(|a| a & !HEIGHT_MASK),
        (tagged.addr() & HEIGHT_MASK) as u32,
    )
}

#[inline]
fn tag(node: *mut (), height: u32) -> *mut () {
    debug_assert!(node.addr() & HEIGHT_MASK == 0 && (1..=MAX_HEIGHT).contains(&height));
    node.map_addr(|a| a | height as usize)
}

impl Tree {
    /// A tree tall enough for `capacity` chunks (`capacity <= MAX_CAPACITY`).
    pub(crate) fn new(capacity: u64) -> Tree {
        debug_assert!(capacity <= MAX_CAPACITY);
        let height = height_for(capacity);
        let leaves = Arena::<Leaf>::new(LEAF_FIRST);
        let bottoms = Arena::<Bottom>::new(BOTTOM_FIRST);
        let uppers = Arena::<Upper>::new(UPPER_FIRST);
        let root = if height == 1 {
            bottoms.alloc().as_ptr().cast::<()>()
        } else {
            uppers.alloc().as_ptr().cast::<()>()
        };
        Tree {
            root: AtomicPtr::new(tag(root, height)),
            leaves,
            bottoms,
            uppers,
        }
    }

    /// Bytes of memory the tree's arenas hold.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.leaves.held_bytes() + self.bottoms.held_bytes() + self.uppers.held_bytes()
    }

    /// The root node and its height. `Acquire`: pairs with the CAS of `grow`.
    #[inline]
    fn root(&self) -> (*mut (), u32) {
        untag(self.root.load(Ordering::Acquire))
    }

    /// The leaf holding `chunk`, if one was allocated. The caller checked `chunk`
    /// against the capacity *before* this call (with `Acquire`), so the root loaded
    /// here is tall enough to address it.
    #[inline]
    pub(crate) fn leaf(&self, chunk: u64) -> Option<&Leaf> {
        let (root, height) = self.root();
        // SAFETY: the root of this tree, borrowed with `&self`, with its height;
        // the caller's capacity check makes `chunk` below its coverage.
        let leaf = unsafe { leaf_link(root, height, chunk) }?.load(Ordering::Acquire);
        // SAFETY: null or a `Leaf` installed by `child_or_alloc` in a node of this
        // tree; nodes live until the tree is dropped (Ownership), which cannot
        // happen while `&self` is borrowed.
        unsafe { leaf.cast::<Leaf>().as_ref() }
    }

    /// The root as it is now, for a batch of walks that load it only once. The
    /// caller loaded the capacity (`Acquire`) *before* this call: the walker then
    /// covers every chunk below that capacity.
    #[inline]
    pub(crate) fn walker(&self) -> Walker<'_> {
        let (root, height) = self.root();
        Walker {
            root,
            height,
            tree: PhantomData,
        }
    }

    /// The leaf holding `chunk`, allocating it (and interior nodes) on the way.
    /// Same precondition as [`Tree::leaf`].
    pub(crate) fn leaf_or_alloc(&self, chunk: u64) -> &Leaf {
        let (mut node, mut height) = self.root();
        debug_assert!(chunk < coverage(height));
        while height > 1 {
            // SAFETY: as in `leaf`.
            let upper = unsafe { &*node.cast::<Upper>() };
            let link = &upper.children[child_slot(chunk, height)];
            node = if height > 2 {
                child_or_alloc(link, &self.uppers)
            } else {
                child_or_alloc(link, &self.bottoms)
            };
            height -= 1;
        }
        // SAFETY: as in `leaf`.
        let bottom = unsafe { &*node.cast::<Bottom>() };
        let leaf = child_or_alloc(&bottom.children[child_slot(chunk, 1)], &self.leaves);
        // SAFETY: a non-null `Leaf` installed in a bottom node, live as in `leaf`.
        unsafe { &*leaf.cast::<Leaf>() }
    }

    /// Make the tree tall enough for `capacity` chunks (`<= MAX_CAPACITY`).
    pub(crate) fn grow(&self, capacity: u64) {
        debug_assert!(capacity <= MAX_CAPACITY);
        loop {
            let tagged = self.root.load(Ordering::Acquire);
            let (old, height) = untag(tagged);
            if coverage(height) >= capacity {
                return;
            }
            let taller = self.uppers.alloc();
            // SAFETY: fresh from the arena: zeroed and this thread's alone until
            // the CAS below publishes it.
            let node = unsafe { taller.as_ref() };
            // Relaxed: published by the Release of the CAS below.
            node.children[0].store(old, Ordering::Relaxed);
            // If the CAS fails, `taller` stays unused in the arena (never seen).
            let _ = self.root.compare_exchange(
                tagged,
                tag(taller.as_ptr().cast(), height + 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// First allocated bottom node that may hold a mapped chunk in `[from, to)`;
    /// skips unallocated subtrees whole.
    pub(crate) fn seek_bottom(&self, from: u64, to: u64) -> Option<BottomRef<'_>> {
        let (root, height) = self.root();
        if from >= coverage(height) || from >= to {
            return None;
        }
        // SAFETY: the root is a live node of `height`, valid while `&self` is.
        unsafe { seek_bottom_in(root, height, 0, from, to) }
    }

    /// First allocated leaf that may hold a mapped chunk in `[from, to)`, as
    /// `(index of its first chunk, leaf)`.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn seek(&self, mut from: u64, to: u64) -> Option<(u64, &Leaf)> {
        loop {
            let bottom = self.seek_bottom(from, to)?;
            if let Some(found) = bottom.leaf_from(from, to) {
                return Some(found);
            }
            from = bottom.end();
        }
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

/// A root and its height, loaded once by [`Tree::walker`] for the walks of a
/// batched lookup (`BlockMap::lookup_batch`), borrowed from the tree for `'a`.
///
/// Caching the root and the pointers found below it is sound and stays
/// linearizable: a node pointer, once installed, never changes and is never
/// unlinked (Ownership), so a walk done now ends at the same entry word as a walk
/// done later, and a null child seen now is what a lookup at that moment sees.
#[derive(Clone, Copy)]
pub(crate) struct Walker<'a> {
    root: *mut (),
    height: u32,
    tree: PhantomData<&'a Tree>,
}

impl<'a> Walker<'a> {
    /// Stage 1 of a batched lookup: the bottom node's link to `chunk`'s leaf,
    /// whose line is prefetched; `None` if no bottom node covers `chunk`. The
    /// caller checked `chunk` against a capacity loaded before the walker.
    #[inline]
    pub(crate) fn link(&self, chunk: u64) -> Option<Link<'a>> {
        // An ordering bug (root loaded before the capacity) would show here in
        // debug builds (loom runs them); release builds still never walk a root
        // that does not cover `chunk`.
        debug_assert!(chunk < coverage(self.height));
        if chunk >= coverage(self.height) {
            return None;
        }
        // SAFETY: `root` and `height` were loaded together by `Tree::walker` from a
        // tree borrowed for `'a`; `chunk` is below the coverage (checked above).
        let link = unsafe { leaf_link(self.root, self.height, chunk) }?;
        #[cfg(not(loom))]
        prefetch_line(ptr::from_ref(link).cast());
        Some(Link(link))
    }
}

/// A bottom node's link to a leaf, found by [`Walker::link`]: only a walk of a
/// tree borrowed for `'a` makes one, which is what makes [`Link::entry`] sound.
#[derive(Clone, Copy)]
pub(crate) struct Link<'a>(&'a AtomicPtr<()>);

impl<'a> Link<'a> {
    /// Stage 2 of a batched lookup: load the link (the line stage 1 prefetched)
    /// and return `chunk`'s entry word, whose line is prefetched for stage 3's
    /// load; `None` if no leaf holds `chunk` yet.
    #[inline]
    pub(crate) fn entry(self, chunk: u64) -> Option<&'a AtomicU64> {
        // Acquire: pairs with the install CAS, as in `Tree::leaf`.
        let leaf = self.0.load(Ordering::Acquire);
        // SAFETY: the link is a bottom node's child slot in a tree borrowed for
        // `'a` (only `Walker::link` makes a `Link`), so `leaf` is null or a live
        // `Leaf` installed by `child_or_alloc`, valid for `'a` (Ownership).
        let entry = unsafe { leaf.cast::<Leaf>().as_ref() }?.entry(chunk);
        #[cfg(not(loom))]
        prefetch_line(ptr::from_ref(entry).cast());
        Some(entry)
    }
}

/// The link in a bottom node to `chunk`'s leaf (null if no leaf yet), or `None`
/// if an upper level on the way has no child for `chunk`.
///
/// # Safety
/// `root` is the root node, of `height`, of a tree borrowed for `'a` (as loaded by
/// `Tree::root`), and `chunk < coverage(height)`.
#[inline]
unsafe fn leaf_link<'a>(root: *mut (), height: u32, chunk: u64) -> Option<&'a AtomicPtr<()>> {
    debug_assert!(chunk < coverage(height));
    let (mut node, mut height) = (root, height);
    while height > 1 {
        // SAFETY: `node` is the root (caller) or a child installed by
        // `child_or_alloc`; nodes live until the tree is dropped (Ownership),
        // which cannot happen while it is borrowed for `'a`. Nodes above height 1
        // are `Upper`s.
        let upper = unsafe { &*node.cast::<Upper>() };
        node = upper.children[child_slot(chunk, height)].load(Ordering::Acquire);
        if node.is_null() {
            return None;
        }
        height -= 1;
    }
    // SAFETY: as above; the node at height 1 is a `Bottom`.
    let bottom = unsafe { &*node.cast::<Bottom>() };
    Some(&bottom.children[child_slot(chunk, 1)])
}

/// Ask the CPU to bring the cache line at `addr` into L1 (x86-64 `prefetcht0`).
/// Never faults, whatever `addr` is, and changes nothing a program can observe
/// but timing. A no-op on other architectures.
#[cfg(not(loom))]
#[inline(always)]
fn prefetch_line(addr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is a hint: it performs no architectural memory access,
    // raises no fault for any address (unmapped included) and writes nothing.
    // Callers pass addresses inside live nodes anyway.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(addr.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// The child at `link`, allocating and installing a zeroed one from `arena` if
/// there is none. Returns the installed child (ours or a racing thread's).
fn child_or_alloc<T: Node>(link: &AtomicPtr<()>, arena: &Arena<T>) -> *mut () {
    let child = link.load(Ordering::Acquire);
    if !child.is_null() {
        return child;
    }
    let fresh = arena.alloc().as_ptr().cast::<()>();
    // Release: whoever finds `fresh` must also see it zeroed.
    match link.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => fresh,
        // `fresh` stays unused in the arena: nobody else has seen it.
        Err(winner) => winner,
    }
}

/// A bottom node found by [`Tree::seek_bottom`], with the index of its first chunk.
#[derive(Clone, Copy)]
pub(crate) struct BottomRef<'a> {
    base: u64,
    node: &'a Bottom,
}

impl<'a> BottomRef<'a> {
    /// The first chunk below this node.
    #[inline]
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// One past the last chunk below this node.
    #[inline]
    pub(crate) fn end(&self) -> u64 {
        self.base + coverage(1)
    }

    /// First allocated leaf of this node that may hold a chunk in `[from, to)`, as
    /// `(index of its first chunk, leaf)`.
    #[inline]
    pub(crate) fn leaf_from(&self, from: u64, to: u64) -> Option<(u64, &'a Leaf)> {
        let first = (from.saturating_sub(self.base) >> LEAF_BITS) as usize;
        for (slot, link) in self.node.children.iter().enumerate().skip(first) {
            let leaf_base = self.base + ((slot as u64) << LEAF_BITS);
            if leaf_base >= to {
                return None;
            }
            let leaf = link.load(Ordering::Acquire);
            // SAFETY: a non-null child of a bottom node is a live `Leaf` of the tree
            // the node belongs to, borrowed for `'a` (Ownership).
            if let Some(leaf) = unsafe { leaf.cast::<Leaf>().as_ref() } {
                return Some((leaf_base, leaf));
            }
        }
        None
    }
}

/// # Safety
/// `node` is a live interior node of `height` in a tree borrowed for `'a`, and
/// `from < base + coverage(height)`.
unsafe fn seek_bottom_in<'a>(
    node: *mut (),
    height: u32,
    base: u64,
    from: u64,
    to: u64,
) -> Option<BottomRef<'a>> {
    if height == 1 {
        // SAFETY: forwarded from the caller; height-1 nodes are `Bottom`s.
        let node = unsafe { &*node.cast::<Bottom>() };
        return Some(BottomRef { base, node });
    }
    // SAFETY: forwarded from the caller; taller nodes are `Upper`s.
    let upper = unsafe { &*node.cast::<Upper>() };
    let shift = child_shift(height);
    let first = (from.saturating_sub(base) >> shift) as usize;
    for (slot, link) in upper.children.iter().enumerate().skip(first) {
        let child_base = base + ((slot as u64) << shift);
        if child_base >= to {
            return None;
        }
        let child = link.load(Ordering::Acquire);
        if child.is_null() {
            continue;
        }
        // SAFETY: a non-null child of a node at `height` is a live node of
        // `height - 1` in the same tree, and `from` is below its end (it is below
        // this node's end and not below `child_base + span` for earlier slots).
        if let Some(found) = unsafe { seek_bottom_in(child, height - 1, child_base, from, to) } {
            return Some(found);
        }
    }
    None
}

// Dropping a `Tree` drops its arenas, which free every node (Reclamation in the
// crate docs: `&mut`, so no other thread holds a reference into the tree).

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn heights_cover_capacities() {
        assert_eq!(height_for(0), 1);
        assert_eq!(height_for(coverage(1)), 1);
        assert_eq!(height_for(coverage(1) + 1), 2);
        assert_eq!(coverage(1), 1 << 10);
        assert_eq!(coverage(3), 1 << 30);
        assert!(coverage(height_for(MAX_CAPACITY)) >= MAX_CAPACITY);
        assert_eq!(MAX_CAPACITY, 1 << 48);
        assert_eq!(size_of::<Leaf>(), 128);
        assert_eq!(size_of::<Bottom>(), 512);
        assert_eq!(size_of::<Upper>(), 8192);
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
        // Height for 2^20 chunks is 2: a bottom node and a leaf were added, each
        // in its arena's first slab (1 KiB + 1 KiB, plus slab descriptors).
        let one = tree.memory_bytes();
        assert!(
            one > base + 2 * 1024 && one < base + 3 * 1024,
            "{base} -> {one}"
        );
        // The next leaf under the same bottom node fits the first leaf slab.
        tree.leaf_or_alloc(12345 + LEAF_LEN as u64);
        assert_eq!(tree.memory_bytes(), one);
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
