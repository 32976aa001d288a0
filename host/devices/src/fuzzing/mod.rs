//! Guest-input generation for randomized device tests and `cargo fuzz` targets.
//!
//! A guest controls every byte the device models read from it: descriptor tables, ring
//! indices, request headers. This module builds such guest state at random (descriptors
//! outside guest memory, zero and huge lengths, every flag combination, looping `next`
//! indices, corrupt available indices) from a [`GuestRng`], drives a device over it, and
//! checks what must hold whatever the guest wrote:
//!
//! - the call returns without a panic;
//! - the device completes no more chains than were offered, every used element names a chain
//!   head below the queue size, and its length never exceeds the writable bytes of that chain;
//! - the device writes nothing in the descriptor tables or the available ring (every
//!   generated buffer lies above the rings, so a write there would be out of bounds);
//! - a disk image never changes size.
//!
//! A violation panics, which is how both `cargo test` and libFuzzer report it. The same
//! scenarios run from a seeded PRNG under `cargo test` (stable) and from fuzzer bytes in
//! `host/devices/fuzz` (nightly), so a crash found there replays here through
//! [`GuestRng::from_bytes`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::virtio::balloon::{self, Balloon};
use crate::virtio::block::{self, Block, Disk};
use crate::virtio::mmio::{self, MmioTransport};
use crate::virtio::net::{self, MacAddr, Net};
use crate::virtio::rng::{EntropySource, Rng};
use crate::virtio::{InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::vsock::queue::{process_rx, process_tx};
use crate::vsock::{op, Header, MuxerConfig, VsockMuxer, HOST_CID, PKT_HEADER_SIZE, TYPE_STREAM};
use crate::GuestMemoryMmap;

/// Start of the buffer area: every generated buffer address lies at or above it (or outside
/// guest memory), the rings and indirect tables below it.
pub const BUFFERS: u64 = 0x10_0000;
/// End of the first memory region.
pub const REGION0_END: u64 = 0x20_0000;
/// Start of the second memory region; the gap before it is not guest memory.
pub const REGION1_START: u64 = 0x21_0000;
/// End of guest memory.
pub const MEM_END: u64 = 0x31_0000;
/// Largest queue the generator builds.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Page 0 is left unused: a balloon page frame number of zero (untouched memory) releases it.
const RINGS_START: u64 = 0x1_0000;
/// Distance between the rings of consecutive queues.
const QUEUE_STRIDE: u64 = 0x2_0000;
/// Offsets inside a queue's area (a 256-entry ring fits each).
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
const INDIRECT_OFFSET: u64 = 0x3000;
/// Indirect tables per queue, each of up to [`INDIRECT_MAX`] descriptors.
const INDIRECT_TABLES: u64 = 16;
const INDIRECT_MAX: u64 = 16;
const INDIRECT_STRIDE: u64 = INDIRECT_MAX * 16;
/// Guest-controlled bytes written at the start of every buffer.
const FILL_BYTES: usize = 64;

/// A small deterministic source of guest decisions: splitmix64 from a seed, or the bytes a
/// fuzzer gives (then zeros once they run out, so every input is a finite guest).
#[derive(Debug, Clone)]
pub struct GuestRng {
    state: u64,
    bytes: Option<(Vec<u8>, usize)>,
}

impl GuestRng {
    /// A generator seeded with `seed`.
    pub fn from_seed(seed: u64) -> Self {
        Self {
            state: seed,
            bytes: None,
        }
    }

    /// A generator that replays `data`.
    pub fn from_bytes(data: &[u8]) -> Self {
        Self {
            state: 0,
            bytes: Some((data.to_vec(), 0)),
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        if let Some((data, pos)) = &mut self.bytes {
            let mut word = [0u8; 8];
            let end = (*pos + 8).min(data.len());
            let take = end.saturating_sub(*pos);
            word[..take].copy_from_slice(&data[*pos..end]);
            *pos = end.max(*pos);
            return u64::from_le_bytes(word);
        }
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `choices`.
    pub fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len() as u64) as usize]
    }

    /// A buffer address: mostly inside guest memory, often at a region's edge, in the gap,
    /// past the end or about to wrap; never among the rings.
    pub fn buffer_addr(&mut self) -> u64 {
        match self.below(20) {
            0..=9 => BUFFERS + self.below(REGION0_END - BUFFERS),
            10..=12 => REGION1_START + self.below(MEM_END - REGION1_START),
            13 => REGION0_END - self.below(FILL_BYTES as u64 + 1),
            14 => MEM_END - self.below(FILL_BYTES as u64 + 1),
            15 => REGION0_END + self.below(REGION1_START - REGION0_END),
            16 => MEM_END + self.below(0x1000),
            17 => u64::MAX - self.below(0x1000),
            18 => (1 << 32) - self.below(0x100),
            _ => self.next_u64().max(BUFFERS),
        }
    }

    /// A buffer length: zero, small, typical, large or huge.
    pub fn buffer_len(&mut self) -> u32 {
        match self.below(20) {
            0..=2 => 0,
            3..=8 => 1 + self.below(64) as u32,
            9..=11 => self.pick(&[1, 16, 44, 512, 1024, 4096]),
            12..=15 => self.below(0x1_0000) as u32,
            16 => 0x1_0000 + self.below(0x1_0000) as u32,
            17..=18 => u32::MAX - self.below(16) as u32,
            _ => self.next_u64() as u32,
        }
    }
}

