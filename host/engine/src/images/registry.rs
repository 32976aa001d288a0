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

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use ureq::http::{self, header, StatusCode};

use super::digest::{short_id, Digest};
use super::media::{self, host_architecture, Compression, Descriptor, Manifest};
use super::reference::{Reference, DEFAULT_DOMAIN, DEFAULT_TAG};
use super::{parse_digest, Image, ImageError, ImageStore};
use crate::ErrorKind;

/// Where Docker Hub's registry API lives (`docker.io` is only the name in references).
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// dockerd's limit on a manifest or index body.
const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// The largest image config a pull accepts (the store reads configs up to this size).
const MAX_CONFIG_SIZE: u64 = 32 << 20;
/// The largest token-server answer read.
const MAX_TOKEN_RESPONSE_SIZE: u64 = 1 << 20;
/// The most of an error body read to find the registry's error codes.
const MAX_ERROR_BODY_SIZE: u64 = 64 << 10;
/// How often a transfer reports its byte counts (the docker CLI redraws at this rate too).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Connecting to a registry (or its token server) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A read or write on an open connection that makes no progress for this long fails.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Docker schema 2 gzip layer.
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Docker schema 1 manifests, which Berth does not pull (dockerd dropped them too).
const DOCKER_SCHEMA1_MANIFESTS: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];
const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

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

/// A registry's address and the scheme to use with it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// The registry as references name it (`docker.io`, `127.0.0.1:5000`).
    registry: String,
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
    /// Whether it is on this machine (plain HTTP, no proxy).
    loopback: bool,
}

impl Endpoint {
    fn for_domain(domain: &str) -> Self {
        let loopback = is_loopback(domain);
        let host = match domain {
            DEFAULT_DOMAIN | "index.docker.io" => DOCKER_HUB_REGISTRY,
            other => other,
        };
        let scheme = if loopback { "http" } else { "https" };
        Self {
            registry: domain.to_owned(),
            base: format!("{scheme}://{host}"),
            loopback,
        }
    }
}

/// Whether a registry domain (`host[:port]`) is `localhost` or a loopback address: dockerd
/// treats `127.0.0.0/8` as insecure (plain HTTP) by default.
fn is_loopback(domain: &str) -> bool {
    let host = match domain.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => domain.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    /// The scheme, lowercase (`bearer`, `basic`).
    scheme: String,
    /// The parameters, names lowercase (`realm`, `service`, `scope`, `error`).
    params: BTreeMap<String, String>,
}

/// Parses `WWW-Authenticate` values: `Bearer realm="...",service="...",scope="..."`, several
/// challenges in one value or across values, quoted strings with `\` escapes.
fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut challenges: Vec<Challenge> = Vec::new();
    for value in values {
        let mut rest = value;
        loop {
            rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
            if rest.is_empty() {
                break;
            }
            let end = rest
                .find(|c: char| c == ',' || c == '=' || c.is_whitespace())
                .unwrap_or(rest.len());
            let token = &rest[..end];
            rest = &rest[end..];
            let after = rest.trim_start();
            if let (Some(value_text), Some(current)) =
                (after.strip_prefix('='), challenges.last_mut())
            {
                let (param, remainder) = parse_param_value(value_text.trim_start());
                current.params.insert(token.to_ascii_lowercase(), param);
                rest = remainder;
            } else if let Some(value_text) = after.strip_prefix('=') {
                // A parameter before any scheme: skip it.
                let (_, remainder) = parse_param_value(value_text.trim_start());
                rest = remainder;
            } else {
                challenges.push(Challenge {
                    scheme: token.to_ascii_lowercase(),
                    params: BTreeMap::new(),
                });
            }
        }
    }
    challenges
}

/// A parameter value (quoted string or token) and what follows it.
fn parse_param_value(text: &str) -> (String, &str) {
    let Some(quoted) = text.strip_prefix('"') else {
        let end = text
            .find(|c: char| c == ',' || c.is_whitespace())
            .unwrap_or(text.len());
        return (text[..end].to_owned(), &text[end..]);
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return (value, &quoted[i + 1..]),
            other => value.push(other),
        }
    }
    (value, "")
}

/// Percent-encodes a query component (everything but RFC 3986's unreserved characters).
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// Joins query parameters, each escaped.
fn query_string(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Appends `query` to a URL that may already have one.
fn with_query(url: &str, query: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

/// The `Accept` list for manifests, preferred first.
fn manifest_accept() -> String {
    [
        media::OCI_INDEX,
        media::DOCKER_MANIFEST_LIST,
        media::OCI_MANIFEST,
        media::DOCKER_MANIFEST,
    ]
    .join(", ")
}

/// What a fetched manifest document is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ManifestKind {
    /// An image manifest, with its media type.
    Image(String),
    /// An index or manifest list.
    Index,
}

/// The kind of a manifest document, from its own `mediaType` (authoritative when present),
/// else the `Content-Type` the registry sent, else its shape.
fn manifest_kind(content_type: Option<&str>, bytes: &[u8]) -> Result<ManifestKind, ImageError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        config: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(ImageError::json("manifest"))?;
    let declared = probe.media_type.filter(|m| !m.is_empty()).or_else(|| {
        content_type
            .map(|c| c.split(';').next().unwrap_or_default().trim().to_owned())
            .filter(|c| {
                media::is_manifest(c)
                    || media::is_index(c)
                    || DOCKER_SCHEMA1_MANIFESTS.contains(&c.as_str())
            })
    });
    let media_type = match declared {
        Some(m) => m,
        None if probe.schema_version == Some(1) => DOCKER_SCHEMA1_MANIFESTS[1].to_owned(),
        None if probe.manifests.is_some() => media::OCI_INDEX.to_owned(),
        None if probe.config.is_some() => media::OCI_MANIFEST.to_owned(),
        None => return Err(RegistryError::UnsupportedManifest(String::new()).into()),
    };
    if media::is_index(&media_type) {
        Ok(ManifestKind::Index)
    } else if media::is_manifest(&media_type) {
        Ok(ManifestKind::Image(media_type))
    } else {
        Err(RegistryError::UnsupportedManifest(media_type).into())
    }
}

