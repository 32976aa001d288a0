//! The `vmm` backend: our own `berth-vmm`, one process per VM, on hardware KVM.
//!
//! `berth-vmm` has the vsock device built in (the same device code `berth-vsock` serves to
//! QEMU), so the only helpers are the `virtiofsd`s of the shared roots, to which it speaks
//! vhost-user as QEMU's `vhost-user-fs-device` does. The guest sees the same virtio-mmio
//! devices as under QEMU, except the network uplink: `berth-vmm` has no virtio-net yet, so
//! containers get no outbound network under this backend (published ports and container-to-
//! container traffic work: they do not leave the VM or travel over vsock).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::helpers::{
    find_program, find_virtiofsd, spawn_detached, spawn_virtiofsd, virtiofs_socket,
};
use super::process::VmProcess;
use super::qemu::Accel;
use super::{BackendKind, VmBackend, VmConfig, VmError};

/// The VMM program, and the variable that overrides where it is found.
pub const VMM_PROGRAM: &str = "berth-vmm";
pub const VMM_ENV: &str = "BERTH_VMM";
/// Where the VMM's own messages go (not the guest console).
const VMM_LOG: &str = "berth-vmm.log";

/// Launches VMs with `berth-vmm`.
#[derive(Debug, Clone)]
pub struct VmmBackend {
    vmm: PathBuf,
    virtiofsd: PathBuf,
}

impl Default for VmmBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl VmmBackend {
    /// A backend running `BERTH_VMM`, or `berth-vmm` beside the running executable, on `PATH`
    /// or in cargo's bin directory.
    pub fn new() -> Self {
        Self {
            vmm: find_vmm(),
            virtiofsd: find_virtiofsd(),
        }
    }

    /// The VMM executable this backend runs.
    pub fn program(&self) -> &Path {
        &self.vmm
    }
}

/// Where `berth-vmm` is, or the bare name when it is nowhere.
pub fn find_vmm() -> PathBuf {
    find_program(VMM_PROGRAM, VMM_ENV, true)
}

impl VmBackend for VmmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vmm
    }

    fn accel(&self) -> Accel {
        Accel::Kvm
    }

    fn programs(&self) -> Vec<&Path> {
        vec![&self.vmm]
    }

    fn describe(&self) -> String {
        "the vmm backend (berth-vmm on KVM)".into()
    }

    fn launch(&self, config: &VmConfig) -> Result<Vec<VmProcess>, VmError> {
        let mut helpers = spawn_virtiofsd(&self.virtiofsd, config)?;
        let mut command = Command::new(&self.vmm);
        command.args(vmm_args(config));
        let vmm = match spawn_detached(
            &mut command,
            &config.state_dir.join(VMM_LOG),
            "build it with `cargo build -p berth-vmm` or set BERTH_VMM",
        ) {
            Ok(child) => VmProcess::spawned(VMM_PROGRAM, child, config.state_dir.to_string_lossy()),
            Err(e) => {
                for helper in &mut helpers {
                    helper.kill_and_reap();
                }
                return Err(e);
            }
        };
        let mut processes = vec![vmm];
        processes.extend(helpers);
        Ok(processes)
    }
}

/// `berth-vmm`'s arguments for `config`. Pure, so the command line is unit-tested.
pub fn vmm_args(config: &VmConfig) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: OsString| {
        args.push(format!("--{name}").into());
        args.push(value);
    };
    flag("kernel", config.kernel.clone().into());
    flag("initramfs", config.initramfs.clone().into());
    flag("cmdline", config.cmdline().into());
    flag("mem-mib", config.memory_mib.to_string().into());
    flag("vcpus", config.vcpus.to_string().into());
    flag("vsock-uds", config.vsock_socket().into());
    flag("guest-cid", agent_protocol::GUEST_CID.to_string().into());
    flag("console-log", config.console_log().into());
    if let Some(disk) = &config.data_disk {
        flag("disk", disk.path.clone().into());
    }
    for share in &config.shares {
        let mut value = OsString::from(format!("{}=", share.tag));
        value.push(virtiofs_socket(&config.state_dir, &share.tag));
        flag("share", value);
    }
    // Free guest pages go back to the host (virtio-balloon free page reporting).
    args.push("--balloon".into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::VmShare;
    use std::time::Duration;

    fn config() -> VmConfig {
        VmConfig {
            kernel: "/assets/vmlinux".into(),
            initramfs: "/assets/initramfs.cpio".into(),
            memory_mib: 512,
            vcpus: 2,
            state_dir: "/run/berth/vm".into(),
            boot_timeout: Duration::from_secs(30),
            extra_cmdline: vec![],
            data_disk: None,
            shares: vec![],
        }
    }

    fn joined(config: &VmConfig) -> String {
        vmm_args(config)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn vmm_args_boot_the_assets_with_vsock_and_console_in_the_state_dir() {
        let args = joined(&config());

        assert!(args.contains("--kernel /assets/vmlinux --initramfs /assets/initramfs.cpio"));
        assert!(args.contains("--mem-mib 512 --vcpus 2"));
        assert!(args.contains("--vsock-uds /run/berth/vm/vsock.sock --guest-cid 3"));
        assert!(args.contains("--console-log /run/berth/vm/console.log"));
        assert!(args.ends_with("--balloon"));
    }

    #[test]
    fn vmm_args_cmdline_is_one_argument() {
        let args = vmm_args(&config());

        let at = args
            .iter()
            .position(|a| a == "--cmdline")
            .expect("--cmdline");
        assert_eq!(args[at + 1], config().cmdline().as_str());
    }

    #[test]
    fn vmm_args_share_names_its_virtiofsd_socket() {
        let config = VmConfig {
            shares: vec![VmShare {
                tag: "share0".into(),
                host_dir: "/home/u".into(),
                owner: (1000, 1000),
            }],
            ..config()
        };

        let args = joined(&config);

        assert!(args.contains("--share share0=/run/berth/vm/virtiofs-share0.sock"));
    }
}
