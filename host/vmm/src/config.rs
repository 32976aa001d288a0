//! The complete description of one VM, fixed at start.

use std::collections::HashSet;
use std::path::PathBuf;
use std::str::FromStr;

pub use berth_devices::virtio::net::MacAddr;

/// Most vCPUs we give a guest (the MP table and IRQ layout are sized for this).
pub const MAX_VCPUS: u8 = 32;
/// Least memory the guest kernel and initramfs need.
pub const MIN_MEM_MIB: u64 = 64;
/// The guest's MAC when none is given: locally administered (bit 1 of the first octet), unicast,
/// fixed so the guest's address is the same on every boot. Every VM sits alone on its own link
/// to its own network stack, so VMs never see each other's MAC.
pub const DEFAULT_MAC: MacAddr = MacAddr([0x02, 0x42, 0xac, 0x00, 0x00, 0x02]);
/// Longest virtio-fs tag: the size of the `tag` field of the device's configuration space.
pub const MAX_SHARE_TAG_LEN: usize = 36;

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
    /// virtio-blk disks, in guest order: the first is `/dev/vda`, the next `/dev/vdb`, ...
    pub disks: Vec<DiskConfig>,
    /// Whether to give the guest a virtio-balloon device with free page reporting.
    pub balloon: bool,
    /// Host directories shared with the guest over virtio-fs, one device each.
    pub shares: Vec<ShareConfig>,
    /// The guest's network device, linked to a user-mode network stack.
    pub net: Option<NetConfig>,
}

/// A virtio-net device whose backend is a unix stream socket speaking QEMU's `-netdev stream`
/// framing (4-byte big-endian length, then an Ethernet frame), such as passt's `-s PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The backend's listening socket; the VMM connects to it at start.
    pub socket: PathBuf,
    /// The guest interface's MAC.
    pub mac: MacAddr,
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file (or host block device).
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// Errors of parsing a [`DiskConfig`] from `PATH[,ro]`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseDiskError {
    /// Nothing before the options.
    #[error("disk path is empty")]
    EmptyPath,
}

impl FromStr for DiskConfig {
    type Err = ParseDiskError;

    /// `PATH` or `PATH,ro`. A path may itself contain commas, as long as it does not end in
    /// `,ro`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.strip_suffix(",ro") {
            Some(path) => (path, true),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(ParseDiskError::EmptyPath);
        }
        Ok(Self {
            path: path.into(),
            read_only,
        })
    }
}

/// The guest's vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context ID.
    pub guest_cid: u32,
    /// Host unix socket (the Firecracker hybrid vsock convention).
    pub uds_path: PathBuf,
}

/// One virtio-fs device, served by a vhost-user backend (`virtiofsd`) that is already listening.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareConfig {
    /// The name the guest mounts it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
}

impl ShareConfig {
    /// Checks that `tag` fits the device's configuration space and reads back as itself: not
    /// empty, at most [`MAX_SHARE_TAG_LEN`] bytes, no NUL (which would end it early).
    pub fn check_tag(tag: &str) -> Result<(), ConfigError> {
        if tag.is_empty() || tag.len() > MAX_SHARE_TAG_LEN || tag.contains('\0') {
            return Err(ConfigError::ShareTag(tag.to_owned()));
        }
        Ok(())
    }
}

