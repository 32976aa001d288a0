//! Tier 1: containers through the real `berth-agent` binary in native mode (`--listen-unix`),
//! driven over the real protocol: control requests on the unix socket, stdio on stream
//! connections to `<socket>.streams`. Needs root, overlayfs, cgroup v2 (any controllers: the
//! cgroup root is wherever cgroup2 is mounted, `/sys/fs/cgroup/unified` on a hybrid host) and
//! Debian's `busybox-static`; each test says why it skips (and fails instead under `CI=true`).

#[path = "../../container/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use agent_protocol::{
    read_frame, stream_socket_path, write_frame, ContainerConfig, ContainerRef, CreateContainer,
    ExecProcess, ExecRef, ExitInfo, Hello, OverlayDirs, Request, RequestEnvelope, Response,
    ResponseEnvelope, StreamAccept, StreamHeader, StreamKind, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use berth_container::docker_default_spec;

/// Generous bound for the agent to start or answer on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The cgroup parent of the test containers, under the host's cgroup v2 mount.
const CGROUP_PARENT: &str = "berth-agent-test";

/// The agent process, killed when the test ends.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    fn start(socket: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
            .arg("--listen-unix")
            .arg(socket)
            .stderr(Stdio::piped())
            .spawn()
            .expect("the agent binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if line.starts_with("berth-agent: ready on unix socket") {
                    let _ = ready_tx.send(());
                }
            }
        });
        ready_rx
            .recv_timeout(TIMEOUT)
            .expect("the agent logs that it is ready");
        Self {
            child,
            socket: socket.to_owned(),
        }
    }

    /// A handshaken control connection.
    fn connect(&self) -> Control {
        let stream = UnixStream::connect(&self.socket).expect("connect to the agent");
        // A hung agent fails the test instead of hanging it.
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout set");
        let mut control = Control { stream, next_id: 1 };
        control.call(Request::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            host_time_unix_nanos: 0,
        }));
        control
    }

    /// Opens a stream as the host does.
    fn stream(&self, id: &str, exec_id: Option<&str>, kind: StreamKind) -> UnixStream {
        let mut stream = UnixStream::connect(stream_socket_path(&self.socket))
            .expect("connect to the stream socket");
        let header = StreamHeader {
            container_id: id.to_owned(),
            exec_id: exec_id.map(str::to_owned),
            kind,
        };
        write_frame(&mut stream, &header).expect("header written");
        let accept: StreamAccept = read_frame(&mut stream)
            .expect("accept read")
            .expect("the agent answered the header");
        accept.result.expect("the agent accepted the stream");
        stream
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control connection.
struct Control {
    stream: UnixStream,
    next_id: u64,
}

impl Control {
    fn call(&mut self, request: Request) -> Response {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.stream, &RequestEnvelope { id, request }).expect("request written");
        let response: ResponseEnvelope = read_frame(&mut self.stream)
            .expect("response read")
            .expect("the agent answered");
        assert_eq!(response.id, id);
        response.result.expect("the agent accepted the request")
    }

    fn done(&mut self, request: Request) {
        assert_eq!(self.call(request), Response::Done);
    }

    fn exited(&mut self, request: Request) -> ExitInfo {
        match self.call(request) {
            Response::Exited(exit) => exit,
            other => panic!("unexpected answer {other:?}"),
        }
    }
}

