//! The guest's data disk: a sparse raw file on the host holding an ext4 filesystem, attached
//! to the VM as its first virtio-blk device.
//!
//! It holds the unpacked image layers, the containers' writable layers and the named volumes,
//! so all of them survive VM restarts and berthd restarts. The file is created sparse (it
//! allocates only what the guest writes) and formatted on the host with `mkfs.ext4` the first
//! time, into a temporary name renamed into place, so a disk file that exists is always a
//! formatted one. The guest mounts it with `discard` and QEMU passes discards through
//! (`discard=unmap`), so deleting data in the guest punches holes back into the file.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::VmError;

/// The default size of a new data disk: a ceiling, not an allocation (the file is sparse).
pub const DEFAULT_DISK_BYTES: u64 = 64 << 30;
/// The smallest disk accepted: ext4's journal and metadata need room.
pub const MIN_DISK_BYTES: u64 = 64 << 20;

/// A data disk file and the size to create it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDisk {
    /// The raw disk image on the host.
    pub path: PathBuf,
    /// The size of a new disk, in bytes. An existing disk keeps its size.
    pub size_bytes: u64,
}

impl DataDisk {
    /// Creates and formats the disk if it does not exist yet.
    pub fn ensure(&self) -> Result<(), VmError> {
        if self.path.is_file() {
            return Ok(());
        }
        if self.size_bytes < MIN_DISK_BYTES {
            return Err(VmError::DiskTooSmall {
                bytes: self.size_bytes,
                min: MIN_DISK_BYTES,
            });
        }
        let disk_error = |source| VmError::Disk {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(disk_error)?;
        }
        let mut partial = self.path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        File::create(&partial)
            .and_then(|file| file.set_len(self.size_bytes))
            .map_err(disk_error)?;
        if let Err(e) = format_ext4(&partial) {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        fs::rename(&partial, &self.path).map_err(disk_error)
    }

    /// Bytes the disk file occupies on the host (its allocated blocks, not its length).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(fs::metadata(&self.path)?.blocks() * 512)
    }
}

/// Formats `path` as ext4 without touching its blocks: lazy inode table and journal init keep
/// the file sparse, and `nodiscard` skips the pointless discard of a file that is all holes.
fn format_ext4(path: &Path) -> Result<(), VmError> {
    let output = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "berth-data",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ])
        .arg(path)
        .output()
        .map_err(|source| VmError::Spawn {
            program: "mkfs.ext4".into(),
            hint: if source.kind() == io::ErrorKind::NotFound {
                "install the e2fsprogs package".into()
            } else {
                "cannot run it".into()
            },
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(VmError::Format {
            path: path.to_owned(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_mkfs() -> bool {
        Command::new("mkfs.ext4").arg("-V").output().is_ok()
    }

    #[test]
    fn ensure_new_disk_is_sparse_ext4_of_the_asked_size() {
        if !has_mkfs() {
            eprintln!("skipped: mkfs.ext4 is not installed (e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = DataDisk {
            path: dir.path().join("data.raw"),
            size_bytes: 1 << 30,
        };

        disk.ensure().unwrap();

        let meta = fs::metadata(&disk.path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        // Sparse: the metadata mkfs writes is a small fraction of the size.
        assert!(disk.allocated_bytes().unwrap() < 64 << 20);
        // The ext4 superblock magic 0xEF53 sits at byte 1024 + 56.
        let bytes = fs::read(&disk.path)
            .map(|b| b[1080..1082].to_vec())
            .unwrap();
        assert_eq!(bytes, [0x53, 0xEF]);
    }

    #[test]
    fn ensure_existing_disk_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.raw");
        fs::write(&path, b"kept").unwrap();

        DataDisk {
            path: path.clone(),
            size_bytes: 1 << 30,
        }
        .ensure()
        .unwrap();

        assert_eq!(fs::read(&path).unwrap(), b"kept");
    }

    #[test]
    fn ensure_too_small_is_refused_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DataDisk {
            path: dir.path().join("data.raw"),
            size_bytes: 1 << 20,
        };

        let result = disk.ensure();

        assert!(matches!(result, Err(VmError::DiskTooSmall { .. })));
        assert!(!disk.path.exists());
    }
}
