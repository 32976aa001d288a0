//! Tier 3, networking: the stock docker CLI against a real berthd whose containers run in a VM
//! booted from our kernel. Containers on the default bridge, `--network none|host`,
//! `--add-host`/`--dns`/`--hostname`, and published ports served to clients on the host's
//! loopback (the only network these tests touch).
//!
//! A scenario that cannot run here (no kernel built, no docker CLI) skips with the reason, and
//! fails under CI.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use berth_tests::daemon::TestDaemon;
use berth_tests::{daemon_or_skip, skip, text};

/// The page the test web server serves.
const PAGE: &str = "hello-from-berth";

/// How long a containerised server may take to answer its first request (TCG is slow).
const SERVER_READY: Duration = Duration::from_secs(60);

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Runs busybox httpd serving [`PAGE`] on port 80 in a detached container.
fn run_web(daemon: &TestDaemon, name: &str, extra: &[&str]) {
    let script =
        format!("mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 80 -h /www");
    let mut args = vec!["run", "-d", "--name", name];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["busybox", "sh", "-c", &script]);
    daemon.docker_ok(&args);
}

/// One HTTP/1.0 GET of `/` on the host's loopback; the whole answer.
fn http_get(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Retries [`http_get`] until the page comes back: the server starts after `docker run`.
fn wait_for_page(port: u16) -> String {
    let deadline = Instant::now() + SERVER_READY;
    loop {
        match http_get(port) {
            Ok(answer) if answer.contains(PAGE) => return answer,
            other if Instant::now() > deadline => panic!("no page on port {port}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read berthd's fds")
        .count()
}

#[test]
fn published_port_serves_a_busybox_httpd_page_to_a_host_client() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");

    run_web(&daemon, "web", &["-p", &publish]);
    let answer = wait_for_page(port);
    let port_line = daemon.docker_ok(&["port", "web"]);
    let ps = daemon.docker_ok(&["ps", "--format", "{{.Names}} {{.Ports}}"]);
    let address = daemon.docker_ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.Networks.bridge.Gateway}} {{.NetworkSettings.MacAddress}}",
        "web",
    ]);
    daemon.docker_ok(&["rm", "-f", "web"]);
    let closed = TcpStream::connect((Ipv4Addr::LOCALHOST, port));

    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert_eq!(port_line.trim(), format!("80/tcp -> 127.0.0.1:{port}"));
    assert_eq!(ps.trim(), format!("web 127.0.0.1:{port}->80/tcp"));
    assert_eq!(
        address.trim(),
        "172.17.0.2 172.17.0.1 02:42:ac:11:00:02",
        "the first container gets the first address"
    );
    assert!(closed.is_err(), "the forwarder ends with the container");
}

#[test]
fn containers_on_the_default_bridge_reach_each_other() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    run_web(&daemon, "server", &[]);
    let address = daemon.docker_ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.IPAddress}}",
        "server",
    ]);
    let url = format!("http://{}/", address.trim());
    // Retried in the client: the server may still be starting.
    let script =
        format!("for i in $(seq 60); do wget -q -O - {url} && exit 0; sleep 1; done; exit 1");

    let fetched = daemon.docker(&["run", "--rm", "busybox", "sh", "-c", &script]);

    assert!(fetched.status.success(), "{}", text(&fetched.stderr));
    assert_eq!(text(&fetched.stdout).trim(), PAGE);
    daemon.docker_ok(&["rm", "-f", "server"]);
}

#[test]
fn network_modes_none_and_host_and_bridge_see_their_interfaces() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let links = "ip -o link | cut -d: -f2 | tr -d ' ' | sort | tr '\\n' ' '";

    let none = daemon.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        links,
    ]);
    let bridge = daemon.docker_ok(&["run", "--rm", "busybox", "sh", "-c", links]);
    let routes = daemon.docker_ok(&["run", "--rm", "busybox", "ip", "route"]);
    let host = daemon.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "host",
        "busybox",
        "sh",
        "-c",
        links,
    ]);

    assert_eq!(none.trim(), "lo");
    assert!(bridge.starts_with("eth0@"), "{bridge}");
    assert!(bridge.trim_end().ends_with("lo"), "{bridge}");
    assert!(
        routes.contains("default via 172.17.0.1 dev eth0"),
        "{routes}"
    );
    assert!(host.contains("berth0"), "the guest's own namespace: {host}");
}

