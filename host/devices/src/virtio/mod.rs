//! Virtio: the device trait every virtio model implements, the interrupt it signals through, and
//! the MMIO transport that presents a device to the guest.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;

use std::fmt::Debug;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: the modern interface; the only one our transport offers.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// `VIRTIO_RING_F_EVENT_IDX`: the driver and device suppress notifications with the
/// `used_event`/`avail_event` indices instead of flags.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Why an interrupt is raised (the bits of the MMIO `InterruptStatus` register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// A queue has new used buffers.
    Queue = 1,
    /// The device configuration changed.
    Config = 2,
}

/// How a device notifies the driver; implemented by the transport.
pub trait VirtioInterrupt: Send + Sync + Debug {
    /// Raises the device's interrupt for `kind`.
    fn signal(&self, kind: InterruptKind) -> io::Result<()>;
}

/// The interrupt of one virtio-mmio device: a status word the transport exposes to the guest
/// and an irqfd that injects the device's interrupt line.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    irqfd: EventFd,
}

impl MmioInterrupt {
    /// An interrupt that sets bits in `status` and writes to `irqfd`.
    pub fn new(status: Arc<AtomicU32>, irqfd: EventFd) -> Self {
        Self { status, irqfd }
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal(&self, kind: InterruptKind) -> io::Result<()> {
        self.status.fetch_or(kind as u32, Ordering::SeqCst);
        self.irqfd.write(1)
    }
}

/// Errors of [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A queue's rings are not inside guest memory, or its size is invalid.
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// The device was already active.
    #[error("device is already active")]
    AlreadyActive,
    /// The process serving the device (a vhost-user backend) refused or failed the set-up.
    #[error("the device backend failed")]
    Backend(#[source] io::Error),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send + Debug {
    /// The virtio device ID (for example 19 for vsock).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (always a subset of [`Self::avail_features`]).
    fn set_acked_features(&mut self, features: u64);
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues, counted from the first, the driver sets up under the features it
    /// acked; the transport hands exactly these to [`Self::activate`]. Devices whose queue layout
    /// depends on the features (virtio-balloon's reporting queue) override this; by default it
    /// is every queue.
    fn active_queue_count(&self) -> usize {
        self.queue_max_sizes().len()
    }
    /// One eventfd per queue, written when the driver notifies that queue (an ioeventfd).
    fn queue_events(&self) -> &[EventFd];
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the queues the driver set up.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Whether the device is running.
    fn is_activated(&self) -> bool;
    /// Stops the device and drops its queues; `false` if the device cannot be reset.
    fn reset(&mut self) -> bool;
}

/// The next chain the driver made available in `queue`, or `None` if there is none.
///
/// Unlike `QueueT::pop_descriptor_chain`, an available index the driver corrupted is an error
/// rather than an empty queue, so a device that loops until the queue is empty cannot spin.
pub fn next_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Copies the bytes of `config` at `offset` into `data`, leaving bytes past the end as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
pub(crate) mod test_utils;
