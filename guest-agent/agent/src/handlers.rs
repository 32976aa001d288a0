//! Request handlers: validate, call a `do_*` function, map its error onto the wire.
//!
//! Handlers stay thin so the work they front can be tested on its own and the error mapping is
//! visible in one place. They run on the connection's thread and share [`AgentContext`].

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use agent_protocol::{
    negotiate_version, AgentError, AgentErrorKind, ContainerPath, ContainerRef, CopyUp,
    CreateContainer, DiffLayer, ExecProcess, ExecRef, FileChanges, Hello, HelloAck, ProcessRef,
    ReadArchive, ResizePty, Response, Shares, SignalProcess, StorageDirs, UnpackLayer,
    WriteArchive, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use berth_container::archive::ArchiveError;
use berth_container::unpack::UnpackError;
use berth_container::ContainerError;

use crate::containers::{Containers, ContainersConfig, ContainersError};
use crate::log::{console, Chain};
use crate::storage::{self, StorageError};
use crate::{clock, sysinfo, Mode};

/// The agent's build version, reported in the handshake and in system info.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What every handler may consult: shared by all connections.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// Whether the agent owns the machine.
    pub mode: Mode,
    /// The kernel's boot id, read once at start.
    pub boot_id: String,
    /// The containers of this agent.
    pub containers: Arc<Containers>,
    /// The embedded DNS of user-defined networks.
    pub dns: crate::dns::EmbeddedDns,
}

impl AgentContext {
    /// Reads the boot id; a guest without `/proc` still serves, with a boot id of `unknown`.
    pub fn new(mode: Mode, containers: Arc<Containers>) -> Self {
        let boot_id = sysinfo::read_boot_id().unwrap_or_else(|e| {
            console!("{}", Chain(&e));
            "unknown".to_owned()
        });
        Self {
            containers,
            ..Self::with_boot_id(mode, boot_id)
        }
    }

    /// A context with a given boot id and a container registry without a reaper, which
    /// refuses every container request (for tests of the rest).
    pub fn with_boot_id(mode: Mode, boot_id: impl Into<String>) -> Self {
        let containers = Containers::new(
            None,
            ContainersConfig {
                state_dir: PathBuf::from("/nonexistent"),
                storage_root: PathBuf::from("/nonexistent/storage"),
                cgroup_root: PathBuf::from(crate::init::CGROUP_ROOT),
                init_binary: PathBuf::from("/proc/self/exe"),
            },
        );
        Self {
            mode,
            boot_id: boot_id.into(),
            containers: Arc::new(containers),
            dns: crate::dns::EmbeddedDns::default(),
        }
    }
}

/// `Hello`: agrees on a protocol version and, as PID 1, adopts the host's clock.
pub fn hello(context: &AgentContext, hello: &Hello) -> Result<HelloAck, AgentError> {
    let version = negotiate_version(hello.min_version, hello.max_version).ok_or_else(|| {
        AgentError::new(
            AgentErrorKind::Handshake,
            format!(
                "no common protocol version: the host speaks {}..={}, this agent \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; update berth so both match",
                hello.min_version, hello.max_version
            ),
        )
    })?;
    if context.mode == Mode::Pid1 {
        // Not fatal: a guest with a wrong clock still runs containers.
        if let Err(e) = clock::set_realtime(hello.host_time_unix_nanos) {
            console!("cannot adopt the host's clock: {}", Chain(&e));
        }
    }
    Ok(HelloAck {
        version,
        agent_version: AGENT_VERSION.to_owned(),
        boot_id: context.boot_id.clone(),
        storage_root: context.containers.storage_root().to_owned(),
    })
}

/// `Ping`.
pub fn ping() -> Result<Response, AgentError> {
    Ok(Response::Pong)
}

/// `SystemInfo`.
pub fn system_info(context: &AgentContext) -> Result<Response, AgentError> {
    sysinfo::do_system_info(AGENT_VERSION, &context.boot_id)
        .map(Response::SystemInfo)
        .map_err(|e| internal(&e))
}

/// `Shutdown`: only acknowledges. The power-off itself happens once the answer is on its way
/// (see `server`), because nothing can be sent after it.
pub fn shutdown() -> Result<Response, AgentError> {
    Ok(Response::Done)
}

/// Refuses an empty id.
fn require(what: &str, value: &str) -> Result<(), AgentError> {
    if value.is_empty() {
        return Err(AgentError::new(
            AgentErrorKind::InvalidArgument,
            format!("{what} must not be empty"),
        ));
    }
    Ok(())
}

