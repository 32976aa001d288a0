//! `POST /build`: the classic builder, with the build context as a tar body (plain or gzip)
//! and Docker's JSON progress stream (`stream`, `aux`, `error` messages).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::Arc;

use berth_engine::build::builder::BuildOptions;
use berth_engine::runtime::Engine;
use hyper::body::Incoming;
use hyper::Request;
use serde_json::json;
use tokio::sync::mpsc;

use crate::body::{self, json_line, ApiResponse};
use crate::error::{ApiError, ApiResult};
use crate::images::BodyReader;
use crate::query::Query;

/// `POST /build?t=&dockerfile=&target=&nocache=&pull=&q=&buildargs=&labels=`.
pub async fn build(
    engine: &Arc<Engine>,
    query: &Query,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    if query.get("remote").is_some_and(|r| !r.is_empty()) {
        return Err(ApiError::bad_request(
            "building from a remote context is not supported; send the context as the body",
        ));
    }
    let options = BuildOptions {
        dockerfile: query.get("dockerfile").unwrap_or("").to_owned(),
        tags: query
            .all("t")
            .into_iter()
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        target: query
            .get("target")
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        no_cache: query.flag("nocache", false),
        pull: query.flag("pull", false),
        build_args: json_map(query, "buildargs")?,
        labels: json_map(query, "labels")?,
    };
    let quiet = query.flag("q", false);
    let context = engine
        .data_root()
        .join("build")
        .join(&berth_engine::containers::new_id()[..16]);
    let reader = BodyReader::spawn(request.into_body());
    let target = context.clone();
    let unpacked = tokio::task::spawn_blocking(move || unpack_context(reader, &target))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Err(message) = unpacked {
        let _ = std::fs::remove_dir_all(&context);
        return Err(ApiError::bad_request(message));
    }
    let (response, sender) = body::streaming("application/json");
    let engine = Arc::clone(engine);
    tokio::spawn(async move {
        let (out, mut lines) = mpsc::channel::<String>(64);
        let forward = {
            let sender = sender.clone();
            tokio::spawn(async move {
                while let Some(text) = lines.recv().await {
                    if !quiet {
                        let _ = sender.send(json_line(&json!({ "stream": text }))).await;
                    }
                }
            })
        };
        let result = engine.build(&context, options, &out).await;
        drop(out);
        let _ = forward.await;
        match result {
            Ok(id) => {
                let _ = sender
                    .send(json_line(&json!({ "aux": { "ID": id } })))
                    .await;
                if quiet {
                    let _ = sender
                        .send(json_line(&json!({ "stream": format!("{id}\n") })))
                        .await;
                }
            }
            Err(e) => {
                let message = e.to_string();
                let _ = sender
                    .send(json_line(
                        &json!({ "errorDetail": { "message": message }, "error": message }),
                    ))
                    .await;
            }
        }
        let _ = tokio::fs::remove_dir_all(&context).await;
    });
    Ok(response)
}

/// `POST /build/prune`: forgets the build cache.
pub async fn prune(engine: &Arc<Engine>) -> ApiResult<ApiResponse> {
    let engine = Arc::clone(engine);
    let dropped = tokio::task::spawn_blocking(move || engine.prune_build_cache())
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(body::json(
        hyper::StatusCode::OK,
        &json!({ "CachesDeleted": dropped, "SpaceReclaimed": 0 }),
    ))
}

/// A query parameter holding a JSON object of strings (`buildargs`, `labels`).
fn json_map(query: &Query, key: &str) -> ApiResult<BTreeMap<String, String>> {
    match query.get(key).filter(|v| !v.is_empty()) {
        None => Ok(BTreeMap::new()),
        Some(text) => {
            let values: BTreeMap<String, Option<String>> = serde_json::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("invalid {key}: {e}")))?;
            Ok(values
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k, v)))
                .collect())
        }
    }
}

/// Unpacks the context tar (plain or gzip) into `target`; entries that would leave it are
/// refused by the tar crate's checks.
fn unpack_context(reader: BodyReader, target: &std::path::Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("cannot create the context: {e}"))?;
    let mut buffered = BufReader::with_capacity(64 * 1024, reader);
    let gzip = buffered
        .fill_buf()
        .map(|head| head.starts_with(&[0x1f, 0x8b]))
        .map_err(|e| format!("cannot read the build context: {e}"))?;
    let input: Box<dyn std::io::Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive
        .unpack(target)
        .map_err(|e| format!("the build context is not a valid tar archive: {e}"))
}
