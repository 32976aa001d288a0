//! Shared helpers for the tier-1 tests of `berth-container`: deciding whether a privileged test
//! can run here, and building a busybox rootfs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Returns `true` when the test can run. Otherwise prints why and returns `false` so the test
/// returns early, except under CI (`CI=true`), where a skip is a failure and this panics.
pub fn can_run(test: &str, problems: &[String]) -> bool {
    if problems.is_empty() {
        return true;
    }
    let why = problems.join("; ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: cannot run under CI: {why}");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

/// Problems that stop a test needing root.
pub fn need_root() -> Vec<String> {
    if nix::unistd::Uid::effective().is_root() {
        Vec::new()
    } else {
        vec!["needs root".to_string()]
    }
}

/// Where cgroup v2 is mounted on this host, if anywhere.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Problems that stop a container test: root, overlayfs, cgroup v2 with `controllers` enabled
/// at its root.
pub fn need_container(controllers: &[&str]) -> Vec<String> {
    let mut problems = need_root();
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") {
        problems.push("overlayfs is not available".to_string());
    }
    match cgroup2_mount() {
        None => problems.push("cgroup v2 is not mounted".to_string()),
        Some(root) => {
            let available =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            for controller in controllers {
                if !available.split_whitespace().any(|c| c == *controller) {
                    problems.push(format!(
                        "cgroup v2 controller {controller} is not available at {} (bound to a v1 hierarchy?)",
                        root.display()
                    ));
                }
            }
        }
    }
    if !Path::new("/bin/busybox").exists() {
        problems.push("/bin/busybox is missing (apt-get install busybox-static)".to_string());
    }
    problems
}

/// Builds a minimal busybox rootfs in `dir`: `/bin/busybox` with its applet links, `/etc/passwd`,
/// `/etc/group` and the usual empty directories.
pub fn busybox_rootfs(dir: &Path) {
    for sub in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/app",
    ] {
        std::fs::create_dir_all(dir.join(sub)).expect("create rootfs dir");
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("copy busybox");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))
                .expect("applet link");
        }
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .expect("passwd");
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\nnogroup:x:65534:\n",
    )
    .expect("group");
}
