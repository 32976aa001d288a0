//! virtio-net driven through virtio-queue's mock queues, with a socket pair as the backend.

use std::io::{ErrorKind, Read, Write};

use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use super::test_utils::{
    activated, drain_peer, frame, framed, mock_queues, read_guest, read_peer, unread_bytes,
    write_tx, MAC, RX_BUF, TX_BUF,
};
use super::{features, MacAddr, NetStats, ParseMacError, MAX_FRAME_LEN, NET_HDR_SIZE};
use crate::virtio::test_utils::{memory, push_chain, used, used_count, Desc, MEM_SIZE};
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// The header the device writes on RX: no offloads, `num_buffers` = 1.
const RX_HEADER: [u8; NET_HDR_SIZE] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
/// An RX buffer as Linux posts them without mergeable buffers: header plus a 1514-byte frame,
/// rounded up.
const RX_LEN: u32 = 1536;
/// A typical Ethernet frame length.
const FRAME: usize = 1000;

fn status(net: &impl VirtioDevice) -> u16 {
    let mut raw = [0u8; 2];
    net.read_config(6, &mut raw);
    u16::from_le_bytes(raw)
}

#[test]
fn avail_features_offer_mac_status_and_no_offloads() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (net, _peer, _interrupt) = activated(&mem, &rx, &tx);

    assert_eq!(
        net.avail_features(),
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << features::MAC)
            | (1 << features::STATUS)
    );
}

#[test]
fn config_space_holds_mac_and_link_up() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (net, _peer, _interrupt) = activated(&mem, &rx, &tx);
    let mut mac = [0u8; 6];

    net.read_config(0, &mut mac);

    assert_eq!(mac, MAC.octets());
    assert_eq!(status(&net), 1);
}

#[test]
fn activate_with_one_queue_fails() {
    let mem = memory();
    let (rx, _tx) = mock_queues(&mem);
    let (ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut net = super::Net::new(ours, MAC).unwrap();

    let result = net.activate(
        mem.clone(),
        std::sync::Arc::new(crate::virtio::test_utils::CountingInterrupt::default()),
        vec![rx.create_queue().unwrap()],
    );

    assert!(result.is_err());
    assert!(!net.is_activated());
}

#[test]
fn tx_frame_reaches_peer_with_length_prefix() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let sent = frame(FRAME, 1);
    write_tx(&mem, TX_BUF, &sent);
    // Header and frame in separate descriptors, the frame itself split in two.
    push_chain(
        &tx,
        0,
        &[
            Desc::read(TX_BUF, 12),
            Desc::read(TX_BUF + 12, 100),
            Desc::read(TX_BUF + 112, FRAME as u32 - 100),
        ],
    );
    let (mut net, mut peer, interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(read_peer(&mut peer, 4 + FRAME), framed(&sent));
    assert_eq!(used(&tx, 0), (0, 0));
    assert_eq!(interrupt.count(), 1);
    assert_eq!(net.stats().tx_frames, 1);
}

#[test]
fn tx_frame_sharing_a_descriptor_with_its_header_reaches_peer() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let sent = frame(60, 2);
    let len = write_tx(&mem, TX_BUF, &sent);
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(read_peer(&mut peer, 4 + 60), framed(&sent));
}

#[test]
fn tx_chain_with_writable_descriptor_is_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    write_tx(&mem, TX_BUF, &frame(FRAME, 3));
    push_chain(
        &tx,
        0,
        &[
            Desc::read(TX_BUF, 12),
            Desc::write(TX_BUF + 12, FRAME as u32),
        ],
    );
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(used(&tx, 0), (0, 0));
    assert_eq!(net.stats().tx_dropped, 1);
    assert!(drain_peer(&mut peer).is_empty());
}

