//! The engine's side of guest storage: reconciling a freshly booted guest's data disk with
//! the host's records, volumes (create, list, remove, prune, and mounting them into
//! containers, copy-up included), bind mounts, and disk usage for `system df`.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use agent_protocol::CopyUp;
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{Mount, MountBuilder};
use tracing::{info, warn};

use super::{guest_container_dir, Engine, EngineError};
use crate::binds;
use crate::containers::mounts::{MountKind, MountPoint};
use crate::containers::spec::ContainerSpec;
use crate::containers::Container;
use crate::machine::{describe, Session};
use crate::volumes::{guest_data_dir, guest_volume_dir, VolumeError, VolumeRecord};

/// Space used in the guest, for `docker system df`.
#[derive(Debug, Clone, Default)]
pub struct DiskUsage {
    /// Bytes of each unpacked layer, by chain id.
    pub layers: BTreeMap<String, u64>,
    /// Bytes of each container's writable layer, by container id.
    pub containers: BTreeMap<String, u64>,
    /// Bytes of each volume's data, by name.
    pub volumes: BTreeMap<String, u64>,
    /// Bytes the data disk file occupies on the host.
    pub disk_allocated: Option<u64>,
}

/// What a prune removed.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Names of the removed volumes.
    pub removed: Vec<String>,
    /// Bytes their data used in the guest (0 when the VM was not running to measure it).
    pub reclaimed: u64,
}

impl Engine {
    /// The running session, booting a VM if none runs, with its storage reconciled: the first
    /// caller after a boot learns which layers the guest's data disk already holds (so they
    /// are not uploaded again), removes the writable layers and volumes removed while the VM
    /// was down, and mounts the host's shares.
    pub(crate) async fn storage_session(&self) -> Result<Arc<Session>, EngineError> {
        let session = self.machine.session().await?;
        let mut layers = session.layers.lock().await;
        if session.storage_synced.load(Ordering::SeqCst) {
            drop(layers);
            return Ok(session);
        }
        match session.call(|a| a.list_storage()).await {
            Ok(listing) => {
                layers.extend(listing.layers.iter().map(|hex| format!("sha256:{hex}")));
                let known: HashSet<String> = self.list().iter().map(|c| c.id.clone()).collect();
                let volumes: HashSet<String> =
                    self.volumes.list().into_iter().map(|v| v.name).collect();
                let root = session.storage_root().to_owned();
                let stale: Vec<PathBuf> = listing
                    .containers
                    .iter()
                    .filter(|id| !known.contains(*id))
                    .map(|id| guest_container_dir(&session, id))
                    .chain(
                        listing
                            .volumes
                            .iter()
                            .filter(|name| !volumes.contains(*name))
                            .map(|name| guest_volume_dir(&root, name)),
                    )
                    .collect();
                if !stale.is_empty() {
                    info!(
                        count = stale.len(),
                        "removing data of containers and volumes removed while the VM was down"
                    );
                    if let Err(e) = session.call(move |a| a.remove_dirs(stale)).await {
                        warn!(error = %describe(&e), "cannot remove stale guest data");
                    }
                }
                info!(
                    layers = listing.layers.len(),
                    persistent = listing.disk.persistent,
                    "guest storage reconciled"
                );
            }
            // An older guest image: its storage is a fresh tmpfs, nothing to reconcile.
            Err(e) if e.is_agent_unsupported() => {}
            Err(e) => return Err(e.into()),
        }
        self.collect_layers_locked(&session, &mut layers).await;
        let shares = binds::guest_shares(&self.config.vm.shares);
        if !shares.is_empty() {
            // Not fatal: containers without bind mounts still run; one with a bind then fails
            // to start, naming its missing source.
            if let Err(e) = session.call(move |a| a.mount_shares(shares)).await {
                warn!(error = %describe(&e), "cannot mount the host's shares in the guest");
            }
        }
        session.storage_synced.store(true, Ordering::SeqCst);
        drop(layers);
        Ok(session)
    }

