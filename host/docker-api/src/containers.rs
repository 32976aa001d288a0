//! `/containers/...`: create, list, inspect, lifecycle, attach, wait, logs, top, stats.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use berth_engine::containers::io::StdinMessage;
use berth_engine::containers::logs::{self, LogFilter, LogRecord, LogStream};
use berth_engine::containers::mounts::{parse_bind, parse_mount, MountBody, MountKind, MountPoint};
use berth_engine::containers::spec::{ContainerSpec, HostSpec, RestartPolicy};
use berth_engine::containers::{ContainerRecord, Status, ZERO_TIME};
use berth_engine::network::{format_mac_of, DnsConfig, EndpointSpec, HostBinding, NetworkMode};
use berth_engine::{Engine, WaitCondition};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::body::{self, json_line, ApiResponse};
use crate::error::{ApiError, ApiResult};
use crate::hijack;
use crate::query::Query;

/// The body of `POST /containers/create`, as the CLI and SDKs send it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateBody {
    pub hostname: String,
    pub domainname: String,
    pub user: String,
    pub tty: bool,
    pub open_stdin: bool,
    pub stdin_once: bool,
    pub env: Option<Vec<String>>,
    pub cmd: Option<StringOrList>,
    pub entrypoint: Option<StringOrList>,
    pub image: String,
    pub labels: Option<BTreeMap<String, String>>,
    pub working_dir: String,
    pub stop_signal: String,
    pub stop_timeout: Option<i64>,
    pub exposed_ports: Option<HashMap<String, Value>>,
    pub volumes: Option<HashMap<String, Value>>,
    pub host_config: Option<HostConfigBody>,
    pub networking_config: Option<NetworkingConfigBody>,
}

/// `NetworkingConfig`: the endpoint settings per network (aliases).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkingConfigBody {
    pub endpoints_config: Option<HashMap<String, Option<EndpointSettingsBody>>>,
}

/// One network's endpoint settings.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointSettingsBody {
    pub aliases: Option<Vec<String>>,
}

/// `Cmd` and `Entrypoint` may be a list or (older clients) a single string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// `["sh", "-c", "..."]`.
    List(Vec<String>),
    /// `"sh -c ..."`, split on whitespace as dockerd does.
    String(String),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::List(list) => list,
            Self::String(text) => text.split_whitespace().map(str::to_owned).collect(),
        }
    }
}

/// The `HostConfig` fields Berth reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HostConfigBody {
    pub binds: Option<Vec<String>>,
    pub mounts: Option<Vec<Value>>,
    pub memory: i64,
    pub memory_swap: i64,
    pub nano_cpus: i64,
    pub cpu_shares: i64,
    pub pids_limit: Option<i64>,
    pub auto_remove: bool,
    pub restart_policy: Option<RestartPolicyBody>,
    pub readonly_rootfs: bool,
    pub privileged: bool,
    pub security_opt: Option<Vec<String>>,
    pub console_size: Option<Vec<u16>>,
    pub network_mode: String,
    pub port_bindings: Option<HashMap<String, Value>>,
    pub publish_all_ports: bool,
    pub dns: Option<Vec<String>>,
    pub dns_search: Option<Vec<String>>,
    pub dns_options: Option<Vec<String>>,
    pub extra_hosts: Option<Vec<String>>,
    pub volumes_from: Option<Vec<String>>,
}

/// One entry of `HostConfig.PortBindings["80/tcp"]`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct PortBindingBody {
    host_ip: String,
    host_port: String,
}

/// `HostConfig.PortBindings`: `{"80/tcp": [{"HostIp": "", "HostPort": "8080"}], ...}`; a null
/// list binds nothing.
fn port_bindings(
    raw: Option<HashMap<String, Value>>,
) -> ApiResult<BTreeMap<String, Vec<HostBinding>>> {
    let mut out = BTreeMap::new();
    for (key, value) in raw.unwrap_or_default() {
        let list: Vec<PortBindingBody> = match value {
            Value::Null => Vec::new(),
            value => serde_json::from_value(value).map_err(|e| {
                ApiError::bad_request(format!("invalid port binding for {key}: {e}"))
            })?,
        };
        let bindings = list
            .into_iter()
            .map(|b| HostBinding {
                host_ip: b.host_ip,
                host_port: b.host_port,
            })
            .collect::<Vec<_>>();
        if !bindings.is_empty() {
            out.insert(key, bindings);
        }
    }
    Ok(out)
}

/// `HostConfig.RestartPolicy`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RestartPolicyBody {
    pub name: String,
    pub maximum_retry_count: i64,
}

