//! Write data collection for one SCSI write command (RFC 7143 §3.2.4.2, §11.7, §11.8,
//! §13.13-13.19): immediate data, unsolicited Data-Out up to FirstBurstLength, then R2Ts
//! of at most MaxBurstLength, at most MaxOutstandingR2T at a time.
//!
//! # Contract
//! [`WriteTransfer`] checks every Data-Out PDU of its command before the session copies
//! a byte: the Target Transfer Tag names an R2T we sent (or the reserved tag for
//! unsolicited data), the buffer offset is the next one of that sequence (we negotiate
//! DataPDUInOrder=Yes), DataSN counts from 0 per sequence, the data stays inside the
//! sequence and the command's Expected Data Transfer Length, and F ends a sequence
//! exactly at its end. Each accepted PDU says where its data goes; every byte of the
//! buffer is written once. Any violation is a [`DataOutError`]: at ErrorRecoveryLevel 0
//! the session answers it with a Reject and ends the connection.
//!
//! # Bounds
//! At most `max_outstanding_r2t` R2Ts are open; the session asks for the next with
//! [`WriteTransfer::next_r2t`] after each completed sequence, so memory per command is
//! fixed.

use super::login::SessionParams;
use super::pdu::{DataOut, RESERVED_TAG};

/// The negotiated values a write transfer obeys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BurstParams {
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub first_burst_bytes: u32,
    pub max_burst_bytes: u32,
    pub max_outstanding_r2t: u16,
    /// Ours: the most data one PDU may carry.
    pub max_recv_data_segment_bytes: u32,
}

impl From<&SessionParams> for BurstParams {
    fn from(p: &SessionParams) -> BurstParams {
        BurstParams {
            initial_r2t: p.initial_r2t,
            immediate_data: p.immediate_data,
            first_burst_bytes: p.first_burst_length_bytes,
            max_burst_bytes: p.max_burst_length_bytes.max(512),
            max_outstanding_r2t: p.max_outstanding_r2t.max(1),
            max_recv_data_segment_bytes: p.max_recv_data_segment_length_bytes,
        }
    }
}

/// What is wrong with a write's data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataOutError {
    #[error("immediate data of {len} bytes not allowed (limit {max})")]
    Immediate { len: u32, max: u32 },
    #[error("unsolicited Data-Out not allowed here")]
    Unsolicited,
    #[error("Data-Out for unknown Target Transfer Tag {0:#010x}")]
    UnknownTag(u32),
    #[error("Data-Out at offset {got}, expected {expected}")]
    Offset { expected: u32, got: u32 },
    #[error("DataSN {got}, expected {expected}")]
    DataSn { expected: u32, got: u32 },
    #[error("Data-Out of {len} bytes overruns its sequence ({left} left)")]
    Overrun { len: u32, left: u32 },
    #[error("F bit at the wrong place in a Data-Out sequence")]
    Final,
}

/// An R2T to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2tRequest {
    pub ttt: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// One Data-Out sequence: unsolicited (reserved tag) or answering an R2T.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sequence {
    ttt: u32,
    /// The next offset expected, and where the sequence ends.
    next: u32,
    end: u32,
    data_sn: u32,
}

/// Data collection of one write command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteTransfer {
    params: BurstParams,
    expected_len: u32,
    /// Unsolicited Data-Out still expected (None once the F bit ended it, or if none
    /// may come).
    unsolicited: Option<Sequence>,
    open: Vec<Sequence>,
    /// Bytes already covered by immediate data, unsolicited data and R2Ts sent.
    requested_to: u32,
    received_bytes: u32,
    r2t_sn: u32,
}

impl WriteTransfer {
    /// Starts a write of `expected_len` bytes whose command PDU carried `immediate_len`
    /// bytes of data and had the F bit `final_` (no unsolicited Data-Out follows).
    pub fn new(
        params: BurstParams,
        expected_len: u32,
        immediate_len: u32,
        final_: bool,
    ) -> Result<WriteTransfer, DataOutError> {
        let first_burst = params.first_burst_bytes.min(expected_len);
        let imm_max = if params.immediate_data {
            first_burst.min(params.max_recv_data_segment_bytes)
        } else {
            0
        };
        if immediate_len > imm_max {
            return Err(DataOutError::Immediate {
                len: immediate_len,
                max: imm_max,
            });
        }
        // Unsolicited Data-Out may follow when InitialR2T=No and F is clear, up to the
        // first burst (RFC 7143 §13.13).
        let unsolicited = (!params.initial_r2t && !final_ && immediate_len < first_burst)
            .then_some(Sequence {
                ttt: RESERVED_TAG,
                next: immediate_len,
                end: first_burst,
                data_sn: 0,
            });
        if !final_ && unsolicited.is_none() && params.initial_r2t {
            // F clear promises unsolicited data that InitialR2T=Yes forbids.
            return Err(DataOutError::Unsolicited);
        }
        Ok(WriteTransfer {
            params,
            expected_len,
            requested_to: unsolicited.map_or(immediate_len, |s| s.end),
            unsolicited,
            open: Vec::new(),
            received_bytes: immediate_len,
            r2t_sn: 0,
        })
    }

