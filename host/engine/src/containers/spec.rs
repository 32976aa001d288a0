//! What a container is asked to be, in the engine's terms ([`ContainerSpec`]), and how it
//! becomes the OCI runtime spec the agent carries out ([`build_runtime_spec`]).
//!
//! The merge with the image's config follows dockerd: the container's entrypoint replaces the
//! image's and then drops the image's command; environment variables from the container
//! override the image's by name; working dir and user fall back to the image's.

use std::collections::BTreeMap;

use agent_protocol::defaults::docker_default_spec;
use oci_spec::image::Config as ImageConfig;
use oci_spec::runtime::{
    Box as ConsoleBox, BoxBuilder, LinuxCpu, LinuxMemory, LinuxPids, LinuxResources, Spec,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ErrorKind;

/// CFS period Docker uses for `--cpus`, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// A container's configuration as created: what `docker create`/`run` asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// The image as the client named it.
    pub image: String,
    /// Entrypoint override; `None` keeps the image's.
    pub entrypoint: Option<Vec<String>>,
    /// Command; empty keeps the image's (unless the entrypoint was overridden).
    pub cmd: Vec<String>,
    /// `KEY=value` pairs, overriding the image's.
    pub env: Vec<String>,
    /// Working directory; empty keeps the image's.
    pub working_dir: String,
    /// `user[:group]`; empty keeps the image's.
    pub user: String,
    /// Hostname; empty means the first 12 characters of the id.
    pub hostname: String,
    /// Domain name.
    pub domainname: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Run the init on a terminal.
    pub tty: bool,
    /// Keep stdin open for attaching.
    pub open_stdin: bool,
    /// Close stdin when the first attached client detaches.
    pub stdin_once: bool,
    /// Signal `docker stop` sends first (name or number); empty means SIGTERM.
    pub stop_signal: String,
    /// Seconds `docker stop` waits before SIGKILL; `None` means 10.
    pub stop_timeout: Option<i64>,
    /// Ports the container exposes (`80/tcp`), kept for inspect.
    pub exposed_ports: Vec<String>,
    /// Volume mount points, kept for inspect.
    pub volumes: Vec<String>,
    /// Host-side settings.
    pub host: HostSpec,
}

/// The `HostConfig` part: resources and how the container is run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    /// `--memory` in bytes; 0 means unlimited.
    pub memory: i64,
    /// `--memory-swap` in bytes (memory plus swap); 0 means unset, -1 unlimited.
    pub memory_swap: i64,
    /// `--cpus` in billionths of a CPU; 0 means unlimited.
    pub nano_cpus: i64,
    /// `--cpu-shares`; 0 means the default.
    pub cpu_shares: i64,
    /// `--pids-limit`; `None`, 0 or -1 mean unlimited.
    pub pids_limit: Option<i64>,
    /// `--rm`.
    pub auto_remove: bool,
    /// `--restart`.
    pub restart_policy: RestartPolicy,
    /// `--read-only`.
    pub readonly_rootfs: bool,
    /// `--privileged` (refused for now; kept so inspect says what was asked).
    pub privileged: bool,
    /// `-v`/`--mount` binds as the client sent them (`src:dst[:opts]`).
    pub binds: Vec<String>,
    /// `--security-opt` entries.
    pub security_opt: Vec<String>,
    /// Terminal size at create (rows, columns).
    pub console_size: Option<(u16, u16)>,
    /// `--network`: `bridge` (or empty), `none`, `host`, `container:<id>`.
    pub network_mode: String,
    /// Bind mounts and volumes (from `Binds`, `Mounts`, the image's and the config's
    /// `Volumes` and `--volumes-from`); anonymous volumes are named at create.
    #[serde(default)]
    pub mounts: Vec<super::mounts::MountPoint>,
    /// `--volumes-from`, kept for inspect.
    #[serde(default)]
    pub volumes_from: Vec<String>,
    /// `-p`: container port (`80/tcp`) to the host bindings asked for.
    #[serde(default)]
    pub port_bindings: BTreeMap<String, Vec<crate::network::HostBinding>>,
    /// `-P`: publish every exposed port on a free host port.
    #[serde(default)]
    pub publish_all_ports: bool,
    /// `--dns`, `--dns-search`, `--dns-option`.
    #[serde(default)]
    pub dns: crate::network::DnsConfig,
    /// `--add-host` entries, `name:ip`.
    #[serde(default)]
    pub extra_hosts: Vec<String>,
    /// User-defined networks joined (the mode's own and `docker network connect`ed ones), by
    /// name as given, with the aliases asked for on each.
    #[serde(default)]
    pub endpoints: BTreeMap<String, crate::network::EndpointSpec>,
}

