//! Content digests (`sha256:<hex>`), hashing while data streams past, and the OCI ChainID.
//!
//! Only sha256 is accepted: it is what Docker, containerd and every registry use for image
//! content, and one algorithm keeps the blob directory a single flat namespace.

use std::fmt;
use std::io::{self, Read, Write};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// The algorithm prefix of every digest this store handles.
pub const SHA256_PREFIX: &str = "sha256:";

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

/// Why a string is not a digest; the messages are go-digest's, which Docker prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not `algorithm:hex`, or the hex part has characters outside `[0-9a-f]`.
    #[error("invalid checksum digest format")]
    Format,
    /// The hex part is not 64 characters long.
    #[error("invalid checksum digest length")]
    Length,
    /// A well-formed algorithm other than sha256.
    #[error("unsupported digest algorithm")]
    Algorithm,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(value: &str) -> Result<Self, DigestError> {
        let (algorithm, hex) = value.split_once(':').ok_or(DigestError::Format)?;
        if algorithm != "sha256" {
            return Err(if is_algorithm_syntax(algorithm) {
                DigestError::Algorithm
            } else {
                DigestError::Format
            });
        }
        if !is_lower_hex(hex) {
            return Err(DigestError::Format);
        }
        if hex.len() != 64 {
            return Err(DigestError::Length);
        }
        Ok(Self(value.to_owned()))
    }

    /// The digest whose hex part is `hex` (64 lowercase hex characters).
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        Self::parse(&format!("{SHA256_PREFIX}{hex}"))
    }

    /// The sha256 digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    fn from_hasher(hasher: Sha256) -> Self {
        Self(format!("{SHA256_PREFIX}{}", hex::encode(hasher.finalize())))
    }

    /// The whole digest, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex characters after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0[SHA256_PREFIX.len()..]
    }

    /// The first 12 hex characters, as Docker abbreviates IDs.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }
}

/// The first 12 characters of an ID after any `algorithm:` prefix (Docker's `TruncateID`).
pub fn short_id(id: &str) -> &str {
    let hex = id.split_once(':').map_or(id, |(_, hex)| hex);
    hex.get(..12).unwrap_or(hex)
}

/// Whether `value` is non-empty lowercase hex.
pub(crate) fn is_lower_hex(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// go-digest's algorithm grammar: `[a-z0-9]+([+._-][a-z0-9]+)*`.
fn is_algorithm_syntax(algorithm: &str) -> bool {
    !algorithm.is_empty()
        && algorithm.split(['+', '.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        Digest::parse(&value)
            .map_err(|e| serde::de::Error::custom(format!("digest {value:?}: {e}")))
    }
}

/// The OCI ChainIDs of a layer stack, bottom-most first: `chain[0] = diff_id[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff_id[n])`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut chain: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => Digest::of(format!("{parent} {diff_id}").as_bytes()),
        };
        chain.push(next);
    }
    chain
}

/// A writer that hashes and counts everything written through it.
#[derive(Debug)]
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The inner writer, the digest and the byte count of what went through.
    pub(crate) fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts everything read through it.
#[derive(Debug)]
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            read: 0,
        }
    }

    /// Reads what is left (so the digest covers the whole stream) and returns the digest and
    /// the total byte count.
    pub(crate) fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_hasher(self.hasher), self.read))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_valid_digest_round_trips() {
        let digest = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(digest.to_string(), EMPTY_SHA256);
        assert_eq!(digest.short(), "e3b0c44298fc");
    }

    #[test]
    fn parse_bad_digests_give_go_digest_messages() {
        let cases = [
            ("e3b0c442", DigestError::Format),
            (
                "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
                DigestError::Format,
            ),
            ("sha256:e3b0c442", DigestError::Length),
            ("sha512:abcd", DigestError::Algorithm),
            ("SHA256:abcd", DigestError::Format),
        ];
        for (input, expected) in cases {
            assert_eq!(Digest::parse(input), Err(expected), "{input}");
        }
    }

    #[test]
    fn of_empty_input_is_the_well_known_empty_digest() {
        assert_eq!(Digest::of(b"").as_str(), EMPTY_SHA256);
    }

    #[test]
    fn chain_ids_follow_the_oci_formula() {
        // diff_ids: a = sha256("a"), b = sha256("b").
        // chain[0] = a.
        // chain[1] = sha256("sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb
        //            sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d")
        // (one space between), computed by hand with
        // `printf 'sha256:ca97...48bb sha256:3e23...009d' | sha256sum`.
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        assert_eq!(
            a.as_str(),
            "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
        );
        assert_eq!(
            b.as_str(),
            "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"
        );
        let chain = chain_ids(&[a.clone(), b]);
        assert_eq!(chain[0], a);
        assert_eq!(
            chain[1].as_str(),
            "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676"
        );
    }

    #[test]
    fn hashing_reader_covers_unread_tail() {
        let mut reader = HashingReader::new(&b"abc"[..]);
        let mut first = [0u8; 1];
        reader.read_exact(&mut first).unwrap();
        let (digest, size) = reader.finish().unwrap();
        assert_eq!(digest, Digest::of(b"abc"));
        assert_eq!(size, 3);
    }

    #[test]
    fn short_id_strips_the_algorithm() {
        assert_eq!(short_id(EMPTY_SHA256), "e3b0c44298fc");
        assert_eq!(short_id("abc"), "abc");
    }
}
