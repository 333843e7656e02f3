use super::*;
use crate::pdu::Bhs;
use crate::testutil;
use proptest::prelude::*;

fn dev() -> Device {
    Device::with_capacity(64 << 20, 512)
}

fn cdbs_of(stream: &[u8]) -> Vec<Vec<u8>> {
    testutil::split(stream)
        .iter()
        .filter_map(|p| p.cdb().ok().flatten())
        .collect()
}

/// CDBs libiscsi sent (TEST UNIT READY, INQUIRY, READ CAPACITY(16)) decode as they should.
#[test]
fn captured_cdbs() {
    let inq = cdbs_of(testutil::INQ_I2T);
    assert_eq!(decode(&inq[0], &dev()), Ok(ScsiRequest::TestUnitReady));
    assert_eq!(
        decode(&inq[2], &dev()),
        Ok(ScsiRequest::Inquiry {
            evpd: false,
            page: 0,
            alloc_len: 64
        })
    );
    let rc = cdbs_of(testutil::READCAP16_I2T);
    assert_eq!(
        decode(&rc[2], &dev()),
        Ok(ScsiRequest::ReadCapacity16 { alloc_len: 32 })
    );
}

/// Every CDB of a part of libiscsi's conformance suite (persistent reservations,
/// RESERVE(6), MODE SENSE, INQUIRY, READ CAPACITY(16), TEST UNIT READY, START STOP
/// UNIT, with their reads and writes) decodes: the opcodes we implement are never
/// INVALID OPCODE, and the PR OUT parameter lists parse. REPORT SUPPORTED OPERATION
/// CODES (0xa3) is not implemented yet and is the only opcode refused.
#[test]
fn libiscsi_test_cu_cdbs() {
    let tgt_lu = Device::with_capacity(64 << 20, 512);
    let mut seen = std::collections::BTreeSet::new();
    let mut prout = 0;
    for pdu in testutil::split(testutil::TEST_CU_I2T) {
        let Ok(Some(cdb)) = pdu.cdb() else { continue };
        seen.insert(cdb[0]);
        match decode(&cdb, &tgt_lu) {
            Err(s) if s == Sense::INVALID_OPCODE => assert_eq!(cdb[0], 0xa3, "{cdb:02x?}"),
            Err(s) => {
                // Deliberately bad CDBs of the suite (reserved page codes, out of range
                // LBAs) are refused with ILLEGAL REQUEST; nothing else is.
                assert_eq!(s.key, sense::key::ILLEGAL_REQUEST, "{cdb:02x?}: {s:?}");
            }
            Ok(ScsiRequest::PersistentReserveOut {
                action,
                scope,
                pr_type,
                ..
            }) => {
                // libiscsi sends the 24-byte parameter list as immediate data.
                if pdu.data.len() == 24 {
                    let mut r = pr::Reservations::new();
                    let _ = r.reserve_out("nexus", action, scope, pr_type, &pdu.data);
                    prout += 1;
                }
            }
            Ok(_) => {}
        }
    }
    assert!(prout > 50, "only {prout} PR OUT lists");
    for op in [
        0x00, 0x12, 0x1a, 0x16, 0x17, 0x25, 0x28, 0x2a, 0x5e, 0x5f, 0x9e,
    ] {
        assert!(seen.contains(&op), "the capture lacks opcode {op:#04x}");
    }
}

/// RFC 3720 B.4's READ(10): 2 blocks at LBA 0 is bytes 0..1024.
#[test]
fn rfc3720_read10() {
    let pdu = crate::pdu::Pdu::new(
        Bhs::decode(&[
            0x01, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 4, 0, 0, 0,
            0, 0x14, 0, 0, 0, 0x18, 0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0,
        ]),
        vec![],
    );
    let cdb = pdu.cdb().ok().flatten().unwrap_or_default();
    assert_eq!(
        decode(&cdb, &dev()),
        Ok(ScsiRequest::Read {
            offset_bytes: 0,
            len_bytes: 1024,
            fua: false
        })
    );
}