#[test]
fn hostname_add_host_and_dns_reach_the_containers_files() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();

    let shown = daemon.docker_ok(&[
        "run",
        "--rm",
        "--hostname",
        "box1",
        "--add-host",
        "db:10.1.2.3",
        "--dns",
        "192.0.2.53",
        "--dns-search",
        "example.test",
        "busybox",
        "sh",
        "-c",
        "hostname; cat /etc/hosts /etc/resolv.conf",
    ]);

    assert!(shown.starts_with("box1\n"), "{shown}");
    assert!(shown.contains("10.1.2.3\tdb\n"), "{shown}");
    assert!(shown.contains("172.17.0.2\tbox1\n"), "{shown}");
    assert!(shown.contains("nameserver 192.0.2.53\n"), "{shown}");
    assert!(shown.contains("search example.test\n"), "{shown}");
}

#[test]
fn publishing_a_port_in_use_fails_the_start_with_dockers_message() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = taken.local_addr().expect("address").port();
    let publish = format!("127.0.0.1:{port}:80");

    let run = daemon.docker(&[
        "run", "-d", "--name", "clash", "-p", &publish, "busybox", "sleep", "60",
    ]);
    let bad_spec = daemon.docker(&["run", "--rm", "-p", "127.0.0.1:70000:80", "busybox", "true"]);
    let next = daemon.docker_ok(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "ip -o -4 addr show eth0",
    ]);

    assert_eq!(run.status.code(), Some(125), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains(&format!(
            "Bind for 127.0.0.1:{port} failed: port is already allocated"
        )),
        "{}",
        text(&run.stderr)
    );
    assert_ne!(bad_spec.status.code(), Some(0));
    assert!(
        next.contains("172.17.0.2/16"),
        "the failed start gave its address back: {next}"
    );
}

#[test]
fn a_thousand_requests_through_a_published_port_leak_no_descriptors() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    run_web(&daemon, "web", &["-p", &publish]);
    wait_for_page(port);
    let pid = daemon.pid().expect("berthd runs");
    // Settled: the first request's streams are closed.
    std::thread::sleep(Duration::from_secs(1));
    let before = open_fds(pid);

    for i in 0..1000 {
        let answer = http_get(port).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(answer.contains(PAGE), "request {i}: {answer}");
    }
    // Connection tasks end just after the client sees EOF; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = open_fds(pid);
    while after > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = open_fds(pid);
    }

    assert!(
        after <= before,
        "berthd had {before} fds before, {after} after"
    );
    daemon.docker_ok(&["rm", "-f", "web"]);
}

#[test]
fn a_container_reaches_a_server_on_the_hosts_loopback_by_the_host_alias() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = listener.local_addr().expect("address").port();
    // A one-shot HTTP server on the host's loopback only.
    let server = std::thread::spawn(move || {
        let (mut client, _) = listener.accept().expect("a container connects");
        let mut request = [0u8; 1024];
        let _ = client.read(&mut request);
        client
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 14\r\n\r\nhello-the-host")
            .expect("answer");
    });
    let url = format!("http://host.docker.internal:{port}/");

    let fetched = daemon.docker(&["run", "--rm", "busybox", "wget", "-q", "-O", "-", &url]);

    assert!(fetched.status.success(), "{}", text(&fetched.stderr));
    assert_eq!(text(&fetched.stdout), "hello-the-host");
    server.join().expect("the server thread ends");
}

#[test]
fn two_containers_on_a_user_network_reach_each_other_by_name_and_alias() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&["network", "create", "appnet"]);
    run_web(
        &daemon,
        "web",
        &["--network", "appnet", "--network-alias", "www"],
    );
    // Retried in the client: the server may still be starting.
    let fetch = |host: &str| {
        format!(
            "for i in $(seq 60); do wget -q -O - http://{host}/ && exit 0; sleep 1; done; exit 1"
        )
    };

    let by_name = daemon.docker(&[
        "run",
        "--rm",
        "--network",
        "appnet",
        "busybox",
        "sh",
        "-c",
        &fetch("web"),
    ]);
    let by_alias = daemon.docker(&[
        "run",
        "--rm",
        "--network",
        "appnet",
        "busybox",
        "sh",
        "-c",
        &fetch("www"),
    ]);
    let listed = daemon.docker_ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    let inspected = daemon.docker_ok(&[
        "network",
        "inspect",
        "--format",
        "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}}",
        "appnet",
    ]);
    let in_use = daemon.docker(&["network", "rm", "appnet"]);
    daemon.docker_ok(&["rm", "-f", "web"]);
    daemon.docker_ok(&["network", "rm", "appnet"]);
    let gone = daemon.docker(&["network", "inspect", "appnet"]);

    assert!(by_name.status.success(), "{}", text(&by_name.stderr));
    assert_eq!(text(&by_name.stdout).trim(), PAGE);
    assert_eq!(
        text(&by_alias.stdout).trim(),
        PAGE,
        "{}",
        text(&by_alias.stderr)
    );
    assert_eq!(
        listed,
        "appnet bridge\nbridge bridge\nhost host\nnone null\n"
    );
    assert_eq!(inspected.trim(), "172.18.0.0/16 172.18.0.1");
    assert!(
        text(&in_use.stderr).contains("has active endpoints"),
        "{}",
        text(&in_use.stderr)
    );
    assert!(
        text(&gone.stderr).contains("network appnet not found"),
        "{}",
        text(&gone.stderr)
    );
}

