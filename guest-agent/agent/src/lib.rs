//! `berth-agent`: PID 1 of the Berth guest.
//!
//! In the guest the agent is the whole userspace: the initramfs holds it as `/init` and nothing
//! else. It mounts the basic filesystems ([`init`]), seeds the entropy pool ([`entropy`]), reaps
//! every orphan ([`reaper`]), runs containers ([`containers`], over the `berth-container`
//! library) and serves the host's control protocol over vsock ([`server`], [`session`],
//! [`handlers`]) and their stdio and uploads on stream connections of their own ([`streams`])
//! until the host asks it to power off ([`power`]).
//!
//! Outside the guest (`--listen-unix <path>`, DESIGN.md tier 1) the same server runs on a unix
//! socket so host tests can drive the real agent over the real protocol; everything that would
//! change the host (mounts, hostname, clock, reboot) is skipped in that mode. Containers do run
//! natively (as root), with their stream server on `<path>.streams`.
//!
//! The agent is threaded and synchronous: one thread accepts, one thread serves each connection,
//! one thread reaps. PID 1 must never exit (the kernel panics), so every error is logged to the
//! console and the agent carries on wherever it can.

pub mod args;
pub mod clock;
pub mod containers;
pub mod dns;
pub mod entropy;
pub mod forward;
pub mod handlers;
pub mod init;
pub mod log;
pub mod netlink;
pub mod network;
pub mod notify;
pub mod power;
pub mod reaper;
pub mod rootfs;
pub mod server;
pub mod session;
pub mod storage;
pub mod streams;
pub mod sysinfo;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use agent_protocol::{stream_socket_path, CONTROL_PORT, PROTOCOL_VERSION, STREAM_PORT};

use crate::args::{Invocation, Listen};
use crate::containers::{Containers, ContainersConfig};
use crate::handlers::AgentContext;
use crate::log::{console, Chain};
use crate::reaper::Reaper;

/// How the agent was started, which decides what it may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the guest: owns the machine, sets it up, powers it off.
    Pid1,
    /// An ordinary process (tier-1 tests on the host): serves the protocol, touches nothing
    /// system-wide, and exits when asked to shut down.
    Native,
}

impl Mode {
    /// The mode of the current process.
    pub fn detect() -> Self {
        if std::process::id() == 1 {
            Self::Pid1
        } else {
            Self::Native
        }
    }
}

/// Runs the agent; returns only in native mode.
pub fn run() -> ExitCode {
    match Mode::detect() {
        Mode::Pid1 => run_pid1(),
        Mode::Native => run_native(),
    }
}

/// PID 1: set the machine up, then serve vsock forever. Command-line arguments are ignored: the
/// kernel hands init every unknown word of its command line, so they are not ours to parse.
fn run_pid1() -> ! {
    // First of all, while no thread exists: on success this re-executes the agent.
    if let Err(e) = rootfs::leave_initramfs() {
        console!(
            "staying on the initramfs, containers cannot start: {}",
            Chain(&e)
        );
    }
    // Before any thread exists, so every thread inherits the mask (see `reaper`).
    if let Err(e) = reaper::block_sigchld() {
        console!(
            "cannot block SIGCHLD, orphans may be reaped late: {}",
            Chain(&e)
        );
    }
    init::early_init();
    match storage::mount_data_disk(Path::new(PID1_STORAGE_ROOT)) {
        Ok(true) => console!("data disk {} on {PID1_STORAGE_ROOT}", storage::DATA_DISK),
        Ok(false) => console!("no data disk: layers and containers live on the VM's tmpfs"),
        Err(e) => console!("cannot mount the data disk, using tmpfs: {}", Chain(&e)),
    }
    match network::configure_uplink() {
        Ok(true) => console!("uplink {} up", agent_protocol::network::UPLINK_INTERFACE),
        Ok(false) => {}
        Err(e) => console!("{}", Chain(&e)),
    }
    entropy::spawn_seeder();
    let containers = Arc::new(Containers::new(
        start_reaper(Mode::Pid1),
        containers_config(
            Path::new(PID1_STATE_DIR),
            Path::new(PID1_STORAGE_ROOT),
            PathBuf::from(init::CGROUP_ROOT),
        ),
    ));
    let streams = Listen::Vsock { port: STREAM_PORT };
    if let Err(e) = streams::spawn(streams, Arc::clone(&containers), true) {
        console!("cannot start the stream server: {e}");
    }
    let context = Arc::new(AgentContext::new(Mode::Pid1, containers));
    let listen = Listen::Vsock { port: CONTROL_PORT };
    let listener = server::bind_retrying(&listen);
    console!("ready on vsock port {CONTROL_PORT} (protocol v{PROTOCOL_VERSION})");
    notify::spawn_announce_ready(context.boot_id.clone());
    server::accept_loop(listener, context)
}

