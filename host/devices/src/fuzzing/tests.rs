//! Randomized guest input for every device model, run under `cargo test` on stable.
//!
//! Each test runs a fixed number of rounds, seeded by the round number so a failure names
//! the seed that replays it. `BERTH_FUZZ_ITERATIONS` raises the count for a longer soak.

use super::*;

/// Rounds per test: enough to hit every generator branch many times while the whole set stays
/// within a few seconds in a debug build.
const VSOCK_ROUNDS: u64 = 3000;
const BLK_ROUNDS: u64 = 2000;
const BALLOON_ROUNDS: u64 = 2000;
const RNG_ROUNDS: u64 = 3000;
const MMIO_ROUNDS: u64 = 2000;
const NET_ROUNDS: u64 = 2000;
/// vsock rounds that share one muxer, so packets meet connections earlier rounds opened.
const ROUNDS_PER_MUXER: u64 = 100;

/// `default`, or `BERTH_FUZZ_ITERATIONS` if that is set and larger.
fn rounds(default: u64) -> u64 {
    std::env::var("BERTH_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, |n: u64| n.max(default))
}

/// Runs `round` once per seed, naming the seed if it panics.
fn for_each_seed(test: u64, count: u64, mut round: impl FnMut(u64, &mut GuestRng)) {
    for seed in 0..count {
        let mut rng = GuestRng::from_seed(test << 32 | seed);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            round(seed, &mut rng);
        }));
        if let Err(panic) = outcome {
            eprintln!("failing seed: {:#x}", test << 32 | seed);
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn vsock_random_guest_queues_keep_invariants() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut muxer = vsock_muxer(&dir);
    for_each_seed(1, rounds(VSOCK_ROUNDS), |seed, rng| {
        if seed % ROUNDS_PER_MUXER == 0 {
            drop(std::mem::replace(&mut muxer, vsock_muxer_in(&dir, seed)));
        }
        vsock_round(&mut muxer, rng);
    });
}

/// A muxer on its own socket path inside `dir`.
fn vsock_muxer_in(dir: &tempfile::TempDir, seed: u64) -> VsockMuxer {
    VsockMuxer::new(MuxerConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.path().join(format!("vm-{seed}.vsock")),
    })
    .expect("muxer")
}

#[test]
fn blk_random_guest_requests_keep_invariants() {
    let image = disk_image();
    for_each_seed(2, rounds(BLK_ROUNDS), |_, rng| {
        blk_round(image.as_file(), image.path(), rng);
    });
}

#[test]
fn balloon_random_guest_queues_keep_invariants() {
    for_each_seed(3, rounds(BALLOON_ROUNDS), |_, rng| balloon_round(rng));
}

#[test]
fn rng_random_guest_queue_keeps_invariants() {
    for_each_seed(4, rounds(RNG_ROUNDS), |_, rng| rng_round(rng));
}

#[test]
fn mmio_random_register_accesses_keep_invariants() {
    for_each_seed(5, rounds(MMIO_ROUNDS), |_, rng| mmio_round(rng));
}

#[test]
fn net_random_guest_queues_and_backend_keep_invariants() {
    for_each_seed(6, rounds(NET_ROUNDS), |_, rng| net_round(rng));
}

#[test]
fn fuzz_entries_empty_input_returns() {
    fuzz_vsock(&[]);
    fuzz_blk(&[]);
    fuzz_net(&[]);
}

#[test]
fn fuzz_entries_short_input_returns() {
    let data: Vec<u8> = (0..=255).collect();

    fuzz_vsock(&data);
    fuzz_blk(&data);
    fuzz_net(&data);
}

#[test]
fn guest_rng_same_seed_repeats_sequence() {
    let mut a = GuestRng::from_seed(7);
    let mut b = GuestRng::from_seed(7);

    let (xs, ys): (Vec<u64>, Vec<u64>) = (0..8).map(|_| (a.next_u64(), b.next_u64())).unzip();

    assert_eq!(xs, ys);
}

#[test]
fn guest_rng_exhausted_bytes_give_zero() {
    let mut rng = GuestRng::from_bytes(&[1, 2, 3]);

    let first = rng.next_u64();

    assert_eq!((first, rng.next_u64()), (0x03_02_01, 0));
}
