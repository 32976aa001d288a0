//! Files in and out of a container's filesystem as tar streams: `docker cp` both ways and
//! `docker export`.
//!
//! The path functions ([`stat_path`], [`write_path_archive`], [`export_root`],
//! [`extract_archive`]) take absolute paths in the *calling thread's* root. Callers run them
//! inside [`in_root`], which gives the thread a mount namespace and a root directory of its own,
//! the container's: symbolic links (absolute ones too), `..` and hard-link targets then resolve
//! inside the container exactly as they do for the container's own processes, and nothing can
//! name a file outside it. This is the guarantee Docker gets from its chrooted archiver.
//!
//! Archives follow Docker's shapes, so the docker CLI's own rebasing logic works on them:
//! entries of a copied path are named after the path's last element (`hostname`,
//! `etc/passwd`, `./x` for a path ending in `/.`, `/bin` below the root), directories end in
//! `/`, hard links inside the archive stay hard links, sockets are left out. Exports name
//! entries relative to the root and leave out what other filesystems mounted in the container
//! hold (`/proc`, `/sys`, volumes), keeping their mount points as empty directories.

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::thread;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, chroot};
use tar::{EntryType, Header, HeaderMode};
use thiserror::Error;

use crate::mounts::{overlay_options, OverlayConfig};

/// Longest name a GNU tar header holds without a long-name record.
const HEADER_NAME_LEN: usize = 100;

/// Why a path operation failed.
#[derive(Debug, Error)]
pub enum ArchiveError {
    /// The path does not exist in the container.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// A path that must be absolute is not, or has a NUL byte.
    #[error("invalid path {0:?}: it must be absolute")]
    BadPath(String),
    /// An extraction's destination is not a directory (Docker's message).
    #[error("extraction point is not a directory")]
    NotADirectory,
    /// Extraction would replace a directory with something else, or the other way round.
    #[error("cannot overwrite {existing} {path:?} with {incoming}")]
    Overwrite {
        /// The path in the container.
        path: String,
        /// What is there: `directory` or `non-directory`.
        existing: &'static str,
        /// What the archive holds: `non-directory` or `directory`.
        incoming: &'static str,
    },
    /// The uploaded archive is not a valid tar, or names a path outside the destination.
    #[error("invalid archive")]
    BadArchive(#[source] io::Error),
    /// The calling thread could not enter the container's root.
    #[error("cannot enter the container's root: {step}")]
    Enter {
        /// What failed.
        step: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// A filesystem or stream operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// To which path in the container (or the stream).
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The owner asked for does not resolve in the container.
    #[error("cannot resolve the owner {0:?} in the container")]
    Owner(String),
    /// The worker thread could not be started or died.
    #[error("the archive worker thread failed")]
    Worker,
}

impl ArchiveError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound && op == "stat" {
            return Self::NotFound(path.display().to_string());
        }
        Self::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}

/// Whose root a path operation works in.
#[derive(Debug, Clone, Copy)]
pub enum Root<'a> {
    /// The root of a running process, with every mount of its namespace.
    Process(i32),
    /// An overlay mounted at `rootfs` for the call alone (in a mount namespace of its own,
    /// gone when the call returns).
    Overlay {
        /// The mount point, an existing directory.
        rootfs: &'a Path,
        /// The layers.
        overlay: &'a OverlayConfig,
    },
}

/// Runs `work` on a thread whose mount namespace, root and working directory are its own, with
/// `root` as its root. The rest of the process is unaffected.
pub fn in_root<T, F>(root: Root<'_>, work: F) -> Result<T, ArchiveError>
where
    T: Send,
    F: FnOnce() -> Result<T, ArchiveError> + Send,
{
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name("archive".into())
            .spawn_scoped(scope, move || {
                enter(root)?;
                work()
            })
            .map_err(|_| ArchiveError::Worker)?;
        worker.join().unwrap_or(Err(ArchiveError::Worker))
    })
}

