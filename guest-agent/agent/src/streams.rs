//! The stream server: every stdio, terminal or layer-upload stream is a connection of its own
//! (DESIGN.md: no bulk data through the control path).
//!
//! In the guest the listener is AF_VSOCK on [`agent_protocol::STREAM_PORT`]; in native mode it
//! is the unix socket [`agent_protocol::stream_socket_path`] of the control socket. A
//! connection starts with one [`StreamHeader`] frame; the agent answers one [`StreamAccept`]
//! frame and, if it accepted, pumps raw bytes between the connection and the process's end:
//!
//! - stdout/stderr: from the pipe to the host until the pipe reports EOF, that is until every
//!   writer (the process and whatever inherited its stdout) is gone and every byte has been
//!   read, then the connection is half-closed. Nothing is dropped when a process writes a lot
//!   and exits at once: the pipe keeps what it holds until it is read.
//! - stdin: from the host to the pipe; the host's half-close (or `CloseStdin`) closes the pipe.
//! - pty: both ways, one thread each; the output side ends when the terminal reports the
//!   slave side closed.
//! - layer upload, archive upload and download: parked until the request naming them
//!   (`UnpackLayer`, `WriteArchive`, `ReadArchive`) takes them.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use agent_protocol::{read_frame, write_frame, AgentError, StreamAccept, StreamHeader, StreamKind};
use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
use nix::sys::time::{TimeVal, TimeValLike};
use thiserror::Error;

use crate::args::Listen;
use crate::containers::{Containers, StreamEnd};
use crate::forward;
use crate::handlers;
use crate::log::{console, Chain};
use crate::server::{self, ControlListener};

/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes moved per read.
const PUMP_BUFFER: usize = 64 * 1024;

