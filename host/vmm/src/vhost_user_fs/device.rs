//! The virtio-fs device the transport sees: identity, features and configuration space here,
//! the queues in the backend once the driver starts the device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frontend::Connection;
use super::{config_space, VhostUserFsError, CONFIG_SIZE, NUM_QUEUES, QUEUE_SIZE, VIRTIO_ID_FS};
use crate::config::ShareConfig;
use berth_devices::virtio::{
    read_config_bytes, ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use berth_devices::GuestMemoryMmap;

/// A virtio-fs device whose queues `virtiofsd` serves over vhost-user.
#[derive(Debug)]
pub struct VhostUserFs {
    tag: String,
    config: [u8; CONFIG_SIZE],
    /// `None` once the backend failed: the device stays broken until the VM ends.
    connection: Option<Connection>,
    /// Fixed at connection, so the guest sees the same offer across resets.
    avail_features: u64,
    acked_features: u64,
    /// Guest notifications (ioeventfds), read by the backend.
    kicks: [EventFd; NUM_QUEUES],
    /// Backend notifications, polled by the event loop.
    calls: [EventFd; NUM_QUEUES],
    /// The driver's interrupt while the device runs.
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

fn eventfds() -> Result<[EventFd; NUM_QUEUES], VhostUserFsError> {
    Ok([
        EventFd::new(EFD_NONBLOCK).map_err(VhostUserFsError::EventFd)?,
        EventFd::new(EFD_NONBLOCK).map_err(VhostUserFsError::EventFd)?,
    ])
}

impl VhostUserFs {
    /// The device for `share`, connected to its backend. A backend that cannot be reached is
    /// logged and leaves the device broken (see the module documentation); only a tag that
    /// cannot be a tag, or running out of fds, is an error.
    pub fn new(share: &ShareConfig) -> Result<Self, VhostUserFsError> {
        let config = config_space(&share.tag)?;
        let connection = match Connection::connect(&share.socket) {
            Ok(connection) => {
                tracing::debug!(
                    "virtio-fs {}: connected to {}, protocol features {:?}",
                    share.tag,
                    share.socket.display(),
                    connection.protocol_features()
                );
                Some(connection)
            }
            Err(e) => {
                tracing::error!(
                    "virtio-fs {}: {}; the guest cannot use this share",
                    share.tag,
                    error_chain(&e)
                );
                None
            }
        };
        Ok(Self {
            tag: share.tag.clone(),
            config,
            avail_features: connection.as_ref().map_or(0, Connection::guest_features),
            connection,
            acked_features: 0,
            kicks: eventfds()?,
            calls: eventfds()?,
            interrupt: None,
        })
    }

    /// Whether the device has a working backend connection.
    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    /// The eventfds the backend signals used buffers on, one per queue.
    pub fn call_events(&self) -> &[EventFd] {
        &self.calls
    }

    /// Tells the driver that queue buffers were used; called when a call eventfd fired.
    pub(super) fn signal_used(&self) {
        let Some(interrupt) = &self.interrupt else {
            // The backend finished work from before a reset; the driver no longer waits for it.
            return;
        };
        if let Err(e) = interrupt.signal(InterruptKind::Queue) {
            tracing::error!("virtio-fs {}: cannot raise the interrupt: {e}", self.tag);
        }
    }

    /// Drops the connection after `error`, logging why.
    fn break_down(&mut self, error: &VhostUserFsError) {
        tracing::error!(
            "virtio-fs {}: {}; the device stays broken until the VM ends",
            self.tag,
            error_chain(error)
        );
        self.connection = None;
    }
}

/// `error` and its causes on one line: the device logs rather than returns most errors.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn avail_features(&self) -> u64 {
        // A broken device offers nothing, not even VIRTIO_F_VERSION_1, so the guest's driver
        // refuses it at probe time instead of waiting forever on queues nobody serves.
        if self.connection.is_some() {
            self.avail_features
        } else {
            0
        }
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.kicks
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The tag and queue count are read-only.
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.interrupt.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        if let Some(index) = queues.iter().position(|q| !q.is_valid(&mem)) {
            return Err(ActivateError::InvalidQueue(index));
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(ActivateError::Backend(std::io::Error::other(
                VhostUserFsError::Broken,
            )));
        };
        let started =
            connection.start(self.acked_features, &mem, &queues, &self.kicks, &self.calls);
        if let Err(e) = started {
            self.break_down(&e);
            return Err(ActivateError::Backend(std::io::Error::other(e)));
        }
        self.interrupt = Some(interrupt);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.interrupt.is_some()
    }

    fn reset(&mut self) -> bool {
        if self.interrupt.take().is_none() {
            return true;
        }
        self.acked_features = 0;
        let Some(connection) = self.connection.as_mut() else {
            return false;
        };
        match connection.stop(NUM_QUEUES) {
            Ok(()) => true,
            Err(e) => {
                self.break_down(&e);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_utils::{
        activate, driver_queues, guest_memory, wait_readable, CountingInterrupt, FakeBackend,
        FakeBackendConfig, DESC, MARKER, MARKER_ADDR, MEM_SIZE, QUEUE_LEN, RING_STRIDE,
    };
    use super::*;
    use berth_devices::virtio::VIRTIO_F_VERSION_1;
    use vhost::vhost_user::VhostUserProtocolFeatures;
    use virtio_bindings::bindings::virtio_ring::{
        VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    };

    fn share(socket: &Path) -> ShareConfig {
        ShareConfig {
            tag: "host".into(),
            socket: socket.to_owned(),
        }
    }

    #[test]
    fn new_offers_the_backend_features_the_guest_may_use() {
        let backend = FakeBackend::start(FakeBackendConfig::default());

        let fs = VhostUserFs::new(&share(backend.socket())).unwrap();

        // The fake also offers VIRTIO_F_RING_PACKED and the vhost-user protocol bit: neither
        // is for the guest.
        assert_eq!(
            fs.avail_features(),
            (1 << VIRTIO_F_VERSION_1)
                | (1 << VIRTIO_RING_F_INDIRECT_DESC)
                | (1 << VIRTIO_RING_F_EVENT_IDX)
        );
    }

    #[test]
    fn new_negotiates_reply_ack_and_mq_only() {
        let backend = FakeBackend::start(FakeBackendConfig::default());

        let fs = VhostUserFs::new(&share(backend.socket())).unwrap();

        let negotiated = fs.connection.as_ref().unwrap().protocol_features();
        assert_eq!(
            negotiated,
            VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
        );
    }

    #[test]
    fn new_backend_without_version_1_leaves_device_broken() {
        let backend = FakeBackend::start(FakeBackendConfig { legacy: true });

        let fs = VhostUserFs::new(&share(backend.socket())).unwrap();

        assert!(!fs.is_connected());
        assert_eq!(fs.avail_features(), 0);
    }

    #[test]
    fn new_without_backend_leaves_device_broken() {
        let dir = tempfile::tempdir().unwrap();

        let fs = VhostUserFs::new(&share(&dir.path().join("missing.sock"))).unwrap();

        assert!(!fs.is_connected());
        assert_eq!(fs.avail_features(), 0);
    }

    #[test]
    fn read_config_returns_tag_and_queue_count() {
        let dir = tempfile::tempdir().unwrap();
        let fs = VhostUserFs::new(&share(&dir.path().join("missing.sock"))).unwrap();
        let mut data = [0u8; CONFIG_SIZE];

        fs.read_config(0, &mut data);

        assert_eq!(&data[..5], b"host\0");
        assert_eq!(&data[36..], &[1, 0, 0, 0]);
    }

    #[test]
    fn activate_sends_memory_table_covering_guest_memory() {
        let backend = FakeBackend::start(FakeBackendConfig::default());
        let mem = guest_memory();
        let mut fs = VhostUserFs::new(&share(backend.socket())).unwrap();

        activate(&mut fs, &mem).unwrap();

        assert_eq!(backend.record().regions, vec![(0, MEM_SIZE)]);
    }

    #[test]
    fn activate_hands_over_queues_the_backend_finds_in_guest_memory() {
        let backend = FakeBackend::start(FakeBackendConfig::default());
        let mem = guest_memory();
        mem.write_obj(MARKER, GuestAddress(MARKER_ADDR)).unwrap();
        let mut fs = VhostUserFs::new(&share(backend.socket())).unwrap();
        activate(&mut fs, &mem).unwrap();

        fs.queue_events()[1].write(1).unwrap();
        let called = wait_readable(&fs.call_events()[1]);

        assert!(called, "the backend never signalled queue 1");
        let record = backend.record();
        let queue = record.kicked[1].expect("queue 1 seen by the backend");
        // The backend translated our host addresses back to the guest addresses the driver set.
        let base = DESC + RING_STRIDE;
        assert_eq!(queue.size, QUEUE_LEN);
        assert_eq!(
            (queue.desc, queue.avail, queue.used),
            (base, base + 0x4000, base + 0x8000)
        );
        // And it reads guest memory through its own mapping of our memfd.
        assert_eq!(record.marker, Some(MARKER));
    }

    #[test]
    fn activate_sends_only_acked_features_plus_the_protocol_bit() {
        let backend = FakeBackend::start(FakeBackendConfig::default());
        let mem = guest_memory();
        let mut fs = VhostUserFs::new(&share(backend.socket())).unwrap();
        fs.set_acked_features(1 << VIRTIO_F_VERSION_1);

        activate(&mut fs, &mem).unwrap();

        assert_eq!(
            backend.record().acked_features,
            Some((1 << VIRTIO_F_VERSION_1) | (1 << 30))
        );
    }

    #[test]
    fn reset_stops_the_rings_and_allows_a_new_activation() {
        let backend = FakeBackend::start(FakeBackendConfig::default());
        let mem = guest_memory();
        let mut fs = VhostUserFs::new(&share(backend.socket())).unwrap();
        activate(&mut fs, &mem).unwrap();

        let clean = fs.reset();
        let again = activate(&mut fs, &mem);

        assert!(clean);
        assert_eq!(backend.record().stopped, vec![0, 1]);
        assert!(again.is_ok());
    }

    #[test]
    fn activate_after_backend_closed_fails_and_breaks_the_device() {
        let backend = FakeBackend::start(FakeBackendConfig::default());
        let mem = guest_memory();
        let mut fs = VhostUserFs::new(&share(backend.socket())).unwrap();
        backend.disconnect();

        let activated = activate(&mut fs, &mem);

        assert!(matches!(activated, Err(ActivateError::Backend(_))));
        assert!(!fs.is_activated());
        assert!(!fs.is_connected());
    }

    #[test]
    fn activate_with_wrong_queue_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut fs = VhostUserFs::new(&share(&dir.path().join("missing.sock"))).unwrap();
        let mem = guest_memory();

        let activated = fs.activate(
            mem.clone(),
            Arc::new(CountingInterrupt::default()),
            driver_queues(&mem).into_iter().take(1).collect(),
        );

        assert!(matches!(
            activated,
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
    }
}