/// `TAG=SOCKET`, as `--share` takes it. The tag ends at the first `=`; the socket path is the
/// rest, so it may contain `=` itself.
impl FromStr for ShareConfig {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let Some((tag, socket)) = value.split_once('=') else {
            return Err(ConfigError::ShareSyntax(value.to_owned()));
        };
        if socket.is_empty() {
            return Err(ConfigError::ShareSyntax(value.to_owned()));
        }
        Self::check_tag(tag)?;
        Ok(Self {
            tag: tag.to_owned(),
            socket: PathBuf::from(socket),
        })
    }
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
    /// A disk image does not exist.
    #[error("disk image {} does not exist", .0.display())]
    DiskNotFound(PathBuf),
    /// A disk image is a directory or another file that cannot hold sectors.
    #[error("disk image {} is not a regular file or block device", .0.display())]
    DiskNotAFile(PathBuf),
    /// A share is not written `TAG=SOCKET`.
    #[error("share {0:?} is not TAG=SOCKET")]
    ShareSyntax(String),
    /// A share tag is empty, too long or has a NUL.
    #[error("share tag {0:?} must be 1 to {MAX_SHARE_TAG_LEN} bytes without NUL")]
    ShareTag(String),
    /// Two shares have the same tag, so the guest could mount only one of them.
    #[error("share tag {0:?} is given twice")]
    DuplicateShareTag(String),
    /// The network backend's socket path does not exist.
    #[error("network socket {} does not exist", .0.display())]
    NetSocketNotFound(PathBuf),
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
        self.disks.iter().try_for_each(DiskConfig::validate)?;
        if let Some(net) = &self.net {
            // Whether something listens there is only known when the VMM connects.
            if !net.socket.exists() {
                return Err(ConfigError::NetSocketNotFound(net.socket.clone()));
            }
        }
        self.validate_shares()
    }

    fn validate_shares(&self) -> Result<(), ConfigError> {
        let mut tags = HashSet::new();
        for share in &self.shares {
            ShareConfig::check_tag(&share.tag)?;
            if !tags.insert(share.tag.as_str()) {
                return Err(ConfigError::DuplicateShareTag(share.tag.clone()));
            }
        }
        Ok(())
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

impl DiskConfig {
    /// Checks that the image exists and can hold sectors. Other failures (permissions, locks)
    /// are reported when the device opens it.
    fn validate(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ConfigError::DiskNotFound(self.path.clone()))
            }
            Ok(meta) if !meta.is_file() && !meta.file_type().is_block_device() => {
                Err(ConfigError::DiskNotAFile(self.path.clone()))
            }
            _ => Ok(()),
        }
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
            disks: Vec::new(),
            balloon: true,
            shares: vec![ShareConfig {
                tag: "home".into(),
                socket: "/tmp/fs.sock".into(),
            }],
            net: None,
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

    #[test]
    fn validate_existing_disk_passes() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let config = VmConfig {
            disks: vec![DiskConfig {
                path: image.path().into(),
                read_only: false,
            }],
            ..config()
        };

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn validate_missing_disk_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("data.raw");
        let config = VmConfig {
            disks: vec![DiskConfig {
                path: missing.clone(),
                read_only: false,
            }],
            ..config()
        };

        let err = config.validate().unwrap_err();

        assert_eq!(err, ConfigError::DiskNotFound(missing.clone()));
        assert_eq!(
            err.to_string(),
            format!("disk image {} does not exist", missing.display())
        );
    }

    #[test]
    fn validate_directory_as_disk_fails() {
        let dir = tempfile::tempdir().unwrap();
        let config = VmConfig {
            disks: vec![DiskConfig {
                path: dir.path().into(),
                read_only: true,
            }],
            ..config()
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::DiskNotAFile(dir.path().into()))
        );
    }

    #[test]
    fn parse_disk_path_alone_is_read_write() {
        let disk: DiskConfig = "/var/lib/berth/data.raw".parse().unwrap();

        assert_eq!(
            disk,
            DiskConfig {
                path: "/var/lib/berth/data.raw".into(),
                read_only: false,
            }
        );
    }

    #[test]
    fn parse_disk_with_ro_suffix_is_read_only() {
        let disk: DiskConfig = "base.img,ro".parse().unwrap();

        assert_eq!(
            disk,
            DiskConfig {
                path: "base.img".into(),
                read_only: true,
            }
        );
    }

    #[test]
    fn parse_disk_path_with_comma_keeps_it() {
        let disk: DiskConfig = "a,b.img".parse().unwrap();

        assert_eq!(disk.path, PathBuf::from("a,b.img"));
        assert!(!disk.read_only);
    }

    #[test]
    fn parse_disk_without_path_fails() {
        assert_eq!(",ro".parse::<DiskConfig>(), Err(ParseDiskError::EmptyPath));
        assert_eq!("".parse::<DiskConfig>(), Err(ParseDiskError::EmptyPath));
    }

    #[test]
    fn validate_duplicate_share_tags_fails() {
        let share = ShareConfig {
            tag: "home".into(),
            socket: "/tmp/fs.sock".into(),
        };
        let config = VmConfig {
            shares: vec![share.clone(), share],
            ..config()
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::DuplicateShareTag("home".into()))
        );
    }

    #[test]
    fn validate_share_tag_too_long_fails() {
        let tag = "t".repeat(MAX_SHARE_TAG_LEN + 1);
        let config = VmConfig {
            shares: vec![ShareConfig {
                tag: tag.clone(),
                socket: "/tmp/fs.sock".into(),
            }],
            ..config()
        };

        assert_eq!(config.validate(), Err(ConfigError::ShareTag(tag)));
    }

    #[test]
    fn share_from_str_splits_at_the_first_equals_sign() {
        let share: ShareConfig = "home=/run/fs=1.sock".parse().unwrap();

        assert_eq!(
            share,
            ShareConfig {
                tag: "home".into(),
                socket: "/run/fs=1.sock".into(),
            }
        );
    }

    #[test]
    fn share_from_str_without_equals_sign_fails() {
        assert_eq!(
            "home".parse::<ShareConfig>(),
            Err(ConfigError::ShareSyntax("home".into()))
        );
    }

    #[test]
    fn share_from_str_without_socket_fails() {
        assert_eq!(
            "home=".parse::<ShareConfig>(),
            Err(ConfigError::ShareSyntax("home=".into()))
        );
    }

    #[test]
    fn share_from_str_empty_tag_fails() {
        assert_eq!(
            "=/run/fs.sock".parse::<ShareConfig>(),
            Err(ConfigError::ShareTag(String::new()))
        );
    }

    #[test]
    fn share_from_str_tag_of_36_bytes_passes() {
        let tag = "t".repeat(MAX_SHARE_TAG_LEN);

        let share = format!("{tag}=/run/fs.sock").parse::<ShareConfig>();

        assert_eq!(share.map(|s| s.tag), Ok(tag));
    }

    #[test]
    fn validate_missing_net_socket_fails_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("passt.sock");
        let config = VmConfig {
            net: Some(NetConfig {
                socket: missing.clone(),
                mac: DEFAULT_MAC,
            }),
            ..config()
        };

        assert_eq!(
            config.validate(),
            Err(ConfigError::NetSocketNotFound(missing))
        );
    }

    #[test]
    fn validate_existing_net_socket_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passt.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let config = VmConfig {
            net: Some(NetConfig {
                socket: path,
                mac: DEFAULT_MAC,
            }),
            ..config()
        };

        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn default_mac_is_locally_administered_unicast() {
        let first = DEFAULT_MAC.octets()[0];

        assert_eq!((first & 0b10, first & 0b01), (0b10, 0));
        assert_eq!(DEFAULT_MAC.to_string().parse::<MacAddr>(), Ok(DEFAULT_MAC));
    }
}
