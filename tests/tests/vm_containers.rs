//! Tier 2 under the qemu backend: a real container runs inside the VM, driven through the agent
//! over vsock, its root filesystem uploaded as a layer on a stream connection of its own.

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use agent_protocol::{ContainerConfig, CreateContainer, StreamHeader, StreamKind, UnpackLayer};
use berth_container::docker_default_spec;
use berth_engine::agent_client::open_stream_vsock;
use berth_engine::{StopOutcome, Vm};
use berth_tests::{skip, TestVm};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder, Spec};

/// Where the layer is unpacked in the guest: an existing, empty tmpfs directory of the
/// agent-only initramfs.
const GUEST_ROOTFS: &str = "/tmp";

const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a bulk transfer through the vsock device may take under TCG before it counts as a
/// stall. Measured transfers take a few seconds; a stalled device never finishes.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(120);

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
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| e.to_string())?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" {
            symlink("busybox", root.join("bin").join(applet)).map_err(|e| e.to_string())?;
        }
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

/// How a container's init is attached.
#[derive(Debug, Default, Clone, Copy)]
struct Stdio {
    stdin: bool,
    tty: bool,
}

/// What one container run produced.
struct Outcome {
    exit: agent_protocol::ExitInfo,
    stdout: String,
    stderr: String,
}

/// A booted VM with the busybox layer unpacked at [`GUEST_ROOTFS`], driven through its agent.
struct Guest {
    vm: Vm,
    agent: berth_engine::AgentClient,
    uds: PathBuf,
    /// Keeps the fixture (and the VM lock) for the guest's lifetime.
    _fixture: TestVm,
}

impl Guest {
    /// Boots a VM and uploads the layer, or says why it cannot here.
    fn boot() -> Result<Self, String> {
        let fixture = TestVm::new()?;
        let layer = busybox_layer(fixture.dir.path())?;
        let config = fixture.config();
        let uds = config.vsock_socket();
        let (vm, mut agent) = Vm::start(fixture.backend.as_ref(), &config).expect("boot");
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
        assert!(unpacked.entries >= 10, "{unpacked:?}");
        Ok(Self {
            vm,
            agent,
            uds,
            _fixture: fixture,
        })
    }

    /// Creates container `id` running `args` (spec adjusted by `adjust`), attaches its output,
    /// starts it, waits for it and deletes it.
    fn run(&mut self, id: &str, args: &[&str], adjust: impl FnOnce(&mut Spec)) -> Outcome {
        let id = self.create(id, args, adjust);
        let stdout = read_all(stream(&self.uds, &id, StreamKind::Stdout));
        let stderr = read_all(stream(&self.uds, &id, StreamKind::Stderr));
        self.agent.start_container(&id).expect("start");
        let exit = self.agent.wait_container(&id).expect("wait");
        let outcome = Outcome {
            exit,
            stdout: String::from_utf8_lossy(&stdout.join().expect("stdout")).into_owned(),
            stderr: String::from_utf8_lossy(&stderr.join().expect("stderr")).into_owned(),
        };
        self.agent.delete_container(&id).expect("delete");
        outcome
    }

    fn create(&mut self, id: &str, args: &[&str], adjust: impl FnOnce(&mut Spec)) -> String {
        self.create_with(id, args, Stdio::default(), adjust)
    }

    fn create_with(
        &mut self,
        id: &str,
        args: &[&str],
        stdio: Stdio,
        adjust: impl FnOnce(&mut Spec),
    ) -> String {
        let mut spec =
            docker_default_spec(args.iter().map(|a| a.to_string()).collect()).expect("spec");
        adjust(&mut spec);
        self.agent
            .create_container(CreateContainer {
                id: id.into(),
                config: Box::new(ContainerConfig {
                    spec,
                    rootfs: PathBuf::from(GUEST_ROOTFS),
                    overlay: None,
                    cgroup_parent: PathBuf::from("berth-test"),
                    hostname_file: Some(format!("{id}\n")),
                    hosts_file: None,
                    resolv_conf_file: None,
                    seccomp_unconfined: false,
                    network: None,
                }),
                stdin: stdio.stdin,
                tty: stdio.tty,
            })
            .expect("create");
        id.to_string()
    }

