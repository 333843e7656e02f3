//! Text keys (RFC 7143 §6): `key=value` pairs, each ended by a NUL, in the data segments
//! of Login and Text PDUs; the continue (C) bit spreads one text over several PDUs.
//!
//! # Bounds
//! A key name is at most [`KEY_MAX_BYTES`] (RFC 7143 §6.1), a value at most
//! [`VALUE_MAX_BYTES`] (255 for most keys in the RFC; CHAP's binary values are longer,
//! so one cap for all), and one text, across all its C-bit PDUs, at most the
//! accumulator's bound. Anything longer is an error, never a bigger buffer.

/// Longest key name (RFC 7143 §6.1).
pub const KEY_MAX_BYTES: usize = 63;
/// Longest value, as encoded (hex CHAP challenges of 1024 bytes fit).
pub const VALUE_MAX_BYTES: usize = 4096;
/// Default bound on one text spread over C-bit PDUs.
pub const TEXT_MAX_BYTES: usize = 64 * 1024;
/// Most pairs one text may hold (a login sends about 25).
pub const PAIRS_MAX: usize = 256;

/// Why a text does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    #[error("text of more than {max} bytes")]
    TooLong { max: usize },
    #[error("more than {PAIRS_MAX} key=value pairs")]
    TooManyPairs,
    #[error("key without '=': {0:?}")]
    NoEquals(String),
    #[error("bad key name {0:?}")]
    BadKey(String),
    #[error("value of {key} longer than {VALUE_MAX_BYTES} bytes")]
    ValueTooLong { key: String },
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("the text ends inside a pair (no final NUL)")]
    Unterminated,
}

/// One `key=value` pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    pub key: String,
    pub value: String,
}

/// Parses a complete text. Empty entries (a doubled NUL) are skipped: some initiators
/// pad with NULs. A text that does not end in NUL is unterminated.
pub fn parse(text: &[u8]) -> Result<Vec<Pair>, TextError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.last() != Some(&0) {
        return Err(TextError::Unterminated);
    }
    let mut pairs = Vec::new();
    for entry in text[..text.len() - 1].split(|&b| b == 0) {
        if entry.is_empty() {
            continue;
        }
        if pairs.len() == PAIRS_MAX {
            return Err(TextError::TooManyPairs);
        }
        let entry = std::str::from_utf8(entry).map_err(|_| TextError::NotUtf8)?;
        let Some((key, value)) = entry.split_once('=') else {
            return Err(TextError::NoEquals(truncate(entry)));
        };
        if key.is_empty() || key.len() > KEY_MAX_BYTES || !key.bytes().all(key_char) {
            return Err(TextError::BadKey(truncate(key)));
        }
        if value.len() > VALUE_MAX_BYTES {
            return Err(TextError::ValueTooLong { key: key.into() });
        }
        pairs.push(Pair {
            key: key.into(),
            value: value.into(),
        });
    }
    Ok(pairs)
}

/// RFC 7143 §6.1: key names are letters, digits, `.`, `-`, `+`, `@`, `_`.
fn key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'@' | b'_')
}

/// At most 64 bytes of `s`, for error messages.
fn truncate(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].into()
}

/// Appends `key=value\0`.
pub fn push(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes pairs.
pub fn encode(pairs: &[Pair]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pairs {
        push(&mut out, &p.key, &p.value);
    }
    out
}

/// Collects one text spread over C-bit PDUs, up to a bound.
#[derive(Debug)]
pub struct Accumulator {
    buf: Vec<u8>,
    max_bytes: usize,
}

impl Accumulator {
    pub fn new(max_bytes: usize) -> Accumulator {
        Accumulator {
            buf: Vec::new(),
            max_bytes,
        }
    }

    /// Appends one PDU's data segment. With `cont` (the C bit) the text is incomplete
    /// and `Ok(None)` comes back; otherwise the whole text, and the accumulator is empty
    /// again.
    pub fn push(&mut self, data: &[u8], cont: bool) -> Result<Option<Vec<u8>>, TextError> {
        if self.buf.len() + data.len() > self.max_bytes {
            self.buf = Vec::new();
            return Err(TextError::TooLong {
                max: self.max_bytes,
            });
        }
        self.buf.extend_from_slice(data);
        if cont {
            return Ok(None);
        }
        Ok(Some(std::mem::take(&mut self.buf)))
    }

    /// True when part of a text is waiting for its continuation.
    pub fn is_pending(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// A response text too long for one PDU, handed out in pieces of at most the peer's
/// MaxRecvDataSegmentLength: every piece but the last goes with C=1 and the peer asks
/// for the next with an empty request (RFC 7143 §6.1, "long text responses").
#[derive(Debug)]
pub struct Outgoing {
    text: Vec<u8>,
    sent: usize,
}

impl Outgoing {
    pub fn new(text: Vec<u8>) -> Outgoing {
        Outgoing { text, sent: 0 }
    }

    /// The next piece of at most `max_bytes` (at least 1) and whether more follow.
    pub fn next_piece(&mut self, max_bytes: usize) -> (Vec<u8>, bool) {
        let n = (self.text.len() - self.sent).min(max_bytes.max(1));
        let piece = self.text[self.sent..self.sent + n].to_vec();
        self.sent += n;
        (piece, self.sent < self.text.len())
    }

    /// True when every byte was handed out.
    pub fn is_done(&self) -> bool {
        self.sent == self.text.len()
    }
}

/// A numerical value: decimal, or hex with `0x` (RFC 7143 §6.1's decimal/hex constants).
pub fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// `Yes`/`No`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn yes_no(v: bool) -> &'static str {
    if v {
        "Yes"
    } else {
        "No"
    }
}

/// A binary value (RFC 7143 §6.1): `0x` + hex digits, or `0b` + base64.
pub fn parse_binary(value: &str, max_bytes: usize) -> Option<Vec<u8>> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        // An odd number of digits is allowed: a leading zero nibble is implied.
        if hex.is_empty() || hex.len().div_ceil(2) > max_bytes {
            return None;
        }
        let mut out = Vec::with_capacity(hex.len().div_ceil(2));
        let digits: Vec<u8> = hex.bytes().collect();
        let (head, tail) = digits.split_at(hex.len() % 2);
        if let Some(&d) = head.first() {
            out.push(nibble(d)?);
        }
        for pair in tail.chunks_exact(2) {
            out.push(nibble(pair[0])? << 4 | nibble(pair[1])?);
        }
        return Some(out);
    }
    if let Some(b64) = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))
    {
        return base64(b64, max_bytes);
    }
    None
}

