//! SCSI block commands, sans-IO: CDB decoding for the SBC-4/SPC-5 subset of issue #14
//! into a protocol-neutral [`ScsiRequest`] (offsets and lengths in bytes, checked
//! against the device), response data builders ([`pages`]), sense data and the mapping
//! of the block layer's errors ([`sense`]), and persistent reservations ([`pr`]).
//!
//! # Contract
//! [`decode`] never trusts the CDB: every LBA and length is checked with
//! `checked_mul`/`checked_add` against the capacity and the transfer limit before it
//! becomes a byte range, so a [`ScsiRequest`]'s ranges are within the device. A refused
//! CDB is a [`Sense`] for a CHECK CONDITION. Commands that move data out
//! (WRITE, UNMAP, MODE SELECT, PR OUT, COMPARE AND WRITE) say how many bytes they expect
//! ([`ScsiRequest::data_out_len`]); the session checks that against the iSCSI
//! Expected Data Transfer Length and collects the data before acting.
//!
//! # Choices
//! - A transfer length of 0 in READ/WRITE(10/12/16) and VERIFY is a no-op (SBC-4);
//!   in READ/WRITE(6) it means 256 blocks.
//! - WRITE AND VERIFY becomes a `Write` with `fua`: the block layer has no read-back
//!   and a durable write is what the verification is for.
//! - WRITE SAME with 0 blocks is refused (we report WSNZ=1 in the block limits page).
//! - DPO is accepted and ignored (a cache hint); FUA is passed on.
//! - Writes of any kind on a read-only device are DATA PROTECT / WRITE PROTECTED at
//!   decode time, before any data is transferred.

pub mod pages;
pub mod pr;
pub mod sense;

pub use sense::{sense_for, Sense};

/// Operation codes.
pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    /// SERVICE ACTION IN(16): READ CAPACITY(16) (0x10), GET LBA STATUS (0x12).
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
}

/// What the decoder needs to know about the logical unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Logical block size (512 or 4096).
    pub block_size_bytes: u32,
    /// Capacity in bytes (a multiple of the block size; a partial last block is not
    /// addressable).
    pub capacity_bytes: u64,
    pub read_only: bool,
    /// Unmap/WRITE SAME with UNMAP supported (thin provisioning, LBPME).
    pub thin: bool,
    /// Volatile write cache (WCE in the caching mode page).
    pub write_cache: bool,
    /// Largest READ/WRITE in bytes (MAXIMUM TRANSFER LENGTH of the block limits page).
    pub max_transfer_bytes: u32,
    /// Largest UNMAP or WRITE SAME range in blocks.
    pub max_unmap_blocks: u32,
    /// Most UNMAP block descriptors in one command.
    pub max_unmap_descriptors: u32,
    /// Largest COMPARE AND WRITE in blocks (at most 255).
    pub max_compare_write_blocks: u8,
}

impl Device {
    /// Addressable blocks.
    pub fn blocks(&self) -> u64 {
        self.capacity_bytes / u64::from(self.block_size_bytes.max(1))
    }

    /// A writable thin device with write cache and the limits ringblk uses: 1 MiB
    /// transfers, unmaps up to 4 GiB and 256 descriptors, COMPARE AND WRITE up to 128
    /// blocks.
    pub fn with_capacity(capacity_bytes: u64, block_size_bytes: u32) -> Device {
        Device {
            block_size_bytes,
            capacity_bytes,
            read_only: false,
            thin: true,
            write_cache: true,
            max_transfer_bytes: 1 << 20,
            max_unmap_blocks: u32::MAX / block_size_bytes.max(1),
            max_unmap_descriptors: 256,
            max_compare_write_blocks: 128,
        }
    }
}