/// Why a stream connection could not be set up.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error("cannot set the socket timeout")]
    Timeout(#[source] nix::Error),
    #[error("cannot read the stream header")]
    Header(#[source] agent_protocol::FrameError),
    #[error("the connection closed before its header")]
    NoHeader,
    #[error("cannot answer the stream header")]
    Accept(#[source] agent_protocol::FrameError),
}

/// Binds the stream listener for `listen` (the address of the stream server, not the control
/// server) and serves it on a thread of its own. As PID 1 the bind is retried until it works.
pub fn spawn(listen: Listen, containers: Arc<Containers>, retry: bool) -> io::Result<()> {
    let listener = if retry {
        None
    } else {
        Some(server::bind(&listen).map_err(io::Error::other)?)
    };
    thread::Builder::new()
        .name("streams".into())
        .spawn(move || {
            let listener = listener.unwrap_or_else(|| server::bind_retrying(&listen));
            console!("streams on {listen}");
            accept_loop(&listener, &containers)
        })
        .map(drop)
}

fn accept_loop(listener: &ControlListener, containers: &Arc<Containers>) -> ! {
    loop {
        let connection = match listener.accept() {
            Ok(connection) => OwnedFd::from(connection),
            Err(e) => {
                console!("{}", Chain(&e));
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let containers = Arc::clone(containers);
        let spawned = thread::Builder::new()
            .name("stream".into())
            .spawn(move || serve(File::from(connection), &containers));
        if let Err(e) = spawned {
            console!("cannot start a stream thread: {e}");
        }
    }
}

/// Serves one stream connection to its end.
fn serve(mut connection: File, containers: &Containers) {
    let header = match read_header(&mut connection) {
        Ok(header) => header,
        Err(e) => {
            console!("refused a stream: {}", Chain(&e));
            return;
        }
    };
    if matches!(
        header.kind,
        StreamKind::LayerUpload | StreamKind::ArchiveUpload | StreamKind::ArchiveDownload
    ) {
        if accept(&mut connection, Ok(())).is_ok() {
            containers.park_transfer(header.container_id, connection);
        }
        return;
    }
    if let StreamKind::TcpForward(target) | StreamKind::UdpForward(target) = header.kind {
        serve_forward(connection, header.kind, target);
        return;
    }
    if let StreamKind::Discard | StreamKind::Zeros(_) = header.kind {
        if accept(&mut connection, Ok(())).is_ok() {
            if let Err(e) = serve_probe(connection, header.kind) {
                console!("a probe stream ended early: {e}");
            }
        }
        return;
    }
    let end = containers
        .take_stream(&header, &connection)
        .map_err(|e| handlers::container_error(&e));
    let answer = end.as_ref().map(drop).map_err(AgentError::clone);
    if let Err(e) = accept(&mut connection, answer) {
        console!("cannot answer a stream header: {}", Chain(&e));
        return;
    }
    match end {
        Ok(StreamEnd::Output(pipe)) => pump_out(pipe, connection),
        Ok(StreamEnd::Stdin { file, process }) => {
            pump_in(connection, file);
            process.stdin_stream_ended();
        }
        Ok(StreamEnd::Pty(master)) => pump_pty(master, connection),
        Err(_) => {}
    }
}

/// A published port's connection or flow: connect to the container, answer, then relay.
fn serve_forward(mut connection: File, kind: StreamKind, target: agent_protocol::ForwardTarget) {
    let refused = |e: io::Error| {
        AgentError::new(
            agent_protocol::AgentErrorKind::NotFound,
            format!("cannot connect to {}:{}: {e}", target.ip, target.port),
        )
    };
    if let StreamKind::TcpForward(_) = kind {
        match forward::connect_tcp(target) {
            Ok(stream) => {
                if accept(&mut connection, Ok(())).is_ok() {
                    forward::splice_tcp(connection, stream);
                }
            }
            Err(e) => {
                let _ = accept(&mut connection, Err(refused(e)));
            }
        }
    } else {
        match forward::connect_udp(target) {
            Ok(socket) => {
                if accept(&mut connection, Ok(())).is_ok() {
                    forward::relay_udp(connection, socket);
                }
            }
            Err(e) => {
                let _ = accept(&mut connection, Err(refused(e)));
            }
        }
    }
}

/// A transport probe (`berth bench vsock`): swallow the host's bytes and answer their count,
/// or send the zeros it asked for.
fn serve_probe(mut connection: File, kind: StreamKind) -> io::Result<()> {
    agent_protocol::serve_probe(&mut connection, kind)?;
    shutdown(connection.as_raw_fd(), Shutdown::Write).map_err(io::Error::from)
}

fn read_header(connection: &mut File) -> Result<StreamHeader, StreamError> {
    let millis = i64::try_from(HEADER_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
    setsockopt(
        &*connection,
        sockopt::ReceiveTimeout,
        &TimeVal::milliseconds(millis),
    )
    .map_err(StreamError::Timeout)?;
    let header = read_frame(connection)
        .map_err(StreamError::Header)?
        .ok_or(StreamError::NoHeader)?;
    // Zero means no timeout: a stream may idle as long as its process runs.
    setsockopt(&*connection, sockopt::ReceiveTimeout, &TimeVal::zero())
        .map_err(StreamError::Timeout)?;
    Ok(header)
}

fn accept(connection: &mut File, result: Result<(), AgentError>) -> Result<(), StreamError> {
    write_frame(connection, &StreamAccept { result }).map_err(StreamError::Accept)
}

/// Copies `from` to `to` until `from` ends (EOF, or EIO from a pty whose slave side closed) or
/// `to` refuses. Returns how the copy ended, for logging.
fn copy(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buffer = vec![0u8; PUMP_BUFFER];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once the slave side is closed: the end of the output.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(total),
            Err(e) => return Err(e),
        };
        to.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

/// Process output to the host, then the half-close that tells the host it has everything.
fn pump_out(mut pipe: File, mut connection: File) {
    if let Err(e) = copy(&mut pipe, &mut connection) {
        console!("an output stream ended early: {e}");
    }
    let _ = shutdown(connection.as_raw_fd(), Shutdown::Write);
}

/// Host input to the process; dropping `stdin` afterwards closes the process's stdin.
fn pump_in(mut connection: File, mut stdin: File) {
    if let Err(e) = copy(&mut connection, &mut stdin) {
        // EPIPE: the process is gone or closed its stdin; not worth a line in the log.
        if e.kind() != io::ErrorKind::BrokenPipe {
            console!("a stdin stream ended early: {e}");
        }
    }
}

/// The terminal both ways: input on a thread of its own, output here.
fn pump_pty(mut master: File, mut connection: File) {
    let input = master
        .as_fd()
        .try_clone_to_owned()
        .and_then(|m| connection.try_clone().map(|c| (File::from(m), c)));
    match input {
        Ok((mut master_in, mut connection_in)) => {
            let spawned = thread::Builder::new()
                .name("pty-input".into())
                .spawn(move || {
                    let _ = copy(&mut connection_in, &mut master_in);
                });
            if let Err(e) = spawned {
                console!("cannot start a terminal input thread: {e}");
            }
        }
        Err(e) => console!("cannot duplicate a terminal stream: {e}"),
    }
    if let Err(e) = copy(&mut master, &mut connection) {
        console!("a terminal stream ended early: {e}");
    }
    // Both directions: the input thread's read ends too, and with it its copy of the master.
    let _ = shutdown(connection.as_raw_fd(), Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use agent_protocol::PROBE_WRITE_LEN;

    use super::*;

    #[test]
    fn copy_reads_to_eof_and_keeps_order() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();

        let total = copy(&mut data.as_slice(), &mut out).unwrap();

        assert_eq!(total, data.len() as u64);
        assert_eq!(out, data);
    }

    #[test]
    fn pump_out_half_closes_after_the_last_byte() {
        let (mut pipe_w, pipe_r) = UnixStream::pair().unwrap();
        let (agent, mut host) = UnixStream::pair().unwrap();
        pipe_w.write_all(b"last words").unwrap();
        drop(pipe_w);

        pump_out(
            File::from(OwnedFd::from(pipe_r)),
            File::from(OwnedFd::from(agent)),
        );
        let mut received = Vec::new();
        host.read_to_end(&mut received).unwrap();

        assert_eq!(received, b"last words");
    }

    #[test]
    fn discard_probe_answers_the_count_of_what_it_swallowed() {
        let (agent, mut host) = UnixStream::pair().unwrap();
        let probe = thread::spawn(move || {
            serve_probe(File::from(OwnedFd::from(agent)), StreamKind::Discard)
        });
        let sent = vec![7u8; 3 * PROBE_WRITE_LEN + 5];
        host.write_all(&sent).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        host.read_to_end(&mut answer).unwrap();

        probe.join().unwrap().unwrap();
        assert_eq!(answer, (sent.len() as u64).to_be_bytes());
    }

    #[test]
    fn zeros_probe_sends_exactly_what_was_asked_then_half_closes() {
        let (agent, mut host) = UnixStream::pair().unwrap();
        let asked = 2 * PROBE_WRITE_LEN as u64 + 1;
        let probe = thread::spawn(move || {
            serve_probe(File::from(OwnedFd::from(agent)), StreamKind::Zeros(asked))
        });
        let mut received = Vec::new();
        host.read_to_end(&mut received).unwrap();

        probe.join().unwrap().unwrap();
        assert_eq!(received.len() as u64, asked);
        assert!(received.iter().all(|&b| b == 0));
    }
}