    /// Powers the guest off; it must go cleanly.
    fn stop(self) {
        drop(self.agent);
        assert_eq!(self.vm.stop(Duration::from_secs(60)), StopOutcome::Clean);
    }
}

/// Kills the VM when a scenario is not done by its deadline: a stalled transfer then ends (its
/// streams close) and the test fails saying so, instead of hanging.
struct Watchdog {
    done: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Watchdog {
    fn arm(vm: &Vm, deadline: Duration) -> Self {
        let pids: Vec<i32> = vm.processes().iter().map(|p| p.pid()).collect();
        let (done, finished) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = thread::spawn(move || {
            if finished.recv_timeout(deadline) == Err(RecvTimeoutError::Timeout) {
                flag.store(true, Ordering::SeqCst);
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        });
        Self {
            done,
            fired,
            thread,
        }
    }

    /// Stops watching; whether the deadline passed first.
    fn disarm(self) -> bool {
        let _ = self.done.send(());
        self.thread.join().expect("watchdog thread");
        self.fired.load(Ordering::SeqCst)
    }
}

/// Megabytes per second of `bytes` moved in `elapsed`.
fn megabytes_per_second(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// Boots the guest or skips (fails under CI) with the reason.
macro_rules! guest_or_skip {
    () => {
        match Guest::boot() {
            Ok(guest) => guest,
            Err(reason) => return skip(&reason),
        }
    };
}

#[test]
fn vm_container_exit_code_streams_and_pid_namespace() {
    let mut guest = guest_or_skip!();

    let out = guest.run(
        "c1",
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; echo pid=$$; hostname; exit 7",
        ],
        |spec| {
            spec.set_hostname(Some("c1".into()));
        },
    );
    guest.stop();

    assert_eq!(out.exit.code, 7);
    // The container's init is PID 1 of its own pid namespace, in its own uts namespace.
    assert_eq!(out.stdout, "out\npid=1\nc1\n");
    assert_eq!(out.stderr, "err\n");
}

#[test]
fn vm_container_memory_limit_is_oom_killed() {
    let mut guest = guest_or_skip!();
    /// 32 MiB with no swap: `tail /dev/zero` buffers an endless line until the OOM killer.
    const LIMIT: i64 = 32 << 20;

    let out = guest.run("oom", &["tail", "/dev/zero"], |spec| {
        let memory = LinuxMemoryBuilder::default()
            .limit(LIMIT)
            .swap(LIMIT)
            .build()
            .expect("memory");
        let resources = LinuxResourcesBuilder::default()
            .memory(memory)
            .build()
            .expect("resources");
        if let Some(linux) = spec.linux_mut() {
            linux.set_resources(Some(resources));
        }
    });
    guest.stop();

    assert!(
        out.exit.oom_killed,
        "not reported as OOM: {}",
        out.exit.code
    );
    assert_eq!(out.exit.code, 137);
}

#[test]
fn vm_container_pids_limit_stops_fork_bomb() {
    let mut guest = guest_or_skip!();
    const PIDS: i64 = 16;
    // Each "started" is a fork that succeeded; the shell gives up at the first refused fork.
    let script = "for i in $(seq 1 50); do sleep 5 & echo started; done; echo done";

    let out = guest.run("pids", &["sh", "-c", script], |spec| {
        let pids = LinuxPidsBuilder::default()
            .limit(PIDS)
            .build()
            .expect("pids");
        let resources = LinuxResourcesBuilder::default()
            .pids(pids)
            .build()
            .expect("resources");
        if let Some(linux) = spec.linux_mut() {
            linux.set_resources(Some(resources));
        }
    });
    guest.stop();

    let started = out.stdout.lines().filter(|l| *l == "started").count() as i64;
    assert!(started < PIDS, "{started} forks despite pids.max {PIDS}");
    assert!(!out.stdout.contains("done"), "{}", out.stdout);
}

#[test]
fn vm_container_readonly_rootfs_refuses_writes() {
    let mut guest = guest_or_skip!();

    let out = guest.run("ro", &["touch", "/written"], |spec| {
        if let Some(root) = spec.root_mut() {
            root.set_readonly(Some(true));
        }
    });
    guest.stop();

    assert_ne!(out.exit.code, 0);
    assert!(
        out.stderr.contains("Read-only file system"),
        "{}",
        out.stderr
    );
}

#[test]
fn vm_container_sigkill_is_137_and_exec_sees_its_pid_namespace() {
    let mut guest = guest_or_skip!();
    let id = guest.create("exec", &["sleep", "100"], |_| {});
    guest.agent.start_container(&id).expect("start");
    let mut process = docker_default_spec(vec![
        "sh".into(),
        "-c".into(),
        "tr '\\0' ' ' < /proc/1/cmdline".into(),
    ])
    .expect("spec")
    .process()
    .clone()
    .expect("process");
    process.set_terminal(Some(false));
    guest
        .agent
        .exec_process(agent_protocol::ExecProcess {
            id: id.clone(),
            exec_id: "e1".into(),
            process: Box::new(process),
            stdin: false,
            tty: false,
        })
        .expect("exec");
    let header = StreamHeader {
        container_id: id.clone(),
        exec_id: Some("e1".into()),
        kind: StreamKind::Stdout,
    };
    let exec_out =
        read_all(open_stream_vsock(&guest.uds, &header, STREAM_TIMEOUT).expect("stream"));
    let exec_exit = guest.agent.wait_exec(&id, "e1").expect("wait exec");
    let exec_stdout = String::from_utf8_lossy(&exec_out.join().expect("exec out")).into_owned();
    guest.agent.signal_container(&id, None, 9).expect("kill");
    let exit = guest.agent.wait_container(&id).expect("wait");
    guest.agent.delete_container(&id).expect("delete");
    guest.stop();

    assert_eq!(exec_exit.code, 0);
    assert_eq!(exec_stdout.trim(), "sleep 100");
    assert_eq!(exit.code, 137);
}

#[test]
fn vm_container_tty_sees_the_size_the_host_set() {
    let mut guest = guest_or_skip!();
    /// Not the 80x24 a terminal defaults to, so the answer proves the resize arrived.
    const ROWS: u16 = 33;
    const COLS: u16 = 111;
    let stdio = Stdio {
        stdin: false,
        tty: true,
    };
    let id = guest.create_with("tty", &["stty", "size"], stdio, |spec| {
        if let Some(process) = spec.process_mut() {
            process.set_terminal(Some(true));
        }
    });
    let pty = read_all(stream(&guest.uds, &id, StreamKind::Pty));
    guest
        .agent
        .resize_pty(&id, None, ROWS, COLS)
        .expect("resize");
    guest.agent.start_container(&id).expect("start");
    let exit = guest.agent.wait_container(&id).expect("wait");
    let output = String::from_utf8_lossy(&pty.join().expect("pty")).into_owned();
    guest.agent.delete_container(&id).expect("delete");
    guest.stop();

    assert_eq!(exit.code, 0);
    assert_eq!(output.trim(), format!("{ROWS} {COLS}"));
}

#[test]
fn vm_container_stdin_stream_reaches_process_and_its_end_is_eof() {
    let mut guest = guest_or_skip!();
    let stdio = Stdio {
        stdin: true,
        tty: false,
    };
    let id = guest.create_with("cat", &["cat"], stdio, |_| {});
    let stdout = read_all(stream(&guest.uds, &id, StreamKind::Stdout));
    let mut stdin = stream(&guest.uds, &id, StreamKind::Stdin);
    guest.agent.start_container(&id).expect("start");
    stdin.write_all(b"through stdin\n").expect("write stdin");
    // The half-close is the process's end of input: `cat` must then exit by itself.
    stdin
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close stdin");
    let exit = guest.agent.wait_container(&id).expect("wait");
    let output = String::from_utf8_lossy(&stdout.join().expect("stdout")).into_owned();
    guest.agent.delete_container(&id).expect("delete");
    guest.stop();

    assert_eq!(exit.code, 0);
    assert_eq!(output, "through stdin\n");
}

#[test]
fn vm_container_ten_megabytes_of_output_arrive_byte_exact() {
    let mut guest = guest_or_skip!();
    /// Enough to fill every buffer between the process and the host many times over.
    const SIZE: usize = 10 << 20;
    const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyz\n";
    let script = format!("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {SIZE}");
    let id = guest.create("big", &["sh", "-c", &script], |_| {});
    let stdout = read_all(stream(&guest.uds, &id, StreamKind::Stdout));
    let watchdog = Watchdog::arm(&guest.vm, TRANSFER_DEADLINE);
    let started = Instant::now();

    guest.agent.start_container(&id).expect("start");
    let output = stdout.join().expect("stdout");
    let elapsed = started.elapsed();
    let exit = guest.agent.wait_container(&id);
    let stalled = watchdog.disarm();

    // The watchdog killed the VM if it fired; otherwise stop it before anything can fail.
    assert!(
        !stalled,
        "stalled: {} of {SIZE} bytes within {TRANSFER_DEADLINE:?}",
        output.len()
    );
    let deleted = guest.agent.delete_container(&id);
    guest.stop();
    assert_eq!(exit.expect("wait").code, 0);
    deleted.expect("delete");
    eprintln!(
        "10 MiB of container stdout to the host in {elapsed:.2?}: {:.1} MB/s",
        megabytes_per_second(SIZE, elapsed)
    );
    let expected = LINE.repeat(SIZE / LINE.len() + 1);
    assert_eq!(output.len(), SIZE);
    assert!(
        output == expected.as_bytes()[..SIZE],
        "output differs from what was written"
    );
}

#[test]
fn vm_container_stdin_and_stdout_at_once_echo_three_megabytes_byte_exact() {
    let mut guest = guest_or_skip!();
    /// Far more than the buffers on either side, so both directions wait on credit at once.
    const SIZE: usize = 3 << 20;
    let stdio = Stdio {
        stdin: true,
        tty: false,
    };
    let id = guest.create_with("echo", &["cat"], stdio, |_| {});
    let stdout = read_all(stream(&guest.uds, &id, StreamKind::Stdout));
    let mut stdin = stream(&guest.uds, &id, StreamKind::Stdin);
    // Not a repeating line: a byte out of place or a chunk twice would show.
    let payload: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
    let expected = payload.clone();
    let watchdog = Watchdog::arm(&guest.vm, TRANSFER_DEADLINE);
    let started = Instant::now();

    guest.agent.start_container(&id).expect("start");
    let writer = thread::spawn(move || {
        let written = stdin.write_all(&payload);
        let _ = stdin.shutdown(std::net::Shutdown::Write);
        written.map(|()| stdin)
    });
    let output = stdout.join().expect("stdout");
    let elapsed = started.elapsed();
    let written = writer.join().expect("writer");
    let exit = guest.agent.wait_container(&id);
    let stalled = watchdog.disarm();

    assert!(
        !stalled,
        "stalled: {} of {SIZE} bytes echoed within {TRANSFER_DEADLINE:?}",
        output.len()
    );
    let deleted = guest.agent.delete_container(&id);
    guest.stop();
    written.expect("write stdin");
    assert_eq!(exit.expect("wait").code, 0);
    deleted.expect("delete");
    eprintln!(
        "3 MiB through cat (stdin and stdout at once) in {elapsed:.2?}: {:.1} MB/s each way",
        megabytes_per_second(SIZE, elapsed)
    );
    assert_eq!(output.len(), SIZE);
    assert!(output == expected, "echo differs from what was written");
}