/// A decoded SCSI command, protocol-neutral. Byte ranges are within the device.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScsiRequest {
    TestUnitReady,
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    ReportLuns {
        select_report: u8,
        alloc_len: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc_len: u32,
    },
    Read {
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
    },
    /// WRITE, and WRITE AND VERIFY (with `fua`).
    Write {
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
    },
    /// VERIFY: with `compare` (BYTCHK=1) the Data-Out must equal the medium; without, the
    /// range must be readable.
    Verify {
        offset_bytes: u64,
        len_bytes: u32,
        compare: bool,
    },
    /// SYNCHRONIZE CACHE: a flush (the range is advisory; the block layer flushes all).
    SynchronizeCache {
        immed: bool,
    },
    /// UNMAP: its parameter list of `param_len` bytes follows; parse it with
    /// [`parse_unmap`].
    Unmap {
        param_len: u16,
    },
    /// WRITE SAME: one block of data out (unless `ndob`) repeated over the range;
    /// with `unmap` the range may be deallocated when the block is zeros.
    WriteSame {
        offset_bytes: u64,
        len_bytes: u64,
        unmap: bool,
        ndob: bool,
    },
    /// COMPARE AND WRITE: `2 * len_bytes` of data out, compare half then write half.
    CompareAndWrite {
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
    },
    GetLbaStatus {
        offset_bytes: u64,
        alloc_len: u32,
    },
    ModeSense {
        ten: bool,
        dbd: bool,
        /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
        pc: u8,
        page: u8,
        subpage: u8,
        alloc_len: u16,
    },
    ModeSelect {
        ten: bool,
        param_len: u16,
    },
    RequestSense {
        alloc_len: u8,
    },
    StartStopUnit {
        start: bool,
        immed: bool,
    },
    /// RESERVE(6)/(10) (SPC-2 reservations).
    Reserve,
    /// RELEASE(6)/(10).
    Release,
    PersistentReserveIn {
        action: u8,
        alloc_len: u16,
    },
    PersistentReserveOut {
        action: u8,
        scope: u8,
        pr_type: u8,
        param_len: u32,
    },
}

impl ScsiRequest {
    /// Bytes of Data-Out this command takes (0 when none).
    pub fn data_out_len(&self, dev: &Device) -> u64 {
        match *self {
            ScsiRequest::Write { len_bytes, .. } => u64::from(len_bytes),
            ScsiRequest::Verify {
                len_bytes,
                compare: true,
                ..
            } => u64::from(len_bytes),
            ScsiRequest::Unmap { param_len } => u64::from(param_len),
            ScsiRequest::WriteSame { ndob: false, .. } => u64::from(dev.block_size_bytes),
            ScsiRequest::CompareAndWrite { len_bytes, .. } => 2 * u64::from(len_bytes),
            ScsiRequest::ModeSelect { param_len, .. } => u64::from(param_len),
            ScsiRequest::PersistentReserveOut { param_len, .. } => u64::from(param_len),
            _ => 0,
        }
    }

    /// Whether the command modifies the medium (refused on a read-only device, and by
    /// write-exclusive reservations).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            ScsiRequest::Write { .. }
                | ScsiRequest::Unmap { .. }
                | ScsiRequest::WriteSame { .. }
                | ScsiRequest::CompareAndWrite { .. }
        )
    }
}

fn be16(c: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([c[at], c[at + 1]])
}
fn be32(c: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]])
}
fn be64(c: &[u8], at: usize) -> u64 {
    (u64::from(be32(c, at)) << 32) | u64::from(be32(c, at + 4))
}

