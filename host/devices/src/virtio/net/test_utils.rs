//! Test helpers for virtio-net: RX and TX mock queues side by side, a device activated on them
//! with its backend on one end of a socket pair, and frames as the guest and the peer lay them
//! out.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::{MacAddr, Net, NET_HDR_SIZE};
use crate::virtio::test_utils::{CountingInterrupt, BUFFERS};
use crate::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use crate::GuestMemoryMmap;

/// Size of the mock queues.
pub const QUEUE_LEN: u16 = 16;
/// Where the TX mock queue's rings start (the RX queue's start at 0; 16 entries need < 1 KiB).
const TX_RING: u64 = 0x1_0000;
/// Where RX buffers go.
pub const RX_BUF: u64 = BUFFERS;
/// Where TX buffers go: 1 MiB above the RX buffers, below the end of test memory.
pub const TX_BUF: u64 = BUFFERS + 0x10_0000;
/// The MAC the test device has.
pub const MAC: MacAddr = MacAddr([0x02, 0x42, 0xac, 0x00, 0x00, 0x02]);
/// How long a test waits for bytes the device wrote to the peer.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// The RX and TX mock queues.
pub fn mock_queues(
    mem: &GuestMemoryMmap,
) -> (
    MockSplitQueue<'_, GuestMemoryMmap>,
    MockSplitQueue<'_, GuestMemoryMmap>,
) {
    (
        MockSplitQueue::create(mem, GuestAddress(0), QUEUE_LEN),
        MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_LEN),
    )
}

/// A device whose driver acked every offered feature but `VIRTIO_RING_F_EVENT_IDX` (so every
/// completion interrupts), activated on `rx` and `tx`; the peer end of its socket (blocking,
/// with a read timeout); and the interrupt it signals.
pub fn activated(
    mem: &GuestMemoryMmap,
    rx: &MockSplitQueue<GuestMemoryMmap>,
    tx: &MockSplitQueue<GuestMemoryMmap>,
) -> (Net<UnixStream>, UnixStream, Arc<CountingInterrupt>) {
    let (ours, peer) = UnixStream::pair().expect("socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_read_timeout(Some(PEER_TIMEOUT))
        .expect("read timeout");
    let mut net = Net::new(ours, MAC).expect("eventfds");
    net.set_acked_features(net.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX));
    let interrupt = Arc::new(CountingInterrupt::default());
    let queues = vec![
        rx.create_queue().expect("valid mock queue"),
        tx.create_queue().expect("valid mock queue"),
    ];
    net.activate(mem.clone(), interrupt.clone(), queues)
        .expect("activate");
    (net, peer, interrupt)
}

/// A frame of `len` bytes whose content depends on `seed`, so frames are told apart.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// `frame` as the stream carries it: a 4-byte big-endian length first.
pub fn framed(frame: &[u8]) -> Vec<u8> {
    let mut out = (frame.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(frame);
    out
}

/// Writes a zeroed virtio-net header and `frame` at `addr`; returns their total length.
pub fn write_tx(mem: &GuestMemoryMmap, addr: u64, frame: &[u8]) -> u32 {
    mem.write_slice(&[0u8; NET_HDR_SIZE], GuestAddress(addr))
        .expect("inside test memory");
    mem.write_slice(frame, GuestAddress(addr + NET_HDR_SIZE as u64))
        .expect("inside test memory");
    (NET_HDR_SIZE + frame.len()) as u32
}

/// `len` bytes of guest memory at `addr`.
pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .expect("inside test memory");
    buf
}

/// Exactly `len` bytes from the peer, waiting up to the read timeout.
pub fn read_peer(peer: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    peer.read_exact(&mut buf).expect("the device wrote them");
    buf
}

/// Whatever the peer can read without waiting.
pub fn drain_peer(peer: &mut UnixStream) -> Vec<u8> {
    peer.set_nonblocking(true).expect("non-blocking");
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match peer.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("peer read: {e}"),
        }
    }
    peer.set_nonblocking(false).expect("blocking");
    out
}

/// Bytes the device has not read from its end of the socket.
pub fn unread_bytes(net: &Net<UnixStream>) -> usize {
    use std::os::fd::AsRawFd;
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(net.socket().as_raw_fd(), libc::FIONREAD, &mut pending) };
    assert_eq!(rc, 0, "FIONREAD");
    pending as usize
}
