//! Test helpers for virtio-rng: a predictable entropy source and an activated device.

use std::io;
use std::sync::Arc;

use virtio_queue::mock::MockSplitQueue;

use super::{EntropySource, Rng};
use crate::virtio::test_utils::CountingInterrupt;
use crate::virtio::VirtioDevice;
use crate::GuestMemoryMmap;

/// Entropy that is all [`FixedEntropy::BYTE`], so tests can see where it landed.
#[derive(Debug)]
pub struct FixedEntropy;

impl FixedEntropy {
    /// The byte every request is filled with.
    pub const BYTE: u8 = 0xa5;
}

impl EntropySource for FixedEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(Self::BYTE);
        Ok(())
    }
}

/// A device activated on `mock`'s queue, and the interrupt it signals.
pub fn activated(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
) -> (Rng<FixedEntropy>, Arc<CountingInterrupt>) {
    let mut rng = Rng::new(FixedEntropy).expect("eventfd");
    let interrupt = Arc::new(CountingInterrupt::default());
    let queue = mock.create_queue().expect("valid mock queue");
    rng.activate(mem.clone(), interrupt.clone(), vec![queue])
        .expect("activate");
    (rng, interrupt)
}
