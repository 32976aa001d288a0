//! `docker import`: a rootfs tarball (plain, gzip or zstd) becomes a one-layer image.
//!
//! The tarball is stored as it came (compressed stays compressed; the guest unpacks all
//! three), after a pass that checks it is a tar and computes its diff ID.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use oci_spec::image::{Arch, Config, History, ImageConfiguration, Os, RootFs};

use super::archive::synthesize_manifest;
use super::digest::{Digest, HashingReader};
use super::media::{self, host_architecture, Compression};
use super::store::{now, tag_target, BlobSource, ImageRecord, LayerRecord, ManifestRef, NewImage};
use super::{Image, ImageError, ImageStore};

impl ImageStore {
    /// `docker import`: stores `rootfs` as the single layer of a new image for this
    /// machine's architecture, with `config` (Cmd, Env, ...) as its run configuration and
    /// `reference` (`repo[:tag]`) as its tag.
    pub fn import(
        &self,
        mut rootfs: impl Read,
        reference: Option<&str>,
        config: Option<Config>,
    ) -> Result<Image, ImageError> {
        let tag = reference.map(tag_target).transpose()?;
        let layer_blob = self.blobs.stage(&mut rootfs)?;
        let (diff_id, uncompressed_size, compression) = inspect_rootfs(layer_blob.path())?;
        let layer = LayerRecord {
            diff_id: diff_id.clone(),
            digest: layer_blob.digest.clone(),
            media_type: compression.oci_layer_media_type().to_owned(),
            size: layer_blob.size,
            uncompressed_size,
        };
        let image_config = import_config(&diff_id, config);
        let config_bytes =
            serde_json::to_vec(&image_config).map_err(ImageError::json("image config"))?;
        let config_blob = self.blobs.stage_bytes(&config_bytes)?;
        let manifest_bytes = synthesize_manifest(
            &config_blob.digest,
            config_blob.size,
            std::slice::from_ref(&layer),
        )?;
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
                layers: vec![layer],
                added: now(),
            },
            config: image_config,
            blobs: vec![
                BlobSource::Staged(layer_blob),
                BlobSource::Staged(config_blob),
                BlobSource::Staged(manifest_blob),
            ],
            tags: tag.into_iter().collect(),
        };
        let mut images = self.commit(vec![new], &mut |_| {})?;
        images
            .pop()
            .ok_or_else(|| ImageError::InvalidArgument("import stored no image".into()))
    }
}

/// The config of an imported image: created now, this machine's platform, one layer.
fn import_config(diff_id: &Digest, config: Option<Config>) -> ImageConfiguration {
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let mut rootfs = RootFs::default();
    rootfs.set_diff_ids(vec![diff_id.to_string()]);
    let mut history = History::default();
    history.set_created(Some(created.clone()));
    let mut image = ImageConfiguration::default();
    image.set_created(Some(created));
    image.set_architecture(Arch::from(host_architecture()));
    image.set_os(Os::Linux);
    image.set_config(config);
    image.set_rootfs(rootfs);
    image.set_history(Some(vec![history]));
    image
}

/// Checks that a staged rootfs is a tar (after decompression) and returns its diff ID,
/// uncompressed size and compression.
fn inspect_rootfs(path: &Path) -> Result<(Digest, u64, Compression), ImageError> {
    let file = File::open(path).map_err(ImageError::io("opening the staged rootfs"))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let prefix = reader
        .fill_buf()
        .map_err(ImageError::io("reading the staged rootfs"))?;
    let compression = Compression::detect(prefix).map_err(|unsupported| {
        ImageError::InvalidArchive(format!(
            "the rootfs is compressed with {}; Berth imports plain, gzip and zstd tarballs",
            unsupported.0
        ))
    })?;
    let not_tar = |e: std::io::Error| {
        ImageError::InvalidArchive(format!("the rootfs is not a readable tar archive: {e}"))
    };
    let decoder = compression.decoder(reader).map_err(not_tar)?;
    let mut hashing = HashingReader::new(decoder);
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for entry in archive.entries().map_err(not_tar)? {
            entry.map_err(not_tar)?;
        }
    }
    let (diff_id, size) = hashing.finish().map_err(not_tar)?;
    Ok((diff_id, size, compression))
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{gzip, layer, open_store};
    use super::*;
    use crate::ErrorKind;
    use oci_spec::image::ConfigBuilder;

    #[test]
    fn import_gzip_rootfs_becomes_a_one_layer_image() {
        let (_dir, store) = open_store();
        let rootfs = layer(&[("bin/sh", "shell")]);
        let config = ConfigBuilder::default()
            .cmd(vec!["sh".to_owned()])
            .env(vec!["A=1".to_owned()])
            .build()
            .unwrap();
        let image = store
            .import(&gzip(&rootfs)[..], Some("imported"), Some(config))
            .unwrap();
        assert_eq!(image.repo_tags, ["imported:latest"]);
        assert_eq!(image.layers.len(), 1);
        assert_eq!(image.layers[0].diff_id, Digest::of(&rootfs).to_string());
        assert_eq!(image.layers[0].media_type, media::OCI_LAYER_GZIP);
        assert_eq!(image.size, rootfs.len() as u64);
        assert_eq!(
            image
                .config
                .config()
                .as_ref()
                .unwrap()
                .cmd()
                .as_ref()
                .unwrap(),
            &["sh"]
        );
        assert_eq!(image.config.architecture().to_string(), host_architecture());
        let raw = store.raw_config("imported").unwrap();
        assert_eq!(Digest::of(&raw).to_string(), image.id);
    }

    #[test]
    fn import_of_non_tar_is_rejected_and_stores_nothing() {
        let (dir, store) = open_store();
        let err = store
            .import(
                &b"definitely not a tar archive, far too short"[..],
                Some("x"),
                None,
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn import_with_digest_reference_is_refused_before_reading() {
        let (_dir, store) = open_store();
        let digest = Digest::of(b"x");
        let err = store
            .import(&[][..], Some(&format!("x@{digest}")), None)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
}
