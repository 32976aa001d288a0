//! A container's cgroup v2 directory: creation under a configurable parent, limits translated
//! from the OCI `LinuxResources` (memory.max, memory.swap.max, cpu.max, cpu.weight, pids.max),
//! the freezer, the process list, OOM-kill counting, statistics, and removal.
//!
//! Everything is a file under one directory, so the translation and parsing are unit-tested
//! against a temporary directory without root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors from cgroup operations.
#[derive(Debug, Error)]
pub enum CgroupError {
    /// A cgroup file or directory could not be read or written.
    #[error("cannot {op} {path}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A controller needed for the requested limits is not enabled for the parent.
    #[error("cgroup controller {controller} is not available under {parent}")]
    MissingController {
        /// The controller.
        controller: String,
        /// The parent cgroup.
        parent: PathBuf,
    },
    /// The cgroup did not reach the requested state in time.
    #[error("cgroup {path} did not become {state} in time")]
    Timeout {
        /// The cgroup.
        path: PathBuf,
        /// The awaited state.
        state: &'static str,
    },
    /// A limit is out of range.
    #[error("invalid resource limit: {0}")]
    InvalidLimit(String),
}

/// Where container cgroups live.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupConfig {
    /// The cgroup v2 mount point (`/sys/fs/cgroup` in the guest).
    pub root: PathBuf,
    /// The parent of all container cgroups, relative to `root` (for example `berth`).
    pub parent: PathBuf,
}

impl Default for CgroupConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/sys/fs/cgroup"),
            parent: PathBuf::from("berth"),
        }
    }
}

/// The cgroup files a set of resources turns into, in the order they are written.
pub fn resource_files(
    resources: &LinuxResources,
) -> Result<Vec<(&'static str, String)>, CgroupError> {
    let mut files = Vec::new();
    if let Some(memory) = resources.memory() {
        if let Some(limit) = memory.limit() {
            files.push(("memory.max", limit_value(limit)));
            // OCI's swap is memory+swap; cgroup v2 counts swap alone.
            if let Some(swap) = memory.swap() {
                let value = if swap < 0 {
                    "max".to_string()
                } else if limit < 0 {
                    return Err(CgroupError::InvalidLimit(
                        "swap limit without memory limit".into(),
                    ));
                } else if swap < limit {
                    return Err(CgroupError::InvalidLimit(format!(
                        "memory+swap {swap} is below memory {limit}"
                    )));
                } else {
                    (swap - limit).to_string()
                };
                files.push(("memory.swap.max", value));
            }
        }
        if let Some(reservation) = memory.reservation() {
            files.push(("memory.low", limit_value(reservation)));
        }
    }
    if let Some(cpu) = resources.cpu() {
        if let Some(shares) = cpu.shares() {
            files.push(("cpu.weight", shares_to_weight(shares).to_string()));
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().unwrap_or(100_000);
            let quota = match cpu.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            files.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(cpus) = cpu.cpus() {
            files.push(("cpuset.cpus", cpus.clone()));
        }
    }
    if let Some(pids) = resources.pids() {
        files.push(("pids.max", limit_value(pids.limit())));
    }
    // Raw `unified` entries are written by `Cgroup::apply`; their names must stay in the
    // cgroup directory.
    if let Some(unified) = resources.unified() {
        if let Some(key) = unified
            .keys()
            .find(|k| k.contains('/') || k.starts_with('.') || k.is_empty())
        {
            return Err(CgroupError::InvalidLimit(format!("unified key {key:?}")));
        }
    }
    Ok(files)
}

fn limit_value(limit: i64) -> String {
    if limit <= 0 {
        "max".to_string()
    } else {
        limit.to_string()
    }
}

/// Converts cgroup v1 CPU shares (2..=262144, Docker's `--cpu-shares`) to a v2 weight
/// (1..=10000) with the formula runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Converts Docker's `--cpus` (a fraction of CPUs) to an OCI quota and period.
pub fn cpus_to_quota(cpus: f64) -> (i64, u64) {
    const PERIOD: u64 = 100_000;
    ((cpus * PERIOD as f64).round() as i64, PERIOD)
}

/// Resource usage read from the cgroup files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    /// `cpu.stat` (usage_usec, user_usec, system_usec, nr_throttled, ...).
    pub cpu: HashMap<String, u64>,
    /// `memory.current`.
    pub memory_current: Option<u64>,
    /// `memory.max`, `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// `memory.stat`.
    pub memory_stat: HashMap<String, u64>,
    /// `pids.current`.
    pub pids_current: Option<u64>,
    /// `pids.max`, `None` when unlimited.
    pub pids_limit: Option<u64>,
    /// `io.stat`, per device `major:minor`, its counters (rbytes, wbytes, rios, wios, ...).
    pub io: HashMap<String, HashMap<String, u64>>,
}

