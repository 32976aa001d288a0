//! The content-addressed blob directory (`blobs/sha256/<hex>`) and the file-level
//! building blocks of crash safety: every file is written to `tmp/`, synced, verified, and
//! only then renamed into place, so a blob path always holds exactly the bytes its name
//! promises and an interrupted write leaves only garbage in `tmp/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::digest::{Digest, HashingWriter};
use super::ImageError;

/// The blob directory and the scratch directory beside it (same filesystem, so renames are
/// atomic).
#[derive(Debug)]
pub(crate) struct BlobStore {
    dir: PathBuf,
    tmp: PathBuf,
}

/// A file in `tmp/` whose digest and size are known; removed on drop unless committed.
#[derive(Debug)]
pub(crate) struct StagedBlob {
    path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

impl StagedBlob {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        // Already renamed into the blob directory, or never created: nothing to clean.
        let _ = fs::remove_file(&self.path);
    }
}

impl BlobStore {
    /// Uses `dir` for blobs and `tmp` for scratch files, creating both.
    pub(crate) fn open(dir: PathBuf, tmp: PathBuf) -> Result<Self, ImageError> {
        for path in [&dir, &tmp] {
            fs::create_dir_all(path)
                .map_err(ImageError::io(format!("creating {}", path.display())))?;
        }
        Ok(Self { dir, tmp })
    }

    /// The scratch directory.
    #[cfg(test)]
    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Where the blob with `digest` lives (whether or not it exists).
    pub(crate) fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the blob is present.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// The size of a present blob.
    pub(crate) fn size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path(digest)).ok().map(|m| m.len())
    }

    /// Opens a present blob.
    pub(crate) fn open_blob(&self, digest: &Digest) -> Result<File, ImageError> {
        File::open(self.path(digest)).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ImageError::BlobNotFound(digest.to_string()),
            _ => ImageError::Io {
                context: format!("opening blob {digest}"),
                source,
            },
        })
    }

    /// Reads a present blob that is expected to be small (JSON), refusing more than `limit`
    /// bytes.
    pub(crate) fn read(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, ImageError> {
        let file = self.open_blob(digest)?;
        read_limited(file, limit, &format!("blob {digest}"))
            .map_err(ImageError::io(format!("reading blob {digest}")))?
    }

    /// Copies `reader` into a new scratch file, hashing it on the way.
    pub(crate) fn stage(&self, reader: &mut dyn Read) -> Result<StagedBlob, ImageError> {
        self.stage_with(|out| io::copy(reader, out).map(|_| ()))
            .map_err(|e| match e {
                StageError::Write(source) => source,
                StageError::Read(source) => ImageError::ReadInput(source),
            })
    }

    /// A staged copy of `data`.
    pub(crate) fn stage_bytes(&self, data: &[u8]) -> Result<StagedBlob, ImageError> {
        self.stage(&mut &data[..])
    }

    /// Creates a scratch file, lets `fill` write it, and records its digest and size.
    /// Read failures inside `fill` are told apart from failures of our own disk.
    fn stage_with(
        &self,
        fill: impl FnOnce(&mut HashingWriter<TrackingWriter<BufWriter<File>>>) -> io::Result<()>,
    ) -> Result<StagedBlob, StageError> {
        let (path, file) = create_temp(&self.tmp, "blob")
            .map_err(|e| StageError::Write(ImageError::io("creating a scratch file")(e)))?;
        // From here on the file is removed on any error by the guard's drop.
        let mut staged = StagedBlob {
            path,
            digest: Digest::of(b""),
            size: 0,
        };
        let mut writer = HashingWriter::new(TrackingWriter::new(BufWriter::new(file)));
        if let Err(e) = fill(&mut writer) {
            let (tracking, _, _) = writer.finish();
            return Err(match tracking.failure {
                Some(write_error) => {
                    StageError::Write(ImageError::io("writing a scratch file")(write_error))
                }
                None => StageError::Read(e),
            });
        }
        let (tracking, digest, size) = writer.finish();
        let file = tracking.inner.into_inner().map_err(|e| {
            StageError::Write(ImageError::io("writing a scratch file")(e.into_error()))
        })?;
        file.sync_all()
            .map_err(|e| StageError::Write(ImageError::io("syncing a scratch file")(e)))?;
        staged.digest = digest;
        staged.size = size;
        Ok(staged)
    }

    /// Moves a staged blob into the blob directory under its digest; if the blob is already
    /// there the staged copy is dropped (same digest, same bytes).
    pub(crate) fn commit(&self, staged: StagedBlob) -> Result<(), ImageError> {
        self.commit_path(&staged.path, &staged.digest)
    }

    /// Moves the verified scratch file at `path` (content `digest`) into the blob directory,
    /// or removes it if the blob already exists.
    pub(crate) fn commit_path(&self, path: &Path, digest: &Digest) -> Result<(), ImageError> {
        let target = self.path(digest);
        if target.is_file() {
            let _ = fs::remove_file(path);
            return Ok(());
        }
        fs::rename(path, &target).map_err(ImageError::io(format!("storing blob {digest}")))?;
        sync_dir(&self.dir).map_err(ImageError::io("syncing the blob directory"))
    }

    /// Removes a blob, returning the bytes freed (0 if it was not there).
    pub(crate) fn remove(&self, digest: &Digest) -> Result<u64, ImageError> {
        let path = self.path(digest);
        let size = match fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ImageError::io(format!("inspecting blob {digest}"))(e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(ImageError::io(format!("removing blob {digest}"))(e)),
        }
    }

    /// Every blob present, by digest (files with names that are not digests are ignored).
    pub(crate) fn list(&self) -> Result<Vec<Digest>, ImageError> {
        let entries = fs::read_dir(&self.dir).map_err(ImageError::io("listing blobs"))?;
        let mut digests = Vec::new();
        for entry in entries {
            let entry = entry.map_err(ImageError::io("listing blobs"))?;
            if let Some(digest) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            {
                digests.push(digest);
            }
        }
        Ok(digests)
    }
}

