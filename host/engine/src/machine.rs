//! The VM as berthd sees it: booted on first need, watched while it runs, replaced when it
//! dies.
//!
//! A [`Machine`] owns at most one running VM at a time, as a [`Session`]: the VM's processes,
//! one shared control connection for short calls, and the set of layers already unpacked in
//! that guest. Calls that last as long as a process (waits, layer unpacks) get a connection of
//! their own, so a slow call never holds up the others. A watcher notices when the VM process
//! exits, kills what is left of it and marks the session dead; every connection to it then
//! fails, which is how containers learn that their VM is gone. The next [`Machine::session`]
//! boots a fresh VM.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{AgentErrorKind, StreamHeader, SystemInfo};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::agent_client::{open_stream, open_stream_vsock, AgentClient, AgentClientError};
use crate::sync::lock;
use crate::vm::{error_chain, select_backend, StopOutcome, Vm, VmConfig, VmError};
use crate::ErrorKind;

/// How long a control connection may take to open and handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watcher checks that the VM process still runs.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a clean shutdown of the guest may take.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the machine could not serve a request.
#[derive(Debug, Error)]
pub enum MachineError {
    #[error("cannot boot the VM")]
    Boot(#[source] VmError),
    #[error("the VM stopped")]
    Gone,
    #[error("cannot talk to the guest agent")]
    Agent(#[source] AgentClientError),
    #[error("a blocking task of the engine failed: {0}")]
    Task(String),
}

impl MachineError {
    /// The class of failure, from the agent's own classification where it gave one.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Agent(AgentClientError::Agent(e)) => match e.kind {
                AgentErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
                AgentErrorKind::NotFound => ErrorKind::NotFound,
                AgentErrorKind::Conflict => ErrorKind::Conflict,
                _ => ErrorKind::Internal,
            },
            _ => ErrorKind::Internal,
        }
    }

    /// Whether the agent does not know the request (an older guest image).
    pub fn is_agent_unsupported(&self) -> bool {
        matches!(self, Self::Agent(AgentClientError::Agent(e)) if e.kind == AgentErrorKind::Unsupported)
    }

    /// Whether the agent refused the request as conflicting with the guest's state.
    pub fn is_agent_conflict(&self) -> bool {
        matches!(self, Self::Agent(AgentClientError::Agent(e)) if e.kind == AgentErrorKind::Conflict)
    }
}

/// Where the agent listens: the guest's vsock, or a native agent's unix socket (tier 1).
#[derive(Debug, Clone)]
pub enum AgentEndpoint {
    /// The hybrid vsock socket of a VM.
    Vsock(PathBuf),
    /// The control socket of an agent running natively on the host.
    Native(PathBuf),
}

impl AgentEndpoint {
    /// A new handshaken control connection.
    pub fn connect(&self) -> Result<AgentClient, AgentClientError> {
        match self {
            Self::Vsock(path) => AgentClient::connect(path, CONNECT_TIMEOUT),
            Self::Native(path) => {
                let stream = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                    AgentClientError::Connect {
                        path: path.display().to_string(),
                        source,
                    }
                })?;
                stream
                    .set_read_timeout(Some(CONNECT_TIMEOUT))
                    .map_err(AgentClientError::Io)?;
                AgentClient::handshake(stream)
            }
        }
    }

    /// A new stream connection named by `header`.
    pub fn open_stream(
        &self,
        header: &StreamHeader,
    ) -> Result<std::os::unix::net::UnixStream, AgentClientError> {
        match self {
            Self::Vsock(path) => open_stream_vsock(path, header, CONNECT_TIMEOUT),
            Self::Native(path) => open_stream(path, header, CONNECT_TIMEOUT),
        }
    }
}

