//! The image store proper: the in-memory index (images and references) behind one mutex, its
//! on-disk form, and the operations on it (resolve, list, tag, remove, prune, and the
//! registry primitives). Load, save and import live in `archive.rs` and `import.rs` and
//! end in [`ImageStore::commit`].
//!
//! Every change follows one pattern (`update`): clone the index, change the clone, write the
//! files that differ (image records first, the reference table second), then swap the clone
//! in and delete blobs nothing references any more. A failure before the swap leaves the
//! index and every stored file as they were.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::ImageConfiguration;
use serde::{Deserialize, Serialize};

use super::blobs::{remove_if_exists, write_atomic, BlobStore, StagedBlob};
use super::digest::{chain_ids, short_id, Digest, HashingReader};
use super::media::{self, Compression, Manifest};
use super::reference::{parse_any, ImageRef, Reference};
use super::{parse_digest, Image, ImageError, ImageLayer, ImageUser, RawManifest, RemoveEvent};

/// The reference table, beside `blobs/` and `images/`.
const REPOSITORIES_FILE: &str = "repositories.json";
/// Held with `flock` while a store is open, so two daemons never share a root.
const LOCK_FILE: &str = "lock";
/// The largest JSON document (config, manifest, index) the store reads.
pub(super) const MAX_JSON_SIZE: u64 = 32 << 20;
const REPOSITORIES_VERSION: u32 = 1;

/// The image store. `Send + Sync`; every method is synchronous.
pub struct ImageStore {
    root: PathBuf,
    pub(super) blobs: BlobStore,
    images_dir: PathBuf,
    state: Mutex<State>,
    _lock: Flock<File>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// The index: every image and every reference. Cheap to clone (records are shared).
#[derive(Debug, Clone, Default)]
pub(super) struct State {
    /// Full normalised reference (`docker.io/library/busybox:latest` or `...@sha256:..`) to
    /// image ID.
    pub refs: BTreeMap<String, Digest>,
    pub images: BTreeMap<Digest, Arc<StoredImage>>,
    /// Blobs ingested for a pull whose manifest has not been stored yet: never collected.
    /// Kept in memory only, so a failed pull's blobs are collected after a restart.
    pub unclaimed: BTreeSet<Digest>,
}

/// An image record and its parsed config.
#[derive(Debug)]
pub(super) struct StoredImage {
    pub record: ImageRecord,
    pub config: ImageConfiguration,
}

/// `images/<hex>.json`: what the store knows about one image beyond its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ImageRecord {
    /// The image ID: the config blob's digest.
    pub id: Digest,
    pub config_size: u64,
    /// Manifests describing this config; the first is the one `layers` belong to. Others
    /// (the same image pulled with differently compressed layers) are kept for their repo
    /// digests; their layer blobs are not retained.
    pub manifests: Vec<ManifestRef>,
    pub layers: Vec<LayerRecord>,
    /// When the image entered the store (RFC 3339).
    pub added: String,
}

/// A stored manifest blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ManifestRef {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// A stored layer blob and what it unpacks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LayerRecord {
    pub diff_id: Digest,
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    pub uncompressed_size: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct RepositoriesFile {
    version: u32,
    references: BTreeMap<String, Digest>,
}

/// An image ready to enter the store: verified blobs waiting in scratch space.
#[derive(Debug)]
pub(super) struct NewImage {
    pub record: ImageRecord,
    pub config: ImageConfiguration,
    pub blobs: Vec<BlobSource>,
    /// Tags to point at the image (full references with a tag).
    pub tags: Vec<Reference>,
}

/// Where a verified blob of a [`NewImage`] waits.
#[derive(Debug)]
pub(super) enum BlobSource {
    /// A file in a load's staging directory with this content digest.
    File(PathBuf, Digest),
    /// A staged scratch file.
    Staged(StagedBlob),
}