fn cdb16(opcode: u8, flags: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = opcode;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn cdb10(opcode: u8, flags: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = opcode;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn read_write_ranges() {
    let d = dev();
    let last = d.blocks() - 1;
    assert_eq!(
        decode(&cdb16(op::WRITE_16, 0x08, last, 1), &d),
        Ok(ScsiRequest::Write {
            offset_bytes: last * 512,
            len_bytes: 512,
            fua: true
        })
    );
    // One block past the end; an LBA that overflows when the length is added.
    assert_eq!(
        decode(&cdb16(op::READ_16, 0, last, 2), &d),
        Err(Sense::LBA_OUT_OF_RANGE)
    );
    assert_eq!(
        decode(&cdb16(op::READ_16, 0, u64::MAX, 2), &d),
        Err(Sense::LBA_OUT_OF_RANGE)
    );
    // Longer than the transfer limit.
    assert_eq!(
        decode(&cdb16(op::READ_16, 0, 0, 4096), &d),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
    // READ(6) with 0 blocks means 256; READ(10) with 0 is a no-op.
    assert_eq!(
        decode(&[op::READ_6, 0, 0, 1, 0, 0], &d),
        Ok(ScsiRequest::Read {
            offset_bytes: 512,
            len_bytes: 256 * 512,
            fua: false
        })
    );
    assert_eq!(
        decode(&cdb10(op::READ_10, 0, 5, 0), &d),
        Ok(ScsiRequest::Read {
            offset_bytes: 2560,
            len_bytes: 0,
            fua: false
        })
    );
    assert_eq!(
        decode(&cdb10(op::WRITE_AND_VERIFY_10, 0, 1, 1), &d),
        Ok(ScsiRequest::Write {
            offset_bytes: 512,
            len_bytes: 512,
            fua: true
        })
    );
    // Read-only: every writing command is WRITE PROTECTED, reads still work.
    let ro = Device {
        read_only: true,
        ..dev()
    };
    for c in [
        cdb16(op::WRITE_16, 0, 0, 1),
        cdb10(op::WRITE_SAME_10, 0, 0, 1),
        cdb10(op::UNMAP, 0, 0, 24),
        cdb16(op::COMPARE_AND_WRITE, 0, 0, 0),
    ] {
        assert_eq!(decode(&c, &ro), Err(Sense::WRITE_PROTECTED), "{c:02x?}");
    }
    assert!(decode(&cdb16(op::READ_16, 0, 0, 1), &ro).is_ok());
}

#[test]
fn other_commands() {
    let d = dev();
    let mut cw = cdb16(op::COMPARE_AND_WRITE, 0, 10, 0);
    cw[13] = 2;
    let r = decode(&cw, &d);
    assert_eq!(
        r,
        Ok(ScsiRequest::CompareAndWrite {
            offset_bytes: 5120,
            len_bytes: 1024,
            fua: false
        })
    );
    assert_eq!(r.map(|r| r.data_out_len(&d)), Ok(2048));
    cw[13] = 200;
    assert_eq!(decode(&cw, &d), Err(Sense::INVALID_FIELD_IN_CDB));
    let ws = decode(&cdb16(op::WRITE_SAME_16, 0x08, 0, 1 << 16), &d);
    assert_eq!(
        ws,
        Ok(ScsiRequest::WriteSame {
            offset_bytes: 0,
            len_bytes: 512 << 16,
            unmap: true,
            ndob: false
        })
    );
    assert_eq!(
        decode(&cdb16(op::WRITE_SAME_16, 0, 0, 0), &d),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
    let thick = Device {
        thin: false,
        ..dev()
    };
    assert_eq!(
        decode(&cdb16(op::WRITE_SAME_16, 0x08, 0, 1), &thick),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
    let mut gls = cdb16(op::SERVICE_ACTION_IN_16, 0x12, 8, 0);
    gls[10..14].copy_from_slice(&4096u32.to_be_bytes());
    assert_eq!(
        decode(&gls, &d),
        Ok(ScsiRequest::GetLbaStatus {
            offset_bytes: 4096,
            alloc_len: 4096
        })
    );
    assert_eq!(
        decode(&[op::INQUIRY, 0, 0x80, 0, 64, 0], &d),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
    assert_eq!(
        decode(&[0xff, 0, 0, 0, 0, 0], &d),
        Err(Sense::INVALID_OPCODE)
    );
    assert_eq!(
        decode(&[op::READ_16, 0, 0], &d),
        Err(Sense::INVALID_FIELD_IN_CDB)
    );
    assert_eq!(decode(&[], &d), Err(Sense::INVALID_OPCODE));
    let mut v = cdb10(op::VERIFY_10, 0x02, 0, 8);
    assert_eq!(
        decode(&v, &d),
        Ok(ScsiRequest::Verify {
            offset_bytes: 0,
            len_bytes: 4096,
            compare: true
        })
    );
    v[1] = 0x06;
    assert_eq!(decode(&v, &d), Err(Sense::INVALID_FIELD_IN_CDB));
    let mut pro = vec![op::PERSISTENT_RESERVE_OUT, 0x01, 0x05, 0, 0, 0, 0, 0, 24, 0];
    assert_eq!(
        decode(&pro, &d),
        Ok(ScsiRequest::PersistentReserveOut {
            action: 1,
            scope: 0,
            pr_type: 5,
            param_len: 24
        })
    );
    pro[1] = 0;
    assert!(decode(&pro, &d).is_ok());
    assert_eq!(
        decode(&[op::SYNCHRONIZE_CACHE_10, 2, 0, 0, 0, 0, 0, 0, 0, 0], &d),
        Ok(ScsiRequest::SynchronizeCache { immed: true })
    );
}

#[test]
fn unmap_parameter_list() {
    let d = dev();
    let mut p = vec![0u8; 8];
    for (lba, n) in [(0u64, 8u32), (100, 0), (200, 16)] {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    let data_len = (p.len() - 2) as u16;
    p[0..2].copy_from_slice(&data_len.to_be_bytes());
    p[2..4].copy_from_slice(&48u16.to_be_bytes());
    assert_eq!(
        parse_unmap(&p, &d),
        Ok(vec![
            UnmapRange {
                offset_bytes: 0,
                len_bytes: 4096
            },
            UnmapRange {
                offset_bytes: 200 * 512,
                len_bytes: 8192
            },
        ])
    );
    // Descriptor length past the list; a range past the end.
    let mut bad = p.clone();
    bad[2..4].copy_from_slice(&64u16.to_be_bytes());
    assert_eq!(parse_unmap(&bad, &d), Err(Sense::PARAMETER_LIST_LENGTH));
    let mut far = p.clone();
    far[8..16].copy_from_slice(&d.blocks().to_be_bytes());
    assert_eq!(parse_unmap(&far, &d), Err(Sense::LBA_OUT_OF_RANGE));
    assert_eq!(parse_unmap(&[], &d), Ok(vec![]));
}

#[test]
fn lun_addressing() {
    assert_eq!(lun_index(0), Some(0));
    assert_eq!(lun_index(0x0001_0000_0000_0000), Some(1));
    assert_eq!(lun_index(0x4123_0000_0000_0000), Some(0x123));
    assert_eq!(lun_index(0x0100_0000_0000_0000), None);
    assert_eq!(lun_index(0x0000_0000_0000_0001), None);
}

proptest! {
    /// Any CDB either fails with sense or yields ranges inside the device and within
    /// the limits. Negative control: dropping the capacity check in `byte_range` makes
    /// this fail within a few cases (tried).
    #[test]
    fn decoded_ranges_are_inside(cdb in prop::collection::vec(any::<u8>(), 0..20),
                                 op in prop::sample::select(&[0x08u8, 0x0a, 0x28, 0x2a, 0x2e, 0x2f, 0x35,
                                     0x41, 0x88, 0x89, 0x8a, 0x8e, 0x8f, 0x91, 0x93, 0x9e, 0xa8, 0xaa, 0xae, 0xaf][..]),
                                 blocks in 0u64..300_000, four_k: bool, ro: bool) {
        let bs = if four_k { 4096 } else { 512 };
        let d = Device { read_only: ro, ..Device::with_capacity(blocks * bs, bs as u32) };
        let mut cdb = cdb;
        if let Some(first) = cdb.first_mut() { *first = op; }
        if let Ok(req) = decode(&cdb, &d) {
            let cap = d.blocks() * bs;
            match req {
                ScsiRequest::Read { offset_bytes, len_bytes, .. }
                | ScsiRequest::Write { offset_bytes, len_bytes, .. }
                | ScsiRequest::Verify { offset_bytes, len_bytes, .. }
                | ScsiRequest::CompareAndWrite { offset_bytes, len_bytes, .. } => {
                    prop_assert!(offset_bytes + u64::from(len_bytes) <= cap);
                    prop_assert!(len_bytes <= d.max_transfer_bytes);
                    prop_assert_eq!(offset_bytes % bs, 0);
                }
                ScsiRequest::WriteSame { offset_bytes, len_bytes, .. } => {
                    prop_assert!(offset_bytes + len_bytes <= cap && len_bytes > 0);
                }
                ScsiRequest::GetLbaStatus { offset_bytes, .. } => prop_assert!(offset_bytes < cap),
                _ => {}
            }
            prop_assert!(!(ro && req.writes()));
        }
    }
}
