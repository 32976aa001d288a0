//! Mount planning for a container's root filesystem: the overlayfs root, the spec's mounts
//! (`/proc`, `/sys`, `/dev` and its standard nodes, `/dev/pts`, `/dev/shm`, `/dev/mqueue`, the
//! cgroup filesystem, binds), `pivot_root`, then Docker's masked and read-only paths and a
//! read-only root. Every privileged call goes through [`Syscall`], so the plan is unit-tested
//! with the recording fake.
//!
//! Mount destinations come from the image's point of view and the image is untrusted: they are
//! resolved with [`secure_join`], which follows symlinks as if the rootfs were `/`, so a symlink
//! in the image cannot point a mount at the host.

use std::path::{Component, Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::stat::SFlag;
use oci_spec::runtime::Mount;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::syscall::{FileKind, Syscall, SyscallError};

/// Errors from building the root filesystem.
#[derive(Debug, Error)]
pub enum MountError {
    /// A privileged call failed.
    #[error("mount setup failed")]
    Syscall(#[from] SyscallError),
    /// A mount has no usable destination.
    #[error("mount destination {0:?} must be an absolute path")]
    RelativeDestination(PathBuf),
    /// A bind mount source is missing.
    #[error("bind mount source {0:?} does not exist")]
    MissingSource(PathBuf),
    /// Symlinks nest too deep while resolving a path in the rootfs.
    #[error("too many levels of symlinks resolving {0:?} in the rootfs")]
    SymlinkLoop(PathBuf),
}

/// The overlayfs layers of a rootfs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayConfig {
    /// Lower (read-only) layer directories, top-most first, as overlayfs's `lowerdir` wants.
    pub lower_dirs: Vec<PathBuf>,
    /// The writable upper directory; `None` for a read-only overlay of the lowers alone.
    pub upper_dir: Option<PathBuf>,
    /// The overlayfs work directory, on the same filesystem as `upper_dir`.
    pub work_dir: Option<PathBuf>,
}

/// Everything needed to build a container's root, independent of how the calls are made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsPlan {
    /// Where the root is assembled (the overlay mount point), an existing directory.
    pub rootfs: PathBuf,
    /// The overlay to mount at `rootfs`; `None` when `rootfs` is already prepared.
    pub overlay: Option<OverlayConfig>,
    /// The spec's mounts, in order.
    pub mounts: Vec<Mount>,
    /// Paths hidden from the container (`/dev/null` over files, an empty read-only tmpfs over
    /// directories).
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
    /// Remount the root read-only at the end.
    pub readonly_root: bool,
}

/// A device node every container gets in its `/dev` (the OCI runtime spec's default devices).
struct DefaultDevice {
    name: &'static str,
    major: u64,
    minor: u64,
}

const DEFAULT_DEVICES: &[DefaultDevice] = &[
    DefaultDevice {
        name: "null",
        major: 1,
        minor: 3,
    },
    DefaultDevice {
        name: "zero",
        major: 1,
        minor: 5,
    },
    DefaultDevice {
        name: "full",
        major: 1,
        minor: 7,
    },
    DefaultDevice {
        name: "random",
        major: 1,
        minor: 8,
    },
    DefaultDevice {
        name: "urandom",
        major: 1,
        minor: 9,
    },
    DefaultDevice {
        name: "tty",
        major: 5,
        minor: 0,
    },
];

const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
    ("/proc/kcore", "core"),
];