impl ImageStore {
    /// Opens (creating as needed) the store under `root` and loads its index. Takes an
    /// exclusive lock on the root for the life of the store.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(root).map_err(ImageError::io(format!("creating {}", root.display())))?;
        let lock = take_lock(root)?;
        let tmp = root.join("tmp");
        // Scratch files of an interrupted run are garbage; nothing refers to them.
        if tmp.exists() {
            fs::remove_dir_all(&tmp)
                .map_err(ImageError::io(format!("clearing {}", tmp.display())))?;
        }
        let blobs = BlobStore::open(root.join("blobs").join("sha256"), tmp)?;
        let images_dir = root.join("images");
        fs::create_dir_all(&images_dir)
            .map_err(ImageError::io(format!("creating {}", images_dir.display())))?;
        let (state, complete) = load_state(&blobs, &images_dir, &root.join(REPOSITORIES_FILE))?;
        let store = Self {
            root: root.to_path_buf(),
            blobs,
            images_dir,
            state: Mutex::new(state),
            _lock: lock,
        };
        if complete {
            // Blobs of an interrupted load or removal: nothing refers to them.
            store.sweep(&store.lock());
        }
        Ok(store)
    }

    /// The directory the store lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Finds an image by `name[:tag]`, `name@sha256:...`, full ID (`sha256:<hex>` or bare
    /// hex) or unambiguous ID prefix, as Docker does.
    pub fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        let state = self.lock();
        let id = lookup(&state, reference)?;
        Ok(image_of(&state, &state.images[&id]))
    }

    /// Every image, newest first.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let state = self.lock();
        let mut images: Vec<Image> = state.images.values().map(|s| image_of(&state, s)).collect();
        let created = |image: &Image| {
            image
                .created
                .as_deref()
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
        };
        images.sort_by(|a, b| created(b).cmp(&created(a)).then_with(|| a.id.cmp(&b.id)));
        Ok(images)
    }

    /// `docker tag SOURCE TARGET`: points `target` (`repo[:tag]`, default tag `latest`) at
    /// the image `source` resolves to, moving the tag if it pointed elsewhere.
    pub fn tag(&self, source: &str, target: &str) -> Result<(), ImageError> {
        let target = tag_target(target)?;
        self.update(|state| {
            let id = lookup(state, source)?;
            state.refs.insert(target.to_string(), id);
            Ok(())
        })?;
        Ok(())
    }

    /// `docker rmi`, with Docker's semantics and messages. `users` reports a container that
    /// uses an image ID (a running one if any runs, else a stopped one), or `None`. It is
    /// called without the store's lock held, so it may take the caller's own locks.
    pub fn remove(
        &self,
        reference: &str,
        force: bool,
        users: &dyn Fn(&str) -> Option<ImageUser>,
    ) -> Result<Vec<RemoveEvent>, ImageError> {
        let id = lookup(&self.lock(), reference)?;
        let user = users(id.as_str());
        let (events, _) = self.update(|state| {
            if lookup(state, reference)? != id {
                return Err(ImageError::Conflict(format!(
                    "conflict: {reference} was retagged while it was being removed; retry"
                )));
            }
            remove_in(state, reference, force, user.as_ref())
        })?;
        Ok(events)
    }

    /// `docker image prune`: deletes dangling images (with `all`, every image) that no
    /// container uses, then every blob nothing references. Returns what was removed and the
    /// bytes freed on disk. `users` is called without the store's lock held.
    pub fn prune(
        &self,
        all: bool,
        users: &dyn Fn(&str) -> Option<ImageUser>,
    ) -> Result<(Vec<RemoveEvent>, u64), ImageError> {
        let ids: Vec<Digest> = self.lock().images.keys().cloned().collect();
        let unused: BTreeSet<Digest> = ids
            .into_iter()
            .filter(|id| users(id.as_str()).is_none())
            .collect();
        let (events, mut reclaimed) = self.update(|state| {
            // Images that arrived since `unused` was computed are not candidates.
            let candidates: Vec<Digest> = unused
                .iter()
                .filter(|id| state.images.contains_key(*id))
                .filter(|id| all || state.refs_of(id).is_empty())
                .cloned()
                .collect();
            let mut events = Vec::new();
            for id in candidates {
                delete_image(state, &id, &mut events);
            }
            Ok(events)
        })?;
        reclaimed += self.sweep(&self.lock());
        Ok((events, reclaimed))
    }

    /// The file of a blob, for streaming a layer to the VM.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let digest = parse_digest(digest)?;
        if !self.blobs.contains(&digest) {
            return Err(ImageError::BlobNotFound(digest.to_string()));
        }
        Ok(self.blobs.path(&digest))
    }

    /// Whether a blob is present (a registry client skips downloading it).
    pub fn has_blob(&self, digest: &str) -> bool {
        Digest::parse(digest).is_ok_and(|d| self.blobs.contains(&d))
    }

    /// Adds a blob read from `reader`, verifying its digest (and size, if given). The blob is
    /// kept until a manifest stored with [`ImageStore::store_manifest`] claims it or the
    /// process restarts. Returns the blob's size. A blob already present is not read again.
    pub fn ingest_blob(
        &self,
        digest: &str,
        size: Option<u64>,
        mut reader: impl Read,
    ) -> Result<u64, ImageError> {
        let expected = parse_digest(digest)?;
        if let Some(present) = self.blobs.size(&expected) {
            self.lock().unclaimed.insert(expected);
            return Ok(present);
        }
        let staged = self.blobs.stage(&mut reader)?;
        verify(
            &staged.digest,
            staged.size,
            &expected,
            size,
            &format!("blob {expected}"),
        )?;
        let stored = staged.size;
        let mut state = self.lock();
        self.blobs.commit(staged)?;
        state.unclaimed.insert(expected);
        Ok(stored)
    }

    /// Stores an image manifest (OCI or Docker schema 2) whose config and layer blobs are
    /// already present (ingested), after checking every layer's diff ID against the config.
    /// If the image (its config) is already known, the manifest is added to it. Names are
    /// added separately with [`ImageStore::tag`] and [`ImageStore::add_repo_digest`].
    pub fn store_manifest(&self, bytes: &[u8]) -> Result<Image, ImageError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(ImageError::json("manifest"))?;
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| media::OCI_MANIFEST.to_owned());
        if !media::is_manifest(&media_type) {
            return Err(ImageError::InvalidArgument(format!(
                "unsupported manifest media type {media_type:?}: store a platform's image manifest"
            )));
        }
        let config_digest = parse_digest(&manifest.config.digest)?;
        let config_bytes = self.blobs.read(&config_digest, MAX_JSON_SIZE)?;
        check_size(
            config_bytes.len() as u64,
            manifest.config.size,
            &format!("config {config_digest}"),
        )?;
        let config = parse_config(&config_bytes, &config_digest)?;
        let manifest_ref = ManifestRef {
            digest: Digest::of(bytes),
            media_type,
            size: bytes.len() as u64,
        };
        let staged = self.blobs.stage_bytes(bytes)?;
        let known = self.lock().images.contains_key(&config_digest);
        let layers = if known {
            Vec::new()
        } else {
            let diff_ids = diff_ids_of(&config)?;
            if diff_ids.len() != manifest.layers.len() {
                return Err(layers_mismatch(diff_ids.len(), manifest.layers.len()));
            }
            let mut layers = Vec::with_capacity(diff_ids.len());
            for (descriptor, diff_id) in manifest.layers.iter().zip(diff_ids) {
                let digest = parse_digest(&descriptor.digest)?;
                let size = self
                    .blobs
                    .size(&digest)
                    .ok_or_else(|| ImageError::BlobNotFound(digest.to_string()))?;
                check_size(size, descriptor.size, &format!("layer {digest}"))?;
                let path = self.blobs.path(&digest);
                let media_type = Some(descriptor.media_type.as_str()).filter(|m| !m.is_empty());
                layers.push(self.describe_layer(&path, &digest, size, &diff_id, media_type)?);
            }
            layers
        };
        let new = NewImage {
            record: ImageRecord {
                id: config_digest,
                config_size: config_bytes.len() as u64,
                manifests: vec![manifest_ref],
                layers,
                added: now(),
            },
            config,
            blobs: vec![BlobSource::Staged(staged)],
            tags: Vec::new(),
        };
        let mut images = self.commit(vec![new], &mut |_| {})?;
        images
            .pop()
            .ok_or_else(|| ImageError::InvalidArgument("manifest stored no image".into()))
    }

    /// Records `repo_digest` (`name@sha256:<manifest digest>`, as a pull or push learned it)
    /// for the image `reference` resolves to.
    pub fn add_repo_digest(&self, reference: &str, repo_digest: &str) -> Result<(), ImageError> {
        let canonical = Reference::parse_normalized(repo_digest)?;
        let Some(digest) = canonical.digest().cloned() else {
            return Err(ImageError::InvalidArgument(format!(
                "{repo_digest} is not a repo digest (name@sha256:...)"
            )));
        };
        let key = canonical.with_digest(digest).to_string();
        self.update(|state| {
            let id = lookup(state, reference)?;
            state.refs.insert(key, id);
            Ok(())
        })?;
        Ok(())
    }

    /// The manifest of an image (the one its layers belong to), byte for byte.
    pub fn manifest(&self, reference: &str) -> Result<RawManifest, ImageError> {
        let manifest = {
            let state = self.lock();
            let id = lookup(&state, reference)?;
            state.images[&id].record.manifests[0].clone()
        };
        let bytes = self.blobs.read(&manifest.digest, MAX_JSON_SIZE)?;
        Ok(RawManifest {
            digest: manifest.digest.to_string(),
            media_type: manifest.media_type,
            bytes,
        })
    }

    /// The config JSON of an image byte for byte, with the fields `oci_spec` drops
    /// (`Healthcheck`, `Shell`, `OnBuild`, ...).
    pub fn raw_config(&self, reference: &str) -> Result<Vec<u8>, ImageError> {
        let id = lookup(&self.lock(), reference)?;
        self.blobs.read(&id, MAX_JSON_SIZE)
    }

    /// Moves verified images into the store: blobs into place, records, then tags; reports
    /// each as `docker load` does.
    pub(super) fn commit(
        &self,
        new: Vec<NewImage>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<Image>, ImageError> {
        let mut lines = Vec::new();
        let (ids, _) = self.update(|state| {
            let mut ids = Vec::new();
            for image in new {
                let id = image.record.id.clone();
                let layers_complete =
                    image.record.layers.len() == image.config.rootfs().diff_ids().len();
                if !layers_complete && !state.images.contains_key(&id) {
                    return Err(ImageError::Conflict(format!(
                        "image {id} was removed while a manifest for it was being stored"
                    )));
                }
                for blob in image.blobs {
                    match blob {
                        BlobSource::File(path, digest) => self.blobs.commit_path(&path, &digest)?,
                        BlobSource::Staged(staged) => self.blobs.commit(staged)?,
                    }
                }
                for digest in blobs_of(&image.record) {
                    state.unclaimed.remove(&digest);
                }
                merge_image(state, image.record, image.config);
                for tag in &image.tags {
                    if let Some(previous) = state.refs.insert(tag.to_string(), id.clone()) {
                        if previous != id {
                            lines.push(format!(
                                "The image {} already exists, renaming the old one with ID {previous} to empty string",
                                tag.familiar()
                            ));
                        }
                    }
                    lines.push(format!("Loaded image: {}", tag.familiar()));
                }
                if image.tags.is_empty() {
                    lines.push(format!("Loaded image ID: {id}"));
                }
                ids.push(id);
            }
            Ok(ids)
        })?;
        for line in &lines {
            progress(line);
        }
        let state = self.lock();
        Ok(ids
            .iter()
            .filter_map(|id| state.images.get(id))
            .map(|s| image_of(&state, s))
            .collect())
    }

    /// Builds the record of a layer blob at `path`, checking that it unpacks to `diff_id`.
    /// A blob some stored image already vouches for is not decompressed again.
    pub(super) fn describe_layer(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        diff_id: &Digest,
        media_type: Option<&str>,
    ) -> Result<LayerRecord, ImageError> {
        let known = self.known_layer(digest);
        let (actual, uncompressed_size, detected) = match &known {
            Some(record) => (record.diff_id.clone(), record.uncompressed_size, None),
            None => layer_diff_id(path, digest, size)?,
        };
        if &actual != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("the uncompressed content of layer {digest}"),
                expected: diff_id.to_string(),
                actual: actual.to_string(),
            });
        }
        let media_type = match (media_type, detected, known) {
            (Some(given), _, _) => given.to_owned(),
            (None, Some(compression), _) => compression.oci_layer_media_type().to_owned(),
            (None, None, Some(record)) => record.media_type,
            (None, None, None) => media::OCI_LAYER.to_owned(),
        };
        Ok(LayerRecord {
            diff_id: diff_id.clone(),
            digest: digest.clone(),
            media_type,
            size,
            uncompressed_size,
        })
    }

    fn known_layer(&self, digest: &Digest) -> Option<LayerRecord> {
        let state = self.lock();
        state
            .images
            .values()
            .flat_map(|image| &image.record.layers)
            .find(|layer| &layer.digest == digest)
            .cloned()
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is applied by swapping in a fully built index, so a panic while the
        // lock was held cannot have left it half-changed.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `change` to a copy of the index, persists the difference, swaps it in, and
    /// deletes blobs only the old index referenced. Returns `change`'s result and the bytes
    /// freed.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, ImageError>,
    ) -> Result<(T, u64), ImageError> {
        let mut state = self.lock();
        let mut next = state.clone();
        let out = change(&mut next)?;
        self.persist(&state, &next)?;
        let old = std::mem::replace(&mut *state, next);
        let released: BTreeSet<Digest> = referenced(&old)
            .difference(&referenced(&state))
            .filter(|d| !state.unclaimed.contains(*d))
            .cloned()
            .collect();
        let freed = released.iter().map(|d| self.remove_blob(d)).sum();
        Ok((out, freed))
    }

    fn persist(&self, old: &State, next: &State) -> Result<(), ImageError> {
        for (id, image) in &next.images {
            if old.images.get(id).is_none_or(|o| !Arc::ptr_eq(o, image)) {
                let data = serde_json::to_vec_pretty(&image.record)
                    .map_err(ImageError::json("image record"))?;
                let path = self.record_path(id);
                write_atomic(&path, &data)
                    .map_err(ImageError::io(format!("writing {}", path.display())))?;
            }
        }
        if old.refs != next.refs {
            let file = RepositoriesFile {
                version: REPOSITORIES_VERSION,
                references: next.refs.clone(),
            };
            let data =
                serde_json::to_vec_pretty(&file).map_err(ImageError::json("reference table"))?;
            let path = self.root.join(REPOSITORIES_FILE);
            write_atomic(&path, &data)
                .map_err(ImageError::io(format!("writing {}", path.display())))?;
        }
        for id in old
            .images
            .keys()
            .filter(|id| !next.images.contains_key(*id))
        {
            let path = self.record_path(id);
            remove_if_exists(&path)
                .map_err(ImageError::io(format!("removing {}", path.display())))?;
        }
        Ok(())
    }

    /// Deletes every blob nothing in `state` references; returns the bytes freed.
    fn sweep(&self, state: &State) -> u64 {
        let keep = referenced(state);
        let present = match self.blobs.list() {
            Ok(present) => present,
            Err(e) => {
                tracing::warn!(error = %e, "listing blobs for garbage collection");
                return 0;
            }
        };
        present
            .iter()
            .filter(|d| !keep.contains(*d) && !state.unclaimed.contains(*d))
            .map(|d| self.remove_blob(d))
            .sum()
    }

    fn remove_blob(&self, digest: &Digest) -> u64 {
        // The index no longer refers to the blob; failing to delete it wastes space but
        // loses nothing, and the next prune tries again.
        self.blobs.remove(digest).unwrap_or_else(|e| {
            tracing::warn!(%digest, error = %e, "removing an unreferenced blob");
            0
        })
    }

    fn record_path(&self, id: &Digest) -> PathBuf {
        self.images_dir.join(format!("{}.json", id.hex()))
    }
}

