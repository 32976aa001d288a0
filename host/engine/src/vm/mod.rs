//! The guest VM's lifecycle, independent of which backend runs it.
//!
//! A backend ([`VmBackend`]) only knows how to launch the processes that make up a VM (QEMU and
//! its vhost-user vsock device, or one `berth-vmm`). Everything after that is common and lives
//! in [`Vm`]: waiting for the agent's handshake over the hybrid vsock socket while watching the
//! processes, diagnosing a guest that died during boot from its console log, clean shutdown
//! through the agent with a kill on timeout, and the on-disk state that lets another process
//! (a later `berth vm status`) find a running VM.

mod console;
pub mod disk;
pub mod helpers;
mod process;
pub mod qemu;
pub mod vmm;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

pub use console::diagnose_console;
pub use process::VmProcess;

use crate::agent_client::{AgentClient, AgentClientError, ReadyListener};
use crate::host::{probe_kvm, KvmSupport};

/// File names inside a VM's state directory.
const STATE_FILE: &str = "state.json";
const VSOCK_SOCKET: &str = "vsock.sock";
const CONSOLE_LOG: &str = "console.log";

/// How often boot progress is polled: short against a ~1 s TCG boot, long enough not to spin.
const BOOT_POLL: Duration = Duration::from_millis(20);

/// Lines of console shown when a boot fails without a recognisable cause.
const CONSOLE_TAIL_LINES: usize = 15;

/// Why a VM operation failed.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("{what} not found at {path} ({hint})")]
    MissingAsset {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("{path} is not an initramfs: it does not start with a newc cpio header")]
    NotInitramfs { path: PathBuf },
    #[error("cannot read {path}")]
    ReadAsset {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare the VM state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {program} ({hint})")]
    Spawn {
        program: String,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("{program} exited before it was ready ({status}); see {log}")]
    HelperFailed {
        program: String,
        status: String,
        log: PathBuf,
    },
    #[error("{program} did not create {path} within {secs} s")]
    HelperTimeout {
        program: String,
        path: PathBuf,
        secs: u64,
    },
    #[error("the VM exited during boot: {process} {status}; {diagnosis}")]
    ExitedDuringBoot {
        process: String,
        status: String,
        diagnosis: String,
    },
    #[error("the guest agent did not answer within {secs} s; {diagnosis}")]
    BootTimeout { secs: u64, diagnosis: String },
    #[error("no VM is running (nothing recorded in {0})")]
    NotRunning(PathBuf),
    #[error("the VM state in {path} is unreadable")]
    BadState {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot talk to the guest agent")]
    Agent(#[source] AgentClientError),
    #[error("cannot create the data disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a data disk of {bytes} bytes is too small (at least {min})")]
    DiskTooSmall { bytes: u64, min: u64 },
    #[error("mkfs.ext4 failed on {path} ({status}): {stderr}")]
    Format {
        path: PathBuf,
        status: String,
        stderr: String,
    },
}

/// Which VM backend runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `qemu-system-x86_64 -M microvm` with `berth-vsock` (vhost-user vsock).
    Qemu,
    /// `berth-vmm`, our own VMM, on hardware KVM.
    Vmm,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Qemu => f.write_str("qemu"),
            Self::Vmm => f.write_str("vmm"),
        }
    }
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed kernel with a PVH note (`vmlinux`).
    pub kernel: PathBuf,
    /// The guest initramfs (agent as `/init`).
    pub initramfs: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest vCPUs.
    pub vcpus: u32,
    /// Directory for the VM's sockets, console log and state file.
    pub state_dir: PathBuf,
    /// How long the agent may take to answer after launch.
    pub boot_timeout: Duration,
    /// Extra kernel command-line words, appended after Berth's own.
    pub extra_cmdline: Vec<String>,
    /// The persistent data disk (`/dev/vda` in the guest); `None` keeps guest storage on the
    /// VM's tmpfs.
    pub data_disk: Option<disk::DataDisk>,
    /// Host directories shared into the guest with virtio-fs.
    pub shares: Vec<VmShare>,
}

/// A host directory shared into the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShare {
    /// The virtio-fs tag the guest mounts it by.
    pub tag: String,
    /// The shared directory on the host (absolute, canonical).
    pub host_dir: PathBuf,
    /// The host user and group that own what containers create in the share: guest root
    /// maps to them both ways, and every other guest id is squashed to them
    /// (`docs/design/file-sharing.md`).
    pub owner: (u32, u32),
}