fn enter(root: Root<'_>) -> Result<(), ArchiveError> {
    let step = |step| move |source| ArchiveError::Enter { step, source };
    // CLONE_NEWNS implies CLONE_FS: the root set below is this thread's alone.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_FS)
        .map_err(step("unshare the mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make the mounts private"))?;
    match root {
        Root::Process(pid) => {
            chroot(format!("/proc/{pid}/root").as_str()).map_err(step("chroot to the process"))?
        }
        Root::Overlay { rootfs, overlay } => {
            mount(
                Some("overlay"),
                rootfs,
                Some("overlay"),
                MsFlags::empty(),
                Some(overlay_options(overlay).as_str()),
            )
            .map_err(step("mount the overlay"))?;
            chroot(rootfs).map_err(step("chroot to the overlay"))?;
        }
    }
    chdir("/").map_err(step("chdir to the root"))
}

/// What a path is, as `lstat` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The requested path's last element, as Go's `filepath.Base` gives it (`/` for the root,
    /// `.` for a path ending in `/.`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `st_mode`.
    pub mode: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_unix_nanos: i64,
    /// For a symbolic link, the absolute path it resolves to; else empty.
    pub link_target: String,
}

/// Checks that `path` is absolute and has no NUL byte.
fn absolute(path: &str) -> Result<&Path, ArchiveError> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(Path::new(path))
    } else {
        Err(ArchiveError::BadPath(path.to_owned()))
    }
}

/// The last element of `path` as Go's `filepath.Base` gives it: trailing slashes ignored, `/`
/// for the root.
pub fn base_name(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".to_owned();
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_owned()
}

/// `lstat` of `path` (the kernel follows a last-element symlink when the path ends in `/` or
/// `/.`, as Docker wants).
pub fn stat_path(path: &str) -> Result<PathInfo, ArchiveError> {
    let fs_path = absolute(path)?;
    let meta = fs::symlink_metadata(fs_path).map_err(|e| ArchiveError::io("stat", fs_path, e))?;
    let link_target = if meta.file_type().is_symlink() {
        resolve_link(fs_path)?
    } else {
        String::new()
    };
    Ok(PathInfo {
        name: base_name(path),
        size: meta.len(),
        mode: meta.mode(),
        mtime_unix_nanos: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        link_target,
    })
}

/// Where the symlink at `path` leads, absolute; a dangling link's target is resolved as far as
/// it exists and the rest appended, as Docker's `FollowSymlinkInScope` does.
fn resolve_link(path: &Path) -> Result<String, ArchiveError> {
    if let Ok(real) = fs::canonicalize(path) {
        return Ok(real.display().to_string());
    }
    let target = fs::read_link(path).map_err(|e| ArchiveError::io("read the link", path, e))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let parent = fs::canonicalize(parent).unwrap_or_else(|_| parent.to_owned());
    Ok(lexical_join(&parent, &target).display().to_string())
}