#[test]
fn tx_chain_outside_memory_is_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(
        &tx,
        0,
        &[
            Desc::read(TX_BUF, 12),
            Desc::read(MEM_SIZE as u64 - 10, 100),
        ],
    );
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(used(&tx, 0), (0, 0));
    assert_eq!(net.stats().tx_dropped, 1);
    assert!(drain_peer(&mut peer).is_empty());
}

#[test]
fn tx_frame_shorter_than_ethernet_header_is_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let len = write_tx(&mem, TX_BUF, &frame(13, 4));
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(net.stats().tx_dropped, 1);
    assert!(drain_peer(&mut peer).is_empty());
}

#[test]
fn tx_frame_longer_than_the_stream_carries_is_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let len = write_tx(&mem, TX_BUF, &frame(MAX_FRAME_LEN + 1, 5));
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(net.stats().tx_dropped, 1);
    assert!(drain_peer(&mut peer).is_empty());
}

#[test]
fn tx_header_asking_for_checksum_offload_is_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let len = write_tx(&mem, TX_BUF, &frame(FRAME, 6));
    // flags = VIRTIO_NET_HDR_F_NEEDS_CSUM, which needs VIRTIO_NET_F_CSUM.
    mem.write_obj(1u8, vm_memory::GuestAddress(TX_BUF)).unwrap();
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(net.stats().tx_dropped, 1);
    assert!(drain_peer(&mut peer).is_empty());
}

#[test]
fn tx_after_bad_chain_still_sends_next_frame() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let sent = frame(FRAME, 7);
    let len = write_tx(&mem, TX_BUF, &sent);
    push_chain(&tx, 0, &[Desc::write(TX_BUF, len)]);
    push_chain(&tx, 1, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    assert_eq!(used_count(&tx), 2);
    assert_eq!(read_peer(&mut peer, 4 + FRAME), framed(&sent));
}

#[test]
fn tx_backpressure_stops_taking_chains_until_peer_drains() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    // 16 chains of 60000-byte frames: about 1 MiB, far more than a socket pair buffers plus
    // the device's batch.
    const CHAINS: u16 = 16;
    const BIG: usize = 60_000;
    let sent = frame(BIG, 8);
    let len = write_tx(&mem, TX_BUF, &sent);
    for i in 0..CHAINS {
        push_chain(&tx, i, &[Desc::read(TX_BUF, len)]);
    }
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();
    let taken_while_blocked = used_count(&tx);
    net.process_tx().unwrap();

    assert!(taken_while_blocked < CHAINS, "took {taken_while_blocked}");
    assert_eq!(used_count(&tx), taken_while_blocked);
    let mut received = Vec::new();
    // Each round frees the socket buffer once; a bound keeps a regression from hanging.
    for _ in 0..100 {
        received.extend(drain_peer(&mut peer));
        // What the event loop does on the socket's writable edge.
        net.process_socket(EventSet::OUT).unwrap();
        if used_count(&tx) == CHAINS && net.stats().tx_frames == u64::from(CHAINS) {
            received.extend(drain_peer(&mut peer));
            if received.len() == usize::from(CHAINS) * (4 + BIG) {
                break;
            }
        }
    }
    assert_eq!(used_count(&tx), CHAINS);
    assert_eq!(received, framed(&sent).repeat(usize::from(CHAINS)));
}

#[test]
fn rx_frame_from_peer_lands_in_guest_buffer_after_header() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    // The header split over two descriptors, so the device cannot assume one holds it.
    push_chain(
        &rx,
        0,
        &[
            Desc::write(RX_BUF, 10),
            Desc::write(RX_BUF + 10, RX_LEN - 10),
        ],
    );
    let (mut net, mut peer, interrupt) = activated(&mem, &rx, &tx);
    let sent = frame(FRAME, 9);
    peer.write_all(&framed(&sent)).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert_eq!(used(&rx, 0), (0, (NET_HDR_SIZE + FRAME) as u32));
    assert_eq!(read_guest(&mem, RX_BUF, NET_HDR_SIZE), RX_HEADER);
    assert_eq!(read_guest(&mem, RX_BUF + 12, FRAME), sent);
    assert_eq!(interrupt.count(), 1);
}

