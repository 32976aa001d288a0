//! Queue and config handling of virtio-balloon, driven through virtio-queue's mock queues.

use vm_memory::{Bytes, GuestAddress};

use super::test_utils::{
    activated, activated_without_reporting, fill, mock_queues, page_is, pfn_bytes, PAGE, PATTERN,
};
use super::{features, queue, Balloon, PFN_SHIFT};
use crate::virtio::test_utils::{memory, push_chain, used, used_count, Desc, BUFFERS, MEM_SIZE};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Where an inflate chain's page frame numbers are written: above the pages under test.
const PFN_ARRAY: u64 = BUFFERS + 0x10_0000;
/// Page frame number of the first test page.
const FIRST_PFN: u32 = (BUFFERS >> PFN_SHIFT) as u32;

fn page(n: usize) -> u64 {
    BUFFERS + (n * PAGE) as u64
}

#[test]
fn reported_range_is_released_and_reads_back_zero() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 16);
    push_chain(
        &mocks[queue::REPORTING],
        0,
        &[Desc::write(page(4), 8 * PAGE as u32)],
    );
    let (mut balloon, interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::REPORTING).unwrap();

    assert!(page_is(&mem, page(4), 0));
    assert!(page_is(&mem, page(11), 0));
    assert!(page_is(&mem, page(3), PATTERN));
    assert!(page_is(&mem, page(12), PATTERN));
    assert_eq!(used(&mocks[queue::REPORTING], 0), (0, 0));
    assert_eq!(interrupt.count(), 1);
}

#[test]
fn reported_chain_of_several_ranges_releases_each() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 8);
    push_chain(
        &mocks[queue::REPORTING],
        0,
        &[
            Desc::write(page(1), PAGE as u32),
            Desc::write(page(5), PAGE as u32),
        ],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::REPORTING).unwrap();

    assert!(page_is(&mem, page(1), 0));
    assert!(page_is(&mem, page(5), 0));
    assert!(page_is(&mem, page(2), PATTERN));
}

#[test]
fn reported_range_outside_memory_is_refused_and_returned() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    let last_page = (MEM_SIZE - PAGE) as u64;
    fill(&mem, last_page, 1);
    push_chain(
        &mocks[queue::REPORTING],
        0,
        &[Desc::write(last_page, 2 * PAGE as u32)],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::REPORTING).unwrap();

    assert!(page_is(&mem, last_page, PATTERN));
    assert_eq!(used(&mocks[queue::REPORTING], 0), (0, 0));
}

#[test]
fn reported_chain_with_one_bad_range_releases_nothing() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 2);
    push_chain(
        &mocks[queue::REPORTING],
        0,
        &[
            Desc::write(page(0), PAGE as u32),
            Desc::write(u64::MAX - 0xfff, PAGE as u32),
        ],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::REPORTING).unwrap();

    assert!(page_is(&mem, page(0), PATTERN));
    assert_eq!(used_count(&mocks[queue::REPORTING]), 1);
}

#[test]
fn reported_device_readable_range_is_refused() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 1);
    push_chain(
        &mocks[queue::REPORTING],
        0,
        &[Desc::read(page(0), PAGE as u32)],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::REPORTING).unwrap();

    assert!(page_is(&mem, page(0), PATTERN));
    assert_eq!(used(&mocks[queue::REPORTING], 0), (0, 0));
}

#[test]
fn inflated_pfns_are_released() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 4);
    let pfns = pfn_bytes(&[FIRST_PFN, FIRST_PFN + 1, FIRST_PFN + 3]);
    mem.write_slice(&pfns, GuestAddress(PFN_ARRAY)).unwrap();
    push_chain(
        &mocks[queue::INFLATE],
        0,
        &[Desc::read(PFN_ARRAY, pfns.len() as u32)],
    );
    let (mut balloon, interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::INFLATE).unwrap();

    assert!(page_is(&mem, page(0), 0));
    assert!(page_is(&mem, page(1), 0));
    assert!(page_is(&mem, page(2), PATTERN));
    assert!(page_is(&mem, page(3), 0));
    assert_eq!(used(&mocks[queue::INFLATE], 0), (0, 0));
    assert_eq!(interrupt.count(), 1);
}

#[test]
fn inflate_buffer_with_partial_last_entry_releases_whole_entries() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 2);
    let pfns = pfn_bytes(&[FIRST_PFN, FIRST_PFN + 1]);
    mem.write_slice(&pfns, GuestAddress(PFN_ARRAY)).unwrap();
    // Six bytes: the first number and half of the second.
    push_chain(&mocks[queue::INFLATE], 0, &[Desc::read(PFN_ARRAY, 6)]);
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::INFLATE).unwrap();

    assert!(page_is(&mem, page(0), 0));
    assert!(page_is(&mem, page(1), PATTERN));
    assert_eq!(used(&mocks[queue::INFLATE], 0), (0, 0));
}

#[test]
fn inflate_entry_split_across_descriptors_is_read_whole() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 1);
    let pfns = pfn_bytes(&[FIRST_PFN]);
    mem.write_slice(&pfns[..2], GuestAddress(PFN_ARRAY))
        .unwrap();
    mem.write_slice(&pfns[2..], GuestAddress(PFN_ARRAY + 0x100))
        .unwrap();
    push_chain(
        &mocks[queue::INFLATE],
        0,
        &[Desc::read(PFN_ARRAY, 2), Desc::read(PFN_ARRAY + 0x100, 2)],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::INFLATE).unwrap();

    assert!(page_is(&mem, page(0), 0));
}

