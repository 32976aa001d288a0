//! The `qemu` backend: `qemu-system-x86_64 -M microvm` plus `berth-vsock`.
//!
//! This is the fallback where our own VMM cannot run: no `/dev/kvm`, or a PVM-only one. The
//! guest sees the same virtio-mmio devices as under `berth-vmm`, and the host side of its vsock
//! is the same hybrid-vsock unix socket (served by `berth-vsock`, our vsock device as a
//! vhost-user backend, built from `host/vmm`), so nothing above [`super::VmBackend`] knows which
//! backend runs. `BERTH_VHOST_VSOCK` may name another program with the same command line
//! (`vhost-device-vsock` from crates.io).
//!
//! `microvm` with `acpi=off` matters: with ACPI on, QEMU describes virtio-mmio devices only in
//! ACPI tables, which our kernel does not parse; with it off, QEMU appends
//! `virtio_mmio.device=…` to the command line. vhost-user needs guest memory in a shared memfd.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::helpers::{
    find_program, find_virtiofsd, spawn_detached, spawn_virtiofsd, virtiofs_socket, wait_for_socket,
};
use super::process::VmProcess;
use super::{BackendKind, VmBackend, VmConfig, VmError};

/// The vhost-user control socket QEMU connects to.
const VHOST_SOCKET: &str = "vhost-vsock.sock";
/// Where QEMU's and the vsock device's own messages go (not the guest console).
const QEMU_LOG: &str = "qemu.log";
const VHOST_LOG: &str = "berth-vsock.log";

/// The vsock device program, and the variable that overrides where it is found.
const VSOCK_PROGRAM: &str = "berth-vsock";
const VSOCK_ENV: &str = "BERTH_VHOST_VSOCK";

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// Software emulation (TCG).
    Tcg,
}

/// Launches VMs with QEMU.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    accel: Accel,
    qemu: PathBuf,
    vhost_vsock: PathBuf,
    virtiofsd: PathBuf,
}

