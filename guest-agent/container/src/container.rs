//! The caller's side of a container's life: create (via the re-executed helper of
//! [`crate::init`]), start, exec, signal, wait (with OOM detection), stop, pause and resume,
//! top, stats and delete; and the stdio of its processes (pipes, or a pty with resize).
//!
//! Container processes are children of the caller (the helper clones them with
//! `CLONE_PARENT`), so the caller reaps them with `waitpid` on their pid: a caller that reaps
//! with `waitpid(-1)` (a PID 1 reaper) must hand statuses to [`ContainerProcess::set_exited`]
//! instead of letting [`ContainerProcess::wait`] race it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process};
use thiserror::Error;

use crate::cgroup::{Cgroup, CgroupError, CgroupStats};
use crate::init::{format_fds, InitMessage, InitRequest, INIT_ENV};
use crate::spec::{namespaces, ContainerConfig, SeccompProfile, SpecError};

/// Errors from container lifecycle operations.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// The configuration is invalid.
    #[error("invalid container configuration")]
    Spec(#[from] SpecError),
    /// A cgroup operation failed.
    #[error("cgroup operation failed")]
    Cgroup(#[from] CgroupError),
    /// A pipe, pty or the helper process could not be set up.
    #[error("cannot {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The helper or container process reported a failure.
    #[error("container setup failed: {0}")]
    Setup(String),
    /// The helper or container process broke the protocol or died early.
    #[error("container helper: {0}")]
    Protocol(&'static str),
    /// A signal could not be sent or a process waited for.
    #[error("cannot {0}")]
    Process(&'static str, #[source] nix::Error),
    /// The operation needs a state the container is not in.
    #[error("container is {0}")]
    State(&'static str),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// The exit code, `128 + signal` for a process killed by a signal (as shells and Docker
    /// report it).
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// The cgroup's OOM killer killed a process of the container.
    pub oom_killed: bool,
}

impl ExitStatus {
    fn from_wait(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(Self {
                code,
                signal: None,
                oom_killed: false,
            }),
            WaitStatus::Signaled(_, signal, _) => Some(Self {
                code: 128 + signal as i32,
                signal: Some(signal as i32),
                oom_killed: false,
            }),
            _ => None,
        }
    }
}

/// A process of a container: its init or an exec.
#[derive(Debug)]
pub struct ContainerProcess {
    pid: Pid,
    exit: Mutex<Option<ExitStatus>>,
}

impl ContainerProcess {
    fn new(pid: i32) -> Self {
        Self {
            pid: Pid::from_raw(pid),
            exit: Mutex::new(None),
        }
    }

    /// Its pid in the caller's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid.as_raw()
    }

    /// Sends `signal`; a process already reaped is not signalled (its pid may be reused).
    pub fn signal(&self, signal: Signal) -> Result<(), ContainerError> {
        if self.exited().is_some() {
            return Err(ContainerError::State("stopped"));
        }
        nix::sys::signal::kill(self.pid, signal)
            .map_err(|e| ContainerError::Process("send a signal", e))
    }

    /// Waits for the process to end.
    pub fn wait(&self) -> Result<ExitStatus, ContainerError> {
        self.wait_with(WaitPidFlag::empty())?
            .ok_or(ContainerError::Protocol(
                "waitpid returned without a status",
            ))
    }

    /// The exit status if the process has ended, without blocking.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, ContainerError> {
        self.wait_with(WaitPidFlag::WNOHANG)
    }

    /// Records a status reaped elsewhere (by a `waitpid(-1)` reaper).
    pub fn set_exited(&self, status: ExitStatus) {
        if let Ok(mut exit) = self.exit.lock() {
            exit.get_or_insert(status);
        }
    }

    /// The recorded exit status, if the process was reaped.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit.lock().ok().and_then(|e| *e)
    }

    fn wait_with(&self, flags: WaitPidFlag) -> Result<Option<ExitStatus>, ContainerError> {
        if let Some(status) = self.exited() {
            return Ok(Some(status));
        }
        loop {
            match waitpid(self.pid, Some(flags)) {
                Ok(WaitStatus::StillAlive) => return Ok(None),
                Ok(status) => {
                    if let Some(exit) = ExitStatus::from_wait(status) {
                        self.set_exited(exit);
                        return Ok(Some(exit));
                    }
                }
                Err(nix::Error::EINTR) => {}
                // Reaped by someone else: only a recorded status can tell.
                Err(nix::Error::ECHILD) => {
                    return self
                        .exited()
                        .map(Some)
                        .ok_or(ContainerError::Protocol("process was reaped elsewhere"));
                }
                Err(e) => return Err(ContainerError::Process("wait for the process", e)),
            }
        }
    }
}

