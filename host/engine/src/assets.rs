//! Where Berth finds the guest kernel and initramfs, and where a VM keeps its runtime files.
//!
//! Lookup order for the assets directory: `BERTH_ASSETS_DIR`; `../berth` beside the running
//! executable (`target/release/berth` finds `target/berth`, where the build scripts put them);
//! `/usr/local/share/berth`. `BERTH_KERNEL` and `BERTH_INITRAMFS` override single files.

use std::path::{Path, PathBuf};

/// Kernel file name in the assets directory (uncompressed, PVH-bootable).
pub const KERNEL_FILE: &str = "vmlinux";
/// Initramfs file name in the assets directory.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// The `uname -r` of the built kernel, written by `kernel-config/build.sh`.
pub const KERNEL_RELEASE_FILE: &str = "kernel.release";

/// Paths of the guest's boot assets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    /// The directory they were found in.
    pub dir: PathBuf,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
}

impl Assets {
    /// Locates the assets as the module documentation describes.
    pub fn discover() -> Self {
        Self::in_dir(assets_dir())
    }

    /// The assets in `dir`, still honouring the single-file overrides.
    pub fn in_dir(dir: PathBuf) -> Self {
        let kernel = std::env::var_os("BERTH_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join(KERNEL_FILE));
        let initramfs = std::env::var_os("BERTH_INITRAMFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join(INITRAMFS_FILE));
        Self {
            dir,
            kernel,
            initramfs,
        }
    }

    /// The release string of the kernel we built, if recorded beside it.
    pub fn kernel_release(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(KERNEL_RELEASE_FILE))
            .ok()
            .map(|s| s.trim().to_string())
    }
}

fn assets_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_ASSETS_DIR") {
        return PathBuf::from(dir);
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .and_then(|bin| bin.parent().map(|p| p.join("berth")));
    match beside_exe {
        Some(dir) if dir.join(KERNEL_FILE).exists() => dir,
        _ => PathBuf::from("/usr/local/share/berth"),
    }
}

/// Where a VM keeps its sockets, console log and state: `BERTH_VM_DIR`, else
/// `$XDG_RUNTIME_DIR/berth/vm`, else `/run/berth/vm` for root and `/tmp/berth-<uid>/vm` for
/// other users.
pub fn default_vm_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_VM_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(runtime).join("berth/vm");
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        PathBuf::from("/run/berth/vm")
    } else {
        PathBuf::from(format!("/tmp/berth-{uid}/vm"))
    }
}
