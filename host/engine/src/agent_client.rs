//! The host's client for `berth-agent`'s control server.
//!
//! The guest's vsock is reachable on the host as a unix socket following the Firecracker
//! "hybrid vsock" convention, which both backends provide (our VMM natively, QEMU through
//! `vhost-device-vsock`): connect to the socket, write `CONNECT <port>\n`, read `OK <n>\n`, and
//! the rest of the connection is the guest's stream. On top of that stream this client does the
//! version handshake and then typed request/response calls.
//!
//! Stdio and layer uploads travel on stream connections of their own ([`open_stream`],
//! [`open_stream_vsock`]): one [`StreamHeader`] frame names the process and stream, the agent
//! answers with a [`StreamAccept`], and raw bytes follow. Attach a container's output streams
//! after `create_container` and before `start_container`, and nothing is missed.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_protocol::{
    read_frame, stream_socket_path, write_frame, AgentError, ContainerPath, ContainerRef,
    ContainerStats, CopyUp, CreateContainer, DiffLayer, ExecProcess, ExecRef, ExitInfo,
    FileChanges, FrameError, Hello, HelloAck, PathStat, ProcessRef, ReadArchive, ReadyNotice,
    Request, RequestEnvelope, ResizePty, Response, ResponseEnvelope, Share, Shares, SignalProcess,
    StorageDirs, StorageListing, StreamAccept, StreamHeader, SystemInfo, TopInfo, UnpackLayer,
    UnpackedLayer, WriteArchive, CONTROL_PORT, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, STREAM_PORT,
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
    #[error("the agent refused the stream")]
    StreamRefused(#[source] AgentError),
}

