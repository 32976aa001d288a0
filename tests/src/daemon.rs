//! `TestDaemon`: a real berthd on a private socket, data directory and VM, driven with the
//! stock `docker` CLI (DESIGN.md tier 3).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::{processes_mentioning, TestVm};

/// The docker CLI the tests drive.
pub const DOCKER: &str = "/usr/local/bin/docker";
/// How long any one CLI command may take before the test fails (a stall is a failure).
const COMMAND_TIMEOUT_SECS: u32 = 180;
/// How long berthd may take to exit after SIGTERM (it shuts the VM down cleanly).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(40);

/// One daemon at a time per test binary: each runs a VM, and TCG VMs are CPU-bound.
static DAEMON_LOCK: Mutex<()> = Mutex::new(());

/// A running berthd with its own state, stopped (VM included) when dropped.
#[derive(Debug)]
pub struct TestDaemon {
    berthd: PathBuf,
    /// Scratch space: socket, data, VM state, log.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    env: Vec<(String, String)>,
    _lock: MutexGuard<'static, ()>,
}

impl TestDaemon {
    /// Starts `berthd` (the binary at `berthd`) or says why it cannot run here.
    pub fn start(berthd: &Path) -> Result<Self, String> {
        Self::start_with_env(berthd, &[])
    }

    /// Starts `berthd` with extra environment variables (its flags' `BERTH_*` forms).
    pub fn start_with_env(berthd: &Path, env: &[(&str, &str)]) -> Result<Self, String> {
        TestVm::assets_available()?;
        if !Path::new(DOCKER).is_file() {
            return Err(format!("the docker CLI is not at {DOCKER}"));
        }
        let lock = DAEMON_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("berth-test-daemon-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let mut daemon = Self {
            berthd: berthd.to_owned(),
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            _lock: lock,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// berthd's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    /// `DOCKER_HOST` for this daemon.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// berthd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("berthd.log")).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("berthd.log"))
            .map_err(|e| format!("cannot open the log: {e}"))?;
        let child = Command::new(&self.berthd)
            .env("BERTH_SOCKET", self.socket())
            .env("BERTH_DATA_DIR", self.dir.path().join("data"))
            .env("BERTH_VM_DIR", self.dir.path().join("vm"))
            .env("BERTH_ASSETS_DIR", TestVm::assets_dir())
            .env("BERTH_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--memory", "1024"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.berthd.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("berthd exited ({status}):\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "berthd did not listen within 20 s:\n{}",
            self.log()
        ))
    }

    /// Stops berthd with SIGTERM and starts it again over the same state.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("berthd starts again");
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Runs the docker CLI against this daemon with `stdin` as its input.
    pub fn docker_with_input(&self, args: &[&str], stdin: Stdio) -> Output {
        let mut command = Command::new("timeout");
        command
            .args(["-s", "KILL", &COMMAND_TIMEOUT_SECS.to_string(), DOCKER])
            .args(args)
            .env("DOCKER_HOST", self.docker_host())
            .env("DOCKER_CONFIG", self.dir.path().join("docker-config"))
            // The classic builder: this CLI has no buildx plugin.
            .env("DOCKER_BUILDKIT", "0")
            .stdin(stdin);
        command.output().expect("the docker CLI runs")
    }

    /// Runs the docker CLI against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        self.docker_with_input(args, Stdio::null())
    }

    /// Runs the docker CLI and requires success; returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let output = self.docker(args);
        assert!(
            output.status.success(),
            "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}\nberthd log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Loads the offline busybox test image.
    pub fn load_busybox(&self) {
        let archive = busybox_archive();
        self.docker_ok(&["load", "-i", &archive.display().to_string()]);
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop();
        // Nothing of the VM may outlive the daemon.
        for (pid, _) in processes_mentioning(self.dir.path()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The busybox test image as a docker-archive, built once per test binary by
/// `tests/images/make-busybox.sh`.
pub fn busybox_archive() -> PathBuf {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE
        .get_or_init(|| {
            let out = std::env::temp_dir().join(format!("berth-busybox-{}", std::process::id()));
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/make-busybox.sh");
            let status = Command::new("bash")
                .arg(&script)
                .arg(&out)
                .status()
                .expect("bash runs");
            assert!(status.success(), "{} failed", script.display());
            out.join("busybox.tar")
        })
        .clone()
}