/// One running guest and what berthd knows about it.
#[derive(Debug)]
pub struct Session {
    endpoint: AgentEndpoint,
    boot_id: String,
    storage_root: PathBuf,
    vm: Mutex<Option<Vm>>,
    control: Mutex<Option<AgentClient>>,
    dead: AtomicBool,
    died: Notify,
    /// Chain ids of the layers unpacked in this guest. Held across an upload, so two
    /// containers needing the same layer upload it once. Filled from the guest's data disk
    /// when the engine first prepares the session (`Engine::storage_session`).
    pub layers: tokio::sync::Mutex<HashSet<String>>,
    /// Whether the engine has reconciled this guest's storage with its records (set under
    /// the `layers` lock).
    pub storage_synced: AtomicBool,
}

impl Session {
    /// A session over an agent already handshaken at `endpoint`, with no VM of its own to
    /// watch (a native agent in tests, or a VM someone else supervises).
    pub fn over(endpoint: AgentEndpoint, client: AgentClient) -> Arc<Self> {
        Arc::new(Self::new(endpoint, client, None))
    }

    fn new(endpoint: AgentEndpoint, client: AgentClient, vm: Option<Vm>) -> Self {
        Self {
            endpoint,
            boot_id: client.hello().boot_id.clone(),
            storage_root: client.hello().storage_root.clone(),
            vm: Mutex::new(vm),
            control: Mutex::new(Some(client)),
            dead: AtomicBool::new(false),
            died: Notify::new(),
            layers: tokio::sync::Mutex::new(HashSet::new()),
            storage_synced: AtomicBool::new(false),
        }
    }

    /// The guest's boot id.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// The guest directory under which layers and writable layers live.
    pub fn storage_root(&self) -> &Path {
        &self.storage_root
    }

    /// Whether the VM has stopped.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Resolves once the VM has stopped.
    pub async fn died(&self) {
        let notified = self.died.notified();
        if self.is_dead() {
            return;
        }
        notified.await;
    }

    /// Runs `call` on the shared control connection, reconnecting if the last one broke.
    /// For calls that return promptly.
    pub async fn call<T, F>(self: &Arc<Self>, call: F) -> Result<T, MachineError>
    where
        T: Send + 'static,
        F: FnOnce(&mut AgentClient) -> Result<T, AgentClientError> + Send + 'static,
    {
        let session = Arc::clone(self);
        blocking(move || {
            if session.is_dead() {
                return Err(MachineError::Gone);
            }
            let mut control = lock(&session.control);
            let client = match control.as_mut() {
                Some(client) => client,
                None => control.insert(session.endpoint.connect().map_err(MachineError::Agent)?),
            };
            let result = call(client);
            if let Err(e) = &result {
                if !matches!(e, AgentClientError::Agent(_)) {
                    // The connection is in an unknown state: the next call opens another.
                    *control = None;
                }
            }
            result.map_err(|e| session.agent_error(e))
        })
        .await
    }

    /// Runs `call` on a connection of its own, for calls that last as long as a process.
    pub async fn call_dedicated<T, F>(self: &Arc<Self>, call: F) -> Result<T, MachineError>
    where
        T: Send + 'static,
        F: FnOnce(&mut AgentClient) -> Result<T, AgentClientError> + Send + 'static,
    {
        let session = Arc::clone(self);
        blocking(move || {
            if session.is_dead() {
                return Err(MachineError::Gone);
            }
            let mut client = session.endpoint.connect().map_err(MachineError::Agent)?;
            call(&mut client).map_err(|e| session.agent_error(e))
        })
        .await
    }

    /// Opens a stream connection, as a tokio socket.
    pub async fn open_stream(
        self: &Arc<Self>,
        header: StreamHeader,
    ) -> Result<tokio::net::UnixStream, MachineError> {
        let session = Arc::clone(self);
        let stream = blocking(move || {
            if session.is_dead() {
                return Err(MachineError::Gone);
            }
            session
                .endpoint
                .open_stream(&header)
                .map_err(|e| session.agent_error(e))
        })
        .await?;
        stream
            .set_nonblocking(true)
            .map_err(|e| MachineError::Agent(AgentClientError::Io(e)))?;
        tokio::net::UnixStream::from_std(stream)
            .map_err(|e| MachineError::Agent(AgentClientError::Io(e)))
    }

    /// Facts about the guest.
    pub async fn system_info(self: &Arc<Self>) -> Result<SystemInfo, MachineError> {
        self.call(|agent| agent.system_info()).await
    }