impl VmConfig {
    /// The kernel command line. `reboot=t` makes a guest reboot (which is how the agent powers
    /// off) a triple fault, which every VMM can turn into an exit; `panic=-1` turns a panic into
    /// that same reboot instead of a hang.
    pub fn cmdline(&self) -> String {
        let mut words = vec!["console=ttyS0", "reboot=t", "panic=-1", "quiet"];
        words.extend(self.extra_cmdline.iter().map(String::as_str));
        words.join(" ")
    }

    /// The hybrid vsock unix socket: connect here to reach guest ports.
    pub fn vsock_socket(&self) -> PathBuf {
        self.state_dir.join(VSOCK_SOCKET)
    }

    /// Where the agent's readiness notice arrives (hybrid vsock: `<socket>_<port>`).
    pub fn ready_socket(&self) -> PathBuf {
        ready_socket(&self.state_dir)
    }

    /// The guest's serial console, as a file the user can read.
    pub fn console_log(&self) -> PathBuf {
        self.state_dir.join(CONSOLE_LOG)
    }

    /// Checks the kernel and initramfs before anything is started, so a missing or wrong file
    /// is named instead of surfacing as a guest panic.
    pub fn check_assets(&self) -> Result<(), VmError> {
        const HINT: &str = "build it with kernel-config/build.sh and vm-image/build.sh, or set \
                            BERTH_KERNEL / BERTH_INITRAMFS";
        for (what, path) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if !path.is_file() {
                return Err(VmError::MissingAsset {
                    what,
                    path: path.clone(),
                    hint: HINT,
                });
            }
        }
        let mut magic = [0u8; 6];
        let read = fs::File::open(&self.initramfs)
            .and_then(|mut f| io::Read::read_exact(&mut f, &mut magic));
        match read {
            Ok(()) if &magic == b"070701" => Ok(()),
            Ok(()) => Err(VmError::NotInitramfs {
                path: self.initramfs.clone(),
            }),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(VmError::NotInitramfs {
                path: self.initramfs.clone(),
            }),
            Err(source) => Err(VmError::ReadAsset {
                path: self.initramfs.clone(),
                source,
            }),
        }
    }
}

/// Launches the processes that make up a VM. Everything after launch is common ([`Vm`]).
pub trait VmBackend: std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// The programs this backend runs for every VM, for a check before the first boot
    /// (`virtiofsd`, run only when something is shared, is not among them).
    fn programs(&self) -> Vec<&Path>;

    /// Whether the guest runs on KVM or is emulated.
    fn accel(&self) -> qemu::Accel;

    /// One line for the log describing how the VM will run (accelerator and so on).
    fn describe(&self) -> String;

    /// Starts the VM's processes, the VM itself first. Returns once they run; does not wait for
    /// the guest. On error, everything already started has been stopped.
    fn launch(&self, config: &VmConfig) -> Result<Vec<VmProcess>, VmError>;
}

/// The backend chosen for this host, with the reason in words.
#[derive(Debug)]
pub struct BackendChoice {
    /// The chosen backend.
    pub backend: Box<dyn VmBackend + Send + Sync>,
    /// Why, for the log.
    pub reason: String,
}

/// The variable that forces a backend (`qemu` or `vmm`).
pub const BACKEND_ENV: &str = "BERTH_BACKEND";

/// Whether hosts with hardware KVM get `berth-vmm` when nothing is forced (and it and passt are
/// installed).
const VMM_BY_DEFAULT: bool = true;

/// Picks the backend and accelerator for this host and says why.
///
/// `berth-vmm` where hardware KVM boots a stock kernel and it is installed with passt; QEMU
/// otherwise, with KVM where hardware KVM works and TCG elsewhere (including PVM-only hosts,
/// whose KVM runs only PVM-patched guests). `BERTH_BACKEND=qemu|vmm` forces one (see
/// [`VMM_BY_DEFAULT`] and [`prefer_vmm`]).
pub fn select_backend() -> BackendChoice {
    let kvm = probe_kvm();
    let forced = std::env::var(BACKEND_ENV).ok();
    let vmm = vmm::VmmBackend::new();
    if let Some(other) = forced.as_deref().filter(|f| !matches!(*f, "qemu" | "vmm")) {
        warn!("{BACKEND_ENV}={other} is not a backend (qemu or vmm); choosing by host");
    }
    let use_vmm = prefer_vmm(
        forced.as_deref(),
        kvm == KvmSupport::Hardware,
        vmm.installed(),
        VMM_BY_DEFAULT,
    );
    let backend: Box<dyn VmBackend + Send + Sync> = if use_vmm {
        Box::new(vmm)
    } else {
        let accel = match kvm {
            KvmSupport::Hardware => qemu::Accel::Kvm,
            KvmSupport::PvmOnly | KvmSupport::Unavailable(_) => qemu::Accel::Tcg,
        };
        Box::new(qemu::QemuBackend::new(accel))
    };
    let forced = forced
        .map(|name| format!(" ({BACKEND_ENV}={name})"))
        .unwrap_or_default();
    let reason = format!("{}; using {}{forced}", kvm.explain(), backend.describe());
    BackendChoice { backend, reason }
}

