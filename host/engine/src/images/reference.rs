//! Image references as Docker parses and normalises them (the `distribution/reference`
//! grammar): `busybox` is `docker.io/library/busybox`, `busybox` without tag means
//! `busybox:latest`, and a first component with a `.` or `:` or equal to `localhost` is a
//! registry (`127.0.0.1:5000/x` keeps its registry).
//!
//! The store keys references by their full normalised string and shows them in the familiar
//! short form, as `docker images` does.

use std::fmt;

use super::digest::{is_lower_hex, Digest, DigestError};

/// The registry a name without one belongs to.
pub const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// The tag a reference without tag or digest gets.
pub const DEFAULT_TAG: &str = "latest";
const MAX_NAME_LENGTH: usize = 255;
const MAX_TAG_LENGTH: usize = 128;

/// Why a string is not a valid reference; messages as Docker prints them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The string does not match the reference grammar.
    #[error("invalid reference format")]
    InvalidFormat,
    /// The repository part has upper-case letters.
    #[error("invalid reference format: repository name ({0}) must be lowercase")]
    Uppercase(String),
    /// A bare 64-hex string cannot be a repository name (it would shadow an image ID).
    #[error("invalid repository name ({0}), cannot specify 64-byte hexadecimal strings")]
    HexName(String),
    /// Nothing was given.
    #[error("repository name must have at least one component")]
    Empty,
    /// Domain and path together are longer than 255 characters.
    #[error("repository name must not be more than 255 characters")]
    NameTooLong,
    /// The part after `@` is not a digest this store accepts.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A normalised named reference: domain, path, and an optional tag and digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// What a user-supplied image string denotes: an image ID or a named reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `sha256:<64hex>` or a bare 64-hex string.
    Id(Digest),
    /// Anything else that parses as a reference.
    Named(Reference),
}

/// Parses like Docker's `ParseAnyReference`: a full image ID in either form, else a
/// normalised named reference.
pub fn parse_any(value: &str) -> Result<ImageRef, ReferenceError> {
    if value.len() == 64 && is_lower_hex(value) {
        return Ok(ImageRef::Id(Digest::from_hex(value)?));
    }
    if let Ok(digest) = Digest::parse(value) {
        return Ok(ImageRef::Id(digest));
    }
    Reference::parse_normalized(value).map(ImageRef::Named)
}

impl Reference {
    /// Parses and normalises like Docker's `ParseNormalizedNamed`.
    pub fn parse_normalized(value: &str) -> Result<Self, ReferenceError> {
        if value.len() == 64 && is_lower_hex(value) {
            return Err(ReferenceError::HexName(value.to_owned()));
        }
        if value.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (domain, remainder) = split_docker_domain(value);
        let remote_name = remainder.split(':').next().unwrap_or_default();
        if remote_name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(ReferenceError::Uppercase(remote_name.to_owned()));
        }
        parse_remainder(domain, &remainder)
    }

    /// The registry, e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path within the registry, e.g. `library/busybox`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if one was given (or added by [`Reference::with_default_tag`]).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest after `@`, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The full repository name, e.g. `docker.io/library/busybox`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The repository name as Docker shows it, e.g. `busybox` or `127.0.0.1:5000/x`.
    pub fn familiar_name(&self) -> String {
        if self.domain != DEFAULT_DOMAIN {
            return self.name();
        }
        match self.path.strip_prefix(OFFICIAL_REPO_PREFIX) {
            Some(rest) if !rest.contains('/') => rest.to_owned(),
            _ => self.path.clone(),
        }
    }

    /// The whole reference as Docker shows it, e.g. `busybox:latest`.
    pub fn familiar(&self) -> String {
        self.render(&self.familiar_name())
    }

    /// Adds the `latest` tag to a reference with neither tag nor digest (`TagNameOnly`).
    pub fn with_default_tag(mut self) -> Self {
        if self.tag.is_none() && self.digest.is_none() {
            self.tag = Some(DEFAULT_TAG.to_owned());
        }
        self
    }

    /// The same repository with only a tag.
    pub fn with_tag(&self, tag: &str) -> Self {
        Self {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: Some(tag.to_owned()),
            digest: None,
        }
    }

    /// The same repository with only a digest (a "canonical" reference).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The key a reference is stored under: the digest wins over a tag when both are given,
    /// and a bare name means `:latest`.
    pub fn store_key(&self) -> Self {
        match &self.digest {
            Some(digest) => self.with_digest(digest.clone()),
            None => self.clone().with_default_tag(),
        }
    }

    /// Whether the reference names a manifest digest (`name@sha256:...`).
    pub fn is_canonical(&self) -> bool {
        self.digest.is_some()
    }

    /// Whether the reference is a bare repository name, with neither tag nor digest.
    pub fn is_name_only(&self) -> bool {
        self.tag.is_none() && self.digest.is_none()
    }

    fn render(&self, name: &str) -> String {
        let mut out = name.to_owned();
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(digest.as_str());
        }
        out
    }
}

