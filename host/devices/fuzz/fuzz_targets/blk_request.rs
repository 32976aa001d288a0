//! The fuzzer's bytes as a virtio-blk guest: one request queue against a temporary image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_devices::fuzzing::fuzz_blk(data);
});
