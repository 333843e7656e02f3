//! Arbitrary client bytes through the NBD handshake and on into transmission.
//! Input format: see `ringblk_target::nbd::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringblk_target::nbd::fuzz_handshake(data);
});