enum StageError {
    Read(io::Error),
    Write(ImageError),
}

/// A writer that remembers whether a failure came from itself (our disk) rather than from
/// the reader feeding it.
pub(crate) struct TrackingWriter<W> {
    inner: W,
    failure: Option<io::Error>,
}

impl<W> TrackingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            failure: None,
        }
    }
}

impl<W: Write> Write for TrackingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.record(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|e| self.record(e))
    }
}

impl<W> TrackingWriter<W> {
    fn record(&mut self, e: &io::Error) {
        if self.failure.is_none() {
            self.failure = Some(io::Error::new(e.kind(), e.to_string()));
        }
    }
}

/// Writes `data` to `path` atomically: a synced scratch file beside it, renamed over it, and
/// the directory synced so the rename survives a crash.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let (temp, mut file) = create_temp(dir, &format!(".{name}"))?;
    let result = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&temp, path))
        .and_then(|()| sync_dir(dir));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes a file, treating "already gone" as success.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Reads at most `limit` bytes; more is an `InvalidArchive`-style error for the caller, so
/// the outer result is the I/O and the inner one the size check.
pub(crate) fn read_limited(
    reader: impl Read,
    limit: u64,
    what: &str,
) -> io::Result<Result<Vec<u8>, ImageError>> {
    let mut data = Vec::new();
    reader.take(limit + 1).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Ok(Err(ImageError::InvalidArchive(format!(
            "{what} is larger than {limit} bytes"
        ))));
    }
    Ok(Ok(data))
}

fn create_temp(dir: &Path, prefix: &str) -> io::Result<(PathBuf, File)> {
    let path = dir.join(format!("{prefix}.tmp-{}", random_hex()?));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, file))
}

fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> BlobStore {
        BlobStore::open(dir.join("blobs"), dir.join("tmp")).unwrap()
    }

    #[test]
    fn stage_and_commit_stores_blob_under_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = store(dir.path());
        let staged = blobs.stage_bytes(b"content").unwrap();
        let digest = staged.digest.clone();
        blobs.commit(staged).unwrap();
        assert_eq!(fs::read(blobs.path(&digest)).unwrap(), b"content");
        assert_eq!(digest, Digest::of(b"content"));
        assert_eq!(fs::read_dir(blobs.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn dropped_stage_leaves_no_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = store(dir.path());
        drop(blobs.stage_bytes(b"content").unwrap());
        assert_eq!(fs::read_dir(blobs.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn stage_reports_reader_failure_as_input_error() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let blobs = store(dir.path());
        let err = blobs.stage(&mut Failing).unwrap_err();
        assert!(matches!(err, ImageError::ReadInput(_)), "{err:?}");
        assert_eq!(fs::read_dir(blobs.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn write_atomic_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
