//! ringblk-blockmap: the lock-free redirect-on-write lookup table of a delta image
//! (logical chunk -> physical chunk in the delta). See ARCHITECTURE.md §4 and §5.
//!
//! Every reactor (OS thread) reads and writes a map at once, with no lock: lookups
//! are wait-free loads, state changes are CAS/RMW on one 64-bit word per chunk
//! (layout in the `entry` module), and storage is a radix tree whose nodes are
//! allocated on first write below them (`tree` module), bump-allocated from slabs
//! the map owns (`arena` module).
//!
//! # States
//! ```text
//!                claim (CAS, one winner)          publish(p)
//!   UNMAPPED ─────────────────────────► PENDING ─────────────► MAPPED(p) ◄─┐
//!      ▲  ◄───────────────────────────── │ abort / Drop                 │    │ abort /
//!      │                                                          begin_merge │ Drop
//!      │            finish (copy published below, pins drained)      ▼    │
//!      └──────────────────────────────────────────────────────── MERGING(p) ─┘
//! ```
//! A writer calls [`BlockMap::claim`]: `UNMAPPED` gives a [`FillGuard`] (fill the
//! chunk, then `publish`), `MAPPED` gives a [`WritePin`] (write in place; the pin
//! keeps a merge from copying the chunk under the write), anything else is
//! [`Claim::Busy`] and the writer [`BlockMap::park`]s. Readers only
//! [`BlockMap::lookup`]: `MAPPED`/`MERGING` are read here, `UNMAPPED`/`PENDING`
//! below (a `PENDING` chunk's write is not acknowledged yet). A reader with many
//! chunks to look up at once uses [`BlockMap::lookup_batch`], which overlaps
//! their cache misses, or hints a lookup to come with [`BlockMap::prefetch`]. A merge calls
//! [`BlockMap::begin_merge`], waits for [`MergeGuard::poll_drained`], copies the
//! chunk down, publishes the copy below, then [`MergeGuard::finish`]es.
//!
//! ```
//! use ringblk_blockmap::{BeginMerge, BlockMap, Claim, State};
//!
//! let map = BlockMap::new(1 << 20)?; // a 4 GiB volume of 4 KiB chunks
//! // First write to chunk 7: this caller wins the fill.
//! let Claim::Fill(fill) = map.claim(7)? else { unreachable!() };
//! // ... read-merge from below, write the chunk to physical chunk 42 ...
//! fill.publish(42)?;
//! assert_eq!(map.lookup(7)?.state(), State::Mapped(42));
//! // Later writes go in place, pinned against a concurrent merge.
//! let Claim::Mapped(pin) = map.claim(7)? else { unreachable!() };
//! assert_eq!(pin.physical(), 42);
//! drop(pin);
//! // Merge it down: copy physical 42 below, publish it there, then finish.
//! let BeginMerge::Started(merge) = map.begin_merge(7)? else { unreachable!() };
//! assert!(merge.is_drained());
//! merge.finish().expect("drained");
//! assert_eq!(map.lookup(7)?.state(), State::Unmapped);
//! # Ok::<(), ringblk_blockmap::Error>(())
//! ```
//!
//! # Layer
//! A leaf of the workspace: it imports no other ringblk crate, only std,
//! thiserror and libc (loom under `cfg(loom)`). Inside the workspace only
//! `ringblk-target` uses it, and privately: its image, data path, merge and
//! durability layers hold maps, and no map type is part of the target crate's public
//! API (`ci/layers.py` checks that it is never re-exported).
//!
//! # Back-pressure
//! The map never blocks and never queues a caller's work: a chunk another writer
//! or a merge owns is [`Claim::Busy`] / [`BeginMerge::Busy`], and the caller parks
//! ([`BlockMap::park`]) and retries when woken. Each parked writer costs one waiter
//! node, so the caller bounds the waiters by bounding its requests.
//!
//! # Durability
//! The map is memory only. Its state changes are described by [`MapRecord`]s
//! (`Install` at publish, `Unmap` at merge finish) that the target journals, data
//! first; [`BlockMap::from_records`] rebuilds a map from them at recovery and
//! refuses a sequence no map could have produced (`record` module docs).
//!
//! # Ownership
//! The map owns its tree; nodes are never freed while the map is alive, so guards
//! and iterators borrow entries by reference (guards hold `&BlockMap` or
//! `Arc<BlockMap>`). A guard owns the transient state it was created with:
//! [`FillGuard`] owns `PENDING`, [`MergeGuard`] owns `MERGING`, [`WritePin`] owns one
//! pin. Only the owner ends that state, which is why no entry needs an ABA tag.
//! Dropping an unfinished guard aborts it (and wakes waiters).
//!
//! # Ordering
//! - Publish (`PENDING -> MAPPED`) is a `swap(AcqRel)`; lookups, claims and iterators
//!   load entries with `Acquire`. Release/Acquire: whatever the filler did before
//!   publishing happens-before whatever a thread does after seeing `MAPPED`.
//! - Merge finish (`MERGING -> UNMAPPED`) is `AcqRel`, the claim that then fills the
//!   chunk is `Acquire`: the copy published below happens-before a new fill.
//! - Unpin is `AcqRel`, `poll_drained` loads `Acquire`: in-place writes happen-before
//!   the merge's copy.
//! - Node pointers: installed by `AcqRel` CAS, followed with `Acquire` (the reader
//!   sees the zeroed node). Arena slabs: installed by `AcqRel` CAS, loaded with
//!   `Acquire`; slots are handed out by a `Relaxed` `fetch_add` (its modification
//!   order alone makes them distinct). Capacity: `grow` publishes the taller root, then the
//!   capacity (`AcqRel` `fetch_max`); every operation loads the capacity (`Acquire`)
//!   before the root, so a chunk below the capacity is always addressable.
//! - Parking: the waiter's `WAITERS` CAS is `AcqRel` and every transition that clears
//!   `WAITERS` is an `AcqRel` RMW on the same word, so the waiter's registration
//!   happens-before the transition's wake-up scan (details in the `wait` module).
//! - Batched lookups: `lookup_batch` gives, for each chunk, what `lookup` would
//!   give at some moment during the call (each entry word is one `Acquire` load,
//!   as in `lookup`; moments may differ between chunks, as in a loop of
//!   `lookup`s). It loads the capacity (`Acquire`) once per tile of 64 chunks,
//!   then the root, and keeps the node pointers it found between its passes:
//!   sound because a node pointer, once installed, never changes.
//! - `prefetch` is a pure hint: a CPU cache prefetch of the entry's line, no
//!   store, no effect on any result or ordering (a no-op under loom).
//! - Counters (`mapped_count`, `memory_bytes`) are `Relaxed` statistics.
//!
//! # Reclamation
//! Memory is freed only when a whole map is dropped (`Drop` needs `&mut`, i.e. no
//! reactor holds it; in the target, when the last `Arc` of a merged-away delta
//! goes). There is no unlink of empty leaves while the map is shared: a map only
//! shrinks to nothing by being merged and then dropped as a whole. Tree nodes live
//! in arena slabs that are freed all together with the map, never one by one: a
//! node that lost its install CAS (never seen by another thread) simply stays
//! unused in its slab until then. Two things are freed earlier without any
//! quiescence: an arena slab that lost its install CAS (never seen by another
//! thread either), and waiter nodes, which the thread that swapped a whole waiter
//! stack out owns exclusively.
//!
//! # Cancellation
//! A parked request that goes away (disconnect, shutdown) is not unregistered: its
//! `Waker` stays in the waiter shard until the next wake-up of that shard (or the
//! map's drop) and is then woken for nothing. Wakers must tolerate that, and
//! spurious wake-ups in general: a wake-up means "retry", never "you got it".
//! `Waker::wake` runs inline in the thread that ends the busy state (publish,
//! abort, merge finish/abort, the drop of the last pin), so it should be cheap and
//! must not block: post a message, do not run the request there.
//!
//! # Panics
//! Nothing a client, a disk or a journal supplies makes this crate panic: chunk
//! indexes beyond the capacity, physical indexes beyond [`PHYSICAL_MAX`], garbage
//! journal bytes all come back as errors; `lookup_batch` with an output slice of
//! another length than its input does the shorter and returns the count. `debug_assert!`s check internal
//! invariants (e.g. that a guard's state is still the one it owns). Allocation
//! failure aborts, as in the rest of Rust.

mod arena;
mod entry;
mod error;
mod guard;
mod iter;
mod map;
mod record;
mod sync;
mod tree;
mod wait;

#[cfg(all(test, not(loom)))]
mod stress;

pub use entry::{Entry, State, MAX_PINS, PHYSICAL_BITS, PHYSICAL_MAX};
pub use error::{DecodeError, Error, LoadError};
pub use guard::{FillGuard, MergeGuard, WritePin};
pub use iter::{Iter, Ranges};
pub use map::{BeginMerge, BlockMap, Claim, Park};
pub use record::MapRecord;
pub use tree::MAX_CAPACITY;
