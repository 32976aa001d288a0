//! The `berth-vsock` binary as the qemu backend runs it: it binds the hybrid-vsock listener and
//! the vhost-user socket, and exits once its frontend goes away. (Serving a real guest is
//! covered by the VM scenarios in `tests/`, which boot QEMU with it.)
//!
//! Being an integration test of this package also makes `cargo test` build the binary, so the
//! VM scenarios find it beside the test executables.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the binary may take to create its sockets, or to exit.
const DEADLINE: Duration = Duration::from_secs(10);

fn spawn(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_berth-vsock"))
        .arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(dir.join("vhost.sock"))
        .arg("--uds-path")
        .arg(dir.join("vm.vsock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn berth-vsock")
}

fn wait_for(path: &Path) -> bool {
    let started = Instant::now();
    while started.elapsed() < DEADLINE {
        if path.exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    false
}

fn wait_exit(child: &mut Child) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < DEADLINE {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn berth_vsock_binds_both_sockets_and_accepts_host_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn(dir.path());

    let bound = wait_for(&dir.path().join("vhost.sock")) && dir.path().join("vm.vsock").exists();
    // No guest yet: the CONNECT is taken and waits for one.
    let connected = UnixStream::connect(dir.path().join("vm.vsock"))
        .and_then(|mut client| client.write_all(b"CONNECT 1024\n").map(|()| client));
    thread::sleep(Duration::from_millis(100));
    let still_running = child.try_wait().expect("try_wait").is_none();
    let _ = child.kill();
    let _ = child.wait();

    assert!(bound, "sockets not created");
    assert!(connected.is_ok(), "{connected:?}");
    assert!(still_running, "exited on a host client without a guest");
}

#[test]
fn berth_vsock_exits_when_its_frontend_disconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn(dir.path());
    assert!(
        wait_for(&dir.path().join("vhost.sock")),
        "socket not created"
    );

    let frontend = UnixStream::connect(dir.path().join("vhost.sock")).expect("frontend");
    drop(frontend);
    let status = wait_exit(&mut child);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }

    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn berth_vsock_without_uds_path_fails() {
    let output = Command::new(env!("CARGO_BIN_EXE_berth-vsock"))
        .args(["--socket", "/nonexistent/vhost.sock"])
        .output()
        .expect("run berth-vsock");

    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--uds-path"));
}