/// The entry of an index for `os`/`architecture` (dockerd's platform matcher, minus
/// variants except arm64's `v8`, which is the only one amd64 and arm64 hosts meet).
fn select_platform<'a>(
    manifests: &'a [Descriptor],
    os: &str,
    architecture: &str,
) -> Option<&'a Descriptor> {
    let candidates = manifests.iter().filter(|d| {
        (d.media_type.is_empty() || media::is_manifest(&d.media_type))
            && d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
    });
    let mut first = None;
    for candidate in candidates {
        let variant = candidate
            .platform
            .as_ref()
            .and_then(|p| p.variant.as_deref());
        if variant.is_none() || (architecture == "arm64" && variant == Some("v8")) {
            return Some(candidate);
        }
        first.get_or_insert(candidate);
    }
    first
}

/// One `{"code", "message"}` of a distribution error answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl ErrorEntry {
    fn new(code: &str, message: &str) -> Self {
        Self {
            code: code.to_owned(),
            message: message.to_owned(),
        }
    }
}

impl fmt::Display for ErrorEntry {
    /// As Docker's `errcode.Error` prints: `manifest unknown: manifest unknown`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.code.to_ascii_lowercase().replace('_', " ");
        match (code.is_empty(), self.message.is_empty()) {
            (true, _) => f.write_str(&self.message),
            (false, true) => f.write_str(&code),
            (false, false) => write!(f, "{code}: {}", self.message),
        }
    }
}

/// An error answer, parsed: its status and the registry's error codes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    status: u16,
    errors: Vec<ErrorEntry>,
}

impl Failure {
    /// Reads an error answer the way Docker's distribution client does: the JSON `errors`
    /// (or a token server's `details`), a Bearer challenge's `error` for 401s, else the status.
    fn read(response: &mut http::Response<ureq::Body>) -> Self {
        let status = response.status();
        let challenges = challenges_of(response);
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_ERROR_BODY_SIZE)
            .read_to_vec()
            .unwrap_or_default();
        Self::from_parts(status, &challenges, &body)
    }

    fn from_parts(status: StatusCode, challenges: &[Challenge], body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Body {
            #[serde(default)]
            errors: Vec<ErrorEntry>,
            #[serde(default)]
            details: String,
        }
        let mut errors = Vec::new();
        if status == StatusCode::UNAUTHORIZED {
            let bearer = challenges.iter().find(|c| c.scheme == "bearer");
            if let Some(params) = bearer.map(|c| &c.params) {
                let code = match params.get("error").map(String::as_str) {
                    Some("invalid_token") => Some(("UNAUTHORIZED", "authentication required")),
                    Some("insufficient_scope") => {
                        Some(("DENIED", "requested access to the resource is denied"))
                    }
                    _ => None,
                };
                if let Some((code, default_message)) = code {
                    let message = params
                        .get("error_description")
                        .map_or(default_message, String::as_str);
                    errors.push(ErrorEntry::new(code, message));
                }
            }
        }
        match serde_json::from_slice::<Body>(body) {
            Ok(parsed) if !parsed.errors.is_empty() => errors.extend(parsed.errors),
            Ok(parsed) if !parsed.details.is_empty() && errors.is_empty() => {
                errors.push(ErrorEntry::new("UNAUTHORIZED", &parsed.details));
            }
            _ if errors.is_empty() && status == StatusCode::UNAUTHORIZED => {
                errors.push(ErrorEntry::new("UNAUTHORIZED", "authentication required"));
            }
            _ => {}
        }
        Self {
            status: status.as_u16(),
            errors,
        }
    }

    fn has_code(&self, code: &str) -> bool {
        self.errors.first().is_some_and(|e| e.code == code)
    }

    /// The errors as Docker prints them, or the status when there are none.
    fn cause(&self) -> String {
        if self.errors.is_empty() {
            let reason = StatusCode::from_u16(self.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or_default();
            return format!("received unexpected HTTP status: {} {reason}", self.status);
        }
        let parts: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        parts.join("; ")
    }

    /// The generic error for this answer.
    fn into_error(self, endpoint: &Endpoint, credentials: bool) -> RegistryError {
        if self.status == StatusCode::UNAUTHORIZED.as_u16() {
            return RegistryError::Unauthorized {
                registry: endpoint.registry.clone(),
                cause: self.cause(),
                credentials,
            };
        }
        RegistryError::Response {
            status: self.status,
            cause: self.cause(),
        }
    }
}

fn challenges_of(response: &http::Response<ureq::Body>) -> Vec<Challenge> {
    parse_challenges(
        response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

fn header_str<'a>(response: &'a http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Why a request did not get an answer, in a few words.
fn describe(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Io(e) => describe_io(e),
        ureq::Error::HostNotFound => "no such host".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Timeout(_) => "i/o timeout".into(),
        other => other.to_string(),
    }
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::TimedOut => "i/o timeout".into(),
        io::ErrorKind::UnexpectedEof => "unexpected EOF".into(),
        _ => error.to_string(),
    }
}

