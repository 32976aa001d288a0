//! The vsock device as our VMM presents it on virtio-mmio.
//!
//! The same [`VsockMuxer`] and queue functions serve QEMU through `berth-vsock`; here they are
//! driven from the VMM's event loop: a TX notification hands the guest's packets to the muxer,
//! an RX notification (fresh buffers) or a host socket event lets the muxer fill RX, and the
//! device interrupt is raised whenever either queue returned a buffer. The event queue is never
//! used: we do not migrate, so there is no transport reset to announce.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    config_space, queue, VsockError, VsockMuxer, NUM_QUEUES, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VIRTIO_ID_VSOCK,
};
use crate::virtio::{
    read_config_bytes, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::{EventSubscriber, GuestMemoryMmap};

/// State that only exists while the driver runs the device.
#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Queue,
    tx: Queue,
}

/// A virtio-vsock device whose host side is the hybrid-vsock [`VsockMuxer`].
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    muxer: VsockMuxer,
    acked_features: u64,
    queue_events: [EventFd; NUM_QUEUES],
    active: Option<Active>,
}

impl Vsock {
    /// A device for the guest `guest_cid`, serving host clients through `muxer`.
    pub fn new(guest_cid: u64, muxer: VsockMuxer) -> std::io::Result<Self> {
        Ok(Self {
            guest_cid,
            muxer,
            acked_features: 0,
            queue_events: [
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
                EventFd::new(EFD_NONBLOCK)?,
            ],
            active: None,
        })
    }

    /// The muxer, for inspection.
    pub fn muxer(&self) -> &VsockMuxer {
        &self.muxer
    }

    /// Moves every packet the guest queued to the muxer, then fills RX with whatever the muxer
    /// owes the guest; raises the interrupt if either queue returned a buffer.
    pub fn process_queues(&mut self) -> Result<(), VsockError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let sent = queue::process_tx(&mut self.muxer, &mut active.tx, &active.mem)?;
        let received = self.muxer.has_pending_rx()
            && queue::process_rx(&mut self.muxer, &mut active.rx, &active.mem)?;
        if sent || received {
            if let Err(e) = active.interrupt.signal(InterruptKind::Queue) {
                tracing::warn!("vsock: cannot raise the interrupt: {e}");
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn avail_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(self.guest_cid), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The guest CID is read-only.
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
        let Ok([rx, tx, _event]) = <[Queue; NUM_QUEUES]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            });
        };
        for (index, queue) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(index));
            }
        }
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) -> bool {
        // Every connection dies with the driver: host clients see their sockets close.
        self.muxer.reset();
        self.active = None;
        self.acked_features = 0;
        true
    }
}

impl EventSubscriber for Vsock {
    fn interest(&self) -> Vec<(RawFd, EventSet)> {
        let mut fds: Vec<_> = self
            .queue_events
            .iter()
            .map(|event| (event.as_raw_fd(), EventSet::IN))
            .collect();
        fds.push((self.muxer.as_raw_fd(), EventSet::IN));
        fds
    }

    fn process(&mut self, fd: RawFd, _events: EventSet) {
        if fd == self.muxer.as_raw_fd() {
            if let Err(e) = self.muxer.process_events() {
                tracing::error!("vsock: host sockets: {e}");
            }
        } else if let Some(event) = self.queue_events.iter().find(|e| e.as_raw_fd() == fd) {
            // Drain the counter; a notification before activation is simply dropped.
            let _ = event.read();
        }
        // Whatever fired, both directions may have work now: TX frees credit the muxer
        // forwards, host data waits for RX buffers.
        if let Err(e) = self.process_queues() {
            tracing::error!("vsock: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
