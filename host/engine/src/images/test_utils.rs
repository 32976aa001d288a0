//! Builders for the archives the image store's tests load: layer tars, Docker-shaped
//! configs, docker-archives in both layouts, and OCI layouts, all in memory.

use std::collections::BTreeMap;

use serde_json::json;

use super::digest::Digest;
use super::media;

/// A tar entry to build: a file with content, or a symlink.
pub(crate) enum Entry {
    File(String, Vec<u8>),
    Symlink(String, String),
}

/// A plain tar of `entries`, in order.
pub(crate) fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        match entry {
            Entry::File(path, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, &data[..]).unwrap();
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// A layer tar holding `files` (path, content).
pub(crate) fn layer(files: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<Entry> = files
        .iter()
        .map(|(path, data)| Entry::File((*path).to_owned(), data.as_bytes().to_vec()))
        .collect();
    tar_of(&entries)
}

/// A gzip-compressed copy of `data`.
pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A config as Docker writes it (with fields oci_spec does not know) for uncompressed
/// `layers`; `cmd` makes configs of otherwise equal images differ.
pub(crate) fn config_for(layers: &[Vec<u8>], cmd: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| Digest::of(l).to_string()).collect();
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "docker_version": "28.2.2",
        "config": {
            "Cmd": [cmd],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "ExposedPorts": null,
            "Healthcheck": {"Test": ["NONE"]},
            "Labels": null
        },
        "container_config": {"Cmd": null},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "test"}]
    }))
    .unwrap()
}

/// An image for an archive: config, uncompressed layers, tags.
pub(crate) struct TestImage {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub repo_tags: Vec<String>,
}

impl TestImage {
    /// An image of `layers` with `cmd` and `tags`.
    pub(crate) fn new(layers: Vec<Vec<u8>>, cmd: &str, tags: &[&str]) -> Self {
        Self {
            config: config_for(&layers, cmd),
            layers,
            repo_tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        }
    }

    /// The image ID loading it must give.
    pub(crate) fn id(&self) -> Digest {
        Digest::of(&self.config)
    }
}

