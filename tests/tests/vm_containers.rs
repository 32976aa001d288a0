//! Tier 2 under the qemu backend: a real container runs inside the VM, driven through the agent
//! over vsock, its root filesystem uploaded as a layer on a stream connection of its own.

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use agent_protocol::{ContainerConfig, CreateContainer, StreamHeader, StreamKind, UnpackLayer};
use berth_container::docker_default_spec;
use berth_engine::agent_client::open_stream_vsock;
use berth_engine::{StopOutcome, Vm};
use berth_tests::{skip, TestVm};

/// Where the layer is unpacked in the guest: an existing, empty tmpfs directory of the
/// agent-only initramfs.
const GUEST_ROOTFS: &str = "/tmp";

const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// A busybox root filesystem as an uncompressed tar, built from the host's busybox-static.
fn busybox_layer(dir: &Path) -> Result<Vec<u8>, String> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err("/bin/busybox is missing (apt-get install busybox-static)".into());
    }
    let root = dir.join("rootfs");
    for sub in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).map_err(|e| e.to_string())?;
    }
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    for applet in ["sh", "echo", "cat", "readlink"] {
        symlink("busybox", root.join("bin").join(applet)).map_err(|e| e.to_string())?;
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
        .map_err(|e| e.to_string())?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").map_err(|e| e.to_string())?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "-cf", "-", "."])
        .output()
        .map_err(|e| e.to_string())?;
    if !tar.status.success() {
        return Err(format!("tar failed: {tar:?}"));
    }
    Ok(tar.stdout)
}

fn stream(uds: &Path, id: &str, kind: StreamKind) -> std::os::unix::net::UnixStream {
    let header = StreamHeader {
        container_id: id.into(),
        exec_id: None,
        kind,
    };
    open_stream_vsock(uds, &header, STREAM_TIMEOUT).expect("open stream")
}

fn read_all(mut stream: std::os::unix::net::UnixStream) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut data = Vec::new();
        stream.read_to_end(&mut data).expect("read stream");
        data
    })
}

#[test]
fn vm_container_runs_in_guest_with_streams_and_exit_code() {
    let fixture = match TestVm::new() {
        Ok(f) => f,
        Err(reason) => return skip(&reason),
    };
    let layer = match busybox_layer(fixture.dir.path()) {
        Ok(layer) => layer,
        Err(reason) => return skip(&reason),
    };
    let config = fixture.config();
    let uds = config.vsock_socket();
    let (vm, mut agent) = Vm::start(&fixture.backend, &config).expect("boot");

    // The root filesystem travels on its own stream, as every bulk transfer does.
    let mut upload = stream(&uds, "busybox", StreamKind::LayerUpload);
    let writer = thread::spawn(move || {
        upload.write_all(&layer).expect("upload");
        upload
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let unpacked = agent
        .unpack_layer(UnpackLayer {
            upload_id: "busybox".into(),
            dir: PathBuf::from(GUEST_ROOTFS),
            allow_devices: false,
        })
        .expect("unpack");
    writer.join().expect("writer");
    let script = "echo out; echo err >&2; echo pid=$$; readlink /proc/self/ns/pid; exit 7";
    let spec = docker_default_spec(vec!["sh".into(), "-c".into(), script.into()]).expect("spec");
    agent
        .create_container(CreateContainer {
            id: "c1".into(),
            config: Box::new(ContainerConfig {
                spec,
                rootfs: PathBuf::from(GUEST_ROOTFS),
                overlay: None,
                cgroup_parent: PathBuf::from("berth-test"),
                hostname_file: Some("c1\n".into()),
                hosts_file: None,
                resolv_conf_file: None,
                seccomp_unconfined: false,
            }),
            stdin: false,
            tty: false,
        })
        .expect("create");
    let stdout = read_all(stream(&uds, "c1", StreamKind::Stdout));
    let stderr = read_all(stream(&uds, "c1", StreamKind::Stderr));
    agent.start_container("c1").expect("start");
    let exit = agent.wait_container("c1").expect("wait");
    let stdout = String::from_utf8(stdout.join().expect("stdout")).expect("utf8");
    let stderr = String::from_utf8(stderr.join().expect("stderr")).expect("utf8");
    agent.delete_container("c1").expect("delete");
    drop(agent);
    let outcome = vm.stop(Duration::from_secs(60));

    assert!(unpacked.entries >= 10, "{unpacked:?}");
    assert_eq!(exit.code, 7);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("out"));
    // The container's init is PID 1 of a pid namespace of its own.
    assert_eq!(lines.next(), Some("pid=1"));
    assert!(
        lines.next().is_some_and(|ns| ns.starts_with("pid:[")),
        "{stdout}"
    );
    assert_eq!(stderr, "err\n");
    assert_eq!(outcome, StopOutcome::Clean);
}
