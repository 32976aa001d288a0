//! The re-executed helper that sets containers up, so namespace work never happens in the
//! caller's (multithreaded) process: the caller spawns its own binary (or
//! [`crate::ContainerConfig::init_binary`]) with a hidden environment variable naming three
//! inherited descriptors, and that binary's `main` calls [`run_init_if_requested`] before
//! anything else, as the Kata agent does with its re-exec.
//!
//! The protocol, one JSON value per line:
//! 1. the caller writes an [`InitRequest`] on the config pipe and closes it;
//! 2. the helper joins the cgroup, joins or creates the namespaces and clones the container
//!    process with `CLONE_PARENT`, so it is the caller's child (the caller reaps it; with a new
//!    pid namespace it is that namespace's init); the helper sends [`InitMessage::Pid`] and
//!    exits; the container process waits for that before it reports anything itself;
//! 3. for a create, the container process builds its root, sends [`InitMessage::Ready`] and
//!    blocks reading the start pipe (runc's two-phase create/start); one byte means start, EOF
//!    means the caller gave up;
//! 4. it then executes the user process; the status pipe is close-on-exec, so EOF on it means
//!    `execve` succeeded, and [`InitMessage::Error`] means a step failed.
//!
//! A process with a terminal gets it from inside the container, as runc's console socket
//! does: once in the container's mount namespace (for a create, after the root is built), the
//! container process opens the container's own `/dev/ptmx`, makes the slave its stdio and sends
//! the master back over a fourth descriptor, a unix socket, with `SCM_RIGHTS`. The terminal is
//! then a `/dev/pts/N` of the container's devpts, so `tty` and `ttyname` work inside.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Process};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::mounts::{finish_rootfs, prepare_rootfs, MountError};
use crate::process::{finish_and_exec, ProcessError};
use crate::spec::{namespaces, ContainerConfig, SeccompProfile};
use crate::syscall::{LinuxSyscall, Syscall, SyscallError};

/// The environment variable that marks a re-exec as the container helper. Its value lists
/// the config, status and start descriptors (`-1` when absent).
pub(crate) const INIT_ENV: &str = "_BERTH_CONTAINER_INIT";

