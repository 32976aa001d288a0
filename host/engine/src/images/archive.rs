//! `docker load` and `docker save`: docker-archive tars (legacy `<id>/layer.tar` layout and
//! the Docker 25+ one with `blobs/sha256/` and an OCI index) and OCI image-layout tars.
//!
//! Load streams the tar once into scratch files, hashing each file on the way (entries come
//! in any order, and `manifest.json` is often last), then checks every image against its
//! digests, and only then moves blobs into the store and updates the index. Archive paths
//! are only ever keys in a map, never paths on our disk, so `..` or absolute names cannot
//! escape; links are resolved inside the archive with a hop limit.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};

use tar::{EntryType, Header};

use super::blobs::{read_limited, StagedBlob};
use super::digest::Digest;
use super::media::{
    self, host_architecture, ArchiveEntry, Compression, Descriptor, Index, Manifest, Platform,
};
use super::reference::{parse_any, ImageRef, Reference};
use super::store::{
    diff_ids_of, layers_mismatch, lookup, now, parse_config, verify, BlobSource, ImageRecord,
    LayerRecord, ManifestRef, NewImage, MAX_JSON_SIZE,
};
use super::{parse_digest, Image, ImageError, ImageStore};

/// How many links a path may pass through inside an archive.
const MAX_LINK_HOPS: usize = 40;
/// How deep indexes may nest in an OCI layout.
const MAX_INDEX_DEPTH: usize = 4;

