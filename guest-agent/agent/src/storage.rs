//! The storage root on the guest's data disk: mounting the disk at boot, listing and measuring
//! what it holds, trimming it, filling fresh volumes (copy-up) and mounting the host's
//! virtio-fs shares.
//!
//! The data disk is a sparse raw file on the host, formatted ext4 there and attached as the
//! first virtio-blk device (`/dev/vda`). It is mounted with `discard`, so blocks freed in the
//! guest go back to the host file at once; [`do_trim`] (`FITRIM`) catches what online discard
//! missed. Without the disk (an older host, a VM started by hand) the storage root stays on
//! the root tmpfs and everything still works, only nothing survives the VM.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use agent_protocol::{CopyUp, DirSizes, DiskSpace, Share, StorageListing};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use thiserror::Error;

/// The data disk: the first virtio-blk device.
pub const DATA_DISK: &str = "/dev/vda";
/// How long the agent waits for the disk's device node to appear at boot.
const DISK_WAIT: Duration = Duration::from_secs(3);
/// Where read-only views of an image's layers are mounted for copy-up.
const COPY_UP_DIR: &str = "/run/berth/copy-up";
/// Shares are mounted below this directory only.
pub const SHARES_DIR: &str = "/run/berth/shares";
/// `FITRIM` from `<linux/fs.h>`: `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: libc::c_ulong = 0xc018_5879;

/// Why a storage operation failed.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{0} is not a normalised absolute path below the storage root")]
    OutsideStorage(PathBuf),
    #[error("{0} is not a normalised absolute path")]
    BadPath(PathBuf),
    #[error("share tag {0:?} is empty or holds characters other than [A-Za-z0-9_-]")]
    BadTag(String),
    #[error("{0} is not a directory below {SHARES_DIR}")]
    BadMountPoint(PathBuf),
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot {op} {path}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl StorageError {
    /// Whether the caller asked for something invalid (as opposed to a fault in the guest).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(
            self,
            Self::OutsideStorage(_) | Self::BadPath(_) | Self::BadTag(_) | Self::BadMountPoint(_)
        )
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

fn sys_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> StorageError + 'a {
    move |source| StorageError::Sys {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Whether `path` is absolute, has only normal components and lies strictly below `root`.
pub fn is_below(root: &Path, path: &Path) -> bool {
    let below = path
        .strip_prefix(root)
        .is_ok_and(|rest| !rest.as_os_str().is_empty());
    path.is_absolute() && below && is_normal(path)
}

/// Whether `path` is absolute and has no `.`/`..` components.
fn is_normal(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Mounts the data disk on `root`, if the VM has one. Returns whether it did; a VM without a
/// disk keeps its storage on the root tmpfs.
pub fn mount_data_disk(root: &Path) -> Result<bool, StorageError> {
    let disk = Path::new(DATA_DISK);
    let deadline = Instant::now() + DISK_WAIT;
    while !disk.exists() {
        if Instant::now() > deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
    fs::create_dir_all(root).map_err(io_error("create", root))?;
    // `discard`: blocks freed in the guest are returned to the host's sparse file at once.
    mount(
        Some(disk),
        root,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        Some("discard"),
    )
    .map_err(sys_error("mount the data disk on", root))?;
    Ok(true)
}

/// What the storage root holds.
pub fn do_list_storage(root: &Path) -> Result<StorageListing, StorageError> {
    let names = |dir: &str| -> Result<Vec<String>, StorageError> {
        let path = root.join(dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StorageError::Io {
                    op: "list",
                    path,
                    source,
                })
            }
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &path))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    };
    let layers = names("layers")?
        .into_iter()
        .filter(|name| !name.ends_with(".partial"))
        .collect();
    Ok(StorageListing {
        layers,
        containers: names("containers")?,
        volumes: names("volumes")?,
        disk: disk_space(root)?,
    })
}