/// The CDB length its group code implies (SPC-5 §4.2.5.1); `None` for groups without
/// a fixed length (variable-length CDBs, reserved groups).
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// `lba` and `blocks` as a byte range, checked against the device: LBA OUT OF RANGE when
/// it ends past the capacity (or overflows), INVALID FIELD IN CDB when it is longer than
/// `max_bytes`.
pub fn byte_range(
    dev: &Device,
    lba: u64,
    blocks: u64,
    max_bytes: u64,
) -> Result<(u64, u64), Sense> {
    let end = lba.checked_add(blocks).ok_or(Sense::LBA_OUT_OF_RANGE)?;
    if end > dev.blocks() {
        return Err(Sense::LBA_OUT_OF_RANGE);
    }
    let bs = u64::from(dev.block_size_bytes);
    // Cannot overflow: end <= blocks() = capacity / bs, so lba * bs <= capacity.
    let offset = lba.checked_mul(bs).ok_or(Sense::LBA_OUT_OF_RANGE)?;
    let len = blocks.checked_mul(bs).ok_or(Sense::LBA_OUT_OF_RANGE)?;
    if len > max_bytes {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    Ok((offset, len))
}

fn rw_range(dev: &Device, lba: u64, blocks: u64) -> Result<(u64, u32), Sense> {
    let (off, len) = byte_range(dev, lba, blocks, u64::from(dev.max_transfer_bytes))?;
    // max_transfer_bytes is a u32, so len fits.
    Ok((
        off,
        u32::try_from(len).map_err(|_| Sense::INVALID_FIELD_IN_CDB)?,
    ))
}

fn write_allowed(dev: &Device) -> Result<(), Sense> {
    if dev.read_only {
        return Err(Sense::WRITE_PROTECTED);
    }
    Ok(())
}

/// Decodes a CDB (the BHS's 16 bytes plus any extended CDB; trailing bytes past the
/// opcode's length are ignored).
pub fn decode(cdb: &[u8], dev: &Device) -> Result<ScsiRequest, Sense> {
    let Some(&opcode) = cdb.first() else {
        return Err(Sense::INVALID_OPCODE);
    };
    let need = cdb_len(opcode).ok_or(Sense::INVALID_OPCODE)?;
    if cdb.len() < need {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let c = &cdb[..need];
    // RDPROTECT/WRPROTECT/VRPROTECT: no protection information here, so a non-zero
    // field is refused (SBC-4 §5.x tables "... with no PI": INVALID FIELD IN CDB).
    let protect_field = matches!(
        opcode,
        op::READ_10
            | op::READ_12
            | op::READ_16
            | op::WRITE_10
            | op::WRITE_12
            | op::WRITE_16
            | op::WRITE_AND_VERIFY_10
            | op::WRITE_AND_VERIFY_12
            | op::WRITE_AND_VERIFY_16
            | op::VERIFY_10
            | op::VERIFY_12
            | op::VERIFY_16
            | op::WRITE_SAME_10
            | op::WRITE_SAME_16
            | op::COMPARE_AND_WRITE
    );
    if protect_field && c[1] & 0xe0 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    match opcode {
        op::TEST_UNIT_READY => Ok(ScsiRequest::TestUnitReady),
        op::REQUEST_SENSE => Ok(ScsiRequest::RequestSense { alloc_len: c[4] }),
        op::INQUIRY => {
            let evpd = c[1] & 1 != 0;
            // A page code without EVPD is an error (SPC-5 §6.7.1).
            if !evpd && c[2] != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Ok(ScsiRequest::Inquiry {
                evpd,
                page: c[2],
                alloc_len: be16(c, 3),
            })
        }
        op::REPORT_LUNS => Ok(ScsiRequest::ReportLuns {
            select_report: c[2],
            alloc_len: be32(c, 6),
        }),
        op::READ_CAPACITY_10 => Ok(ScsiRequest::ReadCapacity10),
        op::SERVICE_ACTION_IN_16 => match c[1] & 0x1f {
            0x10 => Ok(ScsiRequest::ReadCapacity16 {
                alloc_len: be32(c, 10),
            }),
            0x12 => {
                let lba = be64(c, 2);
                if lba >= dev.blocks() {
                    return Err(Sense::LBA_OUT_OF_RANGE);
                }
                Ok(ScsiRequest::GetLbaStatus {
                    offset_bytes: lba * u64::from(dev.block_size_bytes),
                    alloc_len: be32(c, 10),
                })
            }
            _ => Err(Sense::INVALID_FIELD_IN_CDB),
        },
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be32(c, 0) & 0x001f_ffff);
            let blocks = match c[4] {
                0 => 256,
                n => u64::from(n),
            };
            rw(opcode == op::WRITE_6, dev, lba, blocks, false)
        }
        op::READ_10 | op::WRITE_10 | op::WRITE_AND_VERIFY_10 => {
            let fua = c[1] & 0x08 != 0 || opcode == op::WRITE_AND_VERIFY_10;
            rw(
                opcode != op::READ_10,
                dev,
                u64::from(be32(c, 2)),
                u64::from(be16(c, 7)),
                fua,
            )
        }
        op::READ_12 | op::WRITE_12 | op::WRITE_AND_VERIFY_12 => {
            let fua = c[1] & 0x08 != 0 || opcode == op::WRITE_AND_VERIFY_12;
            rw(
                opcode != op::READ_12,
                dev,
                u64::from(be32(c, 2)),
                u64::from(be32(c, 6)),
                fua,
            )
        }
        op::READ_16 | op::WRITE_16 | op::WRITE_AND_VERIFY_16 => {
            let fua = c[1] & 0x08 != 0 || opcode == op::WRITE_AND_VERIFY_16;
            rw(
                opcode != op::READ_16,
                dev,
                be64(c, 2),
                u64::from(be32(c, 10)),
                fua,
            )
        }
        op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => {
            let (lba, blocks) = match opcode {
                op::VERIFY_10 => (u64::from(be32(c, 2)), u64::from(be16(c, 7))),
                op::VERIFY_12 => (u64::from(be32(c, 2)), u64::from(be32(c, 6))),
                _ => (be64(c, 2), u64::from(be32(c, 10))),
            };
            // BYTCHK: 0 medium check only, 1 compare with Data-Out; 2 (unspecified in
            // SBC-4) and 3 (compare one block repeatedly) are not supported.
            let compare = match (c[1] >> 1) & 3 {
                0 => false,
                1 => true,
                _ => return Err(Sense::INVALID_FIELD_IN_CDB),
            };
            let (offset_bytes, len_bytes) = rw_range(dev, lba, blocks)?;
            Ok(ScsiRequest::Verify {
                offset_bytes,
                len_bytes,
                compare,
            })
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = if opcode == op::SYNCHRONIZE_CACHE_10 {
                (u64::from(be32(c, 2)), u64::from(be16(c, 7)))
            } else {
                (be64(c, 2), u64::from(be32(c, 10)))
            };
            // The range only has to be valid; 0 blocks means "to the end".
            byte_range(dev, lba, blocks, u64::MAX)?;
            Ok(ScsiRequest::SynchronizeCache {
                immed: c[1] & 0x02 != 0,
            })
        }
        op::UNMAP => {
            write_allowed(dev)?;
            if !dev.thin {
                return Err(Sense::INVALID_OPCODE);
            }
            // ANCHOR is not supported (we report ANC_SUP=0).
            if c[1] & 1 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Ok(ScsiRequest::Unmap {
                param_len: be16(c, 7),
            })
        }
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => {
            write_allowed(dev)?;
            let (lba, blocks) = if opcode == op::WRITE_SAME_10 {
                (u64::from(be32(c, 2)), u64::from(be16(c, 7)))
            } else {
                (be64(c, 2), u64::from(be32(c, 10)))
            };
            let unmap = c[1] & 0x08 != 0;
            let anchor = c[1] & 0x10 != 0;
            let ndob = opcode == op::WRITE_SAME_16 && c[1] & 0x01 != 0;
            if anchor || (unmap && !dev.thin) || blocks == 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let max = u64::from(dev.max_unmap_blocks) * u64::from(dev.block_size_bytes);
            let (offset_bytes, len_bytes) = byte_range(dev, lba, blocks, max)?;
            Ok(ScsiRequest::WriteSame {
                offset_bytes,
                len_bytes,
                unmap,
                ndob,
            })
        }
        op::COMPARE_AND_WRITE => {
            write_allowed(dev)?;
            let blocks = u64::from(c[13]);
            if blocks > u64::from(dev.max_compare_write_blocks) {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let (offset_bytes, len_bytes) = rw_range(dev, be64(c, 2), blocks)?;
            Ok(ScsiRequest::CompareAndWrite {
                offset_bytes,
                len_bytes,
                fua: c[1] & 0x08 != 0,
            })
        }
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
            let ten = opcode == op::MODE_SENSE_10;
            Ok(ScsiRequest::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3f,
                subpage: c[3],
                alloc_len: if ten { be16(c, 7) } else { u16::from(c[4]) },
            })
        }
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => {
            let ten = opcode == op::MODE_SELECT_10;
            // SP (save pages) asks for persistence we do not offer.
            if c[1] & 0x01 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Ok(ScsiRequest::ModeSelect {
                ten,
                param_len: if ten { be16(c, 7) } else { u16::from(c[4]) },
            })
        }
        op::START_STOP_UNIT => Ok(ScsiRequest::StartStopUnit {
            start: c[4] & 0x01 != 0,
            immed: c[1] & 0x01 != 0,
        }),
        op::RESERVE_6 | op::RESERVE_10 => Ok(ScsiRequest::Reserve),
        op::RELEASE_6 | op::RELEASE_10 => Ok(ScsiRequest::Release),
        op::PERSISTENT_RESERVE_IN => Ok(ScsiRequest::PersistentReserveIn {
            action: c[1] & 0x1f,
            alloc_len: be16(c, 7),
        }),
        op::PERSISTENT_RESERVE_OUT => Ok(ScsiRequest::PersistentReserveOut {
            action: c[1] & 0x1f,
            scope: c[2] >> 4,
            pr_type: c[2] & 0x0f,
            param_len: be32(c, 5),
        }),
        _ => Err(Sense::INVALID_OPCODE),
    }
}