/// A manifest fetched for a pull.
#[derive(Debug)]
struct FetchedManifest {
    /// The digest the reference resolved to: the index's when there was one (what dockerd
    /// records as the repo digest).
    repo_digest: Digest,
    /// The image manifest, byte for byte.
    bytes: Vec<u8>,
    manifest: Manifest,
}

/// A connection to one repository of one registry, authenticated for one scope.
struct Client<'a> {
    agent: ureq::Agent,
    endpoint: Endpoint,
    /// The repository path (`library/busybox`).
    repository: String,
    /// The token scope (`repository:library/busybox:pull`).
    scope: String,
    credentials: Option<&'a RegistryAuth>,
    /// The `Authorization` header value in use.
    authorization: Option<String>,
}

impl<'a> Client<'a> {
    /// Pings the registry (`GET /v2/`) and authenticates as its challenge asks, for
    /// `actions` (`pull` or `pull,push`) on the reference's repository.
    fn connect(
        reference: &Reference,
        credentials: Option<&'a RegistryAuth>,
        actions: &str,
    ) -> Result<Self, RegistryError> {
        let endpoint = Endpoint::for_domain(reference.domain());
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(USER_AGENT)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(IDLE_TIMEOUT))
            .timeout_per_write(Some(IDLE_TIMEOUT));
        if endpoint.loopback {
            config = config.proxy(None);
        }
        let mut client = Self {
            agent: config.build().new_agent(),
            scope: format!("repository:{}:{actions}", reference.path()),
            repository: reference.path().to_owned(),
            endpoint,
            credentials,
            authorization: None,
        };
        let url = format!("{}/v2/", client.endpoint.base);
        let mut response = client
            .agent
            .get(&url)
            .call()
            .map_err(|e| client.unreachable("Get", &url, &e))?;
        match response.status() {
            s if s.is_success() => Ok(client),
            StatusCode::UNAUTHORIZED => {
                let challenges = challenges_of(&response);
                if !client.authenticate(&challenges)? {
                    return Err(Failure::read(&mut response)
                        .into_error(&client.endpoint, client.sends_credentials()));
                }
                Ok(client)
            }
            _ => Err(Failure::read(&mut response).into_error(&client.endpoint, false)),
        }
    }

    fn sends_credentials(&self) -> bool {
        self.credentials
            .is_some_and(|c| c.has_password() || !c.identity_token.is_empty())
    }

    fn unreachable(&self, method: &'static str, url: &str, error: &ureq::Error) -> RegistryError {
        RegistryError::Unreachable {
            method,
            url: url.to_owned(),
            reason: describe(error),
        }
    }

    /// Answers a challenge: fetches a Bearer token, or arms Basic credentials. Returns
    /// whether the `Authorization` header changed (so a retry can help).
    fn authenticate(&mut self, challenges: &[Challenge]) -> Result<bool, RegistryError> {
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let token = self.fetch_token(bearer)?;
            self.authorization = Some(format!("Bearer {token}"));
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let Some(credentials) = self.credentials.filter(|c| c.has_password()) else {
                return Err(RegistryError::Unauthorized {
                    registry: self.endpoint.registry.clone(),
                    cause: "no basic auth credentials".into(),
                    credentials: false,
                });
            };
            let header = credentials.basic_header();
            let changed = self.authorization.as_deref() != Some(header.as_str());
            self.authorization = Some(header);
            return Ok(changed);
        }
        Ok(false)
    }

    /// The token flow of the distribution spec: `GET realm?service=..&scope=..` with basic
    /// credentials if any (anonymous otherwise), or an OAuth refresh-token `POST` when the
    /// client holds an identity token.
    fn fetch_token(&self, challenge: &Challenge) -> Result<String, RegistryError> {
        let realm = challenge
            .params
            .get("realm")
            .filter(|r| r.starts_with("https://") || r.starts_with("http://"))
            .ok_or_else(|| RegistryError::Protocol {
                registry: self.endpoint.registry.clone(),
                reason: "Bearer challenge without an http(s) realm".into(),
            })?;
        let service = challenge
            .params
            .get("service")
            .map(String::as_str)
            .unwrap_or_default();
        let credentials = self.credentials;
        let (method, result) = match credentials.filter(|c| !c.identity_token.is_empty()) {
            Some(c) => {
                let form = query_string(&[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &c.identity_token),
                    ("service", service),
                    ("scope", &self.scope),
                    ("client_id", "berth"),
                ]);
                let request = self
                    .agent
                    .post(realm.as_str())
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
                ("Post", request.send(form.as_bytes()))
            }
            None => {
                let mut params = vec![("scope", self.scope.as_str())];
                if !service.is_empty() {
                    params.insert(0, ("service", service));
                }
                if let Some(c) = credentials.filter(|c| !c.username.is_empty()) {
                    params.push(("account", c.username.as_str()));
                }
                let url = with_query(realm, &query_string(&params));
                let mut request = self.agent.get(&url);
                if let Some(c) = credentials.filter(|c| c.has_password()) {
                    request = request.header(header::AUTHORIZATION, c.basic_header());
                }
                ("Get", request.call())
            }
        };
        let mut response = result.map_err(|e| self.unreachable(method, realm, &e))?;
        if !response.status().is_success() {
            let failure = Failure::read(&mut response);
            return Err(match failure.status {
                401 | 403 => RegistryError::Unauthorized {
                    registry: self.endpoint.registry.clone(),
                    cause: failure.cause(),
                    credentials: self.sends_credentials(),
                },
                _ => failure.into_error(&self.endpoint, self.sends_credentials()),
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_TOKEN_RESPONSE_SIZE)
            .read_to_vec()
            .map_err(|e| self.unreachable(method, realm, &e))?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Protocol {
                registry: self.endpoint.registry.clone(),
                reason: format!("token server answer: {e}"),
            })?;
        let token = if parsed.token.is_empty() {
            parsed.access_token
        } else {
            parsed.token
        };
        if token.is_empty() {
            return Err(RegistryError::Protocol {
                registry: self.endpoint.registry.clone(),
                reason: "the token server sent no token".into(),
            });
        }
        Ok(token)
    }

    /// Sends a request built by `request` with the current credentials; on a 401 answers
    /// the new challenge once and sends it again (a token can expire mid-push).
    fn execute(
        &mut self,
        method: &'static str,
        url: &str,
        mut request: impl FnMut(
            &ureq::Agent,
            Option<&str>,
        ) -> Result<http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<http::Response<ureq::Body>, RegistryError> {
        let response = request(&self.agent, self.authorization.as_deref())
            .map_err(|e| self.unreachable(method, url, &e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenges = challenges_of(&response);
        let retry = challenges
            .iter()
            .all(|c| c.params.get("error").map(String::as_str) != Some("insufficient_scope"))
            && self.authenticate(&challenges)?;
        if !retry {
            return Ok(response);
        }
        request(&self.agent, self.authorization.as_deref())
            .map_err(|e| self.unreachable(method, url, &e))
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.endpoint.base, self.repository)
    }

    /// Fetches the manifest `reference` names and, for an index, this machine's entry;
    /// verifies both against the digests they were fetched by.
    fn fetch_image_manifest(
        &mut self,
        reference: &Reference,
    ) -> Result<FetchedManifest, ImageError> {
        let target = match (reference.digest(), reference.tag()) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.to_owned(),
            (None, None) => DEFAULT_TAG.to_owned(),
        };
        let (bytes, content_type) = self.fetch_manifest(reference, &target, reference.digest())?;
        let repo_digest = Digest::of(&bytes);
        let media_type = match manifest_kind(content_type.as_deref(), &bytes)? {
            ManifestKind::Image(media_type) => media_type,
            ManifestKind::Index => {
                let index: media::Index =
                    serde_json::from_slice(&bytes).map_err(ImageError::json("manifest list"))?;
                let platform = format!("linux/{}", host_architecture());
                let entry = select_platform(&index.manifests, "linux", host_architecture())
                    .ok_or(RegistryError::NoMatchingPlatform(platform))?;
                let digest = parse_digest(&entry.digest)?;
                let (bytes, content_type) =
                    self.fetch_manifest(reference, digest.as_str(), Some(&digest))?;
                super::store::check_size(
                    bytes.len() as u64,
                    entry.size,
                    &format!("manifest {digest}"),
                )?;
                let ManifestKind::Image(media_type) =
                    manifest_kind(content_type.as_deref(), &bytes)?
                else {
                    return Err(RegistryError::UnsupportedManifest(media::OCI_INDEX.into()).into());
                };
                let manifest = parse_manifest(&bytes, &media_type)?;
                return Ok(FetchedManifest {
                    repo_digest,
                    bytes,
                    manifest,
                });
            }
        };
        let manifest = parse_manifest(&bytes, &media_type)?;
        Ok(FetchedManifest {
            repo_digest,
            bytes,
            manifest,
        })
    }

    /// `GET /v2/<name>/manifests/<target>`, verified against `expected` (a digest
    /// reference) and the registry's `Docker-Content-Digest`. Returns the bytes and the
    /// `Content-Type`.
    fn fetch_manifest(
        &mut self,
        reference: &Reference,
        target: &str,
        expected: Option<&Digest>,
    ) -> Result<(Vec<u8>, Option<String>), ImageError> {
        let url = self.url(&format!("manifests/{target}"));
        let accept = manifest_accept();
        let mut response = self.execute("Get", &url, |agent, auth| {
            with_auth(agent.get(&url), auth)
                .header(header::ACCEPT, &accept)
                .call()
        })?;
        if !response.status().is_success() {
            let failure = Failure::read(&mut response);
            return Err(self.pull_error(reference, failure).into());
        }
        let content_type = header_str(&response, "content-type").map(str::to_owned);
        let header_digest = header_str(&response, "docker-content-digest").map(str::to_owned);
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_MANIFEST_SIZE)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => RegistryError::Protocol {
                    registry: self.endpoint.registry.clone(),
                    reason: format!("manifest {target} is larger than {MAX_MANIFEST_SIZE} bytes"),
                },
                other => self.unreachable("Get", &url, &other),
            })?;
        let actual = Digest::of(&bytes);
        let claimed = match expected {
            Some(digest) => Some(digest.clone()),
            // Only a sha256 claim can be checked; other algorithms are left to the content.
            None => header_digest.and_then(|d| Digest::parse(&d).ok()),
        };
        if let Some(claimed) = claimed.filter(|c| c != &actual) {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest {target}"),
                expected: claimed.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok((bytes, content_type))
    }

    /// A failed manifest fetch in dockerd's words.
    fn pull_error(&self, reference: &Reference, failure: Failure) -> RegistryError {
        let cause = failure.cause();
        if failure.has_code("MANIFEST_UNKNOWN")
            || (failure.errors.is_empty() && failure.status == 404)
        {
            let cause = match failure.errors.is_empty() {
                true => "manifest unknown: manifest unknown".to_owned(),
                false => cause,
            };
            return RegistryError::ManifestUnknown {
                reference: reference.familiar(),
                cause,
            };
        }
        if failure.has_code("NAME_UNKNOWN") {
            return RegistryError::RepositoryUnknown {
                name: reference.familiar_name(),
                cause,
            };
        }
        if failure.has_code("DENIED") {
            return RegistryError::PullDenied {
                name: reference.familiar_name(),
                cause,
            };
        }
        failure.into_error(&self.endpoint, self.sends_credentials())
    }

    /// Downloads the config and every layer the store lacks, reporting each layer as
    /// dockerd does. Returns the short IDs of the layers downloaded.
    fn fetch_blobs(
        &mut self,
        store: &ImageStore,
        manifest: &Manifest,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<String>, ImageError> {
        if manifest.config.size > MAX_CONFIG_SIZE {
            return Err(RegistryError::Protocol {
                registry: self.endpoint.registry.clone(),
                reason: format!("image config of {} bytes", manifest.config.size),
            }
            .into());
        }
        self.fetch_blob(store, &manifest.config, None)?;
        let mut missing = Vec::new();
        for layer in &manifest.layers {
            let id = short_id(&layer.digest).to_owned();
            // Claiming a present blob keeps it from being collected before the manifest
            // that needs it is stored; a blob that vanished meanwhile is downloaded.
            let present = store.has_blob(&layer.digest)
                && store
                    .ingest_blob(&layer.digest, Some(layer.size), io::empty())
                    .is_ok();
            match present {
                true => progress(Progress::layer(&id, "Already exists")),
                false => {
                    progress(Progress::layer(&id, "Pulling fs layer"));
                    missing.push((layer, id));
                }
            }
        }
        let mut downloaded = Vec::with_capacity(missing.len());
        for (layer, id) in missing {
            self.fetch_blob(store, layer, Some((&id, &mut *progress)))?;
            progress(Progress::layer(&id, "Verifying Checksum"));
            progress(Progress::layer(&id, "Download complete"));
            downloaded.push(id);
        }
        Ok(downloaded)
    }

    /// `GET /v2/<name>/blobs/<digest>` into the store, which verifies digest and size.
    fn fetch_blob(
        &mut self,
        store: &ImageStore,
        descriptor: &Descriptor,
        report: Option<(&str, &mut dyn FnMut(Progress))>,
    ) -> Result<(), ImageError> {
        let digest = parse_digest(&descriptor.digest)?;
        if store.has_blob(digest.as_str())
            && store
                .ingest_blob(digest.as_str(), Some(descriptor.size), io::empty())
                .is_ok()
        {
            return Ok(());
        }
        let url = self.url(&format!("blobs/{digest}"));
        let mut response = self.execute("Get", &url, |agent, auth| {
            with_auth(agent.get(&url), auth).call()
        })?;
        if !response.status().is_success() {
            let failure = Failure::read(&mut response);
            return Err(failure
                .into_error(&self.endpoint, self.sends_credentials())
                .into());
        }
        // One byte past the descriptor's size is enough to prove a registry sends too much.
        let body = response
            .into_body()
            .into_reader()
            .take(descriptor.size.saturating_add(1));
        let result = match report {
            Some((id, progress)) => {
                let reader =
                    ProgressReader::new(body, id, "Downloading", descriptor.size, progress);
                store.ingest_blob(digest.as_str(), Some(descriptor.size), reader)
            }
            None => store.ingest_blob(digest.as_str(), Some(descriptor.size), body),
        };
        match result {
            Ok(_) => Ok(()),
            Err(ImageError::ReadInput(e)) => Err(RegistryError::Download {
                digest: digest.to_string(),
                reason: describe_io(&e),
            }
            .into()),
            Err(e) => Err(e),
        }
    }

    /// Pushes one tag: layers (compressing stored tars), config, then the manifest.
    /// Returns the manifest digest.
    fn push_image(
        &mut self,
        store: &ImageStore,
        tagged: &Reference,
        image: &Image,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, ImageError> {
        let raw = store.manifest(&image.id)?;
        let mut manifest = parse_manifest(&raw.bytes, &raw.media_type)?;
        if manifest.layers.len() != image.layers.len() {
            return Err(super::store::layers_mismatch(
                image.layers.len(),
                manifest.layers.len(),
            ));
        }
        let gzip_type = match raw.media_type.as_str() {
            media::DOCKER_MANIFEST => DOCKER_LAYER_GZIP,
            _ => media::OCI_LAYER_GZIP,
        };
        // dockerd reports layers top first.
        for layer in image.layers.iter().rev() {
            progress(Progress::layer(short_id(&layer.diff_id), "Preparing"));
        }
        let mut rewritten = false;
        for (layer, descriptor) in image.layers.iter().zip(manifest.layers.iter_mut()).rev() {
            let id = short_id(&layer.diff_id).to_owned();
            let blob = PushBlob::layer(store, &descriptor.digest)?;
            if blob.digest() != descriptor.digest {
                descriptor.digest = blob.digest().to_owned();
                descriptor.size = blob.size();
                descriptor.media_type = gzip_type.to_owned();
                rewritten = true;
            }
            if self.blob_exists(blob.digest())? {
                progress(Progress::layer(&id, "Layer already exists"));
                continue;
            }
            self.upload_blob(&blob, Some((&id, &mut *progress)))?;
            progress(Progress::layer(&id, "Pushed"));
        }
        let config = PushBlob::stored(store, &manifest.config.digest)?;
        if !self.blob_exists(config.digest())? {
            self.upload_blob(&config, None)?;
        }
        let bytes = match rewritten {
            true => {
                manifest
                    .media_type
                    .get_or_insert_with(|| raw.media_type.clone());
                serde_json::to_vec(&manifest).map_err(ImageError::json("manifest"))?
            }
            false => raw.bytes,
        };
        let tag = tagged.tag().unwrap_or(DEFAULT_TAG);
        let digest = self.put_manifest(tag, &bytes, &raw.media_type)?;
        progress(Progress::status(format!(
            "{tag}: digest: {digest} size: {}",
            bytes.len()
        )));
        store.add_repo_digest(&image.id, &tagged.with_digest(digest.clone()).to_string())?;
        Ok(digest.to_string())
    }

    /// `HEAD /v2/<name>/blobs/<digest>`: whether the registry has the blob.
    fn blob_exists(&mut self, digest: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        let mut response = self.execute("Head", &url, |agent, auth| {
            with_auth(agent.head(&url), auth).call()
        })?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => {
                Err(Failure::read(&mut response)
                    .into_error(&self.endpoint, self.sends_credentials()))
            }
        }
    }

    /// A monolithic upload: `POST /v2/<name>/blobs/uploads/`, then `PUT <location>?digest=`
    /// with the whole blob.
    fn upload_blob(
        &mut self,
        blob: &PushBlob,
        mut report: Option<(&str, &mut dyn FnMut(Progress))>,
    ) -> Result<(), ImageError> {
        let url = self.url("blobs/uploads/");
        let mut response = self.execute("Post", &url, |agent, auth| {
            with_auth(agent.post(&url), auth).send_empty()
        })?;
        if response.status() != StatusCode::ACCEPTED && !response.status().is_success() {
            let failure = Failure::read(&mut response);
            return Err(failure
                .into_error(&self.endpoint, self.sends_credentials())
                .into());
        }
        let location =
            header_str(&response, "location").ok_or_else(|| RegistryError::Protocol {
                registry: self.endpoint.registry.clone(),
                reason: "upload started without a Location".into(),
            })?;
        let upload = with_query(
            &self.resolve_location(location),
            &query_string(&[("digest", blob.digest())]),
        );
        let file = blob.open()?;
        let size = blob.size();
        let mut response = self.execute("Put", &upload, |agent, auth| {
            (&file).seek(SeekFrom::Start(0)).map_err(ureq::Error::Io)?;
            let request = with_auth(agent.put(&upload), auth)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, size);
            match report.as_mut() {
                Some((id, progress)) => {
                    let mut reader =
                        ProgressReader::new(&file, id, "Pushing", size, &mut **progress);
                    request.send(ureq::SendBody::from_reader(&mut reader))
                }
                None => {
                    let mut reader = &file;
                    request.send(ureq::SendBody::from_reader(&mut reader))
                }
            }
        })?;
        if !response.status().is_success() {
            let failure = Failure::read(&mut response);
            return Err(failure
                .into_error(&self.endpoint, self.sends_credentials())
                .into());
        }
        Ok(())
    }

    /// An upload `Location` as an absolute URL (registries may send a path).
    fn resolve_location(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else if location.starts_with('/') {
            format!("{}{location}", self.endpoint.base)
        } else {
            format!("{}/{location}", self.endpoint.base)
        }
    }

    /// `PUT /v2/<name>/manifests/<tag>`; returns the manifest's digest.
    fn put_manifest(
        &mut self,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, ImageError> {
        let url = self.url(&format!("manifests/{tag}"));
        let mut response = self.execute("Put", &url, |agent, auth| {
            with_auth(agent.put(&url), auth)
                .header(header::CONTENT_TYPE, media_type)
                .send(bytes)
        })?;
        if !response.status().is_success() {
            let failure = Failure::read(&mut response);
            return Err(failure
                .into_error(&self.endpoint, self.sends_credentials())
                .into());
        }
        let digest = Digest::of(bytes);
        if let Some(answered) =
            header_str(&response, "docker-content-digest").filter(|d| *d != digest.as_str())
        {
            tracing::warn!(registry = %self.endpoint.registry, ours = %digest, answered, "registry reports another manifest digest");
        }
        Ok(digest)
    }
}