/// When a container is started again after it exits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// `""`/`no`, `always`, `unless-stopped` or `on-failure`.
    pub name: String,
    /// For `on-failure`: the most restarts; 0 means no limit.
    pub maximum_retry_count: i64,
}

impl RestartPolicy {
    /// Whether a container that exited with `code` after `restarts` restarts should start
    /// again. A container stopped by the user never restarts.
    pub fn should_restart(&self, code: i32, restarts: i64, stopped_by_user: bool) -> bool {
        if stopped_by_user {
            return false;
        }
        match self.name.as_str() {
            "always" | "unless-stopped" => true,
            "on-failure" => {
                code != 0 && (self.maximum_retry_count == 0 || restarts < self.maximum_retry_count)
            }
            _ => false,
        }
    }

    /// Checks the name and count.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self.name.as_str() {
            "" | "no" | "always" | "unless-stopped" if self.maximum_retry_count == 0 => Ok(()),
            "on-failure" if self.maximum_retry_count >= 0 => Ok(()),
            "" | "no" | "always" | "unless-stopped" => Err(SpecError::Invalid(format!(
                "maximum retry count cannot be used with restart policy '{}'",
                self.name
            ))),
            "on-failure" => Err(SpecError::Invalid(
                "maximum retry count cannot be negative".into(),
            )),
            other => Err(SpecError::Invalid(format!(
                "invalid restart policy '{other}'"
            ))),
        }
    }
}

/// Why a container's spec cannot be run.
#[derive(Debug, Error)]
pub enum SpecError {
    #[error("{0}")]
    Invalid(String),
    #[error("no command specified")]
    NoCommand,
    #[error("cannot build the runtime spec")]
    Build(#[source] agent_protocol::defaults::SpecBuildError),
}

impl SpecError {
    /// Every spec error is the client's.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Build(_) => ErrorKind::Internal,
            _ => ErrorKind::InvalidArgument,
        }
    }
}

/// The network settings that can be checked without other containers: the mode's syntax,
/// port specs, `--add-host` and `--dns` values.
fn validate_network(spec: &ContainerSpec) -> Result<(), crate::network::NetworkError> {
    use crate::network::{self, NetworkMode};
    let mode = NetworkMode::parse(&spec.host.network_mode)?;
    let publishes = !spec.host.port_bindings.is_empty() || spec.host.publish_all_ports;
    if matches!(mode, NetworkMode::Container(_)) && publishes {
        return Err(network::NetworkError::Invalid(
            "conflicting options: port publishing and the container type network mode".into(),
        ));
    }
    network::bindings_to_publish(
        &spec.host.port_bindings,
        spec.host.publish_all_ports,
        &spec.exposed_ports,
    )?;
    network::hosts_file("h", None, &spec.host.extra_hosts)?;
    network::resolv_conf(&spec.host.dns, None)?;
    Ok(())
}

