//! The fuzzer's bytes as a virtio-net guest and backend: RX and TX queues against a socket pair.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_devices::fuzzing::fuzz_net(data);
});