/// Debian's docker-compose 1.29 (`tests/install-deps.sh` installs it).
const COMPOSE: &str = "/usr/bin/docker-compose";

/// A busybox httpd and a client that fetches its page by service name.
const COMPOSE_PROJECT: &str = r#"version: "3"
services:
  web:
    image: busybox
    command: sh -c "mkdir -p /www && echo hello-compose > /www/index.html && exec httpd -f -p 80 -h /www"
  client:
    image: busybox
    depends_on: [web]
    command: sh -c "for i in $$(seq 60); do wget -q -O - http://web/ && exit 0; sleep 1; done; exit 1"
"#;

fn compose(daemon: &TestDaemon, project: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("timeout")
        .args(["-s", "KILL", "300", COMPOSE, "--no-ansi", "-p", "demo"])
        .args(args)
        .current_dir(project)
        .env("DOCKER_HOST", daemon.docker_host())
        .env("COMPOSE_INTERACTIVE_NO_CLI", "1")
        .output()
        .expect("docker-compose runs")
}

#[test]
fn compose_brings_up_a_two_service_project_and_takes_it_down() {
    if !std::path::Path::new(COMPOSE).is_file() {
        return skip(&format!(
            "{COMPOSE} is missing (tests/install-deps.sh installs it)"
        ));
    }
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let project = daemon.dir.path().join("project");
    std::fs::create_dir_all(&project).expect("project dir");
    std::fs::write(project.join("docker-compose.yml"), COMPOSE_PROJECT).expect("compose file");

    let up = compose(&daemon, &project, &["up", "-d"]);
    let deadline = Instant::now() + SERVER_READY;
    let mut logs = String::new();
    while Instant::now() < deadline && !logs.contains("hello-compose") {
        std::thread::sleep(Duration::from_millis(500));
        logs = text(&compose(&daemon, &project, &["logs", "client"]).stdout);
    }
    let ps = text(&compose(&daemon, &project, &["ps"]).stdout);
    let down = compose(&daemon, &project, &["down"]);
    // Again in the same VM: the new network gets the same subnet as the removed one.
    compose(&daemon, &project, &["up", "-d"]);
    let deadline = Instant::now() + SERVER_READY;
    let mut again = String::new();
    while Instant::now() < deadline && !again.contains("hello-compose") {
        std::thread::sleep(Duration::from_millis(500));
        again = text(&compose(&daemon, &project, &["logs", "client"]).stdout);
    }
    compose(&daemon, &project, &["down"]);
    let left = daemon.docker_ok(&["ps", "-a", "-q"]);
    let networks = daemon.docker_ok(&["network", "ls", "--format", "{{.Name}}"]);

    assert!(up.status.success(), "{}", text(&up.stderr));
    assert!(logs.contains("hello-compose"), "client logs: {logs}");
    assert!(ps.contains("demo_web_1") && ps.contains("Up"), "{ps}");
    assert!(ps.contains("demo_client_1"), "{ps}");
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        again.contains("hello-compose"),
        "second up, client logs: {again}"
    );
    assert_eq!(left, "", "down removes the containers");
    assert_eq!(networks, "bridge\nhost\nnone\n", "down removes the network");
}

/// Debian's socat (`tests/install-deps.sh` installs it): the UDP echo server of the UDP test.
const SOCAT: &str = "/usr/bin/socat";

/// Imports an image holding the host's socat and the shared libraries it links (the busybox
/// test image has no UDP server).
fn import_socat_image(daemon: &TestDaemon) {
    let root = daemon.dir.path().join("socat-root");
    let ldd = std::process::Command::new("ldd")
        .arg(SOCAT)
        .output()
        .expect("ldd runs");
    let mut files = vec![SOCAT.to_owned()];
    for line in text(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        files.extend(path.map(str::to_owned));
    }
    for file in &files {
        let target = root.join(file.trim_start_matches('/'));
        std::fs::create_dir_all(target.parent().expect("a parent")).expect("mkdir");
        // Follows symlinks: the image gets the library itself under the name ldd printed.
        std::fs::copy(file, &target).unwrap_or_else(|e| panic!("copy {file}: {e}"));
    }
    let tarball = daemon.dir.path().join("socat.tar");
    let status = std::process::Command::new("tar")
        .args(["-C"])
        .arg(&root)
        .args(["-cf"])
        .arg(&tarball)
        .arg(".")
        .status()
        .expect("tar runs");
    assert!(status.success(), "tar failed");
    daemon.docker_ok(&["import", &tarball.display().to_string(), "udpecho:1"]);
}