fn disk_space(root: &Path) -> Result<DiskSpace, StorageError> {
    let stat = nix::sys::statfs::statfs(root).map_err(sys_error("statfs", root))?;
    let vfs = nix::sys::statvfs::statvfs(root).map_err(sys_error("statvfs", root))?;
    let fragment = vfs.fragment_size();
    Ok(DiskSpace {
        total_bytes: vfs.blocks().saturating_mul(fragment),
        available_bytes: vfs.blocks_available().saturating_mul(fragment),
        persistent: stat.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC,
    })
}

/// The allocated size of everything below each of `paths` (each below `root`), as `du` counts
/// it: hard links once, not crossing into other filesystems.
pub fn do_measure_dirs(root: &Path, paths: &[PathBuf]) -> Result<DirSizes, StorageError> {
    for path in paths {
        if !is_below(root, path) {
            return Err(StorageError::OutsideStorage(path.clone()));
        }
    }
    let mut bytes = Vec::with_capacity(paths.len());
    for path in paths {
        let mut seen = HashSet::new();
        bytes.push(allocated(path, None, &mut seen));
    }
    Ok(DirSizes { bytes })
}

/// Bytes allocated below `path`; unreadable entries count as 0 (sizes are advisory).
fn allocated(path: &Path, device: Option<u64>, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if device.is_some_and(|d| d != meta.dev()) || !seen.insert((meta.dev(), meta.ino())) {
        return 0;
    }
    let mut total = meta.blocks().saturating_mul(512);
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                total = total.saturating_add(allocated(&entry.path(), Some(meta.dev()), seen));
            }
        }
    }
    total
}

