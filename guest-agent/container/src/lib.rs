//! One Linux container from a config: namespaces, cgroup v2, overlayfs, mounts, pivot_root and
//! exec, run in a fresh single-threaded process; and safe unpacking of the image layers its
//! rootfs is made of.
//!
//! A binary using this crate must call [`run_init_if_requested`] first thing in `main`: the
//! crate re-executes that binary to set containers up (see [`init`]).

pub mod archive;
pub mod caps;
pub mod cgroup;
pub mod container;
pub mod init;
pub mod mounts;
pub mod process;
pub mod seccomp;
pub mod spec;
pub mod syscall;
pub mod unpack;
pub mod user;

pub use container::{
    Container, ContainerError, ContainerProcess, ExitStatus, ProcessIo, Pty, StdioConfig,
};
pub use init::run_init_if_requested;
pub use spec::{docker_default_spec, ContainerConfig, EtcFiles, SeccompProfile};
