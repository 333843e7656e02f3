//! Ordered iteration over the chunks a map holds, and over runs of them.
//!
//! Weakly consistent, like a `ConcurrentSkipListMap` iterator and unlike a
//! snapshot: every entry is read atomically and entries come in logical order, but
//! a chunk mapped or unmapped during the walk may or may not be reported. Callers
//! that need a stable answer iterate a map nobody writes (a frozen delta after the
//! drain, for a backup copy) or take the race into account (a merge re-checks each
//! chunk with `begin_merge`).

use std::ops::Range;

use crate::entry::{has_data, Entry};
use crate::map::BlockMap;
use crate::sync::Ordering;
use crate::tree::{BottomRef, Leaf, LEAF_LEN};

/// Chunks with data (`MAPPED` or `MERGING`) in `[from, to)`, in logical order.
/// Created by [`BlockMap::iter`].
#[derive(Clone)]
pub struct Iter<'a> {
    map: &'a BlockMap,
    next: u64,
    to: u64,
    /// The bottom node `next` is (or was last) in: leaves are looked up there
    /// before walking down from the root again.
    bottom: Option<BottomRef<'a>>,
    /// The leaf `next` is in, with the index of its first chunk.
    leaf: Option<(u64, &'a Leaf)>,
}

impl BlockMap {
    /// Chunks with data in `[from, to)`, as `(logical chunk, entry)`, in order.
    /// `to` is clamped to the capacity at the time of the call.
    pub fn iter(&self, from: u64, to: u64) -> Iter<'_> {
        Iter {
            map: self,
            next: from,
            to: to.min(self.capacity()),
            bottom: None,
            leaf: None,
        }
    }

    /// Runs of consecutive logical chunks with data in `[from, to)`, in order
    /// (for BLOCK_STATUS, changed-block export, backup copy and merge). A run ends
    /// at the first chunk without data; physical contiguity is not required.
    pub fn ranges(&self, from: u64, to: u64) -> Ranges<'_> {
        Ranges {
            inner: self.iter(from, to),
            pending: None,
        }
    }
}

impl<'a> Iter<'a> {
    /// The next allocated leaf at or after `self.next`, or `None` (then the walk is
    /// over). Advances `self.next` to the leaf's first chunk if it is further.
    /// Looks in the current bottom node first, then walks down from the root. Kept
    /// out of line: it runs once per leaf, `next` once per entry.
    #[inline(never)]
    fn next_leaf(&mut self) -> Option<(u64, &'a Leaf)> {
        loop {
            if self.next >= self.to {
                return None;
            }
            let bottom = match self.bottom {
                Some(bottom) if self.next < bottom.end() => bottom,
                _ => {
                    let Some(bottom) = self.map.tree().seek_bottom(self.next, self.to) else {
                        self.next = self.to;
                        return None;
                    };
                    self.next = self.next.max(bottom.base());
                    self.bottom = Some(bottom);
                    bottom
                }
            };
            if let Some((base, leaf)) = bottom.leaf_from(self.next, self.to) {
                self.next = self.next.max(base);
                return Some((base, leaf));
            }
            self.next = bottom.end();
        }
    }
}

impl Iterator for Iter<'_> {
    type Item = (u64, Entry);

    #[inline]
    fn next(&mut self) -> Option<(u64, Entry)> {
        loop {
            if self.next >= self.to {
                return None;
            }
            let (base, leaf) = match self.leaf {
                Some((base, leaf)) if self.next < base + LEAF_LEN as u64 => (base, leaf),
                _ => {
                    let found = self.next_leaf();
                    self.leaf = found;
                    found?
                }
            };
            let end = (self.to - base).min(LEAF_LEN as u64) as usize;
            for index in (self.next - base) as usize..end {
                let word = leaf.entry_at(index).load(Ordering::Acquire);
                if has_data(word) {
                    let chunk = base + index as u64;
                    self.next = chunk + 1;
                    return Some((chunk, Entry::from_word(word)));
                }
            }
            self.next = base + end as u64;
        }
    }
}

/// Runs of consecutive chunks with data. Created by [`BlockMap::ranges`].
#[derive(Clone)]
pub struct Ranges<'a> {
    inner: Iter<'a>,
    pending: Option<Range<u64>>,
}

impl Iterator for Ranges<'_> {
    type Item = Range<u64>;

    fn next(&mut self) -> Option<Range<u64>> {
        // The open run stays in a local while it grows (one compare per entry).
        let mut run = match self.pending.take() {
            Some(run) => run,
            None => {
                let (chunk, _) = self.inner.next()?;
                chunk..chunk + 1
            }
        };
        loop {
            match self.inner.next() {
                Some((chunk, _)) if chunk == run.end => run.end += 1,
                Some((chunk, _)) => {
                    self.pending = Some(chunk..chunk + 1);
                    return Some(run);
                }
                None => return Some(run),
            }
        }
    }
}
