//! `docker cp` and `docker export`: `HEAD`/`GET`/`PUT /containers/{id}/archive` and
//! `GET /containers/{id}/export`.
//!
//! What a path is travels in the `X-Docker-Container-Path-Stat` header as base64 of Go's
//! `ContainerPathStat` JSON, with the mode in Go's `os.FileMode` bits, not Linux's: the CLI
//! decides from it how to name what it copies.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use berth_engine::archive::{ArchiveDownload, CopyInOptions, PathStat};
use berth_engine::runtime::Engine;
use bytes::{Buf, Bytes};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, StatusCode};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::body::{self, ApiResponse};
use crate::error::{ApiError, ApiResult};
use crate::query::Query;

/// The header carrying a path's stat.
const PATH_STAT_HEADER: &str = "x-docker-container-path-stat";

/// Bytes read from the agent per chunk of a download.
const CHUNK: usize = 64 * 1024;

/// `HEAD /containers/{id}/archive?path=`.
pub async fn stat(engine: &Arc<Engine>, id: &str, query: &Query) -> ApiResult<ApiResponse> {
    let path = required_path(query)?;
    let stat = engine.stat_path(id, path).await?;
    let mut response = body::empty(StatusCode::OK);
    insert_stat(&mut response, &stat)?;
    Ok(response)
}

/// `GET /containers/{id}/archive?path=`: the path's stat in the header, a tar of it as the
/// body.
pub async fn get(engine: &Arc<Engine>, id: &str, query: &Query) -> ApiResult<ApiResponse> {
    let path = required_path(query)?;
    let (stat, download) = engine.read_archive(id, path).await?;
    let mut response = stream_download(download);
    insert_stat(&mut response, &stat)?;
    Ok(response)
}

/// `GET /containers/{id}/export`: the container's root filesystem as a tar.
pub async fn export(engine: &Arc<Engine>, id: &str) -> ApiResult<ApiResponse> {
    let download = engine.export(id).await?;
    Ok(stream_download(download))
}

/// `PUT /containers/{id}/archive?path=&noOverwriteDirNonDir=&copyUIDGID=`: extracts the tar
/// body into the directory `path`.
pub async fn put(
    engine: &Arc<Engine>,
    id: &str,
    query: &Query,
    request: Request<Incoming>,
) -> ApiResult<ApiResponse> {
    let path = required_path(query)?;
    let options = CopyInOptions {
        no_overwrite_dir_non_dir: query.flag("noOverwriteDirNonDir", false),
        copy_uid_gid: query.flag("copyUIDGID", false),
    };
    let body = IncomingReader::new(request.into_body());
    engine.write_archive(id, path, body, options).await?;
    Ok(body::empty(StatusCode::OK))
}

fn required_path(query: &Query) -> ApiResult<&str> {
    match query.get("path") {
        Some(path) if !path.is_empty() => Ok(path),
        _ => Err(ApiError::bad_request("path cannot be empty")),
    }
}

fn insert_stat(response: &mut ApiResponse, stat: &PathStat) -> ApiResult<()> {
    let value = json!({
        "name": stat.name,
        "size": stat.size,
        "mode": go_file_mode(stat.mode),
        "mtime": go_time(stat.mtime_unix_nanos),
        "linkTarget": stat.link_target,
    });
    let encoded = base64::engine::general_purpose::STANDARD.encode(value.to_string());
    let header = HeaderValue::from_str(&encoded)
        .map_err(|e| ApiError::internal(format!("cannot encode the path stat: {e}")))?;
    response
        .headers_mut()
        .insert(HeaderName::from_static(PATH_STAT_HEADER), header);
    Ok(())
}

/// Streams a download into a response; a tar the agent could not finish aborts the body, so
/// the client sees an error instead of a short archive that looks whole.
fn stream_download(download: ArchiveDownload) -> ApiResponse {
    let (response, sender) = body::fallible_streaming("application/x-tar");
    tokio::spawn(async move {
        let mut download = download;
        let mut buffer = vec![0u8; CHUNK];
        loop {
            match download.stream.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => {
                    if sender
                        .send(Ok(Bytes::copy_from_slice(&buffer[..n])))
                        .await
                        .is_err()
                    {
                        // The client went away; dropping the stream stops the agent.
                        return;
                    }
                }
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    return;
                }
            }
        }
        if let Err(e) = download.finish().await {
            tracing::warn!(error = %e, "a container archive ended early");
            let _ = sender.send(Err(io::Error::other(e.to_string()))).await;
        }
    });
    response
}

/// Go's `os.FileMode` for a Linux `st_mode`.
fn go_file_mode(mode: u32) -> u32 {
    const DIR: u32 = 1 << 31;
    const SYMLINK: u32 = 1 << 27;
    const DEVICE: u32 = 1 << 26;
    const NAMED_PIPE: u32 = 1 << 25;
    const SOCKET: u32 = 1 << 24;
    const SETUID: u32 = 1 << 23;
    const SETGID: u32 = 1 << 22;
    const CHAR_DEVICE: u32 = 1 << 21;
    const STICKY: u32 = 1 << 20;
    let mut go = mode & 0o777;
    go |= match mode & 0o170_000 {
        0o040_000 => DIR,
        0o120_000 => SYMLINK,
        0o060_000 => DEVICE,
        0o020_000 => DEVICE | CHAR_DEVICE,
        0o010_000 => NAMED_PIPE,
        0o140_000 => SOCKET,
        _ => 0,
    };
    for (bit, flag) in [(0o4000, SETUID), (0o2000, SETGID), (0o1000, STICKY)] {
        if mode & bit != 0 {
            go |= flag;
        }
    }
    go
}

/// A time as Go's JSON encodes it (RFC 3339 with nanoseconds).
fn go_time(unix_nanos: i64) -> String {
    let time = chrono::DateTime::from_timestamp(
        unix_nanos.div_euclid(1_000_000_000),
        u32::try_from(unix_nanos.rem_euclid(1_000_000_000)).unwrap_or(0),
    )
    .unwrap_or_default();
    time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A request body as an `AsyncRead`; a broken body is a read error, not an early end.
struct IncomingReader {
    body: Incoming,
    current: Bytes,
}

impl IncomingReader {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            current: Bytes::new(),
        }
    }
}

impl AsyncRead for IncomingReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.current.is_empty() {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.current = data;
                    }
                }
            }
        }
        let n = buf.remaining().min(this.current.len());
        buf.put_slice(&this.current[..n]);
        this.current.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_file_mode_sets_go_type_bits() {
        assert_eq!(go_file_mode(0o040_755), (1 << 31) | 0o755);
        assert_eq!(go_file_mode(0o100_644), 0o644);
        assert_eq!(go_file_mode(0o120_777), (1 << 27) | 0o777);
        assert_eq!(go_file_mode(0o041_777), (1 << 31) | (1 << 20) | 0o777);
        assert_eq!(go_file_mode(0o020_666), (1 << 26) | (1 << 21) | 0o666);
    }

    #[test]
    fn go_time_is_rfc3339_utc() {
        assert_eq!(go_time(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(
            go_time(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456789Z"
        );
    }
}