/// The backend decision: a forced `qemu` or `vmm` wins; otherwise `berth-vmm` only where
/// hardware KVM works, the VMM is installed and it is the default.
fn prefer_vmm(forced: Option<&str>, hardware_kvm: bool, installed: bool, by_default: bool) -> bool {
    match forced {
        Some("vmm") => true,
        Some("qemu") => false,
        _ => by_default && hardware_kvm && installed,
    }
}

/// What is recorded on disk about a running VM, so other processes can find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmState {
    backend: BackendKind,
    /// (role, pid), the VM process first.
    processes: Vec<(String, i32)>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The agent powered the guest off and the VM process exited by itself.
    Clean,
    /// The VM had to be killed (agent unreachable or too slow).
    Killed,
}

/// A launched VM: its processes and where to reach it.
#[derive(Debug)]
pub struct Vm {
    backend: BackendKind,
    state_dir: PathBuf,
    processes: Vec<VmProcess>,
}

impl Vm {
    /// Boots a VM and waits for its agent's handshake.
    ///
    /// On any failure every process of the VM is stopped before the error is returned, and the
    /// error names the cause (from the console log when the guest died).
    pub fn start(
        backend: &dyn VmBackend,
        config: &VmConfig,
    ) -> Result<(Self, AgentClient), VmError> {
        config.check_assets()?;
        prepare_state_dir(config)?;
        if let Some(disk) = &config.data_disk {
            disk.ensure()?;
        }
        let ready =
            ReadyListener::bind(&config.ready_socket()).map_err(|source| VmError::StateDir {
                path: config.ready_socket(),
                source,
            })?;
        let started = Instant::now();
        let processes = backend.launch(config)?;
        let mut vm = Self {
            backend: backend.kind(),
            state_dir: config.state_dir.clone(),
            processes,
        };
        if let Err(e) = vm.write_state() {
            vm.kill_all();
            return Err(e);
        }
        match vm.wait_for_agent(config, started, &ready) {
            Ok(client) => {
                info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "guest agent answered"
                );
                Ok((vm, client))
            }
            Err(e) => {
                vm.kill_all();
                vm.forget();
                Err(e)
            }
        }
    }

    /// Finds the VM recorded in `state_dir` by an earlier `start`, possibly of another process.
    pub fn attach(state_dir: &Path) -> Result<Self, VmError> {
        let path = state_dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VmError::NotRunning(state_dir.to_path_buf()))
            }
            Err(source) => {
                return Err(VmError::StateDir {
                    path: path.clone(),
                    source,
                })
            }
        };
        let state: VmState =
            serde_json::from_str(&text).map_err(|source| VmError::BadState { path, source })?;
        let marker = state_dir.to_string_lossy().into_owned();
        let processes = state
            .processes
            .into_iter()
            .map(|(role, pid)| VmProcess::adopt(role, pid, marker.clone()))
            .collect();
        Ok(Self {
            backend: state.backend,
            state_dir: state_dir.to_path_buf(),
            processes,
        })
    }

    /// The backend running this VM.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The VM's processes, the VM itself first.
    pub fn processes(&self) -> &[VmProcess] {
        &self.processes
    }

    /// Whether the VM process still runs.
    pub fn is_running(&mut self) -> bool {
        self.processes
            .first_mut()
            .is_some_and(|p| p.exit_status().is_none())
    }

    /// Opens a new handshaken control connection to the agent.
    pub fn agent(&self, timeout: Duration) -> Result<AgentClient, VmError> {
        AgentClient::connect(&self.state_dir.join(VSOCK_SOCKET), timeout).map_err(VmError::Agent)
    }

    /// Shuts the guest down through the agent, waiting up to `timeout` for the VM process to
    /// exit, then kills whatever is left. All processes are gone when this returns.
    pub fn stop(mut self, timeout: Duration) -> StopOutcome {
        let asked = self
            .agent(timeout.min(Duration::from_secs(5)))
            .and_then(|mut agent| agent.shutdown().map_err(VmError::Agent));
        let outcome = match asked {
            Ok(()) if self.wait_vm_exit(timeout) => StopOutcome::Clean,
            Ok(()) => {
                warn!(
                    secs = timeout.as_secs(),
                    "guest did not power off in time; killing it"
                );
                StopOutcome::Killed
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot ask the agent to shut down; killing the VM");
                StopOutcome::Killed
            }
        };
        self.kill_all();
        self.forget();
        outcome
    }

    /// Kills every process of the VM at once (SIGKILL) and reaps them.
    pub fn kill(mut self) {
        self.kill_all();
        self.forget();
    }

    fn wait_vm_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.is_running() {
                return true;
            }
            thread::sleep(BOOT_POLL);
        }
        false
    }

    /// Waits for the agent's readiness notice, then connects and handshakes, watching the VM's
    /// processes all along.
    fn wait_for_agent(
        &mut self,
        config: &VmConfig,
        started: Instant,
        ready: &ReadyListener,
    ) -> Result<AgentClient, VmError> {
        let deadline = started + config.boot_timeout;
        let socket = config.vsock_socket();
        let mut announced = false;
        loop {
            if let Some((role, status)) = self.first_exited() {
                let console = fs::read_to_string(config.console_log()).unwrap_or_default();
                return Err(VmError::ExitedDuringBoot {
                    process: role,
                    status,
                    diagnosis: diagnose_or_tail(&console, &config.console_log()),
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let console = fs::read_to_string(config.console_log()).unwrap_or_default();
                return Err(VmError::BootTimeout {
                    secs: config.boot_timeout.as_secs(),
                    diagnosis: diagnose_or_tail(&console, &config.console_log()),
                });
            }
            if !announced {
                match ready.poll() {
                    Ok(Some(notice)) => {
                        debug!(boot_id = %notice.boot_id, "agent announced itself");
                        announced = true;
                    }
                    Ok(None) => {}
                    Err(e) => debug!(error = %error_chain(&e), "bad readiness notice"),
                }
                if !announced {
                    thread::sleep(BOOT_POLL);
                    continue;
                }
            }
            match AgentClient::connect(&socket, remaining.min(Duration::from_secs(5))) {
                Ok(client) => return Ok(client),
                // Not up yet: the device socket is not there, or nothing listens on the port.
                Err(
                    e @ (AgentClientError::Connect { .. } | AgentClientError::PortRefused { .. }),
                ) => debug!(error = %error_chain(&e), "agent not reachable yet"),
                Err(AgentClientError::Io(e)) if is_transient(&e) => {
                    debug!(error = %e, "agent not reachable yet");
                }
                Err(e) => return Err(VmError::Agent(e)),
            }
            thread::sleep(BOOT_POLL);
        }
    }

    fn first_exited(&mut self) -> Option<(String, String)> {
        self.processes
            .iter_mut()
            .find_map(|p| p.exit_status().map(|status| (p.role().to_string(), status)))
    }

    fn kill_all(&mut self) {
        for process in &mut self.processes {
            process.kill_and_reap();
        }
    }

    /// Removes the state file and sockets; keeps the console log for `berth vm logs`.
    fn forget(&self) {
        for path in runtime_files(&self.state_dir) {
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    debug!(path = %path.display(), error = %e, "cannot remove");
                }
            }
        }
        qemu::forget_files(&self.state_dir);
    }

    fn write_state(&self) -> Result<(), VmError> {
        let state = VmState {
            backend: self.backend,
            processes: self
                .processes
                .iter()
                .map(|p| (p.role().to_string(), p.pid()))
                .collect(),
        };
        let path = self.state_dir.join(STATE_FILE);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(&state).map_err(|source| VmError::BadState {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, text)
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| VmError::StateDir { path, source })
    }
}

