//! Storage messages: what the guest's data disk holds, how big it is, giving freed blocks back
//! to the host, and mounting the host's virtio-fs shares.
//!
//! The data disk (ext4 on virtio-blk, mounted at the agent's storage root) outlives the VM, so
//! the host cannot assume a fresh guest holds nothing: it asks with
//! [`crate::Request::ListStorage`] once per boot and reconciles (layers it need not upload
//! again, writable layers of containers it no longer knows).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Answer to [`crate::Request::ListStorage`]: the names of the entries below the storage root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageListing {
    /// Complete layer directories under `layers/` (chain id hex); partial unpacks are left out.
    pub layers: Vec<String>,
    /// Container directories under `containers/` (container ids).
    pub containers: Vec<String>,
    /// Volume directories under `volumes/` (volume names).
    pub volumes: Vec<String>,
    /// The filesystem holding the storage root.
    pub disk: DiskSpace,
}

/// Space on the filesystem of the storage root (`statvfs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpace {
    /// Size of the filesystem, in bytes.
    pub total_bytes: u64,
    /// Bytes free for unprivileged use.
    pub available_bytes: u64,
    /// Whether the storage root is a persistent data disk (false: the VM's tmpfs).
    pub persistent: bool,
}

/// Answer to [`crate::Request::MeasureDirs`]: the space used below each directory asked
/// about, in the order asked, in bytes of allocated blocks (`du`); 0 for a missing one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirSizes {
    /// One size per path.
    pub bytes: Vec<u64>,
}

/// One virtio-fs share of the host, as the guest mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The virtio-fs tag the host gave the device.
    pub tag: String,
    /// Where the agent mounts it in the guest (absolute, below `/run/berth/shares`).
    pub mount_point: PathBuf,
}

/// Body of [`crate::Request::MountShares`]: mount each share that is not mounted yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shares {
    /// The shares.
    pub shares: Vec<Share>,
}

/// Body of [`crate::Request::CopyUp`]: fill a fresh volume with what the image holds at the
/// path it is mounted on, as Docker does for a new volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyUp {
    /// Layer directories of the image, top-most first (as in an overlay's lower dirs).
    pub lower_dirs: Vec<PathBuf>,
    /// The mount's destination inside the container, absolute.
    pub container_path: PathBuf,
    /// The volume's data directory, below the storage root. Filled only if empty.
    pub volume_dir: PathBuf,
}

/// Body of [`crate::Request::Notify`]: files the host saw change in a shared directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChanges {
    /// Guest paths below a share's mount point.
    pub paths: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::{read_frame, write_frame, Request, RequestEnvelope, Response, ResponseEnvelope};

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, value).unwrap();
        read_frame(&mut Cursor::new(bytes)).unwrap().unwrap()
    }

    #[test]
    fn list_storage_response_round_trips() {
        let response = ResponseEnvelope {
            id: 9,
            result: Ok(Response::Storage(StorageListing {
                layers: vec!["ab".into()],
                containers: vec!["c1".into()],
                volumes: vec!["data".into()],
                disk: DiskSpace {
                    total_bytes: 1 << 30,
                    available_bytes: 1 << 29,
                    persistent: true,
                },
            })),
        };

        assert_eq!(round_trip(&response), response);
    }

    #[test]
    fn mount_shares_request_round_trips() {
        let request = RequestEnvelope {
            id: 3,
            request: Request::MountShares(Shares {
                shares: vec![Share {
                    tag: "share0".into(),
                    mount_point: "/run/berth/shares/share0".into(),
                }],
            }),
        };

        assert_eq!(round_trip(&request), request);
    }
}
