//! The balloon device: features, the `num_pages`/`actual` config space and the three queues.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{release, ReleaseError};
use super::{
    features, queue, BalloonError, MAX_PFN_BYTES, PFN_SHIFT, QUEUE_SIZE, VIRTIO_ID_BALLOON,
};
use crate::virtio::{
    next_chain, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::GuestMemoryMmap;

/// `le32 num_pages, le32 actual`: the fields of `struct virtio_balloon_config` the offered
/// features use.
const CONFIG_SIZE: usize = 8;
/// Offset of `actual`, the only field the driver writes.
const ACTUAL_OFFSET: usize = 4;
/// Bytes per page frame number.
const PFN_SIZE: usize = 4;

/// Why a chain was returned without releasing anything.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    /// A buffer has the wrong direction for its queue.
    #[error("device-{found} buffer on queue {queue}")]
    Direction {
        /// The queue index.
        queue: usize,
        /// The direction the buffer had: "readable" or "writable".
        found: &'static str,
    },
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// An inflate chain carries more page frame numbers than we read at once.
    #[error("{0} bytes of page frame numbers exceed the limit of {MAX_PFN_BYTES}")]
    TooLong(u64),
    /// Guest memory could not be read.
    #[error("guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// A reported range could not be released.
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

/// State that only exists while the driver runs the device.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    /// Inflate, deflate and, when acked, reporting.
    pub(super) queues: Vec<Queue>,
}

/// A virtio-balloon device with free page reporting.
#[derive(Debug)]
pub struct Balloon {
    acked_features: u64,
    config: [u8; CONFIG_SIZE],
    queue_events: [EventFd; 3],
    pub(super) active: Option<Active>,
}

impl Balloon {
    /// A balloon with a target of zero pages: the guest keeps all its memory until
    /// [`Self::set_target_pages`] asks for some.
    pub fn new() -> Result<Self, BalloonError> {
        let event = || EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd);
        Ok(Self {
            acked_features: 0,
            config: [0; CONFIG_SIZE],
            queue_events: [event()?, event()?, event()?],
            active: None,
        })
    }

    /// The events the driver's notifications arrive on, by queue index.
    pub fn queue_event(&self, index: usize) -> Option<&EventFd> {
        self.queue_events.get(index)
    }

    /// Asks the guest to give up memory until `pages` 4 KiB pages are in the balloon, and tells
    /// a running driver the target changed.
    pub fn set_target_pages(&mut self, pages: u32) -> Result<(), BalloonError> {
        self.config[..ACTUAL_OFFSET].copy_from_slice(&pages.to_le_bytes());
        if let Some(active) = &self.active {
            active
                .interrupt
                .signal(InterruptKind::Config)
                .map_err(BalloonError::Interrupt)?;
        }
        Ok(())
    }

    /// The target the host set, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        u32::from_le_bytes(self.config[..ACTUAL_OFFSET].try_into().expect("4 bytes"))
    }

    /// The pages the driver says are in the balloon.
    pub fn actual_pages(&self) -> u32 {
        u32::from_le_bytes(self.config[ACTUAL_OFFSET..].try_into().expect("4 bytes"))
    }

    fn reporting_acked(&self) -> bool {
        self.acked_features & (1 << features::REPORTING) != 0
    }

    /// Serves every available chain of queue `index`; raises the interrupt if any completed.
    pub fn process_queue(&mut self, index: usize) -> Result<(), BalloonError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let Some(queue) = active.queues.get_mut(index) else {
            tracing::warn!("virtio-balloon: notification for absent queue {index}");
            return Ok(());
        };
        let mut completed = false;
        while let Some(chain) = next_chain(queue, &active.mem).map_err(BalloonError::Queue)? {
            let head = chain.head_index();
            let result = match index {
                queue::INFLATE => inflate(&active.mem, chain),
                queue::REPORTING => report(&active.mem, chain),
                // Deflated pages need nothing: the guest touching them again faults them in.
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!("virtio-balloon: queue {index}: chain refused: {e}");
            }
            // The device writes nothing into any balloon buffer.
            queue
                .add_used(&active.mem, head, 0)
                .map_err(BalloonError::Queue)?;
            completed = true;
        }
        if completed {
            active
                .interrupt
                .signal(InterruptKind::Queue)
                .map_err(BalloonError::Interrupt)?;
        }
        Ok(())
    }
}

