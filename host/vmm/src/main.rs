//! The `berth-vmm` binary: parse the VM config from the command line, run the VM, exit with a
//! code that says how it ended (see `berth_vmm::exit`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use berth_vmm::config::{DiskConfig, ShareConfig, VmConfig, VsockConfig};
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
