//! Container networking messages: how a container joins the guest's networks
//! ([`ContainerNetwork`]), where a forwarded connection goes ([`ForwardTarget`]), and the
//! datagram framing of a forwarded UDP flow.
//!
//! berthd owns addressing (it allocates every address, so they survive a VM restart and show
//! in `docker inspect`); the agent only carries it out: it creates the bridge an endpoint names
//! if the guest lacks it, a veth pair per endpoint, and configures the container's end.
//!
//! Published ports never touch the guest's firewall: berthd accepts on the host and opens one
//! stream per TCP connection, or per UDP client address, with a [`crate::StreamHeader`] of kind
//! [`crate::StreamKind::TcpForward`] or [`crate::StreamKind::UdpForward`] naming the
//! [`ForwardTarget`]. A TCP stream is raw bytes both ways (a half-close is forwarded as one); a
//! UDP stream carries datagrams, each as a big-endian `u16` length and the payload.

use std::io::{self, Read, Write};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// Bytes before each datagram on a UDP forward stream: its length, big-endian.
pub const DATAGRAM_HEADER_LEN: usize = 2;

/// The largest UDP payload over IPv4 (65535 - 20 - 8); longer frames are refused.
pub const MAX_DATAGRAM_LEN: usize = 65_507;

/// The guest's uplink: the virtio-net device QEMU's user-mode stack (libslirp) serves, named
/// `eth0` in the guest's own namespace. Its addresses are slirp's fixed defaults.
pub const UPLINK_INTERFACE: &str = "eth0";
/// The guest's address on the uplink.
pub const UPLINK_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The uplink's prefix length.
pub const UPLINK_PREFIX_LEN: u8 = 24;
/// The uplink's gateway, which the user-mode stack maps to the host's loopback: the address
/// behind `host.docker.internal`.
pub const UPLINK_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The user-mode stack's DNS forwarder (it asks the host's resolver).
pub const UPLINK_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);

/// How a container is networked. The host decides; the agent carries it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ContainerNetwork {
    /// A network namespace of its own with only `lo` (`--network none`).
    None,
    /// The guest's own network namespace (`--network host`).
    Host,
    /// The network namespace of another running container (`--network container:<id>`).
    Container {
        /// The id of the container whose namespace to join.
        id: String,
    },
    /// A namespace of its own with one veth endpoint per network, on the networks' bridges.
    Bridge {
        /// The endpoints; the first one carries the default route.
        endpoints: Vec<Endpoint>,
    },
}

/// A guest bridge: one per Docker network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeNetwork {
    /// The bridge device's name in the guest (at most 15 bytes).
    pub bridge: String,
    /// The bridge's own address: the containers' gateway.
    pub gateway: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
}

/// One container interface on one bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The bridge it plugs into, created if the guest lacks it.
    pub network: BridgeNetwork,
    /// The interface's name inside the container (`eth0`, `eth1`, ...).
    pub ifname: String,
    /// The container's address on the network.
    pub address: Ipv4Addr,
    /// The interface's MAC address.
    pub mac: [u8; 6],
}

/// Body of [`crate::Request::SetDnsNames`]: every name on one user-defined network. The agent
/// serves them by DNS on the network's gateway address (port 53, UDP), and forwards other
/// questions to the uplink's forwarder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsNames {
    /// The network's gateway: where its containers send their questions.
    pub gateway: Ipv4Addr,
    /// Names (container names, aliases, short ids) and the address each resolves to.
    pub names: Vec<(String, Ipv4Addr)>,
}

/// Body of [`crate::Request::ConnectNetwork`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// The running container.
    pub id: String,
    /// The new endpoint; it gets no default route (the first network keeps it).
    pub endpoint: Endpoint,
}

/// Body of [`crate::Request::DisconnectNetwork`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDetachment {
    /// The running container.
    pub id: String,
    /// The interface to remove inside the container (`eth1`).
    pub ifname: String,
}

/// Where a forwarded connection or flow goes, as seen from the guest's own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ForwardTarget {
    /// The container's address (or the guest's loopback for `--network host`).
    pub ip: Ipv4Addr,
    /// The container port.
    pub port: u16,
}

