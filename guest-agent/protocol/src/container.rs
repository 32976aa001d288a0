//! Container messages: the bodies of the container requests of [`crate::Request`], their
//! answers, and the header that opens every stream connection on [`crate::STREAM_PORT`].
//!
//! The container itself is described by an OCI runtime [`Spec`] plus what the spec leaves to
//! the runtime's caller (where the root is assembled, its overlay layers, the cgroup parent,
//! the contents of `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf`), so the host decides
//! everything and the agent only carries it out.
//!
//! Stdio never travels on the control connection. The host opens one connection per stream to
//! [`crate::STREAM_PORT`] (in native mode, the unix socket `<control socket>.streams`), writes
//! one [`StreamHeader`] frame naming the process and the stream, reads one [`StreamAccept`]
//! frame, and from then on the connection carries raw bytes in the direction of the stream:
//! host to process for [`StreamKind::Stdin`] and [`StreamKind::LayerUpload`], process to host
//! for [`StreamKind::Stdout`] and [`StreamKind::Stderr`], both ways for [`StreamKind::Pty`].
//! The end of a process's output is the end of the connection, after its last byte; the host
//! half-closing a stdin stream closes the process's stdin.

use std::collections::HashMap;
use std::path::PathBuf;

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// Everything the agent needs to create one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// The OCI runtime spec; its `process` is the container's init.
    pub spec: Spec,
    /// An existing empty directory in the guest where the root filesystem is assembled.
    pub rootfs: PathBuf,
    /// The overlay mounted at `rootfs`; `None` if `rootfs` already holds a complete tree.
    pub overlay: Option<OverlayDirs>,
    /// The parent of the container's cgroup, relative to the guest's cgroup v2 root.
    pub cgroup_parent: PathBuf,
    /// Contents of the container's `/etc/hostname`, if the agent should provide one.
    #[serde(default)]
    pub hostname_file: Option<String>,
    /// Contents of the container's `/etc/hosts`.
    #[serde(default)]
    pub hosts_file: Option<String>,
    /// Contents of the container's `/etc/resolv.conf`.
    #[serde(default)]
    pub resolv_conf_file: Option<String>,
    /// Run without the default seccomp profile (`--security-opt seccomp=unconfined`).
    #[serde(default)]
    pub seccomp_unconfined: bool,
    /// How the container is networked; `None` keeps what the spec's namespaces say.
    #[serde(default)]
    pub network: Option<crate::ContainerNetwork>,
}

/// The overlayfs layers of a container's root, as guest paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayDirs {
    /// Read-only layer directories, top-most first.
    pub lower_dirs: Vec<PathBuf>,
    /// The writable upper directory; `None` for a read-only root of the lowers alone.
    pub upper_dir: Option<PathBuf>,
    /// The overlayfs work directory, on the same filesystem as `upper_dir`.
    pub work_dir: Option<PathBuf>,
}

/// Body of [`crate::Request::CreateContainer`]: create the container, ready to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateContainer {
    /// The container id, unique in the guest; names its cgroup.
    pub id: String,
    /// What to create.
    pub config: Box<ContainerConfig>,
    /// Give the init a stdin the host can attach ([`StreamKind::Stdin`]); otherwise it reads
    /// `/dev/null`.
    pub stdin: bool,
    /// Run the init on a pseudo-terminal ([`StreamKind::Pty`]) instead of pipes.
    pub tty: bool,
}

/// Names a container: the body of start, wait, pause, resume, top, stats and delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRef {
    /// The container id.
    pub id: String,
}

/// Names a process of a container: its init (`exec_id` absent) or an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// The container id.
    pub id: String,
    /// The exec id; `None` for the container's init.
    #[serde(default)]
    pub exec_id: Option<String>,
}

/// Body of [`crate::Request::SignalContainer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalProcess {
    /// The container id.
    pub id: String,
    /// The exec to signal; `None` for the container's init.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// The signal number (Linux numbering).
    pub signal: i32,
}

