//! Version negotiation and dispatch of a request to its handler.
//!
//! Paths may carry a `/v1.NN` prefix; versions below [`MIN_API_VERSION`] or above
//! [`API_VERSION`] are refused as dockerd refuses them. Every response carries the headers
//! clients negotiate with (`Api-Version`, `Ostype`, `Docker-Experimental`, `Server`).

use std::sync::Arc;

use berth_engine::Engine;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};

use crate::body::{self, ApiResponse};
use crate::error::{ApiError, ApiResult};
use crate::query::Query;
use crate::{
    archive, build, commit, containers, exec, images, networks, system, volumes, API_VERSION,
    ENGINE_VERSION, MIN_API_VERSION,
};

/// A parsed `major.minor` API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    /// Parses `1.47`.
    pub fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.split_once('.')?;
        Some(Self(major.parse().ok()?, minor.parse().ok()?))
    }
}

/// Splits a `/v1.NN` prefix off `path`.
pub fn split_version(path: &str) -> (Option<&str>, &str) {
    if let Some(rest) = path.strip_prefix("/v") {
        let end = rest.find('/').unwrap_or(rest.len());
        let candidate = &rest[..end];
        if ApiVersion::parse(candidate).is_some() {
            return (Some(candidate), &rest[end..]);
        }
    }
    (None, path)
}

/// Refuses versions outside what berthd serves, with dockerd's messages.
pub fn check_version(version: &str) -> ApiResult<()> {
    let parsed = ApiVersion::parse(version)
        .ok_or_else(|| ApiError::bad_request(format!("invalid API version {version:?}")))?;
    let min = ApiVersion::parse(MIN_API_VERSION).expect("a valid constant");
    let max = ApiVersion::parse(API_VERSION).expect("a valid constant");
    if parsed < min {
        return Err(ApiError::bad_request(format!(
            "client version {version} is too old. Minimum supported API version is {MIN_API_VERSION}, please upgrade your client to a newer version"
        )));
    }
    if parsed > max {
        return Err(ApiError::bad_request(format!(
            "client version {version} is too new. Maximum supported API version is {API_VERSION}"
        )));
    }
    Ok(())
}