/// Native mode: parse the arguments, then serve until a `Shutdown` request exits the process.
fn run_native() -> ExitCode {
    let invocation = match args::parse(std::env::args_os().skip(1)) {
        Ok(invocation) => invocation,
        Err(e) => {
            console!("{}\n{}", Chain(&e), args::USAGE);
            return ExitCode::from(2);
        }
    };
    let listen = match invocation {
        Invocation::Help => {
            println!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Invocation::Version => {
            println!("berth-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Invocation::Serve(listen) => listen,
    };
    if let Err(e) = reaper::block_sigchld() {
        console!(
            "cannot block SIGCHLD, orphans may be reaped late: {}",
            Chain(&e)
        );
    }
    let (state_dir, storage_root, streams) = match &listen {
        Listen::Unix(path) => (
            PathBuf::from(format!("{}.state", path.display())),
            PathBuf::from(format!("{}.storage", path.display())),
            Listen::Unix(stream_socket_path(path)),
        ),
        Listen::Vsock { .. } => (
            PathBuf::from(PID1_STATE_DIR),
            PathBuf::from(PID1_STORAGE_ROOT),
            Listen::Vsock { port: STREAM_PORT },
        ),
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup_root =
        containers::cgroup2_mount(&mountinfo).unwrap_or_else(|| PathBuf::from(init::CGROUP_ROOT));
    let containers = Arc::new(Containers::new(
        start_reaper(Mode::Native),
        containers_config(&state_dir, &storage_root, cgroup_root),
    ));
    let listener = match server::bind(&listen) {
        Ok(listener) => listener,
        Err(e) => {
            console!("cannot listen: {}", Chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = streams::spawn(streams, Arc::clone(&containers), false) {
        console!("cannot start the stream server: {e}");
        return ExitCode::FAILURE;
    }
    console!("ready on {listen} (protocol v{PROTOCOL_VERSION})");
    server::accept_loop(
        listener,
        Arc::new(AgentContext::new(Mode::Native, containers)),
    )
}

/// Where PID 1 keeps per-container state (a tmpfs: it dies with the VM, as containers do).
const PID1_STATE_DIR: &str = "/run/berth/containers";

/// Where PID 1 keeps layers, writable layers and volumes: the data disk's mount point (on the
/// root tmpfs when the VM has no disk).
const PID1_STORAGE_ROOT: &str = "/var/lib/berth";

fn containers_config(
    state_dir: &Path,
    storage_root: &Path,
    cgroup_root: PathBuf,
) -> ContainersConfig {
    ContainersConfig {
        state_dir: state_dir.to_owned(),
        storage_root: storage_root.to_owned(),
        cgroup_root,
        // The container library re-executes the agent; `main` serves that first thing.
        init_binary: PathBuf::from("/proc/self/exe"),
    }
}

/// Starts the reaper. In native mode the agent makes itself a child subreaper first, so the
/// orphans of what it spawns come back to it as they would to PID 1.
fn start_reaper(mode: Mode) -> Option<Reaper> {
    if mode == Mode::Native {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            console!("cannot become a child subreaper: {e}");
        }
    }
    match Reaper::start() {
        Ok(reaper) => Some(reaper),
        Err(e) => {
            console!(
                "cannot start the reaper, zombies will pile up: {}",
                Chain(&e)
            );
            None
        }
    }
}