fn container_spec(body: CreateBody) -> ApiResult<ContainerSpec> {
    if body.image.is_empty() {
        return Err(ApiError::bad_request(
            "config cannot be empty in order to create a container",
        ));
    }
    let host = body.host_config.unwrap_or_default();
    let binds = host.binds.unwrap_or_default();
    let mut mounts = Vec::new();
    for bind in &binds {
        mounts.push(parse_bind(bind).map_err(|e| ApiError::bad_request(e.to_string()))?);
    }
    for mount in host.mounts.unwrap_or_default() {
        let body: MountBody = serde_json::from_value(mount)
            .map_err(|e| ApiError::bad_request(format!("invalid mount: {e}")))?;
        mounts.push(parse_mount(&body).map_err(|e| ApiError::bad_request(e.to_string()))?);
    }
    for (i, mount) in mounts.iter().enumerate() {
        if mounts[..i]
            .iter()
            .any(|m| m.destination.trim_end_matches('/') == mount.destination.trim_end_matches('/'))
        {
            return Err(ApiError::bad_request(format!(
                "Duplicate mount point: {}",
                mount.destination
            )));
        }
    }
    let port_bindings = port_bindings(host.port_bindings)?;
    // Built-in networks take no endpoint settings; user networks keep their aliases.
    let endpoints: BTreeMap<String, EndpointSpec> = body
        .networking_config
        .and_then(|n| n.endpoints_config)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| !matches!(name.as_str(), "bridge" | "default" | "host" | "none"))
        .map(|(name, settings)| {
            let aliases = settings.and_then(|s| s.aliases).unwrap_or_default();
            (name, EndpointSpec { aliases })
        })
        .collect();
    let entrypoint = body.entrypoint.map(|e| {
        let list = e.into_vec();
        // `--entrypoint ""` arrives as [""]: an empty entrypoint, not the image's.
        if list.len() == 1 && list[0].is_empty() {
            Vec::new()
        } else {
            list
        }
    });
    let mut exposed: Vec<String> = body.exposed_ports.unwrap_or_default().into_keys().collect();
    exposed.sort();
    let mut volumes: Vec<String> = body.volumes.unwrap_or_default().into_keys().collect();
    volumes.sort();
    let console_size = host
        .console_size
        .filter(|s| s.len() == 2)
        .map(|s| (s[0], s[1]));
    Ok(ContainerSpec {
        image: body.image,
        entrypoint,
        cmd: body.cmd.map(StringOrList::into_vec).unwrap_or_default(),
        env: body.env.unwrap_or_default(),
        working_dir: body.working_dir,
        user: body.user,
        hostname: body.hostname,
        domainname: body.domainname,
        labels: body.labels.unwrap_or_default(),
        tty: body.tty,
        open_stdin: body.open_stdin,
        stdin_once: body.stdin_once,
        stop_signal: body.stop_signal,
        stop_timeout: body.stop_timeout,
        exposed_ports: exposed,
        volumes,
        host: HostSpec {
            memory: host.memory,
            memory_swap: host.memory_swap,
            nano_cpus: host.nano_cpus,
            cpu_shares: host.cpu_shares,
            pids_limit: host.pids_limit,
            auto_remove: host.auto_remove,
            restart_policy: host
                .restart_policy
                .map(|p| RestartPolicy {
                    name: p.name,
                    maximum_retry_count: p.maximum_retry_count,
                })
                .unwrap_or_default(),
            readonly_rootfs: host.readonly_rootfs,
            privileged: host.privileged,
            binds,
            security_opt: host.security_opt.unwrap_or_default(),
            console_size,
            network_mode: host.network_mode,
            mounts,
            volumes_from: host.volumes_from.unwrap_or_default(),
            port_bindings,
            publish_all_ports: host.publish_all_ports,
            dns: DnsConfig {
                servers: host.dns.unwrap_or_default(),
                search: host.dns_search.unwrap_or_default(),
                options: host.dns_options.unwrap_or_default(),
            },
            extra_hosts: host.extra_hosts.unwrap_or_default(),
            endpoints,
        },
    })
}

/// `POST /containers/create?name=`.
pub async fn create(
    engine: &Arc<Engine>,
    query: &Query,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let body: CreateBody = body::read_json(request.into_body()).await?;
    let spec = container_spec(body)?;
    let container = engine.create(query.get("name"), spec).await?;
    Ok(body::json(
        StatusCode::CREATED,
        &json!({ "Id": container.id, "Warnings": [] }),
    ))
}

/// `GET /containers/json`.
pub fn list(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let all = query.flag("all", false);
    let limit = query.int("limit")?.filter(|&l| l > 0);
    let filters = query.filters()?;
    let mut records: Vec<ContainerRecord> = engine.list().iter().map(|c| c.record()).collect();
    records.sort_by(|a, b| b.created.cmp(&a.created));
    let listed: Vec<Value> = records
        .iter()
        .filter(|r| {
            all || r.state.status.is_running() || filters.contains_key("status") || limit.is_some()
        })
        .filter(|r| matches_filters(r, &filters))
        .take(limit.map_or(usize::MAX, |l| l as usize))
        .map(summary)
        .collect();
    Ok(body::json(StatusCode::OK, &listed))
}