impl State {
    /// Every reference to `id`, parsed.
    pub(super) fn refs_of(&self, id: &Digest) -> Vec<Reference> {
        self.refs
            .iter()
            .filter(|(_, target)| *target == id)
            .filter_map(|(key, _)| Reference::parse_normalized(key).ok())
            .collect()
    }
}

/// The parsed target of `docker tag`/`import`/`commit`: a name with a tag (default `latest`).
pub(super) fn tag_target(target: &str) -> Result<Reference, ImageError> {
    let reference = Reference::parse_normalized(target)?;
    if reference.is_canonical() {
        return Err(ImageError::InvalidArgument(
            "refusing to create a tag with a digest reference".into(),
        ));
    }
    if reference.familiar_name() == "sha256" {
        return Err(ImageError::InvalidArgument(
            "refusing to create an ambiguous tag using digest algorithm as name".into(),
        ));
    }
    Ok(reference.with_default_tag())
}

/// Resolves a user-supplied reference to an image ID, in Docker's order: full ID, then the
/// reference table, then an ID prefix.
pub(super) fn lookup(state: &State, reference: &str) -> Result<Digest, ImageError> {
    let named = match parse_any(reference)? {
        ImageRef::Id(id) => {
            return match state.images.contains_key(&id) {
                true => Ok(id),
                false => Err(ImageError::NotFound(id.to_string())),
            };
        }
        ImageRef::Named(named) => named,
    };
    if let Some(id) = state.refs.get(&named.store_key().to_string()) {
        return Ok(id.clone());
    }
    match search_prefix(state, reference)? {
        Some(id) => Ok(id),
        None => Err(ImageError::NotFound(named.with_default_tag().familiar())),
    }
}