/// `base` joined with `relative` and cleaned lexically (`..` never rises above `/`).
fn lexical_join(base: &Path, relative: &Path) -> PathBuf {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    let start = if relative.is_absolute() {
        Path::new("/")
    } else {
        base
    };
    for component in start.components().chain(relative.components()) {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::ParentDir => {
                parts.pop();
            }
            Component::RootDir => parts.clear(),
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let mut out = PathBuf::from("/");
    out.extend(parts);
    out
}

/// Writes a tar of `path` to `out`, its entries named after the path's last element, and
/// returns what the path is. A last-element symlink is archived as the link itself unless the
/// path ends in `/` or `/.`.
pub fn write_path_archive(path: &str, out: impl Write) -> Result<PathInfo, ArchiveError> {
    let info = stat_path(path)?;
    let top = match info.name.as_str() {
        "/" => b"/".to_vec(),
        name => name.as_bytes().to_vec(),
    };
    let mut writer = TarWriter::new(out, None);
    writer.walk(Path::new(path), top)?;
    writer.finish()?;
    Ok(info)
}

/// Writes a tar of the whole root to `out`, entries named relative to it (`bin/`, `bin/sh`),
/// leaving out what other filesystems mounted below the root hold.
pub fn export_root(out: impl Write) -> Result<(), ArchiveError> {
    let root = Path::new("/");
    let meta = fs::symlink_metadata(root).map_err(|e| ArchiveError::io("stat", root, e))?;
    let mut writer = TarWriter::new(out, Some(meta.dev()));
    writer.walk_children(root, &[])?;
    writer.finish()
}

/// Writes the directory `upper`, an overlay's upper layer, as an OCI image layer to `out`:
/// entries named relative to it, overlay whiteouts (character devices 0:0) as `.wh.<name>`
/// files and opaque directories (`trusted.overlay.opaque=y`) with a `.wh..wh..opq` marker, as
/// the image spec's changeset format wants. Nothing below `upper` is followed out of it: only
/// real directories are descended into.
pub fn write_layer_diff(upper: &Path, out: impl Write) -> Result<(), ArchiveError> {
    let mut writer = TarWriter::new(out, None);
    writer.layer_diff = true;
    writer.walk_children(upper, &[])?;
    writer.finish()
}

/// How [`extract_archive`] treats what it writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtractOptions {
    /// Refuse to replace a directory with a non-directory or the other way round.
    pub no_overwrite_dir_non_dir: bool,
    /// Owner of every extracted entry; `None` keeps the archive's.
    pub owner: Option<(u32, u32)>,
}

/// Extracts the tar read from `input` into the directory `path` (symlinks followed, the last
/// element too). Entries keep their modes and times; their owners unless `options.owner`.
pub fn extract_archive(
    path: &str,
    input: impl Read,
    options: ExtractOptions,
) -> Result<u64, ArchiveError> {
    let requested = absolute(path)?;
    let dir = fs::canonicalize(requested).map_err(|e| ArchiveError::io("stat", requested, e))?;
    let meta = fs::metadata(&dir).map_err(|e| ArchiveError::io("stat", &dir, e))?;
    if !meta.is_dir() {
        return Err(ArchiveError::NotADirectory);
    }
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(options.owner.is_none());
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    let mut count = 0;
    for entry in archive.entries().map_err(ArchiveError::BadArchive)? {
        let mut entry = entry.map_err(ArchiveError::BadArchive)?;
        let relative = entry.path().map_err(ArchiveError::BadArchive)?.into_owned();
        let destination = dir.join(clean_relative(&relative));
        if options.no_overwrite_dir_non_dir {
            check_overwrite(&destination, entry.header().entry_type())?;
        }
        let unpacked = entry.unpack_in(&dir).map_err(ArchiveError::BadArchive)?;
        if !unpacked {
            // The tar crate skips entries with `..` or that would land outside `dir`.
            return Err(ArchiveError::BadArchive(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the entry {relative:?} points outside the destination"),
            )));
        }
        if let Some((uid, gid)) = options.owner {
            std::os::unix::fs::lchown(&destination, Some(uid), Some(gid))
                .map_err(|e| ArchiveError::io("change the owner of", &destination, e))?;
        }
        count += 1;
    }
    Ok(count)
}

/// `path` without a leading `/` or `./` parts, as the tar crate places entries.
fn clean_relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect()
}

fn check_overwrite(destination: &Path, incoming: EntryType) -> Result<(), ArchiveError> {
    let Ok(existing) = fs::symlink_metadata(destination) else {
        return Ok(());
    };
    let incoming_dir = incoming.is_dir();
    if existing.is_dir() == incoming_dir {
        return Ok(());
    }
    let kind = |dir: bool| if dir { "directory" } else { "non-directory" };
    Err(ArchiveError::Overwrite {
        path: destination.display().to_string(),
        existing: kind(existing.is_dir()),
        incoming: kind(incoming_dir),
    })
}

/// A tar stream written entry by entry, with names exactly as given (the tar crate's path
/// setters refuse Docker's `/`-rooted names) and hard links kept.
struct TarWriter<W: Write> {
    out: W,
    /// Files with more than one link already written, by (device, inode): their entry name.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// For an export, the root's device: directories on another one are mount points whose
    /// contents stay out.
    root_dev: Option<u64>,
    /// Writing an overlay upper as an image layer: whiteouts and opaque markers converted.
    layer_diff: bool,
}

