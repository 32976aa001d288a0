//! berth: the Berth command-line tool.
//!
//! For now it drives the VM directly through `berth-engine` (`berth vm …`) and runs benchmarks
//! (`berth bench …`); once berthd serves its API, the VM commands go through it.

mod bench;
mod bench_build;
mod bench_container;
mod bench_fs;
mod bench_ports;
mod bench_vsock;

use std::io::Write;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use berth_engine::assets::{default_vm_dir, Assets};
use berth_engine::vm::{error_chain, VmError};
use berth_engine::{select_backend, StopOutcome, SystemInfo, Vm, VmConfig};
use clap::{Parser, Subcommand};
use tracing::info;

/// Berth: Linux containers in a lightweight VM, behind the Docker API.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the Berth VM.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Measure Berth against an anchor run in the same place.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Boot the VM, wait for its agent, print the guest's system information, leave it running.
    Start(StartArgs),
    /// Say whether the VM runs and, if so, what the guest reports.
    Status(OutputArgs),
    /// Shut the VM down cleanly (killing it after the timeout).
    Stop {
        /// Seconds to wait for the guest to power off before killing it.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Print the guest console log.
    Logs {
        /// Keep printing new console output while the VM runs.
        #[arg(long, short)]
        follow: bool,
    },
}

/// How the VM is sized and how long it may take to boot.
#[derive(Debug, clap::Args)]
pub struct VmSizeArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Seconds the guest agent may take to answer.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
}

#[derive(Debug, clap::Args)]
struct StartArgs {
    #[command(flatten)]
    size: VmSizeArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, clap::Args)]
struct OutputArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// The VM config for the discovered assets, in `state_dir`.
pub fn vm_config(size: &VmSizeArgs, state_dir: PathBuf) -> VmConfig {
    let assets = Assets::discover();
    VmConfig {
        kernel: assets.kernel,
        initramfs: assets.initramfs,
        memory_mib: size.memory,
        vcpus: size.cpus,
        state_dir,
        boot_timeout: Duration::from_secs(size.boot_timeout),
        extra_cmdline: Vec::new(),
        data_disk: None,
        shares: Vec::new(),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(command) => run_vm(command),
        Command::Bench(command) => bench::run(command),
    };
    if let Err(e) = result {
        // The whole cause chain, once, at the edge.
        let chain: Vec<String> = e.chain().map(ToString::to_string).collect();
        eprintln!("berth: {}", chain.join(": "));
        std::process::exit(1);
    }
}

fn run_vm(command: VmCommand) -> anyhow::Result<()> {
    let state_dir = default_vm_dir();
    match command {
        VmCommand::Start(args) => vm_start(&args, state_dir),
        VmCommand::Status(output) => vm_status(&output, &state_dir),
        VmCommand::Stop { timeout } => vm_stop(&state_dir, Duration::from_secs(timeout)),
        VmCommand::Logs { follow } => vm_logs(&state_dir, follow),
    }
}

fn vm_start(args: &StartArgs, state_dir: PathBuf) -> anyhow::Result<()> {
    let choice = select_backend();
    info!("{}", choice.reason);
    let config = vm_config(&args.size, state_dir);
    info!(
        kernel = %config.kernel.display(),
        initramfs = %config.initramfs.display(),
        console = %config.console_log().display(),
        "booting"
    );
    let (_vm, mut agent) = Vm::start(choice.backend.as_ref(), &config).map_err(flatten)?;
    let info = agent
        .system_info()
        .context("asking the agent for system information")?;
    print_info(&info, args.output.json)
}

fn vm_status(output: &OutputArgs, state_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut vm = match Vm::attach(state_dir) {
        Ok(vm) => vm,
        Err(VmError::NotRunning(_)) => {
            println!("not running");
            std::process::exit(3);
        }
        Err(e) => return Err(flatten(e)),
    };
    if !vm.is_running() {
        println!("not running (the VM process has exited; `berth vm logs` shows why)");
        std::process::exit(3);
    }
    let mut agent = vm.agent(Duration::from_secs(5)).map_err(flatten)?;
    agent.ping().context("pinging the agent")?;
    let info = agent
        .system_info()
        .context("asking for system information")?;
    if !output.json {
        println!(
            "running (backend {}, pids {})",
            vm.backend(),
            vm.processes()
                .iter()
                .map(|p| format!("{}={}", p.role(), p.pid()))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    print_info(&info, output.json)
}

fn vm_stop(state_dir: &std::path::Path, timeout: Duration) -> anyhow::Result<()> {
    let vm = match Vm::attach(state_dir) {
        Ok(vm) => vm,
        Err(VmError::NotRunning(_)) => {
            println!("not running");
            return Ok(());
        }
        Err(e) => return Err(flatten(e)),
    };
    match vm.stop(timeout) {
        StopOutcome::Clean => println!("stopped"),
        StopOutcome::Killed => println!("killed (the guest did not power off cleanly)"),
    }
    Ok(())
}

fn vm_logs(state_dir: &std::path::Path, follow: bool) -> anyhow::Result<()> {
    let path = state_dir.join("console.log");
    let mut file = std::fs::File::open(&path)
        .with_context(|| format!("no console log at {} (has the VM run?)", path.display()))?;
    let mut stdout = std::io::stdout().lock();
    loop {
        std::io::copy(&mut file, &mut stdout).context("copying the console log")?;
        stdout.flush().context("writing to stdout")?;
        if !follow {
            return Ok(());
        }
        let running = Vm::attach(state_dir)
            .map(|mut vm| vm.is_running())
            .unwrap_or(false);
        if !running {
            // Drain what was written between the last copy and the exit.
            std::io::copy(&mut file, &mut stdout).context("copying the console log")?;
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn print_info(info: &SystemInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
        return Ok(());
    }
    println!("kernel:   {} {}", info.kernel_release, info.kernel_version);
    println!("arch:     {}", info.arch);
    println!("cpus:     {}", info.cpus);
    println!(
        "memory:   {} MiB total, {} MiB available",
        info.mem_total_bytes >> 20,
        info.mem_available_bytes >> 20
    );
    println!("uptime:   {:.2} s", info.uptime_secs);
    println!("agent:    berth-agent {}", info.agent_version);
    println!("boot id:  {}", info.boot_id);
    Ok(())
}

/// Turns an engine error into an anyhow error keeping the whole chain in one message.
fn flatten(e: VmError) -> anyhow::Error {
    anyhow::anyhow!(error_chain(&e))
}