fn search_prefix(state: &State, value: &str) -> Result<Option<Digest>, ImageError> {
    let prefix = value
        .strip_prefix(super::digest::SHA256_PREFIX)
        .unwrap_or(value);
    if !super::digest::is_lower_hex(prefix) {
        return Ok(None);
    }
    let mut matches = state
        .images
        .keys()
        .filter(|id| id.hex().starts_with(prefix));
    match (matches.next(), matches.next()) {
        (Some(id), None) => Ok(Some(id.clone())),
        (Some(_), Some(_)) => Err(ImageError::AmbiguousId(value.to_owned())),
        (None, _) => Ok(None),
    }
}

/// Docker's `isImageIDPrefix`: whether the user named the image by (a prefix of) its ID.
fn is_id_prefix(id: &Digest, reference: &str) -> bool {
    id.as_str().starts_with(reference) || id.hex().starts_with(reference)
}

/// Docker's `isSingleReference`: one tag, possibly with digest references of the same
/// repository.
fn is_single_reference(refs: &[Reference]) -> bool {
    if refs.len() <= 1 {
        return refs.len() == 1;
    }
    let mut single: Option<&Reference> = None;
    let mut canonical_names = BTreeSet::new();
    for reference in refs {
        if reference.is_canonical() {
            canonical_names.insert(reference.name());
        } else if single.is_none() {
            single = Some(reference);
        } else {
            return false;
        }
    }
    let single = single.unwrap_or(&refs[0]);
    canonical_names.len() == 1 && canonical_names.contains(&single.name())
}

/// A reason an image cannot be deleted, as Docker words it.
struct DeleteConflict {
    message: String,
    hard: bool,
    used: bool,
}

impl DeleteConflict {
    fn into_error(self, id: &Digest) -> ImageError {
        let force = if self.hard {
            "cannot be forced"
        } else {
            "must be forced"
        };
        ImageError::Conflict(format!(
            "conflict: unable to delete {} ({force}) - {}",
            id.short(),
            self.message
        ))
    }
}

/// Docker's `checkImageDeleteConflict`: a running container (hard), other references and
/// stopped containers (soft, skipped with force).
fn delete_conflict(
    state: &State,
    id: &Digest,
    user: Option<&ImageUser>,
    soft: bool,
    check_references: bool,
) -> Option<DeleteConflict> {
    if let Some(user) = user.filter(|u| u.running) {
        return Some(DeleteConflict {
            message: format!(
                "image is being used by running container {}",
                short_id(&user.container_id)
            ),
            hard: true,
            used: true,
        });
    }
    if soft && check_references && !state.refs_of(id).is_empty() {
        return Some(DeleteConflict {
            message: "image is referenced in multiple repositories".into(),
            hard: false,
            used: false,
        });
    }
    match user {
        Some(user) if soft => Some(DeleteConflict {
            message: format!(
                "image is being used by stopped container {}",
                short_id(&user.container_id)
            ),
            hard: false,
            used: true,
        }),
        _ => None,
    }
}

