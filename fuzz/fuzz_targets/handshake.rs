//! Arbitrary client bytes through the NBD handshake and on into transmission.
//! Input format: see `ringblk_nbd::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringblk_nbd::fuzz_handshake(data);
});
