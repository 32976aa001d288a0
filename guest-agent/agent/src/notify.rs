//! The readiness notice: once the control server listens, the agent tells the host so.
//!
//! The host waits for this instead of polling the guest's control port (see
//! [`agent_protocol::READY_PORT`] for why). The notice is one [`ReadyNotice`] frame on a
//! guest-initiated vsock connection to the host. It is sent from a thread of its own: a host that
//! is not listening (an older host, a manual QEMU run) costs a refused connection and a console
//! line, never a stalled boot.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::thread;

use agent_protocol::{
    write_frame, FrameError, ReadyNotice, HOST_CID, PROTOCOL_VERSION, READY_PORT,
};
use nix::sys::socket::{
    connect, shutdown, socket, AddressFamily, Shutdown, SockFlag, SockType, VsockAddr,
};
use thiserror::Error;

use crate::log::{console, Chain};

/// Why the notice could not be delivered.
#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("cannot create a vsock socket")]
    Socket(#[source] nix::Error),
    #[error("cannot connect to the host's vsock port {port}")]
    Connect {
        port: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot send the readiness notice")]
    Send(#[source] FrameError),
}

/// Sends the notice from a background thread.
pub fn spawn_announce_ready(boot_id: String) {
    let spawned = thread::Builder::new()
        .name("notify-ready".into())
        .spawn(move || {
            if let Err(e) = announce_ready(&boot_id) {
                console!("the host was not told the agent is ready: {}", Chain(&e));
            }
        });
    if let Err(e) = spawned {
        console!("cannot start the readiness notice thread: {e}");
    }
}

fn announce_ready(boot_id: &str) -> Result<(), NotifyError> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(NotifyError::Socket)?;
    connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, READY_PORT)).map_err(|source| {
        NotifyError::Connect {
            port: READY_PORT,
            source,
        }
    })?;
    let mut stream = File::from(fd);
    let notice = ReadyNotice {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: boot_id.to_owned(),
    };
    write_frame(&mut stream, &notice).map_err(NotifyError::Send)?;
    // Best effort: the host reads one frame and closes; the close below ends it either way.
    let _ = shutdown(stream.as_raw_fd(), Shutdown::Write);
    Ok(())
}