fn nibble(d: u8) -> Option<u8> {
    (d as char).to_digit(16).map(|v| v as u8)
}

fn base64(s: &str, max_bytes: usize) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    if s.is_empty() || s.len() * 3 / 4 > max_bytes || s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `0x` + lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_known_text() {
        let pairs = parse(b"InitiatorName=iqn.x:y\0SessionType=Normal\0\0");
        assert_eq!(
            pairs.map(|p| p.iter().map(|p| p.key.clone()).collect::<Vec<_>>()),
            Ok(vec!["InitiatorName".into(), "SessionType".into()])
        );
        // Negative controls: each malformed text is refused by name.
        assert_eq!(parse(b"A=1"), Err(TextError::Unterminated));
        assert_eq!(parse(b"A\0"), Err(TextError::NoEquals("A".into())));
        assert_eq!(parse(b"=1\0"), Err(TextError::BadKey(String::new())));
        assert_eq!(parse(b"a b=1\0"), Err(TextError::BadKey("a b".into())));
        let long_key = format!("{}=1\0", "K".repeat(64));
        assert!(matches!(
            parse(long_key.as_bytes()),
            Err(TextError::BadKey(_))
        ));
        let long_value = format!("K={}\0", "v".repeat(VALUE_MAX_BYTES + 1));
        assert!(matches!(
            parse(long_value.as_bytes()),
            Err(TextError::ValueTooLong { .. })
        ));
        // "=" inside a value is part of the value.
        assert_eq!(
            parse(b"X-a=b=c\0").map(|p| p[0].value.clone()),
            Ok("b=c".into())
        );
    }

    #[test]
    fn accumulator_is_bounded() {
        let mut acc = Accumulator::new(10);
        assert_eq!(acc.push(b"A=1", true), Ok(None));
        assert!(acc.is_pending());
        assert_eq!(acc.push(b"23\0", false), Ok(Some(b"A=123\0".to_vec())));
        assert!(!acc.is_pending());
        assert_eq!(acc.push(b"0123456", true), Ok(None));
        assert_eq!(
            acc.push(b"7890", false),
            Err(TextError::TooLong { max: 10 })
        );
    }

    #[test]
    fn values() {
        assert_eq!(parse_number("262144"), Some(262_144));
        assert_eq!(parse_number("0x40000"), Some(262_144));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
        assert_eq!(parse_binary("0x0a0B", 8), Some(vec![10, 11]));
        assert_eq!(parse_binary("0xabc", 8), Some(vec![0x0a, 0xbc]));
        assert_eq!(parse_binary("0bAQID", 8), Some(vec![1, 2, 3]));
        assert_eq!(parse_binary("0bAQI=", 8), Some(vec![1, 2]));
        assert_eq!(parse_binary("0x", 8), None);
        assert_eq!(parse_binary("0xzz", 8), None);
        assert_eq!(parse_binary("0x0102", 1), None);
        assert_eq!(parse_binary("12", 8), None);
        assert_eq!(hex(&[0, 0xab]), "0x00ab");
    }

    #[test]
    fn outgoing_splits() {
        let mut out = Outgoing::new(b"abcdefg".to_vec());
        assert_eq!(out.next_piece(3), (b"abc".to_vec(), true));
        assert_eq!(out.next_piece(3), (b"def".to_vec(), true));
        assert_eq!(out.next_piece(3), (b"g".to_vec(), false));
        assert!(out.is_done());
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(pairs in prop::collection::vec(
            ("[A-Za-z][A-Za-z0-9._-]{0,20}", "[ -~]{0,40}"), 0..20)) {
            let pairs: Vec<Pair> = pairs.into_iter()
                .map(|(key, value)| Pair { key, value }).collect();
            prop_assert_eq!(parse(&encode(&pairs)), Ok(pairs));
        }

        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn hex_round_trip(bytes in prop::collection::vec(any::<u8>(), 1..64)) {
            prop_assert_eq!(parse_binary(&hex(&bytes), 64), Some(bytes));
        }
    }
}
