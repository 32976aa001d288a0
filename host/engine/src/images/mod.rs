//! The host's image store: content-addressed blobs (layers, configs, manifests), one record
//! per image, and the reference table (tags and repo digests), all on disk under one root.
//!
//! It implements what `docker load`, `save`, `import`, `images`, `tag`, `rmi` and
//! `image prune` need, and the primitives a registry client builds pull and push on
//! (verified blob ingest, manifest storage, raw manifest access). Everything is verified by
//! digest; nothing already stored is lost when an operation fails halfway. The API is
//! synchronous (plain file I/O); async callers use `spawn_blocking`.
//!
//! Layout and decisions: `docs/design/images.md`.

mod archive;
mod blobs;
mod derive;
pub mod digest;
mod import;
pub mod media;
pub mod reference;
pub mod registry;
mod store;
#[cfg(test)]
mod test_utils;

use std::io;

pub use derive::Derivation;
pub use digest::{chain_ids, short_id, Digest, DigestError};
pub use media::Compression;
pub use reference::{parse_any, ImageRef, Reference, ReferenceError};
pub use store::ImageStore;

use crate::ErrorKind;

/// An image as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The image ID, `sha256:<hex>` of the config JSON (Docker's image ID).
    pub id: String,
    /// Tags in the familiar form `docker images` shows, e.g. `busybox:latest`; sorted.
    pub repo_tags: Vec<String>,
    /// `name@sha256:<manifest digest>` references known from pull and push; sorted.
    pub repo_digests: Vec<String>,
    /// The parsed config (Docker's extra fields are dropped; [`ImageStore::raw_config`] has
    /// them all).
    pub config: oci_spec::image::ImageConfiguration,
    /// The digest of the config blob (equal to `id`).
    pub config_digest: String,
    /// The digest of the manifest layers and config are described by (ours for loaded and
    /// imported images, the registry's for pulled ones).
    pub manifest_digest: String,
    /// When the image was created, RFC 3339, from the config.
    pub created: Option<String>,
    /// The sum of the uncompressed layer sizes, as `docker images` shows.
    pub size: u64,
    /// The layers, bottom-most first.
    pub layers: Vec<ImageLayer>,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// OCI ChainID: the identity of this layer stacked on the ones below it; the guest keys
    /// unpacked layers by it.
    pub chain_id: String,
    /// The digest of the stored blob (what [`ImageStore::blob_path`] takes).
    pub blob_digest: String,
    /// The blob's media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
    /// The stored blob's size in bytes.
    pub size: u64,
    /// The size of the uncompressed tar in bytes.
    pub uncompressed_size: u64,
}

/// One step of `docker rmi` / `image prune`, in Docker's order and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveEvent {
    /// A reference was removed, in familiar form (`busybox:latest`).
    Untagged(String),
    /// An image (its ID) or a layer no remaining image uses (its ChainID) was deleted, like
    /// Docker's `Deleted:` lines. The guest may drop unpacked layers named here.
    Deleted(String),
}

/// A container that uses an image, as the caller of [`ImageStore::remove`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUser {
    /// The container's ID (abbreviated in messages).
    pub container_id: String,
    /// Whether it runs: a running container blocks removal even with force.
    pub running: bool,
}

/// A manifest as stored, for registry push and `docker manifest`-like inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawManifest {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The manifest's media type (OCI or Docker schema 2).
    pub media_type: String,
    /// The exact bytes, whose digest is `digest`.
    pub bytes: Vec<u8>,
}

/// Everything that can go wrong in the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No image matches; the reference in its familiar form (Docker's exact message).
    #[error("No such image: {0}")]
    NotFound(String),
    /// A blob the operation needs is not in the store.
    #[error("no such blob: {0}")]
    BlobNotFound(String),
    /// A reference that does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// A string that should be a digest is not one.
    #[error("invalid digest {value:?}")]
    Digest {
        /// The offending string.
        value: String,
        /// Why it is not a digest.
        #[source]
        source: DigestError,
    },
    /// An ID prefix matches more than one image.
    #[error("multiple IDs found with provided prefix: {0}")]
    AmbiguousId(String),
    /// The request conflicts with the store's state (Docker's `conflict: ...` messages).
    #[error("{0}")]
    Conflict(String),
    /// A request that is well-formed but not acceptable, e.g. tagging with a digest.
    #[error("{0}")]
    InvalidArgument(String),
    /// An archive, manifest or rootfs that is not what it claims to be.
    #[error("invalid archive: {0}")]
    InvalidArchive(String),
    /// Content whose digest is not the one it was referenced by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked (a path in an archive, a blob, a layer).
        what: String,
        /// The digest it was referenced by.
        expected: String,
        /// The digest of the bytes that arrived.
        actual: String,
    },
    /// Content whose size is not the one its descriptor states.
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// What was checked.
        what: String,
        /// The size in the descriptor.
        expected: u64,
        /// The size that arrived.
        actual: u64,
    },
    /// A JSON document (config, manifest, index) that does not parse.
    #[error("invalid {what}")]
    InvalidJson {
        /// Which document.
        what: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Reading the caller's input (archive or rootfs stream) failed: truncated, corrupt
    /// compression, or the client went away.
    #[error("reading the input")]
    ReadInput(#[source] io::Error),
    /// Writing the caller's output stream failed.
    #[error("writing the output")]
    WriteOutput(#[source] io::Error),
    /// Another process holds the store's lock.
    #[error("image store {0} is in use by another process")]
    Locked(String),
    /// A file operation in the store failed.
    #[error("{context}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A record the store wrote itself does not parse.
    #[error("corrupt image store file {path}")]
    Corrupt {
        /// The file.
        path: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// Talking to a registry (pull, push) failed.
    #[error(transparent)]
    Registry(registry::RegistryError),
}

impl ImageError {
    /// The class of the failure, for the API's status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotFound(_) | Self::BlobNotFound(_) => ErrorKind::NotFound,
            Self::Conflict(_) => ErrorKind::Conflict,
            Self::Reference(_)
            | Self::Digest { .. }
            | Self::AmbiguousId(_)
            | Self::InvalidArgument(_)
            | Self::InvalidArchive(_)
            | Self::DigestMismatch { .. }
            | Self::SizeMismatch { .. }
            | Self::InvalidJson { .. }
            | Self::ReadInput(_) => ErrorKind::InvalidArgument,
            Self::WriteOutput(_) | Self::Locked(_) | Self::Io { .. } | Self::Corrupt { .. } => {
                ErrorKind::Internal
            }
            Self::Registry(e) => e.kind(),
        }
    }

    /// A mapper from an I/O error to [`ImageError::Io`] with `context`.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }

    /// A mapper from a JSON error to [`ImageError::InvalidJson`] about `what`.
    pub(crate) fn json(what: impl Into<String>) -> impl FnOnce(serde_json::Error) -> ImageError {
        let what = what.into();
        move |source| ImageError::InvalidJson { what, source }
    }
}

/// Parses a digest given by a caller or found in a document.
pub(crate) fn parse_digest(value: &str) -> Result<Digest, ImageError> {
    Digest::parse(value).map_err(|source| ImageError::Digest {
        value: value.to_owned(),
        source,
    })
}
