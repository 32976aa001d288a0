//! Docker-shaped logic of Berth, with no HTTP and no KVM: the VM lifecycle and its backends,
//! and the client for the guest agent.

pub mod agent_client;
pub mod assets;
pub mod error;
pub mod host;
pub mod vm;

pub use agent_client::{AgentClient, AgentClientError};
pub use error::ErrorKind;
pub use agent_protocol::SystemInfo;
pub use vm::{select_backend, StopOutcome, Vm, VmBackend, VmConfig, VmError};
