//! The container configuration: an OCI runtime [`Spec`] plus what the spec leaves to the
//! runtime's caller (the overlay layers, the cgroup parent, the `/etc` files, the seccomp
//! profile), and [`docker_default_spec`], a spec with Docker's defaults to start from.
//!
//! Fields of the spec this runtime honours: `process` (args, env, cwd, terminal, console size,
//! user with `username` resolved in the image Docker-style, capabilities, no_new_privileges),
//! `hostname`, `mounts`, `root.readonly`, and in `linux`: `namespaces` (with `path` to join an
//! existing one), `resources`, `masked_paths`, `readonly_paths`. The spec's `linux.seccomp` is
//! not interpreted: [`SeccompProfile`] chooses the built-in profile or none.

use std::path::PathBuf;

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cgroup::CgroupConfig;
use crate::mounts::{OverlayConfig, RootfsPlan};

/// Errors in a container configuration.
#[derive(Debug, Error)]
pub enum SpecError {
    /// The id cannot name a cgroup directory.
    #[error(
        "invalid container id {0:?}: use 1-64 characters of [A-Za-z0-9_.-], not starting with '.'"
    )]
    InvalidId(String),
    /// The spec has no process.
    #[error("the spec has no process")]
    NoProcess,
    /// The process has no arguments.
    #[error("the process has no arguments")]
    NoArgs,
    /// A user namespace was requested; this runtime does not map ids.
    #[error("user namespaces are not supported")]
    UserNamespace,
}

/// Which seccomp filter the container's processes get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompProfile {
    /// The built-in profile of [`crate::seccomp`] (Docker's default denials).
    #[default]
    Default,
    /// No filter (`--security-opt seccomp=unconfined`).
    Unconfined,
}

/// Host files bind-mounted over the container's `/etc` files (Docker writes these per
/// container). Each is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcFiles {
    /// Mounted at `/etc/hostname`.
    pub hostname: Option<PathBuf>,
    /// Mounted at `/etc/hosts`.
    pub hosts: Option<PathBuf>,
    /// Mounted at `/etc/resolv.conf`.
    pub resolv_conf: Option<PathBuf>,
}

/// Everything needed to create one container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerConfig {
    /// The container id; names its cgroup.
    pub id: String,
    /// The OCI runtime spec.
    pub spec: Spec,
    /// Where the root filesystem is assembled: an existing empty directory.
    pub rootfs: PathBuf,
    /// The overlay mounted at `rootfs`; `None` if `rootfs` is already a complete tree.
    pub overlay: Option<OverlayConfig>,
    /// Where the container's cgroup is created.
    pub cgroup: CgroupConfig,
    /// The `/etc` files to bind-mount.
    pub etc_files: EtcFiles,
    /// The seccomp profile.
    pub seccomp: SeccompProfile,
    /// The binary re-executed to set the container up; it must call
    /// [`crate::run_init_if_requested`] first thing in `main`. Defaults to `/proc/self/exe`.
    pub init_binary: PathBuf,
}

impl ContainerConfig {
    /// A configuration with defaults for everything but the id, spec and rootfs.
    pub fn new(id: impl Into<String>, spec: Spec, rootfs: PathBuf) -> Self {
        Self {
            id: id.into(),
            spec,
            rootfs,
            overlay: None,
            cgroup: CgroupConfig::default(),
            etc_files: EtcFiles::default(),
            seccomp: SeccompProfile::Default,
            init_binary: PathBuf::from("/proc/self/exe"),
        }
    }

    /// Checks what must hold before anything is created.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_id(&self.id)?;
        let process = self.spec.process().as_ref().ok_or(SpecError::NoProcess)?;
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(SpecError::NoArgs);
        }
        if namespaces(&self.spec)
            .iter()
            .any(|ns| ns.typ() == LinuxNamespaceType::User)
        {
            return Err(SpecError::UserNamespace);
        }
        Ok(())
    }

    /// The root filesystem plan: the spec's mounts followed by the `/etc` file binds.
    pub fn rootfs_plan(&self) -> RootfsPlan {
        let mut mounts = self.spec.mounts().clone().unwrap_or_default();
        let etc = [
            ("/etc/hostname", &self.etc_files.hostname),
            ("/etc/hosts", &self.etc_files.hosts),
            ("/etc/resolv.conf", &self.etc_files.resolv_conf),
        ];
        for (destination, source) in etc {
            if let Some(source) = source {
                mounts.push(bind_mount(destination, source.clone(), false));
            }
        }
        let linux = self.spec.linux().as_ref();
        RootfsPlan {
            rootfs: self.rootfs.clone(),
            overlay: self.overlay.clone(),
            mounts,
            masked_paths: linux
                .and_then(|l| l.masked_paths().clone())
                .unwrap_or_default(),
            readonly_paths: linux
                .and_then(|l| l.readonly_paths().clone())
                .unwrap_or_default(),
            readonly_root: self
                .spec
                .root()
                .as_ref()
                .and_then(|r| r.readonly())
                .unwrap_or(false),
        }
    }
}

/// The spec's namespaces (empty when it has none).
pub fn namespaces(spec: &Spec) -> Vec<LinuxNamespace> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
}

/// A bind mount of `source` at `destination`.
pub fn bind_mount(destination: &str, source: PathBuf, readonly: bool) -> Mount {
    let mut mount = Mount::default();
    mount.set_destination(PathBuf::from(destination));
    mount.set_typ(Some("bind".to_string()));
    mount.set_source(Some(source));
    let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
    options.push(if readonly { "ro" } else { "rw" }.to_string());
    mount.set_options(Some(options));
    mount
}

fn validate_id(id: &str) -> Result<(), SpecError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SpecError::InvalidId(id.to_string()))
    }
}

pub use agent_protocol::defaults::{
    docker_default_spec, SpecBuildError, DEFAULT_PATH, DOCKER_MASKED_PATHS, DOCKER_READONLY_PATHS,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: &str) -> ContainerConfig {
        let spec = docker_default_spec(vec!["sh".into()]).expect("spec");
        ContainerConfig::new(id, spec, PathBuf::from("/run/c/rootfs"))
    }

    #[test]
    fn validate_default_config_accepted() {
        config("web-1").validate().expect("valid");
    }

    #[test]
    fn validate_id_with_slash_refused() {
        assert!(matches!(
            config("../x").validate(),
            Err(SpecError::InvalidId(_))
        ));
    }

    #[test]
    fn rootfs_plan_etc_files_bound_after_spec_mounts() {
        let mut config = config("c1");
        config.etc_files.hosts = Some(PathBuf::from("/run/c/hosts"));

        let plan = config.rootfs_plan();

        let last = plan.mounts.last().expect("mounts");
        assert_eq!(last.destination(), &PathBuf::from("/etc/hosts"));
        assert_eq!(last.source(), &Some(PathBuf::from("/run/c/hosts")));
        assert!(plan.masked_paths.contains(&"/proc/kcore".to_string()));
        assert!(plan.readonly_paths.contains(&"/proc/sys".to_string()));
        assert!(!plan.readonly_root);
    }

    #[test]
    fn docker_default_spec_six_namespaces() {
        let spec = docker_default_spec(vec!["true".into()]).expect("spec");

        assert_eq!(namespaces(&spec).len(), 6);
    }

    #[test]
    fn container_config_json_round_trip() {
        let config = config("c1");

        let json = serde_json::to_string(&config).expect("serialize");
        let back: ContainerConfig = serde_json::from_str(&json).expect("deserialize");

        assert_eq!(back.spec, config.spec);
    }
}
