//! `berth bench ports`: a published port's connection rate and throughput against the same
//! client and server on the host's loopback, in the same run.
//!
//! Server: busybox httpd serving a small page and a large file, once in a container behind
//! `-p 127.0.0.1:<port>:80` (host → berthd → vsock stream → agent → container), once natively
//! on the host's loopback (the anchor). Client: this process, HTTP/1.0, one connection per
//! request, every answer read to EOF and its length checked.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::{docker, record_section, start_daemon, RunTools};

/// The small page's contents.
const PAGE: &[u8] = b"berth-bench-page\n";
/// How long a server may take to answer its first request.
const READY: Duration = Duration::from_secs(120);

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct PortsPlan {
    /// Sequential small requests per side.
    pub requests: usize,
    /// Downloads of the large file per side.
    pub downloads: usize,
    /// The large file's size in MiB.
    pub size_mib: usize,
}

/// One side's figures.
#[derive(Debug, Clone, Copy)]
struct Figures {
    requests_per_second: f64,
    mib_per_second: f64,
}

/// Runs the benchmark and prints (and optionally records) the table.
pub fn run(
    plan: &PortsPlan,
    archive: &Path,
    tools: &RunTools,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    if plan.requests == 0 || plan.downloads == 0 || plan.size_mib == 0 {
        bail!("--requests, --downloads and --size-mib must be at least 1");
    }
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let log = fs::File::create(work.path().join("berthd.log")).context("creating the log")?;
    let daemon = start_daemon(tools, work.path(), &log)?;
    docker(
        tools,
        &daemon.socket,
        &["load", "-i", &archive.display().to_string()],
    )?;
    let port = free_port()?;
    let script = format!(
        "mkdir -p /www && printf '{}' > /www/index.html && \
         dd if=/dev/zero of=/www/big bs=1048576 count={} 2>/dev/null && \
         exec httpd -f -p 80 -h /www",
        String::from_utf8_lossy(PAGE).trim_end().to_owned() + "\\n",
        plan.size_mib
    );
    docker(
        tools,
        &daemon.socket,
        &[
            "run",
            "-d",
            "--name",
            "bench-web",
            "-p",
            &format!("127.0.0.1:{port}:80"),
            "busybox",
            "sh",
            "-c",
            &script,
        ],
    )?;
    wait_ready(port)?;
    let berth = measure(plan, port)?;
    eprintln!("berth: {berth:?}");

    let www = work.path().join("www");
    fs::create_dir_all(&www).context("creating the anchor's web root")?;
    fs::write(www.join("index.html"), PAGE).context("writing the page")?;
    fs::write(www.join("big"), vec![0u8; plan.size_mib << 20]).context("writing the file")?;
    let anchor_port = free_port()?;
    let anchor = AnchorServer::start(tools, anchor_port, &www)?;
    wait_ready(anchor_port)?;
    let native = measure(plan, anchor_port)?;
    drop(anchor);
    eprintln!("anchor: {native:?}");
    drop(daemon);

    let table = markdown(plan, berth, native);
    println!("{table}");
    if let Some(path) = record {
        record_section(path, "ports", &table)?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

fn markdown(plan: &PortsPlan, berth: Figures, native: Figures) -> String {
    format!(
        "Command: `berth bench ports --requests {requests} --downloads {downloads} --size-mib {size} \
         --archive <busybox.tar> --record docs/benchmarks.md`\n\n\
         | figure | published port (berth) | host loopback (anchor) | berth / anchor |\n\
         |---|---|---|---|\n\
         | connection rate: sequential HTTP/1.0 GETs of a 17-byte page, one connection each | \
         {br:.0} req/s | {nr:.0} req/s | {rr:.3} |\n\
         | throughput: download of a {size} MiB file, best of {downloads} | {bt:.1} MiB/s | \
         {nt:.1} MiB/s | {rt:.3} |\n\n\
         Server: busybox httpd (the container's, and the host's `busybox httpd` for the anchor); \
         client: `berth` itself. The VM runs under TCG on these machines, so the guest side \
         (agent and container) dominates the published-port figures.",
        requests = plan.requests,
        downloads = plan.downloads,
        size = plan.size_mib,
        br = berth.requests_per_second,
        nr = native.requests_per_second,
        rr = berth.requests_per_second / native.requests_per_second.max(1e-9),
        bt = berth.mib_per_second,
        nt = native.mib_per_second,
        rt = berth.mib_per_second / native.mib_per_second.max(1e-9),
    )
}

fn measure(plan: &PortsPlan, port: u16) -> anyhow::Result<Figures> {
    let started = Instant::now();
    for i in 0..plan.requests {
        let body = get(port, "/index.html").with_context(|| format!("request {i}"))?;
        if body != PAGE {
            bail!("request {i} got {} bytes, not the page", body.len());
        }
    }
    let requests_per_second = plan.requests as f64 / started.elapsed().as_secs_f64();
    let mut best = Duration::MAX;
    for i in 0..plan.downloads {
        let started = Instant::now();
        let body = get(port, "/big").with_context(|| format!("download {i}"))?;
        let took = started.elapsed();
        if body.len() != plan.size_mib << 20 {
            bail!("download {i} got {} bytes", body.len());
        }
        best = best.min(took);
    }
    Ok(Figures {
        requests_per_second,
        mib_per_second: plan.size_mib as f64 / best.as_secs_f64(),
    })
}

/// One HTTP/1.0 GET; the body.
fn get(port: u16, path: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).context("connecting")?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .context("setting a timeout")?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .context("sending the request")?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .context("reading the answer")?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("an answer without headers")?;
    if !answer.starts_with(b"HTTP/1.") || !answer[..split].windows(3).any(|w| w == b"200") {
        bail!("not a 200 answer");
    }
    Ok(answer.split_off(split + 4))
}

fn wait_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY;
    loop {
        match get(port, "/index.html") {
            Ok(body) if body == PAGE => return Ok(()),
            _ if Instant::now() > deadline => bail!("no server answered on port {port}"),
            _ => thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a port")?;
    Ok(listener.local_addr().context("reading the port")?.port())
}

/// busybox httpd on the host's loopback, killed when dropped.
struct AnchorServer(Child);

impl AnchorServer {
    fn start(tools: &RunTools, port: u16, root: &Path) -> anyhow::Result<Self> {
        let child = Command::new(&tools.busybox)
            .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
            .arg(root)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} httpd", tools.busybox.display()))?;
        Ok(Self(child))
    }
}

impl Drop for AnchorServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