    /// The next R2T to send, if one is due: after the unsolicited phase, while fewer
    /// than MaxOutstandingR2T are open and bytes remain unrequested. `ttt` is the tag the
    /// session assigns (unique among its open transfers, not the reserved one).
    pub fn next_r2t(&mut self, ttt: u32) -> Option<R2tRequest> {
        if self.unsolicited.is_some()
            || self.open.len() >= usize::from(self.params.max_outstanding_r2t)
            || self.requested_to >= self.expected_len
            || ttt == RESERVED_TAG
        {
            return None;
        }
        let len = (self.expected_len - self.requested_to).min(self.params.max_burst_bytes);
        let r2t = R2tRequest {
            ttt,
            r2t_sn: self.r2t_sn,
            buffer_offset: self.requested_to,
            desired_len: len,
        };
        self.open.push(Sequence {
            ttt,
            next: self.requested_to,
            end: self.requested_to + len,
            data_sn: 0,
        });
        self.requested_to += len;
        self.r2t_sn = self.r2t_sn.wrapping_add(1);
        Some(r2t)
    }

    /// Checks one Data-Out PDU carrying `len` bytes; returns the buffer offset its data
    /// goes to.
    pub fn data_out(&mut self, d: &DataOut, len: u32) -> Result<u32, DataOutError> {
        if len > self.params.max_recv_data_segment_bytes {
            return Err(DataOutError::Overrun {
                len,
                left: self.params.max_recv_data_segment_bytes,
            });
        }
        let seq = if d.ttt == RESERVED_TAG {
            self.unsolicited.as_mut().ok_or(DataOutError::Unsolicited)?
        } else {
            self.open
                .iter_mut()
                .find(|s| s.ttt == d.ttt)
                .ok_or(DataOutError::UnknownTag(d.ttt))?
        };
        if d.buffer_offset != seq.next {
            return Err(DataOutError::Offset {
                expected: seq.next,
                got: d.buffer_offset,
            });
        }
        if d.data_sn != seq.data_sn {
            return Err(DataOutError::DataSn {
                expected: seq.data_sn,
                got: d.data_sn,
            });
        }
        let left = seq.end - seq.next;
        if len > left {
            return Err(DataOutError::Overrun { len, left });
        }
        let at = seq.next;
        seq.next += len;
        seq.data_sn = seq.data_sn.wrapping_add(1);
        // An R2T sequence ends exactly at its end with F; an unsolicited one may end
        // early with F (the initiator sent less than the first burst).
        let done = seq.next == seq.end;
        let unsolicited = d.ttt == RESERVED_TAG;
        if d.final_ != done && !(unsolicited && d.final_) {
            return Err(DataOutError::Final);
        }
        self.received_bytes += len;
        if d.final_ {
            if unsolicited {
                // Bytes the initiator did not send unsolicited are requested by R2T.
                self.requested_to = seq.next;
                self.unsolicited = None;
            } else {
                let ttt = d.ttt;
                self.open.retain(|s| s.ttt != ttt);
            }
        }
        Ok(at)
    }

