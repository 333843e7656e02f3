//! Sense data (SPC-5 §4.4.3, fixed format) and the one mapping of the block layer's
//! [`BlockError`] to SCSI: [`sense_for`].

use ringblk_target::error::BlockError;

/// SCSI status codes (SAM-5).
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
}

/// Sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Length of fixed-format sense data as we build it.
pub const FIXED_SENSE_LEN: usize = 18;

/// One sense condition: key, additional sense code and qualifier, and optionally the
/// INFORMATION field (VALID bit set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub information: Option<u32>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
        }
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// ILLEGAL REQUEST / INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// ILLEGAL REQUEST / INVALID RELEASE OF PERSISTENT RESERVATION.
    pub const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    /// ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// DATA PROTECT / WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (SBC-4 thin provisioning).
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// MEDIUM ERROR / UNRECOVERED READ ERROR.
    pub const MEDIUM_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// NOT READY / LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const NOT_READY: Sense = Sense::new(key::NOT_READY, 0x04, 0x00);
    /// ABORTED COMMAND / INSUFFICIENT RESOURCES.
    pub const INSUFFICIENT_RESOURCES: Sense = Sense::new(key::ABORTED_COMMAND, 0x55, 0x03);
    /// UNIT ATTENTION / POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const RESET_OCCURRED: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    /// NO SENSE (REQUEST SENSE with nothing pending).
    pub const NONE: Sense = Sense::new(key::NO_SENSE, 0x00, 0x00);

    /// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION with the byte offset of the first
    /// difference in INFORMATION (SBC-4 §5.3: COMPARE AND WRITE reports the offset from
    /// the start of the Data-Out buffer).
    pub fn miscompare(offset: u64) -> Sense {
        Sense {
            information: Some(u32::try_from(offset).unwrap_or(u32::MAX)),
            ..Sense::new(key::MISCOMPARE, 0x1d, 0x00)
        }
    }

    /// Fixed-format sense data (response code 0x70, current error).
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70 | if self.information.is_some() { 0x80 } else { 0 };
        s[2] = self.key & 0x0f;
        s[3..7].copy_from_slice(&self.information.unwrap_or(0).to_be_bytes());
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// The data segment of an iSCSI SCSI Response carrying this sense (RFC 7143
    /// §11.4.7: SenseLength, then the sense data).
    pub fn to_iscsi_data(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(2 + FIXED_SENSE_LEN);
        v.extend_from_slice(&(FIXED_SENSE_LEN as u16).to_be_bytes());
        v.extend_from_slice(&self.to_fixed());
        v
    }

    /// Parses fixed-format sense data (for tests and for REQUEST SENSE round trips).
    pub fn from_fixed(s: &[u8]) -> Option<Sense> {
        if s.len() < 14 || s[0] & 0x7f != 0x70 {
            return None;
        }
        let info = u32::from_be_bytes([s[3], s[4], s[5], s[6]]);
        Some(Sense {
            key: s[2] & 0x0f,
            asc: s[12],
            ascq: s[13],
            information: (s[0] & 0x80 != 0).then_some(info),
        })
    }
}

/// The block layer's error as SCSI sense data: the only place where `BlockError`
/// becomes SCSI. Deliberately without a wildcard arm: a new variant fails the build
/// here until it is mapped.
pub fn sense_for(err: &BlockError) -> Sense {
    match *err {
        BlockError::Io => Sense::MEDIUM_ERROR,
        BlockError::NoSpace => Sense::SPACE_ALLOCATION_FAILED,
        BlockError::ReadOnly => Sense::WRITE_PROTECTED,
        BlockError::Invalid => Sense::INVALID_FIELD_IN_CDB,
        BlockError::OutOfRange => Sense::LBA_OUT_OF_RANGE,
        // The CDB asked for more than the block limits VPD page allows.
        BlockError::TooLarge => Sense::INVALID_FIELD_IN_CDB,
        // E.g. WRITE SAME with UNMAP where the volume cannot unmap.
        BlockError::NotSupported => Sense::INVALID_FIELD_IN_CDB,
        // Stopping: NOT READY makes initiators retry elsewhere (multipath) or later.
        BlockError::Shutdown => Sense::NOT_READY,
        // The volume is gone: this LUN no longer exists.
        BlockError::Removed => Sense::LUN_NOT_SUPPORTED,
        BlockError::NoMemory => Sense::INSUFFICIENT_RESOURCES,
        BlockError::Miscompare { offset } => Sense::miscompare(offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tgtd's UNIT ATTENTION from the CHAP capture: the fixed format's layout, known
    /// bytes (SenseLength 18, response code 0x70, key 6, additional length 10, ASC 0x29).
    #[test]
    fn fixed_format_matches_tgtd() {
        let tgtd: [u8; 20] = [
            0x00, 0x12, 0x70, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00,
            0x29, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        assert_eq!(Sense::RESET_OCCURRED.to_iscsi_data(), tgtd);
        assert_eq!(Sense::from_fixed(&tgtd[2..]), Some(Sense::RESET_OCCURRED));
    }

    /// Each error's key/ASC/ASCQ, as SBC-4/SPC-5 name them. Negative control: mapping
    /// NoSpace to WRITE PROTECTED (the old habit) fails here.
    #[test]
    fn block_errors_map_to_their_sense() {
        let cases = [
            (BlockError::Io, (key::MEDIUM_ERROR, 0x11, 0x00)),
            (BlockError::NoSpace, (key::DATA_PROTECT, 0x27, 0x07)),
            (BlockError::ReadOnly, (key::DATA_PROTECT, 0x27, 0x00)),
            (BlockError::Invalid, (key::ILLEGAL_REQUEST, 0x24, 0x00)),
            (BlockError::OutOfRange, (key::ILLEGAL_REQUEST, 0x21, 0x00)),
            (BlockError::TooLarge, (key::ILLEGAL_REQUEST, 0x24, 0x00)),
            (BlockError::NotSupported, (key::ILLEGAL_REQUEST, 0x24, 0x00)),
            (BlockError::Shutdown, (key::NOT_READY, 0x04, 0x00)),
            (BlockError::Removed, (key::ILLEGAL_REQUEST, 0x25, 0x00)),
            (BlockError::NoMemory, (key::ABORTED_COMMAND, 0x55, 0x03)),
        ];
        for (err, (k, asc, ascq)) in cases {
            let s = sense_for(&err);
            assert_eq!(
                (s.key, s.asc, s.ascq, s.information),
                (k, asc, ascq, None),
                "{err:?}"
            );
        }
        let s = sense_for(&BlockError::Miscompare { offset: 4097 }).to_fixed();
        assert_eq!(s[0], 0xf0, "VALID bit with the offset");
        assert_eq!(s[2], key::MISCOMPARE);
        assert_eq!(&s[3..7], &4097u32.to_be_bytes());
        assert_eq!((s[12], s[13]), (0x1d, 0x00));
    }
}
