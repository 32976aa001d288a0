//! Test helpers for virtio-blk: disk images in temporary files, requests written into guest
//! memory, and an activated device.

use std::io::Write;
use std::sync::Arc;

use tempfile::NamedTempFile;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::{Block, Disk, SECTOR_SIZE};
use crate::virtio::test_utils::{CountingInterrupt, BUFFERS};
use crate::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use crate::GuestMemoryMmap;

/// Where a test request's header goes.
pub const HEADER: u64 = BUFFERS;
/// Where a test request's status byte goes.
pub const STATUS: u64 = BUFFERS + 0x100;
/// Where a test request's data buffers start.
pub const DATA: u64 = BUFFERS + 0x1000;
/// Sectors of a test image.
pub const DISK_SECTORS: u64 = 64;
/// Size of the mock queues: `used_event` sits right after this many ring entries.
pub const QUEUE_LEN: u16 = 16;
/// A status value the device never writes, so a test sees whether it wrote one.
pub const STATUS_UNTOUCHED: u8 = 0xee;

/// An image of [`DISK_SECTORS`] sectors in which every byte of sector `n` is `n`.
pub fn image() -> NamedTempFile {
    let mut file = NamedTempFile::new().expect("temporary image");
    for sector in 0..DISK_SECTORS {
        file.write_all(&[sector as u8; SECTOR_SIZE as usize])
            .expect("write the image");
    }
    file.flush().expect("flush the image");
    file
}

/// Writes a request header at [`HEADER`] and a status byte the device has not written.
pub fn write_header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER))
        .expect("header inside test memory");
    mem.write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS))
        .expect("status inside test memory");
}

/// The status byte at [`STATUS`].
pub fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS))
        .expect("status inside test memory")
}

/// A discard / write-zeroes segment as the driver lays it out.
pub fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    raw
}

/// A device on `disk`, activated on `mock`'s queue with every offered feature but
/// `VIRTIO_RING_F_EVENT_IDX` (so every completion interrupts), and the interrupt it signals.
pub fn activated(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    disk: Disk,
) -> (Block, Arc<CountingInterrupt>) {
    activated_with(mem, mock, disk, |offered| {
        offered & !(1 << VIRTIO_RING_F_EVENT_IDX)
    })
}

/// A device on `disk`, activated on `mock`'s queue with the features `ack` picks from the
/// offer, and the interrupt it signals.
pub fn activated_with(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    disk: Disk,
    ack: impl FnOnce(u64) -> u64,
) -> (Block, Arc<CountingInterrupt>) {
    let mut block = Block::new(disk).expect("eventfd");
    block.set_acked_features(ack(block.avail_features()));
    let interrupt = Arc::new(CountingInterrupt::default());
    let queue = mock.create_queue().expect("valid mock queue");
    block
        .activate(mem.clone(), interrupt.clone(), vec![queue])
        .expect("activate");
    (block, interrupt)
}

/// Sets the avail ring's `used_event` of a [`QUEUE_LEN`] mock queue: the driver wants an
/// interrupt once the used index passes it.
pub fn set_used_event(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, value: u16) {
    let addr = mock.avail_addr().0 + 4 + 2 * u64::from(QUEUE_LEN);
    mem.write_obj(value, GuestAddress(addr))
        .expect("used_event inside test memory");
}