    /// Every byte of the Expected Data Transfer Length has arrived.
    pub fn is_complete(&self) -> bool {
        self.received_bytes == self.expected_len
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u32 {
        self.received_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(initial_r2t: bool, max_out: u16) -> BurstParams {
        BurstParams {
            initial_r2t,
            immediate_data: true,
            first_burst_bytes: 8192,
            max_burst_bytes: 16384,
            max_outstanding_r2t: max_out,
            max_recv_data_segment_bytes: 4096,
        }
    }

    fn dout(ttt: u32, offset: u32, data_sn: u32, final_: bool) -> DataOut {
        DataOut {
            final_,
            lun: 0,
            itt: 1,
            ttt,
            exp_stat_sn: 0,
            data_sn,
            buffer_offset: offset,
        }
    }

    /// Immediate 4 KiB, unsolicited 4 KiB (first burst 8 KiB), then R2Ts of 16 KiB for
    /// the remaining 28 KiB.
    #[test]
    fn unsolicited_then_r2t() {
        let mut w = WriteTransfer::new(params(false, 1), 36 * 1024, 4096, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(w.next_r2t(7), None, "no R2T during the unsolicited burst");
        assert_eq!(
            w.data_out(&dout(RESERVED_TAG, 4096, 0, true), 4096),
            Ok(4096)
        );
        let r = w.next_r2t(7);
        assert_eq!(
            r,
            Some(R2tRequest {
                ttt: 7,
                r2t_sn: 0,
                buffer_offset: 8192,
                desired_len: 16384
            })
        );
        assert_eq!(w.next_r2t(8), None, "MaxOutstandingR2T=1");
        for i in 0..4 {
            let last = i == 3;
            assert_eq!(
                w.data_out(&dout(7, 8192 + i * 4096, i, last), 4096),
                Ok(8192 + i * 4096)
            );
        }
        let r = w.next_r2t(9);
        assert_eq!(
            r.map(|r| (r.r2t_sn, r.buffer_offset, r.desired_len)),
            Some((1, 24576, 12288))
        );
        for i in 0..3 {
            assert!(w
                .data_out(&dout(9, 24576 + i * 4096, i, i == 2), 4096)
                .is_ok());
        }
        assert!(w.is_complete());
        assert_eq!(w.next_r2t(10), None);
    }

    /// Each kind of bad Data-Out is refused by name.
    #[test]
    fn violations() {
        let p = params(true, 2);
        assert_eq!(
            WriteTransfer::new(p, 8192, 8192, true),
            Err(DataOutError::Immediate {
                len: 8192,
                max: 4096
            })
        );
        assert_eq!(
            WriteTransfer::new(p, 8192, 0, false),
            Err(DataOutError::Unsolicited)
        );
        let mut w = WriteTransfer::new(p, 65536, 0, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            w.data_out(&dout(RESERVED_TAG, 0, 0, true), 512),
            Err(DataOutError::Unsolicited)
        );
        assert!(w.next_r2t(1).is_some() && w.next_r2t(2).is_some() && w.next_r2t(3).is_none());
        assert_eq!(
            w.data_out(&dout(5, 0, 0, false), 512),
            Err(DataOutError::UnknownTag(5))
        );
        assert_eq!(
            w.data_out(&dout(1, 512, 0, false), 512),
            Err(DataOutError::Offset {
                expected: 0,
                got: 512
            })
        );
        assert_eq!(
            w.data_out(&dout(1, 0, 3, false), 512),
            Err(DataOutError::DataSn {
                expected: 0,
                got: 3
            })
        );
        assert_eq!(
            w.data_out(&dout(1, 0, 0, true), 512),
            Err(DataOutError::Final)
        );
        assert!(matches!(
            w.data_out(&dout(1, 0, 0, false), 8192),
            Err(DataOutError::Overrun { .. })
        ));
        // The second R2T's sequence may come first (both are open).
        assert_eq!(w.data_out(&dout(2, 16384, 0, false), 4096), Ok(16384));
    }

    proptest! {
        /// A well-behaved initiator (random sizes, PDU lengths and tags) always completes
        /// with every byte delivered exactly once.
        #[test]
        fn honest_initiator_completes(len in 1u32..200_000, imm in 0u32..5000, pdu in 1u32..5000,
                                      initial_r2t: bool, max_out in 1u16..4, send_unsolicited in 0u32..10_000) {
            let p = params(initial_r2t, max_out);
            let imm = if p.immediate_data { imm.min(len).min(4096).min(8192) } else { 0 };
            let unsolicited_room = if initial_r2t { 0 } else { 8192u32.min(len).saturating_sub(imm) };
            let send_unsolicited = send_unsolicited.min(unsolicited_room);
            let final_ = initial_r2t || unsolicited_room == 0;
            let w = WriteTransfer::new(p, len, imm, final_);
            prop_assert!(w.is_ok(), "{:?}", w);
            let Ok(mut w) = w else { return Ok(()) };
            let mut seen = vec![0u8; len as usize];
            for b in &mut seen[..imm as usize] { *b += 1; }
            if !final_ {
                let (mut off, mut sn) = (imm, 0);
                let end = imm + send_unsolicited;
                loop {
                    let n = pdu.min(end - off).min(4096);
                    let last = off + n == end;
                    let at = w.data_out(&dout(RESERVED_TAG, off, sn, last), n);
                    prop_assert_eq!(at, Ok(off));
                    for b in &mut seen[off as usize..(off + n) as usize] { *b += 1; }
                    off += n; sn += 1;
                    if last { break; }
                }
            }
            let mut tag = 100;
            while !w.is_complete() {
                let mut r2ts = Vec::new();
                while let Some(r) = w.next_r2t(tag) { tag += 1; r2ts.push(r); }
                prop_assert!(!r2ts.is_empty() && r2ts.len() <= usize::from(max_out));
                for r in r2ts {
                    let (mut off, mut sn) = (r.buffer_offset, 0);
                    let end = r.buffer_offset + r.desired_len;
                    while off < end {
                        let n = pdu.min(end - off).min(4096);
                        prop_assert_eq!(w.data_out(&dout(r.ttt, off, sn, off + n == end), n), Ok(off));
                        for b in &mut seen[off as usize..(off + n) as usize] { *b += 1; }
                        off += n; sn += 1;
                    }
                }
            }
            prop_assert!(seen.iter().all(|&b| b == 1));
        }
    }
}