/// Body of [`crate::Request::ExecProcess`]: run a process in a running container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecProcess {
    /// The container id.
    pub id: String,
    /// The exec id, unique within the container.
    pub exec_id: String,
    /// The process (args, env, cwd, user, capabilities...).
    pub process: Box<Process>,
    /// Run it on a pseudo-terminal.
    pub tty: bool,
    /// Give it a stdin the host can attach.
    pub stdin: bool,
}

/// Body of [`crate::Request::WaitExec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRef {
    /// The container id.
    pub id: String,
    /// The exec id.
    pub exec_id: String,
}

/// Body of [`crate::Request::ResizePty`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizePty {
    /// The container id.
    pub id: String,
    /// The exec whose terminal to resize; `None` for the init.
    #[serde(default)]
    pub exec_id: Option<String>,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// Body of [`crate::Request::UnpackLayer`]: unpack the layer uploaded on the stream opened
/// with a [`StreamKind::LayerUpload`] header whose `container_id` is `upload_id`.
///
/// If `dir` exists it must be empty and is filled in place. If it does not, the agent unpacks
/// into a fresh sibling `<dir>.partial` and renames that into place only once the whole layer
/// is in, so a layer directory is either complete or absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackLayer {
    /// The upload stream's name.
    pub upload_id: String,
    /// The layer directory in the guest.
    pub dir: PathBuf,
    /// Create device nodes found in the layer.
    #[serde(default)]
    pub allow_devices: bool,
}

/// Body of [`crate::Request::CreateDirs`] and [`crate::Request::RemoveDirs`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDirs {
    /// Absolute guest paths strictly below the agent's storage root, with no `..`.
    pub paths: Vec<PathBuf>,
}

/// How a process ended: answer to wait requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit code; `128 + signal` for a process killed by a signal.
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The container's cgroup OOM killer killed a process.
    pub oom_killed: bool,
}

/// One process of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopProcess {
    /// Its pid in the guest.
    pub pid: i32,
    /// Its command line, arguments separated by spaces.
    pub command: String,
}

/// Answer to [`crate::Request::TopContainer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopInfo {
    /// Every process of the container.
    pub processes: Vec<TopProcess>,
}

/// Resource usage from the container's cgroup files: answer to
/// [`crate::Request::StatsContainer`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStats {
    /// `cpu.stat` (usage_usec, user_usec, system_usec, ...).
    pub cpu: HashMap<String, u64>,
    /// `memory.current`.
    pub memory_current: Option<u64>,
    /// `memory.max`; `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// `memory.stat`.
    pub memory_stat: HashMap<String, u64>,
    /// `pids.current`.
    pub pids_current: Option<u64>,
    /// `pids.max`; `None` when unlimited.
    pub pids_limit: Option<u64>,
    /// `io.stat` per `major:minor`.
    pub io: HashMap<String, HashMap<String, u64>>,
}

/// Answer to [`crate::Request::UnpackLayer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackedLayer {
    /// Entries applied.
    pub entries: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Which stream a stream connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamKind {
    /// Host to process; the host's half-close closes the process's stdin.
    Stdin,
    /// Process to host; closed after the process's last byte.
    Stdout,
    /// Process to host, apart from stdout.
    Stderr,
    /// Both ways: the process's terminal.
    Pty,
    /// Host to agent: a layer blob for [`crate::Request::UnpackLayer`].
    LayerUpload,
    /// Host to agent: a tar for [`crate::Request::WriteArchive`].
    ArchiveUpload,
    /// Agent to host: the tar [`crate::Request::ReadArchive`] writes.
    ArchiveDownload,
    /// Both ways: one TCP connection to the target, a published port's traffic; the header's
    /// `container_id` names the container it belongs to.
    TcpForward(crate::ForwardTarget),
    /// Both ways: one UDP flow to the target, as datagrams framed by
    /// [`crate::network::write_datagram`].
    UdpForward(crate::ForwardTarget),
    /// Host to agent, a transport probe: the agent reads and discards bytes until the host's
    /// half-close, then answers their count ([`PROBE_COUNT_LEN`] bytes, big-endian) and closes.
    /// `berth bench vsock` times it; the header's ids are ignored.
    Discard,
    /// Agent to host, a transport probe: the agent writes this many zero bytes,
    /// [`PROBE_WRITE_LEN`] at a time, then half-closes.
    Zeros(u64),
}

