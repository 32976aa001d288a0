//! The host's client for `berth-agent`'s control server.
//!
//! The guest's vsock is reachable on the host as a unix socket following the Firecracker
//! "hybrid vsock" convention, which both backends provide (our VMM natively, QEMU through
//! `vhost-device-vsock`): connect to the socket, write `CONNECT <port>\n`, read `OK <n>\n`, and
//! the rest of the connection is the guest's stream. On top of that stream this client does the
//! version handshake and then typed request/response calls.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_protocol::{
    read_frame, write_frame, AgentError, FrameError, Hello, HelloAck, ReadyNotice, Request,
    RequestEnvelope, Response, ResponseEnvelope, SystemInfo, CONTROL_PORT, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use thiserror::Error;

/// The longest `OK …` line a well-behaved peer sends; anything longer is not the convention.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Why a call to the agent failed.
#[derive(Debug, Error)]
pub enum AgentClientError {
    #[error("cannot connect to the vsock socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("vsock port {port} refused the connection (is the agent up?)")]
    PortRefused { port: u32 },
    #[error("unexpected answer {0:?} to the hybrid vsock CONNECT")]
    BadConnectReply(String),
    #[error("i/o error talking to the agent")]
    Io(#[source] io::Error),
    #[error("protocol error talking to the agent")]
    Frame(#[source] FrameError),
    #[error("the agent closed the connection")]
    Closed,
    #[error("the agent answered request {got} while {expected} was pending")]
    IdMismatch { expected: u64, got: u64 },
    #[error("the agent answered {0} with an unexpected response")]
    UnexpectedResponse(&'static str),
    #[error("the agent refused the request")]
    Agent(#[source] AgentError),
}

/// Opens a stream to `port` in the guest through the hybrid vsock socket at `uds_path`.
pub fn connect_vsock(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, AgentClientError> {
    let mut stream = UnixStream::connect(uds_path).map_err(|source| AgentClientError::Connect {
        path: uds_path.display().to_string(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(AgentClientError::Io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(AgentClientError::Io)?;
    let line = read_line(&mut stream).map_err(|e| match e.kind() {
        // The device closes the host side when nothing listens on the guest port.
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            AgentClientError::PortRefused { port }
        }
        _ => AgentClientError::Io(e),
    })?;
    if !line.starts_with("OK ") {
        return Err(AgentClientError::BadConnectReply(line));
    }
    Ok(stream)
}

/// Reads one `\n`-terminated line byte by byte, so no byte of the guest's stream after it is
/// consumed.
fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock reply line too long",
            ));
        }
    }
}

/// How long a guest that connected to the ready port may take to send its notice.
const READY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The host end of [`agent_protocol::READY_PORT`]: under the hybrid vsock convention, a unix
/// socket named `<vsock socket>_<port>` that the device connects to for each guest-initiated
/// connection. Bound before the VM starts so the agent's notice cannot be missed.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Binds the socket at `path` (replacing a stale one) in non-blocking mode.
    pub fn bind(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Returns the agent's notice if one has arrived, without waiting for one.
    pub fn poll(&self) -> Result<Option<ReadyNotice>, AgentClientError> {
        let mut stream = match self.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(AgentClientError::Io(e)),
        };
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(READY_READ_TIMEOUT)))
            .map_err(AgentClientError::Io)?;
        read_frame(&mut stream)
            .map_err(AgentClientError::Frame)?
            .ok_or(AgentClientError::Closed)
            .map(Some)
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        // Nothing listens any more: leave no socket for the device to connect to.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A handshaken control connection to the agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
    hello: HelloAck,
}

impl AgentClient {
    /// Connects through the hybrid vsock socket and performs the version handshake.
    pub fn connect(uds_path: &Path, timeout: Duration) -> Result<Self, AgentClientError> {
        let stream = connect_vsock(uds_path, CONTROL_PORT, timeout)?;
        Self::handshake(stream)
    }

