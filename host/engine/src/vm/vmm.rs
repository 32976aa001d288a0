//! The `vmm` backend: our own `berth-vmm`, one process per VM, on hardware KVM.
//!
//! `berth-vmm` has the vsock device built in (the same device code `berth-vsock` serves to
//! QEMU). Its helpers are the `virtiofsd`s of the shared roots, to which it speaks vhost-user as
//! QEMU's `vhost-user-fs-device` does, and `passt`, the user-mode network stack behind its
//! virtio-net (QEMU has libslirp built in instead). passt is given slirp's addresses, so the
//! guest sees the same uplink under both backends: 10.0.2.15/24, the gateway 10.0.2.2 mapped to
//! the host's loopback, DNS forwarded from 10.0.2.3 to the host's resolver.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use agent_protocol::network::{UPLINK_ADDRESS, UPLINK_DNS, UPLINK_GATEWAY, UPLINK_PREFIX_LEN};

use super::helpers::{
    find_program, find_virtiofsd, spawn_detached, spawn_virtiofsd, virtiofs_socket, wait_for_socket,
};
use super::process::VmProcess;
use super::qemu::Accel;
use super::{BackendKind, VmBackend, VmConfig, VmError};

/// The VMM program, and the variable that overrides where it is found.
pub const VMM_PROGRAM: &str = "berth-vmm";
pub const VMM_ENV: &str = "BERTH_VMM";
/// Where the VMM's own messages go (not the guest console).
const VMM_LOG: &str = "berth-vmm.log";

/// The user-mode network stack, and the variable that overrides where it is found.
pub const PASST_PROGRAM: &str = "passt";
pub const PASST_ENV: &str = "BERTH_PASST";
/// passt's messages.
const PASST_LOG: &str = "passt.log";
/// The directory, in the state directory, where passt creates the socket `berth-vmm`
/// connects to. passt binds it after dropping privileges (as root it becomes `nobody`), so the
/// directory is made writable for the user it will run as.
const PASST_DIR: &str = "passt";
/// The user passt switches to when started as root.
const PASST_ROOT_USER: &str = "nobody";

/// passt's socket for a VM whose state directory is `state_dir`.
fn passt_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(PASST_DIR).join("passt.sock")
}

/// Launches VMs with `berth-vmm`.
#[derive(Debug, Clone)]
pub struct VmmBackend {
    vmm: PathBuf,
    passt: PathBuf,
    virtiofsd: PathBuf,
}

impl Default for VmmBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl VmmBackend {
    /// A backend running `BERTH_VMM`, or `berth-vmm` beside the running executable, on `PATH`
    /// or in cargo's bin directory; and `BERTH_PASST` or `passt` on `PATH`.
    pub fn new() -> Self {
        Self {
            vmm: find_vmm(),
            passt: find_program(PASST_PROGRAM, PASST_ENV, false),
            virtiofsd: find_virtiofsd(),
        }
    }

    /// The VMM executable this backend runs.
    pub fn program(&self) -> &Path {
        &self.vmm
    }

    /// Whether every program this backend runs for each VM is there.
    pub fn installed(&self) -> bool {
        self.programs().iter().all(|program| program.is_file())
    }

    /// Starts passt on its socket in the state directory and waits until it listens.
    fn spawn_passt(&self, config: &VmConfig) -> Result<VmProcess, VmError> {
        let socket = passt_socket(&config.state_dir);
        let log = config.state_dir.join(PASST_LOG);
        prepare_passt_dir(&config.state_dir).map_err(|source| VmError::Spawn {
            program: PASST_PROGRAM.into(),
            hint: format!(
                "cannot prepare {}",
                config.state_dir.join(PASST_DIR).display()
            ),
            source,
        })?;
        // A socket left by an earlier VM would look ready before passt listens.
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new(&self.passt);
        command.args(passt_args(&socket));
        let child = spawn_detached(
            &mut command,
            &log,
            "install it with `apt-get install passt` or set BERTH_PASST",
        )?;
        let process = VmProcess::spawned(PASST_PROGRAM, child, config.state_dir.to_string_lossy());
        wait_for_socket(process, &socket, PASST_PROGRAM, &log)
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
        vec![&self.vmm, &self.passt]
    }

    fn describe(&self) -> String {
        "the vmm backend (berth-vmm on KVM)".into()
    }

    fn launch(&self, config: &VmConfig) -> Result<Vec<VmProcess>, VmError> {
        let mut helpers = spawn_virtiofsd(&self.virtiofsd, config)?;
        match self.spawn_passt(config) {
            Ok(passt) => helpers.push(passt),
            Err(e) => {
                for helper in &mut helpers {
                    helper.kill_and_reap();
                }
                return Err(e);
            }
        }
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

/// Creates passt's socket directory (private to the user passt runs as: `nobody` when we are
/// root, else ourselves).
fn prepare_passt_dir(state_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = state_dir.join(PASST_DIR);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name(PASST_ROOT_USER)
            .map_err(std::io::Error::from)?
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no user {PASST_ROOT_USER} for passt to run as"),
                )
            })?;
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).map_err(std::io::Error::from)?;
    }
    Ok(())
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
    flag("net-socket", passt_socket(&config.state_dir).into());
    // Free guest pages go back to the host (virtio-balloon free page reporting).
    args.push("--balloon".into());
    args
}

/// passt's arguments: in the foreground, serving one VM on `socket`, IPv4 only, with slirp's addresses (see the module documentation). Pure, so the
/// addresses are unit-tested against the ones the agent configures.
///
/// Not `--one-off`: with it, passt exited (status 0) once in CI while the guest was still
/// booting, which failed the boot; passt dropping the connection now only takes the guest's
/// link down. The VM's stop kills passt with the other helpers.
pub fn passt_args(socket: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = ["--foreground", "--quiet", "--ipv4-only"]
        .map(OsString::from)
        .to_vec();
    let mut flag = |name: &str, value: OsString| {
        args.push(format!("--{name}").into());
        args.push(value);
    };
    flag("socket", socket.into());
    flag("address", UPLINK_ADDRESS.to_string().into());
    flag("netmask", UPLINK_PREFIX_LEN.to_string().into());
    flag("gateway", UPLINK_GATEWAY.to_string().into());
    flag("dns-forward", UPLINK_DNS.to_string().into());
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
    fn vmm_args_connect_the_network_to_passt_in_the_state_dir() {
        let args = joined(&config());

        assert!(args.contains("--net-socket /run/berth/vm/passt/passt.sock"));
    }

    #[test]
    fn passt_args_give_the_guest_the_uplink_the_agent_configures() {
        let args = passt_args(Path::new("/run/berth/vm/passt/passt.sock"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");

        assert_eq!(
            args,
            "--foreground --quiet --ipv4-only --socket /run/berth/vm/passt/passt.sock \
             --address 10.0.2.15 --netmask 24 --gateway 10.0.2.2 --dns-forward 10.0.2.3"
        );
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
