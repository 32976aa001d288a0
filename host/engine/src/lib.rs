//! Docker-shaped logic of Berth, with no HTTP and no KVM: the VM lifecycle and its backends,
//! the client for the guest agent, the image store, and containers and execs run in the VM.

pub mod agent_client;
pub mod archive;
pub mod assets;
pub mod binds;
pub mod build;
pub mod commit;
pub mod containers;
pub mod error;
pub mod events;
pub mod exec;
pub mod host;
pub mod images;
pub mod machine;
pub mod network;
pub mod runtime;
pub(crate) mod sync;
pub mod vm;
pub mod volumes;
pub mod watch;

pub use agent_client::{AgentClient, AgentClientError};
pub use agent_protocol::{ContainerStats, SystemInfo, TopInfo};
pub use error::ErrorKind;
pub use runtime::{Engine, EngineConfig, EngineError, WaitCondition};
pub use vm::{select_backend, StopOutcome, Vm, VmBackend, VmConfig, VmError};
