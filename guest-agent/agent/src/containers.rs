//! The agent's containers: a registry from id to the container, its processes (the init and
//! the execs), their exit statuses and the stdio ends no stream has taken yet; and the `do_*`
//! functions behind the container handlers.
//!
//! Exit statuses come from the agent's [`Reaper`], which owns `waitpid(-1)`. The container
//! library clones container processes with `CLONE_PARENT`, so they are the agent's children;
//! creation and exec therefore run inside [`Reaper::spawn_with`]: the reaper's registry stays
//! locked until the new process is registered, so its status cannot be reaped unclaimed, and
//! the library's short-lived setup helper is collected by the library itself meanwhile (the
//! reaper tolerates a child that is gone by the time it takes the lock). One watcher thread per
//! process turns the reaper's receiver into an [`ExitCell`] that any number of waiters read,
//! after recording the status in the library ([`ContainerProcess::set_exited`]), so the library
//! never waits for a container process itself.
//!
//! Stdio ends (pipes or a pty master) are created with the process and parked here until the
//! host opens the matching stream (see [`crate::streams`]); the kernel buffers what a process
//! writes meanwhile, so a stream attached after create and before start misses nothing.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use agent_protocol::{
    ContainerConfig as WireConfig, ContainerNetwork, ContainerPath, ContainerStats,
    CreateContainer, DiffLayer, ExecProcess, ExitInfo, PathStat, ReadArchive, StreamHeader,
    StreamKind, TopInfo, TopProcess, UnpackLayer, UnpackedLayer, WriteArchive,
};
use berth_container::archive::{self, ArchiveError, ExtractOptions, PathInfo, Root};
use berth_container::cgroup::{CgroupConfig, CgroupStats};
use berth_container::mounts::OverlayConfig;
use berth_container::unpack::{unpack_layer, UnpackError, UnpackOptions};
use berth_container::{
    Container, ContainerError, ContainerProcess, EtcFiles, ExitStatus, ProcessIo, Pty,
    SeccompProfile, StdioConfig,
};
use nix::sys::signal::Signal;
use thiserror::Error;

use crate::log::{console, Chain};
use crate::reaper::Reaper;

/// How long `DeleteContainer` waits for a SIGKILLed init to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `UnpackLayer` waits for its upload stream to be opened.
const UPLOAD_WAIT: Duration = Duration::from_secs(30);

