//! The entropy device: every chain is a request for as many bytes as its buffers hold.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{EntropySource, RngError, MAX_REQUEST_BYTES, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::virtio::{
    ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// State that only exists while the driver runs the device.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) queue: Queue,
}

/// A virtio-rng device drawing from `E`.
#[derive(Debug)]
pub struct Rng<E: EntropySource> {
    source: E,
    acked_features: u64,
    queue_events: [EventFd; 1],
    pub(super) active: Option<Active>,
}

impl<E: EntropySource> Rng<E> {
    /// A device serving entropy from `source`.
    pub fn new(source: E) -> std::io::Result<Self> {
        Ok(Self {
            source,
            acked_features: 0,
            queue_events: [EventFd::new(EFD_NONBLOCK)?],
            active: None,
        })
    }

    /// The event the driver's notifications arrive on.
    pub fn queue_event(&self) -> &EventFd {
        &self.queue_events[0]
    }

    /// Serves every available request; raises the interrupt if any completed.
    pub fn process_queue(&mut self) -> Result<(), RngError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut completed = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let len = match fill_chain(&mut self.source, &active.mem, chain) {
                Ok(len) => len,
                Err(e) => {
                    tracing::warn!("virtio-rng: request rejected: {e}");
                    0
                }
            };
            active
                .queue
                .add_used(&active.mem, head, len)
                .map_err(RngError::Queue)?;
            completed = true;
        }
        if completed {
            active
                .interrupt
                .signal(InterruptKind::Queue)
                .map_err(RngError::Source)?;
        }
        Ok(())
    }
}

/// Fills the device-writable buffers of `chain`; returns the bytes written.
fn fill_chain<E: EntropySource>(
    source: &mut E,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<u32, RngError> {
    let mut written = 0u32;
    let mut buf = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(RngError::ReadOnlyBuffer);
        }
        let len = desc.len().min(MAX_REQUEST_BYTES - written);
        if len == 0 {
            break;
        }
        // Check the whole range before drawing entropy for it.
        if !mem.check_range(desc.addr(), len as usize, Permissions::Write) {
            return Err(RngError::OutsideMemory);
        }
        buf.resize(len as usize, 0);
        source.fill(&mut buf).map_err(RngError::Source)?;
        mem.write_slice(&buf, desc.addr())
            .map_err(RngError::GuestMemory)?;
        written += len;
    }
    Ok(written)
}

impl<E: EntropySource> VirtioDevice for Rng<E> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{activated, FixedEntropy};
    use crate::virtio::test_utils::{memory, push_chain, used, used_count, Desc, BUFFERS};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const QUEUE_LEN: u16 = 16;

    #[test]
    fn process_queue_fills_writable_chain() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
        push_chain(
            &mock,
            0,
            &[Desc::write(BUFFERS, 8), Desc::write(BUFFERS + 0x100, 4)],
        );
        let (mut rng, interrupt) = activated(&mem, &mock);

        rng.process_queue().unwrap();

        assert_eq!(used(&mock, 0), (0, 12));
        let mut bytes = [0u8; 4];
        mem.read_slice(&mut bytes, GuestAddress(BUFFERS + 0x100))
            .unwrap();
        assert_eq!(bytes, [FixedEntropy::BYTE; 4]);
        assert_eq!(interrupt.count(), 1);
    }

    #[test]
    fn process_queue_readable_buffer_rejects_chain() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
        push_chain(&mock, 0, &[Desc::read(BUFFERS, 8)]);
        let (mut rng, _interrupt) = activated(&mem, &mock);

        rng.process_queue().unwrap();

        assert_eq!(used(&mock, 0), (0, 0));
    }

    #[test]
    fn process_queue_buffer_outside_memory_rejects_chain() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
        let outside = crate::virtio::test_utils::MEM_SIZE as u64 - 4;
        push_chain(&mock, 0, &[Desc::write(outside, 8)]);
        let (mut rng, _interrupt) = activated(&mem, &mock);

        rng.process_queue().unwrap();

        assert_eq!(used(&mock, 0), (0, 0));
    }

    #[test]
    fn process_queue_huge_buffer_is_capped() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
        push_chain(&mock, 0, &[Desc::write(BUFFERS, 0x20_0000)]);
        let (mut rng, _interrupt) = activated(&mem, &mock);

        rng.process_queue().unwrap();

        assert_eq!(used(&mock, 0), (0, super::MAX_REQUEST_BYTES));
    }

    #[test]
    fn process_queue_serves_every_available_chain() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
        push_chain(&mock, 0, &[Desc::write(BUFFERS, 1)]);
        push_chain(&mock, 1, &[Desc::write(BUFFERS, 2)]);
        let (mut rng, interrupt) = activated(&mem, &mock);

        rng.process_queue().unwrap();

        assert_eq!(used_count(&mock), 2);
        assert_eq!(used(&mock, 1), (1, 2));
        assert_eq!(interrupt.count(), 1);
    }
}
