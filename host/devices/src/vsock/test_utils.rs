//! Helpers for the vsock tests: packets in plain host buffers, and a guest driving the device's
//! queues in test memory.

use std::collections::VecDeque;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestAddress};

use super::packet::{ConnKey, Header};
use super::queue::{process_rx, process_tx};
use super::{VsockMuxer, HOST_CID, TYPE_STREAM};
use crate::GuestMemoryMmap;

/// The guest's context ID in every test.
pub const GUEST_CID: u64 = 3;

/// A guest-to-host header for connection `key`.
pub fn guest_header(key: ConnKey, op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: key.peer_port,
        dst_port: key.local_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A packet in host memory: a header and an optional payload buffer.
#[derive(Debug)]
pub struct PacketBuf {
    header: [u8; PKT_HEADER_SIZE],
    data: Vec<u8>,
}

impl PacketBuf {
    /// An RX-style buffer with `room` bytes for a payload.
    pub fn new(room: usize) -> Self {
        Self {
            header: [0; PKT_HEADER_SIZE],
            data: vec![0; room],
        }
    }

    /// A TX-style packet carrying `header` and `payload`.
    pub fn with_data(header: Header, payload: &[u8]) -> Self {
        Self {
            header: header.to_bytes(),
            data: payload.to_vec(),
        }
    }

    /// The packet over these buffers.
    pub fn packet(&mut self) -> VsockPacket<'_, ()> {
        let data = (!self.data.is_empty()).then_some(&mut self.data[..]);
        // SAFETY: both buffers are borrowed mutably for the packet's lifetime, and nothing else
        // touches them meanwhile.
        unsafe { VsockPacket::new(&mut self.header, data) }.expect("header buffer has the size")
    }

    /// The header as written, and the payload bytes it announces.
    pub fn contents(&self) -> (Header, Vec<u8>) {
        let header = Header::from_bytes(&self.header);
        let data = self.data[..header.len as usize].to_vec();
        (header, data)
    }
}

/// Descriptor addresses at or above this are absolute rather than offsets in a slot.
pub const ABSOLUTE: u64 = 0x1_0000_0000;
/// Where the two test queues live; buffers start above them.
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
/// Each ring slot owns a fixed buffer area, reused only after the device returned it.
const RX_BUFFERS: u64 = 0x10_0000;
const TX_BUFFERS: u64 = 0x30_0000;
const SLOT_SIZE: u64 = 0x2_0000;
/// Payload room of every RX buffer, as a Linux guest gives (a page).
pub const RX_ROOM: u32 = 4096;
/// Size of the test guest memory.
const MEM_SIZE: usize = 0x80_0000;
/// Ring size of both test queues.
pub const TEST_QUEUE_SIZE: u16 = 32;
/// Descriptors reserved per slot: a chain has at most this many.
const DESCS_PER_SLOT: u16 = 4;
/// Slots per queue.
const SLOTS: u16 = TEST_QUEUE_SIZE / DESCS_PER_SLOT;

/// Guest memory large enough for both test queues and their buffers.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory")
}

/// One side of a split queue as the guest driver sees it. The rings are laid out here rather
/// than by virtio-queue's `MockSplitQueue`, whose used ring overlaps the available ring once
/// more than a few entries are in use.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// Slots offered and not yet returned, oldest first.
    in_flight: VecDeque<u16>,
    next_slot: u16,
    avail_idx: u16,
    used_seen: u16,
    buffers: u64,
}

impl<'a> DriverQueue<'a> {
    fn new(mem: &'a GuestMemoryMmap, ring: u64, buffers: u64) -> Self {
        let queue = Self {
            mem,
            desc_table: ring,
            avail_ring: ring + 0x1000,
            used_ring: ring + 0x2000,
            in_flight: VecDeque::new(),
            next_slot: 0,
            avail_idx: 0,
            used_seen: 0,
            buffers,
        };
        // Flags and indices of both rings start at zero.
        queue.write_u16(queue.avail_ring, 0);
        queue.write_u16(queue.avail_ring + 2, 0);
        queue.write_u16(queue.used_ring, 0);
        queue.write_u16(queue.used_ring + 2, 0);
        queue
    }

    fn write_u16(&self, addr: u64, value: u16) {
        self.mem
            .write_obj(value.to_le(), GuestAddress(addr))
            .expect("ring write");
    }