/// A container's on-disk pieces (busybox lower layer, upper, work, mount point) and its
/// creation request.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    id: String,
    agent: Agent,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        support::busybox_rootfs(&dir.join("lower"));
        for sub in ["upper", "work", "rootfs"] {
            std::fs::create_dir(dir.join(sub)).expect("dir");
        }
        let agent = Agent::start(&dir.join("agent.sock"));
        Self {
            _tmp: tmp,
            id: format!("{name}-{}", std::process::id()),
            dir,
            agent,
        }
    }

    fn create(&self, control: &mut Control, args: &[&str], stdin: bool) {
        let spec = docker_default_spec(args.iter().map(|s| s.to_string()).collect()).expect("spec");
        let config = ContainerConfig {
            spec,
            rootfs: self.dir.join("rootfs"),
            overlay: Some(OverlayDirs {
                lower_dirs: vec![self.dir.join("lower")],
                upper_dir: Some(self.dir.join("upper")),
                work_dir: Some(self.dir.join("work")),
            }),
            cgroup_parent: PathBuf::from(CGROUP_PARENT),
            hostname_file: Some("agent-test\n".into()),
            hosts_file: None,
            resolv_conf_file: None,
            seccomp_unconfined: false,
            network: None,
        };
        control.done(Request::CreateContainer(CreateContainer {
            id: self.id.clone(),
            config: Box::new(config),
            stdin,
            tty: false,
        }));
    }

    fn container(&self) -> ContainerRef {
        ContainerRef {
            id: self.id.clone(),
        }
    }

    /// Reads a stream of the init (or an exec) to its end, on a thread.
    fn read(&self, exec_id: Option<&str>, kind: StreamKind) -> JoinHandle<Vec<u8>> {
        let mut stream = self.agent.stream(&self.id, exec_id, kind);
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout set");
        thread::spawn(move || {
            let mut data = Vec::new();
            stream.read_to_end(&mut data).expect("stream read");
            data
        })
    }
}

fn can_run(test: &str) -> bool {
    support::can_run(test, &support::need_container(&[]))
}

/// Runs `args` as a container's init, attached before start; returns the exit and output.
fn run(fixture: &Fixture, args: &[&str]) -> (ExitInfo, Vec<u8>, Vec<u8>) {
    let mut control = fixture.agent.connect();
    fixture.create(&mut control, args, false);
    let stdout = fixture.read(None, StreamKind::Stdout);
    let stderr = fixture.read(None, StreamKind::Stderr);

    control.done(Request::StartContainer(fixture.container()));
    let exit = control.exited(Request::WaitContainer(fixture.container()));
    let output = (
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    );
    control.done(Request::DeleteContainer(fixture.container()));
    (exit, output.0, output.1)
}

#[test]
fn agent_container_exit_code_and_stdio_kept_apart() {
    if !can_run("agent_container_exit_code_and_stdio_kept_apart") {
        return;
    }
    let fixture = Fixture::new("agent-stdio");

    let (exit, stdout, stderr) = run(&fixture, &["sh", "-c", "echo out; echo err >&2; exit 7"]);

    assert_eq!(
        exit,
        ExitInfo {
            code: 7,
            signal: None,
            oom_killed: false
        }
    );
    assert_eq!(String::from_utf8_lossy(&stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&stderr), "err\n");
}

#[test]
fn agent_container_ten_megabytes_arrive_byte_exact() {
    if !can_run("agent_container_ten_megabytes_arrive_byte_exact") {
        return;
    }
    /// 10 MiB: far more than a pipe (64 KiB) and a socket buffer hold, written as fast as the
    /// process can, which then exits at once.
    const SIZE: usize = 10 << 20;
    let fixture = Fixture::new("agent-huge");
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz\n";
    let expected: Vec<u8> = line.iter().copied().cycle().take(SIZE).collect();

    let (exit, stdout, _) = run(
        &fixture,
        &[
            "sh",
            "-c",
            &format!("yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {SIZE}"),
        ],
    );

    assert_eq!(exit.code, 0);
    assert_eq!(stdout.len(), SIZE);
    assert!(
        stdout == expected,
        "the output differs from what was written"
    );
}

#[test]
fn agent_container_stdin_stream_end_closes_stdin() {
    if !can_run("agent_container_stdin_stream_end_closes_stdin") {
        return;
    }
    let fixture = Fixture::new("agent-stdin");
    let mut control = fixture.agent.connect();
    fixture.create(&mut control, &["cat"], true);
    let stdout = fixture.read(None, StreamKind::Stdout);
    let mut stdin = fixture.agent.stream(&fixture.id, None, StreamKind::Stdin);
    control.done(Request::StartContainer(fixture.container()));

    stdin
        .write_all(b"through the stream\n")
        .expect("stdin written");
    stdin
        .shutdown(std::net::Shutdown::Write)
        .expect("stdin half-closed");
    let exit = control.exited(Request::WaitContainer(fixture.container()));

    assert_eq!(exit.code, 0);
    assert_eq!(
        String::from_utf8_lossy(&stdout.join().expect("stdout reader")),
        "through the stream\n"
    );
    control.done(Request::DeleteContainer(fixture.container()));
}

