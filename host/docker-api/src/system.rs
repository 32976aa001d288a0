//! `/_ping`, `/version`, `/info`, `/events`, `/system/df`.

use std::sync::Arc;

use berth_engine::containers::Status;
use berth_engine::Engine;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::body::{self, json_line, ApiResponse};
use crate::containers::unix_seconds;
use crate::error::{ApiError, ApiResult};
use crate::query::Query;
use crate::{API_VERSION, ENGINE_VERSION, MIN_API_VERSION};

/// `GET|HEAD /_ping`: `OK`, with the negotiation headers the router adds.
pub fn ping(method: &Method) -> ApiResponse {
    let mut response = body::with_type(StatusCode::OK, "text/plain; charset=utf-8", "OK".into());
    if *method == Method::HEAD {
        *response.body_mut() = body::ApiBody::Full(http_body_util::Full::new(bytes::Bytes::new()));
    }
    response.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    response
}

/// `GET /version`. The kernel is the guest's when a VM has run, else the one Berth will boot.
pub fn version(engine: &Arc<Engine>) -> ApiResponse {
    let kernel = engine
        .cached_system_info()
        .map(|i| i.kernel_release)
        .or_else(|| berth_engine::assets::Assets::discover().kernel_release())
        .unwrap_or_default();
    let value = json!({
        "Platform": { "Name": "Berth" },
        "Components": [{
            "Name": "Engine",
            "Version": ENGINE_VERSION,
            "Details": {
                "ApiVersion": API_VERSION,
                "MinAPIVersion": MIN_API_VERSION,
                "Arch": "amd64",
                "Os": "linux",
                "KernelVersion": kernel,
                "GitCommit": env!("CARGO_PKG_VERSION"),
                "GoVersion": "n/a (Rust)",
                "Experimental": "false",
            }
        }],
        "Version": ENGINE_VERSION,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": env!("CARGO_PKG_VERSION"),
        "GoVersion": "n/a (Rust)",
        "Os": "linux",
        "Arch": "amd64",
        "KernelVersion": kernel,
        "BuildTime": "",
    });
    body::json(StatusCode::OK, &value)
}

/// `GET /info`, with the guest's real kernel, CPUs and memory (the VM boots if needed).
pub async fn info(engine: &Arc<Engine>) -> ApiResult<ApiResponse> {
    let guest = engine.system_info().await?;
    let containers: Vec<Status> = engine.list().iter().map(|c| c.status()).collect();
    let count = |f: fn(Status) -> bool| containers.iter().filter(|s| f(**s)).count();
    let store = Arc::clone(&engine.images);
    let images = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let value = json!({
        "ID": guest.boot_id,
        "Containers": containers.len(),
        "ContainersRunning": count(|s| s == Status::Running),
        "ContainersPaused": count(|s| s == Status::Paused),
        "ContainersStopped": count(|s| !s.is_running()),
        "Images": images.len(),
        "Driver": "overlay2",
        "DriverStatus": [["Backing Filesystem", "tmpfs"]],
        "Plugins": { "Volume": ["local"], "Network": ["none"], "Authorization": Value::Null, "Log": ["berth"] },
        "MemoryLimit": true,
        "SwapLimit": true,
        "CpuCfsPeriod": true,
        "CpuCfsQuota": true,
        "CPUShares": true,
        "PidsLimit": true,
        "OomKillDisable": false,
        "IPv4Forwarding": false,
        "Debug": false,
        "NFd": 0,
        "NGoroutines": 0,
        "SystemTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        "LoggingDriver": "berth",
        "CgroupDriver": "cgroupfs",
        "CgroupVersion": "2",
        "NEventsListener": 0,
        "KernelVersion": guest.kernel_release,
        "OperatingSystem": "Berth VM",
        "OSVersion": "",
        "OSType": "linux",
        "Architecture": guest.arch,
        "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": { "IndexConfigs": {}, "InsecureRegistryCIDRs": ["127.0.0.0/8"], "Mirrors": [] },
        "NCPU": guest.cpus,
        "MemTotal": guest.mem_total_bytes,
        "DockerRootDir": engine.data_root(),
        "Name": "berth",
        "Labels": [],
        "ExperimentalBuild": false,
        "ServerVersion": ENGINE_VERSION,
        "Runtimes": { "berth": { "path": "berth-agent" } },
        "DefaultRuntime": "berth",
        "Swarm": { "LocalNodeState": "inactive", "ControlAvailable": false, "NodeID": "", "NodeAddr": "" },
        "LiveRestoreEnabled": false,
        "Isolation": "",
        "InitBinary": "",
        "SecurityOptions": ["name=seccomp,profile=builtin", "name=cgroupns"],
        "Warnings": [],
    });
    Ok(body::json(StatusCode::OK, &value))
}