/// The caller's ends of a process's stdio.
#[derive(Debug, Default)]
pub struct ProcessIo {
    /// Write end of stdin (non-TTY, when requested).
    pub stdin: Option<File>,
    /// Read end of stdout (non-TTY).
    pub stdout: Option<File>,
    /// Read end of stderr (non-TTY).
    pub stderr: Option<File>,
    /// The pty master (TTY): read for output, write for input.
    pub pty: Option<Pty>,
}

/// The caller's ends of a new process's stdio: for a terminal, the socket the pty master
/// arrives on once the container process has opened it.
struct PendingIo {
    io: ProcessIo,
    console: Option<OwnedFd>,
}

impl PendingIo {
    /// Receives the pty master the container process sends once it opened its terminal.
    fn receive_console(&mut self) -> Result<(), ContainerError> {
        let Some(console) = self.console.take() else {
            return Ok(());
        };
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let message = nix::sys::socket::recvmsg::<()>(
            console.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| ContainerError::Io("receive the pty master", e.into()))?;
        let mut received = None;
        for cmsg in message
            .cmsgs()
            .map_err(|e| ContainerError::Io("receive the pty master", e.into()))?
        {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: the kernel just installed this descriptor for us; we own it.
                    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    received.get_or_insert(owned);
                }
            }
        }
        let master = received.ok_or(ContainerError::Protocol(
            "the container process sent no terminal",
        ))?;
        self.io.pty = Some(Pty {
            master: File::from(master),
        });
        Ok(())
    }
}

/// The master side of a process's pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    master: File,
}

impl Pty {
    /// The master, for reading output and writing input.
    pub fn master(&self) -> &File {
        &self.master
    }

    /// Takes the master.
    pub fn into_master(self) -> File {
        self.master
    }

    /// Sets the terminal size; the process gets `SIGWINCH`.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer during the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc != 0 {
            return Err(ContainerError::Io(
                "resize the terminal",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Which stdio a new process gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioConfig {
    /// Give the caller a stdin to write (non-TTY; with a TTY the pty master is the input).
    /// Without it the process reads `/dev/null`.
    pub stdin: bool,
}

/// The child ends, passed to the helper as its stdio (and, for a terminal, the socket the
/// container process sends the pty master over).
struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    console: Option<OwnedFd>,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::Io("create a pipe", e.into()))
}

fn make_stdio(
    process: &Process,
    config: StdioConfig,
) -> Result<(PendingIo, ChildStdio), ContainerError> {
    if process.terminal().unwrap_or(false) {
        // The terminal comes from inside the container (see `crate::init`); until the
        // container process makes it its stdio, the helper needs none.
        let null = || -> Result<OwnedFd, ContainerError> {
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| ContainerError::Io("open /dev/null", e))
        };
        let (caller, child) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| ContainerError::Io("create the console socket", e.into()))?;
        let io = PendingIo {
            io: ProcessIo::default(),
            console: Some(caller),
        };
        let child = ChildStdio {
            stdin: null()?,
            stdout: null()?,
            stderr: null()?,
            console: Some(child),
        };
        return Ok((io, child));
    }
    let (stdin_child, stdin) = if config.stdin {
        let (r, w) = pipe()?;
        (r, Some(File::from(w)))
    } else {
        let null = File::open("/dev/null").map_err(|e| ContainerError::Io("open /dev/null", e))?;
        (OwnedFd::from(null), None)
    };
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    Ok((
        PendingIo {
            io: ProcessIo {
                stdin,
                stdout: Some(File::from(stdout_r)),
                stderr: Some(File::from(stderr_r)),
                pty: None,
            },
            console: None,
        },
        ChildStdio {
            stdin: stdin_child,
            stdout: stdout_w,
            stderr: stderr_w,
            console: None,
        },
    ))
}

/// The caller's end of a running helper conversation.
struct Helper {
    status: BufReader<File>,
    start: Option<File>,
}

