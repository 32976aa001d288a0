//! The OCI distribution client behind `docker pull` and `docker push`.
//!
//! It speaks the distribution protocol (`/v2/` ping, manifests, blobs, uploads) to real
//! registries, authenticates as dockerd does (the `WWW-Authenticate` Bearer token flow, with
//! basic credentials when the client gave some and anonymously otherwise, or plain Basic), and
//! builds on the image store's verified primitives: every blob goes through
//! [`ImageStore::ingest_blob`], which checks its digest and size, and every manifest is checked
//! against the digest it was fetched by (the reference's, and `Docker-Content-Digest`).
//!
//! Registries on loopback (`127.0.0.0/8`, `::1`, `localhost`) are spoken to over plain HTTP,
//! like dockerd's default insecure registries; every other one over HTTPS (rustls with the
//! webpki roots). Progress is reported as the lines of Docker's JSON progress stream, with the
//! same wording and 12-hex layer IDs, so the docker CLI draws its usual progress bars.
//!
//! Push sends an image's layers as stored when they are compressed. Layers stored
//! uncompressed (`docker load` and `import` keep tars as they came) are gzip-compressed on the
//! way out, like dockerd does, and the pushed manifest names the compressed blobs; the config,
//! and so the image ID, stays the same, and pulling the pushed reference back gives the same
//! image ID and manifest digest.
//!
//! The API is synchronous (blocking HTTP); async callers use `spawn_blocking`. Error messages
//! are dockerd's one-line forms, cause included, because the API shows only the top message.

mod client;
mod wire;

use std::fmt;

use base64::Engine as _;
use serde::Deserialize;
use ureq::http::StatusCode;

use super::digest::short_id;
use super::reference::Reference;
use super::{parse_digest, Image, ImageError, ImageStore};
use crate::ErrorKind;
use client::Client;

/// Credentials for one registry, as the `X-Registry-Auth` header carries them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// The user name (`docker login -u`).
    pub username: String,
    /// The password or personal access token.
    pub password: String,
    /// An OAuth refresh token a credential helper gave instead of a password.
    pub identity_token: String,
    /// The registry the credentials are for, as the client named it (informational).
    pub server_address: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets never reach a log line.
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("identity_token", &redacted(&self.identity_token))
            .field("server_address", &self.server_address)
            .finish()
    }
}

fn redacted(secret: &str) -> &'static str {
    match secret.is_empty() {
        true => "",
        false => "<redacted>",
    }
}

/// The JSON inside `X-Registry-Auth` (Docker's `AuthConfig`).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AuthConfig {
    username: String,
    password: String,
    /// `base64(username:password)`, what `~/.docker/config.json` stores.
    auth: String,
    serveraddress: String,
    identitytoken: String,
}

impl RegistryAuth {
    /// Decodes the `X-Registry-Auth` header: base64 (URL-safe as the CLI sends it, or
    /// standard; padding optional) of the JSON `{"username", "password", "serveraddress",
    /// "identitytoken"}` (or the legacy `auth` field). No header, or one with no credentials
    /// (the CLI sends `{}` when not logged in), is `None`.
    pub fn from_header(value: &str) -> Result<Option<Self>, ImageError> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(None);
        }
        let invalid = |why: String| {
            ImageError::InvalidArgument(format!("invalid X-Registry-Auth header: {why}"))
        };
        let json = decode_base64(value).ok_or_else(|| invalid("not base64".into()))?;
        let config: AuthConfig =
            serde_json::from_slice(&json).map_err(|e| invalid(e.to_string()))?;
        let (mut username, mut password) = (config.username, config.password);
        if username.is_empty() && !config.auth.is_empty() {
            let pair = decode_base64(&config.auth)
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| invalid("the auth field is not base64 of user:password".into()))?;
            let (user, pass) = pair
                .split_once(':')
                .ok_or_else(|| invalid("the auth field is not user:password".into()))?;
            (username, password) = (user.to_owned(), pass.to_owned());
        }
        if username.is_empty() && password.is_empty() && config.identitytoken.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            username,
            password,
            identity_token: config.identitytoken,
            server_address: config.serveraddress,
        }))
    }

    fn has_password(&self) -> bool {
        !self.username.is_empty() || !self.password.is_empty()
    }

    fn basic_header(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// Base64 in either alphabet, with or without padding.
fn decode_base64(value: &str) -> Option<Vec<u8>> {
    use base64::alphabet;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [alphabet::URL_SAFE, alphabet::STANDARD]
        .iter()
        .find_map(|alphabet| GeneralPurpose::new(alphabet, config).decode(value).ok())
}

/// One line of Docker's JSON progress stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A status, for a layer (`id` is its 12-hex short ID) or for the whole operation:
    /// `Pulling from library/busybox`, `Pull complete`, `Digest: sha256:...`,
    /// `Status: Downloaded newer image for busybox:latest`.
    Status {
        /// The layer (or tag) the line is about; `None` for the operation as a whole.
        id: Option<String>,
        /// The text.
        status: String,
    },
    /// A transfer in flight (`Downloading`, `Pushing`), for the CLI's progress bars.
    Bytes {
        /// The layer's short ID.
        id: String,
        /// `Downloading` or `Pushing`.
        status: String,
        /// Bytes moved so far.
        current: u64,
        /// Bytes in all.
        total: u64,
    },
}

