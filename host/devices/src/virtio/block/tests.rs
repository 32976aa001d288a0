//! Request handling of virtio-blk, driven through virtio-queue's mock queue.

use std::os::unix::fs::MetadataExt;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::test_utils::{
    activated, activated_with, image, segment, set_used_event, status, write_header, DATA,
    DISK_SECTORS, HEADER, QUEUE_LEN, STATUS, STATUS_UNTOUCHED,
};
use super::{features, request_type as t, status as s, Disk, SECTOR_SIZE};
use crate::virtio::test_utils::{memory, push_chain, used, Desc, MEM_SIZE};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// One sector, as a descriptor length.
const SECTOR: u32 = SECTOR_SIZE as u32;

fn read_guest(mem: &crate::GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn read_request_copies_sectors_into_guest() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 3);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, SECTOR),
            Desc::write(DATA + 0x1000, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    assert_eq!(used(&mock, 0), (0, 2 * SECTOR + 1));
    assert_eq!(read_guest(&mem, DATA, 512), vec![3u8; 512]);
    assert_eq!(read_guest(&mem, DATA + 0x1000, 512), vec![4u8; 512]);
    assert_eq!(interrupt.count(), 1);
}

#[test]
fn write_request_stores_sectors_in_image() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::OUT, 5);
    mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 2 * SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    assert_eq!(used(&mock, 0), (0, 1));
    let content = std::fs::read(file.path()).unwrap();
    assert_eq!(&content[5 * 512..7 * 512], &[0xabu8; 1024][..]);
    assert_eq!(content[7 * 512], 7);
}

#[test]
fn flush_request_after_write_succeeds_with_data_in_file() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::OUT, 0);
    mem.write_slice(&[0x5au8; 512], GuestAddress(DATA)).unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());
    block.process_queue().unwrap();
    write_header(&mem, t::FLUSH, 0);
    push_chain(&mock, 3, &[Desc::read(HEADER, 16), Desc::write(STATUS, 1)]);

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    assert_eq!(used(&mock, 1), (3, 1));
    let content = std::fs::read(file.path()).unwrap();
    assert_eq!(&content[..512], &[0x5au8; 512][..]);
}

#[test]
fn flush_request_with_data_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::FLUSH, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
}

#[test]
fn get_id_request_returns_dev_inode_serial() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    let meta = std::fs::metadata(file.path()).unwrap();
    write_header(&mem, t::GET_ID, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, 20),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    assert_eq!(used(&mock, 0), (0, 21));
    let expected = format!("{:x}-{:x}", meta.dev(), meta.ino());
    let id = read_guest(&mem, DATA, 20);
    assert_eq!(
        &id[..expected.len().min(20)],
        &expected.as_bytes()[..expected.len().min(20)]
    );
}

#[test]
fn discard_request_punches_hole_in_image() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    let blocks_before = std::fs::metadata(file.path()).unwrap().blocks();
    write_header(&mem, t::DISCARD, 0);
    mem.write_slice(&segment(0, DISK_SECTORS as u32, 0), GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 16),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    let meta = std::fs::metadata(file.path()).unwrap();
    assert!(
        meta.blocks() < blocks_before,
        "{} < {blocks_before}",
        meta.blocks()
    );
    assert_eq!(meta.len(), DISK_SECTORS * SECTOR_SIZE);
    assert!(std::fs::read(file.path()).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn discard_request_with_unmap_flag_is_unsupported() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::DISCARD, 0);
    mem.write_slice(&segment(1, 8, 1), GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 16),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::UNSUPP);
    assert_eq!(std::fs::read(file.path()).unwrap()[512], 1);
}

#[test]
fn discard_request_past_end_of_disk_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::DISCARD, 0);
    mem.write_slice(&segment(DISK_SECTORS - 1, 2, 0), GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 16),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
}

#[test]
fn discard_request_with_two_segments_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::DISCARD, 0);
    mem.write_slice(&segment(0, 1, 0), GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&segment(1, 1, 0), GuestAddress(DATA + 16))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 32),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
}

#[test]
fn write_zeroes_request_zeroes_range_only() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::WRITE_ZEROES, 0);
    mem.write_slice(&segment(2, 3, 0), GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 16),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    let content = std::fs::read(file.path()).unwrap();
    assert_eq!(content[2 * 512 - 1], 1);
    assert!(content[2 * 512..5 * 512].iter().all(|b| *b == 0));
    assert_eq!(content[5 * 512], 5);
}

#[test]
fn write_zeroes_request_with_unmap_zeroes_range() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::WRITE_ZEROES, 0);
    mem.write_slice(&segment(8, 8, 1), GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 16),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    let content = std::fs::read(file.path()).unwrap();
    assert!(content[8 * 512..16 * 512].iter().all(|b| *b == 0));
    assert_eq!(content[16 * 512], 16);
}

#[test]
fn write_request_on_read_only_disk_fails_and_leaves_image() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::OUT, 0);
    mem.write_slice(&[0xffu8; 512], GuestAddress(DATA)).unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), true).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(used(&mock, 0), (0, 1));
    assert_eq!(std::fs::read(file.path()).unwrap()[0], 0);
}

#[test]
fn discard_request_on_read_only_disk_is_unsupported() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::DISCARD, 0);
    mem.write_slice(&segment(1, 1, 0), GuestAddress(DATA))
        .unwrap();
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, 16),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), true).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::UNSUPP);
    assert_eq!(std::fs::read(file.path()).unwrap()[512], 1);
}

