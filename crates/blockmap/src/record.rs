//! Mapping records for the delta's journal, and rebuilding a map from them.
//!
//! # Encoding
//! Fixed widths, little-endian, one tag byte first:
//!
//! | record  | bytes | layout                                          |
//! |---------|-------|-------------------------------------------------|
//! | Install | 17    | `0x01`, logical `u64`, physical `u64`           |
//! | Unmap   | 9     | `0x02`, logical `u64`                           |
//!
//! Tag `0x00` is never used, so a zero-filled (preallocated, unwritten) journal
//! tail decodes as an error rather than as records. Framing and checksums (CRC32C)
//! belong to the journal; this is only the payload.
//!
//! # Durability
//! The journal appends `Install` when a fill is published and `Unmap` when a merge
//! finishes, and must make the data durable before the `Install` that points at it
//! (ARCHITECTURE.md §6). [`BlockMap::from_records`] is strict: an `Install` over a
//! mapped chunk or an `Unmap` of an unmapped one means a corrupt journal.

use crate::error::{DecodeError, LoadError};
use crate::map::{BeginMerge, BlockMap, Claim};

const TAG_INSTALL: u8 = 0x01;
const TAG_UNMAP: u8 = 0x02;
const INSTALL_LEN: usize = 17;
const UNMAP_LEN: usize = 9;

/// One change to a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapRecord {
    /// `logical` now lives at `physical` in the delta.
    Install { logical: u64, physical: u64 },
    /// `logical` no longer lives in the delta (a merge copied it down).
    Unmap { logical: u64 },
}

impl MapRecord {
    /// Longest encoding of any record.
    pub const MAX_ENCODED_LEN: usize = INSTALL_LEN;

    /// Bytes `encode` appends.
    pub fn encoded_len(&self) -> usize {
        match self {
            MapRecord::Install { .. } => INSTALL_LEN,
            MapRecord::Unmap { .. } => UNMAP_LEN,
        }
    }

    /// Append the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            MapRecord::Install { logical, physical } => {
                out.push(TAG_INSTALL);
                out.extend_from_slice(&logical.to_le_bytes());
                out.extend_from_slice(&physical.to_le_bytes());
            }
            MapRecord::Unmap { logical } => {
                out.push(TAG_UNMAP);
                out.extend_from_slice(&logical.to_le_bytes());
            }
        }
    }

    /// Decode the record at the start of `buf`: the record and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<(MapRecord, usize), DecodeError> {
        let (&tag, _) = buf.split_first().ok_or(DecodeError::Truncated {
            needed: 1,
            available: 0,
        })?;
        let needed = match tag {
            TAG_INSTALL => INSTALL_LEN,
            TAG_UNMAP => UNMAP_LEN,
            other => return Err(DecodeError::UnknownTag(other)),
        };
        let body = buf.get(1..needed).ok_or(DecodeError::Truncated {
            needed,
            available: buf.len(),
        })?;
        let logical = le_u64(&body[..8]);
        let record = if tag == TAG_INSTALL {
            MapRecord::Install {
                logical,
                physical: le_u64(&body[8..16]),
            }
        } else {
            MapRecord::Unmap { logical }
        };
        Ok((record, needed))
    }
}

/// `bytes` is exactly 8 long (the callers slice it so).
fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

impl BlockMap {
    /// Rebuild a map of `capacity_chunks` by applying `records` in order (journal
    /// replay). Single-threaded; the map is shared only after it returns.
    pub fn from_records<I>(capacity_chunks: u64, records: I) -> Result<BlockMap, LoadError>
    where
        I: IntoIterator<Item = MapRecord>,
    {
        let map = BlockMap::new(capacity_chunks)?;
        for (index, record) in records.into_iter().enumerate() {
            let located = |source| LoadError::Record { index, source };
            match record {
                MapRecord::Install { logical, physical } => {
                    match map.claim(logical).map_err(located)? {
                        Claim::Fill(fill) => fill.publish(physical).map_err(located)?,
                        Claim::Mapped(_) | Claim::Busy(_) => {
                            return Err(LoadError::AlreadyMapped { index, logical })
                        }
                    }
                }
                MapRecord::Unmap { logical } => match map.begin_merge(logical).map_err(located)? {
                    BeginMerge::Started(merge) => {
                        if merge.finish().is_err() {
                            // Unreachable: nobody else can hold a pin during replay.
                            return Err(LoadError::NotMapped { index, logical });
                        }
                    }
                    BeginMerge::Unmapped | BeginMerge::Busy(_) => {
                        return Err(LoadError::NotMapped { index, logical })
                    }
                },
            }
        }
        Ok(map)
    }

    /// The map as `Install` records, in logical order (a journal checkpoint; replay
    /// of them gives an equal map when no write is in flight).
    pub fn records(&self) -> impl Iterator<Item = MapRecord> + '_ {
        self.iter(0, u64::MAX).filter_map(|(logical, entry)| {
            entry
                .physical()
                .map(|physical| MapRecord::Install { logical, physical })
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn encodings_are_fixed_little_endian() {
        let mut out = Vec::new();
        MapRecord::Install {
            logical: 0x0102_0304_0506_0708,
            physical: 0x1112_1314_1516_1718,
        }
        .encode(&mut out);
        MapRecord::Unmap { logical: 0xA1 }.encode(&mut out);
        assert_eq!(
            out,
            [
                1, 8, 7, 6, 5, 4, 3, 2, 1, 0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, //
                2, 0xA1, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        let (first, used) = MapRecord::decode(&out).unwrap();
        assert_eq!(used, 17);
        assert_eq!(
            MapRecord::decode(&out[used..]).unwrap(),
            (MapRecord::Unmap { logical: 0xA1 }, 9)
        );
        assert_eq!(first.encoded_len(), 17);
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert_eq!(
            MapRecord::decode(&[]),
            Err(DecodeError::Truncated {
                needed: 1,
                available: 0
            })
        );
        assert_eq!(MapRecord::decode(&[0; 32]), Err(DecodeError::UnknownTag(0)));
        assert_eq!(
            MapRecord::decode(&[1, 2, 3]),
            Err(DecodeError::Truncated {
                needed: 17,
                available: 3
            })
        );
        assert_eq!(
            MapRecord::decode(&[2; 8]),
            Err(DecodeError::Truncated {
                needed: 9,
                available: 8
            })
        );
    }

    #[test]
    fn loader_is_strict() {
        let install = |logical, physical| MapRecord::Install { logical, physical };
        let map = BlockMap::from_records(
            100,
            [
                install(1, 10),
                install(2, 20),
                MapRecord::Unmap { logical: 1 },
            ],
        )
        .unwrap();
        assert_eq!(map.records().collect::<Vec<_>>(), [install(2, 20)]);
        assert_eq!(map.mapped_count(), 1);
        assert!(matches!(
            BlockMap::from_records(100, [install(1, 10), install(1, 11)]),
            Err(LoadError::AlreadyMapped {
                index: 1,
                logical: 1
            })
        ));
        assert!(matches!(
            BlockMap::from_records(100, [MapRecord::Unmap { logical: 5 }]),
            Err(LoadError::NotMapped {
                index: 0,
                logical: 5
            })
        ));
        assert!(matches!(
            BlockMap::from_records(100, [install(100, 1)]),
            Err(LoadError::Record { index: 0, .. })
        ));
        assert!(matches!(
            BlockMap::from_records(100, [install(1, u64::MAX)]),
            Err(LoadError::Record { index: 0, .. })
        ));
    }
}
