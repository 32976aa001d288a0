//! `berth-vsock`: the guest's virtio-vsock device as a vhost-user backend for QEMU, with the
//! host side as hybrid-vsock unix sockets (see `berth_vmm::vhost_user_vsock`).
//!
//! The command line matches `vhost-device-vsock`'s single-VM form, so the two are
//! interchangeable: `--guest-cid 3 --socket <vhost-user socket> --uds-path <vm.vsock>`. It
//! serves one QEMU connection and exits when QEMU goes away.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use berth_vmm::vhost_user_vsock::{serve, VhostUserVsockConfig};

/// Serve a virtio-vsock device to QEMU over vhost-user.
#[derive(Debug, Parser)]
#[command(name = "berth-vsock", version)]
struct Args {
    /// The guest's context ID.
    #[arg(long, default_value_t = 3)]
    guest_cid: u64,
    /// The vhost-user socket to listen on (QEMU's `-chardev socket,path=…`).
    #[arg(long)]
    socket: PathBuf,
    /// The hybrid-vsock unix socket for host clients; guest-initiated connections to port P
    /// go to `<uds-path>_P`.
    #[arg(long)]
    uds_path: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_VSOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = VhostUserVsockConfig {
        guest_cid: args.guest_cid,
        socket: args.socket,
        uds_path: args.uds_path,
    };
    match serve(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-vsock: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
