//! Tier 3: the stock docker CLI (and docker-py) against a real berthd whose containers run in
//! a VM booted from our kernel. Images are made offline from Debian's busybox-static.
//!
//! Each scenario gets its own daemon (state, socket, VM); they run one at a time. A scenario
//! that cannot run here (no kernel built, no docker CLI) skips with the reason, and fails
//! under CI.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_tests::daemon::TestDaemon;
use berth_tests::{daemon_or_skip, skip, text};

#[test]
fn docker_version_and_info_report_berth_and_the_guest_kernel() {
    let daemon = daemon_or_skip!();

    let version = daemon.docker_ok(&["version"]);
    let kernel = daemon.docker_ok(&["info", "--format", "{{.KernelVersion}} {{.NCPU}}"]);

    assert!(version.contains("API version:      1.47"), "{version}");
    let release = std::fs::read_to_string(berth_tests::TestVm::assets_dir().join("kernel.release"))
        .expect("kernel.release");
    assert!(kernel.starts_with(release.trim()), "{kernel}");
}

#[test]
fn docker_run_prints_output_and_returns_the_exit_code() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    let hello = daemon.docker(&["run", "--rm", "busybox", "echo", "hello"]);
    let three = daemon.docker(&["run", "--rm", "busybox", "sh", "-c", "exit 3"]);
    let listed = daemon.docker_ok(&["ps", "-a", "-q"]);

    assert_eq!(text(&hello.stdout), "hello\n", "{}", text(&hello.stderr));
    assert_eq!(hello.status.code(), Some(0));
    assert_eq!(three.status.code(), Some(3), "{}", text(&three.stderr));
    assert_eq!(listed, "", "--rm containers are gone");
}

