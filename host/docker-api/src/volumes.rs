//! `/volumes`: create, list, inspect, remove and prune, in the shapes of dockerd's local
//! driver. Records live on the host; data on the guest's data disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_engine::volumes::VolumeRecord;
use berth_engine::Engine;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::{self, ApiResponse};
use crate::error::{ApiError, ApiResult};
use crate::query::Query;

/// Where the guest keeps a volume's data, shown as `Mountpoint`.
const GUEST_VOLUMES: &str = "/var/lib/berth/volumes";

/// `POST /volumes/create` body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateBody {
    name: Option<String>,
    driver: Option<String>,
    driver_opts: Option<BTreeMap<String, String>>,
    labels: Option<BTreeMap<String, String>>,
}

/// A volume in dockerd's shape; `size` and `users` fill `UsageData` when known.
pub fn volume_json(record: &VolumeRecord, usage: Option<(i64, i64)>) -> Value {
    let mut value = json!({
        "CreatedAt": record.created,
        "Driver": "local",
        "Labels": record.labels,
        "Mountpoint": format!("{GUEST_VOLUMES}/{}/_data", record.name),
        "Name": record.name,
        "Options": {},
        "Scope": "local",
    });
    if let Some((size, users)) = usage {
        value["UsageData"] = json!({ "Size": size, "RefCount": users });
    }
    value
}

/// `POST /volumes/create`.
pub async fn create(engine: &Arc<Engine>, request: Request<Incoming>) -> ApiResult<ApiResponse> {
    let body: CreateBody = body::read_json(request.into_body()).await?;
    let record = engine.volume_create(
        body.name.as_deref(),
        body.driver.as_deref(),
        &body.driver_opts.unwrap_or_default(),
        body.labels.unwrap_or_default(),
    )?;
    engine.events.emit(
        "volume",
        "create",
        &record.name,
        [("driver", "local".to_owned())],
    );
    Ok(body::json(StatusCode::CREATED, &volume_json(&record, None)))
}

/// `GET /volumes?filters=`: `name` (substring), `label`, `dangling`, `driver`.
pub fn list(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let mut volumes = Vec::new();
    for record in engine.volumes.list() {
        let users = engine.volume_users(&record.name);
        if !matches(&record, users.is_empty(), &filters)? {
            continue;
        }
        volumes.push(volume_json(&record, None));
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({ "Volumes": volumes, "Warnings": [] }),
    ))
}

fn matches(
    record: &VolumeRecord,
    dangling: bool,
    filters: &std::collections::HashMap<String, Vec<String>>,
) -> ApiResult<bool> {
    for (name, values) in filters {
        let ok = match name.as_str() {
            "name" => values.iter().any(|v| record.name.contains(v.as_str())),
            "driver" => values.iter().any(|v| v == "local"),
            "label" => values.iter().all(|l| match l.split_once('=') {
                Some((k, v)) => record.labels.get(k).is_some_and(|x| x == v),
                None => record.labels.contains_key(l),
            }),
            "dangling" => values.iter().any(|v| match v.as_str() {
                "true" | "1" => dangling,
                "false" | "0" => !dangling,
                _ => false,
            }),
            other => return Err(ApiError::bad_request(format!("invalid filter '{other}'"))),
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `GET /volumes/{name}`.
pub fn inspect(engine: &Arc<Engine>, name: &str) -> ApiResult<ApiResponse> {
    let record = engine
        .volumes
        .get(name)
        .map_err(berth_engine::EngineError::from)?;
    Ok(body::json(StatusCode::OK, &volume_json(&record, None)))
}

/// `DELETE /volumes/{name}?force=`.
pub async fn remove(engine: &Arc<Engine>, name: &str, query: &Query) -> ApiResult<ApiResponse> {
    engine
        .volume_remove(name, query.flag("force", false))
        .await?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /volumes/prune?filters=`: unused anonymous volumes, or every unused one with the
/// `all=true` filter (API 1.42+ semantics); `label` filters narrow it.
pub async fn prune(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let all = filters
        .get("all")
        .is_some_and(|v| v.iter().any(|x| x == "true" || x == "1"));
    let labels = filters.get("label").cloned().unwrap_or_default();
    if let Some(other) = filters
        .keys()
        .find(|k| !matches!(k.as_str(), "all" | "label"))
    {
        return Err(ApiError::bad_request(format!("invalid filter '{other}'")));
    }
    let report = engine.volume_prune(all, &labels).await?;
    Ok(body::json(
        StatusCode::OK,
        &json!({ "VolumesDeleted": report.removed, "SpaceReclaimed": report.reclaimed }),
    ))
}