/// `GET /events?since=&until=&filters=`: past events from `since`, then live ones.
pub fn events(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let since = seconds(query.get("since"))?;
    let until = seconds(query.get("until"))?;
    let (past, mut live) = engine.events.subscribe(since);
    let (response, sender) = body::streaming("application/json");
    tokio::spawn(async move {
        let wanted = |event: &berth_engine::events::Event| {
            filters.iter().all(|(name, values)| {
                values.is_empty()
                    || values.iter().any(|v| match name.as_str() {
                        "type" => event.kind == v,
                        "event" | "action" => {
                            event.action == *v || event.action.starts_with(&format!("{v}:"))
                        }
                        "container" | "image" => {
                            event.actor_id.starts_with(v.as_str())
                                || event.attributes.get("name") == Some(v)
                        }
                        "label" => event
                            .attributes
                            .contains_key(v.split('=').next().unwrap_or(v)),
                        _ => true,
                    })
            })
        };
        let render = |event: &berth_engine::events::Event| {
            json_line(&json!({
                "Type": event.kind,
                "Action": event.action,
                "status": event.action,
                "id": event.actor_id,
                "from": event.attributes.get("image"),
                "Actor": { "ID": event.actor_id, "Attributes": event.attributes },
                "scope": "local",
                "time": event.time_nanos / 1_000_000_000,
                "timeNano": event.time_nanos,
            }))
        };
        for event in past.iter().filter(|e| wanted(e)) {
            if until.is_some_and(|u| event.time_nanos >= u) {
                return;
            }
            if sender.send(render(event)).await.is_err() {
                return;
            }
        }
        loop {
            let next = match until {
                Some(u) => {
                    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
                    let left = std::time::Duration::from_nanos(u.saturating_sub(now).max(0) as u64);
                    match tokio::time::timeout(left, live.recv()).await {
                        Ok(next) => next,
                        Err(_) => return,
                    }
                }
                None => live.recv().await,
            };
            match next {
                Ok(event) if wanted(&event) => {
                    if sender.send(render(&event)).await.is_err() {
                        return;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(response)
}

/// A `since`/`until` in unix seconds (with fraction) as nanoseconds.
fn seconds(value: Option<&str>) -> ApiResult<Option<i64>> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let parsed: f64 = value
        .parse()
        .map_err(|_| ApiError::bad_request(format!("invalid time value {value:?}")))?;
    Ok(Some((parsed * 1e9) as i64))
}

/// `GET /system/df`.
pub async fn df(engine: &Arc<Engine>) -> ApiResult<ApiResponse> {
    let store = Arc::clone(&engine.images);
    let images = tokio::task::spawn_blocking(move || store.list())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    let records: Vec<_> = engine.list().iter().map(|c| c.record()).collect();
    let usage = engine.disk_usage().await?;
    let measured = !usage.volumes.is_empty() || !usage.layers.is_empty();
    let size_of = |sizes: &std::collections::BTreeMap<String, u64>, key: &str| -> i64 {
        match sizes.get(key) {
            Some(&bytes) => i64::try_from(bytes).unwrap_or(i64::MAX),
            None if measured => 0,
            // Unknown while no VM runs, as dockerd reports an unmeasured size.
            None => -1,
        }
    };
    let volume_values: Vec<Value> = engine
        .volumes
        .list()
        .iter()
        .map(|volume| {
            let users = engine.volume_users(&volume.name).len() as i64;
            crate::volumes::volume_json(
                volume,
                Some((size_of(&usage.volumes, &volume.name), users)),
            )
        })
        .collect();
    let layers_size: u64 = images.iter().map(|i| i.size).sum();
    let image_values: Vec<Value> = images
        .iter()
        .map(|image| {
            let users = records.iter().filter(|r| r.image_id == image.id).count();
            json!({
                "Id": image.id,
                "ParentId": "",
                "RepoTags": image.repo_tags,
                "RepoDigests": image.repo_digests,
                "Created": image.created.as_deref().map_or(0, unix_seconds),
                "Size": image.size,
                "SharedSize": 0,
                "VirtualSize": image.size,
                "Labels": image.config.config().as_ref().and_then(|c| c.labels().clone()),
                "Containers": users,
            })
        })
        .collect();
    let container_values: Vec<Value> = records
        .iter()
        .map(|r| {
            json!({
                "Id": r.id,
                "Names": [format!("/{}", r.name)],
                "Image": r.spec.image,
                "ImageID": r.image_id,
                "Command": r.spec.cmd.join(" "),
                "Created": unix_seconds(&r.created),
                "State": r.state.status.as_str(),
                "Status": r.state.status.as_str(),
                "SizeRw": size_of(&usage.containers, &r.id).max(0),
                "SizeRootFs": 0,
                "Labels": r.spec.labels,
                "Mounts": crate::containers::mounts_json(&r.spec.host.mounts),
            })
        })
        .collect();
    Ok(body::json(
        StatusCode::OK,
        &json!({
            "LayersSize": layers_size,
            "Images": image_values,
            "Containers": container_values,
            "Volumes": volume_values,
            "BuildCache": [],
        }),
    ))
}