    fn read_u16(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).expect("ring read"))
    }

    fn read_u32(&self, addr: u64) -> u32 {
        u32::from_le(self.mem.read_obj(GuestAddress(addr)).expect("ring read"))
    }

    /// The device's view of this queue.
    pub fn device_queue(&self) -> Queue {
        let mut queue = Queue::new(TEST_QUEUE_SIZE).expect("queue");
        queue.set_size(TEST_QUEUE_SIZE);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (low, high) = split(self.desc_table);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(self.avail_ring);
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(self.used_ring);
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
        queue
    }

    /// Whether another chain fits.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < usize::from(SLOTS)
    }

    fn slot_addr(&self, slot: u16) -> u64 {
        self.buffers + u64::from(slot) * SLOT_SIZE
    }

    /// Offers a chain of `descs` (address offsets within the slot's buffer area, or absolute
    /// addresses at or above [`ABSOLUTE`]).
    fn offer(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        assert!(self.has_room(), "test queue full");
        assert!(
            descs.len() <= usize::from(DESCS_PER_SLOT),
            "too many descriptors"
        );
        let slot = self.next_slot;
        self.next_slot = (self.next_slot + 1) % SLOTS;
        let base = self.slot_addr(slot);
        let first = slot * DESCS_PER_SLOT;
        for (i, (offset, len, write)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if *write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let index = first + i as u16;
            let addr = if *offset >= ABSOLUTE {
                *offset
            } else {
                base + offset
            };
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, *len, flags, index + 1));
            self.mem
                .write_obj(desc, GuestAddress(self.desc_table + u64::from(index) * 16))
                .expect("descriptor");
        }
        let entry = self.avail_ring + 4 + u64::from(self.avail_idx % TEST_QUEUE_SIZE) * 2;
        self.write_u16(entry, first);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.avail_ring + 2, self.avail_idx);
        self.in_flight.push_back(slot);
        slot
    }

    /// Chains the device returned since the last call: `(slot, used length)`.
    fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx = self.read_u16(self.used_ring + 2);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let elem = self.used_ring + 4 + u64::from(self.used_seen % TEST_QUEUE_SIZE) * 8;
            let head = u16::try_from(self.read_u32(elem)).expect("head index");
            let len = self.read_u32(elem + 4);
            assert_eq!(
                head % DESCS_PER_SLOT,
                0,
                "used element {head} is not a chain head"
            );
            let slot = head / DESCS_PER_SLOT;
            let pos = self
                .in_flight
                .iter()
                .position(|s| *s == slot)
                .expect("returned chain was offered");
            self.in_flight.remove(pos);
            out.push((slot, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A guest with an RX and a TX queue in test memory, driving a muxer through the same queue
/// functions a transport uses.
pub struct TestGuest<'a> {
    mem: &'a GuestMemoryMmap,
    /// The RX queue as the driver sees it.
    pub rx: DriverQueue<'a>,
    /// The TX queue as the driver sees it.
    pub tx: DriverQueue<'a>,
    /// The device's RX queue.
    pub rx_queue: Queue,
    /// The device's TX queue.
    pub tx_queue: Queue,
}

impl<'a> TestGuest<'a> {
    /// A guest with empty queues.
    pub fn new(mem: &'a GuestMemoryMmap) -> Self {
        let rx = DriverQueue::new(mem, RX_RING, RX_BUFFERS);
        let tx = DriverQueue::new(mem, TX_RING, TX_BUFFERS);
        let rx_queue = rx.device_queue();
        let tx_queue = tx.device_queue();
        Self {
            mem,
            rx,
            tx,
            rx_queue,
            tx_queue,
        }
    }

    /// Queues a packet on TX without processing it.
    pub fn queue_tx(&mut self, header: Header, payload: &[u8]) {
        let mut header = header;
        header.len = payload.len() as u32;
        let slot = self.tx.next_slot;
        let base = self.tx.slot_addr(slot);
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(base))
            .expect("write header");
        if payload.is_empty() {
            self.tx.offer(&[(0, PKT_HEADER_SIZE as u32, false)]);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(base + 0x100))
                .expect("write payload");
            self.tx.offer(&[
                (0, PKT_HEADER_SIZE as u32, false),
                (0x100, payload.len() as u32, false),
            ]);
        }
    }

    /// Sends one packet through the TX queue; the device must consume it.
    pub fn send(&mut self, muxer: &mut VsockMuxer, header: Header, payload: &[u8]) {
        self.queue_tx(header, payload);
        self.run_tx(muxer);
    }

    /// Lets the device process TX; returns the chains it completed.
    pub fn run_tx(&mut self, muxer: &mut VsockMuxer) -> Vec<(u16, u32)> {
        process_tx(muxer, &mut self.tx_queue, self.mem).expect("process tx");
        self.tx_completed()
    }

    /// TX chains the device returned since the last call.
    pub fn tx_completed(&mut self) -> Vec<(u16, u32)> {
        self.tx.take_used()
    }

    /// Offers an RX buffer with a header descriptor and [`RX_ROOM`] bytes of payload room.
    pub fn offer_rx(&mut self) {
        self.rx
            .offer(&[(0, PKT_HEADER_SIZE as u32, true), (0x100, RX_ROOM, true)]);
    }

    /// Offers a raw TX chain `(offset, len, device-writable)` without processing it.
    pub fn offer_tx_chain(&mut self, descs: &[(u64, u32, bool)]) {
        self.tx.offer(descs);
    }

    /// Offers a raw RX chain `(offset, len, device-writable)`.
    pub fn offer_rx_chain(&mut self, descs: &[(u64, u32, bool)]) {
        self.rx.offer(descs);
    }

    /// Lets the device fill RX buffers; returns the packets it delivered, in order.
    pub fn recv(&mut self, muxer: &mut VsockMuxer) -> Vec<(Header, Vec<u8>)> {
        process_rx(muxer, &mut self.rx_queue, self.mem).expect("process rx");
        self.delivered()
    }

    /// The device's three queues (RX, TX, event), for a device that runs the queues itself
    /// rather than through this guest's [`TestGuest::recv`] and [`TestGuest::run_tx`].
    pub fn device_queues(&self) -> Vec<Queue> {
        let event = Queue::new(TEST_QUEUE_SIZE).expect("queue");
        vec![self.rx.device_queue(), self.tx.device_queue(), event]
    }

    /// Packets the device put in RX buffers since the last call.
    pub fn delivered(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.rx
            .take_used()
            .into_iter()
            .map(|(slot, len)| {
                let base = self.rx.slot_addr(slot);
                let mut raw = [0u8; PKT_HEADER_SIZE];
                self.mem
                    .read_slice(&mut raw, GuestAddress(base))
                    .expect("read header");
                let header = Header::from_bytes(&raw);
                assert_eq!(len, PKT_HEADER_SIZE as u32 + header.len, "used length");
                let mut data = vec![0u8; header.len as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(base + 0x100))
                    .expect("read payload");
                (header, data)
            })
            .collect()
    }

    /// Offers RX buffers until the ring is half full, then lets the device fill them.
    pub fn recv_all(&mut self, muxer: &mut VsockMuxer) -> Vec<(Header, Vec<u8>)> {
        while self.rx.has_room() {
            self.offer_rx();
        }
        self.recv(muxer)
    }

    /// Returned RX chains with their raw used length, for malformed-buffer tests.
    pub fn recv_raw(&mut self, muxer: &mut VsockMuxer) -> Vec<(u16, u32)> {
        process_rx(muxer, &mut self.rx_queue, self.mem).expect("process rx");
        self.rx.take_used()
    }

    /// Offers a raw TX chain (for malformed-packet tests) and lets the device process TX.
    pub fn send_raw(
        &mut self,
        muxer: &mut VsockMuxer,
        descs: &[(u64, u32, bool)],
        header: Option<Header>,
    ) -> Vec<(u16, u32)> {
        let base = self.tx.slot_addr(self.tx.next_slot);
        if let Some(header) = header {
            self.mem
                .write_slice(&header.to_bytes(), GuestAddress(base))
                .expect("write header");
        }
        self.tx.offer(descs);
        self.run_tx(muxer)
    }

    /// Writes `bytes` at `offset` in the buffer area of the next TX slot, to lay out a raw
    /// chain before [`TestGuest::send_raw`].
    pub fn write_tx_bytes(&mut self, offset: u64, bytes: &[u8]) {
        let base = self.tx.slot_addr(self.tx.next_slot);
        self.mem
            .write_slice(bytes, GuestAddress(base + offset))
            .expect("write tx bytes");
    }
}
