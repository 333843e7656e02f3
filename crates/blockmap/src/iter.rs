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
use crate::tree::{Leaf, LEAF_LEN};

/// Chunks with data (`MAPPED` or `MERGING`) in `[from, to)`, in logical order.
/// Created by [`BlockMap::iter`].
#[derive(Clone)]
pub struct Iter<'a> {
    map: &'a BlockMap,
    next: u64,
    to: u64,
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

impl Iterator for Iter<'_> {
    type Item = (u64, Entry);

    fn next(&mut self) -> Option<(u64, Entry)> {
        loop {
            if self.next >= self.to {
                return None;
            }
            let (base, leaf) = match self.leaf {
                Some((base, leaf)) if self.next < base + LEAF_LEN as u64 => (base, leaf),
                _ => match self.map.tree().seek(self.next, self.to) {
                    Some((base, leaf)) => {
                        self.next = self.next.max(base);
                        self.leaf = Some((base, leaf));
                        (base, leaf)
                    }
                    None => {
                        self.next = self.to;
                        return None;
                    }
                },
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
        loop {
            match (self.inner.next(), self.pending.take()) {
                (Some((chunk, _)), Some(run)) if chunk == run.end => {
                    self.pending = Some(run.start..chunk + 1);
                }
                (Some((chunk, _)), Some(run)) => {
                    self.pending = Some(chunk..chunk + 1);
                    return Some(run);
                }
                (Some((chunk, _)), None) => self.pending = Some(chunk..chunk + 1),
                (None, run) => return run,
            }
        }
    }
}
