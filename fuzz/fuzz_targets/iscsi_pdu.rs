//! Arbitrary bytes through the iSCSI PDU decoder (with digests and limits chosen by the
//! first two bytes). Input format: see `ringblk_iscsi::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringblk_iscsi::fuzz::fuzz_pdu(data);
});
