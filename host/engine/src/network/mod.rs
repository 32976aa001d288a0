//! Container networking, the host's half: network modes, address management (IPAM) for the
//! default bridge, published ports, and the `/etc/hosts` and `/etc/resolv.conf` a container
//! gets. berthd owns every address, so addresses show in `docker inspect` and survive a VM
//! restart; the agent only carries them out (`agent_protocol::ContainerNetwork`).
//!
//! Published ports are forwarded by berthd itself ([`forward`]): it listens on the host and
//! turns each connection (or UDP client) into a stream to the agent, which connects to the
//! container. No privileges, no TAP device, no firewall rules on the host.

pub mod forward;
pub mod ops;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use agent_protocol::{BridgeNetwork, Endpoint};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::sync::lock;
use crate::ErrorKind;

/// The default bridge's name in Docker's terms.
pub const DEFAULT_NETWORK: &str = "bridge";
/// The default bridge's device in the guest (Docker's `docker0`).
pub const DEFAULT_BRIDGE: &str = "berth0";
/// Docker's default bridge subnet, 172.17.0.0/16.
pub const DEFAULT_SUBNET: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 0);
/// The default subnet's prefix length.
pub const DEFAULT_PREFIX_LEN: u8 = 16;
/// The default bridge's gateway: the bridge's own address in the guest.
pub const DEFAULT_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);

/// The name containers reach the host's loopback by (as in Docker Desktop).
pub const HOST_ALIAS: &str = "host.docker.internal";

/// Why a network setting is refused.
#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("{0}")]
    Invalid(String),
    #[error("network {0} not found")]
    NoSuchNetwork(String),
    #[error("network with name {0} already exists")]
    Exists(String),
    #[error("{0} is a pre-defined network and cannot be removed")]
    Builtin(String),
    #[error("error while removing network: network {0} id {1} has active endpoints")]
    InUse(String, String),
    #[error("cannot {0}: {1}")]
    Store(&'static str, #[source] std::io::Error),
    #[error("no more addresses in network {0}")]
    Exhausted(String),
    #[error("driver failed programming external connectivity on endpoint {name} ({id}): Bind for {address}:{port} failed: port is already allocated")]
    PortAllocated {
        name: String,
        id: String,
        address: Ipv4Addr,
        port: u16,
    },
    #[error("driver failed programming external connectivity on endpoint {name} ({id}): cannot listen on {address}:{port}/{protocol}: {source}")]
    Listen {
        name: String,
        id: String,
        address: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        #[source]
        source: std::io::Error,
    },
}

impl NetworkError {
    /// The class of failure, for the API's status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::InvalidArgument,
            Self::NoSuchNetwork(_) => ErrorKind::NotFound,
            Self::Exists(_) | Self::InUse(..) | Self::Builtin(_) => ErrorKind::Conflict,
            Self::Exhausted(_)
            | Self::PortAllocated { .. }
            | Self::Listen { .. }
            | Self::Store(..) => ErrorKind::Internal,
        }
    }
}

/// `--network`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// The default bridge (`""`, `default`, `bridge`).
    Bridge,
    /// Only `lo`.
    None,
    /// The guest's namespace.
    Host,
    /// Another container's namespace, by reference.
    Container(String),
    /// A user-defined network, by name or id.
    Named(String),
}

impl NetworkMode {
    /// Parses `HostConfig.NetworkMode`.
    pub fn parse(mode: &str) -> Result<Self, NetworkError> {
        match mode {
            "" | "default" | DEFAULT_NETWORK => Ok(Self::Bridge),
            "none" => Ok(Self::None),
            "host" => Ok(Self::Host),
            other => match other.strip_prefix("container:") {
                Some("") => Err(NetworkError::Invalid(
                    "invalid network mode: container: needs a container name or id".into(),
                )),
                Some(reference) => Ok(Self::Container(reference.to_owned())),
                None => Ok(Self::Named(other.to_owned())),
            },
        }
    }

