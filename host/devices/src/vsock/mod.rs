//! virtio-vsock with the host side as unix sockets: Firecracker's "hybrid vsock" convention.
//!
//! # Roles
//!
//! - The **guest** speaks virtio-vsock: it puts packets for the host on the TX queue and
//!   buffers for packets from the host on the RX queue. Every packet names a connection by its
//!   guest port (`peer_port` here) and host port (`local_port`), and carries the sender's
//!   receive buffer size (`buf_alloc`) and how much of it the sender has consumed (`fwd_cnt`):
//!   that is the credit flow control both sides must respect.
//! - A **host client** connects to the unix listener at `<uds_path>`, writes
//!   `CONNECT <guest port>\n`, and once the guest accepted reads `OK <host port>\n`; the rest of
//!   that unix stream is the connection. When the guest connects to host port `P`, the
//!   [`VsockMuxer`] connects to the unix socket `<uds_path>_<P>` on its behalf.
//! - The [`VsockMuxer`] owns the listener, every host socket and one connection state machine
//!   per stream. It is independent of the transport:
//!   [`queue::process_tx`] hands it the guest's packets and [`queue::process_rx`] asks it to fill
//!   the guest's RX buffers. Our own VMM and the `berth-vsock` vhost-user backend both drive it
//!   through those two functions plus [`VsockMuxer::process_events`] whenever its epoll fd
//!   fires.
//!
//! # Pending work cannot be stranded
//!
//! Host-to-guest work (a REQUEST, a RESPONSE, a credit update, host data, an RST) is a flag on
//! its connection. A connection with any flag set is in the muxer's ready queue exactly once; it
//! leaves the queue only when [`VsockMuxer::recv_pkt`] asks it for a packet, and goes back to the
//! end of the queue if it still has work. A connection that turns out to have nothing to send
//! (its socket had no data after all) is skipped and the next one asked, so one idle entry can
//! never hide the work behind it. The transport must call [`queue::process_rx`] both when the
//! guest adds RX buffers and after anything that may have created work (TX processing, host
//! socket events).

mod connection;
mod device;
mod muxer;
mod packet;
pub mod queue;
#[cfg(test)]
mod test_utils;

pub use device::Vsock;
pub use muxer::{MuxerConfig, VsockMuxer};
pub use packet::{ConnKey, Header};
/// Size of a packet header in guest memory.
pub use virtio_vsock::packet::PKT_HEADER_SIZE;

use std::io;
use std::path::PathBuf;

/// virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The context ID of the host, as the guest addresses it.
pub const HOST_CID: u64 = 2;

/// Index of the queue carrying host-to-guest packets.
pub const RX_QUEUE: usize = 0;
/// Index of the queue carrying guest-to-host packets.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (transport resets); unused by this device.
pub const EVENT_QUEUE: usize = 2;
/// Number of queues of a vsock device.
pub const NUM_QUEUES: usize = 3;
/// Default (and maximum) size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Largest payload of one packet in either direction (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// The receive buffer each connection advertises to the guest (`buf_alloc`): guest data the
/// host socket has not taken yet is buffered up to this size, never more.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// A credit update is owed once this many bytes were forwarded since the guest last heard our
/// `fwd_cnt`. Must not exceed [`CONN_BUF_SIZE`]: a guest out of credit has sent exactly
/// `CONN_BUF_SIZE` unacknowledged bytes, so forwarding them always crosses the threshold.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// The only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio spec 5.10.6).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, aborted or finished).
    pub const RST: u16 = 3;
    /// The sender will receive and/or send no more (see the `SHUTDOWN_*` flags).
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The device's configuration space: the guest's context ID, little-endian.
pub fn config_space(guest_cid: u64) -> [u8; 8] {
    guest_cid.to_le_bytes()
}

/// Errors of the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The hybrid-vsock listener could not be created.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An epoll call failed.
    #[error("epoll")]
    Epoll(#[source] io::Error),
    /// The queue's rings could not be read or written.
    #[error("virtio queue")]
    Queue(#[source] virtio_queue::Error),
}
