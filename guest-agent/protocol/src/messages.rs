//! Typed requests and responses of the control connection.
//!
//! Every request travels in a [`RequestEnvelope`] with an id chosen by the host; the agent
//! answers with a [`ResponseEnvelope`] carrying the same id and either a [`Response`] or an
//! [`AgentError`]. The first request on a connection must be [`Request::Hello`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::archive::{ContainerPath, DiffLayer, PathStat, ReadArchive, WriteArchive};
use crate::container::{
    ContainerRef, ContainerStats, CreateContainer, ExecProcess, ExecRef, ExitInfo, ProcessRef,
    ResizePty, SignalProcess, StorageDirs, TopInfo, UnpackLayer, UnpackedLayer,
};
use crate::storage::{CopyUp, DirSizes, FileChanges, Shares, StorageListing};

/// A request with the id its response will carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Chosen by the host, echoed in the response.
    pub id: u64,
    /// What is asked.
    pub request: Request,
}

/// A response to the request with the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The id of the request this answers.
    pub id: u64,
    /// The answer, or why there is none.
    pub result: Result<Response, AgentError>,
}

/// What the host can ask of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "body")]
pub enum Request {
    /// Version handshake; must be the first request on a connection.
    Hello(Hello),
    /// Liveness check.
    Ping,
    /// Facts about the guest: kernel, memory, cpus, uptime.
    SystemInfo,
    /// Sync filesystems and power the VM off. The agent answers before it powers off.
    Shutdown,
    /// Create a container, ready to start; answered with `Done`. Attach its output streams
    /// before starting it.
    CreateContainer(CreateContainer),
    /// Start a created container's init; answered with `Done`.
    StartContainer(ContainerRef),
    /// Send a signal to a container's init or one of its execs; answered with `Done`.
    SignalContainer(SignalProcess),
    /// Wait for a container's init to end; answered with `Exited`.
    WaitContainer(ContainerRef),
    /// Run a process in a running container; answered with `Done`.
    ExecProcess(ExecProcess),
    /// Wait for an exec to end; answered with `Exited`.
    WaitExec(ExecRef),
    /// Set the terminal size of a TTY process; answered with `Done`.
    ResizePty(ResizePty),
    /// Close a process's stdin (if no stdin stream holds it, or by ending that stream);
    /// answered with `Done`.
    CloseStdin(ProcessRef),
    /// Freeze every process of a container; answered with `Done`.
    PauseContainer(ContainerRef),
    /// Thaw a paused container; answered with `Done`.
    ResumeContainer(ContainerRef),
    /// List a container's processes; answered with `Top`.
    TopContainer(ContainerRef),
    /// A container's resource usage; answered with `Stats`.
    StatsContainer(ContainerRef),
    /// Kill what still runs of a container and remove it (cgroup, mounts, state); answered
    /// with `Done`.
    DeleteContainer(ContainerRef),
    /// Unpack a layer uploaded on a stream; answered with `Unpacked`.
    UnpackLayer(UnpackLayer),
    /// Create directories (and their parents) under the agent's storage root; answered with
    /// `Done`.
    CreateDirs(StorageDirs),
    /// Remove directories and everything in them under the agent's storage root; answered
    /// with `Done`. Missing ones are not an error.
    RemoveDirs(StorageDirs),
    /// What a path in a container is; answered with `PathStat`.
    StatPath(ContainerPath),
    /// Write a tar of a path in a container to a download stream, closed after the tar's last
    /// byte; answered with `PathStat` of the path archived.
    ReadArchive(ReadArchive),
    /// Extract a tar from an upload stream into a directory of a container; answered with
    /// `Done`.
    WriteArchive(WriteArchive),
    /// Write a container's writable layer as an image layer to a download stream, closed
    /// after the tar's last byte; answered with `Done`.
    DiffLayer(DiffLayer),
    /// List layers, containers and volumes under the storage root, and the disk's space;
    /// answered with `Storage`.
    ListStorage,
    /// Measure the space used below directories of the storage root; answered with `Sizes`.
    MeasureDirs(StorageDirs),
    /// Give the data disk's free blocks back to the host (`FITRIM`); answered with `Done`.
    TrimStorage,
    /// Mount the host's virtio-fs shares not mounted yet; answered with `Done`.
    MountShares(Shares),
    /// Fill an empty volume with the image's content at its mount point; answered with `Done`.
    CopyUp(CopyUp),
    /// Host files changed under a share: raise inotify events on them in the guest; answered
    /// with `Done`.
    Notify(FileChanges),
    /// Replace the names the embedded DNS server answers on one network's gateway; answered
    /// with `Done`.
    SetDnsNames(crate::DnsNames),
    /// Plug a running container into one more network; answered with `Done`.
    ConnectNetwork(crate::NetworkAttachment),
    /// Unplug a running container's interface; answered with `Done`.
    DisconnectNetwork(crate::NetworkDetachment),
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "body")]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello(HelloAck),
    /// Answer to [`Request::Ping`].
    Pong,
    /// Answer to [`Request::SystemInfo`].
    SystemInfo(SystemInfo),
    /// The request was carried out and has nothing to report.
    Done,
    /// How a process ended.
    Exited(ExitInfo),
    /// A container's processes.
    Top(TopInfo),
    /// A container's resource usage.
    Stats(ContainerStats),
    /// What a layer unpack produced.
    Unpacked(UnpackedLayer),
    /// What a path is.
    PathStat(PathStat),
    /// Answer to [`Request::ListStorage`].
    Storage(StorageListing),
    /// Answer to [`Request::MeasureDirs`].
    Sizes(DirSizes),
}

