//! Linux capabilities: names, Docker's default set, and applying the five sets of an OCI
//! process (bounding, effective, permitted, inheritable, ambient) with `capset(2)` and `prctl`.
//! No libcap: the calls are a handful of syscalls.

use oci_spec::runtime::{Capabilities, LinuxCapabilities};
use thiserror::Error;

/// Errors from applying capabilities.
#[derive(Debug, Error)]
pub enum CapsError {
    /// An unknown capability name.
    #[error("unknown capability {0:?}")]
    Unknown(String),
    /// A capability syscall failed.
    #[error("cannot {0}")]
    Syscall(&'static str, #[source] std::io::Error),
}

/// Capability names, indexed by number (linux/capability.h).
const NAMES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

pub use agent_protocol::defaults::DOCKER_DEFAULT;

/// The number of a capability name (`CAP_` prefix optional, any case).
pub fn number(name: &str) -> Result<u8, CapsError> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    NAMES
        .iter()
        .position(|n| *n == full)
        .map(|p| p as u8)
        .ok_or_else(|| CapsError::Unknown(name.to_string()))
}

pub use agent_protocol::defaults::docker_default_capabilities;

/// A set of capability numbers as the 64-bit mask `capset` wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapMask(pub u64);

impl CapMask {
    /// The mask of an OCI set; absent means empty.
    pub fn from_set(set: Option<&Capabilities>) -> Result<Self, CapsError> {
        let mut mask = 0u64;
        for cap in set.into_iter().flatten() {
            mask |= 1 << number(&cap.to_string())?;
        }
        Ok(Self(mask))
    }

    /// Whether capability `n` is in the set.
    pub fn has(self, n: u8) -> bool {
        self.0 & (1 << n) != 0
    }
}

/// The five masks of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapSets {
    /// Bounding set.
    pub bounding: CapMask,
    /// Effective set.
    pub effective: CapMask,
    /// Permitted set.
    pub permitted: CapMask,
    /// Inheritable set.
    pub inheritable: CapMask,
    /// Ambient set.
    pub ambient: CapMask,
}

impl CapSets {
    /// Converts OCI capabilities.
    pub fn from_oci(caps: &LinuxCapabilities) -> Result<Self, CapsError> {
        Ok(Self {
            bounding: CapMask::from_set(caps.bounding().as_ref())?,
            effective: CapMask::from_set(caps.effective().as_ref())?,
            permitted: CapMask::from_set(caps.permitted().as_ref())?,
            inheritable: CapMask::from_set(caps.inheritable().as_ref())?,
            ambient: CapMask::from_set(caps.ambient().as_ref())?,
        })
    }
}

/// Drops every capability not in the bounding set. Run while still privileged.
pub fn drop_bounding(sets: &CapSets) -> Result<(), CapsError> {
    for cap in 0..=last_cap() {
        if sets.bounding.has(cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            // EINVAL: a capability this kernel does not know.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(CapsError::Syscall("drop from the bounding set", err));
            }
        }
    }
    Ok(())
}

/// Keeps permitted capabilities across the coming `setuid` (they are set for real by
/// [`apply`] afterwards).
pub fn keep_across_setuid() -> Result<(), CapsError> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(CapsError::Syscall(
            "set keepcaps",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets effective, permitted and inheritable with `capset`, then raises the ambient set.
pub fn apply(sets: &CapSets) -> Result<(), CapsError> {
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = libc_cap_header {
        version: VERSION_3,
        pid: 0,
    };
    let split = |m: CapMask| (m.0 as u32, (m.0 >> 32) as u32);
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let data = [
        libc_cap_data {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        libc_cap_data {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: header and data are the v3 layout the kernel expects (one header, two data
    // structs) and live across the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(CapsError::Syscall(
            "capset",
            std::io::Error::last_os_error(),
        ));
    }
    for cap in 0..=last_cap() {
        if !sets.ambient.has(cap) {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE,
                libc::c_ulong::from(cap),
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(CapsError::Syscall(
                "raise an ambient capability",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

#[repr(C)]
#[allow(non_camel_case_types)]
struct libc_cap_header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[allow(non_camel_case_types)]
struct libc_cap_data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The highest capability the running kernel knows.
fn last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or((NAMES.len() - 1) as u8)
        .min(63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_known_names_mapped() {
        assert_eq!(number("CAP_CHOWN").expect("known"), 0);
        assert_eq!(number("sys_admin").expect("known"), 21);
        assert_eq!(number("CAP_CHECKPOINT_RESTORE").expect("known"), 40);
    }

    #[test]
    fn number_unknown_name_refused() {
        assert!(matches!(number("CAP_FLY"), Err(CapsError::Unknown(_))));
    }

    #[test]
    fn docker_default_capabilities_fourteen_in_bounding_none_ambient() {
        let sets = CapSets::from_oci(&docker_default_capabilities()).expect("valid");

        assert_eq!(sets.bounding.0.count_ones(), 14);
        assert_eq!(sets.bounding, sets.effective);
        assert!(sets
            .bounding
            .has(number("CAP_NET_BIND_SERVICE").expect("known")));
        assert!(!sets.bounding.has(number("CAP_SYS_ADMIN").expect("known")));
        assert_eq!(sets.ambient, CapMask(0));
    }
}