/// Checks that every descriptor of `chain` has the direction of `queue` and lies inside guest
/// memory.
fn checked_descriptors(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    queue: usize,
    device_writes: bool,
) -> Result<Vec<Descriptor>, ChainError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    // The iterator stops after the queue size, so a looping chain cannot grow this.
    let descs: Vec<Descriptor> = chain.collect();
    for desc in &descs {
        if desc.is_write_only() != device_writes {
            let found = if desc.is_write_only() {
                "writable"
            } else {
                "readable"
            };
            return Err(ChainError::Direction { queue, found });
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
    }
    Ok(descs)
}

/// Releases the pages whose frame numbers the inflate `chain` carries. A trailing partial
/// number is ignored; numbers outside guest memory are skipped, the rest still released.
fn inflate(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(), ChainError> {
    let descs = checked_descriptors(mem, chain, queue::INFLATE, false)?;
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total > MAX_PFN_BYTES {
        return Err(ChainError::TooLong(total));
    }
    // Bounded by MAX_PFN_BYTES above.
    let mut raw = vec![0u8; total as usize];
    let mut filled = 0;
    for desc in &descs {
        let end = filled + desc.len() as usize;
        mem.read_slice(&mut raw[filled..end], desc.addr())
            .map_err(ChainError::GuestMemory)?;
        filled = end;
    }
    let pfns = raw.chunks_exact(PFN_SIZE);
    if !pfns.remainder().is_empty() {
        tracing::warn!(
            "virtio-balloon: inflate buffer of {total} bytes ends in a partial page frame number"
        );
    }
    let pfns = pfns.map(|b| u32::from_le_bytes(b.try_into().expect("exact chunk")));
    for (first, count) in runs(pfns) {
        let addr = GuestAddress(u64::from(first) << PFN_SHIFT);
        if let Err(e) = release(mem, addr, count << PFN_SHIFT) {
            tracing::warn!("virtio-balloon: inflated pages not released: {e}");
        }
    }
    Ok(())
}

/// Groups page frame numbers into runs of consecutive ones, `(first, count)`, so adjacent
/// pages take one `madvise`.
fn runs(pfns: impl Iterator<Item = u32>) -> Vec<(u32, u64)> {
    let mut runs: Vec<(u32, u64)> = Vec::new();
    for pfn in pfns {
        match runs.last_mut() {
            Some((first, count)) if u64::from(*first) + *count == u64::from(pfn) => *count += 1,
            _ => runs.push((pfn, 1)),
        }
    }
    runs
}

/// Releases the free ranges the reporting `chain` describes, one per descriptor. Nothing is
/// released unless every range is valid.
fn report(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<(), ChainError> {
    let descs = checked_descriptors(mem, chain, queue::REPORTING, true)?;
    for desc in &descs {
        release(mem, desc.addr(), u64::from(desc.len()))?;
    }
    Ok(())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << features::DEFLATE_ON_OOM) | (1 << features::REPORTING)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn active_queue_count(&self) -> usize {
        if self.reporting_acked() {
            3
        } else {
            2
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?));
        match range {
            Some(range) if range.start >= ACTUAL_OFFSET && range.end <= CONFIG_SIZE => {
                self.config[range].copy_from_slice(data);
            }
            _ => tracing::warn!(
                "virtio-balloon: {}-byte config write at {offset:#x} ignored",
                data.len()
            ),
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let expected = self.active_queue_count();
        if queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        if let Some(index) = queues.iter().position(|q| !q.is_valid(&mem)) {
            return Err(ActivateError::InvalidQueue(index));
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) -> bool {
        self.active = None;
        self.acked_features = 0;
        // A new driver starts from an empty balloon; the host's target stays.
        self.config[ACTUAL_OFFSET..].fill(0);
        true
    }
}
