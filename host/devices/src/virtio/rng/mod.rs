//! virtio-rng: entropy for the guest from a host source.

mod device;
mod event_handler;
#[cfg(test)]
mod test_utils;

pub use device::Rng;

use std::fmt::Debug;
use std::fs::File;
use std::io::{self, Read};

/// virtio device ID of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes served per request at most, so one request cannot stall the event loop.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// Where the random bytes come from.
pub trait EntropySource: Send + Debug {
    /// Fills `buf` completely.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

/// The host's `/dev/urandom`.
#[derive(Debug)]
pub struct OsEntropy(File);

impl OsEntropy {
    /// Opens `/dev/urandom`.
    pub fn open() -> io::Result<Self> {
        File::open("/dev/urandom").map(Self)
    }
}

impl EntropySource for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact(buf)
    }
}

/// Errors of request processing.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// A buffer of the chain is readable by the device only.
    #[error("request has a device-readable buffer")]
    ReadOnlyBuffer,
    /// A buffer does not lie entirely inside guest memory.
    #[error("request buffer outside guest memory")]
    OutsideMemory,
    /// Writing a buffer failed.
    #[error("cannot write the request buffer")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// The entropy source failed.
    #[error("entropy source failed")]
    Source(#[source] io::Error),
    /// The queue's rings could not be read or written.
    #[error("virtio queue")]
    Queue(#[source] virtio_queue::Error),
}
