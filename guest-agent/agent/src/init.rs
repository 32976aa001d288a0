//! Early init: what PID 1 does before it can serve anything.
//!
//! The initramfs holds the agent as `/init` and almost nothing else, so PID 1 builds the usual
//! Linux userspace skeleton itself: the pseudo filesystems, `/dev/pts` with a private ptmx,
//! tmpfs for `/dev/shm`, `/run` and `/tmp`, cgroup v2 with the controllers containers need, the
//! hostname, the loopback interface and a file-descriptor limit fit for many containers.
//!
//! Every step is idempotent (a mount point that is already mounted is left alone, `EBUSY` counts
//! as done), so early init can run twice. A step that fails is logged with its cause and the
//! next step runs anyway: PID 1 must not exit, and a guest without, say, cgroups can still
//! answer the host and say what is wrong. Mounts go through [`InitSyscalls`] so the plan and the
//! error handling are unit-tested without root.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::{close, dup2, sethostname};
use thiserror::Error;

use crate::log::{console, Chain};

/// The guest's hostname.
pub const HOSTNAME: &str = "berth";

/// Where the cgroup v2 hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Controllers enabled for the children of the root cgroup, where the kernel has them.
pub const WANTED_CONTROLLERS: [&str; 5] = ["cpuset", "cpu", "io", "memory", "pids"];

/// `RLIMIT_NOFILE` when `/proc/sys/fs/nr_open` cannot be read: the kernel's default `nr_open`.
const DEFAULT_NOFILE: u64 = 1 << 20;

