//! The privileged calls that build a container's filesystem view, behind the [`Syscall`] trait so
//! mount planning can be unit-tested without root: [`LinuxSyscall`] makes the real calls,
//! [`RecordingSyscall`] records them (the approach of youki's `syscall/`).

use std::cell::RefCell;
use std::fs::OpenOptions;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use thiserror::Error;

/// A failed privileged call.
#[derive(Debug, Error)]
#[error("cannot {op} {path}")]
pub struct SyscallError {
    /// The operation.
    pub op: &'static str,
    /// The path it was applied to.
    pub path: String,
    /// The cause.
    #[source]
    pub source: Errno,
}

impl SyscallError {
    fn new(op: &'static str, path: &Path, source: impl Into<Errno>) -> Self {
        Self {
            op,
            path: path.display().to_string(),
            source: source.into(),
        }
    }
}

fn errno_of(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// What is at a path, as far as mount planning cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A directory.
    Dir,
    /// Anything else.
    File,
}

/// Privileged filesystem calls made while building a container's root.
pub trait Syscall: std::fmt::Debug {
    /// `mount(2)`.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SyscallError>;
    /// `umount2(2)`.
    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), SyscallError>;
    /// Makes `new_root` the root: `pivot_root(new, new)` then detaches the old root, as runc
    /// does, so no directory for the old root is needed.
    fn pivot_root(&self, new_root: &Path) -> Result<(), SyscallError>;
    /// `mkdir -p` with `mode` for created directories.
    fn mkdir_all(&self, path: &Path, mode: u32) -> Result<(), SyscallError>;
    /// Creates an empty file if nothing is at `path` (a bind-mount target).
    fn create_file(&self, path: &Path) -> Result<(), SyscallError>;
    /// `mknod(2)`; the mode is applied exactly (no umask).
    fn mknod(&self, path: &Path, kind: SFlag, mode: u32, dev: u64) -> Result<(), SyscallError>;
    /// `symlink(2)`.
    fn symlink(&self, target: &Path, link: &Path) -> Result<(), SyscallError>;
    /// `sethostname(2)`.
    fn sethostname(&self, name: &str) -> Result<(), SyscallError>;
    /// What is at `path` (following symlinks), or `None` when nothing is.
    fn file_kind(&self, path: &Path) -> Option<FileKind>;
}

/// The real calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SyscallError> {
        nix::mount::mount(source, target, fstype, flags, data)
            .map_err(|e| SyscallError::new("mount", target, e))
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), SyscallError> {
        nix::mount::umount2(target, flags).map_err(|e| SyscallError::new("unmount", target, e))
    }

    fn pivot_root(&self, new_root: &Path) -> Result<(), SyscallError> {
        let err = |op, e| SyscallError::new(op, new_root, e);
        nix::unistd::chdir(new_root).map_err(|e| err("chdir to", e))?;
        nix::unistd::pivot_root(".", ".").map_err(|e| err("pivot_root to", e))?;
        // The old root is now stacked under the new one at "/": detach it.
        nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(|e| err("detach old root of", e))?;
        nix::unistd::chdir("/").map_err(|e| err("chdir after pivot to", e))
    }

    fn mkdir_all(&self, path: &Path, mode: u32) -> Result<(), SyscallError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
            .map_err(|e| SyscallError::new("create directory", path, errno_of(e)))
    }

    fn create_file(&self, path: &Path) -> Result<(), SyscallError> {
        if path.symlink_metadata().is_ok() {
            return Ok(());
        }
        if let Some(parent) = path.parent() {
            self.mkdir_all(parent, 0o755)?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map(drop)
            .map_err(|e| SyscallError::new("create file", path, errno_of(e)))
    }

    fn mknod(&self, path: &Path, kind: SFlag, mode: u32, dev: u64) -> Result<(), SyscallError> {
        nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(mode), dev)
            .map_err(|e| SyscallError::new("create device node", path, e))?;
        // mknod applies the umask; device nodes need their exact mode.
        nix::sys::stat::fchmodat(
            None,
            path,
            Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| SyscallError::new("chmod", path, e))
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), SyscallError> {
        std::os::unix::fs::symlink(target, link)
            .map_err(|e| SyscallError::new("create symlink", link, errno_of(e)))
    }

    fn sethostname(&self, name: &str) -> Result<(), SyscallError> {
        nix::unistd::sethostname(name)
            .map_err(|e| SyscallError::new("set hostname", Path::new(name), e))
    }

    fn file_kind(&self, path: &Path) -> Option<FileKind> {
        let meta = std::fs::metadata(path).ok()?;
        Some(if meta.is_dir() {
            FileKind::Dir
        } else {
            FileKind::File
        })
    }
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyscallCall {
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    Umount2 {
        target: PathBuf,
        flags: MntFlags,
    },
    PivotRoot {
        new_root: PathBuf,
    },
    MkdirAll {
        path: PathBuf,
        mode: u32,
    },
    CreateFile {
        path: PathBuf,
    },
    Mknod {
        path: PathBuf,
        kind: SFlag,
        mode: u32,
        dev: u64,
    },
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    Sethostname {
        name: String,
    },
}

/// A fake that records every call and succeeds. `file_kind` answers from [`Self::existing`];
/// anything not listed does not exist.
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    calls: RefCell<Vec<SyscallCall>>,
    /// Paths that exist, for `file_kind`.
    pub existing: Vec<(PathBuf, FileKind)>,
}

impl RecordingSyscall {
    /// A fake where exactly the given paths exist.
    pub fn with_existing(existing: Vec<(PathBuf, FileKind)>) -> Self {
        Self {
            calls: RefCell::default(),
            existing,
        }
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<SyscallCall> {
        self.calls.borrow().clone()
    }

    fn record(&self, call: SyscallCall) -> Result<(), SyscallError> {
        self.calls.borrow_mut().push(call);
        Ok(())
    }
}

impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), SyscallError> {
        self.record(SyscallCall::Mount {
            source: source.map(Path::to_path_buf),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            flags,
            data: data.map(str::to_string),
        })
    }

    fn umount2(&self, target: &Path, flags: MntFlags) -> Result<(), SyscallError> {
        self.record(SyscallCall::Umount2 {
            target: target.to_path_buf(),
            flags,
        })
    }

    fn pivot_root(&self, new_root: &Path) -> Result<(), SyscallError> {
        self.record(SyscallCall::PivotRoot {
            new_root: new_root.to_path_buf(),
        })
    }

    fn mkdir_all(&self, path: &Path, mode: u32) -> Result<(), SyscallError> {
        self.record(SyscallCall::MkdirAll {
            path: path.to_path_buf(),
            mode,
        })
    }

    fn create_file(&self, path: &Path) -> Result<(), SyscallError> {
        self.record(SyscallCall::CreateFile {
            path: path.to_path_buf(),
        })
    }

    fn mknod(&self, path: &Path, kind: SFlag, mode: u32, dev: u64) -> Result<(), SyscallError> {
        self.record(SyscallCall::Mknod {
            path: path.to_path_buf(),
            kind,
            mode,
            dev,
        })
    }

    fn symlink(&self, target: &Path, link: &Path) -> Result<(), SyscallError> {
        self.record(SyscallCall::Symlink {
            target: target.to_path_buf(),
            link: link.to_path_buf(),
        })
    }

    fn sethostname(&self, name: &str) -> Result<(), SyscallError> {
        self.record(SyscallCall::Sethostname {
            name: name.to_string(),
        })
    }

    fn file_kind(&self, path: &Path) -> Option<FileKind> {
        self.existing
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, kind)| *kind)
    }
}