/// Docker's `ImageDelete` for one reference; `user` is a container using the image.
fn remove_in(
    state: &mut State,
    reference: &str,
    force: bool,
    user: Option<&ImageUser>,
) -> Result<Vec<RemoveEvent>, ImageError> {
    let id = lookup(state, reference)?;
    let mut events = Vec::new();
    let mut refs = state.refs_of(&id);
    let mut removed_repository_ref = false;
    if !is_id_prefix(&id, reference) {
        if !force && is_single_reference(&refs) {
            if let Some(user) = user {
                return Err(ImageError::Conflict(format!(
                    "conflict: unable to remove repository reference {reference:?} (must force) - container {} is using its referenced image {}",
                    short_id(&user.container_id),
                    id.short()
                )));
            }
        }
        let removed = Reference::parse_normalized(reference)?.store_key();
        state.refs.remove(&removed.to_string());
        events.push(RemoveEvent::Untagged(removed.familiar()));
        refs = state.refs_of(&id);
        // Untagging the last tag of a repository also drops its digest references.
        if !removed.is_canonical()
            && !refs
                .iter()
                .any(|r| !r.is_canonical() && r.name() == removed.name())
        {
            for r in refs
                .iter()
                .filter(|r| r.is_canonical() && r.name() == removed.name())
            {
                state.refs.remove(&r.to_string());
                events.push(RemoveEvent::Untagged(r.familiar()));
            }
            refs = state.refs_of(&id);
        }
        if !refs.is_empty() {
            return Ok(events);
        }
        removed_repository_ref = true;
    } else if is_single_reference(&refs) {
        if let Some(conflict) = delete_conflict(state, &id, user, !force, false) {
            return Err(conflict.into_error(&id));
        }
        for r in &refs {
            state.refs.remove(&r.to_string());
            events.push(RemoveEvent::Untagged(r.familiar()));
        }
    }
    // Docker's `imageDeleteHelper`.
    if let Some(conflict) = delete_conflict(state, &id, user, !force, true) {
        let dangling = state.refs_of(&id).is_empty();
        if removed_repository_ref && (!dangling || conflict.used) {
            // The untag was what the user asked for; the image stays, dangling.
            return Ok(events);
        }
        return Err(conflict.into_error(&id));
    }
    delete_image(state, &id, &mut events);
    Ok(events)
}

/// Removes an image and its references, reporting the untags, the image, and the layers
/// (ChainIDs, top first) no remaining image has.
fn delete_image(state: &mut State, id: &Digest, events: &mut Vec<RemoveEvent>) {
    for r in state.refs_of(id) {
        state.refs.remove(&r.to_string());
        events.push(RemoveEvent::Untagged(r.familiar()));
    }
    let Some(image) = state.images.remove(id) else {
        return;
    };
    events.push(RemoveEvent::Deleted(id.to_string()));
    let remaining: BTreeSet<Digest> = state
        .images
        .values()
        .flat_map(|i| chains_of(&i.record))
        .collect();
    for chain in chains_of(&image.record).into_iter().rev() {
        if !remaining.contains(&chain) {
            events.push(RemoveEvent::Deleted(chain.to_string()));
        }
    }
}

fn chains_of(record: &ImageRecord) -> Vec<Digest> {
    let diff_ids: Vec<Digest> = record.layers.iter().map(|l| l.diff_id.clone()).collect();
    chain_ids(&diff_ids)
}

/// Adds an image to the index, or adds new manifests to the image already there.
fn merge_image(state: &mut State, record: ImageRecord, config: ImageConfiguration) {
    let merged = match state.images.get(&record.id) {
        None => StoredImage { record, config },
        Some(existing) => {
            let mut merged = existing.record.clone();
            let mut changed = false;
            for manifest in record.manifests {
                if !merged.manifests.iter().any(|m| m.digest == manifest.digest) {
                    merged.manifests.push(manifest);
                    changed = true;
                }
            }
            if !changed {
                return;
            }
            StoredImage {
                record: merged,
                config: existing.config.clone(),
            }
        }
    };
    state
        .images
        .insert(merged.record.id.clone(), Arc::new(merged));
}

/// Every blob an image record keeps: config, manifests, layers.
fn blobs_of(record: &ImageRecord) -> impl Iterator<Item = Digest> + '_ {
    std::iter::once(record.id.clone())
        .chain(record.manifests.iter().map(|m| m.digest.clone()))
        .chain(record.layers.iter().map(|l| l.digest.clone()))
}

fn referenced(state: &State) -> BTreeSet<Digest> {
    state
        .images
        .values()
        .flat_map(|i| blobs_of(&i.record))
        .collect()
}

/// The API view of a stored image.
pub(super) fn image_of(state: &State, stored: &StoredImage) -> Image {
    let record = &stored.record;
    let mut repo_tags = Vec::new();
    let mut repo_digests = Vec::new();
    for reference in state.refs_of(&record.id) {
        match reference.is_canonical() {
            true => repo_digests.push(reference.familiar()),
            false => repo_tags.push(reference.familiar()),
        }
    }
    repo_tags.sort();
    repo_digests.sort();
    let chains = chains_of(record);
    let layers = record
        .layers
        .iter()
        .zip(chains)
        .map(|(layer, chain)| ImageLayer {
            diff_id: layer.diff_id.to_string(),
            chain_id: chain.to_string(),
            blob_digest: layer.digest.to_string(),
            media_type: layer.media_type.clone(),
            size: layer.size,
            uncompressed_size: layer.uncompressed_size,
        })
        .collect();
    Image {
        id: record.id.to_string(),
        repo_tags,
        repo_digests,
        config: stored.config.clone(),
        config_digest: record.id.to_string(),
        manifest_digest: record.manifests[0].digest.to_string(),
        created: stored.config.created().clone(),
        size: record.layers.iter().map(|l| l.uncompressed_size).sum(),
        layers,
    }
}

/// Parses an image config and checks it can run here.
pub(super) fn parse_config(
    bytes: &[u8],
    digest: &Digest,
) -> Result<ImageConfiguration, ImageError> {
    let config: ImageConfiguration = serde_json::from_slice(bytes)
        .map_err(ImageError::json(format!("image config {digest}")))?;
    let os = config.os().to_string();
    if os != "linux" {
        return Err(ImageError::InvalidArgument(format!(
            "cannot load {os} image on linux"
        )));
    }
    Ok(config)
}

/// The config's layer diff IDs, parsed.
pub(super) fn diff_ids_of(config: &ImageConfiguration) -> Result<Vec<Digest>, ImageError> {
    config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| parse_digest(d))
        .collect()
}

pub(super) fn layers_mismatch(expected: usize, actual: usize) -> ImageError {
    ImageError::InvalidArchive(format!(
        "invalid manifest, layers length mismatch: expected {expected}, got {actual}"
    ))
}

/// Checks content against the digest (and size) it was referenced by.
pub(super) fn verify(
    actual: &Digest,
    actual_size: u64,
    expected: &Digest,
    expected_size: Option<u64>,
    what: &str,
) -> Result<(), ImageError> {
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        });
    }
    match expected_size {
        Some(size) => check_size(actual_size, size, what),
        None => Ok(()),
    }
}