#[test]
fn inflated_pfn_outside_memory_is_skipped_and_others_released() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 1);
    let pfns = pfn_bytes(&[u32::MAX, FIRST_PFN]);
    mem.write_slice(&pfns, GuestAddress(PFN_ARRAY)).unwrap();
    push_chain(
        &mocks[queue::INFLATE],
        0,
        &[Desc::read(PFN_ARRAY, pfns.len() as u32)],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::INFLATE).unwrap();

    assert!(page_is(&mem, page(0), 0));
    assert_eq!(used(&mocks[queue::INFLATE], 0), (0, 0));
}

#[test]
fn inflate_device_writable_buffer_is_refused() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 1);
    let pfns = pfn_bytes(&[FIRST_PFN]);
    mem.write_slice(&pfns, GuestAddress(PFN_ARRAY)).unwrap();
    push_chain(&mocks[queue::INFLATE], 0, &[Desc::write(PFN_ARRAY, 4)]);
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::INFLATE).unwrap();

    assert!(page_is(&mem, page(0), PATTERN));
    assert_eq!(used(&mocks[queue::INFLATE], 0), (0, 0));
}

#[test]
fn inflate_buffer_outside_memory_is_refused() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    push_chain(
        &mocks[queue::INFLATE],
        0,
        &[Desc::read(MEM_SIZE as u64 - 2, 4)],
    );
    let (mut balloon, _interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::INFLATE).unwrap();

    assert_eq!(used(&mocks[queue::INFLATE], 0), (0, 0));
}

#[test]
fn deflate_returns_buffers_and_keeps_memory() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    fill(&mem, page(0), 1);
    let pfns = pfn_bytes(&[FIRST_PFN]);
    mem.write_slice(&pfns, GuestAddress(PFN_ARRAY)).unwrap();
    push_chain(&mocks[queue::DEFLATE], 0, &[Desc::read(PFN_ARRAY, 4)]);
    push_chain(&mocks[queue::DEFLATE], 1, &[Desc::read(PFN_ARRAY, 4)]);
    let (mut balloon, interrupt) = activated(&mem, &mocks);

    balloon.process_queue(queue::DEFLATE).unwrap();

    assert_eq!(used_count(&mocks[queue::DEFLATE]), 2);
    assert!(page_is(&mem, page(0), PATTERN));
    assert_eq!(interrupt.count(), 1);
}

#[test]
fn offered_features_are_deflate_on_oom_and_reporting() {
    let balloon = Balloon::new().unwrap();

    let expected =
        (1u64 << VIRTIO_F_VERSION_1) | (1 << features::DEFLATE_ON_OOM) | (1 << features::REPORTING);
    assert_eq!(balloon.avail_features(), expected);
}

#[test]
fn driver_declining_reporting_runs_two_queues() {
    let mem = memory();
    let mocks = mock_queues(&mem);

    let balloon = activated_without_reporting(&mem, &mocks);

    assert_eq!(balloon.active_queue_count(), 2);
    assert!(balloon.is_activated());
}

#[test]
fn notification_of_absent_reporting_queue_is_ignored() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    push_chain(
        &mocks[queue::REPORTING],
        0,
        &[Desc::write(page(0), PAGE as u32)],
    );
    let mut balloon = activated_without_reporting(&mem, &mocks);

    balloon.process_queue(queue::REPORTING).unwrap();

    assert_eq!(used_count(&mocks[queue::REPORTING]), 0);
}

#[test]
fn set_target_pages_updates_config_and_signals_driver() {
    let mem = memory();
    let mocks = mock_queues(&mem);
    let (mut balloon, interrupt) = activated(&mem, &mocks);
    let mut num_pages = [0u8; 4];

    balloon.set_target_pages(4096).unwrap();

    balloon.read_config(0, &mut num_pages);
    assert_eq!(u32::from_le_bytes(num_pages), 4096);
    assert_eq!(interrupt.config_count(), 1);
}

#[test]
fn set_target_pages_before_activation_only_updates_config() {
    let mut balloon = Balloon::new().unwrap();

    balloon.set_target_pages(7).unwrap();

    assert_eq!(balloon.target_pages(), 7);
}

#[test]
fn driver_write_of_actual_is_read_back() {
    let mut balloon = Balloon::new().unwrap();
    let mut config = [0u8; 8];

    balloon.write_config(4, &1234u32.to_le_bytes());

    balloon.read_config(0, &mut config);
    assert_eq!(balloon.actual_pages(), 1234);
    assert_eq!(&config[4..], &1234u32.to_le_bytes());
}

#[test]
fn driver_write_of_num_pages_is_ignored() {
    let mut balloon = Balloon::new().unwrap();
    balloon.set_target_pages(10).unwrap();

    balloon.write_config(0, &99u32.to_le_bytes());
    balloon.write_config(2, &[1, 1, 1, 1]);
    balloon.write_config(u64::MAX, &[1]);

    assert_eq!(balloon.target_pages(), 10);
    assert_eq!(balloon.actual_pages(), 0);
}

#[test]
fn config_read_past_actual_returns_zeroes() {
    let balloon = Balloon::new().unwrap();
    let mut data = [0xffu8; 4];

    balloon.read_config(8, &mut data);

    assert_eq!(data, [0; 4]);
}
