//! New images made from old ones: `docker commit` and every step of `docker build`.
//!
//! A derived image is its parent's layers (none for `FROM scratch`), plus at most one new
//! layer from an uncompressed tar diff, with a new run configuration and one more history
//! entry. The new layer is stored gzip-compressed (what registries and `docker save` expect);
//! its diff ID is hashed from the uncompressed stream on the way in.

use std::io::Read;

use flate2::read::GzEncoder;
use oci_spec::image::{Arch, Config, History, ImageConfiguration, Os, RootFs};

use super::archive::synthesize_manifest;
use super::digest::HashingReader;
use super::media::{self, host_architecture};
use super::store::{
    lookup, now, tag_target, BlobSource, ImageRecord, LayerRecord, ManifestRef, NewImage,
};
use super::{Image, ImageError, ImageStore};

/// What a derived image says about itself.
#[derive(Debug, Clone, Default)]
pub struct Derivation {
    /// The run configuration (Cmd, Env, ...) of the new image.
    pub config: Option<Config>,
    /// The history entry's `created_by` (the instruction or the container's command).
    pub created_by: String,
    /// The history entry's and the image's comment.
    pub comment: Option<String>,
    /// The image's author.
    pub author: Option<String>,
    /// Docker's run-configuration fields the OCI config has no place for (`Healthcheck`,
    /// `Shell`, `OnBuild`), set over the parent's; every other such field is inherited.
    pub docker_config: serde_json::Map<String, serde_json::Value>,
}

/// The Docker-only keys of an image's run configuration a derived image inherits.
const DOCKER_CONFIG_KEYS: &[&str] = &["Healthcheck", "Shell", "OnBuild", "ArgsEscaped"];

impl ImageStore {
    /// Stores a new image on top of `parent` (an image reference; `None` for scratch), with
    /// `layer` (an uncompressed tar, or `None` for a configuration-only step) as its top
    /// layer, and tags it `tag` if given.
    pub fn derive(
        &self,
        parent: Option<&str>,
        layer: Option<&mut dyn Read>,
        derivation: Derivation,
        tag: Option<&str>,
    ) -> Result<Image, ImageError> {
        let tag = tag.map(tag_target).transpose()?;
        let (mut layers, mut image_config) = match parent {
            Some(reference) => {
                let state = self.lock();
                let id = lookup(&state, reference)?;
                let stored = &state.images[&id];
                (stored.record.layers.clone(), stored.config.clone())
            }
            None => (Vec::new(), scratch_config()),
        };
        let mut docker_config = match parent {
            Some(reference) => inherited_docker_config(&self.raw_config(reference)?),
            None => serde_json::Map::new(),
        };
        docker_config.extend(derivation.docker_config);
        let mut blobs = Vec::new();
        let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let mut history = History::default();
        history.set_created(Some(created.clone()));
        history.set_created_by(Some(derivation.created_by));
        history.set_comment(derivation.comment.clone());
        history.set_author(derivation.author.clone());
        match layer {
            Some(tar) => {
                let hashing = HashingReader::new(tar);
                let mut compressed = GzEncoder::new(hashing, flate2::Compression::fast());
                let staged = self.blobs.stage(&mut compressed)?;
                let (diff_id, uncompressed_size) = compressed
                    .into_inner()
                    .finish()
                    .map_err(ImageError::io("reading the layer"))?;
                let mut diff_ids = image_config.rootfs().diff_ids().clone();
                diff_ids.push(diff_id.to_string());
                let mut rootfs = image_config.rootfs().clone();
                rootfs.set_diff_ids(diff_ids);
                image_config.set_rootfs(rootfs);
                layers.push(LayerRecord {
                    diff_id,
                    digest: staged.digest.clone(),
                    media_type: media::OCI_LAYER_GZIP.to_owned(),
                    size: staged.size,
                    uncompressed_size,
                });
                blobs.push(BlobSource::Staged(staged));
            }
            None => {
                history.set_empty_layer(Some(true));
            }
        }
        let mut histories = image_config.history().clone().unwrap_or_default();
        histories.push(history);
        image_config.set_history(Some(histories));
        image_config.set_created(Some(created));
        image_config.set_author(derivation.author);
        image_config.set_config(derivation.config);
        let mut config_value =
            serde_json::to_value(&image_config).map_err(ImageError::json("image config"))?;
        if !docker_config.is_empty() {
            if let Some(object) = config_value.as_object_mut() {
                let run = object
                    .entry("config")
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                if let Some(run) = run.as_object_mut() {
                    for (key, value) in docker_config {
                        if value.is_null() {
                            run.remove(&key);
                        } else {
                            run.insert(key, value);
                        }
                    }
                }
            }
        }
        let config_bytes =
            serde_json::to_vec(&config_value).map_err(ImageError::json("image config"))?;
        let config_blob = self.blobs.stage_bytes(&config_bytes)?;
        let manifest_bytes = synthesize_manifest(&config_blob.digest, config_blob.size, &layers)?;
        let manifest_blob = self.blobs.stage_bytes(&manifest_bytes)?;
        let new = NewImage {
            record: ImageRecord {
                id: config_blob.digest.clone(),
                config_size: config_blob.size,
                manifests: vec![ManifestRef {
                    digest: manifest_blob.digest.clone(),
                    media_type: media::OCI_MANIFEST.to_owned(),
                    size: manifest_blob.size,
                }],
                layers,
                added: now(),
            },
            config: image_config,
            blobs: {
                blobs.push(BlobSource::Staged(config_blob));
                blobs.push(BlobSource::Staged(manifest_blob));
                blobs
            },
            tags: tag.into_iter().collect(),
        };
        let mut images = self.commit(vec![new], &mut |_| {})?;
        images
            .pop()
            .ok_or_else(|| ImageError::InvalidArgument("the new image was not stored".into()))
    }
}

