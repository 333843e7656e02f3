//! Text requests in the full feature phase (RFC 7143 §11.10-11): `SendTargets`
//! (discovery, RFC 7143 §13.3 and appendix C) and long responses split over C-bit PDUs.
//!
//! # Contract
//! [`TextExchange::handle`] answers one Text Request with one Text Response body
//! ([`TextReply`]); the session fills in StatSN, ExpCmdSN and MaxCmdSN and advances them
//! as for any response. A response longer than the initiator's MaxRecvDataSegmentLength
//! goes out in pieces: each but the last has C=1 and a Target Transfer Tag, and the
//! initiator asks for the next with an empty Text Request carrying that tag. At most
//! one exchange is open at a time; its text is bounded by `TEXT_MAX_BYTES`.

use super::login::{LoginConfig, SessionParams};
use super::pdu::{Bhs, Pdu, TextRequest, TextResponse, RESERVED_TAG};
use super::text::{self, Accumulator, Outgoing, TextError};

/// The `SendTargets` answer: `TargetName`, then each `TargetAddress`, per target.
/// `value` is `All` (every target), a target name (that one), or empty (the session's
/// own target, in a normal session only).
pub fn send_targets(value: &str, cfg: &LoginConfig, params: &SessionParams) -> Vec<u8> {
    let mut out = Vec::new();
    let chosen: Vec<usize> = match value {
        "All" => (0..cfg.targets.len()).collect(),
        "" => params.target.into_iter().collect(),
        name => cfg
            .targets
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
            .into_iter()
            .collect(),
    };
    for t in chosen.into_iter().filter_map(|i| cfg.targets.get(i)) {
        text::push(&mut out, "TargetName", &t.name);
        for a in &t.addresses {
            text::push(&mut out, "TargetAddress", a);
        }
    }
    out
}

/// A Text Response without its sequence numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextReply {
    pub itt: u32,
    pub ttt: u32,
    pub final_: bool,
    pub cont: bool,
    pub data: Vec<u8>,
}

impl TextReply {
    /// The PDU, with the session's sequence numbers.
    pub fn to_pdu(&self, lun: u64, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) -> Pdu {
        Pdu::new(
            Bhs::TextResponse(TextResponse {
                final_: self.final_,
                cont: self.cont,
                lun,
                itt: self.itt,
                ttt: self.ttt,
                stat_sn,
                exp_cmd_sn,
                max_cmd_sn,
            }),
            self.data.clone(),
        )
    }
}

/// Why a Text Request was refused (the session answers with a Reject, reason 0x09
/// invalid PDU field, or closes for an oversized text).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextExchangeError {
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("Text Request with unknown Target Transfer Tag {0:#010x}")]
    UnknownTag(u32),
}

/// Text requests of one connection.
#[derive(Debug)]
pub struct TextExchange {
    acc: Accumulator,
    /// The response being handed out in pieces, with its ITT and TTT.
    pending: Option<(u32, u32, Outgoing)>,
    /// The tag of a request still arriving in C-bit pieces.
    acc_ttt: Option<u32>,
    next_ttt: u32,
}

impl Default for TextExchange {
    fn default() -> TextExchange {
        TextExchange::new()
    }
}

impl TextExchange {
    pub fn new() -> TextExchange {
        TextExchange {
            acc: Accumulator::new(text::TEXT_MAX_BYTES),
            pending: None,
            acc_ttt: None,
            next_ttt: 1,
        }
    }

    /// Answers one Text Request.
    pub fn handle(
        &mut self,
        req: &TextRequest,
        data: &[u8],
        cfg: &LoginConfig,
        params: &SessionParams,
    ) -> Result<TextReply, TextExchangeError> {
        let max = params.max_xmit_data_segment_length_bytes as usize;
        if req.ttt == RESERVED_TAG {
            // A new request resets any exchange in progress (RFC 7143 §11.10.4).
            self.pending = None;
            self.acc_ttt = None;
            self.acc = Accumulator::new(text::TEXT_MAX_BYTES);
        } else if self.acc_ttt != Some(req.ttt) {
            // The initiator asks for the next piece of a long response.
            let Some((itt, ttt, mut out)) = self.pending.take().filter(|p| p.1 == req.ttt) else {
                return Err(TextExchangeError::UnknownTag(req.ttt));
            };
            return Ok(self.piece(itt, ttt, &mut out, max));
        }
        let Some(whole) = self.acc.push(data, req.cont)? else {
            // More of the request follows (C bit): acknowledge with an empty response
            // whose tag the continuation echoes.
            let ttt = self.take_ttt();
            self.acc_ttt = Some(ttt);
            return Ok(TextReply {
                itt: req.itt,
                ttt,
                final_: false,
                cont: false,
                data: Vec::new(),
            });
        };
        self.acc_ttt = None;
        let mut reply = Vec::new();
        for pair in text::parse(&whole)? {
            match pair.key.as_str() {
                "SendTargets" => reply.extend(send_targets(&pair.value, cfg, params)),
                key => text::push(&mut reply, key, "NotUnderstood"),
            }
            if reply.len() > text::TEXT_MAX_BYTES {
                return Err(TextError::TooLong {
                    max: text::TEXT_MAX_BYTES,
                }
                .into());
            }
        }
        let ttt = self.take_ttt();
        let mut out = Outgoing::new(reply);
        Ok(self.piece(req.itt, ttt, &mut out, max))
    }

    fn piece(&mut self, itt: u32, ttt: u32, out: &mut Outgoing, max: usize) -> TextReply {
        let (data, more) = out.next_piece(max);
        if more {
            self.pending = Some((itt, ttt, std::mem::replace(out, Outgoing::new(Vec::new()))));
        }
        TextReply {
            itt,
            // The final piece carries the reserved tag: nothing more to ask for.
            ttt: if more { ttt } else { RESERVED_TAG },
            final_: !more,
            cont: more,
            data,
        }
    }

    fn take_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        // Skip the reserved tag on wrap.
        self.next_ttt = match t.wrapping_add(1) {
            RESERVED_TAG => 1,
            n => n,
        };
        t
    }
}

#[cfg(test)]
mod tests;
