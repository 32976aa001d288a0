//! virtio-blk: a raw disk image file as a guest block device (`/dev/vda`, `/dev/vdb`, ...).
//!
//! One request queue. Each chain is a request: a 16-byte device-readable header (type,
//! sector), data buffers whose direction follows the type, and a device-writable status byte.
//! Every part is checked against guest memory and the disk's size before any I/O happens; a
//! request that fails a check is answered with `VIRTIO_BLK_S_IOERR` (or `_UNSUPP`), never with
//! a panic.
//!
//! The image is served with `pread`/`pwrite` straight between the file and guest memory,
//! synchronously, on the event-loop thread: simple and fast enough for one data disk, at the
//! price that a slow host disk stalls the loop's other devices while a request runs.

mod device;
mod disk;
mod event_handler;
mod request;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use device::Block;
pub use disk::Disk;

use std::io;
use std::path::PathBuf;

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Log2 of the virtio sector size.
pub const SECTOR_SHIFT: u32 = 9;
/// The virtio sector: the unit of every offset and length in the protocol.
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Data descriptors per request at most: the header and the status take the other two
/// descriptors a request may use in the queue.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Sectors one discard request may cover (1 GiB), so one request cannot stall the event loop.
pub const MAX_DISCARD_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// Sectors one write-zeroes request may cover (1 GiB).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << (30 - SECTOR_SHIFT);
/// Segments per discard or write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 1;
/// The alignment the guest should give discards, in sectors: the host file system's usual
/// 4 KiB block, below which a hole cannot be punched.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 4096 >> SECTOR_SHIFT;
/// Length of the `GET_ID` serial string.
pub const ID_BYTES: usize = 20;

/// Request types (virtio 1.2, 5.2.6).
pub mod request_type {
    /// Read sectors into the data buffers.
    pub const IN: u32 = 0;
    /// Write the data buffers to sectors.
    pub const OUT: u32 = 1;
    /// Make every completed write durable.
    pub const FLUSH: u32 = 4;
    /// Return the device's serial string.
    pub const GET_ID: u32 = 8;
    /// Drop the contents of sector ranges.
    pub const DISCARD: u32 = 11;
    /// Make sector ranges read back as zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// The request succeeded.
    pub const OK: u8 = 0;
    /// The request failed.
    pub const IOERR: u8 = 1;
    /// The request type or one of its flags is not supported.
    pub const UNSUPP: u8 = 2;
}

/// Feature bits of virtio-blk (virtio 1.2, 5.2.3).
pub mod features {
    /// `seg_max` in the config space is valid.
    pub const SEG_MAX: u32 = 2;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` in the config space is valid.
    pub const BLK_SIZE: u32 = 6;
    /// The device honours FLUSH requests.
    pub const FLUSH: u32 = 9;
    /// The device takes DISCARD requests.
    pub const DISCARD: u32 = 13;
    /// The device takes WRITE_ZEROES requests.
    pub const WRITE_ZEROES: u32 = 14;
}

/// Errors of setting up and running the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the image (another VM using it).
    #[error("disk image {} is in use by another process", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
        /// The `flock` failure.
        #[source]
        source: io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of disk image {}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The queue event could not be created.
    #[error("cannot create the queue event")]
    EventFd(#[source] io::Error),
    /// The queue's rings could not be read or written.
    #[error("virtio queue")]
    Queue(#[source] virtio_queue::Error),
    /// The interrupt could not be raised.
    #[error("cannot signal the guest")]
    Interrupt(#[source] io::Error),
}
