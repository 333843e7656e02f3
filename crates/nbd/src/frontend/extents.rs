//! Block status in NBD's wire form (plan §2.9): the block layer's protocol-free
//! `ExtentFlags` become `base:allocation` or `x-ringblk:changed/NAME` flags here.
//!
//! Layer: the NBD front end's edge; imports `ringblk_target::extent` and this crate's
//! wire types. Moved from the target crate's `session.rs` in #12 step 5.2.

use ringblk_target::extent::{Extent, ExtentFlags};

use crate::{proto, reply};

/// Which NBD metadata context an extent list answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NbdContext {
    /// `base:allocation`: STATE_HOLE and STATE_ZERO.
    BaseAllocation,
    /// `x-ringblk:changed/NAME`: 1 where changed since the backup.
    Changed,
}

/// Block status extents in NBD's wire form for `ctx` (plan §2.9): base:allocation
/// `flags = (UNALLOCATED → STATE_HOLE) | (ZEROES → STATE_ZERO)`, the changed context
/// `flags = CHANGED → 1`. An extent list covers a prefix of the request, whose length
/// is a u32, so every length fits.
pub(crate) fn nbd_extents(ctx: NbdContext, extents: &[Extent]) -> Vec<reply::Extent> {
    extents
        .iter()
        .map(|e| {
            let mut flags = 0;
            match ctx {
                NbdContext::BaseAllocation => {
                    if e.flags.contains(ExtentFlags::UNALLOCATED) {
                        flags |= proto::STATE_HOLE;
                    }
                    if e.flags.contains(ExtentFlags::ZEROES) {
                        flags |= proto::STATE_ZERO;
                    }
                }
                NbdContext::Changed => {
                    if e.flags.contains(ExtentFlags::CHANGED) {
                        flags |= 1;
                    }
                }
            }
            debug_assert!(e.length_bytes <= u64::from(u32::MAX));
            reply::Extent {
                length: u32::try_from(e.length_bytes).unwrap_or(u32::MAX),
                flags,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_flags_map_to_wire_flags() {
        let ext = |length_bytes, flags| Extent {
            length_bytes,
            flags,
        };
        let list = [
            ext(4096, ExtentFlags::NONE),
            ext(8192, ExtentFlags::UNALLOCATED | ExtentFlags::ZEROES),
            ext(512, ExtentFlags::ZEROES),
            ext(1024, ExtentFlags::CHANGED),
        ];
        let base = nbd_extents(NbdContext::BaseAllocation, &list);
        let got: Vec<_> = base.iter().map(|e| (e.length, e.flags)).collect();
        let hole_zero = proto::STATE_HOLE | proto::STATE_ZERO;
        assert_eq!(
            got,
            [
                (4096, 0),
                (8192, hole_zero),
                (512, proto::STATE_ZERO),
                (1024, 0)
            ]
        );
        let changed = nbd_extents(NbdContext::Changed, &list);
        let got: Vec<_> = changed.iter().map(|e| (e.length, e.flags)).collect();
        assert_eq!(got, [(4096, 0), (8192, 0), (512, 0), (1024, 1)]);
    }
}
