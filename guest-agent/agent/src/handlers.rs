//! Request handlers: validate, call a `do_*` function, map its error onto the wire.
//!
//! Handlers stay thin so the work they front can be tested on its own and the error mapping is
//! visible in one place. They run on the connection's thread and share [`AgentContext`].

use std::error::Error;

use agent_protocol::{
    negotiate_version, AgentError, AgentErrorKind, Hello, HelloAck, Response, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

use crate::log::{console, Chain};
use crate::{clock, sysinfo, Mode};

/// The agent's build version, reported in the handshake and in system info.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What every handler may consult: shared by all connections.
#[derive(Debug, Clone)]
pub struct AgentContext {
    /// Whether the agent owns the machine.
    pub mode: Mode,
    /// The kernel's boot id, read once at start.
    pub boot_id: String,
}

impl AgentContext {
    /// Reads the boot id; a guest without `/proc` still serves, with a boot id of `unknown`.
    pub fn new(mode: Mode) -> Self {
        let boot_id = sysinfo::read_boot_id().unwrap_or_else(|e| {
            console!("{}", Chain(&e));
            "unknown".to_owned()
        });
        Self::with_boot_id(mode, boot_id)
    }

    /// A context with a given boot id.
    pub fn with_boot_id(mode: Mode, boot_id: impl Into<String>) -> Self {
        Self {
            mode,
            boot_id: boot_id.into(),
        }
    }
}

/// `Hello`: agrees on a protocol version and, as PID 1, adopts the host's clock.
pub fn hello(context: &AgentContext, hello: &Hello) -> Result<HelloAck, AgentError> {
    let version = negotiate_version(hello.min_version, hello.max_version).ok_or_else(|| {
        AgentError::new(
            AgentErrorKind::Handshake,
            format!(
                "no common protocol version: the host speaks {}..={}, this agent \
                 {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; update berth so both match",
                hello.min_version, hello.max_version
            ),
        )
    })?;
    if context.mode == Mode::Pid1 {
        // Not fatal: a guest with a wrong clock still runs containers.
        if let Err(e) = clock::set_realtime(hello.host_time_unix_nanos) {
            console!("cannot adopt the host's clock: {}", Chain(&e));
        }
    }
    Ok(HelloAck {
        version,
        agent_version: AGENT_VERSION.to_owned(),
        boot_id: context.boot_id.clone(),
    })
}

/// `Ping`.
pub fn ping() -> Result<Response, AgentError> {
    Ok(Response::Pong)
}

/// `SystemInfo`.
pub fn system_info(context: &AgentContext) -> Result<Response, AgentError> {
    sysinfo::do_system_info(AGENT_VERSION, &context.boot_id)
        .map(Response::SystemInfo)
        .map_err(|e| internal(&e))
}

/// `Shutdown`: only acknowledges. The power-off itself happens once the answer is on its way
/// (see `server`), because nothing can be sent after it.
pub fn shutdown() -> Result<Response, AgentError> {
    Ok(Response::Done)
}

/// A failure inside the guest, with its whole cause chain for the host to show.
pub fn internal(error: &dyn Error) -> AgentError {
    AgentError::new(AgentErrorKind::Internal, Chain(error).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> AgentContext {
        AgentContext::with_boot_id(Mode::Native, "boot-1")
    }

    #[test]
    fn hello_overlapping_versions_acknowledges_with_boot_id() {
        let ack = hello(
            &context(),
            &Hello {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                host_time_unix_nanos: 0,
            },
        )
        .unwrap();

        assert_eq!(
            ack,
            HelloAck {
                version: PROTOCOL_VERSION,
                agent_version: AGENT_VERSION.to_owned(),
                boot_id: "boot-1".to_owned(),
            }
        );
    }

    #[test]
    fn hello_disjoint_versions_is_handshake_error() {
        let err = hello(
            &context(),
            &Hello {
                min_version: PROTOCOL_VERSION + 1,
                max_version: PROTOCOL_VERSION + 1,
                host_time_unix_nanos: 0,
            },
        )
        .unwrap_err();

        assert_eq!(err.kind, AgentErrorKind::Handshake);
    }
}