/// Builds the root up to and including `pivot_root`: private propagation, the overlay, every
/// spec mount (with the standard nodes once `/dev` is mounted), then the pivot.
pub fn prepare_rootfs(sys: &dyn Syscall, plan: &RootfsPlan) -> Result<(), MountError> {
    // Nothing we mount may propagate back to the host (or the agent's namespace).
    sys.mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    if let Some(overlay) = &plan.overlay {
        let data = overlay_options(overlay);
        sys.mount(
            Some(Path::new("overlay")),
            &plan.rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(&data),
        )?;
    } else {
        // pivot_root needs a mount point.
        sys.mount(
            Some(&plan.rootfs),
            &plan.rootfs,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
    }
    for mount in &plan.mounts {
        mount_one(sys, &plan.rootfs, mount)?;
    }
    sys.pivot_root(&plan.rootfs)?;
    Ok(())
}

/// Finishes the root after `pivot_root`: masked paths, read-only paths, read-only root.
pub fn finish_rootfs(sys: &dyn Syscall, plan: &RootfsPlan) -> Result<(), MountError> {
    for path in &plan.masked_paths {
        let path = Path::new(path);
        match sys.file_kind(path) {
            None => {}
            Some(FileKind::Dir) => sys.mount(
                Some(Path::new("tmpfs")),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                None,
            )?,
            Some(FileKind::File) => sys.mount(
                Some(Path::new("/dev/null")),
                path,
                None,
                MsFlags::MS_BIND,
                None,
            )?,
        }
    }
    for path in &plan.readonly_paths {
        let path = Path::new(path);
        if sys.file_kind(path).is_none() {
            continue;
        }
        sys.mount(
            Some(path),
            path,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        )?;
        sys.mount(
            Some(path),
            path,
            None,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    if plan.readonly_root {
        sys.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

/// The `data` string of the overlay mount.
pub fn overlay_options(overlay: &OverlayConfig) -> String {
    let lowers: Vec<String> = overlay
        .lower_dirs
        .iter()
        .map(|p| escape_overlay_path(p))
        .collect();
    let mut data = format!("lowerdir={}", lowers.join(":"));
    if let (Some(upper), Some(work)) = (&overlay.upper_dir, &overlay.work_dir) {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            escape_overlay_path(upper),
            escape_overlay_path(work)
        ));
    }
    data
}

/// overlayfs splits `lowerdir` on `:` and options on `,`; both are escaped with `\`.
fn escape_overlay_path(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        if matches!(c, ':' | ',' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Mount flags and the remaining filesystem data of fstab-style options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOptions {
    /// Flags to set.
    pub flags: MsFlags,
    /// Options passed to the filesystem.
    pub data: Vec<String>,
    /// Propagation flags to apply after mounting (`rprivate`, `shared`, ...).
    pub propagation: MsFlags,
}

/// Splits fstab-style options into mount flags and filesystem data, as runc does.
pub fn parse_options(options: &[String]) -> ParsedOptions {
    let mut parsed = ParsedOptions {
        flags: MsFlags::empty(),
        data: Vec::new(),
        propagation: MsFlags::empty(),
    };
    for option in options {
        let (clear, flag) = match option.as_str() {
            "defaults" => (false, MsFlags::empty()),
            "ro" => (false, MsFlags::MS_RDONLY),
            "rw" => (true, MsFlags::MS_RDONLY),
            "suid" => (true, MsFlags::MS_NOSUID),
            "nosuid" => (false, MsFlags::MS_NOSUID),
            "dev" => (true, MsFlags::MS_NODEV),
            "nodev" => (false, MsFlags::MS_NODEV),
            "exec" => (true, MsFlags::MS_NOEXEC),
            "noexec" => (false, MsFlags::MS_NOEXEC),
            "sync" => (false, MsFlags::MS_SYNCHRONOUS),
            "async" => (true, MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (false, MsFlags::MS_DIRSYNC),
            "remount" => (false, MsFlags::MS_REMOUNT),
            "mand" => (false, MsFlags::MS_MANDLOCK),
            "nomand" => (true, MsFlags::MS_MANDLOCK),
            "atime" => (true, MsFlags::MS_NOATIME),
            "noatime" => (false, MsFlags::MS_NOATIME),
            "diratime" => (true, MsFlags::MS_NODIRATIME),
            "nodiratime" => (false, MsFlags::MS_NODIRATIME),
            "bind" => (false, MsFlags::MS_BIND),
            "rbind" => (false, MsFlags::MS_BIND | MsFlags::MS_REC),
            "relatime" => (false, MsFlags::MS_RELATIME),
            "norelatime" => (true, MsFlags::MS_RELATIME),
            "strictatime" => (false, MsFlags::MS_STRICTATIME),
            "nostrictatime" => (true, MsFlags::MS_STRICTATIME),
            other => {
                let propagation = match other {
                    "private" => MsFlags::MS_PRIVATE,
                    "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                    "shared" => MsFlags::MS_SHARED,
                    "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
                    "slave" => MsFlags::MS_SLAVE,
                    "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
                    "unbindable" => MsFlags::MS_UNBINDABLE,
                    "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
                    _ => {
                        parsed.data.push(other.to_string());
                        continue;
                    }
                };
                parsed.propagation |= propagation;
                continue;
            }
        };
        if clear {
            parsed.flags.remove(flag);
        } else {
            parsed.flags.insert(flag);
        }
    }
    parsed
}

fn mount_one(sys: &dyn Syscall, rootfs: &Path, mount: &Mount) -> Result<(), MountError> {
    let destination = mount.destination();
    if !destination.is_absolute() {
        return Err(MountError::RelativeDestination(destination.clone()));
    }
    let target = secure_join(rootfs, destination)?;
    let options = parse_options(mount.options().as_deref().unwrap_or_default());
    let typ = mount.typ().as_deref().unwrap_or("none");
    let is_bind = typ == "bind" || options.flags.contains(MsFlags::MS_BIND);

    if is_bind {
        let source = mount.source().clone().unwrap_or_default();
        match sys.file_kind(&source) {
            None => return Err(MountError::MissingSource(source)),
            Some(FileKind::Dir) => sys.mkdir_all(&target, 0o755)?,
            Some(FileKind::File) => sys.create_file(&target)?,
        }
        let bind_flags = MsFlags::MS_BIND | (options.flags & MsFlags::MS_REC);
        sys.mount(Some(&source), &target, None, bind_flags, None)?;
        // Flags other than MS_BIND|MS_REC are ignored by the first bind: remount to apply them.
        let extra = options.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            sys.mount(
                Some(&source),
                &target,
                None,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None,
            )?;
        }
    } else {
        sys.mkdir_all(&target, 0o755)?;
        // The OCI default spec says "cgroup"; this runtime is cgroup v2 only.
        let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
        let source = mount
            .source()
            .clone()
            .unwrap_or_else(|| PathBuf::from(fstype));
        let data = options.data.join(",");
        let data = (!data.is_empty()).then_some(data.as_str());
        sys.mount(Some(&source), &target, Some(fstype), options.flags, data)?;
    }
    if !options.propagation.is_empty() {
        sys.mount(None, &target, None, options.propagation, None)?;
    }
    if destination == Path::new("/dev") && typ == "tmpfs" {
        create_dev_nodes(sys, &target)?;
    }
    Ok(())
}

/// Creates the standard device nodes and links in a freshly mounted `/dev`.
fn create_dev_nodes(sys: &dyn Syscall, dev: &Path) -> Result<(), MountError> {
    for device in DEFAULT_DEVICES {
        let dev_t = libc::makedev(device.major as u32, device.minor as u32);
        sys.mknod(&dev.join(device.name), SFlag::S_IFCHR, 0o666, dev_t)?;
    }
    for (target, link) in DEV_LINKS {
        sys.symlink(Path::new(target), &dev.join(link))?;
    }
    for dir in ["pts", "shm", "mqueue"] {
        sys.mkdir_all(&dev.join(dir), 0o755)?;
    }
    Ok(())
}

/// Joins `unsafe_path` to `root`, resolving symlinks as if `root` were `/`: the result never
/// leaves `root`, whatever symlinks the tree holds (the semantics of filepath-securejoin).
/// Missing components are taken literally.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> Result<PathBuf, MountError> {
    const MAX_SYMLINKS: usize = 255;
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = unsafe_path
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut followed = 0;
    while let Some(next) = pending.pop() {
        match next.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let candidate = resolved.join(&next);
        let on_disk = root.join(&candidate);
        match std::fs::symlink_metadata(&on_disk) {
            Ok(meta) if meta.file_type().is_symlink() => {
                followed += 1;
                if followed > MAX_SYMLINKS {
                    return Err(MountError::SymlinkLoop(unsafe_path.to_path_buf()));
                }
                let Ok(link) = std::fs::read_link(&on_disk) else {
                    resolved = candidate;
                    continue;
                };
                if link.is_absolute() {
                    resolved = PathBuf::new();
                }
                pending.extend(
                    link.components()
                        .rev()
                        .map(|c| PathBuf::from(c.as_os_str())),
                );
            }
            _ => resolved = candidate,
        }
    }
    Ok(root.join(resolved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::{RecordingSyscall, SyscallCall};

    fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
        let mut m = Mount::default();
        m.set_destination(PathBuf::from(dest));
        m.set_typ(Some(typ.to_string()));
        m.set_source(Some(PathBuf::from(source)));
        m.set_options(Some(options.iter().map(|s| s.to_string()).collect()));
        m
    }

    fn plan(rootfs: &Path, mounts: Vec<Mount>) -> RootfsPlan {
        RootfsPlan {
            rootfs: rootfs.to_path_buf(),
            overlay: Some(OverlayConfig {
                lower_dirs: vec![PathBuf::from("/l/top"), PathBuf::from("/l/base")],
                upper_dir: Some(PathBuf::from("/c/upper")),
                work_dir: Some(PathBuf::from("/c/work")),
            }),
            mounts,
            masked_paths: vec![
                "/proc/kcore".into(),
                "/sys/firmware".into(),
                "/proc/missing".into(),
            ],
            readonly_paths: vec!["/proc/sys".into()],
            readonly_root: true,
        }
    }

    fn mounts_of(calls: &[SyscallCall]) -> Vec<(PathBuf, Option<String>, MsFlags)> {
        calls
            .iter()
            .filter_map(|c| match c {
                SyscallCall::Mount {
                    target,
                    fstype,
                    flags,
                    ..
                } => Some((target.clone(), fstype.clone(), *flags)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn overlay_options_lowers_top_first_with_upper_and_work() {
        let overlay = OverlayConfig {
            lower_dirs: vec![PathBuf::from("/a"), PathBuf::from("/b:c")],
            upper_dir: Some(PathBuf::from("/u")),
            work_dir: Some(PathBuf::from("/w")),
        };

        assert_eq!(
            overlay_options(&overlay),
            "lowerdir=/a:/b\\:c,upperdir=/u,workdir=/w"
        );
    }

    #[test]
    fn parse_options_flags_and_data_separated() {
        let options: Vec<String> = ["nosuid", "ro", "mode=755", "rw", "rprivate", "size=64k"]
            .iter()
            .map(|s| s.to_string())
            .collect();

        let parsed = parse_options(&options);

        assert_eq!(parsed.flags, MsFlags::MS_NOSUID);
        assert_eq!(
            parsed.data,
            vec!["mode=755".to_string(), "size=64k".to_string()]
        );
        assert_eq!(parsed.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
    }

    #[test]
    fn prepare_rootfs_private_overlay_mounts_then_pivot() {
        let root = tempfile::tempdir().expect("tempdir");
        let sys = RecordingSyscall::default();
        let mounts = vec![mount(
            "/proc",
            "proc",
            "proc",
            &["nosuid", "noexec", "nodev"],
        )];

        prepare_rootfs(&sys, &plan(root.path(), mounts)).expect("plan");

        let calls = sys.calls();
        assert!(matches!(&calls[0], SyscallCall::Mount { target, flags, .. }
            if target == Path::new("/") && *flags == MsFlags::MS_REC | MsFlags::MS_PRIVATE));
        assert!(
            matches!(&calls[1], SyscallCall::Mount { fstype: Some(t), data: Some(d), .. }
            if t == "overlay" && d.starts_with("lowerdir=/l/top:/l/base,upperdir="))
        );
        assert!(calls.contains(&SyscallCall::Mount {
            source: Some(PathBuf::from("proc")),
            target: root.path().join("proc"),
            fstype: Some("proc".into()),
            flags: MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
            data: None,
        }));
        assert_eq!(
            calls.last(),
            Some(&SyscallCall::PivotRoot {
                new_root: root.path().to_path_buf()
            })
        );
    }

    #[test]
    fn prepare_rootfs_dev_tmpfs_gets_standard_nodes() {
        let root = tempfile::tempdir().expect("tempdir");
        let sys = RecordingSyscall::default();
        let mounts = vec![mount("/dev", "tmpfs", "tmpfs", &["nosuid", "mode=755"])];

        prepare_rootfs(&sys, &plan(root.path(), mounts)).expect("plan");

        let calls = sys.calls();
        let dev = root.path().join("dev");
        assert!(calls.contains(&SyscallCall::Mknod {
            path: dev.join("null"),
            kind: SFlag::S_IFCHR,
            mode: 0o666,
            dev: libc::makedev(1, 3),
        }));
        assert!(calls.contains(&SyscallCall::Symlink {
            target: PathBuf::from("pts/ptmx"),
            link: dev.join("ptmx"),
        }));
        assert!(calls.contains(&SyscallCall::Symlink {
            target: PathBuf::from("/proc/self/fd/2"),
            link: dev.join("stderr"),
        }));
    }

    #[test]
    fn prepare_rootfs_readonly_bind_remounted_readonly() {
        let root = tempfile::tempdir().expect("tempdir");
        let src = tempfile::tempdir().expect("tempdir");
        let sys = RecordingSyscall::with_existing(vec![(src.path().to_path_buf(), FileKind::Dir)]);
        let source = src.path().to_str().expect("utf-8");
        let mounts = vec![mount("/data", "bind", source, &["rbind", "ro"])];

        prepare_rootfs(&sys, &plan(root.path(), mounts)).expect("plan");

        let target = root.path().join("data");
        let binds: Vec<_> = mounts_of(&sys.calls())
            .into_iter()
            .filter(|(t, _, _)| *t == target)
            .map(|(_, _, f)| f)
            .collect();
        assert_eq!(
            binds,
            vec![
                MsFlags::MS_BIND | MsFlags::MS_REC,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            ]
        );
    }

    #[test]
    fn prepare_rootfs_missing_bind_source_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let sys = RecordingSyscall::default();
        let mounts = vec![mount("/data", "bind", "/nonexistent", &["rbind"])];

        let err = prepare_rootfs(&sys, &plan(root.path(), mounts)).expect_err("refused");

        assert!(matches!(err, MountError::MissingSource(_)));
    }

    #[test]
    fn finish_rootfs_masks_files_with_null_and_dirs_with_tmpfs() {
        let root = tempfile::tempdir().expect("tempdir");
        let sys = RecordingSyscall::with_existing(vec![
            (PathBuf::from("/proc/kcore"), FileKind::File),
            (PathBuf::from("/sys/firmware"), FileKind::Dir),
            (PathBuf::from("/proc/sys"), FileKind::Dir),
        ]);

        finish_rootfs(&sys, &plan(root.path(), vec![])).expect("plan");

        let calls = sys.calls();
        assert!(calls.contains(&SyscallCall::Mount {
            source: Some(PathBuf::from("/dev/null")),
            target: PathBuf::from("/proc/kcore"),
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        }));
        assert!(mounts_of(&calls).contains(&(
            PathBuf::from("/sys/firmware"),
            Some("tmpfs".into()),
            MsFlags::MS_RDONLY
        )));
        assert!(!mounts_of(&calls)
            .iter()
            .any(|(t, _, _)| t == Path::new("/proc/missing")));
        assert!(mounts_of(&calls)
            .iter()
            .any(|(t, _, f)| t == Path::new("/proc/sys")
                && f.contains(MsFlags::MS_RDONLY | MsFlags::MS_REMOUNT)));
        assert_eq!(
            mounts_of(&calls).last(),
            Some(&(
                PathBuf::from("/"),
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY
            ))
        );
    }

    #[test]
    fn secure_join_absolute_symlink_stays_in_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/", root.path().join("escape")).expect("symlink");

        let joined = secure_join(root.path(), Path::new("/escape/etc/passwd")).expect("join");

        assert_eq!(joined, root.path().join("etc/passwd"));
    }

    #[test]
    fn secure_join_dotdot_symlink_clamped_to_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join("etc")).expect("etc");
        std::os::unix::fs::symlink("../../../..", root.path().join("etc/up")).expect("symlink");

        let joined = secure_join(root.path(), Path::new("/etc/up/hostname")).expect("join");

        assert_eq!(joined, root.path().join("hostname"));
    }

    #[test]
    fn secure_join_symlink_loop_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("b", root.path().join("a")).expect("symlink");
        std::os::unix::fs::symlink("a", root.path().join("b")).expect("symlink");

        assert!(matches!(
            secure_join(root.path(), Path::new("/a/x")),
            Err(MountError::SymlinkLoop(_))
        ));
    }
}