/// Where a scenario's queue `index` lives in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    base: u64,
}

impl QueueLayout {
    /// The area of queue `index` (0 to 3).
    pub fn new(index: u64) -> Self {
        Self {
            base: RINGS_START + index * QUEUE_STRIDE,
        }
    }

    fn desc_table(self) -> u64 {
        self.base
    }
    fn avail(self) -> u64 {
        self.base + AVAIL_OFFSET
    }
    fn used(self) -> u64 {
        self.base + USED_OFFSET
    }
    fn indirect(self, table: u64) -> u64 {
        self.base + INDIRECT_OFFSET + table * INDIRECT_STRIDE
    }
    /// The bytes only the driver writes: descriptor table, available ring, indirect tables.
    fn driver_areas(self) -> [(u64, usize); 2] {
        [
            (self.base, USED_OFFSET as usize),
            (
                self.indirect(0),
                (INDIRECT_TABLES * INDIRECT_STRIDE) as usize,
            ),
        ]
    }
}

/// What goes in the first bytes of a buffer: `head` tells whether it starts a chain (where
/// devices read their request header).
pub type Filler<'f> = &'f mut dyn FnMut(&mut GuestRng, bool, &mut [u8; FILL_BYTES]);

/// A random queue written into guest memory, and what the device may do with it.
#[derive(Debug)]
pub struct GuestQueue {
    layout: QueueLayout,
    size: u16,
    /// Chains the driver made available, as the device will see them.
    offered: usize,
    /// Per head index, the most writable bytes any chain starting there has.
    writable: Vec<Option<u64>>,
    /// The driver-owned bytes before the device ran.
    snapshot: Vec<Vec<u8>>,
}

/// Guest memory of two regions with an unmapped gap between them.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), REGION0_END as usize),
        (
            GuestAddress(REGION1_START),
            (MEM_END - REGION1_START) as usize,
        ),
    ])
    .expect("the fuzzing memory layout is valid")
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
    mem.write_obj(desc, GuestAddress(at))
        .expect("descriptor tables lie inside guest memory");
}