fn matches_filters(record: &ContainerRecord, filters: &HashMap<String, Vec<String>>) -> bool {
    filters.iter().all(|(name, values)| {
        let matches = |value: &String| match name.as_str() {
            "id" => record.id.starts_with(value.as_str()),
            "name" => record.name.contains(value.trim_start_matches('/')),
            "status" => record.state.status.as_str() == value,
            "exited" => {
                record.state.status == Status::Exited
                    && record.state.exit_code.to_string() == *value
            }
            "label" => match value.split_once('=') {
                Some((k, v)) => record.spec.labels.get(k).is_some_and(|l| l == v),
                None => record.spec.labels.contains_key(value.as_str()),
            },
            "ancestor" => record.spec.image == *value || record.image_id.contains(value.as_str()),
            _ => true,
        };
        // As in dockerd: every label filter must match (compose selects a project's service
        // with several), other filters match any of their values.
        values.is_empty()
            || if name == "label" {
                values.iter().all(matches)
            } else {
                values.iter().any(matches)
            }
    })
}

/// Unix seconds of an RFC 3339 time, 0 for a time that does not parse (Docker's zero).
pub fn unix_seconds(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).map_or(0, |t| t.timestamp())
}

fn command_text(record: &ContainerRecord) -> String {
    let mut parts = record.spec.entrypoint.clone().unwrap_or_default();
    parts.extend(record.spec.cmd.iter().cloned());
    parts.join(" ")
}

/// The human status `docker ps` shows: `Up 5 seconds`, `Exited (0) 3 minutes ago`.
fn status_text(record: &ContainerRecord) -> String {
    let now = chrono::Utc::now().timestamp();
    match record.state.status {
        Status::Created => "Created".to_owned(),
        Status::Running => format!(
            "Up {}",
            human_duration(now - unix_seconds(&record.state.started_at))
        ),
        Status::Paused => format!(
            "Up {} (Paused)",
            human_duration(now - unix_seconds(&record.state.started_at))
        ),
        Status::Restarting => format!(
            "Restarting ({}) {} ago",
            record.state.exit_code,
            human_duration(now - unix_seconds(&record.state.finished_at))
        ),
        Status::Removing => "Removal In Progress".to_owned(),
        Status::Dead => "Dead".to_owned(),
        Status::Exited => format!(
            "Exited ({}) {} ago",
            record.state.exit_code,
            human_duration(now - unix_seconds(&record.state.finished_at))
        ),
    }
}

/// Docker's `units.HumanDuration`.
fn human_duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    match seconds {
        0 => "Less than a second".to_owned(),
        1 => "1 second".to_owned(),
        s if s < 60 => format!("{s} seconds"),
        s if s < 120 => "About a minute".to_owned(),
        s if s < 3600 => format!("{} minutes", s / 60),
        s if s < 7200 => "About an hour".to_owned(),
        s if s < 48 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86400),
    }
}

/// A container's mounts in the shape of inspect's and list's `Mounts`.
pub fn mounts_json(mounts: &[MountPoint]) -> Vec<Value> {
    mounts
        .iter()
        .map(|m| {
            let mut value = json!({
                "Type": m.kind.as_str(),
                "Source": m.source,
                "Destination": m.destination,
                "Mode": if m.read_only { "ro" } else { "" },
                "RW": !m.read_only,
                "Propagation": if m.kind == MountKind::Bind { "rprivate" } else { "" },
            });
            if m.kind == MountKind::Volume {
                value["Name"] = json!(m.source);
                value["Driver"] = json!("local");
                value["Source"] = json!(format!("/var/lib/berth/volumes/{}/_data", m.source));
            }
            value
        })
        .collect()
}

fn summary(record: &ContainerRecord) -> Value {
    json!({
        "Id": record.id,
        "Names": [format!("/{}", record.name)],
        "Image": record.spec.image,
        "ImageID": record.image_id,
        "Command": command_text(record),
        "Created": unix_seconds(&record.created),
        "Ports": port_summaries(record),
        "Labels": record.spec.labels,
        "State": record.state.status.as_str(),
        "Status": status_text(record),
        "HostConfig": { "NetworkMode": network_mode(record) },
        "NetworkSettings": { "Networks": networks_json(record) },
        "Mounts": mounts_json(&record.spec.host.mounts),
    })
}

fn network_mode(record: &ContainerRecord) -> String {
    NetworkMode::display(&record.spec.host.network_mode)
}

