//! The engine: containers and images, run in the machine's VM, in Docker's terms.
//!
//! Every operation here is what one Docker API call asks for, without HTTP: the API layer
//! parses the request, calls one method, and renders the answer or maps the error by its
//! [`ErrorKind`].

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use agent_protocol::{
    ContainerConfig, ContainerNetwork, CreateContainer, OverlayDirs, StreamHeader, StreamKind,
    SystemInfo,
};
use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::containers::io::StdinMessage;
use crate::containers::logs::LogStream;
use crate::containers::spec::{self, ContainerSpec, SpecError};
use crate::containers::{
    names, new_id, now_rfc3339, read_records, write_record, Container, ContainerRecord,
    ContainerState, ExitReport, Status,
};
use crate::events::Events;
use crate::images::{Image, ImageError, ImageStore, ImageUser};
use crate::machine::{describe, Machine, MachineError, Session};
use crate::network::forward::{self, Forwarders};
use crate::network::store::{self, Networks};
use crate::network::{
    self as net, BridgeEndpoint, Ipam, NetworkMode, NetworkSettings, DEFAULT_NETWORK,
};
use crate::sync::lock;
use crate::vm::VmConfig;
use crate::volumes::{VolumeError, VolumeStore};
use crate::ErrorKind;

mod storage;

pub use storage::{DiskUsage, PruneReport};

/// How long `docker stop` waits by default before SIGKILL.
const DEFAULT_STOP_TIMEOUT: i64 = 10;
/// How long to wait for a container to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);
/// The cgroup under which every container's cgroup is created in the guest.
const CGROUP_PARENT: &str = "berth";
/// Size of a read from a container's output stream.
const READ_CHUNK: usize = 32 * 1024;
/// Exit code Docker reports for a container whose run ended without an exit status.
const LOST_EXIT_CODE: i32 = 255;

/// Why an engine operation failed.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("No such container: {0}")]
    NoSuchContainer(String),
    #[error("No such exec instance: {0}")]
    NoSuchExec(String),
    #[error("Could not find the file {path} in container {container}")]
    NoSuchPath { path: String, container: String },
    #[error("Conflict. The container name \"/{name}\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name.")]
    NameInUse { name: String, id: String },
    #[error("Container {0} is not running")]
    NotRunning(String),
    #[error("Container {0} is paused, unpause the container before stopping or killing")]
    Paused(String),
    #[error("Container {0} is not paused")]
    NotPaused(String),
    #[error("cannot remove container \"/{0}\": container is running: stop the container before removing or force remove")]
    RemoveRunning(String),
    #[error("container {0} is already {1}")]
    AlreadyInState(String, &'static str),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Name(#[from] names::InvalidName),
    #[error("{}", describe(.0))]
    Machine(#[from] MachineError),
    #[error("cannot {0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    #[error("{0}")]
    Volume(#[from] VolumeError),
    #[error("{0}")]
    Mount(#[from] crate::containers::mounts::MountSpecError),
    #[error("{0}")]
    Bind(#[from] crate::binds::BindError),
    #[error("{0}")]
    Network(#[from] crate::network::NetworkError),
}

impl EngineError {
    /// The class of failure, for the API's status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NoSuchContainer(_) | Self::NoSuchExec(_) | Self::NoSuchPath { .. } => {
                ErrorKind::NotFound
            }
            Self::NameInUse { .. }
            | Self::NotRunning(_)
            | Self::Paused(_)
            | Self::NotPaused(_)
            | Self::RemoveRunning(_) => ErrorKind::Conflict,
            Self::AlreadyInState(..) => ErrorKind::NotModified,
            Self::InvalidArgument(_) | Self::Name(_) => ErrorKind::InvalidArgument,
            Self::Image(e) => e.kind(),
            Self::Spec(e) => e.kind(),
            Self::Machine(e) => e.kind(),
            Self::Io(..) => ErrorKind::Internal,
            Self::Volume(e) => e.kind(),
            Self::Mount(crate::containers::mounts::MountSpecError::Volume(e)) => e.kind(),
            Self::Mount(_) => ErrorKind::InvalidArgument,
            Self::Bind(e) => e.kind(),
            Self::Network(e) => e.kind(),
        }
    }
}

/// Where the engine keeps its state and how it boots its VM.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Images, containers and logs on the host.
    pub data_root: PathBuf,
    /// The VM containers run in.
    pub vm: VmConfig,
}

/// What `docker wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCondition {
    /// Return at once if the container is not running, else at its exit.
    NotRunning,
    /// The next exit.
    NextExit,
    /// Its removal.
    Removed,
}

/// The Docker engine, minus HTTP.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    /// The image store.
    pub images: Arc<ImageStore>,
    /// Volume records.
    pub volumes: VolumeStore,
    /// Host-side watches of running containers' bind sources; started with the first bind.
    bind_watcher: std::sync::OnceLock<Option<crate::watch::BindWatcher>>,
    /// The VM.
    pub machine: Machine,
    /// What happened, for `docker events`.
    pub events: Events,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    pub(crate) execs: Mutex<HashMap<String, Arc<crate::exec::Exec>>>,
    last_info: Mutex<Option<SystemInfo>>,
    /// Addresses on the default bridge.
    ipam: Ipam,
    /// User-defined networks.
    pub networks: Networks,
    /// Published ports of running containers, by container id.
    forwarders: Mutex<HashMap<String, Forwarders>>,
}

impl Engine {
    /// Opens the state under `config.data_root`. Containers recorded as running belonged to a
    /// VM that is gone with the berthd that ran it: they are marked exited with a reason.
    pub fn open(config: EngineConfig) -> Result<Arc<Self>, EngineError> {
        let images = ImageStore::open(&config.data_root.join("images"))?;
        let volumes = VolumeStore::open(&config.data_root.join("volumes"))?;
        let machine = Machine::new(config.vm.clone());
        let networks = Networks::open(&config.data_root.join("networks"))
            .map_err(|e| EngineError::Io("open the network records", e))?;
        let engine = Arc::new(Self {
            images: Arc::new(images),
            volumes,
            bind_watcher: std::sync::OnceLock::new(),
            machine,
            events: Events::new(),
            containers: RwLock::new(HashMap::new()),
            execs: Mutex::new(HashMap::new()),
            last_info: Mutex::new(None),
            ipam: Ipam::default_bridge(),
            networks,
            forwarders: Mutex::new(HashMap::new()),
            config,
        });
        engine.restore()?;
        Ok(engine)
    }

