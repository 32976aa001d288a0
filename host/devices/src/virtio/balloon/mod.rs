//! virtio-balloon with free page reporting: the guest hands memory back to the host.
//!
//! Two ways memory comes back:
//! - **Inflate**: the driver gives up pages because the host asked for it ([`Balloon::set_target_pages`]
//!   sets `num_pages` in the config space); each inflate buffer is an array of 4 KiB page frame
//!   numbers whose host memory we release.
//! - **Free page reporting** (`VIRTIO_BALLOON_F_REPORTING`): the guest kernel reports ranges of
//!   its free memory, typically 2 MiB and up, on its own; we release them and return the
//!   buffers. This is what makes guest memory shrink on the host after a container exits.
//!
//! Releasing means `madvise(MADV_DONTNEED)` for private anonymous guest memory (the pages read
//! back as zeroes and cost nothing until touched again) and `MADV_REMOVE` for shared
//! (memfd or file) memory, which punches the hole in the backing file. Deflate needs nothing:
//! the guest simply uses the pages again.
//!
//! Features and queues: we offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` and `_F_REPORTING`, not
//! `_F_STATS_VQ` or `_F_FREE_PAGE_HINT`, so by the virtio 1.2 queue order (inflateq, deflateq,
//! statsq if STATS_VQ, free_page_vq if FREE_PAGE_HINT, reporting_vq if REPORTING) the queues
//! are inflate = 0, deflate = 1 and, only when the driver acks REPORTING, reporting = 2.

mod device;
mod event_handler;
mod memory;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use device::Balloon;
pub use memory::ReleaseError;

use std::io;

/// virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Log2 of the balloon's page size: page frame numbers count 4 KiB pages whatever the guest's or
/// host's page size.
pub const PFN_SHIFT: u32 = 12;
/// Bytes of page frame numbers one inflate chain may carry (16384 pages, 64 MiB); Linux sends
/// at most 256 per buffer.
pub const MAX_PFN_BYTES: u64 = 64 * 1024;

/// Feature bits of virtio-balloon (virtio 1.2, 5.5.3).
pub mod features {
    /// The guest may deflate the balloon when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// The guest reports free memory on the reporting queue.
    pub const REPORTING: u32 = 5;
}

/// Queue indices under the features we offer.
pub mod queue {
    /// Page frame numbers the guest gives up.
    pub const INFLATE: usize = 0;
    /// Page frame numbers the guest takes back.
    pub const DEFLATE: usize = 1;
    /// Free memory ranges; present only when the driver acked REPORTING.
    pub const REPORTING: usize = 2;
}

/// Errors of running the balloon.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A queue event could not be created.
    #[error("cannot create a queue event")]
    EventFd(#[source] io::Error),
    /// A queue's rings could not be read or written.
    #[error("virtio queue")]
    Queue(#[source] virtio_queue::Error),
    /// The interrupt could not be raised.
    #[error("cannot signal the guest")]
    Interrupt(#[source] io::Error),
}
