//! Test helpers for virtio-balloon: three mock queues side by side and an activated device.

use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::{features, Balloon};
use crate::virtio::test_utils::CountingInterrupt;
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;

/// Size of the mock queues.
pub const QUEUE_LEN: u16 = 16;
/// Guest-memory distance between the mock queues' rings (a 16-entry queue needs under 1 KiB).
const QUEUE_STRIDE: u64 = 0x1_0000;
/// The byte test pages are filled with before the device releases them.
pub const PATTERN: u8 = 0xa5;
/// Bytes in a balloon page.
pub const PAGE: usize = 4096;

/// Mock queues for inflate, deflate and reporting, in that order.
pub fn mock_queues(mem: &GuestMemoryMmap) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
    (0..3)
        .map(|i| MockSplitQueue::create(mem, GuestAddress(i * QUEUE_STRIDE), QUEUE_LEN))
        .collect()
}

/// A balloon activated with every offered feature on `mocks`, and the interrupt it signals.
pub fn activated(
    mem: &GuestMemoryMmap,
    mocks: &[MockSplitQueue<GuestMemoryMmap>],
) -> (Balloon, Arc<CountingInterrupt>) {
    let mut balloon = Balloon::new().expect("eventfds");
    balloon.set_acked_features(balloon.avail_features());
    let interrupt = Arc::new(CountingInterrupt::default());
    let queues = mocks
        .iter()
        .map(|m| m.create_queue().expect("valid mock queue"))
        .collect();
    balloon
        .activate(mem.clone(), interrupt.clone(), queues)
        .expect("activate");
    (balloon, interrupt)
}

/// A balloon whose driver declined free page reporting, activated on the first two `mocks`.
pub fn activated_without_reporting(
    mem: &GuestMemoryMmap,
    mocks: &[MockSplitQueue<GuestMemoryMmap>],
) -> Balloon {
    let mut balloon = Balloon::new().expect("eventfds");
    balloon.set_acked_features(balloon.avail_features() & !(1 << features::REPORTING));
    let queues = mocks[..2]
        .iter()
        .map(|m| m.create_queue().expect("valid mock queue"))
        .collect();
    balloon
        .activate(mem.clone(), Arc::new(CountingInterrupt::default()), queues)
        .expect("activate");
    balloon
}

/// Fills `pages` pages from `addr` with [`PATTERN`].
pub fn fill(mem: &GuestMemoryMmap, addr: u64, pages: usize) {
    mem.write_slice(&vec![PATTERN; pages * PAGE], GuestAddress(addr))
        .expect("inside test memory");
}

/// Whether every byte of the page at `addr` is `byte`: [`PATTERN`] for a page kept, 0 for one
/// released.
pub fn page_is(mem: &GuestMemoryMmap, addr: u64, byte: u8) -> bool {
    let mut page = vec![0u8; PAGE];
    mem.read_slice(&mut page, GuestAddress(addr))
        .expect("inside test memory");
    page.iter().all(|b| *b == byte)
}

/// Page frame numbers as an inflate buffer lays them out.
pub fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}
