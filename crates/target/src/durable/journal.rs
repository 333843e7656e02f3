//! The journal of one delta: an append-only log of its map changes.
//!
//! # Format
//! ```text
//! sector 0        header: "RBLKJNL1", version u32, chunk bytes u32, capacity u64,
//!                 delta id u64, zeros, CRC32C of bytes 0..508 at 508
//! sector 1..      frames, each starting on a 512-byte boundary:
//!                 magic u32 "JFRM", payload length u32, sequence u64,
//!                 CRC32C u32 of (length, sequence, payload), 4 zero bytes,
//!                 payload: MapRecords (ringblk_blockmap::MapRecord encoding),
//!                 zero padding to the next 512-byte boundary
//! ```
//! Little-endian throughout. Sequence numbers start at 1 and increase by one.
//!
//! # Commit and replay
//! One group commit appends one frame (all records pending at that moment) and
//! fdatasyncs the journal, after the data files were synced (`commit`). Replay reads
//! frames until one does not check out. If nothing valid follows it, it is the
//! torn tail of a commit that never completed: ignored (and truncated away on
//! recovery, so new frames never sit behind garbage). If a valid frame with a later
//! sequence follows, the journal is corrupt in the middle: reported, never skipped.
//!
//! # Ordering
//! Records of one delta are appended under one lock, in the order of the map
//! changes they describe (an `Install` is appended before its fill is published, an
//! `Unmap` before its merge finishes), so replay order equals change order.

use std::io;
use std::sync::Mutex;

use ringblk_blockmap::MapRecord;

use super::store::Store;

pub(crate) const SECTOR: u64 = 512;
const MAGIC: &[u8; 8] = b"RBLKJNL1";
const VERSION: u32 = 1;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"JFRM");
const FRAME_HEADER: usize = 24;
/// Largest payload of one frame: bounds replay memory per frame and the
/// damage one bad length field can do.
pub(crate) const FRAME_PAYLOAD_MAX: u32 = 64 << 20;

/// What the header says about the delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JournalHeader {
    pub chunk_bytes: u32,
    pub capacity_chunks: u64,
    pub delta_id: u64,
}

impl JournalHeader {
    pub(crate) fn encode(&self) -> [u8; SECTOR as usize] {
        let mut s = [0u8; SECTOR as usize];
        s[..8].copy_from_slice(MAGIC);
        s[8..12].copy_from_slice(&VERSION.to_le_bytes());
        s[12..16].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        s[16..24].copy_from_slice(&self.capacity_chunks.to_le_bytes());
        s[24..32].copy_from_slice(&self.delta_id.to_le_bytes());
        let crc = crc32c::crc32c(&s[..508]);
        s[508..].copy_from_slice(&crc.to_le_bytes());
        s
    }

    pub(crate) fn decode(s: &[u8]) -> Result<JournalHeader, String> {
        if s.len() < SECTOR as usize {
            return Err(format!("header is {} bytes, needs 512", s.len()));
        }
        if &s[..8] != MAGIC {
            return Err("not a ringblk journal (bad magic)".into());
        }
        if crc32c::crc32c(&s[..508]) != u32_at(s, 508) {
            return Err("header checksum mismatch".into());
        }
        let v = u32_at(s, 8);
        if v != VERSION {
            return Err(format!("unsupported journal version {v}"));
        }
        Ok(JournalHeader {
            chunk_bytes: u32_at(s, 12),
            capacity_chunks: u64_at(s, 16),
            delta_id: u64_at(s, 24),
        })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn frame_crc(len: u32, seq: u64, payload: &[u8]) -> u32 {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&len.to_le_bytes());
    h[4..].copy_from_slice(&seq.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&h), payload)
}

/// One frame, padded to whole sectors.
pub(crate) fn encode_frame(seq: u64, records: &[MapRecord]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(records.len() * MapRecord::MAX_ENCODED_LEN);
    for r in records {
        r.encode(&mut payload);
    }
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len() + SECTOR as usize);
    out.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&frame_crc(len, seq, &payload).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&payload);
    let padded = out.len().div_ceil(SECTOR as usize) * SECTOR as usize;
    out.resize(padded, 0);
    out
}

/// A frame at the start of `b`, if it checks out: (sequence, payload, bytes used).
fn decode_frame(b: &[u8]) -> Option<(u64, &[u8], usize)> {
    if b.len() < FRAME_HEADER || u32_at(b, 0) != FRAME_MAGIC {
        return None;
    }
    let len = u32_at(b, 4);
    if len > FRAME_PAYLOAD_MAX {
        return None;
    }
    let seq = u64_at(b, 8);
    let payload = b.get(FRAME_HEADER..FRAME_HEADER + len as usize)?;
    if frame_crc(len, seq, payload) != u32_at(b, 16) {
        return None;
    }
    let used = (FRAME_HEADER + len as usize).div_ceil(SECTOR as usize) * SECTOR as usize;
    Some((seq, payload, used))
}

