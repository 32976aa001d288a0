//! Published ports, the host's half: listeners bound when a container starts, and one stream
//! to the agent per accepted TCP connection or per UDP client address.
//!
//! Binding happens before anything is created in the guest, so a port in use fails the start
//! with Docker's message and leaves nothing behind. Every task of a container's forwarders
//! watches one channel; dropping the [`Forwarders`] closes it, which ends the listeners and
//! every connection and flow at once (the container stopped, or its VM died).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::network::{datagram_header, datagram_len, MAX_DATAGRAM_LEN};
use agent_protocol::{ForwardTarget, StreamHeader, StreamKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use super::{HostBinding, NetworkError, PortKey, Protocol, PublishedPort};
use crate::machine::Session;

/// A UDP flow with no datagram from its client for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Datagrams queued per UDP flow while its stream opens; more are dropped, as UDP may.
const UDP_QUEUE: usize = 256;
/// Pause after a failed accept (out of descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A host socket bound for one published port, not yet serving.
#[derive(Debug)]
pub enum BoundPort {
    /// A TCP listener for the container port.
    Tcp(std::net::TcpListener, u16),
    /// A UDP socket for the container port.
    Udp(std::net::UdpSocket, u16),
}

/// Who the ports are published for, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    /// The container's id.
    pub id: &'a str,
    /// The container's name.
    pub name: &'a str,
}

/// Binds every requested port on the host; nothing stays bound if one fails.
pub fn bind_all(
    endpoint: Endpoint<'_>,
    bindings: &[(PortKey, HostBinding)],
) -> Result<(Vec<BoundPort>, Vec<PublishedPort>), NetworkError> {
    let mut bound = Vec::with_capacity(bindings.len());
    let mut published = Vec::with_capacity(bindings.len());
    for (key, binding) in bindings {
        let address = binding.address()?;
        let candidates: Vec<u16> = match binding.ports()?.range {
            Some((start, end)) => (start..=end).collect(),
            None => vec![0],
        };
        let mut last_error = None;
        let mut done = None;
        for port in &candidates {
            match bind_one(key.protocol, address, *port, key.port) {
                Ok(socket) => {
                    done = Some(socket);
                    break;
                }
                Err(e) => last_error = Some((*port, e)),
            }
        }
        let socket = match (done, last_error) {
            (Some(socket), _) => socket,
            (None, Some((port, e))) => return Err(bind_error(endpoint, key, address, port, e)),
            (None, None) => {
                return Err(NetworkError::Invalid(format!(
                    "no host port to bind for {key}"
                )))
            }
        };
        let host_port = socket_port(&socket).map_err(|e| NetworkError::Listen {
            name: endpoint.name.to_owned(),
            id: endpoint.id.to_owned(),
            address,
            port: 0,
            protocol: key.protocol,
            source: e,
        })?;
        published.push(PublishedPort {
            container_port: key.port,
            protocol: key.protocol,
            host_ip: address,
            host_port,
        });
        bound.push(socket);
    }
    Ok((bound, published))
}

fn bind_one(
    protocol: Protocol,
    address: Ipv4Addr,
    port: u16,
    container_port: u16,
) -> std::io::Result<BoundPort> {
    let at = SocketAddr::from((address, port));
    Ok(match protocol {
        Protocol::Tcp => BoundPort::Tcp(std::net::TcpListener::bind(at)?, container_port),
        Protocol::Udp => BoundPort::Udp(std::net::UdpSocket::bind(at)?, container_port),
    })
}

fn socket_port(socket: &BoundPort) -> std::io::Result<u16> {
    match socket {
        BoundPort::Tcp(listener, _) => listener.local_addr().map(|a| a.port()),
        BoundPort::Udp(socket, _) => socket.local_addr().map(|a| a.port()),
    }
}

fn bind_error(
    endpoint: Endpoint<'_>,
    key: &PortKey,
    address: Ipv4Addr,
    port: u16,
    error: std::io::Error,
) -> NetworkError {
    if error.kind() == std::io::ErrorKind::AddrInUse {
        NetworkError::PortAllocated {
            name: endpoint.name.to_owned(),
            id: endpoint.id.to_owned(),
            address,
            port,
        }
    } else {
        NetworkError::Listen {
            name: endpoint.name.to_owned(),
            id: endpoint.id.to_owned(),
            address,
            port,
            protocol: key.protocol,
            source: error,
        }
    }
}

/// A running container's forwarders; dropping it ends them all.
#[derive(Debug)]
pub struct Forwarders {
    _stop: watch::Sender<()>,
}

/// Starts serving `bound` ports, forwarding to `target` through `session`'s agent.
pub fn start(
    session: &Arc<Session>,
    container_id: &str,
    target: Ipv4Addr,
    bound: Vec<BoundPort>,
) -> Result<Forwarders, std::io::Error> {
    let (stop, stopped) = watch::channel(());
    for socket in bound {
        let forward = Forward {
            session: Arc::clone(session),
            container_id: container_id.to_owned(),
            stop: stopped.clone(),
        };
        match socket {
            BoundPort::Tcp(listener, port) => {
                listener.set_nonblocking(true)?;
                let listener = TcpListener::from_std(listener)?;
                let target = ForwardTarget { ip: target, port };
                tokio::spawn(forward.serve_tcp(listener, target));
            }
            BoundPort::Udp(socket, port) => {
                socket.set_nonblocking(true)?;
                let socket = Arc::new(UdpSocket::from_std(socket)?);
                let target = ForwardTarget { ip: target, port };
                tokio::spawn(forward.serve_udp(socket, target));
            }
        }
    }
    Ok(Forwarders { _stop: stop })
}

