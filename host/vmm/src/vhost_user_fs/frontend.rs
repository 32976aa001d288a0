//! Our end of one vhost-user connection: feature negotiation when the VM starts, the queue
//! hand-over when the driver starts the device, and stopping the rings when it resets it.
//!
//! The sequence follows QEMU's and Cloud Hypervisor's vhost-user frontends. Connect:
//! `SET_OWNER`, `GET_FEATURES`, and with `VHOST_USER_F_PROTOCOL_FEATURES`
//! `GET_PROTOCOL_FEATURES`/`SET_PROTOCOL_FEATURES` (REPLY_ACK, MQ) and `GET_QUEUE_NUM`. Start:
//! `SET_FEATURES`, `SET_MEM_TABLE`, then per queue `SET_VRING_NUM`, `SET_VRING_ADDR`,
//! `SET_VRING_BASE`, `SET_VRING_CALL`, `SET_VRING_KICK`, and `SET_VRING_ENABLE` last. Stop:
//! `SET_VRING_ENABLE(0)` and `GET_VRING_BASE` per queue. With REPLY_ACK every request waits
//! for the backend's acknowledgement, so a refusal surfaces on the request that caused it.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{VhostUserFsError, NUM_QUEUES};
use berth_devices::virtio::VIRTIO_F_VERSION_1;
use berth_devices::GuestMemoryMmap;

/// Virtio features the guest may negotiate, when the backend offers them. The transport and the
/// backend handle these without the device's help; anything else (packed rings, notification
/// data, DAX) would need work here first.
const GUEST_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
/// Protocol features we use: acknowledged requests, and the queue count check. (`CONFIG` is not
/// needed: the tag is ours, as with QEMU's `vhost-user-fs-device`.)
const PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::REPLY_ACK.union(VhostUserProtocolFeatures::MQ);

/// Sizes of the split-ring parts for `size` entries (virtio 1.1, 2.6): 16-byte descriptors; the
/// avail and used rings with their flags, index and event words.
fn ring_sizes(size: u16) -> [usize; 3] {
    let size = usize::from(size);
    [16 * size, 6 + 2 * size, 6 + 8 * size]
}

/// A negotiated vhost-user connection.
pub(super) struct Connection {
    frontend: Frontend,
    socket: PathBuf,
    /// The virtio features the backend offers, `VHOST_USER_F_PROTOCOL_FEATURES` included.
    backend_features: u64,
    /// The protocol features both sides use.
    protocol_features: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("socket", &self.socket)
            .field(
                "backend_features",
                &format_args!("{:#x}", self.backend_features),
            )
            .field("protocol_features", &self.protocol_features)
            .finish()
    }
}

/// Maps a failed request named `request` to our error.
fn failed(request: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserFsError {
    move |e| VhostUserFsError::Protocol(request, e)
}

impl Connection {
    /// Connects to the backend at `socket` and negotiates what the protocol allows before the
    /// guest is involved.
    pub(super) fn connect(socket: &Path) -> Result<Self, VhostUserFsError> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| VhostUserFsError::Connect(socket.to_owned(), e))?;
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        frontend.set_owner().map_err(failed("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(failed("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserFsError::NotModern);
        }
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(failed("GET_PROTOCOL_FEATURES"))?;
            protocol_features = offered & PROTOCOL_FEATURES;
            frontend
                .set_protocol_features(protocol_features)
                .map_err(failed("SET_PROTOCOL_FEATURES"))?;
        }
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let queues = frontend.get_queue_num().map_err(failed("GET_QUEUE_NUM"))?;
            if queues < NUM_QUEUES as u64 {
                return Err(VhostUserFsError::QueueCount(queues));
            }
        }
        Ok(Self {
            frontend,
            socket: socket.to_owned(),
            backend_features,
            protocol_features,
        })
    }

    /// The features to offer the guest.
    pub(super) fn guest_features(&self) -> u64 {
        self.backend_features & GUEST_FEATURES
    }

    /// The protocol features in use.
    pub(super) fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Whether rings start disabled and are switched with `SET_VRING_ENABLE`.
    fn has_protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Hands the driver's queues to the backend: the guest accepted `acked_features`; `kicks`
    /// and `calls` are each queue's notification eventfds in both directions.
    pub(super) fn start(
        &mut self,
        acked_features: u64,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        kicks: &[EventFd],
        calls: &[EventFd],
    ) -> Result<(), VhostUserFsError> {
        // The protocol-features bit is part of the vhost-user session, not of the guest's
        // negotiation: without it the backend would enable the rings at once.
        let session = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(acked_features | session)
            .map_err(failed("SET_FEATURES"))?;
        let regions = memory_regions(mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(failed("SET_MEM_TABLE"))?;
        for (index, ((queue, kick), call)) in queues.iter().zip(kicks).zip(calls).enumerate() {
            self.start_queue(index, queue, mem, kick, call)?;
        }
        if self.has_protocol_features() {
            for index in 0..queues.len() {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(failed("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    fn start_queue(
        &mut self,
        index: usize,
        queue: &Queue,
        mem: &GuestMemoryMmap,
        kick: &EventFd,
        call: &EventFd,
    ) -> Result<(), VhostUserFsError> {
        let [desc_len, avail_len, used_len] = ring_sizes(queue.size());
        let host_address = |guest: u64, len: usize| {
            host_address(mem, guest, len).ok_or(VhostUserFsError::RingAddress(index))
        };
        let rings = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: host_address(queue.desc_table(), desc_len)?,
            used_ring_addr: host_address(queue.used_ring(), used_len)?,
            avail_ring_addr: host_address(queue.avail_ring(), avail_len)?,
            log_addr: None,
        };
        let frontend = &self.frontend;
        frontend
            .set_vring_num(index, queue.size())
            .map_err(failed("SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(index, &rings)
            .map_err(failed("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(index, queue.next_avail())
            .map_err(failed("SET_VRING_BASE"))?;
        frontend
            .set_vring_call(index, call)
            .map_err(failed("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(index, kick)
            .map_err(failed("SET_VRING_KICK"))
    }

    /// Stops the backend's processing of `queues` queues; once this returns, it no longer
    /// touches their rings.
    pub(super) fn stop(&mut self, queues: usize) -> Result<(), VhostUserFsError> {
        if self.has_protocol_features() {
            for index in 0..queues {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(failed("SET_VRING_ENABLE"))?;
            }
        }
        for index in 0..queues {
            self.frontend
                .get_vring_base(index)
                .map_err(failed("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

/// The memory table: every region with its file, offset and address in our process.
fn memory_regions(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserFsError> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| VhostUserFsError::MemoryNotShared(region.start_addr().0))
        })
        .collect()
}

/// Where the `len` bytes at guest address `guest` are in our process, if they lie inside one
/// region (the backend translates each address through one region of the table).
fn host_address(mem: &GuestMemoryMmap, guest: u64, len: usize) -> Option<u64> {
    let guest = GuestAddress(guest);
    mem.get_slice(guest, len).ok()?;
    mem.get_host_address(guest).ok().map(|ptr| ptr as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sizes_of_a_1024_entry_queue() {
        assert_eq!(ring_sizes(1024), [16384, 2054, 8198]);
    }
}
