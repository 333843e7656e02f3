//! The entry word: one `u64` per logical chunk, read and written only as a whole.
//!
//! ```text
//!  63                                16 15            3   2   1  0
//! +------------------------------------+---------------+---+------+
//! |      physical chunk (48 bits)      |  pins (13)    | W | state|
//! +------------------------------------+---------------+---+------+
//! ```
//!
//! - `state`: `UNMAPPED` 0b00, `PENDING` 0b01, `MAPPED` 0b10, `MERGING` 0b11. Bit 1
//!   set means "the chunk has data in this delta" (`MAPPED` or `MERGING`).
//! - `W`: some request parked on this chunk (see `wait.rs`). Whoever clears it wakes
//!   the chunk's waiter shard.
//! - `pins`: in-place writers in flight on a `MAPPED` chunk. A merge may copy the
//!   chunk only when they have drained, so an in-place write is never lost.
//! - `physical`: the chunk's index in the delta's data store (`MAPPED`/`MERGING`).
//!
//! No ABA tag: every transition out of `PENDING` or `MERGING` is made by the one
//! guard that owns that state, and every other transition is a CAS whose meaning
//! depends only on the value it compares (claim an `UNMAPPED` chunk, add or drop a
//! pin, set `W`). A word that went `A -> B -> A` in between is, for each of those,
//! exactly as good as one that never changed: the CAS does the same right thing.

use core::fmt;

pub(crate) const STATE_MASK: u64 = 0b11;
pub(crate) const UNMAPPED: u64 = 0b00;
pub(crate) const PENDING: u64 = 0b01;
pub(crate) const MAPPED: u64 = 0b10;
pub(crate) const MERGING: u64 = 0b11;
/// Set in `MAPPED` and `MERGING`: the chunk has a physical location in this delta.
pub(crate) const HAS_DATA: u64 = 0b10;
pub(crate) const WAITERS: u64 = 1 << 2;
const PINS_SHIFT: u32 = 3;
const PINS_BITS: u32 = 13;
pub(crate) const PIN_ONE: u64 = 1 << PINS_SHIFT;
const PINS_MASK: u64 = ((1 << PINS_BITS) - 1) << PINS_SHIFT;
const PHYSICAL_SHIFT: u32 = PINS_SHIFT + PINS_BITS;

/// Most in-place writers one chunk can have in flight; one more is told "busy" and
/// parks until a pin is dropped (back-pressure, not an overflow).
pub const MAX_PINS: u32 = (1 << PINS_BITS) - 1;
/// Width of the physical chunk field.
pub const PHYSICAL_BITS: u32 = 64 - PHYSICAL_SHIFT;
/// Largest physical chunk index an entry can hold (2^48 - 1: 1 EiB of 4 KiB chunks).
pub const PHYSICAL_MAX: u64 = (1 << PHYSICAL_BITS) - 1;

const _: () = {
    assert!(STATE_MASK & WAITERS == 0);
    assert!((STATE_MASK | WAITERS) & PINS_MASK == 0);
    assert!(STATE_MASK | WAITERS | PINS_MASK == (1 << PHYSICAL_SHIFT) - 1);
    assert!(PHYSICAL_BITS == 48);
    assert!(UNMAPPED & HAS_DATA == 0 && PENDING & HAS_DATA == 0);
    assert!(MAPPED & HAS_DATA != 0 && MERGING & HAS_DATA != 0);
};

#[inline]
pub(crate) const fn state_bits(word: u64) -> u64 {
    word & STATE_MASK
}

#[inline]
pub(crate) const fn pins(word: u64) -> u32 {
    ((word & PINS_MASK) >> PINS_SHIFT) as u32
}

#[inline]
pub(crate) const fn physical(word: u64) -> u64 {
    word >> PHYSICAL_SHIFT
}

#[inline]
pub(crate) const fn has_data(word: u64) -> bool {
    word & HAS_DATA != 0
}

/// `MAPPED(physical)` with no pins and no waiters. `physical <= PHYSICAL_MAX`.
#[inline]
pub(crate) const fn mapped_word(physical: u64) -> u64 {
    debug_assert!(physical <= PHYSICAL_MAX);
    (physical << PHYSICAL_SHIFT) | MAPPED
}