    /// Performs the version handshake on an already open stream to the control port.
    pub fn handshake(stream: UnixStream) -> Result<Self, AgentClientError> {
        let mut client = Self {
            stream,
            next_id: 1,
            hello: HelloAck {
                version: 0,
                agent_version: String::new(),
                boot_id: String::new(),
            },
        };
        let host_time_unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let hello = Request::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            host_time_unix_nanos,
        });
        match client.call(hello)? {
            Response::Hello(ack) => client.hello = ack,
            _ => return Err(AgentClientError::UnexpectedResponse("Hello")),
        }
        Ok(client)
    }

    /// What the agent said in the handshake.
    pub fn hello(&self) -> &HelloAck {
        &self.hello
    }

    /// Liveness check.
    pub fn ping(&mut self) -> Result<(), AgentClientError> {
        match self.call(Request::Ping)? {
            Response::Pong => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse("Ping")),
        }
    }

    /// Facts about the running guest.
    pub fn system_info(&mut self) -> Result<SystemInfo, AgentClientError> {
        match self.call(Request::SystemInfo)? {
            Response::SystemInfo(info) => Ok(info),
            _ => Err(AgentClientError::UnexpectedResponse("SystemInfo")),
        }
    }

    /// Asks the agent to sync and power the VM off. Returns once the agent has acknowledged;
    /// the VM process exits shortly after.
    pub fn shutdown(&mut self) -> Result<(), AgentClientError> {
        match self.call(Request::Shutdown)? {
            Response::Done => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse("Shutdown")),
        }
    }

    /// Sends one request and waits for its response.
    pub fn call(&mut self, request: Request) -> Result<Response, AgentClientError> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &RequestEnvelope { id, request })
            .map_err(AgentClientError::Frame)?;
        let response: ResponseEnvelope = read_frame(&mut self.stream)
            .map_err(AgentClientError::Frame)?
            .ok_or(AgentClientError::Closed)?;
        if response.id != id {
            return Err(AgentClientError::IdMismatch {
                expected: id,
                got: response.id,
            });
        }
        response.result.map_err(AgentClientError::Agent)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread;

    use agent_protocol::AgentErrorKind;

    use super::*;

    /// Plays the hybrid vsock device and the agent on the other end of a unix socket, answering
    /// each request with `answer`.
    fn fake_guest(
        listener: UnixListener,
        connect_reply: &'static str,
        answer: fn(&Request) -> Result<Response, AgentError>,
    ) -> thread::JoinHandle<()> {
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let line = read_line(&mut stream).unwrap();
            assert_eq!(line, format!("CONNECT {CONTROL_PORT}"));
            stream.write_all(connect_reply.as_bytes()).unwrap();
            while let Some(envelope) = read_frame::<_, RequestEnvelope>(&mut stream).unwrap() {
                let response = ResponseEnvelope {
                    id: envelope.id,
                    result: answer(&envelope.request),
                };
                write_frame(&mut stream, &response).unwrap();
            }
        })
    }

    fn well_behaved(request: &Request) -> Result<Response, AgentError> {
        Ok(match request {
            Request::Hello(hello) => Response::Hello(HelloAck {
                version: hello.max_version,
                agent_version: "test".into(),
                boot_id: "boot".into(),
            }),
            Request::Ping => Response::Pong,
            _ => Response::Done,
        })
    }

    fn socket() -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[test]
    fn connect_well_behaved_guest_handshakes_and_pings() {
        let (_dir, path, listener) = socket();
        let guest = fake_guest(listener, "OK 1073741824\n", well_behaved);

        let mut client = AgentClient::connect(&path, Duration::from_secs(5)).unwrap();
        client.ping().unwrap();
        drop(client);

        guest.join().unwrap();
    }

    #[test]
    fn connect_port_closed_by_device_is_port_refused() {
        let (_dir, path, listener) = socket();
        let device = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            read_line(&mut stream).unwrap();
            // Nothing listens on the guest port: the device hangs up.
        });

        let err = AgentClient::connect(&path, Duration::from_secs(5)).unwrap_err();

        assert!(matches!(err, AgentClientError::PortRefused { port } if port == CONTROL_PORT));
        device.join().unwrap();
    }

    #[test]
    fn connect_garbage_reply_is_bad_connect_reply() {
        let (_dir, path, listener) = socket();
        let guest = fake_guest(listener, "NOPE\n", well_behaved);

        let err = AgentClient::connect(&path, Duration::from_secs(5)).unwrap_err();

        assert!(matches!(err, AgentClientError::BadConnectReply(_)));
        guest.join().unwrap();
    }

    #[test]
    fn call_agent_error_is_returned_as_agent_error() {
        let (_dir, path, listener) = socket();
        let guest = fake_guest(listener, "OK 1\n", |request| match request {
            Request::Hello(_) => well_behaved(request),
            _ => Err(AgentError::new(AgentErrorKind::Internal, "disk on fire")),
        });

        let mut client = AgentClient::connect(&path, Duration::from_secs(5)).unwrap();
        let err = client.system_info().unwrap_err();
        drop(client);

        assert!(matches!(err, AgentClientError::Agent(e) if e.message == "disk on fire"));
        guest.join().unwrap();
    }

    #[test]
    fn ready_listener_notice_from_guest_is_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock_1023");
        let ready = ReadyListener::bind(&path).unwrap();
        let before = ready.poll().unwrap();
        let notice = ReadyNotice {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            boot_id: "boot".into(),
        };
        let mut guest = UnixStream::connect(&path).unwrap();
        write_frame(&mut guest, &notice).unwrap();

        let after = ready.poll().unwrap();

        assert_eq!(before, None);
        assert_eq!(after, Some(notice));
    }

    #[test]
    fn ready_listener_drop_removes_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock_1023");

        drop(ReadyListener::bind(&path).unwrap());

        assert!(!path.exists());
    }

    #[test]
    fn connect_missing_socket_is_connect_error() {
        let dir = tempfile::tempdir().unwrap();

        let err =
            AgentClient::connect(&dir.path().join("absent"), Duration::from_secs(1)).unwrap_err();

        assert!(matches!(err, AgentClientError::Connect { .. }));
    }
}