impl ImageStore {
    /// `docker load`: stores every image of a docker-archive or OCI-layout tar (optionally
    /// gzip- or zstd-compressed) and reports each as dockerd does (`Loaded image: ...`,
    /// `Loaded image ID: ...`). Either every image is stored or none.
    pub fn load(
        &self,
        archive: impl Read,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<Image>, ImageError> {
        let staging = Staging::extract(self, archive)?;
        let images = if staging.contains("manifest.json") {
            self.plan_docker_archive(&staging)?
        } else if staging.contains("index.json") {
            self.plan_oci_layout(&staging)?
        } else {
            return Err(ImageError::InvalidArchive(
                "no manifest.json or index.json: neither a docker-archive nor an OCI layout".into(),
            ));
        };
        self.commit(images, progress)
    }

    /// `docker save`: writes the images the references name as a docker-archive that also
    /// is an OCI layout (`manifest.json`, `repositories`, `index.json`, `oci-layout`,
    /// `blobs/sha256/...`), like Docker 25 and later. A bare repository name saves every tag
    /// of it.
    pub fn save(&self, references: &[String], out: impl Write) -> Result<(), ImageError> {
        let plan = self.plan_save(references)?;
        write_archive(&plan, out)
    }

    fn plan_docker_archive(&self, staging: &Staging) -> Result<Vec<NewImage>, ImageError> {
        let entries: Vec<ArchiveEntry> =
            serde_json::from_slice(&staging.read_json("manifest.json")?)
                .map_err(ImageError::json("manifest.json"))?;
        let oci_manifests = self.archive_oci_manifests(staging);
        let mut images = Vec::with_capacity(entries.len());
        for entry in entries {
            let config_file = staging.file(&entry.config)?;
            check_named_digest(&entry.config, config_file)?;
            let config_bytes = staging.read_file(config_file, &entry.config)?;
            let id = config_file.digest.clone();
            let config = parse_config(&config_bytes, &id)?;
            let diff_ids = diff_ids_of(&config)?;
            if entry.layers.len() != diff_ids.len() {
                return Err(layers_mismatch(entry.layers.len(), diff_ids.len()));
            }
            let mut blobs = vec![BlobSource::File(
                config_file.path().to_path_buf(),
                id.clone(),
            )];
            let mut layers = Vec::with_capacity(diff_ids.len());
            for (path, diff_id) in entry.layers.iter().zip(&diff_ids) {
                let file = staging.file(path)?;
                check_named_digest(path, file)?;
                layers.push(self.describe_layer(
                    file.path(),
                    &file.digest,
                    file.size,
                    diff_id,
                    None,
                )?);
                blobs.push(BlobSource::File(
                    file.path().to_path_buf(),
                    file.digest.clone(),
                ));
            }
            let tags = entry
                .repo_tags
                .unwrap_or_default()
                .iter()
                .map(|tag| archive_tag(tag))
                .collect::<Result<Vec<_>, _>>()?;
            let reused = oci_manifests
                .iter()
                .find(|m| m.config == id && m.layers.iter().eq(layers.iter().map(|l| &l.digest)));
            let manifest = match reused {
                Some(found) => {
                    blobs.push(BlobSource::File(
                        found.file.path().to_path_buf(),
                        found.reference.digest.clone(),
                    ));
                    found.reference.clone()
                }
                None => {
                    let bytes = synthesize_manifest(&id, config_bytes.len() as u64, &layers)?;
                    let staged = self.blobs.stage_bytes(&bytes)?;
                    let reference = ManifestRef {
                        digest: staged.digest.clone(),
                        media_type: media::OCI_MANIFEST.to_owned(),
                        size: staged.size,
                    };
                    blobs.push(BlobSource::Staged(staged));
                    reference
                }
            };
            images.push(NewImage {
                record: ImageRecord {
                    id,
                    config_size: config_bytes.len() as u64,
                    manifests: vec![manifest],
                    layers,
                    added: now(),
                },
                config,
                blobs,
                tags,
            });
        }
        Ok(images)
    }

    /// The OCI manifests a Docker 25+ archive carries beside `manifest.json`. They are only
    /// a bonus (keeping Docker's manifest digest), so anything unreadable is skipped.
    fn archive_oci_manifests<'s>(&self, staging: &'s Staging) -> Vec<ArchivedManifest<'s>> {
        let Ok(index_bytes) = staging.read_json("index.json") else {
            return Vec::new();
        };
        let Ok(index) = serde_json::from_slice::<Index>(&index_bytes) else {
            return Vec::new();
        };
        index
            .manifests
            .iter()
            .filter(|d| media::is_manifest(&d.media_type))
            .filter_map(|d| {
                let (file, digest) = staging.blob(d, "manifest").ok()?;
                let bytes = staging.read_file(file, digest.as_str()).ok()?;
                let manifest: Manifest = serde_json::from_slice(&bytes).ok()?;
                Some(ArchivedManifest {
                    reference: ManifestRef {
                        digest,
                        media_type: d.media_type.clone(),
                        size: file.size,
                    },
                    file,
                    config: parse_digest(&manifest.config.digest).ok()?,
                    layers: manifest
                        .layers
                        .iter()
                        .map(|l| parse_digest(&l.digest))
                        .collect::<Result<_, _>>()
                        .ok()?,
                })
            })
            .collect()
    }

    fn plan_oci_layout(&self, staging: &Staging) -> Result<Vec<NewImage>, ImageError> {
        if staging.contains("oci-layout") {
            let layout: serde_json::Value =
                serde_json::from_slice(&staging.read_json("oci-layout")?)
                    .map_err(ImageError::json("oci-layout"))?;
            let version = layout.get("imageLayoutVersion").and_then(|v| v.as_str());
            if version != Some("1.0.0") {
                return Err(ImageError::InvalidArchive(format!(
                    "unsupported OCI layout version {version:?}"
                )));
            }
        }
        let index: Index = serde_json::from_slice(&staging.read_json("index.json")?)
            .map_err(ImageError::json("index.json"))?;
        if index.manifests.is_empty() {
            return Err(ImageError::InvalidArchive(
                "index.json lists no manifests".into(),
            ));
        }
        let mut images = Vec::new();
        for descriptor in &index.manifests {
            let tags = annotation_tags(descriptor)?;
            let manifest = self.select_manifest(staging, descriptor, 0)?;
            images.push(self.plan_oci_image(staging, manifest, tags)?);
        }
        Ok(images)
    }

    /// Follows nested indexes down to the image manifest for this machine's platform.
    fn select_manifest(
        &self,
        staging: &Staging,
        descriptor: &Descriptor,
        depth: usize,
    ) -> Result<(Descriptor, Vec<u8>), ImageError> {
        let (file, digest) = staging.blob(descriptor, "manifest")?;
        let bytes = staging.read_file(file, digest.as_str())?;
        let media_type = match descriptor.media_type.as_str() {
            "" => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| media::OCI_MANIFEST.to_owned()),
            given => given.to_owned(),
        };
        if media::is_manifest(&media_type) {
            let mut descriptor = descriptor.clone();
            descriptor.media_type = media_type;
            return Ok((descriptor, bytes));
        }
        if !media::is_index(&media_type) || depth >= MAX_INDEX_DEPTH {
            return Err(ImageError::InvalidArchive(format!(
                "{digest} has media type {media_type:?}, not an image manifest or index"
            )));
        }
        let index: Index =
            serde_json::from_slice(&bytes).map_err(ImageError::json(format!("index {digest}")))?;
        let chosen = choose_platform(&index.manifests).ok_or_else(|| {
            ImageError::InvalidArchive(format!(
                "no matching manifest for linux/{} in the manifest list entries",
                host_architecture()
            ))
        })?;
        self.select_manifest(staging, chosen, depth + 1)
    }

    fn plan_oci_image(
        &self,
        staging: &Staging,
        (descriptor, bytes): (Descriptor, Vec<u8>),
        tags: Vec<Reference>,
    ) -> Result<NewImage, ImageError> {
        let manifest_digest = Digest::of(&bytes);
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(ImageError::json(format!("manifest {manifest_digest}")))?;
        let (config_file, id) = staging.blob(&manifest.config, "config")?;
        let config_bytes = staging.read_file(config_file, id.as_str())?;
        let config = parse_config(&config_bytes, &id)?;
        let diff_ids = diff_ids_of(&config)?;
        if manifest.layers.len() != diff_ids.len() {
            return Err(layers_mismatch(manifest.layers.len(), diff_ids.len()));
        }
        let manifest_file = staging.file(&blob_path(&manifest_digest))?;
        let mut blobs = vec![
            BlobSource::File(config_file.path().to_path_buf(), id.clone()),
            BlobSource::File(manifest_file.path().to_path_buf(), manifest_digest.clone()),
        ];
        let mut layers = Vec::with_capacity(diff_ids.len());
        for (layer, diff_id) in manifest.layers.iter().zip(&diff_ids) {
            let (file, digest) = staging.blob(layer, "layer")?;
            let media_type = Some(layer.media_type.as_str()).filter(|m| !m.is_empty());
            layers.push(self.describe_layer(
                file.path(),
                &digest,
                file.size,
                diff_id,
                media_type,
            )?);
            blobs.push(BlobSource::File(file.path().to_path_buf(), digest));
        }
        Ok(NewImage {
            record: ImageRecord {
                id,
                config_size: config_bytes.len() as u64,
                manifests: vec![ManifestRef {
                    digest: manifest_digest,
                    media_type: descriptor.media_type,
                    size: bytes.len() as u64,
                }],
                layers,
                added: now(),
            },
            config,
            blobs,
            tags,
        })
    }

    /// Resolves the references of a save under the lock and opens every blob, so a
    /// concurrent `rmi` cannot pull files from under the writer (open files outlive unlink).
    fn plan_save(&self, references: &[String]) -> Result<Vec<SaveImage>, ImageError> {
        let state = self.lock();
        let mut order: Vec<Digest> = Vec::new();
        let mut tags: BTreeMap<Digest, Vec<Reference>> = BTreeMap::new();
        let mut add = |id: Digest, tag: Option<Reference>| {
            let list = tags.entry(id.clone()).or_insert_with(|| {
                order.push(id);
                Vec::new()
            });
            if let Some(tag) = tag.filter(|t| !list.contains(t)) {
                list.push(tag);
            }
        };
        for name in references {
            let named = match parse_any(name)? {
                ImageRef::Id(_) => {
                    add(lookup(&state, name)?, None);
                    continue;
                }
                ImageRef::Named(named) => named,
            };
            if named.is_name_only() && named.familiar_name() != "sha256" {
                let tagged: Vec<(Reference, Digest)> = state
                    .refs
                    .iter()
                    .filter_map(|(key, id)| {
                        Some((Reference::parse_normalized(key).ok()?, id.clone()))
                    })
                    .filter(|(r, _)| !r.is_canonical() && r.name() == named.name())
                    .collect();
                if !tagged.is_empty() {
                    for (reference, id) in tagged {
                        add(id, Some(reference));
                    }
                    continue;
                }
            }
            let id = lookup(&state, name)?;
            let tag = (!named.is_canonical()
                && state.refs.contains_key(&named.store_key().to_string()))
            .then(|| named.with_default_tag());
            add(id, tag);
        }
        order
            .into_iter()
            .map(|id| {
                let stored = &state.images[&id];
                let record = stored.record.clone();
                let open = |digest: &Digest| self.blobs.open_blob(digest);
                Ok(SaveImage {
                    config: open(&record.id)?,
                    manifest: open(&record.manifests[0].digest)?,
                    layers: record
                        .layers
                        .iter()
                        .map(|l| open(&l.digest))
                        .collect::<Result<_, _>>()?,
                    platform: Platform {
                        architecture: stored.config.architecture().to_string(),
                        os: stored.config.os().to_string(),
                        variant: stored.config.variant().clone(),
                    },
                    tags: tags.remove(&id).unwrap_or_default(),
                    record,
                })
            })
            .collect()
    }
}