/// Replace the state bits, keep everything else.
#[inline]
pub(crate) const fn with_state(word: u64, state: u64) -> u64 {
    (word & !STATE_MASK) | state
}

/// A writer (claim, pin) cannot proceed on this word now and should park.
#[inline]
pub(crate) const fn writer_busy(word: u64) -> bool {
    match state_bits(word) {
        PENDING | MERGING => true,
        MAPPED => pins(word) == MAX_PINS,
        _ => false,
    }
}

/// A snapshot of one entry word, as returned by [`BlockMap::lookup`](crate::BlockMap::lookup).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Entry(u64);

impl Entry {
    /// The entry of a chunk this delta does not hold.
    pub const UNMAPPED: Entry = Entry(UNMAPPED);

    #[inline]
    pub(crate) const fn from_word(word: u64) -> Self {
        Entry(word)
    }

    /// The state, with the physical chunk where there is one.
    #[inline]
    pub const fn state(self) -> State {
        match state_bits(self.0) {
            UNMAPPED => State::Unmapped,
            PENDING => State::Pending,
            MAPPED => State::Mapped(physical(self.0)),
            _ => State::Merging(physical(self.0)),
        }
    }

    /// Where the chunk's data is in this delta: `Some` for `MAPPED` and `MERGING`.
    #[inline]
    pub const fn physical(self) -> Option<u64> {
        if has_data(self.0) {
            Some(physical(self.0))
        } else {
            None
        }
    }

    /// `MAPPED` or `MERGING`: this delta holds the chunk's data.
    #[inline]
    pub const fn has_data(self) -> bool {
        has_data(self.0)
    }

    /// In-place writers in flight when the word was read.
    #[inline]
    pub const fn pins(self) -> u32 {
        pins(self.0)
    }

    /// Some request was parked on the chunk when the word was read.
    #[inline]
    pub const fn has_waiters(self) -> bool {
        self.0 & WAITERS != 0
    }

    /// The raw word (for diagnostics; the layout is in the `entry` module docs).
    #[inline]
    pub const fn to_bits(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Entry");
        d.field("state", &self.state());
        if self.pins() != 0 {
            d.field("pins", &self.pins());
        }
        if self.has_waiters() {
            d.field("waiters", &true);
        }
        d.finish()
    }
}

/// The state of an entry (see the crate docs for the transitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// This delta does not hold the chunk: read it from the layers below.
    Unmapped,
    /// A first write (possibly a read-merge) is filling the chunk; other writers
    /// wait. Readers read below: nothing written to the chunk is acknowledged yet.
    Pending,
    /// The chunk lives at this physical chunk of the delta.
    Mapped(u64),
    /// A merge is copying the chunk down; it still lives here (readers use it),
    /// writers wait.
    Merging(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_without_touching_each_other() {
        let w = mapped_word(PHYSICAL_MAX) | WAITERS | (u64::from(MAX_PINS) * PIN_ONE);
        let e = Entry::from_word(w);
        assert_eq!(e.state(), State::Mapped(PHYSICAL_MAX));
        assert_eq!(e.pins(), MAX_PINS);
        assert!(e.has_waiters());
        let merging = Entry::from_word(with_state(w, MERGING));
        assert_eq!(merging.state(), State::Merging(PHYSICAL_MAX));
        assert_eq!(merging.pins(), MAX_PINS);
        assert_eq!(Entry::UNMAPPED.state(), State::Unmapped);
        assert_eq!(Entry::UNMAPPED.physical(), None);
    }

    #[test]
    fn busy_means_pending_merging_or_saturated() {
        assert!(!writer_busy(UNMAPPED));
        assert!(writer_busy(PENDING));
        assert!(!writer_busy(mapped_word(7)));
        assert!(writer_busy(with_state(mapped_word(7), MERGING)));
        assert!(writer_busy(mapped_word(7) + u64::from(MAX_PINS) * PIN_ONE));
        assert!(!writer_busy(
            mapped_word(7) + u64::from(MAX_PINS - 1) * PIN_ONE
        ));
    }
}