#[test]
fn docker_detached_container_lifecycle_ps_logs_exec_stop_rm() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    daemon.docker_ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "busybox",
        "sh",
        "-c",
        "echo started; exec httpd -f -h /var/www",
    ]);
    let ps = daemon.docker_ok(&["ps", "--format", "{{.Names}} {{.State}}"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut logs = String::new();
    while Instant::now() < deadline && !logs.contains("started") {
        logs = daemon.docker_ok(&["logs", "web"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let ls = daemon.docker_ok(&["exec", "web", "ls", "/"]);
    let exec_exit = daemon.docker(&["exec", "web", "sh", "-c", "exit 5"]);
    let pid1 = daemon.docker_ok(&["exec", "web", "cat", "/proc/1/cmdline"]);
    daemon.docker_ok(&["stop", "-t", "1", "web"]);
    let stopped = daemon.docker_ok(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"]);
    daemon.docker_ok(&["rm", "web"]);
    let after = daemon.docker_ok(&["ps", "-a", "-q"]);

    assert_eq!(ps.trim(), "web running");
    assert_eq!(logs, "started\n");
    assert!(ls.lines().any(|l| l == "bin"), "{ls}");
    assert_eq!(exec_exit.status.code(), Some(5));
    assert!(
        pid1.starts_with("httpd"),
        "exec sees the container's pid namespace: {pid1:?}"
    );
    assert!(stopped.starts_with("web Exited (137)"), "{stopped}");
    assert_eq!(after, "");
}

#[test]
fn docker_run_interactive_stdin_round_trips_bytes() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    // 3 MiB: far beyond every buffer on the way (pipes, vsock credit, channels).
    let input: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let path = daemon.dir.path().join("input.bin");
    std::fs::write(&path, &input).expect("write input");

    let output = daemon.docker_with_input(
        &["run", "-i", "--rm", "busybox", "cat"],
        Stdio::from(std::fs::File::open(&path).expect("open input")),
    );

    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(output.stdout, input);
}

#[test]
fn docker_run_and_logs_carry_10_mb_of_output_byte_exact() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    // Every byte value, in a pattern that shows reordering: 10 MB from a deterministic source.
    let script = "i=0; while [ $i -lt 40 ]; do dd if=/bin/busybox bs=262144 count=1 2>/dev/null; i=$((i+1)); done";

    let run = daemon.docker(&["run", "--name", "big", "busybox", "sh", "-c", script]);
    let logs = daemon.docker(&["logs", "big"]);

    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(run.stdout.len(), 40 * 262_144);
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox");
    let chunk = &busybox[..262_144.min(busybox.len())];
    assert!(
        run.stdout.chunks(262_144).all(|c| c == chunk),
        "output differs from the source"
    );
    assert!(
        logs.stdout == run.stdout,
        "docker logs differs from what docker run printed"
    );
}

#[test]
fn docker_exec_interactive_under_a_pty_gets_a_terminal() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&["run", "-d", "--name", "box", "busybox", "sleep", "600"]);
    // `stty -a` reads the terminal's settings: it fails on anything but a terminal.
    let command = format!(
        "DOCKER_HOST={} {} exec -it box sh -c 'stty -a >/dev/null && echo on-a-terminal; tty; echo exec-done'",
        daemon.docker_host(),
        berth_tests::daemon::DOCKER
    );

    let output = Command::new("timeout")
        .args(["-s", "KILL", "120", "script", "-qec", &command, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script runs");

    let shown = text(&output.stdout);
    // A terminal turns "\n" into "\r\n": the output went through the container's pty.
    assert!(shown.contains("exec-done\r\n"), "{shown:?}");
    // The terminal is the container's own: `tty` names it inside.
    assert!(shown.contains("/dev/pts/0\r\n"), "{shown:?}");
    daemon.docker_ok(&["rm", "-f", "box"]);
}

#[test]
fn docker_cp_both_ways_and_export_carry_files_exactly() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let host = daemon.dir.path();
    let source = host.join("tree");
    std::fs::create_dir_all(source.join("sub")).expect("tree");
    let big: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(source.join("sub/big.bin"), &big).expect("big");
    std::fs::write(source.join("note.txt"), b"note\n").expect("note");
    std::os::unix::fs::symlink("note.txt", source.join("link")).expect("link");
    std::fs::set_permissions(
        source.join("note.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )
    .expect("chmod");
    let tree = source.to_str().expect("utf-8 path");
    daemon.docker_ok(&["run", "-d", "--name", "box", "busybox", "sleep", "600"]);

    // Into a running container: a directory under a new name, a file into a directory.
    daemon.docker_ok(&["cp", tree, "box:/tmp/copied"]);
    daemon.docker_ok(&["cp", &format!("{tree}/note.txt"), "box:/etc/"]);
    let inside = daemon.docker_ok(&[
        "exec", "box", "sh", "-c",
        "md5sum /tmp/copied/sub/big.bin; stat -c 'mode %a' /tmp/copied/note.txt; readlink /tmp/copied/link; cat /etc/note.txt",
    ]);
    // Out again, from the running container and then from the stopped one.
    let back = host.join("back");
    daemon.docker_ok(&["cp", "box:/tmp/copied", back.to_str().unwrap()]);
    daemon.docker_ok(&[
        "exec",
        "box",
        "sh",
        "-c",
        "echo written-inside > /root/made-here",
    ]);
    daemon.docker_ok(&["stop", "-t", "1", "box"]);
    let stopped_copy = host.join("made-here");
    daemon.docker_ok(&["cp", "box:/root/made-here", stopped_copy.to_str().unwrap()]);
    daemon.docker_ok(&["cp", &format!("{tree}/note.txt"), "box:/root/while-stopped"]);
    let export = daemon.docker(&["export", "box"]);
    let missing = daemon.docker(&["cp", "box:/no/such/file", host.join("x").to_str().unwrap()]);
    daemon.docker_ok(&["start", "box"]);
    let after_start = daemon.docker_ok(&["exec", "box", "cat", "/root/while-stopped"]);

    let big_md5 = {
        let output = Command::new("md5sum")
            .arg(source.join("sub/big.bin"))
            .output()
            .expect("md5sum");
        text(&output.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(inside.starts_with(&big_md5), "{inside}");
    assert!(inside.ends_with("mode 640\nnote.txt\nnote\n"), "{inside}");
    assert_eq!(
        std::fs::read(back.join("sub/big.bin")).expect("copied back"),
        big
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).expect("link copied back"),
        std::path::Path::new("note.txt")
    );
    assert_eq!(
        std::fs::read_to_string(&stopped_copy).expect("copied from the stopped container"),
        "written-inside\n"
    );
    assert_eq!(after_start, "note\n");
    assert!(export.status.success(), "{}", text(&export.stderr));
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(&export.stdout[..]);
    for entry in archive.entries().expect("export is a tar") {
        let entry = entry.expect("export entry");
        names.push(entry.path().expect("entry path").display().to_string());
    }
    assert!(names.iter().any(|n| n == "bin/busybox"), "{names:?}");
    assert!(names.iter().any(|n| n == "root/made-here"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("proc/") && n.len() > 5),
        "{names:?}"
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("Could not find the file /no/such/file in container box"),
        "{}",
        text(&missing.stderr)
    );
    daemon.docker_ok(&["rm", "-f", "box"]);
}

#[test]
fn docker_commit_makes_an_image_of_the_containers_changes() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&[
        "run",
        "--name",
        "changed",
        "busybox",
        "sh",
        "-c",
        "echo made > /made; rm /bin/vi; mkdir -p /var/x; echo deep > /var/x/f",
    ]);
    daemon.docker_ok(&[
        "run",
        "-d",
        "--name",
        "live",
        "busybox",
        "sh",
        "-c",
        "echo live > /live; exec sleep 600",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && daemon
            .docker(&["exec", "live", "test", "-f", "/live"])
            .status
            .code()
            != Some(0)
    {
        std::thread::sleep(Duration::from_millis(100));
    }

    let id = daemon.docker_ok(&["commit", "-m", "my change", "changed", "committed:v1"]);
    let from_stopped = daemon.docker(&[
        "run",
        "--rm",
        "committed:v1",
        "sh",
        "-c",
        "cat /made /var/x/f; test -e /bin/vi || echo vi-gone",
    ]);
    daemon.docker_ok(&["commit", "live", "live:1"]);
    let from_running = daemon.docker_ok(&["run", "--rm", "live:1", "cat", "/live"]);
    let still_running = daemon.docker_ok(&["ps", "--format", "{{.Names}} {{.State}}"]);
    let history = daemon.docker_ok(&["history", "--format", "{{.Comment}}", "committed:v1"]);
    let layers = daemon.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{len .RootFS.Layers}}",
        "committed:v1",
    ]);
    daemon.docker_ok(&[
        "commit",
        "--change",
        "CMD [\"cat\", \"/made\"]",
        "--change",
        "ENV MODE=changed",
        "changed",
        "changed:cmd",
    ]);
    let changed_cmd = daemon.docker_ok(&["run", "--rm", "changed:cmd"]);
    let changed_env = daemon.docker_ok(&["run", "--rm", "changed:cmd", "sh", "-c", "echo $MODE"]);
    let bad_change = daemon.docker(&["commit", "--change", "RUN true", "changed", "nope"]);
    let missing = daemon.docker(&["commit", "no-such-container", "x"]);

    assert!(id.starts_with("sha256:"), "{id}");
    assert_eq!(changed_cmd, "made\n");
    assert_eq!(changed_env, "changed\n");
    assert_eq!(bad_change.status.code(), Some(1));
    assert_eq!(
        text(&from_stopped.stdout),
        "made\ndeep\nvi-gone\n",
        "{}",
        text(&from_stopped.stderr)
    );
    assert_eq!(from_running, "live\n");
    assert!(still_running.contains("live running"), "{still_running}");
    assert!(history.starts_with("my change\n"), "{history}");
    assert_eq!(layers.trim(), "2");
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("No such container: no-such-container"),
        "{}",
        text(&missing.stderr)
    );
    daemon.docker_ok(&["rm", "-f", "live", "changed"]);
}

#[test]
fn docker_errors_come_back_in_dockers_shape_and_disturb_nothing() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&["run", "-d", "--name", "keep", "busybox", "sleep", "600"]);

    let unknown = daemon.docker(&["run", "--rm", "nosuchimage:v1", "true"]);
    let conflict = daemon.docker(&["create", "--name", "keep", "busybox"]);
    let running = daemon.docker(&["rm", "keep"]);
    let no_container = daemon.docker(&["logs", "ghost"]);
    let malformed = curl(
        &daemon,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            "{not json",
            "http://d/containers/create",
        ],
    );
    let too_old = curl(&daemon, &["http://d/v1.12/version"]);
    let still = daemon.docker_ok(&["ps", "--format", "{{.Names}} {{.State}}"]);

    assert_eq!(unknown.status.code(), Some(125));
    assert!(
        text(&unknown.stderr).contains("Unable to find image 'nosuchimage:v1' locally"),
        "{}",
        text(&unknown.stderr)
    );
    assert!(
        text(&conflict.stderr).contains("Conflict. The container name \"/keep\" is already in use"),
        "{}",
        text(&conflict.stderr)
    );
    assert!(
        text(&running.stderr).contains("container is running"),
        "{}",
        text(&running.stderr)
    );
    assert!(
        text(&no_container.stderr).contains("No such container: ghost"),
        "{}",
        text(&no_container.stderr)
    );
    assert!(
        malformed.starts_with("400 {\"message\":\"invalid JSON"),
        "{malformed}"
    );
    assert!(
        too_old.starts_with("400 {\"message\":\"client version 1.12 is too old"),
        "{too_old}"
    );
    assert_eq!(still.trim(), "keep running");
    daemon.docker_ok(&["rm", "-f", "keep"]);
}

