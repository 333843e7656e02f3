//! Response data of the non-I/O commands: INQUIRY (standard and VPD 0x00, 0x80, 0x83,
//! 0xB0, 0xB1, 0xB2), READ CAPACITY (10/16), REPORT LUNS, MODE SENSE (caching and
//! control pages) and MODE SELECT, GET LBA STATUS.
//!
//! Every builder returns the full data; the session sends at most the allocation
//! length ([`truncate`]) and reports the rest as residual underflow (SPC-5 §4.2.5.6).

use super::sense::Sense;
use super::Device;

/// Identity of a logical unit (SPC-5 VPD 0x80 and 0x83).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// T10 vendor identification, 8 ASCII bytes, space padded.
    pub vendor: [u8; 8],
    /// Product identification, 16 ASCII bytes, space padded.
    pub product: [u8; 16],
    /// Product revision level, 4 ASCII bytes.
    pub revision: [u8; 4],
    /// Unit serial number (VPD 0x80): printable ASCII, at most 64 bytes.
    pub serial: String,
    /// NAA IEEE Registered Extended designator (NAA 6, 16 bytes): the first nibble must
    /// be 6; persistent per volume, new when a volume is re-created.
    pub naa: [u8; 16],
}

impl Identity {
    /// Vendor `RINGBLK `, the product, and an NAA 6 designator holding the low 124 bits
    /// of `volume_id` after the NAA nibble. NAA 6 wants an IEEE company id (OUI) in the
    /// next 24 bits; ringblk has none registered, so those bits are part of the id too:
    /// unique per volume, not globally registered. The caller persists `volume_id` with
    /// the volume and draws a new one when a volume is re-created.
    pub fn new(product: &str, serial: &str, volume_id: u128) -> Identity {
        let mut p = [b' '; 16];
        for (d, s) in p.iter_mut().zip(
            product
                .bytes()
                .filter(|b| b.is_ascii_graphic() || *b == b' '),
        ) {
            *d = s;
        }
        let mut naa = volume_id.to_be_bytes();
        // NAA 6 in the top nibble; the rest is the id (its top nibble is lost).
        naa[0] = 0x60 | (naa[0] & 0x0f);
        Identity {
            vendor: *b"RINGBLK ",
            product: p,
            revision: *b"0001",
            serial: serial
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect(),
            naa,
        }
    }
}

/// At most `alloc_len` bytes of `data`.
pub fn truncate(mut data: Vec<u8>, alloc_len: usize) -> Vec<u8> {
    data.truncate(alloc_len);
    data
}

