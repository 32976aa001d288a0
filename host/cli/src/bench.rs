//! `berth bench`: figures with an anchor measured in the same place and the same run.
//!
//! Absolute times on these machines (TCG, PVM, a loaded CI box) mean little; a ratio against an
//! anchor run interleaved with ours does. `bench boot` compares "process start to agent
//! handshake" for Berth with "QEMU start to a trivial `/init` printing a line" for QEMU microvm
//! booting the same kernel with the same machine options.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use berth_engine::vm::qemu::{qemu_args, Accel, QemuBackend};
use berth_engine::vm::BackendKind;
use berth_engine::vm::{error_chain, VmBackend};
use berth_engine::{select_backend, Vm, VmConfig};
use berth_vm_image::{Entry, EntryKind, Initramfs};
use clap::Subcommand;

use crate::{vm_config, VmSizeArgs};

/// What the anchor's trivial init prints once it runs.
const ANCHOR_MARKER: &str = "BERTH-ANCHOR-INIT-REACHED";

/// Poll interval for both sides, so neither is favoured by its detection latency.
const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot to agent handshake, against QEMU microvm booting the same kernel to a trivial init.
    Boot {
        /// Boots of each kind.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[command(flatten)]
        size: VmSizeArgs,
        /// The static busybox the anchor's trivial init runs.
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        /// Replace the `boot` section of this markdown file with the results.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Create, start and wait of `true` through the agent in a warm VM, against `crun run` of
    /// the same root filesystem natively on the host.
    Container {
        /// Runs of each kind.
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// The busybox layer (an uncompressed tar of the root filesystem).
        #[arg(long)]
        layer: PathBuf,
        #[command(flatten)]
        size: VmSizeArgs,
        /// The crun binary for the anchor.
        #[arg(long, default_value = "/usr/bin/crun")]
        crun: PathBuf,
        /// Replace the `container` section of this markdown file with the results.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// `docker run --rm busybox true` through a fresh berthd and the stock docker CLI: the time
    /// from berthd's start to the first container's output (cold VM), and the median over
    /// `--runs` with the VM warm, against the same command run natively on the host.
    Run {
        /// Warm runs of each kind.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// `docker build` of a 20-step Dockerfile through a fresh berthd, cold (`--no-cache`) and
    /// cached, against the same steps run as a shell script natively on the host.
    Build {
        /// Builds of each kind; the medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Sequential write/read and small-file create/stat/remove on a bind mount in a container,
    /// against the same commands natively on the host directory, through a fresh berthd.
    Fs {
        /// MiB written and read sequentially.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Small files created, stat-ed and removed.
        #[arg(long, default_value_t = 10_000)]
        files: u64,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
    /// Host⇄guest transport throughput each way in 64 KiB writes (the agent's probes over
    /// vsock), against the same transfers over a unix socket pair on the host; under the vmm
    /// backend, berth-vmm beside QEMU microvm on the same KVM.
    Vsock {
        /// Transfers each way, per VM; the medians are reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// MiB per transfer.
        #[arg(long, default_value_t = 256)]
        mib: u64,
        #[command(flatten)]
        size: VmSizeArgs,
        /// Replace the `vsock` section of this markdown file with the results.
        #[arg(long)]
        record: Option<PathBuf>,
    },
    /// Connection rate and throughput through a published port (host client to busybox
    /// httpd in a container), against the same client and server on the host's loopback.
    Ports {
        /// Sequential small requests of each kind (connection rate).
        #[arg(long, default_value_t = 300)]
        requests: usize,
        /// Downloads of the large file of each kind (throughput).
        #[arg(long, default_value_t = 5)]
        downloads: usize,
        /// Size of the large file in MiB.
        #[arg(long, default_value_t = 32)]
        size_mib: usize,
        #[command(flatten)]
        daemon: DaemonArgs,
    },
}

/// What every benchmark through a fresh berthd and the docker CLI takes.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The busybox image as a docker-archive (`tests/images/make-busybox.sh` writes one).
    #[arg(long)]
    archive: PathBuf,
    /// The berthd binary; by default the one beside this `berth`.
    #[arg(long)]
    berthd: Option<PathBuf>,
    /// The docker CLI.
    #[arg(long, default_value = "/usr/local/bin/docker")]
    docker: PathBuf,
    /// The static busybox the native anchor runs (for `ports`, its httpd is the anchor).
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Replace this benchmark's section of this markdown file with the results.
    #[arg(long)]
    record: Option<PathBuf>,
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Boot {
            runs,
            size,
            busybox,
            record,
        } => bench_boot(runs, &size, &busybox, record.as_deref()),
        BenchCommand::Container {
            runs,
            layer,
            size,
            crun,
            record,
        } => crate::bench_container::run(runs, &layer, &size, &crun, record.as_deref()),
        BenchCommand::Run { runs, daemon } => {
            let tools = RunTools::new(&daemon)?;
            bench_run(runs, &daemon.archive, &tools, daemon.record.as_deref())
        }
        BenchCommand::Build { runs, daemon } => {
            let tools = RunTools::new(&daemon)?;
            crate::bench_build::run(runs, &daemon.archive, &tools, daemon.record.as_deref())
        }
        BenchCommand::Fs {
            size_mib,
            files,
            daemon,
        } => {
            let tools = RunTools::new(&daemon)?;
            let config = crate::bench_fs::FsBenchConfig { size_mib, files };
            crate::bench_fs::run(&config, &daemon.archive, &tools, daemon.record.as_deref())
        }
        BenchCommand::Vsock {
            runs,
            mib,
            size,
            record,
        } => crate::bench_vsock::run(runs, mib, &size, record.as_deref()),
        BenchCommand::Ports {
            requests,
            downloads,
            size_mib,
            daemon,
        } => {
            let tools = RunTools::new(&daemon)?;
            let plan = crate::bench_ports::PortsPlan {
                requests,
                downloads,
                size_mib,
            };
            crate::bench_ports::run(&plan, &daemon.archive, &tools, daemon.record.as_deref())
        }
    }
}

/// The programs `bench run` and `bench ports` drive.
#[derive(Debug)]
pub(crate) struct RunTools {
    pub(crate) berthd: PathBuf,
    pub(crate) docker: PathBuf,
    pub(crate) busybox: PathBuf,
}

impl RunTools {
    /// The tools, with berthd defaulting to the one beside this `berth`.
    fn new(args: &DaemonArgs) -> anyhow::Result<Self> {
        let berthd = match &args.berthd {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating berth")?
                .with_file_name("berthd"),
        };
        Ok(Self {
            berthd,
            docker: args.docker.clone(),
            busybox: args.busybox.clone(),
        })
    }
}

/// A berthd started for a benchmark, stopped (VM included) when dropped.
pub(crate) struct BenchDaemon {
    child: std::process::Child,
    pub(crate) socket: PathBuf,
}

impl Drop for BenchDaemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn docker(tools: &RunTools, socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(&tools.docker)
        .args(args)
        .env("DOCKER_HOST", format!("unix://{}", socket.display()))
        // The classic builder: the CLI here has no buildx plugin.
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", tools.docker.display()))?;
    if !output.status.success() {
        bail!(
            "docker {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn bench_run(
    runs: usize,
    archive: &Path,
    tools: &RunTools,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let socket = work.path().join("docker.sock");
    let log = fs::File::create(work.path().join("berthd.log")).context("creating the log")?;
    // The image is loaded into the data directory before the measured start: a cold start is
    // a cold VM, not an empty image store.
    let cold_started = {
        let daemon = start_daemon(tools, work.path(), &log)?;
        docker(
            tools,
            &daemon.socket,
            &["load", "-i", &archive.display().to_string()],
        )?;
        drop(daemon);
        let started = Instant::now();
        let daemon = start_daemon(tools, work.path(), &log)?;
        let output = docker(
            tools,
            &daemon.socket,
            &["run", "--rm", "busybox", "echo", "first"],
        )?;
        if output.trim() != "first" {
            bail!("the first container printed {output:?}");
        }
        (started.elapsed(), daemon)
    };
    let (cold, daemon) = cold_started;
    eprintln!(
        "cold: {} ms from berthd start to the first output",
        cold.as_millis()
    );

    let mut berth = Vec::with_capacity(runs);
    let mut native = Vec::with_capacity(runs);
    for run in 0..runs {
        let started = Instant::now();
        docker(tools, &socket, &["run", "--rm", "busybox", "true"])?;
        berth.push(started.elapsed());
        let started = Instant::now();
        let status = Command::new(&tools.busybox)
            .arg("true")
            .status()
            .with_context(|| format!("running {}", tools.busybox.display()))?;
        native.push(started.elapsed());
        if !status.success() {
            bail!("native busybox true failed: {status}");
        }
        eprintln!(
            "run {}/{runs}: docker run {} ms, native {} us",
            run + 1,
            berth[run].as_millis(),
            native[run].as_micros()
        );
    }
    drop(daemon);
    let report = RunReport {
        runs,
        cold,
        warm: median(&mut berth),
        native: median(&mut native),
        accel: select_backend().backend.accel(),
    };
    println!("{}", report.markdown());
    if let Some(path) = record {
        record_section(path, "run", &report.markdown())?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

pub(crate) fn start_daemon(
    tools: &RunTools,
    dir: &Path,
    log: &fs::File,
) -> anyhow::Result<BenchDaemon> {
    let socket = dir.join("docker.sock");
    let child = Command::new(&tools.berthd)
        .env("BERTH_SOCKET", &socket)
        .env("BERTH_DATA_DIR", dir.join("data"))
        .env("BERTH_VM_DIR", dir.join("vm"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("sharing the log")?)
        .stderr(log.try_clone().context("sharing the log")?)
        .spawn()
        .with_context(|| format!("starting {}", tools.berthd.display()))?;
    let daemon = BenchDaemon {
        child,
        socket: socket.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Ok(daemon);
        }
        thread::sleep(POLL);
    }
    bail!("berthd did not listen on {} within 20 s", socket.display())
}

/// The figures of one `bench run`.
#[derive(Debug)]
struct RunReport {
    runs: usize,
    cold: Duration,
    warm: Duration,
    native: Duration,
    accel: Accel,
}

impl RunReport {
    fn markdown(&self) -> String {
        let ratio = self.warm.as_secs_f64() / self.native.as_secs_f64().max(1e-9);
        format!(
            "Command: `berth bench run --runs {runs} --archive <busybox.tar> --record docs/benchmarks.md`\n\n\
             | figure | berth | anchor | ratio |\n|---|---|---|---|\n\
             | `docker run --rm busybox true`, warm VM, median of {runs} | {warm} ms | {native} ms (`busybox true` natively on the host) | {ratio:.0}x |\n\
             | berthd start to the first container's output, cold VM | {cold} ms | | |\n\n\
             Accelerator: {accel:?}. Under TCG every guest figure is inflated; the warm target \
             (under 150 ms) applies where hardware KVM exists.",
            runs = self.runs,
            warm = self.warm.as_millis(),
            native = format_args!("{:.2}", self.native.as_secs_f64() * 1000.0),
            cold = self.cold.as_millis(),
            accel = self.accel,
        )
    }
}

fn bench_boot(
    runs: usize,
    size: &VmSizeArgs,
    busybox: &Path,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let choice = select_backend();
    eprintln!("bench boot: {}", choice.reason);
    let anchor_initramfs = work.path().join("anchor.cpio");
    write_anchor_initramfs(busybox, &anchor_initramfs)?;

    if choice.backend.kind() == BackendKind::Vmm {
        return bench_vmm_boot(runs, size, choice.backend.as_ref(), &work, record);
    }
    let qemu = QemuBackend::new(choice.backend.accel());
    let mut berth = Vec::with_capacity(runs);
    let mut anchor = Vec::with_capacity(runs);
    for run in 0..runs {
        // Interleaved so drifting machine load hits both sides alike.
        let config = vm_config(size, work.path().join(format!("vm-{run}")));
        berth.push(boot_measured(choice.backend.as_ref(), &config)?.boot);
        let anchor_config = VmConfig {
            initramfs: anchor_initramfs.clone(),
            state_dir: work.path().join(format!("anchor-{run}")),
            ..config
        };
        anchor.push(boot_anchor(
            qemu.qemu_program(),
            choice.backend.accel(),
            &anchor_config,
        )?);
        eprintln!(
            "run {}/{runs}: berth {} ms, anchor {} ms",
            run + 1,
            berth[run].as_millis(),
            anchor[run].as_millis()
        );
    }

    let report = BootReport {
        runs,
        accel: choice.backend.accel(),
        berth: median(&mut berth),
        anchor: median(&mut anchor),
        size: (size.memory, size.cpus),
    };
    println!("{}", report.markdown());
    if let Some(path) = record {
        record_section(path, "boot", &report.markdown())?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

/// `bench boot` where the vmm backend runs: berth-vmm against QEMU microvm on the same KVM,
/// both booting the same kernel and initramfs to the agent's handshake, interleaved; and each
/// VMM's resident memory beyond the guest's RAM, right after the handshake.
fn bench_vmm_boot(
    runs: usize,
    size: &VmSizeArgs,
    vmm: &dyn VmBackend,
    work: &tempfile::TempDir,
    record: Option<&Path>,
) -> anyhow::Result<()> {
    let qemu = QemuBackend::new(Accel::Kvm);
    let mut samples: [Vec<BootSample>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (side, backend) in [vmm, &qemu as &dyn VmBackend].into_iter().enumerate() {
            let config = vm_config(size, work.path().join(format!("vm-{run}-{side}")));
            samples[side].push(boot_measured(backend, &config)?);
        }
        eprintln!(
            "run {}/{runs}: berth-vmm {} ms, qemu {} ms",
            run + 1,
            samples[0][run].boot.as_millis(),
            samples[1][run].boot.as_millis()
        );
    }
    let [berth, anchor] = samples.map(|mut side| BootSample {
        boot: median(&mut side.iter().map(|s| s.boot).collect::<Vec<_>>()),
        overhead_kib: median_u64(side.iter_mut().map(|s| s.overhead_kib).collect()),
    });
    let markdown = format!(
        "| what | berth-vmm | QEMU microvm (anchor) | ratio |\n|---|---|---|---|\n\
         | process start to agent handshake, median of {runs} | {b} ms | {a} ms | {ratio:.2} |\n\
         | VMM resident memory beyond guest RAM, median | {bm:.1} MiB | {am:.1} MiB | {mratio:.2} |\n\n\
         Both boot the same kernel and initramfs on the same KVM, interleaved. Guest: {mem} MiB, \
         {cpus} vCPUs. Memory is the VMM's RSS (from /proc/<pid>/smaps) minus the mapping of \
         guest RAM, read right after the handshake; QEMU's figure leaves out its vhost-user \
         vsock process. Command: `berth bench boot --runs {runs} --memory {mem} --cpus {cpus} \
         --record docs/benchmarks.md` with `BERTH_BACKEND=vmm`.",
        b = berth.boot.as_millis(),
        a = anchor.boot.as_millis(),
        ratio = berth.boot.as_secs_f64() / anchor.boot.as_secs_f64().max(1e-9),
        bm = berth.overhead_kib as f64 / 1024.0,
        am = anchor.overhead_kib as f64 / 1024.0,
        mratio = berth.overhead_kib as f64 / (anchor.overhead_kib as f64).max(1.0),
        mem = size.memory,
        cpus = size.cpus,
    );
    println!("{markdown}");
    if let Some(path) = record {
        record_section(path, "vmm-boot", &markdown)?;
        eprintln!("recorded in {}", path.display());
    }
    Ok(())
}

/// One boot: its time to the handshake and the VMM's memory beyond guest RAM.
#[derive(Debug, Clone, Copy)]
struct BootSample {
    boot: Duration,
    overhead_kib: u64,
}

fn boot_measured(backend: &dyn VmBackend, config: &VmConfig) -> anyhow::Result<BootSample> {
    let started = Instant::now();
    let (vm, _agent) = Vm::start(backend, config).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let boot = started.elapsed();
    let pid = vm.processes().first().map(|p| p.pid());
    let guest_kib = u64::from(config.memory_mib) * 1024;
    let overhead_kib = pid
        .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/smaps")).ok())
        .map(|smaps| rss_beyond(&smaps, guest_kib))
        .unwrap_or(0);
    vm.stop(Duration::from_secs(60));
    Ok(BootSample { boot, overhead_kib })
}

/// Resident KiB of every mapping in `smaps` except those exactly `guest_kib` large (guest RAM).
fn rss_beyond(smaps: &str, guest_kib: u64) -> u64 {
    let mut total = 0;
    let mut is_guest = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(kib)) => is_guest = kib.parse::<u64>().ok() == Some(guest_kib),
            (Some("Rss:"), Some(kib)) if !is_guest => total += kib.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    total
}

fn median_u64(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

fn boot_anchor(qemu: &Path, accel: Accel, config: &VmConfig) -> anyhow::Result<Duration> {
    fs::create_dir_all(&config.state_dir).context("creating the anchor's directory")?;
    let console = config.console_log();
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(qemu_args(config, accel, None))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let deadline = started + config.boot_timeout;
    let result = loop {
        let text = fs::read_to_string(&console).unwrap_or_default();
        if text.contains(ANCHOR_MARKER) {
            break Ok(started.elapsed());
        }
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Err(anyhow::anyhow!(
                "anchor qemu exited ({status}) before its init ran; console:\n{text}"
            ));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("anchor boot timed out; console:\n{text}"));
        }
        thread::sleep(POLL);
    };
    // The trivial init reboots, which ends QEMU; kill it anyway if it lingers.
    let exit_deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().context("waiting for qemu")?.is_none() {
        if Instant::now() > exit_deadline {
            child.kill().context("killing the anchor qemu")?;
            child.wait().context("reaping the anchor qemu")?;
            break;
        }
        thread::sleep(POLL);
    }
    result
}

/// An initramfs whose `/init` prints the marker and reboots at once, with busybox for both.
fn write_anchor_initramfs(busybox: &Path, out: &Path) -> anyhow::Result<()> {
    let busybox_bytes = fs::read(busybox).with_context(|| {
        format!(
            "reading {} (install the busybox-static package)",
            busybox.display()
        )
    })?;
    let script =
        format!("#!/bin/busybox sh\n/bin/busybox echo {ANCHOR_MARKER}\n/bin/busybox reboot -f\n");
    let mut image = Initramfs::guest_skeleton();
    for entry in [
        Entry {
            path: "bin".into(),
            perm: 0o755,
            kind: EntryKind::Directory,
        },
        Entry {
            path: "bin/busybox".into(),
            perm: 0o755,
            kind: EntryKind::File(busybox_bytes),
        },
        Entry {
            path: "init".into(),
            perm: 0o755,
            kind: EntryKind::File(script.into_bytes()),
        },
    ] {
        image.add(entry)?;
    }
    let mut bytes = Vec::new();
    image.write(&mut bytes, 0)?;
    fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))
}

pub(crate) fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

struct BootReport {
    runs: usize,
    accel: Accel,
    berth: Duration,
    anchor: Duration,
    size: (u32, u32),
}

impl BootReport {
    fn markdown(&self) -> String {
        let accel = match self.accel {
            Accel::Kvm => "KVM",
            Accel::Tcg => "TCG",
        };
        let ratio = self.berth.as_secs_f64() / self.anchor.as_secs_f64();
        format!(
            "| what | median of {runs} |\n|---|---|\n\
             | berth: process start to agent handshake (qemu backend, {accel}) | {berth} ms |\n\
             | anchor: QEMU microvm, same kernel, trivial `/init` reached | {anchor} ms |\n\
             | ratio berth / anchor | {ratio:.2} |\n\n\
             Guest: {mem} MiB, {cpus} vCPUs. Command: \
             `target/release/berth bench boot --runs {runs} --memory {mem} --cpus {cpus} \
             --record docs/benchmarks.md`.",
            runs = self.runs,
            berth = self.berth.as_millis(),
            anchor = self.anchor.as_millis(),
            mem = self.size.0,
            cpus = self.size.1,
        )
    }
}

/// Replaces the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `path`,
/// appending the section if the markers are absent.
pub(crate) fn record_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let open = format!("<!-- bench:{name} -->");
    let close = format!("<!-- /bench:{name} -->");
    let text = fs::read_to_string(path).unwrap_or_default();
    let section = format!("{open}\n{body}\n{close}");
    let updated = match (text.find(&open), text.find(&close)) {
        (Some(start), Some(end)) if end > start => {
            format!("{}{section}{}", &text[..start], &text[end + close.len()..])
        }
        _ => format!("{}\n{section}\n", text.trim_end()),
    };
    fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_beyond_leaves_out_the_guest_ram_mapping() {
        let smaps = "7f00-7f01 rw-s 00000000 00:01 1 /memfd:guest (deleted)\n\
                     Size:             524288 kB\n\
                     Rss:              200000 kB\n\
                     5500-5600 r-xp 00000000 08:01 2 /usr/bin/berth-vmm\n\
                     Size:               4096 kB\n\
                     Rss:                3000 kB\n\
                     [heap]\n\
                     Size:               1024 kB\n\
                     Rss:                 512 kB\n";

        assert_eq!(rss_beyond(smaps, 524_288), 3512);
    }

    #[test]
    fn median_odd_count_is_middle_value() {
        let mut samples = [3, 1, 2].map(Duration::from_millis);

        assert_eq!(median(&mut samples), Duration::from_millis(2));
    }

    #[test]
    fn record_section_replaces_only_between_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.md");
        fs::write(
            &path,
            "# B\n<!-- bench:boot -->\nold\n<!-- /bench:boot -->\ntail\n",
        )
        .unwrap();

        record_section(&path, "boot", "new").unwrap();

        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "# B\n<!-- bench:boot -->\nnew\n<!-- /bench:boot -->\ntail\n"
        );
    }
}
