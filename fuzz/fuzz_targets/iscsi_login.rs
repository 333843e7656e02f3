//! Arbitrary initiator bytes through the iSCSI target login and on into the full
//! feature phase (Text requests, SCSI CDB decoding). Input format: see
//! `ringblk_iscsi::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringblk_iscsi::fuzz::fuzz_login(data);
});