/// `curl` over the daemon's socket: the status code, a space, the body.
fn curl(daemon: &TestDaemon, args: &[&str]) -> String {
    let output = Command::new("curl")
        .args([
            "-s",
            "-w",
            "%{http_code}",
            "-o",
            "/dev/stderr",
            "--unix-socket",
        ])
        .arg(daemon.socket())
        .args(args)
        .output()
        .expect("curl runs");
    format!("{} {}", text(&output.stdout), text(&output.stderr).trim())
}

#[test]
fn docker_state_survives_a_berthd_restart() {
    let mut daemon = daemon_or_skip!();
    daemon.load_busybox();
    let output = daemon.docker(&[
        "run",
        "--name",
        "done",
        "busybox",
        "sh",
        "-c",
        "echo kept; exit 3",
    ]);
    assert_eq!(output.status.code(), Some(3));

    daemon.restart();

    let listed = daemon.docker_ok(&["ps", "-a", "--format", "{{.Names}} {{.Status}}"]);
    let logs = daemon.docker_ok(&["logs", "done"]);
    let images = daemon.docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    let again = daemon.docker(&["start", "-a", "done"]);
    assert!(listed.starts_with("done Exited (3)"), "{listed}");
    assert_eq!(logs, "kept\n");
    assert_eq!(images.trim(), "busybox:latest");
    assert_eq!(again.status.code(), Some(3));
    assert_eq!(text(&again.stdout), "kept\n");
}

