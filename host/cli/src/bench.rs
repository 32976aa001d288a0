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
use berth_engine::vm::qemu::{qemu_args, Accel};
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
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Boot {
            runs,
            size,
            busybox,
            record,
        } => bench_boot(runs, &size, &busybox, record.as_deref()),
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

    let mut berth = Vec::with_capacity(runs);
    let mut anchor = Vec::with_capacity(runs);
    for run in 0..runs {
        // Interleaved so drifting machine load hits both sides alike.
        let config = vm_config(size, work.path().join(format!("vm-{run}")));
        berth.push(boot_berth(&choice.backend, &config)?);
        let anchor_config = VmConfig {
            initramfs: anchor_initramfs.clone(),
            state_dir: work.path().join(format!("anchor-{run}")),
            ..config
        };
        anchor.push(boot_anchor(
            choice.backend.qemu_program(),
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

fn boot_berth(backend: &dyn VmBackend, config: &VmConfig) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (vm, _agent) = Vm::start(backend, config).map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let elapsed = started.elapsed();
    vm.stop(Duration::from_secs(30));
    Ok(elapsed)
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

fn median(samples: &mut [Duration]) -> Duration {
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
fn record_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
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