/// `CreateContainer`.
pub fn create_container(
    context: &AgentContext,
    request: CreateContainer,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_create(request)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `StartContainer`.
pub fn start_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_start(&request.id)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `SignalContainer`.
pub fn signal_container(
    context: &AgentContext,
    request: &SignalProcess,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_signal(&request.id, request.exec_id.as_deref(), request.signal)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `WaitContainer`: blocks this connection until the init ends.
pub fn wait_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_wait(&request.id)
        .map(Response::Exited)
        .map_err(|e| container_error(&e))
}

/// `ExecProcess`.
pub fn exec_process(context: &AgentContext, request: ExecProcess) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    require("the exec id", &request.exec_id)?;
    context
        .containers
        .do_exec(request)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `WaitExec`: blocks this connection until the exec ends.
pub fn wait_exec(context: &AgentContext, request: &ExecRef) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    require("the exec id", &request.exec_id)?;
    context
        .containers
        .do_wait_exec(&request.id, &request.exec_id)
        .map(Response::Exited)
        .map_err(|e| container_error(&e))
}

/// `ResizePty`.
pub fn resize_pty(context: &AgentContext, request: &ResizePty) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    if request.rows == 0 || request.cols == 0 {
        return Err(AgentError::new(
            AgentErrorKind::InvalidArgument,
            "a terminal needs at least one row and one column",
        ));
    }
    context
        .containers
        .do_resize(
            &request.id,
            request.exec_id.as_deref(),
            request.rows,
            request.cols,
        )
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `CloseStdin`.
pub fn close_stdin(context: &AgentContext, request: &ProcessRef) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_close_stdin(&request.id, request.exec_id.as_deref())
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `PauseContainer`.
pub fn pause_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_pause(&request.id)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `ResumeContainer`.
pub fn resume_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_resume(&request.id)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `TopContainer`.
pub fn top_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_top(&request.id)
        .map(Response::Top)
        .map_err(|e| container_error(&e))
}

/// `StatsContainer`.
pub fn stats_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_stats(&request.id)
        .map(Response::Stats)
        .map_err(|e| container_error(&e))
}