/// The result of reading a journal.
#[derive(Debug, Default)]
pub(crate) struct Replay {
    pub header: Option<JournalHeader>,
    pub records: Vec<MapRecord>,
    pub frames: u64,
    /// Offset just past the last valid frame: where the next frame goes.
    pub end: u64,
    /// Bytes after `end` that are not a valid frame (a commit cut short).
    pub torn_tail_bytes: u64,
    /// A valid frame after an invalid one, or undecodable records in a valid frame.
    pub corrupt: Option<String>,
    /// Sequence number of the next frame.
    pub next_seq: u64,
}

/// Parses a whole journal image (see the module docs for torn tail vs. corrupt).
pub(crate) fn replay(bytes: &[u8]) -> Replay {
    let mut out = Replay {
        next_seq: 1,
        end: SECTOR,
        ..Replay::default()
    };
    if bytes.len() < SECTOR as usize {
        // Created but the header never reached the disk: an empty journal.
        out.torn_tail_bytes = bytes.len() as u64;
        out.end = 0;
        return out;
    }
    match JournalHeader::decode(&bytes[..SECTOR as usize]) {
        Ok(h) => out.header = Some(h),
        Err(e) => {
            // An all-zero header sector: the first commit never completed (its
            // header and frame were never synced together), so nothing is durable.
            if bytes[..SECTOR as usize].iter().all(|&b| b == 0) {
                out.torn_tail_bytes = bytes.len() as u64;
                out.end = 0;
            } else {
                out.corrupt = Some(format!("journal header: {e}"));
            }
            return out;
        }
    }
    let mut pos = SECTOR as usize;
    while pos < bytes.len() {
        match decode_frame(&bytes[pos..]) {
            Some((seq, payload, used)) if seq == out.next_seq => {
                let mut at = 0;
                let mut recs = Vec::new();
                while at < payload.len() {
                    match MapRecord::decode(&payload[at..]) {
                        Ok((r, n)) => {
                            recs.push(r);
                            at += n;
                        }
                        Err(e) => {
                            out.corrupt = Some(format!(
                                "frame {seq} at offset {pos}: checksum ok but record {} does not decode: {e}",
                                recs.len()
                            ));
                            return out;
                        }
                    }
                }
                out.records.extend(recs);
                out.frames += 1;
                out.next_seq += 1;
                pos += used;
            }
            _ => break,
        }
    }
    out.end = pos as u64;
    out.torn_tail_bytes = (bytes.len() - pos) as u64;
    // Anything valid later on means the bad frame is not a tail.
    let mut p = pos + SECTOR as usize;
    while p < bytes.len() {
        if let Some((seq, _, _)) = decode_frame(&bytes[p..]) {
            if seq >= out.next_seq {
                out.corrupt = Some(format!(
                    "frame {} at offset {pos} is damaged but frame {seq} at offset {p} follows it",
                    out.next_seq
                ));
                break;
            }
        }
        p += SECTOR as usize;
    }
    out
}

/// The in-memory side of one delta's journal: records waiting for the next commit
/// and where that commit appends.
#[derive(Debug)]
pub(crate) struct Journal {
    pub name: String,
    st: Mutex<JState>,
}

#[derive(Debug)]
struct JState {
    pending: Vec<MapRecord>,
    next_seq: u64,
    end: u64,
    /// The header is not known durable yet (written by the first commit).
    header: Option<JournalHeader>,
    /// The file exists (a lazy journal creates it before the manifest names it).
    created: bool,
}

/// Records taken by a commit; handed back with [`Journal::committed`] or
/// [`Journal::restore`].
#[derive(Debug)]
pub(crate) struct Taken {
    records: Vec<MapRecord>,
}

impl Journal {
    /// A new, empty journal for a new delta: the file is created now; its header is
    /// written by the first commit.
    #[cfg(test)]
    pub(crate) fn create(
        store: &dyn Store,
        name: &str,
        header: JournalHeader,
    ) -> io::Result<Journal> {
        let j = Journal::lazy(name, header);
        j.ensure_file(store)?;
        Ok(j)
    }

    /// Like [`create`](Self::create), but the file is created later, by
    /// [`ensure_file`](Self::ensure_file) or the first write: keeps file creation
    /// off the backup switch. Whoever makes a manifest naming this journal durable
    /// calls `ensure_file` first (`commit` does).
    pub(crate) fn lazy(name: &str, header: JournalHeader) -> Journal {
        Journal {
            name: name.to_string(),
            st: Mutex::new(JState {
                pending: Vec::new(),
                next_seq: 1,
                end: 0,
                header: Some(header),
                created: false,
            }),
        }
    }

    /// Creates the file if it does not exist yet (see [`lazy`](Self::lazy)).
    pub(crate) fn ensure_file(&self, store: &dyn Store) -> io::Result<()> {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        if !st.created {
            store.create(&self.name)?;
            st.created = true;
        }
        Ok(())
    }

