//! The fuzzer's bytes as a vsock guest: a TX queue of chains, then RX buffers for the answers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    berth_devices::fuzzing::fuzz_vsock(data);
});
