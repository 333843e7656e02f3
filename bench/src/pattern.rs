//! Block contents: a small PRNG, the self-describing verify pattern and the filler
//! that plain (non-verify) writes carry.
//!
//! # Verify blocks
//! Every block written in verify mode starts with a header — magic, the block's own
//! byte offset, the run's seed and the block length — and continues with a PRNG
//! stream seeded from (seed, offset). A read checks the *whole* block against the
//! regenerated one, so it detects a torn, misdirected (data of another offset),
//! stale (another seed: an earlier run) or overwritten block, and says which.

/// splitmix64: tiny, fast, statistically fine for offsets and fill bytes; not crypto.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for n < 2^32).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// `RBLKVRFY`: a block written by verify mode.
pub const VERIFY_MAGIC: u64 = u64::from_be_bytes(*b"RBLKVRFY");
/// `RBLKLOAD`: a block written by a plain (non-verify) write workload.
pub const LOAD_MAGIC: u64 = u64::from_be_bytes(*b"RBLKLOAD");
/// magic, offset, seed, block length.
pub const HEADER_LEN: usize = 32;
const _: () = assert!(HEADER_LEN == 8 + 8 + 8 + 8);
/// Smallest block verify mode accepts (the header must fit, with room to spare).
pub const VERIFY_BLOCK_MIN: usize = 512;

fn put_header(buf: &mut [u8], magic: u64, offset: u64, seed: u64) {
    let len = buf.len() as u64;
    buf[0..8].copy_from_slice(&magic.to_be_bytes());
    buf[8..16].copy_from_slice(&offset.to_be_bytes());
    buf[16..24].copy_from_slice(&seed.to_be_bytes());
    buf[24..32].copy_from_slice(&len.to_be_bytes());
}

fn body_rng(offset: u64, seed: u64) -> Rng {
    Rng::new(seed ^ offset.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// Fills `buf` (one block) with the verify pattern of `offset` under `seed`.
pub fn fill_verify(buf: &mut [u8], offset: u64, seed: u64) {
    assert!(buf.len() >= HEADER_LEN, "verify blocks hold a header");
    put_header(buf, VERIFY_MAGIC, offset, seed);
    let mut rng = body_rng(offset, seed);
    let mut words = buf[HEADER_LEN..].chunks_exact_mut(8);
    for w in &mut words {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let tail = words.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    let n = tail.len();
    tail.copy_from_slice(&last[..n]);
}

/// Stamps a plain write's block: the header (so a later verify says what it found),
/// over filler the caller keeps constant.
pub fn stamp_load(buf: &mut [u8], offset: u64, seed: u64) {
    if buf.len() >= HEADER_LEN {
        put_header(buf, LOAD_MAGIC, offset, seed);
    }
}

/// What a verify read found instead of the expected block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// No verify header: never written by verify mode, or overwritten.
    Foreign { magic: u64 },
    /// A plain `ringblk-bench` write overwrote the block.
    LoadWrite { offset: u64 },
    /// The block holds another offset's data: a misdirected write or read.
    Misplaced { found_offset: u64 },
    /// The block is from a run with another seed (stale data).
    Stale { found_seed: u64 },
    /// Header right, contents differ from byte `at` on (torn or corrupted).
    Body { at: usize, len: usize },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::Foreign { magic } => write!(
                f,
                "no verify header (first bytes {magic:#018x}): overwritten or never written"
            ),
            Mismatch::LoadWrite { offset } => write!(
                f,
                "overwritten by a plain ringblk-bench write (for offset {offset})"
            ),
            Mismatch::Misplaced { found_offset } => {
                write!(f, "holds the data of offset {found_offset} (misdirected)")
            }
            Mismatch::Stale { found_seed } => {
                write!(f, "stale: written with seed {found_seed}")
            }
            Mismatch::Body { at, len } => {
                write!(f, "header intact, contents differ from byte {at} of {len}")
            }
        }
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Checks one block read back from `offset` against the pattern of `seed`.
pub fn check_verify(buf: &[u8], offset: u64, seed: u64) -> Result<(), Mismatch> {
    if buf.len() < HEADER_LEN {
        return Err(Mismatch::Body {
            at: 0,
            len: buf.len(),
        });
    }
    let magic = be64(&buf[0..8]);
    let found_offset = be64(&buf[8..16]);
    match magic {
        VERIFY_MAGIC => {}
        LOAD_MAGIC => {
            return Err(Mismatch::LoadWrite {
                offset: found_offset,
            })
        }
        _ => return Err(Mismatch::Foreign { magic }),
    }
    if found_offset != offset {
        return Err(Mismatch::Misplaced { found_offset });
    }
    let found_seed = be64(&buf[16..24]);
    if found_seed != seed {
        return Err(Mismatch::Stale { found_seed });
    }
    // Regenerate word by word rather than into a buffer: no allocation per read.
    let mut rng = body_rng(offset, seed);
    let body = &buf[HEADER_LEN..];
    let mut pos = HEADER_LEN;
    for chunk in body.chunks(8) {
        let want = rng.next_u64().to_le_bytes();
        if chunk != &want[..chunk.len()] {
            let i = chunk
                .iter()
                .zip(want)
                .position(|(a, b)| *a != b)
                .unwrap_or(0);
            return Err(Mismatch::Body {
                at: pos + i,
                len: buf.len(),
            });
        }
        pos += chunk.len();
    }
    if be64(&buf[24..32]) != buf.len() as u64 {
        return Err(Mismatch::Body {
            at: 24,
            len: buf.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_block_verifies_and_every_corruption_is_named() {
        let mut b = vec![0u8; 4096 + 3]; // odd length: exercises the tail
        fill_verify(&mut b, 8192, 7);
        assert_eq!(check_verify(&b, 8192, 7), Ok(()));
        assert_eq!(
            check_verify(&b, 4096, 7),
            Err(Mismatch::Misplaced { found_offset: 8192 })
        );
        assert_eq!(
            check_verify(&b, 8192, 8),
            Err(Mismatch::Stale { found_seed: 7 })
        );
        let mut torn = b.clone();
        torn[3000] ^= 1;
        assert_eq!(
            check_verify(&torn, 8192, 7),
            Err(Mismatch::Body {
                at: 3000,
                len: 4099
            })
        );
        let mut tail = b.clone();
        *tail.last_mut().expect("non-empty") ^= 0x80;
        assert!(matches!(
            check_verify(&tail, 8192, 7),
            Err(Mismatch::Body { at: 4098, .. })
        ));
        let qemu_io = vec![0x42u8; 4096];
        assert_eq!(
            check_verify(&qemu_io, 0, 7),
            Err(Mismatch::Foreign {
                magic: 0x4242_4242_4242_4242
            })
        );
        let mut load = vec![0xEEu8; 4096];
        stamp_load(&mut load, 0, 1);
        assert_eq!(
            check_verify(&load, 0, 7),
            Err(Mismatch::LoadWrite { offset: 0 })
        );
        assert!(matches!(
            check_verify(&[0u8; 4096], 0, 7),
            Err(Mismatch::Foreign { magic: 0 })
        ));
    }

    #[test]
    fn patterns_differ_between_blocks_and_seeds() {
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill_verify(&mut a, 0, 1);
        fill_verify(&mut b, 512, 1);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
        fill_verify(&mut b, 0, 2);
        assert_ne!(a[HEADER_LEN..], b[HEADER_LEN..]);
    }

    #[test]
    fn rng_below_is_in_range_and_covers_it() {
        let mut r = Rng::new(42);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let v = r.below(10);
            assert!(v < 10);
            seen[v as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