/// Why a container operation failed.
#[derive(Debug, Error)]
pub enum ContainersError {
    #[error("no such container {0:?}")]
    NoContainer(String),
    #[error("container {0:?} already exists")]
    Exists(String),
    #[error("no exec {exec_id:?} in container {id:?}")]
    NoExec { id: String, exec_id: String },
    #[error("exec {exec_id:?} already exists in container {id:?}")]
    ExecExists { id: String, exec_id: String },
    #[error("the process has no {0} to attach (not requested, or already attached)")]
    NotAttachable(&'static str),
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("invalid signal number {0}")]
    BadSignal(i32),
    #[error("the agent has no reaper, so it cannot track container processes")]
    NoReaper,
    #[error("the container's init was not reaped within {0:?} of SIGKILL")]
    KillTimeout(Duration),
    #[error("no transfer stream {0:?} arrived")]
    NoUpload(String),
    #[error("{0} is not a normalised absolute path below the storage root")]
    OutsideStorage(PathBuf),
    #[error("the layer directory {0} already holds files")]
    LayerExists(PathBuf),
    #[error("cannot {op} {path}")]
    State {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {0}")]
    Io(&'static str, #[source] io::Error),
    #[error("container operation failed")]
    Container(#[from] ContainerError),
    #[error("cannot unpack the layer")]
    Unpack(#[from] UnpackError),
    #[error("container {0:?} does not run here and no stopped root was given")]
    NoRoot(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("cannot set up the container's network")]
    Network(#[from] crate::network::NetworkError),
    #[error("container {0:?} to share a network namespace with is not running")]
    NetworkPeerNotRunning(String),
}

/// Where the registry keeps per-container files and creates cgroups.
#[derive(Debug, Clone)]
pub struct ContainersConfig {
    /// Per-container state (the `/etc` files) goes to `<state_dir>/<id>`.
    pub state_dir: PathBuf,
    /// Where the host keeps layers and writable layers; `CreateDirs`/`RemoveDirs` stay below.
    pub storage_root: PathBuf,
    /// The cgroup v2 mount point.
    pub cgroup_root: PathBuf,
    /// The binary the container library re-executes for setup (the agent itself).
    pub init_binary: PathBuf,
}

/// A process's exit status, set once by its watcher and read by any number of waiters.
#[derive(Debug, Default)]
pub struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    set: Condvar,
}

impl ExitCell {
    fn set(&self, status: ExitStatus) {
        lock(&self.status).get_or_insert(status);
        self.set.notify_all();
    }

    /// The status, if the process has ended.
    pub fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    /// Waits for the process to end, at most `timeout` if one is given.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<ExitStatus> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut status = lock(&self.status);
        loop {
            if let Some(status) = *status {
                return Some(status);
            }
            status = match deadline {
                None => self
                    .set
                    .wait(status)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.set
                        .wait_timeout(status, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

/// The stdio ends of a process that no stream has taken yet.
#[derive(Debug, Default)]
struct PendingStdio {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    pty: Option<File>,
}

/// One process of a container.
#[derive(Debug)]
pub struct ProcessEntry {
    /// The library's handle of an exec; `None` for the init (the container holds that one).
    exec: Option<ContainerProcess>,
    exit: ExitCell,
    pending: Mutex<PendingStdio>,
    terminal: Option<Pty>,
    /// The attached stdin stream, so `CloseStdin` can end it.
    stdin_stream: Mutex<Option<OwnedFd>>,
}

impl ProcessEntry {
    fn new(exec: Option<ContainerProcess>, io: ProcessIo) -> Result<Self, ContainersError> {
        let pty = io
            .pty
            .as_ref()
            .map(|p| p.master().try_clone())
            .transpose()
            .map_err(|e| ContainersError::Io("duplicate the pty master", e))?;
        Ok(Self {
            exec,
            exit: ExitCell::default(),
            pending: Mutex::new(PendingStdio {
                stdin: io.stdin,
                stdout: io.stdout,
                stderr: io.stderr,
                pty,
            }),
            terminal: io.pty,
            stdin_stream: Mutex::new(None),
        })
    }

    /// Forgets the attached stdin stream once its pump has ended.
    pub fn stdin_stream_ended(&self) {
        lock(&self.stdin_stream).take();
    }
}

/// One container: the library's handle (taken by delete), its init and its execs.
#[derive(Debug)]
struct ContainerEntry {
    container: Mutex<Option<Container>>,
    init: Arc<ProcessEntry>,
    execs: Mutex<HashMap<String, Arc<ProcessEntry>>>,
    state_dir: PathBuf,
}

/// A stream end handed to the stream server.
#[derive(Debug)]
pub enum StreamEnd {
    /// The process's stdin; `process` is told when the stream ends.
    Stdin {
        /// Write end of the stdin pipe.
        file: File,
        /// The process.
        process: Arc<ProcessEntry>,
    },
    /// Read end of stdout or stderr.
    Output(File),
    /// The pty master.
    Pty(File),
}

/// The registry of the agent's containers.
#[derive(Debug)]
pub struct Containers {
    reaper: Option<Reaper>,
    config: ContainersConfig,
    entries: Mutex<HashMap<String, Arc<ContainerEntry>>>,
    /// Upload and download streams waiting for the request that names them.
    transfers: Mutex<HashMap<String, File>>,
    transfer_arrived: Condvar,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single step, so the data stays consistent across a panic in a holder.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Containers {
    /// An empty registry; without a reaper every container operation fails with `NoReaper`.
    pub fn new(reaper: Option<Reaper>, config: ContainersConfig) -> Self {
        Self {
            reaper,
            config,
            entries: Mutex::new(HashMap::new()),
            transfers: Mutex::new(HashMap::new()),
            transfer_arrived: Condvar::new(),
        }
    }

    fn reaper(&self) -> Result<&Reaper, ContainersError> {
        self.reaper.as_ref().ok_or(ContainersError::NoReaper)
    }

    fn entry(&self, id: &str) -> Result<Arc<ContainerEntry>, ContainersError> {
        lock(&self.entries)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainersError::NoContainer(id.to_owned()))
    }

    fn process(
        &self,
        id: &str,
        exec_id: Option<&str>,
    ) -> Result<Arc<ProcessEntry>, ContainersError> {
        let entry = self.entry(id)?;
        let Some(exec_id) = exec_id else {
            return Ok(Arc::clone(&entry.init));
        };
        let execs = lock(&entry.execs);
        execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainersError::NoExec {
                id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            })
    }

    /// Runs `op` on the library's handle of container `id`.
    fn with_container<T>(
        &self,
        id: &str,
        op: impl FnOnce(&Container) -> Result<T, ContainerError>,
    ) -> Result<T, ContainersError> {
        let entry = self.entry(id)?;
        let guard = lock(&entry.container);
        let container = guard
            .as_ref()
            .ok_or_else(|| ContainersError::NoContainer(id.to_owned()))?;
        Ok(op(container)?)
    }

    /// Creates a container, ready to start, and parks its init's stdio ends.
    pub fn do_create(&self, request: CreateContainer) -> Result<(), ContainersError> {
        let reaper = self.reaper()?;
        let state_dir = self.config.state_dir.join(&request.id);
        let config = self.library_config(&request)?;
        // Held for the whole create, so two creates of one id cannot race.
        let mut entries = lock(&self.entries);
        if entries.contains_key(&request.id) {
            return Err(ContainersError::Exists(request.id));
        }
        let etc_files = write_etc_files(&state_dir, &request.config);
        let created = etc_files.and_then(|etc_files| {
            let config = berth_container::ContainerConfig {
                etc_files,
                ..config
            };
            let stdio = StdioConfig {
                stdin: request.stdin,
            };
            reaper
                .spawn_with(|| {
                    let (container, io) = Container::create(&config, stdio)?;
                    let pid = pid_u32(container.init().pid())?;
                    Ok::<_, ContainerError>(((container, io), pid))
                })
                .map_err(ContainersError::from)
        });
        let ((container, io), exited) = match created {
            Ok(created) => created,
            Err(e) => {
                let _ = fs::remove_dir_all(&state_dir);
                return Err(e);
            }
        };
        if let Some(ContainerNetwork::Bridge { endpoints }) = &request.config.network {
            let plugged = pid_u32(container.init().pid())
                .map_err(ContainersError::from)
                .and_then(|pid| Ok(crate::network::connect(&request.id, pid, endpoints)?));
            if let Err(e) = plugged {
                discard(container, &exited);
                let _ = fs::remove_dir_all(&state_dir);
                return Err(e);
            }
        }
        let init = match ProcessEntry::new(None, io) {
            Ok(init) => Arc::new(init),
            Err(e) => {
                discard(container, &exited);
                let _ = fs::remove_dir_all(&state_dir);
                return Err(e);
            }
        };
        let entry = Arc::new(ContainerEntry {
            container: Mutex::new(Some(container)),
            init,
            execs: Mutex::new(HashMap::new()),
            state_dir,
        });
        let watched = Arc::clone(&entry);
        spawn_watcher(exited, move |status| {
            if let Some(container) = lock(&watched.container).as_ref() {
                container.init().set_exited(status);
            }
            watched.init.exit.set(status);
        });
        entries.insert(request.id, entry);
        Ok(())
    }

    /// The library's configuration for `request`, before the `/etc` files exist.
    fn library_config(
        &self,
        request: &CreateContainer,
    ) -> Result<berth_container::ContainerConfig, ContainersError> {
        let wire = &request.config;
        let mut spec = wire.spec.clone();
        if let Some(process) = spec.process_mut().as_mut() {
            process.set_terminal(Some(request.tty));
        }
        if let Some(network) = &wire.network {
            self.apply_network_mode(&mut spec, network)?;
        }
        let mut config =
            berth_container::ContainerConfig::new(request.id.clone(), spec, wire.rootfs.clone());
        config.overlay = wire.overlay.as_ref().map(|o| OverlayConfig {
            lower_dirs: o.lower_dirs.clone(),
            upper_dir: o.upper_dir.clone(),
            work_dir: o.work_dir.clone(),
        });
        config.cgroup = CgroupConfig {
            root: self.config.cgroup_root.clone(),
            parent: wire.cgroup_parent.clone(),
        };
        config.seccomp = if wire.seccomp_unconfined {
            SeccompProfile::Unconfined
        } else {
            SeccompProfile::Default
        };
        config.init_binary = self.config.init_binary.clone();
        // Before anything is written under the state directory, which the id names.
        config.validate().map_err(ContainerError::from)?;
        Ok(config)
    }

    /// Points the spec's network namespace at what `network` asks for: none for the guest's
    /// own (`host`), another container's (`container:<id>`), or a fresh one.
    fn apply_network_mode(
        &self,
        spec: &mut oci_spec::runtime::Spec,
        network: &ContainerNetwork,
    ) -> Result<(), ContainersError> {
        use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};
        let path = match network {
            ContainerNetwork::Host => None,
            ContainerNetwork::Container { id } => {
                let entry = self
                    .entry(id)
                    .map_err(|_| ContainersError::NetworkPeerNotRunning(id.clone()))?;
                let pid = lock(&entry.container)
                    .as_ref()
                    .filter(|_| entry.init.exit.get().is_none())
                    .map(|c| c.init().pid())
                    .ok_or_else(|| ContainersError::NetworkPeerNotRunning(id.clone()))?;
                Some(Some(PathBuf::from(format!("/proc/{pid}/ns/net"))))
            }
            ContainerNetwork::None | ContainerNetwork::Bridge { .. } => Some(None),
        };
        let Some(linux) = spec.linux_mut().as_mut() else {
            return Ok(());
        };
        let mut namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        if let Some(path) = path {
            let mut namespace = LinuxNamespace::default();
            namespace.set_typ(LinuxNamespaceType::Network);
            namespace.set_path(path);
            namespaces.push(namespace);
        }
        linux.set_namespaces(Some(namespaces));
        Ok(())
    }

    /// Plugs a running container into one more network.
    pub fn do_connect_network(
        &self,
        request: &agent_protocol::NetworkAttachment,
    ) -> Result<(), ContainersError> {
        let pid = self.running_init_pid(&request.id)?;
        Ok(crate::network::attach(&request.id, pid, &request.endpoint)?)
    }

    /// Unplugs one interface of a running container.
    pub fn do_disconnect_network(
        &self,
        request: &agent_protocol::NetworkDetachment,
    ) -> Result<(), ContainersError> {
        let pid = self.running_init_pid(&request.id)?;
        Ok(crate::network::detach(pid, &request.ifname)?)
    }

    fn running_init_pid(&self, id: &str) -> Result<u32, ContainersError> {
        let entry = self.entry(id)?;
        let pid = lock(&entry.container)
            .as_ref()
            .filter(|_| entry.init.exit.get().is_none())
            .map(|c| c.init().pid())
            .ok_or_else(|| ContainersError::NoContainer(id.to_owned()))?;
        Ok(pid_u32(pid)?)
    }

    /// Starts a created container.
    pub fn do_start(&self, id: &str) -> Result<(), ContainersError> {
        self.with_container(id, Container::start)
    }

    /// Sends `signal` to the init or an exec.
    pub fn do_signal(
        &self,
        id: &str,
        exec_id: Option<&str>,
        signal: i32,
    ) -> Result<(), ContainersError> {
        let signal = Signal::try_from(signal).map_err(|_| ContainersError::BadSignal(signal))?;
        let process = self.process(id, exec_id)?;
        match &process.exec {
            Some(exec) => Ok(exec.signal(signal)?),
            None => self.with_container(id, |c| c.signal(signal)),
        }
    }

    /// Waits for the init to end; reports an OOM kill.
    pub fn do_wait(&self, id: &str) -> Result<ExitInfo, ContainersError> {
        let entry = self.entry(id)?;
        let status = entry.init.exit.wait(None).unwrap_or(ExitStatus {
            code: -1,
            signal: None,
            oom_killed: false,
        });
        // The library's status is recorded by now, so this only adds the OOM verdict.
        let status = match lock(&entry.container).as_ref() {
            Some(container) => container.wait().unwrap_or(status),
            None => status,
        };
        Ok(exit_info(status))
    }

    /// Runs a process in a running container and parks its stdio ends.
    pub fn do_exec(&self, request: ExecProcess) -> Result<(), ContainersError> {
        let reaper = self.reaper()?;
        let entry = self.entry(&request.id)?;
        let mut execs = lock(&entry.execs);
        if execs.contains_key(&request.exec_id) {
            return Err(ContainersError::ExecExists {
                id: request.id,
                exec_id: request.exec_id,
            });
        }
        let mut process = *request.process;
        process.set_terminal(Some(request.tty));
        let stdio = StdioConfig {
            stdin: request.stdin,
        };
        let ((exec, io), exited) = {
            let guard = lock(&entry.container);
            let container = guard
                .as_ref()
                .ok_or_else(|| ContainersError::NoContainer(request.id.clone()))?;
            reaper.spawn_with(|| {
                let (exec, io) = container.exec(&process, stdio)?;
                let pid = pid_u32(exec.pid())?;
                Ok::<_, ContainerError>(((exec, io), pid))
            })?
        };
        let process = Arc::new(ProcessEntry::new(Some(exec), io)?);
        let watched = Arc::clone(&process);
        spawn_watcher(exited, move |status| {
            if let Some(exec) = &watched.exec {
                exec.set_exited(status);
            }
            watched.exit.set(status);
        });
        execs.insert(request.exec_id, process);
        Ok(())
    }

    /// Waits for an exec to end.
    pub fn do_wait_exec(&self, id: &str, exec_id: &str) -> Result<ExitInfo, ContainersError> {
        let process = self.process(id, Some(exec_id))?;
        let status = process.exit.wait(None).unwrap_or(ExitStatus {
            code: -1,
            signal: None,
            oom_killed: false,
        });
        Ok(exit_info(status))
    }

    /// Sets the terminal size of a TTY process.
    pub fn do_resize(
        &self,
        id: &str,
        exec_id: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(), ContainersError> {
        let process = self.process(id, exec_id)?;
        let terminal = process
            .terminal
            .as_ref()
            .ok_or(ContainersError::NoTerminal)?;
        Ok(terminal.resize(rows, cols)?)
    }

    /// Closes a process's stdin: the parked end, or the attached stream (its pump then sees
    /// EOF and closes the pipe).
    pub fn do_close_stdin(&self, id: &str, exec_id: Option<&str>) -> Result<(), ContainersError> {
        let process = self.process(id, exec_id)?;
        drop(lock(&process.pending).stdin.take());
        if let Some(stream) = lock(&process.stdin_stream).as_ref() {
            // Wakes the pump's read with EOF; the host's end is unaffected.
            let _ = nix::sys::socket::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(stream),
                nix::sys::socket::Shutdown::Read,
            );
        }
        Ok(())
    }

    /// Freezes the container.
    pub fn do_pause(&self, id: &str) -> Result<(), ContainersError> {
        self.with_container(id, Container::pause)
    }

    /// Thaws the container.
    pub fn do_resume(&self, id: &str) -> Result<(), ContainersError> {
        self.with_container(id, Container::resume)
    }

    /// The container's processes with their command lines.
    pub fn do_top(&self, id: &str) -> Result<TopInfo, ContainersError> {
        let pids = self.with_container(id, Container::top)?;
        let processes = pids
            .into_iter()
            .map(|pid| TopProcess {
                pid,
                command: command_line(pid),
            })
            .collect();
        Ok(TopInfo { processes })
    }

    /// The container's resource usage.
    pub fn do_stats(&self, id: &str) -> Result<ContainerStats, ContainersError> {
        let stats = self.with_container(id, |c| Ok(c.stats()))?;
        Ok(container_stats(stats))
    }

    /// Kills whatever still runs in the container, waits for its init to be reaped, removes
    /// its cgroup and state; its mounts vanish with its mount namespace.
    pub fn do_delete(&self, id: &str) -> Result<(), ContainersError> {
        let entry = self.entry(id)?;
        if entry.init.exit.get().is_none() {
            if let Some(container) = lock(&entry.container).as_ref() {
                // Thawed first: a frozen process cannot die.
                let _ = container.resume();
                let _ = container.signal(Signal::SIGKILL);
            }
            entry
                .init
                .exit
                .wait(Some(KILL_TIMEOUT))
                .ok_or(ContainersError::KillTimeout(KILL_TIMEOUT))?;
        }
        let container = lock(&entry.container)
            .take()
            .ok_or_else(|| ContainersError::NoContainer(id.to_owned()))?;
        lock(&self.entries).remove(id);
        let deleted = container.delete();
        if let Err(e) = fs::remove_dir_all(&entry.state_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                console!("cannot remove the state of container {id:?}: {}", Chain(&e));
            }
        }
        Ok(deleted?)
    }

    /// Takes the stdio end `header` names, for the stream server to pump. `connection` is the
    /// stream's socket, kept (for stdin) so `CloseStdin` can end it.
    pub fn take_stream(
        &self,
        header: &StreamHeader,
        connection: &impl AsFd,
    ) -> Result<StreamEnd, ContainersError> {
        let process = self.process(&header.container_id, header.exec_id.as_deref())?;
        let mut pending = lock(&process.pending);
        let (file, name) = match header.kind {
            StreamKind::Stdin => (pending.stdin.take(), "stdin"),
            StreamKind::Stdout => (pending.stdout.take(), "stdout"),
            StreamKind::Stderr => (pending.stderr.take(), "stderr"),
            StreamKind::Pty => (pending.pty.take(), "terminal"),
            StreamKind::LayerUpload | StreamKind::ArchiveUpload | StreamKind::ArchiveDownload => {
                (None, "transfer")
            }
            StreamKind::TcpForward(_) | StreamKind::UdpForward(_) => (None, "port forward"),
            StreamKind::Discard | StreamKind::Zeros(_) => (None, "probe"),
        };
        drop(pending);
        let file = file.ok_or(ContainersError::NotAttachable(name))?;
        Ok(match header.kind {
            StreamKind::Stdin => {
                let socket = connection
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| ContainersError::Io("duplicate the stdin stream", e))?;
                *lock(&process.stdin_stream) = Some(socket);
                StreamEnd::Stdin { file, process }
            }
            StreamKind::Pty => StreamEnd::Pty(file),
            _ => StreamEnd::Output(file),
        })
    }

    /// Parks a transfer stream (layer or archive upload, archive download) until the request
    /// naming it takes it.
    pub fn park_transfer(&self, name: String, connection: File) {
        lock(&self.transfers).insert(name, connection);
        self.transfer_arrived.notify_all();
    }

    /// The directory below which `CreateDirs` and `RemoveDirs` act.
    pub fn storage_root(&self) -> &Path {
        &self.config.storage_root
    }

    /// Unpacks the layer uploaded as `request.upload_id` into `request.dir`: in place if the
    /// directory exists (it must be empty), else into `<dir>.partial`, renamed into place once
    /// complete.
    pub fn do_unpack_layer(&self, request: &UnpackLayer) -> Result<UnpackedLayer, ContainersError> {
        let upload = self.take_transfer(&request.upload_id)?;
        let options = UnpackOptions {
            allow_devices: request.allow_devices,
        };
        let in_place = match fs::read_dir(&request.dir) {
            Ok(mut entries) => match entries.next() {
                None => true,
                Some(_) => return Err(ContainersError::LayerExists(request.dir.clone())),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(ContainersError::State {
                    op: "read",
                    path: request.dir.clone(),
                    source,
                })
            }
        };
        if in_place {
            return Ok(unpacked(unpack_layer(upload, &request.dir, &options)?));
        }
        let mut partial = request.dir.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        // Left over from an unpack cut short: never complete, so never used.
        remove_dir_if_present(&partial)?;
        fs::create_dir_all(&partial).map_err(|source| ContainersError::State {
            op: "create",
            path: partial.clone(),
            source,
        })?;
        let summary = match unpack_layer(upload, &partial, &options) {
            Ok(summary) => summary,
            Err(e) => {
                let _ = fs::remove_dir_all(&partial);
                return Err(e.into());
            }
        };
        // The storage root is a persistent disk: the layer's files must be on it before its
        // name says it is complete, or a VM killed now would leave a layer of empty files.
        sync_filesystem(&partial)?;
        fs::rename(&partial, &request.dir).map_err(|source| ContainersError::State {
            op: "rename into place",
            path: request.dir.clone(),
            source,
        })?;
        Ok(unpacked(summary))
    }

    /// Creates `paths` (with parents), each strictly below the storage root.
    pub fn do_create_dirs(&self, paths: &[PathBuf]) -> Result<(), ContainersError> {
        for path in paths {
            self.check_storage_path(path)?;
        }
        for path in paths {
            fs::create_dir_all(path).map_err(|source| ContainersError::State {
                op: "create",
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Removes `paths` and their contents, each strictly below the storage root. A writable
    /// layer may still be an overlay's upper of a container not yet deleted: the host deletes
    /// the container first.
    pub fn do_remove_dirs(&self, paths: &[PathBuf]) -> Result<(), ContainersError> {
        for path in paths {
            self.check_storage_path(path)?;
        }
        paths
            .iter()
            .try_for_each(|path| remove_dir_if_present(path))
    }

    /// `lstat` of a path in a container.
    pub fn do_stat_path(&self, target: &ContainerPath) -> Result<PathStat, ContainersError> {
        let root = self.path_root(target)?;
        let info = archive::in_root(root.as_root(), || archive::stat_path(&target.path))?;
        Ok(path_stat(info))
    }

    /// Writes a tar of a path (or, for an export, the whole root) to the download stream the
    /// request names, then closes it.
    pub fn do_read_archive(&self, request: &ReadArchive) -> Result<PathStat, ContainersError> {
        let root = self.path_root(&request.target)?;
        let stream = self.take_transfer(&request.stream_id)?;
        let out = io::BufWriter::with_capacity(TRANSFER_BUFFER, &stream);
        let path = &request.target.path;
        let info = archive::in_root(root.as_root(), || {
            if request.export {
                let info = archive::stat_path("/")?;
                archive::export_root(out)?;
                Ok(info)
            } else {
                archive::write_path_archive(path, out)
            }
        })?;
        // The end of the stream is the end of the tar.
        let _ = nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Ok(path_stat(info))
    }

    /// Extracts the tar of the upload stream the request names into a directory.
    pub fn do_write_archive(&self, request: &WriteArchive) -> Result<u64, ContainersError> {
        let root = self.path_root(&request.target)?;
        let stream = self.take_transfer(&request.stream_id)?;
        let input = io::BufReader::with_capacity(TRANSFER_BUFFER, &stream);
        let path = &request.target.path;
        let owner = request.owner.as_deref();
        Ok(archive::in_root(root.as_root(), || {
            let owner = owner
                .map(|user| {
                    berth_container::user::resolve_in_root(Path::new("/"), user, &[])
                        .map(|resolved| (resolved.uid, resolved.gid))
                        .map_err(|_| ArchiveError::Owner(user.to_owned()))
                })
                .transpose()?;
            let options = ExtractOptions {
                no_overwrite_dir_non_dir: request.no_overwrite_dir_non_dir,
                owner,
            };
            archive::extract_archive(path, input, options)
        })?)
    }

    /// Writes a writable layer as an image layer to the download stream the request names,
    /// then closes it.
    pub fn do_diff_layer(&self, request: &DiffLayer) -> Result<(), ContainersError> {
        self.check_storage_path(&request.upper_dir)?;
        let stream = self.take_transfer(&request.stream_id)?;
        let out = io::BufWriter::with_capacity(TRANSFER_BUFFER, &stream);
        archive::write_layer_diff(&request.upper_dir, out)?;
        let _ = nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Ok(())
    }

    /// Where a path request looks: the running init's root, else the stopped root's overlay
    /// (its directories below the storage root).
    fn path_root(&self, target: &ContainerPath) -> Result<PathRoot, ContainersError> {
        if let Ok(entry) = self.entry(&target.container_id) {
            if entry.init.exit.get().is_none() {
                if let Ok(pid) = self.with_container(&target.container_id, |c| Ok(c.init().pid())) {
                    return Ok(PathRoot::Process(pid));
                }
            }
        }
        let stopped = target
            .stopped_root
            .as_ref()
            .ok_or_else(|| ContainersError::NoRoot(target.container_id.clone()))?;
        let overlay = &stopped.overlay;
        self.check_storage_path(&stopped.rootfs)?;
        for dir in overlay
            .lower_dirs
            .iter()
            .chain(&overlay.upper_dir)
            .chain(&overlay.work_dir)
        {
            self.check_storage_path(dir)?;
        }
        Ok(PathRoot::Overlay {
            rootfs: stopped.rootfs.clone(),
            overlay: OverlayConfig {
                lower_dirs: overlay.lower_dirs.clone(),
                upper_dir: overlay.upper_dir.clone(),
                work_dir: overlay.work_dir.clone(),
            },
        })
    }

    fn check_storage_path(&self, path: &Path) -> Result<(), ContainersError> {
        let below = path
            .strip_prefix(&self.config.storage_root)
            .is_ok_and(|rest| !rest.as_os_str().is_empty());
        let normal = path
            .components()
            .skip(1)
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if path.is_absolute() && below && normal {
            Ok(())
        } else {
            Err(ContainersError::OutsideStorage(path.to_owned()))
        }
    }

    fn take_transfer(&self, name: &str) -> Result<File, ContainersError> {
        let deadline = Instant::now() + UPLOAD_WAIT;
        let mut transfers = lock(&self.transfers);
        loop {
            if let Some(stream) = transfers.remove(name) {
                return Ok(stream);
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| ContainersError::NoUpload(name.to_owned()))?;
            transfers = self
                .transfer_arrived
                .wait_timeout(transfers, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Bytes buffered per write to, or read from, an archive stream.
const TRANSFER_BUFFER: usize = 64 * 1024;

/// The root of a path request, owned.
enum PathRoot {
    Process(i32),
    Overlay {
        rootfs: PathBuf,
        overlay: OverlayConfig,
    },
}

impl PathRoot {
    fn as_root(&self) -> Root<'_> {
        match self {
            Self::Process(pid) => Root::Process(*pid),
            Self::Overlay { rootfs, overlay } => Root::Overlay { rootfs, overlay },
        }
    }
}

fn path_stat(info: PathInfo) -> PathStat {
    PathStat {
        name: info.name,
        size: info.size,
        mode: info.mode,
        mtime_unix_nanos: info.mtime_unix_nanos,
        link_target: info.link_target,
    }
}

fn unpacked(summary: berth_container::unpack::UnpackSummary) -> UnpackedLayer {
    UnpackedLayer {
        entries: summary.entries,
        bytes: summary.bytes,
    }
}

/// Flushes the filesystem holding `path` (`syncfs`).
fn sync_filesystem(path: &Path) -> Result<(), ContainersError> {
    let state = |source| ContainersError::State {
        op: "sync the filesystem of",
        path: path.to_owned(),
        source,
    };
    let dir = File::open(path).map_err(state)?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
        .map_err(|e| state(io::Error::from(e)))
}

fn remove_dir_if_present(path: &Path) -> Result<(), ContainersError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ContainersError::State {
            op: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the `/etc` file contents the host sent under `state_dir`.
fn write_etc_files(state_dir: &Path, wire: &WireConfig) -> Result<EtcFiles, ContainersError> {
    fs::create_dir_all(state_dir).map_err(|source| ContainersError::State {
        op: "create",
        path: state_dir.to_owned(),
        source,
    })?;
    let write = |name: &str, contents: &Option<String>| -> Result<_, ContainersError> {
        let Some(contents) = contents else {
            return Ok(None);
        };
        let path = state_dir.join(name);
        fs::write(&path, contents).map_err(|source| ContainersError::State {
            op: "write",
            path: path.clone(),
            source,
        })?;
        Ok(Some(path))
    };
    Ok(EtcFiles {
        hostname: write("hostname", &wire.hostname_file)?,
        hosts: write("hosts", &wire.hosts_file)?,
        resolv_conf: write("resolv.conf", &wire.resolv_conf_file)?,
    })
}

/// Kills and removes a container created moments ago that cannot be registered.
fn discard(container: Container, exited: &std::sync::mpsc::Receiver<std::process::ExitStatus>) {
    let _ = container.signal(Signal::SIGKILL);
    if let Ok(status) = exited.recv_timeout(KILL_TIMEOUT) {
        container.init().set_exited(library_status(status));
    }
    if let Err(e) = container.delete() {
        console!("cannot remove a discarded container: {}", Chain(&e));
    }
}

fn pid_u32(pid: i32) -> Result<u32, ContainerError> {
    u32::try_from(pid).map_err(|_| ContainerError::Protocol("negative pid"))
}

/// Waits on the reaper's receiver in a thread of its own and hands the status to `on_exit`.
fn spawn_watcher(
    exited: std::sync::mpsc::Receiver<std::process::ExitStatus>,
    on_exit: impl FnOnce(ExitStatus) + Send + 'static,
) {
    let spawned = thread::Builder::new()
        .name("exit-watch".into())
        .spawn(move || {
            // The reaper never drops its senders while it runs; it runs as long as the agent.
            if let Ok(status) = exited.recv() {
                on_exit(library_status(status));
            }
        });
    if let Err(e) = spawned {
        console!("cannot start an exit watcher: {}", Chain(&e));
    }
}

/// The library's form of a status the reaper collected.
pub fn library_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus {
            code,
            signal: None,
            oom_killed: false,
        },
        (None, Some(signal)) => ExitStatus {
            code: 128 + signal,
            signal: Some(signal),
            oom_killed: false,
        },
        (None, None) => ExitStatus {
            code: -1,
            signal: None,
            oom_killed: false,
        },
    }
}

fn exit_info(status: ExitStatus) -> ExitInfo {
    ExitInfo {
        code: status.code,
        signal: status.signal,
        oom_killed: status.oom_killed,
    }
}

fn container_stats(stats: CgroupStats) -> ContainerStats {
    ContainerStats {
        cpu: stats.cpu,
        memory_current: stats.memory_current,
        memory_limit: stats.memory_limit,
        memory_stat: stats.memory_stat,
        pids_current: stats.pids_current,
        pids_limit: stats.pids_limit,
        io: stats.io,
    }
}

/// `pid`'s command line, arguments joined by spaces; its `comm` in brackets for a process
/// without one (as `ps` shows kernel threads and zombies).
fn command_line(pid: i32) -> String {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if !args.is_empty() {
        return args.join(" ");
    }
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("[{}]", comm.trim())
}

/// Where cgroup v2 is mounted according to `mountinfo` (the text of `/proc/self/mountinfo`).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

#[cfg(test)]
mod tests {
    use std::process::ExitStatus as StdExitStatus;

    use super::*;

    fn registry() -> Containers {
        Containers::new(
            None,
            ContainersConfig {
                state_dir: PathBuf::from("/nonexistent/state"),
                storage_root: PathBuf::from("/nonexistent/storage"),
                cgroup_root: PathBuf::from("/sys/fs/cgroup"),
                init_binary: PathBuf::from("/proc/self/exe"),
            },
        )
    }

    #[test]
    fn library_status_signalled_is_128_plus_signal() {
        // A raw wait status of 9 means "killed by SIGKILL".
        let status = library_status(StdExitStatus::from_raw(9));

        assert_eq!((status.code, status.signal), (137, Some(9)));
    }

    #[test]
    fn library_status_exited_keeps_code() {
        let status = library_status(StdExitStatus::from_raw(7 << 8));

        assert_eq!((status.code, status.signal), (7, None));
    }

    #[test]
    fn exit_cell_wait_after_set_returns_status() {
        let cell = ExitCell::default();
        cell.set(library_status(StdExitStatus::from_raw(0)));

        assert_eq!(cell.wait(None).map(|s| s.code), Some(0));
    }

    #[test]
    fn exit_cell_wait_unset_times_out() {
        let cell = ExitCell::default();

        assert!(cell.wait(Some(Duration::from_millis(10))).is_none());
    }

    #[test]
    fn cgroup2_mount_hybrid_host_finds_unified() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn do_start_unknown_container_is_no_container() {
        assert!(matches!(
            registry().do_start("ghost"),
            Err(ContainersError::NoContainer(_))
        ));
    }

    #[test]
    fn do_signal_unknown_number_is_bad_signal() {
        // 999 is no Linux signal; the number is checked before the container is looked up.
        assert!(matches!(
            registry().do_signal("c1", None, 999),
            Err(ContainersError::BadSignal(999))
        ));
    }

    fn registry_with_storage(root: &Path) -> Containers {
        Containers::new(
            None,
            ContainersConfig {
                storage_root: root.to_owned(),
                ..registry().config
            },
        )
    }

    #[test]
    fn do_create_dirs_below_root_creates_parents() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry_with_storage(root.path());
        let dir = root.path().join("containers/c1/upper");

        registry.do_create_dirs(std::slice::from_ref(&dir)).unwrap();

        assert!(dir.is_dir());
    }

    #[test]
    fn do_create_dirs_with_dot_dot_is_refused_and_creates_nothing() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry_with_storage(&root.path().join("storage"));
        let inside = root.path().join("storage/a");
        let escaping = root.path().join("storage/../escaped");

        let result = registry.do_create_dirs(&[inside.clone(), escaping]);

        assert!(matches!(result, Err(ContainersError::OutsideStorage(_))));
        assert!(!inside.exists());
        assert!(!root.path().join("escaped").exists());
    }

    #[test]
    fn do_remove_dirs_of_the_root_itself_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry_with_storage(root.path());

        let result = registry.do_remove_dirs(&[root.path().to_owned()]);

        assert!(matches!(result, Err(ContainersError::OutsideStorage(_))));
        assert!(root.path().is_dir());
    }

    #[test]
    fn do_remove_dirs_missing_is_not_an_error() {
        let root = tempfile::tempdir().unwrap();
        let registry = registry_with_storage(root.path());

        registry
            .do_remove_dirs(&[root.path().join("layers/gone")])
            .unwrap();
    }
}