/// Validates what can be checked at create time, before anything is stored.
pub fn validate(spec: &ContainerSpec) -> Result<(), SpecError> {
    spec.host.restart_policy.validate()?;
    validate_network(spec).map_err(|e| SpecError::Invalid(e.to_string()))?;
    if spec.host.auto_remove && !matches!(spec.host.restart_policy.name.as_str(), "" | "no") {
        return Err(SpecError::Invalid(
            "can't create 'AutoRemove' container with restart policy".into(),
        ));
    }
    if spec.host.memory != 0 && spec.host.memory < 6 * 1024 * 1024 {
        return Err(SpecError::Invalid(
            "Minimum memory limit allowed is 6MB".into(),
        ));
    }
    if spec.host.memory_swap > 0 && spec.host.memory > 0 && spec.host.memory_swap < spec.host.memory
    {
        return Err(SpecError::Invalid(
            "Minimum memoryswap limit should be larger than memory limit, see usage".into(),
        ));
    }
    if spec.host.nano_cpus < 0 {
        return Err(SpecError::Invalid(
            "Range of CPUs is from 0.01 to the number of CPUs available".into(),
        ));
    }
    if spec.host.privileged {
        return Err(SpecError::Invalid(
            "privileged containers are not supported by Berth yet".into(),
        ));
    }
    for env in &spec.env {
        if env.is_empty() || env.starts_with('=') {
            return Err(SpecError::Invalid(format!(
                "invalid environment variable: {env:?}"
            )));
        }
    }
    Ok(())
}

/// The process a container runs: entrypoint and command merged with the image's.
pub fn command_line(spec: &ContainerSpec, image: &ImageConfig) -> Vec<String> {
    let (entrypoint, cmd) = match &spec.entrypoint {
        Some(entrypoint) => (entrypoint.clone(), spec.cmd.clone()),
        None if !spec.cmd.is_empty() => (
            image.entrypoint().clone().unwrap_or_default(),
            spec.cmd.clone(),
        ),
        None => (
            image.entrypoint().clone().unwrap_or_default(),
            image.cmd().clone().unwrap_or_default(),
        ),
    };
    entrypoint.into_iter().chain(cmd).collect()
}

/// Sets `entry` (`KEY=value`) in `env`: replaces the entry with the same key in place, or
/// appends it.
pub fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split('=').next().unwrap_or(entry);
    match env.iter_mut().find(|e| e.split('=').next() == Some(key)) {
        Some(existing) => entry.clone_into(existing),
        None => env.push(entry.to_owned()),
    }
}

/// `existing` with each of `more` not in it yet appended, in order.
pub fn union(existing: Option<Vec<String>>, more: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut all = existing.unwrap_or_default();
    for item in more {
        if !all.contains(&item) {
            all.push(item);
        }
    }
    all
}

/// The environment: the image's, overridden by the container's, plus `HOSTNAME` (and `TERM`
/// on a terminal) as dockerd adds them.
pub fn environment(spec: &ContainerSpec, image: &ImageConfig, hostname: &str) -> Vec<String> {
    let mut merged: Vec<String> = Vec::new();
    let mut set = |entry: &str| set_env(&mut merged, entry);
    set(&format!("HOSTNAME={hostname}"));
    for entry in image.env().iter().flatten() {
        set(entry);
    }
    if spec.tty {
        set("TERM=xterm");
    }
    for entry in &spec.env {
        set(entry);
    }
    if !merged.iter().any(|e| e.starts_with("PATH=")) {
        merged.push(agent_protocol::defaults::DEFAULT_PATH.to_owned());
    }
    merged
}

/// The run configuration `docker commit` records: the image's, with the container's
/// overrides applied by the same rules a run uses (entrypoint, command, environment by name,
/// working dir, user), its labels, exposed ports and volumes added.
pub fn committed_config(spec: &ContainerSpec, image: &ImageConfig) -> ImageConfig {
    let mut config = image.clone();
    match &spec.entrypoint {
        Some(entrypoint) => {
            config.set_entrypoint(Some(entrypoint.clone()).filter(|e| !e.is_empty()));
            config.set_cmd(Some(spec.cmd.clone()).filter(|c| !c.is_empty()));
        }
        None if !spec.cmd.is_empty() => {
            config.set_cmd(Some(spec.cmd.clone()));
        }
        None => {}
    }
    let mut env: Vec<String> = image.env().clone().unwrap_or_default();
    for entry in &spec.env {
        set_env(&mut env, entry);
    }
    config.set_env(Some(env).filter(|e| !e.is_empty()));
    if !spec.working_dir.is_empty() {
        config.set_working_dir(Some(spec.working_dir.clone()));
    }
    if !spec.user.is_empty() {
        config.set_user(Some(spec.user.clone()));
    }
    if !spec.labels.is_empty() {
        let mut labels = image.labels().clone().unwrap_or_default();
        labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        config.set_labels(Some(labels));
    }
    if !spec.exposed_ports.is_empty() {
        let ports = union(image.exposed_ports().clone(), spec.exposed_ports.clone());
        config.set_exposed_ports(Some(ports));
    }
    if !spec.volumes.is_empty() {
        let volumes = union(image.volumes().clone(), spec.volumes.clone());
        config.set_volumes(Some(volumes));
    }
    if !spec.stop_signal.is_empty() {
        config.set_stop_signal(Some(spec.stop_signal.clone()));
    }
    config
}