fn random_flags(rng: &mut GuestRng) -> u16 {
    if rng.chance(3) {
        return rng.next_u64() as u16;
    }
    let mut flags = 0;
    if rng.chance(60) {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    if rng.chance(50) {
        flags |= VRING_DESC_F_WRITE as u16;
    }
    if rng.chance(8) {
        flags |= VRING_DESC_F_INDIRECT as u16;
    }
    flags
}

fn random_next(rng: &mut GuestRng, index: u16, count: u16) -> u16 {
    match rng.below(20) {
        0..=13 => index.wrapping_add(1),
        14..=16 => rng.below(u64::from(count)) as u16,
        17..=18 => rng.below(u64::from(index) + 1) as u16,
        _ => rng.next_u64() as u16,
    }
}

fn fill_buffer(mem: &GuestMemoryMmap, rng: &mut GuestRng, filler: Filler, addr: u64, head: bool) {
    let mut bytes = [0u8; FILL_BYTES];
    for b in bytes.iter_mut() {
        *b = rng.next_u64() as u8;
    }
    filler(rng, head, &mut bytes);
    // A buffer at an edge or outside memory keeps whatever part of it is guest memory.
    let _ = mem.write_slice(&bytes, GuestAddress(addr));
}

impl GuestQueue {
    /// Writes a random queue of at most `max_size` entries at `layout` and returns it.
    pub fn generate(
        mem: &GuestMemoryMmap,
        rng: &mut GuestRng,
        layout: QueueLayout,
        max_size: u16,
        filler: Filler,
    ) -> Self {
        let sizes: Vec<u16> = [1u16, 2, 4, 8, 8, 16, 16, 32, 256]
            .into_iter()
            .filter(|s| *s <= max_size)
            .collect();
        let size = rng.pick(&sizes);
        let mut used_tables = 0;
        for i in 0..size {
            let mut flags = random_flags(rng);
            let (addr, len) = if flags & VRING_DESC_F_INDIRECT as u16 != 0
                && used_tables < INDIRECT_TABLES
                && rng.chance(80)
            {
                let table = layout.indirect(used_tables);
                used_tables += 1;
                let count = 1 + rng.below(INDIRECT_MAX) as u16;
                for j in 0..count {
                    let (addr, len) = (rng.buffer_addr(), rng.buffer_len());
                    let inner = random_flags(rng);
                    let next = random_next(rng, j, count);
                    write_desc(mem, table + u64::from(j) * 16, addr, len, inner, next);
                    fill_buffer(mem, rng, filler, addr, j == 0);
                }
                let len = if rng.chance(90) {
                    u32::from(count) * 16
                } else {
                    rng.buffer_len()
                };
                (table, len)
            } else {
                flags &= !(VRING_DESC_F_INDIRECT as u16) | rng.next_u64() as u16;
                let addr = rng.buffer_addr();
                fill_buffer(mem, rng, filler, addr, true);
                (addr, rng.buffer_len())
            };
            let next = random_next(rng, i, size);
            write_desc(
                mem,
                layout.desc_table() + u64::from(i) * 16,
                addr,
                len,
                flags,
                next,
            );
        }
        let avail_idx = if rng.chance(85) {
            rng.below(u64::from(size) + 1) as u16
        } else {
            rng.next_u64() as u16
        };
        let write_u16 = |addr: u64, value: u16| {
            mem.write_obj(value.to_le(), GuestAddress(addr))
                .expect("rings lie inside guest memory");
        };
        write_u16(layout.avail(), rng.below(4) as u16);
        write_u16(layout.avail() + 2, avail_idx);
        for j in 0..=size {
            // Entry `size` is `used_event`.
            let head = if rng.chance(90) {
                rng.below(u64::from(size)) as u16
            } else {
                rng.next_u64() as u16
            };
            write_u16(layout.avail() + 4 + 2 * u64::from(j), head);
        }
        write_u16(layout.used(), 0);
        write_u16(layout.used() + 2, 0);

        let mut queue = Self::device_queue_at(layout, size);
        let mut writable = vec![None; usize::from(size)];
        let mut offered = 0;
        if let Ok(iter) = queue.iter(mem) {
            for chain in iter {
                offered += 1;
                let head = usize::from(chain.head_index());
                let bytes: u64 = chain
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len()))
                    .sum();
                if let Some(slot) = writable.get_mut(head) {
                    *slot = Some(slot.map_or(bytes, |b: u64| b.max(bytes)));
                }
            }
        }
        let snapshot = layout
            .driver_areas()
            .iter()
            .map(|(addr, len)| read_bytes(mem, *addr, *len))
            .collect();
        Self {
            layout,
            size,
            offered,
            writable,
            snapshot,
        }
    }

    fn device_queue_at(layout: QueueLayout, size: u16) -> Queue {
        let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("the maximum queue size is valid");
        queue.set_size(size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (low, high) = split(layout.desc_table());
        queue.set_desc_table_address(low, high);
        let (low, high) = split(layout.avail());
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(layout.used());
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
        queue
    }

    /// The device's view of this queue.
    pub fn device_queue(&self) -> Queue {
        Self::device_queue_at(self.layout, self.size)
    }

    /// Panics if the device broke an invariant on this queue.
    pub fn check(&self, mem: &GuestMemoryMmap) {
        self.check_used(mem);
        self.check_driver_areas(mem);
    }

    /// Panics if a used element names no offered chain or claims more than it could write.
    pub fn check_used(&self, mem: &GuestMemoryMmap) {
        let read_u32 = |addr: u64| -> u32 {
            u32::from_le(
                mem.read_obj(GuestAddress(addr))
                    .expect("used ring inside memory"),
            )
        };
        let used_idx = read_u32(self.layout.used()) >> 16;
        assert!(
            used_idx as usize <= self.offered,
            "device completed {used_idx} chains, {} offered",
            self.offered
        );
        for i in 0..u64::from(used_idx) {
            let elem = self.layout.used() + 4 + 8 * i;
            let (id, len) = (read_u32(elem), read_u32(elem + 4));
            assert!(
                id < u32::from(self.size),
                "used head {id} >= queue size {}",
                self.size
            );
            let bound = self.writable[id as usize];
            assert!(
                bound.is_some_and(|b| u64::from(len) <= b),
                "used length {len} of head {id} exceeds its writable bytes {bound:?}"
            );
        }
    }

    /// Panics if the used ring holds more elements than the queue has entries, or a head at or
    /// above the queue size.
    pub fn check_used_heads(&self, mem: &GuestMemoryMmap) {
        let read_u32 = |addr: u64| -> u32 {
            u32::from_le(
                mem.read_obj(GuestAddress(addr))
                    .expect("used ring inside memory"),
            )
        };
        let used_idx = read_u32(self.layout.used()) >> 16;
        assert!(
            used_idx <= u32::from(self.size),
            "used index {used_idx} past the queue size"
        );
        for i in 0..u64::from(used_idx) {
            let id = read_u32(self.layout.used() + 4 + 8 * i);
            assert!(
                id < u32::from(self.size),
                "used head {id} >= queue size {}",
                self.size
            );
        }
    }

    /// Panics if the device wrote into the descriptor table, available ring or indirect
    /// tables.
    pub fn check_driver_areas(&self, mem: &GuestMemoryMmap) {
        for ((addr, len), before) in self.layout.driver_areas().iter().zip(&self.snapshot) {
            assert!(
                read_bytes(mem, *addr, *len) == *before,
                "device wrote into driver-owned ring memory at {addr:#x}"
            );
        }
    }
}

fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .expect("ring areas lie inside guest memory");
    buf
}

/// An interrupt that goes nowhere.
#[derive(Debug, Default)]
pub struct NullInterrupt;

impl VirtioInterrupt for NullInterrupt {
    fn signal(&self, _kind: InterruptKind) -> io::Result<()> {
        Ok(())
    }
}

/// Entropy of a fixed byte, so no test reads the host's entropy pool.
#[derive(Debug)]
pub struct PatternEntropy;

impl EntropySource for PatternEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0x5a);
        Ok(())
    }
}

/// The guest's context ID in the vsock scenarios.
pub const GUEST_CID: u64 = 3;
/// Ports the vsock scenarios use, few enough that packets meet existing connections.
const PORTS: [u32; 4] = [1024, 1025, 52, 0xffff_ffff];

fn vsock_filler(rng: &mut GuestRng, head: bool, bytes: &mut [u8; FILL_BYTES]) {
    if !head || rng.chance(10) {
        return;
    }
    let header = Header {
        src_cid: {
            let any = rng.next_u64();
            rng.pick(&[GUEST_CID, GUEST_CID, HOST_CID, any])
        },
        dst_cid: {
            let any = rng.next_u64();
            rng.pick(&[HOST_CID, HOST_CID, GUEST_CID, any])
        },
        src_port: rng.pick(&PORTS),
        dst_port: rng.pick(&PORTS),
        len: {
            let any = rng.next_u64();
            rng.pick(&[0, 0, 1, 16, 4096, 0x1_0000, 0x1_0001, any as u32])
        },
        type_: {
            let any = rng.next_u64();
            rng.pick(&[TYPE_STREAM, TYPE_STREAM, 2, any as u16])
        },
        op: {
            let any = rng.next_u64();
            rng.pick(&[
                op::REQUEST,
                op::RESPONSE,
                op::RST,
                op::SHUTDOWN,
                op::RW,
                op::CREDIT_UPDATE,
                op::CREDIT_REQUEST,
                any as u16,
            ])
        },
        flags: rng.below(4) as u32,
        buf_alloc: rng.pick(&[0, 4096, 256 * 1024, u32::MAX]),
        fwd_cnt: rng.next_u64() as u32,
    };
    bytes[..PKT_HEADER_SIZE].copy_from_slice(&header.to_bytes());
}