impl QemuBackend {
    /// A backend using `accel`. QEMU is `BERTH_QEMU` or found on `PATH`; the vsock device is
    /// `BERTH_VHOST_VSOCK`, or `berth-vsock` beside the running executable (where a workspace
    /// build puts it), on `PATH`, or in cargo's bin directory.
    pub fn new(accel: Accel) -> Self {
        Self {
            accel,
            qemu: find_program("qemu-system-x86_64", "BERTH_QEMU", false),
            vhost_vsock: find_program(VSOCK_PROGRAM, VSOCK_ENV, true),
            virtiofsd: find_virtiofsd(),
        }
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The QEMU executable this backend runs.
    pub fn qemu_program(&self) -> &Path {
        &self.qemu
    }

    /// The vsock device (vhost-user backend) this backend runs.
    pub fn vsock_program(&self) -> &Path {
        &self.vhost_vsock
    }

    fn spawn_vhost_vsock(&self, config: &VmConfig) -> Result<VmProcess, VmError> {
        let socket = config.state_dir.join(VHOST_SOCKET);
        let mut command = Command::new(&self.vhost_vsock);
        command
            .arg("--guest-cid")
            .arg(agent_protocol::GUEST_CID.to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--uds-path")
            .arg(config.vsock_socket());
        let child = spawn_detached(
            &mut command,
            &config.state_dir.join(VHOST_LOG),
            "build it with `cargo build -p berth-vmm --bin berth-vsock` or set BERTH_VHOST_VSOCK",
        )?;
        let process = VmProcess::spawned(VSOCK_PROGRAM, child, config.state_dir.to_string_lossy());
        wait_for_socket(
            process,
            &socket,
            VSOCK_PROGRAM,
            &config.state_dir.join(VHOST_LOG),
        )
    }
}

impl VmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn programs(&self) -> Vec<&Path> {
        vec![&self.qemu, &self.vhost_vsock]
    }

    fn describe(&self) -> String {
        match self.accel {
            Accel::Kvm => "the qemu backend with KVM".into(),
            Accel::Tcg => "the qemu backend with TCG (software emulation; slow)".into(),
        }
    }

    fn launch(&self, config: &VmConfig) -> Result<Vec<VmProcess>, VmError> {
        let mut helpers = spawn_virtiofsd(&self.virtiofsd, config)?;
        match self.spawn_vhost_vsock(config) {
            Ok(vhost) => helpers.push(vhost),
            Err(e) => {
                for mut helper in helpers {
                    helper.kill_and_reap();
                }
                return Err(e);
            }
        }
        let mut command = Command::new(&self.qemu);
        command.args(qemu_args(
            config,
            self.accel,
            Some(&config.state_dir.join(VHOST_SOCKET)),
        ));
        let qemu = match spawn_detached(
            &mut command,
            &config.state_dir.join(QEMU_LOG),
            "install the qemu-system-x86 package or set BERTH_QEMU",
        ) {
            Ok(child) => VmProcess::spawned("qemu", child, config.state_dir.to_string_lossy()),
            Err(e) => {
                for mut helper in helpers {
                    helper.kill_and_reap();
                }
                return Err(e);
            }
        };
        let mut processes = vec![qemu];
        processes.extend(helpers);
        Ok(processes)
    }
}

/// QEMU's arguments for `config`. Pure, so the command line is unit-tested.
///
/// Without `vhost_socket` the guest gets no vsock device: that is the anchor configuration the
/// boot benchmark compares against (same machine, same kernel, a trivial init).
pub fn qemu_args(config: &VmConfig, accel: Accel, vhost_socket: Option<&Path>) -> Vec<OsString> {
    let memory = format!("{}M", config.memory_mib);
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
    push(&["-name", "berth"]);
    push(&["-M", "microvm,acpi=off,memory-backend=mem"]);
    match accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&["-m", &memory, "-smp", &config.vcpus.to_string()]);
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
    ]);
    // No default devices, no monitor, no display: only what the guest is given below.
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // A guest reboot (how the agent powers off, and what panic=-1 does) ends QEMU.
    push(&["-no-reboot"]);
    push(&["-device", "virtio-rng-device"]);
    // The guest's uplink for outbound traffic: QEMU's user-mode stack (libslirp), no TAP and
    // no privileges. Its 10.0.2.2 is the host's loopback (`host.docker.internal`).
    push(&["-netdev", "user,id=net0"]);
    push(&["-device", "virtio-net-device,netdev=net0"]);
    if let Some(vhost_socket) = vhost_socket {
        let mut chardev = OsString::from("socket,id=vsock0,path=");
        chardev.push(vhost_socket);
        args.extend([OsString::from("-chardev"), chardev]);
        args.extend(["-device", "vhost-user-vsock-device,chardev=vsock0"].map(OsString::from));
    }
    for (index, share) in config.shares.iter().enumerate() {
        // vhost-user-fs over virtio-mmio; the guest mounts it by tag.
        let mut chardev = OsString::from(format!("socket,id=fs{index},path="));
        chardev.push(qemu_escape(&virtiofs_socket(&config.state_dir, &share.tag)));
        args.extend([OsString::from("-chardev"), chardev]);
        args.extend([
            OsString::from("-device"),
            OsString::from(format!(
                "vhost-user-fs-device,chardev=fs{index},tag={}",
                share.tag
            )),
        ]);
    }
    if let Some(disk) = &config.data_disk {
        // The first (only) virtio-blk device: /dev/vda in the guest. discard=unmap passes the
        // guest's discards through as holes punched in the sparse file; detect-zeroes turns
        // zero writes into holes too.
        let mut drive = OsString::from("file=");
        drive.push(qemu_escape(&disk.path));
        drive
            .push(",if=none,id=data0,format=raw,discard=unmap,detect-zeroes=unmap,cache=writeback");
        args.extend([OsString::from("-drive"), drive]);
        args.extend(["-device", "virtio-blk-device,drive=data0"].map(OsString::from));
    }
    args.push("-serial".into());
    let mut serial = OsString::from("file:");
    serial.push(config.console_log());
    args.push(serial);
    args.push("-kernel".into());
    args.push(config.kernel.clone().into());
    args.push("-initrd".into());
    args.push(config.initramfs.clone().into());
    args.push("-append".into());
    args.push(config.cmdline().into());
    args
}