/// A free TCP port on loopback (racy by nature; the registry start is checked).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Debian's docker-registry on 127.0.0.1, stopped when dropped.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Result<Self, String> {
        let binary = "/usr/bin/docker-registry";
        if !std::path::Path::new(binary).is_file() {
            return Err(format!(
                "{binary} is missing (apt-get install docker-registry)"
            ));
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port();
        let config = dir.path().join("config.yml");
        let mut file = std::fs::File::create(&config).map_err(|e| e.to_string())?;
        write!(
            file,
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        )
        .map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self {
                    child,
                    port,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("docker-registry did not listen".into())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn docker_push_rmi_pull_round_trips_through_a_real_registry() {
    let daemon = daemon_or_skip!();
    let registry = match Registry::start() {
        Ok(registry) => registry,
        Err(reason) => return skip(&reason),
    };
    daemon.load_busybox();
    let target = format!("127.0.0.1:{}/test/busybox:v1", registry.port);

    daemon.docker_ok(&["tag", "busybox", &target]);
    let pushed = daemon.docker_ok(&["push", &target]);
    let id_before = daemon.docker_ok(&["image", "inspect", "--format", "{{.Id}}", &target]);
    daemon.docker_ok(&["rmi", &target]);
    let pulled = daemon.docker_ok(&["pull", &target]);
    let id_after = daemon.docker_ok(&["image", "inspect", "--format", "{{.Id}}", &target]);
    let digests = daemon.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &target,
    ]);
    let df = daemon.docker_ok(&["system", "df"]);

    let digest = pushed
        .lines()
        .find_map(|l| l.split("digest: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("push prints the digest")
        .to_owned();
    assert!(pulled.contains(&digest), "{pulled}");
    assert_eq!(id_before, id_after);
    assert!(digests.contains(&digest), "{digests}");
    assert!(df.contains("Images"), "{df}");
}

#[test]
fn docker_py_runs_logs_execs_and_removes() {
    let daemon = daemon_or_skip!();
    if Command::new("python3")
        .args(["-c", "import docker"])
        .status()
        .map_or(true, |s| !s.success())
    {
        return skip("docker-py is not installed (pip install docker)");
    }
    daemon.load_busybox();
    let script = r#"
import docker, sys
client = docker.DockerClient(base_url=sys.argv[1])
c = client.containers.run("busybox", ["sh", "-c", "echo from-py; sleep 600"], detach=True, name="py")
import time
for _ in range(300):
    if b"from-py" in c.logs():
        break
    time.sleep(0.1)
print(c.logs().decode().strip())
code, out = c.exec_run(["sh", "-c", "echo exec-py; exit 4"])
print(code, out.decode().strip())
c.remove(force=True)
print(len(client.containers.list(all=True)))
"#;

    let output = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "180",
            "python3",
            "-c",
            script,
            &daemon.docker_host(),
        ])
        .output()
        .expect("python3 runs");

    assert!(
        output.status.success(),
        "{}\n{}",
        text(&output.stderr),
        daemon.log()
    );
    assert_eq!(text(&output.stdout), "from-py\n4 exec-py\n0\n");
}