/// A muxer listening in a fresh temporary directory, which it must not outlive.
pub fn vsock_muxer(dir: &tempfile::TempDir) -> VsockMuxer {
    VsockMuxer::new(MuxerConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.path().join("vm.vsock"),
    })
    .expect("a muxer binds in a fresh directory")
}

/// One random guest against `muxer`: a TX queue of random chains, then an RX queue of random
/// buffers for whatever the muxer answers.
pub fn vsock_round(muxer: &mut VsockMuxer, rng: &mut GuestRng) {
    let mem = guest_memory();
    let max = crate::vsock::QUEUE_SIZE;
    let tx = GuestQueue::generate(&mem, rng, QueueLayout::new(0), max, &mut vsock_filler);
    let mut tx_queue = tx.device_queue();
    let _ = process_tx(muxer, &mut tx_queue, &mem);
    tx.check(&mem);

    let rx = GuestQueue::generate(&mem, rng, QueueLayout::new(1), max, &mut vsock_filler);
    let mut rx_queue = rx.device_queue();
    let _ = process_rx(muxer, &mut rx_queue, &mem);
    rx.check(&mem);
    let _ = muxer.process_events();
}

/// Sectors of the scenario disk images.
pub const DISK_SECTORS: u64 = 64;

/// A temporary disk image of [`DISK_SECTORS`] sectors.
pub fn disk_image() -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file can be created");
    file.write_all(&vec![0x11; (DISK_SECTORS * block::SECTOR_SIZE) as usize])
        .expect("the temporary image can be written");
    file
}

fn blk_filler(rng: &mut GuestRng, head: bool, bytes: &mut [u8; FILL_BYTES]) {
    use block::request_type as t;
    let sector = match rng.below(6) {
        0 => 0,
        1 => DISK_SECTORS - rng.below(4),
        2 => DISK_SECTORS + rng.below(4),
        3 => u64::MAX - rng.below(4),
        4 => u64::MAX >> block::SECTOR_SHIFT,
        _ => rng.below(DISK_SECTORS),
    };
    if head && rng.chance(90) {
        let kind = {
            let any = rng.next_u64();
            rng.pick(&[
                t::IN,
                t::OUT,
                t::FLUSH,
                t::GET_ID,
                t::DISCARD,
                t::WRITE_ZEROES,
                any as u32,
            ])
        };
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
    } else if !head && rng.chance(50) {
        // A discard or write-zeroes segment.
        let sectors = rng.pick(&[0, 1, 8, DISK_SECTORS as u32, u32::MAX]);
        bytes[..8].copy_from_slice(&sector.to_le_bytes());
        bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
        bytes[12..16].copy_from_slice(&(rng.below(3) as u32).to_le_bytes());
    }
}