/// The Docker-only run-configuration fields of a raw image config.
fn inherited_docker_config(raw: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let value: serde_json::Value = serde_json::from_slice(raw).unwrap_or_default();
    value
        .get("config")
        .and_then(serde_json::Value::as_object)
        .map(|run| {
            run.iter()
                .filter(|(key, _)| DOCKER_CONFIG_KEYS.contains(&key.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The config of an image with no parent: this machine's platform, no layers yet.
fn scratch_config() -> ImageConfiguration {
    let mut image = ImageConfiguration::default();
    image.set_architecture(Arch::from(host_architecture()));
    image.set_os(Os::Linux);
    let mut rootfs = RootFs::default();
    rootfs.set_diff_ids(Vec::new());
    image.set_rootfs(rootfs);
    image.set_history(Some(Vec::new()));
    image
}

#[cfg(test)]
mod tests {
    use super::super::digest::Digest;
    use super::super::test_utils::{layer, open_store};
    use super::*;
    use oci_spec::image::ConfigBuilder;

    #[test]
    fn derive_appends_a_layer_and_a_history_entry_to_the_parent() {
        let (_dir, store) = open_store();
        let base = store
            .derive(
                None,
                Some(&mut &layer(&[("bin/sh", "shell")])[..]),
                Derivation {
                    created_by: "base".into(),
                    ..Default::default()
                },
                Some("base"),
            )
            .unwrap();
        let diff = layer(&[("app/run", "go")]);
        let config = ConfigBuilder::default()
            .cmd(vec!["/app/run".to_owned()])
            .build()
            .unwrap();

        let child = store
            .derive(
                Some("base"),
                Some(&mut &diff[..]),
                Derivation {
                    config: Some(config),
                    created_by: "COPY run /app/run".into(),
                    comment: Some("built".into()),
                    author: None,
                    docker_config: [(
                        "Healthcheck".to_owned(),
                        serde_json::json!({ "Test": ["CMD", "true"] }),
                    )]
                    .into_iter()
                    .collect(),
                },
                Some("child:v1"),
            )
            .unwrap();

        assert_eq!(child.repo_tags, ["child:v1"]);
        assert_eq!(child.layers.len(), 2);
        assert_eq!(child.layers[0], base.layers[0]);
        assert_eq!(child.layers[1].diff_id, Digest::of(&diff).to_string());
        assert_eq!(child.layers[1].media_type, media::OCI_LAYER_GZIP);
        let history = child.config.history().clone().unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(
            history[1].created_by().as_deref(),
            Some("COPY run /app/run")
        );
        let raw = store.raw_config("child:v1").unwrap();
        assert_eq!(Digest::of(&raw).to_string(), child.id);
    }

    #[test]
    fn derive_without_a_layer_marks_the_history_entry_empty() {
        let (_dir, store) = open_store();
        store
            .derive(
                None,
                Some(&mut &layer(&[("f", "x")])[..]),
                Derivation::default(),
                Some("base"),
            )
            .unwrap();

        let child = store
            .derive(
                Some("base"),
                None,
                Derivation {
                    created_by: "ENV A=1".into(),
                    ..Default::default()
                },
                None,
            )
            .unwrap();

        assert_eq!(child.layers.len(), 1);
        let history = child.config.history().clone().unwrap();
        assert_eq!(history.last().unwrap().empty_layer(), Some(true));
        assert!(child.repo_tags.is_empty());
    }

    #[test]
    fn derive_from_an_unknown_parent_is_not_found_and_stores_nothing() {
        let (_dir, store) = open_store();

        let err = store
            .derive(Some("missing"), None, Derivation::default(), None)
            .unwrap_err();

        assert_eq!(err.kind(), crate::ErrorKind::NotFound);
        assert!(store.list().unwrap().is_empty());
    }
}
