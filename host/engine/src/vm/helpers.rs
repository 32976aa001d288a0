//! Launching a VM's processes, the same way for every backend: each in its own process group
//! with its output in a log file, vhost-user backends waited for until their socket exists,
//! one `virtiofsd` per shared root, and programs found beside the executable, on `PATH` or in
//! cargo's bin directory.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::process::VmProcess;
use super::{VmConfig, VmError, VmShare};

/// How long a vhost-user backend may take to create its socket.
const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The virtio-fs device program, and the variable that overrides where it is found.
pub const VIRTIOFSD_PROGRAM: &str = "virtiofsd";
pub const VIRTIOFSD_ENV: &str = "BERTH_VIRTIOFSD";

/// Starts one `virtiofsd` per share; stops what it started if one fails.
pub fn spawn_virtiofsd(virtiofsd: &Path, config: &VmConfig) -> Result<Vec<VmProcess>, VmError> {
    let mut started: Vec<VmProcess> = Vec::new();
    for share in &config.shares {
        let socket = virtiofs_socket(&config.state_dir, &share.tag);
        let log = config
            .state_dir
            .join(format!("virtiofsd-{}.log", share.tag));
        // A socket left by an earlier VM would look ready before virtiofsd listens.
        let _ = fs::remove_file(&socket);
        let mut command = Command::new(virtiofsd);
        command.args(virtiofsd_args(
            share,
            &socket,
            nix::unistd::geteuid().is_root(),
        ));
        let spawned = spawn_detached(
            &mut command,
            &log,
            "install it with `cargo install --locked virtiofsd` or set BERTH_VIRTIOFSD",
        )
        .map(|child| {
            VmProcess::spawned(VIRTIOFSD_PROGRAM, child, config.state_dir.to_string_lossy())
        })
        .and_then(|process| wait_for_socket(process, &socket, VIRTIOFSD_PROGRAM, &log));
        match spawned {
            Ok(process) => started.push(process),
            Err(e) => {
                for mut process in started {
                    process.kill_and_reap();
                }
                return Err(e);
            }
        }
    }
    Ok(started)
}

/// Waits until a vhost-user backend has created its socket: QEMU connects to it as a client
/// at start, so it must exist first.
pub fn wait_for_socket(
    mut process: VmProcess,
    socket: &Path,
    program: &str,
    log: &Path,
) -> Result<VmProcess, VmError> {
    let deadline = Instant::now() + HELPER_READY_TIMEOUT;
    while !socket.exists() {
        if let Some(status) = process.exit_status() {
            return Err(VmError::HelperFailed {
                program: program.into(),
                status,
                log: log.to_owned(),
            });
        }
        if Instant::now() > deadline {
            process.kill_and_reap();
            return Err(VmError::HelperTimeout {
                program: program.into(),
                path: socket.to_owned(),
                secs: HELPER_READY_TIMEOUT.as_secs(),
            });
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(process)
}

/// The vhost-user socket of the share tagged `tag`.
pub fn virtiofs_socket(state_dir: &Path, tag: &str) -> PathBuf {
    state_dir.join(format!("virtiofs-{tag}.sock"))
}

/// `virtiofsd`'s arguments for `share`. Pure, so the ownership mapping is unit-tested.
///
/// Guest root and the share's owner map to each other both ways; every other guest id is
/// squashed to the owner, so whatever a container creates belongs to the host user. Host ids
/// other than the owner's pass through unchanged. As root the daemon is sandboxed in its own
/// namespaces with the share as its root; unprivileged it cannot be, and relies on the guest
/// kernel resolving every path (symlinks included) inside the share.
pub fn virtiofsd_args(share: &VmShare, socket: &Path, root: bool) -> Vec<OsString> {
    let (uid, gid) = share.owner;
    let mut args: Vec<OsString> = vec![
        "--shared-dir".into(),
        share.host_dir.clone().into(),
        "--socket-path".into(),
        socket.into(),
        "--tag".into(),
        share.tag.clone().into(),
        "--sandbox".into(),
        if root { "namespace" } else { "none" }.into(),
        "--cache".into(),
        "auto".into(),
        "--log-level".into(),
        "warn".into(),
    ];
    for (flag, id) in [("--translate-uid", uid), ("--translate-gid", gid)] {
        args.push(flag.into());
        args.push(format!("map:0:{id}:1").into());
        args.push(flag.into());
        args.push(format!("squash-guest:1:{id}:4294967294").into());
    }
    args
}
/// Spawns a VM process in its own process group (so a Ctrl-C aimed at the CLI that started it
/// does not reach it), with stdout and stderr going to `log`.
pub fn spawn_detached(
    command: &mut Command,
    log: &Path,
    hint: &str,
) -> Result<std::process::Child, VmError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let spawn_err = |source: io::Error| VmError::Spawn {
        program: program.clone(),
        hint: if source.kind() == io::ErrorKind::NotFound {
            hint.to_string()
        } else {
            format!("see {}", log.display())
        },
        source,
    };
    let out = File::create(log).map_err(spawn_err)?;
    let err = out.try_clone().map_err(spawn_err)?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(spawn_err)
}

/// The `virtiofsd` this backend runs (`BERTH_VIRTIOFSD`, `PATH`, cargo's bin directory); the
/// bare name if it is nowhere (berthd then says so and shares nothing).
pub fn find_virtiofsd() -> PathBuf {
    find_program(VIRTIOFSD_PROGRAM, VIRTIOFSD_ENV, false)
}

/// Finds `name`: the `env` override; then, if `beside_exe`, the running executable's directory
/// and its parent (`target/<profile>/` holds every binary of a workspace build, and test
/// binaries run from its `deps/`); then `PATH`; then cargo's bin directory. Falls back to the
/// bare name so the spawn error names the program.
pub fn find_program(name: &str, env: &str, beside_exe: bool) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe_dirs = std::env::current_exe()
        .ok()
        .filter(|_| beside_exe)
        .map(|exe| {
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(Path::to_path_buf)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin"));
    exe_dirs
        .into_iter()
        .chain(path_dirs)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofsd_args_map_guest_root_to_the_owner_and_squash_the_rest() {
        let share = VmShare {
            tag: "share0".into(),
            host_dir: "/home/u".into(),
            owner: (1000, 1001),
        };

        let args = virtiofsd_args(&share, Path::new("/run/fs.sock"), true)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");

        assert!(args.contains("--shared-dir /home/u --socket-path /run/fs.sock --tag share0"));
        assert!(args.contains("--sandbox namespace"));
        assert!(args.contains(
            "--translate-uid map:0:1000:1 --translate-uid squash-guest:1:1000:4294967294"
        ));
        assert!(args.contains("--translate-gid map:0:1001:1"));
    }

    #[test]
    fn find_program_found_nowhere_is_the_bare_name() {
        let found = find_program("berth-no-such-program", "BERTH_TEST_UNSET_VARIABLE", true);

        assert_eq!(found, PathBuf::from("berth-no-such-program"));
    }
}