#[test]
fn rx_several_frames_in_one_read_each_fill_a_chain() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    for i in 0..3u16 {
        push_chain(
            &rx,
            i,
            &[Desc::write(RX_BUF + u64::from(i) * 0x1000, RX_LEN)],
        );
    }
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i * 200, i as u8)).collect();
    peer.write_all(&frames.iter().flat_map(|f| framed(f)).collect::<Vec<u8>>())
        .unwrap();

    net.process_socket(EventSet::IN).unwrap();

    for (i, sent) in frames.iter().enumerate() {
        assert_eq!(used(&rx, i), (i as u32, (NET_HDR_SIZE + sent.len()) as u32));
        let at = RX_BUF + i as u64 * 0x1000 + NET_HDR_SIZE as u64;
        assert_eq!(&read_guest(&mem, at, sent.len()), sent);
    }
}

#[test]
fn rx_frame_split_across_reads_is_delivered_once_complete() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let sent = framed(&frame(FRAME, 10));
    peer.write_all(&sent[..2]).unwrap();
    net.process_socket(EventSet::IN).unwrap();
    peer.write_all(&sent[2..500]).unwrap();
    net.process_socket(EventSet::IN).unwrap();
    let used_before_rest = used_count(&rx);
    peer.write_all(&sent[500..]).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert_eq!(used_before_rest, 0);
    assert_eq!(used(&rx, 0), (0, (NET_HDR_SIZE + FRAME) as u32));
    assert_eq!(read_guest(&mem, RX_BUF + 12, FRAME), sent[4..]);
}

#[test]
fn rx_chain_with_readable_descriptor_is_returned_and_frame_goes_to_next() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::read(RX_BUF, RX_LEN)]);
    push_chain(&rx, 1, &[Desc::write(RX_BUF + 0x1000, RX_LEN)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let sent = frame(FRAME, 11);
    peer.write_all(&framed(&sent)).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert_eq!(used(&rx, 0), (0, 0));
    assert_eq!(used(&rx, 1), (1, (NET_HDR_SIZE + FRAME) as u32));
    assert_eq!(read_guest(&mem, RX_BUF + 0x1000 + 12, FRAME), sent);
    assert_eq!(net.stats().rx_bad_chains, 1);
}

#[test]
fn rx_chain_outside_memory_is_returned_unused() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(MEM_SIZE as u64 - 100, RX_LEN)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    peer.write_all(&framed(&frame(FRAME, 12))).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert_eq!(used(&rx, 0), (0, 0));
    assert_eq!(net.stats().rx_frames, 0);
}

#[test]
fn rx_frame_larger_than_buffer_is_dropped_and_chain_reused() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, 200)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let small = frame(100, 13);
    peer.write_all(&framed(&frame(FRAME, 14))).unwrap();
    peer.write_all(&framed(&small)).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert_eq!(used_count(&rx), 1);
    assert_eq!(used(&rx, 0), (0, (NET_HDR_SIZE + 100) as u32));
    assert_eq!(read_guest(&mem, RX_BUF + 12, 100), small);
    assert_eq!(net.stats().rx_dropped, 1);
}

#[test]
fn rx_without_buffers_holds_frame_and_stops_reading_until_queue_notified() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let first = frame(FRAME, 15);
    let second = framed(&frame(FRAME, 16));
    peer.write_all(&framed(&first)).unwrap();
    net.process_socket(EventSet::IN).unwrap();
    peer.write_all(&second).unwrap();
    net.process_socket(EventSet::IN).unwrap();
    let unread_while_starved = unread_bytes(&net);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    push_chain(&rx, 1, &[Desc::write(RX_BUF + 0x1000, RX_LEN)]);

    net.process_rx().unwrap();

    assert_eq!(unread_while_starved, second.len());
    assert_eq!(used_count(&rx), 2);
    assert_eq!(read_guest(&mem, RX_BUF + 12, FRAME), first);
    assert_eq!(read_guest(&mem, RX_BUF + 0x1000 + 12, FRAME), second[4..]);
}

