//! Fixtures shared by Berth's end-to-end scenarios.
//!
//! Scenarios that need something this machine may lack (the built kernel, QEMU, root) ask a
//! fixture first. The fixture says why it cannot run; a scenario then skips, except under CI
//! (`CI=true`), where a tier that cannot run is a failure, never a silent skip.

pub mod daemon;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use berth_engine::assets::Assets;
use berth_engine::{select_backend, VmBackend, VmConfig};

/// VMs under TCG are CPU-bound and the machines have two cores: one VM at a time per test
/// binary keeps boot times (and so timeouts) predictable.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// Whether this run is CI, where skipping is failing.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Reports that a scenario cannot run here: a failure under CI, a printed skip elsewhere.
/// Returns so the caller can `return` after it.
pub fn skip(reason: &str) {
    assert!(!under_ci(), "CI=true and this test cannot run: {reason}");
    eprintln!("SKIPPED: {reason}");
}

/// Output bytes as text, for assertions and messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts a [`daemon::TestDaemon`] on the calling test crate's `berthd`, or returns from the
/// calling test after [`skip`] says why it cannot run here.
#[macro_export]
macro_rules! daemon_or_skip {
    () => {
        match $crate::daemon::TestDaemon::start(std::path::Path::new(env!("CARGO_BIN_EXE_berthd")))
        {
            Ok(daemon) => daemon,
            Err(reason) => return $crate::skip(&reason),
        }
    };
}

/// What a VM scenario needs: the built assets, the backend for this host, and a private
/// state directory. Holding it serializes VM scenarios in one test binary.
#[derive(Debug)]
pub struct TestVm {
    /// The kernel and initramfs under test.
    pub assets: Assets,
    /// The backend chosen for this host.
    pub backend: Box<dyn VmBackend + Send + Sync>,
    /// Scratch space; the VM's state directory is inside it.
    pub dir: tempfile::TempDir,
    _lock: MutexGuard<'static, ()>,
}

impl TestVm {
    /// Whether the built kernel and initramfs are there, or what is missing.
    pub fn assets_available() -> Result<Assets, String> {
        let assets = Assets::in_dir(Self::assets_dir());
        for path in [&assets.kernel, &assets.initramfs] {
            if !path.is_file() {
                return Err(format!(
                    "{} is missing: run kernel-config/build.sh and vm-image/build.sh",
                    path.display()
                ));
            }
        }
        Ok(assets)
    }

    /// The fixture, or why it cannot be had here.
    pub fn new() -> Result<Self, String> {
        let assets = Self::assets_available()?;
        let lock = VM_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let backend = select_backend().backend;
        if let Some(missing) = backend.programs().into_iter().find(|p| !p.is_file()) {
            return Err(format!(
                "{} is missing: run `cargo build -p berth-vmm` (berth-vsock, berth-vmm) or \
                 install QEMU (tests/install-deps.sh)",
                missing.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-test-vm-")
            .tempdir()
            .map_err(|e| format!("cannot create a temp dir: {e}"))?;
        Ok(Self {
            assets,
            backend,
            dir,
            _lock: lock,
        })
    }

    /// The assets directory the fixture uses, for child processes (`BERTH_ASSETS_DIR`).
    /// `BERTH_ASSETS_DIR`, else `target/berth` in this workspace, where the build scripts
    /// put the kernel and initramfs.
    pub fn assets_dir() -> PathBuf {
        std::env::var_os("BERTH_ASSETS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/berth"))
    }

    /// A VM config for this fixture's assets and state directory.
    pub fn config(&self) -> VmConfig {
        VmConfig {
            kernel: self.assets.kernel.clone(),
            initramfs: self.assets.initramfs.clone(),
            memory_mib: 512,
            vcpus: 2,
            state_dir: self.state_dir(),
            boot_timeout: boot_timeout(),
            extra_cmdline: Vec::new(),
            data_disk: None,
            shares: Vec::new(),
        }
    }

    /// The VM's state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("vm")
    }
}

/// How long a scenario's VM may take to boot: 120 s, or `BERTH_TEST_BOOT_TIMEOUT` seconds (the
/// KVM box raises it: there the guest runs under nested virtualization emulated by TCG).
pub fn boot_timeout() -> Duration {
    std::env::var("BERTH_TEST_BOOT_TIMEOUT")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs)
}

/// Pids of every process on the host whose command line mentions `marker`.
pub fn processes_mentioning(marker: &Path) -> Vec<(u32, String)> {
    let marker = marker.to_string_lossy();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter_map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(marker.as_ref()).then_some((pid, cmdline))
        })
        .collect()
}
