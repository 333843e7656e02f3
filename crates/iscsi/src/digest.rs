//! CRC32C (Castagnoli) digests of iSCSI headers and data segments (RFC 7143 §11.1.1,
//! test vectors in RFC 3720 appendix B.4).
//!
//! The `crc32c` crate computes the standard reflected CRC-32C (initial value and final
//! XOR `0xffff_ffff`), which is what iSCSI uses. On the wire the 32-bit result is sent
//! least significant byte first: RFC 3720 B.4 lists the digest of 32 zero bytes as the
//! bytes `aa 36 91 8a`, i.e. `0x8a9136aa.to_le_bytes()`. Getting this byte order wrong
//! is the classic interoperability bug, so it lives in one place: [`to_wire`]/[`from_wire`].

/// Length of a digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// CRC32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C of the concatenation of what `crc` covered and `data`: digests computed
/// piecewise as bytes arrive equal the digest of the whole.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The digest's four wire bytes.
pub const fn to_wire(crc: u32) -> [u8; DIGEST_LEN] {
    crc.to_le_bytes()
}

/// The digest value of four wire bytes.
pub const fn from_wire(bytes: [u8; DIGEST_LEN]) -> u32 {
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SCSI READ(10) command PDU of RFC 3720 B.4 (also a known-bytes fixture for the
    /// PDU decoder: ITT 0x14000000, EDTL 1024, CmdSN 0x14, ExpStatSN 0x18, READ(10) of
    /// 2 blocks at LBA 0).
    pub(crate) const RFC3720_READ10_PDU: [u8; 48] = [
        0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00,
        0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00,
    ];

    /// RFC 3720 B.4, every vector, compared in wire byte order. Negative control: changing
    /// `to_wire` to big-endian (or any vector byte) fails every line (tried).
    #[test]
    fn rfc3720_b4_vectors() {
        let ascending: Vec<u8> = (0u8..32).collect();
        let descending: Vec<u8> = (0u8..32).rev().collect();
        let cases: [(&[u8], [u8; 4]); 5] = [
            (&[0u8; 32], [0xaa, 0x36, 0x91, 0x8a]),
            (&[0xffu8; 32], [0x43, 0xab, 0xa8, 0x62]),
            (&ascending, [0x4e, 0x79, 0xdd, 0x46]),
            (&descending, [0x5c, 0xdb, 0x3f, 0x11]),
            (&RFC3720_READ10_PDU, [0x56, 0x3a, 0x96, 0xd9]),
        ];
        for (data, wire) in cases {
            assert_eq!(to_wire(crc32c(data)), wire, "{data:02x?}");
            assert_eq!(from_wire(wire), crc32c(data));
        }
    }

    #[test]
    fn append_equals_whole() {
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for split in [0, 1, 3, 48, 999, 1000] {
            let (a, b) = data.split_at(split);
            assert_eq!(crc32c_append(crc32c(a), b), crc32c(&data));
        }
    }
}