/// `Ports` of a `docker ps` entry: one per published port.
fn port_summaries(record: &ContainerRecord) -> Vec<Value> {
    record
        .network
        .ports
        .iter()
        .map(|p| {
            json!({
                "IP": p.host_ip.to_string(),
                "PrivatePort": p.container_port,
                "PublicPort": p.host_port,
                "Type": p.protocol.to_string(),
            })
        })
        .collect()
}

/// `HostConfig.PortBindings` as asked for.
fn port_bindings_json(record: &ContainerRecord) -> Value {
    let map: serde_json::Map<String, Value> = record
        .spec
        .host
        .port_bindings
        .iter()
        .map(|(key, bindings)| {
            let list: Vec<Value> = bindings
                .iter()
                .map(|b| json!({ "HostIp": b.host_ip, "HostPort": b.host_port }))
                .collect();
            (key.clone(), Value::Array(list))
        })
        .collect();
    Value::Object(map)
}

/// `NetworkSettings.Networks`: each bridge endpoint while the container runs, or the mode's
/// network (`host`, `none`) with no address.
fn networks_json(record: &ContainerRecord) -> Value {
    let mode = network_mode(record);
    let mut networks = serde_json::Map::new();
    for endpoint in &record.network.endpoints {
        let mut names = vec![record.name.clone(), record.id[..12].to_owned()];
        names.extend(endpoint.aliases.iter().cloned());
        networks.insert(
            endpoint.network.clone(),
            json!({
                "IPAMConfig": Value::Null,
                "Links": Value::Null,
                "Aliases": endpoint.aliases,
                "MacAddress": format_mac_of(endpoint),
                "NetworkID": endpoint.network_id,
                "EndpointID": record.id,
                "Gateway": endpoint.gateway.to_string(),
                "IPAddress": endpoint.address.to_string(),
                "IPPrefixLen": endpoint.prefix_len,
                "IPv6Gateway": "",
                "GlobalIPv6Address": "",
                "GlobalIPv6PrefixLen": 0,
                "DNSNames": names,
            }),
        );
    }
    if networks.is_empty() && !mode.starts_with("container:") {
        networks.insert(
            mode.clone(),
            json!({
                "NetworkID": "", "EndpointID": "", "Gateway": "", "IPAddress": "",
                "IPPrefixLen": 0, "MacAddress": "", "Aliases": Value::Null,
            }),
        );
    }
    Value::Object(networks)
}

/// `NetworkSettings` of inspect: addresses on the default bridge and the published ports
/// (`{"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}`, null for exposed but
/// unpublished ports, as `docker port` reads them).
fn network_settings_json(record: &ContainerRecord, exposed: &[String]) -> Value {
    let mut ports = serde_json::Map::new();
    if record.state.status.is_running() {
        for key in exposed {
            let key = if key.contains('/') {
                key.clone()
            } else {
                format!("{key}/tcp")
            };
            ports.insert(key, Value::Null);
        }
        for port in &record.network.ports {
            let entry = ports
                .entry(format!("{}/{}", port.container_port, port.protocol))
                .or_insert(Value::Null);
            if entry.is_null() {
                *entry = Value::Array(Vec::new());
            }
            if let Value::Array(list) = entry {
                list.push(json!({ "HostIp": port.host_ip.to_string(), "HostPort": port.host_port.to_string() }));
            }
        }
    }
    // The top-level fields describe the default bridge's endpoint, as in dockerd.
    let bridge = record
        .network
        .endpoints
        .iter()
        .find(|e| e.network == berth_engine::network::DEFAULT_NETWORK);
    json!({
        "Bridge": "",
        "SandboxID": "",
        "SandboxKey": "",
        "HairpinMode": false,
        "Ports": ports,
        "IPAddress": bridge.map(|b| b.address.to_string()).unwrap_or_default(),
        "IPPrefixLen": bridge.map_or(0, |b| b.prefix_len),
        "Gateway": bridge.map(|b| b.gateway.to_string()).unwrap_or_default(),
        "MacAddress": bridge.map(format_mac_of).unwrap_or_default(),
        "EndpointID": if bridge.is_some() { record.id.clone() } else { String::new() },
        "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0,
        "IPv6Gateway": "",
        "Networks": networks_json(record),
    })
}