impl<W: Write> TarWriter<W> {
    fn new(out: W, root_dev: Option<u64>) -> Self {
        Self {
            out,
            links: HashMap::new(),
            root_dev,
            layer_diff: false,
        }
    }

    /// Writes `path` as `name`, then everything below it if it is a directory, depth first in
    /// name order.
    fn walk(&mut self, path: &Path, name: Vec<u8>) -> Result<(), ArchiveError> {
        let meta = fs::symlink_metadata(path).map_err(|e| ArchiveError::io("stat", path, e))?;
        let descend = self.append(path, &name, &meta)?;
        if descend {
            self.walk_children(path, &name)?;
        }
        Ok(())
    }

    /// Writes everything below the directory `dir`, named below `prefix` (nothing for the
    /// root of an export), depth first in name order, as Go's `filepath.Walk` visits.
    fn walk_children(&mut self, dir: &Path, prefix: &[u8]) -> Result<(), ArchiveError> {
        // An explicit stack, next entry last: a deep tree cannot exhaust the thread's stack.
        let mut pending = children(dir, prefix)?;
        while let Some((path, name)) = pending.pop() {
            let meta = match fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                // Removed while we walked: as if it had never been there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ArchiveError::io("stat", &path, e)),
            };
            if self.append(&path, &name, &meta)? {
                pending.extend(children(&path, &name)?);
            }
        }
        Ok(())
    }

    /// Writes one entry; returns whether it is a directory to descend into.
    fn append(&mut self, path: &Path, name: &[u8], meta: &Metadata) -> Result<bool, ArchiveError> {
        let file_type = meta.file_type();
        if file_type.is_socket() {
            return Ok(false);
        }
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(meta, HeaderMode::Complete);
        header.set_mode(meta.mode() & 0o7777);
        header.set_size(0);
        let mut name = name.to_vec();
        if self.layer_diff && file_type.is_char_device() && meta.rdev() == 0 {
            let whiteout = whiteout_name(&name, None);
            header.set_entry_type(EntryType::Regular);
            self.write_entry(&mut header, &whiteout, None, io::empty())?;
            return Ok(false);
        }
        if file_type.is_dir() {
            if !name.ends_with(b"/") {
                name.push(b'/');
            }
            self.write_entry(&mut header, &name, None, io::empty())?;
            if self.layer_diff && is_opaque(path) {
                let marker = whiteout_name(&name, Some(OPAQUE_MARKER));
                let mut header = Header::new_gnu();
                header.set_metadata_in_mode(meta, HeaderMode::Complete);
                header.set_entry_type(EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                self.write_entry(&mut header, &marker, None, io::empty())?;
            }
            let mounted_elsewhere = self.root_dev.is_some_and(|dev| dev != meta.dev());
            return Ok(!mounted_elsewhere);
        }
        if file_type.is_symlink() {
            let target =
                fs::read_link(path).map_err(|e| ArchiveError::io("read the link", path, e))?;
            self.write_entry(
                &mut header,
                &name,
                Some(target.as_os_str().as_bytes()),
                io::empty(),
            )?;
            return Ok(false);
        }
        if file_type.is_block_device() || file_type.is_char_device() {
            let rdev = meta.rdev();
            let major = libc::major(rdev);
            let minor = libc::minor(rdev);
            header
                .set_device_major(major)
                .and_then(|()| header.set_device_minor(minor))
                .map_err(|e| ArchiveError::io("archive the device", path, e))?;
        }
        if file_type.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = self.links.get(&key).cloned() {
                    header.set_entry_type(EntryType::Link);
                    self.write_entry(&mut header, &name, Some(&first), io::empty())?;
                    return Ok(false);
                }
                self.links.insert(key, name.clone());
            }
            let file = File::open(path).map_err(|e| ArchiveError::io("open", path, e))?;
            let size = meta.len();
            header.set_size(size);
            // Exactly `size` bytes, whatever the file does meanwhile: a file that shrank is
            // padded with zeros, one that grew is cut, so the stream stays a valid tar.
            let data = file.take(size).chain(io::repeat(0)).take(size);
            self.write_entry(&mut header, &name, None, data)?;
        } else {
            self.write_entry(&mut header, &name, None, io::empty())?;
        }
        Ok(false)
    }

    /// Writes `header` named `name` (and linking to `link`), with GNU long-name records where
    /// a field is too short, followed by `data`.
    fn write_entry(
        &mut self,
        header: &mut Header,
        name: &[u8],
        link: Option<&[u8]>,
        mut data: impl Read,
    ) -> Result<(), ArchiveError> {
        if name.len() > HEADER_NAME_LEN {
            self.long_record(EntryType::GNULongName, name)?;
        }
        set_field(&mut header.as_old_mut().name, name);
        if let Some(link) = link {
            if link.len() > HEADER_NAME_LEN {
                self.long_record(EntryType::GNULongLink, link)?;
            }
            set_field(&mut header.as_old_mut().linkname, link);
        }
        header.set_cksum();
        let stream = |e| ArchiveError::io("write", Path::new("the archive stream"), e);
        self.out.write_all(header.as_bytes()).map_err(stream)?;
        let written = io::copy(&mut data, &mut self.out).map_err(stream)?;
        self.pad(written).map_err(stream)
    }

    /// A GNU `././@LongLink` record carrying `value` for the next header.
    fn long_record(&mut self, kind: EntryType, value: &[u8]) -> Result<(), ArchiveError> {
        let mut header = Header::new_gnu();
        set_field(&mut header.as_old_mut().name, b"././@LongLink");
        header.set_mode(0o644);
        header.set_entry_type(kind);
        let size = value.len() + 1;
        header.set_size(size as u64);
        header.set_cksum();
        let stream = |e| ArchiveError::io("write", Path::new("the archive stream"), e);
        self.out.write_all(header.as_bytes()).map_err(stream)?;
        self.out.write_all(value).map_err(stream)?;
        self.out.write_all(&[0]).map_err(stream)?;
        self.pad(size as u64).map_err(stream)
    }

    fn pad(&mut self, written: u64) -> io::Result<()> {
        let remainder = (written % 512) as usize;
        if remainder != 0 {
            self.out.write_all(&[0; 512][remainder..])?;
        }
        Ok(())
    }

    /// The two zero blocks that end a tar, then a flush.
    fn finish(mut self) -> Result<(), ArchiveError> {
        let stream = |e| ArchiveError::io("write", Path::new("the archive stream"), e);
        self.out.write_all(&[0; 1024]).map_err(stream)?;
        self.out.flush().map_err(stream)
    }
}