    /// Removes unpacked layers no stored image uses from the running guest's data disk (after
    /// `docker rmi`/`image prune`). Does nothing if no VM runs: the next boot does it.
    pub async fn collect_guest_layers(&self) {
        let Some(session) = self.machine.current().await else {
            return;
        };
        let mut layers = session.layers.lock().await;
        if session.storage_synced.load(Ordering::SeqCst) {
            self.collect_layers_locked(&session, &mut layers).await;
        }
    }

    /// Removes the layers in `layers` (the guest's, held locked) that no image uses. Keeps
    /// everything if some container's image is gone from the store (its layers are still its
    /// root) or the store cannot be read.
    async fn collect_layers_locked(&self, session: &Arc<Session>, layers: &mut HashSet<String>) {
        let store = Arc::clone(&self.images);
        let Ok(images) = super::blocking_image(move || store.list()).await else {
            return;
        };
        let image_ids: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
        if self
            .list()
            .iter()
            .any(|c| !image_ids.contains(c.record().image_id.as_str()))
        {
            return;
        }
        let used: HashSet<&str> = images
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.chain_id.as_str()))
            .collect();
        let unused: Vec<String> = layers
            .iter()
            .filter(|chain| !used.contains(chain.as_str()))
            .cloned()
            .collect();
        if unused.is_empty() {
            return;
        }
        let root = session.storage_root().join("layers");
        let dirs: Vec<PathBuf> = unused
            .iter()
            .map(|chain| root.join(chain.strip_prefix("sha256:").unwrap_or(chain)))
            .collect();
        match session.call(move |a| a.remove_dirs(dirs)).await {
            Ok(()) => {
                info!(count = unused.len(), "removed unused layers from the guest");
                for chain in &unused {
                    layers.remove(chain);
                }
            }
            Err(e) => warn!(error = %describe(&e), "cannot remove unused layers in the guest"),
        }
    }

    /// Completes a new container's mounts before it is stored: names anonymous volumes,
    /// adds the image's and the config's `VOLUME`s not otherwise mounted and the mounts of
    /// `--volumes-from` containers, creates named volumes that do not exist yet, and checks
    /// bind sources against the shared roots. Returns the anonymous volumes it created, so a
    /// create that fails later can remove them.
    pub(crate) fn resolve_mounts(
        &self,
        spec: &mut ContainerSpec,
        image: &ImageConfig,
    ) -> Result<Vec<String>, EngineError> {
        let mut created = Vec::new();
        let result = self.resolve_mounts_into(spec, image, &mut created);
        if result.is_err() {
            self.forget_volumes(&created);
        }
        result.map(|()| created)
    }

    fn resolve_mounts_into(
        &self,
        spec: &mut ContainerSpec,
        image: &ImageConfig,
        created: &mut Vec<String>,
    ) -> Result<(), EngineError> {
        let mut mounts = std::mem::take(&mut spec.host.mounts);
        for from in &spec.host.volumes_from {
            let (reference, mode) = match from.rsplit_once(':') {
                Some((reference, mode @ ("ro" | "rw"))) => (reference, Some(mode)),
                _ => (from.as_str(), None),
            };
            let source = self.container(reference)?;
            for mount in source.record().spec.host.mounts {
                if mounts
                    .iter()
                    .any(|m| same_destination(m, &mount.destination))
                {
                    continue;
                }
                let read_only = mode.map_or(mount.read_only, |m| m == "ro");
                mounts.push(MountPoint { read_only, ..mount });
            }
        }
        let declared = image
            .volumes()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(spec.volumes.iter().cloned());
        for destination in declared {
            if !mounts.iter().any(|m| same_destination(m, &destination)) {
                mounts.push(MountPoint {
                    kind: MountKind::Volume,
                    source: String::new(),
                    destination,
                    read_only: false,
                    no_copy: false,
                    create_source: false,
                });
            }
        }
        for mount in &mut mounts {
            match mount.kind {
                MountKind::Volume if mount.source.is_empty() => {
                    let volume = self.volumes.create_anonymous()?;
                    created.push(volume.name.clone());
                    mount.source = volume.name;
                }
                MountKind::Volume => {
                    self.volumes.create(&mount.source, BTreeMap::new())?;
                }
                MountKind::Bind => {
                    if mount.create_source {
                        binds::create_missing_source(&mount.source, &self.config.vm.shares)?;
                    }
                    binds::resolve_source(&mount.source, &self.config.vm.shares)?;
                }
            }
        }
        spec.host.mounts = mounts;
        Ok(())
    }

    /// Removes volume records (and their data when the VM runs), ignoring failures: for
    /// cleaning up after a failed create and for `docker rm -v`.
    pub(crate) fn forget_volumes(&self, names: &[String]) {
        for name in names {
            if let Err(e) = self.volumes.remove(name) {
                warn!(volume = %name, error = %e, "cannot remove a volume record");
            }
        }
    }

    /// The OCI mounts of a container about to start in `session`: volume directories created
    /// (and filled from the image when fresh), bind sources mapped into the guest's shares.
    pub(crate) async fn guest_mounts(
        &self,
        session: &Arc<Session>,
        mounts: &[MountPoint],
        lower_dirs: &[PathBuf],
    ) -> Result<Vec<Mount>, EngineError> {
        let root = session.storage_root().to_owned();
        let mut oci = Vec::with_capacity(mounts.len());
        for mount in mounts {
            let source = match mount.kind {
                MountKind::Volume => {
                    let data = guest_data_dir(&root, &mount.source);
                    let dirs = vec![data.clone()];
                    session.call(move |a| a.create_dirs(dirs)).await?;
                    if !mount.no_copy {
                        let request = CopyUp {
                            lower_dirs: lower_dirs.to_vec(),
                            container_path: PathBuf::from(&mount.destination),
                            volume_dir: data.clone(),
                        };
                        session.call(move |a| a.copy_up(request)).await?;
                    }
                    data
                }
                MountKind::Bind => binds::resolve_source(&mount.source, &self.config.vm.shares)?,
            };
            let mode = if mount.read_only { "ro" } else { "rw" };
            let built = MountBuilder::default()
                .destination(&mount.destination)
                .typ("bind")
                .source(source)
                .options(vec!["rbind".to_owned(), mode.to_owned()])
                .build()
                .map_err(|e| EngineError::InvalidArgument(format!("invalid mount: {e}")))?;
            oci.push(built);
        }
        Ok(oci)
    }

    // ---- volumes ------------------------------------------------------------------------

    /// `docker volume create`: an unnamed request gets a random name.
    pub fn volume_create(
        &self,
        name: Option<&str>,
        driver: Option<&str>,
        driver_opts: &BTreeMap<String, String>,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeRecord, EngineError> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(name) => name.to_owned(),
            None => crate::containers::new_id(),
        };
        if let Some(driver) = driver.filter(|d| !d.is_empty() && *d != "local") {
            return Err(VolumeError::Driver {
                name,
                driver: driver.to_owned(),
            }
            .into());
        }
        if !driver_opts.is_empty() {
            return Err(VolumeError::Options { name }.into());
        }
        Ok(self.volumes.create(&name, labels)?)
    }

    /// The ids of the containers (in any state) that mount volume `name`.
    pub fn volume_users(&self, name: &str) -> Vec<String> {
        let mut users: Vec<String> = self
            .list()
            .iter()
            .filter(|c| uses_volume(c, name))
            .map(|c| c.id.clone())
            .collect();
        users.sort();
        users
    }

    /// `docker volume rm`: refused while a container uses it, even with `force` (as dockerd).
    pub async fn volume_remove(&self, name: &str, force: bool) -> Result<(), EngineError> {
        let record = match self.volumes.get(name) {
            Ok(record) => record,
            Err(VolumeError::NotFound(_)) if force => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let users = self.volume_users(&record.name);
        if !users.is_empty() {
            return Err(VolumeError::InUse {
                name: record.name,
                users,
            }
            .into());
        }
        self.volumes.remove(&record.name)?;
        self.remove_volume_data(std::slice::from_ref(&record.name))
            .await;
        self.events.emit(
            "volume",
            "destroy",
            &record.name,
            [("driver", "local".to_owned())],
        );
        Ok(())
    }

    /// `docker volume prune`: unused volumes; only anonymous ones unless `all`, and only those
    /// whose labels match `labels` (`key` or `key=value`).
    pub async fn volume_prune(
        &self,
        all: bool,
        labels: &[String],
    ) -> Result<PruneReport, EngineError> {
        let candidates: Vec<VolumeRecord> = self
            .volumes
            .list()
            .into_iter()
            .filter(|v| all || v.is_anonymous())
            .filter(|v| labels.iter().all(|l| label_matches(v, l)))
            .filter(|v| self.volume_users(&v.name).is_empty())
            .collect();
        let names: Vec<String> = candidates.iter().map(|v| v.name.clone()).collect();
        let reclaimed = self.measure_volumes(&names).await.values().sum();
        let mut removed = Vec::new();
        for name in names {
            if self.volumes.remove(&name).is_ok() {
                removed.push(name);
            }
        }
        self.remove_volume_data(&removed).await;
        for name in &removed {
            self.events
                .emit("volume", "destroy", name, [("driver", "local".to_owned())]);
        }
        self.trim().await;
        Ok(PruneReport { removed, reclaimed })
    }

    /// Removes the anonymous volumes of a removed container that no other container uses
    /// (`docker rm -v`).
    pub(crate) async fn remove_anonymous_volumes(&self, mounts: &[MountPoint]) {
        let names: Vec<String> = mounts
            .iter()
            .filter(|m| m.kind == MountKind::Volume)
            .filter(|m| self.volumes.get(&m.source).is_ok_and(|v| v.is_anonymous()))
            .filter(|m| self.volume_users(&m.source).is_empty())
            .map(|m| m.source.clone())
            .collect();
        self.forget_volumes(&names);
        self.remove_volume_data(&names).await;
    }

    /// Removes volumes' data in the guest, booting the VM if none runs: a volume created
    /// later under the same name must start empty. If that fails, the next boot's
    /// reconciliation removes the data of volumes without a record.
    async fn remove_volume_data(&self, names: &[String]) {
        if names.is_empty() {
            return;
        }
        let session = match self.storage_session().await {
            Ok(session) => session,
            Err(e) => {
                warn!(error = %e, "cannot reach the guest to remove volume data; the next boot will");
                return;
            }
        };
        let root = session.storage_root().to_owned();
        let dirs: Vec<PathBuf> = names.iter().map(|n| guest_volume_dir(&root, n)).collect();
        if let Err(e) = session.call(move |a| a.remove_dirs(dirs)).await {
            warn!(error = %describe(&e), "cannot remove volume data in the guest");
        }
    }

    /// The bytes each volume uses in the guest; empty when no VM runs (sizes are then
    /// unknown, as with an unreachable driver in dockerd).
    pub async fn measure_volumes(&self, names: &[String]) -> BTreeMap<String, u64> {
        let Some(session) = self.machine.current().await else {
            return BTreeMap::new();
        };
        let root = session.storage_root().to_owned();
        let dirs: Vec<PathBuf> = names.iter().map(|n| guest_data_dir(&root, n)).collect();
        match session.call_dedicated(move |a| a.measure_dirs(dirs)).await {
            Ok(sizes) => names.iter().cloned().zip(sizes).collect(),
            Err(e) => {
                warn!(error = %describe(&e), "cannot measure volumes");
                BTreeMap::new()
            }
        }
    }

    /// Space used in the guest by layers, writable layers and volumes, and the data disk's
    /// size on the host. Sizes in the guest are measured only while a VM runs (a `df` does not
    /// boot one); otherwise the maps are empty.
    pub async fn disk_usage(&self) -> Result<DiskUsage, EngineError> {
        let disk_allocated = self
            .config
            .vm
            .data_disk
            .as_ref()
            .and_then(|d| d.allocated_bytes().ok());
        if self.machine.current().await.is_none() {
            return Ok(DiskUsage {
                disk_allocated,
                ..DiskUsage::default()
            });
        }
        let session = self.storage_session().await?;
        let root = session.storage_root().to_owned();
        let listing = session.call(|a| a.list_storage()).await?;
        let mut dirs = Vec::new();
        for hex in &listing.layers {
            dirs.push(root.join("layers").join(hex));
        }
        for id in &listing.containers {
            dirs.push(root.join("containers").join(id).join("upper"));
        }
        for name in &listing.volumes {
            dirs.push(guest_data_dir(&root, name));
        }
        let sizes = session
            .call_dedicated(move |a| a.measure_dirs(dirs))
            .await?;
        let mut sizes = sizes.into_iter();
        let mut usage = DiskUsage::default();
        for hex in listing.layers {
            usage
                .layers
                .insert(format!("sha256:{hex}"), sizes.next().unwrap_or(0));
        }
        for id in listing.containers {
            usage.containers.insert(id, sizes.next().unwrap_or(0));
        }
        for name in listing.volumes {
            usage.volumes.insert(name, sizes.next().unwrap_or(0));
        }
        usage.disk_allocated = disk_allocated;
        Ok(usage)
    }

    /// Gives the data disk's free blocks back to the host, if the VM runs.
    pub async fn trim(&self) {
        let Some(session) = self.machine.current().await else {
            return;
        };
        if let Err(e) = session.call_dedicated(|a| a.trim_storage()).await {
            if !e.is_agent_unsupported() {
                warn!(error = %describe(&e), "cannot trim the data disk");
            }
        }
    }
}

