//! The distribution protocol's formats, free of I/O: where a registry is reached, the
//! `WWW-Authenticate` challenges, query strings, what kind of manifest a document is and which
//! entry of an index fits this machine, and error answers read the way Docker reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;

use serde::Deserialize;
use ureq::http::{self, header, StatusCode};

use super::RegistryError;
use crate::images::media::{self, Descriptor};
use crate::images::reference::DEFAULT_DOMAIN;
use crate::images::ImageError;

/// Where Docker Hub's registry API lives (`docker.io` is only the name in references).
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// The most of an error body read to find the registry's error codes.
const MAX_ERROR_BODY_SIZE: u64 = 64 << 10;
/// Docker schema 1 manifests, which Berth does not pull (dockerd dropped them too).
const DOCKER_SCHEMA1_MANIFESTS: [&str; 2] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

/// A registry's address and the scheme to use with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// The registry as references name it (`docker.io`, `127.0.0.1:5000`).
    pub(super) registry: String,
    /// `scheme://host[:port]`, no trailing slash.
    pub(super) base: String,
    /// Whether it is on this machine (plain HTTP, no proxy).
    pub(super) loopback: bool,
}

impl Endpoint {
    pub(super) fn for_domain(domain: &str) -> Self {
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
pub(super) fn is_loopback(domain: &str) -> bool {
    let host = match domain.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => domain.split(':').next().unwrap_or_default(),
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Challenge {
    /// The scheme, lowercase (`bearer`, `basic`).
    pub(super) scheme: String,
    /// The parameters, names lowercase (`realm`, `service`, `scope`, `error`).
    pub(super) params: BTreeMap<String, String>,
}

/// Parses `WWW-Authenticate` values: `Bearer realm="...",service="...",scope="..."`, several
/// challenges in one value or across values, quoted strings with `\` escapes.
pub(super) fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
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
pub(super) fn parse_param_value(text: &str) -> (String, &str) {
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
pub(super) fn query_escape(value: &str) -> String {
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
pub(super) fn query_string(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Appends `query` to a URL that may already have one.
pub(super) fn with_query(url: &str, query: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{query}")
}

/// The `Accept` list for manifests, preferred first.
pub(super) fn manifest_accept() -> String {
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
pub(super) enum ManifestKind {
    /// An image manifest, with its media type.
    Image(String),
    /// An index or manifest list.
    Index,
}

/// The kind of a manifest document, from its own `mediaType` (authoritative when present),
/// else the `Content-Type` the registry sent, else its shape.
pub(super) fn manifest_kind(
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<ManifestKind, ImageError> {
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
pub(super) fn select_platform<'a>(
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
pub(super) struct ErrorEntry {
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
pub(super) struct Failure {
    pub(super) status: u16,
    pub(super) errors: Vec<ErrorEntry>,
}

impl Failure {
    /// Reads an error answer the way Docker's distribution client does: the JSON `errors`
    /// (or a token server's `details`), a Bearer challenge's `error` for 401s, else the status.
    pub(super) fn read(response: &mut http::Response<ureq::Body>) -> Self {
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

    pub(super) fn from_parts(status: StatusCode, challenges: &[Challenge], body: &[u8]) -> Self {
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

    pub(super) fn has_code(&self, code: &str) -> bool {
        self.errors.first().is_some_and(|e| e.code == code)
    }

    /// The errors as Docker prints them, or the status when there are none.
    pub(super) fn cause(&self) -> String {
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
    pub(super) fn into_error(self, endpoint: &Endpoint, credentials: bool) -> RegistryError {
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

pub(super) fn challenges_of(response: &http::Response<ureq::Body>) -> Vec<Challenge> {
    parse_challenges(
        response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    )
}

pub(super) fn header_str<'a>(
    response: &'a http::Response<ureq::Body>,
    name: &str,
) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Why a request did not get an answer, in a few words.
pub(super) fn describe(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Io(e) => describe_io(e),
        ureq::Error::HostNotFound => "no such host".into(),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Timeout(_) => "i/o timeout".into(),
        other => other.to_string(),
    }
}

pub(super) fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::TimedOut => "i/o timeout".into(),
        io::ErrorKind::UnexpectedEof => "unexpected EOF".into(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::Digest;
    use crate::ErrorKind;

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
}
