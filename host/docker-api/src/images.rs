//! `/images/...`: load, save, import, list, inspect, history, tag, remove, prune, push.
//!
//! The store is synchronous; archives are streamed between the HTTP body and a blocking task
//! through [`BodyReader`] and [`BodyWriter`], so a multi-GiB load or save never sits in memory.

use std::io::{self, Read, Write};
use std::sync::Arc;

use berth_engine::images::registry::{self, Progress, RegistryAuth};
use berth_engine::images::{Image, RemoveEvent};
use berth_engine::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::body::{self, json_line, ApiResponse};
use crate::containers::unix_seconds;
use crate::error::{ApiError, ApiResult};
use crate::query::Query;

/// A blocking reader over a request body that an async task feeds.
#[derive(Debug)]
pub struct BodyReader {
    chunks: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl BodyReader {
    /// Starts feeding `body` into a reader for a blocking task.
    pub fn spawn(mut body: Incoming) -> Self {
        let (sender, chunks) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(frame) = body.frame().await {
                let item = match frame {
                    Ok(frame) => match frame.into_data() {
                        Ok(data) => Ok(data),
                        Err(_) => continue,
                    },
                    Err(e) => Err(io::Error::other(e)),
                };
                let failed = item.is_err();
                if sender.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Self {
            chunks,
            current: Bytes::new(),
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A blocking writer into a streamed response body.
#[derive(Debug)]
pub struct BodyWriter {
    sender: mpsc::Sender<Bytes>,
}

impl Write for BodyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sender
            .blocking_send(Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn created_seconds(image: &Image) -> i64 {
    image.created.as_deref().map_or(0, unix_seconds)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, berth_engine::images::ImageError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// `GET /images/json`.
pub async fn list(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let all = query.flag("all", false);
    let store = Arc::clone(&engine.images);
    let images = blocking(move || store.list()).await?;
    let records: Vec<_> = engine.list().iter().map(|c| c.record()).collect();
    let listed: Vec<Value> = images
        .iter()
        .filter(|image| all || !image.repo_tags.is_empty() || filters.contains_key("dangling"))
        .filter(|image| {
            filters.iter().all(|(name, values)| {
                values.is_empty()
                    || values.iter().any(|v| match name.as_str() {
                        "dangling" => (v == "true") == image.repo_tags.is_empty(),
                        "reference" => image.repo_tags.iter().any(|t| reference_matches(v, t)),
                        "label" => {
                            let labels = image
                                .config
                                .config()
                                .as_ref()
                                .and_then(|c| c.labels().clone())
                                .unwrap_or_default();
                            match v.split_once('=') {
                                Some((k, val)) => labels.get(k).is_some_and(|l| l == val),
                                None => labels.contains_key(v.as_str()),
                            }
                        }
                        _ => true,
                    })
            })
        })
        .map(|image| {
            json!({
                "Id": image.id,
                "ParentId": "",
                "RepoTags": image.repo_tags,
                "RepoDigests": image.repo_digests,
                "Created": created_seconds(image),
                "Size": image.size,
                "SharedSize": -1,
                "VirtualSize": image.size,
                "Labels": image.config.config().as_ref().and_then(|c| c.labels().clone()),
                "Containers": records.iter().filter(|r| r.image_id == image.id).count(),
            })
        })
        .collect();
    Ok(body::json(StatusCode::OK, &listed))
}

/// Docker's `reference` filter: the repository, or repository:tag, with `*` wildcards.
fn reference_matches(pattern: &str, tag: &str) -> bool {
    let repository = tag.rsplit_once(':').map_or(tag, |(r, _)| r);
    glob(pattern, tag) || glob(pattern, repository)
}

fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((prefix, rest)) => {
            text.starts_with(prefix)
                && (0..=text.len() - prefix.len()).any(|i| {
                    text.is_char_boundary(prefix.len() + i) && glob(rest, &text[prefix.len() + i..])
                })
        }
    }
}

/// `GET /images/{name}/json`.
pub async fn inspect(engine: &Arc<Engine>, name: &str) -> ApiResult<ApiResponse> {
    let store = Arc::clone(&engine.images);
    let reference = name.to_owned();
    let (image, raw) = blocking(move || {
        let image = store.resolve(&reference)?;
        let raw = store.raw_config(&image.id)?;
        Ok((image, raw))
    })
    .await?;
    let raw: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let config = raw.get("config").cloned().unwrap_or(Value::Null);
    let value = json!({
        "Id": image.id,
        "RepoTags": image.repo_tags,
        "RepoDigests": image.repo_digests,
        "Parent": "",
        "Comment": raw.get("comment").cloned().unwrap_or(Value::String(String::new())),
        "Created": image.created.clone().unwrap_or_default(),
        "DockerVersion": raw.get("docker_version").cloned().unwrap_or(Value::String(String::new())),
        "Author": raw.get("author").cloned().unwrap_or(Value::String(String::new())),
        "Config": config,
        "Architecture": raw.get("architecture").cloned().unwrap_or(Value::String("amd64".into())),
        "Os": raw.get("os").cloned().unwrap_or(Value::String("linux".into())),
        "Size": image.size,
        "VirtualSize": image.size,
        "GraphDriver": { "Name": "overlay2", "Data": Value::Null },
        "RootFS": {
            "Type": "layers",
            "Layers": image.layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "Metadata": { "LastTagTime": "0001-01-01T00:00:00Z" },
    });
    Ok(body::json(StatusCode::OK, &value))
}

/// `GET /images/{name}/history`.
pub async fn history(engine: &Arc<Engine>, name: &str) -> ApiResult<ApiResponse> {
    let store = Arc::clone(&engine.images);
    let reference = name.to_owned();
    let image = blocking(move || store.resolve(&reference)).await?;
    let history = image.config.history().clone().unwrap_or_default();
    let mut layers = image.layers.iter();
    let mut entries: Vec<Value> = history
        .iter()
        .map(|h| {
            let empty = h.empty_layer().unwrap_or(false);
            let size = if empty {
                0
            } else {
                layers.next().map_or(0, |l| l.uncompressed_size)
            };
            json!({
                "Id": "<missing>",
                "Created": h.created().as_deref().map_or(0, unix_seconds),
                "CreatedBy": h.created_by().clone().unwrap_or_default(),
                "Tags": Value::Null,
                "Size": size,
                "Comment": h.comment().clone().unwrap_or_default(),
            })
        })
        .collect();
    if entries.is_empty() {
        entries = image
            .layers
            .iter()
            .map(|l| json!({ "Id": "<missing>", "Created": created_seconds(&image), "CreatedBy": "", "Tags": Value::Null, "Size": l.uncompressed_size, "Comment": "" }))
            .collect();
    }
    entries.reverse();
    if let Some(top) = entries.first_mut() {
        top["Id"] = json!(image.id);
        top["Tags"] = json!(image.repo_tags);
    }
    Ok(body::json(StatusCode::OK, &entries))
}

/// `POST /images/{name}/tag?repo=&tag=`.
pub async fn tag(engine: &Arc<Engine>, name: &str, query: &Query) -> ApiResult<ApiResponse> {
    let repo = query.get("repo").unwrap_or("").to_owned();
    if repo.is_empty() {
        return Err(ApiError::bad_request(
            "repository name must have at least one component",
        ));
    }
    let target = match query.get("tag").filter(|t| !t.is_empty()) {
        Some(tag) => format!("{repo}:{tag}"),
        None => repo,
    };
    let store = Arc::clone(&engine.images);
    let source = name.to_owned();
    let tagged = target.clone();
    blocking(move || store.tag(&source, &tagged)).await?;
    engine.events.emit("image", "tag", name, [("name", target)]);
    Ok(body::empty(StatusCode::CREATED))
}

fn render_events(events: &[RemoveEvent]) -> Vec<Value> {
    events
        .iter()
        .map(|e| match e {
            RemoveEvent::Untagged(r) => json!({ "Untagged": r }),
            RemoveEvent::Deleted(d) => json!({ "Deleted": d }),
        })
        .collect()
}

/// `DELETE /images/{name}?force=&noprune=`.
pub async fn remove(engine: &Arc<Engine>, name: &str, query: &Query) -> ApiResult<ApiResponse> {
    let force = query.flag("force", false);
    let store = Arc::clone(&engine.images);
    let users_engine = Arc::clone(engine);
    let reference = name.to_owned();
    let events =
        blocking(move || store.remove(&reference, force, &|id| users_engine.image_user(id)))
            .await?;
    for event in &events {
        match event {
            RemoveEvent::Untagged(r) => engine.events.emit("image", "untag", r.clone(), []),
            RemoveEvent::Deleted(d) => engine.events.emit("image", "delete", d.clone(), []),
        }
    }
    if events.iter().any(|e| matches!(e, RemoveEvent::Deleted(_))) {
        engine.collect_guest_layers().await;
    }
    Ok(body::json(StatusCode::OK, &render_events(&events)))
}

/// `POST /images/prune?filters=`.
pub async fn prune(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let filters = query.filters()?;
    let all = filters
        .get("dangling")
        .is_some_and(|v| v.iter().any(|d| d == "false" || d == "0"));
    let store = Arc::clone(&engine.images);
    let users_engine = Arc::clone(engine);
    let (events, reclaimed) =
        blocking(move || store.prune(all, &|id| users_engine.image_user(id))).await?;
    if !events.is_empty() {
        engine.collect_guest_layers().await;
        engine.trim().await;
    }
    Ok(body::json(
        StatusCode::OK,
        &json!({ "ImagesDeleted": render_events(&events), "SpaceReclaimed": reclaimed }),
    ))
}

/// `POST /images/load?quiet=`: a docker-archive or OCI layout tar, answered with a JSON
/// stream of what was loaded.
pub async fn load(engine: &Arc<Engine>, request: Request<Incoming>) -> ApiResult<ApiResponse> {
    let reader = BodyReader::spawn(request.into_body());
    let store = Arc::clone(&engine.images);
    let (response, sender) = body::streaming("application/json");
    let engine = Arc::clone(engine);
    tokio::spawn(async move {
        let result = tokio::task::spawn_blocking(move || {
            let mut lines = Vec::new();
            let loaded = store.load(reader, &mut |line: &str| lines.push(line.to_owned()));
            (loaded, lines)
        })
        .await;
        let (loaded, lines) = match result {
            Ok(done) => done,
            Err(e) => (
                Err(berth_engine::images::ImageError::InvalidArchive(
                    e.to_string(),
                )),
                Vec::new(),
            ),
        };
        match loaded {
            Ok(images) => {
                // Also under `quiet`, which silences progress bars only: dockerd still says
                // what it loaded.
                for line in lines {
                    let _ = sender
                        .send(json_line(&json!({ "stream": format!("{line}\n") })))
                        .await;
                }
                for image in images {
                    engine.events.emit("image", "load", image.id.clone(), []);
                }
            }
            Err(e) => {
                let message = berth_engine::vm::error_chain(&e);
                let _ = sender
                    .send(json_line(
                        &json!({ "errorDetail": { "message": message }, "error": message }),
                    ))
                    .await;
            }
        }
    });
    Ok(response)
}

/// `GET /images/get?names=` and `GET /images/{name}/get`: a docker-archive tar.
pub fn save(engine: &Arc<Engine>, names: Vec<&str>) -> ApiResult<ApiResponse> {
    if names.is_empty() {
        return Err(ApiError::bad_request("no images named to save"));
    }
    let references: Vec<String> = names.into_iter().map(str::to_owned).collect();
    let store = Arc::clone(&engine.images);
    let (response, sender) = body::streaming("application/x-tar");
    tokio::task::spawn_blocking(move || {
        let writer = BodyWriter { sender };
        if let Err(e) = store.save(&references, writer) {
            tracing::warn!(error = %berth_engine::vm::error_chain(&e), "docker save failed midway");
        }
    });
    Ok(response)
}

/// `POST /images/create`: `fromSrc` imports a rootfs tarball; pulling from a registry
/// (`fromImage`) is answered in the progress stream.
pub async fn create(
    engine: &Arc<Engine>,
    query: &Query,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    if let Some(source) = query.get("fromSrc") {
        if source != "-" {
            return Err(ApiError::bad_request(
                "importing from a URL is not supported; send the tarball in the request body",
            ));
        }
        let reference = match (
            query.get("repo").filter(|r| !r.is_empty()),
            query.get("tag").filter(|t| !t.is_empty()),
        ) {
            (Some(repo), Some(tag)) => Some(format!("{repo}:{tag}")),
            (Some(repo), None) => Some(repo.to_owned()),
            _ => None,
        };
        let reader = BodyReader::spawn(request.into_body());
        let store = Arc::clone(&engine.images);
        let image = blocking(move || store.import(reader, reference.as_deref(), None)).await?;
        engine.events.emit("image", "import", image.id.clone(), []);
        let (response, sender) = body::streaming("application/json");
        let _ = sender.send(json_line(&json!({ "status": image.id }))).await;
        return Ok(response);
    }
    let image = query.get("fromImage").unwrap_or("");
    if image.is_empty() {
        return Err(ApiError::bad_request("fromImage or fromSrc is required"));
    }
    let tag = query.get("tag").filter(|t| !t.is_empty());
    let reference = match tag {
        Some(tag) if !image.contains('@') => format!("{image}:{tag}"),
        _ => image.to_owned(),
    };
    let auth = registry_auth(&request)?;
    let store = Arc::clone(&engine.images);
    let events = Arc::clone(engine);
    transfer(move |progress| {
        let image = registry::pull(&store, &reference, auth.as_ref(), progress)?;
        events.events.emit(
            "image",
            "pull",
            reference.clone(),
            [("name", reference.clone())],
        );
        Ok(image.id)
    })
    .await
}

/// The credentials the CLI sends in `X-Registry-Auth`.
fn registry_auth(request: &Request<Incoming>) -> ApiResult<Option<RegistryAuth>> {
    match request.headers().get("x-registry-auth") {
        None => Ok(None),
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| ApiError::bad_request("invalid X-Registry-Auth header"))?;
            Ok(RegistryAuth::from_header(text)?)
        }
    }
}

/// Runs a pull or push in a blocking task and streams its progress. A failure before any
/// progress is an HTTP error; after it, an error object in the stream, as dockerd does it.
async fn transfer<T: Send + 'static>(
    work: impl FnOnce(&mut dyn FnMut(Progress)) -> Result<T, berth_engine::images::ImageError>
        + Send
        + 'static,
) -> ApiResult<ApiResponse> {
    let (sender, mut receiver) = mpsc::channel::<Bytes>(64);
    // The task owns the only sender: the receiver ends exactly when the work is done.
    let task = tokio::task::spawn_blocking(move || {
        let mut progress = move |event: Progress| {
            let _ = sender.blocking_send(json_line(&event.to_json()));
        };
        work(&mut progress)
    });
    let first = receiver.recv().await;
    let (response, body) = body::streaming("application/json");
    match first {
        Some(line) => {
            let _ = body.send(line).await;
        }
        None => {
            // The work ended without progress: its result decides the status.
            task.await
                .map_err(|e| ApiError::internal(e.to_string()))??;
            return Ok(response);
        }
    }
    tokio::spawn(async move {
        while let Some(line) = receiver.recv().await {
            if body.send(line).await.is_err() {
                break;
            }
        }
        if let Ok(Err(e)) = task.await {
            let message = berth_engine::vm::error_chain(&e);
            let _ = body
                .send(json_line(
                    &json!({ "errorDetail": { "message": message }, "error": message }),
                ))
                .await;
        }
    });
    Ok(response)
}

/// `POST /images/{name}/push`.
pub async fn push(
    engine: &Arc<Engine>,
    name: &str,
    query: &Query,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let reference = match query.get("tag").filter(|t| !t.is_empty()) {
        Some(tag) => format!("{name}:{tag}"),
        None => name.to_owned(),
    };
    let auth = registry_auth(&request)?;
    let store = Arc::clone(&engine.images);
    let events = Arc::clone(engine);
    transfer(move |progress| {
        let digest = registry::push(&store, &reference, auth.as_ref(), progress)?;
        events.events.emit(
            "image",
            "push",
            reference.clone(),
            [("name", reference.clone())],
        );
        Ok(digest)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_matches_repository_and_wildcards() {
        assert!(reference_matches("busybox", "busybox:latest"));
        assert!(reference_matches("busy*", "busybox:latest"));
        assert!(reference_matches("busybox:latest", "busybox:latest"));
        assert!(!reference_matches("alpine", "busybox:latest"));
    }
}