/// The readiness socket in a state directory (hybrid vsock: `<socket>_<port>`).
fn ready_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(format!("{VSOCK_SOCKET}_{}", agent_protocol::READY_PORT))
}

/// The files a running VM owns in its state directory, besides the backend's own and the
/// console log (kept for `berth vm logs`).
fn runtime_files(state_dir: &Path) -> [PathBuf; 3] {
    [
        state_dir.join(STATE_FILE),
        state_dir.join(VSOCK_SOCKET),
        ready_socket(state_dir),
    ]
}

fn prepare_state_dir(config: &VmConfig) -> Result<(), VmError> {
    let dir = &config.state_dir;
    let state_err = |source| VmError::StateDir {
        path: dir.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(state_err)?;
    if dir.join(STATE_FILE).exists() {
        // Another VM may be running from this directory: two VMs must not share sockets.
        if let Ok(mut running) = Vm::attach(dir) {
            if running.is_running() {
                return Err(state_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a VM is already running from this directory (stop it first)",
                )));
            }
        }
    }
    for path in runtime_files(dir) {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_err(e)),
        }
    }
    qemu::forget_files(dir);
    // A fresh console log per boot; the previous one is kept beside it for post-mortems.
    let console = config.console_log();
    if console.exists() {
        fs::rename(&console, console.with_extension("log.previous")).map_err(state_err)?;
    }
    Ok(())
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// The cause found in the console, or its last lines when none is recognisable.
fn diagnose_or_tail(console: &str, path: &Path) -> String {
    if let Some(cause) = diagnose_console(console) {
        return cause;
    }
    let lines: Vec<&str> = console.lines().collect();
    let tail = lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n  ");
    if tail.is_empty() {
        format!("the guest console ({}) is empty", path.display())
    } else {
        format!("last console lines ({}):\n  {tail}", path.display())
    }
}