/// `DeleteContainer`.
pub fn delete_container(
    context: &AgentContext,
    request: &ContainerRef,
) -> Result<Response, AgentError> {
    require("the container id", &request.id)?;
    context
        .containers
        .do_delete(&request.id)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `UnpackLayer`.
pub fn unpack_layer(context: &AgentContext, request: &UnpackLayer) -> Result<Response, AgentError> {
    require("the upload id", &request.upload_id)?;
    if !request.dir.is_absolute() {
        return Err(AgentError::new(
            AgentErrorKind::InvalidArgument,
            format!("the layer directory {:?} is not absolute", request.dir),
        ));
    }
    context
        .containers
        .do_unpack_layer(request)
        .map(Response::Unpacked)
        .map_err(|e| container_error(&e))
}

/// `CreateDirs`.
pub fn create_dirs(context: &AgentContext, request: &StorageDirs) -> Result<Response, AgentError> {
    context
        .containers
        .do_create_dirs(&request.paths)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `RemoveDirs`.
pub fn remove_dirs(context: &AgentContext, request: &StorageDirs) -> Result<Response, AgentError> {
    context
        .containers
        .do_remove_dirs(&request.paths)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `StatPath`.
pub fn stat_path(context: &AgentContext, request: &ContainerPath) -> Result<Response, AgentError> {
    require("the container id", &request.container_id)?;
    context
        .containers
        .do_stat_path(request)
        .map(Response::PathStat)
        .map_err(|e| container_error(&e))
}

/// `ReadArchive`.
pub fn read_archive(context: &AgentContext, request: &ReadArchive) -> Result<Response, AgentError> {
    require("the container id", &request.target.container_id)?;
    require("the stream id", &request.stream_id)?;
    context
        .containers
        .do_read_archive(request)
        .map(Response::PathStat)
        .map_err(|e| container_error(&e))
}

/// `WriteArchive`.
pub fn write_archive(
    context: &AgentContext,
    request: &WriteArchive,
) -> Result<Response, AgentError> {
    require("the container id", &request.target.container_id)?;
    require("the stream id", &request.stream_id)?;
    context
        .containers
        .do_write_archive(request)
        .map(|_| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `DiffLayer`.
pub fn diff_layer(context: &AgentContext, request: &DiffLayer) -> Result<Response, AgentError> {
    require("the stream id", &request.stream_id)?;
    context
        .containers
        .do_diff_layer(request)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `SetDnsNames`: the names one user-defined network's DNS answers.
pub fn set_dns_names(
    context: &AgentContext,
    request: agent_protocol::DnsNames,
) -> Result<Response, AgentError> {
    context
        .dns
        .set_names(request.gateway, &request.names)
        .map(|()| Response::Done)
        .map_err(|e| {
            AgentError::new(
                AgentErrorKind::Internal,
                format!("cannot serve DNS on {}: {e}", request.gateway),
            )
        })
}

/// `ConnectNetwork`: one more network for a running container.
pub fn connect_network(
    context: &AgentContext,
    request: &agent_protocol::NetworkAttachment,
) -> Result<Response, AgentError> {
    context
        .containers
        .do_connect_network(request)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// `ListStorage`.
pub fn list_storage(context: &AgentContext) -> Result<Response, AgentError> {
    storage::do_list_storage(context.containers.storage_root())
        .map(Response::Storage)
        .map_err(|e| storage_error(&e))
}

/// `MeasureDirs`.
pub fn measure_dirs(context: &AgentContext, request: &StorageDirs) -> Result<Response, AgentError> {
    storage::do_measure_dirs(context.containers.storage_root(), &request.paths)
        .map(Response::Sizes)
        .map_err(|e| storage_error(&e))
}

/// `TrimStorage`.
pub fn trim_storage(context: &AgentContext) -> Result<Response, AgentError> {
    storage::do_trim(context.containers.storage_root())
        .map(|_| Response::Done)
        .map_err(|e| storage_error(&e))
}

/// `MountShares`.
pub fn mount_shares(request: &Shares) -> Result<Response, AgentError> {
    storage::do_mount_shares(&request.shares)
        .map(|()| Response::Done)
        .map_err(|e| storage_error(&e))
}

/// `CopyUp`.
pub fn copy_up(context: &AgentContext, request: &CopyUp) -> Result<Response, AgentError> {
    storage::do_copy_up(context.containers.storage_root(), request)
        .map(|()| Response::Done)
        .map_err(|e| storage_error(&e))
}

/// `Notify`.
pub fn notify(request: &FileChanges) -> Result<Response, AgentError> {
    storage::do_notify(&request.paths)
        .map(|()| Response::Done)
        .map_err(|e| storage_error(&e))
}

/// Maps a storage error onto the wire: bad paths are the caller's fault.
fn storage_error(error: &StorageError) -> AgentError {
    let kind = if error.is_invalid_argument() {
        AgentErrorKind::InvalidArgument
    } else {
        AgentErrorKind::Internal
    };
    AgentError::new(kind, Chain(error).to_string())
}

/// `DisconnectNetwork`: one interface less for a running container.
pub fn disconnect_network(
    context: &AgentContext,
    request: &agent_protocol::NetworkDetachment,
) -> Result<Response, AgentError> {
    context
        .containers
        .do_disconnect_network(request)
        .map(|()| Response::Done)
        .map_err(|e| container_error(&e))
}

/// Maps a container failure onto the wire: what the host named wrongly, what conflicts with
/// the current state, what the layer or config got wrong, and the rest as internal.
pub fn container_error(error: &ContainersError) -> AgentError {
    let kind = match error {
        ContainersError::NoContainer(_)
        | ContainersError::NoExec { .. }
        | ContainersError::NoUpload(_)
        | ContainersError::NoRoot(_)
        | ContainersError::Archive(ArchiveError::NotFound(_)) => AgentErrorKind::NotFound,
        ContainersError::Exists(_)
        | ContainersError::ExecExists { .. }
        | ContainersError::LayerExists(_)
        | ContainersError::NotAttachable(_)
        | ContainersError::NoTerminal
        | ContainersError::Container(ContainerError::State(_)) => AgentErrorKind::Conflict,
        ContainersError::BadSignal(_)
        | ContainersError::OutsideStorage(_)
        | ContainersError::Container(ContainerError::Spec(_))
        | ContainersError::Unpack(
            UnpackError::BadPath { .. }
            | UnpackError::HeaderTooLarge { .. }
            | UnpackError::Malformed(_)
            | UnpackError::Header(_)
            | UnpackError::ThroughSymlink { .. }
            | UnpackError::LinkTarget { .. }
            | UnpackError::DeviceNotAllowed { .. }
            | UnpackError::UnsupportedType { .. }
            | UnpackError::Zstd(_),
        )
        | ContainersError::Archive(
            ArchiveError::BadPath(_)
            | ArchiveError::NotADirectory
            | ArchiveError::Overwrite { .. }
            | ArchiveError::Owner(_)
            | ArchiveError::BadArchive(_),
        ) => AgentErrorKind::InvalidArgument,
        _ => AgentErrorKind::Internal,
    };
    AgentError::new(kind, Chain(error).to_string())
}

/// A failure inside the guest, with its whole cause chain for the host to show.
pub fn internal(error: &dyn Error) -> AgentError {
    AgentError::new(AgentErrorKind::Internal, Chain(error).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> AgentContext {
        AgentContext::with_boot_id(Mode::Native, "boot-1")
    }

    #[test]
    fn hello_overlapping_versions_acknowledges_with_boot_id() {
        let ack = hello(
            &context(),
            &Hello {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                host_time_unix_nanos: 0,
            },
        )
        .unwrap();

        assert_eq!(
            ack,
            HelloAck {
                version: PROTOCOL_VERSION,
                agent_version: AGENT_VERSION.to_owned(),
                boot_id: "boot-1".to_owned(),
                storage_root: PathBuf::from("/nonexistent/storage"),
            }
        );
    }

    #[test]
    fn hello_disjoint_versions_is_handshake_error() {
        let err = hello(
            &context(),
            &Hello {
                min_version: PROTOCOL_VERSION + 1,
                max_version: PROTOCOL_VERSION + 1,
                host_time_unix_nanos: 0,
            },
        )
        .unwrap_err();

        assert_eq!(err.kind, AgentErrorKind::Handshake);
    }
}
