//! Arbitrary descriptor tables, avail rings and buffers in a fake guest memory through
//! the vhost data plane's chain walk and virtio-blk parser.
//! Input format: see `ringblk_vhost::fuzz`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringblk_vhost::fuzz::fuzz_virtqueue(data);
});
