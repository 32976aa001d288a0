//! Docker's defaults for a container, in OCI runtime-spec form: the capability set, masked
//! and read-only paths, `PATH`, and [`docker_default_spec`] to start a container's spec from.
//! The host builds specs from them and the guest's container library checks against them, so
//! they live in the one crate both sides share.

use std::collections::HashSet;

use oci_spec::runtime::{
    Capabilities, LinuxBuilder, LinuxCapabilities, LinuxNamespace, LinuxNamespaceType, Process,
    ProcessBuilder, Spec, UserBuilder,
};
use thiserror::Error;

/// A default spec could not be built (the builder refused a value).
#[derive(Debug, Error)]
#[error("cannot build the default spec")]
pub struct SpecBuildError(#[source] pub oci_spec::OciSpecError);

/// Docker's default capabilities for a non-privileged container.
pub const DOCKER_DEFAULT: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Docker's default set in OCI form, for all of bounding, effective and permitted (inheritable
/// and ambient empty, as in Docker).
pub fn docker_default_capabilities() -> LinuxCapabilities {
    let set: Capabilities = DOCKER_DEFAULT
        .iter()
        // oci-spec parses names without the prefix (serde uses the prefixed form).
        .filter_map(|name| name.trim_start_matches("CAP_").parse().ok())
        .collect();
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(set.clone()));
    caps.set_effective(Some(set.clone()));
    caps.set_permitted(Some(set));
    caps.set_inheritable(Some(HashSet::new()));
    caps.set_ambient(Some(HashSet::new()));
    caps
}

/// Docker's masked paths.
pub const DOCKER_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
pub const DOCKER_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Docker's default environment `PATH`.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A spec with Docker's defaults for a non-privileged container running `args` as root:
/// pid, mount, uts, ipc, net and cgroup namespaces; `/proc`, `/dev` (+pts, shm, mqueue),
/// read-only `/sys` and cgroup; Docker's capabilities, masked and read-only paths; a writable
/// root. Adjust the result for the container at hand.
pub fn docker_default_spec(args: Vec<String>) -> Result<Spec, SpecBuildError> {
    let process: Process = ProcessBuilder::default()
        .args(args)
        .env(vec![DEFAULT_PATH.to_string()])
        .cwd("/")
        .user(
            UserBuilder::default()
                .uid(0u32)
                .gid(0u32)
                .build()
                .map_err(SpecBuildError)?,
        )
        .capabilities(docker_default_capabilities())
        .no_new_privileges(false)
        .terminal(false)
        .build()
        .map_err(SpecBuildError)?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Cgroup,
    ]
    .into_iter()
    .map(|typ| {
        let mut ns = LinuxNamespace::default();
        ns.set_typ(typ);
        ns
    })
    .collect::<Vec<_>>();
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(
            DOCKER_MASKED_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            DOCKER_READONLY_PATHS
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .build()
        .map_err(SpecBuildError)?;
    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_hostname(Some("berth".to_string()));
    spec.set_mounts(Some(oci_spec::runtime::get_default_mounts()));
    spec.set_linux(Some(linux));
    let mut root = oci_spec::runtime::Root::default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    Ok(spec)
}