pub(super) fn check_size(actual: u64, expected: u64, what: &str) -> Result<(), ImageError> {
    if actual != expected {
        return Err(ImageError::SizeMismatch {
            what: what.to_owned(),
            expected,
            actual,
        });
    }
    Ok(())
}

/// Hashes the uncompressed content of a layer blob; returns its diff ID, uncompressed size
/// and compression. An uncompressed blob is its own diff ID.
pub(super) fn layer_diff_id(
    path: &Path,
    digest: &Digest,
    size: u64,
) -> Result<(Digest, u64, Option<Compression>), ImageError> {
    let file = File::open(path).map_err(ImageError::io(format!("opening layer {digest}")))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let prefix = reader
        .fill_buf()
        .map_err(ImageError::io(format!("reading layer {digest}")))?;
    let compression = Compression::detect(prefix).map_err(|unsupported| {
        ImageError::InvalidArchive(format!(
            "layer {digest} is compressed with {}, which Berth does not decode (use gzip or zstd)",
            unsupported.0
        ))
    })?;
    if compression == Compression::None {
        return Ok((digest.clone(), size, Some(compression)));
    }
    let corrupt = |e: std::io::Error| {
        ImageError::InvalidArchive(format!(
            "layer {digest}: corrupt {compression:?} stream: {e}"
        ))
    };
    let decoder = compression.decoder(reader).map_err(corrupt)?;
    let (diff_id, uncompressed) = HashingReader::new(decoder).finish().map_err(corrupt)?;
    Ok((diff_id, uncompressed, Some(compression)))
}