    /// The name `docker inspect` shows in `HostConfig.NetworkMode`.
    pub fn display(mode: &str) -> String {
        match mode {
            "" | "default" => DEFAULT_NETWORK.to_owned(),
            other => other.to_owned(),
        }
    }
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A container port as Docker names it: `80/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    /// The port number.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

impl PortKey {
    /// Parses `80`, `80/tcp` or `53/udp` (what `ExposedPorts` and `PortBindings` keys hold).
    pub fn parse(key: &str) -> Result<Self, NetworkError> {
        let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(NetworkError::Invalid(format!(
                    "invalid proto: {other} (only tcp and udp are supported)"
                )))
            }
        };
        let port = parse_port(port)
            .ok_or_else(|| NetworkError::Invalid(format!("invalid containerPort: {port}")))?;
        Ok(Self { port, protocol })
    }
}

impl std::fmt::Display for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

fn parse_port(text: &str) -> Option<u16> {
    text.parse::<u16>().ok().filter(|&p| p != 0)
}

/// One requested binding of a container port, as `HostConfig.PortBindings` holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostBinding {
    /// The host address; empty means every address (0.0.0.0).
    pub host_ip: String,
    /// The host port, a range `8080-8090` (the first free one is taken), or empty for any.
    pub host_port: String,
}

/// A port range asked for on the host: `start..=end`, or any free port when `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPorts {
    /// First and last candidate port.
    pub range: Option<(u16, u16)>,
}

impl HostBinding {
    /// The host address to listen on.
    pub fn address(&self) -> Result<Ipv4Addr, NetworkError> {
        if self.host_ip.is_empty() {
            return Ok(Ipv4Addr::UNSPECIFIED);
        }
        self.host_ip.parse().map_err(|_| {
            NetworkError::Invalid(format!(
                "invalid IP address {:?}: only IPv4 host addresses are supported",
                self.host_ip
            ))
        })
    }

    /// The host ports to try.
    pub fn ports(&self) -> Result<HostPorts, NetworkError> {
        let invalid = || NetworkError::Invalid(format!("invalid hostPort: {}", self.host_port));
        if self.host_port.is_empty() || self.host_port == "0" {
            return Ok(HostPorts { range: None });
        }
        let (start, end) = match self.host_port.split_once('-') {
            Some((start, end)) => (
                parse_port(start).ok_or_else(invalid)?,
                parse_port(end).ok_or_else(invalid)?,
            ),
            None => {
                let port = parse_port(&self.host_port).ok_or_else(invalid)?;
                (port, port)
            }
        };
        if end < start {
            return Err(invalid());
        }
        Ok(HostPorts {
            range: Some((start, end)),
        })
    }
}

/// A port published while the container runs: what `docker port` and `ps` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The container port.
    pub container_port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The host address listened on.
    pub host_ip: Ipv4Addr,
    /// The host port listened on.
    pub host_port: u16,
}

/// A running container's place on the networks: `NetworkSettings` in inspect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSettings {
    /// Its endpoints on bridge networks; the first carries the default route.
    #[serde(default)]
    pub endpoints: Vec<BridgeEndpoint>,
    /// Ports published on the host.
    pub ports: Vec<PublishedPort>,
}

/// An address on a bridge network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeEndpoint {
    /// The Docker network's name.
    pub network: String,
    /// The Docker network's id.
    #[serde(default)]
    pub network_id: String,
    /// The bridge device in the guest.
    #[serde(default)]
    pub bridge: String,
    /// Names the embedded DNS answers for the container on this network, besides its own.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The interface inside the container (`eth0`, `eth1`, ...).
    #[serde(default)]
    pub ifname: String,
    /// The container's address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The gateway.
    pub gateway: Ipv4Addr,
    /// The interface's MAC address.
    pub mac: [u8; 6],
}

impl BridgeEndpoint {
    /// The endpoint the agent creates for it.
    pub fn to_wire(&self) -> Endpoint {
        Endpoint {
            network: BridgeNetwork {
                bridge: self.bridge.clone(),
                gateway: self.gateway,
                prefix_len: self.prefix_len,
            },
            ifname: self.ifname.clone(),
            address: self.address,
            mac: self.mac,
        }
    }
}

