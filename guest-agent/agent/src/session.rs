//! One control connection: the handshake, then request/response until the host hangs up.
//!
//! The first request must be `Hello`; anything else before it is refused with a `Handshake`
//! error (and the connection stays open for a proper `Hello`). A `Hello` without a common
//! version is refused and the connection closed.
//!
//! Frames are decoded in two steps, JSON first and the typed request second, because the
//! framing survives a request this agent cannot decode: a newer host may send a request type
//! added after this agent was built (the protocol allows that without a version bump), which
//! gets `Unsupported` with its id, and the connection goes on. A broken frame (bad magic, a
//! future frame version, oversized, not JSON) gets an error response where one can be sent, and
//! the connection is closed: after that nothing on it can be trusted.
//!
//! A connection the agent closes (a refusal, a shutdown) is closed gracefully: half-closed, then
//! drained until the host hangs up or a short time passes. Closing a socket with unread input
//! resets it, and the reset can destroy the last answer before the host reads it; and before a
//! power-off the `Done` may still sit in a virtqueue until the VMM moves it.
//!
//! [`serve_connection`] is generic over the stream ([`Connection`]) so tests drive it over a
//! socket pair.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use agent_protocol::{
    read_frame_payload, write_frame, AgentError, AgentErrorKind, FrameError, Request,
    RequestEnvelope, Response, ResponseEnvelope,
};
use serde_json::Value;

use crate::handlers::{self, AgentContext, AGENT_VERSION};
use crate::log::{console, Chain};

/// The response id used when the request's own id cannot be read.
pub const UNKNOWN_ID: u64 = 0;

/// How long a connection the agent closes waits for the host to hang up: long enough for the
/// last answer to be read, short enough not to delay a power-off noticeably.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// A control connection: a byte stream that can be half-closed.
pub trait Connection: Read + Write {
    /// Stops sending; the peer reads EOF after everything written so far.
    fn shutdown_write(&self) -> io::Result<()>;
    /// Bounds every later read.
    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl Connection for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }

    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        UnixStream::set_read_timeout(self, Some(timeout))
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host hung up, or the connection was closed after an error.
    Closed,
    /// The host asked for a shutdown, and `Done` has been written.
    Shutdown,
}

/// Serves one connection until it ends.
pub fn serve_connection<S: Connection>(stream: &mut S, context: &AgentContext) -> Outcome {
    let mut session = Session {
        context,
        version: None,
    };
    loop {
        let step = match read_frame_payload(stream) {
            Ok(Some(payload)) => session.on_frame(&payload),
            Ok(None) => return Outcome::Closed,
            Err(e) => on_frame_error(&e),
        };
        if let Some(reply) = step.reply {
            if let Err(e) = write_frame(stream, &reply) {
                console!("cannot answer the host: {}", Chain(&e));
                return Outcome::Closed;
            }
        }
        match step.then {
            Then::Continue => {}
            Then::Close => {
                close_gracefully(stream);
                return Outcome::Closed;
            }
            Then::Shutdown => {
                close_gracefully(stream);
                return Outcome::Shutdown;
            }
        }
    }
}

/// Half-closes `stream` and discards what the host still sends until it hangs up, for at most
/// [`CLOSE_LINGER`].
fn close_gracefully<S: Connection>(stream: &mut S) {
    if stream.shutdown_write().is_err() || stream.set_read_timeout(CLOSE_LINGER).is_err() {
        return;
    }
    let give_up = Instant::now() + CLOSE_LINGER;
    let mut sink = [0u8; 4096];
    while Instant::now() < give_up {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// What to do after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Continue,
    Close,
    Shutdown,
}

/// The answer to one frame, if any, and what happens next.
#[derive(Debug)]
struct Step {
    reply: Option<ResponseEnvelope>,
    then: Then,
}

impl Step {
    fn answer(id: u64, result: Result<Response, AgentError>, then: Then) -> Self {
        Self {
            reply: Some(ResponseEnvelope { id, result }),
            then,
        }
    }
}

/// Per-connection state.
#[derive(Debug)]
struct Session<'a> {
    context: &'a AgentContext,
    /// The negotiated protocol version, once `Hello` succeeded.
    version: Option<u16>,
}

