//! The network device: features, configuration space, and the RX and TX queue loops over a
//! [`FrameStream`].

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryError, Permissions};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::stream::{FrameStream, StreamError};
use super::{
    features, ChainError, MacAddr, NetError, NetSocket, MAX_FRAME_LEN, MIN_FRAME_LEN, NET_HDR_SIZE,
    QUEUE_SIZE, RX_QUEUE, STATUS_LINK_UP, TX_QUEUE, VIRTIO_ID_NET,
};
use crate::virtio::{
    next_chain, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::GuestMemoryMmap;

/// Bytes of `struct virtio_net_config` we expose: `mac`, `status`, `max_virtqueue_pairs`.
const CONFIG_SIZE: usize = 10;
/// Offset of `status` in the configuration space.
const CONFIG_STATUS: usize = 6;
/// Framed bytes the device gathers from TX chains before it writes them out, and the most it
/// holds while the socket would block before it stops taking chains.
pub const TX_BATCH_BYTES: usize = 128 * 1024;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the only header flag that asks the device for work.
const HDR_F_NEEDS_CSUM: u8 = 1;

/// Counters of what the device passed and dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames taken from TX chains and queued to the backend.
    pub tx_frames: u64,
    /// TX chains dropped: malformed, or the link was down.
    pub tx_dropped: u64,
    /// Frames put into RX chains.
    pub rx_frames: u64,
    /// Frames from the backend dropped: too short, or too large for the guest's buffer.
    pub rx_dropped: u64,
    /// RX chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
}

/// State that only exists while the driver runs the device.
#[derive(Debug)]
pub(super) struct Active {
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Arc<dyn VirtioInterrupt>,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
}

/// A virtio-net device whose link is a framed stream to a user-mode network stack.
#[derive(Debug)]
pub struct Net<S: NetSocket> {
    stream: FrameStream<S>,
    link_up: bool,
    config: [u8; CONFIG_SIZE],
    acked_features: u64,
    queue_events: [EventFd; 2],
    stats: NetStats,
    pub(super) active: Option<Active>,
}

impl Net<UnixStream> {
    /// A device whose backend listens on the unix socket at `path` (passt's `-s PATH`).
    pub fn connect(path: &Path, mac: MacAddr) -> Result<Self, NetError> {
        let socket = UnixStream::connect(path).map_err(|source| NetError::Connect {
            path: path.to_owned(),
            source,
        })?;
        socket
            .set_nonblocking(true)
            .map_err(NetError::NonBlocking)?;
        Self::new(socket, mac)
    }
}