/// The host's side of the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the host accepts.
    pub min_version: u16,
    /// Newest protocol version the host speaks.
    pub max_version: u16,
    /// The host's wall clock, nanoseconds since the Unix epoch. The guest has no battery-backed
    /// clock worth trusting, so the agent sets its clock from this.
    pub host_time_unix_nanos: u128,
}

/// The agent's side of the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The protocol version both sides now speak.
    pub version: u16,
    /// The agent's build version (its crate version).
    pub agent_version: String,
    /// Random per-boot identifier from the guest kernel, so the host can tell a rebooted guest.
    pub boot_id: String,
    /// The guest directory under which the host keeps layers and containers' writable
    /// layers; [`Request::CreateDirs`] and [`Request::RemoveDirs`] act only below it.
    #[serde(default)]
    pub storage_root: PathBuf,
}

/// Facts about the running guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// `uname -r`.
    pub kernel_release: String,
    /// `uname -v`.
    pub kernel_version: String,
    /// `uname -m`.
    pub arch: String,
    /// Total memory the guest kernel manages, in bytes.
    pub mem_total_bytes: u64,
    /// Memory available for new work, in bytes (`MemAvailable`).
    pub mem_available_bytes: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// Seconds since the guest kernel booted.
    pub uptime_secs: f64,
    /// The agent's build version.
    pub agent_version: String,
    /// Same as in [`HelloAck`].
    pub boot_id: String,
    /// The guest's wall clock when it answered, nanoseconds since the Unix epoch (0 from an
    /// agent too old to report it). The agent sets it from the host at each handshake.
    #[serde(default)]
    pub wall_clock_unix_nanos: u64,
}

/// The agent's announcement on [`crate::READY_PORT`] that its control server is listening.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyNotice {
    /// The newest protocol version the agent speaks.
    pub protocol_version: u16,
    /// The agent's build version.
    pub agent_version: String,
    /// The guest's boot id, as in [`HelloAck`].
    pub boot_id: String,
}

/// Why the agent could not carry out a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    /// The class of failure, which the host maps to its own errors (and Docker status codes).
    pub kind: AgentErrorKind,
    /// Human-readable cause chain, already flattened by the agent.
    pub message: String,
}

impl AgentError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Classes of agent failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentErrorKind {
    /// The request was malformed or had an invalid argument.
    InvalidArgument,
    /// The request named something that does not exist.
    NotFound,
    /// The request conflicts with the current state.
    Conflict,
    /// The handshake has not happened, or the versions do not overlap.
    Handshake,
    /// This agent does not know the request (an older agent than the host).
    Unsupported,
    /// Something failed inside the guest.
    Internal,
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{read_frame, write_frame, PROTOCOL_VERSION};

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, value).unwrap();
        read_frame(&mut Cursor::new(bytes)).unwrap().unwrap()
    }

    fn sample_system_info() -> SystemInfo {
        SystemInfo {
            kernel_release: "6.12.117-berth".into(),
            kernel_version: "#1 SMP".into(),
            arch: "x86_64".into(),
            mem_total_bytes: 512 << 20,
            mem_available_bytes: 480 << 20,
            cpus: 2,
            uptime_secs: 1.25,
            agent_version: "0.1.0".into(),
            boot_id: "4f1c".into(),
            wall_clock_unix_nanos: 1_700_000_000_000_000_000,
        }
    }

    #[test]
    fn request_hello_round_trips() {
        let request = RequestEnvelope {
            id: 7,
            request: Request::Hello(Hello {
                min_version: 1,
                max_version: PROTOCOL_VERSION,
                host_time_unix_nanos: 1_700_000_000_123_456_789,
            }),
        };

        assert_eq!(round_trip(&request), request);
    }

    #[test]
    fn request_unit_variants_round_trip() {
        for request in [Request::Ping, Request::SystemInfo, Request::Shutdown] {
            let envelope = RequestEnvelope { id: 1, request };

            assert_eq!(round_trip(&envelope), envelope);
        }
    }

    #[test]
    fn response_system_info_round_trips() {
        let response = ResponseEnvelope {
            id: 2,
            result: Ok(Response::SystemInfo(sample_system_info())),
        };

        assert_eq!(round_trip(&response), response);
    }

    #[test]
    fn response_error_round_trips() {
        let response = ResponseEnvelope {
            id: 3,
            result: Err(AgentError::new(
                AgentErrorKind::NotFound,
                "no such container",
            )),
        };

        assert_eq!(round_trip(&response), response);
    }

    #[test]
    fn ready_notice_round_trips() {
        let notice = ReadyNotice {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            boot_id: "b".into(),
        };

        assert_eq!(round_trip(&notice), notice);
    }

    #[test]
    fn system_info_without_wall_clock_decodes_as_zero() {
        // What an older agent sends: the field did not exist yet.
        let mut value = serde_json::to_value(sample_system_info()).unwrap();
        value
            .as_object_mut()
            .unwrap()
            .remove("wall_clock_unix_nanos");

        let info: SystemInfo = serde_json::from_value(value).unwrap();

        assert_eq!(info.wall_clock_unix_nanos, 0);
    }

    #[test]
    fn request_unknown_type_fails_to_decode() {
        // What an agent sees when a newer host sends a request it does not know.
        let json = br#"{"id":1,"request":{"type":"Teleport"}}"#;

        let decoded = serde_json::from_slice::<RequestEnvelope>(json);

        assert!(decoded.is_err());
    }
}
