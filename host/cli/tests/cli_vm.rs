//! The `berth vm` commands as a user runs them: start, status, logs, stop, each a separate
//! process finding the VM through its state directory.

use std::process::{Command, Output};

use berth_tests::{processes_mentioning, skip, TestVm};

fn berth(state_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env("BERTH_VM_DIR", state_dir)
        .env("BERTH_ASSETS_DIR", TestVm::assets_dir())
        .output()
        .expect("run berth")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn cli_vm_start_status_logs_stop_round_trip() {
    let fixture = match TestVm::new() {
        Ok(f) => f,
        Err(reason) => return skip(&reason),
    };
    let state_dir = fixture.state_dir();
    let release = fixture.assets.kernel_release().expect("kernel.release");

    let start = berth(&state_dir, &["vm", "start", "--memory", "512"]);
    let status = berth(&state_dir, &["vm", "status", "--json"]);
    let logs = berth(&state_dir, &["vm", "logs"]);
    let stop = berth(&state_dir, &["vm", "stop"]);
    let after = berth(&state_dir, &["vm", "status"]);

    assert!(start.status.success(), "start: {start:?}");
    assert!(
        stdout(&start).contains(&format!("kernel:   {release}")),
        "{start:?}"
    );
    assert!(status.status.success(), "status: {status:?}");
    let info: serde_json::Value = serde_json::from_str(&stdout(&status)).expect("status json");
    assert_eq!(info["kernel_release"], release.as_str());
    assert!(
        stdout(&logs).contains("berth-agent: ready"),
        "logs: {logs:?}"
    );
    assert_eq!(stdout(&stop).trim(), "stopped", "stop: {stop:?}");
    assert_eq!(after.status.code(), Some(3));
    assert_eq!(stdout(&after).trim(), "not running");
    assert_eq!(processes_mentioning(&state_dir), Vec::new());
}

#[test]
fn cli_vm_start_missing_kernel_fails_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");

    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["vm", "start"])
        .env("BERTH_VM_DIR", dir.path().join("vm"))
        .env("BERTH_KERNEL", dir.path().join("absent-vmlinux"))
        .output()
        .expect("run berth");

    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kernel not found at"), "{stderr}");
    assert!(stderr.contains("absent-vmlinux"), "{stderr}");
}
