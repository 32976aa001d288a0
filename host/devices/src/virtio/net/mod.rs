//! virtio-net: an Ethernet link from the guest to a user-mode network stack on the host.
//!
//! The backend is a connected unix stream socket speaking QEMU's `-netdev stream` framing, which
//! is what passt serves on its `-s PATH` socket: every frame is a 4-byte big-endian length and
//! a raw Ethernet frame, with no virtio-net header. The device strips the guest's header on TX
//! and writes a zeroed one on RX, so it offers no checksum or segmentation offloads (the stream
//! has no header to carry them) and no mergeable RX buffers: every received frame goes into one
//! RX chain.
//!
//! Two queues, RX (0) and TX (1). Everything runs on the event-loop thread:
//!
//! - TX: each chain's frame is appended to an outgoing buffer that is written to the socket in
//!   batches. When the socket would block and the buffer is full, the device stops taking TX
//!   chains (the guest's queue fills up and its driver stops the interface) until the socket
//!   reports it is writable again.
//! - RX: the socket is read into a bounded reassembly buffer and cut into frames. A frame with
//!   no guest buffer to go into stays there, and the socket is not read again until the driver
//!   adds buffers, so a guest that stops receiving pushes back on the backend instead of growing
//!   the VMM.
//! - Everything the guest supplies is checked (descriptor direction, guest memory ranges,
//!   lengths); a bad chain is returned with a used length of 0 and counted. Everything the
//!   backend supplies is checked too: a length the framing cannot carry means the backend is
//!   broken, and like end-of-file it takes the link down for good (`VIRTIO_NET_S_LINK_UP`
//!   cleared, configuration interrupt). A down link still consumes TX chains, dropping them,
//!   so the guest's TX queue never wedges.
//!
//! The socket is registered once, edge-triggered for reading and writing, so the device keeps
//! track of whether it may still hold data.

mod device;
mod event_handler;
mod stream;
#[cfg(test)]
mod test_utils;
#[cfg(test)]
mod tests;

pub use device::{Net, NetStats};
pub use stream::{FrameStream, StreamError};

use std::fmt::{self, Debug};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::str::FromStr;

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Size of `struct virtio_net_hdr_v1` (virtio 1.2, 5.1.6), which starts every chain both ways.
pub const NET_HDR_SIZE: usize = 12;
/// The shortest frame passed either way: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// The longest frame passed either way: the largest IPv4/IPv6 packet plus its Ethernet header
/// would not fit a 16-bit length, so 65535 is the bound passt and QEMU use for the stream too.
pub const MAX_FRAME_LEN: usize = 65535;
/// Size of the length that precedes every frame on the stream.
pub const FRAME_LEN_SIZE: usize = 4;

/// Feature bits of virtio-net (virtio 1.2, 5.1.3).
pub mod features {
    /// `mac` in the configuration space is valid.
    pub const MAC: u32 = 5;
    /// `status` in the configuration space is valid.
    pub const STATUS: u32 = 16;
}

/// `VIRTIO_NET_S_LINK_UP`: the bit of `status` that says the link is up.
pub const STATUS_LINK_UP: u16 = 1;

/// The byte stream a [`Net`] device exchanges frames over: a connected, non-blocking unix
/// stream socket in the VMM, one end of `UnixStream::pair()` in tests.
pub trait NetSocket: Read + Write + AsRawFd + Send + Debug {}

impl<T: Read + Write + AsRawFd + Send + Debug> NetSocket for T {}

/// An Ethernet MAC address, written `xx:xx:xx:xx:xx:xx`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The octets.
    pub fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Errors of parsing a [`MacAddr`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseMacError {
    /// Not six two-digit hex bytes separated by colons.
    #[error("MAC address {0:?} is not six hex bytes separated by colons")]
    Syntax(String),
    /// A multicast or all-zero address, which no interface may have (Linux would replace it).
    #[error("MAC address {0} is multicast or zero, not an interface address")]
    NotUnicast(String),
}

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ParseMacError::Syntax(s.to_owned());
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 {
                return Err(syntax());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        if octets[0] & 1 != 0 || octets == [0; 6] {
            return Err(ParseMacError::NotUnicast(s.to_owned()));
        }
        Ok(Self(octets))
    }
}

/// Errors of setting up and running the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The backend's socket could not be connected.
    #[error("cannot connect to the network backend at {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The socket could not be made non-blocking.
    #[error("cannot make the network backend socket non-blocking")]
    NonBlocking(#[source] io::Error),
    /// A queue event could not be created.
    #[error("cannot create the queue events")]
    EventFd(#[source] io::Error),
    /// A queue's rings could not be read or written.
    #[error("virtio queue")]
    Queue(#[source] virtio_queue::Error),
    /// The interrupt could not be raised.
    #[error("cannot signal the guest")]
    Interrupt(#[source] io::Error),
}

/// Why a chain carried no frame (TX) or took none (RX); the chain is returned with length 0.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChainError {
    /// A TX chain has a device-writable descriptor, or an RX chain a device-readable one.
    #[error("descriptor has the wrong direction")]
    Direction,
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A TX chain's frame is shorter than an Ethernet header (or the header is missing).
    #[error("frame of {0} bytes after the header is too short")]
    TooShort(u64),
    /// A TX chain's frame is longer than the stream can carry.
    #[error("frame of {0} bytes is longer than {MAX_FRAME_LEN}")]
    TooLong(u64),
    /// A TX header asks for an offload the device did not offer.
    #[error("header asks for offloads that were not offered (flags {flags:#x}, gso {gso:#x})")]
    Offload {
        /// `flags` of the header.
        flags: u8,
        /// `gso_type` of the header.
        gso: u8,
    },
    /// Guest memory could not be read or written.
    #[error("guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    /// An RX chain cannot hold the header and the frame.
    #[error("buffer of {capacity} bytes cannot hold a frame of {frame} bytes and its header")]
    TooSmall {
        /// Writable bytes of the chain.
        capacity: u64,
        /// Length of the frame.
        frame: usize,
    },
}

/// `error` and its causes, joined by `: `, for a log line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