/// An endpoint's MAC address as text.
pub fn format_mac_of(endpoint: &BridgeEndpoint) -> String {
    agent_protocol::network::format_mac(&endpoint.mac)
}

/// Docker's MAC scheme: `02:42` then the IPv4 address, so a MAC is unique on its network.
pub fn mac_for(address: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = address.octets();
    [0x02, 0x42, a, b, c, d]
}

/// Addresses in use on one subnet; the lowest free one is handed out next.
#[derive(Debug)]
pub struct Ipam {
    subnet: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
    used: Mutex<BTreeSet<Ipv4Addr>>,
}

impl Ipam {
    /// Manages `subnet/prefix_len`; the gateway is never handed out.
    pub fn new(subnet: Ipv4Addr, prefix_len: u8, gateway: Ipv4Addr) -> Self {
        Self {
            subnet,
            prefix_len: prefix_len.clamp(1, 30),
            gateway,
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// The default bridge's 172.17.0.0/16.
    pub fn default_bridge() -> Self {
        Self::new(DEFAULT_SUBNET, DEFAULT_PREFIX_LEN, DEFAULT_GATEWAY)
    }

    /// The lowest free host address (not the network, gateway or broadcast address).
    pub fn allocate(&self) -> Result<Ipv4Addr, NetworkError> {
        let mut used = lock(&self.used);
        let host_bits = 32 - u32::from(self.prefix_len);
        let network = u32::from(self.subnet) & !((1u32 << host_bits) - 1);
        let last = network | ((1u32 << host_bits) - 1);
        let free = (network + 1..last)
            .map(Ipv4Addr::from)
            .find(|a| *a != self.gateway && !used.contains(a))
            .ok_or_else(|| NetworkError::Exhausted(DEFAULT_NETWORK.to_owned()))?;
        used.insert(free);
        Ok(free)
    }

    /// Marks `address` taken (a record restored at start); false if it already was.
    pub fn reserve(&self, address: Ipv4Addr) -> bool {
        lock(&self.used).insert(address)
    }

    /// Returns `address` to the pool.
    pub fn release(&self, address: Ipv4Addr) {
        lock(&self.used).remove(&address);
    }

    /// The gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The subnet in CIDR form.
    pub fn subnet_cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix_len)
    }
}

/// `/etc/hosts` of a container: localhost, its own address (if it has one) under its
/// hostname, then `--add-host` entries (`name:ip`, as the CLI sends them).
pub fn hosts_file(
    hostname: &str,
    address: Option<Ipv4Addr>,
    extra_hosts: &[String],
) -> Result<String, NetworkError> {
    let mut text = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    text.push_str(&format!(
        "{}\t{HOST_ALIAS}\n",
        agent_protocol::network::UPLINK_GATEWAY
    ));
    for entry in extra_hosts {
        let (name, ip) = entry
            .split_once(':')
            .or_else(|| entry.split_once('='))
            .ok_or_else(|| NetworkError::Invalid(format!("bad format for add-host: {entry:?}")))?;
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        if name.is_empty() || ip.parse::<std::net::IpAddr>().is_err() || name.contains('\n') {
            return Err(NetworkError::Invalid(format!(
                "invalid IP address in add-host: {entry:?}"
            )));
        }
        text.push_str(&format!("{ip}\t{name}\n"));
    }
    match address {
        Some(address) => text.push_str(&format!("{address}\t{hostname}\n")),
        None => text.push_str(&format!("127.0.1.1\t{hostname}\n")),
    }
    Ok(text)
}

