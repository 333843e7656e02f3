//! `IoKind`: the kinds of block request, and the names they have in stats.
//!
//! Faults are keyed by `IoKind`, latency histograms and op counters are indexed by it.
//! A front end translates its commands to an `IoKind` at its edge, in its own crate.

/// Largest data payload of one request the layer serves (the 32 MiB;
/// `Geometry::max_io_bytes`). Front ends advertise it; the buffer budget must hold
/// at least one such request.
pub const IO_MAX_BYTES: u32 = 32 * 1024 * 1024;

/// The kind of a block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    /// Discard (NBD TRIM): the range may read back as anything written before or zeros.
    Unmap,
    WriteZeroes,
    /// A hint to read ahead (NBD CACHE).
    Readahead,
    /// Allocation / change status of a range; reads metadata only.
    BlockStatus,
    CompareAndWrite,
}

impl IoKind {
    /// Every kind, in stats order.
    pub const ALL: [IoKind; 8] = [
        IoKind::Read,
        IoKind::Write,
        IoKind::Flush,
        IoKind::Unmap,
        IoKind::WriteZeroes,
        IoKind::Readahead,
        IoKind::BlockStatus,
        IoKind::CompareAndWrite,
    ];

    /// The name in the `stats` JSON and histogram lists. `Unmap` keeps the name "trim"
    /// and `Readahead` "cache", the fields operators and tests already read.
    pub fn stat_name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Unmap => "trim",
            IoKind::WriteZeroes => "write_zeroes",
            IoKind::Readahead => "cache",
            IoKind::BlockStatus => "block_status",
            IoKind::CompareAndWrite => "compare_and_write",
        }
    }

    /// Whether the request changes data (what a read-only view refuses, and what gets
    /// `NoSpace` for a range past the end).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            IoKind::Write | IoKind::WriteZeroes | IoKind::Unmap | IoKind::CompareAndWrite
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_names_are_distinct() {
        let mut names: Vec<_> = IoKind::ALL.iter().map(|k| k.stat_name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), IoKind::ALL.len());
    }
}