/// The entries of `dir` with their archive names below `prefix`, in reverse name order (the
/// walk pops from the end).
fn children(dir: &Path, prefix: &[u8]) -> Result<Vec<(PathBuf, Vec<u8>)>, ArchiveError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| ArchiveError::io("list", dir, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| ArchiveError::io("list", dir, e))?;
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.file_name()));
    Ok(entries
        .into_iter()
        .map(|entry| {
            let name = child_name(prefix, entry.file_name().as_bytes());
            (entry.path(), name)
        })
        .collect())
}

/// The image-layer marker of an opaque directory.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// `dir/.wh.name` for the entry `dir/name`, or `dir/<marker>` inside the directory `dir/`.
fn whiteout_name(name: &[u8], marker: Option<&[u8]>) -> Vec<u8> {
    if let Some(marker) = marker {
        return [name, marker].concat();
    }
    let split = name.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    [&name[..split], b".wh.", &name[split..]].concat()
}

/// Whether overlayfs marked the directory `path` opaque (it hides the lower layers' entries).
fn is_opaque(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: both strings are NUL-terminated and `value` is writable for its length.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

fn child_name(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    if !out.is_empty() && !out.ends_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

/// Copies `value` into a NUL-padded header field, cut to the field's length (the long-name
/// record carries the whole value).
fn set_field(field: &mut [u8], value: &[u8]) {
    field.fill(0);
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    fn entries(archive: &[u8]) -> Vec<(String, EntryType, String, Vec<u8>)> {
        let mut archive = tar::Archive::new(archive);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                let kind = entry.header().entry_type();
                let link = entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                (path, kind, link, data)
            })
            .collect()
    }

    #[test]
    fn base_name_follows_go_filepath_base() {
        assert_eq!(base_name("/etc/hostname"), "hostname");
        assert_eq!(base_name("/etc/"), "etc");
        assert_eq!(base_name("/etc/."), ".");
        assert_eq!(base_name("/"), "/");
        assert_eq!(base_name("//"), "/");
    }

    #[test]
    fn lexical_join_never_rises_above_the_root() {
        assert_eq!(
            lexical_join(Path::new("/a/b"), Path::new("../../../c")),
            Path::new("/c")
        );
        assert_eq!(
            lexical_join(Path::new("/a"), Path::new("/x/./y")),
            Path::new("/x/y")
        );
    }

    #[test]
    fn write_path_archive_names_entries_after_the_last_element() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("data");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/a.txt"), b"alpha").unwrap();
        fs::write(dir.join("b.txt"), b"beta").unwrap();
        symlink("sub/a.txt", dir.join("link")).unwrap();
        fs::hard_link(dir.join("b.txt"), dir.join("b-again")).unwrap();
        let mut out = Vec::new();

        let info = write_path_archive(dir.to_str().unwrap(), &mut out).unwrap();

        assert_eq!(info.name, "data");
        assert!(info.mode & libc::S_IFMT == libc::S_IFDIR);
        let names: Vec<_> = entries(&out)
            .into_iter()
            .map(|(p, k, l, d)| (p, k, l, String::from_utf8(d).unwrap()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("data/".into(), EntryType::Directory, "".into(), "".into()),
                (
                    "data/b-again".into(),
                    EntryType::Regular,
                    "".into(),
                    "beta".into()
                ),
                (
                    "data/b.txt".into(),
                    EntryType::Link,
                    "data/b-again".into(),
                    "".into()
                ),
                (
                    "data/link".into(),
                    EntryType::Symlink,
                    "sub/a.txt".into(),
                    "".into()
                ),
                (
                    "data/sub/".into(),
                    EntryType::Directory,
                    "".into(),
                    "".into()
                ),
                (
                    "data/sub/a.txt".into(),
                    EntryType::Regular,
                    "".into(),
                    "alpha".into()
                ),
            ]
        );
    }

    #[test]
    fn write_path_archive_of_a_symlink_is_the_link_unless_followed() {
        let temp = tempfile::tempdir().unwrap();
        fs::create_dir(temp.path().join("real")).unwrap();
        fs::write(temp.path().join("real/f"), b"x").unwrap();
        symlink(temp.path().join("real"), temp.path().join("alias")).unwrap();
        let alias = temp.path().join("alias");
        let mut link_only = Vec::new();
        let mut followed = Vec::new();

        let info = write_path_archive(alias.to_str().unwrap(), &mut link_only).unwrap();
        write_path_archive(&format!("{}/", alias.display()), &mut followed).unwrap();

        assert_eq!(
            info.link_target,
            fs::canonicalize(temp.path().join("real"))
                .unwrap()
                .display()
                .to_string()
        );
        let link_entries = entries(&link_only);
        assert_eq!(link_entries.len(), 1);
        assert_eq!(link_entries[0].1, EntryType::Symlink);
        let followed_names: Vec<_> = entries(&followed).into_iter().map(|e| e.0).collect();
        assert_eq!(followed_names, vec!["alias/", "alias/f"]);
    }

    #[test]
    fn long_names_and_link_targets_survive() {
        let temp = tempfile::tempdir().unwrap();
        let long = "n".repeat(150);
        let dir = temp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(&long), b"payload").unwrap();
        symlink("t".repeat(120), dir.join("l")).unwrap();
        let mut out = Vec::new();

        write_path_archive(dir.to_str().unwrap(), &mut out).unwrap();

        let found = entries(&out);
        assert!(found
            .iter()
            .any(|(p, _, _, d)| *p == format!("d/{long}") && d == b"payload"));
        assert!(found
            .iter()
            .any(|(p, _, l, _)| p == "d/l" && *l == "t".repeat(120)));
    }

    #[test]
    fn whiteout_names_follow_the_image_spec() {
        assert_eq!(whiteout_name(b"etc/passwd", None), b"etc/.wh.passwd");
        assert_eq!(whiteout_name(b"top", None), b".wh.top");
        assert_eq!(
            whiteout_name(b"var/cache/", Some(OPAQUE_MARKER)),
            b"var/cache/.wh..wh..opq"
        );
    }

    #[test]
    fn stat_path_missing_is_not_found() {
        let err = stat_path("/nonexistent/berth/path").unwrap_err();
        assert!(matches!(err, ArchiveError::NotFound(_)), "{err:?}");
        let err = stat_path("relative").unwrap_err();
        assert!(matches!(err, ArchiveError::BadPath(_)), "{err:?}");
    }

    #[test]
    fn extract_archive_round_trips_modes_and_contents() {
        let temp = tempfile::tempdir().unwrap();
        let source = temp.path().join("src");
        fs::create_dir_all(source.join("deep")).unwrap();
        fs::write(source.join("deep/run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(
            source.join("deep/run.sh"),
            fs::Permissions::from_mode(0o751),
        )
        .unwrap();
        let mut archive = Vec::new();
        write_path_archive(source.to_str().unwrap(), &mut archive).unwrap();
        let target = temp.path().join("dst");
        fs::create_dir(&target).unwrap();

        let count = extract_archive(
            target.to_str().unwrap(),
            &archive[..],
            ExtractOptions::default(),
        )
        .unwrap();

        assert_eq!(count, 3);
        let copied = target.join("src/deep/run.sh");
        assert_eq!(fs::read(&copied).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::metadata(&copied).unwrap().mode() & 0o7777, 0o751);
    }

    #[test]
    fn extract_archive_into_a_file_is_not_a_directory() {
        let temp = tempfile::tempdir().unwrap();
        let file = temp.path().join("f");
        fs::write(&file, b"").unwrap();

        let err = extract_archive(file.to_str().unwrap(), &[][..], ExtractOptions::default())
            .unwrap_err();

        assert!(matches!(err, ArchiveError::NotADirectory), "{err:?}");
    }

    #[test]
    fn extract_archive_refuses_to_replace_a_directory_when_asked() {
        let temp = tempfile::tempdir().unwrap();
        let source = temp.path().join("src");
        fs::create_dir(&source).unwrap();
        fs::write(source.join("x"), b"file").unwrap();
        let mut archive = Vec::new();
        write_path_archive(source.join("x").to_str().unwrap(), &mut archive).unwrap();
        let target = temp.path().join("dst");
        fs::create_dir_all(target.join("x")).unwrap();
        let options = ExtractOptions {
            no_overwrite_dir_non_dir: true,
            owner: None,
        };

        let err = extract_archive(target.to_str().unwrap(), &archive[..], options).unwrap_err();

        assert!(
            matches!(
                err,
                ArchiveError::Overwrite {
                    existing: "directory",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(target.join("x").is_dir());
    }

    #[test]
    fn extract_archive_refuses_entries_escaping_the_destination() {
        let temp = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(EntryType::Regular);
        set_field(&mut header.as_old_mut().name, b"../escape");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        let archive = builder.into_inner().unwrap();
        let target = temp.path().join("dst");
        fs::create_dir(&target).unwrap();

        let err = extract_archive(
            target.to_str().unwrap(),
            &archive[..],
            ExtractOptions::default(),
        )
        .unwrap_err();

        assert!(matches!(err, ArchiveError::BadArchive(_)), "{err:?}");
        assert!(!temp.path().join("escape").exists());
    }
}