#[test]
fn rx_zero_length_from_peer_takes_link_down() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    let (mut net, mut peer, interrupt) = activated(&mem, &rx, &tx);
    peer.write_all(&[0, 0, 0, 0, 0xff, 0xff]).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert!(!net.link_up());
    assert_eq!(status(&net), 0);
    assert_eq!(interrupt.config_count(), 1);
    assert_eq!(used_count(&rx), 0);
}

#[test]
fn rx_length_above_maximum_takes_link_down() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    let (mut net, mut peer, interrupt) = activated(&mem, &rx, &tx);
    peer.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
        .unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert!(!net.link_up());
    assert_eq!(interrupt.config_count(), 1);
}

#[test]
fn rx_frame_shorter_than_ethernet_header_is_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    peer.write_all(&framed(&[1, 2, 3])).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert!(net.link_up());
    assert_eq!(used_count(&rx), 0);
    assert_eq!(net.stats().rx_dropped, 1);
}

#[test]
fn peer_close_takes_link_down_with_config_interrupt() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (mut net, peer, interrupt) = activated(&mem, &rx, &tx);
    drop(peer);

    net.process_socket(EventSet::IN | EventSet::HANG_UP)
        .unwrap();

    assert!(!net.link_up());
    assert_eq!(status(&net), 0);
    assert_eq!(interrupt.config_count(), 1);
}

#[test]
fn tx_with_link_down_is_consumed_and_dropped() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (mut net, peer, _interrupt) = activated(&mem, &rx, &tx);
    drop(peer);
    net.process_socket(EventSet::IN | EventSet::HANG_UP)
        .unwrap();
    let len = write_tx(&mem, TX_BUF, &frame(FRAME, 17));
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    push_chain(&tx, 1, &[Desc::read(TX_BUF, len)]);

    net.process_tx().unwrap();

    assert_eq!(used_count(&tx), 2);
    assert_eq!(
        net.stats(),
        NetStats {
            tx_dropped: 2,
            ..NetStats::default()
        }
    );
}

#[test]
fn tx_to_closed_peer_takes_link_down_and_drops_frame() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (mut net, peer, interrupt) = activated(&mem, &rx, &tx);
    drop(peer);
    let len = write_tx(&mem, TX_BUF, &frame(FRAME, 18));
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);

    // The write fails (EPIPE) before any readiness event reports the hang-up.
    net.process_tx().unwrap();

    assert!(!net.link_up());
    assert_eq!(used(&tx, 0), (0, 0));
    assert_eq!(interrupt.config_count(), 1);
}

/// Delivers one frame to a device whose driver acked `VIRTIO_RING_F_EVENT_IDX` and set
/// `used_event`; returns the queue interrupts raised.
fn rx_interrupts_with_used_event(used_event: u16) -> u32 {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    // The mock lays its used ring over the end of the avail ring; with one used element the
    // two do not meet, so used_event keeps its value.
    let at = rx.avail_addr().0 + 4 + 2 * u64::from(super::test_utils::QUEUE_LEN);
    mem.write_obj(used_event, vm_memory::GuestAddress(at))
        .unwrap();
    let (mut net, mut peer, interrupt) = activated(&mem, &rx, &tx);
    net.reset();
    net.set_acked_features(net.avail_features());
    let queues = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    net.activate(mem.clone(), interrupt.clone(), queues)
        .unwrap();
    peer.write_all(&framed(&frame(FRAME, 19))).unwrap();

    net.process_socket(EventSet::IN).unwrap();

    assert_eq!(used_count(&rx), 1);
    interrupt.count()
}

#[test]
fn rx_with_event_idx_used_event_reached_interrupts() {
    assert_eq!(rx_interrupts_with_used_event(0), 1);
}