/// One container's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// A handle on an existing (or to be created) cgroup directory.
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    /// Creates `<root>/<parent>/<id>`, enabling the controllers the limits need in the parents.
    pub fn create(config: &CgroupConfig, id: &str) -> Result<Self, CgroupError> {
        let parent = config.root.join(&config.parent);
        create_dir(&parent)?;
        // Every level from the root down to the parent must delegate the controllers.
        let mut level = config.root.clone();
        enable_controllers(&level)?;
        for component in config.parent.components() {
            level.push(component);
            enable_controllers(&level)?;
        }
        let cgroup = Self::at(parent.join(id));
        create_dir(&cgroup.path)?;
        Ok(cgroup)
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the limits.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        for (file, value) in resource_files(resources)? {
            let path = self.path.join(file);
            if file == "memory.swap.max" && !path.exists() && self.path.join("memory.max").exists()
            {
                // No swap accounting in this kernel: Docker discards the swap limit too.
                continue;
            }
            if !path.exists() {
                let controller = file.split('.').next().unwrap_or(file).to_string();
                return Err(CgroupError::MissingController {
                    controller,
                    parent: self.path.parent().unwrap_or(&self.path).to_path_buf(),
                });
            }
            self.write(file, &value)?;
        }
        if let Some(unified) = resources.unified() {
            for (key, value) in unified {
                self.write(key, value)?;
            }
        }
        Ok(())
    }

    /// Moves a process into the cgroup.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The processes in the cgroup (host pids).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        Ok(self
            .read("cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// How many times the OOM killer killed a process of this cgroup.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let events = match self.read("memory.events") {
            Ok(events) => events,
            Err(CgroupError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(0)
            }
            Err(e) => return Err(e),
        };
        Ok(parse_flat_keyed(&events)
            .get("oom_kill")
            .copied()
            .unwrap_or(0))
    }

    /// Freezes (`true`) or thaws the cgroup and waits until the kernel reports it done.
    pub fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        self.write("cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { 1 } else { 0 };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = self.read("cgroup.events")?;
            if parse_flat_keyed(&events).get("frozen") == Some(&want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::Timeout {
                    path: self.path.clone(),
                    state: if frozen { "frozen" } else { "thawed" },
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the cgroup is frozen.
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        Ok(self.read("cgroup.freeze")?.trim() == "1")
    }

    /// Reads the statistics files that exist.
    pub fn stats(&self) -> CgroupStats {
        let read = |file: &str| self.read(file).ok();
        CgroupStats {
            cpu: read("cpu.stat")
                .map(|s| parse_flat_keyed(&s))
                .unwrap_or_default(),
            memory_current: read("memory.current").and_then(|s| s.trim().parse().ok()),
            memory_limit: read("memory.max").and_then(|s| s.trim().parse().ok()),
            memory_stat: read("memory.stat")
                .map(|s| parse_flat_keyed(&s))
                .unwrap_or_default(),
            pids_current: read("pids.current").and_then(|s| s.trim().parse().ok()),
            pids_limit: read("pids.max").and_then(|s| s.trim().parse().ok()),
            io: read("io.stat")
                .map(|s| parse_io_stat(&s))
                .unwrap_or_default(),
        }
    }

    /// Kills every process in the cgroup (`cgroup.kill` where the kernel has it).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        if self.path.join("cgroup.kill").exists() {
            return self.write("cgroup.kill", "1");
        }
        // Thaw first: a frozen process cannot die.
        let _ = self.set_frozen(false);
        for pid in self.pids()? {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Ok(())
    }

    /// Removes the cgroup, waiting for its processes to be gone (up to `timeout`).
    pub fn remove(&self, timeout: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(CgroupError::Io {
                        op: "remove",
                        path: self.path.clone(),
                        source: e,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn read(&self, file: &str) -> Result<String, CgroupError> {
        let path = self.path.join(file);
        std::fs::read_to_string(&path).map_err(|source| CgroupError::Io {
            op: "read",
            path,
            source,
        })
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.path.join(file);
        std::fs::write(&path, value).map_err(|source| CgroupError::Io {
            op: "write",
            path,
            source,
        })
    }
}

fn create_dir(path: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(path).map_err(|source| CgroupError::Io {
        op: "create",
        path: path.to_path_buf(),
        source,
    })
}

/// Enables in `dir`'s `cgroup.subtree_control` every controller `dir` has. Controllers that
/// cannot be enabled (for example because `dir` has processes of its own) are left off; the
/// limits that need them then fail with [`CgroupError::MissingController`].
fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in available.split_whitespace() {
        if enabled.split_whitespace().any(|c| c == controller) {
            continue;
        }
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
    }
    Ok(())
}

/// Parses "key value" lines (cpu.stat, memory.stat, memory.events, cgroup.events).
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let key = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// Parses io.stat: "8:0 rbytes=1 wbytes=2 ..." per line.
pub fn parse_io_stat(text: &str) -> HashMap<String, HashMap<String, u64>> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let device = parts.next()?.to_string();
            let counters = parts
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            Some((device, counters))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    };

    fn resources(memory: i64, swap: i64, quota: i64, shares: u64, pids: i64) -> LinuxResources {
        LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(memory)
                    .swap(swap)
                    .build()
                    .expect("memory"),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .quota(quota)
                    .period(100_000u64)
                    .shares(shares)
                    .build()
                    .expect("cpu"),
            )
            .pids(
                LinuxPidsBuilder::default()
                    .limit(pids)
                    .build()
                    .expect("pids"),
            )
            .build()
            .expect("resources")
    }

    #[test]
    fn resource_files_docker_limits_translated() {
        let files =
            resource_files(&resources(64 << 20, 128 << 20, 150_000, 1024, 100)).expect("valid");

        assert_eq!(
            files,
            vec![
                ("memory.max", (64u64 << 20).to_string()),
                ("memory.swap.max", (64u64 << 20).to_string()),
                ("cpu.weight", "39".to_string()),
                ("cpu.max", "150000 100000".to_string()),
                ("pids.max", "100".to_string()),
            ]
        );
    }

    #[test]
    fn resource_files_unlimited_swap_is_max() {
        let files = resource_files(&resources(1 << 20, -1, 0, 2, -1)).expect("valid");

        assert!(files.contains(&("memory.swap.max", "max".to_string())));
        assert!(files.contains(&("cpu.max", "max 100000".to_string())));
        assert!(files.contains(&("pids.max", "max".to_string())));
    }

    #[test]
    fn resource_files_swap_below_memory_refused() {
        assert!(resource_files(&resources(2 << 20, 1 << 20, 0, 2, 1)).is_err());
    }

    #[test]
    fn shares_to_weight_bounds_mapped() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }

    #[test]
    fn cpus_to_quota_fraction_scaled_to_period() {
        assert_eq!(cpus_to_quota(1.5), (150_000, 100_000));
    }

    #[test]
    fn apply_writes_files_in_cgroup_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in [
            "memory.max",
            "memory.swap.max",
            "cpu.weight",
            "cpu.max",
            "pids.max",
        ] {
            std::fs::write(dir.path().join(file), "").expect("seed");
        }
        let cgroup = Cgroup::at(dir.path().to_path_buf());

        cgroup
            .apply(&resources(1 << 20, 2 << 20, 50_000, 2, 10))
            .expect("apply");

        assert_eq!(
            std::fs::read_to_string(dir.path().join("pids.max")).expect("read"),
            "10"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cpu.max")).expect("read"),
            "50000 100000"
        );
    }

    #[test]
    fn apply_missing_controller_file_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroup = Cgroup::at(dir.path().to_path_buf());

        let err = cgroup
            .apply(&resources(1 << 20, 2 << 20, 0, 2, 10))
            .expect_err("missing");

        assert!(err.to_string().contains("memory"), "{err}");
    }

    #[test]
    fn apply_without_swap_accounting_skips_swap_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        for file in ["memory.max", "cpu.weight", "cpu.max", "pids.max"] {
            std::fs::write(dir.path().join(file), "").expect("seed");
        }
        let cgroup = Cgroup::at(dir.path().to_path_buf());

        cgroup
            .apply(&resources(1 << 20, 2 << 20, 50_000, 2, 10))
            .expect("apply");

        assert!(!dir.path().join("memory.swap.max").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory.max")).expect("read"),
            "1048576"
        );
    }

    #[test]
    fn oom_kills_counter_read_from_memory_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .expect("seed");

        assert_eq!(
            Cgroup::at(dir.path().to_path_buf())
                .oom_kills()
                .expect("read"),
            1
        );
    }

    #[test]
    fn stats_files_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cpu.stat"), "usage_usec 10\nuser_usec 7\n").expect("seed");
        std::fs::write(dir.path().join("memory.current"), "4096\n").expect("seed");
        std::fs::write(dir.path().join("memory.max"), "max\n").expect("seed");
        std::fs::write(dir.path().join("pids.current"), "3\n").expect("seed");
        std::fs::write(
            dir.path().join("io.stat"),
            "8:0 rbytes=5 wbytes=6 rios=1 wios=2\n",
        )
        .expect("seed");

        let stats = Cgroup::at(dir.path().to_path_buf()).stats();

        assert_eq!(stats.cpu.get("usage_usec"), Some(&10));
        assert_eq!(stats.memory_current, Some(4096));
        assert_eq!(stats.memory_limit, None);
        assert_eq!(stats.pids_current, Some(3));
        assert_eq!(stats.io["8:0"]["wbytes"], 6);
    }
}