/// One random guest against a virtio-blk device on `image`.
pub fn blk_round(image: &File, path: &std::path::Path, rng: &mut GuestRng) {
    let size = image.metadata().expect("image metadata").len();
    let read_only = rng.chance(20);
    let disk = Disk::open(path, read_only).expect("the image opens");
    let mut block = Block::new(disk).expect("an eventfd can be created");
    let offered = block.avail_features();
    block.set_acked_features(offered & rng.next_u64());
    let mem = guest_memory();
    let queue = GuestQueue::generate(
        &mem,
        rng,
        QueueLayout::new(0),
        block::QUEUE_SIZE,
        &mut blk_filler,
    );
    if block
        .activate(
            mem.clone(),
            Arc::new(NullInterrupt),
            vec![queue.device_queue()],
        )
        .is_ok()
    {
        let _ = block.process_queue();
    }
    queue.check(&mem);
    let after = image.metadata().expect("image metadata").len();
    assert_eq!(after, size, "the disk image changed size");
}

fn pfn_filler(rng: &mut GuestRng, _head: bool, bytes: &mut [u8; FILL_BYTES]) {
    let pages = |start: u64, end: u64| (start >> balloon::PFN_SHIFT, end >> balloon::PFN_SHIFT);
    for word in bytes.chunks_exact_mut(4) {
        let (first, end) = match rng.below(4) {
            0 => pages(BUFFERS, REGION0_END),
            1 => pages(REGION1_START, MEM_END),
            2 => pages(REGION0_END - 0x1000, REGION1_START + 0x1000),
            _ => (MEM_END >> balloon::PFN_SHIFT, u64::from(u32::MAX)),
        };
        let pfn = first + rng.below(end - first);
        word.copy_from_slice(&(pfn as u32).to_le_bytes());
    }
}

/// One random guest against a virtio-balloon: inflate, deflate and (if acked) reporting.
pub fn balloon_round(rng: &mut GuestRng) {
    let mut balloon = Balloon::new().expect("eventfds can be created");
    let offered = balloon.avail_features();
    balloon.set_acked_features(offered & rng.next_u64());
    let _ = balloon.set_target_pages(rng.next_u64() as u32);
    let mem = guest_memory();
    let queues: Vec<GuestQueue> = (0..balloon.active_queue_count() as u64)
        .map(|i| {
            let layout = QueueLayout::new(i);
            GuestQueue::generate(&mem, rng, layout, balloon::QUEUE_SIZE, &mut pfn_filler)
        })
        .collect();
    let device_queues = queues.iter().map(GuestQueue::device_queue).collect();
    if balloon
        .activate(mem.clone(), Arc::new(NullInterrupt), device_queues)
        .is_ok()
    {
        for index in 0..4 {
            let _ = balloon.process_queue(index);
        }
    }
    // Inflate legitimately zeroes any page the guest names, its own rings included (frame
    // numbers assembled from overlapping buffers do name them), so only the used rings are
    // held to the invariants here.
    // The device then sees other chains than were generated, so only the bounds on the used
    // ring itself are held (balloon used lengths are always 0).
    for queue in &queues {
        queue.check_used_heads(&mem);
    }
}

fn no_filler(_rng: &mut GuestRng, _head: bool, _bytes: &mut [u8; FILL_BYTES]) {}

/// One random guest against a virtio-rng device.
pub fn rng_round(rng: &mut GuestRng) {
    let mut device = Rng::new(PatternEntropy).expect("an eventfd can be created");
    let mem = guest_memory();
    let max = crate::virtio::rng::QUEUE_SIZE;
    let queue = GuestQueue::generate(&mem, rng, QueueLayout::new(0), max, &mut no_filler);
    if device
        .activate(
            mem.clone(),
            Arc::new(NullInterrupt),
            vec![queue.device_queue()],
        )
        .is_ok()
    {
        let _ = device.process_queue();
    }
    queue.check(&mem);
}

fn net_tx_filler(rng: &mut GuestRng, head: bool, bytes: &mut [u8; FILL_BYTES]) {
    // Mostly a header without offloads, which the device accepts; sometimes one asking for
    // checksum or segmentation offloads it never offered.
    if head && rng.chance(80) {
        bytes[..net::NET_HDR_SIZE].fill(0);
        if rng.chance(10) {
            bytes[0] = rng.below(4) as u8;
            bytes[1] = rng.below(8) as u8;
        }
    }
}