impl Engine {
    /// Starts watching the host side of `mounts`' binds for `container`, so host edits wake
    /// watchers in the guest. Best effort: a container runs even if its binds cannot be
    /// watched.
    pub(crate) fn watch_binds(self: &Arc<Self>, container: &str, mounts: &[MountPoint]) {
        let roots: Vec<PathBuf> = mounts
            .iter()
            .filter(|m| m.kind == MountKind::Bind)
            .filter_map(|m| {
                std::fs::canonicalize(binds::clean(std::path::Path::new(&m.source))).ok()
            })
            .filter(|p| p.is_dir())
            .collect();
        if roots.is_empty() {
            return;
        }
        let watcher = self.bind_watcher.get_or_init(|| {
            let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
            match crate::watch::BindWatcher::start(sender) {
                Ok(watcher) => {
                    tokio::spawn(forward_changes(Arc::downgrade(self), receiver));
                    Some(watcher)
                }
                Err(e) => {
                    warn!(error = %e, "cannot watch bind mounts; host edits will not wake watchers in containers");
                    None
                }
            }
        });
        if let Some(watcher) = watcher {
            watcher.watch(container, &roots);
        }
    }

    /// Stops watching what only `container` needed.
    pub(crate) fn unwatch_binds(&self, container: &str) {
        if let Some(Some(watcher)) = self.bind_watcher.get() {
            watcher.unwatch(container);
        }
    }
}