/// What every task of one container's forwarders shares.
#[derive(Debug, Clone)]
struct Forward {
    session: Arc<Session>,
    container_id: String,
    stop: watch::Receiver<()>,
}

impl Forward {
    fn header(&self, kind: StreamKind) -> StreamHeader {
        StreamHeader {
            container_id: self.container_id.clone(),
            exec_id: None,
            kind,
        }
    }

    async fn serve_tcp(mut self, listener: TcpListener, target: ForwardTarget) {
        loop {
            tokio::select! {
                _ = self.stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((client, _)) => {
                        tokio::spawn(self.clone().forward_tcp(client, target));
                    }
                    Err(e) => {
                        debug!(error = %e, "accept on a published port failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }

    /// One connection: a stream to the agent, then bytes both ways; each side's EOF is
    /// passed on as a half-close.
    async fn forward_tcp(mut self, mut client: TcpStream, target: ForwardTarget) {
        let _ = client.set_nodelay(true);
        let header = self.header(StreamKind::TcpForward(target));
        let opened = tokio::select! {
            _ = self.stop.changed() => return,
            opened = self.session.open_stream(header) => opened,
        };
        let mut guest = match opened {
            Ok(guest) => guest,
            Err(e) => {
                debug!(error = %crate::machine::describe(&e), "a forwarded connection was refused");
                return;
            }
        };
        tokio::select! {
            _ = self.stop.changed() => {}
            _ = tokio::io::copy_bidirectional(&mut client, &mut guest) => {}
        }
    }

    async fn serve_udp(mut self, socket: Arc<UdpSocket>, target: ForwardTarget) {
        let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let mut buffer = vec![0u8; MAX_DATAGRAM_LEN];
        loop {
            let (len, client) = tokio::select! {
                _ = self.stop.changed() => return,
                received = socket.recv_from(&mut buffer) => match received {
                    Ok(received) => received,
                    Err(e) => {
                        debug!(error = %e, "receive on a published UDP port failed");
                        continue;
                    }
                },
            };
            flows.retain(|_, flow| !flow.is_closed());
            let flow = flows.entry(client).or_insert_with(|| {
                let (sender, receiver) = mpsc::channel(UDP_QUEUE);
                let flow = self.clone();
                tokio::spawn(flow.udp_flow(Arc::clone(&socket), client, target, receiver));
                sender
            });
            // A full queue drops the datagram, as a full socket buffer would.
            let _ = flow.try_send(buffer[..len].to_vec());
        }
    }

    /// One client's flow: its datagrams to the agent framed, the replies back to it.
    async fn udp_flow(
        mut self,
        socket: Arc<UdpSocket>,
        client: SocketAddr,
        target: ForwardTarget,
        mut datagrams: mpsc::Receiver<Vec<u8>>,
    ) {
        let header = self.header(StreamKind::UdpForward(target));
        let guest = match self.session.open_stream(header).await {
            Ok(guest) => guest,
            Err(e) => {
                debug!(error = %crate::machine::describe(&e), "a UDP flow was refused");
                return;
            }
        };
        let (mut from_guest, mut to_guest) = guest.into_split();
        let outbound = async {
            while let Ok(Some(datagram)) = tokio::time::timeout(UDP_IDLE, datagrams.recv()).await {
                let Ok(header) = datagram_header(datagram.len()) else {
                    continue;
                };
                if to_guest.write_all(&header).await.is_err()
                    || to_guest.write_all(&datagram).await.is_err()
                {
                    return;
                }
            }
        };
        let inbound = async {
            let mut payload = vec![0u8; MAX_DATAGRAM_LEN];
            loop {
                let mut header = [0u8; 2];
                if from_guest.read_exact(&mut header).await.is_err() {
                    return;
                }
                let Ok(len) = datagram_len(header) else {
                    return;
                };
                if from_guest.read_exact(&mut payload[..len]).await.is_err() {
                    return;
                }
                let _ = socket.send_to(&payload[..len], client).await;
            }
        };
        tokio::select! {
            _ = self.stop.changed() => {}
            _ = outbound => {}
            _ = inbound => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_all_port_in_use_is_dockers_message() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let bindings = vec![(
            PortKey {
                port: 80,
                protocol: Protocol::Tcp,
            },
            HostBinding {
                host_ip: "127.0.0.1".into(),
                host_port: port.to_string(),
            },
        )];

        let error = bind_all(
            Endpoint {
                id: "abc",
                name: "web",
            },
            &bindings,
        )
        .unwrap_err();

        assert_eq!(
            error.to_string(),
            format!("driver failed programming external connectivity on endpoint web (abc): Bind for 127.0.0.1:{port} failed: port is already allocated")
        );
    }

    #[test]
    fn bind_all_any_port_reports_the_one_bound() {
        let bindings = vec![(
            PortKey {
                port: 53,
                protocol: Protocol::Udp,
            },
            HostBinding {
                host_ip: "127.0.0.1".into(),
                host_port: String::new(),
            },
        )];

        let (bound, published) = bind_all(
            Endpoint {
                id: "abc",
                name: "dns",
            },
            &bindings,
        )
        .unwrap();

        assert_eq!(bound.len(), 1);
        assert_ne!(published[0].host_port, 0);
        assert_eq!(published[0].container_port, 53);
    }
}
