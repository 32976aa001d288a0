//! `/networks/...`: list, inspect, create, remove, connect, disconnect, prune.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use berth_engine::network::ops::NetworkView;
use berth_engine::network::store::NetworkRequest;
use berth_engine::Engine;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::body::{self, ApiResponse};
use crate::error::ApiResult;
use crate::query::Query;

/// The body of `POST /networks/create`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct CreateBody {
    name: String,
    driver: String,
    internal: bool,
    attachable: bool,
    labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "IPAM")]
    ipam: Option<IpamBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct IpamBody {
    config: Option<Vec<IpamConfigBody>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct IpamConfigBody {
    subnet: Option<String>,
    gateway: Option<String>,
}

/// The body of connect and disconnect.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct ConnectBody {
    container: String,
    endpoint_config: Option<EndpointConfigBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct EndpointConfigBody {
    aliases: Option<Vec<String>>,
}

fn view_json(view: &NetworkView) -> Value {
    let containers: serde_json::Map<String, Value> = view
        .containers
        .iter()
        .map(|c| {
            (
                c.id.clone(),
                json!({
                    "Name": c.name,
                    "EndpointID": c.id,
                    "MacAddress": c.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
                    "IPv4Address": format!("{}/{}", c.address, c.prefix_len),
                    "IPv6Address": "",
                }),
            )
        })
        .collect();
    let config: Vec<Value> = view
        .ipam
        .iter()
        .map(|(subnet, gateway)| json!({ "Subnet": subnet, "Gateway": gateway.to_string() }))
        .collect();
    let record = view.record.as_ref();
    json!({
        "Name": view.name,
        "Id": view.id,
        "Created": if view.created.is_empty() { berth_engine::containers::ZERO_TIME.to_owned() } else { view.created.clone() },
        "Scope": "local",
        "Driver": view.driver,
        "EnableIPv4": true,
        "EnableIPv6": false,
        "IPAM": { "Driver": "default", "Options": {}, "Config": config },
        "Internal": record.is_some_and(|r| r.internal),
        "Attachable": record.is_some_and(|r| r.attachable),
        "Ingress": false,
        "ConfigFrom": { "Network": "" },
        "ConfigOnly": false,
        "Containers": containers,
        "Options": {},
        "Labels": record.map(|r| r.labels.clone()).unwrap_or_default(),
    })
}

fn matches(view: &NetworkView, filters: &HashMap<String, Vec<String>>) -> bool {
    filters.iter().all(|(name, values)| {
        values.is_empty()
            || values.iter().any(|value| match name.as_str() {
                "name" => view.name.contains(value.as_str()),
                "id" => view.id.starts_with(value.as_str()),
                "driver" => view.driver == value,
                "type" => {
                    (value == "builtin") == view.record.is_none()
                        && matches!(value.as_str(), "builtin" | "custom")
                }
                "label" => view
                    .record
                    .as_ref()
                    .is_some_and(|r| match value.split_once('=') {
                        Some((k, v)) => r.labels.get(k).is_some_and(|l| l == v),
                        None => r.labels.contains_key(value.as_str()),
                    }),
                _ => true,
            })
    })
}

/// `GET /networks`.
pub fn list(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let listed: Vec<Value> = engine
        .network_list()
        .iter()
        .filter(|v| matches(v, &filters))
        .map(view_json)
        .collect();
    Ok(body::json(StatusCode::OK, &listed))
}

/// `GET /networks/{id}`.
pub fn inspect(engine: &Arc<Engine>, reference: &str) -> ApiResult<ApiResponse> {
    let view = engine.network_inspect(reference)?;
    Ok(body::json(StatusCode::OK, &view_json(&view)))
}

/// `POST /networks/create`.
pub async fn create(engine: &Arc<Engine>, request: Request<Incoming>) -> ApiResult<ApiResponse> {
    let body: CreateBody = body::read_json(request.into_body()).await?;
    let first = body
        .ipam
        .and_then(|i| i.config)
        .and_then(|c| c.into_iter().next())
        .unwrap_or_default();
    let record = engine.network_create(NetworkRequest {
        name: body.name,
        driver: body.driver,
        subnet: first.subnet.filter(|s| !s.is_empty()),
        gateway: first.gateway.filter(|g| !g.is_empty()),
        labels: body.labels.unwrap_or_default(),
        internal: body.internal,
        attachable: body.attachable,
    })?;
    Ok(body::json(
        StatusCode::CREATED,
        &json!({ "Id": record.id, "Warning": "" }),
    ))
}

/// `DELETE /networks/{id}`.
pub fn remove(engine: &Arc<Engine>, reference: &str) -> ApiResult<ApiResponse> {
    engine.network_remove(reference)?;
    Ok(body::empty(StatusCode::NO_CONTENT))
}

/// `POST /networks/{id}/connect`.
pub async fn connect(
    engine: &Arc<Engine>,
    reference: &str,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let body: ConnectBody = body::read_json(request.into_body()).await?;
    let aliases = body
        .endpoint_config
        .and_then(|e| e.aliases)
        .unwrap_or_default();
    engine
        .network_connect(reference, &body.container, aliases)
        .await?;
    Ok(body::empty(StatusCode::OK))
}

/// `POST /networks/{id}/disconnect`.
pub async fn disconnect(
    engine: &Arc<Engine>,
    reference: &str,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let body: ConnectBody = body::read_json(request.into_body()).await?;
    engine
        .network_disconnect(reference, &body.container)
        .await?;
    Ok(body::empty(StatusCode::OK))
}

/// `POST /networks/prune`.
pub fn prune(engine: &Arc<Engine>) -> ApiResult<ApiResponse> {
    let removed = engine.network_prune();
    Ok(body::json(
        StatusCode::OK,
        &json!({ "NetworksDeleted": removed }),
    ))
}
