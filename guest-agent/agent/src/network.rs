//! Container networking in the guest: the bridges, a veth pair per container endpoint, and the
//! namespace choice for `--network none|host|container:<id>`.
//!
//! berthd decides every address ([`agent_protocol::ContainerNetwork`]); this module carries it
//! out once the container's init exists (stopped before exec, so its namespace exists and
//! nothing in it runs yet):
//!
//! 1. the endpoint's bridge is created and addressed with the network's gateway if the guest
//!    lacks it (so a VM restart needs no separate network setup), and brought up;
//! 2. a veth pair is created with its peer born inside the container's namespace as `eth0`
//!    (with the endpoint's MAC); the guest end is enslaved to the bridge and brought up;
//! 3. on a thread that joined the container's namespace: the address, `up`, and for the first
//!    endpoint the default route via the gateway.
//!
//! The pair disappears with the namespace, so deleting a container needs nothing here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::thread;

use agent_protocol::{BridgeNetwork, Endpoint};
use nix::sched::CloneFlags;
use thiserror::Error;

use crate::netlink::{self, Netlink};

/// Why a container's network could not be set up.
#[derive(Debug, Error)]
pub enum NetworkError {
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    #[error("cannot open a netlink socket")]
    Netlink(#[source] io::Error),
    #[error("cannot create bridge {0}")]
    Bridge(String, #[source] io::Error),
    #[error("cannot create the veth pair {0}")]
    Veth(String, #[source] io::Error),
    #[error("cannot configure {0} in the container")]
    Inside(String, #[source] io::Error),
    #[error("cannot open the container's network namespace")]
    Namespace(#[source] io::Error),
    #[error("cannot enable IP forwarding")]
    Forwarding(#[source] io::Error),
    #[error("cannot configure the uplink {0}")]
    Uplink(&'static str, #[source] io::Error),
    #[error("cannot install the masquerade rule")]
    Masquerade(#[source] io::Error),
}

/// Plugs the container whose init is `pid` into every endpoint; the first one gets the
/// default route.
pub fn connect(container_id: &str, pid: u32, endpoints: &[Endpoint]) -> Result<(), NetworkError> {
    let netns = File::open(format!("/proc/{pid}/ns/net")).map_err(NetworkError::Namespace)?;
    let mut netlink = Netlink::open().map_err(NetworkError::Netlink)?;
    for endpoint in endpoints {
        plug(&mut netlink, container_id, &netns, endpoint)?;
    }
    configure_inside(netns, endpoints.to_vec(), true)
}

/// Plugs a running container into one more network, without touching its default route.
pub fn attach(container_id: &str, pid: u32, endpoint: &Endpoint) -> Result<(), NetworkError> {
    let netns = File::open(format!("/proc/{pid}/ns/net")).map_err(NetworkError::Namespace)?;
    let mut netlink = Netlink::open().map_err(NetworkError::Netlink)?;
    plug(&mut netlink, container_id, &netns, endpoint)?;
    configure_inside(netns, vec![endpoint.clone()], false)
}

/// Removes interface `ifname` from the running container whose init is `pid`; its veth peer on
/// the bridge goes with it.
pub fn detach(pid: u32, ifname: &str) -> Result<(), NetworkError> {
    check_name(ifname)?;
    let netns = File::open(format!("/proc/{pid}/ns/net")).map_err(NetworkError::Namespace)?;
    let ifname = ifname.to_owned();
    in_namespace(netns, move |netlink| {
        let failed = |e| NetworkError::Inside(ifname.clone(), e);
        let index = netlink::index_of(&ifname).map_err(failed)?;
        netlink.request(netlink::del_link(index)).map_err(failed)
    })
}

/// The veth pair of one endpoint: the peer born in the container's namespace, the guest end
/// on the bridge and up.
fn plug(
    netlink: &mut Netlink,
    container_id: &str,
    netns: &File,
    endpoint: &Endpoint,
) -> Result<(), NetworkError> {
    check_name(&endpoint.ifname)?;
    let bridge = ensure_bridge(netlink, &endpoint.network)?;
    let host_end = host_veth_name(container_id, &endpoint.ifname);
    netlink
        .request(netlink::new_veth(
            &host_end,
            &endpoint.ifname,
            &endpoint.mac,
            netns.as_raw_fd(),
        ))
        .map_err(|e| NetworkError::Veth(host_end.clone(), e))?;
    let host_index =
        netlink::index_of(&host_end).map_err(|e| NetworkError::Veth(host_end.clone(), e))?;
    netlink
        .request(netlink::set_up(host_index, Some(bridge)))
        .map_err(|e| NetworkError::Veth(host_end.clone(), e))
}

/// Configures the guest's uplink if the VM has one (`eth0`, virtio-net): slirp's static
/// address and default route, IP forwarding, and the masquerade rule that lets containers out.
/// Returns false when there is no uplink (nothing to do).
pub fn configure_uplink() -> Result<bool, NetworkError> {
    use agent_protocol::network::{
        UPLINK_ADDRESS, UPLINK_GATEWAY, UPLINK_INTERFACE, UPLINK_PREFIX_LEN,
    };
    let Ok(index) = netlink::index_of(UPLINK_INTERFACE) else {
        return Ok(false);
    };
    let failed = |e| NetworkError::Uplink(UPLINK_INTERFACE, e);
    let mut netlink = Netlink::open().map_err(NetworkError::Netlink)?;
    ignore_exists(netlink.request(netlink::new_address(
        index,
        UPLINK_ADDRESS,
        UPLINK_PREFIX_LEN,
    )))
    .map_err(failed)?;
    netlink
        .request(netlink::set_up(index, None))
        .map_err(failed)?;
    ignore_exists(netlink.request(netlink::new_default_route(UPLINK_GATEWAY))).map_err(failed)?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetworkError::Forwarding)?;
    let mut netfilter = Netlink::open_netfilter().map_err(NetworkError::Netlink)?;
    netfilter
        .batch(netlink::masquerade_batch("berth", index))
        .map_err(NetworkError::Masquerade)?;
    Ok(true)
}

/// Creates `network`'s bridge if the guest lacks it, gives it the gateway address and brings
/// it up; returns its index.
pub fn ensure_bridge(netlink: &mut Netlink, network: &BridgeNetwork) -> Result<u32, NetworkError> {
    check_name(&network.bridge)?;
    let failed = |e| NetworkError::Bridge(network.bridge.clone(), e);
    if netlink::index_of(&network.bridge).is_err() {
        ignore_exists(netlink.request(netlink::new_bridge(&network.bridge))).map_err(failed)?;
    }
    let index = netlink::index_of(&network.bridge).map_err(failed)?;
    // Also for a bridge that exists: a network created again on the same subnet reuses it.
    ignore_exists(netlink.request(netlink::new_address(
        index,
        network.gateway,
        network.prefix_len,
    )))
    .map_err(failed)?;
    netlink
        .request(netlink::set_up(index, None))
        .map_err(failed)?;
    // Containers on different bridges and (with NAT) the uplink need routing between them.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetworkError::Forwarding)?;
    Ok(index)
}

/// Addresses and routes inside the container: `lo` and every endpoint up, and with
/// `default_route` the first endpoint's gateway as the default route.
fn configure_inside(
    netns: File,
    endpoints: Vec<Endpoint>,
    default_route: bool,
) -> Result<(), NetworkError> {
    in_namespace(netns, move |netlink| {
        if let Ok(lo) = netlink::index_of("lo") {
            let _ = netlink.request(netlink::set_up(lo, None));
        }
        for (position, endpoint) in endpoints.iter().enumerate() {
            let failed = |e| NetworkError::Inside(endpoint.ifname.clone(), e);
            let index = netlink::index_of(&endpoint.ifname).map_err(failed)?;
            netlink
                .request(netlink::new_address(
                    index,
                    endpoint.address,
                    endpoint.network.prefix_len,
                ))
                .map_err(failed)?;
            netlink
                .request(netlink::set_up(index, None))
                .map_err(failed)?;
            if default_route && position == 0 {
                netlink
                    .request(netlink::new_default_route(endpoint.network.gateway))
                    .map_err(failed)?;
            }
        }
        Ok(())
    })
}

/// Runs `work` with a netlink socket inside the namespace `netns`, on a thread that joins it
/// (a netlink socket belongs to the namespace of the thread that opens it). The thread exits
/// afterwards, so the agent's other threads never change namespace.
fn in_namespace(
    netns: File,
    work: impl FnOnce(&mut Netlink) -> Result<(), NetworkError> + Send + 'static,
) -> Result<(), NetworkError> {
    let worker = thread::Builder::new()
        .name("netns-setup".into())
        .spawn(move || -> Result<(), NetworkError> {
            nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetworkError::Namespace(e.into()))?;
            let mut netlink = Netlink::open().map_err(NetworkError::Netlink)?;
            work(&mut netlink)
        })
        .map_err(NetworkError::Namespace)?;
    worker.join().unwrap_or_else(|_| {
        Err(NetworkError::Namespace(io::Error::other(
            "setup thread panicked",
        )))
    })
}

/// The guest-side name of the veth whose peer is `ifname` in the container: unique per
/// container (ids are long random hex) and interface (`eth3` → `…3`), within 15 bytes.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let short: String = container_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect();
    let number: String = ifname
        .chars()
        .filter(char::is_ascii_digit)
        .take(3)
        .collect();
    format!("vb{short}{number}")
}

/// Interface names the kernel accepts: 1 to 15 bytes, no `/`, whitespace or `:`.
fn check_name(name: &str) -> Result<(), NetworkError> {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if valid {
        Ok(())
    } else {
        Err(NetworkError::InvalidName(name.to_owned()))
    }
}

fn ignore_exists(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_name_fits_the_kernel_limit() {
        let name = host_veth_name(&"ab".repeat(32), "eth7");

        assert_eq!(name, "vbababababab7");
        assert!(name.len() <= 15);
    }

    #[test]
    fn check_name_refuses_slash_and_overlong() {
        assert!(check_name("eth0").is_ok());
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(16)).is_err());
    }
}