/// Errors inside the helper; sent to the caller as text.
#[derive(Debug, Error)]
pub enum InitError {
    /// The request could not be read.
    #[error("cannot read the init request")]
    Request(#[source] serde_json::Error),
    /// The cgroup could not be joined.
    #[error("cannot join cgroup {0}")]
    Cgroup(String, #[source] std::io::Error),
    /// A namespace operation failed.
    #[error("cannot {0}")]
    Namespace(String, #[source] nix::Error),
    /// Building the root failed.
    #[error("cannot set up the root filesystem")]
    Mount(#[from] MountError),
    /// A privileged call failed.
    #[error("container setup failed")]
    Syscall(#[from] SyscallError),
    /// The process could not be started.
    #[error("cannot start the container process")]
    Process(#[from] ProcessError),
    /// A sysctl could not be set.
    #[error("cannot set sysctl {0}")]
    Sysctl(String, #[source] std::io::Error),
    /// The terminal could not be set up.
    #[error("cannot {0}")]
    Console(&'static str, #[source] nix::Error),
    /// The loopback interface could not be brought up.
    #[error("cannot bring up the loopback interface")]
    Loopback(#[source] std::io::Error),
}

/// What the caller asks of the helper.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum InitRequest {
    /// Create a container and wait for start.
    Create {
        /// The container.
        config: Box<ContainerConfig>,
        /// Its cgroup directory.
        cgroup: PathBuf,
    },
    /// Run a process in a running container.
    Exec {
        /// The container's init, whose namespaces are joined.
        init_pid: i32,
        /// The container's cgroup directory.
        cgroup: PathBuf,
        /// Namespaces to join.
        namespaces: Vec<LinuxNamespaceType>,
        /// The process.
        process: Box<Process>,
        /// Its seccomp profile.
        seccomp: SeccompProfile,
    },
}

/// What the helper and the container process report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum InitMessage {
    /// The container process's pid, in the caller's pid namespace.
    Pid(i32),
    /// The root is built; waiting for start.
    Ready,
    /// A step failed; the whole error chain.
    Error(String),
}

/// Handles the hidden container-setup entry point: when this process was started as the
/// helper, runs it and exits; otherwise returns at once. Call it first thing in `main`, before
/// any thread or async runtime exists.
pub fn run_init_if_requested() {
    let Some(value) = std::env::var_os(INIT_ENV) else {
        return;
    };
    let code = match parse_fds(&value) {
        Some(fds) => helper_main(fds),
        None => {
            eprintln!("berth-container: malformed {INIT_ENV}");
            1
        }
    };
    std::process::exit(code);
}

/// Formats the descriptor list for [`INIT_ENV`].
pub(crate) fn format_fds(
    config: RawFd,
    status: RawFd,
    start: Option<RawFd>,
    console: Option<RawFd>,
) -> String {
    format!(
        "{config},{status},{},{}",
        start.unwrap_or(-1),
        console.unwrap_or(-1)
    )
}

struct HelperFds {
    config: OwnedFd,
    status: OwnedFd,
    start: Option<OwnedFd>,
    console: Option<OwnedFd>,
}

fn parse_fds(value: &OsStr) -> Option<HelperFds> {
    let text = value.to_str()?;
    let numbers: Vec<RawFd> = text
        .split(',')
        .map(|n| n.parse().ok())
        .collect::<Option<_>>()?;
    let [config, status, start, console] = numbers.as_slice() else {
        return None;
    };
    if *config < 3 || *status < 3 {
        return None;
    }
    let take = |fd: RawFd| {
        // SAFETY: the caller passed these descriptors to this process for exactly this use;
        // nothing else in this fresh process owns them.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Keep them from leaking into the container process.
        let _ = nix::fcntl::fcntl(
            owned.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        owned
    };
    Some(HelperFds {
        config: take(*config),
        status: take(*status),
        start: (*start >= 3).then(|| take(*start)),
        console: (*console >= 3).then(|| take(*console)),
    })
}

fn helper_main(fds: HelperFds) -> i32 {
    let mut status = File::from(fds.status);
    let request = serde_json::from_reader::<_, InitRequest>(File::from(fds.config))
        .map_err(InitError::Request);
    let result = request.and_then(|request| match request {
        InitRequest::Create { config, cgroup } => {
            create_stage(&config, &cgroup, &mut status, fds.start, fds.console)
        }
        InitRequest::Exec {
            init_pid,
            cgroup,
            namespaces,
            process,
            seccomp,
        } => exec_stage(
            init_pid,
            &cgroup,
            &namespaces,
            &process,
            seccomp,
            &mut status,
            fds.console,
        ),
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            send(&mut status, &InitMessage::Error(error_chain(&e)));
            1
        }
    }
}

/// Writes one message line. A failure means the caller is gone; nothing useful remains to do.
pub(crate) fn send(status: &mut File, message: &InitMessage) {
    if let Ok(mut line) = serde_json::to_vec(message) {
        line.push(b'\n');
        let _ = status.write_all(&line);
    }
}

/// The error and all its sources, `: `-separated.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn join_cgroup(cgroup: &Path) -> Result<(), InitError> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .map_err(|e| InitError::Cgroup(cgroup.display().to_string(), e))
}

fn clone_flag(typ: LinuxNamespaceType) -> CloneFlags {
    // oci-spec's discriminants are the CLONE_NEW* values.
    CloneFlags::from_bits_truncate(typ as i32)
}

fn ns_file(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd, InitError> {
    let fd = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| InitError::Namespace(format!("open namespace {}", path.display()), e))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A fork-like `clone` whose child becomes a child of our parent (the caller).
fn clone_parent() -> Result<i32, InitError> {
    // SAFETY: the helper is single-threaded (it is a fresh re-exec that started no thread),
    // so the child gets a consistent copy of the address space; a null stack makes the child
    // continue on a copy of the current stack, exactly like fork.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if rc < 0 {
        return Err(InitError::Namespace(
            "clone the container process".into(),
            nix::Error::last(),
        ));
    }
    Ok(rc as i32)
}

fn create_stage(
    config: &ContainerConfig,
    cgroup: &Path,
    status: &mut File,
    start: Option<OwnedFd>,
    console: Option<OwnedFd>,
) -> Result<(), InitError> {
    join_cgroup(cgroup)?;
    let mut new = CloneFlags::empty();
    for ns in namespaces(&config.spec) {
        match ns.path() {
            Some(path) => {
                let fd = open_ns(path)?;
                nix::sched::setns(&fd, clone_flag(ns.typ())).map_err(|e| {
                    InitError::Namespace(format!("join namespace {}", path.display()), e)
                })?;
            }
            None => new |= clone_flag(ns.typ()),
        }
    }
    nix::sched::unshare(new).map_err(|e| InitError::Namespace("unshare namespaces".into(), e))?;
    if clone_after_pid_report(status)? {
        let code = container_init(config, new, status, start, console);
        std::process::exit(code);
    }
    Ok(())
}

/// Clones the container process and reports its pid. The child waits until the pid is sent,
/// so the caller always reads [`InitMessage::Pid`] before anything the child reports.
/// Returns `true` in the child.
fn clone_after_pid_report(status: &mut File) -> Result<bool, InitError> {
    let (reported_r, reported_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| InitError::Namespace("create the sync pipe".into(), e))?;
    let pid = clone_parent()?;
    if pid == 0 {
        drop(reported_w);
        // EOF arrives once the helper has sent the pid and closed its end (or died).
        let mut byte = [0u8; 1];
        let _ = File::from(reported_r).read(&mut byte);
        return Ok(true);
    }
    drop(reported_r);
    send(status, &InitMessage::Pid(pid));
    drop(reported_w);
    Ok(false)
}

/// The container process: build the root, report ready, wait for start, execute.
fn container_init(
    config: &ContainerConfig,
    new: CloneFlags,
    status: &mut File,
    start: Option<OwnedFd>,
    console: Option<OwnedFd>,
) -> i32 {
    let set_up = setup_container(config, new).and_then(|()| match console {
        Some(console) => open_console(console, config.spec.process().as_ref()),
        None => Ok(()),
    });
    if let Err(e) = set_up {
        send(status, &InitMessage::Error(error_chain(&e)));
        return 1;
    }
    send(status, &InitMessage::Ready);
    if let Some(start) = start {
        let mut byte = [0u8; 1];
        if !matches!(File::from(start).read(&mut byte), Ok(1)) {
            return 1;
        }
    }
    let Some(process) = config.spec.process() else {
        send(
            status,
            &InitMessage::Error("the spec has no process".into()),
        );
        return 1;
    };
    match finish_and_exec(process, config.seccomp) {
        Ok(never) => match never {},
        Err(e) => {
            let e = InitError::from(e);
            send(status, &InitMessage::Error(error_chain(&e)));
            1
        }
    }
}

fn setup_container(config: &ContainerConfig, new: CloneFlags) -> Result<(), InitError> {
    let sys = LinuxSyscall;
    let plan = config.rootfs_plan();
    prepare_rootfs(&sys, &plan)?;
    // Before finish_rootfs: it makes /proc/sys read-only.
    if let Some(sysctl) = config
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
    {
        for (key, value) in sysctl {
            write_sysctl(key, value)?;
        }
    }
    finish_rootfs(&sys, &plan)?;
    if new.contains(CloneFlags::CLONE_NEWUTS) {
        if let Some(hostname) = config.spec.hostname() {
            sys.sethostname(hostname)?;
        }
    }
    if new.contains(CloneFlags::CLONE_NEWNET) {
        loopback_up()?;
    }
    Ok(())
}

/// Writes one sysctl (`net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`).
fn write_sysctl(key: &str, value: &str) -> Result<(), InitError> {
    let valid = !key.is_empty()
        && key
            .split('.')
            .all(|part| !part.is_empty() && !part.contains('/') && part != "..");
    if !valid {
        return Err(InitError::Sysctl(
            key.to_string(),
            std::io::ErrorKind::InvalidInput.into(),
        ));
    }
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    std::fs::write(&path, value).map_err(|e| InitError::Sysctl(key.to_string(), e))
}

/// Brings `lo` up in a new network namespace, as Docker does.
fn loopback_up() -> Result<(), InitError> {
    // SAFETY: plain socket creation; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(InitError::Loopback(std::io::Error::last_os_error()));
    }
    // SAFETY: `socket` just returned this descriptor and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the valid `request` buffer.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(InitError::Loopback(std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the valid `request` buffer.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(InitError::Loopback(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn exec_stage(
    init_pid: i32,
    cgroup: &Path,
    joined: &[LinuxNamespaceType],
    process: &Process,
    seccomp: SeccompProfile,
    status: &mut File,
    console: Option<OwnedFd>,
) -> Result<(), InitError> {
    join_cgroup(cgroup)?;
    // Open every namespace before joining any: after the mount namespace, /proc is the
    // container's. The mount namespace goes last for the same reason.
    let order = [
        LinuxNamespaceType::Cgroup,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
    ];
    let mut fds = Vec::new();
    for typ in order.into_iter().filter(|t| joined.contains(t)) {
        let path = PathBuf::from(format!("/proc/{init_pid}/ns/{}", ns_file(typ)));
        fds.push((open_ns(&path)?, typ));
    }
    for (fd, typ) in &fds {
        nix::sched::setns(fd, clone_flag(*typ)).map_err(|e| {
            InitError::Namespace(
                format!("join the container's {} namespace", ns_file(*typ)),
                e,
            )
        })?;
    }
    drop(fds);
    if clone_after_pid_report(status)? {
        let opened = match console {
            Some(console) => open_console(console, Some(process)),
            None => Ok(()),
        };
        let code = match opened.map_err(|e| error_chain(&e)).and_then(|()| {
            finish_and_exec(process, seccomp).map_err(|e| error_chain(&InitError::from(e)))
        }) {
            Ok(never) => match never {},
            Err(chain) => {
                send(status, &InitMessage::Error(chain));
                1
            }
        };
        std::process::exit(code);
    }
    Ok(())
}

/// Opens a terminal in the current mount namespace's `/dev/ptmx` (the container's), makes its
/// slave the stdio of this process, sizes it from `process`, and sends the master over
/// `console`.
fn open_console(console: OwnedFd, process: Option<&Process>) -> Result<(), InitError> {
    use nix::fcntl::OFlag;
    let step = |what: &'static str| move |e| InitError::Console(what, e);
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(step("open /dev/ptmx"))?;
    nix::pty::grantpt(&master).map_err(step("grant the pty"))?;
    nix::pty::unlockpt(&master).map_err(step("unlock the pty"))?;
    let name = nix::pty::ptsname_r(&master).map_err(step("name the pty"))?;
    if let Some(size) = process.and_then(|p| p.console_size()) {
        let size = libc::winsize {
            ws_row: u16::try_from(size.height()).unwrap_or(u16::MAX),
            ws_col: u16::try_from(size.width()).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer during the call.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
            return Err(InitError::Console("size the pty", nix::Error::last()));
        }
    }
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(step("open the pty slave"))?;
    for target in 0..3 {
        nix::unistd::dup2(slave, target).map_err(step("make the pty the stdio"))?;
    }
    if slave > 2 {
        let _ = nix::unistd::close(slave);
    }
    let fds = [master.as_raw_fd()];
    let rights = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    let byte = [std::io::IoSlice::new(b"t")];
    nix::sys::socket::sendmsg::<()>(
        console.as_raw_fd(),
        &byte,
        &rights,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map_err(step("send the pty master"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_fds_absent_start_is_minus_one() {
        assert_eq!(format_fds(5, 6, None, None), "5,6,-1,-1");
        assert_eq!(format_fds(5, 6, Some(7), Some(8)), "5,6,7,8");
    }

    #[test]
    fn parse_fds_stdio_numbers_refused() {
        assert!(parse_fds(OsStr::new("0,1,-1")).is_none());
        assert!(parse_fds(OsStr::new("garbage")).is_none());
    }

    #[test]
    fn init_message_json_round_trip() {
        let message = InitMessage::Error("cannot mount: EPERM".into());

        let json = serde_json::to_string(&message).expect("serialize");

        assert_eq!(
            serde_json::from_str::<InitMessage>(&json).expect("parse"),
            message
        );
    }

    #[test]
    fn error_chain_joins_sources() {
        let e = InitError::Cgroup(
            "/cg".into(),
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );

        assert!(error_chain(&e).starts_with("cannot join cgroup /cg: "));
    }
}
