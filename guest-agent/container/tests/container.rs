//! Tier-1 acceptance tests of the container runtime, run natively on the host as root with a
//! busybox rootfs built from Debian's `busybox-static`: namespaces, limits, exit codes,
//! exec, TTY, stdio and cleanup. Each test says why it skips when the host cannot run it
//! (and fails instead under `CI=true`).

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_container::cgroup::CgroupConfig;
use berth_container::mounts::OverlayConfig;
use berth_container::{
    docker_default_spec, Container, ContainerConfig, ExitStatus, ProcessIo, StdioConfig,
};
use nix::sys::signal::Signal;
use oci_spec::runtime::{
    BoxBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder, Process,
};

/// The cgroup parent all test containers go under (relative to the cgroup2 mount).
const CGROUP_PARENT: &str = "berth-test";

/// A container's on-disk pieces: a busybox lower layer, upper/work dirs and a mount point.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: ContainerConfig,
}

impl Fixture {
    fn new(name: &str, args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let lower = dir.join("lower");
        support::busybox_rootfs(&lower);
        std::fs::write(lower.join("etc/berth-marker"), "inside\n").expect("marker");
        for sub in ["upper", "work", "rootfs"] {
            std::fs::create_dir(dir.join(sub)).expect("dir");
        }
        let spec = docker_default_spec(args.iter().map(|s| s.to_string()).collect()).expect("spec");
        let id = format!("{name}-{}", std::process::id());
        let mut config = ContainerConfig::new(id, spec, dir.join("rootfs"));
        config.overlay = Some(OverlayConfig {
            lower_dirs: vec![lower],
            upper_dir: Some(dir.join("upper")),
            work_dir: Some(dir.join("work")),
        });
        config.cgroup = CgroupConfig {
            root: support::cgroup2_mount().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
            parent: PathBuf::from(CGROUP_PARENT),
        };
        config.init_binary = PathBuf::from(env!("CARGO_BIN_EXE_berth-container-init"));
        Self {
            _tmp: tmp,
            dir,
            config,
        }
    }

    fn process_mut(&mut self) -> &mut Process {
        self.config.spec.process_mut().as_mut().expect("process")
    }
}

/// The outcome of a process run to completion.
struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

fn read_all(file: Option<std::fs::File>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut data = Vec::new();
        if let Some(mut file) = file {
            // A pty master reports EIO once the slave side is gone: that is the end.
            let mut chunk = [0u8; 65536];
            loop {
                match file.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => data.extend_from_slice(&chunk[..n]),
                }
            }
        }
        data
    })
}

fn collect(container: &Container, io: ProcessIo) -> Output {
    let stdout = read_all(io.stdout.or(io.pty.map(|p| p.into_master())));
    let stderr = read_all(io.stderr);
    let status = container.wait().expect("wait");
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned(),
    }
}