/// The size of the agent's writes on a [`StreamKind::Zeros`] probe.
pub const PROBE_WRITE_LEN: usize = 64 * 1024;

/// The bytes of the count that ends a [`StreamKind::Discard`] probe.
pub const PROBE_COUNT_LEN: usize = 8;

/// The probe end of a [`StreamKind::Discard`] or [`StreamKind::Zeros`] stream: swallows the
/// peer's bytes until its half-close and answers their count, or writes the zeros asked for.
/// Other kinds are left alone. The caller half-closes afterwards. The agent serves its probes
/// with this, and `berth bench vsock` its native anchor.
pub fn serve_probe(
    stream: &mut (impl std::io::Read + std::io::Write),
    kind: StreamKind,
) -> std::io::Result<()> {
    match kind {
        StreamKind::Discard => {
            // Reads of PROBE_WRITE_LEN, the size of the peer's writes.
            let mut buffer = vec![0u8; PROBE_WRITE_LEN];
            let mut received = 0u64;
            loop {
                match stream.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => received += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            stream.write_all(&received.to_be_bytes())
        }
        StreamKind::Zeros(mut left) => {
            let zeros = vec![0u8; PROBE_WRITE_LEN];
            while left > 0 {
                let n = usize::try_from(left).map_or(PROBE_WRITE_LEN, |l| l.min(PROBE_WRITE_LEN));
                stream.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The first frame on a stream connection: what the connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// The container id; for uploads and downloads, the transfer's name.
    pub container_id: String,
    /// The exec id; `None` for the container's init (and for uploads).
    #[serde(default)]
    pub exec_id: Option<String>,
    /// The stream.
    pub kind: StreamKind,
}

/// The agent's answer to a [`StreamHeader`]; raw bytes follow only when it is `Ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAccept {
    /// Whether the stream was attached.
    pub result: Result<(), AgentError>,
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{read_frame, write_frame, Request, RequestEnvelope};

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, value).unwrap();
        read_frame(&mut Cursor::new(bytes)).unwrap().unwrap()
    }

    #[test]
    fn create_container_round_trips() {
        let mut spec = Spec::default();
        spec.set_hostname(Some("web".into()));
        let request = RequestEnvelope {
            id: 4,
            request: Request::CreateContainer(CreateContainer {
                id: "c1".into(),
                config: Box::new(ContainerConfig {
                    spec,
                    rootfs: "/run/c1/rootfs".into(),
                    overlay: Some(OverlayDirs {
                        lower_dirs: vec!["/layers/a".into()],
                        upper_dir: Some("/c1/upper".into()),
                        work_dir: Some("/c1/work".into()),
                    }),
                    cgroup_parent: "berth".into(),
                    hostname_file: Some("web\n".into()),
                    hosts_file: None,
                    resolv_conf_file: None,
                    seccomp_unconfined: false,
                    network: None,
                }),
                stdin: true,
                tty: false,
            }),
        };

        assert_eq!(round_trip(&request), request);
    }

    #[test]
    fn stream_header_without_exec_id_decodes() {
        let json = br#"{"container_id":"c1","kind":"Stdout"}"#;

        let header: StreamHeader = serde_json::from_slice(json).unwrap();

        assert_eq!(
            header,
            StreamHeader {
                container_id: "c1".into(),
                exec_id: None,
                kind: StreamKind::Stdout,
            }
        );
    }

    #[test]
    fn stream_header_tcp_forward_round_trips() {
        let header = StreamHeader {
            container_id: "c1".into(),
            exec_id: None,
            kind: StreamKind::TcpForward(crate::ForwardTarget {
                ip: std::net::Ipv4Addr::new(172, 17, 0, 2),
                port: 80,
            }),
        };

        assert_eq!(round_trip(&header), header);
    }

    #[test]
    fn stream_accept_error_round_trips() {
        let accept = StreamAccept {
            result: Err(AgentError::new(
                crate::AgentErrorKind::NotFound,
                "no such container",
            )),
        };

        assert_eq!(round_trip(&accept), accept);
    }
}