/// An image about to be written by `save`, with its blobs open.
struct SaveImage {
    record: ImageRecord,
    platform: Platform,
    tags: Vec<Reference>,
    config: File,
    manifest: File,
    layers: Vec<File>,
}

/// A manifest found in a docker-archive's OCI index.
struct ArchivedManifest<'s> {
    reference: ManifestRef,
    file: &'s StagedBlob,
    config: Digest,
    layers: Vec<Digest>,
}

/// The regular files of an archive in scratch space, with their digests, and its links.
struct Staging {
    files: Vec<StagedBlob>,
    by_path: HashMap<String, usize>,
    links: HashMap<String, Link>,
}

enum Link {
    /// Relative to the link's directory, or to the archive root if absolute.
    Symbolic(String),
    /// Relative to the archive root.
    Hard(String),
}

impl Staging {
    fn extract(store: &ImageStore, archive: impl Read) -> Result<Self, ImageError> {
        let mut input = BufReader::with_capacity(256 * 1024, archive);
        let prefix = input.fill_buf().map_err(ImageError::ReadInput)?;
        let compression = Compression::detect(prefix).map_err(|unsupported| {
            ImageError::InvalidArchive(format!(
                "the archive is compressed with {}; Berth reads plain, gzip and zstd archives",
                unsupported.0
            ))
        })?;
        let stream = compression.decoder(input).map_err(ImageError::ReadInput)?;
        let mut archive = tar::Archive::new(stream);
        let mut staging = Self {
            files: Vec::new(),
            by_path: HashMap::new(),
            links: HashMap::new(),
        };
        for entry in archive.entries().map_err(ImageError::ReadInput)? {
            let mut entry = entry.map_err(ImageError::ReadInput)?;
            let raw_path = entry.path().map_err(ImageError::ReadInput)?;
            let Some(path) = normalize(&raw_path.to_string_lossy()) else {
                continue;
            };
            let link_target = || -> Result<String, ImageError> {
                Ok(entry
                    .link_name()
                    .map_err(ImageError::ReadInput)?
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default())
            };
            match entry.header().entry_type() {
                EntryType::Regular | EntryType::Continuous => {
                    let staged = store.blobs.stage(&mut entry)?;
                    staging.links.remove(&path);
                    staging.by_path.insert(path, staging.files.len());
                    staging.files.push(staged);
                }
                EntryType::Symlink => {
                    let target = link_target()?;
                    staging.by_path.remove(&path);
                    staging.links.insert(path, Link::Symbolic(target));
                }
                EntryType::Link => {
                    let target = link_target()?;
                    staging.by_path.remove(&path);
                    staging.links.insert(path, Link::Hard(target));
                }
                _ => {}
            }
        }
        Ok(staging)
    }