fn with_auth<B>(
    request: ureq::RequestBuilder<B>,
    authorization: Option<&str>,
) -> ureq::RequestBuilder<B> {
    match authorization {
        Some(value) => request.header(header::AUTHORIZATION, value),
        None => request,
    }
}

/// Parses an image manifest and checks what it references can be pulled.
fn parse_manifest(bytes: &[u8], media_type: &str) -> Result<Manifest, ImageError> {
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(ImageError::json("manifest"))?;
    if !media::is_manifest(media_type) {
        return Err(RegistryError::UnsupportedManifest(media_type.to_owned()).into());
    }
    let config_type = manifest.config.media_type.as_str();
    if !config_type.is_empty() && !media::is_image_config(config_type) {
        // An artifact (Helm chart, signature, ...) stored under an image name.
        return Err(RegistryError::UnsupportedManifest(format!(
            "{media_type} with config {config_type}"
        ))
        .into());
    }
    Ok(manifest)
}

/// A blob to push: a stored one, or a gzip copy of a stored uncompressed layer, staged in the
/// store's scratch space for the length of the push.
enum PushBlob {
    Stored {
        path: std::path::PathBuf,
        digest: String,
        size: u64,
    },
    Compressed(super::blobs::StagedBlob),
}

impl PushBlob {
    /// A stored blob as it is (a config, or a compressed layer).
    fn stored(store: &ImageStore, digest: &str) -> Result<Self, ImageError> {
        let path = store.blob_path(digest)?;
        let size = std::fs::metadata(&path)
            .map_err(ImageError::io(format!("inspecting blob {digest}")))?
            .len();
        Ok(Self::Stored {
            path,
            digest: digest.to_owned(),
            size,
        })
    }