    /// A transport failure once the VM is gone is the VM's death, not the agent's fault.
    fn agent_error(&self, error: AgentClientError) -> MachineError {
        if self.is_dead() && !matches!(error, AgentClientError::Agent(_)) {
            MachineError::Gone
        } else {
            MachineError::Agent(error)
        }
    }

    /// Marks the session dead and kills what is left of the VM.
    fn mark_dead(&self) {
        self.dead.store(true, Ordering::SeqCst);
        if let Some(vm) = lock(&self.vm).take() {
            vm.kill();
        }
        *lock(&self.control) = None;
        self.died.notify_waiters();
    }
}

/// The VM berthd runs its containers in.
#[derive(Debug)]
pub struct Machine {
    config: VmConfig,
    current: tokio::sync::Mutex<Option<Arc<Session>>>,
}

impl Machine {
    /// A machine that boots VMs from `config` when first needed. A VM left running by an
    /// earlier berthd in the same state directory is stopped: its containers' state was not
    /// kept, so nothing can use it.
    pub fn new(config: VmConfig) -> Self {
        if let Ok(stale) = Vm::attach(&config.state_dir) {
            warn!(state_dir = %config.state_dir.display(), "stopping a VM left by an earlier run");
            stale.kill();
        }
        Self {
            config,
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The running session, if a VM runs.
    pub async fn current(&self) -> Option<Arc<Session>> {
        self.current
            .lock()
            .await
            .as_ref()
            .filter(|s| !s.is_dead())
            .cloned()
    }

    /// The running session, booting a VM first if none runs.
    pub async fn session(&self) -> Result<Arc<Session>, MachineError> {
        let mut current = self.current.lock().await;
        if let Some(session) = current.as_ref().filter(|s| !s.is_dead()) {
            return Ok(Arc::clone(session));
        }
        let config = self.config.clone();
        let (vm, client) = blocking(move || {
            let choice = select_backend();
            info!(reason = %choice.reason, "booting the VM");
            Vm::start(choice.backend.as_ref(), &config).map_err(MachineError::Boot)
        })
        .await?;
        let endpoint = AgentEndpoint::Vsock(self.config.vsock_socket());
        let session = Arc::new(Session::new(endpoint, client, Some(vm)));
        info!(boot_id = %session.boot_id, "VM ready");
        tokio::spawn(watch(Arc::clone(&session), self.config.console_log()));
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    /// Shuts the VM down cleanly, if one runs.
    pub async fn shutdown(&self) {
        let Some(session) = self.current.lock().await.take() else {
            return;
        };
        let vm = lock(&session.vm).take();
        session.dead.store(true, Ordering::SeqCst);
        if let Some(vm) = vm {
            let outcome = blocking(move || Ok(vm.stop(SHUTDOWN_TIMEOUT))).await;
            if !matches!(outcome, Ok(StopOutcome::Clean)) {
                warn!("the VM did not power off cleanly; it was killed");
            }
        }
        session.died.notify_waiters();
    }
}

/// Watches the VM process; when it exits, reports why and ends the session.
async fn watch(session: Arc<Session>, console_log: PathBuf) {
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if session.is_dead() {
            return;
        }
        let running = lock(&session.vm).as_mut().is_none_or(|vm| vm.is_running());
        if running {
            continue;
        }
        let diagnosis = std::fs::read_to_string(&console_log)
            .ok()
            .and_then(|console| crate::vm::diagnose_console(&console))
            .unwrap_or_else(|| format!("see {}", console_log.display()));
        warn!(boot_id = %session.boot_id, %diagnosis, "the VM stopped unexpectedly");
        session.mark_dead();
        return;
    }
}

/// Runs blocking work off the async threads.
pub async fn blocking<T, F>(work: F) -> Result<T, MachineError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, MachineError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| MachineError::Task(e.to_string()))?
}

/// The whole cause chain of a machine error, for logs and API messages.
pub fn describe(error: &MachineError) -> String {
    error_chain(error)
}