impl fmt::Display for Reference {
    /// The full normalised form, e.g. `docker.io/library/busybox:latest`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(&self.name()))
    }
}

/// Docker's `splitDockerDomain`.
fn split_docker_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first.to_owned(), rest.to_owned())
        }
        _ => (DEFAULT_DOMAIN.to_owned(), name.to_owned()),
    };
    if domain == LEGACY_DEFAULT_DOMAIN {
        domain = DEFAULT_DOMAIN.to_owned();
    }
    if domain == DEFAULT_DOMAIN && !remainder.contains('/') {
        remainder = format!("{OFFICIAL_REPO_PREFIX}{remainder}");
    }
    (domain, remainder)
}

/// Validates `path[:tag][@digest]` below an already split `domain`.
fn parse_remainder(domain: String, remainder: &str) -> Result<Reference, ReferenceError> {
    let (name_tag, digest) = match remainder.split_once('@') {
        Some((name_tag, digest)) => (name_tag, Some(parse_digest(digest)?)),
        None => (remainder, None),
    };
    let (path, tag) = match name_tag.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') => (path, Some(tag)),
        _ => (name_tag, None),
    };
    if !is_domain(&domain) || path.is_empty() || !path.split('/').all(is_path_component) {
        return Err(ReferenceError::InvalidFormat);
    }
    if let Some(tag) = tag {
        if !is_tag(tag) {
            return Err(ReferenceError::InvalidFormat);
        }
    }
    if domain.len() + 1 + path.len() > MAX_NAME_LENGTH {
        return Err(ReferenceError::NameTooLong);
    }
    Ok(Reference {
        domain,
        path: path.to_owned(),
        tag: tag.map(str::to_owned),
        digest,
    })
}

/// The digest grammar first (`algorithm:hex` with at least 32 hex characters), then go-digest's
/// own checks, in Docker's order.
fn parse_digest(value: &str) -> Result<Digest, ReferenceError> {
    let (algorithm, hex) = value.split_once(':').ok_or(ReferenceError::InvalidFormat)?;
    let algorithm_ok = algorithm.split(['-', '_', '+', '.']).all(|part| {
        part.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && part.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    if !algorithm_ok || hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ReferenceError::InvalidFormat);
    }
    Ok(Digest::parse(value)?)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.first().copied().is_some_and(alphanumeric) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alphanumeric(bytes[i]) {
            i += 1;
            continue;
        }
        let separator = match bytes[i] {
            b'.' => 1,
            b'_' if bytes.get(i + 1) == Some(&b'_') => 2,
            b'_' => 1,
            b'-' => bytes[i..].iter().take_while(|&&b| b == b'-').count(),
            _ => return false,
        };
        i += separator;
        if !bytes.get(i).copied().is_some_and(alphanumeric) {
            return false;
        }
    }
    true
}