/// The current time as RFC 3339 (UTC, seconds).
pub(super) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn take_lock(root: &Path) -> Result<Flock<File>, ImageError> {
    let path = root.join(LOCK_FILE);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(ImageError::io(format!("opening {}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => ImageError::Locked(root.display().to_string()),
        other => ImageError::Io {
            context: format!("locking {}", path.display()),
            source: other.into(),
        },
    })
}

/// Reads the index from disk. The flag says whether every record loaded: only then is it
/// safe to collect blobs no record mentions.
fn load_state(
    blobs: &BlobStore,
    images_dir: &Path,
    repositories: &Path,
) -> Result<(State, bool), ImageError> {
    let mut state = State::default();
    let mut complete = true;
    let entries = fs::read_dir(images_dir)
        .map_err(ImageError::io(format!("listing {}", images_dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(ImageError::io(format!("listing {}", images_dir.display())))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            // A scratch file of an interrupted atomic write.
            let _ = fs::remove_file(&path);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        match load_image(blobs, &path) {
            Ok(image) => {
                state
                    .images
                    .insert(image.record.id.clone(), Arc::new(image));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping an unreadable image record");
                complete = false;
            }
        }
    }
    match fs::read(repositories) {
        Ok(data) => {
            let file: RepositoriesFile =
                serde_json::from_slice(&data).map_err(|source| ImageError::Corrupt {
                    path: repositories.display().to_string(),
                    source,
                })?;
            for (key, id) in file.references {
                let valid = Reference::parse_normalized(&key).is_ok_and(|r| r.to_string() == key);
                if valid && state.images.contains_key(&id) {
                    state.refs.insert(key, id);
                } else {
                    tracing::warn!(reference = %key, image = %id, "dropping a reference to a missing image");
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ImageError::io(format!(
                "reading {}",
                repositories.display()
            ))(e))
        }
    }
    Ok((state, complete))
}

fn load_image(blobs: &BlobStore, path: &Path) -> Result<StoredImage, ImageError> {
    let data = fs::read(path).map_err(ImageError::io(format!("reading {}", path.display())))?;
    let record: ImageRecord =
        serde_json::from_slice(&data).map_err(|source| ImageError::Corrupt {
            path: path.display().to_string(),
            source,
        })?;
    if record.manifests.is_empty() {
        return Err(ImageError::InvalidArchive(format!(
            "{} lists no manifest",
            path.display()
        )));
    }
    let config_bytes = blobs.read(&record.id, MAX_JSON_SIZE)?;
    let config = serde_json::from_slice(&config_bytes)
        .map_err(ImageError::json(format!("image config {}", record.id)))?;
    Ok(StoredImage { record, config })
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{
        blob_count, busybox, gzip, layer, legacy_docker_archive, load, no_users, open_store,
        TestImage,
    };
    use super::*;
    use crate::ErrorKind;

    const CONTAINER: &str = "4f1c0e4d7e2a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c";

    fn stopped_user(_: &str) -> Option<ImageUser> {
        Some(ImageUser {
            container_id: CONTAINER.into(),
            running: false,
        })
    }

    fn running_user(_: &str) -> Option<ImageUser> {
        Some(ImageUser {
            container_id: CONTAINER.into(),
            running: true,
        })
    }

    fn store_with_busybox() -> (tempfile::TempDir, ImageStore, Image) {
        let (dir, store) = open_store();
        load(&store, &legacy_docker_archive(&[busybox()]));
        let image = store.resolve("busybox").unwrap();
        (dir, store, image)
    }

    #[test]
    fn image_store_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<ImageStore>();
    }

    #[test]
    fn resolve_accepts_every_docker_form() {
        let (_dir, store, image) = store_with_busybox();
        let hex = &image.id[7..];
        for reference in [
            "busybox",
            "busybox:latest",
            "library/busybox",
            "docker.io/library/busybox:latest",
            image.id.as_str(),
            hex,
            &hex[..1],
            &hex[..12],
            &format!("sha256:{}", &hex[..5]),
        ] {
            assert_eq!(
                store.resolve(reference).unwrap().id,
                image.id,
                "{reference}"
            );
        }
    }

    #[test]
    fn resolve_missing_reference_gives_dockers_message() {
        let (_dir, store, _) = store_with_busybox();
        let cases = [
            ("nothere", "No such image: nothere:latest"),
            ("docker.io/library/nothere:1", "No such image: nothere:1"),
            ("127.0.0.1:5000/x", "No such image: 127.0.0.1:5000/x:latest"),
        ];
        for (reference, message) in cases {
            let err = store.resolve(reference).unwrap_err();
            assert_eq!(err.to_string(), message);
            assert_eq!(err.kind(), ErrorKind::NotFound);
        }
    }

    #[test]
    fn resolve_invalid_reference_is_invalid_argument() {
        let (_dir, store, _) = store_with_busybox();
        let err = store.resolve("Busybox").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            err.to_string(),
            "invalid reference format: repository name (library/Busybox) must be lowercase"
        );
    }

    #[test]
    fn resolve_ambiguous_id_prefix_is_rejected() {
        let (_dir, store) = open_store();
        // Seventeen images: by pigeonhole two IDs share their first hex digit.
        let images: Vec<TestImage> = (0..17)
            .map(|i| TestImage::new(vec![layer(&[("f", "x")])], &format!("cmd{i}"), &[]))
            .collect();
        load(&store, &legacy_docker_archive(&images));
        let ids: Vec<String> = images.iter().map(|i| i.id().hex().to_owned()).collect();
        let shared = ids
            .iter()
            .find(|id| ids.iter().filter(|o| o[..1] == id[..1]).count() > 1)
            .unwrap();
        let err = store.resolve(&shared[..1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("multiple IDs found with provided prefix: {}", &shared[..1])
        );
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn tag_adds_a_reference_and_list_shows_it() {
        let (_dir, store, image) = store_with_busybox();
        store.tag("busybox", "127.0.0.1:5000/busybox").unwrap();
        store.tag(&image.id, "mine:v1").unwrap();
        let tags = store.resolve("mine:v1").unwrap().repo_tags;
        assert_eq!(
            tags,
            ["127.0.0.1:5000/busybox:latest", "busybox:latest", "mine:v1"]
        );
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn tag_with_digest_or_missing_source_fails() {
        let (_dir, store, image) = store_with_busybox();
        let digest_target = format!("busybox@{}", image.id);
        let err = store.tag("busybox", &digest_target).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refusing to create a tag with a digest reference"
        );
        let err = store.tag("nothere", "x").unwrap_err();
        assert_eq!(err.to_string(), "No such image: nothere:latest");
    }

    #[test]
    fn remove_one_of_two_tags_only_untags() {
        let (dir, store, _) = store_with_busybox();
        store.tag("busybox", "other").unwrap();
        let blobs = blob_count(dir.path());
        let events = store.remove("other", false, &no_users).unwrap();
        assert_eq!(events, [RemoveEvent::Untagged("other:latest".into())]);
        assert_eq!(blob_count(dir.path()), blobs);
    }

    #[test]
    fn remove_last_tag_deletes_image_layers_and_blobs() {
        let (dir, store, image) = store_with_busybox();
        let events = store.remove("busybox", false, &no_users).unwrap();
        assert_eq!(
            events,
            [
                RemoveEvent::Untagged("busybox:latest".into()),
                RemoveEvent::Deleted(image.id.clone()),
                RemoveEvent::Deleted(image.layers[1].chain_id.clone()),
                RemoveEvent::Deleted(image.layers[0].chain_id.clone()),
            ]
        );
        assert!(store.list().unwrap().is_empty());
        assert_eq!(blob_count(dir.path()), 0);
        assert!(!dir
            .path()
            .join("images")
            .join(format!("{}.json", &image.id[7..]))
            .exists());
    }

    #[test]
    fn remove_keeps_layers_another_image_uses() {
        let (dir, store) = open_store();
        let base = busybox();
        let app = TestImage::new(
            vec![base.layers[0].clone(), layer(&[("app", "1")])],
            "app",
            &["app:1"],
        );
        let shared = Digest::of(&base.layers[0]);
        load(&store, &legacy_docker_archive(&[base, app]));
        let events = store.remove("busybox", false, &no_users).unwrap();
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(!events.contains(&RemoveEvent::Deleted(shared.to_string())));
        assert!(store.blob_path(shared.as_str()).is_ok());
        assert!(store.resolve("app:1").is_ok());
        assert!(blob_count(dir.path()) > 0);
    }

    #[test]
    fn remove_by_id_with_two_tags_must_be_forced() {
        let (_dir, store, image) = store_with_busybox();
        store.tag("busybox", "other").unwrap();
        let short = &image.id[7..19];
        let err = store.remove(short, false, &no_users).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("conflict: unable to delete {short} (must be forced) - image is referenced in multiple repositories")
        );
        assert_eq!(err.kind(), ErrorKind::Conflict);
        let events = store.remove(short, true, &no_users).unwrap();
        assert_eq!(
            events[..3],
            [
                RemoveEvent::Untagged("busybox:latest".into()),
                RemoveEvent::Untagged("other:latest".into()),
                RemoveEvent::Deleted(image.id.clone()),
            ]
        );
    }

    #[test]
    fn remove_tag_of_image_a_container_uses_must_force() {
        let (_dir, store, image) = store_with_busybox();
        let err = store.remove("busybox", false, &stopped_user).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "conflict: unable to remove repository reference \"busybox\" (must force) - container {} is using its referenced image {}",
                &CONTAINER[..12],
                &image.id[7..19]
            )
        );
        let events = store.remove("busybox", true, &stopped_user).unwrap();
        assert_eq!(events[1], RemoveEvent::Deleted(image.id.clone()));
    }

    #[test]
    fn remove_by_id_of_image_a_running_container_uses_cannot_be_forced() {
        let (_dir, store, image) = store_with_busybox();
        let err = store.remove(&image.id, true, &running_user).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "conflict: unable to delete {} (cannot be forced) - image is being used by running container {}",
                &image.id[7..19],
                &CONTAINER[..12]
            )
        );
        assert!(store.resolve("busybox").is_ok());
    }

    #[test]
    fn remove_forced_tag_of_running_image_leaves_it_dangling() {
        let (_dir, store, image) = store_with_busybox();
        let events = store.remove("busybox", true, &running_user).unwrap();
        assert_eq!(events, [RemoveEvent::Untagged("busybox:latest".into())]);
        assert!(store.resolve(&image.id).unwrap().repo_tags.is_empty());
    }

    #[test]
    fn remove_untagged_image_by_id_used_by_stopped_container_must_be_forced() {
        let (_dir, store) = open_store();
        let image = TestImage::new(vec![layer(&[("a", "a")])], "sh", &[]);
        let id = image.id();
        load(&store, &legacy_docker_archive(&[image]));
        let err = store.remove(id.as_str(), false, &stopped_user).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "conflict: unable to delete {} (must be forced) - image is being used by stopped container {}",
                id.short(),
                &CONTAINER[..12]
            )
        );
        assert_eq!(
            store.remove(id.as_str(), true, &stopped_user).unwrap()[0],
            RemoveEvent::Deleted(id.to_string())
        );
    }

    #[test]
    fn remove_and_prune_call_users_without_the_store_lock() {
        let (_dir, store, _) = store_with_busybox();
        // The callback uses the store itself, as an engine holding its own locks might
        // indirectly; with the store's lock held this would deadlock.
        let reentrant = |_: &str| {
            store.list().unwrap();
            None
        };
        store.prune(true, &reentrant).unwrap();
        assert!(store.list().unwrap().is_empty());
        load(&store, &legacy_docker_archive(&[busybox()]));
        assert_eq!(store.remove("busybox", false, &reentrant).unwrap().len(), 4);
    }

    #[test]
    fn remove_missing_image_is_not_found() {
        let (_dir, store) = open_store();
        let err = store.remove("busybox", false, &no_users).unwrap_err();
        assert_eq!(err.to_string(), "No such image: busybox:latest");
    }

    #[test]
    fn prune_removes_dangling_images_only_unless_all() {
        let (dir, store) = open_store();
        let old = busybox();
        let old_id = old.id();
        load(&store, &legacy_docker_archive(&[old]));
        // Moving the tag leaves the old image dangling.
        load(
            &store,
            &legacy_docker_archive(&[TestImage::new(
                vec![layer(&[("n", "1")])],
                "sh",
                &["busybox:latest"],
            )]),
        );
        let (events, reclaimed) = store.prune(false, &no_users).unwrap();
        assert_eq!(events[0], RemoveEvent::Deleted(old_id.to_string()));
        assert!(reclaimed > 0);
        assert_eq!(store.list().unwrap().len(), 1);

        let (events, _) = store.prune(true, &stopped_user).unwrap();
        assert!(events.is_empty());
        let (events, _) = store.prune(true, &no_users).unwrap();
        assert_eq!(events[0], RemoveEvent::Untagged("busybox:latest".into()));
        assert!(store.list().unwrap().is_empty());
        assert_eq!(blob_count(dir.path()), 0);
    }

    #[test]
    fn reopened_store_sees_the_same_images() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let store = ImageStore::open(dir.path()).unwrap();
            load(&store, &legacy_docker_archive(&[busybox()]));
            store.tag("busybox", "other:1").unwrap();
            store.list().unwrap()
        };
        let store = ImageStore::open(dir.path()).unwrap();
        assert_eq!(store.list().unwrap(), before);
        assert_eq!(store.resolve("other:1").unwrap().id, before[0].id);
    }

    #[test]
    fn open_twice_is_refused_while_the_first_is_open() {
        let (dir, _store) = open_store();
        let err = ImageStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, ImageError::Locked(_)), "{err:?}");
    }

    #[test]
    fn open_collects_orphan_blobs_and_scratch_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ImageStore::open(dir.path()).unwrap();
            load(&store, &legacy_docker_archive(&[busybox()]));
        }
        let orphan = Digest::of(b"orphan");
        fs::write(
            dir.path().join("blobs/sha256").join(orphan.hex()),
            b"orphan",
        )
        .unwrap();
        fs::write(dir.path().join("tmp/blob.tmp-1"), b"partial").unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        assert!(!store.has_blob(orphan.as_str()));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(store.resolve("busybox").is_ok());
    }

    #[test]
    fn ingest_blob_verifies_digest_and_size() {
        let (dir, store) = open_store();
        let data = b"layer bytes";
        let digest = Digest::of(data);
        let err = store
            .ingest_blob(digest.as_str(), None, &b"other bytes"[..])
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
        let err = store
            .ingest_blob(digest.as_str(), Some(3), &data[..])
            .unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err:?}");
        assert_eq!(blob_count(dir.path()), 0);
        assert_eq!(
            store
                .ingest_blob(digest.as_str(), Some(data.len() as u64), &data[..])
                .unwrap(),
            11
        );
        assert!(store.has_blob(digest.as_str()));
    }

    #[test]
    fn store_manifest_builds_an_image_from_ingested_blobs() {
        let (_dir, store) = open_store();
        let image = busybox();
        let compressed: Vec<Vec<u8>> = image.layers.iter().map(|l| gzip(l)).collect();
        for blob in compressed.iter().chain([&image.config]) {
            store
                .ingest_blob(Digest::of(blob).as_str(), None, &blob[..])
                .unwrap();
        }
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::DOCKER_MANIFEST,
            "config": {"mediaType": media::DOCKER_CONFIG, "digest": image.id().as_str(), "size": image.config.len()},
            "layers": compressed.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": Digest::of(l).as_str(),
                "size": l.len(),
            })).collect::<Vec<_>>(),
        }))
        .unwrap();
        let stored = store.store_manifest(&manifest).unwrap();
        let repo_digest = format!("127.0.0.1:5000/busybox@{}", Digest::of(&manifest));
        store.add_repo_digest(&stored.id, &repo_digest).unwrap();
        store
            .tag(&stored.id, "127.0.0.1:5000/busybox:latest")
            .unwrap();

        let resolved = store.resolve(&repo_digest).unwrap();
        assert_eq!(resolved.id, image.id().to_string());
        assert_eq!(resolved.repo_digests, [repo_digest]);
        assert_eq!(
            resolved.layers[0].media_type,
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
        assert_eq!(
            resolved.layers[0].diff_id,
            Digest::of(&image.layers[0]).to_string()
        );
        let raw = store.manifest("127.0.0.1:5000/busybox").unwrap();
        assert_eq!(raw.bytes, manifest);
        assert_eq!(raw.media_type, media::DOCKER_MANIFEST);
    }

    #[test]
    fn store_manifest_without_its_blobs_is_not_found() {
        let (_dir, store) = open_store();
        let image = busybox();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": media::OCI_CONFIG, "digest": image.id().as_str(), "size": image.config.len()},
            "layers": [],
        }))
        .unwrap();
        let err = store.store_manifest(&manifest).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn remove_last_tag_also_drops_digest_references_of_that_repository() {
        let (_dir, store, image) = store_with_busybox();
        let repo_digest = format!("busybox@{}", image.manifest_digest);
        store.add_repo_digest("busybox", &repo_digest).unwrap();
        let events = store.remove("busybox:latest", false, &no_users).unwrap();
        assert_eq!(
            events[..3],
            [
                RemoveEvent::Untagged("busybox:latest".into()),
                RemoveEvent::Untagged(repo_digest),
                RemoveEvent::Deleted(image.id.clone()),
            ]
        );
    }
}