impl<S: NetSocket> Net<S> {
    /// A device exchanging frames over `socket`, which must be connected and non-blocking.
    pub fn new(socket: S, mac: MacAddr) -> Result<Self, NetError> {
        let event = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&mac.octets());
        config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        // max_virtqueue_pairs: one, though only read with VIRTIO_NET_F_MQ, which we do not offer.
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Self {
            stream: FrameStream::new(socket),
            link_up: true,
            config,
            acked_features: 0,
            queue_events: [event()?, event()?],
            stats: NetStats::default(),
            active: None,
        })
    }

    /// The event the driver's notifications of queue `index` arrive on.
    pub fn queue_event(&self, index: usize) -> &EventFd {
        &self.queue_events[index]
    }

    /// The backend socket.
    pub fn socket(&self) -> &S {
        self.stream.socket()
    }

    /// Whether the link is up (the backend is usable).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// What the device passed and dropped so far.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Handles `events` the backend socket reported: on input (or a hang-up) reads frames into
    /// RX chains; on output, if TX bytes are waiting, writes them and takes more TX chains.
    pub fn process_socket(&mut self, events: EventSet) -> Result<(), NetError> {
        let hang_up = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if events.contains(EventSet::IN) || hang_up {
            self.stream.mark_readable();
            if hang_up && self.active.is_none() {
                // Nothing can read the rest before activation; the backend is gone either way.
                self.link_down(&StreamError::Closed)?;
            }
            self.process_rx()?;
        }
        // The writable edge comes each time the backend reads; only a device holding bytes
        // (and maybe refusing chains) has anything to do then.
        if (events.contains(EventSet::OUT) && self.stream.tx_pending() > 0) || hang_up {
            self.process_tx()?;
        }
        Ok(())
    }

    /// Moves frames from the backend into the guest's RX chains until either runs out.
    ///
    /// A frame with no chain to go into stays in the stream, which is then not read again
    /// until the driver notifies the RX queue.
    pub fn process_rx(&mut self) -> Result<(), NetError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        if !self.link_up {
            return Ok(());
        }
        let (mem, rx) = (&active.mem, &mut active.rx);
        let mut delivered = false;
        let mut broken = None;
        rx.disable_notification(mem).map_err(NetError::Queue)?;
        loop {
            let frame = match self.stream.peek_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            };
            if frame.len() < MIN_FRAME_LEN {
                note_drop(&mut self.stats.rx_dropped, "short frame from the backend");
                self.stream.consume_frame();
                continue;
            }
            let Some(chain) = next_rx_chain(rx, mem)? else {
                break;
            };
            let head = chain.head_index();
            match write_frame(mem, chain, frame) {
                Ok(len) => {
                    rx.add_used(mem, head, len).map_err(NetError::Queue)?;
                    self.stats.rx_frames += 1;
                    self.stream.consume_frame();
                    delivered = true;
                }
                Err(e @ ChainError::TooSmall { .. }) => {
                    // The chain is fine, the frame is not for it: drop the frame, keep the chain.
                    tracing::debug!("virtio-net: rx: {e}");
                    rx.go_to_previous_position();
                    note_drop(
                        &mut self.stats.rx_dropped,
                        "frame larger than the rx buffer",
                    );
                    self.stream.consume_frame();
                }
                Err(e) => {
                    // The frame is fine, the chain is not: return it and try the next one.
                    tracing::debug!("virtio-net: rx: {e}");
                    rx.add_used(mem, head, 0).map_err(NetError::Queue)?;
                    note_drop(&mut self.stats.rx_bad_chains, "malformed rx chain");
                    delivered = true;
                }
            }
        }
        if delivered && rx.needs_notification(mem).map_err(NetError::Queue)? {
            active
                .interrupt
                .signal(InterruptKind::Queue)
                .map_err(NetError::Interrupt)?;
        }
        match broken {
            Some(e) => self.link_down(&e),
            None => Ok(()),
        }
    }

    /// Takes frames from the guest's TX chains and writes them to the backend, until the queue
    /// is empty or the backend stops taking bytes; a down link drops every chain.
    pub fn process_tx(&mut self) -> Result<(), NetError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let (mem, tx) = (&active.mem, &mut active.tx);
        let mut broken = None;
        let mut completed = false;
        loop {
            tx.disable_notification(mem).map_err(NetError::Queue)?;
            let mut served = 0usize;
            let mut blocked = false;
            loop {
                let usable = self.link_up && broken.is_none();
                if usable && self.stream.tx_pending() >= TX_BATCH_BYTES {
                    if let Err(e) = self.stream.flush() {
                        broken = Some(e);
                    } else if self.stream.tx_pending() >= TX_BATCH_BYTES {
                        // Backpressure: leave the chains to the guest until the socket drains;
                        // its writable edge brings the device back here.
                        tracing::trace!(
                            "virtio-net: tx blocked, {} bytes pending",
                            self.stream.tx_pending()
                        );
                        blocked = true;
                        break;
                    }
                }
                let Some(chain) = next_chain(tx, mem).map_err(NetError::Queue)? else {
                    break;
                };
                let head = chain.head_index();
                if !self.link_up || broken.is_some() {
                    // Dropped, not left to wedge the guest's queue.
                    note_drop(&mut self.stats.tx_dropped, "tx with the link down");
                } else if let Err(e) = read_frame(mem, chain, &mut self.stream) {
                    tracing::debug!("virtio-net: tx: {e}");
                    note_drop(&mut self.stats.tx_dropped, "malformed tx chain");
                } else {
                    self.stats.tx_frames += 1;
                }
                tx.add_used(mem, head, 0).map_err(NetError::Queue)?;
                served += 1;
            }
            completed |= served > 0;
            if blocked {
                break;
            }
            let more = tx.enable_notification(mem).map_err(NetError::Queue)?;
            // A ring that claims more chains than it yields would keep us here forever.
            if !more || served == 0 {
                break;
            }
        }
        if self.link_up && broken.is_none() {
            broken = self.stream.flush().err();
        }
        if completed && tx.needs_notification(mem).map_err(NetError::Queue)? {
            active
                .interrupt
                .signal(InterruptKind::Queue)
                .map_err(NetError::Interrupt)?;
        }
        match broken {
            Some(e) => self.link_down(&e),
            None => Ok(()),
        }
    }

    /// Stops using the backend for good, and tells the driver the link is down.
    fn link_down(&mut self, reason: &StreamError) -> Result<(), NetError> {
        if !self.link_up {
            return Ok(());
        }
        tracing::warn!(
            "virtio-net: link down: {} ({:?})",
            super::error_chain(reason),
            self.stats
        );
        self.link_up = false;
        self.stream.discard();
        self.config[CONFIG_STATUS..CONFIG_STATUS + 2].copy_from_slice(&0u16.to_le_bytes());
        if let Some(active) = &self.active {
            active
                .interrupt
                .signal(InterruptKind::Config)
                .map_err(NetError::Interrupt)?;
        }
        Ok(())
    }
}

/// Counts a drop and logs it, at warning level only on the 1st, 2nd, 4th, 8th, ... so a
/// guest or backend that keeps doing it cannot flood the log.
fn note_drop(counter: &mut u64, what: &str) {
    *counter += 1;
    if counter.is_power_of_two() {
        tracing::warn!("virtio-net: {what} dropped ({counter} so far)");
    } else {
        tracing::debug!("virtio-net: {what} dropped ({counter} so far)");
    }
}