/// `/etc/resolv.conf` from `--dns`, `--dns-search` and `--dns-option`; without `--dns`, the
/// uplink's DNS forwarder (which asks the host's resolver).
///
/// On a user-defined network the default server is the network's embedded DNS (`embedded`),
/// which answers container names and forwards the rest.
pub fn resolv_conf(dns: &DnsConfig, embedded: Option<Ipv4Addr>) -> Result<String, NetworkError> {
    let mut text = String::new();
    if dns.servers.is_empty() {
        let server = embedded.unwrap_or(agent_protocol::network::UPLINK_DNS);
        text.push_str(&format!("nameserver {server}\n"));
    }
    for server in &dns.servers {
        if server.parse::<std::net::IpAddr>().is_err() {
            return Err(NetworkError::Invalid(format!(
                "{server} is not an ip address"
            )));
        }
        text.push_str(&format!("nameserver {server}\n"));
    }
    let clean = |items: &[String]| items.iter().all(|s| !s.contains(['\n', ' ']));
    if !clean(&dns.search) || !clean(&dns.options) {
        return Err(NetworkError::Invalid(
            "invalid DNS search domain or option".into(),
        ));
    }
    if !dns.search.is_empty() {
        text.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(text)
}

/// What one container asked of one network at create or connect: `--network-alias`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSpec {
    /// Extra names for the container on that network.
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `--dns`, `--dns-search`, `--dns-option`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Name servers.
    pub servers: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// Resolver options.
    pub options: Vec<String>,
}