/// Sends each batch of host changes to the running guest, as paths under its share mounts.
async fn forward_changes(
    engine: std::sync::Weak<Engine>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<crate::watch::ChangeBatch>,
) {
    while let Some(batch) = changes.recv().await {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let paths: Vec<PathBuf> = batch
            .iter()
            .filter_map(|path| binds::guest_path(path, &engine.config.vm.shares))
            .collect();
        let Some(session) = engine.machine.current().await else {
            continue;
        };
        if paths.is_empty() {
            continue;
        }
        if let Err(e) = session.call(move |a| a.notify(paths)).await {
            if !e.is_agent_unsupported() {
                warn!(error = %describe(&e), "cannot tell the guest about host file changes");
            }
        }
    }
}

/// Whether `mount` already covers `destination` (trailing slashes aside).
fn same_destination(mount: &MountPoint, destination: &str) -> bool {
    mount.destination.trim_end_matches('/') == destination.trim_end_matches('/')
}

fn uses_volume(container: &Container, name: &str) -> bool {
    container
        .record()
        .spec
        .host
        .mounts
        .iter()
        .any(|m| m.kind == MountKind::Volume && m.source == name)
}

/// A `label` filter of prune: `key` or `key=value`.
fn label_matches(volume: &VolumeRecord, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((key, value)) => volume.labels.get(key).is_some_and(|v| v == value),
        None => volume.labels.contains_key(filter),
    }
}