    fn containers_root(&self) -> PathBuf {
        self.config.data_root.join("containers")
    }

    fn restore(&self) -> Result<(), EngineError> {
        let records = read_records(&self.containers_root())
            .map_err(|e| EngineError::Io("read the container records", e))?;
        let mut containers = self
            .containers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for (mut record, dir) in records {
            if record.state.status.is_running()
                || matches!(record.state.status, Status::Restarting | Status::Removing)
            {
                record.state.status = Status::Exited;
                record.state.exit_code = LOST_EXIT_CODE;
                record.state.error = "berthd stopped while the container ran".into();
                record.state.finished_at = now_rfc3339();
                record.network = NetworkSettings::default();
                if let Err(e) = write_record(&dir, &record) {
                    warn!(id = %record.id, error = %e, "cannot update a container record");
                }
            }
            match Container::new(record, dir) {
                Ok(container) => {
                    containers.insert(container.id.clone(), Arc::new(container));
                }
                Err(e) => warn!(error = %e, "cannot open a container's log; skipping it"),
            }
        }
        info!(containers = containers.len(), "state restored");
        Ok(())
    }

    /// Facts about the guest, booting the VM if none runs.
    pub async fn system_info(&self) -> Result<SystemInfo, EngineError> {
        let session = self.machine.session().await?;
        let info = session.system_info().await?;
        *lock(&self.last_info) = Some(info.clone());
        Ok(info)
    }

    /// The guest facts last seen, without booting anything.
    pub fn cached_system_info(&self) -> Option<SystemInfo> {
        lock(&self.last_info).clone()
    }

    // ---- lookups ------------------------------------------------------------------------

    /// Every container.
    pub fn list(&self) -> Vec<Arc<Container>> {
        self.containers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// A container by full id, name (with or without `/`), or unique id prefix.
    pub fn container(&self, reference: &str) -> Result<Arc<Container>, EngineError> {
        let containers = self
            .containers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(container) = containers.get(reference) {
            return Ok(Arc::clone(container));
        }
        let name = reference.strip_prefix('/').unwrap_or(reference);
        if let Some(container) = containers.values().find(|c| c.record().name == name) {
            return Ok(Arc::clone(container));
        }
        if !reference.is_empty() && reference.chars().all(|c| c.is_ascii_hexdigit()) {
            let mut matching = containers.values().filter(|c| c.id.starts_with(reference));
            if let (Some(found), None) = (matching.next(), matching.next()) {
                return Ok(Arc::clone(found));
            }
        }
        Err(EngineError::NoSuchContainer(reference.to_owned()))
    }

    /// A container using the image `image_id` (a running one if any runs), for `docker rmi`.
    pub fn image_user(&self, image_id: &str) -> Option<ImageUser> {
        let users: Vec<ContainerRecord> = self
            .list()
            .iter()
            .map(|c| c.record())
            .filter(|r| r.image_id == image_id)
            .collect();
        let chosen = users
            .iter()
            .find(|r| r.state.status.is_running())
            .or(users.first())?;
        Some(ImageUser {
            container_id: chosen.id.clone(),
            running: chosen.state.status.is_running(),
        })
    }

    /// Where images, containers and logs are kept on the host.
    pub fn data_root(&self) -> &Path {
        &self.config.data_root
    }

    // ---- create / rename / remove -------------------------------------------------------

    /// `docker create`: stores a container for `spec`, named `name` or a random name.
    pub async fn create(
        &self,
        name: Option<&str>,
        spec: ContainerSpec,
    ) -> Result<Arc<Container>, EngineError> {
        spec::validate(&spec)?;
        self.check_networks(&spec)?;
        let store = Arc::clone(&self.images);
        let reference = spec.image.clone();
        let image = blocking_image(move || store.resolve(&reference)).await?;
        let mut spec = spec;
        let image_config = image.config.config().clone().unwrap_or_default();
        let anonymous = self.resolve_mounts(&mut spec, &image_config)?;
        let created = self.store_new_container(name, spec, &image).await;
        if created.is_err() {
            self.forget_volumes(&anonymous);
        }
        created
    }

    async fn store_new_container(
        &self,
        name: Option<&str>,
        spec: ContainerSpec,
        image: &Image,
    ) -> Result<Arc<Container>, EngineError> {
        let id = new_id();
        let mut containers = self
            .containers
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let name = match name.filter(|n| !n.is_empty()) {
            Some(name) => {
                let name = names::validate(name)?;
                if let Some(holder) = containers.values().find(|c| c.record().name == name) {
                    return Err(EngineError::NameInUse {
                        name,
                        id: holder.id.clone(),
                    });
                }
                name
            }
            None => (0..)
                .map(names::random_name)
                .find(|n| !containers.values().any(|c| &c.record().name == n))
                .expect("an unbounded search finds a free name"),
        };
        let record = ContainerRecord {
            id: id.clone(),
            name: name.clone(),
            created: now_rfc3339(),
            image_id: image.id.clone(),
            spec,
            state: ContainerState::default(),
            restart_count: 0,
            stopped_by_user: false,
            network: Default::default(),
        };
        let dir = self.containers_root().join(&id);
        write_record(&dir, &record).map_err(|e| EngineError::Io("store the container", e))?;
        let container = Arc::new(
            Container::new(record.clone(), dir)
                .map_err(|e| EngineError::Io("create the container's log", e))?,
        );
        containers.insert(id.clone(), Arc::clone(&container));
        drop(containers);
        self.events.emit(
            "container",
            "create",
            &id,
            [("name", name), ("image", record.spec.image)],
        );
        Ok(container)
    }

    /// `docker rename`.
    pub fn rename(&self, reference: &str, new_name: &str) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let new_name = names::validate(new_name)?;
        let containers = self
            .containers
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(holder) = containers
            .values()
            .find(|c| c.record().name == new_name && c.id != container.id)
        {
            return Err(EngineError::NameInUse {
                name: new_name,
                id: holder.id.clone(),
            });
        }
        let old = container
            .update(|r| std::mem::replace(&mut r.name, new_name.clone()))
            .map_err(|e| EngineError::Io("store the container", e))?;
        drop(containers);
        self.events.emit(
            "container",
            "rename",
            &container.id,
            [("name", new_name), ("oldName", format!("/{old}"))],
        );
        Ok(())
    }

