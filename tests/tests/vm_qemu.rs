//! Tier 2 under the host's backend (qemu here; `vmm` in the KVM box, `tests/kvm-box/vmm-suite.sh`):
//! the real kernel and initramfs boot, the agent answers over the
//! hybrid vsock socket, and failures are named within a bounded time.

use std::fs;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_engine::vm::{BackendKind, VmError};
use berth_engine::{StopOutcome, Vm};
use berth_tests::{processes_mentioning, skip, TestVm};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A failed boot must be reported well before the boot timeout: the guest dies in about a
/// second under TCG, so a minute leaves room for a loaded machine and still proves the error
/// did not come from the timeout.
const FAILURE_BOUND: Duration = Duration::from_secs(60);

/// How far the guest's clock may be from the host's right after the handshake set it.
const CLOCK_SLACK_SECS: f64 = 5.0;

#[test]
fn vm_boot_handshake_system_info_and_clean_shutdown_leaves_no_process() {
    let fixture = match TestVm::new() {
        Ok(f) => f,
        Err(reason) => return skip(&reason),
    };
    let config = fixture.config();

    let (vm, mut agent) = Vm::start(fixture.backend.as_ref(), &config).expect("boot");
    agent.ping().expect("ping");
    let info = agent.system_info().expect("system info");
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    drop(agent);
    let pids: Vec<i32> = vm.processes().iter().map(|p| p.pid()).collect();
    let outcome = vm.stop(Duration::from_secs(60));

    let built = fixture
        .assets
        .kernel_release()
        .expect("kernel.release beside the kernel");
    assert_eq!(info.kernel_release, built);
    assert_eq!(info.cpus, 2);
    assert!(info.mem_total_bytes > 256 << 20, "{info:?}");
    // The agent set its clock from the host's at the handshake; the guest has no RTC worth
    // trusting, so without that it would read 1970. Seconds of slack for a slow TCG guest.
    let guest_now = info.wall_clock_unix_nanos as f64 / 1e9;
    assert!(
        (guest_now - host_now).abs() < CLOCK_SLACK_SECS,
        "guest clock {guest_now} vs host {host_now}"
    );
    assert_eq!(outcome, StopOutcome::Clean);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still exists"
        );
    }
    assert_eq!(processes_mentioning(&config.state_dir), Vec::new());
}

#[test]
fn vm_missing_kernel_is_named_before_anything_starts() {
    let fixture = match TestVm::new() {
        Ok(f) => f,
        Err(reason) => return skip(&reason),
    };
    let mut config = fixture.config();
    config.kernel = fixture.dir.path().join("no-such-vmlinux");

    let err = Vm::start(fixture.backend.as_ref(), &config).unwrap_err();

    assert!(
        matches!(err, VmError::MissingAsset { what: "kernel", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-vmlinux"));
    assert_eq!(processes_mentioning(&config.state_dir), Vec::new());
}

#[test]
fn vm_corrupted_initramfs_is_diagnosed_from_console() {
    let fixture = match TestVm::new() {
        Ok(f) => f,
        Err(reason) => return skip(&reason),
    };
    let mut config = fixture.config();
    let mut image = fs::read(&fixture.assets.initramfs).expect("read initramfs");
    // Keep the first header (so the pre-boot check passes) and wreck everything after it: the
    // kernel must be the one that notices.
    for byte in image.iter_mut().skip(512) {
        *byte = 0x5a;
    }
    config.initramfs = fixture.dir.path().join("corrupt.cpio");
    fs::write(&config.initramfs, image).expect("write corrupt initramfs");
    let started = Instant::now();

    let err = Vm::start(fixture.backend.as_ref(), &config).unwrap_err();

    assert!(
        started.elapsed() < FAILURE_BOUND,
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, VmError::ExitedDuringBoot { .. }), "{text}");
    assert!(text.contains("guest kernel panic"), "{text}");
    assert!(text.contains("initramfs unpacking failed"), "{text}");
    assert_eq!(processes_mentioning(&config.state_dir), Vec::new());
}

#[test]
fn vm_killed_mid_boot_is_reported_with_the_signal() {
    let fixture = match TestVm::new() {
        Ok(f) => f,
        Err(reason) => return skip(&reason),
    };
    let config = fixture.config();
    let state_file = config.state_dir.join("state.json");
    let killer = thread::spawn(move || {
        // The state file appears once the processes run; kill the VM process as soon as it does.
        let deadline = Instant::now() + FAILURE_BOUND;
        while Instant::now() < deadline {
            if let Ok(text) = fs::read_to_string(&state_file) {
                let state: serde_json::Value = serde_json::from_str(&text).expect("state");
                let pid = state["processes"][0][1].as_i64().expect("VM pid");
                kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the VM process");
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
        panic!("the VM never recorded its processes");
    });
    let started = Instant::now();

    let err = Vm::start(fixture.backend.as_ref(), &config).unwrap_err();
    killer.join().expect("killer thread");

    assert!(
        started.elapsed() < FAILURE_BOUND,
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    let vm_process = match fixture.backend.kind() {
        BackendKind::Qemu => "qemu",
        BackendKind::Vmm => "berth-vmm",
    };
    assert!(
        text.contains(&format!("{vm_process} was killed by signal 9 (SIGKILL)")),
        "{text}"
    );
    assert_eq!(processes_mentioning(&config.state_dir), Vec::new());
}