/// Creates, starts, waits for and deletes the container.
fn run(fixture: &Fixture) -> Output {
    let (container, io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");
    let output = collect(&container, io);
    container.delete().expect("delete");
    output
}

fn stdout_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn can_run(test: &str) -> bool {
    support::can_run(test, &support::need_container(&[]))
}

#[test]
fn container_namespaces_differ_from_host() {
    if !can_run("container_namespaces_differ_from_host") {
        return;
    }
    const NAMESPACES: [&str; 6] = ["cgroup", "ipc", "mnt", "net", "pid", "uts"];
    let script = format!(
        "for n in {}; do readlink /proc/self/ns/$n; done",
        NAMESPACES.join(" ")
    );
    let fixture = Fixture::new("ns", &["sh", "-c", &script]);

    let output = run(&fixture);

    assert_eq!(output.status.code, 0, "{}", output.stderr);
    let inside: Vec<String> = stdout_text(&output).lines().map(str::to_string).collect();
    assert_eq!(inside.len(), NAMESPACES.len(), "{inside:?}");
    for (name, inside) in NAMESPACES.iter().zip(&inside) {
        let host = std::fs::read_link(format!("/proc/self/ns/{name}")).expect("host ns");
        assert_ne!(
            Path::new(inside),
            host,
            "{name} namespace is shared with the host"
        );
    }
}

#[test]
fn container_exit_seven_reported() {
    if !can_run("container_exit_seven_reported") {
        return;
    }
    let fixture = Fixture::new("exit7", &["sh", "-c", "exit 7"]);

    let output = run(&fixture);

    assert_eq!(output.status.code, 7);
    assert_eq!(output.status.signal, None);
}

#[test]
fn container_sigkill_reported_as_137() {
    if !can_run("container_sigkill_reported_as_137") {
        return;
    }
    let fixture = Fixture::new("kill", &["sleep", "100"]);
    let (container, _io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");

    container.signal(Signal::SIGKILL).expect("kill");
    let status = container.wait().expect("wait");

    assert_eq!((status.code, status.signal), (137, Some(libc::SIGKILL)));
    container.delete().expect("delete");
}

#[test]
fn container_readonly_rootfs_refuses_writes() {
    if !can_run("container_readonly_rootfs_refuses_writes") {
        return;
    }
    let mut fixture = Fixture::new("ro", &["touch", "/written"]);
    if let Some(root) = fixture.config.spec.root_mut() {
        root.set_readonly(Some(true));
    }

    let output = run(&fixture);

    assert_ne!(output.status.code, 0);
    assert!(
        output.stderr.contains("Read-only file system"),
        "{}",
        output.stderr
    );
    assert!(!fixture.dir.join("upper/written").exists());
}

#[test]
fn container_masked_and_readonly_paths_applied() {
    if !can_run("container_masked_and_readonly_paths_applied") {
        return;
    }
    // /proc/timer_list is a masked file (/dev/null over it), /sys/firmware a masked directory
    // (an empty tmpfs), /proc/sys a read-only path.
    let script = "wc -c < /proc/timer_list; ls -A /sys/firmware | wc -l; \
                  echo 1 > /proc/sys/vm/drop_caches || echo refused";
    let fixture = Fixture::new("masked", &["sh", "-c", script]);

    let output = run(&fixture);

    assert_eq!(
        stdout_text(&output).split_whitespace().collect::<Vec<_>>(),
        ["0", "0", "refused"],
        "{}",
        output.stderr
    );
}

#[test]
fn container_default_security_applied() {
    if !can_run("container_default_security_applied") {
        return;
    }
    let fixture = Fixture::new(
        "sec",
        &[
            "grep",
            "-E",
            "^(CapEff|CapBnd|Seccomp):",
            "/proc/self/status",
        ],
    );

    let output = run(&fixture);

    let text = stdout_text(&output);
    // Docker's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
    // NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
    assert!(text.contains("CapEff:\t00000000a80425fb"), "{text}");
    assert!(text.contains("CapBnd:\t00000000a80425fb"), "{text}");
    assert!(text.contains("Seccomp:\t2"), "{text}");
}

#[test]
fn container_user_by_name_gets_groups() {
    if !can_run("container_user_by_name_gets_groups") {
        return;
    }
    let mut fixture = Fixture::new("user", &["sh", "-c", "id -u; id -G; pwd; echo $HOME"]);
    fixture
        .process_mut()
        .user_mut()
        .set_username(Some("app".to_string()));
    fixture.process_mut().set_cwd(PathBuf::from("/home/app"));

    let output = run(&fixture);

    assert_eq!(
        stdout_text(&output).lines().collect::<Vec<_>>(),
        ["1000", "1000 2000", "/home/app", "/home/app"],
        "{}",
        output.stderr
    );
}

#[test]
fn container_huge_output_arrives_complete() {
    if !can_run("container_huge_output_arrives_complete") {
        return;
    }
    /// Ten megabytes, written as fast as possible by a process that exits at once.
    const SIZE: usize = 10 * 1024 * 1024;
    let fixture = Fixture::new("huge", &["head", "-c", &SIZE.to_string(), "/dev/urandom"]);

    let output = run(&fixture);

    assert_eq!(output.status.code, 0, "{}", output.stderr);
    assert_eq!(output.stdout.len(), SIZE);
}

#[test]
fn container_stdout_and_stderr_kept_apart() {
    if !can_run("container_stdout_and_stderr_kept_apart") {
        return;
    }
    let fixture = Fixture::new("split", &["sh", "-c", "echo out; echo err >&2"]);

    let output = run(&fixture);

    assert_eq!(stdout_text(&output), "out\n");
    assert_eq!(output.stderr, "err\n");
}

#[test]
fn container_process_starts_with_default_signal_state() {
    if !can_run("container_process_starts_with_default_signal_state") {
        return;
    }
    // Run directly (no shell in between): the program itself must see nothing ignored and
    // nothing blocked, although the runtime that started it ignores SIGPIPE.
    let fixture = Fixture::new(
        "signals",
        &["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"],
    );

    let output = run(&fixture);

    assert_eq!(
        stdout_text(&output),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    );
}

#[test]
fn container_pipeline_ends_when_reader_exits() {
    if !can_run("container_pipeline_ends_when_reader_exits") {
        return;
    }
    // `yes` only stops through SIGPIPE once `head` has gone; with SIGPIPE ignored it spins.
    let fixture = Fixture::new("pipe", &["sh", "-c", "yes | head -c 4"]);

    let output = run(&fixture);

    assert_eq!(stdout_text(&output), "y\ny\n");
    assert_eq!(output.status.code, 0);
}

#[test]
fn exec_sees_container_filesystem_and_pid_namespace() {
    if !can_run("exec_sees_container_filesystem_and_pid_namespace") {
        return;
    }
    let fixture = Fixture::new("exec", &["sleep", "100"]);
    let (container, _io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");
    let mut process = fixture.config.spec.process().clone().expect("process");
    process.set_args(Some(vec![
        "sh".into(),
        "-c".into(),
        "cat /etc/berth-marker; tr '\\0' ' ' < /proc/1/cmdline; echo; echo $$".into(),
    ]));

    let (exec, io) = container
        .exec(&process, StdioConfig::default())
        .expect("exec");
    let stdout = read_all(io.stdout);
    let status = exec.wait().expect("wait exec");

    let text = String::from_utf8_lossy(&stdout.join().expect("reader")).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(status.code, 0);
    assert_eq!(lines[0], "inside");
    assert_eq!(lines[1].trim(), "sleep 100");
    let pid_inside: i32 = lines[2].parse().expect("pid");
    assert_ne!(
        pid_inside,
        exec.pid(),
        "exec must see the container's pid numbering"
    );
    container.delete().expect("delete");
}

#[test]
fn exec_stdin_attached_and_closed() {
    if !can_run("exec_stdin_attached_and_closed") {
        return;
    }
    let fixture = Fixture::new("stdin", &["sleep", "100"]);
    let (container, _io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");
    let mut process = fixture.config.spec.process().clone().expect("process");
    process.set_args(Some(vec!["cat".into()]));

    let (exec, mut io) = container
        .exec(&process, StdioConfig { stdin: true })
        .expect("exec");
    let stdout = read_all(io.stdout.take());
    let mut stdin = io.stdin.take().expect("stdin");
    stdin.write_all(b"hello through stdin\n").expect("write");
    drop(stdin);
    let status = exec.wait().expect("wait");

    assert_eq!(status.code, 0);
    assert_eq!(stdout.join().expect("reader"), b"hello through stdin\n");
    container.delete().expect("delete");
}

#[test]
fn container_tty_sees_console_size() {
    if !can_run("container_tty_sees_console_size") {
        return;
    }
    let mut fixture = Fixture::new("tty", &["stty", "size"]);
    fixture.process_mut().set_terminal(Some(true));
    fixture.process_mut().set_console_size(Some(
        BoxBuilder::default()
            .height(33u64)
            .width(77u64)
            .build()
            .expect("box"),
    ));

    let output = run(&fixture);

    assert_eq!(stdout_text(&output).trim(), "33 77");
}

#[test]
fn container_tty_is_a_terminal_of_the_containers_own_devpts() {
    if !can_run("container_tty_is_a_terminal_of_the_containers_own_devpts") {
        return;
    }
    let mut fixture = Fixture::new("ttyname", &["sh", "-c", "tty; ls /dev/pts"]);
    fixture.process_mut().set_terminal(Some(true));

    let output = run(&fixture);

    let text = stdout_text(&output);
    let mut lines = text.lines().map(str::trim);
    assert_eq!(lines.next(), Some("/dev/pts/0"), "{text}");
    assert!(
        lines.any(|l| l.split_whitespace().any(|w| w == "0")),
        "{text}"
    );
}

#[test]
fn container_tty_resize_seen_by_process() {
    if !can_run("container_tty_resize_seen_by_process") {
        return;
    }
    let mut fixture = Fixture::new("resize", &["sh", "-c", "read line; stty size"]);
    fixture.process_mut().set_terminal(Some(true));
    let (container, io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");
    let pty = io.pty.expect("pty");

    pty.resize(40, 100).expect("resize");
    pty.master().write_all(b"go\n").expect("write");
    let output = collect(
        &container,
        ProcessIo {
            pty: Some(pty),
            ..Default::default()
        },
    );

    assert!(
        stdout_text(&output).contains("40 100"),
        "{}",
        stdout_text(&output)
    );
    container.delete().expect("delete");
}

#[test]
fn container_stop_escalates_to_sigkill() {
    if !can_run("container_stop_escalates_to_sigkill") {
        return;
    }
    // PID 1 of a namespace ignores SIGTERM without a handler: stop must fall back to SIGKILL.
    let fixture = Fixture::new("stop", &["sleep", "100"]);
    let (container, _io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");

    let status = container.stop(Duration::from_millis(300)).expect("stop");

    assert_eq!(status.code, 137);
    container.delete().expect("delete");
}

#[test]
fn container_pause_freezes_and_resume_thaws() {
    if !can_run("container_pause_freezes_and_resume_thaws") {
        return;
    }
    let fixture = Fixture::new("pause", &["sleep", "100"]);
    let (container, _io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");

    container.pause().expect("pause");
    let frozen = container.cgroup().is_frozen().expect("state");
    container.resume().expect("resume");
    let thawed = !container.cgroup().is_frozen().expect("state");

    assert!(frozen && thawed);
    assert_eq!(container.top().expect("top"), vec![container.init().pid()]);
    assert!(container.stats().cpu.contains_key("usage_usec"));
    container.delete().expect("delete");
}

#[test]
fn container_delete_leaves_no_mount_or_cgroup() {
    if !can_run("container_delete_leaves_no_mount_or_cgroup") {
        return;
    }
    let fixture = Fixture::new("delete", &["sleep", "100"]);
    let (container, _io) =
        Container::create(&fixture.config, StdioConfig::default()).expect("create");
    container.start().expect("start");
    let cgroup = container.cgroup().path().to_path_buf();
    assert!(cgroup.exists());

    container.delete().expect("delete");

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo.contains(fixture.dir.to_str().expect("utf-8")),
        "{mountinfo}"
    );
    assert!(!cgroup.exists());
}

#[test]
fn container_create_failure_cleans_up() {
    if !can_run("container_create_failure_cleans_up") {
        return;
    }
    let mut fixture = Fixture::new("badmount", &["true"]);
    fixture
        .config
        .spec
        .mounts_mut()
        .get_or_insert_with(Vec::new)
        .push(berth_container::spec::bind_mount(
            "/data",
            PathBuf::from("/nonexistent/berth"),
            true,
        ));
    let cgroup = fixture
        .config
        .cgroup
        .root
        .join(CGROUP_PARENT)
        .join(&fixture.config.id);

    let err = Container::create(&fixture.config, StdioConfig::default()).expect_err("must fail");

    assert!(err.to_string().contains("/nonexistent/berth"), "{err}");
    assert!(!cgroup.exists());
}

#[test]
fn container_memory_limit_oom_killed() {
    if !support::can_run(
        "container_memory_limit_oom_killed",
        &support::need_container(&["memory"]),
    ) {
        return;
    }
    /// 32 MiB with no swap: `tail /dev/zero` buffers an endless line until the OOM killer.
    const LIMIT: i64 = 32 << 20;
    let mut fixture = Fixture::new("oom", &["tail", "/dev/zero"]);
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(LIMIT)
                .swap(LIMIT)
                .build()
                .expect("memory"),
        )
        .build()
        .expect("resources");
    if let Some(linux) = fixture.config.spec.linux_mut() {
        linux.set_resources(Some(resources));
    }

    let output = run(&fixture);

    assert!(
        output.status.oom_killed,
        "not reported as OOM: {}",
        output.status.code
    );
    assert_eq!(output.status.code, 137);
}

#[test]
fn container_pids_limit_stops_fork_bomb() {
    if !support::can_run(
        "container_pids_limit_stops_fork_bomb",
        &support::need_container(&["pids"]),
    ) {
        return;
    }
    /// Few enough that 50 background sleeps must hit it.
    const PIDS: i64 = 16;
    // `echo` is a shell builtin, so each "started" line is one fork that succeeded. The shell
    // gives up at the first fork the pids controller refuses, so "done" must never be printed.
    let script = "for i in $(seq 1 50); do sleep 5 & echo started; done; echo done";
    let mut fixture = Fixture::new("pids", &["sh", "-c", script]);
    let resources = LinuxResourcesBuilder::default()
        .pids(
            LinuxPidsBuilder::default()
                .limit(PIDS)
                .build()
                .expect("pids"),
        )
        .build()
        .expect("resources");
    if let Some(linux) = fixture.config.spec.linux_mut() {
        linux.set_resources(Some(resources));
    }

    let output = run(&fixture);

    let text = stdout_text(&output);
    let started = text.lines().filter(|line| *line == "started").count() as i64;
    assert!(
        started < PIDS,
        "{started} forks succeeded despite pids.max {PIDS}"
    );
    assert!(
        !text.contains("done"),
        "the fork bomb was not stopped: {text}"
    );
}

#[test]
fn container_hostname_etc_files_and_loopback_configured() {
    if !can_run("container_hostname_etc_files_and_loopback_configured") {
        return;
    }
    let script = "hostname; cat /etc/hostname /etc/hosts; ip link show lo | grep -c ',UP'";
    let mut fixture = Fixture::new("etc", &["sh", "-c", script]);
    let hostname = fixture.dir.join("hostname");
    let hosts = fixture.dir.join("hosts");
    std::fs::write(&hostname, "web\n").expect("hostname");
    std::fs::write(&hosts, "127.0.0.1 localhost web\n").expect("hosts");
    fixture.config.spec.set_hostname(Some("web".to_string()));
    fixture.config.etc_files.hostname = Some(hostname);
    fixture.config.etc_files.hosts = Some(hosts);

    let output = run(&fixture);

    assert_eq!(
        stdout_text(&output).lines().collect::<Vec<_>>(),
        ["web", "web", "127.0.0.1 localhost web", "1"],
        "{}",
        output.stderr
    );
}

#[test]
fn container_sysctl_and_rlimits_applied() {
    if !can_run("container_sysctl_and_rlimits_applied") {
        return;
    }
    /// A soft file-descriptor limit no default would produce.
    const NOFILE: u64 = 777;
    let mut fixture = Fixture::new(
        "sysctl",
        &["sh", "-c", "cat /proc/sys/net/ipv4/ip_forward; ulimit -n"],
    );
    let sysctl = [("net.ipv4.ip_forward".to_string(), "1".to_string())]
        .into_iter()
        .collect();
    if let Some(linux) = fixture.config.spec.linux_mut() {
        linux.set_sysctl(Some(sysctl));
    }
    let rlimit = oci_spec::runtime::PosixRlimitBuilder::default()
        .typ(oci_spec::runtime::PosixRlimitType::RlimitNofile)
        .soft(NOFILE)
        .hard(NOFILE)
        .build()
        .expect("rlimit");
    fixture.process_mut().set_rlimits(Some(vec![rlimit]));

    let output = run(&fixture);

    assert_eq!(
        stdout_text(&output).lines().collect::<Vec<_>>(),
        ["1", "777"],
        "{}",
        output.stderr
    );
}
