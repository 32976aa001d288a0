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
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::process::VmProcess;
use super::{BackendKind, VmBackend, VmConfig, VmError, VmShare};

/// The vhost-user control socket QEMU connects to.
const VHOST_SOCKET: &str = "vhost-vsock.sock";
/// Where QEMU's and the vsock device's own messages go (not the guest console).
const QEMU_LOG: &str = "qemu.log";
const VHOST_LOG: &str = "berth-vsock.log";

/// The vsock device program, and the variable that overrides where it is found.
const VSOCK_PROGRAM: &str = "berth-vsock";
const VSOCK_ENV: &str = "BERTH_VHOST_VSOCK";

/// The virtio-fs device program, and the variable that overrides where it is found.
pub const VIRTIOFSD_PROGRAM: &str = "virtiofsd";
pub const VIRTIOFSD_ENV: &str = "BERTH_VIRTIOFSD";

/// How long the vsock device may take to create its socket.
const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Starts one `virtiofsd` per share; stops what it started if one fails.
    fn spawn_virtiofsd(&self, config: &VmConfig) -> Result<Vec<VmProcess>, VmError> {
        let mut started: Vec<VmProcess> = Vec::new();
        for share in &config.shares {
            let socket = virtiofs_socket(&config.state_dir, &share.tag);
            let log = config
                .state_dir
                .join(format!("virtiofsd-{}.log", share.tag));
            // A socket left by an earlier VM would look ready before virtiofsd listens.
            let _ = fs::remove_file(&socket);
            let mut command = Command::new(&self.virtiofsd);
            command.args(virtiofsd_args(
                share,
                &socket,
                nix::unistd::geteuid().is_root(),
            ));
            let spawned = spawn_detached(
                &mut command,
                &log,
                "install it with `cargo install --locked virtiofsd` or set BERTH_VIRTIOFSD",
            )
            .map(|child| {
                VmProcess::spawned(VIRTIOFSD_PROGRAM, child, config.state_dir.to_string_lossy())
            })
            .and_then(|process| wait_for_socket(process, &socket, VIRTIOFSD_PROGRAM, &log));
            match spawned {
                Ok(process) => started.push(process),
                Err(e) => {
                    for mut process in started {
                        process.kill_and_reap();
                    }
                    return Err(e);
                }
            }
        }
        Ok(started)
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

/// Waits until a vhost-user backend has created its socket: QEMU connects to it as a client
/// at start, so it must exist first.
fn wait_for_socket(
    mut process: VmProcess,
    socket: &Path,
    program: &str,
    log: &Path,
) -> Result<VmProcess, VmError> {
    let deadline = Instant::now() + HELPER_READY_TIMEOUT;
    while !socket.exists() {
        if let Some(status) = process.exit_status() {
            return Err(VmError::HelperFailed {
                program: program.into(),
                status,
                log: log.to_owned(),
            });
        }
        if Instant::now() > deadline {
            process.kill_and_reap();
            return Err(VmError::HelperTimeout {
                program: program.into(),
                path: socket.to_owned(),
                secs: HELPER_READY_TIMEOUT.as_secs(),
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(process)
}

/// The vhost-user socket of the share tagged `tag`.
fn virtiofs_socket(state_dir: &Path, tag: &str) -> PathBuf {
    state_dir.join(format!("virtiofs-{tag}.sock"))
}

/// `virtiofsd`'s arguments for `share`. Pure, so the ownership mapping is unit-tested.
///
/// Guest root and the share's owner map to each other both ways; every other guest id is
/// squashed to the owner, so whatever a container creates belongs to the host user. Host ids
/// other than the owner's pass through unchanged. As root the daemon is sandboxed in its own
/// namespaces with the share as its root; unprivileged it cannot be, and relies on the guest
/// kernel resolving every path (symlinks included) inside the share.
pub fn virtiofsd_args(share: &VmShare, socket: &Path, root: bool) -> Vec<OsString> {
    let (uid, gid) = share.owner;
    let mut args: Vec<OsString> = vec![
        "--shared-dir".into(),
        share.host_dir.clone().into(),
        "--socket-path".into(),
        socket.into(),
        "--tag".into(),
        share.tag.clone().into(),
        "--sandbox".into(),
        if root { "namespace" } else { "none" }.into(),
        "--cache".into(),
        "auto".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    for (flag, id) in [("--translate-uid", uid), ("--translate-gid", gid)] {
        args.push(flag.into());
        args.push(format!("map:0:{id}:1").into());
        args.push(flag.into());
        args.push(format!("squash-guest:1:{id}:4294967294").into());
    }
    args
}

impl VmBackend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn describe(&self) -> String {
        match self.accel {
            Accel::Kvm => "the qemu backend with KVM".into(),
            Accel::Tcg => "the qemu backend with TCG (software emulation; slow)".into(),
        }
    }

    fn launch(&self, config: &VmConfig) -> Result<Vec<VmProcess>, VmError> {
        let mut helpers = self.spawn_virtiofsd(config)?;
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

/// Spawns a VM process in its own process group (so a Ctrl-C aimed at the CLI that started it
/// does not reach it), with stdout and stderr going to `log`.
fn spawn_detached(
    command: &mut Command,
    log: &Path,
    hint: &str,
) -> Result<std::process::Child, VmError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let spawn_err = |source: io::Error| VmError::Spawn {
        program: program.clone(),
        hint: if source.kind() == io::ErrorKind::NotFound {
            hint.to_string()
        } else {
            format!("see {}", log.display())
        },
        source,
    };
    let out = File::create(log).map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)
}

/// Removes this backend's sockets from a state directory.
pub(super) fn forget_files(state_dir: &Path) {
    match fs::remove_file(state_dir.join(VHOST_SOCKET)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::debug!(error = %e, "cannot remove the vhost-user socket"),
    }
}

/// The `virtiofsd` this backend runs (`BERTH_VIRTIOFSD`, `PATH`, cargo's bin directory); the
/// bare name if it is nowhere (berthd then says so and shares nothing).
pub fn find_virtiofsd() -> PathBuf {
    find_program(VIRTIOFSD_PROGRAM, VIRTIOFSD_ENV, false)
}

/// Finds `name`: the `env` override; then, if `beside_exe`, the running executable's directory
/// and its parent (`target/<profile>/` holds every binary of a workspace build, and test
/// binaries run from its `deps/`); then `PATH`; then cargo's bin directory. Falls back to the
/// bare name so the spawn error names the program.
fn find_program(name: &str, env: &str, beside_exe: bool) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe_dirs = std::env::current_exe()
        .ok()
        .filter(|_| beside_exe)
        .map(|exe| {
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    exe_dirs
        .into_iter()
        .chain(path_dirs)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn virtiofsd_args_map_guest_root_to_the_owner_and_squash_the_rest() {
        let share = VmShare {
            tag: "share0".into(),
            host_dir: "/home/u".into(),
            owner: (1000, 1001),
        };

        let args = virtiofsd_args(&share, Path::new("/run/fs.sock"), true)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");

        assert!(args.contains("--shared-dir /home/u --socket-path /run/fs.sock --tag share0"));
        assert!(args.contains("--sandbox namespace"));
        assert!(args.contains(
            "--translate-uid map:0:1000:1 --translate-uid squash-guest:1:1000:4294967294"
        ));
        assert!(args.contains("--translate-gid map:0:1001:1"));
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
    fn find_program_found_nowhere_is_the_bare_name() {
        let found = find_program("berth-no-such-program", "BERTH_TEST_UNSET_VARIABLE", true);

        assert_eq!(found, PathBuf::from("berth-no-such-program"));
    }

    #[test]
    fn qemu_args_kernel_cmdline_is_last() {
        let args = qemu_args(&config(), Accel::Tcg, Some(Path::new("/x")));

        assert_eq!(args[args.len() - 2], "-append");
        assert_eq!(args[args.len() - 1], config().cmdline().as_str());
    }
}
