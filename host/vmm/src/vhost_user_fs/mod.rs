//! virtio-fs as a vhost-user frontend: the guest sees a virtio-fs device (ID 26) on virtio-mmio,
//! and `virtiofsd` serves its queues, exactly as QEMU's `vhost-user-fs-device` does.
//!
//! The roles: the guest driver sets the device up through the MMIO transport as for any other
//! device; this device keeps only the configuration space (the tag) and, at DRIVER_OK, hands the
//! queues to the backend over the vhost-user socket: our guest memory (a memfd, see
//! [`crate::memory`]), each ring's address in our address space, and two eventfds per queue.
//! The *kick* is the queue's ioeventfd, which KVM writes when the guest notifies, so guest
//! notifications reach `virtiofsd` without passing through the VMM. The *call* is an eventfd
//! the backend writes when it used buffers; the event loop polls it and raises the interrupt
//! through the transport, so the `InterruptStatus` register shows the queue bit. (Handing the
//! backend the irqfd itself would skip that register, which the guest reads to know why it was
//! interrupted.)
//!
//! A backend that cannot be reached or fails the set-up leaves the device broken, never the VMM:
//! broken at start, it offers no features and the guest driver refuses it (a mount of its tag
//! fails at once); broken later, activation fails and the transport reports DEVICE_NEEDS_RESET.

mod device;
mod event_handler;
mod frontend;
#[cfg(test)]
mod test_utils;

pub use device::VhostUserFs;

use std::io;
use std::path::PathBuf;

use crate::config::{ConfigError, ShareConfig, MAX_SHARE_TAG_LEN};

/// virtio device ID of a file system device.
pub const VIRTIO_ID_FS: u32 = 26;
/// Request queues the device offers: one is what `virtiofsd` serves (and all QEMU offers).
pub const REQUEST_QUEUES: u32 = 1;
/// The high-priority queue (FUSE interrupts and forgets) plus the request queues.
pub const NUM_QUEUES: usize = 1 + REQUEST_QUEUES as usize;
/// The largest queue the driver may set up; `virtiofsd` takes up to 32768, QEMU offers 1024.
pub const QUEUE_SIZE: u16 = 1024;
/// Size of the configuration space: `tag[36]` then `num_request_queues` (le32).
pub const CONFIG_SIZE: usize = MAX_SHARE_TAG_LEN + 4;

/// Errors of the virtio-fs frontend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserFsError {
    /// The share's tag cannot be the device's tag.
    #[error("invalid share")]
    Config(#[source] ConfigError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The backend's socket refused the connection.
    #[error("cannot connect to the vhost-user backend at {0}")]
    Connect(PathBuf, #[source] io::Error),
    /// A vhost-user request failed or was refused.
    #[error("vhost-user {0} failed")]
    Protocol(&'static str, #[source] vhost::Error),
    /// The backend does not speak virtio 1.x, the only version our transport offers.
    #[error("the backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// The backend serves fewer queues than the device has.
    #[error("the backend serves {0} queues, the device needs {NUM_QUEUES}")]
    QueueCount(u64),
    /// A guest memory region has no file behind it, so the backend cannot map it.
    #[error("guest memory at {0:#x} is not shareable")]
    MemoryNotShared(u64),
    /// A queue's ring does not lie inside one guest memory region.
    #[error("queue {0}: a ring is outside guest memory")]
    RingAddress(usize),
    /// The device has no working backend connection.
    #[error("no backend connection")]
    Broken,
}

/// The configuration space for `tag`: the tag NUL-padded to 36 bytes, then the number of
/// request queues. A tag that does not fit is refused rather than cut, since the guest would
/// then know the share by a name nobody gave it.
pub fn config_space(tag: &str) -> Result<[u8; CONFIG_SIZE], VhostUserFsError> {
    ShareConfig::check_tag(tag).map_err(VhostUserFsError::Config)?;
    let mut config = [0u8; CONFIG_SIZE];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    config[MAX_SHARE_TAG_LEN..].copy_from_slice(&REQUEST_QUEUES.to_le_bytes());
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_short_tag_is_nul_padded_before_the_queue_count() {
        let config = config_space("host").unwrap();

        assert_eq!(&config[..4], b"host");
        assert!(config[4..MAX_SHARE_TAG_LEN].iter().all(|b| *b == 0));
        assert_eq!(&config[MAX_SHARE_TAG_LEN..], &[1, 0, 0, 0]);
    }

    #[test]
    fn config_space_tag_of_36_bytes_fills_the_field() {
        let tag = "t".repeat(MAX_SHARE_TAG_LEN);

        let config = config_space(&tag).unwrap();

        assert_eq!(&config[..MAX_SHARE_TAG_LEN], tag.as_bytes());
        assert_eq!(&config[MAX_SHARE_TAG_LEN..], &[1, 0, 0, 0]);
    }

    #[test]
    fn config_space_tag_longer_than_36_bytes_is_refused() {
        let tag = "t".repeat(MAX_SHARE_TAG_LEN + 1);

        let config = config_space(&tag);

        assert!(matches!(
            config,
            Err(VhostUserFsError::Config(ConfigError::ShareTag(_)))
        ));
    }

    #[test]
    fn config_space_empty_tag_is_refused() {
        assert!(config_space("").is_err());
    }
}
