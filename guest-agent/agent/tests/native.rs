//! Tier 1: the real `berth-agent` binary, started natively with `--listen-unix`, driven over the
//! real protocol. Needs no root, KVM or network.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agent_protocol::{
    read_frame, write_frame, Hello, Request, RequestEnvelope, Response, ResponseEnvelope,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// Generous bound for the agent to start, answer or exit on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The agent process, killed if the test fails before it exits.
struct Agent {
    child: Child,
}

impl Agent {
    /// Starts the agent on a unix socket at `socket` and waits for its "ready" line.
    fn start(socket: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
            .arg("--listen-unix")
            .arg(socket)
            .stderr(Stdio::piped())
            .spawn()
            .expect("the agent binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        // Keeps draining stderr after "ready" so the agent never blocks on a full pipe.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if line.starts_with("berth-agent: ready on unix socket") {
                    let _ = ready_tx.send(());
                }
            }
        });
        let agent = Self { child };
        ready_rx
            .recv_timeout(TIMEOUT)
            .expect("the agent logs that it is ready");
        agent
    }

    fn wait(mut self, timeout: Duration) -> ExitStatus {
        let give_up = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait works") {
                return status;
            }
            assert!(Instant::now() < give_up, "the agent did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn call(stream: &mut UnixStream, id: u64, request: Request) -> Response {
    write_frame(stream, &RequestEnvelope { id, request }).expect("request written");
    let response: ResponseEnvelope = read_frame(stream)
        .expect("response read")
        .expect("the agent answered");
    assert_eq!(response.id, id);
    response.result.expect("the agent accepted the request")
}

fn host_kernel_release() -> String {
    let output = Command::new("uname")
        .arg("-r")
        .output()
        .expect("uname runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn agent_native_serves_handshake_ping_system_info_and_exits_on_shutdown() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let agent = Agent::start(&socket);
    let mut stream = UnixStream::connect(&socket).expect("connect to the agent");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout set");
    let host_time_unix_nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();

    let hello = call(
        &mut stream,
        1,
        Request::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            host_time_unix_nanos,
        }),
    );
    let pong = call(&mut stream, 2, Request::Ping);
    let info = call(&mut stream, 3, Request::SystemInfo);
    let done = call(&mut stream, 4, Request::Shutdown);
    drop(stream);
    let status = agent.wait(TIMEOUT);

    let Response::Hello(ack) = hello else {
        panic!("unexpected answer to Hello: {hello:?}");
    };
    assert_eq!(ack.version, PROTOCOL_VERSION);
    assert_eq!(ack.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(pong, Response::Pong);
    let Response::SystemInfo(info) = info else {
        panic!("unexpected answer to SystemInfo: {info:?}");
    };
    assert_eq!(info.kernel_release, host_kernel_release());
    assert_eq!(info.boot_id, ack.boot_id);
    assert_eq!(done, Response::Done);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn agent_native_unknown_argument_exits_with_usage_error() {
    let status = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .arg("--bogus")
        .stderr(Stdio::null())
        .status()
        .expect("the agent binary runs");

    assert_eq!(status.code(), Some(2));
}
