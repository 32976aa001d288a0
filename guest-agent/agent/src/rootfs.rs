//! Moving PID 1 off the initramfs onto a tmpfs root, before anything else runs.
//!
//! The kernel unpacks the initramfs into `rootfs`, the one filesystem `pivot_root(2)` refuses
//! to move away from (EINVAL). Every container start pivots its root, so as long as the
//! agent's own root is `rootfs`, no container can start. The classic answer (`switch_root`):
//! mount a tmpfs, copy what the image holds into it (only the agent), move it over `/`, chroot
//! into it and re-exec, so the agent and everything it starts live on an ordinary mount.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use thiserror::Error;

/// Where the new root is assembled before it is moved over `/`.
const NEW_ROOT: &str = "/berth-root";
/// Present only on the new root: a re-executed agent knows it has already switched.
const MARKER: &str = ".berth-root";
/// The agent inside the image and on the new root.
const INIT: &str = "init";
/// Mount points the rest of early init expects, with their modes.
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// Why the agent could not leave the initramfs.
#[derive(Debug, Error)]
pub enum RootfsError {
    #[error("cannot {step}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {step}")]
    Sys {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> RootfsError {
    move |source| RootfsError::Io { step, source }
}

fn sys(step: &'static str) -> impl FnOnce(nix::Error) -> RootfsError {
    move |source| RootfsError::Sys { step, source }
}

/// Moves onto a tmpfs root and re-executes the agent there. Returns `Ok(())` when already on
/// it; otherwise returns only on failure (the agent then carries on from the initramfs, where
/// everything but containers works).
pub fn leave_initramfs() -> Result<(), RootfsError> {
    if Path::new("/").join(MARKER).exists() {
        return Ok(());
    }
    let new_root = Path::new(NEW_ROOT);
    fs::create_dir_all(new_root).map_err(io("create the new root directory"))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(sys("mount a tmpfs for the new root"))?;
    for (dir, mode) in DIRS {
        let path = new_root.join(dir);
        fs::create_dir(&path).map_err(io("create a mount point on the new root"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
            .map_err(io("set a mount point's mode"))?;
    }
    let init = new_root.join(INIT);
    fs::copy(Path::new("/").join(INIT), &init).map_err(io("copy the agent to the new root"))?;
    fs::write(new_root.join(MARKER), b"").map_err(io("mark the new root"))?;
    // The initramfs copy is no longer needed; the running image stays mapped until the exec.
    fs::remove_file(Path::new("/").join(INIT)).map_err(io("free the initramfs copy"))?;

    nix::unistd::chdir(new_root).map_err(sys("enter the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(sys("move the new root over /"))?;
    nix::unistd::chroot(".").map_err(sys("chroot into the new root"))?;
    nix::unistd::chdir("/").map_err(sys("enter /"))?;

    let path = CString::new(format!("/{INIT}")).map_err(|_| RootfsError::Io {
        step: "name the agent",
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|arg| CString::new(arg.into_encoded_bytes()).ok())
        .collect();
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(key, value)| {
            let mut pair = key.into_encoded_bytes();
            pair.push(b'=');
            pair.extend(value.into_encoded_bytes());
            CString::new(pair).ok()
        })
        .collect();
    let err = nix::unistd::execve(&path, &args, &env)
        .err()
        .unwrap_or(nix::Error::UnknownErrno);
    Err(RootfsError::Sys {
        step: "re-execute the agent on the new root",
        source: err,
    })
}