/// A path as a QEMU option value: commas are doubled, as QEMU's option syntax wants.
fn qemu_escape(path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut bytes = Vec::with_capacity(path.as_os_str().len());
    for &byte in path.as_os_str().as_bytes() {
        bytes.push(byte);
        if byte == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

/// Removes this backend's sockets from a state directory.
pub(super) fn forget_files(state_dir: &Path) {
    match fs::remove_file(state_dir.join(VHOST_SOCKET)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::debug!(error = %e, "cannot remove the vhost-user socket"),
    }
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
            extra_cmdline: Vec::new(),
            data_disk: None,
            shares: Vec::new(),
        }
    }

    fn joined(accel: Accel) -> String {
        qemu_args(
            &config(),
            accel,
            Some(Path::new("/run/berth/vm/vhost-vsock.sock")),
        )
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
    }

    #[test]
    fn qemu_args_tcg_uses_microvm_without_acpi_and_cpu_max() {
        let args = joined(Accel::Tcg);

        assert!(args.contains("-M microvm,acpi=off,memory-backend=mem"));
        assert!(args.contains("-accel tcg -cpu max"));
    }

    #[test]
    fn qemu_args_kvm_uses_host_cpu() {
        assert!(joined(Accel::Kvm).contains("-accel kvm -cpu host"));
    }

    #[test]
    fn qemu_args_memory_is_shared_memfd_of_guest_size() {
        let args = joined(Accel::Tcg);

        assert!(args.contains("-m 512M -smp 2"));
        assert!(args.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
    }

    #[test]
    fn qemu_args_wire_vsock_console_and_reboot_exit() {
        let args = joined(Accel::Tcg);

        assert!(args.contains("-chardev socket,id=vsock0,path=/run/berth/vm/vhost-vsock.sock"));
        assert!(args.contains("-device vhost-user-vsock-device,chardev=vsock0"));
        assert!(args.contains("-serial file:/run/berth/vm/console.log"));
        assert!(args.contains("-no-reboot"));
    }

    #[test]
    fn qemu_args_give_the_guest_a_user_mode_uplink() {
        let args = joined(Accel::Tcg);

        assert!(args.contains("-netdev user,id=net0 -device virtio-net-device,netdev=net0"));
    }

    #[test]
    fn qemu_args_without_vhost_socket_has_no_vsock_device() {
        let args = qemu_args(&config(), Accel::Tcg, None);

        assert!(!args.iter().any(|a| a.to_string_lossy().contains("vsock")));
    }

    #[test]
    fn qemu_args_data_disk_is_virtio_blk_with_discard() {
        let config = VmConfig {
            data_disk: Some(super::super::disk::DataDisk {
                path: "/data/vm,1/data.raw".into(),
                size_bytes: 1 << 30,
            }),
            ..config()
        };

        let args = qemu_args(&config, Accel::Tcg, None)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");

        assert!(args.contains(
            "-drive file=/data/vm,,1/data.raw,if=none,id=data0,format=raw,discard=unmap"
        ));
        assert!(args.contains("-device virtio-blk-device,drive=data0"));
    }

    #[test]
    fn qemu_args_share_is_vhost_user_fs_device_with_its_tag() {
        let config = VmConfig {
            shares: vec![VmShare {
                tag: "share0".into(),
                host_dir: "/home/u".into(),
                owner: (0, 0),
            }],
            ..config()
        };

        let args = qemu_args(&config, Accel::Tcg, None)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");

        assert!(args.contains("-chardev socket,id=fs0,path=/run/berth/vm/virtiofs-share0.sock"));
        assert!(args.contains("-device vhost-user-fs-device,chardev=fs0,tag=share0"));
    }

    #[test]
    fn qemu_args_kernel_cmdline_is_last() {
        let args = qemu_args(&config(), Accel::Tcg, Some(Path::new("/x")));

        assert_eq!(args[args.len() - 2], "-append");
        assert_eq!(args[args.len() - 1], config().cmdline().as_str());
    }
}
