//! `berth bench fs`: file I/O on a bind mount inside a container against the same commands
//! run natively on the host, over the same host directory, in the same run.
//!
//! Both sides run the same busybox shell snippets: sequential write (`dd` with `fsync`),
//! sequential read right after (warm caches on both sides: a container cannot drop the
//! guest's page cache), then creating, stat-ing (`ls -l`) and removing many small files. The
//! container side runs each snippet with `docker exec` in one running container and subtracts
//! the median cost of an empty `docker exec`, so the figure is the I/O, not the exec.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_engine::select_backend;
use berth_engine::vm::{BackendKind, VmBackend};

use crate::bench::{docker, median, record_section, start_daemon, RunTools};

/// Empty execs measured to subtract the exec overhead.
const OVERHEAD_SAMPLES: usize = 5;

/// What `bench fs` measures.
#[derive(Debug)]
pub struct FsBenchConfig {
    /// Bytes written and read sequentially, in MiB.
    pub size_mib: u64,
    /// Small files created, stat-ed and removed.
    pub files: u64,
}

/// One workload: a name and the shell snippet run in the shared directory.
fn workloads(config: &FsBenchConfig) -> Vec<(String, String)> {
    let files = config.files;
    vec![
        (
            format!("sequential write, {} MiB (dd, fsync)", config.size_mib),
            format!(
                "dd if=/dev/zero of=big bs=1M count={} conv=fsync 2>/dev/null",
                config.size_mib
            ),
        ),
        (
            format!("sequential read, {} MiB (dd, warm)", config.size_mib),
            "dd if=big of=/dev/null bs=1M 2>/dev/null && rm big".to_owned(),
        ),
        (
            format!("create {files} small files"),
            format!(
                "mkdir d && i=0; while [ $i -lt {files} ]; do echo x > d/f$i; i=$((i+1)); done"
            ),
        ),
        (
            format!("stat {files} small files (ls -l)"),
            "ls -l d > /dev/null".to_owned(),
        ),
        (format!("remove {files} small files"), "rm -r d".to_owned()),
    ]
}

/// Runs the benchmark through a fresh berthd.
pub fn run(
    config: &FsBenchConfig,
    archive: &Path,
    tools: &RunTools,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    // Under the system temp dir: one of berthd's default shared roots.
    let shared = tempfile::Builder::new()
        .prefix("berth-bench-fs-")
        .tempdir_in(std::env::temp_dir())
        .context("creating the shared directory")?;
    let native_dir = shared.path().join("native");
    let container_dir = shared.path().join("container");
    fs::create_dir(&native_dir).context("creating the native directory")?;
    fs::create_dir(&container_dir).context("creating the container directory")?;
    let log = fs::File::create(work.path().join("berthd.log")).context("creating the log")?;
    let daemon = start_daemon(tools, work.path(), &log)?;
    let socket = work.path().join("docker.sock");
    docker(
        tools,
        &socket,
        &["load", "-i", &archive.display().to_string()],
    )?;
    let bind = format!("{}:/work", container_dir.display());
    docker(
        tools,
        &socket,
        &[
            "run", "-d", "--name", "fsbench", "-v", &bind, "-w", "/work", "busybox", "sleep",
            "100000",
        ],
    )?;
    let mut overhead = Vec::new();
    for _ in 0..OVERHEAD_SAMPLES {
        let started = Instant::now();
        docker(tools, &socket, &["exec", "fsbench", "true"])?;
        overhead.push(started.elapsed());
    }
    let overhead = median(&mut overhead);
    eprintln!("docker exec overhead: {} ms", overhead.as_millis());

    let mut rows = Vec::new();
    for (name, script) in workloads(config) {
        let started = Instant::now();
        docker(tools, &socket, &["exec", "fsbench", "sh", "-c", &script])?;
        let in_container = started.elapsed().saturating_sub(overhead);
        // The same in the container's own root (overlay on the data disk): what the guest's
        // emulated CPU costs without virtio-fs.
        let own_root = format!("mkdir -p /scratch && cd /scratch && {script}");
        let started = Instant::now();
        docker(tools, &socket, &["exec", "fsbench", "sh", "-c", &own_root])?;
        let in_rootfs = started.elapsed().saturating_sub(overhead);
        let native = time_native(&tools.busybox, &native_dir, &script)?;
        eprintln!(
            "{name}: container bind {} ms, container rootfs {} ms, native {} ms",
            in_container.as_millis(),
            in_rootfs.as_millis(),
            native.as_millis()
        );
        rows.push(Row {
            name,
            bind: in_container,
            rootfs: in_rootfs,
            native,
        });
    }
    docker(tools, &socket, &["rm", "-f", "fsbench"])?;
    drop(daemon);
    let backend = select_backend().backend;
    let markdown = report(config, &rows, overhead, backend.as_ref());
    println!("{markdown}");
    if let Some(path) = record {
        // Figures on berth-vmm (the KVM box) and on QEMU are kept apart.
        let section = match backend.kind() {
            BackendKind::Vmm => "vmm-fs",
            BackendKind::Qemu => "fs",
        };
        record_section(path, section, &markdown)?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

fn time_native(busybox: &PathBuf, dir: &Path, script: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new(busybox)
        .args(["sh", "-c", script])
        .current_dir(dir)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", busybox.display()))?;
    if !status.success() {
        bail!("the native run of {script:?} failed: {status}");
    }
    Ok(started.elapsed())
}

/// One workload's figures.
struct Row {
    name: String,
    bind: Duration,
    rootfs: Duration,
    native: Duration,
}

fn report(
    config: &FsBenchConfig,
    rows: &[Row],
    overhead: Duration,
    backend: &dyn VmBackend,
) -> String {
    let mut text = format!(
        "Command: `berth bench fs --size-mib {} --files {} --archive <busybox.tar> --record docs/benchmarks.md`\n\n\
         | workload | container, bind mount | native, same host dir | bind vs native | container, own root (data disk) | bind vs own root |\n|---|---|---|---|---|---|\n",
        config.size_mib, config.files
    );
    for row in rows {
        let speed = row.native.as_secs_f64() / row.bind.as_secs_f64().max(1e-9) * 100.0;
        let against_disk = row.rootfs.as_secs_f64() / row.bind.as_secs_f64().max(1e-9) * 100.0;
        text.push_str(&format!(
            "| {} | {} ms | {} ms | {speed:.0}% | {} ms | {against_disk:.0}% |\n",
            row.name,
            row.bind.as_millis(),
            row.native.as_millis(),
            row.rootfs.as_millis()
        ));
    }
    text.push_str(&format!(
        "\nAccelerator: {:?}, {}. Speeds are time ratios (100% = as fast). The own root is the \
         container's overlayfs, whose upper layer is on the guest's ext4 data disk (virtio-blk): \
         the same work without virtio-fs. Container figures exclude the median `docker exec` overhead ({} ms). \
         Under TCG the guest's CPU work is emulated, so every container figure is inflated; the \
         goals (80% of native sequential, 50% small files) apply where hardware KVM exists.",
        backend.accel(),
        backend.describe(),
        overhead.as_millis()
    ));
    text
}
