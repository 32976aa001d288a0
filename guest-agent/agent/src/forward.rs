//! Published ports, the guest half: a [`StreamKind::TcpForward`](agent_protocol::StreamKind)
//! stream becomes one TCP connection to the container, a `UdpForward` stream one UDP flow.
//!
//! TCP is spliced both ways on two threads; each direction's end (EOF) is passed on as a
//! half-close, so protocols that finish writing before they finish reading (HTTP/1.0 clients,
//! `nc -q`) work. UDP datagrams travel framed on the stream
//! ([`agent_protocol::network::write_datagram`]); the flow ends when the host closes the
//! stream (its idle timeout), and the reply side notices within [`UDP_POLL`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use agent_protocol::network::{read_datagram, write_datagram, MAX_DATAGRAM_LEN};
use agent_protocol::ForwardTarget;
use nix::sys::socket::{shutdown, Shutdown as NixShutdown};

use crate::log::console;

/// How long connecting to the container may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the UDP reply side checks whether its flow ended.
pub const UDP_POLL: Duration = Duration::from_millis(500);

/// Bytes moved per read.
const SPLICE_BUFFER: usize = 64 * 1024;

/// Connects to the container for a TCP forward stream.
pub fn connect_tcp(target: ForwardTarget) -> io::Result<TcpStream> {
    let address = SocketAddr::from((target.ip, target.port));
    let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens the UDP socket of a flow to the container.
pub fn connect_udp(target: ForwardTarget) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    socket.connect(SocketAddr::from((target.ip, target.port)))?;
    socket.set_read_timeout(Some(UDP_POLL))?;
    Ok(socket)
}

/// Splices the host stream and the container connection until both directions ended.
pub fn splice_tcp(connection: File, target: TcpStream) {
    let (mut target_in, mut connection_in) = match (target.try_clone(), connection.try_clone()) {
        (Ok(t), Ok(c)) => (t, c),
        _ => {
            console!("cannot duplicate a forwarded connection");
            return;
        }
    };
    let upstream = thread::Builder::new()
        .name("forward-in".into())
        .spawn(move || {
            let _ = copy(&mut connection_in, &mut target_in);
            let _ = target_in.shutdown(Shutdown::Write);
        });
    let mut connection_out = connection;
    let mut target_out = target;
    let _ = copy(&mut target_out, &mut connection_out);
    let _ = shutdown(connection_out.as_raw_fd(), NixShutdown::Write);
    match upstream {
        Ok(handle) => {
            let _ = handle.join();
        }
        Err(e) => console!("cannot start a forwarding thread: {e}"),
    }
}

/// Carries one UDP flow: framed datagrams from the host to the container, and the
/// container's replies back, until the host closes the stream.
pub fn relay_udp(connection: File, socket: UdpSocket) {
    let done = Arc::new(AtomicBool::new(false));
    let replies = match (socket.try_clone(), connection.try_clone()) {
        (Ok(socket), Ok(connection)) => {
            let done = Arc::clone(&done);
            thread::Builder::new()
                .name("udp-replies".into())
                .spawn(move || relay_replies(&socket, connection, &done))
        }
        _ => {
            console!("cannot duplicate a UDP flow");
            return;
        }
    };
    let mut connection = connection;
    let mut buffer = vec![0u8; MAX_DATAGRAM_LEN];
    loop {
        match read_datagram(&mut connection, &mut buffer) {
            Ok(Some(len)) => {
                // A full socket buffer or an unreachable port loses the datagram, as UDP may.
                let _ = socket.send(&buffer[..len]);
            }
            Ok(None) => break,
            Err(e) => {
                console!("a UDP flow from the host ended early: {e}");
                break;
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    if let Ok(handle) = replies {
        let _ = handle.join();
    }
}

fn relay_replies(socket: &UdpSocket, mut connection: File, done: &AtomicBool) {
    let mut buffer = vec![0u8; MAX_DATAGRAM_LEN];
    while !done.load(Ordering::Relaxed) {
        match socket.recv(&mut buffer) {
            Ok(len) => {
                if write_datagram(&mut connection, &buffer[..len]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                        // An ICMP port unreachable from an earlier send.
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(_) => return,
        }
    }
}

fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; SPLICE_BUFFER];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn file(stream: UnixStream) -> File {
        File::from(OwnedFd::from(stream))
    }

    #[test]
    fn splice_tcp_carries_both_ways_and_forwards_half_close() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            conn.read_to_end(&mut request).unwrap();
            conn.write_all(b"got ").unwrap();
            conn.write_all(&request).unwrap();
        });
        let (agent_end, mut host) = UnixStream::pair().unwrap();
        let target = connect_tcp(ForwardTarget {
            ip: Ipv4Addr::LOCALHOST,
            port,
        })
        .unwrap();
        let splicer = thread::spawn(move || splice_tcp(file(agent_end), target));

        host.write_all(b"hello").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        host.read_to_end(&mut answer).unwrap();

        assert_eq!(answer, b"got hello");
        server.join().unwrap();
        splicer.join().unwrap();
    }

    #[test]
    fn relay_udp_echoes_a_datagram_back_framed() {
        let echo = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = echo.local_addr().unwrap().port();
        let server = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            let (len, from) = echo.recv_from(&mut buffer).unwrap();
            echo.send_to(&buffer[..len], from).unwrap();
        });
        let (agent_end, mut host) = UnixStream::pair().unwrap();
        let socket = connect_udp(ForwardTarget {
            ip: Ipv4Addr::LOCALHOST,
            port,
        })
        .unwrap();
        let relay = thread::spawn(move || relay_udp(file(agent_end), socket));

        write_datagram(&mut host, b"ping").unwrap();
        let mut buffer = [0u8; 64];
        let len = read_datagram(&mut host, &mut buffer).unwrap();
        host.shutdown(Shutdown::Write).unwrap();

        assert_eq!(len, Some(4));
        assert_eq!(&buffer[..4], b"ping");
        server.join().unwrap();
        relay.join().unwrap();
    }
}