/// `host(:port)?` where host is dot-separated labels or a bracketed IPv6 address.
fn is_domain(domain: &str) -> bool {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else {
            return false;
        };
        if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match domain.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };
    let host_ok =
        host.is_empty() && domain.starts_with('[') || host.split('.').all(is_domain_label);
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// `[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`
fn is_domain_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// `[\w][\w.-]{0,127}`
fn is_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    tag.len() <= MAX_TAG_LENGTH
        && tag.bytes().next().is_some_and(word)
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_normalized_table() {
        // (input, full normalised form, familiar form)
        let digest_ref = format!("busybox@sha256:{HEX}");
        let cases = [
            ("busybox", "docker.io/library/busybox", "busybox"),
            (
                "busybox:latest",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "library/busybox:1.36",
                "docker.io/library/busybox:1.36",
                "busybox:1.36",
            ),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox:latest",
                "busybox:latest",
            ),
            (
                "index.docker.io/library/busybox",
                "docker.io/library/busybox",
                "busybox",
            ),
            ("docker.io/busybox", "docker.io/library/busybox", "busybox"),
            ("user/app:v1", "docker.io/user/app:v1", "user/app:v1"),
            ("127.0.0.1:5000/x", "127.0.0.1:5000/x", "127.0.0.1:5000/x"),
            (
                "127.0.0.1:5000/x:tag",
                "127.0.0.1:5000/x:tag",
                "127.0.0.1:5000/x:tag",
            ),
            ("localhost/app", "localhost/app", "localhost/app"),
            (
                "localhost:5000",
                "docker.io/library/localhost:5000",
                "localhost:5000",
            ),
            ("ghcr.io/a/b/c:1", "ghcr.io/a/b/c:1", "ghcr.io/a/b/c:1"),
            ("[::1]:5000/app", "[::1]:5000/app", "[::1]:5000/app"),
            (
                "a__b-c---e/f_g.h",
                "docker.io/a__b-c---e/f_g.h",
                "a__b-c---e/f_g.h",
            ),
            (
                "docker.io/library/a/b",
                "docker.io/library/a/b",
                "library/a/b",
            ),
            (
                &digest_ref,
                &format!("docker.io/library/busybox@sha256:{HEX}"),
                &digest_ref,
            ),
        ];
        for (input, full, familiar) in cases {
            let reference =
                Reference::parse_normalized(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(reference.to_string(), full, "full form of {input}");
            assert_eq!(reference.familiar(), familiar, "familiar form of {input}");
        }
    }

    #[test]
    fn parse_normalized_rejects_bad_references() {
        let cases = [
            ("", ReferenceError::Empty),
            (
                "Busybox",
                ReferenceError::Uppercase("library/Busybox".into()),
            ),
            (HEX, ReferenceError::HexName(HEX.into())),
            ("busybox:", ReferenceError::InvalidFormat),
            ("busybox:-x", ReferenceError::InvalidFormat),
            ("a//b", ReferenceError::InvalidFormat),
            ("a_-b", ReferenceError::InvalidFormat),
            ("a___b", ReferenceError::InvalidFormat),
            ("-a", ReferenceError::InvalidFormat),
            ("busybox@sha256:abc", ReferenceError::InvalidFormat),
            (
                "busybox@sha256:0123456789abcdef0123456789abcdef01",
                ReferenceError::Digest(DigestError::Length),
            ),
            ("my_registry.com/x", ReferenceError::InvalidFormat),
            ("exa mple", ReferenceError::InvalidFormat),
        ];
        for (input, expected) in cases {
            assert_eq!(
                Reference::parse_normalized(input),
                Err(expected),
                "{input:?}"
            );
        }
    }

    #[test]
    fn parse_normalized_rejects_names_over_255_characters() {
        let long = "a".repeat(250);
        assert_eq!(
            Reference::parse_normalized(&long),
            Err(ReferenceError::NameTooLong)
        );
    }

    #[test]
    fn with_default_tag_adds_latest_only_to_bare_names() {
        let bare = Reference::parse_normalized("busybox")
            .unwrap()
            .with_default_tag();
        let tagged = Reference::parse_normalized("busybox:1")
            .unwrap()
            .with_default_tag();
        let digested = Reference::parse_normalized(&format!("busybox@sha256:{HEX}"))
            .unwrap()
            .with_default_tag();
        assert_eq!(bare.familiar(), "busybox:latest");
        assert_eq!(tagged.familiar(), "busybox:1");
        assert_eq!(digested.tag(), None);
    }

    #[test]
    fn store_key_prefers_the_digest() {
        let both = Reference::parse_normalized(&format!("busybox:1@sha256:{HEX}")).unwrap();
        assert_eq!(
            both.store_key().to_string(),
            format!("docker.io/library/busybox@sha256:{HEX}")
        );
    }

    #[test]
    fn parse_any_recognises_ids() {
        let id = Digest::from_hex(HEX).unwrap();
        assert_eq!(parse_any(HEX), Ok(ImageRef::Id(id.clone())));
        assert_eq!(parse_any(&format!("sha256:{HEX}")), Ok(ImageRef::Id(id)));
        assert!(matches!(parse_any("sha256:abc"), Ok(ImageRef::Named(_))));
        assert!(matches!(parse_any("abc"), Ok(ImageRef::Named(_))));
    }
}