/// Asks the filesystem under `root` to discard its free blocks (`fstrim`). Returns the bytes
/// the kernel reports as trimmed.
pub fn do_trim(root: &Path) -> Result<u64, StorageError> {
    #[repr(C)]
    struct FstrimRange {
        start: u64,
        len: u64,
        minlen: u64,
    }
    let dir = fs::File::open(root).map_err(io_error("open", root))?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and writes one `struct fstrim_range`, which `range` is (same layout,
    // #[repr(C)]), and the descriptor is open for the duration of the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            FITRIM,
            &mut range as *mut FstrimRange,
        )
    };
    if rc < 0 {
        return Err(StorageError::Io {
            op: "trim",
            path: root.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(range.len)
}

/// Mounts each virtio-fs share on its mount point unless something is mounted there already.
pub fn do_mount_shares(shares: &[Share]) -> Result<(), StorageError> {
    for share in shares {
        let tag_ok = !share.tag.is_empty()
            && share
                .tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !tag_ok {
            return Err(StorageError::BadTag(share.tag.clone()));
        }
        if !is_below(Path::new(SHARES_DIR), &share.mount_point) {
            return Err(StorageError::BadMountPoint(share.mount_point.clone()));
        }
    }
    for share in shares {
        if is_mount_point(&share.mount_point) {
            continue;
        }
        fs::create_dir_all(&share.mount_point).map_err(io_error("create", &share.mount_point))?;
        mount(
            Some(share.tag.as_str()),
            &share.mount_point,
            Some("virtiofs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(sys_error("mount a virtio-fs share on", &share.mount_point))?;
    }
    Ok(())
}

/// Raises inotify events in the guest on host files that changed under a share: each path
/// that exists gets its mode set to what it is (`IN_ATTRIB`) and, for a regular file, an
/// open for writing and a close (`IN_CLOSE_WRITE`) that writes nothing; a path that is gone
/// has its parent touched the same way, so watchers of the directory rescan. Errors on single
/// paths are ignored: the file may change again under us.
pub fn do_notify(paths: &[PathBuf]) -> Result<(), StorageError> {
    for path in paths {
        if !is_below(Path::new(SHARES_DIR), path) {
            return Err(StorageError::BadMountPoint(path.clone()));
        }
    }
    for path in paths {
        let target = match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => continue,
            Ok(meta) => Some((path.as_path(), meta)),
            Err(_) => path
                .parent()
                .filter(|parent| is_below(Path::new(SHARES_DIR), parent))
                .and_then(|parent| fs::metadata(parent).ok().map(|m| (parent, m))),
        };
        let Some((target, meta)) = target else {
            continue;
        };
        let _ = fs::set_permissions(target, fs::Permissions::from_mode(meta.mode() & 0o7777));
        if meta.is_file() {
            let _ = fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(target);
        }
    }
    Ok(())
}

/// Whether something is mounted at `path` (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    let (Ok(meta), Some(Ok(parent))) = (fs::metadata(path), path.parent().map(fs::metadata)) else {
        return false;
    };
    meta.dev() != parent.dev()
}

/// Fills `request.volume_dir` with what the image holds at `request.container_path`, if the
/// volume is empty and the image has a directory there (Docker's copy-up of a new volume).
pub fn do_copy_up(root: &Path, request: &CopyUp) -> Result<(), StorageError> {
    if !is_below(root, &request.volume_dir) {
        return Err(StorageError::OutsideStorage(request.volume_dir.clone()));
    }
    if !is_normal(&request.container_path) {
        return Err(StorageError::BadPath(request.container_path.clone()));
    }
    for dir in &request.lower_dirs {
        if !is_below(root, dir) {
            return Err(StorageError::OutsideStorage(dir.clone()));
        }
    }
    let empty = fs::read_dir(&request.volume_dir)
        .map_err(io_error("read", &request.volume_dir))?
        .next()
        .is_none();
    if !empty || request.lower_dirs.is_empty() {
        return Ok(());
    }
    let relative = request
        .container_path
        .strip_prefix("/")
        .unwrap_or(&request.container_path);
    if let [only] = request.lower_dirs.as_slice() {
        // One layer needs no overlay (and overlayfs wants two lowers when it has no upper).
        return copy_dir_contents(&only.join(relative), &request.volume_dir);
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let view = Path::new(COPY_UP_DIR).join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
    fs::create_dir_all(&view).map_err(io_error("create", &view))?;
    let lowers = request
        .lower_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    mount(
        Some("overlay"),
        &view,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(format!("lowerdir={lowers}").as_str()),
    )
    .map_err(sys_error("mount the image's layers on", &view))?;
    let copied = copy_dir_contents(&view.join(relative), &request.volume_dir);
    let _ = umount2(&view, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&view);
    copied
}

/// Copies what `source` holds into `target`, keeping owners, modes, times and symlinks, and
/// gives `target` the owner and mode of `source`. A `source` that is missing or not a
/// directory (through no symlink) copies nothing.
fn copy_dir_contents(source: &Path, target: &Path) -> Result<(), StorageError> {
    match fs::symlink_metadata(source) {
        Ok(meta) if meta.is_dir() => {
            copy_children(source, target)?;
            copy_attributes(&meta, target)
        }
        _ => Ok(()),
    }
}

fn copy_children(source: &Path, target: &Path) -> Result<(), StorageError> {
    for entry in fs::read_dir(source).map_err(io_error("read", source))? {
        let entry = entry.map_err(io_error("read", source))?;
        let from = entry.path();
        let to = target.join(entry.file_name());
        let meta = fs::symlink_metadata(&from).map_err(io_error("stat", &from))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            fs::create_dir(&to).map_err(io_error("create", &to))?;
            copy_children(&from, &to)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&from).map_err(io_error("read the link", &from))?;
            symlink(&link, &to).map_err(io_error("create the link", &to))?;
        } else if kind.is_file() {
            fs::copy(&from, &to).map_err(io_error("copy", &to))?;
        } else {
            let mode = nix::sys::stat::Mode::from_bits_truncate(meta.mode());
            let sflag = nix::sys::stat::SFlag::from_bits_truncate(meta.mode());
            nix::sys::stat::mknod(&to, sflag, mode, meta.rdev())
                .map_err(sys_error("create the node", &to))?;
        }
        copy_attributes(&meta, &to)?;
    }
    Ok(())
}