    fn contains(&self, path: &str) -> bool {
        self.resolve(path).is_some()
    }

    /// The file at an archive path, following links.
    fn file(&self, path: &str) -> Result<&StagedBlob, ImageError> {
        self.resolve(path).ok_or_else(|| {
            ImageError::InvalidArchive(format!("{path} is missing from the archive"))
        })
    }

    fn resolve(&self, path: &str) -> Option<&StagedBlob> {
        let mut current = normalize(path)?;
        for _ in 0..MAX_LINK_HOPS {
            let parts: Vec<&str> = current.split('/').collect();
            let link = (1..=parts.len()).find_map(|i| {
                let prefix = parts[..i].join("/");
                self.links.get(&prefix).map(|link| (i, link))
            });
            let Some((i, link)) = link else {
                return self.by_path.get(&current).map(|&index| &self.files[index]);
            };
            let target = match link {
                Link::Symbolic(target) if !target.starts_with('/') => {
                    format!("{}/{target}", parts[..i - 1].join("/"))
                }
                Link::Symbolic(target) | Link::Hard(target) => target.clone(),
            };
            current = normalize(&format!("{target}/{}", parts[i..].join("/")))?;
        }
        None
    }

    /// A content-addressed blob of an OCI layout, checked against its descriptor.
    fn blob(
        &self,
        descriptor: &Descriptor,
        what: &str,
    ) -> Result<(&StagedBlob, Digest), ImageError> {
        let digest = parse_digest(&descriptor.digest)?;
        let file = self.file(&blob_path(&digest))?;
        verify(
            &file.digest,
            file.size,
            &digest,
            Some(descriptor.size),
            &format!("{what} {digest}"),
        )?;
        Ok((file, digest))
    }

    fn read_json(&self, path: &str) -> Result<Vec<u8>, ImageError> {
        self.read_file(self.file(path)?, path)
    }

    fn read_file(&self, file: &StagedBlob, what: &str) -> Result<Vec<u8>, ImageError> {
        let handle =
            File::open(file.path()).map_err(ImageError::io(format!("opening staged {what}")))?;
        read_limited(handle, MAX_JSON_SIZE, what)
            .map_err(ImageError::io(format!("reading staged {what}")))?
    }
}

/// Collapses `.`, `..` and empty components; `None` for the archive root itself.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// A path that names its content (`blobs/sha256/<hex>`, or a legacy `<hex>.json` config)
/// must hold that content.
fn check_named_digest(path: &str, file: &StagedBlob) -> Result<(), ImageError> {
    let normalized = normalize(path).unwrap_or_default();
    let named = normalized
        .strip_prefix("blobs/sha256/")
        .or_else(|| {
            normalized
                .strip_suffix(".json")
                .filter(|n| !n.contains('/'))
        })
        .and_then(|hex| Digest::from_hex(hex).ok());
    match named {
        Some(expected) => verify(&file.digest, file.size, &expected, None, path),
        None => Ok(()),
    }
}

