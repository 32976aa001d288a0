//! Bind mounts of host paths: the host directories shared into the guest over virtio-fs, and
//! how a host path becomes a guest path inside one of them.
//!
//! Every shared root is one virtio-fs device (one `virtiofsd` under the qemu backend) with its
//! own tag; the agent mounts tag `<tag>` at `/run/berth/shares/<tag>`. A bind source
//! `/home/u/src` under the shared root `/home/u` is then `/run/berth/shares/<tag>/src` in the
//! guest, which the container's mount binds.

use std::path::{Component, Path, PathBuf};

use agent_protocol::Share;
use thiserror::Error;

use crate::vm::VmShare;
use crate::ErrorKind;

/// Where the agent mounts the shares in the guest.
pub const GUEST_SHARES_DIR: &str = "/run/berth/shares";

/// Where the guest mounts `share`.
pub fn guest_mount_point(share: &VmShare) -> PathBuf {
    PathBuf::from(GUEST_SHARES_DIR).join(&share.tag)
}

/// The shares as the agent mounts them.
pub fn guest_shares(shares: &[VmShare]) -> Vec<Share> {
    shares
        .iter()
        .map(|share| Share {
            tag: share.tag.clone(),
            mount_point: guest_mount_point(share),
        })
        .collect()
}

/// Creates a missing `-v` bind source directory (with its parents) as dockerd does, owned by
/// the share's owner, but only under a shared root: outside one, nothing is created and
/// [`resolve_source`] refuses the path.
pub fn create_missing_source(source: &str, shares: &[VmShare]) -> Result<(), BindError> {
    let cleaned = clean(Path::new(source));
    let Some(share) = shares.iter().find(|s| cleaned.starts_with(&s.host_dir)) else {
        return Ok(());
    };
    if std::fs::symlink_metadata(&cleaned).is_ok() {
        return Ok(());
    }
    // The first missing ancestor: everything from it down is ours to create and chown.
    let mut first_new = cleaned.clone();
    while let Some(parent) = first_new.parent() {
        if parent.exists() || parent == share.host_dir {
            break;
        }
        first_new = parent.to_path_buf();
    }
    std::fs::create_dir_all(&cleaned).map_err(|source| BindError::Io {
        path: cleaned.display().to_string(),
        source,
    })?;
    let (uid, gid) = share.owner;
    let mut dir = cleaned.clone();
    loop {
        // Best effort: an unprivileged berthd creates them as its own user anyway.
        let _ = std::os::unix::fs::chown(&dir, Some(uid), Some(gid));
        if dir == first_new {
            break;
        }
        match dir.parent() {
            Some(parent) => dir = parent.to_path_buf(),
            None => break,
        }
    }
    Ok(())
}

/// The guest path of a host path inside a share, or `None` outside every share. The path is
/// taken as it is (the watcher reports canonical paths under canonical share roots).
pub fn guest_path(host: &Path, shares: &[VmShare]) -> Option<PathBuf> {
    let share = shares
        .iter()
        .filter(|s| host.starts_with(&s.host_dir))
        .max_by_key(|s| s.host_dir.as_os_str().len())?;
    let relative = host.strip_prefix(&share.host_dir).ok()?;
    Some(guest_mount_point(share).join(relative))
}

/// Why a bind source cannot be mounted.
#[derive(Debug, Error)]
pub enum BindError {
    #[error("invalid mount config for type \"bind\": bind source path does not exist: {0}")]
    Missing(String),
    #[error("Mounts denied: the path {path} is not shared from the host and is not known to Berth. Share it (or a parent) with berthd --share or BERTH_SHARES; shared now: {shared}")]
    NotShared { path: String, shared: String },
    #[error("invalid mount config for type \"bind\": cannot resolve {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl BindError {
    /// Every bind error is the client's.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Missing(_) | Self::NotShared { .. } => ErrorKind::InvalidArgument,
            Self::Io { .. } => ErrorKind::Internal,
        }
    }
}

