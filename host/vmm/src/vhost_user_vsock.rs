//! The vsock device of `berth-devices` served to another VMM (QEMU) over vhost-user: the
//! `berth-vsock` binary.
//!
//! QEMU owns the virtqueues' memory and forwards the guest's notifications as eventfds;
//! `vhost-user-backend` runs the protocol and one worker thread that polls those eventfds plus
//! the muxer's epoll fd. Every wake-up ends with RX processing, because each of them (a TX
//! packet, a host socket event, fresh RX buffers) may be what the owed RX work was waiting for.
//! The device logic itself is [`berth_devices::vsock`], the same our own VMM uses.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use berth_devices::virtio::{read_config_bytes, VIRTIO_F_VERSION_1};
use berth_devices::vsock::{
    config_space, queue, MuxerConfig, VsockError, VsockMuxer, EVENT_QUEUE, NUM_QUEUES, RX_QUEUE,
    TX_QUEUE,
};
use berth_devices::GuestMemoryMmap;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The worker-thread event of the muxer's epoll fd. `vhost-user-backend` reserves
/// `0..=NUM_QUEUES` for the queues and its own exit event.
pub const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// The largest queue the driver may set up. QEMU's vhost-user-vsock uses 128.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// What `berth-vsock` serves.
#[derive(Debug, Clone)]
pub struct VhostUserVsockConfig {
    /// The guest's context ID, reported in the device's configuration space.
    pub guest_cid: u64,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// The hybrid-vsock listener for host clients.
    pub uds_path: PathBuf,
}