    /// The blob to send for the stored layer `digest`: itself when compressed, else a gzip
    /// copy (deterministic: the same tar always gives the same blob, so a second push finds
    /// it already there).
    fn layer(store: &ImageStore, digest: &str) -> Result<Self, ImageError> {
        let stored = Self::stored(store, digest)?;
        let file = stored.open()?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        let prefix = reader
            .fill_buf()
            .map_err(ImageError::io(format!("reading blob {digest}")))?;
        if Compression::detect(prefix) != Ok(Compression::None) {
            return Ok(stored);
        }
        let mut encoder = flate2::bufread::GzEncoder::new(reader, flate2::Compression::default());
        let staged = store.blobs.stage(&mut encoder)?;
        Ok(Self::Compressed(staged))
    }

    fn digest(&self) -> &str {
        match self {
            Self::Stored { digest, .. } => digest,
            Self::Compressed(staged) => staged.digest.as_str(),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Self::Stored { size, .. } => *size,
            Self::Compressed(staged) => staged.size,
        }
    }

    fn path(&self) -> &Path {
        match self {
            Self::Stored { path, .. } => path,
            Self::Compressed(staged) => staged.path(),
        }
    }

    fn open(&self) -> Result<File, ImageError> {
        File::open(self.path()).map_err(ImageError::io(format!("opening blob {}", self.digest())))
    }
}

