//! The control server: a listener, an accept loop, one thread per connection.
//!
//! In the guest the listener is AF_VSOCK on [`agent_protocol::CONTROL_PORT`] for any CID; in
//! native mode it is a unix socket. Each accepted connection gets a thread running
//! [`session::serve_connection`]. When a session ends in a shutdown, its thread makes sure the
//! `Done` reached the host, then hands over to [`power::shutdown`].
//!
//! PID 1 must never exit, so nothing here returns an error upwards once listening: a listener
//! that cannot be created is retried (logged once per distinct cause), and accept errors are
//! logged and survived.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind as bind_socket, listen, setsockopt, shutdown, socket, sockopt, AddressFamily,
    Backlog, Shutdown, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::{TimeVal, TimeValLike};
use thiserror::Error;

use crate::args::Listen;
use crate::handlers::AgentContext;
use crate::log::{console, Chain};
use crate::power;
use crate::session::{self, Connection, Outcome};

/// Pending connections the kernel queues for us.
const BACKLOG: i32 = 64;

/// Pause between attempts to create the listener.
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Pause after a failed accept, so a persistent error (EMFILE) does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Why the server could not listen or accept.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot create a vsock socket")]
    VsockSocket(#[source] nix::Error),
    #[error("cannot bind vsock port {port}")]
    VsockBind {
        port: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot listen on vsock port {port}")]
    VsockListen {
        port: u32,
        #[source]
        source: nix::Error,
    },
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("another agent is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    UnixBind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot accept a connection")]
    Accept(#[source] io::Error),
}

/// A listening control socket.
#[derive(Debug)]
pub enum ControlListener {
    /// AF_VSOCK.
    Vsock(OwnedFd),
    /// A unix socket (native mode).
    Unix(UnixListener),
}

/// An accepted control connection.
#[derive(Debug)]
pub enum ControlStream {
    /// AF_VSOCK; a `File` is just a convenient owner of the fd with `Read` and `Write`.
    Vsock(File),
    /// A unix socket.
    Unix(UnixStream),
}

impl ControlListener {
    /// Waits for the next connection. The stream is close-on-exec, so children never inherit
    /// it.
    pub fn accept(&self) -> Result<ControlStream, ServerError> {
        match self {
            Self::Vsock(fd) => {
                let raw = accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                    .map_err(|e| ServerError::Accept(e.into()))?;
                // SAFETY: `accept4` has just returned this fd; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                Ok(ControlStream::Vsock(File::from(owned)))
            }
            Self::Unix(listener) => listener
                .accept()
                .map(|(stream, _)| ControlStream::Unix(stream))
                .map_err(ServerError::Accept),
        }
    }
}

impl From<ControlStream> for OwnedFd {
    /// The connection's socket, for code that handles every kind of socket alike (the stream
    /// pumps).
    fn from(stream: ControlStream) -> Self {
        match stream {
            ControlStream::Vsock(file) => file.into(),
            ControlStream::Unix(stream) => stream.into(),
        }
    }
}

impl Connection for ControlStream {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Self::Vsock(file) => Ok(shutdown(file.as_raw_fd(), Shutdown::Write)?),
            Self::Unix(stream) => Connection::shutdown_write(stream),
        }
    }

    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Self::Vsock(file) => {
                let millis = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
                let timeout = TimeVal::milliseconds(millis);
                Ok(setsockopt(file, sockopt::ReceiveTimeout, &timeout)?)
            }
            Self::Unix(stream) => Connection::set_read_timeout(stream, timeout),
        }
    }
}

impl Read for ControlStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Vsock(file) => file.read(buf),
            Self::Unix(stream) => stream.read(buf),
        }
    }
}

impl Write for ControlStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Vsock(file) => file.write(buf),
            Self::Unix(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Vsock(file) => file.flush(),
            Self::Unix(stream) => stream.flush(),
        }
    }
}

/// Creates the listener `listen` asks for.
pub fn bind(listen: &Listen) -> Result<ControlListener, ServerError> {
    match listen {
        Listen::Vsock { port } => bind_vsock(*port).map(ControlListener::Vsock),
        Listen::Unix(path) => bind_unix(path).map(ControlListener::Unix),
    }
}

/// Creates the listener, retrying until it works: PID 1 has nothing better to do than wait for
/// its vsock device. Logs the first failure and every change of cause, not every attempt.
pub fn bind_retrying(listen: &Listen) -> ControlListener {
    let mut last_failure: Option<String> = None;
    loop {
        match bind(listen) {
            Ok(listener) => return listener,
            Err(e) => {
                let cause = Chain(&e).to_string();
                if last_failure.as_ref() != Some(&cause) {
                    console!("{cause}; retrying every {}s", BIND_RETRY.as_secs());
                    last_failure = Some(cause);
                }
                thread::sleep(BIND_RETRY);
            }
        }
    }
}

fn bind_vsock(port: u32) -> Result<OwnedFd, ServerError> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(ServerError::VsockSocket)?;
    bind_socket(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .map_err(|source| ServerError::VsockBind { port, source })?;
    let backlog =
        Backlog::new(BACKLOG).map_err(|source| ServerError::VsockListen { port, source })?;
    listen(&fd, backlog).map_err(|source| ServerError::VsockListen { port, source })?;
    Ok(fd)
}

/// Binds a unix socket at `path`, replacing a stale socket left by an earlier run but never a
/// live one or a file that is not a socket. The socket is owner-only: whoever reaches it
/// controls the agent.
fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServerError::NotASocket(path.to_owned()));
        }
        Ok(_) if UnixStream::connect(path).is_ok() => {
            return Err(ServerError::InUse(path.to_owned()));
        }
        Ok(_) => fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
            path: path.to_owned(),
            source,
        })?,
        Err(_) => {}
    }
    let unix_bind_error = |source| ServerError::UnixBind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(unix_bind_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(unix_bind_error)?;
    Ok(listener)
}

/// Accepts connections forever, serving each on a thread of its own.
pub fn accept_loop(listener: ControlListener, context: Arc<AgentContext>) -> ! {
    let mut last_failure: Option<String> = None;
    loop {
        let stream = match listener.accept() {
            Ok(stream) => stream,
            Err(e) => {
                let cause = Chain(&e).to_string();
                if last_failure.as_ref() != Some(&cause) {
                    console!("{cause}");
                    last_failure = Some(cause);
                }
                thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        let context = Arc::clone(&context);
        let spawned = thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(stream, &context));
        if let Err(e) = spawned {
            // The stream went down with the closure: the host sees the connection close.
            console!("cannot start a connection thread: {e}");
        }
    }
}

fn serve(mut stream: ControlStream, context: &AgentContext) {
    // The session has already made sure the host got its `Done`.
    if session::serve_connection(&mut stream, context) == Outcome::Shutdown {
        power::shutdown(context.mode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_unix_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        drop(UnixListener::bind(&path).unwrap());

        let listener = bind(&Listen::Unix(path.clone()));

        assert!(matches!(listener, Ok(ControlListener::Unix(_))));
    }

    #[test]
    fn bind_unix_live_socket_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let _live = UnixListener::bind(&path).unwrap();

        let err = bind(&Listen::Unix(path)).unwrap_err();

        assert!(matches!(err, ServerError::InUse(_)));
    }

    #[test]
    fn bind_unix_regular_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        fs::write(&path, "keep me").unwrap();

        let err = bind(&Listen::Unix(path.clone())).unwrap_err();

        assert!(matches!(err, ServerError::NotASocket(_)));
        assert_eq!(fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn bind_unix_socket_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");

        let _listener = bind(&Listen::Unix(path.clone())).unwrap();

        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