/// What a backend sends: mostly well-formed frames, some too short to be Ethernet, some lengths
/// no frame can have (zero, past the maximum, anything), and a truncated tail.
fn net_peer_bytes(rng: &mut GuestRng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(6) {
        let len = match rng.below(12) {
            0 => 0,
            1 => rng.below(net::MIN_FRAME_LEN as u64) as u32,
            2 => (net::MAX_FRAME_LEN as u32) + 1 + rng.below(16) as u32,
            3 => rng.next_u64() as u32,
            4 => 1514 + rng.below(64) as u32,
            _ => (net::MIN_FRAME_LEN as u64 + rng.below(1500)) as u32,
        };
        out.extend_from_slice(&len.to_be_bytes());
        // Long or impossible lengths get a few bytes only: the stream is cut short there.
        let body = if len as usize <= 4096 {
            len as usize
        } else {
            rng.below(64) as usize
        };
        out.extend((0..body).map(|i| i as u8));
    }
    if rng.chance(20) {
        out.truncate(rng.below(out.len() as u64 + 1) as usize);
    }
    out
}

/// One random guest and one random backend against a virtio-net device: RX and TX queues of
/// random chains, frames (and garbage) from the peer, a peer that sometimes hangs up, and the
/// queue and socket events in random order.
pub fn net_round(rng: &mut GuestRng) {
    let (ours, peer) = UnixStream::pair().expect("a socket pair can be created");
    ours.set_nonblocking(true)
        .expect("the socket can be made non-blocking");
    peer.set_nonblocking(true)
        .expect("the socket can be made non-blocking");
    let mut device = Net::new(ours, MacAddr([2, 0, 0, 0, 0, 1])).expect("eventfds can be created");
    let offered = device.avail_features();
    device.set_acked_features(offered & rng.next_u64());
    let mem = guest_memory();
    let max = net::QUEUE_SIZE;
    let rx = GuestQueue::generate(&mem, rng, QueueLayout::new(0), max, &mut no_filler);
    let tx = GuestQueue::generate(&mem, rng, QueueLayout::new(1), max, &mut net_tx_filler);
    // Small enough for the socket buffer, so the write never blocks.
    let _ = (&peer).write_all(&net_peer_bytes(rng));
    let mut peer = (!rng.chance(10)).then_some(peer);
    let queues = vec![rx.device_queue(), tx.device_queue()];
    if device
        .activate(mem.clone(), Arc::new(NullInterrupt), queues)
        .is_ok()
    {
        for _ in 0..4 {
            let _ = match rng.below(3) {
                0 => device.process_rx(),
                1 => device.process_tx(),
                _ => {
                    let any = EventSet::from_bits_truncate(rng.next_u64() as u32);
                    let set = EventSet::IN | EventSet::OUT;
                    let hang_up = EventSet::IN | EventSet::HANG_UP;
                    let events = rng.pick(&[set, EventSet::IN, EventSet::OUT, hang_up, any]);
                    device.process_socket(events)
                }
            };
            if let Some(socket) = &mut peer {
                let mut sink = [0u8; 64 * 1024];
                while matches!(socket.read(&mut sink), Ok(n) if n > 0) {}
            }
        }
    }
    rx.check(&mem);
    tx.check(&mem);
}

/// Register offsets of the MMIO transport, and a few past them.
const MMIO_REGISTERS: [u64; 26] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0fc, 0x100, 0x104, 0x108,
];
/// Device status values in handshake order.
const STATUS_STEPS: [u32; 4] = [
    mmio::status::ACKNOWLEDGE,
    mmio::status::ACKNOWLEDGE | mmio::status::DRIVER,
    mmio::status::ACKNOWLEDGE | mmio::status::DRIVER | mmio::status::FEATURES_OK,
    mmio::status::ACKNOWLEDGE
        | mmio::status::DRIVER
        | mmio::status::FEATURES_OK
        | mmio::status::DRIVER_OK,
];
/// Register accesses per MMIO round.
const MMIO_OPS: usize = 64;