    /// `docker rm`.
    pub async fn remove(self: &Arc<Self>, reference: &str, force: bool) -> Result<(), EngineError> {
        self.remove_with_volumes(reference, force, false).await
    }

    /// `docker rm [-v]`: with `volumes`, also the container's anonymous volumes that no other
    /// container uses.
    pub async fn remove_with_volumes(
        self: &Arc<Self>,
        reference: &str,
        force: bool,
        volumes: bool,
    ) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let _lifecycle = container.lifecycle.lock().await;
        let status = container.status();
        if status.is_running() || status == Status::Restarting {
            if !force {
                return Err(EngineError::RemoveRunning(container.record().name));
            }
            container
                .update(|r| r.stopped_by_user = true)
                .map_err(|e| EngineError::Io("store the container", e))?;
            self.kill_and_wait(&container).await?;
        }
        self.remove_locked(&container).await;
        if volumes {
            self.remove_anonymous_volumes(&container.record().spec.host.mounts)
                .await;
        }
        Ok(())
    }

    /// Removes a container whose lifecycle lock is held and which does not run.
    async fn remove_locked(&self, container: &Arc<Container>) {
        if *container.removed.borrow() {
            return;
        }
        let _ = container.update(|r| r.state.status = Status::Removing);
        if let Some(session) = self.machine.current().await {
            let dir = guest_container_dir(&session, &container.id);
            if let Err(e) = session.call(move |a| a.remove_dirs(vec![dir])).await {
                warn!(id = %container.id, error = %describe(&e), "cannot remove the container's writable layer in the guest");
            }
        }
        self.containers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&container.id);
        lock(&self.execs).retain(|_, exec| exec.container_id != container.id);
        if let Err(e) = std::fs::remove_dir_all(&container.dir) {
            warn!(id = %container.id, error = %e, "cannot remove the container's directory");
        }
        let record = container.record();
        self.events.emit(
            "container",
            "destroy",
            &container.id,
            [("name", record.name), ("image", record.spec.image)],
        );
        container.removed.send_replace(true);
    }

    // ---- start / stop / kill ------------------------------------------------------------

    /// `docker start`.
    pub async fn start(self: &Arc<Self>, reference: &str) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let _lifecycle = container.lifecycle.lock().await;
        match container.status() {
            Status::Running | Status::Paused => {
                return Err(EngineError::AlreadyInState(container.id.clone(), "started"))
            }
            Status::Removing | Status::Dead => {
                return Err(EngineError::InvalidArgument(format!(
                    "container {} is marked for removal and cannot be started",
                    container.id
                )))
            }
            _ => {}
        }
        container
            .update(|r| r.stopped_by_user = false)
            .map_err(|e| EngineError::Io("store the container", e))?;
        let launched = self.launch(&container).await;
        if launched.is_err() && container.record().spec.host.auto_remove {
            // As dockerd: a `--rm` container that cannot start is removed, so a client
            // waiting for its removal (`docker run --rm`) is not left waiting.
            self.remove_locked(&container).await;
            self.remove_anonymous_volumes(&container.record().spec.host.mounts)
                .await;
        }
        launched
    }

    /// Creates the container in the guest and starts it; on failure the container is left
    /// exited with the error.
    ///
    /// Boxed: a run's supervisor may launch the next run (restart policy), and the future
    /// types would otherwise contain themselves.
    fn launch<'a>(
        self: &'a Arc<Self>,
        container: &'a Arc<Container>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), EngineError>> + Send + 'a>>
    {
        Box::pin(self.launch_inner(container))
    }

    async fn launch_inner(self: &Arc<Self>, container: &Arc<Container>) -> Result<(), EngineError> {
        match self.try_launch(container).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.release_network(container).await;
                let message = e.to_string();
                let _ = container.update(|r| {
                    r.state.status = if r.state.started_at == crate::containers::ZERO_TIME {
                        Status::Created
                    } else {
                        Status::Exited
                    };
                    r.state.error = message;
                    r.state.exit_code = if matches!(e.kind(), ErrorKind::InvalidArgument) {
                        127
                    } else {
                        128
                    };
                });
                Err(e)
            }
        }
    }

    async fn try_launch(self: &Arc<Self>, container: &Arc<Container>) -> Result<(), EngineError> {
        let record = container.record();
        let store = Arc::clone(&self.images);
        let image_id = record.image_id.clone();
        let image = blocking_image(move || store.resolve(&image_id)).await?;
        let image_config = image.config.config().clone().unwrap_or_default();
        let runtime_spec = spec::build_runtime_spec(&record.spec, &image_config, &container.id)?;
        let exposed: Vec<String> = record
            .spec
            .exposed_ports
            .iter()
            .cloned()
            .chain(image_config.exposed_ports().clone().unwrap_or_default())
            .collect();
        let plan = self.plan_network(container, &record, &exposed)?;
        let session = self.storage_session().await?;
        let lower_dirs = self.ensure_layers(&session, &image).await?;
        let dir = guest_container_dir(&session, &container.id);
        let (rootfs, upper, work) = (dir.join("rootfs"), dir.join("upper"), dir.join("work"));
        let dirs = vec![rootfs.clone(), upper.clone(), work.clone()];
        session.call(move |a| a.create_dirs(dirs)).await?;
        let mut runtime_spec = runtime_spec;
        let extra_mounts = self
            .guest_mounts(&session, &record.spec.host.mounts, &lower_dirs)
            .await?;
        if !extra_mounts.is_empty() {
            let mut mounts = runtime_spec.mounts().clone().unwrap_or_default();
            mounts.extend(extra_mounts);
            runtime_spec.set_mounts(Some(mounts));
        }
        let hostname = runtime_spec.hostname().clone().unwrap_or_default();
        let seccomp_unconfined = record
            .spec
            .host
            .security_opt
            .iter()
            .any(|o| o == "seccomp=unconfined" || o == "seccomp:unconfined");
        let request = CreateContainer {
            id: container.id.clone(),
            config: Box::new(ContainerConfig {
                spec: runtime_spec,
                rootfs,
                overlay: Some(OverlayDirs {
                    lower_dirs,
                    upper_dir: Some(upper),
                    work_dir: Some(work),
                }),
                cgroup_parent: PathBuf::from(CGROUP_PARENT),
                hostname_file: Some(format!("{hostname}\n")),
                hosts_file: Some(net::hosts_file(
                    &hostname,
                    plan.own_address,
                    &record.spec.host.extra_hosts,
                )?),
                resolv_conf_file: Some(net::resolv_conf(&record.spec.host.dns, plan.dns_server)?),
                seccomp_unconfined,
                network: Some(plan.wire),
            }),
            stdin: record.spec.open_stdin,
            tty: record.spec.tty,
        };
        session.call(move |a| a.create_container(request)).await?;
        let io = match self.attach_run_io(&session, container, &record.spec).await {
            Ok(io) => io,
            Err(e) => {
                self.delete_in_guest(&session, &container.id).await;
                return Err(e);
            }
        };
        let id = container.id.clone();
        if let Err(e) = session.call(move |a| a.start_container(&id)).await {
            io.abort();
            self.delete_in_guest(&session, &container.id).await;
            return Err(e.into());
        }
        self.refresh_dns(&session, &plan.on_networks).await;
        if let (Some(target), false) = (plan.forward_to, plan.bound.is_empty()) {
            // The container runs already: a port that cannot be served is logged, not fatal.
            match forward::start(&session, &container.id, target, plan.bound) {
                Ok(forwarders) => {
                    lock(&self.forwarders).insert(container.id.clone(), forwarders);
                }
                Err(e) => {
                    warn!(id = %container.id, error = %e, "cannot serve the published ports")
                }
            }
        }
        container
            .update(|r| {
                r.state.status = Status::Running;
                r.state.started_at = now_rfc3339();
                r.state.error.clear();
                r.state.oom_killed = false;
                r.state.boot_id = session.boot_id().to_owned();
            })
            .map_err(|e| EngineError::Io("store the container", e))?;
        self.events.emit(
            "container",
            "start",
            &container.id,
            [("name", record.name), ("image", record.spec.image)],
        );
        self.watch_binds(&container.id, &record.spec.host.mounts);
        tokio::spawn(Arc::clone(self).supervise(Arc::clone(container), session, io));
        Ok(())
    }

    /// Decides the container's network for this run: addresses on its bridge networks
    /// (recorded at once, so a failed launch releases them), and its published ports bound on
    /// the host, before anything happens in the guest.
    fn plan_network(
        &self,
        container: &Arc<Container>,
        record: &ContainerRecord,
        exposed: &[String],
    ) -> Result<NetworkPlan, EngineError> {
        let host = &record.spec.host;
        let mode = NetworkMode::parse(&host.network_mode)?;
        let (wire, endpoints, forward_to) = match &mode {
            NetworkMode::None => (ContainerNetwork::None, Vec::new(), None),
            NetworkMode::Host => (
                ContainerNetwork::Host,
                Vec::new(),
                Some(Ipv4Addr::LOCALHOST),
            ),
            NetworkMode::Container(reference) => {
                let other = self.container(reference)?;
                if !other.status().is_running() || other.id == container.id {
                    return Err(EngineError::InvalidArgument(format!(
                        "cannot join network namespace of a non running container: {reference}"
                    )));
                }
                let address = other.record().network.endpoints.first().map(|b| b.address);
                let wire = ContainerNetwork::Container {
                    id: other.id.clone(),
                };
                (wire, Vec::new(), address)
            }
            NetworkMode::Bridge | NetworkMode::Named(_) => {
                let endpoints = self.allocate_endpoints(&mode, host)?;
                let wire = ContainerNetwork::Bridge {
                    endpoints: endpoints.iter().map(BridgeEndpoint::to_wire).collect(),
                };
                let first = endpoints.first().map(|e| e.address);
                (wire, endpoints, first)
            }
        };
        let own_address = endpoints.first().map(|e| e.address);
        let dns_server = endpoints
            .iter()
            .find(|e| e.network != DEFAULT_NETWORK)
            .map(|e| e.gateway);
        let on_networks = endpoints.iter().map(|e| e.network_id.clone()).collect();
        container
            .update(|r| {
                r.network = NetworkSettings {
                    endpoints,
                    ports: Vec::new(),
                }
            })
            .map_err(|e| EngineError::Io("store the container", e))?;
        let (bound, published) = match forward_to {
            Some(_) => {
                let bindings =
                    net::bindings_to_publish(&host.port_bindings, host.publish_all_ports, exposed)?;
                let endpoint = forward::Endpoint {
                    id: &container.id,
                    name: &record.name,
                };
                forward::bind_all(endpoint, &bindings)?
            }
            None => (Vec::new(), Vec::new()),
        };
        container
            .update(|r| r.network.ports = published)
            .map_err(|e| EngineError::Io("store the container", e))?;
        Ok(NetworkPlan {
            wire,
            own_address,
            dns_server,
            on_networks,
            forward_to,
            bound,
        })
    }

    /// An address on the mode's network and on every other network the container was
    /// connected to; nothing stays allocated if one fails.
    fn allocate_endpoints(
        &self,
        mode: &NetworkMode,
        host: &spec::HostSpec,
    ) -> Result<Vec<BridgeEndpoint>, EngineError> {
        let mut names: Vec<Option<&str>> = Vec::new();
        match mode {
            NetworkMode::Named(name) => names.push(Some(name)),
            _ => names.push(None),
        }
        for name in host.endpoints.keys() {
            if !matches!(mode, NetworkMode::Named(own) if own == name) {
                names.push(Some(name));
            }
        }
        let mut endpoints: Vec<BridgeEndpoint> = Vec::new();
        for (position, name) in names.into_iter().enumerate() {
            match self.allocate_endpoint(name, host, &format!("eth{position}")) {
                Ok(endpoint) => endpoints.push(endpoint),
                Err(e) => {
                    for endpoint in &endpoints {
                        self.release_endpoint(endpoint);
                    }
                    return Err(e);
                }
            }
        }
        Ok(endpoints)
    }

    /// An address on the user network `name`, or on the default bridge for `None`.
    pub(crate) fn allocate_endpoint(
        &self,
        name: Option<&str>,
        host: &spec::HostSpec,
        ifname: &str,
    ) -> Result<BridgeEndpoint, EngineError> {
        let Some(name) = name else {
            let address = self.ipam.allocate()?;
            return Ok(BridgeEndpoint {
                network: DEFAULT_NETWORK.to_owned(),
                network_id: store::builtin_id(DEFAULT_NETWORK),
                bridge: net::DEFAULT_BRIDGE.to_owned(),
                aliases: Vec::new(),
                ifname: ifname.to_owned(),
                address,
                prefix_len: self.ipam.prefix_len(),
                gateway: self.ipam.gateway(),
                mac: net::mac_for(address),
            });
        };
        let (network, ipam) = self.networks.get(name)?;
        let address = ipam.allocate()?;
        Ok(BridgeEndpoint {
            network: network.name.clone(),
            network_id: network.id.clone(),
            bridge: network.bridge(),
            aliases: host
                .endpoints
                .get(name)
                .map(|e| e.aliases.clone())
                .unwrap_or_default(),
            ifname: ifname.to_owned(),
            address,
            prefix_len: network.prefix_len,
            gateway: network.gateway,
            mac: net::mac_for(address),
        })
    }

    pub(crate) fn release_endpoint(&self, endpoint: &BridgeEndpoint) {
        if endpoint.network == DEFAULT_NETWORK {
            self.ipam.release(endpoint.address);
        } else if let Ok((_, ipam)) = self.networks.get(&endpoint.network_id) {
            ipam.release(endpoint.address);
        }
    }

    /// Ends the container's forwarders and returns its addresses: the run is over. The
    /// embedded DNS of its user networks forgets its names.
    async fn release_network(&self, container: &Arc<Container>) {
        lock(&self.forwarders).remove(&container.id);
        let mut left = Vec::new();
        let _ = container.update(|r| {
            for endpoint in r.network.endpoints.drain(..) {
                self.release_endpoint(&endpoint);
                left.push(endpoint.network_id);
            }
            r.network = NetworkSettings::default();
        });
        if let Some(session) = self.machine.current().await {
            self.refresh_dns(&session, &left).await;
        }
    }

    /// Sends the embedded DNS of each user network in `network_ids` the names of the
    /// containers running on it: container name, short id and aliases.
    pub(crate) async fn refresh_dns(&self, session: &Arc<Session>, network_ids: &[String]) {
        for network_id in network_ids {
            let Ok((network, _)) = self.networks.get(network_id) else {
                continue;
            };
            let mut names = Vec::new();
            for other in self.list() {
                let record = other.record();
                let Some(endpoint) = record
                    .network
                    .endpoints
                    .iter()
                    .find(|e| e.network_id == network.id)
                else {
                    continue;
                };
                names.push((record.name.clone(), endpoint.address));
                names.push((record.id[..12].to_owned(), endpoint.address));
                for alias in &endpoint.aliases {
                    names.push((alias.clone(), endpoint.address));
                }
            }
            let request = agent_protocol::DnsNames {
                gateway: network.gateway,
                names,
            };
            if let Err(e) = session.call(move |a| a.set_dns_names(request)).await {
                warn!(network = %network.name, error = %describe(&e), "cannot update the embedded DNS");
            }
        }
    }

    /// Makes sure every layer of `image` is unpacked in the guest; returns the layer
    /// directories top-most first, as overlayfs wants them.
    pub(crate) async fn ensure_layers(
        &self,
        session: &Arc<Session>,
        image: &Image,
    ) -> Result<Vec<PathBuf>, EngineError> {
        if !session
            .storage_synced
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // The data disk may hold layers from an earlier boot: learn them before uploading
            // (an unpack into an existing layer directory is refused).
            self.storage_session().await?;
        }
        let layers_root = session.storage_root().join("layers");
        let mut present = session.layers.lock().await;
        let mut dirs = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            let hex = layer
                .chain_id
                .strip_prefix("sha256:")
                .unwrap_or(&layer.chain_id);
            let dir = layers_root.join(hex);
            if !present.contains(&layer.chain_id) {
                let blob = self.images.blob_path(&layer.blob_digest)?;
                upload_layer(session, &blob, &dir).await?;
                present.insert(layer.chain_id.clone());
            }
            dirs.push(dir);
        }
        dirs.reverse();
        Ok(dirs)
    }

    /// Opens the run's stdio streams and starts pumping them.
    async fn attach_run_io(
        &self,
        session: &Arc<Session>,
        container: &Arc<Container>,
        spec: &ContainerSpec,
    ) -> Result<RunIo, EngineError> {
        let header = |kind| StreamHeader {
            container_id: container.id.clone(),
            exec_id: None,
            kind,
        };
        let mut pumps = Vec::new();
        let mut stdin_target = None;
        if spec.tty {
            let pty = session.open_stream(header(StreamKind::Pty)).await?;
            let (read, write) = pty.into_split();
            pumps.push(tokio::spawn(pump_output(
                Arc::clone(container),
                LogStream::Stdout,
                read,
            )));
            if spec.open_stdin {
                stdin_target = Some(StdinTarget::Pty(write));
            }
        } else {
            for (kind, stream) in [
                (StreamKind::Stdout, LogStream::Stdout),
                (StreamKind::Stderr, LogStream::Stderr),
            ] {
                let connection = session.open_stream(header(kind)).await?;
                pumps.push(tokio::spawn(pump_output(
                    Arc::clone(container),
                    stream,
                    connection,
                )));
            }
            if spec.open_stdin {
                let stdin = session.open_stream(header(StreamKind::Stdin)).await?;
                stdin_target = Some(StdinTarget::Pipe(stdin));
            }
        }
        let stdin = match (stdin_target, container.stdin.take_receiver()) {
            (Some(target), Some(receiver)) => Some(tokio::spawn(pump_stdin(receiver, target))),
            _ => None,
        };
        Ok(RunIo { pumps, stdin })
    }

    async fn delete_in_guest(&self, session: &Arc<Session>, id: &str) {
        let id = id.to_owned();
        if let Err(e) = session.call(move |a| a.delete_container(&id)).await {
            if !matches!(e, MachineError::Gone) {
                warn!(error = %describe(&e), "cannot delete a container in the guest");
            }
        }
    }

    /// Follows one run of a container to its end, then records the exit and applies
    /// `--rm` or the restart policy.
    async fn supervise(
        self: Arc<Self>,
        container: Arc<Container>,
        session: Arc<Session>,
        io: RunIo,
    ) {
        let id = container.id.clone();
        let waited = session.call_dedicated(move |a| a.wait_container(&id)).await;
        // Output ends after the process's last byte; the exit is reported only after it.
        for pump in io.pumps {
            let _ = pump.await;
        }
        if let Some(stdin) = io.stdin {
            stdin.abort();
        }
        container.hub.end_run();
        container.stdin.renew();
        let (code, error, oom_killed) = match waited {
            Ok(exit) => (exit.code, None, exit.oom_killed),
            Err(MachineError::Gone) => (
                LOST_EXIT_CODE,
                Some("the VM stopped while the container ran".to_owned()),
                false,
            ),
            Err(e) => (LOST_EXIT_CODE, Some(describe(&e)), false),
        };
        if !session.is_dead() {
            self.delete_in_guest(&session, &container.id).await;
        }
        self.unwatch_binds(&container.id);
        self.release_network(&container).await;
        let record = container
            .update(|r| {
                r.state.status = Status::Exited;
                r.state.exit_code = code;
                r.state.oom_killed = oom_killed;
                r.state.error = error.clone().unwrap_or_default();
                r.state.finished_at = now_rfc3339();
                r.clone()
            })
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot store a container's exit");
                container.record()
            });
        if oom_killed {
            self.events.emit(
                "container",
                "oom",
                &container.id,
                [("name", record.name.clone())],
            );
        }
        self.events.emit(
            "container",
            "die",
            &container.id,
            [
                ("name", record.name.clone()),
                ("image", record.spec.image.clone()),
                ("exitCode", code.to_string()),
            ],
        );
        container.exits.send_modify(|report| {
            *report = ExitReport {
                sequence: report.sequence + 1,
                code,
                error,
            }
        });
        if record.spec.host.auto_remove {
            let _lifecycle = container.lifecycle.lock().await;
            self.remove_locked(&container).await;
            // As dockerd: `--rm` also removes the container's anonymous volumes.
            self.remove_anonymous_volumes(&record.spec.host.mounts)
                .await;
            return;
        }
        let policy = &record.spec.host.restart_policy;
        if policy.should_restart(code, record.restart_count, record.stopped_by_user) {
            self.restart_by_policy(container, record.restart_count)
                .await;
        }
    }

    async fn restart_by_policy(self: Arc<Self>, container: Arc<Container>, restarts: i64) {
        let _ = container.update(|r| {
            r.state.status = Status::Restarting;
            r.restart_count += 1;
        });
        // Docker's back-off: 100 ms doubling, at most a minute.
        let delay = Duration::from_millis(100u64 << restarts.clamp(0, 9) as u32)
            .min(Duration::from_secs(60));
        tokio::time::sleep(delay).await;
        let _lifecycle = container.lifecycle.lock().await;
        if container.status() != Status::Restarting || container.record().stopped_by_user {
            return;
        }
        if let Err(e) = self.launch(&container).await {
            warn!(id = %container.id, error = %e, "restart policy could not start the container");
            let _ = container.update(|r| r.state.status = Status::Exited);
        }
    }

    /// `docker stop`: the stop signal, then SIGKILL after the timeout.
    pub async fn stop(
        self: &Arc<Self>,
        reference: &str,
        signal: Option<&str>,
        timeout: Option<i64>,
    ) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let _lifecycle = container.lifecycle.lock().await;
        self.stop_locked(&container, signal, timeout).await
    }

    async fn stop_locked(
        &self,
        container: &Arc<Container>,
        signal: Option<&str>,
        timeout: Option<i64>,
    ) -> Result<(), EngineError> {
        let record = container
            .update(|r| {
                r.stopped_by_user = true;
                r.clone()
            })
            .map_err(|e| EngineError::Io("store the container", e))?;
        match record.state.status {
            Status::Running | Status::Paused => {}
            Status::Restarting => {
                let _ = container.update(|r| r.state.status = Status::Exited);
                return Ok(());
            }
            _ => return Err(EngineError::AlreadyInState(container.id.clone(), "stopped")),
        }
        let signal_name = signal
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| Some(record.spec.stop_signal.clone()).filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "SIGTERM".to_owned());
        let number = spec::parse_signal(&signal_name).ok_or_else(|| {
            EngineError::InvalidArgument(format!("Invalid signal: {signal_name}"))
        })?;
        let timeout = timeout
            .or(record.spec.stop_timeout)
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        let mut exits = container.exits.subscribe();
        exits.mark_unchanged();
        if record.state.status == Status::Paused {
            self.resume_in_guest(container).await?;
        }
        self.signal_in_guest(container, number).await?;
        let waited = if timeout < 0 {
            exits.changed().await.is_ok()
        } else {
            let limit = Duration::from_secs(timeout as u64);
            matches!(
                tokio::time::timeout(limit, exits.changed()).await,
                Ok(Ok(()))
            )
        };
        if !waited {
            self.signal_in_guest(container, libc::SIGKILL).await?;
            let _ = tokio::time::timeout(KILL_WAIT, exits.changed()).await;
        }
        self.events
            .emit("container", "stop", &container.id, [("name", record.name)]);
        Ok(())
    }

    async fn kill_and_wait(&self, container: &Arc<Container>) -> Result<(), EngineError> {
        let mut exits = container.exits.subscribe();
        exits.mark_unchanged();
        if container.status() == Status::Restarting {
            let _ = container.update(|r| r.state.status = Status::Exited);
            return Ok(());
        }
        if container.status() == Status::Paused {
            self.resume_in_guest(container).await?;
        }
        self.signal_in_guest(container, libc::SIGKILL).await?;
        let _ = tokio::time::timeout(KILL_WAIT, exits.changed()).await;
        Ok(())
    }

    /// `docker kill`.
    pub async fn kill(&self, reference: &str, signal: Option<&str>) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let signal_name = signal.filter(|s| !s.is_empty()).unwrap_or("SIGKILL");
        let number = spec::parse_signal(signal_name).ok_or_else(|| {
            EngineError::InvalidArgument(format!("Invalid signal: {signal_name}"))
        })?;
        match container.status() {
            Status::Running => {}
            Status::Paused => return Err(EngineError::Paused(container.id.clone())),
            _ => return Err(EngineError::NotRunning(container.id.clone())),
        }
        if number == libc::SIGKILL {
            let _ = container.update(|r| r.stopped_by_user = true);
        }
        self.signal_in_guest(&container, number).await?;
        self.events.emit(
            "container",
            "kill",
            &container.id,
            [
                ("name", container.record().name),
                ("signal", number.to_string()),
            ],
        );
        Ok(())
    }

    /// `docker restart`.
    pub async fn restart(
        self: &Arc<Self>,
        reference: &str,
        timeout: Option<i64>,
    ) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let _lifecycle = container.lifecycle.lock().await;
        match self.stop_locked(&container, None, timeout).await {
            Ok(()) | Err(EngineError::AlreadyInState(..)) => {}
            Err(e) => return Err(e),
        }
        // The supervisor records the exit after the exit event; wait until it has.
        for _ in 0..100 {
            if !container.status().is_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        container
            .update(|r| r.stopped_by_user = false)
            .map_err(|e| EngineError::Io("store the container", e))?;
        self.launch(&container).await?;
        self.events.emit(
            "container",
            "restart",
            &container.id,
            [("name", container.record().name)],
        );
        Ok(())
    }

    /// `docker pause`.
    pub async fn pause(&self, reference: &str) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        match container.status() {
            Status::Running => {}
            Status::Paused => {
                return Err(EngineError::InvalidArgument(format!(
                    "Container {} is already paused",
                    container.id
                )))
            }
            _ => return Err(EngineError::NotRunning(container.id.clone())),
        }
        let session = self.running_session(&container).await?;
        let id = container.id.clone();
        session.call(move |a| a.pause_container(&id)).await?;
        let _ = container.update(|r| r.state.status = Status::Paused);
        self.events.emit(
            "container",
            "pause",
            &container.id,
            [("name", container.record().name)],
        );
        Ok(())
    }

    /// `docker unpause`.
    pub async fn unpause(&self, reference: &str) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        if container.status() != Status::Paused {
            return Err(EngineError::NotPaused(container.id.clone()));
        }
        self.resume_in_guest(&container).await?;
        self.events.emit(
            "container",
            "unpause",
            &container.id,
            [("name", container.record().name)],
        );
        Ok(())
    }

    async fn resume_in_guest(&self, container: &Arc<Container>) -> Result<(), EngineError> {
        let session = self.running_session(container).await?;
        let id = container.id.clone();
        session.call(move |a| a.resume_container(&id)).await?;
        let _ = container.update(|r| {
            if r.state.status == Status::Paused {
                r.state.status = Status::Running;
            }
        });
        Ok(())
    }

    async fn signal_in_guest(
        &self,
        container: &Arc<Container>,
        signal: i32,
    ) -> Result<(), EngineError> {
        let session = self.running_session(container).await?;
        let id = container.id.clone();
        session
            .call(move |a| a.signal_container(&id, None, signal))
            .await?;
        Ok(())
    }

    /// The session a running container runs in.
    pub(crate) async fn running_session(
        &self,
        container: &Arc<Container>,
    ) -> Result<Arc<Session>, EngineError> {
        let session = self
            .machine
            .current()
            .await
            .filter(|s| s.boot_id() == container.record().state.boot_id)
            .ok_or_else(|| EngineError::NotRunning(container.id.clone()))?;
        if !container.status().is_running() {
            return Err(EngineError::NotRunning(container.id.clone()));
        }
        Ok(session)
    }

    // ---- wait / resize / top / stats ----------------------------------------------------

    /// Starts waiting: the container is looked up and the wait registered now, so an exit
    /// right after this returns is not missed. The future resolves with the exit.
    pub fn wait(
        &self,
        reference: &str,
        condition: WaitCondition,
    ) -> Result<impl std::future::Future<Output = ExitReport> + Send + 'static, EngineError> {
        let container = self.container(reference)?;
        let mut exits = container.exits.subscribe();
        exits.mark_unchanged();
        let mut removed = container.removed.subscribe();
        let status = container.status();
        Ok(async move {
            match condition {
                WaitCondition::NotRunning
                    if !status.is_running() && status != Status::Restarting => {}
                WaitCondition::NotRunning | WaitCondition::NextExit => {
                    let _ = exits.changed().await;
                }
                WaitCondition::Removed => {
                    let _ = removed.wait_for(|r| *r).await;
                }
            }
            let report = exits.borrow().clone();
            report
        })
    }

    /// `docker resize` of a container's terminal.
    ///
    /// A container that is no longer running has no terminal to resize; like a resize that
    /// races with its exit, that is not an error.
    pub async fn resize(&self, reference: &str, rows: u16, cols: u16) -> Result<(), EngineError> {
        let container = self.container(reference)?;
        let Ok(session) = self.running_session(&container).await else {
            return Ok(());
        };
        let id = container.id.clone();
        session
            .call(move |a| a.resize_pty(&id, None, rows, cols))
            .await?;
        Ok(())
    }

    /// `docker top`.
    pub async fn top(&self, reference: &str) -> Result<agent_protocol::TopInfo, EngineError> {
        let container = self.container(reference)?;
        let session = self.running_session(&container).await?;
        let id = container.id.clone();
        Ok(session.call(move |a| a.top_container(&id)).await?)
    }

    /// One sample of `docker stats`.
    pub async fn stats(
        &self,
        reference: &str,
    ) -> Result<Option<agent_protocol::ContainerStats>, EngineError> {
        let container = self.container(reference)?;
        let Ok(session) = self.running_session(&container).await else {
            return Ok(None);
        };
        let id = container.id.clone();
        Ok(Some(session.call(move |a| a.stats_container(&id)).await?))
    }

    /// Shuts the VM down (berthd is exiting).
    pub async fn shutdown(&self) {
        self.machine.shutdown().await;
    }
}