fn rw(write: bool, dev: &Device, lba: u64, blocks: u64, fua: bool) -> Result<ScsiRequest, Sense> {
    if write {
        write_allowed(dev)?;
    }
    let (offset_bytes, len_bytes) = rw_range(dev, lba, blocks)?;
    Ok(if write {
        ScsiRequest::Write {
            offset_bytes,
            len_bytes,
            fua,
        }
    } else {
        ScsiRequest::Read {
            offset_bytes,
            len_bytes,
            fua,
        }
    })
}

/// One range of an UNMAP parameter list, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

/// Parses an UNMAP parameter list (SBC-4 §5.32.2): an 8-byte header and 16-byte
/// descriptors (LBA, block count). Every descriptor is checked against the device and
/// the limits; zero-length descriptors are dropped (they are valid no-ops).
pub fn parse_unmap(params: &[u8], dev: &Device) -> Result<Vec<UnmapRange>, Sense> {
    if params.is_empty() {
        return Ok(Vec::new());
    }
    if params.len() < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let data_len = usize::from(be16(params, 0));
    let desc_len = usize::from(be16(params, 2));
    if data_len + 2 > params.len() || desc_len + 8 > params.len() || desc_len % 16 != 0 {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let count = desc_len / 16;
    if count > dev.max_unmap_descriptors as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
    }
    let max = u64::from(dev.max_unmap_blocks) * u64::from(dev.block_size_bytes);
    let mut out = Vec::with_capacity(count);
    for d in params[8..8 + desc_len].chunks_exact(16) {
        let (lba, blocks) = (be64(d, 0), u64::from(be32(d, 8)));
        if blocks == 0 {
            continue;
        }
        let (offset_bytes, len_bytes) = byte_range(dev, lba, blocks, max)?;
        out.push(UnmapRange {
            offset_bytes,
            len_bytes,
        });
    }
    Ok(out)
}

/// The LUN a 64-bit iSCSI LUN field addresses, for single-level peripheral (0x00) and
/// flat (0x40) addressing (SAM-5 §4.7); `None` for other formats.
pub fn lun_index(lun: u64) -> Option<u16> {
    let first = (lun >> 48) as u16;
    if lun & 0x0000_ffff_ffff_ffff != 0 {
        return None;
    }
    match first >> 14 {
        0 if first >> 8 == 0 => Some(first & 0xff),
        1 => Some(first & 0x3fff),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