/// `GET /containers/{id}/json`.
pub fn inspect(engine: &Arc<Engine>, reference: &str) -> ApiResult<ApiResponse> {
    let container = engine.container(reference)?;
    let record = container.record();
    let state = &record.state;
    let spec = &record.spec;
    let restart = &spec.host.restart_policy;
    let args: Vec<String> = {
        let mut all = spec.entrypoint.clone().unwrap_or_default();
        all.extend(spec.cmd.iter().cloned());
        all.into_iter().skip(1).collect()
    };
    let path = spec
        .entrypoint
        .clone()
        .unwrap_or_default()
        .into_iter()
        .chain(spec.cmd.iter().cloned())
        .next()
        .unwrap_or_default();
    let hostname = if spec.hostname.is_empty() {
        record.id[..12].to_owned()
    } else {
        spec.hostname.clone()
    };
    let value = json!({
        "Id": record.id,
        "Created": record.created,
        "Path": path,
        "Args": args,
        "State": {
            "Status": state.status.as_str(),
            "Running": state.status.is_running(),
            "Paused": state.status == Status::Paused,
            "Restarting": state.status == Status::Restarting,
            "OOMKilled": state.oom_killed,
            "Dead": state.status == Status::Dead,
            "Pid": 0,
            "ExitCode": state.exit_code,
            "Error": state.error,
            "StartedAt": state.started_at,
            "FinishedAt": state.finished_at,
        },
        "Image": record.image_id,
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": logs::log_path(&container.dir),
        "Name": format!("/{}", record.name),
        "RestartCount": record.restart_count,
        "Driver": "overlay2",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": Value::Null,
        "HostConfig": {
            "Binds": spec.host.binds,
            "NetworkMode": network_mode(&record),
            "RestartPolicy": { "Name": if restart.name.is_empty() { "no" } else { restart.name.as_str() }, "MaximumRetryCount": restart.maximum_retry_count },
            "AutoRemove": spec.host.auto_remove,
            "Privileged": spec.host.privileged,
            "ReadonlyRootfs": spec.host.readonly_rootfs,
            "SecurityOpt": spec.host.security_opt,
            "Memory": spec.host.memory,
            "MemorySwap": spec.host.memory_swap,
            "NanoCpus": spec.host.nano_cpus,
            "CpuShares": spec.host.cpu_shares,
            "PidsLimit": spec.host.pids_limit,
            "ConsoleSize": spec.host.console_size.map_or([0, 0], |(r, c)| [r, c]),
            "LogConfig": { "Type": "berth", "Config": {} },
            "PortBindings": {},
            "VolumesFrom": spec.host.volumes_from,
            "PortBindings": port_bindings_json(&record),
            "PublishAllPorts": spec.host.publish_all_ports,
            "Dns": spec.host.dns.servers,
            "DnsSearch": spec.host.dns.search,
            "DnsOptions": spec.host.dns.options,
            "ExtraHosts": spec.host.extra_hosts,
        },
        "GraphDriver": { "Name": "overlay2", "Data": {} },
        "Mounts": mounts_json(&spec.host.mounts),
        "Config": {
            "Hostname": hostname,
            "Domainname": spec.domainname,
            "User": spec.user,
            "AttachStdin": false,
            "AttachStdout": false,
            "AttachStderr": false,
            "ExposedPorts": spec.exposed_ports.iter().map(|p| (p.clone(), json!({}))).collect::<serde_json::Map<_, _>>(),
            "Tty": spec.tty,
            "OpenStdin": spec.open_stdin,
            "StdinOnce": spec.stdin_once,
            "Env": spec.env,
            "Cmd": spec.cmd,
            "Image": spec.image,
            "Volumes": spec.volumes.iter().map(|v| (v.clone(), json!({}))).collect::<serde_json::Map<_, _>>(),
            "WorkingDir": spec.working_dir,
            "Entrypoint": spec.entrypoint,
            "Labels": spec.labels,
            "StopSignal": spec.stop_signal,
            "StopTimeout": spec.stop_timeout,
        },
        "NetworkSettings": network_settings_json(&record, &spec.exposed_ports),
    });
    Ok(body::json(StatusCode::OK, &value))
}

