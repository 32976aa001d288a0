//! `POST /commit`: `docker commit`.

use std::sync::Arc;

use berth_engine::commit::CommitOptions;
use berth_engine::runtime::Engine;
use hyper::StatusCode;
use serde_json::json;

use crate::body::{self, ApiResponse};
use crate::error::{ApiError, ApiResult};
use crate::query::Query;

/// `POST /commit?container=&repo=&tag=&comment=&author=&pause=&changes=`.
pub async fn commit(engine: &Arc<Engine>, query: &Query) -> ApiResult<ApiResponse> {
    let container = query
        .get("container")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ApiError::bad_request("no container given to commit"))?;
    let reference = match (
        query.get("repo").unwrap_or(""),
        query.get("tag").unwrap_or(""),
    ) {
        ("", "") => None,
        ("", _) => return Err(ApiError::bad_request("a tag needs a repository")),
        (repo, "") => Some(repo.to_owned()),
        (repo, tag) => Some(format!("{repo}:{tag}")),
    };
    let options = CommitOptions {
        reference,
        comment: query
            .get("comment")
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        author: query
            .get("author")
            .filter(|a| !a.is_empty())
            .map(str::to_owned),
        pause: query.flag("pause", true),
        changes: query
            .all("changes")
            .into_iter()
            .filter(|c| !c.trim().is_empty())
            .map(str::to_owned)
            .collect(),
    };
    let image = engine.commit(container, options).await?;
    Ok(body::json(StatusCode::CREATED, &json!({ "Id": image.id })))
}