/// A docker-archive in the pre-25 layout: `<hex>.json` configs, `<n>/layer.tar` layers,
/// a layer shared between images stored once and linked from the others by symlink.
pub(crate) fn legacy_docker_archive(images: &[TestImage]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut manifest = Vec::new();
    let mut seen: BTreeMap<Digest, String> = BTreeMap::new();
    for (i, image) in images.iter().enumerate() {
        let config_name = format!("{}.json", image.id().hex());
        entries.push(Entry::File(config_name.clone(), image.config.clone()));
        let mut layer_paths = Vec::new();
        for (j, layer) in image.layers.iter().enumerate() {
            let path = format!("{i}-{j}/layer.tar");
            match seen.get(&Digest::of(layer)) {
                Some(first) => entries.push(Entry::Symlink(path.clone(), format!("../{first}"))),
                None => {
                    seen.insert(Digest::of(layer), path.clone());
                    entries.push(Entry::File(path.clone(), layer.clone()));
                }
            }
            layer_paths.push(path);
        }
        manifest.push(
            json!({"Config": config_name, "RepoTags": image.repo_tags, "Layers": layer_paths}),
        );
    }
    // manifest.json last, as `docker save` of old versions wrote it.
    entries.push(Entry::File(
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    tar_of(&entries)
}

/// The manifest and blobs of `image` in OCI form with layers as given (already
/// compressed or not), plus the manifest bytes.
fn oci_blobs(
    image: &TestImage,
    stored_layers: &[Vec<u8>],
    layer_type: &str,
) -> (Vec<Entry>, Vec<u8>) {
    let mut entries = vec![Entry::File(
        format!("blobs/sha256/{}", image.id().hex()),
        image.config.clone(),
    )];
    let mut descriptors = Vec::new();
    for layer in stored_layers {
        let digest = Digest::of(layer);
        entries.push(Entry::File(
            format!("blobs/sha256/{}", digest.hex()),
            layer.clone(),
        ));
        descriptors
            .push(json!({"mediaType": layer_type, "digest": digest.as_str(), "size": layer.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": image.id().as_str(), "size": image.config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    entries.push(Entry::File(
        format!("blobs/sha256/{}", Digest::of(&manifest).hex()),
        manifest.clone(),
    ));
    (entries, manifest)
}

/// An OCI image layout with one index entry per image, its layers gzip-compressed, named by
/// the `org.opencontainers.image.ref.name` annotation `ref_name` if given.
pub(crate) fn oci_layout(images: &[(&TestImage, Option<&str>)]) -> Vec<u8> {
    let mut entries = vec![Entry::File(
        "oci-layout".into(),
        media::OCI_LAYOUT_FILE.as_bytes().to_vec(),
    )];
    let mut manifests = Vec::new();
    for (image, ref_name) in images {
        let compressed: Vec<Vec<u8>> = image.layers.iter().map(|l| gzip(l)).collect();
        let (blobs, manifest) = oci_blobs(image, &compressed, media::OCI_LAYER_GZIP);
        entries.extend(blobs);
        let mut descriptor = json!({
            "mediaType": media::OCI_MANIFEST,
            "digest": Digest::of(&manifest).as_str(),
            "size": manifest.len(),
        });
        if let Some(name) = ref_name {
            descriptor["annotations"] = json!({ media::ANNOTATION_REF_NAME: name });
        }
        manifests.push(descriptor);
    }
    let index = json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests});
    entries.push(Entry::File(
        "index.json".into(),
        serde_json::to_vec(&index).unwrap(),
    ));
    tar_of(&entries)
}

/// A Docker 25+ archive: `blobs/sha256/<hex>` for configs and (uncompressed) layers,
/// `manifest.json`, and an OCI `index.json` whose manifests describe the same images.
pub(crate) fn docker25_archive(images: &[TestImage]) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut manifest = Vec::new();
    let mut descriptors = Vec::new();
    for image in images {
        let (blobs, oci_manifest) = oci_blobs(image, &image.layers, media::OCI_LAYER);
        entries.extend(blobs);
        let layer_paths: Vec<String> = image
            .layers
            .iter()
            .map(|l| format!("blobs/sha256/{}", Digest::of(l).hex()))
            .collect();
        manifest.push(json!({
            "Config": format!("blobs/sha256/{}", image.id().hex()),
            "RepoTags": image.repo_tags,
            "Layers": layer_paths,
        }));
        descriptors.push(json!({
            "mediaType": media::OCI_MANIFEST,
            "digest": Digest::of(&oci_manifest).as_str(),
            "size": oci_manifest.len(),
        }));
    }
    let index =
        json!({"schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": descriptors});
    entries.push(Entry::File(
        "index.json".into(),
        serde_json::to_vec(&index).unwrap(),
    ));
    entries.push(Entry::File(
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    entries.push(Entry::File(
        "oci-layout".into(),
        media::OCI_LAYOUT_FILE.as_bytes().to_vec(),
    ));
    tar_of(&entries)
}

/// A fresh store in a temporary directory (kept alive by the returned guard).
pub(crate) fn open_store() -> (tempfile::TempDir, super::ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = super::ImageStore::open(dir.path()).unwrap();
    (dir, store)
}

/// Loads `archive`, returning the progress lines.
pub(crate) fn load(store: &super::ImageStore, archive: &[u8]) -> Vec<String> {
    let mut lines = Vec::new();
    store
        .load(archive, &mut |line: &str| lines.push(line.to_owned()))
        .unwrap();
    lines
}

/// A user callback for which no container uses any image.
pub(crate) fn no_users(_: &str) -> Option<super::ImageUser> {
    None
}

/// The number of blobs in a store's blob directory.
pub(crate) fn blob_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count()
}

/// The busybox-like image most tests use: two layers, tagged `busybox:latest`.
pub(crate) fn busybox() -> TestImage {
    TestImage::new(
        vec![
            layer(&[("bin/busybox", "binary")]),
            layer(&[("etc/passwd", "root:x:0:0")]),
        ],
        "sh",
        &["busybox:latest"],
    )
}