/// The running parts of one run's stdio.
#[derive(Debug)]
struct RunIo {
    pumps: Vec<JoinHandle<()>>,
    stdin: Option<JoinHandle<()>>,
}

impl RunIo {
    fn abort(&self) {
        for pump in &self.pumps {
            pump.abort();
        }
        if let Some(stdin) = &self.stdin {
            stdin.abort();
        }
    }
}

/// Where a run's stdin goes.
#[derive(Debug)]
enum StdinTarget {
    Pipe(tokio::net::UnixStream),
    Pty(tokio::net::unix::OwnedWriteHalf),
}

async fn pump_output(
    container: Arc<Container>,
    stream: LogStream,
    mut source: impl tokio::io::AsyncRead + Unpin,
) {
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        match source.read(&mut buffer).await {
            Ok(0) => return,
            Ok(n) => {
                container
                    .hub
                    .publish(stream, Bytes::copy_from_slice(&buffer[..n]))
                    .await
            }
            Err(e) => {
                // The VM died or the stream broke: what arrived is logged, the rest is lost.
                tracing::debug!(error = %e, "container output stream ended with an error");
                return;
            }
        }
    }
}

async fn pump_stdin(mut receiver: tokio::sync::mpsc::Receiver<StdinMessage>, target: StdinTarget) {
    let (mut writer, is_pipe): (Box<dyn tokio::io::AsyncWrite + Send + Unpin>, bool) = match target
    {
        StdinTarget::Pipe(stream) => (Box::new(stream), true),
        StdinTarget::Pty(half) => (Box::new(half), false),
    };
    while let Some(message) = receiver.recv().await {
        match message {
            StdinMessage::Data(data) => {
                if writer.write_all(&data).await.is_err() {
                    return;
                }
            }
            StdinMessage::Eof => {
                if is_pipe {
                    // Half-closing the stdin stream closes the process's stdin.
                    let _ = writer.shutdown().await;
                }
                return;
            }
        }
    }
}

