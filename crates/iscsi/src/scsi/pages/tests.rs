use super::*;
use crate::testutil;

fn dev() -> Device {
    Device::with_capacity(64 << 20, 512)
}

fn id() -> Identity {
    Identity::new(
        "VOLUME",
        "vol0-1a2b3c",
        0x0123_4567_89ab_cdef_0011_2233_4455_6677,
    )
}

/// tgtd's READ CAPACITY(16) answer for the same 64 MiB, 512-byte-block, thick LU:
/// ours is byte-identical (and sets LBPME/LBPRZ only when thin). Negative control: the
/// thin device differs exactly in byte 14.
#[test]
fn read_capacity16_matches_tgtd() {
    let tgt = testutil::split(testutil::READCAP16_T2I)
        .into_iter()
        .rev()
        .find(|p| matches!(p.bhs, crate::pdu::Bhs::DataIn(_)))
        .map(|p| p.data)
        .unwrap_or_default();
    let thick = Device {
        thin: false,
        ..dev()
    };
    assert_eq!(read_capacity16(&thick), tgt);
    let thin = read_capacity16(&dev());
    assert_eq!(thin[14], 0xc0);
    assert_eq!(&thin[..14], &tgt[..14]);
    assert_eq!(read_capacity10(&dev()), [0, 1, 0xff, 0xff, 0, 0, 2, 0]);
    let huge = Device::with_capacity(1 << 45, 512);
    assert_eq!(&read_capacity10(&huge)[..4], &[0xff; 4]);
}

#[test]
fn inquiry_pages() {
    let std = inquiry_standard(&id());
    assert_eq!(usize::from(std[4]) + 5, std.len());
    assert_eq!(&std[8..16], b"RINGBLK ");
    assert_eq!(&std[16..32], b"VOLUME          ");
    assert_eq!(std[7] & 0x02, 0x02, "CmdQue");
    let p0 = inquiry_vpd(0, &id(), &dev()).unwrap_or_default();
    assert_eq!(&p0[4..], &VPD_PAGES);
    for page in VPD_PAGES {
        let p = inquiry_vpd(page, &id(), &dev()).unwrap_or_default();
        assert_eq!(p[1], page);
        assert_eq!(
            usize::from(u16::from_be_bytes([p[2], p[3]])) + 4,
            p.len(),
            "page {page:#x}"
        );
    }
    let p83 = inquiry_vpd(0x83, &id(), &dev()).unwrap_or_default();
    // NAA designator first: binary code set, LU association, type 3 (NAA), NAA 6.
    assert_eq!(&p83[4..8], &[0x01, 0x03, 0x00, 16]);
    assert_eq!(p83[8] >> 4, 6);
    let p80 = inquiry_vpd(0x80, &id(), &dev()).unwrap_or_default();
    assert_eq!(&p80[4..], b"vol0-1a2b3c");
    let b0 = inquiry_vpd(0xb0, &id(), &dev()).unwrap_or_default();
    assert_eq!(b0.len(), 0x40);
    assert_eq!(
        u32::from_be_bytes([b0[8], b0[9], b0[10], b0[11]]),
        2048,
        "max transfer blocks"
    );
    let b2 = inquiry_vpd(0xb2, &id(), &dev()).unwrap_or_default();
    assert_eq!(b2[5] & 0x80, 0x80, "LBPU");
    assert_eq!(
        inquiry_vpd(0x99, &id(), &dev()),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
}

#[test]
fn mode_sense_and_select() {
    let ro = Device {
        read_only: true,
        ..dev()
    };
    let m6 = mode_sense(&ro, false, false, 0, mode_page::ALL, 0).unwrap_or_default();
    assert_eq!(usize::from(m6[0]) + 1, m6.len());
    assert_eq!(m6[2] & 0x80, 0x80, "WP on a read-only device");
    assert_eq!(m6[3], 8, "one block descriptor");
    assert_eq!(m6[4 + 8], mode_page::CACHING);
    assert_eq!(m6[4 + 8 + 2] & 0x04, 0x04, "WCE");
    let m10 = mode_sense(&dev(), true, true, 0, mode_page::CONTROL, 0).unwrap_or_default();
    assert_eq!(
        usize::from(u16::from_be_bytes([m10[0], m10[1]])) + 2,
        m10.len()
    );
    assert_eq!(m10[3] & 0x80, 0);
    assert_eq!(m10[8], mode_page::CONTROL);
    assert_eq!(
        mode_sense(&dev(), false, false, 3, 8, 0),
        Err(Sense::SAVING_NOT_SUPPORTED)
    );
    assert_eq!(
        mode_sense(&dev(), false, false, 0, 0x1c, 0),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
    // MODE SELECT(6) turning WCE off: header, no descriptor, caching page.
    let mut sel = vec![0, 0, 0, 0];
    let mut page = caching_page(&dev(), false).to_vec();
    page[2] = 0;
    sel.extend_from_slice(&page);
    assert_eq!(
        mode_select(&sel, false, &dev()),
        Ok(ModeChange {
            write_cache: Some(false)
        })
    );
    sel[4] = 0x1c;
    assert_eq!(
        mode_select(&sel, false, &dev()),
        Err(Sense::INVALID_FIELD_IN_PARAMETERS)
    );
    assert_eq!(
        mode_select(&[0, 0], false, &dev()),
        Err(Sense::PARAMETER_LIST_LENGTH)
    );
}

#[test]
fn report_luns_and_lba_status() {
    assert_eq!(
        report_luns(),
        [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let d = get_lba_status(
        &dev(),
        &[
            (0, 4096, Provisioning::Mapped),
            (4096, 1 << 20, Provisioning::Deallocated),
        ],
        16,
    );
    assert_eq!(d.len(), 8 + 32);
    assert_eq!(&d[0..4], &36u32.to_be_bytes());
    assert_eq!(&d[8..16], &0u64.to_be_bytes());
    assert_eq!(&d[16..20], &8u32.to_be_bytes());
    assert_eq!(d[20], 0);
    assert_eq!(&d[24..32], &8u64.to_be_bytes());
    assert_eq!(d[36], 1);
    assert_eq!(truncate(d, 4).len(), 4);
}