/// `POST /containers/{id}/start`.
pub async fn start(engine: &Arc<Engine>, reference: &str) -> ApiResult<ApiResponse> {
    engine.start(reference).await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/stop?t=&signal=`.
pub async fn stop(engine: &Arc<Engine>, reference: &str, query: &Query) -> ApiResult<ApiResponse> {
    let timeout = query.int("t")?.or(query.int("timeout")?);
    engine.stop(reference, query.get("signal"), timeout).await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/restart?t=`.
pub async fn restart(
    engine: &Arc<Engine>,
    reference: &str,
    query: &Query,
) -> ApiResult<ApiResponse> {
    let timeout = query.int("t")?.or(query.int("timeout")?);
    engine.restart(reference, timeout).await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/kill?signal=`.
pub async fn kill(engine: &Arc<Engine>, reference: &str, query: &Query) -> ApiResult<ApiResponse> {
    engine.kill(reference, query.get("signal")).await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/pause`.
pub async fn pause(engine: &Arc<Engine>, reference: &str) -> ApiResult<ApiResponse> {
    engine.pause(reference).await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/unpause`.
pub async fn unpause(engine: &Arc<Engine>, reference: &str) -> ApiResult<ApiResponse> {
    engine.unpause(reference).await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/{id}/rename?name=`.
pub fn rename(engine: &Arc<Engine>, reference: &str, query: &Query) -> ApiResult<ApiResponse> {
    let name = query.get("name").unwrap_or("");
    engine.rename(reference, name)?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `DELETE /containers/{id}?force=&v=`.
pub async fn remove(
    engine: &Arc<Engine>,
    reference: &str,
    query: &Query,
) -> ApiResult<ApiResponse> {
    engine
        .remove_with_volumes(
            reference,
            query.flag("force", false),
            query.flag("v", false),
        )
        .await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /containers/prune`.
pub async fn prune(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let mut deleted = Vec::new();
    for container in engine.list() {
        let record = container.record();
        let stopped = matches!(
            record.state.status,
            Status::Exited | Status::Created | Status::Dead
        );
        if stopped
            && matches_filters(&record, &filters)
            && engine.remove(&record.id, false).await.is_ok()
        {
            deleted.push(record.id);
        }
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({ "ContainersDeleted": deleted, "SpaceReclaimed": 0 }),
    ))
}

/// `POST /containers/{id}/wait?condition=`: the headers go out at once, the body when the
/// condition is met, as dockerd does it (the CLI starts the container after the headers).
pub fn wait(engine: &Arc<Engine>, reference: &str, query: &Query) -> ApiResult<ApiResponse> {
    let condition = match query.get("condition").unwrap_or("not-running") {
        "" | "not-running" => WaitCondition::NotRunning,
        "next-exit" => WaitCondition::NextExit,
        "removed" => WaitCondition::Removed,
        other => {
            return Err(ApiError::bad_request(format!(
                "invalid condition: {other:?}"
            )))
        }
    };
    let waiting = engine.wait(reference, condition)?;
    let (response, sender) = body::streaming("application/json");
    tokio::spawn(async move {
        let report = waiting.await;
        let error = report.error.map(|message| json!({ "Message": message }));
        let _ = sender
            .send(json_line(
                &json!({ "StatusCode": report.code, "Error": error }),
            ))
            .await;
    });
    Ok(response)
}

/// `POST /containers/{id}/attach?stream=&stdin=&stdout=&stderr=&logs=`.
pub fn attach(
    engine: &Arc<Engine>,
    reference: &str,
    query: &Query,
    mut request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let container = engine.container(reference)?;
    let record = container.record();
    let tty = record.spec.tty;
    let (response, on_upgrade) = hijack::upgrade(&mut request, tty)?;
    let want_stdin = query.flag("stdin", false) && record.spec.open_stdin;
    let want_stdout = query.flag("stdout", false);
    let want_stderr = query.flag("stderr", false);
    let stream = query.flag("stream", false);
    let replay = query.flag("logs", false);
    // Subscribed before answering: the client starts the container once it has the answer.
    let output = stream.then(|| container.hub.subscribe());
    let stdin = want_stdin.then(|| container.stdin.sender());
    let stdin_once = record.spec.stdin_once;
    tokio::spawn(async move {
        let Some(io) = hijack::take(on_upgrade).await else {
            return;
        };
        let (mut reader, mut writer) = tokio::io::split(io);
        let input = stdin.map(|sender| {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 32 * 1024];
                loop {
                    match reader.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let data = Bytes::copy_from_slice(&buffer[..n]);
                            if sender.send(StdinMessage::Data(data)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if stdin_once {
                    let _ = sender.send(StdinMessage::Eof).await;
                }
            })
        });
        let wanted = |s: LogStream| match s {
            LogStream::Stdout => want_stdout,
            LogStream::Stderr => want_stderr,
        };
        if replay {
            let filter = LogFilter {
                stdout: want_stdout,
                stderr: want_stderr,
                ..LogFilter::default()
            };
            let path = logs::log_path(&container.dir);
            let records = tokio::task::spawn_blocking(move || logs::read_log(&path, &filter))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            for record in records {
                if writer
                    .write_all(&hijack::frame(tty, record.stream, &record.data))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        if let Some(mut output) = output {
            while let Some(chunk) = output.recv().await {
                if !wanted(chunk.stream) {
                    continue;
                }
                if writer
                    .write_all(&hijack::frame(tty, chunk.stream, &chunk.data))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        let _ = writer.shutdown().await;
        if let Some(input) = input {
            input.abort();
        }
    });
    Ok(response)
}

/// `POST /containers/{id}/resize?h=&w=`.
pub async fn resize(
    engine: &Arc<Engine>,
    reference: &str,
    query: &Query,
) -> ApiResult<ApiResponse> {
    let (rows, cols) = terminal_size(query)?;
    engine.resize(reference, rows, cols).await?;
    Ok(body::empty(StatusCode::OK))
}

/// The `h` and `w` parameters of a resize.
pub fn terminal_size(query: &Query) -> ApiResult<(u16, u16)> {
    let dimension = |key: &str| -> ApiResult<u16> {
        let value = query.int(key)?.unwrap_or(0);
        u16::try_from(value)
            .map_err(|_| ApiError::bad_request(format!("invalid terminal {key}: {value}")))
    };
    Ok((dimension("h")?, dimension("w")?))
}

/// `GET /containers/{id}/logs`.
pub fn logs(engine: &Arc<Engine>, reference: &str, query: &Query) -> ApiResult<ApiResponse> {
    let container = engine.container(reference)?;
    let record = container.record();
    let stdout = query.flag("stdout", false);
    let stderr = query.flag("stderr", false);
    if !stdout && !stderr {
        return Err(ApiError::bad_request(
            "Bad parameters: you must choose at least one stream",
        ));
    }
    let tail = match query.get("tail") {
        None | Some("") | Some("all") => None,
        Some(n) => Some(
            n.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid tail: {n:?}")))?,
        ),
    };
    let filter = LogFilter {
        since_nanos: parse_time(query.get("since"))?,
        until_nanos: parse_time(query.get("until"))?,
        tail,
        stdout,
        stderr,
    };
    let follow = query.flag("follow", false) && record.state.status.is_running();
    let timestamps = query.flag("timestamps", false);
    let tty = record.spec.tty;
    let path = logs::log_path(&container.dir);
    let (length, live) = if follow {
        let (length, receiver) = container.hub.subscribe_at(&path);
        (length, Some(receiver))
    } else {
        (u64::MAX, None)
    };
    let (response, sender) = body::streaming(hijack::content_type(tty));
    tokio::spawn(stream_logs(
        path, length, filter, live, timestamps, tty, sender,
    ));
    Ok(response)
}

async fn stream_logs(
    path: std::path::PathBuf,
    length: u64,
    filter: LogFilter,
    live: Option<mpsc::Receiver<berth_engine::containers::io::Chunk>>,
    timestamps: bool,
    tty: bool,
    sender: mpsc::Sender<Bytes>,
) {
    let wanted = (filter.stdout, filter.stderr);
    let until = filter.until_nanos;
    let records =
        tokio::task::spawn_blocking(move || logs::read_log_prefix(&path, length, &filter))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
    for record in records {
        if sender.send(render(&record, timestamps, tty)).await.is_err() {
            return;
        }
    }
    let Some(mut live) = live else {
        return;
    };
    while let Some(chunk) = live.recv().await {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        if until.is_some_and(|u| now >= u) {
            return;
        }
        let keep = match chunk.stream {
            LogStream::Stdout => wanted.0,
            LogStream::Stderr => wanted.1,
        };
        if !keep {
            continue;
        }
        let record = LogRecord {
            stream: chunk.stream,
            time_nanos: now,
            data: chunk.data.to_vec(),
        };
        if sender.send(render(&record, timestamps, tty)).await.is_err() {
            return;
        }
    }
}

fn render(record: &LogRecord, timestamps: bool, tty: bool) -> Bytes {
    if !timestamps {
        return hijack::frame(tty, record.stream, &record.data);
    }
    let time = chrono::DateTime::from_timestamp_nanos(record.time_nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let mut line = format!("{time} ").into_bytes();
    line.extend_from_slice(&record.data);
    hijack::frame(tty, record.stream, &line)
}

/// `since`/`until` as Docker sends them: unix seconds with an optional fraction, or RFC 3339.
fn parse_time(value: Option<&str>) -> ApiResult<Option<i64>> {
    let Some(value) = value.filter(|v| !v.is_empty() && *v != "0") else {
        return Ok(None);
    };
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(time.timestamp_nanos_opt());
    }
    let (seconds, fraction) = value.split_once('.').unwrap_or((value, ""));
    let seconds: i64 = seconds
        .parse()
        .map_err(|_| ApiError::bad_request(format!("invalid time value: {value:?}")))?;
    let nanos: i64 = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction
            .chars()
            .chain(std::iter::repeat('0'))
            .take(9)
            .collect();
        digits
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid time value: {value:?}")))?
    };
    Ok(Some(
        seconds.saturating_mul(1_000_000_000).saturating_add(nanos),
    ))
}

/// `GET /containers/{id}/top`.
pub async fn top(engine: &Arc<Engine>, reference: &str, _query: &Query) -> ApiResult<ApiResponse> {
    let top = engine.top(reference).await?;
    let processes: Vec<Value> = top
        .processes
        .iter()
        .map(|p| json!([p.pid.to_string(), p.command]))
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &json!({ "Titles": ["PID", "CMD"], "Processes": processes }),
    ))
}

/// `GET /containers/{id}/stats?stream=&one-shot=`.
pub async fn stats(engine: &Arc<Engine>, reference: &str, query: &Query) -> ApiResult<ApiResponse> {
    let container = engine.container(reference)?;
    let stream = query.flag("stream", true) && !query.flag("one-shot", false);
    let info = match engine.cached_system_info() {
        Some(info) => Some(info),
        None => engine.system_info().await.ok(),
    };
    let cpus = info.as_ref().map_or(1, |i| i.cpus);
    let memory_total = info.as_ref().map_or(0, |i| i.mem_total_bytes);
    let first = engine.stats(&container.id).await?;
    let record = container.record();
    if !stream {
        return Ok(body::json(
            StatusCode::OK,
            &stats_json(&record, first.as_ref(), None, cpus, memory_total),
        ));
    }
    let (response, sender) = body::streaming("application/json");
    let engine = Arc::clone(engine);
    tokio::spawn(async move {
        let mut previous = first;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let current = engine.stats(&container.id).await.ok().flatten();
            let value = stats_json(
                &container.record(),
                current.as_ref(),
                previous.as_ref(),
                cpus,
                memory_total,
            );
            if sender.send(json_line(&value)).await.is_err() || current.is_none() {
                return;
            }
            previous = current;
        }
    });
    Ok(response)
}

fn stats_json(
    record: &ContainerRecord,
    current: Option<&berth_engine::ContainerStats>,
    previous: Option<&berth_engine::ContainerStats>,
    cpus: u32,
    memory_total: u64,
) -> Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let cpu = |s: Option<&berth_engine::ContainerStats>| {
        let usage = s
            .and_then(|s| s.cpu.get("usage_usec"))
            .copied()
            .unwrap_or(0)
            * 1000;
        let user = s.and_then(|s| s.cpu.get("user_usec")).copied().unwrap_or(0) * 1000;
        let system = s
            .and_then(|s| s.cpu.get("system_usec"))
            .copied()
            .unwrap_or(0)
            * 1000;
        json!({
            "cpu_usage": { "total_usage": usage, "usage_in_usermode": user, "usage_in_kernelmode": system },
            "system_cpu_usage": chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64 * u64::from(cpus),
            "online_cpus": cpus,
            "throttling_data": { "periods": 0, "throttled_periods": 0, "throttled_time": 0 },
        })
    };
    let memory = current.map_or(json!({}), |s| {
        json!({
            "usage": s.memory_current.unwrap_or(0),
            "limit": s.memory_limit.unwrap_or(memory_total),
            "stats": s.memory_stat,
        })
    });
    let io: Vec<Value> = current
        .map(|s| {
            s.io.iter()
                .flat_map(|(device, counters)| {
                    let (major, minor) = device.split_once(':').unwrap_or((device, "0"));
                    let (major, minor) = (major.parse::<u64>().unwrap_or(0), minor.parse::<u64>().unwrap_or(0));
                    [("rbytes", "read"), ("wbytes", "write")].into_iter().map(move |(key, op)| {
                        json!({ "major": major, "minor": minor, "op": op, "value": counters.get(key).copied().unwrap_or(0) })
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": record.id,
        "name": format!("/{}", record.name),
        "read": now,
        "preread": ZERO_TIME,
        "pids_stats": { "current": current.and_then(|s| s.pids_current).unwrap_or(0), "limit": current.and_then(|s| s.pids_limit) },
        "cpu_stats": cpu(current),
        "precpu_stats": cpu(previous),
        "memory_stats": memory,
        "blkio_stats": { "io_service_bytes_recursive": io },
        "networks": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_spec_empty_entrypoint_string_clears_entrypoint() {
        let body: CreateBody =
            serde_json::from_str(r#"{"Image":"busybox","Entrypoint":[""],"Cmd":["true"]}"#)
                .unwrap();

        let spec = container_spec(body).unwrap();

        assert_eq!(spec.entrypoint, Some(Vec::new()));
    }

    #[test]
    fn container_spec_null_entrypoint_keeps_image_entrypoint() {
        let body: CreateBody =
            serde_json::from_str(r#"{"Image":"busybox","Entrypoint":null,"Cmd":"echo hi"}"#)
                .unwrap();

        let spec = container_spec(body).unwrap();

        assert_eq!(spec.entrypoint, None);
        assert_eq!(spec.cmd, ["echo", "hi"]);
    }

    #[test]
    fn container_spec_without_image_is_bad_request() {
        let error = container_spec(CreateBody::default()).unwrap_err();

        assert_eq!(error.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn parse_time_unix_with_fraction_is_nanoseconds() {
        assert_eq!(parse_time(Some("12.5")).unwrap(), Some(12_500_000_000));
        assert_eq!(parse_time(Some("0")).unwrap(), None);
    }

    #[test]
    fn human_duration_matches_docker_wording() {
        assert_eq!(human_duration(5), "5 seconds");
        assert_eq!(human_duration(90), "About a minute");
        assert_eq!(human_duration(600), "10 minutes");
    }
}
