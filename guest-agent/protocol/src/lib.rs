//! The host⇄guest contract of Berth, and the only crate both sides share.
//!
//! The host (berthd, the `berth` CLI, tests) talks to `berth-agent`, PID 1 in the guest, over
//! virtio-vsock. The control connection on [`CONTROL_PORT`] carries request/response frames
//! ([`frame`]); the first exchange on it is the version handshake ([`Hello`] / [`HelloAck`]).
//! Bulk and interactive data never travels on the control connection: each stream gets a vsock
//! connection of its own (see DESIGN.md, "Host ⇄ guest protocol").
//!
//! Messages are serde types encoded as JSON inside a binary frame header. JSON keeps the wire
//! readable in logs and lets an older peer skip fields it does not know; the header carries the
//! protocol version so a peer from the future is told so plainly instead of failing to parse.

pub mod archive;
pub mod container;
pub mod defaults;
pub mod frame;
pub mod messages;
pub mod network;
pub mod storage;

pub use archive::*;
pub use container::*;

pub use frame::{
    read_frame, read_frame_payload, write_frame, FrameError, FRAME_HEADER_LEN, FRAME_MAGIC,
    MAX_FRAME_LEN,
};
pub use messages::*;
pub use network::{
    BridgeNetwork, ContainerNetwork, DnsNames, Endpoint, ForwardTarget, NetworkAttachment,
    NetworkDetachment,
};
pub use storage::*;

/// The protocol version this build speaks. Bump it when a message changes meaning; adding an
/// optional field or a new request does not need a bump.
pub const PROTOCOL_VERSION: u16 = 1;

/// The oldest protocol version this build still accepts from a peer.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// vsock port of the agent's control server (request/response frames).
pub const CONTROL_PORT: u32 = 1024;

/// vsock port of the agent's stream server: every bulk or interactive stream (stdio, TTY,
/// port-forward traffic, layer uploads, archive copies) is a connection of its own to this port,
/// tagged by a header naming what it belongs to.
pub const STREAM_PORT: u32 = 1025;

/// The unix socket of the stream server of an agent in native mode (DESIGN.md tier 1) whose
/// control socket is `control_socket`: the same path with `.streams` appended. It plays the
/// role of [`STREAM_PORT`].
pub fn stream_socket_path(control_socket: &std::path::Path) -> std::path::PathBuf {
    let mut path = control_socket.as_os_str().to_owned();
    path.push(".streams");
    path.into()
}

/// Host-side vsock port the agent connects to once its control server listens, to send one
/// [`ReadyNotice`] frame. The host connects to [`CONTROL_PORT`] only after that: a host-initiated
/// connection attempted while the guest's vsock driver is still coming up can wedge a
/// vhost-user vsock device (measured with vhost-device-vsock 0.3 under load), and polling from
/// the host costs boot time anyway. Under the hybrid vsock convention the host listens on the
/// unix socket `<vsock socket>_<READY_PORT>`.
pub const READY_PORT: u32 = 1023;

/// The vsock context ID of the host, as seen from the guest.
pub const HOST_CID: u32 = 2;

/// The vsock context ID every Berth guest is given.
pub const GUEST_CID: u32 = 3;

/// Picks the protocol version both peers speak, given the range the peer offered.
///
/// Returns `None` when the ranges do not overlap.
pub fn negotiate_version(peer_min: u16, peer_max: u16) -> Option<u16> {
    let version = peer_max.min(PROTOCOL_VERSION);
    (version >= peer_min.max(MIN_PROTOCOL_VERSION)).then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_socket_path_appends_suffix() {
        assert_eq!(
            stream_socket_path(std::path::Path::new("/run/agent.sock")),
            std::path::PathBuf::from("/run/agent.sock.streams")
        );
    }

    #[test]
    fn negotiate_version_same_range_picks_ours() {
        assert_eq!(
            negotiate_version(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            Some(PROTOCOL_VERSION)
        );
    }

    #[test]
    fn negotiate_version_newer_peer_downgrades_to_ours() {
        assert_eq!(
            negotiate_version(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION + 5),
            Some(PROTOCOL_VERSION)
        );
    }

    #[test]
    fn negotiate_version_peer_only_speaks_future_versions_fails() {
        assert_eq!(
            negotiate_version(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2),
            None
        );
    }
}