#[test]
fn a_published_udp_port_carries_a_datagram_both_ways() {
    if !std::path::Path::new(SOCAT).is_file() {
        return skip(&format!(
            "{SOCAT} is missing (tests/install-deps.sh installs it)"
        ));
    }
    let daemon = daemon_or_skip!();
    import_socat_image(&daemon);
    let port = {
        let probe = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        probe.local_addr().expect("address").port()
    };
    let publish = format!("127.0.0.1:{port}:5353/udp");
    daemon.docker_ok(&[
        "run",
        "-d",
        "--name",
        "echo",
        "-p",
        &publish,
        "udpecho:1",
        "/usr/bin/socat",
        "UDP4-RECVFROM:5353,fork",
        "PIPE",
    ]);
    let client = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a client");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client
        .connect((Ipv4Addr::LOCALHOST, port))
        .expect("connect");

    // Resent until answered: the server starts after `docker run` returns, and UDP may drop.
    let deadline = Instant::now() + SERVER_READY;
    let mut answer = Vec::new();
    while answer.is_empty() && Instant::now() < deadline {
        client.send(b"ping over udp").expect("send");
        let mut buffer = [0u8; 64];
        if let Ok(len) = client.recv(&mut buffer) {
            answer = buffer[..len].to_vec();
        }
    }
    let ps = daemon.docker_ok(&["ps", "--format", "{{.Ports}}"]);
    daemon.docker_ok(&["rm", "-f", "echo"]);

    assert_eq!(answer, b"ping over udp");
    assert_eq!(ps.trim(), format!("127.0.0.1:{port}->5353/udp"));
}

#[test]
fn publish_all_and_a_host_port_range_pick_free_ports() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let first = taken.local_addr().expect("address").port();
    // A two-port range whose first port is taken: the second is used.
    let range = format!("127.0.0.1:{first}-{}:80", first + 1);

    run_web(&daemon, "all", &["-P", "--expose", "80"]);
    run_web(&daemon, "ranged", &["-p", &range]);
    let all = daemon.docker_ok(&["port", "all", "80/tcp"]);
    let ranged = daemon.docker_ok(&["port", "ranged", "80/tcp"]);
    let any_port: u16 = all
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("docker port printed {all:?}"));
    let through_any = wait_for_page(any_port);
    let through_range = wait_for_page(first + 1);
    daemon.docker_ok(&["rm", "-f", "all", "ranged"]);

    assert!(all.starts_with("0.0.0.0:"), "{all}");
    assert_eq!(ranged.trim(), format!("127.0.0.1:{}", first + 1));
    assert!(through_any.contains(PAGE));
    assert!(through_range.contains(PAGE));
}

#[test]
fn a_running_container_connects_to_a_second_network_and_leaves_it() {
    let daemon = daemon_or_skip!();
    daemon.load_busybox();
    daemon.docker_ok(&["network", "create", "front"]);
    daemon.docker_ok(&["network", "create", "back"]);
    run_web(&daemon, "web", &["--network", "front"]);
    let script = "for i in $(seq 60); do wget -q -O - http://web/ && exit 0; sleep 1; done; exit 1";

    daemon.docker_ok(&["network", "connect", "back", "web"]);
    let links = daemon.docker_ok(&[
        "exec",
        "web",
        "sh",
        "-c",
        "ip -o link | cut -d: -f2 | tr -d ' '",
    ]);
    let from_back = daemon.docker(&[
        "run",
        "--rm",
        "--network",
        "back",
        "busybox",
        "sh",
        "-c",
        script,
    ]);
    let inspected = daemon.docker_ok(&[
        "inspect",
        "--format",
        "{{range $name, $n := .NetworkSettings.Networks}}{{$name}} {{end}}",
        "web",
    ]);
    daemon.docker_ok(&["network", "disconnect", "back", "web"]);
    let after = daemon.docker_ok(&[
        "exec",
        "web",
        "sh",
        "-c",
        "ip -o link | cut -d: -f2 | tr -d ' '",
    ]);
    daemon.docker_ok(&["rm", "-f", "web"]);

    assert!(links.contains("eth1@"), "{links}");
    assert!(from_back.status.success(), "{}", text(&from_back.stderr));
    assert_eq!(text(&from_back.stdout).trim(), PAGE);
    assert_eq!(inspected.trim(), "back front");
    assert!(!after.contains("eth1"), "{after}");
}