/// Standard INQUIRY data (SPC-5 §6.7.2): direct access block device, version SPC-4,
/// HiSup, response format 2, CmdQue, with version descriptors for SBC-4, iSCSI, SPC-4
/// and SBC-3.
pub fn inquiry_standard(id: &Identity) -> Vec<u8> {
    let mut d = vec![0u8; 66];
    d[0] = 0x00; // peripheral qualifier 0, device type 0 (direct access block)
                 // SPC-4 (0x06): libiscsi 1.19's conformance suite knows no later version and
                 // fails 0x07; the version descriptors still name SPC-5.
    d[2] = 0x06;
    d[3] = 0x12; // HiSup, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x00; // no TPGS (ALUA) yet
    d[7] = 0x02; // CmdQue
    d[8..16].copy_from_slice(&id.vendor);
    d[16..32].copy_from_slice(&id.product);
    d[32..36].copy_from_slice(&id.revision);
    // Version descriptors at 58: SBC-4 (0x0600), iSCSI (0x0960), SPC-4 (0x0460) and
    // SBC-3 (0x04c0): libiscsi 1.19 recognises SBC-3 and SPC-4 only, and fails a block
    // limits page of SBC-3's length from a device that does not claim SBC-3.
    for (i, v) in [0x0600u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// VPD pages we serve, in the order of page 0x00.
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn vpd(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// An INQUIRY VPD page; INVALID FIELD IN CDB for a page we do not serve.
pub fn inquiry_vpd(page: u8, id: &Identity, dev: &Device) -> Result<Vec<u8>, Sense> {
    match page {
        0x00 => Ok(vpd(0x00, &VPD_PAGES)),
        0x80 => Ok(vpd(0x80, id.serial.as_bytes())),
        0x83 => Ok(vpd(0x83, &device_identification(id))),
        0xb0 => Ok(vpd(0xb0, &block_limits(dev))),
        0xb1 => {
            let mut b = [0u8; 0x3c];
            b[1] = 0x01; // MEDIUM ROTATION RATE: non-rotating
            Ok(vpd(0xb1, &b))
        }
        0xb2 => {
            let mut b = [0u8; 4];
            if dev.thin {
                // LBPU (UNMAP), LBPWS (WRITE SAME(16) unmap), LBPWS10; LBPRZ: an unmapped
                // block reads zeros (the block layer's holes do).
                b[1] = 0x80 | 0x40 | 0x20 | 0x04;
                b[2] = 0x02; // provisioning type: thin
            }
            Ok(vpd(0xb2, &b))
        }
        _ => Err(Sense::INVALID_FIELD_IN_CDB),
    }
}

fn device_identification(id: &Identity) -> Vec<u8> {
    let mut b = Vec::new();
    // NAA designator, binary, associated with the logical unit.
    b.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
    b.extend_from_slice(&id.naa);
    // T10 vendor ID designator: vendor + serial (ASCII), for hosts that want one.
    let mut t10 = id.vendor.to_vec();
    t10.extend_from_slice(id.serial.as_bytes());
    b.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    b.extend_from_slice(&t10);
    b
}

fn block_limits(dev: &Device) -> [u8; 0x3c] {
    let mut b = [0u8; 0x3c];
    let bs = dev.block_size_bytes.max(1);
    b[0] = 0x01; // WSNZ: WRITE SAME with 0 blocks is refused
    b[1] = dev.max_compare_write_blocks;
    // OPTIMAL TRANSFER LENGTH GRANULARITY: one 4 KiB page.
    b[2..4].copy_from_slice(&((4096 / bs).max(1) as u16).to_be_bytes());
    b[4..8].copy_from_slice(&(dev.max_transfer_bytes / bs).to_be_bytes());
    b[8..12].copy_from_slice(&(dev.max_transfer_bytes / bs).to_be_bytes());
    if dev.thin {
        b[16..20].copy_from_slice(&dev.max_unmap_blocks.to_be_bytes());
        b[20..24].copy_from_slice(&dev.max_unmap_descriptors.to_be_bytes());
        b[24..28].copy_from_slice(&(4096 / bs).max(1).to_be_bytes());
    }
    b[32..40].copy_from_slice(&u64::from(dev.max_unmap_blocks).to_be_bytes());
    b
}

/// READ CAPACITY(10): last LBA (0xffffffff when it does not fit: use (16)) and block
/// length.
pub fn read_capacity10(dev: &Device) -> Vec<u8> {
    let last = dev.blocks().saturating_sub(1);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d.extend_from_slice(&dev.block_size_bytes.to_be_bytes());
    d
}

/// READ CAPACITY(16): last LBA, block length, LBPME/LBPRZ for thin devices.
pub fn read_capacity16(dev: &Device) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&dev.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&dev.block_size_bytes.to_be_bytes());
    // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT: 4 KiB physical.
    d[13] = match dev.block_size_bytes {
        512 => 3,
        _ => 0,
    };
    if dev.thin {
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ
    }
    d
}

/// REPORT LUNS for one LUN 0 (ringblk serves one LUN per target).
pub fn report_luns() -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[3] = 8; // LUN LIST LENGTH: one entry
    d
}

/// Mode page codes.
pub mod mode_page {
    pub const CACHING: u8 = 0x08;
    pub const CONTROL: u8 = 0x0a;
    pub const ALL: u8 = 0x3f;
}

fn caching_page(dev: &Device, changeable: bool) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[0] = mode_page::CACHING;
    p[1] = 0x12;
    // WCE is the one field a MODE SELECT may change.
    if changeable || dev.write_cache {
        p[2] = 0x04;
    }
    p
}

fn control_page(changeable: bool) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = mode_page::CONTROL;
    p[1] = 0x0a;
    if !changeable {
        // QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering), D_SENSE 0 (fixed sense).
        p[3] = 0x10;
        // BUSY TIMEOUT PERIOD: unlimited.
        p[8..10].copy_from_slice(&[0xff, 0xff]);
    }
    p
}

