//! Named and anonymous volumes: records on the host, data on the guest's data disk.
//!
//! A volume is a record (`<data>/volumes/<name>.json`) and a directory in the guest
//! (`<storage>/volumes/<name>/_data`), created when a container using it starts. Removing a
//! volume removes its record and then its data in the guest (booting the VM if needed, so a
//! volume created again under the same name starts empty); data a failed removal left behind
//! goes at the next boot (the engine removes guest volume directories no record names).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::containers::now_rfc3339;
use crate::sync::lock;
use crate::ErrorKind;

/// The label dockerd puts on anonymous volumes (what `volume prune` removes by default).
pub const ANONYMOUS_LABEL: &str = "com.docker.volume.anonymous";

/// Why a volume operation failed.
#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("get {0}: no such volume")]
    NotFound(String),
    #[error("create {0}: \"{0}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path")]
    InvalidName(String),
    #[error("remove {name}: volume is in use - [{}]", .users.join(", "))]
    InUse { name: String, users: Vec<String> },
    #[error("create {name}: volume driver {driver:?} is not supported (only \"local\")")]
    Driver { name: String, driver: String },
    #[error("create {name}: driver options are not supported by the local driver of Berth")]
    Options { name: String },
    #[error("cannot {op} the volume record {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl VolumeError {
    /// The class of failure, for the API's status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::InvalidName(_) | Self::Driver { .. } | Self::Options { .. } => {
                ErrorKind::InvalidArgument
            }
            Self::InUse { .. } => ErrorKind::Conflict,
            Self::Io { .. } => ErrorKind::Internal,
        }
    }
}

/// One volume as recorded on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Its name.
    pub name: String,
    /// When it was created (RFC 3339).
    pub created: String,
    /// User labels (and dockerd's anonymous label).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl VolumeRecord {
    /// Whether the volume was made for a container rather than named by the user.
    pub fn is_anonymous(&self) -> bool {
        self.labels.contains_key(ANONYMOUS_LABEL)
    }
}

/// Checks a volume name the way dockerd's local driver does: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn validate_name(name: &str) -> Result<(), VolumeError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest: Vec<char> = chars.collect();
    let rest_ok = !rest.is_empty()
        && rest
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidName(name.to_owned()))
    }
}

/// The guest directory holding a volume's data.
pub fn guest_data_dir(storage_root: &Path, name: &str) -> PathBuf {
    guest_volume_dir(storage_root, name).join("_data")
}

/// The guest directory of a volume (what removal deletes).
pub fn guest_volume_dir(storage_root: &Path, name: &str) -> PathBuf {
    storage_root.join("volumes").join(name)
}

/// The volume records, one JSON file each.
#[derive(Debug)]
pub struct VolumeStore {
    root: PathBuf,
    volumes: Mutex<BTreeMap<String, VolumeRecord>>,
}

impl VolumeStore {
    /// Opens the records under `root`; unreadable ones are reported and skipped, never
    /// deleted.
    pub fn open(root: &Path) -> Result<Self, VolumeError> {
        let io_error = |op| {
            move |source| VolumeError::Io {
                op,
                path: root.to_owned(),
                source,
            }
        };
        fs::create_dir_all(root).map_err(io_error("create"))?;
        let mut volumes = BTreeMap::new();
        for entry in fs::read_dir(root).map_err(io_error("list"))? {
            let path = entry.map_err(io_error("list"))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let parsed = fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                serde_json::from_slice::<VolumeRecord>(&b).map_err(|e| e.to_string())
            });
            match parsed {
                Ok(record) => {
                    volumes.insert(record.name.clone(), record);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable volume record")
                }
            }
        }
        Ok(Self {
            root: root.to_owned(),
            volumes: Mutex::new(volumes),
        })
    }

    /// Every volume, by name.
    pub fn list(&self) -> Vec<VolumeRecord> {
        lock(&self.volumes).values().cloned().collect()
    }

    /// One volume.
    pub fn get(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        lock(&self.volumes)
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(name.to_owned()))
    }

    /// Creates a volume, or returns the existing one of that name (as dockerd does).
    pub fn create(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeRecord, VolumeError> {
        validate_name(name)?;
        let mut volumes = lock(&self.volumes);
        if let Some(existing) = volumes.get(name) {
            return Ok(existing.clone());
        }
        let record = VolumeRecord {
            name: name.to_owned(),
            created: now_rfc3339(),
            labels,
        };
        self.write(&record)?;
        volumes.insert(name.to_owned(), record.clone());
        Ok(record)
    }

    /// Creates an anonymous volume with a random name.
    pub fn create_anonymous(&self) -> Result<VolumeRecord, VolumeError> {
        let labels = BTreeMap::from([(ANONYMOUS_LABEL.to_owned(), String::new())]);
        self.create(&crate::containers::new_id(), labels)
    }

    /// Removes a volume's record. The caller has checked it is unused.
    pub fn remove(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        let mut volumes = lock(&self.volumes);
        let record = volumes
            .get(name)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound(name.to_owned()))?;
        let path = self.path(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VolumeError::Io {
                    op: "remove",
                    path,
                    source,
                })
            }
        }
        volumes.remove(name);
        Ok(record)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    fn write(&self, record: &VolumeRecord) -> Result<(), VolumeError> {
        let path = self.path(&record.name);
        let temp = self.root.join(format!("{}.json.tmp", record.name));
        let io_error = |op| {
            let path = path.clone();
            move |source| VolumeError::Io { op, path, source }
        };
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| io_error("encode")(io::Error::other(e)))?;
        fs::write(&temp, json).map_err(io_error("write"))?;
        fs::rename(&temp, &path).map_err(io_error("write"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_name_docker_style_names_pass() {
        for name in ["data", "my-vol_1.2", "a1", "0x"] {
            assert!(validate_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn validate_name_bad_names_fail_with_dockerd_message() {
        for name in ["a", "-x", "has space", "sl/ash", "..", "", "é1"] {
            let error = validate_name(name).unwrap_err();

            assert!(
                error.to_string().contains("includes invalid characters"),
                "{name}"
            );
        }
    }

    #[test]
    fn create_existing_name_returns_the_existing_volume() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();
        let first = store.create("data", BTreeMap::new()).unwrap();

        let second = store
            .create("data", BTreeMap::from([("x".into(), "y".into())]))
            .unwrap();

        assert_eq!(first, second);
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        VolumeStore::open(dir.path())
            .unwrap()
            .create("data", BTreeMap::new())
            .unwrap();

        let reopened = VolumeStore::open(dir.path()).unwrap();

        assert_eq!(reopened.get("data").unwrap().name, "data");
    }

    #[test]
    fn remove_missing_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();

        assert!(matches!(
            store.remove("gone"),
            Err(VolumeError::NotFound(_))
        ));
    }

    #[test]
    fn anonymous_volume_has_label_and_hex_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = VolumeStore::open(dir.path()).unwrap();

        let volume = store.create_anonymous().unwrap();

        assert!(volume.is_anonymous());
        assert_eq!(volume.name.len(), 64);
    }
}