/// The ports to publish: every binding asked for, plus (with `-P`) every exposed port not
/// bound explicitly, on a free host port.
pub fn bindings_to_publish(
    port_bindings: &BTreeMap<String, Vec<HostBinding>>,
    publish_all: bool,
    exposed: &[String],
) -> Result<Vec<(PortKey, HostBinding)>, NetworkError> {
    let mut out = Vec::new();
    for (key, bindings) in port_bindings {
        let key = PortKey::parse(key)?;
        for binding in bindings {
            binding.address()?;
            binding.ports()?;
            out.push((key, binding.clone()));
        }
    }
    if publish_all {
        let mut exposed_keys = BTreeSet::new();
        for key in exposed {
            exposed_keys.insert(PortKey::parse(key)?);
        }
        for key in exposed_keys {
            if !out.iter().any(|(k, _)| *k == key) {
                out.push((key, HostBinding::default()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_mode_parse_accepts_docker_names() {
        assert_eq!(NetworkMode::parse("").unwrap(), NetworkMode::Bridge);
        assert_eq!(NetworkMode::parse("default").unwrap(), NetworkMode::Bridge);
        assert_eq!(NetworkMode::parse("none").unwrap(), NetworkMode::None);
        assert_eq!(NetworkMode::parse("host").unwrap(), NetworkMode::Host);
        assert_eq!(
            NetworkMode::parse("container:web").unwrap(),
            NetworkMode::Container("web".into())
        );
    }

    #[test]
    fn network_mode_parse_other_name_is_a_user_network() {
        assert_eq!(
            NetworkMode::parse("mynet").unwrap(),
            NetworkMode::Named("mynet".into())
        );
    }

    #[test]
    fn port_key_parse_defaults_to_tcp() {
        assert_eq!(
            PortKey::parse("80").unwrap(),
            PortKey {
                port: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(PortKey::parse("53/udp").unwrap().protocol, Protocol::Udp);
    }

    #[test]
    fn port_key_parse_refuses_zero_sctp_and_junk() {
        assert!(PortKey::parse("0/tcp").is_err());
        assert!(PortKey::parse("80/sctp").is_err());
        assert!(PortKey::parse("http/tcp").is_err());
        assert!(PortKey::parse("70000").is_err());
    }

    #[test]
    fn host_binding_ports_parses_single_range_and_any() {
        let binding = |p: &str| HostBinding {
            host_ip: String::new(),
            host_port: p.into(),
        };

        assert_eq!(binding("").ports().unwrap().range, None);
        assert_eq!(binding("8080").ports().unwrap().range, Some((8080, 8080)));
        assert_eq!(
            binding("8080-8090").ports().unwrap().range,
            Some((8080, 8090))
        );
        assert!(binding("9000-8000").ports().is_err());
        assert!(binding("x").ports().is_err());
    }

    #[test]
    fn host_binding_address_empty_is_every_address() {
        let binding = HostBinding::default();

        assert_eq!(binding.address().unwrap(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn host_binding_address_ipv6_is_refused() {
        let binding = HostBinding {
            host_ip: "::1".into(),
            host_port: "80".into(),
        };

        assert!(binding.address().is_err());
    }

    #[test]
    fn ipam_allocate_skips_gateway_and_takes_lowest_free() {
        let ipam = Ipam::default_bridge();

        let first = ipam.allocate().unwrap();
        let second = ipam.allocate().unwrap();
        ipam.release(first);
        let third = ipam.allocate().unwrap();

        assert_eq!(first, Ipv4Addr::new(172, 17, 0, 2));
        assert_eq!(second, Ipv4Addr::new(172, 17, 0, 3));
        assert_eq!(third, first);
    }

    #[test]
    fn ipam_small_subnet_runs_out() {
        // A /30 has two host addresses; one is the gateway.
        let ipam = Ipam::new(Ipv4Addr::new(10, 0, 0, 0), 30, Ipv4Addr::new(10, 0, 0, 1));

        assert_eq!(ipam.allocate().unwrap(), Ipv4Addr::new(10, 0, 0, 2));
        assert!(matches!(ipam.allocate(), Err(NetworkError::Exhausted(_))));
    }

    #[test]
    fn mac_for_embeds_the_address() {
        assert_eq!(
            mac_for(Ipv4Addr::new(172, 17, 0, 2)),
            [0x02, 0x42, 172, 17, 0, 2]
        );
    }

    #[test]
    fn hosts_file_lists_extra_hosts_and_own_address() {
        let text = hosts_file(
            "web",
            Some(Ipv4Addr::new(172, 17, 0, 2)),
            &["db:10.0.0.5".into()],
        )
        .unwrap();

        assert!(text.contains("10.0.0.5\tdb\n"));
        assert!(text.contains("10.0.2.2\thost.docker.internal\n"));
        assert!(text.ends_with("172.17.0.2\tweb\n"));
    }

    #[test]
    fn hosts_file_bad_add_host_is_refused() {
        assert!(hosts_file("web", None, &["db:not-an-ip".into()]).is_err());
        assert!(hosts_file("web", None, &["nocolon".into()]).is_err());
    }

    #[test]
    fn resolv_conf_writes_servers_search_and_options() {
        let dns = DnsConfig {
            servers: vec!["1.1.1.1".into()],
            search: vec!["example.com".into()],
            options: vec!["ndots:2".into()],
        };

        assert_eq!(
            resolv_conf(&dns, None).unwrap(),
            "nameserver 1.1.1.1\nsearch example.com\noptions ndots:2\n"
        );
    }

    #[test]
    fn resolv_conf_without_dns_uses_the_uplink_forwarder() {
        assert_eq!(
            resolv_conf(&DnsConfig::default(), None).unwrap(),
            "nameserver 10.0.2.3\n"
        );
    }

    #[test]
    fn resolv_conf_bad_server_is_refused() {
        let dns = DnsConfig {
            servers: vec!["dns.example".into()],
            ..DnsConfig::default()
        };

        assert!(resolv_conf(&dns, None).is_err());
    }

    #[test]
    fn bindings_to_publish_all_adds_unbound_exposed_ports() {
        let mut bindings = BTreeMap::new();
        bindings.insert(
            "80/tcp".to_owned(),
            vec![HostBinding {
                host_ip: String::new(),
                host_port: "8080".into(),
            }],
        );

        let out =
            bindings_to_publish(&bindings, true, &["80/tcp".into(), "53/udp".into()]).unwrap();

        assert_eq!(out.len(), 2);
        assert_eq!(out[0].1.host_port, "8080");
        assert_eq!(out[1].0.protocol, Protocol::Udp);
        assert_eq!(out[1].1.host_port, "");
    }
}