/// MODE SENSE (6 or 10) data: header, one short block descriptor unless `dbd`, then
/// the pages asked for. WP in the header for a read-only device; DPOFUA set.
pub fn mode_sense(
    dev: &Device,
    ten: bool,
    dbd: bool,
    pc: u8,
    page: u8,
    subpage: u8,
) -> Result<Vec<u8>, Sense> {
    // Saved values are not supported (SPC-5: SAVING PARAMETERS NOT SUPPORTED).
    if pc == 3 {
        return Err(Sense::SAVING_NOT_SUPPORTED);
    }
    if subpage != 0 && subpage != 0xff {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    let changeable = pc == 1;
    let mut pages = Vec::new();
    match page {
        mode_page::CACHING => pages.extend_from_slice(&caching_page(dev, changeable)),
        mode_page::CONTROL => pages.extend_from_slice(&control_page(changeable)),
        mode_page::ALL => {
            pages.extend_from_slice(&caching_page(dev, changeable));
            pages.extend_from_slice(&control_page(changeable));
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    }
    let mut desc = Vec::new();
    if !dbd {
        desc.extend_from_slice(
            &u32::try_from(dev.blocks())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        desc.extend_from_slice(&(dev.block_size_bytes & 0x00ff_ffff).to_be_bytes());
    }
    let dsp = if dev.read_only { 0x80 } else { 0 } | 0x10;
    let mut d = Vec::new();
    if ten {
        let len = (6 + desc.len() + pages.len()) as u16;
        d.extend_from_slice(&len.to_be_bytes());
        d.extend_from_slice(&[0, dsp, 0, 0]);
        d.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        d.extend_from_slice(&[
            (3 + desc.len() + pages.len()) as u8,
            0,
            dsp,
            desc.len() as u8,
        ]);
    }
    d.extend_from_slice(&desc);
    d.extend_from_slice(&pages);
    Ok(d)
}

/// What a MODE SELECT asks to change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeChange {
    /// New WCE from a caching page, if one was sent.
    pub write_cache: Option<bool>,
}

/// Parses MODE SELECT (6 or 10) parameters. The caching page may change WCE; the
/// control page is accepted when it changes nothing we refuse; any other page, or a
/// block descriptor with a different block size, is INVALID FIELD IN PARAMETER LIST.
pub fn mode_select(params: &[u8], ten: bool, dev: &Device) -> Result<ModeChange, Sense> {
    let hdr = if ten { 8 } else { 4 };
    if params.len() < hdr {
        return if params.is_empty() {
            Ok(ModeChange::default())
        } else {
            Err(Sense::PARAMETER_LIST_LENGTH)
        };
    }
    let desc_len = if ten {
        usize::from(u16::from_be_bytes([params[6], params[7]]))
    } else {
        usize::from(params[3])
    };
    let pages_at = hdr + desc_len;
    if pages_at > params.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    if desc_len >= 8 {
        let d = &params[hdr..hdr + 8];
        let bs = u32::from_be_bytes([0, d[5], d[6], d[7]]);
        if bs != dev.block_size_bytes {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
    }
    let mut change = ModeChange::default();
    let mut rest = &params[pages_at..];
    while !rest.is_empty() {
        if rest.len() < 2 || rest[0] & 0x40 != 0 {
            // Truncated page header, or a subpage format we do not implement.
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        let len = usize::from(rest[1]) + 2;
        if len > rest.len() {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let page = &rest[..len];
        match page[0] & 0x3f {
            mode_page::CACHING if len >= 3 => change.write_cache = Some(page[2] & 0x04 != 0),
            mode_page::CONTROL => {}
            _ => return Err(Sense::INVALID_FIELD_IN_PARAMETERS),
        }
        rest = &rest[len..];
    }
    Ok(change)
}

/// One GET LBA STATUS descriptor's provisioning status (SBC-4 §5.8.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    Mapped = 0,
    Deallocated = 1,
    Anchored = 2,
}

/// GET LBA STATUS data from byte extents (as the block layer's status reports them):
/// one descriptor per extent, in blocks, up to `max_descriptors`.
pub fn get_lba_status(
    dev: &Device,
    extents: &[(u64, u64, Provisioning)],
    max_descriptors: usize,
) -> Vec<u8> {
    let bs = u64::from(dev.block_size_bytes.max(1));
    let mut d = vec![0u8; 8];
    for &(offset, len, status) in extents.iter().take(max_descriptors) {
        let blocks = u32::try_from(len / bs).unwrap_or(u32::MAX);
        if blocks == 0 {
            continue;
        }
        d.extend_from_slice(&(offset / bs).to_be_bytes());
        d.extend_from_slice(&blocks.to_be_bytes());
        d.extend_from_slice(&[status as u8, 0, 0, 0]);
    }
    let param_len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&param_len.to_be_bytes());
    d
}

#[cfg(test)]
mod tests;
