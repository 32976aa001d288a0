//! berthd: serves the Docker Engine API on a unix socket and runs containers in a VM.
//!
//! Configuration comes from flags and the environment; everything else (the API, the engine,
//! the VM) lives in the library crates. On SIGINT or SIGTERM the socket is removed and the VM
//! shut down cleanly.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use berth_engine::assets::{default_vm_dir, Assets};
use berth_engine::vm::disk::DataDisk;
use berth_engine::vm::VmShare;
use berth_engine::{Engine, EngineConfig, VmConfig};
use clap::Parser;
use tokio::net::UnixListener;
use tracing::info;

/// berthd's command line.
#[derive(Debug, Parser)]
#[command(
    name = "berthd",
    version,
    about = "Berth daemon: the Docker Engine API backed by a micro-VM"
)]
struct Args {
    /// The API socket (DOCKER_HOST=unix://<this>).
    #[arg(long, env = "BERTH_SOCKET")]
    socket: Option<PathBuf>,
    /// Where images, containers and logs are kept.
    #[arg(long, env = "BERTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Directory of the VM's sockets and console log.
    #[arg(long, env = "BERTH_VM_DIR")]
    vm_dir: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// How long the guest may take to boot, in seconds.
    #[arg(long, default_value_t = 120)]
    boot_timeout: u64,
    /// Size of a new guest data disk in GiB (`<data dir>/vm/data.raw`, sparse: it allocates
    /// only what the guest stores). An existing disk keeps its size.
    #[arg(long, env = "BERTH_DISK_SIZE", default_value_t = 64)]
    disk_size: u64,
    /// Host directories containers may bind-mount from (repeat the flag, or separate them
    /// with `:` in BERTH_SHARES). Default: your home directory and the system temp directory.
    #[arg(long = "share", env = "BERTH_SHARES", value_delimiter = ':')]
    shares: Vec<PathBuf>,
    /// `uid:gid` that owns what containers create in shared directories. Default: the user
    /// who ran `sudo` (SUDO_UID/SUDO_GID) when berthd runs as root through sudo, else
    /// berthd's own user.
    #[arg(long, env = "BERTH_SHARE_OWNER")]
    share_owner: Option<String>,
}

/// The owner of files containers create in shares (see `--share-owner`).
fn share_owner(flag: Option<&str>) -> anyhow::Result<(u32, u32)> {
    let parse = |text: &str| -> Option<(u32, u32)> {
        let (uid, gid) = text.split_once(':')?;
        Some((uid.parse().ok()?, gid.parse().ok()?))
    };
    if let Some(flag) = flag {
        return parse(flag)
            .with_context(|| format!("--share-owner {flag:?} is not uid:gid (numbers)"));
    }
    let sudo = std::env::var("SUDO_UID")
        .ok()
        .zip(std::env::var("SUDO_GID").ok())
        .and_then(|(uid, gid)| parse(&format!("{uid}:{gid}")));
    Ok(sudo
        .filter(|_| nix_is_root())
        .unwrap_or((uid(), nix::unistd::getgid().as_raw())))
}

/// The shared roots: the flag's, else home and the temp dir; canonical, existing, none inside
/// another. Empty (with a warning) when `virtiofsd` cannot be found.
fn shares(requested: &[PathBuf], owner: (u32, u32)) -> Vec<VmShare> {
    let virtiofsd = berth_engine::vm::helpers::find_virtiofsd();
    if !virtiofsd.is_file() {
        tracing::warn!(
            "virtiofsd not found (cargo install --locked virtiofsd, or set BERTH_VIRTIOFSD): \
             bind mounts are unavailable"
        );
        return Vec::new();
    }
    let defaults: Vec<PathBuf> = std::env::var_os("HOME")
        .map(PathBuf::from)
        .into_iter()
        .chain([std::env::temp_dir()])
        .collect();
    let requested: Vec<PathBuf> = requested
        .iter()
        .filter(|dir| !dir.as_os_str().is_empty())
        .cloned()
        .collect();
    let wanted = if requested.is_empty() {
        &defaults
    } else {
        &requested
    };
    let mut roots: Vec<PathBuf> = Vec::new();
    for dir in wanted {
        match std::fs::canonicalize(dir) {
            Ok(real) if real.is_dir() => roots.push(real),
            _ => {
                tracing::warn!(dir = %dir.display(), "not sharing a directory that does not exist")
            }
        }
    }
    roots.sort();
    roots.dedup();
    let outer: Vec<PathBuf> = roots
        .iter()
        .filter(|r| !roots.iter().any(|o| o != *r && r.starts_with(o)))
        .cloned()
        .collect();
    outer
        .into_iter()
        .enumerate()
        .map(|(i, host_dir)| VmShare {
            tag: format!("share{i}"),
            host_dir,
            owner,
        })
        .collect()
}

/// `$XDG_RUNTIME_DIR/berth/docker.sock`, else `/run/berth/docker.sock` for root.
fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("berth/docker.sock"),
        None if nix_is_root() => PathBuf::from("/run/berth/docker.sock"),
        None => std::env::temp_dir().join(format!("berth-{}/docker.sock", uid())),
    }
}

/// `$XDG_DATA_HOME/berth`, else `~/.local/share/berth`.
fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("berth");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/var/lib"), PathBuf::from);
    home.join(".local/share/berth")
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn nix_is_root() -> bool {
    uid() == 0
}

/// Binds the API socket with mode 0600, replacing a stale socket file but never a live one.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another daemon is serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let socket = args.socket.unwrap_or_else(default_socket);
    let data_root = args.data_dir.unwrap_or_else(default_data_dir);
    let assets = Assets::discover();
    let vm = VmConfig {
        kernel: assets.kernel,
        initramfs: assets.initramfs,
        memory_mib: args.memory,
        vcpus: args.cpus,
        state_dir: args.vm_dir.unwrap_or_else(default_vm_dir),
        boot_timeout: Duration::from_secs(args.boot_timeout),
        extra_cmdline: Vec::new(),
        data_disk: Some(DataDisk {
            path: data_root.join("vm/data.raw"),
            size_bytes: args.disk_size.saturating_mul(1 << 30),
        }),
        shares: shares(&args.shares, share_owner(args.share_owner.as_deref())?),
    };
    for share in &vm.shares {
        info!(dir = %share.host_dir.display(), tag = %share.tag, owner = ?share.owner, "sharing a host directory");
    }
    vm.check_assets()
        .context("checking the VM's kernel and initramfs")?;
    let engine = Engine::open(EngineConfig {
        data_root: data_root.clone(),
        vm,
    })
    .map_err(|e| anyhow::anyhow!(e.to_string()))
    .context("opening the engine state")?;
    let listener = bind_socket(&socket)?;
    info!(socket = %socket.display(), data = %data_root.display(), "berthd serving the Docker API");
    println!("berthd: listening on unix://{}", socket.display());
    let server = tokio::spawn(berth_docker_api::serve(
        listener,
        std::sync::Arc::clone(&engine),
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        result = server => {
            result.context("the API server task failed")?.context("accepting API connections")?;
        }
    }
    info!("shutting down");
    let _ = std::fs::remove_file(&socket);
    engine.shutdown().await;
    Ok(())
}