impl Session<'_> {
    fn on_frame(&mut self, payload: &[u8]) -> Step {
        let envelope = match decode_request(payload) {
            Ok(envelope) => envelope,
            Err(undecodable) => return *undecodable,
        };
        let id = envelope.id;
        match (self.version, envelope.request) {
            (_, Request::Hello(hello)) => match handlers::hello(self.context, &hello) {
                Ok(ack) => {
                    self.version = Some(ack.version);
                    Step::answer(id, Ok(Response::Hello(ack)), Then::Continue)
                }
                Err(error) => {
                    console!("refused a host: {error}");
                    Step::answer(id, Err(error), Then::Close)
                }
            },
            (None, request) => {
                let error = AgentError::new(
                    AgentErrorKind::Handshake,
                    format!(
                        "{} before Hello: the first request on a connection must be Hello",
                        request_name(&request)
                    ),
                );
                Step::answer(id, Err(error), Then::Continue)
            }
            (Some(_), Request::Ping) => Step::answer(id, handlers::ping(), Then::Continue),
            (Some(_), Request::SystemInfo) => {
                Step::answer(id, handlers::system_info(self.context), Then::Continue)
            }
            (Some(_), Request::CreateContainer(body)) => Step::answer(
                id,
                handlers::create_container(self.context, body),
                Then::Continue,
            ),
            (Some(_), Request::StartContainer(body)) => Step::answer(
                id,
                handlers::start_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::SignalContainer(body)) => Step::answer(
                id,
                handlers::signal_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::WaitContainer(body)) => Step::answer(
                id,
                handlers::wait_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::ExecProcess(body)) => Step::answer(
                id,
                handlers::exec_process(self.context, body),
                Then::Continue,
            ),
            (Some(_), Request::WaitExec(body)) => {
                Step::answer(id, handlers::wait_exec(self.context, &body), Then::Continue)
            }
            (Some(_), Request::ResizePty(body)) => Step::answer(
                id,
                handlers::resize_pty(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::CloseStdin(body)) => Step::answer(
                id,
                handlers::close_stdin(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::PauseContainer(body)) => Step::answer(
                id,
                handlers::pause_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::ResumeContainer(body)) => Step::answer(
                id,
                handlers::resume_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::TopContainer(body)) => Step::answer(
                id,
                handlers::top_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::StatsContainer(body)) => Step::answer(
                id,
                handlers::stats_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::DeleteContainer(body)) => Step::answer(
                id,
                handlers::delete_container(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::UnpackLayer(body)) => Step::answer(
                id,
                handlers::unpack_layer(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::CreateDirs(body)) => Step::answer(
                id,
                handlers::create_dirs(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::RemoveDirs(body)) => Step::answer(
                id,
                handlers::remove_dirs(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::StatPath(body)) => {
                Step::answer(id, handlers::stat_path(self.context, &body), Then::Continue)
            }
            (Some(_), Request::ReadArchive(body)) => Step::answer(
                id,
                handlers::read_archive(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::WriteArchive(body)) => Step::answer(
                id,
                handlers::write_archive(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::DiffLayer(body)) => Step::answer(
                id,
                handlers::diff_layer(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::ListStorage) => {
                Step::answer(id, handlers::list_storage(self.context), Then::Continue)
            }
            (Some(_), Request::MeasureDirs(body)) => Step::answer(
                id,
                handlers::measure_dirs(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::TrimStorage) => {
                Step::answer(id, handlers::trim_storage(self.context), Then::Continue)
            }
            (Some(_), Request::MountShares(body)) => {
                Step::answer(id, handlers::mount_shares(&body), Then::Continue)
            }
            (Some(_), Request::CopyUp(body)) => {
                Step::answer(id, handlers::copy_up(self.context, &body), Then::Continue)
            }
            (Some(_), Request::Notify(body)) => {
                Step::answer(id, handlers::notify(&body), Then::Continue)
            }
            (Some(_), Request::SetDnsNames(body)) => Step::answer(
                id,
                handlers::set_dns_names(self.context, body),
                Then::Continue,
            ),
            (Some(_), Request::ConnectNetwork(body)) => Step::answer(
                id,
                handlers::connect_network(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::DisconnectNetwork(body)) => Step::answer(
                id,
                handlers::disconnect_network(self.context, &body),
                Then::Continue,
            ),
            (Some(_), Request::Shutdown) => {
                let result = handlers::shutdown();
                let then = if result.is_ok() {
                    Then::Shutdown
                } else {
                    Then::Continue
                };
                Step::answer(id, result, then)
            }
        }
    }
}

/// Decodes a frame's payload into a request, or into the step that answers it: a payload that
/// is JSON gets an error under its own id (when it has a readable one) and the connection goes
/// on; one that is not JSON closes it like any other broken frame.
fn decode_request(payload: &[u8]) -> Result<RequestEnvelope, Box<Step>> {
    let error = match serde_json::from_slice(payload) {
        Ok(envelope) => return Ok(envelope),
        Err(error) => error,
    };
    let Ok(frame) = serde_json::from_slice::<Value>(payload) else {
        return Err(Box::new(on_frame_error(&FrameError::Payload(error))));
    };
    let id = frame
        .get("id")
        .and_then(Value::as_u64)
        .unwrap_or(UNKNOWN_ID);
    let request_type = frame
        .get("request")
        .and_then(|request| request.get("type"))
        .and_then(Value::as_str);
    // serde reports a tag it does not know as "unknown variant `…`" (its `unknown_variant`
    // error); the session tests pin that down.
    let answer = match request_type {
        Some(name) if error.to_string().starts_with("unknown variant") => AgentError::new(
            AgentErrorKind::Unsupported,
            format!(
                "this agent ({AGENT_VERSION}) does not know the request {name:?}; \
                 update the guest image"
            ),
        ),
        _ => AgentError::new(
            AgentErrorKind::InvalidArgument,
            format!("malformed request: {error}"),
        ),
    };
    Err(Box::new(Step::answer(id, Err(answer), Then::Continue)))
}

/// The answer to a frame that could not be read, if one can be sent; the connection closes
/// either way.
fn on_frame_error(error: &FrameError) -> Step {
    let reply = match error {
        // The connection itself is gone or desynchronised; there is no one to answer.
        FrameError::Io(_) | FrameError::Truncated => None,
        FrameError::FutureVersion { .. } => Some(AgentErrorKind::Handshake),
        FrameError::BadMagic(_) | FrameError::TooLarge { .. } | FrameError::Payload(_) => {
            Some(AgentErrorKind::InvalidArgument)
        }
    };
    console!("closing a control connection: {}", Chain(error));
    Step {
        reply: reply.map(|kind| ResponseEnvelope {
            id: UNKNOWN_ID,
            result: Err(AgentError::new(kind, Chain(error).to_string())),
        }),
        then: Then::Close,
    }
}

fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello(_) => "Hello",
        Request::Ping => "Ping",
        Request::SystemInfo => "SystemInfo",
        Request::Shutdown => "Shutdown",
        Request::CreateContainer(_) => "CreateContainer",
        Request::StartContainer(_) => "StartContainer",
        Request::SignalContainer(_) => "SignalContainer",
        Request::WaitContainer(_) => "WaitContainer",
        Request::ExecProcess(_) => "ExecProcess",
        Request::WaitExec(_) => "WaitExec",
        Request::ResizePty(_) => "ResizePty",
        Request::CloseStdin(_) => "CloseStdin",
        Request::PauseContainer(_) => "PauseContainer",
        Request::ResumeContainer(_) => "ResumeContainer",
        Request::TopContainer(_) => "TopContainer",
        Request::StatsContainer(_) => "StatsContainer",
        Request::DeleteContainer(_) => "DeleteContainer",
        Request::UnpackLayer(_) => "UnpackLayer",
        Request::CreateDirs(_) => "CreateDirs",
        Request::RemoveDirs(_) => "RemoveDirs",
        Request::StatPath(_) => "StatPath",
        Request::ReadArchive(_) => "ReadArchive",
        Request::WriteArchive(_) => "WriteArchive",
        Request::DiffLayer(_) => "DiffLayer",
        Request::ListStorage => "ListStorage",
        Request::MeasureDirs(_) => "MeasureDirs",
        Request::TrimStorage => "TrimStorage",
        Request::MountShares(_) => "MountShares",
        Request::CopyUp(_) => "CopyUp",
        Request::Notify(_) => "Notify",
        Request::SetDnsNames(_) => "SetDnsNames",
        Request::ConnectNetwork(_) => "ConnectNetwork",
        Request::DisconnectNetwork(_) => "DisconnectNetwork",
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::thread::{self, JoinHandle};
    use std::time::Duration;

    use agent_protocol::frame::{encode_frame, FrameHeader};
    use agent_protocol::{read_frame, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

    use super::*;
    use crate::Mode;

    /// Long enough for a loaded machine; a hung session fails the test instead of hanging it.
    const TIMEOUT: Duration = Duration::from_secs(10);

    /// 2023-11-14, as any host clock might read.
    const HOST_TIME_NANOS: u128 = 1_700_000_000_123_456_789;

    /// A session on one end of a socket pair, served on its own thread; the other end is the
    /// host.
    fn start_session() -> (UnixStream, JoinHandle<Outcome>) {
        let (host, mut agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(TIMEOUT)).unwrap();
        let session = thread::spawn(move || {
            let context = AgentContext::with_boot_id(Mode::Native, "test-boot");
            serve_connection(&mut agent, &context)
        });
        (host, session)
    }

    fn hello_request() -> Request {
        Request::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            host_time_unix_nanos: HOST_TIME_NANOS,
        })
    }

    fn send(host: &mut UnixStream, id: u64, request: Request) {
        write_frame(host, &RequestEnvelope { id, request }).unwrap();
    }

    fn receive(host: &mut UnixStream) -> Option<ResponseEnvelope> {
        read_frame(host).unwrap()
    }

    fn call(host: &mut UnixStream, id: u64, request: Request) -> ResponseEnvelope {
        send(host, id, request);
        receive(host).unwrap()
    }

    fn error_kind(response: &ResponseEnvelope) -> Option<AgentErrorKind> {
        response.result.as_ref().err().map(|e| e.kind)
    }

    /// A frame with a valid header around an arbitrary payload.
    fn raw_frame(payload: &[u8]) -> Vec<u8> {
        let header = FrameHeader {
            version: PROTOCOL_VERSION,
            len: payload.len() as u32,
        };
        [&header.encode()[..], payload].concat()
    }

    fn handshaken_session() -> (UnixStream, JoinHandle<Outcome>) {
        let (mut host, session) = start_session();
        call(&mut host, 1, hello_request()).result.unwrap();
        (host, session)
    }

    #[test]
    fn serve_connection_hello_ping_system_info_are_answered() {
        let (mut host, session) = start_session();

        let hello = call(&mut host, 1, hello_request());
        let ping = call(&mut host, 2, Request::Ping);
        let info = call(&mut host, 3, Request::SystemInfo);
        drop(host);

        let Ok(Response::Hello(ack)) = hello.result else {
            panic!("unexpected hello answer {hello:?}");
        };
        assert_eq!(
            (ack.version, ack.boot_id.as_str()),
            (PROTOCOL_VERSION, "test-boot")
        );
        assert_eq!((ping.id, ping.result), (2, Ok(Response::Pong)));
        let Ok(Response::SystemInfo(info)) = info.result else {
            panic!("unexpected system info answer {info:?}");
        };
        assert_eq!(info.agent_version, AGENT_VERSION);
        assert!(info.mem_total_bytes > 0 && info.cpus > 0);
        assert_eq!(session.join().unwrap(), Outcome::Closed);
    }

    #[test]
    fn serve_connection_request_before_hello_is_refused_with_handshake_error() {
        let (mut host, _session) = start_session();

        let response = call(&mut host, 7, Request::Ping);

        assert_eq!(response.id, 7);
        assert_eq!(error_kind(&response), Some(AgentErrorKind::Handshake));
    }

    #[test]
    fn serve_connection_hello_after_refused_request_still_succeeds() {
        let (mut host, _session) = start_session();
        call(&mut host, 1, Request::SystemInfo);

        let response = call(&mut host, 2, hello_request());

        assert!(matches!(response.result, Ok(Response::Hello(_))));
    }

    #[test]
    fn serve_connection_disjoint_versions_are_refused_and_closed() {
        let (mut host, session) = start_session();
        let future_only = Request::Hello(Hello {
            min_version: PROTOCOL_VERSION + 1,
            max_version: PROTOCOL_VERSION + 1,
            host_time_unix_nanos: HOST_TIME_NANOS,
        });

        let response = call(&mut host, 1, future_only);

        assert_eq!(error_kind(&response), Some(AgentErrorKind::Handshake));
        assert!(receive(&mut host).is_none());
        drop(host);
        assert_eq!(session.join().unwrap(), Outcome::Closed);
    }

    #[test]
    fn serve_connection_future_frame_version_is_refused_and_closed() {
        let (mut host, session) = start_session();
        let mut frame = encode_frame(&RequestEnvelope {
            id: 1,
            request: hello_request(),
        })
        .unwrap();
        // The version field of the header, rewritten to one this build cannot know.
        frame[2..4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());

        host.write_all(&frame).unwrap();
        let response = receive(&mut host).unwrap();

        assert_eq!(error_kind(&response), Some(AgentErrorKind::Handshake));
        assert!(receive(&mut host).is_none());
        drop(host);
        assert_eq!(session.join().unwrap(), Outcome::Closed);
    }

    #[test]
    fn serve_connection_bad_magic_is_invalid_argument_and_closed() {
        let (mut host, session) = start_session();

        host.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let response = receive(&mut host).unwrap();

        assert_eq!(error_kind(&response), Some(AgentErrorKind::InvalidArgument));
        assert!(receive(&mut host).is_none());
        drop(host);
        assert_eq!(session.join().unwrap(), Outcome::Closed);
    }

    #[test]
    fn serve_connection_non_json_payload_is_invalid_argument_and_closed() {
        let (mut host, session) = start_session();

        host.write_all(&raw_frame(b"{not json")).unwrap();
        let response = receive(&mut host).unwrap();

        assert_eq!(error_kind(&response), Some(AgentErrorKind::InvalidArgument));
        assert!(receive(&mut host).is_none());
        drop(host);
        assert_eq!(session.join().unwrap(), Outcome::Closed);
    }

    #[test]
    fn serve_connection_unknown_request_type_is_unsupported_and_connection_stays_open() {
        let (mut host, _session) = handshaken_session();

        host.write_all(&raw_frame(br#"{"id":5,"request":{"type":"Teleport"}}"#))
            .unwrap();
        let unknown = receive(&mut host).unwrap();
        let ping = call(&mut host, 6, Request::Ping);

        assert_eq!(unknown.id, 5);
        assert_eq!(error_kind(&unknown), Some(AgentErrorKind::Unsupported));
        assert_eq!(ping.result, Ok(Response::Pong));
    }

    #[test]
    fn serve_connection_malformed_request_body_is_invalid_argument_with_its_id() {
        let (mut host, _session) = start_session();
        let payload = br#"{"id":9,"request":{"type":"Hello","body":{"min_version":"one"}}}"#;

        host.write_all(&raw_frame(payload)).unwrap();
        let response = receive(&mut host).unwrap();

        assert_eq!(response.id, 9);
        assert_eq!(error_kind(&response), Some(AgentErrorKind::InvalidArgument));
    }

    #[test]
    fn serve_connection_shutdown_answers_done_and_ends_in_shutdown() {
        let (mut host, session) = handshaken_session();

        let response = call(&mut host, 2, Request::Shutdown);

        assert_eq!(response.result, Ok(Response::Done));
        assert!(receive(&mut host).is_none());
        drop(host);
        assert_eq!(session.join().unwrap(), Outcome::Shutdown);
    }

    #[test]
    fn serve_connection_host_hangup_ends_in_closed() {
        let (host, session) = handshaken_session();

        drop(host);

        assert_eq!(session.join().unwrap(), Outcome::Closed);
    }
}
