//! Arbitrary request streams through the NBD transmission decoder under a fuzzed export.
//! Input format: see `ringblk_nbd::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringblk_nbd::fuzz_transmission(data);
});