impl Helper {
    /// Spawns the helper, sends `request`, and returns once it reported the pid.
    fn spawn(
        binary: &PathBuf,
        request: &InitRequest,
        stdio: ChildStdio,
        two_phase: bool,
    ) -> Result<(Self, i32), ContainerError> {
        let (config_r, config_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        let (start_r, start_w) = if two_phase {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        let console = stdio.console;
        let inherit: Vec<i32> = [
            Some(&config_r),
            Some(&status_w),
            start_r.as_ref(),
            console.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|fd| fd.as_raw_fd())
        .collect();
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env(
                INIT_ENV,
                format_fds(
                    config_r.as_raw_fd(),
                    status_w.as_raw_fd(),
                    start_r.as_ref().map(|fd| fd.as_raw_fd()),
                    console.as_ref().map(|fd| fd.as_raw_fd()),
                ),
            )
            .stdin(Stdio::from(stdio.stdin))
            .stdout(Stdio::from(stdio.stdout))
            .stderr(Stdio::from(stdio.stderr));
        // SAFETY: the closure only calls fcntl, which is async-signal-safe, on descriptors
        // that are open in the child (they are open here and fork copies them).
        unsafe {
            command.pre_exec(move || {
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| ContainerError::Io("spawn the container helper", e))?;
        drop((config_r, status_w, start_r, console));

        let mut config = File::from(config_w);
        let written = serde_json::to_writer(&mut config, request)
            .map_err(|e| ContainerError::Io("send the init request", e.into()));
        drop(config);
        let mut helper = Helper {
            status: BufReader::new(File::from(status_r)),
            start: start_w.map(File::from),
        };
        let first = helper.next_message();
        let waited = child.wait();
        written?;
        let pid = match first? {
            Some(InitMessage::Pid(pid)) => pid,
            Some(InitMessage::Error(e)) => return Err(ContainerError::Setup(e)),
            Some(InitMessage::Ready) => return Err(ContainerError::Protocol("ready before pid")),
            None => {
                return Err(ContainerError::Protocol(
                    "helper exited without reporting a pid",
                ))
            }
        };
        waited.map_err(|e| ContainerError::Io("wait for the container helper", e))?;
        Ok((helper, pid))
    }

    /// The next message, `None` at EOF.
    fn next_message(&mut self) -> Result<Option<InitMessage>, ContainerError> {
        let mut line = String::new();
        let n = self
            .status
            .read_line(&mut line)
            .map_err(|e| ContainerError::Io("read from the container helper", e))?;
        if n == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|_| ContainerError::Protocol("malformed status message"))
    }

    /// Waits for EOF (exec succeeded) or an error report.
    fn expect_exec(&mut self) -> Result<(), ContainerError> {
        match self.next_message()? {
            None => Ok(()),
            Some(InitMessage::Error(e)) => Err(ContainerError::Setup(e)),
            Some(_) => Err(ContainerError::Protocol("unexpected status message")),
        }
    }
}

/// A created container.
#[derive(Debug)]
pub struct Container {
    id: String,
    cgroup: Cgroup,
    init: ContainerProcess,
    namespaces: Vec<LinuxNamespaceType>,
    seccomp: SeccompProfile,
    init_binary: PathBuf,
    start: Mutex<Option<StartHandle>>,
}

struct StartHandle(Helper);

impl std::fmt::Debug for StartHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StartHandle")
    }
}

impl Container {
    /// Creates the container: its cgroup with the spec's limits, its namespaces and root; the
    /// process is ready but not started. Returns the caller's ends of the init's stdio.
    pub fn create(
        config: &ContainerConfig,
        stdio: StdioConfig,
    ) -> Result<(Self, ProcessIo), ContainerError> {
        config.validate()?;
        let process = config.spec.process().clone().ok_or(SpecError::NoProcess)?;
        let cgroup = Cgroup::create(&config.cgroup, &config.id)?;
        let created = Self::create_in(config, &cgroup, &process, stdio);
        if created.is_err() {
            let _ = cgroup.kill_all();
            let _ = cgroup.remove(Duration::from_secs(2));
        }
        created
    }