/// A reader that reports its byte count as [`Progress::Bytes`], at most every
/// [`PROGRESS_INTERVAL`] and once more when the last byte has passed.
struct ProgressReader<'p, R> {
    inner: R,
    id: String,
    status: &'static str,
    current: u64,
    total: u64,
    interval: Duration,
    last: Option<Instant>,
    finished: bool,
    progress: &'p mut dyn FnMut(Progress),
}

impl<'p, R: Read> ProgressReader<'p, R> {
    fn new(
        inner: R,
        id: &str,
        status: &'static str,
        total: u64,
        progress: &'p mut dyn FnMut(Progress),
    ) -> Self {
        Self {
            inner,
            id: id.to_owned(),
            status,
            current: 0,
            total,
            interval: PROGRESS_INTERVAL,
            last: None,
            finished: false,
            progress,
        }
    }

    fn report(&mut self) {
        self.last = Some(Instant::now());
        (self.progress)(Progress::Bytes {
            id: self.id.clone(),
            status: self.status.to_owned(),
            current: self.current,
            total: self.total,
        });
    }
}

impl<R: Read> Read for ProgressReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.current += n as u64;
        let done = (n == 0 && !buf.is_empty()) || self.current >= self.total;
        if done && !self.finished {
            self.finished = true;
            self.report();
        } else if !done && self.last.is_none_or(|t| t.elapsed() >= self.interval) {
            self.report();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};

    fn challenge(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.to_owned(),
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn parse_challenges_bearer_gives_realm_service_scope() {
        let header = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#;
        assert_eq!(
            parse_challenges([header]),
            vec![challenge(
                "bearer",
                &[
                    ("realm", "https://auth.docker.io/token"),
                    ("service", "registry.docker.io"),
                    ("scope", "repository:library/busybox:pull"),
                ]
            )]
        );
    }

    #[test]
    fn parse_challenges_several_in_one_value_with_escapes_and_tokens() {
        let header = r#"Basic realm="Registry \"Realm\"", Bearer realm=https://t.example/token, error="insufficient_scope""#;
        assert_eq!(
            parse_challenges([header]),
            vec![
                challenge("basic", &[("realm", "Registry \"Realm\"")]),
                challenge(
                    "bearer",
                    &[
                        ("realm", "https://t.example/token"),
                        ("error", "insufficient_scope")
                    ]
                ),
            ]
        );
    }

    #[test]
    fn parse_challenges_across_values_and_odd_spacing() {
        let values = ["basic  realm = \"x\"", "BEARER realm=\"y\" ,service=\"z\""];
        assert_eq!(
            parse_challenges(values),
            vec![
                challenge("basic", &[("realm", "x")]),
                challenge("bearer", &[("realm", "y"), ("service", "z")]),
            ]
        );
    }

    #[test]
    fn parse_challenges_garbage_gives_no_params_and_no_panic() {
        // A parameter before any scheme is dropped; an unterminated quote ends the value.
        let parsed = parse_challenges(["=\"a\", x=1 Basic realm=\"unterminated"]);
        assert_eq!(
            parsed,
            vec![challenge("basic", &[("realm", "unterminated")])]
        );
    }

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

    fn descriptor(
        os: &str,
        architecture: &str,
        variant: Option<&str>,
        digest_byte: u8,
    ) -> Descriptor {
        Descriptor {
            media_type: media::OCI_MANIFEST.to_owned(),
            digest: Digest::of(&[digest_byte]).to_string(),
            size: 1,
            urls: None,
            annotations: None,
            platform: Some(media::Platform {
                architecture: architecture.to_owned(),
                os: os.to_owned(),
                variant: variant.map(str::to_owned),
            }),
        }
    }

    #[test]
    fn select_platform_picks_linux_amd64_among_others() {
        let manifests = vec![
            descriptor("linux", "arm64", Some("v8"), 1),
            descriptor("unknown", "unknown", None, 2),
            descriptor("linux", "amd64", None, 3),
            descriptor("windows", "amd64", None, 4),
        ];
        let chosen = select_platform(&manifests, "linux", "amd64").unwrap();
        assert_eq!(chosen.digest, manifests[2].digest);
    }

    #[test]
    fn select_platform_prefers_arm64_v8_and_skips_non_manifests() {
        let mut attestation = descriptor("linux", "arm64", None, 5);
        attestation.media_type = "application/vnd.in-toto+json".into();
        let manifests = vec![
            attestation,
            descriptor("linux", "arm64", Some("v9"), 6),
            descriptor("linux", "arm64", Some("v8"), 7),
        ];
        let chosen = select_platform(&manifests, "linux", "arm64").unwrap();
        assert_eq!(chosen.digest, manifests[2].digest);
    }

    #[test]
    fn select_platform_without_match_is_none() {
        let manifests = vec![descriptor("linux", "s390x", None, 8)];
        assert!(select_platform(&manifests, "linux", "amd64").is_none());
    }

    #[test]
    fn manifest_kind_prefers_the_documents_media_type() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json","manifests":[]}"#;
        assert_eq!(
            manifest_kind(Some("application/json"), index).unwrap(),
            ManifestKind::Index
        );
        let image = br#"{"schemaVersion":2,"config":{"digest":"x","size":1},"layers":[]}"#;
        assert_eq!(
            manifest_kind(
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
                image
            )
            .unwrap(),
            ManifestKind::Image(media::DOCKER_MANIFEST.to_owned())
        );
        assert_eq!(
            manifest_kind(None, image).unwrap(),
            ManifestKind::Image(media::OCI_MANIFEST.to_owned())
        );
        assert_eq!(
            manifest_kind(None, br#"{"schemaVersion":2,"manifests":[]}"#).unwrap(),
            ManifestKind::Index
        );
    }

    #[test]
    fn manifest_kind_schema1_is_unsupported() {
        let error =
            manifest_kind(None, br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#).unwrap_err();
        assert!(
            matches!(error, ImageError::Registry(RegistryError::UnsupportedManifest(ref m)) if m.contains("v1+prettyjws")),
            "{error}"
        );
    }

    #[test]
    fn failure_manifest_unknown_reads_like_dockerd() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"latest"}}]}"#;
        let failure = Failure::from_parts(StatusCode::NOT_FOUND, &[], body);
        assert!(failure.has_code("MANIFEST_UNKNOWN"));
        assert_eq!(failure.cause(), "manifest unknown: manifest unknown");
    }

    #[test]
    fn failure_401_insufficient_scope_is_denied() {
        let challenges = parse_challenges([r#"Bearer realm="r",error="insufficient_scope""#]);
        let failure = Failure::from_parts(StatusCode::UNAUTHORIZED, &challenges, b"");
        assert!(failure.has_code("DENIED"));
        assert_eq!(
            failure.cause(),
            "denied: requested access to the resource is denied"
        );
    }

    #[test]
    fn failure_without_body_names_the_status() {
        let failure = Failure::from_parts(StatusCode::BAD_GATEWAY, &[], b"<html>");
        assert_eq!(
            failure.cause(),
            "received unexpected HTTP status: 502 Bad Gateway"
        );
        let endpoint = Endpoint::for_domain("127.0.0.1:5000");
        assert_eq!(
            failure.into_error(&endpoint, false).kind(),
            ErrorKind::Internal
        );
    }

    #[test]
    fn failure_token_server_details_become_unauthorized() {
        let failure = Failure::from_parts(
            StatusCode::UNAUTHORIZED,
            &[],
            br#"{"details":"incorrect username or password"}"#,
        );
        assert_eq!(
            failure.cause(),
            "unauthorized: incorrect username or password"
        );
    }

    #[test]
    fn endpoint_loopback_is_plain_http_and_hub_is_registry_1() {
        assert_eq!(
            Endpoint::for_domain("127.0.0.1:5000").base,
            "http://127.0.0.1:5000"
        );
        assert_eq!(Endpoint::for_domain("127.8.0.1").base, "http://127.8.0.1");
        assert_eq!(
            Endpoint::for_domain("localhost:5000").base,
            "http://localhost:5000"
        );
        assert_eq!(Endpoint::for_domain("[::1]:5000").base, "http://[::1]:5000");
        assert_eq!(
            Endpoint::for_domain("docker.io").base,
            "https://registry-1.docker.io"
        );
        assert_eq!(Endpoint::for_domain("ghcr.io").base, "https://ghcr.io");
        assert_eq!(
            Endpoint::for_domain("10.0.0.1:5000").base,
            "https://10.0.0.1:5000"
        );
    }

    #[test]
    fn query_string_escapes_scope_separators() {
        assert_eq!(
            query_string(&[("scope", "repository:a/b:pull,push"), ("service", "x y")]),
            "scope=repository%3Aa%2Fb%3Apull%2Cpush&service=x%20y"
        );
        assert_eq!(
            with_query("https://a/token?x=1", "y=2"),
            "https://a/token?x=1&y=2"
        );
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

    #[test]
    fn progress_reader_with_long_interval_reports_first_and_last_only() {
        let data = [7u8; 10];
        let mut events = Vec::new();
        let mut sink = |p: Progress| events.push(p);
        let mut reader = ProgressReader::new(&data[..], "abc", "Downloading", 10, &mut sink);
        reader.interval = Duration::from_secs(3600);
        let mut chunk = [0u8; 3];
        while reader.read(&mut chunk).unwrap() > 0 {}
        let counts: Vec<u64> = events
            .iter()
            .map(|p| match p {
                Progress::Bytes { current, .. } => *current,
                Progress::Status { .. } => u64::MAX,
            })
            .collect();
        assert_eq!(counts, vec![3, 10]);
    }
}
