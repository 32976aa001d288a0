//! The last steps of a container process before `execve`, run in the (single-threaded) child
//! inside the container's namespaces: session and controlling terminal, user and groups,
//! capabilities, `no_new_privs`, seccomp, working directory, environment and `PATH` lookup.
//!
//! Order matters and follows runc: the bounding set is dropped and the seccomp filter installed
//! while still privileged (the filter allows everything that follows), ids change with
//! `PR_SET_KEEPCAPS` so the permitted set survives, then the final sets are applied.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use oci_spec::runtime::Process;
use thiserror::Error;

use crate::caps::{CapSets, CapsError};
use crate::seccomp::SeccompError;
use crate::spec::{SeccompProfile, DEFAULT_PATH};
use crate::user::{ResolvedUser, UserError};

/// Errors while turning the child into the container process.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// A syscall failed.
    #[error("cannot {0}")]
    Syscall(&'static str, #[source] nix::Error),
    /// The user could not be resolved.
    #[error("cannot resolve the user")]
    User(#[from] UserError),
    /// Capabilities could not be applied.
    #[error("cannot apply capabilities")]
    Caps(#[from] CapsError),
    /// The seccomp filter could not be installed.
    #[error("cannot apply the seccomp profile")]
    Seccomp(#[from] SeccompError),
    /// The executable was not found.
    #[error("executable {0:?} not found in $PATH")]
    NotFound(String),
    /// An argument or variable holds a nul byte.
    #[error("argument or environment entry contains a nul byte")]
    Nul,
    /// The working directory cannot be entered.
    #[error("cannot enter working directory {path:?}")]
    Cwd {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// `execve` failed.
    #[error("cannot execute {path:?}")]
    Exec {
        /// The executable.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The process has no arguments.
    #[error("the process has no arguments")]
    NoArgs,
}

/// Turns the calling process into `process` and executes it; returns only on failure.
pub fn finish_and_exec(
    process: &Process,
    seccomp: SeccompProfile,
) -> Result<Infallible, ProcessError> {
    nix::unistd::setsid().map_err(|e| ProcessError::Syscall("create a session", e))?;
    if process.terminal().unwrap_or(false) {
        // SAFETY: ioctl on our own stdin with an integer argument.
        let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        if rc != 0 {
            return Err(ProcessError::Syscall(
                "set the controlling terminal",
                nix::Error::last(),
            ));
        }
    }
    apply_rlimits(process)?;
    if let Some(score) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .map_err(|e| ProcessError::Syscall("set oom_score_adj", io_errno(e)))?;
    }
    let user = resolve(process)?;
    let caps = match process.capabilities() {
        Some(caps) => CapSets::from_oci(caps)?,
        None => CapSets::default(),
    };
    crate::caps::drop_bounding(&caps)?;
    if process.no_new_privileges().unwrap_or(false) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if rc != 0 {
            return Err(ProcessError::Syscall(
                "set no_new_privs",
                nix::Error::last(),
            ));
        }
    }
    if seccomp == SeccompProfile::Default {
        crate::seccomp::install(&crate::seccomp::default_filter())?;
    }
    crate::caps::keep_across_setuid()?;
    let groups: Vec<Gid> = user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).map_err(|e| ProcessError::Syscall("set groups", e))?;
    let gid = Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| ProcessError::Syscall("set gid", e))?;
    let uid = Uid::from_raw(user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| ProcessError::Syscall("set uid", e))?;
    crate::caps::apply(&caps)?;
    if let Some(umask) = process.user().umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask));
    }

    let cwd = if process.cwd().as_os_str().is_empty() {
        PathBuf::from("/")
    } else {
        process.cwd().clone()
    };
    nix::unistd::chdir(&cwd).map_err(|source| ProcessError::Cwd {
        path: cwd.clone(),
        source,
    })?;

    reset_signals()?;
    let env = environment(process.env().as_deref().unwrap_or_default(), &user);
    let args = process.args().as_deref().unwrap_or_default();
    let program = args.first().ok_or(ProcessError::NoArgs)?;
    let path = find_executable(program, &env)?;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| ProcessError::Nul)?;
    let c_args = to_cstrings(args)?;
    let c_env = to_cstrings(&env)?;
    let err = nix::unistd::execve(&c_path, &c_args, &c_env)
        .err()
        .unwrap_or(nix::Error::UnknownErrno);
    Err(ProcessError::Exec { path, source: err })
}