/// The hostname a container gets.
pub fn hostname(spec: &ContainerSpec, id: &str) -> String {
    if spec.hostname.is_empty() {
        id.chars().take(12).collect()
    } else {
        spec.hostname.clone()
    }
}

/// The OCI runtime spec for one run of the container.
pub fn build_runtime_spec(
    spec: &ContainerSpec,
    image: &ImageConfig,
    id: &str,
) -> Result<Spec, SpecError> {
    let args = command_line(spec, image);
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    let hostname = hostname(spec, id);
    let mut runtime = docker_default_spec(args).map_err(SpecError::Build)?;
    runtime.set_hostname(Some(hostname.clone()));
    if let Some(process) = runtime.process_mut() {
        process.set_env(Some(environment(spec, image, &hostname)));
        let cwd = match (spec.working_dir.as_str(), image.working_dir().as_deref()) {
            ("", Some(dir)) if !dir.is_empty() => dir.to_owned(),
            ("", _) => "/".to_owned(),
            (dir, _) => dir.to_owned(),
        };
        process.set_cwd(cwd.into());
        let user = match (spec.user.as_str(), image.user().as_deref()) {
            ("", Some(user)) => user.to_owned(),
            (user, _) => user.to_owned(),
        };
        if !user.is_empty() {
            let mut oci_user = process.user().clone();
            oci_user.set_username(Some(user));
            process.set_user(oci_user);
        }
        process.set_terminal(Some(spec.tty));
        if let Some(size) = spec.host.console_size.and_then(console_size) {
            process.set_console_size(Some(size));
        }
    }
    if let Some(root) = runtime.root_mut() {
        root.set_readonly(Some(spec.host.readonly_rootfs));
    }
    let resources = resources(&spec.host);
    if let Some(linux) = runtime.linux_mut() {
        linux.set_resources(Some(resources));
    }
    Ok(runtime)
}

/// A terminal size for the spec; `None` for a zero dimension (the client did not know it).
pub fn console_size((rows, cols): (u16, u16)) -> Option<ConsoleBox> {
    if rows == 0 || cols == 0 {
        return None;
    }
    BoxBuilder::default()
        .height(u64::from(rows))
        .width(u64::from(cols))
        .build()
        .ok()
}

fn resources(host: &HostSpec) -> LinuxResources {
    let mut resources = LinuxResources::default();
    if host.memory > 0 || host.memory_swap != 0 {
        let mut memory = LinuxMemory::default();
        if host.memory > 0 {
            memory.set_limit(Some(host.memory));
        }
        if host.memory_swap != 0 {
            memory.set_swap(Some(host.memory_swap));
        }
        resources.set_memory(Some(memory));
    }
    if host.nano_cpus > 0 || host.cpu_shares > 0 {
        let mut cpu = LinuxCpu::default();
        if host.nano_cpus > 0 {
            let quota = (host.nano_cpus as i128 * CPU_PERIOD_US as i128 / 1_000_000_000) as i64;
            cpu.set_quota(Some(quota.max(1_000)));
            cpu.set_period(Some(CPU_PERIOD_US));
        }
        if host.cpu_shares > 0 {
            cpu.set_shares(Some(host.cpu_shares as u64));
        }
        resources.set_cpu(Some(cpu));
    }
    if let Some(limit) = host.pids_limit.filter(|&l| l > 0) {
        let mut pids = LinuxPids::default();
        pids.set_limit(limit);
        resources.set_pids(Some(pids));
    }
    resources
}