/// Writes one datagram with its length header.
pub fn write_datagram(to: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let header = datagram_header(payload.len())?;
    let mut frame = Vec::with_capacity(DATAGRAM_HEADER_LEN + payload.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    to.write_all(&frame)
}

/// The length header of a datagram of `len` bytes; refuses one too long for UDP.
pub fn datagram_header(len: usize) -> io::Result<[u8; DATAGRAM_HEADER_LEN]> {
    if len > MAX_DATAGRAM_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("datagram of {len} bytes is longer than {MAX_DATAGRAM_LEN}"),
        ));
    }
    Ok((len as u16).to_be_bytes())
}

/// The payload length a datagram header announces; refuses one too long for UDP.
pub fn datagram_len(header: [u8; DATAGRAM_HEADER_LEN]) -> io::Result<usize> {
    let len = usize::from(u16::from_be_bytes(header));
    if len > MAX_DATAGRAM_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("datagram of {len} bytes is longer than {MAX_DATAGRAM_LEN}"),
        ));
    }
    Ok(len)
}

/// Reads one datagram into `buffer` and returns its length; `None` at a clean end of stream
/// (before a header). A stream ending inside a datagram is an error.
pub fn read_datagram(from: &mut impl Read, buffer: &mut [u8]) -> io::Result<Option<usize>> {
    let mut header = [0u8; DATAGRAM_HEADER_LEN];
    let mut got = 0;
    while got < header.len() {
        match from.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = datagram_len(header)?;
    let Some(target) = buffer.get_mut(..len) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "datagram larger than the buffer",
        ));
    };
    from.read_exact(target)?;
    Ok(Some(len))
}

/// Formats a MAC address as `02:42:ac:11:00:02`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    #[test]
    fn datagrams_round_trip_in_order_with_empty_ones() {
        let mut wire = Vec::new();
        write_datagram(&mut wire, b"ping").unwrap();
        write_datagram(&mut wire, b"").unwrap();
        write_datagram(&mut wire, &[7u8; 1000]).unwrap();
        let mut reader = Cursor::new(wire);
        let mut buffer = vec![0u8; MAX_DATAGRAM_LEN];

        let first = read_datagram(&mut reader, &mut buffer).unwrap();
        assert_eq!(first, Some(4));
        assert_eq!(&buffer[..4], b"ping");
        assert_eq!(read_datagram(&mut reader, &mut buffer).unwrap(), Some(0));
        assert_eq!(read_datagram(&mut reader, &mut buffer).unwrap(), Some(1000));
        assert_eq!(read_datagram(&mut reader, &mut buffer).unwrap(), None);
    }

    #[test]
    fn write_datagram_too_long_is_refused() {
        let error = write_datagram(&mut Vec::new(), &vec![0u8; MAX_DATAGRAM_LEN + 1]).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn read_datagram_announcing_more_than_udp_allows_is_refused() {
        let mut reader = Cursor::new(vec![0xff, 0xff, 0]);

        let error = read_datagram(&mut reader, &mut [0u8; 70_000]).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn read_datagram_cut_inside_the_payload_is_an_error() {
        let mut reader = Cursor::new(vec![0, 5, b'a', b'b']);

        let error = read_datagram(&mut reader, &mut [0u8; 16]).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn container_network_bridge_round_trips_through_json() {
        let network = ContainerNetwork::Bridge {
            endpoints: vec![Endpoint {
                network: BridgeNetwork {
                    bridge: "berth0".into(),
                    gateway: Ipv4Addr::new(172, 17, 0, 1),
                    prefix_len: 16,
                },
                ifname: "eth0".into(),
                address: Ipv4Addr::new(172, 17, 0, 2),
                mac: [0x02, 0x42, 172, 17, 0, 2],
            }],
        };

        let json = serde_json::to_string(&network).unwrap();

        assert_eq!(
            serde_json::from_str::<ContainerNetwork>(&json).unwrap(),
            network
        );
    }

    #[test]
    fn format_mac_is_lowercase_colon_separated() {
        assert_eq!(
            format_mac(&[0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            "02:42:ac:11:00:02"
        );
    }
}