/// The next RX chain; when there is none, asks the driver to notify the queue once it adds
/// one, and looks once more in case it did so meanwhile.
fn next_rx_chain<'a>(
    rx: &mut Queue,
    mem: &'a GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, NetError> {
    if let Some(chain) = next_chain(rx, mem).map_err(NetError::Queue)? {
        return Ok(Some(chain));
    }
    if !rx.enable_notification(mem).map_err(NetError::Queue)? {
        return Ok(None);
    }
    rx.disable_notification(mem).map_err(NetError::Queue)?;
    next_chain(rx, mem).map_err(NetError::Queue)
}

/// Checks that every descriptor has the direction `device_writes` asks for and lies in guest
/// memory; returns their total length.
fn check_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    device_writes: bool,
) -> Result<u64, ChainError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    for desc in descs {
        if desc.is_write_only() != device_writes {
            return Err(ChainError::Direction);
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        total += u64::from(desc.len());
    }
    Ok(total)
}

/// Copies the chain's bytes from offset `skip` into `dst`; the chain was checked to hold them.
fn copy_from_chain(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut skip: usize,
    dst: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let mut filled = 0;
    for desc in descs {
        let len = desc.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(dst.len() - filled);
        let addr = desc.addr().unchecked_add(skip as u64);
        mem.read_slice(&mut dst[filled..filled + n], addr)?;
        filled += n;
        skip = 0;
        if filled == dst.len() {
            break;
        }
    }
    Ok(())
}

/// Queues the frame of a TX chain (header, then the frame, laid out over any descriptors) to
/// the stream.
fn read_frame<S: NetSocket>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    stream: &mut FrameStream<S>,
) -> Result<(), ChainError> {
    // The iterator stops after the queue size, so a looping chain cannot grow this.
    let descs: Vec<Descriptor> = chain.collect();
    let total = check_chain(mem, &descs, false)?;
    let frame_len = total.saturating_sub(NET_HDR_SIZE as u64);
    if total < (NET_HDR_SIZE + MIN_FRAME_LEN) as u64 {
        return Err(ChainError::TooShort(frame_len));
    }
    if frame_len > MAX_FRAME_LEN as u64 {
        return Err(ChainError::TooLong(frame_len));
    }
    let mut header = [0u8; NET_HDR_SIZE];
    copy_from_chain(mem, &descs, 0, &mut header).map_err(ChainError::GuestMemory)?;
    let (flags, gso) = (header[0], header[1]);
    if flags & HDR_F_NEEDS_CSUM != 0 || gso != 0 {
        return Err(ChainError::Offload { flags, gso });
    }
    stream.queue_frame(frame_len as usize, |buf| {
        copy_from_chain(mem, &descs, NET_HDR_SIZE, buf).map_err(ChainError::GuestMemory)
    })
}

/// Writes `src` across device-writable descriptors, in order.
struct ChainWriter<'a> {
    mem: &'a GuestMemoryMmap,
    descs: &'a [Descriptor],
    index: usize,
    offset: usize,
}

impl ChainWriter<'_> {
    /// Writes all of `src`; the chain was checked to have room for it.
    fn write(&mut self, mut src: &[u8]) -> Result<(), GuestMemoryError> {
        while !src.is_empty() {
            let Some(desc) = self.descs.get(self.index) else {
                return Err(GuestMemoryError::PartialBuffer {
                    expected: src.len(),
                    completed: 0,
                });
            };
            let room = desc.len() as usize - self.offset;
            let n = room.min(src.len());
            let addr = desc.addr().unchecked_add(self.offset as u64);
            self.mem.write_slice(&src[..n], addr)?;
            src = &src[n..];
            self.offset += n;
            if self.offset == desc.len() as usize {
                self.index += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }
}

/// Writes a header (`num_buffers` = 1, no offloads) and `frame` into an RX chain; returns the
/// used length.
fn write_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<u32, ChainError> {
    let descs: Vec<Descriptor> = chain.collect();
    let capacity = check_chain(mem, &descs, true)?;
    let needed = NET_HDR_SIZE + frame.len();
    if capacity < needed as u64 {
        return Err(ChainError::TooSmall {
            capacity,
            frame: frame.len(),
        });
    }
    let mut header = [0u8; NET_HDR_SIZE];
    // num_buffers, the last field: the frame is in this one chain.
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut writer = ChainWriter {
        mem,
        descs: &descs,
        index: 0,
        offset: 0,
    };
    writer.write(&header).map_err(ChainError::GuestMemory)?;
    writer.write(frame).map_err(ChainError::GuestMemory)?;
    // needed <= NET_HDR_SIZE + MAX_FRAME_LEN.
    Ok(needed as u32)
}

impl<S: NetSocket> VirtioDevice for Net<S> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << features::MAC)
            | (1 << features::STATUS)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is writable only with features we do not offer.
        tracing::warn!(
            "virtio-net: {}-byte config write at {offset:#x} ignored",
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
        let Ok([mut rx, mut tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        for (index, queue) in [(RX_QUEUE, &mut rx), (TX_QUEUE, &mut tx)] {
            if !queue.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(index));
            }
            queue.set_event_idx(self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
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
        // The stream and its buffered frames stay: a driver that starts over gets them.
        self.active = None;
        self.acked_features = 0;
        true
    }
}
