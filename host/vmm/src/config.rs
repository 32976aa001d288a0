//! The complete description of one VM, fixed at start.

use std::path::PathBuf;

/// Most vCPUs we give a guest (the MP table and IRQ layout are sized for this).
pub const MAX_VCPUS: u8 = 32;
/// Least memory the guest kernel and initramfs need.
pub const MIN_MEM_MIB: u64 = 64;

/// Everything `berth-vmm` needs to run a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// ELF `vmlinux` with a PVH note.
    pub kernel: PathBuf,
    /// Initramfs handed to the kernel as the first PVH module.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line; the VMM appends its `virtio_mmio.device=` entries.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The vsock device, exposed as a host unix socket.
    pub vsock: Option<VsockConfig>,
    /// Where the guest console goes; stdout when `None`.
    pub console_log: Option<PathBuf>,
    /// Whether to give the guest a virtio-rng device.
    pub rng: bool,
}

/// The guest's vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context ID.
    pub guest_cid: u32,
    /// Host unix socket (the Firecracker hybrid vsock convention).
    pub uds_path: PathBuf,
}

/// Errors of [`VmConfig::validate`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The vCPU count is zero or too large.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    /// Too little memory, or more than the address space allows.
    #[error("memory must be at least {MIN_MEM_MIB} MiB and below 1 TiB, got {0} MiB")]
    Memory(u64),
    /// The guest CID is reserved.
    #[error("guest CID {0} is reserved (must be 3 or more)")]
    GuestCid(u32),
}

impl VmConfig {
    /// Checks the values that would otherwise fail deep inside the set-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.mem_mib < MIN_MEM_MIB || self.mem_mib >= 1 << 20 {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return Err(ConfigError::GuestCid(vsock.guest_cid));
            }
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "vmlinux".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
            mem_mib: 512,
            vcpus: 2,
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: "/tmp/v.sock".into(),
            }),
            console_log: None,
            rng: true,
        }
    }

    #[test]
    fn validate_default_config_passes() {
        assert_eq!(config().validate(), Ok(()));
    }

    #[test]
    fn validate_zero_vcpus_fails() {
        let config = VmConfig {
            vcpus: 0,
            ..config()
        };

        assert_eq!(config.validate(), Err(ConfigError::Vcpus(0)));
    }

    #[test]
    fn validate_tiny_memory_fails() {
        let config = VmConfig {
            mem_mib: 16,
            ..config()
        };

        assert_eq!(config.validate(), Err(ConfigError::Memory(16)));
    }

    #[test]
    fn validate_host_cid_fails() {
        let config = VmConfig {
            vsock: Some(VsockConfig {
                guest_cid: 2,
                uds_path: "/tmp/v.sock".into(),
            }),
            ..config()
        };

        assert_eq!(config.validate(), Err(ConfigError::GuestCid(2)));
    }
}