fn copy_attributes(meta: &fs::Metadata, to: &Path) -> Result<(), StorageError> {
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_error("chown", to))?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_error("chmod", to))?;
    }
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(None, to, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(sys_error("set the times of", to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_below_dot_dot_is_refused() {
        assert!(!is_below(
            Path::new("/r"),
            Path::new("/r/volumes/../../etc")
        ));
    }

    #[test]
    fn is_below_root_itself_is_refused() {
        assert!(!is_below(Path::new("/r"), Path::new("/r")));
    }

    #[test]
    fn is_below_child_is_accepted() {
        assert!(is_below(Path::new("/r"), Path::new("/r/volumes/v/_data")));
    }

    #[test]
    fn list_storage_skips_partial_layers_and_names_volumes() {
        let root = tempfile::tempdir().unwrap();
        for dir in [
            "layers/aa",
            "layers/bb.partial",
            "containers/c1",
            "volumes/data",
        ] {
            fs::create_dir_all(root.path().join(dir)).unwrap();
        }

        let listing = do_list_storage(root.path()).unwrap();

        assert_eq!(listing.layers, ["aa"]);
        assert_eq!(listing.containers, ["c1"]);
        assert_eq!(listing.volumes, ["data"]);
    }

    #[test]
    fn list_storage_empty_root_lists_nothing() {
        let root = tempfile::tempdir().unwrap();

        let listing = do_list_storage(root.path()).unwrap();

        assert!(listing.layers.is_empty() && listing.volumes.is_empty());
    }

    #[test]
    fn measure_dirs_counts_file_blocks_and_missing_as_zero() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("volumes/v");
        fs::create_dir_all(&dir).unwrap();
        // 64 KiB of non-zero data: allocated on every filesystem the tests run on.
        fs::write(dir.join("f"), vec![7u8; 64 << 10]).unwrap();

        let sizes = do_measure_dirs(root.path(), &[dir, root.path().join("gone")]).unwrap();

        assert!(sizes.bytes[0] >= 64 << 10, "{sizes:?}");
        assert_eq!(sizes.bytes[1], 0);
    }

    #[test]
    fn measure_dirs_outside_root_is_refused() {
        let root = tempfile::tempdir().unwrap();

        let result = do_measure_dirs(root.path(), &[PathBuf::from("/etc")]);

        assert!(matches!(result, Err(StorageError::OutsideStorage(_))));
    }

    #[test]
    fn copy_up_single_layer_copies_tree_into_empty_volume() {
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layers/l1");
        fs::create_dir_all(layer.join("data/sub")).unwrap();
        fs::write(layer.join("data/sub/file"), "seed").unwrap();
        symlink("sub/file", layer.join("data/link")).unwrap();
        let volume = root.path().join("volumes/v/_data");
        fs::create_dir_all(&volume).unwrap();

        do_copy_up(
            root.path(),
            &CopyUp {
                lower_dirs: vec![layer],
                container_path: "/data".into(),
                volume_dir: volume.clone(),
            },
        )
        .unwrap();

        assert_eq!(fs::read_to_string(volume.join("sub/file")).unwrap(), "seed");
        assert_eq!(
            fs::read_link(volume.join("link")).unwrap(),
            Path::new("sub/file")
        );
    }

    #[test]
    fn copy_up_volume_with_files_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let layer = root.path().join("layers/l1");
        fs::create_dir_all(layer.join("data")).unwrap();
        fs::write(layer.join("data/file"), "seed").unwrap();
        let volume = root.path().join("volumes/v/_data");
        fs::create_dir_all(&volume).unwrap();
        fs::write(volume.join("mine"), "kept").unwrap();

        do_copy_up(
            root.path(),
            &CopyUp {
                lower_dirs: vec![layer],
                container_path: "/data".into(),
                volume_dir: volume.clone(),
            },
        )
        .unwrap();

        assert!(!volume.join("file").exists());
    }

    #[test]
    fn notify_outside_the_shares_is_refused() {
        let result = do_notify(&[PathBuf::from("/etc/passwd")]);

        assert!(matches!(result, Err(StorageError::BadMountPoint(_))));
    }

    #[test]
    fn mount_shares_bad_tag_is_refused() {
        let result = do_mount_shares(&[Share {
            tag: "a,b".into(),
            mount_point: "/run/berth/shares/a".into(),
        }]);

        assert!(matches!(result, Err(StorageError::BadTag(_))));
    }
}
