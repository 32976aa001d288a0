//! Containers as berthd keeps them: the record on disk (what was asked, what state it is in),
//! and the in-memory parts of a live container (its output hub, its stdin, the watchers
//! waiting for it to exit).
//!
//! A container outlives the guest process that runs it. Each `start` creates the container in
//! the guest afresh over the same writable layer, and each exit deletes it there again; the
//! record, the log and the writable layer stay until `docker rm`.

pub mod io;
pub mod logs;
pub mod mounts;
pub mod names;
pub mod spec;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::containers::io::{OutputHub, StdinChannel};
use crate::containers::spec::ContainerSpec;
use crate::sync::lock;

/// Docker's zero time, which inspect shows for "never".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The states Docker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Created, never started.
    Created,
    /// Its init runs.
    Running,
    /// Frozen.
    Paused,
    /// Waiting to be started again by its restart policy.
    Restarting,
    /// Being removed.
    Removing,
    /// Its init ended.
    Exited,
    /// Could not be cleaned up.
    Dead,
}

impl Status {
    /// The lowercase name Docker uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Restarting => "restarting",
            Self::Removing => "removing",
            Self::Exited => "exited",
            Self::Dead => "dead",
        }
    }

    /// Whether a process of the container runs (paused counts).
    pub fn is_running(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// The state part of a record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    /// Where the container is in its life.
    pub status: Status,
    /// The exit code of the last run.
    pub exit_code: i32,
    /// Why the last run failed to start or ended abnormally.
    pub error: String,
    /// The last run was ended by the OOM killer.
    pub oom_killed: bool,
    /// When the last run started (RFC 3339).
    pub started_at: String,
    /// When the last run ended (RFC 3339).
    pub finished_at: String,
    /// The guest boot the last run was in.
    pub boot_id: String,
}

impl Default for ContainerState {
    fn default() -> Self {
        Self {
            status: Status::Created,
            exit_code: 0,
            error: String::new(),
            oom_killed: false,
            started_at: ZERO_TIME.to_owned(),
            finished_at: ZERO_TIME.to_owned(),
            boot_id: String::new(),
        }
    }
}

/// What is stored about a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// 64 hex characters.
    pub id: String,
    /// Its name, without Docker's leading `/`.
    pub name: String,
    /// When it was created (RFC 3339 with nanoseconds).
    pub created: String,
    /// The image id it was created from.
    pub image_id: String,
    /// What was asked.
    pub spec: ContainerSpec,
    /// Where it is in its life.
    pub state: ContainerState,
    /// How many times its restart policy started it again.
    pub restart_count: i64,
    /// The user stopped it (so its restart policy leaves it alone).
    #[serde(default)]
    pub stopped_by_user: bool,
    /// Its addresses and published ports while it runs; empty otherwise.
    #[serde(default)]
    pub network: crate::network::NetworkSettings,
}

/// A last exit, as waiters see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitReport {
    /// Increases with every exit, so a waiter can ask for the next one.
    pub sequence: u64,
    /// The exit code.
    pub code: i32,
    /// Why the run ended abnormally, if it did.
    pub error: Option<String>,
}

/// A container known to berthd: its record and what only lives while berthd runs.
#[derive(Debug)]
pub struct Container {
    /// The container id.
    pub id: String,
    /// Its directory on the host (record, log).
    pub dir: PathBuf,
    record: Mutex<ContainerRecord>,
    /// Where its output goes: the log and attached clients.
    pub hub: OutputHub,
    /// Where attached clients' input goes.
    pub stdin: StdinChannel,
    /// Serialises start, stop, restart and remove of this container.
    pub lifecycle: Arc<tokio::sync::Mutex<()>>,
    /// Its last exit.
    pub exits: watch::Sender<ExitReport>,
    /// Set once it has been removed.
    pub removed: watch::Sender<bool>,
}

/// The file holding a container's record.
const RECORD_FILE: &str = "config.json";

impl Container {
    /// A live container for `record`, kept under `dir`.
    pub fn new(record: ContainerRecord, dir: PathBuf) -> std::io::Result<Self> {
        let hub = OutputHub::open(&logs::log_path(&dir))?;
        let exit = ExitReport {
            sequence: 0,
            code: record.state.exit_code,
            error: (!record.state.error.is_empty()).then(|| record.state.error.clone()),
        };
        Ok(Self {
            id: record.id.clone(),
            dir,
            record: Mutex::new(record),
            hub,
            stdin: StdinChannel::new(),
            lifecycle: Arc::new(tokio::sync::Mutex::new(())),
            exits: watch::channel(exit).0,
            removed: watch::channel(false).0,
        })
    }

    /// A copy of the record as it is now.
    pub fn record(&self) -> ContainerRecord {
        lock(&self.record).clone()
    }

    /// Changes the record and writes it to disk.
    pub fn update<T>(&self, change: impl FnOnce(&mut ContainerRecord) -> T) -> std::io::Result<T> {
        let mut record = lock(&self.record);
        let result = change(&mut record);
        write_record(&self.dir, &record)?;
        Ok(result)
    }

    /// The current status.
    pub fn status(&self) -> Status {
        lock(&self.record).state.status
    }
}

/// Writes `record` to `dir` atomically (a temporary file renamed over the old one).
pub fn write_record(dir: &Path, record: &ContainerRecord) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let temp = dir.join(format!("{RECORD_FILE}.tmp"));
    fs::write(&temp, json)?;
    fs::rename(&temp, dir.join(RECORD_FILE))
}

/// Reads every record under `root` (one directory per container). Unreadable ones are
/// reported and skipped, never deleted.
pub fn read_records(root: &Path) -> std::io::Result<Vec<(ContainerRecord, PathBuf)>> {
    let entries = match fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    for entry in entries {
        let dir = entry?.path();
        let path = dir.join(RECORD_FILE);
        let parsed = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(record) => records.push((record, dir)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable container record")
            }
        }
    }
    Ok(records)
}

/// A new random container or exec id: 64 hex characters.
pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    // The kernel's CSPRNG does not fail once booted; a failure here is a broken host.
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    hex::encode(bytes)
}

/// Now, in RFC 3339 with nanoseconds, as Docker writes times.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            name: "web".into(),
            created: now_rfc3339(),
            image_id: "sha256:abc".into(),
            spec: ContainerSpec::default(),
            state: ContainerState::default(),
            restart_count: 0,
            stopped_by_user: false,
            network: Default::default(),
        }
    }

    #[test]
    fn write_record_read_records_round_trips() {
        let root = tempfile::tempdir().unwrap();
        let written = record("c1");

        write_record(&root.path().join("c1"), &written).unwrap();

        let read = read_records(root.path()).unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].0, written);
    }

    #[test]
    fn read_records_corrupt_record_is_skipped_and_kept() {
        let root = tempfile::tempdir().unwrap();
        write_record(&root.path().join("good"), &record("good")).unwrap();
        fs::create_dir(root.path().join("bad")).unwrap();
        fs::write(root.path().join("bad").join(RECORD_FILE), b"{not json").unwrap();

        let read = read_records(root.path()).unwrap();

        assert_eq!(read.len(), 1);
        assert!(root.path().join("bad").join(RECORD_FILE).exists());
    }

    #[test]
    fn new_id_is_64_hex() {
        let id = new_id();

        assert_eq!(id.len(), 64);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
