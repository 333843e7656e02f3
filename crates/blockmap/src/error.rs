//! Error types. Nothing a client, a disk or a journal can produce makes this crate
//! panic: out-of-range indexes and malformed records come back as these.

use crate::entry::PHYSICAL_BITS;

/// An operation on a [`BlockMap`](crate::BlockMap) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The logical chunk index is not below the map's capacity.
    #[error("chunk {chunk} is beyond the map's capacity of {capacity} chunks")]
    ChunkOutOfRange { chunk: u64, capacity: u64 },
    /// The physical chunk index does not fit the entry's physical field.
    #[error("physical chunk {physical} does not fit in {PHYSICAL_BITS} bits")]
    PhysicalOutOfRange { physical: u64 },
    /// The requested capacity exceeds what the radix tree can address.
    #[error("capacity of {requested} chunks exceeds the maximum of {max}")]
    CapacityTooLarge { requested: u64, max: u64 },
    /// Maps only grow: a volume that shrinks gets a new map.
    #[error("cannot shrink a map from {current} to {requested} chunks")]
    Shrink { current: u64, requested: u64 },
}

/// A journal record could not be decoded. Decoding never panics on garbage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer ends inside the record.
    #[error("truncated record: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    /// The first byte is not a known record tag.
    #[error("unknown record tag {0:#04x}")]
    UnknownTag(u8),
}

/// Rebuilding a map from a record sequence failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The map itself could not be created (capacity).
    #[error("cannot create the map: {0}")]
    Map(#[from] Error),
    /// A record names a chunk out of range or a physical index that does not fit.
    #[error("record {index}: {source}")]
    Record { index: usize, source: Error },
    /// An `Install` for a chunk that is already mapped: the journal is corrupt
    /// (a chunk is installed once and only a merge's `Unmap` removes it).
    #[error("record {index}: chunk {logical} is already mapped")]
    AlreadyMapped { index: usize, logical: u64 },
    /// An `Unmap` for a chunk that is not mapped.
    #[error("record {index}: chunk {logical} is not mapped")]
    NotMapped { index: usize, logical: u64 },
}
