//! Helpers shared by the virtio device tests: guest memory, a counting interrupt and chains
//! written into virtio-queue's mock split queue.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::{InterruptKind, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// Where test buffers start: the mock queue's rings sit below this address.
pub const BUFFERS: u64 = 0x10_0000;
/// Size of the test guest memory.
pub const MEM_SIZE: usize = 0x40_0000;

/// Guest memory of [`MEM_SIZE`] bytes at address 0.
pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory")
}

/// Counts the interrupts a device raises.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    /// Number of queue interrupts so far.
    pub queue: AtomicU32,
    /// Number of configuration-change interrupts so far.
    pub config: AtomicU32,
}

impl CountingInterrupt {
    /// Queue interrupts raised so far.
    pub fn count(&self) -> u32 {
        self.queue.load(Ordering::SeqCst)
    }

    /// Configuration-change interrupts raised so far.
    pub fn config_count(&self) -> u32 {
        self.config.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal(&self, kind: InterruptKind) -> io::Result<()> {
        let counter = match kind {
            InterruptKind::Queue => &self.queue,
            InterruptKind::Config => &self.config,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// One descriptor of a test chain.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// Whether the device may write it.
    pub write: bool,
}

impl Desc {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable buffer.
    pub fn write(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }
}

/// Writes `descs` as one chain at descriptor-table index `first` and makes it available.
pub fn push_chain(mock: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[Desc]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let last = i + 1 == descs.len();
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
        })
        .collect();
    mock.add_desc_chains(&raw, first)
        .expect("chain fits the mock queue");
}

/// The `(head, len)` of used element `index`.
pub fn used(mock: &MockSplitQueue<GuestMemoryMmap>, index: usize) -> (u32, u32) {
    let elem = mock
        .used()
        .ring()
        .ref_at(index)
        .expect("used index in range")
        .load();
    (elem.id(), elem.len())
}

/// How many used elements the device has published.
pub fn used_count(mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    mock.used().idx().load()
}