impl Progress {
    /// The JSON object the Docker API streams for this line:
    /// `{"status", "id", "progressDetail": {"current", "total"}}`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Status { id: None, status } => serde_json::json!({ "status": status }),
            Self::Status {
                id: Some(id),
                status,
            } => serde_json::json!({ "status": status, "id": id, "progressDetail": {} }),
            Self::Bytes {
                id,
                status,
                current,
                total,
            } => serde_json::json!({
                "status": status,
                "id": id,
                "progressDetail": { "current": current, "total": total },
            }),
        }
    }

    fn status(status: impl Into<String>) -> Self {
        Self::Status {
            id: None,
            status: status.into(),
        }
    }

    fn layer(id: &str, status: impl Into<String>) -> Self {
        Self::Status {
            id: Some(id.to_owned()),
            status: status.into(),
        }
    }
}

/// Why talking to a registry failed; messages in dockerd's words.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The tag or digest is not in the repository.
    #[error("manifest for {reference} not found: {cause}")]
    ManifestUnknown {
        /// The reference, familiar form (`127.0.0.1:5000/x:latest`).
        reference: String,
        /// The registry's error (`manifest unknown: manifest unknown`).
        cause: String,
    },
    /// The repository does not exist.
    #[error("repository {name} not found: {cause}")]
    RepositoryUnknown {
        /// The repository, familiar form.
        name: String,
        /// The registry's error.
        cause: String,
    },
    /// The registry refused a pull: the repository is private or does not exist.
    #[error("pull access denied for {name}, repository does not exist or may require 'docker login': {cause}")]
    PullDenied {
        /// The repository, familiar form.
        name: String,
        /// The registry's error (`denied: requested access to the resource is denied`).
        cause: String,
    },
    /// The registry (or its token server) did not accept the credentials, or wants some.
    #[error("{}", unauthorized_message(.registry, .cause, *.credentials))]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The registry's error (`unauthorized: authentication required`).
        cause: String,
        /// Whether credentials were sent.
        credentials: bool,
    },
    /// Any other error answer.
    #[error("{cause}")]
    Response {
        /// The HTTP status.
        status: u16,
        /// The registry's errors (`blob unknown: blob unknown to registry`), or the status.
        cause: String,
    },
    /// The registry could not be reached (refused, timed out, TLS, DNS).
    #[error("{method} \"{url}\": {reason}")]
    Unreachable {
        /// The request method, as Go prints it (`Get`, `Head`, ...).
        method: &'static str,
        /// The URL, which names the registry.
        url: String,
        /// What failed (`connection refused`).
        reason: String,
    },
    /// The connection broke while a blob was streaming.
    #[error("downloading {digest}: {reason}")]
    Download {
        /// The blob.
        digest: String,
        /// What failed.
        reason: String,
    },
    /// The registry answered something the protocol does not allow.
    #[error("invalid response from registry {registry}: {reason}")]
    Protocol {
        /// The registry.
        registry: String,
        /// What was wrong.
        reason: String,
    },
    /// A manifest type Berth does not pull (schema 1, or something that is no image).
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedManifest(String),
    /// An index without an image for this machine.
    #[error("no matching manifest for {0} in the manifest list entries")]
    NoMatchingPlatform(String),
    /// `docker push name@sha256:...`.
    #[error("cannot push a digest reference")]
    DigestPush,
    /// `docker push repo:tag` for a tag the store does not have.
    #[error("tag does not exist: {0}")]
    TagNotFound(String),
    /// `docker push repo` for a repository the store has no tag of.
    #[error("An image does not exist locally with the tag: {0}")]
    NoTags(String),
}