/// Why a step of early init failed.
#[derive(Debug, Error)]
pub enum InitError {
    #[error("cannot create the mount point {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open /dev/console as stdin, stdout and stderr")]
    Console(#[source] nix::Error),
    #[error("cannot link /dev/ptmx to pts/ptmx")]
    Ptmx(#[source] io::Error),
    #[error("cannot read the available cgroup controllers from {path}")]
    CgroupControllers {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enable the {controller} cgroup controller")]
    CgroupEnable {
        controller: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the hostname")]
    Hostname(#[source] nix::Error),
    #[error("cannot bring up lo ({step})")]
    Loopback {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("cannot raise RLIMIT_NOFILE to {limit}")]
    Rlimit {
        limit: u64,
        #[source]
        source: nix::Error,
    },
}

/// One filesystem early init mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountSpec {
    /// The source shown in `/proc/mounts`.
    pub source: &'static str,
    /// The mount point, created if missing.
    pub target: &'static str,
    /// The filesystem type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// Filesystem-specific options.
    pub data: Option<&'static str>,
}

/// The mounts of early init, in order: each target lives on a filesystem mounted before it.
pub fn early_mounts() -> [MountSpec; 9] {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nosuid_nodev_noexec = nosuid_nodev | MsFlags::MS_NOEXEC;
    let spec = |source, target, fstype, flags, data| MountSpec {
        source,
        target,
        fstype,
        flags,
        data,
    };
    [
        spec(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        spec("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        spec("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        spec(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            // gid 5 is "tty" by convention; mode=0620 lets the group write to terminals.
            Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ),
        spec("shm", "/dev/shm", "tmpfs", nosuid_nodev, Some("mode=1777")),
        spec("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755")),
        spec("tmpfs", "/tmp", "tmpfs", nosuid_nodev, Some("mode=1777")),
        spec(
            "cgroup2",
            CGROUP_ROOT,
            "cgroup2",
            nosuid_nodev_noexec,
            Some("nsdelegate"),
        ),
        // Not fatal where the kernel has no mqueue; containers expect it for IPC namespaces.
        spec("mqueue", "/dev/mqueue", "mqueue", nosuid_nodev_noexec, None),
    ]
}

/// The privileged calls of mounting, behind a trait so tests can fake them.
pub trait InitSyscalls {
    /// `mkdir -p`.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Whether something is already mounted on `path`.
    fn is_mount_point(&self, path: &Path) -> bool;
    /// `mount(2)` as `spec` says.
    fn mount(&self, spec: &MountSpec) -> nix::Result<()>;
}

/// The real syscalls.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealSyscalls;

impl InitSyscalls for RealSyscalls {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn is_mount_point(&self, path: &Path) -> bool {
        // A mount point sits on another device than its parent directory. Good enough for the
        // pseudo filesystems here (it misses bind mounts of the parent's own filesystem).
        let parent = path.parent().unwrap_or(path);
        match (fs::metadata(path), fs::metadata(parent)) {
            (Ok(here), Ok(above)) => here.dev() != above.dev(),
            _ => false,
        }
    }

    fn mount(&self, spec: &MountSpec) -> nix::Result<()> {
        mount(
            Some(spec.source),
            spec.target,
            Some(spec.fstype),
            spec.flags,
            spec.data,
        )
    }
}

/// Mounts every spec that is not mounted yet, in order, and returns what failed. A failure does
/// not stop the later mounts.
pub fn mount_all(sys: &impl InitSyscalls, specs: &[MountSpec]) -> Vec<InitError> {
    specs
        .iter()
        .filter_map(|spec| mount_one(sys, spec).err())
        .collect()
}

fn mount_one(sys: &impl InitSyscalls, spec: &MountSpec) -> Result<(), InitError> {
    let target = Path::new(spec.target);
    sys.create_dir_all(target)
        .map_err(|source| InitError::CreateDir {
            path: target.to_owned(),
            source,
        })?;
    if sys.is_mount_point(target) {
        return Ok(());
    }
    match sys.mount(spec) {
        // EBUSY: mounted already, by an earlier run or by the kernel.
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount {
            fstype: spec.fstype,
            target: spec.target,
            source,
        }),
    }
}

/// Runs all of early init, logging each failure to the console and going on.
pub fn early_init() {
    let mount_errors = mount_all(&RealSyscalls, &early_mounts());
    // Before the first log line: with /dev mounted, stdio can be the console if it is not yet.
    report(ensure_console());
    console!("starting, version {}", env!("CARGO_PKG_VERSION"));
    for error in &mount_errors {
        console!("{}", Chain(error));
    }
    report(link_ptmx());
    for error in enable_cgroup_controllers(Path::new(CGROUP_ROOT)) {
        console!("{}", Chain(&error));
    }
    report(sethostname(HOSTNAME).map_err(InitError::Hostname));
    report(bring_up_loopback());
    report(raise_nofile_limit().map(drop));
}

fn report(result: Result<(), InitError>) {
    if let Err(error) = result {
        console!("{}", Chain(&error));
    }
}

/// Makes fds 0-2 the console if the kernel could not open it for us (an initramfs without a
/// `/dev/console` node, before devtmpfs was mounted).
fn ensure_console() -> Result<(), InitError> {
    let closed: Vec<RawFd> = (0..=2)
        .filter(|fd| fcntl(*fd, FcntlArg::F_GETFD) == Err(Errno::EBADF))
        .collect();
    if closed.is_empty() {
        return Ok(());
    }
    // Not O_CLOEXEC: this fd may itself become 0, 1 or 2, which children inherit.
    let console = open(
        "/dev/console",
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(InitError::Console)?;
    for &target in closed.iter().filter(|target| **target != console) {
        dup2(console, target).map_err(InitError::Console)?;
    }
    if console > 2 {
        close(console).map_err(InitError::Console)?;
    }
    Ok(())
}

/// Points `/dev/ptmx` at the private devpts instance's `ptmx`, as containers expect.
fn link_ptmx() -> Result<(), InitError> {
    let ptmx = Path::new("/dev/ptmx");
    let target = Path::new("pts/ptmx");
    if fs::read_link(ptmx).is_ok_and(|current| current == target) {
        return Ok(());
    }
    match fs::remove_file(ptmx) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(InitError::Ptmx(e)),
    }
    std::os::unix::fs::symlink(target, ptmx).map_err(InitError::Ptmx)
}

/// The wanted controllers the kernel offers, given the text of `cgroup.controllers`.
pub fn controllers_to_enable(available: &str) -> Vec<&'static str> {
    let available: Vec<&str> = available.split_whitespace().collect();
    WANTED_CONTROLLERS
        .into_iter()
        .filter(|wanted| available.contains(wanted))
        .collect()
}

/// Enables the wanted controllers in `root`'s `cgroup.subtree_control`, one write each so one
/// refused controller does not take the others down with it.
pub fn enable_cgroup_controllers(root: &Path) -> Vec<InitError> {
    let path = root.join("cgroup.controllers");
    let available = match fs::read_to_string(&path) {
        Ok(available) => available,
        Err(source) => return vec![InitError::CgroupControllers { path, source }],
    };
    let subtree_control = root.join("cgroup.subtree_control");
    controllers_to_enable(&available)
        .into_iter()
        .filter_map(|controller| {
            fs::write(&subtree_control, format!("+{controller}"))
                .err()
                .map(|source| InitError::CgroupEnable { controller, source })
        })
        .collect()
}

/// Sets `IFF_UP` on `lo`; the kernel then gives it 127.0.0.1 and ::1 by itself.
fn bring_up_loopback() -> Result<(), InitError> {
    let err = |step| move |source| InitError::Loopback { step, source };
    let socket = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket"))?;
    // SAFETY: `ifreq` is plain old data (integers, byte arrays and a union of those), for which
    // all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name from and writes the flags into
    // `request`, which outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    Errno::result(rc).map_err(err("SIOCGIFFLAGS"))?;
    // SAFETY: SIOCGIFFLAGS has just set the flags member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS only reads `request`, which outlives the call.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) };
    Errno::result(rc).map(drop).map_err(err("SIOCSIFFLAGS"))
}

/// Raises `RLIMIT_NOFILE` (soft and hard) to the kernel's ceiling, `fs.nr_open`, so that
/// containers, which inherit it, can open as many files as the kernel allows.
fn raise_nofile_limit() -> Result<u64, InitError> {
    let limit = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(DEFAULT_NOFILE);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .map_err(|source| InitError::Rlimit { limit, source })?;
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    /// Records mounts and answers with canned errors per target.
    #[derive(Default)]
    struct FakeSyscalls {
        mounted_already: Vec<&'static str>,
        failures: HashMap<&'static str, Errno>,
        mounted: RefCell<Vec<&'static str>>,
    }

    impl InitSyscalls for FakeSyscalls {
        fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
            Ok(())
        }

        fn is_mount_point(&self, path: &Path) -> bool {
            self.mounted_already.iter().any(|m| Path::new(m) == path)
        }

        fn mount(&self, spec: &MountSpec) -> nix::Result<()> {
            if let Some(errno) = self.failures.get(spec.target) {
                return Err(*errno);
            }
            self.mounted.borrow_mut().push(spec.target);
            Ok(())
        }
    }

    fn targets() -> Vec<&'static str> {
        early_mounts().iter().map(|spec| spec.target).collect()
    }

    #[test]
    fn early_mounts_nested_target_comes_after_its_parent_mount() {
        let targets = targets();

        for (i, target) in targets.iter().enumerate() {
            for (j, other) in targets.iter().enumerate() {
                let nested = target.starts_with(&format!("{other}/"));
                assert!(!nested || j < i, "{target} is mounted before {other}");
            }
        }
    }

    #[test]
    fn mount_all_fresh_system_mounts_everything_in_order() {
        let sys = FakeSyscalls::default();

        let errors = mount_all(&sys, &early_mounts());

        assert!(errors.is_empty());
        assert_eq!(*sys.mounted.borrow(), targets());
    }

    #[test]
    fn mount_all_already_mounted_target_is_skipped() {
        let sys = FakeSyscalls {
            mounted_already: vec!["/proc"],
            ..FakeSyscalls::default()
        };

        let errors = mount_all(&sys, &early_mounts());

        assert!(errors.is_empty());
        assert!(!sys.mounted.borrow().contains(&"/proc"));
    }

    #[test]
    fn mount_all_ebusy_counts_as_mounted() {
        let sys = FakeSyscalls {
            failures: HashMap::from([("/sys", Errno::EBUSY)]),
            ..FakeSyscalls::default()
        };

        let errors = mount_all(&sys, &early_mounts());

        assert!(errors.is_empty());
    }

    #[test]
    fn mount_all_failure_is_reported_and_later_mounts_still_run() {
        let sys = FakeSyscalls {
            failures: HashMap::from([("/dev/pts", Errno::ENODEV)]),
            ..FakeSyscalls::default()
        };

        let errors = mount_all(&sys, &early_mounts());

        assert!(matches!(
            errors.as_slice(),
            [InitError::Mount {
                target: "/dev/pts",
                source: Errno::ENODEV,
                ..
            }]
        ));
        assert!(sys.mounted.borrow().contains(&CGROUP_ROOT));
    }

    #[test]
    fn controllers_to_enable_keeps_wanted_ones_the_kernel_has() {
        let available = "cpuset cpu io memory hugetlb pids rdma misc\n";

        assert_eq!(
            controllers_to_enable(available),
            ["cpuset", "cpu", "io", "memory", "pids"]
        );
    }

    #[test]
    fn controllers_to_enable_missing_controller_is_left_out() {
        assert_eq!(controllers_to_enable("memory pids\n"), ["memory", "pids"]);
    }

    #[test]
    fn enable_cgroup_controllers_writes_each_controller() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "pids\n").unwrap();

        let errors = enable_cgroup_controllers(root.path());

        assert!(errors.is_empty());
        let written = fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(written, "+pids");
    }

    #[test]
    fn enable_cgroup_controllers_without_cgroupfs_reports_it() {
        let root = tempfile::tempdir().unwrap();

        let errors = enable_cgroup_controllers(&root.path().join("absent"));

        assert!(matches!(
            errors.as_slice(),
            [InitError::CgroupControllers { .. }]
        ));
    }
}