fn mmio_value(rng: &mut GuestRng, offset: u64, step: &mut usize, queue_sel: u32) -> u32 {
    let layout = QueueLayout::new(u64::from(queue_sel.min(3)));
    match offset {
        0x070 if rng.chance(80) => {
            let value = STATUS_STEPS[*step % STATUS_STEPS.len()];
            *step += 1;
            value
        }
        0x070 => {
            let any = rng.next_u64();
            rng.pick(&[0, mmio::status::FAILED, any as u32])
        }
        0x014 | 0x024 | 0x030 => rng.below(4) as u32,
        0x020 => {
            let any = rng.next_u64();
            rng.pick(&[1, 3, 0x24, 0xffff_ffff, any as u32])
        }
        0x038 => {
            let any = rng.next_u64();
            rng.pick(&[0, 1, 8, 16, 256, 512, 3, any as u32])
        }
        0x044 => rng.below(3) as u32,
        0x080 => layout.desc_table() as u32,
        0x090 => layout.avail() as u32,
        0x0a0 => layout.used() as u32,
        0x084 | 0x094 | 0x0a4 => rng.pick(&[0, 0, 0, 1, u32::MAX]),
        _ => rng.next_u64() as u32,
    }
}

/// One random driver against the MMIO transport of a virtio-rng device: register reads and
/// writes of every width, biased towards a handshake, then the device serves its queue.
pub fn mmio_round(rng: &mut GuestRng) {
    let mem = guest_memory();
    let queue = GuestQueue::generate(&mem, rng, QueueLayout::new(0), 256, &mut no_filler);
    let device = Arc::new(Mutex::new(
        Rng::new(PatternEntropy).expect("an eventfd can be created"),
    ));
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd can be created");
    let mut transport =
        MmioTransport::new(device.clone(), mem.clone(), irqfd).expect("the queue sizes are valid");
    let (mut step, mut queue_sel) = (0usize, 0u32);
    for _ in 0..MMIO_OPS {
        let offset = match rng.below(10) {
            0..=7 => rng.pick(&MMIO_REGISTERS),
            8 => rng.below(mmio::MMIO_DEVICE_SIZE),
            _ => rng.next_u64(),
        };
        let width = rng.pick(&[4usize, 4, 4, 4, 1, 2, 8, 0, 3]);
        if rng.chance(30) {
            let mut data = [0u8; 8];
            transport.read(offset, &mut data[..width]);
        } else {
            let value = mmio_value(rng, offset, &mut step, queue_sel);
            if offset == 0x030 {
                queue_sel = value;
            }
            let bytes = u64::from(value).to_le_bytes();
            transport.write(offset, &bytes[..width]);
        }
        let mut magic = [0u8; 4];
        transport.read(0, &mut magic);
        assert_eq!(
            u32::from_le_bytes(magic),
            0x7472_6976,
            "magic value changed"
        );
    }
    let _ = device
        .lock()
        .expect("no test thread panicked holding the device")
        .process_queue();
    // The driver may have set a queue size other than the generated one, so only the rings
    // it alone writes are checked.
    queue.check_driver_areas(&mem);
}

/// Fuzz entry: the bytes as one vsock guest (TX, then RX).
pub fn fuzz_vsock(data: &[u8]) {
    let dir = tempfile::tempdir().expect("a temporary directory can be created");
    let mut muxer = vsock_muxer(&dir);
    vsock_round(&mut muxer, &mut GuestRng::from_bytes(data));
}

/// Fuzz entry: the bytes as one virtio-blk guest.
pub fn fuzz_blk(data: &[u8]) {
    let image = disk_image();
    blk_round(
        image.as_file(),
        image.path(),
        &mut GuestRng::from_bytes(data),
    );
}

/// Fuzz entry: the bytes as one virtio-net guest and backend.
pub fn fuzz_net(data: &[u8]) {
    net_round(&mut GuestRng::from_bytes(data));
}

#[cfg(test)]
mod tests;