fn unauthorized_message(registry: &str, cause: &str, credentials: bool) -> String {
    match credentials {
        true => format!("authentication to {registry} failed: {cause}"),
        false => format!("{cause}: {registry} needs credentials (docker login {registry})"),
    }
}

impl RegistryError {
    /// The class of the failure, for the API's status code.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::ManifestUnknown { .. }
            | Self::RepositoryUnknown { .. }
            | Self::PullDenied { .. }
            | Self::NoMatchingPlatform(_)
            | Self::TagNotFound(_)
            | Self::NoTags(_) => ErrorKind::NotFound,
            Self::Unauthorized { .. } | Self::UnsupportedManifest(_) | Self::DigestPush => {
                ErrorKind::InvalidArgument
            }
            Self::Response { status, .. } => match StatusCode::from_u16(*status) {
                Ok(s) if s == StatusCode::NOT_FOUND => ErrorKind::NotFound,
                Ok(s) if s.is_client_error() => ErrorKind::InvalidArgument,
                _ => ErrorKind::Internal,
            },
            Self::Unreachable { .. } | Self::Download { .. } | Self::Protocol { .. } => {
                ErrorKind::Internal
            }
        }
    }
}

impl From<RegistryError> for ImageError {
    fn from(error: RegistryError) -> Self {
        ImageError::Registry(error)
    }
}

