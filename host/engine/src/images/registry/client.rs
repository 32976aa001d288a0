//! The HTTP side of pull and push: one [`Client`] per operation, authenticated for one
//! repository and scope, that fetches manifests and blobs into the store and uploads blobs and
//! manifests from it, reporting progress as it goes.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use ureq::http::{self, header, StatusCode};

use super::wire::{
    challenges_of, describe, describe_io, header_str, manifest_accept, manifest_kind, query_string,
    select_platform, with_query, Challenge, Endpoint, Failure, ManifestKind,
};
use super::{Progress, RegistryAuth, RegistryError};
use crate::images::blobs::StagedBlob;
use crate::images::digest::{short_id, Digest};
use crate::images::media::{self, host_architecture, Compression, Descriptor, Manifest};
use crate::images::reference::{Reference, DEFAULT_TAG};
use crate::images::store::{check_size, layers_mismatch};
use crate::images::{parse_digest, Image, ImageError, ImageStore};

/// dockerd's limit on a manifest or index body.
const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// The largest image config a pull accepts (the store reads configs up to this size).
const MAX_CONFIG_SIZE: u64 = 32 << 20;
/// The largest token-server answer read.
const MAX_TOKEN_RESPONSE_SIZE: u64 = 1 << 20;
/// How often a transfer reports its byte counts (the docker CLI redraws at this rate too).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Connecting to a registry (or its token server) gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A read or write on an open connection that makes no progress for this long fails.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Docker schema 2 gzip layer.
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const USER_AGENT: &str = concat!("berth/", env!("CARGO_PKG_VERSION"));

/// A manifest fetched for a pull.
#[derive(Debug)]
pub(super) struct FetchedManifest {
    /// The digest the reference resolved to: the index's when there was one (what dockerd
    /// records as the repo digest).
    pub(super) repo_digest: Digest,
    /// The image manifest, byte for byte.
    pub(super) bytes: Vec<u8>,
    pub(super) manifest: Manifest,
}

/// A connection to one repository of one registry, authenticated for one scope.
pub(super) struct Client<'a> {
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
    pub(super) fn connect(
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

    /// The error a registry's failed answer (outside the token exchange and manifest pulls,
    /// which say more) stands for.
    fn failure(&self, response: &mut http::Response<ureq::Body>) -> RegistryError {
        Failure::read(response).into_error(&self.endpoint, self.sends_credentials())
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
    pub(super) fn fetch_image_manifest(
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
                check_size(
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
    pub(super) fn fetch_blobs(
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
            return Err(self.failure(&mut response).into());
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
    pub(super) fn push_image(
        &mut self,
        store: &ImageStore,
        tagged: &Reference,
        image: &Image,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, ImageError> {
        let raw = store.manifest(&image.id)?;
        let mut manifest = parse_manifest(&raw.bytes, &raw.media_type)?;
        if manifest.layers.len() != image.layers.len() {
            return Err(layers_mismatch(image.layers.len(), manifest.layers.len()));
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
            // An explicit zero length: some front ends answer a bodiless POST without one
            // with 411 Length Required.
            with_auth(agent.post(&url), auth)
                .header(header::CONTENT_LENGTH, 0)
                .send_empty()
        })?;
        if !response.status().is_success() {
            return Err(self.failure(&mut response).into());
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
            return Err(self.failure(&mut response).into());
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
            return Err(self.failure(&mut response).into());
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

pub(super) fn with_auth<B>(
    request: ureq::RequestBuilder<B>,
    authorization: Option<&str>,
) -> ureq::RequestBuilder<B> {
    match authorization {
        Some(value) => request.header(header::AUTHORIZATION, value),
        None => request,
    }
}

/// Parses an image manifest and checks what it references can be pulled.
pub(super) fn parse_manifest(bytes: &[u8], media_type: &str) -> Result<Manifest, ImageError> {
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
pub(super) enum PushBlob {
    Stored {
        path: PathBuf,
        digest: String,
        size: u64,
    },
    Compressed(StagedBlob),
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
pub(super) struct ProgressReader<'p, R> {
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
