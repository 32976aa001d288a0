//! Path requests: what `docker cp` and `docker export` ask of a container's filesystem.
//!
//! A path is always resolved inside the container's root, with symbolic links followed in that
//! root's scope (never out of it). A running container is seen as its processes see it (with
//! its mounts); a stopped one through its overlay, which the agent mounts for the request
//! alone, from the [`StoppedRoot`] the host sends along.
//!
//! Archives never travel on the control connection: [`crate::Request::ReadArchive`] writes a
//! tar to a [`crate::StreamKind::ArchiveDownload`] stream and [`crate::Request::WriteArchive`]
//! reads one from a [`crate::StreamKind::ArchiveUpload`] stream, each opened by the host under
//! the name the request carries.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::OverlayDirs;

/// A path in a container's filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPath {
    /// The container id.
    pub container_id: String,
    /// An absolute path in the container. A trailing `/` or `/.` asks for its last element to
    /// be followed if it is a symbolic link, as in Docker.
    pub path: String,
    /// How to assemble the root if the container does not run in the guest.
    #[serde(default)]
    pub stopped_root: Option<StoppedRoot>,
}

/// A stopped container's root: the overlay mounted at `rootfs` for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoppedRoot {
    /// An existing directory below the agent's storage root.
    pub rootfs: PathBuf,
    /// The container's layers, every directory below the agent's storage root.
    pub overlay: OverlayDirs,
}

/// What a path is, as `lstat` sees it (answer to [`crate::Request::StatPath`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathStat {
    /// The last element of the requested path (`/` for the root).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `st_mode`: file type and permission bits, as Linux gives them.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_unix_nanos: i64,
    /// For a symbolic link, the absolute path it resolves to in the container; else empty.
    #[serde(default)]
    pub link_target: String,
}

/// Body of [`crate::Request::ReadArchive`]: write a tar of a path to a download stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadArchive {
    /// What to archive.
    pub target: ContainerPath,
    /// The name the host opened the [`crate::StreamKind::ArchiveDownload`] stream under.
    pub stream_id: String,
    /// `docker export`: the whole root, entries named relative to it, and nothing below
    /// another filesystem mounted in the container.
    #[serde(default)]
    pub export: bool,
}

/// Body of [`crate::Request::WriteArchive`]: extract an uploaded tar into a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteArchive {
    /// The directory to extract into (symbolic links followed, the last element too).
    pub target: ContainerPath,
    /// The name the host opened the [`crate::StreamKind::ArchiveUpload`] stream under.
    pub stream_id: String,
    /// Refuse to replace a directory with a non-directory or the other way round.
    #[serde(default)]
    pub no_overwrite_dir_non_dir: bool,
    /// A user (`name`, `uid`, `uid:gid`, ...) resolved in the container's `/etc/passwd` and
    /// `/etc/group` whose ids every extracted entry gets; `None` keeps the archive's owners.
    #[serde(default)]
    pub owner: Option<String>,
}

/// Body of [`crate::Request::DiffLayer`]: write a container's writable layer as an image
/// layer (changeset with whiteouts) to a download stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffLayer {
    /// The overlay upper directory, below the agent's storage root.
    pub upper_dir: PathBuf,
    /// The name the host opened the [`crate::StreamKind::ArchiveDownload`] stream under.
    pub stream_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, RequestEnvelope};

    #[test]
    fn write_archive_round_trips_and_defaults_its_options() {
        let json = br#"{"id":3,"request":{"type":"WriteArchive","body":{
            "target":{"container_id":"c1","path":"/tmp"},"stream_id":"up-1"}}}"#;

        let envelope: RequestEnvelope = serde_json::from_slice(json).unwrap();

        assert_eq!(
            envelope.request,
            Request::WriteArchive(WriteArchive {
                target: ContainerPath {
                    container_id: "c1".into(),
                    path: "/tmp".into(),
                    stopped_root: None,
                },
                stream_id: "up-1".into(),
                no_overwrite_dir_non_dir: false,
                owner: None,
            })
        );
        let again: RequestEnvelope =
            serde_json::from_slice(&serde_json::to_vec(&envelope).unwrap()).unwrap();
        assert_eq!(again, envelope);
    }
}