    fn create_in(
        config: &ContainerConfig,
        cgroup: &Cgroup,
        process: &Process,
        stdio: StdioConfig,
    ) -> Result<(Self, ProcessIo), ContainerError> {
        if let Some(resources) = config
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
        {
            cgroup.apply(resources)?;
        }
        let (mut io, child_stdio) = make_stdio(process, stdio)?;
        let request = InitRequest::Create {
            config: Box::new(config.clone()),
            cgroup: cgroup.path().to_path_buf(),
        };
        let (mut helper, pid) = Helper::spawn(&config.init_binary, &request, child_stdio, true)?;
        let init = ContainerProcess::new(pid);
        // The terminal is sent before `Ready`.
        let ready = match helper.next_message() {
            Ok(Some(InitMessage::Ready)) => {
                io.receive_console().map(|()| Ok(Some(InitMessage::Ready)))
            }
            other => Ok(other),
        };
        match ready.and_then(|r| r) {
            Ok(Some(InitMessage::Ready)) => {}
            other => {
                let _ = init.signal(Signal::SIGKILL);
                let _ = init.wait();
                return Err(match other {
                    Ok(Some(InitMessage::Error(e))) => ContainerError::Setup(e),
                    Err(e) => e,
                    _ => ContainerError::Protocol("container process exited before ready"),
                });
            }
        }
        let container = Self {
            id: config.id.clone(),
            cgroup: cgroup.clone(),
            init,
            namespaces: namespaces(&config.spec).iter().map(|n| n.typ()).collect(),
            seccomp: config.seccomp,
            init_binary: config.init_binary.clone(),
            start: Mutex::new(Some(StartHandle(helper))),
        };
        Ok((container, io.io))
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init process.
    pub fn init(&self) -> &ContainerProcess {
        &self.init
    }

    /// The cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Starts the user process; returns once it has been executed (or failed to be).
    pub fn start(&self) -> Result<(), ContainerError> {
        let handle = self
            .start
            .lock()
            .map_err(|_| ContainerError::State("poisoned"))?
            .take()
            .ok_or(ContainerError::State("already started"))?;
        let StartHandle(mut helper) = handle;
        let mut start = helper
            .start
            .take()
            .ok_or(ContainerError::State("already started"))?;
        start
            .write_all(b"1")
            .map_err(|e| ContainerError::Io("signal start", e))?;
        drop(start);
        helper.expect_exec()
    }

    /// Runs `process` in the running container: its namespaces, cgroup and (via the spec's
    /// user, capabilities and the container's seccomp profile) its restrictions.
    pub fn exec(
        &self,
        process: &Process,
        stdio: StdioConfig,
    ) -> Result<(ContainerProcess, ProcessIo), ContainerError> {
        if self.init.exited().is_some() {
            return Err(ContainerError::State("stopped"));
        }
        let (mut io, child_stdio) = make_stdio(process, stdio)?;
        let request = InitRequest::Exec {
            init_pid: self.init.pid(),
            cgroup: self.cgroup.path().to_path_buf(),
            namespaces: self.namespaces.clone(),
            process: Box::new(process.clone()),
            seccomp: self.seccomp,
        };
        let (mut helper, pid) = Helper::spawn(&self.init_binary, &request, child_stdio, false)?;
        let exec = ContainerProcess::new(pid);
        // A process that dies before sending its terminal closes the socket; its error is
        // then on the status pipe.
        let console = io.receive_console();
        if let Err(e) = helper.expect_exec() {
            let _ = exec.wait();
            return Err(e);
        }
        console?;
        Ok((exec, io.io))
    }

    /// Sends `signal` to the init process.
    pub fn signal(&self, signal: Signal) -> Result<(), ContainerError> {
        self.init.signal(signal)
    }

    /// Waits for the init process to end; reports OOM kills from the cgroup.
    pub fn wait(&self) -> Result<ExitStatus, ContainerError> {
        let mut status = self.init.wait()?;
        status.oom_killed = self.cgroup.oom_kills().unwrap_or(0) > 0;
        Ok(status)
    }

    /// Sends SIGTERM, waits up to `timeout`, then SIGKILL.
    pub fn stop(&self, timeout: Duration) -> Result<ExitStatus, ContainerError> {
        if self.init.exited().is_none() {
            let _ = self.cgroup.set_frozen(false);
            let _ = self.init.signal(Signal::SIGTERM);
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if self.init.try_wait()?.is_some() {
                    return self.wait();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.init.signal(Signal::SIGKILL);
        }
        self.wait()
    }

    /// Freezes every process of the container.
    pub fn pause(&self) -> Result<(), ContainerError> {
        Ok(self.cgroup.set_frozen(true)?)
    }

    /// Thaws the container.
    pub fn resume(&self) -> Result<(), ContainerError> {
        Ok(self.cgroup.set_frozen(false)?)
    }

    /// The pids (in the caller's namespace) of every process in the container.
    pub fn top(&self) -> Result<Vec<i32>, ContainerError> {
        Ok(self.cgroup.pids()?)
    }

    /// Resource usage.
    pub fn stats(&self) -> CgroupStats {
        self.cgroup.stats()
    }

    /// Kills whatever still runs, reaps the init and removes the cgroup. The container's
    /// mounts live in its own mount namespace and vanish with its last process.
    pub fn delete(self) -> Result<(), ContainerError> {
        // Exec'd processes may outlive the init when the pid namespace is shared.
        self.cgroup.kill_all()?;
        if self.init.exited().is_none() {
            let _ = self.init.signal(Signal::SIGKILL);
            let _ = self.init.wait();
        }
        self.cgroup.remove(Duration::from_secs(5))?;
        Ok(())
    }
}
