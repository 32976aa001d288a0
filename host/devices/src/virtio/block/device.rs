//! The block device: features, configuration space and the request queue loop.

use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::Disk;
use super::{
    features, request, BlockError, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, VIRTIO_ID_BLOCK,
};
use crate::virtio::{
    next_chain, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::GuestMemoryMmap;

/// Bytes of `struct virtio_blk_config` we expose: up to and including the write-zeroes fields.
const CONFIG_SIZE: usize = 60;

/// State that only exists while the driver runs the device.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) queue: Queue,
}

/// A virtio-blk device serving one disk image.
#[derive(Debug)]
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_SIZE],
    queue_events: [EventFd; 1],
    pub(super) active: Option<Active>,
}

impl Block {
    /// A device for the image at `path`; see [`Disk::open`].
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Self::new(Disk::open(path, read_only)?)
    }

    /// A device serving `disk`.
    pub fn new(disk: Disk) -> Result<Self, BlockError> {
        let mut avail_features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << features::SEG_MAX)
            | (1 << features::BLK_SIZE)
            | (1 << features::FLUSH);
        if disk.read_only() {
            avail_features |= 1 << features::RO;
        } else {
            avail_features |= (1 << features::DISCARD) | (1 << features::WRITE_ZEROES);
        }
        Ok(Self {
            config: config_space(disk.sectors()),
            disk,
            avail_features,
            acked_features: 0,
            queue_events: [EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
        })
    }

    /// The event the driver's notifications arrive on.
    pub fn queue_event(&self) -> &EventFd {
        &self.queue_events[0]
    }

    /// Serves every available request; raises the interrupt if the driver wants one.
    ///
    /// With `VIRTIO_RING_F_EVENT_IDX` the loop re-enables notifications and looks once more, so
    /// a request made available while notifications were off is not left waiting.
    pub fn process_queue(&mut self) -> Result<(), BlockError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut completed = false;
        loop {
            active
                .queue
                .disable_notification(&active.mem)
                .map_err(BlockError::Queue)?;
            let mut served = 0usize;
            while let Some(chain) =
                next_chain(&mut active.queue, &active.mem).map_err(BlockError::Queue)?
            {
                let head = chain.head_index();
                let len = request::process(&self.disk, &active.mem, chain);
                active
                    .queue
                    .add_used(&active.mem, head, len)
                    .map_err(BlockError::Queue)?;
                served += 1;
            }
            completed |= served > 0;
            let more = active
                .queue
                .enable_notification(&active.mem)
                .map_err(BlockError::Queue)?;
            // A ring that claims more chains than it yields would keep us here forever.
            if !more || served == 0 {
                break;
            }
        }
        if completed
            && active
                .queue
                .needs_notification(&active.mem)
                .map_err(BlockError::Queue)?
        {
            active
                .interrupt
                .signal(InterruptKind::Queue)
                .map_err(BlockError::Interrupt)?;
        }
        Ok(())
    }
}

/// `struct virtio_blk_config` up to the write-zeroes fields, little endian.
fn config_space(sectors: u64) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &sectors.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEG.to_le_bytes());
    put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
    put(52, &MAX_DISCARD_SEG.to_le_bytes());
    // write_zeroes_may_unmap: a zeroed range with the UNMAP flag may become a hole.
    put(56, &[1]);
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
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

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only: we offer no writeback toggle.
        tracing::warn!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
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
        let got = queues.len();
        let Ok([mut queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        if !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue(0));
        }
        queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
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