/// Answers one request.
pub async fn route(engine: Arc<Engine>, request: Request<Incoming>) -> ApiResponse {
    let path = request.uri().path().to_owned();
    let (version, rest) = split_version(&path);
    let result = match version.map(check_version) {
        Some(Err(e)) => Err(e),
        _ => dispatch(engine, rest.to_owned(), request).await,
    };
    let mut response = result.unwrap_or_else(|e| body::error(&e));
    let headers = response.headers_mut();
    for (name, value) in [
        ("api-version", API_VERSION),
        ("ostype", "linux"),
        ("docker-experimental", "false"),
        ("builder-version", "1"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if let Ok(server) = HeaderValue::from_str(&format!("Docker/{ENGINE_VERSION} (linux)")) {
        headers.insert(hyper::header::SERVER, server);
    }
    response
}

/// Image paths end with an action after a name that may itself contain slashes.
const IMAGE_ACTIONS: &[&str] = &["json", "tag", "push", "history", "get"];

async fn dispatch(
    engine: Arc<Engine>,
    path: String,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let method = request.method().clone();
    let query = Query::parse(request.uri().query());
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let segments: Vec<&str> = trimmed.split('/').collect();
    use Method as M;
    match (&method, segments.as_slice()) {
        (&M::GET | &M::HEAD, ["_ping"]) => Ok(system::ping(&method)),
        (&M::GET, ["version"]) => Ok(system::version(&engine)),
        (&M::GET, ["info"]) => system::info(&engine).await,
        (&M::GET, ["events"]) => system::events(&engine, &query),
        (&M::GET, ["system", "df"]) => system::df(&engine).await,

        (&M::POST, ["containers", "create"]) => containers::create(&engine, &query, request).await,
        (&M::GET, ["containers", "json"]) => containers::list(&engine, &query),
        (&M::POST, ["containers", "prune"]) => containers::prune(&engine, &query).await,
        (&M::GET, ["containers", id, "json"]) => containers::inspect(&engine, id),
        (&M::GET, ["containers", id, "logs"]) => containers::logs(&engine, id, &query),
        (&M::POST, ["containers", id, "start"]) => containers::start(&engine, id).await,
        (&M::POST, ["containers", id, "stop"]) => containers::stop(&engine, id, &query).await,
        (&M::POST, ["containers", id, "restart"]) => containers::restart(&engine, id, &query).await,
        (&M::POST, ["containers", id, "kill"]) => containers::kill(&engine, id, &query).await,
        (&M::POST, ["containers", id, "pause"]) => containers::pause(&engine, id).await,
        (&M::POST, ["containers", id, "unpause"]) => containers::unpause(&engine, id).await,
        (&M::POST, ["containers", id, "wait"]) => containers::wait(&engine, id, &query),
        (&M::POST, ["containers", id, "attach"]) => {
            containers::attach(&engine, id, &query, request)
        }
        (&M::POST, ["containers", id, "resize"]) => containers::resize(&engine, id, &query).await,
        (&M::POST, ["containers", id, "rename"]) => containers::rename(&engine, id, &query),
        (&M::GET, ["containers", id, "top"]) => containers::top(&engine, id, &query).await,
        (&M::GET, ["containers", id, "stats"]) => containers::stats(&engine, id, &query).await,
        (&M::DELETE, ["containers", id]) => containers::remove(&engine, id, &query).await,
        (&M::POST, ["containers", id, "exec"]) => exec::create(&engine, id, request).await,
        (&M::HEAD, ["containers", id, "archive"]) => archive::stat(&engine, id, &query).await,
        (&M::GET, ["containers", id, "archive"]) => archive::get(&engine, id, &query).await,
        (&M::PUT, ["containers", id, "archive"]) => {
            archive::put(&engine, id, &query, request).await
        }
        (&M::GET, ["containers", id, "export"]) => archive::export(&engine, id).await,

        (&M::POST, ["exec", id, "start"]) => exec::start(&engine, id, request).await,
        (&M::POST, ["exec", id, "resize"]) => exec::resize(&engine, id, &query).await,
        (&M::GET, ["exec", id, "json"]) => exec::inspect(&engine, id),

        (&M::POST, ["build"]) => build::build(&engine, &query, request).await,
        (&M::POST, ["commit"]) => commit::commit(&engine, &query).await,
        (&M::POST, ["volumes", "create"]) => volumes::create(&engine, request).await,
        (&M::POST, ["build", "prune"]) => build::prune(&engine).await,
        (&M::POST, ["volumes", "prune"]) => volumes::prune(&engine, &query).await,
        (&M::GET, ["volumes"]) => volumes::list(&engine, &query),
        (&M::GET, ["volumes", name]) => volumes::inspect(&engine, name),
        (&M::DELETE, ["volumes", name]) => volumes::remove(&engine, name, &query).await,
        (&M::GET, ["networks"]) => networks::list(&engine, &query),
        (&M::POST, ["networks", "create"]) => networks::create(&engine, request).await,
        (&M::POST, ["networks", "prune"]) => networks::prune(&engine),
        (&M::GET, ["networks", id]) => networks::inspect(&engine, id),
        (&M::DELETE, ["networks", id]) => networks::remove(&engine, id),
        (&M::POST, ["networks", id, "connect"]) => networks::connect(&engine, id, request).await,
        (&M::POST, ["networks", id, "disconnect"]) => {
            networks::disconnect(&engine, id, request).await
        }

        (&M::GET, ["images", "json"]) => images::list(&engine, &query).await,
        (&M::POST, ["images", "load"]) => images::load(&engine, request).await,
        (&M::POST, ["images", "create"]) => images::create(&engine, &query, request).await,
        (&M::POST, ["images", "prune"]) => images::prune(&engine, &query).await,
        (&M::GET, ["images", "get"]) => images::save(&engine, query.all("names")),
        (_, ["images", ..]) => image_route(&engine, &method, &segments[1..], &query, request).await,
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "page not found")),
    }
}

async fn image_route(
    engine: &Arc<Engine>,
    method: &Method,
    rest: &[&str],
    query: &Query,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "page not found");
    if *method == Method::DELETE {
        return images::remove(engine, &rest.join("/"), query).await;
    }
    let (action, name) = rest.split_last().ok_or_else(not_found)?;
    if name.is_empty() || !IMAGE_ACTIONS.contains(action) {
        return Err(not_found());
    }
    let name = name.join("/");
    match (method, *action) {
        (&Method::GET, "json") => images::inspect(engine, &name).await,
        (&Method::GET, "history") => images::history(engine, &name).await,
        (&Method::GET, "get") => images::save(engine, vec![name.as_str()]),
        (&Method::POST, "tag") => images::tag(engine, &name, query).await,
        (&Method::POST, "push") => images::push(engine, &name, query, request).await,
        _ => Err(not_found()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_version_prefix_is_removed() {
        assert_eq!(
            split_version("/v1.41/containers/json"),
            (Some("1.41"), "/containers/json")
        );
        assert_eq!(
            split_version("/containers/json"),
            (None, "/containers/json")
        );
        assert_eq!(split_version("/version"), (None, "/version"));
    }

    #[test]
    fn check_version_below_minimum_is_refused_like_dockerd() {
        let error = check_version("1.12").unwrap_err();

        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(
            error.message.starts_with("client version 1.12 is too old"),
            "{}",
            error.message
        );
    }

    #[test]
    fn check_version_above_ours_is_refused() {
        assert!(check_version("1.99").is_err());
        assert!(check_version(API_VERSION).is_ok());
        assert!(check_version(MIN_API_VERSION).is_ok());
    }

    #[test]
    fn api_version_orders_numerically() {
        assert!(ApiVersion::parse("1.9").unwrap() < ApiVersion::parse("1.41").unwrap());
    }
}