/// `path` with `.` and `..` resolved lexically (as Go's `filepath.Clean`, which dockerd applies
/// to bind sources); `..` at the root stays at the root.
pub fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The guest path of the host path `source` for a bind mount, refusing sources that do not
/// exist or are not under a shared root. Symlinks on the way are resolved on the host first
/// (`/tmp/link -> /etc` is `/etc`, which is not shared): the guest only ever sees a share's
/// own tree.
pub fn resolve_source(source: &str, shares: &[VmShare]) -> Result<PathBuf, BindError> {
    let cleaned = clean(Path::new(source));
    let not_shared = |path: &Path| BindError::NotShared {
        path: path.display().to_string(),
        shared: if shares.is_empty() {
            "nothing".to_owned()
        } else {
            shares
                .iter()
                .map(|s| s.host_dir.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        },
    };
    if !shares.iter().any(|s| cleaned.starts_with(&s.host_dir)) {
        return Err(not_shared(&cleaned));
    }
    let real = match std::fs::canonicalize(&cleaned) {
        Ok(real) => real,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BindError::Missing(cleaned.display().to_string()))
        }
        Err(source) => {
            return Err(BindError::Io {
                path: cleaned.display().to_string(),
                source,
            })
        }
    };
    let share = shares
        .iter()
        .filter(|s| real.starts_with(&s.host_dir))
        .max_by_key(|s| s.host_dir.as_os_str().len())
        .ok_or_else(|| not_shared(&real))?;
    let relative = real
        .strip_prefix(&share.host_dir)
        .expect("the share was chosen because it is a prefix");
    Ok(guest_mount_point(share).join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(dir: &Path) -> VmShare {
        VmShare {
            tag: "s0".into(),
            host_dir: std::fs::canonicalize(dir).unwrap(),
            owner: (0, 0),
        }
    }

    #[test]
    fn clean_dot_dot_is_resolved_lexically() {
        assert_eq!(
            clean(Path::new("/tmp/a/../../etc/./x")),
            Path::new("/etc/x")
        );
    }

    #[test]
    fn resolve_source_inside_share_maps_to_guest_mount() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let shares = [share(dir.path())];

        let guest = resolve_source(&dir.path().join("src").display().to_string(), &shares).unwrap();

        assert_eq!(guest, Path::new("/run/berth/shares/s0/src"));
    }

    #[test]
    fn resolve_source_dot_dot_escaping_the_share_is_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let shares = [share(dir.path())];
        let escape = format!("{}/../../etc", shares[0].host_dir.display());

        let error = resolve_source(&escape, &shares).unwrap_err();

        assert!(matches!(error, BindError::NotShared { .. }), "{error}");
        assert!(error.to_string().contains("BERTH_SHARES"));
    }

    #[test]
    fn resolve_source_symlink_out_of_the_share_is_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("out")).unwrap();
        let shares = [share(dir.path())];

        let error =
            resolve_source(&dir.path().join("out").display().to_string(), &shares).unwrap_err();

        assert!(matches!(error, BindError::NotShared { .. }), "{error}");
    }

    #[test]
    fn create_missing_source_inside_share_creates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let shares = [share(dir.path())];
        let wanted = shares[0].host_dir.join("new/deeper");

        create_missing_source(&wanted.display().to_string(), &shares).unwrap();

        assert!(wanted.is_dir());
    }

    #[test]
    fn create_missing_source_outside_shares_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let shares = [share(dir.path())];
        let outside = other.path().join("not-created");

        create_missing_source(&outside.display().to_string(), &shares).unwrap();

        assert!(!outside.exists());
    }

    #[test]
    fn resolve_source_missing_path_has_dockerd_message() {
        let dir = tempfile::tempdir().unwrap();
        let shares = [share(dir.path())];
        let missing = dir.path().join("nope").display().to_string();

        let error = resolve_source(&missing, &shares).unwrap_err();

        assert!(error.to_string().starts_with(
            "invalid mount config for type \"bind\": bind source path does not exist"
        ));
    }
}