/// The signal number for a Docker signal name (`SIGTERM`, `TERM`, `15`); `None` if unknown.
pub fn parse_signal(name: &str) -> Option<i32> {
    if let Ok(number) = name.parse::<i32>() {
        return (1..=64).contains(&number).then_some(number);
    }
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let number = match bare {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => return None,
    };
    Some(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageConfig {
        let mut config = ImageConfig::default();
        config.set_entrypoint(entrypoint.map(|e| e.iter().map(|s| s.to_string()).collect()));
        config.set_cmd(cmd.map(|c| c.iter().map(|s| s.to_string()).collect()));
        config.set_env(Some(vec!["PATH=/bin".into(), "A=image".into()]));
        config
    }

    fn spec(entrypoint: Option<&[&str]>, cmd: &[&str]) -> ContainerSpec {
        ContainerSpec {
            entrypoint: entrypoint.map(|e| e.iter().map(|s| s.to_string()).collect()),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..ContainerSpec::default()
        }
    }

    #[test]
    fn committed_config_applies_the_containers_overrides_to_the_images() {
        let mut container = spec(Some(&["sh"]), &["-c", "run"]);
        container.env = vec!["A=2".into(), "B=1".into()];
        container.working_dir = "/app".into();
        let mut base = image(Some(&["/init"]), Some(&["serve"]));
        base.set_env(Some(vec!["A=1".into(), "PATH=/bin".into()]));

        let config = committed_config(&container, &base);

        assert_eq!(config.entrypoint().as_deref(), Some(&["sh".to_owned()][..]));
        assert_eq!(
            config.cmd().as_deref(),
            Some(&["-c".to_owned(), "run".to_owned()][..])
        );
        assert_eq!(
            config.env().as_deref(),
            Some(&["A=2".to_owned(), "PATH=/bin".to_owned(), "B=1".to_owned()][..])
        );
        assert_eq!(config.working_dir().as_deref(), Some("/app"));
    }

    #[test]
    fn command_line_no_overrides_uses_image_entrypoint_and_cmd() {
        let args = command_line(&spec(None, &[]), &image(Some(&["/init"]), Some(&["serve"])));

        assert_eq!(args, ["/init", "serve"]);
    }

    #[test]
    fn command_line_cmd_override_keeps_image_entrypoint() {
        let args = command_line(
            &spec(None, &["echo", "hi"]),
            &image(Some(&["/init"]), Some(&["serve"])),
        );

        assert_eq!(args, ["/init", "echo", "hi"]);
    }

    #[test]
    fn command_line_entrypoint_override_drops_image_cmd() {
        let args = command_line(
            &spec(Some(&["sh"]), &[]),
            &image(Some(&["/init"]), Some(&["serve"])),
        );

        assert_eq!(args, ["sh"]);
    }

    #[test]
    fn build_runtime_spec_nothing_to_run_is_no_command() {
        let result = build_runtime_spec(&spec(None, &[]), &image(None, None), "c1");

        assert!(matches!(result, Err(SpecError::NoCommand)));
    }

    #[test]
    fn environment_container_overrides_image_by_name() {
        let mut container = spec(None, &[]);
        container.env = vec!["A=container".into()];

        let env = environment(&container, &image(None, None), "h");

        assert_eq!(env, ["HOSTNAME=h", "PATH=/bin", "A=container"]);
    }

    #[test]
    fn build_runtime_spec_cpus_become_quota_over_docker_period() {
        let mut container = spec(None, &["true"]);
        container.host.nano_cpus = 1_500_000_000;

        let runtime = build_runtime_spec(&container, &image(None, None), "c1").unwrap();

        let cpu = runtime
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap()
            .cpu()
            .clone()
            .unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(150_000), Some(100_000)));
    }

    #[test]
    fn restart_policy_on_failure_stops_at_maximum() {
        let policy = RestartPolicy {
            name: "on-failure".into(),
            maximum_retry_count: 2,
        };

        assert!(policy.should_restart(1, 1, false));
        assert!(!policy.should_restart(1, 2, false));
        assert!(!policy.should_restart(0, 0, false));
    }

    #[test]
    fn parse_signal_accepts_docker_spellings() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("kill"), Some(9));
        assert_eq!(parse_signal("10"), Some(10));
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
