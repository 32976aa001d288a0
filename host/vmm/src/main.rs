//! The `berth-vmm` binary: parse the VM config from the command line, run the VM, exit with a
//! code that says how it ended (see `berth_vmm::exit`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use berth_vmm::config::{
    DiskConfig, MacAddr, NetConfig, ShareConfig, VmConfig, VsockConfig, DEFAULT_MAC,
};
use berth_vmm::exit::EXIT_VMM_ERROR;

/// Boot a Berth guest under KVM and run it until it powers off.
#[derive(Debug, Parser)]
#[command(name = "berth-vmm", version)]
struct Args {
    /// ELF vmlinux with a PVH entry note.
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs (newc cpio).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=t panic=-1")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Host unix socket for the guest's vsock (hybrid vsock convention).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// Guest context ID of the vsock device.
    #[arg(long, default_value_t = 3)]
    guest_cid: u32,
    /// File the guest console is appended to (stdout when absent).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Do not give the guest a virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// A virtio-fs device named TAG, served by the vhost-user backend (virtiofsd) listening on
    /// SOCKET. Repeatable.
    #[arg(long = "share", value_name = "TAG=SOCKET")]
    shares: Vec<ShareConfig>,
    /// A raw disk image as virtio-blk, read-only with `,ro`; repeat for more disks, in guest
    /// order (/dev/vda, /dev/vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// Give the guest a virtio-balloon device with free page reporting.
    #[arg(long)]
    balloon: bool,
    /// Give the guest a virtio-net device linked to the user-mode network stack listening on
    /// this unix socket, which must speak QEMU's `-netdev stream` framing (passt's `-s PATH`).
    /// The VMM connects at start and fails if it cannot.
    #[arg(long, value_name = "PATH")]
    net_socket: Option<PathBuf>,
    /// MAC address of the guest's network device (02:42:ac:00:00:02 by default, a fixed
    /// locally administered address).
    #[arg(long, value_name = "XX:XX:XX:XX:XX:XX", requires = "net_socket")]
    mac: Option<MacAddr>,
}

impl Args {
    fn into_config(self) -> VmConfig {
        VmConfig {
            kernel: self.kernel,
            initramfs: self.initramfs,
            cmdline: self.cmdline,
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            vsock: self.vsock_uds.map(|uds_path| VsockConfig {
                guest_cid: self.guest_cid,
                uds_path,
            }),
            console_log: self.console_log,
            rng: !self.no_rng,
            shares: self.shares,
            disks: self.disks,
            balloon: self.balloon,
            net: self.net_socket.map(|socket| NetConfig {
                socket,
                mac: self.mac.unwrap_or(DEFAULT_MAC),
            }),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Args::parse().into_config();
    let code = match berth_vmm::vm::run(&config) {
        Ok(outcome) => {
            tracing::info!("VM ended: {outcome:?}");
            if let berth_vmm::exit::VmOutcome::InternalError(message) = &outcome {
                eprintln!("berth-vmm: {message}");
            }
            outcome.exit_code()
        }
        Err(e) => {
            eprintln!("berth-vmm: {:#}", anyhow::Error::from(e));
            EXIT_VMM_ERROR
        }
    };
    // vCPU threads are still in KVM_RUN; exiting the process ends them with the VM.
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<VmConfig, clap::Error> {
        let args = ["berth-vmm", "--kernel", "vmlinux"].iter().chain(extra);
        Args::try_parse_from(args).map(Args::into_config)
    }

    #[test]
    fn args_without_net_socket_give_no_net_device() {
        assert_eq!(parse(&[]).unwrap().net, None);
    }

    #[test]
    fn args_net_socket_alone_uses_default_mac() {
        let config = parse(&["--net-socket", "/run/passt.sock"]).unwrap();

        assert_eq!(
            config.net,
            Some(NetConfig {
                socket: "/run/passt.sock".into(),
                mac: DEFAULT_MAC,
            })
        );
    }

    #[test]
    fn args_mac_sets_the_guest_mac() {
        let config = parse(&["--net-socket", "s", "--mac", "02:00:00:00:00:2a"]).unwrap();

        assert_eq!(
            config.net.map(|n| n.mac),
            Some(MacAddr([2, 0, 0, 0, 0, 0x2a]))
        );
    }

    #[test]
    fn args_malformed_mac_fails() {
        assert!(parse(&["--net-socket", "s", "--mac", "02:00:00:00:00"]).is_err());
    }

    #[test]
    fn args_mac_without_net_socket_fails() {
        assert!(parse(&["--mac", "02:00:00:00:00:2a"]).is_err());
    }
}