/// Errors of the vhost-user vsock backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserVsockError {
    /// The device could not be set up.
    #[error("vsock device")]
    Device(#[source] VsockError),
    /// An eventfd could not be created or registered.
    #[error("worker event")]
    Event(#[source] io::Error),
    /// The vhost-user daemon failed (its error type carries no `Error` impl, only text).
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// The vsock device as a vhost-user backend.
#[derive(Debug)]
pub struct VhostUserVsock {
    guest_cid: u64,
    muxer: VsockMuxer,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    exit: (EventConsumer, EventNotifier),
}

impl VhostUserVsock {
    /// A backend for the guest `guest_cid`, serving host clients through `muxer`.
    pub fn new(guest_cid: u64, muxer: VsockMuxer) -> io::Result<Self> {
        Ok(Self {
            guest_cid,
            muxer,
            mem: None,
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }

    /// Moves the guest's TX packets into the muxer and notifies the guest if any completed.
    fn process_tx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = mem.memory();
        let completed = {
            let mut state = vring.get_mut();
            if !state.is_enabled() {
                return Ok(());
            }
            queue::process_tx(&mut self.muxer, state.get_queue_mut(), &mem)
                .map_err(io::Error::other)?
        };
        notify(vring, completed)
    }

    /// Fills the guest's RX buffers with what the muxer owes and notifies the guest if any
    /// completed.
    fn process_rx(&mut self, vring: &VringRwLock) -> io::Result<()> {
        if !self.muxer.has_pending_rx() {
            return Ok(());
        }
        let Some(mem) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = mem.memory();
        let completed = {
            let mut state = vring.get_mut();
            if !state.is_enabled() {
                return Ok(());
            }
            queue::process_rx(&mut self.muxer, state.get_queue_mut(), &mem)
                .map_err(io::Error::other)?
        };
        notify(vring, completed)
    }
}

/// Signals the guest that `vring` has used buffers, unless it asked not to be.
fn notify(vring: &VringRwLock, completed: bool) -> io::Result<()> {
    if completed && vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl VhostUserBackendMut for VhostUserVsock {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // No EVENT_IDX: every completion is signalled and the guest always kicks, which keeps
        // the notification logic trivially correct.
        (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        if enabled {
            tracing::warn!("vsock: the frontend enabled EVENT_IDX, which was not offered");
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        /// vhost-user carries at most this much configuration per message.
        const MAX_CONFIG_SIZE: u32 = 256;
        let mut data = vec![0u8; size.min(MAX_CONFIG_SIZE) as usize];
        read_config_bytes(&config_space(self.guest_cid), u64::from(offset), &mut data);
        data
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn reset_device(&mut self) {
        self.muxer.reset();
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let consumer = self.exit.0.try_clone().ok()?;
        let notifier = self.exit.1.try_clone().ok()?;
        Some((consumer, notifier))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Err(io::Error::other("vsock: fewer vrings than queues"));
        };
        match usize::from(device_event) {
            RX_QUEUE | EVENT_QUEUE => {}
            TX_QUEUE => self.process_tx(tx)?,
            _ if device_event == MUXER_EVENT => {
                self.muxer.process_events().map_err(io::Error::other)?
            }
            _ => {
                return Err(io::Error::other(format!(
                    "vsock: unknown event {device_event}"
                )))
            }
        }
        self.process_rx(rx)
    }
}

/// Serves one frontend connection on `config.socket`, then returns (when QEMU goes away).
pub fn serve(config: &VhostUserVsockConfig) -> Result<(), VhostUserVsockError> {
    let muxer = VsockMuxer::new(MuxerConfig {
        guest_cid: config.guest_cid,
        uds_path: config.uds_path.clone(),
    })
    .map_err(VhostUserVsockError::Device)?;
    let muxer_fd = muxer.as_raw_fd();
    let backend =
        VhostUserVsock::new(config.guest_cid, muxer).map_err(VhostUserVsockError::Event)?;
    let backend = Arc::new(Mutex::new(backend));
    let mut daemon = VhostUserDaemon::new(
        "berth-vsock".into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::default()),
    )
    .map_err(|e| VhostUserVsockError::Daemon(e.to_string()))?;
    let Some(worker) = daemon.get_epoll_handlers().into_iter().next() else {
        return Err(VhostUserVsockError::Daemon("no worker thread".into()));
    };
    worker
        .register_listener(muxer_fd, EventSet::IN, u64::from(MUXER_EVENT))
        .map_err(VhostUserVsockError::Event)?;
    daemon
        .serve(&config.socket)
        .map_err(|e| VhostUserVsockError::Daemon(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn backend(dir: &std::path::Path) -> VhostUserVsock {
        let muxer = VsockMuxer::new(MuxerConfig {
            guest_cid: 3,
            uds_path: dir.join("vm.vsock"),
        })
        .expect("muxer");
        VhostUserVsock::new(3, muxer).expect("backend")
    }

    #[test]
    fn config_space_is_guest_cid_le64() {
        let dir = tempfile::tempdir().expect("tempdir");

        let config = backend(dir.path()).get_config(0, 8);

        assert_eq!(config, [3, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn config_read_past_end_is_zero_filled() {
        let dir = tempfile::tempdir().expect("tempdir");

        let config = backend(dir.path()).get_config(4, 8);

        assert_eq!(config, [0; 8]);
    }

    #[test]
    fn features_are_version_1_and_protocol_features_without_event_idx() {
        let dir = tempfile::tempdir().expect("tempdir");
        /// VIRTIO_RING_F_EVENT_IDX.
        const EVENT_IDX: u64 = 1 << 29;

        let features = backend(dir.path()).features();

        assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert_eq!(features & EVENT_IDX, 0);
    }

    /// A split ring in test memory, driven by hand as a guest driver would.
    struct TestRing {
        base: u64,
        buffers: u64,
        avail_idx: u16,
    }

    impl TestRing {
        const SIZE: u16 = 16;

        fn desc_table(&self) -> u64 {
            self.base
        }
        fn avail(&self) -> u64 {
            self.base + 0x100
        }
        fn used(&self) -> u64 {
            self.base + 0x200
        }

        fn vring(&self, mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> VringRwLock {
            let vring = VringRwLock::new(mem.clone(), Self::SIZE).expect("vring");
            vring.set_queue_size(Self::SIZE);
            vring
                .set_queue_info(self.desc_table(), self.avail(), self.used())
                .expect("queue info");
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vring
        }

        /// Offers one buffer of `len` bytes at the ring's buffer area, as descriptor `index`.
        fn offer(&mut self, mem: &GuestMemoryMmap, index: u16, len: u32, writable: bool) {
            /// VRING_DESC_F_WRITE.
            const WRITE: u16 = 2;
            let desc = self.desc_table() + u64::from(index) * 16;
            let addr = self.buffers + u64::from(index) * 0x1000;
            mem.write_obj(addr.to_le(), GuestAddress(desc))
                .expect("addr");
            mem.write_obj(len.to_le(), GuestAddress(desc + 8))
                .expect("len");
            let flags: u16 = if writable { WRITE } else { 0 };
            mem.write_obj(flags.to_le(), GuestAddress(desc + 12))
                .expect("flags");
            let slot = self.avail() + 4 + u64::from(self.avail_idx % Self::SIZE) * 2;
            mem.write_obj(index.to_le(), GuestAddress(slot))
                .expect("ring");
            self.avail_idx += 1;
            mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2))
                .expect("idx");
        }

        fn buffer(&self, index: u16) -> u64 {
            self.buffers + u64::from(index) * 0x1000
        }

        fn used_count(&self, mem: &GuestMemoryMmap) -> u16 {
            u16::from_le(
                mem.read_obj(GuestAddress(self.used() + 2))
                    .expect("used idx"),
            )
        }
    }

    /// The glue end to end without QEMU: a host client's CONNECT reaches the guest's RX ring
    /// on the muxer's event, and the guest's RESPONSE on a TX kick answers the client.
    #[test]
    fn handle_event_carries_a_connect_through_rx_and_its_response_through_tx() {
        use berth_devices::vsock::{op, Header, HOST_CID, PKT_HEADER_SIZE, TYPE_STREAM};
        use std::io::{Read, Write};

        let dir = tempfile::tempdir().expect("tempdir");
        let mut backend = backend(dir.path());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        let atomic = GuestMemoryAtomic::new(mem.clone());
        backend.update_memory(atomic.clone()).expect("memory");
        let mut rx = TestRing {
            base: 0x1000,
            buffers: 0x1_0000,
            avail_idx: 0,
        };
        let mut tx = TestRing {
            base: 0x2000,
            buffers: 0x4_0000,
            avail_idx: 0,
        };
        let event = TestRing {
            base: 0x3000,
            buffers: 0x7_0000,
            avail_idx: 0,
        };
        let vrings = [rx.vring(&atomic), tx.vring(&atomic), event.vring(&atomic)];
        rx.offer(&mem, 0, 4096, true);
        let mut client =
            std::os::unix::net::UnixStream::connect(dir.path().join("vm.vsock")).expect("client");
        client.write_all(b"CONNECT 1024\n").expect("connect line");

        for _ in 0..3 {
            backend
                .handle_event(MUXER_EVENT, EventSet::IN, &vrings, 0)
                .expect("muxer event");
        }
        let mut raw = [0u8; PKT_HEADER_SIZE];
        mem.read_slice(&mut raw, GuestAddress(rx.buffer(0)))
            .expect("header");
        let request = Header::from_bytes(&raw);
        let response = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: request.dst_port,
            dst_port: request.src_port,
            type_: TYPE_STREAM,
            op: op::RESPONSE,
            buf_alloc: 4096,
            ..Header::default()
        };
        mem.write_slice(&response.to_bytes(), GuestAddress(tx.buffer(0)))
            .expect("response");
        tx.offer(&mem, 0, PKT_HEADER_SIZE as u32, false);
        backend
            .handle_event(TX_QUEUE as u16, EventSet::IN, &vrings, 0)
            .expect("tx kick");
        let mut line = [0u8; 8];
        client.read_exact(&mut line).expect("ok line");

        assert_eq!(rx.used_count(&mem), 1);
        assert_eq!(request.op, op::REQUEST);
        assert_eq!(request.dst_port, 1024);
        assert_eq!(tx.used_count(&mem), 1);
        assert_eq!(&line, format!("OK {}\n", request.src_port).as_bytes());
    }

    #[test]
    fn muxer_event_is_outside_the_reserved_range() {
        assert!(usize::from(MUXER_EVENT) > NUM_QUEUES);
    }
}