/// A `RepoTags` entry: must name a repository and a tag (Docker's `invalid tag`).
fn archive_tag(tag: &str) -> Result<Reference, ImageError> {
    let reference = Reference::parse_normalized(tag)?;
    if reference.tag().is_none() || reference.is_canonical() {
        return Err(ImageError::InvalidArchive(format!("invalid tag {tag:?}")));
    }
    Ok(reference)
}

/// The names an OCI index gives a manifest: containerd's full-name annotation, else an
/// `org.opencontainers.image.ref.name` that is a full reference (a bare tag such as
/// `latest` names no repository, so the image loads untagged).
fn annotation_tags(descriptor: &Descriptor) -> Result<Vec<Reference>, ImageError> {
    let Some(annotations) = &descriptor.annotations else {
        return Ok(Vec::new());
    };
    let name = annotations.get(media::ANNOTATION_IMAGE_NAME).or_else(|| {
        annotations
            .get(media::ANNOTATION_REF_NAME)
            .filter(|r| r.contains(['/', ':']))
    });
    let Some(name) = name else {
        return Ok(Vec::new());
    };
    let reference = Reference::parse_normalized(name)?;
    if reference.is_canonical() {
        return Ok(Vec::new());
    }
    Ok(vec![reference.with_default_tag()])
}

/// The entry of an index for linux on this machine's architecture; an entry without a
/// platform counts when it is the only image entry.
fn choose_platform(entries: &[Descriptor]) -> Option<&Descriptor> {
    let arch = host_architecture();
    let images: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.media_type.is_empty()
                || media::is_manifest(&d.media_type)
                || media::is_index(&d.media_type)
        })
        .collect();
    images
        .iter()
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .or_else(|| match images.as_slice() {
            [only] if only.platform.is_none() => Some(only),
            _ => None,
        })
        .copied()
}

/// The OCI manifest Berth writes for an image that arrived without one (docker-archive
/// load, import): fixed field order, so the same image always gets the same digest.
pub(super) fn synthesize_manifest(
    config: &Digest,
    config_size: u64,
    layers: &[LayerRecord],
) -> Result<Vec<u8>, ImageError> {
    let descriptor = |media_type: &str, digest: &Digest, size: u64| Descriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_string(),
        size,
        urls: None,
        annotations: None,
        platform: None,
    };
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.to_owned()),
        config: descriptor(media::OCI_CONFIG, config, config_size),
        layers: layers
            .iter()
            .map(|l| descriptor(&l.media_type, &l.digest, l.size))
            .collect(),
        annotations: None,
    };
    serde_json::to_vec(&manifest).map_err(ImageError::json("manifest"))
}

/// Writes the planned images as one tar: blobs first, then the index files.
fn write_archive(plan: &[SaveImage], out: impl Write) -> Result<(), ImageError> {
    let mut builder = tar::Builder::new(out);
    let write = ImageError::WriteOutput;
    for dir in ["blobs/", "blobs/sha256/"] {
        append_dir(&mut builder, dir).map_err(write)?;
    }
    let mut written = BTreeSet::new();
    let mut manifest_json = Vec::new();
    let mut index = Index {
        schema_version: 2,
        media_type: Some(media::OCI_INDEX.to_owned()),
        manifests: Vec::new(),
        annotations: None,
    };
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for image in plan {
        let record = &image.record;
        let manifest = &record.manifests[0];
        let blobs = record
            .layers
            .iter()
            .map(|l| (&l.digest, l.size))
            .zip(&image.layers)
            .chain([((&record.id, record.config_size), &image.config)])
            .chain([((&manifest.digest, manifest.size), &image.manifest)]);
        for ((digest, size), file) in blobs {
            if written.insert(digest.clone()) {
                append_file(&mut builder, &blob_path(digest), size, file).map_err(write)?;
            }
        }
        let descriptor = Descriptor {
            media_type: manifest.media_type.clone(),
            digest: manifest.digest.to_string(),
            size: manifest.size,
            urls: None,
            annotations: None,
            platform: Some(image.platform.clone()),
        };
        if image.tags.is_empty() {
            index.manifests.push(descriptor.clone());
        }
        for tag in &image.tags {
            let tag_name = tag.tag().unwrap_or(super::reference::DEFAULT_TAG);
            let mut named = descriptor.clone();
            named.annotations = Some(BTreeMap::from([
                (media::ANNOTATION_IMAGE_NAME.to_owned(), tag.to_string()),
                (media::ANNOTATION_REF_NAME.to_owned(), tag_name.to_owned()),
            ]));
            index.manifests.push(named);
            if let Some(top) = record.layers.last() {
                repositories
                    .entry(tag.familiar_name())
                    .or_default()
                    .insert(tag_name.to_owned(), top.diff_id.hex().to_owned());
            }
        }
        manifest_json.push(ArchiveEntry {
            config: blob_path(&record.id),
            repo_tags: (!image.tags.is_empty())
                .then(|| image.tags.iter().map(Reference::familiar).collect()),
            layers: record.layers.iter().map(|l| blob_path(&l.digest)).collect(),
        });
    }
    let mut documents = vec![
        ("index.json", to_json(&index, "index.json")?),
        ("manifest.json", to_json(&manifest_json, "manifest.json")?),
        ("oci-layout", media::OCI_LAYOUT_FILE.as_bytes().to_vec()),
    ];
    if !repositories.is_empty() {
        documents.push(("repositories", to_json(&repositories, "repositories")?));
    }
    for (name, data) in documents {
        append_file(&mut builder, name, data.len() as u64, &data[..]).map_err(write)?;
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(write)
}

/// A document of the archive as JSON with a trailing newline, as Docker's encoder writes it.
fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut data = serde_json::to_vec(value).map_err(ImageError::json(what))?;
    data.push(b'\n');
    Ok(data)
}