/// `docker pull`: fetches `reference` (`busybox`, `127.0.0.1:5000/x:tag`, `name@sha256:...`;
/// default tag `latest`) into the store, picking this machine's image from an index, and
/// points the tag and the repo digest at it. Nothing is reported before the manifest is
/// known, so a caller can still answer a missing image with a plain error.
pub fn pull(
    store: &ImageStore,
    reference: &str,
    auth: Option<&RegistryAuth>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Image, ImageError> {
    let reference = Reference::parse_normalized(reference)?.with_default_tag();
    let mut client = Client::connect(&reference, auth, "pull")?;
    let fetched = client.fetch_image_manifest(&reference)?;
    let tag_or_digest = match reference.digest() {
        Some(digest) => digest.to_string(),
        None => reference.tag().unwrap_or_default().to_owned(),
    };
    progress(Progress::layer(
        &tag_or_digest,
        format!("Pulling from {}", reference.familiar_name()),
    ));
    let previous = store
        .resolve(&reference.store_key().to_string())
        .ok()
        .map(|i| i.id);
    let config_digest = parse_digest(&fetched.manifest.config.digest)?;
    let downloaded = match store.resolve(config_digest.as_str()) {
        Ok(_) => {
            // The image is here (perhaps pulled with other compression): its layers too.
            for layer in &fetched.manifest.layers {
                progress(Progress::layer(short_id(&layer.digest), "Already exists"));
            }
            Vec::new()
        }
        Err(ImageError::NotFound(_)) => client.fetch_blobs(store, &fetched.manifest, progress)?,
        Err(e) => return Err(e),
    };
    let image = store.store_manifest(&fetched.bytes)?;
    for id in &downloaded {
        progress(Progress::layer(id, "Pull complete"));
    }
    if reference.digest().is_none() {
        store.tag(&image.id, &reference.to_string())?;
    }
    let repo_digest = reference.with_digest(fetched.repo_digest.clone());
    store.add_repo_digest(&image.id, &repo_digest.to_string())?;
    progress(Progress::status(format!("Digest: {}", fetched.repo_digest)));
    let outcome = match previous.as_deref() == Some(image.id.as_str()) {
        true => "Image is up to date for",
        false => "Downloaded newer image for",
    };
    progress(Progress::status(format!(
        "Status: {outcome} {}",
        reference.familiar()
    )));
    store.resolve(&image.id)
}

/// `docker push`: uploads the image `reference` names (`repo:tag`; a bare `repo` pushes
/// every tag of it) with its layers and config, then its manifest under the tag, and
/// records the repo digest. Returns the manifest digest (of the last tag pushed).
pub fn push(
    store: &ImageStore,
    reference: &str,
    auth: Option<&RegistryAuth>,
    progress: &mut dyn FnMut(Progress),
) -> Result<String, ImageError> {
    let reference = Reference::parse_normalized(reference)?;
    if reference.is_canonical() {
        return Err(RegistryError::DigestPush.into());
    }
    let targets = push_targets(store, &reference)?;
    progress(Progress::status(format!(
        "The push refers to repository [{}]",
        reference.name()
    )));
    let mut client = Client::connect(&reference, auth, "pull,push")?;
    let mut digest = String::new();
    for (tagged, image) in targets {
        digest = client.push_image(store, &tagged, &image, progress)?;
    }
    Ok(digest)
}

/// The tags a push sends and their images, checked before anything is reported.
fn push_targets(
    store: &ImageStore,
    reference: &Reference,
) -> Result<Vec<(Reference, Image)>, ImageError> {
    if reference.tag().is_some() {
        let image = match store.resolve(&reference.to_string()) {
            Ok(image) => image,
            Err(ImageError::NotFound(_)) => {
                return Err(RegistryError::TagNotFound(reference.familiar()).into())
            }
            Err(e) => return Err(e),
        };
        return Ok(vec![(reference.clone(), image)]);
    }
    let mut targets = Vec::new();
    for image in store.list()? {
        for tag in &image.repo_tags {
            let tagged = Reference::parse_normalized(tag)?;
            if tagged.name() == reference.name() {
                targets.push((tagged, image.clone()));
            }
        }
    }
    if targets.is_empty() {
        return Err(RegistryError::NoTags(reference.familiar_name()).into());
    }
    targets.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    #[test]
    fn from_header_url_safe_json_gives_credentials() {
        // `>>?` makes the URL-safe alphabet's `-`/`_` appear in the encoding.
        let json = r#"{"username":"ann","password":">>?","serveraddress":"127.0.0.1:5000"}"#;
        let header = URL_SAFE.encode(json);
        assert!(header.contains('_') || header.contains('-'), "{header}");
        let auth = RegistryAuth::from_header(&header).unwrap().unwrap();
        assert_eq!(auth.username, "ann");
        assert_eq!(auth.password, ">>?");
        assert_eq!(auth.server_address, "127.0.0.1:5000");
        assert_eq!(auth.identity_token, "");
    }

    #[test]
    fn from_header_standard_unpadded_and_identity_token() {
        let json =
            r#"{"identitytoken":"refresh-me","serveraddress":"https://index.docker.io/v1/"}"#;
        let header = STANDARD.encode(json).trim_end_matches('=').to_owned();
        let auth = RegistryAuth::from_header(&header).unwrap().unwrap();
        assert_eq!(auth.identity_token, "refresh-me");
        assert_eq!(auth.username, "");
    }

    #[test]
    fn from_header_legacy_auth_field_splits_user_and_password() {
        let json = format!(r#"{{"auth":"{}"}}"#, STANDARD.encode("bob:pa:ss"));
        let auth = RegistryAuth::from_header(&URL_SAFE.encode(json))
            .unwrap()
            .unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("bob", "pa:ss")
        );
    }

    #[test]
    fn from_header_empty_or_empty_object_is_none() {
        assert_eq!(RegistryAuth::from_header("").unwrap(), None);
        assert_eq!(
            RegistryAuth::from_header(&URL_SAFE.encode("{}")).unwrap(),
            None
        );
    }

    #[test]
    fn from_header_not_base64_json_is_invalid_argument() {
        let error = RegistryAuth::from_header("!!!").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidArgument);
        let error = RegistryAuth::from_header(&URL_SAFE.encode("not json")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("invalid X-Registry-Auth header"),
            "{error}"
        );
    }

    #[test]
    fn registry_auth_debug_hides_secrets() {
        let auth = RegistryAuth {
            username: "ann".into(),
            password: "hunter2".into(),
            identity_token: String::new(),
            server_address: String::new(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }

    #[test]
    fn progress_to_json_has_docker_shape() {
        let bytes = Progress::Bytes {
            id: "0123456789ab".into(),
            status: "Downloading".into(),
            current: 5,
            total: 10,
        };
        assert_eq!(
            bytes.to_json(),
            serde_json::json!({"status": "Downloading", "id": "0123456789ab", "progressDetail": {"current": 5, "total": 10}})
        );
        assert_eq!(
            Progress::status("Digest: x").to_json(),
            serde_json::json!({"status": "Digest: x"})
        );
    }
}