    /// A journal recovered by [`replay`]: appends continue at `replay.end`. The
    /// caller truncates the file there first (see [`super::recover`]).
    pub(crate) fn resume(name: &str, header: JournalHeader, replay: &Replay) -> Journal {
        let fresh = replay.end == 0;
        Journal {
            name: name.to_string(),
            st: Mutex::new(JState {
                pending: Vec::new(),
                next_seq: replay.next_seq,
                end: replay.end,
                header: fresh.then_some(header),
                created: true,
            }),
        }
    }

    /// Queues a record for the next commit.
    pub(crate) fn append(&self, rec: MapRecord) {
        self.st
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pending
            .push(rec);
    }

    /// Takes every pending record (step 1 of a commit).
    pub(crate) fn take(&self) -> Taken {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        Taken {
            records: std::mem::take(&mut st.pending),
        }
    }

    /// A failed commit puts its records back in front of newer ones, in order.
    pub(crate) fn restore(&self, t: Taken) {
        let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
        let newer = std::mem::replace(&mut st.pending, t.records);
        st.pending.extend(newer);
    }

    /// Appends the taken records as one frame and syncs (unless `sync` is false: a
    /// test-only setting for the negative control). On error the records go back.
    pub(crate) fn write(&self, store: &dyn Store, t: Taken, sync: bool) -> io::Result<()> {
        let (needs_header, seq, end) = {
            let st = self.st.lock().unwrap_or_else(|p| p.into_inner());
            (st.header, st.next_seq, st.end)
        };
        if t.records.is_empty() && needs_header.is_none() {
            return Ok(());
        }
        let res = (|| {
            self.ensure_file(store)?;
            let mut end = end;
            if let Some(h) = needs_header {
                store.write_at(&self.name, 0, &h.encode())?;
                end = SECTOR;
            }
            let mut next = end;
            if !t.records.is_empty() {
                let frame = encode_frame(seq, &t.records);
                store.write_at(&self.name, end, &frame)?;
                next = end + frame.len() as u64;
            }
            if sync {
                store.sync(&self.name)?;
            }
            Ok(next)
        })();
        match res {
            Ok(next) => {
                let mut st = self.st.lock().unwrap_or_else(|p| p.into_inner());
                st.header = None;
                st.end = next;
                if !t.records.is_empty() {
                    st.next_seq += 1;
                }
                Ok(())
            }
            Err(e) => {
                self.restore(t);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(l: u64, p: u64) -> MapRecord {
        MapRecord::Install {
            logical: l,
            physical: p,
        }
    }

    fn image(frames: &[Vec<MapRecord>]) -> Vec<u8> {
        let h = JournalHeader {
            chunk_bytes: 4096,
            capacity_chunks: 100,
            delta_id: 3,
        };
        let mut b = h.encode().to_vec();
        for (i, f) in frames.iter().enumerate() {
            b.extend(encode_frame(i as u64 + 1, f));
        }
        b
    }

    #[test]
    fn frames_replay_in_order() {
        let b = image(&[
            vec![ins(1, 0), ins(2, 1)],
            vec![MapRecord::Unmap { logical: 1 }],
        ]);
        let r = replay(&b);
        assert_eq!(r.frames, 2);
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.end, b.len() as u64);
        assert_eq!(r.torn_tail_bytes, 0);
        assert!(r.corrupt.is_none());
        assert_eq!(r.header.unwrap().delta_id, 3);
        assert_eq!(r.next_seq, 3);
    }

    #[test]
    fn torn_tail_is_ignored_but_middle_damage_is_reported() {
        let mut b = image(&[vec![ins(1, 0)], vec![ins(2, 1)], vec![ins(3, 2)]]);
        // Tear the last frame: its payload changes, the checksum no longer matches.
        let last = b.len() - 512 + 30;
        b[last] ^= 0xff;
        let r = replay(&b);
        assert_eq!((r.frames, r.torn_tail_bytes), (2, 512));
        assert!(r.corrupt.is_none(), "{:?}", r.corrupt);
        // Damage the middle frame instead: frame 3 still follows it.
        let mut b = image(&[vec![ins(1, 0)], vec![ins(2, 1)], vec![ins(3, 2)]]);
        b[1024 + 30] ^= 0xff;
        let r = replay(&b);
        assert_eq!(r.frames, 1);
        assert!(
            r.corrupt.as_deref().unwrap().contains("frame 3"),
            "{:?}",
            r.corrupt
        );
    }

    #[test]
    fn empty_and_headerless_journals_are_empty() {
        let r = replay(&[]);
        assert!(r.corrupt.is_none() && r.records.is_empty() && r.end == 0);
        let r = replay(&[0u8; 512]);
        assert!(r.corrupt.is_none() && r.records.is_empty() && r.end == 0);
        let r = replay(&[7u8; 512]);
        assert!(r.corrupt.is_some());
    }
}