#[test]
fn agent_exec_sees_container_pid_namespace() {
    if !can_run("agent_exec_sees_container_pid_namespace") {
        return;
    }
    let fixture = Fixture::new("agent-exec");
    let mut control = fixture.agent.connect();
    fixture.create(&mut control, &["sleep", "100"], false);
    control.done(Request::StartContainer(fixture.container()));
    let spec = docker_default_spec(vec![
        "sh".into(),
        "-c".into(),
        "cat /proc/1/cmdline; echo; ps -o comm | grep -cx sleep".into(),
    ])
    .expect("spec");
    let process = spec.process().clone().expect("process");

    control.done(Request::ExecProcess(ExecProcess {
        id: fixture.id.clone(),
        exec_id: "e1".into(),
        process: Box::new(process),
        tty: false,
        stdin: false,
    }));
    let stdout = fixture.read(Some("e1"), StreamKind::Stdout);
    let exit = control.exited(Request::WaitExec(ExecRef {
        id: fixture.id.clone(),
        exec_id: "e1".into(),
    }));
    let stdout = String::from_utf8_lossy(&stdout.join().expect("stdout reader")).into_owned();
    control.done(Request::DeleteContainer(fixture.container()));

    assert_eq!(exit.code, 0);
    // The container's init is pid 1 of the namespace the exec joined, and `ps` there sees one
    // `sleep` (the host's view would also show those of the other tests' containers).
    assert_eq!(stdout, "sleep\u{0}100\u{0}\n1\n");
}

#[test]
fn agent_delete_leaves_no_mount_or_cgroup() {
    if !can_run("agent_delete_leaves_no_mount_or_cgroup") {
        return;
    }
    let fixture = Fixture::new("agent-delete");
    let mut control = fixture.agent.connect();
    fixture.create(&mut control, &["sleep", "100"], false);
    control.done(Request::StartContainer(fixture.container()));
    let cgroup = support::cgroup2_mount()
        .expect("cgroup v2 mount")
        .join(CGROUP_PARENT)
        .join(&fixture.id);
    assert!(cgroup.exists());

    control.done(Request::DeleteContainer(fixture.container()));

    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let dir = fixture.dir.to_str().expect("utf-8 path");
    assert!(!mountinfo.contains(dir), "{mountinfo}");
    assert!(!cgroup.exists());
}

#[test]
fn agent_unpack_layer_reads_upload_stream() {
    if !support::can_run(
        "agent_unpack_layer_reads_upload_stream",
        &support::need_root(),
    ) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let source = tmp.path().join("source");
    let layer = tmp.path().join("layer");
    std::fs::create_dir_all(source.join("etc")).expect("source dir");
    std::fs::create_dir(&layer).expect("layer dir");
    std::fs::write(source.join("etc/motd"), "from a layer\n").expect("file");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&source)
        .args(["-cf", "-", "."])
        .output()
        .expect("tar runs");
    assert!(tar.status.success());
    let agent = Agent::start(&tmp.path().join("agent.sock"));
    let mut control = agent.connect();
    let mut upload = agent.stream("upload-1", None, StreamKind::LayerUpload);
    let writer = thread::spawn(move || {
        upload.write_all(&tar.stdout).expect("layer written");
        upload
            .shutdown(std::net::Shutdown::Write)
            .expect("upload half-closed");
    });

    let answer = control.call(Request::UnpackLayer(agent_protocol::UnpackLayer {
        upload_id: "upload-1".into(),
        dir: layer.clone(),
        allow_devices: false,
    }));
    writer.join().expect("writer");

    assert!(matches!(answer, Response::Unpacked(u) if u.entries >= 3));
    assert_eq!(
        std::fs::read_to_string(layer.join("etc/motd")).expect("unpacked file"),
        "from a layer\n"
    );
}