/// Opens a stream to an agent in native mode (DESIGN.md tier 1) whose control socket is
/// `control_socket`, over its stream socket `<control_socket>.streams`. `timeout` bounds the
/// connection and the header exchange; the stream itself then has no timeout.
pub fn open_stream(
    control_socket: &Path,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<UnixStream, AgentClientError> {
    let path = stream_socket_path(control_socket);
    let stream = UnixStream::connect(&path).map_err(|source| AgentClientError::Connect {
        path: path.display().to_string(),
        source,
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(AgentClientError::Io)?;
    attach_stream(stream, header)
}

/// Opens a stream to the agent in the guest through the hybrid vsock socket at `uds_path`, on
/// [`STREAM_PORT`].
pub fn open_stream_vsock(
    uds_path: &Path,
    header: &StreamHeader,
    timeout: Duration,
) -> Result<UnixStream, AgentClientError> {
    let stream = connect_vsock(uds_path, STREAM_PORT, timeout)?;
    attach_stream(stream, header)
}

/// Sends the header, reads the agent's verdict and lifts the timeouts for the raw bytes.
fn attach_stream(
    mut stream: UnixStream,
    header: &StreamHeader,
) -> Result<UnixStream, AgentClientError> {
    write_frame(&mut stream, header).map_err(AgentClientError::Frame)?;
    let accept: StreamAccept = read_frame(&mut stream)
        .map_err(AgentClientError::Frame)?
        .ok_or(AgentClientError::Closed)?;
    accept.result.map_err(AgentClientError::StreamRefused)?;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(AgentClientError::Io)?;
    Ok(stream)
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
                storage_root: PathBuf::new(),
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

    /// Creates a container, ready to start.
    pub fn create_container(&mut self, request: CreateContainer) -> Result<(), AgentClientError> {
        self.call_done(Request::CreateContainer(request), "CreateContainer")
    }

    /// Starts a created container.
    pub fn start_container(&mut self, id: &str) -> Result<(), AgentClientError> {
        self.call_done(Request::StartContainer(container_ref(id)), "StartContainer")
    }

    /// Sends `signal` to a container's init (`exec_id` `None`) or one of its execs.
    pub fn signal_container(
        &mut self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
    ) -> Result<(), AgentClientError> {
        let request = Request::SignalContainer(SignalProcess {
            id: id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            signal,
        });
        self.call_done(request, "SignalContainer")
    }

    /// Waits, without a timeout, for a container's init to end.
    pub fn wait_container(&mut self, id: &str) -> Result<ExitInfo, AgentClientError> {
        match self.call_unbounded(Request::WaitContainer(container_ref(id)))? {
            Response::Exited(exit) => Ok(exit),
            _ => Err(AgentClientError::UnexpectedResponse("WaitContainer")),
        }
    }

    /// Runs a process in a running container.
    pub fn exec_process(&mut self, request: ExecProcess) -> Result<(), AgentClientError> {
        self.call_done(Request::ExecProcess(request), "ExecProcess")
    }

    /// Waits, without a timeout, for an exec to end.
    pub fn wait_exec(&mut self, id: &str, exec_id: &str) -> Result<ExitInfo, AgentClientError> {
        let request = Request::WaitExec(ExecRef {
            id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        });
        match self.call_unbounded(request)? {
            Response::Exited(exit) => Ok(exit),
            _ => Err(AgentClientError::UnexpectedResponse("WaitExec")),
        }
    }

    /// Sets the terminal size of a TTY process.
    pub fn resize_pty(
        &mut self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), AgentClientError> {
        let request = Request::ResizePty(ResizePty {
            id: id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            rows,
            cols,
        });
        self.call_done(request, "ResizePty")
    }

    /// Closes a process's stdin.
    pub fn close_stdin(&mut self, id: &str, exec_id: Option<&str>) -> Result<(), AgentClientError> {
        let request = Request::CloseStdin(ProcessRef {
            id: id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
        });
        self.call_done(request, "CloseStdin")
    }

    /// Freezes a container.
    pub fn pause_container(&mut self, id: &str) -> Result<(), AgentClientError> {
        self.call_done(Request::PauseContainer(container_ref(id)), "PauseContainer")
    }

    /// Thaws a container.
    pub fn resume_container(&mut self, id: &str) -> Result<(), AgentClientError> {
        self.call_done(
            Request::ResumeContainer(container_ref(id)),
            "ResumeContainer",
        )
    }

    /// A container's processes.
    pub fn top_container(&mut self, id: &str) -> Result<TopInfo, AgentClientError> {
        match self.call(Request::TopContainer(container_ref(id)))? {
            Response::Top(top) => Ok(top),
            _ => Err(AgentClientError::UnexpectedResponse("TopContainer")),
        }
    }

    /// A container's resource usage.
    pub fn stats_container(&mut self, id: &str) -> Result<ContainerStats, AgentClientError> {
        match self.call(Request::StatsContainer(container_ref(id)))? {
            Response::Stats(stats) => Ok(stats),
            _ => Err(AgentClientError::UnexpectedResponse("StatsContainer")),
        }
    }

    /// Kills what still runs of a container and removes it.
    pub fn delete_container(&mut self, id: &str) -> Result<(), AgentClientError> {
        self.call_done(
            Request::DeleteContainer(container_ref(id)),
            "DeleteContainer",
        )
    }

    /// Unpacks the layer uploaded on the stream opened with a `LayerUpload` header named
    /// `request.upload_id`; the upload must be written concurrently (another thread), since
    /// this waits, without a timeout, for the unpack to finish.
    pub fn unpack_layer(
        &mut self,
        request: UnpackLayer,
    ) -> Result<UnpackedLayer, AgentClientError> {
        match self.call_unbounded(Request::UnpackLayer(request))? {
            Response::Unpacked(unpacked) => Ok(unpacked),
            _ => Err(AgentClientError::UnexpectedResponse("UnpackLayer")),
        }
    }

    /// What a path in a container is.
    pub fn stat_path(&mut self, target: ContainerPath) -> Result<PathStat, AgentClientError> {
        match self.call(Request::StatPath(target))? {
            Response::PathStat(stat) => Ok(stat),
            _ => Err(AgentClientError::UnexpectedResponse("StatPath")),
        }
    }

    /// Has the agent write a tar to the `ArchiveDownload` stream `request.stream_id`, which
    /// must be read concurrently; waits, without a timeout, until the tar is written.
    pub fn read_archive(&mut self, request: ReadArchive) -> Result<PathStat, AgentClientError> {
        match self.call_unbounded(Request::ReadArchive(request))? {
            Response::PathStat(stat) => Ok(stat),
            _ => Err(AgentClientError::UnexpectedResponse("ReadArchive")),
        }
    }

    /// Has the agent extract the tar written concurrently to the `ArchiveUpload` stream
    /// `request.stream_id`; waits, without a timeout, until it is extracted.
    pub fn write_archive(&mut self, request: WriteArchive) -> Result<(), AgentClientError> {
        match self.call_unbounded(Request::WriteArchive(request))? {
            Response::Done => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse("WriteArchive")),
        }
    }

    /// Has the agent write a writable layer as an image layer to the `ArchiveDownload` stream
    /// `request.stream_id`, which must be read concurrently; waits, without a timeout.
    pub fn diff_layer(&mut self, request: DiffLayer) -> Result<(), AgentClientError> {
        match self.call_unbounded(Request::DiffLayer(request))? {
            Response::Done => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse("DiffLayer")),
        }
    }

    /// Creates directories (with parents) under the agent's storage root.
    pub fn create_dirs(&mut self, paths: Vec<PathBuf>) -> Result<(), AgentClientError> {
        self.call_done(Request::CreateDirs(StorageDirs { paths }), "CreateDirs")
    }

    /// Removes directories and their contents under the agent's storage root.
    pub fn remove_dirs(&mut self, paths: Vec<PathBuf>) -> Result<(), AgentClientError> {
        self.call_done(Request::RemoveDirs(StorageDirs { paths }), "RemoveDirs")
    }

    /// What the guest's storage root holds, and the space on its disk.
    pub fn list_storage(&mut self) -> Result<StorageListing, AgentClientError> {
        match self.call(Request::ListStorage)? {
            Response::Storage(listing) => Ok(listing),
            _ => Err(AgentClientError::UnexpectedResponse("ListStorage")),
        }
    }

    /// The allocated bytes below each of `paths` (under the storage root), in order. Walks
    /// whole trees, so it gets no read timeout.
    pub fn measure_dirs(&mut self, paths: Vec<PathBuf>) -> Result<Vec<u64>, AgentClientError> {
        match self.call_unbounded(Request::MeasureDirs(StorageDirs { paths }))? {
            Response::Sizes(sizes) => Ok(sizes.bytes),
            _ => Err(AgentClientError::UnexpectedResponse("MeasureDirs")),
        }
    }

    /// Returns the data disk's free blocks to the host.
    pub fn trim_storage(&mut self) -> Result<(), AgentClientError> {
        match self.call_unbounded(Request::TrimStorage)? {
            Response::Done => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse("TrimStorage")),
        }
    }

    /// Mounts the host's virtio-fs shares in the guest (those not mounted yet).
    pub fn mount_shares(&mut self, shares: Vec<Share>) -> Result<(), AgentClientError> {
        self.call_done(Request::MountShares(Shares { shares }), "MountShares")
    }

    /// Fills an empty volume with the image's content at the path it is mounted on.
    pub fn copy_up(&mut self, request: CopyUp) -> Result<(), AgentClientError> {
        match self.call_unbounded(Request::CopyUp(request))? {
            Response::Done => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse("CopyUp")),
        }
    }

    /// Tells the agent which files under its shares changed on the host.
    pub fn notify(&mut self, paths: Vec<PathBuf>) -> Result<(), AgentClientError> {
        self.call_done(Request::Notify(FileChanges { paths }), "Notify")
    }

    /// Replaces the names the guest's embedded DNS answers on one network.
    pub fn set_dns_names(
        &mut self,
        names: agent_protocol::DnsNames,
    ) -> Result<(), AgentClientError> {
        self.call_done(Request::SetDnsNames(names), "SetDnsNames")
    }

    /// Plugs a running container into one more network.
    pub fn connect_network(
        &mut self,
        request: agent_protocol::NetworkAttachment,
    ) -> Result<(), AgentClientError> {
        self.call_done(Request::ConnectNetwork(request), "ConnectNetwork")
    }

    /// Unplugs one interface of a running container.
    pub fn disconnect_network(
        &mut self,
        request: agent_protocol::NetworkDetachment,
    ) -> Result<(), AgentClientError> {
        self.call_done(Request::DisconnectNetwork(request), "DisconnectNetwork")
    }

    fn call_done(&mut self, request: Request, name: &'static str) -> Result<(), AgentClientError> {
        match self.call(request)? {
            Response::Done => Ok(()),
            _ => Err(AgentClientError::UnexpectedResponse(name)),
        }
    }

    /// [`AgentClient::call`] without the read timeout, for requests that last as long as a
    /// process does.
    fn call_unbounded(&mut self, request: Request) -> Result<Response, AgentClientError> {
        let timeout = self.stream.read_timeout().map_err(AgentClientError::Io)?;
        self.stream
            .set_read_timeout(None)
            .map_err(AgentClientError::Io)?;
        let response = self.call(request);
        self.stream
            .set_read_timeout(timeout)
            .map_err(AgentClientError::Io)?;
        response
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

fn container_ref(id: &str) -> ContainerRef {
    ContainerRef { id: id.to_owned() }
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
                storage_root: "/var/lib/berth".into(),
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
    fn open_stream_refused_header_is_stream_refused() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("agent.sock");
        let listener = UnixListener::bind(stream_socket_path(&control)).unwrap();
        let agent = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let header: StreamHeader = read_frame(&mut stream).unwrap().unwrap();
            let refusal = AgentError::new(AgentErrorKind::NotFound, header.container_id);
            write_frame(
                &mut stream,
                &StreamAccept {
                    result: Err(refusal),
                },
            )
            .unwrap();
        });
        let header = StreamHeader {
            container_id: "ghost".into(),
            exec_id: None,
            kind: agent_protocol::StreamKind::Stdout,
        };

        let err = open_stream(&control, &header, Duration::from_secs(5)).unwrap_err();

        assert!(matches!(err, AgentClientError::StreamRefused(e) if e.message == "ghost"));
        agent.join().unwrap();
    }

    #[test]
    fn connect_missing_socket_is_connect_error() {
        let dir = tempfile::tempdir().unwrap();

        let err =
            AgentClient::connect(&dir.path().join("absent"), Duration::from_secs(1)).unwrap_err();

        assert!(matches!(err, AgentClientError::Connect { .. }));
    }
}