/// Formats an error with its whole source chain on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_vmm_forced_vmm_wins_even_without_hardware_kvm() {
        assert!(prefer_vmm(Some("vmm"), false, false, false));
    }

    #[test]
    fn prefer_vmm_forced_qemu_wins_over_the_default() {
        assert!(!prefer_vmm(Some("qemu"), true, true, true));
    }

    #[test]
    fn prefer_vmm_by_default_needs_hardware_kvm_and_the_program() {
        assert!(prefer_vmm(None, true, true, true));
        assert!(!prefer_vmm(None, false, true, true));
        assert!(!prefer_vmm(Some("bogus"), true, false, true));
        assert!(!prefer_vmm(None, true, true, false));
    }

    fn config(dir: &Path) -> VmConfig {
        VmConfig {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            memory_mib: 256,
            vcpus: 1,
            state_dir: dir.join("state"),
            boot_timeout: Duration::from_secs(1),
            extra_cmdline: vec!["berth.debug".into()],
            data_disk: None,
            shares: Vec::new(),
        }
    }

    #[test]
    fn check_assets_missing_kernel_names_kernel_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());

        let err = config.check_assets().unwrap_err();

        assert!(matches!(&err, VmError::MissingAsset { what: "kernel", .. }));
        assert!(err.to_string().contains("vmlinux"));
    }

    #[test]
    fn check_assets_initramfs_without_cpio_magic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        fs::write(&config.kernel, b"kernel").unwrap();
        fs::write(&config.initramfs, b"\x1f\x8bgzip-or-garbage").unwrap();

        let err = config.check_assets().unwrap_err();

        assert!(matches!(err, VmError::NotInitramfs { .. }));
    }

    #[test]
    fn check_assets_empty_initramfs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        fs::write(&config.kernel, b"kernel").unwrap();
        fs::write(&config.initramfs, b"").unwrap();

        let err = config.check_assets().unwrap_err();

        assert!(matches!(err, VmError::NotInitramfs { .. }));
    }

    #[test]
    fn cmdline_appends_extra_words_after_ours() {
        let dir = tempfile::tempdir().unwrap();

        let cmdline = config(dir.path()).cmdline();

        assert!(cmdline.starts_with("console=ttyS0 reboot=t panic=-1"));
        assert!(cmdline.ends_with(" berth.debug"));
    }

    #[test]
    fn attach_without_state_is_not_running() {
        let dir = tempfile::tempdir().unwrap();

        let err = Vm::attach(dir.path()).unwrap_err();

        assert!(matches!(err, VmError::NotRunning(_)));
    }

    #[test]
    fn diagnose_or_tail_without_cause_shows_last_lines() {
        let console = (0..30)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");

        let text = diagnose_or_tail(&console, Path::new("/x/console.log"));

        assert!(text.contains("line 29"));
        assert!(!text.contains("line 14\n"));
    }
}