/// Gives the program the signal state a fresh process has: every disposition default and
/// nothing blocked. `execve` keeps ignored signals ignored and the mask as it is, and the Rust
/// runtime ignores SIGPIPE while the agent blocks SIGCHLD for its reaper: left alone, `yes |
/// head` would spin forever in a container and shells would never see their children exit.
///
/// The raw `rt_sigaction` system call is used because glibc's wrapper refuses the two real-time
/// signals it reserves for itself (32 and 33), which a parent may still have left ignored.
fn reset_signals() -> Result<(), ProcessError> {
    /// The kernel's `struct sigaction` on x86_64 (not glibc's, whose mask is 1024 bits).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    /// The size of the kernel's signal mask, which `rt_sigaction` insists on.
    const KERNEL_SIGSET_BYTES: usize = 8;
    /// Signals are numbered 1 to 64 on x86_64.
    const LAST_SIGNAL: libc::c_int = 64;

    let default = KernelSigaction {
        handler: 0, // SIG_DFL
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signal in (1..=LAST_SIGNAL).filter(|s| *s != libc::SIGKILL && *s != libc::SIGSTOP) {
        // SAFETY: `default` is a valid kernel sigaction that outlives the call; the old action
        // is not requested; SIG_DFL runs no code of ours in signal context.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                KERNEL_SIGSET_BYTES,
            )
        };
        if rc != 0 {
            return Err(ProcessError::Syscall(
                "reset a signal disposition",
                nix::Error::last(),
            ));
        }
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
    .map_err(|e| ProcessError::Syscall("unblock signals", e))
}

fn io_errno(e: std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Applies the process's rlimits (before dropping privileges, which may forbid raising them).
fn apply_rlimits(process: &Process) -> Result<(), ProcessError> {
    use nix::sys::resource::{setrlimit, Resource};
    use oci_spec::runtime::PosixRlimitType as T;
    for limit in process.rlimits().as_deref().unwrap_or_default() {
        let resource = match limit.typ() {
            T::RlimitCpu => Resource::RLIMIT_CPU,
            T::RlimitFsize => Resource::RLIMIT_FSIZE,
            T::RlimitData => Resource::RLIMIT_DATA,
            T::RlimitStack => Resource::RLIMIT_STACK,
            T::RlimitCore => Resource::RLIMIT_CORE,
            T::RlimitRss => Resource::RLIMIT_RSS,
            T::RlimitNproc => Resource::RLIMIT_NPROC,
            T::RlimitNofile => Resource::RLIMIT_NOFILE,
            T::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
            T::RlimitAs => Resource::RLIMIT_AS,
            T::RlimitLocks => Resource::RLIMIT_LOCKS,
            T::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
            T::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
            T::RlimitNice => Resource::RLIMIT_NICE,
            T::RlimitRtprio => Resource::RLIMIT_RTPRIO,
            T::RlimitRttime => Resource::RLIMIT_RTTIME,
        };
        setrlimit(resource, limit.soft(), limit.hard())
            .map_err(|e| ProcessError::Syscall("set an rlimit", e))?;
    }
    Ok(())
}

/// The user of `process`: `username` (Docker's `--user`) resolved in the image when set,
/// otherwise the numeric ids; additional gids are kept either way.
fn resolve(process: &Process) -> Result<ResolvedUser, ProcessError> {
    let user = process.user();
    let extra: Vec<String> = user
        .additional_gids()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(u32::to_string)
        .collect();
    let spec = match user.username() {
        Some(name) if !name.is_empty() => name.clone(),
        _ => format!("{}:{}", user.uid(), user.gid()),
    };
    let mut resolved = crate::user::resolve_in_root(Path::new("/"), &spec, &extra)?;
    if user.username().as_deref().is_none_or(str::is_empty) {
        // Numeric ids: only the home directory comes from the image's passwd.
        resolved.additional_gids = user.additional_gids().clone().unwrap_or_default();
    }
    Ok(resolved)
}

/// The process environment with Docker's defaults: `PATH` and `HOME` when absent.
pub fn environment(env: &[String], user: &ResolvedUser) -> Vec<String> {
    let mut env = env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    env
}

/// Finds `program` like `execvp`, in the container's `PATH`.
pub fn find_executable(program: &str, env: &[String]) -> Result<PathBuf, ProcessError> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(&DEFAULT_PATH[5..]);
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| ProcessError::NotFound(program.to_string()))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn to_cstrings(items: &[String]) -> Result<Vec<CString>, ProcessError> {
    items
        .iter()
        .map(|s| CString::new(s.as_bytes()).map_err(|_| ProcessError::Nul))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_user() -> ResolvedUser {
        ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            home: "/root".into(),
        }
    }

    #[test]
    fn environment_missing_path_and_home_added() {
        let env = environment(&["A=1".to_string()], &root_user());

        assert_eq!(
            env,
            vec![
                "A=1".to_string(),
                DEFAULT_PATH.to_string(),
                "HOME=/root".to_string()
            ]
        );
    }

    #[test]
    fn environment_given_home_kept() {
        let env = environment(
            &["HOME=/x".to_string(), "PATH=/bin".to_string()],
            &root_user(),
        );

        assert_eq!(env, vec!["HOME=/x".to_string(), "PATH=/bin".to_string()]);
    }

    #[test]
    fn find_executable_searches_path_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        std::fs::write(bin.join("tool"), "").expect("tool");
        std::fs::set_permissions(
            bin.join("tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let env = vec![format!("PATH=/nonexistent:{}", bin.display())];

        assert_eq!(
            find_executable("tool", &env).expect("found"),
            bin.join("tool")
        );
    }

    #[test]
    fn find_executable_missing_reported() {
        let env = vec!["PATH=/nonexistent".to_string()];

        assert!(matches!(
            find_executable("tool", &env),
            Err(ProcessError::NotFound(_))
        ));
    }
}