#[test]
fn rx_with_event_idx_used_event_ahead_does_not_interrupt() {
    assert_eq!(rx_interrupts_with_used_event(5), 0);
}

#[test]
fn mac_parses_colon_separated_hex() {
    assert_eq!(
        "02:42:AC:00:00:0f".parse::<MacAddr>(),
        Ok(MacAddr([0x02, 0x42, 0xac, 0, 0, 0x0f]))
    );
}

#[test]
fn mac_display_round_trips() {
    assert_eq!(MAC.to_string().parse::<MacAddr>(), Ok(MAC));
}

#[test]
fn mac_with_wrong_shape_fails() {
    for bad in [
        "02:42:ac:00:00",
        "02:42:ac:00:00:02:03",
        "2:42:ac:00:00:02",
        "zz:42:ac:00:00:02",
        "",
    ] {
        assert_eq!(
            bad.parse::<MacAddr>(),
            Err(ParseMacError::Syntax(bad.to_owned())),
            "{bad}"
        );
    }
}

#[test]
fn mac_multicast_or_zero_fails() {
    for bad in ["01:00:5e:00:00:01", "00:00:00:00:00:00"] {
        assert_eq!(
            bad.parse::<MacAddr>(),
            Err(ParseMacError::NotUnicast(bad.to_owned())),
            "{bad}"
        );
    }
}

#[test]
fn peer_reads_nothing_extra_after_tx() {
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let sent = frame(FRAME, 21);
    let len = write_tx(&mem, TX_BUF, &sent);
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);

    net.process_tx().unwrap();

    let got = drain_peer(&mut peer);
    assert_eq!(got, framed(&sent));
    peer.set_nonblocking(true).unwrap();
    let mut extra = [0u8; 1];
    assert_eq!(
        peer.read(&mut extra).map_err(|e| e.kind()),
        Err(ErrorKind::WouldBlock)
    );
}

#[test]
fn interest_polls_socket_edge_triggered_both_ways() {
    use crate::EventSubscriber;
    use std::os::fd::AsRawFd;
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (net, _peer, _interrupt) = activated(&mem, &rx, &tx);

    let interest = net.interest();

    let socket = net.socket().as_raw_fd();
    assert!(interest.contains(&(
        socket,
        EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED
    )));
    assert_eq!(interest.len(), 3);
}

#[test]
fn tx_queue_event_sends_the_frame() {
    use crate::EventSubscriber;
    use std::os::fd::AsRawFd;
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let sent = frame(FRAME, 22);
    let len = write_tx(&mem, TX_BUF, &sent);
    push_chain(&tx, 0, &[Desc::read(TX_BUF, len)]);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let event = net.queue_event(super::TX_QUEUE);
    event.write(1).unwrap();
    let fd = event.as_raw_fd();

    net.process(fd, EventSet::IN);

    assert_eq!(read_peer(&mut peer, 4 + FRAME), framed(&sent));
}

#[test]
fn rx_queue_event_delivers_a_held_frame() {
    use crate::EventSubscriber;
    use std::os::fd::AsRawFd;
    let mem = memory();
    let (rx, tx) = mock_queues(&mem);
    let (mut net, mut peer, _interrupt) = activated(&mem, &rx, &tx);
    let sent = frame(FRAME, 23);
    peer.write_all(&framed(&sent)).unwrap();
    let socket = net.socket().as_raw_fd();
    net.process(socket, EventSet::IN);
    push_chain(&rx, 0, &[Desc::write(RX_BUF, RX_LEN)]);
    let event = net.queue_event(super::RX_QUEUE);
    event.write(1).unwrap();
    let fd = event.as_raw_fd();

    net.process(fd, EventSet::IN);

    assert_eq!(used(&rx, 0), (0, (NET_HDR_SIZE + FRAME) as u32));
    assert_eq!(read_guest(&mem, RX_BUF + 12, FRAME), sent);
}