/// Streams a layer blob to the agent and has it unpacked into `dir`.
async fn upload_layer(session: &Arc<Session>, blob: &Path, dir: &Path) -> Result<(), EngineError> {
    let upload_id = format!("layer-{}", &new_id()[..16]);
    let mut stream = session
        .open_stream(StreamHeader {
            container_id: upload_id.clone(),
            exec_id: None,
            kind: StreamKind::LayerUpload,
        })
        .await?;
    let mut file = tokio::fs::File::open(blob)
        .await
        .map_err(|e| EngineError::Io("open a layer blob", e))?;
    let writer = tokio::spawn(async move {
        tokio::io::copy(&mut file, &mut stream).await?;
        stream.shutdown().await
    });
    let request = agent_protocol::UnpackLayer {
        upload_id,
        dir: dir.to_owned(),
        allow_devices: true,
    };
    let unpacked = session
        .call_dedicated(move |a| a.unpack_layer(request))
        .await;
    let written = writer.await;
    match unpacked {
        Ok(summary) => {
            info!(dir = %dir.display(), entries = summary.entries, bytes = summary.bytes, "layer unpacked in the guest");
        }
        // Unpacked by an earlier berthd in this same guest.
        Err(e) if e.is_agent_conflict() => {}
        Err(e) => return Err(e.into()),
    }
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(EngineError::Io("send a layer to the guest", e)),
        Err(e) => Err(EngineError::Machine(MachineError::Task(e.to_string()))),
    }
}

/// The guest directory holding a container's writable layer.
pub(crate) fn guest_container_dir(session: &Session, id: &str) -> PathBuf {
    session.storage_root().join("containers").join(id)
}

/// A run's network, decided by the host before the guest creates the container.
#[derive(Debug)]
struct NetworkPlan {
    /// What the agent sets up.
    wire: ContainerNetwork,
    /// The container's own address, for its `/etc/hosts`.
    own_address: Option<Ipv4Addr>,
    /// The embedded DNS server of its first user network, if it is on one.
    dns_server: Option<Ipv4Addr>,
    /// Ids of the networks it joins, whose DNS learns its names once it runs.
    on_networks: Vec<String>,
    /// Where published ports go in the guest; `None` publishes nothing (`--network none`).
    forward_to: Option<Ipv4Addr>,
    /// Host sockets of the published ports, bound and not yet serving.
    bound: Vec<forward::BoundPort>,
}

/// Runs an image-store call off the async threads.
pub async fn blocking_image<T, F>(work: F) -> Result<T, EngineError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ImageError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EngineError::Machine(MachineError::Task(e.to_string())))?
        .map_err(EngineError::Image)
}
