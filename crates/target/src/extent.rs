//! `Extent`: the block status of a run of bytes, protocol-free.
//!
//! Contract of a status list: it covers a prefix of the asked range, has at least one
//! extent, each with `length_bytes > 0`. A front end maps the flags to its wire form at
//! its edge, in its own crate (NBD, for one: base:allocation hole/zero and the changed
//! context's bit).

use std::ops::{BitAnd, BitOr, BitOrAssign};

/// Status flags of an extent (a small bit set).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExtentFlags(u8);

impl ExtentFlags {
    /// Allocated, data (no flag set).
    pub const NONE: Self = ExtentFlags(0);
    /// No layer and no base allocation holds it (a hole).
    pub const UNALLOCATED: Self = ExtentFlags(1);
    /// Guaranteed to read as zeros.
    pub const ZEROES: Self = ExtentFlags(2);
    /// ChangedSince: held by a delta from the one created at that backup up to the view top.
    pub const CHANGED: Self = ExtentFlags(4);

    /// Whether every flag of `other` is set here.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no flag is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for ExtentFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        ExtentFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for ExtentFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for ExtentFlags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        ExtentFlags(self.0 & rhs.0)
    }
}

/// The status of `length_bytes` bytes following the previous extent of a list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub length_bytes: u64,
    pub flags: ExtentFlags,
}