fn append_dir<W: Write>(builder: &mut tar::Builder<W>, path: &str) -> std::io::Result<()> {
    let mut header = fixed_header(EntryType::Directory, 0o755, 0);
    builder.append_data(&mut header, path, std::io::empty())
}

fn append_file<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    data: impl Read,
) -> std::io::Result<()> {
    let mut header = fixed_header(EntryType::Regular, 0o644, size);
    let mut exact = Exact {
        inner: data.take(size),
        remaining: size,
    };
    builder.append_data(&mut header, path, &mut exact)
}

/// A reader of exactly `remaining` bytes: a blob that shrank since it was stored fails the
/// save instead of producing a corrupt tar.
struct Exact<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("a blob is {} bytes shorter than recorded", self.remaining),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A header with the fields that would make the output differ between runs zeroed.
fn fixed_header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{
        blob_count, busybox, docker25_archive, gzip, layer, legacy_docker_archive, load,
        oci_layout, open_store, tar_of, Entry, TestImage,
    };
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn load_legacy_archive_stores_images_and_reports_like_dockerd() {
        let (_dir, store) = open_store();
        let base = busybox();
        // Shares its bottom layer with `base`: the archive links it by symlink.
        let app = TestImage::new(
            vec![base.layers[0].clone(), layer(&[("app", "v1")])],
            "app",
            &["example.com/team/app:1", "app:latest"],
        );
        let lines = load(&store, &legacy_docker_archive(&[base, app]));
        assert_eq!(
            lines,
            [
                "Loaded image: busybox:latest",
                "Loaded image: example.com/team/app:1",
                "Loaded image: app:latest"
            ]
        );
        let images = store.list().unwrap();
        assert_eq!(images.len(), 2);
        let app = store.resolve("example.com/team/app:1").unwrap();
        assert_eq!(app.repo_tags, ["app:latest", "example.com/team/app:1"]);
        assert_eq!(app.layers[0].blob_digest, app.layers[0].diff_id);
        assert_eq!(app.layers[0].media_type, media::OCI_LAYER);
        assert_eq!(
            app.config
                .config()
                .as_ref()
                .unwrap()
                .cmd()
                .as_ref()
                .unwrap(),
            &["app"]
        );
    }

    #[test]
    fn load_untagged_image_reports_its_id() {
        let (_dir, store) = open_store();
        let image = TestImage::new(vec![layer(&[("a", "a")])], "sh", &[]);
        let lines = load(&store, &legacy_docker_archive(&[image]));
        let id = store.list().unwrap()[0].id.clone();
        assert_eq!(lines, [format!("Loaded image ID: {id}")]);
    }

    #[test]
    fn load_docker25_archive_keeps_dockers_manifest() {
        let (_dir, store) = open_store();
        let image = busybox();
        let archive = docker25_archive(&[image]);
        load(&store, &archive);
        let loaded = store.resolve("busybox").unwrap();
        let manifest = store.manifest("busybox").unwrap();
        // The manifest is the one from the archive's index, byte for byte.
        let staged: Manifest = serde_json::from_slice(&manifest.bytes).unwrap();
        assert_eq!(staged.config.digest, loaded.id);
        assert_eq!(manifest.digest, loaded.manifest_digest);
        assert_eq!(Digest::of(&manifest.bytes).to_string(), manifest.digest);
    }

    #[test]
    fn load_gzip_compressed_archive() {
        let (_dir, store) = open_store();
        let image = busybox();
        let id = image.id();
        load(&store, &gzip(&legacy_docker_archive(&[image])));
        assert_eq!(store.resolve("busybox:latest").unwrap().id, id.to_string());
    }

    #[test]
    fn load_zstd_compressed_archive() {
        let (_dir, store) = open_store();
        let image = busybox();
        let id = image.id();
        let archive = ruzstd::encoding::compress_to_vec(
            &legacy_docker_archive(&[image])[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        load(&store, &archive);
        assert_eq!(store.resolve("busybox").unwrap().id, id.to_string());
    }

    #[test]
    fn load_oci_layout_names_images_from_full_ref_annotations_only() {
        let (_dir, store) = open_store();
        let named = TestImage::new(vec![layer(&[("a", "1")])], "a", &[]);
        let bare = TestImage::new(vec![layer(&[("b", "2")])], "b", &[]);
        let lines = load(
            &store,
            &oci_layout(&[(&named, Some("example.com/x:1")), (&bare, Some("latest"))]),
        );
        assert_eq!(
            lines,
            [
                "Loaded image: example.com/x:1".to_owned(),
                format!("Loaded image ID: {}", bare.id())
            ]
        );
        let image = store.resolve("example.com/x:1").unwrap();
        assert_eq!(image.layers[0].media_type, media::OCI_LAYER_GZIP);
        assert_eq!(
            image.layers[0].diff_id,
            Digest::of(&named.layers[0]).to_string()
        );
        assert_ne!(image.layers[0].blob_digest, image.layers[0].diff_id);
        assert_eq!(image.size, named.layers[0].len() as u64);
    }

    #[test]
    fn save_then_load_round_trip_keeps_id_tags_and_manifest() {
        let (_dir, store) = open_store();
        load(&store, &legacy_docker_archive(&[busybox()]));
        let original = store.resolve("busybox").unwrap();
        let mut saved = Vec::new();
        store.save(&["busybox".into()], &mut saved).unwrap();

        let (_dir2, other) = open_store();
        let lines = load(&other, &saved);
        let reloaded = other.resolve("busybox:latest").unwrap();
        assert_eq!(lines, ["Loaded image: busybox:latest"]);
        assert_eq!(reloaded.id, original.id);
        assert_eq!(reloaded.manifest_digest, original.manifest_digest);
        assert_eq!(reloaded.layers, original.layers);
    }

    #[test]
    fn save_writes_docker_and_oci_index_files() {
        let (_dir, store) = open_store();
        load(&store, &legacy_docker_archive(&[busybox()]));
        let image = store.resolve("busybox").unwrap();
        let mut saved = Vec::new();
        store
            .save(
                &[image.id[7..19].to_owned(), "busybox:latest".into()],
                &mut saved,
            )
            .unwrap();
        let mut archive = tar::Archive::new(&saved[..]);
        let mut files = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(entry.path().unwrap().to_string_lossy().into_owned(), data);
        }
        let manifest: Vec<ArchiveEntry> = serde_json::from_slice(&files["manifest.json"]).unwrap();
        let index: Index = serde_json::from_slice(&files["index.json"]).unwrap();
        let repositories: serde_json::Value =
            serde_json::from_slice(&files["repositories"]).unwrap();
        let top_layer = image.layers[1].diff_id.trim_start_matches("sha256:");
        assert_eq!(manifest.len(), 1);
        assert_eq!(
            manifest[0].repo_tags.as_deref(),
            Some(&["busybox:latest".to_owned()][..])
        );
        assert_eq!(
            manifest[0].config,
            format!("blobs/sha256/{}", &image.id[7..])
        );
        assert_eq!(index.manifests.len(), 1);
        assert_eq!(index.manifests[0].digest, image.manifest_digest);
        assert_eq!(
            index.manifests[0].annotations.as_ref().unwrap()[media::ANNOTATION_IMAGE_NAME],
            "docker.io/library/busybox:latest"
        );
        assert_eq!(repositories["busybox"]["latest"], top_layer);
        assert_eq!(files["oci-layout"], media::OCI_LAYOUT_FILE.as_bytes());
    }

    #[test]
    fn save_of_a_bare_name_saves_every_tag_of_it() {
        let (_dir, store) = open_store();
        load(&store, &legacy_docker_archive(&[busybox()]));
        store.tag("busybox", "busybox:1.36").unwrap();
        store.tag("busybox", "other:1").unwrap();
        let mut saved = Vec::new();
        store.save(&["busybox".into()], &mut saved).unwrap();
        let (_dir2, other) = open_store();
        let lines = load(&other, &saved);
        assert_eq!(
            lines,
            ["Loaded image: busybox:1.36", "Loaded image: busybox:latest"]
        );
    }

    #[test]
    fn save_is_byte_for_byte_reproducible() {
        let (_dir, store) = open_store();
        load(&store, &legacy_docker_archive(&[busybox()]));
        let mut first = Vec::new();
        let mut second = Vec::new();
        store.save(&["busybox".into()], &mut first).unwrap();
        store.save(&["busybox".into()], &mut second).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn save_of_missing_image_is_not_found() {
        let (_dir, store) = open_store();
        let err = store.save(&["nothere".into()], Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "No such image: nothere:latest");
    }

    #[test]
    fn load_with_corrupt_blob_is_rejected_and_stores_nothing() {
        let (dir, store) = open_store();
        load(&store, &legacy_docker_archive(&[busybox()]));
        let blobs_before = blob_count(dir.path());
        let image = TestImage::new(vec![layer(&[("x", "1")])], "x", &["x:1"]);
        let good = Digest::of(&image.layers[0]);
        let archive = tar_of(&[
            Entry::File(
                format!("blobs/sha256/{}", image.id().hex()),
                image.config.clone(),
            ),
            // Named as the layer the config expects, but with other bytes.
            Entry::File(
                format!("blobs/sha256/{}", good.hex()),
                layer(&[("x", "tampered")]),
            ),
            Entry::File(
                "manifest.json".into(),
                serde_json::to_vec(&serde_json::json!([{
                    "Config": format!("blobs/sha256/{}", image.id().hex()),
                    "RepoTags": ["x:1"],
                    "Layers": [format!("blobs/sha256/{}", good.hex())],
                }]))
                .unwrap(),
            ),
        ]);
        let err = store.load(&archive[..], &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let message = err.to_string();
        assert!(message.contains(&format!("expected {good}")), "{message}");
        assert!(message.contains("got sha256:"), "{message}");
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(blob_count(dir.path()), blobs_before);
        assert!(store.resolve("busybox").is_ok());
    }

    #[test]
    fn load_with_layer_not_matching_diff_id_is_rejected() {
        let (dir, store) = open_store();
        let mut image = busybox();
        image.layers[1] = layer(&[("etc/passwd", "changed")]);
        let err = store
            .load(&legacy_docker_archive(&[image])[..], &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
        assert_eq!(blob_count(dir.path()), 0);
    }

    #[test]
    fn load_with_layer_count_mismatch_is_rejected() {
        let (_dir, store) = open_store();
        let mut image = busybox();
        image.layers.pop();
        let err = store
            .load(&legacy_docker_archive(&[image])[..], &mut |_| {})
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid archive: invalid manifest, layers length mismatch: expected 1, got 2"
        );
    }

    #[test]
    fn load_of_garbage_is_invalid_argument() {
        let (_dir, store) = open_store();
        let err = store
            .load(
                &b"this is not a tar archive at all, just some text"[..],
                &mut |_| {},
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn load_of_tar_without_manifest_is_invalid_archive() {
        let (_dir, store) = open_store();
        let err = store
            .load(&layer(&[("a", "b")])[..], &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, ImageError::InvalidArchive(_)), "{err:?}");
    }

    #[test]
    fn load_moving_a_tag_reports_the_rename() {
        let (_dir, store) = open_store();
        let old = busybox();
        let old_id = old.id();
        load(&store, &legacy_docker_archive(&[old]));
        let new = TestImage::new(vec![layer(&[("new", "1")])], "sh", &["busybox:latest"]);
        let lines = load(&store, &legacy_docker_archive(&[new]));
        assert_eq!(
            lines,
            [
                format!("The image busybox:latest already exists, renaming the old one with ID {old_id} to empty string"),
                "Loaded image: busybox:latest".to_owned(),
            ]
        );
        assert!(store.resolve(old_id.as_str()).unwrap().repo_tags.is_empty());
    }

    #[test]
    fn load_rejects_repo_tags_without_tag() {
        let (_dir, store) = open_store();
        let image = TestImage::new(vec![layer(&[("a", "a")])], "sh", &["busybox"]);
        let err = store
            .load(&legacy_docker_archive(&[image])[..], &mut |_| {})
            .unwrap_err();
        assert_eq!(err.to_string(), "invalid archive: invalid tag \"busybox\"");
    }

    #[test]
    fn resolve_follows_links_inside_the_archive_only() {
        let staging = Staging {
            files: Vec::new(),
            by_path: HashMap::new(),
            links: HashMap::from([
                (
                    "a/layer.tar".to_owned(),
                    Link::Symbolic("../../../etc/passwd".into()),
                ),
                ("loop".to_owned(), Link::Symbolic("loop".into())),
            ]),
        };
        assert!(staging.resolve("a/layer.tar").is_none());
        assert!(staging.resolve("loop").is_none());
        assert_eq!(normalize("./a/../../b//c/."), Some("b/c".into()));
    }
}