#[test]
fn read_only_disk_offers_ro_without_discard() {
    let file = image();

    let block = super::Block::open(file.path(), true).unwrap();

    let offered = block.avail_features();
    assert_ne!(offered & (1 << features::RO), 0);
    assert_eq!(offered & (1 << features::DISCARD), 0);
    assert_eq!(offered & (1 << features::WRITE_ZEROES), 0);
}

#[test]
fn writable_disk_offers_flush_discard_and_write_zeroes() {
    let file = image();

    let block = super::Block::open(file.path(), false).unwrap();

    let offered = block.avail_features();
    let expected = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << features::SEG_MAX)
        | (1 << features::BLK_SIZE)
        | (1 << features::FLUSH)
        | (1 << features::DISCARD)
        | (1 << features::WRITE_ZEROES);
    assert_eq!(offered, expected);
}

#[test]
fn config_space_reports_capacity_and_limits() {
    let file = image();
    let block = super::Block::open(file.path(), false).unwrap();
    let mut config = [0u8; 60];

    block.read_config(0, &mut config);

    let le32 = |o: usize| u32::from_le_bytes(config[o..o + 4].try_into().unwrap());
    assert_eq!(
        u64::from_le_bytes(config[..8].try_into().unwrap()),
        DISK_SECTORS
    );
    assert_eq!(le32(12), super::SEG_MAX);
    assert_eq!(le32(20), 512);
    assert_eq!(le32(36), super::MAX_DISCARD_SECTORS);
    assert_eq!(le32(40), 1);
    assert_eq!(le32(44), 8);
    assert_eq!(le32(48), super::MAX_WRITE_ZEROES_SECTORS);
    assert_eq!(le32(52), 1);
    assert_eq!(config[56], 1);
}

#[test]
fn read_request_past_end_of_disk_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, DISK_SECTORS - 1);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, 2 * SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(used(&mock, 0), (0, 1));
}

#[test]
fn write_request_with_overflowing_sector_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::OUT, u64::MAX);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
}

#[test]
fn read_request_of_partial_sector_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, 100),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
}

#[test]
fn header_too_short_fails_with_ioerr() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 8),
            Desc::write(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(used(&mock, 0), (0, 1));
}

#[test]
fn header_device_writable_fails_with_ioerr() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::write(HEADER, 16),
            Desc::write(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
}

#[test]
fn chain_with_only_status_fails_with_ioerr() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(&mock, 0, &[Desc::write(STATUS, 1)]);
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(used(&mock, 0), (0, 1));
}

#[test]
fn status_descriptor_read_only_returns_chain_untouched() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, SECTOR),
            Desc::read(STATUS, 1),
        ],
    );
    let (mut block, interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), STATUS_UNTOUCHED);
    assert_eq!(used(&mock, 0), (0, 0));
    assert_eq!(interrupt.count(), 1);
}

#[test]
fn status_descriptor_outside_memory_returns_chain_with_zero_length() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, SECTOR),
            Desc::write(MEM_SIZE as u64, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(used(&mock, 0), (0, 0));
}

#[test]
fn read_into_device_readable_buffer_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 1);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(read_guest(&mem, DATA, 4), vec![0u8; 4]);
}

#[test]
fn write_from_device_writable_buffer_fails_and_leaves_image() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::OUT, 1);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(DATA, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(std::fs::read(file.path()).unwrap()[512], 1);
}

#[test]
fn write_from_buffer_outside_memory_fails_and_leaves_image() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::OUT, 0);
    // The first sector is inside guest memory, the second is not.
    let straddling = MEM_SIZE as u64 - u64::from(SECTOR);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::read(straddling, 2 * SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(std::fs::read(file.path()).unwrap()[0], 0);
}

#[test]
fn read_into_buffer_outside_memory_fails() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::IN, 0);
    push_chain(
        &mock,
        0,
        &[
            Desc::read(HEADER, 16),
            Desc::write(u64::MAX - 10, SECTOR),
            Desc::write(STATUS, 1),
        ],
    );
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::IOERR);
    assert_eq!(used(&mock, 0), (0, 1));
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, 0x1234, 0);
    push_chain(&mock, 0, &[Desc::read(HEADER, 16), Desc::write(STATUS, 1)]);
    let (mut block, _interrupt) = activated(&mem, &mock, Disk::open(file.path(), false).unwrap());

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::UNSUPP);
    assert_eq!(used(&mock, 0), (0, 1));
}

#[test]
fn event_idx_before_used_event_suppresses_interrupt() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::FLUSH, 0);
    push_chain(&mock, 0, &[Desc::read(HEADER, 16), Desc::write(STATUS, 1)]);
    // The driver asks to be interrupted only after the sixth completion.
    set_used_event(&mem, &mock, 5);
    let disk = Disk::open(file.path(), false).unwrap();
    let (mut block, interrupt) = activated_with(&mem, &mock, disk, |offered| offered);

    block.process_queue().unwrap();

    assert_eq!(status(&mem), s::OK);
    assert_eq!(interrupt.count(), 0);
}

#[test]
fn event_idx_at_used_event_interrupts() {
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, QUEUE_LEN);
    let file = image();
    write_header(&mem, t::FLUSH, 0);
    push_chain(&mock, 0, &[Desc::read(HEADER, 16), Desc::write(STATUS, 1)]);
    set_used_event(&mem, &mock, 0);
    let disk = Disk::open(file.path(), false).unwrap();
    let (mut block, interrupt) = activated_with(&mem, &mock, disk, |offered| offered);

    block.process_queue().unwrap();

    assert_eq!(interrupt.count(), 1);
}

#[test]
fn process_queue_before_activation_does_nothing() {
    let file = image();
    let mut block = super::Block::open(file.path(), false).unwrap();

    assert!(block.process_queue().is_ok());
}
